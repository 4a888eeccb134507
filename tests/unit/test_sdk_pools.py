"""Warm pools on the SDK side: the requests ``Client``/``AsyncClient`` send and how answers parse.

No server: every request goes to an ``httpx.MockTransport`` that records it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

import corral
from corral import errors
from corral.sdk import PoolInfo as ExportedPoolInfo
from corral.sdk import _wire
from corral.sdk._wire import calls
from corral.sdk.async_sandbox import AsyncClient, AsyncSandbox
from corral.sdk.models import PoolInfo, SandboxInfo
from corral.sdk.sandbox import Client, Sandbox
from tests.unit.sdk_mock import Recorder, error_response, route_sdk_to

URL = "http://corral.test:7700"

POOL: dict[str, Any] = {
    "name": "py",
    "template": "minimal",
    "isolation": "container",
    "cpu": 0.5,
    "memory_mb": 512,
    "disk_mb": 2048,
    "size": 20,
    "ready": 3,
    "created_at": "2026-11-23T13:00:00Z",
}
VM_POOL: dict[str, Any] = {
    **POOL,
    "name": "vm",
    "isolation": "microvm",
    "cpu": 2.0,
    "size": 0,
    "ready": 0,
}


def _sandbox(sandbox_id: str, pool: str | None) -> dict[str, Any]:
    return {
        "id": sandbox_id,
        "tenant_id": "admin",
        "template": "minimal",
        "state": "running",
        "timeout": 300,
        "created_at": "2026-11-23T13:00:00Z",
        "expires_at": "2026-11-23T13:05:00Z",
        "pool": pool,
    }


def _by_route(req: httpx.Request) -> httpx.Response:
    """What the server of docs/API.md answers to each pool route (and a create from a pool)."""
    path, method = req.url.path, req.method
    if path == "/v1/pools" and method == "GET":
        return httpx.Response(200, json=[POOL, VM_POOL])
    if path.startswith("/v1/pools/"):
        name = path.rsplit("/", 1)[-1]
        if name == "gone":
            return error_response(404, "not_found", "no pool 'gone'")
        if method == "DELETE":
            return httpx.Response(204)
        if method == "PUT":
            body = json.loads(req.content)
            if body["size"] < 0:
                return error_response(400, "invalid_request", "size: must be >= 0")
            return httpx.Response(200, json={**POOL, **body, "name": name, "ready": 0})
        return httpx.Response(200, json={**POOL, "name": name})
    if method == "POST" and path == "/v1/sandboxes":
        return httpx.Response(201, json=_sandbox("sb-warm", "py"))
    sandbox_id = path.rsplit("/", 1)[-1]
    return httpx.Response(200, json=_sandbox(sandbox_id, "py" if sandbox_id == "sb-warm" else None))


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Route every SDK client made from now on to a recorder answering as the pool routes do."""
    return route_sdk_to(monkeypatch, _by_route)


# ---------------------------------------------------------------- request building


def test_pool_routes_and_bodies() -> None:
    cases = [
        (calls.set_pool("py", "minimal", 20), "PUT", "/v1/pools/py",
         {"template": "minimal", "size": 20}),
        (calls.set_pool("py", "minimal", 0), "PUT", "/v1/pools/py",
         {"template": "minimal", "size": 0}),
        (calls.list_pools(), "GET", "/v1/pools", None),
        (calls.get_pool("py"), "GET", "/v1/pools/py", None),
        (calls.delete_pool("py"), "DELETE", "/v1/pools/py", None),
    ]  # fmt: skip
    for call, method, path, body in cases:
        assert (call.method, call.path, call.body, call.params) == (method, path, body, ())


def test_set_pool_sends_the_shape_only_when_given() -> None:
    full = calls.set_pool("vm", "base", 2, "microvm", 2.0, 1024, 4096, 2)
    assert full.body == {
        "template": "base",
        "size": 2,
        "isolation": "microvm",
        "cpu": 2.0,
        "vcpus": 2,
        "memory_mb": 1024,
        "disk_mb": 4096,
    }
    # Left out, not null: the server's create defaults then decide the shape, as at create.
    assert calls.set_pool("p", "base", 1, cpu=1.0).body == {
        "template": "base",
        "size": 1,
        "cpu": 1.0,
    }
    # Not checked here: the server's 400 says what a good size is.
    assert calls.set_pool("p", "base", -1).body["size"] == -1


def test_pool_names_cannot_climb_out_of_the_route() -> None:
    assert calls.get_pool("../x").path == "/v1/pools/..%2Fx"
    assert calls.delete_pool("..").path == "/v1/pools/%2E%2E"
    assert calls.set_pool("a/b", "base", 1).path == "/v1/pools/a%2Fb"
    with pytest.raises(errors.InvalidRequestError, match="empty"):
        calls.get_pool("")


# ---------------------------------------------------------------- parsing


def test_pool_parses_every_field() -> None:
    pool = PoolInfo.from_json(POOL)
    assert pool == PoolInfo(
        name="py",
        template="minimal",
        isolation="container",
        cpu=0.5,
        memory_mb=512,
        disk_mb=2048,
        size=20,
        ready=3,
        created_at=datetime(2026, 11, 23, 13, 0, tzinfo=UTC),
    )
    assert pool.raw == POOL
    assert ExportedPoolInfo is PoolInfo
    assert corral.PoolInfo is PoolInfo
    assert "PoolInfo" in corral.__all__ and "PoolInfo" in corral.sdk.__all__
    assert {"set_pool", "list_pools", "get_pool", "delete_pool"} <= set(vars(_wire.calls))


@pytest.mark.parametrize(
    "obj",
    [
        [POOL],
        None,
        {k: v for k, v in POOL.items() if k != "name"},
        {k: v for k, v in POOL.items() if k != "template"},
        {k: v for k, v in POOL.items() if k != "size"},
        {k: v for k, v in POOL.items() if k != "ready"},
        {k: v for k, v in POOL.items() if k != "created_at"},
        {**POOL, "created_at": "yesterday"},
        {**POOL, "ready": "some"},
        {**POOL, "cpu": "fast"},
    ],
)
def test_a_malformed_pool_is_reported_as_malformed(obj: object) -> None:
    with pytest.raises(errors.CorralError, match="malformed pool"):
        PoolInfo.from_json(obj)


def test_sandbox_info_names_the_pool_it_came_from() -> None:
    assert SandboxInfo.from_json(_sandbox("sb-1", "py")).pool == "py"
    assert SandboxInfo.from_json(_sandbox("sb-1", None)).pool is None
    # A server older than pools sends no "pool" at all.
    older = {k: v for k, v in _sandbox("sb-1", None).items() if k != "pool"}
    assert SandboxInfo.from_json(older).pool is None


# ---------------------------------------------------------------- sync client


def test_sync_client_pool_calls(server: Recorder) -> None:
    with Client(api_key="k", base_url=URL) as client:
        made = client.set_pool("py", "minimal", 20, memory_mb=512)
        assert (made.name, made.template, made.size, made.ready) == ("py", "minimal", 20, 0)
        client.set_pool(
            "vm", "base", 2, isolation="microvm", cpu=2.0, memory_mb=1024, disk_mb=4096, vcpus=2
        )
        assert [p.name for p in client.list_pools()] == ["py", "vm"]
        assert client.get_pool("py") == PoolInfo.from_json(POOL)
        assert client.delete_pool("py") is None  # type: ignore[func-returns-value]
    assert server.routes() == [
        ("PUT", "/v1/pools/py"),
        ("PUT", "/v1/pools/vm"),
        ("GET", "/v1/pools"),
        ("GET", "/v1/pools/py"),
        ("DELETE", "/v1/pools/py"),
    ]
    assert server.bodies()[:2] == [
        {"template": "minimal", "size": 20, "memory_mb": 512},
        {
            "template": "base",
            "size": 2,
            "isolation": "microvm",
            "cpu": 2.0,
            "vcpus": 2,
            "memory_mb": 1024,
            "disk_mb": 4096,
        },
    ]
    assert all(r.headers["authorization"] == "Bearer k" for r in server.requests)


def test_create_is_unchanged_and_reports_the_pool(server: Recorder) -> None:
    # Nothing in create names a pool: a matching template and shape is all it takes.
    sbx = Sandbox.create("minimal", memory_mb=512, api_key="k", base_url=URL)
    assert sbx.info().pool == "py"
    sbx.close()
    assert server.bodies()[0] == {"template": "minimal", "memory_mb": 512}


def test_an_empty_pool_list_and_a_malformed_one(server: Recorder) -> None:
    with Client(api_key="k", base_url=URL) as client:
        server.answer = lambda req: httpx.Response(200, json=[])
        assert client.list_pools() == []
        server.answer = lambda req: httpx.Response(200, json={"pools": []})
        with pytest.raises(errors.CorralError, match="malformed pool list"):
            client.list_pools()


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_request", errors.InvalidRequestError),
        (403, "permission_denied", errors.PermissionDeniedError),
        (404, "not_found", errors.NotFoundError),
        (429, "quota_exceeded", errors.QuotaExceededError),
    ],
)
async def test_errors_keep_their_class(
    server: Recorder, status: int, code: str, cls: type[errors.CorralError]
) -> None:
    server.answer = lambda req: error_response(status, code, f"pool trouble: {code}")
    client = Client(api_key="k", base_url=URL)
    attempts: list[Callable[[], object]] = [
        lambda: client.set_pool("py", "minimal", 5),
        client.list_pools,
        lambda: client.get_pool("py"),
        lambda: client.delete_pool("py"),
    ]
    for attempt in attempts:
        with pytest.raises(cls, match=code) as caught:
            attempt()
        assert type(caught.value) is cls
    client.close()
    aclient = AsyncClient(api_key="k", base_url=URL)
    async_attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: aclient.set_pool("py", "minimal", 5),
        aclient.list_pools,
        lambda: aclient.get_pool("py"),
        lambda: aclient.delete_pool("py"),
    ]
    for async_attempt in async_attempts:
        with pytest.raises(cls, match=code) as acaught:
            await async_attempt()
        assert type(acaught.value) is cls
    await aclient.close()


def test_the_servers_answers_to_a_bad_size_and_an_unknown_pool(server: Recorder) -> None:
    with Client(api_key="k", base_url=URL) as client:
        with pytest.raises(errors.InvalidRequestError, match="size"):
            client.set_pool("py", "minimal", -1)
        with pytest.raises(errors.NotFoundError, match="no pool 'gone'"):
            client.get_pool("gone")
        with pytest.raises(errors.NotFoundError, match="no pool 'gone'"):
            client.delete_pool("gone")


# ---------------------------------------------------------------- async client


async def test_async_client_mirrors_sync(server: Recorder) -> None:
    async with AsyncClient(api_key="k", base_url=URL) as client:
        made = await client.set_pool("py", "minimal", 20, memory_mb=512)
        assert (made.name, made.size, made.ready) == ("py", 20, 0)
        await client.set_pool(
            "vm", "base", 2, isolation="microvm", cpu=2.0, memory_mb=1024, disk_mb=4096, vcpus=2
        )
        assert [p.name for p in await client.list_pools()] == ["py", "vm"]
        assert await client.get_pool("py") == PoolInfo.from_json(POOL)
        assert await client.delete_pool("py") is None  # type: ignore[func-returns-value]
    asbx = await AsyncSandbox.create("minimal", memory_mb=512, api_key="k", base_url=URL)
    assert (await asbx.info()).pool == "py"
    await asbx.close()

    assert server.routes() == [
        ("PUT", "/v1/pools/py"),
        ("PUT", "/v1/pools/vm"),
        ("GET", "/v1/pools"),
        ("GET", "/v1/pools/py"),
        ("DELETE", "/v1/pools/py"),
        ("POST", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes/sb-warm"),
    ]
    bodies = server.bodies()
    assert bodies[0] == {"template": "minimal", "size": 20, "memory_mb": 512}
    assert bodies[1] == calls.set_pool("vm", "base", 2, "microvm", 2.0, 1024, 4096, 2).body
