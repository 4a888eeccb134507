"""The storage pool: one sparse XFS image, loop-attached and mounted, holding every sandbox disk,
snapshot and golden image of a data dir, so that copying any of them is a reflink (``FICLONE``):
O(extents), not O(bytes), whatever the disk holds.

Why a pool and not files on the host's own filesystem: reflinks need XFS or btrfs, and hosts
usually run ext4 (ours do); this kernel has no device-mapper for thin snapshots. XFS is built in
here, ``mkfs.xfs`` is in Debian's xfsprogs, and copy-on-write files are what XFS reflinks are for.
The image is sparse and as large as the host filesystem holding it, so it only ever takes what
is written into it; its loop device uses direct I/O so pages are cached once (by the sandbox
disks above), not again for the pool file.

Everything here is idempotent and survives a host reboot: ``ensure`` mounts an existing image
again (XFS replays its log) or makes a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import subprocess
import threading
from pathlib import Path

from corral.errors import QuotaExceededError, RuntimeFailure
from corral.host.loop import attach_loop
from corral.host.mounts import unmount
from corral.host.syscalls import libc

__all__ = ["HOST_DISK_RESERVE", "Pool", "clone_file"]

_FICLONE = 0x40049409
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_NOATIME = 0x400
_GiB = 1024**3
_MiB = 1024**2
# Never let sandbox disks and snapshots (sparse or copy-on-write files) eat the last of the
# host's own filesystem.
HOST_DISK_RESERVE = 1024 * _MiB


def clone_file(src: Path, dst: Path) -> None:
    """Make ``dst`` (which must not exist) a copy-on-write clone of ``src``; atomic: ``dst`` only
    appears complete, under its final name."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}")
    s = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        d = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(d, _FICLONE, s)
            os.fsync(d)
        except BaseException:
            os.close(d)
            tmp.unlink(missing_ok=True)
            raise
        os.close(d)
    finally:
        os.close(s)
    try:
        os.link(tmp, dst)  # fails if dst exists, unlike rename
    finally:
        tmp.unlink(missing_ok=True)


class Pool:
    """The pool image ``image`` mounted at ``root``; directories inside are made on demand."""

    def __init__(self, image: Path, root: Path, size_bytes: int | None = None) -> None:
        self.image = image
        self.root = root
        self._size = size_bytes
        self._lock = threading.Lock()
        self._ready = False

    def dir(self, name: str) -> Path:
        """``root/name``, created (0700) if needed, with the pool mounted."""
        self.ensure()
        path = self.root / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def mounted(self) -> bool:
        try:
            return os.stat(self.root).st_dev != os.stat(self.root.parent).st_dev
        except FileNotFoundError:
            return False

    def ensure(self) -> None:
        """Mount the pool, making it first if it does not exist (idempotent; after a reboot too)."""
        if self._ready and self.mounted():
            return
        with self._lock:
            try:
                self.image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                # Every tier of a server, and any other process on this data dir, shares the
                # one pool: the check and the mount are one step under a lock on the file, or
                # two of them could each mount the image (two XFS mounts of one image corrupt it).
                lock = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if not self.mounted():
                        if not self.image.exists():
                            self._make()
                        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                        self._mount()
                finally:
                    os.close(lock)
            except OSError as exc:
                raise RuntimeFailure(f"storage pool {self.image}: {exc}") from exc
            self._ready = True

    def _lock_path(self) -> Path:
        return self.image.with_name(f".{self.image.name}.lock")

    def _make(self) -> None:
        size = self._size
        if size is None:
            # As large as the host filesystem: sparse, so only what is written takes space.
            st = os.statvfs(self.image.parent)
            size = max(st.f_blocks * st.f_frsize, 4 * _GiB)
        self.image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.image.with_name(f".{self.image.name}.{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                f.truncate(size)
            # 4 KiB sectors so the direct-I/O loop device works on any host disk; reflink is the
            # point of the whole pool (default in xfsprogs >= 5.1, stated for older ones).
            argv = ["mkfs.xfs", "-q", "-f", "-m", "reflink=1", "-s", "size=4096", str(tmp)]
            try:
                subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300)
            except FileNotFoundError as exc:
                raise RuntimeFailure(
                    "mkfs.xfs is not installed (apt-get install xfsprogs)"
                ) from exc
            except subprocess.CalledProcessError as exc:
                raise RuntimeFailure(f"mkfs.xfs failed: {exc.stderr.strip()}") from exc
            except subprocess.TimeoutExpired as exc:
                raise RuntimeFailure("mkfs.xfs timed out") from exc
            os.replace(tmp, self.image)
        finally:
            tmp.unlink(missing_ok=True)

    def _mount(self) -> None:
        dev_fd, dev = attach_loop(self.image, direct_io=True)
        try:
            # noexec/nodev/nosuid: the pool only ever holds images, never anything to run.
            flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC | _MS_NOATIME
            if libc.get().mount(dev.encode(), os.fsencode(self.root), b"xfs", flags, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mount {dev} on {self.root}: {os.strerror(err)}")
        finally:
            os.close(dev_fd)

    def remove(self) -> None:
        """Unmount and delete the pool and everything in it (for tests and uninstalling)."""
        with self._lock:
            unmount(self.root)
            with contextlib.suppress(FileNotFoundError):
                self.root.rmdir()
            with contextlib.suppress(FileNotFoundError):
                self.image.unlink()
            self._lock_path().unlink(missing_ok=True)
            self._ready = False

    def require_room(self, needed: int = 0) -> None:
        """Refuse (a quota error) what would leave the host filesystem under the pool with less
        than ``needed`` bytes plus the reserve: a copy-on-write file costs nothing when made,
        but every block either side rewrites later is a new block of the pool."""
        free = os.statvfs(self.image.parent)
        if free.f_bavail * free.f_frsize < needed + HOST_DISK_RESERVE:
            raise QuotaExceededError(
                f"the host has less than {(needed + HOST_DISK_RESERVE) // _MiB} MiB of free "
                "disk; delete snapshots or sandboxes first"
            )

    def only_holds(self, names: set[str]) -> bool:
        """Whether the pool holds nothing but entries named in ``names`` and empty directories:
        a tier removing its own state uses it to tell whether the pool is still anyone's."""
        if not self.mounted():
            return True
        return all(
            p.name in names or (p.is_dir() and not any(p.iterdir())) for p in self.root.iterdir()
        )
