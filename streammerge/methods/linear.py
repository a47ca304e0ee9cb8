"""Linear / average (Wortsman et al. 2022, model soups): ``Σ_k weight_k · M_k`` (÷ Σ weight_k with ``normalize``).
The base is not part of the average; pass it as a --model too to include it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .. import kernels
from .._torch import torch
from ..errors import MethodError
from . import register
from ._delta import WEIGHT
from .base import Footprint, Method, ParamSpec, TensorMerge, TensorTask


class _LinearMerge(TensorMerge):
    def __init__(self, weights: tuple[float, ...], normalize: bool) -> None:
        total = sum(weights)
        self.weights = weights
        self.divisor = total if normalize else 1.0

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        acc = models[0] * self.weights[0]
        for w, m in zip(self.weights[1:], models[1:]):
            acc.add_(m * w)
        return acc.div_(self.divisor) if self.divisor != 1.0 else acc

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass (streammerge.kernels ``weighted_sum``)."""
        got = kernels.arrays(None, models, out)
        if got is None:
            return None
        _, ms, o = got
        return int(kernels.kernels().weighted_sum(ms, kernels.f32(self.weights), kernels.f32([self.divisor])[0], o))


@register
class Linear(Method):
    name = "linear"
    summary = "Weighted average of the models' weights (the base is not included unless also given as --model)."
    reference = "Wortsman et al. 2022, Model soups, arXiv:2203.05482"
    base_policy = "none"
    params = (replace(WEIGHT, help="weight of each model in the average"),
              ParamSpec("normalize", bool, True, "divide by the sum of the weights"))

    def resolve_params(self, raw: Mapping[str, Any], n_models: int) -> dict[str, Any]:
        params = super().resolve_params(raw, n_models)
        if params["normalize"] and abs(sum(params["weight"])) < 1e-8:
            raise MethodError("linear: the weights sum to zero, so they cannot be normalized; pass --param normalize=false")
        return params

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        # the accumulator and one model·weight before it is added
        return Footprint(emit_per_element=8, gpu_per_element=4 * n_models + 16)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _LinearMerge(params["weight"], params["normalize"])
