#!/usr/bin/env python
"""Benchmark LoRA adapters as streamed inputs against the materialise-then-merge route, cold page cache.

    python bench/lora.py --models bench/models/qwen2-1.5b [--rank 64] [--method widen] [--max-ram 1GiB]

One run:
  (a) two rank-R adapters on ``MODELS/base`` covering every linear layer of every block (q, k, v, o, gate, up, down),
      random A and B in bfloat16, in PEFT's file layout with an ``adapter_config.json``: ``MODELS/lora-1``,
      ``MODELS/lora-2`` (kept when present with the same settings; ``--force`` remakes them);
  (b) the floor: drop caches, read the base and both adapters once, write the output's size once (with fsync);
  (c) streamed: drop caches, ``streammerge merge --base BASE --model BASE+lora-1 --model BASE+lora-2 --method M
      --max-ram X`` under ``/usr/bin/time -v`` (wall, CPU, peak RSS);
  (d) materialised (what mergekit's ``model+lora`` does, and what users do with PEFT): per adapter, drop caches and
      run PEFT's ``merge_and_unload`` + ``save_pretrained`` in a fresh interpreter (the base loaded whole in
      bfloat16); then drop caches and ``streammerge merge`` the two merged models with the same method and budget;
  (e) the interpreter baseline (peak RSS of ``import streammerge.cli, torch``).
Prints a Markdown report; writes ``bench/results/<UTC timestamp>-lora-<shape>.{json,md}``. Needs ``peft`` for (d)
(``--no-materialise`` skips it) and root for dropping the page cache (else the report says it was warm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from run import CacheDropper, human, loadavg, log, measure_floor, rm_out, time_v, tree_size

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")
MATERIALISE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def make_adapter(base: Path, folder: Path, rank: int, alpha: float, seed: int, force: bool) -> Path:
    """A rank-``rank`` LoRA on every linear layer of ``base`` (random factors, bfloat16), PEFT's layout."""
    import torch
    from safetensors.torch import save_file

    from streammerge.formats.checkpoint import load_checkpoint

    settings = {"rank": rank, "alpha": alpha, "seed": seed, "base": str(base.resolve())}
    marker = folder / ".complete.json"
    if not force and marker.is_file() and json.loads(marker.read_text()) == settings:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ckpt = load_checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, loc in ckpt.tensors.items():
        if not name.endswith(".weight") or not any(f".{m}." in name for m in LINEAR):
            continue
        out, cols = loc.info.shape
        module = "base_model.model." + name.removesuffix(".weight")
        # A as PEFT's kaiming init, B as a trained one might be: small, so the delta is a few % of the weight
        tensors[f"{module}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) / cols ** 0.5).bfloat16()
        tensors[f"{module}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 2e-3).bfloat16()
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted({m.split(".")[-1] for m in LINEAR}), "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True, "base_model_name_or_path": str(base.resolve())}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(settings))
    return folder


ENV: dict | None = None  # the environment of the measured steps (--threads)


def measured(label: str, cmd: list[str], out: Path, dropper: CacheDropper, keep: bool = False) -> dict:
    """Drop caches, run ``cmd`` (which writes ``out``) under time -v; ``out`` is deleted after unless ``keep``."""
    rm_out(out)
    row = {"label": label, "cache_dropped": dropper.drop(), "loadavg_before": loadavg()}
    log(f"  {label} (load {row['loadavg_before']})")
    row.update(time_v(cmd, sample=True, env=ENV))
    row["out_bytes_on_disk"] = tree_size(out)
    row["ok"] = row["returncode"] == 0 and out.is_dir()
    if not row["ok"]:
        row["error"] = (row["stderr_tail"] or row["stdout_tail"]).strip()[-2000:]
        log(f"  FAILED: {row['error'][-600:]}")
    else:
        log(f"  wall {row['wall_s']} s, cpu {row['cpu_s']} s, peak RSS {human(row['peak_rss'])}")
    if not keep:
        rm_out(out)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=BENCH / "models" / "qwen2-1.5b")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=128.0)
    ap.add_argument("--method", default="widen")
    ap.add_argument("--max-ram", default="1GiB")
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--no-materialise", action="store_true", help="skip the PEFT route")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--force", action="store_true", help="remake the adapters")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every measured step (default: unset, torch's default)")
    args = ap.parse_args(argv)

    global ENV
    if args.threads:
        ENV = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    python = sys.executable
    sm = [python, "-m", "streammerge"]
    base = args.models / "base"
    args.work.mkdir(parents=True, exist_ok=True)
    dropper = CacheDropper(not args.no_drop_caches)
    log(f"adapters (rank {args.rank}) for {base}")
    adapters = [make_adapter(base, args.models / f"lora-{k}", args.rank, args.alpha, k, args.force) for k in (1, 2)]
    adapter_bytes = [(a / "adapter_model.safetensors").stat().st_size for a in adapters]
    streamed_args = ["merge", "--base", str(base), *[x for a in adapters for x in ("--model", f"{base}+{a}")],
                     "--method", args.method, "--max-ram", args.max_ram]
    plan = _plan(sm, streamed_args)
    base_shards = sorted(base.glob("*.safetensors"))
    report: dict = {"shape": args.models.name, "rank": args.rank, "method": args.method, "max_ram": args.max_ram,
                    "adapter_bytes": adapter_bytes, "base_bytes": sum(p.stat().st_size for p in base_shards),
                    "plan": {k: plan.get(k) for k in ("bytes_read", "bytes_written", "predicted_peak_ram")},
                    "cache": dropper.note or "dropped before every step",
                    "omp_num_threads": args.threads, "nproc": os.cpu_count()}

    log("floor: read the base and both adapters once, write the output once")
    report["floor"] = measure_floor([*base_shards, *(a / "adapter_model.safetensors" for a in adapters)],
                                    plan["bytes_written"], args.work, dropper)
    log(f"  {report['floor']['floor_s']} s")

    out = args.work / "lora-out"
    report["streamed"] = measured("streamed: BASE+lora-1, BASE+lora-2", [*sm, *streamed_args, "--out", str(out),
                                                                          "-q", "--force"], out, dropper)
    if not args.no_materialise:
        steps, merged = [], []
        for k, a in enumerate(adapters, 1):
            folder = args.work / f"materialised-{k}"
            steps.append(measured(f"PEFT merge_and_unload + save_pretrained of lora-{k}",
                                  [python, "-c", MATERIALISE, str(base), str(a), str(folder)], folder, dropper,
                                  keep=True))
            merged.append(folder)
        out2 = args.work / "materialised-out"
        steps.append(measured("merge of the materialised models",
                              [*sm, "merge", "--base", str(base), *[x for m in merged for x in ("--model", str(m))],
                               "--method", args.method, "--max-ram", args.max_ram, "--out", str(out2), "-q",
                               "--force"], out2, dropper))
        report["materialised"] = {"steps": steps, "wall_s": round(sum(s["wall_s"] or 0 for s in steps), 2),
                                  "peak_rss": max(s["peak_rss"] or 0 for s in steps),
                                  "disk_written": sum(s["out_bytes_on_disk"] for s in steps[:-1])}
        for folder in merged:
            shutil.rmtree(folder, ignore_errors=True)
    report["baseline"] = time_v([python, "-c", "import streammerge.cli, torch"])

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = BENCH / "results"
    (results / f"{stamp}-lora-{args.models.name}.json").write_text(json.dumps(report, indent=2, default=str))
    md = render(report)
    (results / f"{stamp}-lora-{args.models.name}.md").write_text(md)
    print(md)
    return 0 if report["streamed"]["ok"] and all(s["ok"] for s in report.get("materialised", {}).get("steps", [])) \
        else 1


def _plan(sm: list[str], merge_args: list[str]) -> dict:
    """``streammerge plan --json`` of the streamed merge (reads headers only)."""
    out = subprocess.run([*sm, "plan", *merge_args[1:], "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def render(r: dict) -> str:
    floor = r["floor"]["floor_s"]
    base_rss = r["baseline"]["peak_rss"] or 0
    s = r["streamed"]
    lines = [
        f"# LoRA inputs, {r['shape']} shape: two rank-{r['rank']} adapters on every linear layer, {r['method']}, "
        f"--max-ram {r['max_ram']}",
        "",
        f"Inputs: base {human(r['base_bytes'])}, adapters {', '.join(human(b) for b in r['adapter_bytes'])}; "
        f"output {human(r['plan']['bytes_written'])}. Page cache: {r['cache']}. Floor (read the base and both "
        f"adapters once, write the output once): {floor} s ({r['floor']['read_MBps']} MB/s read, "
        f"{r['floor']['write_MBps']} MB/s write). Interpreter baseline RSS {human(base_rss)}. {r['nproc']} CPUs, "
        f"OMP_NUM_THREADS {r['omp_num_threads'] or 'unset'}; 1-minute load before each step: "
        + ", ".join(str((st.get('loadavg_before') or ['?'])[0]) for st in [s, *((r.get('materialised') or {})
                                                                            .get('steps', []))]) + ".",
        "",
        "| route | wall s | wall / floor | CPU s | peak RSS | peak RSS − baseline | written to disk |",
        "|---|---|---|---|---|---|---|",
        f"| streamed (`--model BASE+lora-k`) | {s['wall_s']} | {s['wall_s'] / floor:.2f} | {s['cpu_s']} | "
        f"{human(s['peak_rss'])} | {human((s['peak_rss'] or 0) - base_rss)} | {human(s['out_bytes_on_disk'])} |",
    ]
    m = r.get("materialised")
    if m:
        for step in m["steps"]:
            lines.append(f"| · {step['label']} | {step['wall_s']} | | {step['cpu_s']} | {human(step['peak_rss'])} | | "
                         f"{human(step['out_bytes_on_disk'])} |")
        lines.append(f"| materialise, then merge (total) | {m['wall_s']} | {m['wall_s'] / floor:.2f} | | "
                     f"{human(m['peak_rss'])} | | {human(m['disk_written'])} of copies + the output |")
    lines += ["", f"Predicted peak for buffers (streamed plan): {human(r['plan']['predicted_peak_ram'])}; bytes read "
              f"(every pass, the factors read whole with each chunk included): {human(r['plan']['bytes_read'])}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
