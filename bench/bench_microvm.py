"""The microvm tier through the SDK, side by side with the container tier in the same run:
create -> first exec, exec round trip, host memory per idle VM (QEMU's PSS, so template pages
shared by clones count once in the sum), and persistence: snapshot (a VM's memory included),
restore, create from a snapshot -> first exec, fork x10, hibernate, wake -> first exec.

Starts ``corral server`` on a temporary data dir (templates linked from ``--templates-from``).
Under TCG (these hosts: ``/dev/kvm`` is PVM). A create is a clone of a warm template; the first
create of each shape builds that template (a cold boot plus a save), reported on its own.

Usage: ``python -m bench.bench_microvm [--templates-from /var/lib/corral] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import Row, publish
from bench.bench_sandbox import _pss, _Tracker, served, served_parser
from corral.vm.guest import find_kernel
from corral.vm.qemu import choose_accel

__all__ = ["main"]

_VM = {"isolation": "microvm", "vcpus": 1, "memory_mb": 256}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _tier(tracker: _Tracker, label: str, runs: int, execs: int, **kw: object) -> list[Row]:
    first: list[float] = []
    round_trip: list[float] = []
    try:
        if kw:  # the first create of a shape builds its warm template (boot + save), once
            t0 = time.perf_counter()
            tracker.kill(tracker.create("minimal", timeout=600, **kw))
            build = _ms(t0)
        for _ in range(runs):
            t0 = time.perf_counter()
            sbx = tracker.create("minimal", timeout=600, **kw)
            sbx.exec(["/bin/true"])
            first.append(_ms(t0))
            tracker.kill(sbx)
        sbx = tracker.create("minimal", timeout=600, **kw)
        for _ in range(execs):
            t0 = time.perf_counter()
            sbx.exec(["/bin/true"])
            round_trip.append(_ms(t0))
    except Exception as exc:
        return [Row.failed("create → first exec", label, "minimal", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    note = "clone of a warm template (its one-time build excluded)" if kw else ""
    rows = [
        Row.latency("create → first exec", label, "minimal", first, note),
        Row.latency("exec round trip", label, "minimal", round_trip),
    ]
    if kw:
        rows.append(
            Row(
                "first create of a shape (template boot + save)",
                label,
                "minimal",
                f"{build:.0f} ms",
                "1",
                "once per template, vCPUs, memory, NIC",
            )
        )
    return rows


def _vm_memory(tracker: _Tracker, data_dir: Path, count: int) -> Row:
    try:
        made = [tracker.create("minimal", timeout=600, **_VM) for _ in range(count)]
        time.sleep(2.0)  # let the guests settle after boot
        pss = []
        for sbx in made:
            meta = json.loads((data_dir / "pool" / "vms" / sbx.id / "meta.json").read_text())
            pss.append(_pss(int(meta["pid"])) / 1024**2)
    except Exception as exc:
        return Row.failed("host memory per idle VM", "corral microvm", "minimal", str(exc))
    finally:
        tracker.kill_all()
    each = sum(pss) / len(pss)
    return Row(
        "host memory per idle VM",
        "corral microvm (256 MB guest)",
        "minimal",
        f"{each:.1f} MiB PSS of QEMU each",
        str(count),
        "template pages mapped private from one sealed memfd: shared until written",
    )


# Something alive in memory, so that a microvm snapshot carries a real process with it.
_BUSY = "setsid sh -c 'while :; do sleep 0.1; done' </dev/null >/dev/null 2>&1 &"


def _persistence(tracker: _Tracker, label: str, runs: int, **kw: object) -> list[Row]:
    steps: dict[str, list[float]] = {
        "snapshot": [],
        "restore": [],
        "create from snapshot → first exec": [],
        "hibernate": [],
        "wake → first exec": [],
    }
    fork10: list[float] = []
    size = 0
    try:
        sbx = tracker.create("minimal", timeout=1800, **kw)
        sbx.exec(_BUSY)
        for _ in range(runs):
            t0 = time.perf_counter()
            snap = sbx.snapshot()
            steps["snapshot"].append(_ms(t0))
            size = snap.size_bytes
            t0 = time.perf_counter()
            sbx.restore(snap)
            steps["restore"].append(_ms(t0))
            t0 = time.perf_counter()
            fork = tracker.from_snapshot(snap)
            fork.exec(["/bin/true"])
            steps["create from snapshot → first exec"].append(_ms(t0))
            tracker.kill(fork)
            t0 = time.perf_counter()
            sbx.hibernate()
            steps["hibernate"].append(_ms(t0))
            t0 = time.perf_counter()
            sbx.exec(["/bin/true"])  # wakes it
            steps["wake → first exec"].append(_ms(t0))
            sbx.delete_snapshot(snap)
        snap = sbx.snapshot()
        for _ in range(max(1, runs // 3)):
            t0 = time.perf_counter()
            forks = tracker.fork(snap, 10)
            fork10.append(_ms(t0))
            for f in forks:
                tracker.kill(f)
        sbx.delete_snapshot(snap)
    except Exception as exc:
        return [Row.failed("snapshot", label, "minimal", f"{type(exc).__name__}: {exc}")]
    finally:
        tracker.kill_all()
    what = "memory + devices + disk" if kw else "filesystem"
    rows = [Row.latency(name, label, "minimal", values) for name, values in steps.items()]
    rows[0] = Row.latency(
        "snapshot", label, "minimal", steps["snapshot"], f"{what}, {size / 1024**2:.0f} MiB"
    )
    rows.append(Row.latency("fork x10 (one call)", label, "minimal", fork10))
    return rows


def _parser() -> argparse.ArgumentParser:
    p = served_parser("bench_microvm", 5, "creates per tier")
    p.add_argument("--execs", type=int, default=50)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    accel, _ = choose_accel(find_kernel().vmlinuz)
    try:
        with served(args, ["minimal"], "vm", 10) as (tracker, data_dir, _):
            rows += _tier(tracker, f"corral microvm ({accel})", args.runs, args.execs, **_VM)
            rows += _tier(tracker, "corral container", args.runs * 4, args.execs)
            rows.append(_vm_memory(tracker, data_dir, 3))
            rows += _persistence(tracker, f"corral microvm ({accel})", args.runs, **_VM)
            rows += _persistence(tracker, "corral container", args.runs)
    except RuntimeError as exc:
        rows.append(Row.failed("server start", "corral", "-", str(exc)))
    publish(
        "microvm",
        "corral microvm tier (with the container tier, same run)",
        "python -m bench.bench_microvm",
        rows,
        write=not args.no_write,
    )
    print(f"(accelerator: {accel})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
