"""The one error type the library raises for a user's mistake or a failed run.

`cli` turns it into a single line on stderr and the exit code it carries:
0 success, 1 a failure while running (NaN, out of memory, disk full),
2 a usage error or bad input, 129 hung up (SIGHUP: the terminal was closed),
130 interrupted (SIGINT), 143 terminated (SIGTERM): 128 + the signal's number, as a shell shows a process
that the signal ended.
"""

from __future__ import annotations

import os
import signal

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGHUP = 129
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGNALS = (EXIT_SIGHUP, EXIT_SIGINT, EXIT_SIGTERM)

# The signals that stop charlm at a clean point (a run saves first); no SIGHUP on Windows.
SIGHUP = getattr(signal, "SIGHUP", None)
STOP_SIGNALS = tuple(sig for sig in (signal.SIGINT, signal.SIGTERM, SIGHUP) if sig is not None)


def caught_signals() -> list[int]:
    """The STOP_SIGNALS that charlm's handlers take, all but a SIGHUP that is ignored: nohup's, whose run is
    meant to outlive its terminal."""
    return [sig for sig in STOP_SIGNALS if sig != SIGHUP or signal.getsignal(sig) != signal.SIG_IGN]


def signal_exit_code(signum: int) -> int:
    """The exit code of a command that a signal stopped (128 + its number)."""
    return 128 + int(signum)


class CharlmError(Exception):
    """An error with a one-line message for the user and a process exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(CharlmError):
    """Bad input: a missing file, a wrong option, an invalid config (exit 2)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


class EncodingMismatch(UsageError):
    """A file that does not decode in the encoding given but reads in another (`reads_as`); `where` says
    which byte failed."""

    def __init__(self, message: str, where: str, reads_as: str):
        super().__init__(message)
        self.where = where
        self.reads_as = reads_as


class RunFailure(CharlmError):
    """Something went wrong while running: NaN loss, out of memory, disk full (exit 1)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_FAILURE)


class StopSignal(BaseException):
    """A stop signal that came where no loop turns it into a flag (the command line's handler raises it):
    the command unwinds at once. A BaseException, as KeyboardInterrupt is, so that no `except Exception`
    swallows it; not a KeyboardInterrupt, which Click turns into 'Aborted!' and exit 1."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Interrupted(CharlmError):
    """Training was stopped by a signal after saving a checkpoint (exit 129, 130 or 143)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA's "out of memory"),
    the RuntimeError of torch's CPU allocator ("can't allocate memory"; "not enough memory" on Windows), or
    the system's ENOMEM ("Cannot allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(words in text for words in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                           "not enough memory"))


def to_devnull(fd: int) -> None:
    """Point descriptor `fd` at /dev/null: its terminal hung up or its reader went away, so every write to it
    fails (EIO, EPIPE), and the process still has a checkpoint to save and a clean exit to make (Python's
    own flush at exit would fail too, and turn the exit code into 120)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
