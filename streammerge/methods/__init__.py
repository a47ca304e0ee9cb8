"""The method registry: streammerge's built-in methods, and third-party methods from installed plugins.

A built-in method is one module of this package whose :class:`Method` subclass is decorated with ``@register``.
A plugin is an installed distribution that declares an entry point in the ``streammerge.methods`` group whose
name is the method's name and whose value is its :class:`Method` subclass (``mymethod = "mypkg.mymodule:MyMethod"``,
not decorated). The first lookup imports the built-ins, then every plugin, once; each method keeps its origin
(``"builtin"``, or ``"<distribution> <version>"``). A plugin is refused, and recorded as a :class:`PluginProblem`
instead of breaking streammerge, when it fails to import or instantiate, when its class or name is not valid, when
its name is a built-in's (the built-in keeps it) or when several plugins claim one name (none gets it). The other
methods work as usual; asking for a refused plugin's name raises a :class:`MethodError` that says why. The guide:
docs/methods.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MethodError
from .base import USE_BASE, Footprint, Method, ParamSpec, Rule, TensorMerge, TensorTask, unknown_name_message

if TYPE_CHECKING:
    from ._tiles import PairSums, TileFeeder

#: the entry point group third-party distributions declare their methods in
ENTRY_POINT_GROUP = "streammerge.methods"
#: the origin of the methods that ship with streammerge
BUILTIN = "builtin"
#: what a method name may be: a lowercase identifier (``get_method`` lowercases and turns "-" into "_" first)
METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_BASE_POLICIES = ("required", "none", "optional")
_PARAM_KINDS = (float, int, bool, str)

_REGISTRY: dict[str, Method] = {}
_ORIGINS: dict[str, str] = {}
_PROBLEMS: list[PluginProblem] = []
_builtins_loaded = False
_plugins_loaded = False


class PluginWarning(UserWarning):
    """A method name was asked for that a refused plugin also claims (the built-in of that name is used)."""


@dataclass(frozen=True)
class PluginProblem:
    """An entry point of the ``streammerge.methods`` group that was not loaded, and why."""

    name: str  # the entry point's name: the method name the plugin claims
    value: str  # what it points at, "module:Class"
    distribution: str  # "<distribution> <version>" that declares it
    reason: str

    def __str__(self) -> str:
        return (f"plugin method {self.name!r} from {self.distribution} (entry point {self.name} = {self.value} in "
                f"group {ENTRY_POINT_GROUP}) was not loaded: {self.reason}")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "entry_point": self.value, "distribution": self.distribution, "reason": self.reason}


class _Refused(Exception):
    """A plugin that imported but is not a valid method (the message says why)."""


def declaration_error(method: Method) -> str | None:
    """What is wrong with a method's declaration (name, base policy, parameter specs, model counts), or None."""
    name = method.name
    if not isinstance(name, str) or not METHOD_NAME.match(name):
        return (f"its name {name!r} is not a method name (lowercase letters, digits and '_', starting with a "
                "letter)")
    if method.base_policy not in _BASE_POLICIES:
        return f"base_policy {method.base_policy!r} is not one of {', '.join(_BASE_POLICIES)}"
    seen: set[str] = set()
    for spec in method.params:
        if not isinstance(spec, ParamSpec):
            return f"params holds {spec!r}, not a ParamSpec"
        if spec.kind not in _PARAM_KINDS:
            return f"parameter {spec.name!r} has kind {spec.kind!r}; the kinds are float, int, bool and str (a choice)"
        if spec.name in seen:
            return f"parameter {spec.name!r} is declared twice"
        seen.add(spec.name)
    if not isinstance(method.min_models, int) or method.min_models < 0:
        return f"min_models {method.min_models!r} is not a count"
    if method.max_models is not None and (not isinstance(method.max_models, int)
                                          or method.max_models < max(1, method.min_models)):
        return f"max_models {method.max_models!r} is not a count of at least max(1, min_models={method.min_models})"
    return None


def register(cls: type[Method]) -> type[Method]:
    """Class decorator for streammerge's own methods (the modules of this package): instantiate the method and
    make it findable by its ``name``. A third-party method is not decorated: its distribution's entry point names
    the class (see docs/methods.md)."""
    if not cls.__module__.startswith(f"{__name__}."):
        raise RuntimeError(f"@register is for streammerge's built-in methods, not {cls.__module__}.{cls.__qualname__}: "
                           f"a third-party method is declared by an entry point in the {ENTRY_POINT_GROUP!r} group "
                           "naming the class, undecorated (docs/methods.md)")
    method = cls()
    complaint = declaration_error(method)
    if complaint:
        raise RuntimeError(f"built-in method {cls.__qualname__}: {complaint}")
    if method.name in _REGISTRY:
        raise RuntimeError(f"method name {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    _ORIGINS[method.name] = BUILTIN
    return cls


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_") and info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        _builtins_loaded = True


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Method:
    """Import the class an entry point names and instantiate it; :class:`_Refused` if it is not a valid method."""
    obj = ep.load()
    if not (isinstance(obj, type) and issubclass(obj, Method)) or obj is Method:
        raise _Refused(f"{ep.value} is {obj!r}, not a subclass of streammerge.methods.Method")
    method = obj()
    complaint = declaration_error(method)
    if complaint:
        raise _Refused(complaint)
    if method.name != ep.name:
        raise _Refused(f"the entry point is named {ep.name!r} but the class's name is {method.name!r}: they must be "
                       "the same")
    return method


def _load_plugins() -> None:
    """Load every entry point of the group once, in name order; a refused one becomes a :class:`PluginProblem`."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # first: a plugin that looks methods up while it is imported does not recurse
    claims: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        claims.setdefault(ep.name, []).append(ep)
    for name, eps in sorted(claims.items()):
        origins = [_distribution(ep) for ep in eps]
        if len(eps) > 1:
            reason = (f"{len(eps)} distributions claim the name ({', '.join(origins)}), so none gets it: uninstall "
                      "all but one")
            _PROBLEMS.extend(PluginProblem(name, ep.value, origin, reason) for ep, origin in zip(eps, origins))
            continue
        ep, origin = eps[0], origins[0]
        if not METHOD_NAME.match(name):
            reason = "its name is not a method name (lowercase letters, digits and '_', starting with a letter)"
        elif name in _REGISTRY:
            reason = (f"the name is taken by the built-in method {name!r} ({_ORIGINS[name]}), which a plugin may not "
                      "replace: rename the plugin's method")
        else:
            try:
                method = _load_entry_point(ep)
            except _Refused as exc:
                reason = str(exc)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 (a broken plugin must not break the others)
                reason = f"importing or instantiating it raised {type(exc).__name__}: {exc}"
            else:
                _REGISTRY[name] = method
                _ORIGINS[name] = origin
                continue
        _PROBLEMS.append(PluginProblem(name, ep.value, origin, reason))


def forget_plugins() -> None:
    """Drop the plugin methods and problems found so far, so the next lookup scans the installed entry points
    again (the built-ins stay). For tests that install a plugin on ``sys.path`` and remove it afterwards: call it
    after installing and again after removing. Modules the plugins imported stay in ``sys.modules``."""
    global _plugins_loaded
    for name, origin in list(_ORIGINS.items()):
        if origin != BUILTIN:
            del _REGISTRY[name], _ORIGINS[name]
    _PROBLEMS.clear()
    _plugins_loaded = False
    importlib.invalidate_caches()  # the metadata finder caches what each sys.path folder holds


def all_methods() -> dict[str, Method]:
    """Every registered method (built-ins and loaded plugins), by name, sorted."""
    _load_builtins()
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def plugin_problems() -> list[PluginProblem]:
    """The plugins that were refused, and why (in entry point name order)."""
    all_methods()
    return list(_PROBLEMS)


def method_origin(name: str) -> str:
    """Where the method called ``name`` comes from: ``"builtin"``, or ``"<distribution> <version>"`` of the plugin
    that provides it."""
    return _ORIGINS[_lookup(name).name]


#: method names of mergekit releases after 0.1.5 that streammerge does not have (yet): named as such rather than as
#: a typo
MERGEKIT_NOT_YET = ("core_space", "task_arithmetic_sce")


def _lookup(name: str) -> Method:
    methods = all_methods()
    key = name.strip().lower().replace("-", "_")
    if key in methods:
        return methods[key]
    refused = [p for p in _PROBLEMS if p.name == key]
    if refused:
        raise MethodError("; ".join(map(str, refused)) + ". The other methods work (`streammerge methods` lists "
                          "them); fix or uninstall the plugin to use this one")
    if key in MERGEKIT_NOT_YET:
        raise MethodError(f"mergekit's {key!r} method is not in streammerge yet; the methods here: "
                          f"{', '.join(methods)} (`streammerge methods` describes them)")
    raise MethodError(unknown_name_message("unknown merge method", name, list(methods)))


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name gets a "did you mean" error, a refused plugin's name the reason
    it was refused. A built-in whose name a plugin also claims is returned with a :class:`PluginWarning`."""
    method = _lookup(name)
    for problem in _PROBLEMS:
        if problem.name == method.name:
            warnings.warn(f"{problem}; the built-in {method.name!r} is used", PluginWarning, stacklevel=2)
    return method


_TILES = ("PairSums", "TileFeeder")


def __getattr__(name: str) -> Any:
    """``PairSums`` and ``TileFeeder`` (chunk-independent statistics, for plugins too), imported on first use."""
    if name in _TILES:
        from . import _tiles

        return getattr(_tiles, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "METHOD_NAME", "USE_BASE", "Footprint", "Method", "PairSums", "ParamSpec",
           "PluginProblem", "PluginWarning", "Rule", "TensorMerge", "TensorTask", "TileFeeder", "all_methods",
           "declaration_error", "forget_plugins", "get_method", "method_origin", "plugin_problems", "register"]
