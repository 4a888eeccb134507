"""The resolver sandboxes talk to: it answers only names their policy allows.

Every UDP/TCP packet to port 53 from a sandbox is redirected here by the firewall. The caller is
known only by the packet's source address. A name the policy refuses is answered NXDOMAIN locally
and no query for it ever leaves the host, so DNS cannot carry data out. For an allowed name the
resolver sends a query it builds itself (lower-cased name, fresh id, no client EDNS options or
extra records), so nothing the client chose beyond the name and type reaches the upstream, and it
strips addresses the policy refuses from the answer (DNS rebinding) before pinning the rest for
the egress proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.net.view import EgressEvent, EventSink, IPAddress, NetRegistry, SandboxNet

if TYPE_CHECKING:
    from corral.net.policy import Decision

__all__ = ["DnsResolver", "Upstream", "upstreams_from_resolv_conf"]

_log = logging.getLogger(__name__)

# Payload we advertise (to clients and upstreams): the DNS flag day 2020 value, small enough to
# avoid IP fragmentation on any sane path.
_EDNS_PAYLOAD = 1232
# A query is one name and a few options; anything longer is not a query we would answer.
_MAX_QUERY = 4096
_HEADER = 12
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
# Hostname labels only: escaped dots, NULs or spaces inside a label would let a name that reads as
# "x.allowed.example" to a string-matching policy be a different name on the wire.
_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}\Z")
_MAX_EVENT_IPS = 8
_MAX_STRIPPED_EVENTS = 8
# Keeps unknown sources (which the firewall should never let in) from using us as a reflector.
_UNKNOWN_RATE = 50.0
_MAX_PENDING_UDP = 4096
_MAX_TCP_TOTAL = 1024
_MAX_INFLIGHT_PER_SOURCE = 128
# The proxy's own lookups (Upstream.resolve): cache bounds.
_MAX_TTL_S = 300.0
_NEGATIVE_TTL_S = 5.0
_MAX_CACHED_NAMES = 10000


def upstreams_from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> list[tuple[str, int]]:
    """The ``nameserver`` entries of a resolv.conf (port 53); malformed lines are skipped."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    servers: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = re.split(r"[#;]", line, maxsplit=1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = str(ipaddress.ip_address(fields[1]))
        except ValueError:
            continue
        if (address, 53) not in servers:
            servers.append((address, 53))
    return servers


def _hostname(name: dns.name.Name) -> str | None:
    """``name`` as lower-case text without the final dot, or None if it is not a hostname."""
    labels = name.labels[:-1] if name.is_absolute() else name.labels
    if not labels or not all(_LABEL.match(label) for label in labels):
        return None
    return b".".join(labels).decode("ascii").lower()


def _fresh_query(name: str, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
    # make_query picks a random id and sets RD; EDNS0 with our payload and no options at all.
    return dns.message.make_query(
        dns.name.from_text(name), rdtype, dns.rdataclass.IN, use_edns=0, payload=_EDNS_PAYLOAD
    )


def _chain(response: dns.message.Message, qname: dns.name.Name) -> set[dns.name.Name]:
    """``qname`` and the names its CNAME chain in ``response`` leads to."""
    names = {qname}
    changed = True
    while changed:
        changed = False
        for rrset in response.answer:
            if rrset.rdtype != dns.rdatatype.CNAME or rrset.name not in names:
                continue
            for rdata in rrset:
                if rdata.target not in names:
                    names.add(rdata.target)
                    changed = True
    return names


class Upstream:
    """The recursive resolvers the host uses, asked in order until one answers."""

    def __init__(self, servers: Sequence[tuple[str, int]], timeout: float = 2.0) -> None:
        checked: list[tuple[str, int]] = []
        for host, port in servers:
            try:
                address = str(ipaddress.ip_address(host))
            except ValueError:
                raise InvalidRequestError(f"DNS upstream {host!r} is not an IP address") from None
            if not 0 < port < 65536:
                raise InvalidRequestError(f"DNS upstream {host} has bad port {port}")
            checked.append((address, port))
        self._servers = checked
        self._timeout = timeout
        self._resolved: dict[str, tuple[float, list[tuple[IPAddress, float]]]] = {}
        self._resolving: dict[str, asyncio.Future[list[tuple[IPAddress, float]]]] = {}

    @property
    def servers(self) -> list[tuple[str, int]]:
        return list(self._servers)

    async def query(self, request: dns.message.Message) -> dns.message.Message:
        """Send ``request`` by UDP (TCP when truncated), trying the next server on failure.

        A server answering SERVFAIL/REFUSED/NOTIMP counts as a failure; if every server failed
        that way the last such answer is returned. Raises RuntimeFailure when none answered.
        """
        failures: list[str] = []
        last: dns.message.Message | None = None
        for host, port in self._servers:
            try:
                # A new socket per query: the kernel picks a random source port, and
                # ignore_errors keeps waiting past spoofed or mismatched replies.
                response, _ = await dns.asyncquery.udp_with_fallback(
                    request,
                    host,
                    timeout=self._timeout,
                    port=port,
                    ignore_unexpected=True,
                    ignore_errors=True,
                )
            except Exception as e:  # foreign boundary: dnspython, sockets
                failures.append(f"{host}:{port}: {type(e).__name__} {e}".strip())
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP):
                failures.append(f"{host}:{port}: {dns.rcode.to_text(rcode)}")
                last = response
                continue
            return response
        if last is not None:
            return last
        what = request.question[0].name.to_text() if request.question else "query"
        detail = "; ".join(failures) or "no upstream servers configured"
        raise RuntimeFailure(f"every DNS upstream failed for {what}: {detail}")

    async def resolve(self, name: str) -> list[tuple[IPAddress, float]]:
        """A and AAAA addresses of ``name`` with their TTLs; empty for NXDOMAIN, no data, or a
        name that is not a valid hostname. Raises RuntimeFailure only when both lookups failed.

        Answers are cached for their TTL (at most 5 minutes; "no address" for 5 s) and lookups
        of one name in flight are shared: every proxied connection resolves its name, and two
        upstream round trips per connection would dominate its added latency.
        """
        key = name.rstrip(".").lower()
        now = time.monotonic()
        cached = self._resolved.get(key)
        if cached is not None and cached[0] > now:
            return [(ip, max(0.0, cached[0] - now)) for ip, _ in cached[1]]
        pending = self._resolving.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._resolve_uncached(key))
            self._resolving[key] = pending
            pending.add_done_callback(lambda _f: self._resolving.pop(key, None))
        found = await asyncio.shield(pending)
        ttl = min((t for _, t in found), default=_NEGATIVE_TTL_S)
        if len(self._resolved) >= _MAX_CACHED_NAMES:
            self._resolved.clear()
        self._resolved[key] = (time.monotonic() + min(ttl, _MAX_TTL_S), found)
        return found

    async def _resolve_uncached(self, name: str) -> list[tuple[IPAddress, float]]:
        try:
            qname = dns.name.from_text(name.rstrip("."))
        except dns.exception.DNSException:
            return []
        host = _hostname(qname)
        if host is None:
            return []
        results = await asyncio.gather(
            self._addresses(host, dns.rdatatype.A),
            self._addresses(host, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        found: list[tuple[IPAddress, float]] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                errors.append(result)
            else:
                found.extend(result)
        if len(errors) == len(results):
            if isinstance(errors[0], RuntimeFailure):
                raise errors[0]
            raise RuntimeFailure(f"resolving {host} failed: {errors[0]}") from errors[0]
        return found

    async def _addresses(
        self, host: str, rdtype: dns.rdatatype.RdataType
    ) -> list[tuple[IPAddress, float]]:
        response = await self.query(_fresh_query(host, rdtype))
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return []
        if rcode != dns.rcode.NOERROR:
            raise RuntimeFailure(f"DNS upstream answered {dns.rcode.to_text(rcode)} for {host}")
        qname = dns.name.from_text(host)
        names = _chain(response, qname)
        out: list[tuple[IPAddress, float]] = []
        for rrset in response.answer:
            if rrset.rdtype != rdtype or rrset.name not in names:
                continue
            for rdata in rrset:
                with contextlib.suppress(ValueError):
                    ip = ipaddress.ip_address(rdata.address)
                    if all(ip != seen for seen, _ in out):
                        out.append((ip, float(rrset.ttl)))
        return out

    async def close(self) -> None:
        """Nothing is held between queries (a socket per query); kept for symmetry."""


class _RateLimiter:
    """Token buckets by key; idle (full) buckets are forgotten so keys cannot grow memory."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> bool:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            self._prune(now)
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        full_after = self._burst / self._rate if self._rate > 0 else float("inf")
        for key in [k for k, (_, stamp) in self._buckets.items() if now - stamp >= full_after]:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:
            self._buckets.pop(next(iter(self._buckets)))


def _raw_reply(wire: bytes, rcode: int) -> bytes:
    """A header-only answer for a query we will not (or cannot) parse."""
    flags = 0x80 | (wire[2] & 0x79)  # QR, the query's opcode and RD
    return wire[:2] + bytes([flags, 0x80 | (rcode & 0x0F)]) + bytes(8)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, resolver: DnsResolver) -> None:
        self._resolver = resolver
        # Set while the kernel send buffer is full: replies are dropped rather than queued
        # without bound in asyncio.
        self.paused = False

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._resolver._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for replies to vanished clients; nothing to do.
        _log.debug("dns udp error: %s", exc)


class DnsResolver:
    """UDP and TCP DNS service on ``host:port`` for the sandboxes in ``registry``."""

    def __init__(
        self,
        registry: NetRegistry,
        upstream: Upstream,
        sink: EventSink,
        *,
        host: str,
        port: int,
        rate: float = 200.0,
        burst: float = 400.0,
        tcp_idle_timeout: float = 10.0,
        max_tcp_per_source: int = 32,
        ipv6: bool = False,
    ) -> None:
        self._registry = registry
        self._upstream = upstream
        self._sink = sink
        self._host = host
        self._requested_port = port
        self._port = port
        self._limiter = _RateLimiter(rate, burst)
        self._unknown_limiter = _RateLimiter(_UNKNOWN_RATE, 2 * _UNKNOWN_RATE, max_keys=1)
        self._tcp_idle = tcp_idle_timeout
        self._max_tcp_per_source = max_tcp_per_source
        self._ipv6 = ipv6
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol = _UdpProtocol(self)
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_by_source: dict[str, int] = {}
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._inflight: dict[str, int] = {}

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0)."""
        return self._port

    async def start(self) -> None:
        if self._udp is not None:
            return
        loop = asyncio.get_running_loop()
        # With port 0 the UDP port is picked first and TCP must get the same one; retry if taken.
        attempts = 8 if self._requested_port == 0 else 1
        for attempt in range(attempts):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self._udp_protocol, local_addr=(self._host, self._requested_port)
                )
            except OSError as e:
                raise RuntimeFailure(
                    f"cannot listen for DNS on udp {self._host}:{self._requested_port}: {e}"
                ) from e
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(
                    self._serve_tcp, self._host, port, limit=_MAX_QUERY + 2
                )
            except OSError as e:
                transport.close()
                if attempt + 1 < attempts:
                    continue
                raise RuntimeFailure(
                    f"cannot listen for DNS on tcp {self._host}:{port}: {e}"
                ) from e
            self._udp = transport
            self._port = port
            return

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None

    # ------------------------------------------------------------------ transports

    def _on_datagram(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(self._tasks) >= _MAX_PENDING_UDP:
            return
        task = asyncio.create_task(self._udp_one(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_one(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = await self._respond(data, str(addr[0]), udp=True)
        transport, protocol = self._udp, self._udp_protocol
        if reply is None or transport is None or transport.is_closing() or protocol.paused:
            return
        transport.sendto(reply, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        count = self._tcp_by_source.get(source, 0)
        if count >= self._max_tcp_per_source or len(self._tcp_writers) >= _MAX_TCP_TOTAL:
            writer.transport.abort()
            return
        self._tcp_by_source[source] = count + 1
        self._tcp_writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                async with asyncio.timeout(self._tcp_idle):
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    if length < _HEADER or length > _MAX_QUERY:
                        return
                    wire = await reader.readexactly(length)
                reply = await self._respond(wire, source, udp=False)
                if reply is None:
                    continue
                writer.write(len(reply).to_bytes(2, "big") + reply)
                async with asyncio.timeout(self._tcp_idle):
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as e:
            _log.debug("dns tcp from %s closed: %s", source, type(e).__name__)
        except asyncio.CancelledError:
            # stop() cancelled us; end normally, since asyncio 3.11's stream callback logs
            # a cancelled handler task as an error.
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            self._tcp_writers.discard(writer)
            left = self._tcp_by_source.get(source, 1) - 1
            if left > 0:
                self._tcp_by_source[source] = left
            else:
                self._tcp_by_source.pop(source, None)
            writer.transport.abort()

    # ------------------------------------------------------------------ one query

    async def _respond(self, wire: bytes, source: str, *, udp: bool) -> bytes | None:
        """The reply to send for ``wire`` from ``source``, or None to stay silent."""
        if len(wire) < _HEADER or len(wire) > _MAX_QUERY or wire[2] & 0x80:
            return None  # not a query (a reply, or too short to carry an id to answer)
        try:
            return await self._answer(wire, source, udp=udp)
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.debug("dns query from %s failed", source, exc_info=True)
            return _raw_reply(wire, dns.rcode.SERVFAIL)

    async def _answer(self, wire: bytes, source: str, *, udp: bool) -> bytes | None:
        sandbox = self._registry.lookup(source)
        if sandbox is None:
            if not self._unknown_limiter.take("unknown"):
                return None
        elif not self._limiter.take(source):
            return _raw_reply(wire, dns.rcode.REFUSED)
        opcode = (wire[2] >> 3) & 0x0F
        if opcode != dns.opcode.QUERY:
            return _raw_reply(wire, dns.rcode.NOTIMP if sandbox else dns.rcode.REFUSED)
        try:
            query = dns.message.from_wire(wire)
        except Exception as e:  # every way dnspython can reject hostile bytes
            _log.debug("malformed dns query from %s: %s", source, e)
            return _raw_reply(wire, dns.rcode.FORMERR)
        limit = _udp_limit(query) if udp else 65535
        if sandbox is None:
            return _render(_reply(query, dns.rcode.REFUSED), limit)
        if len(query.question) != 1:
            return _render(_reply(query, dns.rcode.FORMERR), limit)
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            return _render(_reply(query, dns.rcode.REFUSED), limit)
        if dns.rdatatype.is_metatype(question.rdtype):
            return _render(_reply(query, dns.rcode.NOTIMP), limit)
        name = _hostname(question.name)
        if name is None:
            self._emit(sandbox, "deny", "not a valid hostname", name=_printable(question.name))
            return _render(_reply(query, dns.rcode.NXDOMAIN), limit)
        decision: Decision = sandbox.policy.check_name(name)
        if not decision.allowed:
            self._emit(sandbox, "deny", decision.reason, name=name)
            return _render(_reply(query, dns.rcode.NXDOMAIN), limit)
        if question.rdtype == dns.rdatatype.AAAA and not self._ipv6:
            # Sandboxes have no IPv6 route: an empty answer sends clients straight to IPv4
            # instead of through a failed IPv6 attempt first.
            return _render(_reply(query, dns.rcode.NOERROR), limit)
        inflight = self._inflight.get(source, 0)
        if inflight >= _MAX_INFLIGHT_PER_SOURCE:
            return _render(_reply(query, dns.rcode.REFUSED), limit)
        self._inflight[source] = inflight + 1
        try:
            upstream = await self._upstream.query(_fresh_query(name, question.rdtype))
        except Exception as e:
            _log.debug("dns upstream failed for %s: %s", name, e)
            self._emit(sandbox, "allow", f"{decision.reason}; upstream failed", name=name)
            return _render(_reply(query, dns.rcode.SERVFAIL), limit)
        finally:
            left = self._inflight.get(source, 1) - 1
            if left > 0:
                self._inflight[source] = left
            else:
                self._inflight.pop(source, None)
        reply = self._filtered(query, upstream, sandbox, name, question.rdtype, decision.reason)
        return _render(reply, limit)

    def _filtered(
        self,
        query: dns.message.Message,
        upstream: dns.message.Message,
        sandbox: SandboxNet,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        reason: str,
    ) -> dns.message.Message:
        rcode = upstream.rcode()
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            self._emit(
                sandbox, "allow", f"{reason}; upstream {dns.rcode.to_text(rcode)}", name=name
            )
            return _reply(query, dns.rcode.SERVFAIL)
        reply = _reply(query, rcode)
        qname = dns.name.from_text(name)
        names = _chain(upstream, qname)
        kept: list[IPAddress] = []
        stripped = 0
        for rrset in upstream.answer:
            # Only the question's name, its CNAME chain, and the asked-for type (or the CNAMEs):
            # extra records an upstream volunteers would be addresses nobody checked.
            if rrset.name not in names or rrset.rdclass != dns.rdataclass.IN:
                continue
            if rrset.rdtype not in (rdtype, dns.rdatatype.CNAME):
                continue
            if rrset.rdtype not in _ADDRESS_TYPES:
                reply.answer.append(rrset)
                continue
            good = []
            for rdata in rrset:
                try:
                    ip = ipaddress.ip_address(rdata.address)
                except ValueError:
                    continue
                verdict: Decision = sandbox.policy.check_resolved(name, ip)
                if verdict.allowed:
                    good.append(rdata)
                    kept.append(ip)
                    # Pinned under the name the sandbox asked for (the one its policy allowed),
                    # not the CNAME target, so the proxy can check it against the policy.
                    sandbox.pins.add(name, ip, float(rrset.ttl))
                else:
                    stripped += 1
                    if stripped <= _MAX_STRIPPED_EVENTS:
                        self._emit(sandbox, "deny", verdict.reason, name=name, ip=str(ip))
            if good:
                reply.answer.append(dns.rrset.from_rdata_list(rrset.name, rrset.ttl, good))
        reply.authority = [
            rrset
            for rrset in upstream.authority
            if rrset.rdtype not in _ADDRESS_TYPES and rrset.rdclass == dns.rdataclass.IN
        ]
        self._emit(sandbox, "allow", reason, name=name, ip=_ip_list(kept))
        return reply

    def _emit(
        self,
        sandbox: SandboxNet,
        decision: Literal["allow", "deny"],
        reason: str,
        *,
        name: str | None,
        ip: str | None = None,
    ) -> None:
        event = EgressEvent(
            sandbox_id=sandbox.sandbox_id,
            kind="dns",
            decision=decision,
            reason=reason,
            name=name,
            ip=ip,
            port=53,
        )
        try:
            self._sink(event)
        except Exception:
            _log.warning("egress event sink failed", exc_info=True)


def _reply(query: dns.message.Message, rcode: int) -> dns.message.Message:
    """An answer skeleton with the client's own id and question (original spelling)."""
    reply = dns.message.make_response(query, recursion_available=True, our_payload=_EDNS_PAYLOAD)
    reply.set_rcode(dns.rcode.Rcode.make(rcode))
    return reply


def _udp_limit(query: dns.message.Message) -> int:
    if query.edns < 0:
        return 512
    return max(512, min(int(query.payload), _EDNS_PAYLOAD))


def _render(reply: dns.message.Message, limit: int) -> bytes:
    # Over the limit: as much as fits, TC set, so the client retries over TCP.
    return reply.to_wire(max_size=limit, prefer_truncation=True)


def _ip_list(ips: Sequence[IPAddress]) -> str | None:
    if not ips:
        return None
    text = ",".join(str(ip) for ip in ips[:_MAX_EVENT_IPS])
    if len(ips) > _MAX_EVENT_IPS:
        text += f",+{len(ips) - _MAX_EVENT_IPS} more"
    return text


def _printable(name: dns.name.Name) -> str:
    # A refused name goes to the event log; keep it bounded and escaped (to_text escapes bytes).
    return name.to_text(omit_final_dot=True)[:255]
