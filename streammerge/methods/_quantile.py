"""Exact order statistics of a float32 tensor streamed in row chunks: the k-th smallest value, for several k at
once, by radix select on an order-preserving 32-bit key in two passes.

``_select`` ranks magnitudes (non-negative values, whose bit patterns already order like the values). Here values
may be negative, so each float32 bit pattern ``b`` (as int32) becomes the key ``b ^ ((b >> 31) & 0x7fffffff)``:
non-negative floats keep their pattern, negative ones have their 31 low bits flipped, and signed int32 order of
the keys is the float order (−NaN < −inf < ... < −0 < +0 < ... < +inf < +NaN; −0 and +0 are different keys next to
each other, which does not change any order statistic's value as a float). The key's high 16 bits are histogrammed
in pass A (65 536 bins, one histogram shared by every k), which pins the bin holding each k-th element; pass B
histograms the low 16 bits of the elements in each of those (at most len(ks)) bins, which pins the key exactly.
Integer counts do not depend on chunking, order or device, so neither does the result. Memory: one 65 536-bin int64
histogram in pass A, one per distinct target bin in pass B, whatever the tensor size.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .._torch import torch

BINS = 1 << 16
#: bytes of one histogram (int64 counts)
HISTOGRAM_BYTES = BINS * 8


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 ``x`` (any shape, flattened) whose signed order is the values' order."""
    bits = x.contiguous().reshape(-1).view(torch.int32)
    return ((bits >> 31) & 0x7FFFFFFF).bitwise_xor_(bits)


def key_value(key: int) -> float:
    """The float32 value (as a Python float) of a key from :func:`order_keys`."""
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return struct.unpack("<f", struct.pack("<i", bits))[0]


class OrderStatistics:
    """The ``ks``-th smallest (0-based) of ``numel`` float32 values streamed through passes A and B in any chunks."""

    def __init__(self, ks: Sequence[int], numel: int) -> None:
        if any(not 0 <= k < numel for k in ks):
            raise ValueError(f"order statistics {list(ks)} of {numel} values")
        self.ks = list(ks)
        self.numel = numel
        self.keys: list[int] | None = None  # after pass B
        self._hist: torch.Tensor | None = None  # pass A: counts of the high 16 bits (+32768)
        self._bins: list[int] = []  # after pass A: each k's bin (0..65535: the high 16 bits + 32768)
        self._rank: list[int] = []  # each k's rank inside its bin
        self._low: dict[int, torch.Tensor] = {}  # pass B: counts of the low 16 bits, per distinct target bin
        self._offsets: torch.Tensor | None = None  # pass B: (65 536,) int32, where each high-bits bin counts

    def pass_a(self, x: torch.Tensor) -> None:
        counts = torch.bincount(((order_keys(x) >> 16) + 32768), minlength=BINS)
        self._hist = counts if self._hist is None else self._hist.add_(counts)

    def end_a(self) -> None:
        hist = torch.zeros(BINS, dtype=torch.int64) if self._hist is None else self._hist.cpu()
        self._hist = None
        if int(hist.sum()) != self.numel:
            raise RuntimeError(f"pass A saw {int(hist.sum())} values, expected {self.numel}")
        upto = hist.cumsum(0)  # values in bins <= b
        self._bins = [int(torch.searchsorted(upto, k, right=True)) for k in self.ks]
        self._rank = [k - (int(upto[b - 1]) if b else 0) for k, b in zip(self.ks, self._bins)]
        self._low = {}

    def pass_b(self, x: torch.Tensor) -> None:
        targets = list(dict.fromkeys(self._bins))
        if self._offsets is None or self._offsets.device != x.device:
            # the i-th target bin's elements count in bins [i·65 536, (i + 1)·65 536) by their low bits; every
            # other element in the block after the targets'
            offsets = torch.full((BINS,), len(targets) * BINS, dtype=torch.int32)
            for i, b in enumerate(targets):
                offsets[b] = i * BINS
            self._offsets = offsets.to(x.device)
        keys = order_keys(x)
        at = self._offsets.index_select(0, (keys >> 16).add_(32768))
        counts = torch.bincount(at.add_(keys.bitwise_and_(0xFFFF)), minlength=(len(targets) + 1) * BINS)
        for i, b in enumerate(targets):
            part = counts[i * BINS : (i + 1) * BINS]
            self._low[b] = part.clone() if b not in self._low else self._low[b].add_(part)

    # ---- for a fused kernel that counts a block itself (arcee_fusion's ``fusion_high``/``fusion_low``) -------------
    def on_cpu(self) -> bool:
        """Whether the histograms there are are CPU tensors, which a kernel can add to."""
        held = ([self._hist] if self._hist is not None else []) + list(self._low.values())
        return all(x.device.type == "cpu" for x in held)

    def high_counts(self) -> torch.Tensor:
        """Pass A's histogram (65 536 int64 counts of the keys' high 16 bits + 32768, CPU), for a kernel to add a
        block's counts to as :meth:`pass_a` does."""
        if self._hist is None:
            self._hist = torch.zeros(BINS, dtype=torch.int64)
        return self._hist

    def low_counts(self) -> tuple[list[int], list[torch.Tensor]]:
        """Pass B's distinct target bins (at most one per k) and their histograms (65 536 int64 counts of the low 16
        bits each, CPU), for a kernel to add a block's counts to as :meth:`pass_b` does."""
        targets = list(dict.fromkeys(self._bins))
        for t in targets:
            if t not in self._low:
                self._low[t] = torch.zeros(BINS, dtype=torch.int64)
        return targets, [self._low[t] for t in targets]

    def end_b(self) -> None:
        self.keys = []
        for b, rank in zip(self._bins, self._rank):
            low = self._low.get(b)
            upto = (torch.zeros(BINS, dtype=torch.int64) if low is None else low.cpu()).cumsum(0)
            lo = int(torch.searchsorted(upto, rank, right=True))
            if lo >= BINS:
                raise RuntimeError("pass B saw fewer values in a target bin than pass A")
            self.keys.append((b - 32768) * BINS + lo)
        self._low, self._offsets = {}, None

    @property
    def values(self) -> list[float]:
        """The order statistics (after pass B), as float32 values in Python floats."""
        assert self.keys is not None, "values before passes A and B"
        return [key_value(k) for k in self.keys]

    def export(self) -> list[int]:
        """[k, key] pairs, flattened, after pass B (to journal)."""
        assert self.keys is not None
        return [v for pair in zip(self.ks, self.keys) for v in pair]

    def restore(self, exported: Sequence[int]) -> None:
        ks, keys = list(exported[0::2]), list(exported[1::2])
        if ks != self.ks:
            raise ValueError(f"journaled order statistics {ks}, this run's {self.ks}")
        self.keys = keys
