"""The metadata endpoint's rules on loopback: callers known by address only, IMDSv2 session tokens bound to their sandbox, relayed and token-less reads refused."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from corral.errors import InvalidRequestError
from corral.net.metadata import TOKEN_HEADER, TTL_HEADER, MetadataServer
from corral.net.policy import AddressGuard, NetworkPolicy, compile_policy
from corral.net.view import NetRegistry, SandboxNet

A, B, STRANGER = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[int, Clock]]:
    registry = NetRegistry()
    compiled = compile_policy(NetworkPolicy(), AddressGuard())
    registry.add(SandboxNet("sb-a", "t", ipaddress.ip_address(A), compiled))
    registry.add(SandboxNet("sb-b", "t", ipaddress.ip_address(B), compiled))

    async def mint(sandbox_id: str, audience: str) -> str:
        if audience == "bad":
            raise InvalidRequestError("audience 'bad' is refused")
        return f"jwt-for-{sandbox_id}-{audience}"

    clock = Clock()
    server = MetadataServer(
        registry,
        mint,
        lambda sid: {"task": sid.upper()},
        host="127.0.0.1",
        port=0,
        clock=clock,
    )
    await server.start()
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    try:
        yield port, clock
    finally:
        await server.stop()


async def _request(
    port: int, source: str, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    head = f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write((head + "\r\n").encode())
    raw = await reader.read()
    writer.close()
    status_line, _, rest = raw.decode().partition("\r\n")
    return int(status_line.split(" ")[1]), rest.partition("\r\n\r\n")[2]


async def _session(port: int, source: str, ttl: int = 60) -> str:
    status, token = await _request(port, source, "PUT", "/latest/api/token", {TTL_HEADER: str(ttl)})
    assert status == 200
    return token


async def test_reads_need_a_session_token_of_the_same_sandbox(
    endpoint: tuple[int, Clock],
) -> None:
    port, _ = endpoint
    status, body = await _request(port, A, "GET", "/latest/meta-data/sandbox-id")
    assert status == 401 and "PUT /latest/api/token" in body
    token_a = await _session(port, A)
    assert await _request(
        port, A, "GET", "/latest/meta-data/sandbox-id", {TOKEN_HEADER: token_a}
    ) == (200, "sb-a")
    # Sandbox B holding A's token gets nothing of A's; its own token gets its own identity.
    status, _ = await _request(
        port, B, "GET", "/latest/meta-data/sandbox-id", {TOKEN_HEADER: token_a}
    )
    assert status == 401
    token_b = await _session(port, B)
    assert await _request(
        port, B, "GET", "/latest/meta-data/sandbox-id", {TOKEN_HEADER: token_b}
    ) == (200, "sb-b")
    status, body = await _request(
        port, B, "GET", "/latest/identity/token?audience=api.test", {TOKEN_HEADER: token_b}
    )
    assert (status, body) == (200, "jwt-for-sb-b-api.test")
    status, body = await _request(
        port, A, "GET", "/latest/meta-data/labels", {TOKEN_HEADER: token_a}
    )
    assert (status, body) == (200, '{"task": "SB-A"}')
    status, body = await _request(port, A, "GET", "/latest/meta-data/", {TOKEN_HEADER: token_a})
    assert status == 200 and body.split() == ["sandbox-id", "labels"]


async def test_refusals(endpoint: tuple[int, Clock]) -> None:
    port, clock = endpoint
    token = await _session(port, A, ttl=5)
    ok = {TOKEN_HEADER: token}
    # Relayed (SSRF through a proxy in the sandbox): refused even with a token, and no token.
    relayed = {"X-Forwarded-For": "203.0.113.9"}
    assert (await _request(port, A, "PUT", "/latest/api/token", {TTL_HEADER: "60", **relayed}))[
        0
    ] == 403
    assert (await _request(port, A, "GET", "/latest/meta-data/sandbox-id", {**ok, **relayed}))[
        0
    ] == 403
    # Not a sandbox address at all.
    assert (await _request(port, STRANGER, "PUT", "/latest/api/token", {TTL_HEADER: "60"}))[
        0
    ] == 403
    # Bad TTLs, methods, paths, bodies, audiences.
    for ttl in ("", "0", "21601", "x"):
        assert (await _request(port, A, "PUT", "/latest/api/token", {TTL_HEADER: ttl}))[0] == 400
    assert (await _request(port, A, "POST", "/latest/meta-data/sandbox-id", ok))[0] == 405
    assert (await _request(port, A, "GET", "/latest/user-data", ok))[0] == 404
    assert (await _request(port, A, "GET", "/latest/identity/token", ok))[0] == 400
    status, body = await _request(port, A, "GET", "/latest/identity/token?audience=bad", ok)
    assert status == 400 and "refused" in body
    assert (
        await _request(
            port, A, "GET", "/latest/meta-data/sandbox-id", {**ok, "Content-Length": "3"}
        )
    )[0] == 400
    # Sessions expire.
    clock.now += 6
    assert (await _request(port, A, "GET", "/latest/meta-data/sandbox-id", ok))[0] == 401


async def test_keep_alive_and_garbage(endpoint: tuple[int, Clock]) -> None:
    port, _ = endpoint
    token = await _session(port, A)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(A, 0))
    req = f"GET /latest/meta-data/sandbox-id HTTP/1.1\r\n{TOKEN_HEADER}: {token}\r\n\r\n".encode()
    writer.write(req + req)
    data = b""
    while data.count(b"sb-a") < 2:
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        assert chunk
        data += chunk
    writer.write(b"NONSENSE\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"HTTP/1.1 400")
    writer.close()
