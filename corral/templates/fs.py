"""File-system helpers for template builds: safe removal and size accounting."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from corral.errors import RuntimeFailure

__all__ = ["disk_usage", "mounts_below", "remove_tree"]


def mounts_below(path: Path) -> list[str]:
    """Mount points in our mount namespace at or below ``path``."""
    prefix = str(path).rstrip("/") + "/"
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """Delete a (partial) build, first detaching anything a build tool left mounted inside it.

    Deleting through a leftover bind mount of /dev or /proc would delete host state, so if a mount
    cannot be detached the directory is kept and the failure reported.
    """
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    left = mounts_below(path)
    if left:
        raise RuntimeFailure(f"cannot remove {path}: still mounted inside it: {', '.join(left)}")
    try:
        shutil.rmtree(path)
    except OSError as exc:
        raise RuntimeFailure(f"cannot remove {path}: {exc}") from exc


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (like ``du -s``; hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    return total
