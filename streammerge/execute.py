"""The local executor: runs a Plan on this machine, tensor after tensor, through the per-tensor runner.

``execute`` opens the work folder (a fresh one, or an interrupted run's to continue), opens the output shards,
checks what the journal says is done against the bytes on disk, and gets every tensor's job (its schedule). The
plan's compute workers (:mod:`streammerge.workers`) then take the jobs: each worker's reader thread reads its
jobs' reads into reusable slots ahead of its compute, the runner executes each job's steps, and the worker's writer
thread writes, checksums and journals its finished chunks behind them (:class:`LocalIO` is a worker's view of these
threads). Finally the work folder is published as the output folder.

A stop (SIGINT/SIGTERM with ``handle_signals``, or Ctrl-C as ``KeyboardInterrupt``), a full disk, a GPU out of
memory or bad data (NaN, overflow) stops the run with everything durable journaled and the work folder kept: the
same command, or ``streammerge resume OUT``, continues it.
"""

from __future__ import annotations

import errno
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from . import fsio, heap
from ._torch import load_torch, torch
from .device import compute_class, gpu_memory_peak, make_compute
from .errors import NonFiniteError, StreamMergeError
from .faults import checkpoint
from .formats.reader import InputFiles
from .output import work_folder_for
from .parts import PartFolder, WorkUnit, unit_plan
from .pipeline import Prefetcher, Staged, WriteBehind
from .planner import Plan, TensorPlan
from .progress import Progress, RunSummary
from .runner import Parts, TensorJob, run_tensor
from .schedule import Read
from .stopping import MergeInterrupted, StopFlag
from .workers import Feed, JobQueue, run_workers
from .workfolder import DiskFullError, WorkFolder, check_output_free, finished_output


class MergeNotice(UserWarning):
    """Something the caller should know that does not stop the merge (a capped budget, work redone after a change,
    statistics recomputed)."""


def _warn(message: str) -> None:
    warnings.warn(message, MergeNotice, stacklevel=3)


class LocalIO:
    """One worker's I/O on this machine (see :mod:`streammerge.workers`): staged reads from its own reader thread,
    writes through its own writer thread (``writer``; ``writers``: every worker's, this one's included, which a
    read of the output waits for)."""

    def __init__(self, plan: Plan, work: WorkFolder | None, stop: StopFlag, shown: Progress,
                 writer: WriteBehind | None, inputs: InputFiles, jobs: JobQueue,
                 writers: Sequence[WriteBehind] = ()) -> None:
        self.plan, self.work, self.stop, self.shown = plan, work, stop, shown
        self.writer, self.inputs, self.jobs, self.writers = writer, inputs, jobs, tuple(writers)
        self.compute = make_compute(torch.device(plan.budget.device))
        self.prefetch: Prefetcher | None = None
        self._staged: dict[int, Staged] = {}  # reads whose slot is still in use, by id
        self._fenced: set[str] = set()  # finished tensors whose writes every writer has done (read_output)

    def start_feed(self, feed: Feed) -> None:
        """Start this worker's reader on the reads of the jobs it claims (input checksums serve only a resume)."""
        self.prefetch = Prefetcher(self.inputs, feed.reads(), self.plan.slot_bytes, self.plan.depth,
                                   pin=self.compute.pin, checksum=self.work is not None and self.work.journal.enabled)

    # ---- TensorIO ------------------------------------------------------------------------------------------
    def take(self, read: Read) -> Parts:
        assert self.prefetch is not None
        staged = self.prefetch.get(read, self.check_stop)
        if staged.sums is not None:  # journaled ahead of the work done with these rows
            assert self.writer is not None
            self.writer.submit(self.work.record_inputs, read.tensor, staged.sums)
        if staged.skipped:  # a settled pass's read, left unread: done all the same
            self.shown.skipped(read.nbytes)
            self.prefetch.release(staged)
            return []
        self.shown.read(read.nbytes)
        if read.compute and self.compute.copies:  # copied to the device: the slot goes back to the reader at once
            parts = staged.parts
            flat = self.compute.upload([x for part in parts for x in part])
            self.prefetch.release(staged)
            out, at = [], 0
            for part in parts:
                out.append(tuple(flat[at : at + len(part)]))
                at += len(part)
            return out
        self._staged[id(read)] = staged
        return staged.parts

    def release(self, read: Read) -> None:
        staged = self._staged.pop(id(read), None)
        if staged is not None:
            assert self.prefetch is not None
            self.prefetch.release(staged)

    def skip(self, reads: Sequence[Read]) -> None:
        assert self.prefetch is not None
        self.prefetch.skip(reads)

    def run_blocks(self, blocks: Sequence[tuple[int, int]], work: Callable[[int, int], None]) -> None:
        self.jobs.run_blocks(blocks, work)

    def helpers_idle(self) -> bool:
        return self.jobs.idle()

    def output_buffer(self) -> tuple[int, torch.Tensor]:
        assert self.writer is not None
        return self.writer.buffer(self.check_stop)

    def write(self, t: TensorPlan, r0: int, r1: int, buffer: int, data: torch.Tensor, cursor: dict) -> None:
        assert self.writer is not None
        self.shown.wrote(data.numel() * data.element_size())
        self.writer.submit(self.work.write_chunk, t, r0, r1, memoryview(data.numpy()), cursor, buffer=buffer)

    def read_output(self, name: str, byte_offset: int, view: memoryview) -> None:
        assert self.writer is not None
        if name not in self._fenced:  # (its job has finished: every write of it was submitted before this read)
            for writer in self.writers:  # the bytes to copy are written, by whichever worker wrote them
                writer.fence(self.check_stop)
            self._fenced.add(name)
        self.work.read_output(name, byte_offset, view)

    def save_state(self, t: TensorPlan, state: dict[str, torch.Tensor]) -> None:
        assert self.writer is not None
        self.writer.submit(self.work.save_state, t, state)

    def checkpoint(self, event: str) -> None:
        assert self.writer is not None
        self.writer.submit(checkpoint, event)  # in order with the writes before it

    def phase(self, t: TensorPlan, text: str) -> None:
        self.shown.step(t.name, text)

    def progress(self, nbytes: int) -> None:
        self.shown.read(nbytes)

    def check_stop(self) -> None:
        self.stop.check()
        self.jobs.check()
        if self.writer is not None:  # this worker's writer failed: stop now, not at the next write
            self.writer.check()

    # ---- the run -------------------------------------------------------------------------------------------
    def commit(self) -> None:
        """A tensor is done: make its journal lines durable soon (a group commit, behind the writes)."""
        assert self.writer is not None
        self.writer.submit(self.work.journal.commit)

    def close(self) -> None:
        """Stop this worker's reader thread."""
        if self.prefetch is not None:
            self.prefetch.close()


def execute(plan: Plan, show_progress: bool = True, handle_signals: bool = False,
            notify: Callable[[str], None] | None = None,
            report: Callable[[RunSummary], None] | None = None, unit: WorkUnit | None = None,
            make_progress: Callable[[int, bool], Progress] = Progress) -> Path:
    """Run (or continue) ``plan`` and publish the merged model folder; returns its path.

    ``unit``: run only that part of the merge (``--part K/N``, see :mod:`streammerge.parts`): its shards are
    written into the shared work folder with its own journal, and nothing is published (``finalize`` does that).
    ``make_progress(total_bytes, show)`` makes the progress display (an executor may report elsewhere).

    ``handle_signals`` installs SIGINT/SIGTERM handlers for the run (stop at the next block, exit codes 130/143);
    without it Ctrl-C arrives as ``KeyboardInterrupt``, also resumable. ``notify`` receives what a caller should
    know about continuing a run (default: a :class:`MergeNotice` warning). ``report`` receives the
    :class:`~streammerge.progress.RunSummary` of a run that merged (default: its one-line summary on stderr when
    ``show_progress``).

    Raises :class:`MergeInterrupted`, :class:`DiskFullError`, :class:`NonFiniteError` or another
    :class:`StreamMergeError`, each saying how to continue; the work folder is kept for ``resume``.
    """
    recipe = plan.recipe
    notify = notify or _warn
    fsio.check_platform()
    if recipe.out is None:
        raise StreamMergeError("a merge needs an output folder (--out)")
    for note in plan.notes:
        notify(note)
    if finished_output(plan):
        # a previous run published the output but stopped before removing its work folder
        fsio.remove_tree(work_folder_for(recipe.out))
        if show_progress and report is None:
            print(f"{recipe.out} is already complete", file=sys.stderr)
        return recipe.out
    if not work_folder_for(recipe.out).is_dir():  # nothing to continue: the output must be free (or --force)
        check_output_free(plan)
    load_torch()  # the seconds this takes pass before anything is written
    heap.keep_freed_memory(plan.peak_ram)  # a block's temporaries reuse the last block's pages
    shown = make_progress(plan.bytes_read if unit is None else unit_plan(plan, unit).bytes_read, show_progress)
    work = WorkFolder.open(plan, notify) if unit is None else PartFolder.open_unit(plan, unit, notify)
    plan = work.plan  # a part's: its tensors and shards
    with StopFlag(handle_signals) as stop:
        pin = compute_class(torch.device(plan.budget.device)).pin
        writers: list[WriteBehind] = []
        inputs = InputFiles()
        ios: list[LocalIO] = []

        def close() -> None:
            for writer in writers:
                writer.close()  # finishes what was submitted (skipped after a failure)
            for io in ios:
                io.close()
            inputs.close()

        try:
            for _ in range(plan.workers):  # one at a time: those started are closed if the next cannot start
                writers.append(WriteBehind(plan.out_buffer_bytes, plan.depth, pin=pin))
            work.open_shards()
            if work.resumed:
                shown.say(f"resuming the interrupted merge in {work.path}: {work.done_count()} of "
                          f"{len(plan.tensors)} tensors already done (checking their bytes)")
                work.verify_journaled(notify)
            jobs = work.jobs(notify)
            shown.begin(len(jobs), resumed=sum(1 for j in jobs if not j.schedule.steps),
                        done_bytes=sum(j.schedule.skipped_bytes for j in jobs))
            queue = JobQueue(jobs, plan.workers)
            ios += [LocalIO(plan, work, stop, shown, writer, inputs, queue, writers) for writer in writers]

            def compute(io: LocalIO, index: int, job: TensorJob) -> None:
                shown.tensor(index)
                run_tensor(plan, job, io)
                io.commit()

            run_workers(queue, ios, compute, plan.threads_per_worker)
            for writer in writers:
                writer.drain()
            shown.finishing()
            work.finish()
        except (StreamMergeError, OSError, KeyboardInterrupt, torch.OutOfMemoryError) as exc:
            close()
            _keep(work, exc.tensor if isinstance(exc, NonFiniteError) else None)
            raise _explain(exc, work) from None
        finally:
            close()
            shown.close()
            work.close()
    if unit is None:
        summary = shown.summary(recipe.out, gpu_memory_peak(plan.budget.device))
    else:  # the part's shards, in the shared work folder
        summary = replace(shown.summary(work.model_dir, gpu_memory_peak(plan.budget.device)), out=str(recipe.out),
                          output_bytes=plan.bytes_written, output_files=len(plan.shards))
    if report is not None:
        report(summary)
    elif show_progress:
        print(summary.line(), file=sys.stderr)
    return recipe.out


def _keep(work: WorkFolder, moot: str | None = None) -> None:
    """After a failure: make what is journaled durable (a resumable folder), or delete a run without a journal or
    without any work journaled besides that of tensor ``moot`` (one with bad input values): nothing to resume, so
    nothing is left behind."""
    if not work.plan.recipe.journal:
        work.discard()
        return
    if work.journal.failed is not None:  # a sync or append failed: the journal ends with the last durable batch
        return
    try:
        work.journal.flush()
    except OSError:  # a full or failing disk: what was committed before stays
        return
    if not work.has_work(besides=moot):
        work.discard()


def _explain(exc: BaseException, work: WorkFolder) -> StreamMergeError:
    """The error the user sees, with how to continue."""
    recipe = work.plan.recipe
    kept = recipe.journal and work.path.exists()
    cont = f"; the work done so far is kept in {work.path}: {work.continue_hint()}" if kept else ""
    if isinstance(exc, MergeInterrupted):
        return MergeInterrupted(f"merge interrupted ({exc}){cont}", exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return MergeInterrupted(f"merge interrupted{cont}", 130)
    if isinstance(exc, torch.OutOfMemoryError):
        return StreamMergeError(f"the GPU ran out of memory (other processes may be using it): lower --max-vram, "
                                f"or use --device cpu{cont}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"disk full while writing the merge{cont}")
        return StreamMergeError(f"I/O error: {exc}{cont}")
    if isinstance(exc, DiskFullError):
        return DiskFullError(f"{exc}{cont}")
    assert isinstance(exc, StreamMergeError)
    if isinstance(exc, NonFiniteError) and exc.tensor:
        fix = ("write a wider output dtype (--dtype bfloat16 or float32), " if exc.overflow else "fix that input, ")
        exclude = "'^" + re.escape(exc.tensor) + "$'"
        if not kept:
            return NonFiniteError(f"{exc}. Nothing was written: {fix}or keep the base's value for this tensor with "
                                  f"--exclude {exclude}", exc.tensor, exc.overflow)
        done = f"{work.done_count()} tensor(s) already merged are kept in {work.path}"
        return NonFiniteError(
            f"{exc}. {done}: {fix}or keep the base's value for this tensor with --exclude {exclude}, then run the "
            "command again with --redo-changed (only what the change affects is redone)", exc.tensor, exc.overflow)
    if not kept:
        return exc
    done = f"{work.done_count()} tensor(s) already merged are kept in {work.path}"
    return type(exc)(f"{exc}. {done}: fix the cause and run the command again (add --redo-changed if the inputs "
                     "or options change)")


__all__ = ["DiskFullError", "MergeInterrupted", "MergeNotice", "RunSummary", "execute"]
