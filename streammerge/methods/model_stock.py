"""Model Stock (Jang et al. 2024), as mergekit computes it: from the mean pairwise cosine of the models' deltas,
``r = N·cos / (1 + (N−1)·cos)``; the result is ``r·mean_k(M_k) + (1−r)·B``. By default one ratio per tensor;
with ``filter_wise`` one per row of the last dimension (each output filter of a weight; a vector is one row), computed
inside each chunk (row sums in float64, in a fixed order, so no bit depends on chunking or threads), so it needs no
statistics pass.

A statistics pass gathers ``⟨Δ_i, Δ_j⟩`` for i ≤ j in float64 (chunk-independent). Where ``1 + (N−1)·cos`` is
0 (deltas exactly opposed) the ratio is undefined: the merge stops with an error naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .. import kernels
from .._torch import torch
from ..errors import MethodError
from . import register
from ._tiles import PairSums, row_sums
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

COS_EPS = 1e-8


def model_stock_ratio(n: int, gram: dict[tuple[int, int], float], name: str = "") -> float:
    """``r`` from the Gram matrix of the deltas (``gram[i, j]`` for i <= j)."""
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = max(math.sqrt(gram[i, i]) * math.sqrt(gram[j, j]), COS_EPS)
            cos.append(max(-1.0, min(1.0, gram[i, j] / denom)))
    c = sum(cos) / len(cos)
    denom = 1.0 + (n - 1) * c
    if abs(denom) < 1e-12:
        raise MethodError(
            f"model_stock: tensor {name}: the deltas are exactly opposed (mean cosine {c:.6g} = -1/(N-1)), so the "
            "interpolation ratio is undefined; exclude the tensor with --exclude"
        )
    return n * c / denom


class _ModelStockMerge(TensorMerge):
    def __init__(self, task: TensorTask, n_models: int) -> None:
        self.name, self.n = task.name, n_models
        self.pairs = [(i, j) for i in range(n_models) for j in range(i, n_models)]
        self.sums = PairSums(task.rows, task.row_numel, self.pairs, task.tile, task.whole_tile_blocks)
        self.ratio = 0.0

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        self.sums.add(r0, [m - base for m in models])

    def independent_blocks(self, pass_index: int | None) -> bool:
        """The merge pass (fixed coefficients, element-wise); the statistics pass by the fused kernel, blocks of
        whole tiles (``PairSums.any_order``)."""
        return pass_index is None or self.sums.any_order()

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` by the fused kernel ``pair_sums``."""
        return self.sums.add_raw(r0, base, models, True)

    def end_pass(self, pass_index: int) -> None:
        self.ratio = model_stock_ratio(self.n, dict(zip(self.pairs, self.sums.finish())), self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ratio": torch.tensor([self.ratio], dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ratio = float(state["ratio"][0])

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        mean = models[0].clone()
        for m in models[1:]:
            mean.add_(m)
        mean.div_(len(models))
        return mean.mul_(self.ratio).add_(base * (1.0 - self.ratio))

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass (the fused kernel ``mean_interpolate``)."""
        got = kernels.arrays(base, models, out)
        if got is None:
            return None
        b, ms, o = got
        n, ratio, rest = kernels.f32([len(models), self.ratio, 1.0 - self.ratio])
        return int(kernels.kernels().mean_interpolate(b, ms, n, ratio, rest, o))


class _FilterWiseMerge(TensorMerge):
    """One ratio per row of the last dimension (mergekit's ``filter_wise``), in mergekit's order of operations."""

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        shape = base.shape
        w0 = base.reshape(1, -1) if base.dim() <= 1 else base
        ws = [m.reshape(1, -1) if base.dim() <= 1 else m for m in models]
        offsets = [w - w0 for w in ws]
        cos = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                # float64 row sums in a fixed order (torch's float32 sums of long rows change bits with chunking
                # and threads); mergekit's clamps and the cosine rounded to float32
                norms = row_sums(a * a).sqrt_() * row_sums(b * b).sqrt_()
                cos.append((row_sums(a * b) / norms.clamp(min=1e-6)).clamp(-1, 1).to(torch.float32))
        c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        t = (n * c) / (1 + (n - 1) * c)
        avg = sum(ws) / n
        return (t * avg + (1 - t) * w0).reshape(shape)


@register
class ModelStock(Method):
    name = "model_stock"
    summary = "Interpolates between the base and the models' average by a ratio set from how aligned their deltas are."
    reference = "Jang et al. 2024, Model Stock, arXiv:2403.19522 (mergekit, non-filter-wise)"
    passes = "2 (float64 delta Gram matrix, then interpolate); 1 with filter_wise"
    params = (ParamSpec("filter_wise", bool, False, "one ratio per row of the last dimension (each output filter) "
                        "instead of one per tensor"),)
    min_models = 2

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 0 if params.get("filter_wise") else 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        if params.get("filter_wise"):  # the deltas, a pair's product, the mean, the result's temporaries
            return Footprint(emit_per_element=4 * n_models + 16, gpu_per_element=8 * n_models + 24)
        n, rows, rn, tile = n_models, task.rows, task.row_numel, task.tile
        pairs = n * (n + 1) // 2
        return Footprint(
            stats_per_element=4 * n + PairSums.per_element(n, pairs),  # the float32 deltas, then PairSums' work
            emit_per_element=8,  # the mean, and base·(1 − r) before it is added
            stats_state=PairSums.accumulator_bytes(pairs, rn),
            end_of_pass=PairSums.accumulator_bytes(pairs, rn),
            partial_tile=PairSums.partial_tile_bytes(n, pairs, rows, rn, tile),
            stats_per_chunk_row=PairSums.ahead_bytes_per_row(pairs, rn, task),
            gpu_per_element=16 * n + 8 * pairs + 8,
            gpu_state=PairSums.gpu_state_bytes(n, pairs, rows, rn, tile),
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _FilterWiseMerge() if params.get("filter_wise") else _ModelStockMerge(task, n_models)
