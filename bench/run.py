#!/usr/bin/env python
"""Benchmark ``streammerge merge`` against the I/O floor, cold page cache.

    python bench/run.py --models bench/models/qwen2-0.5b --method widen --max-ram 1GiB [--repeat 1] [--no-drop-caches]

One run:
  (a) I/O floor: drop caches, read every input ``*.safetensors`` once (sequential, 16 MiB buffer), then write one
      file the size of the planned output with fsync, then delete it (the PEERS.md definition: read every input
      once + write the output once);
  (b) for each --method x --max-ram (x --repeat): drop caches, run ``streammerge merge ... -q --force`` under
      ``/usr/bin/time -v``; wall, user+sys CPU, peak RSS, plus RssAnon/RssFile sampled from /proc;
  (c) interpreter baseline: peak RSS of ``python -c "import streammerge.cli, torch"`` under ``/usr/bin/time -v``;
  (d) bytes read/written from ``streammerge plan --json`` (``bytes_read`` counts every pass);
  (e) with --mergekit: the same merge by ``mergekit-yaml`` (config from bench/mergekit_recipe.py), measured like (b)
      in the same round, for each method mergekit has.
Prints a Markdown table; writes bench/results/<UTC timestamp>-<shape>.{json,md} and bench/results/latest.md.
See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from mergekit_recipe import METHODS as MERGEKIT_METHODS
from mergekit_recipe import mergekit_yaml, safetensors_dtype

from streammerge.errors import StreamMergeError
from streammerge.units import parse_size as _parse_size

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MERGEKIT_AUTO = BENCH / ".mergekit-venv" / "bin" / "mergekit-yaml"
BUF = 16 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    """Bytes in ``text`` as streammerge reads them (its own parser: the same units, the same answers)."""
    try:
        return _parse_size(text, "size")
    except StreamMergeError as exc:
        raise SystemExit(str(exc)) from None


def human(n: float | None) -> str:
    if n is None:
        return "-"
    neg, n = n < 0, abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            s = f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
            return ("-" if neg else "") + s
        n /= 1024
    return str(n)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


class CacheDropper:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` when root and allowed; remembers why not otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.note = "" if enabled else "disabled by --no-drop-caches (warm or partly warm page cache)"
        if enabled and os.geteuid() != 0:
            self.enabled = False
            self.note = "not root: page cache NOT dropped (results may be warm-cache)"

    def drop(self) -> bool:
        os.sync()
        if not self.enabled:
            return False
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return True
        except OSError as exc:
            self.enabled = False
            self.note = f"cannot drop caches ({exc}); results may be warm-cache"
            log(self.note)
            return False


class MemoryCgroup:
    """A cgroup-v1 memory group under this process's own, with a hard limit; removed after use."""

    def __init__(self, limit: int) -> None:
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.split(":", 2)[1] == "memory")
        self.path = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"streammerge-bench-{os.getpid()}"
        self.path.mkdir()
        self.limit = limit
        (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def wrap(self, cmd: list[str]) -> list[str]:
        """The command, made to join the group first (exec keeps the pid, so time -v measures it)."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *cmd]

    def report(self) -> dict:
        read = lambda name: int((self.path / name).read_text().split()[0])  # noqa: E731
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"limit": self.limit, "max_usage": read("memory.max_usage_in_bytes"),
                "failcnt": read("memory.failcnt"), "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            log(f"could not remove {self.path}: {exc}")


def host_cpu_s() -> dict[str, float]:
    """This machine's CPU time since boot by state, all CPUs together, seconds (/proc/stat's ``cpu`` line):
    ``steal``, what the hypervisor gave other guests, and ``iowait``, idle with disk I/O outstanding; empty where
    the kernel does not report them. A run during which either grows by a good part of its wall time waited for
    another guest's CPU or for the disk: its timing is not a measure of the code."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        tick = os.sysconf("SC_CLK_TCK")
        return {"iowait": int(fields[5]) / tick, "steal": int(fields[8]) / tick}
    except (OSError, IndexError, ValueError):
        return {}


def stolen(r: dict, digits: int = 2) -> str:
    """A :func:`time_v` result's stolen and I/O-wait CPU seconds for a table (``stolen / iowait``), or '?' where
    unknown (no /proc, older JSON)."""
    if r.get("steal_s") is None:
        return "?"
    return f"{r['steal_s']:.{digits}f} / {r.get('iowait_s') or 0:.{digits}f}"


def time_v(cmd: list[str], sample: bool = False, env: dict | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; parse its report; optionally sample the child's /proc status."""
    time_bin = shutil.which("time", path="/usr/bin:/bin") or "/usr/bin/time"
    report_fd_r, report_fd_w = os.pipe()
    full = [time_bin, "-v", "-o", f"/dev/fd/{report_fd_w}", *cmd]
    host0 = host_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(report_fd_w,), env=env)
    os.close(report_fd_w)
    samples = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0, "VmHWM": 0, "n": 0}
    timeline: list[tuple[float, int, int]] = []  # (seconds, RssAnon, RssFile), about every 0.5 s
    stop = threading.Event()

    def sampler() -> None:
        child = None
        while not stop.is_set():
            try:
                if child is None:
                    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                    child = int(kids[0]) if kids else None
                if child is not None:
                    status = Path(f"/proc/{child}/status").read_text()
                    now: dict[str, int] = {}
                    for line in status.splitlines():
                        k, _, v = line.partition(":")
                        if k in samples:
                            now[k] = int(v.split()[0]) * 1024
                            samples[k] = max(samples[k], now[k])
                    samples["n"] += 1
                    t = time.perf_counter() - t0
                    if not timeline or t - timeline[-1][0] >= 0.5:
                        timeline.append((round(t, 2), now.get("RssAnon", 0), now.get("RssFile", 0)))
            except (OSError, ValueError, IndexError):
                pass
            stop.wait(0.02)

    th = threading.Thread(target=sampler, daemon=True)
    if sample:
        th.start()
    # Read the report pipe concurrently with the child's output pipes (avoid deadlock on big output).
    report_chunks: list[bytes] = []

    def read_report() -> None:
        with os.fdopen(report_fd_r, "rb") as fh:
            report_chunks.append(fh.read())

    rt = threading.Thread(target=read_report, daemon=True)
    rt.start()
    out, err = proc.communicate()
    wall_outer = time.perf_counter() - t0
    host1 = host_cpu_s()
    stop.set()
    if sample:
        th.join()
    rt.join()
    report = b"".join(report_chunks).decode(errors="replace")
    fields: dict[str, str] = {}
    for line in report.splitlines():
        k, sep, v = line.strip().rpartition(": ")
        if sep:
            fields[k.strip()] = v.strip()

    def num(key: str, cast=float):
        try:
            return cast(fields[key])
        except (KeyError, ValueError):
            return None

    wall = None
    if "Elapsed (wall clock) time (h:mm:ss or m:ss)" in fields:
        parts = [float(p) for p in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
        wall = 0.0
        for p in parts:
            wall = wall * 60 + p
        wall = round(wall, 2)
    user, sys_ = num("User time (seconds)"), num("System time (seconds)")
    res = {
        "cmd": cmd,
        "returncode": proc.returncode,
        "exit_status": num("Exit status", int),
        "signal": int(sig.group(1)) if (sig := re.search(r"terminated by signal (\d+)", report)) else None,
        "wall_s": wall,
        "wall_outer_s": round(wall_outer, 3),
        "user_s": user,
        "sys_s": sys_,
        "cpu_s": None if user is None or sys_ is None else round(user + sys_, 2),
        "cpu_percent": fields.get("Percent of CPU this job got"),
        "steal_s": round(host1["steal"] - host0["steal"], 2) if host0 and host1 else None,
        "iowait_s": round(host1["iowait"] - host0["iowait"], 2) if host0 and host1 else None,
        "peak_rss": None if num("Maximum resident set size (kbytes)", int) is None
        else num("Maximum resident set size (kbytes)", int) * 1024,
        "major_faults": num("Major (requiring I/O) page faults", int),
        "minor_faults": num("Minor (reclaiming a frame) page faults", int),
        "fs_inputs_bytes": None if num("File system inputs", int) is None else num("File system inputs", int) * 512,
        "fs_outputs_bytes": None if num("File system outputs", int) is None else num("File system outputs", int) * 512,
        "vol_ctx_switches": num("Voluntary context switches", int),
        "invol_ctx_switches": num("Involuntary context switches", int),
        "stdout_tail": out.decode(errors="replace")[-4000:],
        "stderr_tail": err.decode(errors="replace")[-4000:],
    }
    if sample:
        res["sampled"] = samples
        res["rss_timeline"] = timeline
    return res


def work_root(arg: Path | None) -> Path | None:
    """Where a warm-cache bench writes its outputs: ``--work`` (e.g. ``/dev/shm``: on tmpfs the figures leave out
    the disk's writes and fsyncs, which on a shared VM's disk vary by seconds from run to run), else
    ``bench/work/`` if it exists, else the system's temporary folder (None)."""
    if arg is not None:
        arg.mkdir(parents=True, exist_ok=True)
        return arg
    return BENCH / "work" if (BENCH / "work").is_dir() else None


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (``/proc/mounts``: the longest mount point above it), or '?'."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    real = str(path.resolve())
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else "?"


class StartUp:
    """The fixed cost of a merge, per build: merges of the embedded tiny example under :func:`time_v`, the quickest
    of all the rounds taken. Run rounds before and after the timed merges (e.g. three and two): a slow spell at
    either end then cannot make every compute time (wall − start-up) short, or long.

    ``builds``: label → (the words that start the ``streammerge`` CLI: its console script, or ``python -c ...``;
    the environment, None for this one's)."""

    def __init__(self, work: Path, builds: dict[str, tuple[list[str], dict | None]]) -> None:
        self.builds, self.work, self.tiny = builds, work, work / "tiny"
        self.runs: dict[str, list[dict]] = {label: [] for label in builds}
        if not self.tiny.is_dir():
            subprocess.run([sys.executable, "-c", "from streammerge.examples import write_family; "
                            f"write_family({str(self.tiny)!r})"], check=True)

    def round(self) -> None:
        """One merge of the tiny example per build; SystemExit with its stderr if one fails."""
        for label, (launcher, env) in self.builds.items():
            cmd = [*launcher, "merge", "--base", str(self.tiny / "base"), "--model", str(self.tiny / "chat"),
                   "--model", str(self.tiny / "multilingual"), "--out", str(self.work / "tiny-out"), "--force", "-q"]
            r = time_v(cmd, env=env)
            if r["returncode"] != 0:
                raise SystemExit(f"{' '.join(cmd)} failed: {r['stderr_tail']}")
            self.runs[label].append(r)

    def quickest(self, label: str) -> dict:
        """The :func:`time_v` record of the build's quickest tiny merge so far (KeyError before any round)."""
        if not self.runs[label]:
            raise KeyError(label)
        return min(self.runs[label], key=lambda r: r["wall_s"])

    def walls(self) -> dict[str, list[float]]:
        """Every tiny merge's wall seconds, per build, in run order."""
        return {label: [r["wall_s"] for r in runs] for label, runs in self.runs.items()}


def tree_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def rm_out(out: Path) -> None:
    for p in (out, out.with_name(out.name + ".streammerge-partial")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    for p in out.parent.glob(out.name + ".*"):  # any other leftovers next to the output
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def measure_merge(cmd: list[str], out: Path, dropper: CacheDropper, cgroup_limit: str | None, label: str) -> dict:
    """Drop caches, run one merge that writes ``out`` under time -v (in a memory cgroup when a limit is given).

    Returns the time -v fields plus ``ok``/``error``, load averages and the cgroup report; ``out`` is deleted
    before and after.
    """
    rm_out(out)
    row: dict = {"cache_dropped": dropper.drop(), "loadavg_before": loadavg()}
    log(f"  {label} (load {row['loadavg_before']})")
    cgroup = MemoryCgroup(parse_size(cgroup_limit)) if cgroup_limit else None
    try:
        res = time_v(cgroup.wrap(cmd) if cgroup else cmd, sample=True)
        if cgroup:
            row["cgroup"] = cgroup.report()
            log(f"  cgroup: {row['cgroup']}")
    finally:
        if cgroup:
            cgroup.remove()
    row["loadavg_after"] = loadavg()
    row.update(res)
    row["out_bytes_on_disk"] = tree_size(out)
    row["ok"] = res["returncode"] == 0 and out.is_dir()
    if not row["ok"]:
        row["error"] = (res["stderr_tail"] or res["stdout_tail"]).strip()[-2000:] or \
            f"exit status {res['returncode']}"
        log(f"  FAILED ({failure(row)}): {row['error'][-500:]}")
    else:
        log(f"  wall {res['wall_s']} s, cpu {res['cpu_s']} s, peak RSS {human(res['peak_rss'])}")
    rm_out(out)
    return row


def merge_report(stdout: str) -> dict:
    """The JSON line ``merge --json`` prints last (out, fingerprint, bytes_written; device and peak_vram on a GPU)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {}


def failure(row: dict) -> str:
    """Why a measured run failed, in a few words (a SIGKILL is usually the kernel's OOM killer)."""
    if (row.get("cgroup") or {}).get("oom_kills"):
        return "OOM-killed in the cgroup"
    if row.get("signal"):
        return f"killed by signal {row['signal']}" + (", OOM?" if row["signal"] == 9 else "")
    return f"exit {row.get('returncode')}"


# ----------------------------------------------------------------------------------------------- floor
def measure_floor(inputs: list[Path], out_bytes: int, work: Path, dropper: CacheDropper) -> dict:
    dropped = dropper.drop()
    buf = bytearray(BUF)
    view = memoryview(buf)
    total_read = 0
    t0 = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total_read += n
    t_read = time.perf_counter() - t0

    data = os.urandom(BUF)  # incompressible, in case the filesystem compresses
    target = work / "floor-write.bin"
    t1 = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = out_bytes
        while left > 0:
            left -= os.write(fd, data[: min(BUF, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    t_write = time.perf_counter() - t1
    target.unlink()
    return {
        "cache_dropped": dropped,
        "read_bytes": total_read,
        "read_s": round(t_read, 3),
        "read_MBps": round(total_read / t_read / 1e6, 1) if t_read else None,
        "write_bytes": out_bytes,
        "write_s": round(t_write, 3),
        "write_MBps": round(out_bytes / t_write / 1e6, 1) if t_write else None,
        "floor_s": round(t_read + t_write, 3),
    }


# ----------------------------------------------------------------------------------------------- machine
def machine(python: str, streammerge_bin: str, work: Path) -> dict:
    info: dict = {"nproc": os.cpu_count(), "platform": platform.platform(), "hostname": platform.node()}
    try:
        info["nproc_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal:", "MemAvailable:", "SwapTotal:")):
                k, v = line.split(":")
                info[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    try:
        models = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                  if l.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu_model"] = platform.processor()
    du = shutil.disk_usage(work)
    info["disk_free"] = du.free
    info["disk_total"] = du.total
    try:
        info["disk_device"] = subprocess.run(["df", "--output=source,fstype", str(work)], capture_output=True,
                                             text=True).stdout.strip().splitlines()[-1]
        info["disk_device"] = " ".join(info["disk_device"].split())
    except (OSError, IndexError):
        pass
    try:
        v = subprocess.run([python, "-c", "import sys, torch, streammerge; print(sys.version.split()[0]); "
                            "print(torch.__version__); print(torch.get_num_threads()); print(streammerge.__version__)"],
                           capture_output=True, text=True, check=True).stdout.split()
        info["python"], info["torch"], info["torch_threads"], info["streammerge"] = v[0], v[1], int(v[2]), v[3]
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError) as exc:
        info["python"] = f"? ({exc})"
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "streammerge"],
                               capture_output=True, text=True).stdout.strip()
        info["git_dirty_streammerge"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = "?"
    info["streammerge_bin"] = streammerge_bin
    return info


# ----------------------------------------------------------------------------------------------- mergekit
def find_mergekit(spec: str) -> tuple[str, str]:
    """The mergekit-yaml executable named by --mergekit (``auto``: bench/.mergekit-venv) and mergekit's version."""
    exe = MERGEKIT_AUTO if spec == "auto" else Path(shutil.which(spec) or spec)
    how = "install it as bench/README.md says (section 'mergekit side by side')"
    if not exe.exists():
        raise SystemExit(f"--mergekit {spec}: {exe} not found; {how}")
    py = exe.with_name("python")
    if not py.exists():
        return str(exe), "?"
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--mergekit {spec}: mergekit is not installed for {py}; {how}\n{r.stderr.strip()}")
    return str(exe), r.stdout.strip()


def method_params(params: list[str], method: str) -> dict[str, str]:
    """The --param values for ``method``: NAME=VALUE applies to every method, METHOD:NAME=VALUE (winning) to one."""
    res: dict[str, str] = {}
    for p in sorted(params, key=lambda p: ":" in p.partition("=")[0]):  # unscoped first, so scoped ones win
        name, sep, value = p.partition("=")
        scope, colon, name = name.rpartition(":")
        if not sep or not name:
            raise SystemExit(f"--param {p!r}: write NAME=VALUE or METHOD:NAME=VALUE")
        if not colon or scope == method:
            res[name] = value
    return res


def mergekit_setup(spec: str, methods: list[str], plans: dict, base: Path, variants: list[Path], params: list[str],
                   extra_args: list[str], mergekit_args: list[str]) -> dict:
    """Executable, version, flags and one YAML config per method mergekit can run; why not for the others."""
    exe, version = find_mergekit(spec)
    dtype, others = None, []
    for i, a in enumerate(extra_args):  # --dtype translates to out_dtype; nothing else does
        if a.startswith("--dtype="):
            dtype = a.split("=", 1)[1]
        elif a == "--dtype" and i + 1 < len(extra_args):
            dtype = extra_args[i + 1]
        elif i == 0 or extra_args[i - 1] != "--dtype":
            others.append(a)
    tokenizer = any((base / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    mk = {"bin": exe, "version": version, "configs": {}, "skipped": {}, "runs": [],
          "flags": ["--lazy-unpickle", "--quiet", *([] if tokenizer else ["--no-copy-tokenizer"]), *mergekit_args]}
    for method in methods:
        if method not in MERGEKIT_METHODS:
            mk["skipped"][method] = "no mergekit equivalent"
        elif others:
            mk["skipped"][method] = f"--extra-arg {' '.join(others)} has no mergekit equivalent"
        elif all("error" in plan for (m, _), plan in plans.items() if m == method):
            mk["skipped"][method] = "streammerge plan failed"
        else:
            try:
                mk["configs"][method] = mergekit_yaml(method, base, variants, method_params(params, method),
                                                      dtype or safetensors_dtype(base))
            except ValueError as exc:
                mk["skipped"][method] = str(exc)
    for method, why in mk["skipped"].items():
        log(f"mergekit: not running {method}: {why}")
    return mk


def run_mergekit(mk: dict, method: str, work: Path, dropper: CacheDropper, cgroup_limit: str | None) -> dict:
    """One mergekit-yaml merge, measured like a streammerge merge; its config and output are deleted after."""
    config, out = work / f"mergekit-{method}.yml", work / "mergekit-out"
    config.write_text(mk["configs"][method])
    try:
        return measure_merge([mk["bin"], str(config), str(out), *mk["flags"]], out, dropper, cgroup_limit,
                             f"mergekit {method}")
    finally:
        config.unlink()


def mergekit_run_for(mk: dict | None, row: dict) -> dict | None:
    """The mergekit run of the same method and round as a streammerge row."""
    return next((k for k in (mk or {}).get("runs", []) if (k["method"], k["round"]) == (row["method"], row["round"])),
                None)


# ----------------------------------------------------------------------------------------------- main
def discover(models: Path, names: list[str] | None) -> tuple[Path, list[Path], str]:
    base = models / "base"
    if not (base / "config.json").exists():
        raise SystemExit(f"{base} is not a model folder (run bench/make_models.py first)")
    marker = models / ".complete.json"
    shape = models.name
    if marker.exists():
        shape = json.loads(marker.read_text()).get("shape", shape)
    else:
        log(f"warning: {marker} missing: the family may be incomplete")
    if names:
        variants = [models / n for n in names]
    else:
        order = ["chat", "multilingual"]
        found = [p for p in models.iterdir() if p.is_dir() and p.name != "base" and (p / "config.json").exists()]
        variants = sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    if not variants:
        raise SystemExit(f"no variant models next to {base}")
    return base, variants, shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, required=True, help="family folder from make_models.py (base/, chat/, ...)")
    ap.add_argument("--model-name", action="append", dest="model_names",
                    help="variant subfolders to merge, in order (default: chat, multilingual, then others)")
    ap.add_argument("--method", action="append", dest="methods",
                    help="merge method; repeat (or comma-separate) for one table row each (default widen)")
    ap.add_argument("--max-ram", action="append", dest="max_rams",
                    help="--max-ram passed to streammerge; repeat (or comma-separate) for more rows (default 1GiB)")
    ap.add_argument("--param", action="append", default=[],
                    help="passed through as --param NAME=VALUE; METHOD:NAME=VALUE for one method only")
    ap.add_argument("--extra-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for plan and merge, repeatable, e.g. --extra-arg=--exclude=model\\.layers")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (method, max-ram); floor measured each round")
    ap.add_argument("--no-drop-caches", action="store_true", help="do not drop the page cache (warm-cache numbers)")
    ap.add_argument("--work", type=Path, default=BENCH / "work", help="scratch folder (default bench/work)")
    ap.add_argument("--results", type=Path, default=BENCH / "results", help="results folder (default bench/results)")
    ap.add_argument("--streammerge", default=None, help="streammerge executable (default: next to this python)")
    ap.add_argument("--python", default=sys.executable, help="python for the interpreter baseline")
    ap.add_argument("--note", default="", help="free text stored with the results")
    ap.add_argument("--cgroup-limit", default=None, metavar="SIZE",
                    help="run each merge inside a memory cgroup (v1) with this hard limit, the way a laptop with "
                         "little free RAM would (page cache included); needs root")
    ap.add_argument("--mergekit", default=None, metavar="PATH",
                    help="also run each method with this mergekit-yaml (auto: bench/.mergekit-venv/bin/mergekit-yaml) "
                         "in the same round, for a side-by-side table")
    ap.add_argument("--mergekit-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for mergekit-yaml, repeatable, e.g. --mergekit-arg=--out-shard-size=1B")
    args = ap.parse_args(argv)

    methods = [m for v in (args.methods or ["widen"]) for m in v.split(",") if m]
    max_rams = [m for v in (args.max_rams or ["1GiB"]) for m in v.split(",") if m]
    sm = args.streammerge or str(Path(args.python).with_name("streammerge"))
    if not Path(sm).exists():
        sm = shutil.which("streammerge") or sm
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is missing: apt-get install -y time")

    base, variants, shape = discover(args.models.resolve(), args.model_names)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    inputs = sorted(p for d in [base, *variants] for p in d.glob("*.safetensors"))
    input_bytes = sum(p.stat().st_size for p in inputs)
    dropper = CacheDropper(not args.no_drop_caches)
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    info = machine(args.python, sm, work)
    log(f"{shape}: {len(inputs)} input file(s), {human(input_bytes)}; methods {methods}; max-ram {max_rams}")

    def merge_args(method: str, max_ram: str) -> list[str]:
        a = ["--base", str(base)]
        for v in variants:
            a += ["--model", str(v)]
        a += ["--method", method, "--max-ram", max_ram, "--out", str(out)]
        for name, value in method_params(args.param, method).items():
            a += ["--param", f"{name}={value}"]
        return a + list(args.extra_arg)

    # Plans (no tensor data read): bytes read/written, predicted buffers.
    plans: dict[tuple[str, str], dict] = {}
    for method in methods:
        for mr in max_rams:
            r = subprocess.run([sm, "plan", *merge_args(method, mr), "--json"], capture_output=True, text=True)
            if r.returncode != 0:
                plans[(method, mr)] = {"error": (r.stderr or r.stdout).strip()[-2000:]}
                log(f"plan {method} {mr} failed: {plans[(method, mr)]['error']}")
            else:
                d = json.loads(r.stdout)
                plans[(method, mr)] = {k: d[k] for k in ("bytes_read", "bytes_written", "predicted_peak_ram",
                                                         "params", "rules", "budget")}
                plans[(method, mr)]["passes_over_input"] = round(d["bytes_read"] / input_bytes, 3)
                plans[(method, mr)]["shards"] = len(d["shards"])
    out_bytes = next((p["bytes_written"] for p in plans.values() if "bytes_written" in p),
                     sum(p.stat().st_size for p in base.glob("*.safetensors")))
    mk = mergekit_setup(args.mergekit, methods, plans, base, variants, args.param, args.extra_arg,
                        args.mergekit_arg) if args.mergekit else None

    floors: list[dict] = []
    rows: list[dict] = []
    for rep in range(args.repeat):
        log(f"round {rep + 1}/{args.repeat}: I/O floor (read {human(input_bytes)}, write {human(out_bytes)})")
        rm_out(out)
        fl = measure_floor(inputs, out_bytes, work, dropper)
        fl["round"] = rep + 1
        floors.append(fl)
        log(f"  floor {fl['floor_s']} s (read {fl['read_s']} s @ {fl['read_MBps']} MB/s, "
            f"write+fsync {fl['write_s']} s @ {fl['write_MBps']} MB/s)")
        for method in methods:
            for mr in max_rams:
                plan = plans[(method, mr)]
                row = {"round": rep + 1, "method": method, "max_ram": mr, "max_ram_bytes": parse_size(mr),
                       "plan": plan, "floor_s": fl["floor_s"]}
                if "error" in plan:
                    row.update(ok=False, error="plan failed: " + plan["error"])
                    rows.append(row)
                    continue
                cmd = [sm, "merge", *merge_args(method, mr), "--json", "--force"]
                row.update(measure_merge(cmd, out, dropper, args.cgroup_limit, f"merge {method} --max-ram {mr}"))
                row["report"] = merge_report(row.get("stdout_tail") or "")
                if row["report"].get("peak_vram") is not None:
                    log(f"  device {row['report'].get('device')}, peak VRAM {human(row['report']['peak_vram'])}")
                rows.append(row)
            if mk and method in mk["configs"]:
                mk["runs"].append({"round": rep + 1, "method": method, "floor_s": fl["floor_s"],
                                   **run_mergekit(mk, method, work, dropper, args.cgroup_limit)})

    # Interpreter baseline (warm cache: this is about RSS, not time).
    log("interpreter baseline: python -c 'import streammerge.cli, torch' (cold cache, then warm)")
    dropper.drop()
    bl_cold = time_v([args.python, "-c", "import streammerge.cli, torch"])
    bl = time_v([args.python, "-c", "import streammerge.cli, torch; import time; time.sleep(0.3)"], sample=True)
    baseline = bl["peak_rss"]
    for row in [*rows, *(mk or {}).get("runs", [])]:
        if row.get("wall_s") and row.get("floor_s"):
            row["wall_over_floor"] = round(row["wall_s"] / row["floor_s"], 2)
    for row in rows:
        k = mergekit_run_for(mk, row)
        if k and k.get("ok") and row.get("ok") and row.get("wall_s"):
            row["mergekit_wall_s"] = k["wall_s"]
            row["mergekit_over_streammerge"] = round(k["wall_s"] / row["wall_s"], 2)
        if row.get("peak_rss") is not None and baseline is not None:
            row["baseline_rss"] = baseline
            row["peak_minus_baseline"] = row["peak_rss"] - baseline
            row["within_budget"] = row["peak_minus_baseline"] <= row["max_ram_bytes"]
            s = row.get("sampled") or {}
            # RssAnon is the memory the process really owns; RssFile is mapped file pages (reclaimable).
            b_anon = (bl.get("sampled") or {}).get("RssAnon")
            row["anon_peak_minus_baseline_anon"] = s["RssAnon"] - b_anon if s.get("n") and b_anon else None
        if row.get("wall_s") and row.get("plan", {}).get("bytes_read"):
            row["read_MBps_effective"] = round(row["plan"]["bytes_read"] / row["wall_s"] / 1e6, 1)

    result = {
        "started_utc": started, "finished_utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "shape": shape, "models_dir": str(args.models), "base": str(base), "models": [str(v) for v in variants],
        "input_files": [str(p) for p in inputs], "input_bytes": input_bytes, "output_bytes": out_bytes,
        "params": args.param, "extra_args": args.extra_arg, "cache_note": dropper.note or "page cache dropped before floor and each merge",
        "machine": info, "baseline": {**{k: bl[k] for k in ("wall_s", "cpu_s", "peak_rss", "returncode")},
                     "rss_anon": (bl.get("sampled") or {}).get("RssAnon"),
                     "cold_wall_s": bl_cold["wall_s"], "cold_peak_rss": bl_cold["peak_rss"]},
        "floors": floors, "runs": rows, "mergekit": mk, "note": args.note, "argv": sys.argv,
    }
    md = render_md(result)
    print(md)
    stem = f"{started}-{shape}"
    (args.results / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.results / f"{stem}.md").write_text(md)
    (args.results / "latest.md").write_text(md)
    log(f"wrote {args.results / (stem + '.json')}, {stem}.md and latest.md")
    return 0 if all(r.get("ok") for r in rows) else 1


def render_md(r: dict) -> str:
    m = r["machine"]
    L = [f"# streammerge benchmark: {r['shape']} ({r['started_utc']})", ""]
    L.append(f"- inputs: base + {len(r['models'])} model(s), {len(r['input_files'])} safetensors file(s), "
             f"{human(r['input_bytes'])} ({r['input_bytes']:,} B); output {human(r['output_bytes'])}")
    L.append(f"- page cache: {r['cache_note']}")
    L.append(f"- machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), RAM {human(m.get('MemTotal'))} "
             f"(available at start {human(m.get('MemAvailable'))}, swap {human(m.get('SwapTotal'))}), "
             f"disk free {human(m.get('disk_free'))} of {human(m.get('disk_total'))} ({m.get('disk_device', '?')})")
    L.append(f"- software: python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} threads), "
             f"streammerge {m.get('streammerge')}, git {m.get('git_commit')}"
             + (" (+ uncommitted changes in streammerge/)" if m.get("git_dirty_streammerge") else ""))
    b = r["baseline"]
    L.append(f"- interpreter baseline (`import streammerge.cli, torch`): peak RSS {human(b['peak_rss'])} "
             f"(RssAnon {human(b.get('rss_anon'))}), "
             f"import takes {b.get('cold_wall_s')} s cold cache, {b['wall_s']} s warm (the merge's wall includes a cold-cache start)")
    if r.get("params"):
        L.append(f"- params: {' '.join(r['params'])}")
    if r.get("extra_args"):
        L.append(f"- extra arguments: `{' '.join(r['extra_args'])}`")
    if r.get("note"):
        L.append(f"- note: {r['note']}")
    L.append("")
    gpu = any((row.get("report") or {}).get("peak_vram") is not None for row in r["runs"])
    L.append("| method | max-ram | wall s | CPU s | peak RSS | baseline RSS | peak−baseline | within budget | "
             "floor s | wall/floor |" + (" device | peak VRAM |" if gpu else ""))
    L.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else ""))
    for row in r["runs"]:
        if not row.get("ok"):
            L.append(f"| {row['method']} | {row['max_ram']} | FAILED | {row.get('cpu_s', '-')} | "
                     f"{human(row.get('peak_rss'))} | {human(row.get('baseline_rss'))} | "
                     f"{human(row.get('peak_minus_baseline'))} | "
                     f"{'-' if row.get('within_budget') is None else ('yes' if row['within_budget'] else '**no**')} | "
                     f"{row.get('floor_s')} | - |" + (" - | - |" if gpu else ""))
            continue
        L.append(f"| {row['method']} | {row['max_ram']} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | "
                 f"{human(row['peak_rss'])} | {human(row.get('baseline_rss'))} | "
                 f"{human(row.get('peak_minus_baseline'))} | "
                 f"{'yes' if row.get('within_budget') else '**no**'} | {row['floor_s']:.2f} | "
                 f"{row.get('wall_over_floor', '-')} |" + (vram_cells(row) if gpu else ""))
    L += render_mergekit(r)
    L.append("")
    L.append("Details per run:")
    L.append("")
    L.append("| method | max-ram | round | predicted buffers | RssAnon peak | RssAnon peak − baseline RssAnon | RssFile peak | bytes read (plan) | "
             "passes | bytes written | disk reads (time -v) | major faults | CPU % | load before→after |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in r["runs"]:
        p = row.get("plan", {})
        s = row.get("sampled") or {}
        L.append(f"| {row['method']} | {row['max_ram']} | {row['round']} | {human(p.get('predicted_peak_ram'))} | "
                 f"{human(s.get('RssAnon')) if s.get('n') else '-'} | {human(row.get('anon_peak_minus_baseline_anon'))} | "
                 f"{human(s.get('RssFile')) if s.get('n') else '-'} | "
                 f"{human(p.get('bytes_read'))} | {p.get('passes_over_input', '-')} | {human(p.get('bytes_written'))} | "
                 f"{human(row.get('fs_inputs_bytes'))} | {row.get('major_faults', '-')} | {row.get('cpu_percent', '-')} | "
                 f"{row.get('loadavg_before', ['-'])[0]}→{row.get('loadavg_after', ['-'])[0]} |")
    L.append("")
    L.append("I/O floor:")
    L.append("")
    L.append("| round | cache dropped | read | read s | read MB/s | write+fsync | write s | write MB/s | floor s |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for f in r["floors"]:
        L.append(f"| {f['round']} | {'yes' if f['cache_dropped'] else 'no'} | {human(f['read_bytes'])} | {f['read_s']} | "
                 f"{f['read_MBps']} | {human(f['write_bytes'])} | {f['write_s']} | {f['write_MBps']} | {f['floor_s']} |")
    errs = [(f"{row['method']} --max-ram {row['max_ram']} (round {row['round']}, exit {row.get('returncode')})",
             row.get("error", "")) for row in r["runs"] if not row.get("ok")]
    errs += [(f"mergekit {k['method']} (round {k['round']}, {failure(k)})", k.get("error", ""))
             for k in (r.get("mergekit") or {}).get("runs", []) if not k.get("ok")]
    if errs:
        L.append("")
        L.append("Failures:")
        for title, error in errs:
            L += ["", f"- {title}:", "", "```", error.strip(), "```"]
    L.append("")
    return "\n".join(L)


def vram_cells(row: dict) -> str:
    """Device and peak VRAM (torch's allocator, CUDA context not included) from the merge's JSON report."""
    rep = row.get("report") or {}
    return f" {rep.get('device', 'cpu')} | {human(rep.get('peak_vram')) if rep.get('peak_vram') is not None else '-'} |"


def render_mergekit(r: dict) -> list[str]:
    """The side-by-side table: each streammerge row next to mergekit's run of the same method and round."""
    mk = r.get("mergekit")
    if not mk:
        return []
    L = ["", f"mergekit side by side: mergekit {mk['version']} (`{mk['bin']}`, flags `{' '.join(mk['flags'])}`), same "
             "inputs, float32 arithmetic as in streammerge (`dtype: float32`, config in the JSON), page cache handled "
             "as for streammerge:", "",
         "| method | max-ram | round | streammerge wall s | mergekit wall s | mergekit CPU s | mergekit peak RSS | "
         "mergekit wall/floor | speedup (mergekit/streammerge) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for row in r["runs"]:
        k = mergekit_run_for(mk, row)
        if k is None:
            continue
        sm_wall = f"{row['wall_s']:.2f}" if row.get("ok") else "FAILED"
        mk_wall = f"{k['wall_s']:.2f}" if k.get("ok") else f"FAILED ({failure(k)}) after {k.get('wall_s')} s"
        L.append(f"| {row['method']} | {row['max_ram']} | {row['round']} | {sm_wall} | {mk_wall} | "
                 f"{k.get('cpu_s', '-')} | {human(k.get('peak_rss'))} | "
                 f"{k.get('wall_over_floor', '-') if k.get('ok') else '-'} | {row.get('mergekit_over_streammerge', '-')} |")
    if mk["skipped"]:
        L += ["", *(f"- {method}: not run with mergekit ({why})" for method, why in mk["skipped"].items())]
    return L


if __name__ == "__main__":
    sys.exit(main())
