"""The writer: planned headers and offsets give the same bytes as safetensors.torch.save_file."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from streammerge.formats.dtypes import from_torch
from streammerge.formats.safetensors_header import read_header
from streammerge.writer import OutTensor, ShardFile, layout_shard, shard_filename, split_into_shards

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64, torch.uint8]


def _write_chunked(folder, tensors: dict[str, torch.Tensor], rows_per_chunk: int):
    layout = layout_shard("out.safetensors", [OutTensor(n, from_torch(t.dtype).name, tuple(t.shape)) for n, t in tensors.items()])
    f = ShardFile(layout, folder)
    f.create()
    for name, t in tensors.items():
        rows = t.shape[0] if t.dim() else 1
        row_numel = t.numel() // rows if rows else 0
        flat = t.contiguous().reshape(rows, row_numel)
        row_bytes = row_numel * t.element_size()
        for r0 in range(0, flat.shape[0], rows_per_chunk):
            chunk = flat[r0 : r0 + rows_per_chunk].contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write_at(name, r0 * row_bytes, memoryview(chunk))
    f.finalize()
    return folder / "out.safetensors"


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=0, max_size=6),
       st.integers(1, 4))
def test_chunked_writes_equal_save_file(tmp_path_factory, specs, rows_per_chunk):
    folder = tmp_path_factory.mktemp("w")
    tensors = {f"t{i}.{'x' * (i % 3)}": _random(d, tuple(s), i) for i, (d, s) in enumerate(specs)}
    ours = _write_chunked(folder, tensors, rows_per_chunk)
    save_file(tensors, str(folder / "ref.safetensors"), metadata={"format": "pt"})
    assert ours.read_bytes() == (folder / "ref.safetensors").read_bytes()
    assert set(read_header(ours).tensors) == set(tensors)


def test_unicode_names_and_order_match_save_file(tmp_path):
    tensors = {"ü.weight": torch.ones(2), "a": torch.zeros(3, dtype=torch.bfloat16), "Z": torch.arange(4)}
    ours = _write_chunked(tmp_path, tensors, 1)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_writer_refuses_out_of_order_calls_and_overflow(tmp_path):
    layout = layout_shard("x.safetensors", [OutTensor("a", "F32", (2,))])
    f = ShardFile(layout, tmp_path)
    with pytest.raises(RuntimeError, match="needs created"):
        f.write_at("a", 0, b"\0" * 4)
    f.create()
    with pytest.raises(RuntimeError, match="create\\(\\) in state created"):
        f.create()
    with pytest.raises(ValueError, match="overflows tensor 'a'"):
        f.write_at("a", 4, b"\0" * 8)
    f.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        f.write_at("a", 0, b"\0" * 4)


def test_split_into_shards_keeps_order_and_limit():
    ts = [OutTensor(f"t{i}", "F32", (10,)) for i in range(7)]  # 40 bytes each
    groups = split_into_shards(ts, 100)
    assert [[t.name for t in g] for g in groups] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]]
    big = split_into_shards([OutTensor("huge", "F32", (1000,)), OutTensor("s", "F32", (1,))], 100)
    assert [[t.name for t in g] for g in big] == [["huge"], ["s"]]
    assert shard_filename(0, 1) == "model.safetensors"
    assert shard_filename(1, 3) == "model-00002-of-00003.safetensors"
