"""Karcher mean (mergekit ``karcher``; arXiv:2603.04972, as mergekit cites it): the Riemannian (Fréchet) mean of the
models' directions on the unit sphere, times their mean norm. Equal weights, no base: a recipe's ``base_model`` is
one more model (the recipe loader appends it, as mergekit averages it), and on the command line the base only gives
the structure.

As mergekit 0.1.5 computes it for each tensor, flattened to ``x_k`` with ``n_k = ‖x_k‖``, ``u_k = x_k / n_k``,
``α = 1/K``: inputs with ``n_k <= tol`` are left out of the iteration (all of them: the result is zero) and the others'
weights renormalised to ``α̂``; the start is ``Σ α̂_k·u_k`` normalised (``u`` of the first such input when its norm
is below ``tol``); then up to ``max_iter`` times: ``θ_k = arccos(clamp(⟨m, u_k⟩))``, inputs with ``θ_k < tol``
skipped, ``τ = Σ α̂_k·θ_k/sin θ_k·(u_k − cos θ_k·m)``; stop when ``‖τ‖ < tol``, else
``m ← cos‖τ‖·m + sin‖τ‖·τ/‖τ‖``, renormalised when its norm exceeds ``tol``. The result is ``(Σ α·n_k)·m``.

The iterate stays in the span of the inputs, so one statistics pass gathers their float64 Gram matrix
(chunk-independent), the iteration runs on K coefficients in float64 (mergekit: float32 tensors), and the merge
pass emits ``Σ c_k·x_k``. Deliberate difference: an input within ``tol`` of antipodal to the iterate (``π − θ_k <
tol``) is skipped too: its tangent direction is undefined, and ``θ/sin θ`` would blow rounding noise up to the
whole step (mergekit's exactly antipodal float32 inputs contribute zero, which this reproduces).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import register
from ._gram import Gram, GramMerge, finite, gram_footprint, vector_norm
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask


def karcher_coefficients(gram: Gram, max_iter: int, tol: float) -> list[float]:
    """The K coefficients of the Karcher mean (see the module docstring) from the inputs' Gram matrix, in float64.
    NaN when ``gram`` is not finite (an input holds NaN or infinity: the output check then names it)."""
    k = len(gram)
    if k == 1:
        return [1.0]  # mergekit returns a single input as it is
    if not finite(gram):
        return [math.nan] * k
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    alpha = 1.0 / k
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return [0.0] * k
    weight = {i: 1.0 / len(valid) for i in valid}  # α̂: the valid inputs' equal α, renormalised

    def unit(i: int) -> list[float]:
        return [1.0 / norms[i] if j == i else 0.0 for j in range(k)]

    mean = [0.0] * k
    for i in valid:
        mean[i] += weight[i] / norms[i]
    mean_norm = vector_norm(gram, mean)
    mean = unit(valid[0]) if mean_norm < tol else [m / mean_norm for m in mean]
    for _ in range(max_iter):
        g_mean = [sum(gram[i][j] * mean[j] for j in range(k)) for i in range(k)]
        tangent = [0.0] * k
        for i in valid:
            dot = max(-1.0, min(1.0, g_mean[i] / norms[i]))  # ⟨m, u_i⟩
            theta = math.acos(dot)
            if theta < tol or math.pi - theta < tol or math.sin(theta) == 0:  # (with tol 0: an exact fit or antipode)
                continue
            f = weight[i] * theta / math.sin(theta)
            tangent[i] += f / norms[i]
            for j in range(k):
                tangent[j] -= f * dot * mean[j]
        tangent_norm = vector_norm(gram, tangent)
        if tangent_norm < tol or tangent_norm == 0:  # converged (tol 0: exactly)
            break
        c, s = math.cos(tangent_norm), math.sin(tangent_norm) / tangent_norm
        mean = [c * m + s * t for m, t in zip(mean, tangent)]
        unit_norm = vector_norm(gram, mean)
        if unit_norm > tol:
            mean = [m / unit_norm for m in mean]
    scale = sum(alpha * n for n in norms)
    return [scale * m for m in mean]


def _at_least(low: float):  # noqa: ANN202 (a ParamSpec check)
    return lambda x: None if low <= x < math.inf else f"must be >= {low:g} and finite"


@register
class Karcher(Method):
    name = "karcher"
    summary = ("Karcher (Riemannian) mean of the models' directions on the unit sphere, times their mean norm; equal "
               "weights; a recipe's base_model counts as one more model.")
    reference = "arXiv:2603.04972 (mergekit karcher)"
    passes = "2 (float64 Gram matrix, iterate on its coefficients, then combine)"
    params = (ParamSpec("max_iter", int, 10, "iterations of the mean on the sphere, at most", check=_at_least(0)),
              ParamSpec("tol", float, 1e-5, "convergence threshold of the tangent step (and the smallest norm and "
                        "angle that count)", check=_at_least(0.0)))
    min_models = 1
    base_policy = "none"

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        return gram_footprint(task, n_models, use_base=False)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        max_iter, tol = params["max_iter"], params["tol"]
        return GramMerge(task, n_models, False, lambda gram: karcher_coefficients(gram, max_iter, tol))
