"""Persistent control-plane state."""

from corral.store.db import Store
from corral.store.models import ApiKeyRow, SandboxRow, TenantRow

__all__ = ["ApiKeyRow", "SandboxRow", "Store", "TenantRow"]
