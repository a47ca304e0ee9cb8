"""The text report of ``streammerge analyze``: aligned tables of the whole model, its module kinds and layers (and,
on request, every tensor), then the verdict."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .figures import ColumnSummary, Figures

if TYPE_CHECKING:
    from .core import Analysis


#: the width the verdict's paragraphs are wrapped to
WIDTH = 110


def _pct(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{100 * x:#.{digits}g}".rstrip(".") + "%"  # 3 significant digits: 11.0%


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _cos(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _quantiles(s: ColumnSummary | None) -> str:
    return "-" if s is None or s.p50 is None else f"{_num(s.p50)} / {_num(s.p90)} / {_num(s.max)}"


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows of cells as aligned lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(r, widths))).rstrip() for r in rows]


def _group_rows(groups: Sequence[Figures], first: str, n: int, pairs: Sequence[tuple[int, int]]) -> list[list[str]]:
    header = [first, "tensors", *(f"‖Δ{k}‖/‖B‖" for k in range(1, n + 1))]
    for i, j in pairs:
        header += [f"cos {i}·{j}", f"conflict {i}·{j}", f"top-k {i}·{j}"]
    rows = [header]
    for g in groups:
        row = [g.name.removeprefix("layer "), str(g.tensors), *(_pct(m.relative_change) for m in g.models)]
        for p in g.pairs:
            row += [_cos(p.cosine), _pct(p.sign_conflict), _pct(p.top_k_overlap)]
        rows.append(row)
    return rows


def render(a: Analysis, tensors: bool = False) -> str:
    """The report as text (what ``streammerge analyze`` prints)."""
    n = len(a.models)
    w = a.model
    pairs = [p.models for p in w.pairs]
    lines = [f"base     {a.base}", *(f"model {k}  {m}" for k, m in enumerate(a.models, 1)),
             f"analyzed {w.tensors} tensors, {w.elements:,} elements"
             + (f"; skipped {len(a.skipped)} ({', '.join(f'{name}: {why}' for name, why in a.skipped[:3])}"
                f"{', ...' if len(a.skipped) > 3 else ''})" if a.skipped else ""), ""]
    model_rows = [["whole model", *(f"model {k}" for k in range(1, n + 1))],
                  ["‖Δ‖/‖B‖ (relative change)", *(_pct(m.relative_change) for m in w.models)],
                  ["‖Δ‖/‖B‖ of the weights (no norms)", *(_pct(m.relative_change) for m in a.weights.models)],
                  ["mean |Δ| (weight units)", *(_num(m.mean_abs_change) for m in w.models)],
                  ["mean |Δ| of the weights (no norms)", *(_num(m.mean_abs_change) for m in a.weights.models)],
                  ["unchanged elements", *(_pct(m.unchanged) for m in w.models)],
                  ["column |‖m‖−‖b‖| p50 / p90 / max", *(_quantiles(m.magnitude) for m in w.models)],
                  ["column 1−cos(m, b) p50 / p90 / max", *(_quantiles(m.direction) for m in w.models)]]
    lines += table(model_rows, indent="")
    if w.pairs:
        lines += ["", *table([["pair", "cosine of Δ", "sign conflict",
                                f"top-{a.top_k:g}% overlap (chance {a.top_k:g}%)" if a.top_k else "top-k overlap"],
                               *([f"models {p.models[0]} · {p.models[1]}", _cos(p.cosine), _pct(p.sign_conflict),
                                  _pct(p.top_k_overlap)] for p in w.pairs)], indent="")]
    lines += ["", "by module kind", *table(_group_rows(a.modules, "module", n, pairs))]
    if a.layers:
        lines += ["", "by layer", *table(_group_rows(a.layers, "layer", n, pairs))]
    if tensors:
        lines += ["", "by tensor", *table(_group_rows(a.tensors, "tensor", n, pairs))]
    lines += ["", "verdict", *(_item(f) for f in a.verdict.findings)]
    if a.verdict.suggestions:
        lines += ["suggested methods", *(_item(s) for s in a.verdict.suggestions)]
    lines += [textwrap.fill(f"({a.verdict.caveat})", WIDTH, initial_indent="  ", subsequent_indent="   ")]
    return "\n".join(lines)


def _item(text: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent="  - ", subsequent_indent="    ", break_on_hyphens=False)
