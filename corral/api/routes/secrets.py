"""Tenant secrets: set, list, inspect and delete. Values are write-only: no route answers one,
and a secret's value leaves the server only toward the hosts a sandbox binding names."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel

from corral.api.deps import Caller, Svc
from corral.core.commands import PutSecret
from corral.core.secrets import SecretInfo

router = APIRouter(prefix="/v1/secrets", tags=["secrets"])


class SecretOut(BaseModel):
    name: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, info: SecretInfo) -> SecretOut:
        return cls(name=info.name, created_at=info.created_at, updated_at=info.updated_at)


class SecretList(BaseModel):
    secrets: list[SecretOut]


@router.put("/{name}")
async def put_secret(name: str, cmd: PutSecret, who: Caller, svc: Svc) -> SecretOut:
    """Create the secret or replace its value; answers its name and times, never the value."""
    return SecretOut.of(await svc.secrets.put(who.tenant_id, name, cmd.value))


@router.get("")
async def list_secrets(who: Caller, svc: Svc) -> SecretList:
    """The caller's tenant's secrets by name."""
    return SecretList(secrets=[SecretOut.of(s) for s in await svc.secrets.list(who.tenant_id)])


@router.get("/{name}")
async def get_secret(name: str, who: Caller, svc: Svc) -> SecretOut:
    return SecretOut.of(await svc.secrets.info(who.tenant_id, name))


@router.delete("/{name}", status_code=204)
async def delete_secret(name: str, who: Caller, svc: Svc) -> Response:
    """Delete the secret; sandboxes bound to it can no longer have it injected."""
    await svc.secrets.delete(who.tenant_id, name)
    return Response(status_code=204)
