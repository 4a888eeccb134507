"""Dockerfile builds through the HTTP API: multi-stage builds with every supported instruction
give templates whose sandboxes see the files, env, working dir, user and start command; an
unchanged rebuild is all cache, a changed file rebuilds from its COPY on; failing and invalid
builds are clear errors that leave nothing; versions, tags, pinning, deletion and collection."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.integration.server_harness import RunningServer, exec_stdout

pytestmark = [pytest.mark.integration]


def context(files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mode = (modes or {}).get(name, 0o644)
            tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def build(
    c: httpx.Client, name: str, files: dict[str, bytes | str], **params: Any
) -> tuple[int, list[dict[str, Any]]]:
    """POST a build; (status, events) — for a 4xx the one event is the error body."""
    with c.stream(
        "POST",
        f"/v1/templates/{name}/builds",
        content=context(files),
        params=params,
        headers={"content-type": "application/x-tar"},
    ) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        return 200, [json.loads(line) for line in r.iter_lines() if line]


def done(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events[-1]["type"] == "done", events[-1]
    template: dict[str, Any] = events[-1]["template"]
    return template


@pytest.fixture
def api(template_api: httpx.Client) -> httpx.Client:
    return template_api


APP = """\
# syntax=docker/dockerfile:1
ARG GREETING=hello
FROM minimal AS tools
ARG GREETING
RUN echo "$GREETING from a build" > /greeting && mkdir -p /opt/bin
COPY --chmod=755 tool.sh /opt/bin/tool

FROM minimal
ENV APP_MODE=production \\
    APP_HOME=/srv/app
WORKDIR $APP_HOME
COPY conf/ ./conf/
COPY --from=tools /greeting /opt/bin/tool /usr/local/share/
RUN rm /bin/vi && echo "app:x:1234:1234::/srv/app:/bin/sh" >> /etc/passwd && chown -R 1234 /srv/app
USER app
CMD ["sh", "-c", "echo up > /tmp/started; exec sleep 100000"]
HEALTHCHECK --interval=1s CMD test -f /tmp/started
"""
APP_FILES: dict[str, bytes | str] = {
    "Dockerfile": APP,
    "tool.sh": "#!/bin/sh\necho tool ran\n",
    "conf/app.ini": "[app]\nport=8080\n",
    "unused.txt": "not copied",
}


@pytest.mark.usefixtures("server_no_leaks")
def test_a_multi_stage_build_makes_a_template_its_sandboxes_start_from(api: httpx.Client) -> None:
    status, events = build(api, "app", APP_FILES, build_arg="GREETING=hi")
    assert status == 200, events
    t = done(events)
    steps = [e for e in events if e["type"] == "step"]
    assert [s["line"] for s in steps][:3] == [3, 4, 5]
    assert steps[-1]["of"] == len(steps) and all(s.get("cached") is not True for s in steps)
    assert t["name"] == "app" and t["version"] == 1 and t["tags"] == ["latest"]
    assert t["source"] == "dockerfile" and t["workdir"] == "/srv/app" and t["user"] == "app"
    assert t["env"] == {"APP_MODE": "production", "APP_HOME": "/srv/app"}
    assert t["start_cmd"] == ["sh", "-c", "echo up > /tmp/started; exec sleep 100000"]
    assert t["ready_cmd"] == ["/bin/sh", "-c", "test -f /tmp/started"]
    assert len(t["layers"]) >= 3 and t["size_bytes"] > 0

    r = api.post("/v1/sandboxes", json={"template": "app", "env": {"EXTRA": "1"}})
    assert r.status_code == 201, r.text
    sb = r.json()
    assert sb["template"] == "app@1"  # pinned
    sid = sb["id"]
    # The ready check passed before the create answered: the start command already ran.
    assert exec_stdout(api, sid, "cat /tmp/started") == "up\n"
    assert (
        exec_stdout(api, sid, "pwd; id -u; echo $APP_MODE $EXTRA")
        == "/srv/app\n1234\nproduction 1\n"
    )
    assert exec_stdout(api, sid, "cat /usr/local/share/greeting") == "hi from a build\n"
    assert exec_stdout(api, sid, "/usr/local/share/tool") == "tool ran\n"
    assert exec_stdout(api, sid, "cat conf/app.ini") == "[app]\nport=8080\n"
    assert exec_stdout(api, sid, "test ! -e /bin/vi && test ! -e /greeting && echo ok") == "ok\n"
    procs = api.get(f"/v1/sandboxes/{sid}/processes").json()
    assert any(p["tag"] == "start" and p["running"] for p in procs), procs
    # A container that wakes from hibernation starts its template's start command again.
    assert api.post(f"/v1/sandboxes/{sid}/hibernate").status_code == 200
    assert api.post(f"/v1/sandboxes/{sid}/resume").status_code == 200
    procs = api.get(f"/v1/sandboxes/{sid}/processes").json()
    assert any(p["tag"] == "start" and p["running"] for p in procs), procs
    # Explicit user and cwd still win over the template's.
    r = api.post(
        f"/v1/sandboxes/{sid}/exec", json={"cmd": "id -u; pwd", "user": "root", "cwd": "/"}
    )
    assert r.status_code == 200


@pytest.mark.usefixtures("server_no_leaks")
def test_an_unchanged_rebuild_is_all_cache_and_a_changed_file_rebuilds_from_its_copy(
    api: httpx.Client,
) -> None:
    files: dict[str, bytes | str] = {
        "Dockerfile": "FROM minimal\nRUN echo one > /one\nCOPY data.txt /data.txt\nRUN cat /data.txt > /two\n",
        "data.txt": "v1\n",
    }
    status, events = build(api, "cached", files)
    first = done(events)
    status, events = build(api, "cached", files)
    assert status == 200
    assert [e.get("cached") for e in events if e["type"] == "step"] == [None, True, True, True]
    assert done(events)["version"] == first["version"]  # nothing changed: the same version
    status, events = build(api, "cached", {**files, "data.txt": "v2\n"})
    assert [e.get("cached") for e in events if e["type"] == "step"] == [None, True, False, False]
    second = done(events)
    assert second["version"] == first["version"] + 1
    assert second["layers"][:2] == first["layers"][:2]
    status, events = build(api, "cached", files, no_cache="true")
    assert [e.get("cached") for e in events if e["type"] == "step"] == [None, False, False, False]


@pytest.mark.usefixtures("server_no_leaks")
def test_a_failing_run_reports_its_output_and_exit_code_and_leaves_nothing(
    api: httpx.Client, server: RunningServer
) -> None:
    dockerfile = "FROM minimal\nRUN echo fine\nRUN echo broken >&2; exit 3\n"
    status, events = build(api, "broken", {"Dockerfile": dockerfile})
    assert status == 200
    err = events[-1]
    assert err["type"] == "error" and err["code"] == "invalid_request", err
    assert "line 3" in err["message"] and "exit code 3" in err["message"]
    assert "broken" in err["message"]
    assert api.get("/v1/templates/broken").status_code == 404
    assert list((server.data_dir / "builds").iterdir()) == []
    assert not list((server.data_dir / "layers").glob(".new-*"))


@pytest.mark.parametrize(
    ("dockerfile", "expected"),
    [
        ("FROM minimal\nONBUILD RUN true\n", "line 2"),
        ("FROM minimal\nRUN --mount=type=cache,target=/x true\n", "--mount"),
        ("RUN true\n", "line 1"),
        ("FROM debian:12\n", "no corral template of that name"),  # pulled, unreachable here
        ("FROM minimal\nCOPY missing.txt /\n", "missing.txt not found"),
        ("FROM minimal\nCOPY ../escape /\n", "outside the build context"),
    ],
)
@pytest.mark.usefixtures("server_no_leaks")
def test_bad_dockerfiles_are_refused_before_anything_runs(
    api: httpx.Client, dockerfile: str, expected: str
) -> None:
    status, events = build(api, "bad", {"Dockerfile": dockerfile})
    if status == 200:  # COPY sources are checked when the step comes
        assert events[-1]["type"] == "error", events
        message = events[-1]["message"]
    else:
        assert status in (400, 502), events  # 502: a registry nobody reaches from here
        message = events[0]["error"]["message"]
    assert expected in message
    assert api.get("/v1/templates/bad").status_code == 404


@pytest.mark.usefixtures("server_no_leaks")
def test_bad_build_requests_are_clear_4xx(api: httpx.Client) -> None:
    ok = {"Dockerfile": "FROM minimal\n"}
    assert build(api, "minimal", ok)[0] == 400  # a built-in's name
    assert build(api, "Bad Name", ok)[0] == 400
    assert build(api, "x", ok, network="everything")[0] == 400
    assert build(api, "x", ok, dockerfile="nope/Dockerfile")[0] == 400
    r = api.post(
        "/v1/templates/x/builds",
        content=b"not a tar",
        headers={"content-type": "application/x-tar"},
    )
    assert r.status_code == 400, r.text


@pytest.mark.usefixtures("server_no_leaks")
def test_a_ready_check_that_never_passes_fails_the_create_and_leaves_nothing(
    api: httpx.Client,
) -> None:
    dockerfile = 'FROM minimal\nCMD ["sleep", "1000"]\nHEALTHCHECK CMD test -f /never\n'
    _status, events = build(api, "neverready", {"Dockerfile": dockerfile}, ready_timeout=1.5)
    assert done(events)["ready_timeout"] == 1.5
    r = api.post("/v1/sandboxes", json={"template": "neverready"})
    assert r.status_code == 504, r.text
    assert "ready check" in r.json()["error"]["message"]
    assert api.get("/v1/sandboxes").json() == []


@pytest.mark.usefixtures("server_no_leaks")
def test_versions_tags_pinning_deletion_and_collection(
    api: httpx.Client, server: RunningServer
) -> None:
    def version_of(ref: str) -> int:
        r = api.get(f"/v1/templates/{ref}")
        assert r.status_code == 200, r.text
        return int(r.json()["version"])

    for n in (1, 2):
        files = {"Dockerfile": f"FROM minimal\nRUN echo {n} > /v\n"}
        _status, events = build(api, "ver", files, tag=f"v{n}")
        assert done(events)["version"] == n
    assert version_of("ver") == 2 and version_of("ver:v1") == 1 and version_of("ver@1") == 1
    assert [v["version"] for v in api.get("/v1/templates/ver/versions").json()] == [1, 2]
    r = api.put("/v1/templates/ver/tags/stable", json={"version": 1})
    assert r.status_code == 200 and "stable" in r.json()["tags"]
    assert version_of("ver:stable") == 1
    sid = api.post("/v1/sandboxes", json={"template": "ver:stable"}).json()["id"]
    assert exec_stdout(api, sid, "cat /v") == "1\n"

    # Version 1 is deleted while a sandbox runs on it: the sandbox keeps its layers.
    assert api.delete("/v1/templates/ver@1").status_code == 204
    assert api.get("/v1/templates/ver@1").status_code == 404
    assert api.get("/v1/templates/ver:stable").status_code == 404
    assert api.post("/v1/sandboxes", json={"template": "ver@1"}).status_code == 400
    assert exec_stdout(api, sid, "cat /v") == "1\n"
    r = api.post(f"/v1/sandboxes/{sid}/hibernate")
    assert r.status_code == 200, r.text
    assert exec_stdout(api, sid, "cat /v") == "1\n"  # woken on the same layers
    layers = server.data_dir / "layers"
    before = {p.name for p in layers.iterdir() if not p.name.startswith(".")}
    assert api.post("/v1/templates/gc").json()["layers_removed"] == 0
    api.delete(f"/v1/sandboxes/{sid}")
    gc = api.post("/v1/templates/gc").json()
    assert gc["layers_removed"] >= 1 and gc["bytes_freed"] > 0
    after = {p.name for p in layers.iterdir() if not p.name.startswith(".")}
    assert after < before
    assert version_of("ver") == 2

    assert api.put("/v1/templates/ver/tags/x", json={"version": 9}).status_code == 404
    assert api.delete("/v1/templates/ver/tags/nope").status_code == 404
    assert api.delete("/v1/templates/base").status_code == 400
    assert api.delete("/v1/templates/ver").status_code == 204
    assert api.get("/v1/templates/ver").status_code == 404
    assert all(t["name"] != "ver" for t in api.get("/v1/templates").json())


@pytest.mark.usefixtures("server_no_leaks")
def test_templates_belong_to_their_tenant(api: httpx.Client, server: RunningServer) -> None:
    _status, events = build(api, "private", {"Dockerfile": "FROM minimal\nENV SECRET=1\n"})
    done(events)
    name = f"tpl{time.time_ns()}"
    assert api.post("/v1/tenants", json={"name": name}).status_code == 201
    key = api.post(f"/v1/tenants/{name}/keys", json={"name": "k"}).json()["key"]
    with server.client(key) as other:
        assert other.get("/v1/templates/private").status_code == 404
        assert all(t["name"] != "private" for t in other.get("/v1/templates").json())
        assert other.post("/v1/sandboxes", json={"template": "private"}).status_code == 400
        assert build(other, "private", {"Dockerfile": "FROM minimal\n"})[0] == 409
        assert other.delete("/v1/templates/private").status_code == 404


def test_build_sandboxes_are_isolated_like_any_sandbox(api: httpx.Client) -> None:
    probe = (
        "FROM minimal\n"
        # The host's data dir is not there; with network "none", no interface but loopback.
        "RUN test ! -e /var/lib/corral && test ! -e /sys/class/net/eth0 && "
        'test "$(id -u)" = 0 && ! nslookup example.com >/dev/null 2>&1 || (echo LEAK; exit 1)\n'
    )
    _status, events = build(api, "probe", {"Dockerfile": probe}, network="none")
    assert events[-1]["type"] == "done", events[-1]


@pytest.mark.usefixtures("server_no_leaks")
def test_a_pool_of_a_template_follows_its_latest_version(api: httpx.Client) -> None:
    def build_version(n: int) -> None:
        _status, events = build(api, "pooled", {"Dockerfile": f"FROM minimal\nRUN echo {n} > /v\n"})
        assert done(events)["version"] == n

    def waiting() -> bool:
        return bool(api.get("/v1/pools/tpl").json()["ready"] == 1)

    build_version(1)
    r = api.put("/v1/pools/tpl", json={"template": "pooled", "size": 1, "memory_mb": 128})
    assert r.status_code == 200, r.text
    assert r.json()["template"] == "pooled"
    _wait(waiting)
    sb = api.post("/v1/sandboxes", json={"template": "pooled", "memory_mb": 128}).json()
    assert sb["pool"] == "tpl" and sb["template"] == "pooled@1"
    assert exec_stdout(api, sb["id"], "cat /v") == "1\n"
    _wait(waiting)
    build_version(2)
    # What waits is of version 1: a create of "pooled" must not get it.
    sb = api.post("/v1/sandboxes", json={"template": "pooled", "memory_mb": 128}).json()
    assert sb["template"] == "pooled@2"
    assert exec_stdout(api, sb["id"], "cat /v") == "2\n"
    _wait(waiting)
    sb = api.post("/v1/sandboxes", json={"template": "pooled", "memory_mb": 128}).json()
    assert sb["pool"] == "tpl" and sb["template"] == "pooled@2"
    assert api.delete("/v1/pools/tpl").status_code == 204


def _wait(cond: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.usefixtures("server_no_leaks")
def test_a_built_template_runs_in_a_microvm_too(vm_api: httpx.Client) -> None:
    dockerfile = "FROM minimal\nRUN echo layered > /layered && rm /bin/vi\nCOPY note.txt /srv/\n"
    status, events = build(vm_api, "vmtpl", {"Dockerfile": dockerfile, "note.txt": "note\n"})
    assert status == 200 and done(events)
    r = vm_api.post("/v1/sandboxes", json={"template": "vmtpl", "isolation": "microvm"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        out = exec_stdout(vm_api, sid, "cat /layered /srv/note.txt; test ! -e /bin/vi && echo gone")
        assert out == "layered\nnote\ngone\n"
    finally:
        vm_api.delete(f"/v1/sandboxes/{sid}")
        vm_api.delete("/v1/templates/vmtpl")


@pytest.mark.usefixtures("server_no_leaks")
def test_a_client_that_hangs_up_cancels_its_build_and_nothing_is_left(
    api: httpx.Client, server: RunningServer
) -> None:
    dockerfile = "FROM minimal\nRUN echo started; sleep 60\n"
    with api.stream(
        "POST",
        "/v1/templates/hangup/builds",
        content=context({"Dockerfile": dockerfile}),
        headers={"content-type": "application/x-tar"},
    ) as r:
        for line in r.iter_lines():
            if line and json.loads(line).get("data") == "started\n":
                break  # the RUN is running in its sandbox: hang up now
    _wait(lambda: not any((server.data_dir / "builds").iterdir()), timeout=30)
    _wait(lambda: not list((server.data_dir / "sandboxes").glob("build-*")), timeout=30)
    assert api.get("/v1/templates/hangup").status_code == 404
