"""The secrets service seals values with AES-256-GCM bound to tenant and name (a moved, tampered or foreign-key row is a RuntimeFailure naming the secret, never garbage), keeps its key file 0600 and refuses an unsafe one, checks names, values and the per-tenant quota, invalidates its value cache on put and delete, and derives stable label-dependent keys."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from corral.core import secrets as secrets_mod
from corral.core.commands import SECRET_NAME, PutSecret
from corral.core.secrets import KEY_FILE, MAX_VALUE_CHARS, SecretInfo, SecretService
from corral.errors import InvalidRequestError, NotFoundError, QuotaExceededError, RuntimeFailure
from corral.store import Store, TenantRow
from corral.store.models import SecretRow

VALUE = "sk-live-5f1e0c9a-the-real-value"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path / "corral.db")
    await s.migrate()
    for tenant in ("t1", "t2"):
        await s.add_tenant(TenantRow(id=tenant, name=tenant, created_at=datetime.now(UTC)))
    yield s
    await s.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def svc(store: Store, data_dir: Path) -> SecretService:
    s = SecretService(store, data_dir)
    s.start()
    return s


def _restart(store: Store, data_dir: Path) -> SecretService:
    s = SecretService(store, data_dir)
    s.start()
    return s


# ------------------------------------------------------------------------- encryption


async def test_round_trip_and_what_info_says(svc: SecretService, store: Store) -> None:
    made = await svc.put("t1", "openai", VALUE)
    assert isinstance(made, SecretInfo) and made.name == "openai"
    assert made.created_at == made.updated_at and made.created_at.tzinfo is not None
    assert await svc.value("t1", "openai") == VALUE
    assert await svc.info("t1", "openai") == made
    # Nothing a caller sees carries the value.
    assert VALUE not in repr(await svc.list("t1")) and VALUE not in repr(made)
    row = await store.get_secret("t1", "openai")
    assert row is not None and len(row.nonce) == 12
    assert VALUE.encode() not in row.ciphertext


async def test_replace_keeps_created_at_and_moves_updated_at(svc: SecretService) -> None:
    first = await svc.put("t1", "gh", "one")
    await asyncio.sleep(0.01)
    second = await svc.put("t1", "gh", "two")
    assert second.created_at == first.created_at
    assert second.updated_at > first.updated_at
    assert await svc.value("t1", "gh") == "two"
    assert [s.name for s in await svc.list("t1")] == ["gh"]


async def test_every_write_has_a_fresh_nonce(svc: SecretService, store: Store) -> None:
    nonces = set()
    for _ in range(5):
        await svc.put("t1", "n", VALUE)
        row = await store.get_secret("t1", "n")
        assert row is not None
        nonces.add(row.nonce)
    assert len(nonces) == 5


async def _copy_row(store: Store, row: SecretRow, tenant_id: str, name: str) -> None:
    await store.put_secret(
        SecretRow(
            tenant_id=tenant_id,
            name=name,
            nonce=row.nonce,
            ciphertext=row.ciphertext,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
    )


@pytest.mark.parametrize(("tenant", "name"), [("t2", "openai"), ("t1", "renamed")])
async def test_a_row_moved_to_another_tenant_or_name_does_not_open(
    svc: SecretService, store: Store, tenant: str, name: str
) -> None:
    await svc.put("t1", "openai", VALUE)
    row = await store.get_secret("t1", "openai")
    assert row is not None
    await _copy_row(store, row, tenant, name)
    with pytest.raises(
        RuntimeFailure, match=rf"secret '{name}' of tenant {tenant}.*authentication"
    ):
        await svc.value(tenant, name)


async def test_tampered_rows_fail_loudly(svc: SecretService, store: Store) -> None:
    await svc.put("t1", "openai", VALUE)
    row = await store.get_secret("t1", "openai")
    assert row is not None
    flipped = bytes([row.ciphertext[0] ^ 1]) + row.ciphertext[1:]
    await store.put_secret(
        SecretRow(
            tenant_id="t1",
            name="openai",
            nonce=row.nonce,
            ciphertext=flipped,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
    )
    # A fresh service: nothing cached from before the tampering.
    fresh = _restart(store, svc._key_path.parent)
    with pytest.raises(RuntimeFailure, match=r"'openai'.*altered"):
        await fresh.value("t1", "openai")
    await store.put_secret(
        SecretRow(
            tenant_id="t1",
            name="openai",
            nonce=b"short",
            ciphertext=row.ciphertext,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )
    )
    with pytest.raises(RuntimeFailure, match="nonce is 5 bytes"):
        await fresh.value("t1", "openai")


async def test_a_replaced_key_file_is_a_runtime_failure(
    svc: SecretService, store: Store, data_dir: Path
) -> None:
    await svc.put("t1", "openai", VALUE)
    (data_dir / KEY_FILE).unlink()
    other = _restart(store, data_dir)  # a new key is made
    with pytest.raises(RuntimeFailure, match=rf"'openai'.*{re.escape(str(data_dir / KEY_FILE))}"):
        await other.value("t1", "openai")
    # Setting it again under the new key works.
    await other.put("t1", "openai", "new")
    assert await other.value("t1", "openai") == "new"


# ------------------------------------------------------------------------- the key file


async def test_key_file_is_made_once_0600_and_survives_restarts(
    svc: SecretService, store: Store, data_dir: Path
) -> None:
    path = data_dir / KEY_FILE
    st = path.stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 32
    key = path.read_bytes()
    await svc.put("t1", "openai", VALUE)
    again = _restart(store, data_dir)
    assert path.read_bytes() == key
    assert await again.value("t1", "openai") == VALUE
    # No temporary file is left beside it.
    assert sorted(p.name for p in data_dir.iterdir()) == [KEY_FILE]


def test_key_file_is_0600_whatever_the_umask(store: Store, data_dir: Path) -> None:
    old = os.umask(0)
    try:
        SecretService(store, data_dir).start()
    finally:
        os.umask(old)
    assert stat.S_IMODE((data_dir / KEY_FILE).stat().st_mode) == 0o600


def test_a_stale_temporary_key_is_replaced(store: Store, data_dir: Path) -> None:
    (data_dir / f".{KEY_FILE}.tmp").write_bytes(b"half")
    SecretService(store, data_dir).start()
    assert (data_dir / KEY_FILE).stat().st_size == 32
    assert not (data_dir / f".{KEY_FILE}.tmp").exists()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused(store: Store, data_dir: Path, mode: int) -> None:
    path = data_dir / KEY_FILE
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    with pytest.raises(RuntimeFailure, match=rf"mode {mode:04o}.*chmod 600"):
        SecretService(store, data_dir).start()
    assert stat.S_IMODE(path.stat().st_mode) == mode  # refused, not silently "fixed"


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_key_file_of_the_wrong_size_is_refused(store: Store, data_dir: Path, size: int) -> None:
    path = data_dir / KEY_FILE
    path.write_bytes(os.urandom(size))
    path.chmod(0o600)
    with pytest.raises(RuntimeFailure, match=rf"{size} bytes long, not 32"):
        SecretService(store, data_dir).start()


def test_a_key_file_that_is_a_symlink_or_directory_is_refused(
    store: Store, data_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "elsewhere.key"
    target.write_bytes(os.urandom(32))
    target.chmod(0o600)
    (data_dir / KEY_FILE).symlink_to(target)
    with pytest.raises(RuntimeFailure, match="symbolic link"):
        SecretService(store, data_dir).start()
    (data_dir / KEY_FILE).unlink()
    (data_dir / KEY_FILE).mkdir(mode=0o700)
    with pytest.raises(RuntimeFailure, match="not a regular file"):
        SecretService(store, data_dir).start()


async def test_not_started_is_a_runtime_failure(store: Store, data_dir: Path) -> None:
    svc = SecretService(store, data_dir)
    with pytest.raises(RuntimeFailure, match="not started"):
        await svc.put("t1", "a", "b")
    with pytest.raises(RuntimeFailure, match="not started"):
        svc.derive_key(b"x")


# ------------------------------------------------------------------------- names, values, quota


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "_x", "a b", "a/b", "é", "a" * 65, "a:b", "a\nb"]
)
async def test_bad_names_are_refused_with_the_rule(svc: SecretService, name: str) -> None:
    for call in (
        svc.put("t1", name, VALUE),
        svc.info("t1", name),
        svc.delete("t1", name),
        svc.value("t1", name),
        svc.exists("t1", [name]),
    ):
        with pytest.raises(InvalidRequestError, match="1 to 64 characters of letters, digits"):
            await call


@pytest.mark.parametrize("name", ["a", "A9", "openai.prod", "gh_token-2", "9" + "x" * 63])
async def test_good_names(svc: SecretService, name: str) -> None:
    await svc.put("t1", name, VALUE)
    assert (await svc.info("t1", name)).name == name


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "1 to 16384 characters, got 0"),
        ("x" * (MAX_VALUE_CHARS + 1), "got 16385"),
        (VALUE + "\r\nX-Injected: 1", "control characters"),
        (VALUE + "\x00", "control characters"),
        (VALUE + "\t", "control characters"),
        (VALUE + "\x7f", "control characters"),
        (VALUE + "\ud800", "lone surrogate"),
    ],
)
async def test_bad_values_are_refused_without_echoing_them(
    svc: SecretService, value: str, needle: str
) -> None:
    with pytest.raises(InvalidRequestError, match=needle) as got:
        await svc.put("t1", "openai", value)
    if value:
        assert VALUE not in got.value.message and "xxxxxxxx" not in got.value.message


def test_the_api_command_checks_lengths_as_the_service_does() -> None:
    """PutSecret (the API's body) refuses what is too short or long before the service sees it;
    the service itself refuses control characters
    (test_bad_values_are_refused_without_echoing_them)."""
    from pydantic import ValidationError

    for value in ("", "x" * (MAX_VALUE_CHARS + 1)):
        with pytest.raises(ValidationError):
            PutSecret(value=value)
    for value in ("x" * MAX_VALUE_CHARS, "Bearer sk-ünïcödé ok", "a"):
        assert PutSecret(value=value).value == value
    assert secrets_mod.SECRET_NAME == SECRET_NAME


async def test_max_length_value_round_trips(svc: SecretService) -> None:
    value = ("ü" + "x" * 99) * (MAX_VALUE_CHARS // 100)
    await svc.put("t1", "big", value)
    assert await svc.value("t1", "big") == value


async def test_quota_counts_new_names_per_tenant(
    svc: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets_mod, "MAX_SECRETS_PER_TENANT", 3)
    for i in range(3):
        await svc.put("t1", f"s{i}", VALUE)
    with pytest.raises(QuotaExceededError, match=r"tenant t1 has 3 secrets.*3"):
        await svc.put("t1", "s3", VALUE)
    await svc.put("t1", "s0", "replacing is not a new secret")
    await svc.put("t2", "s0", VALUE)  # another tenant's count is its own
    await svc.delete("t1", "s1")
    await svc.put("t1", "s3", VALUE)
    assert [s.name for s in await svc.list("t1")] == ["s0", "s2", "s3"]


async def test_concurrent_puts_cannot_overshoot_the_quota(
    svc: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(secrets_mod, "MAX_SECRETS_PER_TENANT", 5)
    results = await asyncio.gather(
        *(svc.put("t1", f"c{i}", VALUE) for i in range(12)), return_exceptions=True
    )
    assert sum(isinstance(r, SecretInfo) for r in results) == 5
    assert all(isinstance(r, SecretInfo | QuotaExceededError) for r in results)
    assert len(await svc.list("t1")) == 5


# ------------------------------------------------------------------------- lookups


async def test_tenants_are_separate(svc: SecretService) -> None:
    await svc.put("t1", "openai", VALUE)
    assert await svc.list("t2") == []
    with pytest.raises(NotFoundError, match="no secret named 'openai'"):
        await svc.info("t2", "openai")
    with pytest.raises(NotFoundError):
        await svc.value("t2", "openai")
    with pytest.raises(NotFoundError):
        await svc.delete("t2", "openai")
    assert await svc.value("t1", "openai") == VALUE


async def test_missing_secrets_are_not_found_by_name(svc: SecretService) -> None:
    for call in (svc.info("t1", "nope"), svc.delete("t1", "nope"), svc.value("t1", "nope")):
        with pytest.raises(NotFoundError, match="'nope'"):
            await call


async def test_list_is_by_name(svc: SecretService) -> None:
    for name in ("zeta", "alpha", "Mid"):
        await svc.put("t1", name, VALUE)
    assert [s.name for s in await svc.list("t1")] == ["Mid", "alpha", "zeta"]


async def test_exists_answers_the_missing_in_order(svc: SecretService) -> None:
    await svc.put("t1", "b", VALUE)
    await svc.put("t2", "c", VALUE)
    assert await svc.exists("t1", ["c", "b", "a", "c"]) == ["c", "a"]
    assert await svc.exists("t1", ["b"]) == []
    assert await svc.exists("t1", []) == []


# ------------------------------------------------------------------------- the value cache


class _Counting:
    """Counts the store reads of sealed rows."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        self._get = store.get_secret

        async def get(tenant_id: str, name: str) -> Any:
            self.reads += 1
            return await self._get(tenant_id, name)

        monkeypatch.setattr(store, "get_secret", get)


async def test_values_are_cached_until_put_or_delete(
    svc: SecretService, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await svc.put("t1", "openai", "one")
    counting = _Counting(store, monkeypatch)
    assert await svc.value("t1", "openai") == "one"
    reads = counting.reads
    for _ in range(5):
        assert await svc.value("t1", "openai") == "one"
    assert counting.reads == reads  # the proxy does not hit SQLite per request
    await svc.put("t1", "openai", "two")
    assert await svc.value("t1", "openai") == "two"
    await svc.delete("t1", "openai")
    with pytest.raises(NotFoundError):
        await svc.value("t1", "openai")
    # The cache is per tenant: t2's secret of the same name is another one.
    await svc.put("t1", "openai", "t1's")
    await svc.put("t2", "openai", "t2's")
    assert (await svc.value("t1", "openai"), await svc.value("t2", "openai")) == ("t1's", "t2's")


async def test_a_put_during_a_read_is_not_overwritten_by_the_old_value(
    svc: SecretService, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    await svc.put("t1", "openai", "old")
    original = store.get_secret
    raced = False

    async def get(tenant_id: str, name: str) -> Any:
        nonlocal raced
        row = await original(tenant_id, name)
        if not raced:  # the proxy's read has the old row; a put lands before it caches it
            raced = True
            await svc.put("t1", "openai", "new")
        return row

    monkeypatch.setattr(store, "get_secret", get)
    assert await svc.value("t1", "openai") == "old"  # what it read
    assert await svc.value("t1", "openai") == "new"  # not the stale one from the cache


async def test_the_cache_is_bounded(svc: SecretService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_mod, "_CACHE_SIZE", 3)
    for i in range(6):
        await svc.put("t1", f"s{i}", f"v{i}")
        assert await svc.value("t1", f"s{i}") == f"v{i}"
    assert len(svc._cache) == 3


# ------------------------------------------------------------------------- derived keys


async def test_derive_key_is_stable_and_label_dependent(
    svc: SecretService, store: Store, data_dir: Path, tmp_path: Path
) -> None:
    a = svc.derive_key(b"sandbox-ca:sb-1")
    assert len(a) == 32
    assert svc.derive_key(b"sandbox-ca:sb-1") == a
    assert svc.derive_key(b"sandbox-ca:sb-2") != a
    assert _restart(store, data_dir).derive_key(b"sandbox-ca:sb-1") == a
    # Another server (another key file) derives something else.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    assert _restart(store, other_dir).derive_key(b"sandbox-ca:sb-1") != a
    # Nor is it the master key itself.
    assert a != (data_dir / KEY_FILE).read_bytes()


def test_derive_key_refuses_empty_and_reserved_labels(svc: SecretService) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        svc.derive_key(b"")
    with pytest.raises(ValueError, match="reserved"):
        svc.derive_key(secrets_mod._AT_REST_LABEL)
