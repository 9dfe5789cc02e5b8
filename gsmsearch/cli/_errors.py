"""One place that maps exceptions to one-line messages (tracebacks only with GSMSEARCH_DEBUG=1)."""
from __future__ import annotations

import os
import sys
import traceback

__all__ = ["UsageError", "run_guarded"]


class UsageError(Exception):
    """A user mistake (bad argument, bad file): printed as one line, exit status 2."""


def run_guarded(func, *args, **kwargs) -> int:
    debug = os.environ.get("GSMSEARCH_DEBUG", "") not in ("", "0")
    try:
        result = func(*args, **kwargs)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return int(result or 0)
    except KeyboardInterrupt:
        print("gsmsearch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`gsmsearch status SPEC | head`): stop quietly, as a command killed
        # by SIGPIPE would; point stdout at /dev/null so the interpreter's final flush is silent
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    except Exception as error:  # noqa: BLE001 - the one place that turns errors into messages
        if debug:
            traceback.print_exc()
        from ..search._lock import DriverLockLost
        from ..search._storage import DatabaseUnreachable
        from ..trainer import TrialFailed

        if isinstance(error, UsageError):
            kind, code = "error", 2
        elif isinstance(error, DatabaseUnreachable):
            kind, code = "error", 75  # EX_TEMPFAIL: the same command with --resume continues
        elif isinstance(error, DriverLockLost):
            kind, code = "error", 1
        elif isinstance(error, (ValueError, FileNotFoundError, PermissionError)):
            kind, code = "error", 2
        elif isinstance(error, TrialFailed):
            kind, code = "trial failed", 1
        else:
            kind, code = f"unexpected {type(error).__name__}", 1
        hint = "" if debug else " (set GSMSEARCH_DEBUG=1 for a traceback)"
        print(f"gsmsearch: {kind}: {_bounded(str(error))}{hint if code == 1 else ''}", file=sys.stderr)
        return code


#: A message is cut to this many lines of this many characters (a value echoed from hostile input
#: must not print megabytes).
MAX_LINES, MAX_LINE_CHARS = 40, 1000


def _bounded(message: str) -> str:
    lines = message.splitlines() or [""]
    cut = [line if len(line) <= MAX_LINE_CHARS else f"{line[:MAX_LINE_CHARS]}... ({len(line)} characters)"
           for line in lines[:MAX_LINES]]
    if len(lines) > MAX_LINES:
        cut.append(f"... and {len(lines) - MAX_LINES} more lines")
    return "\n".join(cut)
