"""``streammerge analyze --plot FILE.png``: the per-layer view of the analysis (the WIDEN paper's Figure-1 view).

Stacked panels sharing the layer axis: each model's relative change ``‖Δ‖/‖B‖`` (percent; a log scale when the
values span a decade or more), then for each pair of models the cosine of their deltas, the sign conflict (percent,
with the 50% of unrelated changes marked) and, when computed, the top-k overlap (percent, with chance marked). A
model without ``layers.N`` tensors is drawn by module kind instead. matplotlib is an optional extra
(``pip install 'streammerge[plot]'``); it is imported only here, without pyplot (no global state, no display).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StreamMergeError

if TYPE_CHECKING:
    from .core import Analysis
    from .figures import Figures

#: the PNG's size: WIDTH_PX wide, PANEL_PX per panel plus MARGIN_PX high (100 dots per inch)
DPI = 100
WIDTH_PX = 1000
PANEL_PX = 260
MARGIN_PX = 90
#: the file formats by name ending (matplotlib's Agg, SVG and PDF backends, all in the base install)
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: the cosine axis reaches at least ±COSINE_REACH
COSINE_REACH = 0.25
MISSING = ("the plot (--plot, or plot= in Python) needs matplotlib, which is not installed: "
           "pip install 'streammerge[plot]'")


class PlotError(StreamMergeError):
    """The plot cannot be drawn or written (matplotlib missing, a bad file name)."""


def check_plot_path(path: Path, inputs: list[Path]) -> None:
    """Refuse a plot file that is not a .png, .svg or .pdf, whose folder does not exist, or that lies inside an input folder
    (analyze never writes into a model folder)."""
    if path.suffix.lower() not in FORMATS:
        raise PlotError(f"plot file {path}: the plot is written as PNG, SVG or PDF; give a file name ending in "
                        ".png, .svg or .pdf")
    if not path.parent.resolve().is_dir():
        raise PlotError(f"plot file {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise PlotError(f"plot file {path} is a folder; give a file name ending in .png, .svg or .pdf")
    real = path.resolve()
    for folder in inputs:
        if folder.resolve() in real.parents:
            raise PlotError(f"plot file {path} is inside the input folder {folder}; analyze writes nothing into model "
                            "folders: choose a file elsewhere")


def require_matplotlib() -> None:
    """Raise :class:`PlotError` naming the ``plot`` extra unless matplotlib can be imported (checked before an
    analysis runs, so a missing plotting library does not cost a whole run)."""
    _matplotlib()


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(MISSING) from None
    return Figure, FigureCanvasAgg


def panel_count(a: Analysis) -> int:
    """How many panels the plot has: the relative change, and with two models or more the cosine, the sign
    conflict and (when computed) the top-k overlap."""
    if len(a.models) < 2:
        return 1
    return 4 if a.top_k else 3


def size_px(a: Analysis) -> tuple[int, int]:
    """(width, height) of the PNG in pixels."""
    return WIDTH_PX, PANEL_PX * panel_count(a) + MARGIN_PX


def render(a: Analysis, path: str | Path) -> Path:
    """Draw the plot of ``a`` into the PNG file ``path`` (replaced if it exists); returns the path."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    path = Path(path)
    groups: list[Figures] = list(a.layers) or list(a.modules)
    by_layer = bool(a.layers)
    xs: list[Any] = [int(g.name.split()[-1]) for g in groups] if by_layer else list(range(len(groups)))
    width, height = size_px(a)
    # lines across layers; separate points across module kinds (categories, not a sequence)
    style: dict[str, Any] = {"marker": "o", "markersize": 3} if by_layer else {"marker": "o", "markersize": 7,
                                                                               "linestyle": "none"}
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(panel_count(a), 1, sharex=True, squeeze=False)[:, 0]
    names = [Path(m).name or str(m) for m in a.models]
    where = "per decoder layer" if by_layer else "per module kind"
    fig.suptitle(f"Changes from the base model {Path(a.base).name or a.base!r}, {where}", fontsize=13)

    ax = axes[0]
    values = []
    for k, name in enumerate(names, 1):
        ys = [_scaled(g.model(k).relative_change, 100) for g in groups]
        values += [y for y in ys if y == y and y > 0]
        ax.plot(xs, ys, **style, label=f"model {k}: {name}")
    spans_decades = bool(values) and min(values) > 0 and max(values) / min(values) >= 10
    if spans_decades:
        ax.set_yscale("log")
        # ticks at 1, 2 and 5 of every decade, written 0.2, 0.5, 1 rather than 10^-1, ...: a value between two
        # decades can be read off the axis
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
    ax.set_ylabel("relative change\n‖Δ‖ / ‖B‖ (%" + (", log scale)" if spans_decades else ")")
                  + "\nall tensors, norms too")
    _legend(ax)
    ax.grid(True, which="both", alpha=0.3)

    if len(a.models) >= 2:
        pairs = [p.models for p in a.model.pairs]
        label = {p: f"models {p[0]} · {p[1]}" for p in pairs}
        ax = axes[1]
        reach = 0.0
        for p in pairs:
            ys = [_scaled(g.pair(*p).cosine, 1) for g in groups]
            reach = max([reach, *(abs(y) for y in ys if y == y)])
            ax.plot(xs, ys, **style, label=label[p])
        # at least ±0.25, so that noise around 0 (unrelated changes) is drawn as the flat line it is
        reach = min(1.05, max(COSINE_REACH, 1.1 * reach))
        ax.set_ylim(-reach, reach)
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=1, label="0: unrelated changes")
        ax.set_ylabel("cosine of the deltas\ncos(Δi, Δj) (−1 to 1)")
        _legend(ax)
        ax.grid(True, alpha=0.3)

        ax = axes[2]
        top = 60.0
        for p in pairs:
            ys = [_scaled(g.pair(*p).sign_conflict, 100) for g in groups]
            top = max([top, *(y + 5 for y in ys if y == y)])
            ax.plot(xs, ys, **style, label=label[p])
        ax.axhline(50.0, color="grey", linestyle="--", linewidth=1, label="50%: unrelated changes")
        ax.set_ylim(0, min(top, 100))
        ax.set_ylabel("sign conflict (%)\nof elements both changed")
        _legend(ax)
        ax.grid(True, alpha=0.3)

        if a.top_k:
            ax = axes[3]
            top = max(2 * a.top_k, 10.0)
            for p in pairs:
                ys = [_scaled(g.pair(*p).top_k_overlap, 100) for g in groups]
                top = max([top, *(y + 5 for y in ys if y == y)])
                ax.plot(xs, ys, **style, label=label[p])
            ax.axhline(a.top_k, color="grey", linestyle="--", linewidth=1, label=f"{a.top_k:g}%: chance")
            ax.set_ylim(0, min(top, 100))
            ax.set_ylabel(f"top-{a.top_k:g}% overlap (%)\nlargest |Δ| in both")
            _legend(ax)
            ax.grid(True, alpha=0.3)

    bottom = axes[-1]
    if by_layer:
        bottom.set_xlabel("decoder layer (index)")
        bottom.xaxis.get_major_locator().set_params(integer=True)
    else:
        bottom.set_xticks(xs, [g.name for g in groups])
        bottom.set_xlabel("module kind")
    fig.savefig(path, format=FORMATS[path.suffix.lower()], dpi=DPI)
    return path


def _legend(ax: Any) -> None:
    """The panel's legend beside it, right of the axes, where it covers no line (with three models or more the
    pair panels have three lines or more)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=9)


def _scaled(x: float | None, factor: float) -> float:
    """``x · factor``; NaN (a gap in the line) where the figure is undefined."""
    return float("nan") if x is None else x * factor
