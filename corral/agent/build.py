"""Builds static binaries (the sandbox agent, the microvm guest helper) from C sources, on demand."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from corral.errors import RuntimeFailure

__all__ = ["agent_binary_path", "static_binary"]

_SRC_DIR = Path(__file__).resolve().parent
_BIN_NAME = "corral-agent"
_CFLAGS = ("-O2", "-static", "-Wall", "-Wextra", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong")


def _sources() -> list[Path]:
    return sorted([*_SRC_DIR.glob("*.c"), *_SRC_DIR.glob("*.h")])


def _is_fresh(binary: Path, sources: list[Path]) -> bool:
    try:
        built = binary.stat().st_mtime_ns
    except FileNotFoundError:
        return False
    return all(src.stat().st_mtime_ns <= built for src in sources)


def agent_binary_path() -> Path:
    """The compiled agent, rebuilt with gcc when missing or older than its sources."""
    return static_binary(_sources(), _SRC_DIR / "bin" / _BIN_NAME)


def static_binary(sources: list[Path], binary: Path) -> Path:
    """``binary`` built static from the C ``sources`` (headers count for freshness), rebuilt
    with gcc when missing or older than any of them.

    Concurrent callers (several processes or threads) serialize on a lock file; the binary is
    replaced by an atomic rename, so a reader never sees a half-written file.
    """
    if not any(src.suffix == ".c" for src in sources):
        raise RuntimeFailure(f"no C sources for {binary.name}")
    out_dir = binary.parent
    if _is_fresh(binary, sources):
        return binary
    try:
        out_dir.mkdir(exist_ok=True)
        lock_fd = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RuntimeFailure(f"cannot prepare {out_dir} for building {binary.name}: {exc}") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if _is_fresh(binary, sources):
            return binary
        _compile(sources, binary)
        return binary
    finally:
        os.close(lock_fd)


def _compile(sources: list[Path], binary: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeFailure(f"gcc is not installed; it is needed to build {binary.name}")
    tmp = binary.with_name(f".{binary.name}.{os.getpid()}.tmp")
    cmd = [gcc, *_CFLAGS, "-o", str(tmp), *(str(s) for s in sources if s.suffix == ".c")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeFailure(f"cannot run gcc to build {binary.name}: {exc}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeFailure(f"building {binary.name} failed:\n{proc.stdout}{proc.stderr}")
    try:
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeFailure(f"cannot install {binary}: {exc}") from exc
