"""nuslerp, multislerp and karcher recipes run by mergekit 0.1.5 and by streammerge on tiny float32 models give the
same weights within float32 rounding (mergekit computes in float32, streammerge sums in float64): every nuslerp
variant (flattened, per row, per column) with and without a base, multislerp with two and three models, with and
without a base, and karcher with and without ``base_model`` (which mergekit averages as one more model).

mergekit runs from its own environment, found as in ``test_mergekit_parity.py`` (``STREAMMERGE_MERGEKIT``, else
``.ci-mergekit-venv`` or ``bench/.mergekit-venv``); without one these tests are skipped, saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import merge_both
from safetensors.torch import load_file, save_file
from test_mergekit_parity import MERGEKIT, pytestmark  # noqa: F401 (the skip when mergekit is not installed)

from streammerge.examples import write_family

MODELS2 = """
models:
  - model: fam/chat
    parameters: {weight: 0.3}
  - model: fam/multilingual
    parameters: {weight: 0.7}
"""
MODELS3 = """
models:
  - model: fam/chat
    parameters: {weight: 0.5}
  - model: fam/multilingual
    parameters: {weight: 0.2}
  - model: fam/code
    parameters: {weight: 0.3}
"""
BASE = "base_model: fam/base\n"
F32 = "dtype: float32\n"

RECIPES = {
    "nuslerp-flat-base": "merge_method: nuslerp\n" + BASE + MODELS2 + F32,
    "nuslerp-flat-no-base": "merge_method: nuslerp\n" + MODELS2 + F32,
    "nuslerp-rows-base": "merge_method: nuslerp\n" + BASE + MODELS2 + "parameters: {nuslerp_flatten: false}\n" + F32,
    "nuslerp-rows-no-base": "merge_method: nuslerp\n" + MODELS2 + "parameters: {nuslerp_flatten: false}\n" + F32,
    "nuslerp-row-wise-base": "merge_method: nuslerp\n" + BASE + MODELS2
                             + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n" + F32,
    "nuslerp-row-wise-no-base": "merge_method: nuslerp\n" + MODELS2
                                + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n" + F32,
    "nuslerp-antiparallel": "merge_method: nuslerp\n" + BASE + """
models:
  - model: fam/chat
    parameters: {weight: 0.4}
  - model: fam/anti
    parameters: {weight: 0.6}
""" + F32,
    "multislerp-2-base": "merge_method: multislerp\n" + BASE + MODELS2 + F32,
    "multislerp-2-no-base": "merge_method: multislerp\n" + MODELS2 + F32,
    "multislerp-3-base": "merge_method: multislerp\n" + BASE + MODELS3 + F32,
    "multislerp-3-no-base-unnormalized": "merge_method: multislerp\n" + MODELS3
                                         + "parameters: {normalize_weights: false}\n" + F32,
    "multislerp-antipodal-fallback": "merge_method: multislerp\n" + BASE
                                     + "models:\n  - model: fam/chat\n  - model: fam/anti\n"
                                     + "parameters: {weight: 1.0}\n" + F32,
    "karcher-with-base": "merge_method: karcher\n" + BASE
                         + "models:\n  - model: fam/chat\n  - model: fam/multilingual\n" + F32,
    "karcher-no-base": "merge_method: karcher\n"
                       + "models:\n  - model: fam/chat\n  - model: fam/multilingual\n  - model: fam/code\n"
                       + "parameters: {max_iter: 20, tol: 1.0e-6}\n" + F32,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parity-spherical")
    fam = write_family(root / "fam", "tiny-llama", dtype="f32",
                       variants=(("chat", 0.1), ("multilingual", 0.3), ("code", 0.2)))
    # float32 files of bfloat16 values, so that the anti model's task vector, 2·B − C − B, is exactly −(C − B)
    for folder in fam.values():
        tensors = load_file(folder / "model.safetensors")
        save_file({n: t.bfloat16().float() for n, t in tensors.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
    # a model whose every change from the base is the chat model's, reversed: anti-parallel task vectors
    (root / "fam/anti").mkdir()
    for f in fam["chat"].iterdir():
        (root / "fam/anti" / f.name).write_bytes(f.read_bytes())
    base, chat = (load_file(fam[n] / "model.safetensors") for n in ("base", "chat"))
    anti = {n: 2 * b - chat[n] for n, b in base.items()}
    assert all(torch.equal(anti[n] - b, -(chat[n] - b)) for n, b in base.items())
    save_file(anti, root / "fam/anti/model.safetensors", metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("name", list(RECIPES))
def test_mergekit_and_streammerge_agree_on_a_spherical_recipe(name, workdir, monkeypatch):
    monkeypatch.chdir(workdir)  # the recipes name models relative to the current folder, as mergekit reads them
    ours, theirs = merge_both(MERGEKIT, workdir, name, RECIPES[name])
    assert set(ours) == set(theirs)
    singular = _mergekit_singular(workdir) if name == "nuslerp-antiparallel" else {}
    for n, t in theirs.items():
        assert ours[n].dtype == t.dtype, n
        want = singular.get(n, t)
        assert torch.allclose(ours[n], want, atol=2e-6, rtol=1e-5), \
            f"{n}: max difference {(ours[n] - want).abs().max().item():.3g}"
    assert len(singular) < len(theirs)  # some tensors are compared with mergekit's own output


def _mergekit_singular(workdir: Path) -> dict[str, torch.Tensor]:
    """The anti-parallel recipe's tensors where mergekit's float32 cosine of the exactly anti-parallel task vectors
    rounds to just above −1 (so its colinear test fails and it takes the spherical branch, whose sin θ is rounding
    noise), with what streammerge gives there instead: the colinear branch, ``B + 0.4·Δ − 0.6·Δ``."""
    base, chat = (load_file(workdir / f"fam/{n}/model.safetensors") for n in ("base", "chat"))
    out = {}
    for n, b in base.items():
        d0, d1 = chat[n] - b, b - chat[n]
        cos = (d0 / d0.norm().clamp(min=1e-7) * (d1 / d1.norm().clamp(min=1e-7))).sum().clamp(-1, 1)
        if not bool(1 - cos.square() <= 1e-16):
            out[n] = b + (0.4 * d0 + 0.6 * d1)
    return out
