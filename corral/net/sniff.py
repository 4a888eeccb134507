"""Parsers for the first bytes a sandbox sends on a TCP connection: a TLS ClientHello (for its SNI)
or an HTTP/1.x request head (for its Host), plus the authority forms found in request targets.

Every byte here is attacker-controlled, so the parsers are pure, bounded and strict: anything
ambiguous (two host names, folded or duplicated headers, bare CR/LF, odd lengths) is reported as
malformed rather than guessed at, because the egress proxy and the upstream server must never
read the same bytes as naming different hosts.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAX_CLIENT_HELLO",
    "MAX_HTTP_HEAD",
    "MAX_SNIFF_BYTES",
    "NEED_MORE",
    "AbsoluteTarget",
    "HttpHead",
    "NeedMore",
    "NotHttp",
    "SniResult",
    "absolute_target",
    "connect_authority",
    "is_ip_literal",
    "normalize_name",
    "parse_authority",
    "parse_client_hello",
    "parse_http_request_head",
]

MAX_CLIENT_HELLO = 16 * 1024  # handshake body bytes; real hellos (even post-quantum) are < 2 KiB
MAX_HELLO_RECORDS = 64  # a hello split in more records than this is an evasion attempt
MAX_HTTP_HEAD = 16 * 1024
# Upper bound of what a caller ever has to buffer before a parser gives a final answer.
MAX_SNIFF_BYTES = MAX_CLIENT_HELLO + 4 + 5 * MAX_HELLO_RECORDS

_RECORD_HANDSHAKE = 0x16
_MAX_RECORD = 16 * 1024  # TLSPlaintext.length limit (RFC 8446 5.1)
_HS_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_EXT_ECH = 0xFE0D
_NAME_TYPE_HOST = 0


# --------------------------------------------------------------------------- names


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")


def normalize_name(name: str) -> str:
    """``name`` lowercased without its trailing dot; ValueError unless it is a plain DNS name.

    A last label that is numeric is refused: resolvers and HTTP libraries read names like
    ``127.1`` or ``0x7f.1`` as addresses, so they must never pass as names.
    """
    if not name.isascii():
        raise ValueError("name is not ASCII")
    host = name.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253:
        raise ValueError("name is empty or longer than 253 characters")
    labels = host.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise ValueError(f"invalid label {label!r}")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("name looks like a numeric address")
    return host


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_authority(authority: str, default_port: int | None = None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` → (normalized host or address text, port).

    ValueError when malformed, or when there is no port and no ``default_port``. Userinfo,
    zone ids, empty ports and unbracketed IPv6 are refused.
    """
    if not authority or not authority.isascii() or not authority.isprintable():
        raise ValueError("authority is empty or not printable ASCII")
    if any(c in authority for c in " \t@/?#\\%"):
        raise ValueError("authority contains a forbidden character")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("unterminated IPv6 literal")
        host = str(ipaddress.IPv6Address(authority[1:end]))
        rest = authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("garbage after IPv6 literal")
        port_text = rest[1:] if rest else None
    else:
        host_text, colon, port_text_raw = authority.partition(":")
        if ":" in port_text_raw:
            raise ValueError("IPv6 literal without brackets")
        port_text = port_text_raw if colon else None
        try:
            host = str(ipaddress.IPv4Address(host_text))
        except ValueError:
            host = normalize_name(host_text)
    if port_text is None:
        if default_port is None:
            raise ValueError("authority has no port")
        return host, default_port
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid port {port_text!r}")
    return host, int(port_text)


def connect_authority(target: str) -> tuple[str, int]:
    """The (host, port) of a CONNECT request target, which must carry a port."""
    return parse_authority(target)


@dataclass(frozen=True)
class AbsoluteTarget:
    scheme: str  # lowercased
    host: str
    port: int
    origin_form: str  # path and query, "/" when empty


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def absolute_target(target: str) -> AbsoluteTarget | None:
    """The parts of an absolute-form request target, None for any other form.

    ValueError when it is absolute-form but malformed (unknown scheme default port, userinfo,
    bad authority, a fragment).
    """
    m = _SCHEME.match(target)
    if m is None:
        return None
    scheme = m.group(1).lower()
    rest = target[m.end() :]
    cut = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, tail = rest[:cut], rest[cut:]
    if "#" in tail:
        raise ValueError("request target has a fragment")
    host, port = parse_authority(authority, _DEFAULT_PORTS.get(scheme))
    if not tail:
        tail = "/"
    elif tail.startswith("?"):
        tail = "/" + tail
    return AbsoluteTarget(scheme, host, port, tail)


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class SniResult:
    """What the first bytes of a connection say about TLS.

    ``kind``: ``need_more`` (a prefix of a plausible ClientHello), ``not_tls``, ``malformed``
    (claims to be TLS but breaks the rules; never guess), ``no_sni`` or ``sni`` (``name`` set).
    ``ech`` is True when the hello carries encrypted_client_hello, whose inner name we cannot see.
    ``alpn``: the protocols of the ALPN extension in the client's order (``sni``/``no_sni`` only;
    empty without the extension). Protocol ids are opaque bytes, read as latin-1 so that none is
    lost; a list that breaks RFC 7301's shape (empty, an empty id) makes the hello malformed,
    as every TLS server would refuse it too.
    """

    kind: Literal["need_more", "not_tls", "malformed", "no_sni", "sni"]
    name: str | None = None
    ech: bool = False
    reason: str = ""
    alpn: tuple[str, ...] = ()


_NEED_MORE_TLS = SniResult("need_more")


class _Malformed(Exception):
    pass


def parse_client_hello(data: bytes) -> SniResult:
    """Classify ``data`` (everything received so far) as a TLS ClientHello."""
    if not data:
        return _NEED_MORE_TLS
    if data[0] != _RECORD_HANDSHAKE:
        return SniResult("not_tls", reason="not a TLS handshake record")
    if len(data) >= 2 and data[1] != 3:
        return SniResult("not_tls", reason="not a TLS record version")
    try:
        body = _hello_body(data)
        if body is None:
            return _NEED_MORE_TLS
        return _parse_hello_body(body)
    except _Malformed as exc:
        return SniResult("malformed", reason=f"malformed ClientHello: {exc}")


def _hello_body(data: bytes) -> bytes | None:
    """The ClientHello handshake body reassembled from consecutive handshake records."""
    fragments = bytearray()
    pos = 0
    records = 0
    needed: int | None = None  # handshake body length once the 4-byte header is in
    while True:
        if needed is not None and len(fragments) >= 4 + needed:
            return bytes(fragments[4 : 4 + needed])
        if records >= MAX_HELLO_RECORDS:
            raise _Malformed("split over too many records")
        if len(data) - pos < 5:
            if pos < len(data):
                _check_record_prefix(data[pos:])
            return None
        rtype, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if rtype != _RECORD_HANDSHAKE:
            raise _Malformed("handshake interleaved with another record type")
        if major != 3:
            raise _Malformed("bad record version")
        if length == 0 or length > _MAX_RECORD:
            raise _Malformed(f"bad record length {length}")
        fragment = data[pos + 5 : pos + 5 + length]
        fragments += fragment
        if len(fragments) >= 4 and needed is None:
            if fragments[0] != _HS_CLIENT_HELLO:
                raise _Malformed("first handshake message is not a ClientHello")
            needed = int.from_bytes(fragments[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                raise _Malformed(f"ClientHello of {needed} bytes is too large")
            if needed < 38:
                raise _Malformed("ClientHello too short")
        if len(fragment) < length:
            if needed is not None and len(fragments) >= 4 + needed:
                return bytes(fragments[4 : 4 + needed])
            return None
        pos += 5 + length
        records += 1


def _check_record_prefix(prefix: bytes) -> None:
    if prefix[0] != _RECORD_HANDSHAKE:
        raise _Malformed("handshake interleaved with another record type")
    if len(prefix) >= 2 and prefix[1] != 3:
        raise _Malformed("bad record version")


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Malformed("length runs past its container")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, len_bytes: int) -> bytes:
        return self.take(self.uint(len_bytes))

    def left(self) -> int:
        return len(self.data) - self.pos


def _parse_hello_body(body: bytes) -> SniResult:
    r = _Reader(body)
    if r.uint(1) != 3:
        raise _Malformed("bad legacy_version")
    r.take(1 + 32)  # legacy_version minor, random
    if len(r.vector(1)) > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = r.vector(2)
    if not suites or len(suites) % 2:
        raise _Malformed("bad cipher suite list")
    if not r.vector(1):
        raise _Malformed("no compression methods")
    if r.left() == 0:
        return SniResult("no_sni", reason="ClientHello has no extensions")
    ext = _Reader(r.vector(2))
    if r.left():
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    name: str | None = None
    ech = False
    alpn: tuple[str, ...] = ()
    while ext.left():
        etype = ext.uint(2)
        edata = ext.vector(2)
        if etype in seen:
            raise _Malformed(f"duplicate extension {etype}")
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            name = _server_name(edata)
        elif etype == _EXT_ECH:
            ech = True
        elif etype == _EXT_ALPN:
            alpn = _alpn(edata)
    if name is None:
        return SniResult("no_sni", ech=ech, reason="ClientHello has no server name", alpn=alpn)
    return SniResult("sni", name=name, ech=ech, alpn=alpn)


def _alpn(edata: bytes) -> tuple[str, ...]:
    r = _Reader(edata)
    names = _Reader(r.vector(2))
    if r.left():
        raise _Malformed("bytes after the ALPN protocol list")
    found: list[str] = []
    while names.left():
        proto = names.vector(1)
        if not proto:
            raise _Malformed("empty ALPN protocol name")
        found.append(proto.decode("latin-1"))
    if not found:
        raise _Malformed("empty ALPN protocol list")
    return tuple(found)


def _server_name(edata: bytes) -> str | None:
    r = _Reader(edata)
    if not edata:
        return None  # the empty form is only legal from servers; carries no name either way
    names = _Reader(r.vector(2))
    if r.left():
        raise _Malformed("bytes after the server name list")
    found: list[bytes] = []
    while names.left():
        ntype = names.uint(1)
        value = names.vector(2)
        if ntype != _NAME_TYPE_HOST:
            raise _Malformed(f"server name type {ntype}")
        found.append(value)
    if len(found) != 1:
        raise _Malformed(f"{len(found)} host names")
    raw = found[0]
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Malformed("server name is not ASCII") from None
    if is_ip_literal(text):
        # Forbidden by RFC 6066 but reported as is: the caller refuses it with a clear reason.
        return str(ipaddress.ip_address(text))
    try:
        return normalize_name(text)
    except ValueError as exc:
        raise _Malformed(f"server name: {exc}") from None


# --------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class NeedMore:
    """A prefix of something the parser may still accept."""


NEED_MORE = NeedMore()


@dataclass(frozen=True)
class NotHttp:
    """Not an HTTP/1.x request head. ``malformed``: it starts like one but breaks the rules."""

    reason: str
    malformed: bool = False


@dataclass(frozen=True)
class HttpHead:
    method: str
    target: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: tuple[tuple[str, str], ...]  # names as sent, values without surrounding whitespace
    host: str | None  # the single Host header's value
    head_len: int  # bytes of data up to and including the blank line


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAX_METHOD = 32
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e]+")


def parse_http_request_head(
    data: bytes, max_head: int = MAX_HTTP_HEAD
) -> HttpHead | NeedMore | NotHttp:
    """Classify ``data`` (everything received so far) as the head of an HTTP/1.x request of at
    most ``max_head`` bytes."""
    # The method is checked first so that other protocols are told apart from a few bytes.
    limit = min(len(data), _MAX_METHOD + 1)
    for i in range(limit):
        if data[i] == 0x20:
            if i == 0:
                return NotHttp("request line starts with a space")
            break
        if data[i] not in _TCHAR:
            return NotHttp("not an HTTP method")
    else:
        if len(data) > _MAX_METHOD:
            return NotHttp("method too long")
        return NEED_MORE
    line_end = data.find(b"\n")
    if line_end < 0:
        if len(data) >= max_head:
            return NotHttp("request line too long")
        return NEED_MORE
    line = data[:line_end]
    if not line.endswith(b"\r"):
        # Only a line that ends like an HTTP request line makes this HTTP at all.
        return NotHttp("bare LF", malformed=bool(_VERSION.search(line[-8:])))
    line = line[:-1]
    parts = line.split(b" ")
    looks_http = _VERSION.fullmatch(line[-8:]) is not None
    if not looks_http:
        return NotHttp("request line does not end with an HTTP version")
    if len(parts) != 3:
        return NotHttp("request line is not METHOD SP target SP version", malformed=True)
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return NotHttp(f"unsupported version {version.decode()}", malformed=True)
    if not _TARGET.fullmatch(target):
        return NotHttp("request target is empty or has forbidden bytes", malformed=True)
    end = data.find(b"\r\n\r\n", line_end - 1)
    if end < 0 or end + 4 > max_head:
        bad = _bad_line_ending(data[: max_head + 4])
        if bad:
            return NotHttp(bad, malformed=True)
        if len(data) >= max_head:
            return NotHttp(f"request head larger than {max_head // 1024} KiB", malformed=True)
        return NEED_MORE
    head_len = end + 4
    bad = _bad_line_ending(data[:head_len])
    if bad:
        return NotHttp(bad, malformed=True)
    headers: list[tuple[str, str]] = []
    host: str | None = None
    lines = data[line_end + 1 : end].split(b"\r\n") if end > line_end else []
    for raw in lines:
        if raw[:1] in (b" ", b"\t"):
            return NotHttp("obsolete line folding", malformed=True)
        name, colon, value = raw.partition(b":")
        if not colon or not name or any(c not in _TCHAR for c in name):
            return NotHttp(f"bad header line {raw[:40]!r}", malformed=True)
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            return NotHttp(f"control character in header {name.decode()}", malformed=True)
        name_text, value_text = name.decode("ascii"), value.decode("latin-1")
        if name_text.lower() == "host":
            if host is not None:
                return NotHttp("more than one Host header", malformed=True)
            host = value_text
        headers.append((name_text, value_text))
    return HttpHead(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        version=version.decode("ascii"),
        headers=tuple(headers),
        host=host,
        head_len=head_len,
    )


def _bad_line_ending(head: bytes) -> str | None:
    """Why ``head`` has a CR or LF that is not part of a CRLF pair (None when it has none)."""
    cr = head.count(b"\r")
    lf = head.count(b"\n")
    pairs = head.count(b"\r\n")
    # A trailing CR may be the first half of a CRLF still to come.
    if cr - pairs > (1 if head.endswith(b"\r") else 0):
        return "bare CR"
    if lf != pairs:
        return "bare LF"
    return None
