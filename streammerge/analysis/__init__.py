"""``streammerge analyze``: how far each model moved from the base, and how the models' changes relate.

:func:`analyze` plans and runs one statistics-only pass of the merge engine over every tensor (the same input
checks, budget, reader and device as a merge; nothing is written; :mod:`.run`), turns each tensor's raw sums into
figures (:mod:`.figures`, where every figure is defined), groups them by layer, by module kind and over the whole
model, and states a verdict (:mod:`.verdict`). :class:`Analysis` holds every figure: ``to_json()`` gives them all,
``report()`` the text ``streammerge analyze`` prints, ``plot(path)`` the per-layer PNG (:mod:`.plot`, needs the
``plot`` extra). Every figure is computed from float64 sums in a fixed order and exact integer counts, so it does not
depend on the chunk size (the budget) or the thread count.

The figures WIDEN (Yu et al. 2024, arXiv:2408.03092) is built on are here: per-column magnitude and direction
divergences with WIDEN's columns (docs/widen.md), and the size of each model's change, which the paper found to
differ by 2.5–10× between fine-tuned and continually pre-trained models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

#: the default share of elements, in percent, whose overlap between two models' largest changes is reported
DEFAULT_TOP_K = 10.0

if TYPE_CHECKING:
    from .core import DEFINITIONS, SCHEMA, Analysis, analyze, analyze_recipe
    from .figures import Figures, TensorFigures
    from .verdict import Verdict

_LAZY = {"DEFINITIONS": "core", "SCHEMA": "core", "Analysis": "core", "analyze": "core", "analyze_recipe": "core",
         "Figures": "figures", "TensorFigures": "figures", "Verdict": "verdict"}


def __getattr__(name: str) -> Any:
    """The API, imported on first use (``streammerge analyze --help`` and the other commands stay light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_TOP_K", "DEFINITIONS", "SCHEMA", "Analysis", "Figures", "TensorFigures", "Verdict", "analyze",
           "analyze_recipe"]
