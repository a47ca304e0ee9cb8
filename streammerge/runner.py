"""The per-tensor runner: executes one tensor's schedule, chunk by chunk and block by block.

``run_tensor(plan, job, io)`` is the seam between what a merge computes and where it runs. It knows the plan (the
method, its parameters, every tensor's decisions) and one :class:`TensorJob` (the tensor, its schedule, the
statistics and emit cursor a previous run left). Everything else goes through ``io`` (:class:`TensorIO`): staged
input rows, output buffers, writes, saved statistics, progress and stop requests. It keeps no run-wide state, so
an executor can call it from threads, from ``--part K/N`` processes or from remote tasks.

For each step: statistics steps feed the method float32 rows of every source block by block (blocks end on
reduction tiles); emit steps ask the method for the float32 result of each block, check it is finite, cast it
into the output buffer at the planned dtype and hand the chunk to ``io.write``; copies write the base's rows (as
stored, or cast); a tied head copies its embedding's merged output. Stop requests are honoured between blocks.

With the fused kernels (:mod:`streammerge.kernels`, decided once per tensor) a block goes to the method's
``accumulate_raw``/``emit_raw`` first, with every source's rows as stored and, to merge, the output rows to fill in
their dtype: the same bytes in one pass. The eager path above runs where the method has no fused path for the
inputs, and for a block whose fused result is not finite (it names the problem).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._torch import torch
from .errors import NonFiniteError
from .formats.dtypes import DTYPES
from .methods import TensorMerge
from .planner import Plan, TensorPlan
from .schedule import Op, Read, Step, TensorSchedule
from .sources import InputSource

Parts = list[tuple["torch.Tensor", ...]]  # per source, its staged tensors (on the compute device)


class Compute(Protocol):
    """Where the arithmetic runs (``streammerge.device``)."""

    def output_like(self, host: torch.Tensor) -> torch.Tensor: ...
    def download(self, result: torch.Tensor, host: torch.Tensor) -> None: ...


class TensorIO(Protocol):
    """What the runner needs from an executor."""

    compute: Compute

    def take(self, read: Read) -> Parts:
        """The staged rows of ``read`` (the next read of the schedule), on the compute device."""

    def release(self, read: Read) -> None:
        """``read``'s rows are no longer needed."""

    def skip(self, reads: Sequence[Read]) -> None:
        """These later reads' rows will not be used (a statistics pass the merge settled early): they may be left
        unread. :meth:`take` still returns each in its turn, perhaps with no parts, and counts it as done."""

    def run_blocks(self, blocks: Sequence[tuple[int, int]], work: Callable[[int, int], None]) -> None:
        """``work(b0, b1)`` for every block: blocks independent of one another (``TensorMerge.independent_blocks``),
        so they may run in any order and on other threads (:meth:`streammerge.workers.JobQueue.run_blocks`).
        Returns when all are done; raises the first failure."""

    def helpers_idle(self) -> bool:
        """Whether another worker is idle now, ready to compute shared blocks (:meth:`run_blocks`)."""

    def output_buffer(self) -> tuple[int, torch.Tensor]:
        """A free output buffer: (its id, a uint8 host tensor of the plan's output-buffer size)."""

    def write(self, t: TensorPlan, r0: int, r1: int, buffer: int, data: torch.Tensor, cursor: dict[str, Any]) -> None:
        """Write output rows [r0, r1) of ``t`` (``data``: their bytes, in output buffer ``buffer``) and journal them
        with the method's emit ``cursor``."""

    def read_output(self, name: str, byte_offset: int, view: memoryview) -> None:
        """Fill ``view`` with output bytes of tensor ``name`` already written (from ``byte_offset``)."""

    def save_state(self, t: TensorPlan, state: dict[str, torch.Tensor]) -> None:
        """Make ``t``'s statistics durable (a resumed run loads them instead of running the passes)."""

    def checkpoint(self, event: str) -> None:
        """A point a crash must survive, in order with the writes."""

    def phase(self, t: TensorPlan, text: str) -> None:
        """What the runner is doing now (progress display)."""

    def progress(self, nbytes: int) -> None:
        """``nbytes`` of the plan's reads are done (work an earlier run did is counted by the executor)."""

    def check_stop(self) -> None:
        """Raise if the run should stop now (a signal arrived)."""


@dataclass(frozen=True)
class TensorJob:
    """One tensor to produce: its plan, its schedule, and what a previous run left for it."""

    tensor: TensorPlan
    schedule: TensorSchedule
    state: dict[str, torch.Tensor] | None = None  # saved statistics, for a LOAD_STATE step
    cursor: dict[str, Any] = field(default_factory=dict)  # the journaled emit cursor, for a RESTORE_CURSOR step


@dataclass(frozen=True)
class TensorResult:
    name: str
    rows_written: int


def run_tensor(plan: Plan, job: TensorJob, io: TensorIO) -> TensorResult:
    """Execute ``job``'s schedule; raises :class:`NonFiniteError` on NaN, infinity or overflow in the output."""
    t, schedule = job.tensor, job.schedule
    if not schedule.steps:
        return TensorResult(t.name, 0)
    merger = plan.method.start(t.task, t.params, len(plan.models)) if t.rule.merged else None
    fused = merger is not None and t.fused  # (the plan's decision: TensorSizing.kernel_path)
    held: dict[int, Parts] = {}  # staged reads still in use, by index
    settled: set[int] = set()  # statistics passes with nothing left to count (TensorMerge.settled)
    written = 0
    for step in schedule.steps:
        io.check_stop()
        parts: Parts = []
        if step.read is not None:
            if step.read not in held:
                held[step.read] = io.take(schedule.read_of(step))
            parts = held[step.read]
        if step.op is Op.STATS:
            assert merger is not None
            if step.pass_index not in settled:
                _stats(plan, t, merger, step, schedule.read_of(step), parts, io, fused)
        elif step.op is Op.END_PASS:
            assert merger is not None
            merger.end_pass(step.pass_index)
            if merger.settled(step.pass_index + 1):
                settled.add(step.pass_index + 1)
                io.phase(t, f"statistics {step.pass_index + 2}/{t.stat_passes} settled by the pass before")
                io.skip(schedule.reads_only_of_pass(step.pass_index + 1))
        elif step.op is Op.SAVE_STATE:
            assert merger is not None
            io.save_state(t, merger.state_dict())
            io.checkpoint("stats-saved")
        elif step.op is Op.LOAD_STATE:
            assert merger is not None and job.state is not None, f"{t.name}: no saved statistics to load"
            merger.load_state_dict(job.state)
        elif step.op is Op.RESTORE_CURSOR:
            assert merger is not None
            merger.restore_cursor(job.cursor)
        elif step.op is Op.EMIT:
            assert merger is not None
            _emit(plan, t, merger, step, schedule.read_of(step), parts, io, fused)
        elif step.op is Op.COPY:
            _copy(plan, t, step, schedule.read_of(step), parts, io)
        elif step.op is Op.TIED_COPY:
            _tied_copy(plan, t, step, io)
        written += step.r1 - step.r0 if step.op in (Op.EMIT, Op.COPY, Op.TIED_COPY) else 0
        if step.release:
            del held[step.read]  # type: ignore[arg-type]
            io.release(schedule.read_of(step))
    return TensorResult(t.name, written)


# ---- the steps ------------------------------------------------------------------------------------------------
def _stats(plan: Plan, t: TensorPlan, merger: TensorMerge, step: Step, read: Read, parts: Parts, io: TensorIO,
           fused: bool) -> None:
    io.phase(t, f"statistics {step.pass_index + 1}/{t.stat_passes}")

    def block(b0: int, b1: int) -> None:
        io.check_stop()
        if fused:
            raw = _raw_rows(t.sources, parts, read.r0, b0 - read.r0, b1 - read.r0)
            if raw is not None and merger.accumulate_raw(step.pass_index, b0, raw[0], raw[1:]):
                return
        base, *models = _rows(t.sources, parts, read.r0, b0 - read.r0, b1 - read.r0, plan.method.raw_models)
        merger.accumulate(step.pass_index, b0, base, models)  # (the copies go before the next block's are made)

    _run_blocks(t, merger, step.pass_index, read, parts, io, t.blocks(step.r0, step.r1, stats=True), block, fused)
    io.checkpoint("stats-chunk")


def _emit(plan: Plan, t: TensorPlan, merger: TensorMerge, step: Step, read: Read, parts: Parts,
          io: TensorIO, fused: bool) -> None:
    io.phase(t, "merge")
    buffer, raw = io.output_buffer()
    host, nbytes = _out_view(t, raw, step.r0, step.r1)
    out = io.compute.output_like(host)

    def block(b0: int, b1: int) -> None:
        io.check_stop()
        dst = out[b0 - step.r0 : b1 - step.r0] if out.dim() else out
        if fused:
            stored = _raw_rows(t.sources, parts, read.r0, b0 - read.r0, b1 - read.r0)
            if stored is not None and merger.emit_raw(b0, stored[0], stored[1:], dst) == 0:
                return  # else no fused path, or a non-finite value that the eager path names
        rows = _rows(t.sources, parts, read.r0, b0 - read.r0, b1 - read.r0, plan.method.raw_models)
        _store(plan, t, dst, b0, merger.emit(b0, rows[0], rows[1:]), rows)  # (freed before the next block's)

    _run_blocks(t, merger, None, read, parts, io, t.blocks(step.r0, step.r1, stats=False), block, fused)
    io.compute.download(out, host)
    io.write(t, step.r0, step.r1, buffer, raw[:nbytes], merger.cursor())


def _ahead(t: TensorPlan, merger: TensorMerge, pass_index: int | None, read: Read, parts: Parts, io: TensorIO,
           blocks: list[tuple[int, int]]) -> bool:
    """Where a chunk's blocks need work that is independent of their order (``TensorMerge.blocks_ahead``) and other
    workers are idle: that work for every block (shared with them), handed to the merge (``start_blocks``; True,
    and the caller ends the blocks). It is extra work, so not for one worker."""
    if len(blocks) < 2 or not merger.blocks_ahead(pass_index) or not io.helpers_idle():
        return False
    results: dict[int, Any] = {}

    def ahead(b0: int, b1: int) -> None:
        io.check_stop()
        stored = _raw_rows(t.sources, parts, read.r0, b0 - read.r0, b1 - read.r0)
        results[b0] = None if stored is None else merger.ahead_raw(pass_index, b0, stored[0], stored[1:])

    io.run_blocks(blocks, ahead)
    found = [results[b0] for b0, _ in blocks]
    if any(r is None for r in found):
        return False
    merger.start_blocks(pass_index, [b0 for b0, _ in blocks], found)
    return True


def _run_blocks(t: TensorPlan, merger: TensorMerge, pass_index: int | None, read: Read, parts: Parts, io: TensorIO,
                blocks: list[tuple[int, int]], block: Callable[[int, int], None], fused: bool) -> None:
    """A chunk's blocks of one pass: the work ahead where it helps (fused kernels only), then the blocks."""
    ahead = fused and _ahead(t, merger, pass_index, read, parts, io, blocks)
    try:
        _blocks(io, merger, pass_index, blocks, block)
    finally:
        if ahead:
            merger.end_blocks(pass_index)


def _blocks(io: TensorIO, merger: TensorMerge, pass_index: int | None, blocks: list[tuple[int, int]],
            block: Callable[[int, int], None]) -> None:
    """Every block of a chunk: in row order here until the merge's blocks are independent (asked again after each:
    a selection's first block chooses what the others need), then the rest shared with idle workers."""
    i = 0
    while i < len(blocks) and not merger.independent_blocks(pass_index):
        block(*blocks[i])
        i += 1
    if i < len(blocks):
        io.run_blocks(blocks[i:], block)


def _copy(plan: Plan, t: TensorPlan, step: Step, read: Read, parts: Parts, io: TensorIO) -> None:
    io.phase(t, "copy")
    buffer, raw = io.output_buffer()
    host, nbytes = _out_view(t, raw, step.r0, step.r1)
    a = step.r0 - read.r0
    if t.raw_copy:  # bytes as stored (integers, bools, or no dtype change)
        stored = parts[0][0]
        stored = stored[a : a + step.r1 - step.r0] if stored.dim() else stored
        raw[:nbytes].copy_(stored.reshape(-1).view(torch.uint8))
    else:
        for b0, b1 in t.blocks(step.r0, step.r1, stats=False):
            rows = t.sources[0].floats(parts[0], read.r0, b0 - read.r0, b1 - read.r0)
            if t.scale != 1.0:  # passthrough's scale
                rows.mul_(t.scale)
            _store(plan, t, host[b0 - step.r0 : b1 - step.r0] if host.dim() else host, b0, rows, [rows])
    io.write(t, step.r0, step.r1, buffer, raw[:nbytes], {})


def _tied_copy(plan: Plan, t: TensorPlan, step: Step, io: TensorIO) -> None:
    """A tied head: rows of the merged embedding's output, cast when the head is stored in another dtype."""
    assert t.copy_of is not None
    io.phase(t, "tied copy")
    source = plan.tensor(t.copy_of)
    buffer, raw = io.output_buffer()
    host, nbytes = _out_view(t, raw, step.r0, step.r1)
    if source.out_dtype == t.out_dtype:
        io.read_output(source.name, step.r0 * source.out_row_bytes, memoryview(raw[:nbytes].numpy()))
    else:
        src = torch.empty((step.r1 - step.r0) * source.out_row_bytes, dtype=torch.uint8)
        io.read_output(source.name, step.r0 * source.out_row_bytes, memoryview(src.numpy()))
        dtype = DTYPES[source.out_dtype].torch
        assert dtype is not None
        values = src.view(dtype).reshape(host.shape).to(torch.float32)
        _store(plan, t, host, step.r0, values, [values])
    io.progress(nbytes)
    io.write(t, step.r0, step.r1, buffer, raw[:nbytes], {})


# ---- rows in, bytes out -------------------------------------------------------------------------------------------
def _rows(sources: Sequence[InputSource], parts: Parts, r0: int, a: int, b: int,
          raw_models: bool) -> list[torch.Tensor]:
    """Rows [a, b) of the staged read (relative to its first row ``r0``) of every source: new float32 tensors (methods
    may work in place on them); with ``raw_models``, the models' rows as stored where that is exact in float32
    (read-only views: the method upcasts them inside its own float32 arithmetic, which saves a pass over memory)."""
    out = [sources[0].floats(parts[0], r0, a, b)]
    for src, p in zip(sources[1:], parts[1:]):
        raw = src.raw(p, r0, a, b) if raw_models else None
        out.append(raw if raw is not None else src.floats(p, r0, a, b))
    return out


def _raw_rows(sources: Sequence[InputSource], parts: Parts, r0: int, a: int, b: int) -> list[torch.Tensor] | None:
    """Rows [a, b) of every source as stored (read-only views, see :meth:`InputSource.raw`), for the fused kernels;
    None when a source has none (its rows must be converted: FP8, a LoRA product)."""
    out = []
    for src, p in zip(sources, parts):
        raw = src.raw(p, r0, a, b)
        if raw is None:
            return None
        out.append(raw)
    return out


def _out_view(t: TensorPlan, buf: torch.Tensor, r0: int, r1: int) -> tuple[torch.Tensor, int]:
    """Rows [r0, r1) of ``t``'s output as a typed view of ``buf``, and their byte count."""
    nbytes = (r1 - r0) * t.out_row_bytes
    dtype = DTYPES[t.out_dtype].torch
    assert dtype is not None
    shape = (r1 - r0, *t.shape[1:]) if t.shape else ()
    return buf[:nbytes].view(dtype).reshape(shape), nbytes


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or infinity makes the sum non-finite, so a finite sum settles it
    with one fast reduction; only a non-finite sum (which finite values can also give, by overflow) needs the
    element-wise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _store(plan: Plan, t: TensorPlan, dst: torch.Tensor, r0: int, result: torch.Tensor,
           inputs: Sequence[torch.Tensor]) -> None:
    """Cast ``result`` into ``dst`` (output rows from ``r0``); refuses NaN, infinity and overflow.

    Only the output is checked: every method carries a non-finite input element into a non-finite output
    element (NaN·0 is NaN), so the inputs are examined only to name the culprit.
    """
    dst.copy_(result)
    if not dst.is_floating_point() or _all_finite(dst):
        return
    rows = f"rows [{r0}, {r0 + (result.shape[0] if result.dim() else 1)})"
    for k, x in enumerate(inputs):
        if not _all_finite(x):
            who = f"the base ({plan.recipe.base})" if k == 0 else f"model {k} ({plan.recipe.models[k - 1]})"
            first = ""
            if x.dim():
                bad = ~torch.isfinite(x.reshape(x.shape[0], -1).float()).all(dim=1)
                first = f", first at row {r0 + int(bad.nonzero()[0, 0])}"
            raise NonFiniteError(f"tensor {t.name} {rows} of {who} contain NaN or infinity{first}", t.name)
    if _all_finite(result):
        raise NonFiniteError(f"tensor {t.name} {rows}: the merged values overflow {t.out_dtype}", t.name,
                             overflow=True)
    raise NonFiniteError(f"tensor {t.name} {rows}: the merged values contain NaN or infinity", t.name)
