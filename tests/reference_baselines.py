"""Dense reference implementations of the baseline merge methods, with mergekit's semantics.

Written from the specification (not from ``streammerge.methods``): whole tensors in memory, float32 math,
float64 for SLERP's and Model Stock's whole-tensor statistics. The DARE masks use the same counter-based generator
as the engine, re-implemented here with numpy's wrapping uint64 arithmetic (cross-checked in the tests against
``streammerge.methods._rng.uniform_reference``).

Entry point: :func:`reference_merge` (``method`` name, base tensors, list of model tensors, params as the engine
takes them: per-model values as a list/tuple, a comma string, or one value for all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------------------------
# Counter-based uniforms: u(seed, k, name, i) = top53(mix64(key + (i + 1)·φ)) / 2^53, key = mix64(FNV-1a(...))
# --------------------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_PHI = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _mix64(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def dare_key(seed: int, model: int, name: str) -> int:
    """SplitMix64 finaliser of the 64-bit FNV-1a hash of ``"seed/model/name"``."""
    h = 0xCBF29CE484222325
    for byte in f"{seed}/{model}/{name}".encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return _mix64(h)


def dare_uniforms(key: int, count: int) -> np.ndarray:
    """float64 uniforms in [0, 1) for flat indices 0 .. count-1 (uint64 arithmetic wraps modulo 2^64)."""
    with np.errstate(over="ignore"):
        z = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_PHI) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# --------------------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------------------

DELTA_METHODS: dict[str, dict[str, Any]] = {
    # sparsify, consensus, defaults of normalize / rescale
    "task_arithmetic": dict(sparsify="none", consensus=False, normalize=False, rescale=False),
    "ties": dict(sparsify="magnitude", consensus=True, normalize=True, rescale=False),
    "dare_linear": dict(sparsify="random", consensus=False, normalize=False, rescale=True),
    "dare_ties": dict(sparsify="random", consensus=True, normalize=False, rescale=True),
    "breadcrumbs": dict(sparsify="outliers", consensus=False, normalize=False, rescale=False),
    "breadcrumbs_ties": dict(sparsify="outliers", consensus=True, normalize=False, rescale=False),
    "della": dict(sparsify="della", consensus=True, normalize=True, rescale=True),
    "della_linear": dict(sparsify="della", consensus=False, normalize=False, rescale=True),
}
METHODS = ("linear", *DELTA_METHODS, "slerp", "model_stock", "sce")


def per_model(value: Any, n: int) -> list[float]:
    if isinstance(value, str):
        items = [float(v) for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [float(v) for v in value]
    else:
        items = [float(value)]
    if len(items) == 1:
        items = items * n
    assert len(items) == n, (value, n)
    return items


def as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


# --------------------------------------------------------------------------------------------------------------
# Per-tensor math
# --------------------------------------------------------------------------------------------------------------


def descending_order(absd: torch.Tensor) -> np.ndarray:
    """Flat indices by |Δ| descending, ties by flat index ascending."""
    a = absd.reshape(-1).numpy().astype(np.float64)
    idx = np.arange(a.size)
    return np.lexsort((idx, -a))  # last key is primary


def keep_ranks(absd: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Boolean mask (shape of absd) of the elements whose descending rank is in [lo, hi)."""
    mask = np.zeros(absd.numel(), dtype=bool)
    mask[descending_order(absd)[lo:hi]] = True
    return torch.from_numpy(mask).reshape(absd.shape)


def della_probabilities(absd: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities: per row along dim 1 (a vector is one row), from density − ε for the smallest
    |Δ| to density + ε for the largest, linear in the ascending rank (ties by index); a one-element row: density."""
    x = absd.reshape(1, -1) if absd.dim() <= 1 else absd
    n = x.shape[1]
    if n <= 1:
        return torch.full(absd.shape, density, dtype=torch.float32)
    order = np.argsort(x.numpy(), axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n).reshape((1, n) + (1,) * (x.dim() - 2)).repeat(1, 0)
                      * np.ones_like(order), axis=1)
    rank_norm = torch.from_numpy(ranks.astype(np.float32)) / (n - 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(absd.shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's rescaled_masked_tensor (norm l1): the kept deltas times Σ|Δ| / Σ|kept|, unless either < 1e-7."""
    before = float(delta.double().abs().sum())
    after = float(kept.double().abs().sum())
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def sparsify(kind: str, delta: torch.Tensor, density: float, gamma: float, rescale: bool,
             key: int | None, mode: str = "l1", epsilon: float = 0.15) -> torch.Tensor:
    numel = delta.numel()
    if kind == "none" or density >= 1:
        return delta
    p: float | torch.Tensor = density
    if kind == "magnitude":
        k = 0 if density <= 0 or numel == 0 else max(1, int(density * numel))
        mask = keep_ranks(delta.abs(), 0, k)
    elif kind == "outliers":
        target, top = int(density * numel), int(gamma * numel)
        if numel - target - top < 0:
            top = numel - target
        mask = keep_ranks(delta.abs(), top, top + target)
    elif kind == "random":
        assert key is not None
        u = torch.from_numpy(dare_uniforms(key, numel)).reshape(delta.shape)
        mask = u >= 1.0 - density
    elif kind == "della":
        assert key is not None
        if density <= 0:
            return torch.zeros_like(delta)
        p = della_probabilities(delta.abs(), density, epsilon)
        u = torch.from_numpy(dare_uniforms(key, numel)).reshape(delta.shape)
        mask = u >= 1.0 - p.double()
    else:
        raise ValueError(kind)
    kept = delta * mask
    if not rescale:
        return kept
    if mode == "l1":
        return rescale_l1(delta, kept)
    if isinstance(p, torch.Tensor):
        return kept / p
    return kept / density if density > 0 else kept


def delta_tensor(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], *, sparsify_kind: str,
                 consensus: bool, weight: list[float], density: list[float], gamma: list[float], lam: float,
                 normalize: bool, rescale: bool, seed: int, mode: str = "l1",
                 epsilon: list[float] | None = None) -> torch.Tensor:
    b = base.to(torch.float32)
    eps = epsilon or [0.15] * len(models)
    ds = []
    for k, m in enumerate(models):
        delta = m.to(torch.float32) - b
        key = dare_key(seed, k, name) if sparsify_kind in ("random", "della") else None
        ds.append(sparsify(sparsify_kind, delta, density[k], gamma[k], rescale, key, mode, eps[k]) * weight[k])
    if consensus:
        total = ds[0].clone()
        for d in ds[1:]:
            total = total + d
        elected = torch.where(total >= 0, torch.tensor(1.0), torch.tensor(-1.0))
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for w, d in zip(weight, ds):
            agree = torch.sign(d) == elected
            mixed = mixed + d * agree
            divisor = divisor + agree.to(torch.float32) * w
        if normalize:
            mixed = mixed / torch.where(divisor == 0, torch.tensor(1.0), divisor)
    else:
        mixed = ds[0].clone()
        for d in ds[1:]:
            mixed = mixed + d
        if normalize:
            total_w = sum(weight)
            mixed = mixed / (1.0 if abs(total_w) < 1e-8 else total_w)
    return b + mixed * lam


def sce_tensor(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE (mergekit 0.1.5): top-k by variance across the models (population; k = int(topk · #nonzero), ties by
    index), weights = mean masked τ² / their sum (1/K below 1e-6), sign election on the unweighted masked sum."""
    b = base.to(torch.float32)
    tvs = torch.stack([m.to(torch.float32) - b for m in models])
    if select_topk <= 0:
        tvs = torch.zeros_like(tvs)
    elif select_topk < 1:
        var = tvs.double().var(dim=0, unbiased=False).float()  # float64, rounded once
        k = int(int(torch.count_nonzero(var)) * select_topk)
        tvs = tvs * keep_ranks(var, 0, k)
    means = tvs.double().square().reshape(len(models), -1).mean(dim=1) if tvs[0].numel() else \
        torch.zeros(len(models), dtype=torch.float64)
    total = float(means.sum())
    w = torch.full((len(models),), 1.0 / len(models)) if abs(total) < 1e-6 else (means / total).float()
    w = w.reshape((-1,) + (1,) * b.dim())
    elected = torch.where(tvs.sum(dim=0) >= 0, torch.tensor(1.0), torch.tensor(-1.0))
    shares = w * (torch.sign(tvs) == elected)
    return b + (tvs * shares).sum(dim=0) / shares.sum(dim=0).clamp(min=1e-6)


def linear_tensor(models: Sequence[torch.Tensor], weight: list[float], normalize: bool) -> torch.Tensor:
    acc = models[0].to(torch.float32) * weight[0]
    for w, m in zip(weight[1:], models[1:]):
        acc = acc + m.to(torch.float32) * w
    return acc / sum(weight) if normalize else acc


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float, bool]:
    """(s0, s1, took_lerp_branch) from float64 whole-tensor sums."""
    a, b = v0.to(torch.float64), v1.to(torch.float64)
    n0, n1 = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))
    dot = float((a * b).sum())
    cos = dot / ((n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0))
    if abs(cos) > 0.9995:
        return 1.0 - t, t, True
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta), False


def slerp_tensor(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    s0, s1, _ = slerp_coefficients(base, model, t)
    return base.to(torch.float32) * s0 + model.to(torch.float32) * s1


class OpposedDeltas(ValueError):
    """Model Stock's ratio is undefined for this tensor (1 + (N−1)·c = 0)."""


def model_stock_ratio(base: torch.Tensor, models: Sequence[torch.Tensor]) -> float:
    b = base.to(torch.float64).reshape(-1)
    deltas = [m.to(torch.float64).reshape(-1) - b for m in models]
    n = len(deltas)
    gram = [[float(deltas[i] @ deltas[j]) for j in range(n)] for i in range(n)]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = max(math.sqrt(gram[i][i]) * math.sqrt(gram[j][j]), 1e-8)
            cos.append(min(1.0, max(-1.0, gram[i][j] / denom)))
    c = sum(cos) / len(cos)
    if abs(1 + (n - 1) * c) < 1e-12:
        raise OpposedDeltas(c)
    return n * c / (1 + (n - 1) * c)


def model_stock_tensor(base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
    r = model_stock_ratio(base, models)
    mean = models[0].to(torch.float32).clone()
    for m in models[1:]:
        mean = mean + m.to(torch.float32)
    mean = mean / len(models)
    return mean * r + base.to(torch.float32) * (1 - r)


# --------------------------------------------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------------------------------------------


def reference_merge(method: str, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]],
                    params: Mapping[str, Any] | None = None) -> Tensors:
    """Merge every tensor of ``base`` (float32 results). ``models`` lack a tied head exactly when the base does."""
    p = dict(params or {})
    n = len(models)
    out: Tensors = {}
    for name, b in base.items():
        ms = [m[name] for m in models]
        if method == "linear":
            out[name] = linear_tensor(ms, per_model(p.get("weight", 1.0), n), as_bool(p.get("normalize", True)))
        elif method in DELTA_METHODS:
            spec = DELTA_METHODS[method]
            out[name] = delta_tensor(
                name, b, ms, sparsify_kind=spec["sparsify"], consensus=spec["consensus"],
                weight=per_model(p.get("weight", 1.0), n), density=per_model(p.get("density", 1.0), n),
                gamma=per_model(p.get("gamma", 0.01), n), lam=float(p.get("lambda", 1.0)),
                normalize=as_bool(p.get("normalize", spec["normalize"])),
                rescale=as_bool(p.get("rescale", spec["rescale"])), seed=int(p.get("seed", 0)),
                mode=str(p.get("rescale_mode", "l1")), epsilon=per_model(p.get("epsilon", 0.15), n),
            )
        elif method == "sce":
            out[name] = sce_tensor(b, ms, float(p.get("select_topk", 1.0)))
        elif method == "slerp":
            assert n == 1
            out[name] = slerp_tensor(b, ms[0], float(p.get("t", 0.5)))
        elif method == "model_stock":
            assert n >= 2
            out[name] = model_stock_tensor(b, ms)
        else:
            raise ValueError(f"unknown method {method}")
    return out
