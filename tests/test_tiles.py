"""Chunk-independent float64 sums: the GPU path (a fixed pairwise tree of elementwise adds) runs here on the CPU
and is checked against float64 sums, for chunk invariance, and for the property WIDEN's ties rely on: equal
inputs sum to bit-equal results wherever they lie in memory."""

from __future__ import annotations

import pytest
import torch

from streammerge.methods._tiles import TileFeeder, add_column_sums, add_tile_tree_sums, tree_sum
from streammerge.planner import TILE_ROWS as TILE


@pytest.mark.parametrize("shape,dim", [((7, 5, 13), -1), ((1, 3), 0), ((64, 10), 0), ((130, 3, 9), 0),
                                       ((3, 1), 1), ((2, 4, 5120), -1), ((33, 6), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tree_sum_is_a_float64_sum_and_leaves_its_input_alone(shape, dim, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    before = x.clone()
    got = tree_sum(x, dim)
    want = x.double().sum(dim)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, before)


def test_tree_sum_of_nothing_is_zero():
    assert torch.equal(tree_sum(torch.ones(0, 4), 0), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(tree_sum(torch.ones(3, 0), 1), torch.zeros(3, dtype=torch.float64))


def test_tree_sum_follows_a_fixed_pairwise_order():
    # 1 + 2^-53 + 2^-53 = 1 sequentially, but the tree adds the two tiny values first: (2^-53 + 2^-53) + 1
    x = torch.tensor([2.0**-53, 1.0, 2.0**-53, 0.0], dtype=torch.float64)  # pairs (x0+x2), (x1+x3)
    assert tree_sum(x, 0).item() == 1.0 + 2.0**-52
    odd = torch.tensor([1.0, 0.0, 2.0**-53], dtype=torch.float64)  # the odd last element joins the first
    assert tree_sum(odd, 0).item() == 1.0


def test_equal_columns_sum_to_equal_bits_at_any_offset():
    g = torch.Generator().manual_seed(2)
    # 17 elements per row: the copies of one vector lie at every alignment of a 16-byte vector load
    v = torch.randn(5, 1, 17, generator=g) * torch.logspace(-6, 6, 17)
    x = torch.cat([torch.randn(5, 1, 17, generator=g), v, v, v, torch.randn(5, 1, 17, generator=g), v], dim=1)
    sums = tree_sum(x, -1)  # (5, 6)
    for j in (2, 3, 5):
        assert torch.equal(sums[:, j], sums[:, 1])
    cols = tree_sum(x.reshape(5, -1), 0).reshape(6, 17)
    for j in (2, 3, 5):
        assert torch.equal(cols[j], cols[1])


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 200, 1300])
def test_the_device_tile_sums_do_not_depend_on_the_chunking(rows):
    # float64 values: their float64 sums round, so any change of order would show in the last bits
    x = torch.randn(rows, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(rows)) * 1e3
    cpu = torch.zeros(11, dtype=torch.float64)
    add_column_sums(cpu, x, TILE)  # numpy, sequential within each tile
    results = []
    for chunk in (rows, 1, 7, TILE, 100, 512):
        feeder, total = TileFeeder(rows, TILE), torch.zeros(11, dtype=torch.float64)
        for r0 in range(0, rows, chunk):
            for _, (block,) in feeder.feed(r0, [x[r0 : r0 + chunk]]):
                add_tile_tree_sums(total, block, TILE)
        results.append(total)
    assert torch.allclose(results[0], cpu, rtol=1e-12, atol=1e-9)
    for chunk, r in zip((rows, 1, 7, TILE, 100, 512), results):
        assert torch.equal(r, results[0]), chunk
