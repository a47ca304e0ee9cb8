"""The ``streammerge`` command line, driven through click's CliRunner.

* successful runs: merge (files produced, --json), plan, inspect, methods, --help, --dtype, --shard-size,
  --tokenizer-from, --force;
* bad inputs: each must exit with status 1 and a clear message naming the file / tensor / option at fault, and
  must write nothing at all (no --out folder, no ``<out>.streammerge-partial`` left behind, inputs untouched);
* bad usage (malformed --param) exits with status 2.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streammerge.budget import gpu_driver_present
from streammerge.cli import main
from streammerge.examples import SHAPES, tensor_shapes, write_family, write_model

TINY = SHAPES["tiny"]
OUTPUT_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json", "README.md",
                "streammerge_recipe.yaml", "streammerge-manifest.json"}


# --------------------------------------------------------------------------------------------------- helpers


def invoke(*args: str) -> Result:
    """Run the CLI in-process; exceptions other than SystemExit are left in the result (never raised)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with (size, mtime_ns): equal snapshots mean nothing was written or touched."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (single file or sharded), via the reference library."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors


def rewrite_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Replace ``folder/model.safetensors`` with ``edit(its tensors)``."""
    path = folder / "model.safetensors"
    save_file(edit(load_file(path)), path)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj))


@pytest.fixture
def fam(tmp_path: Path) -> dict[str, Path]:
    """A tiny tied Qwen2-shaped family: base, chat, multilingual (bf16, one file each)."""
    return write_family(tmp_path / "fam", "tiny", dtype="bf16")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "merged"


def merge_args(fam: dict[str, Path], out: Path, *extra: str, command: str = "merge") -> list[str]:
    return [command, "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"],
            "--out", out, *extra]


def merge_ok(fam: dict[str, Path], out: Path, *extra: str) -> Result:
    result = invoke(*merge_args(fam, out, "-q", *extra))
    assert result.exit_code == 0, result.output
    return result


# ------------------------------------------------------------------------------------------- successful runs


def test_merge_writes_a_complete_model_folder(fam, out):
    result = merge_ok(fam, out)
    assert f"merged model written to {out}" in result.stdout
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert not out.with_name(out.name + ".streammerge-partial").exists()
    merged, base = read_all(out), read_all(fam["base"])
    assert set(merged) == set(base)
    for name, t in merged.items():
        assert t.shape == base[name].shape and t.dtype == base[name].dtype, name
        assert torch.isfinite(t.float()).all(), name
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((out / "config.json").read_text()) == json.loads((fam["base"] / "config.json").read_text())
    assert (out / "generation_config.json").read_bytes() == (fam["base"] / "generation_config.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (fam["base"] / "tokenizer_config.json").read_bytes()
    assert "widen" in (out / "README.md").read_text()


def test_merge_json_matches_plan_fingerprint(fam, out):
    planned = invoke(*merge_args(fam, out, "--json", command="plan"))
    assert planned.exit_code == 0, planned.output
    result = invoke(*merge_args(fam, out, "--json"))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["out"] == str(out)
    assert len(doc["fingerprint"]) == 64
    assert doc["fingerprint"] == json.loads(planned.stdout)["fingerprint"]
    assert doc["fingerprint"] in (out / "README.md").read_text()
    assert doc["bytes_written"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))


def test_merge_without_quiet_prints_summary_on_stderr(fam, out):
    result = invoke(*merge_args(fam, out))
    assert result.exit_code == 0, result.output
    assert "method      widen" in result.stderr
    assert result.stdout.strip() == f"merged model written to {out}"


def test_plan_prints_a_summary_and_writes_nothing(fam, out, tmp_path):
    before = snapshot(tmp_path)
    result = invoke(*merge_args(fam, out, command="plan"))
    assert result.exit_code == 0, result.output
    for field in ("method      widen", "base", "model 1", "model 2", "output", "peak RAM", "reads", "tensors"):
        assert field in result.stdout
    assert str(fam["chat"]) in result.stdout
    assert snapshot(tmp_path) == before


def test_plan_json_lists_every_tensor_with_chunking(fam, out, tmp_path):
    before = snapshot(tmp_path)
    result = invoke(*merge_args(fam, out, "--json", command="plan"))
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["method"] == "widen" and d["params"] == {"t": 1.0, "s": 1.0}
    assert {t["name"] for t in d["tensors"]} == {n for n, _ in tensor_shapes(TINY)}
    for t in d["tensors"]:
        assert isinstance(t["chunk_rows"], int) and t["chunk_rows"] >= 1
        assert t["chunks"] >= 1
    rules = {t["name"]: t["rule"] for t in d["tensors"]}
    assert rules["model.embed_tokens.weight"] == "embedding"
    assert rules["model.layers.0.mlp.up_proj.weight"] == "matrix"
    assert rules["model.norm.weight"] == "vector"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("chunking", [["--max-ram", "600KiB", "--device", "cpu"], ["--chunk-rows", "5"]])
def test_chunking_changes_the_plan_but_not_the_output(chunking, fam, out, tmp_path):
    plan = invoke(*merge_args(fam, out, "--json", *chunking, command="plan"))
    assert plan.exit_code == 0, plan.output
    assert any(t["chunks"] > 1 for t in json.loads(plan.stdout)["tensors"])
    merge_ok(fam, out, *chunking)
    other = tmp_path / "merged-big-budget"
    merge_ok(fam, other, "--max-ram", "1GiB")
    assert (out / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()


def test_inspect_text(fam):
    result = invoke("inspect", fam["base"])
    assert result.exit_code == 0, result.output
    assert "Qwen2ForCausalLM" in result.stdout
    assert "vocab       257" in result.stdout
    assert "tied        True" in result.stdout
    assert "model.layers.1.mlp.down_proj.weight" in result.stdout


def test_inspect_json(fam):
    result = invoke("inspect", "--json", fam["base"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model_type"] == "qwen2"
    assert info["architectures"] == ["Qwen2ForCausalLM"]
    assert info["tied_embeddings"] is True
    assert info["vocab_size"] == info["embedding_rows"] == 257
    assert info["dtypes"] == {"BF16": len(tensor_shapes(TINY))}
    assert [s["file"] for s in info["shards"]] == ["model.safetensors"]
    shapes = {t["name"]: tuple(t["shape"]) for t in info["tensors"]}
    assert shapes == dict(tensor_shapes(TINY))
    assert info["parameters"] == sum(torch.Size(s).numel() for s in shapes.values())
    assert info["bytes"] == 2 * info["parameters"]


def test_methods_lists_widen_and_its_parameters():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("widen") for line in lines)
    assert any(line.strip().startswith("t (float") for line in lines)
    assert any(line.strip().startswith("s (float") for line in lines)


@pytest.mark.parametrize("command", [None, *sorted(main.commands)])
def test_help_of_every_command(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and "streammerge" in result.stdout


def test_dtype_float32(fam, out):
    merge_ok(fam, out, "--dtype", "float32")
    with safe_open(out / "model.safetensors", "pt") as st:
        keys = list(st.keys())
        assert keys
        for k in keys:
            assert st.get_slice(k).get_dtype() == "F32", k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_small_shard_size_writes_a_sharded_checkpoint(fam, out, tmp_path):
    merge_ok(fam, out, "--shard-size", "100KB")
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 2
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = read_all(out)
    assert set(index["weight_map"]) == set(merged) == {name for name, _ in tensor_shapes(TINY)}
    for shard in shards:
        with safe_open(shard, "pt") as st:
            for k in st.keys():
                assert index["weight_map"][k] == shard.name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    single = tmp_path / "single"
    merge_ok(fam, single)
    reference = read_all(single)
    for name, t in merged.items():
        assert torch.equal(t, reference[name]), name


def test_tokenizer_from_copies_that_folders_tokenizer_files(fam, out, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    write_json(tok / "tokenizer_config.json", {"from": "tok"})
    write_json(tok / "tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})
    write_json(tok / "special_tokens_map.json", {"eos_token": "</s>"})
    (tok / "notes.txt").write_text("not a tokenizer file")
    merge_ok(fam, out, "--tokenizer-from", tok)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (tok / name).read_bytes(), name
    assert not (out / "notes.txt").exists()
    assert (out / "config.json").exists()


def test_exclude_keeps_the_base_value_bit_for_bit(fam, out):
    merge_ok(fam, out, "--exclude", r"model\.layers\.0\.mlp\.", "--exclude", r"model\.norm")
    merged, base = read_all(out), read_all(fam["base"])
    kept = [n for n in merged if n.startswith("model.layers.0.mlp.") or n.startswith("model.norm")]
    assert len(kept) == 4
    for name in kept:
        assert torch.equal(merged[name], base[name]), name
    assert not torch.equal(merged["model.layers.1.mlp.up_proj.weight"], base["model.layers.1.mlp.up_proj.weight"])


def test_models_stored_in_other_dtypes_merge_into_the_base_dtype(fam, out):
    shutil.rmtree(fam["chat"])
    write_model(fam["chat"], TINY, delta=0.1, dtype="f32")
    merge_ok(fam, out)
    assert {t.dtype for t in read_all(out).values()} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_tied_head_stored_in_another_dtype_is_the_merged_embedding_cast(dtype, fam, out):
    """Tied checkpoints that also store the head, in float32 beside a bfloat16 embedding: the head is the merged
    embedding, cast to the head's dtype (decided in the plan; this used to crash after the whole merge)."""
    for folder in fam.values():
        rewrite_tensors(folder, lambda ts: {**ts, "lm_head.weight": ts["model.embed_tokens.weight"].float()})
    plan = json.loads(invoke(*merge_args(fam, out, "--json", command="plan")).output)
    head = next(t for t in plan["tensors"] if t["name"] == "lm_head.weight")
    assert head["rule"] == "tied_copy" and head["copy_of"] == "model.embed_tokens.weight" and head["dtype"] == "F32"
    merge_ok(fam, out, *(["--dtype", dtype] if dtype else []))
    got = read_all(out)
    embed, lm_head = got["model.embed_tokens.weight"], got["lm_head.weight"]
    assert embed.dtype == torch.bfloat16
    assert lm_head.dtype == (torch.bfloat16 if dtype else torch.float32)
    assert torch.equal(lm_head, embed.to(lm_head.dtype))


def test_make_example_can_be_rerun_and_replaced_only_with_force(tmp_path):
    demo = tmp_path / "demo"
    result = invoke("make-example", demo)
    assert result.exit_code == 0, result.output
    assert {p.name for p in demo.iterdir()} == {"base", "chat", "multilingual", "streammerge-example.json"}
    before, weights = snapshot(tmp_path), (demo / "base" / "model.safetensors").read_bytes()
    again = invoke("make-example", demo)  # the quick start run twice
    assert again.exit_code == 0 and "already holds this example" in again.stderr and str(demo / "base") in again.stdout
    assert snapshot(tmp_path) == before
    other = invoke("make-example", demo, "--seed", "1")
    assert other.exit_code == 1 and "holds another example" in other.stderr and "--force" in other.stderr
    assert snapshot(tmp_path) == before
    (demo / "merged").mkdir()  # the quick start's merge, written beside the example
    (demo / "merged" / "model.safetensors").write_bytes(b"mine")
    replaced = invoke("make-example", demo, "--seed", "1", "--force")
    assert replaced.exit_code == 0, replaced.output
    assert (demo / "base" / "model.safetensors").read_bytes() != weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert sorted(p.name for p in demo.iterdir()) == ["base", "chat", "merged", "multilingual",
                                                      "streammerge-example.json"]
    assert (demo / "merged" / "model.safetensors").read_bytes() == b"mine", "--force keeps what is not the example"
    assert json.loads((demo / "streammerge-example.json").read_text())["seed"] == 1


def test_make_example_refuses_a_bad_dtype_before_writing_anything(tmp_path):
    result = invoke("make-example", tmp_path / "demo", "--dtype", "int8")
    assert result.exit_code == 2 and "'int8' is not one of" in result.stderr and "bfloat16" in result.stderr
    assert not list(tmp_path.iterdir())


def test_an_interrupted_make_example_leaves_nothing(tmp_path, monkeypatch):
    import streammerge.examples as examples

    written = []

    def write_then_stop(folder, *args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(folder)
        return write_model(folder, *args, **kwargs)

    monkeypatch.setattr(examples, "write_model", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        examples.write_example(tmp_path / "demo")
    assert written and not list(tmp_path.iterdir()), "neither the example nor its work folder may be left"


def test_make_example_help_lists_dtypes_and_sizes_on_disk():
    text = invoke("make-example", "--help").stdout
    assert "bfloat16|float16|float32" in text and "qwen2-7b 42.6 GiB" in " ".join(text.split())
    assert "Seed of the generated weights" in text and "--force" in text


def test_force_replaces_a_non_empty_output(fam, out):
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke(*merge_args(fam, out, "-q"))
    assert result.exit_code == 1
    assert "exists and is not empty" in result.output and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert not out.with_name(out.name + ".streammerge-partial").exists()

    merge_ok(fam, out, "--force")
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert not out.with_name(out.name + ".streammerge-old").exists()
    assert not out.with_name(out.name + ".streammerge-partial").exists()


def test_an_existing_empty_output_folder_is_used(fam, out):
    out.mkdir()
    merge_ok(fam, out)
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES


def test_malformed_param_is_a_usage_error(fam, out, tmp_path):
    before = snapshot(tmp_path)
    result = invoke(*merge_args(fam, out, "--param", "t"))
    assert result.exit_code == 2
    assert "NAME=VALUE" in result.output
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------ bad inputs
#
# Each case may spoil the family, then returns (extra CLI arguments, phrases the error message must contain). Extra
# arguments that start with "--base" replace the usual --base/--model list; a repeated option (--out) overrides.

Case = Callable[[dict[str, Path], Path], tuple[list, list[str]]]


def _missing_base(fam, tmp):
    missing = tmp / "no-such-model"
    return ["--base", missing, "--model", fam["chat"], "--model", fam["multilingual"]], [str(missing), "does not exist"]


def _base_is_a_file(fam, tmp):
    f = fam["base"] / "model.safetensors"
    return ["--base", f, "--model", fam["chat"], "--model", fam["multilingual"]], [str(f), "not a folder"]


def _no_safetensors(fam, tmp):
    for f in fam["chat"].glob("*.safetensors"):
        f.unlink()
    return [], [str(fam["chat"]), "model.safetensors"]


def _truncated_file(fam, tmp):
    path = fam["chat"] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [], [str(path)]


def _header_garbage(fam, tmp):
    path = fam["multilingual"] / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return [], [str(path), "JSON"]


def _tiny_file(fam, tmp):
    path = fam["base"] / "model.safetensors"
    path.write_bytes(b"abc")
    return [], [str(path), "too small"]


SHARD_1 = "model-00001-of-00001.safetensors"


def _index_weight_map(folder: Path) -> dict[str, str]:
    """Turn a single-file model into a one-shard indexed one (the caller writes the index); its weight map."""
    (folder / "model.safetensors").rename(folder / SHARD_1)
    return {name: SHARD_1 for name in load_file(folder / SHARD_1)}


def _single_file_and_index(fam, tmp):
    shutil.copyfile(fam["chat"] / "model.safetensors", fam["chat"] / SHARD_1)
    wmap = {name: SHARD_1 for name in load_file(fam["chat"] / SHARD_1)}
    write_json(fam["chat"] / "model.safetensors.index.json", {"metadata": {}, "weight_map": wmap})
    return [], [str(fam["chat"]), "both model.safetensors and model.safetensors.index.json", "transformers loads"]


def _index_path_escape(fam, tmp):
    shutil.copyfile(fam["chat"] / "model.safetensors", fam["chat"].parent / "x.safetensors")
    wmap = {name: "../x.safetensors" for name in _index_weight_map(fam["chat"])}
    write_json(fam["chat"] / "model.safetensors.index.json", {"metadata": {}, "weight_map": wmap})
    return [], ["model.safetensors.index.json", "../x.safetensors", "plain file names"]


def _index_missing_shard(fam, tmp):
    wmap = {name: "model-00009-of-00009.safetensors" for name in _index_weight_map(fam["chat"])}
    write_json(fam["chat"] / "model.safetensors.index.json", {"metadata": {}, "weight_map": wmap})
    return [], ["model-00009-of-00009.safetensors", "does not exist"]


def _index_names_absent_tensor(fam, tmp):
    wmap = _index_weight_map(fam["chat"])
    wmap["model.layers.7.mlp.up_proj.weight"] = SHARD_1
    write_json(fam["chat"] / "model.safetensors.index.json", {"metadata": {}, "weight_map": wmap})
    return [], ["model.safetensors.index.json", "model.layers.7.mlp.up_proj.weight", "not there"]


def _index_not_json(fam, tmp):
    _index_weight_map(fam["chat"])
    (fam["chat"] / "model.safetensors.index.json").write_text("{not json")
    return [], ["model.safetensors.index.json"]


def _config_not_json(fam, tmp):
    (fam["chat"] / "config.json").write_text("{oops")
    return [], [str(fam["chat"] / "config.json")]


def _renamed_tensor(fam, tmp):
    def edit(ts):
        ts["model.layers.0.mlp.up_proj.weight_renamed"] = ts.pop("model.layers.0.mlp.up_proj.weight")
        return ts

    rewrite_tensors(fam["chat"], edit)
    return [], ["model 1", "model.layers.0.mlp.up_proj.weight", "not homologous"]


def _vocab_mismatch(fam, tmp):
    shutil.rmtree(fam["multilingual"])
    write_model(fam["multilingual"], replace(TINY, vocab=300), delta=0.3)
    return [], ["model.embed_tokens.weight", "300", "257", "vocabulary"]


def _shape_mismatch(fam, tmp):
    def edit(ts):
        ts["model.layers.1.mlp.up_proj.weight"] = ts["model.layers.1.mlp.up_proj.weight"][:128].clone()
        return ts

    rewrite_tensors(fam["chat"], edit)
    return [], ["model.layers.1.mlp.up_proj.weight", "[128, 64]", "[160, 64]", "model 1", str(fam["chat"])]


def _architecture_mismatch(fam, tmp):
    shutil.rmtree(fam["chat"])
    write_model(fam["chat"], SHAPES["tiny-llama"], delta=0.1)
    return [], ["'llama'", "'qwen2'", str(fam["chat"])]


def _nan_in_a_model(fam, tmp):
    def edit(ts):
        ts["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
        return ts

    rewrite_tensors(fam["multilingual"], edit)
    return [], ["model.layers.1.self_attn.o_proj.weight", "NaN", str(fam["multilingual"])]


def _no_tensors(fam, tmp):
    save_file({}, fam["chat"] / "model.safetensors")
    return [], [str(fam["chat"]), "no tensors"]


def _index_omits_a_tensor(fam, tmp):
    wmap = _index_weight_map(fam["chat"])
    del wmap["model.norm.weight"]
    write_json(fam["chat"] / "model.safetensors.index.json", {"metadata": {}, "weight_map": wmap})
    return [], [str(fam["chat"]), "model.norm.weight", "index does not list"]


def _integer_tensor_in_a_model(fam, tmp):
    def edit(ts):
        ts["model.norm.weight"] = ts["model.norm.weight"].to(torch.int16)
        return ts

    rewrite_tensors(fam["chat"], edit)
    return [], ["model.norm.weight", "model 1", "I16", "not a float", "--exclude"]


def _fp8_weights_without_scales(fam, tmp):
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(ts):  # FP8 codes whose scales are missing: their values are unknown (tests/test_fp8.py: with scales)
        ts[name] = ts[name].float().to(torch.float8_e4m3fn)
        return ts

    rewrite_tensors(fam["multilingual"], edit)
    return [], ["model 2", str(fam["multilingual"]), "quantized", name, "F8_E4M3", "no scale tensor", "unquantized"]


def _quantization_config(fam, tmp):
    config = json.loads((fam["base"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    write_json(fam["base"] / "config.json", config)
    return [], ["the base", "quantization_config", "'gptq'", "unquantized"]


def _bitsandbytes_companions(fam, tmp):
    def edit(ts):
        ts["model.layers.1.self_attn.q_proj.weight.absmax"] = torch.ones(16)
        return ts

    rewrite_tensors(fam["chat"], edit)
    return [], ["model 1", "quantized", "q_proj.weight.absmax", "companion"]


def _four_d_tensor(fam, tmp):
    name = "model.layers.0.mlp.experts.gate_up_proj"  # stacked experts of 4-D (3-D are merged per expert)
    for folder in fam.values():
        rewrite_tensors(folder, lambda ts: {**ts, name: torch.ones(2, 3, 4, 5, dtype=torch.bfloat16)})
    return [], [name, "[2, 3, 4, 5]", "4-D stacked experts", "--exclude"]


def _out_is_an_input(fam, tmp):
    return ["--out", fam["chat"], "--force"], [str(fam["chat"]), "input folder"]


def _one_model(fam, tmp):
    return ["--base", fam["base"], "--model", fam["chat"]], ["at least 2"]


def _unknown_method(fam, tmp):
    return ["--method", "wided"], ["'wided'", "did you mean 'widen'"]


def _unknown_param(fam, tmp):
    return ["--param", "tt=1.0"], ["'tt'", "did you mean 't'"]


def _param_not_a_number(fam, tmp):
    return ["--param", "t=abc"], ["parameter t", "'abc'", "float"]


def _param_negative(fam, tmp):
    return ["--param", "t=-1"], ["parameter t", "-1", ">= 0"]


def _param_nan(fam, tmp):
    return ["--param", "s=nan"], ["parameter s", "NaN"]


def _budget_too_small(fam, tmp):
    return ["--max-ram", "1KiB"], ["--max-ram", "too small", "needs at least", "(--max-ram "]


def _budget_unreadable(fam, tmp):
    return ["--max-ram", "lots"], ["--max-ram", "'lots'", "512MiB"]


def _bad_exclude(fam, tmp):
    return ["--exclude", "model.(layers"], ["--exclude", "model.(layers", "regular expression"]


def _exclude_matching_inside_names(fam, tmp):
    return ["--exclude", "mlp"], ["--exclude 'mlp' matches no tensor", "from the start", r"'.*mlp\b'"]


def _exclude_of_one_layer_inside_names(fam, tmp):  # the hint must not also catch layers.10, layers.11, ...
    return ["--exclude", "layers.1"], [r"write --exclude '.*layers\.1\b'"]


def _exclude_written_as_a_glob(fam, tmp):
    return ["--exclude", "*mlp*"], ["--exclude '*mlp*' is not a valid regular expression", "not shell globs",
                                    "write '.*mlp.*'"]


def _exclude_with_a_typo(fam, tmp):
    return ["--exclude", "model.embed_token.weight"], [
        "--exclude 'model.embed_token.weight' matches no tensor", "did you mean", "model\\.embed_tokens\\.weight"]


def _embedding_with_a_typo(fam, tmp):
    return ["--embedding", "model.embed_token.weight"], [
        "--embedding 'model.embed_token.weight' is not a tensor of the base", "did you mean 'model.embed_tokens.weight'"]


def _embedding_not_2d(fam, tmp):
    return ["--embedding", "model.norm.weight"], ["--embedding 'model.norm.weight' is a 1-D tensor"]


def _budget_without_a_unit(fam, tmp):
    return ["--max-ram", "0.5"], ["--max-ram", "'0.5' has no unit", "0.5GiB", "0.5B for bytes"]


def _restart_and_redo_changed(fam, tmp):
    return ["--restart", "--redo-changed"], ["--restart discards", "--redo-changed keeps", "give one of them"]


def _bad_dtype(fam, tmp):
    return ["--dtype", "int8"], ["'int8'", "float32"]


def _bad_shard_size(fam, tmp):
    return ["--shard-size", "big"], ["--shard-size", "'big'"]


def _out_is_a_file(fam, tmp):
    (tmp / "merged").write_text("a file")
    return [], [str(tmp / "merged"), "not a folder"]


def _out_parent_missing(fam, tmp):
    return ["--out", tmp / "nowhere" / "merged"], [str(tmp / "nowhere"), "does not exist"]


def _out_is_dot(fam, tmp):
    return ["--out", "."], ["'.'", "does not name a folder"]


def _out_is_empty(fam, tmp):
    return ["--out", ""], ["--out", "does not name a folder"]


def _out_on_a_virtual_file_system(fam, tmp):
    return ["--out", "/proc/streammerge-out"], ["/proc", "virtual file system"]


def _out_inside_an_input(fam, tmp):
    return ["--out", fam["base"] / "merged"], ["is inside the input folder", str(fam["base"])]


def _tokenizer_from_missing(fam, tmp):
    return ["--tokenizer-from", tmp / "no-tokenizer"], ["--tokenizer-source", str(tmp / "no-tokenizer")]


def _tokenizer_source_misspelled(fam, tmp):
    return ["--tokenizer-source", "unoin"], ["--tokenizer-source unoin is not a folder", "did you mean 'union'?"]


BAD_INPUTS: dict[str, Case] = {
    "missing-base": _missing_base,
    "base-is-a-file": _base_is_a_file,
    "no-safetensors": _no_safetensors,
    "truncated-file": _truncated_file,
    "header-not-json": _header_garbage,
    "file-too-small": _tiny_file,
    "index-path-escape": _index_path_escape,
    "index-missing-shard": _index_missing_shard,
    "index-names-absent-tensor": _index_names_absent_tensor,
    "index-not-json": _index_not_json,
    "single-file-and-index": _single_file_and_index,
    "config-not-json": _config_not_json,
    "different-tensor-names": _renamed_tensor,
    "vocab-mismatch": _vocab_mismatch,
    "shape-mismatch": _shape_mismatch,
    "architecture-mismatch": _architecture_mismatch,
    "no-tensors": _no_tensors,
    "index-omits-a-tensor": _index_omits_a_tensor,
    "integer-tensor-in-a-model": _integer_tensor_in_a_model,
    "fp8-weights-without-scales": _fp8_weights_without_scales,
    "quantization-config": _quantization_config,
    "bitsandbytes-companions": _bitsandbytes_companions,
    "4d-tensor": _four_d_tensor,
    "one-model": _one_model,
    "unknown-method": _unknown_method,
    "unknown-param": _unknown_param,
    "param-not-a-number": _param_not_a_number,
    "param-negative": _param_negative,
    "param-nan": _param_nan,
    "budget-too-small": _budget_too_small,
    "budget-unreadable": _budget_unreadable,
    "bad-exclude": _bad_exclude,
    "exclude-matching-inside-names": _exclude_matching_inside_names,
    "exclude-with-a-typo": _exclude_with_a_typo,
    "exclude-of-one-layer-inside-names": _exclude_of_one_layer_inside_names,
    "exclude-written-as-a-glob": _exclude_written_as_a_glob,
    "budget-without-a-unit": _budget_without_a_unit,
    "embedding-with-a-typo": _embedding_with_a_typo,
    "embedding-not-2d": _embedding_not_2d,
    "restart-and-redo-changed": _restart_and_redo_changed,
    "bad-dtype": _bad_dtype,
    "bad-shard-size": _bad_shard_size,
    "out-is-a-file": _out_is_a_file,
    "out-parent-missing": _out_parent_missing,
    "out-is-dot": _out_is_dot,
    "out-is-empty": _out_is_empty,
    "out-on-a-virtual-file-system": _out_on_a_virtual_file_system,
    "out-is-an-input": _out_is_an_input,
    "out-inside-an-input": _out_inside_an_input,
    "tokenizer-from-missing": _tokenizer_from_missing,
    "tokenizer-source-misspelled": _tokenizer_source_misspelled,
}


def _cases():
    for name in BAD_INPUTS:
        for command in ("merge", "plan"):
            yield pytest.param(command, name, id=f"{command}-{name}")


#: a plan is a dry run: it describes what a merge would do with these outputs instead of failing
PLAN_DESCRIBES = {"out-is-a-file", "out-parent-missing", "out-is-dot", "out-is-empty", "out-on-a-virtual-file-system"}


@pytest.mark.parametrize("command,case", list(_cases()))
def test_bad_input_fails_cleanly_and_writes_nothing(command, case, fam, out, tmp_path):
    extra, phrases = BAD_INPUTS[case](fam, tmp_path)
    if command == "plan" and case in PLAN_DESCRIBES:
        before = snapshot(tmp_path)
        result = invoke(*merge_args(fam, out, *extra, command="plan"))
        assert result.exit_code == 0, result.output
        line = next(s for s in result.stdout.splitlines() if s.startswith("destination"))
        assert "a merge would refuse it" in line and all(p in line for p in phrases), line
        assert snapshot(tmp_path) == before
        return
    if extra[:1] == ["--base"]:
        args = [command, *extra, "--out", out]
    else:
        args = merge_args(fam, out, *extra, command=command)
    if command == "merge":
        args.append("-q")
    before = snapshot(tmp_path)
    result = invoke(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"traceback instead of a message: {result.exc_info}"
    )
    assert result.exit_code == 1, result.output
    message = result.stderr
    assert message.startswith("Error: ")
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before, "something was written or touched"
    assert not list(tmp_path.rglob("*.streammerge-partial"))


def test_a_second_merge_into_the_same_output_is_refused_while_the_first_runs(fam, out, tmp_path):
    """The work folder is locked by the merge writing it (here: held by this test, as another process would)."""
    import fcntl

    work = out.with_name(out.name + ".streammerge-partial")
    work.mkdir()
    (work / "owner").write_text("pid 4242 on elsewhere")
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT)  # streammerge.locks: the work folder's lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(tmp_path)
        result = invoke(*merge_args(fam, out, "-q"))
        assert result.exit_code == 1 and "another merge (pid 4242 on elsewhere) is writing" in result.stderr
        assert str(out) in result.stderr and snapshot(tmp_path) == before
    finally:
        os.close(fd)
    merge_ok(fam, out)  # once the holder is gone, the merge goes ahead
    assert not work.exists()


def test_nan_in_a_model_stops_keeps_the_work_and_its_advice_continues_it(fam, out, tmp_path):
    """Bad data found mid-merge (only execution reads tensor data): a clear message naming the tensor, rows and
    model; nothing published; the work kept; and the advice (exclude the tensor, --redo-changed) finishes the merge
    without redoing the tensors already merged."""
    name = "model.layers.1.self_attn.o_proj.weight"
    extra, phrases = _nan_in_a_model(fam, tmp_path)
    result = invoke(*merge_args(fam, out, "-q"))
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit))
    message = result.stderr
    for phrase in [*phrases, "rows [", "already merged are kept", "--redo-changed", "--exclude '^"]:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert not out.exists()
    work = out.with_name(out.name + ".streammerge-partial")
    assert (work / "journal.jsonl").is_file()
    kept = int(message.split(" tensor(s) already merged")[0].rsplit(" ", 1)[1])
    assert kept > 0
    exclude = message.split("--exclude '")[1].split("'")[0]
    assert exclude == "^" + re.escape(name) + "$"

    result = invoke(*merge_args(fam, out, "--exclude", exclude, "--redo-changed"))
    assert result.exit_code == 0, result.output
    resumed = next(line for line in result.stderr.splitlines() if line.startswith("resuming the interrupted merge"))
    assert int(resumed.split(": ")[1].split()[0]) == kept, resumed
    fresh = tmp_path / "fresh"
    merge_ok(fam, fresh, "--exclude", exclude)
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    assert torch.equal(read_all(out)[name], load_file(fam["base"] / "model.safetensors")[name])


@pytest.mark.parametrize("case,which", [("missing-base", None), ("no-safetensors", "chat"),
                                        ("truncated-file", "chat"), ("file-too-small", "base"),
                                        ("index-path-escape", "chat"), ("index-names-absent-tensor", "chat")])
def test_inspect_bad_folder(case, which, fam, tmp_path):
    extra, phrases = BAD_INPUTS[case](fam, tmp_path)
    result = invoke("inspect", extra[1] if which is None else fam[which])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in {result.stderr!r}"


class _Boom:
    """Unpickling this creates the marker folder (stands in for arbitrary code in a malicious pickle)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def opened_paths(monkeypatch) -> list[str]:
    """Every path opened through open()/io.open()/os.open() while the test runs."""
    seen: list[str] = []

    def spy(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(os.fsdecode(file))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    return seen


@pytest.mark.parametrize("command", ["merge", "plan", "inspect"])
@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt"])
def test_pickled_checkpoint_is_refused_and_never_opened(command, filename, fam, out, tmp_path, opened_paths):
    marker = tmp_path / "UNPICKLED"
    chat = fam["chat"]
    for f in chat.glob("*.safetensors"):
        f.unlink()
    pkl = chat / filename
    pkl.write_bytes(pickle.dumps({"model.embed_tokens.weight": _Boom(marker)}))
    before = snapshot(tmp_path)
    opened_paths.clear()
    if command == "inspect":
        result = invoke("inspect", chat)
    else:
        result = invoke(*merge_args(fam, out, *(["-q"] if command == "merge" else []), command=command))
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for phrase in (str(chat), filename, "never unpickles", "convert"):
        assert phrase in result.stderr, f"{phrase!r} not in {result.stderr!r}"
    assert not marker.exists()
    assert not [p for p in opened_paths if p.endswith(filename)], "the pickle file was opened"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("delay", [0.2, 0.4, 0.6, 0.9])
def test_ctrl_c_during_start_up_exits_130_with_one_line(delay, fam, out):
    """Interrupted while torch is imported or the merge is being planned: one line, status 130, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "streammerge", *map(str, merge_args(fam, out, "-q"))]
    # SIGINT as a terminal leaves it: a shell's background job (e.g. a CI script started with `&`) inherits it
    # ignored, and CPython then installs no KeyboardInterrupt handler (the merge would just finish)
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the merge finished before the interrupt arrived (a fast machine)")
    assert p.returncode == 130, (p.returncode, stderr)
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(("Interrupted", "Error: merge interrupted")), stderr


def test_the_console_entry_point_runs_help_and_version():
    import subprocess
    import sys

    for args, expect in ((["--version"], "streammerge, version"), (["--help"], "Usage: streammerge")):
        r = subprocess.run([sys.executable, "-m", "streammerge", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and expect in r.stdout, r
    r = subprocess.run([sys.executable, "-m", "streammerge", "nonsense"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "No such command" in r.stderr


# ------------------------------------------------------------------------- what a careful tool says up front


def test_every_independent_problem_is_reported_at_once(fam, out, tmp_path):
    out.mkdir()
    (out / "something").write_text("x")
    result = invoke(*merge_args(fam, out, "--param", "t=lots", "--dtype", "int4", "--tokenizer-from",
                                tmp_path / "nothing", "-q"))
    assert result.exit_code == 1
    message = result.stderr
    assert "4 problems" in message, message
    for phrase in ("not empty", "parameter t", "int4", "--tokenizer-source"):
        assert phrase in message, (phrase, message)


def test_plan_needs_no_out_and_says_what_a_merge_would_do(fam, out):
    result = invoke("plan", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"])
    assert result.exit_code == 0, result.output
    assert "destination not given (--out): a merge needs one" in result.stdout
    merge_ok(fam, out)
    result = invoke(*merge_args(fam, out, command="plan"))
    assert result.exit_code == 0 and "already holds this merge: a merge has nothing to do" in result.stdout
    result = invoke(*merge_args(fam, out, "--param", "t=0.5", command="plan"))
    assert result.exit_code == 0 and "refuses it without --force" in result.stdout, result.stdout


def test_the_quick_start_can_be_run_twice(fam, out):
    merge_ok(fam, out)
    before = snapshot(out)
    result = invoke(*merge_args(fam, out))
    assert result.exit_code == 0 and "already complete: nothing to do" in result.stdout, result.output
    assert "written" not in result.output, "a run that wrote nothing must not say it wrote"
    assert snapshot(out) == before


@pytest.mark.parametrize("how", ["twice", "symlink"])
def test_the_same_model_twice_is_refused(how, fam, out, tmp_path):
    second = fam["chat"]
    if how == "symlink":
        second = tmp_path / "chat-link"
        second.symlink_to(fam["chat"])
    result = invoke("merge", "--base", fam["base"], "--model", fam["chat"], "--model", second, "--out", out, "-q")
    assert result.exit_code == 1 and "model 2" in result.stderr and "same folder as model 1" in result.stderr
    assert not out.exists()


def test_the_base_given_as_a_model_and_a_budget_above_the_machine_are_noted(fam, out):
    args = ["--base", fam["base"], "--model", fam["chat"], "--model", fam["base"], "--max-ram", "1000TiB"]
    plan = invoke("plan", *args)
    assert plan.exit_code == 0
    assert "note        model 2" in plan.stdout and "is the base itself" in plan.stdout
    assert "note        --max-ram 1000.0 TiB is more than" in plan.stdout
    result = invoke("merge", *args, "--out", out, "-q")
    assert result.exit_code == 0 and "note: model 2" in result.stderr and "note: --max-ram" in result.stderr


def test_a_tokenizer_folder_without_a_tokenizer_is_refused(fam, out, tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(*merge_args(fam, out, "--tokenizer-from", tmp_path / "empty", "-q"))
    assert result.exit_code == 1 and "holds no tokenizer files" in result.stderr and not out.exists()


def test_a_base_without_config_json_needs_allow_incomplete_output(fam, out):
    (fam["base"] / "config.json").unlink()
    result = invoke(*merge_args(fam, out, "-q"))
    assert result.exit_code == 1 and "no config.json" in result.stderr and "--allow-incomplete-output" in result.stderr
    assert not out.exists()
    merge_ok(fam, out, "--allow-incomplete-output")
    assert (out / "model.safetensors").is_file() and not (out / "config.json").exists()


@pytest.mark.parametrize("method", ["task_arithmetic", "widen"])
def test_tied_and_untied_inputs_merge_each_models_effective_head(method, fam, out):
    """A tied base and a tied variant with a variant saved untied (its own lm_head): the head is merged from each
    input's effective head (a tied model's head is its embedding), against a dense reference, and the output is
    untied (config and a stored head)."""
    from reference_widen import merge_matrix

    shutil.rmtree(fam["chat"])
    write_model(fam["chat"], SHAPES["tiny-untied"], delta=0.1)
    result = invoke(*merge_args(fam, out, "--method", method))
    assert result.exit_code == 0, result.output
    assert "note: the base, model 2 tie lm_head.weight to model.embed_tokens.weight" in result.stderr
    merged, base, chat, multi = (read_all(p) for p in (out, fam["base"], fam["chat"], fam["multilingual"]))
    heads = [base["model.embed_tokens.weight"], chat["lm_head.weight"], multi["model.embed_tokens.weight"]]
    b, *models = (h.float() for h in heads)
    want = b + sum(m - b for m in models) if method == "task_arithmetic" else merge_matrix(b, models, 1.0, 1.0)
    got = merged["lm_head.weight"]
    assert got.dtype == base["model.embed_tokens.weight"].dtype
    assert torch.equal(got, want.to(got.dtype)), (got.float() - want).abs().max()
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    excluded = invoke(*merge_args(fam, out.with_name("excluded"), "--method", method, "--exclude", "lm_head", "-q"))
    assert excluded.exit_code == 0, excluded.output  # the base's effective head: its embedding
    assert torch.equal(read_all(out.with_name("excluded"))["lm_head.weight"], base["model.embed_tokens.weight"])


@pytest.mark.parametrize("n", [1, 2])
def test_counts_are_worded_in_the_singular_and_plural(n, fam, out):
    def edit(ts):
        ts.update({f"extra.{k}.weight": torch.zeros(2) for k in range(n)})
        return ts

    rewrite_tensors(fam["chat"], edit)
    result = invoke(*merge_args(fam, out, "-q"))
    assert f"has {n} tensor{'s' if n > 1 else ''} the base lacks" in result.stderr
    slerp = invoke("merge", "--base", fam["base"], "--model", fam["multilingual"], "--model", fam["base"],
                   "--method", "slerp", "--out", out, "-q")
    assert "slerp takes at most 1 model besides the base, got 2" in slerp.stderr


FAST_COMMANDS = [["--help"], ["--version"], ["methods"], ["merge", "--help"], ["inspect", "{base}"],
                 ["plan", "--base", "{base}", "--model", "{chat}", "--model", "{multilingual}"], ["verify", "{out}"]]


@pytest.mark.parametrize("command", FAST_COMMANDS, ids=lambda c: " ".join(c))
def test_fast_commands_do_not_import_torch(command, fam, out):
    """Importing torch takes seconds; commands that compute no tensor leave it alone (``-X importtime`` lists
    every module a process imports)."""
    if command[0] == "plan" and gpu_driver_present():
        pytest.skip("with a GPU driver, --device auto asks torch about the GPU (its memory sets the plan)")
    merge_ok(fam, out)
    args = [a.format(out=out, **fam) for a in command]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "streammerge", *args], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "streammerge.cli" in imported and "torch" not in imported


def test_resume_keeps_the_interrupted_runs_budget_unless_given(fam, out, monkeypatch):
    from helpers import interrupt_at_tensor

    interrupt_at_tensor(monkeypatch, 8)
    stopped = invoke(*merge_args(fam, out, "--max-ram", "700KiB", "--device", "cpu", "-q"))
    assert stopped.exit_code == 130, stopped.output
    monkeypatch.undo()
    resumed = invoke("resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert "budget      700.0 KiB (--max-ram)" in resumed.stderr, resumed.stderr


@pytest.mark.parametrize("args, phrases", [
    (["--method", "core_space"], ["mergekit's 'core_space' method is not in streammerge yet", "widen"]),
    (["--method", "ties", "--seed", "3"], ["ties draws no random masks, so it takes no seed"]),
    (["--method", "linear", "--max-vram", "1GiB", "--device", "cpu"], ["note: --max-vram is not used"]),
])
def test_what_a_mergekit_user_tries_is_answered_plainly(args, phrases, fam, out):
    result = invoke(*merge_args(fam, out, *args, "-q"))
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_a_hub_id_and_a_missing_output_are_named_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache, and no download
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    hub = invoke("inspect", "--offline", "Qwen/Qwen2-0.5B")
    assert hub.exit_code == 1, hub.output
    assert "Qwen/Qwen2-0.5B is not a local folder and is not in the Hugging Face cache" in hub.stderr
    assert "hf download Qwen/Qwen2-0.5B --include" in hub.stderr
    missing = invoke("verify", tmp_path / "nothing")
    assert missing.exit_code == 1 and f"{tmp_path / 'nothing'} does not exist" in missing.stderr
    assert "linear" in invoke("methods").stdout and "weight of each model in the average" in invoke("methods").stdout


def test_the_plan_names_the_tensors_that_keep_the_base_value_and_why(fam):
    r = invoke("plan", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--exclude",
               r"model\.layers\.1\.")
    line = next(s for s in r.stdout.splitlines() if s.startswith("base value"))
    assert line.startswith("base value  12 (--exclude): model.layers.1.input_layernorm.weight, ") and "8 more" in line
    d = json.loads(invoke("plan", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"],
                          "--exclude", r"model\.layers\.1\.", "--json").stdout)
    assert len(d["kept_from_base"]["--exclude"]) == 12
    assert all(t.get("kept_because") == "--exclude" for t in d["tensors"] if t["name"].startswith("model.layers.1."))


def test_inspect_of_a_base_and_models_gives_a_compatibility_verdict(fam, tmp_path):
    ok = invoke("inspect", fam["base"], fam["chat"], fam["multilingual"])
    assert ok.exit_code == 0 and "can be merged as they are" in ok.stdout

    def edit(ts):
        del ts["model.layers.1.mlp.up_proj.weight"]
        ts["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        return ts

    rewrite_tensors(fam["chat"], edit)
    shutil.rmtree(fam["multilingual"])
    write_model(fam["multilingual"], SHAPES["tiny-untied"], delta=0.3)
    r = invoke("inspect", fam["base"], fam["chat"], fam["multilingual"])
    assert r.exit_code == 0 and "can be merged with the options below" in r.stdout, r.stdout
    assert "[needs an option] model 1" in r.stdout and "lacks model.layers.1.mlp.up_proj.weight" in r.stdout
    assert r"--exclude 'model\.layers\.1\.mlp\.up_proj\.weight$'" in r.stdout
    assert "[fine] model 1" in r.stdout and "(derived buffers)" in r.stdout
    assert "[note] model 2" in r.stdout and "does not tie lm_head.weight" in r.stdout
    # the option it names works
    merged = invoke(*merge_args(fam, tmp_path / "out", "--exclude", r"model\.layers\.1\.mlp\.up_proj\.weight$", "-q"))
    assert merged.exit_code == 0, merged.output
    shutil.rmtree(fam["multilingual"])
    write_model(fam["multilingual"], replace(TINY, vocab=300), delta=0.3)
    blocked = invoke("inspect", fam["base"], fam["chat"], fam["multilingual"], "--json")
    d = json.loads(blocked.stdout)
    assert blocked.exit_code == 1 and d["verdict"] == "cannot be merged as they are"
    assert any(x["status"] == "blocks" and "vocabulary: 300 embedding rows" in x["what"]
               and "no tokenizer.json" in x["what"] for x in d["differences"])


def test_a_second_make_example_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    import fcntl

    work = tmp_path / "demo.streammerge-partial"
    work.mkdir()
    (work / "base").mkdir()  # the first one's work in progress
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT)  # streammerge.locks: the work folder's lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = invoke("make-example", tmp_path / "demo")
    finally:
        os.close(fd)
    assert result.exit_code == 1 and "another make-example" in result.stderr and "is writing" in result.stderr
    assert (work / "base").is_dir() and not (tmp_path / "demo").exists(), "the other run's work must be left alone"


def test_plan_says_when_a_merge_is_writing_the_output_now(fam, out):
    import fcntl

    work = out.with_name(out.name + ".streammerge-partial")
    work.mkdir()
    (work / "owner").write_text("pid 4242 on elsewhere")
    fd = os.open(work / "lock", os.O_RDWR | os.O_CREAT)  # streammerge.locks: the work folder's lock file
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = invoke(*merge_args(fam, out, command="plan"))
    finally:
        os.close(fd)
    line = next(s for s in r.stdout.splitlines() if s.startswith("destination"))
    assert "a merge (pid 4242 on elsewhere) is writing" in line and "refused until it ends" in line


def test_the_model_card_and_manifest_record_the_options(fam, out):
    merge_ok(fam, out, "--dtype", "float32", "--exclude", r"model\.norm")
    card = (out / "README.md").read_text()
    assert "## Options" in card and "- `--dtype` `float32`" in card and "- `--exclude` `model\\.norm`" in card
    manifest = json.loads((out / "streammerge-manifest.json").read_text())
    assert manifest["params"] == {"t": 1.0, "s": 1.0}
    assert manifest["options"] == {"dtype": "float32", "exclude": [r"model\.norm"]}


def test_force_over_a_folder_that_is_not_a_merge_says_what_it_deletes(fam, out):
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = invoke(*merge_args(fam, out, "--force", "-q"))
    assert r.exit_code == 0 and "note: --force:" in r.stderr and "is not a streammerge output" in r.stderr
    assert "notes.txt" in r.stderr


def test_a_finished_merge_whose_input_was_only_touched_says_so(fam, out):
    merge_ok(fam, out)
    shard = fam["chat"] / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    plan = invoke(*merge_args(fam, out, command="plan"))
    assert "was modified (same size and header)" in plan.stdout, plan.stdout
    again = invoke(*merge_args(fam, out, "-q"))
    assert again.exit_code == 1 and f"model 1 file {shard.resolve()} was modified" in again.stderr, again.stderr
    assert "nothing to do" in again.stderr and "--force" in again.stderr
    before = (out / "model.safetensors").read_bytes()
    merge_ok(fam, out, "--force")
    assert (out / "model.safetensors").read_bytes() == before  # the same bytes: only the time changed


@pytest.mark.parametrize("folder", ["/proc/streammerge-example", "/sys/streammerge/example"])
def test_make_example_refuses_a_place_it_cannot_write_with_a_message(folder):
    result = invoke("make-example", folder)
    assert result.exit_code == 1 and "virtual file system" in result.stderr and "Traceback" not in result.output


def test_name_and_option_problems_come_in_one_list(fam, out):
    r = invoke(*merge_args(fam, out, "--method", "ties", "--param", "density=2", "--exclude", "zzz", "--exclude",
                           "a(", "--dtype", "int4", "--embedding", "foo", "-q"))
    assert r.exit_code == 1 and "5 problems:" in r.stderr, r.stderr
    for phrase in ("density=2.0", "'int4'", "--exclude 'a('", "--exclude 'zzz' matches no tensor", "--embedding 'foo'"):
        assert phrase in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("method", ["widen", "model_stock", "ties", "linear"])
def test_the_least_budget_a_refusal_names_is_enough(method, fam):
    args = ["plan", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--method", method,
            "--device", "cpu"]
    refused = invoke(*args, "--max-ram", "2KiB")
    assert refused.exit_code == 1 and "is too small" in refused.stderr, refused.output
    least = int(re.search(r"\(--max-ram (\d+)B\)", refused.stderr).group(1))
    assert invoke(*args, "--max-ram", f"{least}B").exit_code == 0, f"{least} bytes was named but is refused"
    assert invoke(*args, "--max-ram", f"{least * 9 // 10}B").exit_code == 1, "the named least is far too high"


def test_a_damaged_finished_output_is_merged_again_and_force_always_merges(fam, out):
    merge_ok(fam, out)
    good = (out / "model.safetensors").read_bytes()
    with open(out / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    again = invoke(*merge_args(fam, out, "--force", "-q"))
    assert again.exit_code == 0 and "merged model written" in again.stdout, again.output
    assert (out / "model.safetensors").read_bytes() == good
    (out / "model.safetensors").unlink()
    refused = invoke(*merge_args(fam, out, "-q"))  # not "already complete": the shard is gone
    assert refused.exit_code == 1 and "--force" in refused.stderr


def test_resume_json_of_a_finished_output_is_json(fam, out):
    merge_ok(fam, out)
    d = json.loads(invoke("resume", out, "--json").stdout)
    assert d == {"out": str(out), "already_complete": True, "summary": None}


def test_widen_refuses_a_score_beyond_float32(fam, out):
    r = invoke(*merge_args(fam, out, "--param", "s=1e39", "-q"))
    assert r.exit_code == 1 and "s=1e+39 is too large" in r.stderr and "float32" in r.stderr
    assert not out.exists() and not out.with_name(out.name + ".streammerge-partial").exists()


def test_an_exclude_that_catches_everything_is_noted(fam, out):
    r = invoke(*merge_args(fam, out, "--exclude", ".*", "-q"))
    assert r.exit_code == 0 and "note: every floating-point tensor matches --exclude" in r.stderr


def test_an_output_published_by_another_run_while_this_one_starts_is_not_overwritten(fam, out, monkeypatch):
    """Between the output check at planning and the work folder's lock, another run may publish the same merge
    (the first checks pass for both): the later one stops before merging, with nothing left behind."""
    from streammerge import execute as execute_module

    real = execute_module.load_torch

    def another_run_finishes_meanwhile() -> None:
        real()
        monkeypatch.setattr(execute_module, "load_torch", real)
        assert invoke(*merge_args(fam, out, "-q")).exit_code == 0

    monkeypatch.setattr(execute_module, "load_torch", another_run_finishes_meanwhile)
    r = invoke(*merge_args(fam, out, "-q"))
    assert r.exit_code == 1 and "was completed by another run of this merge" in r.stderr, r.output
    assert not out.with_name(out.name + ".streammerge-partial").exists()


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6])
def test_a_ctrl_c_during_torchs_import_arrives_after_it(delay):
    """torch's start-up runs Python callbacks from C++: an interrupt raised inside one aborts the process. The
    import holds a Ctrl-C and delivers it as a KeyboardInterrupt once torch is imported."""
    import signal
    import subprocess
    import sys

    code = f"""
import os, signal, sys, threading, time
threading.Timer({delay}, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
from streammerge._torch import import_torch
try:
    import_torch()
    time.sleep({delay} + 1)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted", "torch" in sys.modules)
"""
    # a process started from a terminal: Ctrl-C at its default. A child inherits an ignored SIGINT, and pytest has
    # one when it runs as a background job of a non-interactive shell (a CI run started that way failed here)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.returncode == 0 and r.stdout.strip() == "interrupted True", (r.returncode, r.stdout, r.stderr[-500:])
