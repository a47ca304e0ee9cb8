"""Row-chunk reads from memory-mapped safetensors shards.

Each shard is mapped once (private, read-only use). ``rows(loc, r0, r1)`` returns rows [r0, r1) of a tensor as a
torch tensor that views the mapping, touching no other rows. ``release`` tells the kernel the pages of a range
were consumed (``MADV_DONTNEED``), so resident memory follows the chunk being worked on, not the file size: the
pages stay in the page cache for a second pass, but leave this process's RSS.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from ..errors import InputError
from .checkpoint import Located

_PAGE = mmap.PAGESIZE


class ShardReader:
    """Memory maps of every shard a merge reads, opened lazily and closed together."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        m = self._maps.get(path)
        if m is None:
            try:
                with open(path, "rb") as f:
                    # ACCESS_COPY = MAP_PRIVATE: writable views for torch (no copy unless written), file untouched.
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot map {path}: {exc}") from None
            self._maps[path] = m
        return m

    def rows(self, loc: Located, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the tensor at ``loc`` as a tensor of shape (r1 - r0, *shape[1:])."""
        info = loc.info
        if info.dtype.torch is None:
            raise InputError(f"{loc.shard}: tensor {info.name!r} has dtype {info.dtype.name}, which torch cannot hold")
        if not 0 <= r0 <= r1 <= info.rows:
            raise ValueError(f"rows [{r0}, {r1}) outside tensor {info.name!r} with {info.rows} rows")
        item = info.dtype.bits // 8
        row_bytes = info.row_numel * item
        count = (r1 - r0) * info.row_numel
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if count == 0:
            return torch.empty(shape, dtype=info.dtype.torch)
        m = self._map(loc.shard)
        t = torch.frombuffer(m, dtype=info.dtype.torch, count=count, offset=info.begin + r0 * row_bytes)
        return t.reshape(shape)

    def prefetch(self, loc: Located, r0: int, r1: int) -> None:
        """Ask the kernel to start reading rows [r0, r1) now (``MADV_WILLNEED``): the disk works while we compute."""
        if not hasattr(mmap, "MADV_WILLNEED") or r1 <= r0:
            return
        info = loc.info
        row_bytes = info.row_numel * info.dtype.bits // 8
        start = (info.begin + r0 * row_bytes) // _PAGE * _PAGE
        end = min(info.end, info.begin + r1 * row_bytes)
        if end > start:
            self._map(loc.shard).madvise(mmap.MADV_WILLNEED, start, end - start)

    def release(self, loc: Located, r0: int, r1: int) -> None:
        """Drop the pages of rows [r0, r1) from this process's resident set (they stay in the page cache)."""
        m = self._maps.get(loc.shard)
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = loc.info
        row_bytes = info.row_numel * info.dtype.bits // 8
        start = info.begin + r0 * row_bytes
        end = info.begin + r1 * row_bytes
        # Pages shared with a neighbouring chunk may go too: nothing writes the private mapping, so a later
        # access just faults the page back in from the file.
        a = start // _PAGE * _PAGE
        b = -(-end // _PAGE) * _PAGE
        if b > a:
            m.madvise(mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a tensor still views it; the mapping goes when that tensor does
        self._maps.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
