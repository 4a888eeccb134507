"""The store's synchronous sandbox update (the warm-pool hand-over) stores values exactly as the
async path does, and steps aside instead of waiting when another writer holds the database."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from corral.store import SandboxRow, Store
from corral.store.models import TenantRow


async def _store_with_sandbox(tmp_path: Path) -> Store:
    store = Store(tmp_path / "corral.db")
    await store.migrate()
    now = datetime.now(UTC)
    await store.add_tenant(TenantRow(id="t", name="t", created_at=now))
    await store.add_sandbox(
        SandboxRow(
            id="sb-1", tenant_id="t", template="minimal", runtime="container", state="pooled",
            cpu=1.0, memory_mb=128, disk_mb=2048, timeout_s=300, env={}, meta={},
            created_at=now, expires_at=None, network=None, access_token=None, public_ports=0,
            on_timeout="kill", idle_timeout_s=None, on_idle=None, auto_resume=1, pool="p",
        )
    )  # fmt: skip
    return store


async def test_fast_and_async_updates_store_the_same_values(tmp_path: Path) -> None:
    store = await _store_with_sandbox(tmp_path)
    try:
        when = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)
        fields = {
            "state": "running",
            "env": {"A": "1", "B": "ü"},
            "meta": {"task": "x"},
            "expires_at": when + timedelta(seconds=60),
            "created_at": when,
            "network": {"preset": "none", "allow": []},
            "timeout_s": 60,
            "scopes": ["repo:read", "deploy"],
        }
        assert store.update_sandbox_now("sb-1", **fields)
        fast = await store.get_sandbox("sb-1")
        await store.update_sandbox("sb-1", **fields)
        slow = await store.get_sandbox("sb-1")
        assert fast is not None and slow is not None
        for name in fields:
            assert getattr(fast, name) == getattr(slow, name), name
        assert fast.env == {"A": "1", "B": "ü"} and fast.timeout_s == 60
    finally:
        await store.close()


async def test_a_busy_database_makes_the_fast_update_step_aside(tmp_path: Path) -> None:
    store = await _store_with_sandbox(tmp_path)
    other = sqlite3.connect(tmp_path / "corral.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer mid-transaction
        assert store.update_sandbox_now("sb-1", state="running") is False
        other.execute("ROLLBACK")
        assert store.update_sandbox_now("sb-1", state="running") is True
        row = await store.get_sandbox("sb-1")
        assert row is not None and row.state == "running"
    finally:
        other.close()
        await store.close()
