"""Tar upload into and download out of a sandbox, streamed through the agent's file operations.

Upload parses the archive itself (headers decoded by ``tarfile.TarInfo.frombuf``, pax and GNU
long names handled here) so nothing but one header or one data chunk is ever held in memory,
and each member becomes exactly one agent operation with ``beneath=dest_dir``: a member can
never land outside ``dest_dir``, not even through a symlink an earlier member created.

Member rules: absolute names and names with a ``..`` component are refused (the whole upload
stops with InvalidRequestError naming the member; what came before stays written). Files, dirs
and symlinks are created (symlink targets as-is); a hard link is written as a copy of the
member it points to (which must already be in ``dest_dir``); device nodes, fifos and unknown
member types are skipped; GNU sparse members are refused. Owners come from ``user`` (default
root), not from the archive; file modes come from the archive; directory modes and mtimes are
not restored.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from typing import Literal

from corral.errors import CorralError, InvalidRequestError, NotFoundError, RuntimeFailure

from .client import AgentClient, FileInfo

__all__ = ["download_tar", "upload_tar"]

_BLOCK = 512
_ZERO_BLOCK = b"\0" * _BLOCK
_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_STEP = 1 << 20  # decompressed bytes produced per step: bounds memory under a zip bomb
_DATA_CHUNK = 256 * 1024
_MAX_PAX = 1 << 20
_MAX_LONGNAME = 64 * 1024
_MAX_DEPTH = 256
_OUT_BATCH = 64 * 1024

_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_SPECIAL = frozenset({tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE})
_PAX = frozenset({tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE})


class _Source:
    """The archive body as a byte stream, gunzipped on the fly when it starts like gzip."""

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self._it = body.__aiter__()
        self._buf = bytearray()
        self._mode: Literal["sniff", "plain", "gzip", "end"] = "sniff"
        self._pending = b""  # raw bytes not yet given to a decompressor
        self._z: zlib._Decompress | None = None

    async def _next_raw(self) -> bytes | None:
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            return None
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidRequestError("the archive body must be bytes")
        return bytes(chunk)

    def _inflate(self, data: bytes) -> None:
        assert self._z is not None
        try:
            self._buf += self._z.decompress(data, _INFLATE_STEP)
        except zlib.error as exc:
            raise InvalidRequestError(f"the archive is not valid gzip: {exc}") from exc

    async def _fill(self) -> bool:
        """Adds some bytes to the buffer (possibly none); False once the input is exhausted."""
        while True:
            if self._mode == "end":
                return False
            if self._mode == "plain":
                raw = await self._next_raw()
                if raw is None:
                    self._mode = "end"
                    return False
                self._buf += raw
                return True
            if self._mode == "sniff":
                raw = await self._next_raw()
                if raw is not None:
                    self._pending += raw
                    if len(self._pending) < 2:
                        continue
                gz = self._pending[:2] == _GZIP_MAGIC
                self._mode = "gzip" if gz else "plain"
                if not gz:
                    self._buf += self._pending
                    self._pending = b""
                    if raw is None:
                        self._mode = "end"
                    return bool(self._buf)
                continue
            # gzip: possibly several members back to back (as `cat a.gz b.gz` makes).
            z = self._z
            if z is not None and z.unconsumed_tail:
                self._inflate(z.unconsumed_tail)
                return True
            if z is not None and z.eof:
                self._pending += z.unused_data
                self._z = z = None
            if z is None and len(self._pending) >= 2:
                if self._pending[:2] != _GZIP_MAGIC:  # trailing bytes after the last member
                    self._mode = "end"
                    return False
                self._z = zlib.decompressobj(31)
                data, self._pending = self._pending, b""
                self._inflate(data)
                return True
            raw = await self._next_raw()
            if raw is None:
                if z is not None:
                    raise InvalidRequestError("the gzip stream is truncated")
                self._mode = "end"
                return False
            if z is None:
                self._pending += raw
                continue
            self._inflate(raw)
            return True

    async def read_exact(self, n: int) -> bytes | None:
        """Exactly n bytes; None at a clean end of input; InvalidRequestError if cut short."""
        while len(self._buf) < n:
            if not await self._fill():
                if not self._buf:
                    return None
                raise InvalidRequestError("the archive is truncated")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_some(self, n: int) -> bytes:
        """Between 1 and n bytes."""
        while not self._buf:
            if not await self._fill():
                raise InvalidRequestError("the archive is truncated")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def skip(self, n: int) -> None:
        while n > 0:
            n -= len(await self.read_some(min(n, _DATA_CHUNK)))


def _padding(size: int) -> int:
    return -size % _BLOCK


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        end = pos + length
        if length < 5 or end > len(data) or data[end - 1 : end] != b"\n":
            raise InvalidRequestError("the archive has a malformed pax header")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise InvalidRequestError("the archive has a malformed pax record")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def _safe_rel(name: str, member: str) -> str | None:
    """The member's path relative to the target; None for the target itself."""
    if "\0" in name:
        raise InvalidRequestError(f"tar member {member!r} has a NUL byte in its name")
    if name.startswith("/"):
        raise InvalidRequestError(f"tar member {member!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidRequestError(f"tar member {member!r} leaves the target directory")
    return "/".join(parts) or None


def _check_dir(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidRequestError(f"{what} must be an absolute path")
    return path.rstrip("/") or "/"


def _join(base: str, rel: str) -> str:
    return f"{base.rstrip('/')}/{rel}"


async def upload_tar(
    client: AgentClient,
    dest_dir: str,
    body: AsyncIterable[bytes],
    *,
    user: str | None = None,
) -> int:
    """Unpacks a (optionally gzipped) tar stream beneath ``dest_dir``; returns entries written."""
    dest = _check_dir(dest_dir, "dest_dir")
    await client.mkdir(dest, parents=True, user=user)
    src = _Source(body)
    count = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None
    while True:
        block = await src.read_exact(_BLOCK)
        if block is None or block == _ZERO_BLOCK:
            return count
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise InvalidRequestError(f"not a valid tar archive: {exc}") from exc
        size = info.size
        if size < 0:
            raise InvalidRequestError("the archive has a member with a negative size")
        kind = info.type
        if kind in _PAX or kind == tarfile.XGLTYPE:
            if size > _MAX_PAX:
                raise InvalidRequestError("the archive has an oversized pax header")
            data = await src.read_exact(size + _padding(size)) if size else b""
            if data is None:
                raise InvalidRequestError("the archive is truncated")
            if kind in _PAX:  # global headers only carry defaults we do not use
                pax.update(_parse_pax(data[:size]))
            continue
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if size > _MAX_LONGNAME:
                raise InvalidRequestError("the archive has an oversized long name")
            data = await src.read_exact(size + _padding(size)) if size else b""
            if data is None:
                raise InvalidRequestError("the archive is truncated")
            text = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = text
            else:
                long_link = text
            continue

        name = pax.get("path", long_name if long_name is not None else info.name)
        linkname = pax.get("linkpath", long_link if long_link is not None else info.linkname)
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                size = -1
            if size < 0:
                raise InvalidRequestError(f"tar member {name!r} has an invalid pax size")
        pax, long_name, long_link = {}, None, None
        has_data = (
            kind in _REGULAR
            or kind == tarfile.GNUTYPE_SPARSE
            or kind not in (tarfile.SUPPORTED_TYPES)
        )
        data_size = size if has_data else 0

        if kind == tarfile.GNUTYPE_SPARSE:
            raise InvalidRequestError(f"tar member {name!r} is a sparse file (not supported)")
        if kind in _SPECIAL or kind not in tarfile.SUPPORTED_TYPES:
            await src.skip(data_size + _padding(data_size))
            continue
        rel = _safe_rel(name, name)
        target = dest if rel is None else _join(dest, rel)
        try:
            if kind in _REGULAR:
                if rel is None:
                    raise InvalidRequestError("is the target directory itself")
                await client.write_file(
                    target,
                    _member_data(src, size),
                    mode=info.mode & 0o7777,
                    user=user,
                    beneath=dest,
                )
                await src.skip(_padding(size))
            elif kind == tarfile.DIRTYPE:
                await client.mkdir(target, parents=True, user=user, beneath=dest)
            elif kind == tarfile.SYMTYPE:
                if rel is None:
                    raise InvalidRequestError("is the target directory itself")
                await client.symlink(linkname, target, user=user, beneath=dest)
            elif kind == tarfile.LNKTYPE:
                source_rel = _safe_rel(linkname, name)
                if rel is None or source_rel is None:
                    raise InvalidRequestError("hard link to or as the target directory")
                await _copy(client, _join(dest, source_rel), target, info.mode, user, dest)
            else:  # pragma: no cover - every SUPPORTED_TYPES member is handled above
                continue
        except CorralError as exc:
            raise type(exc)(f"tar member {name!r}: {exc.message}") from exc
        count += 1


async def _member_data(src: _Source, size: int) -> AsyncIterator[bytes]:
    left = size
    while left > 0:
        chunk = await src.read_some(min(left, _DATA_CHUNK))
        left -= len(chunk)
        yield chunk


async def _copy(
    client: AgentClient, source: str, target: str, mode: int, user: str | None, dest: str
) -> None:
    chunks = client.read_file(source, beneath=dest)
    try:
        await client.write_file(target, chunks, mode=mode & 0o7777, user=user, beneath=dest)
    finally:
        await chunks.aclose()


async def download_tar(client: AgentClient, src_dir: str) -> AsyncGenerator[bytes, None]:
    """A tar stream (pax format) of the directory's content: files, dirs, symlinks with their
    modes, mtimes and numeric owners. Member names are built here from validated entry names,
    so a tampered listing cannot put ``..`` or absolute names into the archive."""
    root = _check_dir(src_dir, "src_dir")
    out = bytearray()
    stack: list[tuple[str, str, Iterator[FileInfo]]] = [
        ("", root, await _listing(client, root, top=True))
    ]
    while stack:
        rel_dir, abs_dir, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            raise RuntimeFailure(f"the agent listed an impossible name {name[:100]!r}")
        rel = f"{rel_dir}/{name}" if rel_dir else name
        path = _join(abs_dir, name)
        if entry.type == "dir":
            out += _header(rel, entry, tarfile.DIRTYPE)
            if len(stack) < _MAX_DEPTH:
                stack.append((rel, path, await _listing(client, path)))
        elif entry.type == "symlink":
            out += _header(rel, entry, tarfile.SYMTYPE)
        elif entry.type == "file":
            async for piece in _file_member(client, rel, path, entry):
                out += piece
                if len(out) >= _OUT_BATCH:
                    yield bytes(out)
                    out.clear()
        if len(out) >= _OUT_BATCH:
            yield bytes(out)
            out.clear()
    out += _ZERO_BLOCK * 2
    yield bytes(out)


async def _listing(client: AgentClient, path: str, *, top: bool = False) -> Iterator[FileInfo]:
    try:
        entries = await client.list_dir(path, depth=1)
    except NotFoundError:
        if top:
            raise
        return iter(())  # removed while we were walking
    return iter(sorted(entries, key=lambda e: e.name))


def _header(rel: str, entry: FileInfo, kind: bytes, size: int = 0) -> bytes:
    ti = tarfile.TarInfo(rel)
    ti.type = kind
    ti.size = size
    ti.mode = entry.mode & 0o7777
    ti.mtime = max(0, int(entry.mtime))
    ti.uid = entry.uid
    ti.gid = entry.gid
    ti.uname = ti.gname = ""
    if kind == tarfile.SYMTYPE:
        ti.linkname = entry.link_target or ""
    return ti.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


async def _file_member(
    client: AgentClient, rel: str, path: str, entry: FileInfo
) -> AsyncIterator[bytes]:
    """Header, content and padding of one file; the size in the header wins if the file changes
    while it is read (cut short, or padded with zeros)."""
    chunks = client.read_file(path)
    try:
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""
        except NotFoundError:
            return  # removed while we were walking
        size = entry.size
        yield _header(rel, entry, tarfile.REGTYPE, size)
        left = size
        piece = first
        while True:
            if piece and left > 0:
                take = piece[:left]
                left -= len(take)
                yield take
            if left <= 0:
                break
            try:
                piece = await chunks.__anext__()
            except StopAsyncIteration:
                break
        while left > 0:
            pad = min(left, _DATA_CHUNK)
            left -= pad
            yield b"\0" * pad
        yield b"\0" * _padding(size)
    finally:
        await chunks.aclose()
