"""NearSwap against a dense reference written from mergekit's formula: w = clamp(t / |B − M|, 0, 1) (1 where the
difference is 0), result w·M + (1 − w)·B; the same bytes for every chunking; t must be positive."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.cli import main
from streammerge.examples import write_family


def nearswap_reference(t: float, base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    d = (base - model).abs()
    w = torch.where(d == 0, torch.ones_like(d), torch.clamp(t / d, max=1.0))
    return w * model + (1 - w) * base


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    fam = write_family(tmp_path_factory.mktemp("ns"), "tiny-llama", dtype="f32")
    # some elements equal to the base's (difference 0) and some within the threshold
    ts = load_file(fam["chat"] / "model.safetensors")
    base = load_file(fam["base"] / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    ts[name] = ts[name].clone()
    ts[name][:5] = base[name][:5]
    ts[name][5:10] = base[name][5:10] + 1e-5
    save_file(ts, fam["chat"] / "model.safetensors", metadata={"format": "pt"})
    return fam


@pytest.mark.parametrize("t", [1e-4, 0.01])
def test_nearswap_matches_the_dense_reference_for_every_chunking(fam, tmp_path, t):
    outs = []
    for k, chunk in enumerate((None, 3)):
        out = api.merge(fam["base"], fam["chat"], tmp_path / f"o{k}", method="nearswap", params={"t": t},
                        chunk_rows=chunk)
        outs.append(load_file(out / "model.safetensors"))
    base, chat = (load_file(fam[n] / "model.safetensors") for n in ("base", "chat"))
    for name, b in base.items():
        want = nearswap_reference(t, b.float(), chat[name].float())
        assert torch.allclose(outs[0][name], want, atol=1e-7, rtol=1e-6), name
        assert torch.equal(outs[0][name], outs[1][name]), name
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][name][:5], chat[name][:5])  # no difference: the model's value


def test_nearswap_refuses_a_threshold_that_is_not_positive(fam, tmp_path):
    r = CliRunner().invoke(main, ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--method",
                                  "nearswap", "--param", "t=0", "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and "must be > 0" in r.output and not (tmp_path / "out").exists()
