"""The manifest of a finished output: ``streammerge-manifest.json``, with every tensor's CRC-32.

Written last into the output folder, read by ``streammerge verify`` and by a rerun that finds the output already
published. Deliberately light (no torch): ``verify`` imports only this, the header parser and the index format.
"""

from __future__ import annotations

import zlib

MANIFEST = "streammerge-manifest.json"


def crc(data: bytes | memoryview, running: int = 0) -> int:
    """CRC-32 of ``data``, continuing ``running`` (the CRC of the bytes before it)."""
    return zlib.crc32(data, running) & 0xFFFFFFFF
