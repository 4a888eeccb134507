"""Directory transfer as tar streams: built on the fly for uploads, extracted safely on download.

The archive a sandbox sends back is written by untrusted code, so extraction never trusts a
member: no absolute names or ``..``, never a write through a symlink, no links pointing out of
the destination, no device nodes, no setuid bits. Neither direction holds a file in memory.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import warnings
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from corral.errors import CorralError, InvalidRequestError

__all__ = ["ChunkReader", "Member", "extract_tar", "iter_tar", "tar_stream", "walk_tree"]

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def iter_tar(root: str | os.PathLike[str], chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Yield a tar of ``root``'s contents (names relative to it), reading files chunk by chunk.

    Symlinks are archived as links, never followed; sockets, fifos and devices are skipped.
    """
    base = Path(root)
    if not base.is_dir():
        raise InvalidRequestError(f"{base} is not a directory")
    yield from tar_stream(base, walk_tree(base), chunk_size=chunk_size)


Member = tuple[PurePosixPath, os.stat_result]
_TOP = PurePosixPath()


def tar_stream(
    base: Path,
    members: Iterable[Member],
    extra: Iterable[tuple[str, bytes | None]] = (),
    *,
    chunk_size: int = 1 << 20,
) -> Iterator[bytes]:
    """A tar of ``members`` (paths relative to ``base`` with their lstat), then of ``extra``:
    files held in memory (``None`` for a directory), named as given. Both are consumed lazily,
    so ``extra`` may depend on what the walk found."""
    total = 0
    for rel, st in members:
        info = tarfile.TarInfo(str(rel))
        info.mode = stat.S_IMODE(st.st_mode)
        info.mtime = int(st.st_mtime)
        path = base / rel
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            header = _header(info)
            total += len(header)
            yield header
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            header = _header(info)
            total += len(header)
            yield header
        elif stat.S_ISREG(st.st_mode):
            info.size = st.st_size
            header = _header(info)
            total += len(header)
            yield header
            total += yield from _file_body(path, st.st_size, chunk_size)
    for name, data in extra:
        info = tarfile.TarInfo(name)
        if data is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            chunk = _header(info)
        else:
            info.mode, info.size = 0o644, len(data)
            chunk = _header(info) + data + b"\0" * (-len(data) % _BLOCK)
        total += len(chunk)
        yield chunk
    end = b"\0" * (2 * _BLOCK)
    total += len(end)
    # Pad to a whole record like tar(1) does; some readers insist on it.
    yield end + b"\0" * (-total % _RECORD)


def walk_tree(
    base: Path,
    rel: PurePosixPath = _TOP,
    descend: Callable[[PurePosixPath], bool] | None = None,
) -> Iterator[Member]:
    """Every entry under ``base / rel`` with its lstat, parents before children, names sorted;
    a directory for which ``descend`` answers False is listed but not entered."""
    try:
        entries = sorted(os.scandir(base / rel), key=lambda e: e.name)
    except OSError as exc:
        raise CorralError(f"cannot read {base / rel}: {exc.strerror or exc}") from exc
    for entry in entries:
        child = rel / entry.name
        st = entry.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode) and (descend is None or descend(child)):
            yield from walk_tree(base, child, descend)


def _file_body(path: Path, size: int, chunk_size: int) -> Generator[bytes, None, int]:
    """Exactly ``size`` bytes plus padding: a file that grows or shrinks mid-upload must not
    corrupt the archive, so it is cut or zero-filled to the size in its header."""
    left = size
    try:
        with open(path, "rb") as f:
            while left > 0:
                chunk = f.read(min(chunk_size, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
    except OSError as exc:
        raise CorralError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if left:
        yield b"\0" * left
    pad = -size % _BLOCK
    if pad:
        yield b"\0" * pad
    return size + pad


class ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, so tarfile can consume a stream."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The member's path components, or None for an absolute name or one using ``..``."""
    if name.startswith("/") or "\0" in name:
        return None
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


def _ensure_dirs(dest: Path, parts: tuple[str, ...], created: list[Path]) -> Path:
    """Create or walk the parent directories of a member, refusing any symlink on the way."""
    cur = dest
    for part in parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o700)
            created.append(cur)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise CorralError(
                f"archive member would be written through {cur}, which is not a directory"
            )
    return cur


def _clear(target: Path) -> None:
    """Make room for a file or link, refusing to replace a directory."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise CorralError(f"archive member would replace the directory {target}")
    os.unlink(target)


def _link_stays_inside(parts: tuple[str, ...], linkname: str) -> bool:
    if linkname.startswith("/"):
        return False
    depth = len(parts) - 1  # the link lives in its parent directory
    for p in linkname.split("/"):
        if p in ("", "."):
            continue
        depth += -1 if p == ".." else 1
        if depth < 0:
            return False
    return True


def extract_tar(
    fileobj: BinaryIO | io.RawIOBase, dest: str | os.PathLike[str], chunk_size: int = 1 << 20
) -> int:
    """Extract a (possibly gzipped) tar stream into ``dest``; answer the number of entries written.

    Unsafe names and writes through symlinks raise ``CorralError``; links that point outside ``dest`` and special
    files are skipped with a warning, so one absolute symlink does not fail a whole download.
    """
    root = Path(dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
        return _extract(fileobj, root.resolve(), chunk_size)
    except tarfile.TarError as exc:
        raise CorralError(f"the server sent a broken tar stream: {exc}") from exc
    except OSError as exc:
        raise CorralError(f"cannot write into {root}: {exc.strerror or exc}") from exc


def _extract(fileobj: BinaryIO | io.RawIOBase, root: Path, chunk_size: int) -> int:
    written = 0
    dirs: dict[Path, tarfile.TarInfo] = {}
    created: list[Path] = []
    with tarfile.open(fileobj=fileobj, mode="r|*", errorlevel=1) as tar:
        for member in tar:
            parts = _safe_parts(member.name)
            if parts is None:
                raise CorralError(f"refusing archive member {member.name!r}: unsafe path")
            if not parts:  # "." itself: the destination's own mode and times stay the user's
                continue
            parent = _ensure_dirs(root, parts[:-1], created)
            target = parent / parts[-1]
            if member.isdir():
                _ensure_dirs(root, parts, created)
                dirs[target] = member
            elif member.isreg():
                _clear(target)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have data
                    continue
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := src.read(chunk_size):
                        out.write(chunk)
                os.chmod(target, _file_mode(member.mode))
                os.utime(target, (member.mtime, member.mtime))
            elif member.issym():
                if not _link_stays_inside(parts, member.linkname):
                    warnings.warn(
                        f"skipped symlink {member.name} -> {member.linkname}: it points outside "
                        f"the destination",
                        stacklevel=4,
                    )
                    continue
                _clear(target)
                os.symlink(member.linkname, target)
            elif member.islnk():
                link_parts = _safe_parts(member.linkname)
                source = root.joinpath(*link_parts) if link_parts else None
                if source is None or not _is_plain_file_inside(root, link_parts or ()):
                    warnings.warn(
                        f"skipped hard link {member.name} -> {member.linkname}: its target is not "
                        f"a file extracted from this archive",
                        stacklevel=4,
                    )
                    continue
                _clear(target)
                os.link(source, target, follow_symlinks=False)
            else:
                warnings.warn(f"skipped special file {member.name}", stacklevel=4)
                continue
            written += 1
    # Directory modes last (deepest first) so a read-only directory does not block its contents.
    for path in created:
        if path not in dirs:
            os.chmod(path, 0o755)
    for path, member in sorted(dirs.items(), key=lambda kv: len(kv[0].parts), reverse=True):
        os.chmod(path, _file_mode(member.mode) | 0o700)
        os.utime(path, (member.mtime, member.mtime))
    return written


def _file_mode(mode: int) -> int:
    # Like tarfile's "data" filter: no setuid/setgid/sticky, no group/other write, owner rw.
    return (mode & 0o755) | 0o600


def _is_plain_file_inside(root: Path, parts: tuple[str, ...]) -> bool:
    cur = root
    for part in parts[:-1]:
        cur = cur / part
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return False
        except FileNotFoundError:
            return False
    try:
        return bool(parts) and stat.S_ISREG(os.lstat(cur / parts[-1]).st_mode)
    except FileNotFoundError:
        return False
