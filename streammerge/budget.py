"""The memory budget a merge must stay within, from the user's flags and what the machine has free.

"Free" is the smaller of what psutil reports available and what the memory cgroup this process runs in (and
every cgroup above it) still allows, so a merge started inside a container or a ``systemd-run -p MemoryMax=``
scope plans for the limit it will actually meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

from .units import format_size, parse_size

#: Share of available RAM used when the user sets no --max-ram.
DEFAULT_RAM_FRACTION = 0.5
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Budget:
    """Bytes of RAM the merge's buffers may use (beyond the interpreter's own baseline) and where that came from."""

    max_ram: int
    source: str
    device: str = "cpu"

    def describe(self) -> str:
        return f"{format_size(self.max_ram)} RAM ({self.source}), device {self.device}"


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


def make_budget(max_ram: str | int | None = None) -> Budget:
    """``--max-ram`` if given, else half of the RAM available now (within any memory cgroup limit)."""
    if max_ram is not None:
        return Budget(parse_size(max_ram, "--max-ram"), "--max-ram")
    available = psutil.virtual_memory().available
    where = "available"
    headroom = cgroup_headroom()
    if headroom is not None and headroom < available:
        available, where = headroom, "left under the memory cgroup limit"
    return Budget(int(available * DEFAULT_RAM_FRACTION), f"{DEFAULT_RAM_FRACTION:.0%} of {format_size(available)} {where}")
