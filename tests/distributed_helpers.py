"""Helpers shared by the distributed tests (``test_parts.py``, ``test_ray.py``): tiny families, single-process
reference merges, byte-for-byte comparison of output folders, and CLI processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from streammerge import api
from streammerge.verify import verify_output

PARTIAL = ".streammerge-partial"
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


def partial(out: Path) -> Path:
    return out.with_name(out.name + PARTIAL)


def output_problems(out: Path, ref: Path) -> list[str]:
    """Differences between two finished output folders (empty: identical, file for file and byte for byte, the
    manifest, index and side files included); also no work folder left and ``verify`` passing."""
    problems = []
    if partial(out).exists():
        problems.append(f"{partial(out)} was left behind")
    if not out.is_dir():
        return problems + [f"{out} does not exist"]
    names, ref_names = {p.name for p in out.iterdir()}, {p.name for p in ref.iterdir()}
    if names != ref_names:
        problems.append(f"files {sorted(names)} != reference {sorted(ref_names)}")
    for name in sorted(names & ref_names):
        a, b = (out / name).read_bytes(), (ref / name).read_bytes()
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            problems.append(f"{name} differs from byte {at}; sizes {len(a)} vs {len(b)}")
    bad, _ = verify_output(out)
    return problems + [f"verify: {p}" for p in bad]


def assert_same_output(out: Path, ref: Path) -> None:
    problems = output_problems(out, ref)
    assert not problems, "\n".join(problems)


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
