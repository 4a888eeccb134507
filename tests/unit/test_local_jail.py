"""The local jail's walk finds every protected path at any depth and through worktrees, and its bwrap command line mounts in the order that makes them stick."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from corral.cli.main import app
from corral.errors import InvalidRequestError
from corral.local import jail
from corral.local.jail import (
    Identity,
    Plan,
    Scan,
    ViolationLog,
    bwrap_args,
    created_protected,
    find_hidden_names,
    host_unix_sockets,
    resolve_identity,
    scan_writable,
)
from corral.local.settings import Flags, Policy, builtins, resolve

BI = builtins()


def _scan(*roots: Path, home: Path | None = None, protect: tuple[Path, ...] = ()) -> Scan:
    return scan_writable(
        list(roots), BI.protected_names, BI.git_protected, home=home, protect=protect
    )


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _git_dir(d: Path) -> Path:
    (d / "hooks").mkdir(parents=True)
    (d / "objects").mkdir()
    (d / "refs").mkdir()
    _touch(d / "HEAD", "ref: refs/heads/main\n")
    _touch(d / "config")
    return d


# ------------------------------------------------------------------------------ the walk


def test_protected_names_at_any_depth(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    _git_dir(p / ".git")
    _touch(p / "sub/dir/.claude/settings.json")
    _touch(p / "sub/dir/.claude/deeper/.bashrc")  # inside a protected dir: not walked
    _touch(p / "a/b/c/d/CLAUDE.md")
    _touch(p / ".mcp.json")
    _touch(p / "home/.zshenv")
    _touch(p / ".corral/local.toml")
    _touch(p / "src/main.py")
    (p / "node_modules/x/.vscode").mkdir(parents=True)
    s = _scan(p)
    assert s.protected == {
        p / ".git/hooks",
        p / ".git/config",
        p / "sub/dir/.claude",
        p / "a/b/c/d/CLAUDE.md",
        p / ".mcp.json",
        p / "home/.zshenv",
        p / ".corral",
        p / "node_modules/x/.vscode",
    }
    # Every directory between the project and a protected path becomes a mount point.
    assert s.anchors == {
        p / ".git",
        p / "sub",
        p / "sub/dir",
        p / "a",
        p / "a/b",
        p / "a/b/c",
        p / "a/b/c/d",
        p / "home",
        p / "node_modules",
        p / "node_modules/x",
    }
    assert s.entries > 0


def test_symlinks_are_not_followed_but_their_writable_targets_are_protected(
    tmp_path: Path,
) -> None:
    p = tmp_path / "proj"
    _touch(p / "dotfiles/bashrc", "echo hi\n")
    (p / ".bashrc").symlink_to(p / "dotfiles/bashrc")
    outside = _touch(tmp_path / "elsewhere/.claude/settings.json")
    (p / ".claude").symlink_to(outside.parent)
    (p / "loop").symlink_to(p)  # must not recurse forever
    s = _scan(p)
    assert s.links == {p / ".bashrc", p / ".claude"}
    assert s.protected == {p / "dotfiles/bashrc"}  # outside the project it is read-only anyway


def test_home_rc_files_linked_into_the_project_are_protected(tmp_path: Path) -> None:
    home = tmp_path / "home"
    p = home / "dotfiles"
    target = _touch(p / "zsh/zshrc")
    (home / ".zshrc").symlink_to(target)
    s = _scan(p, home=home)
    assert target in s.protected
    assert p / "zsh" in s.anchors


def test_protect_list_paths_under_a_writable_root(tmp_path: Path) -> None:
    claude = tmp_path / "home/.claude"
    settings = _touch(claude / "settings.json")
    missing = claude / "CLAUDE.md"
    s = _scan(claude, protect=(settings, missing, tmp_path / "not-writable"))
    assert s.protected == {settings}


def test_nested_git_dirs_submodules_and_bare_repos(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    g = _git_dir(p / ".git")
    sub = _git_dir(g / "modules/libs/one")  # submodule named "libs/one"
    nested = _git_dir(sub / "modules/two")
    bare = _git_dir(p / "fixtures/remote.git")
    vendored = _git_dir(p / "vendor/lib/.git")
    s = _scan(p)
    for d in (g, sub, nested, bare, vendored):
        assert d / "hooks" in s.protected
        assert d / "config" in s.protected
    assert bare in s.anchors and g / "modules/libs" in s.anchors


def test_hooks_path_and_included_config_in_the_project_are_protected(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    g = _git_dir(p / ".git")
    hooks = p / "tools/hooks"
    hooks.mkdir(parents=True)
    _touch(p / "conf/extra.gitconfig")
    _touch(p / "conf/when.gitconfig")
    _touch(
        g / "config",
        "[core]\n\tbare = false\n\thooksPath = tools/hooks\n"
        '[include]\n\tpath = "../conf/extra.gitconfig"\n'
        '[includeIf "gitdir:~/"]\n  path = ../conf/when.gitconfig ; comment\n'
        "[alias]\n\tpath = ../not-a-config\n",
    )
    _touch(p / "not-a-config")
    s = _scan(p)
    assert hooks in s.protected
    assert p / "conf/extra.gitconfig" in s.protected
    assert p / "conf/when.gitconfig" in s.protected
    assert p / "not-a-config" not in s.protected
    assert p / "tools" in s.anchors


def test_a_hooks_path_of_dot_does_not_freeze_the_repository(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    g = _git_dir(p / ".git")
    _touch(g / "config", "[core]\nhooksPath = .\n")
    assert g not in _scan(p).protected


def test_a_worktree_binds_its_git_dirs_with_hooks_and_config_protected(tmp_path: Path) -> None:
    main = tmp_path / "main"
    wt = tmp_path / "wt"
    subprocess.run(["git", "init", "-q", str(main)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(main),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    subprocess.run(["git", "-C", str(main), "worktree", "add", "-q", str(wt)], check=True)
    s = _scan(wt)
    common = (main / ".git").resolve()
    assert s.git_roots == {common}
    assert common in s.roots
    assert wt / ".git" in s.protected  # the pointer file itself
    wgit = common / "worktrees" / "wt"
    for path in (common / "hooks", common / "config", wgit / "commondir", wgit / "gitdir"):
        assert path in s.protected, path


def test_a_planted_gitdir_opens_nothing(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    home = tmp_path / "home"
    _git_dir(home)  # looks like a git dir, but does not point back at the .git file
    _touch(p / ".git", f"gitdir: {home}\n")
    s = _scan(p)
    assert s.git_roots == set()
    assert s.protected == {p / ".git"}


def test_a_fifo_named_dot_git_does_not_hang(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    p.mkdir()
    os.mkfifo(p / ".git")
    assert _scan(p).protected == {p / ".git"}


def test_hidden_names_outside_the_project(tmp_path: Path) -> None:
    home = tmp_path / "home"
    project = home / "code/app"
    found = {
        _touch(home / "code/other/.env"),
        _touch(home / "code/other/deep/.env.local"),
        _touch(home / ".envrc"),
    }
    _touch(project / ".env")  # the project's own: stays
    _touch(home / "code/other/node_modules/pkg/.env")  # pruned
    _touch(home / "allowed/.env")
    (home / "link").symlink_to(tmp_path / "outside")
    _touch(tmp_path / "outside/.env")
    got, seen = find_hidden_names([home], BI.hide_names, BI.hide_prune, [project, home / "allowed"])
    assert set(got) == found
    assert seen > 0


def test_host_unix_sockets_from_proc_net_unix() -> None:
    table = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000: 00000002 00000000 00010000 0001 01 100 /run/docker.sock\n"
        "0000: 00000002 00000000 00010000 0001 01 101 @/tmp/.X11-unix/X0\n"
        "0000: 00000002 00000000 00010000 0001 01 102 /home/u/.app/sock with space\n"
        "0000: 00000003 00000000 00000000 0001 03 103\n"
        "0000: 00000002 00000000 00010000 0001 01 104 /run/docker.sock\n"
    )
    assert host_unix_sockets(table) == [
        Path("/run/docker.sock"),
        Path("/home/u/.app/sock with space"),
    ]


def test_created_protected_reports_new_names(tmp_path: Path) -> None:
    p = tmp_path / "proj"
    _touch(p / "src/x.py")
    policy = _policy(p, tmp_path / "home")
    before = jail._make_plan(policy, p)
    assert created_protected(policy, before) == []
    _touch(p / "src/.claude/settings.json")
    _touch(p / "CLAUDE.md")
    assert created_protected(policy, before) == [p / "CLAUDE.md", p / "src/.claude"]


# ------------------------------------------------------------------------------ the plan


def _policy(project: Path, home: Path, **flags: object) -> Policy:
    home.mkdir(parents=True, exist_ok=True)
    return resolve(
        Flags(**flags),  # type: ignore[arg-type]
        project=project,
        home=home,
        cwd=project,
        user=None,
        project_settings=None,
    )


def test_plan_hides_what_exists_and_punches_allow_read_holes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    p = home / "code/app"
    _touch(p / "x")
    _touch(home / ".ssh/id_rsa")
    _touch(home / ".ssh/known_hosts")
    _touch(home / ".netrc")
    _touch(home / "code/other/.env")
    policy = _policy(p, home, allow_read=[str(home / ".ssh/known_hosts")])
    plan = jail._make_plan(policy, p)
    assert plan.deny_dirs == [home / ".ssh"]
    assert plan.deny_files == [home / ".netrc"]
    assert plan.read_holes == [home / ".ssh/known_hosts"]
    assert plan.hidden_names == [home / "code/other/.env"]
    assert plan.writable == [p]


def test_plan_refuses_to_make_home_writable(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ident = Identity(os.getuid(), os.getgid(), (), home, "me", False, home)
    with pytest.raises(InvalidRequestError, match="whole home directory"):
        jail.plan(_policy(home, home), ident, home)
    with pytest.raises(InvalidRequestError, match="whole home directory"):
        jail.plan(_policy(tmp_path, home), ident, tmp_path)
    with pytest.raises(InvalidRequestError, match="narrower path"):
        jail.plan(_policy(home / "p", home, allow_write=["/"]), ident, home / "p")


def _plan(tmp_path: Path) -> Plan:
    p = Path("/src/app")
    scan = Scan(
        roots=[p],
        protected={p / ".git/hooks", p / "sub/.claude"},
        anchors={p / ".git", p / "sub"},
    )
    return Plan(
        project=p,
        cwd=p / "sub",
        writable=[p, Path("/home/u/.cache/x")],
        scan=scan,
        deny_dirs=[Path("/home/u/.ssh")],
        deny_files=[Path("/home/u/.netrc")],
        read_holes=[Path("/home/u/.ssh/known_hosts")],
        hidden_names=[Path("/home/u/other/.env")],
        sockets=[Path("/home/u/.app.sock")],
        masks=[(Path("/proc/kcore"), False)],
        protect_missing=[],
        notes=[],
        walked=0,
    )


def _index(args: list[str], *seq: str) -> int:
    for i in range(len(args) - len(seq) + 1):
        if tuple(args[i : i + len(seq)]) == seq:
            return i
    raise AssertionError(f"{seq} not in {args}")


def test_bwrap_args_namespaces_and_mount_order(tmp_path: Path) -> None:
    a = bwrap_args(_plan(tmp_path), home=Path("/home/u"), stdin_tty=True)
    for flag in (
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--disable-userns",
    ):
        assert flag in a
    assert a[_index(a, "--cap-drop") + 1] == "ALL"
    assert "--new-session" not in a  # a TTY on stdin keeps its controlling terminal
    root = _index(a, "--ro-bind", "/", "/")
    tmp = _index(a, "--tmpfs", "/tmp")
    run = _index(a, "--tmpfs", "/run")
    proj = _index(a, "--bind", "/src/app", "/src/app")
    anchor = _index(a, "--bind", "/src/app/sub", "/src/app/sub")
    hooks = _index(a, "--ro-bind", "/src/app/.git/hooks", "/src/app/.git/hooks")
    ssh = _index(a, "--tmpfs", "/home/u/.ssh")
    hole = _index(a, "--ro-bind", "/home/u/.ssh/known_hosts", "/home/u/.ssh/known_hosts")
    ro_ssh = _index(a, "--remount-ro", "/home/u/.ssh")
    # later mounts cover earlier ones: rw, then read-only inside, then hidden, then holes (made
    # while the hiding tmpfs can still take a mount point, read-only after)
    assert root < tmp < proj < anchor < hooks < ssh < hole < ro_ssh
    assert run > root
    for f in ("/home/u/.netrc", "/home/u/other/.env", "/home/u/.app.sock", "/proc/kcore"):
        assert a[_index(a, "--ro-bind", "/dev/null", f) + 2] == f
    assert a[-2:] == ["--chdir", "/src/app/sub"]


def test_bwrap_args_new_session_without_a_tty_and_network_dir(tmp_path: Path) -> None:
    a = bwrap_args(
        _plan(tmp_path),
        home=Path("/home/u"),
        stdin_tty=False,
        net_dir=(Path("/tmp/corral-local-x/run/net-1"), "/run/corral-net"),
        runtime_dir="/run/user/1000",
        guard_dir=Path("/tmp/corral-local-x/guard"),
        ro_files=[(Path("/tmp/corral-local-x/run/net-1/ca-bundle.pem"), "/etc/ssl/cert.pem")],
    )
    assert "--new-session" in a
    # Read-only: the sandbox cannot change its own CA files or the guard's program.
    net = _index(a, "--ro-bind", "/tmp/corral-local-x/run/net-1", "/run/corral-net")
    assert net > _index(a, "--tmpfs", "/run")
    guard = _index(a, "--ro-bind", "/tmp/corral-local-x/guard", "/run/corral-guard")
    assert guard > _index(a, "--tmpfs", "/run")
    bundle = "/tmp/corral-local-x/run/net-1/ca-bundle.pem"
    assert _index(a, "--ro-bind", bundle, "/etc/ssl/cert.pem") > net
    rt = _index(a, "--perms", "0700", "--dir", "/run/user/1000")
    assert rt > _index(a, "--tmpfs", "/run")


def test_bwrap_args_show_a_home_that_lives_under_tmp(tmp_path: Path) -> None:
    a = bwrap_args(_plan(tmp_path), home=Path("/tmp/x/home"), stdin_tty=True)
    assert _index(a, "--ro-bind", "/tmp/x/home", "/tmp/x/home") > _index(a, "--tmpfs", "/tmp")


# ------------------------------------------------------------------------------ identity


def test_identity_unprivileged_is_the_caller(tmp_path: Path) -> None:
    ident = resolve_identity(
        {"HOME": str(tmp_path)}, tmp_path, as_root=False, euid=os.geteuid() or 1
    )
    assert not ident.switch


@pytest.mark.skipif(os.geteuid() != 0, reason="root decides whom to run as")
def test_identity_as_root(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    env = {"HOME": str(home), "SUDO_UID": "65534", "SUDO_GID": "65534"}
    ident = resolve_identity(env, tmp_path, as_root=False)
    assert (ident.uid, ident.gid, ident.switch, ident.home) == (65534, 65534, True, home)
    assert ident.settings_home == home
    # A HOME the user does not own is not theirs (plain sudo keeps root's): passwd decides.
    ident = resolve_identity({**env, "HOME": "/root"}, tmp_path, as_root=False)
    assert ident.home == Path(os.path.realpath("/nonexistent"))
    # No sudo: the owner of the project.
    proj = tmp_path / "proj"
    proj.mkdir()
    os.chown(proj, 65534, 65534)
    ident = resolve_identity({"HOME": str(home)}, proj, as_root=False)
    assert (ident.uid, ident.switch) == (65534, True)
    # A root-owned project and no sudo: refused, unless --as-root.
    with pytest.raises(InvalidRequestError, match="--as-root"):
        resolve_identity({"HOME": str(home)}, tmp_path, as_root=False)
    ident = resolve_identity({"HOME": str(home)}, tmp_path, as_root=True)
    assert (ident.uid, ident.switch) == (0, False)
    with pytest.raises(InvalidRequestError, match="not numbers"):
        resolve_identity({"SUDO_UID": "x"}, tmp_path, as_root=False)


def test_violation_log_counts_and_shows() -> None:
    said: list[str] = []
    log = ViolationLog(said.append, verbose=False)
    log.record("denied tcp", "evil.com:443 (not allowed)")
    log.record("denied tcp", "evil.com:80 (not allowed)")
    log.record("protected path created", "/p/CLAUDE.md", always=True)
    assert said == ["protected path created: /p/CLAUDE.md"]
    assert log.summary() == "during the run: denied tcp: 2, protected path created: 1"
    assert ViolationLog(said.append, verbose=True).summary() is None


# ----------------------------------------------------------------------------------- CLI


def test_cli_needs_a_command() -> None:
    result = CliRunner().invoke(app, ["run"])
    assert result.exit_code == 2


def test_cli_bad_domain_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(
        app, ["run", "--as-root", "--allow-domain", "1.2.3.4", "--", "true"]
    )
    assert result.exit_code == 2
    assert "--allow-domain" in result.output


def test_cli_says_how_to_install_bwrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(jail.shutil, "which", lambda name: None)
    result = CliRunner().invoke(app, ["run", "--as-root", "--", "true"])
    assert result.exit_code == 1
    assert "apt-get install bubblewrap" in result.output
