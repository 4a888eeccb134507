"""Raw Linux system calls that Python's ``os`` module lacks, through ctypes.

Numbers are for x86_64 and aarch64 (the new mount API and ``quotactl_fd`` share the generic
numbering on both). Calls raise ``OSError`` with the kernel's errno; callers translate it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from typing import Any

__all__ = ["NR", "fs_identity", "libc", "syscall", "unshare"]

# Only syscalls >= 424 share one table across architectures; that is all we need here.
NR: dict[str, int] = {
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "mount_setattr": 442,
    "quotactl_fd": 443,
}

_SUPPORTED_MACHINES = ("x86_64", "aarch64")


class _Libc:
    """Loaded lazily so importing this module does no work."""

    _handle: ctypes.CDLL | None = None

    def get(self) -> ctypes.CDLL:
        if self._handle is None:
            if platform.machine() not in _SUPPORTED_MACHINES:
                raise OSError(f"unsupported architecture {platform.machine()}")
            handle = ctypes.CDLL(None, use_errno=True)
            handle.syscall.restype = ctypes.c_long
            handle.unshare.argtypes = [ctypes.c_int]
            handle.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
            handle.mount.argtypes = [
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.c_void_p,
            ]
            self._handle = handle
        return self._handle


libc = _Libc()


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def syscall(name: str, *args: Any) -> int:
    """Call syscall ``name`` with ctypes-compatible arguments; raise OSError on failure."""
    # Variadic C calls would pass a Python int as a 32-bit int; the kernel reads whole registers.
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(libc.get().syscall(ctypes.c_long(NR[name]), *wide))


def unshare(flags: int) -> None:
    _check(libc.get().unshare(flags))


_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


@contextlib.contextmanager
def fs_identity(uid: int, gid: int) -> Iterator[None]:
    """Act on files as ``uid``/``gid`` in this thread, keeping every capability.

    Overlayfs does its own work (work dir, copy-up) with the credentials of whoever created it;
    when its upper layer is an idmapped mount, host root is not in the mapping and that work
    fails with EOVERFLOW, so the overlay must be created under an id the mapping knows. The
    kernel drops the file capabilities (CAP_CHOWN, CAP_DAC_OVERRIDE...) from the effective set
    when the fs uid leaves 0; they are raised again from the permitted set so copy-up can still
    give files their owners. ``setfsuid`` is per thread (glibc does not broadcast it), so only
    the calling thread changes, and only until the block ends.
    """
    c = libc.get()
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    c.setfsgid(gid)
    c.setfsuid(uid)
    try:
        _check(c.capget(ctypes.byref(header), data))
        for d in data:
            d.effective = d.permitted
        _check(c.capset(ctypes.byref(header), data))
        yield
    finally:
        # Back to 0 raises the file capabilities again by itself.
        c.setfsuid(0)
        c.setfsgid(0)
