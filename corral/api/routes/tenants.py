"""Tenants, API keys and the caller's own identity."""

from __future__ import annotations

from fastapi import APIRouter, Response

from corral.api.deps import Admin, Caller, Svc
from corral.api.schemas import KeyOut, MeOut, TenantOut
from corral.core.commands import CreateKey, CreateTenant

router = APIRouter(prefix="/v1", tags=["tenants"])


@router.get("/me")
async def me(who: Caller) -> MeOut:
    return MeOut(tenant_id=who.tenant_id, admin=who.admin)


@router.post("/tenants", status_code=201)
async def create_tenant(cmd: CreateTenant, _who: Admin, svc: Svc) -> TenantOut:
    t = await svc.tenants.create_tenant(cmd)
    return TenantOut(id=t.id, name=t.name, created_at=t.created_at)


@router.get("/tenants")
async def list_tenants(_who: Admin, svc: Svc) -> list[TenantOut]:
    return [
        TenantOut(id=t.id, name=t.name, created_at=t.created_at)
        for t in await svc.tenants.list_tenants()
    ]


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(tenant_id: str, cmd: CreateKey, _who: Admin, svc: Svc) -> KeyOut:
    k = await svc.tenants.create_key(tenant_id, cmd)
    return KeyOut(id=k.id, tenant_id=k.tenant_id, name=k.name, key=k.key)


@router.delete("/keys/{key_id}", status_code=204)
async def delete_key(key_id: str, _who: Admin, svc: Svc) -> Response:
    await svc.tenants.delete_key(key_id)
    return Response(status_code=204)
