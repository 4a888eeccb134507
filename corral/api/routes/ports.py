"""Ingress routes: HTTP and WebSocket relays to sandbox ports, in path and host form.

Path form: ``/sandboxes/{id}/ports/{port}/{path}`` (every method, and WebSocket upgrades).
Host form: ``{port}-{id}.{ingress_domain}`` with the full path, dispatched by ``HostIngress``
before any API route is looked at. Both answer errors themselves, in the API's error body,
because the host form runs outside the app's exception handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote

import httpx
from fastapi import APIRouter
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from corral.core.ingress import (
    IngressService,
    RawHeaders,
    Target,
    cookie_name,
    response_headers,
    take_credentials,
    upstream_headers,
)
from corral.errors import CorralError, InvalidRequestError

__all__ = ["HostIngress", "router"]

log = logging.getLogger("corral.ingress")

router = APIRouter(tags=["ports"])

_PREFIX = "/sandboxes/{sandbox_id}/ports/{port}"
# Close codes a peer may put on the wire (RFC 6455 section 7.4); others are reserved for
# reporting (1005 "no status", 1006 "abnormal", 1015 "TLS") and must not be sent.
_SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
_BAD_GATEWAY = 1014
_CLOSE_TIMEOUT_S = 10.0


def _ingress(conn: HTTPConnection) -> IngressService:
    ingress: IngressService = conn.app.state.ingress
    return ingress


def _error(exc: CorralError) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status
    )


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    return bytes(raw) if raw else quote(scope["path"]).encode()


def _path_rest(scope: Scope, sandbox_id: str, port: str) -> bytes:
    """What follows ``/sandboxes/{id}/ports/{port}`` in the path as the client sent it.

    The route matched on the decoded path; the raw one must say the same thing segment for
    segment, so that an encoded slash cannot make the two disagree about the target.
    """
    segments = _raw_path(scope).split(b"/", 5)
    decoded = [unquote(s.decode("latin-1")) for s in segments[:5]]
    if decoded != ["", "sandboxes", sandbox_id, "ports", port]:
        raise InvalidRequestError("malformed ingress path: /sandboxes/{id}/ports/{port}/{path}")
    return b"/" + segments[5] if len(segments) == 6 else b"/"


def _set_cookie(conn: HTTPConnection, target: Target, token: str, path: str) -> bytes:
    secure = "; Secure" if conn.url.scheme in ("https", "wss") else ""
    return (
        f"{cookie_name(target.sandbox_id)}={token}; Path={path}; HttpOnly; SameSite=Lax{secure}"
    ).encode()


async def _until_disconnect(receive: Receive, body_read: asyncio.Event) -> None:
    """Returns when the client has gone away (watched once its request body is consumed, so
    that the two never compete for ``receive``)."""
    await body_read.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _finish(*tasks: asyncio.Task[Any]) -> None:
    """Cancel and reap relay tasks; their errors are the peers' business, logged only."""
    for t in tasks:
        t.cancel()
    for t in tasks:
        try:
            await t
        except asyncio.CancelledError:
            pass
        except Exception as e:
            log.info("relay ended with %s: %s", type(e).__name__, e)


class _Relayed(Response):
    """The app's response, streamed through as it arrives, until it ends or the client leaves;
    the upstream response is closed whatever happens."""

    def __init__(
        self,
        upstream: httpx.Response,
        headers: RawHeaders,
        gone: asyncio.Task[None],
        busy: contextlib.AbstractContextManager[None],
    ) -> None:
        self.status_code = upstream.status_code
        self.raw_headers = headers
        self.background = None
        self._upstream = upstream
        self._gone = gone
        self._busy = busy

    async def _stream(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            # A long download or event stream is use of the sandbox, however little CPU it takes.
            with self._busy:
                async for chunk in self._upstream.aiter_raw():
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.TransportError as e:
            # The status line is gone: all that is left is to cut the client's response short.
            log.info("response from %s broke off: %s", self._upstream.url, e)
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Should the app break off, returning without the final body message makes the server
        # cut the client's connection, which is how a proxy says "truncated".
        streaming = asyncio.create_task(self._stream(send))
        try:
            await asyncio.wait({streaming, self._gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _finish(streaming, self._gone)
            await self._upstream.aclose()


async def relay_http(
    request: Request, sandbox_id: str, port: str, path: bytes, *, cookie_path: str
) -> Response:
    """Authorize and relay one HTTP request to ``path`` (raw, from the client) on the port."""
    try:
        creds = take_credentials(
            sandbox_id, request.scope["headers"], request.scope["query_string"]
        )
        target = await _ingress(request).authorize(sandbox_id, port, creds.token)
    except CorralError as e:
        return _error(e)
    headers = upstream_headers(
        creds.headers,
        client=request.client.host if request.client else None,
        scheme=request.url.scheme,
        host=request.headers.get("host", "").encode("latin-1") or None,
    )
    body_read = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk
        body_read.set()

    framed = any(
        k in (b"content-length", b"transfer-encoding") for k, _ in request.scope["headers"]
    )
    if not framed:
        body_read.set()
    gone = asyncio.create_task(_until_disconnect(request.receive, body_read))
    sending = asyncio.create_task(
        _ingress(request).send(
            target,
            request.method,
            path + (b"?" + creds.query if creds.query else b""),
            headers,
            body() if framed else None,
        )
    )
    try:
        await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not sending.done():
            raise ClientDisconnect  # the client left before the app answered
        upstream = sending.result()
    except BaseException as e:
        await _finish(sending, gone)
        if isinstance(e, CorralError):
            return _error(e)
        if isinstance(e, ClientDisconnect):
            return Response(status_code=499)  # nobody will read it
        raise
    out = response_headers(upstream.headers.raw)
    if creds.from_query and not target.public and creds.token:
        out.append((b"set-cookie", _set_cookie(request, target, creds.token, cookie_path)))
    return _Relayed(upstream, out, gone, _ingress(request).busy(target.sandbox_id))


def _close_code(code: int | None, fallback: int) -> int:
    if code is None:
        return fallback
    return code if code in _SENDABLE or 3000 <= code <= 4999 else fallback


async def _refuse(ws: WebSocket, exc: CorralError) -> None:
    """Refuse an upgrade with the same status and body a plain request would get."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(_error(exc))
    else:
        await ws.close(code=1008, reason=exc.message[:120])


async def relay_websocket(ws: WebSocket, sandbox_id: str, port: str, path: bytes) -> None:
    """Authorize an upgrade, connect to the port, and relay messages and the close both ways."""
    ingress = _ingress(ws)
    try:
        creds = take_credentials(sandbox_id, ws.scope["headers"], ws.scope["query_string"])
        target = await ingress.authorize(sandbox_id, port, creds.token)
    except CorralError as e:
        await _refuse(ws, e)
        return
    host = ws.headers.get("host")
    headers = upstream_headers(
        creds.headers,
        client=ws.client.host if ws.client else None,
        scheme=ws.url.scheme,
        host=host.encode("latin-1") if host else None,
        websocket=True,
    )
    resource = (path + (b"?" + creds.query if creds.query else b"")).decode("latin-1")
    try:
        upstream = await ingress.open_websocket(
            target,
            resource,
            host=host,
            headers=headers,
            subprotocols=ws.scope.get("subprotocols") or [],
        )
    except CorralError as e:
        await ws.accept()
        await ws.close(code=_BAD_GATEWAY, reason=e.message[:120])
        return
    try:
        await ws.accept(subprotocol=upstream.subprotocol)
        with ingress.busy(target.sandbox_id):
            await _pump(ws, upstream)
    finally:
        await upstream.close()


async def _pump(ws: WebSocket, upstream: ClientConnection) -> None:
    async def client_to_upstream() -> bool:
        """True when the client closed; False when the upstream went away first."""
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    await upstream.close(
                        code=_close_code(msg.get("code"), 1000), reason=msg.get("reason") or ""
                    )
                    return True
                if msg.get("text") is not None:
                    await upstream.send(msg["text"])
                elif msg.get("bytes") is not None:
                    await upstream.send(msg["bytes"])
        except ConnectionClosed:
            return False

    async def upstream_to_client() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in upstream:
                if isinstance(message, str):
                    await ws.send_text(message)
                else:
                    await ws.send_bytes(message)
        rcvd = upstream.close_code
        await ws.close(
            code=_close_code(rcvd, 1011 if rcvd in (None, 1006) else 1000),
            reason=(upstream.close_reason or "")[:120],
        )

    inbound = asyncio.create_task(client_to_upstream())
    outbound = asyncio.create_task(upstream_to_client())
    try:
        await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
        client_left = inbound.done() and not inbound.exception() and inbound.result()
        if not client_left:
            # The upstream closed (or failed): let its close code reach the client.
            await asyncio.wait({outbound}, timeout=_CLOSE_TIMEOUT_S)
    finally:
        # Whatever is still running has nobody left to talk to; errors from either side at
        # this point (a peer that vanished mid-close) change nothing for the other.
        await _finish(inbound, outbound)


# --- path form ------------------------------------------------------------------------------


class _PathForm:
    """The HTTP side of the path form, as a plain ASGI app: Starlette only lets a route match
    every method (WebDAV's and custom ones included) when its endpoint is not a function."""

    def __init__(self, *, bare: bool) -> None:
        self._bare = bare

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        sid, port = request.path_params["sandbox_id"], request.path_params["port"]
        response: Response
        if self._bare:
            # Relative URLs in the app's pages resolve against the directory: it must end in "/".
            query = scope["query_string"]
            location = _raw_path(scope) + b"/" + (b"?" + query if query else b"")
            response = RedirectResponse(location.decode("latin-1"), status_code=307)
        else:
            try:
                rest = _path_rest(scope, sid, port)
            except CorralError as e:
                response = _error(e)
            else:
                response = await relay_http(
                    request, sid, port, rest, cookie_path=f"/sandboxes/{sid}/ports/"
                )
        await response(scope, receive, send)


async def _ws_path_form(ws: WebSocket) -> None:
    sid, port = ws.path_params["sandbox_id"], ws.path_params["port"]
    try:
        rest = _path_rest(ws.scope, sid, port)
    except CorralError as e:
        await _refuse(ws, e)
        return
    await relay_websocket(ws, sid, port, rest)


# Starlette routes rather than FastAPI ones: every method must match, and the request body
# must stay an unread stream.
router.routes.append(
    Route(_PREFIX + "/{path:path}", _PathForm(bare=False), include_in_schema=False)
)
router.routes.append(Route(_PREFIX, _PathForm(bare=True), include_in_schema=False))
router.add_websocket_route(_PREFIX + "/{path:path}", _ws_path_form)
router.add_websocket_route(_PREFIX, _ws_path_form)


# --- host form ------------------------------------------------------------------------------


class HostIngress:
    """Pure ASGI middleware: requests for ``{port}-{id}.{domain}`` go to the sandbox's port with
    their full path; every other host falls through to the API.

    Not a ``BaseHTTPMiddleware``: that one buffers and cannot carry WebSockets.
    """

    def __init__(self, app: ASGIApp, domain: str) -> None:
        self.app = app
        self._label = re.compile(
            r"(\d{1,5})-([a-z0-9][a-z0-9-]*)\." + re.escape(domain.strip(".").lower())
        )

    def _match(self, scope: Scope) -> tuple[str, str] | None:
        for name, value in scope["headers"]:
            if name == b"host":
                host = value.decode("latin-1").lower()
                if not host.endswith("]"):
                    host = host.rpartition(":")[0] if ":" in host else host
                m = self._label.fullmatch(host.rstrip("."))
                return (m.group(2), m.group(1)) if m else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hit = self._match(scope) if scope["type"] in ("http", "websocket") else None
        if hit is None:
            await self.app(scope, receive, send)
            return
        sandbox_id, port = hit
        path = _raw_path(scope)
        if scope["type"] == "websocket":
            await relay_websocket(WebSocket(scope, receive, send), sandbox_id, port, path)
            return
        request = Request(scope, receive)
        response = await relay_http(request, sandbox_id, port, path, cookie_path="/")
        await response(scope, receive, send)
