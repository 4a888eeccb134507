"""Sandbox lifecycle service: create, inspect, time out, kill, and reconcile with the host.

The store is the truth across restarts; ``_live`` mirrors every sandbox that may still exist on
the host so that the hot path (exec, files) never waits on the database.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import re
import secrets
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from corral.agent import AgentClient, ExecRequest, OutputEvent
from corral.config import ServerConfig
from corral.core.bindings import SecretBinder, SecretState
from corral.core.commands import CreateSandbox
from corral.core.lifecycle import LIVE_STATES, SandboxState, check_transition
from corral.core.network import NetworkService
from corral.core.templates import Resolved, TemplateService
from corral.core.tenants import Principal
from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    QuotaExceededError,
    RuntimeFailure,
    SandboxNotRunningError,
)
from corral.errors import TimeoutError as ReadyTimeoutError
from corral.net.policy import CompiledPolicy
from corral.net.view import SandboxSecrets
from corral.runtime.base import Runtime, SandboxSpec
from corral.store import SandboxRow, Store

__all__ = ["Sandbox", "SandboxService"]

log = logging.getLogger("corral.sandboxes")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Idle means, besides no API use: under this share of one core, measured over this window.
_IDLE_CPU_SHARE = 0.05
_IDLE_CPU_WINDOW_S = 2.0
# States in which a sandbox has a disk on the host (what snapshots and restores work on).
_HAS_DISK = frozenset({SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.HIBERNATED})


@dataclass(frozen=True)
class Sandbox:
    id: str
    tenant_id: str
    template: str
    runtime: str
    state: SandboxState
    cpu: float
    memory_mb: int
    disk_mb: int
    timeout: int
    created_at: datetime
    expires_at: datetime | None
    env: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    ended_at: datetime | None = None
    error: str | None = None
    address: str | None = None
    network: Mapping[str, Any] | None = None  # the policy document, as given and stored
    access_token: str | None = None
    public_ports: bool = False
    paused_at: datetime | None = None
    paused_remaining_s: float | None = None
    on_timeout: str = "kill"
    idle_timeout: int | None = None
    on_idle: str = "pause"
    auto_resume: bool = True
    pool: str | None = None  # the warm pool it was made for or taken from
    scopes: tuple[str, ...] = ()  # put in its identity tokens
    secrets: Mapping[str, Any] | None = None  # its SecretState document (corral.core.bindings)

    @classmethod
    def from_row(cls, row: SandboxRow) -> Sandbox:
        return cls(
            id=row.id,
            tenant_id=row.tenant_id,
            template=row.template,
            runtime=row.runtime,
            state=SandboxState(row.state),
            cpu=row.cpu,
            memory_mb=row.memory_mb,
            disk_mb=row.disk_mb,
            timeout=row.timeout_s,
            created_at=_aware(row.created_at),
            expires_at=_aware(row.expires_at) if row.expires_at else None,
            env=dict(row.env or {}),
            metadata=dict(row.meta or {}),
            ended_at=_aware(row.ended_at) if row.ended_at else None,
            error=row.error,
            address=row.address,
            network=dict(row.network) if row.network is not None else None,
            access_token=row.access_token,
            public_ports=bool(row.public_ports),
            paused_at=_aware(row.paused_at) if row.paused_at else None,
            paused_remaining_s=row.paused_remaining_s,
            on_timeout=row.on_timeout or "kill",
            idle_timeout=row.idle_timeout_s,
            on_idle=row.on_idle or "pause",
            auto_resume=bool(row.auto_resume),
            pool=row.pool,
            scopes=tuple(row.scopes or ()),
            secrets=dict(row.secrets) if row.secrets else None,
        )

    @property
    def secret_state(self) -> SecretState | None:
        return SecretState.from_doc(self.secrets) if self.secrets else None


def _environment(sandbox_id: str, env: Mapping[str, str]) -> dict[str, str]:
    """What every process of the sandbox starts with: corral's defaults, then the caller's."""
    return {
        "PATH": DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "CORRAL_SANDBOX": "1",
        "CORRAL_SANDBOX_ID": sandbox_id,
        **env,
    }


def _in_pool(sb: Sandbox) -> bool:
    """Made for a warm pool and not taken yet (being made, or waiting)."""
    return sb.pool is not None and sb.state in (SandboxState.CREATING, SandboxState.POOLED)


async def _still_pooled(sb: Sandbox) -> bool:
    return sb.state is SandboxState.POOLED


# Sandbox fields stored under another column name.
_RENAMED = {"metadata": "meta", "timeout": "timeout_s", "idle_timeout": "idle_timeout_s"}


def _aware(dt: datetime) -> datetime:
    # SQLite hands datetimes back without their zone; everything we store is UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def _asleep(sb: Sandbox) -> dict[str, Any]:
    """The fields of ``sb`` once hibernated: no address, the timeout clock stopped with the
    time it had left (a paused sandbox's clock was stopped already)."""
    now = _now()
    remaining = sb.paused_remaining_s
    if sb.state is SandboxState.RUNNING and sb.expires_at is not None:
        remaining = max(0.0, (sb.expires_at - now).total_seconds())
    return {
        "address": None,
        "expires_at": None,
        "paused_at": sb.paused_at or now,
        "paused_remaining_s": remaining,
    }


class SandboxService:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        runtime: Runtime,
        templates: TemplateService,
        network: NetworkService | None = None,
        binder: SecretBinder | None = None,
    ) -> None:
        self._config = config
        self._network = network
        self._binder = binder
        self._store = store
        self._runtime = runtime
        self._templates = templates
        self._live: dict[str, Sandbox] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # Idle detection: monotonic time of the last API use, attached streams, and the CPU
        # reading (monotonic time, CPU seconds) that starts the current low-CPU window.
        self._activity: dict[str, float] = {}
        self._busy: dict[str, int] = {}
        self._cpu_mark: dict[str, tuple[float, float]] = {}

    # --- start and stop of the service ------------------------------------------------------
    async def start(self) -> None:
        await self.reconcile()
        self._reaper = asyncio.create_task(self._reap_forever(), name="corral-reaper")

    async def stop(self) -> None:
        """Stop the service's own tasks. Sandboxes keep running and are re-adopted at next start."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        # Pending timeouts and expiries are re-derived from the store at the next start.
        for t in list(self._background):
            t.cancel()
        for t in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await t

    async def reconcile(self) -> None:
        """Make the store and the host agree after a restart or a crash.

        A sandbox the store believes running and whose agent is alive is adopted again; anything
        else left on the host is destroyed, so a crash never leaks processes, mounts or cgroups.
        """
        on_host = set(await self._runtime.list_sandboxes())
        adopted: set[str] = set()
        for row in await self._store.all_sandboxes(states=[s.value for s in LIVE_STATES]):
            sb = Sandbox.from_row(row)
            if (
                sb.state in (SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.POOLED)
                and sb.id in on_host
                and await self._runtime.is_running(sb.id)
            ):
                if sb.state is SandboxState.RUNNING:
                    # A crash between freezing it and recording the pause left it frozen.
                    with contextlib.suppress(CorralError):
                        await self._runtime.resume(sb.id)
                self._live[sb.id] = sb
                adopted.add(sb.id)
                continue
            if (
                sb.state in (SandboxState.RUNNING, SandboxState.PAUSED)
                and sb.id in on_host
                and await self._hibernate_dead(sb)
            ):
                sb = self._live[sb.id]
                adopted.add(sb.id)
                continue
            if sb.state is SandboxState.HIBERNATED and sb.id in on_host:
                # Its disk is all it has; make sure nothing else is left (a crash during the
                # hibernation, or a host reboot that left stale state), then keep it.
                try:
                    await self._runtime.hibernate(sb.id)
                except CorralError as e:
                    log.warning("hibernated sandbox %s: %s", sb.id, e.message)
                if sb.address is not None:
                    # A wake that crashed half way: its network is an orphan (removed below by
                    # the network service), and the next wake plumbs a new one.
                    sb = replace(sb, address=None)
                    await self._store.update_sandbox(sb.id, address=None)
                self._live[sb.id] = sb
                adopted.add(sb.id)
                continue
            with contextlib.suppress(CorralError):
                await self._runtime.destroy(sb.id)
            was = "was running" if sb.state is SandboxState.RUNNING else f"was {sb.state.value}"
            await self._store.update_sandbox(
                sb.id,
                state=SandboxState.STOPPED.value,
                ended_at=_now(),
                error=sb.error or f"gone after a server restart ({was})",
            )
        for orphan in on_host - adopted:
            log.warning("removing orphaned sandbox %s found on the host", orphan)
            with contextlib.suppress(CorralError):
                await self._runtime.destroy(orphan)
        if self._network is not None:
            # Network state of everything not adopted goes too (the network service removes
            # whatever of its own it finds on the host beyond this list).
            await self._network.start(
                (sb.id, sb.tenant_id, sb.address, sb.network, self._bound(sb))
                for sid in adopted
                if (sb := self._live[sid]).address is not None
            )

    async def _hibernate_dead(self, sb: Sandbox) -> bool:
        """A sandbox whose processes died while the server was away (a host reboot, or a crash
        in the middle of a restore) keeps its disk: it becomes hibernated and wakes on next use.
        False when it has no disk either."""
        try:
            await self._runtime.hibernate(sb.id)
        except CorralError as e:
            log.warning("sandbox %s lost its processes and its disk: %s", sb.id, e.message)
            return False
        log.warning("sandbox %s lost its processes while the server was away: hibernated", sb.id)
        changes = _asleep(sb)
        self._transition(sb, SandboxState.HIBERNATED, **changes)
        await self._store.update_sandbox(sb.id, state=SandboxState.HIBERNATED.value, **changes)
        return True

    # --- queries ----------------------------------------------------------------------------
    async def get(self, who: Principal, sandbox_id: str) -> Sandbox:
        sb = self._live.get(sandbox_id)
        if sb is None:
            row = await self._store.get_sandbox(sandbox_id)
            sb = Sandbox.from_row(row) if row is not None else None
        # Another tenant's sandbox is indistinguishable from one that does not exist, and so is
        # one waiting in a warm pool (nobody has it yet).
        if sb is None or sb.tenant_id != who.tenant_id or _in_pool(sb):
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return sb

    async def list(
        self,
        who: Principal,
        *,
        states: Iterable[SandboxState] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[Sandbox]:
        wanted = set(states) if states else None
        rows = await self._store.all_sandboxes(
            states=[s.value for s in wanted] if wanted else None, tenant_id=who.tenant_id
        )
        out: list[Sandbox] = []
        for row in rows:
            sb = self._live.get(row.id) or Sandbox.from_row(row)
            if wanted is None and sb.state is SandboxState.STOPPED:
                continue  # like E2B: the default listing shows what is alive
            if _in_pool(sb):
                continue  # nobody's yet
            if metadata and any(sb.metadata.get(k) != v for k, v in metadata.items()):
                continue
            out.append(sb)
        return out

    def live_count(self, tenant_id: str) -> int:
        """Sandboxes of the tenant that may still exist on the host (what quotas count); those
        waiting in its warm pools count against the pools' own limit instead."""
        return sum(1 for s in self._live.values() if s.tenant_id == tenant_id and not _in_pool(s))

    def pooled(self, pool_id: str) -> builtins.list[Sandbox]:
        """The sandboxes waiting in a warm pool, oldest first."""
        waiting = [
            s for s in self._live.values() if s.pool == pool_id and s.state is SandboxState.POOLED
        ]
        return sorted(waiting, key=lambda s: s.created_at)

    def template_in_use(self, name: str) -> bool:
        return any(sb.template == name for sb in self._live.values())

    async def agent(self, who: Principal, sandbox_id: str) -> AgentClient:
        """The agent of a running sandbox of this tenant (a paused one is resumed first, unless
        it was created with ``auto_resume`` off)."""
        await self._settled(sandbox_id)
        sb = await self.get(who, sandbox_id)
        if sb.state in (SandboxState.PAUSED, SandboxState.HIBERNATED) and sb.auto_resume:
            sb = await self.resume(who, sandbox_id)
        if sb.state is not SandboxState.RUNNING:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is {sb.state.value}, not running")
        self.touch(sandbox_id)
        return AgentClient(lambda: self._runtime.open_agent(sandbox_id))

    def _current(self, sandbox_id: str) -> Sandbox:
        """The sandbox as it is now (call with its lock held): a kill that ran while we waited
        for the lock has removed it, and nothing may bring it back."""
        sb = self._live.get(sandbox_id)
        if sb is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is stopped, not running")
        return sb

    async def _settled(self, sandbox_id: str) -> None:
        """Wait for an operation in progress on the sandbox (a pause, a wake) to finish, so
        that a caller never hands work to a sandbox that is being frozen under it."""
        lock = self._locks.get(sandbox_id)
        if lock is not None and lock.locked():
            async with lock:
                pass

    def touch(self, sandbox_id: str) -> None:
        """Record use of the sandbox through the API (it is not idle)."""
        if sandbox_id not in self._live:
            return  # stopped meanwhile: nothing to keep awake
        self._activity[sandbox_id] = time.monotonic()
        self._cpu_mark.pop(sandbox_id, None)

    @contextlib.contextmanager
    def busy(self, sandbox_id: str) -> Iterator[None]:
        """Held while a client follows a process or terminal: the sandbox is not idle."""
        self._busy[sandbox_id] = self._busy.get(sandbox_id, 0) + 1
        try:
            yield
        finally:
            left = self._busy.get(sandbox_id, 1) - 1
            if left > 0:
                self._busy[sandbox_id] = left
            else:
                self._busy.pop(sandbox_id, None)
            self.touch(sandbox_id)

    async def ingress_target(self, sandbox_id: str) -> Sandbox | None:
        """A live sandbox for a request to one of its ports (no tenancy: the port's token is
        the credential); a paused one is resumed first when it allows that."""
        asleep = (SandboxState.PAUSED, SandboxState.HIBERNATED)
        await self._settled(sandbox_id)
        sb = self._live.get(sandbox_id)
        if sb is not None and sb.state in asleep and sb.auto_resume:
            async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
                sb = self._live.get(sandbox_id)
                if sb is not None and sb.state in asleep:
                    sb = await self._resume_locked(sb)
        if sb is None or sb.state is not SandboxState.RUNNING:
            return None
        self.touch(sandbox_id)
        return sb

    # --- commands ---------------------------------------------------------------------------
    def _validate(self, cmd: CreateSandbox) -> tuple[str, float, int, int, int]:
        c, lim = self._config, self._config.limits
        template = cmd.template or c.default_template
        if cmd.vcpus is not None and cmd.cpu is not None and float(cmd.vcpus) != cmd.cpu:
            raise InvalidRequestError("give cpu or vcpus, not both with different values")
        cpu = cmd.cpu if cmd.cpu is not None else c.default_cpu
        if cmd.vcpus is not None:
            cpu = float(cmd.vcpus)
        if cmd.isolation != "container":
            self._check_microvm(cmd)
        memory = cmd.memory_mb if cmd.memory_mb is not None else c.default_memory_mb
        disk = cmd.disk_mb if cmd.disk_mb is not None else c.default_disk_mb
        timeout = cmd.timeout if cmd.timeout is not None else c.default_timeout_s
        if not lim.min_cpu <= cpu <= lim.max_cpu:
            raise InvalidRequestError(
                f"cpu must be between {lim.min_cpu} and {lim.max_cpu} cores, got {cpu}"
            )
        if not lim.min_memory_mb <= memory <= lim.max_memory_mb:
            raise InvalidRequestError(
                f"memory_mb must be between {lim.min_memory_mb} and {lim.max_memory_mb}, got {memory}"
            )
        if not lim.min_disk_mb <= disk <= lim.max_disk_mb:
            raise InvalidRequestError(
                f"disk_mb must be between {lim.min_disk_mb} and {lim.max_disk_mb}, got {disk}"
            )
        if timeout > lim.max_timeout_s:
            raise InvalidRequestError(
                f"timeout must be at most {lim.max_timeout_s} seconds, got {timeout}"
            )
        for what, d, most in (
            ("env", cmd.env, lim.max_env_entries),
            ("metadata", cmd.metadata, lim.max_metadata_entries),
        ):
            if len(d) > most:
                raise InvalidRequestError(
                    f"{what} has {len(d)} entries; at most {most} are allowed"
                )
            for k, v in d.items():
                if not k or len(k.encode()) > lim.max_key_bytes:
                    raise InvalidRequestError(
                        f"{what} key {k[:40]!r} must be 1 to {lim.max_key_bytes} bytes"
                    )
                if len(v.encode()) > lim.max_value_bytes:
                    raise InvalidRequestError(
                        f"{what} value of {k!r} is longer than {lim.max_value_bytes} bytes"
                    )
                if "\0" in k or "\0" in v:
                    raise InvalidRequestError(f"{what} entry {k!r} must not contain NUL bytes")
        for k in cmd.env:
            if not _ENV_NAME.match(k):
                raise InvalidRequestError(
                    f"env name {k!r} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
                )
        return template, cpu, memory, disk, timeout

    def _check_microvm(self, cmd: CreateSandbox) -> None:
        """What the microvm tier cannot do is refused up front, not half done: fractions of a
        vCPU, and a guest bigger than this host — more vCPUs than it has cores, or more RAM than
        its MemTotal (whatever the configured limits allow a container's cgroup)."""
        import os

        if cmd.cpu is not None and cmd.vcpus is None and cmd.cpu != int(cmd.cpu):
            raise InvalidRequestError(f"a microvm has whole vCPUs; got cpu={cmd.cpu}")
        cores = os.cpu_count() or 1
        cpu = cmd.cpu if cmd.cpu is not None else self._config.default_cpu
        vcpus = cmd.vcpus if cmd.vcpus is not None else max(1, round(cpu))
        if vcpus > cores:
            raise InvalidRequestError(
                f"vcpus={vcpus} is more than this host's {cores} CPU cores "
                f"(a microvm may have at most {cores} vCPUs here)"
            )
        memory = cmd.memory_mb if cmd.memory_mb is not None else self._config.default_memory_mb
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            meminfo = ""
        found = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
        limit = int(found.group(1)) // 1024 if found is not None else None
        if limit is not None and memory > limit:
            raise InvalidRequestError(
                f"memory_mb={memory} is more than this host's memory (MemTotal {limit} MB; "
                f"a microvm may have at most {limit} MB here)"
            )

    async def create(
        self,
        who: Principal,
        cmd: CreateSandbox,
        *,
        snapshot: str | None = None,
        pool: str | None = None,
        secret_state: SecretState | None = None,
    ) -> Sandbox:
        """Start a sandbox; ``snapshot``: on a copy of that snapshot's disk (the snapshot service
        checks it belongs to the tenant and fills ``cmd`` from it first); ``pool``: for that
        warm pool (it waits, POOLED, until ``take_pooled``; the pool service counts it);
        ``secret_state``: the snapshot's secret bindings, kept as they were (its processes
        hold their placeholders and trust their CA) instead of new ones made from ``cmd``."""
        if cmd.snapshot is not None:
            raise InvalidRequestError("a create from a snapshot goes through the snapshot service")
        template, cpu, memory, disk, timeout = self._validate(cmd)
        policy_doc: dict[str, Any] | None = None
        compiled: CompiledPolicy | None = None
        if self._network is not None:
            parsed = self._network.parse(cmd.network)
            compiled = self._network.compile(parsed)
            policy_doc = parsed.model_dump(mode="json")
        elif cmd.network is not None:
            raise InvalidRequestError("networking is disabled on this server; omit 'network'")
        resolved = self._templates.resolve(template, who.tenant_id)
        # The sandbox pins the version it is made of: a newer build never changes its layers.
        template = resolved.ref
        live_for_tenant = self.live_count(who.tenant_id)
        if pool is None and live_for_tenant >= self._config.limits.max_sandboxes_per_tenant:
            raise QuotaExceededError(
                f"tenant {who.tenant_id} already has {live_for_tenant} live sandboxes "
                f"(limit {self._config.limits.max_sandboxes_per_tenant}); kill some first"
            )
        sid = "sb-" + secrets.token_hex(6)
        if secret_state is None and cmd.secrets:
            if self._binder is None:
                raise InvalidRequestError("this server keeps no secrets; omit 'secrets'")
            env = {**resolved.version.settings.env, **cmd.env}
            secret_state = await self._binder.prepare(
                sid, who.tenant_id, cmd.secrets, compiled, env
            )
        secret_doc = secret_state.to_doc() if secret_state is not None else None
        now = _now()
        sb = Sandbox(
            id=sid,
            tenant_id=who.tenant_id,
            template=template,
            runtime=cmd.isolation,
            state=SandboxState.CREATING,
            cpu=cpu,
            memory_mb=memory,
            disk_mb=disk,
            timeout=timeout,
            created_at=now,
            expires_at=now + timedelta(seconds=timeout),
            env=dict(cmd.env),
            metadata=dict(cmd.metadata),
            network=policy_doc,
            access_token=secrets.token_urlsafe(24) if self._network is not None else None,
            public_ports=cmd.public_ports,
            on_timeout=cmd.on_timeout,
            idle_timeout=cmd.idle_timeout,
            on_idle=cmd.on_idle,
            auto_resume=cmd.auto_resume,
            pool=pool,
            scopes=tuple(cmd.scopes),
            secrets=secret_doc,
        )
        lock = self._locks.setdefault(sid, asyncio.Lock())
        async with lock:
            self._live[sid] = sb
            await self._store.add_sandbox(
                SandboxRow(
                    id=sid,
                    tenant_id=sb.tenant_id,
                    template=template,
                    runtime=sb.runtime,
                    state=sb.state.value,
                    cpu=cpu,
                    memory_mb=memory,
                    disk_mb=disk,
                    timeout_s=timeout,
                    env=dict(cmd.env),
                    meta=dict(cmd.metadata),
                    scopes=list(cmd.scopes),
                    secrets=secret_doc,
                    created_at=now,
                    expires_at=sb.expires_at,
                    network=policy_doc,
                    access_token=sb.access_token,
                    public_ports=int(cmd.public_ports),
                    on_timeout=cmd.on_timeout,
                    idle_timeout_s=cmd.idle_timeout,
                    on_idle=cmd.on_idle,
                    auto_resume=int(cmd.auto_resume),
                    pool=pool,
                )
            )
            spec = replace(self._spec(sb, resolved), snapshot=snapshot)
            try:
                await self._runtime.create(spec)
                if secret_state is not None and self._binder is not None:
                    # Before anything of the template's runs: its first request may be one.
                    agent = AgentClient(lambda: self._runtime.open_agent(sid))
                    await self._binder.install(agent, secret_state)
                if snapshot is None or cmd.isolation == "container":
                    # (A microvm snapshot carries its processes, the start command's too.)
                    await self._start_template(sid, resolved)
            except BaseException as e:
                # A failed create leaves no trace: not on the host (the runtime promises that, and
                # destroy is idempotent belt and braces), not in the store.
                with contextlib.suppress(Exception):
                    await self._runtime.destroy(sid)
                if self._network is not None:
                    address = self._live.get(sid, sb).address
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._network.detach(sid, address))
                self._live.pop(sid, None)
                self._locks.pop(sid, None)
                if secret_state is not None and self._binder is not None:
                    self._binder.forget(secret_state)
                await self._store.delete_sandbox(sid)
                if isinstance(e, CorralError | asyncio.CancelledError):
                    raise
                raise RuntimeFailure(f"sandbox create failed: {e}") from e
            sb = self._live[sid]  # with the address the network layer gave it
            if pool is not None:  # timeless until taken
                await self._warm_up(sid)
                sb = self._transition(sb, SandboxState.POOLED, expires_at=None)
                await self._store.update_sandbox(sid, state=sb.state.value, expires_at=None)
                return sb
            # The timeout counts from when the sandbox is usable, not from when it was asked for.
            started = _now()
            sb = self._transition(
                sb, SandboxState.RUNNING, expires_at=started + timedelta(seconds=timeout)
            )
            await self._store.update_sandbox(sid, state=sb.state.value, expires_at=sb.expires_at)
            return sb

    async def _warm_up(self, sandbox_id: str) -> None:
        """One throwaway exec in a pooled sandbox, so that its taker's first exec does not pay
        for the agent's first process (~5 ms: faulting in the exec path)."""

        client = AgentClient(lambda: self._runtime.open_agent(sandbox_id))
        with contextlib.suppress(CorralError, OSError):
            _, events = await client.exec_stream(ExecRequest(argv=["/bin/true"], stdin=False))
            async for _ in events:
                pass

    def shape(self, cmd: CreateSandbox, tenant: str) -> tuple[str, str, float, int, int]:
        """What a create asks for that a warm pool must match: template (pinned to the version
        a create makes now), tier, CPU, memory and disk, resolved (defaults applied) and
        validated as the create itself would be."""
        template, cpu, memory, disk, _ = self._validate(cmd)
        template = self._templates.resolve(template, tenant).ref  # 400 when there is none
        return template, cmd.isolation, cpu, memory, disk

    def pin(self, template: str, tenant: str) -> str:
        """The pinned reference a create of ``template`` by ``tenant`` would record now (the
        reference itself when it names nothing)."""
        try:
            return self._templates.resolve(template, tenant).ref
        except CorralError:
            return template

    async def _start_template(self, sandbox_id: str, resolved: Resolved) -> None:
        """Start the template's start command and wait for its ready check to pass; on
        timeout a ``TimeoutError`` naming the check and what it last printed (the caller
        removes the sandbox)."""
        settings = resolved.version.settings
        if settings.start_cmd is None and settings.ready_cmd is None:
            return
        agent = AgentClient(lambda: self._runtime.open_agent(sandbox_id))
        cwd = settings.workdir or None
        user = settings.user or None
        if settings.start_cmd is not None:
            await agent.spawn(
                ExecRequest(
                    argv=list(settings.start_cmd), cwd=cwd, user=user, stdin=False, tag="start"
                )
            )
        if settings.ready_cmd is None:
            return
        deadline = asyncio.get_running_loop().time() + settings.ready_timeout
        delay = 0.02
        last = b""
        code: int | None = None
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                shown = last.decode(errors="replace").strip()[-500:]
                raise ReadyTimeoutError(
                    f"template {resolved.ref}: the ready check {list(settings.ready_cmd)} did "
                    f"not pass within {settings.ready_timeout:g} s (last exit code {code}"
                    + (f", output: {shown}" if shown else "")
                    + ")"
                )
            out = bytearray()
            try:
                _, events = await agent.exec_stream(
                    ExecRequest(argv=list(settings.ready_cmd), cwd=cwd, user=user, stdin=False)
                )

                async def drain(
                    events: AsyncIterator[OutputEvent] = events, out: bytearray = out
                ) -> int | None:
                    async for ev in events:
                        if ev.kind == "exit":
                            code: int | None = ev.exit_code
                            return code
                        out.extend(ev.data)
                        del out[:-2000]
                    return None

                code = await asyncio.wait_for(drain(), max(left, 0.01))
            except TimeoutError:
                code = None
            last = bytes(out)
            if code == 0:
                return
            await asyncio.sleep(min(delay, max(0.0, deadline - asyncio.get_running_loop().time())))
            delay = min(delay * 2, 0.5)

    def exec_defaults(self, sandbox_id: str) -> tuple[str | None, str | None]:
        """The working directory and user a command runs with when it names none: the
        template's WORKDIR and USER, as ``docker exec`` does."""
        sb = self._live.get(sandbox_id)
        if sb is None:
            return None, None
        try:
            settings = self._templates.settings_of(sb.template)
        except CorralError:
            return None, None
        return settings.workdir or None, settings.user or None

    async def take_pooled(self, who: Principal, cmd: CreateSandbox, sandbox_id: str) -> Sandbox:
        """Hand the pooled sandbox to ``who`` with the create's own settings — environment
        (through the agent: no restart), metadata, timeout, policies, network rules — as if
        it had just been made for this create. ``ConflictError`` when it is no longer
        there to take (taken, or dead: then it goes)."""
        policy_doc: dict[str, Any] | None = None
        if self._network is not None:
            policy_doc = self._network.parse(cmd.network).model_dump(mode="json")
        elif cmd.network is not None:
            raise InvalidRequestError("networking is disabled on this server; omit 'network'")
        _, _, _, _, timeout = self._validate(cmd)
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._live.get(sandbox_id)
            if sb is None or sb.state is not SandboxState.POOLED or sb.tenant_id != who.tenant_id:
                raise ConflictError(f"pooled sandbox {sandbox_id} is gone")
            if not await self._runtime.is_running(sandbox_id):
                self.spawn_task(
                    self._kill(sandbox_id, reason="died in its warm pool"), f"pool-{sandbox_id}"
                )
                raise ConflictError(f"pooled sandbox {sandbox_id} died")
            if cmd.secrets:
                raise InvalidRequestError("a sandbox with secrets is never taken from a pool")
            template_env = self._templates.settings_of(sb.template).env
            env = _environment(sandbox_id, {**template_env, **cmd.env})
            if cmd.env:
                agent = AgentClient(lambda: self._runtime.open_agent(sandbox_id))
                await agent.set_env(env)
            if self._network is not None and policy_doc != sb.network:
                await self._network.update(sandbox_id, self._network.parse(policy_doc))
            now = _now()
            changes: dict[str, Any] = {
                "env": dict(cmd.env),
                "metadata": dict(cmd.metadata),
                "timeout": timeout,
                "created_at": now,
                "expires_at": now + timedelta(seconds=timeout),
                "network": policy_doc,
                "access_token": secrets.token_urlsafe(24) if self._network is not None else None,
                "public_ports": cmd.public_ports,
                "on_timeout": cmd.on_timeout,
                "idle_timeout": cmd.idle_timeout,
                "on_idle": cmd.on_idle,
                "auto_resume": cmd.auto_resume,
                "scopes": tuple(cmd.scopes),
            }
            sb = self._transition(sb, SandboxState.RUNNING, **changes)
            stored = {k: v for k, v in changes.items() if k not in _RENAMED}
            stored["scopes"] = list(cmd.scopes)
            stored.update({_RENAMED[k]: changes[k] for k in _RENAMED})
            stored["public_ports"] = int(cmd.public_ports)
            stored["auto_resume"] = int(cmd.auto_resume)
            # Recorded before the caller hears of it (a crash must not hand it out twice),
            # synchronously when the database is free: this write was half of a hand-over.
            if not self._store.update_sandbox_now(sandbox_id, state=sb.state.value, **stored):
                await self._store.update_sandbox(sandbox_id, state=sb.state.value, **stored)
            self.touch(sandbox_id)
            return sb

    async def pause(self, who: Principal, sandbox_id: str) -> Sandbox:
        """Freeze the sandbox: zero CPU, memory kept; its timeout clock stops until resumed."""
        sb = await self.get(who, sandbox_id)
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._current(sandbox_id)
            if sb.state is SandboxState.PAUSED:
                raise ConflictError(f"sandbox {sandbox_id} is already paused")
            if sb.state is not SandboxState.RUNNING:
                raise SandboxNotRunningError(
                    f"sandbox {sandbox_id} is {sb.state.value}, not running"
                )
            return await self._pause_locked(sb)

    async def _pause_locked(self, sb: Sandbox) -> Sandbox:
        await self._runtime.pause(sb.id)
        now = _now()
        remaining = (
            max(0.0, (sb.expires_at - now).total_seconds()) if sb.expires_at is not None else None
        )
        sb = self._transition(
            sb, SandboxState.PAUSED, paused_at=now, paused_remaining_s=remaining, expires_at=None
        )
        await self._store.update_sandbox(
            sb.id,
            state=sb.state.value,
            paused_at=now,
            paused_remaining_s=remaining,
            expires_at=None,
        )
        return sb

    async def resume(self, who: Principal, sandbox_id: str) -> Sandbox:
        """Thaw a paused sandbox (a running one is left as it is)."""
        sb = await self.get(who, sandbox_id)
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._current(sandbox_id)
            if sb.state is SandboxState.RUNNING:
                return sb
            if sb.state not in (SandboxState.PAUSED, SandboxState.HIBERNATED):
                raise SandboxNotRunningError(f"sandbox {sandbox_id} is {sb.state.value}")
            return await self._resume_locked(sb)

    async def _resume_locked(self, sb: Sandbox) -> Sandbox:
        if sb.state is SandboxState.HIBERNATED:
            return await self._wake_locked(sb)
        await self._runtime.resume(sb.id)
        return await self._running_again(sb)

    async def _running_again(self, sb: Sandbox) -> Sandbox:
        """Back to RUNNING after a pause or a hibernation: the stopped clock goes on."""
        now = _now()
        remaining = sb.paused_remaining_s
        # Paused by its own timeout (on_timeout="pause"): a resume starts a fresh lifetime.
        if remaining is None or remaining <= 0:
            remaining = float(sb.timeout)
        expires = now + timedelta(seconds=remaining)
        sb = self._transition(
            sb, SandboxState.RUNNING, expires_at=expires, paused_at=None, paused_remaining_s=None
        )
        await self._store.update_sandbox(
            sb.id, state=sb.state.value, expires_at=expires, paused_at=None, paused_remaining_s=None
        )
        self.touch(sb.id)
        return sb

    @contextlib.asynccontextmanager
    async def _running(
        self, who: Principal, sandbox_id: str, *, paused_too: bool = False
    ) -> AsyncIterator[Sandbox]:
        """The tenant's sandbox, held under its lock, provided it is running (or paused)."""
        sb = await self.get(who, sandbox_id)
        allowed = (
            {SandboxState.RUNNING, SandboxState.PAUSED} if paused_too else {SandboxState.RUNNING}
        )
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._current(sandbox_id)
            if sb.state not in allowed:
                raise SandboxNotRunningError(
                    f"sandbox {sandbox_id} is {sb.state.value}, not running"
                )
            yield sb

    @staticmethod
    def _env_of(sb: Sandbox, template_env: Mapping[str, str]) -> dict[str, str]:
        """The template's variables, the caller's, then the secret placeholders and CA paths."""
        state = sb.secret_state
        extra = state.environment() if state is not None else {}
        return {**template_env, **sb.env, **extra}

    def _bound(self, sb: Sandbox) -> SandboxSecrets | None:
        """What the egress proxy needs to inject ``sb``'s secrets."""
        state = sb.secret_state
        if state is None or self._binder is None:
            return None
        return self._binder.view(state)

    def _spec(self, sb: Sandbox, resolved: Resolved) -> SandboxSpec:
        """What the runtime needs to start ``sb`` (at create, and again at wake)."""
        spec = SandboxSpec(
            sandbox_id=sb.id,
            layers=resolved.layers,
            cpu=sb.cpu,
            memory_mb=sb.memory_mb,
            disk_mb=sb.disk_mb,
            pids_max=self._config.limits.pids_per_sandbox,
            hostname=sb.id,
            isolation=sb.runtime,
            env=_environment(sb.id, self._env_of(sb, resolved.version.settings.env)),
        )
        network = self._network
        if network is None:
            return spec
        policy = network.parse(sb.network)
        bound = self._bound(sb)

        async def plumb(netns: Path) -> Path:
            attachment = await network.attach(
                sb.id, sb.tenant_id, policy, join=netns, secrets=bound
            )
            self._live[sb.id] = replace(self._live[sb.id], address=attachment.address)
            # Recorded before the sandbox runs, so that after a crash from here on reconcile
            # still finds it and frees the address.
            await self._store.update_sandbox(sb.id, address=attachment.address)
            return attachment.netns

        return replace(spec, network=plumb, nameservers=(network.service_ip,))

    async def hibernate(self, who: Principal, sandbox_id: str) -> Sandbox:
        """Stop every process and free the sandbox's memory, keeping its disk; the timeout
        clock stops as for a pause. Wake it with ``resume``."""
        sb = await self.get(who, sandbox_id)
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._current(sandbox_id)
            if sb.state is SandboxState.HIBERNATED:
                raise ConflictError(f"sandbox {sandbox_id} is already hibernated")
            if sb.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                raise SandboxNotRunningError(
                    f"sandbox {sandbox_id} is {sb.state.value}, not running"
                )
            return await self._hibernate_locked(sb)

    async def _hibernate_locked(self, sb: Sandbox) -> Sandbox:
        changes = _asleep(sb)
        try:
            await self._runtime.hibernate(sb.id)
            if self._network is not None:
                await self._network.detach(sb.id, sb.address)
        except InvalidRequestError:
            raise  # a request the tier refuses before touching anything
        except CorralError as e:
            sb = self._transition(sb, SandboxState.ERROR, error=f"hibernate failed: {e.message}")
            await self._store.update_sandbox(sb.id, state=sb.state.value, error=sb.error)
            raise
        sb = self._transition(sb, SandboxState.HIBERNATED, **changes)
        await self._store.update_sandbox(sb.id, state=sb.state.value, **changes)
        self._cpu_mark.pop(sb.id, None)
        return sb

    async def _wake_locked(self, sb: Sandbox) -> Sandbox:
        """Start a hibernated sandbox again on its disk: a container's processes start afresh,
        a microvm's carry on from its saved memory."""
        spec = self._spec(sb, self._templates.resolve(sb.template))
        try:
            await self._runtime.wake(spec)
        except BaseException:
            # The runtime left it hibernated; its network must go too.
            if self._network is not None:
                address = self._live.get(sb.id, sb).address
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._network.detach(sb.id, address))
            self._live[sb.id] = replace(self._live.get(sb.id, sb), address=None)
            with contextlib.suppress(Exception):
                await self._store.update_sandbox(sb.id, address=None)
            raise
        sb = self._live[sb.id]
        await self._restart_template(sb)
        return await self._running_again(sb)

    async def _restart_template(self, sb: Sandbox) -> None:
        """A container that woke (or restarted on a snapshot) has no processes left: its
        template's start command runs again. A failure is logged, not fatal: the sandbox and
        its files are there, and the caller can start the service itself."""
        if sb.runtime != "container":
            return  # a microvm's processes carry on from its saved memory
        try:
            await self._start_template(sb.id, self._templates.resolve(sb.template))
        except CorralError as e:
            log.warning("sandbox %s: start command after wake: %s", sb.id, e.message)

    async def snapshot_disk(
        self, who: Principal, sandbox_id: str, snapshot_id: str
    ) -> tuple[Sandbox, int]:
        """Capture the filesystem of a running, paused or hibernated sandbox as ``snapshot_id``
        without stopping it (a paused or hibernated one stays so); returns its size in bytes."""
        sb = await self.get(who, sandbox_id)
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._current(sandbox_id)
            if sb.state not in _HAS_DISK:
                raise SandboxNotRunningError(
                    f"sandbox {sandbox_id} is {sb.state.value}: only a running, paused or "
                    "hibernated sandbox can be snapshotted"
                )
            size = await self._runtime.snapshot(sandbox_id, snapshot_id)
            self.touch(sandbox_id)
            return sb, size

    async def restore(
        self,
        who: Principal,
        sandbox_id: str,
        snapshot_id: str,
        *,
        template: str,
        disk_mb: int,
        isolation: str,
    ) -> Sandbox:
        """Bring the sandbox's filesystem back to the snapshot: its processes stop, its disk
        becomes a copy of the snapshot, and it starts again (running, its timeout clock going
        on). Interrupted anywhere, it is left hibernated with either disk whole."""
        sb = await self.get(who, sandbox_id)
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._current(sandbox_id)
            if sb.state not in _HAS_DISK:
                raise SandboxNotRunningError(
                    f"sandbox {sandbox_id} is {sb.state.value}; only a live sandbox can be restored"
                )
            if isolation != sb.runtime:
                raise InvalidRequestError(
                    f"snapshot {snapshot_id} is of a {isolation} sandbox; {sandbox_id} is a "
                    f"{sb.runtime}: fork the snapshot instead"
                )
            if template != sb.template or disk_mb != sb.disk_mb:
                raise InvalidRequestError(
                    f"snapshot {snapshot_id} is of template {template!r} with a {disk_mb} MiB "
                    f"disk; sandbox {sandbox_id} has {sb.template!r} and {sb.disk_mb} MiB"
                )
            if sb.state is SandboxState.HIBERNATED:
                await self._runtime.restore_disk(sandbox_id, snapshot_id)
                return await self._wake_locked(sb)
            return await self._restart_on(sb, snapshot_id)

    async def _restart_on(self, sb: Sandbox, snapshot_id: str) -> Sandbox:
        """Restart a running or paused sandbox on a copy of the snapshot, keeping its network
        (address, rules, namespace): unplumbing and plumbing again cost more than the rest of a
        restore together. Until it runs again the store still says running or paused; a crash
        in between is found by ``reconcile`` (init dead, disk kept) and hibernates it."""
        spec = self._spec(sb, self._templates.resolve(sb.template))
        netns = self._network.netns_of(sb.id) if self._network is not None else None
        if self._network is not None and netns is None:
            raise RuntimeFailure(f"sandbox {sb.id} lost its network namespace")
        spec = replace(spec, network=None, netns=netns)
        try:
            # Its current memory is about to be replaced: not worth saving.
            await self._runtime.hibernate(sb.id, keep_memory=False)
            await self._runtime.restore_disk(sb.id, snapshot_id)
            await self._runtime.wake(spec)
        except BaseException as e:
            # Left as a hibernated sandbox (its disk whole, the old one or the snapshot's),
            # which wakes on next use like any other.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._runtime.hibernate(sb.id))
            with contextlib.suppress(Exception):
                await asyncio.shield(self._hibernate_locked(sb))
            if isinstance(e, CorralError | asyncio.CancelledError):
                raise
            raise RuntimeFailure(f"restore of {sb.id} failed: {e}") from e
        self._cpu_mark.pop(sb.id, None)
        await self._restart_template(sb)
        if sb.state is SandboxState.PAUSED:
            return await self._running_again(sb)
        self.touch(sb.id)
        return sb

    async def set_timeout(self, who: Principal, sandbox_id: str, seconds: int) -> Sandbox:
        if seconds > self._config.limits.max_timeout_s:
            raise InvalidRequestError(
                f"timeout must be at most {self._config.limits.max_timeout_s} seconds, got {seconds}"
            )
        async with self._running(who, sandbox_id, paused_too=True) as sb:
            if sb.state is SandboxState.PAUSED:
                # The clock stays stopped: the new lifetime starts counting at resume.
                sb = replace(sb, timeout=seconds, paused_remaining_s=float(seconds))
                await self._store.update_sandbox(
                    sandbox_id, timeout_s=seconds, paused_remaining_s=float(seconds)
                )
            else:
                sb = replace(sb, timeout=seconds, expires_at=_now() + timedelta(seconds=seconds))
                await self._store.update_sandbox(
                    sandbox_id, timeout_s=seconds, expires_at=sb.expires_at
                )
            self._live[sandbox_id] = sb
            return sb

    async def update_network(self, who: Principal, sandbox_id: str, document: Any) -> Sandbox:
        """Replace a running sandbox's network policy; on failure the old one stays in force."""
        if self._network is None:
            raise InvalidRequestError("networking is disabled on this server")
        policy = self._network.parse(document)
        async with self._running(who, sandbox_id, paused_too=True) as sb:
            if sb.address is None:
                raise InvalidRequestError(f"sandbox {sandbox_id} was created without a network")
            await self._network.update(sandbox_id, policy)
            doc = policy.model_dump(mode="json")
            sb = replace(sb, network=doc)
            self._live[sandbox_id] = sb
            await self._store.update_sandbox(sandbox_id, network=doc)
            return sb

    async def network_log(
        self, who: Principal, sandbox_id: str, *, after_id: int = 0, limit: int = 1000
    ) -> builtins.list[dict[str, Any]]:
        """The sandbox's egress decisions, oldest first, after event ``after_id``."""
        sb = await self.get(who, sandbox_id)
        if self._network is None:
            return []
        rows = await self._network.events(sb.id, after_id=after_id, limit=limit)
        return [
            {
                "id": r.id,
                "time": r.time,
                "kind": r.kind,
                "decision": r.decision,
                "reason": r.reason,
                "name": r.name,
                "ip": r.ip,
                "port": r.port,
                "bytes_out": r.bytes_out,
                "bytes_in": r.bytes_in,
            }
            for r in rows
        ]

    def live_sandbox(self, sandbox_id: str) -> Sandbox | None:
        return self._live.get(sandbox_id)

    def live_sandboxes(self) -> builtins.list[Sandbox]:
        """Every sandbox that may exist on the host now, warm pools' own excluded."""
        return [sb for sb in self._live.values() if not _in_pool(sb)]

    async def kill(self, who: Principal, sandbox_id: str) -> None:
        sb = await self.get(who, sandbox_id)
        await self._kill(sb.id, reason=None)

    async def discard_pooled(self, sandbox_id: str, reason: str) -> None:
        """Kill a sandbox still waiting in its warm pool (the pool shrank or went)."""
        sb = self._live.get(sandbox_id)
        if sb is not None and sb.state is SandboxState.POOLED:
            await self._kill(sandbox_id, reason=reason, still=_still_pooled)

    async def _kill(
        self,
        sandbox_id: str,
        *,
        reason: str | None,
        still: Callable[[Sandbox], Awaitable[bool]] | None = None,
    ) -> None:
        """Tear the sandbox down; ``still``: re-checked under the lock, so that a reason seen
        without it (by the reaper) still holds — another operation may have run meanwhile."""
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._live.get(sandbox_id)
            if sb is None:
                return  # already stopped: kill is idempotent
            if still is not None and not await still(sb):
                return
            sb = self._transition(sb, SandboxState.STOPPING)
            await self._store.update_sandbox(sandbox_id, state=sb.state.value)
            try:
                await self._runtime.destroy(sandbox_id)
                if self._network is not None:
                    await self._network.detach(sandbox_id, sb.address)
            except CorralError as e:
                sb = self._transition(sb, SandboxState.ERROR, error=f"teardown failed: {e.message}")
                await self._store.update_sandbox(sandbox_id, state=sb.state.value, error=sb.error)
                raise
            self._transition(sb, SandboxState.STOPPED)
            await self._store.update_sandbox(
                sandbox_id, state=SandboxState.STOPPED.value, ended_at=_now(), error=reason
            )
            self._live.pop(sandbox_id, None)
            state = sb.secret_state
            if state is not None and self._binder is not None:
                self._binder.forget(state)
            for book in (self._activity, self._busy, self._cpu_mark):
                book.pop(sandbox_id, None)
        self._locks.pop(sandbox_id, None)

    def _transition(self, sb: Sandbox, target: SandboxState, **changes: Any) -> Sandbox:
        check_transition(sb.state, target)
        new = replace(sb, state=target, **changes)
        if target is not SandboxState.STOPPED:
            self._live[sb.id] = new
        return new

    def spawn_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run work the service owns beyond one request; awaited at stop."""
        t = asyncio.create_task(coro, name=name)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    # --- timeouts ---------------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.reap_interval_s)
            try:
                await self.reap_once()
            except Exception:  # the reaper must outlive any one bad sandbox
                log.exception("reaper pass failed")

    async def reap_once(self) -> None:
        """Tear down sandboxes past their timeout, and those whose init died under them."""
        now = _now()
        for sb in list(self._live.values()):
            if sb.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                continue
            lock = self._locks.get(sb.id)
            if lock is not None and lock.locked():
                continue  # an operation is changing it (hibernate stops its init on purpose)
            if not await self._runtime.is_running(sb.id):
                # Killed from the host or by the OOM killer: what is left must still go, and
                # callers must see why instead of a sandbox that is "running" but never answers.
                reason = "the sandbox's init process exited (killed, or out of memory)"
                self.spawn_task(self._expire(sb.id, reason, self._init_dead), f"dead-{sb.id}")
            elif sb.state is not SandboxState.RUNNING:
                continue
            elif sb.expires_at is not None and sb.expires_at <= now:
                if sb.on_timeout in ("pause", "hibernate"):
                    self.spawn_task(
                        self._auto_pause(sb.id, "timeout", sb.on_timeout), f"pause-{sb.id}"
                    )
                else:
                    self.spawn_task(
                        self._expire(sb.id, "timeout reached", self._expired), f"expire-{sb.id}"
                    )
            elif sb.idle_timeout is not None and await self._idle(sb):
                if sb.on_idle == "kill":
                    self.spawn_task(self._expire(sb.id, "idle", self._still_idle), f"idle-{sb.id}")
                else:
                    self.spawn_task(self._auto_pause(sb.id, "idle", sb.on_idle), f"pause-{sb.id}")

    async def _init_dead(self, sb: Sandbox) -> bool:
        return sb.state in (
            SandboxState.RUNNING,
            SandboxState.PAUSED,
        ) and not await self._runtime.is_running(sb.id)

    async def _expired(self, sb: Sandbox) -> bool:
        return (
            sb.state is SandboxState.RUNNING
            and sb.expires_at is not None
            and sb.expires_at <= _now()
        )

    async def _asleep_or_expired(self, sb: Sandbox) -> bool:
        return sb.state is SandboxState.ERROR or await self._expired(sb)

    async def _still_idle(self, sb: Sandbox) -> bool:
        unused = time.monotonic() - self._activity.get(sb.id, 0.0)
        return (
            sb.state is SandboxState.RUNNING
            and not self._busy.get(sb.id)
            and unused >= (sb.idle_timeout or 0)
        )

    async def _idle(self, sb: Sandbox) -> bool:
        """No API use for ``idle_timeout`` s, nobody attached, and < 5 % of a core since."""
        assert sb.idle_timeout is not None
        mono = time.monotonic()
        last = self._activity.setdefault(sb.id, mono)
        if self._busy.get(sb.id) or mono - last < sb.idle_timeout:
            return False
        try:
            cpu = await self._runtime.cpu_seconds(sb.id)
        except CorralError:
            return False
        mark = self._cpu_mark.get(sb.id)
        if mark is None:
            self._cpu_mark[sb.id] = (mono, cpu)
            return False
        window = mono - mark[0]
        if window < _IDLE_CPU_WINDOW_S:
            return False
        if (cpu - mark[1]) / window >= _IDLE_CPU_SHARE:
            self._cpu_mark[sb.id] = (mono, cpu)  # busy on its own: look again later
            return False
        return True

    async def _auto_pause(self, sandbox_id: str, why: str, how: str) -> None:
        """Pause or hibernate (``how``) a sandbox on its own idle or timeout policy."""
        async with self._locks.setdefault(sandbox_id, asyncio.Lock()):
            sb = self._live.get(sandbox_id)
            if sb is None or sb.state is not SandboxState.RUNNING:
                return
            # Seen without the lock: someone may have used it, or extended it, meanwhile.
            if not await (self._expired(sb) if why == "timeout" else self._still_idle(sb)):
                return
            try:
                if how == "hibernate":
                    await self._hibernate_locked(sb)
                else:
                    await self._pause_locked(sb)
            except CorralError:
                log.exception("could not %s sandbox %s (%s)", how, sandbox_id, why)
                failed = True
            else:
                failed = False
        if failed:
            if why == "timeout":
                # Its lifetime is over either way: one that cannot sleep is killed.
                await self._expire(
                    sandbox_id, f"timeout reached ({how} failed)", self._asleep_or_expired
                )
            return
        log.info(
            "%s sandbox %s (%s)", "hibernated" if how == "hibernate" else "paused", sandbox_id, why
        )

    async def _expire(
        self, sandbox_id: str, reason: str, still: Callable[[Sandbox], Awaitable[bool]]
    ) -> None:
        try:
            await self._kill(sandbox_id, reason=reason, still=still)
        except CorralError:
            log.exception("could not tear down expired sandbox %s", sandbox_id)
