"""Recipes as YAML: mergekit's configuration schema read with its meaning, and every merge written back as one.

:func:`load` reads a mergekit recipe (mergekit 0.1.5, ``mergekit/config.py``) into a :class:`Recipe`:

- ``merge_method``, ``base_model``, ``models: [{model, parameters}]``, global ``parameters``, ``dtype`` and
  ``out_dtype``, ``tokenizer_source: base | union | <model>`` (or ``tokenizer: {source, tokens,
  pad_to_multiple_of}``, whose source defaults to union). Parameter settings keep
  mergekit's meaning per tensor (gradients, ``filter`` conditions, precedence): :mod:`streammerge.parameters`.
- ``dtype`` is what mergekit computes in; streammerge always computes in float32 (exact for 16-bit inputs), so
  ``dtype`` only sets the output dtype when ``out_dtype`` is absent, as mergekit's output would have.
- A model listed in ``models`` that is also ``base_model`` is the base, not a model to merge (mergekit's task
  arithmetic family treats it so); for ``linear``, which has no base in mergekit, it stays one of the averaged
  models. A ``linear`` recipe without ``base_model`` takes its first model as the base streammerge checks the
  others against and copies side files from.
- A tokenizer source maps every input's token embedding and head rows through its own tokenizer onto the
  output's vocabulary (:mod:`streammerge.vocabulary`: mergekit's semantics, the union's order made deterministic,
  never fewer rows than the base); ``tokens:`` entries name a model (``source: MODEL``), ``{kind: zero}`` or
  ``{kind: model_token, model, token_id | token}``, with ``force``.
- ``chat_template: auto | chatml | <Jinja template>`` sets the output's template (:mod:`streammerge.chat_template`).
- ``int8_mask`` and ``lazy_unpickle`` (mergekit memory tricks, as parameters or top-level keys) are accepted and
  change nothing here.
- ``slices:`` with ``merge_method: passthrough`` stacks layer ranges (a frankenmerge); with another method, each
  slice merges the same models' layer ranges (:mod:`streammerge.slices`).
- ``model: MODEL+ADAPTER`` (mergekit's ``model+lora``, also for ``base_model``) is the model with a PEFT LoRA
  adapter merged in on the fly (:mod:`streammerge.lora`); ``passthrough`` of one ``MODEL+ADAPTER`` writes the merged
  model (``streammerge apply``).
- Keys streammerge does not implement yet (per-slice or per-source parameters outside passthrough, ``modules``,
  ``model+lora`` in ``slices:``) are refused by name before
  anything happens; an unknown key gets a "did you mean".
- A ``streammerge:`` section carries options mergekit has no key for (``average_base: false``: a command line's
  ``--base`` that linear or karcher does not average, ``exclude``, ``embedding``,
  ``keep_vision``, ``shard_size``); mergekit ignores it.

Relative model paths are taken from the current folder (as mergekit does), else from the recipe's folder; a
reference that names no folder and reads as a Hub ID (``org/name``, ``org/name@revision``) is resolved through
the Hugging Face cache when the merge is planned (:mod:`streammerge.hub`).
:func:`dump` writes any recipe, a command-line one included, in this schema with absolute paths, so an output
folder's ``streammerge_recipe.yaml`` reruns the merge as is.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from .errors import StreamMergeError
from .hub import is_hub_id
from .recipe import LayerSlice, Recipe, tokenizer_source_fields

#: top-level keys read here
KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
        "chat_template", "slices", "modules", "streammerge", "int8_mask", "lazy_unpickle")
#: keys mergekit has that streammerge does not implement yet, with what to do instead
NOT_YET = {
    "modules": "per-module configurations (modules:) are not supported yet",
}
#: keys of mergekit-moe's configuration (``mergekit/moe/config.py``): refused by name
MOE_KEYS = ("gate_mode", "experts", "experts_per_token", "shared_experts")
#: the options of the ``streammerge:`` section and the Recipe fields they set
OPTIONS = {"exclude": "exclude", "embedding": "embedding_names", "keep_vision": "keep_vision",
           "shard_size": "shard_size"}


class RecipeError(StreamMergeError):
    """A YAML recipe that cannot be read or asks for something streammerge does not do."""


def load(path: str | Path, **options: Any) -> Recipe:
    """The recipe in the YAML file ``path``; ``options`` are further :class:`Recipe` fields (``out``, ``max_ram``...).

    Raises :class:`RecipeError` naming the key for a file that is not a mergekit recipe, a key not supported yet,
    an unknown key (with a "did you mean") or a model folder that does not exist."""
    import yaml  # noqa: PLC0415 (only recipes need it)

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if len(docs) > 1:
        raise RecipeError(f"{path} holds {len(docs)} YAML documents: a mergekit-multi file (several merges, each "
                          "named), which streammerge does not run; give each merge its own recipe file")
    doc = docs[0] if docs else None
    return from_dict(doc, path, text, **options)


def from_dict(doc: Any, path: Path, text: str, **options: Any) -> Recipe:
    """The recipe of the parsed mergekit configuration ``doc`` (read from ``path``, whose ``text`` is kept for
    ``mergekit_config.yml``); see :func:`load`."""
    options.setdefault("out", None)  # a recipe names no output: planned without one unless the caller gives it
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (merge_method, base_model, models, ...), got "
                          f"{type(doc).__name__}")
    if "name" in doc and "merge_method" in doc:
        raise RecipeError(f"{path}: name: belongs to mergekit-multi files (several named merges), which streammerge "
                          "does not run; remove it, or give each merge its own recipe file")
    moe = [k for k in MOE_KEYS if k in doc]
    if moe:
        raise RecipeError(f"{path}: {', '.join(moe)}: this is a mergekit-moe configuration (it builds a mixture of "
                          "experts out of dense models, with gates from prompts), which streammerge does not do; "
                          "streammerge merges checkpoints of one architecture, MoE checkpoints included")
    _check_keys(doc, KEYS, f"{path}:", "key")
    for key, why in NOT_YET.items():
        if doc.get(key) is not None:
            raise RecipeError(f"{path}: {why}")
    method = doc.get("merge_method")
    if not isinstance(method, str) or not method:
        raise RecipeError(f"{path}: merge_method is missing (e.g. merge_method: widen)")
    if doc.get("slices") is not None:
        return _slices_recipe(doc, path, method, options, text)
    if method == "passthrough":  # models: form: a copy of one model (dtype, scale)
        entries = doc.get("models")
        if not isinstance(entries, list) or len(entries) != 1:
            raise RecipeError(f"{path}: passthrough copies one model (models: with one entry), or stacks layer "
                              "ranges with slices:")
        entry = entries[0] if isinstance(entries[0], dict) else {"model": entries[0]}
        _check_keys(entry, ("model", "parameters"), f"{path}: models entry 1:", "key")
        model, adapter = _model(entry.get("model"), path, "models entry 1")
        if adapter is not None:  # model+lora copied: the adapter merged into the model (streammerge apply)
            if entry.get("parameters") or doc.get("parameters"):
                raise RecipeError(f"{path}: passthrough parameters (scale) with model+lora are not supported yet")
            return _recipe(doc, path, text, options, base=model, models=(), adapters=(adapter,), method=method)
        doc = {**{k: v for k, v in doc.items() if k != "models"}, "slices": [{"sources": [
            {"model": entry.get("model"), "layer_range": "all", **({"parameters": entry["parameters"]}
                                                                   if entry.get("parameters") else {})}]}]}
        return _slices_recipe(doc, path, method, options, text)
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{path}: models: is missing or empty; list the models to merge as "
                          "models: [{model: FOLDER, parameters: {...}}]")
    models, model_parameters, adapters = [], [], []
    for k, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(f"{path}: models entry {k} needs a model: key, got {entry!r}")
        _check_keys(entry, ("model", "parameters"), f"{path}: models entry {k}:", "key")
        model, adapter = _model(entry["model"], path, f"models entry {k}")
        models.append(model)
        adapters.append(adapter)
        model_parameters.append(_mapping(entry.get("parameters"), path, f"models entry {k}'s parameters"))
    base_ref = doc.get("base_model")
    base, base_adapter = _model(base_ref, path, "base_model") if base_ref is not None else (None, None)
    policy = _base_policy(method)
    averaged = _mapping(doc.get("streammerge"), path, "the streammerge: section").get("average_base", True)
    if not isinstance(averaged, bool):
        raise RecipeError(f"{path}: streammerge: average_base must be true or false, got {averaged!r}")
    parameters = _mapping(doc.get("parameters"), path, "parameters")
    if base is None:
        _need_base(method, path)
        base, base_adapter = models[0], adapters[0]  # the structure's reference; the method combines the models
        if policy == "optional":
            parameters = {**parameters, "use_base": False}
    elif policy != "none":  # the base listed among the models is the base, not a model (its entry is dropped)
        keep = [k for k, m in enumerate(models) if not _same(m, adapters[k], base, base_adapter)]
        models, model_parameters = [models[k] for k in keep], [model_parameters[k] for k in keep]
        adapters = [adapters[k] for k in keep]
    elif averaged and all(not _same(m, a, base, base_adapter) for m, a in zip(models, adapters)):
        models.append(base)  # mergekit averages a base it is given, listed last (average_base false: a command
        # line's --base, which linear and karcher do not average)
        model_parameters.append({})
        adapters.append(base_adapter)
    return _recipe(doc, path, text, options, base=base, models=tuple(models), method=method,
                   named_base=base_ref is not None, parameters=parameters, adapters=(base_adapter, *adapters),
                   model_parameters=tuple(model_parameters) if any(model_parameters) else ())


def _recipe(doc: dict[str, Any], path: Path, text: str, options: dict[str, Any], **what: Any) -> Recipe:
    """The Recipe of ``what`` the models:/slices: reading decided, with what both forms read alike (dtype,
    tokenizer, chat template, the ``streammerge:`` section, the recipe's text) and the caller's ``options``."""
    extra = _mapping(doc.get("streammerge"), path, "the streammerge: section")
    _check_keys(extra, (*OPTIONS, "average_base"), f"{path}: streammerge:", "option")
    extra = {k: v for k, v in extra.items() if k != "average_base"}  # read where the models are decided
    return Recipe(**{
        **what, "dtype": doc.get("out_dtype") or doc.get("dtype"), **_tokenizer(doc, path, what),
        "chat_template": _chat_template(doc, path), "pad_to_multiple_of": _pad(doc, path), "source": text,
        **{OPTIONS[k]: v for k, v in extra.items()}, **options})


def _slices_recipe(doc: dict[str, Any], path: Path, method: str, options: dict[str, Any],
                   text: str) -> Recipe:
    """A ``slices:`` recipe: passthrough layer stacking, or a merge per layer range (:mod:`streammerge.slices`)."""
    if doc.get("models") is not None:
        raise RecipeError(f"{path}: give models: or slices:, not both")
    entries = doc["slices"]
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{path}: slices: must list slices, e.g. - sources: [{{model: FOLDER, layer_range: [0, 16]}}]")
    passthrough = method == "passthrough"
    slices, order = [], None
    for k, entry in enumerate(entries, 1):
        where = f"{path}: slice {k}:"
        if not isinstance(entry, dict):
            raise RecipeError(f"{where} a slice is a mapping with sources:, got {entry!r}")
        _check_keys(entry, ("sources", "parameters", "base_model", "residual_weight"), where, "key")
        sources = entry.get("sources")
        if not isinstance(sources, list) or not sources:
            raise RecipeError(f"{where} sources: must list the slice's models with their layer_range")
        if passthrough and len(sources) != 1:
            raise RecipeError(f"{where} passthrough takes exactly one source per slice (it copies layers)")
        if not passthrough and entry.get("base_model") is not None:
            raise RecipeError(f"{where} base_model per slice is not supported yet with {method}: give it at the top "
                              "level of the recipe")
        group = []
        for src in sources:
            if isinstance(src, dict):
                _check_keys(src, ("model", "layer_range", "parameters"), where, "source key")
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise RecipeError(f"{where} a source needs model: and layer_range: [first, last + 1], got {src!r}")
            _check_keys(src, ("model", "layer_range", "parameters"), where, "source key")
            rng = src["layer_range"]
            if rng == "all":  # passthrough's models: form (every layer of its one model)
                rng = [0, -1]
            elif not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                      for v in rng)):
                raise RecipeError(f"{where} layer_range must be [first, last + 1], two integers, got {rng!r}")
            if isinstance(src["model"], str) and "+" in src["model"] and not _names(src["model"], path):
                raise RecipeError(f"{where} model+lora ({src['model']!r}) in slices: is not supported yet")
            group.append(LayerSlice(_folder(src["model"], path, f"slice {k}'s model"), rng[0], rng[1],
                                    _mapping(entry.get("parameters"), path, f"slice {k}'s parameters"), k - 1,
                                    _mapping(src.get("parameters"), path, f"slice {k}'s source parameters")))
        if len({s.end - s.start for s in group}) != 1:
            raise RecipeError(f"{where} every source of a slice must have as many layers (mergekit's rule)")
        models_here = [s.model.resolve() for s in group]
        if not passthrough and order is not None and models_here != order:
            raise RecipeError(f"{where} lists other models (or another order) than slice 1: a merge per layer range "
                              "takes the same models in every slice")
        order = order if order is not None else models_here
        slices += group
    policy = "none" if passthrough else _base_policy(method)
    if policy != "required":
        base = _folder(doc["base_model"], path, "base_model") if doc.get("base_model") is not None else \
            slices[0].model
    else:
        if doc.get("base_model") is None:
            _need_base(method, path)
        base = _folder(doc["base_model"], path, "base_model")
        if base.resolve() not in order:
            raise RecipeError(f"{path}: base_model {doc['base_model']} must be one of every slice's sources (its "
                              "layers are the base's for that range)")
    firsts = [s.model for s in slices if s.index == 0]
    # the slices' and their sources' own settings stay with the slices: the plan resolves them per tensor
    parameters = _mapping(doc.get("parameters"), path, "parameters")
    if not passthrough and policy == "optional" and doc.get("base_model") is None:
        parameters["use_base"] = False
    if passthrough:
        models = list(dict.fromkeys(s.model for s in slices if s.model.resolve() != base.resolve()))
    elif policy == "none" or (policy == "optional" and doc.get("base_model") is None):
        models = firsts  # mergekit combines every source, the base among them
    else:
        models = [m for m in firsts if m.resolve() != base.resolve()]
    model_parameters: tuple[dict[str, Any], ...] = ()
    return _recipe(doc, path, text, options, base=base, models=tuple(models), method=method, slices=tuple(slices),
                   parameters=parameters, model_parameters=model_parameters,
                   named_base=doc.get("base_model") is not None)


def dump(recipe: Recipe) -> str:
    """``recipe`` in mergekit's schema (absolute paths), with a ``streammerge:`` section for the options mergekit
    has no key for; :func:`load` of it gives the same merge."""
    import yaml  # noqa: PLC0415

    from .methods import USE_BASE, get_method  # noqa: PLC0415

    method = get_method(recipe.method)
    n = len(recipe.models)
    given = method.resolve_params(recipe.params, n) if recipe.params else {}
    shared = dict(recipe.parameters)
    per_model = [dict(p) for p in recipe.model_parameters] or [{} for _ in range(n)]
    for name in recipe.params:
        spec = next(p for p in method.params if p.name == name)
        value = given[name]
        if spec.per_model and len(set(value)) > 1:
            for k in range(n):
                per_model[k].setdefault(name, value[k])
        elif name not in shared:
            shared[name] = value[0] if spec.per_model else value
    doc: dict[str, Any] = {"merge_method": method.name, "base_model": recipe.input_reference(0)}
    base_unused = method.base_policy == "none" and all(m.resolve() != recipe.base.resolve() for m in recipe.models)
    if method.base_policy == "optional" and "use_base" in shared:
        if not USE_BASE.convert(shared.pop("use_base"), method.name):  # mergekit's form: a recipe without base_model
            del doc["base_model"]
    if not recipe.named_base and method.base_policy == "none" and not recipe.slices:
        del doc["base_model"]  # mergekit's form: the first model stands in as the base
    if recipe.slices:
        groups: dict[int, list[Any]] = {}
        for sl in recipe.slices:
            groups.setdefault(sl.index, []).append(sl)
        doc["slices"] = [{"sources": [{"model": recipe.reference(sl.model), "layer_range": [sl.start, sl.end],
                                       **({"parameters": sl.source_parameters} if sl.source_parameters else {})}
                                      for sl in group],
                          **({"parameters": group[0].parameters} if group[0].parameters else {})}
                         for group in groups.values()]
    elif not recipe.models and method.name == "passthrough":  # a copy of the base (streammerge apply)
        del doc["base_model"]
        doc["models"] = [{"model": recipe.input_reference(0)}]
    else:
        doc["models"] = [{"model": recipe.input_reference(k), **({"parameters": p} if p else {})}
                         for k, p in enumerate(per_model, 1)]
    if shared:
        doc["parameters"] = shared
    if recipe.dtype:
        from .formats.dtypes import parse_output_dtype  # noqa: PLC0415
        from .output import TORCH_DTYPE_NAMES  # noqa: PLC0415

        doc["out_dtype"] = TORCH_DTYPE_NAMES[parse_output_dtype(recipe.dtype).name]
    source = recipe.tokenizer_source
    if source is not None:
        source = recipe.reference(source) if isinstance(source, Path) else source
        if recipe.tokens or recipe.pad_to_multiple_of is not None:
            doc["tokenizer"] = {"source": source,
                                **({"tokens": {t: _dump_token(recipe, d) for t, d in recipe.tokens.items()}}
                                   if recipe.tokens else {}),
                                **({"pad_to_multiple_of": recipe.pad_to_multiple_of}
                                   if recipe.pad_to_multiple_of is not None else {})}
        else:
            doc["tokenizer_source"] = source
    if recipe.chat_template is not None:
        doc["chat_template"] = recipe.chat_template
    ours = {"exclude": list(recipe.exclude), "embedding": list(recipe.embedding_names or ()),
            "keep_vision": recipe.keep_vision, "shard_size": recipe.shard_size}
    defaults = {"exclude": [], "embedding": [], "keep_vision": False, "shard_size": Recipe.__dataclass_fields__[
        "shard_size"].default}
    ours = {k: v for k, v in ours.items() if v != defaults[k]}
    if base_unused and not recipe.slices:  # a command line's --base, which linear and karcher do not average
        ours["average_base"] = False
    if recipe.embedding_names is not None and not recipe.embedding_names:
        ours["embedding"] = []
    if ours:
        doc["streammerge"] = ours
    header = "# streammerge recipe (mergekit's schema): streammerge merge THIS_FILE --out FOLDER reruns the merge\n"
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _base_policy(method: str) -> str:
    """The method's :attr:`~streammerge.methods.base.Method.base_policy` ("required" for a name not known: the
    planner names the unknown method)."""
    from .errors import MethodError  # noqa: PLC0415
    from .methods import get_method  # noqa: PLC0415

    try:
        return get_method(method).base_policy
    except MethodError:
        return "required"


def _need_base(method: str, path: Path) -> None:
    """Refuse a recipe without ``base_model`` for a method that merges changes from a base (base_policy
    "required")."""
    if _base_policy(method) == "required":
        raise RecipeError(f"{path}: base_model is missing; {method} merges the models' changes from a base")


def _check_keys(doc: dict[str, Any], known: tuple[str, ...], where: str, what: str) -> None:
    for key in doc:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise RecipeError(f"{where} unknown {what} {key!r}{hint}")


def _mapping(value: Any, path: Path, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: {what} must be a mapping of names to values, got {value!r}")
    return dict(value)


def _same(model: Path, adapter: Path | None, base: Path, base_adapter: Path | None) -> bool:
    """Whether a model entry (with its LoRA adapter) is the base (with its own)."""
    def key(p: Path | None) -> Path | None:
        return None if p is None else p.resolve()

    return (key(model), key(adapter)) == (key(base), key(base_adapter))


def _model(ref: Any, path: Path, what: str) -> tuple[Path, Path | None]:
    """The model folder ``ref`` names and its LoRA adapter: ``MODEL+ADAPTER`` (mergekit's model+lora) is split at the
    ``+`` whose two sides each name a folder (from the current folder or the recipe's) or a Hub ID."""
    if isinstance(ref, str) and "+" in ref and not _names(ref, path):
        splits = [(ref[:i], ref[i + 1:]) for i, ch in enumerate(ref) if ch == "+"]
        valid = [(m, a) for m, a in splits if _names(m, path) and _names(a, path)]
        if len(valid) != 1:
            raise RecipeError(f"{path}: {what} {ref!r} " + (
                "names no model+lora pair that exists (MODEL+ADAPTER, each a folder or a Hub ID)" if not valid else
                "can be split into MODEL+ADAPTER in several ways: rename a folder so that one + separates them"))
        return _folder(valid[0][0], path, what), _folder(valid[0][1], path, f"{what}'s LoRA adapter")
    return _folder(ref, path, what), None


def _names(ref: str, path: Path) -> bool:
    """Whether ``ref`` names a folder (from the current folder or the recipe's) or reads as a Hub ID."""
    return bool(ref) and (Path(ref).expanduser().is_dir() or (path.parent / ref).is_dir() or is_hub_id(ref))


def _folder(ref: Any, path: Path, what: str) -> Path:
    """The local folder ``ref`` names: from the current folder, else from the recipe's folder."""
    if not isinstance(ref, str) or not ref.strip():
        raise RecipeError(f"{path}: {what} must name a model folder, got {ref!r}")
    for candidate in (Path(ref).expanduser(), path.parent / ref):
        if candidate.is_dir():
            return candidate
    if is_hub_id(ref):  # resolved through the Hugging Face cache when the merge is planned
        return Path(ref)
    raise RecipeError(f"{path}: {what} {ref!r} is not a folder (nor a Hub ID such as org/name or org/name@revision)")


def _pad(doc: dict[str, Any], path: Path) -> int | None:
    tok = doc.get("tokenizer")
    value = tok.get("pad_to_multiple_of") if isinstance(tok, dict) else None
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise RecipeError(f"{path}: tokenizer.pad_to_multiple_of must be a positive integer, got {value!r}")
    return value


def _chat_template(doc: dict[str, Any], path: Path) -> str | None:
    value = doc.get("chat_template")
    if value is not None and not isinstance(value, str):
        raise RecipeError(f"{path}: chat_template must be auto, a built-in name (chatml) or a Jinja template, got "
                          f"{value!r}")
    return value


def _tokenizer(doc: dict[str, Any], path: Path, what: dict[str, Any]) -> dict[str, Any]:
    """The Recipe fields of ``tokenizer_source`` / ``tokenizer:`` (mergekit's ``TokenizerConfig``, whose ``source``
    defaults to ``union``): ``tokenizer_from``, ``vocabulary`` and ``tokens``."""
    source = doc.get("tokenizer_source")
    tok = doc.get("tokenizer")
    tokens: dict[str, Any] = {}
    if tok is not None:
        if source is not None:
            raise RecipeError(f"{path}: give tokenizer_source or tokenizer:, not both")
        tok = _mapping(tok, path, "tokenizer")
        _check_keys(tok, ("source", "tokens", "pad_to_multiple_of"), f"{path}: tokenizer:", "key")
        source = tok.get("source", "union")
        inputs = [what.get("base"), *(what.get("models") or ())]
        for token, cfg in _mapping(tok.get("tokens"), path, "tokenizer.tokens").items():
            tokens[str(token)] = _token(str(token), cfg, path, inputs)
    if source is None or source in ("base", "union"):
        return {**tokenizer_source_fields(source), "tokens": tokens}
    near = difflib.get_close_matches(str(source), ["base", "union"], n=1, cutoff=0.6)
    if near and not _names(str(source), path):
        raise RecipeError(f"{path}: tokenizer_source {source!r} is not a folder; did you mean {near[0]!r}? (base, "
                          "union, or a model)")
    return {**tokenizer_source_fields(_folder(source, path, "tokenizer_source")), "tokens": tokens}


def _token(token: str, cfg: Any, path: Path, inputs: list[Path | None]) -> dict[str, Any]:
    """One ``tokenizer.tokens`` entry as a TokenDefault's JSON (streammerge.vocabulary), its model an input index."""
    where = f"{path}: tokenizer.tokens {token!r}"
    cfg = _mapping(cfg, path, f"tokenizer.tokens {token!r}")
    _check_keys(cfg, ("source", "force"), f"{where}:", "key")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise RecipeError(f"{where}: force must be true or false, got {force!r}")

    def index(ref: Any) -> int:
        folder = _folder(ref, path, f"tokenizer.tokens {token!r} source").resolve()
        for k, p in enumerate(inputs):
            if p is not None and Path(p).resolve() == folder:
                return k
        raise RecipeError(f"{where}: source {ref!r} is not one of the recipe's models; a token's row comes from a "
                          "model being merged")

    src = cfg.get("source")
    out: dict[str, Any] = {"kind": "none"}
    if isinstance(src, str):
        out = {"kind": "model", "input": index(src)}
    elif isinstance(src, dict):
        kind = src.get("kind")
        if kind == "zero":
            _check_keys(src, ("kind",), f"{where}: source:", "key")
            out = {"kind": "zero"}
        elif kind == "model_token":
            _check_keys(src, ("kind", "model", "token_id", "token"), f"{where}: source:", "key")
            if (src.get("token_id") is None) == (src.get("token") is None):
                raise RecipeError(f"{where}: a model_token source gives token_id or token (one of them)")
            tid = src.get("token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise RecipeError(f"{where}: token_id must be a non-negative integer, got {tid!r}")
            out = {"kind": "model_token", "input": index(src.get("model")),
                   **({"token_id": tid} if tid is not None else {"token": str(src["token"])})}
        else:
            near = difflib.get_close_matches(str(kind), ["zero", "model_token"], n=1, cutoff=0.5)
            raise RecipeError(f"{where}: source kind {kind!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                              + ": give a model, {kind: zero} or {kind: model_token, model: MODEL, token_id: N} (or "
                              "token: TEXT)")
    elif src is not None:
        raise RecipeError(f"{where}: source must be a model, {{kind: zero}} or {{kind: model_token, ...}}, got {src!r}")
    return {**out, **({"force": True} if force else {})}


def _dump_token(recipe: Recipe, d: dict[str, Any]) -> dict[str, Any]:
    """A ``tokenizer.tokens`` entry in mergekit's schema (see :func:`_token`)."""
    kind = d.get("kind")
    src: Any = None
    if kind == "model":
        src = recipe.input_reference(d["input"])
    elif kind == "zero":
        src = {"kind": "zero"}
    elif kind == "model_token":
        src = {"kind": "model_token", "model": recipe.input_reference(d["input"]),
               **({"token_id": d["token_id"]} if "token_id" in d else {"token": d["token"]})}
    return {**({"source": src} if src is not None else {}), **({"force": True} if d.get("force") else {})}
