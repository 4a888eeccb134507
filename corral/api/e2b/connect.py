"""The Connect RPC protocol (connectrpc.com/docs/protocol) with the JSON codec, over HTTP/1.1.

Only what E2B's envd clients speak: unary calls (``application/json``), server streams and client
streams (``application/connect+json``: each message in an envelope of one flag byte and a
4-byte big-endian length; flag 0x02 marks the end-of-stream message that carries the error).
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from corral.errors import CorralError, InvalidRequestError

__all__ = [
    "STREAM_TYPE",
    "ConnectError",
    "code_of",
    "read_envelopes",
    "stream_response",
    "unary",
]

STREAM_TYPE = "application/connect+json"
_END_STREAM = 0x02
_ENVELOPE = struct.Struct(">BI")
_MAX_MESSAGE = 4 << 20

# https://connectrpc.com/docs/protocol#error-codes
_HTTP_STATUS = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

# corral's HTTP statuses as Connect codes: what the SDKs branch on (NOT_FOUND, ALREADY_EXISTS,
# INVALID_ARGUMENT) must come out right.
_BY_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "failed_precondition",
    429: "resource_exhausted",
    502: "unavailable",
    504: "deadline_exceeded",
}


class ConnectError(Exception):
    """An RPC failure with its Connect code; raised by handlers, answered by this module."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        assert code in _HTTP_STATUS, code
        self.code = code
        self.message = message


def code_of(exc: BaseException) -> ConnectError:
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, CorralError):
        return ConnectError(_BY_STATUS.get(exc.status, "internal"), exc.message)
    return ConnectError("internal", "internal error")


def _error_body(err: ConnectError) -> dict[str, Any]:
    return {"code": err.code, "message": err.message}


def error_response(err: ConnectError) -> Response:
    return JSONResponse(_error_body(err), status_code=_HTTP_STATUS[err.code])


async def unary(
    request: Request, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
) -> Response:
    """Answer a unary call: its JSON body in, the handler's message (or error) out."""
    try:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ConnectError("invalid_argument", "unary calls take application/json")
        body = await request.body()
        if len(body) > _MAX_MESSAGE:
            raise ConnectError("resource_exhausted", "message too large")
        message = _decode(body or b"{}")
        return JSONResponse(await handler(message))
    except (ConnectError, CorralError) as e:
        return error_response(code_of(e))


def _decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except ValueError:
        raise ConnectError("invalid_argument", "the message is not JSON") from None
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "the message must be a JSON object")
    return message


def _envelope(flags: int, payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, separators=(",", ":")).encode()
    return _ENVELOPE.pack(flags, len(data)) + data


async def read_envelopes(request: Request) -> AsyncIterator[dict[str, Any]]:
    """The messages of a streaming request body, as they arrive."""
    if request.headers.get("content-type", "").split(";")[0].strip() != STREAM_TYPE:
        raise ConnectError("invalid_argument", f"streaming calls take {STREAM_TYPE}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        while len(buf) >= _ENVELOPE.size:
            flags, length = _ENVELOPE.unpack_from(buf)
            if length > _MAX_MESSAGE:
                raise ConnectError("resource_exhausted", "message too large")
            if len(buf) < _ENVELOPE.size + length:
                break
            data = bytes(buf[_ENVELOPE.size : _ENVELOPE.size + length])
            del buf[: _ENVELOPE.size + length]
            if flags & 0x01:
                raise ConnectError("unimplemented", "compressed messages are not supported")
            if flags & _END_STREAM:
                return
            yield _decode(data)
    if buf:
        raise ConnectError("invalid_argument", "the request ended inside a message")


async def first_message(request: Request) -> dict[str, Any]:
    """The single message a server-streaming call sends."""
    async for message in read_envelopes(request):
        return message
    raise InvalidRequestError("the request carried no message")


def stream_response(messages: AsyncIterator[dict[str, Any]]) -> Response:
    """A server stream: each message enveloped, then the end-of-stream message (with the error
    that ended the stream, if one did)."""

    async def body() -> AsyncIterator[bytes]:
        end: dict[str, Any] = {}
        try:
            async for message in messages:
                yield _envelope(0, message)
        except (ConnectError, CorralError) as e:
            end = {"error": _error_body(code_of(e))}
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                await aclose()
        yield _envelope(_END_STREAM, end)

    return StreamingResponse(body(), media_type=STREAM_TYPE)
