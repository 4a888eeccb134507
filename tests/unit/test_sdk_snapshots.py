"""Snapshots, restore and fork on the SDK side: the requests sent and how answers are parsed.

No server: every request goes to an ``httpx.MockTransport`` that records it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypedDict

import httpx
import pytest

from corral import errors
from corral.sdk import Snapshot as ExportedSnapshot
from corral.sdk import _http as sdk_http
from corral.sdk._config import ClientConfig
from corral.sdk._wire import calls, snapshot_ref
from corral.sdk.async_sandbox import AsyncSandbox
from corral.sdk.models import Snapshot
from corral.sdk.sandbox import Sandbox
from tests.unit.sdk_mock import Recorder, error_response, route_sdk_to

URL = "http://corral.test:7700"
CONFIG = ClientConfig(URL, "k-123")

SNAP: dict[str, Any] = {
    "id": "snap-0123456789ab",
    "name": "before-upgrade",
    "sandbox_id": "sb-1",
    "template": "minimal",
    "disk_mb": 1024,
    "size_bytes": 4096,
    "created_at": "2026-11-23T13:00:00Z",
}
OLDER: dict[str, Any] = {
    **SNAP,
    "id": "snap-ba9876543210",
    "name": "snap-ba9876543210",
    "created_at": "2026-11-23T12:00:00Z",
}


def _sandbox(sandbox_id: str, state: str = "running") -> dict[str, Any]:
    return {
        "id": sandbox_id,
        "tenant_id": "admin",
        "template": "minimal",
        "state": state,
        "timeout": 300,
        "created_at": "2026-11-23T13:00:00Z",
        "expires_at": "2026-11-23T13:05:00Z",
    }


def _by_route(req: httpx.Request) -> httpx.Response:
    """What the server of docs/API.md answers to each snapshot route."""
    path, method = req.url.path, req.method
    if method == "DELETE":
        return httpx.Response(204)
    if path.endswith("/fork"):
        count = json.loads(req.content)["count"]
        if count < 1:
            return error_response(400, "invalid_request", "count must be between 1 and 100")
        return httpx.Response(201, json=[_sandbox(f"sb-f{i}") for i in range(count)])
    if path.endswith("/snapshots") and method == "POST":
        return httpx.Response(201, json=SNAP)
    if path.endswith("/snapshots") or path == "/v1/snapshots":
        return httpx.Response(200, json=[SNAP, OLDER])
    if path.startswith("/v1/snapshots/"):
        return httpx.Response(200, json=SNAP)
    if path.endswith("/restore"):
        return httpx.Response(200, json={**_sandbox("sb-1"), "created_at": "2026-11-23T14:00:00Z"})
    if method == "POST" and path == "/v1/sandboxes":
        return httpx.Response(201, json=_sandbox("sb-new"))
    return httpx.Response(200, json=_sandbox(path.rsplit("/", 1)[-1]))


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Route every SDK client made from now on (classmethods make their own) to a recorder."""
    return route_sdk_to(monkeypatch, _by_route)


class Conn(TypedDict):
    api_key: str
    base_url: str


CONN: Conn = {"api_key": "k", "base_url": URL}


# ---------------------------------------------------------------- request building


def test_snapshot_routes_and_bodies() -> None:
    snap = Snapshot.from_json(SNAP)
    cases = [
        (calls.create_snapshot("sb-1", "n"), "POST", "/v1/sandboxes/sb-1/snapshots", {"name": "n"}),
        (calls.create_snapshot("sb-1", None), "POST", "/v1/sandboxes/sb-1/snapshots", {"name": None}),
        (calls.sandbox_snapshots("sb-1"), "GET", "/v1/sandboxes/sb-1/snapshots", None),
        (calls.restore_sandbox("sb-1", "n"), "POST", "/v1/sandboxes/sb-1/restore", {"snapshot": "n"}),
        (calls.restore_sandbox("sb-1", snap), "POST", "/v1/sandboxes/sb-1/restore",
         {"snapshot": snap.id}),
        (calls.get_snapshot(snap), "GET", f"/v1/snapshots/{snap.id}", None),
        (calls.delete_snapshot("snap-1"), "DELETE", "/v1/snapshots/snap-1", None),
        (calls.list_snapshots(None), "GET", "/v1/snapshots", None),
    ]  # fmt: skip
    for call, method, path, body in cases:
        assert (call.method, call.path, call.body) == (method, path, body)
    assert calls.list_snapshots(None).params == ()
    assert calls.list_snapshots("sb-1").params == (("sandbox_id", "sb-1"),)
    # Ids come from users: they cannot climb out of the route.
    assert calls.get_snapshot("../x").path == "/v1/snapshots/..%2Fx"
    assert calls.delete_snapshot("..").path == "/v1/snapshots/%2E%2E"


def test_fork_body_sends_the_count_as_given_and_overrides_only_when_given() -> None:
    call = calls.fork_snapshot("snap-1", 3, None, None, None)
    assert (call.method, call.path) == ("POST", "/v1/snapshots/snap-1/fork")
    assert call.body == {"count": 3, "timeout": None, "metadata": None, "env": None}
    # Not checked here: the server's 400 says what the limits are.
    assert calls.fork_snapshot("snap-1", 0, None, None, None).body["count"] == 0
    full = calls.fork_snapshot("snap-1", 2, 60, {"run": "a"}, {"K": "v"})
    assert full.body == {"count": 2, "timeout": 60, "metadata": {"run": "a"}, "env": {"K": "v"}}


def test_create_with_a_snapshot_leaves_the_template_to_it() -> None:
    plain = calls.create_sandbox(None, None, None, None, None, None, None)
    assert plain.body == {"template": "base"}
    from_snap = calls.create_sandbox(None, None, None, None, None, None, None, snapshot="snap-1")
    assert from_snap.body == {"snapshot": "snap-1"}
    obj = calls.create_sandbox(
        "minimal", None, None, None, 60, None, None, snapshot=Snapshot.from_json(SNAP)
    )
    assert obj.body == {"template": "minimal", "timeout": 60, "snapshot": SNAP["id"]}


def test_snapshot_ref_takes_objects_ids_and_names_only() -> None:
    assert snapshot_ref(Snapshot.from_json(SNAP)) == SNAP["id"]
    assert snapshot_ref("before-upgrade") == "before-upgrade"
    for bad in ("", None, 3):
        with pytest.raises(errors.InvalidRequestError, match="not a snapshot"):
            snapshot_ref(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- parsing


def test_snapshot_parses_every_field() -> None:
    snap = Snapshot.from_json(SNAP)
    assert snap == Snapshot(
        id="snap-0123456789ab",
        name="before-upgrade",
        sandbox_id="sb-1",
        template="minimal",
        disk_mb=1024,
        size_bytes=4096,
        created_at=datetime(2026, 11, 23, 13, 0, tzinfo=UTC),
    )
    assert snap.raw == SNAP
    assert ExportedSnapshot is Snapshot
    # The name defaults to the id on the server; an answer without one still parses.
    assert Snapshot.from_json({**SNAP, "name": None}).name == SNAP["id"]


@pytest.mark.parametrize(
    "obj",
    [
        [SNAP],
        {k: v for k, v in SNAP.items() if k != "id"},
        {k: v for k, v in SNAP.items() if k != "sandbox_id"},
        {k: v for k, v in SNAP.items() if k != "created_at"},
        {**SNAP, "created_at": "yesterday"},
        {**SNAP, "size_bytes": "big"},
    ],
)
def test_a_malformed_snapshot_is_reported_as_malformed(obj: object) -> None:
    with pytest.raises(errors.CorralError, match="malformed snapshot"):
        Snapshot.from_json(obj)


# ---------------------------------------------------------------- sync client


def test_sync_snapshot_snapshots_and_restore() -> None:
    rec = Recorder(_by_route)
    sbx = Sandbox("sb-1", sdk_http.SyncHttp(CONFIG, transport=httpx.MockTransport(rec)))
    snap = sbx.snapshot("before-upgrade")
    assert snap.id == SNAP["id"] and snap.name == "before-upgrade"
    assert [s.id for s in sbx.snapshots()] == [SNAP["id"], OLDER["id"]]
    assert sbx.restore(snap) is None  # type: ignore[func-returns-value]
    # The answer of restore replaces what was known about the sandbox.
    assert sbx._info is not None and sbx._info.created_at == datetime(2026, 11, 23, 14, tzinfo=UTC)
    sbx.restore("before-upgrade")
    assert rec.routes() == [
        ("POST", "/v1/sandboxes/sb-1/snapshots"),
        ("GET", "/v1/sandboxes/sb-1/snapshots"),
        ("POST", "/v1/sandboxes/sb-1/restore"),
        ("POST", "/v1/sandboxes/sb-1/restore"),
    ]
    assert rec.bodies() == [
        {"name": "before-upgrade"},
        None,
        {"snapshot": SNAP["id"]},
        {"snapshot": "before-upgrade"},
    ]
    sbx.close()


def test_sync_fork_gives_each_sandbox_its_own_connection(server: Recorder) -> None:
    forks = Sandbox.fork(Snapshot.from_json(SNAP), 3, timeout=60, metadata={"a": "b"}, **CONN)
    assert [s.id for s in forks] == ["sb-f0", "sb-f1", "sb-f2"]
    assert server.routes() == [("POST", f"/v1/snapshots/{SNAP['id']}/fork")]
    assert server.bodies() == [{"count": 3, "timeout": 60, "metadata": {"a": "b"}, "env": None}]
    assert forks[0]._info is not None and forks[0]._info.state == "running"
    forks[0].close()
    # Closing one fork must leave its siblings usable.
    assert forks[1].info().id == "sb-f1"
    for s in forks[1:]:
        s.close()


def test_sync_fork_count_zero_is_the_servers_400(server: Recorder) -> None:
    with pytest.raises(errors.InvalidRequestError, match="between 1 and 100"):
        Sandbox.fork("snap-1", 0, **CONN)
    assert server.bodies() == [{"count": 0, "timeout": None, "metadata": None, "env": None}]


def test_sync_snapshot_classmethods(server: Recorder) -> None:
    assert [s.id for s in Sandbox.list_snapshots(**CONN)] == [SNAP["id"], OLDER["id"]]
    Sandbox.list_snapshots("sb-1", **CONN)
    assert Sandbox.get_snapshot(SNAP["id"], **CONN) == Snapshot.from_json(SNAP)
    Sandbox.delete_snapshot(Snapshot.from_json(SNAP), **CONN)
    Sandbox.delete_snapshot("snap-x", **CONN)
    assert server.routes() == [
        ("GET", "/v1/snapshots"),
        ("GET", "/v1/snapshots"),
        ("GET", f"/v1/snapshots/{SNAP['id']}"),
        ("DELETE", f"/v1/snapshots/{SNAP['id']}"),
        ("DELETE", "/v1/snapshots/snap-x"),
    ]
    assert [r.url.params.get("sandbox_id") for r in server.requests[:2]] == [None, "sb-1"]


def test_sync_create_from_a_snapshot(server: Recorder) -> None:
    sbx = Sandbox.create(snapshot=Snapshot.from_json(SNAP), timeout=30, **CONN)
    sbx.close()
    Sandbox.create(**CONN).close()
    assert server.bodies() == [{"snapshot": SNAP["id"], "timeout": 30}, {"template": "base"}]


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (404, "not_found", errors.NotFoundError),
        (409, "conflict", errors.ConflictError),
        (409, "sandbox_not_running", errors.SandboxNotRunningError),
        (429, "quota_exceeded", errors.QuotaExceededError),
    ],
)
async def test_errors_keep_their_class(
    server: Recorder, status: int, code: str, cls: type[errors.CorralError]
) -> None:
    server.answer = lambda req: error_response(status, code, f"snapshot trouble: {code}")
    sbx = Sandbox("sb-1", sdk_http.SyncHttp(CONFIG, transport=httpx.MockTransport(server)))
    asbx = AsyncSandbox("sb-1", sdk_http.AsyncHttp(CONFIG, transport=httpx.MockTransport(server)))
    attempts: list[Callable[[], object]] = [
        lambda: sbx.snapshot("x"),
        lambda: sbx.restore("x"),
        sbx.snapshots,
        lambda: Sandbox.fork("snap-1", 2, **CONN),
        lambda: Sandbox.get_snapshot("snap-1", **CONN),
        lambda: Sandbox.delete_snapshot("snap-1", **CONN),
    ]
    for attempt in attempts:
        with pytest.raises(cls, match=code) as caught:
            attempt()
        assert type(caught.value) is cls
    async_attempts: list[Callable[[], Awaitable[object]]] = [
        lambda: asbx.snapshot("x"),
        lambda: asbx.restore("x"),
        lambda: AsyncSandbox.fork("snap-1", 2, **CONN),
        lambda: AsyncSandbox.delete_snapshot("snap-1", **CONN),
    ]
    for async_attempt in async_attempts:
        with pytest.raises(cls) as acaught:
            await async_attempt()
        assert type(acaught.value) is cls
    sbx.close()
    await asbx.close()


# ---------------------------------------------------------------- async client


async def test_async_mirrors_sync(server: Recorder) -> None:
    asbx = AsyncSandbox("sb-1", sdk_http.AsyncHttp(CONFIG, transport=httpx.MockTransport(server)))
    snap = await asbx.snapshot()
    assert snap == Snapshot.from_json(SNAP)
    assert len(await asbx.snapshots()) == 2
    await asbx.restore(snap)
    assert asbx._info is not None and asbx._info.id == "sb-1"
    await asbx.close()

    forks = await AsyncSandbox.fork(snap, 2, env={"K": "v"}, **CONN)
    assert [s.id for s in forks] == ["sb-f0", "sb-f1"]
    await forks[0].close()
    assert (await forks[1].info()).id == "sb-f1"
    await forks[1].close()
    with pytest.raises(errors.InvalidRequestError, match="between 1 and 100"):
        await AsyncSandbox.fork(snap, 0, **CONN)

    assert len(await AsyncSandbox.list_snapshots("sb-1", **CONN)) == 2
    assert (await AsyncSandbox.get_snapshot(snap.id, **CONN)).name == "before-upgrade"
    await AsyncSandbox.delete_snapshot(snap, **CONN)
    created = await AsyncSandbox.create(snapshot=snap.id, **CONN)
    await created.close()

    assert server.routes() == [
        ("POST", "/v1/sandboxes/sb-1/snapshots"),
        ("GET", "/v1/sandboxes/sb-1/snapshots"),
        ("POST", "/v1/sandboxes/sb-1/restore"),
        ("POST", f"/v1/snapshots/{snap.id}/fork"),
        ("GET", "/v1/sandboxes/sb-f1"),
        ("POST", f"/v1/snapshots/{snap.id}/fork"),
        ("GET", "/v1/snapshots"),
        ("GET", f"/v1/snapshots/{snap.id}"),
        ("DELETE", f"/v1/snapshots/{snap.id}"),
        ("POST", "/v1/sandboxes"),
    ]
    bodies = server.bodies()
    assert bodies[0] == {"name": None}
    assert bodies[3] == {"count": 2, "timeout": None, "metadata": None, "env": {"K": "v"}}
    assert bodies[-1] == {"snapshot": snap.id}
