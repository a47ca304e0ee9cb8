"""Task arithmetic (Ilharco et al. 2023): ``B + lambda · Σ_k weight_k · Δ_k``, one element-wise pass."""

from __future__ import annotations

from . import register
from ._delta import LAMBDA, WEIGHT, DeltaMethod, normalize_param


@register
class TaskArithmetic(DeltaMethod):
    name = "task_arithmetic"
    summary = "Adds the weighted sum of the models' deltas from the base, scaled by lambda."
    reference = "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
    params = (WEIGHT, LAMBDA, normalize_param(False))
