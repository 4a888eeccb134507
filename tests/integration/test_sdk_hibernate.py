"""Hibernate and wake through the SDK: processes stop and memory is freed, the disk and the
network policy stay, any call wakes it, and a hibernated sandbox survives a server crash and a
host reboot's loss of every mount, namespace and firewall table."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from corral import Sandbox, errors
from corral.config import ServerConfig
from corral.core.network import purge_network
from tests.conftest import container_skip_reason
from tests.integration.fake_internet import FakeInternet
from tests.integration.server_harness import (
    RunningServer,
    release_data_dir,
    shared_templates_dir,
    start_server,
    stop_server,
)

pytestmark = [pytest.mark.integration]

TEMPLATE = "minimal"
POLICY = {"allow": [{"domain": "allowed.test"}]}


def _conn(server: RunningServer) -> dict[str, str]:
    return {"api_key": server.admin_key, "base_url": server.url}


@pytest.mark.usefixtures("server_no_leaks")
def test_hibernate_keeps_disk_and_policy_and_any_call_wakes_it(server: RunningServer) -> None:
    with Sandbox.create(TEMPLATE, network=POLICY, timeout=600, **_conn(server)) as sbx:
        sbx.exec("echo kept > /root/file")
        sbx.exec(["/bin/sleep", "1000"], background=True)
        info = sbx.hibernate()
        assert info.state == "hibernated" and info.expires_at is None
        assert info.address is None  # its network went with its processes
        with pytest.raises(errors.ConflictError):
            sbx.hibernate()
        assert sbx.exec("cat /root/file").stdout == "kept\n"  # wakes it
        info = sbx.info()
        assert info.state == "running" and info.address is not None
        assert "sleep" not in sbx.exec("ps -o comm").stdout  # processes start afresh
        assert "198.51.100.10" in sbx.exec("nslookup allowed.test").stdout  # policy kept
        assert sbx.exec("nslookup blocked.test").exit_code != 0


@pytest.mark.usefixtures("server_no_leaks")
def test_idle_policy_can_hibernate(server: RunningServer) -> None:
    with Sandbox.create(
        TEMPLATE, timeout=600, idle_timeout=2, on_idle="hibernate", **_conn(server)
    ) as sbx:
        deadline = time.monotonic() + 20
        while sbx.info().state != "hibernated":
            assert time.monotonic() < deadline, "not hibernated after 20 s idle"
            time.sleep(0.3)
        assert sbx.exec("echo up").stdout == "up\n"


def test_hibernated_sandbox_survives_crash_and_reboot(
    tmp_path: Path, fake_net: FakeInternet
) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    templates = shared_templates_dir(tmp_path / "scratch")
    data = tmp_path / "data"
    data.mkdir()
    (data / "templates").symlink_to(templates)
    server = start_server(data, dns_upstream=fake_net.dns)
    try:
        sbx = Sandbox.create(TEMPLATE, network=POLICY, timeout=600, **_conn(server))
        sbx.exec("echo survived > /root/file")
        sbx.hibernate()
        stop_server(server, hard=True)
        # What a reboot takes away and the crash did not: the network's host objects.
        config = ServerConfig.load(data / "server.json")
        asyncio.run(purge_network(config.network))
        server = start_server(data, dns_upstream=fake_net.dns)
        again = Sandbox.connect(sbx.id, **_conn(server))
        assert again.info().state == "hibernated"
        assert again.resume().state == "running"
        assert again.exec("cat /root/file").stdout == "survived\n"
        assert "198.51.100.10" in again.exec("nslookup allowed.test").stdout
        again.kill()
    finally:
        stop_server(server)
        release_data_dir(data)


@pytest.mark.usefixtures("server_no_leaks")
def test_a_port_request_wakes_it_only_with_the_token(server: RunningServer) -> None:
    import httpx

    with Sandbox.create(TEMPLATE, network=POLICY, timeout=600, **_conn(server)) as sbx:
        sbx.hibernate()
        url = f"{server.url}/sandboxes/{sbx.id}/ports/8080/"
        assert httpx.get(url, timeout=30).status_code == 401
        assert sbx.info().state == "hibernated"  # no token, no wake
        token = sbx.info().access_token
        assert token is not None
        answer = httpx.get(url, headers={"X-Corral-Access-Token": token}, timeout=30)
        # Woken (processes start afresh, so nothing listens on 8080 yet).
        assert answer.status_code == 502, answer.text
        assert sbx.info().state == "running"
