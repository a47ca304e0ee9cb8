"""Arcee Fusion (mergekit 0.1.5 ``merge_methods/arcee_fusion.py``; https://arcee.ai): keep the model's change from
the base only where it is important. For base ``B`` and model ``M`` (float32), per row of the last dimension
(a stored row of a matrix, of each expert, of each kernel position; a vector is one row, a scalar one row of one)::

    p = softmax(M_row) + 1e-8,  q = softmax(B_row) + 1e-8,  KL_row = Σ p·log(p/q)
    importance = |M − B| · KL_row                      (float32; may be slightly negative where p ≈ q)
    threshold  = median + 1.5·(q3 − q1)               (quartiles of importance over the whole tensor)
    result     = B + (M − B)·[importance ≥ threshold]

A quantile is the sorted element at index ``floor(q·(n−1))``, as mergekit indexes it. Differences from mergekit, by
design: the quartiles are exact at every size (mergekit sorts a sample of 10⁶ elements drawn with replacement above
10⁶ elements, so its result is random there), found by radix select over the float bits in two statistics passes
(:mod:`._quantile`); ``KL_row`` is summed in float64 in a fixed order and rounded to float32 (mergekit sums in
float32 with torch's reduction, whose order changes with the thread count and the rows alongside), so importances
can differ from mergekit's by float32 rounding and an element within that of the threshold can be kept by one and
not the other. ``KL_row`` is computed once, in the first statistics pass, kept per row (4 bytes per row) and reused
by the second pass and the merge (and journaled), so every pass sees the same importance bits. The softmax is torch's
on the CPU (one kernel per row, mergekit's values exactly) and on other devices ``exp(x − max) / Σ`` with the same
fixed-order sum, so a row's values never depend on the chunk around it.

With the fused kernels (:mod:`streammerge.kernels`; ``kernels/_numba_fusion.py``) each pass is one loop over the
stored rows with the same bytes: the first statistics pass still computes ``KL_row`` with torch (on float32 copies
of the block), then the importance, its order keys and the pass-A histogram in one kernel; the second the importance
and the pass-B histograms; the merge the importance, the mask, ``B + (M − B)·mask`` and the cast to the output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import kernels
from .._torch import torch
from . import register
from ._quantile import HISTOGRAM_BYTES, OrderStatistics
from ._tiles import row_sums
from .base import Footprint, Method, Rule, TensorMerge, TensorTask

#: mergekit's floor added to both distributions before the KL divergence
EPS = 1e-8


def quartile_ranks(n: int) -> list[int]:
    """0-based ranks of q1, the median and q3 among ``n`` values: ``floor(q·(n − 1))`` (exact integers)."""
    return [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]


def fusion_threshold(q1: float, median: float, q3: float) -> float:
    """``median + 1.5·(q3 − q1)`` in float32 operations, as mergekit computes it (a float32 value)."""
    q1_, med_, q3_ = torch.tensor([q1, median, q3], dtype=torch.float32).unbind()
    return float(med_ + 1.5 * (q3_ - q1_))


def softmax_rows(x: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Softmax over the last dim of (rows, width) float32; each row's values depend on that row alone. ``fused``
    (default: on the CPU) uses torch's kernel, which computes each row in one vectorised pass of its own; otherwise
    ``exp(x − max)`` divided by its fixed-order float64 sum (:func:`row_sums`) rounded to float32."""
    if x.device.type == "cpu" if fused is None else fused:
        return torch.softmax(x, dim=-1)
    e = (x - x.amax(dim=-1, keepdim=True)).exp_()
    return e.div_(row_sums(e).to(torch.float32).unsqueeze(-1))


def row_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """(rows,) float32 ``Σ p·log(p/q)`` per row of (rows, width) float32, ``p``/``q`` the softmaxes plus EPS."""
    p = softmax_rows(model).add_(EPS)
    q = softmax_rows(base).add_(EPS)
    terms = torch.div(p, q, out=q).log_().mul_(p)
    del p
    return row_sums(terms).to(torch.float32)


def as_softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """View a chunk as (rows of the last dim, width); a 0-D tensor is one row of one element."""
    return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)


class _FusionMerge(TensorMerge):
    def __init__(self, task: TensorTask) -> None:
        self.name, self.shape, n = task.name, task.shape, task.numel
        self.width = width = self.shape[-1] if self.shape else 1  # elements of a softmax row
        self.n_rows = n // width if width else 0  # softmax rows in the whole tensor
        # softmax rows per stored row; a vector is one softmax row, so it must arrive whole (the planner's VECTOR rule)
        self.per_stored_row = task.row_numel // width if len(self.shape) >= 2 and width else 0
        self.select = OrderStatistics(quartile_ranks(n), n) if n else None
        self.kl: torch.Tensor | None = None  # (n_rows,) float32, from pass 0
        self.threshold = 0.0

    def _kl_rows(self, r0: int, base: torch.Tensor) -> slice:
        if len(self.shape) < 2 and base.numel() != (self.shape[0] if self.shape else 1):
            raise RuntimeError(f"arcee_fusion: tensor {self.name}: a vector's softmax needs it whole, got rows "
                               f"[{r0}, {r0 + base.shape[0]}) of {self.shape[0]}")
        start = r0 * self.per_stored_row
        return slice(start, start + as_softmax_rows(base).shape[0])

    def _store_kl(self, r0: int, base: torch.Tensor, model: torch.Tensor) -> slice:
        """Pass 0: compute and keep ``KL_row`` of the block's softmax rows (float32 ``base``/``model``); returns their
        slice of the cached KL."""
        if self.kl is None:
            self.kl = torch.empty(self.n_rows, dtype=torch.float32, device=base.device)
        rows = self._kl_rows(r0, base)
        self.kl[rows] = row_kl(as_softmax_rows(model), as_softmax_rows(base))
        return rows

    def _importance(self, r0: int, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """|M − B|·KL_row as a new (rows, width) float32 tensor, from ``delta`` = M − B and the cached KL."""
        assert self.kl is not None, "importance before the first statistics pass"
        if self.kl.device != base.device:  # loaded from the journal onto the CPU
            self.kl = self.kl.to(base.device)
        kl = self.kl[self._kl_rows(r0, base)]
        return as_softmax_rows(delta).abs().mul_(kl.unsqueeze(-1))

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        if self.select is None:
            return
        if pass_index == 0:
            self._store_kl(r0, base, models[0])
        importance = self._importance(r0, base, torch.sub(models[0], base))
        (self.select.pass_a if pass_index == 0 else self.select.pass_b)(importance)

    # ---- fused kernels (streammerge.kernels._numba_fusion): the same bytes as accumulate/emit and the engine's cast -
    def _raw_arrays(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor],
                    out: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, slice] | None:
        """(base, model, out) as a kernel's arrays and the block's slice of the KL rows; None when they are not a
        kernel's arrays or the statistics are not on the CPU."""
        got = kernels.arrays(base, models, out)
        if got is None or (self.kl is not None and self.kl.device.type != "cpu") \
                or (self.select is not None and not self.select.on_cpu()):
            return None
        b, (m,), o = got
        return b, m, o, self._kl_rows(r0, base)

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` with the importance, its order keys and their histogram in one kernel over the stored
        rows, adding to ``select``'s own histograms: pass 0 ``row_kl`` (torch, on float32 copies of the block, as
        the eager path) then ``fusion_high``; pass 1 ``fusion_low`` (the cached KL alone)."""
        if self.select is None:
            return True
        got = self._raw_arrays(r0, base, models)
        if got is None or (pass_index > 0 and self.kl is None):
            return False
        b, m, _, rows = got
        k = kernels.kernels()
        if pass_index == 0:
            self._store_kl(r0, base.float(), models[0].float())
            k.fusion_high(b, m, self.kl[rows].numpy(), self.width, self.select.high_counts().numpy())
        else:
            assert self.kl is not None
            targets, hists = self.select.low_counts()  # fusion_low takes three places: -1 for none, a repeat
            bins = np.array(targets + [-1] * (3 - len(targets)), dtype=np.int64)
            h = [x.numpy() for x in hists]
            k.fusion_low(b, m, self.kl[rows].numpy(), self.width, bins, h[0], h[min(1, len(h) - 1)], h[-1])
        return True

    def end_pass(self, pass_index: int) -> None:
        if self.select is None:
            return
        if pass_index == 0:
            self.select.end_a()
        else:
            self.select.end_b()
            self.threshold = fusion_threshold(*self.select.values)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"threshold": torch.tensor([self.threshold], dtype=torch.float32)}
        if self.select is not None and self.kl is not None:
            state["kl"] = self.kl
            state["quartiles"] = torch.tensor(self.select.export(), dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.threshold = float(state["threshold"][0])
        if self.select is not None:
            if state["kl"].shape != (self.n_rows,):
                raise ValueError(f"journaled KL has shape {tuple(state['kl'].shape)}, expected ({self.n_rows},)")
            self.kl = state["kl"]
            self.select.restore(state["quartiles"].tolist())

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.select is None:  # no elements
            return base
        delta = torch.sub(models[0], base)
        keep = self._importance(r0, base, delta).ge_(self.threshold)  # 1.0 kept, 0.0 not (NaN: not)
        return delta.mul_(keep.reshape(delta.shape)).add_(base)  # B + (M − B)·mask

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass (``fusion_emit``) from the cached KL and the threshold."""
        if self.select is None:
            return None
        got = self._raw_arrays(r0, base, models, out)
        if got is None or self.kl is None:
            return None
        b, m, o, rows = got
        threshold = kernels.f32([self.threshold])[0]
        return int(kernels.kernels().fusion_emit(b, m, self.kl[rows].numpy(), self.width, threshold, o))


@register
class ArceeFusion(Method):
    name = "arcee_fusion"
    summary = ("Keeps the model's change from the base only where its importance |M−B|·KL(softmax(M)‖softmax(B)) "
               "per row reaches median + 1.5·IQR over the tensor (exact quartiles).")
    reference = "Arcee Fusion, https://arcee.ai (mergekit 0.1.5 merge_methods/arcee_fusion.py)"
    passes = "3 (per-row KL and the high bits of the importance, their low bits: exact quartiles; then merge)"
    min_models = 1
    max_models = 1

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 2

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Measured with bench/ram_probe.py. Statistics: both softmaxes (8), then the importance with its keys and
        their high and low halves (pass B: 16). Merge: the importance (the mask) and the delta (8). State: the
        per-row KL (4 bytes per row of the last dimension) and the histograms: pass B keeps one per distinct quartile
        bin (three at most) and counts into a bincount of one more (four), beside a 65 536-entry int32 table (seven
        histograms' worth, measured). The fused kernels need less (measured): the first statistics pass makes the
        float32 copies of the block itself (in place of the runner's) and both softmaxes, 16 bytes per element in
        all; the second pass and the merge no per-element scratch; pass B counts into its histograms alone."""
        width = task.shape[-1] if task.shape else 1
        kl = 4 * (task.numel // width if width else 0)
        histograms = 7 * HISTOGRAM_BYTES
        return Footprint(
            stats_per_element=16,
            emit_per_element=8,
            stats_state=kl + histograms,
            emit_state=kl,
            end_of_pass=kl + histograms,
            gpu_per_element=8 + 24,  # the copies, a softmax with its float64 tree-sum scratch beside the other
            gpu_state=kl + histograms,
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _FusionMerge(task)
