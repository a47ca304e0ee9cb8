"""Chunk-independent float64 reductions over rows.

Summing rows in whatever chunks the budget allows would make the last bits of a sum depend on the chunk size.
Instead, rows are regrouped into aligned tiles of ``TILE`` rows (rows [0, 64), [64, 128), ...; the tensor's last
tile may be shorter) by :class:`TileFeeder`, which stashes the rows of a tile split across chunks until it is
complete and hands out blocks of whole tiles. Every tile is reduced with the same operation on the same shape,
and tile partials are added in row order, so a result is bit-identical for every chunking. CPU reductions use
numpy (single-threaded, float64 accumulation), which is deterministic and does not depend on thread counts; on a
GPU, torch's fixed-shape reductions (deterministic for a given shape; within float tolerance of the CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

TILE = 64


#: tiles handed out together, so per-operation overheads (thread wake-ups) are paid per block, not per tile
BLOCK_TILES = 8


class TileFeeder:
    """Regroups row chunks of several same-shaped tensors into blocks of whole aligned tiles.

    A block starts on a tile boundary and holds up to ``BLOCK_TILES`` complete tiles (the tensor's last block may
    end with a shorter tile); rows of a tile split across chunks are stashed until it is complete.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
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
            take = min(TILE - have, n)
            merged = [torch.cat([p, x[:take]]) for p, x in zip(self._pending, parts)]
            self._pending = None
            if have + take < TILE and r0 + take < self.rows:
                self._pending = merged
                return
            yield r0 - have, merged
            parts = [x[take:] for x in parts]
            r0 += take
            n -= take
        full = n // TILE * TILE
        last = r0 + n >= self.rows
        end = n if last else full  # the tensor's last, shorter tile goes with the final block
        step = BLOCK_TILES * TILE
        for start in range(0, end, step):
            yield r0 + start, [p[start : min(start + step, end)] for p in parts]
        if not last and full < n:
            self._pending = [p[full:].clone() for p in parts]


def column_sums(values: torch.Tensor) -> torch.Tensor:
    """float64 sums over dim 0 of a block of (rows, ...) values, flattened, on the values' device: each aligned tile
    of ``TILE`` rows is reduced on its own (on the CPU sequentially in row order, numpy's outer-axis reduction; on a
    GPU by one fixed-shape reduction), and tile partials are added in order."""
    rows = values.reshape(values.shape[0], -1)
    if rows.device.type == "cpu":
        arr = rows.numpy()
        total = np.add.reduce(arr[:TILE], axis=0, dtype=np.float64)
        for start in range(TILE, arr.shape[0], TILE):
            total += np.add.reduce(arr[start : start + TILE], axis=0, dtype=np.float64)
        return torch.from_numpy(total)
    out = torch.sum(rows[:TILE], dim=0, dtype=torch.float64)
    for start in range(TILE, rows.shape[0], TILE):
        out += torch.sum(rows[start : start + TILE], dim=0, dtype=torch.float64)
    return out


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """float64 sums over the last dim (on the CPU numpy's pairwise sum: fixed order for a given length)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.add.reduce(values.numpy(), axis=-1, dtype=np.float64))
    return torch.sum(values, dim=-1, dtype=torch.float64)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View a chunk as (rows, elements per row); a 0-D tensor is one row of one element."""
    return x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1)


class PairSums:
    """Chunk-independent float64 sums over a whole tensor of products ``Σ a·b`` for several pairs of inputs.

    ``pairs`` are index pairs into the list of tensors passed to :meth:`add` (e.g. base, model 1, ...).
    """

    def __init__(self, rows: int, row_numel: int, pairs: Sequence[tuple[int, int]]) -> None:
        self.pairs = list(pairs)
        self._feeder = TileFeeder(max(rows, 1))
        self._size = len(self.pairs) * row_numel
        self._total: torch.Tensor | None = None  # on the device of the first chunk

    def add(self, r0: int, tensors: Sequence[torch.Tensor]) -> None:
        for _, block in self._feeder.feed(r0, [as_rows(t).to(torch.float64) for t in tensors]):
            vals = torch.stack([block[i] * block[j] for i, j in self.pairs], dim=1)  # (rows, pairs, row_numel)
            sums = column_sums(vals)
            if self._total is None:
                self._total = sums.clone()
            else:
                self._total += sums

    def finish(self) -> list[float]:
        total = np.zeros(self._size) if self._total is None else self._total.cpu().numpy()
        return [float(x) for x in total.reshape(len(self.pairs), -1).sum(axis=1)]  # numpy: the same on every device
