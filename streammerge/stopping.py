"""Stopping a merge cleanly: SIGINT/SIGTERM (or a caller's request) become a flag the runner checks between compute
blocks and while it waits for the reader or the writer, so a stop takes effect within a fraction of a second even
inside a long statistics pass, and everything durable stays journaled.

Process-wide signal handlers are installed only when the caller asks (the CLI does); a library call leaves the
caller's handlers alone, and Ctrl-C then arrives as ``KeyboardInterrupt``, which is just as resumable.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: the signals that stop a merge cleanly: Ctrl-C, kill, and a closed terminal (SIGHUP, where there is one)
STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


class MergeInterrupted(KeyboardInterrupt):
    """A signal, Ctrl-C or a stop request stopped the merge; its message says whether work was kept to resume.
    A :class:`KeyboardInterrupt`, so ``except KeyboardInterrupt`` catches it and ``except Exception`` does not."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopFlag:
    """A stop request: set by a signal handler (if installed) or by :meth:`request`; :meth:`check` raises."""

    def __init__(self, handle_signals: bool = False) -> None:
        self.signum: int | None = None
        self._handle = handle_signals
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if self._handle and threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second Ctrl-C: stop now, the journal is still consistent
            raise KeyboardInterrupt
        self.signum = signum

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask the merge to stop at its next check (from any thread)."""
        self.signum = signum

    def check(self) -> None:
        """Raise :class:`MergeInterrupted` if a stop was requested."""
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise MergeInterrupted(f"stopped by {name}", 128 + self.signum)

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
