"""The forward chain's UDP/ICMP decisions reach the egress log through NFLOG: one allow event per
flow, deny events with the refused destination, a bounded number under a flood, overruns counted
and survived, nothing for unregistered sources, an exclusive group freed on stop, and a parser
no input can crash."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from corral.errors import RuntimeFailure
from corral.net.firewall import LOG_ALLOW, LOG_DENY, Firewall, FirewallSandbox
from corral.net.nflog import LoggedPacket, NflogListener, parse_batch
from corral.net.plumbing import Plumbing
from corral.net.policy import AddressGuard, NetworkPolicy, Rule, compile_policy
from corral.net.view import EgressEvent, NetRegistry, SandboxNet
from tests.integration.test_net_firewall import Inbox, table_exists
from tests.integration.test_net_plumbing import (
    netns_socket,
    random_prefix,
    random_subnet,
    run,
    traces,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (nft, netns, links, NFLOG)"),
]

SANDBOX = "sb-nflog"
ALLOWED_PORTS = (9000, 9999)  # UDP to `far` on these ports is allowed; 9999 answers


@dataclass
class World:
    path: Path  # the sandbox's netns
    sandbox_ip: IPv4Address
    far: str  # fake internet host, UDP 9000-9999 allowed
    other: str  # routed to the fake internet, allowed by no rule
    never: str  # routed to the fake internet, never reachable
    group: int
    registry: NetRegistry
    listener: NflogListener
    events: list[EgressEvent]

    def udp(self, dst: tuple[str, int], count: int = 1) -> None:
        """``count`` datagrams from one unconnected socket (one flow), answers ignored."""
        with netns_socket(self.path, socket.SOCK_DGRAM) as s:
            for _ in range(count):
                s.sendto(b"ping", dst)

    def exchange(self, dst: tuple[str, int]) -> bytes:
        with netns_socket(self.path, socket.SOCK_DGRAM) as s:
            s.settimeout(1.5)
            s.connect(dst)
            s.send(b"ping")
            return s.recv(100)


def nflog_groups() -> set[int]:
    """NFLOG groups bound in this network namespace."""
    text = Path("/proc/net/netfilter/nfnetlink_log").read_text()
    return {int(line.split()[0]) for line in text.splitlines() if line.strip()}


def unrouted_addresses(count: int) -> list[str]:
    """Addresses of 203.0.113.16-127 that no route names exactly yet: TEST-NET-3 below the
    sandbox subnets of random_subnet() and away from the shared fake internet's 203.0.113.10."""
    while True:
        picked = [f"203.0.113.{n}" for n in secrets.SystemRandom().sample(range(16, 128), count)]
        if not any(
            run("ip", "route", "show", "table", "all", "exact", f"{a}/32").strip() for a in picked
        ):
            return picked


async def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def settle() -> None:
    """Long enough for anything still queued in the kernel (batches flush after 0.1 s)."""
    await asyncio.sleep(0.5)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    prefix, subnet = random_prefix(), random_subnet()
    service = subnet.network_address + 1
    # Not +4, which test_net_firewall uses: the floods here use up the host's ICMP error budget
    # for the sandbox's address for a few seconds (so no test here relies on those errors).
    sandbox_ip = subnet.network_address + secrets.choice([5, 6, 7, 8, 10, 11, 12, 13, 14])
    host_side, far, other, never = unrouted_addresses(4)
    inet, inet_if = f"{prefix}-inet", f"{prefix}in"
    table = f"corral_test_{secrets.token_hex(4)}"
    group = 20000 + secrets.randbelow(10001)
    guard = AddressGuard(extra_never=[subnet, IPv4Network(f"{never}/32")])
    policy = NetworkPolicy(
        allow=[Rule(cidr=f"{far}/32", protocol="udp", ports=["-".join(map(str, ALLOWED_PORTS))])]
    )
    compiled = compile_policy(policy, guard)
    plumbing = Plumbing(prefix=prefix, subnet=subnet, service_ip=service)
    fw = Firewall(
        table,
        service_ip=service,
        subnet=subnet,
        dns_port=5353,
        proxy_port=3128,
        guard=guard,
        nflog_group=group,
    )
    registry = NetRegistry()
    events: list[EgressEvent] = []
    listener = NflogListener(group, registry, events.append)
    inbox: Inbox | None = None
    try:
        plumbing.ensure_service_iface()
        path = plumbing.create(SANDBOX, sandbox_ip, 0)
        # The fake internet: a netns holding `far`, one veth away; `other` and `never` are
        # routed there too (nothing answers them: the firewall refuses them first).
        run("ip", "netns", "add", inet)
        run("ip", "link", "add", inet_if, "type", "veth", "peer", "name", "fv", "netns", inet)
        run("ip", "addr", "add", f"{host_side}/32", "peer", f"{far}/32", "dev", inet_if)
        run("ip", "link", "set", inet_if, "up")
        run("ip", "route", "add", f"{other}/32", "dev", inet_if)
        run("ip", "route", "add", f"{never}/32", "dev", inet_if)
        run("sysctl", "-qw", f"net.ipv4.conf.{inet_if}.forwarding=1")
        run("ip", "-n", inet, "link", "set", "lo", "up")
        run("ip", "-n", inet, "addr", "add", f"{far}/32", "peer", f"{host_side}/32", "dev", "fv")
        run("ip", "-n", inet, "link", "set", "fv", "up")
        run("ip", "-n", inet, "route", "add", "default", "via", host_side)
        far_udp = netns_socket(Path("/run/netns") / inet, socket.SOCK_DGRAM)
        far_udp.bind((far, ALLOWED_PORTS[1]))
        inbox = Inbox(far_udp)

        await fw.reset(
            [
                FirewallSandbox(
                    SANDBOX,
                    plumbing.host_iface(SANDBOX),
                    sandbox_ip,
                    compiled.forward_rules(),
                    compiled.forward_denies(),
                )
            ]
        )
        registry.add(SandboxNet(SANDBOX, "tenant", sandbox_ip, compiled))
        await listener.start()
        assert group in nflog_groups()
        yield World(path, sandbox_ip, far, other, never, group, registry, listener, events)
    finally:
        await listener.stop()
        if inbox is not None:
            inbox.close()
        await fw.delete()
        plumbing.destroy(SANDBOX)
        plumbing.remove_service_iface()
        subprocess.run(["ip", "link", "del", inet_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", inet], capture_output=True)
    assert group not in nflog_groups()
    assert traces(prefix, subnet) == []
    assert not table_exists(table)


def of(events: list[EgressEvent], decision: str) -> list[tuple[str, str, str | None, int | None]]:
    return [(e.sandbox_id, e.kind, e.ip, e.port) for e in events if e.decision == decision]


# ----------------------------------------------------------------------- end to end


async def test_an_allowed_flow_is_logged_once(world: World) -> None:
    # Answered: three exchanges on one socket are one flow (the later ones are established).
    with netns_socket(world.path, socket.SOCK_DGRAM) as s:
        s.settimeout(1.5)
        s.connect((world.far, 9999))
        for _ in range(3):
            s.send(b"ping")
            assert s.recv(100) == b"re:ping"
    # Never answered: the flow stays "new" in conntrack, yet only its first packet is logged.
    world.udp((world.far, 9991), count=3)  # the far end answers "port unreachable"
    await wait_for(lambda: len(world.events) >= 2)
    await settle()
    assert of(world.events, "allow") == [
        (SANDBOX, "udp", world.far, 9999),
        (SANDBOX, "udp", world.far, 9991),
    ]
    assert of(world.events, "deny") == []
    # The reason names the policy's rule, as the resolver's and the proxy's do.
    assert all(e.reason.startswith("allow rule 1") for e in world.events), world.events

    # A new socket is a new flow.
    world.udp((world.far, 9991))
    await wait_for(lambda: len(world.events) == 3)
    await settle()
    assert len(world.events) == 3


async def test_refused_udp_is_logged_with_its_destination(world: World) -> None:
    world.udp((world.other, 4444))
    world.udp((world.far, 7777))  # not an allowed port
    world.udp((world.never, 5000))
    await wait_for(lambda: len(world.events) >= 3)
    await settle()
    assert of(world.events, "deny") == [
        (SANDBOX, "udp", world.other, 4444),
        (SANDBOX, "udp", world.far, 7777),
        (SANDBOX, "udp", world.never, 5000),
    ]
    reasons = [e.reason for e in world.events]
    assert reasons[:2] == ["default deny", "default deny"]
    assert reasons[2].startswith(f"{world.never} is never reachable")
    assert of(world.events, "allow") == []


async def test_refused_ping_is_an_icmp_deny(world: World) -> None:
    with netns_socket(world.path, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as icmp:
        icmp.sendto(bytes([8, 0, 0, 0, 0, 1, 0, 1]), (world.other, 0))
    await wait_for(lambda: len(world.events) >= 1)
    await settle()
    assert of(world.events, "deny") == [(SANDBOX, "icmp", world.other, None)]
    assert world.events[0].reason == "default deny (icmp echo-request)"


async def test_a_flood_is_logged_within_the_rate_limit(world: World) -> None:
    started = time.monotonic()
    with netns_socket(world.path, socket.SOCK_DGRAM) as s:
        for i in range(1000):
            s.sendto(b"x", (world.other, 1000 + i % 50))
    await settle()
    await settle()
    elapsed = time.monotonic() - started
    denies = of(world.events, "deny")
    # Per sandbox: a burst of 100, then 50/s (the upper bound allows for nft's rounding).
    assert 50 <= len(denies) <= 150 + 50 * elapsed + 5, (len(denies), elapsed)
    assert {(ip, kind) for _, kind, ip, _ in denies} == {(world.other, "udp")}
    assert world.listener.overruns == 0


async def test_an_overrun_is_counted_and_reading_goes_on(world: World) -> None:
    # A tiny receive buffer and no reading while 90 new flows go out: the kernel drops batches.
    sock = world.listener._sock
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)
    with netns_socket(world.path, socket.SOCK_DGRAM) as s:
        for i in range(90):
            s.sendto(b"x", (world.far, 9000 + i))
    await wait_for(lambda: world.listener.overruns >= 1)
    await settle()
    assert 0 < len(world.events) < 90
    seen = len(world.events)
    world.udp((world.far, 9999))
    await wait_for(lambda: len(world.events) == seen + 1)
    assert world.events[-1].decision == "allow"


async def test_an_unregistered_source_is_not_logged(world: World) -> None:
    world.registry.remove(SANDBOX)
    assert world.exchange((world.far, 9999)) == b"re:ping"  # the firewall still allows it
    world.udp((world.other, 4444))
    await wait_for(lambda: world.listener.unknown_source >= 2)
    await settle()
    assert world.events == []


async def test_a_group_has_one_listener_and_stop_frees_it(world: World) -> None:
    second = NflogListener(world.group, NetRegistry(), world.events.append)
    with pytest.raises(RuntimeFailure, match=f"NFLOG group {world.group} is already bound"):
        await second.start()
    await world.listener.stop()
    await world.listener.stop()  # idempotent
    assert world.group not in nflog_groups()
    try:
        await second.start()
        assert world.group in nflog_groups()
    finally:
        await second.stop()
    assert world.group not in nflog_groups()


# ----------------------------------------------------------------------- parsing


def nflog_message(group: int, prefix: bytes, payload: bytes, *, family: int = 2) -> bytes:
    def attr(kind: int, value: bytes) -> bytes:
        size = 4 + len(value)
        return struct.pack("=HH", size, kind) + value + b"\0" * (-size % 4)

    body = struct.pack("=BBH", family, 0, socket.htons(group))
    body += attr(1, struct.pack(">HBB", 0x0800, 2, 0))  # NFULA_PACKET_HDR: IPv4, forward hook
    body += attr(10, prefix + b"\0") + attr(9, payload)
    return struct.pack("=IHHII", 16 + len(body), 0x400, 0, 0, 0) + body


def ipv4(src: str, dst: str, protocol: int, l4: bytes, *, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        ihl * 4 + len(l4),
        1,
        0,
        64,
        protocol,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + options + l4


async def test_parse_batch_reads_a_batch_and_skips_the_rest() -> None:
    udp = ipv4("10.201.0.5", "198.51.100.7", 17, struct.pack(">HHHH", 40000, 5353, 8, 0),
               options=b"\x01" * 8)  # fmt: skip
    icmp = ipv4("10.201.0.5", "198.51.100.8", 1, bytes([8, 0, 0, 0]))
    gre = ipv4("10.201.0.5", "198.51.100.9", 47, b"\0" * 4)
    batch = (
        nflog_message(7, LOG_ALLOW.encode(), udp)
        + nflog_message(8, LOG_DENY.encode(), udp)  # another group
        + nflog_message(7, LOG_DENY.encode(), icmp)
        + nflog_message(7, LOG_DENY.encode(), gre)  # neither UDP nor ICMP
        + nflog_message(7, LOG_DENY.encode(), icmp, family=10)  # IPv6 family
        + nflog_message(7, LOG_DENY.encode(), udp[:22])  # UDP header cut short
    )
    assert list(parse_batch(batch, 7)) == [
        LoggedPacket(LOG_ALLOW, IPv4Address("10.201.0.5"), IPv4Address("198.51.100.7"),
                     "udp", 5353, None),
        LoggedPacket(LOG_DENY, IPv4Address("10.201.0.5"), IPv4Address("198.51.100.8"),
                     "icmp", None, 8),
        LoggedPacket(LOG_DENY, IPv4Address("10.201.0.5"), IPv4Address("198.51.100.7"),
                     "udp", None, None),
    ]  # fmt: skip
    assert len(list(parse_batch(batch))) == 4  # any group


async def test_parse_batch_never_raises() -> None:
    good = nflog_message(7, b"corral:d", ipv4("10.0.0.1", "10.0.0.2", 17, b"\0" * 8))
    rng = secrets.SystemRandom()
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randint(0, len(data))])
        for sample in (bytes(data), cut, cut + good, secrets.token_bytes(rng.randint(0, 300))):
            for packet in parse_batch(sample):
                assert isinstance(packet, LoggedPacket)


async def test_odd_messages_do_not_stop_the_listener() -> None:
    registry = NetRegistry()
    events: list[EgressEvent] = []
    listener = NflogListener(7, registry, events.append)
    net = SandboxNet("sb", "t", IPv4Address("10.201.0.5"),
                     compile_policy(NetworkPolicy(), AddressGuard()))  # fmt: skip
    registry.add(net)
    udp = ipv4("10.201.0.5", "198.51.100.7", 17, struct.pack(">HHHH", 1, 53, 8, 0))
    listener._handle(nflog_message(7, b"something:else", udp))  # not a corral prefix
    cut = bytearray(nflog_message(7, LOG_DENY.encode(), udp)[:40])
    struct.pack_into("=I", cut, 0, len(cut))  # a whole message whose attributes run past it
    listener._handle(bytes(cut) + b"\xff" * 40)
    listener._handle(nflog_message(7, LOG_DENY.encode(), udp))
    assert [(e.sandbox_id, e.kind, e.decision, e.port) for e in events] == [
        ("sb", "udp", "deny", 53)
    ]
    assert listener.skipped == 1
    await listener.stop()  # never started: nothing to do
