"""Chunk-independent float64 sums: the GPU path (a fixed pairwise tree of elementwise adds) runs here on the CPU
and is checked against float64 sums, for chunk invariance, and for the property WIDEN's ties rely on: equal
inputs sum to bit-equal results wherever they lie in memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
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


@pytest.mark.parametrize("rows,chunk", [(1000, 1000), (1000, 100), (1000, 300), (777, 512), (130, 64), (65, 40)])
def test_fused_column_sums_added_out_of_turn_by_several_threads_keep_the_eager_bits(rows, chunk):
    """The engine's sharing of a statistics pass summed per tile: each chunk's first block in turn, the others
    (whole tiles) on four threads in a shuffled order, their tiles summed apart and added in row order later
    (``FusedTiles``). The sums equal the eager torch sums of the same rows in row order, bit for bit (float32 deltas
    of every magnitude, whose float64 squares round in the sums, so a reordered add would show)."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from streammerge import kernels
    from streammerge.methods._tiles import ColumnSums

    if kernels._load() is None:
        pytest.skip("numba is not installed: no fused kernel sums tiles")
    k, cols, n = kernels.kernels(), 37, 2
    g = torch.Generator().manual_seed(rows + chunk)
    base = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 3, cols)
    models = [base + torch.randn(rows, cols, generator=g) * 10 ** (16 * torch.rand(rows, cols, generator=g) - 8)
              for _ in range(n)]  # deltas of 1e-8 to 1e8: their squares' float64 sums round at almost every add
    eager = ColumnSums(rows, cols, n, TILE)
    for r0 in range(0, rows, chunk):
        b, *ms = (x[r0 : r0 + chunk] for x in (base, *models))
        eager.add(r0, [(m - b) ** 2 for m in ms])

    fused = ColumnSums(rows, cols, n, TILE, whole_tile_blocks=True)
    shuffle, out_of_turn, shared = random.Random(rows * chunk), [], 0
    real_add = fused._fused.add

    def add(r0, nrows, total, kernel):  # type: ignore[no-untyped-def]
        out_of_turn.append(fused._fused.feeder._next_row != r0)
        return real_add(r0, nrows, total, kernel)

    fused._fused.add = add  # type: ignore[method-assign]

    def block(b0: int, b1: int) -> None:
        b, *ms = (x[b0:b1].reshape(-1).numpy() for x in (base, *models))
        assert fused.add_fused(b0, b1 - b0, lambda *where: k.square_sums(b, tuple(ms), cols, b0, TILE, rows, *where))

    step = 2 * TILE  # blocks of two tiles
    with ThreadPoolExecutor(4) as pool:
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            edges = sorted({r0, r1, *range((r0 // step + 1) * step, r1, step)})
            blocks = list(zip(edges, edges[1:]))
            block(*blocks[0])  # (the first block of the tensor starts the fused path; a chunk's may start mid-tile)
            assert fused.any_order()
            rest = blocks[1:]
            shuffle.shuffle(rest)
            earliest = min(rest, default=None)
            rest.sort(key=lambda b: b == earliest)  # (the earliest taken last: the others wait for it)
            shared += len(rest) > 1
            list(pool.map(lambda b: block(*b), rest))
    assert fused.finish() == eager.finish()
    assert np.array_equal(fused.column_totals(), eager.column_totals())
    assert any(out_of_turn) or not shared, "no block ran out of turn"


def test_fused_column_sums_refuse_a_block_out_of_turn_that_starts_inside_a_tile():
    """Only whole-tile blocks may run out of turn: one starting inside a tile is refused, nothing added."""
    import numpy as np

    from streammerge.methods._tiles import ColumnSums

    sums = ColumnSums(300, 4, 1, TILE, whole_tile_blocks=True)
    calls: list[int] = []
    assert not sums.any_order()
    assert sums.add_fused(0, 10, lambda slot0, acc, partial: calls.append(slot0))
    assert sums.any_order() and calls == [-1]
    assert not sums.add_fused(70, 10, lambda *where: calls.append(1))  # out of turn, inside a tile
    assert sums.add_fused(128, 64, lambda slot0, acc, partial: calls.append(slot0) or acc.fill(1.0))
    assert calls == [-1, 2] and np.array_equal(sums.column_totals(), np.zeros((1, 4)))  # waits for rows 10..128
    assert not ColumnSums(300, 4, 1, TILE).any_order()  # blocks that are not whole tiles stay in turn


#: column sums of 4 inputs (DARE's L1 pass over two models: |Δ| and the kept |Δ| of each) of a Qwen2-0.5B
#: down_proj-wide tensor, fed in 10-row blocks (a small --max-ram); prints the peak RSS growth over one tile's stash
STASH_PEAK = textwrap.dedent("""
    import torch
    from streammerge.methods._tiles import ColumnSums
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    rows, rn, n, tile = 896, 4864, 4, 64
    xs = [torch.rand(rows, rn) for _ in range(n)]
    warm = ColumnSums(rows, 8, n, tile)  # the code paths' first calls, before the measure
    for r0 in range(0, 320, 10):
        warm.add(r0, [x[r0 : r0 + 10, :8] for x in xs])
    sums = ColumnSums(rows, rn, n, tile)
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        raise SystemExit("no clear_refs")
    before = status("VmRSS")
    for r0 in range(0, 320, 10):
        sums.add(r0, [x[r0 : r0 + 10] for x in xs])
    print((status("VmHWM") - before) / (8 * n * tile * rn))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rows_of_a_tile_split_across_small_blocks_are_stashed_once():
    """The stash is one tile per input, filled in place: blocks smaller than a tile cost that stash and the block's
    own float64 copies (1.15 stashes measured). Concatenating the stash with each block and stacking the inputs
    peaked at 2.27."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1",
                "OMP_NUM_THREADS": "1"})  # freed blocks leave the RSS at once
    run = subprocess.run([sys.executable, "-c", STASH_PEAK], capture_output=True, text=True, env=env)
    if "no clear_refs" in run.stderr:
        pytest.skip("the peak RSS cannot be reset here (/proc/self/clear_refs)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) < 1.5


@pytest.mark.parametrize("cols", [1, 5])
def test_cpu_column_sums_add_each_column_in_row_order(cols):
    """Every column of a tile is summed from 0 in row order (the fused kernels' order) whatever the block's width
    or layout: numpy sums a single column (a 1-D tensor's rows, one input at a time) or a column-major block
    pairwise, which gave other bits than the fused path's."""
    rng = np.random.default_rng(0)
    rows = 200
    for _ in range(10):
        x = rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-8, 8, (rows, cols))
        expected = np.zeros(cols)
        for t0 in range(0, rows, TILE):
            tile_sum = np.zeros(cols)
            for r in range(t0, min(t0 + TILE, rows)):
                tile_sum = tile_sum + x[r]
            expected = expected + tile_sum
        for layout in (x, np.asfortranarray(x)):
            acc = torch.zeros(cols, dtype=torch.float64)
            add_column_sums(acc, torch.from_numpy(layout), TILE)
            assert acc.numpy().tobytes() == expected.tobytes()


def test_rows_that_complete_a_stashed_tile_must_match_the_stash():
    """A tile split across chunks is completed in the stash: rows of another dtype would be cast silently."""
    feeder = TileFeeder(100, TILE)
    assert list(feeder.feed(0, [torch.zeros(10, 3, dtype=torch.bfloat16)])) == []
    assert feeder.stashed
    with pytest.raises(ValueError, match="complete a stashed tile"):
        list(feeder.feed(10, [torch.zeros(60, 3, dtype=torch.float32)]))
