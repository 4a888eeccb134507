"""The tar body reader gunzips on the fly across any chunking, bounds its buffer, and refuses broken input."""

from __future__ import annotations

import gzip
import os
from collections.abc import AsyncIterator

import pytest

from corral.agent.archive import _Source
from corral.errors import InvalidRequestError


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def drain(src: _Source, step: int = 1000) -> bytes:
    out = bytearray()
    while (piece := await src.read_exact(step)) is not None:
        out += piece
        assert len(src._buf) <= 2 * (1 << 20) + 70000  # never the whole stream in memory
    return bytes(out)


@pytest.mark.parametrize("size", [1, 2, 3, 511, 4096, 1 << 20])
async def test_plain_and_gzip_across_chunkings(size: int) -> None:
    data = os.urandom(50_000) * 4
    assert await drain(_Source(chunked(data, size)), 1000) == data[:200_000]
    one = gzip.compress(data)
    assert await drain(_Source(chunked(one, size)), 1000) == data
    # Two gzip members back to back, then junk after the last one (ignored).
    two = gzip.compress(data[:70_000]) + gzip.compress(data[70_000:]) + b"\x00junk"
    assert await drain(_Source(chunked(two, size)), 1000) == data


async def test_a_gzip_bomb_is_inflated_step_by_step() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), 9)
    src = _Source(chunked(bomb, 1 << 20))
    total = 0
    while (piece := await src.read_exact(1 << 16)) is not None:
        total += len(piece)
        assert len(src._buf) <= (1 << 20) + (1 << 16)
    assert total == 64 << 20


async def test_truncated_and_partial_input() -> None:
    data = gzip.compress(os.urandom(100_000))
    with pytest.raises(InvalidRequestError, match="truncated"):
        await drain(_Source(chunked(data[:-100], 4096)))
    with pytest.raises(InvalidRequestError, match="not valid gzip"):
        await drain(_Source(chunked(data[:10] + b"x" * 1000, 4096)))
    src = _Source(chunked(b"abc", 1))
    with pytest.raises(InvalidRequestError, match="truncated"):
        await src.read_exact(10)
    assert await _Source(chunked(b"", 1)).read_exact(10) is None
    assert await _Source(chunked(b"a", 1)).read_exact(1) == b"a"
