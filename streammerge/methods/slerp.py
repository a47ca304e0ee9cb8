"""SLERP between the base and one model (mergekit's convention): spherical interpolation of whole tensors.

A statistics pass gathers ``Σv₀², Σv₁², Σv₀v₁`` in float64 (chunk-independent); vectors are normalised when their
norm exceeds 1e-8; where the normalised dot product exceeds 0.9995 in magnitude (nearly colinear) the result is
the linear interpolation ``(1−t)v₀ + t·v₁``, else ``sin((1−t)θ)/sinθ·v₀ + sin(tθ)/sinθ·v₁`` with ``θ = arccos(dot)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import kernels
from .._torch import torch
from . import register
from ._tiles import PairSums
from .base import Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, ss0: float, ss1: float, dot: float) -> tuple[float, float]:
    """(s₀, s₁) such that the result is s₀·v₀ + s₁·v₁, from the float64 sums."""
    if not all(math.isfinite(x) for x in (ss0, ss1, dot)):  # a NaN or infinity in an input: the merged values are
        return math.nan, math.nan  # NaN, and the output check names the input and rows that hold it
    n0, n1 = math.sqrt(ss0), math.sqrt(ss1)
    cos = dot / ((n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


class _SlerpMerge(TensorMerge):
    def __init__(self, task: TensorTask, t: float) -> None:
        self.t = t
        self.sums = PairSums(task.rows, task.row_numel, [(0, 0), (1, 1), (0, 1)], task.tile, task.whole_tile_blocks)
        self.coef = (1.0 - t, t)

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        self.sums.add(r0, [base, models[0]])

    def independent_blocks(self, pass_index: int | None) -> bool:
        """The merge pass (fixed coefficients, element-wise); the statistics pass by the fused kernel, blocks of
        whole tiles (``PairSums.any_order``)."""
        return pass_index is None or self.sums.any_order()

    def accumulate_raw(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> bool:
        """:meth:`accumulate` by the fused kernel ``pair_sums`` (the base and the model as its two inputs)."""
        return self.sums.add_raw(r0, base, [base, models[0]], False)

    def end_pass(self, pass_index: int) -> None:
        self.coef = slerp_coefficients(self.t, *self.sums.finish())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"coef": torch.tensor(self.coef, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        s0, s1 = state["coef"].tolist()
        self.coef = (s0, s1)

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        s0, s1 = self.coef
        return (base * s0).add_(models[0] * s1)

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass: ``weighted_sum`` of the base and the model."""
        got = kernels.arrays(base, [base, models[0]], out)
        if got is None:
            return None
        _, inputs, o = got
        return int(kernels.kernels().weighted_sum(inputs, kernels.f32(self.coef), np.float32(1.0), o))


@register
class Slerp(Method):
    name = "slerp"
    summary = "Spherical interpolation between the base (t=0) and one model (t=1), tensor by tensor."
    reference = "Shoemake 1985; mergekit's slerp (base_model + one model)"
    passes = "2 (float64 norms and dot product, then interpolate)"
    params = (ParamSpec("t", float, 0.5, "interpolation factor: 0 gives the base, 1 the model",
                        check=lambda x: None if 0.0 <= x <= 1.0 else "must be between 0 and 1"),)
    min_models = 1
    max_models = 1

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        rows, rn, tile = task.rows, task.row_numel, task.tile
        return Footprint(
            stats_per_element=PairSums.per_element(2, 3),
            emit_per_element=8,  # base·s0, and model·s1 before it is added
            stats_state=PairSums.accumulator_bytes(3, rn),
            end_of_pass=PairSums.accumulator_bytes(3, rn),
            partial_tile=PairSums.partial_tile_bytes(2, 3, rows, rn, tile),
            stats_per_chunk_row=PairSums.ahead_bytes_per_row(3, rn, task),
            gpu_per_element=52,
            gpu_state=PairSums.gpu_state_bytes(2, 3, rows, rn, tile),
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _SlerpMerge(task, params["t"])
