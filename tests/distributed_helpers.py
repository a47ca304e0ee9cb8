"""Helpers shared by the distributed tests (``test_parts.py``, ``test_ray.py``, ``test_distributed_*.py``): tiny
families, single-process reference merges, byte-for-byte comparison of output folders, CLI processes, and a method
plugin to install and remove."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import assert_same_output, output_problems, partial  # noqa: F401 (the distributed tests' too)
from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.examples import write_family
from streammerge.methods import BUILTIN, all_methods, method_origin

#: output shard size for the tiny family: 4 shard files (about 54 KB each)
SHARD = "60KB"
#: per method: its parameters
METHODS: dict[str, dict[str, object]] = {
    "widen": {},
    "ties": {"density": 0.5},
    "task_arithmetic": {},
}


def family_args(fam: dict[str, Path]) -> tuple[Path, list[Path]]:
    return fam["base"], [fam["chat"], fam["multilingual"]]


def tie_head(fam: dict[str, Path]) -> None:
    """Store ``lm_head.weight`` (a copy of the embedding) in every model of a tied family: the plan then copies the
    merged embedding into it (a tied head, whose part must hold the embedding too)."""
    for folder in fam.values():
        path = folder / "model.safetensors"
        tensors = load_file(path)
        save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, path)


def reference(fam: dict[str, Path], out: Path, method: str, **options: object) -> Path:
    """A single-process merge of the family (the bytes every distributed run must reproduce)."""
    base, models = family_args(fam)
    options.setdefault("shard_size", SHARD)
    return api.merge(base, models, out, method=method, params=METHODS[method], **options)


def cli_env(**extra: str) -> dict[str, str]:
    """A CLI process's environment: no inherited failpoints, one torch thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMMERGE_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def cli(*argv: object, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``streammerge ARGV`` in its own process."""
    return subprocess.run([sys.executable, "-m", "streammerge.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout)


def cli_start(*argv: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``streammerge ARGV`` in its own process (not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "streammerge.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or cli_env())


def merge_argv(fam: dict[str, Path], out: Path, method: str = "widen", *extra: object) -> list[object]:
    """CLI arguments of the family's merge with ``method`` (the reference's shard size)."""
    params = [x for k, v in METHODS[method].items() for x in ("--param", f"{k}={v}")]
    return ["merge", "--base", fam["base"], "--model", fam["chat"], "--model", fam["multilingual"], "--out", out,
            "--method", method, *params, "--shard-size", SHARD, "-q", *extra]


# ---- fixtures of test_parts.py and test_ray.py (imported there by name)

@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tied Qwen2-shaped family (base, chat, multilingual; bf16), with absolute paths."""
    return {k: p.resolve() for k, p in write_family(tmp_path_factory.mktemp("family"), "tiny", dtype="bf16").items()}


@pytest.fixture(scope="module")
def refs(fam: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Single-process merges of the family, one per method, made on first use."""
    root = tmp_path_factory.mktemp("refs")

    class Lazy(dict):
        def __missing__(self, method: str) -> Path:
            self[method] = reference(fam, root / method, method)
            return self[method]

    return Lazy()


# ---- a method plugin (fixture ``takefirst``, imported by name)

class TakeFirstPlugin:
    """Installs and removes the plugin distribution ``sm-takefirst`` (method ``takefirst``) in a chosen version,
    the way tests/test_plugins.py does (a dist-info folder put first on ``sys.path``)."""

    def __init__(self, root: Path) -> None:
        self.root, self.installed, self.count = root, [], 0  # type: ignore[var-annotated]

    def install(self, version: str) -> None:
        from test_plugins import Plugins, method_module

        self.count += 1
        p = Plugins(self.root / f"{self.count}")
        p.install("sm-takefirst", version, {"takefirst.py": method_module("TakeFirst", "takefirst")},
                  {"takefirst": "takefirst:TakeFirst"})
        self.installed.append(p)

    def remove(self) -> None:
        while self.installed:
            self.installed.pop().remove_all()


@pytest.fixture
def takefirst(tmp_path: Path) -> Iterator[TakeFirstPlugin]:
    p = TakeFirstPlugin(tmp_path / "plugins")
    yield p
    p.remove()
    assert {method_origin(name) for name in all_methods()} == {BUILTIN}
