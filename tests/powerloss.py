"""A power cut, simulated: record every write and sync a merge makes, then rebuild the disk as a crash at any
point of that record could leave it.

:class:`Recorder` is an ``fsio`` backend that performs every operation for real and logs it (one lock keeps the
log in the order the operations happened, across the reader, writer and commit threads). :class:`Disk` replays a
prefix of the log on a model of a POSIX file system:

- a file's data (and size) becomes durable only when the file is fsynced (``fsync``/``fdatasync``);
- a folder's entries (created, renamed, removed names) become durable only when the folder is fsynced;
- what was not synced may be lost, partly written or kept.

:meth:`Disk.materialize` writes one possible post-crash state into a real folder, under one of these models:

=========  ===========================================  ===============================================
variant    folder entries                               file contents
=========  ===========================================  ===============================================
durable    as of each folder's last fsync               as of each file's last fsync
meta       every change (metadata survived)             as of each file's last fsync (data lost)
zeroed     as of each folder's last fsync               unsynced writes read back as zeros, sizes kept
subset     every change                                 a random subset of unsynced writes survives, the
                                                        last one possibly torn
=========  ===========================================  ===============================================
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VARIANTS = ("durable", "meta", "zeroed", "subset")


class Recorder:
    """An fsio backend that does everything for real and logs each mutation (paths relative to ``root``)."""

    def __init__(self, real: Any, root: Path) -> None:
        self.real = real
        self.root = str(root.resolve())
        self.ops: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _rel(self, path: str) -> str:
        full = os.path.abspath(path)
        if not (full == self.root or full.startswith(self.root + os.sep)):
            raise AssertionError(f"a write outside the recorded folder: {full}")
        return os.path.relpath(full, self.root)

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        with self._lock:
            fd = self.real.open(path, flags, mode)
            self.ops.append(("open", fd, self._rel(path), bool(flags & os.O_CREAT), bool(flags & os.O_TRUNC)))
            return fd

    def close(self, fd: int) -> None:
        with self._lock:
            self.real.close(fd)
            self.ops.append(("close", fd))

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        with self._lock:
            n = self.real.pwrite(fd, data, offset)
            self.ops.append(("write", fd, offset, bytes(data[:n])))
            return n

    def truncate(self, fd: int, size: int) -> None:
        with self._lock:
            self.real.truncate(fd, size)
            self.ops.append(("truncate", fd, size))

    def allocate(self, fd: int, size: int) -> None:
        with self._lock:
            self.real.allocate(fd, size)
            self.ops.append(("allocate", fd, size))

    def fsync_data(self, fd: int) -> None:
        with self._lock:
            self.real.fsync_data(fd)
            self.ops.append(("sync", fd))

    def fsync(self, fd: int) -> None:
        with self._lock:
            self.real.fsync(fd)
            self.ops.append(("sync", fd))

    def sync_dir(self, path: str) -> None:
        with self._lock:
            self.real.sync_dir(path)
            self.ops.append(("syncdir", self._rel(path)))

    def rename(self, src: str, dst: str) -> None:
        with self._lock:
            self.real.rename(src, dst)
            self.ops.append(("rename", self._rel(src), self._rel(dst)))

    def replace(self, src: str, dst: str) -> None:
        with self._lock:
            self.real.replace(src, dst)
            self.ops.append(("rename", self._rel(src), self._rel(dst)))

    def mkdir(self, path: str) -> None:
        with self._lock:
            self.real.mkdir(path)
            self.ops.append(("mkdir", self._rel(path)))

    def unlink(self, path: str) -> None:
        with self._lock:
            self.real.unlink(path)
            self.ops.append(("unlink", self._rel(path)))

    def rmdir(self, path: str) -> None:
        with self._lock:
            self.real.rmdir(path)
            self.ops.append(("unlink", self._rel(path)))


@dataclass(eq=False)
class Node:
    """A file or folder of the model file system."""

    is_dir: bool
    data: bytearray = field(default_factory=bytearray)  # what the running system sees
    durable: bytes = b""  # what survives a crash (as of the last fsync)
    pending: list[tuple[Any, ...]] = field(default_factory=list)  # unsynced writes/truncations, in order
    entries: dict[str, Node] = field(default_factory=dict)  # folder: names the running system sees
    durable_entries: dict[str, Node] = field(default_factory=dict)  # folder: names as of its last fsync
    promised: bytes = b""  # a file: contents a crash cannot take (synced while its name was durable too)


def _resize(buf: bytearray, size: int) -> None:
    if size < len(buf):
        del buf[size:]
    else:
        buf.extend(bytes(size - len(buf)))


def _apply(buf: bytearray, op: tuple[Any, ...], zero: bool = False, torn: int | None = None) -> None:
    if op[0] == "write":
        _, offset, data = op
        if torn is not None:
            data = data[:torn]
        if zero:
            data = bytes(len(data))
        if offset + len(data) > len(buf):
            _resize(buf, offset + len(data))
        buf[offset : offset + len(data)] = data
    elif op[0] == "size":
        _resize(buf, op[1])
    elif op[0] == "grow":
        if op[1] > len(buf):
            _resize(buf, op[1])


class Disk:
    """The model file system after replaying ``ops`` (a prefix of a recording) onto an empty root folder."""

    def __init__(self, ops: list[tuple[Any, ...]]) -> None:
        self.root = Node(True)
        fds: dict[int, Node] = {}
        for op in ops:
            kind = op[0]
            if kind == "open":
                _, fd, path, create, trunc = op
                parent, name = self._parent(path)
                node = parent.entries.get(name)
                if node is None:
                    assert create, f"open of missing {path}"
                    node = parent.entries[name] = Node(False)
                if trunc:
                    node.data = bytearray()
                    node.pending.append(("size", 0))
                fds[fd] = node
            elif kind == "close":
                fds.pop(op[1], None)
            elif kind == "write":
                node = fds[op[1]]
                _apply(node.data, ("write", op[2], op[3]))
                node.pending.append(("write", op[2], op[3]))
            elif kind == "truncate":
                node = fds[op[1]]
                _resize(node.data, op[2])
                node.pending.append(("size", op[2]))
            elif kind == "allocate":
                node = fds[op[1]]
                _apply(node.data, ("grow", op[2]))
                node.pending.append(("grow", op[2]))
            elif kind == "sync":
                node = fds[op[1]]
                node.durable, node.pending = bytes(node.data), []
                if self._durably_named(node):
                    node.promised = node.durable
            elif kind == "syncdir":
                node = self._lookup(op[1])
                node.durable_entries = dict(node.entries)
                self._promise_reachable(self.root)
            elif kind == "rename":
                sp, sn = self._parent(op[1])
                dp, dn = self._parent(op[2])
                dp.entries[dn] = sp.entries.pop(sn)
            elif kind == "mkdir":
                parent, name = self._parent(op[1])
                parent.entries[name] = Node(True)
            elif kind == "unlink":
                parent, name = self._parent(op[1])
                del parent.entries[name]
            else:
                raise AssertionError(f"unknown operation {kind}")
        self.root.durable_entries = dict(self.root.entries)  # the recorded folder itself existed before
        self._promise_reachable(self.root)

    def _durably_named(self, target: Node, folder: Node | None = None) -> bool:
        """Whether ``target`` can be reached from the root through folder entries that are all durable."""
        folder = folder or self.root
        for node in folder.durable_entries.values():
            if node is target or (node.is_dir and self._durably_named(target, node)):
                return True
        return False

    def _promise_reachable(self, folder: Node) -> None:
        """Files reachable through durable entries now keep their synced contents."""
        for node in folder.durable_entries.values():
            if node.is_dir:
                self._promise_reachable(node)
            else:
                node.promised = node.durable

    def _lookup(self, path: str) -> Node:
        node = self.root
        for part in Path(path).parts:
            if part == ".":
                continue
            node = node.entries[part]
        return node

    def _parent(self, path: str) -> tuple[Node, str]:
        p = Path(path)
        return self._lookup(str(p.parent)), p.name

    def file(self, path: str) -> Node | None:
        """The file at ``path`` as the running system sees it (None if there is none)."""
        try:
            node = self._lookup(path)
        except KeyError:
            return None
        return None if node.is_dir else node

    def materialize(self, target: Path, variant: str, rng: random.Random) -> None:
        """Write the post-crash state under ``variant`` (see the module docstring) into the folder ``target``."""
        assert variant in VARIANTS, variant
        target.mkdir(parents=True, exist_ok=True)
        self._write(self.root, target, variant, rng)

    def _write(self, folder: Node, path: Path, variant: str, rng: random.Random) -> None:
        entries = folder.entries if variant in ("meta", "subset") else folder.durable_entries
        for name, node in sorted(entries.items()):
            if node.is_dir:
                (path / name).mkdir()
                self._write(node, path / name, variant, rng)
                continue
            content = bytearray(node.durable)
            if variant == "zeroed":
                for op in node.pending:
                    _apply(content, op, zero=True)
            elif variant == "subset":
                kept = [op for op in node.pending if rng.random() < 0.5]
                for i, op in enumerate(kept):
                    torn = None
                    if i == len(kept) - 1 and op[0] == "write" and rng.random() < 0.5:
                        torn = rng.randrange(len(op[2]) + 1)
                    _apply(content, op, torn=torn)
            (path / name).write_bytes(bytes(content))
