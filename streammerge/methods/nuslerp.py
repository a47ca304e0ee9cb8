"""NuSLERP (mergekit ``nuslerp``; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea): spherical interpolation
of exactly two models, or of their deltas from the base (``use_base``), with ``t = weight_1 / (weight_0 + weight_1)``
(0.5 where the weights sum to ~0).

As mergekit 0.1.5 computes it for two vectors ``v_0, v_1`` (``M_k − B`` with ``use_base``, else ``M_k``): each is
divided by ``max(‖v_k‖, 1e-7)``; ``cos`` is their dot product clamped to [−1, 1]; where ``1 − cos² <= (1e-8)²``
in float32 (colinear, anti-parallel included) the result is ``(1−t)·v_0 + t·v_1``, else
``(sin((1−t)θ)·v_0 + sin(tθ)·v_1) / sin θ`` with ``θ = arccos(cos)``; plus ``B`` with ``use_base``. Which vectors:

- ``nuslerp_flatten`` (default): each tensor is one vector. One statistics pass sums ``Σv_0², Σv_1², Σv_0·v_1`` in
  float64 (chunk-independent), then the merge pass emits ``s_0·v_0 + s_1·v_1``.
- not flattened, ``nuslerp_row_wise`` false: one slerp per row of the last dimension (a 1-D or 0-D tensor is one
  vector). Row-local, so no statistics pass: each chunk's per-vector sums are float64 (the shared ``row_sums``) and
  the coefficients come from Python's ``math`` one vector at a time, so they do not depend on where a vector falls in
  a chunk.
- not flattened, ``nuslerp_row_wise`` true: mergekit swaps dims 0 and −1, so the vectors run along dim 0: one per
  stored element position of a row (a matrix's column), across all rows. One statistics pass sums the products per
  position (float64, chunk-independent); the coefficients (one pair per position) are computed once at its end.

mergekit computes in float32; here the sums are float64, so results agree within float32 rounding. The colinear
test is mergekit's float32 one: in float32, ``1 − cos² <= 1e-16`` holds exactly where ``cos`` rounds to ±1, i.e.
``|cos| >= 1 − 2⁻²⁵``. (In float64 that threshold is below the resolution of ``1 − cos²`` near ±1, so exactly
anti-parallel inputs would fall on either side by a last-bit rounding, and the spherical branch is singular there.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .._torch import torch
from . import register
from ._delta import WEIGHT
from ._gram import GramMerge, gram_footprint
from ._tiles import PairSums, row_sums
from .base import USE_BASE, Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask

#: mergekit's colinearity test ``1 − cos² <= (1e-8)²`` in float32 holds exactly where ``cos`` rounds to ±1 in float32
COLINEAR = 1.0 - 2.0**-25
#: the smallest norm a vector is divided by (mergekit's ``_normalize``)
NORM_CLAMP = 1e-7
#: vectors whose coefficients are computed together (bounds the Python floats held at once)
GROUP = 8192


def interpolation_t(weights: Sequence[float]) -> float:
    """mergekit's ``t`` from the two weights."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_coefficients(t: float, ss0: float, ss1: float, dot: float) -> tuple[float, float]:
    """(s₀, s₁) such that the result is ``s₀·v₀ + s₁·v₁``, from the float64 sums ``Σv₀², Σv₁², Σv₀v₁``. NaN where a
    sum is not finite (an input holds NaN or infinity: the output check then names it)."""
    if not (math.isfinite(ss0) and math.isfinite(ss1) and math.isfinite(dot)):
        return math.nan, math.nan
    n0, n1 = max(math.sqrt(max(ss0, 0.0)), NORM_CLAMP), max(math.sqrt(max(ss1, 0.0)), NORM_CLAMP)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) >= COLINEAR:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def column_coefficients(t: float, sums: np.ndarray) -> np.ndarray:
    """The vectorised :func:`nuslerp_coefficients`: (3, n) float64 sums (``Σv₀², Σv₁², Σv₀v₁`` per vector) → (2, n)
    float64 coefficients. For the row-wise variant's end of pass (one call per tensor, so its results do not depend
    on chunking)."""
    ss0, ss1, dot = sums
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = dot / (np.maximum(np.sqrt(np.maximum(ss0, 0.0)), NORM_CLAMP)
                     * np.maximum(np.sqrt(np.maximum(ss1, 0.0)), NORM_CLAMP))
        bad = ~(np.isfinite(ss0) & np.isfinite(ss1) & np.isfinite(dot))
        np.clip(cos, -1.0, 1.0, out=cos)
        colinear = np.abs(cos) >= COLINEAR
        theta = np.arccos(np.where(colinear, 0.0, cos))
        del cos
        sin_theta = np.sin(theta)
        out = np.stack([np.sin((1.0 - t) * theta), np.sin(t * theta)])
        out /= sin_theta
    out[0][colinear], out[1][colinear] = 1.0 - t, t
    out[:, bad] = np.nan
    return out


def _vectors(base: torch.Tensor, models: Sequence[torch.Tensor], use_base: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two float32 vectors' values for these rows: the deltas with ``use_base`` (new tensors), else the models."""
    return (models[0] - base, models[1] - base) if use_base else (models[0], models[1])


class _RowMerge(TensorMerge):
    """One slerp per row of the last dimension, inside each chunk (no statistics pass)."""

    def __init__(self, t: float, use_base: bool) -> None:
        self.t, self.use_base = t, use_base

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        v0, v1 = _vectors(base, models, self.use_base)
        shape = v0.shape
        if v0.numel() == 0:
            return torch.zeros(shape, dtype=torch.float32, device=v0.device)
        length = shape[-1] if v0.dim() >= 2 else v0.numel()  # a 0-D or 1-D tensor is one vector
        a, b = v0.reshape(-1, length), v1.reshape(-1, length)
        coef = torch.empty((a.shape[0], 2), dtype=torch.float32)
        for g in range(0, a.shape[0], GROUP):
            x, y = a[g : g + GROUP].double(), b[g : g + GROUP].double()
            ss0 = row_sums(x * x).tolist()
            ss1 = row_sums(y * y).tolist()
            dot = row_sums(x * y).tolist()
            del x, y
            coef[g : g + GROUP] = torch.tensor([nuslerp_coefficients(self.t, *s) for s in zip(ss0, ss1, dot)],
                                               dtype=torch.float64).reshape(-1, 2)
        coef = coef.to(v0.device)
        out = a * coef[:, :1]
        out.add_(b * coef[:, 1:])
        out = out.reshape(shape)
        return out.add_(base) if self.use_base else out


class _ColumnMerge(TensorMerge):
    """``nuslerp_row_wise``: one slerp per element position of a row, the vector running along dim 0."""

    def __init__(self, task: TensorTask, t: float, use_base: bool) -> None:
        self.t, self.use_base, self.rest = t, use_base, task.shape[1:]
        self.sums: PairSums | None = PairSums(task.rows, task.row_numel, [(0, 0), (1, 1), (0, 1)], task.tile)
        self.coef = torch.empty(0)  # (2, row_numel) float32
        self._on: torch.Tensor | None = None  # the coefficients on the chunks' device

    def accumulate(self, pass_index: int, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> None:
        assert self.sums is not None
        self.sums.add(r0, list(_vectors(base, models, self.use_base)))

    def end_pass(self, pass_index: int) -> None:
        assert self.sums is not None
        self.coef = torch.from_numpy(column_coefficients(self.t, self.sums.column_totals())).to(torch.float32)
        self._on, self.sums = None, None  # the accumulator is no longer needed

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.coef, self._on = state["coef"].to(torch.float32), None

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._on is None or self._on.device != base.device:
            self._on = self.coef.to(base.device)
        v0, v1 = _vectors(base, models, self.use_base)
        s0, s1 = (c.reshape(self.rest) for c in self._on)  # broadcast over the chunk's rows
        out = v0 * s0
        out.add_(v1 * s1)
        return out.add_(base) if self.use_base else out


@register
class NuSlerp(Method):
    name = "nuslerp"
    summary = ("Spherical interpolation of two models (or of their deltas from the base) at t = w₁/(w₀+w₁): whole "
               "tensors, rows of the last dimension, or columns (row_wise).")
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (mergekit nuslerp)"
    passes = "2 (float64 norms and dot product, then interpolate); 1 with nuslerp_flatten false and row_wise false"
    params = (replace(WEIGHT, help="weight of each model: t = weight₁ / (weight₀ + weight₁)"),
              ParamSpec("nuslerp_flatten", bool, True, "interpolate each tensor as one vector (wins over row_wise)"),
              ParamSpec("nuslerp_row_wise", bool, False, "without flatten: vectors along dim 0 (one per column) "
                        "instead of along the last dimension (one per row)"),
              USE_BASE)
    min_models = 2
    max_models = 2
    base_policy = "optional"

    @staticmethod
    def _mode(params: Mapping[str, Any]) -> str:
        return "flat" if params["nuslerp_flatten"] else "columns" if params["nuslerp_row_wise"] else "rows"

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 0 if self._mode(params) == "rows" else 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        mode, use_base = self._mode(params), params["use_base"]
        deltas = 8 if use_base else 0
        if mode == "flat":
            return gram_footprint(task, 2, use_base)
        if mode == "rows":
            # the deltas, the two float64 copies and one product; per vector its sums and coefficients
            length = max(task.shape[-1] if len(task.shape) >= 2 else task.numel, 1)
            return Footprint(emit_per_element=deltas + 24 + -(-48 // length),
                             gpu_per_element=deltas + 12 + 24 + 4 + 8)
        rows, rn, tile = task.rows, task.row_numel, task.tile
        return Footprint(
            stats_per_element=deltas + PairSums.per_element(2, 3),
            emit_per_element=deltas + 8,  # the result and one term
            stats_state=PairSums.accumulator_bytes(3, rn),
            emit_state=8 * rn,  # the coefficients, float32
            end_of_pass=PairSums.accumulator_bytes(3, rn) + 8 * 8 * rn,  # + numpy's float64 work arrays
            partial_tile=PairSums.partial_tile_bytes(2, 3, rows, rn, tile),
            gpu_per_element=deltas + 52,
            gpu_state=PairSums.gpu_state_bytes(2, 3, rows, rn, tile) + 8 * rn,
        )

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        t, use_base, mode = interpolation_t(params["weight"]), params["use_base"], self._mode(params)
        if mode == "flat":
            return GramMerge(task, 2, use_base, lambda g: nuslerp_coefficients(t, g[0][0], g[1][1], g[0][1]))
        if mode == "rows":
            return _RowMerge(t, use_base)
        return _ColumnMerge(task, t, use_base)
