"""SCE (Wan et al. 2024, FuseChat, arXiv:2408.07990), as mergekit 0.1.5 computes it (``merge_methods/sce.py``).

Per tensor, with task vectors ``τ_k = M_k − B``:

1. **Select**: with ``select_topk < 1``, keep the elements whose variance across the models
   (``Var_k τ_k``, population variance) is among the top ``int(select_topk · #nonzero variances)``; the same mask
   for every model. Exact here (radix select, ties by flat index; two statistics passes).
2. **Calculate**: each model's weight is the mean of its masked ``τ_k²`` over the tensor, divided by the sum of
   the models' (``1/K`` each when that sum is below 1e-6): one float64 statistics pass.
3. **Erase**: sign election on the masked task vectors (the sign of their unweighted sum, ``>= 0`` counting as +);
   the result is ``B + Σ_k w_k·a_k·τ_k / max(Σ_k w_k·a_k, 1e-6)`` with ``a_k`` 1 where ``τ_k`` has the elected
   sign.

mergekit 0.1.5 ignores ``weight`` for SCE, so it takes none here either.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import kernels
from .._torch import torch
from . import register
from ._delta import HISTOGRAM_BYTES, agreement, elected_sign, unit_interval
from ._select import TopK
from ._tiles import ColumnSums
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

#: mergekit's floors: below this summed weight the models weigh 1/K each, and the divisor never goes below it
WEIGHT_EPS = 1e-6


def task_vector_variance(tvs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Population variance across the models, element-wise: computed in float64 (each element alone, so the same
    bits for any chunking) and rounded once to float32, which torch.var's float32 result is within an ulp of."""
    mean = tvs[0].to(torch.float64)
    for t in tvs[1:]:
        mean.add_(t)
    mean.div_(len(tvs))
    var = torch.zeros_like(mean)
    for t in tvs:
        var.add_(torch.sub(t, mean).square_())
    return var.div_(len(tvs)).to(torch.float32)


class _SceMerge(TensorMerge):
    def __init__(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> None:
        self.n, self.numel = n_models, task.numel
        self.topk = params["select_topk"]
        self.select = 0 < self.topk < 1
        # k is int(topk · #nonzero variances), known only after the first pass: start non-trivial, set it then
        self.selector = TopK(1 if self.numel > 1 else 0, self.numel) if self.select else None
        self.nonzero = 0
        self.sums = ColumnSums(task.rows, task.row_numel, n_models, task.tile, task.whole_tile_blocks)
        self.weights = [1.0 / n_models] * n_models

    def _masked(self, base: torch.Tensor, models: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tvs = [m - base for m in models]
        if self.topk <= 0:
            return [t.zero_() for t in tvs]
        if self.selector is not None:
            keep = self.selector.factor(task_vector_variance(tvs))
            if keep is not None:
                for t in tvs:
                    t.mul_(keep)
        return tvs

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        if self.selector is not None and pass_index < 2:
            var = task_vector_variance([m - base for m in models])
            if pass_index == 0:
                self.nonzero += int(torch.count_nonzero(var))
                self.selector.pass_a(var)
            else:
                self.selector.pass_b(var)
            return
        self.sums.add(r0, [t.square_() for t in self._masked(base, models)])

    def kernel_path(self) -> bool:
        """Without a selection, and with something to merge (``select_topk`` > 0)."""
        return self.selector is None and self.topk > 0

    def independent_blocks(self, pass_index: int | None) -> bool:
        """The merge pass without a selection (fixed weights, element-wise; a selection keeps its ties in row
        order); the weights pass by the fused kernel, blocks of whole tiles (``ColumnSums.any_order``)."""
        return self.selector is None if pass_index is None else self.sums.any_order()

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """The weights pass without a selection by the fused kernel ``square_sums`` (a selection stays eager)."""
        got = kernels.arrays(base, models)
        rows = base.shape[0] if base.dim() else 0
        if got is None or not self.kernel_path() or not rows:
            return False
        b, ms, _ = got
        sums = self.sums
        return sums.add_fused(r0, rows, lambda *where: kernels.kernels().square_sums(
            b, ms, sums.row_numel, r0, sums.tile, sums.rows, *where))

    def end_pass(self, pass_index: int) -> None:
        if self.selector is not None and pass_index == 0:
            self.selector.k = int(self.nonzero * self.topk)
            self.selector.end_a()
        elif self.selector is not None and pass_index == 1:
            self.selector.end_b()
        else:
            means = [s / max(self.numel, 1) for s in self.sums.finish()]
            total = sum(means)
            self.weights = [1.0 / self.n] * self.n if abs(total) < WEIGHT_EPS else [m / total for m in means]
            if self.selector is not None:
                self.selector.seen_ties = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"weights": torch.tensor(self.weights, dtype=torch.float64)}
        if self.selector is not None:
            state["select"] = torch.tensor(self.selector.export(), dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights = state["weights"].tolist()
        if self.selector is not None:
            exported = state["select"].tolist()
            self.selector.k = exported[0]
            self.selector.restore(exported)

    def cursor(self) -> dict[str, Any]:
        return {"seen": self.selector.seen_ties} if self.selector is not None else {}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        if self.selector is not None:
            self.selector.seen_ties = cursor.get("seen", 0)

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        tvs = self._masked(base, models)
        elected = elected_sign(tvs)
        merged = divisor = None
        for w, t in zip(self.weights, tvs):
            share = agreement(t, elected).mul_(w)
            t.mul_(share)
            merged = t if merged is None else merged.add_(t)
            divisor = share if divisor is None else divisor.add_(share)
        assert merged is not None and divisor is not None
        return merged.div_(divisor.clamp_(min=WEIGHT_EPS)).add_(base)

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass without a selection (the fused kernel ``sce_emit``)."""
        got = kernels.arrays(base, models, out)
        if got is None or not self.kernel_path():
            return None
        b, ms, o = got
        w = kernels.f32(self.weights)
        return int(kernels.kernels().sce_emit(b, ms, w, kernels.f32([WEIGHT_EPS])[0], o))


@register
class Sce(Method):
    name = "sce"
    summary = ("Keeps the elements whose task vectors vary most across the models, weighs each model by its mean "
               "squared task vector, and merges the deltas that agree with the elected sign.")
    reference = "Wan et al. 2024, FuseChat (SCE), arXiv:2408.07990 (mergekit 0.1.5 semantics)"
    params = (ParamSpec("select_topk", float, 1.0, "share of the elements (by variance across the models, among "
                        "those with a nonzero one) kept; 1 keeps every element", check=unit_interval),)
    passes = "4 (two exact radix-select passes over the variance, the weights, merge); 2 when select_topk is 1"
    raw_models = True  # models are only used as ``m - base`` (float32 base): upcast inside the subtraction

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 3 if 0 < params["select_topk"] < 1 else 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """The task vectors (4n); the variance's float64 mean, difference and result and its float32 copy (28)
        and the selection's bit keys (4); the weights pass adds the float64 copies of the squares (8n); the merge
        pass the elected sign, the agreement and the divisor (12). State: the selection's histograms, the per-column
        float64 sums (8n per row element)."""
        n, rows, rn = n_models, task.rows, task.row_numel
        select = 0 < params["select_topk"] < 1
        return Footprint(
            stats_per_element=4 * n + max(32 if select else 0, ColumnSums.per_element(n) + 4),
            emit_per_element=4 * n + 12 + (32 if select else 0),
            stats_state=8 * n * rn + (HISTOGRAM_BYTES if select else 0),
            end_of_pass=8 * n * rn + (3 * HISTOGRAM_BYTES if select else 0),
            partial_tile=ColumnSums.stash_bytes(n, rows, rn, task.tile),
            stats_per_chunk_row=ColumnSums.ahead_bytes_per_row(n, rn, task),
            gpu_per_element=4 * (n + 1) + 8 * n + 16 * n + 32,
            gpu_state=8 * n * rn + 2 * ColumnSums.stash_bytes(n, rows, rn, task.tile)
            + (4 * HISTOGRAM_BYTES if select else 0),
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _SceMerge(task, params, n_models)
