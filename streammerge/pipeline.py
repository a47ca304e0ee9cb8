"""Overlap of reading, computing and writing: a reader thread ahead of the compute, a writer thread behind it.

:class:`Prefetcher` works through the reads of the tensors' schedules on a background thread, reading each read's
byte ranges (as its sources name them) into one of ``depth`` reusable *slots* (plain ``pread``, which releases the
GIL), so the next chunk loads while the current one is computed. The compute takes staged reads in schedule order
(each is checked to be the very read it asks for) and gives their slots back; a slot can be kept across steps (a
tensor read once for every pass). The reader also checksums the bytes of the reads the schedule flags, as they
arrive (:class:`~streammerge.inputsums.Sweep`); a staged read carries the result for the journal.

:class:`WriteBehind` runs the durable side effects (shard writes, checksums, journal lines, failpoints) on a
background thread in submission order, so the disk writes while the next chunk is computed. Output chunks are
formed in ``depth`` reusable buffers that the writer hands back once written. Each compute worker has its own
reader and its own writer: copying a chunk into the page cache costs about as much as reading it, and one thread
doing it for every worker became the bound once the arithmetic ran on several cores (see :mod:`streammerge.journal`
for why the journal stays honest with several writers).

Every buffer is allocated once, at the size the plan counted, and reused: resident memory is fixed by the plan,
and the allocator never has to fault fresh pages in for each chunk. Waits poll a ``check`` callback, so a stop
request is honoured within a fraction of a second even while the disk is slow.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._torch import torch
from .formats.reader import InputFiles, ReadCancelled
from .inputsums import InputSums, Sweep
from .schedule import Read
from .sources.base import align

#: seconds between stop checks while waiting for the reader or the writer
POLL_SECONDS = 0.1

T = TypeVar("T")


def wait_for(q: queue.Queue[T], check: Callable[[], None] | None) -> T:
    """``q.get()``, calling ``check`` (which may raise) every :data:`POLL_SECONDS` while waiting."""
    while True:
        try:
            return q.get(timeout=POLL_SECONDS if check is not None else None)
        except queue.Empty:
            assert check is not None
            check()


@dataclass
class Staged:
    """A read whose bytes are in memory: per source, its parts (typed views inside slot ``slot``); ``sums``: the
    checksums of its tensor's input rows [0, read.r1), for a checksum read (see :mod:`streammerge.inputsums`)."""

    read: Read
    parts: list[tuple[torch.Tensor, ...]]
    slot: int
    sums: InputSums | None = None
    skipped: bool = False  # left unread (:meth:`Prefetcher.skip`): no parts


def _buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


def read_layout(read: Read) -> list[tuple[int, int]]:
    """(offset in the slot, length) of every byte range of ``read``, sources in order, each aligned."""
    out, at = [], 0
    for source in read.sources:
        for rng in source.ranges(read.r0, read.r1):
            out.append((at, rng.length))
            at += align(rng.length)
    return out


class Prefetcher:
    """Reads ``reads`` (iterated on the background thread) into ``depth`` reusable slots of ``slot_bytes`` (and,
    with ``checksum``, checksums the reads flagged so)."""

    def __init__(self, files: InputFiles, reads: Iterable[Read], slot_bytes: int, depth: int,
                 pin: bool = False, checksum: bool = True) -> None:
        self.files = files
        self.reads = reads  # consumed on the reader thread (a worker's feed claims jobs as it is iterated)
        self.slot_bytes = slot_bytes
        self.pin = pin
        self._slots: list[torch.Tensor | None] = [None] * depth
        self._free: queue.Queue[int | None] = queue.Queue()
        for i in range(depth):
            self._free.put(i)
        self._ready: queue.Queue[Staged | BaseException | None] = queue.Queue()
        self._closed = False
        self._sweep = Sweep() if checksum else None
        self._skipping: set[int] = set()  # ids of reads not to perform (:meth:`skip`)
        self._thread = threading.Thread(target=self._run, name="streammerge-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for read in self.reads:
                slot = self._free.get()
                if slot is None or self._closed:
                    return
                if id(read) in self._skipping:  # (the consumer forgets the id once it takes the read)
                    self._ready.put(Staged(read, [], slot, skipped=True))
                else:
                    self._ready.put(self._read(read, slot))
            self._ready.put(None)
        except ReadCancelled:  # closing: nobody waits for this read
            return
        except BaseException as exc:  # handed to the consumer, raised there
            self._ready.put(exc)

    def _read(self, read: Read, slot: int) -> Staged:
        layout = read_layout(read)
        need = sum(align(n) for _, n in layout)
        if need > self.slot_bytes:
            raise RuntimeError(f"read of {read.tensor} rows [{read.r0}, {read.r1}) needs {need} bytes, more than "
                               f"the planned slot ({self.slot_bytes})")
        buf = self._slots[slot]
        if buf is None:
            buf = self._slots[slot] = _buffer(self.slot_bytes, self.pin)
        parts, pieces, k = [], [], 0
        for source in read.sources:
            buffers, ranges = [], source.ranges(read.r0, read.r1)
            for rng in ranges:
                at, length = layout[k]
                buffers.append(self.files.read_range(rng, buf[at : at + length], lambda: self._closed))
                k += 1
            parts.append(source.parts(buffers, read.r0, read.r1))
            pieces.append(list(zip(ranges, buffers)))
        return Staged(read, parts, slot, self._sweep.add(read, pieces) if self._sweep is not None else None)

    def get(self, read: Read, check: Callable[[], None] | None = None) -> Staged:
        """The next staged read, which must be ``read`` itself (the schedule and the consumer walk one list)."""
        item = wait_for(self._ready, check)
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        if item is None:
            raise RuntimeError(f"read schedule exhausted, but {read.tensor} rows [{read.r0}, {read.r1}) was asked for")
        if item.read is not read:
            raise RuntimeError(f"read schedule out of step: staged {item.read.tensor} rows [{item.read.r0}, "
                               f"{item.read.r1}), asked for {read.tensor} rows [{read.r0}, {read.r1})")
        self._skipping.discard(id(read))  # consumed: its id may belong to another read later
        return item

    def skip(self, reads: Iterable[Read]) -> None:
        """Leave these reads (of the schedule, not yet consumed; never a checksum read) unread: :meth:`get` stages
        each without its bytes. One the reader has already read is simply not used."""
        for read in reads:
            assert not read.checksum, f"{read.tensor}: a checksum read must be read"
            self._skipping.add(id(read))

    def release(self, staged: Staged) -> None:
        """Give a staged read's slot back for the reader to refill (its views must no longer be used)."""
        staged.parts = []
        self._free.put(staged.slot)

    def close(self) -> None:
        self._closed = True
        self._free.put(None)
        self._thread.join()
        self._slots = [None] * len(self._slots)


class WriteBehind:
    """Runs submitted calls in order on a background thread; owns ``depth`` reusable output buffers.

    The first failure is kept and raised to the submitter at its next call; later calls are skipped (their
    buffers still come back), so a failed disk never deadlocks the compute.
    """

    def __init__(self, buffer_bytes: int, depth: int, pin: bool = False, threaded: bool = True) -> None:
        self.buffer_bytes = buffer_bytes
        self.pin = pin
        self._buffers: list[torch.Tensor | None] = [None] * depth
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(depth):
            self._free.put(i)
        # (call, its arguments, the output buffer it frees, whether it runs even after a failure)
        self._jobs: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...], int | None, bool] | None] = queue.Queue()
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

    def _execute(self, fn: Callable[..., Any], args: tuple[Any, ...], buffer: int | None, always: bool) -> None:
        try:
            if self._error is None or always:
                fn(*args)
        except BaseException as exc:
            self._error = exc
        finally:
            if buffer is not None:
                self._free.put(buffer)

    def check(self) -> None:
        """Raise the writer's failure to its submitter if it has not been raised yet (a poll between writes)."""
        self._raise()

    def _raise(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def buffer(self, check: Callable[[], None] | None = None) -> tuple[int, torch.Tensor]:
        """A free output buffer (index, uint8 tensor of ``buffer_bytes``), waiting for the writer if needed."""
        self._raise()
        i = wait_for(self._free, check)
        buf = self._buffers[i]
        if buf is None:
            buf = self._buffers[i] = _buffer(self.buffer_bytes, self.pin)
        return i, buf

    def submit(self, fn: Callable[..., Any], *args: Any, buffer: int | None = None) -> None:
        """Run ``fn(*args)`` after everything submitted before; then free output ``buffer`` (if given)."""
        self._raise()
        if self._threaded:
            self._jobs.put((fn, args, buffer, False))
        else:
            self._execute(fn, args, buffer, False)
            self._raise()

    def fence(self, check: Callable[[], None] | None = None) -> None:
        """Wait (calling ``check`` every :data:`POLL_SECONDS`) until everything submitted so far has run, from any
        thread, while the submitter may go on submitting; then raise the writer's failure if it had one, even one
        already raised to its submitter: what the calls were to write may not be there. For reading back bytes
        another worker wrote (a tied head's copy of the embedding)."""
        if self._threaded:
            done = threading.Event()
            self._jobs.put((done.set, (), None, True))
            while not done.wait(POLL_SECONDS):
                if check is not None:
                    check()
        if self._error is not None:
            raise self._error

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
        self._buffers = [None] * len(self._buffers)
