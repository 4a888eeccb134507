"""Tables of the control plane's state. Every object carries its tenant."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ApiKeyRow",
    "Base",
    "EgressEventRow",
    "PoolRow",
    "SandboxRow",
    "SecretRow",
    "SnapshotRow",
    "TenantRow",
]


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    # Only a hash is kept: a stolen database does not hand out working keys.
    key_hash: Mapped[str] = mapped_column(String(128), unique=True)
    admin: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    template: Mapped[str] = mapped_column(String(128))
    runtime: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    cpu: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[int] = mapped_column(Integer)
    env: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    network: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Guards ingress to the sandbox's ports (unless public_ports).
    access_token: Mapped[str | None] = mapped_column(String(128), nullable=True)
    public_ports: Mapped[int] = mapped_column(Integer, default=0)
    # Lifetime left when paused: the timeout clock stops while a sandbox is paused.
    paused_remaining_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    on_timeout: Mapped[str] = mapped_column(String(16), default="kill")
    idle_timeout_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    on_idle: Mapped[str] = mapped_column(String(16), default="pause")
    auto_resume: Mapped[int] = mapped_column(Integer, default=1)
    # The warm pool it was made for (pooled) or taken from; None: created on demand.
    pool: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # Scopes put in its identity tokens (issue 8).
    scopes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # Secret bindings (issue 8): {"ca": {...}, "bindings": [...]}; placeholders, never values.
    secrets: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class EgressEventRow(Base):
    """One decision about traffic leaving a sandbox (see ``corral.net.view.EgressEvent``)."""

    __tablename__ = "egress_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sandbox_id: Mapped[str] = mapped_column(String(64))
    time: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(8))
    decision: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(Text)
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    ip: Mapped[str | None] = mapped_column(String(256), nullable=True)
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)


class SnapshotRow(Base):
    """A filesystem snapshot of a sandbox; it outlives the sandbox until deleted."""

    __tablename__ = "snapshots"
    __table_args__ = (UniqueConstraint("sandbox_id", "name", name="uq_snapshots_sandbox_name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    sandbox_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    template: Mapped[str] = mapped_column(String(128))
    disk_mb: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The source sandbox's settings as a CreateSandbox document: what a fork starts with.
    source: Mapped[dict[str, Any]] = mapped_column(JSON)


class PoolRow(Base):
    """A tenant's warm pool: ``size`` sandboxes of one template and shape made in advance."""

    __tablename__ = "pools"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_pools_tenant_name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    template: Mapped[str] = mapped_column(String(128))
    runtime: Mapped[str] = mapped_column(String(32))
    cpu: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SecretRow(Base):
    """A tenant's secret, encrypted (AES-256-GCM under ``DATA_DIR/secrets.key``)."""

    __tablename__ = "secrets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    # Sealed with the tenant and name as associated data: a row copied to another tenant or
    # renamed does not decrypt.
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
