"""The egress proxy: every TCP connection a sandbox opens ends here (nft DNATs it), is checked
against the sandbox's policy, and is spliced to an upstream the proxy chose itself.

Two modes share one listener. **Transparent**: the kernel's original destination is some other
address; CIDR-allowed destinations are spliced directly, anything on a domain-rule port must name
its host (TLS SNI or HTTP Host) and then goes to the proxy's *own* resolution of that name, never
to the address the sandbox picked (so DNS rebinding and "allowed SNI to a blocked IP" lead only to
the allowed host). **Explicit**: the original destination is the proxy itself, so the client
speaks HTTP proxy protocol (``CONNECT host:port`` or an absolute-form ``GET http://…``).

**Unix listeners** (``listen_unix``, used by local mode, docs/local.md): a socket file whose every
connection belongs to one sandbox, always in explicit mode. Who may connect is decided by the
file system (the socket's directory is reachable only from that sandbox), so the caller is known
without any address; it is looked up in the registry per connection, so removing the sandbox
from the registry refuses its next connection.

Denials fail fast: a reset in transparent mode, ``403``/``400`` in explicit mode. Only the first
request of a connection is inspected; later requests on a kept-alive connection reach the same
upstream, which is a host the policy allows, so they cannot carry data anywhere else.

**Secrets.** A TLS connection to a host one of the sandbox's secrets is bound to (in either mode)
is not spliced but handed to ``corral.net.intercept``, which terminates it with a certificate of
the sandbox's own CA, verifies the real upstream, and puts the secret's value where the sandbox
wrote its placeholder. Only those hosts are intercepted; plain HTTP to them is refused with a
``502`` (a secret never crosses the network in clear), and every injection is an ``inject``
event naming the host and the secrets, never a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from corral.errors import CorralError, RuntimeFailure
from corral.net.sniff import (
    MAX_SNIFF_BYTES,
    HttpHead,
    NeedMore,
    SniResult,
    absolute_target,
    connect_authority,
    is_ip_literal,
    parse_authority,
    parse_client_hello,
    parse_http_request_head,
)
from corral.net.view import (
    BoundSecret,
    EgressEvent,
    EventSink,
    IPAddress,
    NetRegistry,
    SandboxNet,
)

if TYPE_CHECKING:
    from corral.net.policy import CompiledPolicy

__all__ = ["EgressProxy", "host_local_addresses", "so_original_dst"]

_log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
_PIPE_SIZE = 1024 * 1024
_COPY_BUFFER = 256 * 1024
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LOCAL_TTL = 5.0
_REPLY_TIMEOUT = 2.0

Resolve = Callable[[str], Awaitable[list[tuple[IPAddress, float]]]]
# (tenant, secret names) -> their current values; raises (NotFoundError) for a deleted one.
SecretValues = Callable[[str, list[str]], Awaitable[dict[str, str]]]


def so_original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """The destination a DNATed connection was sent to, None when it was not NATed."""
    attempts: list[tuple[int, int]] = []
    if sock.family == socket.AF_INET6:
        attempts.append((socket.IPPROTO_IPV6, 28))  # sockaddr_in6
    attempts.append((socket.SOL_IP, 16))  # sockaddr_in; also for v4 traffic on a v6 socket
    for level, size in attempts:
        try:
            raw = sock.getsockopt(level, SO_ORIGINAL_DST, size)
        except OSError:
            continue
        port = int.from_bytes(raw[2:4], "big")
        if level == socket.SOL_IP:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return None


def host_local_addresses(proc: Path = Path("/proc/net")) -> frozenset[IPAddress]:
    """Every address of this network namespace (the kernel's local routes and IPv6 addresses).

    Read from /proc rather than netlink: no socket, no event loop of its own, and it is what
    the kernel itself consults when deciding that a destination is local.
    """
    found: set[IPAddress] = set()
    try:
        current: str | None = None
        for line in (proc / "fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith(("|-- ", "+-- ")):
                current = text[4:].split()[0] if text.startswith("|-- ") else None
            elif current is not None and text.startswith("/32 host LOCAL"):
                found.add(ipaddress.IPv4Address(current))
        inet6 = proc / "if_inet6"
        if inet6.exists():
            for line in inet6.read_text().splitlines():
                fields = line.split()
                if fields:
                    found.add(ipaddress.IPv6Address(int(fields[0], 16)))
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"cannot read the host's addresses from {proc}: {exc}") from exc
    return frozenset(found)


def _unwrap(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _reset(sock: socket.socket) -> None:
    """Close with RST so the peer fails at once instead of waiting on a half-open connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _close(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, rst: bool) -> None:
    """Close a socket the loop may still watch (a cancelled sock_recv/sock_connect unregisters
    only on a later iteration, by which time the fd number may belong to another socket)."""
    fd = sock.fileno()
    if fd >= 0:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
    if rst:
        _reset(sock)
    else:
        sock.close()


class _Deny(Exception):
    def __init__(self, reason: str, status: int = 403, *, answer: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        # Answer with an HTTP error even in transparent mode or inside a tunnel (the client
        # spoke HTTP, and a reset would hide why).
        self.answer = answer


@dataclass
class _Sniffed:
    kind: Literal["tls", "http", "other", "malformed"]
    data: bytes
    reason: str = ""
    tls: SniResult | None = None
    http: HttpHead | None = None


def _classify(buf: bytes) -> _Sniffed | None:
    """What the client has sent so far, None while undecided."""
    if not buf:
        return None
    if buf[0] == 0x16:
        tls = parse_client_hello(buf)
        if tls.kind == "need_more":
            return None
        if tls.kind == "malformed":
            return _Sniffed("malformed", buf, tls.reason)
        if tls.kind != "not_tls":
            return _Sniffed("tls", buf, tls=tls)
    head = parse_http_request_head(buf)
    if isinstance(head, NeedMore):
        return None
    if isinstance(head, HttpHead):
        return _Sniffed("http", buf, http=head)
    if head.malformed:
        return _Sniffed("malformed", buf, f"malformed HTTP request: {head.reason}")
    return _Sniffed("other", buf, head.reason)


def _undecided(data: bytes, reason: str) -> _Sniffed:
    """The sniff ended (timeout or EOF) before the parsers decided.

    A started but unfinished ClientHello or request head is refused rather than treated as
    "another protocol": completing it after the decision would smuggle a name past the check.
    """
    if not data:
        return _Sniffed("other", data, reason)
    what = "TLS ClientHello" if data[0] == 0x16 else "HTTP request head"
    return _Sniffed("malformed", data, f"incomplete {what} ({reason})")


def _same_host(host_header: str, host: str, port: int) -> bool:
    """Whether a Host header names ``host`` (and ``port``, when it carries one)."""
    try:
        return parse_authority(host_header, port) == (host, port)
    except ValueError:
        return False


@dataclass
class _Conn:
    sandbox_id: str
    client: socket.socket
    upstream: socket.socket | None = None
    explicit: bool = False
    replied: bool = False  # explicit mode: "200 Connection established" already sent
    allowed: bool = False
    reason: str = ""
    name: str | None = None
    ip: str | None = None
    port: int | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    rst: bool = True  # close the client with a reset unless a graceful end was reached
    aborted: bool = False


class EgressProxy:
    """Policy-checking TCP proxy for every sandbox; see the module docstring."""

    def __init__(
        self,
        registry: NetRegistry,
        resolve: Resolve,
        sink: EventSink,
        *,
        host: str | None,
        port: int,
        original_dst: Callable[[socket.socket], tuple[str, int] | None] | None = None,
        local_addresses: Callable[[], Collection[IPAddress]] | None = None,
        connect_timeout: float = 5.0,
        sniff_timeout: float = 0.5,
        max_connections: int = 1024,
        max_total_connections: int | None = None,
        secret_values: SecretValues | None = None,
        upstream_tls: ssl.SSLContext | None = None,
    ) -> None:
        self._registry = registry
        self._secret_values = secret_values
        # Verifies the upstreams secrets are sent to; made on first use when not given (loading
        # the system trust store costs milliseconds that proxies without secrets never pay).
        self._upstream_tls = upstream_tls
        self._resolve = resolve
        self._sink = sink
        self._host = host
        self._port = port
        self._original_dst = original_dst or so_original_dst
        self._local_fn = local_addresses
        self._local_cache: tuple[float, Collection[IPAddress]] | None = None
        self._connect_timeout = connect_timeout
        self._sniff_timeout = sniff_timeout
        self._max_connections = max_connections
        # All sandboxes together: each connection holds six descriptors (two sockets, a pipe
        # each way), so a few sandboxes at their own cap could otherwise exhaust the server's
        # descriptors and take the API down with them. Default: a third of what we may open.
        if max_total_connections is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = soft if soft != resource.RLIM_INFINITY else 65536
            max_total_connections = max(64, limit // 18)
        self._max_total = max_total_connections
        self._listener: socket.socket | None = None
        self._bound: tuple[IPAddress, int] | None = None
        self._accept_task: asyncio.Task[None] | None = None
        # listen_unix: path -> (listener, its accept loop)
        self._unix: dict[Path, tuple[socket.socket, asyncio.Task[None]]] = {}
        self._live: dict[str, dict[asyncio.Task[None], _Conn]] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (useful when constructed with port 0)."""
        if self._bound is None:
            raise RuntimeError("proxy not started")
        return self._bound[1]

    async def start(self) -> None:
        """Listen on ``host:port`` (TCP); a proxy made with ``host=None`` has only unix listeners."""
        if self._host is None:
            raise RuntimeFailure("egress proxy has no TCP address to listen on")
        try:
            infos = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise RuntimeFailure(
                f"egress proxy cannot listen on {self._host}:{self._port}: {exc}"
            ) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise RuntimeFailure(
                f"egress proxy cannot listen on {self._host}:{self._port}: {exc}"
            ) from exc
        name = sock.getsockname()
        self._listener = sock
        self._bound = (_unwrap(ipaddress.ip_address(name[0])), name[1])
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def listen_unix(self, path: Path, sandbox_id: str, mode: int = 0o600) -> None:
        """Also accept on the unix socket ``path`` (which must not exist yet); every connection
        on it is ``sandbox_id``'s and speaks HTTP proxy protocol. Access is the file system's
        business: ``path`` gets ``mode``, and its directory should let only that sandbox in.
        ``stop`` closes it and removes the file."""
        if path in self._unix:
            raise RuntimeFailure(f"egress proxy already listens on {path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise RuntimeFailure(f"egress proxy cannot listen on {path}: {exc}") from exc
        try:
            os.chmod(path, mode)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise RuntimeFailure(f"egress proxy cannot listen on {path}: {exc}") from exc
        task = asyncio.get_running_loop().create_task(self._accept_loop(sock, sandbox_id))
        self._unix[path] = (sock, task)

    async def stop(self) -> None:
        accepting = [t for t in (self._accept_task, *(t for _, t in self._unix.values())) if t]
        for task in accepting:
            task.cancel()
        for task in accepting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._accept_task = None
        tasks: list[asyncio.Task[None]] = []
        for sandbox_id in list(self._live):
            tasks.extend(self._abort(sandbox_id))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            _close(asyncio.get_running_loop(), self._listener, rst=False)
            self._listener = None
        for path, (sock, _) in self._unix.items():
            _close(asyncio.get_running_loop(), sock, rst=False)
            with contextlib.suppress(OSError):
                path.unlink()
        self._unix.clear()

    def close_sandbox(self, sandbox_id: str) -> None:
        """Abort every live connection of ``sandbox_id`` (their clients see a reset)."""
        self._abort(sandbox_id)

    def connections(self, sandbox_id: str) -> int:
        return len(self._live.get(sandbox_id, ()))

    def _abort(self, sandbox_id: str) -> list[asyncio.Task[None]]:
        live = self._live.pop(sandbox_id, {})
        for task, conn in live.items():
            conn.aborted = True
            task.cancel()
        return list(live)

    # ------------------------------------------------------------------ accepting

    async def _accept_loop(
        self, listener: socket.socket | None = None, sandbox_id: str | None = None
    ) -> None:
        """Accept on ``listener``: the TCP one (callers known by address) by default, else a
        unix one whose every connection is ``sandbox_id``'s."""
        loop = asyncio.get_running_loop()
        if listener is None:
            listener = self._listener
        assert listener is not None
        while True:
            try:
                client, addr = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning on a listener we cannot serve.
                _log.warning("egress proxy accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            try:
                if sandbox_id is None:
                    self._accepted(loop, client, addr[0])
                else:
                    self._take(loop, client, self._registry.get(sandbox_id), explicit=True)
            except Exception:
                _log.debug("egress proxy could not take a connection", exc_info=True)
                _reset(client)

    def _accepted(self, loop: asyncio.AbstractEventLoop, client: socket.socket, peer: str) -> None:
        net = self._registry.lookup(peer)
        if net is None:
            _log.debug("egress proxy: connection from unknown address %s", peer)
            _reset(client)
            return
        self._take(loop, client, net, explicit=False)

    def _take(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        net: SandboxNet | None,
        *,
        explicit: bool,
    ) -> None:
        if net is None:
            _log.debug("egress proxy: connection for a sandbox no longer registered")
            _reset(client)
            return
        live = self._live.setdefault(net.sandbox_id, {})
        total = sum(len(c) for c in self._live.values())
        if len(live) >= self._max_connections or total >= self._max_total:
            why = (
                "too many concurrent connections"
                if len(live) >= self._max_connections
                else "the egress proxy is at its connection limit for all sandboxes"
            )
            self._emit(EgressEvent(net.sandbox_id, "tcp", "deny", why))
            _reset(client)
            return
        client.setblocking(False)
        conn = _Conn(net.sandbox_id, client, explicit=explicit)
        task = loop.create_task(self._handle(conn, net))
        live[task] = conn
        task.add_done_callback(lambda t: self._forget(loop, net.sandbox_id, t, conn))

    def _forget(
        self,
        loop: asyncio.AbstractEventLoop,
        sandbox_id: str,
        task: asyncio.Task[None],
        conn: _Conn,
    ) -> None:
        live = self._live.get(sandbox_id)
        if live is not None:
            live.pop(task, None)
            if not live:
                del self._live[sandbox_id]
        # A task cancelled before its first step never runs its own cleanup.
        for sock in (conn.upstream, conn.client):
            if sock is not None and sock.fileno() >= 0:
                _close(loop, sock, rst=True)

    # ------------------------------------------------------------------ one connection

    async def _handle(self, conn: _Conn, net: SandboxNet) -> None:
        denial: _Deny | None = None
        error: str | None = None
        try:
            try:
                with contextlib.suppress(OSError):
                    conn.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await self._serve(conn, net)
            except _Deny as exc:
                denial = exc
                _log.debug("egress proxy deny %s: %s", conn.sandbox_id, exc.reason)
                if (conn.explicit and not conn.replied) or exc.answer:
                    await self._reply(conn, exc.status, exc.reason)
        except asyncio.CancelledError:
            conn.aborted = True
            raise
        except Exception as exc:
            _log.debug("egress proxy connection failed", exc_info=True)
            error = f"proxy error: {exc!r}"
        finally:
            loop = asyncio.get_running_loop()
            for sock in (conn.upstream, conn.client):
                if sock is not None:
                    _close(loop, sock, rst=conn.rst or conn.aborted)
            self._emit(self._event(conn, denial, error))

    def _event(self, conn: _Conn, denial: _Deny | None, error: str | None) -> EgressEvent:
        if denial is not None or not conn.allowed:
            reason = (
                denial.reason
                if denial is not None
                else error or ("aborted before a decision" if conn.aborted else "no decision")
            )
            return EgressEvent(
                conn.sandbox_id, "tcp", "deny", reason, conn.name, conn.ip, conn.port
            )
        reason = conn.reason
        if conn.aborted:
            reason += " (aborted)"
        elif error:
            reason += f" ({error})"
        return EgressEvent(
            conn.sandbox_id,
            "tcp",
            "allow",
            reason,
            conn.name,
            conn.ip,
            conn.port,
            bytes_out=conn.bytes_out,
            bytes_in=conn.bytes_in,
        )

    def _emit(self, event: EgressEvent) -> None:
        try:
            self._sink(event)
        except Exception:
            _log.debug("egress event sink failed", exc_info=True)

    async def _serve(self, conn: _Conn, net: SandboxNet) -> None:
        policy = net.policy  # one policy for the whole decision, even if it is swapped meanwhile
        if conn.explicit:  # a unix listener: nothing was NATed, nothing else is spoken
            await self._explicit(conn, net, policy)
            return
        dst = self._original_dst(conn.client)
        if dst is None or self._is_self(dst):
            conn.explicit = True
            await self._explicit(conn, net, policy)
        else:
            ip = _unwrap(ipaddress.ip_address(dst[0]))
            await self._transparent(conn, net, policy, ip, dst[1])

    def _is_self(self, dst: tuple[str, int]) -> bool:
        assert self._bound is not None
        bound_ip, bound_port = self._bound
        if dst[1] != bound_port:
            return False
        ip = _unwrap(ipaddress.ip_address(dst[0]))
        return ip == bound_ip or (bound_ip.is_unspecified and ip in self._local())

    def _local(self) -> Collection[IPAddress]:
        if self._local_fn is not None:
            return self._local_fn()
        now = time.monotonic()
        if self._local_cache is None or now - self._local_cache[0] > _LOCAL_TTL:
            self._local_cache = (now, host_local_addresses())
        return self._local_cache[1]

    # ------------------------------------------------------------------ transparent mode

    async def _transparent(
        self, conn: _Conn, net: SandboxNet, policy: CompiledPolicy, ip: IPAddress, port: int
    ) -> None:
        conn.ip, conn.port = str(ip), port
        if ip in self._local():
            raise _Deny("the host's own addresses are never reachable")
        by_ip = policy.check_ip(ip, port, "tcp")
        if by_ip.allowed:
            conn.reason = by_ip.reason
            await self._connect(conn, [ip], port)
            await self._pump(conn, b"")
            return
        ports = policy.domain_ports()
        if ports is not None and port not in ports:
            raise _Deny(by_ip.reason)
        sniffed = await self._sniff(conn.client, self._sniff_timeout)
        if sniffed.kind == "malformed":
            raise _Deny(sniffed.reason)
        if sniffed.kind == "other":
            await self._pinned(conn, net, policy, ip, port, sniffed)
            return
        if sniffed.tls is not None:
            name = self._tls_name(sniffed.tls)
        else:
            assert sniffed.http is not None
            name = self._http_name(sniffed.http, port)
        conn.name = name
        decision = policy.check_name(name, port)
        if not decision.allowed:
            raise _Deny(decision.reason)
        bound = self._secrets_for(net, name, sniffed)
        addrs = await self._resolve_allowed(policy, name, port, prefer=ip)
        conn.reason = decision.reason
        await self._connect(conn, addrs, port)
        if bound:
            await self._inject(conn, net, name, sniffed, bound)
            return
        await self._pump(conn, sniffed.data)

    async def _pinned(
        self,
        conn: _Conn,
        net: SandboxNet,
        policy: CompiledPolicy,
        ip: IPAddress,
        port: int,
        sniffed: _Sniffed,
    ) -> None:
        """A connection that names no host: only to an address the sandbox was given for an
        allowed name (server-speaks-first protocols such as SSH or SMTP)."""
        name = net.pins.name_for(ip)
        if name is None:
            raise _Deny(
                f"{ip} was not resolved for an allowed name and no host name was sent"
                f" ({sniffed.reason})"
            )
        conn.name = name
        decision = policy.check_name(name, port)
        if not decision.allowed:
            raise _Deny(decision.reason)
        resolved = policy.check_resolved(name, ip, port)
        if not resolved.allowed:
            raise _Deny(resolved.reason)
        conn.reason = f"{decision.reason}; {ip} resolved for {name}"
        _names_only(sniffed.data, name, port, f"the name {ip} was resolved for")
        await self._connect(conn, [ip], port)
        await self._pump(conn, sniffed.data, (name, port, f"the name {ip} was resolved for"))

    @staticmethod
    def _tls_name(tls: SniResult) -> str:
        if tls.ech:
            raise _Deny("encrypted client hello")
        if tls.kind != "sni" or tls.name is None:
            raise _Deny("TLS without SNI")
        if is_ip_literal(tls.name):
            raise _Deny("SNI is an IP address")
        return tls.name

    @staticmethod
    def _http_name(head: HttpHead, port: int) -> str:
        if not head.host:
            raise _Deny("HTTP request without Host")
        try:
            host, _ = parse_authority(head.host, port)
        except ValueError as exc:
            raise _Deny(f"malformed Host header: {exc}", 400) from None
        if is_ip_literal(host):
            raise _Deny("Host is an IP address")
        try:
            if head.method == "CONNECT":
                target: tuple[str, int] | None = connect_authority(head.target)
            else:
                absolute = absolute_target(head.target)
                target = None if absolute is None else (absolute.host, absolute.port)
        except ValueError as exc:
            raise _Deny(f"malformed request target: {exc}", 400) from None
        if target is not None and not _same_host(head.host, *target):
            raise _Deny("absolute URI names another host")
        return host

    # ------------------------------------------------------------------ explicit mode

    async def _explicit(self, conn: _Conn, net: SandboxNet, policy: CompiledPolicy) -> None:
        sniffed = await self._sniff(conn.client, self._connect_timeout)
        if sniffed.http is None:
            reason = sniffed.reason or "not an HTTP proxy request"
            raise _Deny(f"bad proxy request: {reason}", 400)
        head = sniffed.http
        rest = sniffed.data[head.head_len :]
        if head.method == "CONNECT":
            try:
                host, port = connect_authority(head.target)
            except ValueError as exc:
                raise _Deny(f"malformed CONNECT target: {exc}", 400) from None
            conn.port = port
            if head.host is not None and not _same_host(head.host, host, port):
                raise _Deny("Host header differs from the CONNECT authority", 400)
            await self._open(conn, policy, host, port)
            await self._send(conn.client, b"HTTP/1.1 200 Connection established\r\n\r\n")
            conn.replied = True
            vet: tuple[str, int, str] | None = None
            if not is_ip_literal(host):
                inner = await self._check_tunnel(conn, host, port, rest)
                rest = inner.data
                vet = (host, port, "the CONNECT host")
                bound = self._secrets_for(net, host, inner)
                if bound:
                    await self._inject(conn, net, host, inner, bound)
                    return
            await self._pump(conn, rest, vet)
            return
        try:
            absolute = absolute_target(head.target)
        except ValueError as exc:
            raise _Deny(f"malformed request target: {exc}", 400) from None
        if absolute is None:
            raise _Deny("a proxy request needs an absolute http:// URI or CONNECT", 400)
        if absolute.scheme != "http":
            raise _Deny(f"{absolute.scheme}:// is not proxied; use CONNECT", 400)
        conn.port = absolute.port
        if head.host is not None and not _same_host(head.host, absolute.host, absolute.port):
            raise _Deny("Host header differs from the request URI", 400)
        if net.secrets is not None and net.secrets.for_host(absolute.host):
            conn.name = absolute.host  # the refusal is logged with the host it was for
            self._secrets_for(net, absolute.host, sniffed)  # plain HTTP: refused with the reason
        await self._open(conn, policy, absolute.host, absolute.port)
        await self._pump(conn, _origin_form(head, absolute.origin_form) + rest)

    async def _first_words(self, client: socket.socket, first: bytes) -> bytes:
        """The client's first bytes after ``first`` (only blank so far): read until they are
        clearly a ClientHello, an HTTP request head, or something else, or the client ends.

        Once it has started, a client gets the sniff timeout to finish: half a hello or
        request head left hanging is refused, as in the first sniff (completing it later would
        name a host nobody checked).
        """
        loop = asyncio.get_running_loop()
        buf = b""
        deadline: float | None = None
        while len(buf) < MAX_SNIFF_BYTES:
            try:
                if deadline is None:
                    chunk = await loop.sock_recv(client, MAX_SNIFF_BYTES - len(buf))
                else:
                    async with asyncio.timeout_at(deadline):
                        chunk = await loop.sock_recv(client, MAX_SNIFF_BYTES - len(buf))
            except TimeoutError:
                raise _Deny("incomplete request after a silent start") from None
            if not chunk:
                break
            buf += chunk
            data = (first + buf).lstrip(_HTTP_SPACE)
            if not data:
                continue
            if deadline is None:
                deadline = loop.time() + self._sniff_timeout
            if parse_client_hello(data).kind == "need_more":
                continue
            if isinstance(parse_http_request_head(data), NeedMore):
                continue
            break
        return buf

    async def _check_tunnel(self, conn: _Conn, host: str, port: int, first: bytes) -> _Sniffed:
        """Inside an allowed CONNECT tunnel, the client must not name another host."""
        sniffed = await self._sniff(conn.client, self._sniff_timeout, first)
        if sniffed.kind == "malformed":
            raise _Deny(sniffed.reason)
        _names_only(sniffed.data, host, port, "the CONNECT host")
        # Anything else goes to our own resolution of the CONNECT host, which is allowed.
        return sniffed

    async def _open(self, conn: _Conn, policy: CompiledPolicy, host: str, port: int) -> None:
        """Check an explicitly named destination and connect to it."""
        if is_ip_literal(host):
            ip = _unwrap(ipaddress.ip_address(host))
            conn.ip = str(ip)
            if ip.version == 6:
                raise _Deny("IPv6 egress is not available")
            if ip in self._local():
                raise _Deny("the host's own addresses are never reachable")
            decision = policy.check_ip(ip, port, "tcp")
            if not decision.allowed:
                raise _Deny(decision.reason)
            addrs: list[IPAddress] = [ip]
        else:
            conn.name = host
            decision = policy.check_name(host, port)
            if not decision.allowed:
                raise _Deny(decision.reason)
            addrs = await self._resolve_allowed(policy, host, port, prefer=None)
        conn.reason = decision.reason
        await self._connect(conn, addrs, port)

    # ------------------------------------------------------------------ secrets

    @staticmethod
    def _secrets_for(net: SandboxNet, host: str, sniffed: _Sniffed) -> tuple[BoundSecret, ...]:
        """The secrets bound to ``host``; a bound host reached other than over TLS is refused
        (the secret would cross the network in clear, or not be injected at all)."""
        if net.secrets is None:
            return ()
        bound = net.secrets.for_host(host)
        if bound and sniffed.tls is None:
            names = ", ".join(b.name for b in bound)
            raise _Deny(
                f"corral egress proxy: {host} has secrets bound ({names}), which are sent only"
                " over TLS; use https://",
                502,
                answer=sniffed.http is not None,
            )
        return bound

    def _upstream_context(self) -> ssl.SSLContext:
        if self._upstream_tls is None:
            self._upstream_tls = ssl.create_default_context()
        return self._upstream_tls

    async def _inject(
        self,
        conn: _Conn,
        net: SandboxNet,
        host: str,
        sniffed: _Sniffed,
        bound: tuple[BoundSecret, ...],
    ) -> None:
        """Relay the connection through the TLS interceptor, which puts ``bound`` secrets in."""
        # Here, not at the top: TLS interception (h2, the CA's cryptography) is only needed once a
        # sandbox with secrets connects to a bound host, and costs every other proxy user start-up.
        from corral.net.intercept import Injection, Rewriter, intercept

        assert conn.upstream is not None and net.secrets is not None and sniffed.tls is not None
        failure: str | None = None
        values: dict[str, str] = {}
        if self._secret_values is None:
            failure = "this proxy has no secret store"
        else:
            try:
                values = await self._secret_values(net.tenant_id, [b.name for b in bound])
            except CorralError as exc:
                failure = exc.message
            else:
                lost = [b.name for b in bound if b.name not in values]
                if lost:
                    failure = f"secret {lost[0]!r} has no value"
        injections = (
            [Injection(b.name, b.placeholder, values[b.name], b.header, b.format) for b in bound]
            if failure is None
            else []
        )
        sandbox_id, ip, port = conn.sandbox_id, conn.ip, conn.port

        def on_request(method: str, path: str, names: list[str]) -> None:
            if names:
                self._emit(
                    EgressEvent(
                        sandbox_id,
                        "inject",
                        "allow",
                        f"{method} {path}: injected {', '.join(names)}",
                        host,
                        ip,
                        port,
                    )
                )

        result = await intercept(
            conn.client,
            sniffed.data,
            conn.upstream,
            host=host,
            ca=net.secrets.ca,
            client_alpn=sniffed.tls.alpn,
            upstream_ctx=self._upstream_context(),
            rewriter=Rewriter(injections),
            on_request=on_request,
            failure=failure,
        )
        conn.bytes_out += result.bytes_out
        conn.bytes_in += result.bytes_in
        conn.reason += (
            f"; TLS terminated for secrets ({result.protocol}, {result.requests} requests)"
        )
        if result.error is not None:
            conn.reason += f"; {result.error}"
        conn.rst = False

    async def _reply(self, conn: _Conn, status: int, reason: str) -> None:
        phrase = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
        body = reason.encode("utf-8", "replace") + b"\n"
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            await self._send(conn.client, head.encode() + body)
            conn.client.shutdown(socket.SHUT_WR)
            conn.rst = False
        except (OSError, TimeoutError):
            pass

    @staticmethod
    async def _send(sock: socket.socket, data: bytes) -> None:
        async with asyncio.timeout(_REPLY_TIMEOUT):
            await asyncio.get_running_loop().sock_sendall(sock, data)

    # ------------------------------------------------------------------ shared steps

    async def _sniff(self, sock: socket.socket, timeout: float, first: bytes = b"") -> _Sniffed:
        """Read until the first bytes say TLS, HTTP or something else (or ``timeout`` passes)."""
        loop = asyncio.get_running_loop()
        buf = bytearray(first)
        deadline = loop.time() + timeout
        while True:
            data = bytes(buf)
            found = _classify(data)
            if found is not None:
                return found
            if len(buf) >= MAX_SNIFF_BYTES:
                return _Sniffed("malformed", data, "no decision within the sniff limit")
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await loop.sock_recv(sock, MAX_SNIFF_BYTES - len(buf))
            except TimeoutError:
                return _undecided(data, "nothing sent within the sniff timeout")
            if not chunk:
                return _undecided(data, "client closed before naming a host")
            buf += chunk

    async def _resolve_allowed(
        self, policy: CompiledPolicy, name: str, port: int, prefer: IPAddress | None
    ) -> list[IPAddress]:
        """Our own resolution of ``name``, minus addresses the policy or the host forbids."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                answers = await self._resolve(name)
        except Exception as exc:
            raise _Deny(f"cannot resolve {name}: {str(exc) or type(exc).__name__}") from None
        local = self._local()
        good: list[IPAddress] = []
        why = "no address"
        for raw, _ttl in answers:
            ip = _unwrap(raw)
            if ip.version == 6:
                # Sandboxes are IPv4-only for now, and so is their egress: the host's own IPv6
                # neighbourhood (global addresses on its LAN) must not open up through here.
                why = f"{ip}: IPv6 egress is not available"
                continue
            if ip in local:
                why = f"{ip} is the host's own address"
                continue
            decision = policy.check_resolved(name, ip, port)
            if not decision.allowed:
                why = decision.reason
                continue
            if ip not in good:
                good.append(ip)
        if not good:
            raise _Deny(f"{name} resolves to nothing reachable: {why}")
        if prefer is not None and prefer in good:
            good.remove(prefer)
            good.insert(0, prefer)
        return good

    async def _connect(self, conn: _Conn, addrs: list[IPAddress], port: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        errors: list[str] = []
        for ip in addrs:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # out of descriptors: a refusal, not a crash
                errors.append(f"{ip}: {exc}")
                break
            try:
                sock.setblocking(False)
                async with asyncio.timeout_at(deadline):
                    await loop.sock_connect(sock, (str(ip), port))
            except (OSError, TimeoutError) as exc:
                _close(loop, sock, rst=False)
                errors.append(f"{ip}: {str(exc) or 'timed out'}")
                if loop.time() >= deadline:
                    break
                continue
            except BaseException:
                _close(loop, sock, rst=False)
                raise
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.upstream = sock
            conn.ip = str(ip)
            conn.allowed = True
            return
        raise _Deny(f"upstream unreachable on port {port} ({'; '.join(errors)})", 502)

    async def _pump(
        self, conn: _Conn, first: bytes, vet: tuple[str, int, str] | None = None
    ) -> None:
        """Send what was read while sniffing, then splice both ways until both are done.

        ``vet`` (host, port, what it is): the connection was let through before the client
        said anything (a silent CONNECT tunnel, a server-speaks-first protocol to a pinned
        address). Until the client has spoken, only the server's bytes flow; its first bytes
        must not then name another host in a TLS ClientHello or an HTTP request, which is
        how a shared address (a CDN) would otherwise serve a name the policy denies.
        """
        assert conn.upstream is not None
        loop = asyncio.get_running_loop()
        if first:
            await loop.sock_sendall(conn.upstream, first)
            conn.bytes_out += len(first)
        pump = _Pump(loop, conn.client, conn.upstream)
        try:
            if vet is None or first.strip(_HTTP_SPACE):
                pump.start()
            else:
                pump.down.start()
                late = await self._first_words(conn.client, first)
                _names_only(late, *vet)
                if late:
                    await loop.sock_sendall(conn.upstream, late)
                    conn.bytes_out += len(late)
                if not pump.done.done():
                    pump.up.start()
            await pump.done
        finally:
            pump.close()
            conn.bytes_out += pump.up.count
            conn.bytes_in += pump.down.count
        # A failed side (reset, broken pipe) is passed on as a reset; a clean end closes cleanly.
        conn.rst = pump.error is not None
        if pump.error is not None and pump.error.errno not in _PEER_GONE:
            _log.debug("egress proxy pump error: %s", pump.error)


_PEER_GONE = {errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT, errno.ECONNABORTED}


def _origin_form(head: HttpHead, origin: str) -> bytes:
    """The request head with its absolute URI made origin-form, minus proxy-only headers."""
    lines = [f"{head.method} {origin} {head.version}"]
    for name, value in head.headers:
        if name.lower() not in ("proxy-connection", "proxy-authorization"):
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --------------------------------------------------------------------------- the pump


_HTTP_SPACE = b"\r\n\t "


def _names_only(data: bytes, host: str, port: int, what: str) -> None:
    """Refuse ``data`` (a client's first bytes) if it names a host other than ``host``: in a
    TLS ClientHello (SNI; an encrypted one hides it), or an HTTP request's Host or absolute
    URI (leading blank lines skipped, as HTTP servers do)."""
    data = data.lstrip(_HTTP_SPACE)
    if not data:
        return
    tls = parse_client_hello(data)
    if tls.kind in ("sni", "no_sni"):
        if tls.ech:
            raise _Deny("encrypted client hello")
        if tls.name is not None and tls.name.rstrip(".").lower() != host:
            raise _Deny(f"SNI {tls.name} differs from {what} ({host})")
        return
    head = parse_http_request_head(data)
    if isinstance(head, HttpHead):
        if head.host is not None and not _same_host(head.host, host, port):
            raise _Deny(f"Host {head.host} differs from {what} ({host})")
        try:
            absolute = absolute_target(head.target)
        except ValueError as exc:
            raise _Deny(f"malformed request target: {exc}") from None
        if absolute is not None and absolute.host != host:
            raise _Deny("absolute URI names another host")


class _Pump:
    """Both directions of one spliced connection, driven by the event loop's readiness."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, client: socket.socket, upstream: socket.socket
    ):
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.error: OSError | None = None
        self.up = _Direction(self, client, upstream)
        self.down = _Direction(self, upstream, client)

    def start(self) -> None:
        self.up.start()
        if not self.done.done():
            self.down.start()

    def direction_done(self) -> None:
        if self.up.finished and self.down.finished and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc
        self.up.stop()
        self.down.stop()
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        self.up.close()
        self.down.close()


class _Direction:
    """src → dst through a pipe with splice(2) (zero copy), or a buffer when splice is refused."""

    def __init__(self, pump: _Pump, src: socket.socket, dst: socket.socket) -> None:
        self.pump = pump
        self.loop = pump.loop
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.count = 0
        self.pending = 0  # bytes read but not yet written
        self.eof = False
        self.finished = False
        self.reading = False
        self.writing = False
        self.pipe: tuple[int, int] | None = None
        self.capacity = _COPY_BUFFER
        self.buffer: bytearray | None = None
        self.view: memoryview | None = None
        self.start_at = 0  # copy mode: pending bytes are buffer[start_at:start_at + pending]

    def start(self) -> None:
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._copy_mode()
        else:
            self.pipe = (r, w)
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)  # EPERM above the user's quota
            self.capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        self._want_read()

    def _copy_mode(self) -> None:
        self.buffer = bytearray(_COPY_BUFFER)
        self.view = memoryview(self.buffer)
        self.capacity = _COPY_BUFFER

    # -- readiness bookkeeping

    def _want_read(self) -> None:
        if not self.reading and not self.finished:
            self.loop.add_reader(self.src_fd, self._on_readable)
            self.reading = True

    def _stop_read(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False

    def _want_write(self) -> None:
        if not self.writing and not self.finished:
            self.loop.add_writer(self.dst_fd, self._flush)
            self.writing = True

    def _stop_write(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False

    def stop(self) -> None:
        self._stop_read()
        self._stop_write()
        self.finished = True

    def close(self) -> None:
        self.stop()
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
        if self.view is not None:
            self.view.release()
            self.view = None

    # -- data movement

    def _read(self) -> int:
        if self.pipe is not None:
            try:
                return os.splice(self.src_fd, self.pipe[1], self.capacity, flags=_SPLICE_FLAGS)
            except OSError as exc:
                if exc.errno != errno.EINVAL or self.count or self.pending:
                    raise
                # Splice refused for this socket type: move bytes through a buffer instead.
                for fd in self.pipe:
                    os.close(fd)
                self.pipe = None
                self._copy_mode()
        assert self.view is not None
        if self.pending == 0:
            self.start_at = 0
        end = self.start_at + self.pending
        return self.src.recv_into(self.view[end:])

    def _write(self) -> int:
        if self.pipe is not None:
            return os.splice(self.pipe[0], self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
        assert self.view is not None
        sent = self.dst.send(self.view[self.start_at : self.start_at + self.pending])
        self.start_at += sent
        return sent

    def _room(self) -> bool:
        if self.pipe is not None or self.pending == 0:
            return True  # the kernel tells us (EAGAIN) when the pipe is full
        return self.start_at + self.pending < self.capacity

    def _on_readable(self) -> None:
        if not self._room():
            self._stop_read()
            return
        try:
            n = self._read()
        except BlockingIOError:
            if self.pending:
                self._stop_read()  # the pipe is full; _flush resumes reading as it drains
            return
        except OSError as exc:
            self.pump.fail(exc)
            return
        if n == 0:
            self.eof = True
            self._stop_read()
        else:
            self.pending += n
            if self.writing:
                return  # dst is known to be full; its writable callback flushes
        self._flush()

    def _flush(self) -> None:
        while self.pending:
            try:
                n = self._write()
            except BlockingIOError:
                self._want_write()
                return
            except OSError as exc:
                self.pump.fail(exc)
                return
            if n == 0:
                self._want_write()
                return
            self.pending -= n
            self.count += n
            if not self.eof and self.pending <= self.capacity // 2:
                self._want_read()
        self._stop_write()
        if self.eof:
            self._finish()
        else:
            self._want_read()

    def _finish(self) -> None:
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.stop()
        self.pump.direction_done()
