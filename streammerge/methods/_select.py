"""Exact top-k selection over a tensor streamed in row chunks (radix select on float bits, two passes).

Elements are ordered by ``|x|`` descending, ties broken by flat index ascending; "the top k" are the first k in
that order, exactly k of them. Non-negative float32 values order like their int32 bit patterns, so:

- pass A histograms the high 16 bits of every ``|x|`` and finds the bin holding the k-th element;
- pass B histograms the low 16 bits of the elements in that bin, which pins the k-th value ``tau`` exactly and
  how many elements equal to ``tau`` belong to the top k;
- the emit pass keeps ``|x| > tau`` and the first ``ties`` elements equal to ``tau`` in flat-index order, which a
  pass in row order can count.

The fused kernels usually spare pass B (:meth:`TopK.choose_window`, :meth:`TopK.collect_args`): from the first
block's histogram, pass A guesses a window of bins around the k-th element and keeps the bits of the elements in it
whose low 16 bits are not zero (few: the difference of two bfloat16 weights of one binade has at most 8 significant
bits, so its low half is zero). If the target bin lies in the window, its elements are those candidates and the
rest of its count, whose low bits are zero, which pins tau and ties as pass B would, without reading the tensor
again (:meth:`TopK._settle`). Otherwise (or when the candidates outgrow their buffer, or a block was counted
eagerly) pass B runs as above. Either way the same tau and ties.

Memory: two 65 536-bin int64 histograms per target, whatever the tensor size; with the kernels, a candidate buffer
of at most one element in :data:`CANDIDATE_SHARE` (:meth:`TopK.candidate_bytes`), which each block's candidates join
from a scratch buffer of the block's size (:meth:`TopK.scratch_size`; only the few candidates are written into it),
so blocks counted by several threads at once (``streammerge.workers``) each keep their own.
"""

from __future__ import annotations

import numpy as np

from .._torch import torch

BINS = 1 << 16
#: pass B's candidates (:meth:`TopK.collect_args`) are kept for about one element of the tensor in this many (and
#: :data:`CANDIDATE_SLACK` more); a collection that would keep more stops, and pass B runs
CANDIDATE_SHARE = 32
#: the window of candidates spans the bins of the first block's elements ranked within this share of it either side
#: of the k-th (and one bin more each side)
WINDOW_SHARE = 0.02
#: the room a kernel step may write past a candidate buffer's fill (``kernels._numba.STEP``)
CANDIDATE_SLACK = 1024
#: a window's buffer when it keeps no candidates
NO_CANDIDATES = np.empty(0, dtype=np.uint32)


def _bits(absx: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative float32 values (monotone in the value)."""
    return absx.contiguous().view(torch.int32)


def _top_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """For a histogram of counts (BINS int64, any device) and 1 <= k <= its total: the highest bin ``b`` with at
    least ``k`` elements at or above it, and how many elements lie above ``b``. numpy on the CPU (a few tens of
    microseconds, where torch's flip, cumsum and nonzero took half a millisecond per selection)."""
    return _bin_of_rank(np.cumsum(hist.cpu().numpy()), k)


def _bin_of_rank(below: np.ndarray, k: int) -> tuple[int, int]:
    """:func:`_top_bin` from the running sums of a histogram (``below[b]``: elements in bins <= b): the highest
    ``b`` whose bins at or above hold ``k``, i.e. whose bins below hold at most ``total − k`` (a forward cumsum: the
    reversed one took four times as long)."""
    total = int(below[-1])
    b = int(np.searchsorted(below, total - k, side="right"))
    return b, total - int(below[b])


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
        # pass B's candidates (:meth:`collect_args`): the window (first bin, bins), None until the first block chose it
        self.window: tuple[int, int] | None = None
        self._candidates: np.ndarray | None = None
        self.filled = 0  # candidates kept; -1 once the collection stopped (pass B will run)
        self._counted = 0  # elements counted into the candidates' window
        self.early = False  # tau and ties found at the end of pass A, from the candidates (pass B not needed)

    @property
    def trivial(self) -> bool:
        """k = 0 (keep nothing) or k = numel (keep everything): no passes needed."""
        return self.k == 0 or self.k == self.numel

    def pass_a(self, absx: torch.Tensor) -> None:
        if not self.trivial:
            self.stop_collecting()  # counted eagerly: no candidates from these elements
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
        self.early = self._settle()
        self._hist_hi = torch.zeros(0, dtype=torch.int64)
        self._candidates = None

    def pass_b(self, absx: torch.Tensor) -> None:
        if not self.trivial and not self.early:
            # low bits + 1 of the elements in the target bin land in bins 1..BINS; everything else in 0 or BINS + 1
            # (integer arithmetic on every element is much faster than gathering the few in the bin)
            key = (_bits(absx).reshape(-1) - ((self._bin << 16) - 1)).clamp_(0, BINS + 1)
            counts = torch.bincount(key, minlength=BINS + 2)[1 : BINS + 1]
            if self._hist_lo is None:
                self._hist_lo = counts.clone()
            else:
                self._hist_lo += counts

    def end_b(self) -> None:
        if self.trivial or self.early:
            return
        if self._hist_lo is None:
            self._hist_lo = torch.zeros(BINS, dtype=torch.int64)
        need = self.k - self._above_bin  # elements to take from the target bin, >= 1
        lo, above = _top_bin(self._hist_lo, need)
        self.tau_bits = (self._bin << 16) | lo
        self.ties = need - above
        self._hist_lo = torch.zeros(0, dtype=torch.int64)

    # ---- pass B's candidates, kept by pass A's kernel (``kernels._numba.histogram_high``) ---------------------------
    @staticmethod
    def candidate_bytes(numel: int) -> int:
        """Bytes of one TopK's candidate buffer for a tensor of ``numel`` elements (allocated, touched as filled)."""
        return 4 * (numel // CANDIDATE_SHARE + CANDIDATE_SLACK)

    @property
    def collecting(self) -> bool:
        """The candidates are complete so far: every block of pass A went through the kernel, within the buffer."""
        return self.window is not None and self.window[1] > 0 and self.filled >= 0

    def stop_collecting(self) -> None:
        """Give up the candidates (a block counted eagerly, or too many): pass B runs."""
        self.window, self.filled, self._candidates = (0, 0), -1, None

    def choose_window(self, hist: np.ndarray) -> None:
        """From pass A's counts of the first block (65 536 int64), the window of bins to keep candidates from: the
        bins of the elements ranked within :data:`WINDOW_SHARE` of the block either side of the k-th (in the
        tensor's proportion), and one more each side."""
        below = np.cumsum(hist)
        total = int(below[-1])
        if self.trivial or total == 0:
            self.stop_collecting()
            return
        share = self.k / self.numel
        top, _ = _bin_of_rank(below, min(max(int((share - WINDOW_SHARE) * total), 1), total))
        bottom, _ = _bin_of_rank(below, min(max(int((share + WINDOW_SHARE) * total), 1), total))
        top, bottom = min(top + 1, BINS - 1), max(bottom - 1, 0)
        self.window = (bottom, top - bottom + 1)
        self._candidates = np.empty(self.numel // CANDIDATE_SHARE + CANDIDATE_SLACK, dtype=np.uint32)
        self.filled, self._counted = 0, 0

    def collect_args(self) -> tuple[int, int]:
        """(first bin, bins) of the window for the kernel, which keeps a block's candidates in a scratch buffer of
        the block's size (:meth:`scratch_size`); no window (0, 0) when not collecting."""
        if not self.collecting:
            return 0, 0
        assert self.window is not None
        return self.window

    @staticmethod
    def scratch_size(elements: int) -> int:
        """uint32 elements of a scratch buffer that keeps any block of ``elements`` elements' candidates (the
        kernel wants room for a whole step past its fill: ``kernels._numba.STEP``)."""
        return elements + CANDIDATE_SLACK

    def collected(self, found: np.ndarray, elements: int) -> None:
        """After the kernel counted a block of ``elements`` more: the candidates it found (uint32 bits, any order:
        :meth:`_settle` sorts them) join the others, from any thread, one call at a time. A collection that would
        outgrow its buffer stops, and so does one on course to after the first block (a float32 model's deltas,
        whose low bits are rarely zero)."""
        if not self.collecting:
            return
        assert self._candidates is not None
        first = self._counted == 0
        self._counted += elements
        n = len(found)
        if self.filled + n > len(self._candidates) or (
                first and n * self.numel > 0.75 * (self.numel // CANDIDATE_SHARE) * elements):
            self.stop_collecting()
        else:
            self._candidates[self.filled : self.filled + n] = found
            self.filled += n

    def _settle(self) -> bool:
        """At the end of pass A, when the candidates cover the target bin: tau and ties as pass B would find them.
        The bin's elements are its candidates (low bits not zero) and the rest, whose low bits are zero; the
        ``need``-th largest of them is tau's low half."""
        if not self.collecting or self._counted != self.numel or self._hist_hi is None:
            return False
        assert self.window is not None and self._candidates is not None
        lo, bins = self.window
        if not lo <= self._bin < lo + bins:
            return False
        kept = self._candidates[: self.filled]
        lows = kept[(kept >> np.uint32(16)) == np.uint32(self._bin)]  # (temporaries: 5 bytes per candidate)
        lows &= np.uint32(0xFFFF)
        lows.sort()  # ascending
        need = self.k - self._above_bin  # elements to take from the target bin, >= 1
        low = int(lows[len(lows) - need]) if need <= len(lows) else 0
        above = len(lows) - int(np.searchsorted(lows, low, side="right"))
        self.tau_bits = (self._bin << 16) | low
        self.ties = need - above
        return True

    # ---- the fused kernels' view (streammerge.kernels._numba: histogram_high, histogram_low, sparse_merge) ----------
    def high_counts(self) -> torch.Tensor:
        """Pass A's histogram (65 536 int64 counts, CPU) for a kernel to add a block's counts to (as :meth:`pass_a`
        does); only when not trivial."""
        if self._hist_hi is None:
            self._hist_hi = torch.zeros(BINS, dtype=torch.int64)
        return self._hist_hi

    @property
    def target_bin(self) -> int:
        """Pass B's target bin (the high 16 bits of tau), found at the end of pass A."""
        return self._bin

    def low_counts(self) -> tuple[int, torch.Tensor]:
        """Pass B's target bin and histogram, for a kernel to add a block's counts to (as :meth:`pass_b` does)."""
        if self._hist_lo is None:
            self._hist_lo = torch.zeros(BINS, dtype=torch.int64)
        return self._bin, self._hist_lo

    def kernel_spec(self, seen: int | None = None) -> tuple[int, int]:
        """(tau, ties still to keep) for the next block in row order, what :meth:`factor` keeps: ``|x|`` (int32 bits)
        above tau, and the first ``ties − seen`` elements equal to it (``seen``: the cursor at the block's start,
        by default :attr:`seen_ties`); tau is -1 to keep every element and 2^31 to keep none (no bit pattern equals
        either)."""
        if self.k == self.numel:
            return -1, 0
        if self.k == 0:
            return 1 << 31, 0
        assert self.tau_bits is not None, "kernel_spec() before passes A and B"
        return self.tau_bits, max(0, self.ties - (self.seen_ties if seen is None else seen))

    @property
    def open_ties(self) -> bool:
        """Whether elements equal to tau are still to be kept: what a block keeps depends on the ties met before
        it (else every later element equal to tau is dropped, whatever came before)."""
        return self.k not in (0, self.numel) and self.seen_ties < self.ties

    def advanced(self, seen: int, met: int) -> int:
        """The cursor after a block that met ``met`` elements equal to tau, from ``seen`` (counting stops once
        ``ties`` are kept: later values only need to stay at or above it)."""
        return seen + met if self.k not in (0, self.numel) and seen < self.ties else seen

    def met_ties(self, met: int) -> None:
        """After a fused block that met ``met`` elements equal to tau: the cursor :meth:`factor` would leave."""
        self.seen_ties = self.advanced(self.seen_ties, met)

    def export(self) -> list[int]:
        """[k, tau_bits, ties] after pass B (tau_bits -1 when trivial), to journal."""
        return [self.k, -1 if self.tau_bits is None else self.tau_bits, self.ties]

    def restore(self, exported: list[int]) -> None:
        k, tau, ties = exported
        if k != self.k:
            raise ValueError(f"journaled selection keeps {k} elements, this run {self.k}")
        self.tau_bits = None if tau < 0 else tau
        self.ties = ties

    def factor(self, absx: torch.Tensor, seen: int | None = None) -> torch.Tensor | None:
        """float32 keep factor (1 kept, 0 dropped) for the next chunk in row order, same shape as ``absx``; None
        when every element is kept. A factor to multiply by: float arithmetic, no boolean masks (slow on CPU).
        ``seen``: the tie cursor at the chunk's start, for a block computed out of order (:attr:`seen_ties` is then
        left as it is); by default :attr:`seen_ties`, advanced past the chunk."""
        if self.k == self.numel:
            return None
        if self.k == 0:
            return torch.zeros(absx.shape, dtype=torch.float32, device=absx.device)
        assert self.tau_bits is not None, "factor() before passes A and B"
        bits = _bits(absx)
        keep = (bits - self.tau_bits).clamp_(0, 1)  # 1 iff bits > tau (NaN bits too: NaN stays visible)
        start = self.seen_ties if seen is None else seen
        if start < self.ties:  # once enough ties are kept, later equal elements are simply dropped
            flat = bits.reshape(-1)
            if flat.device.type == "cpu":  # flat positions of the ties, in index order
                at = torch.from_numpy(np.flatnonzero(flat.numpy() == self.tau_bits))
            else:
                at = (flat == self.tau_bits).nonzero().squeeze(1)
            keep.view(-1)[at[: self.ties - start]] = 1
            if seen is None:
                self.seen_ties += len(at)
        return keep.to(torch.float32)
