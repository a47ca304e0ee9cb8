#!/usr/bin/env python
"""What a fresh page of memory costs on this machine: the cost under every merge's output writes.

    python bench/page_cost.py [--size 1GiB] [--idle 6] [--folder bench/work]

A merge writes its output through the page cache: each new page of the output file is a page of memory the kernel
hands out. On bare metal that costs little (the copy). In a virtual machine whose memory balloon has *free page
reporting* (virtio-balloon feature 5), pages the guest freed are handed back to the host within seconds, and the
first touch of each one afterwards is a fault in the hypervisor: a write into a new file then costs several times
an overwrite, on the writing thread's CPU. This measures, in one run:

1. a new file of ``--size``, written in 16 MiB ``pwrite`` calls after ``--idle`` seconds of nothing (the freed
   pages have been reported);
2. the same file overwritten (its pages are already there);
3. a new file written right after the first one was deleted (its pages were just freed, not yet reported).

It prints wall and CPU seconds per GiB and whether the balloon reports free pages, and writes
``bench/results/<UTC timestamp>-page-cost.{json,md}``. Figures elsewhere in bench/ that write an output include
cost 1 for every new page of it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CHUNK = 16 << 20
BALLOON_DEVICE_ID = 0x0005  # virtio device id of a memory balloon
FREE_PAGE_REPORTING_BIT = 5  # VIRTIO_BALLOON_F_REPORTING


def free_page_reporting() -> str:
    """``yes``/``no`` from the virtio balloon's negotiated features, or ``no balloon`` (bare metal, other VMs)."""
    for dev in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            if int((dev / "device").read_text(), 16) != BALLOON_DEVICE_ID:
                continue
            features = (dev / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        return "yes" if len(features) > FREE_PAGE_REPORTING_BIT and features[FREE_PAGE_REPORTING_BIT] == "1" else "no"
    return "no balloon"


def timed_write(path: Path, size: int, data: bytes, create: bool) -> tuple[float, float]:
    """Write ``size`` bytes into ``path`` (a new file when ``create``); wall and CPU seconds."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o644)
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        for at in range(0, size, CHUNK):
            os.pwrite(fd, data[: min(CHUNK, size - at)], at)
        return time.perf_counter() - wall, time.thread_time() - cpu
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="file size (MiB or GiB suffix)")
    ap.add_argument("--idle", type=float, default=6.0, help="seconds to wait before the first write")
    ap.add_argument("--folder", type=Path, default=BENCH / "work")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args()
    units = {"MiB": 1 << 20, "GiB": 1 << 30}
    size = int(float(args.size[:-3]) * units[args.size[-3:]]) if args.size[-3:] in units else int(args.size)
    gib = size / (1 << 30)
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / "page-cost.bin"
    data = os.urandom(CHUNK)
    path.unlink(missing_ok=True)
    time.sleep(args.idle)
    rows = [("new file, after idling", *timed_write(path, size, data, create=True))]
    rows.append(("the same file overwritten", *timed_write(path, size, data, create=False)))
    path.unlink()
    rows.append(("new file, pages just freed", *timed_write(path, size, data, create=True)))
    path.unlink()
    reporting = free_page_reporting()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    lines = [f"# Page cost ({stamp})", "",
             f"- {args.size} written in 16 MiB pwrite calls to {args.folder}; idle {args.idle:g} s before the first "
             f"write; {os.cpu_count()} CPUs; balloon free page reporting: {reporting}", "",
             "| write | wall s | CPU s | CPU s per GiB |", "|---|---|---|---|"]
    lines += [f"| {name} | {wall:.2f} | {cpu:.2f} | {cpu / gib:.2f} |" for name, wall, cpu in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stamp}-page-cost.md").write_text(report)
    (args.results / f"{stamp}-page-cost.json").write_text(json.dumps(
        {"size": size, "idle": args.idle, "free_page_reporting": reporting,
         "rows": [{"write": n, "wall_s": w, "cpu_s": c} for n, w, c in rows]}, indent=1))


if __name__ == "__main__":
    main()
