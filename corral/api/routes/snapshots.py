"""Snapshot routes: take, list, delete; restore a sandbox to one; fork sandboxes from one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from corral.api.deps import Caller, Svc
from corral.api.routes.sandboxes import sandbox_out
from corral.api.schemas import SandboxOut, SnapshotOut
from corral.core.commands import ForkSnapshot, RestoreSnapshot, TakeSnapshot

router = APIRouter(tags=["snapshots"])


@router.post("/v1/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def take_snapshot(
    sandbox_id: str, who: Caller, svc: Svc, cmd: TakeSnapshot | None = None
) -> SnapshotOut:
    """Capture the sandbox's filesystem now, without stopping it."""
    name = cmd.name if cmd is not None else None
    return SnapshotOut.of(await svc.snapshots.take(who, sandbox_id, name))


@router.get("/v1/sandboxes/{sandbox_id}/snapshots")
async def sandbox_snapshots(sandbox_id: str, who: Caller, svc: Svc) -> list[SnapshotOut]:
    return [SnapshotOut.of(s) for s in await svc.snapshots.of_sandbox(who, sandbox_id)]


@router.post("/v1/sandboxes/{sandbox_id}/restore")
async def restore_sandbox(
    sandbox_id: str, cmd: RestoreSnapshot, who: Caller, svc: Svc
) -> SandboxOut:
    """Bring the sandbox's files back to a snapshot; its processes start afresh."""
    return sandbox_out(svc, await svc.snapshots.restore(who, sandbox_id, cmd.snapshot))


@router.get("/v1/snapshots")
async def list_snapshots(
    who: Caller, svc: Svc, sandbox_id: Annotated[str | None, Query()] = None
) -> list[SnapshotOut]:
    return [SnapshotOut.of(s) for s in await svc.snapshots.list(who, sandbox_id)]


@router.get("/v1/snapshots/{snapshot_id}")
async def get_snapshot(snapshot_id: str, who: Caller, svc: Svc) -> SnapshotOut:
    return SnapshotOut.of(await svc.snapshots.get(who, snapshot_id))


@router.delete("/v1/snapshots/{snapshot_id}", status_code=204)
async def delete_snapshot(snapshot_id: str, who: Caller, svc: Svc) -> Response:
    await svc.snapshots.delete(who, snapshot_id)
    return Response(status_code=204)


@router.post("/v1/snapshots/{snapshot_id}/fork", status_code=201)
async def fork_snapshot(
    snapshot_id: str, who: Caller, svc: Svc, cmd: ForkSnapshot | None = None
) -> list[SandboxOut]:
    """Start ``count`` independent sandboxes from the snapshot (all or none)."""
    made = await svc.snapshots.fork(who, snapshot_id, cmd or ForkSnapshot())
    return [sandbox_out(svc, sb) for sb in made]
