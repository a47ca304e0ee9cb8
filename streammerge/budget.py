"""The memory budget a merge must stay within, from the user's flags and what the machine has free."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from .units import format_size, parse_size

#: Share of currently available RAM used when the user sets no --max-ram.
DEFAULT_RAM_FRACTION = 0.5


@dataclass(frozen=True)
class Budget:
    """Bytes of RAM the merge's buffers may use (beyond the interpreter's own baseline) and where that came from."""

    max_ram: int
    source: str
    device: str = "cpu"

    def describe(self) -> str:
        return f"{format_size(self.max_ram)} RAM ({self.source}), device {self.device}"


def make_budget(max_ram: str | int | None = None) -> Budget:
    """``--max-ram`` if given, else half of the RAM psutil reports available now."""
    if max_ram is not None:
        return Budget(parse_size(max_ram, "--max-ram"), "--max-ram")
    available = psutil.virtual_memory().available
    return Budget(int(available * DEFAULT_RAM_FRACTION), f"{DEFAULT_RAM_FRACTION:.0%} of {format_size(available)} available")
