"""End to end: a merged folder written by the CLI loads in transformers and runs.

For the tied Qwen2 shape, the untied Qwen2 shape and the Llama shape: write a synthetic family, merge it with
``streammerge merge --method widen``, load the result with ``AutoModelForCausalLM.from_pretrained`` (no missing,
unexpected or mismatched keys) and run a forward pass whose logits are finite and of shape (1, seq, vocab).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from streammerge.cli import main
from streammerge.examples import SHAPES, write_family

TOKENS = [[1, 5, 17, 42, 100, 3]]


@pytest.fixture
def transformers(monkeypatch):
    """transformers, imported with the Hub switched off (nothing here may touch the network)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return pytest.importorskip("transformers")


def merge_family(root: Path, shape: str, dtype: str) -> Path:
    fam = write_family(root / "fam", shape, dtype=dtype)
    out = root / "merged"
    result = CliRunner().invoke(main, [
        "merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model", str(fam["multilingual"]),
        "--method", "widen", "--param", "t=1.0", "--param", "s=1.0", "--out", str(out), "-q",
    ])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("shape,dtype", [("tiny", "bf16"), ("tiny-untied", "f32"), ("tiny-llama", "bf16")])
def test_merged_model_loads_and_runs_in_transformers(shape, dtype, transformers, tmp_path):
    out = merge_family(tmp_path, shape, dtype)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, torch_dtype=torch.float32, local_files_only=True
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{kind}: {info.get(kind)}"
    expected_arch = "LlamaForCausalLM" if SHAPES[shape].model_type == "llama" else "Qwen2ForCausalLM"
    assert type(model).__name__ == expected_arch

    # The weights transformers holds are the merged ones from the file.
    state = model.state_dict()
    with safe_open(out / "model.safetensors", "pt") as st:
        assert set(st.keys()) <= set(state)
        for name in st.keys():
            assert torch.equal(state[name], st.get_tensor(name).to(torch.float32)), name
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) == SHAPES[shape].tied

    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits
    assert logits.shape == (1, len(TOKENS[0]), SHAPES[shape].vocab)
    assert torch.isfinite(logits).all()
