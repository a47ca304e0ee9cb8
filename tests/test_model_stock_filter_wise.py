"""model_stock with filter_wise: one interpolation ratio per row of the last dimension (each output filter; a vector
is one row), against a dense reference written from the paper's ratio r = N·cos / (1 + (N−1)·cos) with the mean
pairwise cosine of the deltas per row; the same bytes for every chunking."""

from __future__ import annotations

import itertools

import torch
from safetensors.torch import load_file

from streammerge import api
from streammerge.examples import write_family


def reference(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    b = base.reshape(1, -1) if base.dim() <= 1 else base
    ms = [m.reshape(b.shape) for m in models]
    deltas = [m - b for m in ms]
    cos = torch.stack([torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-6)
                       for x, y in itertools.combinations(deltas, 2)]).mean(dim=0).unsqueeze(-1)
    n = len(ms)
    r = n * cos / (1 + (n - 1) * cos)
    return (r * torch.stack(ms).mean(dim=0) + (1 - r) * b).reshape(base.shape)


def test_filter_wise_model_stock_per_row_for_every_chunking(tmp_path):
    fam = write_family(tmp_path / "fam", "tiny-llama", dtype="f32",
                       variants=(("chat", 0.1), ("multilingual", 0.3), ("code", 0.2)))
    models = [fam["chat"], fam["multilingual"], fam["code"]]
    outs = [load_file(api.merge(fam["base"], models, tmp_path / f"o{k}", method="model_stock",
                                params={"filter_wise": True}, chunk_rows=chunk) / "model.safetensors")
            for k, chunk in enumerate((None, 5))]
    base = load_file(fam["base"] / "model.safetensors")
    ms = [load_file(m / "model.safetensors") for m in models]
    for name, b in base.items():
        want = reference(b, [m[name] for m in ms])
        assert torch.allclose(outs[0][name], want, atol=2e-6, rtol=1e-5), name
        assert torch.equal(outs[0][name], outs[1][name]), name
    plan = api.plan(fam["base"], models, method="model_stock", params={"filter_wise": True})
    assert all(t.stat_passes == 0 for t in plan.tensors)
