"""A sandbox's network policy: the rules the API accepts, and the decisions made from them.

``NetworkPolicy`` is what callers write and what is stored. ``compile_policy`` checks it against an
``AddressGuard`` (addresses no policy can open, and private space a rule must name) and returns a
``CompiledPolicy`` that the DNS resolver, the egress proxy and the firewall ask. Deny rules always
win over allow rules; anything no rule allows is denied. The ranges, presets and suffixes live in
``corral/resources/network.json`` with a reason on every entry.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.net.view import IPAddress

__all__ = [
    "AddressGuard",
    "CompiledPolicy",
    "Decision",
    "ForwardRule",
    "NetworkPolicy",
    "Rule",
    "compile_policy",
    "domain_pattern",
    "parse_policy",
    "secret_host",
    "validate_policy",
]

IPNetwork = IPv4Network | IPv6Network
Ranges = tuple[tuple[int, int], ...]  # inclusive, sorted, merged

_RESOURCE = Path(__file__).resolve().parent.parent / "resources" / "network.json"
_MAX_RULES = 64
_MAX_PORT_ITEMS = 256
_MAX_NAME = 253
_ALL_PORTS: Ranges = ((1, 65535),)
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT_ITEM = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_TOO_BROAD = "a wildcard needs at least two labels below it, and not a public suffix"
_EXTRA_NEVER = "corral's own network (other sandboxes and the host's services)"


class Rule(BaseModel):
    """One allow or deny rule: a domain (exact or ``*.suffix``) or a CIDR, optional ports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: StrictStr | None = None
    cidr: StrictStr | None = None
    ports: list[StrictInt | StrictStr] | None = None
    protocol: Literal["tcp", "udp", "icmp", "any"] = "any"


class NetworkPolicy(BaseModel):
    """What the API accepts and stores; building one checks every rule (errors name the rule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["none", "registries", "public"] = "none"
    allow: list[Rule] = Field(default_factory=list)
    deny: list[Rule] = Field(default_factory=list)
    egress_mbit: float | None = None

    @model_validator(mode="after")
    def _semantics(self) -> NetworkPolicy:
        # Plain ValueError: pydantic reports it, and parse_policy turns it back into our message.
        problems = _build(self, _default_guard()).problems
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Decision(NamedTuple):
    allowed: bool
    reason: str


class ForwardRule(NamedTuple):
    """A CIDR rule as the firewall applies it to forwarded (non-TCP) traffic."""

    network: IPv4Network | IPv6Network
    protocol: Literal["udp", "icmp", "any"]  # "any" = every non-TCP protocol
    ports: tuple[tuple[int, int], ...] | None  # inclusive ranges; None = every port
    except_private: bool  # the rule is broader than private space it covers: exclude that space


# --------------------------------------------------------------------------- resource data


@dataclass(frozen=True)
class _Range:
    network: IPNetwork
    what: str


@dataclass(frozen=True)
class _Embedding:
    prefix: IPv6Network
    form: str

    def image(self, net: IPv4Network) -> IPv6Network:
        shift = 128 - self.prefix.prefixlen - 32
        base = int(self.prefix.network_address) | (int(net.network_address) << shift)
        return IPv6Network((base, self.prefix.prefixlen + net.prefixlen))

    def extract(self, ip: IPv6Address) -> IPv4Address | None:
        if ip not in self.prefix:
            return None
        shift = 128 - self.prefix.prefixlen - 32
        return IPv4Address((int(ip) >> shift) & 0xFFFFFFFF)


@dataclass(frozen=True)
class _Data:
    never: tuple[_Range, ...]
    private: tuple[_Range, ...]
    embeddings: tuple[_Embedding, ...]
    min_wildcard_labels: int
    public_suffixes: frozenset[str]
    preset_ports: dict[str, Ranges]
    preset_domains: dict[str, tuple[str, ...]]


@functools.cache
def _data() -> _Data:
    try:
        raw: Any = json.loads(_RESOURCE.read_text())
        embeddings = tuple(
            _Embedding(IPv6Network(e["prefix"]), e["form"]) for e in raw["embedded_ipv4"]
        )
        presets = raw["presets"]
        return _Data(
            never=tuple(
                _Range(ipaddress.ip_network(e["network"]), e["what"]) for e in raw["never"]
            ),
            private=tuple(
                _Range(ipaddress.ip_network(e["network"]), e["what"]) for e in raw["private"]
            ),
            embeddings=embeddings,
            min_wildcard_labels=int(raw["wildcard"]["min_labels"]),
            public_suffixes=frozenset(s for g in raw["public_suffixes"] for s in g["suffixes"]),
            preset_ports={
                name: _merge((p, p) for p in body.get("ports", []))
                for name, body in presets.items()
            },
            preset_domains={
                name: tuple(d["domain"] for d in body.get("domains", []))
                for name, body in presets.items()
            },
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeFailure(f"cannot load network resource {_RESOURCE.name}: {exc}") from exc


# --------------------------------------------------------------------------- address guard


class AddressGuard:
    """Addresses no policy can open, and private space that only a rule naming it opens.

    Both lists include the IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible,
    NAT64, 6to4), so ``::ffff:127.0.0.1`` or ``64:ff9b::a9fe:a9fe`` cannot sneak past.
    """

    def __init__(self, extra_never: Iterable[IPv4Network | IPv6Network] = ()) -> None:
        data = _data()
        never = [*data.never, *(_Range(_unmap_network(n), _EXTRA_NEVER) for n in extra_never)]
        self._never = _with_images(never, data.embeddings)
        self._private = _with_images(data.private, data.embeddings)

    @property
    def never_networks(self) -> tuple[IPNetwork, ...]:
        """Every never-reachable network, IPv6 images of the IPv4 ones included (for nft)."""
        return tuple(r.network for r in self._never)

    @property
    def private_networks(self) -> tuple[IPNetwork, ...]:
        """Every private network, IPv6 images of the IPv4 ones included (for nft)."""
        return tuple(r.network for r in self._private)

    def never(self, ip: IPAddress | str) -> str | None:
        """Why ``ip`` is never reachable, or None when a policy may open it."""
        addr = _parse_ip(ip)
        if addr is None:
            return f"{ip!r} is not an IP address"
        found = _find(self._never, addr)
        return None if found is None else f"{addr} is never reachable: {found.what}"

    def private(self, ip: IPAddress | str) -> str | None:
        """Why ``ip`` needs a rule naming its space, or None when it is not private."""
        addr = _parse_ip(ip)
        if addr is None:
            return f"{ip!r} is not an IP address"
        found = _find(self._private, addr)
        if found is None:
            return None
        return f"private address {addr} needs an allow rule naming {found.network}"

    def _never_containing(self, net: IPNetwork) -> _Range | None:
        return next((r for r in self._never if _subnet_of(net, r.network)), None)

    def _names_private(self, net: IPNetwork) -> bool:
        return any(_subnet_of(net, r.network) for r in self._private)

    def _overlaps_private(self, net: IPNetwork) -> bool:
        return any(
            r.network.version == net.version and r.network.overlaps(net) for r in self._private
        )


@functools.cache
def _default_guard() -> AddressGuard:
    return AddressGuard()


def _with_images(ranges: Iterable[_Range], embeddings: Sequence[_Embedding]) -> tuple[_Range, ...]:
    ranges = tuple(ranges)
    images = [
        _Range(e.image(r.network), f"{r.what} ({e.form} form)")
        for e in embeddings
        for r in ranges
        if isinstance(r.network, IPv4Network)
    ]
    return (*ranges, *images)


def _find(ranges: Sequence[_Range], ip: IPAddress) -> _Range | None:
    return next((r for r in ranges if r.network.version == ip.version and ip in r.network), None)


def _subnet_of(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, IPv4Network) and isinstance(outer, IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, IPv6Network) and isinstance(outer, IPv6Network):
        return inner.subnet_of(outer)
    return False


def _parse_ip(ip: IPAddress | str) -> IPAddress | None:
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip)
        except ValueError:
            return None
    # ::ffff:a.b.c.d is the IPv4 address itself on a dual-stack socket: compare as IPv4.
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _unmap_network(net: IPNetwork) -> IPNetwork:
    if isinstance(net, IPv6Network) and net.prefixlen >= 96:
        mapped = IPv6Network("::ffff:0:0/96")
        if net.subnet_of(mapped):
            return IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _embedded(ip: IPAddress) -> IPv4Address | None:
    if isinstance(ip, IPv4Address):
        return None
    for e in _data().embeddings:
        v4 = e.extract(ip)
        if v4 is not None:
            return v4
    return None


# --------------------------------------------------------------------------- ports


def _merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _port_in(ranges: Ranges | None, port: int | None) -> bool:
    if ranges is None:
        return True
    return port is not None and any(lo <= port <= hi for lo, hi in ranges)


def _leftover(ranges: Ranges | None, minus: Ranges | None) -> bool:
    """Whether some port of ``ranges`` is not in ``minus`` (None = every port)."""
    if minus is None:
        return False
    have = _ALL_PORTS if ranges is None else ranges
    for lo, hi in have:
        cursor = lo
        for mlo, mhi in minus:
            if mhi < cursor or mlo > hi:
                continue
            if mlo > cursor:
                return True
            cursor = mhi + 1
            if cursor > hi:
                break
        if cursor <= hi:
            return True
    return False


def _parse_ports(ports: Sequence[object] | None) -> Ranges | None:
    if ports is None:
        return None
    if not ports:
        raise _Bad("ports must not be empty (leave ports out for every port)")
    if len(ports) > _MAX_PORT_ITEMS:
        raise _Bad(f"at most {_MAX_PORT_ITEMS} ports entries (got {len(ports)})")
    ranges: list[tuple[int, int]] = []
    for item in ports:
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str) and (m := _PORT_ITEM.fullmatch(item)):
            lo = int(m.group(1))
            hi = int(m.group(2) or lo)
            if lo > hi:
                raise _Bad(f"port range {item!r} runs backwards")
        else:
            raise _Bad(f"port {item!r} is not a port number or a range like '8000-8100'")
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            raise _Bad(f"port {item!r} is outside 1-65535")
        ranges.append((lo, hi))
    return _merge(ranges)


# --------------------------------------------------------------------------- names


class _Bad(Exception):
    """One problem with one rule; the caller prefixes which rule."""


def _looks_like_ip(name: str) -> bool:
    if name.startswith("["):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    try:
        # Resolvers accept odd IPv4 spellings too (127.1, 0x7f.0.0.1, 2130706433).
        socket.inet_aton(name)
        return True
    except (OSError, ValueError):  # ValueError: embedded NUL
        pass
    last = name.rsplit(".", 1)[-1]
    return last.isdigit()


def _normalize_domain(raw: str) -> str:
    """The canonical form of a domain rule (lowercase, ASCII, no trailing dot)."""
    name = raw.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise _Bad("domain must not be empty")
    if name == "*":
        raise _Bad(f"{raw!r} is too broad ({_TOO_BROAD})")
    wildcard = name.startswith("*.")
    if wildcard:
        name = name[2:]
    if "*" in name:
        raise _Bad(f"{raw!r}: a wildcard must be the whole leftmost label, as in *.example.com")
    if _looks_like_ip(name):
        raise _Bad(f"{raw!r} is an IP address; use cidr")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Bad(f"{raw!r} is not a valid internationalised domain name") from None
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            shown = "an empty label" if not label else f"label {label!r}"
            raise _Bad(
                f"{raw!r} has {shown}: labels are 1-63 letters, digits or '-', "
                "not starting or ending with '-'"
            )
    if len(name) + (2 if wildcard else 0) > _MAX_NAME:
        raise _Bad(f"{raw[:40]!r}... is longer than {_MAX_NAME} characters")
    data = _data()
    if wildcard and (len(labels) < data.min_wildcard_labels or name in data.public_suffixes):
        raise _Bad(f"{raw!r} is too broad ({_TOO_BROAD})")
    if len(labels) < 2:
        raise _Bad(f"{raw!r} needs at least two labels, as in example.com")
    return f"*.{name}" if wildcard else name


def domain_pattern(raw: str) -> str:
    """A domain name or ``*.domain`` pattern in the canonical form rules use; ValueError saying
    why it is none (an IP address, a bad label, a wildcard too broad)."""
    try:
        return _normalize_domain(raw)
    except _Bad as exc:
        raise ValueError(str(exc)) from None


def secret_host(raw: str) -> str:
    """A host a secret may be bound to, canonical: a DNS name or ``*.domain``. ValueError says
    why not, as a phrase that follows the host ("is an IP address; ..."): never everything, and
    never an address, since the proxy checks the upstream's certificate against a name, and an
    address (which many names may share) says nothing of who is there."""
    if raw.strip().rstrip(".") in ("*", ""):
        raise ValueError("would send the secret anywhere; name its hosts (or *.domain.tld)")
    try:
        return domain_pattern(raw.strip())
    except ValueError as exc:
        if "IP address" in str(exc):
            raise ValueError("is an IP address; bind secrets to DNS names") from None
        raise ValueError(f"is not a host name a secret can be bound to ({exc})") from None


def _check_form(name: str) -> str | None:
    """A queried name as rules compare it, or None when it cannot be a DNS name."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not name or len(name) > _MAX_NAME or any(c.isspace() for c in name):
        return None
    return name


# --------------------------------------------------------------------------- compiled rules


@dataclass(frozen=True)
class _NameRule:
    label: str  # how a Decision names it
    pattern: str  # "example.com" or "*.example.com"
    ports: Ranges | None

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("*."):
            return name.endswith(self.pattern[1:])
        return name == self.pattern


@dataclass(frozen=True)
class _AddrRule:
    label: str
    network: IPNetwork
    protocol: Literal["tcp", "udp", "icmp", "any"]
    ports: Ranges | None
    names_private: bool  # contained in one private range: this rule opens that space
    except_private: bool  # overlaps private space without naming it: that space stays shut

    def contains(self, ip: IPAddress) -> bool:
        return ip.version == self.network.version and ip in self.network

    def carries(self, protocol: str) -> bool:
        return self.protocol in ("any", protocol)

    def applies(self, ip: IPAddress, port: int | None, protocol: str) -> bool:
        return self.carries(protocol) and self.contains(ip) and _port_in(self.ports, port)


@dataclass
class _Built:
    names_allow: list[_NameRule]
    names_deny: list[_NameRule]
    addrs_allow: list[_AddrRule]
    addrs_deny: list[_AddrRule]
    problems: list[str]


def _build(policy: NetworkPolicy, guard: AddressGuard) -> _Built:
    built = _Built([], [], [], [], [])
    for kind in ("allow", "deny"):
        rules: list[Rule] = getattr(policy, kind)
        if len(rules) > _MAX_RULES:
            built.problems.append(f"{kind}: at most {_MAX_RULES} rules (got {len(rules)})")
            continue
        for index, rule in enumerate(rules, start=1):
            try:
                compiled = _compile_rule(rule, kind, index, guard)
            except _Bad as exc:
                built.problems.append(f"{kind} rule {index}: {exc}")
                continue
            if isinstance(compiled, _NameRule):
                (built.names_allow if kind == "allow" else built.names_deny).append(compiled)
            else:
                (built.addrs_allow if kind == "allow" else built.addrs_deny).append(compiled)
    mbit = policy.egress_mbit
    if mbit is not None and not (math.isfinite(mbit) and mbit > 0):
        built.problems.append(f"egress_mbit: {mbit!r} is not a positive number of Mbit/s")
    return built


def _compile_rule(rule: Rule, kind: str, index: int, guard: AddressGuard) -> _NameRule | _AddrRule:
    if (rule.domain is None) == (rule.cidr is None):
        raise _Bad("give exactly one of domain or cidr")
    ports = _parse_ports(rule.ports)
    if rule.domain is not None:
        if not isinstance(rule.domain, str):
            raise _Bad(f"domain {rule.domain!r} is not a string")
        pattern = _normalize_domain(rule.domain)
        if rule.protocol in ("udp", "icmp"):
            raise _Bad(f"domain rules carry tcp only; {rule.protocol} needs a cidr rule")
        return _NameRule(f"{kind} rule {index} ({pattern})", pattern, ports)
    assert rule.cidr is not None
    network = _parse_cidr(rule.cidr)
    if rule.protocol == "icmp" and ports is not None:
        raise _Bad("icmp has no ports; leave ports out")
    if kind == "allow":
        never = guard._never_containing(network)
        if never is not None:
            raise _Bad(f"{network} is never reachable: {never.what}")
    names_private = guard._names_private(network)
    return _AddrRule(
        label=f"{kind} rule {index} ({network})",
        network=network,
        protocol=rule.protocol,
        ports=ports,
        names_private=names_private,
        except_private=not names_private and guard._overlaps_private(network),
    )


def _parse_cidr(raw: str) -> IPNetwork:
    if not isinstance(raw, str) or "%" in raw:
        raise _Bad(f"cidr {raw!r} is not a network like 203.0.113.0/24 or 2001:db8::/32")
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise _Bad(f"cidr {raw!r} is not a network like 203.0.113.0/24 or 2001:db8::/32") from None
    return _unmap_network(network)


@functools.cache
def _preset_rules(preset: str) -> tuple[_NameRule, ...]:
    data = _data()
    ports = data.preset_ports.get(preset) or None
    rules = []
    for domain in data.preset_domains.get(preset, ()):
        try:
            pattern = _normalize_domain(domain)
        except _Bad as exc:
            raise RuntimeFailure(f"network resource: preset {preset}: {exc}") from None
        rules.append(_NameRule(f"preset {preset} ({pattern})", pattern, ports))
    return tuple(rules)


# --------------------------------------------------------------------------- public API


class CompiledPolicy:
    """A checked policy, ready for the resolver, the proxy and the firewall to ask."""

    def __init__(self, source: NetworkPolicy, built: _Built, guard: AddressGuard) -> None:
        self.source = source
        self._guard = guard
        self._public = source.preset == "public"
        self._names_allow = (*built.names_allow, *_preset_rules(source.preset))
        self._names_deny = tuple(built.names_deny)
        self._addrs_allow = tuple(built.addrs_allow)
        self._addrs_deny = tuple(built.addrs_deny)

    def check_bound_host(self, host: str) -> Decision:
        """Whether a secret bound to ``host`` (a name, or ``*.suffix`` for the names below it)
        can be used: the sandbox may reach it on 443, where secrets are sent."""
        probe = "x" + host[1:] if host.startswith("*.") else host
        return self.check_name(probe, 443)

    def check_name(self, name: str, port: int | None = None) -> Decision:
        """May the sandbox reach ``name`` on ``port`` (None: on some port, as DNS asks)?"""
        normal = _check_form(name)
        if normal is None:
            return Decision(False, f"{name[:64]!r} is not a valid name")
        if _looks_like_ip(normal):
            return Decision(False, f"{normal} is an IP address; domain rules never match it")
        denies = [r for r in self._names_deny if r.matches(normal)]
        if port is not None:
            hit = next((r for r in denies if _port_in(r.ports, port)), None)
            if hit is not None:
                return Decision(False, hit.label)
            allow = next(
                (r for r in self._names_allow if r.matches(normal) and _port_in(r.ports, port)),
                None,
            )
            if allow is not None:
                return Decision(True, allow.label)
            return Decision(True, "preset public") if self._public else _DEFAULT_DENY
        denied = _union(r.ports for r in denies) if denies else ()
        for rule in self._names_allow:
            if rule.matches(normal) and _leftover(rule.ports, denied):
                return Decision(True, rule.label)
        if self._public and _leftover(None, denied):
            return Decision(True, "preset public")
        return Decision(False, denies[0].label) if denies else _DEFAULT_DENY

    def check_ip(
        self, ip: IPAddress | str, port: int | None, protocol: Literal["tcp", "udp", "icmp"]
    ) -> Decision:
        """May the sandbox reach the literal address ``ip`` (no name involved)?"""
        addr = _parse_ip(ip)
        if addr is None:
            return Decision(False, f"{ip!r} is not an IP address")
        never = self._guard.never(addr)
        if never is not None:
            return Decision(False, never)
        denied = self._denied(addr, port, protocol)
        if denied is not None:
            return denied
        private = self._guard.private(addr)
        if private is not None:
            return self._private_rule(addr, port, protocol) or Decision(False, private)
        rule = next((r for r in self._addrs_allow if r.applies(addr, port, protocol)), None)
        if rule is not None:
            return Decision(True, rule.label)
        if self._public and protocol == "tcp":
            return Decision(True, "preset public")
        return _DEFAULT_DENY

    def check_resolved(self, name: str, ip: IPAddress | str, port: int | None = None) -> Decision:
        """May TCP go to ``ip``, an address the allowed ``name`` resolved to (rebinding check)?

        ``port`` None means "on some port" (the resolver filtering answers); the proxy passes
        the port it is about to connect to.
        """
        addr = _parse_ip(ip)
        if addr is None:
            return Decision(False, f"{ip!r} is not an IP address")
        never = self._guard.never(addr)
        if never is not None:
            return Decision(False, never)
        if port is not None:
            denied = self._denied(addr, port, "tcp")
        else:
            # On some port: refused only when a deny rule covers every port of this address.
            hit = next(
                (
                    r
                    for r in self._addrs_deny
                    if r.carries("tcp")
                    and r.ports is None
                    and (r.contains(addr) or _contains_embedded(r, addr))
                ),
                None,
            )
            denied = None if hit is None else Decision(False, hit.label)
        if denied is not None:
            return denied
        private = self._guard.private(addr)
        if private is not None:
            return self._private_rule(addr, port, "tcp", any_port=port is None) or Decision(
                False, private
            )
        return Decision(True, f"public address {addr}")

    def domain_ports(self) -> frozenset[int] | None:
        """Ports on which some domain rule (presets included) allows traffic; None = all."""
        if self._public:
            return None
        ranges: list[tuple[int, int]] = []
        for rule in self._names_allow:
            if rule.ports is None:
                return None
            ranges.extend(rule.ports)
        merged = _merge(ranges)
        if merged == _ALL_PORTS:
            return None
        return frozenset(p for lo, hi in merged for p in range(lo, hi + 1))

    def forward_rules(self) -> list[ForwardRule]:
        """CIDR allow rules for non-TCP traffic (TCP never forwards: the proxy carries it)."""
        return [_forward(r) for r in self._addrs_allow if r.protocol != "tcp"]

    def forward_denies(self) -> list[ForwardRule]:
        """CIDR deny rules for non-TCP traffic; the firewall applies them before the allows."""
        return [_forward(r) for r in self._addrs_deny if r.protocol != "tcp"]

    def _denied(self, addr: IPAddress, port: int | None, protocol: str) -> Decision | None:
        embedded = _embedded(addr)
        for rule in self._addrs_deny:
            if rule.applies(addr, port, protocol) or (
                embedded is not None and rule.applies(embedded, port, protocol)
            ):
                return Decision(False, rule.label)
        return None

    def _private_rule(
        self, addr: IPAddress, port: int | None, protocol: str, *, any_port: bool = False
    ) -> Decision | None:
        for rule in self._addrs_allow:
            if not (rule.names_private and rule.carries(protocol) and rule.contains(addr)):
                continue
            if any_port or _port_in(rule.ports, port):
                return Decision(True, rule.label)
        return None


_DEFAULT_DENY = Decision(False, "default deny")


def _contains_embedded(rule: _AddrRule, addr: IPAddress) -> bool:
    embedded = _embedded(addr)
    return embedded is not None and rule.contains(embedded)


def _union(ports: Iterable[Ranges | None]) -> Ranges | None:
    ranges: list[tuple[int, int]] = []
    for p in ports:
        if p is None:
            return None
        ranges.extend(p)
    return _merge(ranges)


def _forward(rule: _AddrRule) -> ForwardRule:
    protocol: Literal["udp", "icmp", "any"] = "any"
    if rule.protocol == "udp" or rule.protocol == "icmp":
        protocol = rule.protocol
    return ForwardRule(rule.network, protocol, rule.ports, rule.except_private)


def validate_policy(policy: NetworkPolicy) -> None:
    """Check ``policy`` without a server's guard; raises InvalidRequestError naming the rule."""
    problems = _build(policy, _default_guard()).problems
    if problems:
        raise InvalidRequestError("; ".join(problems))


def compile_policy(policy: NetworkPolicy, guard: AddressGuard) -> CompiledPolicy:
    """Check ``policy`` against ``guard`` and compile it (InvalidRequestError names the rule)."""
    built = _build(policy, guard)
    if built.problems:
        raise InvalidRequestError("; ".join(built.problems))
    return CompiledPolicy(policy, built, guard)


def parse_policy(data: object) -> NetworkPolicy:
    """Build a policy from API input; every problem becomes an InvalidRequestError."""
    if isinstance(data, NetworkPolicy):
        validate_policy(data)
        return data
    try:
        if isinstance(data, str | bytes):
            return NetworkPolicy.model_validate_json(data)
        return NetworkPolicy.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    parts: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = err.get("loc", ())
        ctx = err.get("ctx") or {}
        if err.get("type") == "value_error" and not loc and "error" in ctx:
            parts.append(str(ctx["error"]))
            continue
        where, field = _where(loc)
        if where in seen:
            continue  # a union reports once per member; one line per place is enough
        seen.add(where)
        if err.get("type") == "extra_forbidden":
            msg = f"unknown field {field!r}"
            where = where.rsplit(": ", 1)[0] if ": " in where else ""
        elif field == "ports" and len(loc) > 3:
            msg = "must be a port number or a range like '8000-8100'"
        elif not loc and err.get("type") == "model_type":
            msg = "a network policy must be an object"
        else:
            msg = str(err.get("msg", "invalid"))
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid"


def _where(loc: tuple[int | str, ...]) -> tuple[str, str]:
    if len(loc) >= 2 and loc[0] in ("allow", "deny") and isinstance(loc[1], int):
        head = f"{loc[0]} rule {loc[1] + 1}"
        if len(loc) == 2:
            return head, ""
        field = str(loc[2])
        if len(loc) > 3 and isinstance(loc[3], int):
            return f"{head}: {field} item {loc[3] + 1}", field
        return f"{head}: {field}", field
    field = str(loc[0]) if loc else ""
    return ".".join(str(x) for x in loc), field
