"""Snapshots: named captures of a sandbox's filesystem, and what starts from them (restore, fork).

A snapshot belongs to its tenant and outlives its sandbox until deleted. The runtime holds the
data (``Runtime.snapshot``); the store holds the record, written only once the data exists and
deleted before the data goes, so a crash can leave an unrecorded image (removed at the next
start) but never a record without its image.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from corral.config import ServerConfig
from corral.core.bindings import SecretState
from corral.core.commands import CreateSandbox, ForkSnapshot
from corral.core.sandboxes import Sandbox, SandboxService
from corral.core.tenants import Principal
from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
)
from corral.runtime.base import Runtime
from corral.store import SnapshotRow, Store

__all__ = ["Snapshot", "SnapshotService"]

log = logging.getLogger("corral.snapshots")


@dataclass(frozen=True)
class Snapshot:
    id: str
    tenant_id: str
    sandbox_id: str
    name: str
    template: str
    disk_mb: int
    size_bytes: int
    created_at: datetime
    source: dict[str, Any]

    @property
    def isolation(self) -> str:
        """The tier it was taken in: it starts again only there (a VM's memory is no container
        filesystem)."""
        return str(self.source.get("isolation") or "container")

    @classmethod
    def from_row(cls, row: SnapshotRow) -> Snapshot:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            sandbox_id=row.sandbox_id,
            name=row.name,
            template=row.template,
            disk_mb=row.disk_mb,
            size_bytes=row.size_bytes,
            created_at=created,
            source=dict(row.source),
        )


_STATE = "secret_state"  # a snapshot source's key beside the create document's own


def _source_of(sb: Sandbox) -> dict[str, Any]:
    """The sandbox's settings as a create command: what a fork of its snapshot starts with."""
    source = CreateSandbox(
        template=sb.template,
        isolation=sb.runtime,  # type: ignore[arg-type]
        cpu=sb.cpu,
        memory_mb=sb.memory_mb,
        disk_mb=sb.disk_mb,
        timeout=sb.timeout,
        env=dict(sb.env),
        metadata=dict(sb.metadata),
        network=dict(sb.network) if sb.network is not None else None,
        public_ports=sb.public_ports,
        on_timeout=sb.on_timeout,  # type: ignore[arg-type]
        idle_timeout=sb.idle_timeout,
        on_idle=sb.on_idle,  # type: ignore[arg-type]
        auto_resume=sb.auto_resume,
        scopes=list(sb.scopes),
    ).model_dump(mode="json", exclude={"snapshot", "secrets"})
    state = sb.secret_state
    if state is not None:
        # The bindings as a create would give them, and their state: a fork that keeps them
        # keeps the placeholders its processes hold and the CA its trust store has.
        source["secrets"] = state.as_bindings()
        source[_STATE] = state.to_doc()
    return source


class SnapshotService:
    def __init__(
        self, config: ServerConfig, store: Store, runtime: Runtime, sandboxes: SandboxService
    ) -> None:
        self._config = config
        self._store = store
        self._runtime = runtime
        self._sandboxes = sandboxes

    async def reconcile(self) -> None:
        """Make the store and the host agree: images nobody recorded (a crash between taking a
        snapshot and recording it, or during a delete) go; records whose image is gone too."""
        on_host = set(await self._runtime.list_snapshots())
        recorded = {row.id for row in await self._store.snapshots()}
        for orphan in on_host - recorded:
            log.warning("removing unrecorded snapshot %s found on the host", orphan)
            await self._runtime.delete_snapshot(orphan)
        for lost in recorded - on_host:
            log.warning("snapshot %s lost its data on the host; forgetting it", lost)
            await self._store.delete_snapshot(lost)

    # --- records ----------------------------------------------------------------------------
    async def take(self, who: Principal, sandbox_id: str, name: str | None) -> Snapshot:
        await self._sandboxes.get(who, sandbox_id)
        held = await self._store.snapshots(tenant_id=who.tenant_id)
        if len(held) >= self._config.limits.max_snapshots_per_tenant:
            raise QuotaExceededError(
                f"tenant {who.tenant_id} already holds {len(held)} snapshots (limit "
                f"{self._config.limits.max_snapshots_per_tenant}); delete some first"
            )
        snapshot_id = "snap-" + secrets.token_hex(6)
        name = name or snapshot_id
        if any(r.sandbox_id == sandbox_id and r.name == name for r in held):
            raise ConflictError(f"sandbox {sandbox_id} already has a snapshot named {name!r}")
        sb, size = await self._sandboxes.snapshot_disk(who, sandbox_id, snapshot_id)
        row = SnapshotRow(
            id=snapshot_id,
            tenant_id=who.tenant_id,
            sandbox_id=sandbox_id,
            name=name,
            template=sb.template,
            disk_mb=sb.disk_mb,
            size_bytes=size,
            created_at=datetime.now(UTC),
            source=_source_of(sb),
        )
        try:
            # The store refuses a name taken meanwhile by a concurrent take (a 409 too).
            await self._store.add_snapshot(row)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._runtime.delete_snapshot(snapshot_id))
            raise
        return Snapshot.from_row(row)

    async def get(self, who: Principal, snapshot_id: str) -> Snapshot:
        row = await self._store.get_snapshot(snapshot_id)
        # Another tenant's snapshot is indistinguishable from one that does not exist.
        if row is None or row.tenant_id != who.tenant_id:
            raise NotFoundError(f"no snapshot {snapshot_id!r}")
        return Snapshot.from_row(row)

    async def list(self, who: Principal, sandbox_id: str | None = None) -> builtins.list[Snapshot]:
        rows = await self._store.snapshots(tenant_id=who.tenant_id, sandbox_id=sandbox_id)
        return [Snapshot.from_row(r) for r in rows]

    async def of_sandbox(self, who: Principal, sandbox_id: str) -> builtins.list[Snapshot]:
        """The sandbox's snapshots (the sandbox may be gone; its snapshots are not)."""
        snaps = await self.list(who, sandbox_id)
        if not snaps:
            await self._sandboxes.get(who, sandbox_id)  # 404 for someone else's sandbox
        return snaps

    async def delete(self, who: Principal, snapshot_id: str) -> None:
        snap = await self.get(who, snapshot_id)
        await self._store.delete_snapshot(snap.id)
        await self._runtime.delete_snapshot(snap.id)

    async def _resolve(self, who: Principal, sandbox_id: str, ref: str) -> Snapshot:
        """``ref``: a snapshot id, or a name among the sandbox's own snapshots."""
        rows = await self._store.snapshots(sandbox_id=sandbox_id, name=ref)
        if rows and rows[0].tenant_id == who.tenant_id:
            return Snapshot.from_row(rows[0])
        return await self.get(who, ref)

    # --- what starts from a snapshot -------------------------------------------------------
    async def restore(self, who: Principal, sandbox_id: str, ref: str) -> Sandbox:
        await self._sandboxes.get(who, sandbox_id)
        snap = await self._resolve(who, sandbox_id, ref)
        return await self._sandboxes.restore(
            who,
            sandbox_id,
            snap.id,
            template=snap.template,
            disk_mb=snap.disk_mb,
            isolation=snap.isolation,
        )

    def _command(self, snap: Snapshot, overrides: CreateSandbox) -> CreateSandbox:
        """The snapshot source's settings with what the caller set on top."""
        given = overrides.model_dump(include=overrides.model_fields_set - {"snapshot"})
        settled = (
            ("template", snap.template),
            ("disk_mb", snap.disk_mb),
            ("isolation", snap.isolation),
        )
        for key, have in settled:
            if given.get(key) not in (None, have):
                raise InvalidRequestError(
                    f"{key} comes from snapshot {snap.id} ({have!r}); got {given[key]!r}"
                )
        source = {k: v for k, v in snap.source.items() if k != _STATE}
        return CreateSandbox(**{**source, **given})

    @staticmethod
    def _kept_secrets(snap: Snapshot, overrides: CreateSandbox) -> SecretState | None:
        """The snapshot's secret bindings as they were, unless the caller gives new ones."""
        doc = snap.source.get(_STATE)
        if doc is None or "secrets" in overrides.model_fields_set:
            return None
        return SecretState.from_doc(doc)

    async def create_from(self, who: Principal, cmd: CreateSandbox) -> Sandbox:
        """``POST /sandboxes`` with a ``snapshot``: one fork with the caller's settings."""
        assert cmd.snapshot is not None
        snap = await self.get(who, cmd.snapshot)
        return await self._sandboxes.create(
            who,
            self._command(snap, cmd),
            snapshot=snap.id,
            secret_state=self._kept_secrets(snap, cmd),
        )

    async def fork(
        self, who: Principal, snapshot_id: str, cmd: ForkSnapshot
    ) -> builtins.list[Sandbox]:
        """``count`` independent sandboxes started from the snapshot, concurrently; all or none."""
        limits = self._config.limits
        if cmd.count > limits.max_fork_count:
            raise InvalidRequestError(
                f"count must be at most {limits.max_fork_count}, got {cmd.count}"
            )
        snap = await self.get(who, snapshot_id)
        live = self._sandboxes.live_count(who.tenant_id)
        if live + cmd.count > limits.max_sandboxes_per_tenant:
            raise QuotaExceededError(
                f"tenant {who.tenant_id} has {live} live sandboxes; {cmd.count} more would pass "
                f"the limit of {limits.max_sandboxes_per_tenant}"
            )
        fields = cmd.model_dump(include=cmd.model_fields_set - {"count"}, exclude_none=True)
        create = self._command(snap, CreateSandbox(**fields))
        kept = self._kept_secrets(snap, CreateSandbox(**fields))
        results = await asyncio.gather(
            *(
                self._sandboxes.create(who, create, snapshot=snap.id, secret_state=kept)
                for _ in range(cmd.count)
            ),
            return_exceptions=True,
        )
        made = [r for r in results if isinstance(r, Sandbox)]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for sb in made:
                with contextlib.suppress(CorralError):
                    await self._sandboxes.kill(who, sb.id)
            raise failed[0]
        return made
