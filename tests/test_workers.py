"""Compute workers (``--threads N``): several tensors merged at once give the same bytes as one worker, whatever N,
the chunk sizes, a SIGKILL or a stop; the planner fits the workers in the budget; the thread count comes from the
flag, OMP_NUM_THREADS, the affinity mask and the cgroup CPU quota."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from distributed_helpers import cli, cli_env, tie_head
from helpers import assert_same_output, output_problems, partial

import streammerge
from streammerge import api
from streammerge.budget import make_budget, resolve_threads, usable_cores
from streammerge.errors import NonFiniteError, StreamMergeError
from streammerge.examples import SHAPES, write_family
from streammerge.stopping import MergeInterrupted

#: a method of each kind: statistics passes with tie cursors (ties, sce), random masks (dare_ties, della), a
#: column method (widen), element-wise (task_arithmetic), a Gram pass (karcher)
METHODS: dict[str, dict[str, object]] = {
    "widen": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.6},
    "della": {"density": 0.6, "epsilon": 0.1},
    "sce": {"select_topk": 0.5},
    "task_arithmetic": {},
    "karcher": {},
}


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny family with a stored tied head (a job that waits for its embedding's worker)."""
    family = {k: p.resolve() for k, p in write_family(tmp_path_factory.mktemp("fam"), "tiny", dtype="bf16").items()}
    tie_head(family)
    return family


def _merge(fam: dict[str, Path], out: Path, method: str, **options: object) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, method, METHODS[method],
                         shard_size="60KB", **options)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_bytes_do_not_depend_on_the_number_of_workers(method, fam, tmp_path):
    one = _merge(fam, tmp_path / "one", method, threads=1)
    plans = {n: api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", method, METHODS[method],
                         threads=n, max_ram="1GiB") for n in (2, 3)}
    assert [p.workers for p in plans.values()] == [2, 3], "the budget allows one worker per thread"
    for n, chunk_rows in ((2, None), (3, None), (3, 5)):
        out = _merge(fam, tmp_path / f"n{n}-{chunk_rows}", method, threads=n, chunk_rows=chunk_rows)
        assert_same_output(out, one)


def test_workers_take_the_largest_tensors_first_and_a_tied_head_last(fam, tmp_path, monkeypatch):
    """The readers claim the largest tensor first and the tied head last, and the head is computed only once its
    embedding is finished. (Which worker starts its claimed tensor first is up to the scheduler: a worker that
    claimed a small tensor early may start it after the head.)"""
    from streammerge import runner, workers

    claimed: list[str] = []
    events: list[tuple[str, str]] = []
    real_claim, real_run = workers.JobQueue.claim, runner.run_tensor
    lock = threading.Lock()

    def claim(self):  # type: ignore[no-untyped-def]
        with lock:
            item = real_claim(self)
            if item is not None:
                claimed.append(item[1].tensor.name)
            return item

    def run_tensor(plan, job, io):  # type: ignore[no-untyped-def]
        with lock:
            events.append(("start", job.tensor.name))
        real_run(plan, job, io)
        with lock:
            events.append(("end", job.tensor.name))

    monkeypatch.setattr(workers.JobQueue, "claim", claim)
    monkeypatch.setattr("streammerge.execute.run_tensor", run_tensor)
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", "widen", threads=3)
    _merge(fam, tmp_path / "out", "widen", threads=3)
    assert sorted(claimed) == sorted(t.name for t in p.tensors) and claimed[-1] == "lm_head.weight"
    assert claimed[0] == max(p.tensors, key=lambda t: t.planned_read_bytes).name
    assert events.index(("end", "model.embed_tokens.weight")) < events.index(("start", "lm_head.weight"))


def test_shared_blocks_are_computed_once_and_a_helpers_failure_reaches_the_owner():
    """A chunk's independent blocks go to the owner and to an idle worker, each block once; a block that fails on
    the helper fails the owner's call, after the helper's block in flight is done."""
    from streammerge.workers import JobQueue

    queue = JobQueue([], 2)
    stop = threading.Event()
    helper = threading.Thread(target=queue.help, args=(lambda: None, stop.is_set), name="helper")
    helper.start()
    try:
        deadline = time.monotonic() + 30
        while not queue._idle and time.monotonic() < deadline:
            time.sleep(0.001)
        done: list[tuple[int, str]] = []

        def work(b0: int, b1: int) -> None:
            time.sleep(0.005)
            done.append((b0, threading.current_thread().name))

        queue.run_blocks([(i, i + 1) for i in range(40)], work)
        assert sorted(b for b, _ in done) == list(range(40))
        assert {who for _, who in done} == {"helper", threading.current_thread().name} and queue.helped > 0

        def failing(b0: int, b1: int) -> None:
            time.sleep(0.005)
            if threading.current_thread().name == "helper":
                raise ValueError(f"block {b0}")

        with pytest.raises(ValueError, match="block"):
            queue.run_blocks([(i, i + 1) for i in range(40)], failing)
    finally:
        stop.set()
        helper.join(30)
    assert not helper.is_alive()


#: the merges whose blocks idle workers share: WIDEN's statistics and merge; the merge pass of the delta methods
#: (a sum; a sign election; DARE's and DELLA's draws; a selection's ties, counted ahead while some are open)
SHARED = {"widen": {}, "task_arithmetic": {}, "ties": {"density": 0.5}, "breadcrumbs": {"density": 0.5, "gamma": 0.05},
          "dare_ties": {"density": 0.6}, "della": {"density": 0.6, "epsilon": 0.1}}


#: the merges whose statistics pass sums columns tile by tile (``_tiles.FusedTiles``: blocks out of turn sum their
#: tiles apart, added in row order later), with an MLP projection the largest tensor: WIDEN's matrix statistics,
#: SCE's weights, model_stock's and multislerp's Gram sums, the L1 rescale of DARE (also in chunks that end inside
#: a tile: the next chunk's first block continues it in turn); their merge passes are shared too
SUMMED = {"widen": {}, "sce": {}, "model_stock": {}, "multislerp": {}, "dare_ties": {"density": 0.6}}
#: the merges of :data:`SHARED` whose embedding's statistics are column sums: the L1 rescale's
L1_RESCALED = {"dare_ties", "della"}


@pytest.mark.parametrize("method,dtype,largest,chunk_rows",
                         [(m, "bf16", "embedding", None) for m in SHARED] + [("ties", "f32", "embedding", None)]
                         + [(m, "bf16", "mlp", None) for m in SUMMED] + [("dare_ties", "bf16", "mlp", 20000)]
                         + [("ties_rescaled", "bf16", "embedding", None)])
def test_idle_workers_help_with_a_large_tensor_and_the_bytes_stay_the_same(method, dtype, largest, chunk_rows,
                                                                             tmp_path, monkeypatch):
    """An embedding much larger than the rest: the workers that finish the small tensors compute blocks of its
    chunks, to the bytes one worker writes (eagerly, the independent reference). With the fused kernels, a
    selection's radix-select passes are shared too (helpers count into histograms of their own), and its ties are
    counted ahead in the chunks where some are still to be kept, the chunk where the last is kept among those
    (float32 deltas: pass A's candidates cannot settle the threshold, so pass B runs, shared too). DELLA's decisions
    are made ahead of its L1 pass, by the helpers too. Column sums (WIDEN's by a matrix's columns, SCE's, the Gram
    sums, the L1 rescale's) are shared with blocks out of turn. Each shared chunk
    waits until a worker is idle, and its owner until a helper has taken a block, so the helpers surely take some."""
    from streammerge import kernels, workers
    from streammerge.methods import _delta, _tiles

    selects = method in ("ties", "breadcrumbs", "ties_rescaled")
    if selects and kernels._load() is None:
        pytest.skip("numba is not installed: a selection's ties are counted by a fused kernel")
    params = {**SHARED, **SUMMED}[method] if largest == "mlp" else SHARED[method.removesuffix("_rescaled")]
    if method.endswith("_rescaled"):  # the L1 pass keeps the ties too, counted ahead as in the merge pass
        method, params = method.removesuffix("_rescaled"), {**params, "rescale": True}
    large = {"vocab": 20000} if largest == "embedding" else {"intermediate": 30000}
    shape = replace(SHAPES["tiny"], layers=1, **large)
    family = write_family(tmp_path / "fam", shape, dtype=dtype)
    models = [family["chat"], family["multilingual"]]
    options = {"chunk_rows": chunk_rows} if chunk_rows else {}
    monkeypatch.setenv(kernels.ENV, "eager")
    ref = api.merge(family["base"], models, tmp_path / "one", method, params, threads=1, **options)
    monkeypatch.setenv(kernels.ENV, "numba" if kernels._load() is not None else "eager")
    real_idle, real_run, real_start = workers.JobQueue.idle, workers.JobQueue.run_blocks, _delta._Selection.start_blocks
    real_hist, real_decide, real_add = _delta._HelperCounts.hist, _delta.MagPrune.decide_ahead, _tiles.FusedTiles.add
    out_of_turn: list[int] = []  # blocks of column sums added out of turn, by their first row
    real_merge_start, ahead_passes = _delta._DeltaTensorMerge.start_blocks, set()  # passes with work done ahead
    decided: list[int] = []  # DELLA's blocks decided ahead, by their first row
    helped: list[int] = []
    closed: list[bool] = []  # per chunk counted ahead: whether its last open tie was kept in it
    helper_passes: set[int] = set()  # the radix-select passes helpers counted blocks of

    def idle(self):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 30
        while not self._idle and time.monotonic() < deadline:
            time.sleep(0.001)
        return real_idle(self)

    def run_blocks(self, blocks, work):  # type: ignore[no-untyped-def]
        owner, taken = threading.get_ident(), threading.Event()

        def slow(b0: int, b1: int) -> None:  # the owner waits (up to a second) until a helper has taken a block
            if threading.get_ident() != owner:
                taken.set()
            elif len(blocks) > 1:
                taken.wait(1.0)
            work(b0, b1)

        before = self.helped
        real_run(self, blocks, slow)
        helped.append(self.helped - before)

    def start_blocks(self, starts, met):  # type: ignore[no-untyped-def]
        real_start(self, starts, met)
        closed.append(not self.open_ties)

    def merge_start_blocks(self, pass_index, starts, results):  # type: ignore[no-untyped-def]
        ahead_passes.add(pass_index)
        return real_merge_start(self, pass_index, starts, results)

    monkeypatch.setattr(workers.JobQueue, "idle", idle)
    monkeypatch.setattr(workers.JobQueue, "run_blocks", run_blocks)
    def hist(self, topk, pass_index):  # type: ignore[no-untyped-def]
        if threading.get_ident() != self._owner:
            helper_passes.add(pass_index)
        return real_hist(self, topk, pass_index)

    def decide_ahead(self, r0, base, model, lock):  # type: ignore[no-untyped-def]
        decided.append(r0)
        return real_decide(self, r0, base, model, lock)

    def add(self, r0, rows, total, kernel):  # type: ignore[no-untyped-def]
        if self.feeder._next_row != r0:
            out_of_turn.append(r0)
        return real_add(self, r0, rows, total, kernel)

    monkeypatch.setattr(_tiles.FusedTiles, "add", add)
    monkeypatch.setattr(_delta._Selection, "start_blocks", start_blocks)
    monkeypatch.setattr(_delta._DeltaTensorMerge, "start_blocks", merge_start_blocks)
    monkeypatch.setattr(_delta.MagPrune, "decide_ahead", decide_ahead)
    monkeypatch.setattr(_delta._HelperCounts, "hist", hist)
    # (the MLP's three projections are the largest: a fourth worker takes the rest, then helps)
    threads = 3 if largest == "embedding" else 4
    out = api.merge(family["base"], models, tmp_path / "three", method, params, threads=threads, **options)
    assert sum(helped) > 0
    if selects:
        assert any(closed), f"no shared chunk kept the last tie: {closed}"
        assert helper_passes == ({0, 1} if dtype == "f32" else {0}), helper_passes
    if kernels._load() is not None:
        assert decided or method != "della", "no DELLA decisions made ahead"
        sums_columns = largest == "mlp" or method in L1_RESCALED or "rescale" in params
        if "rescale" in params:
            assert any(p is not None for p in ahead_passes), f"no ties counted ahead of the L1 pass: {ahead_passes}"
        assert out_of_turn or not sums_columns, "no block of column sums ran out of turn"
    assert_same_output(out, ref)


def test_a_failure_in_one_worker_stops_them_all_and_keeps_the_work(fam, tmp_path, monkeypatch):
    """A NaN in one tensor's input: the run stops naming it, the other workers' finished tensors stay journaled,
    and once the input is fixed the same call continues to the reference bytes."""
    from streammerge.methods import widen

    ref = _merge(fam, tmp_path / "ref", "widen", threads=1)
    real = widen._MatrixMerge.emit
    monkeypatch.setenv("STREAMMERGE_KERNELS", "eager")  # emit, not the fused emit_raw, computes every block

    def emit(self, r0, base, models):  # type: ignore[no-untyped-def]
        out = real(self, r0, base, models)
        if self.task.name == "model.layers.1.mlp.down_proj.weight":
            out[0, 0] = float("nan")
        return out

    monkeypatch.setattr(widen._MatrixMerge, "emit", emit)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError) as info:
        _merge(fam, out, "widen", threads=3)
    assert "model.layers.1.mlp.down_proj.weight" in str(info.value) and partial(out).is_dir()
    assert not out.exists()
    monkeypatch.undo()
    _merge(fam, out, "widen", threads=2)
    assert_same_output(out, ref)


def test_a_signal_stops_every_worker_and_the_run_resumes_to_the_same_bytes(fam, tmp_path, monkeypatch):
    from streammerge import runner

    ref = _merge(fam, tmp_path / "ref", "ties", threads=1)
    real = runner.run_tensor
    started = {"n": 0}

    def run_tensor(plan, job, io):  # type: ignore[no-untyped-def]
        started["n"] += 1
        if started["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(plan, job, io)

    monkeypatch.setattr("streammerge.execute.run_tensor", run_tensor)
    out = tmp_path / "out"
    with pytest.raises(MergeInterrupted) as info:
        _merge(fam, out, "ties", threads=3, handle_signals=True)
    assert info.value.exit_code == 143 and "stopped by SIGTERM" in str(info.value)
    assert started["n"] < 14, f"{started['n']} tensors started: the workers did not stop"
    assert not out.exists() and [t.name for t in threading.enumerate() if t.name.startswith("streammerge")] == []
    monkeypatch.undo()
    _merge(fam, out, "ties", threads=1)
    assert_same_output(out, ref)


@pytest.mark.parametrize("kill_at", [9, 25, 60])
def test_sigkill_with_workers_then_resume_with_other_counts(kill_at, fam, tmp_path):
    """A merge of three workers killed at its Nth checkpoint (wherever each worker was) continues with two, and
    with one, to the bytes of one uninterrupted worker."""
    ref = _merge(fam, tmp_path / "ref", "widen", threads=1, chunk_rows=3)
    out = tmp_path / "out"
    args = ["merge", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--out", out,
            "--method", "widen", "--shard-size", "60KB", "--chunk-rows", "3", "-q"]
    r = cli(*args, "--threads", "3", env=cli_env(STREAMMERGE_KILL_AT=str(kill_at)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = cli("resume", out, "-q", "--threads", "2", env=cli_env(STREAMMERGE_KILL_AT=str(kill_at)))
    if r.returncode == -signal.SIGKILL:  # killed again, at the same count, then finished by one worker
        r = cli(*args, "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert not output_problems(out, ref)


def test_the_planner_fits_the_workers_in_the_budget(fam, tmp_path):
    def plan(**options: object):  # type: ignore[no-untyped-def]
        return api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", "ties", {"density": 0.5},
                        **options)

    one, three = plan(threads=1, max_ram="1GiB"), plan(threads=3, max_ram="1GiB")
    assert (one.workers, three.workers, three.threads_per_worker) == (1, 3, 1)
    assert three.to_dict()["workers"] == 3 and three.to_dict()["budget"]["threads_source"] == "--threads"
    # each worker gets a third of the budget: the least power-of-two budget that fits one worker fits fewer than 3
    least = next(kib for kib in (2 ** k for k in range(4, 20)) if _fits(plan, f"{kib}KiB"))
    tight = plan(threads=3, max_ram=f"{least}KiB")
    assert 1 <= tight.workers < 3
    assert tight.peak_ram <= make_budget(f"{least}KiB").max_ram
    # the predicted peak counts every worker's buffers
    assert three.peak_ram == 3 * (three.depth * (three.slot_bytes + three.out_buffer_bytes) + three.scratch_bytes)
    with pytest.raises(StreamMergeError, match="--threads must be a positive whole number, got 0"):
        plan(threads=0)


def _fits(plan, max_ram: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        plan(threads=1, max_ram=max_ram)
        return True
    except StreamMergeError:
        return False


def test_analyze_gives_the_same_figures_with_any_number_of_workers(fam):
    one = streammerge.analyze(fam["base"], [fam["chat"], fam["multilingual"]], threads=1).to_json()
    three = streammerge.analyze(fam["base"], [fam["chat"], fam["multilingual"]], threads=3).to_json()
    for d in (one, three):
        d.pop("run", None)
    assert one == three


def test_the_default_thread_count_is_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert resolve_threads(None) == (cores, "the CPUs in this process's affinity mask")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == (3, "OMP_NUM_THREADS") and resolve_threads(5) == (5, "--threads")
    for bad in ("0", "-1", "two", True, 1.5):
        with pytest.raises(StreamMergeError, match="--threads must be a positive whole number"):
            resolve_threads(bad)  # type: ignore[arg-type]

    # cgroup v2: a quota of 1.5 CPUs in the process's group, 4 CPUs in its parent: 2
    root = tmp_path / "cg2"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "cpu.max").write_text("400000 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("150000 100000\n")
    (root / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    assert usable_cores(proc, root) == (min(cores, 2), "CPUs of its cgroup's CPU quota" if cores > 2 else
                                        "CPUs in this process's affinity mask")
    # cgroup v1: cpu,cpuacct controller with a 1-CPU quota; no quota (-1) is no limit
    v1 = tmp_path / "cg1"
    (v1 / "cpu,cpuacct" / "job").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/job\n3:memory:/x\n")
    assert usable_cores(proc, v1) == (1, "CPUs of its cgroup's CPU quota")
    proc.write_text("4:cpu,cpuacct:/\n")
    assert usable_cores(proc, v1)[0] == cores


def test_the_command_line_takes_threads_and_the_plan_shows_the_workers(fam, tmp_path):
    r = cli("plan", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--method", "ties",
            "--param", "density=0.5", "--threads", "2", "--max-ram", "1GiB")
    assert r.returncode == 0, r.stderr
    assert "threads     2 (--threads): 2 tensor(s) merged at once" in r.stdout
    r = cli("merge", "--base", fam["base"], "--model", fam["chat"], "--out", tmp_path / "o", "--threads", "0")
    assert r.returncode == 2 and "--threads" in r.stderr and "0 is not in the range x>=1" in r.stderr


def test_a_tied_head_waits_for_every_writer_once_not_per_chunk(fam, tmp_path, monkeypatch):
    """The head's job starts once its embedding's job has finished, so every write of the embedding has been
    submitted: one fence of each worker's writer covers all the head's chunks (each fence waits behind whatever
    that worker queued since)."""
    from streammerge.pipeline import WriteBehind

    fences: list[int] = []
    real_fence = WriteBehind.fence

    def fence(self, check=None):  # type: ignore[no-untyped-def]
        fences.append(id(self))
        real_fence(self, check)

    monkeypatch.setattr(WriteBehind, "fence", fence)
    plan = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", "task_arithmetic",
                    threads=3, chunk_rows=5)
    head = plan.tensor("lm_head.weight")
    assert len(plan.tensors) > 3 and head.shape[0] > 10  # the head's copy takes several chunks
    out = _merge(fam, tmp_path / "out", "task_arithmetic", threads=3, chunk_rows=5)
    assert len(fences) == 3 and len(set(fences)) == 3
    assert_same_output(out, _merge(fam, tmp_path / "one", "task_arithmetic", threads=1))
