"""The executor: runs a Plan chunk by chunk: read → float32 → method → finite check → cast → writer.

For each tensor: the statistics passes (if the method has any) read every row chunk of the base and the models
and feed the method; the emit pass reads them again, asks the method for the float32 result, checks it is
finite, casts it to the planned output dtype and writes it at its planned offset. Consumed input pages are
released after each chunk, so resident memory follows the chunk size. Progress (bytes read, phase, rate) goes to
stderr through tqdm.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import NonFiniteError
from .formats.checkpoint import Located
from .formats.dtypes import DTYPES, parse_output_dtype
from .formats.reader import ShardReader
from .methods import Rule, TensorTask
from .output import copy_side_files, prepare_work_folder, publish, write_index, write_model_card
from .plan import Plan, TensorPlan
from .writer import ShardFile

ProgressFactory = Callable[..., tqdm]


class _Run:
    """State of one execution: the reader, the shard writers and the progress bar."""

    def __init__(self, plan: Plan, work: Path, progress: tqdm) -> None:
        self.plan = plan
        self.reader = ShardReader()
        self.files = {s.filename: ShardFile(s, work) for s in plan.shards}
        self.progress = progress

    def locs(self, name: str) -> list[Located]:
        # A tied head may be absent from a model; it is never merged (TIED_COPY), so base-only is fine there.
        return [self.plan.base.tensors[name]] + [m.tensors[name] for m in self.plan.models if name in m.tensors]

    def read(self, t: TensorPlan, locs: list[Located], r0: int, r1: int) -> list[torch.Tensor]:
        """Rows [r0, r1) of every input as float32, then release the mapped pages."""
        out = []
        for k, loc in enumerate(locs):
            raw = self.reader.rows(loc, r0, r1)
            x = raw.to(torch.float32, copy=True)
            self.reader.release(loc, r0, r1)
            self.progress.update(raw.numel() * loc.info.dtype.bits // 8)
            if not torch.isfinite(x).all():
                who = "the base" if k == 0 else f"model {k} ({self.plan.recipe.models[k - 1]})"
                raise NonFiniteError(f"tensor {t.name} rows [{r0}, {r1}) of {who} contain NaN or infinity")
            out.append(x)
        return out

    def write(self, t: TensorPlan, r0: int, result: torch.Tensor) -> None:
        dtype = DTYPES[t.out_dtype].torch
        assert dtype is not None
        cast = result.to(dtype)
        if cast.is_floating_point() and not torch.isfinite(cast).all():
            raise NonFiniteError(
                f"tensor {t.name} rows [{r0}, {r0 + result.shape[0] if result.dim() else 1}): the merged values "
                + ("overflow " + t.out_dtype if torch.isfinite(result).all() else "contain NaN or infinity")
            )
        row_bytes = _row_numel(t.shape) * DTYPES[t.out_dtype].bits // 8
        data = cast.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.files[t.shard].write_at(t.name, r0 * row_bytes, memoryview(data))

    def copy_base(self, t: TensorPlan) -> None:
        loc = self.plan.base.tensors[t.name]
        same = loc.info.dtype.name == t.out_dtype
        for r0, r1 in t.chunks():
            raw = self.reader.rows(loc, r0, r1)
            if same:  # raw bytes, bit for bit (integers, bools, or no dtype change)
                row_bytes = loc.info.row_numel * loc.info.dtype.bits // 8
                data = raw.contiguous().reshape(-1).view(torch.uint8).numpy()
                self.files[t.shard].write_at(t.name, r0 * row_bytes, memoryview(data))
            else:
                self.write(t, r0, raw.to(torch.float32))
            self.reader.release(loc, r0, r1)
            self.progress.update(raw.numel() * loc.info.dtype.bits // 8)

    def tied_copy(self, t: TensorPlan) -> None:
        assert t.source is not None
        src = next(p for p in self.plan.tensors if p.name == t.source)
        row_bytes = _row_numel(t.shape) * DTYPES[t.out_dtype].bits // 8
        for r0, r1 in t.chunks():
            data = self.files[src.shard].read_at(src.name, r0 * row_bytes, (r1 - r0) * row_bytes)
            self.files[t.shard].write_at(t.name, r0 * row_bytes, data)
            self.progress.update(len(data))

    def merge(self, t: TensorPlan) -> None:
        n = len(self.plan.models)
        merger = self.plan.method.start(TensorTask(t.name, t.shape, t.rule), self.plan.params, n)
        locs = self.locs(t.name)
        chunks = t.chunks()
        for p in range(merger.stat_passes):
            self.progress.set_description(f"statistics pass {p + 1}")
            for r0, r1 in chunks:
                base, *models = self.read(t, locs, r0, r1)
                merger.accumulate(p, r0, base, models)
            merger.end_pass(p)
        self.progress.set_description("merge pass")
        for r0, r1 in chunks:
            base, *models = self.read(t, locs, r0, r1)
            self.write(t, r0, merger.emit(r0, base, models))


def _row_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def execute(plan: Plan, show_progress: bool = True) -> Path:
    """Run ``plan`` and publish the merged model folder; returns its path."""
    recipe = plan.recipe
    work = prepare_work_folder(recipe.out)
    bar = tqdm(total=plan.bytes_read, unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress,
               desc="starting", dynamic_ncols=True, leave=False)
    run = _Run(plan, work, bar)
    ok = False
    try:
        with ExitStack() as stack:
            stack.callback(run.reader.close)
            stack.callback(bar.close)
            for f in run.files.values():
                f.create()
                stack.callback(f.abort)
            # tied heads copy their embedding's merged bytes, so they go after everything else
            ordered = sorted(plan.tensors, key=lambda t: t.rule is Rule.TIED_COPY)
            for t in ordered:
                bar.set_postfix_str(t.name, refresh=False)
                if t.rule is Rule.COPY_BASE:
                    run.copy_base(t)
                elif t.rule is Rule.TIED_COPY:
                    run.tied_copy(t)
                else:
                    run.merge(t)
            for f in run.files.values():
                f.finalize()
        if len(plan.shards) > 1:
            weight_map = {t.name: t.shard for t in plan.tensors}
            write_index(work, weight_map, sum(s.size - len(s.header) for s in plan.shards))
        out_dtype = parse_output_dtype(recipe.dtype).name if recipe.dtype else None
        copy_side_files(work, recipe.base, recipe.tokenizer_from, out_dtype)
        write_model_card(work, plan.to_dict())
        publish(work, recipe.out, recipe.force)
        ok = True
    finally:
        if not ok:
            shutil.rmtree(work, ignore_errors=True)
    return recipe.out
