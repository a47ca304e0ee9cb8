#!/usr/bin/env python
"""Fused element-wise kernels, candidates compared: the per-element cost of task arithmetic's merge of one compute
block (bfloat16 base and two bfloat16 models in, bfloat16 out), as the engine computes it today (eager torch, one
op at a time through float32 temporaries) and fused into one pass by torch.compile (inductor's C++ backend) and by
numba; each candidate's output is compared with eager torch's byte for byte.

    python bench/kernels.py [--elements 262144] [--repeat 200]

Prints a Markdown table (ns per element, the speed-up, whether the bytes are identical, the compile time of a
cold start) and writes ``bench/results/<UTC timestamp>-kernels.md``. One thread (the engine's workers are
single-threaded). numba is optional (``pip install numba``); torch.compile needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
W0, W1 = 0.3, 0.7


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    m0 = (base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
    m1 = (base.float() + 0.02 * torch.randn(n, generator=g)).to(torch.bfloat16)
    return base, m0, m1


def eager(base: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor, out: torch.Tensor) -> None:
    """What the engine does for task arithmetic today (methods/_delta.py: emit, plain_sum; runner._store)."""
    b = base.float()
    d0 = m0 - b
    d0.mul_(W0)
    d1 = m1 - b
    d1.mul_(W1)
    mixed = d0.add_(d1)
    mixed.add_(b)
    out.copy_(mixed)


def compiled() -> Callable[..., torch.Tensor]:
    def ta(base: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor) -> torch.Tensor:
        b = base.float()
        return (((m0 - b) * W0 + (m1 - b) * W1) + b).to(torch.bfloat16)

    return torch.compile(ta, dynamic=True)


def numba_kernel() -> Callable[..., None]:
    from numba import njit

    @njit(fastmath=False, nogil=True)  # no fast-math: no FMA contraction, no reassociation
    def ta(bb: np.ndarray, a0: np.ndarray, a1: np.ndarray, w0: np.float32, w1: np.float32, out: np.ndarray) -> None:
        tmp = np.empty(4, dtype=np.uint32)  # bfloat16 bits -> float32 through a bit-cast of the high half
        f = tmp.view(np.float32)
        for i in range(bb.shape[0]):
            tmp[0] = np.uint32(bb[i]) << 16
            tmp[1] = np.uint32(a0[i]) << 16
            tmp[2] = np.uint32(a1[i]) << 16
            b = f[0]
            f[3] = ((f[1] - b) * w0 + (f[2] - b) * w1) + b
            bits = tmp[3]  # float32 -> bfloat16, round to nearest even (torch's cast, finite values)
            out[i] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16)

    return ta


def per_element(fn: Callable[[], object], n: int, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat / n * 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 18, help="elements per block (the engine's: 262144)")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = args.elements
    base, m0, m1 = inputs(n)
    ref = torch.empty(n, dtype=torch.bfloat16)
    eager(base, m0, m1, ref)
    bits = ref.view(torch.int16).numpy()
    rows = [("eager torch (today)", per_element(lambda: eager(base, m0, m1, ref), n, args.repeat), True, 0.0)]

    t = time.perf_counter()
    fn = compiled()
    try:
        got = fn(base, m0, m1)
        cold = time.perf_counter() - t
        same = bool(np.array_equal(got.view(torch.int16).numpy(), bits))
        rows.append(("torch.compile (inductor C++)", per_element(lambda: fn(base, m0, m1), n, args.repeat), same,
                     cold))
    except Exception as exc:  # no compiler, or an inductor failure: say so
        print(f"torch.compile failed: {exc}", file=sys.stderr)

    try:
        t = time.perf_counter()
        kernel = numba_kernel()
        bb, a0, a1 = (x.view(torch.int16).numpy().view(np.uint16) for x in (base, m0, m1))
        out = np.empty(n, dtype=np.uint16)
        w0, w1 = np.float32(W0), np.float32(W1)
        kernel(bb, a0, a1, w0, w1, out)
        cold = time.perf_counter() - t
        rows.append(("numba (scalar loop)", per_element(lambda: kernel(bb, a0, a1, w0, w1, out), n, args.repeat),
                     bool(np.array_equal(out, bits.view(np.uint16))), cold))
    except ImportError:
        print("numba is not installed: pip install numba", file=sys.stderr)

    today = rows[0][1]
    lines = [f"# Fused kernels: task arithmetic of one {n}-element block, bf16 in and out, 1 thread", "",
             f"torch {torch.__version__}" + (f", numba {sys.modules['numba'].__version__}" if "numba" in sys.modules
                                             else ""), "",
             "| kernel | ns / element | speed-up | bytes identical to today's | cold compile s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {ns:.2f} | {today / ns:.1f}x | {'yes' if same else 'NO'} | {cold:.1f} |"
              for name, ns, same, cold in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-kernels.md"
    path.write_text(report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
