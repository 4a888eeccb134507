"""Persistent control-plane state."""

from corral.store.db import Store
from corral.store.models import (
    ApiKeyRow,
    EgressEventRow,
    PoolRow,
    SandboxRow,
    SnapshotRow,
    TenantRow,
)

__all__ = [
    "ApiKeyRow",
    "EgressEventRow",
    "PoolRow",
    "SandboxRow",
    "SnapshotRow",
    "Store",
    "TenantRow",
]
