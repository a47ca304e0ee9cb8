"""Model Breadcrumbs (Davari & Belilovsky 2023): per model, drop the ``gamma`` share of largest-|Δ| outliers and keep
the next ``density`` share (exact, two radix passes); add (``breadcrumbs``) or elect signs (``breadcrumbs_ties``)."""

from __future__ import annotations

from . import register
from ._delta import DENSITY, GAMMA, LAMBDA, WEIGHT, DeltaMethod, normalize_param, rescale_params


@register
class Breadcrumbs(DeltaMethod):
    name = "breadcrumbs"
    summary = "Drop the largest (gamma) and smallest deltas, keep a density share in between, and add them."
    reference = "Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795 (mergekit semantics)"
    params = (WEIGHT, DENSITY, GAMMA, LAMBDA, normalize_param(False), *rescale_params(False))
    sparsify = "outliers"


@register
class BreadcrumbsTies(DeltaMethod):
    name = "breadcrumbs_ties"
    summary = "Breadcrumbs' outlier-and-small-delta removal, then TIES's sign election."
    reference = "arXiv:2312.06795 with TIES sign election (mergekit semantics)"
    params = Breadcrumbs.params
    sparsify = "outliers"
    consensus = True
