"""The shared core of the delta-based baselines (task arithmetic, TIES, DARE, Breadcrumbs), mergekit's semantics.

Per tensor: each model's delta ``Δ_k = M_k − B`` is sparsified (``magnitude``: keep the top ``density`` share of
``|Δ|``; ``outliers``: Breadcrumbs, drop the top ``gamma`` share and keep the next ``density`` share; ``random``:
DARE, keep each element with probability ``density`` from a counter-based generator, optionally rescaled by
``1/density``), multiplied by its ``weight``; with sign consensus the elected sign is that of the summed weighted
deltas (``>= 0`` counts as +) and only agreeing elements count; with ``normalize`` the sum is divided by the summed
weights of the counted elements; the result is scaled by ``lambda`` and added to the base.

Exact selections take two statistics passes (radix select, see ``_select``); everything else is element-wise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._torch import torch
from ._rng import keep_mask, stream_key
from ._select import BINS, TopK
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

#: bytes of one radix-select histogram (int64 counts)
HISTOGRAM_BYTES = BINS * 8


def unit_interval(x: float) -> str | None:
    return None if 0.0 <= x <= 1.0 else "must be between 0 and 1"


def finite(x: float) -> str | None:
    return None if abs(x) < float("inf") else "must be finite"


WEIGHT = ParamSpec("weight", float, 1.0, "scale of each model's delta", per_model=True, check=finite)
DENSITY = ParamSpec("density", float, 1.0, "share of each model's delta elements kept", per_model=True, check=unit_interval)
GAMMA = ParamSpec("gamma", float, 0.01, "share of the largest |delta| elements removed (Breadcrumbs)", per_model=True,
                  check=unit_interval)
LAMBDA = ParamSpec("lambda", float, 1.0, "scale of the merged delta added to the base", check=finite)
SEED = ParamSpec("seed", int, 0, "seed of the counter-based drop masks (same masks for any chunking or device)")


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, "divide by the summed weights of the models counted at each element")


def rescale_param(default: bool) -> ParamSpec:
    return ParamSpec("rescale", bool, default, "divide kept elements by density (DARE's rescaling)")


class _DeltaTensorMerge(TensorMerge):

    def __init__(self, method: DeltaMethod, task: TensorTask, params: Mapping[str, Any], n_models: int) -> None:
        self.m, self.task, self.p, self.n = method, task, params, n_models
        numel = self.numel = task.numel
        # one or two top-k selectors per model; keep = top(k_hi) & ~top(k_lo)
        self.selectors: list[tuple[TopK, TopK | None]] = []
        if method.sparsify == "magnitude":
            for k in range(n_models):
                d = params["density"][k]
                keep = numel if d >= 1 else int(d * numel)
                self.selectors.append((TopK(keep, numel), None))
        elif method.sparsify == "outliers":
            for k in range(n_models):
                d, g = params["density"][k], params["gamma"][k]
                if d >= 1:
                    self.selectors.append((TopK(numel, numel), None))
                    continue
                target, top = int(d * numel), int(g * numel)
                if numel - target - top < 0:
                    top = numel - target
                self.selectors.append((TopK(top + target, numel), TopK(top, numel)))
        self.keys = [stream_key(params["seed"], k, task.name) for k in range(n_models)] if method.sparsify == "random" else []
        self.row_numel = task.row_numel
        self._flat_start = 0  # flat index of the emitted chunk's first element (random masks)

    def _selectors(self) -> list[TopK]:
        return [s for pair in self.selectors for s in pair if s is not None]

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        for (hi, lo), m in zip(self.selectors, models):
            absd = (m - base).abs_()
            for s in (hi, lo):
                if s is not None:
                    (s.pass_a if pass_index == 0 else s.pass_b)(absd)

    def end_pass(self, pass_index: int) -> None:
        for s in self._selectors():
            (s.end_a if pass_index == 0 else s.end_b)()

    def _sparse(self, k: int, delta: torch.Tensor) -> torch.Tensor:
        if self.m.sparsify in ("magnitude", "outliers"):
            hi, lo = self.selectors[k]
            absd = delta.abs()
            keep = hi.factor(absd)
            if lo is not None:  # the top k_lo are inside the top k_hi, so keep_hi − keep_lo is 0 or 1
                drop = lo.factor(absd)
                if drop is not None:
                    keep = drop.neg_().add_(1) if keep is None else keep.sub_(drop)
                elif keep is not None:
                    keep.zero_()
                else:
                    keep = torch.zeros_like(delta)
            return delta if keep is None else delta.mul_(keep)
        if self.m.sparsify == "random":
            density = self.p["density"][k]
            if density >= 1:
                return delta
            # dropped iff u < drop rate (1 − density)
            keep = keep_mask(self.keys[k], self._flat_start, delta.numel(), density, np.float32, delta.device)
            delta.mul_(keep.reshape(delta.shape))
            if self.p["rescale"] and density > 0:
                delta.div_(density)
        return delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        sel = self._selectors()
        return {"select": torch.tensor([s.export() for s in sel], dtype=torch.int64)} if sel else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for s, exported in zip(self._selectors(), state["select"].tolist()):
            s.restore(exported)

    def cursor(self) -> dict[str, Any]:
        sel = self._selectors()
        return {"seen": [s.seen_ties for s in sel]} if sel else {}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        for s, seen in zip(self._selectors(), cursor.get("seen", [])):
            s.seen_ties = seen

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = self.p["weight"]
        self._flat_start = r0 * self.row_numel
        deltas = [self._sparse(k, m - base) for k, m in enumerate(models)]
        for d, w in zip(deltas, weights):
            if w != 1.0:
                d.mul_(w)
        normalize = self.p["normalize"]
        if self.m.consensus:
            total = deltas[0].clone()
            for d in deltas[1:]:
                total.add_(d)
            # the elected sign, +1 where the summed mass is >= 0 (−0 only where every delta is ±0, which no sign
            # keeps; NaN makes the output NaN anyway). Float arithmetic throughout: boolean masks are slow on CPU.
            elected = torch.ones_like(total).copysign_(total)
            del total
            divisor = None
            for w, d in zip(weights, deltas):
                agree = torch.mul(d, elected).sign_().clamp_(min=0)  # 1 where sign(d) is elected (not 0), NaN stays
                d.mul_(agree)
                if normalize:
                    share = agree.mul_(w) if w != 1.0 else agree
                    divisor = share if divisor is None else divisor.add_(share)
            del elected
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            if normalize:
                assert divisor is not None
                if min(weights) > 0:  # a 0 divisor only where every term is ±0: any positive divisor keeps them
                    mixed.div_(divisor.clamp_(min=min(weights) / 2))
                else:
                    mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
        else:
            mixed = deltas[0]
            for d in deltas[1:]:
                mixed.add_(d)
            if normalize:
                divisor = sum(weights)
                mixed.div_(1.0 if abs(divisor) < 1e-8 else divisor)
        if self.p["lambda"] != 1:
            mixed.mul_(self.p["lambda"])
        return mixed.add_(base)


class DeltaMethod(Method):
    """Configure with ``sparsify`` (none/magnitude/outliers/random) and ``consensus``; see the module docstring."""

    sparsify: str = "none"
    consensus: bool = False
    raw_models = True  # models are only used as ``m - base`` (float32 base): upcast inside the subtraction

    @property
    def passes(self) -> str:  # type: ignore[override]
        if self.sparsify in ("magnitude", "outliers"):
            return "3 (two exact radix-select passes over |delta|, then merge); 1 when every density is 1"
        return "1 (element-wise)"

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        """Two radix-select passes, unless every model keeps everything (density 1)."""
        if self.sparsify in ("magnitude", "outliers") and any(d < 1 for d in params["density"]):
            return 2
        return 0

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Measured on the CPU (bench/ram_probe.py). Merge pass: every model's delta, and the float32 upcast that
        ``m - base`` makes of a 16-bit model (4n + 4); selecting adds |delta| and the keep factor (8), outliers the
        drop factor too (12); sign election the elected sign and two agreement factors (8 in all, alive with the
        selection's gone). Statistics passes: the base, the previous |delta|, the upcast and the new |delta| (12
        beyond the base's copy). State: one 65 536-bin int64 histogram per selection, two more while a pass ends;
        DARE's mask generator keeps three 65 536-element uint64 work arrays."""
        n = n_models
        selections = {"magnitude": n, "outliers": 2 * n}.get(self.sparsify, 0)
        extra = {"none": 0, "magnitude": 8, "outliers": 12, "random": 0}[self.sparsify]
        if self.consensus:
            extra = max(extra, 8)
        gpu_extra = {"none": 0, "magnitude": 16, "outliers": 24, "random": 24}[self.sparsify]
        return Footprint(
            stats_per_element=12 if selections else 0,
            emit_per_element=4 * n + 4 + extra,
            stats_state=selections * HISTOGRAM_BYTES,
            end_of_pass=(selections + 2) * HISTOGRAM_BYTES if selections else 0,
            emit_state=3 * HISTOGRAM_BYTES if self.sparsify == "random" else 0,
            gpu_per_element=4 * (n + 1) + 4 * n + 12 + gpu_extra + (16 if self.consensus else 0) + 4,
            gpu_state=2 * n * 2 * HISTOGRAM_BYTES if selections else 0,
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _DeltaTensorMerge(self, task, params, n_models)
