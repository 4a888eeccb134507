"""The contract every isolation tier implements: basic operations only.

Lifecycle rules (states, timeouts, tenancy, reconciliation) live once in ``corral.core``; a
runtime only creates, destroys, inspects and connects to the agent inside a sandbox. Exec,
processes and files all go through the in-sandbox agent (``corral.agent``), so they work the
same for every tier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["Runtime", "SandboxSpec", "Usage"]


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a runtime needs to start one sandbox; validated by ``core`` beforehand."""

    sandbox_id: str
    # Read-only template layers, lowest first; each is a directory holding a root filesystem.
    layers: tuple[Path, ...]
    cpu: float = 1.0  # cores
    memory_mb: int = 512
    disk_mb: int = 2048
    pids_max: int = 1024
    hostname: str = "sandbox"
    # Environment every process in the sandbox starts with (exec may add to it).
    env: dict[str, str] = field(default_factory=dict)
    # Corral's network layer. The runtime makes the sandbox's network namespace (it must belong
    # to the sandbox's user namespace, which only the runtime knows), hands it to this hook as a
    # path before anything runs in the sandbox, and starts the sandbox in the namespace the hook
    # answers (the same one, now plumbed and bound at a stable path). Without a hook the sandbox
    # gets a private namespace with only loopback. ``nameservers`` go into /etc/resolv.conf.
    network: Callable[[Path], Awaitable[Path]] | None = None
    nameservers: tuple[str, ...] = ()
    # Start from this snapshot's filesystem instead of an empty disk (fork); its disk size wins.
    snapshot: str | None = None
    # Which tier runs it (``TieredRuntime`` dispatches on it; a tier ignores it).
    isolation: str = "container"
    # Start inside this existing, already plumbed network namespace (one the sandbox had before
    # a restart), reusing the user namespace that owns it; ``network`` is not called then.
    netns: Path | None = None


@dataclass(frozen=True)
class Usage:
    """What one sandbox uses right now, as its tier can best tell (each tier's ``usage`` says
    where every figure comes from). Memory and disk in bytes."""

    cpu_seconds: float  # CPU time used so far, cumulative (as ``Runtime.cpu_seconds``)
    memory_used: int  # what its processes (and the kernel for them) use, page cache excluded
    memory_cache: int  # page cache charged to it (tmpfs and shared memory included)
    memory_total: int  # the most it may use: its memory limit
    disk_used: int  # of its writable disk, what ``df`` inside would call used
    disk_total: int  # and what ``df`` inside would call its size


@runtime_checkable
class Runtime(Protocol):
    """One isolation tier. Every method is safe to call concurrently for different sandboxes."""

    name: str

    async def create(self, spec: SandboxSpec) -> None:
        """Start the sandbox with its agent running and answering.

        On any failure nothing is left on the host, and the error raised is a ``CorralError``
        (``RuntimeFailure`` for the tier's own failures).
        """
        ...

    async def destroy(self, sandbox_id: str) -> None:
        """Kill everything of the sandbox and remove every trace; idempotent."""
        ...

    async def pause(self, sandbox_id: str) -> None:
        """Freeze every process of the sandbox: no CPU at all, memory and state kept."""
        ...

    async def resume(self, sandbox_id: str) -> None:
        """Let a paused sandbox's processes run again, exactly where they stopped."""
        ...

    async def cpu_seconds(self, sandbox_id: str) -> float:
        """CPU time every process of the sandbox has used so far (for idle detection)."""
        ...

    async def usage(self, sandbox_id: str) -> Usage:
        """CPU, memory and disk it uses now (running or paused; else SandboxNotRunningError)."""
        ...

    async def hibernate(self, sandbox_id: str, *, keep_memory: bool = True) -> None:
        """Stop the sandbox and free its memory and host objects, keeping its disk (and what
        identifies it on the host) — enough to survive a host reboot. A tier that can save
        memory (microvm) saves it too, unless ``keep_memory`` is false (a restore about to
        replace it), and its processes carry on at wake; a container's start afresh."""
        ...

    async def wake(self, spec: SandboxSpec) -> None:
        """Start a hibernated sandbox again on its kept disk, agent answering; on failure it is
        left hibernated, disk untouched."""
        ...

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> int:
        """Capture the sandbox's filesystem (running, paused or hibernated) as ``snapshot_id``,
        consistent at one instant, without stopping it; returns the bytes it holds. The
        snapshot outlives the sandbox. Atomic: after a crash it exists whole or not at all."""
        ...

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Remove a snapshot; idempotent."""
        ...

    async def list_snapshots(self) -> list[str]:
        """Ids of every snapshot on this host (for reconciliation)."""
        ...

    async def restore_disk(self, sandbox_id: str, snapshot_id: str) -> None:
        """Give a hibernated sandbox a copy of the snapshot as its disk (atomic: after a crash
        it has either disk whole); wake it afterwards."""
        ...

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        """Copy what the sandbox changed on top of its layers into the empty directory ``dest``
        as an overlayfs lower layer (whiteouts, opaque dirs, the ids the sandbox sees), leaving
        out what the runtime itself put there (agent mount point, /etc/hosts, hostname,
        resolv.conf). For template builds: a running sandbox is frozen while it is copied."""
        ...

    async def is_running(self, sandbox_id: str) -> bool:
        """Whether the sandbox's init (the agent) is alive."""
        ...

    async def list_sandboxes(self) -> list[str]:
        """Ids of every sandbox of which anything is left on this host (for reconciliation)."""
        ...

    async def open_agent(
        self, sandbox_id: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A fresh byte stream to the sandbox's agent (one per operation)."""
        ...

    async def close(self) -> None:
        """Release what the runtime holds for itself (not the sandboxes, which outlive the server)."""
        ...
