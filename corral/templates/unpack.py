"""Unpacking one OCI/Docker layer tar into an overlayfs lower-layer directory.

The tar comes from whoever made the image, so it is treated as hostile: every path is created
with directory-fd relative syscalls that never follow a symlink (a symlink ``a -> /etc`` planted
by one member makes a later ``a/passwd`` fail instead of writing on the host), names with ``..``
or a leading ``/`` are refused, hard links may only point at regular files this layer already
wrote, device nodes are not made, and only harmless extended attributes are kept (a layer must
not forge overlayfs's own ``trusted.overlay.*`` attributes).

The result is what overlayfs expects of a lower layer: OCI whiteouts ``.wh.NAME`` become char
devices 0:0 named ``NAME`` and ``.wh..wh..opq`` marks its directory opaque with the xattr
``trusted.overlay.opaque=y``. Files keep the numeric owners of the tar headers (the ids the
sandbox sees; an idmapped mount maps them), their modes including setuid/setgid/sticky, and
their mtimes.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import BinaryIO

from corral.errors import InvalidRequestError, RuntimeFailure

__all__ = ["unpack_layer"]

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_AUFS_META = ".wh..wh."  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
# aufs kept hard-linked files here; old layers hard-link to them, so they are unpacked like any
# file and the directory is removed at the end (Docker does the same).
_AUFS_LINKS = ".wh..wh.plnk"
_OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX = "SCHILY.xattr."
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "leave unchanged" to chown
# Failures of the host rather than of the layer.
_HOST_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EPERM,  # we are root: only the host's setup (a user namespace, a mount) says no
        errno.EACCES,
    }
)


def unpack_layer(tar: BinaryIO, dest: Path) -> int:
    """Unpack one uncompressed OCI/Docker layer tar into the empty directory ``dest`` in
    overlayfs lower-layer format; returns bytes of file data written. Reads ``tar`` to EOF
    (drains what follows the end-of-archive blocks) so a wrapping digest check sees it all.

    Raises ``InvalidRequestError`` naming the member for anything the layer must not do (or
    a malformed tar) and ``RuntimeFailure`` when the host fails (disk full). On error ``dest``
    holds a partial layer: the caller removes it.
    """
    try:
        root_fd = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        raise RuntimeFailure(f"cannot open layer directory {dest}: {exc}") from exc
    try:
        written = _Unpacker(root_fd).run(tar)
    finally:
        os.close(root_fd)
    while tar.read(_CHUNK):
        pass
    return written


def _split(name: str, member: str, what: str = "name") -> tuple[str, ...]:
    """Path components of a member name (or hard link target), refusing what could escape."""
    if not name:
        raise InvalidRequestError(f"layer member with an empty {what}")
    if "\0" in name:
        raise InvalidRequestError(f"layer member {member!r}: NUL byte in its {what}")
    if name.startswith("/"):
        raise InvalidRequestError(f"layer member {member!r}: absolute {what} {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidRequestError(f"layer member {member!r}: '..' in its {what} {name!r}")
    return parts


def _host_or_layer(exc: OSError, member: str) -> Exception:
    if exc.errno in _HOST_ERRNOS:
        return RuntimeFailure(f"unpacking layer member {member!r} failed: {exc.strerror}")
    return InvalidRequestError(f"layer member {member!r} cannot be unpacked: {exc.strerror}")


def _ids(member: tarfile.TarInfo) -> tuple[int, int]:
    uid, gid = member.uid, member.gid
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        raise InvalidRequestError(f"layer member {member.name!r}: owner {uid}:{gid} out of range")
    return uid, gid


def _mtime_ns(member: tarfile.TarInfo) -> int:
    # PAX mtimes may carry a fraction; clamp absurd ones rather than fail on them.
    ns = int(float(member.mtime) * 1_000_000_000)
    return max(-(2**62), min(ns, 2**62))


def _xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The member's PAX xattrs that a layer may carry: ``user.*`` and file capabilities."""
    kept = []
    for key, value in member.pax_headers.items():
        if not key.startswith(_XATTR_PAX):
            continue
        name = key[len(_XATTR_PAX) :]
        if name.startswith("user.") or name == "security.capability":
            # tarfile decoded the raw bytes with surrogateescape; this gives them back.
            kept.append((name, value.encode("utf-8", "surrogateescape")))
    return kept


class _Counting(io.RawIOBase):
    """The layer stream as tarfile reads it, counting bytes (to tell an empty stream)."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


class _Unpacker:
    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.written = 0
        # Regular files written so far, by path: the only valid hard link targets.
        self.regular: set[tuple[str, ...]] = set()
        # Directory mtimes, set at the end once nothing is written into them any more.
        self.dir_mtimes: dict[tuple[str, ...], int] = {}
        # The last parent directory opened (most members share their predecessor's).
        self.cached: tuple[tuple[str, ...], int] | None = None

    def run(self, tar: BinaryIO) -> int:
        counted = _Counting(tar)
        try:
            with tarfile.open(
                fileobj=counted, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as archive:
                while (member := archive.next()) is not None:
                    self.member(archive, member)
                    # Stream mode keeps every header otherwise (memory grows with the layer).
                    archive.members.clear()  # type: ignore[attr-defined]
            self.drop_aufs_links()
            self.set_dir_mtimes()
        except (tarfile.TarError, EOFError) as exc:
            if counted.count == 0:
                return 0  # a zero-byte layer: nothing in it (Docker reads it the same way)
            raise InvalidRequestError(f"layer is not a valid tar archive: {exc}") from exc
        except OSError as exc:
            raise RuntimeFailure(f"unpacking layer failed: {exc}") from exc
        finally:
            self.drop_cache()
        return self.written

    # ----------------------------------------------------------------- directory walking

    def drop_cache(self) -> None:
        if self.cached is not None:
            os.close(self.cached[1])
            self.cached = None

    def open_dir(self, parts: tuple[str, ...], member: str, *, create: bool) -> int:
        """A new fd of directory ``parts`` below the root, reached without following any
        symlink; missing directories are made (0755, root) when ``create``."""
        fd = os.dup(self.root_fd)
        try:
            for i, comp in enumerate(parts):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(comp, 0o755, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(parts[: i + 1])
                    raise InvalidRequestError(
                        f"layer member {member!r}: {where!r} is a symlink or not a directory "
                        "(a layer may not write through a symlink)"
                    ) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, parts: tuple[str, ...], member: str) -> int:
        """The (borrowed, cached) fd of the directory holding ``parts``."""
        key = parts[:-1]
        if not key:
            return self.root_fd
        if self.cached is not None and self.cached[0] == key:
            return self.cached[1]
        fd = self.open_dir(key, member, create=True)
        self.drop_cache()
        self.cached = (key, fd)
        return fd

    def clear(self, pfd: int, parts: tuple[str, ...], *, keep_dir: bool) -> bool:
        """Remove what an earlier member put at ``parts``; a directory is kept (and True
        returned) when ``keep_dir``, since a directory replacing a directory merges."""
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        if stat.S_ISDIR(st.st_mode):
            n = len(parts)
            if self.cached is not None and self.cached[0][:n] == parts:
                self.drop_cache()  # the cached directory is about to be deleted
            shutil.rmtree(name, dir_fd=pfd)
            self.regular = {p for p in self.regular if p[:n] != parts}
            self.dir_mtimes = {p: t for p, t in self.dir_mtimes.items() if p[:n] != parts}
        else:
            os.unlink(name, dir_fd=pfd)
            self.regular.discard(parts)
        return False

    # ---------------------------------------------------------------------- members

    def member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        label = member.name
        parts = _split(member.name, label)
        try:
            if not parts:
                if not member.isdir():
                    raise InvalidRequestError(f"layer member {label!r} names the layer root")
                self.apply_dir(self.root_fd, (), member)
                return
            base = parts[-1]
            if parts[0] == _AUFS_LINKS:
                if not (member.isreg() or member.isdir()):
                    return
            elif base.startswith(_WHITEOUT):
                self.whiteout(parts, member)
                return
            if member.isreg():
                self.regular_file(archive, parts, member)
            elif member.isdir():
                pfd = self.parent(parts, label)
                if not self.clear(pfd, parts, keep_dir=True):
                    os.mkdir(base, 0o700, dir_fd=pfd)
                fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self.apply_dir(fd, parts, member)
                finally:
                    os.close(fd)
            elif member.issym():
                self.symlink(parts, member)
            elif member.islnk():
                self.hardlink(parts, member)
            elif member.isfifo():
                pfd = self.parent(parts, label)
                self.clear(pfd, parts, keep_dir=False)
                os.mkfifo(base, 0o600, dir_fd=pfd)
                self.apply_other(pfd, base, member)
            elif member.ischr() or member.isblk():
                return  # real device nodes have no place in a layer on the host
            else:
                raise InvalidRequestError(
                    f"layer member {label!r} has unsupported tar type {member.type!r}"
                )
        except OSError as exc:
            raise _host_or_layer(exc, label) from exc

    def whiteout(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        base = parts[-1]
        if base == _OPAQUE:
            key = parts[:-1]
            fd = self.open_dir(key, member.name, create=True) if key else os.dup(self.root_fd)
            try:
                os.setxattr(fd, _OPAQUE_XATTR, b"y")
            finally:
                os.close(fd)
            return
        if base.startswith(_AUFS_META):
            return
        hidden = base[len(_WHITEOUT) :]
        if hidden in ("", ".", ".."):
            raise InvalidRequestError(f"layer member {member.name!r}: invalid whiteout name")
        target = (*parts[:-1], hidden)
        pfd = self.parent(target, member.name)
        self.clear(pfd, target, keep_dir=False)
        os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=pfd)
        uid, gid = _ids(member)
        os.chown(hidden, uid, gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(hidden, ns=(_mtime_ns(member),) * 2, dir_fd=pfd, follow_symlinks=False)

    def regular_file(
        self, archive: tarfile.TarFile, parts: tuple[str, ...], member: tarfile.TarInfo
    ) -> None:
        pfd = self.parent(parts, member.name)
        self.clear(pfd, parts, keep_dir=False)
        uid, gid = _ids(member)
        src = archive.extractfile(member)
        if src is None:  # tarfile returns None only for non-regular members
            raise InvalidRequestError(f"layer member {member.name!r} has no data")
        fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            with src:
                while chunk := src.read(_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                    self.written += len(chunk)
            # chown clears setuid bits and file capabilities: owner, then mode, then xattrs.
            os.fchown(fd, uid, gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))
            self.set_xattrs(fd, member)
            os.utime(fd, ns=(_mtime_ns(member),) * 2)
        finally:
            os.close(fd)
        self.regular.add(parts)

    def apply_dir(self, fd: int, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        uid, gid = _ids(member)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, stat.S_IMODE(member.mode))
        self.set_xattrs(fd, member)
        self.dir_mtimes.pop(parts, None)  # re-insert: a later entry's mtime wins
        self.dir_mtimes[parts] = _mtime_ns(member)

    def symlink(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        # The target is only ever resolved inside the sandbox; never by us.
        if not member.linkname or "\0" in member.linkname:
            raise InvalidRequestError(f"layer member {member.name!r}: invalid symlink target")
        pfd = self.parent(parts, member.name)
        self.clear(pfd, parts, keep_dir=False)
        os.symlink(member.linkname, parts[-1], dir_fd=pfd)
        uid, gid = _ids(member)
        os.chown(parts[-1], uid, gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(parts[-1], ns=(_mtime_ns(member),) * 2, dir_fd=pfd, follow_symlinks=False)

    def hardlink(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        target = _split(member.linkname, member.name, "hard link target")
        if target == parts:
            return  # a link to itself: the file is already there
        if target not in self.regular:
            raise InvalidRequestError(
                f"layer member {member.name!r}: hard link target {member.linkname!r} is not "
                "a regular file written earlier in this layer"
            )
        pfd = self.parent(parts, member.name)
        self.clear(pfd, parts, keep_dir=False)
        tfd = self.open_dir(target[:-1], member.name, create=False)
        try:
            st = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidRequestError(
                    f"layer member {member.name!r}: hard link target is not a regular file"
                )
            os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)
        self.regular.add(parts)

    def apply_other(self, pfd: int, name: str, member: tarfile.TarInfo) -> None:
        """Owner, mode, xattrs and mtime of a just-made FIFO (nothing here follows a link)."""
        uid, gid = _ids(member)
        os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(member.mode), dir_fd=pfd)
        # No fd of a FIFO without opening it; the magic link is the directory we hold.
        self.set_xattrs(f"/proc/self/fd/{pfd}/{name}", member)
        os.utime(name, ns=(_mtime_ns(member),) * 2, dir_fd=pfd, follow_symlinks=False)

    def set_xattrs(self, target: int | str, member: tarfile.TarInfo) -> None:
        for name, value in _xattrs(member):
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                # Like Docker: a file system without xattrs (or user.* on a FIFO) is no error.
                if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise

    def drop_aufs_links(self) -> None:
        try:
            self.clear(self.root_fd, (_AUFS_LINKS,), keep_dir=False)
        except OSError as exc:
            raise _host_or_layer(exc, _AUFS_LINKS) from exc

    def set_dir_mtimes(self) -> None:
        self.drop_cache()
        for parts, ns in self.dir_mtimes.items():
            if not parts:
                os.utime(self.root_fd, ns=(ns, ns))
                continue
            try:
                fd = self.open_dir(parts, "/".join(parts), create=False)
            except (OSError, InvalidRequestError):
                continue  # replaced by a non-directory later on
            try:
                os.utime(fd, ns=(ns, ns))
            finally:
                os.close(fd)
