"""Methods whose result is a linear combination of their inputs with coefficients set by the inputs' Gram matrix
(multislerp, flattened nuslerp, karcher): one float64 statistics pass gathers ``G_ij = ⟨v_i, v_j⟩`` over the whole
tensor (chunk-independent, ``_tiles.PairSums``), the coefficients follow from ``G`` alone, and the merge pass emits
``Σ c_k·v_k`` (plus the base when the inputs are deltas)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .. import kernels
from .._torch import torch
from ._tiles import PairSums
from .base import Footprint, TensorMerge, TensorTask

Gram = list[list[float]]


def quadratic(gram: Gram, a: Sequence[float], b: Sequence[float] | None = None) -> float:
    """``⟨Σ a_i·v_i, Σ b_j·v_j⟩`` from the Gram matrix (``b`` defaults to ``a``)."""
    b = a if b is None else b
    return sum(a[i] * gram[i][j] * b[j] for i in range(len(a)) for j in range(len(b)))


def vector_norm(gram: Gram, a: Sequence[float]) -> float:
    """``‖Σ a_i·v_i‖``; a quadratic form that rounding left slightly negative counts as 0, NaN stays NaN."""
    q = quadratic(gram, a)
    return math.sqrt(q) if q > 0 else (q if q != q else 0.0)


def finite(gram: Gram) -> bool:
    return all(math.isfinite(x) for row in gram for x in row)


def combine(coef: Sequence[float], base: torch.Tensor, models: Sequence[torch.Tensor], use_base: bool) -> torch.Tensor:
    """``Σ c_k·v_k`` in float32, plus ``base`` with ``use_base`` (``v_k = M_k − B``); element-wise, so the same bytes
    for every chunking. Holds the result and one term at a time. The inputs are left unchanged."""
    acc: torch.Tensor | None = None
    for c, m in zip(coef, models):
        term = torch.sub(m, base).mul_(c) if use_base else torch.mul(m, c)
        acc = term if acc is None else acc.add_(term)
        del term
    assert acc is not None
    return acc.add_(base) if use_base else acc


class GramMerge(TensorMerge):
    """One statistics pass: the float64 Gram matrix ``G_ij = ⟨v_i, v_j⟩`` of the K inputs over the whole tensor
    (``v_k = M_k − B`` with ``use_base``, else ``M_k``); at its end ``solve(G)`` gives K coefficients; the merge pass
    emits ``Σ c_k·v_k`` (+ ``B``). The coefficients (float64, K) are the state a resumed run loads."""

    def __init__(self, task: TensorTask, n_inputs: int, use_base: bool, solve: Callable[[Gram], Sequence[float]]) -> None:
        self.n, self.use_base, self.solve = n_inputs, use_base, solve
        self.pairs = [(i, j) for i in range(n_inputs) for j in range(i, n_inputs)]
        self.sums = PairSums(task.rows, task.row_numel, self.pairs, task.tile, task.whole_tile_blocks)
        self.coef: tuple[float, ...] = ()

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        self.sums.add(r0, [m - base for m in models] if self.use_base else list(models))

    def independent_blocks(self, pass_index: int | None) -> bool:
        """The merge pass (fixed coefficients, element-wise); the statistics pass by the fused kernel, blocks of
        whole tiles (``PairSums.any_order``)."""
        return pass_index is None or self.sums.any_order()

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` by the fused kernel ``pair_sums``."""
        return self.sums.add_raw(r0, base, models, self.use_base)

    def end_pass(self, pass_index: int) -> None:
        gram = [[0.0] * self.n for _ in range(self.n)]
        for (i, j), s in zip(self.pairs, self.sums.finish()):
            gram[i][j] = gram[j][i] = s
        self.coef = tuple(float(c) for c in self.solve(gram))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"coef": torch.tensor(self.coef, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.coef = tuple(state["coef"].tolist())

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine(self.coef, base, models, self.use_base)

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass: :func:`combine` is ``delta_sum`` (with the base) or
        ``weighted_sum`` with the coefficients as weights, no divisor and no lambda (exact identities)."""
        got = kernels.arrays(base, models, out)
        if got is None:
            return None
        b, ms, o = got
        k, one = kernels.kernels(), np.float32(1.0)
        coef = kernels.f32(self.coef)
        return int(k.delta_sum(b, ms, coef, one, one, o) if self.use_base else k.weighted_sum(ms, coef, one, o))


def gram_footprint(task: TensorTask, n: int, use_base: bool) -> Footprint:
    """What a :class:`GramMerge` of ``n`` inputs needs (statistics: the float32 deltas with ``use_base``, then
    PairSums' float64 copies and products; emit: the result and one term)."""
    rows, rn, tile = task.rows, task.row_numel, task.tile
    pairs = n * (n + 1) // 2
    deltas = 4 * n if use_base else 0
    return Footprint(
        stats_per_element=deltas + PairSums.per_element(n, pairs),
        emit_per_element=8,
        stats_state=PairSums.accumulator_bytes(pairs, rn),
        end_of_pass=PairSums.accumulator_bytes(pairs, rn),
        partial_tile=PairSums.partial_tile_bytes(n, pairs, rows, rn, tile),
        stats_per_chunk_row=PairSums.ahead_bytes_per_row(pairs, rn, task),
        gpu_per_element=16 * n + 8 * pairs + 8,
        gpu_state=PairSums.gpu_state_bytes(n, pairs, rows, rn, tile),
    )


