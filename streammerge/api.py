"""The Python API: ``plan(...)``, ``merge(...)`` and ``inspect(...)``, the only place besides the CLI that
knows every part. Each builds a :class:`Recipe`, reads headers, plans, and (for ``merge``) executes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .budget import make_budget
from .errors import PlanError
from .execute import execute
from .formats.checkpoint import Checkpoint, load_checkpoint
from .fsio import check_platform
from .manifest import MANIFEST
from .output import check_destination, work_folder_for
from .planner import Plan, make_plan
from .recipe import TOKEN_EMBEDDINGS, Recipe


def plan_recipe(recipe: Recipe) -> Plan:
    """Read the inputs' headers and plan ``recipe`` (nothing is written)."""
    check_platform()
    # an output published by an interrupted run (its work folder still there) is checked against the plan later
    if not (work_folder_for(recipe.out).is_dir() and (recipe.out / MANIFEST).is_file()):
        check_destination(recipe.out, recipe.force)
    if recipe.tokenizer_from is not None and not recipe.tokenizer_from.is_dir():
        raise PlanError(f"--tokenizer-from {recipe.tokenizer_from} is not a folder")
    out = recipe.out.resolve()
    for folder in (recipe.base, *recipe.models, *((recipe.tokenizer_from,) if recipe.tokenizer_from else ())):
        if folder.resolve() == out or out in folder.resolve().parents:
            raise PlanError(f"--out {recipe.out} is the input folder {folder} or contains it; choose another output folder")
    base = load_checkpoint(recipe.base)
    models = [load_checkpoint(m) for m in recipe.models]
    return make_plan(recipe, base, models, make_budget(recipe.max_ram, recipe.device, recipe.max_vram))


def plan(base: str | Path, models: Sequence[str | Path], out: str | Path, method: str = "widen",
         params: dict[str, Any] | None = None, **options: Any) -> Plan:
    """Plan a merge without running it. ``options`` are :class:`Recipe` fields (dtype, max_ram, exclude, ...)."""
    return plan_recipe(Recipe(base=Path(base), models=tuple(Path(m) for m in models), out=Path(out),
                              method=method, params=dict(params or {}), **options))


def merge(base: str | Path, models: Sequence[str | Path], out: str | Path, method: str = "widen",
          params: dict[str, Any] | None = None, progress: bool = False, handle_signals: bool = False,
          notify: Callable[[str], None] | None = None, **options: Any) -> Path:
    """Merge ``models`` onto ``base`` into the folder ``out``; returns ``out``.

    ``handle_signals`` installs SIGINT/SIGTERM handlers for the duration of the merge (a stop at the next block);
    by default the caller's handlers stay and Ctrl-C arrives as ``KeyboardInterrupt`` (the work is kept either way).
    ``notify`` receives notices about a continued run (default: ``ResumeNotice`` warnings).

    Example: ``merge("base", ["chat", "multilingual"], "merged", method="widen", params={"t": 1.0}, max_ram="2GiB")``
    """
    p = plan(base, models, out, method, params, **options)
    return execute(p, show_progress=progress, handle_signals=handle_signals, notify=notify)


def inspect(folder: str | Path) -> dict[str, Any]:
    """What a model folder holds: tensors, dtypes, shapes, shards, parameter count, tying and vocabulary."""
    ckpt: Checkpoint = load_checkpoint(folder)
    dtypes: dict[str, int] = {}
    for loc in ckpt.tensors.values():
        dtypes[loc.info.dtype.name] = dtypes.get(loc.info.dtype.name, 0) + 1
    embedding = next((e for e in TOKEN_EMBEDDINGS if e in ckpt.tensors), None)
    return {
        "folder": str(ckpt.folder),
        "model_type": ckpt.model_type,
        "architectures": ckpt.architectures,
        "parameters": ckpt.parameter_count,
        "bytes": ckpt.total_bytes,
        "tied_embeddings": ckpt.tied(),
        "vocab_size": ckpt.vocab_size,
        "embedding_rows": ckpt.tensors[embedding].info.shape[0] if embedding else None,
        "dtypes": dtypes,
        "shards": [{"file": name, "bytes": h.file_size, "tensors": len(h.tensors)} for name, h in ckpt.shards.items()],
        "tensors": [
            {"name": n, "dtype": loc.info.dtype.name, "shape": list(loc.info.shape), "shard": loc.shard.name}
            for n, loc in ckpt.tensors.items()
        ],
    }
