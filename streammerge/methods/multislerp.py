"""Multi-SLERP (mergekit ``multislerp``; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): barycentric
interpolation of K ≥ 2 tensors on a hypersphere, each tensor flattened to one vector ``v_k`` (``M_k − B`` with
``use_base``, else ``M_k``).

As mergekit 0.1.5 computes it, with ``w`` the weights (divided by their sum with ``normalize_weights``),
``n_k = ‖v_k‖`` and ``u_k = v_k / (n_k + eps)``: the mean direction ``m = Σ w_k·u_k / ‖Σ w_k·u_k‖``; the tangent
``τ = Σ w_k·(u_k − ⟨u_k, m⟩·m)``; the result ``(cos‖τ‖'·m + sin‖τ‖'/‖τ‖'·τ)·Σ w_k·n_k`` with ``‖τ‖' = ‖τ‖ + eps``
(plus ``B`` with ``use_base``). Every step is a linear combination of the ``v_k``, so one statistics pass gathers
their float64 Gram matrix ``G_ij = ⟨v_i, v_j⟩`` (chunk-independent), the K coefficients ``c`` of the result follow
from ``G`` alone, and the merge pass emits ``Σ c_k·v_k`` (+ ``B``). One model: the model itself, no statistics pass.

Where ``‖Σ w_k·u_k‖ < eps`` (antipodal inputs whose weights cancel) two models fall back to the linear
interpolation ``w_0·v_0 + w_1·v_1``, as in mergekit; with more models the merge stops with an error naming the tensor
(mergekit raises too). Deliberate difference: where every ``v_k`` is zero (no model changed the tensor) the result
is zero (the base), where mergekit raises for three or more models.

The Gram-matrix machinery (statistics: the Gram matrix; emit: ``Σ c_k·v_k``) is ``_gram``'s, shared with ``nuslerp``
(flattened) and ``karcher``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .._torch import torch
from ..errors import MethodError
from . import register
from ._delta import WEIGHT
from ._gram import Gram, GramMerge, finite, gram_footprint, vector_norm
from .base import USE_BASE, Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask


def multislerp_coefficients(gram: Gram, weights: Sequence[float], eps: float, name: str = "") -> list[float]:
    """The K coefficients of mergekit's multislerp result (see the module docstring) from the Gram matrix of the
    (task) vectors, in float64. NaN coefficients when ``gram`` is not finite (an input holds NaN or infinity: the
    output check then names it). Raises :class:`MethodError` for 3+ inputs whose weighted unit mean is zero."""
    k = len(weights)
    if not finite(gram):
        return [math.nan] * k
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    if not any(norms):  # nothing to interpolate: every vector is zero (mergekit: 2 → linear, 0; 3+ → raises)
        return [0.0] * k
    inv = [1.0 / (n + eps) if n + eps > 0 else 0.0 for n in norms]  # u_k = inv_k·v_k (eps = 0: a zero v_k → 0)
    mean = [w * a for w, a in zip(weights, inv)]
    mean_norm = vector_norm(gram, mean)
    if mean_norm < eps or mean_norm == 0:
        if k == 2:  # mergekit's fallback: linear interpolation of the two vectors
            return list(weights)
        raise MethodError(
            f"multislerp: tensor {name}: the weighted mean of the inputs' directions on the unit sphere is zero (norm {mean_norm:.3g} < eps {eps:g}): antipodal inputs whose weights cancel have "
            "no spherical mean; change the weights, or exclude the tensor with --exclude"
        )
    mean = [m / mean_norm for m in mean]
    g_mean = [sum(gram[i][j] * mean[j] for j in range(k)) for i in range(k)]
    along = sum(w * a * g for w, a, g in zip(weights, inv, g_mean))  # Σ w_k·⟨u_k, m⟩
    tangent = [w * a - along * m for w, a, m in zip(weights, inv, mean)]  # Σ w_k·(u_k − ⟨u_k, m⟩·m)
    tangent_norm = vector_norm(gram, tangent) + eps
    avg_norm = sum(n * w for n, w in zip(norms, weights))
    cos, sinc = math.cos(tangent_norm), math.sin(tangent_norm) / tangent_norm
    return [avg_norm * (cos * m + sinc * t) for m, t in zip(mean, tangent)]


class _OneModel(TensorMerge):
    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        return models[0]  # mergekit: one model is returned as it is (the runner's float32 copy)


def _not_negative(x: float) -> str | None:
    return None if 0.0 <= x < math.inf else "must be >= 0 and finite"


@register
class MultiSlerp(Method):
    name = "multislerp"
    summary = ("Spherical barycentric interpolation of the models (or of their deltas from the base): the weighted "
               "mean direction on the unit sphere, moved along the weighted tangent vectors, times the weighted norm.")
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (mergekit multislerp)"
    passes = "2 (float64 Gram matrix of the (task) vectors, then combine); 1 with one model"
    params = (replace(WEIGHT, help="weight of each model in the spherical mean"),
              ParamSpec("normalize_weights", bool, True, "divide the weights by their sum"),
              ParamSpec("eps", float, 1e-8, "added to the norms before dividing by them; a weighted unit mean shorter "
                        "than this has no direction", check=_not_negative),
              USE_BASE)
    min_models = 1
    base_policy = "optional"

    def resolve_params(self, raw: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        params = super().resolve_params(raw, n_models)
        total = sum(params["weight"])
        if params["normalize_weights"] and abs(total) < 1e-8:
            raise MethodError("multislerp: the weights sum to zero, so they cannot be normalized; change them or pass "
                              "--param normalize_weights=false")
        return params

    @staticmethod
    def _weights(params: Mapping[str, Any]) -> tuple[float, ...]:
        w = params["weight"]
        return tuple(x / sum(w) for x in w) if params["normalize_weights"] else tuple(w)

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 0 if len(params["weight"]) == 1 else 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        if n_models == 1:
            return Footprint(gpu_per_element=8)
        return gram_footprint(task, n_models, params["use_base"])

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        if n_models == 1:
            return _OneModel()
        weights, eps = self._weights(params), params["eps"]
        return GramMerge(task, n_models, params["use_base"],
                         lambda gram: multislerp_coefficients(gram, weights, eps, task.name))
