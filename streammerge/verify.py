"""``streammerge verify OUT``: check a finished output folder against the manifest written when it was finalized.

Every shard header is re-parsed with the hardened parser, the tensors and the index must cover exactly the
planned tensors with the planned dtypes and shapes, and every tensor's bytes must match the CRC-32 recorded
when it was written. Problems are reported per tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import HeaderError, InputError
from .formats.checkpoint import INDEX_FILE
from .formats.safetensors_header import read_header
from .manifest import MANIFEST, crc


def verify_output(folder: str | Path) -> tuple[list[str], dict[str, Any]]:
    """(problems, summary) for the output folder; no problems means every byte checked out."""
    root = Path(folder)
    path = root / MANIFEST
    if not root.is_dir():
        raise InputError(f"{root} does not exist" if not root.exists() else f"{root} is not a folder")
    if not path.is_file():
        raise InputError(f"{root} has no {MANIFEST}: not a finished streammerge output")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        tensors: dict[str, Any] = manifest["tensors"]
        files: dict[str, int] = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is damaged: {exc}") from None
    problems: list[str] = []
    headers = {}
    for name, size in files.items():
        f = root / name
        if not f.is_file():
            problems.append(f"{name}: missing")
            continue
        if f.stat().st_size != size:
            problems.append(f"{name}: {f.stat().st_size} bytes, expected {size}")
        try:
            headers[name] = read_header(f)
        except HeaderError as exc:
            problems.append(f"{name}: {exc}")
    if len(files) > 1:
        try:
            wmap = json.loads((root / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{INDEX_FILE}: unreadable ({exc})")
            wmap = {}
        if wmap and wmap != {n: t["file"] for n, t in tensors.items()}:
            problems.append(f"{INDEX_FILE}: weight_map does not match the planned tensors and shards")
    for file_name, header in headers.items():
        planned = {n for n, t in tensors.items() if t["file"] == file_name}
        extra = sorted(set(header.tensors) - planned)
        if extra:
            problems.append(f"{file_name}: unexpected tensors {', '.join(extra[:5])}")
    checked = 0
    for name, t in tensors.items():
        header = headers.get(t["file"])
        if header is None:
            continue
        info = header.tensors.get(name)
        if info is None:
            problems.append(f"{name}: missing from {t['file']}")
            continue
        if info.dtype.name != t["dtype"] or list(info.shape) != t["shape"]:
            problems.append(f"{name}: {info.dtype.name} {list(info.shape)}, expected {t['dtype']} {t['shape']}")
            continue
        running = 0
        with open(header.path, "rb") as fh:
            fh.seek(info.begin)
            left = info.nbytes
            while left:
                piece = fh.read(min(left, 16 << 20))
                if not piece:
                    break
                running = crc(piece, running)
                left -= len(piece)
        if left or running != t["crc32"]:
            problems.append(f"{name}: checksum mismatch (the bytes differ from those written)")
        checked += 1
    return problems, {"folder": str(root), "files": len(files), "tensors": checked, "fingerprint": manifest.get("fingerprint")}
