"""The one subprocess boundary to the OCI runtime (runc): every failure becomes RuntimeFailure.

``run`` spawns with ``os.posix_spawn`` (vfork speed) because the listening socket must sit at
fd 3 of runc, which ``subprocess`` cannot arrange without a slow ``preexec_fn``. With
``--detach`` and no terminal runc hands its own stdio to the container's init, so runc's stdio
is /dev/null and its errors are read back from its ``--log`` file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from corral.errors import RuntimeFailure

__all__ = ["Runc"]

_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
_NOT_FOUND_MARKERS = ("does not exist", "not found", "no such file")


def _log_errors(log_file: Path) -> str:
    """The error lines of a runc JSON log, newest last; raw text when it is not JSON."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    messages: list[str] = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            if line.strip():
                messages.append(line.strip())
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            messages.append(str(entry.get("msg", "")))
    return "; ".join(messages[-3:])


async def _wait_pid(pid: int) -> int:
    """Wait for a child without blocking the loop (pidfd readiness) and reap it."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    try:
        done: asyncio.Future[None] = loop.create_future()

        def exited() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(pidfd, exited)
        try:
            await done
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class Runc:
    """runc with its state under ``root``."""

    def __init__(self, root: Path, binary: str = "runc") -> None:
        self.root = root
        self.binary = binary

    def _resolve(self) -> str:
        found = (
            shutil.which(self.binary, path=_ENV["PATH"]) if "/" not in self.binary else self.binary
        )
        if found is None:
            raise RuntimeFailure(f"{self.binary} is not installed (apt-get install runc)")
        return found

    def _base(self) -> list[str]:
        return [self._resolve(), "--root", str(self.root)]

    async def run(
        self, container_id: str, bundle: Path, *, listen_fd: int, pid_file: Path, log_file: Path
    ) -> None:
        """``runc run --detach`` with ``listen_fd`` as the container's fd 3; returns once started."""
        argv = [
            *self._base(),
            "--log",
            str(log_file),
            "--log-format",
            "json",
            "run",
            "--detach",
            "--preserve-fds",
            "1",
            "--pid-file",
            str(pid_file),
            "--bundle",
            str(bundle),
            container_id,
        ]
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                _ENV,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, listen_fd, 3),
                ],
            )
            code = await _wait_pid(pid)
        except OSError as exc:
            raise RuntimeFailure(f"cannot start runc: {exc}") from exc
        if code != 0:
            detail = _log_errors(log_file) or f"exit code {code}"
            raise RuntimeFailure(f"runc run {container_id} failed: {detail}")

    async def _call(self, *args: str) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._base(),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_ENV,
            )
            out, err = await proc.communicate()
        except OSError as exc:
            raise RuntimeFailure(f"cannot start runc: {exc}") from exc
        return (
            proc.returncode if proc.returncode is not None else -1,
            out.decode(errors="replace"),
            err.decode(errors="replace").strip(),
        )

    async def delete(self, container_id: str) -> None:
        """``runc delete --force``: kill every process, remove cgroups and state; idempotent."""
        if not (self.root / container_id).exists():
            return
        code, _, err = await self._call("delete", "--force", container_id)
        if code != 0 and not any(m in err.lower() for m in _NOT_FOUND_MARKERS):
            raise RuntimeFailure(f"runc delete {container_id} failed: {err}")

    async def state(self, container_id: str) -> dict[str, Any] | None:
        """runc's view of a container, or None when it does not know it."""
        if not (self.root / container_id).exists():
            return None
        code, out, err = await self._call("state", container_id)
        if code != 0:
            if any(m in err.lower() for m in _NOT_FOUND_MARKERS):
                return None
            raise RuntimeFailure(f"runc state {container_id} failed: {err}")
        try:
            state: dict[str, Any] = json.loads(out)
        except ValueError as exc:
            raise RuntimeFailure(f"runc state {container_id}: unreadable answer") from exc
        return state

    def ids(self) -> list[str]:
        """Containers with state under our root (one directory each, by runc's layout)."""
        with contextlib.suppress(FileNotFoundError):
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        return []
