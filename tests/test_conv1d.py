"""GPT-2's Conv1D weights are stored (in, out), the transpose of nn.Linear: WIDEN's columns (input features) are
then the stored rows. The rule is decided in the plan from the architecture (``model_type``), shown by
``streammerge plan``, and checked against a dense reference that transposes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from reference_widen import merge_matrix
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.cli import main

H, V, P = 16, 50, 32  # hidden, vocabulary, positions
CONV = "h.0.attn.c_attn.weight"


def _gpt2_family(root: Path, model_type: str = "gpt2") -> dict[str, Path]:
    """The Hub layout of GPT-2 (no "transformer." prefix): wte/wpe embeddings, Conv1D weights (in, out), the
    causal-mask buffer ``attn.bias`` saved by older transformers."""
    g = torch.Generator().manual_seed(0)
    shapes = {"wte.weight": (V, H), "wpe.weight": (P, H), CONV: (H, 3 * H), "h.0.attn.c_attn.bias": (3 * H,),
              "h.0.attn.c_proj.weight": (H, H), "h.0.mlp.c_fc.weight": (H, 4 * H), "h.0.mlp.c_proj.weight": (4 * H, H),
              "h.0.ln_1.weight": (H,), "ln_f.weight": (H,)}
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        gi = torch.Generator().manual_seed(10 + i)
        # each variant changes some input features (stored rows of a Conv1D weight) much more than others
        tensors = base if name == "base" else {
            k: v + 0.02 * torch.randn(v.shape, generator=gi) * (torch.rand(v.shape[0], generator=gi) * 3)
            .reshape(-1, *([1] * (v.dim() - 1))) for k, v in base.items()}
        tensors = {**tensors, "h.0.attn.bias": torch.tril(torch.ones(1, 1, P, P))} if name == "base" else tensors
        (root / name).mkdir(parents=True)
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps({"model_type": model_type, "architectures":
                                                             ["GPT2LMHeadModel"], "vocab_size": V, "n_embd": H}))
        out[name] = root / name
    return out


def test_conv1d_weights_get_the_transposed_column_rule_against_a_dense_reference(tmp_path):
    fam = _gpt2_family(tmp_path / "fam")
    plan = CliRunner().invoke(main, ["plan", "--base", str(fam["base"]), "--model", str(fam["a"]), "--model",
                                     str(fam["b"]), "--json"])
    rules = {t["name"]: t["rule"] for t in json.loads(plan.stdout)["tensors"]}
    assert rules[CONV] == rules["h.0.mlp.c_fc.weight"] == rules["h.0.mlp.c_proj.weight"] == "conv1d"
    assert rules["wte.weight"] == rules["wpe.weight"] == "embedding" and rules["h.0.attn.bias"] == "copy_base"
    api.merge(fam["base"], [fam["a"], fam["b"]], tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(fam[n] / "model.safetensors") for n in ("base", "a", "b")]
    for name in (CONV, "h.0.mlp.c_fc.weight"):
        b, *ms = (x[name] for x in inputs)
        # the Linear rule on the transpose (columns = input features), transposed back
        want = merge_matrix(b.T, [m.T for m in ms], 1.0, 1.0).T
        assert torch.allclose(merged[name], want, rtol=0, atol=1e-6), name
        wrong = merge_matrix(b, ms, 1.0, 1.0)
        assert not torch.allclose(merged[name], wrong, atol=1e-6), "the stored columns are the wrong axis"


def test_linear_weights_of_other_architectures_keep_the_linear_rule(tmp_path):
    fam = _gpt2_family(tmp_path / "fam", model_type="gpt_neo")
    assert api.plan(fam["base"], [fam["a"], fam["b"]]).tensor(CONV).rule.value == "matrix"
