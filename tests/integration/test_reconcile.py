"""After a server crash or restart, running sandboxes are adopted again (their background output
meanwhile intact, containers and microvms alike) and orphans on the host are removed; after a
host reboot, disks and snapshots are still there, and a microvm's saved memory too."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from corral.host.mounts import unmount
from corral.runtime.container import ContainerRuntime
from tests.conftest import container_skip_reason, microvm_skip_reason
from tests.integration.server_harness import exec_stdout, own_server
from tests.integration.tiers import MEMORY_COUNTER

pytestmark = pytest.mark.integration


def test_crash_then_restart_adopts_and_cleans(tmp_path: Path) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with own_server(tmp_path) as own:
        with own.server.client() as c:
            keep = c.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600}).json()[
                "id"
            ]
            orphan = c.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600}).json()[
                "id"
            ]
            c.post(f"/v1/sandboxes/{keep}/exec", json={"cmd": "echo kept > /tmp/mark"}).read()
        data = own.server.data_dir

        def forget_orphan() -> None:
            # The store forgets one sandbox: it is now an orphan that only the host knows about.
            with sqlite3.connect(data / "corral.db") as db:
                db.execute("DELETE FROM sandboxes WHERE id = ?", (orphan,))

        server = own.restart(hard=True, between=forget_orphan)  # a crash: nothing torn down
        with server.client() as c:
            assert c.get(f"/v1/sandboxes/{keep}").json()["state"] == "running"
            r = c.post(f"/v1/sandboxes/{keep}/exec", json={"cmd": "cat /tmp/mark"})
            assert base64.b64encode(b"kept\n").decode() in r.text
            assert c.get(f"/v1/sandboxes/{orphan}").status_code == 404
        left = {p.name for p in (data / "sandboxes").iterdir()}
        assert orphan not in left and keep in left


def _output(c: httpx.Client, sid: str, pid: int) -> tuple[str, list[dict[str, object]]]:
    with c.stream("GET", f"/v1/sandboxes/{sid}/processes/{pid}/output") as r:
        assert r.status_code == 200
        events = [json.loads(line) for line in r.iter_lines() if line]
    out = b"".join(
        base64.b64decode(str(e["data"])) for e in events if e["type"] == "stdout"
    ).decode()
    return out, events


@pytest.mark.parametrize("hard", [False, True], ids=["restart", "kill-9"])
def test_background_output_survives_a_server_restart(
    tmp_path: Path, hard: bool, isolation: dict[str, object]
) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with own_server(tmp_path) as own:
        with own.server.client(timeout=180) as c:
            body = {"template": "minimal", "timeout": 600, **isolation}
            r = c.post("/v1/sandboxes", json=body)
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            script = "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.05; done"
            r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": script, "background": True})
            pid = r.json()["pid"]
        time.sleep(0.3)
        # The process goes on printing for a second with no server around.
        server = own.restart(hard=hard, between=lambda: time.sleep(1.0))
        with server.client() as c:
            out, events = _output(c, sid, pid)
        assert out.split() == [str(i) for i in range(40)]  # nothing lost, nothing twice
        assert events[-1] == {"type": "exit", "exit_code": 0}


def _simulate_reboot(data: Path) -> None:
    """What a host reboot does to corral's host state: every sandbox process (container init,
    QEMU) dies, every mount goes (rootfs overlays, disks, the pool) and /run is empty again;
    files on the host disk stay."""
    metas = [
        *(data / "sandboxes").glob("*/meta.json"),
        *(data / "pool" / "vms").glob("*/meta.json"),
    ]
    for meta in metas:
        found = json.loads(meta.read_text())
        pid = found.get("init_pid", found.get("pid"))
        if isinstance(pid, int):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    shutil.rmtree(_vm_run_dir_of(data), ignore_errors=True)
    rootfs_dir = ContainerRuntime(data, Path("/nonexistent")).mount_dir
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in reversed(points):  # the topmost first: overlays, then disks, then the pool
        if point.startswith((f"{rootfs_dir}/", f"{data}/")):
            unmount(Path(point))


def _vm_run_dir_of(data: Path) -> Path:
    from corral.runtime.microvm import MicroVMRuntime

    return MicroVMRuntime(data, Path("/nonexistent"), accel="tcg")._run


def test_microvm_memory_survives_a_restart_and_a_reboot(tmp_path: Path) -> None:
    """A hibernated microvm and a memory snapshot carry their processes through a server crash
    and a host reboot; a microvm that was running at the reboot comes back with its disk."""
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    vm = {"template": "minimal", "isolation": "microvm", "vcpus": 1, "memory_mb": 256}
    with own_server(tmp_path) as own:
        with own.server.client(timeout=180) as c:
            made = {}
            for kind in ("asleep", "running"):
                r = c.post("/v1/sandboxes", json={**vm, "timeout": 900})
                assert r.status_code == 201, r.text
                made[kind] = sid = r.json()["id"]
                # synced: a host going down takes what a guest had not written back, as power loss would
                exec_stdout(c, sid, f"echo {kind} > /root/k; sync; {MEMORY_COUNTER}")
            time.sleep(0.3)
            counted, pid = exec_stdout(c, made["asleep"], "cat /run/mem/n").split()
            r = c.post(f"/v1/sandboxes/{made['asleep']}/snapshots")
            assert r.status_code == 201, r.text
            snap = r.json()["id"]
            assert c.post(f"/v1/sandboxes/{made['asleep']}/hibernate").status_code == 200
        data = own.server.data_dir
        server = own.restart(hard=True, between=lambda: _simulate_reboot(data))
        with server.client(timeout=180) as c:
            for sid in made.values():
                assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "hibernated"
            # Woken from its saved memory: the same process, counting on.
            value, same = exec_stdout(c, made["asleep"], "cat /run/mem/n").split()
            assert same == pid and int(value) >= int(counted)
            # Its memory died with the host: it boots from its disk.
            out = exec_stdout(c, made["running"], "cat /root/k; cat /run/mem/n 2>&1 || true")
            assert out.startswith("running\n") and "No such file" in out
            r = c.post(f"/v1/snapshots/{snap}/fork")
            assert r.status_code == 201, r.text
            fork = r.json()[0]["id"]
            value, same = exec_stdout(c, fork, "cat /run/mem/n").split()
            assert same == pid and int(value) >= int(counted)


def test_after_a_reboot_disks_and_snapshots_are_still_there(tmp_path: Path) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with own_server(tmp_path) as own:
        with own.server.client() as c:
            made = {}
            for kind in ("running", "hibernated"):
                sid = c.post("/v1/sandboxes", json={"template": "minimal"}).json()["id"]
                c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": f"echo {kind} > /root/k"}).read()
                made[kind] = sid
            snap = c.post(f"/v1/sandboxes/{made['running']}/snapshots").json()["id"]
            assert c.post(f"/v1/sandboxes/{made['hibernated']}/hibernate").status_code == 200
        data = own.server.data_dir
        server = own.restart(hard=True, between=lambda: _simulate_reboot(data))
        with server.client() as c:
            for kind, sid in made.items():
                # A sandbox that was running comes back hibernated: its disk, not its processes.
                assert c.get(f"/v1/sandboxes/{sid}").json()["state"] == "hibernated"
                r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "cat /root/k"})  # wakes it
                assert base64.b64encode(f"{kind}\n".encode()).decode() in r.text
            r = c.post(f"/v1/snapshots/{snap}/fork")
            assert r.status_code == 201, r.text
            fork = r.json()[0]["id"]
            r = c.post(f"/v1/sandboxes/{fork}/exec", json={"cmd": "cat /root/k"})
            assert base64.b64encode(b"running\n").decode() in r.text
