"""User namespaces with a given id mapping, held only as file descriptors.

An idmapped mount needs a user namespace carrying the mapping. The kernel offers no way to make
one without a process, so a throwaway child is born in a new user namespace, we write its maps
from outside (we are root in the parent namespace, so any range is allowed), keep a descriptor
of ``/proc/<child>/ns/user`` and kill the child; the namespace lives on for as long as the
descriptor is open.

The child is made with ``clone(CLONE_VM | CLONE_NEWUSER)`` on a small private stack and runs
nothing but the raw ``pause`` system call until it is SIGKILLed: ~0.1 ms, where forking the
Python server measured 2-9 ms (page tables) and ``unshare(1)`` ~3 ms. Sharing our memory is safe
because the child never returns from the system call and touches no data (``syscall(2)`` only
writes ``errno`` on a failed return, which SIGKILL prevents). Other architectures fall back to
``os.fork`` with a child that only calls ``unshare`` and waits on a pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal

from corral.host.syscalls import libc, unshare

__all__ = ["CLONE_NEWNET", "CLONE_NEWUSER", "open_userns", "open_userns_with_netns"]

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_CLONE_VM = 0x100
_SYS_PAUSE_X86_64 = 34
_STACK_SIZE = 64 * 1024


def _write_maps(pid: int, host_id: int, count: int, extra: int) -> tuple[int, int | None]:
    mapping = f"0 {host_id} {count}\n".encode()
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, mapping)
        finally:
            os.close(fd)
    user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    if not extra & CLONE_NEWNET:
        return user, None
    try:
        return user, os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(user)
        raise


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # a waitpid(-1) elsewhere may have reaped it
        os.waitpid(pid, 0)


def _open_userns_clone(host_id: int, count: int, extra: int) -> tuple[int, int | None]:
    c = libc.get()
    stack = ctypes.create_string_buffer(_STACK_SIZE)
    top = ctypes.c_void_p((ctypes.addressof(stack) + _STACK_SIZE - 64) & ~0xF)
    clone = c.clone
    clone.restype = ctypes.c_int
    clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    fn = ctypes.cast(c.syscall, ctypes.c_void_p)
    pid = clone(
        fn,
        top,
        _CLONE_VM | CLONE_NEWUSER | extra | signal.SIGCHLD,
        ctypes.c_void_p(_SYS_PAUSE_X86_64),
    )
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"clone(CLONE_NEWUSER): {os.strerror(err)}")
    try:
        return _write_maps(pid, host_id, count, extra)
    finally:
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
        del stack  # only now may the child's stack go


def _open_userns_fork(host_id: int, count: int, extra: int) -> tuple[int, int | None]:
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            unshare(CLONE_NEWUSER)
            if extra:
                unshare(extra)  # owned by the user namespace made just before
            os.write(ready_w, b"1")
            os.read(done_r, 1)
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError("could not create a user namespace")
        return _write_maps(pid, host_id, count, extra)
    finally:
        os.close(done_w)
        os.close(ready_r)
        _reap(pid)


def _open(host_id: int, count: int, extra: int) -> tuple[int, int | None]:
    if platform.machine() == "x86_64":
        return _open_userns_clone(host_id, count, extra)
    return _open_userns_fork(host_id, count, extra)


def open_userns(host_id: int, count: int) -> int:
    """A close-on-exec fd of a new user namespace mapping ids 0..count-1 to host_id.. (uid and gid)."""
    return _open(host_id, count, 0)[0]


def open_userns_with_netns(host_id: int, count: int) -> tuple[int, int]:
    """Like ``open_userns``, plus a new network namespace owned by that user namespace.

    A sandbox's network namespace must belong to its own user namespace: the kernel lets a
    process mount sysfs only when it holds CAP_SYS_ADMIN over its network namespace's owner.
    Root inside still cannot reconfigure it: the sandbox's capability set has no NET_ADMIN.
    """
    user, net = _open(host_id, count, CLONE_NEWNET)
    assert net is not None
    return user, net
