"""Who uses a work folder: one lock per folder, taken the same way by every writer.

A folder's lock is an ``flock`` on a regular file in it (:data:`LOCK_FILE`), opened for writing: network file
systems that emulate ``flock`` with byte-range locks (NFS, Lustre) refuse it on a folder or on a file opened
read-only. A one-process merge, ``make-example``, each ``--part`` and ``finalize`` all lock this way (exclusive, or
shared while parts share a work folder), so they exclude each other on any file system that locks at all. Where it
cannot, :class:`LockUnsupportedError` says so and what to do, rather than calling the folder busy. The holder writes
its pid and host into :data:`OWNER` for the messages of those it turns away.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from . import fsio
from .errors import StreamMergeError

#: the file whose flock marks who uses a folder
LOCK_FILE = "lock"
#: the file naming the process that holds a folder's lock
OWNER = "owner"
#: flock's errnos for "another process holds it" (EACCES where flock is emulated with fcntl locks)
_HELD_ELSEWHERE = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


class LockUnsupportedError(StreamMergeError):
    """The file system of a work folder cannot lock files (an NFS mount without lock support, ...)."""


def _cannot_lock(path: Path, exc: OSError) -> LockUnsupportedError:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return LockUnsupportedError(
        f"cannot lock {path}: the file system it is on refused to lock a file ({name}: {exc.strerror or exc}), and "
        "streammerge needs file locks so that two runs never write one output at once (and, for a merge in parts, "
        "finalize never publishes a part still being written). Mount that file system with lock support (NFS: "
        "without the nolock option, with rpc.statd running on every machine for NFSv3, or NFSv4; Lustre: the flock "
        "mount option; NFS's local_lock=flock locks within each machine only, so then never start one part on two "
        "machines), or give --out on a local disk and copy the published output to the shared storage")


def _open(folder: Path, create: bool) -> int | None:
    """A read-write descriptor of ``folder``'s lock file (None if it does not exist and not ``create``)."""
    path = folder / LOCK_FILE
    try:  # through fsio (as every file of a work folder is: the power-loss harness sees it)
        return fsio.backend.open(str(path), os.O_RDWR | (os.O_CREAT if create else 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT and not create:
            return None
        raise StreamMergeError(f"cannot open the lock file {path} for writing ({exc.strerror or exc}): a merge needs "
                               "a work folder it can write in; choose another --out") from None


def _flock(fd: int, mode: int, path: Path) -> bool:
    """flock ``mode`` on ``fd`` without blocking: False if another process holds a conflicting lock; raises
    :class:`LockUnsupportedError` if the file system cannot lock (``ENOLCK``, ``EOPNOTSUPP``, ``EBADF``, ...)."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _HELD_ELSEWHERE:
            return False
        raise _cannot_lock(path, exc) from None
    return True


@dataclass
class Held:
    """A folder's lock, held by this process until :meth:`close` (or its death)."""

    fd: int
    path: Path

    def exclusive(self) -> bool:
        """Turn the lock exclusive without blocking; False if another process holds it too."""
        return _flock(self.fd, fcntl.LOCK_EX, self.path)

    def close(self) -> None:
        """Release the lock (closing the descriptor); closing twice is harmless."""
        if self.fd >= 0:
            fsio.backend.close(self.fd)
            self.fd = -1


def lock(folder: Path, mode: int = fcntl.LOCK_EX) -> Held | None:
    """Hold flock ``mode`` (``fcntl.LOCK_EX`` or ``LOCK_SH``) on ``folder``'s lock file (created if needed); None
    if another process holds a conflicting lock. Raises :class:`LockUnsupportedError` if the file system cannot
    lock, :class:`~streammerge.errors.StreamMergeError` if the file cannot be opened for writing."""
    fd = _open(folder, create=True)
    assert fd is not None
    try:
        if _flock(fd, mode, folder / LOCK_FILE):
            return Held(fd, folder / LOCK_FILE)
    except BaseException:
        fsio.backend.close(fd)
        raise
    fsio.backend.close(fd)
    return None


def holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock now (see :func:`owner`), or None; takes no lasting lock and creates nothing.
    Raises :class:`LockUnsupportedError` if the file system cannot lock files."""
    fd = _open(folder, create=False)
    if fd is None:
        return None
    try:
        free = _flock(fd, fcntl.LOCK_SH, folder / LOCK_FILE)
    finally:
        fsio.backend.close(fd)  # closing releases a lock this call took
    return None if free else owner(folder)


def owner(folder: Path) -> str:
    """What the holder of ``folder``'s lock wrote about itself ("pid N on HOST"), or "a process"."""
    try:
        return (folder / OWNER).read_text(encoding="utf-8").strip() or "a process"
    except OSError:
        return "a process"


def claim(folder: Path) -> None:
    """Name this process as the holder of ``folder``'s lock (once every refusal could have happened)."""
    fsio.write_file(folder / OWNER, f"pid {os.getpid()} on {socket.gethostname()}".encode())


#: the files a lock leaves in a folder (kept when a folder's other contents are cleared while it is held)
LOCK_NAMES = frozenset({LOCK_FILE, OWNER})
