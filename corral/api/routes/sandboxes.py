"""Sandbox lifecycle routes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from corral.api.deps import Caller, Svc
from corral.api.schemas import EgressEventOut, NetworkOut, SandboxOut
from corral.core import SandboxState
from corral.core.commands import CreateSandbox, SetTimeout
from corral.core.sandboxes import Sandbox
from corral.core.services import Services
from corral.errors import InvalidRequestError

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])


def sandbox_out(svc: Services, sb: Sandbox) -> SandboxOut:
    proxy = svc.network.proxy_url if svc.network is not None else None
    return SandboxOut.of(
        sb,
        proxy=proxy,
        ingress_domain=svc.config.network.ingress_domain,
        pool=svc.pools.name_of(sb.pool),
    )


@router.post("", status_code=201)
async def create_sandbox(cmd: CreateSandbox, who: Caller, svc: Svc) -> SandboxOut:
    if cmd.snapshot is not None:
        return sandbox_out(svc, await svc.snapshots.create_from(who, cmd))
    return sandbox_out(svc, await svc.pools.create(who, cmd))


def _parse_filters(
    state: list[str] | None, metadata: list[str] | None
) -> tuple[list[SandboxState] | None, dict[str, str]]:
    states: list[SandboxState] | None = None
    if state:
        try:
            states = [SandboxState(s) for s in state]
        except ValueError:
            known = ", ".join(s.value for s in SandboxState)
            raise InvalidRequestError(f"unknown state in {state}; known: {known}") from None
    meta: dict[str, str] = {}
    for item in metadata or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InvalidRequestError(f"metadata filter must be key=value, got {item!r}")
        meta[k] = v
    return states, meta


@router.get("")
async def list_sandboxes(
    who: Caller,
    svc: Svc,
    state: Annotated[list[str] | None, Query()] = None,
    metadata: Annotated[list[str] | None, Query()] = None,
) -> list[SandboxOut]:
    states, meta = _parse_filters(state, metadata)
    return [
        sandbox_out(svc, s) for s in await svc.sandboxes.list(who, states=states, metadata=meta)
    ]


@router.get("/{sandbox_id}")
async def get_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> SandboxOut:
    return sandbox_out(svc, await svc.sandboxes.get(who, sandbox_id))


@router.post("/{sandbox_id}/timeout")
async def set_timeout(sandbox_id: str, cmd: SetTimeout, who: Caller, svc: Svc) -> SandboxOut:
    return sandbox_out(svc, await svc.sandboxes.set_timeout(who, sandbox_id, cmd.timeout))


@router.post("/{sandbox_id}/pause")
async def pause_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> SandboxOut:
    """Freeze every process (no CPU, memory kept); 409 if already paused."""
    return sandbox_out(svc, await svc.sandboxes.pause(who, sandbox_id))


@router.post("/{sandbox_id}/hibernate")
async def hibernate_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> SandboxOut:
    """Stop every process and free memory, keeping the disk; 409 if already hibernated."""
    return sandbox_out(svc, await svc.sandboxes.hibernate(who, sandbox_id))


@router.post("/{sandbox_id}/resume")
async def resume_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> SandboxOut:
    """Thaw a paused sandbox or wake a hibernated one; a running one is answered as it is."""
    return sandbox_out(svc, await svc.sandboxes.resume(who, sandbox_id))


@router.delete("/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> Response:
    await svc.sandboxes.kill(who, sandbox_id)
    return Response(status_code=204)


@router.get("/{sandbox_id}/network")
async def get_network(sandbox_id: str, who: Caller, svc: Svc) -> NetworkOut:
    out = sandbox_out(svc, await svc.sandboxes.get(who, sandbox_id))
    if out.network is None:
        raise InvalidRequestError(f"sandbox {sandbox_id} has no network")
    return out.network


@router.patch("/{sandbox_id}/network")
async def update_network(
    sandbox_id: str, who: Caller, svc: Svc, policy: Annotated[dict[str, Any], Body()]
) -> NetworkOut:
    """Replace the network policy (the same document as ``network`` at create)."""
    sb = await svc.sandboxes.update_network(who, sandbox_id, policy)
    out = sandbox_out(svc, sb)
    assert out.network is not None
    return out.network


@router.get("/{sandbox_id}/network/log")
async def network_log(
    sandbox_id: str,
    who: Caller,
    svc: Svc,
    after: Annotated[int, Query(ge=0, description="id of the last event already seen")] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[EgressEventOut]:
    rows = await svc.sandboxes.network_log(who, sandbox_id, after_id=after, limit=limit)
    return [EgressEventOut(**r) for r in rows]
