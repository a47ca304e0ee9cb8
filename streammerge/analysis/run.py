"""A statistics-only run of the merge engine: plan, read and compute as a merge does, write nothing.

:func:`plan_analysis` plans the request with :class:`~streammerge.analysis.stats.StatisticsMethod` through the same
:func:`~streammerge.api.plan_recipe` as a merge (the same checks of the inputs, the same classification of every
tensor, chunk sizes from the same budget, the same device). :func:`run_statistics` then gives every analyzed tensor
a schedule of statistics steps only (:func:`statistics_schedule`: read, accumulate, end each pass, hand over the
state), and the merge's compute workers (:mod:`streammerge.workers`) execute it with the per-tensor runner
:func:`~streammerge.runner.run_tensor`, their reader threads reading ahead (:class:`StatisticsIO`, the local
executor's I/O without a work folder or a writer). The
statistics arrive through the runner's ``save_state`` step: nothing is journaled, nothing is written anywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .._torch import load_torch, torch
from ..api import plan_recipe
from ..device import gpu_memory_peak
from ..execute import LocalIO
from ..formats.reader import InputFiles
from ..methods import Rule
from ..planner import Plan, TensorPlan
from ..progress import Progress, peak_rss
from ..recipe import Recipe
from ..runner import TensorJob, run_tensor
from ..schedule import Op, Read, Step, TensorSchedule
from ..stopping import StopFlag
from ..units import format_size
from ..workers import JobQueue, run_workers
from .stats import StatisticsMethod

State = dict[str, torch.Tensor]


def plan_analysis(recipe: Recipe) -> Plan:
    """Plan the statistics of ``recipe``'s models against its base (nothing is read but headers, nothing written)."""
    recipe = replace(recipe, out=None, allow_incomplete_output=True)  # no output: config.json is not needed
    return plan_recipe(recipe, dry_run=True, method=StatisticsMethod(len(recipe.models)))


def analyzed(t: TensorPlan) -> bool:
    """Whether the analysis computes ``t``: every tensor a merge computes (not a kept base value or a tied head)."""
    return t.rule.merged


def skip_reason(t: TensorPlan) -> str:
    """Why ``t`` is not analyzed."""
    if t.rule is Rule.TIED_COPY:
        return f"tied to {t.copy_of}: the same weights"
    return {"--exclude": "--exclude", "derived buffer": "a buffer computed at load time", "empty": "empty",
            "not a float": "not floating point", "--keep-vision": "--keep-vision"}.get(t.kept_because or "",
                                                                                    t.kept_because or "not merged")


def statistics_schedule(t: TensorPlan) -> TensorSchedule:
    """``t``'s statistics passes and nothing else: each pass reads its chunks in row order (one read of the whole
    tensor for every pass when it fits the budget, as a merge does), ends, and the state is handed over."""
    reads: list[Read] = []
    steps: list[Step] = []
    if t.resident:
        reads.append(Read(t.name, 0, t.rows, t.sources))
    for p in range(t.stat_passes):
        for r0, r1 in t.chunks():
            if not t.resident:
                reads.append(Read(t.name, r0, r1, t.sources))
            steps.append(Step(Op.STATS, r0, r1, p, read=len(reads) - 1))
        steps.append(Step(Op.END_PASS, pass_index=p))
    steps.append(Step(Op.SAVE_STATE))
    last = {s.read: i for i, s in enumerate(steps) if s.read is not None}
    steps = [replace(s, release=True) if last.get(s.read) == i else s for i, s in enumerate(steps)]
    return TensorSchedule(t.name, tuple(reads), tuple(steps), 0)


class StatisticsIO(LocalIO):
    """A compute worker's I/O for a run that writes nothing: the local executor's reader thread, staging and device
    uploads; a tensor's statistics arrive in :meth:`save_state` and go to ``on_state(name, state)`` (from the
    worker's thread)."""

    def __init__(self, plan: Plan, stop: StopFlag, shown: Progress, inputs: InputFiles, jobs: JobQueue,
                 on_state: Callable[[str, State], None]) -> None:
        super().__init__(plan, None, stop, shown, None, inputs, jobs)  # no work folder or writer: nothing is written
        self.on_state = on_state

    def save_state(self, t: TensorPlan, state: State) -> None:
        self.on_state(t.name, state)

    def checkpoint(self, event: str) -> None:
        pass  # nothing durable

    def commit(self) -> None:
        pass

    def output_buffer(self) -> tuple[int, torch.Tensor]:
        raise AssertionError("a statistics run writes nothing")


class AnalysisProgress(Progress):
    """The merge's progress bar, labelled ``analyzing 37/290``."""

    def _label(self) -> str:
        return f"analyzing {min(self.index + 1, self.tensors)}/{self.tensors}"


@dataclass(frozen=True)
class RunFigures:
    """What the statistics run did: tensors analyzed, seconds, bytes read, peak RSS and GPU memory (bytes)."""

    tensors: int
    elapsed: float
    bytes_read: int
    peak_rss: int
    peak_vram: int | None

    def line(self) -> str:
        rate = self.bytes_read / self.elapsed if self.elapsed > 0 else 0.0
        vram = f", peak GPU memory {format_size(self.peak_vram)}" if self.peak_vram is not None else ""
        return (f"analyzed {self.tensors} tensors in {self.elapsed:.1f} s: read {format_size(self.bytes_read)} "
                f"({format_size(rate)}/s); peak RSS {format_size(self.peak_rss)}{vram}")


def run_statistics(plan: Plan, show_progress: bool, handle_signals: bool, notify: Callable[[str], None] | None,
                   on_state: Callable[[str, State], None]) -> RunFigures:
    """Run every analyzed tensor's statistics, handing each tensor's state (see
    :class:`~streammerge.analysis.stats.TensorStatistics`) to ``on_state(name, state)`` as it completes (so only
    the column sums of the tensors in progress are held at once; with several workers, in the order they finish,
    one call at a time); returns what the run did. Raises
    :class:`~streammerge.stopping.MergeInterrupted` on a stop (nothing to keep) or
    :class:`~streammerge.errors.NonFiniteError` naming a tensor whose input holds NaN or infinity."""
    for note in plan.notes:
        if notify is not None:
            notify(note)
    load_torch()
    started = time.monotonic()
    jobs = [TensorJob(t, statistics_schedule(t)) for t in plan.tensors if analyzed(t)]
    total = sum(r.nbytes for job in jobs for r in job.schedule.reads)
    shown = AnalysisProgress(total, show_progress)
    lock = threading.Lock()

    def receive(name: str, state: State) -> None:  # from the workers' threads, one tensor at a time
        with lock:
            on_state(name, state)

    def compute(io: StatisticsIO, index: int, job: TensorJob) -> None:
        shown.tensor(index)
        run_tensor(plan, job, io)

    with StopFlag(handle_signals) as stop, InputFiles() as inputs:
        queue = JobQueue(jobs, plan.workers)
        ios = [StatisticsIO(plan, stop, shown, inputs, queue, receive) for _ in range(plan.workers)]
        try:
            shown.begin(len(jobs), resumed=0, done_bytes=0)
            run_workers(queue, ios, compute, plan.threads_per_worker)
        finally:
            for io in ios:
                io.close()
            shown.close()
    return RunFigures(len(jobs), time.monotonic() - started, shown.bytes_read, peak_rss(),
                      gpu_memory_peak(plan.budget.device))
