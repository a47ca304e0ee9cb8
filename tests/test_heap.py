"""streammerge.heap: a merge's freed blocks stay in the C heap for the next block (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from streammerge import heap

needs_glibc = pytest.mark.skipif(not heap.glibc(), reason="the malloc thresholds are glibc's")

#: a thread that allocates and frees 1–3 MiB numpy arrays, as a compute worker does a block's temporaries; prints
#: the minor page faults it took
CHURN = textwrap.dedent("""
    import resource, sys, threading
    import numpy as np
    from streammerge import heap
    if sys.argv[1] == "keep":
        assert heap.keep_freed_memory(1 << 30)
    def work(out):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for i in range(40):
            a = np.ones((1 << 18) * (1 + i % 3), np.float32)
            b = np.ones(1 << 19, np.float32)
            del a, b
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out = []
    t = threading.Thread(target=work, args=(out,))
    t.start()
    t.join()
    print(out[0])
""")


def faults(mode: str, env: dict[str, str] | None = None) -> int:
    run = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return int(run.stdout.split()[-1])


@needs_glibc
def test_a_worker_thread_reuses_its_freed_pages():
    """40 rounds of 2–5 MiB allocated and freed: with glibc's defaults the thread's heap hands them back and every
    round faults fresh pages (~1 280 per round); kept, only the first rounds do."""
    default, kept = faults("default"), faults("keep")
    assert kept * 4 < default, (kept, default)
    assert kept < 40 * 1280 // 4


@needs_glibc
def test_the_users_own_malloc_tunables_are_left_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert heap.keep_freed_memory(1 << 30) is False
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert heap.keep_freed_memory(1 << 30) is True


def test_off_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(heap, "glibc", lambda: False)
    assert heap.keep_freed_memory(1 << 30) is False


#: a merge in a fresh process on the eager path; prints its peak RSS above the RSS after the imports, in bytes
EAGER_MERGE = textwrap.dedent("""
    import sys
    import torch, streammerge
    from streammerge import api
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    fam, out, method, params = sys.argv[1], sys.argv[2], sys.argv[3], eval(sys.argv[4])
    api.merge(fam + "/base", [fam + "/chat", fam + "/multilingual"], out, method, params, max_ram="192MiB",
              threads=1)
    print(status("VmHWM") - base)
""")


@pytest.fixture(scope="module")
def mid_family(tmp_path_factory) -> Path:
    """A layer of Qwen2-0.5B's width with an untied 32000-token vocabulary (bench/ram_probe.py's ``mid``, 138 MiB
    per model): base, chat, multilingual."""
    from dataclasses import replace

    from streammerge.examples import SHAPES, write_family

    folder = tmp_path_factory.mktemp("heap") / "fam"
    write_family(folder, replace(SHAPES["qwen2-0.5b"], layers=1, vocab=32000, tied=False))
    return folder


def eager_env() -> dict[str, str]:
    """The eager path, one intra-op thread, and the allocator as a user's merge runs it (no malloc environment of
    its own: the engine's ``heap.keep_freed_memory`` settings)."""
    env = {**os.environ, "STREAMMERGE_KERNELS": "eager", "OMP_NUM_THREADS": "1"}
    return {k: v for k, v in env.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


@needs_glibc
@pytest.mark.parametrize("method,params", [("sce", {"select_topk": 0.5}), ("dare_ties", {"density": 0.5})])
def test_an_eager_merge_stays_within_max_ram_with_the_heaps_holes(method, params, mid_family, tmp_path):
    """The eager path allocates and frees torch temporaries of many sizes per block; the heap keeps the holes
    between them, which the plan counts (``planner.EAGER_HEAP_SLACK``). Merged at 192 MiB: SCE with a selection
    went to ~214 MiB above the imports' RSS, and DARE-TIES to ~196, when the blocks were counted once."""
    run = subprocess.run([sys.executable, "-c", EAGER_MERGE, str(mid_family), str(tmp_path / "out"), method,
                          repr(params)], capture_output=True, text=True, env=eager_env())
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])
    assert peak <= 192 << 20, f"{method}: {peak / 2**20:.1f} MiB above the imports' RSS at --max-ram 192MiB"


def bench_run():  # type: ignore[no-untyped-def]
    """bench/run.py, loaded as a module (it imports its neighbours in bench/)."""
    import importlib.util

    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", bench / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(bench))


def memory_cgroup(limit: int):  # type: ignore[no-untyped-def]
    """bench/run.py's ``MemoryCgroup`` (a cgroup-v1 memory group under this process's own with a hard limit), or a
    skip where one cannot be made here."""
    try:
        return bench_run().MemoryCgroup(limit)
    except (OSError, StopIteration) as exc:
        pytest.skip(f"no cgroup-v1 memory group can be made here: {exc}")


def swap_total() -> int:
    """SwapTotal from /proc/meminfo, in kB (0 without swap)."""
    return next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("SwapTotal:")), 0)


def rss_anon_after_imports() -> int:
    """Anonymous RSS of a fresh interpreter after ``import torch`` and streammerge's CLI and API, in bytes."""
    code = ("import torch, streammerge.cli, streammerge.api\n"
            "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon')))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=eager_env()).stdout.split()[-1])


@needs_glibc
@pytest.mark.skipif(not Path("/sys/fs/cgroup/memory").is_dir(), reason="no cgroup-v1 memory controller")
@pytest.mark.parametrize("method,params,extra_mib,fits", [
    ("widen", [], 64, True), ("ties", ["--param", "density=0.5"], 64, True), ("widen", [], 24, False)],
    ids=["widen", "ties", "widen-too-tight"])
def test_an_eager_merge_at_64mib_fits_a_hard_cap_of_its_budget(method, params, extra_mib, fits, mid_family,
                                                                 tmp_path):
    """The laptop case: ``streammerge merge --max-ram 64MiB`` in a memory cgroup capped at the interpreter's
    anonymous memory after its imports + ``extra_mib``. At 64 MiB WIDEN's and TIES's peak RSS passes the budget by
    2-3 MiB, all of it torch's code pages touched on first use (file-backed: the kernel reclaims them under the
    cap); their own memory fits, so the merge ends. At 24 MiB over the imports the cap kills it: the cap binds.
    Not where a capped group would swap instead of being killed, or where the output's pages would be shared
    memory charged to it (tmpfs)."""
    if swap_total():
        pytest.skip("with swap a capped group swaps rather than being killed")
    if bench_run().filesystem(tmp_path) == "tmpfs":
        pytest.skip("the merged model would be tmpfs pages charged to the capped group")
    cgroup = memory_cgroup(rss_anon_after_imports() + (extra_mib << 20))
    try:
        cmd = [str(Path(sys.executable).with_name("streammerge")), "merge", "--base", str(mid_family / "base"),
               "--model", str(mid_family / "chat"), "--model", str(mid_family / "multilingual"), "--method", method,
               *params, "--max-ram", "64MiB", "--threads", "1", "--out", str(tmp_path / "out"), "-q"]
        run = subprocess.run(cgroup.wrap(cmd), capture_output=True, text=True, env=eager_env())
        report = cgroup.report()
    finally:
        cgroup.remove()
    if fits:
        assert run.returncode == 0 and not report["oom_kills"], (report, run.stderr[-2000:])
        assert (tmp_path / "out" / "model.safetensors").is_file()
    else:
        assert run.returncode != 0 and (report["oom_kills"] or run.returncode == -9), (run.returncode, report)
