"""Starts a real ``corral server`` for tests, in a private data dir that shares built templates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from corral.templates import build_in_data_dir

__all__ = ["RunningServer", "running_server", "shared_templates_dir"]


@dataclass
class RunningServer:
    url: str
    admin_key: str
    data_dir: Path
    proc: subprocess.Popen[bytes]

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key or self.admin_key}"},
            timeout=timeout,
        )


def shared_templates_dir(scratch: Path) -> Path:
    """Templates built once per machine (CORRAL_TEST_DATA_DIR, as `make test` sets) or once here."""
    shared = os.environ.get("CORRAL_TEST_DATA_DIR")
    root = Path(shared) if shared else scratch / "shared"
    root.mkdir(parents=True, exist_ok=True)
    build_in_data_dir("minimal", root)
    return root / "templates"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path) -> RunningServer:
    port = _free_port()
    code = (
        "import sys; from pathlib import Path; from corral.api.server import run_server; "
        "run_server(sys.argv[1], Path(sys.argv[2]), log_level='warning')"
    )
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-c", code, f"127.0.0.1:{port}", str(data_dir)], stdout=log, stderr=log
    )
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(data_dir / 'server.log').read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("server did not answer within 60 s")
    key = (data_dir / "admin.key").read_text().strip()
    return RunningServer(url, key, data_dir, proc)


def stop_server(server: RunningServer, *, hard: bool = False) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def kill_all_sandboxes(server: RunningServer) -> None:
    with server.client() as c:
        for sb in c.get("/v1/sandboxes").json():
            c.delete(f"/v1/sandboxes/{sb['id']}")


def release_data_dir(data_dir: Path) -> None:
    """Undo what the container runtime set up for itself in a data dir, then delete it."""
    from corral.agent.build import agent_binary_path
    from corral.runtime.container import ContainerRuntime

    asyncio.run(ContainerRuntime(data_dir, agent_binary_path()).purge())
    shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_server(data_dir: Path, templates: Path) -> Iterator[RunningServer]:
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "templates").exists():
        (data_dir / "templates").symlink_to(templates)
    server = start_server(data_dir)
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            kill_all_sandboxes(server)
        stop_server(server)
        release_data_dir(data_dir)
