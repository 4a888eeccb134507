"""What every tier does when a create or a wake fails half way: undo it — even when the caller
was cancelled (the undo is shielded) — and report the failure as a ``CorralError``, naming the
undo's own failure too, since a host left half set up is worse than the error that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from corral.errors import CorralError, RuntimeFailure

__all__ = ["undone_on_failure"]


@contextlib.asynccontextmanager
async def undone_on_failure(undo: Callable[[], Awaitable[None]], what: str) -> AsyncIterator[None]:
    """Run the block; if it raises, await ``undo()`` and raise: the block's ``CorralError`` (or
    cancellation) as it is, any other error as a ``RuntimeFailure`` saying ``what`` failed."""
    try:
        yield
    except BaseException as exc:
        cleanup = asyncio.ensure_future(undo())
        try:
            await asyncio.shield(cleanup)
        except Exception as cleanup_exc:  # report both; the original error comes first
            if isinstance(exc, Exception):
                raise RuntimeFailure(
                    f"{what} failed ({exc}); cleanup failed too: {cleanup_exc}"
                ) from exc
        if isinstance(exc, CorralError) or not isinstance(exc, Exception):
            raise
        raise RuntimeFailure(f"{what} failed: {exc}") from exc
