"""kill -9 of the server in the middle of a snapshot, a fork or a restore, in a loop, in each
tier: after a restart the sandbox is whole (running or hibernated, its files as before or as
the snapshot), every recorded snapshot has its data and no data is unrecorded, no half-made
sandbox is left, and at the end nothing is left on the host."""

from __future__ import annotations

import functools
import random
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import RUN_CORRAL, LeakWatch, container_skip_reason, microvm_skip_reason
from tests.integration.server_harness import RunningServer, exec_stdout, own_server

pytestmark = pytest.mark.integration

ROUNDS = 5


def _fire(server: RunningServer, method: str, path: str, body: object) -> threading.Thread:
    def send() -> None:
        try:
            with server.client(timeout=30) as c:
                c.request(method, path, json=body)
        except httpx.HTTPError:
            pass  # the server died under it, as intended

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def _check_consistent(server: RunningServer, src: str, allowed: set[str], tier: str) -> None:
    data = server.data_dir
    with server.client(timeout=180) as c:
        state = c.get(f"/v1/sandboxes/{src}").json()["state"]
        assert state in ("running", "hibernated"), state
        # An exec wakes a hibernated sandbox; its disk is one whole version or the other.
        assert exec_stdout(c, src, "cat /root/v").strip() in allowed
        snaps = {s["id"] for s in c.get("/v1/snapshots").json()}
        live = {s["id"] for s in c.get("/v1/sandboxes").json()}
        assert {s["state"] for s in c.get("/v1/sandboxes").json()} <= {"running", "hibernated"}
        if tier == "container":
            on_disk = {p.stem for p in (data / "pool" / "snapshots").glob("*.img")}
            assert not list((data / "pool" / "snapshots").glob(".*"))
            assert {p.name for p in (data / "sandboxes").iterdir()} == live
            assert {p.stem for p in (data / "pool" / "disks").glob("*.img")} == live
        else:
            on_disk = {p.name for p in (data / "pool" / "vm-snapshots").iterdir()}
            assert all((data / "pool" / "vm-snapshots" / s / "state").is_file() for s in on_disk)
            assert {p.name for p in (data / "pool" / "vms").iterdir()} == live
        assert snaps == on_disk
        for sid in live - {src}:  # forks that made it: fine, but keep the host small
            assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204


@pytest.mark.parametrize("tier", ["container", "microvm"])
def test_kill_9_mid_operation_leaves_previous_state_and_no_leak(
    no_leaks: LeakWatch, tmp_path: Path, tier: str
) -> None:
    # no_leaks first: tmp_path, made after its first look, is then this test's own.
    why = container_skip_reason() if tier == "container" else microvm_skip_reason()
    if why:
        pytest.skip(why)
    no_leaks.watch(RUN_CORRAL)
    rng = random.Random(4)
    body: dict[str, object] = {"template": "minimal", "timeout": 3600}
    # A VM's operations take longer (its memory is saved and loaded): a wider window to die in,
    # and fewer rounds.
    window, rounds = (0.25, ROUNDS) if tier == "container" else (0.8, 3)
    if tier == "microvm":
        body.update(isolation="microvm", vcpus=1, memory_mb=256)
    with own_server(tmp_path) as own:
        with own.server.client(timeout=180) as c:
            src = c.post("/v1/sandboxes", json=body).json()["id"]
            exec_stdout(c, src, "echo base > /root/v")
            r = c.post(f"/v1/sandboxes/{src}/snapshots", json={"name": "base"})
            assert r.status_code == 201, r.text
            base = r.json()["id"]
        ops = [
            ("POST", f"/v1/sandboxes/{src}/snapshots", None),
            ("POST", f"/v1/snapshots/{base}/fork", {"count": 2}),
            ("POST", f"/v1/sandboxes/{src}/restore", {"snapshot": base}),
        ]
        for i in range(rounds):
            for method, path, op_body in ops:
                with own.server.client(timeout=180) as c:
                    exec_stdout(c, src, f"echo r{i} > /root/v; sync")
                sender = _fire(own.server, method, path, op_body)
                threading.Event().wait(rng.uniform(0.0, window))
                server = own.restart(hard=True, between=functools.partial(sender.join, 30))
                _check_consistent(server, src, {f"r{i}", "base"}, tier)
