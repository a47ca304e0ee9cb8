"""streammerge: merge homologous LLM checkpoints within a memory budget, streaming row chunks from disk.

Python API: :func:`merge`, :func:`plan`, :func:`inspect`; the CLI is ``streammerge`` (see ``streammerge --help``).
"""

from ._version import __version__
from .api import inspect, merge, plan
from .errors import StreamMergeError
from .recipe import Recipe

__all__ = ["Recipe", "StreamMergeError", "__version__", "inspect", "merge", "plan"]
