"""An FP8 weight dequantized on the fly: its rows times their scales, into float32.

FP8 releases store a linear layer's weight ``W`` [out, in] as 8-bit float codes (``F8_E4M3`` or ``F8_E5M2``) and
beside it a float scale tensor; the weight is ``codes × scale``, the scale broadcast over blocks of
``block_rows × block_cols`` elements. One layout covers the schemes in use:

- **block scales** (DeepSeek-V3, Qwen3-FP8; transformers' ``FineGrainedFP8``): ``W.weight_scale_inv`` of shape
  [⌈out/128⌉, ⌈in/128⌉], the block size from ``quantization_config.weight_block_size``;
- **per-channel scales** (fbgemm_fp8; compressed-tensors ``strategy: channel``): ``W.weight_scale`` [out, 1]
  (blocks of 1 × in);
- **per-tensor scales** (compressed-tensors ``strategy: tensor``; ModelOpt FP8): ``W.weight_scale`` [1] or [] (one
  block of out × in).

(The ``_inv`` in DeepSeek's name is historical: it is the dequantization multiplier, as in the reference
``weight_dequant`` of deepseek-ai/DeepSeek-V3 ``inference/kernel.py``.) Each element becomes
``float32(code) × float32(scale)``, rounded once, exactly what dequantizing the whole tensor in float32 first gives,
so a streamed merge equals a dense dequantize-then-merge for every chunking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._torch import torch
from ..formats.checkpoint import Located
from .base import ByteRange, InputSource, align
from .stored import _file_size


@dataclass(frozen=True)
class Fp8Source(InputSource):
    """Rows of the FP8 weight ``codes`` [out, in] times ``scales``, a grid of ⌈out/block[0]⌉ × ⌈in/block[1]⌉
    float scales (stored with any shape holding that many elements, row-major)."""

    codes: Located
    scales: Located
    block: tuple[int, int]  # (rows, cols) of weight elements that share one scale
    scheme: str  # "block", "channel" or "tensor" (for the plan and messages)
    kind = "fp8"

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.codes.info.shape

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of the scale grid."""
        out, cols = self.shape
        return -(-out // self.block[0]), -(-cols // self.block[1])

    def _scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """The scale rows [s0, s1) that weight rows [r0, r1) use."""
        return r0 // self.block[0], -(-r1 // self.block[0]) if r1 > r0 else r0 // self.block[0]

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        info, s = self.codes.info, self.scales.info
        if not 0 <= r0 <= r1 <= info.rows:
            raise ValueError(f"rows [{r0}, {r1}) outside tensor {info.name!r} with {info.rows} rows")
        s0, s1 = self._scale_rows(r0, r1)
        scale_row = self.grid[1] * s.dtype.bits // 8
        return [ByteRange(self.codes.shard, info.begin + r0 * info.row_bytes, (r1 - r0) * info.row_bytes),
                ByteRange(self.scales.shard, s.begin + s0 * scale_row, (s1 - s0) * scale_row)]

    def slot_bytes(self, rows: int) -> int:
        """The codes of ``rows`` rows and the most scale rows any ``rows`` consecutive rows use (a chunk that
        starts inside a block reaches into one more)."""
        rows = min(rows, self.rows)
        if not rows:
            return 0
        spanned = min(self.grid[0], (rows + self.block[0] - 2) // self.block[0] + 1)
        return align(rows * self.codes.info.row_bytes) + align(spanned * self.grid[1] * self.scales.info.dtype.bits // 8)

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        codes_dtype, scale_dtype = self.codes.info.dtype.torch, self.scales.info.dtype.torch
        assert codes_dtype is not None and scale_dtype is not None  # checked when the source was made
        s0, s1 = self._scale_rows(r0, r1)
        return (buffers[0].view(codes_dtype).reshape(r1 - r0, self.shape[1]),
                buffers[1].view(scale_dtype).reshape(s1 - s0, self.grid[1]))

    def floats(self, parts: tuple[torch.Tensor, ...], r0: int, a: int, b: int) -> torch.Tensor:
        codes, scales = parts
        x = codes[a:b].to(torch.float32)
        lo, hi, br, bc = r0 + a, r0 + b, *self.block
        if hi <= lo:
            return x
        # the scale row of every weight row in [lo, hi), relative to the chunk's first scale row
        index = torch.arange(lo, hi, device=x.device) // br - r0 // br
        per_row = scales.index_select(0, index).to(torch.float32)  # [b - a, grid cols]
        cols, whole = x.shape[1], x.shape[1] // bc
        if whole:  # the columns of whole blocks: one broadcast multiply
            x[:, : whole * bc].view(b - a, whole, bc).mul_(per_row[:, :whole, None])
        if whole * bc < cols:  # a last block narrower than the others
            x[:, whole * bc :].mul_(per_row[:, whole:])
        return x

    @property
    def read_bytes_per_row(self) -> int:
        """The codes of a row and its share of the scales (rounded up)."""
        scale_row = self.grid[1] * self.scales.info.dtype.bits // 8
        return self.codes.info.row_bytes + -(-scale_row // self.block[0])

    @property
    def stored_element_bytes(self) -> int:
        """1 for the code plus, conservatively, 1 for its share of the scales and of the per-row scale copy a
        compute block makes (4 bytes per ``block[1]`` elements)."""
        return 2

    def identity(self) -> list[Any]:
        parts = []
        for loc in (self.codes, self.scales):
            info = loc.info
            parts.append([str(loc.shard.resolve()), _file_size(str(loc.shard)), info.dtype.name, list(info.shape),
                          info.begin, info.end])
        return ["fp8", *parts, list(self.block)]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.codes.shard.parent.name, "file": self.codes.shard.name,
                "tensor": self.codes.info.name, "dtype": self.codes.info.dtype.name,
                "scales": self.scales.info.name, "scale_dtype": self.scales.info.dtype.name, "scheme": self.scheme,
                "block": list(self.block)}
