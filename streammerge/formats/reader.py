"""Row-chunk reads from safetensors shards with plain positioned reads into caller-owned buffers.

``read_into(loc, r0, r1, buffer)`` copies rows [r0, r1) of a tensor from its shard (``pread``, no mapping) into
a reusable byte buffer and returns a typed view of them. Nothing of the file stays in this process's resident
set: resident memory is the buffers the caller keeps, whatever the model size, and reads release the GIL, so a
background thread can read the next chunk while the current one is computed. The kernel's page cache still
serves a second pass over the same rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import InputError
from .checkpoint import Located

#: each input of a chunk starts at a multiple of this inside a shared buffer (typed views need alignment)
ALIGN = 64


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def row_range_bytes(loc: Located, r0: int, r1: int) -> tuple[int, int]:
    """(file offset, byte count) of rows [r0, r1) of the tensor at ``loc``."""
    info = loc.info
    if not 0 <= r0 <= r1 <= info.rows:
        raise ValueError(f"rows [{r0}, {r1}) outside tensor {info.name!r} with {info.rows} rows")
    row_bytes = info.row_numel * info.dtype.bits // 8
    return info.begin + r0 * row_bytes, (r1 - r0) * row_bytes


class InputFiles:
    """Read-only descriptors of every shard a merge reads, opened lazily and closed together."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
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

    def read_into(self, loc: Located, r0: int, r1: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows [r0, r1) of the tensor at ``loc``, read into the start of the uint8 ``buffer``; returns a view of
        shape (r1 - r0, *shape[1:]) (or () for a scalar) in the tensor's dtype."""
        info = loc.info
        if info.dtype.torch is None:
            raise InputError(f"{loc.shard}: tensor {info.name!r} has dtype {info.dtype.name}, which torch cannot hold")
        offset, count = row_range_bytes(loc, r0, r1)
        if count > buffer.numel():
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {count} bytes of {info.name!r}")
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if count == 0:
            return torch.empty(shape, dtype=info.dtype.torch)
        view = memoryview(buffer.numpy())[:count]
        fd = self._fd(loc.shard)
        done = 0
        while done < count:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise InputError(f"{loc.shard} ended early reading tensor {info.name!r}: the file changed or is truncated")
            done += n
        return buffer[:count].view(info.dtype.torch).reshape(shape)

    def read(self, loc: Located, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) in a new buffer (tests, small reads)."""
        _, count = row_range_bytes(loc, r0, r1)
        return self.read_into(loc, r0, r1, torch.empty(max(count, 1), dtype=torch.uint8))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> InputFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
