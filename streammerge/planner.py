"""The planner: recipe + checkpoint headers + method + budget → a Plan, before any tensor byte is read.

Pure apart from reading headers (done by the caller). ``classify`` decides every tensor's rule, dtype policy and
input sources; the planner lays out the output shards and their exact headers, sizes row chunks and compute
blocks so the predicted peak stays within the budget, counts the bytes to read and write, and fingerprints what
determines the output bytes. An impossible request (budget, shapes, names, parameters, quantized inputs) is refused
here, before any output exists. Everything after reads the plan's decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kernels
from ._version import __version__
from .budget import Budget
from .chat_template import resolve as resolve_template
from .classify import Kind, TensorClass, classify
from .errors import MethodError, PlanError
from .fingerprint import (
    engine_document,
    fingerprint_document,
    run_fingerprint,
    tensor_fingerprints,
)
from .formats.checkpoint import Checkpoint
from .formats.dtypes import DTYPES, parse_output_dtype
from .manifest import MANIFEST
from .methods import Footprint, Method, Rule, TensorTask, get_method, method_origin
from .parameters import Levels, check_levels, layer_count, position, raw_for_tensor
from .recipe import HEAD_NAMES, TOKEN_EMBEDDINGS, Recipe
from .shapes import RowLayout
from .slices import classify_slices, slice_views
from .sources import InputSource
from .sources.base import align
from .units import format_size
from .vocabulary import (
    TokenDefault,
    VocabInput,
    VocabularyPlan,
    plan_vocabulary,
    tokenizer_difference,
)
from .writer import (
    OutTensor,
    ShardLayout,
    layout_shard,
    shard_filename,
    split_into_shards,
)

if TYPE_CHECKING:
    from .parts import WorkUnit

#: Share of --max-ram the planned buffers may fill; the rest absorbs allocator slack and small temporaries.
BUDGET_USABLE = 0.85
#: Share of --max-vram the planned GPU tensors may fill (the caching allocator rounds and fragments).
VRAM_USABLE = 0.85
#: The eager path's compute blocks are counted this many times over: torch allocates and frees every operation's
#: result, and glibc's heaps (with its defaults, and with :func:`heap.keep_freed_memory`) keep the holes between
#: them, so a tensor's compute memory reached 2-3.1x its blocks' live temporaries (bench/ram_probe.py
#: --glibc-defaults: TIES's radix-select passes, WIDEN, DARE, SCE), and small budgets went past --max-ram. The fused
#: kernels allocate a few arrays per block, reused in place, and are counted once.
EAGER_HEAP_SLACK = 3
#: elements per compute block of a merge pass: the block's float32 temporaries stay in the CPU caches
BLOCK_ELEMENTS = 1 << 18
#: elements per compute block of a statistics pass (at least one reduction tile of rows)
STAT_BLOCK_ELEMENTS = 1 << 19
#: input slots and output buffers: one being worked on, one being filled (read ahead or written behind)
BUFFER_DEPTH = 2
#: rows per reduction tile: float64 statistics are summed one aligned tile at a time (chunk-independent sums)
TILE_ROWS = 64


@dataclass(frozen=True)
class TensorPlan(RowLayout):
    """How one output tensor is produced: the classification's decisions plus its sizes."""

    name: str
    shape: tuple[int, ...]
    rule: Rule
    kind: Kind
    out_dtype: str
    shard: str
    sources: tuple[InputSource, ...]  # base first, then each model (see classify); none for a tied head
    chunk_rows: int  # rows read (and written) per chunk
    stat_passes: int
    block_rows: int  # rows per compute block of the merge pass (cache-sized; the whole chunk for VECTOR)
    stat_block_rows: int  # rows per compute block of the statistics passes (whole reduction tiles where possible)
    state_bytes: int  # predicted per-tensor state kept across passes
    scratch_bytes: int  # predicted compute memory on the CPU: the state plus one block's temporaries
    tile: int  # rows per reduction tile
    fingerprint: str  # hash of everything that decides this tensor's bytes
    copy_of: str | None = None  # for TIED_COPY: the tensor whose merged bytes are copied
    exact_products: bool = False  # all inputs are 16-bit floats (see TensorTask)
    on_gpu: bool = False  # merged on a GPU (see TensorTask)
    kept_because: str | None = None  # for COPY_BASE: why the base's value is kept (see TensorClass)
    params: dict[str, Any] = field(default_factory=dict)  # the method's parameters for this tensor (merged ones)
    scale: float = 1.0  # for COPY_BASE of a float: the copy is multiplied by it (see TensorClass)
    fused: bool = False  # the fused kernels compute its blocks (the plan runs them, TensorSizing.kernel_path)

    @property
    def task(self) -> TensorTask:
        return TensorTask(self.name, self.shape, self.rule, self.tile, self.exact_products, self.on_gpu,
                          whole_tile_blocks=self.stat_block_rows % self.tile == 0)

    @property
    def out_row_bytes(self) -> int:
        """Bytes of one output row."""
        return self.row_numel * DTYPES[self.out_dtype].bits // 8

    @property
    def resident(self) -> bool:
        """Read once for every pass: the whole tensor is one chunk."""
        return self.chunk_rows >= self.rows

    @property
    def raw_copy(self) -> bool:
        """A copy of the base whose bytes are written as stored (integers, bools, or no dtype change)."""
        return self.rule is Rule.COPY_BASE and self.sources[0].stored_dtype == self.out_dtype and self.scale == 1.0

    @property
    def read_bytes_per_row(self) -> int:
        """Bytes read per row of every input (one pass)."""
        return sum(s.read_bytes_per_row for s in self.sources)

    @property
    def planned_read_bytes(self) -> int:
        """Bytes the whole tensor reads: once per pass (statistics and merge), or once if it fits the budget whole; a
        tied head reads its embedding's output."""
        if self.rule is Rule.TIED_COPY:
            return self.rows * self.out_row_bytes
        reads = 1 if self.resident or not self.stat_passes else self.stat_passes + 1
        fixed = sum(s.fixed_read_bytes for s in self.sources)  # parts read whole with every chunk (LoRA factors)
        return reads * (self.rows * self.read_bytes_per_row + (fixed * len(self.chunks()) if fixed else 0))

    def chunks(self, start: int = 0) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) in order, from row ``start`` (a resumed run continues mid-tensor)."""
        step = max(1, self.chunk_rows)
        return [(r, min(r + step, self.rows)) for r in range(start, self.rows, step)] or ([(0, 0)] if not start else [])

    def blocks(self, r0: int, r1: int, stats: bool) -> list[tuple[int, int]]:
        """Compute blocks [b0, b1) (absolute rows) of chunk [r0, r1); statistics blocks end on tile boundaries."""
        if not stats:
            step = max(1, self.block_rows)
            return [(b, min(b + step, r1)) for b in range(r0, r1, step)] or [(r0, r1)]
        step = max(1, self.stat_block_rows)
        out, b = [], r0
        while b < r1:
            e = min(r1, (b // self.tile * self.tile + step) if step % self.tile == 0 else b + step)
            out.append((b, e))
            b = e
        return out or [(r0, r1)]


@dataclass(frozen=True)
class TensorSizing:
    """What one tensor costs before chunk sizes are chosen."""

    cls: TensorClass
    task: TensorTask
    in_bytes: int  # bytes read per element (every input as stored)
    out_bytes: int  # bytes written per element
    passes: int  # statistics passes before the merge pass
    copies: int  # bytes per block element of the runner's float32 copies of the inputs
    footprint: Footprint  # the method's own memory (see methods.base.Footprint), plus its sources' (a LoRA product)
    fixed_slot: int = 0  # slot bytes its sources read whole with every chunk (InputSource.fixed_slot_bytes)
    #: the fused kernels compute it when the plan runs them (TensorMerge.kernel_path, every source raw_exact)
    kernel_path: bool = False

    @property
    def state(self) -> int:
        """Per-tensor state at its largest, whole tiles assumed (for sizing compute blocks)."""
        fp = self.footprint
        return max(fp.stats_state, fp.emit_state, fp.end_of_pass)

    @property
    def per_elem(self) -> int:
        """Compute memory per block element in the costlier pass."""
        fp = self.footprint
        return self.copies + max(fp.emit_per_element, fp.stats_per_element if self.passes else 0)

    @property
    def least_elements(self) -> int:
        """Elements of the smallest chunk that works: one row, or the whole tensor for a VECTOR."""
        return self.task.numel if self.task.rule is Rule.VECTOR else self.task.row_numel


@dataclass(frozen=True)
class Plan:
    """Everything execution needs, decided up front. ``to_dict`` is its JSON form."""

    recipe: Recipe
    method: Method
    params: dict[str, Any]
    budget: Budget
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardLayout, ...]
    depth: int  # input slots and output buffers, per worker
    tile: int  # rows per reduction tile
    peak_ram: int  # every planned buffer: per worker, depth input slots + depth output buffers + the largest scratch
    # + the tile sums that blocks out of turn hold (Footprint.stats_per_chunk_row); and the fused kernels' runtime
    slot_bytes: int  # one input slot: a chunk of every input, as stored
    out_buffer_bytes: int  # one output buffer: a chunk of output bytes
    scratch_bytes: int  # the largest per-tensor state + compute-block temporaries
    workers: int  # tensors computed at once, each by its own worker within its share of the budget (see _workers)
    peak_vram: int  # predicted GPU memory for tensors (0 on the CPU)
    bytes_read: int
    bytes_written: int
    fingerprint: str
    notes: tuple[str, ...]  # what the user should know before merging (warnings that do not stop it)
    fingerprint_doc: dict[str, Any] = field(repr=False)
    base: Checkpoint = field(repr=False)
    models: tuple[Checkpoint, ...] = field(repr=False)
    config_updates: dict[str, Any] = field(default_factory=dict, repr=False)  # for the output's config.json
    chat_template: str | None = field(default=None, repr=False)  # the output's chat template (None: as copied)
    vocabulary: VocabularyPlan | None = field(default=None, repr=False)  # the inputs' rows mapped onto the output's
    #: whether the merge runs the fused kernels (:func:`streammerge.kernels.enabled`, from the elements it merges;
    #: never on a GPU): decided here, before the budget is shared out, because their runtime takes memory too
    fused_kernels: bool = False

    @property
    def bytes_read_settled(self) -> int:
        """:attr:`bytes_read` less the reads of the statistics passes that the pass before usually settles
        (``Method.settleable_passes``), where the fused kernels merge 16-bit inputs on the CPU and the tensor is read
        again for each pass: what a merge usually reads (at least this, at most :attr:`bytes_read`)."""
        if not self.fused_kernels:
            return self.bytes_read
        saved = 0
        for t in self.tensors:
            if t.rule.merged and t.stat_passes and not t.resident and not t.on_gpu \
                    and all(s.narrow_float and s.raw_exact for s in t.sources):
                per_pass = t.planned_read_bytes // (t.stat_passes + 1)  # read once for each pass
                saved += len(self.method.settleable_passes(t.params)) * per_pass
        return self.bytes_read - saved

    def options(self) -> dict[str, Any]:
        """The options besides the method that shape the output (only those given)."""
        r = self.recipe
        given = {"dtype": r.dtype, "exclude": list(r.exclude), "embedding": list(r.embedding_names or ()),
                 "keep_vision": r.keep_vision,
                 "tokenizer_source": r.tokenizer_source.resolve().name if isinstance(r.tokenizer_source, Path)
                 else r.tokenizer_source,
                 "pad_to_multiple_of": r.pad_to_multiple_of}
        return {k: v for k, v in given.items() if v}

    @cached_property
    def _by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorPlan:
        return self._by_name[name]

    @property
    def threads_per_worker(self) -> int:
        """torch intra-op threads of each compute worker: ``--threads`` shared by the workers (1 when there are as
        many workers as threads)."""
        return max(1, self.budget.threads // self.workers)

    def units(self, n: int) -> tuple[WorkUnit, ...]:
        """This plan's split into ``n`` parts that each own whole shard files (decided once, in
        :func:`streammerge.parts.split_units`); raises :class:`~streammerge.parts.PartError` if it has too few."""
        from .parts import split_units  # noqa: PLC0415 (parts builds on the plan)

        return split_units(self, n)

    def __repr__(self) -> str:
        return (f"Plan(method={self.method.name!r}, base={str(self.recipe.base)!r}, "
                f"models={[str(m) for m in self.recipe.models]!r}, out={None if self.recipe.out is None else str(self.recipe.out)!r}, "
                f"tensors={len(self.tensors)}, shards={len(self.shards)}, bytes_written={self.bytes_written}, "
                f"peak_ram={self.peak_ram}, device={self.budget.device!r}, fingerprint={self.fingerprint[:12]!r})")

    def to_dict(self) -> dict[str, Any]:
        rules: dict[str, int] = {}
        for t in self.tensors:
            rules[t.rule.value] = rules.get(t.rule.value, 0) + 1
        return {
            "streammerge": __version__,
            "method": self.method.name,
            "params": self.params,
            "options": self.options(),
            "base": str(self.recipe.base),
            "models": [str(m) for m in self.recipe.models],
            **({"adapters": [None if a is None else str(a) for a in self.recipe.adapters]} if self.recipe.adapters
               else {}),
            **({"references": self.recipe.hub_refs} if self.recipe.hub_refs else {}),
            "out": None if self.recipe.out is None else str(self.recipe.out),
            "device": self.budget.device,
            "device_source": self.budget.device_source,
            "budget": {"max_ram": self.budget.max_ram, "source": self.budget.source,
                       "threads": self.budget.threads, "threads_source": self.budget.threads_source,
                       **({"max_vram": self.budget.max_vram, "vram_source": self.budget.vram_source}
                          if self.budget.max_vram else {})},
            "workers": self.workers,
            "predicted_peak_ram": self.peak_ram,
            "fused_kernels": self.fused_kernels,
            **({"predicted_peak_vram": self.peak_vram} if self.peak_vram else {}),
            "buffers": {"input_slots": self.depth * self.workers, "slot_bytes": self.slot_bytes,
                        "output_buffers": self.depth * self.workers,
                        "output_buffer_bytes": self.out_buffer_bytes, "scratch_bytes": self.scratch_bytes},
            "tile": self.tile,
            "read_once": sum(1 for t in self.tensors if t.stat_passes and t.resident),
            "read_per_pass": sum(1 for t in self.tensors if t.stat_passes and not t.resident),
            "bytes_read": self.bytes_read,
            "bytes_read_settled": self.bytes_read_settled,
            "bytes_written": self.bytes_written,
            "fingerprint": self.fingerprint,
            "engine": self.fingerprint_doc["engine"],
            "notes": list(self.notes),
            **({"vocabulary": {"tokens": self.vocabulary.tokens, "rows": self.vocabulary.rows,
                               "added_tokens": [e["content"] for e in self.vocabulary.added],
                               "inputs": [self.vocabulary.counts(k) for k in range(len(self.vocabulary.maps))]}}
               if self.vocabulary is not None else {}),
            "rules": rules,
            "kept_from_base": _kept_from_base(self.tensors),
            "shards": [
                {"file": s.filename, "bytes": s.size, "tensors": len(s.offsets)} for s in self.shards
            ],
            "tensors": [
                {
                    "name": t.name, "shape": list(t.shape), "rule": t.rule.value, "kind": t.kind.value,
                    "dtype": t.out_dtype, "shard": t.shard, "chunk_rows": t.chunk_rows, "chunks": len(t.chunks()),
                    "passes": t.stat_passes + 1, "reads": 1 if t.resident else t.stat_passes + 1,
                    "scratch_bytes": t.scratch_bytes, "fused_kernels": t.fused,
                    **({"params": {k: list(v) if isinstance(v, tuple) else v for k, v in t.params.items()}}
                       if t.params else {}),
                    "inputs": [s.describe() for s in t.sources], "fingerprint": t.fingerprint,
                    **({"copy_of": t.copy_of} if t.copy_of else {}),
                    **({"kept_because": t.kept_because} if t.kept_because else {}),
                    **({"scale": t.scale} if t.scale != 1.0 else {}),
                }
                for t in self.tensors
            ],
        }


def make_plan(recipe: Recipe, base: Checkpoint, models: list[Checkpoint], budget: Budget,
              method: Method | None = None) -> Plan:
    """Plan the merge of ``models`` onto ``base``; raises before anything is written if it cannot work.
    ``method``: an unregistered method to plan for instead of ``recipe.method`` (``streammerge analyze`` plans its
    statistics-only passes with one)."""
    origin = "builtin" if method is not None else None
    method = method or get_method(recipe.method)
    method.check_models(len(models))
    check_levels(method, recipe.parameters, recipe.model_parameters, recipe.params)
    params = method.resolve_params(recipe.params, len(models))  # the command line's, checked before any tensor
    out_dtype = parse_output_dtype(recipe.dtype).name if recipe.dtype else None
    tile, depth = TILE_ROWS, BUFFER_DEPTH
    positions: dict[str, tuple[float, int]] | None = None
    stacking = bool(recipe.slices) and method.name == "passthrough"  # copies of layer ranges, no arithmetic
    vocab = _vocabulary(recipe, method, params, base, models)
    if vocab is not None and recipe.slices:
        raise PlanError("the inputs' vocabularies differ, and mapping embedding rows through the tokenizers in a "
                        "slices: recipe is not supported yet: give the inputs one vocabulary")
    if stacking:
        classification = classify_slices(recipe, base, models, out_dtype)
    elif recipe.slices:  # a merge per layer range: the ordinary classification of each input's renamed view
        for sl in recipe.slices:  # each slice's settings and its sources' own
            check_levels(method, sl.parameters, [sl.source_parameters], {})
        base_view, model_views, positions, updates = slice_views(recipe, base, models)
        classification = classify(recipe, method, base_view, model_views, out_dtype, tile)
        classification = replace(classification, config_updates={**classification.config_updates, **updates})
    else:
        classification = classify(recipe, method, base, models, out_dtype, tile, vocab)
    classes = classification.tensors
    tensor_params = _tensor_params(recipe, method, base, len(models), [c for c in classes if c.rule.merged],
                                   positions)
    params = _common(tensor_params) if tensor_params else params
    if stacking:  # a stack of copies: its one parameter is each copy's scale
        scales = {c.scale for c in classes if c.kind is Kind.FLOAT}
        params = {"scale": scales.pop() if len(scales) == 1 else VARIES}

    groups = split_into_shards([OutTensor(c.name, c.out_dtype, c.shape) for c in classes], recipe.shard_size)
    shards = tuple(layout_shard(shard_filename(i, len(groups)), g) for i, g in enumerate(groups))
    shard_of = {t: s.filename for s in shards for t in s.offsets}
    fps = tensor_fingerprints(classes, method.name, tensor_params, len(models), shards, tile)
    doc = fingerprint_document(recipe, method.name, params, base, models, engine_document(budget.device, tile, origin or method_origin(method.name)), fps)

    on_gpu = budget.device.startswith("cuda")
    out_dtypes = {c.name: c.out_dtype for c in classes}
    sizing = [_size(c, method, tensor_params.get(c.name, params), len(models), tile, on_gpu, out_dtypes)
              for c in classes]
    # the fused kernels' runtime (numba and its compiled code) lives beside the buffers: taken off the budget first
    usable = int(budget.max_ram * BUDGET_USABLE)
    fused = not on_gpu and kernels.enabled(sum(math.prod(c.shape) for c in classes if c.rule.merged), usable)
    runtime = kernels.RUNTIME_BYTES if fused else 0
    usable -= runtime
    # the fused kernels compute a tensor where they run and the merge has a kernel path; the rest runs eagerly,
    # its blocks counted EAGER_HEAP_SLACK times over (on a GPU: one chunk, its own figures)
    tensor_fused = [fused and s.kernel_path for s in sizing]
    slacks = [1 if f or on_gpu else EAGER_HEAP_SLACK for f in tensor_fused]
    max_state = max((s.state for s in sizing), default=0)
    max_per_elem = max((s.per_elem * k for s, k in zip(sizing, slacks)), default=1) or 1
    per_elem_buffers = depth * (max((s.in_bytes for s in sizing), default=0) + max((s.out_bytes for s in sizing), default=0))
    merged = [s for s in sizing if s.task.rule.merged]
    # a chunk on the GPU: its inputs as stored and as float32, the method's scratch, the result and its cast
    gpu_elem = max((s.footprint.gpu_per_element + s.in_bytes + s.out_bytes for s in merged), default=1) or 1
    gpu_state = max((s.footprint.gpu_state for s in merged), default=0)
    vram_chunk = None
    if on_gpu:
        vram_usable = int((budget.max_vram or 0) * VRAM_USABLE) - gpu_state
        least = max((s.least_elements for s in merged), default=0)
        if vram_usable < gpu_elem * least:
            need = (gpu_state + gpu_elem * least) / VRAM_USABLE
            raise PlanError(f"--max-vram {format_size(budget.max_vram or 0)} is too small: one row chunk needs "
                            f"{format_size(need)} of GPU memory; raise --max-vram, or use --device cpu")
        vram_chunk = vram_usable // gpu_elem
    def settle(usable: int) -> tuple[list[tuple[int, int]], list[bool], list[int], int, list[int], list[int]]:
        """Blocks, partial-tile reserves, scratch, the largest scratch, chunk rows and the bytes per chunk row
        that blocks out of turn hold, for ``usable`` bytes."""
        # compute blocks take at most a quarter of what the largest per-tensor state leaves
        cap = max(1, (usable - max_state) // (4 * max_per_elem))
        blocks = [_block_rows(s, cap, tile) for s in sizing]
        # tile sums of blocks out of turn wait for theirs: where the kernels sum columns, in whole-tile blocks, with
        # workers to share them; per element of the largest chunk, beside its buffers
        ahead = [s.footprint.stats_per_chunk_row if f and s.passes and budget.threads > 1 and stat_rows % tile == 0
                 else 0 for s, f, (_, stat_rows) in zip(sizing, tensor_fused, blocks)]
        per_elem = per_elem_buffers + max((Fraction(a, max(s.task.row_numel, 1)) for s, a in zip(sizing, ahead)),
                                          default=Fraction(0))
        # A statistics block or chunk that is not whole tiles needs the partial-tile reserve; whether chunks are
        # depends on the memory left, which depends on the reserves: settle it in a few rounds (reserves only grow).
        partial = [bool(s.passes) and _partial(stat_rows, s.task.rows, tile) for s, (_, stat_rows) in zip(sizing, blocks)]
        for _ in range(4):
            scratch = [_scratch(s, b, p, k) for s, b, p, k in zip(sizing, blocks, partial, slacks)]
            fixed = max(scratch, default=0)
            chunk_elems = math.floor((usable - fixed) / max(per_elem, Fraction(1)))
            if vram_chunk is not None:
                chunk_elems = min(chunk_elems, vram_chunk)
            # a source's parts read whole with every chunk (a LoRA factor) are reserved in each slot first
            chunks = [_chunk_rows(recipe, s.task.rule, s.task.rows, s.task.row_numel,
                                  chunk_elems - -(-depth * s.fixed_slot // max(per_elem_buffers, 1)), tile)
                      for s in sizing]
            grown = [p or (bool(s.passes) and _partial(max(c, 1), s.task.rows, tile))
                     for s, p, c in zip(sizing, partial, chunks)]
            if grown == partial:
                break
            partial = grown
        return blocks, partial, scratch, fixed, chunks, ahead

    workers = _workers(budget, usable, lambda share: all(c >= 1 for c in settle(share)[4]))
    blocks, partial, scratch, fixed, chunks, ahead_per_row = settle(usable // workers)
    if any(c < 1 for c in chunks):  # too small: find the least budget that works, and the tensor that needs it
        lo, hi = usable, max(usable, 1) * 2
        while any(c < 1 for c in settle(hi)[4]) and hi < 1 << 60:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # the least usable bytes that work (exactly: the figure quoted must be enough)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if all(c >= 1 for c in settle(mid)[4]) else (mid, hi)
        tightest = next((s.cls.name for s, c in zip(sizing, settle(lo)[4]) if c < 1),
                        next(s.cls.name for s, c in zip(sizing, chunks) if c < 1))
        least = math.ceil((hi + runtime) / BUDGET_USABLE)
        while int(least * BUDGET_USABLE) - runtime < hi:  # float rounding of the usable share
            least += 1
        shown = format_size(least, up=True)
        if shown == format_size(budget.max_ram):  # so close that the rounded figures would read the same
            shown = f"{least} bytes"
        raise PlanError(
            f"--max-ram {format_size(budget.max_ram)} is too small: tensor {tightest} needs at least {shown} "
            f"(--max-ram {least}B) for one row chunk; raise --max-ram to at least that"
            + (f" ({format_size(runtime)} of it for the fused kernels' runtime, which {kernels.ENV}=eager frees)"
               if runtime else "")
        )

    tensors: list[TensorPlan] = []
    for s, (emit_rows, stat_rows), tensor_scratch, chunk, p, f in zip(sizing, blocks, scratch, chunks, partial,
                                                                     tensor_fused):
        c, task, fp = s.cls, s.task, s.footprint
        if on_gpu:  # one kernel per operation on the whole chunk (the GPU has no cache to stay within)
            emit_rows = stat_rows = max(chunk, 1)
        state = fp.gpu_state if on_gpu else max(fp.stats_state + (fp.partial_tile if p else 0), fp.emit_state,
                                                fp.end_of_pass)
        tensors.append(TensorPlan(c.name, c.shape, c.rule, c.kind, c.out_dtype, shard_of[c.name], c.sources,
                                  max(chunk, 1), s.passes, emit_rows, stat_rows, state, tensor_scratch, tile,
                                  fps[c.name], c.copy_of, task.exact_products, task.on_gpu, c.kept_because,
                                  tensor_params.get(c.name, {}), c.scale, f))

    slot = max((sum(src.slot_bytes(t.chunk_rows) for src in t.sources) for t in tensors), default=0)
    out_buffer = max((align(t.chunk_rows * t.out_row_bytes) for t in tensors), default=0)
    ahead = max((a * t.chunk_rows for a, t in zip(ahead_per_row, tensors)), default=0)  # (settle's)
    peak = workers * (depth * (slot + out_buffer) + fixed + ahead) + runtime
    peak_vram = 0
    if on_gpu:
        peak_vram = gpu_state + max(
            (gpu_elem * t.chunk_rows * t.row_numel for t in tensors if t.rule.merged), default=0)
    return Plan(recipe, method, params, budget, tuple(tensors), shards, depth, tile, peak, slot, out_buffer, fixed,
                workers, peak_vram, sum(t.planned_read_bytes for t in tensors), sum(s.size for s in shards),
                run_fingerprint(doc), _notes(recipe, method, params, budget, tensors) + classification.notes
                + (vocab.notes if vocab is not None else ()), doc, base, tuple(models),
                classification.config_updates, resolve_template(recipe.chat_template,
                                                                 list(dict.fromkeys([recipe.base, *recipe.models]))),
                vocab, fused)


def base_is_averaged(recipe: Recipe, method: Method, params: dict[str, Any]) -> bool:
    """Whether the base is one of the averaged inputs rather than a base the models changed (a recipe's linear or
    karcher without ``base_model``, or ``use_base: false``)."""
    return (method.base_policy == "none" and recipe.source is not None) or params.get("use_base") is False


def _vocabulary(recipe: Recipe, method: Method, params: dict[str, Any], base: Checkpoint,
                models: list[Checkpoint]) -> VocabularyPlan | None:
    """The inputs' row maps onto the output's vocabulary when the recipe asks for one (``vocabulary``), decided once
    from the tokenizers (:mod:`streammerge.vocabulary`); None when rows are merged as stored."""
    if recipe.vocabulary is None:
        return None
    folders = [recipe.base, *recipe.models]
    seen: dict[tuple[str, str | None], int] = {}
    inputs = []
    for k, (folder, ckpt) in enumerate(zip(folders, (base, *models))):
        adapter = recipe.adapter(k)
        key = (str(folder.resolve()), str(adapter.resolve()) if adapter else None)
        rows = ckpt.matrix_rows((*(n for n in recipe.embeddings if n in TOKEN_EMBEDDINGS), *HEAD_NAMES))
        name = "the base" if k == 0 else f"model {k}"
        if rows is None:
            raise PlanError(f"{name} ({folder}) stores no known token embedding, so its rows cannot be mapped onto "
                            "the output's vocabulary: name it with --embedding NAME")
        inputs.append(VocabInput((*((adapter,) if adapter else ()), folder), rows, seen.setdefault(key, k), name))
    union = recipe.vocabulary == "union"
    source = recipe.base if union or recipe.tokenizer_from is None else recipe.tokenizer_from
    at = str(source.resolve())
    source_input = next((k for k, f in enumerate(folders) if str(f.resolve()) == at), None)
    tokens = {t: TokenDefault.from_json(d) for t, d in recipe.tokens.items()}
    return plan_vocabulary(inputs, union, source, source_input, tokens, recipe.pad_to_multiple_of,
                           named_base=recipe.named_base and params.get("use_base") is not False,
                           source_name=recipe.reference(source).split("@")[0] if str(source) in recipe.hub_refs
                           else source.name)


#: the value of a parameter in ``Plan.params`` when tensors have different values (``plan --json`` lists each)
VARIES = "varies per tensor"


def _tensor_params(recipe: Recipe, method: Method, base: Checkpoint, n: int, merged: list[TensorClass],
                   positions: dict[str, tuple[float, int]] | None = None) -> dict[str, dict[str, Any]]:
    """Every merged tensor's parameters (see :mod:`streammerge.parameters`), validated; equal values are shared.
    ``positions``: in a merge per layer range, each layer tensor's ``t`` within its slice and the slice's index;
    the other tensors take ``t = 0`` and the first slice's settings (the embedding) or the last's (the rest)."""
    n_layers = layer_count(list(base.tensors), base.config)
    everywhere = Levels.of(recipe.parameters, recipe.model_parameters)
    per_slice: dict[int, Levels] = {}
    for sl in recipe.slices:
        per_slice.setdefault(sl.index, Levels((sl.parameters, recipe.parameters), tuple(() for _ in recipe.models)))
    for sl in recipe.slices:
        own = list(per_slice[sl.index].own)
        for k, m in enumerate(recipe.models):
            if m.resolve() == sl.model.resolve():
                own[k] = (sl.source_parameters,)
        per_slice[sl.index] = replace(per_slice[sl.index], own=tuple(own))
    embeddings = set(recipe.embeddings)
    resolved: dict[str, dict[str, Any]] = {}
    out = {}
    for c in merged:
        if positions is None:
            t, levels = position(c.name, n_layers), everywhere
        else:
            t, index = positions.get(c.name, (0.0, min(per_slice) if c.name in embeddings else max(per_slice)))
            levels = per_slice[index]
        raw = raw_for_tensor(method, c.name, t, n, recipe.params, levels)
        key = repr(sorted(raw.items()))
        if key not in resolved:
            try:
                resolved[key] = method.resolve_params(raw, n)
            except MethodError as exc:
                raise MethodError(f"tensor {c.name}: {exc}") from None
        out[c.name] = resolved[key]
    return out


def _common(tensor_params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The parameters every tensor shares; :data:`VARIES` for those that differ."""
    first, *rest = tensor_params.values()
    return {k: v if all(p[k] == v for p in rest) else VARIES for k, v in first.items()}


def _notes(recipe: Recipe, method: Method, params: dict[str, Any], budget: Budget,
           tensors: list[TensorPlan]) -> tuple[str, ...]:
    notes = [budget.note] if budget.note else []
    if recipe.exclude and tensors and all(t.kept_because == "--exclude" for t in tensors if t.kind.value == "float"):
        notes.append("every floating-point tensor matches --exclude: the output is a copy of the base")
    out = recipe.out
    if recipe.force and out is not None and out.is_dir() and not (out / MANIFEST).is_file():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            notes.append(f"--force: {out} is not a streammerge output, and everything in it ({len(entries)} entries: "
                         f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}) is deleted when the merge "
                         "completes")
    if recipe.vocabulary is None:  # rows merged as stored: say when the tokenizers disagree on what a row is
        for k, m in enumerate(recipe.models, 1):
            differ = tokenizer_difference(recipe.base, m)
            if differ:
                notes.append(f"model {k} ({m})'s tokenizer differs from the base's ({differ}), and embedding rows "
                             "are merged as stored, row i with row i; --tokenizer-source union (or base) maps them "
                             "through the tokenizers")
    base = recipe.base.resolve()
    for k, m in enumerate(recipe.models, 1):
        if m.resolve() == base and not base_is_averaged(recipe, method, params) and recipe.adapter(k) == recipe.adapter(0):
            # (a recipe's linear or karcher averages its base as mergekit does, and without use_base the base only
            # gives the structure: nothing to point out)
            notes.append(f"model {k} ({m}) is the base itself: its delta is zero everywhere. Sums of deltas (task "
                         "arithmetic, TIES, DARE) are unchanged by it; averages and scores count it: it adds the base "
                         "to linear's average, dilutes the others in widen, and changes model_stock's ratio")
    return tuple(notes)


def _size(c: TensorClass, method: Method, params: dict[str, Any], n: int, tile: int, on_gpu: bool,
          out_dtypes: dict[str, str]) -> TensorSizing:
    """Bytes per element read and written, passes, and the memory footprint of one tensor."""
    exact = bool(c.sources) and all(s.narrow_float for s in c.sources)
    task = TensorTask(c.name, c.shape, c.rule, tile, exact_products=exact, on_gpu=on_gpu)
    e_out = DTYPES[c.out_dtype].bits // 8
    if c.rule is Rule.TIED_COPY:
        # a head stored in another dtype than its embedding: the embedding's output rows are read into a
        # temporary and converted through float32
        source = out_dtypes[c.copy_of or ""]
        scratch = 0 if source == c.out_dtype else DTYPES[source].bits // 8 + 4
        return TensorSizing(c, task, 0, e_out, 0, 0, Footprint(emit_per_element=scratch))
    in_bytes = sum(s.stored_element_bytes for s in c.sources)
    fixed_slot = sum(s.fixed_slot_bytes for s in c.sources)
    if c.rule is Rule.COPY_BASE:
        return TensorSizing(c, task, in_bytes, e_out, 0, 0,
                            _with_sources(Footprint(emit_per_element=4 + e_out), c.sources), fixed_slot)
    # the runner's float32 copies of the inputs: the base always, a model unless the method takes it as stored
    copies = 4 + sum(0 if method.raw_models and src.raw_exact else 4 for src in c.sources[1:])
    kernel_path = all(src.raw_exact for src in c.sources) and method.start(task, params, n).kernel_path()
    return TensorSizing(c, task, in_bytes, e_out, method.stat_passes(c.rule, params), copies,
                        _with_sources(method.footprint(task, n, params), c.sources), fixed_slot, kernel_path)


def _with_sources(fp: Footprint, sources: tuple[InputSource, ...]) -> Footprint:
    """``fp`` plus what the sources allocate while they make float32 rows (a LoRA product): one source at a time,
    so the largest, per block element and per block, in every pass and on a GPU too."""
    elem = max((s.scratch_per_element for s in sources), default=0)
    fixed = max((s.scratch_fixed for s in sources), default=0)
    if not elem and not fixed:
        return fp
    uploaded = sum(s.fixed_slot_bytes for s in sources)  # on a GPU the parts read whole are uploaded too
    return replace(fp, stats_per_element=fp.stats_per_element + elem, emit_per_element=fp.emit_per_element + elem,
                   stats_state=fp.stats_state + fixed, emit_state=fp.emit_state + fixed,
                   gpu_per_element=fp.gpu_per_element + elem, gpu_state=fp.gpu_state + fixed + uploaded)


def _partial(rows_per_step: int, rows: int, tile: int) -> bool:
    """Whether steps of ``rows_per_step`` rows leave tiles incomplete (a stash) in a tensor of ``rows`` rows."""
    return rows_per_step < rows and rows_per_step % tile != 0


def _scratch(s: TensorSizing, blocks: tuple[int, int], partial: bool, slack: int = 1) -> int:
    """The most compute memory ``s`` needs on the CPU: the larger of its statistics blocks (with the partial-tile
    reserve when blocks or chunks are not whole tiles), its merge blocks, and the end of a statistics pass; a
    block's temporaries ``slack`` times over (:data:`EAGER_HEAP_SLACK` on the eager path)."""
    fp, rows, rn = s.footprint, max(s.task.rows, 1), max(s.task.row_numel, 1)
    emit_rows, stat_rows = blocks
    emit = fp.emit_state + slack * (s.copies + fp.emit_per_element) * min(rows, emit_rows) * rn
    if not s.passes:
        return emit
    stats = (fp.stats_state + slack * (s.copies + fp.stats_per_element) * min(rows, stat_rows) * rn
             + (fp.partial_tile if partial else 0))
    return max(emit, stats, fp.end_of_pass)


def _workers(budget: Budget, usable: int, fits: Callable[[int], bool]) -> int:
    """How many tensors are computed at once: on the CPU, one worker per thread (``budget.threads``), each
    single-threaded in its own share of the budget, as many as ``fits(share)`` allows (at least one); on a GPU one,
    its kernels using the device. Workers share nothing a tensor's bytes depend on (each tensor's statistics are
    reduced in row order, whichever worker computes a block), so the output is the same for any number. Why workers
    and not torch's intra-op threads: :mod:`streammerge.workers`."""
    if budget.device != "cpu" or budget.threads <= 1:
        return 1
    lo, hi = 1, budget.threads  # the most workers whose shares fit: fitting only gets harder with more
    if fits(usable // hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(usable // mid) else (lo, mid)
    return lo


def _block_rows(s: TensorSizing, cap: int, tile: int) -> tuple[int, int]:
    """(merge-pass, statistics-pass) rows per compute block: cache-sized, statistics in whole tiles."""
    rows, rn = max(s.task.rows, 1), max(s.task.row_numel, 1)
    if s.task.rule is Rule.VECTOR:
        return rows, rows  # merged whole
    emit_rows = max(1, min(BLOCK_ELEMENTS, cap) // rn)
    stat_rows = max(1, cap // rn)
    if stat_rows >= tile:  # whole tiles, as many as make a block of about STAT_BLOCK_ELEMENTS
        stat_rows = tile * max(1, min(stat_rows, STAT_BLOCK_ELEMENTS // rn) // tile)
    return emit_rows, stat_rows


def _chunk_rows(recipe: Recipe, rule: Rule, rows: int, row_numel: int, chunk_elems: int, tile: int) -> int:
    """Rows per chunk: the most that fit ``chunk_elems``, a multiple of the reduction tile where possible;
    0 if not even one row (or, for a VECTOR, the whole tensor) fits."""
    fit = chunk_elems // max(row_numel, 1)
    if rule is Rule.VECTOR:
        return rows if fit >= rows or recipe.chunk_rows else 0
    if recipe.chunk_rows is not None:
        return min(recipe.chunk_rows, max(rows, 1))
    if fit >= rows:
        return max(rows, 1)
    return fit // tile * tile if fit >= tile else fit


def _kept_from_base(tensors: tuple[TensorPlan, ...] | list[TensorPlan]) -> dict[str, list[str]]:
    """The tensors that keep the base's value, by reason (``--exclude``, derived buffer, empty, not a float)."""
    out: dict[str, list[str]] = {}
    for t in tensors:
        if t.kept_because:
            out.setdefault(t.kept_because, []).append(t.name)
    return out
