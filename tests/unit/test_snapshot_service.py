"""The snapshot service keeps records and host data in step: a fork past the tenant's quota or
past the snapshot quota creates nothing, a fork that fails part way kills the ones it made, two
concurrent takes of one name leave one snapshot and a 409, and at start unrecorded images go
and records without an image are forgotten."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.config import ServerConfig
from corral.core.commands import CreateSandbox, ForkSnapshot
from corral.core.sandboxes import SandboxService
from corral.core.snapshots import SnapshotService
from corral.core.tenants import Principal
from corral.errors import ConflictError, QuotaExceededError, RuntimeFailure
from corral.runtime.base import SandboxSpec
from corral.store import Store, TenantRow
from tests.unit.template_service import builtin_templates


class FakeRuntime:
    """Sandboxes and snapshots are names in sets; the n-th create can be made to fail."""

    name = "container"

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.snaps: set[str] = set()
        self.fail_create_after: int | None = None

    async def create(self, spec: SandboxSpec) -> None:
        if self.fail_create_after is not None:
            if self.fail_create_after == 0:
                raise RuntimeFailure("no room")
            self.fail_create_after -= 1
        self.alive.add(spec.sandbox_id)

    async def destroy(self, sandbox_id: str) -> None:
        self.alive.discard(sandbox_id)

    async def is_running(self, sandbox_id: str) -> bool:
        return sandbox_id in self.alive

    async def list_sandboxes(self) -> list[str]:
        return sorted(self.alive)

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> int:
        self.snaps.add(snapshot_id)
        return 4096

    async def delete_snapshot(self, snapshot_id: str) -> None:
        self.snaps.discard(snapshot_id)

    async def list_snapshots(self) -> list[str]:
        return sorted(self.snaps)


@dataclass
class World:
    store: Store
    runtime: FakeRuntime
    sandboxes: SandboxService
    snapshots: SnapshotService
    who: Principal


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    store = Store(tmp_path / "db.sqlite")
    await store.migrate()
    await store.add_tenant(TenantRow(id="t", name="t", created_at=dt.datetime.now(dt.UTC)))
    runtime = FakeRuntime()
    config = ServerConfig(
        data_dir=tmp_path,
        network={"enabled": False},
        limits={"max_sandboxes_per_tenant": 3, "max_snapshots_per_tenant": 2},
    )
    sandboxes = SandboxService(config, store, runtime, builtin_templates(tmp_path), None)
    snapshots = SnapshotService(config, store, runtime, sandboxes)  # type: ignore[arg-type]
    try:
        yield World(store, runtime, sandboxes, snapshots, Principal("t", False, "k"))
    finally:
        await store.close()


async def test_fork_past_the_quota_creates_nothing(world: World) -> None:
    sb = await world.sandboxes.create(world.who, CreateSandbox())
    snap = await world.snapshots.take(world.who, sb.id, None)
    with pytest.raises(QuotaExceededError, match="limit of 3"):
        await world.snapshots.fork(world.who, snap.id, ForkSnapshot(count=3))
    assert world.runtime.alive == {sb.id}
    assert [s.id for s in await world.sandboxes.list(world.who)] == [sb.id]
    forks = await world.snapshots.fork(world.who, snap.id, ForkSnapshot(count=2))
    assert len(forks) == 2 and len(world.runtime.alive) == 3


async def test_snapshot_quota(world: World) -> None:
    sb = await world.sandboxes.create(world.who, CreateSandbox())
    await world.snapshots.take(world.who, sb.id, "a")
    await world.snapshots.take(world.who, sb.id, "b")
    with pytest.raises(QuotaExceededError, match="2 snapshots"):
        await world.snapshots.take(world.who, sb.id, "c")
    assert len(world.runtime.snaps) == 2


async def test_fork_failing_part_way_kills_what_it_made(world: World) -> None:
    sb = await world.sandboxes.create(world.who, CreateSandbox())
    snap = await world.snapshots.take(world.who, sb.id, None)
    world.runtime.fail_create_after = 1
    with pytest.raises(RuntimeFailure, match="no room"):
        await world.snapshots.fork(world.who, snap.id, ForkSnapshot(count=2))
    assert world.runtime.alive == {sb.id}
    assert [s.id for s in await world.sandboxes.list(world.who)] == [sb.id]


async def test_reconcile_drops_unrecorded_images_and_imageless_records(world: World) -> None:
    sb = await world.sandboxes.create(world.who, CreateSandbox())
    kept = await world.snapshots.take(world.who, sb.id, "kept")
    lost = await world.snapshots.take(world.who, sb.id, "lost")
    world.runtime.snaps.discard(lost.id)  # its image vanished
    world.runtime.snaps.add("snap-orphan")  # a crash after the copy, before the record
    await world.snapshots.reconcile()
    assert world.runtime.snaps == {kept.id}
    assert [s.id for s in await world.snapshots.list(world.who)] == [kept.id]


async def test_concurrent_takes_of_one_name_give_one_snapshot_and_a_409(world: World) -> None:
    sb = await world.sandboxes.create(world.who, CreateSandbox())
    results = await asyncio.gather(
        world.snapshots.take(world.who, sb.id, "same"),
        world.snapshots.take(world.who, sb.id, "same"),
        return_exceptions=True,
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    assert len(made) == 1
    assert [type(r) for r in results if isinstance(r, BaseException)] == [ConflictError]
    assert world.runtime.snaps == {made[0].id}  # the loser's copy is gone
