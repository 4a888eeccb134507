"""Idmapped overlay root filesystems through the new mount API (ctypes), and unmounting.

A template layer is owned by host root and shared read-only by every sandbox. Each sandbox sees
it through a *detached idmapped* clone (``open_tree(OPEN_TREE_CLONE)`` → ``mount_setattr
(MOUNT_ATTR_IDMAP)``) that shifts host uid 0 to the sandbox's range, handed to overlayfs as a
file descriptor (``fsconfig(FSCONFIG_SET_FD, "lowerdir+")``, kernel ≥ 6.13). The clones are never
attached anywhere, so the only mount left on the host is the overlay itself.

The sandbox's own disk (overlay upper and work) is idmapped the same way, writable: files on it
keep the ids the sandbox sees (0 for its root), not the host range it happens to run in, so a
snapshot of the disk can start in any other sandbox's range (fork) without a chown walk.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from corral.host.syscalls import fs_identity, libc, syscall

__all__ = ["idmapped_clone", "mount_overlay", "unmount"]

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x00100000
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_SET_FD = 5
_FSCONFIG_CMD_CREATE = 6
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def idmapped_clone(source: Path, userns_fd: int, *, writable: bool = False) -> int:
    """A detached clone of the mount at ``source`` with ``userns_fd``'s id mapping, read-only
    unless ``writable``.

    Returns the mount's file descriptor (close-on-exec); closing it releases the clone.
    """
    fd = syscall(
        "open_tree",
        _AT_FDCWD,
        ctypes.c_char_p(os.fsencode(source)),
        _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_SYMLINK_NOFOLLOW,
    )
    try:
        attr = _MountAttr(
            _MOUNT_ATTR_IDMAP
            | (0 if writable else _MOUNT_ATTR_RDONLY)
            | _MOUNT_ATTR_NODEV
            | _MOUNT_ATTR_NOSUID,
            0,
            0,
            userns_fd,
        )
        syscall(
            "mount_setattr",
            fd,
            ctypes.c_char_p(b""),
            _AT_EMPTY_PATH,
            ctypes.byref(attr),
            ctypes.sizeof(attr),
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fs_log(fs_fd: int) -> str:
    """The messages the filesystem queued on its context fd (overlayfs explains refusals there)."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        while True:
            line = os.read(fs_fd, 4096)
            if not line:
                break
            lines.append(line.decode(errors="replace"))
    return "; ".join(lines)


def mount_overlay(
    lowers: Sequence[int],
    upper: Path | int,
    work: Path | int,
    target: Path,
    *,
    creator: int | None = None,
) -> None:
    """Mount overlayfs at ``target``: ``lowers`` are mount fds, topmost first; ``upper`` and
    ``work`` are paths or ``O_PATH`` descriptors (for directories on a detached idmapped mount);
    ``creator``: the host id overlayfs acts as for its own work (needed when upper is idmapped).

    The overlay is ``nodev`` (device nodes come from the runtime's own bind mounts) but keeps
    setuid binaries working inside the sandbox, where ``noNewPrivileges`` defuses them anyway.
    """
    fs_fd = syscall("fsopen", ctypes.c_char_p(b"overlay"), _FSOPEN_CLOEXEC)
    try:
        try:
            for lower in lowers:
                syscall(
                    "fsconfig", fs_fd, _FSCONFIG_SET_FD, ctypes.c_char_p(b"lowerdir+"), None, lower
                )
            for key, value in (("upperdir", upper), ("workdir", work)):
                if isinstance(value, int):
                    syscall(
                        "fsconfig",
                        fs_fd,
                        _FSCONFIG_SET_FD,
                        ctypes.c_char_p(key.encode()),
                        None,
                        value,
                    )
                    continue
                syscall(
                    "fsconfig",
                    fs_fd,
                    _FSCONFIG_SET_STRING,
                    ctypes.c_char_p(key.encode()),
                    ctypes.c_char_p(os.fsencode(value)),
                    0,
                )
            # Overlayfs takes the credentials it works with from whoever runs the create step.
            with fs_identity(creator, creator) if creator is not None else contextlib.nullcontext():
                syscall("fsconfig", fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        except OSError as exc:
            detail = _fs_log(fs_fd)
            raise OSError(
                exc.errno, f"{exc.strerror} ({detail})" if detail else exc.strerror
            ) from None
        mnt_fd = syscall("fsmount", fs_fd, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_NODEV)
    finally:
        os.close(fs_fd)
    try:
        syscall(
            "move_mount",
            mnt_fd,
            ctypes.c_char_p(b""),
            _AT_FDCWD,
            ctypes.c_char_p(os.fsencode(target)),
            _MOVE_MOUNT_F_EMPTY_PATH,
        )
    finally:
        os.close(mnt_fd)


def unmount(target: Path) -> bool:
    """Unmount everything stacked at ``target``; False when nothing was mounted there.

    Falls back to a lazy detach when the mount is busy, so a straggling open file cannot keep
    a sandbox's teardown from finishing (the kernel frees the mount once the file is closed).
    """
    path = os.fsencode(target)
    umount2 = libc.get().umount2
    unmounted = False
    while True:
        if umount2(path, _UMOUNT_NOFOLLOW) == 0:
            unmounted = True
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return unmounted
        if err == errno.EBUSY and umount2(path, _UMOUNT_NOFOLLOW | _MNT_DETACH) == 0:
            unmounted = True
            continue
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
