"""An operation that waited for a sandbox's lock while a kill ran finds it stopped and fails,
instead of bringing a stopped sandbox back to life in the cache or the store."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from corral.config import ServerConfig
from corral.core.commands import CreateSandbox
from corral.core.sandboxes import SandboxService
from corral.core.tenants import Principal
from corral.errors import SandboxNotRunningError
from corral.runtime.base import SandboxSpec
from corral.store import Store, TenantRow
from tests.unit.template_service import builtin_templates


class FakeRuntime:
    """Just enough of a runtime: sandboxes are names in a set; destroy can be held back."""

    name = "container"

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.gate: asyncio.Event | None = None

    async def create(self, spec: SandboxSpec) -> None:
        self.alive.add(spec.sandbox_id)

    async def destroy(self, sandbox_id: str) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.alive.discard(sandbox_id)

    async def hibernate(self, sandbox_id: str, *, keep_memory: bool = True) -> None:
        if sandbox_id not in self.alive:
            raise SandboxNotRunningError("not on host")

    async def pause(self, sandbox_id: str) -> None: ...

    async def resume(self, sandbox_id: str) -> None: ...

    async def is_running(self, sandbox_id: str) -> bool:
        return sandbox_id in self.alive

    async def list_sandboxes(self) -> list[str]:
        return sorted(self.alive)


@pytest.mark.parametrize("op", ["set_timeout", "hibernate", "pause", "resume"])
async def test_an_operation_queued_behind_kill_finds_it_stopped(tmp_path: Path, op: str) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.migrate()
    await store.add_tenant(TenantRow(id="t", name="t", created_at=dt.datetime.now(dt.UTC)))
    runtime = FakeRuntime()
    config = ServerConfig(data_dir=tmp_path, network={"enabled": False})
    svc = SandboxService(config, store, runtime, builtin_templates(tmp_path), None)
    who = Principal("t", True, "k")
    try:
        sb = await svc.create(who, CreateSandbox())
        runtime.gate = asyncio.Event()
        lock = svc._locks.setdefault(sb.id, asyncio.Lock())
        await lock.acquire()  # some operation in flight
        kill = asyncio.create_task(svc.kill(who, sb.id))
        await asyncio.sleep(0)
        calls = {
            "set_timeout": lambda: svc.set_timeout(who, sb.id, 100),
            "hibernate": lambda: svc.hibernate(who, sb.id),
            "pause": lambda: svc.pause(who, sb.id),
            "resume": lambda: svc.resume(who, sb.id),
        }
        other = asyncio.create_task(calls[op]())
        await asyncio.sleep(0.01)
        lock.release()
        runtime.gate.set()
        killed, result = await asyncio.gather(kill, other, return_exceptions=True)
        assert killed is None
        assert isinstance(result, SandboxNotRunningError), result
        assert sb.id not in svc._live
        row = await store.get_sandbox(sb.id)
        assert row is not None and row.state == "stopped"
    finally:
        await store.close()
