"""Crash safety and resume: SIGKILL at every kind of checkpoint, SIGINT/SIGTERM, changed inputs, full disks,
damaged journals and shards, and ``streammerge verify``.

* Kill loops (one test per method: WIDEN with 2 passes, task arithmetic with 1, TIES with 3, statistics state and
  an emit cursor): a logged uninterrupted run gives the checkpoint sequence; kill points are picked from it so
  every event kind is hit (first/middle/last where there are several), each killed run is continued with another
  chunking or budget, by ``resume OUT`` or by rerunning the merge, some of them killed a second time, and the
  result must equal the uninterrupted reference byte for byte, pass ``verify`` and leave no work folder. A killed
  run never leaves an OUT behind unless it got as far as ``published``.
* SIGINT / SIGTERM: exit 130 / 143 with how to resume; ``resume OUT`` then finishes the same bytes.
* Resuming with changed inputs or options is refused (naming the change and ``--restart``) without losing work.
* ENOSPC mid-write and the upfront free-space check: DiskFullError, work kept, a rerun finishes the same bytes.
* ``verify`` on intact, flipped, truncated and manifest-less folders; ``resume`` on finished or unknown outputs.
* A torn last journal line and a journaled chunk damaged on disk after the kill.

Merges run as separate processes (a SIGKILL must hit a real process). To keep ~60 of them fast, they are forked
from a "zygote" process that imported torch once; each child imports streammerge itself (so the failpoint
variables are read from its own environment, as at a real start) and runs the ``streammerge`` CLI with its own
argv, environment, stdout and stderr. The SIGINT/SIGTERM tests and one kill use plain ``python -m streammerge.cli``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from helpers import arm_chunk_interrupt, assert_same_output, output_problems, partial, safetensors_header

import streammerge.writer
from streammerge import api
from streammerge.errors import StreamMergeError
from streammerge.examples import write_family
from streammerge.execute import DiskFullError, MergeInterrupted
from streammerge.manifest import MANIFEST

PARTIAL = ".streammerge-partial"
SHARD = "model.safetensors"

#: per method: CLI arguments, and a --max-ram that is feasible but chunks differently from --chunk-rows 16
METHODS: dict[str, tuple[list[str], str]] = {
    "widen": (["--method", "widen"], "1MiB"),
    "task_arithmetic": (["--method", "task_arithmetic"], "256KiB"),
    "ties": (["--method", "ties", "--param", "density=0.5"], "5MiB"),
}
CHUNK_ROWS = 16  # the reference runs' chunking (about 100 chunks per merge)

# --------------------------------------------------------------------------------------------------- processes

_ZYGOTE = r"""
import json, os, sys, traceback
import click, numpy, safetensors.torch, torch, tqdm  # the slow imports, once; streammerge is imported per child

W = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

def child(req):
    code = 1
    try:
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], W), (2, req["stderr"], W)):
            os.dup2(os.open(path, flags, 0o644), fd)
        sys.argv = ["streammerge", *req["argv"]]
        from streammerge.cli import main
        main(args=req["argv"], prog_name="streammerge")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI process: no inherited failpoints, one torch thread (on 2 shared cores, spinning
    OpenMP threads of an oversubscribed machine make a 0.1 s merge take seconds; the bytes do not depend on it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMMERGE_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@dataclass
class Run:
    """A finished CLI process: exit code (negative: killed by that signal), output, checkpoints it reached."""

    argv: list[str]
    code: int
    stdout: str
    stderr: str
    events: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"streammerge {' '.join(self.argv)} -> {self.code}\n{self.stdout}{self.stderr[-3000:]}"


class Zygote:
    """Forks CLI processes from one process that already imported torch (a fork costs ~0.1 s, a start ~2.5 s)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=clean_env(), bufsize=0)
        self._buf = b""

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError("a streammerge process did not finish in time")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the zygote process died")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def run(self, *argv: object, kill_at: int | None = None, log: bool = False, cwd: Path | None = None,
            timeout: float = 120) -> Run:
        """Run ``streammerge ARGV``; ``kill_at`` arms the SIGKILL failpoint, ``log`` records the checkpoints."""
        self.n += 1
        base = self.scratch / f"run{self.n}"
        extra = {}
        if kill_at is not None:
            extra["STREAMMERGE_KILL_AT"] = str(kill_at)
        if log:
            extra["STREAMMERGE_CHECKPOINT_LOG"] = f"{base}.events"
        args = [str(a) for a in argv]
        req = {"argv": args, "env": clean_env(**extra), "stdout": f"{base}.out", "stderr": f"{base}.err",
               "cwd": str(cwd or Path.cwd())}
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        pid = self._line(30)["pid"]
        try:
            code = self._line(timeout)["code"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._line(30)  # its exit status, so that the next run reads its own
            raise
        events = Path(f"{base}.events").read_text().split() if log and Path(f"{base}.events").exists() else []
        return Run(args, code, Path(f"{base}.out").read_text(), Path(f"{base}.err").read_text(), events)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tied Qwen2-shaped family (base, chat, multilingual; bf16), with absolute paths."""
    return {k: p.resolve() for k, p in write_family(tmp_path_factory.mktemp("family"), "tiny", dtype="bf16").items()}


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(tmp_path_factory.mktemp("runs"))
    yield z
    z.close()


@dataclass
class Reference:
    out: Path
    events: list[str]


@pytest.fixture(scope="module")
def refs(fam: dict[str, Path], cli: Zygote, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    """Uninterrupted, logged runs with --chunk-rows 16, one per method, made on first use."""
    root = tmp_path_factory.mktemp("refs")

    class Lazy(dict):
        def __missing__(self, method: str) -> Reference:
            out = root / method
            r = cli.run(*merge_args(fam, out, method), log=True)
            assert r.code == 0, str(r)
            self[method] = Reference(out, r.events)
            return self[method]

    return Lazy()


# ----------------------------------------------------------------------------------------------------- helpers


def merge_args(fam: dict[str, Path], out: Path, method: str = "widen", chunk_rows: int | None = CHUNK_ROWS,
               *extra: str, quiet: bool = True) -> list[object]:
    """A merge command; one compute worker (``--threads 1``) unless ``extra`` says otherwise, so its checkpoints
    come in one order and a kill lands at a known one (test_sigkill_with_workers covers several workers)."""
    return ["merge", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--out", out,
            *METHODS[method][0], *(["--chunk-rows", chunk_rows] if chunk_rows else []), *extra,
            *(["--threads", "1"] if "--threads" not in extra else []), *(["-q"] if quiet else [])]


def tensor_range(path: Path, name: str) -> tuple[int, int, int]:
    """(absolute begin, absolute end, bytes per row) of a tensor in a safetensors file."""
    start, h = safetensors_header(path)
    b, e = h[name]["data_offsets"]
    rows = h[name]["shape"][0] if h[name]["shape"] else 1
    return start + b, start + e, (e - b) // max(rows, 1)


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


def kill_points(events: list[str], kind: str, which: str | float) -> int:
    """The 1-based checkpoint number of the first/middle/last (or a fraction into the) events of ``kind``."""
    at = [i + 1 for i, e in enumerate(events) if e == kind]
    assert at, f"no {kind} event in {sorted(set(events))}"
    if isinstance(which, float):
        return at[min(len(at) - 1, int(which * len(at)))]
    return at[{"first": 0, "middle": len(at) // 2, "last": len(at) - 1}[which]]


# ------------------------------------------------------------------------------------ 1. SIGKILL and resume

#: how the killed run is continued
RESUMES = {
    "resume": lambda fam, out, m: ["resume", out, "-q"],  # chunking from the default budget
    "resume-ram": lambda fam, out, m: ["resume", out, "--max-ram", METHODS[m][1], "--threads", "3", "-q"],
    "rerun": lambda fam, out, m: merge_args(fam, out, m),  # the same command, same chunking
    "rerun-rows": lambda fam, out, m: merge_args(fam, out, m, 7),
    "rerun-ram": lambda fam, out, m: merge_args(fam, out, m, None, "--max-ram", METHODS[m][1]),
}

#: (event, which one, how to continue, kill the continuation too at its Nth checkpoint)
SCENARIOS: dict[str, list[tuple[str, str | float, str, int | None]]] = {
    "widen": [
        ("work-created", "first", "resume", None),
        ("shards-open", "first", "rerun", None),
        ("stats-chunk", "first", "rerun-rows", None),
        ("stats-chunk", "middle", "resume", 3),
        ("stats-chunk", "last", "rerun-ram", None),
        ("stats-saved", "first", "rerun", None),
        ("stats-saved", "middle", "resume-ram", 5),
        ("chunk-written", "first", "rerun-rows", None),
        ("chunk-written", "middle", "resume", None),
        ("chunk-written", 0.8, "rerun-rows", 4),
        ("chunk-written", "last", "rerun", 2),
        ("shards-finalized", "first", "resume", None),
        ("side-files-written", "first", "rerun-rows", None),
        ("published", "first", "-", None),
    ],
    "task_arithmetic": [
        ("work-created", "first", "rerun-ram", None),
        ("shards-open", "first", "resume", None),
        ("chunk-written", "first", "resume", 4),
        ("chunk-written", 0.25, "rerun-rows", None),
        ("chunk-written", "middle", "resume-ram", None),
        ("chunk-written", "last", "rerun", None),
        ("shards-finalized", "first", "rerun", 1),
        ("side-files-written", "first", "resume", None),
        ("published", "first", "-", None),  # complete as killed: nothing to continue
    ],
    "ties": [
        ("work-created", "first", "rerun-rows", None),
        ("shards-open", "first", "resume-ram", 2),
        ("stats-chunk", "first", "resume", None),
        ("stats-chunk", "middle", "rerun-rows", 10),
        ("stats-chunk", "last", "resume-ram", None),
        ("stats-saved", "first", "rerun", None),
        ("stats-saved", "last", "resume", None),
        ("chunk-written", "first", "rerun-rows", None),
        ("chunk-written", 0.1, "rerun-ram", None),
        ("chunk-written", 0.35, "resume", None),
        ("chunk-written", "middle", "rerun-ram", 3),
        ("chunk-written", 0.7, "rerun-rows", None),
        ("chunk-written", "last", "resume", None),
        ("shards-finalized", "first", "rerun", None),
        ("side-files-written", "first", "resume-ram", None),
        ("published", "first", "-", None),
    ],
}


def _kill_scenario(cli: Zygote, fam: dict[str, Path], ref: Reference, method: str, out: Path,
                   event: str, which: str | float, how: str, second: int | None) -> tuple[list[str], bool]:
    """Kill a merge at one checkpoint and continue it; returns (problems, whether a second kill happened)."""
    at = kill_points(ref.events, event, which)
    published_at = ref.events.index("published") + 1
    r = cli.run(*merge_args(fam, out, method), kill_at=at, log=True)
    if r.code != -signal.SIGKILL or len(r.events) != at or r.events != ref.events[:at]:
        return [f"kill at {at} ({event}): expected SIGKILL there, got {r}, events {r.events[-3:]}"], False
    if at < published_at:
        if out.exists():
            return [f"killed at {event} before publishing, yet {out} exists: {sorted(os.listdir(out))}"], False
        if not (partial(out) / "plan.json").is_file():
            return [f"killed at {event}: no {partial(out)}/plan.json to resume from"], False
    else:  # killed after the rename: the output is complete; the rest is covered by test_kill_after_publish
        problems = [p for p in output_problems(out, ref.out) if PARTIAL not in p]
        shutil.rmtree(partial(out), ignore_errors=True)
        return problems, False
    doubled = False
    if second is not None:
        r = cli.run(*RESUMES[how](fam, out, method), kill_at=second, log=True)
        if r.code == -signal.SIGKILL:
            doubled = True
            if out.exists() and "published" not in r.events:
                return [f"second kill at {r.events[-1]} before publishing, yet {out} exists"], True
        elif r.code != 0 or len(r.events) >= second:
            return [f"continuation armed to die at checkpoint {second}: {r}"], False
        how = "resume"
    if not out.exists() or partial(out).exists():
        r = cli.run(*RESUMES[how](fam, out, method))
        if r.code != 0:
            return [f"continuing with {how}: {r}"], doubled
    r = cli.run("verify", out)
    if r.code != 0 or not r.stdout.startswith("OK"):
        return [f"verify: {r}"], doubled
    return output_problems(out, ref.out), doubled


@pytest.mark.parametrize("method", list(SCENARIOS))
def test_sigkill_anywhere_then_resume_gives_identical_bytes(method, cli, fam, refs, tmp_path):
    ref = refs[method]
    kinds = set(ref.events)
    covered = {event for event, *_ in SCENARIOS[method]}
    assert kinds == covered, f"events {sorted(kinds)} vs scenarios {sorted(covered)}"
    failures, doubles = [], 0
    for i, (event, which, how, second) in enumerate(SCENARIOS[method]):
        problems, doubled = _kill_scenario(cli, fam, ref, method, tmp_path / f"out{i}", event, which, how, second)
        doubles += doubled
        failures += [f"[{method} kill at {which} {event}, continued by {how}"
                     f"{f', killed again at {second}' if second else ''}] {p}" for p in problems]
    assert not failures, "\n".join(failures)
    assert doubles == sum(1 for *_, second in SCENARIOS[method] if second), "some second kills did not happen"


def test_killed_run_started_as_a_plain_process_resumes(fam, refs, cli, tmp_path):
    """The failpoint variables read at a normal interpreter start (no zygote): kill mid-merge, resume."""
    ref = refs["widen"]
    out = tmp_path / "out"
    at = kill_points(ref.events, "chunk-written", "middle")
    env = clean_env(STREAMMERGE_KILL_AT=str(at))
    p = subprocess.run([sys.executable, "-m", "streammerge.cli", *map(str, merge_args(fam, out))], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists() and (partial(out) / "journal.jsonl").is_file()
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, ref.out)


def test_kill_after_publish_then_resume_reports_complete_and_cleans_up(cli, fam, refs, tmp_path):
    ref = refs["task_arithmetic"]
    out = tmp_path / "out"
    r = cli.run(*merge_args(fam, out, "task_arithmetic"), kill_at=len(ref.events))
    assert r.code == -signal.SIGKILL and out.is_dir() and partial(out).is_dir()
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert not partial(out).exists()
    assert_same_output(out, ref.out)


def test_resume_of_a_merge_given_relative_paths_gives_identical_bytes(cli, fam, tmp_path):
    rel = {k: os.path.relpath(p, tmp_path) for k, p in fam.items()}
    r = cli.run(*merge_args(rel, Path("ref"), "task_arithmetic"), cwd=tmp_path, log=True)
    assert r.code == 0, str(r)
    at = kill_points(r.events, "chunk-written", "middle")
    r = cli.run(*merge_args(rel, Path("out"), "task_arithmetic"), cwd=tmp_path, kill_at=at)
    assert r.code == -signal.SIGKILL, str(r)
    r = cli.run("resume", "out", "-q", cwd=tmp_path)
    assert r.code == 0, str(r)
    assert_same_output(tmp_path / "out", tmp_path / "ref")


# --------------------------------------------------------------------------------------- 2. SIGINT / SIGTERM


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_stops_at_a_chunk_boundary_and_resume_finishes(signum, code, cli, fam, refs, tmp_path):
    out, log = tmp_path / "out", tmp_path / "events"
    env = clean_env(STREAMMERGE_CHECKPOINT_LOG=str(log))
    proc = subprocess.Popen([sys.executable, "-m", "streammerge.cli", *map(str, merge_args(fam, out, "widen", 1))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (log.read_text().count("chunk-written") if log.exists() else 0) < 5:
            assert proc.poll() is None, f"the merge ended before it could be interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "no chunk written within 60 s"
            time.sleep(0.02)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "resume" in stderr and str(out) in stderr, stderr
    assert not out.exists()
    journal = partial(out) / "journal.jsonl"
    assert journal.is_file() and '"r0"' in journal.read_text(), "the chunks written before the signal are journaled"
    events = log.read_text().split()
    assert "published" not in events and events.count("chunk-written") < 200
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, refs["widen"].out)


# ------------------------------------------------------------------------------------ 3. changed inputs/options


def _kill_mid_merge(cli: Zygote, fam: dict[str, Path], out: Path, refs: dict[str, Reference]) -> None:
    r = cli.run(*merge_args(fam, out), kill_at=kill_points(refs["widen"].events, "chunk-written", "middle"))
    assert r.code == -signal.SIGKILL, str(r)


def _work_snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(partial(out))): p.read_bytes() for p in sorted(partial(out).rglob("*")) if p.is_file()}


def test_changed_input_is_refused_until_restart(cli, fam, refs, tmp_path):
    fam2 = {k: tmp_path / "fam" / k for k in fam}
    shutil.copytree(fam["base"].parent, tmp_path / "fam")
    out = tmp_path / "out"
    _kill_mid_merge(cli, fam2, out, refs)
    before = _work_snapshot(out)
    # model 1 (chat): same header, one tensor's bytes rewritten (and so a new modification time)
    shard = fam2["chat"] / SHARD
    b, _, row = tensor_range(shard, "model.layers.0.mlp.up_proj.weight")
    with open(shard, "r+b") as f:
        f.seek(b)
        f.write(bytes(row * 4))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    for again in (merge_args(fam2, out), ["resume", out, "-q"]):
        r = cli.run(*again)
        assert r.code == 1, str(r)
        assert "model 1 file model.safetensors changed" in r.stderr and "--restart" in r.stderr, r.stderr
        assert _work_snapshot(out) == before, "the refusal must not touch the interrupted work"
        assert not out.exists()

    r = cli.run(*merge_args(fam2, out), "--restart")
    assert r.code == 0, str(r)
    fresh = tmp_path / "fresh"
    r = cli.run(*merge_args(fam2, fresh))
    assert r.code == 0, str(r)
    assert_same_output(out, fresh)
    assert (out / SHARD).read_bytes() != (refs["widen"].out / SHARD).read_bytes(), "the change must matter"


def _copied_family(fam: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    shutil.copytree(fam["base"].parent, tmp_path / "fam")
    return {k: tmp_path / "fam" / k for k in fam}


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _tensors_with_work(out: Path) -> tuple[list[str], int]:
    """(tensors with journaled chunks or statistics, how many of them are complete) of an interrupted run."""
    from streammerge.journal import Journal

    journal = Journal(partial(out), read_only=True)
    _, h = safetensors_header(partial(out) / "model" / SHARD)
    rows = {name: t["shape"][0] if t["shape"] else 1 for name, t in h.items() if name != "__metadata__"}
    work = [n for n, p in journal.progress.items() if p.chunks or p.state_file]
    return work, sum(1 for n in work if journal.get(n).chunks and journal.get(n).rows_done >= rows[n])


def _resumed_count(stderr: str) -> int:
    line = next(s for s in stderr.splitlines() if s.startswith("resuming the interrupted merge"))
    return int(line.split(": ")[1].split()[0])


@pytest.mark.parametrize("method", ["widen", "task_arithmetic", "ties"])
def test_touched_input_is_reverified_and_the_merge_continues(method, cli, fam, refs, tmp_path):
    """Only the base's modification time changed: the bytes the journaled work used are re-read, match their
    journaled checksums, and the merge continues without --redo-changed, keeping that work, to the same bytes."""
    ref = refs[method]
    fam2, out = _copied_family(fam, tmp_path), tmp_path / "out"
    r = cli.run(*merge_args(fam2, out, method), kill_at=kill_points(ref.events, "chunk-written", "middle"))
    assert r.code == -signal.SIGKILL, str(r)
    work, done = _tensors_with_work(out)
    assert done > 0
    _touch(fam2["base"] / SHARD)
    r = cli.run(*merge_args(fam2, out, method, quiet=False), log=True)
    assert r.code == 0, str(r)
    assert _resumed_count(r.stderr) == done, r.stderr
    assert f"base file model.safetensors was modified since the interrupted run (same size and header): re-read " \
           f"the bytes that the work of {len(work)} tensor(s) used from it; they match" in r.stderr, r.stderr
    assert r.events.count("chunk-written") < ref.events.count("chunk-written"), "the journaled work is kept"
    # the same tensors (the manifest's fingerprint names the new input)
    assert (out / SHARD).read_bytes() == (ref.out / SHARD).read_bytes()
    r = cli.run("verify", out)
    assert r.code == 0 and r.stdout.startswith("OK"), str(r)


def _rewrite_rows(shard: Path, name: str) -> None:
    """Overwrite the first rows of tensor ``name`` in place with other values: same size and header."""
    b, e, row = tensor_range(shard, name)
    with open(shard, "r+b") as f:
        f.seek(b)
        f.write(bytes(min(row * 4, e - b)))
    _touch(shard)


def test_same_size_content_change_is_caught_by_the_checksum(cli, fam, refs, tmp_path):
    """Same size, same header, other bytes and a new modification time. In a tensor not started yet: nothing to
    redo, the merge continues and reads the new bytes. In a tensor whose work was journaled: the checksum catches
    it, the merge is refused (naming the file, with advice that works) without touching the work, and with
    --redo-changed the bytes equal a fresh merge of the changed inputs."""
    fam2, first, second = _copied_family(fam, tmp_path), tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        _kill_mid_merge(cli, fam2, out, refs)
    work, _ = _tensors_with_work(second)
    _, h = safetensors_header(fam2["chat"] / SHARD)
    later = next(n for n in reversed(list(h)) if n not in work and n != "__metadata__" and h[n]["shape"])
    before = _work_snapshot(second)

    _rewrite_rows(fam2["chat"] / SHARD, later)
    r = cli.run(*merge_args(fam2, first))
    assert r.code == 0 and "model.safetensors was modified" in r.stderr, str(r)
    fresh = tmp_path / "fresh"
    assert cli.run(*merge_args(fam2, fresh)).code == 0
    assert (first / SHARD).read_bytes() == (fresh / SHARD).read_bytes()
    assert (first / SHARD).read_bytes() != (refs["widen"].out / SHARD).read_bytes(), "the change must matter"

    _rewrite_rows(fam2["chat"] / SHARD, work[0])
    for again in (merge_args(fam2, second), ["resume", second, "-q"]):
        r = cli.run(*again)
        assert r.code == 1, str(r)
        assert "model 1 file model.safetensors changed (same size and header, new modification time; the bytes that the " \
               "work of 1 tensor(s) used from it differ)" in r.stderr, r.stderr
        assert "original command" not in r.stderr and "--redo-changed" in r.stderr and "--restart" in r.stderr
        assert _work_snapshot(second) == before, "the refusal must not touch the interrupted work"
        assert not second.exists()
    r = cli.run("resume", second, "--redo-changed", "-q")
    assert r.code == 0, str(r)
    assert "redoing 1 tensor(s) with work done" in r.stderr, r.stderr
    shutil.rmtree(fresh)
    assert cli.run(*merge_args(fam2, fresh)).code == 0
    assert (second / SHARD).read_bytes() == (fresh / SHARD).read_bytes()
    assert (second / SHARD).read_bytes() != (first / SHARD).read_bytes(), "the second change must matter"


def test_a_journal_without_input_checksums_resumes(cli, fam, refs, tmp_path):
    """A journal from before input checksums: continued as it is; after a touch, the tensors with work done that
    read the touched file cannot be verified, so they count as changed (refused, then redone with --redo-changed)."""
    fam2 = _copied_family(fam, tmp_path)
    outs = [tmp_path / "out0", tmp_path / "out1"]
    for out in outs:
        _kill_mid_merge(cli, fam2, out, refs)
        journal = partial(out) / "journal.jsonl"
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(line for line in lines if not line.startswith('{"i"')))
        assert '"i"' not in journal.read_text()
    _, done = _tensors_with_work(outs[0])
    r = cli.run(*merge_args(fam2, outs[0], quiet=False))
    assert r.code == 0, str(r)
    assert _resumed_count(r.stderr) == done > 0 and "note:" not in r.stderr, r.stderr
    assert (outs[0] / SHARD).read_bytes() == (refs["widen"].out / SHARD).read_bytes()

    work, _ = _tensors_with_work(outs[1])
    _touch(fam2["base"] / SHARD)
    r = cli.run(*merge_args(fam2, outs[1]))
    assert r.code == 1, str(r)
    assert f"base file model.safetensors changed (same size and header, new modification time; {len(work)} " \
           "tensor(s) with work done have no checksum of the bytes they used from it)" in r.stderr, r.stderr
    r = cli.run(*merge_args(fam2, outs[1], "widen", CHUNK_ROWS, "--redo-changed"))
    assert r.code == 0, str(r)
    assert f"redoing {len(work)} tensor(s) with work done" in r.stderr, r.stderr
    assert (outs[1] / SHARD).read_bytes() == (refs["widen"].out / SHARD).read_bytes()


def test_changed_option_is_refused_and_the_work_is_kept(cli, fam, refs, tmp_path):
    out = tmp_path / "out"
    _kill_mid_merge(cli, fam, out, refs)
    before = _work_snapshot(out)
    r = cli.run(*merge_args(fam, out, "widen", CHUNK_ROWS, "--param", "t=0.5"))
    assert r.code == 1, str(r)
    assert "params" in r.stderr and "--restart" in r.stderr, r.stderr
    assert _work_snapshot(out) == before and not out.exists()
    r = cli.run(*merge_args(fam, out, quiet=False))  # the original command continues the kept work
    assert r.code == 0, str(r)
    line = next(s for s in r.stderr.splitlines() if s.startswith("resuming the interrupted merge"))
    assert int(line.split(": ")[1].split()[0]) > 0, line
    assert_same_output(out, refs["widen"].out)


# -------------------------------------------------------------------------------------------- 4. disk full


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process merges use one torch thread too (see clean_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _api_merge(fam: dict[str, Path], out: Path) -> Path:
    return api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, "widen", chunk_rows=CHUNK_ROWS)


@pytest.mark.parametrize("ok_writes", [0, 1, 45])
def test_enospc_mid_write_then_rerun(ok_writes, one_thread, monkeypatch, fam, refs, tmp_path):
    out = tmp_path / "out"
    real = streammerge.writer._pwrite_all
    calls = [0]

    def failing(fd: int, data: Any, offset: int) -> None:
        calls[0] += 1
        if calls[0] > ok_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(streammerge.writer, "_pwrite_all", failing)
    with pytest.raises(DiskFullError) as info:
        _api_merge(fam, out)
    assert isinstance(info.value, StreamMergeError)
    message = str(info.value)
    assert "disk full" in message and not out.exists()
    if ok_writes == 0:  # nothing was journaled: nothing is left behind, and no resume is promised
        assert not partial(out).exists() and "call again" not in message, message
    else:
        assert "merge(...) call again" in message, message  # Python errors speak Python
        assert (partial(out) / "plan.json").is_file()
    monkeypatch.setattr(streammerge.writer, "_pwrite_all", real)
    assert _api_merge(fam, out) == out
    assert_same_output(out, refs["widen"].out)


def test_second_ctrl_c_mid_write_is_resumable(one_thread, monkeypatch, fam, refs, tmp_path):
    """A second Ctrl-C raises KeyboardInterrupt wherever the merge is (here: inside a shard write)."""
    out = tmp_path / "out"
    real = streammerge.writer._pwrite_all
    calls = [0]

    def interrupted(fd: int, data: Any, offset: int) -> None:
        calls[0] += 1
        if calls[0] == 30:
            raise KeyboardInterrupt
        real(fd, data, offset)

    monkeypatch.setattr(streammerge.writer, "_pwrite_all", interrupted)
    with pytest.raises(MergeInterrupted) as info:
        _api_merge(fam, out)
    assert info.value.exit_code == 130 and "merge(...) call again" in str(info.value), str(info.value)
    assert not out.exists() and (partial(out) / "journal.jsonl").is_file()
    monkeypatch.setattr(streammerge.writer, "_pwrite_all", real)
    _api_merge(fam, out)
    assert_same_output(out, refs["widen"].out)


def test_not_enough_free_space_is_refused_before_any_shard(one_thread, monkeypatch, fam, refs, tmp_path):
    out = tmp_path / "out"
    tiny = shutil._ntuple_diskusage(10**6, 10**6 - 4096, 4096)  # type: ignore[attr-defined]
    monkeypatch.setattr("streammerge.workfolder.shutil.disk_usage", lambda path: tiny)
    with pytest.raises(DiskFullError, match="not enough disk space") as info:
        _api_merge(fam, out)
    assert str(out) in str(info.value) and "kept" not in str(info.value) and "resume" not in str(info.value)
    assert not out.exists() and not partial(out).exists(), "nothing done, so nothing is left"
    monkeypatch.undo()
    _api_merge(fam, out)
    assert_same_output(out, refs["widen"].out)


# ------------------------------------------------------------------------------------------------ 5. verify


@pytest.fixture
def finished(refs: dict[str, Reference], tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(refs["widen"].out, out)
    return out


def test_verify_intact_output(cli, finished):
    r = cli.run("verify", finished)
    assert r.code == 0 and r.stdout.startswith("OK"), str(r)


def test_verify_flipped_byte_names_the_tensor(cli, finished):
    name = "model.layers.1.mlp.down_proj.weight"
    b, e, _ = tensor_range(finished / SHARD, name)
    flip_byte(finished / SHARD, (b + e) // 2)
    r = cli.run("verify", finished)
    assert r.code == 1 and name in r.stderr and "checksum" in r.stderr, str(r)


def test_verify_truncated_shard(cli, finished):
    size = (finished / SHARD).stat().st_size
    os.truncate(finished / SHARD, size - 1000)
    r = cli.run("verify", finished)
    assert r.code == 1 and SHARD in r.stderr, str(r)


def test_verify_without_manifest(cli, fam):
    r = cli.run("verify", fam["base"])
    assert r.code == 1 and MANIFEST in r.stderr and "not a finished streammerge output" in r.stderr, str(r)


def test_resume_finished_or_unknown_output(cli, finished, tmp_path):
    r = cli.run("resume", finished)
    assert r.code == 0 and "already complete: nothing to resume" in r.stdout, str(r)
    r = cli.run("resume", tmp_path / "nothing")
    assert r.code == 1 and "no interrupted merge" in r.stderr, str(r)


# ---------------------------------------------------------------------------------- 6. damaged work folder


def _journal_chunks(out: Path) -> list[dict[str, Any]]:
    lines = (partial(out) / "journal.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "r0" in e]


def test_torn_last_journal_line_resumes(cli, fam, refs, tmp_path):
    out = tmp_path / "out"
    _kill_mid_merge(cli, fam, out, refs)
    with open(partial(out) / "journal.jsonl", "ab") as f:
        f.write(b'{"t": "model.layers.1.mlp.up_proj.weight", "r0": 16, "r1"')
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, refs["widen"].out)


def test_torn_journal_line_survives_a_second_interruption(cli, fam, refs, tmp_path):
    out = tmp_path / "out"
    _kill_mid_merge(cli, fam, out, refs)
    with open(partial(out) / "journal.jsonl", "ab") as f:
        f.write(b'{"t": "model.layers.1.mlp.up_proj.weight", "r0": 16, "r1"')
    r = cli.run("resume", out, "-q", kill_at=6)
    assert r.code == -signal.SIGKILL, str(r)
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, refs["widen"].out)


@pytest.mark.parametrize("pick", ["first", "last"])
def test_damaged_journaled_chunk_is_redone(pick, cli, fam, refs, tmp_path):
    out = tmp_path / "out"
    r = cli.run(*merge_args(fam, out), kill_at=kill_points(refs["widen"].events, "chunk-written", 0.9))
    assert r.code == -signal.SIGKILL, str(r)
    chunks = _journal_chunks(out)
    assert len(chunks) > 10, "the kill point should leave many journaled chunks"
    c = chunks[0] if pick == "first" else chunks[-1]
    shard = partial(out) / "model" / SHARD
    b, _, row = tensor_range(shard, c["t"])
    flip_byte(shard, b + c["r0"] * row + (c["r1"] - c["r0"]) * row // 2)
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert f"note: {c['t']} rows [" in r.stderr and "do not match the checksum" in r.stderr, r.stderr
    assert_same_output(out, refs["widen"].out)


def test_damaged_chunk_redone_then_interrupted_again_resumes(cli, fam, refs, tmp_path):
    """Redoing a damaged chunk journals a truncation; a later resume must still read that journal."""
    out = tmp_path / "out"
    r = cli.run(*merge_args(fam, out), kill_at=kill_points(refs["widen"].events, "chunk-written", 0.9))
    assert r.code == -signal.SIGKILL, str(r)
    c = _journal_chunks(out)[0]
    shard = partial(out) / "model" / SHARD
    b, _, row = tensor_range(shard, c["t"])
    flip_byte(shard, b + c["r0"] * row)
    r = cli.run("resume", out, "-q", kill_at=3)
    assert r.code == -signal.SIGKILL, str(r)
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, refs["widen"].out)


def test_damaged_middle_chunks_of_ties_tensors_are_redone(cli, fam, refs, tmp_path):
    """TIES's emit cursor (tie counters) must be the one of the last chunk kept, not of the last one journaled."""
    ref = refs["ties"]
    out = tmp_path / "out"
    r = cli.run(*merge_args(fam, out, "ties"), kill_at=kill_points(ref.events, "chunk-written", "last"))
    assert r.code == -signal.SIGKILL, str(r)
    by_tensor: dict[str, list[dict[str, Any]]] = {}
    for c in _journal_chunks(out):
        by_tensor.setdefault(c["t"], []).append(c)
    shard = partial(out) / "model" / SHARD
    damaged = 0
    for name, chunks in by_tensor.items():
        b, e, row = tensor_range(shard, name)
        if len(chunks) >= 3 and chunks[-1]["r1"] * row == e - b:  # complete, several chunks: damage the second
            flip_byte(shard, b + chunks[1]["r0"] * row)
            damaged += 1
    assert damaged >= 5
    r = cli.run("resume", out, "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, ref.out)


# ------------------------------------------------------------- 7. saved statistics that do not load, mid-tensor


@pytest.fixture
def interrupt_at() -> Iterator[Any]:
    """``interrupt_at(n)``: the nth journaled chunk of the next in-process merge raises KeyboardInterrupt (on the
    writer thread, as a second Ctrl-C would), leaving chunks journaled mid-tensor."""
    from streammerge import faults

    yield arm_chunk_interrupt
    faults.set_hook(None)


def _damage_state(out: Path, how: str, plan: Any) -> bool:
    """Damage every saved statistics file of the work folder; returns whether one belonged to a tensor not yet
    complete (whose statistics the resumed run needs)."""
    from streammerge.journal import Journal

    journal = Journal(partial(out))
    needed = any(journal.get(t.name).state_file and journal.get(t.name).rows_done < t.rows for t in plan.tensors)
    journal.close()
    files = sorted((partial(out) / "state").glob("*.safetensors"))
    for f in files:
        data = f.read_bytes()
        if how == "empty":  # what a power cut can leave of a file whose data was never synced
            f.write_bytes(b"")
        elif how == "missing":
            f.unlink()
        elif how == "flipped":
            f.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
        elif how == "truncated":
            f.write_bytes(data[: len(data) // 2])
    return needed


@pytest.mark.parametrize("method", ["widen", "ties"])
def test_half_written_tensor_whose_statistics_do_not_load_resumes_to_the_same_bytes(
        method, interrupt_at, one_thread, fam, refs, tmp_path):
    """The whole kind of the old silent corruption: a tensor half written in chunks, its saved statistics damaged
    (as a power cut leaves an unsynced file) or lost, resumed with any budget, including one where the tensor
    fits whole and is read once for every pass. The statistics are recomputed, with a notice, and every byte
    equals an uninterrupted run."""
    ref = refs[method]
    params = {"density": 0.5} if method == "ties" else {}
    chunks = ref.events.count("chunk-written")
    damages = ["empty", "missing", "flipped", "truncated"]
    continuations: list[dict[str, Any]] = [{"max_ram": "1GiB"}, {"chunk_rows": 7}, {"max_ram": METHODS[method][1]}]
    failures = []
    for i, stop in enumerate(range(3, chunks - 1, max(1, chunks // 7))):
        out, how, cont = tmp_path / f"out{i}", damages[i % 4], continuations[i % 3]
        interrupt_at(stop)
        with pytest.raises(MergeInterrupted):
            api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, method, params, chunk_rows=CHUNK_ROWS,
                      threads=1)  # one tensor half-written (workers would leave one each)
        needed = _damage_state(out, how, api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, method, params, **cont)
        notices = [str(w.message) for w in caught if "cannot be used" in str(w.message)]
        if needed and len(notices) != 1:
            failures.append(f"stop {stop}, {how}: not one notice that the statistics are recomputed: {notices}")
        failures += [f"stop {stop}, state {how}, continued with {cont}: {p}" for p in output_problems(out, ref.out)]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------- 8. engine changes, option changes, stopping


def _interrupted(fam: dict[str, Path], out: Path, interrupt_at: Any, method: str = "widen", **options: Any) -> None:
    interrupt_at(20)
    with pytest.raises(MergeInterrupted):
        api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, method, chunk_rows=CHUNK_ROWS, **options)


@pytest.mark.parametrize("what, patch, label", [
    ("streammerge", ("streammerge.fingerprint.__version__", "9.9.9"), "streammerge version: "),
    ("torch", ("streammerge.fingerprint.torch_version", lambda: "3.0.0"), "torch version: "),
])
def test_a_resume_after_an_upgrade_is_refused_by_name(what, patch, label, interrupt_at, one_thread, fam, refs,
                                                       monkeypatch, tmp_path):
    out = tmp_path / "out"
    _interrupted(fam, out, interrupt_at)
    before = _work_snapshot(out)
    monkeypatch.setattr(*patch)
    with pytest.raises(StreamMergeError) as info:
        _api_merge(fam, out)
    message = str(info.value)
    version = patch[1]() if callable(patch[1]) else patch[1]
    assert label in message and version in message and "restart=True" in message, message
    assert _work_snapshot(out) == before and not out.exists()
    api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, "widen", chunk_rows=CHUNK_ROWS, restart=True)
    monkeypatch.undo()
    assert (out / SHARD).read_bytes() == (refs["widen"].out / SHARD).read_bytes()


def test_a_changed_option_keeps_the_unaffected_work_only_when_asked(interrupt_at, one_thread, fam, refs, tmp_path):
    """An --exclude added after an interruption changes one finished tensor: refused by default (its work would be
    lost), naming the change and the flags; with redo_changed only that tensor is redone, and the bytes equal a
    fresh merge with the new option."""
    from streammerge.journal import Journal

    out = tmp_path / "out"
    _interrupted(fam, out, interrupt_at)
    journal = Journal(partial(out))
    plan = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "x", "widen")
    name = next(t.name for t in plan.tensors if journal.get(t.name).rows_done == t.rows)  # a finished tensor
    journal.close()
    before = _work_snapshot(out)
    exclude = ["^" + re.escape(name) + "$"]
    with pytest.raises(StreamMergeError) as info:
        _api_merge_opts(fam, out, exclude=exclude)
    message = str(info.value)
    assert "exclude: [] -> [" in message and "1 tensor(s) with work done are affected" in message, message
    assert "redo_changed=True" in message and "restart=True" in message
    assert _work_snapshot(out) == before
    notes: list[str] = []
    _api_merge_opts(fam, out, exclude=exclude, redo_changed=True, notify=notes.append)
    assert any("redoing 1 tensor(s)" in n for n in notes), notes
    fresh = _api_merge_opts(fam, tmp_path / "fresh", exclude=exclude)
    assert (out / SHARD).read_bytes() == (fresh / SHARD).read_bytes()
    assert (out / SHARD).read_bytes() != (refs["widen"].out / SHARD).read_bytes()


def _api_merge_opts(fam: dict[str, Path], out: Path, **options: Any) -> Path:
    return api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, "widen", chunk_rows=CHUNK_ROWS, **options)


@pytest.fixture
def big_embedding(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A family whose token embedding is large next to the rest (a long statistics pass)."""
    from streammerge.examples import Shape

    root = tmp_path_factory.mktemp("bigvocab")
    return {k: p.resolve() for k, p in write_family(root, Shape(512, 128, 1, 4, 2, 16384, tied=True), dtype="bf16").items()}


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_signal_inside_a_long_statistics_pass_stops_at_the_next_block(signum, code, big_embedding, one_thread,
                                                                          monkeypatch, tmp_path):
    """The embedding is read whole (one chunk) and its statistics pass runs in many blocks; a signal arriving in
    the middle stops the merge at the next block, not at the end of the pass or the tensor."""
    from streammerge.methods import widen

    fam, out = big_embedding, tmp_path / "out"
    real = widen._MatrixMerge.accumulate
    monkeypatch.setenv("STREAMMERGE_KERNELS", "eager")  # accumulate, not the fused accumulate_raw, sees every block
    calls = {"embedding": 0, "after": 0}

    def accumulate(self, pass_index, r0, base, models):  # type: ignore[no-untyped-def]
        if self.task.rule.value == "embedding":
            calls["embedding"] += 1
            if calls["embedding"] == 3:
                os.kill(os.getpid(), signum)
            elif calls["embedding"] > 3:
                calls["after"] += 1
        return real(self, pass_index, r0, base, models)

    monkeypatch.setattr(widen._MatrixMerge, "accumulate", accumulate)
    p = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], out, "widen", max_ram="1GiB", threads=1)
    emb = p.tensor("model.embed_tokens.weight")
    assert emb.resident and len(emb.blocks(0, emb.rows, stats=True)) >= 10
    before = signal.getsignal(signum)
    with pytest.raises(MergeInterrupted) as info:  # one worker: the signal's handler runs before its next block
        api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, "widen", max_ram="1GiB", handle_signals=True,
                  threads=1)
    # the first tensor, stopped before its statistics were saved: nothing to keep, so nothing is promised
    assert info.value.exit_code == code and "merge interrupted" in str(info.value) and not partial(out).exists()
    assert calls["after"] == 0, f"{calls['after']} more blocks ran after the signal"
    assert signal.getsignal(signum) == before, "the caller's handler is back"
    monkeypatch.undo()
    api.merge(fam["base"], [fam["chat"], fam["multilingual"]], out, "widen")  # and it resumes
    fresh = api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "fresh", "widen")
    assert (out / SHARD).read_bytes() == (fresh / SHARD).read_bytes()


@pytest.mark.parametrize("handle", [False, True])
def test_the_python_api_installs_signal_handlers_only_when_asked(handle, fam, one_thread, monkeypatch, tmp_path):
    from streammerge import execute

    def mine(signum, frame):  # type: ignore[no-untyped-def]
        pass

    seen = []
    real = execute.run_tensor

    def run_tensor(plan, job, io):  # type: ignore[no-untyped-def]
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        return real(plan, job, io)

    monkeypatch.setattr(execute, "run_tensor", run_tensor)
    old = signal.signal(signal.SIGINT, mine)
    try:
        api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", "linear", handle_signals=handle)
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, old)
    assert seen and all((sigint is mine) != handle for sigint, _ in seen)


def test_resume_restart_starts_the_interrupted_merge_over_with_its_options(cli, fam, refs, tmp_path):
    out = tmp_path / "out"
    _kill_mid_merge(cli, fam, out, refs)
    r = cli.run("resume", out, "--restart", "-q")
    assert r.code == 0, str(r)
    assert_same_output(out, refs["widen"].out)
