"""The egress proxy enforces a sandbox's policy on real loopback connections (transparent and
explicit modes), splices bytes intact and counted, and leaks no file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import pytest
import trustme

from corral.net.policy import CompiledPolicy
from corral.net.proxy import EgressProxy, host_local_addresses, so_original_dst
from corral.net.view import EgressEvent, IPAddress, NetRegistry, SandboxNet
from tests.unit.test_net_sniff import ext, hello, real_hello, sni_ext

SANDBOX_IP = "127.0.0.2"
ALLOWED_IP = "127.0.0.11"
BLOCKED_IP = "127.0.0.12"
BANNER_IP = "127.0.0.13"
CIDR_IP = "127.0.0.20"
REFUSED_IP = "127.0.0.66"
BANNER = b"SSH-2.0-fake\r\n"
SNIFF_TIMEOUT = 0.3
FAST = 1.0  # a denial must arrive well within this (seconds)

NAMES = {
    "allowed.test": ALLOWED_IP,
    "blocked.test": BLOCKED_IP,
    "banner.test": BANNER_IP,
    "rebind.test": REFUSED_IP,
}


class Decision(NamedTuple):
    allowed: bool
    reason: str


class FakePolicy:
    """Duck-typed CompiledPolicy: a few names, one CIDR address, loopback upstreams accepted."""

    def __init__(self) -> None:
        self.names = {"allowed.test", "banner.test", "rebind.test"}
        self.cidr = {CIDR_IP}
        self.ports: frozenset[int] | None = None

    def check_name(self, name: str, port: int | None = None) -> Decision:
        if name in self.names and (self.ports is None or port is None or port in self.ports):
            return Decision(True, f"allow rule ({name})")
        return Decision(False, "default deny")

    def check_ip(self, ip: IPAddress, port: int | None, protocol: str) -> Decision:
        if str(ip) in self.cidr and protocol == "tcp":
            return Decision(True, f"allow rule ({ip}/32)")
        return Decision(False, "default deny")

    def check_resolved(self, name: str, ip: IPAddress, port: int | None = None) -> Decision:
        if str(ip) == REFUSED_IP:
            return Decision(False, f"{ip} is private")
        return Decision(True, "resolved address allowed")

    def domain_ports(self) -> frozenset[int] | None:
        return self.ports


# --------------------------------------------------------------------------- fake upstreams


@dataclass
class Upstream:
    name: str
    connections: int = 0
    requests: list[tuple[str, str | None]] = field(default_factory=list)


async def serve_http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Upstream
) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    host = next(
        (v.strip() for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "host"),
        None,
    )
    up.requests.append((lines[0], host))
    body = f"hello from {up.name}".encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    await writer.drain()


def http_handler(up: Upstream, tls: ssl.SSLContext | None = None) -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        try:
            if tls is not None:
                await writer.start_tls(tls)
            await serve_http(reader, writer, up)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return handle


def echo_handler(up: Upstream, banner: bytes = b"") -> Callable[..., Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        try:
            if banner:
                writer.write(banner)
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    return handle


async def start_pair(
    first: tuple[str, Callable[..., Awaitable[None]]],
    second: tuple[str, Callable[..., Awaitable[None]]],
) -> tuple[int, list[asyncio.Server]]:
    """Two servers on the same port of two loopback addresses."""
    for _ in range(20):
        a = await asyncio.start_server(first[1], first[0], 0)
        port = a.sockets[0].getsockname()[1]
        try:
            b = await asyncio.start_server(second[1], second[0], port)
        except OSError:
            a.close()
            await a.wait_closed()
            continue
        return port, [a, b]
    raise RuntimeError("no common free port")


@dataclass
class World:
    proxy: EgressProxy
    registry: NetRegistry
    net: SandboxNet
    policy: FakePolicy
    events: list[EgressEvent]
    dst: dict[int, tuple[str, int]]
    local: set[IPAddress]
    ca: trustme.CA
    http_port: int
    tls_port: int
    banner_port: int
    echo_port: int
    allowed_http: Upstream
    blocked_http: Upstream
    allowed_tls: Upstream
    blocked_tls: Upstream
    banner: Upstream
    echo: Upstream
    make_proxy: Callable[..., Awaitable[EgressProxy]]

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    async def connect(
        self,
        dst: tuple[str, int] | None,
        *,
        source: str = SANDBOX_IP,
        proxy: EgressProxy | None = None,
    ) -> socket.socket:
        """A client socket from ``source`` to the proxy, whose original destination is ``dst``
        (None: explicit proxy mode)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        if dst is not None:
            self.dst[sock.getsockname()[1]] = dst
        await loop.sock_connect(sock, ("127.0.0.1", (proxy or self.proxy).port))
        return sock

    async def open(
        self, dst: tuple[str, int] | None, **kw: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = await self.connect(dst)
        return await asyncio.open_connection(sock=sock, **kw)

    async def event(self, count: int = 1) -> EgressEvent:
        """The ``count``-th event from now on, waiting for it."""
        deadline = time.monotonic() + 5
        while len(self.events) < count:
            assert time.monotonic() < deadline, "no egress event"
            await asyncio.sleep(0.01)
        return self.events[count - 1]

    async def idle(self) -> None:
        deadline = time.monotonic() + 5
        while self.proxy.connections("sb1"):
            assert time.monotonic() < deadline, "connections did not end"
            await asyncio.sleep(0.01)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    ca = trustme.CA()

    def server_tls(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(ctx)
        return ctx

    ups = {
        n: Upstream(n)
        for n in ("allowed", "blocked", "allowed-tls", "blocked-tls", "banner", "echo")
    }
    servers: list[asyncio.Server] = []
    http_port, s = await start_pair(
        (ALLOWED_IP, http_handler(ups["allowed"])), (BLOCKED_IP, http_handler(ups["blocked"]))
    )
    servers += s
    tls_port, s = await start_pair(
        (ALLOWED_IP, http_handler(ups["allowed-tls"], server_tls("allowed.test"))),
        (BLOCKED_IP, http_handler(ups["blocked-tls"], server_tls("blocked.test"))),
    )
    servers += s
    banner_server = await asyncio.start_server(echo_handler(ups["banner"], BANNER), BANNER_IP, 0)
    echo_server = await asyncio.start_server(echo_handler(ups["echo"]), CIDR_IP, 0)
    servers += [banner_server, echo_server]

    policy = FakePolicy()
    registry = NetRegistry()
    net = SandboxNet("sb1", "t1", ipaddress.ip_address(SANDBOX_IP), cast(CompiledPolicy, policy))
    registry.add(net)
    events: list[EgressEvent] = []
    dst: dict[int, tuple[str, int]] = {}
    local: set[IPAddress] = set()

    async def resolve(name: str) -> list[tuple[IPAddress, float]]:
        if name not in NAMES:
            raise LookupError(f"NXDOMAIN {name}")
        return [(ipaddress.ip_address(NAMES[name]), 60.0)]

    def original_dst(sock: socket.socket) -> tuple[str, int] | None:
        return dst.get(sock.getpeername()[1])

    def local_addresses() -> Collection[IPAddress]:
        return local

    proxies: list[EgressProxy] = []

    async def make_proxy(**kw: Any) -> EgressProxy:
        kw.setdefault("original_dst", original_dst)
        kw.setdefault("local_addresses", local_addresses)
        proxy = EgressProxy(
            registry,
            resolve,
            events.append,
            host="127.0.0.1",
            port=0,
            connect_timeout=2.0,
            sniff_timeout=SNIFF_TIMEOUT,
            **kw,
        )
        await proxy.start()
        proxies.append(proxy)
        return proxy

    proxy = await make_proxy()
    try:
        yield World(
            proxy=proxy,
            registry=registry,
            net=net,
            policy=policy,
            events=events,
            dst=dst,
            local=local,
            ca=ca,
            http_port=http_port,
            tls_port=tls_port,
            banner_port=banner_server.sockets[0].getsockname()[1],
            echo_port=echo_server.sockets[0].getsockname()[1],
            allowed_http=ups["allowed"],
            blocked_http=ups["blocked"],
            allowed_tls=ups["allowed-tls"],
            blocked_tls=ups["blocked-tls"],
            banner=ups["banner"],
            echo=ups["echo"],
            make_proxy=make_proxy,
        )
    finally:
        for p in proxies:
            await p.stop()
            assert p.connections("sb1") == 0
        for server in servers:
            server.close()
            await server.wait_closed()


async def http_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, target: str = "/"
) -> bytes:
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def assert_reset(reader: asyncio.StreamReader, started: float) -> None:
    """The proxy closed the connection at once, by reset (never a hang)."""
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        data = await asyncio.wait_for(reader.read(), 5)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        pytest.fail(f"got data {data[:60]!r}")
    assert time.monotonic() - started < FAST


# --------------------------------------------------------------------------- transparent mode


async def test_transparent_http_by_host(world: World) -> None:
    reader, writer = await world.open((ALLOWED_IP, world.http_port))
    data = await http_get(reader, writer, "allowed.test")
    assert data.endswith(b"hello from allowed")
    assert world.allowed_http.requests == [("GET / HTTP/1.1", "allowed.test")]
    ev = await world.event()
    assert (ev.decision, ev.name, ev.ip, ev.port) == (
        "allow",
        "allowed.test",
        ALLOWED_IP,
        world.http_port,
    )
    assert ev.kind == "tcp" and ev.sandbox_id == "sb1"
    assert ev.bytes_out == len(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert ev.bytes_in == len(data)


async def test_transparent_https_by_sni(world: World) -> None:
    reader, writer = await world.open(
        (ALLOWED_IP, world.tls_port), ssl=world.client_tls(), server_hostname="allowed.test"
    )
    data = await http_get(reader, writer, "allowed.test")
    assert data.endswith(b"hello from allowed-tls")
    ev = await world.event()
    assert (ev.decision, ev.name, ev.reason) == (
        "allow",
        "allowed.test",
        "allow rule (allowed.test)",
    )
    assert ev.bytes_out > 0 and ev.bytes_in > 0


async def test_transparent_blocked_host_is_reset_fast(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((BLOCKED_IP, world.http_port))
    writer.write(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
    await assert_reset(reader, started)
    writer.close()
    ev = await world.event()
    assert (ev.decision, ev.name, ev.reason) == ("deny", "blocked.test", "default deny")
    assert world.blocked_http.connections == 0


async def test_transparent_blocked_sni_is_reset_fast(world: World) -> None:
    started = time.monotonic()
    sock = await world.connect((BLOCKED_IP, world.tls_port))
    with pytest.raises((ConnectionError, ssl.SSLError)):
        reader, _ = await asyncio.open_connection(
            sock=sock, ssl=world.client_tls(), server_hostname="blocked.test"
        )
        await reader.read()
    assert time.monotonic() - started < FAST
    ev = await world.event()
    assert (ev.decision, ev.name, ev.reason) == ("deny", "blocked.test", "default deny")
    assert world.blocked_tls.connections == 0


async def test_tls_without_sni_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.tls_port))
    writer.write(real_hello(None))
    await assert_reset(reader, started)
    writer.close()
    assert (await world.event()).reason == "TLS without SNI"
    assert world.allowed_tls.connections == 0


async def test_ech_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.tls_port))
    writer.write(hello(sni_ext(b"allowed.test") + ext(0xFE0D, b"\x00\x01")))
    await assert_reset(reader, started)
    writer.close()
    assert (await world.event()).reason == "encrypted client hello"


async def test_ip_literal_sni_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.tls_port))
    writer.write(hello(sni_ext(ALLOWED_IP.encode())))
    await assert_reset(reader, started)
    writer.close()
    assert (await world.event()).reason == "SNI is an IP address"


async def test_absolute_uri_to_another_host_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.http_port))
    writer.write(b"GET http://blocked.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    await assert_reset(reader, started)
    writer.close()
    assert (await world.event()).reason == "absolute URI names another host"
    assert world.allowed_http.connections == 0


async def test_malformed_http_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.http_port))
    writer.write(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nHost: blocked.test\r\n\r\n")
    await assert_reset(reader, started)
    writer.close()
    assert "more than one Host" in (await world.event()).reason


async def test_blocked_ip_with_allowed_sni_reaches_allowed_host(world: World) -> None:
    reader, writer = await world.open(
        (BLOCKED_IP, world.tls_port), ssl=world.client_tls(), server_hostname="allowed.test"
    )
    data = await http_get(reader, writer, "allowed.test")
    assert data.endswith(b"hello from allowed-tls")
    assert world.blocked_tls.connections == 0
    ev = await world.event()
    assert (ev.decision, ev.ip) == ("allow", ALLOWED_IP)


async def test_name_resolving_to_refused_address_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.http_port))
    writer.write(b"GET / HTTP/1.1\r\nHost: rebind.test\r\n\r\n")
    await assert_reset(reader, started)
    writer.close()
    ev = await world.event()
    assert ev.decision == "deny" and "private" in ev.reason and world.allowed_http.connections == 0


async def test_host_local_destination_denied(world: World) -> None:
    world.local.add(ipaddress.ip_address(ALLOWED_IP))
    started = time.monotonic()
    reader, writer = await world.open((ALLOWED_IP, world.http_port))
    writer.write(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    await assert_reset(reader, started)
    writer.close()
    assert "never reachable" in (await world.event()).reason
    assert world.allowed_http.connections == 0


async def test_cidr_allowed_goes_direct(world: World) -> None:
    reader, writer = await world.open((CIDR_IP, world.echo_port))
    writer.write(b"\x00\x01binary")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"\x00\x01binary"
    writer.close()
    ev = await world.event()
    assert (ev.decision, ev.ip, ev.reason) == ("allow", CIDR_IP, f"allow rule ({CIDR_IP}/32)")
    assert (ev.bytes_out, ev.bytes_in) == (8, 8)


async def test_port_without_domain_rules_denied(world: World) -> None:
    world.policy.ports = frozenset({world.http_port})
    started = time.monotonic()
    reader, writer = await world.open((BANNER_IP, world.banner_port))
    await assert_reset(reader, started)
    writer.close()
    assert (await world.event()).reason == "default deny"
    assert world.banner.connections == 0


async def test_pinned_address_for_server_speaks_first(world: World) -> None:
    world.net.pins.add("banner.test", ipaddress.ip_address(BANNER_IP), 60)
    reader, writer = await world.open((BANNER_IP, world.banner_port))
    assert await asyncio.wait_for(reader.readexactly(len(BANNER)), 5) == BANNER
    writer.write(b"ping\n")  # a line protocol; a bare token could still become HTTP
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"ping\n"
    writer.close()
    ev = await world.event()
    assert (ev.decision, ev.name, ev.ip) == ("allow", "banner.test", BANNER_IP)


async def test_unfinished_hello_to_pinned_address_denied(world: World) -> None:
    """Half a ClientHello, then silence: completing it after a pinned-address decision would
    smuggle an unchecked SNI, so it is refused."""
    world.net.pins.add("banner.test", ipaddress.ip_address(BANNER_IP), 60)
    started = time.monotonic()
    reader, writer = await world.open((BANNER_IP, world.banner_port))
    writer.write(real_hello("blocked.test")[:40])
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    assert time.monotonic() - started < SNIFF_TIMEOUT + FAST
    writer.close()
    assert "incomplete TLS ClientHello" in (await world.event()).reason
    assert world.banner.connections == 0


async def test_unpinned_server_speaks_first_denied(world: World) -> None:
    started = time.monotonic()
    reader, writer = await world.open((BANNER_IP, world.banner_port))
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    assert time.monotonic() - started < SNIFF_TIMEOUT + FAST
    writer.close()
    assert "not resolved for an allowed name" in (await world.event()).reason
    assert world.banner.connections == 0


async def test_unknown_source_closed_without_event(world: World) -> None:
    sock = await world.connect((ALLOWED_IP, world.http_port), source="127.0.0.5")
    reader, writer = await asyncio.open_connection(sock=sock)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await asyncio.sleep(0.05)
    assert world.events == [] and world.allowed_http.connections == 0


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        ({"max_connections": 2}, "too many concurrent connections"),
        # All sandboxes together (descriptors are finite).
        (
            {"max_connections": 10, "max_total_connections": 2},
            "the egress proxy is at its connection limit for all sandboxes",
        ),
    ],
)
async def test_connection_limits(world: World, limits: dict[str, int], reason: str) -> None:
    proxy = await world.make_proxy(**limits)
    held = []
    for _ in range(2):
        sock = await world.connect((CIDR_IP, world.echo_port), proxy=proxy)
        held.append(await asyncio.open_connection(sock=sock))
    while proxy.connections("sb1") < 2:
        await asyncio.sleep(0.01)
    sock = await world.connect((CIDR_IP, world.echo_port), proxy=proxy)
    reader, writer = await asyncio.open_connection(sock=sock)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert (await world.event()).reason == reason
    for _, w in held:
        w.close()


async def test_close_sandbox_aborts_live_connections(world: World) -> None:
    reader, writer = await world.open((CIDR_IP, world.echo_port))
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    assert world.proxy.connections("sb1") == 1
    world.proxy.close_sandbox("sb1")
    assert world.proxy.connections("sb1") == 0
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2)
    writer.close()
    ev = await world.event()
    assert ev.decision == "allow" and ev.reason.endswith("(aborted)") and ev.bytes_out == 5


# --------------------------------------------------------------------------- explicit mode


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(head.split(b" ")[1]), head


async def test_explicit_connect_allowed(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(
        f"CONNECT allowed.test:{world.tls_port} HTTP/1.1\r\nHost: allowed.test:{world.tls_port}\r\n\r\n".encode()
    )
    status, _ = await read_response(reader)
    assert status == 200
    await writer.start_tls(world.client_tls(), server_hostname="allowed.test")
    data = await http_get(reader, writer, "allowed.test")
    assert data.endswith(b"hello from allowed-tls")
    ev = await world.event()
    assert (ev.decision, ev.name, ev.ip, ev.port) == (
        "allow",
        "allowed.test",
        ALLOWED_IP,
        world.tls_port,
    )


async def test_explicit_connect_blocked_is_403(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(f"CONNECT blocked.test:{world.tls_port} HTTP/1.1\r\n\r\n".encode())
    status, head = await read_response(reader)
    assert status == 403 and b"Connection: close" in head
    assert (await asyncio.wait_for(reader.read(), 5)).strip() == b"default deny"
    writer.close()
    assert world.blocked_tls.connections == 0
    assert (await world.event()).decision == "deny"


async def test_explicit_connect_then_other_sni_closed(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(f"CONNECT allowed.test:{world.tls_port} HTTP/1.1\r\n\r\n".encode())
    status, _ = await read_response(reader)
    assert status == 200
    with pytest.raises((ConnectionError, ssl.SSLError)):
        await writer.start_tls(world.client_tls(), server_hostname="blocked.test")
        await reader.read()
    writer.close()
    ev = await world.event()
    assert (ev.decision, ev.reason) == (
        "deny",
        "SNI blocked.test differs from the CONNECT host (allowed.test)",
    )
    assert world.blocked_tls.connections == 0 and world.allowed_tls.requests == []


async def test_explicit_connect_host_header_mismatch(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(
        f"CONNECT allowed.test:{world.tls_port} HTTP/1.1\r\nHost: blocked.test\r\n\r\n".encode()
    )
    status, _ = await read_response(reader)
    assert status == 400
    writer.close()


async def test_explicit_absolute_get_rewritten(world: World) -> None:
    reader, writer = await world.open(None)
    authority = f"allowed.test:{world.http_port}"
    writer.write(
        f"GET http://{authority}/path?q=1 HTTP/1.1\r\nHost: {authority}\r\n"
        f"Proxy-Connection: keep-alive\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello from allowed")
    assert world.allowed_http.requests == [("GET /path?q=1 HTTP/1.1", authority)]
    ev = await world.event()
    assert (ev.decision, ev.name, ev.port) == ("allow", "allowed.test", world.http_port)


async def test_explicit_absolute_host_mismatch_denied(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(
        f"GET http://allowed.test:{world.http_port}/ HTTP/1.1\r\nHost: blocked.test\r\n\r\n".encode()
    )
    status, _ = await read_response(reader)
    assert status == 400
    writer.close()
    ev = await world.event()
    assert ev.decision == "deny" and "Host header differs" in ev.reason
    assert world.allowed_http.connections == 0 and world.blocked_http.connections == 0


async def test_explicit_blocked_absolute_get_is_403(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(f"GET http://blocked.test:{world.http_port}/ HTTP/1.1\r\n\r\n".encode())
    status, _ = await read_response(reader)
    assert status == 403
    writer.close()


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",
        b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    ],
)
async def test_explicit_bad_requests_are_400(world: World, request_head: bytes) -> None:
    reader, writer = await world.open(None)
    writer.write(request_head)
    status, _ = await read_response(reader)
    assert status == 400
    writer.close()


async def test_explicit_connect_ip_literal_uses_cidr_rules(world: World) -> None:
    reader, writer = await world.open(None)
    writer.write(f"CONNECT {CIDR_IP}:{world.echo_port} HTTP/1.1\r\n\r\n".encode())
    status, _ = await read_response(reader)
    assert status == 200
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    writer.close()
    reader, writer = await world.open(None)
    writer.write(f"CONNECT {BLOCKED_IP}:{world.http_port} HTTP/1.1\r\n\r\n".encode())
    status, _ = await read_response(reader)
    assert status == 403
    writer.close()


async def test_default_original_dst_means_explicit_for_direct_connections(world: World) -> None:
    proxy = await world.make_proxy(original_dst=None)
    sock = await world.connect(None, proxy=proxy)
    reader, writer = await asyncio.open_connection(sock=sock)
    authority = f"allowed.test:{world.http_port}"
    writer.write(f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.endswith(b"hello from allowed")


def test_so_original_dst_without_nat() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                # Without a NAT entry: nothing, or the address it was really sent to.
                assert so_original_dst(accepted) in (None, ("127.0.0.1", port))
            client.close()


def test_host_local_addresses() -> None:
    found = host_local_addresses()
    links = json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout)
    expected = {ipaddress.ip_address(a["local"]) for link in links for a in link["addr_info"]}
    assert ipaddress.ip_address("127.0.0.1") in found
    assert expected <= found


# --------------------------------------------------------------------------- pump


async def echo_transfer(world: World, size: int) -> None:
    """Send ``size`` bytes through the proxy to the echo server while reading them back."""
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB, not all one byte
    sent = hashlib.sha256()
    got = hashlib.sha256()
    reader, writer = await world.open((CIDR_IP, world.echo_port))

    async def send() -> None:
        for _ in range(size // len(block)):
            writer.write(block)
            sent.update(block)
            await writer.drain()
        writer.write_eof()

    async def receive() -> int:
        total = 0
        while data := await reader.read(1 << 20):
            got.update(data)
            total += len(data)
        return total

    _, received = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
    writer.close()
    assert received == size and got.hexdigest() == sent.hexdigest()
    ev = await world.event()
    assert (ev.bytes_out, ev.bytes_in) == (size, size)


async def test_large_transfer_intact_and_counted(world: World) -> None:
    await echo_transfer(world, 64 * 1024 * 1024)


@pytest.mark.parametrize("failure", ["no-pipes", "splice-einval"])
async def test_copy_fallback(world: World, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """Without pipes, or when splice refuses the sockets, bytes move through a buffer."""
    refused: list[str] = []

    def refuse(*args: Any, **kw: Any) -> Any:
        refused.append(failure)
        raise OSError(errno.EMFILE if failure == "no-pipes" else errno.EINVAL, failure)

    monkeypatch.setattr(os, "pipe2" if failure == "no-pipes" else "splice", refuse)
    await echo_transfer(world, 8 * 1024 * 1024)
    assert refused


async def test_connection_aborted_before_its_handler_ran_is_closed(world: World) -> None:
    """close_sandbox right after accept (the handler task never ran) still closes the socket."""
    ours, theirs = socket.socketpair()
    world.proxy._accepted(asyncio.get_running_loop(), ours, SANDBOX_IP)
    assert world.proxy.connections("sb1") == 1
    world.proxy.close_sandbox("sb1")
    for _ in range(5):
        await asyncio.sleep(0)
    assert ours.fileno() == -1 and world.proxy.connections("sb1") == 0
    theirs.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_fd_leaks(world: World) -> None:
    async def round_trip() -> None:
        reader, writer = await world.open((ALLOWED_IP, world.http_port))
        await http_get(reader, writer, "allowed.test")
        reader, writer = await world.open((BLOCKED_IP, world.http_port))
        writer.write(b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()
        reader, writer = await world.open((CIDR_IP, world.echo_port))
        writer.write(b"abc")
        await reader.readexactly(3)
        world.proxy.close_sandbox("sb1")
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()
        reader, writer = await world.open(None)
        writer.write(f"CONNECT blocked.test:{world.tls_port} HTTP/1.1\r\n\r\n".encode())
        # The sandbox's connections were just aborted above: this one may meet the tail of that
        # (a reset) instead of a 403 (seen once in CI). Either way its descriptors must go.
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    await round_trip()  # warm up lazily created loop/ssl state
    await world.idle()
    await asyncio.sleep(0.1)
    before = open_fds()
    for _ in range(5):
        await round_trip()
    await world.idle()
    deadline = time.monotonic() + 5
    while open_fds() != before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert open_fds() == before


async def test_silence_then_another_name_to_a_pinned_address_is_refused(world: World) -> None:
    """A pinned address let through on silence must not then carry a ClientHello or HTTP
    request naming another host: a shared address (a CDN) would serve it."""
    world.net.pins.add("banner.test", ipaddress.ip_address(BANNER_IP), 60)
    for late in (real_hello("blocked.test"), b"GET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n"):
        reader, writer = await world.open((BANNER_IP, world.banner_port))
        assert await asyncio.wait_for(reader.readexactly(len(BANNER)), 5) == BANNER
        await asyncio.sleep(SNIFF_TIMEOUT + 0.1)  # decided on silence
        writer.write(late)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        ev = await world.event()
        assert ev.decision == "deny" and "blocked.test differs" in ev.reason, ev


async def test_leading_blank_lines_do_not_hide_a_host(world: World) -> None:
    world.net.pins.add("banner.test", ipaddress.ip_address(BANNER_IP), 60)
    reader, writer = await world.open((BANNER_IP, world.banner_port))
    writer.write(b"\r\n\r\nGET / HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(len(BANNER) + 1), 5)
    writer.close()
    ev = await world.event()
    assert ev.decision == "deny", ev
