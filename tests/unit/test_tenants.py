"""API keys authenticate to exactly one tenant, are stored hashed, and the admin key is made once."""

import stat
from pathlib import Path

import pytest

from corral.core.commands import CreateKey, CreateTenant
from corral.core.tenants import ADMIN_TENANT, TenantService
from corral.errors import AuthenticationError, ConflictError, NotFoundError
from corral.store import Store


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Store(tmp_path / "corral.db")
    await s.migrate()
    yield s
    await s.close()


async def test_admin_key_written_once_0600_and_stable(store: Store, tmp_path: Path) -> None:
    svc = TenantService(store)
    key_path = tmp_path / "admin.key"
    await svc.ensure_admin(key_path)
    key = key_path.read_text().strip()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    await svc.ensure_admin(key_path)  # a restart keeps the same key
    assert key_path.read_text().strip() == key
    who = await svc.authenticate(key)
    assert who.tenant_id == ADMIN_TENANT and who.admin


async def test_keys_are_hashed_in_the_store(store: Store, tmp_path: Path) -> None:
    svc = TenantService(store)
    await svc.ensure_admin(tmp_path / "admin.key")
    await svc.create_tenant(CreateTenant(name="acme"))
    issued = await svc.create_key("acme", CreateKey(name="ci"))
    raw = (tmp_path / "corral.db").read_bytes()
    assert issued.key.encode() not in raw
    who = await svc.authenticate(issued.key)
    assert who.tenant_id == "acme" and not who.admin


async def test_bad_keys_and_deleted_keys_are_refused(store: Store, tmp_path: Path) -> None:
    svc = TenantService(store)
    await svc.ensure_admin(tmp_path / "admin.key")
    with pytest.raises(AuthenticationError, match="missing"):
        await svc.authenticate(None)
    with pytest.raises(AuthenticationError, match="unknown"):
        await svc.authenticate("ck_nope")
    await svc.create_tenant(CreateTenant(name="acme"))
    issued = await svc.create_key("acme", CreateKey())
    await svc.authenticate(issued.key)  # now cached
    await svc.delete_key(issued.id)
    with pytest.raises(AuthenticationError):
        await svc.authenticate(issued.key)


async def test_duplicate_tenant_and_unknown_tenant(store: Store, tmp_path: Path) -> None:
    svc = TenantService(store)
    await svc.create_tenant(CreateTenant(name="acme"))
    with pytest.raises(ConflictError):
        await svc.create_tenant(CreateTenant(name="acme"))
    with pytest.raises(NotFoundError):
        await svc.create_key("ghost", CreateKey())
