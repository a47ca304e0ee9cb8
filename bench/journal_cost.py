#!/usr/bin/env python3
"""What crash safety costs: a merge with and without the journal, and the time one interruption loses.

    python bench/journal_cost.py --models bench/models/qwen2-0.5b --method widen --max-ram 1GiB

In one run, each with a cold page cache (when root):
  1. the merge as users run it (journal on), logging its failpoints to count them;
  2. the same merge with ``--no-journal`` (no fsyncs, no journal; not resumable);
  3. the same merge killed with SIGKILL at the middle failpoint, then ``streammerge resume OUT``.
The lost time of one interruption = (killed run + resume) − uninterrupted run. Writes
bench/results/<UTC>-journal-<shape>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, -9, 137):
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, type=Path)
    ap.add_argument("--method", default="widen")
    ap.add_argument("--max-ram", default="1GiB")
    ap.add_argument("--param", action="append", default=[])
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    args = ap.parse_args()

    sm = [sys.executable, "-m", "streammerge.cli"]
    variants = sorted(p.name for p in args.models.iterdir() if p.is_dir() and p.name != "base")
    out = args.work / "journal-out"
    base_cmd = [*sm, "merge", "--base", str(args.models / "base"),
                *[a for v in variants for a in ("--model", str(args.models / v))],
                "--method", args.method, "--max-ram", args.max_ram, "--out", str(out), "-q",
                *[a for p in args.param for a in ("--param", p)]]
    args.work.mkdir(parents=True, exist_ok=True)

    def clean() -> None:
        for p in (out, out.with_name(out.name + ".streammerge-partial")):
            shutil.rmtree(p, ignore_errors=True)

    log = args.work / "checkpoints.log"
    log.unlink(missing_ok=True)
    clean()
    cold = drop_caches()
    with_journal, _ = timed(base_cmd, {"STREAMMERGE_CHECKPOINT_LOG": str(log)})
    events = log.read_text().split()
    clean()
    drop_caches()
    without_journal, _ = timed([*base_cmd, "--no-journal"])
    clean()
    kill_at = len(events) // 2
    drop_caches()
    killed, rc = timed(base_cmd, {"STREAMMERGE_KILL_AT": str(kill_at)})
    drop_caches()
    resumed, _ = timed([*sm, "resume", str(out), "-q", "--max-ram", args.max_ram])
    clean()

    result = {
        "when": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "models": str(args.models), "method": args.method, "max_ram": args.max_ram, "params": args.param,
        "cold_cache": cold, "checkpoints": len(events), "kill_at": kill_at, "kill_event": events[kill_at - 1],
        "wall_journal": with_journal, "wall_no_journal": without_journal,
        "journal_overhead": with_journal / without_journal,
        "wall_killed": killed, "killed_rc": rc, "wall_resume": resumed,
        "interruption_loss": killed + resumed - with_journal,
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, python {platform.python_version()}",
        "git": subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
    }
    md = (
        f"# Journal cost: {args.models.name}, {args.method}, --max-ram {args.max_ram} ({result['when']})\n\n"
        f"cache dropped before each run: {cold}; {result['machine']}; git {result['git']}\n\n"
        "| run | wall s |\n|---|---|\n"
        f"| journal on (default) | {with_journal:.2f} |\n"
        f"| --no-journal | {without_journal:.2f} |\n"
        f"| killed (SIGKILL at checkpoint {kill_at} of {len(events)}: {events[kill_at - 1]}) | {killed:.2f} |\n"
        f"| resume | {resumed:.2f} |\n\n"
        f"Journal overhead: {result['journal_overhead']:.3f}x. Time lost to one interruption (killed + resume − "
        f"uninterrupted): {result['interruption_loss']:.2f} s.\n"
    )
    print(md)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"{result['when']}-journal-{args.models.name}"
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    main()
