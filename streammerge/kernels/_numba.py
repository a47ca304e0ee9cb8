"""The numba kernels behind :mod:`streammerge.kernels` (imported only when numba is the backend).

Every kernel is a loop over the elements of one compute block (in steps of :data:`STEP` elements), compiled with
``fastmath=False`` (IEEE semantics: no FMA contraction, checked in the machine code and by a test; no
reassociation; no reciprocal for a division; LLVM may still vectorise a loop, which keeps every lane's operations
and their order), ``error_model="numpy"`` (a division by zero gives an infinity or a NaN, as in torch, rather than
raising as in Python), ``nogil=True`` (the engine's compute workers run concurrently) and ``cache=True`` (compiled
once per dtype signature, then loaded from ``__pycache__``). Each element's operations are the eager torch code's, in
its order, each rounded to float32 as torch rounds it; the docstrings name the eager function mirrored. Scalars
are passed as float32 values, as torch casts a Python number to a float32 tensor's dtype before a binary op.

Arrays are flat (1-D, C-contiguous) numpy views of the torch tensors. Element types:

- inputs: ``uint16`` holds bfloat16 bits, ``int16`` float16 bits, ``float32`` itself; each is widened to float32
  exactly in a register (:func:`load`);
- outputs: the same three; float32 is rounded to the output type round-to-nearest-even with subnormals, as
  ``Tensor.copy_`` does (:func:`store`). A NaN is written as a NaN, whose payload is unspecified: a non-finite
  output is refused by the engine, which reruns the block eagerly to say why.

Every emit kernel returns the number of non-finite output elements (after the cast, so an overflow of the output
type counts).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from . import BITS, FACTOR, MAGPRUNE, RANDOM, SELECT  # a model's keep factor: how sparse_merge and l1_sums get it

JIT = {"fastmath": False, "nogil": True, "cache": True, "error_model": "numpy"}

U32, U64 = np.uint32, np.uint64
F32 = np.float32


@intrinsic
def _f32_from_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the uint32 ``x`` (an LLVM bitcast)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_of_f32(typingctx, x):  # type: ignore[no-untyped-def]
    """The uint32 bits of the float32 ``x`` (an LLVM bitcast)."""
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always")
def _bf16_to_f32(h):  # type: ignore[no-untyped-def]
    """bfloat16 bits -> float32: the high half of the float32 (exact)."""
    return _f32_from_bits(U32(h) << U32(16))


@njit(inline="always")
def _f16_to_f32(h):  # type: ignore[no-untyped-def]
    """float16 bits (int16) -> float32, exact: the exponent and mantissa moved to float32's places and scaled by
    2^112 (a power of two: exact, and it makes a float16 subnormal a float32 normal); infinities and NaNs get the
    all-ones exponent."""
    u = U32(h) & U32(0xFFFF)
    em = u & U32(0x7FFF)
    sign = (u & U32(0x8000)) << U32(16)
    if em >= U32(0x7C00):
        return _f32_from_bits(sign | U32(0x7F800000) | ((em & U32(0x3FF)) << U32(13)))
    mag = _f32_from_bits(em << U32(13)) * _f32_from_bits(U32((127 + 112) << 23))
    return _f32_from_bits(_bits_of_f32(mag) | sign)


@njit(inline="always")
def _f32_to_bf16(x):  # type: ignore[no-untyped-def]
    """float32 -> bfloat16 bits, round to nearest even (c10::BFloat16's round_to_nearest_even); NaN -> 0x7FC0."""
    b = _bits_of_f32(x)
    if (b & U32(0x7FFFFFFF)) > U32(0x7F800000):
        return np.uint16(0x7FC0)
    return np.uint16((b + U32(0x7FFF) + ((b >> U32(16)) & U32(1))) >> U32(16))


@njit(inline="always")
def _f32_to_f16(x):  # type: ignore[no-untyped-def]
    """float32 -> float16 bits (int16), round to nearest even with subnormals (IEEE 754's conversion, as
    c10::Half and F16C do), in integer arithmetic (so no floating-point mode can change it); NaN -> 0x7E00."""
    b = _bits_of_f32(x)
    a = b & U32(0x7FFFFFFF)
    sign = (b >> U32(16)) & U32(0x8000)
    if a > U32(0x7F800000):
        h = U32(0x7E00)
    elif a >= U32(0x477FF000):  # 65520 and above round to infinity
        h = U32(0x7C00)
    elif a >= U32(0x38800000):  # a float16 normal: rebias the exponent, round the 13 dropped bits
        h = (a - U32(0x38000000) + U32(0xFFF) + ((a >> U32(13)) & U32(1))) >> U32(13)
    elif a >= U32(0x33000000):  # a float16 subnormal (or 0 / the smallest normal after rounding)
        shift = U32(126) - (a >> U32(23))  # 14..24
        m = (a & U32(0x7FFFFF)) | U32(0x800000)
        h = m >> shift
        rest = m & ((U32(1) << shift) - U32(1))
        half = U32(1) << (shift - U32(1))
        if rest > half or (rest == half and (h & U32(1)) == U32(1)):
            h += U32(1)
    else:  # below half the smallest subnormal: 0
        h = U32(0)
    return np.int16(np.uint16(h | sign))


def load(a, i):  # type: ignore[no-untyped-def]
    """Element ``i`` of input ``a`` as float32 (see the module docstring for the element types)."""


@overload(load, inline="always")
def _load(a, i):  # type: ignore[no-untyped-def]
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: _f16_to_f32(a[i])
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


def store(out, i, x):  # type: ignore[no-untyped-def]
    """Write float32 ``x`` to ``out[i]`` in the output's type; 1 if the written value is not finite, else 0."""


@overload(store, inline="always")
def _store(out, i, x):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:
        def store_bf16(out, i, x):  # type: ignore[no-untyped-def]
            h = _f32_to_bf16(x)
            out[i] = h
            return 1 if (h & np.uint16(0x7F80)) == np.uint16(0x7F80) else 0
        return store_bf16
    if out.dtype == types.int16:
        def store_f16(out, i, x):  # type: ignore[no-untyped-def]
            h = _f32_to_f16(x)
            out[i] = h
            return 1 if (h & np.int16(0x7C00)) == np.int16(0x7C00) else 0
        return store_f16
    if out.dtype == types.float32:
        def store_f32(out, i, x):  # type: ignore[no-untyped-def]
            out[i] = x
            return 1 if (_bits_of_f32(x) & U32(0x7F800000)) == U32(0x7F800000) else 0
        return store_f32
    return None


@njit(inline="always")
def _abs_bits(d):  # type: ignore[no-untyped-def]
    """The int32 bit pattern of ``|d|`` (torch's ``abs_().view(int32)``; monotone in the value), as int64."""
    return np.int64(_bits_of_f32(d) & U32(0x7FFFFFFF))


# ---- conversions alone (tests: every bit pattern against torch) ----------------------------------------------------
@njit(**JIT)
def convert(x, out):  # type: ignore[no-untyped-def]
    """``out[i] = x[i]`` through :func:`load` and :func:`store`; returns the non-finite count."""
    bad = 0
    for i in range(x.shape[0]):
        bad += store(out, i, load(x, i))
    return bad


# ---- column sums in tiles ------------------------------------------------------------------------------------------
@njit(inline="always")
def _close_tile(row, tile, rows_total, slot0, acc, partial):  # type: ignore[no-untyped-def]
    """After row ``row`` (0-based, in the tensor) of a column-sums kernel: when it completes its aligned tile of
    ``tile`` rows (or the tensor's last, shorter one), hand the tile's sums ``partial`` on and start the next from 0.
    ``slot0 < 0``: add them to the running total ``acc[0]`` (methods/_tiles.py ``add_column_sums``' order: tile
    sums added in row order). Else the block runs out of turn (``_tiles.FusedTiles``): the sums go into the tile's
    own slot ``acc[row // tile - slot0]``, which is added to the total later, in row order: the same adds."""
    if (row + 1) % tile == 0 or row + 1 == rows_total:
        if slot0 < 0:
            a = acc[0]
            for c in range(a.shape[0]):
                a[c] = a[c] + partial[c]
                partial[c] = 0.0
        else:
            a = acc[row // tile - slot0]
            for c in range(a.shape[0]):
                a[c] = partial[c]
                partial[c] = 0.0


# ---- the block structure ---------------------------------------------------------------------------------------
#: elements per step of a kernel's loop: each step runs model by model over this many elements, in float32 scratch
#: rows that stay in the L1/L2 cache, so the models are picked from their tuple once per step, not per element,
#: and every inner loop is a plain loop LLVM vectorises. Each step slices its rows out of the arrays and indexes
#: them from 0: an index known to be non-negative needs no wrap-around test, which would stop the vectorising.
STEP = 1024


@njit(inline="always")
def _widen(x, n, dst):  # type: ignore[no-untyped-def]
    """``dst[:n] = x[:n]`` as float32 (exact)."""
    for i in range(n):
        dst[i] = load(x, i)


# ---- task arithmetic, linear -------------------------------------------------------------------------------------
@njit(**JIT)
def delta_sum(base, models, w, div, lam, out):  # type: ignore[no-untyped-def]
    """``B + lam·((Σ_k (M_k − B)·w_k) / div)``, the sum left to right (methods/_delta.py: emit with plain_sum).

    base: (n,); models: tuple of N (n,) arrays of one type; w: (N,) float32; div, lam: float32 (1 for none: an
    exact identity, as the eager code's skipped operation); out: (n,). Eager: ``d = m − base; d.mul_(w)``, then
    ``mixed = d_1; mixed.add_(d_k)...; mixed.div_(div); mixed.mul_(lam); mixed.add_(base)``; ``-0.0`` starts
    the sum, the exact identity of IEEE addition (so the first term is kept bit for bit, a -0 included).
    """
    bad = 0
    n = base.shape[0]
    b = np.empty(STEP, dtype=np.float32)
    acc = np.empty(STEP, dtype=np.float32)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _widen(base[s : s + m], m, b)
        acc[:m] = F32(-0.0)
        for k in range(len(models)):
            x, wk = models[k][s : s + m], w[k]
            for i in range(m):
                acc[i] = acc[i] + (load(x, i) - b[i]) * wk
        o = out[s : s + m]
        for i in range(m):
            bad += store(o, i, (acc[i] / div) * lam + b[i])
    return bad


@njit(**JIT)
def weighted_sum(models, w, div, out):  # type: ignore[no-untyped-def]
    """``(Σ_k M_k·w_k) / div``, left to right (methods/linear.py ``_LinearMerge.emit``). Shapes as
    :func:`delta_sum`."""
    bad = 0
    n = out.shape[0]
    acc = np.empty(STEP, dtype=np.float32)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        acc[:m] = F32(-0.0)
        for k in range(len(models)):
            x, wk = models[k][s : s + m], w[k]
            for i in range(m):
                acc[i] = acc[i] + load(x, i) * wk
        o = out[s : s + m]
        for i in range(m):
            bad += store(o, i, acc[i] / div)
    return bad


@njit(**JIT)
def mean_interpolate(base, models, n, ratio, rest, out):  # type: ignore[no-untyped-def]
    """Model Stock's merge (methods/model_stock.py ``_ModelStockMerge.emit``): ``((M_1 + M_2 + ...) / n)·ratio +
    B·rest``, the sum left to right from the first model, every scalar float32 (``n`` the model count, ``ratio``
    r and ``rest`` float32(1 − r) as torch casts them). Shapes as :func:`delta_sum`."""
    bad = 0
    size = base.shape[0]
    acc = np.empty(STEP, dtype=np.float32)
    for s in range(0, size, STEP):
        m = min(STEP, size - s)
        acc[:m] = F32(-0.0)
        for k in range(len(models)):
            x = models[k][s : s + m]
            for i in range(m):
                acc[i] = acc[i] + load(x, i)
        b, o = base[s : s + m], out[s : s + m]
        for i in range(m):
            bad += store(o, i, (acc[i] / n) * ratio + load(b, i) * rest)
    return bad


@njit(**JIT)
def pair_sums(base, models, use_base, first, second, cols, row0, tile, rows_total, slot0, acc,  # type: ignore[no-untyped-def]
              partial):
    """The Gram statistics pass (methods/_tiles.py ``PairSums``, for _gram.GramMerge and model_stock): per pair p
    and column, ``Σ v_first[p]·v_second[p]`` in float64, ``v_k = M_k − B`` in float32 with ``use_base``, else
    ``M_k``, each widened to float64 before the product. The order is ``ColumnSums``' (as :func:`l1_sums`).

    base, models: (rows·cols,) row-major, rows ``row0 ..`` of a tensor of ``rows_total`` rows; first, second: (P,)
    int64 model indices; partial: (P·cols,) float64, pair-major; slot0, acc: where finished tiles go
    (:func:`_close_tile`; acc (slots, P·cols) float64).
    """
    n_models = len(models)
    rows = base.shape[0] // cols if cols else 0
    b = np.empty(cols, dtype=np.float32)
    v = np.empty((n_models, cols), dtype=np.float64)
    for r in range(rows):
        s = r * cols
        _widen(base[s : s + cols], cols, b)
        for k in range(n_models):
            x, vk = models[k][s : s + cols], v[k]
            if use_base:
                for j in range(cols):
                    vk[j] = np.float64(load(x, j) - b[j])
            else:
                for j in range(cols):
                    vk[j] = np.float64(load(x, j))
        for p in range(first.shape[0]):
            a, c = v[first[p]], v[second[p]]
            part = partial[p * cols : (p + 1) * cols]
            for j in range(cols):
                part[j] = part[j] + a[j] * c[j]
        _close_tile(row0 + r, tile, rows_total, slot0, acc, partial)


# ---- SCE ---------------------------------------------------------------------------------------------------------
@njit(**JIT)
def square_sums(base, models, cols, row0, tile, rows_total, slot0, acc, partial):  # type: ignore[no-untyped-def]
    """SCE's weights pass without a selection (methods/sce.py ``_SceMerge.accumulate``): per model k and column,
    ``Σ τ_k²`` in float64 of the float32 squares ``τ_k² = (M_k − B)²``, in ``ColumnSums``' order (as
    :func:`l1_sums`). partial and a slot of acc: (N·cols,) float64, model-major; other arguments as
    :func:`pair_sums`."""
    n_models = len(models)
    rows = base.shape[0] // cols if cols else 0
    b = np.empty(cols, dtype=np.float32)
    for r in range(rows):
        s = r * cols
        _widen(base[s : s + cols], cols, b)
        for k in range(n_models):
            x = models[k][s : s + cols]
            part = partial[k * cols : (k + 1) * cols]
            for j in range(cols):
                t = load(x, j) - b[j]
                part[j] = part[j] + np.float64(t * t)
        _close_tile(row0 + r, tile, rows_total, slot0, acc, partial)


@njit(**JIT)
def sce_emit(base, models, w, floor, out):  # type: ignore[no-untyped-def]
    """SCE's merge without a selection (``_SceMerge.emit``): ``τ_k = M_k − B``; the elected sign ``copysign(1,
    Σ τ_k)``; ``s_k = a_k·w_k`` with ``a_k`` 1 where ``τ_k`` has the elected sign (``agreement``); ``B +
    (Σ τ_k·s_k) / max(Σ s_k, floor)``, sums left to right (float32; w: (N,) float32, floor float32(1e-6)). Shapes as
    :func:`delta_sum`."""
    bad = 0
    n, n_models = base.shape[0], len(models)
    b = np.empty(STEP, dtype=np.float32)
    d = np.empty((n_models, STEP), dtype=np.float32)
    total = np.empty(STEP, dtype=np.float32)
    merged = np.empty(STEP, dtype=np.float32)
    divisor = np.empty(STEP, dtype=np.float32)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _widen(base[s : s + m], m, b)
        total[:m] = F32(-0.0)
        for k in range(n_models):
            x, dk = models[k][s : s + m], d[k]
            for i in range(m):
                dk[i] = load(x, i) - b[i]
                total[i] = total[i] + dk[i]
        for i in range(m):
            total[i] = np.copysign(F32(1.0), total[i])  # the elected sign
        merged[:m] = F32(-0.0)
        divisor[:m] = F32(-0.0)
        for k in range(n_models):
            dk, wk = d[k], w[k]
            for i in range(m):
                share = (F32(1.0) if dk[i] * total[i] > F32(0.0) else F32(0.0)) * wk
                merged[i] = merged[i] + dk[i] * share
                divisor[i] = divisor[i] + share
        o = out[s : s + m]
        for i in range(m):
            bad += store(o, i, merged[i] / max(divisor[i], floor) + b[i])
    return bad


# ---- NearSwap ------------------------------------------------------------------------------------------------------
@njit(**JIT)
def nearswap_emit(base, model, t, out):  # type: ignore[no-untyped-def]
    """NearSwap's merge (methods/nearswap.py ``_NearSwapMerge.emit``): ``w = (1 / |B − M|)·t`` (float32; a NaN or an
    infinity becomes 1, as ``nan_to_num``), clamped to [0, 1]; ``w·M + (1 − w)·B``. base, model, out: (n,); t:
    float32."""
    bad = 0
    for i in range(base.shape[0]):
        b, m = load(base, i), load(model, i)
        w = (F32(1.0) / abs(b - m)) * t  # torch's ``t / x`` for a Python t: ``x.reciprocal() * t``
        if np.isnan(w) or np.isinf(w):
            w = F32(1.0)
        w = min(max(w, F32(0.0)), F32(1.0))
        bad += store(out, i, w * m + (F32(1.0) - w) * b)
    return bad


# ---- RAM, RAM+ ---------------------------------------------------------------------------------------------------
@njit(**JIT)
def ram_counts(base, models, eps, shared, unique):  # type: ignore[no-untyped-def]
    """ramplus_tl's counting pass (methods/ram.py ``_RamMerge.accumulate``): model k counts an element where
    ``|M_k − B| > eps`` (float32; a NaN counts nowhere); ``unique[k]`` += the elements only model k counts,
    ``shared[k]`` += those it counts with another. base, models: (n,); eps: float32; shared, unique: (N,) int64."""
    n, n_models = base.shape[0], len(models)
    b = np.empty(STEP, dtype=np.float32)
    total = np.empty(STEP, dtype=np.int64)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _widen(base[s : s + m], m, b)
        total[:m] = 0
        for k in range(n_models):
            x = models[k][s : s + m]
            for i in range(m):
                total[i] += 1 if abs(load(x, i) - b[i]) > eps else 0
        for k in range(n_models):
            x = models[k][s : s + m]
            alone = 0
            counted = 0
            for i in range(m):
                c = 1 if abs(load(x, i) - b[i]) > eps else 0
                counted += c
                alone += c if total[i] == 1 else 0
            unique[k] += alone
            shared[k] += counted - alone


@njit(**JIT)
def ram_emit(base, models, eps, lam, out):  # type: ignore[no-untyped-def]
    """RAM's merge (``_RamMerge.emit``): with ``d_k = (M_k − B)·[|M_k − B| > eps]`` and ``c`` the models that count,
    ``B + Σ_k (d_k / max(c, 1))·(lam[k] where c = 1 and lam[k] ≠ 1)``, the terms added in model order (float32;
    ``lam`` (N,) float32, all 1 for ``ram``). Shapes as :func:`delta_sum`."""
    bad = 0
    n, n_models = base.shape[0], len(models)
    b = np.empty(STEP, dtype=np.float32)
    total = np.empty(STEP, dtype=np.float32)
    acc = np.empty(STEP, dtype=np.float32)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _widen(base[s : s + m], m, b)
        total[:m] = F32(0.0)
        for k in range(n_models):
            x = models[k][s : s + m]
            for i in range(m):
                total[i] = total[i] + (F32(1.0) if abs(load(x, i) - b[i]) > eps else F32(0.0))
        acc[:m] = F32(-0.0)
        for k in range(n_models):
            x, lk = models[k][s : s + m], lam[k]
            for i in range(m):
                d = load(x, i) - b[i]
                term = (d * (F32(1.0) if abs(d) > eps else F32(0.0))) / max(total[i], F32(1.0))
                if lk != F32(1.0) and total[i] == F32(1.0):
                    term = term * lk
                acc[i] = acc[i] + term
        o = out[s : s + m]
        for i in range(m):
            bad += store(o, i, acc[i] + b[i])
    return bad


# ---- WIDEN ---------------------------------------------------------------------------------------------------------
@njit(**JIT)
def widen_emit(base, models, weights, cols, by_rows, r0, out):  # type: ignore[no-untyped-def]
    """``B + ((Δ_1·w_1 + Δ_2·w_2) + ...)`` with per-column weights (methods/widen.py ``weighted_delta_sum``).

    base, models, out: (rows·cols,) row-major; weights: (N, C) float32, one weight per column and model, where a
    column is a stored column (``by_rows`` false: element (i, j) takes ``weights[k, j]``) or a stored row
    (embeddings, Conv1D: element (i, j) takes ``weights[k, r0 + i]``). One row at a time.
    """
    bad = 0
    rows = base.shape[0] // cols if cols else 0
    b = np.empty(cols, dtype=np.float32)
    acc = np.empty(cols, dtype=np.float32)
    for r in range(rows):
        s = r * cols
        _widen(base[s : s + cols], cols, b)
        acc[:] = F32(-0.0)
        for k in range(len(models)):
            x = models[k][s : s + cols]
            if by_rows:
                wk = weights[k, r0 + r]
                for j in range(cols):
                    acc[j] = acc[j] + (load(x, j) - b[j]) * wk
            else:
                wr = weights[k]
                for j in range(cols):
                    acc[j] = acc[j] + (load(x, j) - b[j]) * wr[j]
        o = out[s : s + cols]
        for j in range(cols):
            bad += store(o, j, acc[j] + b[j])
    return bad


# ---- DARE's drop mask: methods/_rng.py's counter-based generator -------------------------------------------------
PHI, MIX1, MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@njit(inline="always")
def _mixed(key, index):  # type: ignore[no-untyped-def]
    """``mix64(key + (index + 1)·φ)``, uint64 with wrap-around (``_rng._mixed_blocks``' value for flat element
    ``index`` of the stream ``key``); DARE keeps the element iff it is ``>= cut`` (``_rng.keep_mask``). Every
    operand is uint64: numba would take a mix with int64 to float64."""
    return _finish(_start(key, index))


@njit(inline="always")
def _start(key, index):  # type: ignore[no-untyped-def]
    """:func:`_mixed`'s first step, ``key + (index + 1)·φ`` (uint64). A loop over consecutive indices takes it once
    and keeps it as a running sum (``z += φ``, the same uint64 with wrap-around) instead of a product per element:
    3% of DELLA's L1 pass."""
    return key + (np.uint64(index) + np.uint64(1)) * PHI


@njit(inline="always")
def _finish(z):  # type: ignore[no-untyped-def]
    """:func:`_mixed` after its first step ``z`` (:func:`_start`)."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


# ---- DELLA's MAGPRUNE keep factors ----------------------------------------------------------------------------------
#: digits of the rank sort: three passes of 11 bits cover a non-negative float32's 31 bits
RADIX_BITS, RADIX_SHIFTS = 11, (0, 11, 22)


@njit(inline="always")
def _row_ranks(keys, n, idx, spare_keys, spare_idx, counts, ranks):  # type: ignore[no-untyped-def]
    """``ranks[i]`` = the 0-based ascending rank of ``keys[i]`` among ``keys[:n]`` (uint32), ties by index: what
    ``torch.argsort(stable=True)`` and its inverse give (methods/_delta.py ``ascending_order``). A stable LSD radix
    sort of (key, index) in three 11-bit passes (a pass whose digit is the same for every key is skipped); ``keys``
    is overwritten, the other arrays are scratch of n elements (counts: 2048)."""
    for i in range(n):
        idx[i] = i
    src_k, src_i, dst_k, dst_i = keys, idx, spare_keys, spare_idx
    for shift in RADIX_SHIFTS:
        counts[:] = 0
        for i in range(n):
            counts[(src_k[i] >> U32(shift)) & U32(2047)] += 1
        if counts[(src_k[0] >> U32(shift)) & U32(2047)] == n:
            continue
        total = 0
        for c in range(2048):
            t = counts[c]
            counts[c] = total
            total += t
        for i in range(n):
            d = (src_k[i] >> U32(shift)) & U32(2047)
            at = counts[d]
            counts[d] = at + 1
            dst_k[at] = src_k[i]
            dst_i[at] = src_i[i]
        src_k, src_i, dst_k, dst_i = dst_k, dst_i, src_k, src_i
    for j in range(n):
        ranks[src_i[j]] = j


@njit(inline="always")
def _bit_length(x):  # type: ignore[no-untyped-def]
    """Bits needed to write the uint32 ``x`` (0 for 0)."""
    b = 0
    while x:
        x >>= U32(1)
        b += 1
    return b


#: vectorised passes over a row (one per key of its undecided elements, two where that key's bucket holds other keys
#: too) up to which :func:`_row_keep` ranks them by counting; past them, the rest of the row is ranked whole
#: (:func:`_row_ranks`, about 100 such passes on rows of 896 and 4864)
EXACT_LIMIT = 64
#: :func:`_row_keep` counts a row of n elements into at most 2^floor(log2 n) buckets (n at most: twice as many cost
#: more in the prefix than they save in undecided elements, 1-8% on rows of 896, 1536 and 4864 bfloat16 deltas; four
#: times fewer cost 2-8% more), and at most 2¹³
MAX_BUCKET_BITS = 13
#: 2⁵³: a draw ``u`` is an integer below it over it
TWO53 = 9007199254740992.0


@njit(inline="always")
def _bucket_bits(n):  # type: ignore[no-untyped-def]
    """log2 of the most buckets :func:`_row_keep` counts a row of ``n`` elements into."""
    return min(max(_bit_length(U32(n)) - 1, 0), MAX_BUCKET_BITS)


@njit(inline="always")
def _keep_scratch(n):  # type: ignore[no-untyped-def]
    """The scratch arrays of :func:`_row_keep` for rows of ``n`` elements."""
    return (np.empty((1 << _bucket_bits(n)) + 2, dtype=np.uint32), np.empty(n, dtype=np.uint64),
            np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.int32),
            np.empty(n, dtype=np.int32), np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.int32),
            np.empty(2048, dtype=np.int64), np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.bool_),
            np.empty(n, dtype=np.uint32))


@njit(inline="always")
def _keep_table(n, density, spread, low, p_of, cut):  # type: ignore[no-untyped-def]
    """MAGPRUNE's keep probability ``p_of[r]`` of rank ``r`` in a row of ``n`` (float32: ``min(max(r / (n − 1), 0),
    1)·spread + low``, each operation rounded as torch's ``div_``, ``clamp_``, ``mul_``, ``add_``; ``density`` for a
    row of one element) and its draw threshold ``cut[r]`` (uint64): a draw ``u = v / 2⁵³`` (``v`` a 53-bit integer)
    is ``>= 1 − p`` in float64 iff ``v >= ceil((1 − p)·2⁵³)`` (the product is exact: a power of two). Returns
    whether ``cut`` never increases with the rank (epsilon >= 0), so a rank's bounds bound the decision."""
    last = F32(n - 1)
    falling = True
    for r in range(n):
        if n > 1:
            q = F32(r) / last
            q = min(max(q, F32(0.0)), F32(1.0))
            p_of[r] = q * spread + low
        else:
            p_of[r] = density
        c = np.ceil((1.0 - np.float64(p_of[r])) * TWO53)
        # below 0: every draw passes; above 2⁵³ (or NaN, which no draw is >= to): none does
        cut[r] = np.uint64(0) if c <= 0.0 else (np.uint64(c) if c <= TWO53 else np.uint64(TWO53 + 1.0))
        if r and cut[r] > cut[r - 1]:
            falling = False
    return falling


@njit(inline="always")
def _draw(z):  # type: ignore[no-untyped-def]
    """The 53-bit integer of a flat element's draw (uint64), ``z`` its :func:`_start` in the stream: ``_rng.uniform``
    is it over 2⁵³, the top 53 bits of :func:`_mixed`."""
    return _finish(z) >> np.uint64(11)


@njit(inline="always")
def _bucket(k, lo_key, shift):  # type: ignore[no-untyped-def]
    """:func:`_row_keep`'s bucket of the key ``k``: 0 for zero, ranked first; else 1 + its nonzero bucket
    ``(k − lo_key) >> shift``. One definition for the count and for the lookups, which must agree."""
    return ((k - lo_key) >> shift) + U32(1) if k != U32(0) else U32(0)


@njit(inline="always")
def _row_keep(keys, n, key, first, p_of, cut, bounds, inverse, scratch, out):  # type: ignore[no-untyped-def]
    """One row's keep factors by rank: element ``i`` of ascending rank ``r`` (ties by index) is kept iff its draw
    (the top 53 bits of :func:`_mixed` of ``key`` and its flat index ``first + i``) is ``>= cut[r]``, with factor
    1, or ``1 / p_of[r]`` with ``inverse`` (:func:`_keep_table`).

    With ``bounds`` (``cut`` never increases with the rank) and factors of 1, most elements need no rank: a draw
    ``>= cut[0]`` keeps its element whatever the rank, one ``< cut[n − 1]`` drops it, and only the 2ε of draws in
    between (the band) need more. The nonzero keys' span is cut into equal buckets (:func:`_bucket_bits`) and
    counted, zeros in a bucket of their own, ranked first; a band element's bucket bounds its rank, which decides
    it unless ``cut`` at the bucket's lowest and highest rank lie on either side of its draw (equal keys, mostly).
    Those few are ranked exactly a key at a time, by counting over the row, or past :data:`EXACT_LIMIT` passes by
    ranking the row (:func:`_row_ranks`). Without ``bounds``, or with ``inverse``, every element is ranked
    (:func:`_row_ranks`). Every decision is the one its exact rank gives; the loops are branch-free where the draws
    are random.

    keys: (n,) uint32 (the |Δ| bits), modified; p_of: (n,) float32 and cut: (n,) uint64 by rank; scratch: the
    arrays of :func:`_keep_scratch`; out: (n,) float32."""
    at, draws, band, pending, ranks, idx, spare_keys, spare_idx, radix, equal_before, resolved, ids = scratch
    if not bounds or inverse:
        z = _start(key, first)
        for i in range(n):
            draws[i] = _draw(z)
            z += PHI
        _row_ranks(keys, n, idx, spare_keys, spare_idx, radix, ranks)
        for i in range(n):
            rank = ranks[i]
            f = F32(1.0) if draws[i] >= cut[rank] else F32(0.0)
            out[i] = f / p_of[rank] if inverse else f
        return
    top, bottom = cut[0], cut[n - 1]
    z = _start(key, first)
    for i in range(n):  # the draws (a vectorised loop), and the decisions outside the band
        u = _draw(z)
        z += PHI
        draws[i] = u
        out[i] = F32(1.0) if u >= top else F32(0.0)
    width = top - bottom
    if width == 0:  # no band (epsilon 0): every decision is made
        return
    lo_key, hi_key = U32(0xFFFFFFFF), U32(0)  # the nonzero keys' least and greatest
    for i in range(n):
        k = keys[i]
        lo_key = min(lo_key, k if k != U32(0) else U32(0xFFFFFFFF))
        hi_key = max(hi_key, k)
    lo_key = min(lo_key, hi_key)  # every key zero: one (empty) nonzero bucket
    span_bits, n_bits = _bit_length(hi_key - lo_key), _bucket_bits(n)
    shift = U32(span_bits - n_bits) if span_bits > n_bits else U32(0)
    buckets = U64((hi_key - lo_key) >> shift) + U64(1)
    # at[c]: the count of bucket c (0: the zeros, c + 1: nonzero bucket c), then the least rank in it; counted in
    # the loop that lists the band's elements (in index order): two scalar loops in one ran 10-20% quicker.
    # Indices read back from the scratch arrays are unsigned: numba adds a negative-index wrap-around to every
    # signed index, which doubled the cost of the band's gathers
    for i in range(n):  # the buckets first (a vectorised loop): the two scalar loops below only read them
        ids[i] = _bucket(keys[i], lo_key, shift)
    at[: buckets + U64(1)] = 0
    banded = U64(0)
    for i in range(n):
        band[banded] = U32(i)
        banded += U64(1) if draws[i] - bottom < width else U64(0)
        at[U64(ids[i])] += U32(1)
    if banded == 0:
        return
    below = U32(0)
    for c in range(buckets + U64(1)):
        count = at[c]
        at[c] = below
        below += count
    at[buckets + U64(1)] = U32(n)
    waiting = U64(0)
    for j in range(banded):
        i = U64(band[j])
        c, u = U64(ids[i]), draws[i]
        kept = u >= cut[U64(at[c])]
        out[i] = F32(1.0) if kept else F32(0.0)
        pending[waiting] = U32(i)
        waiting += U64(1) if (not kept) & (u >= cut[U64(at[c + U64(1)]) - U64(1)]) else U64(0)
    # the waiting elements' exact ranks, a key at a time: one vectorised pass over the row counts the keys equal to
    # it, noting the count before each waiting element of that key (ties rank by index); if they are all of its
    # bucket's keys (bfloat16 deltas repeat: 96% of the waiting elements on rows of 8960), the keys below it are the
    # bucket's least rank, else a second pass counts them. One pass per key where there was one per element and a
    # half: on rows of 8960, 19 passes for 37 waiting elements. Past EXACT_LIMIT passes, the rest of the row is
    # ranked whole (:func:`_row_ranks`, which overwrites ``keys``)
    resolved[:waiting] = False
    passes, ranked = 0, False
    for w in range(waiting):
        if resolved[w]:
            continue
        if not ranked and passes + 2 > EXACT_LIMIT:
            _row_ranks(keys, n, idx, spare_keys, spare_idx, radix, ranks)
            ranked = True
        if ranked:
            i = U64(pending[w])
            out[i] = F32(1.0) if draws[i] >= cut[U64(ranks[i])] else F32(0.0)
            continue
        k = keys[U64(pending[w])]
        seen, j0 = U32(0), U64(0)
        for v in range(w, waiting):
            i = U64(pending[v])
            if not resolved[v] and keys[i] == k:
                for j in range(j0, i):
                    seen += U32(keys[j] == k)
                equal_before[v], j0 = seen, i
        for j in range(j0, U64(n)):
            seen += U32(keys[j] == k)
        c = U64(ids[U64(pending[w])])
        if seen == at[c + U64(1)] - at[c]:  # every key of the bucket equals k
            below_k, passes = at[c], passes + 1
        else:
            below_k, passes = U32(0), passes + 2
            for j in range(n):
                below_k += U32(keys[j] < k)
        for v in range(w, waiting):
            i = U64(pending[v])
            if not resolved[v] and keys[i] == k:
                resolved[v] = True
                out[i] = F32(1.0) if draws[i] >= cut[U64(below_k) + U64(equal_before[v])] else F32(0.0)


@njit(inline="always")
def _abs_keys(x, b, n, keys):  # type: ignore[no-untyped-def]
    """``keys[:n]`` = the bits of ``|x − b|`` (uint32; ``x`` and ``b`` any input type, :func:`load`)."""
    for i in range(n):
        keys[i] = U32(_abs_bits(load(x, i) - load(b, i)))


@njit(inline="always")
def _pack_bits(f, n, bit0, bits):  # type: ignore[no-untyped-def]
    """OR the factors ``f[:n]`` (float32, each exactly 0.0 or 1.0) into ``bits`` (uint8, zeroed before) from bit
    ``bit0`` on, bit ``j`` of byte ``j >> 3`` at ``j & 7`` (little-endian bit order), whole bytes inside the run.

    A whole byte is one expression of its eight factors' bit 29 (set in 1.0's pattern 0x3F800000, clear in 0.0's),
    which LLVM vectorises over the bytes: 0.12 ns per factor against 0.6 for a loop over the eight bits."""
    j = 0
    while j < n and (bit0 + j) & 7:
        if f[j] != F32(0.0):
            bits[(bit0 + j) >> 3] |= np.uint8(1 << ((bit0 + j) & 7))
        j += 1
    whole = (n - j) >> 3
    w, o, s = f[j : j + 8 * whole].view(np.uint32), bits[(bit0 + j) >> 3 :], U32(29)
    for q in range(whole):
        o[q] = np.uint8((w[8 * q] >> s) | ((w[8 * q + 1] >> s) << U32(1)) | ((w[8 * q + 2] >> s) << U32(2))
                        | ((w[8 * q + 3] >> s) << U32(3)) | ((w[8 * q + 4] >> s) << U32(4))
                        | ((w[8 * q + 5] >> s) << U32(5)) | ((w[8 * q + 6] >> s) << U32(6))
                        | ((w[8 * q + 7] >> s) << U32(7)))
    j += 8 * whole
    while j < n:
        if f[j] != F32(0.0):
            bits[(bit0 + j) >> 3] |= np.uint8(1 << ((bit0 + j) & 7))
        j += 1


#: the eight bits of each byte value as float32 0/1, low bit first (a constant of the compiled code)
_BYTE_BITS = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.float32)


@njit(inline="always")
def _unpack_bits(bits, first, m, dst):  # type: ignore[no-untyped-def]
    """``dst[:m]`` = bits ``first ..`` of ``bits`` (:func:`_pack_bits`' order) as float32 0 or 1, a whole byte at
    a time inside the run (eight floats copied from :data:`_BYTE_BITS`)."""
    j = 0
    while j < m and (first + j) & 7:
        dst[j] = F32((bits[(first + j) >> 3] >> ((first + j) & 7)) & 1)
        j += 1
    while j + 8 <= m:
        row = _BYTE_BITS[bits[(first + j) >> 3]]
        for t in range(8):
            dst[j + t] = row[t]
        j += 8
    while j < m:
        dst[j] = F32((bits[(first + j) >> 3] >> ((first + j) & 7)) & 1)
        j += 1


@njit(**JIT)
def magprune_factors(base, model, n, density, spread, low, key, start, inverse, out):  # type: ignore[no-untyped-def]
    """DELLA's keep factors of a block (methods/_delta.py ``MagPrune.keep``): in each row of ``n`` elements, the
    element of ascending ``|M − B|`` rank ``r`` (0-based, ties by index) gets the keep probability ``p_of[r]``
    (:func:`_keep_table`: ``spread`` = float32(2ε), ``low`` = float32(density − ε)), and is kept iff its draw
    ``u`` (``_rng.uniform``: the top 53 bits of :func:`_mixed` of ``key`` and its flat index ``start + i``, over
    2⁵³, in float64) is ``>= 1 − p`` in float64. The factor is 1 or 0 (float32), divided by ``p`` with
    ``inverse``. Each row ranks only the elements whose decision needs it (:func:`_row_keep`); every decision is
    the one its exact rank gives.

    base, model: (rows·n,) row-major; density, spread, low: float32; key: uint64; start: int; out: (rows·n,)
    float32.
    """
    rows = base.shape[0] // n if n else 0
    keys = np.empty(n, dtype=np.uint32)
    scratch = _keep_scratch(n)
    p_of, cut = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.uint64)
    bounds = _keep_table(n, density, spread, low, p_of, cut)
    for r in range(rows):
        s = r * n
        _abs_keys(model[s : s + n], base[s : s + n], n, keys)
        _row_keep(keys, n, key, start + s, p_of, cut, bounds and not inverse, inverse, scratch, out[s : s + n])


@njit(**JIT)
def magprune_bits(base, model, n, density, spread, low, key, start, bits):  # type: ignore[no-untyped-def]
    """DELLA's keep decisions of a block as :func:`l1_sums` makes them (MAGPRUNE: the same ranking and draws as
    :func:`magprune_factors` without ``inverse``), written into ``bits`` (the tensor's, zeroed before; ORed from bit
    ``start``, :func:`_pack_bits`) without the sums: the L1 pass then reads them (BITS). Blocks whose bits start on
    whole bytes write disjoint bytes, so several threads may decide blocks of one tensor at once.

    base, model: (rows·n,) row-major; density, spread, low: float32; key: uint64; start: int (the block's first
    element in the tensor); bits: uint8."""
    rows = base.shape[0] // n if n else 0
    keys = np.empty(n, dtype=np.uint32)
    kept = np.empty(n, dtype=np.float32)
    scratch = _keep_scratch(n)
    p_of, cut = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.uint64)
    falling = _keep_table(n, density, spread, low, p_of, cut)
    for r in range(rows):
        s = r * n
        _abs_keys(model[s : s + n], base[s : s + n], n, keys)
        _row_keep(keys, n, key, start + s, p_of, cut, falling, False, scratch, kept)
        _pack_bits(kept, n, start + s, bits)


# ---- TIES, Breadcrumbs, DARE, DELLA: keep, rescale, weigh, elect ----------------------------------------------------
SUM, CONSENSUS = 0, 1
#: a TopK's tau that keeps every element (every |Δ| bit pattern is above it) and one that keeps none
KEEP_ALL, KEEP_NONE = -1, 1 << 31


@njit(inline="always")
def _select_step(x, m, b, sel, k, keep_value, scale, wk, dst, ties):  # type: ignore[no-untyped-def]
    """``dst[:m]`` = model ``k``'s elements ``x[:m]`` (minus the base's, ``b``) kept by its selection, times
    ``scale``, times ``wk``.

    A selection keeps the top ``hi`` and not the top ``lo`` (``_Selection.keep``): ``|Δ| > tau`` (int32 bits)
    for each TopK, and, while ``ties[k, t] < budget`` (the TopK's ties not yet kept: ``TopK.factor`` keeps the
    first ones in flat order), an element equal to tau too. ``ties[k, 2 + t]`` counts the elements equal to tau
    met. A plain comparison first (vectorised); then, only in a step that meets ties while some are still to
    keep, the elements equal to a tau are decided again in flat order."""
    hi_tau, hi_budget, lo_tau, lo_budget = sel[k, 0], sel[k, 1], sel[k, 2], sel[k, 3]
    # the first loop in uint32, which LLVM vectorises 8 wide: |d|'s bits are in [0, 2^31), so ``> tau`` is
    # ``>= tau + 1`` and ``== tau`` never holds for KEEP_ALL (all ones) or KEEP_NONE (2^31)
    hi_above, lo_above = U32(hi_tau + 1), U32(lo_tau + 1)
    hi_at, lo_at = U32(hi_tau & 0xFFFFFFFF), U32(lo_tau & 0xFFFFFFFF)
    hi_met, lo_met = 0, 0
    for i in range(m):
        d = load(x, i) - b[i]
        ab = _bits_of_f32(d) & U32(0x7FFFFFFF)
        d = d * (keep_value if (ab >= hi_above) & (ab < lo_above) else F32(0.0))
        dst[i] = (d * scale) * wk
        hi_met += np.int32(ab == hi_at)
        lo_met += np.int32(ab == lo_at)
    hi_taken, lo_taken = ties[k, 0], ties[k, 1]
    if (hi_met and hi_taken < hi_budget) or (lo_met and lo_taken < lo_budget):
        for i in range(m):
            d = load(x, i) - b[i]
            ab = _abs_bits(d)
            if ab == hi_tau or ab == lo_tau:
                hi = ab > hi_tau
                if ab == hi_tau and hi_taken < hi_budget:
                    hi_taken += 1
                    hi = True
                lo = ab > lo_tau
                if ab == lo_tau and lo_taken < lo_budget:
                    lo_taken += 1
                    lo = True
                d = d * (keep_value if hi and not lo else F32(0.0))
                dst[i] = (d * scale) * wk
        ties[k, 0], ties[k, 1] = hi_taken, lo_taken
    ties[k, 2] += hi_met
    ties[k, 3] += lo_met


@njit(**JIT)
def tie_counts(base, models, sel, counts):  # type: ignore[no-untyped-def]
    """How many elements of a block equal each selection's tau (``counts[k]`` = hi, lo), as :func:`_select_step`
    counts them (``ties[k, 2:]``) without deciding anything: what lets a block's tie cursor be known before the
    blocks before it are merged (``_DeltaTensorMerge.ahead_raw``). base: (n,); models: tuple of N (n,) arrays;
    sel: (N, 4) int64 as :func:`sparse_merge`'s (a model without a selection: :data:`KEEP_ALL`/:data:`KEEP_NONE`,
    which no element equals); counts: (N, 2) int64, set."""
    n, n_models = base.shape[0], len(models)
    counts[:, :] = 0
    b = np.empty(STEP, dtype=np.float32)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _widen(base[s : s + m], m, b)
        for k in range(n_models):
            x = models[k][s : s + m]
            hi_at, lo_at = U32(sel[k, 0] & 0xFFFFFFFF), U32(sel[k, 2] & 0xFFFFFFFF)
            hi_met, lo_met = 0, 0
            for i in range(m):
                ab = _bits_of_f32(load(x, i) - b[i]) & U32(0x7FFFFFFF)
                hi_met += np.int32(ab == hi_at)
                lo_met += np.int32(ab == lo_at)
            counts[k, 0] += hi_met
            counts[k, 1] += lo_met


@njit(**JIT)
def sparse_merge(base, models, keep_mode, sel, factors, bits, keys, cuts, start, keep_value, scale, w, combine,
                 normalize, minw, div, lam, out, ties):  # type: ignore[no-untyped-def]
    """The merge pass of the delta methods with a sparsifier (methods/_delta.py ``_DeltaTensorMerge.emit``).

    Per element and model k (in model order): ``d = M_k − B``; then by ``keep_mode[k]``: SELECT, ``d·keep`` with
    keep ``keep_value[k]`` (1, or 1/density for inverse_density) if ``|d|`` is in the selection ``sel[k]`` else 0
    (:func:`_select_step`), then ``·scale[k]``; FACTOR, ``d·factors[k][i]`` (a precomputed keep factor: DELLA)
    then ``·scale[k]``; BITS, the same with the factor 0 or 1 read from bit ``start + i`` of ``bits[k]`` (DELLA's
    decisions as ``l1_sums`` wrote them); RANDOM (DARE), ``d·keep`` with keep ``keep_value[k]`` where the element's draw
    (:func:`_mixed` of ``keys[k]`` and its flat index ``start + i`` in the tensor) is ``>= cuts[k]``, else 0, then
    ``·scale[k]``; NO_FACTOR, ``d`` as it is. Then ``·w[k]``. Combined (``plain_sum`` /
    ``sign_consensus``) by ``combine``:

    - SUM: ``Σ d_k``, divided by ``div`` (1 for none, an exact identity);
    - CONSENSUS (TIES): elected sign ``copysign(1, Σ d_k)``; agreement ``a_k = 1 if d_k·elected > 0 else 0``
      (``sign().clamp(min=0)``: a NaN agrees with nothing, so NaN·0 keeps it NaN); ``mixed = Σ d_k·a_k``; with
      ``normalize`` 1: ``mixed / max(Σ a_k·w_k, minw)`` (``minw`` is min(weights)/2 > 0), 2: the divisor 1 where
      ``Σ a_k·w_k == 0``.

    Then ``·lam`` and ``+ B``. Sums left to right from -0.0 (the identity), as the eager in-place adds.

    base, out: (n,); models: tuple of N (n,) arrays; keep_mode: (N,) int64; sel: (N, 4) int64, per model
    ``hi_tau, hi_budget, lo_tau, lo_budget`` (tau as int32 bits, :data:`KEEP_ALL` or :data:`KEEP_NONE`; budget
    the ties still to keep); factors: tuple of N float32 arrays ((n,) for FACTOR, else any); bits: tuple of N uint8
    arrays (BITS: the tensor's, :func:`_pack_bits`' order; else any); keys, cuts: (N,)
    uint64 (RANDOM; a model that drops everything: cut 0 and keep_value 0); start: int; keep_value, scale, w:
    (N,) float32; combine, normalize: int64; minw, div, lam: float32; ties: (N, 4) int64, set to the ties kept
    (hi, lo) and the elements equal to each tau met (hi, lo) in this block (the TopKs' tie cursors).
    """
    bad = 0
    n, n_models = base.shape[0], len(models)
    ties[:, :] = 0
    b = np.empty(STEP, dtype=np.float32)
    d = np.empty((n_models, STEP), dtype=np.float32)
    total = np.empty(STEP, dtype=np.float32)
    mixed = np.empty(STEP, dtype=np.float32)
    divisor = np.empty(STEP, dtype=np.float32)
    kept = np.empty(STEP, dtype=np.float32)  # BITS: a step's factors
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        _widen(base[s : s + m], m, b)
        for k in range(n_models):
            x, dk, wk, mode = models[k][s : s + m], d[k], w[k], keep_mode[k]
            if mode == SELECT:
                _select_step(x, m, b, sel, k, keep_value[k], scale[k], wk, dk, ties)
            elif mode == FACTOR:
                f, sk = factors[k][s : s + m], scale[k]
                for i in range(m):
                    dk[i] = (((load(x, i) - b[i]) * f[i]) * sk) * wk
            elif mode == BITS:
                sk = scale[k]
                _unpack_bits(bits[k], start + s, m, kept)
                for i in range(m):
                    dk[i] = (((load(x, i) - b[i]) * kept[i]) * sk) * wk
            elif mode == RANDOM:
                key, cut, kv, sk = keys[k], cuts[k], keep_value[k], scale[k]
                z = _start(key, start + s)
                for i in range(m):
                    f = kv if _finish(z) >= cut else F32(0.0)
                    z += PHI
                    dk[i] = (((load(x, i) - b[i]) * f) * sk) * wk
            else:
                for i in range(m):
                    dk[i] = (load(x, i) - b[i]) * wk
        mixed[:m] = F32(-0.0)
        if combine == CONSENSUS:
            total[:m] = F32(-0.0)
            for k in range(n_models):
                dk = d[k]
                for i in range(m):
                    total[i] = total[i] + dk[i]
            for i in range(m):  # the elected sign: copysign(1, total), as a bit copy
                total[i] = _f32_from_bits((_bits_of_f32(total[i]) & U32(0x80000000)) | U32(0x3F800000))
            divisor[:m] = F32(-0.0)
            for k in range(n_models):
                dk, wk = d[k], w[k]
                for i in range(m):
                    agree = F32(1.0) if dk[i] * total[i] > F32(0.0) else F32(0.0)
                    mixed[i] = mixed[i] + dk[i] * agree
                    divisor[i] = divisor[i] + agree * wk
            if normalize == 1:
                for i in range(m):
                    mixed[i] = mixed[i] / (divisor[i] if divisor[i] >= minw else minw)
            elif normalize == 2:
                for i in range(m):
                    mixed[i] = mixed[i] / (F32(1.0) if divisor[i] == F32(0.0) else divisor[i])
        else:
            for k in range(n_models):
                dk = d[k]
                for i in range(m):
                    mixed[i] = mixed[i] + dk[i]
            for i in range(m):
                mixed[i] = mixed[i] / div
        o = out[s : s + m]
        for i in range(m):
            bad += store(o, i, mixed[i] * lam + b[i])
    return bad


@njit(**JIT)
def l1_sums(base, models, keep_mode, sel, factors, keys, cuts, keep_value, prune, bits, cols, row0, tile, rows_total,
            slot0, acc, partial, ties):  # type: ignore[no-untyped-def]
    """The L1 rescale's statistics pass (methods/_delta.py ``_DeltaTensorMerge.accumulate`` after the selections):
    per model k and column, ``Σ|Δ_k|`` and ``Σ keep_k·|Δ_k|`` in float64, ``keep_k`` the 0/1 keep factor of
    :func:`sparse_merge`'s modes (``keep_value`` 1, or 0 for a model that drops everything).

    The order is ``_tiles.ColumnSums``' (``add_column_sums``), as :func:`widen_column_sums`: per column, a tile's
    sum is ``((0 + v_0) + v_1) + ...`` in row order, and tile sums are added to ``acc`` in row order; ``partial``
    holds the tile in progress. A selection's kept ``|Δ|`` is ``|Δ·keep|`` (:func:`_select_step` with factors 1,
    the same value: ``keep`` is 0 or 1), which also moves the ties as the eager ``TopK.factor`` does.

    base, models: (rows·cols,) row-major, rows ``row0 ..`` of a tensor of ``rows_total`` rows; partial:
    (2N·cols,) float64, ``[|Δ_1|, kept_1, |Δ_2|, kept_2, ...]`` (``ColumnSums``' stacking) flattened; slot0, acc:
    where finished tiles go (:func:`_close_tile`; acc (slots, 2N·cols) float64); other
    arguments as :func:`sparse_merge`'s (``factors[k]`` the block's keep factors, flat).

    MAGPRUNE (DELLA): each row's decisions are made here, as :func:`magprune_factors` makes them (``prune[k]`` its
    density, spread and low, ``keys[k]`` its stream key, the row one of ``cols`` elements), and written into
    ``bits[k]`` (the tensor's, zeroed before the pass; :func:`_pack_bits` from bit ``(row0 + r)·cols``) for the
    merge pass (BITS). BITS here: the decisions were made ahead (:func:`magprune_bits`) and are read back.
    """
    n_models = len(models)
    rows = base.shape[0] // cols if cols else 0
    ties[:, :] = 0
    b = np.empty(cols, dtype=np.float32)
    kept = np.empty(cols, dtype=np.float32)
    one = F32(1.0)
    p_of = np.empty((n_models, cols), dtype=np.float32)  # MAGPRUNE's tables (:func:`_keep_table`) and scratch
    p_cut = np.empty((n_models, cols), dtype=np.uint64)
    falling = np.zeros(n_models, dtype=np.bool_)
    pruning = False
    for k in range(n_models):
        if keep_mode[k] == MAGPRUNE:
            pruning = True
            falling[k] = _keep_table(cols, prune[k, 0], prune[k, 1], prune[k, 2], p_of[k], p_cut[k])
    row_keys = np.empty(cols if pruning else 0, dtype=np.uint32)
    scratch = _keep_scratch(cols if pruning else 1)
    for r in range(rows):
        s = r * cols
        _widen(base[s : s + cols], cols, b)
        for k in range(n_models):
            x, mode = models[k][s : s + cols], keep_mode[k]
            every = partial[2 * k * cols : (2 * k + 1) * cols]
            some = partial[(2 * k + 1) * cols : (2 * k + 2) * cols]
            if mode == SELECT:
                _select_step(x, cols, b, sel, k, one, one, one, kept, ties)
                for j in range(cols):
                    every[j] = every[j] + np.float64(abs(load(x, j) - b[j]))
                    some[j] = some[j] + np.float64(abs(kept[j]))
            elif mode == FACTOR or mode == MAGPRUNE or mode == BITS:
                f = factors[k][s : s + cols] if mode == FACTOR else kept
                if mode == MAGPRUNE:
                    first = (row0 + r) * cols
                    _abs_keys(x, b, cols, row_keys)
                    _row_keep(row_keys, cols, keys[k], first, p_of[k], p_cut[k], falling[k], False, scratch, kept)
                    _pack_bits(kept, cols, first, bits[k])
                elif mode == BITS:
                    _unpack_bits(bits[k], (row0 + r) * cols, cols, kept)
                for j in range(cols):
                    a = abs(load(x, j) - b[j])
                    every[j] = every[j] + np.float64(a)
                    some[j] = some[j] + np.float64(f[j] * a)
            elif mode == RANDOM:
                key, cut, kv = keys[k], cuts[k], keep_value[k]
                z = _start(key, (row0 + r) * cols)
                for j in range(cols):
                    a = abs(load(x, j) - b[j])
                    every[j] = every[j] + np.float64(a)
                    some[j] = some[j] + np.float64((kv if _finish(z) >= cut else F32(0.0)) * a)
                    z += PHI
            else:
                for j in range(cols):
                    a = np.float64(abs(load(x, j) - b[j]))
                    every[j] = every[j] + a
                    some[j] = some[j] + a
        _close_tile(row0 + r, tile, rows_total, slot0, acc, partial)


@njit(inline="always")
def _collect(keys, m, lo, length, buf, filled, flag):  # type: ignore[no-untyped-def]
    """Append to ``buf`` from ``filled`` the keys of ``keys[:m]`` whose high 16 bits lie in ``[lo, lo + length)``
    (uint32) and whose low 16 bits are not all zero, in index order; returns the new fill (uint64). ``buf`` has room
    for ``m`` more (checked by the caller); ``flag``: STEP bytes of scratch.

    The test is a vectorised loop writing a byte per key; the append visits only the 8-byte words of flags with one
    set (few: about 0.2 ns per key in all, where a branch-free append at every key cost 0.8)."""
    hits = U32(0)
    for i in range(m):
        k = keys[i]
        c = U32(((k >> U32(16)) - lo) < length) & U32((k & U32(0xFFFF)) != U32(0))
        flag[i] = np.uint8(c)
        hits += c
    if hits == U32(0):
        return filled
    for i in range(m, min(STEP, (m + 7) & ~7)):  # the last word's bytes past m, left from a longer step
        flag[i] = 0
    words = flag.view(np.uint64)
    for j in range((m + 7) >> 3):
        if words[j]:
            for t in range(8):
                i = U64(8 * j + t)
                buf[filled] = keys[i]
                filled += U64(flag[i])
    return filled


@njit(**JIT)
def histogram_high(base, model, h, count, lo1, len1, buf1, lo2, len2, buf2, filled):  # type: ignore[no-untyped-def]
    """Radix select's pass A (methods/_select.py ``TopK.pass_a``) on one model's ``|M − B|``: with ``count``, ``h[bits
    >> 16] += 1`` for every element; ``bits`` the uint32 pattern of ``|M − B|`` in float32 (a selection's second
    TopK takes these counts: ``_Selection.counting``). And pass B's candidates (``TopK.collect_args``): for each
    window ``t`` of ``len_t`` high-bit bins from ``lo_t`` (length 0: none), the bits whose high half lies in it and
    whose low half is not zero are appended to ``buf_t`` at ``filled[t]``, in index order. Before each step of
    STEP elements a window whose fill is past ``len(buf_t) − STEP`` (no room for a whole step) stops, with
    ``filled[t]`` −1 (a −1 on entry: no window).

    base, model: (n,); h: (65536,) int64, accumulated into; lo_t, len_t: int; buf_t: uint32; filled: (2,) int64.
    Per step, the keys first (a vectorised loop), then the counting and the windows. Indices are unsigned: numba
    tests a signed one for wrap-around (a quarter of the counting's time)."""
    n = base.shape[0]
    keys = np.empty(STEP, dtype=np.uint32)
    flag = np.zeros(STEP, dtype=np.uint8)
    lo, length, bufs = (U32(lo1), U32(lo2)), (U32(len1), U32(len2)), (buf1, buf2)
    room = (buf1.shape[0] - STEP, buf2.shape[0] - STEP)
    fill = [U64(max(filled[0], 0)), U64(max(filled[1], 0))]
    live = [len1 > 0 and filled[0] >= 0 and room[0] >= 0, len2 > 0 and filled[1] >= 0 and room[1] >= 0]
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        b, x = base[s : s + m], model[s : s + m]
        for i in range(m):
            keys[i] = U32(_abs_bits(load(x, i) - load(b, i)))
        if count:
            for i in range(m):
                h[U64(keys[i] >> U32(16))] += 1
        for t in range(2):
            if not live[t]:
                continue
            if fill[t] > U64(room[t]):
                live[t], filled[t] = False, -1
            else:
                fill[t] = _collect(keys, m, lo[t], length[t], bufs[t], fill[t], flag)
    for t in range(2):
        if live[t]:
            filled[t] = np.int64(fill[t])


@njit(**JIT)
def histogram_low(base, model, bin1, h1, bin2, h2, two):  # type: ignore[no-untyped-def]
    """Radix select's pass B (``TopK.pass_b``): ``h[bits & 0xFFFF] += 1`` for the elements whose high bits are the
    TopK's target bin (``bin1`` into ``h1``; with ``two``, ``bin2`` into ``h2``). base, model: (n,); h1, h2:
    (65536,) int64. Per step, the keys and whether any falls in a bin first (vectorised); the counting only in a
    step with one. Indices are unsigned: numba tests a signed one for wrap-around."""
    n = base.shape[0]
    keys = np.empty(STEP, dtype=np.uint32)
    b1, b2 = U32(bin1), U32(bin2)
    first1, first2 = b1 << U32(16), b2 << U32(16)
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        b, x = base[s : s + m], model[s : s + m]
        hits = 0
        for i in range(m):
            k = U32(_abs_bits(load(x, i) - load(b, i)))
            keys[i] = k
            hits += 1 if (k >> U32(16)) == b1 or (two and (k >> U32(16)) == b2) else 0
        if hits:
            for i in range(m):
                k1 = keys[i] - first1
                if k1 < U32(65536):
                    h1[U64(k1)] += 1
                if two:
                    k2 = keys[i] - first2
                    if k2 < U32(65536):
                        h2[U64(k2)] += 1


# ---- WIDEN's statistics pass ---------------------------------------------------------------------------------------
@njit(inline="always")
def _product(x, y, exact):  # type: ignore[no-untyped-def]
    """``x·y`` of two float32 values as methods/widen.py ``_products`` makes it, as float64: a float32 product
    when the inputs are 16-bit (exact), else the product of the float64 values."""
    if exact:
        return np.float64(x * y)
    return np.float64(x) * np.float64(y)


@njit(**JIT)
def widen_column_sums(base, models, cols, row0, tile, rows_total, exact, slot0, acc,  # type: ignore[no-untyped-def]
                      partial):
    """WIDEN's column statistics of a block of rows (methods/widen.py ``_MatrixMerge.accumulate``, Linear rule):
    the products ``[b², m_1², ..., m_N², m_1·b, ..., m_N·b]`` of every element, summed per column in float64.

    The order is ``_tiles.add_column_sums``': rows are grouped into aligned tiles of ``tile`` rows (the tensor's
    last tile may be shorter); a tile's sum per column is ``((0 + v_0) + v_1) + ...`` in row order (numpy's
    outer-axis reduction), and tile sums are added to the accumulator in row order. ``partial`` holds the sums of
    the tile in progress, so a tile may span blocks (the eager code stashes its rows instead), with the same bits.

    base, models: (rows·cols,) row-major, rows ``row0 ..`` of a tensor of ``rows_total`` rows; partial:
    ((1 + 2N)·cols,) float64 (product kind major, as ``_products``' (rows, 1 + 2N, cols) layout flattened); slot0,
    acc: where finished tiles go (:func:`_close_tile`; acc (slots, (1 + 2N)·cols) float64).
    """
    n_models = len(models)
    rows = base.shape[0] // cols if cols else 0
    b = np.empty(cols, dtype=np.float32)
    for r in range(rows):
        s = r * cols
        _widen(base[s : s + cols], cols, b)
        p = partial[0:cols]
        for j in range(cols):
            p[j] = p[j] + _product(b[j], b[j], exact)
        for k in range(n_models):
            x = models[k][s : s + cols]
            sq = partial[(1 + k) * cols : (2 + k) * cols]
            dot = partial[(1 + n_models + k) * cols : (2 + n_models + k) * cols]
            for j in range(cols):
                m = load(x, j)
                sq[j] = sq[j] + _product(m, m, exact)
                dot[j] = dot[j] + _product(m, b[j], exact)
        _close_tile(row0 + r, tile, rows_total, slot0, acc, partial)


#: numpy's ufunc buffer, in elements (``np.getbufsize()``'s default): a reduction that casts its input (float32
#: products summed in float64) is handed to the sum this many elements at a time
NUMPY_BUFSIZE = 8192
#: numpy's pairwise sum adds runs of at most this many elements with 8 partial sums (``PW_BLOCKSIZE``)
_PW_BLOCK = 128


@njit(inline="always")
def _pairwise_leaf(v, a, n):  # type: ignore[no-untyped-def]
    """numpy's ``pairwise_sum`` of ``v[a : a + n]`` for ``n <= 128``: under 8 elements one running sum from 0;
    else 8 partial sums over strides of 8, added as ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``, then
    the last ``n % 8`` elements one by one. (Indexed from 0 in a slice: no wrap-around tests, 2× quicker.)"""
    w = v[a : a + n]
    if n < 8:
        res = 0.0
        for i in range(n):
            res += w[i]
        return res
    r0, r1, r2, r3 = w[0], w[1], w[2], w[3]
    r4, r5, r6, r7 = w[4], w[5], w[6], w[7]
    end = n - n % 8
    for q in range(1, end // 8):
        i = q * 8
        r0 += w[i]
        r1 += w[i + 1]
        r2 += w[i + 2]
        r3 += w[i + 3]
        r4 += w[i + 4]
        r5 += w[i + 5]
        r6 += w[i + 6]
        r7 += w[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, n):
        res += w[i]
    return res


@njit(inline="always")
def _sum_plan(n, buffer, starts, counts, ops):  # type: ignore[no-untyped-def]
    """The order in which ``np.add.reduce`` adds ``n`` values, as a program for :func:`_planned_sum`; returns its
    length. Runs of ``buffer`` elements (numpy casts a buffer at a time; ``buffer`` = n without a cast) are each
    summed pairwise and added in order to a float64 0. numpy's ``pairwise_sum`` of a run: above 128 elements the
    sum of the first ``n2`` and of the rest, ``n2 = n // 2`` rounded down to a multiple of 8 (recursively); runs of
    at most 128 by :func:`_pairwise_leaf`. ``ops`` in postfix: ``ops[i] >= 0``: push the sum of the leaf
    ``starts[ops[i]]``, ``counts[ops[i]]``; ``-1``: add the two sums on top (the left one first); ``-2``: add the
    top to the running total. ``starts``, ``counts``: room for every leaf; ``ops``: 3 entries a leaf."""
    leaves = 0
    size = 0
    todo_s = np.empty(192, dtype=np.int64)  # ranges still to visit, 64 levels deep at most
    todo_c = np.empty(192, dtype=np.int64)
    for s0 in range(0, n, buffer):
        todo_s[0], todo_c[0] = s0, min(buffer, n - s0)
        top = 1
        while top:
            top -= 1
            s, c = todo_s[top], todo_c[top]
            if c < 0:  # both halves are summed
                ops[size] = -1
                size += 1
            elif c <= _PW_BLOCK:
                starts[leaves], counts[leaves] = s, c
                ops[size] = leaves
                leaves += 1
                size += 1
            else:
                n2 = c // 2
                n2 -= n2 % 8
                todo_s[top], todo_c[top] = s, -1  # then add them
                todo_s[top + 1], todo_c[top + 1] = s + n2, c - n2  # then the right half
                todo_s[top + 2], todo_c[top + 2] = s, n2  # the left half first
                top += 3
        ops[size] = -2
        size += 1
    return size


@njit(inline="always")
def _planned_sum(v, starts, counts, ops, size, sums):  # type: ignore[no-untyped-def]
    """``np.add.reduce`` of ``v`` by the program :func:`_sum_plan` made for its length."""
    total = 0.0
    depth = 0
    for i in range(size):
        op = ops[i]
        if op >= 0:
            sums[depth] = _pairwise_leaf(v, starts[op], counts[op])
            depth += 1
        elif op == -1:
            depth -= 1
            sums[depth - 1] = sums[depth - 1] + sums[depth]
        else:
            total += sums[0]
            depth = 0
    return total


@njit(**JIT)
def widen_row_sums(base, models, cols, r0, exact, acc):  # type: ignore[no-untyped-def]
    """WIDEN's per-token statistics of a block of an embedding's rows (methods/widen.py ``_MatrixMerge.accumulate``,
    columns are rows): ``acc[:, r0 + r] = [Σ b², Σ m_1², ..., Σ m_N², Σ m_1·b, ..., Σ m_N·b]`` over row ``r``.

    The same bits as the eager ``row_sums(_products(...))``, without the (rows, 1 + 2N, cols) products: each kind
    of product of a row goes into one float64 scratch row and is summed in ``np.add.reduce``'s order (numpy 1.x and
    2.x, default buffer size): pairwise (:func:`_sum_plan`), by runs of :data:`NUMPY_BUFSIZE` when the products are
    float32 (``exact``: 16-bit inputs), which numpy casts to float64 a buffer at a time.

    base, models: (rows·cols,) row-major; acc: (1 + 2N, rows of the tensor) float64.
    """
    n_models = len(models)
    rows = base.shape[0] // cols if cols else 0
    b = np.empty(cols, dtype=np.float32)
    m = np.empty(cols, dtype=np.float32)
    v = np.empty(cols, dtype=np.float64)
    leaves = cols // 8 + 2
    starts = np.empty(leaves, dtype=np.int64)
    counts = np.empty(leaves, dtype=np.int64)
    ops = np.empty(3 * leaves, dtype=np.int64)
    size = _sum_plan(cols, NUMPY_BUFSIZE if exact else max(cols, 1), starts, counts, ops)
    sums = np.empty(65, dtype=np.float64)
    for r in range(rows):
        s = r * cols
        _widen(base[s : s + cols], cols, b)
        for j in range(cols):
            v[j] = _product(b[j], b[j], exact)
        acc[0, r0 + r] = _planned_sum(v, starts, counts, ops, size, sums)
        for k in range(n_models):
            _widen(models[k][s : s + cols], cols, m)
            for j in range(cols):
                v[j] = _product(m[j], m[j], exact)
            acc[1 + k, r0 + r] = _planned_sum(v, starts, counts, ops, size, sums)
            for j in range(cols):
                v[j] = _product(m[j], b[j], exact)
            acc[1 + n_models + k, r0 + r] = _planned_sum(v, starts, counts, ops, size, sums)


# arcee_fusion's kernels live in their own module, which imports the helpers above (so this comes last)
from ._numba_fusion import fusion_emit, fusion_high, fusion_low  # noqa: E402,F401
