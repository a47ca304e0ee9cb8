"""The ``streammerge`` console command: the click CLI, with every interrupt ending in one line and exit status 130,
also during start-up (importing torch takes seconds) and while a command is being set up."""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> None:
    try:
        import click

        from .cli import main as cli

        try:
            code = cli.main(args=argv, prog_name="streammerge", standalone_mode=False)
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except click.Abort:  # click's name for Ctrl-C (and end of input) inside a command
            raise KeyboardInterrupt from None
        except SystemExit as exc:  # a command's own exit status (an interrupted merge: 130 or 143)
            code = exc.code
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        # A Ctrl-C that lands inside C code run by an import (torch's start-up runs Python through PyRun_*) leaves
        # CPython marked as "ended by an unhandled KeyboardInterrupt", and it then kills itself with SIGINT at exit
        # (status -2, not 130), though the interrupt was handled here. Nothing is left to clean up (a merge's
        # journal is already durable), so end now with the promised status.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    # the command is over: a Ctrl-C now (during interpreter shutdown) must not turn its result into a crash
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
