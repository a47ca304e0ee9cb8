"""DARE (Yu et al. 2024): drop each delta element with probability ``1 − density`` and rescale the rest, then add
(``dare_linear``) or elect signs as TIES does (``dare_ties``). The rescale is mergekit 0.1.5's by default (each
tensor keeps its delta's L1 norm); ``rescale_mode=inverse_density`` divides by ``density`` as the paper does. Masks
come from a counter-based generator keyed by (seed, model, tensor, element), so they do not depend on chunking or
device."""

from __future__ import annotations

from . import register
from ._delta import DENSITY, LAMBDA, SEED, WEIGHT, DeltaMethod, normalize_param, rescale_params


@register
class DareLinear(DeltaMethod):
    name = "dare_linear"
    summary = "Randomly drop delta elements (keep probability density), rescale, and add them to the base."
    reference = "Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099"
    params = (WEIGHT, DENSITY, LAMBDA, normalize_param(False), *rescale_params(True), SEED)
    sparsify = "random"


@register
class DareTies(DeltaMethod):
    name = "dare_ties"
    summary = "DARE's random drop and rescale, then TIES's sign election."
    reference = "Yu et al. 2024, arXiv:2311.03099, with TIES sign election (mergekit semantics)"
    params = DareLinear.params
    sparsify = "random"
    consensus = True
