"""Exit statuses and the one-line error report, shared by the full CLI and ``corral run``'s
lean entry (which must not import the CLI framework: see corral/cli/entry.py)."""

from __future__ import annotations

import sys

from corral.errors import CorralError, InvalidRequestError

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "exit_status", "say_error"]

EXIT_FAILURE = 1
EXIT_USAGE = 2


def say_error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    sys.stderr.write(f"error: {first}\n")
    sys.stderr.flush()


def exit_status(exc: BaseException) -> int | None:
    """The exit status for an error of corral's own (said on stderr), an interrupt or a closed
    pipe; None for anything else."""
    if isinstance(exc, InvalidRequestError):
        say_error(exc.message)
        return EXIT_USAGE
    if isinstance(exc, CorralError):
        say_error(exc.message)
        return EXIT_FAILURE
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, BrokenPipeError):
        return EXIT_FAILURE
    return None
