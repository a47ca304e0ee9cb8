"""The Ray executor (``merge --executor ray``) on a local loopback cluster: byte-identical to one process.

Each test starts its own Ray cluster bound to 127.0.0.1 (three CPU slots, a temporary folder of its own), tears it
down at its end and checks that no Ray process is left behind.

* widen, ties and task_arithmetic in 1, 2 and 3 Ray tasks: the output folder equals a single-process merge.
* A worker SIGKILLed mid-part: Ray retries the task, which resumes from the part's journal; same bytes.
* The CLI connects to a running cluster with ``--ray-address``.
* Storage a worker does not see is refused before any part runs (the probe, checked with a stand-in for Ray).
* Without Ray installed, ``--executor ray`` is an error naming the extra (this one runs without Ray too).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import distributed_helpers
import psutil
import pytest
from distributed_helpers import (
    METHODS,
    SHARD,
    assert_same_output,
    cli,
    family_args,
    merge_argv,
    partial,
)

from streammerge import api, execute, faults
from streammerge.errors import StreamMergeError

fam, refs = distributed_helpers.fam, distributed_helpers.refs  # the shared fixtures

NEEDS_RAY = "Ray is an optional extra (pip install 'streammerge[ray]'); the Ray executor tests need it"


def ray_processes(temp: Path, since: float) -> list[str]:
    """Processes of the cluster that used ``temp`` (its daemons name it; its workers are called ``ray::...``),
    started after ``since``."""
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["create_time"] < since - 1:
                continue
            if str(temp) in cmd or cmd.startswith("ray::") or p.info["name"] in ("raylet", "gcs_server"):
                found.append(f"{p.info['pid']} {cmd[:100]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@contextmanager
def local_cluster(**env: str) -> Iterator[Any]:
    """A Ray cluster on 127.0.0.1 with three CPU slots in a temporary folder (short: Ray's socket paths are
    length-limited), ``env`` set in every worker; shut down at the end, and no Ray process may be left."""
    ray = pytest.importorskip("ray", reason=NEEDS_RAY)
    temp = Path(tempfile.mkdtemp(prefix="smray", dir="/tmp"))
    since = time.time()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=3, num_gpus=0, _temp_dir=str(temp),
             include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env} if env else None)
    try:
        yield ray
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 60
        while ray_processes(temp, since) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = ray_processes(temp, since)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes left behind: {left}"


@pytest.mark.parametrize("method", list(METHODS))
def test_ray_parts_equal_one_process(method, fam, refs, tmp_path):
    base, models = family_args(fam)
    with local_cluster():
        for n in (1, 2, 3):
            out = tmp_path / f"out{n}"
            assert api.merge(base, models, out, method=method, params=METHODS[method], shard_size=SHARD,
                             executor="ray", parts=n) == out
            assert_same_output(out, refs[method])


def _kill_point(fam: dict[str, Path], tmp_path: Path, n: int) -> int:
    """A checkpoint number every one of the ``n`` parts reaches mid-part, after at least two of its tensors are done
    (so the first is durably journaled): measured on an in-process run of each part."""
    events: list[str] = []
    real = execute.run_tensor

    def marked(plan, job, io):  # type: ignore[no-untyped-def]
        if job.schedule.steps:
            events.append("TENSOR")
        return real(plan, job, io)

    base, models = family_args(fam)
    previous = faults.set_hook(events.append)
    execute.run_tensor = marked
    points, totals = [], []
    try:
        for k in range(1, n + 1):
            events.clear()
            api.merge(base, models, tmp_path / "measure", method="ties", params=METHODS["ties"], shard_size=SHARD,
                      chunk_rows=2, part=f"{k}/{n}")
            count = tensors = 0
            first = None
            for e in events:
                if e == "TENSOR":
                    tensors += 1
                    continue
                count += 1
                if tensors >= 3 and first is None:
                    first = count
            assert first is not None, f"part {k}/{n} has fewer than 3 tensors"
            points.append(first)
            totals.append(count)
    finally:
        execute.run_tensor = real
        faults.set_hook(previous)
    at = max(points)
    assert at < min(totals) - 2, (points, totals)
    return at


def test_a_killed_worker_is_retried_and_resumes_from_its_journal(fam, refs, tmp_path):
    from streammerge.ray_executor import merge_on_ray
    from streammerge.recipe import Recipe

    pytest.importorskip("ray", reason=NEEDS_RAY)
    at = _kill_point(fam, tmp_path, 3)
    marker = tmp_path / "killed"
    base, models = family_args(fam)
    recipe = Recipe(base=base, models=tuple(models), out=tmp_path / "out", method="ties", params=METHODS["ties"],
                    shard_size=SHARD, chunk_rows=2)
    with local_cluster(STREAMMERGE_KILL_AT=str(at), STREAMMERGE_KILL_ONCE=str(marker)):
        result = merge_on_ray(recipe, parts=3)
    assert marker.exists(), "no worker was killed"
    resumed = [r for r in result.parts if r["summary"]["tensors_resumed"] > 0]
    assert len(resumed) == 1, result.parts  # the killed part, retried, kept its journaled tensors
    assert_same_output(tmp_path / "out", refs["ties"])


def test_the_cli_runs_on_a_cluster_given_by_address(fam, refs, tmp_path):
    with local_cluster() as ray:
        address = ray.get_runtime_context().gcs_address
        r = cli(*merge_argv(fam, tmp_path / "out", "task_arithmetic", "--executor", "ray", "--ray-address", address,
                            "--parts", "2", "--json"))
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["executor"] == "ray" and [p["part"] for p in got["parts"]] == ["1/2", "2/2"]
        assert_same_output(tmp_path / "out", refs["task_arithmetic"])
        r = cli(*merge_argv(fam, tmp_path / "out", "task_arithmetic", "--executor", "ray", "--ray-address", address))
        assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
        r = cli(*merge_argv(fam, tmp_path / "out2", "task_arithmetic", "--executor", "ray", "--ray-address", address,
                            "--parts", "9"))
        assert r.returncode == 1 and "9 parts need at least 9 output shard files" in r.stderr, r.stderr
        assert not partial(tmp_path / "out2").exists()


class _FakeTask:
    """A stand-in for a Ray remote function: runs ``probe_storage`` here, as a node that sees ``view``."""

    def __init__(self, fn: Any, view: dict[str, Any]) -> None:
        self.fn, self.view = fn, view

    def options(self, **kw: Any) -> _FakeTask:
        return self

    def remote(self, probe: str, token: str, folders: dict[str, dict[str, int]], node: str) -> Any:
        return self.fn(self.view.get(node, {}).get("probe", probe), token,
                       {self.view.get(node, {}).get("folders", {}).get(k, k): v for k, v in folders.items()}, node)


class _FakeRay:
    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view

    def remote(self, fn: Any) -> _FakeTask:
        return _FakeTask(fn, self.view)

    def get(self, value: Any, timeout: float | None = None) -> Any:
        return value


def test_storage_a_worker_does_not_see_is_refused_before_any_part(fam, tmp_path):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    from streammerge.ray_executor import check_storage

    base, models = family_args(fam)
    plan = api.plan(base, models, tmp_path / "out", method="widen", shard_size=SHARD)
    nodes = [{"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"},
             {"NodeID": "c" * 56, "NodeManagerAddress": "10.0.0.3"}]
    check_storage(_FakeRay({}), nodes, plan)  # every node sees the same files: fine, and the probes are removed
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    view = {"b" * 56: {"probe": str(elsewhere / "probe")},  # node b has another disk at that path
            "c" * 56: {"folders": {str(base.resolve()): str(tmp_path / "nothing")}}}  # node c lacks the base
    with pytest.raises(StreamMergeError, match=r"storage every Ray worker sees .* node 10\.0\.0\.2 \(bbbbbbbb\): "
                                               r"cannot read .* node 10\.0\.0\.3 \(cccccccc\): cannot read the input"):
        check_storage(_FakeRay(view), nodes, plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_without_ray_the_executor_names_the_extra(fam, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    base, models = family_args(fam)
    with pytest.raises(StreamMergeError, match=r"needs Ray, which is not installed here: pip install "
                                               r"'streammerge\[ray\]'"):
        api.merge(base, models, tmp_path / "out", method="widen", executor="ray")
    assert not (tmp_path / "out").exists() and not partial(tmp_path / "out").exists()
