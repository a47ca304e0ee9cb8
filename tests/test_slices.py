"""Layer stacking (mergekit's passthrough with slices:): the output's layers are the slices' layers in order, each a
copy of its input (times the scale the recipe sets, with filters and gradients), embeddings from the first slice's
model and the norm and head from the last; config.json gets the stacked layer count and per-layer lists, and
transformers loads and runs the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from streammerge.cli import main

transformers = pytest.importorskip("transformers", reason="the stacked model is loaded with transformers")

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stack")
    out = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**CONFIG)).save_pretrained(root / name)
        out[name] = root / name
    return out


RECIPE = """
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
parameters:
  scale:
    - filter: o_proj
      value: [1.0, 0.5]
    - value: 1.0
"""


def _recipe(tmp: Path, models: dict[str, Path], text: str = RECIPE) -> Path:
    path = tmp / "stack.yaml"
    path.write_text(text.format(**models))
    return path


def test_slices_stack_layers_into_a_model_transformers_loads(models, tmp_path):
    r = CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, models)), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    out, a, b = (load_file(f / "model.safetensors") for f in (tmp_path / "out", models["a"], models["b"]))
    # output layer -> (input model, input layer): a's 0, 1, 2 then b's 1, 2, 3
    source = {0: (a, 0), 1: (a, 1), 2: (a, 2), 3: (b, 1), 4: (b, 2), 5: (b, 3)}
    for layer, (model, j) in source.items():
        t = (j - (0 if model is a else 1)) / 2  # the position within its slice
        for part in ("mlp.up_proj.weight", "self_attn.q_proj.bias", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{layer}.{part}"], model[f"model.layers.{j}.{part}"]), (layer, part)
        scale = 1.0 - 0.5 * t  # the o_proj gradient [1.0, 0.5] within each slice
        want = model[f"model.layers.{j}.self_attn.o_proj.weight"] * scale
        assert torch.allclose(out[f"model.layers.{layer}.self_attn.o_proj.weight"], want), layer
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"]) and torch.equal(out["model.norm.weight"],
                                                                                    b["model.norm.weight"])
    assert not any(".layers.6." in n for n in out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
    model, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()
    # the plan says where each output tensor comes from
    plan = CliRunner().invoke(main, ["plan", str(_recipe(tmp_path, models)), "--json"])
    inputs = {t["name"]: t["inputs"][0] for t in json.loads(plan.stdout)["tensors"]}
    assert inputs["model.layers.4.mlp.up_proj.weight"]["model"] == "b"
    assert inputs["model.layers.4.mlp.up_proj.weight"]["tensor"] == "model.layers.2.mlp.up_proj.weight"
    # the recipe written beside it reruns it byte for byte
    again = CliRunner().invoke(main, ["merge", str(tmp_path / "out" / "streammerge_recipe.yaml"), "--out",
                                      str(tmp_path / "again"), "-q"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (tmp_path / "again" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("text,expected", [
    (RECIPE.replace("[1, 4]", "[1, 5]"), ["slice 2", "[1, 5]", "has 4 layers"]),
    (RECIPE.replace("passthrough", "ties"), ["lists other models", "same models in every slice"]),
    (RECIPE.replace("      - model: {b}\n", "      - model: {a}\n        layer_range: [0, 1]\n      - model: {b}\n"),
     ["exactly one source per slice"]),
    (RECIPE.replace("layer_range: [0, 3]", "layer_range: [0, x]"), ["layer_range must be [first, last + 1]"]),
])
def test_bad_slices_are_refused_before_anything_is_written(models, tmp_path, text, expected):
    r = CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, models, text)), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and not (tmp_path / "out").exists()
    for phrase in expected:
        assert phrase in r.output, (phrase, r.output)


def test_a_source_scale_and_a_one_model_copy(models, tmp_path):
    """passthrough's scale set on a source (mergekit's per-input scale), and passthrough of one model: a copy."""
    text = RECIPE.replace("        layer_range: [1, 4]\n", "        layer_range: [1, 4]\n"
                          "        parameters:\n          scale:\n            - filter: o_proj\n"
                          "              value: 0.0\n            - value: 1.0\n")
    r = CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, models, text)), "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 0, r.output
    out, b = (load_file(f / "model.safetensors") for f in (tmp_path / "o", models["b"]))
    assert not out["model.layers.4.self_attn.o_proj.weight"].any()  # from b's slice: scale 0 on o_proj
    assert torch.equal(out["model.layers.4.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"])
    copy = tmp_path / "copy.yaml"
    copy.write_text(f"merge_method: passthrough\nmodels:\n  - model: {models['b']}\nout_dtype: bfloat16\n")
    r = CliRunner().invoke(main, ["merge", str(copy), "--out", str(tmp_path / "c"), "-q"])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "c" / "model.safetensors")
    assert set(got) == set(b) and all(torch.equal(got[n], b[n].to(torch.bfloat16)) for n in b)
