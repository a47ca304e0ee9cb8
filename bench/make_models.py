#!/usr/bin/env python
"""Generate a synthetic model family (base + chat + multilingual) for benchmarks.

    python bench/make_models.py --shape qwen2-0.5b --dtype bf16 --out bench/models/qwen2-0.5b

Uses :func:`streammerge.examples.write_family` (deterministic, chunk by chunk, little RAM). A marker file
(``.complete.json``) is written last; if it exists with the same shape/dtype/seed the family is not regenerated.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

MARKER = ".complete.json"


def folder_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    from streammerge.examples import SHAPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model dimensions (default tiny)")
    ap.add_argument("--dtype", default="bf16", help="stored dtype: bf16, f16, f32 (default bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/models/<shape>)")
    ap.add_argument("--force", action="store_true", help="regenerate even if complete")
    ap.add_argument("--jobs", type=int, default=1,
                    help="models written at once, one process each (the same bytes; default 1: little RAM and CPU)")
    args = ap.parse_args(argv)

    from streammerge.examples import write_family

    out: Path = args.out or Path(__file__).resolve().parent / "models" / args.shape
    marker = out / MARKER
    want = {"shape": args.shape, "dtype": args.dtype, "seed": args.seed}
    if marker.exists() and not args.force:
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} == want:
            print(f"{out}: already complete ({args.shape}, {args.dtype}, seed {args.seed}); skipping")
            for name, size in have.get("sizes", {}).items():
                print(f"  {name:<13} {human(size)}")
            return 0
        print(f"{out}: marker says {have}, wanted {want}; regenerating", file=sys.stderr)
    if out.exists():
        # Incomplete or different family: start clean so no stale shards remain.
        shutil.rmtree(out)
    out.mkdir(parents=True)

    t0 = time.perf_counter()
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        from streammerge.examples import DEFAULT_VARIANTS, SHAPES, write_model

        jobs = [("base", 0.0), *DEFAULT_VARIANTS]
        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            done = [pool.submit(write_model, out / name, SHAPES[args.shape], args.seed, delta, args.dtype)
                    for name, delta in jobs]
            paths = {name: f.result() for (name, _), f in zip(jobs, done)}
    else:
        paths = write_family(out, args.shape, seed=args.seed, dtype=args.dtype)
    elapsed = time.perf_counter() - t0
    sizes = {name: folder_size(p) for name, p in paths.items()}
    for name, p in paths.items():
        print(f"  {name:<13} {human(sizes[name]):>12}  {p}")
    total = sum(sizes.values())
    print(f"total {human(total)} in {elapsed:.1f} s ({total / max(elapsed, 1e-9) / 1e6:.0f} MB/s)")
    marker.write_text(json.dumps({**want, "sizes": sizes, "seconds": round(elapsed, 2),
                                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
