"""Exact top-k selection over a tensor streamed in row chunks (radix select on float bits, two passes).

Elements are ordered by ``|x|`` descending, ties broken by flat index ascending; "the top k" are the first k in
that order, exactly k of them. Non-negative float32 values order like their int32 bit patterns, so:

- pass A histograms the high 16 bits of every ``|x|`` and finds the bin holding the k-th element;
- pass B histograms the low 16 bits of the elements in that bin, which pins the k-th value ``tau`` exactly and
  how many elements equal to ``tau`` belong to the top k;
- the emit pass keeps ``|x| > tau`` and the first ``ties`` elements equal to ``tau`` in flat-index order, which a
  pass in row order can count.

Memory: two 65 536-bin int64 histograms per target, whatever the tensor size.
"""

from __future__ import annotations

import numpy as np

from .._torch import torch

BINS = 1 << 16


def _bits(absx: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative float32 values (monotone in the value)."""
    return absx.contiguous().view(torch.int32)


def _top_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """For a histogram of counts (BINS int64, any device) and 1 <= k <= its total: the highest bin ``b`` with at
    least ``k`` elements at or above it, and how many elements lie above ``b``. numpy on the CPU (a few tens of
    microseconds, where torch's flip, cumsum and nonzero took half a millisecond per selection)."""
    from_top = np.cumsum(hist.cpu().numpy()[::-1])  # from_top[j]: elements in bins >= BINS - 1 - j
    j = int(np.searchsorted(from_top, k, side="left"))  # the first j holding k (from_top never decreases)
    return BINS - 1 - j, int(from_top[j - 1]) if j else 0


class TopK:
    """Streams one model's ``|Δ|`` through passes A and B to find the threshold for keeping exactly ``k``."""

    def __init__(self, k: int, numel: int) -> None:
        self.k = max(0, min(k, numel))
        self.numel = numel
        self.tau_bits: int | None = None  # threshold bit pattern, after pass B
        self.ties = 0  # how many elements equal to tau are kept
        self._hist_hi: torch.Tensor | None = None  # allocated by the first chunk (never for a trivial k)
        self._hist_lo: torch.Tensor | None = None
        self._bin = -1
        self._above_bin = 0  # elements whose high bits exceed the target bin
        self.seen_ties = 0  # emit cursor: elements equal to tau met so far (counting stops at ``ties``)

    @property
    def trivial(self) -> bool:
        """k = 0 (keep nothing) or k = numel (keep everything): no passes needed."""
        return self.k == 0 or self.k == self.numel

    def pass_a(self, absx: torch.Tensor) -> None:
        if not self.trivial:
            counts = torch.bincount((_bits(absx) >> 16).reshape(-1), minlength=BINS)
            if self._hist_hi is None:
                self._hist_hi = counts
            else:
                self._hist_hi += counts

    def share_high(self, other: TopK) -> None:
        """Take pass A's histogram from ``other``, which counted the same ``|Δ|`` (the two TopKs of one selection,
        which then count it once): a copy of its counts, called before ``other.end_a``."""
        if not self.trivial:
            self._hist_hi = None if other._hist_hi is None else other._hist_hi.clone()

    def end_a(self) -> None:
        if self.trivial:
            return
        if self._hist_hi is None:
            self._hist_hi = torch.zeros(BINS, dtype=torch.int64)
        self._bin, self._above_bin = _top_bin(self._hist_hi, self.k)
        self._hist_hi = torch.zeros(0, dtype=torch.int64)

    def pass_b(self, absx: torch.Tensor) -> None:
        if not self.trivial:
            # low bits + 1 of the elements in the target bin land in bins 1..BINS; everything else in 0 or BINS + 1
            # (integer arithmetic on every element is much faster than gathering the few in the bin)
            key = (_bits(absx).reshape(-1) - ((self._bin << 16) - 1)).clamp_(0, BINS + 1)
            counts = torch.bincount(key, minlength=BINS + 2)[1 : BINS + 1]
            if self._hist_lo is None:
                self._hist_lo = counts.clone()
            else:
                self._hist_lo += counts

    def end_b(self) -> None:
        if self.trivial:
            return
        if self._hist_lo is None:
            self._hist_lo = torch.zeros(BINS, dtype=torch.int64)
        need = self.k - self._above_bin  # elements to take from the target bin, >= 1
        lo, above = _top_bin(self._hist_lo, need)
        self.tau_bits = (self._bin << 16) | lo
        self.ties = need - above
        self._hist_lo = torch.zeros(0, dtype=torch.int64)

    # ---- the fused kernels' view (streammerge.kernels._numba: histogram_high, histogram_low, sparse_merge) ----------
    def high_counts(self) -> torch.Tensor:
        """Pass A's histogram (65 536 int64 counts, CPU) for a kernel to add a block's counts to (as :meth:`pass_a`
        does); only when not trivial."""
        if self._hist_hi is None:
            self._hist_hi = torch.zeros(BINS, dtype=torch.int64)
        return self._hist_hi

    def low_counts(self) -> tuple[int, torch.Tensor]:
        """Pass B's target bin and histogram, for a kernel to add a block's counts to (as :meth:`pass_b` does)."""
        if self._hist_lo is None:
            self._hist_lo = torch.zeros(BINS, dtype=torch.int64)
        return self._bin, self._hist_lo

    def kernel_spec(self) -> tuple[int, int]:
        """(tau, ties still to keep) for the next block in row order, what :meth:`factor` keeps: ``|x|`` (int32 bits)
        above tau, and the first ``ties − seen_ties`` elements equal to it; tau is -1 to keep every element and
        2^31 to keep none (no bit pattern equals either)."""
        if self.k == self.numel:
            return -1, 0
        if self.k == 0:
            return 1 << 31, 0
        assert self.tau_bits is not None, "kernel_spec() before passes A and B"
        return self.tau_bits, max(0, self.ties - self.seen_ties)

    def met_ties(self, met: int) -> None:
        """After a fused block that met ``met`` elements equal to tau: the cursor :meth:`factor` would leave."""
        if self.k not in (0, self.numel) and self.seen_ties < self.ties:
            self.seen_ties += met

    def export(self) -> list[int]:
        """[k, tau_bits, ties] after pass B (tau_bits -1 when trivial), to journal."""
        return [self.k, -1 if self.tau_bits is None else self.tau_bits, self.ties]

    def restore(self, exported: list[int]) -> None:
        k, tau, ties = exported
        if k != self.k:
            raise ValueError(f"journaled selection keeps {k} elements, this run {self.k}")
        self.tau_bits = None if tau < 0 else tau
        self.ties = ties

    def factor(self, absx: torch.Tensor) -> torch.Tensor | None:
        """float32 keep factor (1 kept, 0 dropped) for the next chunk in row order, same shape as ``absx``; None
        when every element is kept. A factor to multiply by: float arithmetic, no boolean masks (slow on CPU)."""
        if self.k == self.numel:
            return None
        if self.k == 0:
            return torch.zeros(absx.shape, dtype=torch.float32, device=absx.device)
        assert self.tau_bits is not None, "factor() before passes A and B"
        bits = _bits(absx)
        keep = (bits - self.tau_bits).clamp_(0, 1)  # 1 iff bits > tau (NaN bits too: NaN stays visible)
        if self.seen_ties < self.ties:  # once enough ties are kept, later equal elements are simply dropped
            flat = bits.reshape(-1)
            if flat.device.type == "cpu":  # flat positions of the ties, in index order
                at = torch.from_numpy(np.flatnonzero(flat.numpy() == self.tau_bits))
            else:
                at = (flat == self.tau_bits).nonzero().squeeze(1)
            keep.view(-1)[at[: self.ties - self.seen_ties]] = 1
            self.seen_ties += len(at)
        return keep.to(torch.float32)
