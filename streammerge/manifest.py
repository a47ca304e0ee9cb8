"""The manifest of a finished output: ``streammerge-manifest.json``, with every tensor's CRC-32.

Written last into the output folder, read by ``streammerge verify`` and by a rerun that finds the output already
published. Deliberately light (no torch): ``verify`` imports only this, the header parser and the index format.
"""

from __future__ import annotations

try:  # ISA-L's CRC-32 (the fast extra): the same checksum as zlib's, about 7x faster (16 vs 2.2 GB/s, bench/kernels.py)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32

MANIFEST = "streammerge-manifest.json"


def crc(data: bytes | memoryview, running: int = 0) -> int:
    """CRC-32 of ``data``, continuing ``running`` (the CRC of the bytes before it)."""
    return _crc32(data, running) & 0xFFFFFFFF
