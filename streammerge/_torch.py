"""``torch``, imported on first use: ``from ._torch import torch`` instead of ``import torch``.

Importing torch takes 1–2 s, and ``--help``, ``--version``, ``methods``, ``inspect``, ``plan`` and ``verify`` never
compute with a tensor. Modules name ``torch`` as usual; the real module is imported the first time an attribute
is used (an annotation is not a use: every module has ``from __future__ import annotations``). Each attribute is
looked up once and then kept, so the hot loops pay nothing. Only streammerge's own modules see this object; a
user's ``import torch`` is untouched.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from types import ModuleType
from typing import Any


def import_torch() -> ModuleType:
    """``import torch``, with a Ctrl-C that arrives meanwhile held until the import is over and then delivered as
    usual (a ``KeyboardInterrupt``, or the handler in place). torch's start-up runs Python callbacks from C++
    (pybind11): an interrupt raised inside one cannot unwind through the C++ frames and aborts the process
    (``std::terminate``, status -6) instead of exiting 130."""
    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return importlib.import_module("torch")  # only the main thread sets handlers (and receives SIGINT)
    held: list[Any] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(frame))
    try:
        module = importlib.import_module("torch")
    finally:
        signal.signal(signal.SIGINT, before)
    if held:
        if callable(before):
            before(signal.SIGINT, held[0])
        elif before == signal.SIG_DFL:
            raise KeyboardInterrupt
    return module


class _DeferredTorch(ModuleType):
    def __getattr__(self, name: str) -> Any:
        value = getattr(import_torch(), name)
        setattr(self, name, value)
        return value


torch: Any = _DeferredTorch("torch")


def load_torch() -> None:
    """Import torch now (a merge does this before it writes anything, so an interrupt during the seconds the
    import takes leaves nothing behind)."""
    import_torch()
