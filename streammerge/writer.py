"""Output shards: layout decided before any byte exists, then filled chunk by chunk at planned offsets.

``layout_shard`` is pure: given tensors (name, dtype, shape) it returns the exact header bytes and each tensor's
absolute offset, in the order ``safetensors`` itself uses (dtype size class descending, then name), so a filled
shard is byte-identical to ``safetensors.torch.save_file`` of the same tensors with ``{"format": "pt"}`` metadata.
``split_into_shards`` is the pure shard splitter. ``ShardFile`` is the writer's state machine:
planned → created (header written, file sized and its blocks reserved) → filled by ``write_at`` → finalized
(fsynced, closed); out-of-order calls are refused. Writes go through :mod:`streammerge.fsio`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from . import fsio
from .formats.dtypes import DTYPES

SHARD_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class OutTensor:
    """A tensor as the writer sees it: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].bits
        for d in self.shape:
            n *= d
        return n // 8


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its name, header bytes, absolute tensor offsets and total size."""

    filename: str
    header: bytes
    offsets: dict[str, tuple[int, int]]  # name -> (begin, end), absolute in the file
    size: int


def layout_shard(filename: str, tensors: list[OutTensor], metadata: dict[str, str] | None = SHARD_METADATA) -> ShardLayout:
    """Exact header and offsets of a shard holding ``tensors`` (any order in, safetensors' order out)."""
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t.dtype].rank, t.name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    rel: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in ordered:
        rel[t.name] = (pos, pos + t.nbytes)
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)  # pad so tensor data starts 8-byte aligned
    start = 8 + len(body)
    raw = struct.pack("<Q", len(body)) + body
    offsets = {name: (start + b, start + e) for name, (b, e) in rel.items()}
    return ShardLayout(filename, raw, offsets, start + pos)


def split_into_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` of data (a larger tensor gets its own)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def shard_filename(i: int, count: int) -> str:
    """HF names: ``model.safetensors`` alone, else ``model-00001-of-00003.safetensors``."""
    return "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


class WriterState(Enum):
    PLANNED = "planned"
    CREATED = "created"
    FINALIZED = "finalized"


class ShardFile:
    """Writes one planned shard: header first, tensor bytes at their offsets, then flush and fsync."""

    def __init__(self, layout: ShardLayout, folder: Path) -> None:
        self.layout = layout
        self.path = folder / layout.filename
        self.state = WriterState.PLANNED
        self._fd: int | None = None

    def create(self) -> None:
        """Create the file with its final header and size; its blocks are reserved (``posix_fallocate``) so a full
        disk shows up here, not in the middle of the merge."""
        self._require(WriterState.PLANNED, "create")
        fd = fsio.open_file(self.path, create=True, truncate=True)
        try:
            fsio.size_file(fd, self.layout.size)
            _pwrite_all(fd, self.layout.header, 0)
        except BaseException:
            fsio.close(fd)
            raise
        self._fd = fd
        self.state = WriterState.CREATED

    def open_existing(self) -> bool:
        """Reopen the shard a previous run created, if its size and header are exactly as planned."""
        self._require(WriterState.PLANNED, "open_existing")
        try:
            fd = fsio.open_file(self.path)
        except FileNotFoundError:
            return False
        header = self.layout.header
        if os.fstat(fd).st_size != self.layout.size or os.pread(fd, len(header), 0) != header:
            fsio.close(fd)
            return False
        self._fd = fd
        self.state = WriterState.CREATED
        return True

    @property
    def fd(self) -> int:
        assert self._fd is not None, "shard not open"
        return self._fd

    def write_at(self, name: str, byte_offset: int, data: memoryview | bytes) -> None:
        """Write ``data`` at ``byte_offset`` inside tensor ``name``'s range (bounds-checked)."""
        self._require(WriterState.CREATED, "write_at")
        begin, end = self.layout.offsets[name]
        at = begin + byte_offset
        if byte_offset < 0 or at + len(data) > end:
            raise ValueError(f"write of {len(data)} bytes at {byte_offset} overflows tensor {name!r} ({end - begin} bytes)")
        assert self._fd is not None
        _pwrite_all(self._fd, data, at)

    def read_at(self, name: str, byte_offset: int, length: int) -> bytes:
        """Read back bytes of a tensor already written (to verify journaled chunks)."""
        buf = bytearray(length)
        self.read_into(name, byte_offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, name: str, byte_offset: int, view: memoryview) -> None:
        """Read back ``len(view)`` bytes of a tensor already written into ``view`` (to copy a tied head)."""
        self._require(WriterState.CREATED, "read_into")
        begin, end = self.layout.offsets[name]
        if byte_offset < 0 or begin + byte_offset + len(view) > end:
            raise ValueError(f"read of {len(view)} bytes at {byte_offset} overflows tensor {name!r}")
        assert self._fd is not None
        if fsio.pread_into(self._fd, view, begin + byte_offset) != len(view):
            raise OSError(f"{self.path} is shorter than planned")

    def finalize(self, sync: bool = True) -> None:
        """Flush the file to disk (unless ``sync`` is off) and close it."""
        self._require(WriterState.CREATED, "finalize")
        assert self._fd is not None
        if sync:
            fsio.sync_file(self._fd)
        fsio.close(self._fd)
        self._fd = None
        self.state = WriterState.FINALIZED

    def abort(self) -> None:
        """Close without finalizing (after an error)."""
        if self._fd is not None:
            fsio.close(self._fd)
            self._fd = None

    def _require(self, state: WriterState, call: str) -> None:
        if self.state is not state:
            raise RuntimeError(f"{self.path.name}: {call}() in state {self.state.value}, needs {state.value}")


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Every shard write (a seam for tests that simulate a full disk)."""
    fsio.pwrite_all(fd, data, offset)
