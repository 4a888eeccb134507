"""The sandbox resolver answers only allowed names, never lets a refused name reach the upstream,
strips rebinding addresses, forwards nothing the client smuggled, and survives hostile input."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from corral.errors import RuntimeFailure
from corral.net.dns import DnsResolver, Upstream, upstreams_from_resolv_conf
from corral.net.view import EgressEvent, IPAddress, NetRegistry, SandboxNet

if TYPE_CHECKING:
    from corral.net.policy import CompiledPolicy

pytestmark = pytest.mark.integration

SANDBOX_IP = "127.0.0.2"
STRANGER_IP = "127.0.0.3"
ALLOWED = {"allowed.test", "rebind.test", "loop.test", "big.test", "cname.test"}
BIG_COUNT = 120


# ------------------------------------------------------------------------------ fakes


class Decision(NamedTuple):
    allowed: bool
    reason: str


class FakePolicy:
    """The two methods the resolver calls; a deliberately naive string match for wildcards."""

    def check_name(self, name: str, port: int | None = None) -> Decision:
        if name in ALLOWED or name.endswith(".wild.test"):
            return Decision(True, f"allow {name}")
        return Decision(False, "default deny")

    def check_resolved(self, name: str, ip: IPAddress) -> Decision:
        if ip.is_loopback or ip in ipaddress.ip_network("10.0.0.0/8"):
            return Decision(False, f"{ip} is never reachable")
        return Decision(True, "public")


@dataclass
class Seen:
    name: str  # exactly as it arrived (case preserved), no final dot
    rdtype: str
    transport: str
    message: dns.message.Message
    wire: bytes


def _zone(qname: dns.name.Name, rdtype: int) -> tuple[int, list[dns.rrset.RRset], list[str]]:
    """(rcode, answer rrsets, glue A records for the additional section)."""
    name = qname.to_text(omit_final_dot=True).lower()
    a = dns.rdatatype.A

    def rr(owner: str, kind: str, *values: str) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(owner + ".", 300, "IN", kind, list(values))

    if name == "allowed.test":
        return 0, ([rr(name, "A", "198.51.100.10")] if rdtype == a else []), []
    if name == "rebind.test":
        return 0, ([rr(name, "A", "127.0.0.1", "198.51.100.11")] if rdtype == a else []), []
    if name == "loop.test":
        return 0, ([rr(name, "A", "127.0.0.1")] if rdtype == a else []), []
    if name == "big.test" and rdtype == a:
        return 0, [rr(name, "A", *(f"198.51.100.{i}" for i in range(1, BIG_COUNT + 1)))], []
    if name == "cname.test":
        answer = [rr(name, "CNAME", "target.other.test.")]
        if rdtype == a:
            # The target's address, plus a record nobody asked about that must not get through.
            answer += [rr("target.other.test", "A", "198.51.100.12")]
            answer += [rr("stray.test", "A", "198.51.100.99")]
        return 0, answer, ["10.1.2.3"]
    if name.endswith(".wild.test") or name == "big.test":
        return 0, [], []
    return dns.rcode.NXDOMAIN, [], []


class FakeUpstream(asyncio.DatagramProtocol):
    """An authoritative server for *.test on loopback (UDP and TCP on one port) that records
    every query it receives."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(8):
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=("127.0.0.1", 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise RuntimeError("no free port pair")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def names(self) -> list[str]:
        return [s.name.lower() for s in self.seen]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self._answer(data, "udp")
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(2), "big")
                reply = self._answer(await reader.readexactly(length), "tcp")
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        self.seen.append(
            Seen(
                question.name.to_text(omit_final_dot=True),
                dns.rdatatype.to_text(question.rdtype),
                transport,
                query,
                wire,
            )
        )
        rcode, answer, glue = _zone(question.name, question.rdtype)
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        reply.set_rcode(dns.rcode.Rcode.make(rcode))
        reply.answer = answer
        if not answer:
            reply.authority = [
                dns.rrset.from_text("test.", 60, "IN", "SOA", "ns.test. h.test. 1 60 60 60 60")
            ]
        if glue:
            reply.additional = [dns.rrset.from_text_list("ns.test.", 300, "IN", "A", glue)]
        limit = 65535
        if transport == "udp":
            limit = query.payload if query.edns >= 0 else 512
        return reply.to_wire(max_size=limit, prefer_truncation=True)


@dataclass
class Env:
    upstream: FakeUpstream
    resolver: DnsResolver
    sandbox: SandboxNet
    events: list[EgressEvent] = field(default_factory=list)

    async def ask(
        self,
        name: str | dns.name.Name,
        rdtype: str = "A",
        *,
        source: str = SANDBOX_IP,
        tcp: bool = False,
        query: dns.message.Message | None = None,
    ) -> dns.message.Message:
        q = query if query is not None else dns.message.make_query(name, rdtype)
        port = self.resolver.port
        if tcp:
            return await dns.asyncquery.tcp(q, "127.0.0.1", 2.0, port, source=source)
        return await dns.asyncquery.udp(q, "127.0.0.1", 2.0, port, source=source)


Factory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env() -> AsyncIterator[Factory]:
    started: list[tuple[FakeUpstream, DnsResolver]] = []

    async def factory(
        upstream_servers: list[tuple[str, int]] | None = None,
        timeout: float = 2.0,
        **resolver_options: Any,
    ) -> Env:
        fake = FakeUpstream()
        await fake.start()
        registry = NetRegistry()
        sandbox = SandboxNet(
            sandbox_id="sb-dns",
            tenant_id="tenant",
            address=ipaddress.ip_address(SANDBOX_IP),
            policy=cast("CompiledPolicy", FakePolicy()),
        )
        registry.add(sandbox)
        events: list[EgressEvent] = []
        servers = upstream_servers if upstream_servers is not None else [("127.0.0.1", fake.port)]
        resolver = DnsResolver(
            registry,
            Upstream(servers, timeout=timeout),
            events.append,
            host="127.0.0.1",
            port=0,
            **resolver_options,
        )
        await resolver.start()
        started.append((fake, resolver))
        return Env(fake, resolver, sandbox, events)

    yield factory
    for fake, resolver in started:
        await resolver.stop()
        await fake.stop()


@pytest.fixture
async def env(make_env: Factory) -> Env:
    return await make_env()


def _addresses(reply: dns.message.Message) -> list[str]:
    return sorted(
        rdata.address
        for rrset in reply.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    )


def _udp_socket(source: str = SANDBOX_IP) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    return sock


async def _recv(sock: socket.socket, wait: float = 0.5) -> bytes | None:
    # The resolver runs on this same loop: never block it.
    try:
        async with asyncio.timeout(wait):
            return await asyncio.get_running_loop().sock_recv(sock, 65535)
    except TimeoutError:
        return None


# ------------------------------------------------------------------------------ tests


async def test_allowed_name_resolves_is_pinned_and_logged(env: Env) -> None:
    reply = await env.ask("allowed.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _addresses(reply) == ["198.51.100.10"]
    assert reply.flags & dns.flags.RA
    assert env.sandbox.pins.name_for(ipaddress.ip_address("198.51.100.10")) == "allowed.test"
    assert [(s.name, s.rdtype) for s in env.upstream.seen] == [("allowed.test", "A")]
    (event,) = env.events
    assert (event.sandbox_id, event.kind, event.decision) == ("sb-dns", "dns", "allow")
    assert (event.name, event.ip, event.reason) == (
        "allowed.test",
        "198.51.100.10",
        "allow allowed.test",
    )


async def test_denied_name_never_reaches_upstream(env: Env) -> None:
    for rdtype in ("A", "AAAA", "TXT"):
        reply = await env.ask("secretdata.blocked.test", rdtype)
        assert reply.rcode() == dns.rcode.NXDOMAIN
        assert not reply.answer
    reply = await env.ask("secretdata.blocked.test", tcp=True)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert env.upstream.seen == []
    assert {(e.decision, e.name, e.reason) for e in env.events} == {
        ("deny", "secretdata.blocked.test", "default deny")
    }
    assert len(env.events) == 4


async def test_escaped_dot_label_is_not_a_hostname(env: Env) -> None:
    # On the wire this is the label "leak.wild" under "test": not below wild.test, though its
    # text form "leak\.wild.test" ends with ".wild.test".
    sneaky = dns.name.Name([b"secret data", b"leak.wild", b"test", b""])
    reply = await env.ask(sneaky)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    ok = await env.ask("fine.wild.test")
    assert ok.rcode() == dns.rcode.NOERROR
    assert env.upstream.names() == ["fine.wild.test"]
    assert env.events[0].decision == "deny"


async def test_unknown_source_is_refused_without_upstream(env: Env) -> None:
    reply = await env.ask("allowed.test", source=STRANGER_IP)
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.answer
    reply = await env.ask("allowed.test", source=STRANGER_IP, tcp=True)
    assert reply.rcode() == dns.rcode.REFUSED
    assert env.upstream.seen == []
    assert env.events == []


async def test_rebinding_addresses_are_stripped(env: Env) -> None:
    reply = await env.ask("rebind.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _addresses(reply) == ["198.51.100.11"]
    pins = env.sandbox.pins
    assert pins.name_for(ipaddress.ip_address("198.51.100.11")) == "rebind.test"
    assert pins.name_for(ipaddress.ip_address("127.0.0.1")) is None
    assert ("deny", "127.0.0.1") in {(e.decision, e.ip) for e in env.events}

    only_bad = await env.ask("loop.test")
    assert only_bad.rcode() == dns.rcode.NOERROR
    assert only_bad.answer == []


async def test_cname_chain_kept_strays_and_glue_dropped(env: Env) -> None:
    reply = await env.ask("cname.test")
    assert reply.rcode() == dns.rcode.NOERROR
    assert _addresses(reply) == ["198.51.100.12"]
    assert {rrset.rdtype for rrset in reply.answer} == {dns.rdatatype.CNAME, dns.rdatatype.A}
    assert reply.additional == []
    # Pinned under the allowed name the sandbox asked for, not the CNAME target.
    assert env.sandbox.pins.name_for(ipaddress.ip_address("198.51.100.12")) == "cname.test"
    assert env.sandbox.pins.name_for(ipaddress.ip_address("198.51.100.99")) is None


async def test_big_answer_truncates_then_tcp_works(env: Env) -> None:
    truncated = await env.ask("big.test")
    assert truncated.flags & dns.flags.TC
    full = await env.ask("big.test", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(_addresses(full)) == BIG_COUNT
    # The resolver itself had to fall back to TCP toward the upstream too.
    assert "tcp" in {s.transport for s in env.upstream.seen}
    assert env.sandbox.pins.name_for(ipaddress.ip_address("198.51.100.77")) == "big.test"
    ips = next(e.ip for e in env.events if e.decision == "allow" and e.ip)
    assert ips.endswith(f"+{BIG_COUNT - 8} more")


async def test_client_options_and_records_are_not_forwarded(env: Env) -> None:
    secret = b"SMUGGLED-SECRET"
    query = dns.message.make_query(
        "AlLoWeD.TeSt",
        "A",
        use_edns=0,
        payload=4096,
        want_dnssec=True,
        options=[
            dns.edns.GenericOption(cast("dns.edns.OptionType", 65001), secret),
            dns.edns.ECSOption("192.0.2.0", 24),
            dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"\x01" * 8),
        ],
    )
    query.id = 4242
    query.flags |= dns.flags.CD
    query.additional.append(dns.rrset.from_text("x.test.", 60, "IN", "TXT", secret.decode()))
    reply = await env.ask("", query=query)
    assert reply.id == 4242
    assert reply.question[0].name.to_text() == "AlLoWeD.TeSt."
    assert _addresses(reply) == ["198.51.100.10"]

    (seen,) = env.upstream.seen
    forwarded = seen.message
    # Lower-cased: even the client's 0x20 case pattern is not passed on.
    assert seen.name == "allowed.test"
    assert secret not in seen.wire
    assert forwarded.edns == 0 and forwarded.options == ()
    assert forwarded.payload == 1232
    assert forwarded.additional == []
    assert forwarded.flags & dns.flags.RD
    assert not forwarded.flags & dns.flags.CD
    assert not forwarded.ednsflags & dns.flags.DO


async def test_meta_queries_and_other_classes_are_refused(env: Env) -> None:
    assert (await env.ask("allowed.test", "ANY")).rcode() == dns.rcode.NOTIMP
    assert (await env.ask("allowed.test", "AXFR", tcp=True)).rcode() == dns.rcode.NOTIMP
    assert (await env.ask("allowed.test", "IXFR", tcp=True)).rcode() == dns.rcode.NOTIMP
    chaos = dns.message.make_query("allowed.test", "TXT", rdclass=dns.rdataclass.CH)
    assert (await env.ask("", query=chaos)).rcode() == dns.rcode.REFUSED
    assert env.upstream.seen == []


async def test_garbage_does_not_kill_the_server(env: Env) -> None:
    with _udp_socket() as sock:
        address = ("127.0.0.1", env.resolver.port)
        for junk in (b"", b"\x00", b"\xff" * 11, os.urandom(700), os.urandom(5000)):
            sock.sendto(junk, address)
        # A reply (QR set) is never answered: no loops between resolvers.
        sock.sendto(b"\x12\x34\x81\x80" + bytes(8), address)
        # The random packets may draw FORMERR (or NOTIMP for a random opcode), nothing else.
        while (stray := await _recv(sock)) is not None:
            assert dns.message.from_wire(stray).rcode() in (dns.rcode.FORMERR, dns.rcode.NOTIMP)

        # Header says one question, body is cut short: FORMERR with the client's id.
        sock.sendto(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03abc", address)
        formerr = dns.message.from_wire(await _recv(sock) or b"")
        assert (formerr.id, formerr.rcode()) == (0xABCD, dns.rcode.FORMERR)

        two = dns.message.make_query("allowed.test", "A")
        two.question.append(
            dns.rrset.RRset(dns.name.from_text("rebind.test"), dns.rdataclass.IN, dns.rdatatype.A)
        )
        sock.sendto(two.to_wire(), address)
        assert dns.message.from_wire(await _recv(sock) or b"").rcode() == dns.rcode.FORMERR

        notify = dns.message.make_query("allowed.test", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        sock.sendto(notify.to_wire(), address)
        assert dns.message.from_wire(await _recv(sock) or b"").rcode() == dns.rcode.NOTIMP

    # Too short, too long, and a well-framed message of junk: the connection ends or gets
    # FORMERR, and the server carries on.
    junk_query = b"\x0b\xb8" + b"\x77\x77\x01\x00" + os.urandom(2996)
    for junk in (b"\x00\x05hello", b"\xff\xff" + bytes(10), junk_query):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", env.resolver.port, local_addr=(SANDBOX_IP, 0)
        )
        writer.write(junk)
        await writer.drain()
        async with asyncio.timeout(2):
            data = await reader.read(65535)
        if data:
            assert dns.message.from_wire(data[2:]).rcode() == dns.rcode.FORMERR
        writer.close()

    assert env.upstream.seen == []
    assert _addresses(await env.ask("allowed.test")) == ["198.51.100.10"]
    assert _addresses(await env.ask("allowed.test", tcp=True)) == ["198.51.100.10"]


async def test_upstream_down_gives_servfail_quickly(make_env: Factory) -> None:
    # One upstream swallows queries (a bound socket nobody reads), one refuses (closed port).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
        closed.close()
        env = await make_env(
            [("127.0.0.1", black_hole.getsockname()[1]), ("127.0.0.1", closed_port)],
            timeout=0.3,
        )
        started = time.monotonic()
        reply = await env.ask("allowed.test")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 1.5
    (event,) = env.events
    assert event.decision == "allow" and "upstream failed" in event.reason
    assert env.sandbox.pins.name_for(ipaddress.ip_address("198.51.100.10")) is None


async def test_rate_limit_refuses_a_flood(make_env: Factory) -> None:
    env = await make_env(rate=1.0, burst=5.0)
    rcodes = [(await env.ask(f"n{i}.blocked.test")).rcode() for i in range(12)]
    assert rcodes[:5] == [dns.rcode.NXDOMAIN] * 5
    assert rcodes.count(dns.rcode.REFUSED) >= 6
    assert env.upstream.seen == []


async def test_tcp_connection_limits(make_env: Factory) -> None:
    env = await make_env(max_tcp_per_source=2, tcp_idle_timeout=0.5)
    port = env.resolver.port
    conns = [
        await asyncio.open_connection("127.0.0.1", port, local_addr=(SANDBOX_IP, 0))
        for _ in range(3)
    ]
    # The third connection from the same source is dropped at once.
    third_reader, _ = conns[2]
    try:
        async with asyncio.timeout(2):
            assert await third_reader.read(100) == b""
    except ConnectionError:
        pass
    # The first two still serve queries, then go away once idle.
    wire = dns.message.make_query("allowed.test", "A").to_wire()
    for reader, writer in conns[:2]:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        length = int.from_bytes(await reader.readexactly(2), "big")
        reply = dns.message.from_wire(await reader.readexactly(length))
        assert _addresses(reply) == ["198.51.100.10"]
    started = time.monotonic()
    async with asyncio.timeout(3):
        assert await conns[0][0].read(100) == b""
    assert time.monotonic() - started < 2
    for _, writer in conns:
        writer.close()


async def test_upstream_resolve_and_fallback(env: Env) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead = ("127.0.0.1", closed.getsockname()[1])
    closed.close()
    live = ("127.0.0.1", env.upstream.port)

    # dnspython ignores ICMP port-unreachable, so the dead server costs its whole timeout.
    upstream = Upstream([dead, live], timeout=0.2)
    found = await upstream.resolve("Rebind.Test.")
    assert sorted(str(ip) for ip, _ in found) == ["127.0.0.1", "198.51.100.11"]
    assert all(ttl == 300.0 for _, ttl in found)
    cname = await upstream.resolve("cname.test")
    assert [str(ip) for ip, _ in cname] == ["198.51.100.12"]
    assert await upstream.resolve("nothing.test") == []
    assert await upstream.resolve("bad\\.label.test") == []
    assert len(await upstream.resolve("big.test")) == BIG_COUNT
    await upstream.close()

    with pytest.raises(RuntimeFailure, match="every DNS upstream failed"):
        await Upstream([dead], timeout=0.3).resolve("allowed.test")


def test_upstreams_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\n"
        "search example.com\n"
        "nameserver 192.0.2.53\n"
        "nameserver 2001:db8::53 # v6\n"
        "nameserver not-an-ip\n"
        "nameserver\n"
        "nameserver 192.0.2.53\n"
        "options edns0\n"
    )
    assert upstreams_from_resolv_conf(conf) == [("192.0.2.53", 53), ("2001:db8::53", 53)]
    assert upstreams_from_resolv_conf(tmp_path / "missing") == []


async def test_aaaa_is_answered_empty_without_upstream(env: Env) -> None:
    # Sandboxes are IPv4-only: an empty AAAA answer sends clients straight to IPv4.
    reply = await env.ask("allowed.test", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert env.upstream.seen == []
    reply = await env.ask("blocked.test", "AAAA")
    assert reply.rcode() == dns.rcode.NXDOMAIN
