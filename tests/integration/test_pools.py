"""Warm pools through the HTTP API: a matching create takes a ready sandbox (with its own env,
metadata, timeout and network policy applied, no restart) and the pool refills; other shapes
start on demand; pooled sandboxes are nobody's until taken, survive a server restart, and go
when the pool shrinks or is deleted; bad pool settings are clear 4xx."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import container_skip_reason
from tests.integration.server_harness import RunningServer, exec_stdout, own_server

pytestmark = [pytest.mark.integration]


def _ready(c: httpx.Client, name: str, want: int, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pool = dict(c.get(f"/v1/pools/{name}").json())
        if pool["ready"] == want or time.monotonic() > deadline:
            assert pool["ready"] == want, pool
            return pool
        time.sleep(0.1)


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with server.client(timeout=120) as c:
        yield c
        for pool in c.get("/v1/pools").json():
            c.delete(f"/v1/pools/{pool['name']}")


@pytest.mark.usefixtures("server_no_leaks")
def test_a_matching_create_takes_a_ready_sandbox_and_the_pool_refills(api: httpx.Client) -> None:
    r = api.put("/v1/pools/small", json={"template": "minimal", "size": 2, "memory_mb": 128})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == 2 and r.json()["memory_mb"] == 128
    _ready(api, "small", 2)
    assert api.get("/v1/sandboxes").json() == []  # waiting sandboxes are nobody's yet
    body = {
        "template": "minimal",
        "memory_mb": 128,
        "env": {"GREETING": "from the pool"},
        "metadata": {"task": "t1"},
        "timeout": 77,
    }
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    sb = r.json()
    assert sb["pool"] == "small" and sb["state"] == "running" and sb["timeout"] == 77
    assert sb["metadata"] == {"task": "t1"} and "GREETING" in sb["env_keys"]
    out = exec_stdout(api, sb["id"], "echo $GREETING; echo $CORRAL_SANDBOX_ID; hostname")
    assert out.split("\n")[:3] == ["from the pool", sb["id"], sb["id"]]
    assert [s["id"] for s in api.get("/v1/sandboxes").json()] == [sb["id"]]
    _ready(api, "small", 2)  # refilled in the background
    # Another shape is started on demand.
    r = api.post("/v1/sandboxes", json={"template": "minimal", "memory_mb": 192})
    assert r.status_code == 201 and r.json()["pool"] is None, r.text
    for s in api.get("/v1/sandboxes").json():
        assert api.delete(f"/v1/sandboxes/{s['id']}").status_code == 204
    # Shrinking kills what waits beyond the new size; deleting the pool kills the rest.
    assert api.put("/v1/pools/small", json={"template": "minimal", "size": 1, "memory_mb": 128})
    _ready(api, "small", 1)
    assert api.delete("/v1/pools/small").status_code == 204
    assert api.get("/v1/pools/small").status_code == 404


def test_bad_pool_settings_are_4xx(api: httpx.Client) -> None:
    for body, status, words in (
        ({"template": "minimal", "size": -1}, 400, "size"),
        ({"template": "no-such-template", "size": 1}, 400, "no-such-template"),
        ({"template": "minimal", "size": 1, "memory_mb": 1}, 400, "memory"),
        ({"template": "minimal", "size": 10_000}, 429, "limit"),
        ({"template": "minimal", "size": 1, "colour": "red"}, 400, "colour"),
    ):
        r = api.put("/v1/pools/bad", json=body)
        assert r.status_code == status and words in r.text, (body, r.text)
    assert api.get("/v1/pools").json() == []
    assert api.delete("/v1/pools/nope").status_code == 404


def test_pooled_sandboxes_survive_a_server_restart(tmp_path: Path) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with own_server(tmp_path) as own:
        with own.server.client(timeout=120) as c:
            assert c.put("/v1/pools/p", json={"template": "minimal", "size": 2}).status_code == 200
            _ready(c, "p", 2)
        data = own.server.data_dir
        waiting = {p.name for p in (data / "sandboxes").iterdir()}
        assert len(waiting) == 2
        server = own.restart(hard=True)
        with server.client(timeout=120) as c:
            assert c.get("/v1/pools/p").json()["ready"] == 2  # adopted, not made again
            assert {p.name for p in (data / "sandboxes").iterdir()} == waiting
            sb = c.post("/v1/sandboxes", json={"template": "minimal"}).json()
            assert sb["pool"] == "p" and sb["id"] in waiting
            assert exec_stdout(c, sb["id"], "echo ok") == "ok\n"


@pytest.mark.usefixtures("server_no_leaks")
def test_sdk_and_cli_manage_pools(server: RunningServer, env: dict[str, str]) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    from corral import Client, Sandbox
    from tests.integration.cli_harness import corral_text

    conn = {"api_key": server.admin_key, "base_url": server.url}
    with Client(**conn) as client:
        pool = client.set_pool("sdk", "minimal", 1, memory_mb=160)
        assert (pool.name, pool.size, pool.memory_mb) == ("sdk", 1, 160)
        deadline = time.monotonic() + 60
        while client.get_pool("sdk").ready < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "sdk" in corral_text(env, "pool", "ls").stdout
        with Sandbox.create("minimal", memory_mb=160, env={"K": "v"}, **conn) as sbx:
            assert sbx.pool == sbx.info().pool == "sdk"
            assert sbx.exec("echo $K").stdout == "v\n"
        corral_text(env, "pool", "rm", "sdk")
        assert client.list_pools() == []
