"""Passthrough (mergekit): no arithmetic; each output tensor is a copy of one input tensor, times ``scale``. Used
with a recipe's ``slices:`` to stack layers (a frankenmerge): :mod:`streammerge.slices` decides which input tensor
each output tensor copies, and the scale per tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import register
from .base import Method, ParamSpec, Rule, TensorMerge, TensorTask


@register
class Passthrough(Method):
    name = "passthrough"
    summary = ("Copies tensors unchanged (times scale): with a recipe's slices: it stacks layer ranges of the "
               "models into one deeper model.")
    reference = "mergekit passthrough (layer stacking with slices:)"
    passes = "1 (a copy)"
    params = (ParamSpec("scale", float, 1.0, "factor on every copied tensor (with filters, e.g. 0 for o_proj)"),)
    min_models = 0

    def rule_error(self, task: TensorTask) -> str | None:
        if task.rule.merged:
            return ("passthrough merges nothing: it copies one model or stacks layer ranges, from a recipe "
                    "(models: with one entry, or slices:)")
        return None

    def start(self, task: TensorTask, params: Mapping[str, Any], n_models: int) -> TensorMerge:
        raise AssertionError(f"passthrough copies {task.name}; nothing is merged")  # rule_error refuses merges

    def stat_passes(self, rule: Rule, params: Mapping[str, Any]) -> int:
        return 0
