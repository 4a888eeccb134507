"""Wire format shared with ``agent.c``: length-prefixed frames whose payload is a list of fields.

A frame is ``u32 length (big endian) | u8 type | payload`` with ``length`` counting the payload
only and never above :data:`MAX_PAYLOAD`. Most payloads are TLV fields: ``u8 key | u32 length |
value``; integers are 8-byte big-endian signed, strings UTF-8 (surrogateescape for file names),
repeated keys form lists. Data frames (process output, file chunks) carry raw bytes instead.
Everything here treats the bytes from the agent as hostile: every length is checked before use
and any malformed input raises :class:`corral.errors.RuntimeFailure`.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from corral.errors import RuntimeFailure

__all__ = [
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "Field",
    "Fields",
    "Frame",
    "FrameType",
    "decode_frame",
    "encode_fields",
    "encode_frame",
    "read_frame",
]

HEADER_SIZE = 5
MAX_PAYLOAD = 1 << 20

_HEADER = struct.Struct(">IB")
_FIELD_HEADER = struct.Struct(">BI")
_I64 = struct.Struct(">q")


class FrameType(IntEnum):
    # host -> agent requests
    PING = 1
    SPAWN = 2
    ATTACH = 3
    WAIT = 4
    LIST = 5
    STDIN = 6
    CLOSE_STDIN = 7
    SIGNAL = 8
    RESIZE = 9
    SETENV = 10
    STAT = 16
    LISTDIR = 17
    READ = 18
    WRITE = 19
    MKDIR = 20
    REMOVE = 21
    RENAME = 22
    SYMLINK = 23
    WATCH = 24
    # either direction: raw data and its end
    DATA = 32
    END = 33
    # agent -> host replies
    OK = 128
    ERROR = 129
    STDOUT = 130
    STDERR = 131
    EXIT = 132
    ENTRY = 133
    EVENT = 134


class Field(IntEnum):
    ARG = 1
    ENV = 2
    CWD = 3
    USER = 4
    ROWS = 5
    COLS = 6
    STDIN = 7
    TAG = 8
    ATTACH = 9
    PID = 10
    REPLAY = 11
    SIGNO = 12
    PATH = 13
    BENEATH = 14
    DEPTH = 15
    MODE = 16
    PARENTS = 17
    RECURSIVE = 18
    DST = 19
    TARGET = 20
    DATA = 21
    EXIT = 22
    CODE = 23
    MSG = 24
    NAME = 25
    TYPE = 26
    SIZE = 27
    MTIME = 28
    UID = 29
    GID = 30
    LINK = 31
    RUNNING = 32
    PTY = 33
    STARTED = 34
    VERSION = 35
    PROTOCOL = 36
    KIND = 37
    XATTR = 38


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)

FieldValue = bytes | str | int | bool


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes

    def fields(self) -> Fields:
        return Fields.decode(self.payload)


def encode_frame(type_: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(len(payload), type_) + payload


def _encode_value(value: FieldValue) -> bytes:
    if isinstance(value, bool | int):
        return _I64.pack(int(value))
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def encode_fields(fields: Iterable[tuple[int, FieldValue | None]]) -> bytes:
    """Encodes (key, value) pairs; ``None`` values are left out (the agent's default applies)."""
    out = bytearray()
    for key, value in fields:
        if value is None:
            continue
        raw = _encode_value(value)
        out += _FIELD_HEADER.pack(key, len(raw))
        out += raw
    return bytes(out)


def decode_frame(buf: bytes | bytearray) -> tuple[Frame, int] | None:
    """Decodes one frame from the front of ``buf``: (frame, bytes used), or None if incomplete."""
    if len(buf) < HEADER_SIZE:
        return None
    length, type_ = _HEADER.unpack_from(buf)
    _check_header(length, type_)
    if len(buf) < HEADER_SIZE + length:
        return None
    return Frame(type_, bytes(buf[HEADER_SIZE : HEADER_SIZE + length])), HEADER_SIZE + length


def _check_header(length: int, type_: int) -> None:
    if length > MAX_PAYLOAD:
        raise RuntimeFailure(f"agent sent a frame of {length} bytes (limit {MAX_PAYLOAD})")
    if type_ not in _KNOWN_TYPES:
        raise RuntimeFailure(f"agent sent an unknown frame type {type_}")


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Reads one frame; a closed or garbled stream raises RuntimeFailure."""
    try:
        header = await reader.readexactly(HEADER_SIZE)
        length, type_ = _HEADER.unpack(header)
        _check_header(length, type_)
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as exc:
        raise RuntimeFailure("the agent closed the connection mid-reply") from exc
    except (ConnectionError, OSError) as exc:
        raise RuntimeFailure(f"lost the connection to the agent: {exc}") from exc
    return Frame(type_, payload)


class Fields:
    """Decoded TLV fields with typed, validating accessors."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[int, list[bytes]]) -> None:
        self._items = items

    @classmethod
    def decode(cls, payload: bytes) -> Fields:
        items: dict[int, list[bytes]] = {}
        view = memoryview(payload)
        i = 0
        while i < len(view):
            if len(view) - i < _FIELD_HEADER.size:
                raise RuntimeFailure("agent sent a truncated field header")
            key, length = _FIELD_HEADER.unpack_from(view, i)
            i += _FIELD_HEADER.size
            if length > len(view) - i:
                raise RuntimeFailure("agent sent a field longer than its frame")
            items.setdefault(key, []).append(bytes(view[i : i + length]))
            i += length
        return cls(items)

    def has(self, key: int) -> bool:
        return key in self._items

    def all_bytes(self, key: int) -> list[bytes]:
        return list(self._items.get(key, ()))

    def opt_bytes(self, key: int) -> bytes | None:
        values = self._items.get(key)
        return values[0] if values else None

    def opt_text(self, key: int) -> str | None:
        raw = self.opt_bytes(key)
        return None if raw is None else _text(raw, key)

    def text(self, key: int) -> str:
        value = self.opt_text(key)
        if value is None:
            raise RuntimeFailure(f"agent reply lacks field {key}")
        return value

    def texts(self, key: int) -> list[str]:
        return [_text(raw, key) for raw in self._items.get(key, ())]

    def opt_num(self, key: int) -> int | None:
        raw = self.opt_bytes(key)
        if raw is None:
            return None
        if len(raw) != _I64.size:
            raise RuntimeFailure(f"agent sent field {key} as {len(raw)} bytes, not an integer")
        value: int = _I64.unpack(raw)[0]
        return value

    def num(self, key: int, *, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
        value = self.opt_num(key)
        if value is None:
            raise RuntimeFailure(f"agent reply lacks field {key}")
        if not lo <= value <= hi:
            raise RuntimeFailure(f"agent sent field {key} out of range: {value}")
        return value


def _text(raw: bytes, key: int) -> str:
    if b"\x00" in raw:
        raise RuntimeFailure(f"agent sent field {key} with a NUL byte")
    return raw.decode("utf-8", "surrogateescape")
