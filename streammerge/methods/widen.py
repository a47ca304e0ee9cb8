"""WIDEN: weight disentanglement merging (Yu et al., arXiv 2408.03092), as specified in docs/widen.md.

For a 2-D tensor, every column j (an input feature of a Linear weight; a token of an embedding, i.e. a stored row)
of every model k gets a weight ``w_kj``. Pass 1 accumulates float64 column statistics ``ssb = Σ b²``,
``ssm_k = Σ m_k²``, ``dot_k = Σ m_k·b`` in a fixed reduction order. From them: magnitude divergence
``|√ssm − √ssb|`` and direction divergence ``1 − dot/√(ssm·ssb)``; each is ranked within its model (stable,
NaN last) into float32 significances ``rank/n``; a softmax across models gives scores, replaced by ``s`` where
``2·rank > t·(n−1)`` (above the model's average, decided exactly); ``w = ½(S_mag + S_dir)``. Pass 2 emits
``B + Σ_k Δ_k·w_k`` in float32. 1-D tensors use raw ``|Δ|`` as significance (no ranks, no ½).

Beyond the authors' code, which merges only Linear and embedding weights: GPT-2's Conv1D weights (stored (in, out))
take their columns from the stored rows; 3-D stacked MoE experts [E, out, in] are merged expert by expert; and a
convolution kernel [out, in, *kernel] (a vision tower's patch embedding) is the Linear weight of the unfolded
patch, so it is merged as its [out, in·∏kernel] view (docs/widen.md, "Which rule each tensor gets").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .. import kernels
from .._torch import torch
from . import register
from ._tiles import (
    FusedTiles,
    TileFeeder,
    add_column_sums,
    row_sums,
    tile_products_bytes,
)
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

FLOAT32_MAX = 3.4028234663852886e38


def _float32_weight(value: float) -> str | None:
    """``s`` becomes a float32 weight: it must be one (finite and at most 3.4e38)."""
    return _non_negative(value) or ("is too large: the weights are float32, at most 3.4e38"
                                    if value > FLOAT32_MAX else None)


def _non_negative(x: float) -> str | None:
    return None if 0 <= x < float("inf") else "must be a finite number >= 0"


def weighted_delta_sum(base: torch.Tensor, models: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``base + ((Δ₁w₁ + Δ₂w₂) + ...)`` in float32, summed left to right (the official order)."""
    acc = (models[0] - base).mul_(weights[0])
    for m, w in zip(models[1:], weights[1:]):
        acc.add_((m - base).mul_(w))
    return acc.add_(base)


def softmax_across_models(x: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0 (the models) of ``x`` (N, ...): ``exp(x − max) / Σ exp(x − max)``, the sum added in model
    order. Element-wise operations only, so every element's bits are the same whatever the thread count
    (``torch.softmax`` on the CPU computes a column vectorised or scalar depending on where the threads' chunks
    end, which changes the last bit with ``OMP_NUM_THREADS``)."""
    e = torch.exp(x - x.amax(dim=0, keepdim=True))
    total = e[0].clone()
    for k in range(1, e.shape[0]):
        total += e[k]
    return e / total


def rank_significance(divergence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``divergence`` (N, n): float32 significance ``rank/n`` and the int64 rank of every column.

    Stable ascending order, NaN after every number, ties broken by lower column index first. NaN is placed by a
    second stable sort on a NaN flag rather than left to the sort: a 0/0 NaN has its sign bit set, and CUDA's sort
    puts such a NaN first where the CPU's puts it last.
    """
    n = divergence.shape[1]
    nan = torch.isnan(divergence)
    order = torch.argsort(divergence.masked_fill(nan, float("inf")), dim=1, stable=True)
    order = order.gather(1, torch.argsort(nan.gather(1, order).to(torch.uint8), dim=1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, dtype=torch.int64, device=order.device).expand_as(order).contiguous())
    # a tensor divisor: CUDA divides by a plain number via its reciprocal, which can differ from the CPU in the last bit
    sigma = rank.to(torch.float32) / torch.tensor(float(n), device=rank.device)
    return sigma, rank


def column_weights(ssb: torch.Tensor, ssm: torch.Tensor, dot: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """WIDEN weights (N, n) float32 from float64 column statistics ssb (n,), ssm (N, n), dot (N, n)."""
    n = ssb.shape[0]
    mag = (ssm.sqrt() - ssb.sqrt()).abs()
    direction = 1.0 - dot / (ssm * ssb).sqrt()  # a zero column gives 0/0 = NaN: ranked most changed
    scores = []
    for divergence in (mag, direction):
        sigma, rank = rank_significance(divergence)
        score = softmax_across_models(sigma)
        above = (2 * rank).to(torch.float64) > t * (n - 1)
        scores.append(torch.where(above, torch.full_like(score, s), score))
    return (scores[0] + scores[1]) * 0.5


class _MatrixMerge(TensorMerge):
    """Linear rule (columns = stored columns); embedding and Conv1D rules (columns = stored rows); the conv rule:
    the Linear rule on a kernel's [out, in·∏kernel] view (rows stay rows, so chunks need no change)."""

    def __init__(self, task: TensorTask, n_models: int, t: float, s: float) -> None:
        self.task, self.n_models, self.t, self.s = task, n_models, t, s
        rows, cols = task.rows, task.row_numel
        self.by_rows = task.rule.columns_are_rows
        k = 1 + 2 * n_models  # [b², m_1², ..., m_N², m_1·b, ..., m_N·b]
        self._feeder: TileFeeder | None = None if self.by_rows else TileFeeder(rows, task.tile)  # rows in order
        self._lock = threading.Lock()  # (blocks of an embedding's statistics may come from several threads)
        # float64 accumulators, made on the device of the first chunk: (1 + 2N, rows) by rows, (1 + 2N) x cols else
        self._shape = (k, rows) if self.by_rows else (k * cols,)
        self._stats: torch.Tensor | None = None
        # fused kernels by columns: where they add their blocks (the tile in progress; blocks out of turn)
        self._fused = None if self._feeder is None else FusedTiles(self._feeder, self._shape[0])
        self.weights: torch.Tensor | None = None  # (N, n) float32

    def independent_blocks(self, pass_index: int | None) -> bool:
        """The merge pass always (weights fixed per column); the statistics of an embedding (a token per row, its
        sums complete inside the row); the column sums of a matrix once the fused kernel has added a block, when
        blocks are whole tiles (``TensorTask.whole_tile_blocks``): a block out of turn sums its tiles apart, added
        to the sums in row order later (``_tiles.FusedTiles``)."""
        return pass_index is None or self.by_rows or (
            self.task.whole_tile_blocks and self._fused is not None and self._fused.started)

    def _accumulators(self, device: torch.device) -> torch.Tensor:
        """The float64 sums, made at the first block (once, whichever thread gets there first)."""
        if self._stats is None:
            with self._lock:
                if self._stats is None:
                    self._stats = torch.zeros(self._shape, dtype=torch.float64, device=device)
        return self._stats

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        # Work one aligned 64-row tile at a time: small temporaries, and a reduction order fixed by the tiles.
        stats = self._accumulators(base.device)
        flat = [x.reshape(x.shape[0], -1) for x in (base, *models)]  # a view (a kernel's [rows, in·∏kernel])
        if self.by_rows:
            # one token per stored row: its sums are complete inside the row (reduce over the hidden dim), so the
            # rows need no feeder and the blocks no order; a tile's rows at a time keeps the products small
            for t0 in range(0, flat[0].shape[0], self.task.tile):
                b, *ms = (x[t0 : t0 + self.task.tile] for x in flat)
                stats[:, r0 + t0 : r0 + t0 + b.shape[0]] = row_sums(self._products(b, ms)).T
            return
        assert self._feeder is not None
        for t0, (b, *ms) in self._feeder.feed(r0, flat):
            add_column_sums(stats, self._products(b, ms), self.task.tile)  # vals: (rows, 1 + 2N, cols)

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` by the fused kernels, the same sums: by columns ``widen_column_sums`` (products and tile
        sums in one pass, a tile in progress kept as float64 partial sums rather than stashed rows); by rows
        ``widen_row_sums`` (the products of a row summed in :func:`row_sums`' order, never stored). By columns, not
        after an eager block (the feeder's stash)."""
        got = kernels.arrays(base, models)
        if got is None:
            return False
        b, ms, _ = got
        rows = base.shape[0] if base.dim() else 1
        cols = b.shape[0] // max(rows, 1)
        k = kernels.kernels()
        exact = self.task.exact_products
        if self.by_rows:
            k.widen_row_sums(b, ms, cols, r0, exact, self._accumulators(base.device).numpy())
            return True
        assert self._fused is not None
        stats = self._accumulators(base.device)
        if stats.device.type != "cpu":
            return False
        return self._fused.add(r0, rows, stats.numpy(), lambda *where: k.widen_column_sums(
            b, ms, cols, r0, self.task.tile, self.task.rows, exact, *where))

    def _products(self, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        """(rows, 1 + 2N, cols) products [b², m_k², m_k·b]; float32 when exact (16-bit inputs), else float64."""
        dtype = torch.float32 if self.task.exact_products else torch.float64
        b = base.to(dtype)
        n = self.n_models
        vals = torch.empty((b.shape[0], 1 + 2 * n, b.shape[1]), dtype=dtype, device=b.device)
        torch.mul(b, b, out=vals[:, 0])
        for i, m in enumerate(models):
            md = m.to(dtype)
            torch.mul(md, md, out=vals[:, 1 + i])
            torch.mul(md, b, out=vals[:, 1 + n + i])
        return vals

    def end_pass(self, pass_index: int) -> None:
        stats = self._stats if self._stats is not None else torch.zeros(self._shape, dtype=torch.float64)
        stats = stats.reshape(1 + 2 * self.n_models, -1)
        n = self.n_models
        self.weights = column_weights(stats[0], stats[1 : 1 + n], stats[1 + n :], self.t, self.s)
        self._stats = self._feeder = self._fused = None  # free the accumulators

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights} if self.weights is not None else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights = state["weights"]
        self._stats = self._feeder = self._fused = None

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        assert self.weights is not None, "emit before the statistics pass"
        if self.weights.device != base.device:  # journaled weights load on the CPU
            self.weights = self.weights.to(base.device)
        if self.by_rows:
            ws = [w[r0 : r0 + base.shape[0], None] for w in self.weights]
        else:
            ws = [w[None, :] for w in self.weights]
        flat = [x.reshape(x.shape[0], -1) for x in models]
        return weighted_delta_sum(base.reshape(base.shape[0], -1), flat, ws).reshape(base.shape)

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass (streammerge.kernels ``widen_emit``)."""
        assert self.weights is not None, "emit before the statistics pass"
        got = kernels.arrays(base, models, out)
        if got is None or self.weights.device.type != "cpu" or self.weights.dtype != torch.float32:
            return None
        b, ms, o = got
        weights = self.weights.contiguous().numpy()
        cols = base.reshape(base.shape[0], -1).shape[1] if base.dim() else 1
        return int(kernels.kernels().widen_emit(b, ms, weights, cols, self.by_rows, r0, o))


class _ExpertsMerge(TensorMerge):
    """3-D stacked experts [E, out, in] (transformers v5 MoE layout): each expert is its own matrix, merged by the
    Linear rule (columns = its input features), as the per-expert 2-D layout would be. Rows are experts, so a
    chunk always holds whole experts and each expert's statistics are complete inside it."""

    def __init__(self, task: TensorTask, n_models: int, t: float, s: float) -> None:
        experts, out, cols = task.shape
        sub = TensorTask(task.name, (out, cols), Rule.MATRIX, task.tile, task.exact_products, task.on_gpu)
        self.experts = [_MatrixMerge(sub, n_models, t, s) for _ in range(experts)]
        self.matrix = (out, cols)

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        for i in range(base.shape[0]):
            self.experts[r0 + i].accumulate(pass_index, 0, base[i].reshape(self.matrix),
                                            [m[i].reshape(self.matrix) for m in models])

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        if kernels.arrays(base, models) is None:
            return False
        for i in range(base.shape[0]):
            done = self.experts[r0 + i].accumulate_raw(pass_index, 0, base[i].reshape(self.matrix),
                                                       [m[i].reshape(self.matrix) for m in models])
            assert done, "an expert's statistics come in one block"
        return True

    def end_pass(self, pass_index: int) -> None:
        for expert in self.experts:
            expert.end_pass(pass_index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if any(e.weights is None for e in self.experts):
            return {}
        return {"weights": torch.stack([e.weights for e in self.experts])}  # (E, N, in)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for expert, weights in zip(self.experts, state["weights"]):
            expert.load_state_dict({"weights": weights})

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        if kernels.arrays(base, models, out) is None:
            return None
        bad = 0
        for i in range(base.shape[0]):
            got = self.experts[r0 + i].emit_raw(0, base[i].reshape(self.matrix), [m[i].reshape(self.matrix)
                                                                                  for m in models],
                                                out[i].reshape(self.matrix))
            if got is None:
                return None
            bad += got
        return bad

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([
            self.experts[r0 + i].emit(0, base[i].reshape(self.matrix), [m[i].reshape(self.matrix) for m in models])
            for i in range(base.shape[0])]).reshape(base.shape)


class _VectorMerge(TensorMerge):
    """1-D rule: significance is raw |Δ| per element; merged whole (the engine sends one chunk)."""

    def __init__(self, t: float, s: float) -> None:
        self.t, self.s = t, s

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        sig = torch.stack([(m - base).abs() for m in models])  # (N, L) float32
        score = softmax_across_models(sig)
        sig64 = sig.reshape(len(models), -1).to(torch.float64)
        # a fixed summation order (numpy's pairwise sum on the CPU), not a parallel reduction that varies with threads
        mean = (row_sums(sig64) / sig64.shape[1]).reshape((-1,) + (1,) * base.dim())
        above = sig.to(torch.float64) > self.t * mean
        score = torch.where(above, torch.full_like(score, self.s), score)
        return weighted_delta_sum(base, models, list(score))


@register
class Widen(Method):
    name = "widen"
    summary = (
        "Weight disentanglement: ranks how much each model changed each column's magnitude and direction, "
        "and fuses deltas with adaptive importance scores. Merges fine-tuned and continually pre-trained models."
    )
    reference = "Yu et al. 2024, arXiv:2408.03092 (docs/widen.md)"
    passes = "2 for 2-D tensors (float64 column statistics, then merge); 1 for 1-D"
    params = (
        ParamSpec("t", float, 1.0, "above-average ratio: a column's score becomes s where its rank exceeds t x "
                  "the model's mean rank", check=_non_negative),
        ParamSpec("s", float, 1.0, "score calibration: the weight given to above-average columns",
                  check=_float32_weight),
    )
    min_models = 2
    embedding_rule = True

    def rule_error(self, task: TensorTask) -> str | None:
        if task.rule is Rule.TENSOR and len(task.shape) != 3:
            return (f"WIDEN has no rule for {len(task.shape)}-D stacked experts (3-D [E, out, in] experts are merged "
                    "per expert)")
        return None

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 1 if rule.two_d or rule in (Rule.TENSOR, Rule.CONV) else 0

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Measured on the CPU (bench/ram_probe.py). Statistics: a block's (1 + 2N) products, float32 when every
        input is 16-bit (exact), else float64 with the float64 copies of base and model they are made from. Merge
        pass: the accumulator and one delta. State: float64 column sums while the pass runs; with the ranking stage
        (divergences, sorts, ranks, scores: about 80 bytes per model and column) when it ends; the float32 weights
        during the merge. A block that is not whole tiles stashes the rows of its incomplete tile (float32) until
        the tile completes, then makes that whole tile's products."""
        n = n_models
        if task.rule is Rule.TENSOR:  # stacked experts: one matrix's figures, the state for every expert
            experts, out, cols = task.shape
            one = self.footprint(TensorTask(task.name, (out, cols), Rule.MATRIX, task.tile, task.exact_products,
                                            task.on_gpu), n_models, params)
            return Footprint(
                stats_per_element=one.stats_per_element, emit_per_element=one.emit_per_element + 16,
                stats_state=experts * one.stats_state,
                end_of_pass=experts * (one.stats_state + one.emit_state) + one.end_of_pass,
                emit_state=experts * one.emit_state, partial_tile=one.partial_tile,
                gpu_per_element=one.gpu_per_element + 16, gpu_state=experts * one.gpu_state)
        if task.rule is Rule.VECTOR:  # 1-D: significances, scores, float64 tests, result
            return Footprint(emit_per_element=24 * n + 8, gpu_per_element=8 * n + 20)
        rows, cols = task.rows, task.row_numel  # a kernel: its [out, in·∏kernel] view
        columns = rows if task.rule.columns_are_rows else cols
        product = 4 if task.exact_products else 8
        sums = 8 * (1 + 2 * n) * columns
        tile_rows = min(rows, task.tile)
        return Footprint(
            stats_per_element=(1 + 2 * n) * product + (0 if task.exact_products else 16),
            emit_per_element=8,
            stats_state=sums,
            end_of_pass=sums + 80 * n * columns,
            emit_state=4 * n * columns,
            partial_tile=(n + 1) * tile_rows * cols * 4 + tile_products_bytes(1 + 2 * n, rows, cols, product, False,
                                                                              task.tile),
            stats_per_chunk_row=0 if task.on_gpu or task.rule.columns_are_rows else FusedTiles.ahead_bytes_per_row(
                (1 + 2 * n) * cols, task.tile),
            gpu_per_element=20 * n + 32,
            gpu_state=(sums + 96 * n * columns + tile_rows * cols * 2 * 4 * (n + 1)
                       + tile_products_bytes(1 + 2 * n, rows, cols, product, True, task.tile)),
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        if task.rule is Rule.VECTOR:
            return _VectorMerge(params["t"], params["s"])
        if task.rule is Rule.TENSOR:
            return _ExpertsMerge(task, n_models, params["t"], params["s"])
        return _MatrixMerge(task, n_models, params["t"], params["s"])
