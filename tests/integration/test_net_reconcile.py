"""After a server crash, an adopted sandbox keeps its network and policy, the network of an orphan
is removed, and while no server runs, sandbox traffic fails closed."""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

from corral.templates import build_in_data_dir
from tests.conftest import container_skip_reason
from tests.integration.fake_internet import FakeInternet
from tests.integration.server_harness import (
    RunningServer,
    kill_all_sandboxes,
    release_data_dir,
    shared_templates_dir,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration

POLICY = {"allow": [{"domain": "allowed.test"}]}


def _exec(server: RunningServer, sandbox_id: str, cmd: str) -> tuple[int | None, str]:
    with server.client() as c:
        r = c.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, "timeout": 30})
    out, code = b"", None
    for line in r.text.splitlines():
        event = json.loads(line)
        if event.get("type") in ("stdout", "stderr"):
            out += base64.b64decode(event["data"])
        elif event.get("type") == "exit":
            code = event.get("exit_code")
    return code, out.decode(errors="replace")


def _netns() -> str:
    return subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout


def test_crash_then_restart_keeps_adopted_networks_and_removes_orphans(
    tmp_path: Path, fake_net: FakeInternet
) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    templates = shared_templates_dir(tmp_path / "scratch")
    build_in_data_dir("base", templates.parent)  # curl (busybox's static wget cannot resolve)
    data = tmp_path / "data"
    data.mkdir()
    (data / "templates").symlink_to(templates)
    server = start_server(data, dns_upstream=fake_net.dns)
    try:
        with server.client() as c:
            body = {"template": "base", "timeout": 600, "network": POLICY}
            keep = c.post("/v1/sandboxes", json=body).json()["id"]
            orphan = c.post("/v1/sandboxes", json=body).json()["id"]
        fetch = "curl -sS --max-time 10 http://allowed.test/reconcile"
        code, out = _exec(server, keep, fetch)
        assert code == 0 and "hello from" in out, out
        prefix = json.loads((data / "server.json").read_text())["network"]["prefix"]
        assert f"corral-{prefix}-{orphan}" in _netns()

        stop_server(server, hard=True)  # a crash: nothing torn down
        # The sandbox still runs; with nobody behind the proxy port its traffic (DNATed there)
        # is refused at once: fail closed.
        subnet = json.loads((data / "server.json").read_text())["network"]["subnet"]
        service_ip = str(ipaddress.IPv4Network(subnet).network_address + 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((service_ip, 3128), timeout=5).close()
        with sqlite3.connect(data / "corral.db") as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (orphan,))
        server = start_server(data, dns_upstream=fake_net.dns)

        assert f"corral-{prefix}-{orphan}" not in _netns()
        assert f"corral-{prefix}-{keep}" in _netns()
        code, out = _exec(server, keep, fetch)
        assert code == 0 and "hello from" in out, out
        code, out = _exec(server, keep, "curl -sS --max-time 10 http://blocked.test/")
        assert code != 0, out
        with server.client() as c:
            info = c.get(f"/v1/sandboxes/{keep}").json()
        assert info["network"]["policy"]["allow"][0]["domain"] == "allowed.test"
    finally:
        try:
            kill_all_sandboxes(server)
        finally:
            stop_server(server)
            release_data_dir(data)
