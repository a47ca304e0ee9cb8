"""A hardened safetensors header parser: reads the header of a file, never its tensor data.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON + the tensor bytes. The parser trusts
nothing: it caps N, checks it against the file size, rejects invalid UTF-8, non-JSON, duplicate keys, unknown
dtypes, malformed shapes and offsets, shape x dtype sizes that disagree with the byte range, gaps, overlaps,
data past the end of the file and trailing bytes. Each defect raises its own :class:`HeaderError` subclass with
the file and tensor named.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors as E
from ..shapes import RowLayout
from .dtypes import DTYPES, DType

#: Largest header accepted (the reference implementation's cap).
MAX_HEADER_BYTES = 100_000_000
#: Largest element count of one tensor accepted (guards the size arithmetic).
MAX_ELEMENTS = 1 << 53


@dataclass(frozen=True)
class TensorInfo(RowLayout):
    """Where one tensor lives in its file. ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row."""
        return self.row_numel * self.dtype.bits // 8


@dataclass(frozen=True)
class ShardHeader:
    """A parsed, validated header. ``tensors`` keeps file order (by offset)."""

    path: Path
    file_size: int
    data_start: int
    metadata: dict[str, str] | None
    tensors: dict[str, TensorInfo] = field(repr=False)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


class _Duplicated(dict):
    """A JSON object that repeated ``key``; reported by the caller, which knows where the object sits."""

    key: str


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            dup = _Duplicated(out)
            dup.key = key
            return dup
        out[key] = value
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_header_bytes(raw: bytes, file_size: int, where: str = "<bytes>") -> ShardHeader:
    """Validate the first bytes of a file (at least the prefix and header) given the file's total size."""
    if file_size < 8 or len(raw) < 8:
        raise E.FileTooSmallError(f"{where}: {file_size} bytes is too small for a safetensors file (needs >= 8)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise E.HeaderTooLargeError(f"{where}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > file_size:
        raise E.HeaderLengthError(
            f"{where}: header length {n} runs past the end of the {file_size}-byte file (truncated or not safetensors)"
        )
    if len(raw) < 8 + n:
        raise E.HeaderLengthError(f"{where}: could only read {len(raw) - 8} of {n} header bytes")
    body = raw[8 : 8 + n]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise E.HeaderEncodingError(f"{where}: header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise E.HeaderNotJSONError(f"{where}: header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise E.HeaderNotObjectError(f"{where}: header JSON is a {type(obj).__name__}, not an object")
    if not text.startswith("{"):
        raise E.HeaderNotJSONError(f"{where}: header does not start with '{{' (not a safetensors file?)")
    if isinstance(obj, _Duplicated):
        raise E.DuplicateKeyError(f"{where}: header repeats the key {obj.key!r}")
    for name, value in obj.items():
        if isinstance(value, _Duplicated):
            raise E.DuplicateKeyError(f"{where}: entry {name!r} repeats the key {value.key!r}")
    data_start = 8 + n
    return ShardHeader(
        path=Path(where), file_size=file_size, data_start=data_start, metadata=_metadata(obj, where),
        tensors=_tensors(obj, where, data_start, file_size),
    )


def _metadata(obj: dict[str, Any], where: str) -> dict[str, str] | None:
    meta = obj.get("__metadata__")
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise E.MetadataError(f"{where}: __metadata__ must map strings to strings")
    return dict(meta)


def _tensors(obj: dict[str, Any], where: str, data_start: int, file_size: int) -> dict[str, TensorInfo]:
    entries: list[TensorInfo] = []
    for name, entry in obj.items():
        if name == "__metadata__":
            continue
        entries.append(_tensor(name, entry, where, data_start))
    entries.sort(key=lambda t: (t.begin, t.end))
    expected = data_start
    for t in entries:
        if t.begin > expected:
            raise E.OffsetGapError(
                f"{where}: tensor {t.name!r} starts at data offset {t.begin - data_start}, leaving a gap after "
                f"offset {expected - data_start}"
            )
        if t.begin < expected:
            raise E.OffsetOverlapError(
                f"{where}: tensor {t.name!r} (data offsets {t.begin - data_start}..{t.end - data_start}) overlaps "
                f"the tensor before it, which ends at {expected - data_start}"
            )
        expected = t.end
    if expected > file_size:
        raise E.TruncatedDataError(
            f"{where}: tensor data ends at byte {expected} but the file has only {file_size} bytes (truncated)"
        )
    if expected < file_size:
        raise E.TrailingBytesError(
            f"{where}: {file_size - expected} unexpected bytes after the last tensor (ends at {expected})"
        )
    return {t.name: t for t in entries}


def _tensor(name: str, entry: Any, where: str, data_start: int) -> TensorInfo:
    if not name:
        raise E.TensorEntryError(f"{where}: a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise E.TensorEntryError(
            f"{where}: tensor {name!r} must be an object with exactly 'dtype', 'shape' and 'data_offsets'"
        )
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise E.UnknownDtypeError(f"{where}: tensor {name!r} has unknown dtype {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise E.ShapeError(f"{where}: tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_ELEMENTS:
            raise E.ShapeError(f"{where}: tensor {name!r} shape {shape} has too many elements")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise E.OffsetsError(f"{where}: tensor {name!r} data_offsets {offsets!r} must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise E.OffsetsError(f"{where}: tensor {name!r} data_offsets {offsets} end before they begin")
    bits = numel * dtype.bits
    if bits % 8 or bits // 8 != end - begin:
        raise E.SizeMismatchError(
            f"{where}: tensor {name!r} is {dtype_name} {shape} = {bits / 8:g} bytes but data_offsets span "
            f"{end - begin} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Open ``path`` and validate its header against the file's size; reads no tensor data."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            body = f.read(min(n, MAX_HEADER_BYTES)) if 8 + n <= size else b""
    except OSError as exc:
        raise E.InputError(f"cannot read {p}: {exc.strerror or exc}") from None
    header = parse_header_bytes(prefix + body, size, str(p))
    return ShardHeader(p, header.file_size, header.data_start, header.metadata, header.tensors)
