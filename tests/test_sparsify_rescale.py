"""The delta methods' sparsify-and-rescale seam: mergekit 0.1.5's L1 rescale (the default wherever ``rescale`` is),
the papers' inverse-density rescale as an option, DELLA's magnitude-ranked keep probabilities, SCE's selection, and
their statistics surviving a resume in the middle of a tensor. Numbers against the dense references are in
test_baselines.py; against mergekit itself in test_mergekit_parity.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.cli import main
from streammerge.errors import MethodError
from streammerge.methods import Rule, TensorTask, get_method

NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and one model whose delta is nonzero everywhere on a 96 x 120 tensor (and a vector)."""
    root = tmp_path_factory.mktemp("rescale")
    g = torch.Generator().manual_seed(11)
    base = {NAME: torch.randn(96, 120, generator=g), "model.norm.weight": torch.randn(120, generator=g)}
    model = {n: b + torch.randn(b.shape, generator=g).sign() * (0.1 + torch.rand(b.shape, generator=g))
             for n, b in base.items()}
    for name, tensors in (("base", base), ("model", model)):
        (root / name).mkdir()
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
        (root / name / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    return root, base, model


def _merge(pair, tmp_path, method, params, chunk_rows=None):
    root, base, model = pair
    out = api.merge(root / "base", root / "model", tmp_path / f"out-{len(list(tmp_path.iterdir()))}", method=method,
                    params=params, chunk_rows=chunk_rows)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("method,params", [
    ("dare_linear", {"density": 0.3}), ("ties", {"density": 0.3, "rescale": True}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05, "rescale": True}),
    ("della_linear", {"density": 0.3, "epsilon": 0.2}),
])
def test_the_l1_rescale_keeps_each_tensors_delta_l1_norm(pair, tmp_path, method, params):
    _, base, model = pair
    got = _merge(pair, tmp_path, method, params)
    for n, b in base.items():
        delta, out = model[n] - b, got[n] - b
        assert 0.2 < (out != 0).float().mean().item() < 0.4, n
        assert out.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5), n


def test_inverse_density_divides_kept_elements_by_their_keep_probability(pair, tmp_path):
    _, base, model = pair
    dare = _merge(pair, tmp_path, "dare_linear", {"density": 0.25, "rescale_mode": "inverse_density"})[NAME]
    delta, kept = model[NAME] - base[NAME], dare - base[NAME] != 0
    assert torch.allclose((dare - base[NAME])[kept], delta[kept] / 0.25, rtol=1e-6, atol=1e-6)
    plain = _merge(pair, tmp_path, "dare_linear", {"density": 0.25, "rescale": False})[NAME]
    assert torch.equal(plain != base[NAME], kept)  # the same mask, whatever the rescale


def test_della_keeps_large_deltas_more_often_and_rows_average_the_density(pair, tmp_path):
    """p runs from density − ε (smallest |Δ| of a row) to density + ε (largest): 0.2 to 0.8 here."""
    _, base, model = pair
    got = _merge(pair, tmp_path, "della_linear", {"density": 0.5, "epsilon": 0.3, "rescale": False})[NAME]
    delta = (model[NAME] - base[NAME]).abs()
    kept = (got != base[NAME]).float()
    order = delta.argsort(dim=1)
    quarter = order.shape[1] // 4
    smallest = kept.gather(1, order[:, :quarter]).mean().item()
    largest = kept.gather(1, order[:, -quarter:]).mean().item()
    assert smallest == pytest.approx(0.275, abs=0.04) and largest == pytest.approx(0.725, abs=0.04)
    assert kept.mean().item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("method,params", [("della", {"density": 0.4, "epsilon": 0.2}),
                                           ("ties", {"density": 0.3, "rescale": True})])
def test_chunking_changes_no_byte(pair, tmp_path, method, params):
    _, base, _ = pair
    outs = [_merge(pair, tmp_path, method, params, chunk_rows=rows) for rows in (None, 5, 17)]
    for name in base:
        assert torch.equal(outs[0][name], outs[1][name]) and torch.equal(outs[0][name], outs[2][name]), name


@pytest.mark.parametrize("method,params,n", [
    ("della", {"density": (0.4, 0.6), "epsilon": (0.2, 0.1), "weight": (1.0, 0.5), "normalize": True}, 2),
    ("ties", {"density": (0.3, 0.5), "weight": (1.0, 1.0), "rescale": True}, 2),
    ("breadcrumbs_ties", {"density": (0.3, 0.5), "gamma": (0.1, 0.1), "rescale": True}, 2),
    ("sce", {"select_topk": 0.35}, 3),
])
def test_statistics_and_emit_cursor_survive_a_resume_mid_tensor(method, params, n):
    """Journaled statistics (state_dict) and the emit cursor restored in a fresh merge object give the bytes of an
    uninterrupted run, the way a resumed run rebuilds a tensor's merge."""
    m = get_method(method)
    resolved = m.resolve_params(params, n)
    task = TensorTask(NAME, (40, 33), Rule.MATRIX, tile=8)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 33, generator=g)
    models = [base + torch.randn(40, 33, generator=g) * (0.5 + k) for k in range(n)]
    # a few exact ties in |delta| so the selections' tie cursors matter
    for x in models:
        x[:, :4] = base[:, :4] + 0.25
    chunks = [(0, 7), (7, 19), (19, 26), (26, 40)]

    def statistics(merge):
        for p in range(m.stat_passes(task.rule, resolved)):
            for a, b in chunks:
                merge.accumulate(p, a, base[a:b], [x[a:b] for x in models])
            merge.end_pass(p)

    whole = m.start(task, resolved, n)
    statistics(whole)
    want = torch.cat([whole.emit(a, base[a:b], [x[a:b] for x in models]) for a, b in chunks])

    first = m.start(task, resolved, n)
    statistics(first)
    state = first.state_dict()
    head = [first.emit(a, base[a:b], [x[a:b] for x in models]) for a, b in chunks[:2]]
    cursor = first.cursor()
    resumed = m.start(task, resolved, n)
    resumed.load_state_dict(state)
    resumed.restore_cursor(cursor)
    tail = [resumed.emit(a, base[a:b], [x[a:b] for x in models]) for a, b in chunks[2:]]
    assert torch.equal(torch.cat(head + tail), want)


@pytest.mark.parametrize("args,text", [
    (["--method", "della", "--param", "density=0.9", "--param", "epsilon=0.15"], "density ± epsilon must lie inside"),
    (["--method", "dare_ties", "--param", "rescale_mode=l2"], "must be one of l1, inverse_density"),
    (["--method", "sce", "--param", "select_topk=1.5"], "must be between 0 and 1"),
    (["--method", "sce", "--param", "weight=0.5"], "sce has no parameter 'weight'"),
])
def test_bad_parameters_are_refused_before_anything_is_written(pair, tmp_path, args, text):
    root, _, _ = pair
    r = CliRunner().invoke(main, ["merge", "--base", str(root / "base"), "--model", str(root / "model"), "--out",
                                  str(tmp_path / "out"), *args])
    assert r.exit_code != 0 and text in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_della_density_one_and_zero_need_no_epsilon_check():
    m = get_method("della")
    assert m.resolve_params({"density": 1.0, "epsilon": 0.5}, 1)["density"] == (1.0,)
    assert m.resolve_params({"density": 0.0, "epsilon": 0.5}, 1)["density"] == (0.0,)
    with pytest.raises(MethodError, match="model 2"):
        m.resolve_params({"density": "1.0,0.1", "epsilon": 0.15}, 2)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3, "rescale": True}), ("dare_ties", {"density": 0.3}),
    ("della", {"density": 0.3, "epsilon": 0.1}), ("della_linear", {"density": 0.5}), ("sce", {"select_topk": 0.5}),
    ("breadcrumbs_ties", {"density": 0.3, "rescale": True}),
])
@pytest.mark.filterwarnings("ignore:model . .* is the base itself")
def test_zero_deltas_give_the_base(pair, tmp_path, method, params):
    """A model equal to the base: nothing to keep, no L1 norm to restore (mergekit's eps branch), no NaN."""
    root, base, _ = pair
    out = api.merge(root / "base", [root / "base", root / "base"], tmp_path / "out", method=method, params=params)
    got = load_file(out / "model.safetensors")
    for n, b in base.items():
        assert torch.equal(got[n], b), n


def test_sce_with_identical_models_follows_mergekit(pair, tmp_path):
    """Identical models have no variance anywhere: select_topk < 1 selects nothing (k = int(0 · topk)) and gives
    the base, as mergekit's sce does; select_topk 1 keeps everything and gives the model."""
    root, base, model = pair
    twin = tmp_path / "twin"
    shutil.copytree(root / "model", twin)
    for topk, want in ((0.5, base), (1.0, model)):
        out = api.merge(root / "base", [root / "model", twin], tmp_path / f"o{topk}", method="sce",
                        params={"select_topk": topk})
        got = load_file(out / "model.safetensors")
        for n in base:
            assert torch.allclose(got[n], want[n], atol=1e-6), (topk, n)


def test_della_ascending_order_is_torchs_stable_argsort():
    """MagPrune ranks by a keyed numpy sort on the CPU: the same order as torch's stable argsort, ties by index,
    zeros, NaN, infinity and denormals included, for rows of vectors, matrices and stacked experts."""
    from streammerge.methods._delta import ascending_order

    g = torch.Generator().manual_seed(3)
    for shape in [(1, 12), (7, 13), (5, 300), (3, 4, 6), (2, 257, 3)]:
        x = torch.randn(*shape, generator=g).abs()
        x.view(-1)[:4] = 0.0
        x.view(-1)[5], x.view(-1)[7], x.view(-1)[9] = float("nan"), float("inf"), 1e-45
        if x.shape[1] > 4:
            x[:, 4] = x[:, 2]
        assert torch.equal(ascending_order(x), torch.argsort(x, dim=1, stable=True)), shape
