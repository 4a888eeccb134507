"""Processes seen from the host: telling a live process from a reused pid."""

from __future__ import annotations

__all__ = ["cpu_seconds", "start_time"]


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    return stat[stat.rfind(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process; None otherwise.

    A pid plus its start time names one process for good: a pid reused later has another.
    """
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def cpu_seconds(pid: int, ticks_per_second: int) -> float | None:
    """User plus system CPU time of ``pid`` so far; None when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / ticks_per_second
