"""Starts a real ``corral server`` for tests, in a private data dir that shares built templates."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from corral.templates import build_in_data_dir

__all__ = [
    "Restartable",
    "RunningServer",
    "exec_stdout",
    "own_server",
    "running_server",
    "shared_templates_dir",
    "verify_identity_token",
]


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


_used_subnets: set[int] = set()


def network_config_for_tests(dns_upstream: str | None) -> dict[str, object]:
    """Network settings of one test server: its own subnet, host names and nft table, so that
    servers of one session never share host objects; DNS only toward the fake internet (a dead
    loopback port when there is none), never the host's real resolvers."""
    n = next(i for i in range(20, 250) if i not in _used_subnets)
    _used_subnets.add(n)
    tag = secrets.token_hex(2)[:3]
    return {
        "subnet": f"10.250.{n}.0/24",
        "prefix": f"t{tag}",
        "nft_table": f"corral_t{tag}",
        "dns_upstreams": [dns_upstream or "127.0.0.1:9"],
        "nflog_group": 20000 + n,
        # Ingress host form: "{port}-{id}.corral.test" (tests send the Host header themselves).
        "ingress_domain": "corral.test",
    }


def start_server(
    data_dir: Path, *, dns_upstream: str | None = None, upstream_ca_pem: str | None = None
) -> RunningServer:
    """``upstream_ca_pem``: a CA the egress proxy trusts, besides the host's, where it sends
    secrets (the fake internet's)."""
    port = _free_port()
    config_path = data_dir / "server.json"
    if not config_path.exists():
        network = network_config_for_tests(dns_upstream)
        if upstream_ca_pem is not None:
            (data_dir / "upstream-ca.pem").write_text(upstream_ca_pem)
            network["upstream_ca_file"] = str(data_dir / "upstream-ca.pem")
        config_path.write_text(json.dumps({"network": network}))
    code = (
        "import sys; from pathlib import Path; from corral.api.server import run_server; "
        "run_server(sys.argv[1], Path(sys.argv[2]), config_file=Path(sys.argv[3]), "
        "log_level='warning')"
    )
    log = open(data_dir / "server.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [sys.executable, "-c", code, f"127.0.0.1:{port}", str(data_dir), str(config_path)],
        stdout=log,
        stderr=log,
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
    from corral.runtime.microvm import MicroVMRuntime

    # VMs first: their disks are in the storage pool the container tier's purge removes.
    asyncio.run(MicroVMRuntime(data_dir, agent_binary_path()).purge())
    asyncio.run(ContainerRuntime(data_dir, agent_binary_path()).purge())
    config_path = data_dir / "server.json"
    if config_path.exists():
        from corral.config import ServerConfig
        from corral.core.network import purge_network

        asyncio.run(purge_network(ServerConfig.load(config_path).network))
    shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def running_server(
    data_dir: Path,
    templates: Path,
    *,
    dns_upstream: str | None = None,
    upstream_ca_pem: str | None = None,
) -> Iterator[RunningServer]:
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "templates").exists():
        (data_dir / "templates").symlink_to(templates)
    try:
        server = start_server(data_dir, dns_upstream=dns_upstream, upstream_ca_pem=upstream_ca_pem)
    except BaseException:
        release_data_dir(data_dir)  # whatever a server that failed to start made goes too
        raise
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            kill_all_sandboxes(server)
        stop_server(server)
        release_data_dir(data_dir)


@dataclass
class Restartable:
    """A server of a test's own, which the test may stop (or crash) and start again."""

    server: RunningServer

    def restart(self, *, hard: bool, between: Callable[[], None] | None = None) -> RunningServer:
        """Stop the server (``hard``: SIGKILL, a crash), run ``between``, start it again."""
        stop_server(self.server, hard=hard)
        if between is not None:
            between()
        self.server = start_server(self.server.data_dir)
        return self.server


@contextlib.contextmanager
def own_server(
    scratch: Path, *, dns_upstream: str | None = None, upstream_ca_pem: str | None = None
) -> Iterator[Restartable]:
    """A server on a data dir of its own under ``scratch`` (templates shared); at the end its
    sandboxes are killed and everything it made on the host is removed."""
    data = scratch / "data"
    data.mkdir(parents=True)
    (data / "templates").symlink_to(shared_templates_dir(scratch / "scratch"))
    handle = Restartable(
        start_server(data, dns_upstream=dns_upstream, upstream_ca_pem=upstream_ca_pem)
    )
    try:
        yield handle
    finally:
        try:
            kill_all_sandboxes(handle.server)
        finally:
            stop_server(handle.server)
            release_data_dir(data)


def exec_stdout(c: httpx.Client, sandbox_id: str, cmd: str) -> str:
    """Run ``cmd`` in the sandbox through the HTTP API; its stdout (it must exit 0)."""
    import base64

    r = c.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd})
    assert r.status_code == 200, r.text
    events = [json.loads(line) for line in r.text.splitlines() if line]
    assert next(e["exit_code"] for e in events if e["type"] == "exit") == 0, events
    return b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout").decode()


def verify_identity_token(server: RunningServer, token: str, audience: str) -> dict[str, Any]:
    """What an external service does with a sandbox's identity token: nothing but the server's
    published keys and its issuer name. Raises PyJWT's errors when the token does not hold."""
    import jwt

    keys = jwt.PyJWKClient(f"{server.url}/.well-known/jwks.json")
    claims: dict[str, Any] = jwt.decode(
        token,
        keys.get_signing_key_from_jwt(token),
        algorithms=["EdDSA"],
        audience=audience,
        issuer=server.url,
        options={"require": ["exp", "iat", "nbf", "sub", "aud", "iss", "jti"]},
        leeway=5,
    )
    return claims
