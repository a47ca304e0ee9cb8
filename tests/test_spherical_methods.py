"""nuslerp, multislerp and karcher against dense references written here from mergekit 0.1.5's formulas (float64,
whole tensors; mergekit itself is compared in test_mergekit_parity_spherical.py): every rule's shape (matrix,
embedding, Conv1D, vector, scalar, stacked experts, convolution kernel), with and without a base, every nuslerp
variant; the same bytes for every chunking; degenerate inputs (zero, identical, anti-parallel, cancelling, NaN);
statistics that survive a resume; recipes without ``base_model`` and karcher's averaged base."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import interrupt_merge_after_chunks
from safetensors.torch import load_file, save_file

from streammerge import Recipe, api
from streammerge.cli import main
from streammerge.errors import MethodError, StreamMergeError
from streammerge.examples import write_family
from streammerge.methods import all_methods
from streammerge.methods.base import Rule, TensorTask

# ---- dense references (float64, whole tensors, from the formulas) --------------------------------------------------


def ref_nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool = True,
                row_wise: bool = False) -> torch.Tensor:
    """mergekit's nuslerp of two tensors: vectors are the whole tensor (flatten), its rows along the last dim, or
    (row_wise) its columns along dim 0; the colinear test ``1 − cos² <= 1e-16`` is made in float32 as mergekit does."""
    shape = v0.shape
    a, b = v0.double(), v1.double()
    if flatten or a.dim() <= 1:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = a.reshape(shape[0], -1).T, b.reshape(shape[0], -1).T
    else:
        a, b = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    c32 = cos.float()
    colinear = (1 - c32 * c32) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten and v0.dim() >= 2:
        out = out.T
    return out.reshape(shape)


def ref_multislerp(vs: list[torch.Tensor], weights: list[float], normalize: bool = True,
                   eps: float = 1e-8) -> torch.Tensor:
    """mergekit's multislerp of flattened tensors (float64)."""
    if len(vs) == 1:
        return vs[0].double()
    x = torch.stack([v.double().reshape(-1) for v in vs])
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum() if normalize else w
    norms = x.norm(dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = (w[:, None] * units).sum(0)
    if mean.norm() < eps:
        assert len(vs) == 2
        return (w[0] * x[0] + w[1] * x[1]).reshape(vs[0].shape)
    mean = mean / mean.norm()
    tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
    tn = tangent.norm() + eps
    out = (mean * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms[:, 0] * w).sum()
    return out.reshape(vs[0].shape)


def ref_karcher(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """mergekit's Karcher mean of flattened tensors with equal weights (float64)."""
    if len(xs) == 1:
        return xs[0].double()
    x = [v.double().reshape(-1) for v in xs]
    norms = [float(v.norm()) for v in x]
    alpha = 1 / len(x)
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(xs[0].shape, dtype=torch.float64)
    units = {i: x[i] / norms[i] for i in valid}
    mean = sum(units[i] for i in valid) / len(valid)
    mean = units[valid[0]].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = float(torch.dot(mean, units[i]).clamp(-1, 1))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += (theta / math.sin(theta) / len(valid)) * (units[i] - dot * mean)
        tn = float(tangent.norm())
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (sum(alpha * n for n in norms) * mean).reshape(xs[0].shape)


def reference(method: str, params: dict, base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """The dense result of ``method`` (streammerge's parameter names) for one tensor, float32."""
    use_base = params.get("use_base", True)
    vs = [m.double() - base.double() for m in models] if use_base else [m.double() for m in models]
    w = [float(x) for x in params.get("weight", [1.0] * len(models))]
    if method == "nuslerp":
        t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
        out = ref_nuslerp(t, vs[0], vs[1], params.get("nuslerp_flatten", True), params.get("nuslerp_row_wise", False))
    elif method == "multislerp":
        if len(models) == 1:
            return models[0].float()
        out = ref_multislerp(vs, w, params.get("normalize_weights", True), params.get("eps", 1e-8))
    else:
        return ref_karcher(models, params.get("max_iter", 10), params.get("tol", 1e-5)).float()
    return (out + base.double() if use_base else out).float()


# ---- the engine's calls on one tensor, as the runner makes them ---------------------------------------------------


def drive(method: str, params: dict, rule: Rule, base: torch.Tensor, models: list[torch.Tensor],
          step: int | None, tile: int = 4, state: bool = False) -> torch.Tensor:
    """Statistics passes then the merge pass over row chunks of ``step`` rows (None: whole; a vector is always
    whole, as the planner has it). ``state``: the merge pass runs on a fresh TensorMerge that loads the statistics
    (a resumed run)."""
    m = all_methods()[method]
    p = m.resolve_params(params, len(models))
    task = TensorTask("t", tuple(base.shape), rule, tile)
    rows = task.rows
    step = rows if step is None or base.dim() <= 1 else step
    spans = [(r, min(r + step, rows)) for r in range(0, rows, step)] if base.dim() else [(0, 1)]

    def part(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return x[r0:r1].clone() if x.dim() else x.clone()

    merge = m.start(task, p, len(models))
    for k in range(m.stat_passes(rule, p)):
        for r0, r1 in spans:
            merge.accumulate(k, r0, part(base, r0, r1), [part(x, r0, r1) for x in models])
        merge.end_pass(k)
    if state:
        saved = merge.state_dict()
        merge = m.start(task, p, len(models))
        merge.load_state_dict({k: v.clone() for k, v in saved.items()})
    out = [merge.emit(r0, part(base, r0, r1), [part(x, r0, r1) for x in models]) for r0, r1 in spans]
    return torch.cat(out) if base.dim() else out[0]


SHAPES = {  # rule, shape
    "matrix": (Rule.MATRIX, (13, 7)),
    "embedding": (Rule.EMBEDDING, (11, 5)),
    "conv1d": (Rule.CONV1D, (9, 6)),
    "vector": (Rule.VECTOR, (17,)),
    "scalar": (Rule.VECTOR, ()),
    "experts": (Rule.TENSOR, (5, 4, 6)),
    "conv": (Rule.CONV, (6, 3, 2, 3)),
}
VARIANTS = {  # id: method, params, number of models
    "nuslerp-flat": ("nuslerp", {"weight": [0.3, 0.9]}, 2),
    "nuslerp-flat-no-base": ("nuslerp", {"weight": [0.3, 0.9], "use_base": False}, 2),
    "nuslerp-rows": ("nuslerp", {"weight": [1.0, 0.4], "nuslerp_flatten": False}, 2),
    "nuslerp-rows-no-base": ("nuslerp", {"nuslerp_flatten": False, "use_base": False}, 2),
    "nuslerp-row-wise": ("nuslerp", {"weight": [0.5, 0.2], "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2),
    "nuslerp-row-wise-no-base": ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True,
                                             "use_base": False}, 2),
    "multislerp-2": ("multislerp", {"weight": [0.3, 0.7]}, 2),
    "multislerp-3": ("multislerp", {"weight": [0.6, 0.15, 0.25]}, 3),
    "multislerp-3-no-base": ("multislerp", {"weight": [0.5, 1.2, 0.3], "use_base": False}, 3),
    "multislerp-unnormalized": ("multislerp", {"weight": [0.5, 1.2, 0.3], "normalize_weights": False}, 3),
    "multislerp-1": ("multislerp", {}, 1),
    "karcher-2": ("karcher", {}, 2),
    "karcher-3": ("karcher", {"max_iter": 30, "tol": 1e-7}, 3),
}


def inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` models near it, each changing some columns more than others."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05 + 0.01
    models = [base + 0.02 * (k + 1) * torch.randn(shape, generator=g) * (torch.rand(shape[1:], generator=g) * 2)
              for k in range(n)]
    return base, models


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", list(SHAPES))
def test_every_rule_against_the_dense_reference_for_every_chunking(variant, kind):
    method, params, n = VARIANTS[variant]
    rule, shape = SHAPES[kind]
    base, models = inputs(shape, n)
    outs = [drive(method, params, rule, base, models, step) for step in (None, 1, 3, 7)]
    want = reference(method, params, base, models)
    assert outs[0].dtype == torch.float32 and outs[0].shape == shape
    assert torch.allclose(outs[0], want, atol=1e-6, rtol=1e-5), (outs[0] - want).abs().max()
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    if all_methods()[method].stat_passes(rule, all_methods()[method].resolve_params(params, n)):
        assert torch.equal(drive(method, params, rule, base, models, 3, state=True), outs[0])  # resumed


def test_the_variants_take_their_own_vectors():
    """Flattened, per row and per column give three different results on a matrix (the test above cannot pass by
    all of them computing the same thing)."""
    base, models = inputs((8, 6), 2)
    outs = [drive("nuslerp", {"nuslerp_flatten": f, "nuslerp_row_wise": r}, Rule.MATRIX, base, models, None)
            for f, r in ((True, False), (False, False), (False, True))]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    assert not torch.allclose(outs[0], outs[2])
    # flatten wins over row_wise, as in mergekit
    both = drive("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": True}, Rule.MATRIX, base, models, None)
    assert torch.equal(both, outs[0])


# ---- degenerate inputs ----------------------------------------------------------------------------------------------


def grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16 values (as float32), so that ``(B ± Δ) − B`` is exactly ``±Δ``."""
    return x.bfloat16().float()


def anti_inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A base, a model and a delta on the bfloat16 grid: B + Δ and B − Δ have exactly anti-parallel deltas."""
    base, (m,) = inputs(shape, 1)
    base, d = grid(base), grid(m - base)
    assert torch.equal((base - d) - base, -((base + d) - base))
    return base, base + d, d


def test_nuslerp_degenerate_vectors():
    base, m, d = anti_inputs((12, 5))
    t = 0.75  # weights 1, 3
    nus = {"weight": [1.0, 3.0]}
    # exactly anti-parallel deltas: the colinear branch, linear interpolation (1 − t)·d − t·d
    anti = drive("nuslerp", nus, Rule.MATRIX, base, [base + d, base - d], None)
    assert torch.allclose(anti, base + ((1 - t) * (base + d - base) + t * (base - d - base)), atol=1e-7)
    # identical models: the model
    assert torch.allclose(drive("nuslerp", nus, Rule.MATRIX, base, [m, m], 5), m, atol=1e-7)
    # one zero delta: a zero vector is orthogonal to everything (θ = π/2), so B + sin(t·π/2)·Δ₁
    half = drive("nuslerp", nus, Rule.MATRIX, base, [base, m], 5)
    assert torch.allclose(half, base + math.sin(t * math.pi / 2) * d, atol=1e-7)
    # both zero: the base
    assert torch.equal(drive("nuslerp", nus, Rule.MATRIX, base, [base, base], 5), base)
    # per row: each row on its own branch (row 0 anti-parallel, row 1 zero, the rest general)
    m0, m1 = m.clone(), inputs((12, 5), 1, seed=9)[1][0]
    m1[0] = 2 * base[0] - m0[0]
    m0[1] = m1[1] = base[1]
    rows = drive("nuslerp", {**nus, "nuslerp_flatten": False}, Rule.MATRIX, base, [m0, m1], 5)
    assert torch.allclose(rows, reference("nuslerp", {**nus, "nuslerp_flatten": False}, base, [m0, m1]), atol=1e-6)
    assert torch.allclose(rows[0], base[0] + (1 - t) * (m0[0] - base[0]) + t * (m1[0] - base[0]), atol=1e-7)
    assert torch.equal(rows[1], base[1])


def test_multislerp_degenerate_vectors():
    base, m, d = anti_inputs((12, 5))
    # two anti-parallel deltas with weights that cancel: mergekit's fallback, linear interpolation (here: the base)
    fallback = drive("multislerp", {}, Rule.MATRIX, base, [base + d, base - d], 5)
    assert torch.equal(fallback, base)
    # with unequal weights they have a mean direction, the heavier one's, and the weighted norm ‖Δ‖
    lean = drive("multislerp", {"weight": [0.2, 0.8]}, Rule.MATRIX, base, [base + d, base - d], 5)
    assert torch.allclose(lean, base - d, atol=1e-7)
    # three models whose weighted directions cancel: a clear error naming the tensor
    with pytest.raises(MethodError, match="tensor t: .*mean .* is zero"):
        drive("multislerp", {"weight": [1.0, 1.0, 0.0]}, Rule.MATRIX, base, [base + d, base - d, m], 5)
    # no model changed the tensor: the base (mergekit raises for three models; nothing to interpolate)
    assert torch.equal(drive("multislerp", {}, Rule.MATRIX, base, [base, base, base], 5), base)
    # identical models: the model; one model: the model itself
    assert torch.allclose(drive("multislerp", {}, Rule.MATRIX, base, [m, m, m], 5), m, atol=1e-7)
    assert torch.equal(drive("multislerp", {"weight": [0.3]}, Rule.MATRIX, base, [m], 5), m)


def test_karcher_degenerate_vectors():
    base, (m, other) = inputs((12, 5), 2)
    # identical inputs: the input
    assert torch.allclose(drive("karcher", {}, Rule.MATRIX, base, [m, m, m], 5), m, atol=1e-7)
    # anti-parallel inputs: no mean direction, so the first input's, times the mean norm (mergekit gives the same)
    assert torch.allclose(drive("karcher", {}, Rule.MATRIX, base, [m, -m], 5), m, atol=1e-7)
    # a zero input takes no part in the direction but counts in the mean norm
    z = torch.zeros_like(m)
    got = drive("karcher", {}, Rule.MATRIX, base, [m, other, z], 5)
    assert torch.allclose(got, reference("karcher", {}, base, [m, other, z]), atol=1e-6)
    direction = reference("karcher", {}, base, [m, other])
    assert torch.allclose(got, direction * 2 / 3, atol=1e-6)
    # after one step from the mean of three directions, the zero input's share is renormalised away
    third = inputs((12, 5), 1, seed=7)[1][0]
    step = drive("karcher", {"max_iter": 1}, Rule.MATRIX, base, [m, other, third, z], 5)
    assert torch.allclose(step, reference("karcher", {"max_iter": 1}, base, [m, other, third, z]), atol=1e-6)
    assert not torch.allclose(step, drive("karcher", {}, Rule.MATRIX, base, [m, other, third, z], 5), atol=1e-6)
    # nearly anti-parallel inputs (within tol of π): no tangent toward the antipode, so the first input's direction
    # (mergekit's float32 arithmetic blows the rounding noise up by θ/sin θ, here ~1e6, into a step of ~1 radian)
    g = torch.Generator().manual_seed(3)
    near = -m * (1 + 1e-6 * torch.randn(m.shape, generator=g))
    assert torch.allclose(drive("karcher", {}, Rule.MATRIX, base, [m, near], 5), m, atol=1e-6)
    # every input zero: zero; one input: itself
    assert torch.equal(drive("karcher", {}, Rule.MATRIX, base, [z, z], 5), z)
    assert torch.equal(drive("karcher", {}, Rule.MATRIX, base, [m], 5), m)
    # max_iter 0: the normalised mean of the directions, times the mean norm
    start = drive("karcher", {"max_iter": 0}, Rule.MATRIX, base, [m, other], 5)
    u = m / m.norm() + other / other.norm()
    assert torch.allclose(start, u / u.norm() * (m.norm() + other.norm()) / 2, atol=1e-6)


@pytest.mark.parametrize("method, params, error", [
    ("multislerp", {"weight": [1.0, -1.0]}, "sum to zero"),
    ("multislerp", {"eps": -1.0}, "must be >= 0"),
    ("karcher", {"max_iter": -1}, "must be >= 0"),
    ("karcher", {"tol": float("inf")}, "finite"),
    ("nuslerp", {"weight": [1.0, float("inf")]}, "finite"),
])
def test_bad_parameters_are_refused_by_name(method, params, error):
    with pytest.raises(MethodError, match=error):
        all_methods()[method].resolve_params(params, 2)


def test_nuslerp_takes_exactly_two_models():
    with pytest.raises(MethodError, match="at most 2"):
        all_methods()["nuslerp"].check_models(3)
    with pytest.raises(MethodError, match="at least 2"):
        all_methods()["nuslerp"].check_models(1)


# ---- whole merges -------------------------------------------------------------------------------------------------

EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"
KERNEL = "model.visual.patch_embed.proj.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, Path]:
    """tiny-llama in float32 with three variants, plus stacked experts and a convolution kernel in every model."""
    fam = write_family(tmp_path_factory.mktemp("sph"), "tiny-llama", dtype="f32",
                       variants=(("chat", 0.1), ("multilingual", 0.3), ("code", 0.2)))
    g = torch.Generator().manual_seed(4)
    extra = {EXPERTS: torch.randn(5, 12, 16, generator=g) * 0.02, KERNEL: torch.randn(6, 3, 2, 2, 2, generator=g) * 0.02}
    for k, folder in enumerate(fam.values()):
        tensors = load_file(folder / "model.safetensors")
        tensors.update({n: b + 0.002 * k * torch.randn(b.shape, generator=g) for n, b in extra.items()})
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return fam


def _models(fam: dict[str, Path], n: int) -> list[Path]:
    return [fam[k] for k in ("chat", "multilingual", "code")[:n]]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("multislerp-unnormalized", "karcher-2")])
def test_whole_merges_against_the_dense_reference_and_every_chunking(variant, fam, tmp_path):
    method, params, n = VARIANTS[variant]
    models = _models(fam, n)
    outs = [load_file(api.merge(fam["base"], models, tmp_path / f"o{k}", method=method, params=params,
                                chunk_rows=chunk) / "model.safetensors") for k, chunk in enumerate((None, 3, 7))]
    base = load_file(fam["base"] / "model.safetensors")
    ms = [load_file(m / "model.safetensors") for m in models]
    plan = api.plan(fam["base"], models, method=method, params=params)
    rules = {t.name: t.rule for t in plan.tensors}
    assert rules[EXPERTS] is Rule.TENSOR and rules[KERNEL] is Rule.CONV
    assert rules["model.embed_tokens.weight"] is Rule.EMBEDDING
    for name, b in base.items():
        want = reference(method, params, b, [m[name] for m in ms])
        assert torch.allclose(outs[0][name], want, atol=2e-6, rtol=1e-5), (name, (outs[0][name] - want).abs().max())
        assert torch.equal(outs[0][name], outs[1][name]) and torch.equal(outs[0][name], outs[2][name]), name


def test_planned_passes_follow_the_variant(fam):
    two = _models(fam, 2)
    for params, passes in (({}, 1), ({"nuslerp_flatten": False}, 0),
                           ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 1)):
        plan = api.plan(fam["base"], two, method="nuslerp", params=params)
        assert {t.stat_passes for t in plan.tensors if t.rule.merged} == {passes}, params
    assert {t.stat_passes for t in api.plan(fam["base"], two[:1], method="multislerp").tensors} == {0}
    assert {t.stat_passes for t in api.plan(fam["base"], two, method="karcher").tensors if t.rule.merged} == {1}


def _poisoned(fam: dict[str, Path], tmp: Path) -> dict[str, Path]:
    """The family with a NaN in one element of the chat model's o_proj."""
    out = dict(fam)
    out["chat"] = tmp / "chat"
    out["chat"].mkdir()
    for f in fam["chat"].iterdir():
        (out["chat"] / f.name).write_bytes(f.read_bytes())
    tensors = load_file(fam["chat"] / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_file(tensors, out["chat"] / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("variant", ["nuslerp-rows", "nuslerp-row-wise", "multislerp-3", "karcher-3"])
def test_a_nan_input_is_a_clean_error_naming_it(variant, fam, tmp_path):
    method, params, n = VARIANTS[variant]
    bad = _poisoned(fam, tmp_path)
    with pytest.raises(StreamMergeError) as info:
        api.merge(bad["base"], _models(bad, n), tmp_path / "out", method=method, params=params)
    message = str(info.value)
    assert "model.layers.1.self_attn.o_proj.weight" in message and "NaN or infinity" in message, message
    assert "model 1" in message and str(bad["chat"]) in message, message


def test_cancelling_directions_stop_the_merge_naming_the_tensor(fam, tmp_path):
    """Three models where one tensor's weighted unit mean is zero (X, −X and a third of weight 0): the merge stops
    with multislerp's error, naming the tensor."""
    name = "model.layers.0.self_attn.q_proj.weight"
    chat = load_file(fam["chat"] / "model.safetensors")
    folders = {}
    for k, sign in (("plus", 1), ("minus", -1)):
        folders[k] = tmp_path / k
        folders[k].mkdir()
        for f in fam["chat"].iterdir():
            (folders[k] / f.name).write_bytes(f.read_bytes())
        save_file({**chat, name: sign * chat[name]}, folders[k] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamMergeError, match=f"multislerp: tensor {name}: .* is zero"):
        api.merge(fam["base"], [folders["plus"], folders["minus"], fam["code"]], tmp_path / "out",
                  method="multislerp", params={"weight": [1.0, 1.0, 0.0], "use_base": False})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["nuslerp-flat", "nuslerp-row-wise-no-base", "multislerp-3", "karcher-3"])
def test_an_interrupted_merge_resumes_from_its_saved_statistics(variant, fam, tmp_path):
    """Interrupted mid-tensor, after a statistics pass was saved: the resumed run (another chunking) loads the
    statistics and its bytes equal an uninterrupted merge."""
    method, params, n = VARIANTS[variant]
    models = _models(fam, n)
    whole = api.merge(fam["base"], models, tmp_path / "whole", method=method, params=params)
    out = tmp_path / "out"
    interrupt_merge_after_chunks(8, lambda: api.merge(fam["base"], models, out, method=method, params=params, chunk_rows=5))
    assert list((out.with_name("out.streammerge-partial") / "state").glob("*.safetensors"))
    loaded = []
    real = all_methods()[method].start

    def start(*args):  # type: ignore[no-untyped-def]
        merge = real(*args)
        load = merge.load_state_dict
        merge.load_state_dict = lambda state: (loaded.append(1), load(state))  # type: ignore[method-assign]
        return merge

    all_methods()[method].start = start  # type: ignore[method-assign]
    try:
        api.merge(fam["base"], models, out, method=method, params=params, chunk_rows=7)
    finally:
        del all_methods()[method].start
    assert loaded, "the resumed run recomputed the statistics instead of loading them"
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


# ---- recipes ------------------------------------------------------------------------------------------------------


def _recipe(tmp: Path, text: str) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_nuslerp_recipe_without_base_model_interpolates_the_models(fam, tmp_path):
    path = _recipe(tmp_path, f"""
merge_method: nuslerp
models:
  - model: {fam['chat']}
    parameters: {{weight: 0.3}}
  - model: {fam['multilingual']}
    parameters: {{weight: 0.9}}
parameters: {{nuslerp_flatten: false}}
dtype: float32
""")
    assert Recipe.from_yaml(path, out=tmp_path / "out").parameters["use_base"] is False
    r = CliRunner().invoke(main, ["merge", str(path), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    chat, multi = (load_file(fam[k] / "model.safetensors") for k in ("chat", "multilingual"))
    params = {"weight": [0.3, 0.9], "nuslerp_flatten": False, "use_base": False}
    for name, c in chat.items():
        assert torch.allclose(got[name], reference("nuslerp", params, c, [c, multi[name]]), atol=2e-6, rtol=1e-5), name


def test_a_karcher_recipe_with_base_model_averages_the_base_too(fam, tmp_path):
    path = _recipe(tmp_path, f"""
merge_method: karcher
base_model: {fam['base']}
models:
  - model: {fam['chat']}
  - model: {fam['multilingual']}
dtype: float32
""")
    r = CliRunner().invoke(main, ["merge", str(path), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    base, chat, multi = (load_file(fam[k] / "model.safetensors") for k in ("base", "chat", "multilingual"))
    for name, b in base.items():
        want = reference("karcher", {}, b, [chat[name], multi[name], b])
        assert torch.allclose(got[name], want, atol=2e-6, rtol=1e-5), name
        assert not torch.allclose(got[name], reference("karcher", {}, b, [chat[name], multi[name]]), atol=1e-6)
