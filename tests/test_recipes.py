"""mergekit recipes run unchanged, with mergekit's meaning: per-model parameters, gradients over the layers,
filter conditions, the base listed among the models, dtype/out_dtype; unsupported keys are refused by name; every
output holds a recipe that reruns it byte for byte, and a model card the Hub reads."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import assert_matches
from reference_baselines import reference_merge, slerp_tensor
from safetensors.torch import load_file

from streammerge import Recipe, api
from streammerge.cli import main
from streammerge.examples import SHAPES, write_family

LAYERS = 4  # positions t = 0, 1/3, 2/3, 1: a gradient is interpolated, not only read at its ends


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("fam"), replace(SHAPES["tiny-llama"], layers=LAYERS), dtype="f32")


def _write(tmp: Path, recipe: str, fam: dict[str, Path]) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(recipe.format(**{k: str(v) for k, v in fam.items()}))
    return path


def _merge(path: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["merge", str(path), "--out", str(out), "-q", *extra])


def _dense(folder: Path) -> dict[str, torch.Tensor]:
    return {n: t.float() for n, t in load_file(folder / "model.safetensors").items()}


def _t(name: str) -> float:
    """The position of a tensor as mergekit gives it: layer i of n at i / (n - 1); anything else at 0."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) / (LAYERS - 1) if m else 0.0


def _gradient(values: list[float], t: float) -> float:
    return float(np.interp(t, np.linspace(0, 1, len(values)), values))


def _assert_ties(fam: dict[str, Path], recipe: Path, out: Path, weight: list[float]) -> None:
    """``recipe`` merges chat and multilingual by TIES (densities 0.5 and 0.8, no normalization) as the dense
    reference does."""
    r = _merge(recipe, out)
    assert r.exit_code == 0, r.output
    want = reference_merge("ties", _dense(fam["base"]), [_dense(fam["chat"]), _dense(fam["multilingual"])],
                           {"density": [0.5, 0.8], "weight": weight, "normalize": False})
    assert_matches(_dense(out), want)


def test_ties_with_per_model_density_and_weight(fam, tmp_path):
    path = _write(tmp_path, """
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {chat}
    parameters: {{density: 0.5, weight: 0.7}}
  - model: {multilingual}
    parameters: {{density: 0.8, weight: 0.3}}
parameters:
  normalize: false
  int8_mask: true
lazy_unpickle: true
dtype: float32
""", fam)
    _assert_ties(fam, path, tmp_path / "out", weight=[0.7, 0.3])


def test_gradient_slerp_with_self_attn_and_mlp_filters(fam, tmp_path):
    """The recipe in mergekit's README: t follows one gradient in attention, the reverse in the MLP, 0.5
    elsewhere; the base is listed among the models."""
    attn, mlp = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
    path = _write(tmp_path, f"""
merge_method: slerp
base_model: {{base}}
models:
  - model: {{base}}
  - model: {{chat}}
parameters:
  t:
    - filter: self_attn
      value: {attn}
    - filter: mlp
      value: {mlp}
    - value: 0.5
dtype: float32
""", fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    base, chat, got = _dense(fam["base"]), _dense(fam["chat"]), _dense(tmp_path / "out")
    seen = set()
    for name, b in base.items():
        t = _gradient(attn, _t(name)) if "self_attn" in name else _gradient(mlp, _t(name)) if "mlp" in name else 0.5
        seen.add(round(t, 6))
        assert torch.allclose(got[name], slerp_tensor(b, chat[name], t), atol=1e-6), (name, t)
    assert len(seen) > 4  # the gradients were really interpolated
    plan = CliRunner().invoke(main, ["plan", str(path), "--json"])
    doc = json.loads(plan.stdout)
    ts = {t["name"]: t["params"]["t"] for t in doc["tensors"] if "params" in t}
    assert ts["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(_gradient(attn, 1 / 3))
    assert ts["model.layers.1.mlp.up_proj.weight"] == pytest.approx(_gradient(mlp, 1 / 3))
    assert doc["params"]["t"] == "varies per tensor"


def test_linear_without_base_model_averages_every_listed_model(fam, tmp_path):
    path = _write(tmp_path, """
merge_method: linear
models:
  - model: {chat}
    parameters: {{weight: 1.0}}
  - model: {multilingual}
    parameters: {{weight: 3.0}}
""", fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    chat, ml = _dense(fam["chat"]), _dense(fam["multilingual"])
    assert_matches(_dense(tmp_path / "out"), {n: (chat[n] + 3 * ml[n]) / 4 for n in chat})


def test_dare_ties_and_out_dtype(fam, tmp_path):
    path = _write(tmp_path, """
merge_method: dare_ties
base_model: {base}
models:
  - model: {chat}
    parameters: {{density: 0.6}}
  - model: {multilingual}
    parameters: {{density: 0.4}}
parameters: {{weight: 0.5, int8_mask: true}}
dtype: float16
out_dtype: bfloat16
""", fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}  # out_dtype wins over dtype
    want = reference_merge("dare_ties", _dense(fam["base"]), [_dense(fam["chat"]), _dense(fam["multilingual"])],
                           {"density": [0.6, 0.4], "weight": 0.5})
    assert all(torch.equal(got[n], want[n].to(torch.bfloat16)) for n in want)


def test_a_merge_reruns_from_its_recipe_byte_for_byte(fam, tmp_path):
    args = ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model", str(fam["multilingual"]),
            "--method", "ties", "--param", "density=0.5,0.7", "--param", "weight=0.6", "--dtype", "bfloat16",
            "--exclude", "model.norm", "--out", str(tmp_path / "first"), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    recipe = tmp_path / "first" / "streammerge_recipe.yaml"
    doc = yaml.safe_load(recipe.read_text())
    assert doc["merge_method"] == "ties" and doc["parameters"] == {"weight": 0.6}
    assert [m.get("parameters") for m in doc["models"]] == [{"density": 0.5}, {"density": 0.7}]
    assert doc["out_dtype"] == "bfloat16" and doc["streammerge"] == {"exclude": ["model.norm"]}
    r = _merge(recipe, tmp_path / "again")
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "first" / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    # a merge from a mergekit recipe keeps that recipe too
    assert yaml.safe_load((tmp_path / "again" / "mergekit_config.yml").read_text()) == doc


@pytest.mark.parametrize("method,params", [("linear", ["--param", "weight=0.3,0.9"]), ("karcher", []),
                                           ("multislerp", ["--param", "weight=0.4,0.6"])])
def test_a_merge_whose_base_is_no_input_reruns_from_its_recipe(fam, tmp_path, method, params):
    """linear's and karcher's --base only gives the structure, while a recipe's base_model is averaged (mergekit):
    the written recipe says so (streammerge: average_base: false) and reruns to the same bytes."""
    args = ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model", str(fam["multilingual"]),
            "--method", method, *params, "--out", str(tmp_path / "first"), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    recipe = tmp_path / "first" / "streammerge_recipe.yaml"
    doc = yaml.safe_load(recipe.read_text())
    assert doc.get("streammerge", {}).get("average_base", True) is (method == "multislerp")
    r = _merge(recipe, tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == \
        (tmp_path / "again" / "model.safetensors").read_bytes()


def test_the_model_card_has_front_matter_the_hub_reads(fam, tmp_path):
    api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", method="task_arithmetic")
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"base_model": ["base", "chat", "multilingual"], "base_model_relation": "merge",
                     "library_name": "transformers", "tags": ["merge", "streammerge", "task_arithmetic"]}
    assert "streammerge merge streammerge_recipe.yaml --out FOLDER" in text
    recipe = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])  # the recipe, inputs by folder name
    assert recipe["base_model"] == "base" and [m["model"] for m in recipe["models"]] == ["chat", "multilingual"]
    assert str(tmp_path) not in text


def test_the_model_card_tells_apart_inputs_of_the_same_folder_name(fam, tmp_path):
    import shutil
    other = tmp_path / "elsewhere" / "chat"
    shutil.copytree(fam["chat"], other)
    api.merge(fam["base"], [fam["chat"], other], tmp_path / "out", method="task_arithmetic",
              params={"weight": [0.5, 0.25]})
    text = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == ["base", f"{fam['chat'].parent.name}/chat", "elsewhere/chat"]
    assert "weight=[0.5, 0.25]" in text


def test_python_recipe_round_trip(fam, tmp_path):
    path = _write(tmp_path, """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {chat}
    parameters: {{weight: [0.2, 1.0]}}
  - model: {multilingual}
parameters: {{weight: 0.5}}
""", fam)
    assert Recipe.from_yaml(path).out is None  # as the README shows it: the output is given when merging
    recipe = Recipe.from_yaml(path, out=tmp_path / "out")
    assert recipe.method == "task_arithmetic" and recipe.models == (fam["chat"], fam["multilingual"])
    assert recipe.model_parameters == ({"weight": [0.2, 1.0]}, {}) and recipe.parameters == {"weight": 0.5}
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    plans = [api.plan_recipe(Recipe.from_yaml(p, out=tmp_path / "out"), dry_run=True) for p in (path, again)]
    assert [t.fingerprint for t in plans[0].tensors] == [t.fingerprint for t in plans[1].tensors]
    weights = {t.name: t.params["weight"] for t in plans[0].tensors if t.params}
    assert weights["model.embed_tokens.weight"] == (0.2, 0.5)  # outside the layers: t = 0
    assert weights["model.layers.3.mlp.up_proj.weight"] == (1.0, 0.5)
    assert weights["model.layers.1.mlp.up_proj.weight"] == pytest.approx((0.2 + 0.8 / 3, 0.5))


REFUSED = {
    "slices-and-models": ("slices:\n  - sources: [{{model: {chat}, layer_range: [0, 2]}}]\n",
                          ["give models: or slices:, not both"]),
    "union-without-tokenizers": ("tokenizer_source: union\n", ["has no tokenizer.json", "vocabulary is built"]),
    "token-from-no-input": ("tokenizer: {{source: union, tokens: {{x: {{source: {base}/..}}}}}}\n",
                            ["tokenizer.tokens 'x'", "is not one of the recipe's models"]),
    "mergekit-multi": ("---\nmerge_method: linear\nmodels: [{{model: {chat}}}]\n",
                       ["holds 2 YAML documents: a mergekit-multi file"]),
    "multi-name": ("name: first\n", ["name: belongs to mergekit-multi files"]),
    "tokenizer-source-typo": ("tokenizer_source: unoin\n", ["tokenizer_source 'unoin' is not a folder",
                                                             "did you mean 'union'?"]),
    "int8-mask-typo": ("parameters: {{int8mask: true}}\n", ["did you mean 'int8_mask'?"]),
    "filter-typo": ("parameters: {{density: [{{filtr: mlp, value: 0.5}}, {{value: 0.4}}]}}\n",
                    ["did you mean 'filter' for 'filtr'?"]),
    "mergekit-moe": ("gate_mode: hidden\nexperts:\n  - source_model: {chat}\n",
                     ["gate_mode, experts: this is a mergekit-moe configuration"]),
    "token-kind": ("tokenizer: {{tokens: {{x: {{source: {{kind: random}}}}}}}}\n", ["source kind 'random'",
                                                                                  "kind: zero"]),
    "token-key": ("tokenizer: {{tokens: {{x: {{sourc: {base}}}}}}}\n", ["unknown key 'sourc'", "did you mean"]),
    "chat-template-name": ("chat_template: vicuna\n", ["chat_template 'vicuna'", "chatml"]),
    "typo": ("merge_methd: ties\n", ["unknown key 'merge_methd'", "did you mean 'merge_method'"]),
    "param-typo": ("parameters: {{densty: 0.5}}\n", ["densty", "did you mean 'density'"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_recipes_cannot_do_yet_is_refused_by_name(fam, tmp_path, case):
    extra, expected = REFUSED[case]
    body = "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {chat}\n  - model: {multilingual}\n"
    path = _write(tmp_path, body + extra, fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code != 0 and not (tmp_path / "out").exists()
    for text in expected:
        assert text in r.output, (text, r.output)


@pytest.mark.parametrize("entry,expected", [
    ("  - model: {chat}\n    parameters: {{normalize: true}}\n", ["normalize is not per model", "top-level"]),
    ("  - model: {chat}+adapters/lora\n", ["adapters/lora is not a local folder", "hf download"]),
    ("  - model: Qwen/Qwen1.5-7B-Chat\n", ["Qwen/Qwen1.5-7B-Chat is not a local folder", "hf download"]),
    ("  - modle: {chat}\n", ["needs a model: key"]),
])
def test_bad_model_entries_are_refused_with_what_to_do(fam, tmp_path, entry, expected):
    path = _write(tmp_path, "merge_method: ties\nbase_model: {base}\nmodels:\n" + entry +
                  "  - model: {multilingual}\n", fam)
    r = _merge(path, tmp_path / "out", "--offline")  # a Hub ID is looked up in the cache only
    assert r.exit_code != 0
    for text in expected:
        assert text in r.output, (text, r.output)


def test_the_recipe_decides_what_is_merged_and_the_command_line_how(fam, tmp_path):
    path = _write(tmp_path, "merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {chat}\n", fam)
    r = CliRunner().invoke(main, ["merge", str(path), "--out", str(tmp_path / "o"), "--method", "ties",
                                  "--dtype", "bf16"])
    assert r.exit_code == 2 and "--method, --dtype: the recipe" in r.output
    r = CliRunner().invoke(main, ["merge", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Missing option '--base'" in r.output and "RECIPE.yaml" in r.output
    r = CliRunner().invoke(main, ["plan", str(path), "--max-ram", "64MiB"])
    assert r.exit_code == 0 and "method      linear" in r.output


def _with_template(src: Path, dst: Path, template: str | None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("setting,expected", [
    ("chatml", "<|im_start|>"),
    ("llama3", "<|start_header_id|>"),
    ("alpaca", "### Instruction:"),
    ("mistral", "[INST]"),
    ("auto", "{{ 'B' }}"),  # two of the three inputs carry B
    ("'{% for m in messages %}{{ m.content }}{% endfor %}'", "{% for m in messages %}{{ m.content }}{% endfor %}"),
])
def test_chat_template_auto_builtin_or_jinja(fam, tmp_path, setting, expected):
    inputs = {"base": _with_template(fam["base"], tmp_path / "b", "{{ 'A' }}"),
              "chat": _with_template(fam["chat"], tmp_path / "c", "{{ 'B' }}"),
              "multilingual": _with_template(fam["multilingual"], tmp_path / "m", "{{ 'B' }}")}
    path = tmp_path / "recipe.yaml"
    path.write_text(f"merge_method: linear\nbase_model: {inputs['base']}\nmodels:\n  - model: {inputs['chat']}\n"
                    f"  - model: {inputs['multilingual']}\nchat_template: " + setting + "\n")
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    jinja = (tmp_path / "out" / "chat_template.jinja").read_text()
    assert expected in jinja
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == jinja


def test_a_full_range_slice_merges_like_the_models_form(fam, tmp_path):
    """LazyMergekit's SLERP template: one slice over every layer of two models is the models: form."""
    gradient = "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n    - value: 0.3\n"
    sliced = _write(tmp_path, f"""
slices:
  - sources:
      - model: {{base}}
        layer_range: [0, {LAYERS}]
      - model: {{chat}}
        layer_range: [0, {LAYERS}]
merge_method: slerp
base_model: {{base}}
""" + gradient, fam)
    assert _merge(sliced, tmp_path / "sliced").exit_code == 0
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"merge_method: slerp\nbase_model: {fam['base']}\nmodels:\n  - model: {fam['chat']}\n" + gradient)
    assert _merge(plain, tmp_path / "plain").exit_code == 0
    assert (tmp_path / "sliced" / "model.safetensors").read_bytes() == \
        (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_a_merge_per_layer_range_takes_each_models_own_range(fam, tmp_path):
    path = _write(tmp_path, """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {chat}
        layer_range: [2, 4]
merge_method: linear
""", fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    got, base, chat = (_dense(f) for f in (tmp_path / "out", fam["base"], fam["chat"]))
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        want = (base[name] + chat[f"model.layers.{layer + 2}.mlp.up_proj.weight"]) / 2
        assert torch.allclose(got[name], want, atol=1e-6), layer
    assert not any(".layers.2." in n for n in got)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize("sources,expected", [
    ("      - model: {base}\n        layer_range: [0, 2]\n      - model: {chat}\n        layer_range: [0, 3]\n",
     "as many layers"),
    ("      - model: {chat}\n        layer_range: [0, 2]\n      - model: {multilingual}\n        layer_range: [0, 2]\n",
     "must be one of every slice's sources"),
    ("      - model: {base}\n        layer_range: [0, 2]\n      - model: {chat}\n        layer_range: [0, 2]\n"
     "        parameters: {{lambda: 0.5}}\n",
     "parameter lambda is not per model"),
    ("      - model: {base}\n        layer_rang: [0, 2]\n", "unknown source key 'layer_rang'; did you mean 'layer_range'?"),
])
def test_bad_merge_slices_are_refused(fam, tmp_path, sources, expected):
    path = _write(tmp_path, "merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n" + sources, fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code != 0 and expected in r.output, r.output


@pytest.mark.parametrize("multiple,ok", [(7, True), (64, False)])
def test_pad_to_multiple_of_keeps_a_multiple_and_pads_only_with_tokenizers(fam, tmp_path, multiple, ok):
    """The family has no tokenizer.json: 301 rows are a multiple of 7 and kept; padding to 64 needs to know which
    rows are tokens (tests/test_vocabulary.py pads models that have tokenizers)."""
    rows = load_file(fam["base"] / "model.safetensors")["model.embed_tokens.weight"].shape[0]  # 301 = 7 * 43
    path = _write(tmp_path, "merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {chat}\n"
                  f"tokenizer:\n  source: base\n  pad_to_multiple_of: {multiple}\n", fam)
    r = _merge(path, tmp_path / "out")
    if ok:
        assert r.exit_code == 0, r.output
        assert load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"].shape[0] == rows
        assert yaml.safe_load((tmp_path / "out" / "streammerge_recipe.yaml").read_text())["tokenizer"] == {
            "source": "base", "pad_to_multiple_of": multiple}
    else:
        assert r.exit_code == 1 and f"the embedding's {rows} rows need padding rows" in r.output, r.output


def test_per_source_parameters_of_a_slice_are_the_models_parameters(fam, tmp_path):
    """LazyMergekit's TIES template puts density and weight on the slice's sources."""
    path = _write(tmp_path, f"""
slices:
  - sources:
      - model: {{base}}
        layer_range: [0, {LAYERS}]
      - model: {{chat}}
        layer_range: [0, {LAYERS}]
        parameters: {{{{density: 0.5, weight: 0.6}}}}
      - model: {{multilingual}}
        layer_range: [0, {LAYERS}]
        parameters: {{{{density: 0.8, weight: 0.3}}}}
merge_method: ties
base_model: {{base}}
parameters: {{{{normalize: false}}}}
dtype: float32
""", fam)
    _assert_ties(fam, path, tmp_path / "out", weight=[0.6, 0.3])


def test_linear_with_a_base_it_does_not_list_averages_the_base_too(fam, tmp_path):
    """mergekit 0.1.5 adds base_model to linear's inputs when models: does not list it."""
    path = _write(tmp_path, "merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {chat}\n"
                  "  - model: {multilingual}\nparameters: {{weight: 1.0}}\ndtype: float32\n", fam)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 0, r.output
    b, c, m = (_dense(fam[k]) for k in ("base", "chat", "multilingual"))
    assert_matches(_dense(tmp_path / "out"), {n: (b[n] + c[n] + m[n]) / 3 for n in b})
    assert "is the base itself" not in r.output


def test_an_interrupted_recipe_merge_resumes_to_the_same_bytes(fam, tmp_path, monkeypatch):
    """Per-tensor parameters, slices and the recipe's source survive the work folder: `resume OUT` (or the same
    command again) finishes with the bytes of an uninterrupted merge."""
    from helpers import interrupt_at_tensor

    path = _write(tmp_path, f"""
slices:
  - sources:
      - model: {{base}}
        layer_range: [0, {LAYERS}]
      - model: {{chat}}
        layer_range: [0, {LAYERS}]
        parameters: {{{{weight: [0.2, 1.0]}}}}
      - model: {{multilingual}}
        layer_range: [0, {LAYERS}]
merge_method: task_arithmetic
base_model: {{base}}
parameters:
  weight:
    - filter: mlp
      value: [1.0, 0.1]
    - value: 0.5
dtype: float32
""", fam)
    assert _merge(path, tmp_path / "whole").exit_code == 0
    interrupt_at_tensor(monkeypatch, 9)
    r = _merge(path, tmp_path / "out")
    assert r.exit_code == 130, r.output
    monkeypatch.undo()
    r = CliRunner().invoke(main, ["resume", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    for f in ("model.safetensors", "streammerge_recipe.yaml", "mergekit_config.yml"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
