"""A vocabulary-indexed tensor (token embedding, untied head) of one input, its rows mapped onto the output's tokens.

:mod:`streammerge.vocabulary` decides, once per input, where every output row comes from (:class:`Segment`s): this
input's own rows, another input's row of a token it lacks, the mean of several inputs' rows, zeros, or the mean of
its own mapped token rows (padding). :class:`VocabularySource` streams that: rows [r0, r1) read exactly the input
rows their segments name, through each input's own source (stored, FP8, LoRA), and become float32 rows in the
output's order. A chunk's bytes depend only on its rows, so the merge's bytes do not depend on the chunking.

The padding mean needs every token row first. It is computed on first use, by a pass of its own over rows
[0, tokens) in blocks of :data:`MEAN_ROWS` rows, summed in float64 in row order with numpy (whose reduction along
the rows of a C-contiguous block adds them in order, on one thread), so it is the same for any chunking, thread
count or resume point; it is kept for the rest of the process.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .._torch import torch
from ..errors import PlanError
from ..vocabulary import MEAN, PADDING_MEAN, ROWS, ZERO, Segment, VocabularyPlan, segment_counts
from .base import ALIGN, ByteRange, InputSource, align

#: rows per block of the padding mean's own pass
MEAN_ROWS = 64

_means: dict[str, torch.Tensor] = {}
_means_lock = threading.Lock()


@dataclass(frozen=True)
class VocabularySource(InputSource):
    """Input ``own``'s rows of a vocabulary-indexed tensor, mapped by ``segments`` onto ``out_rows`` output rows;
    ``inputs``: every input's source of the tensor as stored (base first), from which segments take rows;
    ``tokens``: the output rows that hold tokens (the padding mean averages them)."""

    inputs: tuple[InputSource, ...]
    own: int
    segments: tuple[Segment, ...]
    out_rows: int
    tokens: int
    kind = "vocabulary"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.out_rows, *self.inputs[self.own].shape[1:])

    @cached_property
    def _starts(self) -> list[int]:
        return [s.start for s in self.segments]

    def _pieces(self, r0: int, r1: int) -> Iterator[tuple[Segment, int, int]]:
        """(segment, first row, end row) of every segment part within rows [r0, r1), in order."""
        i = bisect.bisect_right(self._starts, r0) - 1
        while r0 < r1:
            seg = self.segments[i]
            hi = min(seg.stop, r1)
            yield seg, r0, hi
            r0, i = hi, i + 1

    @staticmethod
    def _inner_rows(seg: Segment, first: int, lo: int, hi: int) -> tuple[int, int]:
        return first + lo - seg.start, first + hi - seg.start

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        if not 0 <= r0 <= r1 <= self.out_rows:
            raise ValueError(f"rows [{r0}, {r1}) outside a vocabulary of {self.out_rows} rows")
        out: list[ByteRange] = []
        for seg, lo, hi in self._pieces(r0, r1):
            for j, first in seg.refs:
                out += self.inputs[j].ranges(*self._inner_rows(seg, first, lo, hi))
        return out

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """An empty [r1 - r0, 0] tensor first (it carries the chunk's row count to :meth:`floats`), then the parts
        of every segment part's inputs, in order."""
        out: list[torch.Tensor] = [torch.empty((r1 - r0, 0))]
        at = 0
        for seg, lo, hi in self._pieces(r0, r1):
            for j, first in seg.refs:
                a, b = self._inner_rows(seg, first, lo, hi)
                n = len(self.inputs[j].ranges(a, b))
                out += self.inputs[j].parts(buffers[at : at + n], a, b)
                at += n
        return tuple(out)

    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        r1 = r0 + parts[0].shape[0]
        out = torch.empty((b - a, *self.shape[1:]), dtype=torch.float32, device=parts[0].device)  # the parts' device
        at = 1
        for seg, lo, hi in self._pieces(r0, r1):
            inner = []
            for j, first in seg.refs:
                ia, ib = self._inner_rows(seg, first, lo, hi)
                n = len(self.inputs[j].ranges(ia, ib))
                inner.append((j, ia, parts[at : at + n]))
                at += n
            x0, x1 = max(lo, r0 + a), min(hi, r0 + b)
            if x0 >= x1:
                continue
            dst = out[x0 - r0 - a : x1 - r0 - a]
            if seg.kind == ZERO:
                dst.zero_()
            elif seg.kind == PADDING_MEAN:
                dst.copy_(self.padding_mean().to(dst.device).expand_as(dst))
            else:  # ROWS (one input) or MEAN (the inputs' rows summed in input order, then divided, as mergekit)
                total = None
                for j, ia, p in inner:
                    x = self.inputs[j].floats(p, ia, x0 - lo, x1 - lo)
                    total = x if total is None else total.add_(x)
                assert total is not None
                dst.copy_(total if seg.kind == ROWS else total.div_(len(inner)))
        return out

    def padding_mean(self) -> torch.Tensor:
        """The mean of this input's mapped token rows [0, tokens) (float32 [cols]), computed on first use."""
        key = self._digest
        with _means_lock:
            if key not in _means:
                _means[key] = self._mean_of_tokens()
            return _means[key]

    def _mean_of_tokens(self) -> torch.Tensor:
        import numpy as np  # noqa: PLC0415 (the command line starts without numpy)

        from ..formats.reader import InputFiles  # noqa: PLC0415

        total = np.zeros(self.shape[1:], dtype=np.float64)
        with InputFiles() as files:
            for r0 in range(0, self.tokens, MEAN_ROWS):
                r1 = min(r0 + MEAN_ROWS, self.tokens)
                buffers = [files.read_range(rng, torch.empty(max(rng.length, 1), dtype=torch.uint8))
                           for rng in self.ranges(r0, r1)]
                rows = self.floats(self.parts(buffers, r0, r1), r0, 0, r1 - r0)
                total += np.add.reduce(rows.numpy().astype(np.float64), axis=0)
        return torch.from_numpy((total / max(self.tokens, 1)).astype(np.float32))

    @cached_property
    def _digest(self) -> str:
        text = json.dumps([self.own, self.out_rows, self.tokens, [s.to_json() for s in self.segments],
                           [s.identity() for s in self.inputs]], default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    # ---- sizes for the planner (upper bounds over any chunk) ------------------------------------------------
    @cached_property
    def _used(self) -> tuple[InputSource, ...]:
        return tuple(dict.fromkeys(self.inputs[j] for s in self.segments for j, _ in s.refs)) or (self.inputs[self.own],)

    @property
    def read_bytes_per_row(self) -> int:
        return max(s.read_bytes_per_row for s in self._used)

    @cached_property
    def _mean_extra_rows(self) -> int:
        """Rows read beyond one per output row: the second and later inputs of every mean."""
        return sum((len(s.refs) - 1) * (s.stop - s.start) for s in self.segments if s.kind == MEAN)

    @property
    def fixed_read_bytes(self) -> int:
        return self._mean_extra_rows * self.read_bytes_per_row

    @property
    def fixed_slot_bytes(self) -> int:
        """The means' extra rows, and per segment part its alignment and whatever its source reads whole."""
        per_piece = max(s.fixed_slot_bytes + ALIGN * len(s.ranges(0, min(1, s.rows))) for s in self._used)
        return self._mean_extra_rows * self.read_bytes_per_row + (len(self.segments) + 1) * per_piece

    def slot_bytes(self, rows: int) -> int:
        rows = min(rows, self.rows)
        return align(rows * self.read_bytes_per_row) + self.fixed_slot_bytes if rows else 0

    @property
    def stored_element_bytes(self) -> int:
        return max(1, -(-self.read_bytes_per_row // max(self.row_numel, 1)))

    @property
    def narrow_float(self) -> bool:
        """16-bit values throughout only when every row is some input's stored row (means are float32)."""
        return all(s.kind in (ROWS, ZERO) for s in self.segments) and all(s.narrow_float for s in self._used)

    @property
    def scratch_per_element(self) -> int:
        """Each segment part's float32 rows before they are placed (and a mean's second operand)."""
        return 8 + max(s.scratch_per_element for s in self._used)

    @property
    def scratch_fixed(self) -> int:
        """The padding mean's pass: a block read, as float32 and float64."""
        if not any(s.kind == PADDING_MEAN for s in self.segments):
            return max(s.scratch_fixed for s in self._used)
        return MEAN_ROWS * (self.read_bytes_per_row + 12 * self.row_numel) + self.fixed_slot_bytes \
            + max(s.scratch_fixed for s in self._used)

    @property
    def natural_dtype(self) -> str:
        return self.inputs[self.own].natural_dtype

    def identity(self) -> list[Any]:
        return ["vocabulary", self._digest]

    def describe(self) -> dict[str, Any]:
        counts = segment_counts(self.segments, self.own)
        return {"kind": self.kind, "source": self.inputs[self.own].describe(), "rows": self.out_rows,
                "tokens": self.tokens, "own_rows": counts["own"], "rows_from_other_inputs": counts["other"],
                "mean_rows": counts[MEAN], "zero_rows": counts[ZERO], "padding_mean_rows": counts[PADDING_MEAN]}


def mapped_sources(plan: VocabularyPlan, name: str, sources: tuple[InputSource, ...],
                   only: int | None = None) -> tuple[InputSource, ...]:
    """Every input's source of vocabulary-indexed tensor ``name`` (``sources``: as stored, base first) mapped by
    ``plan`` (or input ``only``'s alone, for a tensor copied from it); raises :class:`PlanError` when a map names rows
    an input's tensor does not have (a head with other rows than the embedding the map was made from)."""
    for k, segments in enumerate(plan.maps):
        for s in segments:
            for j, first in s.refs:
                if first + s.stop - s.start > sources[j].rows:
                    raise PlanError(f"{name}: input {j} has {sources[j].rows} rows, but its tokenizer's map needs row "
                                    f"{first + s.stop - s.start - 1} (its embedding and {name} differ in rows)")
    wanted = range(len(sources)) if only is None else (only,)
    return tuple(VocabularySource(sources, k, plan.maps[k], plan.rows, plan.tokens) for k in wanted)
