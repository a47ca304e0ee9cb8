#!/usr/bin/env python
"""DELLA's L1 pass, this tree's kernels against another tree's, in one process.

    python bench/della_ab.py --models bench/models/qwen2-0.5b --baseline-src DIR [--rows 1024] [--rounds 15]

``DIR`` holds another source tree (``git archive REV streammerge | tar -x -C DIR``). Its compiled kernels
(``streammerge/kernels/_numba.py`` and ``_numba_fusion.py``) are imported as a separate package beside this tree's,
and both run ``l1_sums`` in mode MAGPRUNE (DELLA's keep decisions by per-row rank, written as bits, and the L1
rescale's column sums) on the same rows: ``--rows`` rows of a few tensors of the family (an MLP down projection,
rows of 4864 for the 0.5B shape; an up projection and an attention projection, rows of 896; rows from the middle of
the embedding), base and the first two models, density 0.5 and epsilon 0.15 (the merge defaults' band). The two
builds alternate, ``--rounds`` times each, and the quickest of each is kept.

Why in one process: on a shared VM, separate processes (and whole merges) land on hosts of different speed from
minute to minute, ±30% for the same code; two builds timed alternately in one process see the same host. Also
checks that both builds write the same bits and sums.

Prints Markdown; writes ``bench/results/<UTC timestamp>-della-ab-<shape>.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from safetensors import safe_open

BENCH = Path(__file__).resolve().parent
TENSORS = ("model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.up_proj.weight",
           "model.layers.10.self_attn.q_proj.weight", "model.embed_tokens.weight")
DENSITY, EPSILON = 0.5, 0.15


def load_kernels(src: Path, scratch: Path) -> types.ModuleType:
    """The kernels module of the tree at ``src``, imported as package ``baseline_kernels`` (its ``from . import``
    of the keep-mode constants served by a stand-in ``__init__``) from a copy in ``scratch``: numba caches compiled
    code beside the source, keyed by its path, and a cache written under this package name would break the tree's
    own runs (``ModuleNotFoundError: baseline_kernels``)."""
    from streammerge import kernels

    folder = scratch / "baseline_kernels"
    folder.mkdir()
    for f in (src / "streammerge" / "kernels").glob("*.py"):
        shutil.copy2(f, folder / f.name)
    src = folder
    pkg = types.ModuleType("baseline_kernels")
    pkg.__path__ = [str(folder)]  # type: ignore[attr-defined]
    for name in ("NO_FACTOR", "SELECT", "FACTOR", "RANDOM", "MAGPRUNE", "BITS"):
        setattr(pkg, name, getattr(kernels, name))
    sys.modules["baseline_kernels"] = pkg
    spec = importlib.util.spec_from_file_location("baseline_kernels._numba", src / "_numba.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"no kernels in {src}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stored_in(folder: Path, name: str) -> Path:
    """The ``*.safetensors`` file of the model folder that holds tensor ``name``."""
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            if name in h.keys():
                return f
    raise SystemExit(f"{name} is not in {folder}")


def shape_of(folder: Path, name: str) -> tuple[int, int]:
    """(rows, row length) of the 2-D tensor ``name`` in the model folder."""
    with safe_open(str(stored_in(folder, name)), "pt") as h:
        rows, n = h.get_slice(name).get_shape()
    return rows, n


def rows_of(folder: Path, name: str, first: int, count: int) -> np.ndarray:
    """Rows [first, first + count) of tensor ``name`` in the model folder, as stored (bfloat16 as uint16), flat."""
    import torch

    with safe_open(str(stored_in(folder, name)), "pt") as h:
        t = h.get_slice(name)[first:first + count].contiguous()
    return (t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16
            else t.float().numpy()).reshape(-1).copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="family folder from make_models.py")
    ap.add_argument("--baseline-src", type=Path, required=True, metavar="DIR")
    ap.add_argument("--rows", type=int, default=1024, help="rows of each tensor")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)

    from streammerge.kernels import MAGPRUNE
    from streammerge.kernels import _numba as this

    with tempfile.TemporaryDirectory(prefix="della-ab-") as scratch:  # (the copy's cache compiles once per run)
        report = compare(args, this, load_kernels(args.baseline_src.resolve(), Path(scratch)), MAGPRUNE)
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-della-ab-{args.models.name}.md"
    path.write_text(report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def compare(args: argparse.Namespace, this: types.ModuleType, other: types.ModuleType, magprune: int) -> str:
    """The Markdown report: both builds' ``l1_sums`` on the same rows of each of :data:`TENSORS`."""
    folders = [args.models / sub for sub in ("base", "chat", "multilingual")]
    keys = np.array([7, 9], np.uint64)
    prune = np.array([[DENSITY, 2 * EPSILON, DENSITY - EPSILON]] * 2, np.float32)
    lines = [f"# DELLA's L1 pass (`l1_sums`, MAGPRUNE): {args.models.name}, this tree against "
             f"{args.baseline_src}", "",
             f"{args.rows} rows per tensor, base and two models, density {DENSITY}, epsilon {EPSILON}; quickest of "
             f"{args.rounds} alternating runs in one process; ns per element and model.", "",
             "| tensor | row length | baseline ns | this tree ns | ratio | same bits and sums |",
             "|---|---|---|---|---|---|"]
    for name in TENSORS:
        rows_total, n = shape_of(folders[0], name)
        first = rows_total // 3 if rows_total > 4 * args.rows else 0  # the embedding: rows from its middle
        count = min(args.rows, rows_total - first)
        b, m1, m2 = (rows_of(f, name, first, count) for f in folders)
        modes = np.array([magprune, magprune], np.int64)
        sel, cuts, keep = np.zeros((2, 4), np.int64), np.zeros(2, np.uint64), np.ones(2, np.float32)
        unused = tuple(np.ones(1, np.float32) for _ in range(2))

        def run(k: types.ModuleType) -> tuple[float, bytes]:
            bits = tuple(np.zeros((count * n + 7) // 8, np.uint8) for _ in range(2))
            acc, partial, ties = np.zeros(4 * n), np.zeros(4 * n), np.zeros((2, 4), np.int64)
            # since the tenth session the finished tiles' destination comes first: slot0 -1, the running total
            where = (-1, acc.reshape(1, -1)) if "slot0" in inspect.signature(k.l1_sums.py_func).parameters else (acc,)
            t0 = time.perf_counter()
            k.l1_sums(b, (m1, m2), modes, sel, unused, keys, cuts, keep, prune, bits, n, 0, 64, count, *where,
                      partial, ties)
            return time.perf_counter() - t0, b"".join(x.tobytes() for x in bits) + acc.tobytes()

        same = run(this)[1] == run(other)[1]  # (also compiles, or loads, both)
        best = {"this": float("inf"), "other": float("inf")}
        for _ in range(args.rounds):
            best["other"] = min(best["other"], run(other)[0])
            best["this"] = min(best["this"], run(this)[0])
        per = {k: v / (2 * count * n) * 1e9 for k, v in best.items()}
        lines.append(f"| {name} | {n} | {per['other']:.2f} | {per['this']:.2f} | {per['this'] / per['other']:.2f} | "
                     f"{'yes' if same else 'NO'} |")
        print(lines[-1], file=sys.stderr)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
