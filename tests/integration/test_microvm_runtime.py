"""A microvm sandbox runs its own kernel (not the host's) with the agent as its init, carries many
concurrent agent streams intact over one virtio-serial port, stops using CPU when paused, keeps
QEMU inside its cgroup limits, starts as a clone of a warm template with its own name,
environment, clock, entropy and disk, and is gone without a trace when destroyed, when QEMU is
killed, or when its guest fails to boot."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.runtime import MicroVMRuntime, SandboxSpec
from tests.conftest import LeakWatch, microvm_skip_reason, sandbox_put, sandbox_run

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def vm_data_dir(tmp_path_factory: pytest.TempPathFactory, agent_binary: Path) -> Iterator[Path]:
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    data = tmp_path_factory.mktemp("vm-data")
    yield data
    asyncio.run(MicroVMRuntime(data, agent_binary).purge())


@pytest.fixture
async def vm_runtime(
    vm_data_dir: Path, agent_binary: Path, no_leaks: LeakWatch
) -> AsyncIterator[MicroVMRuntime]:
    rt = MicroVMRuntime(vm_data_dir, agent_binary)
    try:
        yield rt
    finally:
        await rt.close()


def _spec(sid: str, rootfs: Path, **kw: object) -> SandboxSpec:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GREETING": "hello there"}
    return SandboxSpec(sid, (rootfs,), hostname=sid, env=env, disk_mb=1024, **kw)  # type: ignore[arg-type]


async def test_own_kernel_agent_as_init_and_many_streams(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-basic", minimal_rootfs))
    try:
        res = await sandbox_run(
            rt,
            "vm-basic",
            ["/bin/sh", "-c", "uname -r; hostname; echo $GREETING; cat /proc/1/comm"],
        )
        kernel, host, greeting, init = res.out.splitlines()
        assert kernel != platform.release() and kernel.endswith("-cloud-amd64")
        assert (host, greeting, init) == ("vm-basic", "hello there", "agent")
        # Many streams at once through the one port, each intact.
        payload = os.urandom(3 << 20)
        await sandbox_put(rt, "vm-basic", "/root/blob", payload, 0o644)
        digest = hashlib.sha256(payload).hexdigest()
        results = await asyncio.gather(
            *(
                sandbox_run(rt, "vm-basic", ["/bin/sh", "-c", f"sha256sum /root/blob; echo {i}"])
                for i in range(8)
            ),
            sandbox_run(rt, "vm-basic", ["/bin/cat", "/root/blob"]),
        )
        for i, r in enumerate(results[:8]):
            assert r.out.split() == [digest, "/root/blob", str(i)]
        assert results[8].stdout == payload
    finally:
        await rt.destroy("vm-basic")
    assert not await rt.is_running("vm-basic")
    assert await rt.list_sandboxes() == []


async def test_pause_stops_the_vcpus(vm_runtime: MicroVMRuntime, minimal_rootfs: Path) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-pause", minimal_rootfs))
    try:
        from corral.agent import AgentClient, ExecRequest

        await AgentClient(lambda: rt.open_agent("vm-pause")).spawn(
            ExecRequest(argv=["/bin/sh", "-c", "while :; do :; done"])
        )
        await rt.pause("vm-pause")
        frozen = await rt.cpu_seconds("vm-pause")
        await asyncio.sleep(1.0)
        assert await rt.cpu_seconds("vm-pause") - frozen < 0.05
        await rt.resume("vm-pause")
        assert (await sandbox_run(rt, "vm-pause", ["/bin/echo", "awake"])).out == "awake\n"
    finally:
        await rt.destroy("vm-pause")


async def test_killed_qemu_is_not_running_and_destroy_cleans(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-kill", minimal_rootfs))
    pid = json.loads((rt.data_dir / "vms" / "vm-kill" / "meta.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not await rt.is_running("vm-kill"):
            break
        await asyncio.sleep(0.01)
    assert not await rt.is_running("vm-kill")
    await rt.destroy("vm-kill")
    assert await rt.list_sandboxes() == []


async def test_a_guest_that_cannot_boot_fails_create_and_leaves_nothing(
    vm_runtime: MicroVMRuntime, tmp_path: Path
) -> None:
    rt = vm_runtime
    rt.warm = False  # a cold boot: a warm clone would resume the template's page cache
    rootfs = tmp_path / "broken" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs / "hello").write_text("no init, no shell")
    await rt.create(_spec("vm-ok", rootfs))  # boots: the agent comes from the initramfs
    await rt.destroy("vm-ok")
    images = list((rt.data_dir / "vm-cache").glob("broken-*.ext4"))
    assert len(images) == 1
    with open(images[0], "r+b") as f:  # wreck the superblock: the guest cannot mount its root
        f.seek(1024)
        f.write(b"\0" * 1024)
    with pytest.raises(RuntimeFailure, match="exited while booting"):
        await rt.create(_spec("vm-bad", rootfs))
    assert await rt.list_sandboxes() == []
    images[0].unlink()


async def test_unsupported_requests_are_refused(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    with pytest.raises(InvalidRequestError, match="snapshot"):
        await rt.create(_spec("vm-snap", minimal_rootfs, snapshot="snap-x"))
    with pytest.raises(InvalidRequestError, match="one layer"):
        await rt.create(SandboxSpec("vm-layers", (minimal_rootfs, minimal_rootfs)))
    with pytest.raises(InvalidRequestError, match="snapshots"):
        await rt.snapshot("vm-none", "snap-y")
    assert await rt.list_sandboxes() == []


async def test_qemu_runs_inside_its_cgroup_limits(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-cg", minimal_rootfs, memory_mb=256))
    meta = json.loads((rt.data_dir / "vms" / "vm-cg" / "meta.json").read_text())
    dirs = [Path(d) for d in meta["cgroups"]]
    try:
        memory = next(d for d in dirs if (d / "memory.limit_in_bytes").exists())
        assert int((memory / "memory.limit_in_bytes").read_text()) == (256 + 192) * 1024**2
        assert str(meta["pid"]) in (memory / "cgroup.procs").read_text().split()
        pids = next(d for d in dirs if (d / "pids.max").exists())
        assert (pids / "pids.max").read_text().strip() == "256"
    finally:
        await rt.destroy("vm-cg")
    assert not any(d.exists() for d in dirs)


async def test_warm_clones_are_separate_machines(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    """Clones of one warm template: each its own name, environment, clock, entropy and disk."""
    rt = vm_runtime
    script = "hostname; echo $GREETING; date +%s; head -c 16 /dev/urandom | od -An -tx1"
    outs = []
    try:
        for sid in ("vm-c1", "vm-c2"):
            spec = _spec(sid, minimal_rootfs)
            await rt.create(replace(spec, env={**spec.env, "GREETING": sid}))
            assert "restore" in rt.last_create_timings  # a clone, not a boot
            outs.append((await sandbox_run(rt, sid, ["/bin/sh", "-c", script])).out.splitlines())
        await sandbox_run(rt, "vm-c1", ["/bin/sh", "-c", "echo mine > /root/only-c1"])
        assert (await sandbox_run(rt, "vm-c2", ["/bin/ls", "/root"])).out == ""
    finally:
        for sid in ("vm-c1", "vm-c2"):
            await rt.destroy(sid)
    (n1, g1, t1, r1), (n2, g2, t2, r2) = outs
    assert (n1, g1, n2, g2) == ("vm-c1", "vm-c1", "vm-c2", "vm-c2")
    assert abs(int(t1) - time.time()) < 30 and abs(int(t2) - time.time()) < 30
    assert r1 != r2  # every clone starts from the template's RNG state unless reseeded
