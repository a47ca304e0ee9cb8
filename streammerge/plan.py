"""The planner: recipe + checkpoint headers + method + budget → a Plan, before any tensor byte is read.

Pure apart from reading headers (done by the caller). It checks the models are homologous, gives every tensor a
rule, lays out the output shards and their exact headers, sizes row chunks so the predicted peak stays within
the budget, counts the bytes to read and write, and fingerprints everything that determines the output bytes.
An impossible request (budget, shapes, names, parameters) is refused here, before any output exists.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .budget import Budget
from .errors import IncompatibleModelsError, PlanError
from .formats.checkpoint import Checkpoint
from .formats.dtypes import DTYPES, parse_output_dtype
from .formats.reader import align
from .methods import Method, Rule, TensorTask, get_method
from .methods._tiles import TILE
from .methods.base import MERGED_RULES
from .pipeline import DEPTH
from .recipe import HEAD_NAMES, TOKEN_EMBEDDINGS, Recipe
from .units import format_size
from .writer import OutTensor, ShardLayout, layout_shard, shard_filename, split_into_shards


#: Share of --max-ram the planned buffers may fill; the rest absorbs allocator slack and small temporaries.
BUDGET_USABLE = 0.85
#: Share of --max-vram the planned GPU tensors may fill (the caching allocator rounds and fragments).
VRAM_USABLE = 0.85
#: elements per compute block of a merge pass: the block's float32 temporaries stay in the CPU caches
BLOCK_ELEMENTS = 1 << 18
#: Share of --max-vram the planned GPU tensors may fill (the caching allocator rounds and fragments).
VRAM_USABLE = 0.85
#: elements per compute block of a statistics pass (at least one reduction tile of rows)
STAT_BLOCK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class TensorPlan:
    """How one output tensor is produced."""

    name: str
    shape: tuple[int, ...]
    rule: Rule
    out_dtype: str
    shard: str
    chunk_rows: int  # rows read (and written) per chunk
    stat_passes: int
    block_rows: int  # rows per compute block of the merge pass (cache-sized; the whole chunk for VECTOR)
    stat_block_rows: int  # rows per compute block of the statistics passes (whole reduction tiles where possible)
    state_bytes: int  # predicted per-tensor state kept across passes
    source: str | None = None  # for TIED_COPY: the tensor whose merged bytes are copied
    exact_products: bool = False  # all inputs are 16-bit floats (see TensorTask)
    on_gpu: bool = False  # merged on a GPU (see TensorTask)

    @property
    def task(self) -> TensorTask:
        return TensorTask(self.name, self.shape, self.rule, self.exact_products, self.on_gpu)

    @property
    def rows(self) -> int:
        return self.task.rows

    @property
    def out_row_bytes(self) -> int:
        """Bytes of one output row."""
        return self.task.row_numel * DTYPES[self.out_dtype].bits // 8

    @property
    def resident(self) -> bool:
        """Read once for every pass: the whole tensor is one chunk."""
        return self.chunk_rows >= self.rows

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
            e = min(r1, (b // TILE * TILE + step) if step % TILE == 0 else b + step)
            out.append((b, e))
            b = e
        return out or [(r0, r1)]


@dataclass(frozen=True)
class Plan:
    """Everything execution needs, decided up front. ``to_dict`` is its JSON form."""

    recipe: Recipe
    method: Method
    params: dict[str, Any]
    budget: Budget
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardLayout, ...]
    peak_ram: int  # every planned buffer: DEPTH input slots + DEPTH output buffers + the largest scratch
    slot_bytes: int  # one input slot: a chunk of every input, as stored
    out_buffer_bytes: int  # one output buffer: a chunk of output bytes
    scratch_bytes: int  # the largest per-tensor state + compute-block temporaries
    peak_vram: int  # predicted GPU memory for tensors (0 on the CPU)
    bytes_read: int
    bytes_written: int
    fingerprint: str
    fingerprint_doc: dict[str, Any] = field(repr=False)
    base: Checkpoint = field(repr=False)
    models: tuple[Checkpoint, ...] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        rules: dict[str, int] = {}
        for t in self.tensors:
            rules[t.rule.value] = rules.get(t.rule.value, 0) + 1
        return {
            "streammerge": __version__,
            "method": self.method.name,
            "params": self.params,
            "base": str(self.recipe.base),
            "models": [str(m) for m in self.recipe.models],
            "out": str(self.recipe.out),
            "device": self.budget.device,
            "device_source": self.budget.device_source,
            "budget": {"max_ram": self.budget.max_ram, "source": self.budget.source,
                       **({"max_vram": self.budget.max_vram, "vram_source": self.budget.vram_source}
                          if self.budget.max_vram else {})},
            "predicted_peak_ram": self.peak_ram,
            **({"predicted_peak_vram": self.peak_vram} if self.peak_vram else {}),
            "buffers": {"input_slots": DEPTH, "slot_bytes": self.slot_bytes, "output_buffers": DEPTH,
                        "output_buffer_bytes": self.out_buffer_bytes, "scratch_bytes": self.scratch_bytes},
            "read_once": sum(1 for t in self.tensors if t.stat_passes and t.resident),
            "read_per_pass": sum(1 for t in self.tensors if t.stat_passes and not t.resident),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "fingerprint": self.fingerprint,
            "rules": rules,
            "shards": [
                {"file": s.filename, "bytes": s.size, "tensors": len(s.offsets)} for s in self.shards
            ],
            "tensors": [
                {
                    "name": t.name, "shape": list(t.shape), "rule": t.rule.value, "dtype": t.out_dtype,
                    "shard": t.shard, "chunk_rows": t.chunk_rows, "chunks": len(t.chunks()),
                    "passes": t.stat_passes + 1, "reads": 1 if t.resident else t.stat_passes + 1,
                    **({"source": t.source} if t.source else {}),
                }
                for t in self.tensors
            ],
        }


def make_plan(recipe: Recipe, base: Checkpoint, models: list[Checkpoint], budget: Budget) -> Plan:
    """Plan the merge of ``models`` onto ``base``; raises before anything is written if it cannot work."""
    method = get_method(recipe.method)
    method.check_models(len(models))
    params = method.resolve_params(recipe.params, len(models))
    out_dtype = parse_output_dtype(recipe.dtype).name if recipe.dtype else None
    head = _check_homologous(base, models)
    excludes = _compile_excludes(recipe.exclude)
    embeddings = set(recipe.embeddings)
    n = len(models)

    tensors: list[TensorPlan] = []
    problems: list[str] = []
    out_tensors: list[OutTensor] = []
    drafts: list[tuple[str, tuple[int, ...], Rule, str, str | None]] = []
    for name, loc in base.tensors.items():
        info = loc.info
        source = None
        if head is not None and name == head[0]:
            rule, source = Rule.TIED_COPY, head[1]
        elif any(rx.match(name) for rx in excludes) or not info.dtype.is_float:
            rule = Rule.COPY_BASE
        elif len(info.shape) <= 1:
            rule = Rule.VECTOR
        elif len(info.shape) == 2:
            rule = Rule.EMBEDDING if name in embeddings else Rule.MATRIX
        else:
            rule = Rule.TENSOR
        if rule not in (Rule.COPY_BASE, Rule.TIED_COPY):
            why = method.rule_error(TensorTask(name, info.shape, rule))
            if why:
                problems.append(f"{name} {list(info.shape)}: {why}")
            for k, m in enumerate(models):
                if not m.tensors[name].info.dtype.is_float:
                    problems.append(f"{name}: model {k + 1} stores it as {m.tensors[name].info.dtype.name}, not a float")
        dtype = out_dtype if (out_dtype and info.dtype.is_float) else info.dtype.name
        drafts.append((name, info.shape, rule, dtype, source))
        out_tensors.append(OutTensor(name, dtype, info.shape))
    if problems:
        raise PlanError(
            f"{method.name} cannot merge {len(problems)} tensor(s):\n  " + "\n  ".join(problems[:10])
            + "\nexclude them (they keep the base value) with --exclude REGEX"
        )

    groups = split_into_shards(out_tensors, recipe.shard_size)
    shards = tuple(layout_shard(shard_filename(i, len(groups)), g) for i, g in enumerate(groups))
    shard_of = {t: s.filename for s in shards for t in s.offsets}

    in_bytes = {name: [loc.info.dtype.bits // 8 for loc in _all_locs(base, models, name)] for name in base.tensors}
    usable = int(budget.max_ram * BUDGET_USABLE)
    # Per tensor: bytes per element read (every input as stored) and written, compute-block sizes and the fixed
    # bytes its compute needs (state + block temporaries). Blocks are capped to a quarter of the budget.
    sizing = []
    for name, shape, rule, dtype, source in drafts:
        task = TensorTask(name, shape, rule, exact_products=max(in_bytes[name]) <= 2,
                          on_gpu=budget.device.startswith("cuda"))
        e_out = DTYPES[dtype].bits // 8
        if rule is Rule.TIED_COPY:
            e_in, passes, state, per_elem = 0, 0, 0, 0
        elif rule is Rule.COPY_BASE:
            e_in, passes, state, per_elem = in_bytes[name][0], 0, 0, 4 + e_out
        else:
            e_in = sum(in_bytes[name])
            passes = method.stat_passes(rule, params)
            state = method.state_bytes(task, n)
            per_elem = 4 * (n + 1) + method.scratch_bytes_per_element(rule, n) + 4
        sizing.append((task, e_in, e_out, passes, state, per_elem))
    # compute blocks take at most a quarter of what the per-tensor state leaves
    max_state = max((s[4] for s in sizing), default=0)
    cap = max(1, (usable - max_state) // (4 * max((s[5] for s in sizing), default=1) or 1))
    blocks, fixed = [], 0
    for task, e_in, e_out, passes, state, per_elem in sizing:
        rows, rn = max(task.rows, 1), max(task.row_numel, 1)
        if task.rule is Rule.VECTOR:
            emit_rows = stat_rows = rows  # merged whole
        else:
            emit_rows = max(1, min(BLOCK_ELEMENTS, cap) // rn)
            stat_rows = max(1, cap // rn)
            if stat_rows >= TILE:  # whole tiles, as many as make a block of about STAT_BLOCK_ELEMENTS
                stat_rows = TILE * max(1, min(stat_rows, STAT_BLOCK_ELEMENTS // rn) // TILE)
        block_elems = min(rows, max(emit_rows, stat_rows if passes else 0)) * rn
        blocks.append((emit_rows, stat_rows))
        fixed = max(fixed, state + per_elem * block_elems)
    per_elem_buffers = DEPTH * (max((s[1] for s in sizing), default=0) + max((s[2] for s in sizing), default=0))
    chunk_elems = (usable - fixed) // max(per_elem_buffers, 1)
    on_gpu = budget.device.startswith("cuda")
    peak_vram = 0
    if on_gpu:
        # a chunk on the GPU: its inputs as stored and as float32, the method's scratch, the result and its cast
        merged = [s for s in sizing if s[0].rule not in (Rule.COPY_BASE, Rule.TIED_COPY)]
        gpu_elem = max((s[5] + s[1] + s[2] for s in merged), default=1)
        vram_usable = int((budget.max_vram or 0) * VRAM_USABLE) - max_state
        least = max((s[0].numel if s[0].rule is Rule.VECTOR else s[0].row_numel for s in merged), default=0)
        if vram_usable < gpu_elem * least:
            need = (max_state + gpu_elem * least) / VRAM_USABLE
            raise PlanError(f"--max-vram {format_size(budget.max_vram or 0)} is too small: one row chunk needs "
                            f"{format_size(need)} of GPU memory; raise --max-vram, or use --device cpu")
        chunk_elems = min(chunk_elems, vram_usable // gpu_elem)
        peak_vram = max_state + gpu_elem * chunk_elems

    bytes_read = 0
    widest: tuple[int, str] = (0, "")
    for (task, e_in, e_out, passes, state, per_elem), (emit_rows, stat_rows), (name, shape, rule, dtype, source) in zip(
            sizing, blocks, drafts):
        rows, rn = task.rows, task.row_numel
        chunk = _chunk_rows(recipe, rule, rows, rn, chunk_elems)
        if rule in MERGED_RULES or rule is Rule.TENSOR:
            reads = 1 if chunk >= rows else passes + 1  # a tensor that fits whole is read once for all its passes
            bytes_read += reads * rows * rn * e_in
        elif rule is Rule.COPY_BASE:
            bytes_read += rows * rn * e_in
        else:
            bytes_read += rows * rn * e_out
        if chunk < 1:  # the least that works: one-row blocks and chunks (the whole tensor for a VECTOR)
            least = rn * (rows if rule is Rule.VECTOR else 1)
            need = max_state + max((s[5] for s in sizing), default=0) * least + per_elem_buffers * least
            if need > widest[0]:
                widest = (need, name)
        if on_gpu:  # one kernel per operation on the whole chunk (the GPU has no cache to stay within)
            emit_rows = stat_rows = max(chunk, 1)
        tensors.append(TensorPlan(name, shape, rule, dtype, shard_of[name], max(chunk, 1), passes, emit_rows,
                                  stat_rows, state, source, task.exact_products, task.on_gpu))
    if widest[0]:
        raise PlanError(
            f"--max-ram {format_size(budget.max_ram)} is too small: tensor {widest[1]} needs at least "
            f"{format_size(widest[0] / BUDGET_USABLE)} ({int(widest[0] / BUDGET_USABLE) + 1} bytes) for one row chunk; "
            "raise --max-ram to at least that"
        )

    locs = {t.name: _all_locs(base, models, t.name) for t in tensors}
    slot = max((_slot_bytes(t, locs[t.name]) for t in tensors), default=0)
    out_buffer = max((align(t.chunk_rows * t.out_row_bytes) for t in tensors), default=0)
    peak = DEPTH * (slot + out_buffer) + fixed
    if on_gpu:
        peak_vram = min(peak_vram, max_state + max(
            (gpu_elem * t.chunk_rows * t.task.row_numel for t in tensors if t.rule in MERGED_RULES), default=0))
    written = sum(s.size for s in shards)
    doc = fingerprint_document(recipe, method, params, base, models, shards, budget.device)
    fingerprint = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return Plan(recipe, method, params, budget, tuple(tensors), shards, peak, slot, out_buffer, fixed, peak_vram,
                bytes_read, written, fingerprint, doc, base, tuple(models))


def _all_locs(base: Checkpoint, models: list[Checkpoint], name: str) -> list:
    return [base.tensors[name]] + [m.tensors[name] for m in models if name in m.tensors]


def _chunk_rows(recipe: Recipe, rule: Rule, rows: int, row_numel: int, chunk_elems: int) -> int:
    """Rows per chunk: the most that fit ``chunk_elems``, a multiple of the reduction tile where possible;
    0 if not even one row (or, for a VECTOR, the whole tensor) fits."""
    fit = chunk_elems // max(row_numel, 1)
    if rule is Rule.VECTOR:
        return rows if fit >= rows or recipe.chunk_rows else 0
    if recipe.chunk_rows is not None:
        return min(recipe.chunk_rows, max(rows, 1))
    if fit >= rows:
        return max(rows, 1)
    return fit // TILE * TILE if fit >= TILE else fit


def _slot_bytes(t: TensorPlan, locs: list) -> int:
    """Bytes of one input slot for a chunk of ``t`` (every input it reads, each aligned)."""
    if t.rule is Rule.TIED_COPY:
        return 0
    if t.rule is Rule.COPY_BASE:
        locs = locs[:1]
    return sum(align(t.chunk_rows * loc.info.row_numel * loc.info.dtype.bits // 8) for loc in locs)


def _compile_excludes(patterns: tuple[str, ...]) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise PlanError(f"--exclude {p!r} is not a valid regular expression: {exc}") from None
    return out


def _check_homologous(base: Checkpoint, models: list[Checkpoint]) -> tuple[str, str] | None:
    """Raise unless every model matches the base; return (head, embedding) when a tied head is stored."""
    head_name = next((h for h in HEAD_NAMES if h in base.tensors), HEAD_NAMES[0])
    tied = base.tied(head_name)
    for k, m in enumerate(models, 1):
        who = f"model {k} ({m.folder})"
        if base.model_type and m.model_type and base.model_type != m.model_type:
            raise IncompatibleModelsError(
                f"{who} is a {m.model_type!r} model but the base ({base.folder}) is {base.model_type!r}"
            )
        if base.architectures and m.architectures and base.architectures != m.architectures:
            raise IncompatibleModelsError(
                f"{who} has architectures {m.architectures} but the base has {base.architectures}"
            )
        if m.tied(head_name) != tied:
            raise IncompatibleModelsError(
                f"{who} {'ties' if m.tied(head_name) else 'does not tie'} its output head to the embedding but the "
                f"base {'does' if tied else 'does not'}: merging them would need a policy; exclude or untie one"
            )
        skip = {head_name} if tied else set()
        missing = sorted(set(base.tensors) - set(m.tensors) - skip)
        extra = sorted(set(m.tensors) - set(base.tensors) - skip)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} of the base's tensors (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"has {len(extra)} the base lacks (e.g. {', '.join(extra[:3])})")
            raise IncompatibleModelsError(f"{who} {' and '.join(parts)}: the models are not homologous")
        for name, loc in base.tensors.items():
            other = m.tensors.get(name)
            if other is None:
                continue
            if other.info.shape != loc.info.shape:
                hint = ""
                if name in TOKEN_EMBEDDINGS or name in HEAD_NAMES:
                    hint = " (vocabulary sizes differ: resize the embeddings to one vocabulary first)"
                raise IncompatibleModelsError(
                    f"tensor {name}: shape {list(other.info.shape)} in {who} but {list(loc.info.shape)} in the base"
                    + hint
                )
    if tied and head_name in base.tensors:
        source = next((e for e in TOKEN_EMBEDDINGS if e in base.tensors), None)
        if source is None:
            raise IncompatibleModelsError(
                f"{base.folder}: config ties {head_name} to the embedding, but no known token embedding is stored"
            )
        if base.tensors[source].info.shape != base.tensors[head_name].info.shape:
            raise IncompatibleModelsError(f"{base.folder}: tied {head_name} and {source} have different shapes")
        return head_name, source
    return None


def fingerprint_document(recipe: Recipe, method: Method, params: dict[str, Any], base: Checkpoint,
                         models: list[Checkpoint], shards: tuple[ShardLayout, ...], device: str = "cpu") -> dict[str, Any]:
    """Everything that determines the output bytes (not the chunking or the budget); the fingerprint hashes it.
    The kind of device is part of it: CPU and GPU results agree only within float tolerance."""

    def inputs(c: Checkpoint) -> dict[str, Any]:
        out = {}
        for name, h in c.shards.items():
            st = Path(h.path).stat()
            desc = json.dumps([[t.name, t.dtype.name, list(t.shape), t.begin, t.end] for t in h.tensors.values()])
            out[name] = [st.st_size, st.st_mtime_ns, hashlib.sha256(desc.encode()).hexdigest()]
        return {"folder": str(c.folder.resolve()), "shards": out}

    return {
        "method": method.name, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "dtype": recipe.dtype, "exclude": list(recipe.exclude), "embeddings": list(recipe.embeddings),
        "inputs": [inputs(base)] + [inputs(m) for m in models],
        "layout": hashlib.sha256(b"".join(s.header for s in shards)).hexdigest(),
        "device": device.split(":")[0],
    }


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprint documents."""
    changes = []
    for key in ("method", "params", "dtype", "exclude", "embeddings", "device"):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    old_in, new_in = old.get("inputs", []), new.get("inputs", [])
    if len(old_in) != len(new_in):
        changes.append(f"number of models: {len(old_in) - 1} -> {len(new_in) - 1}")
    for i, (a, b) in enumerate(zip(old_in, new_in)):
        who = "base" if i == 0 else f"model {i}"
        if a.get("folder") != b.get("folder"):
            changes.append(f"{who} folder: {a.get('folder')} -> {b.get('folder')}")
            continue
        for shard in sorted(set(a["shards"]) | set(b["shards"])):
            if a["shards"].get(shard) != b["shards"].get(shard):
                changes.append(f"{who} file {shard} changed (size, modification time or header)")
    if old.get("layout") != new.get("layout") and not changes:
        changes.append("output layout (shard size or dtypes)")
    return changes or ["the plan fingerprint"]
