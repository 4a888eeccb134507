"""The ClientHello and HTTP head parsers classify hostile first bytes strictly and never crash."""

from __future__ import annotations

import random
import ssl
import struct

import pytest

from corral.net.sniff import (
    MAX_HTTP_HEAD,
    MAX_SNIFF_BYTES,
    NEED_MORE,
    HttpHead,
    NeedMore,
    NotHttp,
    absolute_target,
    connect_authority,
    is_ip_literal,
    normalize_name,
    parse_authority,
    parse_client_hello,
    parse_http_request_head,
)

# --------------------------------------------------------------------------- builders


def real_hello(server_hostname: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight OpenSSL sends (a real ClientHello)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def ext(etype: int, data: bytes) -> bytes:
    return struct.pack("!HH", etype, len(data)) + data


def alpn_ext(*protocols: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protocols)
    return ext(16, struct.pack("!H", len(entries)) + entries)


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def hello_body(
    extensions: bytes | None, *, session_id: bytes = b"", suites: bytes = b"\x13\x01"
) -> bytes:
    body = b"\x03\x03" + b"\x11" * 32
    body += bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites
    body += b"\x01\x00"
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(payload: bytes, size: int = 16384, rtype: int = 0x16) -> bytes:
    out = b""
    for i in range(0, len(payload), size):
        chunk = payload[i : i + size]
        out += struct.pack("!BBBH", rtype, 3, 1, len(chunk)) + chunk
    return out


def hello(extensions: bytes | None, **kw: bytes) -> bytes:
    return records(handshake(hello_body(extensions, **kw)))


# --------------------------------------------------------------------------- TLS


def test_real_hello_with_sni() -> None:
    data = real_hello("Allowed.Example.")
    result = parse_client_hello(data)
    assert (result.kind, result.name, result.ech) == ("sni", "allowed.example", False)


def test_real_hello_without_sni() -> None:
    assert parse_client_hello(real_hello(None)).kind == "no_sni"


def test_real_hello_alpn_in_client_order() -> None:
    result = parse_client_hello(real_hello("api.test", ["h2", "http/1.1"]))
    assert (result.kind, result.name, result.alpn) == ("sni", "api.test", ("h2", "http/1.1"))
    assert parse_client_hello(real_hello(None, ["http/1.1"])).alpn == ("http/1.1",)
    assert parse_client_hello(real_hello("api.test")).alpn == ()


def test_alpn_ids_are_opaque_bytes() -> None:
    result = parse_client_hello(hello(sni_ext(b"a.test") + alpn_ext(b"\x0a\x0a", b"h2", b"\xff")))
    assert result.alpn == ("\n\n", "h2", "\xff")
    assert parse_client_hello(hello(alpn_ext(b"h2"))).alpn == ("h2",)  # no_sni keeps it too


def test_every_tls_prefix_needs_more() -> None:
    data = real_hello("allowed.test")
    for i in range(len(data)):
        assert parse_client_hello(data[:i]).kind == "need_more", i


def test_trailing_bytes_after_hello_are_ignored() -> None:
    data = real_hello("allowed.test") + b"\x17\x03\x03\x00\x05early"
    assert parse_client_hello(data).name == "allowed.test"


@pytest.mark.parametrize("size", [2, 7, 100, 300])
def test_hello_split_over_records(size: int) -> None:
    payload = handshake(hello_body(sni_ext(b"split.test")))
    data = records(payload, size)
    assert parse_client_hello(data).name == "split.test"
    for i in range(len(data)):
        assert parse_client_hello(data[:i]).kind == "need_more"


def test_large_hello_across_records() -> None:
    padding = ext(21, b"\x00" * 15000)
    data = records(handshake(hello_body(sni_ext(b"big.test") + padding)), 4096)
    assert len(data) <= MAX_SNIFF_BYTES
    assert parse_client_hello(data).name == "big.test"


def test_too_large_hello_is_malformed() -> None:
    padding = ext(21, b"\x00" * 17000)
    data = records(handshake(hello_body(sni_ext(b"big.test") + padding)))
    result = parse_client_hello(data[:100])
    assert result.kind == "malformed" and "too large" in result.reason


def test_too_many_records_is_malformed() -> None:
    data = records(handshake(hello_body(sni_ext(b"a.test") + ext(21, b"\x00" * 200))), 2)
    assert parse_client_hello(data).kind == "malformed"


def test_not_tls() -> None:
    assert parse_client_hello(b"GET / HTTP/1.1\r\n").kind == "not_tls"
    assert parse_client_hello(b"\x16\x02").kind == "not_tls"
    assert parse_client_hello(b"").kind == "need_more"
    assert parse_client_hello(b"\x16").kind == "need_more"


def test_ech_reported() -> None:
    result = parse_client_hello(hello(sni_ext(b"public.test") + ext(0xFE0D, b"\x00\x01\x02")))
    assert result.kind == "sni" and result.ech
    assert parse_client_hello(hello(ext(0xFE0D, b"x"))).ech


def test_ip_literal_sni_is_reported_as_such() -> None:
    result = parse_client_hello(hello(sni_ext(b"192.0.2.1")))
    assert result.kind == "sni" and result.name is not None and is_ip_literal(result.name)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(hello(sni_ext(b"a.test", b"b.test")), id="two-host-names"),
        pytest.param(hello(sni_ext(b"a.test", name_type=1)), id="other-name-type"),
        pytest.param(hello(sni_ext(b"a.test") + sni_ext(b"b.test")), id="duplicate-extension"),
        pytest.param(hello(sni_ext(b"bad name.test")), id="space-in-name"),
        pytest.param(hello(sni_ext(b"a\x00.test")), id="nul-in-name"),
        pytest.param(hello(sni_ext("\u00e9.test".encode())), id="non-ascii"),
        pytest.param(hello(sni_ext(b"")), id="empty-name"),
        pytest.param(hello(sni_ext(b"x" * 64 + b".test")), id="long-label"),
        pytest.param(hello(sni_ext(b"a.test"), session_id=b"s" * 33), id="long-session-id"),
        pytest.param(hello(sni_ext(b"a.test"), suites=b"\x13"), id="odd-suites"),
        pytest.param(hello(sni_ext(b"a.test"), suites=b""), id="no-suites"),
        pytest.param(records(handshake(hello_body(None), msg_type=2)), id="not-client-hello"),
        pytest.param(records(handshake(b"\x03\x03" + b"\x00" * 10)), id="short-hello"),
        pytest.param(b"\x16\x03\x01\x00\x00", id="empty-record"),
        pytest.param(b"\x16\x03\x01\x40\x01" + b"\x00" * 20, id="record-too-long"),
        pytest.param(hello(sni_ext(b"a.test") + ext(16, b"\x00\x00")), id="empty-alpn-list"),
        pytest.param(hello(sni_ext(b"a.test") + alpn_ext(b"h2", b"")), id="empty-alpn-id"),
        pytest.param(hello(sni_ext(b"a.test") + ext(16, b"\x00\x04\x02h2")), id="alpn-past-end"),
        pytest.param(
            hello(sni_ext(b"a.test") + ext(16, b"\x00\x03\x02h2x")), id="bytes-after-alpn"
        ),
        pytest.param(
            hello(sni_ext(b"a.test") + alpn_ext(b"h2") + alpn_ext(b"h2")), id="duplicate-alpn"
        ),
    ],
)
def test_malformed_hellos(data: bytes) -> None:
    assert parse_client_hello(data).kind == "malformed"


def test_extension_length_past_end_is_malformed() -> None:
    body = hello_body(sni_ext(b"a.test"))
    body = body[:-1]  # extension block claims one byte more than there is
    assert parse_client_hello(records(handshake(body))).kind == "malformed"


def test_bytes_after_extensions_are_malformed() -> None:
    body = hello_body(sni_ext(b"a.test")) + b"\x00"
    assert parse_client_hello(records(handshake(body))).kind == "malformed"


def test_interleaved_other_record_is_malformed() -> None:
    payload = handshake(hello_body(sni_ext(b"a.test")))
    data = records(payload[:20]) + records(b"\x01", rtype=0x15) + records(payload[20:])
    assert parse_client_hello(data).kind == "malformed"


def test_hello_without_extensions() -> None:
    assert parse_client_hello(hello(None)).kind == "no_sni"
    assert parse_client_hello(hello(b"")).kind == "no_sni"


def test_random_bytes_never_crash() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 600))
        if rng.random() < 0.5:
            data = b"\x16\x03" + data
        assert parse_client_hello(data).kind in {
            "need_more",
            "not_tls",
            "malformed",
            "no_sni",
            "sni",
        }
        assert isinstance(parse_http_request_head(data), HttpHead | NeedMore | NotHttp)


def test_mutated_hellos_never_crash() -> None:
    rng = random.Random(99)
    base = bytearray(real_hello("mutate.test"))
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        result = parse_client_hello(bytes(data[: rng.randrange(len(data) + 1)]))
        if result.kind == "sni":
            assert result.name is not None


# --------------------------------------------------------------------------- HTTP


def test_simple_request_head() -> None:
    data = b"GET /x?y=1 HTTP/1.1\r\nHost: Allowed.test:8080\r\nAccept:  */* \r\n\r\nbody"
    head = parse_http_request_head(data)
    assert isinstance(head, HttpHead)
    assert (head.method, head.target, head.version) == ("GET", "/x?y=1", "HTTP/1.1")
    assert head.headers == (("Host", "Allowed.test:8080"), ("Accept", "*/*"))
    assert head.host == "Allowed.test:8080"
    assert data[head.head_len :] == b"body"


def test_head_without_headers() -> None:
    head = parse_http_request_head(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(head, HttpHead) and head.host is None and head.headers == ()


def test_every_http_prefix_needs_more() -> None:
    data = b"POST http://a.test/ HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n"
    for i in range(len(data)):
        assert parse_http_request_head(data[:i]) == NEED_MORE, data[:i]


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        b"\x16\x03\x01\x02\x00",
        b"\x00\x01\x02",
        b" GET / HTTP/1.1\r\n",
        b"EHLO mail.test\r\n",
        b"A" * 40,
    ],
)
def test_other_protocols_are_not_http(data: bytes) -> None:
    result = parse_http_request_head(data)
    assert isinstance(result, NotHttp) and not result.malformed


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", id="duplicate-host"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nhOST: a\r\n\r\n", id="duplicate-host-case"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n X: folded\r\n\r\n", id="obs-fold"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", id="bare-cr"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", id="bare-lf"),
        pytest.param(b"GET / HTTP/1.1\n", id="bare-lf-request-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", id="space-in-name"),
        pytest.param(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", id="no-colon"),
        pytest.param(b"GET / HTTP/1.1\r\n: empty\r\n\r\n", id="empty-name"),
        pytest.param(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
        pytest.param(b"GET /a b HTTP/1.1\r\n\r\n", id="space-in-target"),
        pytest.param(b"GET  / HTTP/1.1\r\n\r\n", id="double-space"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
        pytest.param(b"GET /\x7f HTTP/1.1\r\n\r\n", id="del-in-target"),
    ],
)
def test_malformed_heads(data: bytes) -> None:
    result = parse_http_request_head(data)
    assert isinstance(result, NotHttp) and result.malformed, result


def test_head_size_limit() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * MAX_HTTP_HEAD
    result = parse_http_request_head(data)
    assert isinstance(result, NotHttp) and result.malformed
    ok = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * (MAX_HTTP_HEAD - 100) + b"\r\n\r\n"
    assert isinstance(parse_http_request_head(ok), HttpHead)


def test_head_size_limit_is_a_parameter() -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 40000 + b"\r\n\r\n"
    assert isinstance(parse_http_request_head(big, 64 * 1024), HttpHead)
    result = parse_http_request_head(big[:-4] + b"a" * 30000, 64 * 1024)
    assert isinstance(result, NotHttp) and result.malformed and "64 KiB" in result.reason


def test_long_request_line_without_end() -> None:
    result = parse_http_request_head(b"GET /" + b"a" * MAX_HTTP_HEAD)
    assert isinstance(result, NotHttp)


def test_obs_text_in_values_is_kept() -> None:
    head = parse_http_request_head(b"GET / HTTP/1.1\r\nX: caf\xe9\r\nHost: a\r\n\r\n")
    assert isinstance(head, HttpHead) and head.headers[0] == ("X", "caf\xe9")


# --------------------------------------------------------------------------- authorities


def test_parse_authority() -> None:
    assert parse_authority("Example.COM.", 80) == ("example.com", 80)
    assert parse_authority("example.com:8443") == ("example.com", 8443)
    assert parse_authority("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert parse_authority("192.0.2.1", 80) == ("192.0.2.1", 80)
    assert parse_authority("_srv.x-y.test:1", None) == ("_srv.x-y.test", 1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",  # no port and no default
        "user@example.com:80",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:+80",
        "example.com:80:80",
        "2001:db8::1",
        "[2001:db8::1",
        "[fe80::1%eth0]:80",
        "[2001:db8::1]x",
        "exa mple.com:80",
        "-bad.test:80",
        "a..b:80",
        "127.1:80",
        "0x7f.1:80",
        "a.123:80",
        "caf\u00e9.test:80",
        "a/b:80",
    ],
)
def test_bad_authorities(text: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(text)


def test_normalize_name() -> None:
    assert normalize_name("A.Test.") == "a.test"
    for bad in ["", ".", "a" * 254, "a_b c", "x.1"]:
        with pytest.raises(ValueError):
            normalize_name(bad)


def test_absolute_target() -> None:
    t = absolute_target("http://Allowed.test:8080/p?q=1")
    assert t is not None
    assert (t.scheme, t.host, t.port, t.origin_form) == ("http", "allowed.test", 8080, "/p?q=1")
    t = absolute_target("HTTP://a.test")
    assert t is not None and (t.port, t.origin_form) == (80, "/")
    t = absolute_target("http://a.test?x")
    assert t is not None and t.origin_form == "/?x"
    assert absolute_target("/path") is None
    assert absolute_target("*") is None
    assert absolute_target("a.test:443") is None
    for bad in ["http://user@a.test/", "http://a.test/#frag", "http:///x", "foo://a.test/"]:
        with pytest.raises(ValueError):
            absolute_target(bad)


def test_connect_authority() -> None:
    assert connect_authority("a.test:443") == ("a.test", 443)
    with pytest.raises(ValueError):
        connect_authority("a.test")
