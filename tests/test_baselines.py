"""The baseline methods end to end: the streaming engine (``streammerge.merge``) against the dense reference in
reference_baselines.py (mergekit's semantics).

Tiny Qwen2-style model folders with tied embeddings (no ``lm_head`` stored) are written by hand in a temporary
folder. Their values are dyadic (base: multiples of 1/2048, deltas: multiples of 1/128), so ``M − B`` is exact in
float32 and many ``|Δ|`` are exactly tied: top-k selection must break ties by flat index. Covered: every method
against the reference (≤ 1e-6, float32 storage), identical bytes for every chunking (bf16 storage), DARE's masks
(kept fraction, seeds), edge cases (densities 0 and 1, k = 0, zero deltas, colinear SLERP, opposed Model Stock
deltas) and parameter refusals before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_matches
from reference_baselines import (
    DELTA_METHODS,
    METHODS,
    Tensors,
    dare_key,
    dare_uniforms,
    delta_tensor,
    descending_order,
    per_model,
    reference_merge,
    slerp_coefficients,
)
from safetensors.torch import load_file, save_file

from streammerge.api import merge
from streammerge.cli import main
from streammerge.errors import MethodError
from streammerge.methods._rng import stream_key, uniform_reference

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
SMALL = "model.norm.weight"  # 5 elements: density 0.1 keeps int(0.5) = 0 of them
SHAPES: dict[str, tuple[int, ...]] = {
    EMBED: (37, 12),  # tied: no lm_head stored
    Q: (13, 7),
    "model.layers.0.self_attn.q_proj.bias": (13,),
    "model.layers.0.mlp.down_proj.weight": (31, 5),
    "model.layers.0.mlp.up_proj.weight": (70, 9),  # a full and a partial reduction tile of 64 rows
    "model.layers.0.mlp.experts.weight": (3, 4, 5),  # 3-D: element-wise methods must take it
    "model.layers.0.input_layernorm.weight": (12,),
    SMALL: (5,),
}
W3, D3 = [0.3, 0.5, 0.9], [0.3, 0.6, 0.9]

# --------------------------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------------------------


def dyadic_family(n_models: int, seed: int = 0) -> tuple[Tensors, list[Tensors]]:
    """Base values k/2048 (around 1 for norms); deltas = shared + own part, multiples of 1/128 (many ties, zeros)."""
    g = torch.Generator().manual_seed(seed)
    base, deltas = {}, []
    for name, shape in SHAPES.items():
        b = torch.randint(-1024, 1025, shape, generator=g).float() / 2048
        base[name] = b + 1.0 if "norm" in name else b
    shared = {n: torch.randint(-6, 7, s, generator=g).float() / 128 for n, s in SHAPES.items()}
    for k in range(n_models):
        own = {n: torch.randint(-(4 + 3 * k), 5 + 3 * k, s, generator=g).float() / 128 for n, s in SHAPES.items()}
        deltas.append({n: shared[n] + own[n] for n in SHAPES})
    return base, [{n: base[n] + d[n] for n in SHAPES} for d in deltas]


def save_model(folder: Path, tensors: Tensors, dtype: torch.dtype) -> Path:
    folder.mkdir(parents=True)
    save_file({n: t.to(dtype).contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
              "torch_dtype": "bfloat16" if dtype is torch.bfloat16 else "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@dataclass
class Family:
    """A base and models saved once; ``run`` merges the first ``n`` models into a fresh folder."""

    root: Path
    base: Tensors
    models: list[Tensors]
    dtype: torch.dtype = torch.float32
    base_dir: Path = field(init=False)
    model_dirs: list[Path] = field(init=False)
    runs: int = 0

    def __post_init__(self) -> None:
        self.base_dir = save_model(self.root / "base", self.base, self.dtype)
        self.model_dirs = [save_model(self.root / f"m{k}", m, self.dtype) for k, m in enumerate(self.models)]
        # what the engine reads: the stored values, upcast
        self.base = {n: t.to(self.dtype).float() for n, t in self.base.items()}
        self.models = [{n: t.to(self.dtype).float() for n, t in m.items()} for m in self.models]

    def out(self) -> Path:
        self.runs += 1
        return self.root / f"out{self.runs}"

    def run(self, method: str, params: dict[str, Any] | None = None, n: int | None = None,
            out: Path | None = None, **options: Any) -> Path:
        out = out or self.out()
        merge(self.base_dir, self.model_dirs[:n], out, method=method, params=params or {}, force=True, **options)
        return out

    def reference(self, method: str, params: dict[str, Any] | None = None, n: int | None = None) -> Tensors:
        return reference_merge(method, self.base, self.models[:n], params)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Family:
    return Family(tmp_path_factory.mktemp("f32"), *dyadic_family(3))


@pytest.fixture(scope="module")
def fam_bf16(tmp_path_factory) -> Family:
    return Family(tmp_path_factory.mktemp("bf16"), *dyadic_family(3, seed=1), dtype=torch.bfloat16)


def load(out: Path) -> Tensors:
    return load_file(str(out / "model.safetensors"))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not out.with_name(out.name + ".streammerge-partial").exists()


# --------------------------------------------------------------------------------------------------------------
# The reference's own building blocks
# --------------------------------------------------------------------------------------------------------------


def test_reference_uniforms_match_rng_reference():
    for seed, k, name in ((0, 0, Q), (1, 2, EMBED), (12345, 1, "x")):
        key = dare_key(seed, k, name)
        assert key == stream_key(seed, k, name)
        u = dare_uniforms(key, 5000)
        for i in (0, 1, 2, 777, 4999):
            assert u[i] == uniform_reference(key, i)
        assert 0.0 <= u.min() and u.max() < 1.0


def test_reference_order_breaks_ties_by_index():
    order = descending_order(torch.tensor([0.5, -1.0, 0.5, 1.0, 0.0, -0.5]).abs())
    assert order.tolist() == [1, 3, 0, 2, 5, 4]


# --------------------------------------------------------------------------------------------------------------
# Engine vs reference
# --------------------------------------------------------------------------------------------------------------

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("linear", {"weight": W3}),
    "linear-unnormalized": ("linear", {"weight": "0.3,0.5,0.9", "normalize": False}),
    "task_arithmetic": ("task_arithmetic", {"weight": W3, "lambda": 0.8}),
    "task_arithmetic-normalized": ("task_arithmetic", {"weight": W3, "lambda": 0.8, "normalize": True}),
    "ties": ("ties", {"weight": W3, "density": D3, "lambda": 0.8}),
    "ties-unnormalized-strings": ("ties", {"weight": "0.3,0.5,0.9", "density": "0.3,0.6,0.9", "lambda": "0.8",
                                           "normalize": "false"}),
    "dare_linear": ("dare_linear", {"weight": W3, "density": D3, "lambda": 0.8, "seed": 3}),
    "dare_linear-norescale-normalized": ("dare_linear", {"weight": W3, "density": D3, "rescale": False,
                                                         "normalize": True}),
    "dare_ties": ("dare_ties", {"weight": W3, "density": D3, "lambda": 0.8}),
    "dare_ties-normalized": ("dare_ties", {"weight": W3, "density": D3, "normalize": True, "seed": 7}),
    "breadcrumbs": ("breadcrumbs", {"weight": W3, "density": D3, "gamma": 0.05, "lambda": 0.8}),
    # model 3: density 0.9 + gamma 0.2 > 1, so the dropped top shrinks to numel − target
    "breadcrumbs_ties": ("breadcrumbs_ties", {"weight": W3, "density": D3, "gamma": [0.05, 0.1, 0.2],
                                              "lambda": 0.8, "normalize": True}),
    "breadcrumbs_ties-unnormalized": ("breadcrumbs_ties", {"weight": W3, "density": [0.5, 0.2, 0.7],
                                                           "gamma": 0.05}),
    "dare_ties-inverse-density": ("dare_ties", {"weight": W3, "density": D3, "rescale_mode": "inverse_density"}),
    "ties-rescaled": ("ties", {"weight": W3, "density": D3, "rescale": True}),
    "breadcrumbs-rescaled": ("breadcrumbs", {"weight": W3, "density": D3, "gamma": 0.05, "rescale": True}),
    "della": ("della", {"weight": W3, "density": D3, "epsilon": 0.05, "lambda": 0.8, "seed": 2}),
    "della-inverse-density": ("della", {"weight": W3, "density": [0.4, 0.5, 0.6], "epsilon": [0.1, 0.2, 0.3],
                                        "rescale_mode": "inverse_density"}),
    "della_linear": ("della_linear", {"weight": W3, "density": [0.4, 0.5, 0.6], "normalize": True}),
    "della_linear-norescale": ("della_linear", {"weight": W3, "density": [0.4, 0.5, 0.6], "rescale": False}),
    "sce": ("sce", {"select_topk": 0.4}),
    "sce-no-selection": ("sce", {}),
    "sce-select-nothing": ("sce", {"select_topk": 0.0}),
    "slerp": ("slerp", {"t": 0.3}),
    "model_stock": ("model_stock", {}),
}
N_MODELS = {"slerp": 1}


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(fam, case):
    method, params = CASES[case]
    n = N_MODELS.get(method)
    got = load(fam.run(method, params, n=n))
    assert HEAD not in got  # tied input without a head: none in the output either
    assert_matches(got, fam.reference(method, params, n=n))


def test_every_method_is_covered():
    assert {m for m, _ in CASES.values()} == set(METHODS)


def test_top_k_boundaries_fall_inside_tie_groups(fam):
    """The fixture really exercises tie-breaking: at many (tensor, model) pairs the k-th and (k+1)-th largest |Δ|
    are equal and non-zero, so which of the equal elements is kept depends on the index order."""
    ties = 0
    for k, m in enumerate(fam.models):
        for name, b in fam.base.items():
            a = (m[name] - b).abs().reshape(-1).sort(descending=True).values
            cut = int(D3[k] * a.numel())
            ties += bool(0 < cut < a.numel() and a[cut - 1] == a[cut] != 0)
    assert ties >= 10


def test_slerp_fixture_takes_both_branches(fam):
    branches = {slerp_coefficients(fam.base[n], fam.models[0][n], 0.3)[2] for n in SHAPES}
    assert branches == {True, False}


# --------------------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_output_bytes_independent_of_chunk_rows(fam_bf16, method):
    params = next(p for m, p in CASES.values() if m == method)
    n = N_MODELS.get(method)
    data = {rows: (fam_bf16.run(method, params, n=n, chunk_rows=rows) / "model.safetensors").read_bytes()
            for rows in (1, 7, 64, None)}
    assert [rows for rows, d in data.items() if d != data[None]] == []


# --------------------------------------------------------------------------------------------------------------
# DARE masks
# --------------------------------------------------------------------------------------------------------------

BIG = "model.layers.0.mlp.gate_proj.weight"


@pytest.fixture(scope="module")
def dare_fam(tmp_path_factory) -> Family:
    """One model whose delta is non-zero everywhere on a 200 x 300 tensor."""
    g = torch.Generator().manual_seed(5)
    base = {BIG: torch.randn(200, 300, generator=g)}
    delta = torch.randn(200, 300, generator=g).sign() * (0.5 + torch.rand(200, 300, generator=g))
    return Family(tmp_path_factory.mktemp("dare"), base, [{BIG: base[BIG] + delta}])


def kept_mask(fam: Family, out: Path) -> torch.Tensor:
    return load(out)[BIG] != fam.base[BIG]


@pytest.mark.parametrize("density", [0.3, 0.75])
def test_dare_kept_fraction(dare_fam, density):
    params = {"density": density, "rescale": False}
    got = load(dare_fam.run("dare_linear", params))[BIG]
    base, model = dare_fam.base[BIG], dare_fam.models[0][BIG]
    kept = got != base
    assert torch.equal(got[kept], model[kept])  # kept elements carry their whole delta, dropped ones none
    n = kept.numel()
    assert abs(int(kept.sum()) - density * n) <= 4 * math.sqrt(n * density * (1 - density))
    assert_matches({BIG: got}, dare_fam.reference("dare_linear", params))


def test_dare_seed_changes_masks_and_same_seed_repeats(dare_fam):
    params = {"density": 0.5}
    m0, m0_again = (kept_mask(dare_fam, dare_fam.run("dare_ties", params)) for _ in range(2))
    m1 = kept_mask(dare_fam, dare_fam.run("dare_ties", {**params, "seed": 1}))
    assert torch.equal(m0, m0_again)
    assert (m0 != m1).float().mean() > 0.3  # independent masks differ at about half the elements


def test_dare_cli_seed(dare_fam):
    via_api = dare_fam.run("dare_linear", {"density": 0.5, "seed": 1})
    via_cli = dare_fam.out()
    args = ["merge", "--base", dare_fam.base_dir, "--model", dare_fam.model_dirs[0], "--out", via_cli,
            "--method", "dare_linear", "--param", "density=0.5", "--seed", "1", "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    seed0 = dare_fam.run("dare_linear", {"density": 0.5})
    read = lambda out: (out / "model.safetensors").read_bytes()  # noqa: E731
    assert read(via_cli) == read(via_api) != read(seed0)


# --------------------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------------------


def test_ties_density_one_is_consensus_only(fam):
    params = {"weight": W3, "lambda": 0.8, "density": 1.0}
    got = load(fam.run("ties", params))
    expected = {name: delta_tensor(name, b, [m[name] for m in fam.models], sparsify_kind="none", consensus=True,
                                   weight=W3, density=[1.0] * 3, gamma=[0.0] * 3, lam=0.8, normalize=True,
                                   rescale=False, seed=0)
                for name, b in fam.base.items()}
    assert_matches(got, expected)
    plain_sum = fam.reference("task_arithmetic", {"weight": W3, "lambda": 0.8})
    assert not torch.allclose(got[Q], plain_sum[Q])  # the sign election did something


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della",
                                    "della_linear"])
def test_density_zero_gives_base(fam, method):
    got = load(fam.run(method, {"weight": W3, "density": 0.0, "lambda": 0.8}))
    for name, b in fam.base.items():
        assert torch.equal(got[name], b), name


def test_a_positive_density_keeps_at_least_one_element(fam):
    """mergekit 0.1.5's magnitude keeps max(1, int(density·n)) elements: one here, where int(0.1·5) is 0."""
    params = {"weight": W3, "density": 0.1}
    assert int(0.1 * SHAPES[SMALL][0]) == 0
    got = load(fam.run("ties", params))
    changed = (got[SMALL] != fam.base[SMALL]).sum().item()
    assert 1 <= changed <= 3  # each model's largest delta, where its sign is the elected one
    assert_matches(got, fam.reference("ties", params))


@pytest.fixture(scope="module")
def unchanged_fam(tmp_path_factory) -> Family:
    base, _ = dyadic_family(0)
    return Family(tmp_path_factory.mktemp("unchanged"), base, [dict(base) for _ in range(3)])


@pytest.mark.parametrize("method", [*DELTA_METHODS, "model_stock"])
def test_all_zero_deltas_give_base(unchanged_fam, method):
    params = next(p for m, p in CASES.values() if m == method)
    got = load(unchanged_fam.run(method, params))
    for name, b in unchanged_fam.base.items():
        assert torch.equal(got[name], b), name


def test_colinear_slerp_interpolates_linearly(tmp_path):
    base, _ = dyadic_family(0)
    fam = Family(tmp_path, base, [{n: 2 * t for n, t in base.items()}])
    assert all(slerp_coefficients(fam.base[n], fam.models[0][n], 0.3)[2] for n in SHAPES)
    got = load(fam.run("slerp", {"t": 0.3}))
    assert_matches(got, fam.reference("slerp", {"t": 0.3}))
    assert_matches(got, {n: 1.3 * b for n, b in fam.base.items()})


def test_model_stock_opposed_deltas_refused(tmp_path):
    base, (m1, _) = dyadic_family(2)
    m2 = dict(m1)
    m2[Q] = 2 * base[Q] - m1[Q]  # Δ2 = −Δ1 on one tensor only: mean cosine −1 = −1/(N−1)
    fam = Family(tmp_path, base, [m1, m2])
    out = fam.out()
    with pytest.raises(MethodError, match=Q.replace(".", r"\.") + r".*exclude=\[") as info:
        fam.run("model_stock", out=out, threads=1)  # one worker: the tensors before Q are done and kept
    assert "kept in" in str(info.value) and "redo_changed=True" in str(info.value)  # Python errors speak Python
    assert not out.exists() and out.with_name(out.name + ".streammerge-partial").is_dir()  # the work is kept
    fam.run("model_stock", out=out, exclude=[re.escape(Q)], redo_changed=True)  # the advice finishes it
    fresh = fam.run("model_stock", exclude=[re.escape(Q)])
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------------------------------------------
# Refusals, before anything is written
# --------------------------------------------------------------------------------------------------------------

INVALID: dict[str, tuple[str, int, dict[str, Any], str]] = {
    "density-above-1": ("ties", 3, {"density": 1.5}, "density"),
    "density-negative": ("dare_linear", 3, {"density": -0.1}, "density"),
    "density-one-model-negative": ("breadcrumbs", 3, {"density": [0.5, -0.1, 0.5]}, "density"),
    "gamma-2": ("breadcrumbs", 3, {"gamma": 2}, "gamma"),
    "slerp-t-1.5": ("slerp", 1, {"t": 1.5}, "parameter t"),
    "per-model-count": ("ties", 3, {"weight": [0.3, 0.7]}, "a list with one value per model"),
    "per-model-count-string": ("dare_ties", 3, {"density": "0.3,0.7"}, "a list with one value per model"),
    "slerp-2-models": ("slerp", 2, {}, "at most 1"),
    "model_stock-1-model": ("model_stock", 1, {}, "at least 2"),
    "linear-weights-sum-0": ("linear", 3, {"weight": [0.5, 0.5, -1.0]}, "sum to zero"),
    "unknown-param": ("ties", 3, {"densty": 0.5}, "did you mean 'density'"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_parameters_refused(fam, case):
    method, n, params, match = INVALID[case]
    out = fam.out()
    with pytest.raises(MethodError, match=match):
        fam.run(method, params, n=n, out=out)
    assert_nothing_written(out)


def test_linear_zero_sum_weights_allowed_without_normalize(fam):
    params = {"weight": [0.5, 0.5, -1.0], "normalize": False}
    assert_matches(load(fam.run("linear", params)), fam.reference("linear", params))


def test_per_model_helper_broadcasts_one_value():
    assert per_model("0.5", 3) == [0.5] * 3 and per_model([1, 2], 2) == [1.0, 2.0]


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.75, 0.999, 1.0])
def test_keep_mask_equals_the_float_uniform_rule(density):
    """The fast integer mask keeps exactly the elements whose uniform u satisfies u >= 1 - density."""
    from streammerge.methods._rng import keep_mask, stream_key, uniform

    key = stream_key(3, 1, "model.layers.0.mlp.up_proj.weight")
    for start, count in [(0, 1000), (123_457, 70_000), (2**40, 513)]:
        expected = uniform(key, start, count) >= 1.0 - density
        assert torch.equal(keep_mask(key, start, count, density), expected)
        assert torch.equal(keep_mask(key, start, count, density, np.float32), expected.float())  # a 0/1 factor
        if torch.cuda.is_available():  # the device path (torch int64 arithmetic) draws the same mask
            assert torch.equal(keep_mask(key, start, count, density, bool, "cuda").cpu(), expected)
