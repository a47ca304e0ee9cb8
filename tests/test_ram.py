"""ram and ramplus_tl against a dense reference written from the RAM formulas (mergekit 0.1.5's semantics): a change
counts where |Δ| > epsilon; unique changes are kept (ramplus_tl: scaled by λ_k = 1 + r·clamp(shared_k/unique_k, 0,
alpha), counts over the whole tensor), shared ones averaged; the same bytes for every chunking; the counts survive a
resume; degenerate inputs (no change, no models, epsilon 0) and parameter checks."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import interrupt_merge_after_chunks
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.errors import MethodError, StreamMergeError
from streammerge.examples import write_family
from streammerge.methods import all_methods
from streammerge.methods.base import Rule, TensorTask


def reference_lambdas(deltas: list[torch.Tensor], eps: float, r: float, alpha: float) -> list[float]:
    counted = [d.abs() > eps for d in deltas]
    how_many = sum(c.int() for c in counted)
    lams = []
    for c in counted:
        unique, shared = int((c & (how_many == 1)).sum()), int((c & (how_many > 1)).sum())
        one = torch.tensor(1.0)
        rho = torch.tensor(float(shared)) / torch.tensor(max(float(unique), eps))
        lam = one + torch.tensor(r) * torch.clamp(rho, 0.0, alpha)
        lams.append(1.0 if math.isnan(float(lam)) else float(lam))  # 0/0: no unique change to scale
    return lams


def reference(base: torch.Tensor, models: list[torch.Tensor], eps: float, plus: bool = False, r: float = 0.1,
              alpha: float = 0.2) -> torch.Tensor:
    """Dense float32: each model's counted change over the number of models counting there (1 for a unique change,
    times λ_k with ``plus``), added up in model order, plus the base."""
    deltas = [m - base for m in models]
    if not deltas:
        return base.clone()
    counted = [d.abs() > eps for d in deltas]
    how_many = sum(c.int() for c in counted).float()
    lams = reference_lambdas(deltas, eps, r, alpha) if plus else [1.0] * len(deltas)
    total = None
    for d, c, lam in zip(deltas, counted, lams):
        kept = torch.where(c, d, torch.zeros_like(d))
        term = torch.where(how_many == 1, kept * lam, kept / how_many.clamp(min=1))
        total = term if total is None else total + term
    return base + total


def family_tensors(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` models whose changes mix exact zeros, changes under 1e-3 and changes above it."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        scale = torch.tensor([0.0, 3e-4, 5e-3])[torch.randint(3, shape, generator=g)]
        models.append(base + scale * torch.randn(shape, generator=g))
    return base, models


def run_chunked(name: str, base: torch.Tensor, models: list[torch.Tensor], params: dict, chunk: int | None,
                rule: Rule = Rule.MATRIX, state_from=None):
    method = all_methods()[name]
    p = method.resolve_params(params, len(models))
    merge = method.start(TensorTask("t", tuple(base.shape), rule, 64), p, len(models))
    rows = base.shape[0] if base.dim() >= 2 else 1
    step = chunk or max(rows, 1)
    spans = ([(a, min(a + step, rows)) for a in range(0, rows, step)] or [(0, 0)]) if base.dim() >= 2 else [(0, 1)]

    def part(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return x[a:b].clone() if x.dim() >= 2 else x.clone()

    if state_from is not None:
        merge.load_state_dict({k: v.clone() for k, v in state_from.state_dict().items()})
    else:
        for pi in range(method.stat_passes(rule, p)):
            for a, b in spans:
                merge.accumulate(pi, a, part(base, a, b), [part(m, a, b) for m in models])
            merge.end_pass(pi)
    out = torch.cat([merge.emit(a, part(base, a, b), [part(m, a, b) for m in models]).reshape(-1) for a, b in spans])
    return out.reshape(base.shape), merge


SHAPES = [((37, 11), Rule.MATRIX), ((5, 6, 7), Rule.TENSOR), ((3, 2, 2, 3), Rule.CONV), ((29,), Rule.VECTOR),
          ((), Rule.VECTOR)]
PLUS_PARAMS = {"r": 0.6, "alpha": 0.9, "epsilon": 1e-3}


@pytest.mark.parametrize("shape,rule", SHAPES, ids=["matrix", "experts", "conv", "vector", "scalar"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_the_methods_match_the_dense_reference_for_every_chunking(name, n, shape, rule):
    base, models = family_tensors(shape, n, seed=n + len(shape))
    params = {"epsilon": 1e-3} if name == "ram" else PLUS_PARAMS
    want = reference(base, models, 1e-3, name == "ramplus_tl", 0.6, 0.9)
    for chunk in (None, 1, 3, 7):
        got, _ = run_chunked(name, base, models, params, chunk, rule)
        assert torch.equal(got, want), (chunk, (got - want).abs().max())


def test_counts_decide_the_result():
    """Unique changes kept whole, shared ones averaged (ram); λ scales the unique ones (ramplus_tl)."""
    base, models = family_tensors((40, 9), 3, seed=1)
    deltas = [m - base for m in models]
    counted = torch.stack([d.abs() > 1e-3 for d in deltas]).sum(0)
    assert (counted == 0).any() and (counted == 1).any() and (counted == 2).any() and (counted == 3).any()
    ram, _ = run_chunked("ram", base, models, {"epsilon": 1e-3}, 7)
    plus, merge = run_chunked("ramplus_tl", base, models, PLUS_PARAMS, 7)
    lams = reference_lambdas(deltas, 1e-3, 0.6, 0.9)
    assert merge.lam == lams and all(lam > 1 for lam in lams)
    unique = counted == 1
    assert torch.equal(ram[counted == 0], base[counted == 0])
    assert not torch.equal(ram[unique], plus[unique]) and torch.equal(ram[~unique], plus[~unique])
    one = torch.stack([d.abs() > 1e-3 for d in deltas])[0] & unique  # model 1's unique changes, scaled by λ_1
    assert torch.equal(plus[one], base[one] + deltas[0][one] * lams[0])


def test_degenerate_inputs():
    base, models = family_tensors((6, 5), 2, seed=2)
    for name in ("ram", "ramplus_tl"):
        same, _ = run_chunked(name, base, [base.clone(), base.clone()], {}, 4)  # no change anywhere
        assert torch.equal(same, base)
        alone, _ = run_chunked(name, base, [], {}, 4)  # no models: the base (mergekit's answer)
        assert torch.equal(alone, base)
        one, _ = run_chunked(name, base, models[:1], {"epsilon": 0.0}, 4)  # one model, every change counts
        assert torch.equal(one, base + (models[0] - base))
        empty, _ = run_chunked(name, torch.zeros(0, 3), [torch.zeros(0, 3)] * 2, {}, None)
        assert empty.shape == (0, 3)


def test_epsilon_zero_with_an_unchanged_model_stays_finite():
    """mergekit gives NaN for the whole tensor (0/0 ratio); λ of a model with no change is 1 here."""
    base, models = family_tensors((8, 7), 1, seed=3)
    got, merge = run_chunked("ramplus_tl", base, [models[0], base.clone()], {"epsilon": 0.0}, 3)
    assert merge.lam[1] == 1.0 and torch.isfinite(got).all()
    assert torch.equal(got, reference(base, [models[0], base.clone()], 0.0, True))


@pytest.mark.parametrize("name,params,complaint", [
    ("ram", {"epsilon": -1e-5}, "epsilon=-1e-05 must be finite and >= 0"),
    ("ramplus_tl", {"alpha": -0.1}, "alpha=-0.1 must be finite and >= 0"),
    ("ramplus_tl", {"r": "inf"}, "r=inf must be finite"),
    ("ramplus_tl", {"epsilon": "inf"}, "epsilon=inf must be finite and >= 0"),
])
def test_parameters_are_checked(name, params, complaint):
    with pytest.raises(MethodError, match=complaint):
        all_methods()[name].resolve_params(params, 2)


def test_counts_survive_a_resume():
    base, models = family_tensors((23, 13), 3, seed=4)
    first, done = run_chunked("ramplus_tl", base, models, PLUS_PARAMS, 7)
    assert set(done.state_dict()) == {"counts", "lambda"}
    resumed, merge = run_chunked("ramplus_tl", base, models, PLUS_PARAMS, 3, state_from=done)
    assert torch.equal(resumed, first) and merge.lam == done.lam


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """bf16 models (the models are read as stored and upcast inside ``m − base``) with exact zeros in the deltas."""
    fam = write_family(tmp_path_factory.mktemp("ram"), "tiny-llama", dtype="bf16",
                       variants=(("chat", 0.1), ("multilingual", 0.3), ("code", 0.2)))
    base = load_file(fam["base"] / "model.safetensors")
    for k, name in enumerate(("chat", "multilingual", "code")):
        tensors = load_file(fam[name] / "model.safetensors")
        for key, t in tensors.items():
            t[k::3] = base[key][k::3]
        save_file(tensors, fam[name] / "model.safetensors", metadata={"format": "pt"})
    return fam


MODELS = ("chat", "multilingual", "code")


@pytest.mark.parametrize("name,params", [("ram", {"epsilon": 2e-3}), ("ramplus_tl", {"r": 0.5, "alpha": 1.5,
                                                                                      "epsilon": 3e-3})])
def test_merges_match_the_reference_with_the_same_bytes_for_every_chunking(name, params, fam, tmp_path):
    models = [fam[m] for m in MODELS]
    outs = [api.merge(fam["base"], models, tmp_path / f"o{k}", method=name, params=params, chunk_rows=chunk)
            for k, chunk in enumerate((None, 3, 7))]
    data = [(o / "model.safetensors").read_bytes() for o in outs]
    assert data[1] == data[0] and data[2] == data[0]
    merged = load_file(outs[0] / "model.safetensors")
    base = load_file(fam["base"] / "model.safetensors")
    inputs = [load_file(fam[m] / "model.safetensors") for m in MODELS]
    for t, b in base.items():
        want = reference(b.float(), [m[t].float() for m in inputs], params["epsilon"], name == "ramplus_tl",
                         params.get("r", 0.1), params.get("alpha", 0.2))
        assert torch.equal(merged[t], want.to(torch.bfloat16)), t


def test_a_recipe_whose_only_model_is_the_base_gives_the_base(fam, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from streammerge.cli import main

    monkeypatch.chdir(fam["base"].parent)
    (tmp_path / "r.yml").write_text("merge_method: ramplus_tl\nbase_model: base\nmodels:\n  - model: base\n")
    r = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 0, r.output
    merged, base = (load_file(p / "model.safetensors") for p in (tmp_path / "out", fam["base"]))
    assert all(torch.equal(merged[k], base[k]) for k in base)


def test_an_interrupted_merge_resumes_from_its_saved_counts(fam, tmp_path, monkeypatch):
    models = [fam[m] for m in MODELS]
    params = {"r": 0.5, "alpha": 1.5, "epsilon": 3e-3}
    whole = api.merge(fam["base"], models, tmp_path / "whole", method="ramplus_tl", params=params)
    out = tmp_path / "out"
    interrupt_merge_after_chunks(12, lambda: api.merge(fam["base"], models, out, method="ramplus_tl", params=params, chunk_rows=5))
    method = all_methods()["ramplus_tl"]
    loaded, passes = [], []
    real = method.start

    def start(task, p, n):  # type: ignore[no-untyped-def]
        merge = real(task, p, n)
        load, accumulate = merge.load_state_dict, merge.accumulate
        merge.load_state_dict = lambda state: (loaded.append(task.name), load(state))
        merge.accumulate = lambda *a: (passes.append(task.name), accumulate(*a))
        return merge

    monkeypatch.setattr(method, "start", start)
    api.merge(fam["base"], models, out, method="ramplus_tl", params=params, chunk_rows=7)
    assert loaded, "the resumed run recounted instead of loading the saved counts"
    assert not set(loaded) & set(passes)
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_a_misspelt_name_suggests_ram(fam, tmp_path):
    with pytest.raises(StreamMergeError, match="did you mean 'ram'"):
        api.merge(fam["base"], [fam["chat"]], tmp_path / "out", method="rma")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_on_cuda_the_result_is_the_cpus(name):
    """Element-wise IEEE operations and integer counts: the same bytes on a GPU, for every chunking."""
    base, models = family_tensors((37, 11), 3, seed=7)
    params = {"epsilon": 1e-3} if name == "ram" else PLUS_PARAMS
    cpu, _ = run_chunked(name, base, models, params, None)
    for chunk in (None, 1, 7):
        got, _ = run_chunked(name, base.cuda(), [m.cuda() for m in models], params, chunk)
        assert torch.equal(got.cpu(), cpu), chunk
