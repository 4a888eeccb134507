"""The microvm tier through the SDK, side by side with the container tier in the same run:
create -> first exec, exec round trip, and host memory per idle VM (QEMU's PSS).

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
            meta = json.loads((data_dir / "vms" / sbx.id / "meta.json").read_text())
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
        "template pages mapped private from one file: shared page cache until written",
    )


def _parser() -> argparse.ArgumentParser:
    p = served_parser("bench_microvm", 5, "creates per tier")
    p.add_argument("--execs", type=int, default=50)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rows: list[Row] = []
    accel = choose_accel()
    try:
        with served(args, ["minimal"], "vm", 10) as (tracker, data_dir, _):
            rows += _tier(tracker, f"corral microvm ({accel})", args.runs, args.execs, **_VM)
            rows += _tier(tracker, "corral container", args.runs * 4, args.execs)
            rows.append(_vm_memory(tracker, data_dir, 3))
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
