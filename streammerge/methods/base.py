"""What a merge method is: declared parameters, per-tensor rules and a chunked pass structure.

A method is pure tensor math. For each tensor the engine asks it for a :class:`TensorMerge`, feeds it row chunks
(float32, base first, then the models in order) through zero or more *statistics passes* (``accumulate``), then
one *emit pass* whose float32 result the engine casts and writes. Methods never see files, devices or output
dtypes. They also tell the planner how many scratch bytes per element each pass needs, so the budget can size
chunks.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .._torch import torch
from ..errors import MethodError
from ..shapes import RowLayout


class Rule(str, Enum):
    """How a tensor is treated, decided by the planner from its name, shape and dtype."""

    MATRIX = "matrix"  # 2-D weight; columns are the stored columns (nn.Linear's input features)
    EMBEDDING = "embedding"  # 2-D embedding (V x H); columns are the stored rows (tokens / positions)
    CONV1D = "conv1d"  # 2-D weight stored (in, out), GPT-2's Conv1D: columns (input features) are the stored rows
    VECTOR = "vector"  # 0-D or 1-D (norm weights, biases): merged whole, in one chunk
    TENSOR = "tensor"  # stacked MoE experts, 3-D [E, out, in] (or more): only methods that accept it
    CONV = "conv"  # any other tensor of 3-D or more, a convolution kernel [out, in, *kernel] (e.g. a vision tower's
    # patch embedding): a linear map of the unfolded patch, so its columns (input features) are the stored columns
    # of its [out, in·∏kernel] view
    COPY_BASE = "copy_base"  # excluded, or not floating point: the base's value is kept
    TIED_COPY = "tied_copy"  # a tied head stored in the file: a copy of the merged embedding

    @property
    def two_d(self) -> bool:
        """A 2-D weight with a column rule (matrix, embedding or Conv1D)."""
        return self in (Rule.MATRIX, Rule.EMBEDDING, Rule.CONV1D)

    @property
    def columns_are_rows(self) -> bool:
        """Whether the rule's columns (input features, tokens) are the stored rows, not the stored columns."""
        return self in (Rule.EMBEDDING, Rule.CONV1D)

    @property
    def merged(self) -> bool:
        """Whether the method computes the tensor (rather than a copy)."""
        return self not in (Rule.COPY_BASE, Rule.TIED_COPY)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method accepts. ``per_model`` parameters take one value per model."""

    name: str
    kind: type  # float, int or bool
    default: Any
    help: str
    per_model: bool = False
    check: Callable[[Any], str | None] | None = None  # returns a complaint, or None if the value is fine

    def convert(self, raw: Any, method: str) -> Any:
        if isinstance(raw, str):
            text = raw.strip()
            try:
                if self.kind is bool:
                    low = text.lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(text)
                    value: Any = low in ("true", "1", "yes")
                else:
                    value = self.kind(text)
            except ValueError:
                raise MethodError(
                    f"{method}: parameter {self.name} must be {self.kind.__name__}, got {raw!r}"
                ) from None
        else:
            value = raw
            # numbers of any type (numpy's too), and 0/1 for a flag, as the command line takes "1" and "0"
            if self.kind is float and isinstance(raw, numbers.Real) and not isinstance(raw, bool):
                value = float(raw)
            elif self.kind is int and isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
                value = int(raw)
            elif self.kind is bool and isinstance(raw, numbers.Integral) and raw in (0, 1):
                value = bool(raw)
            if not isinstance(value, self.kind) or (self.kind is not bool and isinstance(value, bool)):
                raise MethodError(f"{method}: parameter {self.name} must be {self.kind.__name__}, got {raw!r}")
        if self.kind is float and value != value:
            raise MethodError(f"{method}: parameter {self.name} must be a number, got NaN")
        if self.check is not None:
            complaint = self.check(value)
            if complaint:
                raise MethodError(f"{method}: parameter {self.name}={value!r} {complaint}")
        return value


#: the switch of the methods whose ``base_policy`` is "optional" (a recipe without ``base_model`` sets it false)
USE_BASE = ParamSpec("use_base", bool, True, "merge the models' changes from the base (mergekit: a recipe with "
                     "base_model); false: merge the models' weights themselves, the base only giving the structure "
                     "(mergekit: no base_model)")


@dataclass(frozen=True)
class TensorTask(RowLayout):
    """What a method knows about one tensor: its name, stored shape, rule and the plan's reduction tile."""

    name: str
    shape: tuple[int, ...]
    rule: Rule
    #: rows per reduction tile: statistics are summed one aligned tile at a time, so sums do not depend on chunking
    tile: int
    #: every input is a 16-bit float, so float32 products of two inputs are exact (unless they underflow)
    exact_products: bool = False
    #: merged on a GPU (what its memory estimates must count: the GPU sums keep a tree scratch)
    on_gpu: bool = False
    #: the plan's statistics blocks are whole tiles (each starts on a tile boundary, but a chunk's first after a
    #: chunk that ended inside a tile), so a pass summed per tile may add blocks out of turn (``_tiles.FusedTiles``)
    whole_tile_blocks: bool = False


@dataclass(frozen=True)
class Footprint:
    """The memory a method's work on one tensor needs, in bytes, beyond the runner's float32 copies of the inputs
    (which the planner counts itself). CPU figures are measured with ``bench/ram_probe.py``, GPU figures with
    ``bench/vram_probe.py``.

    Per element of a compute block: what a statistics block and a merge block allocate. Per tensor: what is held
    while the statistics passes run (accumulators, histograms), while the merge pass runs (weights, work arrays),
    and at the end of a statistics pass (ranking, scans; the accumulators included). ``partial_tile``: what a
    statistics block or chunk that is not whole reduction tiles adds (the stashed rows of an incomplete tile and
    one whole tile's products). ``stats_per_chunk_row``: per row of a chunk, what blocks of a statistics pass that
    ran out of turn hold until it is theirs (tile sums, ``_tiles.FusedTiles``; at most a chunk's). On a GPU a chunk
    is one block and the caching allocator keeps whole-chunk temporaries, so it has its own figures: per chunk
    element (the runner's copies included) and per tensor.
    """

    stats_per_element: int = 0
    emit_per_element: int = 0
    stats_state: int = 0
    emit_state: int = 0
    end_of_pass: int = 0
    partial_tile: int = 0
    stats_per_chunk_row: int = 0
    gpu_per_element: int = 0
    gpu_state: int = 0


class TensorMerge:
    """The per-tensor state machine the engine drives. Subclasses override what their passes need; how many
    statistics passes run is the method's :meth:`Method.stat_passes` decision, made once in the plan.

    Chunks arrive in row order; ``r0`` is the first stored row of the chunk. ``base`` is (rows, *shape[1:])
    float32 and ``models`` a list of tensors of the same shape.
    """

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called after the last chunk of a statistics pass (the place to rank, select, solve)."""

    def settled(self, pass_index: int) -> bool:
        """Whether statistics pass ``pass_index`` has nothing left to count, asked when the pass before it ends
        (the schedule still holds it: its steps then do nothing, and the reads only they use may be left unread).
        The statistics are the same either way; only the work differs."""
        return False

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def independent_blocks(self, pass_index: int | None) -> bool:
        """Whether the blocks of statistics pass ``pass_index`` (None: the merge pass) may be computed by several
        threads at once, in any order: each block reads the merge's state only and writes only its own rows (of
        the output, or of the statistics), or what it adds is combined in an order that does not depend on when
        it ran (integer counts; tile sums added in row order, ``_tiles.FusedTiles``), so no byte can depend on
        which thread computes it or when. The engine then shares a chunk's blocks with compute workers that have
        nothing else to do (a large tensor at the end of a run). Default False: blocks arrive in row order, one at
        a time."""
        return False

    def blocks_ahead(self, pass_index: int | None) -> bool:
        """Whether a chunk's blocks of pass ``pass_index`` (None: the merge pass) need work that is independent of
        their order, and that they would otherwise do in row order (TIES's ties met in each block, which tell
        where the next block starts keeping them; DELLA's keep decisions, which the L1 pass ranks row by row). With
        idle workers the engine then does :meth:`ahead_raw` for every block (in any order, on any thread), hands
        the results to :meth:`start_blocks`, computes the blocks (independent ones shared), and calls
        :meth:`end_blocks`. Doing the work ahead is extra work, so only where helpers can share it."""
        return False

    def ahead_raw(self, pass_index: int | None, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> Any:
        """:meth:`blocks_ahead`'s work for the block at row ``r0`` (rows as stored, as for :meth:`emit_raw`), from
        any thread; None when a kernel cannot do it (the blocks then run as without it)."""
        return None

    def start_blocks(self, pass_index: int | None, starts: Sequence[int], results: Sequence[Any]) -> None:
        """The blocks beginning at rows ``starts`` (a chunk's, in row order; ``results`` from :meth:`ahead_raw`)
        come next: from here until :meth:`end_blocks` they use the work done ahead."""

    def end_blocks(self, pass_index: int | None) -> None:
        """The blocks of :meth:`start_blocks` are done."""

    # Fused kernels (streammerge.kernels): optional, byte-identical to accumulate and emit.
    def kernel_path(self) -> bool:
        """Whether the fused kernels compute this merge's blocks (:meth:`accumulate_raw`, :meth:`emit_raw`) when
        the plan runs them and its sources give rows as stored; asked once, by the planner, which counts the blocks
        of a merge without one as the eager path's (``planner.EAGER_HEAP_SLACK``) and tells the runner which path a
        tensor takes (``TensorPlan.fused``). By default: a merge with a fused merge pass."""
        return type(self).emit_raw is not TensorMerge.emit_raw

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` by a fused kernel: ``base`` and ``models`` are the block's rows as stored (CPU, read-only
        views; bfloat16, float16 or float32), not float32 copies. True when done; False (having changed nothing) to
        have the engine call :meth:`accumulate` instead."""
        return False

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the engine's cast by a fused kernel, writing the output dtype directly: ``base`` and
        ``models`` as for :meth:`accumulate_raw`, ``out`` the block's output rows (bfloat16, float16 or float32, on
        the CPU) to fill with exactly the bytes :meth:`emit` and the cast would give. Returns the number of
        non-finite output elements: 0, done; more, the merge's state is as before the call (``out`` is undefined)
        and the engine runs :meth:`emit` on the block to say what is wrong. None when there is no fused path for
        these inputs (the engine calls :meth:`emit`)."""
        return None

    # Resume support: what the statistics passes produced, and where the emit pass stands.
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The result of the statistics passes (journaled so a resumed run skips them)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned, instead of running the statistics passes."""

    def cursor(self) -> dict[str, Any]:
        """Small JSON-able emit state after the last emitted chunk (for methods whose emit is not row-local)."""
        return {}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        """Continue emitting after the chunk whose :meth:`cursor` this is."""


class Method:
    """A merge method: subclass, set the class attributes and register it with :func:`register`."""

    name: str = ""
    summary: str = ""
    reference: str = ""
    params: tuple[ParamSpec, ...] = ()
    passes: str = "1 (element-wise)"  # how many passes over each tensor, for `streammerge methods`
    min_models: int = 1
    max_models: int | None = None
    #: the models arrive as stored (e.g. bfloat16 views, read-only) instead of float32 copies: only for methods
    #: whose every use of a model is an arithmetic op with a float32 tensor (``m - base``), which upcasts exactly
    raw_models: bool = False
    #: token embeddings (Rule.EMBEDDING) are merged by their own rule, not as an ordinary matrix
    embedding_rule: bool = False
    #: what the base is to the method (mergekit's ``base_model`` contract), decided here once and read by the recipe
    #: loader and the planner: ``"required"``, the models' changes from the base are merged; ``"none"``, the base only
    #: gives the structure and the method combines the models (a recipe's ``base_model`` is averaged as one more
    #: model, as mergekit does: linear, karcher); ``"optional"``, with ``use_base`` true (a recipe with
    #: ``base_model``) the models' changes from the base are merged, with it false (a recipe without) the models
    #: themselves (nuslerp, multislerp)
    base_policy: str = "required"

    def resolve_params(self, raw: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        """Validate user parameters (strings or values) into typed values; per-model ones become tuples."""
        specs = {p.name: p for p in self.params}
        for key in raw:
            if key == "seed" and key not in specs:
                raise MethodError(f"{self.name} draws no random masks, so it takes no seed (--seed is for the methods "
                                  "that list a seed parameter in `streammerge methods`)")
            if key not in specs:
                near = difflib.get_close_matches(key, IGNORED_NAMES, n=1, cutoff=0.7)
                if near:  # mergekit's memory switch, misspelled: accepted (and ignored) under its own name
                    raise MethodError(f"{self.name} has no parameter {key!r}; did you mean {near[0]!r}? (a mergekit "
                                      "memory switch, accepted and without effect here)")
                raise MethodError(unknown_name_message(f"{self.name} has no parameter", key, list(specs)))
        out: dict[str, Any] = {}
        for spec in self.params:
            value = raw.get(spec.name, spec.default)
            if spec.per_model:
                items = _split_per_model(value)
                if len(items) == 1:
                    items = items * n_models
                if len(items) != n_models:
                    raise MethodError(
                        f"{self.name}: parameter {spec.name} has {len(items)} values but there are {n_models} "
                        "models: give one value per --model, in order, separated by commas, or one for all"
                    )
                out[spec.name] = tuple(spec.convert(v, self.name) for v in items)
            else:
                out[spec.name] = spec.convert(value, self.name)
        return out

    def check_models(self, n_models: int) -> None:
        if n_models < self.min_models:
            raise MethodError(f"{self.name} needs at least {self.min_models} model{'s' if self.min_models != 1 else ''} besides "
                             f"the base, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise MethodError(f"{self.name} takes at most {self.max_models} model{'s' if self.max_models != 1 else ''} besides "
                             f"the base, got {n_models}")

    def rule_error(self, task: TensorTask) -> str | None:
        """Why this method cannot merge the tensor (None if it can)."""
        return None

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        """How many statistics passes a tensor with this rule needs with these parameters (for the plan)."""
        return 0

    def settleable_passes(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        """The statistics passes that the pass before usually settles (:meth:`TensorMerge.settled`) when the fused
        kernels merge 16-bit inputs on the CPU, so that their reads are left unread; the plan shows the bytes a merge
        then reads. A prediction for the plan's summary only: the schedule keeps every pass either way."""
        return ()

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        """The memory this method's work on ``task`` needs (see :class:`Footprint`); the planner sizes chunks and
        compute blocks from it. The default: an element-wise merge with one accumulator and one temporary."""
        return Footprint(emit_per_element=8, gpu_per_element=4 * (n_models + 1) + 12)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        raise NotImplementedError


def _split_per_model(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v for v in value.split(",")]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


#: mergekit switches that only change how mergekit uses memory: accepted anywhere a parameter is, without effect
IGNORED_NAMES = ("int8_mask", "lazy_unpickle")


def unknown_name_message(what: str, name: str, choices: Sequence[str]) -> str:
    """``"<what> 'x'; did you mean 'y'? (choices: ...)"``"""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    listed = ", ".join(choices) if choices else "none"
    return f"{what} {name!r}{hint} (choices: {listed})"
