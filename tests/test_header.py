"""Tests of the hardened safetensors header parser (streammerge.formats.safetensors_header).

* a corpus of hand-built malformed files, each of which must raise one specific HeaderError subclass whose
  message names the file (and the tensor, where the defect belongs to one);
* files written by the reference ``safetensors`` library, checked against what ``safe_open`` reports;
* hypothesis properties: random valid files always parse, corrupted files only ever raise HeaderError.
"""

from __future__ import annotations

import json
import struct
import time
from math import prod
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from streammerge import errors as E
from streammerge.formats.safetensors_header import (
    MAX_HEADER_BYTES,
    ShardHeader,
    parse_header_bytes,
    read_header,
)

# --------------------------------------------------------------------------------------------------------------
# Helpers for building files by hand
# --------------------------------------------------------------------------------------------------------------

#: A tensor name distinctive enough that finding it in a message is meaningful.
W = "model.layers.0.mlp.weight"
W2 = "model.layers.1.mlp.weight"


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    """One tensor entry of a header (a valid 4-byte F32 tensor unless told otherwise)."""
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def blob(header: bytes | str | dict, data: bytes = b"", *, length: int | None = None) -> bytes:
    """``u64 length`` + header + data. ``header`` may be raw bytes/text or a dict (dumped as compact JSON);
    ``length`` overrides the declared header length."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def one(e: dict, data: bytes = b"\0" * 4, name: str = W) -> bytes:
    """A file with a single tensor entry ``name`` -> ``e``."""
    return blob({name: e}, data)


def write(directory: Path, content: bytes, name: str = "model.safetensors") -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, whatever its dtype (bf16/fp8/bool included) or rank."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_agrees_with_safetensors(path: Path, header: ShardHeader) -> None:
    """Names, dtypes, shapes, byte ranges and metadata agree with the reference reader."""
    content = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert set(header.tensors) == set(f.keys())
        assert header.metadata == f.metadata()
        for name, info in header.tensors.items():
            sl = f.get_slice(name)
            assert info.dtype.name == sl.get_dtype()
            assert list(info.shape) == list(sl.get_shape())
            assert content[info.begin : info.end] == tensor_bytes(f.get_tensor(name))


# --------------------------------------------------------------------------------------------------------------
# Malformed-header corpus
# --------------------------------------------------------------------------------------------------------------


def case(content: bytes, error: type[E.HeaderError], tensor: str | None, id: str, marks=()):
    return pytest.param(content, error, tensor, id=id, marks=marks)


_DUP_TENSOR = (
    '{"%s":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    '"%s":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' % (W, W)
)
_DUP_IN_ENTRY = '{"%s":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}' % W
_DUP_METADATA = '{"__metadata__":{"format":"pt","format":"np"}}'

CORPUS = [
    # --- the 8-byte prefix and the declared length
    case(b"", E.FileTooSmallError, None, "empty-file"),
    case(b"\x01\x02\x03\x04\x05", E.FileTooSmallError, None, "five-byte-file"),
    case(b"\x00" * 7, E.FileTooSmallError, None, "seven-byte-file"),
    case(blob("{}", length=MAX_HEADER_BYTES + 1), E.HeaderTooLargeError, None, "length-above-cap"),
    case(blob("{}", length=2**64 - 1), E.HeaderTooLargeError, None, "length-u64-max"),
    case(blob("{}", length=100), E.HeaderLengthError, None, "length-past-eof"),
    case(struct.pack("<Q", 1), E.HeaderLengthError, None, "length-with-no-header-bytes"),
    # --- encoding and JSON syntax
    case(blob(b'{"\xff\xfe":{}}'), E.HeaderEncodingError, None, "invalid-utf8"),
    case(blob(b'{"caf\xc3":{}}'), E.HeaderEncodingError, None, "truncated-utf8-sequence"),
    case(blob(b'{"\xed\xa0\x80":{}}'), E.HeaderEncodingError, None, "utf8-encoded-surrogate"),
    case(blob(""), E.HeaderNotJSONError, None, "zero-length-header"),
    case(blob("  {}"), E.HeaderNotJSONError, None, "leading-whitespace"),
    case(blob("PK\x03\x04 not a safetensors file"), E.HeaderNotJSONError, None, "not-starting-with-brace"),
    case(blob('{"%s": ' % W), E.HeaderNotJSONError, None, "invalid-json-unterminated"),
    case(blob("{} x"), E.HeaderNotJSONError, None, "json-trailing-garbage"),
    # What safetensors 0.8's save_file({}, metadata={}) writes (the reference reader rejects it too).
    case(blob('{},"__metadata__":{}}   '), E.HeaderNotJSONError, None, "json-extra-data-after-object"),
    case(blob('{"__metadata__":{"a":NaN}}'), E.HeaderNotJSONError, None, "json-nan-constant"),
    case(blob('{"%s":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}' % W, b"\0" * 4),
         E.HeaderNotJSONError, None, "json-infinity-constant"),
    case(blob('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"), E.HeaderNotJSONError, None, "json-nested-too-deep"),
    case(blob("[]"), E.HeaderNotObjectError, None, "json-array-top-level"),
    # --- duplicate keys
    case(blob(_DUP_TENSOR, b"\0" * 4), E.DuplicateKeyError, W, "duplicate-tensor-key"),
    # The message names the repeated key but not the tensor: see test_duplicate_key_in_entry_names_tensor.
    case(blob(_DUP_IN_ENTRY, b"\0" * 4), E.DuplicateKeyError, None, "duplicate-key-in-entry"),
    case(blob(_DUP_METADATA), E.DuplicateKeyError, None, "duplicate-metadata-key"),
    # --- __metadata__
    case(blob({"__metadata__": ["format", "pt"]}), E.MetadataError, None, "metadata-is-array"),
    case(blob({"__metadata__": "pt"}), E.MetadataError, None, "metadata-is-string"),
    case(blob({"__metadata__": {"step": 1000}}), E.MetadataError, None, "metadata-int-value"),
    case(blob({"__metadata__": {"cfg": {"a": "b"}}}), E.MetadataError, None, "metadata-object-value"),
    case(blob({"__metadata__": {"x": None}}), E.MetadataError, None, "metadata-null-value"),
    # --- tensor entries
    case(one(["F32", [1], [0, 4]]), E.TensorEntryError, W, "entry-is-array"),
    case(one("F32"), E.TensorEntryError, W, "entry-is-string"),
    case(one({"dtype": "F32", "shape": [1]}), E.TensorEntryError, W, "entry-missing-data-offsets"),
    case(one({**entry(), "requires_grad": False}), E.TensorEntryError, W, "entry-extra-field"),
    case(one(entry(), name=""), E.TensorEntryError, None, "empty-tensor-name"),
    # --- dtype
    case(one(entry(dtype="F128")), E.UnknownDtypeError, W, "unknown-dtype"),
    case(one(entry(dtype="f32")), E.UnknownDtypeError, W, "dtype-lowercase"),
    case(one(entry(dtype=32)), E.UnknownDtypeError, W, "dtype-not-string"),
    case(one(entry(dtype=["F32"])), E.UnknownDtypeError, W, "dtype-is-list"),
    # --- shape
    case(one(entry(shape=[-1])), E.ShapeError, W, "shape-negative-dim"),
    case(one(entry(shape=[1.0])), E.ShapeError, W, "shape-float-dim"),
    case(one(entry(shape=[True])), E.ShapeError, W, "shape-bool-dim"),
    case(one(entry(shape=["1"])), E.ShapeError, W, "shape-string-dim"),
    case(one({**entry(), "shape": 1}), E.ShapeError, W, "shape-not-list"),
    case(one({**entry(), "shape": None}), E.ShapeError, W, "shape-null"),
    case(one(entry(shape=[2**40, 2**40])), E.ShapeError, W, "shape-element-count-overflow"),
    # --- data_offsets
    case(one(entry(offsets=[0, 4, 8])), E.OffsetsError, W, "offsets-three-items"),
    case(one(entry(offsets=[4])), E.OffsetsError, W, "offsets-one-item"),
    case(one(entry(shape=[0], offsets=[4, 0])), E.OffsetsError, W, "offsets-end-before-begin"),
    case(one(entry(offsets=[-4, 0])), E.OffsetsError, W, "offsets-negative"),
    case(one(entry(offsets=[0.0, 4.0])), E.OffsetsError, W, "offsets-floats"),
    case(one(entry(offsets=[False, 4])), E.OffsetsError, W, "offsets-bool"),
    case(one({**entry(), "data_offsets": "0-4"}), E.OffsetsError, W, "offsets-not-list"),
    # --- sizes and layout
    case(one(entry(shape=[2], offsets=[0, 4])), E.SizeMismatchError, W, "size-mismatch"),
    case(one(entry(dtype="BF16", shape=[3], offsets=[0, 4])), E.SizeMismatchError, W, "size-mismatch-bf16"),
    case(one(entry(dtype="F4", shape=[3], offsets=[0, 2]), b"\0" * 2), E.SizeMismatchError, W,
         "size-fractional-bytes"),
    case(blob({W: entry(offsets=[0, 4]), W2: entry(offsets=[8, 12])}, b"\0" * 12), E.OffsetGapError, W2,
         "gap-between-tensors"),
    case(one(entry(offsets=[4, 8]), b"\0" * 8), E.OffsetGapError, W, "first-tensor-not-at-zero"),
    case(blob({W: entry(shape=[2], offsets=[0, 8]), W2: entry(shape=[2], offsets=[4, 12])}, b"\0" * 12),
         E.OffsetOverlapError, W2, "overlapping-tensors"),
    case(blob({W: entry(), W2: entry()}, b"\0" * 4), E.OffsetOverlapError, W2, "identical-ranges"),
    case(blob({W: entry(shape=[2], offsets=[0, 8]), W2: entry(shape=[0], offsets=[4, 4])}, b"\0" * 8),
         E.OffsetOverlapError, W2, "empty-tensor-inside-another"),
    case(one(entry(), b"\0" * 3), E.TruncatedDataError, None, "data-truncated"),
    case(one(entry(), b""), E.TruncatedDataError, None, "data-missing"),
    case(one(entry(), b"\0" * 5), E.TrailingBytesError, None, "trailing-bytes"),
    case(blob("{}", b"\0"), E.TrailingBytesError, None, "trailing-bytes-no-tensors"),
]

HEADER_ERRORS = {c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.HeaderError)} - {
    E.HeaderError
}


def test_corpus_covers_every_header_error():
    assert len(CORPUS) >= 24
    assert {p.values[1] for p in CORPUS} == HEADER_ERRORS
    assert len({p.id for p in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("content, error, tensor", CORPUS)
def test_malformed_header(tmp_path, content, error, tensor):
    path = write(tmp_path, content)
    with pytest.raises(error) as info:
        read_header(path)
    assert type(info.value) is error  # the exact class, not just some subclass
    message = str(info.value)
    assert str(path) in message
    if tensor is not None:
        assert repr(tensor) in message


@pytest.mark.parametrize("content, error, tensor", CORPUS)
def test_malformed_header_bytes(content, error, tensor):
    """parse_header_bytes raises the same error from the bytes alone and names ``where``."""
    with pytest.raises(error, match="^somewhere/shard.safetensors: "):
        parse_header_bytes(content, len(content), "somewhere/shard.safetensors")


def test_duplicate_key_in_entry_names_tensor(tmp_path):
    path = write(tmp_path, blob(_DUP_IN_ENTRY, b"\0" * 4))
    with pytest.raises(E.DuplicateKeyError, match=W.replace(".", r"\.")):
        read_header(path)


def test_header_errors_are_input_errors(tmp_path):
    """Callers catching InputError / StreamMergeError also catch header defects."""
    path = write(tmp_path, b"")
    with pytest.raises(E.InputError):
        read_header(path)
    assert all(issubclass(c, E.StreamMergeError) for c in HEADER_ERRORS)


def test_missing_file_is_input_error(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(E.InputError, match="absent.safetensors") as info:
        read_header(path)
    assert not isinstance(info.value, E.HeaderError)


# --------------------------------------------------------------------------------------------------------------
# Valid files
# --------------------------------------------------------------------------------------------------------------


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, 2, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(10, dtype=torch.uint8),
        "f64": torch.randn(2, 2, 2, generator=g, dtype=torch.float64),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 16),
        "scalar": torch.tensor(3.5),
    }


EXPECTED_DTYPES = {
    "f32": "F32", "bf16": "BF16", "f16": "F16", "i64": "I64", "bool": "BOOL",
    "u8": "U8", "f64": "F64", "f8": "F8_E4M3", "empty": "F32", "scalar": "F32",
}


def test_save_file_with_many_dtypes(tmp_path):
    tensors = mixed_tensors()
    metadata = {"format": "pt", "note": "héllo ✓", "empty": ""}
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    header = read_header(path)

    assert header.path == path
    assert header.file_size == path.stat().st_size
    assert header.data_start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header.metadata == metadata
    assert set(header.tensors) == set(tensors)
    content = path.read_bytes()
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.dtype.name == EXPECTED_DTYPES[name]
        assert info.dtype.torch == t.dtype
        assert info.shape == tuple(t.shape)
        assert content[info.begin : info.end] == tensor_bytes(t)
    assert header.tensors["scalar"].shape == ()
    assert header.tensors["empty"].nbytes == 0
    # File order: ``tensors`` is sorted by offset and covers the data section exactly.
    infos = list(header.tensors.values())
    assert [i.begin for i in infos] == sorted(i.begin for i in infos)
    assert infos[0].begin == header.data_start and infos[-1].end == header.file_size
    assert_agrees_with_safetensors(path, header)


@pytest.mark.parametrize("padding", [0, 1, 7, 100])
def test_header_padding_spaces_accepted(tmp_path, padding):
    header_text = json.dumps({W: entry(shape=[2], offsets=[0, 8])}) + " " * padding
    path = write(tmp_path, blob(header_text, struct.pack("<2f", 1.0, -2.0)))

    header = read_header(path)

    assert header.data_start == 8 + len(header_text)
    info = header.tensors[W]
    assert (info.begin, info.end, info.shape, info.dtype.name) == (header.data_start, header.data_start + 8, (2,), "F32")
    assert_agrees_with_safetensors(path, header)


def test_header_without_tensors(tmp_path):
    path = write(tmp_path, blob("{}" + " " * 6))

    header = read_header(path)

    assert header.tensors == {}
    assert header.metadata is None
    assert header.data_start == header.file_size == 16


def test_metadata_only_header(tmp_path):
    path = write(tmp_path, blob({"__metadata__": {"format": "pt"}}))
    header = read_header(path)
    assert header.tensors == {}
    assert header.metadata == {"format": "pt"}


def test_save_file_without_tensors(tmp_path):
    path = tmp_path / "none.safetensors"
    save_file({}, str(path))
    header = read_header(path)
    assert header.tensors == {} and header.metadata is None


def test_empty_tensors_share_offsets(tmp_path):
    """Zero-byte tensors may sit at any boundary, including on top of each other, like the reference allows."""
    hdr = {W: entry(shape=[0, 3], offsets=[0, 0]), W2: entry(shape=[1], offsets=[0, 4]),
           "tail": entry(shape=[5, 0], offsets=[4, 4]), "tail2": entry(dtype="BF16", shape=[0], offsets=[4, 4])}
    path = write(tmp_path, blob(hdr, b"\0" * 4))
    header = read_header(path)
    assert {n: i.nbytes for n, i in header.tensors.items()} == {W: 0, W2: 4, "tail": 0, "tail2": 0}
    assert_agrees_with_safetensors(path, header)


def test_parse_header_bytes_reads_prefix_only():
    """parse_header_bytes needs only the prefix + header; the data bytes may be absent from ``raw``."""
    content = one(entry(shape=[3], offsets=[0, 12]), b"\0" * 12)
    header_end = len(content) - 12
    header = parse_header_bytes(content[:header_end], len(content), "x.safetensors")
    assert header.tensors[W].begin == header_end and header.tensors[W].end == len(content)
    with pytest.raises(E.HeaderLengthError, match="x.safetensors"):
        parse_header_bytes(content[: header_end - 1], len(content), "x.safetensors")


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------

TORCH_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
]

_names = st.text(alphabet="abcxyz._-0123456789", min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
_shapes = st.lists(st.integers(min_value=0, max_value=5), max_size=4).map(tuple)
_tensor_specs = st.dictionaries(_names, st.tuples(st.sampled_from(TORCH_DTYPES), _shapes), max_size=8)
_metadata = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=3)


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return (torch.arange(prod(shape), dtype=torch.float32).reshape(shape) % 7 - 3).to(dtype)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=_tensor_specs, metadata=_metadata)
def test_random_save_file_parses(tmp_path, specs, metadata):
    # safetensors' own writer emits invalid JSON for no tensors with metadata={} (see the corpus).
    assume(specs or metadata != {})
    tensors = {name: make_tensor(dtype, shape) for name, (dtype, shape) in specs.items()}
    path = tmp_path / "random.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    header = read_header(path)

    assert header.metadata == metadata
    assert set(header.tensors) == set(tensors)
    content = path.read_bytes()
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.dtype.torch == t.dtype
        assert info.shape == tuple(t.shape)
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size()
        assert info.rows == (t.shape[0] if t.dim() else 1)
        assert info.rows * info.row_numel == info.numel
        if t.dim():
            assert info.row_numel == (t[0].numel() if t.shape[0] else prod(t.shape[1:]))
        else:
            assert info.row_numel == 1
        assert content[info.begin : info.end] == tensor_bytes(t)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory) -> list[bytes]:
    """A few valid files to corrupt: a saved model, one whose data is all spaces (so a longer declared
    header still ends in JSON whitespace), and a tensor-less one."""
    d = tmp_path_factory.mktemp("valid")
    out = []
    for name, tensors in [
        ("model", {"a": torch.randn(4, 3), "b": torch.ones(5, dtype=torch.bfloat16), "c": torch.tensor(7)}),
        ("spaces", {"s": torch.full((64,), ord(" "), dtype=torch.uint8)}),
        ("none", {}),
    ]:
        path = d / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        read_header(path)  # sanity: the uncorrupted file is valid
        out.append(path.read_bytes())
    return out


def _read_corrupted(directory: Path, content: bytes, position: int, xor: int) -> ShardHeader:
    corrupted = bytearray(content)
    corrupted[position] ^= xor
    path = write(directory, bytes(corrupted), "corrupted.safetensors")
    start = time.monotonic()
    try:
        return read_header(path)
    finally:
        assert time.monotonic() - start < 10, "read_header took too long on a corrupted file"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), position=st.integers(0, 7), xor=st.integers(1, 255))
def test_corrupted_length_prefix_raises_header_error(tmp_path, valid_files, which, position, xor):
    """Any change to the declared length makes the layout inconsistent, so it must raise - and only HeaderError."""
    with pytest.raises(E.HeaderError):
        _read_corrupted(tmp_path, valid_files[which], position, xor)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), data=st.data(), xor=st.integers(1, 255))
def test_corrupted_header_byte_never_escapes(tmp_path, valid_files, which, data, xor):
    """A flipped header byte either still parses (e.g. F32 -> I32) - then the reference reader agrees - or raises
    a HeaderError, never anything else."""
    content = valid_files[which]
    header_end = 8 + struct.unpack("<Q", content[:8])[0]
    position = data.draw(st.integers(8, header_end - 1), label="position")
    try:
        header = _read_corrupted(tmp_path, content, position, xor)
    except E.HeaderError:
        return
    assert_agrees_with_safetensors(tmp_path / "corrupted.safetensors", header)
