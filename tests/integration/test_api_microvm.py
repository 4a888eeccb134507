"""`isolation: "microvm"` through the HTTP API and the SDK: a guest with its own kernel answers
exec and files like a container, pauses and resumes, and is killed without a trace; what the
tier cannot do yet (snapshots, hibernation) is a clear 400 that changes nothing."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import microvm_skip_reason
from tests.integration.server_harness import RunningServer, exec_stdout

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    with server.client(timeout=180) as c:
        yield c


def _vm(api: httpx.Client, **body: Any) -> dict[str, Any]:
    r = api.post(
        "/v1/sandboxes",
        json={"template": "minimal", "isolation": "microvm", "vcpus": 1, "memory_mb": 256, **body},
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_exec_files_pause_kill(api: httpx.Client) -> None:
    vm = _vm(api)
    sid = vm["id"]
    try:
        assert vm["runtime"] == "microvm" and vm["cpu"] == 1.0 and vm["state"] == "running"
        kernel = exec_stdout(api, sid, "uname -r").strip()
        assert kernel != platform.release() and kernel.endswith("-cloud-amd64")
        assert exec_stdout(api, sid, "hostname; echo $CORRAL_SANDBOX_ID").split() == [sid, sid]
        r = api.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/note"}, content=b"vm!")
        assert r.status_code in (200, 201, 204), r.text
        assert (
            api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/root/note"}).content == b"vm!"
        )
        assert api.post(f"/v1/sandboxes/{sid}/pause").json()["state"] == "paused"
        assert exec_stdout(api, sid, "echo back") == "back\n"  # auto-resume
        # Its NIC carries the sandbox's address (egress is the network tests' business).
        assert vm["network"]["address"] in exec_stdout(api, sid, "ip -4 addr show dev eth0")
    finally:
        assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert api.get(f"/v1/sandboxes/{sid}").json()["state"] == "stopped"


def test_info_names_the_tiers_and_the_accelerator(api: httpx.Client) -> None:
    info = api.get("/v1/info").json()
    assert info["default_isolation"] == "container"
    assert set(info["isolation"]) == {"container", "microvm"}
    assert info["isolation"]["microvm"]["accelerator"] in ("kvm", "tcg")


def test_what_microvm_cannot_do_yet_is_a_400(api: httpx.Client) -> None:
    before = api.get("/v1/sandboxes").json()
    for body, words in (
        ({"on_idle": "hibernate", "idle_timeout": 60}, "hibernate"),
        ({"cpu": 0.5, "vcpus": None}, "whole vCPUs"),
        ({"isolation": "vm"}, "isolation"),
    ):
        r = api.post(
            "/v1/sandboxes",
            json={"template": "minimal", "isolation": "microvm", "vcpus": 1, **body},
        )
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], r.text
    assert api.get("/v1/sandboxes").json() == before
    vm = _vm(api)
    try:
        r = api.post(f"/v1/sandboxes/{vm['id']}/snapshots")
        assert r.status_code == 400 and "microvm" in r.json()["error"]["message"]
        r = api.post(f"/v1/sandboxes/{vm['id']}/hibernate")
        assert r.status_code == 400 and "microvm" in r.json()["error"]["message"]
        assert exec_stdout(api, vm["id"], "echo still here") == "still here\n"
    finally:
        api.delete(f"/v1/sandboxes/{vm['id']}")


def test_sdk_creates_a_microvm(server: RunningServer) -> None:
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    from corral import Sandbox

    with Sandbox.create(
        "minimal",
        isolation="microvm",
        vcpus=1,
        memory_mb=256,
        api_key=server.admin_key,
        base_url=server.url,
    ) as sbx:
        assert sbx.info().isolation == "microvm"
        assert sbx.exec("cat /proc/1/comm").stdout == "agent\n"
