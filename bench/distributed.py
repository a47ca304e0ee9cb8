#!/usr/bin/env python
"""N parts of one merge on one machine, each reading at a throttled rate, so the speed-up over N shows.

    python bench/distributed.py --models bench/models/qwen2-0.5b --method task_arithmetic --parts 1,2,4 \
        --read-rate 60MB --shard-size 100MB --max-ram 1GiB

For each N the N parts (``streammerge merge ... --part K/N``) start at once as separate processes, each with its
input reads capped at ``--read-rate`` bytes per second (a bench-only throttle: the worker wraps the reader's
``pread`` with a token bucket, standing for a node's disk or network link; streammerge itself has no throttle),
then ``streammerge finalize`` publishes. Walls: from the start of the parts to the last part's end, finalize, and
the total; the speed-up is against N = 1. Every N must give the same output bytes (checked). The largest part's
bytes bound the speed-up: its share is printed beside it (``bench/scaling_model.py`` uses the same figures).

Writes bench/results/<UTC timestamp>-distributed-<shape>.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streammerge import api
from streammerge.units import format_size, parse_size

BENCH = Path(__file__).resolve().parent

#: the worker: streammerge's CLI with the reader's pread capped at RATE bytes per second (bench only)
WORKER = r"""
import sys, threading, time
rate = float(sys.argv[1])  # 0: no throttle
import streammerge.formats.reader as reader
real, lock, state = reader.pread_into, threading.Lock(), {"t0": None, "n": 0}
def throttled(fd, view, offset):
    if not rate:
        return real(fd, view, offset)
    got = real(fd, view, offset)
    with lock:
        if state["t0"] is None:
            state["t0"] = time.monotonic()
        state["n"] += got
        wait = state["t0"] + state["n"] / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    return got
reader.pread_into = throttled
from streammerge.cli import main
main(args=sys.argv[2:], prog_name="streammerge")
"""


def digest(folder: Path) -> str:
    """One hash over every file of an output folder (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                h.update(block)
    return h.hexdigest()


def run(args: argparse.Namespace, n: int, out: Path, throttle: bool = True) -> dict:
    models = Path(args.models)
    merge = ["merge", "--base", models / "base", "--model", models / "chat", "--model", models / "multilingual",
             "--method", args.method, "--out", out, "--shard-size", args.shard_size, "--max-ram", args.max_ram,
             "--json", *sum((["--param", p] for p in args.param), [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.monotonic()
    rate = parse_size(args.read_rate, "--read-rate") if throttle else 0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(rate),
                               *map(str, merge), "--part", f"{k}/{n}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for k in range(1, n + 1)]
    parts = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode:
            raise SystemExit(f"a part failed ({p.returncode}): {stderr[-2000:]}")
        parts.append(json.loads(stdout)["summary"])
    parts_wall = time.monotonic() - start
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "streammerge.cli", "finalize", out, "-q"], capture_output=True,
                       text=True, env=env)
    if r.returncode:
        raise SystemExit(f"finalize failed: {r.stderr[-2000:]}")
    finalize_wall = time.monotonic() - t
    return {"parts": n, "parts_wall": parts_wall, "finalize_wall": finalize_wall,
            "total_wall": parts_wall + finalize_wall, "part_walls": [p["elapsed"] for p in parts],
            "part_written_bytes": [p["bytes_written"] for p in parts],
            "part_read_bytes": [p["bytes_read"] for p in parts], "digest": digest(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="a family folder (base/, chat/, multilingual/)")
    ap.add_argument("--method", default="task_arithmetic")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--parts", default="1,2,4", help="comma-separated N")
    ap.add_argument("--read-rate", default="60MB", help="per-part read rate cap (bytes/s)")
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--max-ram", default="1GiB", help="each part's --max-ram")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each part")
    args = ap.parse_args()
    models = Path(args.models)
    work = BENCH / "work" / "distributed"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    counts = [int(x) for x in args.parts.split(",")]
    plan = api.plan(models / "base", [models / "chat", models / "multilingual"], None, method=args.method,
                    shard_size=args.shard_size, max_ram=args.max_ram,
                    params=dict(p.split("=", 1) for p in args.param))
    # unthrottled, one part: the compute-bound rate of one part on this machine (inputs in the page cache after a
    # first read), which bench/scaling_model.py takes as its compute rate
    run(args, 1, work / "warm", throttle=False)
    shutil.rmtree(work / "warm")
    baseline = run(args, 1, work / "baseline", throttle=False)
    shutil.rmtree(work / "baseline")
    print(f"[bench] N=1 without throttle: {baseline['total_wall']:.1f} s", file=sys.stderr)
    rows = []
    for n in counts:
        units = plan.units(n)
        print(f"[bench] N={n}: parts of {', '.join(format_size(u.cost) for u in units)}", file=sys.stderr)
        row = run(args, n, work / f"out{n}")
        row["largest_share"] = max(u.cost for u in units) / sum(u.cost for u in units)
        rows.append(row)
        shutil.rmtree(work / f"out{n}")
        print(f"[bench] N={n}: {row['total_wall']:.1f} s", file=sys.stderr)
    same = len({r["digest"] for r in rows + [baseline]}) == 1
    base = rows[0]["total_wall"]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    lines = [f"# {n_parts(counts)} of one merge on one machine, reads throttled to {args.read_rate}/s per part", "",
             f"{models.name}, {args.method}, --shard-size {args.shard_size} ({len(plan.shards)} files), --max-ram "
             f"{args.max_ram} per part, OMP_NUM_THREADS={args.threads}, {os.cpu_count()} CPUs; inputs "
             f"{format_size(sum(t.rows * t.read_bytes_per_row for t in plan.tensors))}, output "
             f"{format_size(plan.bytes_written)}. Same output bytes for every N: {'yes' if same else 'NO'}.", "",
             "| N | largest part's share | parts wall s | finalize s | total s | speed-up | ideal (1 / share) |",
             "|---|---|---|---|---|---|---|",
             f"| 1, no throttle | 1.00 | {baseline['parts_wall']:.1f} | {baseline['finalize_wall']:.1f} | "
             f"{baseline['total_wall']:.1f} | | |"]
    for r in rows:
        lines.append(f"| {r['parts']} | {r['largest_share']:.2f} | {r['parts_wall']:.1f} | {r['finalize_wall']:.1f} | "
                     f"{r['total_wall']:.1f} | {base / r['total_wall']:.2f} | "
                     f"{rows[0]['largest_share'] / r['largest_share']:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    results = BENCH / "results"
    (results / f"{stamp}-distributed-{models.name}.md").write_text(report)
    (results / f"{stamp}-distributed-{models.name}.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows, "baseline": baseline, "same_bytes": same,
         "read_rate": parse_size(args.read_rate, "--read-rate"), "shards": len(plan.shards),
         "input_bytes": sum(t.rows * t.read_bytes_per_row for t in plan.tensors),
         "output_bytes": plan.bytes_written, "cpus": os.cpu_count(), "loadavg": os.getloadavg()}, indent=1))
    if not same:
        raise SystemExit("the outputs differ between part counts")


def n_parts(counts: list[int]) -> str:
    return "/".join(map(str, counts)) + " parts"


if __name__ == "__main__":
    main()
