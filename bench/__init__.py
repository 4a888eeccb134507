"""Benchmarks of corral against its peers; shared statistics and result-table helpers.

``python -m bench.peers`` measures the floor (raw runc/crun, docker, podman) and
``python -m bench.bench_sandbox`` measures corral itself through its SDK. Both print a markdown
table and write it as their own section of ``bench/results/latest.md``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RESULTS",
    "Row",
    "host_kernel_bytes",
    "host_summary",
    "host_used_bytes",
    "percentile",
    "publish",
    "table",
    "write_section",
]

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported value was really measured)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Row:
    """One line of a result table; ``value`` is free text so failures can be reported as such."""

    metric: str
    system: str
    template: str
    value: str
    n: str = ""
    note: str = ""

    @classmethod
    def latency(
        cls, metric: str, system: str, template: str, ms: list[float], note: str = ""
    ) -> Row:
        value = (
            f"p50 {percentile(ms, 50):.1f} ms · p95 {percentile(ms, 95):.1f} ms"
            f" · mean {statistics.fmean(ms):.1f} ms"
        )
        return cls(metric, system, template, value, str(len(ms)), note)

    @classmethod
    def seconds(
        cls, metric: str, system: str, template: str, s: list[float], note: str = ""
    ) -> Row:
        """Durations long enough to show in seconds (builds, imports)."""
        value = f"median {statistics.median(s):.2f} s · min {min(s):.2f} s · max {max(s):.2f} s"
        return cls(metric, system, template, value, str(len(s)), note)

    @classmethod
    def failed(cls, metric: str, system: str, template: str, error: str) -> Row:
        first = " ".join(error.strip().split())[:300] or "failed without output"
        return cls(metric, system, template, "**fails**", "", first.replace("|", "\\|"))


def table(rows: list[Row]) -> str:
    lines = [
        "| metric | system | template | result | n | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.metric} | {r.system} | {r.template} | {r.value} | {r.n} | {r.note} |" for r in rows
    ]
    return "\n".join(lines)


def host_summary() -> str:
    cores = os.cpu_count() or 0
    mem = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            mem = int(f.readline().split()[1]) // 1024 // 1024
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cores} cores, {mem} GiB, kernel {platform.release()}, Python {platform.python_version()}"
    )


def _meminfo() -> dict[str, int]:
    info: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info


def host_kernel_bytes() -> int:
    """Kernel memory that cannot be reclaimed: unreclaimable slab, kernel stacks, page tables.

    Namespaces, mounts, cgroups, sockets and the like land here; unlike MemAvailable it does not
    move with other processes' page cache, so it is the steadier per-sandbox figure.
    """
    info = _meminfo()
    return info["SUnreclaim"] + info["KernelStack"] + info["PageTables"]


def host_used_bytes() -> int:
    """Host memory in use (MemTotal - MemAvailable): processes, kernel objects, no page cache."""
    info = _meminfo()
    return info["MemTotal"] - info["MemAvailable"]


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) this benchmark's section of the results file, keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# corral benchmark results\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def publish(name: str, title: str, command: str, rows: list[Row], *, write: bool = True) -> None:
    """Print a benchmark's table under a dated heading and keep it in the results file."""
    body = (
        f"## {title}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" on {host_summary()}; `{command}`.\n\n{table(rows)}\n"
    )
    print(body)
    if write:
        write_section(name, body)
