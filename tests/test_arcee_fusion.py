"""arcee_fusion against a dense reference written from mergekit's formula: importance |M − B|·KL(p‖q) per row of the
last dim (p, q the softmaxes plus 1e-8), threshold median + 1.5·(q3 − q1) over the sorted importances at index
floor(q·(n − 1)), result B + (M − B)·[importance ≥ threshold]; exact order statistics at odd sizes with ties and
negative values; the same bytes for every chunking; statistics that survive a resume."""

from __future__ import annotations

import pytest
import torch
from helpers import interrupt_merge_after_chunks
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.errors import StreamMergeError
from streammerge.examples import write_family
from streammerge.methods import all_methods
from streammerge.methods._quantile import OrderStatistics, order_keys
from streammerge.methods.arcee_fusion import row_kl, softmax_rows
from streammerge.methods.base import Rule, TensorTask

METHOD = all_methods()["arcee_fusion"]
#: the end-to-end family has a vision-tower kernel, which the merge announces it merges like the rest
pytestmark = pytest.mark.filterwarnings("ignore:the 1 tensors of the vision tower")


def reference(base: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(result, importance, threshold), dense. The KL sum runs in float64 (as the method's), rounded to float32."""
    b = base.reshape(-1, base.shape[-1]) if base.dim() else base.reshape(1, 1)
    m = model.reshape(b.shape)
    p = torch.softmax(m, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).double().sum(dim=-1, keepdim=True).float()
    importance = (m - b).abs() * kl
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, median, q3 = ordered[(n - 1) // 4], ordered[(n - 1) // 2], ordered[3 * (n - 1) // 4]
    threshold = median + 1.5 * (q3 - q1)
    result = b + (m - b) * (importance >= threshold).float()
    return result.reshape(base.shape), importance.reshape(base.shape), float(threshold)


def run_chunked(base: torch.Tensor, model: torch.Tensor, chunk: int | None, rule: Rule = Rule.MATRIX,
                state_from=None) -> tuple[torch.Tensor, object]:
    """Drive the method as the engine does: two statistics passes and the merge, in chunks of ``chunk`` rows (a
    vector or scalar in one chunk); with ``state_from``, its journaled statistics instead of the passes."""
    task = TensorTask("t", tuple(base.shape), rule, 64)
    merge = METHOD.start(task, METHOD.resolve_params({}, 1), 1)
    rows = base.shape[0] if base.dim() >= 2 else 1
    step = chunk or max(rows, 1)
    spans = ([(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]) if base.dim() >= 2 else [(0, 1)]

    def part(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        return x[a:b].clone() if x.dim() >= 2 else x.clone()

    if state_from is not None:
        merge.load_state_dict({k: v.clone() for k, v in state_from.state_dict().items()})
    else:
        for p in range(METHOD.stat_passes(rule, {})):
            for a, b in spans:
                merge.accumulate(p, a, part(base, a, b), [part(model, a, b)])
            merge.end_pass(p)
    out = torch.cat([merge.emit(a, part(base, a, b), [part(model, a, b)]).reshape(-1) for a, b in spans])
    return out.reshape(base.shape), merge


def hard_pair(rows: int = 61, width: int = 33, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and model whose importances hold ties (rows equal to the base's: zeros; repeated rows) and negative
    values (rows changed by 1e-6 in one element, whose KL rounds to slightly below 0)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, width, generator=g)
    model = base + 0.05 * torch.randn(rows, width, generator=g)
    model[0::4] = base[0::4]  # no change: importance 0
    model[1::4] = base[1::4]
    model[1::4, 0] += 1e-6  # a tiny change: KL of either sign near 0
    base[3::8], model[3::8] = base[3], model[3]  # identical rows: tied importances
    return base, model


@pytest.mark.parametrize("shape,rule", [((61, 33), Rule.MATRIX), ((7, 5, 9), Rule.TENSOR), ((4, 3, 2, 5), Rule.CONV),
                                        ((53,), Rule.VECTOR), ((), Rule.VECTOR), ((17, 1), Rule.MATRIX),
                                        ((12, 10), Rule.MATRIX), ((9, 13), Rule.EMBEDDING)],
                         ids=["matrix", "experts", "conv", "vector", "scalar", "one-column", "n-mod-4-0", "n-mod-4-1"])
def test_the_method_matches_the_dense_reference_for_every_chunking(shape, rule):
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g)
    model = base + 0.1 * torch.randn(shape, generator=g)
    want, _, threshold = reference(base, model)
    for chunk in (None, 1, 3, 7):
        got, merge = run_chunked(base, model, chunk, rule)
        assert merge.threshold == threshold, chunk  # quartiles at floor(q·(n − 1)), whatever n mod 4
        assert torch.equal(got, want), (chunk, (got - want).abs().max())


def test_exact_quartiles_with_ties_and_negative_importances():
    base, model = hard_pair()
    want, importance, threshold = reference(base, model)
    assert (importance < 0).any() and (importance == 0).sum() > importance.numel() // 4  # the hard cases are there
    assert importance.numel() % 2 == 1 and 0 < (want != base).sum() < (model != base).sum()
    for chunk in (None, 1, 3, 7):
        got, merge = run_chunked(base, model, chunk)
        assert merge.threshold == threshold
        assert torch.equal(got, want), chunk


def test_importances_tied_with_the_threshold_are_kept_and_negative_ones_dropped():
    """Most rows unchanged: the quartiles and the threshold are 0, so changes of importance 0 (``>=``) and above are
    kept, while rows changed so little that their KL rounds below 0 are not."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(61, 9, generator=g)
    model = base.clone()
    model[:12, 0] += 1e-6  # tiny changes: KL of either sign
    model[12:14] += 0.05 * torch.randn(2, 9, generator=g)
    want, importance, threshold = reference(base, model)
    negative = (importance < 0).any(dim=1)
    assert threshold == 0.0 and negative.any() and (~negative[:12]).any()
    got, merge = run_chunked(base, model, 3)
    assert merge.threshold == 0.0 and torch.equal(got, want)
    assert torch.equal(got[:14][negative[:14]], base[:14][negative[:14]])  # dropped
    assert torch.equal(got[:14][~negative[:14]], (base + (model - base))[:14][~negative[:14]])  # kept


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 1001, 4099])
def test_order_statistics_equal_a_sort_at_every_chunking(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.tensor([1e-42, 1e-3, 1.0, 1e30])[torch.randint(4, (n,), generator=g)]
    x[torch.randint(n, (n // 3,), generator=g)] = 0.0
    x[torch.randint(n, (n // 7,), generator=g)] = -0.0
    x[torch.randint(n, (n // 5,), generator=g)] = float(x[0])  # ties
    if n > 10:
        x[:3] = torch.tensor([float("inf"), float("-inf"), -3.0])
    ks = sorted({0, (n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4, n - 1})
    want = [float(v) for v in x.sort().values[ks]]
    for chunk in (1, 3, 7, n):
        stats = OrderStatistics(ks, n)
        for i in range(0, n, chunk):
            stats.pass_a(x[i : i + chunk])
        stats.end_a()
        for i in range(0, n, chunk):
            stats.pass_b(x[i : i + chunk])
        stats.end_b()
        assert stats.values == want, chunk
        restored = OrderStatistics(ks, n)
        restored.restore(stats.export())
        assert restored.values == want


def test_order_keys_sort_like_the_floats():
    x = torch.tensor([float("-inf"), -3.5, -1e-40, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = order_keys(x)
    assert torch.equal(keys.sort().values, keys) and len(set(keys.tolist())) == len(x)


def test_rows_are_computed_alone_on_both_softmax_paths():
    """A row's KL (and softmax) has the same bits whatever rows share its chunk; the unfused path (used off the CPU)
    agrees with torch's kernel within float32 rounding."""
    g = torch.Generator().manual_seed(2)
    for width in (1, 7, 301, 4099):
        base = torch.randn(23, width, generator=g)
        model = base + 0.1 * torch.randn(23, width, generator=g)
        for fused in (True, False):
            whole = softmax_rows(model, fused)
            parts = torch.cat([softmax_rows(model[i : i + 3].clone(), fused) for i in range(0, 23, 3)])
            assert torch.equal(whole, parts), (width, fused)
        assert torch.allclose(softmax_rows(model, False), torch.softmax(model, -1), rtol=1e-5, atol=1e-9)
        kl = row_kl(model, base)
        assert torch.equal(kl, torch.cat([row_kl(model[i : i + 1].clone(), base[i : i + 1].clone())
                                          for i in range(23)]))


def test_degenerate_inputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9, 5, generator=g)
    same, merge = run_chunked(base, base.clone(), 2)  # no change: importance 0 everywhere, threshold 0
    assert merge.threshold == 0.0 and torch.equal(same, base)
    empty, _ = run_chunked(torch.zeros(0, 4), torch.zeros(0, 4), None)
    assert empty.shape == (0, 4)
    one, _ = run_chunked(torch.tensor([2.0]), torch.tensor([3.0]), None, Rule.VECTOR)  # KL 0: kept (0 >= 0)
    assert torch.equal(one, torch.tensor([3.0]))


def test_statistics_survive_a_resume():
    base, model = hard_pair(seed=5)
    first, done = run_chunked(base, model, 7)
    resumed, _ = run_chunked(base, model, 3, state_from=done)
    assert torch.equal(resumed, first)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    fam = write_family(tmp_path_factory.mktemp("fusion"), "tiny-llama", dtype="bf16")
    # a stacked-experts tensor and a convolution kernel besides the decoder's matrices and vectors
    g = torch.Generator().manual_seed(9)
    extra = {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 6, 10, generator=g),
             "model.visual.patch_embed.proj.weight": torch.randn(6, 3, 2, 2, generator=g)}
    for k, name in enumerate(("base", "chat", "multilingual")):
        tensors = load_file(fam[name] / "model.safetensors")
        for key, value in extra.items():
            tensors[key] = (value + 0.05 * k * torch.randn(value.shape, generator=g)).to(torch.bfloat16)
        save_file(tensors, fam[name] / "model.safetensors", metadata={"format": "pt"})
    return fam


def test_merges_match_the_reference_with_the_same_bytes_for_every_chunking(fam, tmp_path):
    outs = [api.merge(fam["base"], fam["chat"], tmp_path / f"o{k}", method="arcee_fusion", chunk_rows=chunk)
            for k, chunk in enumerate((None, 3, 7))]
    data = [(o / "model.safetensors").read_bytes() for o in outs]
    assert data[1] == data[0] and data[2] == data[0]
    merged = load_file(outs[0] / "model.safetensors")
    base, chat = (load_file(fam[n] / "model.safetensors") for n in ("base", "chat"))
    changed = 0
    for name, b in base.items():
        want = reference(b.float(), chat[name].float())[0].to(torch.bfloat16)
        assert torch.equal(merged[name], want), name
        changed += int((merged[name] != b).sum())
    assert 0 < changed < sum(int((chat[n] != base[n]).sum()) for n in base)


def test_takes_exactly_one_model(fam, tmp_path):
    with pytest.raises(StreamMergeError, match="at most 1 model"):
        api.merge(fam["base"], [fam["chat"], fam["multilingual"]], tmp_path / "out", method="arcee_fusion")


def test_an_interrupted_merge_resumes_from_its_saved_statistics(fam, tmp_path, monkeypatch):
    """Interrupted mid-tensor after its statistics were saved: the resumed run (another chunking) loads them, runs
    no statistics pass for that tensor, and writes the bytes of an uninterrupted merge."""
    whole = api.merge(fam["base"], fam["chat"], tmp_path / "whole", method="arcee_fusion")
    out = tmp_path / "out"
    interrupt_merge_after_chunks(12, lambda: api.merge(fam["base"], fam["chat"], out, method="arcee_fusion", chunk_rows=5))
    assert list((out.with_name("out.streammerge-partial") / "state").glob("*.safetensors"))
    loaded, passes = [], []
    real = METHOD.start

    def start(task, params, n):  # type: ignore[no-untyped-def]
        merge = real(task, params, n)
        load, accumulate = merge.load_state_dict, merge.accumulate
        merge.load_state_dict = lambda state: (loaded.append(task.name), load(state))
        merge.accumulate = lambda *a: (passes.append(task.name), accumulate(*a))
        return merge

    monkeypatch.setattr(METHOD, "start", start)
    api.merge(fam["base"], fam["chat"], out, method="arcee_fusion", chunk_rows=7)
    assert loaded, "the resumed run recomputed the statistics instead of loading them"
    assert not set(loaded) & set(passes), "a tensor with saved statistics ran its statistics passes again"
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_the_bytes_do_not_depend_on_chunking_and_agree_with_the_cpu():
    """Off the CPU the softmax is exp(x − max) over a fixed-order tree sum: every chunking gives the same bytes;
    importances agree with the CPU's within float32 rounding, so at most a few elements at the threshold differ."""
    base, model = hard_pair(rows=301, width=257, seed=6)
    cpu, cpu_merge = run_chunked(base, model, None)
    first, merge = run_chunked(base.cuda(), model.cuda(), None)
    for chunk in (1, 7):
        assert torch.equal(run_chunked(base.cuda(), model.cuda(), chunk)[0], first), chunk
    assert merge.threshold == pytest.approx(cpu_merge.threshold, rel=1e-5)
    assert (first.cpu() != cpu).sum() <= 3
