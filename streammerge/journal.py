"""The journal: what is durable in a work folder, so an interrupted merge continues where it stopped.

Layout of ``<out>.streammerge-partial/``::

    plan.json       the recipe and the fingerprint document of the run (written once, atomically)
    journal.jsonl   one JSON line per durable fact, appended and fsynced in groups
    state/          per-tensor statistics (safetensors files, never pickles)
    model/          the output folder being filled; renamed to <out> when complete

A chunk line ``{"t": name, "r0", "r1", "crc", "cur"}`` is appended only after the chunk's bytes were fsynced
(group commit: the shard files are fdatasynced, then the pending lines are appended and the journal fsynced).
Rows of a tensor are written in order, so what is done is a prefix ``[0, rows_done)``; ``crc`` is the running
CRC-32 of the tensor's bytes up to ``r1`` (so the final value does not depend on the chunking), ``cur`` the
method's emit cursor after the chunk (e.g. TIES's tie counters). ``{"t": name, "truncate": k}`` forgets chunks
from index k on (their bytes did not verify). A stats line ``{"s": name, "file"}`` records that the tensor's
statistics state is durable. A torn last line (crash mid-append) is cut off before anything is appended.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import StreamMergeError
from .output import fsync_path

#: group-commit thresholds: pending bytes, or seconds since the last commit
COMMIT_BYTES = 256 * 1024 * 1024
COMMIT_SECONDS = 2.0


class ResumeError(StreamMergeError):
    """A work folder exists but cannot be continued (changed inputs or options, damaged journal)."""


def crc(data: bytes | memoryview, running: int = 0) -> int:
    """CRC-32 of ``data``, continuing ``running`` (the CRC of the bytes before it)."""
    return zlib.crc32(data, running) & 0xFFFFFFFF


@dataclass
class TensorProgress:
    """What the journal says about one tensor."""

    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (r0, r1, running crc), a prefix of the rows
    cursors: list[dict[str, Any]] = field(default_factory=list)  # the emit cursor after each chunk
    state_file: str | None = None

    @property
    def rows_done(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0

    @property
    def cursor(self) -> dict[str, Any]:
        return self.cursors[-1] if self.cursors else {}

    @property
    def crc(self) -> int:
        """Running CRC of the tensor's bytes written so far."""
        return self.chunks[-1][2] if self.chunks else 0

    def add(self, r0: int, r1: int, checksum: int, cursor: dict[str, Any]) -> None:
        self.chunks.append((r0, r1, checksum))
        self.cursors.append(cursor)

    def keep(self, count: int) -> None:
        del self.chunks[count:]
        del self.cursors[count:]


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class Journal:
    """Appends durable facts for one work folder and answers what is already done."""

    def __init__(self, work: Path, enabled: bool = True) -> None:
        self.work = work
        self.enabled = enabled
        self.path = work / "journal.jsonl"
        self.progress: dict[str, TensorProgress] = {}
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._last_commit = time.monotonic()
        self._sync_fds: list[int] = []
        self._worker: threading.Thread | None = None  # the commit in flight
        self._error: BaseException | None = None
        if self.path.exists():
            self._load()

    # ---- reading -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn final line from a crash mid-append: cut it off before appending more
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
            data = data[:end]
        for i, raw in enumerate(data.split(b"\n")):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
                self._apply(entry)
            except (ValueError, KeyError, TypeError):
                raise ResumeError(f"{self.path}: line {i + 1} is damaged; start over with --restart") from None

    def _apply(self, entry: dict[str, Any]) -> None:
        if "t" in entry:
            p = self.progress.setdefault(entry["t"], TensorProgress())
            if "truncate" in entry:
                p.keep(entry["truncate"])
            elif entry["r0"] == p.rows_done:  # ignore anything that is not the next prefix chunk
                p.add(entry["r0"], entry["r1"], entry["crc"], entry.get("cur", {}))
        elif "s" in entry:
            self.progress.setdefault(entry["s"], TensorProgress()).state_file = entry["file"]

    def get(self, name: str) -> TensorProgress:
        return self.progress.get(name, TensorProgress())

    def truncate(self, name: str, keep_chunks: int) -> None:
        """Forget chunks of ``name`` from index ``keep_chunks`` on (their bytes did not verify)."""
        p = self.progress.get(name)
        if p is not None and len(p.chunks) > keep_chunks:
            p.keep(keep_chunks)
            self._append({"t": name, "truncate": keep_chunks})

    # ---- writing -------------------------------------------------------------------------------------------
    def watch_fd(self, fd: int) -> None:
        """A shard file descriptor to fdatasync before each commit."""
        self._sync_fds.append(fd)

    def unwatch_fd(self, fd: int) -> None:
        if fd in self._sync_fds:
            self._sync_fds.remove(fd)

    def record_chunk(self, name: str, r0: int, r1: int, checksum: int, cursor: dict[str, Any], nbytes: int) -> None:
        self.progress.setdefault(name, TensorProgress()).add(r0, r1, checksum, cursor)
        if not self.enabled:
            return
        self._pending.append(json.dumps({"t": name, "r0": r0, "r1": r1, "crc": checksum, "cur": cursor}))
        self._pending_bytes += nbytes
        if self._pending_bytes >= COMMIT_BYTES or time.monotonic() - self._last_commit >= COMMIT_SECONDS:
            self.commit()

    def save_state(self, name: str, index: int, state: dict[str, torch.Tensor]) -> None:
        """Persist a tensor's statistics (durably) and journal it."""
        if not self.enabled or not state:
            return
        folder = self.work / "state"
        folder.mkdir(exist_ok=True)
        fname = f"{index:06d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / fname))
        fsync_path(folder / fname)
        self.progress.setdefault(name, TensorProgress()).state_file = fname
        self._pending.append(json.dumps({"s": name, "file": fname}))
        self.commit()

    def load_state(self, name: str) -> dict[str, torch.Tensor] | None:
        f = self.get(name).state_file
        if f is None:
            return None
        try:
            return load_file(str(self.work / "state" / f))
        except Exception:  # a damaged state file: recompute the statistics
            return None

    def commit(self, wait: bool = False) -> None:
        """Make the shard bytes written so far durable, then the pending journal lines.

        The fdatasyncs and the append run on a background thread (one commit in flight at a time) so the merge
        goes on computing while the disk catches up; ``wait`` (or :meth:`flush`) blocks until it is done.
        """
        self._join()
        self._last_commit = time.monotonic()
        if not self.enabled or not self._pending:
            return
        lines, fds = self._pending, list(self._sync_fds)
        self._pending, self._pending_bytes = [], 0

        def work() -> None:
            try:
                for fd in fds:
                    os.fdatasync(fd)
                self._append_lines(lines)
            except BaseException as exc:  # reported by the next commit or flush
                self._error = exc

        if wait:
            work()
            self._join()
        else:
            self._worker = threading.Thread(target=work, name="streammerge-commit", daemon=True)
            self._worker.start()

    def flush(self) -> None:
        """Commit everything pending and wait until it is durable."""
        self.commit(wait=True)

    def close(self) -> None:
        """Wait for a commit in flight, dropping its error (for cleanup after another failure)."""
        try:
            self._join()
        except BaseException:
            pass

    def _join(self) -> None:
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def _append(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            self._join()
            self._append_lines([json.dumps(entry)])

    def _append_lines(self, lines: list[str]) -> None:
        with open(self.path, "ab") as f:
            f.write(("\n".join(lines) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
