"""LoRA adapters as streamed inputs: ``streammerge apply MODEL+ADAPTER`` equals PEFT's ``merge_and_unload()`` for
every kind of adapter PEFT makes (plain, rsLoRA, rank/alpha patterns, ``fan_in_fan_out`` on GPT-2's Conv1D, embedding
LoRA, ``modules_to_save``, DoRA, ``lora_bias``, ``bias: all``, trainable tokens), byte for byte at any chunking; a merge
with LoRA inputs equals the same merge over materialised models (widen, ties, task_arithmetic); the output loads in
transformers. Adapters are made in the test with ``peft`` on tiny random transformers models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from streammerge.cli import main

peft = pytest.importorskip("peft", reason="peft makes the adapters these tests apply (a test dependency only)")
transformers = pytest.importorskip("transformers", reason="the tiny models are made with transformers")

#: every merge here has LoRA inputs and says so (a MergeNotice); the notes are checked through the plan
pytestmark = pytest.mark.filterwarnings("ignore::streammerge.execute.MergeNotice", "ignore::UserWarning")

VOCAB, HIDDEN, FFN = 101, 40, 72  # odd and unequal sizes: chunks and product groups end mid-way


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _config(kind: str, **extra):
    if kind == "gpt2":
        return transformers.GPT2Config(**{**dict(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                                 bos_token_id=0, eos_token_id=0), **extra})
    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    return cls(**{**dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0), **extra})


def make_model(folder: Path, kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **extra) -> Path:
    """A tiny random ``kind`` (llama, qwen2, gpt2) model saved as safetensors in ``folder``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, **extra)).to(dtype)
    with torch.no_grad():  # larger than the init's 0.02 std, so changes are not lost in rounding
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def make_adapter(model_folder: Path, folder: Path, seed: int = 1, **lora) -> dict[str, torch.Tensor]:
    """Save a PEFT adapter with random weights for ``model_folder`` into ``folder``; return PEFT's
    ``merge_and_unload()`` of it (float32 state dict), the reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    torch.manual_seed(seed)
    with torch.no_grad():  # every trained tensor random: B, DoRA's magnitudes, biases, saved modules, token rows
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(folder)
    merged = pm.merge_and_unload()
    return {k: v.detach().float().clone() for k, v in merged.state_dict().items()}


def run(*args: str):
    result = CliRunner().invoke(main, [*map(str, args)])
    return result


def apply(model: Path, adapter: Path, out: Path, *extra: str) -> Path:
    r = run("apply", f"{model}+{adapter}", "--out", out, "-q", *extra)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def file_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def assert_like_peft(out: Path, reference: dict[str, torch.Tensor], rtol: float = 2e-6, atol: float = 2e-6) -> None:
    got = weights(out)
    assert set(got) <= set(reference)
    for name, value in got.items():
        torch.testing.assert_close(value.float(), reference[name], rtol=rtol, atol=atol, msg=name)


# ---- apply == PEFT merge_and_unload -----------------------------------------------------------------------------
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "plain": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "rslora": ("llama", {}, dict(r=8, lora_alpha=4, use_rslora=True, target_modules=LLAMA_LINEAR)),
    "rank_pattern": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR,
                                       rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                                       alpha_pattern={"up_proj": 3.0})),
    "gpt2_fan_in_fan_out": ("gpt2", {}, dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"],
                                             fan_in_fan_out=True)),
    "embedding": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "modules_to_save": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=["v_proj"],
                                          modules_to_save=["lm_head"])),
    "dora": ("llama", {}, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"])),
    "lora_bias": ("qwen2", {}, dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj"])),
    "bias_all": ("qwen2", {}, dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "v_proj"])),
    "trainable_tokens": ("llama", {}, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                           trainable_token_indices={"embed_tokens": [3, 0, 57, 100]})),
    "tied_embedding": ("llama", {"tie_word_embeddings": True}, dict(r=4, lora_alpha=8,
                                                                  target_modules=["embed_tokens", "v_proj"])),
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Models and adapters by case name: (model folder, adapter folder, PEFT's merged weights)."""
    cache: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]] = {}

    def get(case: str) -> tuple[Path, Path, dict[str, torch.Tensor]]:
        if case not in cache:
            kind, extra, lora = CASES[case]
            root = tmp_path_factory.mktemp(case)
            model = make_model(root / "model", kind, **extra)
            cache[case] = (model, root / "adapter", make_adapter(model, root / "adapter", **lora))
        return cache[case]

    return get


#: per case, a tensor the adapter changes (so that a test cannot pass by copying the model)
CHANGED = {"plain": "model.layers.1.mlp.down_proj.weight", "rslora": "model.layers.0.mlp.gate_proj.weight",
           "rank_pattern": "model.layers.1.self_attn.q_proj.weight",
           "gpt2_fan_in_fan_out": "transformer.h.1.attn.c_attn.weight", "embedding": "model.embed_tokens.weight",
           "modules_to_save": "lm_head.weight", "dora": "model.layers.0.self_attn.o_proj.weight",
           "lora_bias": "model.layers.0.self_attn.k_proj.bias", "bias_all": "model.layers.1.self_attn.k_proj.bias",
           "trainable_tokens": "model.embed_tokens.weight", "tied_embedding": "model.embed_tokens.weight"}


@pytest.mark.parametrize("case", list(CASES))
def test_apply_equals_peft_merge_and_unload(made, tmp_path, case):
    model, adapter, reference = made(case)
    out = apply(model, adapter, tmp_path / "out")
    assert_like_peft(out, reference)
    name = CHANGED[case]
    assert (weights(out)[name] - weights(model)[name]).abs().max() > 1e-3, name
    manifest = json.loads((out / "streammerge-manifest.json").read_text())
    assert manifest  # a finished, verifiable output
    assert run("verify", out).exit_code == 0


@pytest.mark.parametrize("case", ["plain", "gpt2_fan_in_fan_out", "embedding", "dora", "trainable_tokens",
                                  "lora_bias"])
def test_apply_bytes_do_not_depend_on_the_chunking(made, tmp_path, case):
    model, adapter, _ = made(case)
    whole = file_bytes(apply(model, adapter, tmp_path / "whole"))
    for rows in (1, 3, 7, 13):
        assert file_bytes(apply(model, adapter, tmp_path / f"c{rows}", "--chunk-rows", str(rows))) == whole, rows


def test_each_row_of_the_product_is_the_same_whatever_the_chunk():
    from streammerge.sources.lora import row_product

    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(203, 64, generator=g), torch.randn(64, 300, generator=g)
    whole = row_product(left, right, 0)
    torch.testing.assert_close(whole, left @ right, rtol=1e-5, atol=1e-5)
    for step in (1, 3, 7, 13, 64):
        for r0 in range(0, 203, step):
            assert torch.equal(row_product(left[r0:r0 + step], right, r0), whole[r0:r0 + step]), (step, r0)


def test_a_budget_that_splits_every_tensor_gives_the_same_bytes(made, tmp_path):
    """At a budget that cuts the tensors into many chunks, the planned slots hold the LoRA factors (the reader
    refuses a read larger than its slot) and the bytes are those of a one-chunk run."""
    model, adapter, _ = made("rslora")
    whole = file_bytes(apply(model, adapter, tmp_path / "whole"))
    r = run("apply", f"{model}+{adapter}", "--dry-run", "--json", "--max-ram", "24KiB")  # a plan needs no --out
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["predicted_peak_ram"] <= plan["budget"]["max_ram"]
    assert any(t["chunks"] > 1 for t in plan["tensors"] if t["inputs"][0]["kind"] == "lora")
    assert file_bytes(apply(model, adapter, tmp_path / "small", "--max-ram", "24KiB")) == whole
    r = run("apply", f"{model}+{adapter}")
    assert r.exit_code == 2 and "Missing option '--out'" in r.output and "--dry-run needs none" in r.output


def test_apply_output_loads_in_transformers_and_runs_like_peft(made, tmp_path):
    model, adapter, _ = made("dora")
    out = apply(model, adapter, tmp_path / "out")
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                     dtype=torch.float32)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), info
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload()
    tokens = torch.tensor([[1, 5, 17, 42, 100, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, merged(tokens).logits, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_model_keeps_its_dtype_and_rounds_once(tmp_path):
    model = make_model(tmp_path / "model", dtype=torch.bfloat16)
    reference = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    out = apply(model, tmp_path / "adapter", tmp_path / "out")
    got = weights(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    base = weights(model)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    pre = "base_model.model."
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        module = name.removesuffix(".weight")
        a, b = adapter[f"{pre}{module}.lora_A.weight"].float(), adapter[f"{pre}{module}.lora_B.weight"].float()
        exact = base[name].float() + (b @ a) * 2.0  # W + s·B@A in float32, rounded once to bfloat16
        torch.testing.assert_close(got[name].float(), exact.bfloat16().float(), rtol=0, atol=0.0079 * exact.abs().max())
        # PEFT adds a bfloat16-rounded delta to the bfloat16 weight (two roundings): within a bfloat16 step
        torch.testing.assert_close(got[name].float(), reference[name], rtol=1e-2, atol=1e-2)


def test_an_adapter_on_an_fp8_model_reads_the_weights_dequantized(tmp_path):
    from test_fp8 import dense, make_fp8

    model = make_model(tmp_path / "model")
    make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    fp8 = make_fp8(model, tmp_path / "fp8")  # 32×32 block scales: ragged blocks at the 40- and 72-wide edges
    out = apply(fp8, tmp_path / "adapter", tmp_path / "out", "--dtype", "float32")
    got, values = weights(out), dense(fp8)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.1.mlp.up_proj.weight"):
        module = "base_model.model." + name.removesuffix(".weight")
        a, b = adapter.get(module + ".lora_A.weight"), adapter.get(module + ".lora_B.weight")
        expected = values[name] + (b @ a) * 2.0 if a is not None else values[name]
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    for rows in (3, 7):
        assert file_bytes(apply(fp8, tmp_path / "adapter", tmp_path / f"c{rows}", "--dtype", "float32",
                                "--chunk-rows", str(rows))) == file_bytes(out)


# ---- merges with LoRA inputs == merges of the materialised models ---------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and two adapters on it (one on every linear layer and the embedding, one DoRA on attention), each also
    materialised by PEFT (merge_and_unload + save_pretrained) and by ``streammerge apply --dtype float32``."""
    root = tmp_path_factory.mktemp("family")
    base = make_model(root / "base")
    out = {"base": base}
    for name, lora in (("a1", dict(r=8, lora_alpha=16, target_modules=[*LLAMA_LINEAR, "embed_tokens"])),
                       ("a2", dict(r=4, lora_alpha=4, use_rslora=True, use_dora=True,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))):
        merged = make_adapter(base, root / name, seed=len(out), **lora)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.load_state_dict(merged)
        model.save_pretrained(root / f"peft_{name}")
        out[name], out[f"peft_{name}"] = root / name, root / f"peft_{name}"
        out[f"ours_{name}"] = apply(base, root / name, root / f"ours_{name}", "--dtype", "float32")
    return out


METHODS = {"widen": [], "ties": ["--param", "density=0.6"], "task_arithmetic": ["--param", "weight=0.7,0.4"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_merge_with_lora_inputs_equals_the_merge_of_materialised_models(family, tmp_path, method):
    base = family["base"]

    def merge(out: Path, *models: str, chunk: str | None = None) -> Path:
        r = run("merge", "--base", base, *[a for m in models for a in ("--model", m)], "--method", method,
                *METHODS[method], "--out", out, "-q", *(["--chunk-rows", chunk] if chunk else []))
        assert r.exit_code == 0, r.output
        return out

    streamed = merge(tmp_path / "lora", f"{base}+{family['a1']}", f"{base}+{family['a2']}")
    # bit for bit the merge of the adapted models written out in float32 (the same float32 values)
    ours = merge(tmp_path / "ours", family["ours_a1"], family["ours_a2"])
    assert file_bytes(streamed) == file_bytes(ours)
    # and the same bytes at odd chunk sizes
    assert file_bytes(merge(tmp_path / "c5", f"{base}+{family['a1']}", f"{base}+{family['a2']}", chunk="5")) \
        == file_bytes(streamed)
    # PEFT's materialised models differ from ours by float32 rounding of the product
    if method != "ties":  # (TIES's top-k selection can flip at an element that rounding moves across its threshold)
        theirs = weights(merge(tmp_path / "peft", family["peft_a1"], family["peft_a2"]))
        for name, value in weights(streamed).items():
            torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_adapter_can_follow_its_model_with_lora_or_stand_alone(family, tmp_path):
    base, a1, a2 = family["base"], family["a1"], family["a2"]
    plus = run("merge", "--base", base, "--model", f"{base}+{a1}", "--model", f"{base}+{a2}", "--method",
               "task_arithmetic", "--out", tmp_path / "plus", "-q")
    flag = run("merge", "--base", base, "--model", base, "--lora", a1, "--model", base, "--lora", a2, "--method",
               "task_arithmetic", "--out", tmp_path / "flag", "-q")
    alone = run("merge", "--base", base, "--model", a1, "--model", a2, "--method", "task_arithmetic",
                "--out", tmp_path / "alone", "-q")
    for r in (plus, flag, alone):
        assert r.exit_code == 0, r.output
    assert file_bytes(tmp_path / "plus") == file_bytes(tmp_path / "flag") == file_bytes(tmp_path / "alone")
    r = run("merge", "--base", base, "--lora", a1, "--model", base, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "belongs to the --model before it" in r.output
    r = run("merge", "--base", base, "--model", f"{base}+{a1}", "--lora", a2, "--out", tmp_path / "x")
    assert r.exit_code == 2 and "one adapter per model" in r.output


def test_an_adapter_on_a_fine_tune_merges_with_full_models(family, tmp_path):
    base = family["base"]
    r = run("merge", "--base", base, "--model", f"{family['ours_a2']}+{family['a1']}", "--model", family["ours_a1"],
            "--method", "task_arithmetic", "--out", tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output
    r = run("plan", "--base", base, "--model", f"{family['ours_a2']}+{family['a1']}", "--model", family["ours_a1"],
            "--method", "task_arithmetic", "--json")
    plan = json.loads(r.output)
    assert plan["adapters"] == [None, str(family["a1"]), None]
    # the adapter was trained on the base, not on the fine-tune it is applied to: a warning, not an error
    assert any("WARNING" in n and "base_model_name_or_path" in n for n in plan["notes"])
    q = next(t for t in plan["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert [i["kind"] for i in q["inputs"]] == ["stored", "lora", "stored"]
    assert q["inputs"][1]["base"]["model"] == "ours_a2" and q["inputs"][1]["r"] == 8


def test_recipes_take_model_plus_lora_and_outputs_rerun_themselves(family, tmp_path):
    base, a1, a2 = family["base"], family["a1"], family["a2"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nparameters: {{density: 0.6}}\nmodels:\n"
                      f"  - model: {base}+{a1}\n  - model: {base}+{a2}\n")
    r = run("merge", recipe, "--out", tmp_path / "yaml", "-q")
    assert r.exit_code == 0, r.output
    cli = run("merge", "--base", base, "--model", f"{base}+{a1}", "--model", f"{base}+{a2}", "--method", "ties",
              "--param", "density=0.6", "--out", tmp_path / "cli", "-q")
    assert cli.exit_code == 0 and file_bytes(tmp_path / "yaml") == file_bytes(tmp_path / "cli")
    for out in ("yaml", "cli"):
        again = run("merge", tmp_path / out / "streammerge_recipe.yaml", "--out", tmp_path / f"{out}-again", "-q")
        assert again.exit_code == 0, again.output
        assert file_bytes(tmp_path / f"{out}-again") == file_bytes(tmp_path / "cli")
    # mergekit's form of merge-and-unload: passthrough of one model+lora
    copy = tmp_path / "copy.yaml"
    copy.write_text(f"merge_method: passthrough\nmodels:\n  - model: {base}+{a1}\ndtype: float32\n")
    r = run("merge", copy, "--out", tmp_path / "copied", "-q")
    assert r.exit_code == 0, r.output
    assert file_bytes(tmp_path / "copied") == file_bytes(family["ours_a1"])
    applied = apply(base, a1, tmp_path / "applied", "--dtype", "float32")
    again = run("merge", applied / "streammerge_recipe.yaml", "--out", tmp_path / "applied-again", "-q")
    assert again.exit_code == 0, again.output
    assert file_bytes(tmp_path / "applied-again") == file_bytes(applied)


def test_an_interrupted_merge_with_lora_inputs_resumes_to_the_same_bytes(family, tmp_path, monkeypatch):
    from helpers import interrupt_at_tensor

    base, a1, a2 = family["base"], family["a1"], family["a2"]
    args = ["merge", "--base", base, "--model", f"{base}+{a1}", "--model", f"{base}+{a2}", "--method", "widen",
            "--chunk-rows", "7", "-q"]
    assert run(*args, "--out", tmp_path / "whole").exit_code == 0
    interrupt_at_tensor(monkeypatch, 9)
    r = run(*args, "--out", tmp_path / "resumed")
    assert r.exit_code != 0 and not (tmp_path / "resumed").exists()
    monkeypatch.undo()
    r = run("resume", tmp_path / "resumed", "-q")
    assert r.exit_code == 0, r.output
    assert file_bytes(tmp_path / "resumed") == file_bytes(tmp_path / "whole")


def test_python_api_takes_model_plus_adapter(family, tmp_path):
    import streammerge

    base, a1 = family["base"], family["a1"]
    p = streammerge.plan(base, [f"{base}+{a1}"], method="task_arithmetic")
    assert p.to_dict()["adapters"] == [None, str(a1)]
    out = streammerge.merge(base, [base], tmp_path / "o", method="task_arithmetic", adapters=[None, a1])
    expected = weights(family["ours_a1"])  # base + (adapted - base): the adapted model within float32 rounding
    for name, value in weights(out).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6, msg=name)


# ---- refused before anything is written -------------------------------------------------------------------------
def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def plain(made, tmp_path):
    """A copy of the plain case's adapter, to spoil."""
    import shutil

    model, adapter, _ = made("plain")
    shutil.copytree(adapter, tmp_path / "adapter")
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("changes,expected", [
    ({"peft_type": "IA3"}, ["peft_type is 'IA3'", "LORA"]),
    ({"target_parameters": ["experts.gate_up_proj"]}, ["target_parameters", "not supported"]),
    ({"layer_replication": [[0, 2], [1, 2]]}, ["layer replication"]),
    ({"init_lora_weights": "pissa"}, ["init_lora_weights 'pissa'", "path_initial_model_for_weight_conversion"]),
    ({"r": 8}, ["has rank 4", "r=8"]),
    ({"rank_pattern": {"down_proj": 2}}, ["down_proj.lora_A.weight has rank 4", "r=2"]),
    ({"use_dora": True}, ["use_dora", "no lora_magnitude_vector"]),
    ({"lora_alpha": "8"}, ["lora_alpha must be a number"]),
])
def test_bad_adapter_configs_are_refused_by_name(plain, tmp_path, changes, expected):
    model, adapter = plain
    _edit_config(adapter, **changes)
    r = run("apply", f"{model}+{adapter}", "--out", tmp_path / "out")
    assert r.exit_code == 1, r.output
    for text in expected:
        assert text in r.output, (text, r.output)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_pickled_and_corrupt_adapters_are_refused(plain, tmp_path):
    model, adapter = plain
    weights_file = adapter / "adapter_model.safetensors"
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[:-3])  # truncated: the header parser says so, nothing is read past it
    r = run("apply", f"{model}+{adapter}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "truncated" in r.output, r.output
    weights_file.unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not a pickle to open")
    r = run("apply", f"{model}+{adapter}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "never unpickles" in r.output, r.output
    r = run("merge", "--base", model, "--model", f"{model}+{tmp_path / 'no-such-adapter'}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "adapter folder" in r.output and "does not exist" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_model_is_refused_naming_the_tensor(made, tmp_path):
    _, adapter, _ = made("plain")
    other = make_model(tmp_path / "wide", hidden_size=48, num_attention_heads=4, tie_word_embeddings=False)
    r = run("apply", f"{other}+{adapter}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "do not fit model.layers.0.mlp.down_proj.weight [48, 72]" in r.output, r.output
    gpt2 = make_model(tmp_path / "gpt2", "gpt2")
    r = run("apply", f"{gpt2}+{adapter}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "which the model does not have" in r.output, r.output


def test_unsupported_combinations_are_refused(tmp_path):
    gpt2 = make_model(tmp_path / "gpt2", "gpt2")
    make_adapter(gpt2, tmp_path / "dora", r=2, lora_alpha=2, use_dora=True, target_modules=["c_fc"])
    r = run("apply", f"{gpt2}+{tmp_path / 'dora'}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "DoRA on transformer.h.0.mlp.c_fc.weight, a Conv1D weight" in r.output, r.output
    tied = make_model(tmp_path / "tied", tie_word_embeddings=True)
    make_adapter(tied, tmp_path / "head", r=2, lora_alpha=2, target_modules=["lm_head"])
    r = run("apply", f"{tied}+{tmp_path / 'head'}", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "ties to its token embedding" in r.output, r.output


def test_the_plan_counts_the_adapter_and_the_base_must_be_a_model(made, tmp_path):
    model, adapter, _ = made("plain")
    r = run("apply", f"{model}+{adapter}", "--out", tmp_path / "o", "--dry-run", "--json")
    plan = json.loads(r.output)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    model_bytes = (model / "model.safetensors").stat().st_size
    assert model_bytes < plan["bytes_read"] < model_bytes + adapter_bytes  # the header is not read
    assert plan["models"] == [] and plan["adapters"] == [str(adapter)]
    r = run("merge", "--base", adapter, "--model", model, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "is a LoRA adapter, not a model" in r.output
    r = run("apply", model, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no adapter" in r.output
    r = run("merge", "--base", model, "--model", f"{model}+", "--out", tmp_path / "o")  # not read as a Hub ID
    assert r.exit_code == 1 and "needs a model before the + and a LoRA adapter after it" in r.output, r.output


def test_analyze_takes_model_plus_adapter_like_merge(family, tmp_path):
    """``analyze`` reads MODEL+ADAPTER as merge does: its figures equal those of the adapted models written out."""
    import json

    import streammerge

    base = family["base"]
    streamed = streammerge.analyze(base, [f"{base}+{family['a1']}", f"{base}+{family['a2']}"])
    written = streammerge.analyze(base, [family["ours_a1"], family["ours_a2"]])
    assert streamed.to_json()["model"] == written.to_json()["model"]
    r = run("analyze", "--base", base, "--model", f"{base}+{family['a1']}", "--model", family["ours_a2"], "--json",
            "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"]["models"][0] == written.to_json()["model"]["models"][0]


def test_inspect_describes_model_plus_adapter_and_an_adapter_alone(made, tmp_path):
    model, adapter, _ = made("plain")
    r = run("inspect", f"{model}+{adapter}")
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{model}: ") and f"{adapter}: LoRA adapter, r " in r.output
    alone = run("inspect", adapter, "--json")
    info = json.loads(alone.output)["adapter"]
    names = list(load_file(adapter / "adapter_model.safetensors"))
    assert info["tensors"] == len(names)
    assert info["modules"] == sorted({n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in names
                                      if ".lora_" in n})
