"""Input checksums: which input bytes a tensor's journaled work used, so that a touched input can be re-verified.

While merging, the reader thread (:class:`~streammerge.pipeline.Prefetcher`) keeps a :class:`Sweep`: a running
CRC-32 of the bytes of the tensor's checksum reads (one sweep from row 0, flagged by :mod:`streammerge.schedule`),
per source and per byte range of the source, computed on each buffer as it arrives. With each such read it hands
over :class:`InputSums` for rows [0, r1), which the executor journals ahead of the work done with those rows (an
``"i"`` line, :mod:`streammerge.journal`). A tensor's rows are contiguous bytes, so the value does not depend on
the chunking.

When a run continues after input shards were only touched (same size and header, another modification time;
decided by :func:`streammerge.fingerprint.touched_inputs`), :func:`check_touched` re-reads, for every tensor with
journaled work that reads such a shard, rows [0, recorded rows) of its sources there and compares. The tensor is
kept when they match and cover what its work depends on: every row if it has statistics passes (its statistics,
and so every chunk, depend on all of them), else the rows written so far. Different bytes, or no checksum that
covers them (an older journal, a run resumed mid-tensor), make it changed.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._torch import torch
from .fingerprint import Touched
from .formats.reader import READ_PIECE, InputFiles
from .manifest import crc
from .sources import ByteRange, InputSource

if TYPE_CHECKING:
    from .journal import Journal
    from .planner import Plan
    from .schedule import Read


@dataclass(frozen=True)
class InputSums:
    """CRC-32s of the input bytes of rows [0, ``rows``) of a tensor: per source, one per byte range (part)."""

    rows: int
    crcs: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "crc": [list(c) for c in self.crcs]}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> InputSums:
        return cls(int(entry["rows"]), tuple(tuple(int(c) for c in src) for src in entry["crc"]))


class Sweep:
    """The reader's running checksums of the tensor whose checksum reads it is in (they come in row order)."""

    def __init__(self) -> None:
        self._tensor: str | None = None
        self._rows = 0  # rows [0, _rows) checksummed so far
        self._parts: list[list[tuple[Path, int, int]]] | None = None  # per source, per part: (file, end, crc)

    def add(self, read: Read, pieces: list[list[tuple[ByteRange, torch.Tensor]]]) -> InputSums | None:
        """Account for ``read`` (per source, its byte ranges and the uint8 buffers holding them); the checksums of
        rows [0, read.r1) if it is a checksum read continuing its tensor's sweep without a gap, else None."""
        if not read.checksum:
            return None
        if read.r0 == 0:
            self._tensor, self._rows = read.tensor, 0
            self._parts = [[(rng.path, rng.offset, 0) for rng, _ in p] for p in pieces]
        if (read.tensor, read.r0) != (self._tensor, self._rows) or self._parts is None \
                or list(map(len, pieces)) != list(map(len, self._parts)):
            self._parts = None  # a sweep that did not start at row 0 in this run, or has a gap, vouches for nothing
            return None
        for held, source in zip(self._parts, pieces):
            for k, (rng, buf) in enumerate(source):
                path, end, running = held[k]
                skip = end - rng.offset  # a source whose ranges overlap (shared scale rows) counts its bytes once
                if rng.path != path or skip < 0:
                    self._parts = None
                    return None
                if skip < rng.length:
                    held[k] = (path, rng.offset + rng.length, crc(memoryview(buf.numpy())[skip:], running))
        self._rows = read.r1
        return InputSums(read.r1, tuple(tuple(c for _, _, c in held) for held in self._parts))


@dataclass(frozen=True)
class TouchCheck:
    """What re-reading one touched shard found: the tensors (with journaled work) reading it, by outcome."""

    file: Touched
    kept: tuple[str, ...]  # their bytes match the journaled checksums
    differ: tuple[str, ...]  # their bytes differ
    unrecorded: tuple[str, ...]  # no journaled checksum covers what their work used


def check_touched(plan: Plan, journal: Journal, touched: Sequence[Touched], skip: Collection[str]) -> list[TouchCheck]:
    """Re-read and check the bytes that the journaled work of tensors (other than ``skip``) used from ``touched``
    shards (see the module docstring)."""
    found: dict[tuple[int, int], tuple[list[str], list[str], list[str]]] = {_file_id(t.path): ([], [], [])
                                                                            for t in touched}
    buffer = torch.empty(READ_PIECE, dtype=torch.uint8)
    with InputFiles() as files:
        for t in plan.tensors:
            p = journal.get(t.name)
            if t.name in skip or not (p.chunks or p.state_file):
                continue
            hit = [(i, s) for i, s in enumerate(t.sources) if _files(s) & found.keys()]
            if not hit:
                continue
            need, rec = (t.rows if t.stat_passes else p.rows_done), p.inputs
            if rec is None or rec.rows < need or len(rec.crcs) != len(t.sources):
                outcome = 2
            else:
                outcome = 0 if all(_sums(files, s, rec.rows, buffer) == rec.crcs[i] for i, s in hit) else 1
            for key in set().union(*(_files(s) for _, s in hit)) & found.keys():
                found[key][outcome].append(t.name)
    return [TouchCheck(t, *(tuple(names) for names in found[_file_id(t.path)])) for t in touched]


def _files(source: InputSource) -> set[tuple[int, int]]:
    """The files ``source`` reads, by identity (device, inode): a symlinked shard is the file it points to."""
    return {_file_id(rng.path) for rng in source.ranges(0, source.rows)}


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _sums(files: InputFiles, source: InputSource, rows: int, buffer: torch.Tensor) -> tuple[int, ...]:
    """CRC-32 of each byte range of rows [0, ``rows``) of ``source``, read now, piece by piece."""
    out = []
    for rng in source.ranges(0, rows):
        running = 0
        for at in range(0, rng.length, READ_PIECE):
            piece = ByteRange(rng.path, rng.offset + at, min(READ_PIECE, rng.length - at))
            running = crc(memoryview(files.read_range(piece, buffer).numpy()), running)
        out.append(running)
    return tuple(out)
