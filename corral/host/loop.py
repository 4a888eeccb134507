"""Loop devices through ioctls (no losetup subprocess): attach a file, autoclear on unmount."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from pathlib import Path

__all__ = ["attach_loop"]

_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16
_LO_NAME_SIZE = 64


class _LoopInfo64(ctypes.Structure):
    _fields_ = (
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * _LO_NAME_SIZE),
        ("lo_crypt_name", ctypes.c_uint8 * _LO_NAME_SIZE),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    )


class _LoopConfig(ctypes.Structure):
    _fields_ = (
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _LoopInfo64),
        ("reserved", ctypes.c_uint64 * 8),
    )


def attach_loop(backing: Path, *, direct_io: bool = True, attempts: int = 20) -> tuple[int, str]:
    """Attach ``backing`` to a free loop device; returns (open fd of the device, its path).

    The device is set to autoclear: it detaches itself once the caller closes the fd and the
    last mount of it is gone, so an unmount is the whole teardown. Direct I/O keeps the
    backing file's pages out of the host page cache (the filesystem on top caches already)
    at the price of uncached reads.
    """
    backing_fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(attempts):
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                path = f"/dev/loop{number}"
                dev = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                config = _LoopConfig()
                config.fd = backing_fd
                config.info.lo_flags = _LO_FLAGS_AUTOCLEAR | (
                    _LO_FLAGS_DIRECT_IO if direct_io else 0
                )
                name = os.fsencode(backing)[: _LO_NAME_SIZE - 1]
                ctypes.memmove(config.info.lo_file_name, name, len(name))
                try:
                    fcntl.ioctl(dev, _LOOP_CONFIGURE, bytes(config))
                except OSError as exc:
                    os.close(dev)
                    if exc.errno == errno.EBUSY:  # another process took it first
                        continue
                    if exc.errno == errno.EINVAL and direct_io:
                        # The backing filesystem cannot do direct I/O: fall back to buffered.
                        return _retry_buffered(backing, attempts)
                    raise
                return dev, path
        finally:
            os.close(control)
    finally:
        os.close(backing_fd)
    raise OSError(errno.EBUSY, "no free loop device")


def _retry_buffered(backing: Path, attempts: int) -> tuple[int, str]:
    return attach_loop(backing, direct_io=False, attempts=attempts)
