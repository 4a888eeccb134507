"""The I/O half of the SDK: one blocking and one asyncio HTTP wrapper with the same methods.

Both delegate every decision (routes, error mapping, stream parsing) to ``_wire``; they differ
only in ``await``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ssl
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Generator,
    Iterable,
    Iterator,
)
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Protocol

import httpx

from corral.errors import CorralError, InvalidRequestError
from corral.sdk._config import ClientConfig
from corral.sdk._wire import (
    Call,
    NdjsonDecoder,
    auth_headers,
    error_from_response,
    error_from_transport,
    parse_exec_event,
)
from corral.sdk.models import ExecEvent

__all__ = [
    "AsyncHttp",
    "AsyncWriteData",
    "SyncHttp",
    "WriteData",
    "async_body",
    "sync_body",
]

CHUNK = 1 << 20


class Readable(Protocol):
    def read(self, size: int, /) -> bytes | str: ...


class AsyncReadable(Protocol):
    async def read(self, size: int, /) -> bytes | str: ...


WriteData = str | bytes | bytearray | memoryview | Readable | Iterable[bytes]
AsyncWriteData = WriteData | AsyncReadable | AsyncIterable[bytes]


def _as_bytes(chunk: object) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, bytes | bytearray | memoryview):
        return bytes(chunk)
    raise InvalidRequestError(f"file data must be str or bytes chunks, not {type(chunk).__name__}")


def sync_body(data: WriteData, chunk_size: int = CHUNK) -> bytes | Iterator[bytes]:
    """Request content for an upload: small values as is, file-likes and iterators streamed."""
    if isinstance(data, str | bytes | bytearray | memoryview):
        return _as_bytes(data)
    if hasattr(data, "read"):
        return _read_chunks(data, chunk_size)  # type: ignore[arg-type]
    if isinstance(data, Iterable):
        return (_as_bytes(c) for c in data)
    raise InvalidRequestError(
        f"cannot write a {type(data).__name__}: pass str, bytes, a file object or an iterator"
    )


def _read_chunks(f: Readable, chunk_size: int) -> Iterator[bytes]:
    while chunk := f.read(chunk_size):
        yield _as_bytes(chunk)


def async_body(data: AsyncWriteData, chunk_size: int = CHUNK) -> bytes | AsyncIterator[bytes]:
    """Like ``sync_body``; blocking sources are read in a worker thread, off the event loop."""
    if isinstance(data, str | bytes | bytearray | memoryview):
        return _as_bytes(data)
    if hasattr(data, "read"):
        return _aread_chunks(data, chunk_size)  # type: ignore[arg-type]
    if isinstance(data, AsyncIterable):
        return _aiter_async(data)
    if isinstance(data, Iterable):
        return iterate_in_thread(iter(data))
    raise InvalidRequestError(
        f"cannot write a {type(data).__name__}: pass str, bytes, a file object or an iterator"
    )


async def _aread_chunks(f: Readable | AsyncReadable, chunk_size: int) -> AsyncIterator[bytes]:
    is_async = inspect.iscoroutinefunction(f.read)
    while True:
        if is_async:
            chunk = await f.read(chunk_size)  # type: ignore[misc]
        else:
            chunk = await asyncio.to_thread(f.read, chunk_size)
        if not chunk:
            return
        yield _as_bytes(chunk)


async def _aiter_async(data: AsyncIterable[Any]) -> AsyncIterator[bytes]:
    async for chunk in data:
        yield _as_bytes(chunk)


async def iterate_in_thread(it: Iterator[Any]) -> AsyncIterator[bytes]:
    """Drive a blocking iterator (a tar being built from local files) from a worker thread."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, it, done)
        if chunk is done:
            return
        yield _as_bytes(chunk)


def _decode_json(resp: httpx.Response) -> Any:
    if resp.status_code == 204 or not resp.content:
        return None
    try:
        return resp.json()
    except ValueError as exc:
        raise CorralError(
            f"the server at {resp.request.url} answered something that is not JSON: "
            f"{resp.content[:200]!r}"
        ) from exc


def _content_headers(call: Call) -> dict[str, str] | None:
    return None if call.content_type is None else {"Content-Type": call.content_type}


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle costs ~30 ms; once per process, not once per Sandbox.
    return httpx.create_ssl_context()


def _client_args(config: ClientConfig) -> dict[str, Any]:
    args: dict[str, Any] = {"base_url": config.base_url, "headers": auth_headers(config.api_key)}
    if config.base_url.startswith("https:"):
        args["verify"] = _tls_context()
    else:
        # Plain HTTP (the default, on the server's own host) needs no TLS context at all; building
        # httpx's default one would dominate the cost of Sandbox.create.
        args["verify"] = False
    return args


class SyncHttp:
    def __init__(
        self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.config = config
        self._client = httpx.Client(**_client_args(config), transport=transport)

    def close(self) -> None:
        self._client.close()

    def _request(self, call: Call, content: Any) -> httpx.Request:
        return self._client.build_request(
            call.method,
            call.path,
            params=list(call.params) or None,
            json=call.body,
            content=content,
            headers=_content_headers(call),
            timeout=call.timeout(),
        )

    def send(self, call: Call, content: bytes | Iterator[bytes] | None = None) -> httpx.Response:
        """Do the call, read the whole answer, raise the typed error for a non-2xx status."""
        req = self._request(call, content)
        try:
            resp = self._client.send(req)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.config.base_url) from exc
        if not resp.is_success:
            raise error_from_response(resp.status_code, resp.content, str(req.url))
        return resp

    def json(self, call: Call, content: bytes | Iterator[bytes] | None = None) -> Any:
        return _decode_json(self.send(call, content))

    @contextmanager
    def stream(
        self, call: Call, content: bytes | Iterator[bytes] | None = None
    ) -> Iterator[httpx.Response]:
        req = self._request(call, content)
        try:
            resp = self._client.send(req, stream=True)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.config.base_url) from exc
        try:
            if not resp.is_success:
                try:
                    body = resp.read()
                except httpx.HTTPError:
                    body = b""
                raise error_from_response(resp.status_code, body, str(req.url))
            yield resp
        finally:
            resp.close()

    def iter_bytes(self, resp: httpx.Response, chunk_size: int | None = None) -> Iterator[bytes]:
        try:
            yield from resp.iter_bytes(chunk_size)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.config.base_url) from exc

    def ndjson(
        self, call: Call, content: bytes | Iterator[bytes] | None = None
    ) -> Generator[dict[str, Any], None, None]:
        """The objects of an NDJSON answer, one a line, as they arrive (template builds)."""
        with self.stream(call, content) as resp:
            dec = NdjsonDecoder()
            for chunk in self.iter_bytes(resp):
                yield from dec.feed(chunk)
            yield from dec.finish()

    def events(self, call: Call) -> Generator[ExecEvent, None, None]:
        """The typed events of an NDJSON exec/output stream; closing it closes the connection."""
        with self.stream(call) as resp:
            dec = NdjsonDecoder()
            for chunk in self.iter_bytes(resp):
                for obj in dec.feed(chunk):
                    if (event := parse_exec_event(obj)) is not None:
                        yield event
            for obj in dec.finish():
                if (event := parse_exec_event(obj)) is not None:
                    yield event


class AsyncHttp:
    def __init__(
        self, config: ClientConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self._client = httpx.AsyncClient(**_client_args(config), transport=transport)

    async def close(self) -> None:
        await self._client.aclose()

    def _request(self, call: Call, content: Any) -> httpx.Request:
        return self._client.build_request(
            call.method,
            call.path,
            params=list(call.params) or None,
            json=call.body,
            content=content,
            headers=_content_headers(call),
            timeout=call.timeout(),
        )

    async def send(
        self, call: Call, content: bytes | AsyncIterator[bytes] | None = None
    ) -> httpx.Response:
        req = self._request(call, content)
        try:
            resp = await self._client.send(req)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.config.base_url) from exc
        if not resp.is_success:
            raise error_from_response(resp.status_code, resp.content, str(req.url))
        return resp

    async def json(self, call: Call, content: bytes | AsyncIterator[bytes] | None = None) -> Any:
        return _decode_json(await self.send(call, content))

    @asynccontextmanager
    async def stream(
        self, call: Call, content: bytes | AsyncIterator[bytes] | None = None
    ) -> AsyncIterator[httpx.Response]:
        req = self._request(call, content)
        try:
            resp = await self._client.send(req, stream=True)
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.config.base_url) from exc
        try:
            if not resp.is_success:
                try:
                    body = await resp.aread()
                except httpx.HTTPError:
                    body = b""
                raise error_from_response(resp.status_code, body, str(req.url))
            yield resp
        finally:
            await resp.aclose()

    async def iter_bytes(
        self, resp: httpx.Response, chunk_size: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        try:
            async for chunk in resp.aiter_bytes(chunk_size):
                yield chunk
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.config.base_url) from exc

    async def ndjson(
        self, call: Call, content: bytes | AsyncIterator[bytes] | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        async with self.stream(call, content) as resp:
            dec = NdjsonDecoder()
            async for chunk in self.iter_bytes(resp):
                for obj in dec.feed(chunk):
                    yield obj
            for obj in dec.finish():
                yield obj

    async def events(self, call: Call) -> AsyncGenerator[ExecEvent, None]:
        async with self.stream(call) as resp:
            dec = NdjsonDecoder()
            async for chunk in self.iter_bytes(resp):
                for obj in dec.feed(chunk):
                    if (event := parse_exec_event(obj)) is not None:
                        yield event
            for obj in dec.finish():
                if (event := parse_exec_event(obj)) is not None:
                    yield event
