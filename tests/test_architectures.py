"""The architecture matrix: a tiny random model of each architecture, built and saved by ``transformers`` itself (so
the tensor names, tying and side files are what users have), two variants of it, merged with WIDEN, TIES and
linear. Each output loads back in ``transformers`` with no missing or unexpected keys and runs a forward pass; its
token-embedding rule, tying and side files are what the architecture means; linear equals the dense average.

An architecture the installed ``transformers`` lacks is skipped, naming the class and the version.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_matches
from reference_widen import widen_reference
from safetensors.torch import load_file, save_file

from streammerge import api

transformers = pytest.importorskip("transformers", reason="the architecture matrix needs transformers (pip install "
                                   "'streammerge[test]')")

pytestmark = pytest.mark.filterwarnings("ignore::streammerge.execute.MergeNotice")

V, H, I = 96, 32, 48  # vocabulary, hidden size, MLP width: tiny, so the whole matrix takes seconds
TOKENS = torch.tensor([[1, 5, 17, 42, 90, 3]])
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class Arch:
    """One architecture: its model and config classes, the config, the token (and position) embeddings WIDEN must
    give the embedding rule, and whether the head is tied."""

    model_class: str
    config_class: str
    config: Callable[[], dict[str, Any]]
    embeddings: tuple[str, ...]
    tied: bool
    conv1d: tuple[str, ...] = ()  # weights stored (in, out), merged by the transposed column rule


ARCHS = {
    "llama-tied": Arch("LlamaForCausalLM", "LlamaConfig", lambda: dict(COMMON, tie_word_embeddings=True),
                       ("model.embed_tokens.weight",), tied=True),
    "llama-untied": Arch("LlamaForCausalLM", "LlamaConfig", lambda: dict(COMMON, tie_word_embeddings=False),
                         ("model.embed_tokens.weight",), tied=False),
    "mistral": Arch("MistralForCausalLM", "MistralConfig", lambda: dict(COMMON), ("model.embed_tokens.weight",),
                    tied=False),
    "qwen2": Arch("Qwen2ForCausalLM", "Qwen2Config", lambda: dict(COMMON), ("model.embed_tokens.weight",),
                  tied=False),
    "qwen3": Arch("Qwen3ForCausalLM", "Qwen3Config", lambda: dict(COMMON, head_dim=8),
                  ("model.embed_tokens.weight",), tied=False),
    "qwen3-moe": Arch("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                      lambda: dict(COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                   decoder_sparse_step=1), ("model.embed_tokens.weight",), tied=False),
    "gemma2": Arch("Gemma2ForCausalLM", "Gemma2Config", lambda: dict(COMMON, head_dim=8),
                   ("model.embed_tokens.weight",), tied=True),
    "gemma3": Arch("Gemma3ForCausalLM", "Gemma3TextConfig", lambda: dict(COMMON, head_dim=8),
                   ("model.embed_tokens.weight",), tied=True),
    "phi3": Arch("Phi3ForCausalLM", "Phi3Config", lambda: dict(COMMON, num_key_value_heads=4),
                 ("model.embed_tokens.weight",), tied=False),
    "gpt2": Arch("GPT2LMHeadModel", "GPT2Config",
                 lambda: dict(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                              eos_token_id=2), ("transformer.wte.weight", "transformer.wpe.weight"), tied=True,
                 conv1d=("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight")),
    "gpt-neox": Arch("GPTNeoXForCausalLM", "GPTNeoXConfig",
                     lambda: dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
                     ("gpt_neox.embed_in.weight",), tied=False),
    "glm4-moe": Arch("Glm4MoeForCausalLM", "Glm4MoeConfig",
                     lambda: dict(COMMON, head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1, n_group=1,
                                  topk_group=1), ("model.embed_tokens.weight",), tied=False),
    "qwen2-vl": Arch("Qwen2VLForConditionalGeneration", "Qwen2VLConfig",
                     lambda: dict(text_config=dict(COMMON, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                                  vision_config=dict(depth=1, embed_dim=16, hidden_size=H, num_heads=2, mlp_ratio=2,
                                                     patch_size=4, spatial_merge_size=2, temporal_patch_size=2)),
                     ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"), tied=False),
}
METHODS = {"widen": {}, "ties": {"density": 0.5}, "linear": {}}


def _classes(arch: Arch) -> tuple[Any, Any]:
    model_class, config_class = (getattr(transformers, n, None) for n in (arch.model_class, arch.config_class))
    if model_class is None or config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {arch.model_class}")
    return model_class, config_class


def _vary(base: Path, out: Path, seed: int) -> Path:
    """A fine-tune of ``base``: every float tensor moved, some rows (and so some columns' magnitudes) far more."""
    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(base / "model.safetensors").items():
        if t.is_floating_point():
            rows = torch.rand(t.shape[0] if t.dim() else 1, generator=g) * 3
            t = t + 0.02 * torch.randn(t.shape, generator=g) * rows.reshape(-1, *([1] * (t.dim() - 1)))
        tensors[name] = t.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> Callable[[str], dict[str, Path]]:
    """The base (saved by transformers) and two variants of an architecture, built once per module."""
    made: dict[str, dict[str, Path]] = {}

    def family(name: str) -> dict[str, Path]:
        if name not in made:
            model_class, config_class = _classes(ARCHS[name])
            root = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            model_class(config_class(**ARCHS[name].config())).save_pretrained(root / "base")
            made[name] = {"base": root / "base", "a": _vary(root / "base", root / "a", 1),
                          "b": _vary(root / "base", root / "b", 2)}
        return made[name]

    return family


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_merges_loads_and_runs(name, method, families, tmp_path):
    arch, fam = ARCHS[name], families(name)
    model_class, _ = _classes(arch)
    plan = api.plan(fam["base"], [fam["a"], fam["b"]], method=method, params=METHODS[method])
    rules = {t.name: t.rule.value for t in plan.tensors}
    out = api.merge(fam["base"], [fam["a"], fam["b"]], tmp_path / "out", method=method, params=METHODS[method])

    # what the architecture means: the token (and position) embeddings, Conv1D weights, tying, side files
    embeddings = [n for n in arch.embeddings if n in rules]
    assert embeddings, f"none of {arch.embeddings} is stored: {sorted(rules)[:5]}"
    if method == "widen":
        assert all(rules[n] == "embedding" for n in embeddings), {n: rules[n] for n in embeddings}
        assert all(rules[n] == "conv1d" for n in arch.conv1d)
        assert not [n for n, r in rules.items() if r == "embedding" and n not in arch.embeddings]
    stored = load_file(out / "model.safetensors")
    base_stored = load_file(fam["base"] / "model.safetensors")
    assert set(stored) == set(base_stored) and all(stored[n].shape == base_stored[n].shape for n in stored)
    assert all(stored[n].dtype == base_stored[n].dtype for n in stored)
    for side in ("config.json", "generation_config.json"):
        assert (out / side).is_file(), side
    config, base_config = (json.loads((f / "config.json").read_text()) for f in (out, fam["base"]))
    assert config == base_config  # nothing to change: same dtype, tying, architecture

    # loads with nothing missing, unexpected or mismatched; holds the merged values; runs
    model, info = model_class.from_pretrained(out, output_loading_info=True, dtype=torch.float32,
                                              local_files_only=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{kind}: {info.get(kind)}"
    # what it holds, saved again by transformers (which converts layouts it keeps fused in memory, e.g. experts)
    model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert set(resaved) == set(stored)
    for n, t in stored.items():
        assert torch.equal(resaved[n], t.to(resaved[n].dtype)), n
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) == arch.tied
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    assert logits.shape == (1, TOKENS.shape[1], V) and torch.isfinite(logits).all()

    a, b = (load_file(fam[k] / "model.safetensors") for k in ("a", "b"))
    if method == "linear":  # the dense average of the two models, tensor by tensor
        for n, t in stored.items():
            want = (a[n].float() + b[n].float()) / 2 if t.is_floating_point() else base_stored[n]
            assert torch.allclose(t.float(), want.float(), atol=1e-6), n
    if method == "widen" and not arch.conv1d and all(t.dim() <= 2 for t in stored.values()):
        # the dense reference, told the architecture's embedding names
        floats = [{n: t.float() for n, t in x.items() if t.is_floating_point()} for x in (base_stored, a, b)]
        want = widen_reference(floats[0], floats[1:], embedding_names=arch.embeddings)
        assert_matches({n: stored[n].float() for n in want}, want)


def test_tied_base_with_an_untied_fine_tune_loads_untied(families, tmp_path):
    """Llama-3.2-style: the base ties its head, a fine-tune was saved untied with its own ``lm_head.weight``. The
    output stores a head merged from each input's effective head, and transformers loads it untied."""
    fam = families("llama-tied")
    untied = tmp_path / "untied"
    shutil.copytree(fam["a"], untied)
    tensors = load_file(untied / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 0.05 * torch.randn(V, H)
    save_file(tensors, untied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    out = api.merge(fam["base"], [untied, fam["b"]], tmp_path / "out", method="linear")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32,
                                                                local_files_only=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    b = load_file(fam["b"] / "model.safetensors")
    want = (tensors["lm_head.weight"] + b["model.embed_tokens.weight"]) / 2  # b's head is its embedding
    assert torch.allclose(model.lm_head.weight, want, atol=1e-6)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=TOKENS).logits).all()
