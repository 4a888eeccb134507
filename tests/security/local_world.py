"""The world local mode's security tests run in: a fake home and project owned by an unprivileged user, and ``corral run`` (the real CLI, real bwrap) started in it as root dropping to that user the way sudo would, or as that user itself. Shared by test_local_jail.py and test_local_guard.py."""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LeakWatch

__all__ = [
    "CORRAL",
    "MODES",
    "PYTHONPATH",
    "SECRET",
    "USER",
    "USER_PYTHON",
    "World",
    "git",
    "results",
    "world",
]

CORRAL = Path(sys.executable).with_name("corral")
SECRET = "ssh-private-key-material-7f3a"
# The unprivileged user the sandbox runs as (root tests drop to it as sudo would).
USER = 65534 if os.geteuid() == 0 else os.getuid()
MODES = ["root", "user"] if os.geteuid() == 0 else ["user"]


def _runnable_by_user(python: str) -> bool:
    try:
        r = subprocess.run([python, "-c", "pass"], user=USER, group=USER, capture_output=True)
    except OSError:
        return False
    return r.returncode == 0


def _user_python() -> str | None:
    """A Python of this minor version that USER can execute: this one, unless it lives in a
    directory private to root (then the system's, given this checkout's packages)."""
    if os.geteuid() != 0 or _runnable_by_user(sys.executable):
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.access(candidate, os.X_OK) or not _runnable_by_user(candidate):
            continue
        version = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if version == str(sys.version_info[:2]):
            return candidate
    return None


USER_PYTHON = _user_python()
# Where corral and its dependencies are, for USER_PYTHON when it is not this interpreter.
PYTHONPATH = os.pathsep.join(
    [str(Path(__file__).resolve().parents[2]), sysconfig.get_paths()["purelib"]]
)


@dataclass
class World:
    """A fake home and project owned by USER, and a way to run ``corral run`` in them."""

    mode: str
    base: Path
    home: Path
    project: Path

    def command(
        self, argv: Sequence[str], flags: Sequence[str], env: dict[str, str] | None
    ) -> tuple[list[str], dict[str, str]]:
        """``corral run`` as the mode runs it, and its environment."""
        corral = [str(CORRAL)]
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            **(env or {}),
        }
        if self.mode == "user" and sys.executable != USER_PYTHON:
            assert USER_PYTHON is not None
            corral = [USER_PYTHON, "-c", "from corral.cli.main import main; main()"]
            environ["PYTHONPATH"] = PYTHONPATH
        cmd = [*corral, "run", *flags, "--", *argv]
        if self.mode == "root":
            environ |= {"SUDO_UID": str(USER), "SUDO_GID": str(USER), "SUDO_USER": "nobody"}
        elif os.geteuid() == 0:
            cmd = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", *cmd]
        return cmd, environ

    def run(
        self,
        argv: Sequence[str],
        *,
        flags: Sequence[str] = (),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        tty: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        cmd, environ = self.command(argv, flags, env)
        if tty:
            # script gives the command a pseudo-terminal on stdin, stdout and stderr; -e passes
            # the exit status on.
            cmd = ["script", "-qec", shlex.join(cmd), "/dev/null"]
        return subprocess.run(
            cmd,
            cwd=cwd or self.project,
            env=environ,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def interrupt(self, script: str) -> tuple[str, int]:
        """Run ``sh -c script`` on a pseudo-terminal, press ^C once it prints "ready"; its
        output and corral's exit status."""
        cmd, environ = self.command(["sh", "-c", script], (), None)
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.chdir(self.project)
                os.execvpe(cmd[0], cmd, environ)
            finally:
                os._exit(127)
        out = b""
        try:
            while b"ready" not in out:
                ready, _, _ = select.select([fd], [], [], 60)
                assert ready, f"no 'ready' from the command: {out!r}"
                out += os.read(fd, 4096)
            os.write(fd, b"\x03")
            while True:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the terminal's last user is gone
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(fd)
        return out.decode(errors="replace"), os.waitstatus_to_exitcode(status)

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.fixture(params=MODES)
def world(request: pytest.FixtureRequest, no_leaks: LeakWatch) -> Iterator[World]:
    if request.param == "user" and USER_PYTHON is None:
        pytest.skip(f"no Python {sys.version_info[:2]} that uid {USER} can run")
    # Not pytest's tmp_path: its parents are private to root, and the user must get in.
    base = Path(tempfile.mkdtemp(prefix="corral-jail-", dir="/tmp"))
    try:
        home, project = base / "home", base / "proj"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "id_rsa").write_text(SECRET + "\n")
        (home / ".aws").mkdir()
        (home / ".aws" / "credentials").write_text("aws_secret_access_key = " + SECRET + "\n")
        (home / ".netrc").write_text(f"machine x login y password {SECRET}\n")
        (home / ".bashrc").write_text("# the user's own\n")
        (home / "code" / "other").mkdir(parents=True)
        (home / "code" / "other" / ".env").write_text(f"TOKEN={SECRET}\n")
        (project / "sub" / "dir" / ".claude").mkdir(parents=True)
        (project / "sub" / "dir" / ".claude" / "settings.json").write_text("{}\n")
        (project / "README").write_text("hello\n")
        git("init", "-q", cwd=project)
        (project / ".git" / "hooks").mkdir(exist_ok=True)
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(base)], check=os.geteuid() == 0)
        base.chmod(0o755)
        yield World(request.param, base, home, project)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def results(out: str) -> dict[str, str]:
    """``name=status`` lines a probe script prints."""
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
