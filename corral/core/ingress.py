"""Ingress: reach a port of a running sandbox through the server, guarded by its access token.

The relay's target is always the address the sandbox service holds for the sandbox and the port
named in the URL; nothing else in a request (Host, path, query, headers) can point it anywhere
else. The sandbox's access token is the only credential here: the API key is neither required
nor consumed, so an ``Authorization`` header reaches the app in the sandbox untouched, while
corral's own token (header, query parameter or cookie) never does.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hmac
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.http11 import Request
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from corral.core.lifecycle import SandboxState
from corral.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    PortUnreachableError,
    SandboxNotRunningError,
    TimeoutError,
)

if TYPE_CHECKING:
    from corral.core.sandboxes import SandboxService

__all__ = [
    "ACCESS_HEADER",
    "COOKIE_PREFIX",
    "QUERY_PARAM",
    "Credentials",
    "IngressService",
    "RawHeaders",
    "Target",
    "cookie_name",
    "parse_port",
    "response_headers",
    "take_credentials",
    "upstream_headers",
]

ACCESS_HEADER = "x-corral-access-token"
QUERY_PARAM = "corral_token"
COOKIE_PREFIX = "corral_token_"

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the non-standard names clients still send. "expect" goes too: the
# upstream client does not wait for 100 Continue, and uvicorn already answered it.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
    }
)
# What the WebSocket client negotiates itself with the app in the sandbox.
_WS_HANDSHAKE = frozenset(
    {
        b"host",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})

_CONNECT_TIMEOUT_S = 5.0
# Upstream sockets whose sandbox vanished without closing them (no FIN ever comes) are found by
# TCP keepalive instead of a read timeout, which would cut long polls and event streams.
_KEEPALIVE_OPTIONS: list[tuple[int, int, int]] = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]
# Like uvicorn's limit for messages from clients, so neither side can make the server buffer
# more for one message.
_WS_MAX_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """Where a request for a sandbox port goes; only ever built from the sandbox service."""

    sandbox_id: str
    address: str
    port: int
    public: bool


@dataclass(frozen=True)
class Credentials:
    """The access token a request presented, and the request without any of corral's tokens."""

    token: str | None
    from_query: bool
    headers: RawHeaders
    query: bytes


def cookie_name(sandbox_id: str) -> str:
    return COOKIE_PREFIX + sandbox_id


def parse_port(text: str | int) -> int:
    """A TCP port from the URL: 1 to 65535, plain decimal."""
    s = str(text)
    if not (s.isascii() and s.isdigit() and len(s) <= 5 and 1 <= int(s) <= 65535):
        raise InvalidRequestError(f"port must be a number from 1 to 65535, got {s[:20]!r}")
    return int(s)


def _strip_query(query: bytes) -> tuple[bytes, str | None]:
    """The query without ``corral_token`` (other parameters byte for byte), and its value."""
    kept: list[bytes] = []
    token: str | None = None
    for part in query.split(b"&") if query else ():
        name, _, value = part.partition(b"=")
        if unquote_plus(name.decode("latin-1")) == QUERY_PARAM:
            if token is None:
                token = unquote_plus(value.decode("latin-1"))
            continue
        kept.append(part)
    return b"&".join(kept), token


def _strip_cookies(value: bytes, own: bytes) -> tuple[bytes, str | None]:
    """A Cookie header without any corral token cookie, and the value of this sandbox's one."""
    kept: list[bytes] = []
    token: str | None = None
    for pair in value.split(b";"):
        name, _, v = pair.strip().partition(b"=")
        if name.startswith(COOKIE_PREFIX.encode()):
            # Tokens of other sandboxes are never the business of this one's app either.
            if name == own and token is None:
                token = v.strip().strip(b'"').decode("latin-1")
            continue
        if pair.strip():
            kept.append(pair.strip())
    return b"; ".join(kept), token


def take_credentials(
    sandbox_id: str, headers: Sequence[tuple[bytes, bytes]], query: bytes
) -> Credentials:
    """Find the access token (header, then query parameter, then cookie) and remove every form of
    it from what will be forwarded."""
    header_token: str | None = None
    cookie_token: str | None = None
    own_cookie = cookie_name(sandbox_id).encode()
    out: RawHeaders = []
    for name, value in headers:
        key = name.lower()
        if key == ACCESS_HEADER.encode():
            if header_token is None:
                header_token = value.decode("latin-1").strip()
            continue
        if key == b"cookie":
            value, found = _strip_cookies(value, own_cookie)
            cookie_token = cookie_token or found
            if not value:
                continue
        out.append((key, value))
    query, query_token = _strip_query(query)
    token = header_token or query_token or cookie_token
    from_query = header_token is None and query_token is not None
    return Credentials(token=token or None, from_query=from_query, headers=out, query=query)


def _connection_listed(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return listed


def upstream_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    client: str | None,
    scheme: str,
    host: bytes | None,
    websocket: bool = False,
) -> RawHeaders:
    """Request headers for the app: end-to-end ones as sent (Host and Authorization included),
    and the X-Forwarded-* trio describing the client's request.

    X-Forwarded-For is replaced, not extended: ``client`` is already the address the server
    vouches for (uvicorn applies its trusted-proxy rules), and anything else a client claims
    there would reach the app as if corral had checked it.
    """
    drop = _HOP_BY_HOP | _connection_listed(headers) | _FORWARDED
    if websocket:
        drop |= _WS_HANDSHAKE
    out = [(k.lower(), v) for k, v in headers if k.lower() not in drop]
    if client:
        out.append((b"x-forwarded-for", client.encode()))
    out.append((b"x-forwarded-proto", b"https" if scheme in ("https", "wss") else b"http"))
    if host:
        out.append((b"x-forwarded-host", host))
    return out


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> RawHeaders:
    """The app's response headers without hop-by-hop ones (the server frames its own reply)."""
    drop = _HOP_BY_HOP | _connection_listed(headers)
    return [(k.lower(), v) for k, v in headers if k.lower() not in drop]


class _HostKeepingProtocol(ClientProtocol):
    """The WebSocket client handshake, with the client's Host instead of the sandbox address:
    apps check Origin against Host, and virtual hosts route on it."""

    def __init__(
        self,
        uri: WebSocketURI,
        host: str | None,
        subprotocols: Sequence[Subprotocol] | None,
        max_size: int,
    ) -> None:
        super().__init__(
            uri,
            extensions=enable_client_permessage_deflate(None),
            subprotocols=subprotocols,
            max_size=max_size,
        )
        self._host = host

    def connect(self) -> Request:
        request = super().connect()
        if self._host is None:
            return request
        headers = Headers(Host=self._host)
        for name, value in request.headers.raw_items():
            if name.lower() != "host":
                headers[name] = value
        return Request(request.path, headers)


class IngressService:
    """Authorizes requests for sandbox ports and opens the upstream side of the relay.

    Owns one HTTP connection pool for all sandboxes, made on first use and closed by ``close``.
    """

    def __init__(
        self, sandboxes: SandboxService, *, connect_timeout: float = _CONNECT_TIMEOUT_S
    ) -> None:
        self._sandboxes = sandboxes
        self._connect_timeout = connect_timeout
        self._http: httpx.AsyncClient | None = None

    async def authorize(self, sandbox_id: str, port: str | int, token: str | None) -> Target:
        """The target of a request for ``port`` of a sandbox, if ``token`` opens it; a paused
        sandbox is resumed (after the token checked out) unless it was made without
        ``auto_resume``.

        Unknown, stopped and other tenants' sandboxes look alike (the token is the only
        credential, so there is no tenant to tell them apart by).
        """
        number = parse_port(port)
        sb = self._sandboxes.live_sandbox(sandbox_id)
        if (
            sb is None
            or sb.network is None
            or sb.state not in (SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.HIBERNATED)
            # A hibernated sandbox has no address until it wakes.
            or (sb.address is None and sb.state is not SandboxState.HIBERNATED)
        ):
            raise NotFoundError(f"no running sandbox {sandbox_id!r} with a network")
        if not sb.public_ports:
            if token is None:
                raise AuthenticationError(
                    f"ports of sandbox {sb.id} need its access token: header "
                    f"X-Corral-Access-Token, query parameter {QUERY_PARAM} or cookie "
                    f"{cookie_name(sb.id)}"
                )
            expected = (sb.access_token or "").encode()
            if not expected or not hmac.compare_digest(token.encode(), expected):
                raise PermissionDeniedError(f"wrong access token for sandbox {sb.id}")
        running = await self._sandboxes.ingress_target(sb.id)
        if running is None or running.address is None:
            raise SandboxNotRunningError(f"sandbox {sb.id} is paused (auto_resume is off)")
        return Target(running.id, running.address, number, running.public_ports)

    def busy(self, sandbox_id: str) -> contextlib.AbstractContextManager[None]:
        """Held while a request or WebSocket is relayed: the sandbox is in use, not idle."""
        return self._sandboxes.busy(sandbox_id)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = httpx.AsyncHTTPTransport(
                # Streams (SSE, long polls, downloads) hold a connection each: no pool cap.
                limits=httpx.Limits(
                    max_connections=None, max_keepalive_connections=100, keepalive_expiry=30
                ),
                socket_options=_KEEPALIVE_OPTIONS,
                retries=0,
            )
            self._http = httpx.AsyncClient(
                transport=transport,
                timeout=httpx.Timeout(
                    connect=self._connect_timeout, read=None, write=None, pool=None
                ),
                follow_redirects=False,
                trust_env=False,  # HTTP(S)_PROXY of the server's environment never applies
            )
        return self._http

    async def send(
        self,
        target: Target,
        method: str,
        path_and_query: bytes,
        headers: RawHeaders,
        body: AsyncIterator[bytes] | None,
    ) -> httpx.Response:
        """Send the request to the sandbox; the response's body is still to be streamed (and the
        response closed) by the caller."""
        url = httpx.URL(
            scheme="http", host=target.address, port=target.port, raw_path=path_and_query
        )
        # httpx.Request adds nothing but what framing needs: Host and Content-Length, when
        # absent, are filled in; the client's own default headers are never merged in.
        request = httpx.Request(method, url, headers=headers, content=body)
        try:
            return await self._client().send(request, stream=True, follow_redirects=False)
        except httpx.TimeoutException:
            raise TimeoutError(
                f"port {target.port} in sandbox {target.sandbox_id} did not accept a "
                f"connection within {self._connect_timeout:g} s"
            ) from None
        except httpx.ConnectError:
            raise PortUnreachableError(
                f"nothing listens on port {target.port} in sandbox {target.sandbox_id}"
            ) from None
        except httpx.TransportError as e:
            raise PortUnreachableError(
                f"port {target.port} in sandbox {target.sandbox_id} broke off the exchange "
                f"({type(e).__name__}: {e or 'no details'})"
            ) from None

    async def open_websocket(
        self,
        target: Target,
        path_and_query: str,
        *,
        host: str | None,
        headers: RawHeaders,
        subprotocols: Sequence[str],
    ) -> ClientConnection:
        """A WebSocket connection to the sandbox's port (no redirects, no proxies)."""
        path, _, query = path_and_query.partition("?")
        uri = WebSocketURI(
            secure=False, host=target.address, port=target.port, path=path, query=query
        )
        offered = [Subprotocol(s) for s in subprotocols] or None

        def factory() -> ClientConnection:
            return ClientConnection(_HostKeepingProtocol(uri, host, offered, _WS_MAX_MESSAGE))

        extra = Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers])
        where = f"port {target.port} in sandbox {target.sandbox_id}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(factory, target.address, target.port)
                try:
                    await conn.handshake(extra, user_agent_header=None)
                except BaseException:
                    conn.transport.abort()
                    raise
        except builtins.TimeoutError:
            raise TimeoutError(
                f"{where} did not complete a WebSocket handshake within {self._connect_timeout:g} s"
            ) from None
        except InvalidStatus as e:
            raise PortUnreachableError(
                f"{where} refused the WebSocket handshake (HTTP {e.response.status_code})"
            ) from None
        except InvalidHandshake as e:
            raise PortUnreachableError(f"{where} failed the WebSocket handshake: {e}") from None
        except OSError:
            raise PortUnreachableError(f"nothing listens on {where}") from None
        conn.start_keepalive()
        return conn

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
