#!/usr/bin/env python
"""CPU memory per tensor and per run: the real peak RSS against what the plan predicted, for every method.

    python bench/ram_probe.py [--budgets 40MiB,128MiB,1GiB] [--methods ties,widen] [--family mid|edges]
                              [--kernels eager|numba|both] [--fused-budgets 192MiB,512MiB,1GiB]
                              [--results bench/results]

For one synthetic family (``mid``: one Qwen2-0.5B-wide layer with an untied 32000-token vocabulary, 138 MiB per
model in bf16, written once to ``bench/work/ram-probe/models``), every method is planned and merged on the CPU
under several ``--max-ram`` budgets: a small one (every 2-D tensor in row chunks, compute blocks shrunk), a medium
one (the layer's tensors whole, the embedding and head chunked) and one where every tensor fits whole. Each
(method, budget) runs in a fresh subprocess, so runs cannot leave memory behind for each other. ``--kernels``
(default both) sets ``STREAMMERGE_KERNELS`` of the subprocesses: ``eager`` at ``--budgets``, ``numba`` (the fused
kernels, ``Plan.fused_kernels``) at ``--fused-budgets`` (192 MiB, 512 MiB, 1 GiB), since the plan takes numba's
runtime (``kernels.RUNTIME_BYTES``, 128 MiB) off the budget first and refuses a budget that leaves too little. In it:

- **whole run**: the highest RSS (``VmHWM``) during ``streammerge.api.merge`` minus the interpreter's RSS right
  after ``import torch, streammerge`` (as ``bench/run.py`` counts it), against ``Plan.peak_ram``; also minus the
  RSS just before the merge (after a warm-up merge), which leaves out code pages and Python objects. numba is not
  imported at the baseline, so with the fused kernels the whole-run figure includes their runtime, as ``peak_ram``
  does (it adds ``RUNTIME_BYTES`` when ``plan.fused_kernels``).
- **per tensor**: ``streammerge.execute.run_tensor`` is wrapped; before each tensor freed heap memory is given
  back (``malloc_trim``), the peak is reset (``5`` into ``/proc/self/clear_refs``) and ``VmRSS`` read; after it,
  ``VmHWM`` − that ``VmRSS`` is the tensor's compute memory, against its ``TensorPlan.scratch_bytes`` (state kept
  across passes + one compute block's temporaries: what the methods' per-element figures decide). The planner
  sizes the fused path with the eager figures, so a fused tensor should measure at most its prediction. The runner's
  ``_rows``/``_raw_rows`` are counted to say which path each tensor's blocks took (fused, mixed, eager).

Stable numbers need the buffers and the allocator out of the way:

- The reader's input slots and the writer's output buffers (allocated lazily on first use, and only the touched
  pages become resident) are allocated at their planned size and written once when the run starts, before the
  first tensor. The reader then only refills resident slots. So the whole-run figure counts every planned buffer
  in full (as ``peak_ram`` does) and no tensor is charged for a buffer.
- glibc runs with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) and trim threshold, and one arena
  (``MALLOC_ARENA_MAX=1``): every allocation of 64 KiB or more (every block temporary) is its own mapping, unmapped
  when freed, so RSS follows the live tensors. With glibc's defaults the mmap threshold rises to 32 MiB after the
  first large free, freed blocks then stay in the heap and are reused, and a tensor's peak hides in memory an
  earlier tensor left resident (or shows an earlier tensor's leftovers). ``--glibc-defaults`` runs without these
  settings (the whole-run figure as users get it; the per-tensor figures are then unreliable).
- ``torch.set_num_threads(1)`` (and ``OMP_NUM_THREADS=1``): this is a shared 2-core machine, and one intra-op
  thread keeps kernels from adding per-thread buffers that depend on the core count.
- A warm-up merge of the ``tiny`` family (for ``edges``: with the same kinds of tensor) with the same method and
  backend first, so the code pages of the kernels used are already resident (``VmHWM`` counts file-backed pages
  too); the JSON keeps each tensor's ``RssFile`` change. With numba the warm-up imports it and loads the method's
  compiled kernels from numba's cache; an unmeasured process runs the warm-up once per method before, so that
  cache is filled (compiling would leave LLVM's memory in the measured process). Kernels first loaded during the
  measured merge anyway (``kernels_loaded_in_merge``), or compiled in a measured process (``kernels_compiled``: the
  kernels' sources changed during the run), are listed.

``--family edges`` measures the inputs beyond plain bf16 matrices on the same layer: the base's projection weights
stored as FP8 (``F8_E4M3`` codes with 128×128 float32 block scales, dequantized on the fly), a 3-D stacked-experts
tensor ``mlp.experts.gate_up_proj`` [16, 1024, 896] (merged per expert by WIDEN) and a Qwen2-VL-sized convolution
kernel ``visual.patch_embed.proj.weight`` [1280, 3, 2, 14, 14] in every model.

Tensors whose predicted compute-block part (``scratch_bytes − state_bytes``, what the per-element figures decide)
is under ``--min-block`` (1 MiB: norms and biases, whose figures are page and Python-object noise) are listed in the
JSON but left out of the worst ratios. Writes ``<UTC timestamp>-ram-probe.{json,md}`` under --results; the exit status
is 1 if a merge failed or a run's peak over the baseline exceeded its --max-ram (the JSON also has
``within_peak_ram``). About 10 minutes on 2 cores for the 20 methods x (3 eager + 3 fused budgets); ``edges``
with 2 GiB added, about 9 (the families are written once, in a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS: dict[str, dict[str, str]] = {
    "widen": {}, "linear": {}, "task_arithmetic": {"weight": "0.7,0.4"}, "ties": {"density": "0.5"},
    "dare_linear": {"density": "0.6", "seed": "3"}, "dare_ties": {"density": "0.6", "seed": "3"},
    "breadcrumbs": {"density": "0.6", "gamma": "0.05"}, "breadcrumbs_ties": {"density": "0.6", "gamma": "0.05"},
    "slerp": {}, "model_stock": {}, "nearswap": {"t": "0.001"},
    "della": {"density": "0.5", "epsilon": "0.1"}, "della_linear": {"density": "0.5", "epsilon": "0.1"},
    "sce": {"select_topk": "0.5"}, "nuslerp": {}, "multislerp": {}, "karcher": {}, "arcee_fusion": {},
    "ram": {"epsilon": "0.002"}, "ramplus_tl": {"epsilon": "0.002"},
}
BUDGETS = ["40MiB", "128MiB", "1GiB"]
#: the fused runs' budgets: numba's runtime (kernels.RUNTIME_BYTES, 128 MiB) comes off the budget first, so 40 MiB
#: and 128 MiB are refused. On ``mid`` as BUDGETS do eagerly: 192 MiB chunks most 2-D tensors, 512 MiB the embedding
#: and head, 1 GiB fits every tensor whole (``auto`` would use the kernels only from 512 MiB: 4 × RUNTIME_BYTES)
FUSED_BUDGETS = ["192MiB", "512MiB", "1GiB"]
#: (hidden, intermediate, layers, heads, kv_heads, vocab, tied): vram_probe's "mid" family
MID = (896, 4864, 1, 14, 2, 32000, False)
#: the extra tensors of the ``edges`` family (name: shape), besides its FP8 base
EDGE_TENSORS = {"model.layers.0.mlp.experts.gate_up_proj": (16, 1024, 896),
                "visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14)}
#: the same kinds of tensor for the warm-up of the ``edges`` family (so FP8, expert and conv code is paged in
#: before the measured merge: ``VmHWM`` counts file-backed pages too)
EDGE_TENSORS_TINY = {"model.layers.0.mlp.experts.gate_up_proj": (4, 32, 64),
                     "visual.patch_embed.proj.weight": (16, 3, 2, 4, 4)}
#: the allocator settings of the measured subprocesses (see the module docstring)
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
#: per-tensor ratios outside this band mean a declared figure is off by more than 25%
BAND = (0.75, 1.25)


# ---- the measured subprocess -----------------------------------------------------------------------------------
def status() -> dict[str, int]:
    """Memory fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(spec: dict) -> dict:
    """One (method, budget) in this process: warm up, then merge with every tensor measured."""
    import ctypes

    import torch

    import streammerge.execute as execute
    import streammerge.pipeline as pipeline
    import streammerge.runner as runner
    from streammerge import api, kernels

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    baseline = status()  # the interpreter with torch and streammerge imported (numba is imported on first use)
    numba_at_baseline = "numba" in sys.modules
    method, params, budget = spec["method"], spec["params"], spec["budget"]
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    for folder in ("warmup", "out"):  # a finished output of an earlier run would be kept, not merged again
        shutil.rmtree(work / folder, ignore_errors=True)

    def models_of(fam: str) -> tuple[Path, list[Path]]:
        root = Path(spec["families"][fam])
        from streammerge.methods import get_method  # noqa: PLC0415

        one = get_method(method).max_models == 1
        return root / "base", [root / "chat"] if one else [root / "chat", root / "multilingual"]

    # the warm-up runs the measured backend (STREAMMERGE_KERNELS, set by the driver): with numba it imports numba and
    # loads the method's compiled kernels from numba's cache, so the measured merge finds them resident; the fused
    # path reserves kernels.RUNTIME_BYTES, so its budget must leave room for that
    base, models = models_of("tiny-edges" if spec["family"] == "edges" else "tiny")
    warm_ram = "64MiB" if spec["kernels"] == "eager" else "1GiB"
    api.merge(base, models, work / "warmup", method, params, max_ram=warm_ram, device="cpu", threads=1, force=True)
    if spec.get("prime"):  # only fill numba's cache (a process that compiled keeps LLVM's memory: never measured)
        return {"primed": method}

    def touched(nbytes: int) -> torch.Tensor:
        buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        buf.fill_(0)  # make every page resident now, not when a later tensor first writes it
        return buf

    class Prefetcher(pipeline.Prefetcher):
        """Allocates (and touches) every slot before its first read."""

        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            import threading
            self.allocated = threading.Event()
            super().__init__(*args, **kwargs)

        def _run(self) -> None:
            try:
                for i in range(len(self._slots)):
                    self._slots[i] = touched(self.slot_bytes)
            finally:
                self.allocated.set()
            super()._run()

    start_feed = execute.LocalIO.start_feed

    def start_touched(self, feed):  # type: ignore[no-untyped-def]  (one worker: it owns every output buffer)
        start_feed(self, feed)
        self.prefetch.allocated.wait()
        for i in range(len(self.writer._buffers)):
            self.writer._buffers[i] = touched(self.writer.buffer_bytes)

    tensors: list[dict] = []
    hwm = [0]  # the highest VmHWM of the merge, across the resets
    run_tensor = execute.run_tensor
    # which path each tensor's blocks took: the runner makes eager float32 rows with _rows, and tries a fused
    # kernel on rows as stored from _raw_rows (falling back to _rows where the method has no fused path for them)
    rows_fn, raw_rows_fn = runner._rows, runner._raw_rows
    calls = {"eager": 0, "fused": 0}

    def counted_rows(*args):  # type: ignore[no-untyped-def]
        calls["eager"] += 1
        return rows_fn(*args)

    def counted_raw_rows(*args):  # type: ignore[no-untyped-def]
        calls["fused"] += 1
        return raw_rows_fn(*args)

    def measured(plan, job, io):  # type: ignore[no-untyped-def]
        hwm[0] = max(hwm[0], status()["VmHWM"])  # what happened since the last reading (between tensors)
        libc.malloc_trim(0)
        reset_peak()
        before = status()
        calls["eager"] = calls["fused"] = 0
        t0 = time.perf_counter()
        result = run_tensor(plan, job, io)
        wall = time.perf_counter() - t0
        after = status()
        hwm[0] = max(hwm[0], after["VmHWM"])
        t = job.tensor
        peak = after["VmHWM"] - before["VmRSS"]
        # each block tries a kernel first when the plan is fused, and makes eager rows only where that fell back
        # (no fused path for these inputs, e.g. an FP8 source): fused, mixed, or eager (never tried, or every
        # block fell back)
        path = ("copy" if not t.rule.merged else "fused" if calls["fused"] and not calls["eager"] else
                "mixed" if 0 < calls["eager"] < calls["fused"] else "eager")
        tensors.append({
            "name": t.name, "rule": t.rule.value, "shape": list(t.shape), "rows": t.rows, "row_numel": t.row_numel,
            "chunk_rows": t.chunk_rows, "block_rows": t.block_rows, "stat_block_rows": t.stat_block_rows,
            "stat_passes": t.stat_passes, "resident": t.resident, "state_bytes": t.state_bytes,
            "scratch_bytes": t.scratch_bytes, "measured": peak, "path": path,
            "ratio": round(peak / t.scratch_bytes, 3) if t.scratch_bytes else None,
            "rss_file_change": after["RssFile"] - before["RssFile"],
            "left_resident": after["VmRSS"] - before["VmRSS"], "wall_s": round(wall, 3),
        })
        return result

    base, models = models_of(spec["family"])
    out = work / "out"
    plan = api.plan(base, models, out, method, params, max_ram=budget, device="cpu", threads=1, force=True)
    assert plan.workers == 1, "per-tensor peaks need one tensor at a time"
    loaded = kernel_signatures()
    execute.Prefetcher, execute.LocalIO.start_feed, execute.run_tensor = Prefetcher, start_touched, measured
    runner._rows, runner._raw_rows = counted_rows, counted_raw_rows
    libc.malloc_trim(0)
    pre = status()
    reset_peak()
    t0 = time.perf_counter()
    try:
        execute.execute(plan, show_progress=False)
    finally:
        execute.Prefetcher, execute.LocalIO.start_feed, execute.run_tensor = pipeline.Prefetcher, start_feed, run_tensor
        runner._rows, runner._raw_rows = rows_fn, raw_rows_fn
    wall = time.perf_counter() - t0
    hwm[0] = max(hwm[0], status()["VmHWM"])
    after = kernel_signatures()
    return {
        "method": method, "params": params, "max_ram": budget, "max_ram_bytes": plan.budget.max_ram,
        "kernels": spec["kernels"], "fused_kernels": plan.fused_kernels, "runtime_bytes":
        kernels.RUNTIME_BYTES if plan.fused_kernels else 0, "numba_at_baseline": numba_at_baseline,
        # numba kernels (or type signatures) first loaded during the measured merge: their code was not resident
        "kernels_loaded_in_merge": sorted(k for k, n in after.items() if n > loaded.get(k, 0)),
        # kernels compiled in this process (numba's cache was stale: the sources changed after the unmeasured warm-up)
        "kernels_compiled": kernels_compiled(),
        "wall_s": round(wall, 2), "torch_threads": torch.get_num_threads(),
        "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
        "plan": {"peak_ram": plan.peak_ram, "slot_bytes": plan.slot_bytes, "out_buffer_bytes": plan.out_buffer_bytes,
                 "depth": plan.depth, "scratch_bytes": plan.scratch_bytes},
        "baseline_rss": baseline["VmRSS"], "pre_merge_rss": pre["VmRSS"], "peak_rss": hwm[0],
        "run_over_baseline": hwm[0] - baseline["VmRSS"], "run_over_pre_merge": hwm[0] - pre["VmRSS"],
        "tensors": tensors,
    }


def numba_kernels() -> dict[str, object]:
    """Every numba kernel (dispatcher) of the engine, by name; none when numba was not imported."""
    if "numba" not in sys.modules:
        return {}
    import streammerge.kernels._numba as compiled
    import streammerge.kernels._numba_fusion as fusion

    return {f"{m.__name__.rsplit('.', 1)[-1]}.{k}": v for m in (compiled, fusion) for k, v in vars(m).items()
            if hasattr(v, "signatures") and hasattr(v, "py_func")}


def kernel_signatures() -> dict[str, int]:
    """Compiled type signatures of every numba kernel loaded so far."""
    return {k: len(v.signatures) for k, v in numba_kernels().items()}  # type: ignore[attr-defined]


def kernels_compiled() -> list[str]:
    """Kernels this process compiled rather than loaded from numba's cache (LLVM's memory then stays resident)."""
    compiled = numba_kernels().items()
    return sorted(k for k, v in compiled if sum(v.stats.cache_misses.values()))  # type: ignore[attr-defined]


# ---- the driver ------------------------------------------------------------------------------------------------
def families(root: Path) -> dict[str, str]:
    """Write (once) the tiny warm-up family and the measured mid and edges families; a marker says a folder is
    complete."""
    from streammerge.examples import Shape, write_family

    out = {}
    edges = {"edges": EDGE_TENSORS, "tiny-edges": EDGE_TENSORS_TINY}
    for name, shape in (("tiny", "tiny-untied"), ("mid", Shape(*MID[:6], tied=MID[6])),
                        ("tiny-edges", "tiny-untied"), ("edges", Shape(*MID[:6], tied=MID[6]))):
        folder = root / name
        key = repr(shape) + repr(edges.get(name, ""))
        marker = folder / ".complete"
        if not (marker.is_file() and marker.read_text() == key):
            shutil.rmtree(folder, ignore_errors=True)
            write_family(folder, shape, dtype="bf16")
            if name in edges:
                add_edges(folder, edges[name])
            marker.write_text(key)
        out[name] = str(folder)
    return out


def add_edges(family: Path, extra_shapes: dict[str, tuple[int, ...]]) -> None:
    """Give every model of ``family`` the tensors ``extra_shapes`` (:data:`EDGE_TENSORS`) and store the base's projections as FP8 with
    128×128 block scales (amax scaling, as FP8 releases are made)."""
    import torch
    from make_fp8 import quantize_blocks, quantized_config
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    extra = {n: torch.randn(shape, generator=g) * 0.02 for n, shape in extra_shapes.items()}
    for k, folder in enumerate(sorted(p for p in family.iterdir() if p.is_dir())):
        tensors = load_file(folder / "model.safetensors")
        for n, t in extra.items():
            tensors[n] = (t + 0.002 * k * torch.randn(t.shape, generator=g)).to(torch.bfloat16)
        if folder.name == "base":
            for n in [n for n in tensors if n.endswith("_proj.weight")]:
                tensors[n], tensors[n + "_scale_inv"] = quantize_blocks(tensors[n])
            config = quantized_config(json.loads((folder / "config.json").read_text()))
            (folder / "config.json").write_text(json.dumps(config))
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def run_child(spec: dict, glibc_defaults: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", STREAMMERGE_KERNELS=spec["kernels"])
    for k in MALLOC_ENV:
        env.pop(k, None)
    if not glibc_defaults:
        env.update(MALLOC_ENV)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"method": spec["method"], "params": spec["params"], "max_ram": spec["budget"],
                "kernels": spec["kernels"], "error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def counted(t: dict, min_block: int) -> bool:
    """Whether a tensor's prediction is big enough to compare: its compute-block part is at least ``min_block``."""
    return t["scratch_bytes"] - t["state_bytes"] >= min_block


def summarize(row: dict, min_block: int) -> None:
    """Add the worst (highest and lowest) per-tensor ratios among tensors with a meaningful prediction."""
    big = [t for t in row["tensors"] if counted(t, min_block)]
    if big:
        hi = max(big, key=lambda t: t["measured"] / t["scratch_bytes"])
        lo = min(big, key=lambda t: t["measured"] / t["scratch_bytes"])
        keys = ("name", "ratio", "measured", "scratch_bytes", "chunk_rows", "rows", "path")
        row["worst_high"] = {k: hi[k] for k in keys if k in hi}
        row["worst_low"] = {k: lo[k] for k in keys if k in lo}
    row["backend"] = "fused" if row["fused_kernels"] else "eager"
    row["paths"] = {p: sum(1 for t in row["tensors"] if t["path"] == p) for p in ("fused", "mixed", "eager", "copy")}
    row["run_ratio"] = round(row["run_over_baseline"] / row["plan"]["peak_ram"], 3)
    row["run_ratio_pre_merge"] = round(row["run_over_pre_merge"] / row["plan"]["peak_ram"], 3)
    row["within_max_ram"] = row["run_over_baseline"] <= row["max_ram_bytes"]
    row["within_peak_ram"] = row["run_over_baseline"] <= row["plan"]["peak_ram"]


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def short(name: str) -> str:
    return name.removeprefix("model.").removeprefix("layers.0.").removesuffix(".weight")


def render(result: dict) -> str:
    band = f"[{BAND[0]}, {BAND[1]}]"
    L = [f"# CPU memory per tensor and per run vs the plan ({result['started_utc']})", "",
         f"- machine: {result['machine']}; python {result['python']}, torch {result['torch']}, git {result['git']}"
         + (f" (**{result['git_at_start']} at the start: the engine changed during the run**)"
            if result.get("git_at_start", result["git"]) != result["git"] else ""),
         f"- family: {result['family']} ({mib(result['family_bytes'])} MiB for the base); each (method, "
         f"budget) in a fresh subprocess, torch threads 1, allocator: {result['allocator']}",
         "- **run**: peak RSS of the merge − RSS after `import torch, streammerge` (`run/plan`: over `peak_ram`; "
         "`pre`: over the RSS just before the merge, after a warm-up merge of the tiny family). Every planned "
         "buffer is made resident at the start, so the run figure counts them in full.",
         f"- **per tensor**: peak RSS while `run_tensor` ran − RSS before it (after `malloc_trim`), over the "
         f"tensor's `scratch_bytes`; highest and lowest ratio among tensors whose compute-block part "
         f"(`scratch_bytes − state_bytes`) is ≥ {mib(result['min_block'])} MiB. Outside {band}: the declared figures "
         f"are off by more than 25%; a tensor the fused kernels computed (sized with the eager figures, so lower is "
         f"expected) is marked only above 1; `eager` after a fused run's tensor: it fell back to the eager path.",
         "- **kernels**: `STREAMMERGE_KERNELS` of the run; backend: `fused` when the plan runs the numba kernels "
         "(`Plan.fused_kernels`: `peak_ram` then includes their runtime, `kernels.RUNTIME_BYTES`; the warm-up merge "
         "imports numba and loads the method's kernels, so `warm` = RSS before the merge − baseline includes them), "
         "tensors as fused/mixed/eager (mixed: some blocks fell back to the eager path).",
         *([f"- note: {result['note']}"] if result.get("note") else []), "",
         "| method | --max-ram | backend (tensors fused/mixed/eager) | peak_ram MiB | run MiB | warm MiB | "
         "within --max-ram | run/plan | pre/plan | max tensor ratio (tensor, chunk/rows) | predicted → measured MiB "
         "| min tensor ratio (tensor) | wall s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        backend = r.get("kernels", "auto")  # (results before --kernels: auto)
        if "error" in r:
            L.append(f"| {r['method']} | {r['max_ram']} | {backend} | - | - | - | - | - | - | "
                     f"failed: {r['error'][-120:]!r} | | | |")
            continue
        if "backend" in r:
            p = r["paths"]
            backend = f"{r['backend']} ({p['fused']}/{p['mixed']}/{p['eager']})"
        hi, lo = r.get("worst_high"), r.get("worst_low")

        def flag(t: dict) -> str:  # a fused tensor is only flagged above its (eager) prediction
            band = (float("-inf"), 1.0) if t.get("path") == "fused" else BAND
            return f"**{t['ratio']}**" if not band[0] <= t["ratio"] <= band[1] else f"{t['ratio']}"

        def eager_in_fused(t: dict, r: dict = r) -> str:  # a tensor a fused run computed eagerly (an FP8 source)
            return ", eager" if r.get("fused_kernels") and t.get("path") != "fused" else ""

        hi_s = f"{flag(hi)} ({short(hi['name'])}, {hi['chunk_rows']}/{hi['rows']}{eager_in_fused(hi)})" if hi else "-"
        pm = f"{mib(hi['scratch_bytes'])} → {mib(hi['measured'])}" if hi else "-"
        lo_s = f"{flag(lo)} ({short(lo['name'])}{eager_in_fused(lo)})" if lo else "-"
        within = "yes" if r["within_max_ram"] else "**no**"
        warm = mib(r["pre_merge_rss"] - r["baseline_rss"])
        L.append(f"| {r['method']} | {r['max_ram']} | {backend} | {mib(r['plan']['peak_ram'])} | "
                 f"{mib(r['run_over_baseline'])} | {warm} | {within} | {r['run_ratio']} | {r['run_ratio_pre_merge']} | "
                 f"{hi_s} | {pm} | {lo_s} | {r['wall_s']} |")
    L += ["", "Every compared tensor: measured/predicted (`-`: compute-block part under "
          f"{mib(result['min_block'])} MiB).", ""]
    names: list[str] = []
    for r in result["rows"]:
        for t in r.get("tensors", []):
            if counted(t, result["min_block"]) and short(t["name"]) not in names:
                names.append(short(t["name"]))
    L += ["| method | --max-ram | kernels | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in result["rows"]:
        if "error" in r:
            continue
        by = {short(t["name"]): t for t in r["tensors"]}
        cells = []
        for n in names:
            t = by.get(n)
            cells.append("-" if t is None or not counted(t, result["min_block"]) else
                         f"{t['ratio']}" + ("" if t.get("path") in ("fused", None) or r.get("kernels") == "eager"
                                            else f" ({t['path']})"))
        L.append(f"| {r['method']} | {r['max_ram']} | {r.get('kernels', 'auto')} | " + " | ".join(cells) + " |")
    late = [f"{r['method']} {r['max_ram']}: {', '.join(r['kernels_loaded_in_merge'])}" for r in result["rows"]
            if r.get("kernels_loaded_in_merge")]
    if late:
        L += ["", "Numba kernels first loaded during the measured merge (not warmed up; their code pages fall in "
              "a tensor's figure): " + "; ".join(late) + "."]
    compiled = [f"{r['method']} {r['max_ram']}: {', '.join(r['kernels_compiled'])}" for r in result["rows"]
                if r.get("kernels_compiled")]
    if compiled:
        L += ["", "Numba kernels compiled in a measured process (a stale cache; LLVM's memory is in its `warm` and "
              "run figures): " + "; ".join(compiled) + "."]
    return "\n".join(L) + "\n"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "streammerge"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return head + (" (uncommitted changes in streammerge/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def report(method: str, budget: str, backend: str, row: dict, min_block: int) -> None:
    """Summarize ``row`` and print its line."""
    if "error" in row:
        print(f"{method:16} {budget:7} {backend:5} FAILED\n{row['error']}", flush=True)
        return
    summarize(row, min_block)
    hi = row.get("worst_high") or {}
    print(f"{method:16} {budget:7} {backend:5} {row['backend']:5} plan {mib(row['plan']['peak_ram']):>6} MiB run "
          f"{mib(row['run_over_baseline']):>6} MiB ({row['run_ratio']:.2f}, pre {row['run_ratio_pre_merge']:.2f})"
          f"  tensor max {hi.get('ratio', '-')} ({short(hi.get('name', '-'))}) min "
          f"{(row.get('worst_low') or {}).get('ratio', '-')}  {row['wall_s']} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "ram-probe",
                    help="models (kept for the next run) and scratch output")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated --max-ram values (eager runs)")
    ap.add_argument("--fused-budgets", default=",".join(FUSED_BUDGETS),
                    help="comma-separated --max-ram values of the numba runs (the runtime's 128 MiB come off first)")
    ap.add_argument("--kernels", choices=("eager", "numba", "both"), default="both",
                    help="STREAMMERGE_KERNELS of the runs: the eager torch path, the fused numba kernels, or both")
    ap.add_argument("--min-block", type=int, default=1 << 20,
                    help="tensors whose predicted compute-block part is below this many bytes are left out of the "
                         "worst ratios")
    ap.add_argument("--family", choices=("mid", "edges"), default="mid",
                    help="mid: one bf16 layer; edges: the same with an FP8 base, 3-D experts and a conv kernel")
    ap.add_argument("--note", default="", help="a remark stored in the report")
    ap.add_argument("--glibc-defaults", action="store_true", help="run without the allocator settings")
    ap.add_argument("--render", type=Path, help="only re-render the Markdown of an earlier JSON result")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.render:
        result = json.loads(args.render.read_text())
        for row in result["rows"]:
            if "tensors" in row and "fused_kernels" in row:  # (again: results from before the paths were kept)
                summarize(row, result["min_block"])
        args.render.with_suffix(".md").write_text(render(result))
        return 0
    if not Path("/proc/self/clear_refs").exists():
        print("ram_probe: needs Linux (/proc/self/clear_refs)", file=sys.stderr)
        return 2
    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"ram_probe: unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    backends = ["eager", "numba"] if args.kernels == "both" else [args.kernels]
    budgets = {"eager": [b.strip() for b in args.budgets.split(",") if b.strip()],
               "numba": [b.strip() for b in args.fused_budgets.split(",") if b.strip()]}
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    git_at_start = git_commit()
    fams = families(args.work / "models")
    family_bytes = sum(p.stat().st_size for p in (Path(fams[args.family]) / "base").glob("*.safetensors"))
    rows = []
    for method in methods:
        for backend in backends:
            base_spec = {"method": method, "params": METHODS[method], "families": fams, "family": args.family,
                         "work": str(args.work / "scratch"), "kernels": backend}
            if backend == "numba":  # compile what numba's cache lacks in a process that is not measured
                primed = run_child({**base_spec, "budget": "-", "prime": True}, args.glibc_defaults)
                if "error" in primed:
                    print(f"{method:16} numba warm-up FAILED\n{primed['error']}", flush=True)
            for budget in budgets[backend]:
                row = run_child({**base_spec, "budget": budget}, args.glibc_defaults)
                rows.append(row)
                report(method, budget, backend, row, args.min_block)
    shutil.rmtree(args.work / "scratch", ignore_errors=True)
    result = {
        "started_utc": started, "git": git_commit(), "git_at_start": git_at_start,
        "python": platform.python_version(), "torch": torch.__version__,
        "machine": f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
                   f"load {os.getloadavg()[0]:.2f}",
        "family": f"{args.family}: Shape{MID}" + (f" + FP8 base + {EDGE_TENSORS}" if args.family == "edges" else ""),
        "family_bytes": family_bytes, "min_block": args.min_block, "note": args.note,
        "kernels": args.kernels,
        "allocator": "glibc defaults" if args.glibc_defaults else
                     ", ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
        "rows": rows,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"{started}-ram-probe"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 1 if any("error" in r or not r["within_max_ram"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
