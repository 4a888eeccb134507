"""Warm pools through the SDK: create → first exec when a pool has a sandbox ready (target
≤ 10 ms p50) against an on-demand create in the same run, and the sustained create rate over
many creates with a pool of 20 (how many came from the pool, and creates per second).

Starts ``corral server`` on a temporary data dir (templates linked from ``--templates-from``).

Usage: ``python -m bench.bench_pool [--templates-from /var/lib/corral] [--runs 30]
[--sustained 1000]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from bench import Row, publish
from bench.bench_sandbox import _Tracker, served, served_parser

__all__ = ["main"]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def _api() -> httpx.Client:
    return httpx.Client(
        base_url=os.environ["CORRAL_URL"],
        headers={"Authorization": f"Bearer {os.environ['CORRAL_API_KEY']}"},
        timeout=120,
    )


def _set_pool(size: int) -> None:
    with _api() as c:
        r = c.put("/v1/pools/bench", json={"template": "minimal", "size": size})
        r.raise_for_status()


def _wait_ready(size: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with _api() as c:
        while c.get("/v1/pools/bench").json()["ready"] < size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pool did not fill to {size}")
            time.sleep(0.05)


def _first_exec(tracker: _Tracker, runs: int, pooled: bool) -> tuple[list[float], int]:
    times: list[float] = []
    from_pool = 0
    for _ in range(runs):
        if pooled:
            _wait_ready(3)
        t0 = time.perf_counter()
        sbx = tracker.create("minimal", timeout=600)
        sbx.exec(["/bin/true"])
        times.append(_ms(t0))
        from_pool += int(sbx.pool is not None)
        tracker.kill(sbx)
    return times, from_pool


def _sustained(tracker: _Tracker, count: int) -> tuple[float, int]:
    """``count`` creates back to back (each killed in the background); seconds, from pool."""
    from_pool = 0
    with ThreadPoolExecutor(max_workers=4) as killers:
        t0 = time.perf_counter()
        for _ in range(count):
            sbx = tracker.create("minimal", timeout=600)
            from_pool += int(sbx.pool is not None)
            killers.submit(tracker.kill, sbx)
        took = time.perf_counter() - t0
    return took, from_pool


def main(argv: Sequence[str] | None = None) -> int:
    p = served_parser("bench_pool", 30, "creates per case")
    p.add_argument("--sustained", type=int, default=1000, help="creates in the sustained run")
    args = p.parse_args(argv)
    rows: list[Row] = []
    try:
        with served(args, ["minimal"], "pool", 11) as (tracker, _, _):
            cold, _ = _first_exec(tracker, args.runs, pooled=False)
            _set_pool(3)
            warm, hits = _first_exec(tracker, args.runs, pooled=True)
            rows.append(
                Row.latency(
                    "create → first exec, from a warm pool",
                    "corral container (SDK)",
                    "minimal",
                    warm,
                    f"{hits}/{len(warm)} from the pool; target ≤ 10 ms",
                )
            )
            rows.append(
                Row.latency(
                    "create → first exec, on demand", "corral container (SDK)", "minimal", cold
                )
            )
            _set_pool(20)
            _wait_ready(20)
            took, hits = _sustained(tracker, args.sustained)
            rows.append(
                Row(
                    f"{args.sustained} creates back to back, pool of 20",
                    "corral container (SDK)",
                    "minimal",
                    f"{args.sustained / took:.1f} creates/s ({took:.1f} s)",
                    str(args.sustained),
                    f"{hits} from the pool; the rest started on demand while it refilled",
                )
            )
            _set_pool(0)
    except RuntimeError as exc:
        rows.append(Row.failed("server start", "corral", "-", str(exc)))
    publish(
        "pool",
        "corral warm pools",
        "python -m bench.bench_pool",
        rows,
        write=not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
