"""The agent wire format round-trips, and bounds and garbage from the agent raise RuntimeFailure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
from pathlib import Path

import pytest

import corral.agent
from corral.agent.protocol import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Field,
    Fields,
    Frame,
    FrameType,
    decode_frame,
    encode_fields,
    encode_frame,
    read_frame,
)
from corral.errors import RuntimeFailure


def test_frame_round_trip() -> None:
    payload = encode_fields(
        [(Field.PID, 42), (Field.ARG, "echo"), (Field.ARG, "hé"), (Field.DATA, b"\x00\xff")]
    )
    wire = encode_frame(FrameType.SPAWN, payload)
    assert wire[:HEADER_SIZE] == struct.pack(">IB", len(payload), 2)
    frame, used = decode_frame(wire + b"trailing") or (None, 0)
    assert used == len(wire)
    assert frame == Frame(FrameType.SPAWN, payload)
    fields = frame.fields()
    assert fields.num(Field.PID) == 42
    assert fields.texts(Field.ARG) == ["echo", "hé"]
    assert fields.opt_bytes(Field.DATA) == b"\x00\xff"
    assert fields.opt_text(Field.CWD) is None and not fields.has(Field.CWD)


def test_numbering_is_that_of_agent_c() -> None:
    """FrameType and Field hold exactly the T_ and F_ enums of agent.c, name for name."""
    src = (Path(corral.agent.__file__).parent / "agent.c").read_text()
    frames = {m[1]: int(m[2]) for m in re.finditer(r"\bT_([A-Z_]+) = (\d+)", src)}
    fields = {m[1]: int(m[2]) for m in re.finditer(r"\bF_([A-Z_]+) = (\d+)", src)}
    assert frames == {t.name: t.value for t in FrameType}
    assert fields == {f.name: f.value for f in Field}
    assert (FrameType.WATCH, FrameType.EVENT, Field.KIND) == (24, 134, 37)
    assert Field.XATTR == 38


def test_field_encoding_details() -> None:
    raw = encode_fields(
        [(Field.STDIN, True), (Field.ATTACH, False), (Field.EXIT, -1), (Field.CWD, None)]
    )
    assert raw == (
        b"\x07"
        + struct.pack(">Iq", 8, 1)
        + b"\x09"
        + struct.pack(">Iq", 8, 0)
        + b"\x16"
        + struct.pack(">Iq", 8, -1)
    )
    # Non-UTF-8 file names survive the round trip (surrogateescape, like os.fsdecode).
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert Fields.decode(encode_fields([(Field.NAME, name)])).text(Field.NAME) == name
    assert encode_fields([]) == b""


def test_repeated_metadata_entries_keep_their_bytes() -> None:
    """XATTR is repeated, each ``key NUL value``: raw bytes, so a field may hold a NUL."""
    raw = encode_fields([(Field.XATTR, b"k\x00v"), (Field.XATTR, b"e\x00")])
    assert (
        raw
        == b"\x26" + struct.pack(">I", 3) + b"k\x00v" + b"\x26" + struct.pack(">I", 2) + b"e\x00"
    )
    assert Fields.decode(raw).all_bytes(Field.XATTR) == [b"k\x00v", b"e\x00"]


def test_incomplete_frames_wait_for_more() -> None:
    wire = encode_frame(FrameType.OK, encode_fields([(Field.PID, 1)]))
    for cut in range(len(wire)):
        assert decode_frame(wire[:cut]) is None


def test_oversized_and_unknown_frames_are_refused() -> None:
    with pytest.raises(RuntimeFailure, match="frame of"):
        decode_frame(struct.pack(">IB", MAX_PAYLOAD + 1, FrameType.OK))
    with pytest.raises(RuntimeFailure, match="unknown frame type"):
        decode_frame(struct.pack(">IB", 0, 200))
    with pytest.raises(ValueError):
        encode_frame(FrameType.DATA, b"x" * (MAX_PAYLOAD + 1))
    assert decode_frame(encode_frame(FrameType.DATA, b"x" * MAX_PAYLOAD)) is not None


def test_malformed_fields_are_refused() -> None:
    with pytest.raises(RuntimeFailure, match="truncated field header"):
        Fields.decode(b"\x01\x00\x00")
    with pytest.raises(RuntimeFailure, match="longer than its frame"):
        Fields.decode(b"\x01\x00\x00\x00\x09abc")
    fields = Fields.decode(encode_fields([(Field.PID, b"\x01\x02"), (Field.NAME, "a\x00b")]))
    with pytest.raises(RuntimeFailure, match="not an integer"):
        fields.num(Field.PID)
    with pytest.raises(RuntimeFailure, match="NUL"):
        fields.text(Field.NAME)
    with pytest.raises(RuntimeFailure, match="lacks field"):
        fields.num(Field.EXIT)
    with pytest.raises(RuntimeFailure, match="lacks field"):
        fields.text(Field.PATH)
    ranged = Fields.decode(encode_fields([(Field.PID, -5)]))
    with pytest.raises(RuntimeFailure, match="out of range"):
        ranged.num(Field.PID, lo=1)


def test_random_garbage_never_escapes_as_another_error() -> None:
    rng = os.urandom
    for _ in range(2000):
        blob = rng(64)
        with contextlib.suppress(RuntimeFailure):
            Fields.decode(blob)
        with contextlib.suppress(RuntimeFailure):
            decode_frame(blob)


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_read_frame_from_a_stream() -> None:
    wire = encode_frame(FrameType.STDOUT, b"hello") + encode_frame(FrameType.END)
    reader = _reader(wire)
    assert await read_frame(reader) == Frame(FrameType.STDOUT, b"hello")
    assert await read_frame(reader) == Frame(FrameType.END, b"")
    with pytest.raises(RuntimeFailure, match="closed the connection"):
        await read_frame(reader)


async def test_read_frame_refuses_truncation_and_bombs() -> None:
    with pytest.raises(RuntimeFailure, match="closed the connection"):
        await read_frame(_reader(struct.pack(">IB", 10, FrameType.OK) + b"short"))
    with pytest.raises(RuntimeFailure, match="closed the connection"):
        await read_frame(_reader(b"\x00\x00"))
    # The size is checked before any payload is read, so a huge claim costs nothing.
    with pytest.raises(RuntimeFailure, match="frame of"):
        await read_frame(_reader(struct.pack(">IB", 0xFFFFFFFF, FrameType.OK)))
