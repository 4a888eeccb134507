"""The in-sandbox guard of local mode: refuses to create protected names (docs/local.md).

A bind mount protects only what exists when the sandbox starts; a protected name that does not
exist yet (a new ``sub/.vscode/tasks.json``, ``CLAUDE.md``, ``.git/hooks``) has no mount point.
The guard closes that gap with seccomp user notification: the jail starts
``guard.py --config FILE -- CMD...`` as the sandbox's first process; it forks, the child loads
a filter that sends every name-creating syscall (``open``/``openat``/``creat`` with O_CREAT,
``openat2``, ``mkdir``, ``mknod``, ``symlink``, ``link``, ``rename`` and their ``*at``
variants: ``corral/resources/local-guard.json``) to the guard, hands the guard the listener and
execs CMD. Every process CMD starts inherits the filter; nothing can remove it.

For each such call the guard reads the path from the caller's memory once, resolves the parent
directory the way the caller would (its working directory or directory descriptor), and checks
the real location of that parent plus the final name against the rules. It never lets the
kernel re-read the caller's path (``SECCOMP_USER_NOTIF_FLAG_CONTINUE`` would: another thread
can rewrite the string between check and use). It performs the call itself on the resolved
parent's descriptor, with the caller's umask, and hands back the result: the new descriptor is
installed in the caller (``SECCOMP_IOCTL_NOTIF_ADDFD``) for an open, the return value or errno
otherwise. A final symlink is followed by hand, one link at a time, so each target is checked
too. Creating calls are serialized through this one thread, so no rename can move a directory
between a check and the call it guards.

Every other syscall never reaches the guard (the filter's arguments test keeps plain opens in
the kernel), so reading, writing and executing cost nothing.

Trust: the guard runs as the same user as CMD, inside the same namespaces, and has no power CMD
lacks, except that it is outside the filter. It makes itself non-dumpable, so CMD can neither
read or write its memory nor open its descriptors (the listener) through /proc. Killing it
ends the sandbox: it is the first process bwrap starts, bwrap exits with it, and the pid
namespace takes every process with it. Fail closed.

Events (a refused name, a write refused by a read-only mount) go as JSON lines to the
descriptor the config names, which corral reads outside for its violation log.

Only the standard library: corral copies this file into the run's directory, and the sandbox's
user may not be able to import corral itself.
"""

from __future__ import annotations

# _signal and _socket rather than signal and socket: those import enum, and this runs on every
# start of every sandbox.
import _signal  # type: ignore[import-not-found]
import _socket
import _thread
import ctypes
import errno
import os
import select
import stat
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import NoReturn, TypeVar

    T = TypeVar("T")

__all__ = ["Rules", "main", "read_config", "write_config"]

_USAGE = "usage: guard.py --config FILE -- CMD [ARG...]"
_SETUP_FAILED = 125  # as env(1) and chroot(1): the wrapper itself could not start

# <linux/seccomp.h>
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
# Once the guard has received a notification, a signal no longer interrupts the caller's wait
# (Linux 5.19): an interrupted call would be restarted after the guard already performed it.
_SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
_SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
_SECCOMP_ADDFD_FLAG_SEND = 1 << 1


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif (80 bytes)
_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp
_ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd
_NOTIF_RECV = _ioc(3, 0, _NOTIF.size)
_NOTIF_SEND = _ioc(3, 1, _RESP.size)
_NOTIF_ID_VALID = _ioc(1, 2, 8)
_NOTIF_ADDFD = _ioc(1, 3, _ADDFD.size)

_PR_SET_NAME = 15
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_AT_EMPTY_PATH = 0x1000
_RENAME_EXCHANGE = 1 << 1
_OPEN_HOW = struct.Struct("=QQQ")
_PATH_MAX = 4096
_MAX_LINKS = 40  # as the kernel's path walk
_PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


class _Wait(Exception):
    """An open that must block (a FIFO nobody reads yet): to be done in a thread."""

    def __init__(self, dirfd: int, name: str, flags: int) -> None:
        super().__init__(name)
        self.dirfd, self.name, self.flags = dirfd, name, flags


class _Refused(Exception):
    """A call answered with an errno (``errno``) instead of being performed."""

    def __init__(self, err: int, event: tuple[str, str] | None = None) -> None:
        super().__init__(err)
        self.err = err
        self.event = event


# ------------------------------------------------------------------------------- the rules


class Rules:
    """Which names may not be created where (built by corral from the jail's plan)."""

    def __init__(self, config: dict[str, list[str]]) -> None:
        def strings(key: str) -> list[str]:
            return config.get(key, [])

        self.roots = [r.rstrip("/") or "/" for r in strings("root")]
        self.names = frozenset(strings("name"))
        self.git_names = frozenset(strings("git"))
        self.protect = [p.rstrip("/") for p in strings("protect")]
        # What the jail hides (for the read audit of --verbose) and the holes left in it.
        self.hidden = [p.rstrip("/") for p in strings("hidden")]
        self.holes = [p.rstrip("/") for p in strings("hole")]

    @staticmethod
    def _under(path: str, root: str) -> bool:
        return path == root or path.startswith(root + "/") or root == "/"

    def root_of(self, path: str) -> str | None:
        best = None
        for r in self.roots:
            if self._under(path, r) and (best is None or len(r) > len(best)):
                best = r
        return best

    def hides(self, path: str) -> bool:
        """Whether ``path`` (real) is one the jail hides."""
        return any(self._under(path, h) for h in self.hidden) and not any(
            self._under(path, h) for h in self.holes
        )

    def refuses(self, parent: str, name: str) -> str | None:
        """Why creating ``name`` in the directory whose real path is ``parent`` is refused
        (None: it is not)."""
        path = f"{parent.rstrip('/')}/{name}"
        for p in self.protect:
            if self._under(path, p):
                return f"protected path {p}"
        if self.root_of(path) is None:
            return None  # outside the writable places nothing can be created anyway
        if name in self.names:
            return f"protected name {name}"
        if name in self.git_names and _is_git_dir(parent):
            return f"git's {name}"
        if name in _GIT_MARKS and not _is_git_dir(parent):
            # The other way round: a directory holding hooks or config made first (git init
            # --bare does that) must not become a git directory whose hooks git would run.
            held = [g for g in self.git_names if os.path.lexists(f"{parent}/{g}")]
            if held:
                return f"{name} would make a git directory of one holding {held[0]}"
        return None


def write_config(entries: Sequence[tuple[str, str]]) -> bytes:
    """The guard's config file: one ``key value`` line per entry, a key repeated for a list;
    backslash and newline in values escaped."""
    out = []
    for key, value in entries:
        escaped = value.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"{key} {escaped}\n")
    return os.fsencode("".join(out))


def read_config(data: bytes) -> dict[str, list[str]]:
    config: dict[str, list[str]] = {}
    for line in os.fsdecode(data).split("\n"):
        if not line:
            continue
        key, _, value = line.partition(" ")
        parts = value.split("\\\\")
        value = "\\".join(p.replace("\\n", "\n") for p in parts)
        config.setdefault(key, []).append(value)
    return config


# What makes a directory a git directory (git's is_git_directory: HEAD, objects and refs; a
# worktree's has commondir instead of its own objects and refs).
_GIT_MARKS = frozenset({"HEAD", "objects", "refs", "commondir"})


def _is_git_dir(path: str) -> bool:
    if os.path.basename(path) == ".git":
        return True
    # A bare repository, a submodule's (.git/modules/x) or a worktree's (.git/worktrees/x).
    if not os.path.lexists(f"{path}/HEAD"):
        return False
    if os.path.lexists(f"{path}/commondir"):
        return True
    return os.path.lexists(f"{path}/objects") and os.path.lexists(f"{path}/refs")


# ------------------------------------------------------------------------------ the caller


class _Caller:
    """The thread a notification is about: its memory, working directory and descriptors.
    ``start`` (a descriptor of the guard's) replaces its working directory while a symlink's
    relative target is followed."""

    def __init__(self, guard: Guard, notif_id: int, tid: int) -> None:
        self.guard = guard
        self.id = notif_id
        self.tid = tid
        self.target = ""  # what the call was about, for the event log
        self._status: str | None = None

    def status(self, key: str) -> str:
        """A field of /proc/TID/status (read once per notification)."""
        if self._status is None:
            fd = os.open(f"/proc/{self.tid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._status = os.read(fd, 4096).decode()
            finally:
                os.close(fd)
        start = self._status.find(f"\n{key}:\t")
        if start < 0:
            raise KeyError(key)
        start += len(key) + 3
        return self._status[start : self._status.find("\n", start)]

    def umask(self) -> int:
        try:
            return int(self.status("Umask"), 8)
        except (KeyError, OSError, ValueError):
            return 0o022

    def string(self, addr: int) -> str:
        """The NUL-terminated path at ``addr`` in the caller's memory."""
        if addr == 0:
            raise _Refused(errno.EFAULT)
        data = self.guard.read_memory(self.tid, addr, _PATH_MAX + 1)
        end = data.find(b"\0")
        if end < 0:
            raise _Refused(errno.ENAMETOOLONG if len(data) > _PATH_MAX else errno.EFAULT)
        return os.fsdecode(data[:end])

    def base(self, dirfd: int, path: str) -> int:
        """An O_PATH descriptor of where ``path`` starts for the caller (its cwd or dirfd)."""
        if path.startswith("/"):
            return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        dirfd = ctypes.c_int(dirfd).value
        where = "cwd" if dirfd == _AT_FDCWD else f"fd/{dirfd}"
        try:
            return os.open(f"/proc/{self.tid}/{where}", os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Refused(errno.EBADF) from None
        except OSError as exc:
            raise _Refused(exc.errno or errno.EACCES) from None

    def rewrite(self, path: str) -> str:
        """The caller's own /proc entries for names that mean "the calling process"."""
        for prefix, own in _SELF_NAMES:
            if path == prefix or path.startswith(prefix + "/"):
                tgid = self.status("Tgid").strip()
                return own.format(tgid=tgid, tid=self.tid) + path[len(prefix) :]
        return path


_SELF_NAMES = (
    ("/proc/self", "/proc/{tgid}"),
    ("/proc/thread-self", "/proc/{tgid}/task/{tid}"),
    ("/dev/fd", "/proc/{tgid}/fd"),
    ("/dev/stdin", "/proc/{tgid}/fd/0"),
    ("/dev/stdout", "/proc/{tgid}/fd/1"),
    ("/dev/stderr", "/proc/{tgid}/fd/2"),
)


class _Link(_Caller):
    """The caller while the guard follows a symlink: relative targets start at the link's
    directory (a descriptor of the guard's); ``/proc/self`` and ``/dev/stdout`` in a target
    still mean the caller's, as the kernel would read them (``out.log -> /dev/stdout``)."""

    def __init__(self, caller: _Caller, fd: int) -> None:
        super().__init__(caller.guard, caller.id, caller.tid)
        self.caller = caller
        self.fd = fd

    def status(self, key: str) -> str:
        return self.caller.status(key)

    def base(self, dirfd: int, path: str) -> int:
        if path.startswith("/"):
            return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return os.dup(self.fd)


def _real(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class _Where:
    """A resolved parent directory (an O_PATH descriptor), its real path and the final name."""

    def __init__(self, fd: int, name: str, real: str) -> None:
        self.fd, self.name, self.real = fd, name, real

    @property
    def path(self) -> str:
        return self.real if self.name == "." else f"{self.real.rstrip('/')}/{self.name}"

    def close(self) -> None:
        os.close(self.fd)


# ------------------------------------------------------------------------------ the guard


class Guard:
    def __init__(
        self, rules: Rules, numbers: dict[str, int], listener: int, events: int | None
    ) -> None:
        self.rules = rules
        self.listener = listener
        self.events = events
        self._self = f"/proc/{os.getpid()}"
        handlers: dict[str, Callable[[_Caller, Sequence[int]], int | None]] = {
            "open": lambda c, a: self.do_open(c, _AT_FDCWD, a[0], a[1], a[2]),
            "creat": lambda c, a: self.do_open(c, _AT_FDCWD, a[0], _CREAT_FLAGS, a[1]),
            "openat": lambda c, a: self.do_open(c, a[0], a[1], a[2], a[3]),
            "openat2": self.do_openat2,
            "mkdir": lambda c, a: self.do_mkdir(c, _AT_FDCWD, a[0], a[1]),
            "mkdirat": lambda c, a: self.do_mkdir(c, a[0], a[1], a[2]),
            "mknod": lambda c, a: self.do_mknod(c, _AT_FDCWD, a[0], a[1], a[2]),
            "mknodat": lambda c, a: self.do_mknod(c, a[0], a[1], a[2], a[3]),
            "symlink": lambda c, a: self.do_symlink(c, a[0], _AT_FDCWD, a[1]),
            "symlinkat": lambda c, a: self.do_symlink(c, a[0], a[1], a[2]),
            "link": lambda c, a: self.do_link(c, _AT_FDCWD, a[0], _AT_FDCWD, a[1], 0),
            "linkat": lambda c, a: self.do_link(c, a[0], a[1], a[2], a[3], a[4]),
            "rename": lambda c, a: self.do_rename(c, _AT_FDCWD, a[0], _AT_FDCWD, a[1], 0),
            "renameat": lambda c, a: self.do_rename(c, a[0], a[1], a[2], a[3], 0),
            "renameat2": lambda c, a: self.do_rename(c, a[0], a[1], a[2], a[3], a[4]),
            "bind": lambda c, a: self.do_bind(c, a[1], a[2]),
        }
        self.handlers = {numbers[n]: h for n, h in handlers.items() if n in numbers}

    # -------------------------------------------------------------------- the loop

    def serve(self, child: int) -> int:
        """Answer notifications until ``child`` (CMD) exits; its exit status."""
        buf = ctypes.create_string_buffer(_NOTIF.size)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w)
        _signal.signal(_signal.SIGCHLD, lambda *_: None)
        status: int | None = None
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while True:
            status = self._reap(child, status)
            if status is not None:
                return status
            for fd, mask in poller.poll():
                if fd == wake_r:
                    _drain(wake_r)
                elif mask & select.POLLIN:
                    self._one(buf)
                elif mask & (select.POLLHUP | select.POLLERR):
                    poller.unregister(self.listener)  # nobody is left under the filter

    @staticmethod
    def _reap(child: int, status: int | None) -> int | None:
        """Reap every exited child (orphans are reparented here); CMD's exit status once it
        has exited: 128+N for a signal N, as a shell says."""
        while True:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 0 if status is None else status
            if pid == 0:
                return status
            if pid == child:
                code = os.waitstatus_to_exitcode(raw)
                status = 128 - code if code < 0 else code

    def _one(self, buf: ctypes.Array[ctypes.c_char]) -> None:
        ctypes.memset(buf, 0, _NOTIF.size)
        if _libc.ioctl(self.listener, _NOTIF_RECV, buf) != 0:
            return  # ENOENT: the caller was killed before we got it; EINTR: a signal
        notif_id, tid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf.raw)
        handler = self.handlers.get(nr)
        caller = _Caller(self, notif_id, tid)
        err, value = 0, 0
        try:
            if handler is None:
                raise _Refused(errno.ENOSYS)
            result = handler(caller, args)
            if result is None:
                return  # answered already (a descriptor sent with ADDFD)
            if result is _CONTINUE:
                self._reply(notif_id, 0, 0, _SECCOMP_USER_NOTIF_FLAG_CONTINUE)
                return
            value = result
        except _Refused as r:
            err = r.err
            if r.event is not None:
                self.emit(r.event[0], r.event[1], tid)
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err == errno.EROFS and caller.target:
                self.emit("denied write", f"{caller.target} (read-only)", tid)
        except Exception:  # a bug here must not leave the caller waiting
            err = errno.EIO
        self._reply(notif_id, value, err, 0)

    def _reply(self, notif_id: int, value: int, err: int, flags: int) -> None:
        resp = ctypes.create_string_buffer(_RESP.pack(notif_id, value, -err if err else 0, flags))
        _libc.ioctl(self.listener, _NOTIF_SEND, resp)

    # -------------------------------------------------------------------- helpers

    @staticmethod
    def read_memory(tid: int, addr: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``addr``, stopping at a NUL or an unreadable page. Opened
        anew each time: a descriptor kept from before an exec (or a vfork child's, which shares
        its parent's memory until then) would read another address space."""
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            raise _Refused(errno.EACCES) from None  # not dumpable: fail closed
        try:
            out = bytearray()
            pos = addr
            while len(out) < size:
                want = min(size - len(out), _PAGE - pos % _PAGE)
                try:
                    chunk = os.pread(fd, want, pos)
                except OSError:
                    chunk = b""
                out += chunk
                if len(chunk) < want or b"\0" in chunk:
                    break
                pos += want
            return bytes(out)
        finally:
            os.close(fd)

    def valid(self, caller: _Caller) -> None:
        """Still the same caller (not a reused pid): checked after reading its memory."""
        notif_id = ctypes.c_uint64(caller.id)
        if _libc.ioctl(self.listener, _NOTIF_ID_VALID, ctypes.byref(notif_id)) != 0:
            raise _Refused(errno.ENOENT)

    def emit(self, kind: str, detail: str, tid: int) -> None:
        if self.events is None:
            return
        try:
            with open(f"/proc/{tid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = ""
        # Four NUL-terminated fields: no path contains a NUL (json would cost start-up time).
        # Under PIPE_BUF (4096) a write to a pipe is whole or not at all, so records never mix.
        fields = (kind, detail[:2048], str(tid), comm)
        record = b"".join(os.fsencode(f)[:2048] + b"\0" for f in fields)
        try:
            os.write(self.events, record)
        except BlockingIOError:
            pass  # the pipe is full: a slow reader must never stall the sandbox
        except OSError:
            self.events = None

    def locate(self, caller: _Caller, dirfd: int, raw: str) -> _Where:
        """Resolve all but the final component of ``raw`` as the caller would."""
        path = caller.rewrite(raw)
        if not path:
            raise _Refused(errno.ENOENT)
        trimmed = path.rstrip("/") or "/"
        head, _, name = trimmed.rpartition("/")
        if "/" not in trimmed:
            head, name = ".", trimmed
        elif not head:
            head = "/"
        if name in ("", ".", ".."):
            # The final component exists whatever it is: resolve all of it, create nothing.
            head, name = trimmed, "."
        base = caller.base(dirfd, path)
        try:
            fd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=base)
        except OSError as exc:
            raise _Refused(exc.errno or errno.ENOENT) from None
        finally:
            os.close(base)
        real = _real(fd)
        if real == self._self or real.startswith(self._self + "/"):
            os.close(fd)
            raise _Refused(errno.EACCES)  # a symlink to /proc/self, followed as the guard
        where = _Where(fd, name, real)
        # What the call is about, for an event: the last place reached, links followed.
        (caller.caller if isinstance(caller, _Link) else caller).target = where.path
        return where

    def check(self, where: _Where, *, replace: bool = False) -> bool:
        """Refuse to create a protected name; True when the name is protected but exists
        already, so the call must create nothing (mkdir answers EEXIST, open opens it without
        O_CREAT: a protected path that exists is a read-only mount). ``replace``: the call
        would replace an existing one (rename), refused either way."""
        if where.name == ".":
            return False
        why = self.rules.refuses(where.real, where.name)
        if why is None:
            return False
        if not replace and _lstat(where) is not None:
            return True
        raise _Refused(errno.EACCES, ("denied create", f"{where.path} ({why})"))

    def _create(self, where: _Where) -> None:
        """Before mkdir, mknod, symlink, link: EEXIST for a protected name that exists, as
        the kernel would say, without calling it (a symlink with a protected name could be
        removed meanwhile, and the call would then create it)."""
        if self.check(where):
            raise _Refused(errno.EEXIST)

    # -------------------------------------------------------------------- the calls

    def audit(self, caller: _Caller, dirfd: int, addr: int, flags: int) -> None:
        """Report an open of a hidden path, or one for writing on a read-only mount (the mounts
        refuse them; this only tells)."""
        if not self.rules.hidden:
            return
        try:
            path = caller.string(addr)
        except _Refused:
            return
        if path.startswith(("/proc/", "/dev/", "/sys/")):
            return  # kernel files; /proc/self would be the guard's own

        def step(where: _Where) -> str | None:
            st = _lstat(where)
            if st is not None and stat.S_ISLNK(st.st_mode) and not flags & os.O_NOFOLLOW:
                return None
            return where.path

        try:
            real = self.follow(caller, dirfd, path, step)
        except (_Refused, OSError):
            return
        if self.rules.hides(real):
            self.emit("denied read", f"{real} (hidden)", caller.tid)
        elif flags & (os.O_WRONLY | os.O_RDWR) and _read_only(real):
            # A write open without O_CREAT of a file on a read-only mount (`open(f, "r+")`):
            # the kernel refuses it with EROFS.
            self.emit("denied write", f"{real} (read-only)", caller.tid)

    def do_openat2(self, caller: _Caller, a: Sequence[int]) -> int | None:
        if a[3] < _OPEN_HOW.size:
            raise _Refused(errno.EINVAL)
        raw = self.read_memory(caller.tid, a[2], _OPEN_HOW.size)
        if len(raw) < _OPEN_HOW.size:
            raise _Refused(errno.EFAULT)
        flags, mode, resolve = _OPEN_HOW.unpack(raw)
        if resolve:
            # RESOLVE_* restrictions are not emulated; refusing is safe (callers fall back
            # to openat on ENOSYS, as on kernels before 5.6).
            raise _Refused(errno.ENOSYS)
        return self.do_open(caller, a[0], a[1], flags, mode, how=True)

    def do_open(
        self, caller: _Caller, dirfd: int, addr: int, flags: int, mode: int, how: bool = False
    ) -> int | None:
        flags &= 0xFFFFFFFF
        if not flags & os.O_CREAT and not how:
            # Only with --verbose does an open without O_CREAT come here (auditReads). It
            # creates nothing, and its flags are in registers the kernel reuses as they are:
            # let the kernel do it. (openat2's are in memory another thread could change
            # before the kernel reads them again: always performed here.)
            self.audit(caller, dirfd, addr, flags)
            return _CONTINUE
        path = caller.string(addr)
        self.valid(caller)
        if flags & os.O_CREAT and path.endswith("/"):
            raise _Refused(errno.EISDIR)  # as the kernel answers: only a directory ends so
        try:
            fd = self._open(caller, dirfd, path, flags, mode)
        except _Wait as wait:
            _thread.start_new_thread(self._open_later, (caller.id, wait))
            return None  # answered by that thread
        self._send_fd(caller.id, fd, flags)
        return None

    def _open_later(self, notif_id: int, wait: _Wait) -> None:
        """A blocking open (a FIFO's writer waiting for a reader) in a thread of its own, so
        the guard goes on answering everyone else meanwhile."""
        try:
            fd = os.open(wait.name, wait.flags, dir_fd=wait.dirfd)
        except OSError as exc:
            self._reply(notif_id, 0, exc.errno or errno.EIO, 0)
            return
        finally:
            os.close(wait.dirfd)
        try:
            self._send_fd(notif_id, fd, wait.flags)
        except _Refused as r:
            self._reply(notif_id, 0, r.err, 0)

    def _send_fd(self, notif_id: int, fd: int, flags: int) -> None:
        """Install ``fd`` in the caller as the result of its call (ADDFD with SEND)."""
        try:
            cloexec = os.O_CLOEXEC if flags & os.O_CLOEXEC else 0
            addfd = ctypes.create_string_buffer(
                _ADDFD.pack(notif_id, _SECCOMP_ADDFD_FLAG_SEND, fd, 0, cloexec)
            )
            if _libc.ioctl(self.listener, _NOTIF_ADDFD, addfd) < 0:
                err = ctypes.get_errno()
                if err not in (errno.ENOENT, errno.EINPROGRESS):  # not: the caller died
                    raise _Refused(err)
        finally:
            os.close(fd)

    def _open(self, caller: _Caller, dirfd: int, path: str, flags: int, mode: int) -> int:
        """Open as the caller would, following a final symlink by hand so that each target is
        checked; a descriptor of the guard's."""

        def step(where: _Where) -> int | None:
            _own_proc(caller, where)
            final = flags
            if flags & os.O_CREAT and self.check(where):
                if flags & os.O_EXCL:
                    raise _Refused(errno.EEXIST)
                final &= ~os.O_CREAT  # it exists: open it, never make it
            fd = self._open_final(caller, where, final, mode)
            return fd if fd >= 0 else None

        return self.follow(caller, dirfd, path, step)

    def follow(
        self, caller: _Caller, dirfd: int, path: str, step: Callable[[_Where], T | None]
    ) -> T:
        """Resolve ``path`` as the caller would, the final symlink by hand: ``step`` gets each
        final location and gives the answer, or None when a symlink there is to be followed."""
        at: _Caller = caller
        link_dir = -1  # the guard's descriptor of the directory of the link being followed
        try:
            for _ in range(_MAX_LINKS):
                where = self.locate(at, dirfd, path)
                try:
                    answer = step(where)
                    if answer is not None:
                        return answer
                    path = os.readlink(where.name, dir_fd=where.fd)
                    if link_dir >= 0:
                        os.close(link_dir)
                    link_dir = os.dup(where.fd)
                finally:
                    where.close()
                at, dirfd = _Link(caller, link_dir), _AT_FDCWD
            raise _Refused(errno.ELOOP)
        finally:
            if link_dir >= 0:
                os.close(link_dir)

    @staticmethod
    def _open_final(caller: _Caller, where: _Where, flags: int, mode: int) -> int:
        """Open the final component; -1 when it is a symlink to follow."""
        # /proc's entries are magic links to open files, followed as the kernel does (nothing
        # can be created there). Elsewhere O_NOFOLLOW: a symlink comes back to _open.
        proc = where.real == "/proc" or where.real.startswith("/proc/")
        # Never block the guard on a FIFO's other end: O_NONBLOCK for the open, then taken
        # back. A write-only open of a FIFO nobody reads yet must wait: in a thread (_Wait).
        extra = os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if proc else os.O_NOFOLLOW)
        old = os.umask(caller.umask())
        try:
            fd = os.open(where.name, flags | extra, mode & 0o7777, dir_fd=where.fd)
        except OSError as exc:
            if exc.errno == errno.ENXIO and not flags & os.O_NONBLOCK:
                st = _lstat(where)
                if st is not None and stat.S_ISFIFO(st.st_mode):
                    # It exists: nothing is created, so O_CREAT goes (the umask is the
                    # process's, and the thread cannot set it without racing this one).
                    final = (flags | extra) & ~(os.O_NONBLOCK | os.O_CREAT)
                    raise _Wait(os.dup(where.fd), where.name, final) from None
            if exc.errno != errno.ELOOP or proc or flags & (os.O_NOFOLLOW | os.O_EXCL):
                raise
            try:
                st = os.stat(where.name, dir_fd=where.fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if not stat.S_ISLNK(st.st_mode):
                raise
            return -1
        finally:
            os.umask(old)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd

    def do_bind(self, caller: _Caller, addr: int, size: int) -> int:
        """bind() of a unix socket makes a name too. The guard cannot bind the caller's socket
        for it (that would take pidfd_getfd, which the main filter refuses), so it checks the
        name and lets the kernel bind: another thread could swap the path in between and put an
        inert socket on a protected name (it holds no content; the walk after the run reports
        it). Other families carry on untouched."""
        raw = self.read_memory(caller.tid, addr, min(max(size, 0), _SUN_SIZE))
        path = _sun_path(raw[:size])
        if path is None:
            return _CONTINUE
        where = self.locate(caller, _AT_FDCWD, path)
        try:
            self._create(where)
        except _Refused as r:
            if r.err == errno.EEXIST:
                return _CONTINUE  # the kernel answers EADDRINUSE, as it would
            raise
        finally:
            where.close()
        return _CONTINUE

    def _make(
        self,
        caller: _Caller,
        dirfd: int,
        addr: int,
        make: Callable[[_Where], None],
        *,
        umask: bool = True,
    ) -> int:
        """mkdir, mknod, symlink: a new name, made in the directory that was checked."""
        path = caller.string(addr)
        self.valid(caller)
        where = self.locate(caller, dirfd, path)
        try:
            self._create(where)
            old = os.umask(caller.umask()) if umask else None
            try:
                make(where)
            finally:
                if old is not None:
                    os.umask(old)
        finally:
            where.close()
        return 0

    def do_mkdir(self, caller: _Caller, dirfd: int, addr: int, mode: int) -> int:
        return self._make(
            caller, dirfd, addr, lambda w: os.mkdir(w.name, mode & 0o7777, dir_fd=w.fd)
        )

    def do_mknod(self, caller: _Caller, dirfd: int, addr: int, mode: int, dev: int) -> int:
        return self._make(
            caller, dirfd, addr, lambda w: os.mknod(w.name, mode & 0xFFFFFFFF, dev, dir_fd=w.fd)
        )

    def do_symlink(self, caller: _Caller, target_addr: int, dirfd: int, addr: int) -> int:
        target = caller.string(target_addr)
        return self._make(
            caller, dirfd, addr, lambda w: os.symlink(target, w.name, dir_fd=w.fd), umask=False
        )

    def do_link(
        self, caller: _Caller, olddir: int, old_addr: int, newdir: int, new_addr: int, flags: int
    ) -> int:
        old = caller.string(old_addr) if old_addr else ""
        new = caller.string(new_addr)
        self.valid(caller)
        if flags & ~(_AT_SYMLINK_FOLLOW | _AT_EMPTY_PATH):
            raise _Refused(errno.EINVAL)
        where = self.locate(caller, newdir, new)
        try:
            self._create(where)
            if flags & _AT_EMPTY_PATH and not old:
                # linkat(fd, "", ...), how an O_TMPFILE file gets a name: through /proc, which
                # needs no capability (AT_EMPTY_PATH does).
                src = f"/proc/{caller.tid}/fd/{ctypes.c_int(olddir).value}"
                os.link(src, where.name, dst_dir_fd=where.fd, follow_symlinks=True)
                return 0
            old = caller.rewrite(old)
            base = caller.base(olddir, old)
            try:
                os.link(
                    old,
                    where.name,
                    src_dir_fd=base,
                    dst_dir_fd=where.fd,
                    follow_symlinks=bool(flags & _AT_SYMLINK_FOLLOW),
                )
            finally:
                os.close(base)
        finally:
            where.close()
        return 0

    def do_rename(
        self, caller: _Caller, olddir: int, old_addr: int, newdir: int, new_addr: int, flags: int
    ) -> int:
        old = caller.string(old_addr)
        new = caller.string(new_addr)
        self.valid(caller)
        src = self.locate(caller, olddir, old)
        try:
            dst = self.locate(caller, newdir, new)
            try:
                self.check(dst, replace=True)
                if flags & _RENAME_EXCHANGE:
                    self.check(src, replace=True)  # the old name gets the new one's content
                rc = _libc.syscall(
                    _RENAMEAT2,
                    src.fd,
                    os.fsencode(src.name),
                    dst.fd,
                    os.fsencode(dst.name),
                    ctypes.c_uint(flags & 0xFFFFFFFF),
                )
                if rc < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                dst.close()
        finally:
            src.close()
        return 0


def _own_proc(caller: _Caller, where: _Where) -> None:
    """Refuse another process's /proc entries: the guard is the ancestor of every process, so
    where Yama lets only ancestors open /proc/PID/mem it could open more than the caller."""
    parts = where.real.split("/", 3)
    own = len(parts) < 3 or parts[1] != "proc" or not parts[2].isdigit()
    if not own and parts[2] != caller.status("Tgid").strip():
        raise _Refused(errno.EACCES)


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _lstat(where: _Where) -> os.stat_result | None:
    try:
        return os.stat(where.name, dir_fd=where.fd, follow_symlinks=False)
    except OSError:
        return None


def _sun_path(raw: bytes) -> str | None:
    """The path of a ``struct sockaddr_un`` (None: another family, or an abstract name)."""
    if len(raw) <= 2 or struct.unpack("=H", raw[:2])[0] != _socket.AF_UNIX or raw[2] == 0:
        return None
    return os.fsdecode(raw[2:].split(b"\0", 1)[0])


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 512):
                return
        except BlockingIOError:
            return


_CREAT_FLAGS = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_SUN_SIZE = 110  # sizeof(struct sockaddr_un)
_CONTINUE = -(1 << 62)  # a handler's answer: let the kernel perform the call
_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine, 316)
_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(os.uname().machine, 317)


# ------------------------------------------------------------------------------ start-up


def _install(program: bytes) -> int:
    """Load the notification filter into this process; the listener descriptor."""
    insns = ctypes.create_string_buffer(program, len(program))

    class _Fprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    fprog = _Fprog(len(program) // 8, ctypes.cast(insns, ctypes.c_void_p))
    fd = -1
    for flags in (
        _SECCOMP_FILTER_FLAG_NEW_LISTENER | _SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
        _SECCOMP_FILTER_FLAG_NEW_LISTENER,  # before Linux 5.19
    ):
        fd = _libc.syscall(_SECCOMP, _SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog))
        if fd >= 0 or ctypes.get_errno() != errno.EINVAL:
            break
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot load the guard's seccomp filter: {os.strerror(err)}")
    return int(fd)


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"corral guard: {message}\n")
    sys.stderr.flush()
    os._exit(_SETUP_FAILED)


def _exec(cmd: Sequence[str], program: bytes, sock: _socket.socket) -> NoReturn:
    """The child: load the filter, give the guard its listener, become CMD."""
    # Dumpable again (the guard made itself not, before the fork): the guard must read this
    # process's memory for the calls it makes before the exec.
    _libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        listener = _install(program)
        rights = struct.pack("i", listener)
        sock.sendmsg([b"L"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        os.close(listener)
        sock.close()
    except OSError as exc:
        _fail(str(exc))
    try:
        os.execvp(cmd[0], list(cmd))
    except OSError as exc:
        sys.stderr.write(f"corral: cannot run {cmd[0]}: {exc.strerror}\n")
        os._exit(127 if exc.errno == errno.ENOENT else 126)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--config" or args[2] != "--":
        _fail(_USAGE)
    cmd = args[3:]
    try:
        with open(args[1], "rb") as f:
            config = read_config(f.read())
        with open(config["filter"][0], "rb") as f:
            program = f.read()
        rules = Rules(config)
        numbers = {k: int(v) for k, v in (e.split(" ", 1) for e in config["syscall"])}
        events = int(config["events"][0]) if config.get("events") else None
        if events is not None:
            os.set_blocking(events, False)
            os.set_inheritable(events, False)  # CMD never gets it
    except (OSError, ValueError, KeyError, IndexError) as exc:
        _fail(f"bad config {args[1]}: {exc}")
    # Nobody in the sandbox may read the guard's memory or take its descriptors (the listener)
    # through /proc: both need the target to be dumpable. Orphans are reparented here, so the
    # guard stays an ancestor of every caller (Yama's ptrace_scope 1 lets only ancestors read
    # /proc/PID/mem).
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    _libc.prctl(_PR_SET_NAME, b"corral-guard", 0, 0, 0)  # what ps shows inside
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        _exec(cmd, program, theirs)
    theirs.close()
    fds: list[int] = []
    try:
        _msg, ancillary, _flags, _addr = ours.recvmsg(1, _socket.CMSG_SPACE(4))
        for level, kind, data in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4])
    except OSError:
        pass
    ours.close()
    if not fds:
        os.waitpid(pid, 0)  # the child said why on stderr
        os._exit(_SETUP_FAILED)
    # A read-only working directory: a symlink to /proc/self/cwd in the middle of a caller's
    # path is resolved by the kernel as the guard's, and then leads nowhere writable.
    try:
        os.chdir(os.path.dirname(os.path.abspath(args[1])))
    except OSError:
        os.chdir("/")
    # Terminal signals reach the whole foreground group; they are CMD's to handle.
    for sig in (_signal.SIGINT, _signal.SIGQUIT, _signal.SIGHUP, _signal.SIGPIPE):
        _signal.signal(sig, _signal.SIG_IGN)
    os._exit(Guard(rules, numbers, fds[0], events).serve(pid))


if __name__ == "__main__":
    main()
