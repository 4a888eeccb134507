"""What the E2B-compatible API costs: the official ``e2b`` SDK against corral, beside corral's own
SDK doing the same things on the same server.

Starts ``corral server`` on a temporary data dir (templates linked from ``--templates-from``)
and times, ``--runs`` times each, with the ``base`` template:
- create → first command → kill (what an E2B user waits for per sandbox);
- one command round trip (``true``) in a running sandbox;
- writing then reading a 1 MiB file.

E2B's cloud itself is not reachable from here; its published figures are for its own hardware.

Usage: ``python -m bench.bench_e2b [--templates-from /var/lib/corral] [--runs 30]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from bench import Row, publish
from bench.bench_sandbox import served, served_parser

__all__ = ["main"]

_BLOB = os.urandom(1 << 20)


def _timed(runs: int, step: Callable[[], object]) -> list[float]:
    out: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _e2b(runs: int) -> list[Row]:
    from e2b import Sandbox

    def lifecycle() -> None:
        sbx = Sandbox.create(timeout=120)
        try:
            sbx.commands.run("true")
        finally:
            sbx.kill()

    rows = [
        Row.latency(
            "create → first command → kill", "e2b SDK → corral", "base", _timed(runs, lifecycle)
        )
    ]
    sbx = Sandbox.create(timeout=600)
    try:
        rows.append(
            Row.latency(
                "command round trip (true)",
                "e2b SDK → corral",
                "base",
                _timed(runs, lambda: sbx.commands.run("true")),
            )
        )

        def files() -> None:
            sbx.files.write("/tmp/blob", _BLOB)
            assert len(sbx.files.read("/tmp/blob", format="bytes")) == len(_BLOB)

        rows.append(
            Row.latency("write + read 1 MiB", "e2b SDK → corral", "base", _timed(runs, files))
        )
    finally:
        sbx.kill()
    return rows


def _corral(runs: int) -> list[Row]:
    from corral import Sandbox

    def lifecycle() -> None:
        with Sandbox.create(template="base", timeout=120) as sbx:
            sbx.exec("true")

    rows = [
        Row.latency("create → first command → kill", "corral SDK", "base", _timed(runs, lifecycle))
    ]
    with Sandbox.create(template="base", timeout=600) as sbx:
        rows.append(
            Row.latency(
                "command round trip (true)",
                "corral SDK",
                "base",
                _timed(runs, lambda: sbx.exec("true")),
            )
        )

        def files() -> None:
            sbx.files.write("/tmp/blob", _BLOB)
            assert len(sbx.files.read_bytes("/tmp/blob")) == len(_BLOB)

        rows.append(Row.latency("write + read 1 MiB", "corral SDK", "base", _timed(runs, files)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = served_parser("bench_e2b", 30).parse_args(argv)
    rows: list[Row] = []
    try:
        with served(args, ["base"], "e2b", 12) as (_tracker, _, _):
            os.environ["E2B_API_KEY"] = os.environ["CORRAL_API_KEY"]
            os.environ["E2B_API_URL"] = os.environ["E2B_SANDBOX_URL"] = os.environ["CORRAL_URL"]
            for measure in (_e2b, _corral):
                try:
                    rows += measure(args.runs)
                except Exception as exc:
                    rows.append(Row.failed("run", measure.__name__, "base", f"{exc!r}"))
    except RuntimeError as exc:
        rows.append(Row.failed("server start", "corral", "-", str(exc)))
    publish(
        "e2b",
        "E2B SDK against corral (and corral's own SDK on the same server)",
        "python -m bench.bench_e2b",
        rows,
        write=not args.no_write,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
