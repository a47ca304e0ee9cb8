"""Reinforced Agent Merging (arXiv:2601.13572, as mergekit 0.1.5 ``merge_methods/ram.py`` computes it): ``ram`` and
its tensor-local variant ``ramplus_tl``.

With ``Δ_k = M_k − B`` (float32), an element *counts* for model k when ``|Δ_k| > epsilon``; ``c`` is how many models
count there. Elements counted by one model only (unique) keep that model's change, elements counted by several
(shared) average them::

    ram:         result = B + Σ_k Δ_k·[counts_k] / max(c, 1)
    ramplus_tl:  result = B + Σ_k Δ_k·[counts_k]·(λ_k where c = 1, else 1 / c)
                 λ_k = 1 + r·clamp(shared_k / max(unique_k, epsilon), 0, alpha)

``shared_k``/``unique_k`` count, over the whole tensor, the elements model k counts where ``c > 1``/``c = 1``: a
statistics pass of integer counts (exact, so chunk- and device-independent), then the merge. Each model's term is
computed as mergekit does (a division by ``c``, λ in float32 operations) and the terms are added in model order.
One difference, by design: with ``epsilon`` 0 a model that changes nothing in a tensor has ``0/0`` as its ratio and
mergekit's result for the whole tensor is NaN; here its λ is 1 (it has no unique element to scale). With no models
the result is the base, as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import kernels
from .._torch import torch
from . import register
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask


def _epsilon_check(x: float) -> str | None:
    return None if 0.0 <= x < math.inf else "must be finite and >= 0"


def _finite(x: float) -> str | None:
    return None if math.isfinite(x) else "must be finite"


EPSILON = ParamSpec("epsilon", float, 1e-5, "a change counts where |model − base| > epsilon", check=_epsilon_check)


def _counted(base: torch.Tensor, models: Sequence[torch.Tensor], eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each model's delta where it counts, ``Δ_k·[|Δ_k| > eps]`` (float32; ±0 elsewhere, NaN kept), and how many
    models count at each element (float32 small integers), of the chunk's shape. ``eps`` is compared in float32, as
    mergekit compares it; float masks (no bool tensors) keep every operation vectorised."""
    deltas: list[torch.Tensor] = []
    total: torch.Tensor | None = None
    for m in models:
        d = torch.sub(m, base)
        counts = d.abs().gt_(eps)  # 1.0 where the model counts
        deltas.append(d.mul_(counts))
        total = counts if total is None else total.add_(counts)
        del d, counts  # before the next model's delta is made (not beside it)
    assert total is not None
    return deltas, total


def _count_masks(base: torch.Tensor, models: Sequence[torch.Tensor], eps: float) -> tuple[list[torch.Tensor],
                                                                                           torch.Tensor]:
    """Where each model counts (bool) and how many models count (uint8, int32 from 256 models), for counting."""
    masks: list[torch.Tensor] = []
    total = torch.zeros(base.shape, dtype=torch.uint8 if len(models) < 256 else torch.int32, device=base.device)
    for m in models:
        masks.append(torch.gt(torch.sub(m, base).abs_(), eps))
        total.add_(masks[-1])
    return masks, total


def ramplus_lambdas(shared: Sequence[int], unique: Sequence[int], r: float, alpha: float, eps: float) -> torch.Tensor:
    """(n,) float32 ``λ_k = 1 + r·clamp(shared_k / max(unique_k, eps), 0, alpha)`` in mergekit's float32 operations;
    1 where the ratio is 0/0 (epsilon 0 and a model that counts nowhere)."""
    rho = torch.tensor(list(shared), dtype=torch.int64) / torch.tensor(list(unique), dtype=torch.int64).clamp(min=eps)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return torch.nan_to_num(lam, nan=1.0)


class _RamMerge(TensorMerge):
    """``ram`` (``plus`` False) and ``ramplus_tl`` (``plus`` True, after its counting pass)."""

    def __init__(self, params: Mapping[str, Any], n_models: int, plus: bool) -> None:
        self.eps, self.n, self.plus = params["epsilon"], n_models, plus
        self.r, self.alpha = params.get("r", 0.0), params.get("alpha", 0.0)
        self.shared = [0] * n_models
        self.unique = [0] * n_models
        self.lam: list[float] = [1.0] * n_models

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        masks, total = _count_masks(base, models, self.eps)
        alone = total == 1
        del total
        for k, mask in enumerate(masks):
            unique = int(torch.logical_and(mask, alone).sum())
            self.unique[k] += unique
            self.shared[k] += int(mask.sum()) - unique  # counted, and by another model too

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` by the fused kernel ``ram_counts`` (the same integer counts)."""
        got = kernels.arrays(base, models)
        if got is None:
            return False
        b, ms, _ = got
        shared, unique = np.zeros(self.n, dtype=np.int64), np.zeros(self.n, dtype=np.int64)
        kernels.kernels().ram_counts(b, ms, kernels.f32([self.eps])[0], shared, unique)
        self.shared = [a + int(x) for a, x in zip(self.shared, shared)]
        self.unique = [a + int(x) for a, x in zip(self.unique, unique)]
        return True

    def end_pass(self, pass_index: int) -> None:
        self.lam = ramplus_lambdas(self.shared, self.unique, self.r, self.alpha, self.eps).tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.plus:
            return {}
        return {"counts": torch.tensor([self.shared, self.unique], dtype=torch.int64).reshape(2, self.n),
                "lambda": torch.tensor(self.lam, dtype=torch.float32)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shared, unique = state["counts"].tolist()
        self.shared, self.unique, self.lam = shared, unique, state["lambda"].tolist()

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        if not models:
            return base
        deltas, total = _counted(base, models, self.eps)
        unique = total.eq(1) if self.plus and any(lam != 1.0 for lam in self.lam) else None
        divisor = total.clamp_(min=1)
        merged: torch.Tensor | None = None
        for d, lam in zip(deltas, self.lam):
            term = d.div_(divisor)  # Δ·[counts] / max(c, 1): Δ itself where unique
            if unique is not None and lam != 1.0:
                term.mul_(torch.where(unique, lam, 1.0))  # (Δ·1)·λ where unique (λ a float32 value)
            merged = term if merged is None else merged.add_(term)
        assert merged is not None
        return merged.add_(base)

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass (the fused kernel ``ram_emit``)."""
        got = kernels.arrays(base, models, out) if models else None
        if got is None:
            return None
        b, ms, o = got
        lam = np.asarray(self.lam if self.plus else [1.0] * self.n, dtype=np.float32)
        return int(kernels.kernels().ram_emit(b, ms, kernels.f32([self.eps])[0], lam, o))


@register
class Ram(Method):
    name = "ram"
    summary = ("Reinforced Agent Merging: keeps each change made by one model alone and averages the changes several "
               "models make (changes of at most epsilon do not count).")
    reference = "RAM, arXiv:2601.13572 (mergekit 0.1.5 merge_methods/ram.py)"
    params = (EPSILON,)
    min_models = 0
    raw_models = True  # models are only used as ``m − base`` (float32 base): upcast inside the subtraction

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Measured with bench/ram_probe.py: every model's counted delta and the model count (4n + 4), and while a
        model's delta is made the float32 upcast of a 16-bit model, then its |Δ| (4)."""
        n = n_models
        return Footprint(emit_per_element=4 * n + 8, gpu_per_element=4 * (n + 1) + 4 * n + 12)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _RamMerge(params, n_models, plus=False)


@register
class RamPlusTL(Method):
    name = "ramplus_tl"
    summary = ("RAM+ (tensor-local): RAM whose unique changes are scaled per model by 1 + r·min(shared ÷ unique, "
               "alpha), the counts taken over the tensor.")
    reference = "RAM+, arXiv:2601.13572 (mergekit 0.1.5 merge_methods/ram.py)"
    passes = "2 (per-model counts of shared and unique changes, then merge)"
    params = (ParamSpec("r", float, 0.1, "strength of the rescaling of each model's unique changes", check=_finite),
              ParamSpec("alpha", float, 0.2, "cap of the ratio of shared to unique changes",
                        check=lambda x: None if 0.0 <= x < math.inf else "must be finite and >= 0"),
              EPSILON)
    min_models = 0
    raw_models = True

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Measured with bench/ram_probe.py. Counting: one delta at a time with the float32 upcast of a 16-bit
        model (8), where each model counts (n, bool), the model count and two masks of it (3). Merge: ram's, plus
        where a change is unique (1) and one model's λ factor (4)."""
        n = n_models
        return Footprint(stats_per_element=n + 11, emit_per_element=4 * n + 9,
                         gpu_per_element=4 * (n + 1) + 4 * n + 17)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _RamMerge(params, n_models, plus=True)
