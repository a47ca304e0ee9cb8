"""A counter-based uniform generator: the value for element ``i`` depends only on (seed, model, tensor, i).

``u(seed, k, name, i) = top53(mix64(key + (i + 1)·φ)) / 2⁵³`` with ``key = mix64(FNV-1a("seed/k/name"))`` and
``mix64`` the SplitMix64 finaliser. Because nothing depends on the order of draws, DARE masks are identical for
every chunking, after a resume, and on any device (integer ops only). Arithmetic is on int64 tensors with
wrap-around multiplication; logical right shifts are emulated with a mask.
"""

from __future__ import annotations

import math

import numpy as np

from .._torch import torch

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


def _top53(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 ``top53(mix64(key + (i + 1)·φ))`` for flat element indices ``i = start .. start + count - 1``."""
    i = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = i * _signed(_PHI) + _signed(key)
    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    z = z ^ _shr(z, 31)
    return _shr(z, 11)


_BLOCK = 1 << 16  # elements per step: the temporaries stay in cache


def _mixed_blocks(key: int, start: int, count: int):  # type: ignore[no-untyped-def]
    """numpy uint64 ``mix64(key + (i + 1)·φ)`` for flat indices ``start .. start + count - 1``, in cache-sized
    blocks: yields (offset, block); each block is overwritten by the next (numpy wraps on overflow and shifts
    logically)."""
    z = np.empty(min(count, _BLOCK), dtype=np.uint64)
    tmp = np.empty_like(z)
    # key + (i + 1)·φ = (key + (start + b0 + 1)·φ) + j·φ for the j-th element of a block starting at b0
    steps = np.arange(len(z), dtype=np.uint64) * np.uint64(_PHI)
    m1, m2 = np.uint64(_M1), np.uint64(_M2)
    for b0 in range(0, count, _BLOCK):
        n = min(_BLOCK, count - b0)
        zz, tt = z[:n], tmp[:n]
        np.add(steps[:n], np.uint64((key + (start + b0 + 1) * _PHI) & _MASK64), out=zz)
        for shift, mult in ((30, m1), (27, m2)):
            np.right_shift(zz, np.uint64(shift), out=tt)
            np.bitwise_xor(zz, tt, out=zz)
            np.multiply(zz, mult, out=zz)
        np.right_shift(zz, np.uint64(31), out=tt)
        np.bitwise_xor(zz, tt, out=zz)
        yield b0, zz


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 uniforms in [0, 1) for flat element indices ``start .. start + count - 1`` (on the CPU with numpy in
    cache-sized blocks, elsewhere with torch on the device: the same values)."""
    if torch.device(device).type != "cpu":
        return _top53(key, start, count, device).to(torch.float64) * (1.0 / (1 << 53))
    out = np.empty(count, dtype=np.float64)
    for b0, zz in _mixed_blocks(key, start, count):
        np.right_shift(zz, np.uint64(11), out=zz)
        np.multiply(zz, 1.0 / (1 << 53), out=out[b0: b0 + len(zz)])
    return torch.from_numpy(out)


def drop_threshold(density: float) -> int | None:
    """The mixed value from which DARE keeps an element at ``density``: kept iff ``mix64(...) >= cut``, that is
    ``u >= 1 − density`` compared as integers (``u = top53 / 2⁵³ >= p`` iff ``top53 >= ceil(p·2⁵³)``, i.e. the
    mixed value ``>= ceil(p·2⁵³)·2¹¹`` before the final shift); None at density 0 (nothing is kept)."""
    threshold = math.ceil((1.0 - density) * (1 << 53))
    return None if threshold >= 1 << 53 else threshold << 11


def keep_mask(key: int, start: int, count: int, density: float, dtype: type = bool,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask for flat indices ``start .. start + count - 1``: kept iff ``u >= 1 − density``; as
    ``dtype`` (bool, or a float type for a 0/1 factor to multiply by), on ``device``.

    Same values as comparing :func:`uniform` (:func:`drop_threshold`). On the CPU it is computed on uint64 in
    cache-sized blocks (numpy wraps on overflow and shifts logically); elsewhere with torch on the device.
    """
    cut = drop_threshold(density)
    if torch.device(device).type != "cpu":
        top = _top53(key, start, count, device)
        keep = top >= (cut >> 11) if cut is not None else torch.zeros_like(top, dtype=torch.bool)
        return keep if dtype is bool else keep.to(torch.float32 if dtype is np.float32 else torch.float64)
    out = np.zeros(count, dtype=dtype)
    if cut is None:  # density 0: nothing is kept
        return torch.from_numpy(out)
    for b0, zz in _mixed_blocks(key, start, count):
        np.greater_equal(zz, np.uint64(cut), out=out[b0: b0 + len(zz)])
    return torch.from_numpy(out)


def uniform_reference(key: int, index: int) -> float:
    """The same value computed with Python integers (for tests)."""
    return (_mix64_int(key + (index + 1) * _PHI) >> 11) / (1 << 53)
