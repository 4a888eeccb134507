"""The TLS interceptor swaps placeholders for real values in every request head (HTTP/1.1 and
HTTP/2, real clients), streams bodies untouched, passes WebSockets, and answers 502/421/400
instead of ever forwarding a request it could not verify, check or inject."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import httpx
import pytest
import trustme
import websockets.asyncio.client
import websockets.asyncio.server
from hyperframe.frame import GoAwayFrame

from corral.net.ca import SandboxCA
from corral.net.intercept import Injection, InterceptResult, Rewriter, intercept
from corral.net.sniff import parse_client_hello

HOST = "api.x.test"
PH = "corral-secret-0123456789abcdef"  # what the sandbox holds
REAL = "sk-real-value-42"
PH2 = "corral-secret-header-only-token"
REAL2 = "hdr-real-value"
MiB = 1024 * 1024


# --------------------------------------------------------------------------- fake upstream


@dataclass
class Seen:
    """One request as the fake upstream received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body_len: int
    body_sha: str
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]


def pattern(n: int) -> bytes:
    block = hashlib.sha256(b"pattern").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


class FakeUpstream:
    """An HTTPS origin (HTTP/1.1 through h11, HTTP/2 through h2) that records what it got.

    ``/download/N`` answers N pattern bytes; ``/die`` closes the connection without answering;
    anything else answers JSON describing the request.
    """

    def __init__(self, cert: trustme.LeafCert, alpn: list[str]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.ctx.set_alpn_protocols(alpn)
        self.seen: list[Seen] = []
        self.resets: list[int] = []
        self.handshakes = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        sslobj = writer.get_extra_info("ssl_object")
        try:
            if sslobj.selected_alpn_protocol() == "h2":
                await self._serve_h2(reader, writer)
            else:
                await self._serve_h1(reader, writer)
        except (ConnectionError, ssl.SSLError, h11.RemoteProtocolError):
            pass
        finally:
            writer.close()

    def _answer(self, seen: Seen) -> bytes:
        self.seen.append(seen)
        return json.dumps(
            {
                "target": seen.target,
                "headers": seen.headers,
                "body_len": seen.body_len,
                "body_sha": seen.body_sha,
            }
        ).encode()

    async def _serve_h1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        req: h11.Request | None = None
        sha = hashlib.sha256()
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                conn.receive_data(await reader.read(256 * 1024))
            elif isinstance(event, h11.Request):
                req, sha, size = event, hashlib.sha256(), 0
                if req.target == b"/die":
                    return
            elif isinstance(event, h11.Data):
                sha.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert req is not None
                target = req.target.decode()
                seen = Seen(
                    req.method.decode(),
                    target,
                    [(n.decode(), v.decode("latin-1")) for n, v in req.headers],
                    size,
                    sha.hexdigest(),
                    [(n.decode(), v.decode()) for n, v in event.headers],
                )
                if target.startswith("/download/"):
                    self.seen.append(seen)
                    n = int(target.rsplit("/", 1)[1])
                    writer.write(conn.send(h11.Response(status_code=200, headers=[])))
                    body = pattern(n)
                    for i in range(0, n, 256 * 1024):
                        writer.write(conn.send(h11.Data(data=body[i : i + 256 * 1024])))
                        await writer.drain()
                else:
                    out = self._answer(seen)
                    headers = [
                        ("content-type", "application/json"),
                        ("content-length", str(len(out))),
                    ]
                    writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
                    writer.write(conn.send(h11.Data(data=out)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                return

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        window = asyncio.Event()
        state: dict[int, dict[str, Any]] = {}
        tasks: set[asyncio.Task[None]] = set()
        closing: set[int] = set()

        async def flush() -> None:
            writer.write(conn.data_to_send())
            await writer.drain()

        async def send_body(sid: int, body: bytes) -> None:
            while body:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if room <= 0:
                    window.clear()
                    await window.wait()
                    continue
                try:
                    conn.send_data(sid, body[:room])
                except h2.exceptions.StreamClosedError:
                    return  # reset by the client
                body = body[room:]
                await flush()
            conn.end_stream(sid)
            await flush()
            if sid in closing:
                writer.close()

        while True:
            data = await reader.read(256 * 1024)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = [(str(n), str(v)) for n, v in event.headers]
                    if dict(headers).get(":path") == "/die":
                        return
                    if dict(headers)[":path"].startswith("/goaway"):
                        # A graceful shutdown: this stream is still served, then the end.
                        writer.write(conn.data_to_send())
                        writer.write(GoAwayFrame(0, last_stream_id=event.stream_id).serialize())
                        closing.add(event.stream_id)
                    if dict(headers).get(":path") == "/reset":
                        conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
                        continue
                    state[event.stream_id] = {"headers": headers, "sha": hashlib.sha256(), "n": 0}
                elif isinstance(event, h2.events.TrailersReceived):
                    state[event.stream_id]["trailers"] = [
                        (str(n), str(v)) for n, v in event.headers
                    ]
                elif isinstance(event, h2.events.DataReceived):
                    st = state[event.stream_id]
                    st["sha"].update(event.data)
                    st["n"] += len(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in state:
                    st = state.pop(event.stream_id)
                    pseudo = dict(st["headers"])
                    seen = Seen(
                        pseudo[":method"],
                        pseudo[":path"],
                        st["headers"],
                        st["n"],
                        st["sha"].hexdigest(),
                        st.get("trailers", []),
                    )
                    if seen.target.startswith("/download/"):
                        self.seen.append(seen)
                        body = pattern(int(seen.target.rsplit("/", 1)[1]))
                    else:
                        body = self._answer(seen)
                    conn.send_headers(event.stream_id, [(":status", "200")])
                    task = asyncio.create_task(send_body(event.stream_id, body))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif isinstance(event, h2.events.StreamReset):
                    self.resets.append(event.error_code)
                    window.set()
                elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                    window.set()
            await flush()


# --------------------------------------------------------------------------- the proxy side


class Harness:
    """A loopback listener standing in for the egress proxy: sniffs each ClientHello, connects
    to the upstream and hands both sockets to ``intercept``."""

    def __init__(
        self,
        ca: SandboxCA,
        upstream_port: int,
        upstream_ctx: ssl.SSLContext,
        rewriter: Rewriter,
        failure: str | None = None,
    ) -> None:
        self.ca = ca
        self.upstream_port = upstream_port
        self.upstream_ctx = upstream_ctx
        self.rewriter = rewriter
        self.failure = failure
        self.results: list[InterceptResult] = []
        self.logged: list[tuple[str, str, list[str]]] = []
        self.on_request: Callable[[str, str, list[str]], None] = lambda m, t, n: self.logged.append(
            (m, t, n)
        )
        self.tasks: set[asyncio.Task[None]] = set()
        self.sockets: list[socket.socket] = []
        self.ended = asyncio.Condition()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._accept: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._accept = asyncio.create_task(self._accept_loop())

    async def stop(self) -> None:
        for task in [self._accept, *self.tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._accept, *self.tasks] if t], return_exceptions=True)
        self.listener.close()

    async def wait_results(self, n: int) -> list[InterceptResult]:
        async with self.ended:
            await self.ended.wait_for(lambda: len(self.results) >= n)
        return self.results

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self.listener)
            client.setblocking(False)
            task = asyncio.create_task(self._one(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _one(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        while True:
            chunk = await loop.sock_recv(client, 65536)
            buf += chunk
            hello = parse_client_hello(buf)
            if hello.kind != "need_more" or not chunk:
                break
        assert hello.kind == "sni", hello
        upstream = socket.socket()
        self.sockets += [client, upstream]
        upstream.setblocking(False)
        await loop.sock_connect(upstream, ("127.0.0.1", self.upstream_port))
        result = await intercept(
            client,
            buf,
            upstream,
            host=HOST,
            ca=self.ca,
            client_alpn=hello.alpn,
            upstream_ctx=self.upstream_ctx,
            rewriter=self.rewriter,
            on_request=self.on_request,
            failure=self.failure,
        )
        async with self.ended:
            self.results.append(result)
            self.ended.notify_all()


@dataclass
class Env:
    up_ca: trustme.CA
    ca: SandboxCA
    upstream_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext
    ca_file: Path
    rewriter: Rewriter


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    up_ca = trustme.CA()
    upstream_ctx = ssl.create_default_context()
    up_ca.configure_trust(upstream_ctx)
    ca = SandboxCA.create(os.urandom(32), "test", [HOST])
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    rewriter = Rewriter(
        [
            Injection("api-key", PH, REAL, None, "{value}"),
            Injection("bearer", PH2, REAL2, "Authorization", "Bearer {value}"),
        ]
    )
    return Env(up_ca, ca, upstream_ctx, client_ctx, ca_file, rewriter)


@contextlib.asynccontextmanager
async def running(
    env: Env,
    alpn: list[str] | None = None,
    cert: trustme.LeafCert | None = None,
    rewriter: Rewriter | None = None,
    failure: str | None = None,
) -> AsyncIterator[tuple[FakeUpstream, Harness]]:
    upstream = FakeUpstream(cert or env.up_ca.issue_cert(HOST), alpn or ["h2", "http/1.1"])
    await upstream.start()
    harness = Harness(
        env.ca, upstream.port, env.upstream_ctx, rewriter or env.rewriter, failure=failure
    )
    harness.start()
    try:
        yield upstream, harness
    finally:
        await harness.stop()
        await upstream.stop()


def httpx_client(env: Env, port: int, http2: bool) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"https://127.0.0.1:{port}",
        verify=env.client_ctx,
        http2=http2,
        headers={"Host": HOST},
        timeout=60,
    )


SNI = {"sni_hostname": HOST}


async def tls_exchange(env: Env, port: int, data: bytes, *, alpn: str | None = None) -> bytes:
    """Send ``data`` on a fresh TLS connection and read until the proxy closes it."""
    ctx = ssl.create_default_context(cadata=env.ca.cert_pem.decode())
    if alpn:
        ctx.set_alpn_protocols([alpn])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST)
    writer.write(data)
    await writer.drain()
    out = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await reader.read(65536):
            out += chunk
    writer.close()
    return out


# --------------------------------------------------------------------------- Rewriter


def test_rewriter_replaces_in_target_and_header_values_only() -> None:
    rw = Rewriter([Injection("k", PH, "a b/&", None)])
    target, headers, used = rw.rewrite(
        f"/x/{PH}?key={PH}",
        [("Host", f"{PH}.x"), ("X-Key", f"k={PH}; again={PH}"), (PH, "name stays")],
    )
    # In the target the value is data: percent-encoded so it cannot change the target's shape.
    assert target == "/x/a%20b%2F%26?key=a%20b%2F%26"
    assert headers == [
        ("Host", f"{PH}.x"),  # routing headers are never rewritten
        ("X-Key", "k=a b/&; again=a b/&"),
        (PH, "name stays"),
    ]
    assert used == ["k"]
    assert rw.rewrite("/plain", [("A", "b")]) == ("/plain", [("A", "b")], [])


def test_rewriter_longest_placeholder_first_and_values_never_rescanned() -> None:
    short, long = "corral-secret-aaaa", "corral-secret-aaaa-bbbb"
    rw = Rewriter([Injection("s", short, long), Injection("l", long, "L")])
    _, headers, used = rw.rewrite("/", [("X", f"{long} {short}")])
    assert headers == [("X", f"L {long}")]  # the inserted value is not replaced again
    assert used == ["s", "l"]  # in injection order


def test_rewriter_header_mode_replaces_every_header_of_that_name() -> None:
    rw = Rewriter([Injection("b", PH2, REAL2, "Authorization", "Bearer {value}")])
    _, headers, used = rw.rewrite(
        "/", [("A", "1"), ("authorization", "Bearer mine"), ("AUTHORIZATION", "x"), ("Z", "2")]
    )
    assert headers == [("A", "1"), ("Authorization", f"Bearer {REAL2}"), ("Z", "2")]
    assert used == ["b"]
    _, headers, _ = rw.rewrite("/", [("A", "1")])
    assert headers == [("A", "1"), ("Authorization", f"Bearer {REAL2}")]


def test_rewriter_h2_pseudo_headers() -> None:
    rw = Rewriter([Injection("k", PH, REAL)])
    target, headers, _ = rw.rewrite(
        f"/v1?k={PH}",
        [(":method", "GET"), (":authority", f"{PH}.test"), (":path", f"/v1?k={PH}"), ("x", PH)],
    )
    assert target == f"/v1?k={REAL}"
    assert headers == [
        (":method", "GET"),
        (":authority", f"{PH}.test"),
        (":path", f"/v1?k={REAL}"),
        ("x", REAL),
    ]


def test_non_ascii_value_goes_into_headers_as_utf8() -> None:
    rw = Rewriter([Injection("k", PH, "pässwörd")])
    target, headers, _ = rw.rewrite(f"/{PH}", [("X", PH)])
    assert target == "/p%C3%A4ssw%C3%B6rd"
    assert headers[0][1].encode("latin-1") == "pässwörd".encode()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "", "placeholder": PH, "value": "v"},
        {"name": "k", "placeholder": "short", "value": "v"},
        {"name": "k", "placeholder": "has space in it", "value": "v"},
        {"name": "k", "placeholder": PH, "value": "a\r\nb"},
        {"name": "k", "placeholder": PH, "value": "a\x00"},
        {"name": "k", "placeholder": "", "value": "v"},
        {"name": "k", "placeholder": PH, "value": "v", "header": "Host"},
        {"name": "k", "placeholder": PH, "value": "v", "header": "Content-Length"},
        {"name": "k", "placeholder": PH, "value": "v", "header": ":path"},
        {"name": "k", "placeholder": PH, "value": "v", "header": "Bad Name"},
        {"name": "k", "placeholder": PH, "value": "v", "header": "X", "format": "constant"},
    ],
)
def test_bad_injections_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Injection(**kwargs)


def test_injection_repr_hides_the_value() -> None:
    assert REAL not in repr(Injection("k", PH, REAL))


def test_rewriter_refuses_ambiguous_sets() -> None:
    with pytest.raises(ValueError):
        Rewriter([Injection("a", PH, "1"), Injection("b", PH, "2")])
    with pytest.raises(ValueError):
        Rewriter([Injection("a", "", "1", "X-K"), Injection("b", "", "2", "x-k")])


# --------------------------------------------------------------------------- HTTP/1.1


async def test_h1_keepalive_every_request_rewritten(env: Env) -> None:
    async with running(env, alpn=["http/1.1"]) as (upstream, harness):

        def client() -> list[dict[str, Any]]:
            import http.client

            sock = env.client_ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", harness.port)), server_hostname=HOST
            )
            conn = http.client.HTTPConnection(HOST, harness.port)
            conn.sock = sock
            answers = []
            for i in range(3):
                conn.request(
                    "GET",
                    f"/v1/{PH}/items?key={PH}&i={i}",
                    headers={"X-Api-Key": PH, "Authorization": f"Bearer {PH2}"},
                )
                response = conn.getresponse()
                assert response.status == 200
                answers.append(json.loads(response.read()))
            conn.close()
            return answers

        answers = await asyncio.to_thread(client)
        (result,) = await harness.wait_results(1)
    assert len(upstream.seen) == 3 and upstream.handshakes == 1
    for i, seen in enumerate(upstream.seen):
        assert seen.target == f"/v1/{REAL}/items?key={REAL}&i={i}"
        assert seen.header("x-api-key") == [REAL]
        assert seen.header("authorization") == [f"Bearer {REAL2}"]
        assert PH not in json.dumps(seen.headers) and PH2 not in json.dumps(seen.headers)
    assert [a["target"] for a in answers] == [s.target for s in upstream.seen]
    # Logged: the original path (placeholders only, no query) and the secret names.
    assert harness.logged == [("GET", f"/v1/{PH}/items", ["api-key", "bearer"])] * 3
    assert (result.protocol, result.requests, result.error) == ("http/1.1", 3, None)
    assert result.bytes_out > 0 and result.bytes_in > 0


async def test_h1_large_streamed_bodies_are_untouched(env: Env) -> None:
    size = 20 * MiB
    body = (PH.encode() + b"-") * (size // (len(PH) + 1)) + b"end"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 300_000):
            yield body[i : i + 300_000]

    async with running(env, alpn=["http/1.1"]) as (upstream, harness):
        async with httpx_client(env, harness.port, http2=False) as client:
            up = await client.post("/upload", content=chunks(), extensions=SNI)
            assert up.status_code == 200
            sent = up.json()
            assert sent["body_len"] == len(body)
            assert sent["body_sha"] == hashlib.sha256(body).hexdigest()  # not rewritten
            assert upstream.seen[0].header("transfer-encoding") == ["chunked"]
            fixed = await client.post("/fixed", content=body[:MiB], extensions=SNI)
            assert fixed.json()["body_sha"] == hashlib.sha256(body[:MiB]).hexdigest()
            sha = hashlib.sha256()
            n = 0
            async with client.stream("GET", f"/download/{size}", extensions=SNI) as down:
                async for chunk in down.aiter_raw():
                    sha.update(chunk)
                    n += len(chunk)
            assert n == size and sha.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
        (result,) = await harness.wait_results(1)
    assert result.requests == 3 and result.error is None


async def test_h1_chunked_trailers_pipelining_and_expect(env: Env) -> None:
    pipelined = (
        f"POST /a?k={PH} HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"5;ext=1\r\nhello\r\n0\r\nX-Trailer: {PH}\r\n\r\n"
        f"\r\nGET /b HTTP/1.1\r\nHost: {HOST}\r\nX-K: {PH}\r\nConnection: close\r\n\r\n"
    ).encode()
    async with running(env, alpn=["http/1.1"]) as (upstream, harness):
        out = await tls_exchange(env, harness.port, pipelined)
        assert out.count(b"HTTP/1.1 200") == 2
        a, b = upstream.seen
        assert (a.target, a.body_len, a.trailers) == (f"/a?k={REAL}", 5, [("x-trailer", PH)])
        assert (b.target, b.header("x-k")) == ("/b", [REAL])

        ctx = ssl.create_default_context(cadata=env.ca.cert_pem.decode())
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", harness.port, ssl=ctx, server_hostname=HOST
        )
        writer.write(
            f"PUT /e HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 4\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")
        writer.write(b"body")
        await writer.drain()
        final = await reader.read()
        writer.close()
        assert final.startswith(b"HTTP/1.1 200") and upstream.seen[-1].body_len == 4


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("Content-Length: 5\r\nTransfer-Encoding: chunked", b"400"),
        ("Transfer-Encoding: gzip, chunked", b"400"),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"400"),
        ("Content-Length: 5\r\nContent-Length: 5", b"400"),
        ("Content-Length: +5", b"400"),
        ("X: a\r\n folded", b"400"),
    ],
)
async def test_h1_smuggling_shapes_are_refused(env: Env, head: str, status: bytes) -> None:
    request = f"POST / HTTP/1.1\r\nHost: {HOST}\r\n{head}\r\n\r\nhello".encode()
    async with running(env, alpn=["http/1.1"]) as (upstream, harness):
        out = await tls_exchange(env, harness.port, request)
        (result,) = await harness.wait_results(1)
    assert out.startswith(b"HTTP/1.1 " + status), out
    assert b"corral egress proxy:" in out
    assert upstream.seen == [] and result.requests == 0 and result.error


@pytest.mark.parametrize(
    "request_head",
    [
        "GET / HTTP/1.1\r\nHost: evil.test",
        f"GET / HTTP/1.1\r\nHost: {HOST}.evil.test:443",
        f"GET https://evil.test/ HTTP/1.1\r\nHost: {HOST}",
    ],
)
async def test_h1_misdirected_host_is_421(env: Env, request_head: str) -> None:
    async with running(env, alpn=["http/1.1"]) as (upstream, harness):
        out = await tls_exchange(env, harness.port, f"{request_head}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 421 Misdirected Request"), out
    assert upstream.seen == []


async def test_h1_refusal_after_forwarded_requests_comes_after_their_responses(env: Env) -> None:
    data = (
        f"GET /one HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET /two HTTP/1.1\r\nHost: other.test\r\n\r\n"
    ).encode()
    async with running(env, alpn=["http/1.1"]) as (upstream, harness):
        out = await tls_exchange(env, harness.port, data)
    first, _, rest = out.partition(b"HTTP/1.1 421")
    assert first.startswith(b"HTTP/1.1 200") and rest
    assert [s.target for s in upstream.seen] == ["/one"]


async def test_h1_host_with_port_is_accepted_and_curl_works(env: Env) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    async with running(env, alpn=["h2", "http/1.1"]) as (upstream, harness):
        for flag in ("--http1.1", "--http2"):
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", flag, "--cacert", str(env.ca_file),
                "--resolve", f"{HOST}:{harness.port}:127.0.0.1",
                "-H", f"X-Api-Key: {PH}", "-H", "Authorization: Bearer nothing",
                "--data-binary", f"body {PH}",
                f"https://{HOST}:{harness.port}/curl/{PH}?x={PH}",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            stdout, stderr = await proc.communicate()
            assert proc.returncode == 0, stderr
            answer = json.loads(stdout)
            assert answer["target"] == f"/curl/{REAL}?x={REAL}"
            assert answer["body_sha"] == hashlib.sha256(f"body {PH}".encode()).hexdigest()
        results = await harness.wait_results(2)
    assert [r.protocol for r in results] == ["http/1.1", "h2"]
    for seen in upstream.seen:
        assert seen.header("x-api-key") == [REAL]
        assert seen.header("authorization") == [f"Bearer {REAL2}"]


# --------------------------------------------------------------------------- HTTP/2


async def test_h2_concurrent_streams(env: Env) -> None:
    async with running(env) as (upstream, harness):
        async with httpx_client(env, harness.port, http2=True) as client:

            async def one(i: int) -> httpx.Response:
                return await client.get(
                    f"/s/{i}?key={PH}", headers={"x-api-key": f"k {PH}"}, extensions=SNI
                )

            responses = await asyncio.gather(*(one(i) for i in range(40)))
            assert all(r.http_version == "HTTP/2" and r.status_code == 200 for r in responses)
            for i, r in enumerate(responses):
                assert r.json()["target"] == f"/s/{i}?key={REAL}"
        (result,) = await harness.wait_results(1)
    assert len(upstream.seen) == 40 and upstream.handshakes == 1
    for seen in upstream.seen:
        assert seen.header("x-api-key") == [f"k {REAL}"]
        assert seen.header("authorization") == [f"Bearer {REAL2}"]
        assert seen.header(":authority") == [HOST]
    assert (result.protocol, result.requests, result.error) == ("h2", 40, None)
    assert sorted(t for _, t, _ in harness.logged) == sorted(f"/s/{i}" for i in range(40))


async def test_h2_large_bodies_both_ways_with_flow_control(env: Env) -> None:
    size = 20 * MiB
    body = (PH.encode() + b".") * (size // (len(PH) + 1))

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    async with running(env) as (_upstream, harness):
        async with httpx_client(env, harness.port, http2=True) as client:

            async def download(n: int) -> str:
                sha = hashlib.sha256()
                async with client.stream("GET", f"/download/{n}", extensions=SNI) as r:
                    async for chunk in r.aiter_raw():
                        sha.update(chunk)
                return sha.hexdigest()

            up, down1, down2 = await asyncio.gather(
                client.post("/upload", content=chunks(), extensions=SNI),
                download(size),
                download(3 * MiB),
            )
            assert up.json()["body_sha"] == hashlib.sha256(body).hexdigest()
            assert down1 == hashlib.sha256(pattern(size)).hexdigest()
            assert down2 == hashlib.sha256(pattern(3 * MiB)).hexdigest()
        (result,) = await harness.wait_results(1)
    assert result.error is None and result.requests == 3


async def test_h2_misdirected_authority_is_421_and_connection_goes_on(env: Env) -> None:
    async with running(env) as (upstream, harness):
        async with httpx_client(env, harness.port, http2=True) as client:
            bad = await client.get("/x", headers={"Host": "evil.test"}, extensions=SNI)
            good = await client.get("/y", extensions=SNI)
        assert bad.status_code == 421 and bad.http_version == "HTTP/2"
        assert bad.text.startswith("corral egress proxy: misdirected request")
        assert good.status_code == 200
        (result,) = await harness.wait_results(1)
    assert [s.target for s in upstream.seen] == ["/y"]
    assert result.error is not None and "misdirected" in result.error


async def test_h2_upstream_failure_is_502_on_the_stream(env: Env) -> None:
    async with running(env) as (_upstream, harness):
        async with httpx_client(env, harness.port, http2=True) as client:
            r = await client.get("/die", extensions=SNI)
        assert r.status_code == 502 and r.http_version == "HTTP/2"
        assert "closed the connection" in r.text
        (result,) = await harness.wait_results(1)
    assert result.error is not None


class RawH2:
    """A bare h2 client, for what HTTP libraries do not let a test do (resets, trailers)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.conn.initiate_connection()

    @classmethod
    async def open(cls, env: Env, port: int) -> RawH2:
        ctx = ssl.create_default_context(cadata=env.ca.cert_pem.decode())
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=HOST
        )
        raw = cls(reader, writer)
        await raw.flush()
        return raw

    def request(self, path: str, *, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "https"), (":authority", HOST)]
        self.conn.send_headers(sid, [*headers, (":path", path)], end_stream=end)
        return sid

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def until(self, done: Callable[[h2.events.Event], bool]) -> list[h2.events.Event]:
        seen: list[h2.events.Event] = []
        while True:
            data = await self.reader.read(65536)
            assert data, "the proxy closed the connection"
            for event in self.conn.receive_data(data):
                seen.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            await self.flush()
            if any(done(e) for e in seen):
                return seen

    async def close(self) -> None:
        self.conn.close_connection()
        await self.flush()
        self.writer.close()


async def test_h2_resets_both_ways_and_request_trailers(env: Env) -> None:
    async with running(env) as (upstream, harness):
        c = await RawH2.open(env, harness.port)
        # The client abandons a download: the reset reaches upstream, the connection goes on.
        big = c.request(f"/download/{50 * MiB}")
        await c.flush()
        await c.until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == big)
        c.conn.reset_stream(big, h2.errors.ErrorCodes.CANCEL)
        # Request trailers pass untouched (never rewritten), after the body.
        sid = c.request(f"/after?k={PH}", end=False)
        c.conn.send_data(sid, b"abc")
        c.conn.send_headers(sid, [("x-trailer", PH)], end_stream=True)
        await c.flush()
        events = await c.until(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
        )
        body = b"".join(
            e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
        )
        assert json.loads(body)["target"] == f"/after?k={REAL}"
        # Upstream resets a stream: the client gets the reset with its code.
        gone = c.request("/reset")
        await c.flush()
        events = await c.until(lambda e: isinstance(e, h2.events.StreamReset))
        (reset,) = [e for e in events if isinstance(e, h2.events.StreamReset)]
        assert (reset.stream_id, reset.error_code) == (gone, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        await c.close()
        (result,) = await harness.wait_results(1)
    assert upstream.resets == [h2.errors.ErrorCodes.CANCEL]
    after = next(seen for seen in upstream.seen if seen.target.startswith("/after"))
    assert (after.body_len, after.trailers) == (3, [("x-trailer", PH)])
    assert result.error is None and result.requests == 3


async def test_h2_upstream_goaway_lets_the_stream_under_way_finish(env: Env) -> None:
    async with running(env) as (upstream, harness):
        async with httpx_client(env, harness.port, http2=True) as client:
            last = await client.get(f"/goaway?k={PH}", extensions=SNI)
            assert last.status_code == 200 and last.json()["target"] == f"/goaway?k={REAL}"
            (first,) = await harness.wait_results(1)  # the relay ended once it was done
            after = await client.get("/next", extensions=SNI)  # on a new connection
            assert after.status_code == 200
        results = await harness.wait_results(2)
    assert upstream.handshakes == 2 and first.error is None
    assert [r.requests for r in results] == [1, 1]


# --------------------------------------------------------------------------- WebSockets


async def test_websocket_passes_after_upgrade(env: Env) -> None:
    cert = env.up_ca.issue_cert(HOST)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(server_ctx)
    got: list[tuple[str, str | None]] = []

    async def echo(ws: websockets.asyncio.server.ServerConnection) -> None:
        assert ws.request is not None
        got.append((ws.request.path, ws.request.headers.get("Authorization")))
        async for message in ws:
            await ws.send(message)

    async with websockets.asyncio.server.serve(echo, "127.0.0.1", 0, ssl=server_ctx) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        harness = Harness(env.ca, port, env.upstream_ctx, env.rewriter)
        harness.start()
        try:
            async with websockets.asyncio.client.connect(
                f"wss://{HOST}:{harness.port}/ws?k={PH}",
                ssl=env.client_ctx,
                host="127.0.0.1",
                port=harness.port,
                server_hostname=HOST,
                proxy=None,
            ) as ws:
                for message in (f"frame {PH}", b"\x00" * 200_000, "last"):
                    await ws.send(message)
                    assert await ws.recv() == message  # frames are never rewritten
            (result,) = await harness.wait_results(1)
        finally:
            await harness.stop()
    assert got == [(f"/ws?k={REAL}", f"Bearer {REAL2}")]
    assert result.requests == 1 and result.error is None


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("wrong", ["untrusted", "other-name"])
async def test_unverifiable_upstream_is_502_and_gets_nothing(env: Env, wrong: str) -> None:
    cert = trustme.CA().issue_cert(HOST) if wrong == "untrusted" else env.up_ca.issue_cert("o.test")
    async with running(env, cert=cert) as (upstream, harness):
        async with httpx_client(env, harness.port, http2=True) as client:
            r = await client.get(f"/x?k={PH}", extensions=SNI)
        (result,) = await harness.wait_results(1)
    assert r.status_code == 502 and r.http_version == "HTTP/1.1"  # h2 is not offered then
    assert r.text.startswith(f"corral egress proxy: certificate verify failed for {HOST}")
    assert result.error is not None and "certificate verify failed" in result.error
    assert upstream.seen == [] and upstream.handshakes == 0
    assert harness.logged == []


async def test_failure_answers_502_without_contacting_upstream(env: Env) -> None:
    async with running(env, failure="the secret store is unavailable") as (upstream, harness):
        out = await tls_exchange(
            env, harness.port, f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        )
        (result,) = await harness.wait_results(1)
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert out.endswith(b"\r\n\r\ncorral egress proxy: the secret store is unavailable\n")
    assert upstream.handshakes == 0 and result.bytes_out == 0


async def test_failing_log_callback_blocks_the_request(env: Env) -> None:
    def broken(method: str, target: str, names: list[str]) -> None:
        raise RuntimeError("audit log is down")

    async with running(env, alpn=["http/1.1"]) as (upstream, harness):
        harness.on_request = broken
        head = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        out = await tls_exchange(env, harness.port, head)
    assert out.startswith(b"HTTP/1.1 502") and b"cannot record the request" in out
    assert upstream.seen == []


@pytest.mark.parametrize("protocol", ["http/1.1", "h2"])
async def test_cancellation_closes_both_sockets_and_leaves_no_task(env: Env, protocol: str) -> None:
    async with running(env) as (_, harness):
        if protocol == "h2":
            c = await RawH2.open(env, harness.port)
            sid = c.request(f"/download/{50 * MiB}")
            await c.flush()
            # Mid-transfer: the client stops reading, windows fill up, both sides are busy.
            await c.until(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
            reader = c.reader
        else:
            ctx = ssl.create_default_context(cadata=env.ca.cert_pem.decode())
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", harness.port, ssl=ctx, server_hostname=HOST
            )
            writer.write(f"GET /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            await reader.readuntil(b"}")  # answered; the connection now idles in intercept
        assert relay_tasks()  # the relay runs tasks of its own...
        (task,) = harness.tasks
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert [s.fileno() for s in harness.sockets] == [-1, -1]
        # The client sees the end of the stream (a reset or EOF).
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await reader.read(65536):
                pass
    assert relay_tasks() == []  # ...and none outlives the cancellation


def relay_tasks() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").startswith(("_H1Relay", "_H2Relay"))
    ]
