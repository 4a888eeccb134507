"""Sandbox networking for every tier: addresses, plumbing, firewall, resolver, proxy, egress log.

Runtimes never set up networks: this service prepares a namespace before the runtime starts the
sandbox in it, and removes it after the runtime is done. Enforcement lives below the sandbox
(nftables, the resolver and the proxy on the host), so nothing depends on the sandbox behaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.config import NetworkConfig
from corral.errors import ConflictError, InvalidRequestError, QuotaExceededError, RuntimeFailure
from corral.net.conntrack import forget_flows
from corral.net.dns import DnsResolver, Upstream, upstreams_from_resolv_conf
from corral.net.firewall import Firewall, FirewallSandbox
from corral.net.hostinfo import overlapping_routes
from corral.net.metadata import Labels, MetadataServer, Mint
from corral.net.nflog import NflogListener
from corral.net.plumbing import Plumbing
from corral.net.policy import (
    AddressGuard,
    CompiledPolicy,
    NetworkPolicy,
    compile_policy,
    parse_policy,
)
from corral.net.proxy import EgressProxy, SecretValues
from corral.net.view import EgressEvent, NetRegistry, SandboxNet, SandboxSecrets
from corral.store import EgressEventRow, Store

__all__ = ["Attachment", "NetworkService", "parse_upstream", "purge_network"]

log = logging.getLogger("corral.network")

# Events wait in memory at most this long before they are written, in one transaction.
_FLUSH_INTERVAL_S = 0.5
# Beyond this many unwritten events new ones are counted and dropped, so a sandbox that opens
# connections in a loop cannot grow the server's memory without bound.
_MAX_PENDING_EVENTS = 20000


@dataclass(frozen=True)
class Attachment:
    """What a runtime needs to start a sandbox inside its prepared network."""

    netns: Path
    address: str


def parse_upstream(text: str) -> tuple[str, int]:
    """``"ip"``, ``"ip:port"`` or ``"[ipv6]:port"`` → (ip, port)."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":"))
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


class _AddressPool:
    """Sandbox addresses of the subnet, handed out round-robin so a freed one rests a while
    (late packets and conntrack entries of the old sandbox never meet a new one)."""

    def __init__(self, subnet: ipaddress.IPv4Network, service_ip: ipaddress.IPv4Address) -> None:
        self._first = int(service_ip) + 1
        self._last = int(subnet.broadcast_address) - 1
        self._used: set[int] = set()
        self._cursor = self._first

    def claim(self, address: str) -> None:
        self._used.add(int(ipaddress.IPv4Address(address)))

    def allocate(self) -> str:
        size = self._last - self._first + 1
        for i in range(size):
            candidate = self._first + (self._cursor - self._first + i) % size
            if candidate not in self._used:
                self._used.add(candidate)
                self._cursor = candidate + 1 if candidate < self._last else self._first
                return str(ipaddress.IPv4Address(candidate))
        raise QuotaExceededError("no free sandbox address left in the network subnet")

    def release(self, address: str) -> None:
        self._used.discard(int(ipaddress.IPv4Address(address)))


class NetworkService:
    def __init__(self, config: NetworkConfig, store: Store) -> None:
        self._cfg = config
        self._store = store
        self._subnet = config.network
        self._service_ip = config.service_ip
        self.registry = NetRegistry()
        self._guard = AddressGuard(extra_never=[self._subnet])
        self._pool = _AddressPool(self._subnet, self._service_ip)
        self._plumbing = Plumbing(
            prefix=config.prefix, subnet=self._subnet, service_ip=self._service_ip
        )
        self._firewall = Firewall(
            config.nft_table,
            service_ip=self._service_ip,
            subnet=self._subnet,
            dns_port=config.dns_port,
            proxy_port=config.proxy_port,
            guard=self._guard,
            metadata_port=config.metadata_port,
            nflog_group=config.nflog_group,
            flow_limit=config.max_flows_per_sandbox,
        )
        self._nflog: NflogListener | None = None
        self._upstream: Upstream | None = None
        self._resolver: DnsResolver | None = None
        self._proxy: EgressProxy | None = None
        self._metadata_source: tuple[Mint, Labels] | None = None
        self._secret_values: SecretValues | None = None
        self._metadata: MetadataServer | None = None
        self._pending: list[EgressEvent] = []
        self._dropped_events = 0
        self._flusher: asyncio.Task[None] | None = None

    def serve_metadata(self, mint: Mint, labels: Labels) -> None:
        """Answer sandboxes at 169.254.169.254 (from ``start`` on): identity tokens from
        ``mint``, labels from ``labels`` (both by sandbox id)."""
        self._metadata_source = (mint, labels)

    def serve_secrets(self, values: SecretValues) -> None:
        """Let the egress proxy inject secrets (from ``start`` on), reading them from
        ``values`` (tenant, names) per intercepted connection."""
        self._secret_values = values

    def _upstream_tls(self) -> ssl.SSLContext:
        """How the proxy verifies the hosts it sends secrets to: the host's trust store, plus
        ``network.upstream_ca_file`` when set."""
        ctx = ssl.create_default_context()
        path = self._cfg.upstream_ca_file
        if path is not None:
            try:
                ctx.load_verify_locations(cafile=str(path))
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeFailure(
                    f"network.upstream_ca_file {path}: cannot load CA certificates ({exc})"
                ) from exc
        return ctx

    # --- policies -----------------------------------------------------------------------------
    def parse(self, data: Any) -> NetworkPolicy:
        """A policy from API input; ``InvalidRequestError`` naming the bad rule otherwise."""
        policy = parse_policy({} if data is None else data)
        self.compile(policy)
        return policy

    def compile(self, policy: NetworkPolicy) -> CompiledPolicy:
        rate = policy.egress_mbit
        if rate is not None and not 0 <= rate <= self._cfg.max_egress_mbit:
            raise InvalidRequestError(
                f"egress_mbit must be between 0 (unlimited) and {self._cfg.max_egress_mbit}, "
                f"got {rate}"
            )
        compiled = compile_policy(policy, self._guard)
        for i, rule in enumerate(policy.allow, 1):
            if rule.cidr is not None and ipaddress.ip_network(rule.cidr, strict=False).version == 6:
                raise InvalidRequestError(
                    f"allow rule {i}: IPv6 egress is not available yet (sandboxes have IPv4 "
                    f"only, so {rule.cidr} could never be reached)"
                )
        return compiled

    def _rate(self, policy: NetworkPolicy) -> float:
        return (
            policy.egress_mbit if policy.egress_mbit is not None else self._cfg.default_egress_mbit
        )

    def _fw(self, sandbox_id: str, address: str, compiled: CompiledPolicy) -> FirewallSandbox:
        return FirewallSandbox(
            sandbox_id=sandbox_id,
            iface=self._plumbing.host_iface(sandbox_id),
            address=ipaddress.IPv4Address(address),
            forward=compiled.forward_rules(),
            denies=compiled.forward_denies(),
        )

    @property
    def service_ip(self) -> str:
        return str(self._service_ip)

    @property
    def proxy_url(self) -> str:
        return f"http://{self._service_ip}:{self._cfg.proxy_port}"

    # --- start and stop -----------------------------------------------------------------------
    async def start(
        self,
        live: Iterable[tuple[str, str, str, Mapping[str, Any] | None, SandboxSecrets | None]],
    ) -> None:
        """Bring the host side up and re-adopt ``live`` (sandbox id, tenant, address, policy,
        secret bindings).

        Network state of any other sandbox of ours found on the host is removed.
        """
        # First: a bad CA file must stop the start before anything is set up.
        upstream_tls = self._upstream_tls() if self._secret_values is not None else None
        clash = await asyncio.to_thread(overlapping_routes, self._subnet, self._cfg.prefix)
        if clash:
            raise RuntimeFailure(
                f"the sandbox subnet {self._subnet} overlaps host routes ({', '.join(clash)}); "
                "choose another network.subnet"
            )
        forwarding = Path("/proc/sys/net/ipv4/ip_forward")
        if forwarding.exists() and forwarding.read_text().strip() == "0":
            # TCP (through the proxy) and DNS never forward; only UDP/ICMP opened by a CIDR rule
            # do, and their replies come in through the uplink, which routes only with this on.
            log.warning(
                "net.ipv4.ip_forward is 0: UDP and ICMP allowed by CIDR rules will not get "
                "through (TCP and DNS are unaffected); set it to 1 to enable them"
            )
        adopted: list[tuple[SandboxNet, FirewallSandbox]] = []
        keep: set[str] = set()
        for sid, tenant, address, document, bound in live:
            try:
                policy = self.parse(document)
                compiled = self.compile(policy)
            except InvalidRequestError as exc:  # a policy stored by an older, laxer version
                log.warning("sandbox %s: stored policy no longer valid (%s); denying all", sid, exc)
                policy = NetworkPolicy()
                compiled = self.compile(policy)
            self._pool.claim(address)
            net = SandboxNet(sid, tenant, ipaddress.IPv4Address(address), compiled, secrets=bound)
            adopted.append((net, self._fw(sid, address, compiled)))
            keep.add(sid)
        await asyncio.to_thread(self._plumbing.ensure_service_iface)
        for sid in set(await asyncio.to_thread(self._plumbing.list_sandboxes)) - keep:
            log.warning("removing orphaned network of sandbox %s", sid)
            with contextlib.suppress(RuntimeFailure):
                await asyncio.to_thread(self._plumbing.destroy, sid)
        await self._firewall.reset([fw for _, fw in adopted])
        for net, _ in adopted:
            self.registry.add(net)
        if self._cfg.nflog_group:
            # Before the resolver and proxy start: a group in use leaves nothing running.
            self._nflog = NflogListener(self._cfg.nflog_group, self.registry, self._sink)
            await self._nflog.start()

        servers = [parse_upstream(u) for u in self._cfg.dns_upstreams]
        if not servers:
            servers = upstreams_from_resolv_conf()
        self._upstream = Upstream(servers)
        self._resolver = DnsResolver(
            self.registry,
            self._upstream,
            self._sink,
            host=str(self._service_ip),
            port=self._cfg.dns_port,
        )
        self._proxy = EgressProxy(
            self.registry,
            self._upstream.resolve,
            self._sink,
            host=str(self._service_ip),
            port=self._cfg.proxy_port,
            secret_values=self._secret_values,
            upstream_tls=upstream_tls,
        )
        await self._resolver.start()
        await self._proxy.start()
        if self._cfg.metadata_port is not None and self._metadata_source is not None:
            self._metadata = MetadataServer(
                self.registry,
                *self._metadata_source,
                host=str(self._service_ip),
                port=self._cfg.metadata_port,
            )
            await self._metadata.start()
        self._flusher = asyncio.create_task(self._flush_forever(), name="corral-egress-log")

    async def stop(self) -> None:
        """Stop the host services. Sandboxes, their namespaces and the firewall stay: while no
        server runs, their TCP meets a closed proxy port and their DNS no answer (fail closed)."""
        if self._metadata is not None:
            await self._metadata.stop()
        if self._proxy is not None:
            await self._proxy.stop()
        if self._resolver is not None:
            await self._resolver.stop()
        if self._upstream is not None:
            await self._upstream.close()
        if self._nflog is not None:
            await self._nflog.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush()

    # --- per sandbox --------------------------------------------------------------------------
    async def attach(
        self,
        sandbox_id: str,
        tenant_id: str,
        policy: NetworkPolicy,
        *,
        join: Path | None = None,
        secrets: SandboxSecrets | None = None,
    ) -> Attachment:
        """Plumb a namespace for a new sandbox (``join``: the one its runtime made; else a new
        one); on failure nothing is left. ``secrets``: what the proxy injects toward which
        hosts."""
        if self.registry.get(sandbox_id) is not None:
            raise ConflictError(f"sandbox {sandbox_id} already has a network")
        compiled = self.compile(policy)
        address = self._pool.allocate()
        rate = self._rate(policy)
        try:
            netns = await asyncio.to_thread(
                self._plumbing.create, sandbox_id, ipaddress.IPv4Address(address), rate, join
            )
            await self._firewall.add_sandbox(self._fw(sandbox_id, address, compiled))
        except BaseException:
            await asyncio.shield(self._undo(sandbox_id, address))
            raise
        self.registry.add(
            SandboxNet(
                sandbox_id, tenant_id, ipaddress.IPv4Address(address), compiled, secrets=secrets
            )
        )
        return Attachment(netns=netns, address=address)

    def netns_of(self, sandbox_id: str) -> Path | None:
        """The plumbed namespace of an attached sandbox (for a restart that keeps its network)."""
        if self.registry.get(sandbox_id) is None:
            return None
        path = self._plumbing.netns_path(sandbox_id)
        return path if path.exists() else None

    async def _undo(self, sandbox_id: str, address: str) -> None:
        with contextlib.suppress(RuntimeFailure):
            await self._firewall.remove_sandbox(sandbox_id)
        with contextlib.suppress(RuntimeFailure):
            await asyncio.to_thread(self._plumbing.destroy, sandbox_id)
        self._pool.release(address)

    async def detach(self, sandbox_id: str, address: str | None) -> None:
        """Remove everything of the sandbox's network; idempotent. Raises ``RuntimeFailure``
        (after trying every step) when something could not be removed."""
        self.registry.remove(sandbox_id)
        if self._metadata is not None:
            self._metadata.forget(sandbox_id)
        if self._proxy is not None:
            self._proxy.close_sandbox(sandbox_id)
        errors: list[str] = []
        try:
            await self._firewall.remove_sandbox(sandbox_id)
        except RuntimeFailure as exc:
            errors.append(exc.message)
        try:
            await asyncio.to_thread(self._plumbing.destroy, sandbox_id)
        except RuntimeFailure as exc:
            errors.append(exc.message)
        if address:
            # Its conntrack entries would otherwise meet the next sandbox given this address.
            try:
                await asyncio.to_thread(forget_flows, ipaddress.IPv4Address(address))
            except RuntimeFailure as exc:
                errors.append(exc.message)
        if errors:
            raise RuntimeFailure("; ".join(errors))
        if address:
            self._pool.release(address)

    async def update(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        """Apply a new policy to a running sandbox: all of it, or (on any failure) none of it."""
        net = self.registry.get(sandbox_id)
        if net is None:
            raise RuntimeFailure(f"sandbox {sandbox_id} has no network to update")
        compiled = self.compile(policy)
        old_rate = self._rate(net.policy.source)
        new_rate = self._rate(policy)
        await self._firewall.update_sandbox(self._fw(sandbox_id, str(net.address), compiled))
        if new_rate != old_rate:
            try:
                await asyncio.to_thread(self._plumbing.set_egress_rate, sandbox_id, new_rate)
            except RuntimeFailure:
                # Put the old rules back so the update is all or nothing.
                await self._firewall.update_sandbox(
                    self._fw(sandbox_id, str(net.address), net.policy)
                )
                raise
        # New connections and queries see the new policy from here on; pins made under the old
        # one must not outlive it.
        net.policy = compiled
        net.pins.clear()
        # UDP flows already in conntrack would otherwise outlive a narrowed policy (the forward
        # chain accepts established flows first). Proxied TCP is left alone: its entries belong
        # to connections that were allowed when they started, and deleting them breaks them.
        try:
            await asyncio.to_thread(
                forget_flows, ipaddress.IPv4Address(str(net.address)), keep_tcp=True
            )
        except RuntimeFailure as exc:  # the policy itself is in force already
            log.warning("sandbox %s: %s", sandbox_id, exc.message)

    # --- egress log ---------------------------------------------------------------------------
    def _sink(self, event: EgressEvent) -> None:
        if len(self._pending) >= _MAX_PENDING_EVENTS:
            self._dropped_events += 1
            return
        self._pending.append(event)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_INTERVAL_S)
            try:
                await self._flush()
            except Exception:
                log.exception("writing the egress log failed")

    async def _flush(self) -> None:
        if self._dropped_events:
            log.warning("egress log: %d events dropped (writer behind)", self._dropped_events)
            self._dropped_events = 0
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        await self._store.add_egress_events(
            [
                EgressEventRow(
                    sandbox_id=e.sandbox_id,
                    time=e.time,
                    kind=e.kind,
                    decision=e.decision,
                    reason=e.reason[:1000],
                    name=e.name[:256] if e.name else None,
                    ip=e.ip[:256] if e.ip else None,
                    port=e.port,
                    bytes_out=e.bytes_out,
                    bytes_in=e.bytes_in,
                )
                for e in batch
            ]
        )

    async def events(
        self, sandbox_id: str, *, after_id: int = 0, limit: int = 1000
    ) -> Sequence[EgressEventRow]:
        await self._flush()  # what happened until now is visible now
        return await self._store.egress_events(sandbox_id, after_id=after_id, limit=limit)


async def purge_network(config: NetworkConfig) -> None:
    """Remove every host object of a network configuration: sandbox namespaces and veths, the
    nft table, the service interface. For tests and uninstalling; a server never calls it."""
    plumbing = Plumbing(prefix=config.prefix, subnet=config.network, service_ip=config.service_ip)
    errors: list[str] = []
    for sid in await asyncio.to_thread(plumbing.list_sandboxes):
        try:
            await asyncio.to_thread(plumbing.destroy, sid)
        except RuntimeFailure as exc:
            errors.append(exc.message)
    firewall = Firewall(
        config.nft_table,
        service_ip=config.service_ip,
        subnet=config.network,
        dns_port=config.dns_port,
        proxy_port=config.proxy_port,
        guard=AddressGuard(extra_never=[config.network]),
    )
    await firewall.delete()
    await asyncio.to_thread(plumbing.remove_service_iface)
    if errors:
        raise RuntimeFailure("; ".join(errors))
