"""Raw Linux system calls that Python's ``os`` module lacks, through ctypes.

Numbers are for x86_64 and aarch64 (the new mount API and ``quotactl_fd`` share the generic
numbering on both). Calls raise ``OSError`` with the kernel's errno; callers translate it.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

__all__ = ["NR", "libc", "syscall", "unshare"]

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
