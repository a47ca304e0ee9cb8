"""The Ray executor's edges: connecting, stopping, plugins (needs Ray; skipped, saying so, without it).

* An address where nothing listens (``--ray-address`` or ``RAY_ADDRESS``) is refused within seconds, naming it and
  where it came from, instead of Ray's retries of many minutes; which cluster a merge joins (``--ray-address``,
  ``RAY_ADDRESS``, the record ``ray start`` leaves, a new local one) follows Ray's order, and ``local`` forces a new
  one; a cluster that asks for a token is refused saying how to give one.
* SIGTERM to the driver (started, as a background job is, with SIGINT ignored) cancels the tasks, says "merge
  interrupted ... run the same command again" and exits 143; every part stopped with its work journaled, and the
  same command continues them to a byte-identical output. The parts are slowed (a ``sitecustomize`` on the
  workers' ``PYTHONPATH`` sleeps at each journaled chunk) so that the signal finds them mid-part.
* A method plugin missing on the Ray workers is named with its distribution and version, and nothing is written.

Every cluster here is on this machine (loopback) and no Ray process may be left after a test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import distributed_helpers
import pytest
from click.testing import CliRunner
from distributed_helpers import assert_same_output, cli, cli_env, family_args, merge_argv, partial
from test_ray import local_cluster, ray_processes  # the loopback cluster of the Ray tests

from streammerge import api, ray_executor
from streammerge.cli import main
from streammerge.errors import StreamMergeError
from streammerge.parts import PartError, holder
from streammerge.recipe import Recipe

fam, refs, takefirst = distributed_helpers.fam, distributed_helpers.refs, distributed_helpers.takefirst  # fixtures

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'streammerge[ray]'); these tests "
                                        "need it")


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_ray_left(since: float, temp: Path = Path("/tmp/ray")) -> list[str]:
    """Ray processes (of the temporary folder ``temp``, or named as Ray's daemons and workers) started after
    ``since``, once they had a minute to go."""
    deadline = time.monotonic() + 60
    while ray_processes(temp, since) and time.monotonic() < deadline:
        time.sleep(0.5)
    return ray_processes(temp, since)


# ------------------------------------------------------------------------------------------------- connecting


def test_an_address_where_nothing_listens_is_refused_in_seconds(fam, tmp_path):
    port = closed_port()
    since = time.time()
    for how, env in (("--ray-address", cli_env()), ("RAY_ADDRESS", cli_env(RAY_ADDRESS=f"127.0.0.1:{port}"))):
        argv = merge_argv(fam, tmp_path / "out", "task_arithmetic", "--executor", "ray",
                          *(("--ray-address", f"127.0.0.1:{port}") if how == "--ray-address" else ()))
        start = time.monotonic()
        r = cli(*argv, env=env, timeout=120)  # Ray's own retries would take about 14 minutes
        took = time.monotonic() - start
        assert r.returncode == 1, r.stderr
        assert re.search(rf"cannot reach the Ray cluster at 127\.0\.0\.1:{port} \({how}\): \S+ port {port}: Connection "
                         "refused", r.stderr), r.stderr  # (dialled where Ray dials it: this node's address)
        assert "Nothing was merged" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert took < 60, f"refused after {took:.0f} s"
    assert not (tmp_path / "out").exists() and not partial(tmp_path / "out").exists()
    assert not no_ray_left(since)


def test_which_cluster_a_merge_joins(monkeypatch):
    import ray._private.services as services

    resolve = ray_executor.resolve_target
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    assert resolve("10.0.0.5:6379") == ray_executor.Target("10.0.0.5:6379", "--ray-address")
    assert resolve("local").address is None
    fresh = resolve(None)  # nothing given, no cluster of `ray start` here: a new local one
    assert fresh.address is None and "new local Ray cluster" in fresh.describe()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    assert resolve(None) == ray_executor.Target("10.0.0.6:6379", "RAY_ADDRESS")
    assert resolve("10.0.0.5:6379").address == "10.0.0.5:6379"  # the option wins
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve(None).address is None
    monkeypatch.delenv("RAY_ADDRESS")
    # the cluster the last `ray start` on this machine started (Ray's record of it), found as ray.init finds it; a
    # stale record (that cluster is gone) is refused at once, saying where the address came from
    port = closed_port()
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: f"127.0.0.1:{port}")
    target = resolve(None)
    assert target.address == f"127.0.0.1:{port}" and "`ray start` on this machine" in target.source
    with pytest.raises(StreamMergeError, match=rf"cannot reach the Ray cluster at 127\.0\.0\.1:{port} \(started by "
                                               r"`ray start` on this machine, as recorded in .*--ray-address local "
                                               r"starts a new one instead\).*`ray stop` removes the record"):
        ray_executor._connect(ray, None)
    assert not ray.is_initialized()
    help_text = " ".join(CliRunner().invoke(main, ["merge", "--help"]).output.split())
    assert ("Default, as Ray decides: RAY_ADDRESS, else the cluster the last `ray start` started on this machine, else "
            "a new local one") in help_text and "'local' starts a new cluster on this machine" in help_text


@pytest.mark.parametrize("address, where", [("ray://head:10001", ("head", 10001)), ("ray://head", ("head", 10001)),
                                            ("[::1]:6380", ("::1", 6380)), ("head", ("head", 6379)),
                                            ("head:6379", ("head", 6379)), ("head:port", None)])
def test_the_address_checked_is_the_one_ray_connects_to(address, where):
    assert ray_executor._host_port(address) == where


def test_a_silent_address_is_refused_after_the_timeout(monkeypatch):
    def silent(where, timeout):  # type: ignore[no-untyped-def]
        raise TimeoutError

    monkeypatch.setattr(socket, "create_connection", silent)
    assert ray_executor.unreachable("10.9.9.9:6379") == "nothing answered on 10.9.9.9 port 6379 within 5 s"


class _TokenCluster:
    """A stand-in for the ``ray`` module whose ``init`` fails as Ray does against a cluster that asks for a token."""

    exceptions = ray.exceptions

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def is_initialized(self) -> bool:
        return False

    def init(self, **kw: object) -> None:
        raise self.error


@pytest.mark.parametrize("error", [
    ray.exceptions.AuthenticationError("Token authentication is enabled but no authentication token was found"),
    ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379"),  # (mode not token, or a wrong token)
], ids=["no-token-here", "refused"])
def test_a_cluster_asking_for_a_token_is_refused_saying_how_to_give_it(error, monkeypatch):
    monkeypatch.setattr(ray_executor, "_as_ray_dials", lambda address: address)  # (Ray would dial the node's IP)
    with socket.socket() as listening:  # the address answers: the refusal is Ray's
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        with pytest.raises(StreamMergeError) as refused:
            ray_executor._connect(_TokenCluster(error), address)
    said = str(refused.value)
    assert f"the Ray cluster at {address} (--ray-address)" in said, said
    assert "set RAY_AUTH_MODE=token here" in said and "`ray get-auth-token` on the head prints it" in said, said
    assert "RAY_AUTH_TOKEN" in said and "docs/distributed.md" in said, said
    if isinstance(error, ConnectionError):
        assert "if Ray's log lines above say \"Unauthenticated\"" in said, said


# ------------------------------------------------------------------------------------------------- stopping

SLOW_CHUNKS = '''\
"""Test-only: every journaled chunk of a merge sleeps SM_TEST_CHUNK_DELAY seconds (Ray's workers inherit it)."""
import os

if os.environ.get("SM_TEST_CHUNK_DELAY"):
    import time

    from streammerge import faults

    _delay = float(os.environ["SM_TEST_CHUNK_DELAY"])
    faults.set_hook(lambda event: time.sleep(_delay) if event == "chunk-written" else None)
'''


def _journal_lines(out: Path) -> list[int]:
    return [len(j.read_text().splitlines()) for j in sorted(partial(out).glob("parts/*/journal.jsonl"))]


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short temporary folder for the clusters the CLI starts (RAY_TMPDIR; Ray's socket paths are length-limited),
    removed at the end."""
    temp = Path(tempfile.mkdtemp(prefix="smray", dir="/tmp"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def test_sigterm_to_the_driver_stops_every_part_cleanly_and_the_same_command_continues(fam, refs, tmp_path, ray_tmp):
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_CHUNKS)
    out = tmp_path / "out"
    argv = merge_argv(fam, out, "ties", "--chunk-rows", "2", "--executor", "ray", "--ray-address", "local",
                      "--parts", "2")
    since = time.time()
    path = os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))
    # started with SIGINT ignored, as `streammerge ... &` in a script or nohup starts it (its cluster inherits that)
    driver = subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "bash", sys.executable, "-m", "streammerge.cli",
                               *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cli_env(PYTHONPATH=path, SM_TEST_CHUNK_DELAY="0.05", RAY_TMPDIR=str(ray_tmp)))
    try:
        deadline = time.monotonic() + 300
        while not (len(_journal_lines(out)) == 2 and min(_journal_lines(out)) >= 5):  # both parts mid-way
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "the parts did not start"
            time.sleep(0.2)
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 143, stderr
    assert (f"merge interrupted (stopped by SIGTERM); every part's finished work is kept in {partial(out)}: run the "
            "same command again to continue") in stderr, stderr
    assert "Traceback" not in stderr, stderr
    for folder in sorted(partial(out).glob("parts/*")):
        assert holder(folder) is None  # every task stopped and released its part
    stopped = _journal_lines(out)
    time.sleep(1)
    assert _journal_lines(out) == stopped  # nothing writes any more
    with pytest.raises(PartError, match="unfinished"):
        api.finalize(out)  # stopped mid-way, kept
    assert not no_ray_left(since, ray_tmp)

    r = cli(*argv, "--json", env=cli_env(RAY_TMPDIR=str(ray_tmp)), timeout=600)  # the same command, at full speed
    assert r.returncode == 0, r.stderr
    parts = json.loads(r.stdout)["parts"]
    base, models = family_args(fam)
    planned = api.plan(base, models, None, method="ties", params={"density": 0.5}, shard_size="60KB", chunk_rows=2)
    assert sum(p["summary"]["bytes_read"] for p in parts) < planned.bytes_read  # the journaled work was kept
    assert_same_output(out, refs["ties"])
    assert not no_ray_left(since, ray_tmp)


# -------------------------------------------------------------------------------------------------- plugins


def test_a_plugin_missing_on_the_ray_workers_is_named(takefirst, fam, tmp_path):
    takefirst.install("0.3.1")  # here (the driver), not on the workers' path
    base, models = family_args(fam)
    recipe = Recipe(base=base, models=tuple(models), out=tmp_path / "out", method="takefirst", shard_size="60KB")
    with local_cluster():
        with pytest.raises(StreamMergeError) as failed:
            ray_executor.merge_on_ray(recipe, parts=2)
    said = str(failed.value)
    for k in ("1/2", "2/2"):
        assert f"part {k} failed on " in said, said
    assert ("the merge method 'takefirst' comes from the plugin sm-takefirst 0.3.1 (a distribution declaring it in "
            "the 'streammerge.methods' entry point group), as recorded when the merge was planned, and it is not "
            "installed on the Ray node ") in said, said
    assert "pip install 'sm-takefirst==0.3.1' on the Ray node " in said and "(every Ray node needs it)" in said, said
    assert not (tmp_path / "out").exists() and not partial(tmp_path / "out").exists()


def test_what_needs_no_cluster_is_refused_before_one_is_started(fam, tmp_path, monkeypatch):
    """A work folder split into another number of parts, and more parts than shard files: refused by name before
    Ray is connected to; with no --parts, the folder's own split is continued."""
    def connect(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a cluster was connected to")

    monkeypatch.setattr(ray_executor, "_connect", connect)
    out = tmp_path / "out"
    base, models = family_args(fam)
    api.merge(base, models, out, "task_arithmetic", shard_size="60KB", part="1/2")
    recipe = Recipe(base=base, models=tuple(models), out=out, method="task_arithmetic", shard_size="60KB")
    with pytest.raises(PartError, match=r"split into 2 parts: continue it with --parts 2, or add --restart"):
        ray_executor.merge_on_ray(recipe, parts=3)
    with pytest.raises(PartError, match="parts"):
        ray_executor.merge_on_ray(Recipe(base=base, models=tuple(models), out=tmp_path / "other",
                                         method="task_arithmetic", shard_size="60KB"), parts=40)
    notes: list[str] = []
    with pytest.raises(AssertionError, match="connected"):  # got as far as connecting, with the folder's 2 parts
        ray_executor.merge_on_ray(recipe, notify=notes.append)
    assert any("split into 2 parts: continuing them" in n for n in notes)


def test_an_address_that_is_no_address_is_refused_as_such(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # (whatever an earlier test left)
    with pytest.raises(StreamMergeError, match=r"'127.0.0.1:abc' \(.*\) is not a Ray address: write HOST:PORT"):
        ray_executor._connect(ray, "127.0.0.1:abc")
