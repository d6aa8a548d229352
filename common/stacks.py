"""Every thread's stack, for a daemon that looks stuck: on ``SIGUSR1``, and past a stop deadline.

A daemon that hangs while stopping otherwise only shows its last log event before systemd's
SIGKILL, which says nothing about where it waited. Both use the standard library's
:mod:`faulthandler`, which writes from a C signal handler or watchdog thread and so still works
when the event loop or the GIL is what is stuck. The stacks go to stderr (the journal, or the
daemon's log file) as plain text between the JSON lines.
"""

from __future__ import annotations

import faulthandler
import signal
import sys


def dump_on_sigusr1() -> None:
    """``kill -USR1 PID`` writes every thread's stack to stderr; the daemon keeps running."""
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def arm_stop_deadline(seconds: float) -> None:
    """If the process is still alive ``seconds`` from now, write every thread's stack to stderr
    and exit with status 1 at once.

    For a graceful stop that must not hang: what it has not finished by then is what a SIGKILL
    would have cut short anyway (nothing acked is lost; see docs/operations.md).
    """
    faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)


__all__ = ["arm_stop_deadline", "dump_on_sigusr1"]
