"""forget_flows deletes exactly one source's conntrack entries (ending a UDP flow a narrowed policy
no longer allows, keeping proxied TCP on request), and the flow-cap nft rules refuse a sandbox's
flow beyond its limit while another sandbox's flows go through."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_network
from pathlib import Path
from typing import Any

import pytest
from pyroute2.conntrack import Conntrack  # type: ignore[import-untyped]
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # type: ignore[import-untyped]

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.net import conntrack as conntrack_module
from corral.net.conntrack import flow_cap_rules, flow_cap_set, forget_flows
from corral.net.firewall import Firewall, FirewallSandbox
from corral.net.plumbing import Plumbing
from tests.integration.test_net_firewall import Inbox, Lists, rule, table_exists
from tests.integration.test_net_plumbing import (
    in_netns,
    ip_json,
    netns_socket,
    random_prefix,
    run,
    traces,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (conntrack, nft, netns, links)"),
]

_FAR_PORT = 9999


# ----------------------------------------------------------------------- helpers


def add_entries(ct: Any, source: str, protocol: int, count: int) -> None:
    """``count`` tracked flows from ``source`` to 198.51.100.7, injected through ctnetlink."""
    for i in range(count):
        orig = NFCTAttrTuple(
            saddr=source, daddr="198.51.100.7", proto=protocol, sport=10000 + i, dport=_FAR_PORT
        )
        ct.entry("add", timeout=120, tuple_orig=orig, tuple_reply=orig.reverse())


def protocols_from(source: str) -> list[int]:
    """Protocol of each conntrack entry (of the calling thread's netns) from ``source``."""
    with Conntrack() as ct:
        return sorted(
            e.tuple_orig.proto for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(saddr=source))
        )


def free_slash28(within: str) -> IPv4Network:
    """A random /28 of ``within`` holding no address of this host and no route narrower than
    a /24 (other tests' sandboxes and veth peers), so concurrent tests do not collide."""
    taken = [
        ip_network(f"{a['local']}/32")
        for link in ip_json("addr", "show")
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    for route in ip_json("route", "show"):
        if route["dst"] != "default" and ip_network(route["dst"], strict=False).prefixlen > 24:
            taken.append(ip_network(route["dst"], strict=False))
    candidates = list(IPv4Network(within).subnets(new_prefix=28))
    secrets.SystemRandom().shuffle(candidates)
    for candidate in candidates:
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise RuntimeError(f"no free /28 left in {within}")


@contextlib.contextmanager
def private_netns(name: str) -> Iterator[Path]:
    run("ip", "netns", "add", name)
    try:
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass
class World:
    """Sandboxes plumbed by corral and a fake internet (one netns, one veth away) whose ``far``
    address answers every UDP datagram on port 9999."""

    plumbing: Plumbing
    far: str
    inbox: Inbox
    sandboxes: dict[str, tuple[Path, IPv4Address]] = field(default_factory=dict)

    def udp(self, sandbox_id: str, sock: socket.socket | None = None) -> bytes | int | None:
        """Send one datagram to ``far`` on a new flow (or on ``sock``'s): the reply, the errno
        of a refusal, or None for silence."""
        s = sock or netns_socket(self.sandboxes[sandbox_id][0], socket.SOCK_DGRAM)
        try:
            if sock is None:
                s.settimeout(1.5)
                s.connect((self.far, _FAR_PORT))
            s.send(b"ping")
            try:
                return s.recv(100)
            except TimeoutError:
                return None
            except OSError as exc:
                return exc.errno
        finally:
            if sock is None:
                s.close()


@contextlib.contextmanager
def world(sandbox_ids: list[str]) -> Iterator[World]:
    # Sandboxes where random_subnet() puts them; the fake internet in a part of TEST-NET-2 that
    # the shared fake internet (198.51.100.0/26) and the firewall tests (.140-.239) leave alone.
    prefix, subnet = random_prefix(), free_slash28("203.0.113.128/25")
    service = subnet.network_address + 1
    base = free_slash28("198.51.100.64/26").network_address
    host_side, far = str(base + 1), str(base + 2)
    inet, inet_if = f"{prefix}-inet", f"{prefix}in"
    plumbing = Plumbing(prefix=prefix, subnet=subnet, service_ip=service)
    inbox: Inbox | None = None
    try:
        plumbing.ensure_service_iface()
        run("ip", "netns", "add", inet)
        run("ip", "link", "add", inet_if, "type", "veth", "peer", "name", "fv", "netns", inet)
        run("ip", "addr", "add", f"{host_side}/32", "peer", f"{far}/32", "dev", inet_if)
        run("ip", "link", "set", inet_if, "up")
        run("sysctl", "-qw", f"net.ipv4.conf.{inet_if}.forwarding=1")
        run("ip", "-n", inet, "link", "set", "lo", "up")
        run("ip", "-n", inet, "addr", "add", f"{far}/32", "peer", f"{host_side}/32", "dev", "fv")
        run("ip", "-n", inet, "link", "set", "fv", "up")
        run("ip", "-n", inet, "route", "add", "default", "via", host_side)
        far_sock = netns_socket(Path("/run/netns") / inet, socket.SOCK_DGRAM)
        far_sock.bind((far, _FAR_PORT))
        inbox = Inbox(far_sock)
        w = World(plumbing, far, inbox)
        for n, sandbox_id in enumerate(sandbox_ids):
            address = subnet.network_address + 4 + n
            # Flows an earlier test's sandbox at this address left behind would be counted.
            forget_flows(address)
            w.sandboxes[sandbox_id] = (plumbing.create(sandbox_id, address, 0), address)
        yield w
    finally:
        if inbox is not None:
            inbox.close()
        for n, sandbox_id in enumerate(sandbox_ids):
            plumbing.destroy(sandbox_id)
            forget_flows(subnet.network_address + 4 + n)  # the flows a failed test left
        plumbing.remove_service_iface()
        subprocess.run(["ip", "link", "del", inet_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", inet], capture_output=True)
    assert traces(prefix, subnet) == []


def nft_json(commands: list[dict[str, Any]]) -> None:
    subprocess.run(
        ["nft", "-j", "-f", "-"],
        input=json.dumps({"nftables": commands}),
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )


# ----------------------------------------------------------------------- forget_flows


def test_forget_flows_deletes_exactly_one_sources_entries() -> None:
    # Addresses are free to choose: nothing leaves the netns.
    name, one, two = f"{random_prefix()}-ct", "203.0.113.4", "203.0.113.5"

    def scenario() -> dict[str, Any]:
        # In a netns of our own: its conntrack table holds nothing but what we put there.
        with Conntrack() as ct:
            add_entries(ct, one, socket.IPPROTO_UDP, 1000)
            add_entries(ct, one, socket.IPPROTO_TCP, 3)
            add_entries(ct, two, socket.IPPROTO_UDP, 5)
        started = time.perf_counter()
        but_tcp = forget_flows(IPv4Address(one), keep_tcp=True)
        seconds = time.perf_counter() - started
        left = protocols_from(one)
        rest = forget_flows(IPv4Address(one))
        return {
            "but_tcp": but_tcp,
            "seconds": seconds,
            "left": left,
            "rest": rest,
            "again": forget_flows(IPv4Address(one)),
            "gone": protocols_from(one),
            "other": protocols_from(two),
        }

    with private_netns(name) as path:
        result = in_netns(path, scenario)
    assert result["but_tcp"] == 1000
    assert result["seconds"] < 0.5  # ~20 ms here; pyroute2's Conntrack.delete takes ~750 ms
    assert result["left"] == [socket.IPPROTO_TCP] * 3
    assert (result["rest"], result["again"], result["gone"]) == (3, 0, [])
    assert result["other"] == [socket.IPPROTO_UDP] * 5
    assert name not in run("ip", "netns", "list")


def test_forget_flows_failures_name_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    address = IPv4Address("203.0.113.4")
    monkeypatch.setattr(conntrack_module, "_CT_GET", (1 << 8) | 0x7F)  # no such ctnetlink request
    with pytest.raises(RuntimeFailure, match=r"of 203\.0\.113\.4 failed listing conntrack"):
        forget_flows(address)
    monkeypatch.setattr(conntrack_module, "_NETLINK_NETFILTER", 31)  # no such netlink family
    with pytest.raises(RuntimeFailure, match="failed opening a ctnetlink socket"):
        forget_flows(address)


async def test_forgetting_ends_a_flow_the_policy_no_longer_allows() -> None:
    table = f"corral_test_{secrets.token_hex(4)}"
    fw: Firewall | None = None
    closers: list[Any] = []
    try:
        with world(["sb-ct"]) as w:
            path, address = w.sandboxes["sb-ct"]
            plumbing = w.plumbing
            proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            closers.append(proxy)
            proxy.bind((str(plumbing.service_ip), 0))
            proxy.listen()
            proxy.settimeout(5)
            fw = Firewall(
                table,
                service_ip=plumbing.service_ip,
                subnet=plumbing.subnet,
                dns_port=5353,
                proxy_port=proxy.getsockname()[1],
                guard=Lists(never_networks=[ip_network("169.254.0.0/16"), plumbing.subnet]),
            )
            iface = plumbing.host_iface("sb-ct")
            allow = [rule(f"{w.far}/32", "udp", ((_FAR_PORT, _FAR_PORT),))]
            await fw.reset([FirewallSandbox("sb-ct", iface, address, allow, [])])

            # One UDP flow (the same socket, so the same source port throughout) and one TCP
            # connection through the "proxy".
            flow = netns_socket(path, socket.SOCK_DGRAM)
            closers.append(flow)
            flow.settimeout(1.5)
            flow.connect((w.far, _FAR_PORT))
            assert w.udp("sb-ct", flow) == b"re:ping"
            client = netns_socket(path, socket.SOCK_STREAM)
            closers.append(client)
            client.settimeout(5)
            client.connect((w.far, 80))
            conn, _ = proxy.accept()
            closers.append(conn)
            conn.settimeout(5)

            # The policy narrows: new flows are refused, the established one still goes through.
            await fw.update_sandbox(FirewallSandbox("sb-ct", iface, address, [], []))
            assert w.udp("sb-ct") == errno.EHOSTUNREACH
            assert w.udp("sb-ct", flow) == b"re:ping"

            # Forgotten, its next datagram is a new flow and meets the new rules.
            delivered = len(w.inbox.got)
            assert await asyncio.to_thread(forget_flows, address, keep_tcp=True) == 1
            assert w.udp("sb-ct", flow) == errno.EHOSTUNREACH
            assert len(w.inbox.got) == delivered

            # The proxied connection was kept: the proxy can still speak first.
            conn.sendall(b"hello")
            assert client.recv(100) == b"hello"
            # (pyroute2's sync API cannot run on a thread with a running event loop.)
            assert await asyncio.to_thread(protocols_from, str(address)) == [socket.IPPROTO_TCP]
            assert await asyncio.to_thread(forget_flows, address) == 1  # teardown: all of them
            assert await asyncio.to_thread(protocols_from, str(address)) == []
    finally:
        for closer in reversed(closers):
            with contextlib.suppress(OSError):
                closer.close()
        if fw is not None:
            await fw.delete()
    assert not table_exists(table)


# ----------------------------------------------------------------------- the flow cap


def test_flow_cap_rules_refuse_bad_limits() -> None:
    for limit in (0, -1, 2**32):
        with pytest.raises(InvalidRequestError, match=f"got {limit}"):
            flow_cap_rules("corral", "prerouting", "sandbox_ifaces", limit)


def test_flow_cap_refuses_the_flow_beyond_the_limit_of_that_sandbox_only() -> None:
    limit = 5
    table = f"corral_test_{secrets.token_hex(4)}"
    try:
        with world(["sb-greedy", "sb-other"]) as w:
            greedy = w.plumbing.host_iface("sb-greedy")
            other = w.plumbing.host_iface("sb-other")
            o = {"family": "inet", "table": table}
            nft_json(
                [
                    {"add": {"table": {"family": "inet", "name": table}}},
                    {"add": {"set": {**o, "name": "sandbox_ifaces", "type": "ifname"}}},
                    {"add": {"element": {**o, "name": "sandbox_ifaces", "elem": [greedy, other]}}},
                    flow_cap_set(table),
                    {
                        "add": {
                            "chain": {
                                **o,
                                "name": "prerouting",
                                "type": "nat",
                                "hook": "prerouting",
                                "prio": -100,
                                "policy": "accept",
                            }
                        }
                    },
                    *flow_cap_rules(table, "prerouting", "sandbox_ifaces", limit),
                ]
            )
            listed = run("nft", "list", "chain", "inet", table, "prerouting")
            assert f"add @flow_cap {{ iifname ct count over {limit} }} reject" in listed

            # `limit` concurrent flows go through; the next one is refused at once.
            assert [w.udp("sb-greedy") for _ in range(limit)] == [b"re:ping"] * limit
            started = time.monotonic()
            assert w.udp("sb-greedy") == errno.EHOSTUNREACH
            assert time.monotonic() - started < 1
            assert len(w.inbox.got) == limit

            # Another sandbox has its own allowance.
            assert [w.udp("sb-other") for _ in range(limit)] == [b"re:ping"] * limit
            assert w.udp("sb-other") == errno.EHOSTUNREACH

            # Forgetting the greedy sandbox's flows gives it room again.
            assert forget_flows(w.sandboxes["sb-greedy"][1]) == limit
            assert w.udp("sb-greedy") == b"re:ping"
            forget_flows(w.sandboxes["sb-greedy"][1])
            forget_flows(w.sandboxes["sb-other"][1])
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
    assert not table_exists(table)
