"""Corral's nftables table: NAT to the resolver and proxy, anti-spoofing, per-sandbox forwarding.

Everything lives in one ``inet`` table that corral owns outright; other tables are never read or
touched. Every change is one ``nft -j -f -`` transaction, built as JSON from Python data, so
it either applies whole or not at all (a failed policy update leaves the old rules in force).

Shape of the table::

    sets   sandbox_ifaces (ifname)          sandbox_addrs (ifname . ipv4_addr)
           never_v4/v6, private_v4/v6 (intervals)
    map    sandbox_chains (ifname : verdict)  -> jump sbx_<hash of sandbox id>
    prerouting (nat, dstnat)     from a sandbox: port 53 -> resolver, 169.254.169.254:80 ->
                                 metadata endpoint, every other TCP -> proxy
    input      (filter, 0)       from a sandbox: only resolver, proxy, metadata endpoint and
                                 ping on the service IP
    forward    (filter, 0)       from a sandbox: non-TCP only, never-networks refused, then the
                                 sandbox's own chain (denies, then allows); to a sandbox:
                                 replies only
    forward_log(filter, 100)     the first packet of each flow the forward chain let through,
                                 logged to NFLOG (it only sees what was accepted)
    postrouting(nat, srcnat)     the subnet is masqueraded out of non-sandbox interfaces

The filter chains sit at priority 0 (``filter``): after conntrack and after DNAT, so they see
the proxy and resolver ports the traffic was redirected to. Refusals are ``reject`` (TCP reset
or ICMP admin-prohibited) so clients fail at once instead of hanging; silent drops are kept
for packets that must not get any answer (forged sources, IPv6, unsolicited traffic to a
sandbox).

Non-TCP decisions of the forward chain go to NFLOG group ``nflog_group`` (0: none) for the egress
log (:mod:`corral.net.nflog` reads them): the first packet of each accepted flow with prefix
:data:`LOG_ALLOW`, refusals with :data:`LOG_NEVER` (a never-reachable network or another sandbox)
or :data:`LOG_DENY` (no CIDR rule). Only the packet's first bytes are copied and each sandbox
address has its own rate limit (plus one for all together), so a flood costs a few log messages.
A deny rule's refusal is not logged: it ends the sandbox's one rule per policy entry, and a
rate-limited log needs a rule of its own (``limit`` stops the rule it is in).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import TYPE_CHECKING, Any, Literal, Protocol

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.net.conntrack import DEFAULT_FLOW_LIMIT, flow_cap_rules, flow_cap_set

if TYPE_CHECKING:
    from corral.net.policy import ForwardRule

__all__ = [
    "DEFAULT_NFLOG_GROUP",
    "LOG_ALLOW",
    "LOG_DENY",
    "LOG_NEVER",
    "METADATA_IP",
    "Firewall",
    "FirewallSandbox",
    "NetworkLists",
]

DEFAULT_NFLOG_GROUP = 7301
# Where every cloud (and so every SDK) looks for instance metadata; corral answers there.
METADATA_IP = "169.254.169.254"
# NFLOG prefixes: what the forward chain decided about a sandbox's non-TCP packet.
LOG_ALLOW = "corral:a"  # the first packet of a flow a CIDR rule let through
LOG_DENY = "corral:d"  # refused: no CIDR rule allows it
LOG_NEVER = "corral:n"  # refused: a never-reachable network, or another sandbox

_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_IFACE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_ANY_PORT_PROTOCOLS = ["udp", "udplite", "sctp", "dccp"]  # non-TCP protocols that have ports
_REJECT: dict[str, Any] = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}
_TCP_RESET: dict[str, Any] = {"reject": {"type": "tcp reset"}}
_ACCEPT: dict[str, Any] = {"accept": None}
_DROP: dict[str, Any] = {"drop": None}
# What the listener reads of a logged packet: the longest IPv4 header (60 bytes, with options)
# and the UDP or ICMP header after it.
_LOG_SNAPLEN = 80
_LOG_RATE, _LOG_BURST = 50, 100  # per second, per sandbox address
_LOG_TOTAL_RATE, _LOG_TOTAL_BURST = 1000, 2000  # per second, per log rule, every sandbox at once
_LOG_BUDGETS = 65536  # sandbox addresses with a rate limit at once (a /16 subnet)

Network = IPv4Network | IPv6Network


class NetworkLists(Protocol):
    """What the firewall needs from :class:`corral.net.policy.AddressGuard`."""

    @property
    def never_networks(self) -> Sequence[Network]: ...

    @property
    def private_networks(self) -> Sequence[Network]: ...


@dataclass(frozen=True)
class FirewallSandbox:
    """One sandbox as the firewall sees it."""

    sandbox_id: str
    iface: str
    address: IPv4Address
    forward: Sequence[ForwardRule]
    denies: Sequence[ForwardRule]


class Firewall:
    """The corral nft table; every method is one atomic ``nft`` transaction."""

    def __init__(
        self,
        table: str,
        *,
        service_ip: IPv4Address,
        subnet: IPv4Network,
        dns_port: int,
        proxy_port: int,
        guard: NetworkLists,
        metadata_port: int | None = None,
        nflog_group: int = DEFAULT_NFLOG_GROUP,
        flow_limit: int = DEFAULT_FLOW_LIMIT,
        nft: str = "nft",
    ) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise InvalidRequestError(f"nft table name {table!r} is not a plain identifier")
        if not 0 <= nflog_group <= 0xFFFF:
            raise InvalidRequestError(f"NFLOG group {nflog_group} is not between 0 and 65535")
        self.table = table
        self.service_ip = service_ip
        self.subnet = subnet
        self.dns_port = dns_port
        self.proxy_port = proxy_port
        self.metadata_port = metadata_port
        self.nflog_group = nflog_group
        # New flows one sandbox may have tracked at once, so it cannot fill the host's conntrack
        # table (every other sandbox and the host would lose new connections).
        self.flow_limit = flow_limit
        self._never = _split_families(guard.never_networks)
        self._private = _split_families(guard.private_networks)
        self._nft = nft
        # libnftables, loaded at first use; False when it is not there (then the nft binary).
        self._lib: _LibNftables | Literal[False] | None = None if nft == "nft" else False
        # What this process last put in the table, so a removal knows which elements to drop.
        self._known: dict[str, FirewallSandbox] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ public

    async def reset(self, sandboxes: Sequence[FirewallSandbox]) -> None:
        """Replace the whole table (base chains, sets and every sandbox) in one transaction."""
        for sb in sandboxes:
            _check_sandbox(sb)
        t = self._obj
        commands: list[dict[str, Any]] = [
            # add-then-delete: deleting a missing table would fail the transaction.
            {"add": {"table": t()}},
            {"delete": {"table": t()}},
            {"add": {"table": t()}},
            *self._base(),
        ]
        for sb in sandboxes:
            commands += self._sandbox_commands(sb, previous=None)
        async with self._lock:
            await self._run(commands, "resetting the firewall")
            self._known = {sb.sandbox_id: sb for sb in sandboxes}

    async def add_sandbox(self, sb: FirewallSandbox) -> None:
        await self.update_sandbox(sb)

    async def update_sandbox(self, sb: FirewallSandbox) -> None:
        """Install or replace the sandbox's rules; on failure the previous rules stay."""
        _check_sandbox(sb)
        async with self._lock:
            previous = self._known.get(sb.sandbox_id)
            commands = self._sandbox_commands(sb, previous=previous)
            await self._run(commands, f"setting the firewall rules of sandbox {sb.sandbox_id}")
            self._known[sb.sandbox_id] = sb

    async def remove_sandbox(self, sandbox_id: str) -> None:
        """Drop the sandbox's elements and chain; idempotent."""
        async with self._lock:
            known = self._known.get(sandbox_id)
            entries = (
                [(known.iface, known.address)]
                if known is not None
                else await self._find_sandbox(sandbox_id)
            )
            if entries is None:
                return  # no table: nothing to remove
            chain = _chain_name(sandbox_id)
            commands: list[dict[str, Any]] = []
            for iface, address in entries:
                commands += self._drop_membership(iface, address, chain)
            commands += self._drop_chain(chain)
            await self._run(commands, f"removing the firewall rules of sandbox {sandbox_id}")
            self._known.pop(sandbox_id, None)

    async def delete(self) -> None:
        """Remove the table; idempotent."""
        t = self._obj
        async with self._lock:
            await self._run(
                [{"add": {"table": t()}}, {"delete": {"table": t()}}],
                "deleting the firewall table",
            )
            self._known.clear()

    # ------------------------------------------------------------------ building blocks

    def _obj(self, **fields: Any) -> dict[str, Any]:
        if fields:
            return {"family": "inet", "table": self.table, **fields}
        return {"family": "inet", "name": self.table}

    def _base(self) -> list[dict[str, Any]]:
        o = self._obj
        sandbox_if = _match("==", _meta("iifname"), "@sandbox_ifaces")
        spoofed = _match(
            "!=",
            {"concat": [_meta("iifname"), _field("ip", "saddr")]},
            "@sandbox_addrs",
        )
        ipv4 = _match("==", _meta("nfproto"), "ipv4")
        ipv6 = _match("==", _meta("nfproto"), "ipv6")
        to_service = _match("==", _field("ip", "daddr"), str(self.service_ip))
        established = _match("in", {"ct": {"key": "state"}}, ["established", "related"])
        svc = str(self.service_ip)

        def dnat(port: int) -> dict[str, Any]:
            return {"dnat": {"family": "ip", "addr": svc, "port": port}}

        def rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
            return {"add": {"rule": o(chain=chain, expr=list(expr))}}

        def base_chain(name: str, kind: str, hook: str, prio: int) -> dict[str, Any]:
            chain = o(name=name, type=kind, hook=hook, prio=prio, policy="accept")
            return {"add": {"chain": chain}}

        def interval_set(name: str, kind: str, networks: Sequence[Network]) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = [
                {"add": {"set": o(name=name, type=kind, flags=["interval"])}}
            ]
            if networks:
                out.append({"add": {"element": o(name=name, elem=[_net(n) for n in networks])}})
            return out

        logged = self.nflog_group != 0
        # Refusals that are logged go through a chain of their own: a rate-limited log needs a
        # rule without the verdict, since ``limit`` stops the rule it is in once over its rate.
        refuse_never = {"goto": {"target": "refuse_never"}} if logged else _REJECT
        refuse = {"goto": {"target": "refuse"}} if logged else _REJECT
        log_rules: list[dict[str, Any]] = []
        if logged:
            # The set gets nft's "dynamic" flag from the rules updating it, which nft only sees
            # when they are in the same transaction (1.0.6's JSON cannot name the flag).
            budgets = o(name="log_budget", type="ipv4_addr", size=_LOG_BUDGETS,
                        flags=["timeout"], timeout=60)  # fmt: skip
            log_rules = [
                {"add": {"set": budgets}},
                {"add": {"chain": o(name="refuse_never")}},
                rule("refuse_never", *self._log(LOG_NEVER)),
                rule("refuse_never", _REJECT),
                {"add": {"chain": o(name="refuse")}},
                rule("refuse", *self._log(LOG_DENY)),
                rule("refuse", _REJECT),
                # After every filter (priority 0, and security at 50): only what was let
                # through gets here. A flow's first packet is the only one whose conntrack entry
                # is not confirmed yet; "ct state new" alone would also match every packet of a
                # flow that never got a reply.
                base_chain("forward_log", "filter", "forward", 100),
                rule("forward_log", sandbox_if,
                     _match("in", {"ct": {"key": "state"}}, "new"),
                     _match("!", {"ct": {"key": "status"}}, "confirmed"),
                     *self._log(LOG_ALLOW)),
            ]  # fmt: skip

        metadata_dnat: list[dict[str, Any]] = []
        metadata_in: list[dict[str, Any]] = []
        if self.metadata_port is not None:
            # Only this address and port of link-local space, and only to corral's endpoint:
            # the cloud's own metadata service behind the host stays out of reach.
            metadata_dnat = [
                rule("prerouting", sandbox_if, ipv4,
                     _match("==", _field("ip", "daddr"), METADATA_IP),
                     _match("==", _field("tcp", "dport"), 80), dnat(self.metadata_port)),
            ]  # fmt: skip
            metadata_in = [
                rule("from_sandbox_in", to_service,
                     _match("==", _field("tcp", "dport"), self.metadata_port), _ACCEPT),
            ]  # fmt: skip
        return [
            {"add": {"set": o(name="sandbox_ifaces", type="ifname")}},
            flow_cap_set(self.table),
            {"add": {"set": o(name="sandbox_addrs", type=["ifname", "ipv4_addr"])}},
            {"add": {"map": o(name="sandbox_chains", type="ifname", map="verdict")}},
            *interval_set("never_v4", "ipv4_addr", self._never[0]),
            *interval_set("never_v6", "ipv6_addr", self._never[1]),
            *interval_set("private_v4", "ipv4_addr", self._private[0]),
            *interval_set("private_v6", "ipv6_addr", self._private[1]),
            *log_rules,
            # --- DNAT: every DNS query to the resolver, every other TCP connection to the proxy.
            base_chain("prerouting", "nat", "prerouting", -100),
            *flow_cap_rules(self.table, "prerouting", "sandbox_ifaces", self.flow_limit),
            rule("prerouting", sandbox_if, ipv4, _match("==", _field("udp", "dport"), 53),
                 dnat(self.dns_port)),
            rule("prerouting", sandbox_if, ipv4, _match("==", _field("tcp", "dport"), 53),
                 dnat(self.dns_port)),
            *metadata_dnat,
            rule("prerouting", sandbox_if, ipv4, _l4("tcp"), dnat(self.proxy_port)),
            # --- to the host itself: the resolver, the proxy and ping on the service address.
            {"add": {"chain": o(name="from_sandbox_in")}},
            base_chain("input", "filter", "input", 0),
            rule("input", sandbox_if, {"jump": {"target": "from_sandbox_in"}}),
            rule("from_sandbox_in", ipv6, _DROP),
            rule("from_sandbox_in", spoofed, _DROP),
            rule("from_sandbox_in", established, _ACCEPT),
            rule("from_sandbox_in", to_service,
                 _match("==", _field("udp", "dport"), self.dns_port), _ACCEPT),
            rule("from_sandbox_in", to_service,
                 _match("==", _field("tcp", "dport"), self.dns_port), _ACCEPT),
            rule("from_sandbox_in", to_service,
                 _match("==", _field("tcp", "dport"), self.proxy_port), _ACCEPT),
            *metadata_in,
            rule("from_sandbox_in", to_service,
                 _match("==", _field("icmp", "type"), "echo-request"), _ACCEPT),
            rule("from_sandbox_in", _l4("tcp"), _TCP_RESET),
            rule("from_sandbox_in", _REJECT),
            # --- through the host: non-TCP only (TCP was redirected to the proxy).
            {"add": {"chain": o(name="from_sandbox_fwd")}},
            {"add": {"chain": o(name="to_sandbox_fwd")}},
            base_chain("forward", "filter", "forward", 0),
            rule("forward", sandbox_if, {"jump": {"target": "from_sandbox_fwd"}}),
            rule("forward", _match("==", _meta("oifname"), "@sandbox_ifaces"),
                 {"jump": {"target": "to_sandbox_fwd"}}),
            rule("from_sandbox_fwd", ipv6, _DROP),
            rule("from_sandbox_fwd", spoofed, _DROP),
            rule("from_sandbox_fwd", established, _ACCEPT),
            rule("from_sandbox_fwd", _match("==", _meta("oifname"), "@sandbox_ifaces"),
                 refuse_never),
            rule("from_sandbox_fwd", _l4("tcp"), _TCP_RESET),
            rule("from_sandbox_fwd", _match("==", _field("ip", "daddr"), "@never_v4"),
                 refuse_never),
            rule("from_sandbox_fwd", _match("==", _field("ip6", "daddr"), "@never_v6"),
                 refuse_never),
            rule("from_sandbox_fwd", {"vmap": {"key": _meta("iifname"), "data": "@sandbox_chains"}}),
            rule("from_sandbox_fwd", refuse),
            # Nothing reaches a sandbox from outside except replies; the host's own processes
            # (ingress) go through output, not here.
            rule("to_sandbox_fwd", established, _ACCEPT),
            rule("to_sandbox_fwd", _DROP),
            # --- out to the world under the host's address.
            base_chain("postrouting", "nat", "postrouting", 100),
            rule("postrouting",
                 _match("==", _field("ip", "saddr"), _net(self.subnet)),
                 _match("!=", _meta("oifname"), "@sandbox_ifaces"),
                 {"masquerade": None}),
        ]  # fmt: skip

    def _log(self, prefix: str) -> list[dict[str, Any]]:
        """Statements logging a sandbox's packet to NFLOG within its address's rate limit and
        the overall one (a rule breaks off at the first limit that is over)."""
        return [
            {
                "set": {
                    "op": "update",
                    "elem": _field("ip", "saddr"),
                    "set": "@log_budget",
                    "stmt": [{"limit": {"rate": _LOG_RATE, "burst": _LOG_BURST, "per": "second"}}],
                }
            },
            {"limit": {"rate": _LOG_TOTAL_RATE, "burst": _LOG_TOTAL_BURST, "per": "second"}},
            {"log": {"prefix": prefix, "group": self.nflog_group, "snaplen": _LOG_SNAPLEN}},
        ]

    def _sandbox_commands(
        self, sb: FirewallSandbox, previous: FirewallSandbox | None
    ) -> list[dict[str, Any]]:
        o = self._obj
        chain = _chain_name(sb.sandbox_id)
        commands: list[dict[str, Any]] = []
        if previous is not None and (previous.iface, previous.address) != (sb.iface, sb.address):
            commands += self._drop_membership(previous.iface, previous.address, chain)
        commands += [
            {"add": {"element": o(name="sandbox_ifaces", elem=[sb.iface])}},
            {
                "add": {
                    "element": o(
                        name="sandbox_addrs", elem=[{"concat": [sb.iface, str(sb.address)]}]
                    )
                }
            },
            {"add": {"chain": o(name=chain)}},
            {"flush": {"chain": o(name=chain)}},
        ]
        for rule in sb.denies:
            commands.append({"add": {"rule": o(chain=chain, expr=self._rule(rule, allow=False))}})
        for rule in sb.forward:
            commands.append({"add": {"rule": o(chain=chain, expr=self._rule(rule, allow=True))}})
        commands.append(
            {
                "add": {
                    "element": o(
                        name="sandbox_chains", elem=[[sb.iface, {"jump": {"target": chain}}]]
                    )
                }
            }
        )
        return commands

    def _rule(self, rule: ForwardRule, *, allow: bool) -> list[dict[str, Any]]:
        network = rule.network
        v6 = network.version == 6
        proto = "ip6" if v6 else "ip"
        expr: list[dict[str, Any]] = []
        if network.prefixlen == 0:
            expr.append(_match("==", _meta("nfproto"), "ipv6" if v6 else "ipv4"))
        else:
            expr.append(_match("==", _field(proto, "daddr"), _net(network)))
        if rule.except_private and allow:
            expr.append(_match("!=", _field(proto, "daddr"), f"@private_v{network.version}"))
        ports = _ports(rule.ports) if rule.ports is not None else None
        if rule.protocol == "icmp":
            expr.append(_l4("ipv6-icmp" if v6 else "icmp"))
        elif rule.protocol == "udp":
            if ports is None:
                expr.append(_l4("udp"))
            else:
                expr.append(_match("==", _field("udp", "dport"), ports))
        elif ports is not None:  # "any" with ports: every non-TCP protocol that has ports
            expr.append(_match("==", _meta("l4proto"), {"set": list(_ANY_PORT_PROTOCOLS)}))
            expr.append(_match("==", _field("th", "dport"), ports))
        expr.append(_ACCEPT if allow else _REJECT)
        return expr

    def _drop_membership(
        self, iface: str, address: IPv4Address, chain: str
    ) -> list[dict[str, Any]]:
        # Each element is added before it is deleted so the deletion cannot fail when it is
        # already gone; the chain must exist for the map element to be added.
        o = self._obj
        pair = {"concat": [iface, str(address)]}
        verdict = [iface, {"jump": {"target": chain}}]
        return [
            {"add": {"chain": o(name=chain)}},
            {"add": {"element": o(name="sandbox_chains", elem=[verdict])}},
            {"delete": {"element": o(name="sandbox_chains", elem=[iface])}},
            {"add": {"element": o(name="sandbox_ifaces", elem=[iface])}},
            {"delete": {"element": o(name="sandbox_ifaces", elem=[iface])}},
            {"add": {"element": o(name="sandbox_addrs", elem=[pair])}},
            {"delete": {"element": o(name="sandbox_addrs", elem=[pair])}},
        ]

    def _drop_chain(self, chain: str) -> list[dict[str, Any]]:
        o = self._obj
        return [
            {"add": {"chain": o(name=chain)}},
            {"flush": {"chain": o(name=chain)}},
            {"delete": {"chain": o(name=chain)}},
        ]

    # ------------------------------------------------------------------ nft

    async def _find_sandbox(self, sandbox_id: str) -> list[tuple[str, IPv4Address]] | None:
        """(iface, address) pairs the table holds for ``sandbox_id``; None without a table."""
        code, out, err = await self._exec(["-j", "list", "table", "inet", self.table], None)
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise RuntimeFailure(f"listing firewall table {self.table} failed: {err.strip()}")
        chain = _chain_name(sandbox_id)
        ifaces: set[str] = set()
        pairs: list[tuple[str, IPv4Address]] = []
        items = json.loads(out).get("nftables", [])
        for item in items:
            m = item.get("map")
            if m and m.get("name") == "sandbox_chains":
                for key, value in m.get("elem", []):
                    if value.get("jump", {}).get("target") == chain:
                        ifaces.add(key)
        for item in items:
            s = item.get("set")
            if s and s.get("name") == "sandbox_addrs":
                for elem in s.get("elem", []):
                    iface, address = elem["concat"]
                    if iface in ifaces:
                        pairs.append((iface, IPv4Address(address)))
        # An interface in the map without an address pair still has to leave the sets.
        for iface in ifaces - {p[0] for p in pairs}:
            pairs.append((iface, IPv4Address(0)))
        return pairs

    async def _run(self, commands: list[dict[str, Any]], what: str) -> None:
        payload = json.dumps({"nftables": commands}).encode()
        code, _out, err = await self._exec(["-j", "-f", "-"], payload)
        if code != 0:
            raise RuntimeFailure(f"{what} failed: nft: {err.strip() or f'exit status {code}'}")

    async def _exec(self, args: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        """``nft -j <args>`` (``stdin``: the ruleset for ``-f -``), in-process through
        libnftables when it loads (~1 ms; spawning nft costs ~6 ms of every create), else the
        nft binary."""
        if self._lib is None:
            self._lib = _LibNftables.load() or False
        if self._lib:
            text = stdin.decode() if stdin is not None else " ".join(args[1:])
            return await asyncio.to_thread(self._lib.run, text)
        return await self._exec_binary(args, stdin)

    async def _exec_binary(self, args: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        # The ruleset goes in as a memfd, not a pipe: under uvloop (uvicorn's loop) subprocess
        # pipes are sockets, and nft's open("/dev/stdin") of a socket fails with ENXIO.
        source = os.memfd_create("corral-nft", os.MFD_CLOEXEC) if stdin is not None else None
        try:
            if source is not None and stdin:
                os.write(source, stdin)
                os.lseek(source, 0, os.SEEK_SET)
            proc = await asyncio.create_subprocess_exec(
                self._nft,
                *args,
                stdin=source if source is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
        except OSError as exc:
            raise RuntimeFailure(f"cannot run {self._nft}: {exc}") from exc
        finally:
            if source is not None:
                os.close(source)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


class _LibNftables:
    """The nft command line's own library, called in-process with JSON in and out."""

    _OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON: also makes it parse JSON input (1.0.x)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_int
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int

    @classmethod
    def load(cls) -> _LibNftables | None:
        try:
            return cls(ctypes.CDLL("libnftables.so.1"))
        except (OSError, AttributeError):
            return None

    def run(self, text: str) -> tuple[int, str, str]:
        """(status, output, errors) of one nft command or JSON ruleset; a context per call, so
        calls from several threads never share state."""
        lib = self._lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            return 1, "", "libnftables: cannot create a context"
        try:
            lib.nft_ctx_output_set_flags(ctx, self._OUTPUT_JSON)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            code = lib.nft_run_cmd_from_buffer(ctx, text.encode())
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
            return (
                (0 if code == 0 else 1),
                out.decode(errors="replace"),
                err.decode(errors="replace"),
            )
        finally:
            lib.nft_ctx_free(ctx)


# ---------------------------------------------------------------------- expressions


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _field(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(op: str, left: Any, right: Any) -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _l4(protocol: str) -> dict[str, Any]:
    return _match("==", _meta("l4proto"), protocol)


def _net(network: Network) -> Any:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _ports(ranges: Iterable[tuple[int, int]]) -> Any:
    """Port ranges as an nft value: one port, one range, or an anonymous set of them."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    items: list[Any] = [low if low == high else {"range": [low, high]} for low, high in merged]
    if len(items) == 1:
        return items[0]
    return {"set": items}


def _chain_name(sandbox_id: str) -> str:
    return "sbx_" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:10]


def _split_families(networks: Iterable[Network]) -> tuple[list[Network], list[Network]]:
    networks = list(networks)
    v4 = [n for n in networks if isinstance(n, IPv4Network)]
    v6 = [n for n in networks if isinstance(n, IPv6Network)]
    # Overlapping intervals in one "add element" are an error; merge them first.
    return list(ipaddress.collapse_addresses(v4)), list(ipaddress.collapse_addresses(v6))


def _check_sandbox(sb: FirewallSandbox) -> None:
    if not _IFACE.fullmatch(sb.iface):
        raise InvalidRequestError(f"interface name {sb.iface!r} of sandbox {sb.sandbox_id}")
