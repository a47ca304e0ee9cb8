"""Row-chunk reads (pread into reusable buffers) and the read-ahead / write-behind threads of ``pipeline``."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import save_file

from streammerge.errors import InputError
from streammerge.formats.checkpoint import load_checkpoint
from streammerge.formats.reader import InputFiles
from streammerge.manifest import crc
from streammerge.pipeline import Prefetcher, WriteBehind
from streammerge.schedule import Read
from streammerge.sources import StoredSource

DEPTH = 2

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32,
          torch.uint64]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).reshape(shape) % 97
    if dtype is torch.bool:
        return (x % 2).bool()
    return (x.float() / 7).to(dtype) if dtype.is_floating_point else x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_equal_slices_for_every_dtype(tmp_path, dtype):
    tensors = {"m": _tensor(dtype, (13, 5)), "v": _tensor(dtype, (11,)), "s": _tensor(dtype, ())}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = load_checkpoint(tmp_path)
    buf = torch.empty(1024, dtype=torch.uint8)
    with InputFiles() as files:
        for r0, r1 in [(0, 13), (0, 1), (3, 10), (12, 13), (5, 5)]:
            assert _same(files.read_into(ckpt.tensors["m"], r0, r1, buf), tensors["m"][r0:r1])
        assert _same(files.read(ckpt.tensors["v"], 2, 9), tensors["v"][2:9])
        assert _same(files.read(ckpt.tensors["s"], 0, 1), tensors["s"])
        with pytest.raises(ValueError, match="outside tensor 'm'"):
            files.read(ckpt.tensors["m"], 4, 14)
        with pytest.raises(ValueError, match="too small"):
            files.read_into(ckpt.tensors["m"], 0, 13, torch.empty(8, dtype=torch.uint8))


def test_reading_a_large_tensor_keeps_resident_memory_at_the_buffer(tmp_path):
    rows, cols = 4096, 8192  # 128 MiB of float32
    save_file({"big": torch.ones(rows, cols)}, str(tmp_path / "model.safetensors"))
    loc = load_checkpoint(tmp_path).tensors["big"]
    proc = psutil.Process(os.getpid())
    buf = torch.zeros(256 * cols * 4, dtype=torch.uint8)  # 8 MiB, touched before measuring
    before = proc.memory_info().rss
    peak, total = 0, 0.0
    with InputFiles() as files:
        for r0 in range(0, rows, 256):
            total += float(files.read_into(loc, r0, r0 + 256, buf).sum())
            peak = max(peak, proc.memory_info().rss - before)
    assert total == rows * cols
    assert peak < 24 * 2**20, f"resident memory grew by {peak / 2**20:.0f} MiB reading a 128 MiB tensor"


def test_reader_refuses_dtypes_torch_lacks_and_truncated_files(tmp_path):
    import json
    import struct

    header = json.dumps({"x": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    loc = load_checkpoint(tmp_path).tensors["x"]
    with InputFiles() as files, pytest.raises(InputError, match="F4"):
        files.read(loc, 0, 4)
    save_file({"y": torch.ones(64, 16)}, str(tmp_path / "y.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "y.safetensors").rename(tmp_path / "model.safetensors")
    loc = load_checkpoint(tmp_path).tensors["y"]
    os.truncate(tmp_path / "model.safetensors", (tmp_path / "model.safetensors").stat().st_size - 100)
    with InputFiles() as files, pytest.raises(InputError, match="ended early"):
        files.read(loc, 0, 64)


@pytest.fixture()
def two_models(tmp_path):
    a = {"w": torch.randn(40, 8), "b": torch.randn(8).to(torch.bfloat16)}
    b = {"w": torch.randn(40, 8), "b": torch.randn(8).to(torch.bfloat16)}
    for name, t in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file(t, str(tmp_path / name / "model.safetensors"))
    return [load_checkpoint(tmp_path / n) for n in "ab"], [a, b]


def _read(name: str, locs, r0: int, r1: int) -> Read:
    return Read(name, r0, r1, tuple(StoredSource(loc) for loc in locs))


def test_prefetcher_stages_the_schedule_in_order_in_reused_slots(two_models):
    ckpts, tensors = two_models
    w = tuple(c.tensors["w"] for c in ckpts)
    reads = [_read("w", w, r0, min(40, r0 + 16)) for r0 in range(0, 40, 16)]
    reads.append(_read("b", tuple(c.tensors["b"] for c in ckpts), 0, 8))
    slots = set()
    with InputFiles() as files:
        pre = Prefetcher(files, reads, slot_bytes=max(r.nbytes for r in reads) + 128, depth=DEPTH)
        try:
            for read in reads:
                staged = pre.get(read)
                slots.add(staged.slot)
                for (got,), want in zip(staged.parts, tensors):
                    assert _same(got, want[read.tensor][read.r0 : read.r1])
                pre.release(staged)
            with pytest.raises(RuntimeError, match="exhausted"):
                pre.get(reads[0])
        finally:
            pre.close()
    assert slots <= set(range(DEPTH))


@pytest.mark.parametrize("chunk", [1, 7, 16, 40])
def test_prefetcher_checksums_a_sweep_from_row_0_whatever_the_chunking(two_models, chunk):
    """Checksum reads carry the CRC-32 of each source's rows [0, r1), equal to a CRC of the tensor's bytes as stored;
    a later pass (not flagged) and a sweep that does not start at row 0 carry nothing."""
    ckpts, tensors = two_models
    w = tuple(StoredSource(c.tensors["w"]) for c in ckpts)
    sweep = [Read("w", r0, min(40, r0 + chunk), w, checksum=True) for r0 in range(0, 40, chunk)]
    again = [Read("w", r0, min(40, r0 + chunk), w) for r0 in range(0, 40, chunk)]
    mid = [Read("w", r0, min(40, r0 + chunk), w, checksum=True) for r0 in range(chunk, 40, chunk)]
    reads = sweep + again + mid
    want = [crc(t["w"].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) for t in tensors]
    with InputFiles() as files:
        pre = Prefetcher(files, reads, slot_bytes=max(r.nbytes for r in reads) + 128, depth=DEPTH)
        try:
            sums = []
            for read in reads:
                staged = pre.get(read)
                sums.append(staged.sums)
                pre.release(staged)
        finally:
            pre.close()
    assert [s.rows for s in sums[: len(sweep)]] == [r.r1 for r in sweep]
    assert sums[len(sweep) - 1].crcs == tuple((c,) for c in want)
    assert all(s is None for s in sums[len(sweep):])


def test_prefetcher_checks_the_order_and_reports_read_errors(two_models, tmp_path):
    ckpts, _ = two_models
    w = tuple(c.tensors["w"] for c in ckpts)
    with InputFiles() as files:
        first = _read("w", w, 0, 8)
        pre = Prefetcher(files, [first], slot_bytes=4096, depth=DEPTH)
        try:
            with pytest.raises(RuntimeError, match="out of step"):
                pre.get(_read("w", w, 0, 8))  # an equal read is not the same read
        finally:
            pre.close()
        os.truncate(ckpts[1].tensors["w"].shard, 200)
        whole = _read("w", w, 0, 40)
        pre = Prefetcher(files, [whole], slot_bytes=4096, depth=DEPTH)
        try:
            with pytest.raises(InputError, match="ended early"):
                pre.get(whole)
        finally:
            pre.close()


def test_prefetcher_refuses_a_read_larger_than_its_slot(two_models):
    ckpts, _ = two_models
    read = _read("w", (ckpts[0].tensors["w"],), 0, 40)
    with InputFiles() as files:
        pre = Prefetcher(files, [read], slot_bytes=100, depth=DEPTH)
        try:
            with pytest.raises(RuntimeError, match="more than the planned slot"):
                pre.get(read)
        finally:
            pre.close()


def test_prefetcher_close_does_not_hang_while_the_reader_waits_for_a_slot(two_models):
    ckpts, _ = two_models
    w = (ckpts[0].tensors["w"],)
    reads = [_read("w", w, 0, 40) for _ in range(10)]
    with InputFiles() as files:
        pre = Prefetcher(files, reads, slot_bytes=4096, depth=DEPTH)
        held = [pre.get(reads[0]), pre.get(reads[1])]  # both slots held: the reader is blocked
        done = threading.Event()
        threading.Thread(target=lambda: (pre.close(), done.set()), daemon=True).start()
        assert done.wait(10), "close() hung"
        assert len(held) == DEPTH


def test_waits_for_the_reader_and_the_writer_honour_a_stop_request(two_models):
    """A stop request is noticed while waiting for a slow read or a busy writer (not after it)."""
    ckpts, _ = two_models
    reads = [_read("w", (ckpts[0].tensors["w"],), 0, 40) for _ in range(3)]

    class Stop(Exception):
        pass

    calls = [0]

    def check() -> None:
        calls[0] += 1
        if calls[0] >= 3:
            raise Stop

    with InputFiles() as files:
        pre = Prefetcher(files, reads, slot_bytes=4096, depth=DEPTH)
        try:
            held = [pre.get(reads[0]), pre.get(reads[1])]  # both slots held: the third read cannot come
            with pytest.raises(Stop):
                pre.get(reads[2], check)
            assert calls[0] == 3 and len(held) == DEPTH
        finally:
            pre.close()
    wb = WriteBehind(16, depth=DEPTH)
    try:
        taken = [wb.buffer(), wb.buffer()]  # every buffer is out: the next one waits
        calls[0] = 0
        with pytest.raises(Stop):
            wb.buffer(check)
        assert len(taken) == DEPTH
    finally:
        wb.close()


@pytest.mark.parametrize("threaded", [True, False])
def test_write_behind_runs_calls_in_order_and_recycles_buffers(threaded):
    wb = WriteBehind(64, depth=DEPTH, threaded=threaded)
    seen: list[tuple[int, bytes]] = []
    try:
        for i in range(20):
            slot, buf = wb.buffer()
            buf[:4].fill_(i)
            wb.submit(lambda i=i, b=buf: seen.append((i, bytes(b[:4].numpy()))), buffer=slot)
        wb.drain()
    finally:
        wb.close()
    assert seen == [(i, bytes([i] * 4)) for i in range(20)]


def test_write_behind_raises_the_first_failure_once_and_skips_the_rest():
    wb = WriteBehind(16, depth=DEPTH)
    ran: list[int] = []

    def fail() -> None:
        raise OSError(28, "No space left on device")

    try:
        wb.submit(ran.append, 1)
        wb.submit(fail)
        wb.submit(ran.append, 3)
        with pytest.raises(OSError, match="No space"):
            wb.drain()
        wb.drain()  # reported once
        for _ in range(2 * DEPTH):  # buffers still come back: no deadlock after a failure
            slot, _ = wb.buffer()
            wb.submit(ran.append, 4, buffer=slot)
        wb.drain()
    finally:
        wb.close()
    assert ran == [1]


def test_a_fence_from_another_thread_waits_for_what_was_submitted_before_it():
    """A tied head's worker reads bytes another worker's writer writes: the fence returns once the calls submitted
    before it have run, while the writer's own worker goes on submitting."""
    wb = WriteBehind(16, depth=DEPTH)
    release, ran = threading.Event(), []
    try:
        wb.submit(release.wait)  # the writer is held here
        wb.submit(ran.append, "before")
        fenced = threading.Event()
        fencer = threading.Thread(target=lambda: (wb.fence(), fenced.set()))
        fencer.start()
        wb.submit(release.wait)  # after the fence: it must not wait for this one (nor block it)
        assert not fenced.wait(0.3) and ran == []
        release.set()
        fencer.join(5)
        assert fenced.is_set() and ran == ["before"]
        wb.drain()
    finally:
        release.set()
        wb.close()


def _failing_writer(error: OSError) -> WriteBehind:
    """A writer whose first submitted call has failed with ``error`` (not yet reported to its submitter)."""
    wb = WriteBehind(16, depth=DEPTH)

    def fail() -> None:
        raise error

    wb.submit(fail)
    while wb._error is None:  # (the writer thread runs it)
        time.sleep(0.001)
    return wb


def test_a_fence_raises_the_writers_failure_even_after_its_submitter_saw_it():
    """Bytes a failed writer was to write may be missing: reading them back must fail, not copy a hole."""
    wb = _failing_writer(OSError(5, "Input/output error"))
    try:
        with pytest.raises(OSError, match="Input/output"):
            wb.drain()  # the submitter's report
        for _ in range(2):
            with pytest.raises(OSError, match="Input/output"):
                wb.fence(lambda: None)  # another worker's, every time
    finally:
        wb.close()


def test_closing_abandons_a_large_read_between_pieces(tmp_path, monkeypatch):
    """A stop does not wait for a whole large read: the reader checks between pieces and gives up."""
    import streammerge.formats.reader as reader

    monkeypatch.setattr(reader, "READ_PIECE", 4096)
    save_file({"big": torch.ones(512, 256)}, str(tmp_path / "model.safetensors"))  # 512 KiB: 128 pieces
    loc = load_checkpoint(tmp_path).tensors["big"]
    read = _read("big", (loc,), 0, 512)
    pieces = []
    real = reader.pread_into
    started = threading.Event()
    holder: dict[str, Prefetcher] = {}

    def slow(fd, view, offset):  # type: ignore[no-untyped-def]
        pieces.append(offset)
        if len(pieces) == 3:
            started.wait(10)
            holder["pre"]._closed = True  # as close() does, in the middle of the read
        return real(fd, view, offset)

    monkeypatch.setattr(reader, "pread_into", slow)
    with InputFiles() as files:
        pre = holder["pre"] = Prefetcher(files, [read], slot_bytes=1 << 20, depth=DEPTH)
        started.set()
        pre._thread.join(10)
        assert not pre._thread.is_alive()
        pre.close()
    assert len(pieces) == 3, f"{len(pieces)} pieces read after the close"


def test_check_raises_a_writers_failure_to_its_submitter_between_writes():
    """A worker polls its writer while it waits for its reader or computes: a failed write stops it there, once."""
    wb = _failing_writer(OSError(28, "No space left on device"))
    try:
        with pytest.raises(OSError, match="No space"):
            wb.check()
        wb.check()  # reported once
    finally:
        wb.close()
