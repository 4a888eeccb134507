"""The guard's filter sends exactly the name-creating calls to it (run in a BPF interpreter), its rules refuse protected names only under writable places, and its config survives any path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from corral.local import guard, seccomp
from corral.local.guard import Rules, read_config, write_config
from corral.local.seccomp import (
    ARCHES,
    AUDIT_ARCH,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_USER_NOTIF,
    guard_filter,
    guard_syscalls,
    syscall_numbers,
)
from tests.unit.bpf import check_program, run, seccomp_data

POLICY: dict[str, Any] = json.loads(
    (Path(seccomp.__file__).resolve().parent.parent / "resources" / "local-guard.json").read_text()
)
NOTIFY, ALLOW = SECCOMP_RET_USER_NOTIF, SECCOMP_RET_ALLOW
O_CREAT = 0o100
O_WRONLY, O_TRUNC, O_DIRECTORY = 0o1, 0o1000, 0o200000
CREATING = (
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "symlink",
    "symlinkat",
    "link",
    "linkat",
    "rename",
    "renameat",
    "renameat2",
    "creat",
    "openat2",
    "bind",
)


@pytest.fixture(params=ARCHES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def decide(arch: str, name: str, *args: int, audit: int | None = None) -> int:
    nr = syscall_numbers(arch)[name]
    data = seccomp_data(nr, AUDIT_ARCH[arch] if audit is None else audit, args)
    return run(guard_filter(arch), data)


# ------------------------------------------------------------------ the filter


def test_program_is_well_formed(arch: str) -> None:
    check_program(guard_filter(arch))


def test_every_entry_has_a_reason() -> None:
    for entry in [*POLICY["rules"], *POLICY["allowed"]]:
        assert entry["reason"].strip()
    for key in ("architectures", "x32", "newerSyscalls"):
        assert POLICY[key]["reason"].strip()


def test_calls_that_create_names_go_to_the_guard(arch: str) -> None:
    numbers = syscall_numbers(arch)
    for name in CREATING:
        if name in numbers:
            assert decide(arch, name, 1, 2, 3, 4, 5) == NOTIFY, name


def test_open_goes_to_the_guard_only_with_o_creat(arch: str) -> None:
    # openat(dirfd, path, flags, mode): flags are the third argument.
    assert decide(arch, "openat", 3, 0x1000, O_CREAT | O_WRONLY, 0o644) == NOTIFY
    assert decide(arch, "openat", 3, 0x1000, O_WRONLY | O_TRUNC, 0) == ALLOW
    assert decide(arch, "openat", 3, 0x1000, O_DIRECTORY, 0) == ALLOW
    # A path pointer whose address happens to have O_CREAT's bit, without O_CREAT: allowed
    # (the first policy had openat's condition on the wrong argument).
    assert decide(arch, "openat", 3, 0x7F0000000040, 0, 0) == ALLOW
    # Only the low 32 bits are flags; bit 38 is nothing.
    assert decide(arch, "openat", 3, 0x1000, O_CREAT << 32, 0) == ALLOW
    if arch == "x86_64":
        assert decide(arch, "open", 0x1000, O_CREAT | O_TRUNC, 0o600) == NOTIFY
        assert decide(arch, "open", 0x1040, 0, 0) == ALLOW


def test_everything_else_stays_in_the_kernel(arch: str) -> None:
    listed = set(guard_syscalls(arch).values())
    for name, nr in syscall_numbers(arch).items():
        if nr in listed:
            continue
        data = seccomp_data(nr, AUDIT_ARCH[arch], (O_CREAT, O_CREAT, O_CREAT, 0, 0, 0))
        assert run(guard_filter(arch), data) == ALLOW, name
    read = {"x86_64": 0, "aarch64": 63}[arch]
    assert run(guard_filter(arch), seccomp_data(read, AUDIT_ARCH[arch], (1, 2, 3))) == ALLOW


def test_other_abis_are_left_to_the_main_filter(arch: str) -> None:
    # local-seccomp.json kills them; this filter must not turn that into a notification.
    assert decide(arch, "mkdirat", 1, 2, 3, audit=0x40000003) == ALLOW


def test_the_guard_handles_every_call_it_is_sent() -> None:
    for arch in ARCHES:
        numbers = guard_syscalls(arch)
        assert set(numbers) >= {"openat", "openat2", "mkdirat", "renameat2", "linkat", "symlinkat"}
        handled = guard.Guard(Rules({}), numbers, listener=-1, events=None).handlers
        assert set(handled) == set(numbers.values()), arch


# ------------------------------------------------------------------ the rules


def rules(tmp_path: Path, **extra: list[str]) -> Rules:
    config = {
        "root": [str(tmp_path / "proj"), str(tmp_path / "home" / ".claude")],
        "name": [".vscode", "CLAUDE.md", ".git", ".bashrc"],
        "git": ["hooks", "config"],
        "protect": [str(tmp_path / "home" / ".claude" / "settings.json")],
    }
    config.update(extra)
    return Rules(config)


def test_protected_names_at_any_depth_under_a_writable_place(tmp_path: Path) -> None:
    r = rules(tmp_path)
    proj = str(tmp_path / "proj")
    assert r.refuses(proj, "CLAUDE.md") == "protected name CLAUDE.md"
    assert r.refuses(f"{proj}/a/b/c", ".vscode") == "protected name .vscode"
    assert r.refuses(f"{proj}/a", ".git") is not None
    assert r.refuses(proj, "README.md") is None
    assert r.refuses(proj, "claude.md") is None  # names are exact
    # Outside every writable place (a fresh /tmp, the read-only rest): not the guard's business.
    assert r.refuses(str(tmp_path / "elsewhere"), "CLAUDE.md") is None
    assert r.refuses(f"{proj}-other", "CLAUDE.md") is None  # a sibling with the same prefix


def test_git_names_only_inside_git_directories(tmp_path: Path) -> None:
    r = rules(tmp_path)
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    bare = proj / "vendor" / "lib.git"
    for d in ("objects", "refs"):
        (bare / d).mkdir(parents=True)
    (bare / "HEAD").write_text("ref: refs/heads/main\n")
    assert r.refuses(str(proj / ".git"), "hooks") == "git's hooks"
    assert r.refuses(str(bare), "config") == "git's config"
    assert r.refuses(str(proj / "src"), "hooks") is None
    assert r.refuses(str(proj / ".git"), "index") is None


def test_protect_paths_and_what_is_below_them(tmp_path: Path) -> None:
    r = rules(tmp_path, protect=[str(tmp_path / "home" / ".claude" / "commands")])
    claude = str(tmp_path / "home" / ".claude")
    assert r.refuses(claude, "commands") == f"protected path {claude}/commands"
    assert r.refuses(f"{claude}/commands/x", "y.md") is not None
    assert r.refuses(claude, "todos") is None


def test_config_survives_any_path() -> None:
    odd = "/tmp/a b\\c\nd\\n%/é"
    entries = [("root", odd), ("name", "CLAUDE.md"), ("root", "/x"), ("syscall", "openat 257")]
    assert read_config(write_config(entries)) == {
        "root": [odd, "/x"],
        "name": ["CLAUDE.md"],
        "syscall": ["openat 257"],
    }


def test_write_guard_files_are_readable_and_complete(tmp_path: Path) -> None:
    from corral.local.jail import GUARD_DIR, guard_command, write_guard

    plan = SimpleNamespace(
        writable=[tmp_path / "proj"],
        deny_dirs=[tmp_path / "home" / ".ssh"],
        deny_files=[tmp_path / "home" / ".netrc"],
        hidden_names=[tmp_path / "other" / ".env"],
        read_holes=[tmp_path / "home" / ".ssh" / "config"],
        scan=SimpleNamespace(missing={tmp_path / "proj" / "githooks"}),
    )
    policy = SimpleNamespace(
        protected_names=frozenset({"CLAUDE.md"}),
        git_protected=("hooks",),
        protect=[tmp_path / "home" / ".claude" / "settings.json"],
    )
    d = write_guard(tmp_path / "g", plan, policy, 9)  # type: ignore[arg-type]
    audit = write_guard(tmp_path / "a", plan, policy, 9, audit_reads=True)  # type: ignore[arg-type]
    assert (audit / "guard.bpf").read_bytes() == guard_filter(audit_reads=True)
    config = read_config((d / "guard.conf").read_bytes())
    assert config["events"] == ["9"] and config["root"] == [str(tmp_path / "proj")]
    assert config["filter"] == [f"{GUARD_DIR}/guard.bpf"]
    assert config["hidden"] == [
        str(tmp_path / p) for p in ("home/.ssh", "home/.netrc", "other/.env")
    ]
    assert config["hole"] == [str(tmp_path / "home" / ".ssh" / "config")]
    assert str(tmp_path / "proj" / "githooks") in config["protect"]
    assert (d / "guard.bpf").read_bytes() == guard_filter()
    assert {f.name for f in d.iterdir()} == {"guard.py", "guard.conf", "guard.bpf"}
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in d.iterdir())
    assert guard_command("/usr/bin/python3")[-1] == "--"
    assert os.path.basename(guard_command("p")[3]) == "guard.py"


def test_the_read_audit_sends_every_open_and_keeps_the_rest(arch: str) -> None:
    audit = guard_filter(arch, audit_reads=True)
    check_program(audit)
    numbers = syscall_numbers(arch)
    for flags in (0, O_DIRECTORY, O_CREAT | O_WRONLY):
        data = seccomp_data(numbers["openat"], AUDIT_ARCH[arch], (3, 0x1000, flags, 0))
        assert run(audit, data) == NOTIFY
    for name in CREATING:
        if name in numbers:
            data = seccomp_data(numbers[name], AUDIT_ARCH[arch], (1, 2, 3, 4))
            assert run(audit, data) == NOTIFY, name
    read = {"x86_64": 0, "aarch64": 63}[arch]
    assert run(audit, seccomp_data(read, AUDIT_ARCH[arch], (1, 2, 3))) == ALLOW


def test_hidden_paths_and_their_holes(tmp_path: Path) -> None:
    r = rules(tmp_path, hidden=["/home/me/.ssh", "/home/me/.netrc"], hole=["/home/me/.ssh/config"])
    assert r.hides("/home/me/.ssh") and r.hides("/home/me/.ssh/id_rsa")
    assert r.hides("/home/me/.netrc") and not r.hides("/home/me/.netrc2")
    assert not r.hides("/home/me/.ssh/config")
    assert not r.hides("/home/me/project/key")
