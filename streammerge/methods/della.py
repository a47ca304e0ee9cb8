"""DELLA (Deep et al. 2024, arXiv:2406.11617), as mergekit 0.1.5 computes it: MAGPRUNE drops each delta element at
random with a probability set by its magnitude rank within its row (``density ± epsilon``, larger deltas kept
more often), rescales the kept deltas (mergekit's L1 norm rescale by default; ``rescale_mode=inverse_density``
divides each by its keep probability, as the paper does), then elects signs and averages (``della``) or adds
(``della_linear``). Masks come from the counter-based generator, so they do not depend on chunking or device."""

from __future__ import annotations

from . import register
from ._delta import DENSITY, EPSILON, LAMBDA, SEED, WEIGHT, DeltaMethod, normalize_param, rescale_params


@register
class Della(DeltaMethod):
    name = "della"
    summary = "Drop deltas at random with magnitude-ranked keep probabilities (density ± epsilon), rescale, elect signs."
    reference = "Deep et al. 2024, DELLA-Merging, arXiv:2406.11617 (mergekit 0.1.5 semantics)"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(True), *rescale_params(True), SEED)
    sparsify = "della"
    consensus = True


@register
class DellaLinear(DeltaMethod):
    name = "della_linear"
    summary = "DELLA's magnitude-ranked random drop and rescale, then the deltas are added (no sign election)."
    reference = "Deep et al. 2024, arXiv:2406.11617 (mergekit 0.1.5 semantics)"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA, normalize_param(False), *rescale_params(True), SEED)
    sparsify = "della"
