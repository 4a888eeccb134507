"""Persistent control-plane state."""

from corral.store.db import Store
from corral.store.models import ApiKeyRow, EgressEventRow, SandboxRow, TenantRow

__all__ = ["ApiKeyRow", "EgressEventRow", "SandboxRow", "Store", "TenantRow"]
