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
from index k on (their bytes did not verify, or the tensor must be redone). A stats line ``{"s": name, "file",
"crc", "bytes"}`` records that the tensor's statistics are durable in ``state/<file>`` with that CRC-32 and size
(``"file": null`` forgets them). An input line ``{"i": name, "rows", "crc"}`` records the CRC-32s of the input
bytes of rows [0, rows) the tensor's work used (per source, per byte range; :mod:`streammerge.inputsums`); the
last one counts, ``"crc": null`` forgets it, and a journal without any (an older one) has none recorded. A torn
last line (crash mid-append) is cut off before anything is appended.

Order is what makes the journal honest: a chunk line is appended only after its bytes were synced, a stats line
only after its file and the ``state/`` folder entry were synced, so every line that survives a power cut
describes bytes that survived it too; an input line is queued before the work done with those rows. All writes go
through :mod:`streammerge.fsio`.

Several writer threads (one per compute worker, each writing its own tensors' chunks in row order) share one
journal: a thread queues a chunk's line only after its ``pwrite`` returned, and a commit takes the lines queued so
far (under the lock) before it syncs the shard files, so every line of a batch describes bytes that were in the
page cache before the sync that makes them durable, whichever thread wrote them.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from . import fsio
from ._torch import torch
from .errors import StreamMergeError
from .inputsums import InputSums
from .manifest import crc

#: group-commit thresholds: pending bytes, or seconds since the last commit
COMMIT_BYTES = 256 * 1024 * 1024
COMMIT_SECONDS = 2.0
#: seconds the commit thread waits idle for the next batch before it exits
COMMIT_LINGER = 5.0


class ResumeError(StreamMergeError):
    """A work folder exists but cannot be continued (changed inputs or options, damaged journal)."""


@dataclass
class TensorProgress:
    """What the journal says about one tensor."""

    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # (r0, r1, running crc), a prefix of the rows
    cursors: list[dict[str, Any]] = field(default_factory=list)  # the emit cursor after each chunk
    state_file: str | None = None
    state_crc: int | None = None
    state_bytes: int | None = None
    inputs: InputSums | None = None  # checksums of the input bytes its work used

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
    """Replace ``path`` with ``obj`` as JSON, atomically and durably."""
    fsio.write_file_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8"))


class Journal:
    """Appends durable facts for one work folder and answers what is already done."""

    def __init__(self, work: Path, enabled: bool = True, read_only: bool = False) -> None:
        self.work = work
        self.read_only = read_only  # only look (``streammerge plan``): a torn last line is skipped, not cut
        self.enabled = enabled
        self.path = work / "journal.jsonl"
        self.progress: dict[str, TensorProgress] = {}
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._last_commit = time.monotonic()
        self._sync_fds: list[int] = []
        # the commit thread and its queue: batches of (lines, shard fds) made durable one at a time, in order
        self._lock = threading.Condition()
        self._batches: list[tuple[list[str], list[int]]] = []
        self._busy = False  # a batch is being synced and appended
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None  # a failed batch's, raised by every commit after it
        self._state_folder_lock = threading.Lock()  # the writers of several workers may save the first statistics
        if self.path.exists():
            self._load()

    # ---- reading -------------------------------------------------------------------------------------------
    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn final line from a crash mid-append: cut it off before appending more
            if not self.read_only:
                fsio.cut(self.path, end)
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
            p = self.progress.setdefault(entry["s"], TensorProgress())
            p.state_file, p.state_crc, p.state_bytes = entry["file"], entry.get("crc"), entry.get("bytes")
        elif "i" in entry:
            p = self.progress.setdefault(entry["i"], TensorProgress())
            p.inputs = None if entry["crc"] is None else InputSums.from_json(entry)

    def get(self, name: str) -> TensorProgress:
        return self.progress.get(name, TensorProgress())

    def truncate(self, name: str, keep_chunks: int) -> None:
        """Forget chunks of ``name`` from index ``keep_chunks`` on (their bytes did not verify)."""
        p = self.progress.get(name)
        if p is not None and len(p.chunks) > keep_chunks:
            p.keep(keep_chunks)
            self._append({"t": name, "truncate": keep_chunks})

    def reset(self, names: list[str]) -> None:
        """Forget everything about ``names`` (chunks and statistics), durably: they will be redone."""
        entries: list[dict[str, Any]] = []
        for name in names:
            p = self.progress.pop(name, None)
            if p is not None and p.chunks:
                entries.append({"t": name, "truncate": 0})
            if p is not None and p.state_file:
                entries.append({"s": name, "file": None})
            if p is not None and p.inputs is not None:
                entries.append({"i": name, "crc": None})
        if entries and self.enabled:
            self._join()
            self._append_lines([json.dumps(e) for e in entries])

    # ---- writing -------------------------------------------------------------------------------------------
    def watch_fd(self, fd: int) -> None:
        """A shard file descriptor to fdatasync before each commit."""
        self._sync_fds.append(fd)

    def unwatch_fd(self, fd: int) -> None:
        if fd in self._sync_fds:
            self._sync_fds.remove(fd)

    def record_chunk(self, name: str, r0: int, r1: int, checksum: int, cursor: dict[str, Any], nbytes: int) -> None:
        """Queue the line of ``name``'s rows [r0, r1), whose bytes were written (durable at the next commit, which
        this starts when enough bytes or seconds have passed since the last)."""
        self.progress.setdefault(name, TensorProgress()).add(r0, r1, checksum, cursor)
        if not self.enabled:
            return
        line = json.dumps({"t": name, "r0": r0, "r1": r1, "crc": checksum, "cur": cursor})
        with self._lock:  # (several writer threads queue lines)
            self._pending.append(line)
            self._pending_bytes += nbytes
            due = self._pending_bytes >= COMMIT_BYTES or time.monotonic() - self._last_commit >= COMMIT_SECONDS
        if due and not self._committing():  # else the lines wait for the next chunk after that commit is done
            self.commit()

    def record_inputs(self, name: str, sums: InputSums) -> None:
        """Journal the checksums of the input bytes ``name``'s work uses (durable at the next commit)."""
        self.progress.setdefault(name, TensorProgress()).inputs = sums
        if self.enabled:
            line = json.dumps({"i": name, **sums.to_json()})
            with self._lock:
                self._pending.append(line)

    def save_state(self, name: str, index: int, state: dict[str, torch.Tensor]) -> None:
        """Persist a tensor's statistics durably (file, then its folder entry), then journal them with their CRC."""
        if not self.enabled or not state:
            return
        folder = self.work / "state"
        with self._state_folder_lock:
            if not folder.is_dir():
                fsio.make_dirs(folder)
        fname = f"{index:06d}.safetensors"
        from safetensors.torch import save as save_safetensors  # imports torch: only where tensors are saved

        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
        fsio.write_file(folder / fname, data, sync_folder=True)
        p = self.progress.setdefault(name, TensorProgress())
        p.state_file, p.state_crc, p.state_bytes = fname, crc(data), len(data)
        line = json.dumps({"s": name, "file": fname, "crc": p.state_crc, "bytes": len(data)})
        with self._lock:
            self._pending.append(line)
        self.commit()

    def load_state(self, name: str) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """(the statistics journaled for ``name``, None) if they load and match their CRC; (None, why not) if they
        were journaled but cannot be used; (None, None) if there are none."""
        p = self.get(name)
        if p.state_file is None:
            return None, None
        path = self.work / "state" / p.state_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            return None, f"{path} cannot be read ({exc.strerror or exc})"
        if p.state_bytes is not None and len(data) != p.state_bytes:
            return None, f"{path} has {len(data)} bytes, {p.state_bytes} were written"
        if p.state_crc is not None and crc(data) != p.state_crc:
            return None, f"{path} does not match the checksum written with it (damaged)"
        try:
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            return None, f"{path} is not a readable safetensors file ({exc})"
        if not state:
            return None, f"{path} holds no statistics"
        return state, None

    def commit(self, wait: bool = False) -> None:
        """Make the shard bytes written so far durable, then the pending journal lines.

        The fdatasyncs and the append run on the journal's commit thread, one batch at a time in the order they
        were asked for (commits asked for while one is in flight make one batch, one sync), so the merge goes on
        computing (and the writer writing) while the disk catches up; ``wait`` (or :meth:`flush`) blocks until
        everything asked for is done. A failed batch drops the batches queued behind it (their lines may describe
        bytes that were not synced) and is raised by every later call that commits or waits for the commits (this
        one, :meth:`flush`, :meth:`truncate`, :meth:`reset`), before it takes any pending line: the journal ends
        with the last batch that was durable.

        One long-lived thread, not one per commit: a commit per finished tensor (~300 for a 0.5B model) started a
        thread each, and ``Thread.start`` waits for the new thread to take the GIL, which beside busy compute
        workers cost the writer thread 0.6 s, and joining the previous commit 0.4 s more (py-spy, 2-thread WIDEN),
        while the workers waited 1.6 s for output buffers."""
        with self._lock:  # (the failure check and the queueing under one lock: no batch slips in behind a failure)
            self._raise()
            self._last_commit = time.monotonic()
            if self.enabled and self._pending:
                lines, fds, nbytes = self._pending, list(self._sync_fds), self._pending_bytes
                if self._batches:  # one waiting behind the batch in flight: these lines go with it (one sync)
                    waiting, synced = self._batches[-1]
                    waiting.extend(lines)
                    synced.extend(fd for fd in fds if fd not in synced)
                else:
                    self._batches.append((lines, fds))
                self._pending, self._pending_bytes = [], 0
                if self._thread is None:  # (no thread: nothing was queued before this batch)
                    thread = threading.Thread(target=self._commit_loop, name="streammerge-commit", daemon=True)
                    self._stopping = False
                    try:
                        thread.start()
                    except BaseException:  # e.g. no thread can be started: the lines stay pending, nothing queued
                        self._batches.clear()
                        self._pending, self._pending_bytes = lines, nbytes
                        raise
                    self._thread = thread
                self._lock.notify_all()
        if wait:
            self._join()

    def _commit_loop(self) -> None:
        """The commit thread: sync and append each queued batch in order; exits when :meth:`close` asks, or after
        :data:`COMMIT_LINGER` idle seconds (a later commit starts it again)."""
        while True:
            with self._lock:
                while not self._batches and not self._stopping:
                    if not self._lock.wait(COMMIT_LINGER) and not self._batches:
                        break
                if not self._batches:
                    self._thread = None
                    self._lock.notify_all()
                    return
                lines, fds = self._batches.pop(0)
                self._busy = True
            failed: BaseException | None = None
            try:
                self._sync_data(fds)
                self._append_lines(lines)
            except BaseException as exc:  # reported by the next commit or flush
                failed = exc
            with self._lock:
                self._busy = False
                if failed is not None:
                    self._error = failed
                    self._batches.clear()
                self._lock.notify_all()

    def flush(self) -> None:
        """Commit everything pending and wait until it is durable."""
        self.commit(wait=True)

    def close(self) -> None:
        """Wait for the commits in flight and stop the commit thread, dropping an error (for cleanup after another
        failure)."""
        try:
            self._join()
        except BaseException:
            pass
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _committing(self) -> bool:
        """Whether a commit is still in flight (queued, or its syncs or append not done)."""
        with self._lock:
            return bool(self._batches) or self._busy

    def _join(self) -> None:
        """Wait until every queued batch is durable; raise a failed one's error."""
        with self._lock:
            while self._batches or self._busy:
                self._lock.wait()
        self._raise()

    @property
    def failed(self) -> BaseException | None:
        """A failed batch's error (its sync or append), or None."""
        with self._lock:
            return self._error

    def _raise(self) -> None:
        """Raise a failed batch's error, at every call after it: after a failed fdatasync the kernel may have dropped
        the unsynced pages and a later sync of the same file reports success, so no line may be appended after it
        (every worker's writer commits; each must stop, not only the one that was told first)."""
        with self._lock:
            exc = self._error
        if exc is not None:
            raise exc

    def _append(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            self._join()
            self._append_lines([json.dumps(entry)])

    @staticmethod
    def _sync_data(fds: list[int]) -> None:
        """Make the shard bytes written so far durable (before the lines that describe them are appended)."""
        for fd in fds:
            fsio.sync_data(fd)
            fsio.drop_cached(fd)  # those bytes are on disk: their pages can serve the writes to come

    def _append_lines(self, lines: list[str]) -> None:
        fsio.append(self.path, ("\n".join(lines) + "\n").encode())
