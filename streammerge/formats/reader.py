"""Positioned reads of input shards into caller-owned buffers.

``InputFiles.read_range`` copies one byte range of a shard (``pread``, no mapping) into a reusable buffer. Nothing
of the file stays in this process's resident set: resident memory is the buffers the caller keeps, whatever the
model size, and reads release the GIL, so a background thread can read the next chunk while the current one is
computed. The kernel's page cache still serves a second pass over the same rows. What to read for rows [r0, r1) of
a tensor is the input source's decision (``streammerge.sources``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from .._torch import torch
from ..errors import InputError
from ..fsio import pread_into
from ..sources.base import ByteRange
from ..sources.stored import StoredSource
from .checkpoint import Located

#: bytes per positioned read: a stop request waits for one piece at most (a fraction of a second on any disk)
READ_PIECE = 16 << 20


class ReadCancelled(Exception):
    """A read was abandoned between pieces because its consumer is shutting down."""


class InputFiles:
    """Read-only descriptors of every shard a merge reads, opened lazily and closed together; shared by the
    workers' reader threads (``pread`` needs no lock, opening takes one)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            return self._open(path)

    def _open(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise InputError(f"cannot open {path}: {exc}") from None
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
            self._fds[path] = fd
        return fd

    def read_range(self, rng: ByteRange, buffer: torch.Tensor,
                   cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
        """Read ``rng`` into the start of the uint8 ``buffer``; returns the filled ``buffer[:length]``. The read goes
        in pieces of :data:`READ_PIECE` bytes; ``cancelled()`` is asked between them (:class:`ReadCancelled`)."""
        if rng.length > buffer.numel():
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {rng.length} bytes of {rng.path}")
        out = buffer[: rng.length]
        view = memoryview(out.numpy())
        for at in range(0, rng.length, READ_PIECE):
            if at and cancelled is not None and cancelled():
                raise ReadCancelled(str(rng.path))
            piece = view[at : at + READ_PIECE]
            if pread_into(self._fd(rng.path), piece, rng.offset + at) != len(piece):
                raise InputError(f"{rng.path} ended early (at byte {rng.offset + rng.length} or before): the file "
                                 "changed or is truncated")
        return out

    def read_into(self, loc: Located, r0: int, r1: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows [r0, r1) of the stored tensor at ``loc``, read into the start of ``buffer``, as a typed view of
        shape (r1 - r0, *shape[1:]) (or () for a scalar)."""
        source = StoredSource(loc)
        rng = source.ranges(r0, r1)[0]
        return source.parts([self.read_range(rng, buffer)], r0, r1)[0]

    def read(self, loc: Located, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) in a new buffer (tests, small reads)."""
        rng = StoredSource(loc).ranges(r0, r1)[0]
        return self.read_into(loc, r0, r1, torch.empty(max(rng.length, 1), dtype=torch.uint8))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
