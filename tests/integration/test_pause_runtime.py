"""Pausing a container sandbox freezes every process (no CPU used, state kept), resuming
continues exactly where it stopped, and a paused sandbox can still be destroyed at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from corral.agent import AgentClient, ExecRequest
from corral.errors import SandboxNotRunningError
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
