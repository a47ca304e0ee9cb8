"""The shared core of the delta-based methods (task arithmetic, TIES, DARE, Breadcrumbs, DELLA), mergekit 0.1.5's
generalized task arithmetic (``mergekit/merge_methods/generalized_task_arithmetic.py``, ``mergekit/sparsify.py``).

Per tensor, each model's delta ``Δ_k = M_k − B`` goes through three composable steps:

1. a **sparsifier** (:class:`Sparsifier`, chosen by the method's ``sparsifier`` attribute) keeps some elements:
   ``Magnitude`` (TIES: the top ``density`` share of ``|Δ|``, at least one element), ``Outliers`` (Breadcrumbs:
   drop the top ``gamma`` share, keep the next ``density`` share), ``Bernoulli`` (DARE: each element with
   probability ``density``), ``MagPrune`` (DELLA: per row, probabilities from ``density − ε`` to ``density + ε`` by
   magnitude rank). Random draws come from a counter-based generator (``_rng``), so they do not depend on chunking.
2. with ``rescale``, the kept elements are scaled back: ``rescale_mode: l1`` (mergekit 0.1.5's
   ``rescaled_masked_tensor``, the default) multiplies them by ``Σ|Δ| / Σ|kept Δ|`` over the whole tensor, so the
   tensor keeps its delta's L1 norm (no scaling when either sum is below 1e-7); ``inverse_density`` divides each
   kept element by its keep probability (the DARE and DELLA papers).
3. the deltas, multiplied by their ``weight``, are combined: summed, or with a **sign consensus** (TIES: the
   elected sign is that of the summed weighted deltas, ``>= 0`` counting as +, and only agreeing elements count);
   ``normalize`` divides by the summed weights of the counted models; the result is scaled by ``lambda`` and added
   to the base.

Passes: exact selections take two statistics passes (radix select, ``_select``); the L1 rescale one more (two
float64 sums per model, chunk-independent, ``_tiles.ColumnSums``); then the merge pass.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import kernels
from .._torch import torch
from ._rng import drop_threshold, keep_mask, stream_key, uniform
from ._select import BINS, NO_CANDIDATES, TopK
from ._tiles import ColumnSums
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

#: bytes of one radix-select histogram (int64 counts)
HISTOGRAM_BYTES = BINS * 8
#: mergekit's ``rescaled_masked_tensor`` leaves a tensor unscaled when either L1 norm is below this
RESCALE_EPS = 1e-7
RESCALE_MODES = ("l1", "inverse_density")


def unit_interval(x: float) -> str | None:
    return None if 0.0 <= x <= 1.0 else "must be between 0 and 1"


def finite(x: float) -> str | None:
    return None if abs(x) < float("inf") else "must be finite"


def one_of(*choices: str):  # type: ignore[no-untyped-def]
    def check(x: str) -> str | None:
        return None if x in choices else f"must be one of {', '.join(choices)}"
    return check


WEIGHT = ParamSpec("weight", float, 1.0, "scale of each model's delta", per_model=True, check=finite)
DENSITY = ParamSpec("density", float, 1.0, "share of each model's delta elements kept", per_model=True,
                    check=unit_interval)
GAMMA = ParamSpec("gamma", float, 0.01, "share of the largest |delta| elements removed (Breadcrumbs)", per_model=True,
                  check=unit_interval)
EPSILON = ParamSpec("epsilon", float, 0.15, "spread of DELLA's keep probabilities: density ± epsilon from the "
                    "smallest to the largest |delta| of a row", per_model=True, check=unit_interval)
LAMBDA = ParamSpec("lambda", float, 1.0, "scale of the merged delta added to the base", check=finite)
SEED = ParamSpec("seed", int, 0, "seed of the counter-based drop masks (same masks for any chunking or device)")
RESCALE_MODE = ParamSpec("rescale_mode", str, "l1", "how rescale scales the kept deltas back: l1, each tensor keeps "
                         "its delta's L1 norm (mergekit 0.1.5); inverse_density, each kept element is divided by its "
                         "keep probability (the DARE and DELLA papers)", check=one_of(*RESCALE_MODES))


def normalize_param(default: bool) -> ParamSpec:
    return ParamSpec("normalize", bool, default, "divide by the summed weights of the models counted at each element")


def rescale_params(default: bool) -> tuple[ParamSpec, ParamSpec]:
    """``rescale`` (mergekit's default per method) and ``rescale_mode`` (l1, mergekit 0.1.5's meaning)."""
    return (ParamSpec("rescale", bool, default, "scale the kept deltas back after sparsifying (how: rescale_mode)"),
            RESCALE_MODE)


# --------------------------------------------------------------------------------------------------------------
# Sparsifiers: one per model and tensor
# --------------------------------------------------------------------------------------------------------------


class Sparsifier:
    """One model's sparsification of its delta on one tensor.

    Statistics passes (``passes`` of them, fed ``|Δ|`` chunks in row order) come first; then :meth:`keep` gives the
    keep factor of each chunk, in row order. Subclasses set ``passes`` and implement :meth:`keep`.
    """

    passes = 0
    #: :meth:`keep` reads the magnitudes (else only the chunk's shape and device: the merge pass skips ``|Δ|``)
    needs_magnitude = True

    def __init__(self, task: TensorTask, params: Mapping[str, Any], k: int) -> None:
        self.task, self.k = task, k
        self.density = params["density"][k]

    def accumulate(self, pass_index: int, absd: torch.Tensor) -> None:
        """Feed one chunk's ``|Δ|`` (float32, the chunk's shape) to statistics pass ``pass_index``."""

    def end_pass(self, pass_index: int) -> None:
        """After the last chunk of a statistics pass."""

    def keep(self, r0: int, absd: torch.Tensor, inverse_density: bool = False) -> torch.Tensor | None:
        """float32 factor for the chunk starting at row ``r0`` (``|Δ|`` given; the delta itself where
        ``needs_magnitude`` is false, only its shape and device being read): 1 kept, 0 dropped, or with
        ``inverse_density`` 1/p for a kept element of keep probability p; None when every element is kept as it is."""
        raise NotImplementedError

    def rewind(self) -> None:
        """Make :meth:`keep` start again at row 0 (after a statistics pass that used it)."""

    def export(self) -> list[int]:
        """What the statistics passes found, as integers (journaled)."""
        return []

    def restore(self, exported: list[int]) -> None:
        """Restore :meth:`export`'s result."""

    def cursor(self) -> list[int]:
        """Emit state after the last chunk (for selections that count ties in row order)."""
        return []

    def restore_cursor(self, cursor: list[int]) -> None:
        """Continue after the chunk whose :meth:`cursor` this is."""

    @property
    def active(self) -> bool:
        """Whether anything is dropped (density below 1)."""
        return self.density < 1


def _inverse(factor: torch.Tensor, p: float) -> torch.Tensor:
    return factor.div_(p) if p > 0 else factor


class _Selection(Sparsifier):
    """Keep the elements of descending ``|Δ|`` rank in ``[lo, hi)`` (ties by flat index): ``top(hi) − top(lo)``,
    each found exactly by radix select (two passes)."""

    passes = 2

    def __init__(self, task: TensorTask, params: Mapping[str, Any], k: int, lo: int, hi: int) -> None:
        super().__init__(task, params, k)
        n = task.numel
        self.hi = TopK(hi, n)
        self.lo = TopK(lo, n) if lo > 0 else None
        # the tie cursors (:meth:`cursor`) at the start of each block of a chunk whose blocks are computed out of
        # order (:meth:`start_blocks`), by the block's first row; None: blocks come in row order
        self._starts: dict[int, list[int]] | None = None

    def _topks(self) -> list[TopK]:
        return [s for s in (self.hi, self.lo) if s is not None]

    def counting(self, pass_index: int) -> list[TopK]:
        """The TopKs that count pass ``pass_index``'s histograms: in pass B each non-trivial one (its own target
        bin) that pass A's candidates did not settle (``TopK.early``); in pass A only the first, as every TopK of the
        selection counts the same ``|Δ|`` (the others take its counts at the end of the pass: Breadcrumbs' two
        thresholds, one histogram)."""
        topks = self.nontrivial()
        return topks[:1] if pass_index == 0 else [s for s in topks if not s.early]

    def nontrivial(self) -> list[TopK]:
        """The TopKs that select something: in pass A each keeps its own candidates for pass B
        (``TopK.collect_args``)."""
        return [s for s in self._topks() if not s.trivial]

    def accumulate(self, pass_index: int, absd: torch.Tensor) -> None:
        if pass_index == 0:
            for s in self.nontrivial():  # counted eagerly: pass B will run
                s.stop_collecting()
        for s in self.counting(pass_index):
            (s.pass_a if pass_index == 0 else s.pass_b)(absd)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            counted = self.counting(0)
            for s in self._topks():
                if counted and s is not counted[0]:
                    s.share_high(counted[0])
        for s in self._topks():
            (s.end_a if pass_index == 0 else s.end_b)()

    def keep(self, r0: int, absd: torch.Tensor, inverse_density: bool = False) -> torch.Tensor | None:
        if not self.active:
            return None
        seen = self._starts[r0] if self._starts is not None else [None, None]
        keep = self.hi.factor(absd, seen[0])
        if self.lo is not None:  # the top lo are inside the top hi, so keep_hi − keep_lo is 0 or 1
            drop = self.lo.factor(absd, seen[1])
            if drop is not None:
                keep = drop.neg_().add_(1) if keep is None else keep.sub_(drop)
            elif keep is not None:
                keep.zero_()
            else:
                keep = torch.zeros_like(absd)
        if keep is None:
            keep = torch.ones_like(absd)
        return _inverse(keep, self.density) if inverse_density else keep

    def rewind(self) -> None:
        for s in self._topks():
            s.seen_ties = 0

    def kernel_spec(self, r0: int) -> list[int] | None:
        """What :meth:`keep` keeps from the block at row ``r0``, for the fused kernel: the hi TopK's (tau, ties to
        keep) then the lo one's (``TopK.kernel_spec``; without a lo, a tau that drops nothing); None when nothing is
        dropped."""
        if not self.active:
            return None
        seen = self._starts[r0] if self._starts is not None else [None, None]
        return [*self.hi.kernel_spec(seen[0]),
                *(self.lo.kernel_spec(seen[1]) if self.lo is not None else (1 << 31, 0))]

    def met_ties(self, hi: int, lo: int) -> None:
        """Advance the tie cursors past a fused block that met ``hi`` and ``lo`` elements equal to each tau (not
        for blocks out of order: :meth:`start_blocks` advanced them)."""
        if self._starts is not None:
            return
        self.hi.met_ties(hi)
        if self.lo is not None:
            self.lo.met_ties(lo)

    @property
    def open_ties(self) -> bool:
        """Whether what a block keeps depends on the ties met before it (``TopK.open_ties``)."""
        return self.active and any(s.open_ties for s in self._topks())

    def start_blocks(self, starts: Sequence[int], met: Sequence[tuple[int, int]]) -> None:
        """Blocks beginning at rows ``starts`` (a chunk's, in row order) that meet ``met`` (hi, lo) elements equal
        to each tau (``kernels._numba.tie_counts``) are computed next, in any order: each block's tie cursors are
        found here, as blocks in row order would leave them, and the cursors move past the chunk."""
        topks, starts_of = self._topks(), {}
        seen = self.cursor()
        for r0, counts in zip(starts, met):
            starts_of[r0] = seen + [None] * (2 - len(seen))
            seen = [s.advanced(x, c) for s, x, c in zip(topks, seen, counts)]
        self.restore_cursor(seen)
        self._starts = starts_of

    def end_blocks(self) -> None:
        """The blocks of :meth:`start_blocks` are done: blocks come in row order again."""
        self._starts = None

    @property
    def out_of_order(self) -> bool:
        """Between :meth:`start_blocks` and :meth:`end_blocks`."""
        return self._starts is not None

    def export(self) -> list[int]:
        return [x for s in self._topks() for x in s.export()]

    def restore(self, exported: list[int]) -> None:
        for i, s in enumerate(self._topks()):
            s.restore(exported[3 * i: 3 * i + 3])

    def cursor(self) -> list[int]:
        return [s.seen_ties for s in self._topks()]

    def restore_cursor(self, cursor: list[int]) -> None:
        for s, seen in zip(self._topks(), cursor):
            s.seen_ties = seen


class Magnitude(_Selection):
    """TIES's trim: the top ``density`` share of ``|Δ|``; a positive density keeps at least one element
    (mergekit's ``magnitude``)."""

    def __init__(self, task: TensorTask, params: Mapping[str, Any], k: int) -> None:
        d, n = params["density"][k], task.numel
        keep = n if d >= 1 else (0 if d <= 0 or n == 0 else max(1, int(d * n)))
        super().__init__(task, params, k, 0, keep)


class Outliers(_Selection):
    """Breadcrumbs: drop the ``gamma`` share of largest ``|Δ|`` and keep the next ``density`` share (the outlier
    removal shrinks when there are not enough elements left; mergekit's ``magnitude_outliers``)."""

    def __init__(self, task: TensorTask, params: Mapping[str, Any], k: int) -> None:
        d, g, n = params["density"][k], params["gamma"][k], task.numel
        if d >= 1:
            super().__init__(task, params, k, 0, n)
            return
        target, top = int(d * n), int(g * n)
        top = min(top, n - target)
        super().__init__(task, params, k, top, top + target)


class Bernoulli(Sparsifier):
    """DARE: keep each element with probability ``density``; dropped iff ``u < 1 − density`` for the element's
    counter-based uniform ``u``."""

    needs_magnitude = False

    def __init__(self, task: TensorTask, params: Mapping[str, Any], k: int) -> None:
        super().__init__(task, params, k)
        self.key = stream_key(params["seed"], k, task.name)

    def keep(self, r0: int, absd: torch.Tensor, inverse_density: bool = False) -> torch.Tensor | None:
        if not self.active:
            return None
        keep = keep_mask(self.key, r0 * self.task.row_numel, absd.numel(), self.density, np.float32, absd.device)
        keep = keep.reshape(absd.shape)
        return _inverse(keep, self.density) if inverse_density else keep


class MagPrune(Sparsifier):
    """DELLA's MAGPRUNE (Deep et al. 2024, arXiv:2406.11617; mergekit's ``della_magprune``): in each row along dim 1
    (a vector is one row), the element of ascending ``|Δ|`` rank ``r`` (1..n, ties by index) is kept with
    probability ``p = (density − ε) + 2ε·(r − 1)/(n − 1)`` (float32, mergekit's order of operations; a row of one
    element gets ``density``), drawn from the counter-based generator: kept iff ``u >= 1 − p``."""

    def __init__(self, task: TensorTask, params: Mapping[str, Any], k: int) -> None:
        super().__init__(task, params, k)
        self.epsilon = params["epsilon"][k]
        self.key = stream_key(params["seed"], k, task.name)
        # the keep decisions of the L1 pass, one bit per element in flat order, written by its kernel (blocks are
        # whole rows, in row order, unless decided ahead: :meth:`decide_ahead`): the merge pass reads them instead
        # of ranking every row again (kernel path only; :meth:`cache_bytes` is in the plan's footprint)
        self._bits: np.ndarray | None = None
        self._bits_rows = 0
        # the decisions of the chunk's blocks were made ahead (:meth:`decide_ahead`): the L1 pass reads them
        self.decided_ahead = False

    @staticmethod
    def cache_bytes(task: TensorTask) -> int:
        """Bytes of the remembered keep decisions of one model's tensor (:meth:`bits_to_fill`)."""
        return -(-task.numel // 8)

    def kernel_table(self) -> tuple[float, float, float]:
        """``(density, spread, low)`` as the kernels take them (``kernels._numba._keep_table``): float32 of the
        density, 2ε and density − ε."""
        density, spread, low = kernels.f32([self.density, 2 * self.epsilon, self.density - self.epsilon])
        return density, spread, low

    def bits_to_fill(self, r0: int, base: torch.Tensor) -> np.ndarray | None:
        """Where the L1 pass's kernel writes the keep decisions of the block of rows from ``r0`` (the tensor's bit
        array, zeroed when the pass starts at row 0): only for a matrix whose blocks come in row order from 0 and
        whose every decision is a 0/1 factor; None otherwise, and nothing is remembered from then on. The block
        counts once :meth:`filled`. Blocks whose decisions were made ahead (:attr:`decided_ahead`) may come in any
        order."""
        if self.decided_ahead and self._bits is not None:
            return self._bits
        if not self.active or base.dim() != 2 or r0 != self._bits_rows:
            self._bits, self._bits_rows = None, -1
            return None
        if self._bits is None:
            self._bits = np.zeros(self.cache_bytes(self.task), dtype=np.uint8)
        return self._bits

    def can_decide_ahead(self) -> bool:
        """Whether a chunk's decisions can be made ahead, block by block in any order, by several threads at once
        (:meth:`decide_ahead`): a matrix whose rows start on whole bytes of the bit array (so blocks write disjoint
        bytes), while its decisions are still being remembered."""
        return self.active and len(self.task.shape) == 2 and self.task.row_numel % 8 == 0 and self._bits_rows >= 0

    def decide_ahead(self, r0: int, base: np.ndarray, model: np.ndarray, lock: threading.Lock) -> None:
        """Make and remember the decisions of the block of rows from ``r0`` (stored rows, flat; the kernel
        ``magprune_bits``, the L1 pass's own ranking) before the L1 pass reaches it, from any thread (``lock``
        guards the bit array's first allocation)."""
        with lock:
            if self._bits is None:
                self._bits = np.zeros(self.cache_bytes(self.task), dtype=np.uint8)
            bits = self._bits
        density, spread, low = self.kernel_table()
        n = self.task.row_numel
        kernels.kernels().magprune_bits(base, model, n, density, spread, low, np.uint64(self.key), r0 * n, bits)

    @property
    def remembering(self) -> bool:
        """Whether the L1 pass's kernel is still writing the decisions to remember (:meth:`bits_to_fill`)."""
        return self.active and self._bits_rows >= 0

    def filled(self, rows: int) -> None:
        """The kernel wrote the decisions of the next ``rows`` rows (:meth:`bits_to_fill`)."""
        if self._bits_rows >= 0:
            self._bits_rows += rows

    def recall(self) -> np.ndarray | None:
        """The bits the L1 pass wrote (:meth:`bits_to_fill`), once it has written every row; else None."""
        return self._bits if self._bits is not None and self._bits_rows == self.task.rows else None

    @property
    def active(self) -> bool:
        return 0 < self.density < 1

    def probabilities(self, absd: torch.Tensor) -> torch.Tensor:
        """float32 keep probabilities of a chunk (its shape)."""
        x = absd.reshape(1, -1) if absd.dim() <= 1 else absd
        n = x.shape[1]
        if n <= 1:
            return torch.full(absd.shape, self.density, dtype=torch.float32, device=absd.device)
        # the 0-based ascending rank of every element (ties by index): one stable sort, its inverse by scattering
        order = ascending_order(x)
        steps = torch.arange(n, dtype=torch.float32, device=x.device).reshape((1, n) + (1,) * (x.dim() - 2))
        ranks = torch.empty(x.shape, dtype=torch.float32, device=x.device).scatter_(1, order, steps.expand(x.shape))
        del order
        # (r − 1) / (n − 1) with mergekit's 1-based r, min 1 and max n
        rank_norm = ranks.div_(n - 1).clamp_(0, 1)
        p = rank_norm.mul_(2 * self.epsilon).add_(self.density - self.epsilon)
        return p.reshape(absd.shape)

    def kernel_factors(self, r0: int, base: torch.Tensor, model: torch.Tensor,
                       inverse_density: bool = False) -> np.ndarray | None:
        """:meth:`keep` of the chunk ``model − base`` (stored rows; a row along dim 1, a vector one row) by the fused
        kernel ``magprune_factors``, flat float32; None where :meth:`keep` is no factor (density 0 or 1), for a
        tensor of more than two dimensions, or inputs a kernel does not take."""
        got = kernels.arrays(base, [model])
        if not 0 < self.density < 1 or base.dim() > 2 or got is None:
            return None
        b, (m,), _ = got
        n = base.shape[1] if base.dim() == 2 else b.shape[0]
        out = np.empty(b.shape[0], dtype=np.float32)
        density, spread, low = self.kernel_table()
        kernels.kernels().magprune_factors(b, m, n, density, spread, low, np.uint64(self.key),
                                           r0 * self.task.row_numel, inverse_density, out)
        return out

    def keep(self, r0: int, absd: torch.Tensor, inverse_density: bool = False) -> torch.Tensor | None:
        if self.density >= 1:
            return None
        if self.density <= 0:
            return torch.zeros_like(absd)
        p = self.probabilities(absd)
        u = uniform(self.key, r0 * self.task.row_numel, absd.numel(), absd.device).reshape(absd.shape)
        keep = (u >= 1.0 - p.to(torch.float64)).to(torch.float32)
        return keep.div_(p) if inverse_density else keep


def ascending_order(x: torch.Tensor) -> torch.Tensor:
    """``torch.argsort(x, dim=1, stable=True)`` of non-negative float32 ``x`` (int64, x's shape): the same order.
    On the CPU each element's key is its float32 bits (monotone for non-negative values, NaN last as torch sorts it)
    above its index, so keys are unique and numpy's in-place sort (3x faster than torch's stable argsort here,
    bench: 75 vs 222 ms for 896 rows of 4864) gives the stable order; the index is the key's low half."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.argsort(x, dim=1, stable=True)
    import numpy as np  # noqa: PLC0415

    n = x.shape[1]
    index = torch.arange(n, dtype=torch.int64).reshape((1, n) + (1,) * (x.dim() - 2))
    keys = (x.contiguous().view(torch.int32).to(torch.int64) << 32).bitwise_or_(index).numpy()
    keys.sort(axis=1)
    np.bitwise_and(keys, 0xFFFFFFFF, out=keys)
    return torch.from_numpy(keys)


SPARSIFIERS: dict[str, type[Sparsifier]] = {"magnitude": Magnitude, "outliers": Outliers, "random": Bernoulli,
                                            "della": MagPrune}


# --------------------------------------------------------------------------------------------------------------
# Consensus
# --------------------------------------------------------------------------------------------------------------


def elected_sign(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """+1 where the summed deltas are >= 0, else −1 (mergekit's ``get_mask(method="sum")``). −0 only where every
    delta is ±0, which no sign keeps; NaN makes the output NaN anyway. Float arithmetic: boolean masks are slow on
    the CPU."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    return torch.ones_like(total).copysign_(total)


def agreement(delta: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """1 where ``sign(delta)`` is the elected sign (0 where it differs or delta is 0); NaN stays NaN."""
    return torch.mul(delta, elected).sign_().clamp_(min=0)


def sign_consensus(deltas: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES's merge of weighted deltas (modified in place): only those agreeing with the elected sign count;
    with ``normalize`` the sum is divided by the summed weights of the agreeing models (1 where none)."""
    elected = elected_sign(deltas)
    divisor = None
    for w, d in zip(weights, deltas):
        agree = agreement(d, elected)
        d.mul_(agree)
        if normalize:
            share = agree.mul_(w) if w != 1.0 else agree
            divisor = share if divisor is None else divisor.add_(share)
    del elected
    mixed = deltas[0]
    for d in deltas[1:]:
        mixed.add_(d)
    if normalize:
        assert divisor is not None
        if min(weights) > 0:  # a 0 divisor only where every term is ±0: any positive divisor keeps them
            mixed.div_(divisor.clamp_(min=min(weights) / 2))
        else:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed


def plain_sum(deltas: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """The weighted deltas summed (in place); ``normalize`` divides by the summed weights (unless ~0)."""
    mixed = deltas[0]
    for d in deltas[1:]:
        mixed.add_(d)
    if normalize:
        divisor = sum(weights)
        mixed.div_(1.0 if abs(divisor) < 1e-8 else divisor)
    return mixed


# --------------------------------------------------------------------------------------------------------------
# The engine's view
# --------------------------------------------------------------------------------------------------------------


class _HelperCounts:
    """The radix-select histograms of the threads that help with a tensor's blocks (``TensorMerge.independent_blocks``):
    the tensor's own worker (the thread that made the merge) counts into each TopK's histogram, any other thread into
    one of its own per TopK (65 536 int64, 512 KiB), added into the TopK's at the end of the pass (:meth:`drain`).

    Memory: a helper is a worker with no tensor of its own left, so its share of the plan (the largest tensor's
    state and block, ``planner._scratch``) is free; what it holds for a helped block, its block temporaries, these
    histograms and the block's candidate scratch (``TopK.scratch_size``, 4 bytes per element and window, within
    the 12 of ``DeltaMethod.footprint``'s eager statistics block), is at most that tensor's own state and block."""

    def __init__(self) -> None:
        self._owner = threading.get_ident()
        self._lock = threading.Lock()
        self._hists: dict[tuple[int, int], tuple[TopK, np.ndarray]] = {}

    def hist(self, topk: TopK, pass_index: int) -> np.ndarray:
        """Where this thread counts ``topk``'s pass ``pass_index`` (0: A, 1: B)."""
        me = threading.get_ident()
        if me == self._owner:
            return (topk.high_counts() if pass_index == 0 else topk.low_counts()[1]).numpy()
        with self._lock:
            got = self._hists.get((me, id(topk)))
            if got is None:
                got = self._hists[(me, id(topk))] = (topk, np.zeros(BINS, dtype=np.int64))
        return got[1]

    def drain(self) -> list[tuple[TopK, np.ndarray]]:
        """The helpers' histograms of the pass that ends, forgotten here."""
        with self._lock:
            got, self._hists = list(self._hists.values()), {}
        return got


@dataclass
class KernelKeeps:
    """How each of N models' keep factors reach ``sparse_merge``/``l1_sums`` (kernels/_numba.py, which documents
    each field): ``modes`` (N,) int64 (kernels.NO_FACTOR, SELECT, FACTOR, RANDOM, MAGPRUNE, BITS); ``sel`` (N, 4)
    int64 selection thresholds; ``factors`` N float32 arrays (FACTOR); ``bits`` N uint8 arrays (MAGPRUNE writes
    them, BITS reads them); ``keys``/``cuts`` (N,) uint64 (RANDOM, and MAGPRUNE's stream key); ``keep_value``
    (N,) float32; ``prune`` (N, 3) float32 (MAGPRUNE's density, 2ε, density − ε)."""

    modes: np.ndarray
    sel: np.ndarray
    factors: tuple[np.ndarray, ...]
    bits: tuple[np.ndarray, ...]
    keys: np.ndarray
    cuts: np.ndarray
    keep_value: np.ndarray
    prune: np.ndarray

    @classmethod
    def none(cls, n: int) -> KernelKeeps:
        """Every model NO_FACTOR (its delta as it is)."""
        empty = (np.zeros(0, dtype=np.float32),) * n
        return cls(np.zeros(n, dtype=np.int64), np.zeros((n, 4), dtype=np.int64), empty,
                   (np.zeros(0, dtype=np.uint8),) * n, np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64),
                   np.ones(n, dtype=np.float32), np.zeros((n, 3), dtype=np.float32))


class _DeltaTensorMerge(TensorMerge):

    def __init__(self, method: DeltaMethod, task: TensorTask, params: Mapping[str, Any], n_models: int) -> None:
        self.m, self.task, self.p, self.n = method, task, params, n_models
        cls = SPARSIFIERS.get(method.sparsify)
        self.sparsifiers = [cls(task, params, k) for k in range(n_models)] if cls else []
        self.select_passes = method.selection_passes(params)
        self.l1 = method.l1_pass(params)
        self.inverse = bool(params.get("rescale")) and params.get("rescale_mode") == "inverse_density"
        self.scales = [1.0] * n_models
        self.sums = (ColumnSums(task.rows, task.row_numel, 2 * n_models, task.tile, task.whole_tile_blocks)
                     if self.l1 else None)
        self._lock = threading.Lock()  # the selections' shared state, while helpers count blocks
        self._counts = _HelperCounts()

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        if pass_index < self.select_passes:
            for sp, m in zip(self.sparsifiers, models):
                if sp.passes:
                    absd = (m - base).abs_()
                    with self._lock:  # into the shared histograms (helpers may be counting other blocks)
                        sp.accumulate(pass_index, absd)
            return
        assert self.sums is not None
        values = []
        for sp, m in zip(self.sparsifiers, models):
            absd = (m - base).abs_()
            keep = sp.keep(r0, absd)
            values += [absd, absd if keep is None else keep.mul_(absd)]
        self.sums.add(r0, values)

    def end_pass(self, pass_index: int) -> None:
        if pass_index < self.select_passes:
            for topk, counts in self._counts.drain():
                shared = topk.high_counts() if pass_index == 0 else topk.low_counts()[1]
                shared += torch.from_numpy(counts)
            for sp in self.sparsifiers:
                if sp.passes:
                    sp.end_pass(pass_index)
            return
        assert self.sums is not None
        totals = self.sums.finish()
        for k, sp in enumerate(self.sparsifiers):
            before, after = totals[2 * k], totals[2 * k + 1]
            self.scales[k] = 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after
            sp.rewind()

    def _selections(self) -> list[_Selection]:
        return [sp for sp in self.sparsifiers if isinstance(sp, _Selection)]

    def independent_blocks(self, pass_index: int | None) -> bool:
        """The merge pass: each block is a function of its own rows (the sum, the sign election, DARE's and DELLA's
        per-element draws, DELLA's remembered decisions) and of the statistics, read only; except a selection's
        ties, which are kept first in row order: while some are still to be kept (``TopK.open_ties``), a block's
        keeps depend on the ties met before it, unless :meth:`start_blocks` found each block's cursors.

        The radix-select passes, once pass A's first block has chosen the candidates' windows: a helper counts
        into histograms of its own (:class:`_HelperCounts`, added at the end of the pass: integer counts, any
        order), and hands its block's candidates over under a lock (``TopK.collected``: their order does not
        matter), as the eager path does its counts.

        The L1 pass once its fused kernel has added a block (:meth:`_tiles.ColumnSums.any_order`), when blocks are
        whole tiles (``TensorTask.whole_tile_blocks``): blocks out of turn sum their tiles apart, added in row order
        later (``_tiles.FusedTiles``); with a selection's ties as in the merge pass (TIES and Breadcrumbs with
        rescale), and DELLA's decisions of the chunk made ahead (its kernel would make them in row order) or not
        remembered at all."""
        selections = self._selections()
        ties_free = not any(sp.open_ties for sp in selections) or any(sp.out_of_order for sp in selections)
        if pass_index is None:
            return ties_free
        if pass_index < self.select_passes:
            return pass_index > 0 or all(s.window is not None for sp in selections for s in sp.nontrivial())
        return (self.sums is not None and self.sums.any_order() and ties_free
                and all(sp.decided_ahead or not sp.remembering for sp in self.sparsifiers if isinstance(sp, MagPrune)))

    def blocks_ahead(self, pass_index: int | None) -> bool:
        """The merge pass and the L1 pass while a selection's ties are still to be kept: each block's ties met,
        counted ahead, tell where it starts keeping them. The L1 pass of DELLA: the decisions, made ahead (the
        ranking of every row, most of the pass), which the L1 sums then read."""
        if pass_index is not None and (pass_index != self.select_passes or not self.l1):
            return False
        # (the L1 sums run out of turn only in blocks of whole tiles: else counting ties ahead gains nothing)
        sums_any_order = pass_index is None or (self.sums is not None and self.sums.whole_tile_blocks)
        if sums_any_order and any(sp.open_ties and not sp.out_of_order for sp in self._selections()):
            return True
        return pass_index is not None and any(isinstance(sp, MagPrune) and sp.can_decide_ahead()
                                              for sp in self.sparsifiers)

    def ahead_raw(self, pass_index: int | None, r0: int, base: torch.Tensor,
                  models: Sequence[torch.Tensor]) -> list[tuple[int, int]] | bool | None:
        """With selections: per model, the elements of the block at row ``r0`` (rows as stored) equal to its
        selection's hi and lo tau (``kernels._numba.tie_counts``; (0, 0) without a selection). The L1 pass of DELLA:
        the block's decisions, remembered (``MagPrune.decide_ahead``), and True. None when a kernel does not take
        the inputs."""
        got = kernels.arrays(base, models)
        if got is None:
            return None
        b, ms, _ = got
        k = kernels.kernels()
        if pass_index is not None:
            for sp, m in zip(self.sparsifiers, ms):
                if isinstance(sp, MagPrune) and sp.can_decide_ahead():
                    sp.decide_ahead(r0, b, m, self._lock)
        if not self._selections():
            return True
        sel = np.tile(np.array([k.KEEP_ALL, 0, k.KEEP_NONE, 0], dtype=np.int64), (len(ms), 1))
        for i, sp in enumerate(self.sparsifiers):
            spec = sp.kernel_spec(r0) if isinstance(sp, _Selection) else None
            if spec is not None:
                sel[i] = spec
        counts = np.zeros((len(ms), 2), dtype=np.int64)
        k.tie_counts(b, ms, sel, counts)
        return [(int(hi), int(lo)) for hi, lo in counts.tolist()]

    def start_blocks(self, pass_index: int | None, starts: Sequence[int], results: Sequence[Any]) -> None:
        """Each selection's tie cursors at the start of each block (``_Selection.start_blocks``), so the blocks are
        independent; in the L1 pass, DELLA's decisions of the chunk are made."""
        if pass_index is not None:
            for sp in self.sparsifiers:
                if isinstance(sp, MagPrune) and sp.can_decide_ahead():
                    sp.decided_ahead = True
        for i, sp in enumerate(self.sparsifiers):
            if isinstance(sp, _Selection):
                sp.start_blocks(starts, [c[i] for c in results])

    def end_blocks(self, pass_index: int | None) -> None:
        for sp in self.sparsifiers:
            if isinstance(sp, _Selection):
                sp.end_blocks()
            elif isinstance(sp, MagPrune):
                sp.decided_ahead = False

    def settled(self, pass_index: int) -> bool:
        """Pass B, when pass A's candidates settled every selection's thresholds (``TopK.early``)."""
        return 0 < pass_index < self.select_passes and not any(
            sp.counting(pass_index) for sp in self.sparsifiers if isinstance(sp, _Selection))

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        exported = [x for sp in self.sparsifiers for x in sp.export()]
        if exported:
            state["select"] = torch.tensor(exported, dtype=torch.int64)
        if self.l1:
            state["scales"] = torch.tensor(self.scales, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "select" in state:
            exported = state["select"].tolist()
            for sp in self.sparsifiers:
                size = len(sp.export())
                sp.restore(exported[:size])
                exported = exported[size:]
        if "scales" in state:
            self.scales = state["scales"].tolist()

    def cursor(self) -> dict[str, Any]:
        seen = [x for sp in self.sparsifiers for x in sp.cursor()]
        return {"seen": seen} if seen else {}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        seen = list(cursor.get("seen", []))
        for sp in self.sparsifiers:
            size = len(sp.cursor())
            sp.restore_cursor(seen[:size])
            seen = seen[size:]

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = self.p["weight"]
        deltas = []
        for k, m in enumerate(models):
            d = m - base
            if self.sparsifiers:
                sp = self.sparsifiers[k]
                keep = sp.keep(r0, d.abs() if sp.needs_magnitude else d, self.inverse)
                if keep is not None:
                    d.mul_(keep)
                    if self.scales[k] != 1.0:
                        d.mul_(self.scales[k])
            if weights[k] != 1.0:
                d.mul_(weights[k])
            deltas.append(d)
        combine = sign_consensus if self.m.consensus else plain_sum
        mixed = combine(deltas, weights, self.p["normalize"])
        if self.p["lambda"] != 1:
            mixed.mul_(self.p["lambda"])
        return mixed.add_(base)

    # ---- fused kernels (streammerge.kernels): the same bytes as accumulate/emit and the engine's cast -------------
    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """The radix-select passes by ``histogram_high``/``histogram_low``, the L1 pass by ``l1_sums``."""
        got = kernels.arrays(base, models)
        if got is None:
            return False
        b, ms, _ = got
        k = kernels.kernels()
        if pass_index >= self.select_passes:
            return self._l1_raw(r0, base, models, b, ms)
        for sp, m in zip(self.sparsifiers, ms):
            if not isinstance(sp, _Selection):
                continue
            topks = sp.counting(pass_index)
            if not topks:
                continue
            two = len(topks) == 2
            if pass_index == 0:
                self._pass_a_raw(b, m, self._counts.hist(topks[0], 0), sp.nontrivial())
            else:
                bins = [s.target_bin for s in topks]
                hists = [self._counts.hist(s, 1) for s in topks]
                k.histogram_low(b, m, bins[0], hists[0], bins[-1], hists[-1], two)
        return True

    def _pass_a_raw(self, b: np.ndarray, m: np.ndarray, hist: np.ndarray, topks: list[TopK]) -> None:
        """Pass A by ``histogram_high``: the counts into ``hist``, and each TopK's candidates for pass B
        (``TopK.collect_args``), kept in scratch buffers of the block's size and handed over one block at a time.
        The first block counts first, then chooses the windows (in row order: the blocks are independent once
        chosen) and keeps its candidates."""
        k = kernels.kernels()
        count = True
        if any(s.window is None for s in topks):
            k.histogram_high(b, m, hist, True, 0, 0, NO_CANDIDATES, 0, 0, NO_CANDIDATES, np.full(2, -1, np.int64))
            for s in topks:
                s.choose_window(hist)
            count = False
        windows = [s.collect_args() for s in topks] + [(0, 0)] * (2 - len(topks))
        if count or any(length for _, length in windows):
            size = TopK.scratch_size(b.shape[0])
            found = [np.empty(size if length else 0, dtype=np.uint32) for _, length in windows]
            filled = np.array([0 if length else -1 for _, length in windows], dtype=np.int64)
            k.histogram_high(b, m, hist, count, *windows[0], found[0], *windows[1], found[1], filled)
            with self._lock:
                for s, f, kept in zip(topks, filled.tolist(), found):
                    if f >= 0:
                        s.collected(kept[:f], b.shape[0])

    def _l1_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], b: np.ndarray,
                ms: tuple[np.ndarray, ...]) -> bool:
        """:meth:`accumulate`'s L1 pass by ``l1_sums`` into the same :class:`ColumnSums`; DELLA's keep decisions are
        made there (MAGPRUNE) and kept as bits for the merge pass."""
        assert self.sums is not None
        rows = base.shape[0] if base.dim() else 0
        keeps = self._keeps(r0, base, models, inverse=False, l1_pass=True) if rows else None
        if keeps is None:
            return False
        ties = np.zeros((len(ms), 4), dtype=np.int64)
        sums = self.sums
        if not sums.add_fused(r0, rows, lambda *where: kernels.kernels().l1_sums(
                b, ms, keeps.modes, keeps.sel, keeps.factors, keeps.keys, keeps.cuts, keeps.keep_value, keeps.prune,
                keeps.bits, sums.row_numel, r0, sums.tile, sums.rows, *where, ties)):
            return False
        self._met_ties(keeps.modes, ties)
        with self._lock:  # (blocks of a chunk decided ahead may come from several threads)
            for sp, mode in zip(self.sparsifiers, keeps.modes):
                if mode in (kernels.MAGPRUNE, kernels.BITS):
                    sp.filled(rows)  # type: ignore[attr-defined]
        return True

    def _keeps(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], inverse: bool,
               l1_pass: bool = False) -> KernelKeeps | None:
        """How each model's keep factor of the block at row ``r0`` is made in a kernel, the same factors as
        :meth:`Sparsifier.keep` with ``inverse``: selections as thresholds, DARE's mask drawn in the kernel, DELLA's
        decisions made in the L1 pass's kernel and kept as bits (MAGPRUNE), which the merge pass reads (BITS), or,
        where that cannot be, its factors computed here; None when a factor is not a CPU float32 tensor."""
        keeps = KernelKeeps.none(len(models))
        modes, sel, keys, cuts, keep_value = keeps.modes, keeps.sel, keeps.keys, keeps.cuts, keeps.keep_value
        factors, bits = list(keeps.factors), list(keeps.bits)
        for i, sp in enumerate(self.sparsifiers):
            if isinstance(sp, _Selection):
                spec = sp.kernel_spec(r0)
                if spec is None:
                    continue
                modes[i], sel[i] = kernels.SELECT, spec
                if inverse and sp.density > 0:  # _inverse: keep / density, in float32
                    keep_value[i] = np.float32(1.0) / np.float32(sp.density)
            elif isinstance(sp, Bernoulli):
                if not sp.active:
                    continue
                modes[i], keys[i] = kernels.RANDOM, sp.key
                cut = drop_threshold(sp.density)
                if cut is None:  # density 0: every element dropped (a 0 factor, not divided by the density)
                    keep_value[i] = 0.0
                else:
                    cuts[i] = cut
                    if inverse:
                        keep_value[i] = np.float32(1.0) / np.float32(sp.density)
            else:
                fused = None
                if isinstance(sp, MagPrune) and not inverse:
                    kept = sp.bits_to_fill(r0, base) if l1_pass else sp.recall()
                    if kept is not None:
                        made = l1_pass and not sp.decided_ahead  # made in the L1 pass's kernel, else read
                        modes[i], bits[i], keys[i] = (kernels.MAGPRUNE if made else kernels.BITS), kept, sp.key
                        keeps.prune[i] = sp.kernel_table()
                        continue
                if isinstance(sp, MagPrune):
                    fused = sp.kernel_factors(r0, base, models[i], inverse)
                if fused is not None:
                    modes[i], factors[i] = kernels.FACTOR, fused
                    continue
                d = (models[i] - base.to(torch.float32)).abs_() if sp.needs_magnitude else None
                keep = sp.keep(r0, d if d is not None else base, inverse)
                if keep is None:
                    continue
                if keep.dtype != torch.float32 or keep.device.type != "cpu":
                    return None
                modes[i], factors[i] = kernels.FACTOR, keep.contiguous().reshape(-1).numpy()
        keeps.factors, keeps.bits = tuple(factors), tuple(bits)
        return keeps

    def _met_ties(self, modes: np.ndarray, ties: np.ndarray) -> None:
        """Advance the selections' tie cursors past a fused block (``ties`` as the kernel set it). Blocks shared
        out of turn come here only once every tie is kept (or with cursors of their own, ``_Selection.start_blocks``),
        where a cursor stays as it is (``TopK.advanced``): nothing the helpers' blocks change."""
        for i, sp in enumerate(self.sparsifiers):
            if modes[i] == kernels.SELECT:
                sp.met_ties(int(ties[i, 2]), int(ties[i, 3]))  # type: ignore[attr-defined]

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass: ``delta_sum`` without a sparsifier or consensus, else
        ``sparse_merge`` (keep factors from :meth:`_keeps`)."""
        got = kernels.arrays(base, models, out)
        if got is None:
            return None
        b, ms, o = got
        k = kernels.kernels()
        weights, n = self.p["weight"], len(ms)
        lam = kernels.f32([self.p["lambda"]])[0]
        if not self.sparsifiers and not self.m.consensus:
            return int(k.delta_sum(b, ms, kernels.f32(weights), self._sum_divisor(), lam, o))
        keeps = self._keeps(r0, base, models, self.inverse)  # without sparsifiers: every model NO_FACTOR
        if keeps is None:
            return None
        scale = kernels.f32(self.scales)  # applied with a keep factor only, as emit does
        combine = 1 if self.m.consensus else 0
        normalize = 0
        minw = np.float32(0.0)
        if self.m.consensus and self.p["normalize"]:
            normalize, minw = (1, kernels.f32([min(weights) / 2])[0]) if min(weights) > 0 else (2, minw)
        ties = np.zeros((n, 4), dtype=np.int64)
        start = r0 * self.task.row_numel
        bad = int(k.sparse_merge(b, ms, keeps.modes, keeps.sel, keeps.factors, keeps.bits, keeps.keys, keeps.cuts,
                                 start, keeps.keep_value, scale, kernels.f32(weights), combine, normalize, minw,
                                 self._sum_divisor(), lam, o, ties))
        if bad == 0:
            self._met_ties(keeps.modes, ties)
        return bad

    def _sum_divisor(self) -> np.float32:
        """plain_sum's divisor as the float32 a tensor is divided by (1, an exact identity, without normalize)."""
        if not self.p["normalize"] or self.m.consensus:
            return np.float32(1.0)
        divisor = sum(self.p["weight"])
        return kernels.f32([1.0 if abs(divisor) < 1e-8 else divisor])[0]


class DeltaMethod(Method):
    """Configure with ``sparsify`` (a key of :data:`SPARSIFIERS`, or "none") and ``consensus``; see the module
    docstring."""

    sparsify: str = "none"
    consensus: bool = False
    raw_models = True  # models are only used as ``m - base`` (float32 base): upcast inside the subtraction

    @property
    def passes(self) -> str:  # type: ignore[override]
        rescale = any(p.name == "rescale" for p in self.params)
        if self.sparsify in ("magnitude", "outliers"):
            text = ("3 (two exact radix-select passes over |delta|, the second usually settled by the first's "
                    "candidates, then merge); 1 when every density is 1")
            return text + ("; with rescale (l1) one more: the L1 norms" if rescale else "")
        if rescale:
            return "2 with rescale (l1: the L1 norms of the deltas, kept and all, then merge); else 1"
        return "1 (element-wise)"

    def resolve_params(self, raw: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        params = super().resolve_params(raw, n_models)
        if self.sparsify == "della":  # mergekit's della_magprune refuses probabilities outside (0, 1)
            from ..errors import MethodError  # noqa: PLC0415

            for k, (d, e) in enumerate(zip(params["density"], params["epsilon"])):
                if 0 < d < 1 and not (0 < d - e and d + e < 1):
                    raise MethodError(f"{self.name}: model {k + 1}: density ± epsilon must lie inside (0, 1), got "
                                      f"density {d} and epsilon {e}; lower epsilon (it is unused at density 0, "
                                      "which keeps nothing, and 1, which keeps everything)")
        return params

    def selection_passes(self, params: Mapping[str, Any]) -> int:
        """Two radix-select passes, unless every model keeps everything (density 1)."""
        cls = SPARSIFIERS.get(self.sparsify)
        if cls is not None and cls.passes and any(d < 1 for d in params["density"]):
            return cls.passes
        return 0

    def l1_pass(self, params: Mapping[str, Any]) -> bool:
        """Whether the L1 rescale's statistics pass runs: rescale with mode l1, and something is dropped."""
        return (self.sparsify in SPARSIFIERS and bool(params.get("rescale"))
                and params.get("rescale_mode") == "l1" and any(d < 1 for d in params["density"]))

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return self.selection_passes(params) + int(self.l1_pass(params))

    def settleable_passes(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        """A top-k selection's pass B: pass A keeps the candidates that settle it (``TopK.choose_window``), which
        bfloat16 and float16 deltas usually allow."""
        return (1,) if self.selection_passes(params) == 2 else ()

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """Measured on the CPU (bench/ram_probe.py). Merge pass: every model's delta, and the float32 upcast that ``m -
        base`` makes of a 16-bit model (4n + 4); selecting adds |delta| and the keep factor (8), outliers the drop
        factor too (12), DELLA its ranks (the sort's int64 indices, float32 ranks), probabilities and uniforms
        (float64), 28 at the peak; sign election the elected sign and two agreement factors (8 in all, alive with the
        selection's gone); DELLA with the L1 pass keeps its keep decisions as bits from that pass to the merge
        (``MagPrune.cache_bytes``). Statistics passes: the base, the previous |delta|, the upcast and the new |delta|
        (12 beyond the base's copy); the L1 pass per model |delta| and the kept |delta| (8) and their float64 copies
        (16): 24n. State: one 65 536-bin int64 histogram per selection, two more while a pass ends, and its
        candidates for pass B (``TopK.candidate_bytes``, at most 1/8 byte per element); DARE's mask generator keeps
        three 65 536-element uint64 work arrays; the L1 sums 16n bytes per row element."""
        n = n_models
        selections = {"magnitude": n, "outliers": 2 * n}.get(self.sparsify, 0) if self.selection_passes(params) else 0
        extra = {"none": 0, "magnitude": 8, "outliers": 12, "random": 0, "della": 28}[self.sparsify]
        if self.consensus:
            extra = max(extra, 8)
        gpu_extra = {"none": 0, "magnitude": 16, "outliers": 24, "random": 24, "della": 48}[self.sparsify]
        l1 = self.l1_pass(params)
        l1_stats = 24 * n + 8 + (extra if self.sparsify == "della" else 0)
        rows, rn = task.rows, task.row_numel
        remembered = n * MagPrune.cache_bytes(task) if self.sparsify == "della" and l1 else 0  # DELLA's keep bits
        # pass B's candidates, kept through pass A by the CPU kernels; twice at its end (TopK._settle's temporaries)
        candidates = 0 if task.on_gpu else selections * TopK.candidate_bytes(task.numel)
        return Footprint(
            stats_per_element=max(12 if selections else 0, l1_stats if l1 else 0),
            emit_per_element=4 * n + 4 + extra,
            stats_state=selections * HISTOGRAM_BYTES + candidates + (16 * n * rn if l1 else 0) + remembered,
            end_of_pass=((selections + 2) * HISTOGRAM_BYTES if selections else 0) + 2 * candidates + remembered,
            emit_state=(3 * HISTOGRAM_BYTES if self.sparsify == "random" else 0) + remembered,
            partial_tile=ColumnSums.stash_bytes(2 * n, rows, rn, task.tile) if l1 else 0,
            stats_per_chunk_row=ColumnSums.ahead_bytes_per_row(2 * n, rn, task) if l1 else 0,
            gpu_per_element=4 * (n + 1) + 4 * n + 12 + gpu_extra + (16 if self.consensus else 0) + 4
            + (24 * n if l1 else 0),
            gpu_state=(2 * n * 2 * HISTOGRAM_BYTES if selections else 0)
            + (2 * ColumnSums.stash_bytes(2 * n, rows, rn, task.tile) + 16 * n * rn if l1 else 0),
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _DeltaTensorMerge(self, task, params, n_models)
