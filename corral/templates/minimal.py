"""The ``minimal`` template: a statically linked busybox and the few files a shell expects.

It has no package manager and no libc, so it builds in milliseconds from the host's
busybox-static and makes the cheapest possible sandbox (benchmarks, shell-only agents).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from corral.errors import RuntimeFailure

__all__ = ["build_rootfs", "find_static_busybox"]

_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/busybox/busybox")
_PT_INTERP = 3

_FILES: dict[str, tuple[int, str]] = {
    "etc/passwd": (
        0o644,
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    "etc/group": (0o644, "root:x:0:\nnobody:x:65534:\n"),
    "etc/hosts": (
        0o644,
        "127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
    "etc/hostname": (0o644, "sandbox\n"),
    # Present so the runtime can bind-mount its own resolver configuration over it.
    "etc/resolv.conf": (0o644, ""),
    "etc/shells": (0o644, "/bin/sh\n/bin/ash\n"),
}

_DIRS: dict[str, int] = {
    "bin": 0o755,
    "sbin": 0o755,
    "usr": 0o755,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "etc": 0o755,
    "root": 0o700,
    "home": 0o755,
    "tmp": 0o1777,
    "var": 0o755,
    "var/tmp": 0o1777,
    "run": 0o755,
    "dev": 0o755,
    "proc": 0o555,
    "sys": 0o555,
}


def _is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a program interpreter (i.e. statically linked)."""
    with path.open("rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        order = "<" if head[5] == 1 else ">"
        (phoff,) = struct.unpack_from(order + "Q", head, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(order + "I", table, i * phentsize)
        if p_type == _PT_INTERP:
            return False
    return True


def find_static_busybox() -> Path:
    """The host's statically linked busybox (Debian package ``busybox-static``)."""
    for candidate in _CANDIDATES:
        path = Path(candidate)
        try:
            if path.is_file() and _is_static_elf(path):
                return path
        except OSError:
            continue
    raise RuntimeFailure(
        "no statically linked busybox found (looked at "
        + ", ".join(_CANDIDATES)
        + "); install the Debian package busybox-static"
    )


def _applets(busybox: Path) -> list[str]:
    try:
        proc = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeFailure(f"{busybox} --list-full failed: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeFailure(f"{busybox} --list-full failed: {proc.stderr.strip()}")
    return [line.strip().lstrip("/") for line in proc.stdout.splitlines() if line.strip()]


def build_rootfs(dest: Path, on_output: Callable[[str], None] | None = None) -> None:
    """Create the minimal root filesystem in ``dest`` (which must not exist yet)."""
    busybox = find_static_busybox()
    applets = _applets(busybox)
    try:
        dest.mkdir(mode=0o755)
        for rel, mode in _DIRS.items():
            path = dest / rel
            path.mkdir(exist_ok=True)
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask; these are exact
        target = dest / "bin" / "busybox"
        shutil.copyfile(busybox, target)
        os.chmod(target, 0o755)
        for rel in applets:
            link = dest / rel
            if link.name in ("busybox", "linuxrc") or link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)
        for rel, (mode, text) in _FILES.items():
            path = dest / rel
            path.write_text(text, encoding="utf-8")
            os.chmod(path, mode)
    except OSError as exc:
        raise RuntimeFailure(f"building the minimal rootfs in {dest} failed: {exc}") from exc
    if on_output is not None:
        on_output(f"minimal: busybox from {busybox} with {len(applets)} applets")
