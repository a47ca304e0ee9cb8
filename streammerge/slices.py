"""Layer ranges (mergekit's ``slices:``), decided once from the headers: stacking with ``passthrough`` (a
frankenmerge), or a merge per range.

**A merge per range** (any other method): every slice lists the same models, each with a ``layer_range`` of the
slice's length; output layer ``L`` (the slices' layers in turn) merges each model's layer at its range's offset.
:func:`slice_views` gives each input a view of its checkpoint under the output's names (layer ``j`` of its range
renamed to ``L``), which the ordinary classification then merges as if the models had been saved that way; each
tensor's ``t`` (for gradients) restarts within its slice.

**Stacking:**
Each slice takes layers ``[start, end)`` of one model; the output's layers are the slices' layers in order,
renumbered from 0, each tensor a copy of its input tensor (times passthrough's ``scale`` where the recipe sets
one, resolved per output tensor with mergekit's meaning: :mod:`streammerge.parameters`, ``t`` restarting within
each slice). Outside the layers, as mergekit 0.1.5 does: the embeddings come from the first slice's model and
everything else (the final norm, the head) from the last slice's.

The output's ``config.json`` is the base's (``base_model``, else the first slice's model) with
``num_hidden_layers`` set to the stacked count and every per-layer list (a list as long as the base's layer count,
such as Qwen2's or Gemma's ``layer_types``) rebuilt from the slices, so transformers 5 loads it (mergekit 0.1.5
writes the weights and then fails saving that config).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .classify import (
    Classification,
    TensorClass,
    dequantization_notes,
    kind_of,
    natural_key,
    output_dtype,
    source_of,
)
from .errors import PlanError
from .formats.checkpoint import Checkpoint
from .methods import Rule
from .parameters import LAYER, evaluate, layer_count
from .quantization import dequantization
from .recipe import HEAD_NAMES, TOKEN_EMBEDDINGS, LayerSlice, Recipe


def _by_layer(ckpt: Checkpoint) -> tuple[dict[int, list[tuple[str, Any]]], dict[str, Any]]:
    """``ckpt``'s layer tensors by layer index, and the tensors outside the layers (each in the checkpoint's order)."""
    layers: dict[int, list[tuple[str, Any]]] = {}
    others: dict[str, Any] = {}
    for name, loc in ckpt.tensors.items():
        m = LAYER.search(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append((name, loc))
        else:
            others[name] = loc
    return layers, others


def _renamed(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer``."""
    m = LAYER.search(name)
    assert m is not None
    return name[: m.start(1)] + str(layer) + name[m.end(1):]


def _checked(k: int, s: LayerSlice, ckpt: Checkpoint) -> None:
    """Refuse a layer range outside its model (slice ``k``, counted from 1)."""
    n = layer_count(list(ckpt.tensors), ckpt.config)
    if not 0 <= s.start < s.end <= n:
        raise PlanError(f"slice {k}: layer_range [{s.start}, {s.end}] is outside {s.model}, which has {n} layers "
                        "(layer_range is [first, last + 1])")


def _position(s: LayerSlice, j: int) -> float:
    """``t`` of input layer ``j`` of slice ``s``: restarting within each slice, as mergekit does."""
    return (j - s.start) / (s.end - s.start - 1) if s.end - s.start > 1 else 1.0


def classify_slices(recipe: Recipe, base: Checkpoint, models: list[Checkpoint],
                    out_dtype: str | None) -> Classification:
    """The output tensors of ``recipe.slices`` (see the module docstring); raises :class:`PlanError` naming a
    layer range outside its model or layers whose tensors differ."""
    folders = [recipe.base, *recipe.models]
    checkpoints = [base, *models]
    read_as = {str(f.resolve()): dequantization(c, str(f)) for f, c in zip(folders, checkpoints)}

    def of(folder: Any) -> tuple[Checkpoint, Any]:
        d = read_as[str(folder.resolve())]
        return d.checkpoint, d

    # an end of -1 is every layer of the slice's model (passthrough's models: form)
    recipe = dataclasses.replace(recipe, slices=tuple(
        dataclasses.replace(s, end=layer_count(list(of(s.model)[0].tensors), of(s.model)[0].config))
        if s.end == -1 else s for s in recipe.slices))

    out: list[TensorClass] = []
    shapes: dict[int, dict[str, tuple[int, ...]]] = {}
    layer = 0
    for k, s in enumerate(recipe.slices, 1):
        ckpt, d = of(s.model)
        if base.model_type and ckpt.model_type and ckpt.model_type != base.model_type:
            raise PlanError(f"slice {k}: {s.model} is a {ckpt.model_type!r} model but the base ({recipe.base}) is "
                            f"{base.model_type!r}: stacked layers must come from one architecture")
        _checked(k, s, ckpt)
        by_layer, _ = _by_layer(ckpt)
        for j in range(s.start, s.end):
            shapes[layer] = {}
            for name, loc in by_layer.get(j, []):
                new = _renamed(name, layer)
                shapes[layer][_renamed(name, -1)] = loc.info.shape  # the name without its layer index
                out.append(_copy(new, loc, d, recipe, (s.source_parameters, s.parameters), _position(s, j),
                                 out_dtype))
            layer += 1
    first = shapes.get(0, {})
    for i, layer_shapes in shapes.items():
        if layer_shapes != first:
            raise PlanError(f"output layer {i} ({_from(recipe, i)}) has other tensors or shapes than output layer 0: "
                            "stacked layers must come from models of one architecture and size")
    head_of = {"first": of(recipe.slices[0].model), "last": of(recipe.slices[-1].model)}
    # the first model's token embedding, the last one's output head (its embedding where it ties them)
    rows = {"first": head_of["first"][0].matrix_rows(TOKEN_EMBEDDINGS),
            "last": head_of["last"][0].matrix_rows((*(HEAD_NAMES if not head_of["last"][0].tied() else ()),
                                                    *TOKEN_EMBEDDINGS))}
    if None not in rows.values() and rows["first"] != rows["last"]:
        raise PlanError(f"the embeddings come from the first slice's model ({recipe.slices[0].model}, {rows['first']} "
                        f"token rows) and the head from the last slice's ({recipe.slices[-1].model}, {rows['last']} "
                        "rows): they must share one vocabulary (mergekit writes such a model, which transformers "
                        "cannot load)")
    embeddings = set(recipe.embeddings)
    for where in ("first", "last"):
        ckpt, d = head_of[where]
        for name, loc in _by_layer(ckpt)[1].items():
            if (name in embeddings) == (where == "first"):
                out.append(_copy(name, loc, d, recipe, (), 0.0, out_dtype))
    config_ckpt = of(recipe.base)[0]
    notes = [f"passthrough: {layer} output layers stacked from {len(recipe.slices)} slice(s); the embeddings come from "
             f"{recipe.slices[0].model}, the final norm and head from {recipe.slices[-1].model}"]
    notes += dequantization_notes(list(read_as.values()), out_dtype)
    out.sort(key=lambda c: natural_key(c.name))
    return Classification(out, _config_updates(recipe, config_ckpt, layer, of), tuple(notes))


def _copy(name: str, loc: Any, d: Any, recipe: Recipe, levels: tuple[dict[str, Any], ...], t: float,
          out_dtype: str | None) -> TensorClass:
    """A copy of ``loc`` named ``name``, times the scale the first level that sets one gives (the source's, the
    slice's, the recipe's, the command line's)."""
    kind = kind_of(loc.info)
    source = source_of(d, loc)
    scale = 1.0
    if kind.value == "float":
        for level in (*levels, recipe.parameters, recipe.params):
            value = evaluate(level.get("scale"), name, t)
            if value is not None:
                scale = float(value)
                break
    return TensorClass(name, loc.info.shape, Rule.COPY_BASE, kind, output_dtype(kind, (source,), loc.info.dtype.name,
                                                                                     out_dtype),
                       (source,), None, "passthrough", scale)


def _from(recipe: Recipe, layer: int) -> str:
    """Which slice and input layer output layer ``layer`` comes from."""
    at = 0
    for s in recipe.slices:
        if layer < at + s.end - s.start:
            return f"layer {s.start + layer - at} of {s.model}"
        at += s.end - s.start
    return "?"


def _config_updates(recipe: Recipe, base: Checkpoint, layers: int, of: Any) -> dict[str, Any]:
    """``num_hidden_layers`` and every per-layer list of the base's config, for the stacked layers."""
    updates: dict[str, Any] = {}
    for config in (base.config, base.config.get("text_config")):
        if not isinstance(config, dict):
            continue
        n = config.get("num_hidden_layers")
        if not isinstance(n, int):
            continue
        updates["num_hidden_layers"] = layers
        for key, value in config.items():
            if isinstance(value, list) and len(value) == n:
                stacked: list[Any] = []
                for s in recipe.slices:
                    theirs = of(s.model)[0].config
                    theirs = theirs.get("text_config", theirs) if config is not base.config else theirs
                    source = theirs.get(key) if isinstance(theirs.get(key), list) else value
                    stacked += source[s.start : s.end]
                updates[key] = stacked
    return updates


def slice_views(recipe: Recipe, base: Checkpoint, models: list[Checkpoint]) \
        -> tuple[Checkpoint, list[Checkpoint], dict[str, tuple[float, int]], dict[str, Any]]:
    """For a merge per range: the base's and each model's view under the output's tensor names, each layer tensor's
    position ``t`` within its slice and the slice's index, and the config.json updates (see the module docstring).
    Raises :class:`PlanError` for a layer range outside its model."""
    groups: dict[int, list[LayerSlice]] = {}
    for s in recipe.slices:
        groups.setdefault(s.index, []).append(s)
    positions: dict[str, tuple[float, int]] = {}

    def view(folder: Any, ckpt: Checkpoint) -> Checkpoint:
        by_layer, tensors = _by_layer(ckpt)
        layer = 0
        for k, group in groups.items():
            src = next(s for s in group if s.model.resolve() == folder.resolve())
            _checked(k + 1, src, ckpt)
            for j in range(src.start, src.end):
                for name, loc in by_layer.get(j, []):
                    new = _renamed(name, layer)
                    tensors[new] = loc
                    positions[new] = (_position(src, j), k)
                layer += 1
        return dataclasses.replace(ckpt, tensors=tensors)

    base_view = view(recipe.base, base)
    model_views = [view(f, c) for f, c in zip(recipe.models, models)]
    stacked = sum(g[0].end - g[0].start for g in groups.values())
    # the per-layer lists of config.json follow the base's ranges
    base_ranges = tuple(next(s for s in g if s.model.resolve() == recipe.base.resolve()) for g in groups.values())
    updates = _config_updates(dataclasses.replace(recipe, slices=base_ranges), base, stacked, lambda f: (base, None))
    return base_view, model_views, positions, updates
