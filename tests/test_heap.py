"""streammerge.heap: a merge's freed blocks stay in the C heap for the next block (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
