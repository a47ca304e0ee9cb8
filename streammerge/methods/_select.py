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

import torch

BINS = 1 << 16


def _bits(absx: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative float32 values (monotone in the value)."""
    return absx.contiguous().view(torch.int32)


class TopK:
    """Streams one model's ``|Δ|`` through passes A and B to find the threshold for keeping exactly ``k``."""

    def __init__(self, k: int, numel: int) -> None:
        self.k = max(0, min(k, numel))
        self.numel = numel
        self.tau_bits: int | None = None  # threshold bit pattern, after pass B
        self.ties = 0  # how many elements equal to tau are kept
        self._hist_hi = torch.zeros(BINS, dtype=torch.int64)
        self._hist_lo = torch.zeros(BINS, dtype=torch.int64)
        self._bin = -1
        self._above_bin = 0  # elements whose high bits exceed the target bin
        self._seen_ties = 0  # during emit: elements equal to tau met so far (counting stops at ``ties``)

    @property
    def trivial(self) -> bool:
        """k = 0 (keep nothing) or k = numel (keep everything): no passes needed."""
        return self.k == 0 or self.k == self.numel

    def pass_a(self, absx: torch.Tensor) -> None:
        if not self.trivial:
            self._hist_hi += torch.bincount((_bits(absx) >> 16).reshape(-1), minlength=BINS)

    def end_a(self) -> None:
        if self.trivial:
            return
        # counts of elements with high bits >= b, for every b (suffix sums)
        at_or_above = self._hist_hi.flip(0).cumsum(0).flip(0)
        self._bin = int((at_or_above >= self.k).nonzero().max())
        self._above_bin = int(at_or_above[self._bin + 1]) if self._bin + 1 < BINS else 0
        self._hist_hi = torch.zeros(0, dtype=torch.int64)

    def pass_b(self, absx: torch.Tensor) -> None:
        if not self.trivial:
            bits = _bits(absx).reshape(-1)
            in_bin = bits[(bits >> 16) == self._bin]
            self._hist_lo += torch.bincount(in_bin & 0xFFFF, minlength=BINS)

    def end_b(self) -> None:
        if self.trivial:
            return
        need = self.k - self._above_bin  # elements to take from the target bin, >= 1
        at_or_above = self._hist_lo.flip(0).cumsum(0).flip(0)
        lo = int((at_or_above >= need).nonzero().max())
        above = int(at_or_above[lo + 1]) if lo + 1 < BINS else 0
        self.tau_bits = (self._bin << 16) | lo
        self.ties = need - above
        self._hist_lo = torch.zeros(0, dtype=torch.int64)

    def export(self) -> list[int]:
        """[k, tau_bits, ties] after pass B (tau_bits -1 when trivial), to journal."""
        return [self.k, -1 if self.tau_bits is None else self.tau_bits, self.ties]

    def restore(self, exported: list[int]) -> None:
        k, tau, ties = exported
        if k != self.k:
            raise ValueError(f"journaled selection keeps {k} elements, this run {self.k}")
        self.tau_bits = None if tau < 0 else tau
        self.ties = ties

    def mask(self, absx: torch.Tensor) -> torch.Tensor:
        """Keep-mask for the next chunk in row order (same shape as ``absx``)."""
        if self.k == 0:
            return torch.zeros(absx.shape, dtype=torch.bool)
        if self.k == self.numel:
            return torch.ones(absx.shape, dtype=torch.bool)
        assert self.tau_bits is not None, "mask() before passes A and B"
        bits = _bits(absx)
        keep = bits > self.tau_bits
        if self._seen_ties < self.ties:  # once enough ties are kept, later equal elements are simply dropped
            at = (bits == self.tau_bits).reshape(-1).nonzero().squeeze(1)  # flat positions, in index order
            keep.view(-1)[at[: self.ties - self._seen_ties]] = True
            self._seen_ties += len(at)
        return keep
