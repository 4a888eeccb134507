"""Persistent control-plane state."""

from corral.store.db import Store
from corral.store.models import ApiKeyRow, EgressEventRow, SandboxRow, SnapshotRow, TenantRow

__all__ = ["ApiKeyRow", "EgressEventRow", "SandboxRow", "SnapshotRow", "Store", "TenantRow"]
