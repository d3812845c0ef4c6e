"""The `fsctl` command's entry point: a Ctrl-C while the CLI is still being imported (some 50 ms
of imports) ends it as a Ctrl-C later does, with one line and status 130, not a traceback."""

from __future__ import annotations

import signal
import sys

INTERRUPTED = 130  # cli.ExitStatus.INTERRUPTED, not imported: that is the slow import


def _interrupted_while_importing(signum: int, frame: object) -> None:
    print("fsctl: interrupted", file=sys.stderr)
    raise SystemExit(INTERRUPTED)


def main() -> int:
    previous = signal.signal(signal.SIGINT, _interrupted_while_importing)
    from .cli import main as cli_main

    signal.signal(signal.SIGINT, previous)  # from here on a KeyboardInterrupt, which cli handles
    return cli_main()
