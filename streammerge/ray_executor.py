"""The Ray executor (``merge --executor ray``): one merge spread over a Ray cluster, byte-identical to a local run.

Ray schedules; streammerge does not. The driver plans the merge, splits it into work units
(:func:`streammerge.parts.split_units`, the same split ``--part K/N`` uses), checks that every worker sees the
inputs and the output folder at the same paths (each node reads a probe file the driver wrote and writes one back),
then submits one Ray task per unit. Each task plans the merge again on its worker, with a budget from that
worker's own resources (``--max-ram``/``--max-vram`` when given, else its share of the node's free memory), and runs
its unit exactly as ``merge --part K/N`` does: its shards and its own journal in the shared work folder. Every task
asks for the same kind of device (a GPU each when the merge runs on CUDA; the kind of device is part of the
fingerprint, so a part cannot be continued on another kind). A task whose worker dies is retried by Ray and
resumes from its journal. Progress from every task is summed into one bar. When every task is done the driver
runs :func:`streammerge.parts.finalize`, which checks every part's journal and CRCs and publishes the output.

Ray is an optional dependency (``pip install 'streammerge[ray]'``); without it ``--executor ray`` is refused,
naming the extra.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import fsio
from .errors import StreamMergeError
from .output import work_folder_for
from .parts import PartError, finalize, plan_parts, shard_groups, with_engine_device
from .planner import Plan
from .progress import Progress
from .recipe import Recipe
from .stopping import MergeInterrupted
from .workfolder import finished_output, lock_work_folder

#: how to install Ray for streammerge
RAY_EXTRA = "pip install 'streammerge[ray]'"
#: how many times Ray reruns a task whose worker died (each rerun resumes from the part's journal)
MAX_RETRIES = 3
#: seconds between progress reports from a task
REPORT_EVERY = 0.5


def import_ray() -> Any:
    """The ``ray`` module; raises :class:`StreamMergeError` naming the extra when it is not installed."""
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise StreamMergeError(f"--executor ray needs Ray, which is not installed here: {RAY_EXTRA} (or pip "
                               "install ray), on the machine that runs streammerge and on every Ray worker") from None
    return ray


@dataclass
class RayResult:
    """What a Ray merge did: the output folder, and per part its worker and run summary (None if it was done
    before), and the notes its run gave."""

    out: Path
    parts: list[dict[str, Any]] = field(default_factory=list)
    already_complete: bool = False


# ----------------------------------------------------------------------------------------- on the workers


class _Board:
    """A Ray actor: the latest (bytes done, bytes to do) each part reported."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}
        self.total: dict[int, int] = {}

    def report(self, k: int, done: int, total: int) -> None:
        self.done[k], self.total[k] = done, total

    def read(self) -> tuple[dict[int, int], dict[int, int]]:
        return self.done, self.total


class _ReportingProgress(Progress):
    """A task's progress: drawn nowhere, reported to the driver's board every :data:`REPORT_EVERY` seconds."""

    def __init__(self, total_bytes: int, board: Any, k: int) -> None:
        super().__init__(total_bytes, False)
        self.board, self.k, self.at, self.sent = board, k, 0, 0.0

    def begin(self, tensors: int, resumed: int, done_bytes: int) -> None:
        super().begin(tensors, resumed, done_bytes)
        self.at = done_bytes
        self._send(force=True)

    def read(self, nbytes: int) -> None:
        super().read(nbytes)
        self.at += nbytes
        self._send()

    def close(self) -> None:
        self._send(force=True)
        super().close()

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.board is not None and (force or now - self.sent >= REPORT_EVERY):
            self.board.report.remote(self.k, self.at, self.total_bytes)
            self.sent = now


def _worker_share(n: int, device: str) -> tuple[int, int]:
    """This worker's share of its node: (bytes of RAM, compute threads). The parts that may run on the node at once
    are its CPU slots (its GPUs for a CUDA merge), at most ``n``; each gets that share of half the RAM available
    (within any cgroup limit) and of the node's CPUs."""
    import psutil  # noqa: PLC0415

    from .budget import DEFAULT_RAM_FRACTION, cgroup_headroom  # noqa: PLC0415

    ray = import_ray()
    node = ray.get_runtime_context().get_node_id()
    resources = next((x["Resources"] for x in ray.nodes() if x["NodeID"] == node), {})
    slots = max(1, min(n, int(resources.get("GPU" if device == "cuda" else "CPU", 1))))
    available = psutil.virtual_memory().available
    headroom = cgroup_headroom()
    if headroom is not None:
        available = min(available, headroom)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(available * DEFAULT_RAM_FRACTION / slots), max(1, min(cpus, int(resources.get("CPU", 1))) // slots)


def run_part(recipe: Recipe, k: int, n: int, board: Any = None) -> dict[str, Any]:
    """Run part ``k`` of ``n`` of ``recipe`` here (a Ray task's body; also callable directly). Returns a dict with
    ``part``, ``host``, ``summary`` (None if it was done before) and ``notes``, or ``error`` (the message) and
    ``kind`` (the error's type): errors come back as data, the same on every Ray version."""
    from .api import plan_recipe  # noqa: PLC0415
    from .execute import execute  # noqa: PLC0415

    notes: list[str] = []
    summaries: list[Any] = []
    label = f"{k}/{n}"
    try:
        ram, threads = _worker_share(n, recipe.device)
        if recipe.max_ram is None:
            recipe = replace(recipe, max_ram=ram)
        from ._torch import import_torch  # noqa: PLC0415

        import_torch().set_num_threads(threads)  # (Ray sets one thread per CPU asked for; the bytes do not depend on it)
        plan = plan_recipe(recipe)
        unit = plan.units(n)[k - 1]
        execute(plan, show_progress=False, notify=notes.append, report=summaries.append, unit=unit,
                make_progress=lambda total, show: _ReportingProgress(total, board, k))
    except (StreamMergeError, KeyboardInterrupt) as exc:  # MergeInterrupted is a KeyboardInterrupt
        return {"part": label, "host": socket.gethostname(), "error": str(exc), "kind": type(exc).__name__,
                "notes": notes}
    return {"part": label, "host": socket.gethostname(), "pid": os.getpid(),
            "summary": summaries[0].to_dict() if summaries else None, "notes": notes}


def probe_storage(probe: str, token: str, folders: dict[str, dict[str, int]], node: str) -> str | None:
    """On a worker: None if it reads ``token`` from ``probe`` (written by the driver), sees every input folder's
    files with their sizes, and can write ``probe.<node>`` back; else what it cannot do."""
    try:
        if Path(probe).read_text(encoding="utf-8") != token:
            return f"{probe} holds something else here (not the same storage as the driver's)"
    except OSError as exc:
        return f"cannot read {probe} in the output's folder ({exc.strerror or exc})"
    for folder, files in folders.items():
        for name, size in files.items():
            try:
                got = os.stat(Path(folder) / name).st_size
            except OSError as exc:
                return f"cannot read the input {Path(folder) / name} ({exc.strerror or exc})"
            if got != size:
                return f"the input {Path(folder) / name} has {got} bytes here, {size} on the driver"
    try:
        fsio.write_file(Path(f"{probe}.{node}"), token.encode())
    except OSError as exc:
        return f"cannot write in the output's folder {Path(probe).parent} ({exc.strerror or exc})"
    return None


# --------------------------------------------------------------------------------------------- the driver


def _device_kind(ray: Any, requested: str) -> str:
    """The kind of device every task runs on: ``cuda`` when asked for, or with ``auto`` when the cluster has a GPU;
    else ``cpu``."""
    gpus = ray.cluster_resources().get("GPU", 0)
    kind = requested.split(":")[0]
    if kind == "auto":
        return "cuda" if gpus else "cpu"
    if kind == "cuda" and not gpus:
        raise StreamMergeError("--device cuda: the Ray cluster has no GPU; use --device cpu (or auto)")
    return kind


def _nodes(ray: Any, device: str) -> list[dict[str, Any]]:
    """The alive nodes that can run a part (with a GPU for a CUDA merge)."""
    resource = "GPU" if device == "cuda" else "CPU"
    return [x for x in ray.nodes() if x.get("Alive") and x.get("Resources", {}).get(resource, 0) > 0]


def _input_files(recipe: Recipe) -> dict[str, dict[str, int]]:
    """Every input folder's files (name → size) as the driver sees them."""
    folders = [recipe.base, *recipe.models, *(a for a in recipe.adapters if a is not None),
               *((recipe.tokenizer_from,) if recipe.tokenizer_from else ())]
    out: dict[str, dict[str, int]] = {}
    for folder in folders:
        real = folder.resolve()
        out[str(real)] = {p.name: p.stat().st_size for p in sorted(real.iterdir()) if p.is_file()}
    return out


def check_storage(ray: Any, nodes: list[dict[str, Any]], plan: Plan) -> None:
    """Refuse, before any part starts, a cluster where some node does not see the inputs and the output's folder at
    the same paths: the driver writes a probe file beside the output, each node reads it, checks the inputs and
    writes its own back, and the driver reads those."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    assert plan.recipe.out is not None
    where = fsio.parent_of(plan.recipe.out).resolve()
    token = secrets.token_hex(16)
    probe = where / f".streammerge-probe-{token[:12]}"
    fsio.write_file(probe, token.encode())
    folders = _input_files(plan.recipe)
    task = ray.remote(probe_storage)
    problems = []
    try:
        refs = {x["NodeID"]: task.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            x["NodeID"], soft=False)).remote(str(probe), token, folders, x["NodeID"]) for x in nodes}
        names = {x["NodeID"]: x.get("NodeManagerAddress", "?") for x in nodes}
        for node, ref in refs.items():
            who = f"node {names[node]} ({node[:8]})"
            problem = ray.get(ref, timeout=300)
            if problem is None:
                try:
                    back = Path(f"{probe}.{node}").read_text(encoding="utf-8")
                except OSError:
                    back = None
                if back != token:
                    problem = f"wrote {probe}.{node}, which the driver does not see"
            if problem:
                problems.append(f"{who}: {problem}")
    finally:
        for path in (probe, *(Path(f"{probe}.{x['NodeID']}") for x in nodes)):
            try:
                os.unlink(path)
            except OSError:
                pass
    if problems:
        raise StreamMergeError("the inputs and the output must be on storage every Ray worker sees at the same paths "
                               "(a shared file system such as NFS or Lustre), and they are not: "
                               + "; ".join(problems) + ". Nothing was merged")


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to the cluster at ``address`` (or the one ``RAY_ADDRESS`` names, or a new local one); True if this
    call started the connection (and so ends it). An already initialised Ray (a caller's) is used as it is."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "(none given: RAY_ADDRESS, or a new local one)"
        raise StreamMergeError(f"cannot connect to the Ray cluster {where}: {exc}") from None
    return True


def merge_on_ray(recipe: Recipe, parts: int | None = None, address: str | None = None, resize_shards: bool = False,
                 show_progress: bool = False, notify: Callable[[str], None] | None = None,
                 max_retries: int = MAX_RETRIES) -> RayResult:
    """Merge ``recipe`` on a Ray cluster in ``parts`` parts (default: one per node, or per GPU for a CUDA merge, at
    most one per group of output shards) and publish it; returns what each part did.

    Raises :class:`StreamMergeError` (Ray missing, an unreachable cluster, storage some worker does not see, too
    few shard files for ``parts`` without ``resize_shards``, a part that failed: its message, with the other
    parts' work kept for a rerun), :class:`MergeInterrupted` on Ctrl-C (every part's journaled work is kept)."""
    ray = import_ray()
    fsio.check_platform()
    if recipe.out is None:
        raise StreamMergeError("a merge needs an output folder (--out)")
    if not recipe.journal:
        raise PartError("--executor ray needs the journal (finalize checks every part's): drop --no-journal")
    started = _connect(ray, address)
    try:
        device = _device_kind(ray, recipe.device)
        nodes = _nodes(ray, device)
        if not nodes:
            raise StreamMergeError(f"the Ray cluster has no alive node with a {'GPU' if device == 'cuda' else 'CPU'}")
        # planned here on the CPU (the driver computes nothing); the workers plan again with their own budgets
        on_cpu = replace(recipe, device="cpu")
        if parts is None:
            slots = sum(int(x["Resources"].get("GPU", 0)) for x in nodes) if device == "cuda" else len(nodes)
            parts = max(1, min(slots, len(shard_groups(plan_parts(on_cpu, 1)))))
        plan = with_engine_device(plan_parts(on_cpu, parts, resize_shards), device)
        if finished_output(plan):
            fsio.remove_tree(work_folder_for(recipe.out))
            return RayResult(recipe.out, [], True)
        for note in plan.notes:
            if notify is not None:
                notify(note)
        check_storage(ray, nodes, plan)
        work = work_folder_for(recipe.out)
        if recipe.restart and work.is_dir():  # here, once: a retried task must not discard its own work again
            lock = lock_work_folder(work, recipe.out)
            try:
                fsio.remove_tree(work)
            finally:
                os.close(lock)
        # what the workers plan: absolute paths (their working folders differ), Hub IDs resolved, the shard size
        # chosen, the kind of device decided
        planned = plan.recipe
        worker_recipe = replace(Recipe.from_json(planned.to_json()), device=device, chunk_rows=planned.chunk_rows,
                                journal=planned.journal, redo_changed=planned.redo_changed, restart=False)
        results = _run_parts(ray, worker_recipe, plan, parts, show_progress, max_retries)
        failed = [r for r in results if "error" in r]
        for r in results:
            for note in r.get("notes", ()):
                if notify is not None:
                    notify(f"part {r['part']}: {note}")
        if failed:
            raise StreamMergeError(
                "; ".join(f"part {r['part']} failed on {r.get('host', '?')}: {r['error']}" for r in failed)
                + f". Every part's finished work is kept in {work}: fix the cause and run the same command again "
                  "(each part resumes from its journal)")
        finalize(recipe.out, show_progress=show_progress)
        return RayResult(recipe.out, results)
    finally:
        if started:
            ray.shutdown()


def _run_parts(ray: Any, recipe: Recipe, plan: Plan, n: int, show_progress: bool, max_retries: int) \
        -> list[dict[str, Any]]:
    """Run the ``n`` parts as Ray tasks, one bar over their summed progress; every task's result, in part order
    (a task that failed beyond its retries gives an ``error``)."""
    from tqdm import tqdm  # noqa: PLC0415

    board = ray.remote(num_cpus=0)(_Board).remote()
    task = ray.remote(run_part).options(num_cpus=1, num_gpus=1 if recipe.device == "cuda" else 0,
                                        max_retries=max_retries, retry_exceptions=False)
    refs = [task.remote(recipe, k, n, board) for k in range(1, n + 1)]
    index = {ref: k for k, ref in enumerate(refs, 1)}
    results: dict[int, dict[str, Any]] = {}
    estimate = {u.index: sum(plan.tensor(t).planned_read_bytes for t in u.tensors) for u in plan.units(n)}
    bar = tqdm(total=sum(estimate.values()), unit="B", unit_scale=True, unit_divisor=1024, leave=False,
               desc=f"merging on Ray ({n} part{'s' if n > 1 else ''})",
               disable=not show_progress or not sys.stderr.isatty())
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=REPORT_EVERY)
            for ref in ready:
                k = index[ref]
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the task failed beyond its retries (its worker died)
                    results[k] = {"part": f"{k}/{n}", "error": f"{type(exc).__name__}: {exc}"}
            if show_progress:
                done, total = ray.get(board.read.remote())
                bar.total = sum(total.get(k, e) for k, e in estimate.items())
                bar.n = sum(done.values())
                bar.set_postfix_str(f"{len(results)}/{n} parts done", refresh=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # each task stops at its next block, its work journaled
        work = work_folder_for(plan.recipe.out)
        raise MergeInterrupted(f"merge interrupted; every part's finished work is kept in {work}: run the same command "
                               "again to continue (each part resumes from its journal)", 130) from None
    finally:
        bar.close()
    return [results[k] for k in sorted(results)]


__all__ = ["RAY_EXTRA", "RayResult", "check_storage", "import_ray", "merge_on_ray", "probe_storage", "run_part"]
