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

Before ``ray.init`` the driver says which cluster it uses (:func:`resolve_target`, as Ray decides it) and checks, in
seconds, that its address answers (given an address where nothing listens, ``ray.init`` retries for many minutes);
a cluster that asks for a token it does not have is refused saying how to give it one. A task first checks that the
method plugin the merge was planned with (distribution and version, from the fingerprint) is installed on its node.
A stop (Ctrl-C; SIGINT or SIGTERM with ``handle_signals``) cancels the tasks, waits for them to release their parts
and ends as an interrupted merge: every part keeps what it journaled.

Ray is an optional dependency (``pip install 'streammerge[ray]'``); without it ``--executor ray`` is refused,
naming the extra.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import fsio
from .errors import StreamMergeError
from .output import work_folder_for
from .parts import (
    PartError,
    finalize,
    lock_split_work,
    plan_parts,
    plugin_problem,
    read_record,
    shard_groups,
    with_engine_device,
)
from .planner import Plan
from .progress import Progress
from .recipe import Recipe
from .stopping import MergeInterrupted, StopFlag
from .workfolder import finished_output

#: how to install Ray for streammerge
RAY_EXTRA = "pip install 'streammerge[ray]'"
#: how many times Ray reruns a task whose worker died (each rerun resumes from the part's journal)
MAX_RETRIES = 3
#: seconds between progress reports from a task
REPORT_EVERY = 0.5
#: seconds a stopped merge waits for its cancelled tasks to end (each keeps what it journaled) before it kills them
#: (within Slurm's default 30 s between SIGTERM and SIGKILL)
STOP_WAIT = 10.0


def import_ray() -> Any:
    """The ``ray`` module; raises :class:`StreamMergeError` naming the extra when it is not installed."""
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise StreamMergeError(f"--executor ray needs Ray, which is not installed here: {RAY_EXTRA} (or pip "
                               "install ray), on the machine that runs streammerge and on every Ray worker") from None
    return ray


class PluginMissingError(StreamMergeError):
    """A Ray node lacks the method plugin (or its version) the merge was planned with."""


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

    def moved(self, nbytes: int) -> None:
        super().moved(nbytes)
        with self._lock:  # (the compute workers report from their threads)
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


def _let_cancel_in() -> None:
    """Let Ray's cancel reach this task: it raises ``KeyboardInterrupt`` through SIGINT's Python handler, which a
    worker started with SIGINT ignored (under a background job or ``nohup``, as its raylet was) does not have."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_part(recipe: Recipe, k: int, n: int, board: Any = None, plugin: str | None = None) -> dict[str, Any]:
    """Run part ``k`` of ``n`` of ``recipe`` here (a Ray task's body; also callable directly). ``plugin``: the
    ``"<distribution> <version>"`` of the method plugin the merge was planned with (None for a built-in method),
    which must be the one installed here. Returns a dict with ``part``, ``host``, ``summary`` (None if it was done
    before) and ``notes``, or ``error`` (the message) and ``kind`` (the error's type): errors come back as data, the
    same on every Ray version."""
    from .api import plan_recipe  # noqa: PLC0415
    from .execute import execute  # noqa: PLC0415

    notes: list[str] = []
    summaries: list[Any] = []
    label, host = f"{k}/{n}", socket.gethostname()
    _let_cancel_in()
    try:
        problem = plugin_problem(recipe.method, plugin, f"on the Ray node {host}")
        if problem:
            raise PluginMissingError(f"{problem} (every Ray node needs it), then run the same command again")
        ram, threads = _worker_share(n, recipe.device)
        if recipe.max_ram is None:
            recipe = replace(recipe, max_ram=ram)
        if recipe.threads is None:  # this part's share of the node's CPUs (the bytes never depend on it)
            recipe = replace(recipe, threads=threads)
        plan = plan_recipe(recipe)
        unit = plan.units(n)[k - 1]
        execute(plan, show_progress=False, notify=notes.append, report=summaries.append, unit=unit,
                make_progress=lambda total, show: _ReportingProgress(total, board, k))
    except (StreamMergeError, KeyboardInterrupt) as exc:  # MergeInterrupted is a KeyboardInterrupt
        return {"part": label, "host": host, "error": str(exc), "kind": type(exc).__name__, "notes": notes}
    return {"part": label, "host": host, "pid": os.getpid(),
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


#: seconds a cluster's address has to answer a TCP connection before ``ray.init`` is tried (which, given an address
#: where nothing listens, retries for many minutes)
CONNECT_TIMEOUT = 5.0
#: what a machine needs to join a cluster that uses Ray's token authentication
AUTH_HINT = ("the cluster uses Ray's token authentication: set RAY_AUTH_MODE=token here and give this machine the "
             "cluster's token (`ray get-auth-token` on the head prints it) in RAY_AUTH_TOKEN, in ~/.ray/auth_token "
             "or in the file RAY_AUTH_TOKEN_PATH names; every node that joins with `ray start --address` needs the "
             "same (docs/distributed.md, \"Ray: connecting\")")


@dataclass(frozen=True)
class Target:
    """The cluster ``ray.init`` will use: ``address`` (host:port, ``ray://...``; None for a new local cluster) and
    where it comes from, in words."""

    address: str | None
    source: str

    def describe(self) -> str:
        if self.address is None:
            return f"a new local Ray cluster on this machine, for this merge only ({self.source})"
        return f"the Ray cluster at {self.address} ({self.source})"


def resolve_target(address: str | None) -> Target:
    """Which cluster ``ray.init(address)`` joins, as Ray decides it: ``address`` (``"local"``: a new local cluster),
    else ``RAY_ADDRESS``, else the cluster the last ``ray start`` on this machine started (Ray's record of it, which
    ``ray stop`` removes), else a new local cluster. ``"auto"`` insists on a running cluster."""
    if address not in (None, "", "auto"):
        return Target(None if address == "local" else address, "--ray-address")
    env = os.environ.get("RAY_ADDRESS") or None
    if env not in (None, "auto"):
        return Target(None if env == "local" else env, "RAY_ADDRESS")
    auto = "auto" if "auto" in (address, env) else None
    try:
        from ray._private.services import get_ray_address_from_environment  # noqa: PLC0415
        from ray._private.utils import get_ray_address_file  # noqa: PLC0415
    except ImportError:  # another Ray layout: Ray decides, unchecked
        return Target(auto, "found by Ray")
    try:
        found = get_ray_address_from_environment(auto, None)
    except ConnectionError:
        raise StreamMergeError("Ray address 'auto' (--ray-address or RAY_ADDRESS): no running Ray cluster was found on "
                               "this machine; give the head's address (--ray-address HEAD:6379), or 'local' for a new "
                               "local cluster") from None
    if found is None:
        return Target(None, "no --ray-address or RAY_ADDRESS, and no cluster started with `ray start` on this machine")
    return Target(found, f"started by `ray start` on this machine, as recorded in {get_ray_address_file(None)}; "
                         "--ray-address local starts a new one instead")


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address (``host:port``, ``[v6]:port``, ``ray://host:port``; a missing port is Ray's
    default: 6379, or 10001 for ``ray://``), or None if it is not one."""
    scheme, _, rest = address.rpartition("://")
    default = 10001 if scheme == "ray" else 6379
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.removeprefix(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or (port and not port.isdigit()):
        return None
    return host, int(port) if port else default


def _as_ray_dials(address: str) -> str:
    """``address`` as ``ray.init`` dials it (a loopback host becomes this node's address, as Ray resolves it)."""
    if "://" in address:
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address  # noqa: PLC0415

        return canonicalize_bootstrap_address(address, None) or address
    except (ImportError, ValueError, OSError):  # another Ray layout, or an address Ray will refuse itself
        return address


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why nothing accepts a TCP connection at ``address`` within ``timeout`` seconds, or None if something does
    (or the address is not a host and port this can check)."""
    where = _host_port(address)
    if where is None:
        return None
    try:
        socket.create_connection(where, timeout=timeout).close()
    except socket.gaierror as exc:
        return f"the host name {where[0]} does not resolve ({exc.strerror or exc})"
    except TimeoutError:
        return f"nothing answered on {where[0]} port {where[1]} within {timeout:g} s"
    except OSError as exc:
        return f"{where[0]} port {where[1]}: {exc.strerror or exc}"
    return None


def _connect(ray: Any, address: str | None, notify: Callable[[str], None] | None = None) -> bool:
    """Connect to the cluster :func:`resolve_target` names, after checking in seconds that its address answers;
    True if this call started the connection (and so ends it). An already initialised Ray (a caller's) is used as
    it is. Raises :class:`StreamMergeError` saying what to do (the address, the token)."""
    if ray.is_initialized():
        return False
    target = resolve_target(address)
    if target.address is not None and _host_port(target.address) is None:
        raise StreamMergeError(f"{target.address!r} ({target.source}) is not a Ray address: write HOST:PORT (as "
                               "`ray start --head` prints it), ray://HOST:PORT, or local. Nothing was merged")
    if target.address is not None:
        problem = unreachable(_as_ray_dials(target.address))
        if problem:
            raise StreamMergeError(
                f"cannot reach {target.describe()}: {problem}. Check the address (`ray start --head` prints it; port "
                "6379 unless --port was given, 10001 for ray://), that the head runs (`ray status` there) and that "
                "this machine may connect to that port (a firewall?); `ray stop` removes the record of a cluster "
                "`ray start` started here. Nothing was merged")
    if notify is not None:
        notify(f"using {target.describe()}")
    auth_error = getattr(getattr(ray, "exceptions", None), "AuthenticationError", ())
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except auth_error as exc:  # (ray.exceptions.AuthenticationError: a token is asked for and there is none here)
        raise StreamMergeError(f"cannot join {target.describe()}: {getattr(exc, 'message', exc)}; {AUTH_HINT}") \
            from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        hint = ("its address answers, so if Ray's log lines above say \"Unauthenticated\", " + AUTH_HINT +
                "; otherwise check that this machine runs the cluster's Ray and Python versions (`ray --version`)"
                if target.address is not None else "")
        raise StreamMergeError(f"cannot connect to {target.describe()}: {exc}" + (f"; {hint}" if hint else "")) \
            from None
    return True


def merge_on_ray(recipe: Recipe, parts: int | None = None, address: str | None = None, resize_shards: bool = False,
                 show_progress: bool = False, notify: Callable[[str], None] | None = None,
                 max_retries: int = MAX_RETRIES, handle_signals: bool = False) -> RayResult:
    """Merge ``recipe`` on a Ray cluster in ``parts`` parts (default: one per node, or per GPU for a CUDA merge, at
    most one per group of output shards) and publish it; returns what each part did.

    ``address``: the cluster (see :func:`resolve_target`: default ``RAY_ADDRESS``, else the cluster ``ray start``
    started on this machine, else a new local one; ``"local"`` always a new one). ``handle_signals``: SIGINT and
    SIGTERM stop the merge as Ctrl-C does (the CLI's; exit codes 130/143).

    Raises :class:`StreamMergeError` (Ray missing, an unreachable cluster, storage some worker does not see, too
    few shard files for ``parts`` without ``resize_shards``, a part that failed: its message, with the other
    parts' work kept for a rerun), :class:`MergeInterrupted` on Ctrl-C or a stop signal (the tasks are cancelled
    and every part's journaled work is kept)."""
    ray = import_ray()
    fsio.check_platform()
    if recipe.out is None:
        raise StreamMergeError("a merge needs an output folder (--out)")
    if not recipe.journal:
        raise PartError("--executor ray needs the journal (finalize checks every part's): drop --no-journal")
    planned = _check_before_connecting(recipe, parts, resize_shards, notify)
    try:
        started = _connect(ray, address, notify)
    except SystemExit as exc:  # Ray's driver SIGTERM handler (sys.exit) while it connects
        if exc.code != signal.SIGTERM:
            raise
        raise MergeInterrupted("merge interrupted (stopped by SIGTERM) while connecting to Ray: nothing was merged; "
                               "run the same command again", 128 + signal.SIGTERM) from None
    try:
        with StopFlag(handle_signals) as stop:  # after ray.init, which installs Ray's own SIGTERM handler
            return _merge(ray, recipe, planned, resize_shards, show_progress, notify, max_retries, stop)
    finally:
        if started:
            ray.shutdown()


def _check_before_connecting(recipe: Recipe, parts: int | None, resize_shards: bool,
                             notify: Callable[[str], None] | None) -> tuple[int, Plan] | None:
    """What can be refused without a cluster, before one is started or joined: a work folder split into another
    number of parts (continued with its own number when ``parts`` is not given), and too many parts for the output's
    shard files. Returns the number of parts to run and their plan (on the CPU), or None when the number is one per
    node, decided once connected."""
    assert recipe.out is not None
    record = read_record(work_folder_for(recipe.out))
    split = record.get("parts") if isinstance(record, dict) else None
    if isinstance(split, int) and not recipe.restart:
        if parts is None:
            parts = split
            if notify is not None:
                notify(f"{work_folder_for(recipe.out)} holds this merge split into {split} parts: continuing them")
        elif parts != split:
            raise PartError(f"{work_folder_for(recipe.out)} holds this merge split into {split} parts: continue it "
                            f"with --parts {split}, or add --restart to discard that work and split it into {parts}")
    if parts is None:
        return None
    return parts, plan_parts(replace(recipe, device="cpu"), parts, resize_shards)  # PartError: too many parts


def _merge(ray: Any, recipe: Recipe, planned: tuple[int, Plan] | None, resize_shards: bool, show_progress: bool,
           notify: Callable[[str], None] | None, max_retries: int, stop: StopFlag) -> RayResult:
    """:func:`merge_on_ray` once connected: plan, check the storage, run the parts, finalize."""
    assert recipe.out is not None
    device = _device_kind(ray, recipe.device)
    nodes = _nodes(ray, device)
    if not nodes:
        raise StreamMergeError(f"the Ray cluster has no alive node with a {'GPU' if device == 'cuda' else 'CPU'}")
    # planned here on the CPU (the driver computes nothing); the workers plan again with their own budgets
    if planned is None:  # one part per node (or GPU), at most one per group of shards
        on_cpu = replace(recipe, device="cpu")
        slots = sum(int(x["Resources"].get("GPU", 0)) for x in nodes) if device == "cuda" else len(nodes)
        parts = max(1, min(slots, len(shard_groups(plan_parts(on_cpu, 1)))))
        planned = parts, plan_parts(on_cpu, parts, resize_shards)
    parts, cpu_plan = planned
    plan = with_engine_device(cpu_plan, device)
    if finished_output(plan):
        fsio.remove_tree(work_folder_for(recipe.out))
        return RayResult(recipe.out, [], True)
    for note in plan.notes:
        if notify is not None:
            notify(note)
    check_storage(ray, nodes, plan)
    work = work_folder_for(recipe.out)
    try:
        stop.check()
    except MergeInterrupted as exc:
        raise _interrupted(plan, exc) from None
    if recipe.restart and work.is_dir():  # here, once: a retried task must not discard its own work again
        lock = lock_split_work(work, recipe.out, "run the command again")
        try:
            fsio.remove_tree(work)
        finally:
            lock.close()
    # what the workers plan: absolute paths (their working folders differ), Hub IDs resolved, the shard size
    # chosen, the kind of device decided
    planned = plan.recipe
    worker_recipe = replace(Recipe.from_json(planned.to_json()), device=device, chunk_rows=planned.chunk_rows,
                            journal=planned.journal, redo_changed=planned.redo_changed, restart=False)
    results = _run_parts(ray, worker_recipe, plan, parts, show_progress, max_retries, stop)
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


def _interrupted(plan: Plan, exc: KeyboardInterrupt) -> MergeInterrupted:
    """The stop the user sees: why, that every part's work is kept, and how to continue."""
    out = plan.recipe.out
    code = exc.exit_code if isinstance(exc, MergeInterrupted) else 128 + signal.SIGINT
    why = f" ({exc})" if isinstance(exc, MergeInterrupted) else ""
    return MergeInterrupted(
        f"merge interrupted{why}; every part's finished work is kept in {work_folder_for(out)}: run the same command "
        "again to continue (each part resumes from its journal), or run the parts left with `streammerge resume "
        f"{out} --part K/N` and then `streammerge finalize {out}`", code)


def _stop_tasks(ray: Any, pending: list[Any]) -> None:
    """Cancel the tasks still running (each stops at its next block, its work journaled) and wait, at most
    :data:`STOP_WAIT` seconds, until they have released their parts (so that running the command again at once
    finds them free); a task still running then is killed (its journal keeps what it committed). A second Ctrl-C
    stops the wait."""
    for ref in pending:
        ray.cancel(ref)
    try:
        _, left = ray.wait(pending, num_returns=len(pending), timeout=STOP_WAIT)
        for ref in left:
            ray.cancel(ref, force=True)
        if left:
            ray.wait(left, num_returns=len(left), timeout=STOP_WAIT)
    except KeyboardInterrupt:
        pass


def _run_parts(ray: Any, recipe: Recipe, plan: Plan, n: int, show_progress: bool, max_retries: int,
               stop: StopFlag) -> list[dict[str, Any]]:
    """Run the ``n`` parts as Ray tasks, one bar over their summed progress; every task's result, in part order
    (a task that failed beyond its retries gives an ``error``)."""
    from tqdm import tqdm  # noqa: PLC0415

    board = ray.remote(num_cpus=0)(_Board).remote()
    task = ray.remote(run_part).options(num_cpus=1, num_gpus=1 if recipe.device == "cuda" else 0,
                                        max_retries=max_retries, retry_exceptions=False)
    plugin = plan.fingerprint_doc["engine"].get("method_plugin")
    refs = [task.remote(recipe, k, n, board, plugin) for k in range(1, n + 1)]
    index = {ref: k for k, ref in enumerate(refs, 1)}
    results: dict[int, dict[str, Any]] = {}
    estimate = {u.index: sum(plan.tensor(t).planned_read_bytes for t in u.tensors) for u in plan.units(n)}
    bar = tqdm(total=sum(estimate.values()), unit="B", unit_scale=True, unit_divisor=1024, leave=False,
               desc=f"merging on Ray ({n} part{'s' if n > 1 else ''})",
               disable=not show_progress or not sys.stderr.isatty())
    pending = list(refs)
    try:
        while pending:
            stop.check()
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
    except KeyboardInterrupt as exc:  # Ctrl-C, or a stop signal (MergeInterrupted)
        _stop_tasks(ray, pending)
        raise _interrupted(plan, exc) from None
    finally:
        bar.close()
    return [results[k] for k in sorted(results)]


__all__ = ["RAY_EXTRA", "PluginMissingError", "RayResult", "Target", "check_storage", "import_ray", "merge_on_ray",
           "probe_storage", "resolve_target", "run_part", "unreachable"]
