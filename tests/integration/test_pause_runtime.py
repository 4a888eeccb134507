"""Pausing a container sandbox freezes every process (no CPU used, state kept), resuming
continues exactly where it stopped, a paused sandbox can still be destroyed at once, and
hibernating keeps only the disk, from which wake starts it again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from corral.agent import AgentClient, ExecRequest
from corral.errors import ConflictError, SandboxNotRunningError
from corral.runtime import ContainerRuntime, SandboxSpec
from tests.conftest import requires_container, sandbox_run

pytestmark = [pytest.mark.integration, requires_container]

SPIN = ["/bin/sh", "-c", "while :; do :; done"]


async def test_pause_freezes_cpu_and_resume_continues(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    await rt.create(SandboxSpec("it-pause", (minimal_rootfs,), cpu=0.5))
    try:
        agent = AgentClient(lambda: rt.open_agent("it-pause"))
        await agent.spawn(ExecRequest(argv=SPIN))  # a background process, as exec(background)
        await asyncio.sleep(0.5)
        busy_before = await rt.cpu_seconds("it-pause")
        await asyncio.sleep(0.5)
        assert await rt.cpu_seconds("it-pause") > busy_before + 0.05  # it really spins

        await rt.pause("it-pause")
        frozen = await rt.cpu_seconds("it-pause")
        await asyncio.sleep(1.0)
        assert await rt.cpu_seconds("it-pause") - frozen < 0.01  # no CPU at all while paused
        assert await rt.is_running("it-pause")  # paused is still alive

        await rt.resume("it-pause")
        await asyncio.sleep(0.5)
        assert await rt.cpu_seconds("it-pause") > frozen + 0.05
        res = await sandbox_run(rt, "it-pause", ["/bin/echo", "awake"])
        assert res.out == "awake\n"
        await rt.pause("it-pause")  # destroy must not wait on frozen tasks
    finally:
        started = time.monotonic()
        await rt.destroy("it-pause")
        assert time.monotonic() - started < 4.0
    assert not await rt.is_running("it-pause")


async def test_pause_of_a_missing_sandbox_is_not_running(
    container_runtime: ContainerRuntime,
) -> None:
    with pytest.raises(SandboxNotRunningError):
        await container_runtime.pause("it-none")
    with pytest.raises(SandboxNotRunningError):
        await container_runtime.resume("it-none")


async def test_hibernate_frees_everything_but_the_disk_and_wake_restores_it(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    spec = SandboxSpec("it-hib", (minimal_rootfs,))
    await rt.create(spec)
    try:
        res = await sandbox_run(rt, "it-hib", ["/bin/sh", "-c", "echo kept > /root/file"])
        assert res.exit_code == 0, res
        agent = AgentClient(lambda: rt.open_agent("it-hib"))
        await agent.spawn(ExecRequest(argv=["/bin/sleep", "1000"]))
        with pytest.raises(ConflictError):
            await rt.wake(spec)  # it is running, not hibernated

        await rt.hibernate("it-hib")
        assert not await rt.is_running("it-hib")
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(rt.mount_dir / "it-hib") not in mounts  # root filesystem gone
        assert "/sandboxes/it-hib/disk " not in mounts  # disk unmounted (loop device freed)
        assert (rt.data_dir / "pool" / "disks" / "it-hib.img").exists()  # disk kept
        assert "it-hib" in await rt.list_sandboxes()
        with pytest.raises(SandboxNotRunningError):
            await rt.open_agent("it-hib")

        await rt.wake(spec)
        res = await sandbox_run(rt, "it-hib", ["/bin/sh", "-c", "cat /root/file; ps -o comm"])
        assert res.out.startswith("kept\n"), res
        assert "sleep" not in res.out  # processes did not survive: that is what hibernate means
    finally:
        await rt.destroy("it-hib")
    assert "it-hib" not in await rt.list_sandboxes()
