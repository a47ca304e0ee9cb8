"""Failpoints for crash tests: named checkpoints on the write path where a test can kill or interrupt the process.

With ``STREAMMERGE_KILL_AT=N`` in the environment, the Nth checkpoint reached sends SIGKILL to this process (no
cleanup, no flush: a power cut as far as the work folder is concerned). With ``STREAMMERGE_CHECKPOINT_LOG=FILE``,
every checkpoint's name is appended to FILE, so a test can count them and pick kill points. With
``STREAMMERGE_KILL_ONCE=FILE`` too, only the first process to get there is killed (it creates FILE; the others,
and a retry of the killed one, go on): for several processes sharing one environment (Ray workers). In-process tests can
install a hook (:func:`set_hook`) that sees every checkpoint and may raise. Without any of these a checkpoint is
two comparisons.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

_KILL_AT = int(os.environ.get("STREAMMERGE_KILL_AT", "0") or 0)
_LOG = os.environ.get("STREAMMERGE_CHECKPOINT_LOG")
_KILL_ONCE = os.environ.get("STREAMMERGE_KILL_ONCE")
_ACTIVE = bool(_KILL_AT or _LOG)
_count = 0
_counting = threading.Lock()
_hook: Callable[[str], None] | None = None


def set_hook(hook: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Call ``hook(event)`` at every checkpoint (None removes it); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def checkpoint(event: str) -> None:
    """Mark a point where a crash must be survivable."""
    if _hook is not None:
        _hook(event)
    if not _ACTIVE:
        return
    global _count
    with _counting:  # (each worker's writer thread reaches checkpoints)
        _count += 1
        count = _count
        if _LOG:
            with open(_LOG, "a", encoding="utf-8") as f:
                f.write(event + "\n")
    if count == _KILL_AT:
        if _KILL_ONCE:
            try:
                os.close(os.open(_KILL_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
