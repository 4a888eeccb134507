"""Sandbox lifecycle routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from corral.api.deps import Caller, Svc
from corral.api.schemas import SandboxOut
from corral.core import SandboxState
from corral.core.commands import CreateSandbox, SetTimeout
from corral.errors import InvalidRequestError

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])


@router.post("", status_code=201)
async def create_sandbox(cmd: CreateSandbox, who: Caller, svc: Svc) -> SandboxOut:
    return SandboxOut.of(await svc.sandboxes.create(who, cmd))


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
    return [SandboxOut.of(s) for s in await svc.sandboxes.list(who, states=states, metadata=meta)]


@router.get("/{sandbox_id}")
async def get_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> SandboxOut:
    return SandboxOut.of(await svc.sandboxes.get(who, sandbox_id))


@router.post("/{sandbox_id}/timeout")
async def set_timeout(sandbox_id: str, cmd: SetTimeout, who: Caller, svc: Svc) -> SandboxOut:
    return SandboxOut.of(await svc.sandboxes.set_timeout(who, sandbox_id, cmd.timeout))


@router.delete("/{sandbox_id}", status_code=204)
async def kill_sandbox(sandbox_id: str, who: Caller, svc: Svc) -> Response:
    await svc.sandboxes.kill(who, sandbox_id)
    return Response(status_code=204)
