"""Services: lifecycle, processes, files, templates, tenants. Nothing here knows about HTTP.

The service container is ``corral.core.services.Services``; it is not re-exported here so that
importing a small piece of core (say, the state enum) does not pull in every runtime dependency.
The two names below are loaded on first use for the same reason: ``Principal`` lives with the
tenant store (SQLAlchemy), which ``corral run`` (local mode, no server) must not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.core.lifecycle import SandboxState
    from corral.core.tenants import Principal

__all__ = ["Principal", "SandboxState"]


def __getattr__(name: str) -> Any:
    if name == "SandboxState":
        from corral.core.lifecycle import SandboxState

        return SandboxState
    if name == "Principal":
        from corral.core.tenants import Principal

        return Principal
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
