"""A bound secret reaches its host on the wire and nowhere else: the fake API receives the real
value, while inside the sandbox (every process's environment, every file, every process's memory)
and in everything corral returns there is only its placeholder — on a container and a microvm."""

from __future__ import annotations

import hashlib
import json
import secrets
import shlex
from collections.abc import Iterator
from typing import Any

import pytest

from corral import Sandbox
from tests.conftest import Conn
from tests.integration.fake_internet import FakeInternet
from tests.integration.server_harness import RunningServer
from tests.integration.tiers import sdk_args

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("server_no_leaks")]

ALLOW = {"allow": [{"domain": "allowed.test"}, {"domain": "*.allowed.test"}]}

# Searches the sandbox for a value it must not know, without ever sending it there: it is given
# the value's non-secret prefix, length and SHA-256, hashes what follows each occurrence of the
# prefix, and counts matches. ``probe`` (the placeholder, not secret) is counted directly, which
# shows that the search does see what is there.
SCAN = r"""
import hashlib, os, sys
prefix, length, digest, probe = sys.argv[1].encode(), int(sys.argv[2]), sys.argv[3], sys.argv[4].encode()
me = os.getpid()
found = {"environ": [0, 0], "files": [0, 0], "memory": [0, 0], "scanned": 0}

def count(where, data):
    hits, at = 0, data.find(prefix)
    while at >= 0:
        if hashlib.sha256(data[at:at + length]).hexdigest() == digest:
            hits += 1
        at = data.find(prefix, at + 1)
    found[where][0] += hits
    found[where][1] += data.count(probe)

pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me]
for pid in pids:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            count("environ", f.read())
    except OSError:
        pass
for top, dirs, files in os.walk("/"):
    if top == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files:
        path = os.path.join(top, name)
        try:
            if os.path.islink(path) or os.path.getsize(path) > 64 << 20:
                continue
            with open(path, "rb") as f:
                count("files", f.read())
        except OSError:
            pass
for pid in pids:
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", 0)
    except OSError:
        continue
    with mem:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if "r" not in perms or end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found["scanned"] += len(data)
            count("memory", data)
print(__import__("json").dumps(found))
"""

# Keeps a TLS connection to the bound host open (after one request carrying the placeholder),
# so that the memory scan covers a live client of the intercepted connection.
KEEPER = r"""
import http.client, os, ssl, time
c = http.client.HTTPSConnection("api.allowed.test", context=ssl.create_default_context())
c.request("GET", "/keeper", headers={"Authorization": "Bearer " + os.environ["API_KEY"]})
r = c.getresponse(); r.read()
open("/tmp/keeper.status", "w").write(str(r.status))
time.sleep(600)
"""


@pytest.fixture
def secret(server: RunningServer) -> Iterator[tuple[str, str]]:
    """A tenant secret (name, value) with a random non-secret prefix and a random secret part."""
    name = f"api-{secrets.token_hex(3)}"
    value = f"sk-{secrets.token_hex(4)}-{secrets.token_hex(24)}"
    with server.client() as c:
        r = c.put(f"/v1/secrets/{name}", json={"value": value})
        assert r.status_code == 200, r.text
    yield name, value
    with server.client() as c:
        c.delete(f"/v1/secrets/{name}")


def sh(sbx: Sandbox, cmd: str, timeout: float = 120) -> tuple[int, str]:
    r = sbx.exec(cmd, timeout=timeout)
    return (r.exit_code if r.exit_code is not None else -1), r.stdout + r.stderr


def requests_to(fake_net: FakeInternet, path: str) -> list[dict[str, Any]]:
    return [r for r in fake_net.requests() if r.get("path") == path]


def test_secret_reaches_its_host_and_never_the_sandbox(
    conn: Conn,
    server: RunningServer,
    base_template: str,
    fake_net: FakeInternet,
    isolation: dict[str, Any],
    secret: tuple[str, str],
) -> None:
    name, value = secret
    sbx = Sandbox.create(
        base_template,
        network=ALLOW,
        timeout=600,
        secrets=[{"name": name, "hosts": ["api.allowed.test"], "env": "API_KEY"}],
        **sdk_args(isolation),
        **conn,
    )
    try:
        info = sbx.info().raw
        placeholder = info["secrets"][0]["placeholder"]
        assert info["secrets"] == [
            {
                "name": name,
                "hosts": ["api.allowed.test"],
                "env": "API_KEY",
                "header": None,
                "placeholder": placeholder,
            }
        ]
        code, out = sh(sbx, 'printf %s "$API_KEY"')
        assert (code, out) == (0, placeholder)
        tag = secrets.token_hex(4)

        # curl trusts the sandbox's CA through the system bundle it was appended to.
        code, out = sh(
            sbx,
            f'curl -sS --max-time 20 -H "Authorization: Bearer $API_KEY" '
            f'"https://api.allowed.test/curl-{tag}?k=$API_KEY"',
        )
        assert code == 0, out
        assert "hello from 198.51.100.10" in out
        # Python through SSL_CERT_FILE, and the explicit proxy (CONNECT) path.
        code, out = sh(
            sbx,
            "python3 -c "
            + shlex.quote(
                "import os, urllib.request as u; r = u.Request("
                f"'https://api.allowed.test/py-{tag}', headers={{'X-Key': os.environ['API_KEY']}});"
                " print(u.urlopen(r, timeout=20).status)"
            ),
        )
        assert (code, out.strip()) == (0, "200"), out
        code, out = sh(
            sbx,
            f'curl -sS --max-time 20 -x "{info["network"]["proxy"]}" -H "X-Key: $API_KEY" '
            f"https://api.allowed.test/proxied-{tag}",
        )
        assert code == 0, out
        got = {
            "curl": requests_to(fake_net, f"/curl-{tag}?k={value}"),
            "py": requests_to(fake_net, f"/py-{tag}"),
            "proxied": requests_to(fake_net, f"/proxied-{tag}"),
        }
        assert all(len(v) == 1 for v in got.values()), got
        assert got["curl"][0]["headers"]["authorization"] == f"Bearer {value}"
        assert got["py"][0]["headers"]["x-key"] == value
        assert got["proxied"][0]["headers"]["x-key"] == value
        assert got["curl"][0]["sni"] == "api.allowed.test"

        # A placeholder sent to a host it is not bound to arrives as it is (and that host's own
        # certificate is the one seen: no interception there).
        sbx.files.write("/etc/corral/fake-ca.pem", fake_net.ca_pem)
        code, out = sh(
            sbx,
            f'curl -sS --max-time 20 --cacert /etc/corral/fake-ca.pem -H "X-Key: $API_KEY" '
            f"https://www.allowed.test/unbound-{tag}",
        )
        assert code == 0, out
        (unbound,) = requests_to(fake_net, f"/unbound-{tag}")
        assert unbound["headers"]["x-key"] == placeholder

        # A live client of the intercepted connection stays for the memory scan.
        sbx.files.write("/tmp/keeper.py", KEEPER)
        code, out = sh(sbx, "setsid python3 /tmp/keeper.py </dev/null >/dev/null 2>&1 &")
        assert code == 0, out
        code, out = sh(
            sbx,
            "for i in $(seq 100); do [ -s /tmp/keeper.status ] && break; sleep 0.1; done;"
            " cat /tmp/keeper.status",
        )
        assert out.strip() == "200", out
        assert requests_to(fake_net, "/keeper")[-1]["headers"]["authorization"] == f"Bearer {value}"

        prefix = value[: value.index("-", 3) + 1]
        sbx.files.write("/tmp/scan.py", SCAN)
        digest = hashlib.sha256(value.encode()).hexdigest()
        code, out = sh(
            sbx, f"python3 /tmp/scan.py {prefix} {len(value)} {digest} {placeholder}", timeout=300
        )
        assert code == 0, out
        found = json.loads(out.strip().splitlines()[-1])
        assert found["environ"][0] == 0 and found["environ"][1] > 0, found
        assert found["files"][0] == 0, found
        assert found["memory"][0] == 0 and found["memory"][1] > 0, found
        assert found["scanned"] > 10 << 20, found  # it did read the processes' memory

        # Nothing corral returns holds the value: the sandbox, the list, the secrets, the log.
        with server.client() as c:
            bodies = [
                c.get(f"/v1/sandboxes/{sbx.id}").text,
                c.get("/v1/sandboxes").text,
                c.get("/v1/secrets").text,
                c.get(f"/v1/secrets/{name}").text,
                c.get(f"/v1/sandboxes/{sbx.id}/network/log").text,
            ]
            log = c.get(f"/v1/sandboxes/{sbx.id}/network/log").json()
        assert not any(value in b for b in bodies)
        injected = [e for e in log if e["kind"] == "inject"]
        assert injected, log
        assert all(e["name"] == "api.allowed.test" and name in e["reason"] for e in injected)
    finally:
        sbx.kill()
