"""One schedule per tensor: the list of reads and steps that produces it, from the plan and the journal.

``make_schedule`` is pure. From a :class:`~streammerge.planner.TensorPlan`, how many of its rows a previous run
journaled and whether that run's saved statistics load, it decides everything about the tensor's execution once:

- the **reads**, each covering rows [r0, r1) of the tensor's sources, in the order the reader thread performs them;
  those flagged ``checksum`` form the tensor's one sweep from row 0 in this run (its first statistics pass; for a
  tensor without statistics passes, its emit or copy if that starts at row 0): the reader checksums their bytes
  (:mod:`streammerge.inputsums`). A run that restores saved statistics or starts mid-tensor flags none;
- the **steps** the runner executes in order: restore saved statistics, or feed statistics passes chunk by chunk
  and save their result; restore the emit cursor; emit (or copy) each chunk from the resume row on.

Every step that needs input rows names the read that holds them, and the runner indexes that read's buffer by
``step.r0 - read.r0``: a read covering the whole tensor (a tensor that fits the budget, read once for every pass)
serves an emit that starts mid-tensor without any other code deciding where its rows are. The reader thread
consumes ``reads`` and the runner consumes ``steps``; both come from this one list, so they cannot disagree.

One thing is learnt only while running: a merge may find a later statistics pass settled by the ones before it
(``TensorMerge.settled``: TIES's pass B, when pass A's candidates pinned the thresholds). Its steps stay in the
schedule and do nothing; the reads only they use (:meth:`TensorSchedule.reads_only_of_pass`) are handed to the
reader to leave unread, and still come to the runner in their turn, empty.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from .methods import Rule
from .planner import TensorPlan
from .sources import InputSource


class Op(str, Enum):
    """What a step does."""

    LOAD_STATE = "load_state"  # restore the statistics a previous run saved (instead of the statistics passes)
    STATS = "stats"  # feed rows [r0, r1) to statistics pass ``pass_index``
    END_PASS = "end_pass"  # finish statistics pass ``pass_index`` (rank, select, solve)
    SAVE_STATE = "save_state"  # make the statistics durable, so a run resumed mid-emit skips the passes
    RESTORE_CURSOR = "restore_cursor"  # continue the emit pass at row r0 (the journaled emit cursor)
    EMIT = "emit"  # merge rows [r0, r1) and write them
    COPY = "copy"  # write the base's rows [r0, r1) (cast to the output dtype if it differs)
    TIED_COPY = "tied_copy"  # write rows [r0, r1) of the merged embedding's output (a tied head)


@dataclass(frozen=True)
class Read:
    """Rows [r0, r1) of every source of tensor ``tensor``, read into one slot; ``compute``: the rows go to the
    compute device (a merge), else they stay in host memory (a copy); ``checksum``: part of the tensor's sweep from
    row 0, whose input bytes the reader checksums."""

    tensor: str
    r0: int
    r1: int
    sources: tuple[InputSource, ...]
    compute: bool = True
    checksum: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes read (as stored), parts read whole with every chunk (a LoRA factor) included."""
        return (self.r1 - self.r0) * sum(s.read_bytes_per_row for s in self.sources) \
            + sum(s.fixed_read_bytes for s in self.sources)


@dataclass(frozen=True)
class Step:
    """One step of a tensor's schedule. ``read`` indexes the schedule's reads: the one holding rows [r0, r1)."""

    op: Op
    r0: int = 0
    r1: int = 0
    pass_index: int = 0
    read: int | None = None
    release: bool = False  # the read's last use: its slot goes back to the reader after this step


@dataclass(frozen=True)
class TensorSchedule:
    """The reads and steps of one tensor, and the planned reads a previous run made unnecessary."""

    tensor: str
    reads: tuple[Read, ...]
    steps: tuple[Step, ...]
    skipped_bytes: int

    def read_of(self, step: Step) -> Read:
        assert step.read is not None, f"{step.op.value} step has no read"
        return self.reads[step.read]

    def reads_only_of_pass(self, pass_index: int) -> list[Read]:
        """The reads that only statistics pass ``pass_index``'s steps use (none for a tensor read whole, whose one
        read serves every pass)."""
        users: dict[int, set[tuple[Op, int]]] = {}
        for s in self.steps:
            if s.read is not None:
                users.setdefault(s.read, set()).add((s.op, s.pass_index if s.op is Op.STATS else -1))
        return [self.reads[i] for i, u in sorted(users.items()) if u == {(Op.STATS, pass_index)}]


def make_schedule(t: TensorPlan, rows_done: int, complete: bool, state_loaded: bool) -> TensorSchedule:
    """The schedule of ``t`` given the journal: ``rows_done`` rows already written (a prefix), ``complete`` if the
    tensor is finished, ``state_loaded`` if statistics a previous run saved were loaded (checked by the caller)."""
    if complete:
        return TensorSchedule(t.name, (), (), t.planned_read_bytes)
    if not 0 <= rows_done < max(t.rows, 1):
        raise ValueError(f"{t.name}: {rows_done} rows done of {t.rows}, yet not complete")
    reads: list[Read] = []
    steps: list[Step] = []

    def read(r0: int, r1: int, checksum: bool) -> int:
        reads.append(Read(t.name, r0, r1, t.sources, compute=t.rule.merged, checksum=checksum))
        return len(reads) - 1

    sweep = rows_done == 0 and not (t.stat_passes and state_loaded)  # the emit or copy reads from row 0
    if t.rule is Rule.TIED_COPY:
        steps += [Step(Op.TIED_COPY, r0, r1) for r0, r1 in t.chunks(rows_done)]
    elif t.rule is Rule.COPY_BASE:
        steps += [Step(Op.COPY, r0, r1, read=read(r0, r1, sweep)) for r0, r1 in t.chunks(rows_done)]
    else:
        whole: int | None = None  # a read of the whole tensor, kept for every pass
        if t.stat_passes and state_loaded:
            steps.append(Step(Op.LOAD_STATE))
        elif t.stat_passes:
            if t.resident:
                whole = read(0, t.rows, True)
            for p in range(t.stat_passes):
                steps += [Step(Op.STATS, r0, r1, p, read=read(r0, r1, p == 0) if whole is None else whole)
                          for r0, r1 in t.chunks()]
                steps.append(Step(Op.END_PASS, pass_index=p))
            if len(t.chunks()) > 1:  # only then can a later run resume inside the emit pass and use them
                steps.append(Step(Op.SAVE_STATE))
            sweep = False  # the first statistics pass was the sweep
        if rows_done:
            steps.append(Step(Op.RESTORE_CURSOR, rows_done))
        steps += [Step(Op.EMIT, r0, r1, read=read(r0, r1, sweep) if whole is None else whole)
                  for r0, r1 in t.chunks(rows_done)]
    steps = _mark_releases(steps, len(reads))
    scheduled = sum(r.nbytes for r in reads) + sum((s.r1 - s.r0) * t.out_row_bytes for s in steps
                                                   if s.op is Op.TIED_COPY)
    return TensorSchedule(t.name, tuple(reads), tuple(steps), max(0, t.planned_read_bytes - scheduled))


def _mark_releases(steps: list[Step], n_reads: int) -> list[Step]:
    """Mark each read's last step as the one that releases it; a read no step uses is an error."""
    last: dict[int, int] = {}
    for i, s in enumerate(steps):
        if s.read is not None:
            last[s.read] = i
    if len(last) != n_reads:
        raise AssertionError(f"reads {sorted(set(range(n_reads)) - set(last))} are never used")
    for i in last.values():
        steps[i] = replace(steps[i], release=True)
    return steps
