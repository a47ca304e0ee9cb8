#!/usr/bin/env python
"""Make an FP8 copy of a model folder, as DeepSeek-V3 / Qwen3-FP8 releases are stored, for benchmarks.

    python bench/make_fp8.py bench/models/qwen2-0.5b/base bench/models/qwen2-0.5b-fp8/base

Every projection weight (``*_proj.weight``, 2-D) becomes ``F8_E4M3`` codes with a float32 ``weight_scale_inv`` per
128×128 block (amax scaling: each block's largest magnitude maps to 448, the largest E4M3 value); everything else
is copied as stored, and config.json gets the ``quantization_config`` those releases declare. The copy is held in
memory until it is written (about half the bf16 model).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

BLOCK = 128
E4M3_MAX = 448.0


def quantize_blocks(w, block: int = BLOCK):  # type: ignore[no-untyped-def]
    """FP8 (E4M3) codes of the 2-D tensor ``w`` and its float32 scale grid [⌈out/block⌉, ⌈in/block⌉]."""
    import torch

    w = w.float()
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[: w.shape[0], : w.shape[1]] = w
    scale = padded.reshape(rows, block, cols, block).abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    full = scale.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
    return (w / full).to(torch.float8_e4m3fn), scale


def quantized_config(config: dict) -> dict:
    return {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [BLOCK, BLOCK]}}


def convert(src: Path, dst: Path) -> int:
    """Write the FP8 copy of ``src`` (one ``model.safetensors``) to ``dst``; returns the number of FP8 weights."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=False)
    tensors, count = {}, 0
    with safe_open(src / "model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if name.endswith("_proj.weight") and t.dim() == 2:
                tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(t)
                count += 1
            else:
                tensors[name] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    for side in src.iterdir():
        if side.is_file() and side.name not in ("model.safetensors", "config.json"):
            shutil.copy2(side, dst / side.name)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(quantized_config(config), indent=2))
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a model folder with one model.safetensors")
    ap.add_argument("dst", type=Path, help="the FP8 copy (must not exist)")
    args = ap.parse_args(argv)
    if args.dst.exists():
        print(f"make_fp8: {args.dst} exists", file=sys.stderr)
        return 2
    print(f"{args.dst}: {convert(args.src, args.dst)} FP8 weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
