"""TLS-terminating, secret-injecting relay for connections a sandbox opens to a bound host.

The egress proxy hands over a sandbox's TCP connection (ClientHello already read) and a TCP
connection to the real host. :func:`intercept` terminates the sandbox's TLS with a leaf from the
sandbox's own CA, opens *verified* TLS to the host, and relays HTTP/1.1 or HTTP/2, rewriting the
head of every request through a :class:`Rewriter` (placeholder → real value, header injection).

Design:

* **Memory BIOs.** Both TLS ends are ``ssl.SSLObject`` over ``MemoryBIO`` pairs driven by the
  loop's ``sock_recv``/``sock_sendall`` on the raw non-blocking sockets the proxy owns. The
  ClientHello was consumed while sniffing, so it is simply written into the incoming BIO;
  ``start_tls`` has no way to be handed bytes already read. One lock per side serializes
  flushing the outgoing BIO, so records written by two tasks never interleave on the wire.
* **Upstream first.** The upstream handshake runs before the client's: upstream is offered the
  client's ALPN protocols among ``h2``/``http/1.1``, and the client is then offered exactly what
  upstream chose. Both ends therefore speak the same HTTP version and no translation is ever
  needed. If the upstream handshake or its certificate check fails, the client handshake is
  still completed (as HTTP/1.1) so that its first request can be answered ``502`` with the
  reason, instead of an opaque TLS failure.
* **HTTP/1.1.** Request heads are parsed strictly (``sniff.parse_http_request_head``, 64 KiB),
  checked (Host names the intercepted host, no CL+TE, only ``chunked``), rewritten and
  re-serialized; bodies are streamed by their framing (chunked bodies re-framed, extensions
  dropped); responses flow back raw, so pipelining, ``Expect: 100-continue`` and keep-alive
  work without parsing them. A request carrying ``Upgrade`` turns the connection into a raw
  tunnel both ways after its head (WebSockets).
* **HTTP/2.** ``h2`` on both sides, streams mapped 1:1. Flow control is end to end: DATA taken
  from one side is acknowledged to it only once the other side's window has accepted it, so
  buffering per connection is bounded by the windows we advertise. ``h2`` closes its state
  machine on any GOAWAY; the relay reopens it so that in-flight streams finish (a server's
  graceful GOAWAY is routine, e.g. after a number of requests).

Never done: forwarding a request without its rewrite (a failure to inject or to reach or verify
the upstream is answered ``502`` with ``corral egress proxy: <reason>``); talking to an
upstream whose certificate or name did not verify; rewriting bodies or trailers (placeholders
there reach the host unchanged, like everywhere toward unbound hosts); logging a secret's value
(``on_request`` gets the original target, which holds placeholders only, and secret names).
Responses are not scrubbed: a host that echoes request headers shows the real value to the
sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import ssl
import struct
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from corral.net.ca import SandboxCA
from corral.net.sniff import (
    HttpHead,
    NeedMore,
    absolute_target,
    parse_authority,
    parse_http_request_head,
)

__all__ = ["MAX_REQUEST_HEAD", "Injection", "InterceptResult", "Rewriter", "intercept"]

MAX_REQUEST_HEAD = 64 * 1024
_READ = 64 * 1024
_MAX_CHUNK_LINE = 4096
_LINGER = 2.0  # after our last bytes, how long unread client input may delay the close
_H2_STREAM_WINDOW = 256 * 1024
_H2_CONN_WINDOW = 1024 * 1024
_H2_MAX_STREAMS = 100
_H2_MAX_HEADER_LIST = 64 * 1024
_PROTOCOLS = ("h2", "http/1.1")
_PEER_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PLACEHOLDER = re.compile(r"[\x21-\x7e]{8,}")
_TARGET = re.compile(r"[\x21-\x7e]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
# Headers that decide routing or framing: never rewritten, never injected.
_FIXED = frozenset({"host", "content-length", "transfer-encoding"})
_NOT_INJECTABLE = _FIXED | {
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
    "expect",
}
_PHRASES = {
    400: "Bad Request",
    405: "Method Not Allowed",
    421: "Misdirected Request",
    502: "Bad Gateway",
}


# --------------------------------------------------------------------------- rewriting


@dataclass(frozen=True)
class Injection:
    """One secret bound to the intercepted host, and how it goes into requests."""

    name: str  # secret name (for logs)
    placeholder: str  # token the sandbox holds; "" for header mode only
    value: str = field(repr=False)  # the real value
    header: str | None = None  # header mode: set this header, replacing one of that name
    format: str = "{value}"  # header mode: the header's value, "{value}" standing for it

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an injection needs a secret name")
        if self.placeholder and not _PLACEHOLDER.fullmatch(self.placeholder):
            raise ValueError(
                f"secret {self.name}: a placeholder is 8 or more printable ASCII characters"
            )
        if _BAD_VALUE.search(self.value):
            raise ValueError(f"secret {self.name}: the value has control characters")
        if self.header is None:
            if not self.placeholder:
                raise ValueError(f"secret {self.name}: neither a placeholder nor a header")
            return
        if not _TOKEN.fullmatch(self.header) or self.header.lower() in _NOT_INJECTABLE:
            raise ValueError(f"secret {self.name}: {self.header!r} cannot be injected")
        if "{value}" not in self.format or _BAD_VALUE.search(self.format):
            raise ValueError(f"secret {self.name}: the header format needs {{value}}")


def _wire(text: str) -> str:
    """``text`` as header-value characters: its UTF-8 bytes, one character per byte (header
    values are handled as latin-1-decoded bytes throughout)."""
    return text.encode("utf-8").decode("latin-1")


class Rewriter:
    """The rewrite of one request head for one host's injections; see :meth:`rewrite`."""

    def __init__(self, injections: Sequence[Injection]) -> None:
        self._injections = tuple(injections)
        by_placeholder: dict[str, Injection] = {}
        self._set: dict[str, tuple[str, str, str]] = {}  # lower name → (name, value, secret)
        for inj in self._injections:
            if inj.placeholder:
                if inj.placeholder in by_placeholder:
                    raise ValueError(f"placeholder of {inj.name} is used twice")
                by_placeholder[inj.placeholder] = inj
            if inj.header is not None:
                lname = inj.header.lower()
                if lname in self._set:
                    raise ValueError(f"header {inj.header} is injected twice")
                value = _wire(inj.format.replace("{value}", inj.value))
                self._set[lname] = (inj.header, value, inj.name)
        self._by_placeholder = by_placeholder
        # One pass, longest first: a value that happens to contain another placeholder is
        # never rewritten again, and overlapping placeholders resolve the same way every time.
        ordered = sorted(by_placeholder, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        self._in_header = {p: _wire(i.value) for p, i in by_placeholder.items()}
        # In a target the value is data, so it is percent-encoded: the host decodes it back to
        # exactly the value, and no value can change the target's structure or break its line.
        self._in_target = {
            p: urllib.parse.quote(i.value, safe="") for p, i in by_placeholder.items()
        }
        self._order = {inj.name: n for n, inj in enumerate(self._injections)}

    @property
    def injections(self) -> tuple[Injection, ...]:
        return self._injections

    def rewrite(
        self, target: str, headers: list[tuple[str, str]]
    ) -> tuple[str, list[tuple[str, str]], list[str]]:
        """(new target, new headers, names of the secrets used).

        Placeholders are replaced in the target and in every header value (names untouched)
        except Host, Content-Length, Transfer-Encoding and pseudo-headers: those decide where
        and how the request goes, and were checked before. The HTTP/2 ``:path`` pseudo-header
        becomes the new target. A header-mode injection replaces every header of its name (at
        the first one's place) or is appended; its secret counts as used on every request.
        """
        used: set[str] = set()

        def swap(table: dict[str, str]) -> Callable[[re.Match[str]], str]:
            def repl(m: re.Match[str]) -> str:
                used.add(self._by_placeholder[m.group(0)].name)
                return table[m.group(0)]

            return repl

        new_target = target
        if self._pattern is not None:
            new_target = self._pattern.sub(swap(self._in_target), target)
        out: list[tuple[str, str]] = []
        placed: set[str] = set()
        for name, value in headers:
            lname = name.lower()
            if lname in self._set:
                if lname not in placed:
                    placed.add(lname)
                    header, injected, secret = self._set[lname]
                    out.append((header, injected))
                    used.add(secret)
                continue
            if lname == ":path":
                out.append((name, new_target))
            elif lname.startswith(":") or lname in _FIXED or self._pattern is None:
                out.append((name, value))
            else:
                out.append((name, self._pattern.sub(swap(self._in_header), value)))
        for lname, (header, injected, secret) in self._set.items():
            if lname not in placed:
                out.append((header, injected))
                used.add(secret)
        return new_target, out, sorted(used, key=self._order.__getitem__)


# --------------------------------------------------------------------------- result & entry


@dataclass
class InterceptResult:
    """What happened on one intercepted connection.

    ``bytes_out``/``bytes_in``: bytes sent to / received from the upstream socket (TLS records).
    ``requests``: requests forwarded upstream. ``error``: set when a request was answered
    locally (502, 421, 400, …) or the exchange failed midway.
    """

    bytes_out: int = 0
    bytes_in: int = 0
    requests: int = 0
    protocol: str = "http/1.1"  # "http/1.1" | "h2"
    error: str | None = None


OnRequest = Callable[[str, str, list[str]], None]


class _Failure(Exception):
    """The exchange cannot go on; the message is the reason."""


@dataclass
class _Local:
    """A request to answer locally instead of forwarding."""

    status: int
    reason: str


async def intercept(
    client: socket.socket,
    first: bytes,
    upstream: socket.socket,
    *,
    host: str,
    ca: SandboxCA,
    client_alpn: Sequence[str],
    upstream_ctx: ssl.SSLContext,
    rewriter: Rewriter,
    on_request: OnRequest,
    handshake_timeout: float = 10.0,
    failure: str | None = None,
) -> InterceptResult:
    """Relay one sandbox connection to ``host`` with secrets injected; see the module docstring.

    ``client``/``upstream``: non-blocking connected sockets; both are closed on return (or
    cancellation). ``first``: the bytes already read from the client (its ClientHello, whole
    or in part). ``upstream_ctx`` must verify certificates and host names; its ALPN list is set
    by every call right before use (no await in between, so concurrent calls on one event loop
    cannot see each other's), so dedicate it to this use and to the loop's thread.
    ``on_request(method, target without query, secret names)`` is called for every request
    forwarded upstream, before it is sent; if it raises, the request is answered 502 instead.
    ``failure``: the secrets cannot be injected (e.g. the store failed); then the upstream is
    not contacted at all and the client's first request is answered 502 with this reason.
    """
    loop = asyncio.get_running_loop()
    result = InterceptResult()
    up: _TlsSide | None = None
    down: _TlsSide | None = None
    graceful = False
    try:
        if upstream_ctx.verify_mode != ssl.CERT_REQUIRED or not upstream_ctx.check_hostname:
            raise ValueError("upstream_ctx must verify certificates and host names")
        upstream_error = failure
        protocol = "http/1.1"
        if failure is None:
            offer = [p for p in _PROTOCOLS if p in client_alpn] or ["http/1.1"]
            upstream_ctx.set_alpn_protocols(offer)
            up = _TlsSide(
                loop,
                upstream,
                lambda i, o: upstream_ctx.wrap_bio(i, o, server_side=False, server_hostname=host),
            )
            upstream_error = await _handshake_upstream(up, host, handshake_timeout)
            if upstream_error is None and up.obj.selected_alpn_protocol() == "h2":
                protocol = "h2"
        try:
            server_ctx = ca.server_context(host, [protocol])
        except ValueError as exc:
            raise _Failure(f"no certificate for {host}: {exc}") from None
        down = _TlsSide(
            loop, client, lambda i, o: server_ctx.wrap_bio(i, o, server_side=True), first
        )
        try:
            async with asyncio.timeout(handshake_timeout):
                await down.handshake()
        except TimeoutError:
            raise _Failure("the client's TLS handshake timed out") from None
        except (ssl.SSLError, OSError) as exc:
            raise _Failure(f"the client's TLS handshake failed: {_ssl_reason(exc)}") from None
        if upstream_error is not None or up is None:
            upstream_error = upstream_error or "no upstream"
            result.error = upstream_error
            await _refuse_first(down, upstream_error, handshake_timeout)
            graceful = True
            return result
        client_protocol = down.obj.selected_alpn_protocol() or "http/1.1"
        if client_protocol != protocol:
            # Only when the sniffed ALPN list differs from the one the handshake saw.
            reason = f"the client negotiated {client_protocol}, {host} {protocol}"
            result.error = reason
            await _answer(down, _Local(502, reason))
            graceful = True
            return result
        result.protocol = protocol
        assert up is not None
        if protocol == "h2":
            await _H2Relay(down, up, host, rewriter, on_request, result).run()
        else:
            await _H1Relay(down, up, host, rewriter, on_request, result).run()
        graceful = True
    except _Failure as exc:
        result.error = str(exc)
    except h2.exceptions.H2Error as exc:
        result.error = f"HTTP/2 relay failed: {exc!r}"
    except OSError as exc:  # ssl.SSLError included
        # A client that hangs up (reset, broken pipe) has merely left; anything else failed.
        if not (down is not None and down.failure is exc and exc.errno in _PEER_GONE):
            side = "client" if down is not None and down.failure is exc else host
            result.error = f"connection to {side} failed: {_ssl_reason(exc)}"
    finally:
        if up is not None:
            result.bytes_out, result.bytes_in = up.sent, up.received
        for sock in (upstream, client):
            _close(loop, sock, rst=not graceful)
    return result


# --------------------------------------------------------------------------- TLS over sockets


class _TlsSide:
    """One TLS connection: an SSLObject over memory BIOs, pumped through a raw socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        wrap: Callable[[ssl.MemoryBIO, ssl.MemoryBIO], ssl.SSLObject],
        first: bytes = b"",
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = wrap(self.incoming, self.outgoing)
        if first:
            self.incoming.write(first)
        self.sent = 0
        self.received = 0
        self.eof = False  # the peer's FIN was read
        self.ragged = False  # the peer stopped without close_notify (a possible truncation)
        self.broken = False  # a send stopped midway: nothing more can be framed on this side
        self.write_closed = False
        self.failure: OSError | None = None  # the socket error that ended this side
        self._lock = asyncio.Lock()

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self.flush()
                await self._fill()
                continue
            break
        await self.flush()

    async def _fill(self) -> None:
        try:
            data = await self.loop.sock_recv(self.sock, _READ)
        except OSError as exc:
            self.failure = exc
            raise
        if data:
            self.received += len(data)
            self.incoming.write(data)
        else:
            self.eof = True
            self.incoming.write_eof()

    async def recv(self) -> bytes:
        """Some plaintext, or b"" once the peer has finished (see ``ragged``)."""
        while True:
            try:
                data = self.obj.read(_READ)
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    await self.flush()
                if self.eof:
                    self.ragged = True
                    return b""
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLEOFError:
                self.ragged = True
                return b""
            except ssl.SSLError as exc:
                self.failure = exc
                raise
            if self.outgoing.pending:
                await self.flush()  # post-handshake replies (key updates)
            return data

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        # Written to the BIO before the first await, so records keep the order of the calls.
        view = memoryview(data)
        while view:
            view = view[self.obj.write(view) :]
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            while self.outgoing.pending:
                chunk = self.outgoing.read()
                try:
                    await self.loop.sock_sendall(self.sock, chunk)
                except BaseException as exc:
                    self.broken = True
                    if isinstance(exc, OSError):
                        self.failure = exc
                    raise
                self.sent += len(chunk)

    async def close_write(self, notify: bool = True) -> None:
        """Finish our direction: close_notify (unless ``notify`` is False, to pass a cut on as a
        cut), then FIN. The peer's close_notify is not waited for."""
        if self.write_closed or self.broken:
            return
        self.write_closed = True
        if notify:
            with contextlib.suppress(ssl.SSLError):
                self.obj.unwrap()
        with contextlib.suppress(OSError):
            await self.flush()
            self.sock.shutdown(socket.SHUT_WR)

    async def linger(self) -> None:
        """Read and drop what the peer still sends until its FIN (bounded): closing a socket
        with unread input resets it, and a reset can destroy our last bytes before the peer
        has read them."""
        if self.eof or self.broken:
            return
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(_LINGER):
                while await self.loop.sock_recv(self.sock, _READ):
                    pass


def _close(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, rst: bool) -> None:
    fd = sock.fileno()
    if fd < 0:
        return
    # A cancelled sock_recv unregisters only on a later loop iteration; by then the fd number
    # may belong to another socket.
    loop.remove_reader(fd)
    loop.remove_writer(fd)
    if rst:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the connection was closed during the TLS handshake"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


async def _handshake_upstream(up: _TlsSide, host: str, timeout: float) -> str | None:
    """None when the upstream TLS is up and verified, else why not."""
    try:
        async with asyncio.timeout(timeout):
            await up.handshake()
    except TimeoutError:
        return f"TLS handshake with {host} timed out"
    except ssl.SSLCertVerificationError as exc:
        return f"certificate verify failed for {host}: {exc.verify_message}"
    except (ssl.SSLError, OSError) as exc:
        return f"TLS handshake with {host} failed: {_ssl_reason(exc)}"
    return None


def _response(local: _Local) -> bytes:
    body = f"corral egress proxy: {local.reason}\n".encode("utf-8", "replace")
    head = (
        f"HTTP/1.1 {local.status} {_PHRASES.get(local.status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _answer(down: _TlsSide, local: _Local) -> None:
    """Answer the client locally and end the connection gracefully."""
    await down.send(_response(local))
    await down.close_write()
    await down.linger()


async def _refuse_first(down: _TlsSide, reason: str, timeout: float) -> None:
    """Answer the client's first request 502 (the upstream is not usable)."""
    buf = bytearray()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                data = await down.recv()
                if not data:
                    if not buf:
                        return  # it left without asking anything
                    break
                buf += data
                if not isinstance(parse_http_request_head(bytes(buf), MAX_REQUEST_HEAD), NeedMore):
                    break
    await _answer(down, _Local(502, reason))


def _names_host(authority: str, host: str) -> bool:
    try:
        return parse_authority(authority, 443)[0] == host
    except ValueError:
        return False


def _check_authorities(names: list[str], host: str) -> _Local | None:
    if not names:
        return _Local(400, "request without a host name")
    for name in names:
        if not _names_host(name, host):
            return _Local(421, f"misdirected request: {name!r} is not {host}")
    return None


def _target_path(target: str) -> str:
    return target.split("?", 1)[0]


# --------------------------------------------------------------------------- HTTP/1.1


class _H1Relay:
    """Requests parsed, checked, rewritten and streamed; responses relayed raw."""

    def __init__(
        self,
        down: _TlsSide,
        up: _TlsSide,
        host: str,
        rewriter: Rewriter,
        on_request: OnRequest,
        result: InterceptResult,
    ) -> None:
        self.down = down
        self.up = up
        self.host = host
        self.rewriter = rewriter
        self.on_request = on_request
        self.result = result
        self.buf = bytearray()

    async def run(self) -> None:
        responses = asyncio.create_task(self._responses())
        requests = asyncio.create_task(self._requests())
        try:
            await asyncio.wait({responses, requests}, return_when=asyncio.FIRST_COMPLETED)
            if responses.done() and not requests.done():
                # The host ended the connection: nothing sent after this could be answered.
                requests.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await requests
                responses.result()
                await self.down.close_write(notify=not self.up.ragged)
                await self.down.linger()
                return
            local = requests.result()
            if local is None:
                # The client finished sending: pass that on, then relay until the host ends.
                await self.up.close_write(notify=not self.down.ragged)
                await responses
                await self.down.close_write(notify=not self.up.ragged)
                return
            self.result.error = local.reason
            if self.result.requests:
                # Earlier requests' responses are still coming: end the upstream's input so it
                # finishes them and closes, then answer this one after them.
                await self.up.close_write()
                await responses
            else:
                responses.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await responses
            await _answer(self.down, local)
        finally:
            for task in (requests, responses):
                if not task.done():
                    task.cancel()
            await asyncio.gather(requests, responses, return_exceptions=True)

    async def _responses(self) -> None:
        while data := await self.up.recv():
            await self.down.send(data)

    # -- reading the client

    async def _more(self) -> bool:
        data = await self.down.recv()
        if not data:
            return False
        self.buf += data
        return True

    async def _line(self) -> bytes | _Local | None:
        """One CRLF-terminated line (without it); None at EOF."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                if end == 0 or self.buf[end - 1] != 0x0D or b"\r" in self.buf[: end - 1]:
                    return _Local(400, "malformed chunked body: bare CR or LF")
                line = bytes(self.buf[: end - 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > _MAX_CHUNK_LINE:
                return _Local(400, "malformed chunked body: line too long")
            if not await self._more():
                return None

    async def _forward(self, n: int) -> bool:
        """Stream the next ``n`` body bytes upstream; False if the client ended first."""
        while n:
            if not self.buf and not await self._more():
                return False
            take = min(n, len(self.buf))
            await self.up.send(self.buf[:take])
            del self.buf[:take]
            n -= take
        return True

    # -- requests

    async def _requests(self) -> _Local | None:
        """Relay requests until the client ends (None) or one must be answered locally."""
        while True:
            head = await self._head()
            if not isinstance(head, HttpHead):
                return head
            checked = self._check(head)
            if isinstance(checked, _Local):
                return checked
            framing, length = checked
            try:
                target, headers, used = self.rewriter.rewrite(head.target, list(head.headers))
                wire = _serialize(head, target, headers, framing, length)
            except Exception as exc:
                return _Local(502, f"cannot inject secrets into the request: {exc}")
            try:
                self.on_request(head.method, _target_path(head.target), used)
            except Exception as exc:
                return _Local(502, f"cannot record the request: {exc!r}")
            del self.buf[: head.head_len]
            await self.up.send(wire)
            self.result.requests += 1
            if framing == "upgrade":
                await self._forward_raw()
                return None
            if framing == "length":
                ended = not await self._forward(length)
            elif framing == "chunked":
                outcome = await self._chunked()
                if isinstance(outcome, _Local):
                    return outcome
                ended = not outcome
            else:
                ended = False
            if ended:
                self.result.error = "the client closed in the middle of a request body"
                return None

    async def _head(self) -> HttpHead | _Local | None:
        while True:
            # Empty lines before a request line are skipped, as servers do (RFC 9112 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            parsed = parse_http_request_head(bytes(self.buf), MAX_REQUEST_HEAD)
            if isinstance(parsed, HttpHead):
                return parsed
            if not isinstance(parsed, NeedMore):
                return _Local(400, f"malformed request: {parsed.reason}")
            if not await self._more():
                if self.buf.strip(b"\r\n"):
                    self.result.error = "the client closed in the middle of a request head"
                return None

    def _check(self, head: HttpHead) -> _Local | tuple[str, int]:
        """The request's framing ("none", "length", "chunked", "upgrade") and length, or why
        it is refused."""
        if head.method == "CONNECT":
            return _Local(405, "CONNECT is not allowed through the secret-injecting proxy")
        names = [head.host] if head.host is not None else []
        try:
            absolute = absolute_target(head.target)
        except ValueError as exc:
            return _Local(400, f"malformed request target: {exc}")
        if absolute is not None:
            names.append(f"{absolute.host}:{absolute.port}")
        refused = _check_authorities(names, self.host)
        if refused is not None:
            return refused
        lengths = [v for n, v in head.headers if n.lower() == "content-length"]
        codings = [v for n, v in head.headers if n.lower() == "transfer-encoding"]
        upgrade = any(n.lower() == "upgrade" for n, _ in head.headers)
        if lengths and codings:
            return _Local(400, "request has both Content-Length and Transfer-Encoding")
        if codings:
            if len(codings) != 1 or codings[0].lower() != "chunked":
                return _Local(400, "only Transfer-Encoding: chunked is supported")
            if head.version != "HTTP/1.1":
                return _Local(400, "Transfer-Encoding in an HTTP/1.0 request")
            return ("upgrade" if upgrade else "chunked"), 0
        if lengths:
            text = lengths[0]
            if len(lengths) != 1 or not text.isascii() or not text.isdigit() or len(text) > 18:
                return _Local(400, "invalid Content-Length")
            length = int(text)
            if upgrade:
                return "upgrade", length
            return ("length" if length else "none"), length
        return ("upgrade" if upgrade else "none"), 0

    async def _chunked(self) -> bool | _Local:
        """Re-frame a chunked body upstream; False if the client ended first."""
        while True:
            line = await self._line()
            if not isinstance(line, bytes):
                return False if line is None else line
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                return _Local(400, "malformed chunked body: bad chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            await self.up.send(b"%x\r\n" % size)
            if not await self._forward(size):
                return False
            while len(self.buf) < 2:
                if not await self._more():
                    return False
            if self.buf[:2] != b"\r\n":
                return _Local(400, "malformed chunked body: chunk not followed by CRLF")
            del self.buf[:2]
            await self.up.send(b"\r\n")
        trailer = bytearray(b"0\r\n")
        while True:
            line = await self._line()
            if not isinstance(line, bytes):
                return False if line is None else line
            if not line:
                break
            name, colon, value = line.partition(b":")
            if (
                not colon
                or not _TOKEN.fullmatch(name.decode("latin-1"))
                or _BAD_VALUE.search(value.decode("latin-1"))
            ):
                return _Local(400, "malformed chunked body: bad trailer field")
            trailer += line + b"\r\n"
            if len(trailer) > MAX_REQUEST_HEAD:
                return _Local(400, "malformed chunked body: trailer section too large")
        trailer += b"\r\n"
        await self.up.send(trailer)
        return True

    async def _forward_raw(self) -> None:
        if self.buf:
            await self.up.send(self.buf)
            self.buf.clear()
        while data := await self.down.recv():
            await self.up.send(data)


def _serialize(
    head: HttpHead, target: str, headers: list[tuple[str, str]], framing: str, length: int
) -> bytes:
    if not _TARGET.fullmatch(target):
        raise ValueError("the rewritten request target is not valid")
    lines = [f"{head.method} {target} {head.version}"]
    for name, value in headers:
        lname = name.lower()
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise ValueError(f"the rewritten header {name} is not valid")
        # Framing headers are written as we read them, so the host frames the body as we do.
        if lname == "content-length":
            value = str(length)
        elif lname == "transfer-encoding":
            value = "chunked"
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --------------------------------------------------------------------------- HTTP/2


@dataclass
class _Data:
    data: bytes
    unacked: int  # flow-controlled bytes (padding included) not yet handed back to the sender
    offset: int = 0


@dataclass
class _Headers:
    headers: list[tuple[bytes, bytes]]
    end: bool


@dataclass
class _End:
    pass


@dataclass
class _Reset:
    code: int


_Item = _Data | _Headers | _End | _Reset


@dataclass
class _Stream:
    cid: int  # the client's stream id
    uid: int | None = None  # ours toward upstream, once opened
    request: list[HeaderTuple] | None = None  # headers waiting for a free upstream stream
    to_up: deque[_Item] = field(default_factory=deque)
    to_down: deque[_Item] = field(default_factory=deque)
    up_end_queued: bool = False
    down_end_queued: bool = False
    responded: bool = False  # a final response is queued toward the client
    client_ended: bool = False
    local: bool = False  # answered by us; the request body is not wanted
    up_done: bool = False  # nothing more goes upstream on it
    down_done: bool = False  # nothing more goes to the client on it


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _texts(headers: Sequence[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    return [(_b(n).decode("latin-1"), _b(v).decode("latin-1")) for n, v in headers]


def _settings(client: bool) -> h2.settings.Settings:
    values = {
        h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _H2_MAX_STREAMS,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _H2_STREAM_WINDOW,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _H2_MAX_HEADER_LIST,
    }
    if client:
        values[h2.settings.SettingCodes.ENABLE_PUSH] = 0
    return h2.settings.Settings(client=client, initial_values=values)


def _reopen(conn: h2.connection.H2Connection) -> None:
    """Undo h2's switch to CLOSED on a GOAWAY sent or received, so streams already under
    way can finish (RFC 9113 6.8); no new stream is started on a connection that had one."""
    conn.state_machine.state = (
        h2.connection.ConnectionState.CLIENT_OPEN
        if conn.config.client_side
        else h2.connection.ConnectionState.SERVER_OPEN
    )


class _H2Relay:
    """Two h2 connections, client-facing (server side) and upstream (client side), stream by
    stream. All protocol state changes are synchronous; awaits happen only when flushing."""

    def __init__(
        self,
        cside: _TlsSide,
        uside: _TlsSide,
        host: str,
        rewriter: Rewriter,
        on_request: OnRequest,
        result: InterceptResult,
    ) -> None:
        self.cside = cside
        self.uside = uside
        self.host = host
        self.rewriter = rewriter
        self.on_request = on_request
        self.result = result
        self.down = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.up = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.down.local_settings = _settings(client=False)
        self.up.local_settings = _settings(client=True)
        self.streams: dict[int, _Stream] = {}
        self.by_uid: dict[int, _Stream] = {}
        self.pending: deque[_Stream] = deque()
        self.upstream_dead: str | None = None
        self.upstream_closing = False  # it sent GOAWAY: no new streams toward it
        self.client_closing = False  # it sent GOAWAY
        self.max_cid = 0
        self.finished = asyncio.Event()

    async def run(self) -> None:
        for conn in (self.down, self.up):
            conn.initiate_connection()
            conn.increment_flow_control_window(_H2_CONN_WINDOW - 65535)
        await self._flush()
        client = asyncio.create_task(self._read_client())
        upstream = asyncio.create_task(self._read_upstream())
        finished = asyncio.create_task(self.finished.wait())
        pending: set[asyncio.Task[Any]] = {client, upstream, finished}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a fatal failure raises here
                if finished in done or client in done:
                    break
        finally:
            for task in (client, upstream, finished):
                task.cancel()
            await asyncio.gather(client, upstream, finished, return_exceptions=True)
        await self._goodbye()

    async def _goodbye(self) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.down.close_connection()
        if self.upstream_dead is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.up.close_connection()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._flush()
        for side in (self.uside, self.cside):
            with contextlib.suppress(OSError, ssl.SSLError):
                await side.close_write()
        await self.cside.linger()

    # -- I/O

    async def _flush(self) -> None:
        while True:
            if self.upstream_dead is None:
                out = self.up.data_to_send()
                if out:
                    try:
                        await self.uside.send(out)
                    except (OSError, ssl.SSLError) as exc:
                        self._upstream_failed(f"sending to {self.host} failed: {_ssl_reason(exc)}")
            out = self.down.data_to_send()
            if not out:
                return
            await self.cside.send(out)

    async def _read_client(self) -> None:
        while data := await self.cside.recv():
            try:
                events = self.down.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                with contextlib.suppress(OSError, ssl.SSLError):
                    await self.cside.send(self.down.data_to_send())
                raise _Failure(f"HTTP/2 protocol error from the client: {exc}") from None
            for event in events:
                self._client_event(event)
            await self._progress()

    async def _read_upstream(self) -> None:
        try:
            while data := await self.uside.recv():
                try:
                    events = self.up.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._upstream_failed(f"HTTP/2 protocol error from {self.host}: {exc}")
                    break
                for event in events:
                    self._upstream_event(event)
                await self._progress()
            else:
                self._upstream_failed(f"{self.host} closed the connection")
        except (OSError, ssl.SSLError) as exc:
            self._upstream_failed(f"connection to {self.host} failed: {_ssl_reason(exc)}")
        await self._progress()

    async def _progress(self) -> None:
        self._move()
        await self._flush()
        if (self.upstream_dead or self.upstream_closing or self.client_closing) and not (
            self.streams
        ):
            self.finished.set()

    # -- events from the client

    def _client_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers)
        elif isinstance(event, h2.events.DataReceived):
            s = self.streams.get(event.stream_id)
            if s is None or s.up_done:
                self.down.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                s.to_up.append(_Data(event.data, event.flow_controlled_length))
        elif isinstance(event, h2.events.TrailersReceived):
            s = self.streams.get(event.stream_id)
            if s is not None and not s.up_done:
                s.to_up.append(_Headers([(_b(n), _b(v)) for n, v in event.headers], end=True))
                s.up_end_queued = True
        elif isinstance(event, h2.events.StreamEnded):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.client_ended = True
                if not s.up_end_queued and not s.up_done:
                    s.to_up.append(_End())
                    s.up_end_queued = True
        elif isinstance(event, h2.events.StreamReset):
            s = self.streams.get(event.stream_id)
            if s is not None:
                s.down_done = True
                self._discard(s.to_down, self.up, s.uid)
                self._reset_up(s, event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            _reopen(self.down)
            self.client_closing = True

    def _request(self, cid: int, raw: Sequence[tuple[bytes | str, bytes | str]]) -> None:
        s = _Stream(cid)
        self.streams[cid] = s
        self.max_cid = max(self.max_cid, cid)
        headers = _texts(raw)
        pseudo = {n: v for n, v in headers if n.startswith(":")}
        method, path = pseudo.get(":method", ""), pseudo.get(":path", "")
        if self.upstream_dead is not None:
            self._local(s, _Local(502, self.upstream_dead))
            return
        if self.upstream_closing:
            self._refuse(s)
            return
        if method == "CONNECT":
            self._local(s, _Local(405, "CONNECT is not allowed through the secret-injecting proxy"))
            return
        names = [v for n, v in headers if n in (":authority", "host")]
        refused = _check_authorities(names, self.host)
        if refused is not None:
            self._local(s, refused)
            return
        try:
            _, rewritten, used = self.rewriter.rewrite(path, headers)
            before = set(headers)
            request: list[HeaderTuple] = []
            for name, value in rewritten:
                pair = (name.lower().encode("latin-1"), value.encode("latin-1"))
                # Injected values are kept out of HPACK's dynamic table (RFC 7541 7.1.3).
                cls = HeaderTuple if (name, value) in before else NeverIndexedHeaderTuple
                request.append(cls(*pair))
        except Exception as exc:
            self._local(s, _Local(502, f"cannot inject secrets into the request: {exc}"))
            return
        try:
            self.on_request(method, _target_path(path), used)
        except Exception as exc:
            self._local(s, _Local(502, f"cannot record the request: {exc!r}"))
            return
        s.request = request
        self.pending.append(s)
        self.result.requests += 1

    # -- events from upstream

    def _upstream_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            s = self.by_uid.get(event.stream_id)
            if s is not None and not s.down_done:
                final = isinstance(event, h2.events.ResponseReceived)
                s.to_down.append(_Headers([(_b(n), _b(v)) for n, v in event.headers], end=False))
                s.responded = s.responded or final
        elif isinstance(event, h2.events.DataReceived):
            s = self.by_uid.get(event.stream_id)
            if s is None or s.down_done:
                self.up.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                s.to_down.append(_Data(event.data, event.flow_controlled_length))
        elif isinstance(event, h2.events.TrailersReceived):
            s = self.by_uid.get(event.stream_id)
            if s is not None and not s.down_done:
                s.to_down.append(_Headers([(_b(n), _b(v)) for n, v in event.headers], end=True))
                s.down_end_queued = True
        elif isinstance(event, h2.events.StreamEnded):
            s = self.by_uid.get(event.stream_id)
            if s is not None and not s.down_end_queued and not s.down_done:
                s.to_down.append(_End())
                s.down_end_queued = True
        elif isinstance(event, h2.events.StreamReset):
            s = self.by_uid.get(event.stream_id)
            if s is not None:
                s.up_done = True
                self._discard(s.to_up, self.down, s.cid)
                self._reset_down(s, event.error_code)
        elif isinstance(event, h2.events.ConnectionTerminated):
            _reopen(self.up)
            self._upstream_goaway(event.last_stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                # The client may not open more streams than upstream takes: streams waiting
                # for a slot would hold connection window that running streams need.
                limit = max(1, min(_H2_MAX_STREAMS, changed.new_value))
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.down.update_settings(
                        {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit}
                    )

    def _upstream_goaway(self, last: int | None) -> None:
        self.upstream_closing = True
        for s in list(self.streams.values()):
            if s.uid is not None and last is not None and s.uid > last:
                # Never processed upstream: safe for the client to retry elsewhere.
                s.up_done = True
                self._discard(s.to_up, self.down, s.cid)
                self._reset_down(s, ErrorCodes.REFUSED_STREAM)
        while self.pending:
            self._refuse(self.pending.popleft())

    def _upstream_failed(self, reason: str) -> None:
        if self.upstream_dead is not None:
            return
        self.upstream_dead = reason
        for s in list(self.streams.values()):
            s.up_done = True
            s.request = None
            self._discard(s.to_up, self.down, s.cid)
            if s.down_done or s.down_end_queued:
                continue
            if s.responded:
                s.to_down.append(_Reset(ErrorCodes.INTERNAL_ERROR))
            else:
                self._local(s, _Local(502, reason))
        self.pending.clear()

    # -- streams

    def _local(self, s: _Stream, local: _Local) -> None:
        if self.result.error is None or local.status == 502:
            self.result.error = local.reason
        body = f"corral egress proxy: {local.reason}\n".encode("utf-8", "replace")
        self._discard(s.to_down, self.up, s.uid)
        s.local = True
        s.up_done = True
        s.responded = True
        s.down_end_queued = True
        s.to_down.extend(
            [
                _Headers(
                    [
                        (b":status", str(local.status).encode()),
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                    end=False,
                ),
                _Data(body, 0),
                _End(),
            ]
        )

    def _refuse(self, s: _Stream) -> None:
        s.up_done = True
        s.request = None
        self._reset_down(s, ErrorCodes.REFUSED_STREAM)

    def _reset_up(self, s: _Stream, code: int) -> None:
        # Even when the request was fully sent the response may still be coming; h2 refuses
        # (and we ignore) a reset of a stream that is closed both ways.
        if s.uid is not None and self.upstream_dead is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.up.reset_stream(s.uid, code)
        s.up_done = True
        s.request = None
        self._discard(s.to_up, self.down, s.cid)

    def _reset_down(self, s: _Stream, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.down.reset_stream(s.cid, code)
        s.down_done = True
        self._discard(s.to_down, self.up if self.upstream_dead is None else None, s.uid)

    @staticmethod
    def _discard(
        queue: deque[_Item], source: h2.connection.H2Connection | None, sid: int | None
    ) -> None:
        """Drop queued items, handing their flow-control credit back to the sender so that the
        connection window does not shrink by what was dropped."""
        credit = sum(item.unacked for item in queue if isinstance(item, _Data))
        queue.clear()
        if credit and source is not None and sid is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                source.acknowledge_received_data(credit, sid)

    def _move(self) -> None:
        """Open waiting streams, push queued items as far as the windows allow, forget
        finished streams."""
        self._open_waiting()
        for s in list(self.streams.values()):
            if not s.down_done:
                self._push_down(s)
            if not s.up_done and s.uid is not None:
                self._push_up(s)
            if s.down_done and s.local and not s.client_ended:
                # The request body is not wanted (RFC 9113 8.1).
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.down.reset_stream(s.cid, ErrorCodes.NO_ERROR)
                s.client_ended = True
            if s.down_done and s.up_done:
                del self.streams[s.cid]
                if s.uid is not None:
                    self.by_uid.pop(s.uid, None)

    def _open_waiting(self) -> None:
        while self.pending and self.upstream_dead is None and not self.upstream_closing:
            limit = self.up.remote_settings.max_concurrent_streams
            if self.up.open_outbound_streams >= limit:
                return
            s = self.pending.popleft()
            if s.request is None or s.up_done:
                continue
            uid = self.up.get_next_available_stream_id()
            only_end = len(s.to_up) == 1 and isinstance(s.to_up[0], _End)
            try:
                self.up.send_headers(uid, s.request, end_stream=only_end)
            except h2.exceptions.ProtocolError as exc:
                self._local(s, _Local(502, f"cannot forward the request: {exc}"))
                continue
            s.uid = uid
            s.request = None
            self.by_uid[uid] = s
            if only_end:
                s.to_up.clear()
                s.up_done = True

    def _push_down(self, s: _Stream) -> None:
        ack = self.up if self.upstream_dead is None else None
        try:
            s.down_done = self._push(s.to_down, self.down, s.cid, ack, s.uid)
        except h2.exceptions.ProtocolError as exc:
            if isinstance(exc, h2.exceptions.StreamClosedError):
                s.down_done = True
                self._discard(s.to_down, ack, s.uid)
            else:  # e.g. response headers h2 will not send: the stream cannot go on
                self._reset_down(s, ErrorCodes.INTERNAL_ERROR)
            self._reset_up(s, ErrorCodes.CANCEL)

    def _push_up(self, s: _Stream) -> None:
        assert s.uid is not None
        try:
            s.up_done = self._push(s.to_up, self.up, s.uid, self.down, s.cid)
        except h2.exceptions.ProtocolError:
            s.up_done = True
            self._discard(s.to_up, self.down, s.cid)

    @staticmethod
    def _push(
        queue: deque[_Item],
        conn: h2.connection.H2Connection,
        sid: int,
        source: h2.connection.H2Connection | None,
        source_sid: int | None,
    ) -> bool:
        """Send queued items on ``conn`` as its windows allow; True once the stream has ended
        in that direction."""
        while queue:
            item = queue[0]
            if isinstance(item, _Headers):
                conn.send_headers(sid, item.headers, end_stream=item.end)
                queue.popleft()
                if item.end:
                    return True
            elif isinstance(item, _End):
                conn.end_stream(sid)
                queue.popleft()
                return True
            elif isinstance(item, _Reset):
                conn.reset_stream(sid, item.code)
                queue.clear()
                return True
            else:
                while item.offset < len(item.data):
                    room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if room <= 0:
                        return False
                    n = min(room, len(item.data) - item.offset)
                    conn.send_data(sid, item.data[item.offset : item.offset + n])
                    item.offset += n
                    credit = min(n, item.unacked)
                    if item.offset == len(item.data):
                        credit = item.unacked  # the padding goes back with the last byte
                    if credit and source is not None and source_sid is not None:
                        item.unacked -= credit
                        source.acknowledge_received_data(credit, source_sid)
                if item.unacked and source is not None and source_sid is not None:
                    source.acknowledge_received_data(item.unacked, source_sid)
                    item.unacked = 0
                queue.popleft()
        return False
