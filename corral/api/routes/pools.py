"""Warm pool routes: set (create or resize), list, inspect, delete a tenant's pools."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.api.deps import Caller, Svc
from corral.api.schemas import PoolOut
from corral.core.commands import SetPool

router = APIRouter(prefix="/v1/pools", tags=["pools"])


@router.put("/{name}")
async def set_pool(name: str, cmd: SetPool, who: Caller, svc: Svc) -> PoolOut:
    """Keep ``size`` sandboxes of this template and shape ready; replaces the pool's settings."""
    return PoolOut.of(await svc.pools.set(who, name, cmd))


@router.get("")
async def list_pools(who: Caller, svc: Svc) -> list[PoolOut]:
    return [PoolOut.of(p) for p in await svc.pools.list(who)]


@router.get("/{name}")
async def get_pool(name: str, who: Caller, svc: Svc) -> PoolOut:
    return PoolOut.of(await svc.pools.get(who, name))


@router.delete("/{name}", status_code=204)
async def delete_pool(name: str, who: Caller, svc: Svc) -> Response:
    await svc.pools.delete(who, name)
    return Response(status_code=204)
