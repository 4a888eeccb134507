"""What the host-side network services (DNS resolver, egress proxy) know about each sandbox.

The control plane owns a :class:`NetRegistry` and keeps it current: a sandbox is added once its
network is plumbed, its policy is swapped in place on update, and it is removed before its
network is torn down. The resolver and the proxy identify the caller only by the source address
of the packet (which the firewall pins to the sandbox's veth), never by anything it says.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from corral.net.ca import SandboxCA
    from corral.net.policy import CompiledPolicy

__all__ = [
    "BoundSecret",
    "EgressEvent",
    "EventSink",
    "IPAddress",
    "NetRegistry",
    "PinCache",
    "SandboxNet",
    "SandboxSecrets",
    "host_matches",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class EgressEvent:
    """One decision about traffic leaving a sandbox (a DNS query or a connection)."""

    sandbox_id: str
    # "inject": a request the proxy put a secret into (name = host, reason names the secrets).
    kind: Literal["dns", "tcp", "udp", "icmp", "inject"]
    decision: Literal["allow", "deny"]
    reason: str
    name: str | None = None  # the DNS name, SNI or Host, when there is one
    ip: str | None = None  # the destination address actually used (or asked for)
    port: int | None = None
    bytes_out: int = 0  # sandbox -> world
    bytes_in: int = 0  # world -> sandbox
    time: float = field(default_factory=time.time)


EventSink = Callable[[EgressEvent], None]


class PinCache:
    """Addresses the resolver handed a sandbox for names its policy allows, until their TTL ends.

    The proxy uses it for connections on domain-rule ports that carry no name (no SNI, no
    Host header, or a server-speaks-first protocol): the destination must be an address the
    sandbox was given for an allowed name.
    """

    def __init__(self, max_entries: int = 4096, min_ttl: float = 30.0) -> None:
        self._max = max_entries
        self._min_ttl = min_ttl
        self._by_ip: dict[IPAddress, tuple[str, float]] = {}

    def add(self, name: str, ip: IPAddress, ttl: float) -> None:
        if len(self._by_ip) >= self._max:
            self._expire()
            if len(self._by_ip) >= self._max:
                # Oldest-inserted first: dicts keep insertion order.
                self._by_ip.pop(next(iter(self._by_ip)))
        self._by_ip[ip] = (name.rstrip(".").lower(), time.monotonic() + max(ttl, self._min_ttl))

    def name_for(self, ip: IPAddress) -> str | None:
        """The allowed name ``ip`` was resolved from, if that answer is still live."""
        entry = self._by_ip.get(ip)
        if entry is None:
            return None
        name, until = entry
        if until < time.monotonic():
            self._by_ip.pop(ip, None)
            return None
        return name

    def clear(self) -> None:
        self._by_ip.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for ip in [ip for ip, (_, until) in self._by_ip.items() if until < now]:
            del self._by_ip[ip]


def host_matches(pattern: str, host: str) -> bool:
    """``host`` is ``pattern``, or under it when the pattern is ``*.domain`` (any depth, not
    ``domain`` itself, as a TLS wildcard certificate would not cover it either)."""
    host = host.rstrip(".").lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True)
class BoundSecret:
    """A tenant secret bound to a sandbox: the proxy injects it toward ``hosts`` only."""

    name: str
    hosts: tuple[str, ...]  # lower-case names or ``*.domain`` patterns
    placeholder: str  # what the sandbox holds instead of the value
    header: str | None  # also set this request header ...
    format: str  # ... to this, ``{value}`` replaced by the value

    def covers(self, host: str) -> bool:
        return any(host_matches(p, host) for p in self.hosts)


@dataclass(frozen=True)
class SandboxSecrets:
    """Everything the proxy needs to inject a sandbox's secrets (values are fetched per
    connection, so a rotated secret is used from the next connection on)."""

    bindings: tuple[BoundSecret, ...]
    ca: SandboxCA  # signs the certificates the proxy shows the sandbox for bound hosts

    def for_host(self, host: str) -> tuple[BoundSecret, ...]:
        return tuple(b for b in self.bindings if b.covers(host))


@dataclass
class SandboxNet:
    """One sandbox as the network services see it."""

    sandbox_id: str
    tenant_id: str
    address: IPAddress
    policy: CompiledPolicy  # replaced (not mutated) when the policy changes
    pins: PinCache = field(default_factory=PinCache)
    secrets: SandboxSecrets | None = None


class NetRegistry:
    """Sandboxes by their address; the only way the resolver and the proxy learn who is calling."""

    def __init__(self) -> None:
        self._by_ip: dict[IPAddress, SandboxNet] = {}
        self._by_id: dict[str, SandboxNet] = {}

    def add(self, net: SandboxNet) -> None:
        self._by_ip[net.address] = net
        self._by_id[net.sandbox_id] = net

    def remove(self, sandbox_id: str) -> None:
        net = self._by_id.pop(sandbox_id, None)
        if net is not None:
            self._by_ip.pop(net.address, None)

    def get(self, sandbox_id: str) -> SandboxNet | None:
        return self._by_id.get(sandbox_id)

    def lookup(self, address: str | IPAddress) -> SandboxNet | None:
        """The sandbox whose address is ``address`` (IPv4-mapped IPv6 is unwrapped)."""
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return self._by_ip.get(ip)
