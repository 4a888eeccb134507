"""A fake internet for network tests: a network namespace made by the test, reached from the host
through a veth, holding TEST-NET addresses and the servers of ``fake_hosts.py``.

Nothing here touches any address outside 198.51.100.0/24 and 203.0.113.0/24, and everything is
removed by ``close()`` (the namespace, the veth and its routes go with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.integration.fake_hosts import DNS_IP, HOST_IPS, ZONE

__all__ = ["FakeInternet", "fake_internet"]

HOST_SIDE = "198.51.100.1"
INSIDE = "198.51.100.2"
ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class FakeInternet:
    netns: str
    veth: str
    directory: Path
    proc: subprocess.Popen[bytes]
    ca_pem: str
    dns: str = f"{DNS_IP}:53"

    def queries(self) -> list[str]:
        """Every name the fake authoritative DNS server was asked about, in order."""
        path = self.directory / "queries.log"
        if not path.exists():
            return []
        return [json.loads(line)["name"] for line in path.read_text().splitlines() if line]

    def requests(self) -> list[dict[str, object]]:
        path = self.directory / "requests.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def ip_of(self, name: str) -> str:
        return ZONE[name]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.veth)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.netns)


@contextlib.contextmanager
def fake_internet(directory: Path) -> Iterator[FakeInternet]:
    taken = subprocess.run(
        ["ip", "route", "show", "198.51.100.0/24"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    if taken:
        # Its addresses are fixed (the fake DNS zone names them), so one per host at a time.
        raise RuntimeError(f"another fake internet already runs on this host ({taken})")
    tag = secrets.token_hex(3)
    netns, veth = f"cfi-{tag}", f"cfi{tag}"
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert(*sorted(set(ZONE) | {"*.allowed.test"}))
    cert.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    ca_pem = ca.cert_pem.bytes().decode()
    _ip("netns", "add", netns)
    proc: subprocess.Popen[bytes] | None = None
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("addr", "add", f"{HOST_SIDE}/24", "dev", veth)
        _ip("link", "set", veth, "up")
        # Replies to sandboxes' forwarded (non-TCP) traffic come back in through this veth.
        Path(f"/proc/sys/net/ipv4/conf/{veth}/forwarding").write_text("1")
        _ip("route", "add", "203.0.113.0/24", "via", INSIDE, "dev", veth)
        inside = ["-n", netns]
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{INSIDE}/24", "dev", "eth0")
        for extra in (*HOST_IPS, DNS_IP):
            _ip(
                *inside,
                "addr",
                "add",
                f"{extra}/32",
                "dev",
                "lo" if extra.startswith("203.") else "eth0",
            )
        _ip(*inside, "link", "set", "eth0", "up")
        _ip(*inside, "route", "add", "default", "via", HOST_SIDE)
        log = (directory / "fake_hosts.log").open("ab")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                sys.executable,
                "-m",
                "tests.integration.fake_hosts",
                str(directory),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log.close()
        deadline = time.monotonic() + 30
        while not (directory / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"fake hosts did not start: {(directory / 'fake_hosts.log').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        net = FakeInternet(netns, veth, directory, proc, ca_pem)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", veth)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", netns)
        raise
    try:
        yield net
    finally:
        net.close()
