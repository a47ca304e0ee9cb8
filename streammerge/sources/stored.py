"""A tensor as stored in a safetensors shard: rows are a contiguous byte range, converted to float32 per block."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .._torch import torch
from ..errors import InputError
from ..formats.checkpoint import Located
from ..formats.dtypes import DTYPES
from .base import ByteRange, InputSource

#: stored dtypes whose values float32 holds exactly (float64 is rounded to float32 first, like every input)
EXACT_IN_FLOAT32 = ("BF16", "F16", "F32")


@lru_cache(maxsize=1)
def _exact_torch_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(DTYPES[name].torch for name in EXACT_IN_FLOAT32)  # type: ignore[misc]


@lru_cache(maxsize=4096)
def _file_size(path: str) -> int:
    return os.stat(path).st_size


@dataclass(frozen=True)
class StoredSource(InputSource):
    """Rows [r0, r1) of tensor ``loc``: bytes ``begin + r0·row_bytes`` to ``begin + r1·row_bytes`` of its shard."""

    loc: Located
    kind = "stored"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.loc.info.shape

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        info = self.loc.info
        if not 0 <= r0 <= r1 <= info.rows:
            raise ValueError(f"rows [{r0}, {r1}) outside tensor {info.name!r} with {info.rows} rows")
        return [ByteRange(self.loc.shard, info.begin + r0 * info.row_bytes, (r1 - r0) * info.row_bytes)]

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        info = self.loc.info
        if info.dtype.torch is None:
            raise InputError(f"{self.loc.shard}: tensor {info.name!r} has dtype {info.dtype.name}, which torch cannot hold")
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        return (buffers[0].view(info.dtype.torch).reshape(shape),)

    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        x = parts[0]
        return (x[a:b] if x.dim() else x).to(torch.float32, copy=True)

    def raw(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor | None:
        x = parts[0]
        return (x[a:b] if x.dim() else x) if x.dtype in _exact_torch_dtypes() else None

    @property
    def read_bytes_per_row(self) -> int:
        return self.loc.info.row_bytes

    @property
    def stored_dtype(self) -> str | None:
        return self.loc.info.dtype.name

    @property
    def narrow_float(self) -> bool:
        return self.loc.info.dtype.name in ("BF16", "F16")

    @property
    def raw_exact(self) -> bool:
        return self.loc.info.dtype.name in EXACT_IN_FLOAT32

    @property
    def stored_element_bytes(self) -> int:
        return max(1, self.loc.info.dtype.bits // 8)

    def identity(self) -> list[Any]:
        info = self.loc.info
        # not the modification time: a touched shard is the run's business (streammerge.fingerprint.touched_inputs)
        size = _file_size(str(self.loc.shard))
        return [str(self.loc.shard.resolve()), size, info.dtype.name, list(info.shape), info.begin, info.end]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.loc.shard.parent.name, "file": self.loc.shard.name,
                "tensor": self.loc.info.name, "dtype": self.loc.info.dtype.name}
