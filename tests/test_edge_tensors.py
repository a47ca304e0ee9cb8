"""Tensors at the edges, for every method: empty tensors pass through with their shape, and a NaN or infinity in
any input stops the merge with one clean error naming the tensor, the input and the rows, leaving nothing behind
when nothing was merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streammerge.cli import main
from streammerge.examples import write_family
from streammerge.methods import all_methods

METHODS = sorted(m for m in all_methods() if m != "passthrough")  # passthrough stacks layers: test_slices.py
#: a parameter that makes the method do real work (not a pass-through of every delta)
PARAMS = {"ties": ["--param", "density=0.5"], "dare_ties": ["--param", "density=0.5"],
          "dare_linear": ["--param", "density=0.5"], "breadcrumbs": ["--param", "density=0.5"],
          "breadcrumbs_ties": ["--param", "density=0.5"]}
TARGET = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    return write_family(tmp_path_factory.mktemp("fam"), "tiny")


def _family(clean: dict[str, Path], tmp: Path, edit) -> dict[str, Path]:
    """A copy of the clean family with ``edit(name, tensors)`` applied to each model's tensors."""
    out = {}
    for name, folder in clean.items():
        (tmp / name).mkdir()
        for f in folder.iterdir():
            (tmp / name / f.name).write_bytes(f.read_bytes())
        tensors = load_file(folder / "model.safetensors")
        save_file(edit(name, tensors), tmp / name / "model.safetensors", metadata={"format": "pt"})
        out[name] = tmp / name
    return out


def _merge(fam: dict[str, Path], out: Path, method: str):
    models = [fam["chat"]] if all_methods()[method].max_models == 1 else [fam["chat"], fam["multilingual"]]
    args = ["merge", "--base", fam["base"], *(a for m in models for a in ("--model", m)), "--out", out,
            "--method", method, *PARAMS.get(method, []), "-q"]
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("shape", [(0,), (0, 8)], ids=["[0]", "[0,8]"])
@pytest.mark.parametrize("method", METHODS)
def test_empty_tensors_pass_through_with_their_shape(method, shape, clean, tmp_path):
    fam = _family(clean, tmp_path, lambda name, ts: {**ts, "model.empty": torch.zeros(shape, dtype=torch.bfloat16)})
    r = _merge(fam, tmp_path / "out", method)
    assert r.exit_code == 0, r.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert merged["model.empty"].shape == shape and merged["model.empty"].dtype == torch.bfloat16


@pytest.mark.parametrize("where", ["base", "chat"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_input_is_one_clean_error_for_every_method(method, value, where, clean, tmp_path):
    def poison(name, ts):
        if name == where:
            ts[TARGET][3, 5] = value
        return ts

    fam = _family(clean, tmp_path, poison)
    out = tmp_path / "out"
    r = _merge(fam, out, method)
    if all_methods()[method].base_policy == "none" and where == "base":  # linear, karcher: the base is unused
        assert r.exit_code == 0, r.output
        assert torch.isfinite(load_file(out / "model.safetensors")[TARGET].float()).all()
        return
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    message = r.stderr.strip()
    assert message.startswith("Error: ") and len(message.splitlines()) == 1, message
    who = "the base" if where == "base" else "model 1"
    assert f"tensor {TARGET} rows [" in message and who in message and str(fam[where]) in message, message
    assert "NaN or infinity" in message and "--exclude" in message, message
    # the tensors merged before the bad one are kept for a resume; with nothing merged, nothing is left
    partial = out.with_name(out.name + ".streammerge-partial")
    assert not out.exists()
    if partial.exists():
        assert "already merged are kept" in message
        journal = (partial / "journal.jsonl").read_text() if (partial / "journal.jsonl").exists() else ""
        assert journal or any(partial.rglob("*")), "a kept work folder must hold work"
    else:
        assert "Nothing was written" in message


INV_FREQ = "model.layers.0.self_attn.rotary_emb.inv_freq"


@pytest.mark.parametrize("holders", [("base",), ("base", "chat"), ("chat",), ("chat", "multilingual")],
                         ids=lambda h: "+".join(h))
def test_derived_buffers_come_from_the_base_whoever_saved_them(holders, clean, tmp_path):
    """Older transformers saved rotary ``inv_freq`` buffers, newer ones do not: the output has the base's (or none
    when the base has none), and no model needs to have it."""
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    fam = _family(clean, tmp_path, lambda name, ts: {**ts, **({INV_FREQ: inv * (2 if name != "base" else 1)}
                                                             if name in holders else {})})
    r = _merge(fam, tmp_path / "out", "ties")
    assert r.exit_code == 0, r.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    if "base" in holders:
        assert torch.equal(merged[INV_FREQ], inv)
    else:
        assert INV_FREQ not in merged


def test_excluded_tensors_need_not_be_in_the_models(clean, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    fam = _family(clean, tmp_path, lambda who, ts: {k: v for k, v in ts.items() if who == "base" or k != name})
    refused = _merge(fam, tmp_path / "refused", "widen")
    assert refused.exit_code == 1 and "lacks 1 of the base's tensors" in refused.stderr
    args = ["merge", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--out",
            tmp_path / "out", "--exclude", name.replace(".", r"\."), "-q"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")[name],
                       load_file(fam["base"] / "model.safetensors")[name])


def test_a_remote_code_models_files_are_copied_and_never_run(clean, tmp_path):
    """``auto_map`` modules (and what they import relatively) are copied byte for byte from the base, the
    tokenizer's from the tokenizer folder; modules of another repository or with odd names are not; nothing is
    imported: each module would leave a file behind if it ran."""
    ran = tmp_path / "ran"
    code = {name: f"open({str(ran / name)!r}, 'w').write('ran')\n" for name in
            ("configuration_tiny.py", "modeling_tiny.py", "tiny_layers.py", "tokenization_tiny.py", "unrelated.py",
             "tokenization_tiny_fast.py")}
    code["modeling_tiny.py"] += "from .tiny_layers import Block\n"
    auto_map = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
                "AutoModel": "other/repo--modeling_other.Model", "AutoBackbone": "../escape.Model"}

    fam = _family(clean, tmp_path, lambda name, ts: ts)
    ran.mkdir()
    for folder in fam.values():
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {**tok, "auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}}))
        for name, text in code.items():
            (folder / name).write_text(text)
    r = _merge(fam, tmp_path / "out", "widen")
    assert r.exit_code == 0, r.output
    copied = {p.name for p in (tmp_path / "out").glob("*.py")}
    assert copied == {"configuration_tiny.py", "modeling_tiny.py", "tiny_layers.py", "tokenization_tiny.py",
                      "tokenization_tiny_fast.py"}  # tokenizer code is copied even when no auto_map names it
    for name in copied:
        assert (tmp_path / "out" / name).read_bytes() == (fam["base"] / name).read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"] == auto_map
    assert not list(ran.iterdir()), "a checkpoint's code ran"


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_element_wise_methods_merge_3d_tensors(method, clean, tmp_path):
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, 8, generator=g).to(torch.bfloat16)
    values = {"base": base, "chat": (base.float() + 0.01 * torch.randn(4, 6, 8, generator=g)).to(torch.bfloat16),
              "multilingual": (base.float() + 0.02 * torch.randn(4, 6, 8, generator=g)).to(torch.bfloat16)}
    fam = _family(clean, tmp_path, lambda name, ts: {**ts, experts: values[name]})
    r = _merge(fam, tmp_path / "out", method)
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out" / "model.safetensors")[experts]
    b, m1, m2 = (values[n].float() for n in ("base", "chat", "multilingual"))
    if method == "task_arithmetic":
        assert torch.equal(got, (b + (m1 - b) + (m2 - b)).to(torch.bfloat16))
    elif method == "linear":
        assert torch.equal(got, ((m1 + m2) / 2).to(torch.bfloat16))
    else:
        assert got.shape == (4, 6, 8) and torch.isfinite(got.float()).all()


@pytest.mark.parametrize("chunk_rows", [None, "1", "3"])
def test_widen_merges_stacked_experts_per_expert_against_a_dense_reference(chunk_rows, clean, tmp_path):
    """Transformers v5 stores MoE experts as one [E, out, in] tensor: WIDEN treats each expert as its own matrix
    (columns = its input features), whatever the chunking, exactly as the per-expert 2-D layout would merge."""
    from reference_widen import merge_matrix

    experts = "model.layers.0.mlp.experts.gate_up_proj"
    g = torch.Generator().manual_seed(5)
    base = torch.randn(5, 12, 16, generator=g)
    values = {"base": base}
    for k, name in enumerate(("chat", "multilingual")):
        scale = torch.rand(5, 1, 16, generator=g) * 3  # each expert's models change some input features more
        values[name] = base + 0.02 * (k + 1) * torch.randn(5, 12, 16, generator=g) * scale
    fam = _family(clean, tmp_path, lambda name, ts: {**ts, experts: values[name]})
    extra = ["--chunk-rows", chunk_rows] if chunk_rows else []
    args = ["merge", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--out",
            tmp_path / "out", *extra, "-q"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out" / "model.safetensors")[experts]
    want = torch.stack([merge_matrix(base[e], [values["chat"][e], values["multilingual"][e]], 1.0, 1.0)
                        for e in range(5)])
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("chunk_rows", [None, "1", "3"])
def test_widen_merges_convolution_kernels_as_their_unfolded_linear_map(chunk_rows, clean, tmp_path):
    """A convolution kernel [out, in, *kernel] (a vision tower's patch embedding: Conv2d, Qwen2-VL's Conv3d) is the
    Linear weight of the unfolded patch: WIDEN merges its [out, in·∏kernel] view, for every chunking."""
    from reference_widen import merge_matrix

    kernels = {"model.visual.patch_embed.proj.weight": (6, 3, 2, 2, 2), "model.vision_tower.patch.weight": (8, 3, 2, 2)}
    g = torch.Generator().manual_seed(6)
    values: dict[str, dict[str, torch.Tensor]] = {"base": {n: torch.randn(s, generator=g) for n, s in kernels.items()}}
    for k, name in enumerate(("chat", "multilingual")):
        values[name] = {n: b + 0.02 * (k + 1) * torch.randn(b.shape, generator=g)
                        * (torch.rand(1, *b.shape[1:], generator=g) * 3) for n, b in values["base"].items()}
    fam = _family(clean, tmp_path, lambda name, ts: {**ts, **values[name]})
    extra = ["--chunk-rows", chunk_rows] if chunk_rows else []
    inputs = ["--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"]]
    plan = CliRunner().invoke(main, [str(a) for a in ["plan", *inputs, "--json"]])
    rules = {t["name"]: t["rule"] for t in json.loads(plan.stdout)["tensors"]}
    assert all(rules[n] == "conv" for n in kernels)
    r = CliRunner().invoke(main, [str(a) for a in ["merge", *inputs, "--out", tmp_path / "out", *extra, "-q"]])
    assert r.exit_code == 0, r.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for n, shape in kernels.items():
        b, m1, m2 = (values[k][n].reshape(shape[0], -1) for k in ("base", "chat", "multilingual"))
        assert torch.equal(merged[n], merge_matrix(b, [m1, m2], 1.0, 1.0).reshape(shape)), n


def test_stacked_experts_statistics_survive_a_resume():
    """What a resumed run loads instead of the statistics pass (``state_dict``) gives the same merge."""
    from streammerge.methods import all_methods
    from streammerge.methods.base import Rule, TensorTask

    widen = all_methods()["widen"]
    task = TensorTask("experts", (3, 8, 6), Rule.TENSOR, 64)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 8, 6, generator=g)
    models = [base + 0.1 * torch.randn(3, 8, 6, generator=g) for _ in range(2)]
    params = widen.resolve_params({}, 2)
    first = widen.start(task, params, 2)
    first.accumulate(0, 0, base[:2], [m[:2] for m in models])  # two chunks of experts
    first.accumulate(0, 2, base[2:], [m[2:] for m in models])
    first.end_pass(0)
    resumed = widen.start(task, params, 2)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(resumed.emit(1, base[1:], [m[1:] for m in models]),
                       first.emit(1, base[1:], [m[1:] for m in models]))
    assert widen.rule_error(TensorTask("conv", (2, 3, 4, 5), Rule.TENSOR, 64)) is not None
