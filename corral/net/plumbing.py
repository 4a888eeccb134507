"""Per-sandbox network plumbing: a named netns, a veth pair into it, addresses, routes, tc.

Layout for one sandbox (no bridge, so sandboxes share no L2 segment)::

    host                                   netns corral-<prefix>-<id>
    <prefix><hash> (no address) ---veth--- eth0  <address>/32
      route <address>/32                     route <service_ip>/32 scope link
      neigh <address> -> eth0 MAC            default via <service_ip> onlink
                                             neigh <service_ip> -> host veth MAC
                                             qdisc tbf (egress rate limit)

The service address lives on a host interface of its own (``<prefix>svc``). Static neighbour
entries both ways mean no ARP is needed. The netns belongs to the host's initial user
namespace, so the sandbox's root holds no CAP_NET_ADMIN over it and cannot change any of this.

Netlink messages are built with pyroute2's message classes and sent in batches on plain
NETLINK_ROUTE sockets: pyroute2's request API costs ~0.4 ms per request, which would eat the
whole create budget. A netlink socket stays in the netns it was opened in, so only opening one
needs a thread inside the sandbox's netns; such threads are fresh and die right after, so no
pooled thread is ever left in another netns.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.ndmsg import ndmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.rtmsg import rtmsg  # type: ignore[import-untyped]
from pyroute2.netlink.rtnl.tcmsg import sched_tbf, tcmsg  # type: ignore[import-untyped]

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.host.syscalls import libc, unshare

__all__ = ["NETNS_DIR", "Plumbing"]

NETNS_DIR = Path("/run/netns")

_T = TypeVar("_T")

# Netlink and rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h).
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLM_F_REPLACE = 0x100
_NLM_F_EXCL = 0x200
_NLM_F_CREATE = 0x400
_NLM_F_ACK_TLVS = 0x200
_NLMSGERR_ATTR_MSG = 1
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK, _RTM_SETLINK = 16, 17, 18, 19
_RTM_NEWADDR = 20
_RTM_NEWROUTE = 24
_RTM_NEWNEIGH = 28
_RTM_NEWQDISC, _RTM_DELQDISC = 36, 37
_IFF_UP = 0x1
_LOOPBACK_IFINDEX = 1  # fixed by the kernel in every netns
_RT_TABLE_MAIN = 254
_RTPROT_STATIC = 4
_RT_SCOPE_UNIVERSE, _RT_SCOPE_LINK = 0, 253
_RTN_UNICAST = 1
_RTNH_F_ONLINK = 0x4
_NUD_PERMANENT = 0x80
_TC_H_ROOT = 0xFFFFFFFF
_NETLINK_TIMEOUT = 10.0  # seconds; the kernel answers at once, this only bounds a bug
_SIOCGIFINDEX = 0x8933
_IFREQ = struct.Struct("16si20x")  # struct ifreq: name, then ifr_ifindex in the 24-byte union

_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 0x2

# tbf takes its rate as 32-bit bytes/s here (pyroute2 does not encode TCA_TBF_RATE64).
_MAX_TBF_RATE = 2**32 - 1
_MIN_BURST = 32 * 1024
_LATENCY = "50ms"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,4}")

# Inside the sandbox's netns, before its eth0 exists (so eth0 is born without IPv6).
_NETNS_SYSCTLS: tuple[tuple[str, str], ...] = (
    # IPv6 is off in sandboxes for now; "default" covers eth0, created after this.
    ("ipv6/conf/all/disable_ipv6", "1"),
    ("ipv6/conf/default/disable_ipv6", "1"),
    # The sandbox's root has no CAP_NET_BIND_SERVICE over a netns owned by the host's user
    # namespace; let it bind low ports anyway.
    ("ipv4/ip_unprivileged_port_start", "0"),
    # ICMP echo through datagram sockets, since it has no CAP_NET_RAW either.
    ("ipv4/ping_group_range", "0 2147483647"),
)


def _host_iface_sysctls(iface: str) -> tuple[tuple[str, str], ...]:
    return (
        (f"ipv6/conf/{iface}/disable_ipv6", "1"),
        (f"ipv4/conf/{iface}/forwarding", "1"),
        # Strict reverse-path check: a forged source address is dropped before nft sees it.
        (f"ipv4/conf/{iface}/rp_filter", "1"),
        (f"ipv4/conf/{iface}/accept_local", "0"),
        (f"ipv4/conf/{iface}/proxy_arp", "0"),
    )


class Plumbing:
    """Creates and removes the host-side network objects of sandboxes; every method is sync."""

    def __init__(self, *, prefix: str, subnet: IPv4Network, service_ip: IPv4Address) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise InvalidRequestError(
                f"network prefix {prefix!r} must be 1 to 5 lowercase letters or digits"
            )
        if service_ip not in subnet:
            raise InvalidRequestError(f"service address {service_ip} is not in {subnet}")
        self.prefix = prefix
        self.subnet = subnet
        self.service_ip = service_ip
        self.service_iface = f"{prefix}svc"
        self._iface_re = re.compile(re.escape(prefix) + r"[0-9a-f]{10}")
        self._netns_dir_ready = False
        self._netns_dir_lock = threading.Lock()

    # ------------------------------------------------------------------ names

    def netns_name(self, sandbox_id: str) -> str:
        return f"corral-{self.prefix}-{sandbox_id}"

    def netns_path(self, sandbox_id: str) -> Path:
        return NETNS_DIR / self.netns_name(_checked_id(sandbox_id))

    def host_iface(self, sandbox_id: str) -> str:
        return self.prefix + hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]

    # ------------------------------------------------------------------ service interface

    def ensure_service_iface(self) -> None:
        """The host interface holding the service address, up; creates what is missing."""
        name = self.service_iface
        try:
            with _Rtnl() as host:
                if _if_index(name) is None:
                    _create_service_link(host, name)
                link = _host_link(name)
                _write_sysctls([(f"ipv6/conf/{name}/disable_ipv6", "1")])
                host.call(_address(link, self.service_ip, replace=True), _link_up(link))
        except OSError as exc:
            raise RuntimeFailure(f"setting up service interface {name} failed: {exc}") from exc

    def remove_service_iface(self) -> None:
        try:
            with _Rtnl() as host:
                host.call(_delete_link(self.service_iface), ignore=(errno.ENODEV,))
        except OSError as exc:
            raise RuntimeFailure(
                f"removing service interface {self.service_iface} failed: {exc}"
            ) from exc

    # ------------------------------------------------------------------ sandboxes

    def create(
        self,
        sandbox_id: str,
        address: IPv4Address,
        egress_mbit: float,
        join: Path | None = None,
    ) -> Path:
        """Plumb one sandbox and return its netns path (for runc); leaves nothing on failure.

        ``join``: an existing network namespace to adopt (e.g. ``/proc/self/fd/N`` of one the
        runtime made inside the sandbox's user namespace) instead of a new one.
        """
        path = self.netns_path(sandbox_id)
        self._check_address(address)
        iface = self.host_iface(sandbox_id)
        host_mac, sandbox_mac = _random_mac(), _random_mac()
        made_netns = made_veth = False
        step = f"creating netns {path.name}"
        try:
            self._prepare_netns_dir()
            ns_sock = _on_fresh_thread(lambda: _new_netns(path, join))
            made_netns = True
            with _Rtnl(ns_sock) as ns, _Rtnl() as host:
                step = f"creating veth {iface}"
                nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    host.call(_new_veth(iface, host_mac, sandbox_mac, nsfd))
                finally:
                    os.close(nsfd)
                made_veth = True
                outside = _host_link(iface)
                step = f"setting sysctls of {iface}"
                _write_sysctls(_host_iface_sysctls(iface))
                step = f"configuring {iface}"
                host.call(
                    _link_up(outside, alias=sandbox_id),
                    _neighbour(outside, address, sandbox_mac),
                    _route(address, outside),
                )
                step = "configuring the sandbox side"
                eth0 = ns.link("eth0")
                ns.call(
                    _link_up(_Link(_LOOPBACK_IFINDEX, "lo")),
                    _address(eth0, address),
                    _link_up(eth0),
                    _route(self.service_ip, eth0),
                    _route(None, eth0, gateway=self.service_ip),
                    _neighbour(eth0, self.service_ip, host_mac),
                    *_egress_qdisc(eth0, egress_mbit, create=True),
                )
        except BaseException as exc:
            undo: list[str] = []
            if made_veth:
                undo += _attempt(f"delete veth {iface}", lambda: _delete_link_now(iface))
            if made_netns:
                undo += _attempt(f"remove netns {path.name}", lambda: _remove_netns(path))
            if not isinstance(exc, Exception):
                raise
            message = f"network setup of sandbox {sandbox_id} failed {step}: {exc}"
            if undo:
                message += "; cleanup also failed: " + "; ".join(undo)
            raise RuntimeFailure(message) from exc
        return path

    def destroy(self, sandbox_id: str) -> None:
        """Remove the sandbox's veth and netns; idempotent, and every step runs."""
        path = self.netns_path(sandbox_id)
        iface = self.host_iface(sandbox_id)
        failures = _attempt(f"delete veth {iface}", lambda: _delete_link_now(iface))
        failures += _attempt(f"remove netns {path.name}", lambda: _remove_netns(path))
        if failures:
            raise RuntimeFailure(
                f"network teardown of sandbox {sandbox_id} failed: " + "; ".join(failures)
            )

    def set_egress_rate(self, sandbox_id: str, mbit: float) -> None:
        """Replace the sandbox's egress rate limit; ``mbit <= 0`` removes it."""
        path = self.netns_path(sandbox_id)
        try:
            ns_sock = _on_fresh_thread(lambda: _socket_in_netns(path))
            with _Rtnl(ns_sock) as ns:
                eth0 = ns.link("eth0")
                messages = _egress_qdisc(eth0, mbit, create=False)
                if messages:
                    ns.call(*messages)
                else:
                    ns.call(_delete_root_qdisc(eth0), ignore=(errno.ENOENT,))
        except OSError as exc:
            raise RuntimeFailure(
                f"setting the egress rate of sandbox {sandbox_id} failed: {exc}"
            ) from exc

    def list_sandboxes(self) -> list[str]:
        """Ids with a netns of ours, plus ids of our host veths whose netns file is gone."""
        ids: set[str] = set()
        head = f"corral-{self.prefix}-"
        try:
            with contextlib.suppress(FileNotFoundError):
                ids.update(
                    name[len(head) :] for name in os.listdir(NETNS_DIR) if name.startswith(head)
                )
            with _Rtnl() as host:
                for link in host.dump_links():
                    name = link.get_attr("IFLA_IFNAME")
                    alias = link.get_attr("IFLA_IFALIAS")
                    info = link.get_attr("IFLA_LINKINFO")
                    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
                    if kind == "veth" and alias and self._iface_re.fullmatch(name or ""):
                        ids.add(alias)
        except OSError as exc:
            raise RuntimeFailure(f"listing sandbox networks failed: {exc}") from exc
        return sorted(ids)

    # ------------------------------------------------------------------ helpers

    def _check_address(self, address: IPv4Address) -> None:
        if (
            address not in self.subnet
            or address == self.service_ip
            or address in (self.subnet.network_address, self.subnet.broadcast_address)
        ):
            raise InvalidRequestError(
                f"sandbox address {address} must be a host address of {self.subnet} "
                f"other than the service address {self.service_ip}"
            )

    def _prepare_netns_dir(self) -> None:
        # As iproute2 does: /run/netns is a shared mount, so unmounting a netns there also
        # unmounts the copies other mount namespaces took, which would keep it alive.
        with self._netns_dir_lock:
            if not self._netns_dir_ready:
                _share_netns_dir(NETNS_DIR)
                self._netns_dir_ready = True


# ---------------------------------------------------------------------- netns and threads


def _checked_id(sandbox_id: str) -> str:
    if not _ID.fullmatch(sandbox_id):
        raise InvalidRequestError(f"sandbox id {sandbox_id!r} cannot name a network namespace")
    return sandbox_id


def _on_fresh_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on a new thread that ends with it, so a namespace switch dies with it."""
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name="corral-netns", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _libc_call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _share_netns_dir(directory: Path) -> None:
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    c = libc.get()
    path = bytes(directory)
    if c.mount(b"", path, b"none", _MS_SHARED | _MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:
        _libc_call(-1, f"making {directory} a shared mount")
    # Not a mount point yet: bind it onto itself first.
    _libc_call(c.mount(path, path, b"none", _MS_BIND | _MS_REC, None), f"bind-mounting {directory}")
    _libc_call(
        c.mount(b"", path, b"none", _MS_SHARED | _MS_REC, None),
        f"making {directory} a shared mount",
    )


def _new_netns(path: Path, join: Path | None = None) -> socket.socket:
    """On a throwaway thread: a new (or the ``join``ed) netns bound at ``path``, set up; a
    netlink socket in it."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    os.close(fd)
    try:
        c = libc.get()
        if join is None:
            unshare(_CLONE_NEWNET)
        else:
            joined = os.open(join, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _libc_call(c.setns(joined, _CLONE_NEWNET), f"entering netns {join}")
            finally:
                os.close(joined)
        # thread-self, not self: only this thread is in the new netns.
        _libc_call(
            c.mount(b"/proc/thread-self/ns/net", bytes(path), b"none", _MS_BIND, None),
            f"binding the netns to {path}",
        )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        # /proc/sys/net shows the netns of the thread that opens it.
        _write_sysctls(_NETNS_SYSCTLS)
        return _open_rtnl_socket()
    except BaseException:
        _remove_netns(path)
        raise


def _socket_in_netns(path: Path) -> socket.socket:
    """On a throwaway thread: a netlink socket in the netns bound at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        c = libc.get()
        _libc_call(c.setns(fd, _CLONE_NEWNET), f"entering netns {path.name}")
    finally:
        os.close(fd)
    return _open_rtnl_socket()


def _remove_netns(path: Path) -> None:
    if libc.get().umount2(bytes(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        # EINVAL: not a mount point (already unmounted); ENOENT: already gone.
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"unmounting {path}: {os.strerror(err)}")
    path.unlink(missing_ok=True)


def _write_sysctls(values: Iterable[tuple[str, str]]) -> None:
    have_ipv6 = os.path.isdir("/proc/sys/net/ipv6")
    for key, value in values:
        if key.startswith("ipv6/") and not have_ipv6:
            continue  # a kernel without IPv6 has it off already
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(value)


def _attempt(what: str, fn: Callable[[], None]) -> list[str]:
    try:
        fn()
    except Exception as exc:
        return [f"{what}: {exc}"]
    return []


def _delete_link_now(name: str) -> None:
    with _Rtnl() as host:
        host.call(_delete_link(name), ignore=(errno.ENODEV,))


def _if_index(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _host_link(name: str) -> _Link:
    index = _if_index(name)
    if index is None:
        raise _NetlinkError(errno.ENODEV, f"{name} vanished right after creation")
    return _Link(index, name)


def _random_mac() -> str:
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)


def _create_service_link(host: _Rtnl, name: str) -> None:
    # Some kernels are built without the dummy driver; an ifb device holds an address as well
    # and nothing is ever routed out of it.
    for kind in ("dummy", "ifb"):
        try:
            host.call(_new_link(name, kind), ignore=(errno.EEXIST,))
            return
        except _NetlinkError as exc:
            if exc.errno != errno.EOPNOTSUPP or kind == "ifb":
                raise


# ---------------------------------------------------------------------- netlink


class _NetlinkError(OSError):
    pass


class _Link(NamedTuple):
    ifindex: int
    name: str


class _Message:
    """One rtnetlink request: an unencoded pyroute2 message, its type, flags and a label."""

    def __init__(self, label: str, msg: Any, msg_type: int, flags: int) -> None:
        self.label = label
        self.msg = msg
        self.type = msg_type
        self.flags = flags


def _open_rtnl_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 0)
    try:
        sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
        sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(_NETLINK_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


class _Rtnl:
    """A NETLINK_ROUTE socket (in the netns it was opened in); requests go out in one write."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self._sock = sock if sock is not None else _open_rtnl_socket()
        self._seq = 0

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sock.close()

    def link(self, name: str) -> _Link:
        # Device ioctls on any socket act in that socket's netns; cheaper than an RTM_GETLINK.
        out = fcntl.ioctl(self._sock.fileno(), _SIOCGIFINDEX, _IFREQ.pack(name.encode(), 0))
        return _Link(_IFREQ.unpack(out)[1], name)

    def call(self, *messages: _Message, ignore: Sequence[int] = ()) -> None:
        """Send ``messages`` at once; raise for the first one the kernel refused."""
        labels: dict[int, str] = {}
        batch = bytearray()
        for m in messages:
            self._seq += 1
            labels[self._seq] = m.label
            m.msg["header"]["type"] = m.type
            m.msg["header"]["flags"] = _NLM_F_REQUEST | _NLM_F_ACK | m.flags
            m.msg["header"]["sequence_number"] = self._seq
            m.msg.encode()
            batch += m.msg.data
        self._sock.send(batch)
        failed: tuple[int, int, str] | None = None
        while labels:
            data = self._sock.recv(65536)
            for msg_type, flags, seq, body in _split(data):
                if msg_type != _NLMSG_ERROR or seq not in labels:
                    continue
                label = labels.pop(seq)
                (code,) = struct.unpack_from("i", body)
                if code == 0 or -code in ignore:
                    continue
                if failed is None or seq < failed[0]:
                    failed = (seq, -code, f"{label}: {os.strerror(-code)}{_ext_ack(flags, body)}")
        if failed is not None:
            raise _NetlinkError(failed[1], failed[2])

    def dump_links(self) -> list[Any]:
        msg = ifinfmsg()
        self._seq += 1
        msg["header"]["type"] = _RTM_GETLINK
        msg["header"]["flags"] = _NLM_F_REQUEST | _NLM_F_DUMP
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self._sock.send(msg.data)
        links: list[Any] = []
        while True:
            data = self._sock.recv(1 << 20)
            for msg_type, _flags, seq, body in _split(data, keep_header=True):
                if seq != self._seq:
                    continue
                if msg_type == _NLMSG_DONE:
                    return links
                if msg_type == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("i", body, 16)
                    raise _NetlinkError(-code, f"listing links: {os.strerror(-code)}")
                link = ifinfmsg(body)
                link.decode()
                links.append(link)


def _split(data: bytes, keep_header: bool = False) -> list[tuple[int, int, int, bytes]]:
    out = []
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type, flags, seq, _pid = struct.unpack_from("IHHII", data, offset)
        if length < 16:
            break
        start = offset if keep_header else offset + 16
        out.append((msg_type, flags, seq, bytes(data[start : offset + length])))
        offset += (length + 3) & ~3
    return out


def _ext_ack(flags: int, body: bytes) -> str:
    """The kernel's extended-ack text, if any ("Invalid prefsrc address" and the like)."""
    if not flags & _NLM_F_ACK_TLVS:
        return ""
    offset = 4 + 16  # error code, then the (capped) header of the refused request
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("HH", body, offset)
        if length < 4:
            break
        if kind == _NLMSGERR_ATTR_MSG:
            text = body[offset + 4 : offset + length].split(b"\0", 1)[0]
            return f" ({text.decode(errors='replace')})"
        offset += (length + 3) & ~3
    return ""


def _new_veth(iface: str, host_mac: str, peer_mac: str, nsfd: int) -> _Message:
    # The peer is born in the sandbox's netns as eth0: no move, no rename.
    peer = {
        "attrs": [
            ("IFLA_IFNAME", "eth0"),
            ("IFLA_ADDRESS", peer_mac),
            ("IFLA_NET_NS_FD", nsfd),
        ]
    }
    msg = ifinfmsg()
    msg["attrs"] = [
        ("IFLA_IFNAME", iface),
        ("IFLA_ADDRESS", host_mac),
        (
            "IFLA_LINKINFO",
            {
                "attrs": [
                    ("IFLA_INFO_KIND", "veth"),
                    ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]}),
                ]
            },
        ),
    ]
    return _Message(f"create veth {iface}", msg, _RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL)


def _new_link(name: str, kind: str) -> _Message:
    msg = ifinfmsg()
    msg["attrs"] = [
        ("IFLA_IFNAME", name),
        ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", kind)]}),
    ]
    return _Message(f"create {kind} {name}", msg, _RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL)


def _delete_link(name: str) -> _Message:
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_IFNAME", name)]
    return _Message(f"delete link {name}", msg, _RTM_DELLINK, 0)


def _link_up(link: _Link, alias: str | None = None) -> _Message:
    msg = ifinfmsg()
    msg["index"] = link.ifindex
    msg["flags"] = _IFF_UP
    msg["change"] = _IFF_UP
    msg["attrs"] = [("IFLA_IFALIAS", alias)] if alias is not None else []
    return _Message(f"bring up {link.name}", msg, _RTM_SETLINK, 0)


def _address(link: _Link, address: IPv4Address, replace: bool = False) -> _Message:
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET
    msg["prefixlen"] = 32
    msg["index"] = link.ifindex
    msg["attrs"] = [("IFA_LOCAL", str(address)), ("IFA_ADDRESS", str(address))]
    flags = _NLM_F_CREATE | (_NLM_F_REPLACE if replace else _NLM_F_EXCL)
    return _Message(f"add address {address}/32 to {link.name}", msg, _RTM_NEWADDR, flags)


def _route(dst: IPv4Address | None, link: _Link, gateway: IPv4Address | None = None) -> _Message:
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["dst_len"] = 32 if dst is not None else 0
    msg["table"] = _RT_TABLE_MAIN
    msg["proto"] = _RTPROT_STATIC
    msg["type"] = _RTN_UNICAST
    attrs: list[tuple[str, Any]] = [("RTA_OIF", link.ifindex)]
    if dst is not None:
        attrs.append(("RTA_DST", str(dst)))
    if gateway is not None:
        # onlink: the gateway is reachable on eth0 whatever the addresses say.
        msg["flags"] = _RTNH_F_ONLINK
        msg["scope"] = _RT_SCOPE_UNIVERSE
        attrs.append(("RTA_GATEWAY", str(gateway)))
    else:
        msg["scope"] = _RT_SCOPE_LINK
    msg["attrs"] = attrs
    label = f"add route {dst or 'default'}" + (f" via {gateway}" if gateway else "")
    return _Message(f"{label} dev {link.name}", msg, _RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_EXCL)


def _neighbour(link: _Link, address: IPv4Address, mac: str) -> _Message:
    msg = ndmsg()
    msg["family"] = socket.AF_INET
    msg["ifindex"] = link.ifindex
    msg["state"] = _NUD_PERMANENT
    msg["attrs"] = [("NDA_DST", str(address)), ("NDA_LLADDR", mac)]
    return _Message(
        f"add neighbour {address} on {link.name}",
        msg,
        _RTM_NEWNEIGH,
        _NLM_F_CREATE | _NLM_F_REPLACE,
    )


def _egress_qdisc(link: _Link, mbit: float, *, create: bool) -> list[_Message]:
    """A tbf root qdisc limiting egress to ``mbit``; none when unlimited."""
    rate = int(mbit * 125_000)  # bytes per second
    if rate <= 0 or rate > _MAX_TBF_RATE:
        return []
    # At least one tick's worth at HZ=100 and never under 32 KiB, so bursts do not starve.
    burst = max(_MIN_BURST, rate // 100)
    msg = tcmsg()
    msg["index"] = link.ifindex
    msg["handle"] = 0x10000  # 1:
    msg["parent"] = _TC_H_ROOT
    msg["attrs"] = [
        ("TCA_KIND", "tbf"),
        (
            "TCA_OPTIONS",
            sched_tbf.get_parameters({"rate": rate, "burst": burst, "latency": _LATENCY}),
        ),
    ]
    flags = _NLM_F_CREATE | (_NLM_F_EXCL if create else _NLM_F_REPLACE)
    return [_Message(f"set egress rate {mbit} mbit on {link.name}", msg, _RTM_NEWQDISC, flags)]


def _delete_root_qdisc(link: _Link) -> _Message:
    msg = tcmsg()
    msg["index"] = link.ifindex
    msg["parent"] = _TC_H_ROOT
    msg["attrs"] = []
    return _Message(f"remove the egress rate limit on {link.name}", msg, _RTM_DELQDISC, 0)
