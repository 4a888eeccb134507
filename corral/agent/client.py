"""Host-side client of the in-sandbox agent: one fresh byte stream per operation.

Every byte from the agent is treated as hostile: frames are size-bounded by ``protocol``,
fields are type- and range-checked here, and the number of entries a listing may return is
capped. All failures surface as ``corral.errors`` types.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, TypeVar, cast

from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RuntimeFailure,
    SandboxNotRunningError,
)

from .protocol import (
    MAX_PAYLOAD,
    Field,
    Fields,
    FieldValue,
    Frame,
    FrameType,
    encode_fields,
    encode_frame,
    read_frame,
)

__all__ = [
    "AgentClient",
    "ExecRequest",
    "FileInfo",
    "Opener",
    "OutputEvent",
    "ProcessInfo",
    "WatchEvent",
]

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]

# Bounds on what we accept from the agent (it runs inside the sandbox and may be subverted).
MAX_ENTRIES = 100_000
_MAX_MESSAGE = 2000
_MAX_PID = 2**22  # the kernel's PID_MAX_LIMIT
_MAX_EXIT = 255 + 128
_WRITE_CHUNK = 256 * 1024
_STDIN_CHUNK = 512 * 1024
_MAX_PATH = 4095
# File metadata (user.e2b.* xattrs, reported without the prefix): what the agent sends per
# entry at most, and what write_file accepts (the agent checks the same).
_MAX_XATTRS = 64
_XATTR_BUDGET = 64 * 1024  # key + value bytes per file
_XATTR_NAME_MAX = 255 - len("user.e2b.")  # the kernel's XATTR_NAME_MAX, prefix included
_XATTR_VALUE_MAX = 4096
_XATTR_KEY = re.compile(r"[A-Za-z0-9._-]{1,200}")

_ERRORS: dict[str, type[CorralError]] = {
    "not_found": NotFoundError,
    "not_a_directory": InvalidRequestError,
    "is_a_directory": InvalidRequestError,
    "invalid": InvalidRequestError,
    "exists": ConflictError,
    "not_empty": ConflictError,
    "conflict": ConflictError,
    "permission_denied": PermissionDeniedError,
    "no_space": QuotaExceededError,
    "io": RuntimeFailure,
}

_FILE_TYPES = ("file", "dir", "symlink", "other")
FileType = Literal["file", "dir", "symlink", "other"]
_WATCH_KINDS = ("create", "write", "remove", "rename", "chmod")
WatchKind = Literal["create", "write", "remove", "rename", "chmod"]


@dataclass(frozen=True)
class ExecRequest:
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # name or numeric uid; None = root
    pty: tuple[int, int] | None = None  # (rows, cols)
    stdin: bool = True  # False: stdin is at EOF from the start
    tag: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    argv: list[str]
    cwd: str
    user: str
    tag: str | None
    pty: bool
    running: bool
    exit_code: int | None
    started_at: float  # unix time


@dataclass(frozen=True)
class OutputEvent:
    kind: Literal["stdout", "stderr", "exit"]  # PTY output arrives as "stdout"
    data: bytes = b""
    exit_code: int | None = None


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: FileType
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    link_target: str | None
    # The file's user.e2b.* extended attributes, prefix dropped (E2B's file metadata): set by
    # write_file or by anyone inside the sandbox. Regular files and directories only.
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class WatchEvent:
    """One change in a watched directory, as Go's fsnotify names them.

    ``name`` is relative to the watched directory ("file.txt", "sub/file.txt" when recursive),
    "." for the directory itself. A rename is ``rename`` of the old name then ``create`` of the
    new one (when both are in the watched tree).
    """

    name: str
    kind: WatchKind


# ----------------------------------------------------------------------------- connection


class _Conn:
    """One operation's stream to the agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    async def send(self, type_: int, payload: bytes = b"") -> None:
        if len(payload) > MAX_PAYLOAD:
            raise InvalidRequestError(f"request of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        try:
            self.writer.write(encode_frame(type_, payload))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise RuntimeFailure(f"lost the connection to the agent: {exc}") from exc

    async def send_data(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.writer.writelines((_data_header(len(data)), data))
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise RuntimeFailure(f"lost the connection to the agent: {exc}") from exc

    async def recv(self) -> Frame:
        return await read_frame(self.reader)

    async def expect(self, *types: FrameType) -> Frame:
        """The next frame, which must be one of ``types``; an ERROR frame raises its error."""
        frame = await self.recv()
        if frame.type == FrameType.ERROR:
            raise _error_from(frame.fields())
        if frame.type not in types:
            raise RuntimeFailure(f"agent sent frame type {frame.type}, expected {list(types)}")
        return frame

    async def expect_ok(self) -> Fields:
        return (await self.expect(FrameType.OK)).fields()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def _data_header(length: int) -> bytes:
    return length.to_bytes(4, "big") + bytes([FrameType.DATA])


def _error_from(fields: Fields) -> CorralError:
    code = fields.opt_text(Field.CODE) or "io"
    message = (fields.opt_text(Field.MSG) or "agent error")[:_MAX_MESSAGE]
    cls = _ERRORS.get(code, RuntimeFailure)
    return cls(message)


# ----------------------------------------------------------------------------- decoding


def _file_info(fields: Fields) -> FileInfo:
    type_ = fields.text(Field.TYPE)
    if type_ not in _FILE_TYPES:
        raise RuntimeFailure(f"agent sent an unknown file type {type_[:40]!r}")
    return FileInfo(
        name=fields.text(Field.NAME),
        path=fields.text(Field.PATH),
        type=cast(FileType, type_),
        size=fields.num(Field.SIZE, lo=0),
        mode=fields.num(Field.MODE, lo=0, hi=0o7777),
        mtime=fields.num(Field.MTIME) / 1e9,
        uid=fields.num(Field.UID, lo=0, hi=2**32 - 1),
        gid=fields.num(Field.GID, lo=0, hi=2**32 - 1),
        link_target=fields.opt_text(Field.LINK),
        metadata=_metadata(fields),
    )


def _metadata(fields: Fields) -> dict[str, str]:
    raws = fields.all_bytes(Field.XATTR)
    if len(raws) > _MAX_XATTRS:
        raise RuntimeFailure(f"agent sent {len(raws)} metadata entries (limit {_MAX_XATTRS})")
    out: dict[str, str] = {}
    total = 0
    for raw in raws:
        key, sep, value = raw.partition(b"\x00")
        if not sep or not key or len(key) > _XATTR_NAME_MAX or b"\x00" in value:
            raise RuntimeFailure("agent sent a malformed metadata entry")
        total += len(key) + len(value)
        if total > _XATTR_BUDGET:
            raise RuntimeFailure(f"agent sent over {_XATTR_BUDGET} bytes of metadata")
        name = key.decode("utf-8", "surrogateescape")
        if name in out:
            raise RuntimeFailure(f"agent sent metadata key {name[:200]!r} twice")
        out[name] = value.decode("utf-8", "surrogateescape")
    return out


def _process_info(fields: Fields) -> ProcessInfo:
    exit_code = fields.opt_num(Field.EXIT)
    if exit_code is not None and not 0 <= exit_code <= _MAX_EXIT:
        raise RuntimeFailure(f"agent sent an impossible exit code {exit_code}")
    return ProcessInfo(
        pid=fields.num(Field.PID, lo=1, hi=_MAX_PID),
        argv=fields.texts(Field.ARG),
        cwd=fields.text(Field.CWD),
        user=fields.text(Field.USER),
        tag=fields.opt_text(Field.TAG),
        pty=bool(fields.num(Field.PTY, lo=0, hi=1)),
        running=bool(fields.num(Field.RUNNING, lo=0, hi=1)),
        exit_code=exit_code,
        started_at=fields.num(Field.STARTED) / 1e9,
    )


def _output_event(frame: Frame) -> OutputEvent:
    if frame.type == FrameType.STDOUT:
        return OutputEvent("stdout", frame.payload)
    if frame.type == FrameType.STDERR:
        return OutputEvent("stderr", frame.payload)
    if frame.type == FrameType.EXIT:
        return OutputEvent("exit", exit_code=frame.fields().num(Field.EXIT, lo=0, hi=_MAX_EXIT))
    if frame.type == FrameType.ERROR:
        raise _error_from(frame.fields())
    raise RuntimeFailure(f"agent sent frame type {frame.type} in an output stream")


def _watch_event(frame: Frame) -> WatchEvent | None:
    """The event in ``frame``; None for the END that closes the stream."""
    if frame.type == FrameType.END:
        return None
    if frame.type == FrameType.ERROR:
        raise _error_from(frame.fields())
    if frame.type != FrameType.EVENT:
        raise RuntimeFailure(f"agent sent frame type {frame.type} in a watch stream")
    fields = frame.fields()
    kind = fields.text(Field.KIND)
    if kind not in _WATCH_KINDS:
        raise RuntimeFailure(f"agent sent an unknown watch event kind {kind[:40]!r}")
    name = fields.text(Field.NAME)
    if name != "." and (
        len(name.encode("utf-8", "surrogateescape")) > _MAX_PATH
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise RuntimeFailure(f"agent sent an invalid watch event name {name[:200]!r}")
    return WatchEvent(name, cast(WatchKind, kind))


# ----------------------------------------------------------------------------- validation


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a string")
    if "\x00" in value:
        raise InvalidRequestError(f"{what} must not contain NUL bytes")
    return value


def _check_path(path: object, what: str = "path") -> str:
    text = _check_text(path, what)
    if not text.startswith("/"):
        raise InvalidRequestError(f"{what} must be absolute: {text[:200]!r}")
    if len(text.encode("utf-8", "surrogateescape")) > _MAX_PATH:
        raise InvalidRequestError(f"{what} is too long")
    return text


def _metadata_items(metadata: Mapping[str, str] | None) -> list[tuple[int, FieldValue | None]]:
    if metadata is None:
        return []
    if not isinstance(metadata, Mapping):
        raise InvalidRequestError("metadata must be a mapping of strings to strings")
    if len(metadata) > _MAX_XATTRS:
        raise InvalidRequestError(f"at most {_MAX_XATTRS} metadata entries")
    items: list[tuple[int, FieldValue | None]] = []
    total = 0
    for key, value in metadata.items():
        if not isinstance(key, str) or not _XATTR_KEY.fullmatch(key):
            raise InvalidRequestError(
                f"invalid metadata key {str(key)[:200]!r}: 1..200 of A-Z a-z 0-9 . _ -"
            )
        raw = _check_text(value, f"metadata[{key}]").encode("utf-8", "surrogateescape")
        if len(raw) > _XATTR_VALUE_MAX:
            raise InvalidRequestError(f"metadata value of {key} is over {_XATTR_VALUE_MAX} bytes")
        total += len(key) + len(raw)
        if total > _XATTR_BUDGET:
            raise InvalidRequestError(f"metadata over {_XATTR_BUDGET} bytes in all")
        items.append((Field.XATTR, key.encode("ascii") + b"\x00" + raw))
    return items


def _check_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or not 1 <= pid <= _MAX_PID:
        raise InvalidRequestError(f"invalid pid: {pid!r}")
    return pid


def _check_dims(rows: int, cols: int) -> None:
    for v in (rows, cols):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise InvalidRequestError("terminal rows and cols must be within 1..65535")


def _spawn_payload(req: ExecRequest, attach: bool) -> bytes:
    if not req.argv or not isinstance(req.argv, list | tuple):
        raise InvalidRequestError("argv must be a non-empty list")
    items: list[tuple[int, FieldValue | None]] = []
    for i, arg in enumerate(req.argv):
        items.append((Field.ARG, _check_text(arg, f"argv[{i}]")))
    if not req.argv[0]:
        raise InvalidRequestError("argv[0] must not be empty")
    for key, value in req.env.items():
        _check_text(key, "env key")
        if not key or "=" in key:
            raise InvalidRequestError(f"invalid environment variable name: {key[:100]!r}")
        items.append((Field.ENV, f"{key}={_check_text(value, f'env[{key}]')}"))
    if req.cwd is not None:
        items.append((Field.CWD, _check_path(req.cwd, "cwd")))
    if req.user is not None:
        items.append((Field.USER, _check_text(req.user, "user")))
    if req.pty is not None:
        rows, cols = req.pty
        _check_dims(rows, cols)
        items += [(Field.ROWS, rows), (Field.COLS, cols)]
    if req.tag is not None:
        items.append((Field.TAG, _check_text(req.tag, "tag")))
    items += [(Field.STDIN, req.stdin), (Field.ATTACH, attach)]
    payload = encode_fields(items)
    if len(payload) > MAX_PAYLOAD:
        raise InvalidRequestError("argv and env together exceed 1 MiB")
    return payload


# ----------------------------------------------------------------------------- output streams


_T = TypeVar("_T")


async def _no_start() -> _Conn:
    """The opener of a stream made on a connection already open."""
    raise AssertionError("unreachable")


class _FrameStream(AsyncGenerator[_T, None]):
    """Items decoded from the frames of one operation's connection, until ``_item`` says the
    last one came. ``aclose``, an error, or cancelling a pending ``__anext__`` (a frame may be
    half read) closes the connection, which is how the host tells the agent it has gone."""

    def __init__(self, start: Callable[[], Awaitable[_Conn]], conn: _Conn | None = None) -> None:
        self._start = start
        self._conn = conn
        self._done = False

    def _item(self, frame: Frame) -> tuple[_T | None, bool]:
        """The frame's item (None: there is none, the stream ends) and whether it is the last."""
        raise NotImplementedError

    async def __anext__(self) -> _T:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._conn is None:
                self._conn = await self._start()
            item, last = self._item(await self._conn.recv())
        except BaseException:
            await self.aclose()
            raise
        if last:
            await self.aclose()
        if item is None:
            raise StopAsyncIteration
        return item

    async def asend(self, value: None) -> _T:
        return await self.__anext__()

    async def athrow(
        self,
        typ: type[BaseException] | BaseException,
        val: object = None,
        tb: TracebackType | None = None,
    ) -> _T:
        await self.aclose()
        if isinstance(typ, BaseException):
            raise typ
        raise typ()

    async def aclose(self) -> None:
        self._done = True
        if self._conn is not None:
            await self._conn.close()


class _OutputStream(_FrameStream[OutputEvent]):
    """Output events of one process; ends after the exit event.

    Dropping the stream of an exec_stream makes the agent kill the process group: wrap the
    whole iteration, not single steps, in a timeout if the process should survive it.
    """

    def _item(self, frame: Frame) -> tuple[OutputEvent | None, bool]:
        event = _output_event(frame)
        return event, event.kind == "exit"


class _WatchStream(_FrameStream[WatchEvent]):
    """Events of one watch; ends when the watched directory itself is gone (closing it ends
    the agent's helper at once)."""

    def _item(self, frame: Frame) -> tuple[WatchEvent | None, bool]:
        event = _watch_event(frame)
        return event, event is None


# ----------------------------------------------------------------------------- the client


class AgentClient:
    """Talks to one sandbox's agent through ``opener`` (a fresh stream per operation)."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener

    async def _open(self) -> _Conn:
        try:
            reader, writer = await self._opener()
        except CorralError:
            raise
        except OSError as exc:  # includes TimeoutError and ConnectionRefusedError
            raise SandboxNotRunningError(f"cannot reach the sandbox agent: {exc}") from exc
        return _Conn(reader, writer)

    async def _call(self, type_: FrameType, items: list[tuple[int, FieldValue | None]]) -> Fields:
        return await self._call_raw(type_, encode_fields(items))

    async def _call_raw(self, type_: FrameType, payload: bytes) -> Fields:
        conn = await self._open()
        try:
            await conn.send(type_, payload)
            return await conn.expect_ok()
        finally:
            await conn.close()

    async def _entries(
        self, type_: FrameType, items: list[tuple[int, FieldValue | None]], what: str
    ) -> list[Fields]:
        conn = await self._open()
        try:
            await conn.send(type_, encode_fields(items))
            out: list[Fields] = []
            while True:
                frame = await conn.expect(FrameType.ENTRY, FrameType.END)
                if frame.type == FrameType.END:
                    return out
                if len(out) >= MAX_ENTRIES:
                    raise InvalidRequestError(f"{what} has more than {MAX_ENTRIES} entries")
                out.append(frame.fields())
        finally:
            await conn.close()

    # -- processes

    async def ping(self) -> dict[str, str]:
        fields = await self._call(FrameType.PING, [])
        return {
            "version": fields.text(Field.VERSION)[:100],
            "protocol": fields.text(Field.PROTOCOL)[:100],
        }

    async def set_env(self, env: Mapping[str, str]) -> None:
        """Replace the environment every later process of the sandbox starts from."""
        items: list[tuple[int, FieldValue | None]] = []
        for key, value in env.items():
            if not key or "=" in key:
                raise InvalidRequestError(f"invalid environment name {key!r}")
            items.append((Field.ENV, f"{key}={_check_text(value, f'env[{key}]')}"))
        await self._call(FrameType.SETENV, items)

    async def spawn(self, req: ExecRequest) -> int:
        fields = await self._call_raw(FrameType.SPAWN, _spawn_payload(req, False))
        return fields.num(Field.PID, lo=1, hi=_MAX_PID)

    def attach(self, pid: int, *, replay: bool = True) -> AsyncGenerator[OutputEvent, None]:
        _check_pid(pid)

        async def start() -> _Conn:
            conn = await self._open()
            try:
                await conn.send(
                    FrameType.ATTACH, encode_fields([(Field.PID, pid), (Field.REPLAY, replay)])
                )
                await conn.expect_ok()
            except BaseException:
                await conn.close()
                raise
            return conn

        return _OutputStream(start)

    async def exec_stream(self, req: ExecRequest) -> tuple[int, AsyncGenerator[OutputEvent, None]]:
        payload = _spawn_payload(req, True)
        conn = await self._open()
        try:
            await conn.send(FrameType.SPAWN, payload)
            pid = (await conn.expect_ok()).num(Field.PID, lo=1, hi=_MAX_PID)
        except BaseException:
            await conn.close()
            raise

        return pid, _OutputStream(_no_start, conn)

    async def wait(self, pid: int) -> int:
        conn = await self._open()
        try:
            await conn.send(FrameType.WAIT, encode_fields([(Field.PID, _check_pid(pid))]))
            await conn.expect_ok()
            frame = await conn.expect(FrameType.EXIT)
            return frame.fields().num(Field.EXIT, lo=0, hi=_MAX_EXIT)
        finally:
            await conn.close()

    async def list_processes(self) -> list[ProcessInfo]:
        entries = await self._entries(FrameType.LIST, [], "the process list")
        return [_process_info(f) for f in entries]

    async def write_stdin(self, pid: int, data: bytes) -> None:
        _check_pid(pid)
        view = memoryview(bytes(data))
        offset = 0
        while True:
            chunk = bytes(view[offset : offset + _STDIN_CHUNK])
            await self._call(FrameType.STDIN, [(Field.PID, pid), (Field.DATA, chunk)])
            offset += len(chunk)
            if offset >= len(view):
                return

    async def close_stdin(self, pid: int) -> None:
        await self._call(FrameType.CLOSE_STDIN, [(Field.PID, _check_pid(pid))])

    async def signal(self, pid: int, signo: int) -> None:
        if isinstance(signo, bool) or not isinstance(signo, int) or not 1 <= signo <= 64:
            raise InvalidRequestError(f"invalid signal number: {signo!r}")
        await self._call(FrameType.SIGNAL, [(Field.PID, _check_pid(pid)), (Field.SIGNO, signo)])

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        _check_dims(rows, cols)
        await self._call(
            FrameType.RESIZE, [(Field.PID, _check_pid(pid)), (Field.ROWS, rows), (Field.COLS, cols)]
        )

    # -- files

    async def stat(self, path: str, *, beneath: str | None = None) -> FileInfo:
        return _file_info(await self._call(FrameType.STAT, _path_items(path, beneath)))

    async def list_dir(
        self, path: str, *, depth: int = 1, beneath: str | None = None
    ) -> list[FileInfo]:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise InvalidRequestError("depth must be at least 1")
        items = [*_path_items(path, beneath), (Field.DEPTH, depth)]
        entries = await self._entries(FrameType.LISTDIR, items, f"the listing of {path}")
        return [_file_info(f) for f in entries]

    async def read_file(
        self, path: str, *, beneath: str | None = None
    ) -> AsyncGenerator[bytes, None]:
        items = _path_items(path, beneath)
        conn = await self._open()
        try:
            await conn.send(FrameType.READ, encode_fields(items))
            await conn.expect_ok()
            while True:
                frame = await conn.expect(FrameType.DATA, FrameType.END)
                if frame.type == FrameType.END:
                    return
                yield frame.payload
        finally:
            await conn.close()

    async def watch(
        self, path: str, *, recursive: bool, beneath: str | None = None
    ) -> AsyncGenerator[WatchEvent, None]:
        """Changes in the directory ``path`` (and with ``recursive`` in every directory below
        it, including ones made later) from now until the returned stream is closed.

        Returns once the watch is armed: every change after that is reported, in order.
        A missing path raises NotFoundError, a file InvalidRequestError, as ``stat`` and
        ``list_dir`` do. The stream raises RuntimeFailure("too many events") if the agent's
        queue overflowed because it was not read, and ends when the directory is removed.
        """
        if not isinstance(recursive, bool):
            raise InvalidRequestError("recursive must be a boolean")
        items = [*_path_items(path, beneath), (Field.RECURSIVE, recursive)]
        conn = await self._open()
        try:
            await conn.send(FrameType.WATCH, encode_fields(items))
            await conn.expect_ok()
        except BaseException:
            await conn.close()
            raise
        return _WatchStream(_no_start, conn)

    async def write_file(
        self,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        user: str | None = None,
        beneath: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> FileInfo:
        """Writes ``path`` atomically (a temporary sibling renamed over it). ``metadata``
        becomes the new file's user.e2b.* xattrs, replacing the old file's: at most 64 keys of
        1..200 bytes of [A-Za-z0-9._-], values up to 4 KiB, 64 KiB in all (else
        InvalidRequestError, before anything is written; also when the filesystem keeps no
        xattrs; QuotaExceededError when it has no room for them)."""
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise InvalidRequestError(f"invalid file mode: {mode!r}")
        items = [
            *_path_items(path, beneath),
            (Field.MODE, mode),
            (Field.USER, _opt_user(user)),
            *_metadata_items(metadata),
        ]
        conn = await self._open()
        try:
            await conn.send(FrameType.WRITE, encode_fields(items))
            await conn.expect_ok()
            try:
                async for chunk in chunks:
                    if not isinstance(chunk, bytes | bytearray | memoryview):
                        raise InvalidRequestError("file content must be bytes")
                    view = memoryview(chunk).cast("B")
                    for off in range(0, len(view), _WRITE_CHUNK):
                        await conn.send_data(view[off : off + _WRITE_CHUNK])
                await conn.send(FrameType.END)
            except RuntimeFailure:
                # The agent may have stopped reading because it failed (disk full, ...):
                # its error frame, if any, is the better answer.
                await conn.expect_ok()
                raise
            return _file_info(await conn.expect_ok())
        finally:
            await conn.close()

    async def mkdir(
        self,
        path: str,
        *,
        parents: bool = True,
        user: str | None = None,
        beneath: str | None = None,
    ) -> FileInfo:
        items = [
            *_path_items(path, beneath),
            (Field.PARENTS, parents),
            (Field.USER, _opt_user(user)),
        ]
        return _file_info(await self._call(FrameType.MKDIR, items))

    async def remove(
        self, path: str, *, recursive: bool = False, beneath: str | None = None
    ) -> None:
        await self._call(
            FrameType.REMOVE, [*_path_items(path, beneath), (Field.RECURSIVE, recursive)]
        )

    async def rename(self, src: str, dst: str, *, beneath: str | None = None) -> FileInfo:
        items = [*_path_items(src, beneath), (Field.DST, _check_path(dst, "dst"))]
        return _file_info(await self._call(FrameType.RENAME, items))

    async def symlink(
        self,
        target: str,
        path: str,
        *,
        user: str | None = None,
        beneath: str | None = None,
    ) -> None:
        target = _check_text(target, "symlink target")
        if not target or len(target.encode("utf-8", "surrogateescape")) > _MAX_PATH:
            raise InvalidRequestError("symlink target must be 1..4095 bytes")
        items = [*_path_items(path, beneath), (Field.TARGET, target), (Field.USER, _opt_user(user))]
        await self._call(FrameType.SYMLINK, items)


def _path_items(path: str, beneath: str | None) -> list[tuple[int, FieldValue | None]]:
    return [
        (Field.PATH, _check_path(path)),
        (Field.BENEATH, None if beneath is None else _check_path(beneath, "beneath")),
    ]


def _opt_user(user: str | None) -> str | None:
    return None if user is None else _check_text(user, "user")
