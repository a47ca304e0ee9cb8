"""The fused element-wise kernels (streammerge.kernels): a merge gives the same bytes with them as with eager torch,
for every method that has them, in bfloat16, float32 and float16, at any chunk size and number of workers; a
non-finite value is refused with the eager path's message; the conversions round as torch does; and without numba
(or with ``STREAMMERGE_KERNELS=eager``) the eager path runs."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import assert_same_output, spying, with_nan

from streammerge import api, kernels
from streammerge.cli import main
from streammerge.errors import NonFiniteError
from streammerge.examples import write_family
from streammerge.methods import Rule, TensorTask, get_method
from streammerge.methods._tiles import row_sums
from streammerge.units import format_size

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed (pip install 'streammerge[fast]'): "
                                 "no fused kernels to compare with the eager path")

#: the kernels each method's merge must call (statistics and merge pass)
KERNELS = {
    "task_arithmetic": {"delta_sum"},
    "ties": {"histogram_high", "histogram_low", "sparse_merge", "tie_counts"},
    "breadcrumbs": {"histogram_high", "histogram_low", "sparse_merge", "tie_counts"},
    "breadcrumbs_ties": {"histogram_high", "histogram_low", "sparse_merge", "tie_counts"},
    "dare_linear": {"sparse_merge"},
    "dare_ties": {"sparse_merge"},
    "della": {"sparse_merge", "magprune_factors", "magprune_bits"},
    "della_linear": {"sparse_merge", "magprune_factors", "magprune_bits"},
    "linear": {"weighted_sum"},
    "model_stock": {"pair_sums", "mean_interpolate"},
    "ram": {"ram_emit"},
    "sce": {"square_sums", "sce_emit"},
    "slerp": {"pair_sums", "weighted_sum"},
    "nearswap": {"nearswap_emit"},
    "ramplus_tl": {"ram_counts", "ram_emit"},
    "karcher": {"pair_sums", "weighted_sum"},
    "multislerp": {"pair_sums", "delta_sum"},
    "nuslerp": {"pair_sums", "delta_sum"},
    "widen": {"widen_column_sums", "widen_row_sums", "widen_emit"},
}
NAMES = sorted({name for names in KERNELS.values() for name in names} | {"l1_sums", "tie_counts", "magprune_bits"})
#: kernels a merge may skip: pass B runs only for the thresholds pass A's candidates did not settle; a selection's
#: ties are counted ahead, and DELLA's decisions made ahead, only when workers are idle to share a chunk's blocks
OPTIONAL = {"histogram_low", "tie_counts", "magprune_bits"}


def expected_kernels(method: str, params: dict) -> set[str]:
    """KERNELS[method], and ``l1_sums`` when the L1 rescale's statistics pass runs (rescale with mode l1 and a
    density below 1)."""
    m = get_method(method)
    defaults = {p.name: p.default for p in m.params}
    densities = [float(x) for x in str(params.get("density", defaults.get("density", 1.0))).split(",")]
    l1 = (params.get("rescale", defaults.get("rescale", False)) and params.get("rescale_mode", "l1") == "l1"
          and any(d < 1 for d in densities))
    if method == "sce" and float(params.get("select_topk", 1.0)) < 1:
        return set()
    combine = set()
    if str(params.get("use_base", True)).lower() == "false":  # a Gram merge of the weights themselves
        combine = {"weighted_sum"}
    names = KERNELS[method] - {"delta_sum"} | combine if combine else KERNELS[method]
    return names | ({"l1_sums"} if l1 else set())

#: (method, params): the fused methods, each kind of selection, rescale, normalisation and consensus
CASES = [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"weight": "0.3,0.9", "lambda": 0.7, "normalize": True}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.4, "rescale": True}),  # the L1 pass over a selection (its ties too)
    ("ties", {"density": 0.3, "weight": "1,-0.5", "rescale": True, "rescale_mode": "inverse_density"}),
    ("ties", {"density": 0.5, "weight": "0,1"}),  # a zero weight: the divisor 1 where no model counts
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}),
    ("dare_linear", {"density": 0.5, "rescale_mode": "inverse_density"}),
    ("dare_linear", {"density": "0.3,0", "weight": "0.5,1"}),  # a model that drops everything, with the L1 pass
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": "0.7,1", "rescale": False}),  # one model kept whole
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della", {"density": "0.3,0.8", "epsilon": 0.15, "rescale_mode": "inverse_density"}),  # 1/p per element
    ("della_linear", {"density": "0.5,1", "epsilon": 0.05}),  # one model kept whole
    ("linear", {"weight": "0.3,0.9"}),
    ("model_stock", {}),
    ("slerp", {"t": 0.3}),
    ("nearswap", {"t": 0.001}),  # a threshold inside the deltas' range: both branches of w
    ("sce", {}),
    ("sce", {"select_topk": 0.5}),  # the selection stays eager
    ("ram", {}),
    ("ram", {"epsilon": 0.004}),  # a threshold inside the deltas' range: unique, shared and uncounted elements
    ("ramplus_tl", {"epsilon": 0.004, "r": 0.5, "alpha": 3.0}),
    ("karcher", {}),
    ("multislerp", {"weight": "0.3,0.9"}),
    ("multislerp", {"use_base": False}),
    ("nuslerp", {"weight": "0.3,0.7"}),
    ("widen", {}),
]
#: (chunk_rows, threads) of the fused runs: odd chunks (tiles, selections' ties and blocks split across chunks),
#: whole tensors, one and two workers
GRID = [(3, 1), (3, 2), (7, 1), (7, 2), (None, 1), (None, 2)]
MAIN = ("task_arithmetic", "ties", "widen")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The tiny family stored as bfloat16, float32 and float16."""
    root = tmp_path_factory.mktemp("kernels")
    return {dtype: write_family(root / dtype, "tiny", dtype=dtype) for dtype in ("bf16", "f32", "f16")}


def merge(fam: dict[str, Path], out: Path, method: str, params: dict, backend: str, monkeypatch: pytest.MonkeyPatch,
          **options: object) -> Counter[str]:
    """Merge the family with ``backend``; the kernels called."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with spying(NAMES) as calls:
        monkeypatch.setenv(kernels.ENV, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = [fam["chat"]] if get_method(method).max_models == 1 else [fam["chat"], fam["multilingual"]]
            api.merge(fam["base"], models, out, method, params, shard_size="60KB", **options)
    return calls


def case_id(case: tuple[str, dict]) -> str:
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


@needs_numba
@pytest.mark.parametrize("case,dtype", [(c, d) for c in CASES for d in ("bf16", "f32", "f16")
                                        if d != "f16" or c[0] in MAIN],
                         ids=lambda x: case_id(x) if isinstance(x, tuple) else x)
def test_fused_merges_give_the_eager_bytes(case, dtype, families, tmp_path, monkeypatch):
    """Every file of the output, byte for byte, at every chunk size and number of workers (float16 inputs: the
    main methods)."""
    method, params = case
    grid = GRID if method in MAIN and dtype == "bf16" else [(3, 1), (7, 2), (None, 2)] if method in MAIN else [(3, 2)]
    fam = families[dtype]
    ref = tmp_path / "eager"
    assert not merge(fam, ref, method, params, "eager", monkeypatch), "eager: no kernel runs"
    for chunk_rows, threads in grid:
        out = tmp_path / f"fused-{chunk_rows}-{threads}"
        calls = merge(fam, out, method, params, "numba", monkeypatch, chunk_rows=chunk_rows, threads=threads)
        expected = expected_kernels(method, params)
        assert expected - OPTIONAL <= set(calls) <= expected, f"kernels called: {dict(calls)}"
        assert_same_output(out, ref)


@needs_numba
def test_the_cli_merges_with_the_kernels_to_the_eager_bytes(families, tmp_path, monkeypatch):
    fam = families["bf16"]
    outs = {}
    for backend in ("eager", "numba"):
        monkeypatch.setenv(kernels.ENV, backend)
        outs[backend] = tmp_path / backend
        r = CliRunner().invoke(main, ["merge", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model",
                                      str(fam["multilingual"]), "--method", "ties", "--param", "density=0.3",
                                      "--dtype", "float16", "--out", str(outs[backend]), "-q"])
        assert r.exit_code == 0, r.output
    assert_same_output(outs["numba"], outs["eager"])


# ---- non-finite values ----------------------------------------------------------------------------------------
@needs_numba
@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5}), ("widen", {})])
def test_a_nan_input_is_refused_with_the_eager_message(method, params, families, tmp_path, monkeypatch):
    fam = dict(families["bf16"])
    fam["multilingual"] = with_nan(fam["multilingual"], tmp_path / "nan")
    messages = {}
    for backend in ("eager", "numba"):
        with pytest.raises(NonFiniteError) as info:
            merge(fam, tmp_path / backend / "out", method, params, backend, monkeypatch, threads=1)
        messages[backend] = str(info.value).replace(str(tmp_path / backend), "TMP")
    assert messages["numba"] == messages["eager"] and "model 2" in messages["eager"]


@needs_numba
def test_an_overflow_of_the_output_dtype_is_refused_with_the_eager_message(families, tmp_path, monkeypatch):
    """Finite in float32, too large for float16: the kernel counts the cast's infinity, the eager path names it."""
    errors = {}
    for backend in ("eager", "numba"):
        with pytest.raises(NonFiniteError) as info:
            merge(families["bf16"], tmp_path / backend / "out", "task_arithmetic", {"weight": 1e7}, backend,
                  monkeypatch, dtype="float16", threads=1)
        errors[backend] = (str(info.value).replace(str(tmp_path / backend), "TMP"), info.value.overflow)
    assert errors["numba"] == errors["eager"] and errors["eager"][1], errors


# ---- the kernels against the eager code, element by element -------------------------------------------------------
def to_bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32).numpy().copy()


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_output_casts_round_as_torch_does(dtype):
    """float32 -> bfloat16/float16 round to nearest even with subnormals and overflow to infinity, as
    ``Tensor.copy_``: a sample of every 997th float32 bit pattern and the boundaries (bench: all 2^32 patterns
    agree), and the count of non-finite results."""
    k = kernels.kernels()
    edges = [0, 1, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FFFFF, 0x38800000,
             0x387FFFFF, 0x33000000, 0x33000001, 0x32FFFFFF, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7F8000]
    bits = np.concatenate([np.arange(0, 1 << 32, 997, dtype=np.uint64).astype(np.uint32),
                           np.array(edges, dtype=np.uint32)])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    x = bits.view(np.float32)
    want = torch.from_numpy(x).to(dtype)
    got = np.empty(len(x), dtype=np.uint16 if dtype == torch.bfloat16 else np.int16)
    bad = k.convert(x, got)
    want_bits = to_bits(want).view(got.dtype)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want_bits[~nan])
    assert torch.isnan(torch.from_numpy(got.view(np.int16)).view(dtype)[torch.from_numpy(nan)]).all()
    assert bad == int((~torch.isfinite(want)).sum())


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_inputs_widen_exactly(dtype):
    """Every 16-bit pattern -> float32, as torch's ``.float()`` (NaNs stay NaN)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = torch.from_numpy(bits.view(np.int16).copy()).view(dtype)
    got = np.empty(1 << 16, dtype=np.float32)
    kernels.kernels().convert(kernels.array(x), got)
    want = x.float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32)) and np.isnan(got[nan]).all()


@needs_numba
def test_no_multiply_add_is_contracted():
    """``acc + (m − b)·w`` rounded twice, as the eager code: on elements where a fused multiply-add would round
    once to another value, the task-arithmetic kernel gives the eager bits."""
    g = np.random.default_rng(3)
    b = (g.standard_normal(1 << 16) * 0.02).astype(np.float32)
    m0 = b + (g.standard_normal(1 << 16) * 0.003).astype(np.float32)
    m1 = b + (g.standard_normal(1 << 16) * 0.003).astype(np.float32)
    w = np.float32(0.3), np.float32(0.7)
    d0 = (m0 - b) * w[0]
    fma = ((m1 - b).astype(np.float64) * np.float64(w[1]) + d0.astype(np.float64)).astype(np.float32)
    split = d0 + (m1 - b) * w[1]
    differ = fma != split
    assert differ.sum() > 100, "the witnesses: elements where an FMA changes the sum"
    base, models = torch.from_numpy(b), [torch.from_numpy(m0), torch.from_numpy(m1)]
    method = get_method("task_arithmetic")
    params = method.resolve_params({"weight": "0.3,0.7"}, 2)
    merger = method.start(TensorTask("x", (1 << 16,), Rule.VECTOR, 64), params, 2)
    out = torch.empty(1 << 16)
    assert merger.emit_raw(0, base, models, out) == 0
    eager = merger.emit(0, base.clone(), models)
    assert torch.equal(out.view(torch.int32), eager.view(torch.int32))
    assert np.array_equal(out.numpy()[differ], (split + b)[differ])


def run_passes(merger, base: torch.Tensor, models: list[torch.Tensor], passes: int, step: int, fused: bool) -> None:
    for p in range(passes):
        for a in range(0, base.shape[0], step):
            rows = base[a : a + step], [m[a : a + step] for m in models]
            if fused:
                assert merger.accumulate_raw(p, a, *rows)
            else:
                merger.accumulate(p, a, rows[0].float(), [m.float() for m in rows[1]])
        merger.end_pass(p)


@needs_numba
@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.37}), ("breadcrumbs", {"density": 0.3, "gamma": 0.2}),
    ("breadcrumbs_ties", {"density": 0.45, "gamma": 0.1, "rescale": True, "rescale_mode": "inverse_density"}),
])
def test_selections_keep_the_same_ties_block_by_block(method, params):
    """Deltas of a few distinct sizes, so thousands of elements equal each threshold: the kernels keep the first
    ties in flat order across blocks, as ``TopK.factor`` does, and leave the same cursor after every block."""
    base, models, eager, fused = _tied_selection(method, params)
    rows = base.shape[0]
    for a in range(0, rows, 4):
        want = eager.emit(a, base[a : a + 4].float(), [x[a : a + 4] for x in models]).to(torch.bfloat16)
        got = torch.empty(want.shape, dtype=torch.bfloat16)
        assert fused.emit_raw(a, base[a : a + 4], [x[a : a + 4] for x in models], got) == 0
        assert torch.equal(to_bits_t(got), to_bits_t(want)), f"rows {a}..{a + 4}"
        assert fused.cursor() == eager.cursor()


def _tied_selection(method: str, params: dict) -> tuple[torch.Tensor, list[torch.Tensor], Any, Any]:
    """60 x 50 bfloat16 deltas of six sizes (thousands of ties at each threshold), and the eager and fused merges
    of ``method`` after their statistics passes (the same thresholds)."""
    g = torch.Generator().manual_seed(5)
    rows, cols = 60, 50
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    levels = torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0]) * 2 ** -9
    models = [(base.float() + levels[torch.randint(0, 6, (rows, cols), generator=g)]).to(torch.bfloat16)
              for _ in range(2)]
    m = get_method(method)
    p = m.resolve_params(params, 2)
    task = TensorTask("x", (rows, cols), Rule.MATRIX, 64, exact_products=True)
    passes = m.stat_passes(Rule.MATRIX, p)
    eager, fused = m.start(task, p, 2), m.start(task, p, 2)
    run_passes(eager, base, models, passes, 7, fused=False)
    run_passes(fused, base, models, passes, 11, fused=True)
    assert eager.state_dict()["select"].tolist() == fused.state_dict()["select"].tolist()
    ties = [s.ties for sp in fused.sparsifiers for s in sp._topks()]
    assert max(ties) >= 10, f"ties kept at the thresholds: {ties}"
    return base, models, eager, fused


@needs_numba
@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.37}), ("breadcrumbs", {"density": 0.3, "gamma": 0.2}),
    ("breadcrumbs_ties", {"density": 0.45, "gamma": 0.1, "rescale": True, "rescale_mode": "inverse_density"}),
])
def test_blocks_counted_ahead_keep_the_same_ties_in_any_order(method, params):
    """A chunk's blocks counted ahead (``ahead_raw``: the ties each meets), started (``start_blocks``) and merged
    last to first, some fused and some eagerly (a block the kernel refuses): the bytes of blocks merged in row
    order, and the cursors they leave after every chunk."""
    base, models, eager, fused = _tied_selection(method, params)
    rows, step = base.shape[0], 4
    for c0 in range(0, rows, 20):  # chunks of 5 blocks
        blocks = [(a, min(a + step, rows)) for a in range(c0, min(c0 + 20, rows), step)]
        assert fused.blocks_ahead(None) == any(sp.open_ties for sp in fused.sparsifiers)
        if fused.blocks_ahead(None):
            fused.start_blocks(None, [a for a, _ in blocks],
                               [fused.ahead_raw(None, a, base[a:b], [x[a:b] for x in models]) for a, b in blocks])
        assert fused.independent_blocks(None)
        got = {}
        for i, (a, b) in enumerate(reversed(blocks)):
            if i % 2:
                got[a] = fused.emit(a, base[a:b].float(), [x[a:b] for x in models]).to(torch.bfloat16)
            else:
                got[a] = torch.empty((b - a, base.shape[1]), dtype=torch.bfloat16)
                assert fused.emit_raw(a, base[a:b], [x[a:b] for x in models], got[a]) == 0
        fused.end_blocks(None)
        for a, b in blocks:
            want = eager.emit(a, base[a:b].float(), [x[a:b] for x in models]).to(torch.bfloat16)
            assert torch.equal(to_bits_t(got[a]), to_bits_t(want)), f"rows {a}..{b}"
        assert fused.cursor() == eager.cursor()
    assert not fused.blocks_ahead(None)


def _bf16_bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


@needs_numba
@pytest.mark.parametrize("n", [1, 7, 1024, 1031, 5000])
def test_pass_a_keeps_the_candidates_of_its_windows(n):
    """``histogram_high`` appends, in index order, exactly the |Δ| bits whose high half lies in each window and whose
    low half is not zero (any length, a short last step included), counts every element, and reports a buffer
    that would overflow with -1."""
    from streammerge.kernels import _numba as nb
    from streammerge.methods._select import CANDIDATE_SLACK

    assert CANDIDATE_SLACK == nb.STEP  # the room TopK leaves for a step's writes past the fill
    g = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    model = (base.float() * (1 + torch.randn(n, generator=g) * 0.3)).to(torch.bfloat16)
    b, m = _bf16_bits(base), _bf16_bits(model)
    keys = (model.float() - base.float()).abs().view(torch.int32).numpy().view(np.uint32)
    windows = [(int(np.median(keys >> 16)) - 64, 128), (0, 1 << 16)]
    want = [keys[((keys >> 16) - np.uint32(lo) < np.uint32(length)) & ((keys & 0xFFFF) != 0)]
            for lo, length in windows]
    assert n < 1024 or 0 < len(want[0]) < len(want[1])
    h = np.zeros(1 << 16, dtype=np.int64)
    bufs = [np.empty(len(w) + nb.STEP, dtype=np.uint32) for w in want]
    filled = np.zeros(2, dtype=np.int64)
    nb.histogram_high(b, m, h, True, *windows[0], bufs[0], *windows[1], bufs[1], filled)
    assert np.array_equal(h, np.bincount(keys >> 16, minlength=1 << 16))
    for t in range(2):
        assert np.array_equal(bufs[t][: filled[t]], want[t])
    small = np.empty(len(want[1]) // 2 + nb.STEP, dtype=np.uint32)
    filled[:] = 0
    nb.histogram_high(b, m, h, False, *windows[0], bufs[0], *windows[1], small, filled)
    assert filled[0] == len(want[0])
    assert filled[1] == (-1 if n > nb.STEP else len(want[1]))  # a step's room is checked before it starts
    assert np.array_equal(h, np.bincount(keys >> 16, minlength=1 << 16))  # not counted again


def _selection_run(method: str, params: dict, base: torch.Tensor, models: list[torch.Tensor], step: int,
                   eager_rows: range = range(0)) -> tuple[list[int], list[bool], Counter[str]]:
    """The selections' (tau, ties) after the fused statistics passes in blocks of ``step`` rows (the blocks from
    ``eager_rows`` counted eagerly), which TopKs pass A settled, and the kernels called."""
    m = get_method(method)
    p = m.resolve_params(params, len(models))
    task = TensorTask("x", tuple(base.shape), Rule.MATRIX, 64, exact_products=True)
    merger = m.start(task, p, len(models))
    with spying(["histogram_high", "histogram_low"]) as calls:
        for pi in range(m.stat_passes(Rule.MATRIX, p)):
            for a in range(0, base.shape[0], step):
                rows = base[a : a + step], [x[a : a + step] for x in models]
                if a in eager_rows:
                    merger.accumulate(pi, a, rows[0].float(), [x.float() for x in rows[1]])
                else:
                    assert merger.accumulate_raw(pi, a, *rows)
            merger.end_pass(pi)
    early = [s.early for sp in merger.sparsifiers for s in sp._topks() if not s.trivial]
    return merger.state_dict()["select"].tolist(), early, calls


def _eager_selection(method: str, params: dict, base: torch.Tensor, models: list[torch.Tensor]) -> list[int]:
    m = get_method(method)
    p = m.resolve_params(params, len(models))
    merger = m.start(TensorTask("x", tuple(base.shape), Rule.MATRIX, 64, exact_products=True), p, len(models))
    run_passes(merger, base, models, m.stat_passes(Rule.MATRIX, p), base.shape[0], fused=False)
    return merger.state_dict()["select"].tolist()


@needs_numba
@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("ties", {"density": 0.03}),
                                           ("breadcrumbs_ties", {"density": 0.9, "gamma": 0.01})])
@pytest.mark.parametrize("noise", ["relative", "additive"])
def test_pass_a_candidates_settle_the_thresholds_without_pass_b(method, params, noise):
    """bfloat16 fine-tune deltas (most differences of two weights of one binade, whose low 16 bits are zero): pass
    A's candidates give every TopK its tau and ties, as two passes do, and pass B reads nothing. With additive
    noise more deltas cross a binade (more candidates; a threshold with a non-zero low half: the next test)."""
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(300, 96, generator=g) * 0.02).to(torch.bfloat16)
    if noise == "relative":
        models = [(base.float() * (1 + torch.randn(300, 96, generator=g) * 0.01)).to(torch.bfloat16)
                  for _ in range(2)]
    else:
        models = [(base.float() + torch.randn(300, 96, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(2)]
    state, early, calls = _selection_run(method, params, base, models, 40)
    assert state == _eager_selection(method, params, base, models)
    assert early and all(early), early
    assert "histogram_low" not in calls


@needs_numba
@pytest.mark.parametrize("edge", ["last bin of the window", "first bin past it", "first bin of the window",
                                  "last bin before it"])
def test_the_window_settles_its_own_bins_and_no_others(edge):
    """A window that ends (or starts) at the target bin settles the threshold; one that ends just before it (or
    starts just after) leaves it to pass B; the same tau and ties either way."""
    from streammerge.kernels import _numba as nb
    from streammerge.methods._select import TopK

    g = torch.Generator().manual_seed(2)
    base = (torch.randn(20000, generator=g) * 0.02).to(torch.bfloat16)
    model = (base.float() + torch.randn(20000, generator=g) * 1e-3).to(torch.bfloat16)
    absd = (model.float() - base.float()).abs()
    desc = np.sort(absd.view(torch.int32).numpy())[::-1]
    # a k-th |Δ| whose low half is not zero, with other such values in its bin above and below it
    inexact = desc[(desc & 0xFFFF) != 0]
    k = next(i + 1 for i in range(8000, len(desc)) if desc[i] & 0xFFFF
             and ((inexact >> 16 == desc[i] >> 16) & (inexact > desc[i])).any()
             and ((inexact >> 16 == desc[i] >> 16) & (inexact < desc[i])).any())
    ref = TopK(k, absd.numel())
    ref.pass_a(absd)
    ref.end_a()
    ref.pass_b(absd)
    ref.end_b()
    target = ref.tau_bits >> 16
    lo = {"last bin of the window": target - 4, "first bin past it": target - 5, "first bin of the window": target,
          "last bin before it": target + 1}[edge]
    b, m = _bf16_bits(base), _bf16_bits(model)
    t = TopK(k, absd.numel())
    h = t.high_counts().numpy()
    nb.histogram_high(b, m, h, True, 0, 0, np.empty(0, np.uint32), 0, 0, np.empty(0, np.uint32), np.full(2, -1))
    t.choose_window(h)
    t.window = (lo, 5)
    filled = np.array([0, -1], dtype=np.int64)
    found = np.empty(TopK.scratch_size(absd.numel()), dtype=np.uint32)
    nb.histogram_high(b, m, h, False, *t.collect_args(), found, 0, 0, np.empty(0, np.uint32), filled)
    t.collected(found[: filled[0]], absd.numel())
    t.end_a()
    assert t.early == edge.endswith("window")
    if not t.early:
        bin_, lows = t.low_counts()
        nb.histogram_low(b, m, bin_, lows.numpy(), 0, lows.numpy(), False)
        t.end_b()
    assert (t.tau_bits, t.ties) == (ref.tau_bits, ref.ties)
    assert ref.tau_bits & 0xFFFF, "a threshold whose low half is not zero"


@needs_numba
@pytest.mark.parametrize("case", ["window missed", "float32 deltas", "a block counted eagerly"])
def test_pass_b_runs_when_the_candidates_cannot_settle_a_threshold(case):
    """The same thresholds when pass A's guess fails: the first block's deltas far smaller than the rest's (its
    window misses the k-th), float32 deltas (nearly every low half set: the candidates would outgrow their buffer),
    a block counted by the eager path (no candidates from it)."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if case == "float32 deltas" else torch.bfloat16
    base = (torch.randn(300, 96, generator=g) * 0.02).to(dtype)
    scale = torch.full((300, 1), 0.01)
    if case == "window missed":
        scale[:40] = 1e-4
    models = [(base.float() * (1 + torch.randn(300, 96, generator=g) * scale)).to(dtype) for _ in range(2)]
    eager_rows = range(80, 81) if case == "a block counted eagerly" else range(0)
    state, early, calls = _selection_run("ties", {"density": 0.5}, base, models, 40, eager_rows)
    assert state == _eager_selection("ties", {"density": 0.5}, base, models)
    assert not any(early), early
    assert calls["histogram_low"] > 0


@needs_numba
def test_a_settled_pass_b_leaves_its_reads_unread(families, tmp_path, monkeypatch):
    """A TIES merge of tensors read chunk by chunk (a read per chunk and pass): where pass A's candidates settled
    every threshold, pass B's reads are left unread, so those tensors are read twice (pass A, merge) rather than
    three times; the output is the eager one's."""
    from streammerge import pipeline

    real = pipeline.Prefetcher._read

    depth = []

    def counted(reads: Counter[str]):  # type: ignore[no-untyped-def]
        def spy(self, read, slot):  # type: ignore[no-untyped-def]
            reads[read.tensor] += 1
            depth.append(len(self._slots))
            return real(self, read, slot)
        return spy

    runs = {}
    for backend in ("eager", "numba"):
        runs[backend] = Counter()
        monkeypatch.setattr(pipeline.Prefetcher, "_read", counted(runs[backend]))
        merge(families["bf16"], tmp_path / backend, "ties", {"density": 0.5}, backend, monkeypatch, chunk_rows=3,
              threads=1)
    assert_same_output(tmp_path / "numba", tmp_path / "eager")
    fewer = [t for t, n in runs["eager"].items() if runs["numba"][t] != n]
    assert fewer, "no pass B was settled by pass A"
    for t in fewer:  # pass B's reads, but for the few the reader had made before pass A ended (its slots)
        chunks = runs["eager"][t] // 3
        assert 2 * chunks <= runs["numba"][t] <= 2 * chunks + max(depth), (t, runs["eager"][t], runs["numba"][t])


@needs_numba
def test_the_plan_counts_the_reads_a_settled_pass_b_leaves_unread(families, monkeypatch):
    """The plan's reads: at most every pass of a tensor read chunk by chunk; about one pass less for each 16-bit
    tensor whose selection's pass B pass A usually settles (fused kernels on the CPU). Without the kernels, with
    float32 inputs, or for a method without a top-k selection, nothing is taken off."""
    def planned(fam: dict[str, Path], method: str, backend: str):  # type: ignore[no-untyped-def]
        monkeypatch.setenv(kernels.ENV, backend)
        return api.plan(fam["base"], [fam["chat"], fam["multilingual"]], None, method, {"density": 0.5},
                        chunk_rows=3, device="cpu")

    ties = planned(families["bf16"], "ties", "numba")
    chunked = [t for t in ties.tensors if t.stat_passes and not t.resident and all(s.narrow_float for s in t.sources)]
    assert chunked and ties.fused_kernels
    assert ties.bytes_read - ties.bytes_read_settled == sum(t.rows * t.read_bytes_per_row for t in chunked)
    for fam, method, backend in (("f32", "ties", "numba"), ("bf16", "ties", "eager"), ("bf16", "della", "numba")):
        p = planned(families[fam], method, backend)
        assert p.bytes_read_settled == p.bytes_read, (fam, method, backend)
    monkeypatch.setenv(kernels.ENV, "numba")
    fam = families["bf16"]
    text = CliRunner().invoke(main, ["plan", "--base", str(fam["base"]), "--model", str(fam["chat"]), "--model",
                                     str(fam["multilingual"]), "--method", "ties", "--param", "density=0.5",
                                     "--chunk-rows", "3", "--device", "cpu"]).output
    assert f"at most; about {format_size(ties.bytes_read_settled)} where each selection's first pass" in text


def _della_deltas(kind: str, shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, model) whose |Δ| rows exercise one way of ``magprune_factors``' row ranking."""
    n = shape[-1]
    if kind == "levels":  # bfloat16, deltas of five levels: many equal keys; a NaN and an infinity (ranked last)
        base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        levels = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]) * 2 ** -9
        model = (base.float() + levels[torch.randint(0, 5, shape, generator=g)]).to(torch.bfloat16)
        if model.numel() > 4:
            model.view(-1)[1], model.view(-1)[3] = float("nan"), float("inf")
        return base, model
    if kind == "close":  # bfloat16, levels 2^-7 apart beside ones far apart: buckets of several repeated keys
        base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        levels = torch.tensor([0.0, 1.0, 1.0 + 2 ** -7, 2.0, 2.0 + 2 ** -6, 5.0, 40.0]) * 2 ** -10
        picked = levels[torch.randint(0, len(levels), shape, generator=g)]
        return base, (base.float() + picked * torch.sign(torch.randn(shape, generator=g))).to(torch.bfloat16)
    base = torch.randn(shape, generator=g) * 0.02
    if kind == "float32":  # distinct keys: buckets of several keys, decided by their rank bounds
        return base, base + torch.randn(shape, generator=g) * 1e-3
    if kind == "equal":  # one nonzero |Δ| in every row, zeros between: equal keys rank by index
        return base, base + torch.where(torch.rand(shape, generator=g) < 0.3, 0.0, 2.0 ** -10)
    assert kind == "cluster"  # a dense cluster in one bucket, stretched by two outliers: ranked whole
    delta = 1e-3 * (1 + torch.rand(shape, generator=g) * 1e-4)
    delta.view(-1, n)[:, 0], delta.view(-1, n)[:, -1] = 1e-30, 1e30
    return base, base + delta


@needs_numba
@pytest.mark.parametrize("shape", [(40, 300), (7, 1), (1, 2048), (500,), (1,)])
@pytest.mark.parametrize("kind", ["levels", "close", "float32", "equal", "cluster"])
@pytest.mark.parametrize("inverse", [False, True])
def test_della_keep_factors_are_the_eager_ones(shape, kind, inverse):
    """``magprune_factors`` against ``MagPrune.keep`` on one block: rows of one element (the density itself), a
    vector (one row), and |Δ| rows whose ranks come each way (see ``_della_deltas``): decided by a bucket's rank
    bounds, counted a key at a time (in a bucket of that key alone, or of several), or by ranking the row."""
    g = torch.Generator().manual_seed(11)
    base, model = _della_deltas(kind, shape, g)
    m = get_method("della")
    p = m.resolve_params({"density": 0.4, "epsilon": 0.2}, 1)
    task = TensorTask("x", shape, Rule.MATRIX if len(shape) == 2 else Rule.VECTOR, 64, exact_products=True)
    sp = m.start(task, p, 1).sparsifiers[0]
    # 0: one keep probability, no band; -0.1 (refused as a parameter): larger deltas get lower probabilities, so no
    # rank bounds
    for epsilon in (0.2, 0.0, -0.1):
        sp.epsilon = epsilon
        for r0 in (0, 3):
            want = sp.keep(r0, (model.float() - base.float()).abs(), inverse)
            got = sp.kernel_factors(r0, base, model, inverse)
            assert got is not None and want is not None
            assert np.array_equal(got.view(np.int32), want.reshape(-1).numpy().view(np.int32)), (epsilon, r0)
    assert sp.kernel_factors(0, base.reshape(1, 1, -1), model.reshape(1, 1, -1)) is None  # 3-D: the eager path


@needs_numba
def test_della_integer_thresholds_decide_as_the_float64_comparison():
    """``_keep_table``'s thresholds: a 53-bit draw ``v`` passes iff ``v / 2⁵³ >= 1 − p`` in float64 (the eager
    ``uniform >= 1 − p``), tried at the threshold and one either side for every rank of rows of several lengths."""
    from numba import njit

    from streammerge.kernels import _numba

    @njit
    def table(n, density, spread, low, p_of, cut):  # type: ignore[no-untyped-def]
        return _numba._keep_table(n, density, spread, low, p_of, cut)

    for n, density, epsilon in ((1, 0.3, 0.1), (7, 0.5, 0.15), (896, 0.4, 0.2), (4864, 0.9, 0.05)):
        p_of, cut = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.uint64)
        d, spread, low = kernels.f32([density, 2 * epsilon, density - epsilon])
        assert table(n, d, spread, low, p_of, cut)  # ε >= 0: the thresholds never rise with the rank
        for r in range(0, n, max(1, n // 97)):
            for v in (int(cut[r]) - 1, int(cut[r]), int(cut[r]) + 1):
                assert (v >= int(cut[r])) == (v / 2.0 ** 53 >= 1.0 - float(p_of[r])), (n, r, v)


@needs_numba
@pytest.mark.parametrize("cols", [48, 13])  # rows that start on a whole byte of bits, and rows that start inside one
def test_della_ranks_each_row_once_with_the_l1_rescale(cols, monkeypatch):
    """DELLA with the L1 rescale: the L1 pass's kernel ranks the rows and keeps its decisions as bits; the merge
    pass reads them back (no second ranking) and merges to the eager bytes. A merge pass that did not see the whole
    L1 pass (a resumed run) ranks the rows again (``magprune_factors``), to the same bytes."""
    g = torch.Generator().manual_seed(3)
    rows = 40
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(rows, cols, generator=g) * 2 ** -8).to(torch.bfloat16) for _ in range(2)]
    m = get_method("della")
    p = m.resolve_params({"density": 0.4, "epsilon": 0.2}, 2)
    task = TensorTask("x", (rows, cols), Rule.MATRIX, 64, exact_products=True)
    assert m.stat_passes(Rule.MATRIX, p) == 1
    eager, fused = m.start(task, p, 2), m.start(task, p, 2)
    run_passes(eager, base, models, 1, 7, fused=False)
    with spying(NAMES) as calls:
        run_passes(fused, base, models, 1, 7, fused=True)
        assert calls["magprune_factors"] == 0 and calls["l1_sums"] == 6
        assert fused.scales == eager.scales
        resumed = m.start(task, p, 2)
        resumed.load_state_dict(fused.state_dict())
        for a in range(0, rows, 9):
            want = eager.emit(a, base[a : a + 9].float(), [x[a : a + 9] for x in models]).to(torch.bfloat16)
            for merger in (fused, resumed):
                got = torch.empty(want.shape, dtype=torch.bfloat16)
                assert merger.emit_raw(a, base[a : a + 9], [x[a : a + 9] for x in models], got) == 0
                assert torch.equal(to_bits_t(got), to_bits_t(want)), f"rows {a}..{a + 9}"
        assert calls["magprune_factors"] == 2 * 5  # the resumed merger ranks again, the other does not
    assert m.footprint(task, 2, p).emit_state >= 2 * -(-rows * cols // 8)


@needs_numba
@pytest.mark.parametrize("cols,ahead", [(48, True), (13, False)])  # rows on whole bytes of bits; rows inside bytes
def test_della_decisions_made_ahead_are_the_l1_passes_own(cols, ahead, monkeypatch):
    """DELLA with the L1 rescale, its decisions made ahead (``ahead_raw``, ``magprune_bits``) for the chunks' blocks
    last to first, the L1 sums then reading them in row order: the same bits and scales as the L1 pass's own
    ranking, and the eager bytes. Rows that do not start on a whole byte (blocks would share one) are not decided
    ahead."""
    g = torch.Generator().manual_seed(4)
    rows = 40
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(rows, cols, generator=g) * 2 ** -8).to(torch.bfloat16) for _ in range(2)]
    m = get_method("della")
    p = m.resolve_params({"density": 0.4, "epsilon": 0.2}, 2)
    task = TensorTask("x", (rows, cols), Rule.MATRIX, 64, exact_products=True)
    eager, inline, fused = m.start(task, p, 2), m.start(task, p, 2), m.start(task, p, 2)
    run_passes(eager, base, models, 1, 7, fused=False)
    run_passes(inline, base, models, 1, 7, fused=True)
    with spying(NAMES) as calls:
        for c0 in range(0, rows, 14):  # chunks of two or three blocks of 7 rows (the last shorter)
            blocks = [(a, min(a + 7, rows)) for a in range(c0, min(c0 + 14, rows), 7)]
            assert fused.blocks_ahead(0) == ahead
            if ahead:
                found = {a: fused.ahead_raw(0, a, base[a:b], [x[a:b] for x in models]) for a, b in reversed(blocks)}
                fused.start_blocks(0, [a for a, _ in blocks], [found[a] for a, _ in blocks])
            for a, b in blocks:
                assert fused.accumulate_raw(0, a, base[a:b], [x[a:b] for x in models])
            fused.end_blocks(0)
        fused.end_pass(0)
        assert calls["magprune_bits"] == (2 * 6 if ahead else 0)
    assert fused.scales == inline.scales == eager.scales
    for sp, other in zip(fused.sparsifiers, inline.sparsifiers):
        assert np.array_equal(sp.recall(), other.recall())
    for a in range(0, rows, 9):
        want = eager.emit(a, base[a : a + 9].float(), [x[a : a + 9] for x in models]).to(torch.bfloat16)
        got = torch.empty(want.shape, dtype=torch.bfloat16)
        assert fused.emit_raw(a, base[a : a + 9], [x[a : a + 9] for x in models], got) == 0
        assert torch.equal(to_bits_t(got), to_bits_t(want)), f"rows {a}..{a + 9}"


def to_bits_t(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)


@needs_numba
@pytest.mark.parametrize("rule,shape", [(Rule.TENSOR, (3, 8, 6)), (Rule.EMBEDDING, (70, 9)), (Rule.MATRIX, (130, 5)),
                                        (Rule.CONV, (6, 2, 3, 3))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_widen_statistics_and_merge_by_rule(rule, shape, dtype):
    """Stacked experts, embeddings (columns are rows), matrices of several tiles fed in blocks that split them,
    convolution kernels: the fused statistics give the same weights, the fused merge the same values."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=g).to(dtype)
    models = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(2)]
    widen = get_method("widen")
    params = widen.resolve_params({}, 2)
    task = TensorTask("x", shape, rule, 64, exact_products=dtype == torch.bfloat16)
    step = shape[0] if rule is Rule.TENSOR else 29
    eager, fused = widen.start(task, params, 2), widen.start(task, params, 2)
    run_passes(eager, base, models, 1, step, fused=False)
    run_passes(fused, base, models, 1, step, fused=True)
    assert torch.equal(eager.state_dict()["weights"], fused.state_dict()["weights"])
    want = eager.emit(0, base.float(), models).to(dtype)
    got = torch.empty(shape, dtype=dtype)
    assert fused.emit_raw(0, base, models, got) == 0
    assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@needs_numba
@pytest.mark.parametrize("cols", [1, 7, 8, 13, 128, 129, 896, 1000, 8192, 8200, 20000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_widen_row_sums_add_in_numpys_order(cols, dtype):
    """An embedding's per-token sums, fused, have the bits of numpy's reduction of the stored products: pairwise,
    by 8192-element buffers where float32 products are cast (past 8192 columns). Values over 16 binades, so
    another order would show; a zero base row against negative models (sums of -0.0) and an all-zero row."""
    g = torch.Generator().manual_seed(cols)
    rows = 5
    base = torch.randn((rows, cols), generator=g) * torch.exp(4 * torch.randn((rows, cols), generator=g))
    base[1] = 0.0
    models = [base + torch.randn((rows, cols), generator=g) * torch.exp(4 * torch.randn((rows, cols), generator=g))
              for _ in range(2)]
    models[0][1] = -torch.rand(cols, generator=g) - 0.5
    models[0][2], models[1][2], base[2] = 0.0, 0.0, 0.0
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    task = TensorTask("x", (rows, cols), Rule.EMBEDDING, 64, exact_products=dtype == torch.bfloat16)
    widen = get_method("widen")
    merger = widen.start(task, widen.resolve_params({}, 2), 2)
    want = row_sums(merger._products(base.float(), [m.float() for m in models])).T
    got = torch.full((5, rows + 3), 7.0, dtype=torch.float64)
    b, ms, _ = kernels.arrays(base, models)
    kernels.kernels().widen_row_sums(b, ms, cols, 2, task.exact_products, got.numpy())
    assert torch.equal(got[:, 2 : 2 + rows].contiguous().view(torch.int64), want.contiguous().view(torch.int64))
    assert (got[:, :2] == 7.0).all() and (got[:, 2 + rows :] == 7.0).all()  # only its rows are written


@needs_numba
def test_mixed_model_dtypes_take_the_eager_path(families, tmp_path, monkeypatch):
    """Models stored in different dtypes are not one kernel's tuple: emit_raw declines, the merge is eager's."""
    fam = {**families["bf16"], "multilingual": families["f32"]["multilingual"]}
    ref = tmp_path / "eager"
    merge(fam, ref, "task_arithmetic", {}, "eager", monkeypatch)
    calls = merge(fam, tmp_path / "auto", "task_arithmetic", {}, "auto", monkeypatch)
    assert not calls
    assert_same_output(tmp_path / "auto", ref)


# ---- choosing the backend ------------------------------------------------------------------------------------------
def test_the_backend_follows_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "eager")
    assert kernels.backend() == "eager" and not kernels.enabled()
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(kernels.KernelsError, match="STREAMMERGE_KERNELS='fast': expected one of auto, eager, numba"):
        kernels.backend()
    monkeypatch.delenv(kernels.ENV)
    assert kernels.backend() == ("numba" if HAVE_NUMBA else "eager")


@pytest.fixture
def no_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    """numba as if it were not installed."""
    monkeypatch.setattr(kernels, "_compiled", None)
    monkeypatch.setattr(kernels, "_missing", "No module named 'numba'")


def test_without_numba_the_eager_path_runs(no_numba, families, tmp_path, monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.backend() == "eager"
    monkeypatch.setenv(kernels.ENV, "numba")
    with pytest.raises(kernels.KernelsUnavailable, match=r"STREAMMERGE_KERNELS=numba but numba cannot be imported"):
        kernels.backend()
    ref = tmp_path / "eager"
    merge(families["bf16"], ref, "ties", {"density": 0.5}, "eager", monkeypatch)
    assert not merge(families["bf16"], tmp_path / "auto", "ties", {"density": 0.5}, "auto", monkeypatch)
    assert_same_output(tmp_path / "auto", ref)


def test_the_arrays_a_kernel_takes():
    """bfloat16 as uint16 bits, float16 as int16 bits, float32 as itself, sharing memory; others, non-contiguous
    views and models of mixed dtypes are declined."""
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert kernels.array(x.to(torch.bfloat16)).dtype == np.uint16
    assert kernels.array(x.to(torch.float16)).dtype == np.int16
    a = kernels.array(x)
    a[0] = 7.0
    assert x[0, 0] == 7.0
    assert kernels.array(x.double()) is None and kernels.array(x.T) is None
    assert kernels.arrays(x, [x, x.to(torch.bfloat16)]) is None
    assert kernels.arrays(x, [x[:1], x]) is None
    b, ms, o = kernels.arrays(x, [x, x], x)  # type: ignore[misc]
    assert len(ms) == 2 and b.shape == o.shape == (6,)


def test_auto_leaves_small_merges_to_the_eager_path_without_importing_numba(families, tmp_path, monkeypatch):
    """numba's import and the cached kernels cost a process about 0.5 s: auto uses them only for merges large
    enough to repay it (a test or the quick start stays eager), and a small merge never imports numba."""
    import subprocess
    import sys

    monkeypatch.setenv(kernels.ENV, "auto")
    assert not kernels.enabled(kernels.AUTO_MIN_ELEMENTS - 1)
    assert kernels.enabled(kernels.AUTO_MIN_ELEMENTS) == (kernels._load() is not None)
    monkeypatch.setenv(kernels.ENV, "numba" if kernels._load() is not None else "eager")
    assert kernels.enabled(10) == (kernels._load() is not None)  # forced: any size
    fam = families["bf16"]
    code = ("import sys, warnings; warnings.simplefilter('ignore'); import streammerge; "
            f"streammerge.merge({str(fam['base'])!r}, [{str(fam['chat'])!r}, {str(fam['multilingual'])!r}], "
            f"{str(tmp_path / 'out')!r}, 'ties'); print('numba' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, kernels.ENV: "auto"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


@needs_numba
def test_the_plan_takes_the_kernels_runtime_off_the_budget(families, tmp_path, monkeypatch):
    """Decided once, in the plan: with the kernels their runtime is part of the predicted peak and comes off the
    budget before the buffers share it; without them (or on a small merge under ``auto``) nothing is taken."""
    from streammerge.planner import BUDGET_USABLE

    fam = families["bf16"]
    plans = {}
    for backend in ("eager", "numba", "auto"):
        monkeypatch.setenv(kernels.ENV, backend)
        plans[backend] = api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / backend,
                                  "task_arithmetic", max_ram="1GiB")
    eager, fused = plans["eager"], plans["numba"]
    assert (eager.fused_kernels, fused.fused_kernels, plans["auto"].fused_kernels) == (False, True, False)
    assert plans["auto"].peak_ram == eager.peak_ram
    budget = int(eager.budget.max_ram * BUDGET_USABLE)
    assert eager.peak_ram <= budget and kernels.RUNTIME_BYTES < fused.peak_ram <= budget + kernels.RUNTIME_BYTES
    monkeypatch.setenv(kernels.ENV, "numba")
    with pytest.raises(Exception, match=r"too small: .* needs at least .* of it for the fused kernels' runtime, "
                                        r"which STREAMMERGE_KERNELS=eager frees"):
        api.plan(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "small", "task_arithmetic",
                 max_ram="2MiB")
    monkeypatch.setenv(kernels.ENV, "auto")  # auto leaves the kernels out rather than fail
    assert not kernels.enabled(10 * kernels.AUTO_MIN_ELEMENTS, 4 * kernels.RUNTIME_BYTES - 1)
    assert kernels.enabled(10 * kernels.AUTO_MIN_ELEMENTS, 4 * kernels.RUNTIME_BYTES)


def test_the_candidate_buffers_leave_room_for_a_whole_kernel_step():
    """Radix select's pass A kernel appends up to one step of candidates past a window's fill before it checks for
    room again (``kernels._numba.histogram_high``): every candidate buffer's slack must hold a whole step."""
    from streammerge.methods._select import CANDIDATE_SLACK, TopK

    compiled = pytest.importorskip("streammerge.kernels._numba", reason="numba is not installed")
    assert CANDIDATE_SLACK >= compiled.STEP
    assert TopK.scratch_size(0) >= compiled.STEP
