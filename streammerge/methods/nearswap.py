"""NearSwap (mergekit ``nearswap``; from alchemonaut/QuartetAnemoi-70B-t0.0001): where the model and the base are
close, take the model's value; where they are far apart, stay near the base. Per element, with ``d = |B − M|``:
``w = clamp(t / d, 0, 1)`` (1 where ``d`` is 0) and the result is ``w·M + (1 − w)·B``, in float32 and in that order
of operations, as mergekit 0.1.5 computes it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .. import kernels
from .._torch import torch
from . import register
from .base import Footprint, Method, ParamSpec, TensorMerge, TensorTask


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0 (the sameness threshold)"


class _NearSwapMerge(TensorMerge):
    def __init__(self, t: float) -> None:
        self.t = t

    def emit(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor]) -> torch.Tensor:
        m = models[0]
        w = self.t / torch.sub(base, m).abs_()  # t / 0 is inf (0 / 0 cannot happen: t > 0)
        torch.nan_to_num(w, nan=1.0, posinf=1.0, neginf=1.0, out=w).clamp_(0.0, 1.0)
        rest = torch.rsub(w, 1.0).mul_(base)  # (1 - w)·B
        return w.mul_(m).add_(rest)  # w·M + (1 - w)·B

    def emit_raw(self, r0: int, base: torch.Tensor, models: Sequence[torch.Tensor], out: torch.Tensor) -> int | None:
        """:meth:`emit` and the cast in one pass (the fused kernel ``nearswap_emit``)."""
        got = kernels.arrays(base, models, out)
        if got is None or got[0].dtype != got[1][0].dtype:  # the kernel takes one input type
            return None
        b, (m,), o = got
        return int(kernels.kernels().nearswap_emit(b, m, kernels.f32([self.t])[0], o))


@register
class NearSwap(Method):
    name = "nearswap"
    summary = ("Per element, takes the model's value where it is within t of the base and interpolates toward the "
               "base where they differ more (w = min(1, t/|B−M|)).")
    reference = "mergekit nearswap (alchemonaut, QuartetAnemoi-70B-t0.0001)"
    params = (ParamSpec("t", float, 0.0001, "the sameness threshold: elements within t of the base take the "
                        "model's value", check=_positive),)
    min_models = 1
    max_models = 1

    def footprint(self, task: TensorTask, n_models: int, params: Mapping[str, Any]) -> Footprint:
        # |B − M| and the weights made from it, then (1 - w)·B beside the weights (which become the result)
        return Footprint(emit_per_element=12, gpu_per_element=4 * n_models + 20)

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        return _NearSwapMerge(params["t"])
