"""Resource use of running sandboxes over time: CPU, memory and disk, sampled every few seconds.

A sandbox is sampled from the first time someone asks for its figures, then every
``INTERVAL_S`` while it lives: reading a microVM's figures costs its guest work (its agent reads
``/proc``), which a host full of VMs nobody watches should not pay. Samples live in memory only,
a bounded window per sandbox (they are for watching a sandbox, not for billing), and go when the
sandbox does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from corral.core.lifecycle import SandboxState
from corral.core.sandboxes import Sandbox
from corral.errors import CorralError
from corral.runtime.base import Runtime

__all__ = ["MetricsService", "Sample"]

log = logging.getLogger("corral.metrics")

INTERVAL_S = 5.0  # as E2B samples
WINDOW = 720  # samples kept per sandbox: one hour


@dataclass(frozen=True)
class Sample:
    at: float  # unix time
    cpu_count: int
    cpu_used_pct: float  # of the sandbox's own CPUs since the previous sample
    memory_used: int
    memory_cache: int
    memory_total: int
    disk_used: int
    disk_total: int


@dataclass
class _Series:
    samples: deque[Sample]
    last_cpu: float | None = None
    last_at: float | None = None


class MetricsService:
    def __init__(self, runtime: Runtime, running: Callable[[], list[Sandbox]]) -> None:
        self._runtime = runtime
        self._running = running
        self._series: dict[str, _Series] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample_forever(), name="metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample_forever(self) -> None:
        while True:
            try:
                await self.sample_all()
            except Exception:
                log.exception("sampling sandbox metrics failed")
            await asyncio.sleep(INTERVAL_S)

    async def sample_all(self) -> None:
        """One sample of every watched sandbox that runs; forget those that are gone."""
        live = {sb.id: sb for sb in self._running()}
        for sid in [s for s in self._series if s not in live]:
            del self._series[sid]
        for sid in list(self._series):
            if live[sid].state is SandboxState.RUNNING:
                await self.sample(live[sid])

    async def sample(self, sb: Sandbox) -> Sample | None:
        """Take one sample of the sandbox now (None when it cannot be read, e.g. it stopped)."""
        try:
            usage = await self._runtime.usage(sb.id)
        except CorralError:
            return None
        series = self._series.setdefault(sb.id, _Series(deque(maxlen=WINDOW)))
        now = time.time()
        cpus = max(1.0, sb.cpu)
        pct = 0.0
        if series.last_cpu is not None and series.last_at is not None and now > series.last_at:
            used = max(0.0, usage.cpu_seconds - series.last_cpu)
            pct = min(100.0, 100.0 * used / ((now - series.last_at) * cpus))
        series.last_cpu, series.last_at = usage.cpu_seconds, now
        sample = Sample(
            at=now,
            cpu_count=max(1, round(cpus)),
            cpu_used_pct=round(pct, 2),
            memory_used=usage.memory_used,
            memory_cache=usage.memory_cache,
            memory_total=usage.memory_total,
            disk_used=usage.disk_used,
            disk_total=usage.disk_total,
        )
        series.samples.append(sample)
        return sample

    async def series(
        self, sb: Sandbox, start: float | None = None, end: float | None = None
    ) -> list[Sample]:
        """The samples between ``start`` and ``end`` (unix seconds), oldest first; a sandbox
        sampled never yet is sampled now, so that a fresh one has a figure to show."""
        if sb.id not in self._series and sb.state is SandboxState.RUNNING:
            await self.sample(sb)
        got = self._series.get(sb.id)
        if got is None:
            return []
        return [
            s
            for s in got.samples
            if (start is None or s.at >= start) and (end is None or s.at <= end)
        ]
