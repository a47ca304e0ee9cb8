"""The output folder: a work folder beside the destination, filled, then moved into place in one rename.

The destination is never touched until the merged model is complete: shards, ``model.safetensors.index.json``,
``config.json`` (with the output dtype), ``generation_config.json``, tokenizer files, a manifest and a model card
are assembled in ``<out>.streammerge-partial/model``, each file fsynced as it is written (tokenizer models and
merges files too), the folder fsynced, and renamed to ``<out>``; then the folder holding ``<out>`` is fsynced. An
existing non-empty destination is an error unless ``force`` is set, in which case it is replaced only after the
new one is complete. Writes go through :mod:`streammerge.fsio`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import fsio
from ._version import __version__
from .errors import InputError, PlanError
from .remote_code import code_files

TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template*", "*.tiktoken", "spiece.model", "sentencepiece*.model", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json",
)
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: the recipe that reruns the merge, and the mergekit recipe it came from (when it did), beside the weights
RECIPE_FILE, MERGEKIT_FILE = "streammerge_recipe.yaml", "mergekit_config.yml"


class _Removed:
    def __repr__(self) -> str:
        return "REMOVED"


#: a ``config_updates`` value that removes the key (e.g. the ``quantization_config`` of a dequantized base)
REMOVED: Any = _Removed()


def work_folder_for(out: Path) -> Path:
    return out.with_name(out.name + ".streammerge-partial")


def check_not_moved(recorded: Path | str | None, out: Path) -> None:
    """Refuse to continue or publish the work folder of ``out`` when it was made for another output ``recorded``
    (the folder was moved or copied: its journal and recipe name that output, which the run would then write)."""
    if recorded is not None and Path(recorded).resolve() != Path(out).resolve():
        raise PlanError(f"{work_folder_for(Path(out))} holds a merge into {recorded}, not into {out}: a work folder "
                        f"cannot be moved or copied; move it back to {work_folder_for(Path(recorded))} and continue "
                        "there")


def check_output_name(out: Path) -> None:
    """Refuse an output path that does not name a folder (``.``, ``..``, an empty string)."""
    if str(out) in ("", ".") or out.name in ("", ".", ".."):
        raise PlanError(f"--out {str(out)!r} does not name a folder to create: give the path of the merged model's "
                        "folder, e.g. --out merged")


def check_destination(out: Path, force: bool) -> None:
    """Refuse an output path that cannot name a new folder, a place that cannot be written, or a folder that holds
    something (unless ``force``)."""
    check_output_name(out)
    if out.exists() and not out.is_dir():
        raise PlanError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PlanError(f"output folder {out} exists and is not empty; choose another --out or pass --force to replace it")
    check_can_create_in(fsio.parent_of(out), "the output", "choose another --out")


def check_can_create_in(parent: Path, what: str, advice: str) -> None:
    """Refuse a folder ``parent`` in which ``what`` cannot be created: missing, on a read-only or virtual file
    system, or not writable (``advice`` ends each message)."""
    if not parent.is_dir():
        raise PlanError(f"the folder {parent} that should hold {what} does not exist (a typo is caught this way, "
                        f"where mergekit creates it): create it with mkdir -p {parent}, or {advice}")
    fs = os.statvfs(parent)
    if fs.f_flag & os.ST_RDONLY:
        raise PlanError(f"{parent} is on a read-only file system; {advice}")
    if fs.f_blocks == 0:
        raise PlanError(f"{parent} is on a virtual file system (like /proc), not a disk; {advice}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PlanError(f"cannot write in {parent} (permission denied); {advice}")


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to a new file ``path``, fsynced."""
    fsio.write_file(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_index(work: Path, weight_map: dict[str, str], total_size: int) -> None:
    write_json(work / "model.safetensors.index.json", {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def copy_side_files(work: Path, base: Path, tokenizer_from: Path | None, out_dtype: str | None,
                    config_updates: dict[str, Any] | None = None,
                    tokenizer_documents: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """config.json (dtype and ``config_updates`` applied, also inside a nested ``text_config`` that has the key; a
    value of :data:`REMOVED` removes the key),
    generation_config.json, tokenizer and processor files (those in ``tokenizer_documents``, name to JSON, written
    instead: a union vocabulary's), and the Python files a remote-code model's ``auto_map`` names (copied, never
    run); returns the names copied."""
    copied: list[str] = []
    config_path = base / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if out_dtype in TORCH_DTYPE_NAMES:
            for key in ("torch_dtype", "dtype"):
                if key in config or key == "torch_dtype":
                    config[key] = TORCH_DTYPE_NAMES[out_dtype]
        for key, value in (config_updates or {}).items():
            for where in (config, config.get("text_config")):
                if not isinstance(where, dict) or (where is not config and key not in where):
                    continue
                if value is REMOVED:
                    where.pop(key, None)
                else:
                    where[key] = value
        write_json(work / "config.json", config)
        copied.append("config.json")
    if (base / "generation_config.json").is_file():
        fsio.copy_file(base / "generation_config.json", work / "generation_config.json")
        copied.append("generation_config.json")
    source = tokenizer_from or base
    if tokenizer_from is not None and not tokenizer_from.is_dir():
        raise InputError(f"--tokenizer-source {tokenizer_from} is not a folder")
    for f in tokenizer_files(source):
        if f.name not in (tokenizer_documents or {}):
            fsio.copy_file(f, work / f.name)
            copied.append(f.name)
    for name, doc in (tokenizer_documents or {}).items():
        write_json(work / name, doc)
        copied.append(name)
    # remote code: the model's modules from the base, the tokenizer's from where the tokenizer comes from
    tokenizer_code = sorted(p for p in source.glob("tokenization_*.py") if p.is_file())
    for f in [*code_files(base, ("config.json",)), *code_files(source, ("tokenizer_config.json",)), *tokenizer_code]:
        if f.name not in copied:
            fsio.copy_file(f, work / f.name)
            copied.append(f.name)
    return copied


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files in ``folder`` (each once, in pattern order)."""
    found: dict[str, Path] = {}
    for pattern in TOKENIZER_PATTERNS:
        for f in sorted(folder.glob(pattern)):
            if f.is_file():
                found.setdefault(f.name, f)
    return list(found.values())


#: plan options that are command-line flags (the card lists these; the recipe block shows every setting)
CARD_FLAGS = ("dtype", "exclude", "embedding", "keep_vision", "tokenizer_source")


def write_model_card(work: Path, plan_dict: dict[str, Any], recipe_yaml: str | None = None) -> None:
    """README.md: YAML front matter the Hugging Face Hub reads (``base_model`` lists the inputs: their Hub IDs, or
    folder names, ``base_model_relation: merge``, ``library_name``, ``tags``), then what was merged, how, with which
    parameters, and ``recipe_yaml`` (the recipe that reruns it) with input folders by name."""
    import yaml  # noqa: PLC0415

    # folder names, not paths: the card must not depend on how the command spelled them (or on resume)
    refs = plan_dict.get("references", {})  # Hub IDs of inputs resolved through the cache: named by their ID
    adapters = plan_dict.get("adapters") or [None] * (1 + len(plan_dict["models"]))  # MODEL+ADAPTER
    paths = [str(Path(p).resolve()) for p in (plan_dict["base"], *plan_dict["models"], *(a for a in adapters if a))]
    display = _display_names(list(dict.fromkeys(p for p in paths if p not in refs)))

    def name(p: str) -> str:
        return refs[p].split("@")[0] if p in refs else display[str(Path(p).resolve())]

    names = [name(p) for p in (plan_dict["base"], *plan_dict["models"])]
    front = {"base_model": list(dict.fromkeys([*names, *(name(a) for a in adapters if a)])),
             "base_model_relation": "merge", "library_name": "transformers",
             "tags": ["merge", "streammerge", plan_dict["method"], *(["lora"] if any(adapters) else [])]}
    names = [n if a is None else f"{n}+{name(a)}" for n, a in zip(names, adapters)]
    params = ", ".join(f"{k}={_shown(v)}" for k, v in plan_dict["params"].items()) or "none"
    models = "\n".join(f"- `{name}`" for name in names[1:])
    options = "".join(f"- `--{k.replace('_', '-')}`" + (f" `{v}`" if not isinstance(v, bool) else "") + "\n"
                      for k, values in plan_dict.get("options", {}).items() if k in CARD_FLAGS
                      for v in (values if isinstance(values, list) else [values]))
    recipe = recipe_yaml
    if recipe is not None:
        for p in sorted(display, key=len, reverse=True):  # longest first: a path inside another stays whole
            recipe = recipe.replace(p, display[p])
    stacked = recipe is not None and "slices:" in recipe
    inputs = (f"Layers from {', '.join(f'`{n}`' for n in dict.fromkeys(names))}: the recipe below gives the ranges."
              if stacked else f"Base: `{names[0]}`\n\nModels, in order:\n{models}")
    text = (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# Merged model\n\nMade with streammerge {__version__} using the **{plan_dict['method']}** method "
        f"({params}).\n\n## Inputs\n\n{inputs}\n\n"
        + (f"## Options\n\n{options}\n" if options else "")
        + (f"## Recipe\n\n```yaml\n{recipe.rstrip()}\n```\n\n" if recipe else "")
        + f"## Reproduce\n\n`streammerge merge {RECIPE_FILE} --out FOLDER` reruns this merge ({RECIPE_FILE} is "
        "beside the weights, with the inputs' full paths).\n\n"
        + f"Plan fingerprint: `{plan_dict['fingerprint']}`\n"
    )
    fsio.write_file(work / "README.md", text.encode("utf-8"))


def _display_names(paths: list[str]) -> dict[str, str]:
    """Each folder by its name, with as many parent folders as tell apart folders of the same name."""
    out = {}
    for p in paths:
        parts = Path(p).parts
        depth = 1
        while depth < len(parts) and any(q != p and Path(q).parts[-depth:] == parts[-depth:] for q in paths):
            depth += 1
        out[p] = "/".join(parts[-depth:])
    return out


def _shown(value: Any) -> str:
    """A parameter's value as a reader writes it: lists for per-model values, numbers as they are."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def write_recipe_files(work: Path, recipe: Any) -> list[str]:
    """``streammerge_recipe.yaml`` (the merge as a recipe that reruns it) and, for a merge from a mergekit recipe,
    ``mergekit_config.yml`` (that recipe as read); returns the names written."""
    fsio.write_file(work / RECIPE_FILE, recipe.to_yaml().encode("utf-8"))
    source = recipe.source  # the mergekit recipe as written (None for a command-line merge)
    if source is None:
        return [RECIPE_FILE]
    fsio.write_file(work / MERGEKIT_FILE, source.encode("utf-8"))
    return [RECIPE_FILE, MERGEKIT_FILE]


def publish(model: Path, out: Path, force: bool) -> None:
    """Move the complete ``model`` folder (every file already fsynced) to ``out`` in one rename, replacing an old
    one only with ``force``, and make the rename durable."""
    fsio.sync_dir(model)
    parent = fsio.parent_of(out)
    old = None
    if out.exists():
        if any(out.iterdir()) and not force:
            raise PlanError(f"output folder {out} appeared during the merge; the result is kept in {model}")
        old = out.with_name(out.name + ".streammerge-old")
        fsio.remove_tree(old)
        fsio.rename(out, old)
    fsio.rename(model, out, sync_folders=[parent])
    if old is not None:
        fsio.remove_tree(old)
