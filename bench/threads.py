#!/usr/bin/env python
"""Compute workers: warm-cache merge time by ``--threads``, and beside busy processes (the laptop case).

    python bench/threads.py --models bench/models/qwen2-0.5b --method task_arithmetic,ties,widen \\
        [--threads 1,2] [--busy 0,2,4] [--baseline-python /path/to/old/venv/bin/python]

For each method, thread count and number of busy processes (``python -c "while True: pass"``, started before the
merge and killed after it), one ``streammerge merge ... --threads N --force -q`` with the inputs in the page cache
(read once before; one untimed merge of each method first, so that a new checkout's numba cache is filled before
the timed ones), under ``/usr/bin/time``: wall, user+sys CPU and peak RSS. The start-up (the quickest merge
of the embedded tiny example, three before the merges and two after, same interpreter, same run) is subtracted to
give the compute time. The issue's figure of merit under load: wall(k busy) / wall(quiet), against the fair-share
bound 1.5·(k + 1)/cores.

``--baseline-python`` runs the same grid with another installation (e.g. a checkout of the commit before the
compute workers, ``--threads`` dropped) in the same run, for a before/after table.

The scaling table (the quiet runs, ``--busy 0``): compute time against the one-thread run's, as a speed-up and as
a share of linear (the issue's target: ≥ 0.7 of linear up to the physical cores), with the number of tensors the
plan merges at once at each ``--threads`` (``streammerge plan --json``'s ``workers``: fewer than the threads where
the budget does not fit a share per thread, which caps the speed-up whatever the cores).

Prints Markdown tables; writes ``bench/results/<UTC timestamp>-threads-<shape>.{json,md}`` and, with matplotlib, a
``.png`` of the quiet scaling (with two thread counts or more) and the wall under load (with two busy counts or more).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from run import StartUp, filesystem, stolen, time_v, work_root  # noqa: E402  (bench/run.py's helpers)

#: each method's parameters in the benches: mergekit's example densities (a density of 1, the default, keeps every
#: delta and skips the method's own work)
DEFAULT_PARAMS = {"ties": ["density=0.5"], "dare_ties": ["density=0.5"], "dare_linear": ["density=0.5"],
                  "breadcrumbs": ["density=0.9"], "breadcrumbs_ties": ["density=0.9"], "della": ["density=0.5"],
                  "della_linear": ["density=0.5"]}


def warm(folder: Path) -> None:
    """Read every file of ``folder`` once, so the merge finds its inputs in the page cache."""
    for path in sorted(folder.rglob("*.safetensors")):
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


class Busy:
    """``k`` CPU-bound processes for the duration of a ``with`` block."""

    def __init__(self, k: int) -> None:
        self.k, self.procs = k, []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.k)]
        time.sleep(0.5 if self.k else 0)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def inputs_args(models: Path, method: str, params: list[str], threads: int | None, max_ram: str) -> list[str]:
    """The inputs, method and budget options that ``merge`` and ``plan`` share."""
    from streammerge.methods import get_method

    variants = [v for v in ("chat", "multilingual") if (models / v).is_dir()][:get_method(method).max_models or None]
    return ["--base", str(models / "base"), *(a for v in variants for a in ("--model", str(models / v))),
            "--method", method, *(a for p in params for a in ("--param", p)), "--max-ram", max_ram,
            *(["--threads", str(threads)] if threads is not None else [])]


def merge_cmd(launcher: list[str], models: Path, method: str, params: list[str], threads: int | None, out: Path,
              max_ram: str) -> list[str]:
    """``launcher`` (the words that start a build's CLI) ``merge ...`` into ``out``, quietly, replacing it."""
    return [*launcher, "merge", *inputs_args(models, method, params, threads, max_ram),
            "--out", str(out), "--force", "-q"]


def plan_workers(launcher: list[str], models: Path, method: str, params: list[str], threads: int | None,
                 max_ram: str) -> int | None:
    """Tensors the plan merges at once (``plan --json``'s ``workers``); None where that build's plan does not say
    (an older build: the reason goes to stderr)."""
    cmd = [*launcher, "plan", *inputs_args(models, method, params, threads, max_ram), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"no worker count: {' '.join(cmd)} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout).get("workers")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (psutil's count, capped by the affinity mask)."""
    import psutil

    usable = len(os.sched_getaffinity(0))
    return min(usable, psutil.cpu_count(logical=False) or usable)


def script(python: str) -> str:
    """The ``streammerge`` console script beside ``python`` (not ``python -m``, which would import a
    ``streammerge/`` folder in the current directory instead of that installation's)."""
    return str(Path(python).with_name("streammerge"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="family folder from make_models.py")
    ap.add_argument("--method", default="task_arithmetic,ties,widen", help="comma-separated methods")
    ap.add_argument("--threads", default=None, help="comma-separated --threads values (default 1 and every core)")
    ap.add_argument("--busy", default="0,2,4", help="comma-separated numbers of busy processes beside the merge")
    ap.add_argument("--max-ram", default="1GiB")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of the whole grid, one after the other; the tables show each cell's median run")
    ap.add_argument("--work", type=Path, default=None, metavar="DIR",
                    help="write the outputs under DIR (e.g. /dev/shm, to leave the disk's writes out)")
    ap.add_argument("--baseline-python", default=None,
                    help="another installation's python to measure in the same run (without --threads)")
    ap.add_argument("--streammerge", default=None, metavar="PATH",
                    help="this build's streammerge executable (default: the console script next to this python)")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--render", type=Path, default=None, metavar="FILE.json",
                    help="redraw the plot of an earlier run's JSON beside it, and exit")
    args = ap.parse_args(argv)
    if args.render is not None:
        data = json.loads(args.render.read_text())
        png = args.render.with_name(args.render.name.removesuffix(".json") + ".png")
        plot(medians(data["rows"]), data["cores"], png, data.get("physical_cores", data["cores"]))
        return 0

    cores, physical = len(os.sched_getaffinity(0)), physical_cores()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    busy = [int(k) for k in args.busy.split(",")]
    methods = [m for m in args.method.split(",") if m]
    models = args.models.resolve()
    warm(models)
    launchers = {"streammerge": [args.streammerge or script(sys.executable)]}
    if args.baseline_python:
        launchers["baseline"] = [script(args.baseline_python)]
    runs = [("streammerge", t) for t in threads] + ([("baseline", None)] if args.baseline_python else [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=work_root(args.work)) as tmp:
        work = Path(tmp)
        outputs_on = filesystem(work)
        start_up = StartUp(work, {label: (launcher, None) for label, launcher in launchers.items()})
        for _ in range(3):  # three rounds before the merges, two after (StartUp)
            start_up.round()
        workers: dict[tuple[str, str, int | None], int | None] = {}
        for method in methods:
            params = DEFAULT_PARAMS.get(method, [])
            workers |= {(method, label, t): plan_workers(launchers[label], models, method, params, t, args.max_ram)
                        for label, t in runs}
            for label, launcher in launchers.items():  # untimed: a new checkout compiles its kernels here
                t = max(threads) if label == "streammerge" else None
                warm_up = merge_cmd(launcher, models, method, params, t, work / "out", args.max_ram)
                if subprocess.run(warm_up, capture_output=True).returncode != 0:
                    raise SystemExit(f"{' '.join(warm_up)} failed")
        for rnd, method, k in ((rnd, m, k) for rnd in range(args.rounds) for m in methods for k in busy):
            params = DEFAULT_PARAMS.get(method, [])
            for label, t in runs:
                cmd = merge_cmd(launchers[label], models, method, params, t, work / "out", args.max_ram)
                with Busy(k):
                    r = time_v(cmd)
                if r["returncode"] != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed: {r['stderr_tail']}")
                row = {"method": method, "build": label, "threads": t, "workers": workers[method, label, t],
                       "busy": k, "round": rnd, "wall_s": r["wall_s"],
                       "cpu_s": r["cpu_s"], "peak_rss": r["peak_rss"],
                       "steal_s": r["steal_s"], "iowait_s": r["iowait_s"]}
                rows.append(row)
                print(f"{method:16} {label:11} threads {t or '-':>2} busy {k}: {row['wall_s']:6.1f} s wall, "
                      f"{row['cpu_s']:6.1f} s CPU, {row['peak_rss'] / 2**20:6.0f} MiB, "
                      f"{stolen(row, 1)} s stolen / iowait",
                      file=sys.stderr)
        for _ in range(2):
            start_up.round()
        fixed = {label: start_up.quickest(label)["wall_s"] for label in start_up.builds}
    for row in rows:
        row["compute_s"] = max(0.0, row["wall_s"] - fixed[row["build"]])
    report = render(medians(rows), fixed, cores, models.name, args.max_ram, outputs_on, physical, args.rounds)
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{stamp}-threads-{models.name}"  # (not Path.with_suffix: a name like qwen2-0.5b has a dot)
    data = {"cores": cores, "physical_cores": physical, "startup_s": fixed, "outputs_on": outputs_on, "rows": rows}
    (args.results / f"{base}.json").write_text(json.dumps(data, indent=2))
    (args.results / f"{base}.md").write_text(report)
    try:
        plot(medians(rows), cores, args.results / f"{base}.png", physical)
    except ImportError:
        print("matplotlib is missing: no plot", file=sys.stderr)
    print(f"wrote {args.results / base}.{{json,md,png}}", file=sys.stderr)
    return 0


def medians(rows: list[dict]) -> list[dict]:
    """One row per (method, build, threads, busy): the run of median wall time among its rounds (the lower of the
    two middle ones for an even count), with ``rounds`` and the cell's ``wall_range``; in first-run order."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["build"], r["threads"], r["busy"]), []).append(r)
    out = []
    for runs in cells.values():
        walls = sorted(r["wall_s"] for r in runs)
        median = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]
        out.append({**median, "rounds": len(runs), "wall_range": (walls[0], walls[-1])})
    return out


def render(rows: list[dict], fixed: dict[str, float], cores: int, shape: str, max_ram: str,
           outputs_on: str = "?", physical: int | None = None, rounds: int = 1) -> str:
    physical = physical or cores
    lines = [f"# Compute workers: {shape}, warm page cache, --max-ram {max_ram}, {cores} cores "
             f"({physical} physical), outputs written to {outputs_on}", "",
             *([f"{rounds} rounds of the whole grid; each row is its cell's median run (wall range in brackets).", ""]
               if rounds > 1 else []),
             "Start-up (tiny example merge): " + ", ".join(f"{v:.2f} s" for v in fixed.values()), "",
             "Stolen / iowait: CPU time the hypervisor gave other guests, and idle time waiting for the disk, "
             "during the run (/proc/stat), all CPUs together.", "",
             "| method | build | threads | workers | busy | wall s | CPU s | stolen / iowait s | compute s | "
             "peak RSS MiB | wall / quiet | bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        quiet = next(q for q in rows if q["method"] == r["method"] and q["build"] == r["build"]
                     and q["threads"] == r["threads"] and q["busy"] == min(x["busy"] for x in rows))
        ratio = r["wall_s"] / quiet["wall_s"] if quiet["wall_s"] else float("nan")
        bound = 1.5 * (r["busy"] + 1) / cores if r["busy"] else 1.0
        spread = f" ({r['wall_range'][0]:.1f}–{r['wall_range'][1]:.1f})" if r.get("rounds", 1) > 1 else ""
        lines.append(f"| {r['method']} | {r['build']} | {r['threads'] or '-'} | {r.get('workers') or '-'} | "
                     f"{r['busy']} | {r['wall_s']:.1f}{spread} | {r['cpu_s']:.1f} | {stolen(r, 1)} | "
                     f"{r['compute_s']:.1f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {ratio:.2f} | "
                     f"{'≤ ' + format(bound, '.2f') if r['busy'] else '-'} |")
    table = scaling(rows)
    if table:
        lines += ["", f"## Scaling (quiet runs; speed-up of the compute time over the one-thread run's; the target is "
                      f"≥ 0.70 of linear up to the {physical} physical cores)", "",
                  "| method | threads | workers | compute s | CPU s | speed-up | of linear |",
                  "|---|---|---|---|---|---|---|"]
        for r in table:
            share = f"{r['of_linear']:.2f}" + (" (beyond the physical cores)" if r["threads"] > physical else "")
            lines.append(f"| {r['method']} | {r['threads']} | {r.get('workers') or '-'} | {r['compute_s']:.2f} | "
                         f"{r['cpu_s']:.1f} | {r['speedup']:.2f}× | {share} |")
    return "\n".join(lines) + "\n"


def scaling(rows: list[dict]) -> list[dict]:
    """The quiet runs of this build (``busy`` 0, ``--threads`` given) of each method that has a one-thread run, with
    ``speedup`` = compute(1 thread) / compute(N) and ``of_linear`` = speedup / N; [] where none has two counts."""
    quiet = [r for r in rows if r["build"] == "streammerge" and r["busy"] == 0 and r["threads"]]
    out = []
    for method in dict.fromkeys(r["method"] for r in quiet):
        mine = sorted((r for r in quiet if r["method"] == method), key=lambda r: r["threads"])
        one = next((r for r in mine if r["threads"] == 1), None)
        if one is None or len(mine) < 2 or not all(r["compute_s"] > 0 for r in mine):
            continue
        for r in mine:
            speedup = one["compute_s"] / r["compute_s"]
            out.append({**r, "speedup": speedup, "of_linear": speedup / r["threads"]})
    return out


def plot(rows: list[dict], cores: int, path: Path, physical: int | None = None) -> None:
    """Left, where there are two thread counts or more: the quiet speed-up by ``--threads`` (a colour per method),
    against linear and 0.7 of linear, the physical cores marked. Right, where there are two busy counts or more:
    wall time against the number of busy processes (a colour per method, a line style per build)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    physical = physical or cores
    table = scaling(rows)
    under_load = len({r["busy"] for r in rows}) > 1
    panels = [name for name, wanted in (("scaling", table), ("load", under_load or not table)) if wanted]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    methods = sorted({r["method"] for r in rows})
    for ax, panel in zip(axes[0], panels):
        if panel == "scaling":
            counts = sorted({r["threads"] for r in table})
            ax.plot(counts, counts, color="grey", linewidth=1, label="linear")
            ax.plot(counts, [0.7 * c for c in counts], color="grey", linewidth=1, linestyle="--",
                    label="0.7 of linear (target)")
            for ci, method in enumerate(methods):
                pts = [(r["threads"], r["speedup"]) for r in table if r["method"] == method]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{ci}", label=method)
            ax.axvline(physical, color="black", linewidth=0.8, linestyle=":")
            ax.text(physical, 1, f" {physical} physical cores", rotation=90, va="bottom", fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_yticks(counts, [str(c) for c in counts])
            ax.set_xlabel("--threads")
            ax.set_ylabel("speed-up of the compute time over 1 thread")
            ax.set_title("Scaling, warm page cache, quiet machine")
        else:
            builds = sorted({(r["build"], r["threads"]) for r in rows}, key=lambda b: (b[0] != "baseline", b[1] or 0))
            styles = ["--", ":", "-", "-."]
            for ci, method in enumerate(methods):
                for si, (build, t) in enumerate(builds):
                    pts = sorted((r["busy"], r["wall_s"]) for r in rows
                                 if (r["method"], r["build"], r["threads"]) == (method, build, t))
                    if pts:
                        name = "before (torch intra-op threads)" if build == "baseline" else f"--threads {t}"
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{ci}",
                                linestyle=styles[si % len(styles)], label=f"{method}, {name}")
            busy = sorted({r["busy"] for r in rows})
            ax.set_xticks(busy)
            ax.set_xlabel(f"busy processes beside the merge (this machine: {cores} cores)")
            ax.set_ylabel("wall time, s (warm page cache; log scale)")
            ax.set_yscale("log")
            ax.set_title("Merge wall time under CPU load")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
