"""Secrets bound at create are injected by the egress proxy as bound: header mode, HTTP/2,
WebSockets, forks that keep their placeholders, a server restart; and what cannot be injected is
refused with a reason (plain HTTP, a deleted secret), never sent on as if it were."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from corral import Sandbox
from corral.errors import InvalidRequestError
from tests.conftest import Conn
from tests.integration.fake_internet import FakeInternet
from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

ALLOW = {"allow": [{"domain": "allowed.test"}, {"domain": "*.allowed.test"}]}

# A WebSocket client in the standard library only: upgrade with the placeholder in a header,
# send one text frame holding the placeholder (bodies are never rewritten), print the echo.
WS_CLIENT = r"""
import base64, os, socket, ssl
ph = os.environ["API_KEY"]
ctx = ssl.create_default_context()
s = ctx.wrap_socket(socket.create_connection(("api.allowed.test", 8443), timeout=20),
                    server_hostname="api.allowed.test")
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: api.allowed.test:8443\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
           f"Sec-WebSocket-Key: {key}\r\nAuthorization: Bearer {ph}\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
head, rest = buf.split(b"\r\n\r\n", 1)
assert head.startswith(b"HTTP/1.1 101"), head
msg = ("echo " + ph).encode()
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
    rest += s.recv(4096)
print(rest[2:2 + (rest[1] & 0x7F)].decode())
"""


@pytest.fixture
def put_secret(server: RunningServer) -> Iterator[Callable[[], tuple[str, str]]]:
    made: list[str] = []

    def _put() -> tuple[str, str]:
        name = f"key-{secrets.token_hex(3)}"
        value = f"sv-{secrets.token_hex(20)}"
        with server.client() as c:
            r = c.put(f"/v1/secrets/{name}", json={"value": value})
            assert r.status_code == 200, r.text
        made.append(name)
        return name, value

    yield _put
    with server.client() as c:
        for name in made:
            c.delete(f"/v1/secrets/{name}")


@pytest.fixture
def make(conn: Conn, base_template: str) -> Iterator[Callable[..., Sandbox]]:
    made: list[Sandbox] = []

    def _make(bindings: list[dict[str, Any]], network: Any = ALLOW) -> Sandbox:
        sbx = Sandbox.create(base_template, network=network, secrets=bindings, timeout=300, **conn)
        made.append(sbx)
        return sbx

    yield _make
    for sbx in made:
        sbx.kill()


def sh(sbx: Sandbox, cmd: str, timeout: float = 60) -> tuple[int, str]:
    r = sbx.exec(cmd, timeout=timeout)
    return (r.exit_code if r.exit_code is not None else -1), r.stdout + r.stderr


def seen(fake_net: FakeInternet, path: str) -> dict[str, Any]:
    (found,) = [r for r in fake_net.requests() if r.get("path") == path]
    return found


def test_header_mode_sets_the_header_over_http1_and_http2(
    make: Callable[..., Sandbox], put_secret: Any, fake_net: FakeInternet
) -> None:
    name, value = put_secret()
    sbx = make(
        [
            {
                "name": name,
                "hosts": ["*.allowed.test"],
                "header": "Authorization",
                "format": "Bearer {value}",
            }
        ]
    )
    tag = secrets.token_hex(4)
    # No header of its own, and one it made up: both leave with the real one.
    code, out = sh(sbx, f"curl -sS --max-time 20 --http1.1 https://api.allowed.test/h1-{tag}")
    assert code == 0 and "hello from" in out, out
    code, out = sh(
        sbx,
        f"curl -sS --max-time 20 --http2 -H 'Authorization: Bearer made-up' "
        f"https://www.allowed.test/h2-{tag}",
    )
    assert code == 0 and "hello from" in out, out
    h1, h2 = seen(fake_net, f"/h1-{tag}"), seen(fake_net, f"/h2-{tag}")
    assert (h1["protocol"], h2["protocol"]) == ("http/1.1", "h2")
    assert h1["headers"]["authorization"] == f"Bearer {value}"
    assert h2["headers"]["authorization"] == f"Bearer {value}"
    assert h2["host"] == "www.allowed.test"
    # The wildcard covers names below it, not the domain itself.
    sbx.files.write("/tmp/fake-ca.pem", fake_net.ca_pem)
    code, out = sh(
        sbx, f"curl -sS --max-time 20 --cacert /tmp/fake-ca.pem https://allowed.test/apex-{tag}"
    )
    assert code == 0, out
    assert "authorization" not in seen(fake_net, f"/apex-{tag}")["headers"]


def test_websocket_upgrade_carries_the_secret_and_frames_pass_untouched(
    make: Callable[..., Sandbox], put_secret: Any, fake_net: FakeInternet
) -> None:
    name, value = put_secret()
    sbx = make([{"name": name, "hosts": ["api.allowed.test"], "env": "API_KEY"}])
    placeholder = sbx.info().raw["secrets"][0]["placeholder"]
    sbx.files.write("/tmp/ws.py", WS_CLIENT)
    code, out = sh(sbx, "python3 /tmp/ws.py")
    assert code == 0, out
    assert out.strip() == f"echo {placeholder}"  # a frame's payload is not rewritten
    hello = [r for r in fake_net.requests() if r.get("protocol") == "websocket"][-1]
    assert hello["headers"]["authorization"] == f"Bearer {value}"


def test_what_cannot_be_injected_is_refused_with_a_reason(
    make: Callable[..., Sandbox], put_secret: Any, server: RunningServer, fake_net: FakeInternet
) -> None:
    name, _ = put_secret()
    sbx = make([{"name": name, "hosts": ["api.allowed.test"], "env": "API_KEY"}])
    tag = secrets.token_hex(4)
    # Plain HTTP to a bound host: the secret would cross the network in clear.
    code, out = sh(
        sbx, f"curl -sS --max-time 20 -w '%{{http_code}}' http://api.allowed.test/p-{tag}"
    )
    assert code == 0 and out.endswith("502") and "only over TLS" in out, out
    assert not [r for r in fake_net.requests() if r.get("path") == f"/p-{tag}"]
    # A secret deleted since: 502 naming it, and the upstream hears nothing.
    with server.client() as c:
        assert c.delete(f"/v1/secrets/{name}").status_code == 204
    code, out = sh(
        sbx,
        f"curl -sS --max-time 20 -w '%{{http_code}}' -H \"X: $API_KEY\" "
        f"https://api.allowed.test/d-{tag}",
    )
    assert code == 0 and out.endswith("502") and name in out, out
    assert not [r for r in fake_net.requests() if r.get("path") == f"/d-{tag}"]


def test_bad_bindings_are_refused_at_create(
    conn: Conn, base_template: str, put_secret: Any, server: RunningServer
) -> None:
    name, _ = put_secret()
    cases: list[tuple[list[dict[str, Any]], Any, str]] = [
        ([{"name": "no-such-secret", "hosts": ["api.allowed.test"]}], ALLOW, "unknown secret"),
        ([{"name": name, "hosts": ["*"]}], ALLOW, "anywhere"),
        ([{"name": name, "hosts": ["198.51.100.10"]}], ALLOW, "IP address"),
        ([{"name": name, "hosts": ["*.test"]}], ALLOW, "too broad"),
        ([{"name": name, "hosts": ["api.other.test"]}], ALLOW, "does not let it reach"),
        ([{"name": name, "hosts": ["api.allowed.test"]}], None, "does not let it reach"),
        ([{"name": name, "hosts": ["api.allowed.test"], "env": "1X"}], ALLOW, "variable name"),
        (
            [{"name": name, "hosts": ["api.allowed.test"], "format": "Bearer"}],
            ALLOW,
            "{value}",
        ),
        (
            [
                {"name": name, "hosts": ["api.allowed.test"]},
                {"name": name, "hosts": ["www.allowed.test"]},
            ],
            ALLOW,
            "bound twice",
        ),
    ]
    before = len(Sandbox.list(**conn))
    for bindings, network, why in cases:
        with pytest.raises(InvalidRequestError, match=why.replace("{", r"\{").replace("}", r"\}")):
            Sandbox.create(base_template, network=network, secrets=bindings, **conn)
    assert len(Sandbox.list(**conn)) == before
    # The environment variable cannot be given twice either.
    with server.client() as c:
        r = c.post(
            "/v1/sandboxes",
            json={
                "template": base_template,
                "network": ALLOW,
                "env": {"API_KEY": "mine"},
                "secrets": [{"name": name, "hosts": ["api.allowed.test"], "env": "API_KEY"}],
            },
        )
    assert r.status_code == 400 and "also set" in r.json()["error"]["message"], r.text


def test_a_fork_keeps_placeholders_and_trust(
    make: Callable[..., Sandbox], put_secret: Any, fake_net: FakeInternet, conn: Conn
) -> None:
    name, value = put_secret()
    sbx = make([{"name": name, "hosts": ["api.allowed.test"], "env": "API_KEY"}])
    placeholder = sbx.info().raw["secrets"][0]["placeholder"]
    snap = sbx.snapshot()
    (fork,) = Sandbox.fork(snap.id, 1, **conn)
    try:
        assert fork.info().raw["secrets"][0]["placeholder"] == placeholder
        tag = secrets.token_hex(4)
        code, out = sh(
            fork, f'curl -sS --max-time 20 -H "X-Key: $API_KEY" https://api.allowed.test/f-{tag}'
        )
        assert code == 0, out
        assert seen(fake_net, f"/f-{tag}")["headers"]["x-key"] == value
    finally:
        fork.kill()
        Sandbox.delete_snapshot(snap.id, **conn)


def test_injection_survives_a_server_restart(
    tmp_path: Any, fake_net: FakeInternet, base_template: str
) -> None:
    from tests.integration.server_harness import own_server

    with own_server(tmp_path, dns_upstream=fake_net.dns, upstream_ca_pem=fake_net.ca_pem) as own:
        c = httpx.Client(
            base_url=own.server.url,
            headers={"Authorization": f"Bearer {own.server.admin_key}"},
            timeout=120,
        )
        value = f"rv-{secrets.token_hex(16)}"
        assert c.put("/v1/secrets/restart", json={"value": value}).status_code == 200
        conn = {"api_key": own.server.admin_key, "base_url": own.server.url}
        sbx = Sandbox.create(
            base_template,
            network=ALLOW,
            secrets=[{"name": "restart", "hosts": ["api.allowed.test"], "env": "API_KEY"}],
            **conn,
        )
        own.restart(hard=True)
        sbx = Sandbox.connect(sbx.id, api_key=own.server.admin_key, base_url=own.server.url)
        tag = secrets.token_hex(4)
        code, out = sh(
            sbx, f'curl -sS --max-time 20 -H "X-Key: $API_KEY" https://api.allowed.test/r-{tag}'
        )
        assert code == 0, out
        assert seen(fake_net, f"/r-{tag}")["headers"]["x-key"] == value
        sbx.kill()
