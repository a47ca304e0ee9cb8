"""The figures of ``streammerge analyze``, made from the raw statistics of each tensor and summed into groups.

Definitions (``B`` the base, ``M_k`` model k, ``Δ_k = M_k − B``, sums over the elements of a tensor or of every
tensor in a group; norms are Frobenius norms, in the units of the weights):

- **relative change** ``‖Δ_k‖ / ‖B‖`` (dimensionless; None when ``‖B‖ = 0``); **mean |Δ|** ``Σ|Δ_k| / elements``
  (weight units); **unchanged** the fraction of elements with ``Δ_k = 0`` exactly (stored values equal);
- **column divergences**, WIDEN's (Yu et al. 2024, arXiv:2408.03092; docs/widen.md): per column ``j``,
  magnitude ``|‖m_kj‖ − ‖b_j‖|`` (weight units) and direction ``1 − cos(m_kj, b_j)`` (dimensionless, 0 to 2), from
  float64 column sums, with WIDEN's columns per rule (stored columns of a matrix, stored rows of an embedding or a
  Conv1D weight, each expert's columns). A column that is all zero in the base or the model has no direction
  (``0/0``): it is counted as ``undefined`` and left out of the direction summary. Summaries: the mean, the
  quantiles p50/p90/p99 (numpy's default linear interpolation between order statistics) and the maximum over the
  columns. For a group, mean and maximum are exact; its quantiles are taken over its columns' values rounded to
  float32 (what is kept of each tensor, 8 bytes per column and model);
- **cosine** of two models' deltas ``Σ Δ_i·Δ_j / (‖Δ_i‖·‖Δ_j‖)`` (None when either delta is zero);
- **sign conflict**: among the elements both models changed (``Δ_i ≠ 0`` and ``Δ_j ≠ 0``), the fraction where the
  changes have opposite signs (``Δ_i·Δ_j < 0``); None when no element was changed by both. Unrelated changes give
  about 0.5, identical ones 0;
- **top-k overlap**: in each tensor, each model's top k elements by ``|Δ_k|`` (float32), k the nearest integer to
  ``top_k``% of the tensor's elements (at least 1), exactly k of them with ties broken by lower flat index (an exact
  radix select, :mod:`streammerge.methods._select`); the overlap is the fraction of those k elements that are in
  both models' top k (``|T_i ∩ T_j| / k``), summed over a group's tensors (``Σ|T_i ∩ T_j| / Σ k``). Unrelated
  changes give about ``top_k``%, identical ones 1. A tensor where either model changed fewer than k elements is
  left out of the pair's overlap (None for that tensor): that model's top k would be padded with unchanged
  elements, picked by index.

Groups: every layer (``layers.N`` / ``h.N``, vision towers excepted), every module kind (:func:`module_kind`), and
the whole model (every analyzed tensor). A group's figures are those of all its elements together, computed from
the sums of its tensors (not averages of the tensors' figures).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..methods import Rule
from ..parameters import LAYER
from ..recipe import HEAD_NAMES, POSITION_EMBEDDINGS, TOKEN_EMBEDDINGS, VISION_PREFIXES

#: the quantiles of the column divergences reported (fractions)
QUANTILES = (0.5, 0.9, 0.99)
#: module kinds, in report order
MODULE_KINDS = ("embedding", "attention", "mlp", "norm", "head", "vision", "other")

_NORM = re.compile(r"(^|\.)(\w*norm\w*|ln_\w+|ln_f|ln\d*)(\.|$)", re.IGNORECASE)
_ATTENTION = re.compile(r"(^|\.)(\w*attn\w*|\w*attention\w*|[qkvo]_proj|qkv_proj|query_key_value|wq|wk|wv|wo)(\.|$)")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn|\w*experts?|block_sparse_moe|\w*gate_proj|up_proj|down_proj|"
                  r"gate_up_proj|c_fc|dense_h_to_4h|dense_4h_to_h|w1|w2|w3|fc1|fc2)(\.|$)")


def module_kind(name: str, rule: Rule) -> str:
    """The module kind of a tensor, from its name: ``vision`` (a vision tower or projector), ``head`` (the output
    head), ``embedding`` (token or position embedding), ``norm`` (a normalisation weight or bias; checked before
    attention, so ``post_attention_layernorm`` is a norm), ``attention``, ``mlp`` (MLP, experts and routers), or
    ``other``."""
    if name.startswith(VISION_PREFIXES):
        return "vision"
    if name in HEAD_NAMES:
        return "head"
    if rule is Rule.EMBEDDING or name in TOKEN_EMBEDDINGS or name in POSITION_EMBEDDINGS:
        return "embedding"
    for kind, pattern in (("norm", _NORM), ("attention", _ATTENTION), ("mlp", _MLP)):
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (``model.layers.N.…``, GPT-2's ``h.N.…``); None outside the layers and
    for a vision tower's layers."""
    if name.startswith(VISION_PREFIXES):
        return None
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


# ---- figures ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnSummary:
    """One WIDEN divergence summarised over columns: how many columns have it (``columns``) and how many do not
    (``undefined``: zero columns, for the direction), its mean, quantiles (p50, p90, p99) and maximum."""

    columns: int
    undefined: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    def to_json(self) -> dict[str, Any]:
        return {"columns": self.columns, "undefined": self.undefined, "mean": self.mean, "p50": self.p50,
                "p90": self.p90, "p99": self.p99, "max": self.max}


@dataclass(frozen=True)
class ModelFigures:
    """One model's change from the base, over a tensor or a group (see the module doc for the definitions)."""

    model: int  # 1-based, in --model order
    relative_change: float | None  # ‖Δ‖ / ‖B‖
    delta_norm: float  # ‖Δ‖, weight units
    mean_abs_change: float  # Σ|Δ| / elements, weight units
    unchanged: float  # fraction of elements with Δ = 0
    magnitude: ColumnSummary | None  # |‖m_j‖ − ‖b_j‖| over columns (None: no columns, e.g. 1-D tensors)
    direction: ColumnSummary | None  # 1 − cos(m_j, b_j) over columns

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "relative_change": self.relative_change, "delta_norm": self.delta_norm,
                "mean_abs_change": self.mean_abs_change, "unchanged": self.unchanged,
                "column_magnitude_divergence": self.magnitude and self.magnitude.to_json(),
                "column_direction_divergence": self.direction and self.direction.to_json()}


@dataclass(frozen=True)
class PairFigures:
    """How two models' changes relate, over a tensor or a group (see the module doc for the definitions)."""

    models: tuple[int, int]  # 1-based
    cosine: float | None
    sign_conflict: float | None  # opposite_signs / changed_by_both
    changed_by_both: int  # elements with Δ_i ≠ 0 and Δ_j ≠ 0
    opposite_signs: int  # elements with Δ_i·Δ_j < 0
    top_k_overlap: float | None  # in_both_top_k / top_k (None: not computed)
    top_k: int  # elements in each model's top k (summed over a group's tensors)
    in_both_top_k: int

    def to_json(self) -> dict[str, Any]:
        return {"models": list(self.models), "cosine": self.cosine, "sign_conflict": self.sign_conflict,
                "changed_by_both": self.changed_by_both, "opposite_signs": self.opposite_signs,
                "top_k_overlap": self.top_k_overlap, "top_k": self.top_k, "in_both_top_k": self.in_both_top_k}


@dataclass(frozen=True)
class Figures:
    """The figures of one tensor or one group of tensors: ``name`` is the tensor's name, ``layer N``, a module kind
    or ``model``; ``base_norm`` is ``‖B‖`` (weight units)."""

    name: str
    tensors: int
    elements: int
    base_norm: float
    models: tuple[ModelFigures, ...]
    pairs: tuple[PairFigures, ...]

    def model(self, k: int) -> ModelFigures:
        """Model ``k``'s figures (1-based)."""
        return self.models[k - 1]

    def pair(self, i: int, j: int) -> PairFigures:
        """The figures of models ``i`` and ``j`` (1-based, either order)."""
        key = (min(i, j), max(i, j))
        return next(p for p in self.pairs if p.models == key)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tensors": self.tensors, "elements": self.elements, "base_norm": self.base_norm,
                "models": [m.to_json() for m in self.models], "pairs": [p.to_json() for p in self.pairs]}


@dataclass(frozen=True)
class TensorFigures(Figures):
    """One tensor's figures, with its shape, WIDEN rule, module kind, layer (None outside the layers) and what one
    of its WIDEN columns is (None for 1-D tensors)."""

    shape: tuple[int, ...] = ()
    rule: str = ""
    module: str = "other"
    layer: int | None = None
    column: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "shape": list(self.shape), "rule": self.rule, "module": self.module,
                "layer": self.layer, "column": self.column}


# ---- sums ------------------------------------------------------------------------------------------------------
@dataclass
class Sums:
    """The raw sums of a tensor or a group (adding groups adds these), from which :func:`figures` computes."""

    n: int
    tensors: int = 0
    elements: int = 0
    ssb: float = 0.0
    ssd: list[float] = field(default_factory=list)  # Σ Δ_k²
    sabs: list[float] = field(default_factory=list)  # Σ |Δ_k|
    zeros: list[int] = field(default_factory=list)  # #(Δ_k = 0)
    dots: list[float] = field(default_factory=list)  # Σ Δ_i·Δ_j per pair
    both: list[int] = field(default_factory=list)
    opposite: list[int] = field(default_factory=list)
    top_k: int = 0
    overlap: list[int] = field(default_factory=list)
    pair_k: list[int] = field(default_factory=list)  # per pair: Σ k over the tensors both models changed enough
    # per model: [magnitude, direction] divergences, float32, every column of every tensor added
    columns: list[list[list[np.ndarray]]] = field(default_factory=list)
    # per model: [magnitude, direction] exact (Σ defined values, defined count, undefined count, max)
    column_totals: list[list[list[float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n, p = self.n, self.n * (self.n - 1) // 2
        for name, size, zero in (("ssd", n, 0.0), ("sabs", n, 0.0), ("zeros", n, 0), ("dots", p, 0.0),
                                 ("both", p, 0), ("opposite", p, 0), ("overlap", p, 0), ("pair_k", p, 0)):
            if not getattr(self, name):
                setattr(self, name, [zero] * size)
        if not self.columns:
            self.columns = [[[], []] for _ in range(n)]
            self.column_totals = [[[0.0, 0, 0, -math.inf], [0.0, 0, 0, -math.inf]] for _ in range(n)]

    def add(self, other: Sums) -> None:
        self.tensors += other.tensors
        self.elements += other.elements
        self.ssb += other.ssb
        self.top_k += other.top_k
        for name in ("ssd", "sabs", "zeros", "dots", "both", "opposite", "overlap", "pair_k"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for i, v in enumerate(theirs):
                mine[i] += v
        for k in range(self.n):
            for d in range(2):
                self.columns[k][d] += other.columns[k][d]
                t, o = self.column_totals[k][d], other.column_totals[k][d]
                t[0] += o[0]
                t[1] += o[1]
                t[2] += o[2]
                t[3] = max(t[3], o[3])


def tensor_sums(numel: int, n: int, state: dict[str, Any]) -> tuple[Sums, list[list[np.ndarray]]]:
    """A tensor's :class:`Sums` from its statistics state, and its float64 column divergences per model
    ([magnitude, direction], empty without columns)."""
    sums = state["sums"].numpy()
    counts = state["counts"].numpy()
    p = n * (n - 1) // 2
    s = Sums(n, tensors=1, elements=numel, ssb=float(sums[0]), ssd=[float(x) for x in sums[1 : 1 + n]],
             sabs=[float(x) for x in sums[1 + n : 1 + 2 * n]], zeros=[int(x) for x in counts[:n]],
             dots=[float(x) for x in sums[1 + 2 * n : 1 + 2 * n + p]],
             both=[int(counts[n + 2 * i]) for i in range(p)], opposite=[int(counts[n + 2 * i + 1]) for i in range(p)])
    if "top_k" in state:
        s.top_k = int(state["top_k"][0])
        overlap = [int(x) for x in state["overlap"].numpy()]
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        # a model that changed fewer than k elements would have a top k padded with unchanged elements (picked by
        # index): the pair's overlap means nothing there, and the tensor is left out of it
        enough = [numel - s.zeros[k] >= s.top_k for k in range(n)]
        s.pair_k = [s.top_k if enough[i] and enough[j] else 0 for i, j in pairs]
        s.overlap = [o if k else 0 for o, k in zip(overlap, s.pair_k)]
    divergences: list[list[np.ndarray]] = []
    if "columns" in state:
        cols = state["columns"].numpy()  # (1 + 2N, n): Σb², Σm_k², Σm_k·b
        ssb = cols[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            for k in range(n):
                ssm, dot = cols[1 + k], cols[1 + n + k]
                pair = [np.abs(np.sqrt(ssm) - np.sqrt(ssb)), 1.0 - dot / np.sqrt(ssm * ssb)]
                divergences.append(pair)
                for d, values in enumerate(pair):
                    defined = values[~np.isnan(values)]
                    s.columns[k][d].append(values.astype(np.float32))
                    s.column_totals[k][d] = [float(np.add.reduce(defined)), int(defined.size),
                                             int(values.size - defined.size),
                                             float(defined.max()) if defined.size else -math.inf]
    return s, divergences


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _summary(values: np.ndarray | None, totals: list[float]) -> ColumnSummary:
    """A :class:`ColumnSummary`: quantiles from ``values`` (float64 for a tensor, float32 for a group), mean and
    maximum from the exact ``totals``."""
    total, count, undefined, largest = totals
    if values is not None:
        values = values[~np.isnan(values)].astype(np.float64)
    if not count or values is None or not values.size:
        return ColumnSummary(int(count), int(undefined), None, None, None, None, None)
    q = [float(x) for x in np.quantile(values, QUANTILES)]
    return ColumnSummary(int(count), int(undefined), total / count, q[0], q[1], q[2], largest)


def figures(name: str, s: Sums, divergences: list[list[np.ndarray]] | None = None) -> Figures:
    """The figures of ``s`` (see the module doc); ``divergences``: a tensor's float64 column divergences, whose
    quantiles are exact (a group's come from its float32 copies)."""
    pairs = [(i, j) for i in range(s.n) for j in range(i + 1, s.n)]
    models = []
    for k in range(s.n):
        summaries: list[ColumnSummary | None] = [None, None]
        if s.columns[k][0]:
            for d in range(2):
                values = divergences[k][d] if divergences else np.concatenate(s.columns[k][d])
                summaries[d] = _summary(values, s.column_totals[k][d])
        models.append(ModelFigures(k + 1, _ratio(math.sqrt(s.ssd[k]), math.sqrt(s.ssb)), math.sqrt(s.ssd[k]),
                                   s.sabs[k] / s.elements if s.elements else 0.0,
                                   s.zeros[k] / s.elements if s.elements else 0.0, summaries[0], summaries[1]))
    out = []
    for p, (i, j) in enumerate(pairs):
        cosine = _ratio(s.dots[p], math.sqrt(s.ssd[i]) * math.sqrt(s.ssd[j]))
        out.append(PairFigures((i + 1, j + 1), cosine, _ratio(s.opposite[p], s.both[p]), s.both[p], s.opposite[p],
                               _ratio(s.overlap[p], s.pair_k[p]), s.pair_k[p], s.overlap[p]))
    return Figures(name, s.tensors, s.elements, math.sqrt(s.ssb), tuple(models), tuple(out))


def group(name: str, parts: Iterable[Sums], n: int) -> Figures:
    """The figures of the tensors whose sums are ``parts``, taken together."""
    total = Sums(n)
    for part in parts:
        total.add(part)
    return figures(name, total)
