"""The memory budget a merge must stay within, from the user's flags and what the machine has free.

"Free" is the smaller of what psutil reports available and what the memory cgroup this process runs in (and
every cgroup above it) still allows, so a merge started inside a container or a ``systemd-run -p MemoryMax=``
scope plans for the limit it will actually meet.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from .errors import StreamMergeError
from .units import format_size, parse_size

#: Share of available RAM used when the user sets no --max-ram.
DEFAULT_RAM_FRACTION = 0.5
_UNLIMITED = 1 << 60


#: Share of the free GPU memory used when the user sets no --max-vram.
DEFAULT_VRAM_FRACTION = 0.8


@dataclass(frozen=True)
class Budget:
    """Bytes of RAM the merge's buffers may use (beyond the interpreter's own baseline) and where that came from;
    the device the arithmetic runs on and, for a GPU, the bytes of GPU memory its tensors may use."""

    max_ram: int
    source: str
    device: str = "cpu"
    max_vram: int | None = None
    vram_source: str = ""
    device_source: str = ""  # why this device, e.g. "--device auto: no CUDA device"
    note: str = ""  # what the user should know (a --max-ram above the RAM available was capped)
    threads: int = 1  # CPU threads the merge may keep busy (--threads, else the cores this process may use)
    threads_source: str = ""  # where ``threads`` came from

    def describe(self) -> str:
        vram = f", {format_size(self.max_vram)} GPU memory ({self.vram_source})" if self.max_vram else ""
        return f"{format_size(self.max_ram)} RAM ({self.source}), device {self.device}{vram}, {self.threads} thread(s)"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the memory cgroups of this process still allow (limit − usage, smallest up the tree), or None.

    Handles cgroup v2 (``memory.max`` / ``memory.current``) and v1 (``memory.limit_in_bytes`` /
    ``memory.usage_in_bytes``).
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if "memory" in controllers.split(","):
            candidates.append((root / "memory" / rel.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"))
        elif controllers == "":
            base = root / "unified" if (root / "unified").is_dir() else root
            candidates.append((base / rel.lstrip("/"), "memory.max", "memory.current"))
    best: int | None = None
    for group, limit_name, usage_name in candidates:
        node = group
        while True:
            limit, usage = _read_int(node / limit_name), _read_int(node / usage_name)
            if limit is not None and usage is not None and limit < _UNLIMITED:
                room = max(0, limit - usage)
                best = room if best is None else min(best, room)
            if node == root or node.parent == node or root not in node.parents:
                break
            node = node.parent
    return best


def usable_cores(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """How many CPUs this process may keep busy, and why: the CPUs its affinity mask allows (``taskset``, a
    container's cpuset), capped by the CPU bandwidth quota of its cgroups and every cgroup above them (cgroup v2
    ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of 1.5 CPUs allows 2, rounded up)."""
    try:
        cores, why = len(os.sched_getaffinity(0)), "CPUs in this process's affinity mask"
    except (AttributeError, OSError):  # not Linux
        cores, why = os.cpu_count() or 1, "CPUs"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # v2
            node, v1 = (root / "unified" if (root / "unified").is_dir() else root) / rel.lstrip("/"), False
        elif "cpu" in controllers.split(","):
            node, v1 = root / controllers / rel.lstrip("/"), True
        else:
            continue
        while root in node.parents or node == root:
            quota = _cpu_quota(node, v1)
            if quota is not None and quota < cores:
                cores, why = quota, "CPUs of its cgroup's CPU quota"
            node = node.parent
    return max(1, cores), why


def _cpu_quota(group: Path, v1: bool) -> int | None:
    """CPUs a cgroup's bandwidth limit allows (rounded up), or None where it sets none."""
    try:
        if v1:
            quota, period = (group / "cpu.cfs_quota_us").read_text(), (group / "cpu.cfs_period_us").read_text()
        else:
            quota, period = (group / "cpu.max").read_text().split()[:2]
        if quota.strip() == "max" or int(quota) < 0:
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def resolve_threads(threads: int | str | None) -> tuple[int, str]:
    """``--threads`` (a positive whole number), else ``OMP_NUM_THREADS`` where it is set, else the CPUs this
    process may use (:func:`usable_cores`); with where the figure came from. Raises :class:`~streammerge.errors.StreamMergeError` for any other value."""
    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp.isdigit() and int(omp) >= 1:  # set by a job scheduler (Ray, Slurm scripts) or the user
            return int(omp), "OMP_NUM_THREADS"
        cores, why = usable_cores()
        return cores, f"the {why}"
    text = str(threads).strip()
    if isinstance(threads, bool) or not text.isdigit() or int(text) < 1:
        raise StreamMergeError(f"--threads must be a positive whole number, got {threads!r}")
    return int(text), "--threads"


def gpu_driver_present() -> bool:
    """Whether this machine may have a CUDA (or ROCm) GPU, from the driver's files, without importing torch: Linux
    with an NVIDIA or AMD GPU driver loaded. macOS and machines without those files have none torch could use."""
    if sys.platform != "linux":
        return False
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def make_budget(max_ram: str | int | None = None, device: str | None = "cpu",
                max_vram: str | int | None = None, threads: int | str | None = None) -> Budget:
    """``--max-ram`` if given, else half of the RAM available now (within any memory cgroup limit); the device
    ``--device`` resolves to, and for a GPU ``--max-vram`` if given, else 80% of its free memory; ``--threads``
    if given, else the CPUs this process may use (:func:`usable_cores`). Raises
    :class:`~streammerge.errors.StreamMergeError` for a malformed ``--threads`` or size."""
    n_threads, threads_source = resolve_threads(threads)
    spec = (device or "auto").strip().lower()
    if spec == "cpu" or (spec == "auto" and not gpu_driver_present()):
        where_to, why = "cpu", "--device cpu" if spec == "cpu" else "--device auto: no CUDA device"
    else:  # asking torch takes seconds: only where a GPU may be
        from ._torch import import_torch
        from .device import resolve_device

        torch = import_torch()

        resolved = resolve_device(device)
        where_to = str(resolved)
        why = f"--device {spec}"
        if spec == "auto":
            why = "--device auto: " + (f"CUDA device {torch.cuda.get_device_name(resolved)}"
                                       if resolved.type == "cuda" else "no CUDA device")
    available = psutil.virtual_memory().available
    where = "available"
    headroom = cgroup_headroom()
    if headroom is not None and headroom < available:
        available, where = headroom, "left under the memory cgroup limit"
    note = ""
    if max_ram is not None:
        ram, source = parse_size(max_ram, "--max-ram"), "--max-ram"
        if ram > available:
            note = (f"--max-ram {format_size(ram)} is more than the {format_size(available)} of RAM {where}; "
                    f"using {format_size(available)}")
            ram, source = available, f"--max-ram, capped to the RAM {where}"
    else:
        ram, source = int(available * DEFAULT_RAM_FRACTION), f"{DEFAULT_RAM_FRACTION:.0%} of {format_size(available)} {where}"
    if not where_to.startswith("cuda"):
        if max_vram is not None:
            parse_size(max_vram, "--max-vram")  # still reject a malformed value
            note = "; ".join(filter(None, [note, f"--max-vram is not used: the merge runs on the CPU ({why})"]))
        return Budget(ram, source, "cpu", device_source=why, note=note, threads=n_threads,
                      threads_source=threads_source)
    if max_vram is not None:
        vram, vram_source = parse_size(max_vram, "--max-vram"), "--max-vram"
    else:
        from .device import free_vram

        free = free_vram(where_to)
        vram, vram_source = int(free * DEFAULT_VRAM_FRACTION), f"{DEFAULT_VRAM_FRACTION:.0%} of {format_size(free)} free"
    return Budget(ram, source, where_to, vram, vram_source, why, note, n_threads, threads_source)
