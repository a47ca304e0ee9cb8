"""Row-chunk reads from memory-mapped shards: exact values for every dtype, bounded resident memory."""

from __future__ import annotations

import os

import psutil
import pytest
import torch
from safetensors.torch import save_file

from streammerge.errors import InputError
from streammerge.formats.checkpoint import load_checkpoint
from streammerge.formats.reader import ShardReader

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
          torch.uint64]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).reshape(shape) % 97
    if dtype is torch.bool:
        return (x % 2).bool()
    return (x.float() / 7).to(dtype) if dtype.is_floating_point else x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_equal_slices_for_every_dtype(tmp_path, dtype):
    tensors = {"m": _tensor(dtype, (13, 5)), "v": _tensor(dtype, (11,)), "s": _tensor(dtype, ())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = load_checkpoint(tmp_path)
    with ShardReader() as reader:
        for r0, r1 in [(0, 13), (0, 1), (3, 10), (12, 13), (5, 5)]:
            got = reader.rows(ckpt.tensors["m"], r0, r1)
            assert got.dtype == dtype and got.shape == (r1 - r0, 5)
            assert torch.equal(got.view(torch.uint8), tensors["m"][r0:r1].contiguous().view(torch.uint8))
        assert torch.equal(reader.rows(ckpt.tensors["v"], 2, 9).view(torch.uint8), tensors["v"][2:9].view(torch.uint8))
        assert reader.rows(ckpt.tensors["s"], 0, 1).shape == ()
        with pytest.raises(ValueError, match="outside tensor 'm'"):
            reader.rows(ckpt.tensors["m"], 4, 14)


def test_release_keeps_resident_memory_bounded(tmp_path):
    rows, cols = 4096, 8192  # 128 MiB of float32
    save_file({"big": torch.ones(rows, cols)}, str(tmp_path / "model.safetensors"))
    loc = load_checkpoint(tmp_path).tensors["big"]
    proc = psutil.Process(os.getpid())
    before = proc.memory_info().rss
    peak = 0
    total = 0.0
    with ShardReader() as reader:
        for r0 in range(0, rows, 256):  # 8 MiB chunks
            total += float(reader.rows(loc, r0, r0 + 256).sum())
            reader.release(loc, r0, r0 + 256)
            peak = max(peak, proc.memory_info().rss - before)
    assert total == rows * cols
    assert peak < 48 * 2**20, f"resident memory grew by {peak / 2**20:.0f} MiB reading a 128 MiB tensor"


def test_reader_refuses_dtypes_torch_lacks(tmp_path):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    loc = load_checkpoint(tmp_path).tensors["x"]
    with ShardReader() as reader, pytest.raises(InputError, match="F4"):
        reader.rows(loc, 0, 4)
