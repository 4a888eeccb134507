"""Sandbox lifecycle: an explicit state enum and the only transitions allowed between states."""

from __future__ import annotations

from enum import StrEnum

from corral.errors import ConflictError

__all__ = ["LIVE_STATES", "SandboxState", "check_transition"]


class SandboxState(StrEnum):
    CREATING = "creating"
    # Made in advance for a warm pool: running, owned by the pool's tenant, invisible to it and
    # timeless until a create takes it (then RUNNING, with the taker's settings).
    POOLED = "pooled"
    RUNNING = "running"
    # Every process frozen: no CPU, memory kept; resumes exactly where it stopped.
    PAUSED = "paused"
    # Processes gone, memory freed, only the disk kept (survives a host reboot); wakes afresh.
    HIBERNATED = "hibernated"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


_ALLOWED: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset(
        {SandboxState.RUNNING, SandboxState.POOLED, SandboxState.ERROR, SandboxState.STOPPING}
    ),
    SandboxState.POOLED: frozenset(
        {SandboxState.RUNNING, SandboxState.STOPPING, SandboxState.ERROR}
    ),
    SandboxState.RUNNING: frozenset(
        {SandboxState.PAUSED, SandboxState.HIBERNATED, SandboxState.STOPPING, SandboxState.ERROR}
    ),
    SandboxState.PAUSED: frozenset(
        {SandboxState.RUNNING, SandboxState.HIBERNATED, SandboxState.STOPPING, SandboxState.ERROR}
    ),
    SandboxState.HIBERNATED: frozenset(
        {SandboxState.RUNNING, SandboxState.STOPPING, SandboxState.ERROR}
    ),
    # A failed teardown leaves ERROR; a later kill, or reconcile at the next server start,
    # tries again. A finished teardown is final.
    SandboxState.STOPPING: frozenset({SandboxState.STOPPED, SandboxState.ERROR}),
    SandboxState.ERROR: frozenset({SandboxState.STOPPING}),
    SandboxState.STOPPED: frozenset(),
}

# States in which something may still exist on the host.
LIVE_STATES = frozenset(
    {
        SandboxState.CREATING,
        SandboxState.POOLED,
        SandboxState.RUNNING,
        SandboxState.PAUSED,
        SandboxState.HIBERNATED,
        SandboxState.STOPPING,
        SandboxState.ERROR,
    }
)


def check_transition(current: SandboxState, target: SandboxState) -> None:
    """Raise ConflictError unless ``current → target`` is a legal move."""
    if target not in _ALLOWED[current]:
        raise ConflictError(f"sandbox cannot go from {current.value} to {target.value}")
