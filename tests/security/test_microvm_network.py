"""A microvm's egress is enforced on the host exactly as a container's: its NIC is wired to the
sandbox's veth, so an allowed name works through corral's resolver and proxy, a blocked name
never resolves (the fake upstream DNS never hears of it) and a blocked address fails fast."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral import Sandbox
from tests.conftest import microvm_skip_reason
from tests.integration.fake_internet import FakeInternet
from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("server_no_leaks")]

ALLOWED_IP = "198.51.100.10"
BLOCKED_IP = "198.51.100.11"


@pytest.fixture
def vm(server: RunningServer, fake_net: FakeInternet) -> Iterator[Sandbox]:
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    sbx = Sandbox.create(
        "minimal",
        isolation="microvm",
        vcpus=1,
        memory_mb=256,
        allow_domains=["allowed.test"],
        timeout=300,
        api_key=server.admin_key,
        base_url=server.url,
    )
    try:
        yield sbx
    finally:
        sbx.kill()


def http(ip: str, host: str, path: str) -> str:
    request = f"GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n"
    return f"printf '{request}' | nc -w 15 {ip} 80"


def sh(sbx: Sandbox, cmd: str) -> tuple[int, str]:
    r = sbx.exec(cmd, timeout=60)
    return (r.exit_code if r.exit_code is not None else -1), r.stdout + r.stderr


def test_allowed_works_blocked_fails_fast(vm: Sandbox, fake_net: FakeInternet) -> None:
    # The fake internet is the session's: count only what this test made it hear.
    heard = len(fake_net.queries())
    info: Any = vm.info()
    assert info.address is not None
    code, out = sh(vm, "ip -4 addr show dev eth0; cat /etc/resolv.conf")
    assert code == 0 and info.address in out, out
    # minimal's static busybox resolves with its own nslookup only (its wget crashes in glibc's
    # static getaddrinfo); the proxy goes by the Host header anyway, so nc speaks HTTP here.
    code, out = sh(vm, "nslookup allowed.test")
    assert code == 0 and ALLOWED_IP in out, out
    code, out = sh(vm, http(ALLOWED_IP, "allowed.test", "/from-vm"))
    assert code == 0 and f"hello from {ALLOWED_IP} host=allowed.test" in out, out
    assert "/from-vm" in [r["path"] for r in fake_net.requests()]

    started = time.monotonic()
    code, out = sh(vm, "nslookup blocked.test")
    assert code != 0 or "NXDOMAIN" in out or "can't resolve" in out, out
    assert "blocked.test" not in fake_net.queries()[heard:]
    code, out = sh(vm, http(BLOCKED_IP, "blocked.test", "/direct"))
    assert "hello from" not in out, out
    assert time.monotonic() - started < 12  # refused, not left to time out
    assert not [r for r in fake_net.requests() if r["server"] == BLOCKED_IP]
