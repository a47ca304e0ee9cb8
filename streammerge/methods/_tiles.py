"""Chunk-independent float64 reductions over rows.

Summing rows in whatever chunks the budget allows would make the last bits of a sum depend on the chunk size.
Instead, rows are regrouped into aligned tiles of ``tile`` rows (the plan's ``tile``, 64: rows [0, 64), [64, 128),
...; the tensor's last tile may be shorter) by :class:`TileFeeder`, which stashes the rows of a tile split across chunks until it is
complete and hands out blocks of whole tiles. Every tile is reduced with the same operation on the same shape,
and tile partials are added to the accumulator one by one in row order (however the tiles were grouped into
blocks), so a result is bit-identical for every chunking. CPU reductions use
numpy (single-threaded, float64 accumulation), which is deterministic and does not depend on thread counts. On a
GPU, a reduction kernel's order can depend on where an element lies in memory (its alignment decides which lanes
take it), so two equal columns of products could sum to different last bits, and WIDEN's exact zero divergences
(a row no model changed) would turn into noise that reorders rank ties. GPU sums therefore use :func:`tree_sum`,
a fixed pairwise tree of elementwise adds: every output element is added in the same order wherever it lies.
GPU and CPU sums agree within float tolerance, and equal inputs give bit-equal sums on both.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._torch import torch

if TYPE_CHECKING:
    from .base import TensorTask

#: tiles handed out together, so per-operation overheads (thread wake-ups) are paid per block, not per tile
BLOCK_TILES = 8


class TileFeeder:
    """Regroups row chunks of several same-shaped tensors into blocks of whole aligned tiles.

    A block starts on a tile boundary and holds up to ``BLOCK_TILES`` complete tiles (the tensor's last block may
    end with a shorter tile); rows of a tile split across chunks are copied into one tile-sized stash per tensor
    (allocated on the first split, kept until the tensor's last rows), and the completed tile is handed out as views
    of the stash. A consumer uses each block before asking for the next: the stash is refilled in place.
    """

    def __init__(self, rows: int, tile: int) -> None:
        self.rows = rows
        self.tile = tile
        self._stash: list[torch.Tensor] | None = None  # (tile, ...) per tensor: the rows of a split tile
        self._stashed = 0  # rows in the stash
        self._next_row = 0

    @property
    def stashed(self) -> bool:
        """Whether rows of an incomplete tile wait in the stash (the eager path fed a chunk that ended inside one)."""
        return self._stashed > 0

    def _stash_rows(self, at: int, parts: Sequence[torch.Tensor]) -> None:
        """Copy ``parts`` (a few rows each) into the stash from row ``at``, allocating it on first use."""
        def fits(stash: list[torch.Tensor]) -> bool:
            return len(stash) == len(parts) and all(s.dtype == p.dtype and s.device == p.device
                                                    and s.shape[1:] == p.shape[1:] for s, p in zip(stash, parts))

        if at == 0 and (self._stash is None or not fits(self._stash)):
            rows = min(self.tile, self.rows)
            self._stash = [torch.empty((rows, *p.shape[1:]), dtype=p.dtype, device=p.device) for p in parts]
        elif self._stash is None or not fits(self._stash):
            raise ValueError("the rows that complete a stashed tile must have the stashed rows' number of tensors, "
                             "dtypes, devices and row shapes")
        for s, p in zip(self._stash, parts):
            s[at : at + p.shape[0]].copy_(p)
        self._stashed = at + parts[0].shape[0]

    def feed(self, r0: int, parts: Sequence[torch.Tensor]) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield (first row, blocks) for the tiles completed by rows [r0, r0 + len); chunks in row order."""
        if r0 != self._next_row:
            raise RuntimeError(f"rows must arrive in order: expected row {self._next_row}, got {r0}")
        n = parts[0].shape[0]
        self._next_row += n
        parts = list(parts)
        if self._stashed:  # complete the stashed tile with just the rows it lacks
            have = self._stashed
            take = min(self.tile - have, n)
            self._stash_rows(have, [x[:take] for x in parts])
            if have + take < self.tile and r0 + take < self.rows:
                return
            assert self._stash is not None
            self._stashed = 0
            yield r0 - have, [s[: have + take] for s in self._stash]
            parts = [x[take:] for x in parts]
            r0 += take
            n -= take
        full = n // self.tile * self.tile
        last = r0 + n >= self.rows
        end = n if last else full  # the tensor's last, shorter tile goes with the final block
        step = BLOCK_TILES * self.tile
        for start in range(0, end, step):
            yield r0 + start, [p[start : min(start + step, end)] for p in parts]
        if not last and full < n:
            self._stash_rows(0, [p[full:] for p in parts])
        elif last:
            self._stash = None  # the tensor's rows are all in


class FusedTiles:
    """Where the fused column-sums kernels (``kernels._numba._close_tile``) add the blocks of one tensor, in the
    order of :func:`add_column_sums`: each aligned tile summed from 0 in row order, tile sums added to the running
    total in row order.

    A block in turn (it starts where the rows added so far end) adds into the total and the tile in progress
    directly. A block that starts on a tile boundary may also run out of turn, on any thread (idle workers sharing a
    chunk: workers.JobQueue.run_blocks): its tiles' sums go into slots of its own, which wait until every row before
    the block is added; whichever block completes that run then adds them to the total one by one, and hands its
    last, unfinished tile on as the tile in progress. The same float64 adds in the same order: the same bits, in any
    order of the blocks. What waits is at most a chunk's finished tiles (:meth:`ahead_bytes_per_row` per row) and
    the unfinished one its last block leaves, beside the tile in progress of each block being computed."""

    def __init__(self, feeder: TileFeeder, size: int) -> None:
        self.feeder, self.size = feeder, size  # (the feeder's next row is the rows added so far, either path)
        self.partial: np.ndarray | None = None  # (size,) float64: the sums of the tile in progress
        #: a kernel has added a block: the tensor's blocks take this path, and may come in any order from now on
        self.started = False
        # by first row: rows, the finished tiles' sums, the unfinished last tile's (None when every tile closed)
        self._waiting: dict[int, tuple[int, np.ndarray, np.ndarray | None]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def ahead_bytes_per_row(size: int, tile: int) -> int:
        """The slots of a block out of turn, per row: a float64 ``size``-vector per tile."""
        return -(-8 * size // max(tile, 1))

    def add(self, r0: int, rows: int, total: np.ndarray,
            kernel: Callable[[int, np.ndarray, np.ndarray], None]) -> bool:
        """Rows ``[r0, r0 + rows)`` by ``kernel(slot0, acc, partial)`` (the column-sums kernels' last arguments:
        slot0 -1, acc the total as (1, size); or the block's first tile and its zeroed (tiles, size) slots, partial
        zeroed). ``total``: the running sums, (size,) float64, the same array at every call. False, having done
        nothing, when the eager path holds stashed rows (:class:`TileFeeder`), or the block is out of turn and
        starts inside a tile (the engine shares only blocks of whole tiles: ``TensorTask.whole_tile_blocks``)."""
        feeder, tile = self.feeder, self.feeder.tile
        with self._lock:
            in_turn = feeder._next_row == r0
            if feeder.stashed or (not in_turn and r0 % tile):
                return False
            if self.partial is None:
                self.partial = np.zeros(self.size)
        if in_turn:  # nothing else moves the cursor or touches the sums until this block is added
            kernel(-1, total.reshape(1, -1), self.partial)
        else:
            ends = r0 + rows == feeder.rows
            closed = rows // tile + (1 if rows % tile and ends else 0)
            slots, last = np.zeros((closed, self.size)), np.zeros(self.size)
            kernel(r0 // tile, slots, last)
            if not rows % tile or ends:  # every tile closed: nothing to hand on (the kernel zeroed it)
                last = None
        with self._lock:
            self.started = True
            if in_turn:
                feeder._next_row = r0 + rows
            else:
                self._waiting[r0] = (rows, slots, last)
            while (ready := self._waiting.pop(feeder._next_row, None)) is not None:
                n, tiles, last = ready
                for tile_sums in tiles:  # (every tile before these is added: the tile in progress is zero)
                    total += tile_sums
                if last is not None:
                    self.partial[:] = last
                feeder._next_row += n
        return True


def add_column_sums(acc: torch.Tensor, values: torch.Tensor, tile: int) -> None:
    """Add to ``acc`` (float64, flat, on the values' device) the sums over dim 0 of a block of (rows, ...) values,
    one aligned tile of ``tile`` rows at a time in row order: ``((acc + tile_0) + tile_1) + ...``, so the result
    does not depend on how the tiles were grouped into blocks. A tile is reduced on the CPU by numpy's outer-axis
    reduction (sequential in row order), on a GPU by :func:`tree_sum`."""
    rows = values.reshape(values.shape[0], -1)
    if rows.device.type == "cpu":
        arr, out = rows.numpy(), acc.numpy()
        with np.errstate(invalid="ignore", over="ignore"):  # a NaN or infinity is reported with its tensor, later
            for start in range(0, arr.shape[0], tile):
                out += row_order_sums(arr[start : start + tile])
        return
    add_tile_tree_sums(acc, rows, tile)


def row_order_sums(rows: np.ndarray) -> np.ndarray:
    """float64 sums over axis 0 of a (rows ≥ 1, N) array, each column added from 0 in row order (the fused
    kernels' order, ``kernels._numba._close_tile``). numpy adds a C-contiguous array's outer axis row after row,
    but reduces a single column, or a column-major array, pairwise: those are summed by a running sum instead."""
    if rows.shape[1] == 1:
        return np.add.accumulate(rows, axis=0, dtype=np.float64)[-1]
    return np.add.reduce(np.ascontiguousarray(rows), axis=0, dtype=np.float64)


def add_tile_tree_sums(acc: torch.Tensor, rows: torch.Tensor, tile: int) -> None:
    """The device path of :func:`add_column_sums` for (rows, elements): each tile by :func:`tree_sum`."""
    full = rows.shape[0] // tile * tile
    if full:
        tiles = tree_sum(rows[:full].reshape(full // tile, tile, -1), dim=1)  # (tiles, elements), one pass
        for i in range(tiles.shape[0]):
            acc += tiles[i]
    if full < rows.shape[0]:  # the tensor's last, shorter tile
        acc += tree_sum(rows[full:], dim=0)


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """float64 sums over the last dim (on the CPU numpy's pairwise sum: fixed order for a given length; the fused
    ``widen_row_sums`` kernel reproduces that order bit for bit, so the two change together)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.add.reduce(values.numpy(), axis=-1, dtype=np.float64))
    return tree_sum(values, dim=-1)


def tree_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 sum over ``dim`` by a fixed pairwise tree of elementwise adds (halve, add the halves; an odd last
    element joins the first). Every output element is summed in the same order, whatever its position in memory.
    One float64 scratch of half of ``x``'s elements (float32 values widen exactly); later levels add in place."""
    n = x.shape[dim]
    if n <= 1:
        if n == 0:
            shape = list(x.shape)
            del shape[dim]
            return torch.zeros(shape, dtype=torch.float64, device=x.device)
        return x.to(torch.float64, copy=True).squeeze(dim)
    h = n // 2
    acc = x.narrow(dim, 0, h).to(torch.float64, copy=True)
    acc += x.narrow(dim, h, h)
    if n % 2:
        acc.narrow(dim, 0, 1).add_(x.narrow(dim, 2 * h, 1))
    n = h
    while n > 1:  # the halves never overlap, so each level can add in place
        h = n // 2
        acc.narrow(dim, 0, h).add_(acc.narrow(dim, h, h))
        if n % 2:
            acc.narrow(dim, 0, 1).add_(acc.narrow(dim, 2 * h, 1))
        n = h
    return acc.narrow(dim, 0, 1).squeeze(dim)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View a chunk as (rows, elements per row); a 0-D tensor is one row of one element."""
    return x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)


def tile_products_bytes(n_products: int, rows: int, row_numel: int, product_bytes: int, on_gpu: bool,
                        tile: int) -> int:
    """Memory for one whole tile's products (what a completed tile needs even when the chunk that completed it
    is a single row), plus on a GPU :func:`tree_sum`'s float64 scratch for half of them."""
    return n_products * min(rows, tile) * row_numel * (product_bytes + (4 if on_gpu else 0))


class ColumnSums:
    """Chunk-independent float64 sums over a whole tensor of each of several same-shaped inputs (``Σ x``)."""

    def __init__(self, rows: int, row_numel: int, n_sums: int, tile: int, whole_tile_blocks: bool = False) -> None:
        self.rows, self.row_numel = rows, row_numel
        self.whole_tile_blocks = whole_tile_blocks  # TensorTask's: blocks of whole tiles may come out of turn
        self.n_sums = n_sums
        self.tile = tile
        self._feeder = TileFeeder(max(rows, 1), tile)
        self._size = n_sums * row_numel
        self._total: torch.Tensor | None = None  # (n_sums · row_numel) per-column sums, on the first chunk's device
        self._fused = FusedTiles(self._feeder, self._size)  # where fused kernels add their blocks

    @staticmethod
    def per_element(n_inputs: int) -> int:
        """Bytes per block element while adding: the float64 copies of the inputs (each input's sums are added on
        their own, so nothing is stacked)."""
        return 8 * n_inputs

    @staticmethod
    def stash_bytes(n_inputs: int, rows: int, row_numel: int, tile: int) -> int:
        """What blocks that are not whole tiles add: one tile of every input stashed as float64
        (:class:`TileFeeder`)."""
        return 8 * n_inputs * min(rows, tile) * row_numel

    @staticmethod
    def ahead_bytes_per_row(n_sums: int, row_numel: int, task: TensorTask) -> int:
        """Bytes per row of a chunk that blocks added out of turn hold until it is theirs (:class:`FusedTiles`, the
        CPU's fused kernels): ``Footprint.stats_per_chunk_row``."""
        return 0 if task.on_gpu else FusedTiles.ahead_bytes_per_row(n_sums * row_numel, task.tile)

    def _block_values(self, block: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The values of each sum in turn, (rows, row_numel) float64, from a block of whole tiles of the float64
        inputs: the inputs themselves."""
        return iter(block)

    def add(self, r0: int, tensors: Sequence[torch.Tensor]) -> None:
        """Add rows ``[r0, r0 + rows)`` of each input (any shape with rows first, any float dtype; chunks in row
        order). Each sum's columns are added on their own (per element the same adds in the same order as a stacked
        block), so a block never holds more than one sum's values beside its float64 inputs."""
        rn = self.row_numel
        for _, block in self._feeder.feed(r0, [as_rows(t).to(torch.float64) for t in tensors]):
            if self._total is None:
                self._total = torch.zeros(self._size, dtype=torch.float64, device=block[0].device)
            for s, values in enumerate(self._block_values(block)):
                add_column_sums(self._total[s * rn : (s + 1) * rn], values, self.tile)

    def add_fused(self, r0: int, rows: int, kernel: Callable[[int, np.ndarray, np.ndarray], None]) -> bool:
        """:meth:`add` of rows ``[r0, r0 + rows)`` by a fused kernel that sums them itself, in this class's order
        (``kernels._numba.l1_sums``): ``kernel(slot0, acc, partial)`` with its last arguments, as
        :class:`FusedTiles` hands them out (blocks in turn, or starting on a tile boundary, from any thread). False,
        having done nothing, when the eager path holds stashed rows, the sums are on a GPU, or the block is out of
        turn and starts inside a tile. Every block of a tensor takes one path (the plan decides per tensor:
        ``TensorPlan.fused``), so the two never mix."""
        if self._total is None:
            self._total = torch.zeros(self._size, dtype=torch.float64)
        elif self._total.device.type != "cpu":
            return False
        return self._fused.add(r0, rows, self._total.numpy(), kernel)

    def any_order(self) -> bool:
        """Whether the blocks still to add may come in any order, from any thread (the engine may share them with
        idle workers: ``TensorMerge.independent_blocks``): they are whole tiles (``TensorTask.whole_tile_blocks``),
        and the fused path has started (:attr:`FusedTiles.started`), which every later block takes."""
        return self.whole_tile_blocks and self._fused.started

    def column_totals(self) -> np.ndarray:
        """(n_sums, row_numel) float64 sums over the rows, one per element position of a row, on the CPU."""
        if self._total is None:
            return np.zeros((self.n_sums, self._size // max(self.n_sums, 1)))
        return self._total.cpu().numpy().reshape(self.n_sums, -1)

    def finish(self) -> list[float]:
        """One float64 total per sum: the per-column sums added up by numpy (the same on every device)."""
        total = np.zeros(self._size) if self._total is None else self._total.cpu().numpy()
        return [float(x) for x in total.reshape(self.n_sums, -1).sum(axis=1)]


class PairSums(ColumnSums):
    """Chunk-independent float64 sums over a whole tensor of products ``Σ a·b`` for several pairs of inputs.

    ``pairs`` are index pairs into the list of tensors passed to :meth:`add` (e.g. base, model 1, ...).
    """

    @staticmethod
    def per_element(n_inputs: int, n_pairs: int) -> int:  # type: ignore[override]
        """Bytes per block element while adding: float64 copies of the inputs and the products of two pairs (each
        pair's are made and summed in turn; the next pair's are made while the last one's are still referenced)."""
        return 8 * (n_inputs + min(n_pairs, 2))

    @staticmethod
    def accumulator_bytes(n_pairs: int, row_numel: int) -> int:
        return 8 * n_pairs * row_numel

    @staticmethod
    def partial_tile_bytes(n_inputs: int, n_pairs: int, rows: int, row_numel: int, tile: int) -> int:
        """What blocks that are not whole tiles add: an incomplete tile of every input stashed (float64), and one
        whole tile's products of two pairs (:meth:`per_element`)."""
        return (n_inputs + min(n_pairs, 2)) * min(rows, tile) * row_numel * 8

    @staticmethod
    def gpu_state_bytes(n_inputs: int, n_pairs: int, rows: int, row_numel: int, tile: int) -> int:
        """On a GPU (measured on an H100): the stash with its merged copy, and one tile's products with the tree
        scratch."""
        return 2 * n_inputs * min(rows, tile) * row_numel * 8 + tile_products_bytes(n_pairs, rows, row_numel, 8, True,
                                                                                     tile)

    def __init__(self, rows: int, row_numel: int, pairs: Sequence[tuple[int, int]], tile: int,
                 whole_tile_blocks: bool = False) -> None:
        self.pairs = list(pairs)
        super().__init__(rows, row_numel, len(self.pairs), tile, whole_tile_blocks)

    def _block_values(self, block: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        return (block[i] * block[j] for i, j in self.pairs)  # one pair's (rows, row_numel) products at a time

    def add_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], use_base: bool) -> bool:
        """:meth:`add` of ``[M_k − B]`` (``use_base``) or ``[M_k]`` from the stored rows, by the fused kernel
        ``pair_sums`` (the same sums); False when the inputs are not a kernel's (the caller then adds eagerly)."""
        from .. import kernels  # noqa: PLC0415

        got = kernels.arrays(base, models)
        rows = base.shape[0] if base.dim() else 0
        if got is None or not rows:
            return False
        b, ms, _ = got
        first = np.array([i for i, _ in self.pairs], dtype=np.int64)
        second = np.array([j for _, j in self.pairs], dtype=np.int64)
        return self.add_fused(r0, rows, lambda *where: kernels.kernels().pair_sums(
            b, ms, use_base, first, second, self.row_numel, r0, self.tile, self.rows, *where))
