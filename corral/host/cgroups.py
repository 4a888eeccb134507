"""Where sandbox cgroups live, and removing them when the OCI runtime could not.

Sandbox cgroups are created by runc from a *relative* ``cgroupsPath``, i.e. below the cgroup our
own process sits in, per hierarchy (on a v1/hybrid host each controller has its own, and ours
may be nested, e.g. ``memory:/process_api/<id>``). We never assume we are at a root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

__all__ = ["own_cgroup_dirs", "remove_cgroup_tree", "sandbox_cgroup_dirs"]


def _mountinfo_cgroups() -> list[tuple[Path, str, frozenset[str]]]:
    """(mountpoint, root inside the hierarchy, controllers; empty for cgroup2) per cgroup mount."""
    found: list[tuple[Path, str, frozenset[str]]] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            opts = frozenset(rfields[2].split(",")) if rfields[0] == "cgroup" else frozenset()
            found.append((Path(fields[4]), fields[3], opts))
    return found


def own_cgroup_dirs() -> list[Path]:
    """The directory of the calling process's own cgroup in every mounted hierarchy."""
    mine_v1: dict[str, str] = {}
    mine_v2: str | None = None
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                mine_v2 = path
            else:
                for c in controllers.split(","):
                    mine_v1[c] = path
    dirs: list[Path] = []
    seen: set[Path] = set()
    for mountpoint, root, opts in _mountinfo_cgroups():
        if opts:
            names = [o for o in opts if o in mine_v1]
            if not names:
                continue
            path = mine_v1[names[0]]
        else:
            if mine_v2 is None:
                continue
            path = mine_v2
        rel = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
        if rel.startswith(".."):
            continue  # our cgroup is outside what this mount shows
        d = (mountpoint / rel).resolve() if rel not in ("", ".") else mountpoint
        if d not in seen:
            seen.add(d)
            dirs.append(d)
    return dirs


def sandbox_cgroup_dirs(name: str) -> list[Path]:
    """Every directory runc may create for relative cgroupsPath ``name``."""
    return [d / name for d in own_cgroup_dirs()]


def _kill_all(directory: Path) -> None:
    for procs in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)


def remove_cgroup_tree(directory: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process below ``directory`` and remove it, deepest first.

    Only used when runc's own ``delete --force`` is impossible (its state is gone); runc freezes
    the cgroup before killing, which we approximate by killing until nothing is left.
    """
    if not directory.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        _kill_all(directory)
        subdirs = sorted(
            (p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        )
        try:
            for d in [*subdirs, directory]:
                with contextlib.suppress(FileNotFoundError):
                    d.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
