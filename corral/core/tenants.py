"""Tenants and API keys: who is calling, and which objects they may see."""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from corral.core.commands import CreateKey, CreateTenant
from corral.errors import AuthenticationError, ConflictError, NotFoundError
from corral.store import ApiKeyRow, Store, TenantRow

__all__ = ["ADMIN_TENANT", "IssuedKey", "Principal", "TenantService"]

ADMIN_TENANT = "admin"


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    admin: bool
    key_id: str


@dataclass(frozen=True)
class IssuedKey:
    id: str
    tenant_id: str
    name: str
    key: str


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _new_key() -> str:
    return "ck_" + secrets.token_urlsafe(32)


class TenantService:
    def __init__(self, store: Store) -> None:
        self._store = store
        # Keys are checked on every request (exec latency matters); a hit avoids the database.
        self._cache: dict[str, Principal] = {}

    async def ensure_admin(self, key_path: Path) -> None:
        """Create the admin tenant and key on first start; keep the key file and store in step."""
        if await self._store.get_tenant(ADMIN_TENANT) is None:
            await self._store.add_tenant(
                TenantRow(id=ADMIN_TENANT, name=ADMIN_TENANT, created_at=datetime.now(UTC))
            )
        if key_path.exists():
            key = key_path.read_text().strip()
        else:
            key = _new_key()
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
        if await self._store.key_by_hash(_hash(key)) is None:
            await self._store.add_key(
                ApiKeyRow(
                    id="key-admin-" + secrets.token_hex(4),
                    tenant_id=ADMIN_TENANT,
                    name="admin",
                    key_hash=_hash(key),
                    admin=1,
                    created_at=datetime.now(UTC),
                )
            )

    async def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise AuthenticationError(
                "missing API key: send 'Authorization: Bearer <key>' (the admin key is in the data dir's admin.key)"
            )
        h = _hash(key)
        hit = self._cache.get(h)
        if hit is not None:
            return hit
        row = await self._store.key_by_hash(h)
        if row is None:
            raise AuthenticationError("unknown API key")
        p = Principal(tenant_id=row.tenant_id, admin=bool(row.admin), key_id=row.id)
        self._cache[h] = p
        return p

    async def create_tenant(self, cmd: CreateTenant) -> TenantRow:
        if await self._store.tenant_by_name(cmd.name) is not None:
            raise ConflictError(f"tenant {cmd.name!r} already exists")
        row = TenantRow(id=cmd.name, name=cmd.name, created_at=datetime.now(UTC))
        await self._store.add_tenant(row)
        return row

    async def list_tenants(self) -> list[TenantRow]:
        return list(await self._store.list_tenants())

    async def create_key(self, tenant_id: str, cmd: CreateKey) -> IssuedKey:
        if await self._store.get_tenant(tenant_id) is None:
            raise NotFoundError(f"no tenant {tenant_id!r}")
        key = _new_key()
        row = ApiKeyRow(
            id="key-" + secrets.token_hex(6),
            tenant_id=tenant_id,
            name=cmd.name,
            key_hash=_hash(key),
            admin=0,
            created_at=datetime.now(UTC),
        )
        await self._store.add_key(row)
        return IssuedKey(id=row.id, tenant_id=tenant_id, name=cmd.name, key=key)

    async def delete_key(self, key_id: str) -> None:
        if await self._store.get_key(key_id) is None:
            raise NotFoundError(f"no API key {key_id!r}")
        await self._store.delete_key(key_id)
        self._cache = {h: p for h, p in self._cache.items() if p.key_id != key_id}
