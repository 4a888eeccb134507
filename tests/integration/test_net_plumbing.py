"""Sandbox network plumbing: netns, veth, addresses, routes, sysctls and tc are set up as
specified, reach the service address, and leave nothing behind on destroy or failed create."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import pytest

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.net import plumbing as plumbing_module
from corral.net.plumbing import Plumbing

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, links, routes)"),
]

_T = TypeVar("_T")
_CLONE_NEWNET = 0x40000000


# ----------------------------------------------------------------------- helpers (also used by
# test_net_firewall.py)


def random_prefix() -> str:
    return "ct" + secrets.token_hex(2)[:3]


def random_subnet() -> IPv4Network:
    """A /28 of TEST-NET-3 that the shared fake internet (203.0.113.10) does not use."""
    return IPv4Network(f"203.0.113.{128 + 16 * secrets.randbelow(8)}/28")


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=30).stdout


def ip_json(*args: str, netns: str | None = None) -> Any:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = run(*prefix, "ip", "-j", *args)
    return json.loads(out) if out.strip() else []


def in_netns(path: Path, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a fresh thread inside the netns at ``path`` (sockets it makes stay there)."""
    result: list[_T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {path}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netns_socket(path: Path, kind: int, proto: int = 0) -> socket.socket:
    return in_netns(path, lambda: socket.socket(socket.AF_INET, kind, proto))


def traces(prefix: str, subnet: IPv4Network) -> list[str]:
    """Every host object named with ``prefix``, and routes within ``subnet`` (other sessions'
    broader routes, such as a shared fake internet's, are theirs)."""
    found = [
        f"netns {line.split()[0]}"
        for line in run("ip", "netns", "list").splitlines()
        if line.startswith((f"corral-{prefix}-", prefix))
    ]
    found += [
        f"link {link['ifname']}"
        for link in ip_json("link", "show")
        if link["ifname"].startswith(prefix)
    ]
    found += [
        f"route {route['dst']}"
        for route in ip_json("route", "show")
        if route.get("dev", "").startswith(prefix)
        or (route["dst"] != "default" and IPv4Network(route["dst"]).subnet_of(subnet))
    ]
    return found


def read_sysctl(name: str, netns: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return run(*prefix, "cat", f"/proc/sys/net/{name}").strip()


# ----------------------------------------------------------------------- fixtures


@pytest.fixture
def plumbing() -> Iterator[Plumbing]:
    subnet = random_subnet()
    p = Plumbing(prefix=random_prefix(), subnet=subnet, service_ip=subnet.network_address + 1)
    p.ensure_service_iface()
    try:
        yield p
    finally:
        for sandbox_id in p.list_sandboxes():
            p.destroy(sandbox_id)
        p.remove_service_iface()
        assert traces(p.prefix, subnet) == []


def address(p: Plumbing, n: int = 4) -> IPv4Address:
    return p.subnet.network_address + n


# ----------------------------------------------------------------------- tests


def test_create_sets_up_both_sides(plumbing: Plumbing) -> None:
    p = plumbing
    addr = address(p)
    path = p.create("sb-one", addr, 100)
    name = p.netns_name("sb-one")
    assert path == Path("/run/netns") / name
    assert name in run("ip", "netns", "list").split()
    iface = p.host_iface("sb-one")
    assert len(iface) <= 15

    # Inside: lo and eth0 up, one /32, a link route to the service address and default via it.
    links = {link["ifname"]: link for link in ip_json("link", "show", netns=name)}
    assert set(links) == {"lo", "eth0"}
    assert "UP" in links["lo"]["flags"] and "UP" in links["eth0"]["flags"]
    addrs = ip_json("addr", "show", "dev", "eth0", netns=name)[0]["addr_info"]
    assert [(a["family"], a["local"], a["prefixlen"]) for a in addrs] == [("inet", str(addr), 32)]
    routes = {r["dst"]: r for r in ip_json("route", "show", netns=name)}
    assert routes[str(p.service_ip)]["scope"] == "link"
    assert routes["default"]["gateway"] == str(p.service_ip)
    assert "onlink" in routes["default"]["flags"]

    # Static neighbours both ways, with the other side's MAC.
    host_link = ip_json("-d", "link", "show", "dev", iface)[0]
    inner = ip_json("neigh", "show", "dev", "eth0", netns=name)
    assert [(n["dst"], n["lladdr"], n["state"]) for n in inner] == [
        (str(p.service_ip), host_link["address"], ["PERMANENT"])
    ]
    outer = ip_json("neigh", "show", "dev", iface)
    assert [(n["dst"], n["lladdr"], n["state"]) for n in outer] == [
        (str(addr), links["eth0"]["address"], ["PERMANENT"])
    ]

    # Host side: up, alias = sandbox id, its /32 route, no address of its own, sysctls.
    assert "UP" in host_link["flags"]
    assert host_link["ifalias"] == "sb-one"
    assert host_link["linkinfo"]["info_kind"] == "veth"
    assert ip_json("addr", "show", "dev", iface)[0]["addr_info"] == []
    assert [r["dst"] for r in ip_json("route", "show", "dev", iface)] == [str(addr)]
    expect_host = {
        f"ipv4/conf/{iface}/forwarding": "1",
        f"ipv4/conf/{iface}/rp_filter": "1",
        f"ipv4/conf/{iface}/accept_local": "0",
        f"ipv4/conf/{iface}/proxy_arp": "0",
        f"ipv6/conf/{iface}/disable_ipv6": "1",
    }
    assert {k: read_sysctl(k) for k in expect_host} == expect_host
    expect_inside = {
        "ipv6/conf/all/disable_ipv6": "1",
        "ipv6/conf/eth0/disable_ipv6": "1",
        "ipv4/ip_unprivileged_port_start": "0",
        "ipv4/ping_group_range": "0\t2147483647",
    }
    assert {k: read_sysctl(k, name) for k in expect_inside} == expect_inside

    # Rate limit on eth0 inside, out of the sandbox's reach.
    qdiscs = json.loads(
        run("ip", "netns", "exec", name, "tc", "-j", "qdisc", "show", "dev", "eth0")
    )
    assert [q["kind"] for q in qdiscs] == ["tbf"]
    assert qdiscs[0]["options"]["rate"] == 12_500_000
    assert p.list_sandboxes() == ["sb-one"]


def test_unprivileged_process_inside_reaches_the_service_address(plumbing: Plumbing) -> None:
    p = plumbing
    name = p.netns_name("sb-reach")
    p.create("sb-reach", address(p), 0)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((str(p.service_ip), 0))
    echo.settimeout(10)
    port = echo.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            data, peer = echo.recvfrom(100)
            echo.sendto(data.upper() + f" {peer[0]}".encode(), peer)

    server = threading.Thread(target=serve)
    server.start()
    # As nobody: binds a low port (ip_unprivileged_port_start) and pings through an ICMP
    # datagram socket (ping_group_range), then talks UDP to the host's service address.
    script = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 80))
s.settimeout(5)
s.sendto(b"hello", ("{p.service_ip}", {port}))
print(s.recv(100).decode())
icmp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
icmp.settimeout(5)
icmp.sendto(bytes([8, 0, 0, 0, 0, 1, 0, 1]) + b"corral", ("{p.service_ip}", 0))
print(icmp.recv(100)[0])
"""
    try:
        out = run(
            "ip", "netns", "exec", name,
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "/usr/bin/python3", "-c", script,
        )  # fmt: skip
    finally:
        server.join()
        echo.close()
    assert out.split("\n")[:2] == [f"HELLO {address(p)}", "0"]  # echo reply is ICMP type 0


def test_egress_rate_is_replaced_and_removed(plumbing: Plumbing) -> None:
    p = plumbing
    name = p.netns_name("sb-rate")
    p.create("sb-rate", address(p), 50)

    def qdisc() -> list[tuple[str, int | None]]:
        out = run("ip", "netns", "exec", name, "tc", "-j", "qdisc", "show", "dev", "eth0")
        return [(q["kind"], q.get("options", {}).get("rate")) for q in json.loads(out)]

    assert qdisc() == [("tbf", 6_250_000)]
    p.set_egress_rate("sb-rate", 8)
    assert qdisc() == [("tbf", 1_000_000)]
    p.set_egress_rate("sb-rate", 0)
    assert [kind for kind, _ in qdisc()] == ["noqueue"]
    p.set_egress_rate("sb-rate", -1)  # already unlimited: fine
    p.set_egress_rate("sb-rate", 1000)
    assert qdisc() == [("tbf", 125_000_000)]

    p.create("sb-free", address(p, 5), 0)
    out = run("ip", "netns", "exec", p.netns_name("sb-free"), "tc", "-j", "qdisc", "show")
    assert "tbf" not in out


def test_destroy_leaves_nothing_and_is_idempotent(plumbing: Plumbing) -> None:
    p = plumbing
    p.create("sb-a", address(p, 4), 10)
    p.create("sb-b", address(p, 5), 10)
    assert p.list_sandboxes() == ["sb-a", "sb-b"]
    p.destroy("sb-a")
    p.destroy("sb-a")
    assert p.list_sandboxes() == ["sb-b"]
    p.destroy("sb-b")
    p.destroy("sb-never-created")
    assert p.list_sandboxes() == []
    # Only the service interface (removed by the fixture) is left of ours.
    assert traces(p.prefix, p.subnet) == [f"link {p.service_iface}"]


def test_a_veth_whose_netns_file_is_gone_is_listed_and_destroyed(plumbing: Plumbing) -> None:
    """Reconcile's case: the netns is unmounted but a process keeps it (and the veth) alive."""
    p = plumbing
    path = p.create("sb-orphan", address(p), 10)
    holder = subprocess.Popen(["ip", "netns", "exec", p.netns_name("sb-orphan"), "sleep", "60"])
    try:
        for _ in range(100):
            if (
                os.path.exists(f"/proc/{holder.pid}/ns/net")
                and os.stat(f"/proc/{holder.pid}/ns/net").st_ino == os.stat(path).st_ino
            ):
                break
            threading.Event().wait(0.05)
        plumbing_module._remove_netns(path)
        assert not path.exists()
        assert p.list_sandboxes() == ["sb-orphan"]
        p.destroy("sb-orphan")
        assert p.list_sandboxes() == []
    finally:
        holder.kill()
        holder.wait()


def test_failed_create_leaves_nothing(plumbing: Plumbing, monkeypatch: pytest.MonkeyPatch) -> None:
    p = plumbing
    # 1. The netns name is taken: refused, and the existing netns is not touched.
    taken = p.netns_name("sb-taken")
    run("ip", "netns", "add", taken)
    try:
        with pytest.raises(RuntimeFailure, match=r"creating netns.*File exists"):
            p.create("sb-taken", address(p), 10)
        assert taken in run("ip", "netns", "list").split()
        assert not any(
            link["ifname"] == p.host_iface("sb-taken") for link in ip_json("link", "show")
        )
    finally:
        run("ip", "netns", "del", taken)

    # 2. The host interface name is taken: the new netns is removed, the interface kept.
    iface = p.host_iface("sb-clash")
    run("ip", "link", "add", iface, "type", "veth", "peer", "name", f"{p.prefix}peer")
    try:
        with pytest.raises(RuntimeFailure, match=f"creating veth {iface}.*File exists"):
            p.create("sb-clash", address(p), 10)
        assert not p.netns_path("sb-clash").exists()
        assert p.list_sandboxes() == []
        assert ip_json("link", "show", "dev", iface)[0]["ifname"] == iface
    finally:
        run("ip", "link", "del", iface)

    # 3. The last step fails: veth and netns both go.
    real = plumbing_module._egress_qdisc

    def refused(link: Any, mbit: float, *, create: bool) -> list[Any]:
        return real(link._replace(ifindex=999_999), 10, create=create)  # no such link

    monkeypatch.setattr(plumbing_module, "_egress_qdisc", refused)
    with pytest.raises(RuntimeFailure, match=r"configuring the sandbox side.*No such device"):
        p.create("sb-late", address(p), 10)
    monkeypatch.undo()
    assert p.list_sandboxes() == []
    assert traces(p.prefix, p.subnet) == [f"link {p.service_iface}"]


def test_bad_input_is_refused_before_touching_the_host(plumbing: Plumbing) -> None:
    p = plumbing
    with pytest.raises(InvalidRequestError, match=r"198\.51\.100\.9 must be a host address"):
        p.create("sb-x", IPv4Address("198.51.100.9"), 10)
    with pytest.raises(InvalidRequestError, match="must be a host address"):
        p.create("sb-x", p.subnet.network_address, 10)
    with pytest.raises(InvalidRequestError, match="service address"):
        p.create("sb-x", p.service_ip, 10)
    with pytest.raises(InvalidRequestError, match="cannot name"):
        p.create("../etc", address(p), 10)
    with pytest.raises(InvalidRequestError, match="prefix"):
        Plumbing(prefix="toolong", subnet=p.subnet, service_ip=p.service_ip)
    assert p.list_sandboxes() == []


def test_service_interface_is_idempotent(plumbing: Plumbing) -> None:
    p = plumbing
    p.ensure_service_iface()  # the fixture made it already
    link = ip_json("-d", "addr", "show", "dev", p.service_iface)[0]
    assert link["linkinfo"]["info_kind"] in ("dummy", "ifb")  # ifb where the kernel lacks dummy
    assert "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]] == [(str(p.service_ip), 32)]
    p.remove_service_iface()
    p.remove_service_iface()
    assert not any(link["ifname"] == p.service_iface for link in ip_json("link", "show"))
    p.ensure_service_iface()
