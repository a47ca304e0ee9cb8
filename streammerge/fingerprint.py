"""Fingerprints: what determines the output bytes, per tensor and for the whole run.

A tensor's fingerprint hashes everything that decides its bytes: its name, shape, rule, kind and output dtype,
the method and its parameters, the identity of every input it reads (the shard's path and size and the tensor's
header entry), its place in the output layout (the shard's header) and, for a tied head, its embedding's
fingerprint. The chunk size and the budget are not in it: they never change the bytes. Nor is a shard's
modification time: the run's document keeps it (with each shard's size and header hash), so the run's fingerprint
changes on a ``touch`` while the tensors' do not, and :func:`touched_inputs` names the shards that were only
touched (whose bytes the journal's input checksums then vouch for, see :mod:`streammerge.inputsums`).

The engine that computes them is fingerprinted as a whole: the streammerge and torch versions, the kind of device
(CPU and GPU agree only within float tolerance) and the reduction tile. An interrupted run continues only with
the same engine; within it, tensors whose fingerprint is unchanged keep their journaled work.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .classify import TensorClass
from .formats.checkpoint import Checkpoint
from .recipe import Recipe
from .writer import ShardLayout


def digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def engine_document(device: str, tile: int, method_origin: str = "builtin") -> dict[str, Any]:
    """What computes the bytes: streammerge and torch versions, device kind, reduction tile, and a plugin method's
    distribution and version (a built-in's code is pinned by streammerge's version, so it adds no key and older
    work folders stay valid)."""
    doc = {"streammerge": __version__, "torch": torch_version(), "device": device.split(":")[0], "tile": tile}
    if method_origin != "builtin":
        doc["method_plugin"] = method_origin
    return doc


def torch_version() -> str:
    """The installed torch's version from its package metadata (the string ``torch.__version__`` gives, without
    the seconds importing torch takes); the same source whether or not torch is imported, so a plan and its merge
    agree."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a torch not installed as a package (a source checkout)
        from ._torch import import_torch

        return str(import_torch().__version__)


def tensor_fingerprints(classes: list[TensorClass], method: str, params: dict[str, dict[str, Any]], n_models: int,
                        shards: tuple[ShardLayout, ...], tile: int) -> dict[str, str]:
    """Per tensor, the hash of everything that decides its bytes (see the module docstring); ``params``: each merged
    tensor's parameters."""
    header_of = {name: (s.filename, hashlib.sha256(s.header).hexdigest()) for s in shards for name in s.offsets}
    fps: dict[str, str] = {}
    for c in sorted(classes, key=lambda c: c.copy_of is not None):  # tied heads need their embedding's first
        doc = {
            "name": c.name, "shape": list(c.shape), "rule": c.rule.value, "kind": c.kind.value, "dtype": c.out_dtype,
            "inputs": [s.identity() for s in c.sources], "shard": header_of[c.name], "tile": tile,
        }
        if c.scale != 1.0:
            doc["scale"] = c.scale
        if c.copy_of is not None:
            doc["copy_of"] = fps[c.copy_of]
        elif c.rule.value != "copy_base":
            plain = {k: list(v) if isinstance(v, tuple) else v for k, v in params[c.name].items()}
            doc.update(method=method, params=plain, models=n_models)
        fps[c.name] = digest(doc)
    return fps


def fingerprint_document(recipe: Recipe, method: str, params: dict[str, Any], base: Checkpoint,
                         models: list[Checkpoint], engine: dict[str, Any], tensors: dict[str, str]) -> dict[str, Any]:
    """The run's fingerprint document: the engine and every tensor's fingerprint (which decide the bytes), plus
    the options and input files in readable form, so a changed resume can say what changed."""

    def inputs(c: Checkpoint) -> dict[str, Any]:
        out = {}
        # a LoRA adapter's weights count as one more shard of its model, named by their absolute path (which joins
        # onto the folder as itself, so touched_inputs finds the file)
        headers = [*c.shards.items(), *([(str(c.adapter.weights.resolve()), c.adapter.header)] if c.adapter else [])]
        for name, h in headers:
            st = h.path.stat()
            desc = json.dumps([[t.name, t.dtype.name, list(t.shape), t.begin, t.end] for t in h.tensors.values()])
            out[name] = [st.st_size, st.st_mtime_ns, hashlib.sha256(desc.encode()).hexdigest()]
        return {"folder": str(c.folder.resolve()), "shards": out}

    return {
        "engine": engine, "method": method, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "dtype": recipe.dtype, "exclude": list(recipe.exclude), "embeddings": list(recipe.embeddings),
        "keep_vision": recipe.keep_vision,
        "shard_size": recipe.shard_size, "inputs": [inputs(base)] + [inputs(m) for m in models], "tensors": tensors,
    }


def run_fingerprint(doc: dict[str, Any]) -> str:
    """The run's fingerprint: the engine, every tensor's fingerprint and the input files' identities (size,
    modification time, header), so a published output is not taken for this run's after an input was touched."""
    return digest({"engine": doc["engine"], "tensors": doc["tensors"], "inputs": doc["inputs"]})


@dataclass(frozen=True)
class Touched:
    """An input shard whose size and header are unchanged but whose modification time changed."""

    who: str  # "base" or "model K"
    shard: str  # its file name in the model folder
    path: Path  # its resolved path

    def __str__(self) -> str:
        return f"{self.who} file {self.shard}"


def _who(i: int) -> str:
    return "base" if i == 0 else f"model {i}"


def touched_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[Touched]:
    """The input shards of ``new`` that ``old`` knew with the same folder, size and header hash but another
    modification time: their bytes may or may not have changed (a ``touch``, a copy, an edit in place)."""
    out = []
    for i, (a, b) in enumerate(zip(old.get("inputs", []), new.get("inputs", []))):
        if a.get("folder") != b.get("folder"):
            continue
        for shard, now in b["shards"].items():
            before = a["shards"].get(shard)
            if before is not None and before != now and (before[0], before[2]) == (now[0], now[2]):
                out.append(Touched(_who(i), shard, Path(b["folder"]) / shard))
    return out


_ENGINE_LABELS = {"streammerge": "streammerge version", "torch": "torch version", "device": "device", "tile": "tile",
                  "method_plugin": "method plugin"}


def engine_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How the engine of two fingerprint documents differs (a run from an older document without one: everything)."""
    a, b = old.get("engine"), new["engine"]
    if not isinstance(a, dict):
        return ["the work folder was made by an older streammerge"]
    return [f"{label}: {a.get(k)} -> {b.get(k)}" for k, label in _ENGINE_LABELS.items() if a.get(k) != b.get(k)]


def describe_changes(old: dict[str, Any], new: dict[str, Any], touched: Sequence[str] = ()) -> list[str]:
    """Human-readable differences between two fingerprint documents. A shard whose modification time alone changed
    is not one (see :func:`touched_inputs`); ``touched`` lists what checking such shards found."""
    changes = engine_changes(old, new) if isinstance(old.get("engine"), dict) else []
    for key in ("method", "params", "dtype", "exclude", "embeddings", "keep_vision", "shard_size"):
        if old.get(key) != new.get(key):
            a, b = (json.dumps(d.get(key), sort_keys=True) for d in (old, new))
            changes.append(f"{key}: {a} -> {b}")
    old_in, new_in = old.get("inputs", []), new.get("inputs", [])
    if len(old_in) != len(new_in):
        changes.append(f"number of models: {len(old_in) - 1} -> {len(new_in) - 1}")
    for i, (a, b) in enumerate(zip(old_in, new_in)):
        who = _who(i)
        if a.get("folder") != b.get("folder"):
            changes.append(f"{who} folder: {a.get('folder')} -> {b.get('folder')}")
            continue
        for shard in sorted(set(a["shards"]) | set(b["shards"])):
            before, now = a["shards"].get(shard), b["shards"].get(shard)
            if before is None or now is None or (before[0], before[2]) != (now[0], now[2]):
                changes.append(f"{who} file {shard} changed (size or header)")
    return changes + list(touched) or ["the plan fingerprint"]


def changed_tensors(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Tensors of ``new`` whose fingerprint differs from (or is missing in) ``old``, in ``new``'s order."""
    before = old.get("tensors") if isinstance(old.get("tensors"), dict) else {}
    return [name for name, fp in new["tensors"].items() if before.get(name) != fp]
