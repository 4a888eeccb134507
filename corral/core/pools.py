"""Warm pools: per tenant, named, ``size`` sandboxes of one template and shape made in advance,
so that a create asking for that template and shape is a hand-over, not a start.

A create (no snapshot) whose resolved template, tier, CPU, memory and disk equal a pool's takes
its oldest ready sandbox: the sandbox service gives it the create's environment (through the
agent, no restart), metadata, timeout, policies and network rules. The pool refills in the
background, one sandbox at a time, backing off while creates fail. Pools and their waiting
sandboxes (state ``pooled``) are in the store, so both survive a server restart.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.config import ServerConfig
from corral.core.commands import CreateSandbox, SetPool
from corral.core.sandboxes import Sandbox, SandboxService
from corral.core.tenants import Principal
from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
)
from corral.store import PoolRow, Store

__all__ = ["Pool", "PoolService"]

log = logging.getLogger(__name__)

_BACKOFF_MAX = 30.0
# How long after a hand-out a refill waits while other sandboxes still wait in the pool.
_SETTLE_S = 0.1


@dataclass(frozen=True)
class Pool:
    id: str
    tenant_id: str
    name: str
    template: str
    isolation: str
    cpu: float
    memory_mb: int
    disk_mb: int
    size: int
    ready: int
    created_at: datetime

    def shape(self) -> tuple[str, str, float, int, int]:
        return self.template, self.isolation, self.cpu, self.memory_mb, self.disk_mb


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class PoolService:
    def __init__(self, config: ServerConfig, store: Store, sandboxes: SandboxService) -> None:
        self._config = config
        self._store = store
        self._sandboxes = sandboxes
        self._rows: dict[str, PoolRow] = {}
        self._kick: dict[str, asyncio.Event] = {}
        self._settle_until: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()  # pool settings change one at a time

    # --- start and stop -----------------------------------------------------------------
    async def start(self) -> None:
        """Load the pools (their waiting sandboxes were adopted by the sandbox service's
        reconcile) and start refilling them."""
        for row in await self._store.pools():
            self._rows[row.id] = row
            self._run(row.id)

    async def stop(self) -> None:
        """Stop refilling; waiting sandboxes stay for the next start."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # --- settings -----------------------------------------------------------------------
    async def set(self, who: Principal, name: str, cmd: SetPool) -> Pool:
        create = cmd.as_create()
        _, isolation, cpu, memory, disk = self._sandboxes.shape(create, who.tenant_id)
        # The pool keeps the reference as written (``web`` follows web's latest version); its
        # sandboxes pin the version they were made of.
        template = create.template or self._config.default_template
        async with self._lock:
            mine = {r.name: r for r in self._rows.values() if r.tenant_id == who.tenant_id}
            others = sum(r.size for n, r in mine.items() if n != name)
            limit = self._config.limits.max_pooled_per_tenant
            if others + cmd.size > limit:
                raise QuotaExceededError(
                    f"tenant {who.tenant_id}'s pools would keep {others + cmd.size} sandboxes "
                    f"ready (limit {limit}); make some pools smaller first"
                )
            old = mine.get(name)
            row = PoolRow(
                id=old.id if old is not None else "pool-" + secrets.token_hex(6),
                tenant_id=who.tenant_id,
                name=name,
                template=template,
                runtime=isolation,
                cpu=cpu,
                memory_mb=memory,
                disk_mb=disk,
                size=cmd.size,
                created_at=old.created_at if old is not None else datetime.now(UTC),
            )
            reshaped = old is not None and self._shape_of(old) != self._shape_of(row)
            await self._store.put_pool(row)
            self._rows[row.id] = row
            if reshaped:  # what waits is of the old shape: nobody could take it any more
                for sb in self._sandboxes.pooled(row.id):
                    await self._discard(sb.id, "its pool changed shape")
            self._run(row.id)
            self._kick[row.id].set()
        return self._out(row)

    async def list(self, who: Principal) -> builtins.list[Pool]:
        return [self._out(r) for r in self._rows.values() if r.tenant_id == who.tenant_id]

    async def get(self, who: Principal, name: str) -> Pool:
        return self._out(self._named(who, name))

    async def delete(self, who: Principal, name: str) -> None:
        async with self._lock:
            row = self._named(who, name)
            # The refiller ends at its next look (not cancelled: a create it is in the middle
            # of finishes, and what it made is discarded with the rest below).
            self._rows.pop(row.id, None)
            kick = self._kick.pop(row.id, None)
            if kick is not None:
                kick.set()
            task = self._tasks.pop(row.id, None)
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
            await self._store.delete_pool(row.id)
            for sb in self._sandboxes.pooled(row.id):
                await self._discard(sb.id, "its pool was deleted")

    # --- creates ------------------------------------------------------------------------
    async def create(self, who: Principal, cmd: CreateSandbox) -> Sandbox:
        """``POST /sandboxes``: from a matching warm pool when one has a sandbox ready, else
        started on demand (the same sandbox either way, to the caller)."""
        row = self._match(who, cmd)
        if row is not None:
            for waiting in self._sandboxes.pooled(row.id):
                if _shape_of_sandbox(waiting) != self._shape_of(row):
                    # Made while the pool changed shape (a create in flight): nobody's size.
                    await self._discard(waiting.id, "its pool changed shape")
                    continue
                try:
                    sb = await self._sandboxes.take_pooled(who, cmd, waiting.id)
                except ConflictError:
                    continue  # taken by a concurrent create, or dead
                except InvalidRequestError:
                    raise  # the create's own mistake: no other sandbox would do better
                except CorralError as exc:
                    # This one could not be handed over (its agent or network failed): it
                    # goes, and the next one (or an on-demand create) serves the caller.
                    log.warning("pooled sandbox %s not taken: %s", waiting.id, exc.message)
                    await self._discard(waiting.id, f"could not be handed over: {exc.message}")
                    continue
                self._refill_soon(row.id)
                return sb
            self._refill_soon(row.id)
        return await self._sandboxes.create(who, cmd)

    def _refill_soon(self, pool_id: str) -> None:
        now = asyncio.get_running_loop().time()
        if self._settle_until.get(pool_id, 0.0) < now:
            # From the first hand-out of a burst, not the last: under a steady stream of
            # creates the refill must still run.
            self._settle_until[pool_id] = now + _SETTLE_S
        kick = self._kick.get(pool_id)
        if kick is not None:
            kick.set()

    def _match(self, who: Principal, cmd: CreateSandbox) -> PoolRow | None:
        if cmd.snapshot is not None or cmd.secrets:
            # A pooled sandbox was started without this create's CA in its trust store and
            # without its placeholders in the environment of what already runs.
            return None
        mine = [r for r in self._rows.values() if r.tenant_id == who.tenant_id]
        if not mine:
            return None
        shape = self._sandboxes.shape(cmd, who.tenant_id)
        return next((r for r in mine if self._shape_of(r) == shape), None)

    def _shape_of(self, row: PoolRow) -> tuple[str, str, float, int, int]:
        """The pool's shape with its template pinned to the version a create makes now (a new
        build of the template makes what waits stale)."""
        template = self._sandboxes.pin(row.template, row.tenant_id)
        return template, row.runtime, row.cpu, row.memory_mb, row.disk_mb

    # --- refilling ----------------------------------------------------------------------
    def _run(self, pool_id: str) -> None:
        self._kick.setdefault(pool_id, asyncio.Event())
        task = self._tasks.get(pool_id)
        if task is None or task.done():
            self._tasks[pool_id] = asyncio.create_task(
                self._refill(pool_id), name=f"corral-pool-{pool_id}"
            )

    async def _refill(self, pool_id: str) -> None:
        loop = asyncio.get_running_loop()
        backoff = 1.0
        while True:
            row = self._rows.get(pool_id)
            if row is None:
                return
            waiting = self._sandboxes.pooled(pool_id)
            stale = [sb for sb in waiting if _shape_of_sandbox(sb) != self._shape_of(row)]
            for sb in stale:
                await self._discard(sb.id, "its pool changed shape")
            if stale:
                continue
            if len(waiting) > row.size:
                for sb in waiting[row.size :]:
                    await self._discard(sb.id, "its pool shrank")
                continue
            if len(waiting) == row.size:
                kick = self._kick[pool_id]
                await kick.wait()
                kick.clear()
                continue
            # A sandbox was just handed out and others still wait: let its taker's first
            # commands run before a refill competes with them for the CPU and the event loop
            # (on 2 cores a concurrent create doubled a first exec). An empty pool refills
            # at once.
            quiet = self._settle_until.get(pool_id, 0.0) - loop.time()
            if waiting and quiet > 0:
                await asyncio.sleep(quiet)
                continue
            owner = Principal(tenant_id=row.tenant_id, admin=False, key_id="pool")
            create = CreateSandbox(
                template=row.template,
                isolation=row.runtime,  # type: ignore[arg-type]
                cpu=row.cpu,
                memory_mb=row.memory_mb,
                disk_mb=row.disk_mb,
            )
            try:
                await self._sandboxes.create(owner, create, pool=pool_id)
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep trying: the pool is what makes creates fast
                message = exc.message if isinstance(exc, CorralError) else repr(exc)
                log.warning("warm pool %s (%s): create failed: %s", row.name, pool_id, message)
                await asyncio.sleep(backoff)
                backoff = min(_BACKOFF_MAX, backoff * 2)

    async def _discard(self, sandbox_id: str, reason: str) -> None:
        try:
            await self._sandboxes.discard_pooled(sandbox_id, reason)
        except CorralError as exc:
            log.warning("pooled sandbox %s: %s", sandbox_id, exc.message)

    def name_of(self, pool_id: str | None) -> str | None:
        """The name of a pool by id (what the API shows of a sandbox's pool), if it exists."""
        row = self._rows.get(pool_id) if pool_id is not None else None
        return row.name if row is not None else None

    # --- helpers ------------------------------------------------------------------------
    def _named(self, who: Principal, name: str) -> PoolRow:
        for row in self._rows.values():
            if row.tenant_id == who.tenant_id and row.name == name:
                return row
        raise NotFoundError(f"no pool {name!r}")

    def _out(self, row: PoolRow) -> Pool:
        return Pool(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            template=row.template,
            isolation=row.runtime,
            cpu=row.cpu,
            memory_mb=row.memory_mb,
            disk_mb=row.disk_mb,
            size=row.size,
            ready=len(self._sandboxes.pooled(row.id)),
            created_at=_aware(row.created_at),
        )


def _shape_of_sandbox(sb: Sandbox) -> tuple[str, str, float, int, int]:
    return sb.template, sb.runtime, sb.cpu, sb.memory_mb, sb.disk_mb
