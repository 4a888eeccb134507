"""The fake internet's servers; runs inside the test-made network namespace (see fake_internet.py).

One process serves, on the addresses of ``fake_internet.HOSTS``:
- DNS on 198.51.100.53:53 (UDP and TCP), authoritative for ``test.``, recording every query;
- HTTP on :80 and HTTPS on :443 (certificates from a test CA; HTTP/1.1, or HTTP/2 when the client
  offers it) of every host address, recording every request (server address, SNI, Host, path,
  headers, bytes received), and a WebSocket echo over TLS on :8443 recording its handshake;
- over HTTPS, a fake model behind the Anthropic Messages API (``POST /v1/messages``, see
  ``FakeModel``), for running a real coding-agent CLI against it;
- a UDP echo on :9999, a server-speaks-first banner on :2222, a byte sink on :9000 and a
  sendfile byte source on :9001 (the client sends a byte count and a newline).

Records are JSON lines in ``<dir>/queries.log`` and ``<dir>/requests.log``; the model API keys
the fake model accepts are the lines of ``<dir>/model-keys`` (written by tests, read per request).
Usage: python -m tests.integration.fake_hosts DIR
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

ZONE = {
    "allowed.test": "198.51.100.10",
    "www.allowed.test": "198.51.100.10",
    "api.allowed.test": "198.51.100.10",
    "blocked.test": "198.51.100.11",
    "other.test": "198.51.100.12",
    "banner.test": "198.51.100.12",
    "literal.test": "203.0.113.10",
    # DNS rebinding: an allowed-looking name pointing at places no sandbox may reach.
    "rebind-loopback.test": "127.0.0.1",
    "rebind-private.test": "10.0.0.1",
    "rebind-metadata.test": "169.254.169.254",
}
HOST_IPS = ("198.51.100.10", "198.51.100.11", "198.51.100.12", "203.0.113.10")
DNS_IP = "198.51.100.53"
# SNI seen in each TLS handshake, by id of the connection's SSLObject.
SNI: dict[int, str | None] = {}


class FakeModel:
    """The Anthropic Messages API with a model that always says ``TEXT``: SSE events when the
    request asks for ``"stream": true`` (as Claude Code does), one JSON message otherwise.

    The key must be one of the lines of ``<dir>/model-keys``, re-read on every request: this
    process starts once per test session, before any test has made its secret, and a test
    registers the real value there (on the host; it never enters a sandbox). Anything else is a
    401 shaped like the real API's, so a client that got the placeholder fails visibly."""

    PATH = "/v1/messages"
    TEXT = "corral fake model: hello"

    def __init__(self, directory: Path) -> None:
        self.keys = directory / "model-keys"
        self.keys.touch()  # none accepted until a test adds one

    def handles(self, path: str | None) -> bool:
        return path is not None and path.split("?")[0] == self.PATH

    def answer(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request to ``PATH``."""
        if headers.get("x-api-key") not in self.keys.read_text().split():
            return self._error(401, "authentication_error", "invalid x-api-key")
        try:
            request = json.loads(body)
            model = str(request["model"])
        except (ValueError, KeyError, TypeError):
            return self._error(400, "invalid_request_error", "model: field required")
        usage = {"input_tokens": 1, "output_tokens": 5}
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model}
        text = {"type": "text", "text": self.TEXT}
        if not request.get("stream"):
            done = {"content": [text], "stop_reason": "end_turn", "stop_sequence": None}
            return 200, "application/json", json.dumps({**message, **done, "usage": usage}).encode()
        # The events of one text block, in the order the real API sends them.
        opening: dict[str, Any] = {
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        events: list[dict[str, Any]] = [
            {"type": "message_start", "message": {**message, **opening}},
            {"type": "content_block_start", "index": 0, "content_block": {**text, "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {**text, "type": "text_delta"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
            {"type": "message_stop"},
        ]
        sse = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
        return 200, "text/event-stream", sse.encode()

    @staticmethod
    def _error(status: int, kind: str, message: str) -> tuple[int, str, bytes]:
        error = {"type": "error", "error": {"type": kind, "message": message}}
        return status, "application/json", json.dumps(error).encode()


class Recorder:
    def __init__(self, path: Path) -> None:
        self._f = path.open("a", buffering=1)

    def write(self, **record: object) -> None:
        self._f.write(json.dumps({"t": time.time(), **record}) + "\n")


def answer(data: bytes, queries: Recorder) -> bytes | None:
    try:
        q = dns.message.from_wire(data)
    except Exception:
        return None
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    for question in q.question:
        name = question.name.to_text(omit_final_dot=True).lower()
        queries.write(name=name, type=dns.rdatatype.to_text(question.rdtype))
        ip = ZONE.get(name)
        if ip is None:
            r.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", ip))
    return bytes(r.to_wire())


class DnsUdp(asyncio.DatagramProtocol):
    def __init__(self, queries: Recorder) -> None:
        self.queries = queries

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        out = answer(data, self.queries)
        if out is not None:
            self.transport.sendto(out, addr)  # type: ignore[attr-defined]


async def dns_tcp(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, queries: Recorder
) -> None:
    try:
        size = int.from_bytes(await reader.readexactly(2), "big")
        out = answer(await reader.readexactly(size), queries)
        if out is not None:
            writer.write(len(out).to_bytes(2, "big") + out)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()


async def http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    requests: Recorder,
    scheme: str,
    model: FakeModel | None = None,
) -> None:
    sock_ip = writer.get_extra_info("sockname")[0]
    ssl_obj = writer.get_extra_info("ssl_object")
    sni = SNI.pop(id(ssl_obj), None) if ssl_obj is not None else None
    if ssl_obj is not None and ssl_obj.selected_alpn_protocol() == "h2":
        await http2(reader, writer, requests, sock_ip, sni, model)
        return
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            received = 0
            # Only the fake model reads bodies; the others count bytes (some tests send GBs).
            to_model = bytearray() if model is not None and model.handles(target) else None
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    chunk = await reader.readexactly(size + 2)
                    received += len(chunk) - 2
                    if to_model is not None:
                        to_model += chunk[:-2]
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
            length = int(headers.get("content-length", "0"))
            while received < length:
                chunk = await reader.read(min(1 << 20, length - received))
                if not chunk:
                    break
                received += len(chunk)
                if to_model is not None:
                    to_model += chunk
            requests.write(
                scheme=scheme,
                protocol="http/1.1",
                server=sock_ip,
                sni=sni,
                host=headers.get("host"),
                method=method,
                path=target,
                received=received,
                headers=headers,
            )
            if model is not None and to_model is not None:
                status, kind, out = model.answer(headers, bytes(to_model))
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    f"Content-Type: {kind}\r\nContent-Length: {len(out)}\r\n\r\n".encode()
                    + out
                )
                await writer.drain()
            elif target.startswith("/bytes/"):
                n = int(target.split("/")[2])
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode())
                block = b"x" * (1 << 20)
                while n > 0:
                    writer.write(block[: min(n, len(block))])
                    n -= min(n, len(block))
                    await writer.drain()
            else:
                body = f"hello from {sock_ip} host={headers.get('host')} sni={sni}\n".encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
            if headers.get("connection", "").lower() == "close":
                break
    except Exception:
        pass
    finally:
        writer.close()


async def http2(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    requests: Recorder,
    sock_ip: str,
    sni: str | None,
    model: FakeModel | None,
) -> None:
    """HTTP/2 (h2 negotiated by ALPN): the same answers and records as ``http``."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    conn.initiate_connection()
    # Per stream: headers, bytes received, and the body when the fake model is to read it.
    streams: dict[int, tuple[dict[str, str], list[int], bytearray | None]] = {}
    try:
        writer.write(conn.data_to_send())
        while data := await reader.read(1 << 16):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    headers = {str(k): str(v) for k, v in ev.headers}
                    keep = model is not None and model.handles(headers.get(":path"))
                    streams[ev.stream_id] = (headers, [0], bytearray() if keep else None)
                elif isinstance(ev, h2.events.DataReceived):
                    _, received, to_model = streams[ev.stream_id]
                    received[0] += len(ev.data)
                    if to_model is not None:
                        to_model += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    headers, received, to_model = streams.pop(ev.stream_id)
                    requests.write(
                        scheme="https",
                        protocol="h2",
                        server=sock_ip,
                        sni=sni,
                        host=headers.get(":authority"),
                        method=headers.get(":method"),
                        path=headers.get(":path"),
                        received=received[0],
                        headers={k: v for k, v in headers.items() if not k.startswith(":")},
                    )
                    status, kind = 200, "text/plain"
                    if model is not None and to_model is not None:
                        status, kind, out = model.answer(headers, bytes(to_model))
                    else:
                        authority = headers.get(":authority")
                        out = f"hello from {sock_ip} host={authority} sni={sni}\n".encode()
                    conn.send_headers(
                        ev.stream_id,
                        [
                            (":status", str(status)),
                            ("content-type", kind),
                            ("content-length", str(len(out))),
                        ],
                    )
                    conn.send_data(ev.stream_id, out, end_stream=True)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return
            writer.write(conn.data_to_send())
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()


async def websocket_echo(ws: Any, requests: Recorder) -> None:
    """Echo every message, after recording the handshake's headers."""
    requests.write(
        scheme="wss",
        protocol="websocket",
        server=ws.local_address[0],
        host=ws.request.headers.get("host"),
        path=ws.request.path,
        headers={k.lower(): v for k, v in ws.request.headers.raw_items()},
    )
    async for message in ws:
        await ws.send(message)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-fake_banner\r\n")
    await writer.drain()
    data = await reader.read(100)
    writer.write(b"got:" + data)
    await writer.drain()
    writer.close()


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    start = time.monotonic()
    while chunk := await reader.read(1 << 20):
        total += len(chunk)
    writer.write(f"{total} {time.monotonic() - start:.6f}\n".encode())
    await writer.drain()
    writer.close()


async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, zeros: Path) -> None:
    """Sends as many bytes as the first line asks for, with sendfile: never the bottleneck."""
    try:
        n = int((await reader.readline()).strip())
        loop = asyncio.get_running_loop()
        with zeros.open("rb") as f:
            size = zeros.stat().st_size
            while n > 0:
                chunk = min(n, size)
                await loop.sendfile(writer.transport, f, 0, chunk)
                n -= chunk
        writer.write_eof()
    except Exception:
        pass
    finally:
        writer.close()


async def main(directory: Path) -> None:
    queries = Recorder(directory / "queries.log")
    requests = Recorder(directory / "requests.log")
    model = FakeModel(directory)
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: DnsUdp(queries), local_addr=(DNS_IP, 53))
    await asyncio.start_server(lambda r, w: dns_tcp(r, w, queries), DNS_IP, 53)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(directory / "server.pem")

    def remember_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        SNI[id(obj)] = name

    tls.sni_callback = remember_sni
    tls.set_alpn_protocols(["h2", "http/1.1"])
    wss = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    wss.load_cert_chain(directory / "server.pem")
    import websockets.asyncio.server

    for ip in HOST_IPS:
        await websockets.asyncio.server.serve(
            lambda ws: websocket_echo(ws, requests), ip, 8443, ssl=wss
        )
        await asyncio.start_server(lambda r, w: http(r, w, requests, "http"), ip, 80)
        await asyncio.start_server(
            lambda r, w: http(r, w, requests, "https", model), ip, 443, ssl=tls
        )
        await loop.create_datagram_endpoint(Echo, local_addr=(ip, 9999))
        await asyncio.start_server(banner, ip, 2222)
        await asyncio.start_server(sink, ip, 9000)
    zeros = directory / "zeros"
    with zeros.open("wb") as f:
        f.truncate(64 << 20)
    for ip in HOST_IPS:
        await asyncio.start_server(lambda r, w: source(r, w, zeros), ip, 9001)
    (directory / "ready").touch()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
