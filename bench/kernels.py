#!/usr/bin/env python
"""Fused element-wise kernels: candidates, the shipped kernels per method, and their end-to-end effect.

    python bench/kernels.py [--elements 262144] [--repeat 200] [--casts]
    python bench/kernels.py --e2e bench/models/qwen2-0.5b [--method task_arithmetic,ties,widen] [--threads 1,2]
        [--rounds 2] [--baseline-src DIR [--baseline-kernels numba] [--no-eager]]

Without ``--e2e``, one thread, in one process:

1. candidates: task arithmetic's merge of one compute block (bfloat16 base and two bfloat16 models in, bfloat16
   out) as eager torch computes it, fused by torch.compile (inductor's C++ backend), by a plain numba loop, and by
   the shipped kernel (``streammerge.kernels``), each output compared with eager torch's byte for byte, with the
   cold compile time (the shipped kernel's is a load from numba's cache once it has been compiled);
2. per method, the engine's own ``TensorMerge`` objects on one block: task arithmetic's merge pass, TIES's two
   radix-select passes and merge pass, WIDEN's statistics and merge passes, eager (the float32 rows the runner
   makes, the method, the cast) against fused (``accumulate_raw``/``emit_raw`` on the stored rows), ns per tensor
   element, bytes compared; and CRC-32 throughput, zlib against ISA-L (every input and output byte is
   checksummed);
3. with ``--casts``, the kernels' float32 -> bfloat16/float16 casts on every float32 bit pattern against torch.

With ``--e2e``: warm page cache, ``streammerge merge ... --threads N`` of the family with ``STREAMMERGE_KERNELS=eager``
and ``=numba`` alternately (``--rounds`` times each, the best kept), under ``/usr/bin/time``, and with
``--baseline-src`` the same merge by another source tree ("before"); the compute time is the wall time minus the
start-up (the tiny example's merge per build, the quickest of a round before each round of merges and two after;
the rounds are outermost, so each method's best is taken over the whole run; each round's timed merges follow one
untimed merge of the first method, as the first merge after the tiny ones ran slower); every output is compared with
eager's (with ``--no-eager``, which leaves the eager runs out, with the first build's). With task_arithmetic among
the methods, a second table gives each method's compute time over task arithmetic's, per build and thread count
(the issue's "every other method ≤ 2.5× its task_arithmetic time").

Prints Markdown; writes ``bench/results/<UTC timestamp>-kernels.md`` (``-kernels-e2e-<shape>.{md,json}``). numba
is optional (``pip install 'streammerge[fast]'``); torch.compile needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
W0, W1 = 0.3, 0.7
ENV = "STREAMMERGE_KERNELS"


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    m0 = (base.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
    m1 = (base.float() + 0.02 * torch.randn(n, generator=g)).to(torch.bfloat16)
    return base, m0, m1


def eager(base: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor, out: torch.Tensor) -> None:
    """What the engine's eager path does for task arithmetic (methods/_delta.py: emit, plain_sum; runner._store)."""
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
    """ns per element of ``fn`` (CPU time of this thread: steadier than wall time on a shared machine)."""
    fn()
    t = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - t) / repeat / n * 1e9


def candidates(n: int, repeat: int) -> list[str]:
    base, m0, m1 = inputs(n)
    ref = torch.empty(n, dtype=torch.bfloat16)
    eager(base, m0, m1, ref)
    bits = ref.view(torch.int16).numpy()
    rows = [("eager torch", per_element(lambda: eager(base, m0, m1, ref), n, repeat), True, 0.0)]

    t = time.perf_counter()
    fn = compiled()
    try:
        got = fn(base, m0, m1)
        cold = time.perf_counter() - t
        same = bool(np.array_equal(got.view(torch.int16).numpy(), bits))
        rows.append(("torch.compile (inductor C++)", per_element(lambda: fn(base, m0, m1), n, repeat), same, cold))
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
        rows.append(("numba, scalar loop with a bit-cast array", per_element(lambda: kernel(bb, a0, a1, w0, w1, out),
                                                                            n, repeat),
                     bool(np.array_equal(out, bits.view(np.uint16))), cold))
        from streammerge import kernels

        t = time.perf_counter()
        k = kernels.kernels()
        ms, w = (a0, a1), kernels.f32([W0, W1])
        one = np.float32(1.0)
        k.delta_sum(bb, ms, w, one, one, out)
        cold = time.perf_counter() - t
        rows.append(("streammerge.kernels.delta_sum (shipped)",
                     per_element(lambda: k.delta_sum(bb, ms, w, one, one, out), n, repeat),
                     bool(np.array_equal(out, bits.view(np.uint16))), cold))
    except ImportError:
        print("numba is not installed: pip install numba", file=sys.stderr)

    today = rows[0][1]
    lines = [f"## Candidates: task arithmetic of one {n}-element block, bf16 in and out, 1 thread", "",
             "| kernel | ns / element | speed-up | bytes identical to eager | cold compile (or cache load) s |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {ns:.2f} | {today / ns:.1f}x | {'yes' if same else 'NO'} | {cold:.2f} |"
              for name, ns, same, cold in rows]
    return lines


def methods(n: int, repeat: int) -> list[str]:
    """Eager against fused, per pass, with the engine's TensorMerge objects on one (rows, 896) bf16 block."""
    from streammerge import kernels
    from streammerge.methods import Rule, TensorTask, get_method

    cols = 896
    rows = max(64, n // cols // 64 * 64)
    n = rows * cols
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + 0.002 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16) for _ in range(2)]
    matrix = TensorTask("bench", (rows, cols), Rule.MATRIX, 64, exact_products=True)
    out_e, out_f = (torch.empty(rows, cols, dtype=torch.bfloat16) for _ in range(2))
    lines = [f"## Per method and pass: one {rows} x {cols} block, bf16, 2 models, 1 thread (ns per tensor element)", "",
             "| method | pass | eager ns | fused ns | speed-up | bytes identical |", "|---|---|---|---|---|---|"]

    def row(method: str, what: str, e: float, f: float, same: bool | None) -> None:
        lines.append(f"| {method} | {what} | {e:.2f} | {f:.2f} | {e / f:.1f}x | "
                     f"{'-' if same is None else 'yes' if same else 'NO'} |")

    embedding = TensorTask("bench", (rows, cols), Rule.EMBEDDING, 64, exact_products=True)  # a token per row
    for name, params, task in (("task_arithmetic", {}, matrix), ("ties", {"density": 0.5}, matrix),
                               ("della", {"density": 0.5}, matrix), ("dare_ties", {"density": 0.5}, matrix),
                               ("widen", {}, matrix), ("widen (embedding rule)", {}, embedding)):
        m = get_method(name.split()[0])
        p = m.resolve_params(params, 2)
        passes = m.stat_passes(task.rule, p)
        eager_m, fused_m = m.start(task, p, 2), m.start(task, p, 2)
        for pi in range(passes):  # each pass timed on merges that have finished the passes before it
            def fresh(upto: int = pi, task: TensorTask = task):  # type: ignore[no-untyped-def]
                t = m.start(task, p, 2)
                for q in range(upto):
                    t.accumulate(q, 0, base.float(), models)
                    t.end_pass(q)
                return t

            te, tf = fresh(), fresh()
            e = per_element(lambda: fresh_accumulate(te, pi, base, models, False), n, max(3, repeat // 20))
            f = per_element(lambda: fresh_accumulate(tf, pi, base, models, True), n, max(3, repeat // 20))
            row(name, f"statistics {pi + 1}", e, f, None)
            eager_m.accumulate(pi, 0, base.float(), models)
            fused_m.accumulate_raw(pi, 0, base, models)
            eager_m.end_pass(pi)
            fused_m.end_pass(pi)
        same = eager_m.state_dict().keys() == fused_m.state_dict().keys() and all(
            torch.equal(a, b) for a, b in zip(eager_m.state_dict().values(), fused_m.state_dict().values()))

        def rewind(t) -> None:  # type: ignore[no-untyped-def]
            for sp in getattr(t, "sparsifiers", []):
                sp.rewind()

        def emit_eager() -> None:
            rewind(eager_m)
            out_e.copy_(eager_m.emit(0, base.float(), models))

        def emit_fused() -> None:
            rewind(fused_m)
            assert fused_m.emit_raw(0, base, models, out_f) == 0

        e, f = per_element(emit_eager, n, repeat // 4), per_element(emit_fused, n, repeat // 4)
        row(name, "merge (and the cast)", e, f, same and torch.equal(out_e.view(torch.int16), out_f.view(torch.int16)))
    lines += ["", f"numba {sys.modules['numba'].__version__}, backend {kernels.backend()}", ""]

    data = np.random.default_rng(0).integers(0, 255, 1 << 26, dtype=np.uint8)
    rates = []
    for label, fn in (("zlib", zlib.crc32), ("ISA-L (isal)", _isal())):
        if fn is None:
            continue
        fn(memoryview(data))
        t = time.perf_counter()
        for _ in range(5):
            fn(memoryview(data))
        rates.append(f"{label} {5 * data.nbytes / (time.perf_counter() - t) / 1e9:.1f} GB/s")
    lines += ["CRC-32 of 64 MiB, one thread: " + ", ".join(rates)]
    return lines


def fresh_accumulate(t, pass_index: int, base: torch.Tensor, models: list[torch.Tensor],  # type: ignore[no-untyped-def]
                     fused: bool) -> None:
    """One statistics block (rows 0..); the TileFeeders' order checks (the method's own, and its L1 column sums')
    are reset so the block can be fed again."""
    for owner in (t, getattr(t, "sums", None)):
        feeder = getattr(owner, "_feeder", None)
        if feeder is not None:
            feeder._next_row, feeder._stashed = 0, 0
    if fused:
        assert t.accumulate_raw(pass_index, 0, base, models)
    else:
        t.accumulate(pass_index, 0, base.float(), models)


def _isal() -> Callable[..., int] | None:
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        return None
    return crc32


def casts() -> list[str]:
    """Every float32 bit pattern through the kernels' casts to bfloat16 and float16 against torch's ``.to()``
    (NaN payloads aside: a NaN output is refused anyway), and the non-finite counts."""
    from streammerge import kernels

    k = kernels.kernels()
    step, found = 1 << 24, {torch.bfloat16: 0, torch.float16: 0}
    for start in range(0, 1 << 32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        nan = np.isnan(x)
        for dtype in found:
            want = torch.from_numpy(x).to(dtype)
            got = np.empty(step, dtype=np.uint16 if dtype == torch.bfloat16 else np.int16)
            bad = k.convert(x, got)
            differ = (got != want.view(torch.int16).numpy().view(got.dtype)) & ~nan
            found[dtype] += int(differ.sum()) + (bad != int((~torch.isfinite(want)).sum()))
    return ["## Casts: all 2^32 float32 bit patterns", "",
            *(f"- to {dtype}: {'every pattern as torch' if n == 0 else f'{n} differences'}"
              for dtype, n in found.items())]


# ---- end to end ----------------------------------------------------------------------------------------------
def e2e(models: Path, methods_: list[str], threads: list[int], rounds: int, max_ram: str,
        baseline: Path | None, baseline_backend: str = "eager", work_arg: Path | None = None,
        with_eager: bool = True) -> tuple[str, dict]:
    from run import StartUp, filesystem, stolen, time_v, work_root
    from threads import DEFAULT_PARAMS, merge_cmd, script, warm

    warm(models)
    rows: list[dict] = []
    fixed: dict[str, float] = {}
    fixed_cpu: dict[str, float] = {}  # the start-up's CPU seconds (best-wall run), for the cores busy in compute
    # (label, the command's first words instead of the console script, STREAMMERGE_KERNELS)
    runs: list[tuple[str, list[str] | None, str]] = [("eager", None, "eager")] if with_eager else []
    runs.append(("numba", None, "numba"))
    if baseline is not None:  # another source tree (e.g. `git archive` of the commit before) first on sys.path
        runs.insert(0, ("before", [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(baseline)!r}); "
                                   "from streammerge._entry import main; main()"], baseline_backend))
    backends = [label for label, _, _ in runs]
    reference = "eager" if with_eager else backends[0]  # the build every output and compute time is compared with

    def command(prefix: list[str] | None, cmd: list[str]) -> list[str]:
        return cmd if prefix is None else [*prefix, *cmd[1:]]

    def merge(prefix: list[str] | None, method: str, t: int, out: Path) -> list[str]:
        return command(prefix, merge_cmd([script(sys.executable)], models, method, DEFAULT_PARAMS.get(method, []),
                                         t, out, max_ram))

    with tempfile.TemporaryDirectory(dir=work_root(work_arg)) as tmp:
        work = Path(tmp)
        outputs_on = filesystem(work)
        start_up = StartUp(work, {label: (command(prefix, [script(sys.executable)]),
                                          {**os.environ, ENV: backend}) for label, prefix, backend in runs})
        # rounds outermost: each method's best of N samples the whole run, not one spell of it (a slow minute
        # would otherwise fall on whichever method ran then); a start-up round before each, two more after
        best: dict[tuple[str, int, str], dict] = {}
        walls: dict[tuple[str, int, str], list[float]] = {}  # every round's wall, in round order
        same: dict[tuple[str, int, str], bool] = {}
        for _ in range(rounds):
            start_up.round()
            # untimed: the first merge after the tiny ones ran up to 2 s slower than the same merge later in the
            # round (this VM: fresh pages after a pause), which fell on whichever method came first (task
            # arithmetic, the ratios' denominator)
            settle = merge(runs[0][1], methods_[0], threads[0], work / f"out-{runs[0][0]}")
            if time_v(settle, env={**os.environ, ENV: runs[0][2]})["returncode"] != 0:
                raise SystemExit(f"{' '.join(settle)} failed")
            for method in methods_:
                for t in threads:
                    for label, prefix, backend in runs:
                        out = work / f"out-{label}"
                        cmd = merge(prefix, method, t, out)
                        r = time_v(cmd, env={**os.environ, ENV: backend})
                        if r["returncode"] != 0:
                            raise SystemExit(f"{' '.join(cmd)} failed: {r['stderr_tail']}")
                        key = (method, t, label)
                        walls.setdefault(key, []).append(r["wall_s"])
                        if key not in best or r["wall_s"] < best[key]["wall_s"]:
                            best[key] = r
                        print(f"{method:16} threads {t} {label:6}: {r['wall_s']:6.2f} s wall, {r['cpu_s']:6.2f} s "
                              f"CPU, {stolen(r)} s stolen / iowait", file=sys.stderr)
                    for label in backends:  # this round's outputs, against the reference build's
                        same[(method, t, label)] = same.get((method, t, label), True) and all(
                            (work / f"out-{reference}" / f.name).read_bytes() == f.read_bytes()
                            for f in sorted((work / f"out-{label}").glob("*.safetensors")))
        for method in methods_:
            for t in threads:
                for label in backends:
                    r = best[(method, t, label)]
                    rows.append({"method": method, "threads": t, "kernels": label, "wall_s": r["wall_s"],
                                 "cpu_s": r["cpu_s"], "peak_rss": r["peak_rss"],
                                 "steal_s": r["steal_s"], "iowait_s": r["iowait_s"],
                                 "same_bytes": same[(method, t, label)], "walls_s": walls[(method, t, label)]})
        for _ in range(2):
            start_up.round()
    for label in backends:
        quickest = start_up.quickest(label)
        fixed[label], fixed_cpu[label] = quickest["wall_s"], quickest["cpu_s"]
    for r in rows:
        r["compute_s"] = max(0.0, r["wall_s"] - fixed[r["kernels"]])
        r["compute_cpu_s"] = max(0.0, r["cpu_s"] - fixed_cpu[r["kernels"]])
    lines = [f"## End to end: {models.name}, warm page cache, --max-ram {max_ram}, {len(os.sched_getaffinity(0))} "
             f"cores, best of {rounds}, outputs written to {outputs_on}", "",
             "Parameters: " + (", ".join(f"{m} {' '.join(DEFAULT_PARAMS[m])}" for m in methods_
                                         if DEFAULT_PARAMS.get(m)) or "the defaults") + " (others: the defaults)", "",
             "Start-up (tiny example merge): " + ", ".join(f"{b} {v:.2f} s" for b, v in fixed.items()), "",
             "Start-up CPU: " + ", ".join(f"{b} {v:.2f} s" for b, v in fixed_cpu.items()), "",
             "Stolen / iowait: CPU time the hypervisor gave other guests, and idle time waiting for the disk, "
             "during the run (/proc/stat), all CPUs together. Compute: the best wall less the quickest tiny merge; "
             "paired compute: the median over the rounds of each round's wall less that round's tiny merge. Cores "
             "busy: (CPU − start-up CPU) / compute; `--threads 1` is above 1 because the reader, writer and commit "
             "threads run beside the compute thread, which bounds what a second core can add.", "",
             "| method | threads | build | wall s | CPU s | stolen / iowait s | compute s | paired compute s | "
             f"cores busy | compute / {reference}'s | peak RSS MiB | bytes = {reference}'s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = next(x for x in rows if x["method"] == r["method"] and x["threads"] == r["threads"]
                 and x["kernels"] == reference)
        ratio = r["compute_s"] / e["compute_s"] if e["compute_s"] else float("nan")
        paired = statistics.median(w - s for w, s in zip(r["walls_s"], start_up.walls()[r["kernels"]]))
        lines.append(f"| {r['method']} | {r['threads']} | {r['kernels']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{stolen(r)} | {r['compute_s']:.2f} | {paired:.2f} | {busy(r)} | {ratio:.2f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {'yes' if r['same_bytes'] else 'NO'} |")
    lines += over_task_arithmetic(rows, start_up.walls())
    return "\n".join(lines) + "\n", {"startup_s": fixed, "startup_cpu_s": fixed_cpu, "outputs_on": outputs_on,
                                     "startup_walls_s": start_up.walls(),
                                     "rows": rows}


def over_task_arithmetic(rows: list[dict], start_walls: dict[str, list[float]]) -> list[str]:
    """Markdown: each method's compute time over task_arithmetic's (same build and threads), from the best walls
    and, paired within each round, from that round's walls less that round's start-up (the median and range over
    the rounds: a slow spell of the VM then moves both sides of a ratio); none without task_arithmetic."""
    ta = {(r["kernels"], r["threads"]): r for r in rows if r["method"] == "task_arithmetic"}
    others = [r for r in rows if r["method"] != "task_arithmetic" and ta.get((r["kernels"], r["threads"]))]
    if not others:
        return []
    lines = ["", "Compute time over task_arithmetic's (the same build and threads): from the best runs, and paired "
             "by round (each round's wall less that round's tiny merge; median and range over the rounds):", "",
             "| method | threads | build | compute s | task_arithmetic s | ratio | paired ratio: median (range) |",
             "|---|---|---|---|---|---|---|"]
    for r in others:
        t = ta[(r["kernels"], r["threads"])]
        paired = sorted((w - s) / (tw - s) for w, tw, s in zip(r["walls_s"], t["walls_s"], start_walls[r["kernels"]])
                        if tw > s)
        spread = (f"{statistics.median(paired):.2f} ({paired[0]:.2f}–{paired[-1]:.2f})" if paired else "-")
        ratio = r["compute_s"] / t["compute_s"] if t["compute_s"] else float("nan")
        lines.append(f"| {r['method']} | {r['threads']} | {r['kernels']} | {r['compute_s']:.2f} | "
                     f"{t['compute_s']:.2f} | {ratio:.2f} | {spread} |")
    return lines


def busy(r: dict) -> str:
    """The cores a run kept busy in its compute time (CPU beyond the start-up's over the wall beyond it)."""
    return f"{r['compute_cpu_s'] / r['compute_s']:.2f}" if r["compute_s"] > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1 << 18, help="elements per block (the engine's: 262144)")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--e2e", type=Path, default=None, metavar="FAMILY",
                    help="time whole merges of this family folder (base, chat, multilingual) eager vs fused")
    ap.add_argument("--method", default="task_arithmetic,ties,widen", help="--e2e: comma-separated methods")
    ap.add_argument("--threads", default="2", help="--e2e: comma-separated --threads values")
    ap.add_argument("--rounds", type=int, default=2, help="--e2e: runs of each merge per backend (best kept)")
    ap.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                    help="--e2e: also time the streammerge package in DIR (e.g. `git archive HEAD streammerge | tar "
                    "-x -C DIR`), as 'before', in the same run")
    ap.add_argument("--baseline-kernels", default="eager", choices=("eager", "numba"),
                    help="--e2e: the STREAMMERGE_KERNELS the --baseline-src build runs with (default eager)")
    ap.add_argument("--no-eager", action="store_true",
                    help="--e2e: leave out the eager runs (DELLA's take minutes); outputs and compute times are then "
                    "compared with the first build's")
    ap.add_argument("--max-ram", default="1GiB")
    ap.add_argument("--work", type=Path, default=None, metavar="DIR",
                    help="--e2e: write the outputs under DIR (e.g. /dev/shm, to leave the disk's writes out)")
    ap.add_argument("--casts", action="store_true", help="also check the casts on all 2^32 float32 patterns (1 min)")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.results.mkdir(parents=True, exist_ok=True)
    if args.e2e is not None:
        models = args.e2e.resolve()
        report, data = e2e(models, [m for m in args.method.split(",") if m], [int(t) for t in args.threads.split(",")],
                           args.rounds, args.max_ram, args.baseline_src.resolve() if args.baseline_src else None,
                           args.baseline_kernels, args.work, with_eager=not args.no_eager)
        print(report)
        path = args.results / f"{stamp}-kernels-e2e-{models.name}"
        path.with_name(path.name + ".md").write_text(report)
        path.with_name(path.name + ".json").write_text(json.dumps(data, indent=2))
        print(f"wrote {path}.{{md,json}}", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    lines = [f"# Fused kernels, torch {torch.__version__}", ""]
    lines += candidates(args.elements, args.repeat)
    lines.append("")
    try:
        lines += methods(args.elements, args.repeat)
        if args.casts:
            lines += ["", *casts()]
    except ImportError:
        lines.append("(numba is not installed: no per-method comparison)")
    report = "\n".join(lines) + "\n"
    print(report)
    path = args.results / f"{stamp}-kernels.md"
    path.write_text(report)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
