"""Overlap of reading, computing and writing: a reader thread ahead of the compute, a writer thread behind it.

The executor lays out its reads as a schedule of :class:`ReadJob` up front. :class:`Prefetcher` works through it
on a background thread, reading each job's rows of every input into one of a fixed number of reusable *slots*
(plain ``pread``, which releases the GIL), so the next chunk loads while the current one is computed. The compute
takes staged jobs in schedule order and gives their slots back; a slot can also be kept across passes (a tensor
read once for all of them).

:class:`WriteBehind` runs the durable side effects (shard writes, checksums, journal lines, failpoints) on one
background thread in submission order, so the disk writes while the next chunk is computed. Output chunks are
formed in a fixed number of reusable buffers that the writer hands back once written.

Every buffer is allocated once, at the size the plan counted, and reused: resident memory is fixed by the plan,
and the allocator never has to fault fresh pages in for each chunk.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .formats.checkpoint import Located
from .formats.reader import InputFiles, align, row_range_bytes

#: slots and output buffers: one being worked on, one being filled (read ahead or written behind)
DEPTH = 2


@dataclass(frozen=True)
class ReadJob:
    """Rows [r0, r1) of every input in ``locs``; ``key`` names the job so the consumer can check the order."""

    key: tuple[Any, ...]
    locs: tuple[Located, ...]
    r0: int
    r1: int

    @property
    def nbytes(self) -> int:
        return sum(align(row_range_bytes(loc, self.r0, self.r1)[1]) for loc in self.locs)


@dataclass
class Staged:
    """A job whose rows are in memory: one typed view per input, inside slot ``slot``."""

    job: ReadJob
    inputs: list[torch.Tensor]
    slot: int


def _buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


class Prefetcher:
    """Reads a schedule of jobs into ``DEPTH`` reusable slots of ``slot_bytes`` on a background thread."""

    def __init__(self, files: InputFiles, jobs: Sequence[ReadJob], slot_bytes: int, pin: bool = False,
                 on_read: Callable[[int], None] | None = None) -> None:
        self.files = files
        self.jobs = list(jobs)
        self.slot_bytes = slot_bytes
        self.pin = pin
        self._slots: list[torch.Tensor | None] = [None] * DEPTH
        self._free: queue.Queue[int | None] = queue.Queue()
        for i in range(DEPTH):
            self._free.put(i)
        self._ready: queue.Queue[Staged | BaseException | None] = queue.Queue()
        self._closed = False
        self._next = 0
        self._thread = threading.Thread(target=self._run, name="streammerge-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for job in self.jobs:
                slot = self._free.get()
                if slot is None or self._closed:
                    return
                self._ready.put(self._read(job, slot))
            self._ready.put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._ready.put(exc)

    def _read(self, job: ReadJob, slot: int) -> Staged:
        need = job.nbytes
        if need > self.slot_bytes:
            raise RuntimeError(f"read job {job.key} needs {need} bytes, more than the planned slot ({self.slot_bytes})")
        buf = self._slots[slot]
        if buf is None:
            buf = self._slots[slot] = _buffer(self.slot_bytes, self.pin)
        views, at = [], 0
        for loc in job.locs:
            views.append(self.files.read_into(loc, job.r0, job.r1, buf[at:]))
            at += align(row_range_bytes(loc, job.r0, job.r1)[1])
        return Staged(job, views, slot)

    def get(self, key: tuple[Any, ...]) -> Staged:
        """The next staged job, which must be ``key`` (the schedule and the consumer walk the same order)."""
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if item is None:
            raise RuntimeError(f"read schedule exhausted, but {key} was asked for")
        if item.job.key != key:
            raise RuntimeError(f"read schedule out of step: staged {item.job.key}, asked for {key}")
        self._next += 1
        return item

    def release(self, staged: Staged) -> None:
        """Give a staged job's slot back for the reader to refill (its views must no longer be used)."""
        staged.inputs = []
        self._free.put(staged.slot)

    def close(self) -> None:
        self._closed = True
        self._free.put(None)
        self._thread.join()
        self._slots = [None] * DEPTH


class WriteBehind:
    """Runs submitted calls in order on a background thread; owns ``DEPTH`` reusable output buffers.

    The first failure is kept and raised to the submitter at its next call; later calls are skipped (their
    buffers still come back), so a failed disk never deadlocks the compute.
    """

    def __init__(self, buffer_bytes: int, pin: bool = False, threaded: bool = True) -> None:
        self.buffer_bytes = buffer_bytes
        self.pin = pin
        self._buffers: list[torch.Tensor | None] = [None] * DEPTH
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(DEPTH):
            self._free.put(i)
        self._jobs: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], int | None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._reported = False
        self._threaded = threaded
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="streammerge-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                self._jobs.task_done()
                return
            self._execute(*item)
            self._jobs.task_done()

    def _execute(self, fn: Callable[..., Any], args: tuple[Any, ...], buffer: int | None) -> None:
        try:
            if self._error is None:
                fn(*args)
        except BaseException as exc:
            self._error = exc
        finally:
            if buffer is not None:
                self._free.put(buffer)

    def _raise(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def buffer(self) -> tuple[int, torch.Tensor]:
        """A free output buffer (index, uint8 tensor of ``buffer_bytes``), waiting for the writer if needed."""
        self._raise()
        i = self._free.get()
        buf = self._buffers[i]
        if buf is None:
            buf = self._buffers[i] = _buffer(self.buffer_bytes, self.pin)
        return i, buf

    def submit(self, fn: Callable[..., Any], *args: Any, buffer: int | None = None) -> None:
        """Run ``fn(*args)`` after everything submitted before; then free output ``buffer`` (if given)."""
        self._raise()
        if self._threaded:
            self._jobs.put((fn, args, buffer))
        else:
            self._execute(fn, args, buffer)
            self._raise()

    def drain(self) -> None:
        """Wait until every submitted call has run; raise the first failure."""
        if self._threaded:
            self._jobs.join()
        self._raise()

    def close(self) -> None:
        """Finish what was submitted (skipped after a failure) and stop the thread; never raises."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._buffers = [None] * DEPTH
