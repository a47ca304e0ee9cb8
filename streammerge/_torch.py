"""``torch``, imported on first use: ``from ._torch import torch`` instead of ``import torch``.

Importing torch takes 1–2 s, and ``--help``, ``--version``, ``methods``, ``inspect``, ``plan`` and ``verify`` never
compute with a tensor. Modules name ``torch`` as usual; the real module is imported the first time an attribute
is used (an annotation is not a use: every module has ``from __future__ import annotations``). Each attribute is
looked up once and then kept, so the hot loops pay nothing. Only streammerge's own modules see this object; a
user's ``import torch`` is untouched.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _DeferredTorch(ModuleType):
    def __getattr__(self, name: str) -> Any:
        value = getattr(importlib.import_module("torch"), name)
        setattr(self, name, value)
        return value


torch: Any = _DeferredTorch("torch")


def load_torch() -> None:
    """Import torch now (a merge does this before it writes anything, so an interrupt during the seconds the
    import takes leaves nothing behind)."""
    importlib.import_module("torch")
