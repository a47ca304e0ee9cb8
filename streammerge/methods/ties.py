"""TIES-merging (Yadav et al. 2023): trim each delta to its top ``density`` share by magnitude (exact, two radix
passes; a positive density keeps at least one element), optionally rescale the kept deltas (mergekit's L1 norm
rescale), elect a sign per element from the summed weighted deltas, average the agreeing ones."""

from __future__ import annotations

from . import register
from ._delta import DENSITY, LAMBDA, WEIGHT, DeltaMethod, normalize_param, rescale_params


@register
class Ties(DeltaMethod):
    name = "ties"
    summary = "Trim small deltas (keep the top density share by |delta|), elect signs, merge the agreeing deltas."
    reference = "Yadav et al. 2023, TIES-Merging, arXiv:2306.01708 (mergekit semantics)"
    params = (WEIGHT, DENSITY, LAMBDA, normalize_param(True), *rescale_params(False))
    sparsify = "magnitude"
    consensus = True
