"""The safetensors dtype table: names, element sizes, torch equivalents and the writer's sort order.

``DTYPES`` lists every dtype the safetensors format defines, in the order of the reference
implementation's ``Dtype`` enum; ``safetensors`` lays tensors out by that order (largest first, then by name),
so the writer needs it to produce identical bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from ..errors import StreamMergeError

if TYPE_CHECKING:
    import torch


@cache
def _torch_dtype(attr: str | None) -> Any:
    if attr is None:
        return None
    import torch  # noqa: PLC0415 (torch is loaded on first use: header checks and ``verify`` do without it)

    return getattr(torch, attr, None)


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: its name, size in bits, and the torch dtype (None if torch has none)."""

    name: str
    bits: int
    torch_name: str | None  # the torch attribute, e.g. "bfloat16"
    rank: int  # position in the reference enum; the writer sorts by it, descending

    @property
    def torch(self) -> torch.dtype | None:
        return _torch_dtype(self.torch_name)

    @property
    def is_float(self) -> bool:
        """A floating-point dtype torch can hold (F4 and F6 cannot: they are packed quantized codes)."""
        return self.name.startswith(("F", "BF")) and self.torch_name is not None


_ORDER: list[tuple[str, int, str | None]] = [
    ("BOOL", 8, "bool"),
    ("F4", 4, None),
    ("F6_E2M3", 6, None),
    ("F6_E3M2", 6, None),
    ("U8", 8, "uint8"),
    ("I8", 8, "int8"),
    ("F8_E5M2", 8, "float8_e5m2"),
    ("F8_E4M3", 8, "float8_e4m3fn"),
    ("F8_E8M0", 8, "float8_e8m0fnu"),
    ("I16", 16, "int16"),
    ("U16", 16, "uint16"),
    ("F16", 16, "float16"),
    ("BF16", 16, "bfloat16"),
    ("I32", 32, "int32"),
    ("U32", 32, "uint32"),
    ("F32", 32, "float32"),
    ("C64", 64, "complex64"),
    ("F64", 64, "float64"),
    ("I64", 64, "int64"),
    ("U64", 64, "uint64"),
]

DTYPES: dict[str, DType] = {name: DType(name, bits, td, i) for i, (name, bits, td) in enumerate(_ORDER)}

# Names users may give for an output dtype.
OUTPUT_DTYPE_ALIASES: dict[str, str] = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}


def from_torch(dtype: torch.dtype) -> DType:
    """The safetensors dtype of a torch dtype."""
    for d in DTYPES.values():
        if d.torch is not None and d.torch == dtype:
            return d
    raise StreamMergeError(f"torch dtype {dtype} has no safetensors equivalent")


def parse_output_dtype(text: str) -> DType:
    """Parse a user's ``--dtype`` (float32/fp32, float16/fp16, bfloat16/bf16, or a safetensors name)."""
    key = str(text).strip().removeprefix("torch.")  # also a torch.dtype (from Python)
    name = OUTPUT_DTYPE_ALIASES.get(key.lower(), key.upper())
    if name not in ("F32", "F16", "BF16"):
        choices = ", ".join(sorted({"float32", "float16", "bfloat16"}))
        raise StreamMergeError(f"unsupported output dtype {text!r}: choose one of {choices}")
    return DTYPES[name]
