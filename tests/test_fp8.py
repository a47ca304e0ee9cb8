"""FP8 checkpoints are dequantized on the fly (codes × their block, channel or tensor scales, in float32), merged,
and written as bfloat16 (or --dtype) without the quantization_config; a merge equals a dense
dequantize-then-merge reference for every chunking. Other quantized formats are refused before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_matches
from reference_baselines import reference_merge
from reference_widen import widen_reference
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.cli import main
from streammerge.examples import write_family
from streammerge.formats.checkpoint import load_checkpoint
from streammerge.quantization import dequantization

#: every merge here reads FP8, and says so (a MergeNotice); the notes' text is checked through the plan
pytestmark = pytest.mark.filterwarnings("ignore::streammerge.execute.MergeNotice")

BLOCK = [32, 32]  # the tiny model's 48- and 112-wide weights make ragged edge blocks
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _is_linear(name: str) -> bool:
    return name.endswith("_proj.weight")


def quantize(w: torch.Tensor, scheme: str, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes and scales of ``w`` [out, in] (amax scaling, as FP8 releases are made)."""
    w = w.float()
    out, cols = w.shape
    if scheme == "tensor":
        scale = w.abs().max().reshape(1) / FP8_MAX[dtype]
        return (w / scale).to(dtype), scale
    if scheme == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX[dtype]
        return (w / scale).to(dtype), scale
    br, bc = BLOCK
    grid = torch.zeros(-(-out // br), -(-cols // bc))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            grid[i, j] = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].abs().max() / FP8_MAX[dtype]
    return (w / expand(grid, out, cols)).to(dtype), grid


def expand(scale: torch.Tensor, out: int, cols: int) -> torch.Tensor:
    """A scale grid (or [out, 1] / [1]) broadcast to [out, cols] by repeating each entry over its block."""
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(out, cols)
    if scale.shape == (out, 1):
        return scale.expand(out, cols)
    br, bc = BLOCK
    return scale.repeat_interleave(br, dim=0)[:out].repeat_interleave(bc, dim=1)[:, :cols]


def dense(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's values in float32: FP8 codes times their expanded scales (an independent dequantizer)."""
    ts = load_file(folder / "model.safetensors")
    out = {}
    for name, t in ts.items():
        if name.endswith(("_scale", "_scale_inv")):
            continue
        if t.dtype in FP8_MAX:
            scale = ts.get(name + "_scale_inv", ts.get(name + "_scale"))
            out[name] = t.float() * expand(scale.float(), *t.shape)
        else:
            out[name] = t.float()
    return out


def make_fp8(src: Path, dst: Path, scheme: str = "block", dtype=torch.float8_e4m3fn,
             scale_dtype=torch.float32, extras: bool = False) -> Path:
    """A copy of ``src`` whose linear weights are FP8, with the config of the release format that scheme comes in."""
    shutil.copytree(src, dst)
    ts = load_file(src / "model.safetensors")
    out = {}
    for name, t in ts.items():
        if not _is_linear(name):
            out[name] = t
            continue
        codes, scale = quantize(t, scheme, dtype)
        suffix = "_scale_inv" if scheme == "block" else "_scale"
        out[name], out[name + suffix] = codes, scale.to(scale_dtype)
        if extras:  # static activation scales and a KV-cache scale: only quantized inference uses them
            out[name.removesuffix(".weight") + ".input_scale"] = torch.ones(1)
            if name.endswith("k_proj.weight"):
                out[name.removesuffix("k_proj.weight") + "k_scale"] = torch.ones(())
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK},
        "channel": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0},
        "tensor": {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}},
    }[scheme]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8")
    fam = write_family(root / "bf16", "tiny-llama")
    fam["base-fp8"] = make_fp8(fam["base"], root / "base-fp8")
    fam["chat-fp8"] = make_fp8(fam["chat"], root / "chat-fp8")
    fam["multilingual-fp8"] = make_fp8(fam["multilingual"], root / "multilingual-fp8")
    return fam


def _reference(method: str, base: dict, models: list[dict], params: dict) -> dict[str, torch.Tensor]:
    if method == "widen":
        return widen_reference(base, models, **params)
    return reference_merge(method, base, models, params)


CASES = {"fp8-base": ("base-fp8", "chat", "multilingual"), "fp8-models": ("base", "chat-fp8", "multilingual-fp8"),
         "all-fp8": ("base-fp8", "chat-fp8", "multilingual-fp8")}


@pytest.mark.parametrize("method,params", [("widen", {}), ("ties", {"density": 0.5}), ("linear", {})],
                         ids=["widen", "ties", "linear"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp8_inputs_merge_like_a_dense_dequantize_then_merge(family, tmp_path, case, method, params):
    names = CASES[case]
    base, *models = (family[n] for n in names)
    want = _reference(method, dense(base), [dense(m) for m in models], params)
    outs = []
    for k, chunk in enumerate((None, 5)):  # 5 rows: chunks start inside scale blocks
        out = tmp_path / f"out{k}"
        api.merge(base, models, out, method=method, params=params, dtype="F32", chunk_rows=chunk)
        outs.append(load_file(out / "model.safetensors"))
    assert set(outs[0]) == set(want), "scales and other quantization tensors are not part of the output"
    assert_matches(outs[0], want, atol=2e-6)
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in want), "chunking changed the bytes"


def test_fp8_output_is_bfloat16_without_quantization_config(family, tmp_path):
    out = api.merge(family["base-fp8"], [family["chat-fp8"], family["multilingual-fp8"]], tmp_path / "out",
                    method="linear")
    merged = load_file(out / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    want = reference_merge("linear", dense(family["base-fp8"]),
                           [dense(family["chat-fp8"]), dense(family["multilingual-fp8"])], {})
    assert all(torch.equal(merged[n], want[n].to(torch.bfloat16)) for n in want)


@pytest.mark.parametrize("scheme,dtype,scale_dtype", [
    ("channel", torch.float8_e4m3fn, torch.float32),
    ("tensor", torch.float8_e5m2, torch.bfloat16),
    ("block", torch.float8_e4m3fn, torch.bfloat16),
], ids=["per-channel-e4m3", "per-tensor-e5m2-bf16-scales", "block-bf16-scales"])
def test_every_fp8_scale_scheme_matches_its_dense_dequantization(family, tmp_path, scheme, dtype, scale_dtype):
    base = make_fp8(family["base"], tmp_path / "base", scheme, dtype, scale_dtype, extras=True)
    chat = make_fp8(family["chat"], tmp_path / "chat", scheme, dtype, scale_dtype, extras=True)
    d = dequantization(load_checkpoint(base))
    assert {s.scheme for s in d.sources.values()} == {scheme}
    assert any(n.endswith("input_scale") for n in d.dropped) and any(n.endswith("k_scale") for n in d.dropped)
    out = api.merge(base, [chat, family["multilingual"]], tmp_path / "out", method="task_arithmetic", dtype="F32",
                    chunk_rows=7)
    want = reference_merge("task_arithmetic", dense(base), [dense(chat), dense(family["multilingual"])], {})
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(want)  # no input_scale, k_scale or weight scales
    assert_matches(merged, want, atol=2e-6)


def test_the_plan_names_the_fp8_scheme_and_budgets_the_scales(family):
    r = CliRunner().invoke(main, ["plan", "--base", str(family["base-fp8"]), "--model", str(family["chat"]),
                                  "--model", str(family["multilingual"]), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    down = next(t for t in doc["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight")
    assert down["dtype"] == "BF16"
    assert down["inputs"][0] == {"kind": "fp8", "model": "base-fp8", "file": "model.safetensors",
                                 "tensor": "model.layers.0.mlp.down_proj.weight", "dtype": "F8_E4M3",
                                 "scales": "model.layers.0.mlp.down_proj.weight_scale_inv", "scale_dtype": "F32",
                                 "scheme": "block", "block": BLOCK}
    assert down["inputs"][1]["kind"] == "stored"
    assert any("dequantized on the fly" in n and "the base" in n for n in doc["notes"])
    # the slot holds, for any chunk of the planned size wherever it starts, the codes and the scale rows it spans
    plan = api.plan(family["base-fp8"], [family["chat"], family["multilingual"]], chunk_rows=5)
    for t in plan.tensors:
        for src in t.sources:
            for r0 in range(0, t.rows):
                need = sum(-(-r.length // 64) * 64 for r in src.ranges(r0, min(r0 + t.chunk_rows, t.rows)))
                assert need <= src.slot_bytes(t.chunk_rows), (t.name, r0)


def test_inspect_says_fp8_is_dequantized(family):
    r = CliRunner().invoke(main, ["inspect", str(family["base-fp8"]), str(family["chat"])])
    assert r.exit_code == 0, r.output
    assert "can be merged as they are" in r.output and "dequantized on the fly" in r.output
    assert "weight_scale_inv" not in r.output  # the scales are not "tensors the model lacks"


def _edit(folder: Path, tmp: Path, tensors=None, quantization_config=None) -> Path:
    dst = tmp / "edited"
    shutil.copytree(folder, dst)
    if tensors:
        ts = load_file(folder / "model.safetensors")
        save_file(tensors(ts), dst / "model.safetensors", metadata={"format": "pt"})
    if quantization_config:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(config))
    return dst


W = "model.layers.0.mlp.up_proj.weight"
REFUSED = {
    "gptq": (dict(quantization_config={"quant_method": "gptq", "bits": 4}), ["quant_method 'gptq'"]),
    "awq": (dict(quantization_config={"quant_method": "awq", "bits": 4}), ["quant_method 'awq'"]),
    "bitsandbytes-4bit": (dict(tensors=lambda ts: {**ts, W + ".absmax": torch.ones(4)}), [W + ".absmax"]),
    "mxfp4": (dict(quantization_config={"quant_method": "mxfp4"},
                   tensors=lambda ts: {**ts, "model.layers.0.mlp.experts.gate_up_proj_blocks":
                                       torch.zeros(2, 4, dtype=torch.uint8)}), ["quant_method 'mxfp4'"]),
    "int8-compressed-tensors": (dict(quantization_config={"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "int"}}}}), ["8-bit int, not FP8"]),
    "fp8-without-scales": (dict(tensors=lambda ts: {**ts, W: ts[W].float().to(torch.float8_e4m3fn)}),
                           [W, "F8_E4M3", "no scale tensor"]),
    "fp8-with-e8m0-scales": (dict(tensors=lambda ts: {**ts, W: ts[W].float().to(torch.float8_e4m3fn),
                                                      W + "_scale": torch.ones(112, 2).to(torch.float8_e8m0fnu)}),
                             ["F8_E8M0"]),
    "fp8-scales-of-no-scheme": (dict(tensors=lambda ts: {**ts, W: ts[W].float().to(torch.float8_e4m3fn),
                                                         W + "_scale_inv": torch.ones(3, 3)}),
                                [W + "_scale_inv", "[3, 3]", "fits no FP8 scheme"]),
    "int8-weight-with-scales": (dict(tensors=lambda ts: {**ts, W: ts[W].to(torch.int8), W + "_scale": torch.ones(1)}),
                                [W + "_scale", "I8", "not FP8"]),
    "3d-fp8": (dict(tensors=lambda ts: {**ts, "model.experts": torch.zeros(2, 4, 4).to(torch.float8_e4m3fn),
                                        "model.experts_scale": torch.ones(1)}), ["3-D FP8"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_formats_not_dequantized_are_refused_before_anything_is_written(family, tmp_path, case):
    edit, expected = REFUSED[case]
    model = _edit(family["chat"], tmp_path, **edit)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", "--base", str(family["base"]), "--model", str(model), "--model",
                                  str(family["multilingual"]), "--out", str(out)])
    assert r.exit_code != 0
    for text in ["model 1", str(model), "does not dequantize", "Dequantize it first", *expected]:
        assert text in r.output, (text, r.output)
    assert not out.exists() and not out.with_name("out.streammerge-partial").exists()
    r = CliRunner().invoke(main, ["inspect", str(family["base"]), str(model)])
    assert r.exit_code == 1 and "[blocks] model 1 (" in r.output and "quantized" in r.output
    assert expected[-1] in r.output


def test_inspect_of_one_folder_names_its_quantization(family, tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(family["base-fp8"])])
    assert "quantized   FP8 (F8_E4M3 with 32×32 block scales, quant_method 'fp8')" in r.output, r.output
    gptq = _edit(family["chat"], tmp_path, quantization_config={"quant_method": "gptq"})
    assert "not dequantized: its config.json declares a quantization_config with quant_method 'gptq'" in \
        CliRunner().invoke(main, ["inspect", str(gptq)]).output
    assert "quantized" not in CliRunner().invoke(main, ["inspect", str(family["base"])]).output


def test_a_block_size_the_scales_do_not_fit_is_said(tmp_path):
    """The scales' shape decides; a config.json whose weight_block_size does not fit them gets a note, not silence."""
    w = "model.layers.0.mlp.up_proj.weight"
    save_file({w: torch.zeros(256, 200).to(torch.float8_e4m3fn), w + "_scale_inv": torch.ones(2, 2)},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [64, 64]}}))
    d = dequantization(load_checkpoint(tmp_path))
    assert d.sources[w].block == (128, 128)
    assert "block size [64, 64] does not fit the scales of 1 weight(s)" in d.description
