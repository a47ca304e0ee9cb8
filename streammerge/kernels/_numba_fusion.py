"""Arcee Fusion's numba kernels (methods/arcee_fusion.py), re-exported by :mod:`._numba`; its conventions throughout
(flat arrays, :func:`load`/:func:`store`, ``fastmath=False``, float32 scalars).

Per element of a block of softmax rows of ``width`` elements (row ``r`` of the block: elements ``[r·width, (r +
1)·width)``), ``kl`` the block's rows' cached ``KL_row`` (float32): the importance ``|M − B|·KL_row`` in float32,
as the eager ``_FusionMerge._importance`` (``delta.abs().mul_(kl)``, ``delta`` = float32(M) − float32(B)). The per-row
KL itself stays torch's (``row_kl``: its vectorised softmax is not reproduced here). The statistics kernels add to
``_quantile.OrderStatistics``' own int64 histograms (numpy views), as its ``pass_a``/``pass_b`` would.

Order keys (methods/_quantile.py ``order_keys``): the int32 key ``b ^ ((b >> 31) & 0x7fffffff)`` of the importance's
bit pattern ``b``, here as its unsigned 32-bit pattern ``u``; the pass-A bin ``(key >> 16) + 32768`` is ``(u >> 16)
^ 0x8000`` and the low bits ``key & 0xffff`` are ``u & 0xffff`` (the same integers). NaN bit patterns are whatever the
same float32 operations give, as in torch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._numba import F32, JIT, STEP, _bits_of_f32, load, store


@njit(inline="always")
def _key(x):  # type: ignore[no-untyped-def]
    """The unsigned 32-bit pattern (as int64) of ``order_keys``' int32 key of float32 ``x``: non-negative floats keep
    their bits, negative ones have their 31 low bits flipped."""
    u = np.int64(_bits_of_f32(x))
    return u ^ ((u >> 31) * 0x7FFFFFFF)


@njit(inline="always")
def _importance_keys(base, model, kl, width, s, m, keys):  # type: ignore[no-untyped-def]
    """``keys[:m]`` = :func:`_key` of the importances of elements ``[s, s + m)``, a row's run at a time (a loop LLVM
    can vectorise)."""
    i = 0
    r = s // width
    while i < m:
        c = s + i - r * width
        take = min(width - c, m - i)
        k = kl[r]
        b, x = base[s + i : s + i + take], model[s + i : s + i + take]
        dst = keys[i : i + take]
        for j in range(take):
            dst[j] = _key(abs(load(x, j) - load(b, j)) * k)
        i += take
        r += 1


@njit(**JIT)
def fusion_high(base, model, kl, width, hist):  # type: ignore[no-untyped-def]
    """Pass A of the importance's quartiles (``_FusionMerge.accumulate`` with pass 0 after ``row_kl``, then
    ``OrderStatistics.pass_a``): ``hist[(key >> 16) + 32768] += 1`` per element. base, model: (rows·width,)
    row-major; kl: (rows,) float32; width: int; hist: (65536,) int64, accumulated into. Per step, the keys first,
    then the counting."""
    n = base.shape[0]
    keys = np.empty(STEP, dtype=np.int64)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _importance_keys(base, model, kl, width, s, m, keys)
        for i in range(m):
            hist[(keys[i] >> 16) ^ 0x8000] += 1


@njit(**JIT)
def fusion_low(base, model, kl, width, bins, h0, h1, h2):  # type: ignore[no-untyped-def]
    """Pass B (``OrderStatistics.pass_b``): ``h_t[key & 0xffff] += 1`` for the elements whose pass-A bin is
    ``bins[t]`` (the distinct target bins, -1 for none: at most three); other elements are not counted. bins: (3,)
    int64; h0, h1, h2: (65536,) int64, accumulated into (an unused one may be any of them); other arguments as
    :func:`fusion_high`. The counting only in a step with an element in a target bin."""
    n = base.shape[0]
    keys = np.empty(STEP, dtype=np.int64)
    b0, b1, b2 = bins[0], bins[1], bins[2]
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _importance_keys(base, model, kl, width, s, m, keys)
        hits = 0
        for i in range(m):
            hi = (keys[i] >> 16) ^ 0x8000
            hits += 1 if hi == b0 or hi == b1 or hi == b2 else 0
        if hits:
            for i in range(m):
                hi = (keys[i] >> 16) ^ 0x8000
                lo = keys[i] & 0xFFFF
                if hi == b0:
                    h0[lo] += 1
                elif hi == b1:
                    h1[lo] += 1
                elif hi == b2:
                    h2[lo] += 1


@njit(**JIT)
def fusion_emit(base, model, kl, width, threshold, out):  # type: ignore[no-untyped-def]
    """The merge (``_FusionMerge.emit`` and the engine's cast): ``d = M − B``, ``keep = 1 if |d|·KL_row >=
    threshold else 0`` (a NaN importance: 0, as ``ge_``), ``d·keep + B`` (so a dropped negative ``d`` gives ``-0 +
    B``, as ``mul_`` then ``add_``), stored in ``out``'s type; returns the non-finite count. threshold: float32;
    out: (rows·width,); other arguments as :func:`fusion_high`. A row's run at a time."""
    bad = 0
    n = base.shape[0]
    rows = n // width if width else 0
    for r in range(rows):
        s = r * width
        b, x, o, k = base[s : s + width], model[s : s + width], out[s : s + width], kl[r]
        for j in range(width):
            bj = load(b, j)
            d = load(x, j) - bj
            keep = F32(1.0) if abs(d) * k >= threshold else F32(0.0)
            bad += store(o, j, d * keep + bj)
    return bad
