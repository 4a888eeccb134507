"""corral's in-sandbox helpers (the guard, the relay) run on an interpreter the sandbox's user can execute."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from corral.errors import RuntimeFailure
from corral.local import interpreter


def test_interpreter_the_sandbox_user_can_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard and the relay run on this interpreter unless another user runs the command and
    could not."""
    assert interpreter.interpreter(None) == sys.executable
    assert interpreter.interpreter((os.geteuid(), os.getegid())) == sys.executable
    hidden = tmp_path / "private"
    (hidden / "bin").mkdir(parents=True)
    python = hidden / "bin" / "python3"
    python.write_text("")
    python.chmod(0o755)
    hidden.chmod(0o700)
    other = (os.geteuid() + 12345, os.getegid() + 12345)
    assert not interpreter._runnable_by(str(python), *other)
    assert interpreter._runnable_by(str(python), os.geteuid(), os.getegid())
    hidden.chmod(0o711)
    tmp_path.chmod(0o711)
    assert interpreter._runnable_by(str(python), *other) == all(
        p.stat().st_mode & 0o1 for p in tmp_path.parents
    )
    hidden.chmod(0o700)
    monkeypatch.setattr(sys, "executable", str(python))
    monkeypatch.setattr(interpreter, "_FALLBACK_PYTHONS", (str(python), "/nonexistent/python3"))
    with pytest.raises(RuntimeFailure, match="no Python interpreter"):
        interpreter.interpreter(other)
    if os.geteuid() != 0:
        return  # root runs anything
    assert interpreter.interpreter((0, 0)) == str(python)
