"""streammerge: merge homologous LLM checkpoints within a memory budget, streaming row chunks from disk.

Python API: :func:`merge`, :func:`plan`, :func:`inspect`, :func:`analyze`, :func:`finalize`; the CLI is ``streammerge`` (see
``streammerge --help``).
The API is imported on first use, so light entry points (``streammerge verify``, the header parser) do not load
torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import StreamMergeError
from .stopping import MergeInterrupted

if TYPE_CHECKING:
    from .analysis import Analysis, analyze
    from .api import finalize, inspect, merge, plan
    from .recipe import Recipe

_LAZY = {"finalize": "api", "inspect": "api", "merge": "api", "plan": "api", "Recipe": "recipe", "analyze": "analysis",
         "Analysis": "analysis"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Analysis", "MergeInterrupted", "Recipe", "StreamMergeError", "__version__", "analyze", "finalize",
           "inspect", "merge", "plan"]
