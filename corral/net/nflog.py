"""The forward chain's decisions about sandboxes' UDP and ICMP, read from NFLOG into the egress log.

The firewall logs the first packet of each non-TCP flow it lets through and every refused one
(rate-limited per sandbox) to one NFLOG group, with a prefix saying what it decided
(:data:`~corral.net.firewall.LOG_ALLOW` and the others). :class:`NflogListener` binds that group
on a plain ``NETLINK_NETFILTER`` socket in the host's network namespace, reads the first bytes
of each packet (IPv4 header plus UDP or ICMP header) and turns it into an :class:`EgressEvent`
for the sandbox owning the source address, which the firewall's anti-spoofing pins to the
sandbox. Packets from any other address, of other protocols, or that do not parse are counted
and skipped: nothing a sandbox sends can stop the listener.

The reason comes from the sandbox's current policy when that agrees with the firewall (so it
names the rule, as the resolver's and the proxy's reasons do), else a generic one: the policy
may have changed between the packet and the reading.

Only the group is bound. ``NFULNL_CFG_CMD_PF_BIND``/``PF_UNBIND``, which old libnetfilter_log
examples send first, choose the host's default logger for plain ``log`` rules of every table;
``log group N`` needs neither, so corral leaves that host setting alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Literal, NamedTuple

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.net.firewall import LOG_ALLOW, LOG_DENY, LOG_NEVER
from corral.net.view import EgressEvent, EventSink, NetRegistry

__all__ = ["LoggedPacket", "NflogListener", "parse_batch"]

log = logging.getLogger("corral.network")

# linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_log.h
_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max; not in the socket module
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_ULOG = 4 << 8  # NFNL_SUBSYS_ULOG in the message type's high byte
_MSG_PACKET = _ULOG | 0
_MSG_CONFIG = _ULOG | 1
_CFG_CMD, _CFG_MODE, _CFG_TIMEOUT, _CFG_QTHRESH = 1, 2, 4, 5
_CMD_BIND, _CMD_UNBIND = 1, 2
_COPY_PACKET = 2
_ATTR_PAYLOAD, _ATTR_PREFIX = 9, 10
_NFPROTO_IPV4 = 2

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big endian)
_ATTR = struct.Struct("=HH")

# The longest IPv4 header (60 bytes, with options) and the UDP or ICMP header after it.
_COPY_RANGE = 80
# The kernel sends a batch when this many packets are queued or after this many 1/100 s: a
# flood costs few reads, and a single packet reaches the log within 0.1 s.
_QUEUE_THRESHOLD = 32
_FLUSH_TIMEOUT = 10
_RCVBUF = 1 << 20
_READ_SIZE = 1 << 17  # above the largest batch the kernel builds (128 KiB)
_READS_PER_WAKEUP = 64  # then let other callbacks run
_WARN_INTERVAL_S = 60.0
_NETLINK_TIMEOUT_S = 5.0  # the kernel answers configuration at once; this only bounds a bug

_REASONS: dict[str, tuple[Literal["allow", "deny"], str]] = {
    LOG_ALLOW: ("allow", "allow rule (cidr)"),
    LOG_DENY: ("deny", "not allowed by any CIDR rule"),
    LOG_NEVER: ("deny", "never reachable"),
}
_ICMP_TYPES = {
    0: "echo-reply",
    3: "destination-unreachable",
    5: "redirect",
    8: "echo-request",
    11: "time-exceeded",
    12: "parameter-problem",
    13: "timestamp-request",
    14: "timestamp-reply",
}


class LoggedPacket(NamedTuple):
    """What one NFLOG message says about an IPv4 UDP or ICMP packet."""

    prefix: str
    src: IPv4Address
    dst: IPv4Address
    protocol: Literal["udp", "icmp"]
    port: int | None  # UDP destination port (None for ICMP and non-first fragments)
    icmp_type: int | None


def parse_batch(data: bytes, group: int | None = None) -> Iterator[LoggedPacket]:
    """The IPv4 UDP and ICMP packets in one read from an NFLOG socket (of ``group``, if given).

    Anything else (other message types, groups, families or protocols, truncated or malformed
    messages) is skipped; malformed input never raises.
    """
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            return
        if msg_type == _MSG_PACKET and length >= _HEADER.size + _NFGEN.size:
            family, _version, res_id = _NFGEN.unpack_from(data, offset + _HEADER.size)
            if family == _NFPROTO_IPV4 and (group is None or socket.ntohs(res_id) == group):
                packet = _packet(data, offset + _HEADER.size + _NFGEN.size, offset + length)
                if packet is not None:
                    yield packet
        offset += (length + 3) & ~3


def _packet(data: bytes, start: int, end: int) -> LoggedPacket | None:
    prefix: str | None = None
    payload: bytes | None = None
    while start + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < _ATTR.size or start + length > end:
            return None
        value = data[start + _ATTR.size : start + length]
        kind &= _NLA_TYPE_MASK
        if kind == _ATTR_PREFIX:
            prefix = value.split(b"\0", 1)[0].decode("ascii", errors="replace")
        elif kind == _ATTR_PAYLOAD:
            payload = value
        start += (length + 3) & ~3
    if prefix is None or payload is None:
        return None
    return _ipv4(prefix, payload)


def _ipv4(prefix: str, ip: bytes) -> LoggedPacket | None:
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    header = (ip[0] & 0x0F) * 4
    if header < 20:
        return None
    protocol = ip[9]
    src, dst = IPv4Address(ip[12:16]), IPv4Address(ip[16:20])
    # Only the first fragment carries the UDP or ICMP header (conntrack reassembles before the
    # forward hook, so fragments are rare here).
    first = (ip[6] & 0x1F) == 0 and ip[7] == 0
    l4 = ip[header:] if first else b""
    if protocol == socket.IPPROTO_UDP:
        port = int.from_bytes(l4[2:4], "big") if len(l4) >= 4 else None
        return LoggedPacket(prefix, src, dst, "udp", port, None)
    if protocol == socket.IPPROTO_ICMP:
        return LoggedPacket(prefix, src, dst, "icmp", None, l4[0] if l4 else None)
    return None


class NflogListener:
    """Reads one NFLOG group and writes a sandbox's logged UDP and ICMP packets to ``sink``."""

    def __init__(self, group: int, registry: NetRegistry, sink: EventSink) -> None:
        if not 0 < group <= 0xFFFF:
            raise InvalidRequestError(f"NFLOG group {group} is not between 1 and 65535")
        self.group = group
        self._registry = registry
        self._sink = sink
        self._sock: socket.socket | None = None
        self._seq = 0
        # Counters for logs and tests: batches lost because reading fell behind (ENOBUFS),
        # packets of no registered sandbox, and messages that did not parse or were not ours.
        self.overruns = 0
        self.unknown_source = 0
        self.skipped = 0
        self._warned_at = 0.0

    async def start(self) -> None:
        """Bind the group; ``RuntimeFailure`` when the kernel refuses (in use, no NFLOG)."""
        if self._sock is not None:
            return
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
            )
        except OSError as exc:
            raise RuntimeFailure(f"cannot open an NFLOG socket: {exc}") from exc
        try:
            sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, 0))
            sock.settimeout(_NETLINK_TIMEOUT_S)
            self._configure(
                sock,
                _attr(_CFG_CMD, bytes([_CMD_BIND]))
                + _attr(_CFG_MODE, struct.pack(">IBB", _COPY_RANGE, _COPY_PACKET, 0))
                + _attr(_CFG_QTHRESH, struct.pack(">I", _QUEUE_THRESHOLD))
                + _attr(_CFG_TIMEOUT, struct.pack(">I", _FLUSH_TIMEOUT)),
            )
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EBUSY, errno.EPERM):
                raise RuntimeFailure(
                    f"NFLOG group {self.group} is already bound by another process (or this "
                    "one lacks CAP_NET_ADMIN); choose another network.nflog_group"
                ) from exc
            raise RuntimeFailure(f"binding NFLOG group {self.group} failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    async def stop(self) -> None:
        """Unbind the group and close; idempotent. Packets still queued are not read."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(ValueError, RuntimeError):  # closed fd, closed loop
            asyncio.get_running_loop().remove_reader(sock.fileno())
        try:
            # The kernel handles the request inside send(); closing the socket would free the
            # group anyway, this makes it explicit. The acknowledgement is not waited for.
            self._seq += 1
            sock.send(self._message(_attr(_CFG_CMD, bytes([_CMD_UNBIND])), _NLM_F_REQUEST))
        except OSError as exc:
            log.debug("unbinding NFLOG group %d: %s", self.group, exc)
        finally:
            sock.close()

    # ------------------------------------------------------------------ netlink

    def _message(self, attrs: bytes, flags: int) -> bytes:
        body = _NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(self.group)) + attrs
        return _HEADER.pack(_HEADER.size + len(body), _MSG_CONFIG, flags, self._seq, 0) + body

    def _configure(self, sock: socket.socket, attrs: bytes) -> None:
        """Send one configuration message and wait for its acknowledgement (OSError if refused)."""
        self._seq += 1
        sock.send(self._message(attrs, _NLM_F_REQUEST | _NLM_F_ACK))
        while True:
            data = sock.recv(_READ_SIZE)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, msg_type, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    break
                if msg_type == _NLMSG_ERROR and seq == self._seq and length >= _HEADER.size + 4:
                    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return
                offset += (length + 3) & ~3

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = sock.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped what did not fit; what follows is fine.
                    self.overruns += 1
                    self._warn()
                    continue
                log.warning("reading NFLOG group %d: %s", self.group, exc)
                return
            try:
                self._handle(data)
            except Exception:  # a bug here must not stop the log; the packet is lost
                self.skipped += 1
                log.exception("NFLOG group %d: cannot handle a message", self.group)

    def _handle(self, data: bytes) -> None:
        for packet in parse_batch(data, self.group):
            reading = _REASONS.get(packet.prefix)
            if reading is None:
                self.skipped += 1
                continue
            net = self._registry.lookup(packet.src)
            if net is None:
                self.unknown_source += 1
                continue
            decision, reason = reading
            try:
                verdict = net.policy.check_ip(packet.dst, packet.port, packet.protocol)
            except Exception:  # the reason is a nicety; the firewall's decision stands
                verdict = None
            if verdict is not None and verdict.allowed == (decision == "allow"):
                reason = verdict.reason
            if packet.icmp_type is not None:
                name = _ICMP_TYPES.get(packet.icmp_type, f"type {packet.icmp_type}")
                reason = f"{reason} (icmp {name})"
            self._sink(
                EgressEvent(
                    sandbox_id=net.sandbox_id,
                    kind=packet.protocol,
                    decision=decision,
                    reason=reason,
                    ip=str(packet.dst),
                    port=packet.port,
                )
            )

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_INTERVAL_S:
            self._warned_at = now
            log.warning(
                "NFLOG group %d: the kernel dropped log messages (%d times so far); "
                "some UDP/ICMP decisions are missing from the egress log",
                self.group,
                self.overruns,
            )


def _attr(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (-length % 4)
