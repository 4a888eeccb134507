"""Ingress to sandbox ports through a real server: path and host form, HTTP and WebSocket,
streaming both ways, the access token (header, query then cookie, refused when missing or wrong,
not needed for public ports), headers passed through untouched, and fast failures (502, 404)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

DOMAIN = "corral.test"
PORT = 8000

# The app inside the sandbox: stdlib only, one asyncio server for HTTP/1.1 (keep-alive,
# chunked bodies) and WebSocket, so that the test sees exactly what the relay delivered.
APP = r"""
import asyncio, base64, hashlib, json, struct, sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def read_head(r):
    raw = await r.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers.append([k.strip(), v.strip()])
    return method, target, headers


async def body_chunks(r, h):
    if h.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await r.readline()).split(b";")[0], 16)
            if size == 0:
                while (await r.readline()) not in (b"\r\n", b""):
                    pass
                return
            yield await r.readexactly(size)
            await r.readline()
    else:
        n = int(h.get("content-length", "0"))
        while n > 0:
            data = await r.read(min(n, 65536))
            if not data:
                return
            n -= len(data)
            yield data


def respond(w, status, body, extra=(), method="GET"):
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    w.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if method == "HEAD" else body))


def ws_send(w, op, data):
    n = len(data)
    if n < 126:
        size = bytes([n])
    elif n < 65536:
        size = b"\x7e" + struct.pack("!H", n)
    else:
        size = b"\x7f" + struct.pack("!Q", n)
    w.write(bytes([0x80 | op]) + size + data)


async def websocket(r, w, h, target):
    accept = base64.b64encode(hashlib.sha1(h["sec-websocket-key"].encode() + GUID).digest())
    extra = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Accept: " + accept.decode()]
    offered = [p.strip() for p in h.get("sec-websocket-protocol", "").split(",") if p.strip()]
    if offered:
        extra.append("Sec-WebSocket-Protocol: " + offered[-1])
    w.write(("HTTP/1.1 101 Switching Protocols\r\n" + "\r\n".join(extra) + "\r\n\r\n").encode())
    hello = {"target": target, "host": h.get("host"), "origin": h.get("origin"),
             "authorization": h.get("authorization"), "protocol": offered[-1] if offered else None,
             "token_header": h.get("x-corral-access-token")}
    ws_send(w, 1, json.dumps(hello).encode())
    await w.drain()
    closing = False
    while True:
        b1, b2 = await r.readexactly(2)
        n = b2 & 127
        if n == 126:
            n = struct.unpack("!H", await r.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await r.readexactly(8))[0]
        mask = await r.readexactly(4) if b2 & 128 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await r.readexactly(n)))
        op = b1 & 15
        if op == 8:
            if not closing:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                with open("/tmp/ws-close", "w") as f:
                    f.write(f"{code} {data[2:].decode()}")
                ws_send(w, 8, data[:2])
            await w.drain()
            w.close()
            return
        if op == 1 and data.startswith(b"close "):
            _, code, reason = data.decode().split(" ", 2)
            ws_send(w, 8, struct.pack("!H", int(code)) + reason.encode())
            closing = True
        elif op == 9:
            ws_send(w, 10, data)
        elif op in (1, 2):
            ws_send(w, op, data)
        await w.drain()


async def handle(r, w):
    try:
        while True:
            try:
                method, target, headers = await read_head(r)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            h = {k.lower(): v for k, v in headers}
            path = target.split("?")[0]
            if h.get("upgrade", "").lower() == "websocket":
                await websocket(r, w, h, target)
                return
            if path == "/upload":
                digest, size = hashlib.sha256(), 0
                async for chunk in body_chunks(r, h):
                    if size == 0:
                        open("/tmp/got-first", "w").close()
                    digest.update(chunk)
                    size += len(chunk)
                respond(w, "200 OK", json.dumps({"size": size, "sha256": digest.hexdigest()}).encode())
            elif path == "/slow":
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")
                await w.drain()
                await asyncio.sleep(3)
                w.write(b"5\r\nlast\n\r\n0\r\n\r\n")
            elif path == "/redirect":
                respond(w, "302 Found", b"", ["Location: http://127.0.0.1:1/elsewhere"])
            else:
                body = b"".join([c async for c in body_chunks(r, h)])
                out = {"method": method, "target": target, "headers": headers,
                       "body": body.decode(errors="replace")}
                respond(w, "200 OK", json.dumps(out).encode(),
                        ["Content-Type: application/json", "Set-Cookie: a=1", "Set-Cookie: b=2",
                         "Connection: keep-alive, X-Hop", "X-Hop: only-for-the-next-hop"], method)
            await w.drain()
    finally:
        w.close()


async def main():
    server = await asyncio.start_server(handle, "0.0.0.0", int(sys.argv[1]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


# --------------------------------------------------------------------------- helpers


def _run(api: httpx.Client, sid: str, cmd: str) -> tuple[str, int | None]:
    with api.stream("POST", f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd}) as r:
        assert r.status_code == 200, r.read().decode()
        events = [json.loads(line) for line in r.iter_lines() if line]
    out = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    return out.decode(), next((e["exit_code"] for e in events if e["type"] == "exit"), None)


def _start(api: httpx.Client, sid: str, cmd: str) -> None:
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "background": True})
    assert r.status_code == 201, r.text


def _wait_ready(server: RunningServer, sid: str, token: str | None, path: str = "/") -> None:
    headers = {"X-Corral-Access-Token": token} if token else {}
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while time.monotonic() < deadline:
            if c.get(f"/sandboxes/{sid}/ports/{PORT}{path}", headers=headers).status_code != 502:
                return
            time.sleep(0.1)
    pytest.fail(f"the app in {sid} did not come up on port {PORT}")


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def base_template(server: RunningServer) -> str:
    """The Debian template (python3 for the app), built into the server's shared templates."""
    from corral.errors import CorralError
    from corral.templates import build_in_data_dir

    data_root = (server.data_dir / "templates").resolve().parent
    try:
        build_in_data_dir("base", data_root)
    except CorralError as e:
        pytest.skip(f"the base template cannot be built here: {e.message}")
    return "base"


def _create(api: httpx.Client, template: str, **kw: Any) -> dict[str, Any]:
    r = api.post("/v1/sandboxes", json={"template": template, "timeout": 600, **kw})
    assert r.status_code == 201, r.text
    sb: dict[str, Any] = r.json()
    assert sb["access_token"] and sb["network"]["address"], sb
    return sb


@pytest.fixture
def app_sandbox(
    api: httpx.Client, server: RunningServer, base_template: str
) -> Iterator[dict[str, Any]]:
    """A base sandbox running ``APP`` on port 8000."""
    sb = _create(api, base_template)
    try:
        r = api.put(f"/v1/sandboxes/{sb['id']}/files", params={"path": "/tmp/app.py"}, content=APP)
        assert r.status_code in (200, 201, 204), r.text
        _start(api, sb["id"], f"exec python3 /tmp/app.py {PORT}")
        _wait_ready(server, sb["id"], sb["access_token"])
        yield sb
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


@pytest.fixture
def minimal_sandbox(api: httpx.Client) -> Iterator[dict[str, Any]]:
    sb = _create(api, "minimal")
    yield sb
    api.delete(f"/v1/sandboxes/{sb['id']}")


def _echo(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    out["h"] = {}
    for k, v in out["headers"]:
        out["h"].setdefault(k.lower(), []).append(v)
    return out


# --------------------------------------------------------------------------- HTTP, path form


def test_token_header_query_cookie_and_refusals(
    server: RunningServer, app_sandbox: dict[str, Any]
) -> None:
    sid, token = app_sandbox["id"], app_sandbox["access_token"]
    base = f"/sandboxes/{sid}/ports/{PORT}"
    host = urlsplit(server.url).netloc
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.get(f"{base}/echo")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
        assert "X-Corral-Access-Token" in r.json()["error"]["message"]
        r = c.get(f"{base}/echo", headers={"X-Corral-Access-Token": "wrong"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        assert c.get(f"{base}/echo", params={"corral_token": "wrong"}).status_code == 403
        c.cookies.set(f"corral_token_{sid}", "wrong")
        assert c.get(f"{base}/echo").status_code == 403
        c.cookies.clear()

        # Header: the app's own Authorization reaches it untouched, corral's token does not.
        e = _echo(
            c.post(
                f"{base}/echo/a%20b?x=1&y=%2F",
                headers={
                    "X-Corral-Access-Token": token,
                    "Authorization": "Bearer app-secret",
                    "X-Forwarded-For": "198.51.100.7",
                },
                content=b"hello",
            )
        )
        assert e["method"] == "POST" and e["body"] == "hello"
        assert e["target"] == "/echo/a%20b?x=1&y=%2F"
        assert e["h"]["authorization"] == ["Bearer app-secret"]
        assert "x-corral-access-token" not in e["h"]
        assert e["h"]["host"] == [host] and e["h"]["x-forwarded-host"] == [host]
        # The server's own view of the client (its trusted-proxy rules trust loopback).
        assert e["h"]["x-forwarded-for"] == ["198.51.100.7"]
        assert e["h"]["x-forwarded-proto"] == ["http"]
        e = _echo(c.get(f"{base}/echo", headers={"X-Corral-Access-Token": token}))
        assert e["h"]["x-forwarded-for"] == ["127.0.0.1"]

    # Query parameter: answered with a cookie that the browser's next requests carry.
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        r = browser.get(f"{base}/echo", params={"x": "1", "corral_token": token})
        e = _echo(r)
        assert e["target"] == "/echo?x=1"
        cookies = r.headers.get_list("set-cookie")
        ours = [v for v in cookies if v.startswith(f"corral_token_{sid}=")]
        assert ours == [
            f"corral_token_{sid}={token}; Path=/sandboxes/{sid}/ports/; HttpOnly; SameSite=Lax"
        ]
        assert {"a=1", "b=2"} <= set(cookies)  # the app's repeated headers survive
        assert "x-hop" not in r.headers  # named in the app's Connection header: hop-by-hop
        e = _echo(browser.get(f"{base}/echo/again"))
        assert e["target"] == "/echo/again"
        assert e["h"]["cookie"] == ["a=1; b=2"]  # the app's cookies, never corral's

        # The bare port URL moves to the directory form; the app's redirects are not followed.
        r = browser.get(f"/sandboxes/{sid}/ports/{PORT}", params={"q": "1"})
        assert r.status_code == 307 and r.headers["location"] == f"{base}/?q=1"
        r = browser.get(f"{base}/redirect")
        assert r.status_code == 302
        assert r.headers["location"] == "http://127.0.0.1:1/elsewhere"

        for bad in ("0", "65536", "http", "-1"):
            r = browser.get(f"/sandboxes/{sid}/ports/{bad}/")
            assert r.status_code == 400 and "port" in r.json()["error"]["message"], bad


def test_streaming_both_ways(
    api: httpx.Client, server: RunningServer, app_sandbox: dict[str, Any]
) -> None:
    sid, token = app_sandbox["id"], app_sandbox["access_token"]
    base = f"/sandboxes/{sid}/ports/{PORT}"
    auth = {"X-Corral-Access-Token": token}
    block = os.urandom(1 << 20)

    def body() -> Iterator[bytes]:
        yield block
        # The rest is sent only once the app has seen the first part: a relay that buffered
        # the whole request before passing it on would wait here forever.
        deadline = time.monotonic() + 20
        while _run(api, sid, "test -e /tmp/got-first")[1] != 0:
            assert time.monotonic() < deadline, "the app never saw the start of the upload"
            time.sleep(0.1)
        for _ in range(15):
            yield block

    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post(f"{base}/upload", headers=auth, content=body())
        assert r.status_code == 200, r.text
        assert r.json() == {"size": 16 << 20, "sha256": hashlib.sha256(block * 16).hexdigest()}

        started = time.monotonic()
        with c.stream("GET", f"{base}/slow", headers=auth) as r:
            chunks = r.iter_raw()
            assert next(chunks) == b"first\n"
            first_after = time.monotonic() - started
            assert b"".join(chunks) == b"last\n"
        assert first_after < 2, f"the first chunk took {first_after:.1f} s: buffered"


# --------------------------------------------------------------------------- host form


def test_host_form(server: RunningServer, app_sandbox: dict[str, Any]) -> None:
    sid, token = app_sandbox["id"], app_sandbox["access_token"]
    host = f"{PORT}-{sid}.{DOMAIN}"
    assert app_sandbox["ingress_domain"] == DOMAIN
    with httpx.Client(base_url=server.url, timeout=30) as c:
        # Full path to the app, even one that looks like the API's.
        r = c.get("/v1/sandboxes?x=1", headers={"Host": host})
        assert r.status_code == 401 and "X-Corral-Access-Token" in r.json()["error"]["message"]
        e = _echo(
            c.get("/v1/sandboxes?x=1", headers={"Host": host, "X-Corral-Access-Token": token})
        )
        assert e["target"] == "/v1/sandboxes?x=1" and e["h"]["host"] == [host]
        r = c.get("/echo", params={"corral_token": token}, headers={"Host": f"{host}:443"})
        assert _echo(r)["target"] == "/echo"
        assert f"corral_token_{sid}={token}; Path=/; HttpOnly; SameSite=Lax" in r.headers.get_list(
            "set-cookie"
        )
        r = c.get("/", headers={"Host": host, "Cookie": f"corral_token_{sid}={token}; z=9"})
        assert _echo(r)["h"]["cookie"] == ["z=9"]
        # Other hosts are the API.
        assert c.get("/healthz", headers={"Host": f"api.{DOMAIN}"}).json()["status"] == "ok"
        r = c.get("/healthz", headers={"Host": f"{PORT}-sb-000000000000.{DOMAIN}"})
        assert r.status_code == 404


# --------------------------------------------------------------------------- WebSocket


def _ws(server: RunningServer, path: str, host: str | None = None, **kw: Any) -> ClientConnection:
    """A WebSocket client to the server, optionally sending another Host."""
    url = urlsplit(server.url)
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80))
    conn: ClientConnection = connect(
        f"ws://{host or url.netloc}{path}", sock=sock, proxy=None, open_timeout=10, **kw
    )
    return conn


def test_websocket_relay(
    api: httpx.Client, server: RunningServer, app_sandbox: dict[str, Any]
) -> None:
    sid, token = app_sandbox["id"], app_sandbox["access_token"]
    path = f"/sandboxes/{sid}/ports/{PORT}/ws?x=1"
    with _ws(
        server,
        path,
        additional_headers={"X-Corral-Access-Token": token, "Authorization": "Basic YXBwOng="},
        subprotocols=["one", "two"],
        origin="http://example.test",
    ) as ws:
        hello = json.loads(ws.recv())
        assert ws.subprotocol == "two" and hello["protocol"] == "two"
        assert hello["target"] == "/ws?x=1" and hello["host"] == urlsplit(server.url).netloc
        assert hello["authorization"] == "Basic YXBwOng=" and hello["token_header"] is None
        assert hello["origin"] == "http://example.test"
        ws.send("hello")
        assert ws.recv() == "hello"
        ws.send(bytes(range(256)) * 300)
        assert ws.recv() == bytes(range(256)) * 300
        # The app closes with its own code: the client sees it.
        ws.send("close 4001 bye")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")

    # The client closes with its code: the app sees it. Host form, token as a query parameter.
    host = f"{PORT}-{sid}.{DOMAIN}"
    with _ws(server, f"/ws?corral_token={token}", host=host) as ws:
        hello = json.loads(ws.recv())
        assert hello["target"] == "/ws" and hello["host"] == host
        ws.send("ping")
        assert ws.recv() == "ping"
        ws.close(4002, "done")
    deadline = time.monotonic() + 10
    while _run(api, sid, "test -s /tmp/ws-close")[1] != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _run(api, sid, "cat /tmp/ws-close")[0] == "4002 done"

    # Refusals happen before the upgrade, with the same statuses as plain HTTP.
    with pytest.raises(InvalidStatus) as refused:
        _ws(server, path)
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        _ws(server, path, additional_headers={"X-Corral-Access-Token": "nope"})
    assert refused.value.response.status_code == 403

    # Nothing listening: the client learns it from the close frame.
    with (
        _ws(
            server,
            f"/sandboxes/{sid}/ports/9/",
            additional_headers={"X-Corral-Access-Token": token},
        ) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1014
    assert "nothing listens on port 9" in closed.value.rcvd.reason


# --------------------------------------------------------------------------- the rest


def test_public_ports_need_no_token(api: httpx.Client, server: RunningServer) -> None:
    sb = _create(api, "minimal", public_ports=True)
    try:
        assert sb["public_ports"] is True
        _run(api, sb["id"], "mkdir -p /www && echo hello-public > /www/index.html")
        _start(api, sb["id"], f"exec httpd -f -p {PORT} -h /www")
        _wait_ready(server, sb["id"], None, "/index.html")
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.get(f"/sandboxes/{sb['id']}/ports/{PORT}/index.html")
            assert r.status_code == 200 and r.text == "hello-public\n"
            assert not any("corral_token" in v for v in r.headers.get_list("set-cookie"))
            r = c.get("/index.html", headers={"Host": f"{PORT}-{sb['id']}.{DOMAIN}"})
            assert r.status_code == 200 and r.text == "hello-public\n"
    finally:
        api.delete(f"/v1/sandboxes/{sb['id']}")


def test_nothing_listening_is_a_fast_502(
    server: RunningServer, minimal_sandbox: dict[str, Any]
) -> None:
    sid, token = minimal_sandbox["id"], minimal_sandbox["access_token"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        started = time.monotonic()
        r = c.get(f"/sandboxes/{sid}/ports/8080/", headers={"X-Corral-Access-Token": token})
        assert time.monotonic() - started < 2
        assert r.status_code == 502, r.text
        assert r.json()["error"] == {
            "code": "port_unreachable",
            "message": f"nothing listens on port 8080 in sandbox {sid}",
        }


def test_unknown_and_killed_sandboxes_are_404(api: httpx.Client, server: RunningServer) -> None:
    sb = _create(api, "minimal")
    sid, token = sb["id"], sb["access_token"]
    auth = {"X-Corral-Access-Token": token}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get(f"/sandboxes/{sid}/ports/{PORT}/", headers=auth).status_code == 502
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
        r = c.get(f"/sandboxes/{sid}/ports/{PORT}/", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get(f"/sandboxes/sb-000000000000/ports/{PORT}/", headers=auth)
        assert r.status_code == 404
        r = c.get("/", headers={"Host": f"{PORT}-{sid}.{DOMAIN}", **auth})
        assert r.status_code == 404
