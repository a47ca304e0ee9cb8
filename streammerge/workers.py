"""Compute workers: the tensors of a run computed ``plan.workers`` at a time, on this machine.

Each worker is a thread that computes one tensor at a time with the per-tensor runner, single-threaded inside
torch, beside its own reader thread, which prefetches the reads of the tensors the worker claims, and its own
writer thread, which writes and journals their chunks. Workers claim
tensors from one :class:`JobQueue`, so which worker computes a tensor varies from run to run, but nothing a tensor's
bytes depend on does: its statistics are reduced in row order whichever thread computes a block, its chunks are
written at their planned offsets, and each worker's share of the budget only changes chunk sizes, which the bytes
never depend on.

Why this rather than torch's intra-op threads: those meet at a barrier after every element-wise operation. With
more runnable threads than cores (other programs busy beside the merge), every barrier waits for a descheduled
thread while the others spin, and a merge ran 3–10× slower than its fair share (bench/README.md). Independent
workers have no barrier; a descheduled one delays only its own tensor.

With one worker (a GPU, ``--threads 1``, or a budget too small for more) the tensors run in the calling thread,
in the plan's order.

A worker with nothing left to claim (the queue is empty, or its next job is a tied head waiting for its embedding)
helps the others: where a merge declares a pass's blocks independent (``TensorMerge.independent_blocks``: each
block reads the merge's state and writes only its own rows), the worker computing a chunk shares its blocks
(:meth:`JobQueue.run_blocks`), so a large tensor (an embedding) does not leave the other cores idle at the end of
a run. Each block is computed once, by one thread, into its own rows: the bytes do not depend on who computes it.
A pass whose blocks become independent part-way (a selection's first block chooses what the others need) shares
the rest of the chunk from then on. Where a pass's blocks need work that does not depend on their order but would
otherwise be done in it (``TensorMerge.blocks_ahead``: the ties TIES meets in each block, which tell where the next
block starts keeping them, in its merge pass and its L1 pass; DELLA's per-row ranking before its L1 sums), and only
while workers are idle, that work is done first for every block of the chunk (shared the same way), then the
blocks. Float64 column sums, which are
added tile after tile in row order (WIDEN's statistics of a matrix, the L1 rescale's, SCE's, the Gram sums), are
shared too: a block out of turn sums its tiles apart, and they join the total in row order once every block before
it has (``methods._tiles.FusedTiles``), the same adds in the same order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from ._torch import torch
from .methods import Rule
from .pipeline import POLL_SECONDS, wait_for
from .runner import TensorJob
from .schedule import Read


class WorkerAborted(Exception):
    """Another worker failed: this one stops at its next check (never reaches the caller)."""


Block = tuple[int, int]


class SharedBlocks:
    """The blocks of one chunk, each computed once by ``work(b0, b1)``: by the worker that owns the chunk and by
    helpers. The first failure stops the handing out of blocks; the owner raises it once no block is in flight."""

    def __init__(self, blocks: Sequence[Block], work: Callable[[int, int], None]) -> None:
        self._blocks, self._work = list(blocks), work
        self._next = 0
        self._in_flight = 0
        self._cond = threading.Condition()
        self.error: BaseException | None = None
        self.helped = 0  # blocks computed by helpers

    def open(self) -> bool:
        """Whether blocks are left to hand out."""
        return self.error is None and self._next < len(self._blocks)

    def _take(self) -> Block | None:
        with self._cond:
            if not self.open():
                return None
            self._next += 1
            self._in_flight += 1
            return self._blocks[self._next - 1]

    def compute(self, helper: bool) -> None:
        """Compute blocks until none is left to hand out; a failure is kept for the owner (a helper's too)."""
        while (block := self._take()) is not None:
            try:
                self._work(*block)
            except BaseException as exc:  # handed to the owner
                with self._cond:
                    self.error = self.error or exc
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self.helped += helper
                    self._cond.notify_all()

    def wait(self) -> None:
        """Until no block is in flight (a helper's writes into the owner's buffers are done); then raise the first
        failure, if any. Blocks are short, so this waits without polling for a stop."""
        with self._cond:
            while self._in_flight:
                self._cond.wait()
        if self.error is not None:
            raise self.error


class JobQueue:
    """The jobs of a run, claimed one by one by the workers' readers. With several workers the largest come first
    (so no large tensor starts last while the other workers idle); tied heads always come last, and one waits
    until its embedding is finished. ``abort`` stops every worker at its next check."""

    def __init__(self, jobs: Sequence[TensorJob], workers: int) -> None:
        order = list(jobs)
        if workers > 1:
            order.sort(key=lambda j: (j.tensor.rule is Rule.TIED_COPY, -sum(r.nbytes for r in j.schedule.reads)))
        self._pending: queue.SimpleQueue[tuple[int, TensorJob]] = queue.SimpleQueue()
        for item in enumerate(order):
            self._pending.put(item)
        self._finished = {j.tensor.name: threading.Event() for j in jobs}
        self.aborted = threading.Event()
        self._help = threading.Condition()  # guards the three below; notified when work to help with appears
        self._shared: list[SharedBlocks] = []  # chunks whose blocks other workers may compute
        self._idle = 0  # workers ready to help
        self._unfinished = len(jobs)
        self.helped = 0  # blocks computed by helpers in this run

    def claim(self) -> tuple[int, TensorJob] | None:
        """The next job and its position in the run (0-based), or None when every job is taken."""
        try:
            return self._pending.get_nowait()
        except queue.Empty:
            return None

    def finish(self, job: TensorJob) -> None:
        self._finished[job.tensor.name].set()
        with self._help:
            self._unfinished -= 1
            self._help.notify_all()

    def wait_finished(self, name: str, check: Callable[[], None]) -> None:
        """Wait until tensor ``name`` is finished (a tied head's embedding), helping meanwhile, calling ``check``."""
        done = self._finished.get(name)
        if done is not None:
            self.help(check, done.is_set)

    def idle(self) -> bool:
        """Whether a worker is waiting to help (read without the lock: a hint, at worst one chunk goes unshared)."""
        return self._idle > 0

    def run_blocks(self, blocks: Sequence[Block], work: Callable[[int, int], None]) -> None:
        """``work(b0, b1)`` for every block, independent of one another: here, and shared with workers that have
        nothing else to do when there are any. Returns when every block is done; raises the first failure."""
        if len(blocks) < 2 or not self.idle():
            for block in blocks:
                work(*block)
            return
        shared = SharedBlocks(blocks, work)
        with self._help:
            self._shared.append(shared)
            self._help.notify_all()
        try:
            shared.compute(helper=False)
        finally:
            with self._help:
                self._shared.remove(shared)
            shared.wait()
            with self._help:
                self.helped += shared.helped

    def help(self, check: Callable[[], None], until: Callable[[], bool] | None = None) -> None:
        """Compute other workers' shared blocks until ``until()`` (default: every job is finished) or an abort;
        ``check`` between blocks and while waiting."""
        done = until or (lambda: self._unfinished == 0)
        with self._help:
            self._idle += 1
        try:
            while True:
                with self._help:
                    shared = self._open_shared()
                    if shared is None and not done() and not self.aborted.is_set():
                        self._help.wait(POLL_SECONDS)
                        shared = self._open_shared()
                if done() or self.aborted.is_set():
                    return
                check()
                if shared is not None:
                    shared.compute(helper=True)
        finally:
            with self._help:
                self._idle -= 1

    def _open_shared(self) -> SharedBlocks | None:
        """A shared chunk with blocks left to hand out (under ``_help``)."""
        return next((x for x in self._shared if x.open()), None)

    def check(self) -> None:
        if self.aborted.is_set():
            raise WorkerAborted


class Feed:
    """One worker's share of the queue: its reader claims the next job when it is ready to read it, and the worker
    computes the jobs in the order its reader claimed them (one list, so the two cannot disagree)."""

    def __init__(self, jobs: JobQueue) -> None:
        self.jobs = jobs
        self._claimed: queue.Queue[tuple[int, TensorJob] | None] = queue.Queue()

    def reads(self) -> Iterator[Read]:
        """Every read of the jobs this worker claims, in order (consumed by its reader thread)."""
        while (item := self.jobs.claim()) is not None:
            self._claimed.put(item)
            yield from item[1].schedule.reads
        self._claimed.put(None)

    def next_job(self, check: Callable[[], None]) -> tuple[int, TensorJob] | None:
        return wait_for(self._claimed, check)


class Worker(Protocol):
    """What :func:`run_workers` needs of each worker's I/O (the executors' ``TensorIO`` implementations)."""

    def start_feed(self, feed: Feed) -> None:
        """Start the reader thread on ``feed.reads()``."""

    def check_stop(self) -> None: ...


def run_workers(jobs: JobQueue, workers: Sequence[Worker], compute: Callable[[Worker, int, TensorJob], None],
                threads_each: int = 1) -> None:
    """Run every job of ``jobs`` on ``workers`` (each gets a :class:`Feed`): ``compute(worker, index, job)`` runs
    one job, with ``threads_each`` torch intra-op threads (the plan's ``threads_per_worker``). One worker runs in
    the calling thread; several run in threads of their own, and the first failure (or a ``KeyboardInterrupt`` of
    the calling thread) stops them all and is raised here once every worker has stopped."""
    def work(w: Worker, feed: Feed) -> None:
        while (item := feed.next_job(w.check_stop)) is not None:
            index, job = item
            if job.tensor.rule is Rule.TIED_COPY and job.tensor.copy_of is not None:
                jobs.wait_finished(job.tensor.copy_of, w.check_stop)
            compute(w, index, job)
            jobs.finish(job)
        jobs.help(w.check_stop)  # nothing left to claim: help the workers still computing

    before = torch.get_num_threads()
    torch.set_num_threads(threads_each)  # also the default of the threads started below (torch copies it)
    try:
        feeds = [Feed(jobs) for _ in workers]
        for w, feed in zip(workers, feeds):
            w.start_feed(feed)
        if len(workers) == 1:
            work(workers[0], feeds[0])
        else:
            _in_threads(jobs, workers, feeds, work, threads_each)
    finally:
        torch.set_num_threads(before)


def _in_threads(jobs: JobQueue, workers: Sequence[Worker], feeds: Sequence[Feed],
                work: Callable[[Worker, Feed], None], threads_each: int) -> None:
    errors: list[BaseException] = []
    lock = threading.Lock()

    def thread_main(w: Worker, feed: Feed) -> None:
        torch.set_num_threads(threads_each)  # the workers are the parallelism (see the module docstring)
        try:
            work(w, feed)
        except WorkerAborted:
            pass
        except BaseException as exc:  # handed to the calling thread
            with lock:
                errors.append(exc)
            jobs.aborted.set()

    threads = [threading.Thread(target=thread_main, args=(w, f), name=f"streammerge-compute-{i + 1}", daemon=True)
               for i, (w, f) in enumerate(zip(workers, feeds))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(POLL_SECONDS)  # wakes for signal handlers and Ctrl-C
    except BaseException:
        jobs.aborted.set()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]
