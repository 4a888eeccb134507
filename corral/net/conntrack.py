"""Conntrack housekeeping for sandboxes: forget a sandbox's tracked flows, cap how many it holds.

Forgetting flows: the forward chain accepts ``ct state established`` before any policy rule, so
a UDP or ICMP flow that an old policy let through keeps going under a narrower one until its
conntrack entry times out. :func:`forget_flows` deletes every entry whose original source is the
sandbox's address; the flow's next packet is new again and meets the current rules.

It speaks ctnetlink (NETLINK_NETFILTER) on a plain socket: one dump filtered in the kernel by
source address (``CTA_FILTER``, Linux >= 5.8; the source is checked again here, so a kernel that
ignores the filter only costs time), then the deletions written in a few large batches. The
deletions reuse each entry's tuple, id and zone attributes exactly as the dump returned them: no
decoding or re-encoding per entry, and an entry that was replaced in between (same tuple, new
id) is left alone. For 1000 entries this takes ~20 ms, most of it the kernel walking its whole
hash table for the dump; pyroute2's ``Conntrack`` (one request per deletion through its event
loop) takes ~750 ms. The kernel's filtered flush (``IPCTNL_MSG_CT_DELETE`` with ``CTA_FILTER``,
recent kernels only) takes one message but cannot say how many entries it removed.

Flow cap: :func:`flow_cap_set` and :func:`flow_cap_rules` are nft JSON for corral's table that
refuse a sandbox's new flows once it holds ``limit`` tracked ones, so one sandbox cannot fill the
host's conntrack table (which would stop every other sandbox and the host from opening
connections). Flows are counted per sandbox interface: prerouting runs before the reverse-path
filter and the anti-spoof rules, so an interface is the one identity there that a sandbox cannot
forge, and forged sources can neither slip past the cap nor fill the set.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any

from pyroute2.netlink.nfnetlink.nfctsocket import (  # type: ignore[import-untyped]
    FILTER_FLAG_CTA_IP_SRC,
    NFCTAttrTuple,
    nfct_msg,
)

from corral.errors import InvalidRequestError, RuntimeFailure

__all__ = [
    "DEFAULT_FLOW_LIMIT",
    "FLOW_CAP_SET",
    "flow_cap_rules",
    "flow_cap_set",
    "forget_flows",
]

DEFAULT_FLOW_LIMIT = 4096
FLOW_CAP_SET = "flow_cap"

# linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_conntrack.h
_NETLINK_NETFILTER = 12
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
_CTNETLINK = 1 << 8  # NFNL_SUBSYS_CTNETLINK in the message type's high byte
_CT_GET = _CTNETLINK | 1
_CT_DELETE = _CTNETLINK | 2
_CTA_TUPLE_ORIG = 1
_CTA_ID = 12
_CTA_ZONE = 18
_CTA_TUPLE_IP = 1
_CTA_TUPLE_PROTO = 2
_CTA_IP_V4_SRC = 1
_CTA_PROTO_NUM = 1

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_NFGEN = struct.pack("=BBH", socket.AF_INET, 0, 0)  # struct nfgenmsg: family, version, res_id
_NETLINK_TIMEOUT = 10.0  # seconds; the kernel answers at once, this only bounds a bug
_RCVBUF = 4 << 20  # a dump arrives faster than it is read
_SO_RCVBUFFORCE = 33  # root may exceed net.core.rmem_max; not in the socket module
# Deletions per write: each write is processed whole before send() returns, and every refused
# deletion queues an error for us, so a batch must fit the receive buffer even if all fail.
_BATCH = 512


def forget_flows(address: IPv4Address, *, keep_tcp: bool = False) -> int:
    """Delete every conntrack entry (of the caller's netns) whose original source is
    ``address``; returns how many were deleted. Sync: the caller runs it in a thread.

    ``keep_tcp``: leave TCP entries alone. A sandbox's TCP only ever reaches the proxy (DNAT),
    and deleting such an entry breaks the live connection as soon as the proxy sends first (its
    packets then leave un-NATed, from the proxy's address), so keep them after a policy change
    and forget them only at teardown.
    """
    step = "opening a ctnetlink socket"
    try:
        with _open_socket() as sock:
            step = "listing conntrack entries"
            entries = list(_dump_from(sock, address, keep_tcp=keep_tcp))
            step = "deleting conntrack entries"
            return _delete(sock, entries)
    except OSError as exc:
        raise RuntimeFailure(f"forgetting the flows of {address} failed {step}: {exc}") from exc


# ---------------------------------------------------------------------- nft: the flow cap


def flow_cap_set(table: str, *, family: str = "inet") -> dict[str, Any]:
    """The ``add set`` command of the dynamic set :func:`flow_cap_rules` counts in.

    nft 1.0.6's JSON cannot name the ``dynamic`` flag; nft sets it when a rule in the same
    transaction adds to the set, so this command and the rules must go in one transaction (a
    table reset), or the kernel refuses the rule with "Operation not supported".
    """
    return {
        "add": {
            "set": {
                "family": family,
                "table": table,
                "name": FLOW_CAP_SET,
                "type": "ifname",
                "size": 65535,
            }
        }
    }


def flow_cap_rules(
    table: str,
    chain: str,
    sandbox_ifaces_set: str,
    limit: int = DEFAULT_FLOW_LIMIT,
    *,
    family: str = "inet",
) -> list[dict[str, Any]]:
    """``add rule`` commands refusing a sandbox's new flows beyond ``limit`` tracked ones.

    For a prerouting chain (the nat one at dstnat priority will do: it sees exactly the first
    packet of every flow), before any DNAT rule so DNS and proxied TCP count too. A refused flow
    gets ICMP admin-prohibited at once. ``sandbox_ifaces_set`` is the set's name, without "@".
    """
    if not 0 < limit < 2**32:
        raise InvalidRequestError(f"flow limit must be a positive 32-bit number, got {limit}")
    iifname = {"meta": {"key": "iifname"}}
    expr: list[dict[str, Any]] = [
        {"match": {"op": "==", "left": iifname, "right": f"@{sandbox_ifaces_set}"}},
        {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
        {
            "set": {
                "op": "add",
                "elem": iifname,
                "set": f"@{FLOW_CAP_SET}",
                # inv: "ct count over N", i.e. matches when this flow would be number N + 1.
                "stmt": [{"ct count": {"val": limit, "inv": True}}],
            }
        },
        {"reject": {"type": "icmpx", "expr": "admin-prohibited"}},
    ]
    rule = {"family": family, "table": table, "chain": chain, "expr": expr}
    return [{"add": {"rule": rule}}]


# ---------------------------------------------------------------------- ctnetlink


class _Socket:
    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER
        )
        self.seq = 0

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _open_socket() -> _Socket:
    s = _Socket()
    try:
        s.sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        try:
            s.sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
        except PermissionError:
            s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        s.sock.bind((0, 0))
        s.sock.settimeout(_NETLINK_TIMEOUT)
    except BaseException:
        s.sock.close()
        raise
    return s


def _dump_from(s: _Socket, address: IPv4Address, *, keep_tcp: bool) -> Iterator[bytes]:
    """For each entry from ``address`` (but TCP ones when ``keep_tcp``): its tuple, id and zone
    attributes, ready to send."""
    msg = nfct_msg.create_from(
        tuple_orig=NFCTAttrTuple(saddr=str(address)),
        cta_filter={"attrs": [["CTA_FILTER_ORIG_FLAGS", FILTER_FLAG_CTA_IP_SRC]]},
    )
    s.seq += 1
    msg["nfgen_family"] = socket.AF_INET
    msg["header"]["type"] = _CT_GET
    msg["header"]["flags"] = _NLM_F_REQUEST | _NLM_F_DUMP
    msg["header"]["sequence_number"] = s.seq
    msg.encode()
    s.sock.send(msg.data)
    source = address.packed
    while True:
        data = s.sock.recv(1 << 20)
        for msg_type, _flags, seq, body in _messages(data):
            if seq != s.seq:
                continue
            if msg_type == _NLMSG_DONE:
                return
            if msg_type == _NLMSG_ERROR:
                (code,) = struct.unpack_from("i", body)
                raise OSError(-code, os.strerror(-code))
            wanted = b""
            match = False
            for kind, attr in _attrs(body, 4):  # after struct nfgenmsg
                if kind == _CTA_TUPLE_ORIG:
                    src, proto = _source_and_protocol(attr)
                    match = src == source and not (keep_tcp and proto == socket.IPPROTO_TCP)
                    wanted += attr
                elif kind in (_CTA_ID, _CTA_ZONE):
                    wanted += attr
            if match:
                yield wanted


def _delete(s: _Socket, entries: list[bytes]) -> int:
    """Delete the entries; those already gone are not counted."""
    deleted = 0
    for start in range(0, len(entries), _BATCH):
        batch = entries[start : start + _BATCH]
        first = s.seq + 1
        out = bytearray()
        for i, attrs in enumerate(batch):
            s.seq += 1
            # Only the last one asks for an ack: the kernel handles a write in order, so its ack
            # comes after the errors of every other one; successes send nothing.
            flags = _NLM_F_REQUEST | (_NLM_F_ACK if i == len(batch) - 1 else 0)
            out += _HEADER.pack(_HEADER.size + 4 + len(attrs), _CT_DELETE, flags, s.seq, 0)
            out += _NFGEN + attrs
        s.sock.send(out)
        gone = 0
        done = False
        while not done:
            for msg_type, _flags, seq, body in _messages(s.sock.recv(1 << 20)):
                if msg_type != _NLMSG_ERROR or not first <= seq <= s.seq:
                    continue
                (code,) = struct.unpack_from("i", body)
                if code == -errno.ENOENT:
                    gone += 1  # expired or deleted by someone else meanwhile
                elif code != 0:
                    raise OSError(-code, os.strerror(-code))
                done = done or seq == s.seq
        deleted += len(batch) - gone
    return deleted


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, msg_type, flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return
        yield msg_type, flags, seq, data[offset + _HEADER.size : offset + length]
        offset += (length + 3) & ~3


def _attrs(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, the whole attribute with its header and padding) of each netlink attribute."""
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        end = offset + ((length + 3) & ~3)
        attr = data[offset:end]
        yield kind & _NLA_TYPE_MASK, attr + b"\0" * (end - offset - len(attr))
        offset = end


def _source_and_protocol(tuple_attr: bytes) -> tuple[bytes | None, int | None]:
    source = protocol = None
    for kind, attr in _attrs(tuple_attr, 4):
        if kind == _CTA_TUPLE_IP:
            for ip_kind, ip_attr in _attrs(attr, 4):
                if ip_kind == _CTA_IP_V4_SRC:
                    source = ip_attr[4:8]
        elif kind == _CTA_TUPLE_PROTO:
            for proto_kind, proto_attr in _attrs(attr, 4):
                if proto_kind == _CTA_PROTO_NUM:
                    protocol = proto_attr[4]
    return source, protocol
