"""LoRA inputs: a weight with its adapter's change, made per row chunk from the adapter's two small factors.

A LoRA adapter (PEFT ``tuners/lora/layer.py``) changes a weight ``W`` by ``ΔW = s · B @ A`` with ``A`` [r, in] and
``B`` [out, r] (``s = lora_alpha / r``, or ``lora_alpha / √r`` with ``use_rslora``), so rows [r0, r1) of the changed
weight need only rows [r0, r1) of ``W``, the same rows of one factor and the other factor whole:

- ``nn.Linear`` (``W`` stored [out, in]): ``ΔW[r0:r1] = s · B[r0:r1] @ A`` (``Linear.get_delta_weight``);
- transformers' ``Conv1D`` (``fan_in_fan_out``, ``W`` stored [in, out]) and embeddings (``lora_embedding_A`` [r, V],
  ``lora_embedding_B`` [H, r], ``W`` [V, H]): ``ΔW = s · (B @ A)ᵀ``, so ``ΔW[r0:r1] = s · A[:, r0:r1]ᵀ @ Bᵀ``
  (``Linear.get_delta_weight`` with ``transpose(..., fan_in_fan_out)``, ``Embedding.get_delta_weight``);
- DoRA (``use_dora``, ``DoraLinearVariant.merge_unsafe``): ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` with the L2 norm of
  each output row of the [out, in] weight (``DoraLinearLayer.get_weight_norm``: ``torch.linalg.norm(W + ΔW,
  dim=1)``, ``W`` the unmerged base weight; PEFT detaches the norm, which changes gradients only, not this value)
  and ``m`` the adapter's ``lora_magnitude_vector`` [out]: rows of an [out, in] weight are whole output rows, so a
  chunk needs nothing else.

Every factor is read as stored (any float dtype) and computed with in float32. :class:`LoraSource` reads ``W``'s
rows through the source that would read it without the adapter (stored, FP8-dequantized, or a replacement the
adapter saves), so an adapter on an FP8 model works like one on a bfloat16 model. :class:`LoraBiasSource` adds
``s · lora_B.bias`` to a bias (``lora_bias``); :class:`TokenRowsSource` replaces embedding rows with the adapter's
trained token rows (``trainable_token_indices``, peft ``tuners/trainable_tokens/layer.py``: ``index_copy``).

**Chunk-independent bytes.** BLAS kernels sum ``B[i] · A[:, j]`` in an order that depends on how many rows a call
has and where a row sits in it, so ``B[r0:r1] @ A`` differs in the last bit with the chunking. :func:`row_product`
therefore multiplies groups of exactly :data:`PRODUCT_ROWS` rows aligned to the tensor's row numbers (one batched
call; zero rows pad a group a block cuts): each row's result is the same wherever a chunk or a block starts, and the
merge's bytes do not depend on the budget.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from .._torch import torch
from ..formats.checkpoint import Located
from .base import ALIGN, ByteRange, InputSource, align
from .stored import _file_size

#: rows per matrix product (see the module docstring)
PRODUCT_ROWS = 8


def row_product(left: torch.Tensor, right: torch.Tensor, first_row: int) -> torch.Tensor:
    """``left @ right`` (float32 [n, r] @ [r, cols] → [n, cols]) for the tensor's rows ``first_row`` … ``first_row +
    n - 1``, computed as one batch of products of exactly :data:`PRODUCT_ROWS` rows each, aligned to the tensor's
    row numbers (zero rows pad the first and last group): row ``i`` of the tensor is always row ``i mod
    PRODUCT_ROWS`` of a same-shaped product with the same ``right``, so its float32 result does not depend on where
    a chunk or a compute block starts."""
    n, r = left.shape
    skip = first_row % PRODUCT_ROWS
    groups = -(-(skip + n) // PRODUCT_ROWS)
    padded = left.new_zeros(groups * PRODUCT_ROWS, r)
    padded[skip : skip + n] = left
    out = torch.bmm(padded.view(groups, PRODUCT_ROWS, r), right.expand(groups, *right.shape))
    return out.view(groups * PRODUCT_ROWS, right.shape[1])[skip : skip + n]


def located_identity(loc: Located) -> list[Any]:
    """What identifies a stored tensor's bytes for a fingerprint (as :class:`~streammerge.sources.StoredSource`)."""
    info = loc.info
    return [str(loc.shard.resolve()), _file_size(str(loc.shard)), info.dtype.name, list(info.shape), info.begin,
            info.end]


def _typed(buffer: torch.Tensor, loc: Located, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = loc.info.dtype.torch
    assert dtype is not None  # adapter tensors are checked to be floats when the source is made
    return buffer.view(dtype).reshape(shape)


def _element_bytes(loc: Located) -> int:
    return loc.info.dtype.bits // 8


@dataclass(frozen=True)
class LoraSource(InputSource):
    """Rows of ``base`` (the weight, [rows, cols]) plus ``scale · ΔW``, and with ``magnitude`` the DoRA
    normalisation (see the module docstring).

    ``transposed`` false: ``lora_a`` is A [r, cols], ``lora_b`` is B [rows, r]; true (Conv1D, embeddings):
    ``lora_a`` is A [r, rows], ``lora_b`` is B [cols, r]. ``adapter``: the adapter folder's name (for the plan)."""

    base: InputSource
    lora_a: Located
    lora_b: Located
    scale: float
    transposed: bool
    magnitude: Located | None = None  # DoRA's m [rows] (never with ``transposed``)
    adapter: str = ""
    kind = "lora"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.base.shape

    @property
    def rank(self) -> int:
        return self.lora_a.info.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def _own_parts(self) -> int:
        """How many parts of a chunk are the adapter's (after the base's)."""
        return self.rank + 1 if self.transposed else 2 + (self.magnitude is not None)

    def _own_ranges(self, r0: int, r1: int) -> list[ByteRange]:
        a, b = self.lora_a, self.lora_b
        if self.transposed:  # A[k, r0:r1] for every k (rows of A are contiguous), then B whole
            e = _element_bytes(a)
            cols_a = a.info.shape[1]
            return [*(ByteRange(a.shard, a.info.begin + (k * cols_a + r0) * e, (r1 - r0) * e)
                      for k in range(self.rank)),
                    ByteRange(b.shard, b.info.begin, b.info.nbytes)]
        out = [ByteRange(a.shard, a.info.begin, a.info.nbytes),
               ByteRange(b.shard, b.info.begin + r0 * b.info.row_bytes, (r1 - r0) * b.info.row_bytes)]
        if self.magnitude is not None:
            m = self.magnitude
            out.append(ByteRange(m.shard, m.info.begin + r0 * _element_bytes(m), (r1 - r0) * _element_bytes(m)))
        return out

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        return [*self.base.ranges(r0, r1), *self._own_ranges(r0, r1)]

    def slot_bytes(self, rows: int) -> int:
        rows = min(rows, self.rows)
        return self.base.slot_bytes(rows) + sum(align(r.length) for r in self._own_ranges(0, rows)) if rows else 0

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        """The base's parts, then the adapter's: the factor needed whole already as the float32 right-hand side
        [r, cols] (made once per chunk, on the reader's thread, not once per compute block), then the rows of the
        other factor (and DoRA's magnitudes) as stored."""
        k = len(buffers) - self._own_parts
        base = self.base.parts(buffers[:k], r0, r1)
        own, n = buffers[k:], r1 - r0
        if self.transposed:
            columns = tuple(_typed(buf, self.lora_a, (n,)) for buf in own[: self.rank])
            right = _typed(own[-1], self.lora_b, self.lora_b.info.shape).to(torch.float32).t().contiguous()  # Bᵀ
            return (*base, *columns, right)
        right = _typed(own[0], self.lora_a, self.lora_a.info.shape).to(torch.float32)  # A (a view if stored as F32)
        mine = [right, _typed(own[1], self.lora_b, (n, self.rank))]
        if self.magnitude is not None:
            mine.append(_typed(own[2], self.magnitude, (n,)))
        return (*base, *mine)

    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        k = len(parts) - self._own_parts
        x = self.base.floats(parts[:k], r0, a, b)  # [b - a, cols] float32, a new tensor
        if b <= a:
            return x
        own = parts[k:]
        if self.transposed:
            left = torch.stack([c[a:b] for c in own[: self.rank]], dim=1).to(torch.float32)  # A[:, rows]ᵀ [n, r]
            right = own[-1]  # Bᵀ [r, cols] float32
        else:
            left = own[1][a:b].to(torch.float32)  # B[rows] [n, r]
            right = own[0]  # A [r, cols] float32
        delta = row_product(left, right, r0 + a)
        del left
        delta.mul_(self.scale)  # PEFT: (B @ A) * scaling, then added to the weight
        x.add_(delta)
        del delta
        if self.magnitude is not None:  # DoRA: m / ‖W + ΔW‖ per output row
            norm = torch.linalg.vector_norm(x, dim=1)
            x.mul_((own[2][a:b].to(torch.float32) / norm).unsqueeze(1))
        return x

    @property
    def _row_factor_bytes(self) -> int:
        """Adapter bytes read per row: a row of B (and of m), or a column of A."""
        if self.transposed:
            return self.rank * _element_bytes(self.lora_a)
        return self.lora_b.info.row_bytes + (_element_bytes(self.magnitude) if self.magnitude is not None else 0)

    @property
    def read_bytes_per_row(self) -> int:
        return self.base.read_bytes_per_row + self._row_factor_bytes

    @property
    def fixed_read_bytes(self) -> int:
        """The factor read whole with every chunk (A, or B when transposed)."""
        whole = self.lora_b if self.transposed else self.lora_a
        return self.base.fixed_read_bytes + whole.info.nbytes

    @property
    def fixed_slot_bytes(self) -> int:
        """The factor read whole, as stored and (made with each staged chunk) in float32, and alignment."""
        whole = self.lora_b if self.transposed else self.lora_a
        copies = 2 if self.transposed else 1  # Bᵀ is made from a float32 B
        return (self.base.fixed_slot_bytes + align(whole.info.nbytes) + copies * align(4 * self.rank * self.cols)
                + ALIGN * self._own_parts)

    @property
    def stored_element_bytes(self) -> int:
        return self.base.stored_element_bytes + -(-self._row_factor_bytes // max(self.cols, 1))

    @property
    def scratch_per_element(self) -> int:
        """The float32 product, and the rows of the other factor in float32 (padded)."""
        return self.base.scratch_per_element + 4 + -(-8 * self.rank // max(self.cols, 1))

    @property
    def scratch_fixed(self) -> int:
        """The product's padding rows and DoRA's norms."""
        return (self.base.scratch_fixed + 8 * (PRODUCT_ROWS - 1) * (self.cols + self.rank)
                + (16 * PRODUCT_ROWS if self.magnitude else 0))

    @property
    def natural_dtype(self) -> str:
        return self.base.natural_dtype

    def identity(self) -> list[Any]:
        return ["lora", self.base.identity(), located_identity(self.lora_a), located_identity(self.lora_b),
                self.scale, self.transposed,
                located_identity(self.magnitude) if self.magnitude is not None else None]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter, "base": self.base.describe(),
                "lora_A": self.lora_a.info.name, "lora_B": self.lora_b.info.name, "r": self.rank,
                "scale": self.scale, "delta": "(B@A)^T" if self.transposed else "B@A",
                **({"dora": self.magnitude.info.name} if self.magnitude is not None else {})}


@dataclass(frozen=True)
class LoraBiasSource(InputSource):
    """A bias (1-D) plus ``scale · lora_B.bias`` (``lora_bias``; PEFT ``Linear.merge``:
    ``bias += lora_B.bias * scaling``)."""

    base: InputSource
    bias: Located
    scale: float
    adapter: str = ""
    kind = "lora_bias"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.base.shape

    def _own(self, r0: int, r1: int) -> ByteRange:
        e = _element_bytes(self.bias)
        return ByteRange(self.bias.shard, self.bias.info.begin + r0 * e, (r1 - r0) * e)

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        return [*self.base.ranges(r0, r1), self._own(r0, r1)]

    def slot_bytes(self, rows: int) -> int:
        rows = min(rows, self.rows)
        return self.base.slot_bytes(rows) + align(self._own(0, rows).length) if rows else 0

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        return (*self.base.parts(buffers[:-1], r0, r1), _typed(buffers[-1], self.bias, (r1 - r0,)))

    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        x = self.base.floats(parts[:-1], r0, a, b)
        return x.add_(parts[-1][a:b].to(torch.float32).mul_(self.scale))

    @property
    def read_bytes_per_row(self) -> int:
        return self.base.read_bytes_per_row + _element_bytes(self.bias)

    @property
    def fixed_slot_bytes(self) -> int:
        return self.base.fixed_slot_bytes + ALIGN

    @property
    def stored_element_bytes(self) -> int:
        return self.base.stored_element_bytes + _element_bytes(self.bias)

    @property
    def scratch_per_element(self) -> int:
        return self.base.scratch_per_element + 4

    @property
    def natural_dtype(self) -> str:
        return self.base.natural_dtype

    def identity(self) -> list[Any]:
        return ["lora_bias", self.base.identity(), located_identity(self.bias), self.scale]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter, "base": self.base.describe(),
                "lora_B.bias": self.bias.info.name, "scale": self.scale}


@dataclass(frozen=True)
class TokenRowsSource(InputSource):
    """An embedding [V, H] whose rows ``tokens`` (pairs of token id and row of ``values``, sorted by id) are
    replaced by the rows of ``values`` [n, H] (``trainable_token_indices``)."""

    base: InputSource
    values: Located
    tokens: tuple[tuple[int, int], ...]
    adapter: str = ""
    kind = "trainable_tokens"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.base.shape

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        v = self.values
        return [*self.base.ranges(r0, r1), ByteRange(v.shard, v.info.begin, v.info.nbytes)]

    def slot_bytes(self, rows: int) -> int:
        rows = min(rows, self.rows)
        return self.base.slot_bytes(rows) + align(self.values.info.nbytes) if rows else 0

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        return (*self.base.parts(buffers[:-1], r0, r1), _typed(buffers[-1], self.values, self.values.info.shape))

    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        x = self.base.floats(parts[:-1], r0, a, b)
        lo, hi = r0 + a, r0 + b
        ids = [t for t, _ in self.tokens]
        first, last = bisect.bisect_left(ids, lo), bisect.bisect_left(ids, hi)
        if first < last:
            chosen = self.tokens[first:last]
            at = torch.tensor([t - lo for t, _ in chosen], device=x.device)
            rows = torch.tensor([j for _, j in chosen], device=x.device)
            x.index_copy_(0, at, parts[-1].index_select(0, rows).to(torch.float32))
        return x

    @property
    def read_bytes_per_row(self) -> int:
        return self.base.read_bytes_per_row

    @property
    def fixed_read_bytes(self) -> int:
        return self.base.fixed_read_bytes + self.values.info.nbytes

    @property
    def fixed_slot_bytes(self) -> int:
        return self.base.fixed_slot_bytes + align(self.values.info.nbytes)

    @property
    def stored_element_bytes(self) -> int:
        return self.base.stored_element_bytes

    @property
    def scratch_fixed(self) -> int:
        return self.base.scratch_fixed + 2 * 4 * math.prod(self.values.info.shape)

    @property
    def natural_dtype(self) -> str:
        return self.base.natural_dtype

    def identity(self) -> list[Any]:
        return ["trainable_tokens", self.base.identity(), located_identity(self.values), [list(t) for t in self.tokens]]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "adapter": self.adapter, "base": self.base.describe(),
                "values": self.values.info.name, "tokens": len(self.tokens)}
