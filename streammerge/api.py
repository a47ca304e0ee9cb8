"""The Python API: ``plan(...)``, ``merge(...)`` and ``inspect(...)``, the only place besides the CLI that
knows every part. Each builds a :class:`Recipe`, reads headers, plans, and (for ``merge``) executes."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from .budget import make_budget
from .classify import in_natural_order, name_problems
from .errors import InputError, PlanError, Problems, QuantizationError
from .execute import execute
from .formats.checkpoint import Checkpoint, load_checkpoint
from .formats.dtypes import parse_output_dtype
from .formats.peft_adapter import is_adapter_folder, load_adapter
from .fsio import check_platform
from .hub import Resolved, is_hub_id, resolve
from .lora import adapter_inputs, load_input, split_inputs, split_reference
from .manifest import MANIFEST
from .methods import Method, get_method
from .output import TOKENIZER_PATTERNS, check_destination, check_output_name, tokenizer_files, work_folder_for
from .planner import Plan, make_plan
from .pythonic import pythonic_errors
from .quantization import dequantization
from .recipe import TOKEN_EMBEDDINGS, Recipe, tokenizer_source_fields
from .vocabulary import read_vocabulary
from .workfolder import check_output_free, finished_output


def plan_recipe(recipe: Recipe, dry_run: bool = False, method: Method | None = None) -> Plan:
    """Read the inputs' headers and plan ``recipe``; nothing is written. Every independent check runs, and all the
    problems found are raised together (:class:`~streammerge.errors.ProblemsError` when there are several).
    ``method``: an unregistered method instead of ``recipe.method`` (``streammerge analyze``'s statistics).

    ``dry_run`` (``streammerge plan``): the output folder is not required to be free (or given at all); a merge
    would refuse what a dry run only describes.
    """
    check_platform()
    recipe = adapter_inputs(resolve_references(recipe))  # a model given as an adapter alone: that adapter on the base
    problems = Problems()
    out = recipe.out
    # an output holding a finished merge is checked after planning: the same merge again is simply complete
    deferred = dry_run or out is None or (_names_a_folder(out) and (out / MANIFEST).is_file())
    if not deferred:
        with problems.check():
            check_destination(out, recipe.force)
    with problems.check():
        _check_folders(recipe)
    checkpoints: list[Checkpoint | None] = []
    for k, folder in enumerate((recipe.base, *recipe.models)):
        with problems.check():
            checkpoints.append(load_input(folder, recipe.adapter(k)))  # with its LoRA adapter's headers, if any
            continue
        checkpoints.append(None)
    with problems.check():
        checked = method or get_method(recipe.method)
        checked.check_models(len(recipe.models))
        checked.resolve_params(recipe.params, len(recipe.models))
    if recipe.dtype:
        with problems.check():
            parse_output_dtype(recipe.dtype)
    with problems.check():
        budget = make_budget(recipe.max_ram, recipe.device, recipe.max_vram, recipe.threads)
    if all(c is not None for c in checkpoints):
        with problems.check():
            problems.errors += [PlanError(m) for m in name_problems(recipe, checkpoints[0], checkpoints[1:])]
    if checkpoints[0] is not None and not (checkpoints[0].folder / "config.json").is_file() \
            and not recipe.allow_incomplete_output:
        problems.errors.append(InputError(
            f"the base {recipe.base} has no config.json, so the merged model could not be loaded (transformers needs "
            "it); add one, or pass --allow-incomplete-output to write the weights anyway"))
    problems.raise_all()
    base, *models = checkpoints
    assert base is not None and all(m is not None for m in models)
    p = make_plan(recipe, base, models, budget, method)  # type: ignore[arg-type]
    if not dry_run and out is not None and deferred and not finished_output(p) \
            and not work_folder_for(out).is_dir():
        check_output_free(p)
    return p


def resolve_references(recipe: Recipe) -> Recipe:
    """``recipe`` with every Hub ID (base, models, tokenizer) replaced by its cached snapshot folder, and the IDs
    recorded in ``hub_refs`` (see :mod:`streammerge.hub`); a recipe of local folders is returned as it is."""
    refs = [recipe.base, *recipe.models, *((recipe.tokenizer_from,) if recipe.tokenizer_from else ()),
            *(s.model for s in recipe.slices), *(a for a in recipe.adapters if a is not None)]
    if not any(is_hub_id(r) for r in refs):
        return recipe
    problems = Problems()
    resolved: dict[str, Resolved] = {}
    for r in refs:
        with problems.check():
            resolved[str(r)] = resolve(r, recipe.offline)
    problems.raise_all()
    folder = {k: v.folder for k, v in resolved.items()}
    hub_refs = {**recipe.hub_refs, **{str(v.folder): v.reference for v in resolved.values() if v.repo_id}}
    return replace(recipe, base=folder[str(recipe.base)], models=tuple(folder[str(m)] for m in recipe.models),
                   tokenizer_from=folder[str(recipe.tokenizer_from)] if recipe.tokenizer_from else None,
                   slices=tuple(replace(s, model=folder[str(s.model)]) for s in recipe.slices), hub_refs=hub_refs,
                   adapters=tuple(None if a is None else folder[str(a)] for a in recipe.adapters))


def _names_a_folder(out: Path) -> bool:
    try:
        check_output_name(out)
    except PlanError:
        return False
    return True


def _check_folders(recipe: Recipe) -> None:
    """The input folders: distinct, apart from the output, and a --tokenizer-source folder that holds a tokenizer."""
    if recipe.tokenizer_from is not None:
        given = str(recipe.tokenizer_from)
        if not recipe.tokenizer_from.is_dir():
            near = difflib.get_close_matches(given, ["base", "union"], n=1, cutoff=0.6)
            raise PlanError(f"--tokenizer-source {given} is not a folder" + (
                f"; did you mean {near[0]!r}?" if near else "") + " (base, union, or a model folder)")
        if not tokenizer_files(recipe.tokenizer_from):
            raise PlanError(f"--tokenizer-source {given} holds no tokenizer files "
                            f"({', '.join(TOKENIZER_PATTERNS[:3])}, ...)")
    seen: dict[tuple[Path, Path | None], str] = {}
    for i, folder in enumerate((recipe.base, *recipe.models)):
        who = "the base" if i == 0 else f"model {i}"
        adapter = recipe.adapter(i)
        real = (folder.resolve(), adapter.resolve() if adapter is not None else None)  # a model with its adapter
        if real in seen and i > 0 and seen[real] != "the base":
            same = "the same folder" if real[1] is None else "the same model and LoRA adapter"
            raise PlanError(f"{who} ({recipe.input_reference(i)}) is {same} as {seen[real]}: give each model once")
        seen.setdefault(real, who)
    if recipe.out is None or not _names_a_folder(recipe.out):
        return
    out = recipe.out.resolve()
    for folder in (recipe.base, *recipe.models, *((recipe.tokenizer_from,) if recipe.tokenizer_from else ()),
                   *(a for a in recipe.adapters if a is not None)):
        real = folder.resolve()
        if real == out or out in real.parents:
            raise PlanError(f"--out {recipe.out} is the input folder {folder} or contains it; choose another output folder")
        if real in out.parents:  # a model nested in an input would be taken for part of it (and copied with it)
            raise PlanError(f"--out {recipe.out} is inside the input folder {folder}; choose an output folder outside "
                            "every input")


def plan(base: str | Path, models: str | Path | Sequence[str | Path], out: str | Path | None = None,
         method: str = "widen", params: dict[str, Any] | None = None, **options: Any) -> Plan:
    """Plan a merge without running it; nothing is written and ``out`` may be left out or hold anything (a merge
    checks it). ``models``: one folder or a list of them (``"MODEL+ADAPTER"``: with a PEFT LoRA adapter merged in on
    the fly; or ``adapters=[...]``, one per input, the base's first); ``options`` are :class:`Recipe` fields (dtype,
    max_ram, exclude, force, ...). Raises :class:`~streammerge.errors.StreamMergeError` naming every problem found."""
    with pythonic_errors():
        return plan_recipe(_recipe(base, models, out, method, params, options, ()), dry_run=True)


def merge(base: str | Path, models: str | Path | Sequence[str | Path], out: str | Path, method: str = "widen",
          params: dict[str, Any] | None = None, progress: bool = False, handle_signals: bool = False,
          notify: Callable[[str], None] | None = None, part: str | tuple[int, int] | None = None,
          executor: str = "local", ray_address: str | None = None, parts: int | None = None,
          resize_shards: bool = False, **options: Any) -> Path:
    """Merge ``models`` (one folder or a list) onto ``base`` into the folder ``out``; returns ``out``.

    ``handle_signals`` installs SIGINT/SIGTERM handlers for the duration of the merge (a stop at the next block);
    by default the caller's handlers stay and Ctrl-C arrives as ``KeyboardInterrupt`` (the work is kept either way).
    ``notify`` receives notices that do not stop the merge (default: ``MergeNotice`` warnings).

    Beyond one process (see :mod:`streammerge.parts`): ``part="K/N"`` writes only part K of N into ``out``'s work
    folder (then :func:`finalize`); ``executor="ray"`` runs the parts as Ray tasks (``ray_address``, ``parts``: how
    many, default one per node) and publishes. ``resize_shards``: lower ``shard_size`` when there are fewer output
    shard files than parts.

    Example: ``merge("base", ["chat", "multilingual"], "merged", method="widen", params={"t": 1.0}, max_ram="2GiB")``
    """
    from .parts import parse_part, plan_parts  # noqa: PLC0415

    own = ("progress", "handle_signals", "notify", "part", "executor", "ray_address", "parts", "resize_shards")
    with pythonic_errors():
        recipe = _recipe(base, models, out, method, params, options, own)
        if executor == "ray":
            if part is not None:
                raise PlanError("part= runs one part here; executor='ray' runs every part: give one of them")
            from .ray_executor import merge_on_ray  # noqa: PLC0415

            return merge_on_ray(recipe, parts, ray_address, resize_shards, progress, notify,
                                handle_signals=handle_signals).out
        if executor != "local":
            raise PlanError(f"executor {executor!r}: use 'local' or 'ray'")
        if ray_address is not None or parts is not None:
            raise PlanError("ray_address= and parts= go with executor='ray'")
        if part is None:
            if resize_shards:
                raise PlanError("resize_shards=True goes with part= or executor='ray'")
            return execute(plan_recipe(recipe), show_progress=progress, handle_signals=handle_signals, notify=notify)
        k, n = parse_part(part) if isinstance(part, str) else parse_part(f"{part[0]}/{part[1]}")
        p = plan_parts(recipe, n, resize_shards)
        return execute(p, show_progress=progress, handle_signals=handle_signals, notify=notify,
                       unit=p.units(n)[k - 1])


def finalize(out: str | Path, progress: bool = False, recheck: bool = False) -> Path:
    """Publish a merge run in parts (``merge(..., part="K/N")`` for every K) as the folder ``out``: every part is
    checked (present, complete, its bytes matching their journaled CRC-32s: each part checked its own as it ended;
    files modified since, or all with ``recheck``, are read again), then the index, side files, manifest and model
    card are written, exactly as one process writes them. Returns ``out`` (also when it was finalized before).
    Raises :class:`~streammerge.parts.PartError` naming each missing, unfinished or damaged part."""
    from .parts import finalize as finalize_parts  # noqa: PLC0415

    with pythonic_errors():
        finalize_parts(out, show_progress=progress, recheck=recheck)
    return Path(out)


#: Recipe fields that are not keyword options of ``plan``/``merge`` (positional, or for tests and benchmarks)
_NOT_OPTIONS = ("base", "models", "out", "method", "params", "chunk_rows", "journal")


def _adapter_info(folder: Path) -> dict[str, Any]:
    """A PEFT LoRA adapter's settings and tensors, for :func:`inspect`."""
    adapter = load_adapter(folder)
    s = adapter.settings
    return {"folder": str(folder), "r": s.r, "lora_alpha": s.lora_alpha, "use_rslora": s.use_rslora,
            "use_dora": s.use_dora, "base_model_name_or_path": s.base_model_name_or_path,
            "tensors": len(adapter.tensors), "bytes": adapter.total_bytes,
            "modules": sorted({n.rsplit(".lora_", 1)[0] for n in adapter.tensors if ".lora_" in n})}


def _recipe(base: Any, models: Any, out: Any, method: str, params: dict[str, Any] | None,
            options: dict[str, Any], own: tuple[str, ...]) -> Recipe:
    """The recipe of a ``plan``/``merge`` call; ``own``: the calling function's other keyword arguments."""
    if "tokenizer_source" in options:  # mergekit's name: base, union or a model folder
        options.update(tokenizer_source_fields(options.pop("tokenizer_source")))
    if "adapters" not in options:  # MODEL+ADAPTER references (mergekit's model+lora)
        base, models, options["adapters"] = split_inputs(base, models)
    try:
        return Recipe(base=Path(base), models=models, out=None if out is None else Path(out), method=method,
                      params=dict(params or {}), **options)
    except TypeError as exc:  # an unknown keyword: name the ones there are, with the nearest
        given = re.search(r"keyword argument '(\w+)'", str(exc))
        public = ["method", "params", *own, *(f.name for f in fields(Recipe) if f.name not in _NOT_OPTIONS),
                  "tokenizer_source"]
        near = difflib.get_close_matches(given.group(1), public, n=1) if given else []
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise TypeError(f"unexpected keyword argument {given.group(1) if given else '?'!r}: {hint}the arguments "
                        f"besides base, models and out are: {', '.join(public)}") from None


def inspect(folder: str | Path, offline: bool = False) -> dict[str, Any]:
    """What a model folder holds: tensors, dtypes, shapes, shards, parameter count, tying, vocabulary (the embedding
    rows and the tokenizer's tokens), and quantization (``"FP8 (...)"``, dequantized on the fly; ``"not dequantized:
    ..."``, refused; or None). ``MODEL+ADAPTER`` (or an adapter folder alone) adds ``"adapter"``: its LoRA settings
    and tensors. Either side may be a Hub ID, resolved as merge resolves it (from the cache only when ``offline``
    or ``HF_HUB_OFFLINE``; see :mod:`streammerge.hub`). Raises :class:`~streammerge.errors.InputError` for a folder
    that is neither."""
    model_ref, adapter_ref = split_reference(str(folder))
    hub_id = model_ref if is_hub_id(model_ref) else None
    model_ref = str(resolve(model_ref, offline).folder)
    adapter_ref = None if adapter_ref is None else str(resolve(adapter_ref, offline).folder)
    if adapter_ref is None and is_adapter_folder(Path(model_ref)):
        return {"folder": model_ref, "adapter": _adapter_info(Path(model_ref))}
    ckpt: Checkpoint = load_checkpoint(model_ref)
    try:
        quantization = dequantization(ckpt).description
    except QuantizationError as exc:
        quantization = f"not dequantized: {exc.evidence}"
    dtypes: dict[str, int] = {}
    for loc in ckpt.tensors.values():
        dtypes[loc.info.dtype.name] = dtypes.get(loc.info.dtype.name, 0) + 1
    embedding = next((e for e in TOKEN_EMBEDDINGS if e in ckpt.tensors), None)
    try:
        vocab = read_vocabulary(ckpt.folder)
    except InputError as exc:
        tokenizer: dict[str, Any] | None = {"error": str(exc)}
    else:
        tokenizer = None if vocab is None else {"tokens": len(vocab.ids), "highest_id": max(vocab.ids.values(),
                                                                                            default=-1),
                                                "added": [e["content"] for e in vocab.added]}
    return {
        "folder": str(ckpt.folder),
        **({"hub_id": hub_id} if hub_id else {}),
        "model_type": ckpt.model_type,
        "architectures": ckpt.architectures,
        "parameters": ckpt.parameter_count,
        "bytes": ckpt.total_bytes,
        "tied_embeddings": ckpt.tied(),
        "vocab_size": ckpt.vocab_size,
        "embedding_rows": ckpt.tensors[embedding].info.shape[0] if embedding else None,
        "tokenizer": tokenizer,
        "quantization": quantization,
        "dtypes": dtypes,
        "shards": [{"file": name, "bytes": h.file_size, "tensors": len(h.tensors)} for name, h in ckpt.shards.items()],
        **({"adapter": _adapter_info(Path(adapter_ref))} if adapter_ref is not None else {}),
        "tensors": [
            {"name": n, "dtype": loc.info.dtype.name, "shape": list(loc.info.shape), "shard": loc.shard.name}
            for n, loc in in_natural_order(ckpt)
        ],
    }
