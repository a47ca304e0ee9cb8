"""Chunk-independent float64 reductions over rows.

Summing rows in whatever chunks the budget allows would make the last bits of a sum depend on the chunk size.
:class:`RowTileSum` fixes the reduction order instead: rows are grouped into aligned tiles of ``TILE`` rows
(rows [0, 64), [64, 128), ...), each tile is reduced with one ``sum(dim=0)`` of the same shape, and tile partials
are added in row order. Rows of a tile split across chunks are stashed until the tile is complete, so the
result is bit-identical for every chunking.
"""

from __future__ import annotations

import torch

TILE = 64


class RowTileSum:
    """Accumulates, in float64, ``sum over rows`` of tensors shaped (rows, *rest) in a fixed order.

    Values may be float32 (each tile is then summed with float64 accumulation) or float64.
    """

    def __init__(self, rest_shape: tuple[int, ...]) -> None:
        self.total = torch.zeros(rest_shape, dtype=torch.float64)
        self._pending: torch.Tensor | None = None
        self._next_row = 0

    def add(self, r0: int, values: torch.Tensor) -> None:
        """Add rows [r0, r0 + len(values)); chunks must arrive in row order."""
        if r0 != self._next_row:
            raise RuntimeError(f"rows must arrive in order: expected row {self._next_row}, got {r0}")
        self._next_row += values.shape[0]
        if self._pending is not None:
            values = torch.cat([self._pending, values])
            self._pending = None
        full = values.shape[0] // TILE * TILE
        for start in range(0, full, TILE):
            self.total += values[start : start + TILE].sum(dim=0, dtype=torch.float64)
        if full < values.shape[0]:
            self._pending = values[full:].clone()

    def finish(self) -> torch.Tensor:
        """The total, after adding the final partial tile."""
        if self._pending is not None:
            self.total += self._pending.sum(dim=0, dtype=torch.float64)
            self._pending = None
        return self.total


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View a chunk as (rows, elements per row); a 0-D tensor is one row of one element."""
    return x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)


class PairSums:
    """Chunk-independent float64 sums over a whole tensor of products ``Σ a_i·b_i`` for several (a, b) pairs."""

    def __init__(self, row_numel: int, pairs: int) -> None:
        self._tiles = RowTileSum((pairs, row_numel))

    def add(self, r0: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        first = as_rows(pairs[0][0])
        vals = torch.empty((first.shape[0], len(pairs), first.shape[1]), dtype=torch.float64)
        for i, (a, b) in enumerate(pairs):
            torch.mul(as_rows(a).to(torch.float64), as_rows(b).to(torch.float64), out=vals[:, i])
        self._tiles.add(r0, vals)

    def finish(self) -> list[float]:
        return [float(x) for x in self._tiles.finish().sum(dim=1)]
