"""Response bodies. Requests are the typed commands of ``corral.core.commands``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from corral.agent import FileInfo, ProcessInfo
from corral.core.pools import Pool
from corral.core.sandboxes import Sandbox
from corral.core.snapshots import Snapshot
from corral.core.templates import Version

__all__ = [
    "CollectOut",
    "EgressEventOut",
    "ErrorBody",
    "FileInfoOut",
    "ImportIn",
    "LayerOut",
    "NetworkOut",
    "ProcessOut",
    "SandboxOut",
    "SnapshotOut",
    "TagIn",
    "TemplateOut",
]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class NetworkOut(BaseModel):
    address: str | None
    policy: dict[str, Any]
    # An explicit HTTP(S) proxy for tools that want one; traffic is filtered either way.
    proxy: str | None = None


class SandboxOut(BaseModel):
    id: str
    tenant_id: str
    template: str
    runtime: str  # the isolation tier: "container" or "microvm"
    state: str
    cpu: float
    memory_mb: int
    disk_mb: int
    timeout: int
    metadata: dict[str, str]
    # Only the names: values may be secrets and are not echoed back.
    env_keys: list[str]
    created_at: datetime
    expires_at: datetime | None
    ended_at: datetime | None
    error: str | None
    network: NetworkOut | None = None
    # Presented to reach the sandbox's ports through the server (unless public_ports).
    access_token: str | None = None
    public_ports: bool = False
    # Set when the server also serves ports as "{port}-{id}.{ingress_domain}".
    ingress_domain: str | None = None
    paused_at: datetime | None = None
    on_timeout: str = "kill"
    idle_timeout: int | None = None
    on_idle: str = "pause"
    auto_resume: bool = True
    pool: str | None = None  # the name of the warm pool it came from
    scopes: list[str] = Field(default_factory=list)  # in its identity tokens
    # Its secret bindings: name, hosts, env, header and the placeholder it holds (never a
    # value; docs/secrets.md).
    secrets: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def of(
        cls,
        sb: Sandbox,
        proxy: str | None = None,
        ingress_domain: str | None = None,
        pool: str | None = None,
    ) -> SandboxOut:
        return cls(
            id=sb.id,
            tenant_id=sb.tenant_id,
            template=sb.template,
            runtime=sb.runtime,
            state=sb.state.value,
            cpu=sb.cpu,
            memory_mb=sb.memory_mb,
            disk_mb=sb.disk_mb,
            timeout=sb.timeout,
            metadata=dict(sb.metadata),
            env_keys=sorted(sb.env),
            created_at=sb.created_at,
            expires_at=sb.expires_at,
            ended_at=sb.ended_at,
            error=sb.error,
            network=(
                NetworkOut(address=sb.address, policy=dict(sb.network), proxy=proxy)
                if sb.network is not None
                else None
            ),
            access_token=sb.access_token,
            public_ports=sb.public_ports,
            ingress_domain=ingress_domain if sb.network is not None else None,
            paused_at=sb.paused_at,
            on_timeout=sb.on_timeout,
            idle_timeout=sb.idle_timeout,
            on_idle=sb.on_idle,
            auto_resume=sb.auto_resume,
            pool=pool,
            scopes=list(sb.scopes),
            secrets=state.public() if (state := sb.secret_state) is not None else [],
        )


class EgressEventOut(BaseModel):
    id: int
    time: float
    kind: str
    decision: str
    reason: str
    name: str | None
    ip: str | None
    port: int | None
    bytes_out: int
    bytes_in: int


class ProcessOut(BaseModel):
    pid: int
    cmd: list[str]
    cwd: str
    user: str
    tag: str | None
    pty: bool
    running: bool
    exit_code: int | None
    started_at: float

    @classmethod
    def of(cls, p: ProcessInfo) -> ProcessOut:
        return cls(
            pid=p.pid,
            cmd=list(p.argv),
            cwd=p.cwd,
            user=p.user,
            tag=p.tag,
            pty=p.pty,
            running=p.running,
            exit_code=p.exit_code,
            started_at=p.started_at,
        )


class FileInfoOut(BaseModel):
    name: str
    path: str
    type: str
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    link_target: str | None

    @classmethod
    def of(cls, f: FileInfo) -> FileInfoOut:
        return cls(
            name=f.name,
            path=f.path,
            type=f.type,
            size=f.size,
            mode=f.mode,
            mtime=f.mtime,
            uid=f.uid,
            gid=f.gid,
            link_target=f.link_target,
        )


class LayerOut(BaseModel):
    digest: str
    size_bytes: int


class TemplateOut(BaseModel):
    name: str
    version: int
    tags: list[str]
    builtin: bool
    description: str
    built: bool
    size_bytes: int | None
    built_at: str | None
    source: str
    image: str | None
    layers: list[LayerOut]
    start_cmd: list[str] | None
    ready_cmd: list[str] | None
    ready_timeout: float
    env: dict[str, str]
    workdir: str
    user: str

    @classmethod
    def of(cls, v: Version, *, built: bool = True) -> TemplateOut:
        s = v.settings
        builtin = v.source == "builtin"
        return cls(
            name=v.name,
            version=v.version,
            tags=list(v.tags),
            builtin=builtin,
            description=v.description,
            built=built,
            size_bytes=v.size_bytes if built else None,
            built_at=v.built_at or None,
            source=v.source,
            image=v.image,
            layers=[
                LayerOut(digest=layer.digest, size_bytes=layer.size_bytes) for layer in v.layers
            ],
            start_cmd=list(s.start_cmd) if s.start_cmd is not None else None,
            ready_cmd=list(s.ready_cmd) if s.ready_cmd is not None else None,
            ready_timeout=s.ready_timeout,
            env=dict(s.env),
            workdir=s.workdir,
            user=s.user,
        )


class TagIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=1024)
    username: str | None = Field(default=None, max_length=1024)
    password: str | None = Field(default=None, max_length=8192)


class CollectOut(BaseModel):
    layers_removed: int
    bytes_freed: int


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime


class KeyOut(BaseModel):
    id: str
    tenant_id: str
    name: str
    key: str


class MeOut(BaseModel):
    tenant_id: str
    admin: bool


class PidOut(BaseModel):
    pid: int


class ExistsOut(BaseModel):
    exists: bool


class CountOut(BaseModel):
    files: int


class SnapshotOut(BaseModel):
    id: str
    name: str
    sandbox_id: str  # the sandbox it was taken of (which may be gone)
    template: str
    disk_mb: int
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, snap: Snapshot) -> SnapshotOut:
        return cls(
            id=snap.id,
            name=snap.name,
            sandbox_id=snap.sandbox_id,
            template=snap.template,
            disk_mb=snap.disk_mb,
            size_bytes=snap.size_bytes,
            created_at=snap.created_at,
        )


class PoolOut(BaseModel):
    name: str
    template: str
    isolation: str
    cpu: float
    memory_mb: int
    disk_mb: int
    size: int  # how many it keeps ready
    ready: int  # how many are ready now
    created_at: datetime

    @classmethod
    def of(cls, pool: Pool) -> PoolOut:
        return cls(
            name=pool.name,
            template=pool.template,
            isolation=pool.isolation,
            cpu=pool.cpu,
            memory_mb=pool.memory_mb,
            disk_mb=pool.disk_mb,
            size=pool.size,
            ready=pool.ready,
            created_at=pool.created_at,
        )
