"""`isolation: "microvm"` through the HTTP API and the SDK: a guest with its own kernel answers
exec and files like a container, pauses and resumes, is killed without a trace, and snapshots,
forks, restores and hibernates with its processes carrying on; what the tier cannot do is a
clear 400 that changes nothing."""

from __future__ import annotations

import platform
import time
from typing import Any

import httpx
import pytest

from tests.conftest import microvm_skip_reason
from tests.integration.server_harness import RunningServer, exec_stdout
from tests.integration.tiers import MEMORY_COUNTER

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def api(vm_api: httpx.Client) -> httpx.Client:
    return vm_api


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


def test_what_microvm_cannot_do_is_a_400(api: httpx.Client) -> None:
    before = api.get("/v1/sandboxes").json()
    for body, words in (
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


def _count(sbx: Any) -> tuple[int, str]:
    value, pid = sbx.exec("cat /run/mem/n").stdout.split()
    return int(value), pid


def test_snapshot_fork_restore_and_hibernate_keep_processes(server: RunningServer) -> None:
    """The SDK's persistence calls on a microvm: what was running in memory carries on."""
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    from corral import Sandbox

    conn = {"api_key": server.admin_key, "base_url": server.url}
    made: list[Any] = []
    try:
        src = Sandbox.create("minimal", isolation="microvm", vcpus=1, memory_mb=256, **conn)
        made.append(src)
        src.exec(MEMORY_COUNTER)
        time.sleep(0.3)
        before, pid = _count(src)
        snap = src.snapshot("counting")
        assert snap.size_bytes > 1 << 20  # memory is in it
        forks = Sandbox.fork(snap, 2, env={"WHO": "fork"}, **conn)
        made += forks
        for fork in forks:
            value, fork_pid = _count(fork)
            assert fork_pid == pid and value >= before
            assert fork.exec("echo $WHO; hostname").stdout.split() == ["fork", fork.id]
        a, b = (f.exec("head -c 8 /dev/urandom | od -An -tx1").stdout for f in forks)
        assert a != b  # each fork's RNG reseeded
        time.sleep(0.3)
        high, _ = _count(src)
        src.restore("counting")
        back, back_pid = _count(src)
        assert back_pid == pid and before <= back < high
        assert src.hibernate().state == "hibernated"
        assert src.resume().state == "running"
        assert _count(src)[1] == pid  # the same process, not a new one
        # A snapshot of a microvm is no container's filesystem, and its memory fits only a
        # machine of its shape.
        auth = {"Authorization": f"Bearer {server.admin_key}"}
        for body, words in (
            ({"isolation": "container"}, "isolation comes from snapshot"),
            ({"isolation": "microvm", "vcpus": 1, "memory_mb": 512}, "256 MiB"),
        ):
            r = httpx.post(
                f"{server.url}/v1/sandboxes",
                json={"snapshot": snap.id, **body},
                headers=auth,
                timeout=120,
            )
            assert r.status_code == 400 and words in r.text, r.text
        box = Sandbox.create("minimal", **conn)
        made.append(box)
        r = httpx.post(
            f"{server.url}/v1/sandboxes/{box.id}/restore",
            json={"snapshot": snap.id},
            headers=auth,
            timeout=60,
        )
        assert r.status_code == 400 and "microvm" in r.text, r.text
        Sandbox.delete_snapshot(snap, **conn)
    finally:
        for sbx in made:
            sbx.kill()


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
