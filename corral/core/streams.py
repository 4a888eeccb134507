"""Helpers for async streams that are peeked at before an HTTP answer is committed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

__all__ = ["peek"]

T = TypeVar("T")


async def peek(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pull the first item now (so its error surfaces as an error, not a cut stream).

    Returns an iterator that yields that item again, then the rest; closing it closes ``stream``.
    """
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        await _aclose(stream)
        return _empty()
    except BaseException:
        await _aclose(stream)
        raise
    return _chain(first, stream)


async def _empty() -> AsyncIterator[T]:
    return
    yield


async def _chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await _aclose(rest)


async def _aclose(stream: AsyncIterator[T]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
