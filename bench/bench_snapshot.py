"""Snapshots through the SDK (HTTP + server): snapshot after writing 1 GiB, restore, fork x10,
create-from-snapshot → first exec, and exec/file speed after a chain of 100 snapshot/restore
generations against a fresh sandbox.

Starts ``corral server`` on a temporary data dir (templates linked from ``--templates-from``).
The 1 GiB is written with ``dd ... conv=fsync`` so that the figure is the snapshot's own cost,
not the flush of a page cache the sandbox has not written out yet (any consistent snapshot
has to pay that flush first; ``conv=fsync`` makes the sandbox pay it, as a database would).
Peers (``docker commit`` + ``docker run`` of the commit) are measured by ``python -m bench.peers``.

Usage: ``python -m bench.bench_snapshot [--templates-from /var/lib/corral] [--runs 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import Row, publish
from bench.bench_sandbox import _Tracker, served, served_parser

__all__ = ["main"]

_WRITE_1G = "dd if=/dev/zero of=/root/big bs=1M count=1024 conv=fsync 2>/dev/null"
_IO = (
    "dd if=/dev/zero of=/root/io bs=1M count=64 conv=fsync 2>/dev/null && "
    "dd if=/root/io of=/dev/null bs=1M 2>/dev/null && rm /root/io"
)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _snapshot_after_write(tracker: _Tracker, runs: int) -> list[Row]:
    taken: list[float] = []
    idle: list[float] = []
    try:
        sbx = tracker.create("minimal", timeout=1800, disk_mb=4096)
        for _ in range(runs):
            sbx.exec(_WRITE_1G, timeout=600)
            t0 = time.perf_counter()
            snap = sbx.snapshot()
            taken.append(_ms(t0))
            _delete(snap)
        for _ in range(runs * 4):
            t0 = time.perf_counter()
            snap = sbx.snapshot()
            idle.append(_ms(t0))
            _delete(snap)
    except Exception as exc:
        return [Row.failed("snapshot", "corral (SDK)", "minimal", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    return [
        Row.latency(
            "snapshot after writing 1 GiB",
            "corral (SDK)",
            "minimal",
            taken,
            "target ≤ 50 ms; processes frozen, syncfs, reflink copy",
        ),
        Row.latency("snapshot (nothing new written)", "corral (SDK)", "minimal", idle),
    ]


def _delete(snap: Any) -> None:
    from corral import Sandbox

    Sandbox.delete_snapshot(snap)


def _restore_and_fork(tracker: _Tracker, template: str, runs: int) -> list[Row]:
    from corral import Sandbox

    restored: list[float] = []
    first: list[float] = []
    fork10: list[float] = []
    try:
        sbx = tracker.create(template, timeout=1800)
        sbx.exec("echo base > /root/v")
        snap = sbx.snapshot("base")
        for _ in range(runs):
            sbx.exec("echo later > /root/v")
            t0 = time.perf_counter()
            sbx.restore(snap)
            restored.append(_ms(t0))
        for _ in range(runs):
            t0 = time.perf_counter()
            fork = tracker.from_snapshot(snap)
            fork.exec(["/bin/true"])
            first.append(_ms(t0))
            tracker.kill(fork)
        for _ in range(max(3, runs // 5)):
            t0 = time.perf_counter()
            forks = tracker.fork(snap, 10)
            fork10.append(_ms(t0))
            for f in forks:
                tracker.kill(f)
        Sandbox.delete_snapshot(snap)
    except Exception as exc:
        return [Row.failed("restore", "corral (SDK)", template, f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    return [
        Row.latency("restore", "corral (SDK)", template, restored, "target ≤ 100 ms"),
        Row.latency(
            "create from snapshot → first exec", "corral (SDK)", template, first, "target ≤ 100 ms"
        ),
        Row.latency(
            "fork x10 (one call)",
            "corral (SDK)",
            template,
            fork10,
            f"{statistics.median(fork10) / 10:.1f} ms per sandbox (p50 / 10)",
        ),
    ]


def _chain(tracker: _Tracker, generations: int, runs: int) -> list[Row]:
    """exec and 64 MiB write+read in a fresh sandbox, then after ``generations`` rounds of
    write → snapshot → restore (each generation's disk a copy of the last snapshot)."""

    def measure(sbx: Any) -> tuple[list[float], list[float]]:
        execs, io = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            sbx.exec(["/bin/true"])
            execs.append(_ms(t0))
        for _ in range(max(3, runs // 4)):
            t0 = time.perf_counter()
            sbx.exec(_IO)
            io.append(_ms(t0))
        return execs, io

    try:
        sbx = tracker.create("minimal", timeout=3600)
        fresh_exec, fresh_io = measure(sbx)
        snaps = []
        for g in range(generations):
            sbx.exec(f"echo {g} >> /root/gens && dd if=/dev/zero of=/root/g{g % 8} bs=64k count=16")
            snaps.append(sbx.snapshot(f"gen{g}"))
            sbx.restore(snaps[-1])
        chained_exec, chained_io = measure(sbx)
        lines = sbx.exec("wc -l < /root/gens").stdout.strip()
        for s in snaps:
            _delete(s)
    except Exception as exc:
        return [Row.failed("chain", "corral (SDK)", "minimal", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    note = f"after {generations} snapshot→restore generations ({lines} recorded)"
    return [
        Row.latency("exec round trip, fresh disk", "corral (SDK)", "minimal", fresh_exec),
        Row.latency("exec round trip, chained disk", "corral (SDK)", "minimal", chained_exec, note),
        Row.latency("64 MiB write+fsync+read, fresh disk", "corral (SDK)", "minimal", fresh_io),
        Row.latency(
            "64 MiB write+fsync+read, chained disk", "corral (SDK)", "minimal", chained_io, note
        ),
    ]


def _parser() -> argparse.ArgumentParser:
    p = served_parser("bench_snapshot", 20)
    p.add_argument("--generations", type=int, default=100)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    try:
        with served(args, ["minimal", "base"], "snap", 9) as (tracker, _, _):
            rows += _snapshot_after_write(tracker, max(3, args.runs // 4))
            for template in ("minimal", "base"):
                rows += _restore_and_fork(tracker, template, args.runs)
            rows += _chain(tracker, args.generations, args.runs)
    except RuntimeError as exc:
        rows.append(Row.failed("server start", "corral", "-", str(exc)))
    publish(
        "snapshot",
        "corral snapshots, restore and fork",
        "python -m bench.bench_snapshot",
        rows,
        write=not args.no_write,
    )
    print("(peers: python -m bench.peers measures docker commit + run)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
