"""Method parameters resolved per tensor, with mergekit's meaning of a recipe's parameter settings.

A recipe gives parameters at three levels: per model (``models: [{model, parameters}]`` in a mergekit recipe),
global (``parameters:``), and the command line's ``--param`` (``Recipe.params``: one value, or one per model
separated by commas). Each level's value is a *setting* (mergekit 0.1.5, ``mergekit/config.py``):

- a scalar (number, bool or string): that value;
- a list of numbers, a **gradient**: interpolated linearly at the tensor's position ``t`` (``t = i / (n − 1)`` for
  layer ``i`` of ``n``; tensors outside the layers, the embedding, the final norm and ``lm_head``, take ``t = 0``);
- a list of bools or strings: the entry at ``floor(t · (len − 1))``;
- a list of conditions ``[{filter: self_attn, value: ...}, {value: ...}]``: the first whose ``filter`` is a
  substring of the tensor name (or that has no filter, or ``*``) gives the setting; none matching means "not set
  here".

For model ``k``, a per-model parameter takes the first level that sets it: its own entry, the global
``parameters:``, the command line, the method's default. In a merge per layer range (``slices:``) a tensor's own
levels are its model's source entry in the tensor's slice, then the slice's ``parameters:``, then the global ones
(:class:`Levels`); the embedding takes the first slice's, the tensors after the layers (final norm, head) the
last slice's, as mergekit plans them. A parameter that is not per-model (``normalize``,
``lambda``, SLERP's ``t``, ...) is global only. The plan resolves every tensor's values once (``plan --json``
shows them) and they are part of the tensor's fingerprint.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MethodError
from .methods import Method
from .methods.base import IGNORED_NAMES

#: a layer's index in a tensor name: ``model.layers.12.``, GPT-2's ``h.12.`` (group 1; also streammerge.slices)
LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The value of one level's ``setting`` for ``tensor`` at position ``t`` (None: not set at this level)."""
    if setting is None or isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, Mapping):  # one condition
        setting = [setting]
    if not isinstance(setting, Sequence) or not setting:
        raise MethodError(f"parameter setting {setting!r} is neither a value, a list of values (a gradient) nor a "
                          "list of {filter, value} conditions")
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        return setting[int(t * (len(setting) - 1))]
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition:
            raise MethodError(f"parameter condition {condition!r} needs a value (and optionally a filter)")
        extra = sorted(set(condition) - {"value", "filter"})
        if extra:
            near = [difflib.get_close_matches(str(k), ["filter", "value"], n=1, cutoff=0.5) for k in extra]
            hint = "".join(f"; did you mean {n[0]!r} for {k!r}?" for k, n in zip(extra, near) if n)
            raise MethodError(f"parameter condition {dict(condition)!r} has unknown key(s) {extra}{hint}: a condition "
                              "takes only filter and value")
        f = condition.get("filter")
        if f is None or f == "*" or f in tensor:
            return evaluate(condition["value"], tensor, t)
    return None


def layer_count(names: Sequence[str], config: Mapping[str, Any]) -> int:
    """The number of layers: ``num_hidden_layers`` (or ``n_layer``) from the config or its ``text_config``, else one
    more than the highest layer index in ``names``."""
    for c in (config, config.get("text_config")):
        if isinstance(c, Mapping):
            for key in ("num_hidden_layers", "n_layer"):
                if isinstance(c.get(key), int) and c[key] > 0:
                    return c[key]
    indices = [int(m.group(1)) for n in names if (m := LAYER.search(n))]
    return max(indices) + 1 if indices else 1


def position(name: str, n_layers: int) -> float:
    """``t`` of tensor ``name``: ``i / (n − 1)`` in layer ``i`` of ``n`` (1 when there is one layer); 0 outside."""
    m = LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def varies(parameters: Mapping[str, Any], model_parameters: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any setting can give different values for different tensors (a gradient or a condition)."""
    return any(not (s is None or isinstance(s, (bool, int, float, str)))
               for level in (parameters, *model_parameters) for s in level.values())


def check_levels(method: Method, parameters: Mapping[str, Any], model_parameters: Sequence[Mapping[str, Any]],
                 params: Mapping[str, Any]) -> None:
    """Refuse a parameter the method does not take, and a per-model entry of a parameter that is global only,
    naming it (mergekit ignores both silently)."""
    specs = {p.name: p for p in method.params}
    for key in parameters:
        if key not in specs and key not in IGNORED_NAMES:
            method.resolve_params({key: None}, 1)  # raises the "did you mean" error
    for k, level in enumerate(model_parameters, 1):
        for key in level:
            if key in IGNORED_NAMES:
                continue
            if key not in specs:
                method.resolve_params({key: None}, 1)
            if not specs[key].per_model:
                raise MethodError(f"{method.name}: parameter {key} is not per model (one value for the whole merge), "
                                  f"but model {k}'s entry sets it: put it under the recipe's top-level parameters")


@dataclass(frozen=True)
class Levels:
    """The recipe's settings that apply to one tensor, highest precedence first: ``shared`` levels (a slice's
    ``parameters:``, then the global ``parameters:``) and each model's ``own`` levels (its source entry in the
    tensor's slice, or its ``models:`` entry). mergekit 0.1.5's ``ConfigReader.parameter_sources``."""

    shared: tuple[Mapping[str, Any], ...] = ()
    own: tuple[tuple[Mapping[str, Any], ...], ...] = ()

    @classmethod
    def of(cls, parameters: Mapping[str, Any], model_parameters: Sequence[Mapping[str, Any]]) -> Levels:
        """The ``models:`` form's levels: the global parameters, one entry per model."""
        return cls((parameters,), tuple((p,) for p in model_parameters))


def _first(levels: Sequence[Mapping[str, Any]], key: str, tensor: str, t: float) -> Any:
    """The first level that sets ``key`` for ``tensor`` at ``t`` (None: none does)."""
    for level in levels:
        value = evaluate(level.get(key), tensor, t)
        if value is not None:
            return value
    return None


def raw_for_tensor(method: Method, name: str, t: float, n_models: int, params: Mapping[str, Any],
                   levels: Levels) -> dict[str, Any]:
    """The values for tensor ``name`` at ``t`` before validation (per-model ones as lists), by the precedence in
    the module docstring; :meth:`Method.resolve_params` validates them."""
    out: dict[str, Any] = {}
    for spec in method.params:
        command_line = params.get(spec.name)
        shared = _first(levels.shared, spec.name, name, t)
        if not spec.per_model:
            value = shared if shared is not None else command_line
            if value is not None:
                out[spec.name] = value
            continue
        own = [_first(own, spec.name, name, t) for own in levels.own] or [None] * n_models
        if all(v is None for v in own) and shared is None:
            if command_line is not None:
                out[spec.name] = command_line
            continue
        cli = method.resolve_params({spec.name: command_line}, n_models)[spec.name] if command_line is not None \
            else (spec.default,) * n_models
        out[spec.name] = [own[k] if own[k] is not None else shared if shared is not None else cli[k]
                          for k in range(n_models)]
    return out

