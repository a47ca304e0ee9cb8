"""arcee_fusion's fused kernels (streammerge.kernels._numba_fusion): a merge gives the same bytes with them as eager
torch, in bfloat16, float32 and float16 and with a base and model of different dtypes, at any chunk size and number
of workers, over matrices, experts, a convolution kernel, vectors, a scalar and a tensor whose importances hold
ties, zeros of both signs and negative values; each kernel against the eager code it mirrors, block by block; a
NaN is refused with the eager message; inputs no kernel takes go the eager way."""

from __future__ import annotations

import importlib.util
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_same_output, spying, with_nan
from safetensors.torch import load_file, save_file

from streammerge import api, kernels
from streammerge.errors import NonFiniteError
from streammerge.examples import write_family
from streammerge.methods import Rule, TensorTask, get_method
from streammerge.methods._quantile import OrderStatistics, order_keys
from streammerge.methods.arcee_fusion import as_softmax_rows, quartile_ranks, row_kl

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
pytestmark = [pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed: no fused kernels to compare"),
              pytest.mark.filterwarnings("ignore:the 1 tensors of the vision tower")]

METHOD = get_method("arcee_fusion")
FUSION = ("fusion_high", "fusion_low", "fusion_emit")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
HARD = "model.layers.1.mlp.hard.weight"


def hard_pair(dtype: torch.dtype, rows: int = 61, width: int = 33, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and model (``dtype``) whose importances hold ties (rows equal to the base's: zeros, of both signs;
    repeated rows) and negative values (rows changed by one stored step in one element, float32 by 1e-6, whose KL
    rounds to either sign of 0)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, width, generator=g) * 0.02).to(dtype)
    model = (base.float() + 0.01 * torch.randn(rows, width, generator=g)).to(dtype)
    model[0::4] = base[0::4]
    model[1::4] = base[1::4]
    if dtype == torch.float32:
        model[1::4, 0] += 1e-6
    else:
        model[1::4, 0] = (base[1::4, 0].view(torch.int16) + 1).view(dtype)
    base[3::8], model[3::8] = base[3], model[3]
    return base, model


def importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """The eager importances of a whole tensor (``_FusionMerge``'s formula, on float32 copies)."""
    b, m = as_softmax_rows(base.float()), as_softmax_rows(model.float())
    return (m - b).abs().mul_(row_kl(m, b).unsqueeze(-1))


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The tiny family (base and chat) in each dtype, with stacked experts, a convolution kernel, a scalar, a
    one-column matrix and :func:`hard_pair` besides the decoder's matrices and vectors."""
    root = tmp_path_factory.mktemp("fusion-kernels")
    out = {}
    for name, dtype in DTYPES.items():
        fam = write_family(root / name, "tiny", dtype=name, variants=(("chat", 0.1),))
        g = torch.Generator().manual_seed(9)
        extra = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 6, 10, generator=g),
                 "model.visual.patch_embed.proj.weight": torch.randn(6, 3, 2, 2, generator=g),
                 "model.layers.0.mlp.scale": torch.randn((), generator=g),
                 "model.layers.1.mlp.gate.weight": torch.randn(17, 1, generator=g)}
        hard = hard_pair(dtype)
        for k, who in enumerate(("base", "chat")):
            tensors = load_file(fam[who] / "model.safetensors")
            for key, value in extra.items():
                tensors[key] = (value + 0.05 * k * torch.randn(value.shape, generator=g)).to(dtype)
            tensors[HARD] = hard[k]
            save_file(tensors, fam[who] / "model.safetensors", metadata={"format": "pt"})
        out[name] = fam
    imp = importance(*(load_file(out["bf16"][who] / "model.safetensors")[HARD] for who in ("base", "chat")))
    assert (imp < 0).any() and (imp.view(torch.int32) == -(1 << 31)).any() and (imp.view(torch.int32) == 0).any()
    return out


def merge(base: Path, model: Path, out: Path, backend: str, monkeypatch: pytest.MonkeyPatch,
          **options: object) -> Counter[str]:
    """arcee_fusion of ``model`` onto ``base`` with ``backend``; the fusion kernels called."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with spying(FUSION) as calls:
        monkeypatch.setenv(kernels.ENV, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            api.merge(base, [model], out, "arcee_fusion", {}, shard_size="60KB", **options)
    return calls


# ---- whole merges --------------------------------------------------------------------------------------------------
#: (chunk_rows, threads) of the fused runs: chunks that split tensors at odd rows, whole tensors, one and two workers
GRID = [(3, 1), (7, 2), (None, 1), (None, 2)]


@pytest.mark.parametrize("base_dtype,model_dtype", [("bf16", "bf16"), ("f32", "f32"), ("f16", "f16"),
                                                    ("bf16", "f32")])
def test_fused_merges_give_the_eager_bytes(base_dtype, model_dtype, families, tmp_path, monkeypatch):
    """Every file of the output, byte for byte, at every chunk size and number of workers (a bfloat16 base with a
    float32 model: one kernel widens each)."""
    base, model = families[base_dtype]["base"], families[model_dtype]["chat"]
    grid = GRID if base_dtype == model_dtype == "bf16" else [(3, 2), (None, 1)]
    ref = tmp_path / "eager"
    assert not merge(base, model, ref, "eager", monkeypatch), "eager: no kernel runs"
    for chunk_rows, threads in grid:
        out = tmp_path / f"fused-{chunk_rows}-{threads}"
        calls = merge(base, model, out, "numba", monkeypatch, chunk_rows=chunk_rows, threads=threads)
        assert set(calls) == set(FUSION), f"kernels called: {dict(calls)}"
        assert_same_output(out, ref)


def test_a_nan_input_is_refused_with_the_eager_message(families, tmp_path, monkeypatch):
    fam = families["bf16"]
    chat = with_nan(fam["chat"], tmp_path / "nan")
    messages = {}
    for backend in ("eager", "numba"):
        with pytest.raises(NonFiniteError) as info:
            merge(fam["base"], chat, tmp_path / backend / "out", backend, monkeypatch, threads=1)
        messages[backend] = str(info.value).replace(str(tmp_path / backend), "TMP")
    assert messages["numba"] == messages["eager"] and "model 1" in messages["eager"]


# ---- the method's passes, fused against eager ----------------------------------------------------------------------
def spans(shape: tuple[int, ...], step: int) -> list[tuple[int, int]]:
    """Row blocks of ``step`` rows (a vector or scalar whole)."""
    rows = shape[0] if len(shape) >= 2 else 1
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] if len(shape) >= 2 else [(0, 1)]


def rows_of(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return x[a:b] if x.dim() >= 2 else x


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32)


def run_passes(merger, base: torch.Tensor, model: torch.Tensor, step: int, fused: bool) -> None:
    for p in range(2):
        for a, b in spans(tuple(base.shape), step):
            block = rows_of(base, a, b), [rows_of(model, a, b)]
            if fused:
                assert merger.accumulate_raw(p, a, *block)
            else:
                merger.accumulate(p, a, block[0].float(), [block[1][0].float()])
        merger.end_pass(p)


@pytest.mark.parametrize("shape,rule", [((61, 33), Rule.MATRIX), ((300, 700), Rule.MATRIX), ((7, 5, 9), Rule.TENSOR),
                                        ((6, 3, 2, 2), Rule.CONV), ((53,), Rule.VECTOR), ((), Rule.VECTOR),
                                        ((17, 1), Rule.MATRIX)],
                         ids=["matrix", "wide", "experts", "conv", "vector", "scalar", "one-column"])
@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_the_fused_passes_give_the_eager_statistics_and_merge(shape, rule, dtype):
    """Statistics and merge in blocks of other sizes: the same KL bits, quartiles and threshold, the same output
    bits; and a merger restored from the other's journaled statistics merges the same."""
    torch_dtype = DTYPES[dtype]
    if shape == (61, 33):
        base, model = hard_pair(torch_dtype)
    else:
        g = torch.Generator().manual_seed(len(shape))
        base = torch.randn(shape, generator=g).to(torch_dtype)
        model = (base.float() + 0.05 * torch.randn(shape, generator=g)).to(torch_dtype)
    task = TensorTask("t", shape, rule, 64)
    params = METHOD.resolve_params({}, 1)
    eager, fused = METHOD.start(task, params, 1), METHOD.start(task, params, 1)
    run_passes(eager, base, model, 7, fused=False)
    run_passes(fused, base, model, 11, fused=True)
    want, got = eager.state_dict(), fused.state_dict()
    assert torch.equal(bits(want["kl"]), bits(got["kl"])) and torch.equal(want["quartiles"], got["quartiles"])
    assert bits(want["threshold"]) == bits(got["threshold"])
    resumed = METHOD.start(task, params, 1)
    resumed.load_state_dict({k: v.clone() for k, v in want.items()})
    for a, b in spans(shape, 5):
        block = rows_of(base, a, b), [rows_of(model, a, b)]
        expect = eager.emit(a, block[0].float(), [block[1][0].float()]).to(torch_dtype)
        for merger in (fused, resumed):
            out = torch.empty(block[0].shape, dtype=torch_dtype)
            assert merger.emit_raw(a, *block, out) == 0
            assert torch.equal(bits(out), bits(expect)), (a, b)


def test_inputs_no_kernel_takes_go_the_eager_way():
    """float64 rows and non-contiguous rows are declined without a change of state."""
    base, model = hard_pair(torch.float32, rows=12, width=6)
    task = TensorTask("t", (12, 6), Rule.MATRIX, 64)
    merger = METHOD.start(task, METHOD.resolve_params({}, 1), 1)
    wide = torch.zeros(12, 12)
    wide[:, ::2] = base
    for b, m in [(base.double(), model.double()), (wide[:, ::2], model)]:
        assert merger.accumulate_raw(0, 0, b, [m]) is False
        assert merger.kl is None and merger.select._hist is None
    run_passes(merger, base, model, 3, fused=False)
    assert merger.emit_raw(0, base.double(), [model.double()], torch.empty(12, 6)) is None


# ---- each kernel against the eager code, on one block ----------------------------------------------------------------
def odd_block(dtype: torch.dtype, rows: int = 40, width: int = 77,
              seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, model, kl) with the cases an importance's key must get right: KL rows positive, negative, +0, -0,
    tiny (subnormal products), infinite and NaN; deltas of both signs, zero and repeated (ties); and infinite and
    NaN deltas in rows with a finite KL (a NaN times a NaN is left out: which payload survives is the CPU's)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(rows, width, generator=g) * 0.02).to(dtype)
    levels = torch.tensor([-2.0, -1.0, 0.0, 0.0, 1.0, 3.0]) * 2 ** -9
    model = (base.float() + levels[torch.randint(0, 6, (rows, width), generator=g)]).to(dtype)
    model[::5, ::3] = (base[::5, ::3].float() + 0.01 * torch.randn(model[::5, ::3].shape, generator=g)).to(dtype)
    model[2, 4], model[2, 5], model[3, 6] = float("inf"), float("-inf"), float("nan")
    kl = torch.randn(rows, generator=g).abs() * 1e-4
    kl[1::6] = -kl[1::6]
    kl[7], kl[8], kl[9], kl[10], kl[11], kl[12] = 0.0, -0.0, float("inf"), float("nan"), 1e-40, float("-inf")
    return base, model, kl


def eager_importance(base: torch.Tensor, model: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """``_FusionMerge._importance`` with ``kl`` as the cached KL rows."""
    return as_softmax_rows(model.float() - base.float()).abs().mul_(kl.unsqueeze(-1))


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_fusion_high_is_pass_a_on_the_importance(dtype):
    base, model, kl = odd_block(DTYPES[dtype])
    imp = eager_importance(base, model, kl)
    assert imp.isnan().any() and (imp < 0).any() and (imp.view(torch.int32) == -(1 << 31)).any()
    stats = OrderStatistics([0], imp.numel())
    stats.pass_a(imp)
    hist = np.zeros(1 << 16, dtype=np.int64)
    hist[5] = 3  # accumulated into
    kernels.kernels().fusion_high(kernels.array(base), kernels.array(model), kl.numpy(), base.shape[-1], hist)
    hist[5] -= 3
    assert np.array_equal(hist, stats._hist.numpy())


@pytest.mark.parametrize("ks", ["quartiles", "two-bins", "one-bin"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_fusion_low_is_pass_b_on_the_importance(dtype, ks):
    """Three, two and one distinct target bins (quartiles of the block; a rank in the -0 bin and one in the +0 bin;
    one rank thrice); the elements of other bins are not counted."""
    base, model, kl = odd_block(DTYPES[dtype])
    imp = eager_importance(base, model, kl)
    n = imp.numel()
    keys = order_keys(imp)
    ranks = {"quartiles": quartile_ranks(n), "two-bins": [int((keys < -1).sum()), int((keys < 0).sum())] * 2,
             "one-bin": [n // 3] * 3}[ks]
    eager = OrderStatistics(ranks, n)
    eager.pass_a(imp)
    eager.end_a()
    targets = list(dict.fromkeys(eager._bins))
    assert len(targets) == {"quartiles": 3, "two-bins": 2, "one-bin": 1}[ks]
    eager.pass_b(imp)
    hists = [np.zeros(1 << 16, dtype=np.int64) for _ in targets]
    bins = np.array(targets + [-1] * (3 - len(targets)), dtype=np.int64)
    kernels.kernels().fusion_low(kernels.array(base), kernels.array(model), kl.numpy(), base.shape[-1], bins,
                                 hists[0], hists[min(1, len(hists) - 1)], hists[-1])
    for t, h in zip(targets, hists):
        assert np.array_equal(h, eager._low[t].numpy()), t


@pytest.mark.parametrize("dtype,out_dtype", [("bf16", "bf16"), ("f16", "f16"), ("f32", "f32"), ("f32", "bf16"),
                                             ("bf16", "f32")])
def test_fusion_emit_is_emit_and_the_cast(dtype, out_dtype):
    """``B + (M − B)·[importance ≥ threshold]`` and the cast: importances equal to the threshold kept, NaN ones
    dropped, signed zeros as ``mul_`` then ``add_`` leave them (a dropped change onto a -0 base), and the non-finite
    outputs counted (an infinity, a NaN, and with float32 inputs a bfloat16 overflow)."""
    base, model, kl = odd_block(DTYPES[dtype])
    base[:, 10:14] = -0.0
    base[:, 14:16] = 0.0
    model[:, 12:16] = -0.0
    if dtype == "f32":
        base[20, 20], model[20, 20] = 3.39e38, 3.4e38  # finite, a bfloat16 infinity
    imp = eager_importance(base, model, kl)
    task = TensorTask("t", tuple(base.shape), Rule.MATRIX, 64)
    merger = METHOD.start(task, METHOD.resolve_params({}, 1), 1)
    merger.kl = kl.clone()
    values, counts = imp[(imp > 0) & imp.isfinite()].unique(return_counts=True)
    merger.threshold = float(values[counts > 1][len(values[counts > 1]) // 2])  # a value several importances hit
    assert 0 < int((imp >= merger.threshold).sum()) < imp.numel() // 2
    want = merger.emit(0, base.float(), [model.float()]).to(DTYPES[out_dtype])
    assert (bits(want) == bits(torch.tensor(-0.0, dtype=want.dtype))).any()
    out = torch.empty(base.shape, dtype=DTYPES[out_dtype])
    bad = merger.emit_raw(0, base, [model], out)
    finite = torch.isfinite(want)
    assert bad == int((~finite).sum()) and bad >= 3
    assert torch.equal(bits(out)[finite], bits(want)[finite])
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~finite & ~out.isnan()],
                                                                  want[~finite & ~want.isnan()])


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
def test_the_plan_decides_which_tensors_the_kernels_compute(tmp_path, monkeypatch):
    """One decision per tensor, in the plan (``TensorPlan.fused``, from ``TensorMerge.kernel_path`` and the sources):
    the kernels compute a tensor when the plan runs them and its merge has a kernel path, and the runner takes the
    plan's word. SCE with a selection has none, nor WIDEN's 1-D rule; the planner counts those blocks as the eager
    path's (``planner.EAGER_HEAP_SLACK``)."""
    family = write_family(tmp_path / "fam", "tiny")
    models = [family["chat"], family["multilingual"]]
    monkeypatch.setenv(kernels.ENV, "numba")

    def plan(method, params):  # type: ignore[no-untyped-def]
        return api.plan(family["base"], models, tmp_path / "out", method, params, threads=1)

    selected, plain, widen = plan("sce", {"select_topk": 0.5}), plan("sce", {"select_topk": 1.0}), plan("widen", {})
    assert selected.fused_kernels and plain.fused_kernels
    assert not any(t.fused for t in selected.tensors)
    assert all(t.fused for t in plain.tensors if t.rule.merged)
    assert [t.fused for t in widen.tensors if t.rule.merged] == [t.rule is not Rule.VECTOR for t in widen.tensors
                                                                  if t.rule.merged]
    assert {t["fused_kernels"] for t in widen.to_dict()["tensors"]} == {True, False}
    for params, used in (({"select_topk": 0.5}, False), ({"select_topk": 1.0}, True)):
        with spying(["square_sums", "sce_emit"]) as calls:
            api.merge(family["base"], models, tmp_path / f"sce-{used}", "sce", params, threads=1)
        assert bool(calls["square_sums"]) == bool(calls["sce_emit"]) == used, calls
