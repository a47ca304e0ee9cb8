#!/usr/bin/env python
"""The largest job's bound on scaling: per-tensor job CPU of a merge, and the speed-up N workers could reach.

    python bench/job_bound.py --models bench/models/qwen2-0.5b --method widen,ties --param ties:density=0.5

Each method is merged in this process (warm page cache, ``--threads`` workers, default 1; the first merge of a
method warms up and is not counted, the next ``--rounds`` are, the smallest total kept) with ``run_tensor`` wrapped
to record every tensor job's thread CPU (the compute thread's; the kernels run in it). A tensor is one worker's
job, so with N workers the run takes at least the longest schedule of these jobs on N workers: the jobs placed
largest first, each on the least loaded worker (as the engine's queue orders them; the placement is the usual
LPT heuristic, within 4/3 of the best). Its speed-up bound = total job CPU / that makespan, and its share of
linear = bound / N.

Idle workers help with a tensor's blocks where they are independent (streammerge.workers: ``JobQueue.run_blocks``);
the CPU each job spends inside ``run_blocks`` on chunks of two blocks or more is its shareable part. With helpers a
job takes at least its unshared part plus its shared part over N, so the makespan is at least
max(total / N, max over jobs of unshared + shared / N), and the speed-up with helpers at most total over that. The
measurement acts as if helpers were always idle (``LocalIO.helpers_idle``), so the work a pass's blocks need done
ahead (``TensorMerge.blocks_ahead``: a selection's ties counted, DELLA's decisions made) is done as it would be with
helpers, shared, and in the job CPU.

Prints Markdown; writes ``bench/results/<UTC timestamp>-job-bound-<family>.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def measure(models: Path, method: str, params: dict, threads: int, rounds: int,
            max_ram: str) -> list[tuple[str, float, float]]:
    """(tensor, job thread CPU s, of which in shareable blocks s) of the quickest of ``rounds`` merges, after one
    warm-up merge."""
    import streammerge.execute as ex
    from streammerge import api, workers

    real, real_blocks = ex.run_tensor, workers.JobQueue.run_blocks
    jobs: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    local = threading.local()

    def timed(plan, job, io):  # type: ignore[no-untyped-def]
        local.shared = 0.0
        c0 = time.thread_time()
        result = real(plan, job, io)
        with lock:
            jobs.append((job.tensor.name, time.thread_time() - c0, local.shared))
        return result

    def blocks(self, items, work):  # type: ignore[no-untyped-def]
        c0 = time.thread_time()
        real_blocks(self, items, work)
        if len(items) > 1 and hasattr(local, "shared"):
            local.shared += time.thread_time() - c0

    real_idle = ex.LocalIO.helpers_idle
    ex.run_tensor = timed
    workers.JobQueue.run_blocks = blocks
    ex.LocalIO.helpers_idle = lambda self: True  # type: ignore[method-assign]
    best: list[tuple[str, float, float]] | None = None
    try:
        with tempfile.TemporaryDirectory() as work:
            for r in range(rounds + 1):
                jobs.clear()
                out = Path(work) / "out"
                shutil.rmtree(out, ignore_errors=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    others = [p for p in sorted(models.iterdir()) if p.is_dir() and p.name != "base"]
                    api.merge(models / "base", others, out, method, params, max_ram=max_ram, threads=threads)
                if r and (best is None or sum(c for _, c, _ in jobs) < sum(c for _, c, _ in best)):
                    best = list(jobs)
    finally:
        ex.run_tensor, workers.JobQueue.run_blocks, ex.LocalIO.helpers_idle = real, real_blocks, real_idle
    assert best is not None
    return best


def makespan(costs: list[float], workers: int) -> float:
    loads = [0.0] * workers
    for c in sorted(costs, reverse=True):
        i = loads.index(min(loads))
        loads[i] += c
    return max(loads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="a family folder: base/ and the models beside it")
    ap.add_argument("--method", default="task_arithmetic,widen,ties,della")
    ap.add_argument("--param", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a method's parameter (repeatable), e.g. ties:density=0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", default="2,4,8,16", help="worker counts to bound")
    ap.add_argument("--max-ram", default="1GiB")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    params: dict[str, dict[str, str]] = {}
    for item in args.param:
        method, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        params.setdefault(method, {})[key] = value
    counts = [int(x) for x in args.workers.split(",")]
    lines = [f"# The largest job's bound on scaling: {args.models.name}, --threads {args.threads}, "
             f"--max-ram {args.max_ram}", "",
             "| method | params | jobs | job CPU s | largest job | its CPU s (share) | its shareable CPU s | "
             + " | ".join(f"bound at {n} (of linear)" for n in counts) + " | "
             + " | ".join(f"with helpers at {n}" for n in counts) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * 2 * len(counts)]
    for method in args.method.split(","):
        jobs = measure(args.models, method, params.get(method, {}), args.threads, args.rounds, args.max_ram)
        costs = [c for _, c, _ in jobs]
        total = sum(costs)
        name, top, top_shared = max(jobs, key=lambda j: j[1])
        bounds = [total / makespan(costs, n) for n in counts]
        helped = [total / max(total / n, max(c - s + s / n for _, c, s in jobs)) for n in counts]
        lines.append(f"| {method} | {params.get(method, {}) or '-'} | {len(jobs)} | {total:.2f} | {name} | "
                     f"{top:.2f} ({top / total:.0%}) | {top_shared:.2f} ({top_shared / top:.0%}) | "
                     + " | ".join(f"{b:.2f}× ({b / n:.2f})" for b, n in zip(bounds, counts)) + " | "
                     + " | ".join(f"{b:.2f}× ({b / n:.2f})" for b, n in zip(helped, counts)) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-job-bound-{args.models.name}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
