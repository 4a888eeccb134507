"""Several isolation tiers behind the one ``Runtime`` contract: each call goes to the tier the
sandbox was created in (``SandboxSpec.isolation``), so the services above need not know tiers
exist beyond passing the choice at create.

Which tier holds which sandbox is learnt at create and, after a restart, from every tier's
``list_sandboxes`` (a sandbox id lives in one tier only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from corral.errors import InvalidRequestError, SandboxNotRunningError
from corral.runtime.base import Runtime, SandboxSpec, Usage

__all__ = ["TieredRuntime"]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class TieredRuntime:
    def __init__(self, tiers: Mapping[str, Runtime], default: str) -> None:
        if default not in tiers:
            raise InvalidRequestError(f"default tier {default!r} is not one of {sorted(tiers)}")
        self._tiers = dict(tiers)
        self.name = default
        self._of: dict[str, str] = {}

    @property
    def tiers(self) -> list[str]:
        return sorted(self._tiers)

    def tier(self, name: str) -> Runtime:
        try:
            return self._tiers[name]
        except KeyError:
            raise InvalidRequestError(
                f"unknown isolation {name!r}; this server offers {', '.join(self.tiers)}"
            ) from None

    async def _for(self, sandbox_id: str) -> Runtime:
        name = self._of.get(sandbox_id)
        if name is None:
            await self.list_sandboxes()
            name = self._of.get(sandbox_id)
        if name is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not on this host")
        return self._tiers[name]

    def describe(self) -> dict[str, dict[str, str]]:
        """Each tier's own description (e.g. the microvm accelerator), for ``/v1/info`` and logs."""
        out: dict[str, dict[str, str]] = {}
        for name, rt in self._tiers.items():
            describe = getattr(rt, "describe", None)
            out[name] = dict(describe()) if describe is not None else {}
        return out

    async def create(self, spec: SandboxSpec) -> None:
        rt = self.tier(spec.isolation)
        self._of[spec.sandbox_id] = spec.isolation
        await rt.create(spec)

    async def destroy(self, sandbox_id: str) -> None:
        try:
            rt = await self._for(sandbox_id)
        except SandboxNotRunningError:
            return  # nothing of it anywhere: destroy is idempotent
        await rt.destroy(sandbox_id)
        self._of.pop(sandbox_id, None)

    async def pause(self, sandbox_id: str) -> None:
        await (await self._for(sandbox_id)).pause(sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        await (await self._for(sandbox_id)).resume(sandbox_id)

    async def cpu_seconds(self, sandbox_id: str) -> float:
        return await (await self._for(sandbox_id)).cpu_seconds(sandbox_id)

    async def usage(self, sandbox_id: str) -> Usage:
        return await (await self._for(sandbox_id)).usage(sandbox_id)

    async def hibernate(self, sandbox_id: str, *, keep_memory: bool = True) -> None:
        await (await self._for(sandbox_id)).hibernate(sandbox_id, keep_memory=keep_memory)

    async def wake(self, spec: SandboxSpec) -> None:
        await (await self._for(spec.sandbox_id)).wake(spec)

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> int:
        return await (await self._for(sandbox_id)).snapshot(sandbox_id, snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        for rt in self._tiers.values():
            await rt.delete_snapshot(snapshot_id)

    async def list_snapshots(self) -> list[str]:
        found: set[str] = set()
        for rt in self._tiers.values():
            found.update(await rt.list_snapshots())
        return sorted(found)

    async def restore_disk(self, sandbox_id: str, snapshot_id: str) -> None:
        await (await self._for(sandbox_id)).restore_disk(sandbox_id, snapshot_id)

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        await (await self._for(sandbox_id)).export_changes(sandbox_id, dest)

    async def is_running(self, sandbox_id: str) -> bool:
        try:
            rt = await self._for(sandbox_id)
        except SandboxNotRunningError:
            return False
        return await rt.is_running(sandbox_id)

    async def list_sandboxes(self) -> list[str]:
        found: list[str] = []
        for name, rt in self._tiers.items():
            for sid in await rt.list_sandboxes():
                self._of.setdefault(sid, name)
                found.append(sid)
        return sorted(found)

    async def open_agent(self, sandbox_id: str) -> Streams:
        return await (await self._for(sandbox_id)).open_agent(sandbox_id)

    async def close(self) -> None:
        for rt in self._tiers.values():
            await rt.close()

    async def purge(self) -> None:
        # Last tier first: the default (first) one owns the storage pool the others use.
        for rt in reversed(self._tiers.values()):
            purge = getattr(rt, "purge", None)
            if purge is not None:
                await purge()
