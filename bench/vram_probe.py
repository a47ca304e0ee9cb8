#!/usr/bin/env python
"""GPU memory per tensor: what torch's allocator measured against what the plan predicted, for every method.

    python bench/vram_probe.py [--results bench/results]          # needs CUDA; about a minute on an H100

For two synthetic families (``tiny``, and ``mid``: one Qwen2-0.5B-wide layer with a 32000-token vocabulary), each
method is planned and merged with ``--device cuda`` under a few ``--max-vram`` budgets (and the default). Every
tensor's peak (``torch.cuda.max_memory_allocated`` around the engine's ``run_tensor``, CUDA context excluded) is
recorded; the worst tensor is compared with the plan's ``peak_vram``. The plan keeps ``peak_vram`` under
``VRAM_USABLE`` (0.85) of the budget, so a measured/planned ratio up to 1/0.85 = 1.18 still stays within
``--max-vram``. Writes ``<UTC timestamp>-vram-probe.{json,md}`` under --results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import streammerge.execute as execute  # noqa: E402
from streammerge import api  # noqa: E402
from streammerge.errors import StreamMergeError  # noqa: E402
from streammerge.examples import Shape, write_family  # noqa: E402
from streammerge.planner import VRAM_USABLE  # noqa: E402

METHODS: dict[str, dict[str, str]] = {
    "widen": {}, "task_arithmetic": {"weight": "0.7,0.4"}, "ties": {"density": "0.5"},
    "dare_ties": {"density": "0.6", "seed": "3"}, "breadcrumbs": {"density": "0.6", "gamma": "0.05"},
    "model_stock": {}, "linear": {}, "slerp": {},
}
FAMILIES: dict[str, tuple[str | Shape, list[str | None]]] = {
    "tiny": ("tiny", ["1MiB", "2MiB"]),
    "mid": (Shape(896, 4864, 1, 14, 2, 32000, tied=False), ["64MiB", None]),
}


def measure(root: Path) -> list[dict]:
    """Plan and merge every (family, method, budget); the per-tensor GPU peaks of each run."""
    per_tensor: list[dict] = []
    run_tensor = execute.run_tensor

    def recorded(plan, job, io):  # type: ignore[no-untyped-def]
        t = job.tensor
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_tensor(plan, job, io)
        torch.cuda.synchronize()
        per_tensor.append({"name": t.name, "rule": t.rule.name, "rows": t.rows, "chunk_rows": t.chunk_rows,
                           "state_bytes": t.state_bytes, "peak": torch.cuda.max_memory_allocated() - before})

    execute.run_tensor = recorded
    rows = []
    try:
        for fam_name, (shape, budgets) in FAMILIES.items():
            fam = write_family(root / fam_name, shape, dtype="bf16")
            for method, params in METHODS.items():
                models = [fam["chat"]] if method == "slerp" else [fam["chat"], fam["multilingual"]]
                for budget in budgets:
                    out = root / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    per_tensor.clear()
                    row = {"family": fam_name, "method": method, "max_vram": budget}
                    try:
                        p = api.plan(fam["base"], models, out, method, params, device="cuda", max_vram=budget)
                    except StreamMergeError as exc:
                        rows.append({**row, "error": str(exc)})
                        print(f"{fam_name:5} {method:16} {budget or 'default':8} {exc}", flush=True)
                        continue
                    api.merge(fam["base"], models, out, method, params, device="cuda", max_vram=budget)
                    worst = max(per_tensor, key=lambda r: r["peak"])
                    row.update(max_vram_bytes=p.budget.max_vram, planned=p.peak_vram, measured=worst["peak"],
                               ratio=round(worst["peak"] / p.peak_vram, 3), worst=worst, tensors=per_tensor[:])
                    rows.append(row)
                    print(f"{fam_name:5} {method:16} {budget or 'default':8} planned {p.peak_vram:>11,} measured "
                          f"{worst['peak']:>11,} ratio {row['ratio']:.3f} ({worst['name']}, chunk "
                          f"{worst['chunk_rows']}/{worst['rows']})", flush=True)
    finally:
        execute.run_tensor = run_tensor
    return rows


def render(result: dict) -> str:
    L = [f"# GPU memory per tensor vs the plan ({result['started_utc']})", "",
         f"- device: {result['device']}, torch {result['torch']}, git {result.get('git', '?')}",
         f"- measured: the largest per-tensor peak of `torch.cuda.max_memory_allocated` (CUDA context excluded); "
         f"planned: the plan's `peak_vram`, kept under {VRAM_USABLE} of --max-vram, so a ratio up to "
         f"{1 / VRAM_USABLE:.2f} is still within the budget", "",
         "| family | method | --max-vram | planned | measured | measured/planned | within --max-vram | worst tensor |",
         "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            L.append(f"| {r['family']} | {r['method']} | {r['max_vram'] or 'default'} | - | - | - | refused | "
                     f"{r['error'][:80]} |")
            continue
        within = r["measured"] <= r["max_vram_bytes"]
        w = r["worst"]
        L.append(f"| {r['family']} | {r['method']} | {r['max_vram'] or 'default'} | {r['planned']:,} | "
                 f"{r['measured']:,} | {r['ratio']} | {'yes' if within else '**no**'} | {w['name']} "
                 f"({w['chunk_rows']}/{w['rows']} rows) |")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--render", type=Path, help="only re-render the Markdown of an earlier JSON result")
    args = ap.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(result))
        return 0
    if not torch.cuda.is_available():
        print("vram_probe: no CUDA device", file=sys.stderr)
        return 2
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp))
    result = {"started_utc": started, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"{started}-vram-probe"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0 if all("error" in r or r["measured"] <= r["max_vram_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
