"""A counter-based uniform generator: the value for element ``i`` depends only on (seed, model, tensor, i).

``u(seed, k, name, i) = top53(mix64(key + (i + 1)·φ)) / 2⁵³`` with ``key = mix64(FNV-1a("seed/k/name"))`` and
``mix64`` the SplitMix64 finaliser. Because nothing depends on the order of draws, DARE masks are identical for
every chunking, after a resume, and on any device (integer ops only). Arithmetic is on int64 tensors with
wrap-around multiplication; logical right shifts are emulated with a mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_PHI = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, model: int, name: str) -> int:
    """The per-(seed, model, tensor) key: SplitMix64 of the FNV-1a hash of ``"seed/model/name"``."""
    h = 0xCBF29CE484222325
    for byte in f"{seed}/{model}/{name}".encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return _mix64_int(h)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 uniforms in [0, 1) for flat element indices ``start .. start + count - 1``."""
    i = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = i * _signed(_PHI) + _signed(key)
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).to(torch.float64) * (1.0 / (1 << 53))


_BLOCK = 1 << 16  # elements per step: the temporaries stay in cache


def keep_mask(key: int, start: int, count: int, density: float, dtype: type = bool) -> torch.Tensor:
    """DARE's keep mask for flat indices ``start .. start + count - 1``: kept iff ``u >= 1 − density``; as
    ``dtype`` (bool, or a float type for a 0/1 factor to multiply by).

    Same values as comparing :func:`uniform`, computed on uint64 in cache-sized blocks (numpy wraps on overflow
    and shifts logically), and compared as integers: ``u = top53 / 2⁵³ >= p`` iff ``top53 >= ceil(p·2⁵³)``.
    """
    threshold = np.uint64(math.ceil((1.0 - density) * (1 << 53)))
    out = np.empty(count, dtype=dtype)
    z = np.empty(min(count, _BLOCK), dtype=np.uint64)
    tmp = np.empty_like(z)
    steps = np.arange(1, len(z) + 1, dtype=np.uint64)
    phi, m1, m2, k = np.uint64(_PHI), np.uint64(_M1), np.uint64(_M2), np.uint64(key)
    for b0 in range(0, count, _BLOCK):
        n = min(_BLOCK, count - b0)
        zz, tt = z[:n], tmp[:n]
        np.add(steps[:n], np.uint64(start + b0), out=zz)  # index + 1
        np.multiply(zz, phi, out=zz)
        np.add(zz, k, out=zz)
        for shift, mult in ((30, m1), (27, m2)):
            np.right_shift(zz, np.uint64(shift), out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, mult, out=zz)
        np.right_shift(zz, np.uint64(31), out=tt)
        np.bitwise_xor(zz, tt, out=zz)
        np.right_shift(zz, np.uint64(11), out=zz)
        np.greater_equal(zz, threshold, out=out[b0 : b0 + n])
    return torch.from_numpy(out)


def uniform_reference(key: int, index: int) -> float:
    """The same value computed with Python integers (for tests)."""
    return (_mix64_int(key + (index + 1) * _PHI) >> 11) / (1 << 53)
