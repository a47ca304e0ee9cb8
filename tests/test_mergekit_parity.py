"""The same recipe file, run by mergekit 0.1.5 and by streammerge on tiny models, gives the same weights: per-model
parameters, gradients over the layers, filters, the base listed among the models, layer stacking.

mergekit runs from its own environment (it must not change this one's pinned torch): the executable named by
``STREAMMERGE_MERGEKIT``, else ``.ci-mergekit-venv`` (which ``.ci/run`` installs when it can) or
``bench/.mergekit-venv``. Without one these tests are skipped, saying so. Methods that draw random masks (DARE,
DELLA) differ by design (counter-based masks here): for them the statistics that matter are compared instead (the
kept fraction, the L1 norm the rescale keeps, DELLA's preference for large deltas).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import MERGEKIT_MISSING, find_mergekit, merge_both
from safetensors.torch import load_file

from streammerge.examples import SHAPES, write_family

ROOT = Path(__file__).resolve().parent.parent


MERGEKIT = find_mergekit()
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason=MERGEKIT_MISSING)

RECIPES = {
    "linear-per-model-weights": """
merge_method: linear
models:
  - model: fam/chat
    parameters: {weight: 0.3}
  - model: fam/multilingual
    parameters: {weight: 0.9}
dtype: float32
""",
    "ties-per-model-gradient": """
merge_method: ties
base_model: fam/base
models:
  - model: fam/chat
    parameters: {density: 0.5, weight: 0.7}
  - model: fam/multilingual
    parameters:
      density: 0.8
      weight: [0.2, 0.9]
parameters: {normalize: false}
dtype: float32
""",
    "task-arithmetic-filters": """
merge_method: task_arithmetic
base_model: fam/base
models:
  - model: fam/chat
  - model: fam/multilingual
parameters:
  weight:
    - filter: self_attn
      value: [0.1, 0.6, 1.0]
    - filter: mlp
      value: 0.4
    - value: 0.8
  int8_mask: true
dtype: float32
""",
    "gradient-slerp": """
merge_method: slerp
base_model: fam/base
models:
  - model: fam/base
  - model: fam/chat
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "breadcrumbs-ties": """
merge_method: breadcrumbs_ties
base_model: fam/base
models:
  - model: fam/chat
    parameters: {density: 0.6, gamma: 0.05, weight: 0.5}
  - model: fam/multilingual
    parameters: {density: 0.7, gamma: 0.02, weight: 0.5}
dtype: float32
""",
    "model-stock": """
merge_method: model_stock
base_model: fam/base
models:
  - model: fam/chat
  - model: fam/multilingual
dtype: float32
""",
    "slices-slerp-lazymergekit": """
slices:
  - sources:
      - model: fam/base
        layer_range: [0, 4]
      - model: fam/chat
        layer_range: [0, 4]
merge_method: slerp
base_model: fam/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "slices-two-ranges-ties": """
slices:
  - sources:
      - model: fam/base
        layer_range: [0, 2]
      - model: fam/chat
        layer_range: [0, 2]
      - model: fam/multilingual
        layer_range: [1, 3]
  - sources:
      - model: fam/base
        layer_range: [1, 4]
      - model: fam/chat
        layer_range: [2, 5]
      - model: fam/multilingual
        layer_range: [0, 3]
merge_method: ties
base_model: fam/base
parameters: {density: 0.6, weight: [0.3, 0.9], normalize: false}
dtype: float32
""",
    "linear-with-an-unlisted-base": """
merge_method: linear
base_model: fam/base
models:
  - model: fam/chat
  - model: fam/multilingual
parameters: {weight: 1.0}
dtype: float32
""",
    "slices-ties-per-source-parameters": """
slices:
  - sources:
      - model: fam/base
        layer_range: [0, 5]
      - model: fam/chat
        layer_range: [0, 5]
        parameters: {density: 0.5, weight: 0.6}
      - model: fam/multilingual
        layer_range: [0, 5]
        parameters: {density: 0.8, weight: [0.2, 0.7]}
merge_method: ties
base_model: fam/base
dtype: float32
""",
    "passthrough-source-scale": """
merge_method: passthrough
slices:
  - sources:
      - model: fam/chat
        layer_range: [0, 3]
  - sources:
      - model: fam/multilingual
        layer_range: [2, 5]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - value: 1.0
dtype: float32
""",
    "nearswap-gradient": """
merge_method: nearswap
base_model: fam/base
models:
  - model: fam/base
  - model: fam/chat
parameters:
  t: [0.0001, 0.01]
dtype: float32
""",
    "model-stock-filter-wise": """
merge_method: model_stock
base_model: fam/base
models:
  - model: fam/chat
  - model: fam/multilingual
parameters: {filter_wise: true}
dtype: float32
""",
    "slices-parameters-differ-per-slice": """
merge_method: ties
base_model: fam/base
slices:
  - sources:
      - model: fam/base
        layer_range: [0, 2]
      - model: fam/chat
        layer_range: [0, 2]
        parameters: {density: 0.4, weight: [0.2, 0.9]}
      - model: fam/multilingual
        layer_range: [0, 2]
        parameters: {density: 0.7}
    parameters: {weight: 0.5}
  - sources:
      - model: fam/base
        layer_range: [2, 5]
      - model: fam/chat
        layer_range: [2, 5]
        parameters: {density: 0.6}
      - model: fam/multilingual
        layer_range: [2, 5]
        parameters: {density: 0.3, weight: 0.8}
    parameters:
      weight: [{filter: mlp, value: 0.3}]
      normalize: false
parameters: {weight: 0.6, lambda: 0.9}
dtype: float32
""",
    "ties-rescaled": """
merge_method: ties
base_model: fam/base
models:
  - model: fam/chat
    parameters: {density: 0.4, weight: 0.6}
  - model: fam/multilingual
    parameters: {density: 0.7, weight: 0.5}
parameters: {rescale: true}
dtype: float32
""",
    "breadcrumbs-rescaled": """
merge_method: breadcrumbs_ties
base_model: fam/base
models:
  - model: fam/chat
    parameters: {density: 0.5, gamma: 0.05, weight: 0.6}
  - model: fam/multilingual
    parameters: {density: 0.3, gamma: 0.02, weight: 0.5}
parameters: {rescale: true}
dtype: float32
""",
    "sce-select": """
merge_method: sce
base_model: fam/base
models:
  - model: fam/chat
  - model: fam/multilingual
parameters: {select_topk: 0.5}
dtype: float32
""",
    "sce-all": """
merge_method: sce
base_model: fam/base
models:
  - model: fam/chat
  - model: fam/multilingual
dtype: float32
""",
    "passthrough-stack": """
merge_method: passthrough
slices:
  - sources:
      - model: fam/chat
        layer_range: [0, 3]
  - sources:
      - model: fam/multilingual
        layer_range: [1, 4]
dtype: float32
""",
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    write_family(root / "fam", replace(SHAPES["tiny-llama"], layers=5), dtype="f32")
    return root


@pytest.mark.parametrize("name", list(RECIPES))
def test_mergekit_and_streammerge_agree_on_a_recipe(name, workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the recipes name models relative to the current folder, as mergekit reads them
    ours, theirs = merge_both(MERGEKIT, workdir, name, RECIPES[name])
    assert set(ours) == set(theirs)
    for n, t in theirs.items():
        assert ours[n].dtype == t.dtype, n
        assert torch.allclose(ours[n].float(), t.float(), atol=2e-6, rtol=1e-5), \
            f"{n}: max difference {(ours[n].float() - t.float()).abs().max().item():.3g}"


RANDOM_RECIPE = """
merge_method: {method}
base_model: fam/base
models:
  - model: fam/chat
    parameters: {{density: 0.4, weight: 1.0{extra}}}
dtype: float32
"""


@pytest.mark.parametrize("method,extra", [("dare_linear", ""), ("della_linear", ", epsilon: 0.3")])
def test_random_masks_keep_mergekits_statistics(method, extra, workdir, monkeypatch):
    """One model, weight 1: the kept fraction is the density (within sampling error), the L1 rescale keeps each
    tensor's delta L1 norm in both, and DELLA keeps large deltas more often than small ones in both."""
    monkeypatch.chdir(workdir)
    outputs = merge_both(MERGEKIT, workdir, f"random-{method}", RANDOM_RECIPE.format(method=method, extra=extra))
    base, chat = (load_file(workdir / "fam" / n / "model.safetensors") for n in ("base", "chat"))
    for out in outputs:
        kept = total = 0
        large = small = 0.0
        for n, b in base.items():
            if b.numel() < 1000:
                continue
            delta, got = chat[n] - b, out[n] - b
            keep = got != 0
            kept, total = kept + int(keep.sum()), total + keep.numel()
            assert abs(got.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-4, n  # the L1 rescale
            order = delta.abs().reshape(delta.shape[0], -1).argsort(dim=1)
            rows = keep.reshape(delta.shape[0], -1)
            third = order.shape[1] // 3
            small += rows.gather(1, order[:, :third]).float().mean().item()
            large += rows.gather(1, order[:, -third:]).float().mean().item()
        assert abs(kept / total - 0.4) < 0.01
        if method == "della_linear":  # p from 0.1 (smallest) to 0.7 (largest): thirds average 0.2 and 0.6
            assert large > small * 2


VOCABULARY_RECIPES = {
    "union-task-arithmetic": """
merge_method: task_arithmetic
base_model: voc/base
models:
  - model: voc/chat
    parameters: {weight: 0.7}
  - model: voc/multilingual
    parameters: {weight: 0.5}
tokenizer_source: union
dtype: float32
""",
    "union-ties-tokens-padded": """
merge_method: ties
base_model: voc/base
models:
  - model: voc/chat
    parameters: {weight: 0.7, density: 0.6}
  - model: voc/multilingual
    parameters: {weight: 0.5, density: 0.8}
tokenizer:
  source: union
  pad_to_multiple_of: 32
  tokens:
    "<|im_start|>": {source: voc/chat, force: true}
    "<vi>": {source: {kind: zero}}
    t5: {source: {kind: model_token, model: voc/multilingual, token: t7}, force: true}
    "<new>": {source: {kind: model_token, model: voc/chat, token_id: 3}}
dtype: float32
""",
    "base-vocabulary-slerp": """
merge_method: slerp
base_model: voc/base
models:
  - model: voc/base
  - model: voc/multilingual
parameters: {t: 0.4}
tokenizer_source: base
dtype: float32
""",
    "linear-union-without-base": """
merge_method: linear
models:
  - model: voc/base
  - model: voc/chat
  - model: voc/multilingual
parameters: {weight: 1.0}
tokenizer_source: union
dtype: float32
""",
}


@pytest.fixture(scope="module")
def vocab_workdir(tmp_path_factory) -> Path:
    from helpers import write_vocabulary_family

    root = tmp_path_factory.mktemp("parity-vocab")
    write_vocabulary_family(root / "voc")
    return root


def _token_ids(folder: Path) -> dict[str, int]:
    import json

    doc = json.loads((folder / "tokenizer.json").read_text())
    return {**doc["model"]["vocab"], **{e["content"]: e["id"] for e in doc["added_tokens"]}}


@pytest.mark.parametrize("name", list(VOCABULARY_RECIPES))
def test_mergekit_and_streammerge_agree_on_mapped_vocabularies(name, vocab_workdir, monkeypatch):
    """Inputs that differ in vocabulary (added tokens, shuffled ids, other row counts), mapped through their
    tokenizers. mergekit numbers the union's new tokens in the order of a Python set of models (it changes from run
    to run), so the embedding and head are compared token by token, and the rows past the tokens (padding) row by
    row; every other tensor as it is."""
    monkeypatch.chdir(vocab_workdir)
    ours, theirs = merge_both(MERGEKIT, vocab_workdir, name, VOCABULARY_RECIPES[name])
    ids_ours, ids_theirs = (_token_ids(vocab_workdir / f"{who}-{name}") for who in ("sm", "mk"))
    assert set(ids_ours) == set(ids_theirs)
    tokens = sorted(ids_ours)
    a, b = torch.tensor([ids_ours[t] for t in tokens]), torch.tensor([ids_theirs[t] for t in tokens])
    assert set(ours) == set(theirs)
    for n, t in theirs.items():
        assert ours[n].shape == t.shape, n
        if n in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(ours[n][a], t[b], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(ours[n][len(tokens):], t[len(tokens):], atol=2e-6, rtol=1e-5)
        else:
            torch.testing.assert_close(ours[n], t, atol=2e-6, rtol=1e-5)
