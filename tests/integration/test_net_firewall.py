"""Corral's nft table: reset/add/update/remove/delete build exactly the expected table, a failed
update keeps the old rules, and with real plumbing the rules DNAT, forward, reject and
anti-spoof traffic from a sandbox as designed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import pytest

from corral.errors import RuntimeFailure
from corral.net.firewall import Firewall, FirewallSandbox
from corral.net.plumbing import Plumbing
from corral.net.policy import ForwardRule
from tests.integration.test_net_plumbing import (
    netns_socket,
    random_prefix,
    random_subnet,
    run,
    traces,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (nft, netns, links)"),
]

_SO_ORIGINAL_DST = 80


@dataclass
class Lists:
    never_networks: Sequence[IPv4Network | IPv6Network] = field(default_factory=list)
    private_networks: Sequence[IPv4Network | IPv6Network] = field(default_factory=list)


def table_json(table: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True, timeout=30
    )
    if out.returncode != 0:
        return []
    items: list[dict[str, Any]] = json.loads(out.stdout)["nftables"]
    return items


def table_exists(table: str) -> bool:
    return f"table inet {table}" in run("nft", "list", "tables").splitlines()


def named(items: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {i[kind]["name"]: i[kind] for i in items if kind in i}


def rules(items: list[dict[str, Any]], chain: str) -> list[list[dict[str, Any]]]:
    return [i["rule"]["expr"] for i in items if "rule" in i and i["rule"]["chain"] == chain]


def elements(items: list[dict[str, Any]], kind: str, name: str) -> list[Any]:
    return list(named(items, kind)[name].get("elem", []))


def rule(cidr: str, protocol: str = "any", ports: Any = None, except_private: bool = False) -> Any:
    return ForwardRule(ip_network(cidr), protocol, ports, except_private)  # type: ignore[arg-type]


def sandbox(n: int, forward: Sequence[Any] = (), denies: Sequence[Any] = ()) -> FirewallSandbox:
    return FirewallSandbox(
        sandbox_id=f"sb-{n}",
        iface=f"ctx{n:010x}",
        address=IPv4Address(f"203.0.113.{200 + n}"),
        forward=list(forward),
        denies=list(denies),
    )


def new_firewall(table: str, **overrides: Any) -> Firewall:
    args: dict[str, Any] = {
        "service_ip": IPv4Address("203.0.113.193"),
        "subnet": IPv4Network("203.0.113.192/28"),
        "dns_port": 5353,
        "proxy_port": 3128,
        "guard": Lists(
            never_networks=[ip_network("169.254.0.0/16"), ip_network("203.0.113.192/28")],
            private_networks=[ip_network("10.0.0.0/8"), ip_network("fc00::/7")],
        ),
    }
    args.update(overrides)
    return Firewall(table, **args)


@pytest.fixture
async def table() -> AsyncIterator[str]:
    name = f"corral_test_{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        await new_firewall(name).delete()
        assert not table_exists(name)


# ----------------------------------------------------------------------- the table itself


async def test_reset_builds_the_whole_table(table: str) -> None:
    fw = new_firewall(table)
    one = sandbox(1, forward=[rule("198.51.100.0/24", "udp", ((53, 53), (1000, 2000)))])
    two = sandbox(2, forward=[rule("0.0.0.0/0", "icmp", except_private=True)],
                  denies=[rule("198.51.100.9/32")])  # fmt: skip
    await fw.reset([one, two])
    items = table_json(table)

    chains = named(items, "chain")
    hooks = {n: (c.get("type"), c.get("hook"), c.get("prio")) for n, c in chains.items()}
    assert hooks["prerouting"] == ("nat", "prerouting", -100)
    assert hooks["input"] == ("filter", "input", 0)
    assert hooks["forward"] == ("filter", "forward", 0)
    assert hooks["postrouting"] == ("nat", "postrouting", 100)
    assert sorted(elements(items, "set", "sandbox_ifaces")) == [one.iface, two.iface]
    assert sorted(e["concat"][1] for e in elements(items, "set", "sandbox_addrs")) == [
        "203.0.113.201",
        "203.0.113.202",
    ]
    assert [e["prefix"]["addr"] for e in elements(items, "set", "never_v4")] == [
        "169.254.0.0",
        "203.0.113.192",
    ]
    assert elements(items, "set", "never_v6") == []
    assert [e["prefix"]["addr"] for e in elements(items, "set", "private_v6")] == ["fc00::"]
    jumps = {k: v["jump"]["target"] for k, v in elements(items, "map", "sandbox_chains")}
    assert set(jumps) == {one.iface, two.iface}
    assert len(rules(items, jumps[one.iface])) == 1
    deny, allow = rules(items, jumps[two.iface])
    assert deny[-1] == {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
    assert allow[-1] == {"accept": None}
    assert any(e.get("match", {}).get("right") == "@private_v4" for e in allow)
    # DNAT targets are the service address and the configured ports.
    dnats = [e["dnat"] for r in rules(items, "prerouting") for e in r if "dnat" in e]
    assert [(d["addr"], d["port"]) for d in dnats] == [
        ("203.0.113.193", 5353),
        ("203.0.113.193", 5353),
        ("203.0.113.193", 3128),
    ]
    # The per-sandbox flow cap sits in front of the DNAT rules (tests/integration/
    # test_net_conntrack.py proves what it does).
    assert "flow_cap" in named(items, "set")
    first = rules(items, "prerouting")[0]
    assert any("reject" in e for e in first) and "ct count" in json.dumps(first).replace('"', " ")


async def test_sandbox_changes_touch_only_that_sandbox(table: str) -> None:
    fw = new_firewall(table)
    one, two = sandbox(1), sandbox(2, forward=[rule("198.51.100.7/32", "udp", ((9999, 9999),))])
    await fw.reset([])
    await fw.add_sandbox(one)
    await fw.add_sandbox(two)
    before = table_json(table)
    chain_two = {k: v["jump"]["target"] for k, v in elements(before, "map", "sandbox_chains")}[
        two.iface
    ]

    started = time.perf_counter()
    await fw.update_sandbox(
        FirewallSandbox(one.sandbox_id, one.iface, one.address, [rule("198.51.100.0/24")], [])
    )
    update_ms = (time.perf_counter() - started) * 1000
    after = table_json(table)
    jumps = {k: v["jump"]["target"] for k, v in elements(after, "map", "sandbox_chains")}
    assert len(rules(after, jumps[one.iface])) == 1
    assert rules(after, chain_two) == rules(before, chain_two)
    assert update_ms < 1000

    await fw.remove_sandbox(one.sandbox_id)
    await fw.remove_sandbox(one.sandbox_id)  # idempotent
    after = table_json(table)
    assert elements(after, "set", "sandbox_ifaces") == [two.iface]
    assert [e["concat"][0] for e in elements(after, "set", "sandbox_addrs")] == [two.iface]
    assert jumps[one.iface] not in named(after, "chain")
    assert rules(after, chain_two) == rules(before, chain_two)

    # A fresh instance (a restarted server) finds what to remove in the table itself.
    await new_firewall(table).remove_sandbox(two.sandbox_id)
    after = table_json(table)
    assert elements(after, "set", "sandbox_ifaces") == []
    assert elements(after, "map", "sandbox_chains") == []
    assert chain_two not in named(after, "chain")


async def test_failed_update_leaves_the_previous_rules(table: str) -> None:
    fw = new_firewall(table)
    one = sandbox(1, forward=[rule("198.51.100.0/24", "udp", ((53, 53),))])
    await fw.reset([one, sandbox(2)])
    before = table_json(table)
    bad = FirewallSandbox(
        one.sandbox_id, one.iface, one.address, [rule("198.51.100.0/24", "udp", ((1, 70000),))], []
    )
    with pytest.raises(RuntimeFailure, match="sandbox sb-1 failed: nft"):
        await fw.update_sandbox(bad)
    assert table_json(table) == before  # same rules, same handles: nothing was committed
    await fw.update_sandbox(one)  # and the table still takes good updates
    assert len(table_json(table)) == len(before)


async def test_reset_replaces_and_delete_is_idempotent(table: str) -> None:
    other = f"corral_other_{secrets.token_hex(4)}"
    run("nft", "add", "table", "inet", other)
    run("nft", "add", "chain", "inet", other, "keep")
    try:
        fw = new_firewall(table)
        await fw.reset([sandbox(1)])
        await fw.reset([sandbox(2)])
        items = table_json(table)
        assert elements(items, "set", "sandbox_ifaces") == [sandbox(2).iface]
        assert len([c for c in named(items, "chain") if c.startswith("sbx_")]) == 1
        await fw.delete()
        await fw.delete()
        assert not table_exists(table)
        await fw.remove_sandbox("sb-2")  # no table: nothing to do
        assert "keep" in run("nft", "list", "table", "inet", other)
    finally:
        run("nft", "delete", "table", "inet", other)


# ----------------------------------------------------------------------- end to end


def original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


class Inbox:
    """A UDP socket answering every datagram on a thread, remembering who sent what."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.got: list[tuple[bytes, tuple[str, int]]] = []
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.got.append((data, peer))
            with contextlib.suppress(OSError):
                self.sock.sendto(b"re:" + data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


async def test_end_to_end_with_plumbing(table: str) -> None:
    prefix, subnet = random_prefix(), random_subnet()
    service = subnet.network_address + 1
    sandbox_ip = subnet.network_address + 4
    spoofed_ip = subnet.network_address + 9
    k = secrets.randbelow(50)
    host_side, far = f"198.51.100.{140 + 2 * k}", f"198.51.100.{141 + 2 * k}"
    inet, inet_if = f"{prefix}-inet", f"{prefix}in"
    plumbing = Plumbing(prefix=prefix, subnet=subnet, service_ip=service)
    closers: list[Any] = []
    fw: Firewall | None = None
    try:
        plumbing.ensure_service_iface()
        path = plumbing.create("sb-e2e", sandbox_ip, 0)
        iface = plumbing.host_iface("sb-e2e")

        # The fake internet: a netns holding `far`, one veth away from the host.
        run("ip", "netns", "add", inet)
        run("ip", "link", "add", inet_if, "type", "veth", "peer", "name", "fv", "netns", inet)
        run("ip", "addr", "add", f"{host_side}/32", "peer", f"{far}/32", "dev", inet_if)
        run("ip", "link", "set", inet_if, "up")
        run("sysctl", "-qw", f"net.ipv4.conf.{inet_if}.forwarding=1")
        run("ip", "-n", inet, "link", "set", "lo", "up")
        run("ip", "-n", inet, "addr", "add", f"{far}/32", "peer", f"{host_side}/32", "dev", "fv")
        run("ip", "-n", inet, "link", "set", "fv", "up")
        run("ip", "-n", inet, "route", "add", "default", "via", host_side)
        inet_path = Path("/run/netns") / inet

        # Host-side services on the service address: the "proxy" and the "resolver".
        proxy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        closers.append(proxy)
        proxy.bind((str(service), 0))
        proxy.listen()
        proxy.settimeout(5)
        dns_udp = Inbox(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        closers.append(dns_udp)
        dns_udp.sock.bind((str(service), 0))
        dns_port = dns_udp.sock.getsockname()[1]
        dns_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        closers.append(dns_tcp)
        dns_tcp.bind((str(service), dns_port))
        dns_tcp.listen()
        dns_tcp.settimeout(5)
        far_udp = netns_socket(inet_path, socket.SOCK_DGRAM)
        far_udp.bind((far, 9999))
        far_inbox = Inbox(far_udp)
        closers.append(far_inbox)

        fw = new_firewall(
            table,
            service_ip=service,
            subnet=subnet,
            dns_port=dns_port,
            proxy_port=proxy.getsockname()[1],
            guard=Lists(never_networks=[ip_network("169.254.0.0/16"), subnet]),
        )
        base = FirewallSandbox("sb-e2e", iface, sandbox_ip, [], [])
        await fw.reset([base])

        def udp(dst: tuple[str, int], source: str | None = None) -> bytes | int | None:
            """Reply, errno of the refusal, or None for silence."""
            s = netns_socket(path, socket.SOCK_DGRAM)
            with s:
                if source:
                    s.bind((source, 0))
                s.settimeout(1.5)
                s.connect(dst)
                s.send(b"ping")
                try:
                    return s.recv(100)
                except TimeoutError:
                    return None
                except OSError as exc:
                    return exc.errno

        # TCP anywhere is DNATed to the proxy, which learns the real destination.
        client = netns_socket(path, socket.SOCK_STREAM)
        closers.append(client)
        client.settimeout(5)
        client.connect((far, 80))
        conn, peer = proxy.accept()
        closers.append(conn)
        assert peer[0] == str(sandbox_ip)
        assert original_dst(conn) == (far, 80)

        # Non-TCP without a rule: refused at once (ICMP admin-prohibited), nothing delivered.
        started = time.monotonic()
        assert udp((far, 9999)) == errno.EHOSTUNREACH
        assert time.monotonic() - started < 1
        assert udp((host_side, 9999)) == errno.EHOSTUNREACH  # the host itself, via input
        assert far_inbox.got == []

        # With a rule it is delivered, masqueraded behind the host.
        await fw.update_sandbox(
            FirewallSandbox("sb-e2e", iface, sandbox_ip, [rule(f"{far}/32", "udp", ((9999, 9999),))], [])
        )  # fmt: skip
        assert udp((far, 9999)) == b"re:ping"
        assert [peer[0] for _, peer in far_inbox.got] == [host_side]

        # Never-networks stay closed under an allow-everything rule; deny rules win over allows.
        everything = rule("0.0.0.0/0")
        await fw.update_sandbox(
            FirewallSandbox("sb-e2e", iface, sandbox_ip, [everything], [rule(f"{far}/32", "udp")])
        )
        assert udp(("169.254.169.254", 9999)) == errno.EHOSTUNREACH
        assert udp((far, 9999)) == errno.EHOSTUNREACH
        await fw.update_sandbox(FirewallSandbox("sb-e2e", iface, sandbox_ip, [everything], []))
        assert udp((far, 9999)) == b"re:ping"
        assert udp(("169.254.169.254", 9999)) == errno.EHOSTUNREACH

        # DNS to anywhere lands on the resolver, over UDP and TCP.
        assert udp(("8.8.8.8", 53)) == b"re:ping"
        assert dns_udp.got[-1] == (b"ping", (str(sandbox_ip), dns_udp.got[-1][1][1]))
        dns_client = netns_socket(path, socket.SOCK_STREAM)
        closers.append(dns_client)
        dns_client.settimeout(5)
        dns_client.connect(("8.8.8.8", 53))
        dns_conn, _ = dns_tcp.accept()
        closers.append(dns_conn)
        assert original_dst(dns_conn) == ("8.8.8.8", 53)

        # Ping of the service address is allowed (ICMP datagram socket, as unprivileged tools do).
        icmp = netns_socket(path, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        closers.append(icmp)
        icmp.settimeout(2)
        icmp.sendto(bytes([8, 0, 0, 0, 0, 1, 0, 1]), (str(service), 0))
        assert icmp.recv(100)[0] == 0

        # A forged source is dropped even with the kernel's reverse-path filter off: it is the
        # firewall that drops it, on the input and the forward path alike.
        run("ip", "netns", "exec", plumbing.netns_name("sb-e2e"),
            "ip", "addr", "add", f"{spoofed_ip}/32", "dev", "eth0")  # fmt: skip
        run("sysctl", "-qw", f"net.ipv4.conf.{iface}.rp_filter=0")
        seen_dns, seen_far = len(dns_udp.got), len(far_inbox.got)
        assert udp((str(service), dns_port), source=str(spoofed_ip)) is None
        assert udp((far, 9999), source=str(spoofed_ip)) is None
        assert (len(dns_udp.got), len(far_inbox.got)) == (seen_dns, seen_far)
        assert udp((far, 9999)) == b"re:ping"  # the real address still works

        # Nothing from outside reaches a sandbox.
        run("ip", "-n", inet, "route", "add", str(subnet), "via", host_side)
        listener = netns_socket(path, socket.SOCK_DGRAM)
        closers.append(listener)
        listener.bind((str(sandbox_ip), 7000))
        listener.settimeout(0.5)
        probe = netns_socket(inet_path, socket.SOCK_DGRAM)
        closers.append(probe)
        probe.sendto(b"knock", (str(sandbox_ip), 7000))
        with pytest.raises(TimeoutError):
            listener.recv(100)
    finally:
        for closer in reversed(closers):
            with contextlib.suppress(OSError):
                closer.close()
        if fw is not None:
            await fw.delete()
        plumbing.destroy("sb-e2e")
        plumbing.remove_service_iface()
        subprocess.run(["ip", "link", "del", inet_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", inet], capture_output=True)
    assert traces(prefix, subnet) == []
    assert not table_exists(table)
