"""The executor: runs a Plan chunk by chunk: read → float32 → method → finite check → cast → writer → journal.

A reader thread reads row chunks of every input into reusable slots ahead of the compute, and a writer thread
writes, checksums and journals finished chunks behind it (``pipeline``), so the disk and the CPU work together.
For each tensor: the statistics passes (if the method has any) feed the method every chunk of the base and the
models, whose resulting state is journaled; the emit pass asks the method for the float32 result, checks it is
finite, casts it into an output buffer at the planned dtype, and hands it to the writer, which journals the chunk
once it is durable. A tensor that fits the budget whole is read once for all its passes. The compute works in
cache-sized blocks of rows inside a chunk, so its float32 temporaries stay small and are reused.

A work folder that a previous run left (crash, Ctrl-C, full disk) is continued: the fingerprint must match, the
journaled chunks are checked against the bytes on disk, and only what is missing is done (the budget, and so the
chunking, may differ). SIGINT/SIGTERM stop at the next chunk boundary with everything durable journaled.
"""

from __future__ import annotations

import errno
import json
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ._version import __version__
from .errors import NonFiniteError, StreamMergeError
from .faults import checkpoint
from .device import make_compute
from .formats.checkpoint import Located
from .formats.dtypes import DTYPES, parse_output_dtype
from .formats.reader import InputFiles
from .journal import Journal, ResumeError, crc, write_json_atomic
from .methods import Rule, TensorMerge
from .output import copy_side_files, publish, work_folder_for, write_index, write_json, write_model_card
from .pipeline import Prefetcher, ReadJob, Staged, WriteBehind
from .plan import Plan, TensorPlan, describe_changes
from .units import format_size
from .writer import ShardFile

MANIFEST = "streammerge-manifest.json"


class MergeInterrupted(StreamMergeError):
    """SIGINT or SIGTERM stopped the merge at a chunk boundary; the work folder can be resumed."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DiskFullError(StreamMergeError):
    """The disk filled up; the work folder can be resumed once space is freed."""


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag checked at chunk boundaries (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now, the journal is still consistent
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


#: stored dtypes whose values float32 holds exactly (a float64 model is rounded to float32 first, as the base is)
_EXACT_IN_FLOAT32 = (torch.bfloat16, torch.float16, torch.float32)


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or infinity makes the sum non-finite, so a finite sum settles it
    with one fast reduction; only a non-finite sum (which finite values can also give, by overflow) needs the
    element-wise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class _Run:
    """One execution: input files, shard writers, journal, progress, the stop flag and the read/write threads."""

    def __init__(self, plan: Plan, work: Path, journal: Journal, progress: tqdm, stop: _StopSignals) -> None:
        self.plan = plan
        self.work = work
        self.model_dir = work / "model"
        self.journal = journal
        self.inputs = InputFiles()
        self.files = {s.filename: ShardFile(s, self.model_dir) for s in plan.shards}
        self.progress = progress
        self.stop = stop
        self.index = {t.name: i for i, t in enumerate(plan.tensors)}
        self.states: dict[str, dict[str, torch.Tensor]] = {}  # statistics a previous run saved
        self.prefetch: Prefetcher | None = None
        self.writer: WriteBehind | None = None
        self.compute = make_compute(torch.device(plan.budget.device))

    # ---- opening and checking what a previous run left ---------------------------------------------------
    def open_shards(self) -> None:
        need = sum(f.layout.size for f in self.files.values() if not f.path.exists())
        free = shutil.disk_usage(self.model_dir).free
        if need > free:
            raise DiskFullError(
                f"not enough disk space for the output: {format_size(need)} still to allocate, {format_size(free)} "
                f"free where {self.model_dir} is; free space (or choose another --out) and run the command again"
            )
        for name, f in self.files.items():
            if not f.open_existing():
                for t in self.plan.tensors:  # a missing or damaged shard: its tensors start over
                    if t.shard == name:
                        self.journal.truncate(t.name, 0)
                f.create()
            self.journal.watch_fd(f.fd)
        checkpoint("shards-open")

    def verify_journaled(self) -> None:
        """Check every journaled chunk's bytes against its checksum; forget from the first bad one on."""
        for t in self.plan.tensors:
            p = self.journal.get(t.name)
            row_bytes = t.out_row_bytes
            running = 0
            for i, (r0, r1, checksum) in enumerate(p.chunks):
                running = crc(self.files[t.shard].read_at(t.name, r0 * row_bytes, (r1 - r0) * row_bytes), running)
                if running != checksum:
                    self.journal.truncate(t.name, i)
                    break

    # ---- the schedule of reads, and the threads that overlap I/O with compute ------------------------------
    def locs(self, t: TensorPlan) -> tuple[Located, ...]:
        """The inputs read for ``t``: the base only for a copy, else the base and every model."""
        base = self.plan.base.tensors[t.name]
        if t.rule is Rule.COPY_BASE:
            return (base,)
        # A tied head may be absent from a model; it is never merged (TIED_COPY), so base-only is fine there.
        return (base, *(m.tensors[t.name] for m in self.plan.models if t.name in m.tensors))

    def done(self, t: TensorPlan) -> bool:
        p = self.journal.get(t.name)
        return p.rows_done >= t.rows and bool(p.chunks)

    def schedule(self, order: list[TensorPlan]) -> list[ReadJob]:
        """Every read the run will make, in the order the compute consumes them (see :meth:`merge`)."""
        jobs: list[ReadJob] = []
        for t in order:
            if self.done(t) or t.rule is Rule.TIED_COPY:
                continue
            locs, start = self.locs(t), self.journal.get(t.name).rows_done
            if t.rule is Rule.COPY_BASE:
                jobs += [ReadJob((t.name, "copy", r0, r1), locs, r0, r1) for r0, r1 in t.chunks(start)]
                continue
            state = self.journal.load_state(t.name) if t.stat_passes else None
            if state is not None:
                self.states[t.name] = state
            elif t.stat_passes and t.resident:
                r0, r1 = t.chunks()[0]
                jobs.append(ReadJob((t.name, "all", r0, r1), locs, r0, r1))
                continue
            elif t.stat_passes:
                jobs += [ReadJob((t.name, p, r0, r1), locs, r0, r1) for p in range(t.stat_passes) for r0, r1 in t.chunks()]
            jobs += [ReadJob((t.name, "emit", r0, r1), locs, r0, r1) for r0, r1 in t.chunks(start)]
        return jobs

    def start_threads(self, order: list[TensorPlan]) -> None:
        pin = self.compute.pin
        self.prefetch = Prefetcher(self.inputs, self.schedule(order), self.plan.slot_bytes, pin=pin)
        self.writer = WriteBehind(self.plan.out_buffer_bytes, pin=pin)

    def stop_threads(self) -> None:
        """Let the writer finish what was submitted (skipped after a failure) and stop both threads."""
        if self.writer is not None:
            self.writer.close()
        if self.prefetch is not None:
            self.prefetch.close()

    def take(self, key: tuple[Any, ...]) -> Staged:
        """The next staged read, which must be ``key``."""
        assert self.prefetch is not None
        staged = self.prefetch.get(key)
        self.progress.update(sum(x.numel() * x.element_size() for x in staged.inputs))
        return staged

    def ordered(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread, after every write submitted before (durable side effects and
        failpoints stay in one deterministic sequence)."""
        assert self.writer is not None
        self.writer.submit(fn, *args)

    # ---- computing and writing ---------------------------------------------------------------------------
    @staticmethod
    def floats(inputs: list[torch.Tensor], a: int, b: int, raw_models: bool = False) -> list[torch.Tensor]:
        """Rows [a, b) of every staged input as new float32 tensors (methods may work in place on them); with
        ``raw_models``, the models' rows as stored (read-only views: the method upcasts them inside its own
        float32 arithmetic, which saves a pass over memory)."""
        rows = [x[a:b] if x.dim() else x for x in inputs]
        return [x if raw_models and k and x.dtype in _EXACT_IN_FLOAT32 else x.to(torch.float32, copy=True)
                for k, x in enumerate(rows)]

    def out_view(self, t: TensorPlan, buf: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, int]:
        """Rows [r0, r1) of ``t``'s output as a typed view of ``buf``, and their byte count."""
        nbytes = (r1 - r0) * t.out_row_bytes
        dtype = DTYPES[t.out_dtype].torch
        assert dtype is not None
        shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
        return buf[:nbytes].view(dtype).reshape(shape), nbytes

    def store(self, t: TensorPlan, dst: torch.Tensor, r0: int, result: torch.Tensor,
              inputs: list[torch.Tensor] = ()) -> None:
        """Cast ``result`` into ``dst`` (output rows from ``r0``); refuses NaN, infinity and overflow.

        Only the output is checked: every method carries a non-finite input element into a non-finite output
        element (NaN·0 is NaN), so the inputs are examined only to name the culprit.
        """
        dst.copy_(result)
        if dst.is_floating_point() and not _all_finite(dst):
            rows = f"rows [{r0}, {r0 + (result.shape[0] if result.dim() else 1)})"
            for k, x in enumerate(inputs):
                if not _all_finite(x):
                    who = "the base" if k == 0 else f"model {k} ({self.plan.recipe.models[k - 1]})"
                    raise NonFiniteError(f"tensor {t.name} {rows} of {who} contain NaN or infinity")
            what = f"overflow {t.out_dtype}" if _all_finite(result) else "contain NaN or infinity"
            raise NonFiniteError(f"tensor {t.name} {rows}: the merged values {what}")

    def submit_chunk(self, t: TensorPlan, r0: int, r1: int, slot: int, buf: torch.Tensor, nbytes: int,
                     cursor: dict[str, Any]) -> None:
        """Hand output rows [r0, r1) (the first ``nbytes`` of output buffer ``slot``) to the writer; stop here
        if a signal asked for it."""
        assert self.writer is not None
        self.writer.submit(self._write, t, r0, r1, memoryview(buf[:nbytes].numpy()), cursor, buffer=slot)
        if self.stop.signum is not None:
            self.writer.drain()
            self.journal.flush()
            name = signal.Signals(self.stop.signum).name
            raise MergeInterrupted(f"stopped by {name}", 128 + self.stop.signum)

    def _write(self, t: TensorPlan, r0: int, r1: int, data: memoryview, cursor: dict[str, Any]) -> None:
        """(writer thread) Write rows [r0, r1) of ``t`` and journal them (durably, at the next group commit)."""
        try:
            self.files[t.shard].write_at(t.name, r0 * t.out_row_bytes, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"disk full while writing {t.name} rows [{r0}, {r1}) to {self.model_dir}") from None
            raise
        running = crc(data, self.journal.get(t.name).crc)
        self.journal.record_chunk(t.name, r0, r1, running, cursor, len(data))
        checkpoint("chunk-written")

    def skip_done(self, t: TensorPlan, rows_done: int) -> None:
        """Advance the progress bar over reads a previous run made unnecessary."""
        per_row = sum(loc.info.row_numel * loc.info.dtype.bits // 8 for loc in self.locs(t))
        if t.rule is Rule.TIED_COPY:
            per_row = t.out_row_bytes
        reads = 1 if t.resident or not t.stat_passes else t.stat_passes + 1
        if rows_done >= t.rows:
            skipped = reads * t.rows * per_row
        else:
            skipped = rows_done * per_row + (t.stat_passes * t.rows * per_row if t.name in self.states else 0)
        if skipped:
            self.progress.update(skipped)

    # ---- the three kinds of tensor ---------------------------------------------------------------------------
    def copy_base(self, t: TensorPlan, start: int) -> None:
        assert self.writer is not None and self.prefetch is not None
        for r0, r1 in t.chunks(start):
            staged = self.take((t.name, "copy", r0, r1))
            raw = staged.inputs[0]
            slot, buf = self.writer.buffer()
            out, nbytes = self.out_view(t, buf, r0, r1)
            if raw.dtype == out.dtype:  # raw bytes, bit for bit (integers, bools, or no dtype change)
                buf[:nbytes].copy_(raw.reshape(-1).view(torch.uint8))
            else:
                for b0, b1 in t.blocks(r0, r1, stats=False):
                    a, b = b0 - r0, b1 - r0
                    self.store(t, out[a:b] if out.dim() else out, b0, self.floats([raw], a, b)[0])
            self.prefetch.release(staged)
            self.submit_chunk(t, r0, r1, slot, buf, nbytes, {})

    def tied_copy(self, t: TensorPlan, start: int) -> None:
        assert t.source is not None and self.writer is not None
        src = self.plan.tensors[self.index[t.source]]
        self.writer.drain()  # the merged embedding is on disk
        for r0, r1 in t.chunks(start):
            slot, buf = self.writer.buffer()
            nbytes = (r1 - r0) * t.out_row_bytes
            self.files[src.shard].read_into(src.name, r0 * t.out_row_bytes, memoryview(buf[:nbytes].numpy()))
            self.progress.update(nbytes)
            self.submit_chunk(t, r0, r1, slot, buf, nbytes, {})

    def stage(self, key: tuple[Any, ...]) -> tuple[Staged | None, list[torch.Tensor]]:
        """The inputs of read job ``key`` on the compute device. Returns (the staged job, or None once its slot is
        back with the reader because the inputs were copied to the GPU, and the inputs)."""
        assert self.prefetch is not None
        staged = self.take(key)
        inputs = self.compute.upload(staged.inputs)
        if self.compute.copies:
            self.prefetch.release(staged)
            return None, inputs
        return staged, inputs

    def merge(self, t: TensorPlan, start: int) -> None:
        """Statistics passes (unless a previous run saved their result), then the merge pass, block by block."""
        assert self.writer is not None and self.prefetch is not None
        merger: TensorMerge = self.plan.method.start(t.task, self.plan.params, len(self.plan.models))
        assert merger.stat_passes == t.stat_passes, (t.name, merger.stat_passes, t.stat_passes)
        state = self.states.pop(t.name, None)
        held: tuple[Staged | None, list[torch.Tensor]] | None = None  # a tensor read once for every pass
        if state is not None:
            merger.load_state_dict(state)
        elif t.stat_passes:
            if t.resident:
                held = self.stage((t.name, "all", *t.chunks()[0]))
            for p in range(t.stat_passes):
                self.progress.set_description(f"statistics pass {p + 1}", refresh=False)
                for r0, r1 in t.chunks():
                    staged, inputs = held or self.stage((t.name, p, r0, r1))
                    for b0, b1 in t.blocks(r0, r1, stats=True):
                        base, *models = self.floats(inputs, b0 - r0, b1 - r0, merger.raw_models)
                        merger.accumulate(p, b0, base, models)
                        del base, models  # before the next block's copies are made (not beside them)
                    if held is None and staged is not None:
                        self.prefetch.release(staged)
                    self.ordered(checkpoint, "stats-chunk")
                merger.end_pass(p)
            self.ordered(self.journal.save_state, t.name, self.index[t.name], merger.state_dict())
            self.ordered(checkpoint, "stats-saved")
        if start:
            merger.restore_cursor(self.journal.get(t.name).cursor)
        self.progress.set_description("merge pass", refresh=False)
        for r0, r1 in t.chunks(start):
            staged, inputs = held or self.stage((t.name, "emit", r0, r1))
            held = None
            slot, buf = self.writer.buffer()
            host, nbytes = self.out_view(t, buf, r0, r1)
            out = self.compute.output_like(host)
            for b0, b1 in t.blocks(r0, r1, stats=False):
                a, b = b0 - r0, b1 - r0
                block = self.floats(inputs, a, b, merger.raw_models)
                result = merger.emit(b0, block[0], block[1:])
                self.store(t, out[a:b] if out.dim() else out, b0, result, block)
                del block, result  # before the next block's copies are made (not beside them)
            self.compute.download(out, host)
            del inputs, out  # before the next chunk is uploaded: a GPU holds one chunk's tensors at a time
            if staged is not None:
                self.prefetch.release(staged)
            self.submit_chunk(t, r0, r1, slot, buf, nbytes, merger.cursor())

    def run_tensor(self, t: TensorPlan) -> None:
        done = self.journal.get(t.name).rows_done
        self.skip_done(t, done)
        if self.done(t):
            return
        self.progress.set_postfix_str(t.name, refresh=False)
        if t.rule is Rule.COPY_BASE:
            self.copy_base(t, done)
        elif t.rule is Rule.TIED_COPY:
            self.tied_copy(t, done)
        else:
            self.merge(t, done)
        self.ordered(self.journal.commit)

    # ---- finishing -------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "streammerge": __version__,
            "fingerprint": self.plan.fingerprint,
            "method": self.plan.method.name,
            "files": {s.filename: s.size for s in self.plan.shards},
            "tensors": {
                t.name: {"file": t.shard, "dtype": t.out_dtype, "shape": list(t.shape),
                         "crc32": self.journal.get(t.name).crc}
                for t in self.plan.tensors
            },
        }

    def finish(self) -> None:
        plan, recipe = self.plan, self.plan.recipe
        if self.writer is not None:
            self.writer.drain()
        self.journal.flush()
        for f in self.files.values():
            self.journal.unwatch_fd(f.fd)
            f.finalize(sync=recipe.journal)
        checkpoint("shards-finalized")
        if len(plan.shards) > 1:
            write_index(self.model_dir, {t.name: t.shard for t in plan.tensors},
                        sum(s.size - len(s.header) for s in plan.shards))
        out_dtype = parse_output_dtype(recipe.dtype).name if recipe.dtype else None
        copy_side_files(self.model_dir, recipe.base, recipe.tokenizer_from, out_dtype)
        write_json(self.model_dir / MANIFEST, self.manifest())
        write_model_card(self.model_dir, plan.to_dict())
        checkpoint("side-files-written")
        publish(self.model_dir, recipe.out, recipe.force)
        checkpoint("published")
        shutil.rmtree(self.work, ignore_errors=True)


def finished_output(plan: Plan) -> bool:
    """Whether ``out`` already holds this plan's finished output (same fingerprint in its manifest)."""
    manifest = plan.recipe.out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") == plan.fingerprint
    except ValueError:
        return False


def open_work_folder(plan: Plan) -> tuple[Path, Journal, bool]:
    """The work folder for ``plan``: a previous run's (same fingerprint) to continue, or a fresh one.

    Returns (folder, journal, resumed). A previous run with another fingerprint is refused unless
    ``recipe.restart``.
    """
    recipe = plan.recipe
    work = work_folder_for(recipe.out)
    plan_file = work / "plan.json"
    if work.exists() and plan_file.exists() and not recipe.restart:
        try:
            stored = json.loads(plan_file.read_text(encoding="utf-8"))
        except ValueError:
            stored = {}
        if stored.get("fingerprint") != plan.fingerprint:
            changes = describe_changes(stored.get("fingerprint_doc", {}), plan.fingerprint_doc)
            raise ResumeError(
                f"{work} holds an interrupted merge with different inputs or options; changed: "
                + "; ".join(changes) + ". Rerun the original command to continue it, or add --restart to discard it"
            )
        if recipe.journal:
            return work, Journal(work), True
    if work.exists():
        shutil.rmtree(work)
    (work / "model").mkdir(parents=True)
    write_json_atomic(plan_file, {"fingerprint": plan.fingerprint, "fingerprint_doc": plan.fingerprint_doc,
                                  "recipe": recipe.to_json(), "streammerge": __version__})
    checkpoint("work-created")
    return work, Journal(work, enabled=recipe.journal), False


def execute(plan: Plan, show_progress: bool = True) -> Path:
    """Run (or continue) ``plan`` and publish the merged model folder; returns its path."""
    recipe = plan.recipe
    if finished_output(plan):
        # a previous run published the output but stopped before removing its work folder
        shutil.rmtree(work_folder_for(recipe.out), ignore_errors=True)
        if show_progress:
            print(f"{recipe.out} is already complete", file=sys.stderr)
        return recipe.out
    work, journal, resumed = open_work_folder(plan)
    if resumed and show_progress:
        done = sum(1 for t in plan.tensors if journal.get(t.name).rows_done >= t.rows and journal.get(t.name).chunks)
        print(f"resuming the interrupted merge in {work}: {done} of {len(plan.tensors)} tensors already done",
              file=sys.stderr)
    bar = tqdm(total=plan.bytes_read, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress,
               desc="starting", dynamic_ncols=True, leave=False)
    with _StopSignals() as stop:
        run = _Run(plan, work, journal, bar, stop)
        try:
            run.open_shards()
            if resumed:
                run.verify_journaled()
            # tied heads copy their embedding's merged bytes, so they go after everything else
            order = sorted(plan.tensors, key=lambda t: t.rule is Rule.TIED_COPY)
            run.start_threads(order)
            for t in order:
                run.run_tensor(t)
            run.finish()
        except (StreamMergeError, OSError, KeyboardInterrupt, torch.OutOfMemoryError) as exc:
            run.stop_threads()
            _after_failure(run, exc)
            raise _explain(exc, recipe.out, work, recipe.journal) from None
        finally:
            run.stop_threads()
            bar.close()
            journal.close()
            run.inputs.close()
            for f in run.files.values():
                f.abort()
    return recipe.out


def _resumable(exc: BaseException) -> bool:
    """Interruptions and I/O failures leave a resumable work folder; bad data does not (the inputs must change)."""
    return isinstance(exc, (MergeInterrupted, KeyboardInterrupt, OSError, DiskFullError, torch.OutOfMemoryError))


def _after_failure(run: _Run, exc: BaseException) -> None:
    """Keep what is durable after an interruption or I/O failure; discard the work after bad data."""
    if run.plan.recipe.journal and _resumable(exc):
        if not isinstance(exc, (OSError, DiskFullError)):
            try:
                run.journal.flush()
            except OSError:
                pass
        return
    run.journal.close()
    for f in run.files.values():
        f.abort()
    shutil.rmtree(run.work, ignore_errors=True)


def _explain(exc: BaseException, out: Path, work: Path, journaled: bool) -> StreamMergeError:
    """The error the user sees, with how to continue."""
    hint = (f"; the finished part is kept in {work}: run `streammerge resume {out}` (or the same command again) to "
            "continue, or add --restart to start over") if journaled and work.exists() else ""
    if isinstance(exc, MergeInterrupted):
        return MergeInterrupted(f"merge interrupted ({exc}){hint}", exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return MergeInterrupted(f"merge interrupted{hint}", 130)
    if isinstance(exc, torch.OutOfMemoryError):
        return StreamMergeError(f"the GPU ran out of memory (other processes may be using it): lower --max-vram, "
                                f"or use --device cpu{hint}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"disk full while writing the merge{hint}")
        return StreamMergeError(f"I/O error: {exc}{hint}")
    if isinstance(exc, (DiskFullError, NonFiniteError)):
        return type(exc)(f"{exc}{hint}")
    return exc  # type: ignore[return-value]


__all__ = ["DiskFullError", "MANIFEST", "MergeInterrupted", "execute", "open_work_folder"]
