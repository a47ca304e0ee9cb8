"""The input-source interface (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._torch import torch
from ..shapes import RowLayout

#: each part of a chunk starts at a multiple of this inside a shared slot (typed views need alignment)
ALIGN = 64


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes of file ``path`` from absolute offset ``offset``."""

    path: Path
    offset: int
    length: int


class InputSource(RowLayout, ABC):
    """One input of one tensor, streamed in row chunks. Subclasses are frozen dataclasses (plan data)."""

    #: a short name for the plan (``stored``, ...)
    kind: str = ""
    shape: tuple[int, ...]

    @abstractmethod
    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        """The bytes to read for rows [r0, r1), one range per part, in part order."""

    @abstractmethod
    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """Typed tensors of rows [r0, r1) from ``buffers`` (uint8, one per range, holding exactly its bytes)."""

    @abstractmethod
    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the chunk whose first row is ``r0`` (``parts`` of rows [r0, r1); ``a`` and ``b`` relative to
        ``r0``) as a new float32 tensor."""

    def raw(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor | None:
        """Rows [a, b) as stored when float32 arithmetic with them is exact (so a method may upcast them inside its
        own arithmetic instead of copying); None when they must go through :meth:`floats`."""
        return None

    @property
    @abstractmethod
    def read_bytes_per_row(self) -> int:
        """Bytes read per row (the planner's I/O count)."""

    @property
    def stored_dtype(self) -> str | None:
        """The safetensors dtype of the values as read, when they are used as stored (None when the source
        converts them, e.g. dequantizes)."""
        return None

    @property
    def narrow_float(self) -> bool:
        """Whether every value is a 16-bit float (the float32 product of two is exact)."""
        return False

    @property
    def raw_exact(self) -> bool:
        """Whether :meth:`raw` yields rows (float32 arithmetic with them is exact)."""
        return False

    @property
    def stored_element_bytes(self) -> int:
        """Bytes per element of what is read (for a product exact in float32 and for budgets)."""
        return max(1, self.read_bytes_per_row // max(self.row_numel, 1))

    @property
    def fixed_read_bytes(self) -> int:
        """Bytes every read of this source takes whatever its rows (a LoRA factor read whole); 0 for most."""
        return 0

    @property
    def fixed_slot_bytes(self) -> int:
        """Slot bytes beyond ``rows × row_numel × stored_element_bytes`` that a read of any number of rows may take
        (parts read whole, alignment of many small parts): the planner reserves them before sizing chunks."""
        return 0

    @property
    def scratch_per_element(self) -> int:
        """Bytes per element of a compute block that :meth:`floats` allocates besides the float32 rows it returns
        (a LoRA product); 0 for most."""
        return 0

    @property
    def scratch_fixed(self) -> int:
        """Bytes per compute block that :meth:`floats` allocates whatever the block's rows (a LoRA factor in
        float32); 0 for most."""
        return 0

    @property
    def natural_dtype(self) -> str:
        """The safetensors dtype a copy of these values is written in when no output dtype is asked for: the stored
        dtype, or bfloat16 for values the source makes (dequantized FP8)."""
        return self.stored_dtype or "BF16"

    def slot_bytes(self, rows: int) -> int:
        """Bytes of slot space for ``rows`` rows (every part aligned)."""
        return sum(align(r.length) for r in self.ranges(0, min(rows, self.rows))) if rows else 0

    @abstractmethod
    def identity(self) -> list[Any]:
        """What determines the rows this source yields (file identity and location), for the plan's fingerprint."""

    def describe(self) -> dict[str, Any]:
        """The source in the plan's JSON."""
        return {"kind": self.kind}
