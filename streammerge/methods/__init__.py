"""The method registry: every module in this package defines a method and registers it with ``@register``.

Adding a method means adding one file here; :func:`get_method` imports the package's modules on first use.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import MethodError
from .base import USE_BASE, Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask, unknown_name_message

_REGISTRY: dict[str, Method] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: instantiate the method and make it findable by its ``name``."""
    method = cls()
    if not method.name or method.name in _REGISTRY:
        raise RuntimeError(f"method name {method.name!r} is empty or registered twice")
    _REGISTRY[method.name] = method
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def all_methods() -> dict[str, Method]:
    """Every registered method, by name, sorted."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


#: mergekit's method names that streammerge does not have (yet): named as such rather than as a typo
MERGEKIT_NOT_YET = ("della", "della_linear", "nuslerp", "multislerp", "sce", "karcher",
                    "arcee_fusion", "ram", "core_space", "task_arithmetic_sce")


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name gets a "did you mean" error."""
    methods = all_methods()
    key = name.strip().lower().replace("-", "_")
    if key in methods:
        return methods[key]
    if key in MERGEKIT_NOT_YET:
        raise MethodError(f"mergekit's {key!r} method is not in streammerge yet; the methods here: "
                          f"{', '.join(methods)} (`streammerge methods` describes them)")
    raise MethodError(unknown_name_message("unknown merge method", name, list(methods)))


__all__ = ["USE_BASE", "Footprint", "Method", "ParamSpec", "Rule", "TensorMerge", "TensorTask", "all_methods", "get_method", "register"]
