"""Vision-language checkpoints (Qwen2-VL as transformers >= 4.52 saves it): the text model's token embedding is
recognised under its prefixed name, the tie flag may live in ``text_config``, the vision tower is merged or kept
from the base by choice, and a method with an embedding rule that finds no token embedding says so loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.cli import main

E = "model.language_model.embed_tokens.weight"
VISION = "model.visual.blocks.0.attn.qkv.weight"


def _vl_family(root: Path, config: dict, head: bool = False, names: dict[str, str] | None = None) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {E: torch.randn(64, 16, generator=g), "model.language_model.layers.0.self_attn.q_proj.weight":
            torch.randn(16, 16, generator=g), "model.language_model.norm.weight": torch.ones(16),
            VISION: torch.randn(48, 16, generator=g)}
    if head:
        base["lm_head.weight"] = base[E].clone()
    base = {(names or {}).get(k, k): v for k, v in base.items()}
    out = {}
    for i, name in enumerate(["base", "a", "b"]):
        gi = torch.Generator().manual_seed(10 + i)
        tensors = base if name == "base" else {
            k: v + 0.05 * torch.randn(v.shape, generator=gi) * torch.rand(v.shape[-1], generator=gi)
            for k, v in base.items()}
        if head and name != "base":
            tensors["lm_head.weight"] = tensors[(names or {}).get(E, E)].clone()
        (root / name).mkdir(parents=True)
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(config))
        out[name] = root / name
    return out


CONFIG = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
          "text_config": {"vocab_size": 64, "hidden_size": 16, "model_type": "qwen2_vl_text",
                          "tie_word_embeddings": True}}


def _merge(fam, out, *extra):
    args = ["merge", "--base", fam["base"], "--model", fam["a"], "--model", fam["b"], "--out", out, *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_text_embedding_of_a_vision_language_model_gets_the_embedding_rule(tmp_path):
    fam = _vl_family(tmp_path / "fam", CONFIG)
    p = api.plan(fam["base"], [fam["a"], fam["b"]])
    assert p.tensor(E).rule.value == "embedding"
    default, explicit = _merge(fam, tmp_path / "default"), _merge(fam, tmp_path / "explicit", "--embedding", E)
    assert default.exit_code == 0 and explicit.exit_code == 0, default.output + explicit.output
    assert "WARNING" not in default.stderr
    assert (tmp_path / "default" / "model.safetensors").read_bytes() == \
        (tmp_path / "explicit" / "model.safetensors").read_bytes()


def test_a_tie_flag_in_text_config_ties_a_stored_head(tmp_path):
    fam = _vl_family(tmp_path / "fam", CONFIG, head=True)
    p = api.plan(fam["base"], [fam["a"], fam["b"]])
    assert p.tensor("lm_head.weight").rule.value == "tied_copy" and p.tensor("lm_head.weight").copy_of == E


def test_a_method_with_an_embedding_rule_warns_when_it_finds_no_token_embedding(tmp_path):
    fam = _vl_family(tmp_path / "fam", CONFIG, names={E: "model.lm.tok_embeddings.weight"})
    r = _merge(fam, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    assert "note: WARNING: widen merges token embeddings by their own rule" in r.stderr
    assert "--embedding model.lm.tok_embeddings.weight" in r.stderr
    quiet = _merge(fam, tmp_path / "ties", "--method", "ties", "-q")  # no embedding rule: nothing to warn about
    assert quiet.exit_code == 0 and "WARNING" not in quiet.stderr


@pytest.mark.parametrize("keep", [False, True])
def test_the_vision_tower_is_merged_or_kept_from_the_base(keep, tmp_path):
    fam = _vl_family(tmp_path / "fam", CONFIG)
    r = _merge(fam, tmp_path / "out", *(["--keep-vision"] if keep else []))
    assert r.exit_code == 0, r.output
    merged, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(fam["base"] / "model.safetensors")
    assert torch.equal(merged[VISION], base[VISION]) is keep
    assert ("keep the base's values" if keep else "--keep-vision keeps the base's") in r.stderr
    assert not torch.equal(merged["model.language_model.layers.0.self_attn.q_proj.weight"],
                           base["model.language_model.layers.0.self_attn.q_proj.weight"])
