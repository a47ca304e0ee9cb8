#!/usr/bin/env python
"""A scaling model for one merge split into parts (``--part K/N`` or ``--executor ray``): wall time on n nodes.

    python bench/scaling_model.py                      # the 671B table and the checks against measured runs
    python bench/scaling_model.py --check bench/results/<...>-distributed-qwen2-0.5b.json

The model. A merge reads R bytes of inputs and writes W bytes of output, in F output files; part k (one per node)
owns a set of whole files, so the largest part moves a share s(n) of the bytes (with F files of about the same
size, the best split gives s(n) = ceil(F / n) / F; bench/distributed.py prints the real shares of its runs).
A node reads at B_r and writes at B_w bytes/s (its disk, or its link to the shared storage), merges at C input
bytes/s when I/O is free (reads, compute and writes overlap in streammerge), and the shared storage serves S
bytes/s to all nodes together:

    part time    T_k = max(s·R / B_r + s·W / B_w + s·W / B_r,   s·R / C)      (the last term of the I/O: the part
                                                                              reads its output back to check it)
    storage time T_S = (R + 2·W) / S
    wall    T(n) = t_start + max(T_k, T_S) + t_finalize

and one process without parts: T = t_start + max(R / B_r + W / B_w, R / C) (no read-back, no finalize; the I/O
floor as bench/run.py measures it). ``finalize`` re-reads nothing its parts checked: t_finalize is a process start
plus reading the inputs' headers and writing the side files.

The checks run the model on measured single-machine figures (bench/results/) and print predicted against measured.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Node:
    """One node: read and write bandwidth (bytes/s) to where the files are, and merge rate (input bytes/s)."""

    read: float
    write: float
    compute: float


def share(files: int, n: int) -> float:
    """The largest part's share of the bytes with ``files`` files of about the same size split over ``n`` parts."""
    return math.ceil(files / n) / files


def wall(r: float, w: float, files: int, n: int, node: Node, storage: float, t_start: float, t_final: float,
         largest: float | None = None) -> float:
    """Predicted seconds for ``n`` parts on ``n`` nodes (``n`` = 0: one process, no parts); ``largest``: the
    largest part's share when known."""
    if n == 0:
        return t_start + max(r / node.read + w / node.write, r / node.compute, (r + w) / storage)
    s = largest if largest is not None else share(files, n)
    part = max(s * r / node.read + s * w / node.write + s * w / node.read, s * r / node.compute)
    return t_start + max(part, (r + 2 * w) / storage) + t_final


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 600 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------- 671B, 3 models

#: DeepSeek-V3 (671B, 685B with its MTP module) as released: FP8 weights with block scales, about 688 GB per model;
#: merged output dequantized to bfloat16 (2 bytes per parameter), in 5 GB files
R_671B = 3 * 688 * GB
W_671B = 685e9 * 2
FILES_671B = math.ceil(W_671B / 5e9)

#: cluster configurations (assumed bandwidths; the compute rate is the measured lower bound below)
CONFIGS = {
    "10 GbE nodes, NFS server 5 GB/s": (Node(1.1 * GB, 1.1 * GB, 1.2 * GB), 5 * GB),
    "25 GbE nodes, parallel FS 20 GB/s": (Node(2.8 * GB, 2.8 * GB, 1.2 * GB), 20 * GB),
    "100 Gb IB nodes, parallel FS 100 GB/s": (Node(10 * GB, 8 * GB, 1.2 * GB), 100 * GB),
}


def table_671b(t_start: float, t_final: float) -> list[str]:
    lines = [f"Predicted wall for a three-model merge of DeepSeek-V3-sized checkpoints (R = {R_671B / 1e12:.2f} TB "
             f"read, W = {W_671B / 1e12:.2f} TB written in {FILES_671B} files; compute 1.2 GB/s of input per node, "
             f"the measured GPU-node lower bound):", "",
             "| configuration | 1 process | 1 node (1 part) | 4 nodes | 16 nodes | 16 nodes, bound by |",
             "|---|---|---|---|---|---|"]
    for name, (node, storage) in CONFIGS.items():
        cells = [wall(R_671B, W_671B, FILES_671B, n, node, storage, t_start, t_final) for n in (0, 1, 4, 16)]
        s = share(FILES_671B, 16)
        part = max(s * R_671B / node.read + s * W_671B / node.write + s * W_671B / node.read,
                   s * R_671B / node.compute)
        bound = "shared storage" if (R_671B + 2 * W_671B) / storage > part else (
            "compute" if s * R_671B / node.compute >= part else "node I/O")
        lines.append(f"| {name} | " + " | ".join(minutes(c) for c in cells) + f" | {bound} |")
    return lines


# ----------------------------------------------------------------------------------------- measured checks


def check_single() -> list[str]:
    """One process on the measured machines (task_arithmetic: one pass; bench/results/, cold cache)."""
    rows = [
        # (what, R, W, read B/s, write B/s, start s, measured wall s, source)
        ("H100 node, Qwen1.5-14B-8layers shape", 24_475_057_320, 7.60 * 2**30, 1619.5e6, 1320.9e6, 5.17, 25.82,
         "20261123T041419Z-qwen1.5-14b-8layers-h100.md"),
        ("2-core VM, Qwen2-1.5B shape", 9_262_400_808, 2.88 * 2**30, 398.5e6, 309.2e6, 3.85, 28.67,
         "20261123T033818Z-qwen2-1.5b.md"),
    ]
    lines = ["| measured run (one process, task_arithmetic) | predicted s | measured s | error |", "|---|---|---|---|"]
    for what, r, w, br, bw, start, measured, source in rows:
        # compute assumed not to bind (both runs are I/O-bound: wall close to the floor)
        predicted = wall(r, w, 1, 0, Node(br, bw, float("inf")), float("inf"), start, 0.0)
        lines.append(f"| {what} (`{source}`) | {predicted:.1f} | {measured:.1f} | "
                     f"{(predicted - measured) / measured:+.0%} |")
    return lines


def check_distributed(path: Path) -> list[str]:
    """N parts on one machine with throttled reads (bench/distributed.py): the model with B_r = the throttle, the
    compute rate and start time of the unthrottled one-part run, shared by the parts (cores / N each)."""
    d = json.loads(path.read_text())
    base = d["baseline"]
    r = d["input_bytes"]
    elapsed = base["part_walls"][0]
    t_start = base["parts_wall"] - elapsed
    compute1 = r / elapsed  # one part, inputs in the page cache: compute-bound (and one thread)
    cores = d["cpus"]
    lines = [f"`{path.name}`: {d['shards']} files, throttle {d['read_rate'] / 1e6:.0f} MB/s per part, compute "
             f"{compute1 / 1e6:.0f} MB/s per part (unthrottled run), start {t_start:.1f} s, {cores} cores", "",
             "| N | predicted s | measured s | error |", "|---|---|---|---|"]
    for row in d["rows"]:
        n = row["parts"]
        node = Node(d["read_rate"], float("inf"), compute1 * min(1.0, cores / n))
        # the read-back check comes from the page cache here: not throttled (B_r for it is the cache)
        s = row["largest_share"]
        part = max(s * r / node.read, s * r / node.compute)
        predicted = t_start + part + row["finalize_wall"]
        lines.append(f"| {n} | {predicted:.1f} | {row['total_wall']:.1f} | "
                     f"{(predicted - row['total_wall']) / row['total_wall']:+.0%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", type=Path, default=None,
                    help="a bench/distributed.py result (JSON); default: the latest in bench/results")
    ap.add_argument("--start", type=float, default=10.0, help="process start and planning on a node, s")
    ap.add_argument("--finalize", type=float, default=30.0, help="finalize of the 671B merge, s")
    args = ap.parse_args()
    lines = ["## Scaling model", "", *table_671b(args.start, args.finalize), "",
             "Checked against measured single-machine runs:", "", *check_single(), ""]
    found = args.check or max(RESULTS.glob("*-distributed-*.json"), default=None)
    if found is not None:
        lines += [*check_distributed(found), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
