"""Every write streammerge makes to disk goes through here: positioned writes, preallocation, fsyncs of files and
folders, atomic replacement, renames and deletions.

One owner for durability keeps the rules in one place:

- data is made durable with :func:`sync_data` (``fdatasync`` on Linux; ``fsync`` with ``F_FULLFSYNC`` on macOS,
  where ``fsync`` alone does not reach the platter and there is no ``fdatasync``);
- a new or renamed entry is durable only once its folder is synced (:func:`sync_dir`), so every helper that
  creates or renames says whether it syncs the folder;
- output files are preallocated (``posix_fallocate`` where the platform has it), so a full disk shows up when the
  file is created rather than in the middle of a merge.

Supported platforms are Linux and macOS; :func:`check_platform` refuses others (Windows has no ``pread``/``pwrite``
and cannot fsync a folder) before anything is written.

The primitive operations go through a replaceable :data:`backend` object, so a test can record every write and
sync and rebuild the disk as a power cut would leave it (``tests/powerloss.py``). Reads are not recorded.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import StreamMergeError

#: bytes per read when copying a file
COPY_BLOCK = 1 << 20
_HAS_PREADV = hasattr(os, "preadv")


class PlatformError(StreamMergeError):
    """streammerge cannot run safely on this operating system."""


def check_platform(platform: str | None = None) -> None:
    """Refuse platforms whose file APIs cannot give streammerge's guarantees (positioned I/O, folder fsync)."""
    platform = sys.platform if platform is None else platform
    if platform.startswith("linux") or platform == "darwin":
        return
    raise PlatformError(
        f"streammerge runs on Linux and macOS, not on {platform}: it needs positioned reads and writes and "
        "fsync of folders to make a merge resumable after a crash. On Windows, run it inside WSL2 "
        "(https://learn.microsoft.com/windows/wsl/) with the models on the WSL file system"
    )


def choose_sync(os_module: Any = os, platform: str | None = None,
                fcntl_module: Any = None) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """(sync_data, sync_file) for this platform: ``fdatasync``/``fsync`` on Linux; on macOS ``fcntl(F_FULLFSYNC)``
    for both (falling back to ``fsync`` where the file system refuses it)."""
    platform = sys.platform if platform is None else platform
    if platform == "darwin":
        if fcntl_module is None:
            import fcntl as fcntl_module  # noqa: PLC0415 (POSIX only)
        full = getattr(fcntl_module, "F_FULLFSYNC", None)

        def full_sync(fd: int) -> None:
            if full is not None:
                try:
                    fcntl_module.fcntl(fd, full)
                    return
                except OSError:  # e.g. a network file system: plain fsync is the best there is
                    pass
            os_module.fsync(fd)

        return full_sync, full_sync
    data = getattr(os_module, "fdatasync", None) or os_module.fsync
    return data, os_module.fsync


class RealBackend:
    """The primitive operations, done for real. A recording test backend wraps one of these."""

    def __init__(self) -> None:
        self.sync_data, self.sync_file = choose_sync()

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def allocate(self, fd: int, size: int) -> None:
        """Reserve blocks for ``size`` bytes (the file is already ``size`` long)."""
        if not hasattr(os, "posix_fallocate") or size == 0:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            # EOPNOTSUPP / EINVAL: a file system without preallocation; the file stays sparse

    def fsync_data(self, fd: int) -> None:
        self.sync_data(fd)

    def fsync(self, fd: int) -> None:
        self.sync_file(fd)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.sync_file(fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)


#: the backend every helper below uses (tests swap in a recorder)
backend: Any = RealBackend()


# ---- files ------------------------------------------------------------------------------------------------------
def open_file(path: Path, create: bool = False, truncate: bool = False) -> int:
    """A read-write descriptor for ``path`` (created if ``create``, emptied if ``truncate``)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0) | (os.O_TRUNC if truncate else 0)
    return backend.open(str(path), flags)


def close(fd: int) -> None:
    backend.close(fd)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data).cast("B")
    while view:
        n = backend.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` with the bytes at ``offset`` (``preadv`` into it where the platform has it); returns how many
    were read, fewer than ``len(view)`` only at the end of the file."""
    done = 0
    while done < len(view):
        if _HAS_PREADV:
            n = os.preadv(fd, [view[done:]], offset + done)
        else:
            piece = os.pread(fd, len(view) - done, offset + done)
            n = len(piece)
            view[done : done + n] = piece
        if n <= 0:
            break
        done += n
    return done


def size_file(fd: int, size: int) -> None:
    """Set the file's length to ``size`` and reserve its blocks (``ENOSPC`` now rather than mid-merge)."""
    backend.truncate(fd, size)
    backend.allocate(fd, size)


def sync_data(fd: int) -> None:
    """Make the file's data (and size) durable."""
    backend.fsync_data(fd)


def drop_cached(fd: int) -> None:
    """Let the kernel drop the file's cached pages that are already on disk (``posix_fadvise(POSIX_FADV_DONTNEED)``;
    a hint: nothing where the platform lacks it, and no error).

    The journal calls it on the output shards after each group commit's :func:`sync_data`. The output then holds at
    most the pages written since the last commit instead of filling the page cache, so it does not push out the
    inputs that the next passes read again, and the next writes get recently freed pages. On a virtual machine whose
    memory balloon reports free pages to the host, that is the difference between 2.5 and 0.2 s of CPU per GiB
    written (``bench/page_cost.py``): a page the host has taken back faults in the hypervisor when touched again.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def sync_file(fd: int) -> None:
    """Make the file's data and metadata durable."""
    backend.fsync(fd)


def sync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new files, renames, removals) durable."""
    backend.sync_dir(str(path))


def _write_synced(path: Path, data: bytes, truncate: bool, sync_folder: bool) -> None:
    """Write ``data`` at the start of an emptied ``path`` (``truncate``) or at its end, fsync it, and with
    ``sync_folder`` its folder entry too."""
    fd = open_file(path, create=True, truncate=truncate)
    try:
        pwrite_all(fd, data, 0 if truncate else os.fstat(fd).st_size)
        sync_file(fd)
    finally:
        close(fd)
    if sync_folder:
        sync_dir(path.parent)


def write_file(path: Path, data: bytes, sync_folder: bool = False) -> None:
    """Create (or replace the contents of) ``path`` with ``data`` and fsync it; with ``sync_folder`` its entry too."""
    _write_synced(path, data, truncate=True, sync_folder=sync_folder)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a synced temporary file renamed over it, then the folder synced.
    After a crash ``path`` holds either the old or the new contents, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    write_file(tmp, data)
    backend.replace(str(tmp), str(path))
    sync_dir(path.parent)


def append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync it; a new file's folder entry is synced too."""
    _write_synced(path, data, truncate=False, sync_folder=not path.exists())


def cut(path: Path, size: int) -> None:
    """Shorten ``path`` to ``size`` bytes, durably (a torn journal line)."""
    fd = open_file(path)
    try:
        backend.truncate(fd, size)
        sync_file(fd)
    finally:
        close(fd)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new ``dst`` and fsync it (the folder is not synced)."""
    fd = open_file(dst, create=True, truncate=True)
    try:
        with open(src, "rb") as f:
            at = 0
            while block := f.read(COPY_BLOCK):
                pwrite_all(fd, block, at)
                at += len(block)
        sync_file(fd)
    finally:
        close(fd)


# ---- folders ----------------------------------------------------------------------------------------------------
def make_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents, syncing each parent whose entries changed."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        backend.mkdir(str(d))
        sync_dir(d.parent)


def rename(src: Path, dst: Path, sync_folders: Iterable[Path] = ()) -> None:
    """Rename ``src`` to ``dst`` (which must not be a non-empty folder), then sync ``sync_folders``."""
    backend.rename(str(src), str(dst))
    for d in sync_folders:
        sync_dir(d)


def remove_tree(path: Path) -> None:
    """Delete ``path`` (a file or a folder with everything in it); missing is fine."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                backend.unlink(os.path.join(root, name))
            for name in dirs:
                full = os.path.join(root, name)
                if os.path.islink(full):
                    backend.unlink(full)
                else:
                    backend.rmdir(full)
        backend.rmdir(str(path))
    else:
        backend.unlink(str(path))


def parent_of(path: Path) -> Path:
    """The folder holding ``path`` (``.`` for a bare name)."""
    return path.parent if str(path.parent) else Path(".")
