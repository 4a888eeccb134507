"""Through the HTTP files API, no path, symlink, swapped symlink or archive reaches the host."""

from __future__ import annotations

import io
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.security, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def sandbox(api: httpx.Client, isolation: dict[str, Any]) -> Iterator[str]:
    body = {"template": "minimal", "timeout": 600, **isolation}
    sid = api.post("/v1/sandboxes", json=body).json()["id"]
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


@pytest.fixture
def host_canary(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    secret = secrets.token_hex(16).encode()
    p = tmp_path / "canary.txt"
    p.write_bytes(secret)
    yield p, secret


def test_symlink_swapped_during_calls_never_reaches_the_host(
    api: httpx.Client, sandbox: str, host_canary: tuple[Path, bytes], tmp_path: Path
) -> None:
    canary, secret = host_canary
    landing = tmp_path / "must-not-exist"
    # Inside: /tmp/race flips between a real directory and a symlink to / as fast as it can.
    swapper = "while true; do rm -rf /tmp/race; mkdir -p /tmp/race; rm -rf /tmp/race; ln -s / /tmp/race; done"
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": swapper, "background": True})
    assert r.status_code == 201, r.text
    base = f"/v1/sandboxes/{sandbox}/files"
    for _ in range(150):
        r = api.get(base, params={"path": f"/tmp/race{canary}"})
        assert secret not in r.content
        api.put(base, params={"path": f"/tmp/race{landing}"}, content=b"pwned")
        r = api.get(base + "/list", params={"path": "/tmp/race" + str(tmp_path), "depth": 2})
        assert canary.name not in r.text
    assert not landing.exists()
    assert canary.read_bytes() == secret


def test_absolute_and_relative_links_resolve_inside(
    api: httpx.Client, sandbox: str, host_canary: tuple[Path, bytes]
) -> None:
    canary, secret = host_canary
    base = f"/v1/sandboxes/{sandbox}/files"
    with api.stream(
        "POST",
        f"/v1/sandboxes/{sandbox}/exec",
        json={
            "cmd": f"ln -s {canary} /tmp/abs; ln -s ../../../../../..{canary} /tmp/rel; ln -s /proc/1/root /tmp/p1"
        },
    ) as r:
        r.read()
    for p in (
        "/tmp/abs",
        "/tmp/rel",
        f"/tmp/p1{canary}",
        f"/proc/self/root{canary}",
        f"/..{canary}",
    ):
        r = api.get(base, params={"path": p})
        assert secret not in r.content, p
        assert r.status_code < 500, (p, r.text)


def test_archive_members_never_land_outside_the_target(
    api: httpx.Client, sandbox: str, tmp_path: Path
) -> None:
    base = f"/v1/sandboxes/{sandbox}/files"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("out")
        link.type = tarfile.SYMTYPE
        link.linkname = "/"
        tf.addfile(link)
        evil = tarfile.TarInfo("out/etc/planted")
        evil.size = 1
        tf.addfile(evil, io.BytesIO(b"x"))
    r = api.put(base + "/tar", params={"path": "/target"}, content=buf.getvalue())
    assert r.status_code >= 400, r.text
    assert api.get(base + "/exists", params={"path": "/etc/planted"}).json() == {"exists": False}
    for name in ("/abs-member", "../dotdot-member"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo(name)
            ti.size = 1
            tf.addfile(ti, io.BytesIO(b"x"))
        r = api.put(base + "/tar", params={"path": "/target"}, content=buf.getvalue())
        assert r.status_code == 400, r.text
    assert api.get(base + "/exists", params={"path": "/dotdot-member"}).json() == {"exists": False}
    assert api.get(base + "/exists", params={"path": "/abs-member"}).json() == {"exists": False}
