"""The analysis as one call: :func:`analyze` (Python) and :func:`analyze_recipe` (the CLI's entry), and the
:class:`Analysis` that holds every figure (see the package docstring)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from .._version import __version__
from ..lora import split_inputs
from ..pythonic import pythonic_errors
from ..recipe import Recipe
from . import DEFAULT_TOP_K
from .figures import (
    MODULE_KINDS,
    QUANTILES,
    Figures,
    Sums,
    TensorFigures,
    figures,
    group,
    layer_of,
    module_kind,
    tensor_sums,
)
from .run import RunFigures, analyzed, plan_analysis, run_statistics, skip_reason
from .stats import column_kind
from .verdict import Verdict, make_verdict

#: the JSON document's schema name and version (bumped when a key changes meaning or goes away)
SCHEMA = "streammerge-analyze/1"

#: short definitions, repeated in the JSON document so that it explains itself
DEFINITIONS = {
    "relative_change": "‖Δ‖/‖B‖, Frobenius norms over the elements (Δ = model − base); dimensionless",
    "delta_norm": "‖Δ‖, Frobenius norm; weight units",
    "mean_abs_change": "Σ|Δ| / elements; weight units",
    "unchanged": "fraction of elements with Δ = 0 exactly",
    "column_magnitude_divergence": "WIDEN's |‖m_j‖ − ‖b_j‖| per column j (weight units), summarised over columns: "
                                   "mean, p50/p90/p99 (numpy linear quantiles), max; group quantiles from float32 "
                                   "values",
    "column_direction_divergence": "WIDEN's 1 − cos(m_j, b_j) per column j (dimensionless), summarised as above; "
                                   "'undefined' counts zero columns (0/0)",
    "column": "WIDEN's column: a stored column of a matrix, a stored row of an embedding or Conv1D weight, a column "
              "of each expert's matrix, a column of a kernel's [out, in·∏kernel] view",
    "cosine": "Σ Δi·Δj / (‖Δi‖·‖Δj‖)",
    "sign_conflict": "among elements with Δi ≠ 0 and Δj ≠ 0, the fraction with Δi·Δj < 0 (≈ 0.5 for unrelated changes)",
    "top_k_overlap": "per tensor, each model's top_k% elements by |Δ| (exactly k = round(top_k/100 · elements), at "
                     "least 1, ties by lower flat index; an exact selection), fraction of them in both models' sets; "
                     "groups: Σ|Ti ∩ Tj| / Σ k (≈ top_k/100 for unrelated changes); a tensor where either model "
                     "changed fewer than k elements is left out (null for it)",
    "groups": "layers (layers.N / h.N), module kinds and the whole model: figures of all their elements together, "
              "from summed statistics",
    "weights": "the tensors of two or more dimensions that are not norms (the whole model without norm weights and "
               "biases): the group the verdict compares",
}


@dataclass(frozen=True)
class Analysis:
    """Every figure of one analysis (definitions: :mod:`streammerge.analysis.figures` and :data:`DEFINITIONS`).

    ``base`` and ``models`` are the folders as given (``models`` in order: model k is ``models[k - 1]``); ``top_k``
    the top-k share in percent (0: not computed); ``tensors`` one :class:`TensorFigures` per analyzed tensor, in
    the model's order; ``skipped`` (name, why) for the tensors not analyzed (kept from the base by a merge: tied
    heads, excluded, derived buffers, integers); ``layers`` one :class:`Figures` per decoder layer (name
    ``layer N``); ``modules`` one per module kind present (embedding, attention, mlp, norm, head, vision, other);
    ``model`` the whole model; ``weights`` its weight tensors (two or more dimensions, norms left out: what the
    verdict compares, as norm weights near 1 would otherwise weigh in ‖B‖ out of proportion); ``verdict`` the
    findings in words; ``run`` what the run took; ``notes`` what the planner pointed out."""

    base: str
    models: tuple[str, ...]
    top_k: float
    device: str
    tensors: tuple[TensorFigures, ...]
    skipped: tuple[tuple[str, str], ...]
    layers: tuple[Figures, ...]
    modules: tuple[Figures, ...]
    model: Figures
    weights: Figures
    verdict: Verdict
    run: RunFigures
    notes: tuple[str, ...] = ()

    def tensor(self, name: str) -> TensorFigures:
        """The figures of tensor ``name``."""
        return next(t for t in self.tensors if t.name == name)

    def to_json(self) -> dict[str, Any]:
        """Every figure as a JSON-serialisable dict (what ``streammerge analyze --json`` prints)."""
        return {
            "schema": SCHEMA, "streammerge": __version__, "base": self.base, "models": list(self.models),
            "options": {"top_k_percent": self.top_k, "quantiles": list(QUANTILES)}, "device": self.device,
            "definitions": DEFINITIONS,
            "model": self.model.to_json(),
            "weights": self.weights.to_json(),
            "modules": [m.to_json() for m in self.modules],
            "layers": [{"layer": int(g.name.split()[-1]), **g.to_json()} for g in self.layers],
            "tensors": [t.to_json() for t in self.tensors],
            "skipped": [{"name": name, "why": why} for name, why in self.skipped],
            "verdict": self.verdict.to_json(),
            "run": {"tensors": self.run.tensors, "seconds": self.run.elapsed, "bytes_read": self.run.bytes_read,
                    "peak_rss": self.run.peak_rss, "peak_vram": self.run.peak_vram},
            "notes": list(self.notes),
        }

    def report(self, tensors: bool = False) -> str:
        """The text report ``streammerge analyze`` prints (``tensors``: with a row per tensor)."""
        from .report import render

        return render(self, tensors)

    def plot(self, path: str | Path) -> Path:
        """Draw the per-layer plot into the PNG file ``path``; needs matplotlib (``pip install
        'streammerge[plot]'``), else raises :class:`~streammerge.analysis.plot.PlotError` saying so."""
        from .plot import check_plot_path, render

        check_plot_path(Path(path), [Path(self.base), *map(Path, self.models)])
        return render(self, path)


#: keyword options of :func:`analyze` taken by the recipe (what a merge's ``plan``/``merge`` also take)
_OPTIONS = ("max_ram", "device", "max_vram", "threads", "exclude", "embedding_names", "keep_vision", "offline",
            "chunk_rows")


def analyze(base: str | Path, models: str | Path | Sequence[str | Path], top_k: float = DEFAULT_TOP_K,
            progress: bool = False, handle_signals: bool = False, plot: str | Path | None = None,
            notify: Callable[[str], None] | None = None, **options: Any) -> Analysis:
    """Analyze how ``models`` (one folder or a list; local folders or Hub IDs, as for a merge) differ from ``base``.

    One statistics run over every tensor, within the same budget as a merge (``max_ram``, ``device``,
    ``max_vram``, ``threads``; ``exclude``, ``embedding_names`` and ``keep_vision`` select tensors and columns as for a merge;
    ``chunk_rows`` forces a chunk size and changes no figure). ``top_k``: the percentage of each tensor's elements
    whose overlap between two models is reported (default 10; 0 skips it, and every tensor is then read once;
    otherwise a tensor too large to be held whole within ``max_ram`` is read once per pass, three in all).
    ``plot``: also draw the per-layer PNG there (checked, with matplotlib's presence, before anything is read).
    ``notify`` receives the planner's notes. Inputs are checked as for a merge (the same errors, before any tensor
    is read); nothing is written anywhere but ``plot``.

    Example: ``a = analyze("base", ["chat", "multilingual"]); print(a.report()); a.model.model(2).relative_change``
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}: the arguments besides base, models, top_k, "
                        f"progress, handle_signals, plot and notify are: {', '.join(_OPTIONS)}")
    with pythonic_errors():
        base, models, adapters = split_inputs(base, models)  # MODEL+ADAPTER references, as merge reads them
        recipe = Recipe(base=Path(base), models=models, out=None, params={"top_k": top_k}, adapters=adapters,
                        **options)
        return analyze_recipe(recipe, progress, handle_signals, None if plot is None else Path(plot), notify)


def analyze_recipe(recipe: Recipe, progress: bool = False, handle_signals: bool = False, plot: Path | None = None,
                   notify: Callable[[str], None] | None = None) -> Analysis:
    """:func:`analyze` for a :class:`~streammerge.recipe.Recipe` (its ``params`` may hold ``top_k``), with errors in
    the command line's terms (the CLI's entry)."""
    if plot is not None:
        from .plot import check_plot_path, require_matplotlib

        check_plot_path(plot, [recipe.base, *recipe.models])
        require_matplotlib()
    plan = plan_analysis(recipe)
    names = tuple(str(m) for m in recipe.models)
    n = len(names)
    sums: dict[str, Sums] = {}
    tensors: list[TensorFigures] = []
    by_name = {t.name: t for t in plan.tensors}

    def on_state(name: str, state: dict[str, Any]) -> None:
        t = by_name[name]
        s, divergences = tensor_sums(t.numel, n, state)
        sums[name] = s
        f = figures(name, s, divergences)
        tensors.append(TensorFigures(**{x.name: getattr(f, x.name) for x in fields(Figures)}, shape=t.shape,
                                     rule=t.rule.value, module=module_kind(name, t.rule), layer=layer_of(name),
                                     column=column_kind(t.rule)))

    run = run_statistics(plan, progress, handle_signals, notify, on_state)
    order = {t.name: i for i, t in enumerate(plan.tensors)}  # the workers finish in any order; sums go in this one
    tensors.sort(key=lambda f: order[f.name])
    sums = {name: sums[name] for name in sorted(sums, key=order.__getitem__)}
    layers: dict[int, list[Sums]] = {}
    modules: dict[str, list[Sums]] = {}
    for t in tensors:
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(sums[t.name])
        modules.setdefault(t.module, []).append(sums[t.name])
    module_figures = tuple(group(kind, modules[kind], n) for kind in MODULE_KINDS if kind in modules)
    whole = group("model", sums.values(), n)
    matrices = [sums[t.name] for t in tensors if is_weight(t)]
    weights = group("weights", matrices, n) if matrices else replace(whole, name="weights")
    top = float(plan.params["top_k"]) if n >= 2 else 0.0
    analysis = Analysis(
        str(recipe.base), names, top, plan.budget.device, tuple(tensors),
        tuple((t.name, skip_reason(t)) for t in plan.tensors if not analyzed(t)),
        tuple(group(f"layer {i}", layers[i], n) for i in sorted(layers)), module_figures, whole, weights,
        make_verdict(weights, module_figures, names, top), run, plan.notes)
    if plot is not None:
        analysis.plot(plot)
    return analysis


def is_weight(t: TensorFigures) -> bool:
    """Whether ``t`` counts in :attr:`Analysis.weights`: a tensor of two or more dimensions that is not a norm."""
    return len(t.shape) >= 2 and t.module != "norm"


__all__ = ["DEFINITIONS", "SCHEMA", "Analysis", "Figures", "TensorFigures", "Verdict", "analyze", "analyze_recipe"]
