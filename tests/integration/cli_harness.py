"""Running the ``corral`` command of this venv against a test server, for the CLI tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["CORRAL", "TEMPLATE", "corral", "corral_text", "one_error"]

CORRAL = str(Path(sys.executable).with_name("corral"))
TEMPLATE = "minimal"


def corral(
    env: dict[str, str], *args: str, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run ``corral ARGS`` (stdin closed unless ``input``); never a traceback, and exit 0 when
    ``check``."""
    proc = subprocess.run(
        [CORRAL, *args], env=env, input=input, capture_output=True, timeout=120,
        stdin=None if input is not None else subprocess.DEVNULL,
    )  # fmt: skip
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    if check:
        assert proc.returncode == 0, (args, proc.stderr.decode())
    return proc


def corral_text(
    env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """``corral`` with its output decoded."""
    proc = corral(env, *args, check=check)
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def one_error(proc: subprocess.CompletedProcess[str], status: int) -> str:
    """The single ``error: …`` line a failed command must print, with exit ``status``."""
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]
