"""``corral shell``: wire the local terminal to a sandbox PTY and always give the terminal back."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from types import FrameType

from corral.sdk.sandbox import Sandbox

__all__ = ["run_shell"]

_EOT = b"\x04"


def _size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return size.lines, size.columns


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Raw mode while the block runs, the old settings afterwards whatever happens."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _winch_pipe() -> Iterator[int]:
    """A pipe that becomes readable on SIGWINCH, so the select loop notices resizes at once
    (the handler itself must not touch the WebSocket: it can interrupt a send)."""
    r, w = os.pipe()
    os.set_blocking(w, False)

    def on_winch(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(w, b"w")

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield r
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(r)
        os.close(w)


def run_shell(
    sbx: Sandbox, *, cmd: str | None = None, user: str | None = None, cwd: str | None = None
) -> int:
    """Run an interactive terminal until its process exits; answer the exit code."""
    fd_in = sys.stdin.fileno()
    out = sys.stdout.buffer
    size_fd = sys.stdout.fileno() if os.isatty(sys.stdout.fileno()) else fd_in

    def on_data(data: bytes) -> None:
        out.write(data)
        out.flush()

    rows, cols = _size(size_fd)
    pty = sbx.pty(cmd, rows=rows, cols=cols, on_data=on_data, user=user, cwd=cwd)
    try:
        with _winch_pipe() as winch, _raw(fd_in):
            watch = [fd_in, winch]
            while pty.running:
                ready, _, _ = select.select(watch, [], [], 0.2)
                if winch in ready:
                    os.read(winch, 1024)
                    pty.resize(*_size(size_fd))
                if fd_in in ready:
                    data = os.read(fd_in, 65536)
                    if data:
                        pty.send(data)
                    else:
                        # Piped input ran out: end-of-file to the shell, then just wait.
                        pty.send(_EOT)
                        watch.remove(fd_in)
        return pty.wait()
    finally:
        pty.close()
