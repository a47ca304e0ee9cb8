#!/usr/bin/env python
"""Where a merge spends its time: sample ``streammerge merge`` with py-spy and sum the samples per thread and
per function.

    python bench/profile_merge.py --models bench/models/qwen2-0.5b --method ties --param density=0.5 [--max-ram 1GiB]

Needs py-spy (``pip install py-spy``; sampling another process needs root or ptrace permission). Each sample is
one stack of one thread, so the tables show, per thread (main = compute, streammerge-reader, streammerge-writer,
streammerge-commit), how often each function was on the stack ("inclusive") and at its top ("self"); idle
threads show up in ``Condition.wait``. Prints a Markdown report and writes
``bench/results/<UTC timestamp>-profile-<shape>-<method>.md``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RATE = 100  # samples per second per thread


def thread_name(frame: str) -> str:
    """The thread a raw py-spy stack belongs to, from its outermost frame."""
    if frame.startswith("Thread._bootstrap"):
        return "background"
    return "main"


def aggregate(raw: Path) -> tuple[collections.Counter, dict[str, collections.Counter], dict[str, collections.Counter]]:
    """Samples per thread, and per thread the self / inclusive samples of each function (``name (file)``)."""
    per_thread: collections.Counter = collections.Counter()
    self_: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count)
        names = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else f for f in frames]
        # name the thread by the function that runs it
        who = thread_name(frames[0])
        if who == "background":
            runner = next((nm for nm in names if nm.startswith(("Prefetcher._run", "WriteBehind._run", "Journal.commit",
                                                                "TMonitor.run"))), "other")
            who = runner.split(" (")[0]
        per_thread[who] += n
        self_[who][names[-1]] += n
        for nm in set(names):
            incl[who][nm] += n
    return per_thread, self_, incl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="family folder from make_models.py (base/, chat/, ...)")
    ap.add_argument("--method", default="widen")
    ap.add_argument("--param", action="append", default=[], help="passed through as --param NAME=VALUE")
    ap.add_argument("--max-ram", default="1GiB")
    ap.add_argument("--top", type=int, default=15, help="functions listed per thread")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    sm = str(Path(sys.executable).with_name("streammerge"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is missing: pip install py-spy")
    models = args.models.resolve()
    variants = [p for p in ("chat", "multilingual") if (models / p).is_dir()]
    with tempfile.TemporaryDirectory(dir=BENCH) as tmp:
        out, raw = Path(tmp) / "out", Path(tmp) / "profile.txt"
        cmd = [sm, "merge", "--base", str(models / "base"), *(a for v in variants for a in ("--model", str(models / v))),
               "--method", args.method, "--max-ram", args.max_ram, "--out", str(out), "-q",
               *(a for p in args.param for a in ("--param", p))]
        started = time.time()
        subprocess.run([spy, "record", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--", *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.time() - started
        per_thread, self_, incl = aggregate(raw)

    lines = [f"# Profile: {models.name}, {args.method} {' '.join(args.param)}, --max-ram {args.max_ram}", "",
             f"py-spy at {RATE} Hz, wall {wall:.1f} s (sampling slows the run a little); samples per thread:", "",
             "| thread | samples | seconds |", "|---|---|---|"]
    lines += [f"| {who} | {n} | {n / RATE:.1f} |" for who, n in per_thread.most_common()]
    for who, total in per_thread.most_common():
        lines += ["", f"## {who}: where its time goes", "", "| function (self: on top of the stack) | self s |", "|---|---|"]
        lines += [f"| `{name}` | {n / RATE:.1f} |" for name, n in self_[who].most_common(args.top)]
        own = [(name, n) for name, n in incl[who].most_common() if "streammerge/" in name and n < 0.9 * total]
        if own:
            lines += ["", "| streammerge function (inclusive: it or what it calls) | inclusive s |", "|---|---|"]
            lines += [f"| `{name}` | {n / RATE:.1f} |" for name, n in own[: args.top]]
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = args.results / f"{stamp}-profile-{models.name}-{args.method}.md"
    path.write_text(report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
