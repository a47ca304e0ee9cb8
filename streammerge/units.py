"""Byte sizes as people write them: ``512MiB``, ``6GiB``, ``5GB``, ``1.5G``, ``4096B`` (a unit is required in text;
an ``int`` is bytes)."""

from __future__ import annotations

import math
import re

from .errors import StreamMergeError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, option: str = "size") -> int:
    """Bytes in ``text``: KB/MB/GB are powers of 1000, KiB/MiB/GiB (and bare K/M/G) powers of 1024.

    ``option`` names the flag in error messages (e.g. ``--max-ram``).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise StreamMergeError(f"{option}: cannot read size {text!r}: write e.g. 512MiB, 6GiB or 5GB")
        number = float(m.group(1))
        if not unit:  # "4" could mean bytes, MiB or GiB: say which (an int from Python is bytes)
            raise StreamMergeError(f"{option}: {text!r} has no unit: write it, e.g. {m.group(1)}GiB, {m.group(1)}GB "
                                   f"or {m.group(1)}MiB, or {m.group(1)}B for bytes")
        value = int(number * _UNITS[unit])
    if value <= 0:
        raise StreamMergeError(f"{option}: size must be positive, got {text!r}")
    return value


def format_size(n: float, up: bool = False) -> str:
    """``1536 -> '1.5 KiB'``; with ``up``, rounded up (a minimum quoted this way is enough)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if up else n:.0f} {unit}"
            return f"{math.ceil(n * 10) / 10 if up else n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
