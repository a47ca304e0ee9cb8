"""Failpoints for crash tests: named checkpoints on the write path where a test can kill the process.

With ``STREAMMERGE_KILL_AT=N`` in the environment, the Nth checkpoint reached sends SIGKILL to this process (no
cleanup, no flush: a power cut as far as the work folder is concerned). With ``STREAMMERGE_CHECKPOINT_LOG=FILE``,
every checkpoint's name is appended to FILE, so a test can count them and pick kill points. Without either
variable a checkpoint is one comparison.
"""

from __future__ import annotations

import os
import signal

_KILL_AT = int(os.environ.get("STREAMMERGE_KILL_AT", "0") or 0)
_LOG = os.environ.get("STREAMMERGE_CHECKPOINT_LOG")
_ACTIVE = bool(_KILL_AT or _LOG)
_count = 0


def checkpoint(event: str) -> None:
    """Mark a point where a crash must be survivable."""
    if not _ACTIVE:
        return
    global _count
    _count += 1
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(event + "\n")
    if _count == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
