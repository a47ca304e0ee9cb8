"""The schedule, exhaustively: for every combination of (rule, whole tensor or chunked, statistics passes 0/1/2,
saved state present or absent/corrupt, resume row 0/mid/last, chunk sizes) the steps must

- cover the emitted rows [resume row, rows) exactly once, in order, from a read that holds them (checked by
  simulating the runner: each read yields its row numbers and every step indexes them by ``step.r0 - read.r0``);
- run every statistics pass over all rows [0, rows) in order (unless the saved state loaded), end each pass, and
  save the state before the first emit;
- restore the emit cursor exactly when resuming mid-tensor, before emitting;
- use every read, first-use in the order the reader produces them, releasing each exactly once, with at most one
  read held at a time (so the reader can always fill the other slot);
- account for every planned byte: read now, or skipped because a previous run made it unnecessary.

A corrupt state file is the same as an absent one to the schedule (the caller reports it and passes False).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from streammerge.classify import Kind
from streammerge.methods import Rule
from streammerge.planner import TensorPlan
from streammerge.schedule import Op, make_schedule
from streammerge.sources.base import ByteRange, InputSource


@dataclass(frozen=True)
class FakeSource(InputSource):
    """A source whose rows are their own row numbers (one element per row, 4 bytes)."""

    shape: tuple[int, ...]
    kind = "fake"

    def ranges(self, r0: int, r1: int) -> list[ByteRange]:
        return [ByteRange(Path("/nonexistent"), r0 * 4, (r1 - r0) * 4)]

    def parts(self, buffers: list[torch.Tensor], r0: int, r1: int) -> tuple[torch.Tensor, ...]:
        return (torch.arange(r0, r1),)

    def floats(self, parts: tuple[torch.Tensor, ...], a: int, b: int) -> torch.Tensor:
        return parts[0][a:b].float()

    @property
    def read_bytes_per_row(self) -> int:
        return 4

    def identity(self) -> list[Any]:
        return []


def tensor(rule: Rule, rows: int, chunk_rows: int, passes: int, models: int = 2) -> TensorPlan:
    shape = (rows, 1)
    if rule is Rule.TIED_COPY:
        sources: tuple[InputSource, ...] = ()
    elif rule is Rule.COPY_BASE:
        sources = (FakeSource(shape),)
    else:
        sources = tuple(FakeSource(shape) for _ in range(models + 1))
    return TensorPlan("t", shape, rule, Kind.FLOAT, "F32", "model.safetensors", sources, chunk_rows, passes,
                      block_rows=3, stat_block_rows=64, state_bytes=0, scratch_bytes=0, tile=64, fingerprint="fp",
                      copy_of="e" if rule is Rule.TIED_COPY else None)


def simulate(t: TensorPlan, rows_done: int, state_loaded: bool) -> dict[str, Any]:
    """Run the schedule as the runner and the reader would, recording what every step saw."""
    s = make_schedule(t, rows_done, False, state_loaded)
    produced = iter(range(len(s.reads)))  # the reader's order
    held: dict[int, torch.Tensor] = {}
    seen: dict[str, Any] = {"ops": [], "emitted": [], "stats": {}, "max_held": 0, "released": []}
    for step in s.steps:
        seen["ops"].append(step.op)
        rows = None
        if step.read is not None:
            if step.read not in held:
                assert next(produced) == step.read, "reads are first used in the order the reader produces them"
                read = s.reads[step.read]
                assert read.sources == t.sources and read.tensor == t.name
                held[step.read] = read.sources[0].parts([], read.r0, read.r1)[0]
            seen["max_held"] = max(seen["max_held"], len(held))
            read = s.reads[step.read]
            assert read.r0 <= step.r0 <= step.r1 <= read.r1, (step, read)
            rows = held[step.read][step.r0 - read.r0 : step.r1 - read.r0].tolist()
            assert rows == list(range(step.r0, step.r1)), f"{step.op} rows [{step.r0}, {step.r1}) got {rows}"
        if step.op in (Op.EMIT, Op.COPY, Op.TIED_COPY):
            seen["emitted"] += list(range(step.r0, step.r1))
        elif step.op is Op.STATS:
            seen["stats"].setdefault(step.pass_index, []).extend(rows or [])
        if step.release:
            assert step.read is not None
            seen["released"].append(step.read)
            del held[step.read]
    assert next(produced, None) is None, "every read is used"
    assert not held, "every read is released"
    assert sorted(seen["released"]) == list(range(len(s.reads)))
    seen["schedule"] = s
    return seen


RULES = [Rule.MATRIX, Rule.VECTOR, Rule.COPY_BASE, Rule.TIED_COPY]
ROWS = [1, 7, 130]
CHUNKS = [1, 3, 64, 1000]  # 1000: the whole tensor fits (read once for every pass)
PASSES = [0, 1, 2]


def _cases():
    for rule, rows, chunk, passes, state in itertools.product(RULES, ROWS, CHUNKS, PASSES, [False, True]):
        if not rule.merged and (passes or state):
            continue
        if rule is Rule.VECTOR and chunk < rows:
            continue  # the planner merges vectors whole
        for rows_done in sorted({0, rows // 2, rows - 1}):
            yield rule, rows, chunk, passes, state, rows_done


@pytest.mark.parametrize("rule, rows, chunk, passes, state, rows_done", list(_cases()))
def test_every_schedule_reads_exactly_what_each_step_uses(rule, rows, chunk, passes, state, rows_done):
    t = tensor(rule, rows, chunk, passes)
    seen = simulate(t, rows_done, state)
    s, ops = seen["schedule"], seen["ops"]
    assert seen["emitted"] == list(range(rows_done, rows)), "each remaining row is written once, in order"
    assert seen["max_held"] <= 1, "one read at a time: the reader always has a free slot"
    stats_run = passes > 0 and not state
    assert (Op.LOAD_STATE in ops) == (passes > 0 and state)
    if stats_run:
        assert sorted(seen["stats"]) == list(range(passes))
        for p in range(passes):
            assert seen["stats"][p] == list(range(rows)), f"pass {p} sees every row once, in order"
        # the statistics are saved only where a later run can resume inside the emit pass (more than one chunk):
        # a tensor written in one chunk is merged again whole after a stop, statistics and all
        saved = len(t.chunks()) > 1
        assert ops.count(Op.END_PASS) == passes and ops.count(Op.SAVE_STATE) == saved
        first_emit = ops.index(Op.EMIT)
        assert max(i for i, o in enumerate(ops) if o is Op.STATS) < first_emit
        if saved:
            assert max(i for i, o in enumerate(ops) if o is Op.END_PASS) < ops.index(Op.SAVE_STATE) < first_emit
        order = [(st.op, st.pass_index) for st in s.steps if st.op in (Op.STATS, Op.END_PASS)]
        chunks = len(t.chunks())
        expected = [x for p in range(passes) for x in [(Op.STATS, p)] * chunks + [(Op.END_PASS, p)]]
        assert order == expected, "each pass covers every chunk, then ends, before the next begins"
    else:
        assert Op.STATS not in ops and Op.SAVE_STATE not in ops and Op.END_PASS not in ops
    restores = [i for i, o in enumerate(ops) if o is Op.RESTORE_CURSOR]
    if rule.merged and rows_done:
        assert len(restores) == 1 and restores[0] < ops.index(Op.EMIT)
        assert s.steps[restores[0]].r0 == rows_done
    else:
        assert not restores
    # the checksum reads sweep rows [0, rows) once, in order, first of the tensor's reads; or there are none
    sweep = [(r.r0, r.r1) for r in s.reads if r.checksum]
    if rule is not Rule.TIED_COPY and (stats_run or (rows_done == 0 and Op.LOAD_STATE not in ops)):
        assert [a for a, _ in sweep] == [0] + [b for _, b in sweep[:-1]] and sweep[-1][1] == rows, sweep
        assert all(r.checksum for r in s.reads[: len(sweep)]), "the sweep is the first reads"
    else:
        assert not sweep, "a run that restores statistics or starts mid-tensor cannot vouch for all rows"
    # every planned byte is read now or accounted as skipped
    scheduled = sum(r.nbytes for r in s.reads) + sum((st.r1 - st.r0) * t.out_row_bytes for st in s.steps
                                                     if st.op is Op.TIED_COPY)
    assert scheduled + s.skipped_bytes == t.planned_read_bytes


def test_a_whole_tensor_read_once_serves_an_emit_that_resumes_mid_tensor():
    """The defect the schedule exists for: a tensor that fits whole, resumed mid-tensor after its saved
    statistics failed to load. One read of rows [0, rows) feeds the statistics pass and then the emit of
    rows [resume, rows), which must take the rows it emits, not the first rows of the buffer."""
    t = tensor(Rule.MATRIX, 130, 1000, 1)
    s = make_schedule(t, 70, False, state_loaded=False)
    assert [(r.r0, r.r1) for r in s.reads] == [(0, 130)]
    emit = [st for st in s.steps if st.op is Op.EMIT]
    assert [(st.r0, st.r1, st.read) for st in emit] == [(70, 130, 0)] and emit[0].release
    simulate(t, 70, False)  # and the rows it sees are rows 70..129


def test_saved_state_skips_the_statistics_reads_and_counts_them_as_done():
    t = tensor(Rule.MATRIX, 130, 64, 2)
    s = make_schedule(t, 64, False, state_loaded=True)
    assert [(r.r0, r.r1) for r in s.reads] == [(64, 128), (128, 130)]
    assert s.skipped_bytes == t.planned_read_bytes - 66 * 3 * 4


def test_a_complete_tensor_has_nothing_to_do():
    t = tensor(Rule.MATRIX, 130, 64, 1)
    s = make_schedule(t, 130, True, state_loaded=False)
    assert not s.reads and not s.steps and s.skipped_bytes == t.planned_read_bytes


def test_a_zero_row_tensor_writes_one_empty_chunk():
    t = tensor(Rule.MATRIX, 0, 64, 1)
    s = make_schedule(t, 0, False, state_loaded=False)
    assert [(st.op, st.r0, st.r1) for st in s.steps if st.op is Op.EMIT] == [(Op.EMIT, 0, 0)]


def test_progress_past_the_end_is_refused():
    with pytest.raises(ValueError, match="rows done"):
        make_schedule(tensor(Rule.MATRIX, 10, 4, 0), 10, False, state_loaded=False)


def test_copies_stay_on_the_host_and_merges_go_to_the_compute_device():
    assert all(not r.compute for r in make_schedule(tensor(Rule.COPY_BASE, 10, 4, 0), 0, False, False).reads)
    assert all(r.compute for r in make_schedule(tensor(Rule.MATRIX, 10, 4, 1), 0, False, False).reads)
