"""Snapshots over HTTP: take, list, delete; restore by name or id; fork N independent sandboxes or
create one from a snapshot; another tenant's or a deleted snapshot, a killed sandbox and a bad
count are clear 4xx that change nothing."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.server_harness import RunningServer, exec_stdout

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def cleanup(api: httpx.Client) -> Iterator[dict[str, list[str]]]:
    made: dict[str, list[str]] = {"sandboxes": [], "snapshots": []}
    yield made
    for sid in made["sandboxes"]:
        api.delete(f"/v1/sandboxes/{sid}")
    for snap in made["snapshots"]:
        api.delete(f"/v1/snapshots/{snap}")


def _create(api: httpx.Client, made: dict[str, list[str]], **body: Any) -> dict[str, Any]:
    r = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600, **body})
    assert r.status_code == 201, r.text
    made["sandboxes"].append(r.json()["id"])
    return dict(r.json())


def _snap(api: httpx.Client, made: dict[str, list[str]], sid: str, **body: Any) -> dict[str, Any]:
    r = api.post(f"/v1/sandboxes/{sid}/snapshots", json=body or None)
    assert r.status_code == 201, r.text
    made["snapshots"].append(r.json()["id"])
    return dict(r.json())


def test_take_list_restore_delete(api: httpx.Client, cleanup: dict[str, list[str]]) -> None:
    sid = _create(api, cleanup)["id"]
    exec_stdout(api, sid, "echo v1 > /root/v")
    first = _snap(api, cleanup, sid, name="before")
    assert first["name"] == "before" and first["sandbox_id"] == sid
    assert first["template"] == "minimal" and first["size_bytes"] > 0
    assert api.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "before"}).status_code == 409
    exec_stdout(api, sid, "echo v2 > /root/v")
    second = _snap(api, cleanup, sid)
    assert second["name"] == second["id"]
    listed = api.get(f"/v1/sandboxes/{sid}/snapshots").json()
    assert [s["id"] for s in listed] == [second["id"], first["id"]]
    assert api.get(f"/v1/snapshots/{first['id']}").json() == first
    assert first["id"] in [s["id"] for s in api.get("/v1/snapshots").json()]

    exec_stdout(api, sid, "echo v3 > /root/v; touch /root/later")
    r = api.post(f"/v1/sandboxes/{sid}/restore", json={"snapshot": "before"})  # by name
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running" and r.json()["id"] == sid
    assert exec_stdout(api, sid, "cat /root/v; ls /root").split() == ["v1", "v"]
    r = api.post(f"/v1/sandboxes/{sid}/restore", json={"snapshot": second["id"]})  # by id
    assert r.status_code == 200, r.text
    assert exec_stdout(api, sid, "cat /root/v") == "v2\n"

    assert api.delete(f"/v1/snapshots/{first['id']}").status_code == 204
    assert api.get(f"/v1/snapshots/{first['id']}").status_code == 404
    r = api.post(f"/v1/sandboxes/{sid}/restore", json={"snapshot": first["id"]})
    assert r.status_code == 404 and "snap" in r.json()["error"]["message"]
    assert exec_stdout(api, sid, "cat /root/v") == "v2\n"  # nothing changed


def test_fork_gives_independent_copies(api: httpx.Client, cleanup: dict[str, list[str]]) -> None:
    src = _create(api, cleanup, metadata={"job": "src"}, env={"FROM": "src"}, cpu=0.5)["id"]
    exec_stdout(api, src, "echo base > /root/f")
    snap = _snap(api, cleanup, src)
    exec_stdout(api, src, "echo later > /root/f")
    r = api.post(f"/v1/snapshots/{snap['id']}/fork", json={"count": 3, "metadata": {"job": "f"}})
    assert r.status_code == 201, r.text
    forks = r.json()
    cleanup["sandboxes"].extend(f["id"] for f in forks)
    assert len({f["id"] for f in forks}) == 3
    for f in forks:
        assert f["state"] == "running" and f["metadata"] == {"job": "f"}
        assert f["cpu"] == 0.5 and f["env_keys"] == ["FROM"]  # the source's settings
    for i, f in enumerate(forks):
        assert exec_stdout(api, f["id"], f"cat /root/f; echo {i} > /root/f; hostname") == (
            f"base\n{f['id']}\n"
        )
    assert [exec_stdout(api, f["id"], "cat /root/f") for f in forks] == ["0\n", "1\n", "2\n"]
    assert exec_stdout(api, src, "cat /root/f") == "later\n"

    # One sandbox from a snapshot through the plain create call.
    r = api.post("/v1/sandboxes", json={"snapshot": snap["id"], "timeout": 300})
    assert r.status_code == 201, r.text
    cleanup["sandboxes"].append(r.json()["id"])
    assert r.json()["timeout"] == 300 and r.json()["metadata"] == {"job": "src"}
    assert exec_stdout(api, r.json()["id"], "cat /root/f") == "base\n"
    # Killing the source leaves its snapshots usable.
    assert api.delete(f"/v1/sandboxes/{src}").status_code == 204
    assert [s["id"] for s in api.get(f"/v1/sandboxes/{src}/snapshots").json()] == [snap["id"]]
    r = api.post(f"/v1/snapshots/{snap['id']}/fork")
    assert r.status_code == 201, r.text
    cleanup["sandboxes"].append(r.json()[0]["id"])


def test_bad_input_is_4xx_and_changes_nothing(
    api: httpx.Client, server: RunningServer, cleanup: dict[str, list[str]]
) -> None:
    sid = _create(api, cleanup)["id"]
    snap = _snap(api, cleanup, sid)
    before = api.get("/v1/sandboxes").json()
    for count, status in ((0, 400), (-1, 400), (101, 400)):
        r = api.post(f"/v1/snapshots/{snap['id']}/fork", json={"count": count})
        assert r.status_code == status, r.text
        assert "count" in r.json()["error"]["message"]
    r = api.post("/v1/sandboxes", json={"snapshot": snap["id"], "template": "base"})
    assert r.status_code == 400 and "template" in r.json()["error"]["message"]
    r = api.post("/v1/sandboxes", json={"snapshot": snap["id"], "disk_mb": 4096})
    assert r.status_code == 400 and "disk_mb" in r.json()["error"]["message"]
    assert api.post("/v1/snapshots/snap-000000000000/fork").status_code == 404
    assert api.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "../x"}).status_code == 400
    assert api.get("/v1/sandboxes").json() == before

    # Another tenant sees none of it, and cannot restore into its sandbox from ours.
    name = "snap-t-" + secrets.token_hex(3)
    assert api.post("/v1/tenants", json={"name": name}).status_code == 201
    key = api.post(f"/v1/tenants/{name}/keys", json={"name": "k"}).json()["key"]
    with server.client(key) as other:
        assert other.get(f"/v1/snapshots/{snap['id']}").status_code == 404
        assert other.get("/v1/snapshots").json() == []
        assert other.post(f"/v1/snapshots/{snap['id']}/fork").status_code == 404
        assert other.delete(f"/v1/snapshots/{snap['id']}").status_code == 404
        theirs = other.post("/v1/sandboxes", json={"template": "minimal"}).json()["id"]
        try:
            r = other.post(f"/v1/sandboxes/{theirs}/restore", json={"snapshot": snap["id"]})
            assert r.status_code == 404
            r = other.post("/v1/sandboxes", json={"snapshot": snap["id"]})
            assert r.status_code == 404
        finally:
            other.delete(f"/v1/sandboxes/{theirs}")
    assert api.get(f"/v1/snapshots/{snap['id']}").status_code == 200

    # A killed sandbox cannot be paused, snapshotted or restored; its snapshot stays.
    assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert api.post(f"/v1/sandboxes/{sid}/pause").status_code == 409
    assert api.post(f"/v1/sandboxes/{sid}/snapshots").status_code == 409
    r = api.post(f"/v1/sandboxes/{sid}/restore", json={"snapshot": snap["id"]})
    assert r.status_code == 409
    assert api.get(f"/v1/snapshots/{snap['id']}").status_code == 200
