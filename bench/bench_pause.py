"""Pause/resume and hibernate/wake of a sandbox: through the SDK (HTTP + server), and the
runtime's own share of pause/resume.

Starts ``corral server`` on a temporary data dir (templates linked from ``--templates-from``),
creates one ``minimal`` sandbox with a process spinning on the CPU (the freezer has to stop a
busy task, not an idle one), then times ``pause()`` and ``resume()`` ``--runs`` times each.
The runtime's own share is timed in-process on a second data dir. Peers (``docker
pause/unpause``) are measured by ``python -m bench.peers``.

Usage: ``python -m bench.bench_pause [--templates-from /var/lib/corral] [--runs 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import Row, publish
from bench.bench_sandbox import _Tracker, served, served_parser
from corral.agent import AgentClient, ExecRequest
from corral.agent.build import agent_binary_path
from corral.runtime import ContainerRuntime, SandboxSpec
from corral.templates import rootfs_path

__all__ = ["main"]

_SPIN = ["/bin/sh", "-c", "while :; do :; done"]


def _sdk(tracker: _Tracker, runs: int) -> list[Row]:
    paused: list[float] = []
    resumed: list[float] = []
    try:
        sbx = tracker.create("minimal", timeout=600, cpu=0.5)
        sbx.exec(_SPIN, background=True)
        for _ in range(runs):
            t0 = time.perf_counter()
            sbx.pause()
            t1 = time.perf_counter()
            sbx.resume()
            t2 = time.perf_counter()
            paused.append((t1 - t0) * 1000)
            resumed.append((t2 - t1) * 1000)
    except Exception as exc:
        return [Row.failed("pause", "corral (SDK)", "minimal", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    return [
        Row.latency("pause", "corral (SDK)", "minimal", paused, "target ≤ 20 ms"),
        Row.latency("resume", "corral (SDK)", "minimal", resumed, "target ≤ 20 ms"),
    ]


def _hibernate_wake(tracker: _Tracker, template: str, runs: int) -> list[Row]:
    """hibernate(), then the exec that wakes it (what a user waits for)."""
    slept: list[float] = []
    woke: list[float] = []
    try:
        sbx = tracker.create(template, timeout=600)
        for _ in range(runs):
            t0 = time.perf_counter()
            sbx.hibernate()
            t1 = time.perf_counter()
            sbx.exec(["/bin/true"])
            t2 = time.perf_counter()
            slept.append((t1 - t0) * 1000)
            woke.append((t2 - t1) * 1000)
    except Exception as exc:
        return [Row.failed("hibernate", "corral (SDK)", template, f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    return [
        Row.latency("hibernate", "corral (SDK)", template, slept),
        Row.latency(
            "wake → first exec", "corral (SDK)", template, woke, "target ≤ 300 ms for base"
        ),
    ]


async def _runtime(data_dir: Path, templates: Path, runs: int) -> list[Row]:
    rt = ContainerRuntime(data_dir, agent_binary_path())
    paused: list[float] = []
    resumed: list[float] = []
    try:
        await rt.create(SandboxSpec("bench-pause", (rootfs_path(templates, "minimal"),), cpu=0.5))
        await AgentClient(lambda: rt.open_agent("bench-pause")).spawn(ExecRequest(argv=_SPIN))
        for _ in range(runs):
            t0 = time.perf_counter()
            await rt.pause("bench-pause")
            t1 = time.perf_counter()
            await rt.resume("bench-pause")
            t2 = time.perf_counter()
            paused.append((t1 - t0) * 1000)
            resumed.append((t2 - t1) * 1000)
    finally:
        await rt.purge()
    note = "cgroup v1 freezer, written and polled in-process"
    return [
        Row.latency("pause", "corral runtime (in-process)", "minimal", paused, note),
        Row.latency("resume", "corral runtime (in-process)", "minimal", resumed, note),
    ]


def _parser() -> argparse.ArgumentParser:
    p = served_parser("bench_pause", 100)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    try:
        with served(args, ["minimal", "base"], "pause", 8) as (tracker, _, tmp):
            rows += _sdk(tracker, args.runs)
            for template in ("minimal", "base"):
                rows += _hibernate_wake(tracker, template, max(10, args.runs // 5))
            rows += asyncio.run(_runtime(tmp / "runtime", Path(args.templates_from), args.runs))
    except RuntimeError as exc:
        rows.append(Row.failed("server start", "corral", "-", str(exc)))
    publish(
        "pause",
        "corral pause and resume",
        "python -m bench.bench_pause",
        rows,
        write=not args.no_write,
    )
    print("(peers: python -m bench.peers measures docker pause/unpause)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
