"""The planner: budgets, chunk sizes, rules and refusals, all before any tensor byte is read."""

from __future__ import annotations

import json

import pytest
import torch

from streammerge import plan
from streammerge.errors import PlanError
from streammerge.examples import write_family
from streammerge.methods._tiles import TileFeeder, add_column_sums
from streammerge.methods.base import Rule
from streammerge.planner import TILE_ROWS as TILE


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return write_family(root, "tiny-untied", dtype="bf16")


def _plan(family, tmp_path, **kw):
    kw.setdefault("device", "cpu")  # the CPU's RAM planning (a GPU plan counts its own scratch; tests/test_device.py)
    return plan(family["base"], [family["chat"], family["multilingual"]], tmp_path / "out", **kw)


def test_rules_shards_and_bytes(family, tmp_path):
    p = _plan(family, tmp_path)
    rules = {t.name: t.rule for t in p.tensors}
    assert rules["model.embed_tokens.weight"] is Rule.EMBEDDING
    assert rules["lm_head.weight"] is Rule.MATRIX
    assert rules["model.norm.weight"] is Rule.VECTOR
    assert rules["model.layers.0.mlp.up_proj.weight"] is Rule.MATRIX
    inputs = p.base.total_bytes  # tensor bytes of one model (all three are the same size)
    # with room for whole tensors every input is read once; chunked, 2-D tensors are read twice (stats + merge)
    assert p.bytes_read == 3 * inputs
    chunked = _plan(family, tmp_path, max_ram="600KiB")
    assert 3 * inputs < chunked.bytes_read < 6 * inputs
    assert p.bytes_written == sum(s.size for s in p.shards)
    assert not (tmp_path / "out").exists()
    json.dumps(p.to_dict())  # serialisable


def test_budget_sets_chunk_rows_in_tiles_and_bounds_peak(family, tmp_path):
    p = _plan(family, tmp_path, max_ram="600KiB")
    assert any(t.chunk_rows < t.rows for t in p.tensors)
    for t in p.tensors:
        if t.rule in (Rule.MATRIX, Rule.EMBEDDING) and t.chunk_rows < t.rows:
            assert t.chunk_rows % TILE == 0 or t.chunk_rows < TILE
    assert p.peak_ram <= 600 * 1024
    big = _plan(family, tmp_path, max_ram="8GiB")
    assert all(t.chunk_rows == t.rows for t in big.tensors)


def test_budget_too_small_names_the_size_needed(family, tmp_path):
    with pytest.raises(PlanError, match=r"max_ram .* too small: tensor .* needs at least .* raise max_ram"):
        _plan(family, tmp_path, max_ram="1KiB")


def test_fingerprint_depends_on_options_not_budget(family, tmp_path):
    a = _plan(family, tmp_path, max_ram="600KiB").fingerprint
    assert a == _plan(family, tmp_path, max_ram="1GiB").fingerprint
    assert a != _plan(family, tmp_path, params={"t": 0.5}).fingerprint
    assert a != _plan(family, tmp_path, dtype="float32").fingerprint


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 sums of float64 values round
def test_tiled_column_sums_are_independent_of_chunking_and_threads(threads, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1301, 3, 37, generator=g, dtype=dtype) * torch.rand(1301, 1, 1, generator=g, dtype=dtype) * 100
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for step in (1, 7, 64, 100, 128, 1301):
            feeder, total, tiles = TileFeeder(1301, TILE), torch.zeros(3 * 37, dtype=torch.float64), []
            for r0 in range(0, 1301, step):
                for t0, (tile,) in feeder.feed(r0, [x[r0 : r0 + step]]):
                    tiles.append((t0, tile.shape[0]))
                    add_column_sums(total, tile, TILE)
            # blocks start on tile boundaries, hold whole tiles (but the last), and cover every row once, in order
            assert all(t0 % TILE == 0 for t0, _ in tiles)
            assert [r for t0, n in tiles for r in range(t0, t0 + n)] == list(range(1301))
            assert all(n % TILE == 0 for t0, n in tiles if t0 + n < 1301)
            results.append(total)
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert (r == results[0]).all()
    assert torch.allclose(results[0], x.double().sum(0).reshape(-1))
    with pytest.raises(RuntimeError, match="in order"):
        list(TileFeeder(301, TILE).feed(5, [x[:5]]))


@pytest.mark.parametrize("kernels_env,max_ram", [("eager", "96MiB"), ("eager", "1GiB"), ("numba", "256MiB"),
                                                 ("numba", "1GiB")])
@pytest.mark.parametrize("method", ["widen", "dare_ties", "sce", "multislerp"])
def test_the_planned_peak_fits_the_usable_budget_with_workers_sharing_column_sums(method, kernels_env, max_ram,
                                                                                   tmp_path, monkeypatch):
    """With workers to share them, blocks out of turn hold the tile sums of a chunk (``Footprint.
    stats_per_chunk_row``), beside the input slots and output buffers sized for the largest chunk of any tensor: the
    planned peak, those included, stays within the budget's usable share (WIDEN's embedding, summed by rows, holds
    none, yet its chunk sizes the slots)."""
    import importlib.util
    from dataclasses import replace

    from streammerge import api, kernels
    from streammerge.examples import SHAPES
    from streammerge.planner import BUDGET_USABLE

    if kernels_env == "numba" and importlib.util.find_spec("numba") is None:
        pytest.skip("numba is not installed")
    monkeypatch.setenv(kernels.ENV, kernels_env)
    family = write_family(tmp_path / "fam", replace(SHAPES["tiny"], hidden=512, vocab=16000, layers=1))
    plan = api.plan(family["base"], [family["chat"], family["multilingual"]], tmp_path / "out", method,
                    {"density": 0.5} if method == "dare_ties" else {}, max_ram=max_ram, threads=2)
    assert plan.fused_kernels == (kernels_env == "numba")
    assert plan.peak_ram <= int(plan.budget.max_ram * BUDGET_USABLE)
