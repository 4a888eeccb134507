"""The metadata endpoint every sandbox reaches at ``http://169.254.169.254``, served on the host.

The firewall redirects a sandbox's TCP to 169.254.169.254:80 here (and nowhere else: the
address is otherwise never reachable). The caller is known by the packet's source address,
which the firewall pins to its sandbox's veth, never by anything it says, as the resolver and
the proxy know theirs (:class:`corral.net.view.NetRegistry`).

It speaks IMDSv2's rules: a session token first (``PUT /latest/api/token`` with
``X-aws-ec2-metadata-token-ttl-seconds``), then reads carrying it
(``X-aws-ec2-metadata-token``); a token works only for the sandbox it was issued to; any request
with ``X-Forwarded-For`` is refused (something is relaying it: a proxy, an SSRF). It serves::

    GET /latest/meta-data/               the names below, one per line
    GET /latest/meta-data/sandbox-id     the sandbox's id
    GET /latest/meta-data/labels         its metadata labels (JSON)
    GET /latest/identity/token?audience=AUD    a signed identity token (JWT) for AUD

and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from corral.errors import CorralError, RuntimeFailure
from corral.net.view import NetRegistry

__all__ = ["TOKEN_HEADER", "TTL_HEADER", "Labels", "MetadataServer", "Mint"]

log = logging.getLogger("corral.net.metadata")

TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
_MAX_TTL = 21600  # AWS's bound: six hours
_MAX_HEAD = 8192
_MAX_SESSIONS = 64  # per sandbox; the oldest go first
_READ_TIMEOUT = 10.0
_NAMES = ("sandbox-id", "labels")

Mint = Callable[[str, str], Awaitable[str]]
Labels = Callable[[str], Mapping[str, str]]


@dataclass(frozen=True)
class _Session:
    sandbox_id: str
    expires: float


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    content_type: str = "text/plain"


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 502: "Bad Gateway"}  # fmt: skip


def _text(status: int, text: str) -> _Answer:
    return _Answer(status, (text + "\n").encode())


class MetadataServer:
    def __init__(
        self,
        registry: NetRegistry,
        mint: Mint,
        labels: Labels,
        *,
        host: str,
        port: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._mint = mint
        self._labels = labels
        self._host = host
        self._port = port
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=_MAX_HEAD)
        except OSError as exc:
            sock.close()
            raise RuntimeFailure(
                f"metadata endpoint cannot listen on {self._host}:{self._port}: {exc}"
            ) from exc

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def forget(self, sandbox_id: str) -> None:
        """Drop the sessions of a sandbox that is gone (its address may be given out again)."""
        for token in [t for t, s in self._sessions.items() if s.sandbox_id == sandbox_id]:
            del self._sessions[token]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = writer.get_extra_info("peername")
            net = self._registry.lookup(peer[0]) if peer else None
            while True:
                try:
                    async with asyncio.timeout(_READ_TIMEOUT):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                    return
                answer, keep = await self._answer(net.sandbox_id if net else None, head)
                reason = _REASONS.get(answer.status, "Error")
                writer.write(
                    f"HTTP/1.1 {answer.status} {reason}\r\nContent-Type: {answer.content_type}\r\n"
                    f"Content-Length: {len(answer.body)}\r\n"
                    f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n".encode()
                    + answer.body
                )
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, sandbox_id: str | None, head: bytes) -> tuple[_Answer, bool]:
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ")
        except ValueError:
            return _text(400, "malformed request"), False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                return _text(400, "malformed header"), False
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers or "transfer-encoding" in headers:
            # Nothing here takes a body; refusing one keeps the framing trivially right.
            return _text(400, "requests to the metadata endpoint carry no body"), False
        keep = headers.get("connection", "").lower() != "close"
        if sandbox_id is None:
            # Only sandboxes reach this port; anything else is not one of them.
            return _text(403, "not a sandbox"), False
        if "x-forwarded-for" in headers:
            return _text(403, "relayed requests (X-Forwarded-For) are refused"), False
        url = urllib.parse.urlsplit(target)
        if method == "PUT" and url.path == "/latest/api/token":
            return self._new_session(sandbox_id, headers.get(TTL_HEADER)), keep
        if method != "GET":
            return _text(405, "only GET, and PUT /latest/api/token"), keep
        session = self._sessions.get(headers.get(TOKEN_HEADER, ""))
        if session is None or session.expires < self._clock():
            return _text(401, "a session token is needed: PUT /latest/api/token first"), keep
        if session.sandbox_id != sandbox_id:
            # Issued to another sandbox: as good as no token.
            return _text(401, "this session token is not this sandbox's"), keep
        return await self._read(sandbox_id, url), keep

    def _new_session(self, sandbox_id: str, ttl_raw: str | None) -> _Answer:
        try:
            ttl = int(ttl_raw or "")
        except ValueError:
            return _text(400, f"{TTL_HEADER} must be a number of seconds (1..{_MAX_TTL})")
        if not 1 <= ttl <= _MAX_TTL:
            return _text(400, f"{TTL_HEADER} must be between 1 and {_MAX_TTL}")
        now = self._clock()
        for token in [t for t, s in self._sessions.items() if s.expires < now]:
            del self._sessions[token]
        mine = [t for t, s in self._sessions.items() if s.sandbox_id == sandbox_id]
        for token in mine[: max(0, len(mine) - _MAX_SESSIONS + 1)]:
            del self._sessions[token]
        token = secrets.token_urlsafe(32)
        self._sessions[token] = _Session(sandbox_id, now + ttl)
        return _Answer(200, token.encode())

    async def _read(self, sandbox_id: str, url: urllib.parse.SplitResult) -> _Answer:
        path = url.path.rstrip("/")
        if path in ("/latest/meta-data", "/latest"):
            return _Answer(200, "\n".join(_NAMES).encode())
        if path == "/latest/meta-data/sandbox-id":
            return _Answer(200, sandbox_id.encode())
        if path == "/latest/meta-data/labels":
            body = json.dumps(dict(self._labels(sandbox_id)), sort_keys=True).encode()
            return _Answer(200, body, "application/json")
        if path == "/latest/identity/token":
            audience = urllib.parse.parse_qs(url.query).get("audience", [""])[0]
            if not audience:
                return _text(400, "audience is required: /latest/identity/token?audience=...")
            try:
                token = await self._mint(sandbox_id, audience)
            except CorralError as e:
                # Never an empty or placeholder answer with a success status.
                return _text(e.status if 400 <= e.status < 500 else 502, e.message)
            return _Answer(200, token.encode(), "application/jwt")
        return _text(404, f"no {url.path!r}; see /latest/meta-data/")
