"""The statistics ``streammerge analyze`` gathers, as a statistics-only method the merge engine can plan and run.

:class:`StatisticsMethod` is a :class:`~streammerge.methods.Method` that is never registered (``streammerge
methods`` does not list it and ``merge`` cannot use it): the planner sizes its chunks and compute blocks from its
:class:`~streammerge.methods.Footprint` within the same budget as a merge, the per-tensor runner feeds it row
blocks through its statistics passes, and its state (:meth:`TensorStatistics.state_dict`) holds every raw sum the
figures are made from. It emits nothing.

Per tensor, with base ``B``, models ``M_k`` and deltas ``Δ_k = M_k − B`` (float64 from the float32 rows, exact):

- pass 1, per stored row, float64 sums: ``Σ B²``, ``Σ Δ_k²``, ``Σ |Δ_k|`` and ``Σ Δ_i·Δ_j`` for every pair of models;
  int64 counts: elements with ``Δ_k = 0``, elements with ``Δ_i ≠ 0`` and ``Δ_j ≠ 0``, elements where ``Δ_i·Δ_j < 0``;
  WIDEN's per-column sums ``Σ b²``, ``Σ m_k²``, ``Σ m_k·b`` (docs/widen.md: columns are the stored columns of a
  matrix, the stored rows of an embedding or a Conv1D weight, each expert's columns of stacked experts, the columns of
  a kernel's ``[out, in·∏kernel]`` view; 1-D tensors have none); and the high-16-bit histogram of every ``|Δ_k|``
  (float32) for the exact top-k selection (:mod:`streammerge.methods._select`);
- pass 2: the low-16-bit histograms inside each model's threshold bin (the exact k-th largest ``|Δ_k|``);
- pass 3: for each pair, how many elements are in both models' top k.

Passes 2 and 3 run only for the top-k overlap (two models or more, ``top_k`` > 0). A tensor that fits the budget
whole is read once for all of them, as a merge does; a larger one is streamed once per pass.

Every float sum has a fixed order, so the figures are identical for every chunking: a row's sums are one numpy
reduction over the row; column sums over stored rows go one aligned 64-row tile at a time
(:mod:`streammerge.methods._tiles`); whole-tensor totals add the per-row sums of all rows at the end.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from .._torch import torch
from ..errors import NonFiniteError
from ..methods import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask
from ..methods._select import BINS, TopK
from ..methods._tiles import TileFeeder, add_column_sums, as_rows, row_sums
from . import DEFAULT_TOP_K


def _percent(x: float) -> str | None:
    return None if 0 <= x <= 100 else "must be a percentage from 0 to 100 (0: no top-k overlap, one pass)"


def top_k_count(top_k: float, numel: int) -> int:
    """How many elements "the top ``top_k`` percent" of ``numel`` is: the nearest integer to ``top_k/100 · numel``
    (halves up, computed exactly), at least 1; 0 when ``top_k`` is 0."""
    if top_k <= 0 or numel <= 0:
        return 0
    return max(1, min(numel, math.floor(Fraction(top_k) * numel / 100 + Fraction(1, 2))))


def column_kind(rule: Rule) -> str | None:
    """What one WIDEN column of a tensor with this rule is (None: no column statistics)."""
    return {Rule.MATRIX: "stored column", Rule.CONV: "column of the [out, in·∏kernel] view",
            Rule.EMBEDDING: "stored row", Rule.CONV1D: "stored row",
            Rule.TENSOR: "column of one expert's [out, in] matrix"}.get(rule)


def column_count(task: TensorTask) -> int:
    """Number of WIDEN columns of ``task`` (0 for 1-D tensors)."""
    if task.rule in (Rule.MATRIX, Rule.CONV):
        return task.row_numel
    if task.rule in (Rule.EMBEDDING, Rule.CONV1D):
        return task.rows
    if task.rule is Rule.TENSOR:
        return task.rows * math.prod(task.shape[2:])
    return 0


class StatisticsMethod(Method):
    """The statistics of ``streammerge analyze`` for ``n_models`` models (not registered: see the module doc)."""

    name = "analyze"
    summary = "statistics of each model's changes from the base (streammerge analyze); merges nothing"
    reference = "Yu et al. 2024, arXiv:2408.03092 (WIDEN's column statistics, docs/widen.md)"
    params = (ParamSpec("top_k", float, DEFAULT_TOP_K, "percent of each tensor's elements with the largest |Δ| "
                        "whose overlap between two models is reported (0: none, one pass)", check=_percent),)
    min_models = 1
    embedding_rule = True  # token embeddings get WIDEN's embedding columns (one per token)

    def __init__(self, n_models: int = 1) -> None:
        self.n_models = n_models

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 3 if self.n_models >= 2 and params["top_k"] > 0 else 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Per block element: float64 base and deltas (8·(1 + N)), the (1 + 2N) float64 column products and one
        float64 temporary; per tensor: the per-row sums (8 per row for each of 1 + 2N + pairs), the column sums
        and the top-k histograms. Blocks that are not whole tiles stash the incomplete tile's float32 rows."""
        n, pairs = n_models, n_models * (n_models - 1) // 2
        per_element = 8 * (3 * n + 5)
        columns = column_count(task)
        state = (8 * task.rows * (1 + 2 * n + pairs) + 8 * (1 + 2 * n) * columns
                 + (2 * BINS * 8 * n if self.stat_passes(task.rule, params) > 1 else 0) + 8 * (n + 3 * pairs))
        tile_rows = min(task.rows, task.tile)
        feeds = task.rule in (Rule.MATRIX, Rule.CONV)
        partial = tile_rows * task.row_numel * (4 * (n + 1) + per_element) if feeds else 0
        return Footprint(stats_per_element=per_element, stats_state=state,
                         end_of_pass=state + 8 * (1 + 2 * n) * columns + 8 * task.rows * (1 + 2 * n + pairs),
                         partial_tile=partial, gpu_per_element=per_element + 4 * (n + 1) + 4 * (1 + 2 * n),
                         gpu_state=state + 2 * partial)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return TensorStatistics(task, n_models, params["top_k"] if self.stat_passes(task.rule, params) > 1 else 0.0)


class TensorStatistics(TensorMerge):
    """The statistics of one tensor (see the module doc). ``state_dict`` after the last pass:

    - ``sums`` float64 ``[Σ B², Σ Δ_1², …, Σ Δ_N², Σ|Δ_1|, …, Σ|Δ_N|, Σ Δ_i·Δ_j for each pair]``;
    - ``counts`` int64 ``[#(Δ_k = 0) for each k, then #(both ≠ 0), #(opposite signs) for each pair]``;
    - ``columns`` float64 (1 + 2N, n): ``Σ b², Σ m_k², Σ m_k·b`` per WIDEN column (absent for 1-D tensors);
    - ``top_k`` int64 ``[k]`` and ``overlap`` int64 per pair (absent without the top-k passes).

    Pairs are ``itertools.combinations(range(N), 2)``: (0, 1), (0, 2), …, (1, 2), …
    """

    def __init__(self, task: TensorTask, n_models: int, top_k: float) -> None:
        self.task, self.n = task, n_models
        self.pairs = list(itertools.combinations(range(n_models), 2))
        self.rule = task.rule
        self.k = top_k_count(top_k, task.numel)
        self.selections = [TopK(self.k, task.numel) for _ in range(n_models)] if self.k else []
        self.feeder = TileFeeder(task.rows, task.tile) if self.rule in (Rule.MATRIX, Rule.CONV) else None
        self._rows: torch.Tensor | None = None  # (1 + 2N + pairs, rows) float64 per-row sums
        self._counts: torch.Tensor | None = None  # (N + 2·pairs,) int64
        self._columns: torch.Tensor | None = None  # float64 column sums, in the rule's layout
        self._overlap: torch.Tensor | None = None  # (pairs,) int64

    # ---- pass 1 --------------------------------------------------------------------------------------------
    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        b, ms = as_rows(base), [as_rows(m) for m in models]  # (rows, elements per row), float32
        if pass_index == 0:
            if self._rows is None:
                self._allocate(b.device)
            if self.feeder is None:
                self._first(r0, b, ms)
            else:  # column sums over stored rows: whole aligned tiles, in row order
                for t0, (tb, *tms) in self.feeder.feed(r0, [b, *ms]):
                    self._first(t0, tb, tms)
        elif pass_index == 1:
            for sel, m in zip(self.selections, ms):
                sel.pass_b((m - b).abs_())
        else:
            factors = [sel.factor((m - b).abs_()) for sel, m in zip(self.selections, ms)]
            assert self._overlap is not None
            for p, (i, j) in enumerate(self.pairs):
                fi, fj = factors[i], factors[j]
                both = fi if fj is None else fj if fi is None else fi * fj
                self._overlap[p] += b.numel() if both is None else torch.count_nonzero(both)

    def _allocate(self, device: torch.device) -> None:
        n, p, rows = self.n, len(self.pairs), self.task.rows
        self._rows = torch.zeros((1 + 2 * n + p, rows), dtype=torch.float64, device=device)
        self._counts = torch.zeros(n + 2 * p, dtype=torch.int64, device=device)
        self._overlap = torch.zeros(p, dtype=torch.int64, device=device)
        width = (1 + 2 * n)
        if self.rule in (Rule.MATRIX, Rule.CONV):
            self._columns = torch.zeros(width * self.task.row_numel, dtype=torch.float64, device=device)
        elif self.rule in (Rule.EMBEDDING, Rule.CONV1D):
            self._columns = torch.zeros((width, rows), dtype=torch.float64, device=device)
        elif self.rule is Rule.TENSOR:
            self._columns = torch.zeros((rows, width * math.prod(self.task.shape[2:])), dtype=torch.float64,
                                        device=device)

    def _first(self, r0: int, b: torch.Tensor, ms: list[torch.Tensor]) -> None:
        """Pass 1 on rows [r0, r0 + len(b)) (whole tiles when the columns are stored columns)."""
        assert self._rows is not None and self._counts is not None
        n, rows = self.n, slice(r0, r0 + b.shape[0])
        b64 = b.to(torch.float64)
        m64s = [m.to(torch.float64) for m in ms]
        if self._columns is not None:
            self._column_sums(r0, b64, m64s)
        self._rows[0, rows] = row_sums(b64 * b64)
        deltas = [m64.sub_(b64) for m64 in m64s]  # Δ in place, exact: float32 values differ exactly in float64
        for k, d in enumerate(deltas):
            self._rows[1 + k, rows] = row_sums(d * d)
            self._rows[1 + n + k, rows] = row_sums(d.abs())
            self._counts[k] += d.numel() - torch.count_nonzero(d)
        for p, (i, j) in enumerate(self.pairs):
            # float64: a product of two nonzero float32 differences is never 0, so its sign and zeroness are exact
            prod = deltas[i] * deltas[j]
            self._rows[1 + 2 * n + p, rows] = row_sums(prod)
            self._counts[n + 2 * p] += torch.count_nonzero(prod)
            self._counts[n + 2 * p + 1] += torch.count_nonzero(prod < 0)
            del prod
        del deltas, m64s
        for sel, m in zip(self.selections, ms):
            sel.pass_a((m - b).abs_())

    def _column_sums(self, r0: int, b64: torch.Tensor, m64s: list[torch.Tensor]) -> None:
        """Add WIDEN's column sums ``[Σ b², Σ m_k², Σ m_k·b]`` of these rows (float64 products of float32 values
        are exact)."""
        assert self._columns is not None
        rows = b64.shape[0]
        if self.rule is Rule.TENSOR:  # every expert is whole in its row: its column sums, one tile at a time
            shape = (rows, self.task.shape[1], -1)
            vals = _products(b64.reshape(shape), [m.reshape(shape) for m in m64s])
            for e in range(rows):
                add_column_sums(self._columns[r0 + e], vals[e], self.task.tile)
            return
        vals = _products(b64, m64s)  # (rows, 1 + 2N, elements per row)
        if self.rule in (Rule.EMBEDDING, Rule.CONV1D):  # one column per stored row: complete inside the row
            self._columns[:, r0 : r0 + rows] = row_sums(vals).T
        else:
            add_column_sums(self._columns, vals, self.task.tile)

    # ---- between passes ------------------------------------------------------------------------------------
    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            if self._rows is None:  # a tensor with no rows is never analyzed; keep the shapes consistent anyway
                self._allocate(torch.device("cpu"))
            self._check_finite()
            for sel in self.selections:
                sel.end_a()
        elif pass_index == 1:
            for sel in self.selections:
                sel.end_b()

    def _check_finite(self) -> None:
        """NaN or infinity in an input makes its row sums non-finite: name the input and the first such row."""
        assert self._rows is not None
        finite = torch.isfinite(self._rows[: 1 + self.n]).cpu()
        if bool(finite.all()):
            return
        who = int((~finite.all(dim=1)).nonzero()[0, 0])
        row = int((~finite[who]).nonzero()[0, 0])
        what = "the base" if who == 0 else f"model {who}"
        raise NonFiniteError(f"tensor {self.task.name} of {what} contains NaN or infinity (first in row {row}); "
                             "analyze needs finite weights: fix that input, or leave the tensor out with --exclude",
                             self.task.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self._rows is not None and self._counts is not None and self._overlap is not None
        per_row = self._rows.cpu().numpy()
        state = {"sums": torch.from_numpy(np.add.reduce(per_row, axis=1)),  # one fixed-order sum per statistic
                 "counts": self._counts.cpu()}
        if self._columns is not None:
            cols = self._columns.cpu()
            width = 1 + 2 * self.n
            if self.rule in (Rule.MATRIX, Rule.CONV):
                cols = cols.reshape(width, -1)
            elif self.rule is Rule.TENSOR:  # (experts, width·in) → (width, experts·in)
                cols = cols.reshape(cols.shape[0], width, -1).permute(1, 0, 2).reshape(width, -1)
            state["columns"] = cols.contiguous()
        if self.k:
            state["top_k"] = torch.tensor([self.k], dtype=torch.int64)
            state["overlap"] = self._overlap.cpu()
        return state


def _products(b64: torch.Tensor, m64s: Sequence[torch.Tensor]) -> torch.Tensor:
    """(..., 1 + 2N, cols) float64 ``[b², m_1², …, m_N², m_1·b, …, m_N·b]`` from float64 (..., cols) rows."""
    n = len(m64s)
    vals = torch.empty((*b64.shape[:-1], 1 + 2 * n, b64.shape[-1]), dtype=torch.float64, device=b64.device)
    torch.mul(b64, b64, out=vals.select(-2, 0))
    for k, m in enumerate(m64s):
        torch.mul(m, m, out=vals.select(-2, 1 + k))
        torch.mul(m, b64, out=vals.select(-2, 1 + n + k))
    return vals
