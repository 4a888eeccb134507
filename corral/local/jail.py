"""The local jail (docs/local.md): a resolved :class:`~corral.local.settings.Policy` becomes a
bubblewrap (``bwrap``) command line, and the command runs in it with its TTY and exit status
passed through.

The command gets new user, mount, pid, ipc, uts, cgroup and network namespaces; the whole
filesystem read-only except the project and ``allow_write`` paths; secrets hidden; and the names
that let code run outside the sandbox later (shell rc files, git hooks and config, agent
configuration) read-only wherever they sit under a writable place. Everything here that looks at
the user's files runs with the user's own uid (a forked child when corral runs as root), so that
the plan sees exactly what bwrap, started as that user, will see.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import io
import json
import os
import pickle
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from corral.errors import CorralError, InvalidRequestError
from corral.local import guard as guard_program
from corral.local.interpreter import interpreter
from corral.local.seccomp import guard_filter, guard_syscalls, local_filter
from corral.local.settings import (
    PROJECT_SETTINGS,
    Flags,
    Policy,
    find_project_dir,
    parse_project_settings,
    parse_user_settings,
    read_settings,
    resolve,
    user_settings_path,
)

if TYPE_CHECKING:
    from corral.net.view import EgressEvent

__all__ = [
    "BWRAP_MISSING",
    "GUARD_DIR",
    "TMPFS_DIRS",
    "Identity",
    "JailError",
    "Plan",
    "SandboxNetwork",
    "Scan",
    "ViolationLog",
    "bwrap_args",
    "bwrap_version",
    "call_as",
    "created_protected",
    "execute",
    "files_holding",
    "find_bwrap",
    "find_hidden_names",
    "host_unix_sockets",
    "plan",
    "resolve_identity",
    "run",
    "run_local",
    "scan_writable",
]

BWRAP_MISSING = (
    "bwrap (bubblewrap) is not installed; corral run needs it: apt-get install bubblewrap "
    "(Debian, Ubuntu), dnf install bubblewrap (Fedora), pacman -S bubblewrap (Arch)"
)
# Fresh, empty and private inside: hides the host's sockets there (X11, tmux, ssh-agent, docker,
# dbus, systemd, databases) and whatever other users left in /tmp.
TMPFS_DIRS = ("/tmp", "/var/tmp", "/run")
# Where the sandbox sees the guard's files (corral/local/guard.py, its filter and config).
GUARD_DIR = "/run/corral-guard"
# The guard answers open() with a descriptor installed by SECCOMP_ADDFD_FLAG_SEND (Linux 5.14).
_GUARD_KERNEL = (5, 14)
_MASKS = Path(__file__).resolve().parent.parent / "resources" / "paths.json"
# Directories and subtrees of a git directory that hold more git directories.
_GIT_NESTS = ("modules", "worktrees")
_GITFILE_MAX = 4096
_GITCONFIG_MAX = 1 << 20
# A directory holding all three is a bare repository, whose hooks git runs on push to it.
_BARE_GIT = frozenset({"HEAD", "objects", "refs"})

T = TypeVar("T")


class JailError(CorralError):
    """The sandbox could not be set up or run (not the command's own failure)."""


# ------------------------------------------------------------------------------ identity


@dataclass(frozen=True)
class Identity:
    """Who the command runs as, and where that user's home is."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: Path
    name: str
    switch: bool  # corral runs as root and becomes uid/gid before anything touches user files
    settings_home: Path  # home of the *invoking* user, whose settings file counts


def _home_of(uid: int, environ: Mapping[str, str]) -> tuple[Path, str]:
    """$HOME when it is a directory owned by ``uid`` (sudo -E, tests), else the passwd entry."""
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    name = entry.pw_name if entry else str(uid)
    env_home = environ.get("HOME", "")
    if env_home.startswith("/"):
        with contextlib.suppress(OSError):
            st = os.stat(env_home)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                return Path(os.path.realpath(env_home)), name
    if entry is not None and entry.pw_dir.startswith("/"):
        return Path(os.path.realpath(entry.pw_dir)), name
    raise InvalidRequestError(f"uid {uid} has no home directory (no passwd entry, HOME unset)")


def resolve_identity(
    environ: Mapping[str, str], project: Path, *, as_root: bool, euid: int | None = None
) -> Identity:
    """Unprivileged: the caller itself. As root: SUDO_UID/SUDO_GID when set (the user who ran
    sudo), else the owner of the project directory; never root itself unless ``as_root``."""
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        home, name = _home_of(euid, environ)
        return Identity(euid, os.getegid(), tuple(os.getgroups()), home, name, False, home)
    if as_root:
        home = Path(os.path.realpath(environ.get("HOME") or "/root"))
        return Identity(0, 0, (0,), home, "root", False, home)
    sudo_uid, sudo_gid = environ.get("SUDO_UID"), environ.get("SUDO_GID")
    if sudo_uid is not None:
        try:
            uid = int(sudo_uid)
            gid = int(sudo_gid) if sudo_gid is not None else uid
        except ValueError:
            raise InvalidRequestError(f"SUDO_UID/SUDO_GID are not numbers: {sudo_uid!r}") from None
    else:
        st = os.stat(project)
        uid = st.st_uid
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = st.st_gid
    if uid == 0:
        raise InvalidRequestError(
            "refusing to run the command as root inside the sandbox (the project belongs to "
            "root and no SUDO_UID is set): run corral from your own user, via sudo, or pass "
            "--as-root if you really mean it"
        )
    home, name = _home_of(uid, environ)
    try:
        groups = tuple(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        groups = (gid,)
    settings_home = home if sudo_uid is not None else _home_of(0, environ)[0]
    return Identity(uid, gid, groups, home, name, True, settings_home)


def call_as(ident: Identity, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with the user's uid and groups: in a forked child when corral is root, so
    that the walk sees what bwrap (started as the user) will see and never reads, as root, a file
    the user could not (a planted .git file pointing at a root-only path, a FIFO ...). Errors
    come back as the same kind (a bad settings file stays a usage error)."""
    if not ident.switch:
        return fn(*args)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            os.setgroups(list(ident.groups))
            os.setgid(ident.gid)
            os.setuid(ident.uid)
            out: tuple[str, object] = ("ok", fn(*args))
        except InvalidRequestError as exc:
            out, code = ("invalid", exc.message), 1
        except BaseException as exc:
            out, code = ("error", f"{type(exc).__name__}: {exc}"), 1
        try:
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(out))
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise JailError("the helper that looks at the project as the user died")
    kind, value = _Unpickler(io.BytesIO(data)).load()
    if kind == "invalid":
        raise InvalidRequestError(str(value))
    if kind != "ok":
        raise JailError(f"looking at the project as uid {ident.uid} failed: {value}")
    return value  # type: ignore[no-any-return]


class _Unpickler(pickle.Unpickler):
    """Only the types call_as returns: what comes back was made by a process running as the
    user, and root must not run whatever a tampered pickle names."""

    _ALLOWED: ClassVar[dict[str, frozenset[str]]] = {
        "builtins": frozenset({"set", "frozenset"}),
        "pathlib": frozenset({"PosixPath", "Path"}),
        "corral.local.jail": frozenset({"Plan", "Scan"}),
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not expected here")


# ----------------------------------------------------------------------------- the walk


def _entries(d: str | Path) -> list[os.DirEntry[str]]:
    """A directory's entries; none when it cannot be read (as the user: nor can the command)."""
    try:
        with os.scandir(d) as it:
            return list(it)
    except OSError:
        return []


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _root_of(path: Path, roots: Iterable[Path]) -> Path | None:
    best: Path | None = None
    for r in roots:
        if _under(path, r) and (best is None or len(r.parts) > len(best.parts)):
            best = r
    return best


@dataclass
class Scan:
    """What walking the writable places found."""

    roots: list[Path] = field(default_factory=list)  # writable roots, real paths
    protected: set[Path] = field(default_factory=set)  # existing entries to make read-only
    # Directories bound onto themselves: a mount point cannot be renamed or removed (EBUSY),
    # so `mv .git x && cp -r x .git` cannot swap a protected path for a writable copy.
    anchors: set[Path] = field(default_factory=set)
    git_roots: set[Path] = field(default_factory=set)  # git dirs of worktrees outside the roots
    links: set[Path] = field(default_factory=set)  # protected names that are symlinks
    # What a git config points at (core.hooksPath, include.path) that does not exist yet: no
    # mount can cover it, the guard refuses to create it.
    missing: set[Path] = field(default_factory=set)
    entries: int = 0


class _Walker:
    def __init__(
        self, names: frozenset[str], git_names: Sequence[str], home: Path | None = None
    ) -> None:
        self.names = names
        self.git_names = git_names
        self.home = home
        self.scan = Scan()

    def protect(self, path: Path, root: Path) -> None:
        self.scan.protected.add(path)
        self.anchor(path.parent, root)

    def anchor(self, d: Path, root: Path) -> None:
        """``d`` and its ancestors up to ``root`` (exclusive) become mount points."""
        while d != root and root in d.parents:
            self.scan.anchors.add(d)
            d = d.parent

    def protect_link(self, path: Path) -> None:
        """A symlink with a protected name: the link itself cannot carry a mount (it can be
        replaced: see docs/local.md), but what it points at is protected when writable."""
        self.scan.links.add(path)
        target = Path(os.path.realpath(path))
        root = _root_of(target, self.scan.roots)
        if root is not None and target != root and os.path.lexists(target):
            self.protect(target, root)

    def walk(self, root: Path) -> None:
        # Hot loop (every entry of the project): strings, not Paths, and DirEntry's d_type
        # instead of a stat per entry; a Path is made only for what matches.
        names = self.names
        stack = [str(root)]
        while stack:
            d = stack.pop()
            entries = _entries(d)  # unreadable to the user: it cannot write there either
            self.scan.entries += len(entries)
            subdirs: list[str] = []
            bare = 0
            for e in entries:
                name = e.name
                if name in _BARE_GIT:
                    bare += 1
                if name == ".git" or name in names:
                    self.matched(e, root)
                    continue
                try:
                    if e.is_dir(follow_symlinks=False):
                        subdirs.append(e.path)
                except OSError:
                    continue
            if bare == len(_BARE_GIT) and d != str(root):
                self.git_dir(Path(d), root)
            else:
                stack.extend(subdirs)

    def matched(self, e: os.DirEntry[str], root: Path) -> None:
        path = Path(e.path)
        try:
            if e.is_symlink():
                self.protect_link(path)
                return
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            return
        if e.name != ".git":
            self.protect(path, root)
        elif is_dir:
            self.git_dir(path, root)
        else:
            self.protect(path, root)
            self.git_file(path)

    def git_dir(self, gdir: Path, root: Path) -> None:
        """Protect a git directory's hooks and config, and those of the git directories nested
        in it (submodules under modules/, worktrees under worktrees/)."""
        # Anchored even when it holds nothing to protect yet: `mv .git x` must stay impossible.
        self.anchor(gdir, root)
        for name in self.git_names:
            p = gdir / name
            if p.is_symlink():
                self.protect_link(p)
            elif os.path.lexists(p):
                self.protect(p, root)
        self.git_config_paths(gdir)
        for nest in _GIT_NESTS:
            self._git_nest(gdir / nest, root)

    def git_config_paths(self, gdir: Path) -> None:
        """What a git directory's config points git at: a ``core.hooksPath`` (husky keeps its
        hooks in the project, ``.husky/``) and included config files. Where they lie in a
        writable place they are as dangerous as hooks and config themselves."""
        for name in ("config", "config.worktree"):
            for value in _git_config_paths(gdir / name):
                if value.startswith("~/") and self.home is not None:
                    candidates = [self.home / value[2:]]
                elif value.startswith("/"):
                    candidates = [Path(value)]
                else:
                    # Relative hooksPath: to the worktree where hooks run (this repository's
                    # top, or the project when it is a linked worktree); relative include
                    # paths: to the config file. All are covered.
                    bases = [gdir, gdir.parent, *self.scan.roots[:1]]
                    candidates = [b / value for b in bases]
                for c in candidates:
                    target = Path(os.path.realpath(c))
                    if not value.strip() or _under(gdir, target):
                        continue  # "" or "." would make the whole repository read-only
                    found = _root_of(target, self.scan.roots)
                    if found is None or target == found:
                        continue
                    if os.path.lexists(target):
                        self.protect(target, found)
                    else:
                        self.scan.missing.add(target)

    def _git_nest(self, d: Path, root: Path) -> None:
        children = [Path(e.path) for e in _entries(d) if e.is_dir(follow_symlinks=False)]
        for child in children:
            # Submodule names may contain '/': modules/a/b is a git dir, modules/a is not.
            if os.path.lexists(child / "HEAD") or os.path.lexists(child / "commondir"):
                self.git_dir(child, root)
            else:
                self._git_nest(child, root)

    def git_file(self, path: Path) -> None:
        """A ``.git`` file (worktree or submodule). When it names a worktree git dir outside
        every writable root, that git dir and its common dir become writable (git must write
        the index, refs and objects) with their hooks and config protected. The git dir must
        point back at this file (git writes that pointer), so a planted ``gitdir: /home/me``
        opens nothing."""
        gitdir = _read_gitfile(path)
        if gitdir is None or _root_of(gitdir, self.scan.roots) is not None:
            return  # inside a writable root: the walk handles it there
        back = _read_pointer(gitdir / "gitdir")
        if back is None or Path(os.path.realpath(back)) != Path(os.path.realpath(path)):
            return
        common = gitdir
        pointer = _read_pointer(gitdir / "commondir")
        if pointer is not None:
            common = Path(os.path.realpath(gitdir / pointer))
        if not (common / "HEAD").is_file() or not (common / "objects").is_dir():
            return
        new_roots = [common] if _under(gitdir, common) else [common, gitdir]
        for r in new_roots:
            if r in self.scan.git_roots:
                continue
            self.scan.git_roots.add(r)
            self.scan.roots.append(r)
            self.git_dir(r, r)


def _read_small(path: Path, limit: int = _GITFILE_MAX) -> str | None:
    """A small regular file's text, never following a symlink nor blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


_SECTION = re.compile(r"\s*\[\s*([A-Za-z0-9.-]+)")
_ENTRY = re.compile(r"\s*([A-Za-z][A-Za-z0-9-]*)\s*=\s*(.*?)\s*$")


def _git_config_paths(path: Path) -> list[str]:
    """``core.hooksPath`` and ``include(If).path`` values of a git config file (the common
    forms: one ``key = value`` a line, optionally double-quoted)."""
    text = _read_small(path, _GITCONFIG_MAX)
    if not text:
        return []
    out: list[str] = []
    section = ""
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1).lower()
            line = line[line.index("]") + 1 :] if "]" in line else ""
        m = _ENTRY.match(line)
        if not m:
            continue
        key, value = m.group(1).lower(), m.group(2)
        if value[:1] in "#;":
            continue
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1]
        else:
            value = re.split(r"\s+[#;]", value, maxsplit=1)[0]
        if (section, key) in {("core", "hookspath"), ("include", "path"), ("includeif", "path")}:
            out.append(value)
    return out


def _read_pointer(path: Path) -> Path | None:
    text = _read_small(path)
    if not text or not text.strip():
        return None
    target = Path(text.strip())
    return target if target.is_absolute() else path.parent / target


def _read_gitfile(path: Path) -> Path | None:
    text = _read_small(path)
    if not text or not text.startswith("gitdir:"):
        return None
    target = Path(text[len("gitdir:") :].strip())
    if not target.is_absolute():
        target = path.parent / target
    return Path(os.path.realpath(target))


def scan_writable(
    roots: Sequence[Path],
    names: frozenset[str],
    git_names: Sequence[str],
    *,
    home: Path | None = None,
    protect: Sequence[Path] = (),
) -> Scan:
    """Walk every writable root (real paths) at any depth for protected names; never follows a
    symlink, never descends into a protected directory. ``home``: the user's own rc files that
    are symlinks into a writable root (a dotfiles repository) get their targets protected.
    ``protect``: more paths to protect if they exist under a writable root."""
    w = _Walker(names, git_names, home)
    w.scan.roots = list(roots)
    for root in list(w.scan.roots):
        if os.path.isdir(root) and not os.path.islink(root):
            w.walk(root)
    if home is not None:
        for name in sorted(names):
            p = home / name
            if p.is_symlink():
                target = Path(os.path.realpath(p))
                found = _root_of(target, w.scan.roots)
                if found is not None and target != found and os.path.lexists(target):
                    w.protect(target, found)
    for p in protect:
        real = Path(os.path.realpath(p))
        found = _root_of(real, w.scan.roots)
        if found is not None and real != found and os.path.lexists(real):
            w.protect(real, found)
    return w.scan


def find_hidden_names(
    under: Sequence[Path],
    patterns: Sequence[str],
    prune: frozenset[str],
    skip: Sequence[Path],
) -> tuple[list[Path], int]:
    """Entries whose name matches ``patterns`` (``.env*``) below ``under``, not descending into
    ``prune`` names nor into ``skip`` subtrees (the project, allow_read, already hidden places),
    never following symlinks. Returns the matches and how many entries were looked at."""
    found: list[Path] = []
    seen = 0
    if not patterns:
        return found, seen
    match = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match
    skip_set = {str(p) for p in skip}
    for base in under:
        if str(base) in skip_set or not os.path.isdir(base):
            continue
        stack = [str(base)]
        while stack:
            d = stack.pop()
            entries = _entries(d)
            seen += len(entries)
            for e in entries:
                name = e.name
                if match(name):
                    if not e.is_symlink() and e.path not in skip_set:
                        found.append(Path(e.path))
                    continue
                try:
                    if (
                        e.is_dir(follow_symlinks=False)
                        and name not in prune
                        and e.path not in skip_set
                    ):
                        stack.append(e.path)
                except OSError:
                    continue
    return found, seen


def host_unix_sockets(table: str | None = None) -> list[Path]:
    """Pathname unix sockets bound on the host (``/proc/net/unix``). A read-only mount does not
    stop connect(2) on a socket file, so each one the jail can see gets /dev/null bound over it;
    abstract sockets are per network namespace and unreachable from the sandbox's."""
    if table is None:
        try:
            table = Path("/proc/net/unix").read_text()
        except OSError:
            return []
    out: dict[Path, None] = {}
    for line in table.splitlines()[1:]:
        parts = line.split(None, 7)
        if len(parts) == 8 and parts[7].startswith("/"):
            out.setdefault(Path(parts[7]), None)
    return list(out)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _masks() -> list[Path]:
    """Kernel files the container tier masks too (corral/resources/paths.json)."""
    data = json.loads(_MASKS.read_text())
    return [Path(e["path"]) for e in data["masked"]]


# ------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """Everything decided before bwrap starts (computed as the user)."""

    project: Path
    cwd: Path
    writable: list[Path]  # roots bound read-write, real paths (project first)
    scan: Scan
    deny_dirs: list[Path]
    deny_files: list[Path]
    read_holes: list[Path]  # allow_read paths inside hidden directories, bound back read-only
    hidden_names: list[Path]  # .env* outside the project
    sockets: list[Path]
    masks: list[tuple[Path, bool]]  # (path, is_dir)
    protect_missing: list[Path]  # protect entries that do not exist (cannot be protected yet)
    notes: list[str]
    walked: int  # directory entries looked at
    scan_roots: list[Path] = field(default_factory=list)  # what the walk started from
    scan_protect: list[Path] = field(default_factory=list)


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _make_plan(policy: Policy, cwd: Path, mask_paths: Sequence[Path] = ()) -> Plan:
    """Runs as the user: touches only the user's files and the kernel's (``mask_paths`` come
    from corral's own resources, read by the caller)."""
    notes: list[str] = []
    project = _real(policy.project)
    writable = [project]
    for p in policy.allow_write:
        if not os.path.lexists(p):
            kind = "mkdir" if p.suffix == "" else "touch"
            notes.append(
                f"allow_write {p} does not exist, so it stays read-only "
                f"(create it first if the command needs it: {kind} {p})"
            )
            continue
        r = _real(p)
        if r not in writable:
            writable.append(r)
    protect = [_real(p) for p in policy.protect]
    scan = scan_writable(
        list(writable),
        policy.protected_names,
        policy.git_protected,
        home=policy.home,
        protect=protect,
    )
    # Missing ones matter only where they could be created: below a writable root.
    protect_missing = [
        p
        for p in policy.protect
        if not os.path.lexists(p) and _root_of(_real(p), scan.roots) is not None
    ]
    writable_all = writable + [r for r in scan.roots if r not in writable]

    deny_dirs: list[Path] = []
    deny_files: list[Path] = []
    for p in policy.deny_read:
        if not os.path.lexists(p):
            continue
        r = _real(p)
        try:
            st = os.stat(r)
        except OSError:
            continue  # the user cannot reach it: nothing to hide from them
        (deny_dirs if stat.S_ISDIR(st.st_mode) else deny_files).append(r)
    read_holes = [
        _real(a)
        for a in policy.allow_read
        if os.path.lexists(a) and any(_under(_real(a), d) for d in deny_dirs)
    ]
    skip = [project, *(_real(a) for a in policy.allow_read), *deny_dirs]
    hidden, walked_hidden = find_hidden_names(
        policy.hide_under, policy.hide_names, policy.hide_prune, skip
    )
    # A socket under a fresh tmpfs is gone inside, unless a bind shows its directory again
    # (the home or a writable root living under /tmp).
    tmpfs = [Path(d) for d in TMPFS_DIRS]
    shown = [_real(policy.home), *writable_all]

    def visible(s: Path) -> bool:
        if any(_under(s, d) for d in deny_dirs):
            return False
        return not any(_under(s, t) for t in tmpfs) or any(_under(s, b) for b in shown)

    sockets = [r for r in map(_real, host_unix_sockets()) if visible(r) and _is_socket(r)]
    masks = []
    for m in mask_paths:
        with contextlib.suppress(OSError):
            masks.append((m, stat.S_ISDIR(os.stat(m).st_mode)))
    return Plan(
        project=project,
        cwd=_real(cwd),
        writable=writable_all,
        scan=scan,
        deny_dirs=deny_dirs,
        deny_files=deny_files,
        read_holes=read_holes,
        hidden_names=hidden,
        sockets=sockets,
        masks=masks,
        protect_missing=protect_missing,
        notes=notes,
        walked=scan.entries + walked_hidden,
        scan_roots=writable,
        scan_protect=protect,
    )


def plan(policy: Policy, ident: Identity, cwd: Path) -> Plan:
    """Look at the user's files (as the user) and decide every mount."""
    home = _real(policy.home)
    # A writable home would make every rc file, ~/.ssh/authorized_keys and ~/.config writable
    # (and the walk would cover all of it); / would make everything writable.
    for i, root in enumerate((policy.project, *policy.allow_write)):
        real = _real(root)
        if real == Path("/") or _under(home, real):
            hint = "run corral from a project directory" if i == 0 else "name a narrower path"
            raise InvalidRequestError(
                f"refusing to make {real} writable: it holds your whole home directory ({hint})"
            )
    return call_as(ident, _make_plan, policy, cwd, _masks())


def _depth_sorted(paths: Iterable[Path]) -> list[Path]:
    return sorted(set(paths), key=lambda p: (len(p.parts), str(p)))


def bwrap_args(
    p: Plan,
    *,
    home: Path,
    stdin_tty: bool,
    disable_userns: bool = True,
    runtime_dir: str | None = None,
    net_dir: tuple[Path, str] | None = None,
    ro_files: Sequence[tuple[Path, str]] = (),
    guard_dir: Path | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> list[str]:
    """bwrap's options (not the program) for a plan. Order matters: later mounts cover earlier
    ones, so read-write binds come first, then what is made read-only, then what is hidden."""
    a: list[str] = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",  # only lo: nothing leaves except through corral's relay
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
    ]
    if disable_userns:
        # No nested user namespaces (the door to mount, and to most kernel attack surface);
        # the seccomp filter says the same, this holds even without it.
        a.append("--disable-userns")
    if not stdin_tty:
        # No controlling terminal to push keystrokes into (TIOCSTI); with a TTY on stdin the
        # command needs it (job control, /dev/tty) and the seccomp filter blocks TIOCSTI.
        a.append("--new-session")
    if uid is not None:
        a += ["--uid", str(uid)]
    if gid is not None:
        a += ["--gid", str(gid)]
    a += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    tmpfs = [t for t in TMPFS_DIRS if os.path.isdir(t) and not os.path.islink(t)]
    for t in tmpfs:
        a += ["--tmpfs", t]
    if runtime_dir and any(_under(Path(runtime_dir), Path(t)) for t in tmpfs):
        # An empty private XDG_RUNTIME_DIR: tools expect one; the host's (pulse, wayland, dbus,
        # gpg-agent sockets) stays outside.
        a += ["--perms", "0700", "--dir", runtime_dir]
    # The home (read-only) and the project must show through a fresh tmpfs they live under
    # (tests keep both in /tmp).
    for t in tmpfs:
        if _under(home, Path(t)) and home != Path(t):
            a += ["--ro-bind", str(home), str(home)]
    for w in _depth_sorted(p.writable):
        a += ["--bind", str(w), str(w)]
    for d in _depth_sorted(p.scan.anchors):
        a += ["--bind", str(d), str(d)]
    for x in _depth_sorted(p.scan.protected):
        a += ["--ro-bind", str(x), str(x)]
    for m, is_dir in p.masks:
        a += ["--tmpfs", str(m), "--remount-ro", str(m)] if is_dir else _null(m)
    deny_dirs = _depth_sorted(p.deny_dirs)
    for d in deny_dirs:
        a += ["--tmpfs", str(d)]
    for f in _depth_sorted(p.deny_files):
        a += _null(f)
    # Holes first, while the tmpfs can still take their mount points; read-only after.
    for h in _depth_sorted(p.read_holes):
        a += ["--ro-bind", str(h), str(h)]
    for d in deny_dirs:
        a += ["--remount-ro", str(d)]
    for n in _depth_sorted(p.hidden_names):
        a += ["--tmpfs", str(n), "--remount-ro", str(n)] if n.is_dir() else _null(n)
    for s in _depth_sorted(p.sockets):
        a += _null(s)
    if net_dir is not None:
        src, dest = net_dir
        # Read-only: connecting to the proxy's socket writes nothing, and the CA files beside it
        # are not the sandbox's to change.
        a += ["--ro-bind", str(src), dest]
    if guard_dir is not None:
        a += ["--ro-bind", str(guard_dir), GUARD_DIR]
    # Files the network puts in place of the host's (a CA bundle that trusts the run's own CA
    # for secrets): bound last, over whatever the host has there.
    for src, dest in ro_files:
        a += ["--ro-bind", str(src), dest]
    a += ["--chdir", str(p.cwd)]
    return a


def _null(path: Path) -> list[str]:
    return ["--ro-bind", "/dev/null", str(path)]


# ---------------------------------------------------------------------------- running


class SandboxNetwork(Protocol):
    """What the jail needs of corral.local.net.LocalNetwork."""

    @property
    def socket_dir(self) -> Path: ...

    def sandbox_env(self) -> dict[str, str]: ...

    def ro_files(self) -> list[tuple[Path, str]]:
        """(host file, sandbox path) pairs the jail binds read-only over the sandbox's view."""
        ...

    def wrap(self, argv: Sequence[str]) -> list[str]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ViolationLog:
    """What the sandbox was denied that corral can see (network events; protected names
    created during the run), live with ``verbose`` and counted for the summary at exit."""

    def __init__(self, say: Callable[[str], None], *, verbose: bool) -> None:
        self._say = say
        self._verbose = verbose
        self.counts: dict[str, int] = {}

    def record(self, kind: str, detail: str, *, always: bool = False) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self._verbose or always:
            self._say(f"{kind}: {detail}")

    def summary(self) -> str | None:
        if not self.counts:
            return None
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
        return f"during the run: {parts}"


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise JailError(BWRAP_MISSING)
    return path


@functools.cache
def bwrap_version(bwrap: str) -> tuple[int, ...]:
    """``bwrap --version`` as numbers ((0,) when it cannot be told)."""
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return (0,)
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)  # inheritable by bwrap: no MFD_CLOEXEC
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


async def run(
    args: Sequence[str],
    argv: Sequence[str],
    env: Mapping[str, str],
    ident: Identity,
    *,
    interactive: bool = False,
    seccomp: bytes | None = None,
    network: SandboxNetwork | None = None,
    guard: Sequence[str] = (),
    pass_fds: Sequence[int] = (),
    bwrap: str | None = None,
) -> int:
    """Run ``argv`` under bwrap with ``args``; the command's exit status (128+n for a signal).
    ``guard``: the guard's command line, put in front of everything; ``pass_fds``: descriptors
    bwrap passes on (the guard's event pipe).
    The command inherits stdin/stdout/stderr (a TTY passes through as itself); ``interactive``:
    stdin is that TTY, and the command decides what ^C and ^\\ do."""
    bwrap = bwrap or find_bwrap()
    fds: list[int] = []
    status_r, status_w = os.pipe()
    os.set_inheritable(status_w, True)
    loop = asyncio.get_running_loop()
    procs: list[asyncio.subprocess.Process] = []
    saved: dict[int, Any] = {}
    keys = (signal.SIGINT, signal.SIGQUIT)
    try:
        full = list(args)
        if seccomp is not None:
            fd = _memfd("corral-seccomp", seccomp)
            fds.append(fd)
            full += ["--seccomp", str(fd)]
        full += ["--json-status-fd", str(status_w)]
        # The options through a memfd (thousands of mounts would strain ARG_MAX); bwrap takes
        # the command itself only from its real argv.
        args_fd = _memfd("corral-bwrap-args", b"".join(s.encode() + b"\0" for s in full))
        fds.append(args_fd)
        inner = list(argv)
        reset = _default_signal_wrapper() if interactive else None
        if interactive:
            # ^C and ^\ go to the terminal's whole foreground process group: corral, bwrap,
            # bwrap's init and the command. Ignored by corral and so by bwrap and its init (an
            # ignored signal stays ignored across exec), and set back to the default for the
            # command, so that a command that traps ^C (an agent interrupting its turn) is not
            # killed because bwrap died of it.
            for sig in keys:
                saved[sig] = signal.signal(sig, signal.SIG_IGN)
            if reset is not None:
                inner = [*reset, *inner]
        else:
            # The command has no terminal (its own session): ^C at corral's terminal ends
            # bwrap and so the sandbox; corral stays to clean up and report.
            for sig in keys:
                loop.add_signal_handler(sig, lambda: None)
        # A TERM or HUP sent to corral is passed on to bwrap.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, _forward, procs, sig)
        if network is not None:
            inner = network.wrap(inner)
        inner = [*guard, *inner]
        extra: dict[str, object] = {}
        if ident.switch:
            extra = {"user": ident.uid, "group": ident.gid, "extra_groups": list(ident.groups)}
        proc = await asyncio.create_subprocess_exec(
            bwrap,
            "--args",
            str(args_fd),
            "--",
            *inner,
            env=dict(env),
            pass_fds=[*fds, status_w, *pass_fds],
            **extra,  # type: ignore[arg-type]
        )
        procs.append(proc)
        os.close(status_w)
        status_w = -1
        rc = await proc.wait()
        status = _read_ready(status_r)
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for sig in keys:
            if sig in saved:
                signal.signal(sig, saved[sig])
            else:
                loop.remove_signal_handler(sig)
        for fd in fds:
            os.close(fd)
        if status_w != -1:
            os.close(status_w)
        os.close(status_r)
    if rc < 0:
        return 128 - rc
    if rc != 0 and b'"exit-code"' not in status:
        # bwrap reports both a failed mount and a command it could not execute this way.
        raise JailError(
            f"the sandbox could not be set up or the command not started (bwrap exited {rc}; "
            "its message is above)"
        )
    return rc


@functools.cache
def _default_signal_wrapper() -> tuple[str, ...] | None:
    """``env --default-signal=INT,QUIT --`` (GNU coreutils 8.31+), which gives the command the
    default ^C and ^\\ back; None where env lacks it (then a command inherits them ignored)."""
    env = shutil.which("env")
    if env is None:
        return None
    wrapper = (env, "--default-signal=INT,QUIT", "--")
    try:
        ok = subprocess.run([*wrapper, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return wrapper if ok else None


def _forward(procs: list[asyncio.subprocess.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _read_ready(fd: int) -> bytes:
    """What bwrap wrote on its status pipe. Read without blocking: bwrap has exited, so all of
    it is there, and nothing that might still hold the pipe open can make corral wait."""
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def stdin_is_tty() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------- secrets in files

# A file larger than this is not looked into (rc files and dotenv files are small).
_LOOK_MAX = 1 << 20


def files_holding(candidates: Sequence[Path], values: Mapping[str, str]) -> list[tuple[Path, str]]:
    """(real path, variable) for each candidate file that holds the value of a variable bound as
    a secret: the sandbox could read the key there. Runs as the user (``call_as``)."""
    found: list[tuple[Path, str]] = []
    needles = {env: v.encode() for env, v in values.items() if v}
    for path in candidates:
        try:
            real = _real(path)
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode) or st.st_size > _LOOK_MAX:
                continue
            data = real.read_bytes()
        except OSError:
            continue
        for env, needle in needles.items():
            if needle in data:
                found.append((real, env))
                break
    return found


def secret_file_candidates(policy: Policy, p: Plan) -> list[Path]:
    """Where a bound key is likely written down in plain text and visible inside: the home's
    dotfiles (an ``export`` in an rc file) and the ``.env*`` files of the project's top and of
    the working directory (those elsewhere are hidden anyway)."""
    out = [Path(e.path) for e in _entries(policy.home) if e.name.startswith(".")]
    for d in dict.fromkeys((p.project, p.cwd)):
        out += [Path(e.path) for e in _entries(d) if fnmatch.fnmatch(e.name, ".env*")]
    return out


# ---------------------------------------------------------------------------- the guard


@functools.cache
def guard_supported() -> bool:
    """Whether this kernel can run the guard (seccomp user notification with ADDFD_FLAG_SEND)."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return m is not None and (int(m[1]), int(m[2])) >= _GUARD_KERNEL


def write_guard(
    directory: Path, p: Plan, policy: Policy, events_fd: int, *, audit_reads: bool = False
) -> Path:
    """The guard's program, filter and config for one run, in ``directory`` (made here,
    readable by everyone: nothing in it is secret, and the sandbox's user must read it).
    ``audit_reads``: every open goes through the guard, which reports opens of hidden paths."""
    directory.mkdir(mode=0o755)
    program = directory / "guard.py"
    shutil.copyfile(guard_program.__file__, program)
    (directory / "guard.bpf").write_bytes(guard_filter(audit_reads=audit_reads))
    entries = [("filter", f"{GUARD_DIR}/guard.bpf"), ("events", str(events_fd))]
    entries += [("syscall", f"{name} {nr}") for name, nr in guard_syscalls().items()]
    entries += [("root", str(r)) for r in p.writable]
    entries += [("name", n) for n in sorted(policy.protected_names)]
    entries += [("git", n) for n in policy.git_protected]
    entries += [("protect", str(_real(x))) for x in policy.protect]
    entries += [("protect", str(x)) for x in sorted(p.scan.missing)]
    entries += [("hidden", str(h)) for h in (*p.deny_dirs, *p.deny_files, *p.hidden_names)]
    entries += [("hole", str(h)) for h in p.read_holes]
    (directory / "guard.conf").write_bytes(guard_program.write_config(entries))
    for f in directory.iterdir():
        f.chmod(0o644)
    return directory


def guard_command(python: str) -> list[str]:
    """The guard in front of the command, run like the relay: isolated, without site, from
    the copy in GUARD_DIR (no ``corral`` in the project can stand in for it)."""
    return [
        python,
        "-I",
        "-S",
        f"{GUARD_DIR}/guard.py",
        "--config",
        f"{GUARD_DIR}/guard.conf",
        "--",
    ]


class GuardEvents:
    """The pipe the guard reports refusals on, read into the violation log as they come."""

    def __init__(self, log: ViolationLog, loop: asyncio.AbstractEventLoop) -> None:
        self._log = log
        self._loop = loop
        self._read, self.write_fd = os.pipe()
        os.set_blocking(self._read, False)
        self._pending = b""
        loop.add_reader(self._read, self._ready)

    def _ready(self) -> None:
        if self._consume() is None:
            self._loop.remove_reader(self._read)  # the end: every writer is gone

    def _consume(self) -> bool | None:
        """Log the complete records that can be read now: True if there were some, False if
        nothing is there yet, None at the end."""
        try:
            data = os.read(self._read, 65536)
        except BlockingIOError:
            return False
        except OSError:
            return None
        if not data:
            return None
        fields = (self._pending + data).split(b"\0")
        complete = (len(fields) - 1) // 4 * 4
        self._pending = b"\0".join(fields[complete:])
        for i in range(0, complete, 4):
            kind, detail, pid, comm = (os.fsdecode(f) for f in fields[i : i + 4])
            self._log.record(kind, f"{detail} [{comm or '?'} pid {pid}]")
        return True

    def close(self) -> None:
        """Log what is left (the sandbox is gone), then close both ends."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        self._loop.remove_reader(self._read)
        while self._consume():
            pass
        os.close(self._read)


# --------------------------------------------------------------------------- one run


def created_protected(policy: Policy, before: Plan) -> list[Path]:
    """Protected names that appeared under the writable places during the run. Mounts protect
    only what exists when the sandbox starts (docs/local.md, known gaps); this at least tells."""
    after = scan_writable(
        list(before.scan_roots),
        policy.protected_names,
        policy.git_protected,
        home=policy.home,
        protect=before.scan_protect,
    )
    return sorted(after.protected - before.scan.protected)


def _describe_plan(p: Plan, policy: Policy, say: Callable[[str], None], seconds: float) -> None:
    say(f"project {p.project} (writable), working directory {p.cwd}")
    say(f"profile {policy.profile or '(none)'}; settings: {', '.join(policy.sources)}")
    for w in p.writable[1:]:
        say(f"also writable: {w}")
    say(
        f"read-only inside writable places: {len(p.scan.protected)} protected paths, "
        f"{len(p.scan.anchors)} directories pinned (walked {p.walked} entries "
        f"in {seconds * 1000:.0f} ms)"
    )
    for link in sorted(p.scan.links):
        say(f"protected name is a symlink (the link itself can be replaced): {link}")
    for miss in p.protect_missing:
        say(f"not protected (does not exist yet): {miss}")
    say(
        f"hidden: {len(p.deny_dirs) + len(p.deny_files)} deny_read paths, "
        f"{len(p.hidden_names)} {'/'.join(policy.hide_names)} files outside the project, "
        f"{len(p.sockets)} host unix sockets"
    )
    if policy.allow_domains:
        say(f"network: only {', '.join(policy.allow_domains)} through corral's proxy")
    else:
        say("network: none (no domain allowed)")


def _net_event(log: ViolationLog, say: Callable[[str], None], verbose: bool) -> Callable[..., None]:
    def on_event(event: EgressEvent) -> None:
        if event.kind == "inject":
            # A request the proxy put a secret into: "POST /v1/messages: injected NAME, ...".
            if verbose:
                request, _, names = event.reason.rpartition(": injected ")
                say(f"injected {names}: {event.name} {request}")
            return
        where = event.name or event.ip or "?"
        if event.port:
            where = f"{where}:{event.port}"
        if event.decision == "deny":
            log.record(f"denied {event.kind}", f"{where} ({event.reason})")
        elif verbose:
            say(f"allowed {event.kind}: {where}")

    return on_event


async def execute(
    policy: Policy,
    argv: Sequence[str],
    *,
    ident: Identity,
    cwd: Path,
    environ: Mapping[str, str],
    say: Callable[[str], None],
    verbose: bool = False,
    stdin_tty: bool | None = None,
) -> int:
    """Plan, start the network when a domain is allowed, run ``argv`` in the jail, report.
    Returns the command's exit status."""
    if not argv:
        raise InvalidRequestError("no command given: corral run [OPTIONS] -- CMD [ARGS...]")
    bwrap = find_bwrap()
    for notice in policy.notices:
        say(notice)
    started = time.monotonic()
    p = plan(policy, ident, cwd)
    for note in p.notes:
        say(note)
    if verbose:
        _describe_plan(p, policy, say, time.monotonic() - started)
    log = ViolationLog(say, verbose=verbose)
    env = policy.sandbox_env(environ)
    env["HOME"] = str(ident.home)
    if ident.switch:
        env["USER"] = env["LOGNAME"] = ident.name
    tty = stdin_is_tty() if stdin_tty is None else stdin_tty
    network: SandboxNetwork | None = None
    net_dir: tuple[Path, str] | None = None
    owner = (ident.uid, ident.gid) if ident.switch else None
    # A fresh directory: nothing another local user prepared in /tmp is trusted.
    tmp = Path(tempfile.mkdtemp(prefix="corral-local-"))
    events: GuardEvents | None = None
    try:
        os.chmod(tmp, 0o711)  # the user's bwrap must traverse it when corral is root
        guard: list[str] = []
        guard_dir: Path | None = None
        if guard_supported():
            events = GuardEvents(log, asyncio.get_running_loop())
            guard_dir = write_guard(tmp / "guard", p, policy, events.write_fd, audit_reads=verbose)
            guard = guard_command(interpreter(owner))
        else:
            say(
                "protected names that do not exist yet are not guarded: the kernel is older "
                f"than {'.'.join(map(str, _GUARD_KERNEL))} (their creation is reported at exit)"
            )
        values = {s.env: environ[s.env] for s in policy.secrets if environ.get(s.env)}
        if values:
            # A key kept outside must not be readable in a file inside: hide what holds it.
            held = call_as(ident, files_holding, secret_file_candidates(policy, p), values)
            for path, var in held:
                say(f"{path} holds the value of {var}: hidden inside (deny_read it to say so)")
                if path not in p.deny_files:
                    p.deny_files.append(path)
        if policy.allow_domains:
            # Imported here: the egress stack is most of corral run's start-up time, and a run
            # without network does not need it.
            from corral.local.net import SANDBOX_NET_DIR, LocalNetwork

            local = LocalNetwork(
                policy.allow_domains,
                tmp / "run",
                on_event=_net_event(log, say, verbose),
                owner=owner,
                secrets=policy.secrets,
                environ=environ,
                note=say if verbose else None,
            )
            network = local
            await local.start()
            env.update(local.sandbox_env())
            net_dir = (local.socket_dir, SANDBOX_NET_DIR)
        args = bwrap_args(
            p,
            home=ident.home,
            stdin_tty=tty,
            # 0.8 brought --disable-userns; before it the seccomp filter alone refuses them.
            disable_userns=bwrap_version(bwrap) >= (0, 8),
            runtime_dir=env.get("XDG_RUNTIME_DIR"),
            net_dir=net_dir,
            ro_files=network.ro_files() if network is not None else (),
            guard_dir=guard_dir,
        )
        rc = await run(
            args,
            argv,
            env,
            ident,
            interactive=tty,
            seccomp=local_filter(),
            network=network,
            guard=guard,
            pass_fds=[events.write_fd] if events is not None else [],
            bwrap=bwrap,
        )
    finally:
        if events is not None:
            events.close()
        if network is not None:
            await network.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for path in call_as(ident, created_protected, policy, p):
        log.record(
            "protected path created", f"{path} (appeared during the run; check it)", always=True
        )
    summary = log.summary()
    if summary:
        say(summary)
    return rc


def _say_stderr(message: str) -> None:
    sys.stderr.write(f"corral: {message}\n")
    sys.stderr.flush()


def run_local(
    flags: Flags,
    argv: Sequence[str],
    *,
    as_root: bool = False,
    verbose: bool = False,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    say: Callable[[str], None] = _say_stderr,
    stdin_tty: bool | None = None,
) -> int:
    """``corral run``: find the project and the user, merge the settings, run ``argv``."""
    environ = dict(os.environ) if environ is None else environ
    cwd = Path(os.path.realpath(cwd or os.getcwd()))
    project = find_project_dir(cwd)
    ident = resolve_identity(environ, project, as_root=as_root)
    user_file = user_settings_path(ident.settings_home, environ)
    project_file = project / PROJECT_SETTINGS
    # Each file is read as its owner would: the user's own as the user (never as root, which
    # could read what a symlink there points at), root's own (root without sudo) as root. Only
    # the reading: parsing needs modules the user may not be able to load.
    if ident.settings_home == ident.home:
        user_text = call_as(ident, read_settings, user_file)
    else:
        user_text = read_settings(user_file)
    project_text = call_as(ident, read_settings, project_file)
    user = None if user_text is None else parse_user_settings(user_text, user_file)
    project_settings = (
        None if project_text is None else parse_project_settings(project_text, project_file)
    )
    policy = resolve(
        flags,
        project=project,
        home=ident.home,
        cwd=cwd,
        user=user,
        project_settings=project_settings,
        user_file=user_file,
    )
    return asyncio.run(
        execute(
            policy,
            argv,
            ident=ident,
            cwd=cwd,
            environ=environ,
            say=say,
            verbose=verbose,
            stdin_tty=stdin_tty,
        )
    )
