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

from collections.abc import Iterator, Sequence

import numpy as np

from .._torch import torch

#: tiles handed out together, so per-operation overheads (thread wake-ups) are paid per block, not per tile
BLOCK_TILES = 8


class TileFeeder:
    """Regroups row chunks of several same-shaped tensors into blocks of whole aligned tiles.

    A block starts on a tile boundary and holds up to ``BLOCK_TILES`` complete tiles (the tensor's last block may
    end with a shorter tile); rows of a tile split across chunks are stashed until it is complete.
    """

    def __init__(self, rows: int, tile: int) -> None:
        self.rows = rows
        self.tile = tile
        self._pending: list[torch.Tensor] | None = None
        self._next_row = 0

    def feed(self, r0: int, parts: Sequence[torch.Tensor]) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Yield (first row, blocks) for the tiles completed by rows [r0, r0 + len); chunks in row order."""
        if r0 != self._next_row:
            raise RuntimeError(f"rows must arrive in order: expected row {self._next_row}, got {r0}")
        n = parts[0].shape[0]
        self._next_row += n
        parts = list(parts)
        if self._pending is not None:
            # complete the stashed tile with just the rows it lacks
            have = self._pending[0].shape[0]
            take = min(self.tile - have, n)
            merged = [torch.cat([p, x[:take]]) for p, x in zip(self._pending, parts)]
            self._pending = None
            if have + take < self.tile and r0 + take < self.rows:
                self._pending = merged
                return
            yield r0 - have, merged
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
            self._pending = [p[full:].clone() for p in parts]


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
                out += np.add.reduce(arr[start : start + tile], axis=0, dtype=np.float64)
        return
    add_tile_tree_sums(acc, rows, tile)


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

    def __init__(self, rows: int, row_numel: int, n_sums: int, tile: int) -> None:
        self.rows, self.row_numel = rows, row_numel
        self.n_sums = n_sums
        self.tile = tile
        self._feeder = TileFeeder(max(rows, 1), tile)
        self._size = n_sums * row_numel
        self._total: torch.Tensor | None = None  # (n_sums · row_numel) per-column sums, on the first chunk's device
        self._partial: np.ndarray | None = None  # fused kernels: the sums of the tile in progress

    @staticmethod
    def per_element(n_inputs: int) -> int:
        """Bytes per block element while adding: float64 copies of the inputs and their stacked copy."""
        return 16 * n_inputs

    def _block_values(self, block: list[torch.Tensor]) -> torch.Tensor:
        """(rows, n_sums, row_numel) values to sum, from a block of whole tiles of the float64 inputs."""
        return torch.stack(block, dim=1)

    def add(self, r0: int, tensors: Sequence[torch.Tensor]) -> None:
        for _, block in self._feeder.feed(r0, [as_rows(t).to(torch.float64) for t in tensors]):
            vals = self._block_values(block)
            if self._total is None:
                self._total = torch.zeros(self._size, dtype=torch.float64, device=vals.device)
            add_column_sums(self._total, vals, self.tile)

    def raw_accumulators(self, r0: int, rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """For a fused kernel that adds rows ``[r0, r0 + rows)`` itself, in this class's order
        (``kernels._numba.l1_sums``): the float64 accumulator and the sums of the tile in progress, as numpy arrays
        (the kernel updates both); None when the eager path holds stashed rows or the sums are on a GPU. Every
        block of a tensor takes one path (the engine decides per tensor), so the two never mix."""
        feeder = self._feeder
        if feeder._next_row != r0 or feeder._pending is not None:
            return None
        if self._total is None:
            self._total = torch.zeros(self._size, dtype=torch.float64)
        elif self._total.device.type != "cpu":
            return None
        if self._partial is None:
            self._partial = np.zeros(self._size, dtype=np.float64)
        feeder._next_row = r0 + rows  # (the eager path's order check)
        return self._total.numpy(), self._partial

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
        """Bytes per block element while adding: float64 copies of the inputs, the products and their stacked copy."""
        return 8 * (n_inputs + 2 * n_pairs)

    @staticmethod
    def accumulator_bytes(n_pairs: int, row_numel: int) -> int:
        return 8 * n_pairs * row_numel

    @staticmethod
    def partial_tile_bytes(n_inputs: int, n_pairs: int, rows: int, row_numel: int, tile: int) -> int:
        """What blocks that are not whole tiles add: an incomplete tile of every input stashed (float64), and one
        whole tile's products with their stacked copy."""
        return (n_inputs + 2 * n_pairs) * min(rows, tile) * row_numel * 8

    @staticmethod
    def gpu_state_bytes(n_inputs: int, n_pairs: int, rows: int, row_numel: int, tile: int) -> int:
        """On a GPU (measured on an H100): the stash with its merged copy, and one tile's products with the tree
        scratch."""
        return 2 * n_inputs * min(rows, tile) * row_numel * 8 + tile_products_bytes(n_pairs, rows, row_numel, 8, True,
                                                                                     tile)

    def __init__(self, rows: int, row_numel: int, pairs: Sequence[tuple[int, int]], tile: int) -> None:
        self.pairs = list(pairs)
        super().__init__(rows, row_numel, len(self.pairs), tile)

    def _block_values(self, block: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([block[i] * block[j] for i, j in self.pairs], dim=1)  # (rows, pairs, row_numel)

    def add_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], use_base: bool) -> bool:
        """:meth:`add` of ``[M_k − B]`` (``use_base``) or ``[M_k]`` from the stored rows, by the fused kernel
        ``pair_sums`` (the same sums); False when the inputs are not a kernel's (the caller then adds eagerly)."""
        from .. import kernels  # noqa: PLC0415

        got = kernels.arrays(base, models)
        rows = base.shape[0] if base.dim() else 0
        accumulators = self.raw_accumulators(r0, rows) if got is not None and rows else None
        if accumulators is None:
            return False
        b, ms, _ = got  # type: ignore[misc]
        first = np.array([i for i, _ in self.pairs], dtype=np.int64)
        second = np.array([j for _, j in self.pairs], dtype=np.int64)
        kernels.kernels().pair_sums(b, ms, use_base, first, second, self.row_numel, r0, self.tile, self.rows,
                                    *accumulators)
        return True
