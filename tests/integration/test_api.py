"""The HTTP API end to end on real container sandboxes: lifecycle, exec, files, tenancy, bad input."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]


def _events(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.iter_lines() if line]


def run(
    c: httpx.Client, sid: str, cmd: str | list[str], **kw: Any
) -> tuple[str, str, int | None, list[dict[str, Any]]]:
    with c.stream("POST", f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, **kw}) as r:
        if r.status_code != 200:
            r.read()
            raise AssertionError(f"{r.status_code}: {r.text}")
        evs = _events(r)
    out = b"".join(base64.b64decode(e["data"]) for e in evs if e["type"] == "stdout").decode()
    err = b"".join(base64.b64decode(e["data"]) for e in evs if e["type"] == "stderr").decode()
    code = next((e["exit_code"] for e in evs if e["type"] == "exit"), None)
    return out, err, code, evs


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def sandbox(api: httpx.Client, isolation: dict[str, Any]) -> Iterator[str]:
    """A running sandbox of each tier: exec, processes and files must behave the same in both."""
    body: dict[str, Any] = {"template": "minimal", "timeout": 600, **isolation}
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def test_create_exec_kill(api: httpx.Client) -> None:
    r = api.post(
        "/v1/sandboxes",
        json={"template": "minimal", "metadata": {"job": "t1"}, "env": {"GREETING": "hi"}},
    )
    assert r.status_code == 201, r.text
    sb = r.json()
    assert (
        sb["state"] == "running"
        and sb["env_keys"] == ["GREETING"]
        and sb["metadata"] == {"job": "t1"}
    )
    out, _, code, evs = run(
        api, sb["id"], 'id -u; echo $GREETING; hostname; grep -c "$(hostname)" /etc/hosts'
    )
    assert evs[0]["type"] == "start" and code == 0
    assert out.split() == ["0", "hi", sb["id"], "1"]
    listed = api.get("/v1/sandboxes", params={"metadata": "job=t1"}).json()
    assert [s["id"] for s in listed] == [sb["id"]]
    assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204
    assert api.get(f"/v1/sandboxes/{sb['id']}").json()["state"] == "stopped"
    assert api.delete(f"/v1/sandboxes/{sb['id']}").status_code == 204  # idempotent
    r = api.post(f"/v1/sandboxes/{sb['id']}/exec", json={"cmd": "true"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sandbox_not_running"


def test_exec_argv_stdin_env_cwd_exit_code(api: httpx.Client, sandbox: str) -> None:
    out, _, code, _ = run(api, sandbox, ["/bin/echo", "a b", "c"])
    assert (out, code) == ("a b c\n", 0)
    out, _, code, _ = run(api, sandbox, "cat; exit 3", stdin="from stdin")
    assert (out, code) == ("from stdin", 3)
    out, err, _, _ = run(api, sandbox, "pwd; echo $X >&2", cwd="/tmp", env={"X": "y"})
    assert (out, err) == ("/tmp\n", "y\n")
    out, _, _, _ = run(api, sandbox, "id -un", user="nobody")
    assert out.strip() == "nobody"


def test_exec_errors_are_4xx(api: httpx.Client, sandbox: str) -> None:
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": ["/no/such/program"]})
    assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "true", "cwd": "/does/not/exist"})
    assert 400 <= r.status_code < 500, r.text
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "true", "user": "ghost"})
    assert 400 <= r.status_code < 500, r.text
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "true", "shell": True})
    assert r.status_code == 400 and "unknown field" in r.json()["error"]["message"]


def test_exec_timeout_kills_the_command(api: httpx.Client, sandbox: str) -> None:
    t0 = time.monotonic()
    _, _, code, evs = run(api, sandbox, "sleep 30", timeout=0.5)
    assert code is None and evs[-1]["type"] == "error" and evs[-1]["code"] == "timeout"
    assert time.monotonic() - t0 < 10
    out, _, _, _ = run(api, sandbox, "ps -o comm | grep -c '^sleep' || true")
    assert out.strip() == "0"


def test_background_process_list_attach_stdin_kill(api: httpx.Client, sandbox: str) -> None:
    r = api.post(
        f"/v1/sandboxes/{sandbox}/exec",
        json={"cmd": "echo started; read line; echo got $line", "background": True, "tag": "job"},
    )
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    procs = api.get(f"/v1/sandboxes/{sandbox}/processes").json()
    assert any(p["pid"] == pid and p["tag"] == "job" and p["running"] for p in procs)
    data = base64.b64encode(b"hello\n").decode()
    assert (
        api.post(
            f"/v1/sandboxes/{sandbox}/processes/{pid}/stdin", json={"data": data, "eof": True}
        ).status_code
        == 204
    )
    with api.stream("GET", f"/v1/sandboxes/{sandbox}/processes/{pid}/output") as resp:
        evs = _events(resp)
    out = b"".join(base64.b64decode(e["data"]) for e in evs if e["type"] == "stdout").decode()
    assert out == "started\ngot hello\n" and evs[-1] == {"type": "exit", "exit_code": 0}
    r = api.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "sleep 300", "background": True})
    pid2 = r.json()["pid"]
    assert api.delete(f"/v1/sandboxes/{sandbox}/processes/{pid2}").status_code == 204
    with api.stream("GET", f"/v1/sandboxes/{sandbox}/processes/{pid2}/output") as resp:
        assert _events(resp)[-1] == {"type": "exit", "exit_code": 137}
    assert api.get(f"/v1/sandboxes/{sandbox}/processes/999999/output").status_code == 404


def test_files_roundtrip(api: httpx.Client, sandbox: str) -> None:
    base = f"/v1/sandboxes/{sandbox}/files"
    payload = bytes(range(256)) * 4096
    r = api.put(base, params={"path": "/work/deep/data.bin", "mode": 0o600}, content=payload)
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(payload) and r.json()["mode"] == 0o600
    assert api.get(base, params={"path": "/work/deep/data.bin"}).content == payload
    assert api.get(base + "/exists", params={"path": "/work/deep/data.bin"}).json() == {
        "exists": True
    }
    assert api.get(base + "/exists", params={"path": "/nope"}).json() == {"exists": False}
    names = {
        f["path"] for f in api.get(base + "/list", params={"path": "/work", "depth": 2}).json()
    }
    assert {"/work/deep", "/work/deep/data.bin"} <= names
    assert api.post(base + "/mkdir", json={"path": "/work/a/b/c"}).json()["type"] == "dir"
    assert (
        api.post(
            base + "/rename", json={"src": "/work/deep/data.bin", "dst": "/work/a/moved"}
        ).status_code
        == 200
    )
    assert api.get(base + "/stat", params={"path": "/work/deep/data.bin"}).status_code == 404
    assert (
        api.delete(base, params={"path": "/work/a"}).status_code >= 400
    )  # not empty, not recursive
    assert api.delete(base, params={"path": "/work/a", "recursive": True}).status_code == 204
    assert api.get(base, params={"path": "/work/a/moved"}).status_code == 404
    assert api.get(base, params={"path": "relative"}).status_code == 400


def test_files_cannot_leave_the_sandbox_root(api: httpx.Client, sandbox: str) -> None:
    base = f"/v1/sandboxes/{sandbox}/files"
    host_passwd = Path("/etc/passwd").read_bytes()
    r = api.get(base, params={"path": "/../../../../etc/passwd"})
    assert r.status_code == 200 and r.content != host_passwd
    run(api, sandbox, "ln -s / /tmp/root-link; ln -s ../../../../../../etc /tmp/rel-link")
    for p in ("/tmp/root-link/etc/passwd", "/tmp/rel-link/passwd"):
        r = api.get(base, params={"path": p})
        assert r.status_code == 200 and r.content != host_passwd
    # Writes through such links land inside the sandbox, never on the host.
    marker = f"/tmp/corral-escape-{sandbox}"
    api.put(base, params={"path": "/tmp/root-link" + marker}, content=b"x")
    assert not os.path.exists(marker)


def test_tar_upload_download(api: httpx.Client, sandbox: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("a.txt", b"A"), ("sub/b.txt", b"BB")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    r = api.put(
        f"/v1/sandboxes/{sandbox}/files/tar", params={"path": "/up"}, content=buf.getvalue()
    )
    assert r.status_code == 200, r.text
    out, _, _, _ = run(api, sandbox, "cat /up/a.txt /up/sub/b.txt")
    assert out == "ABB"
    r = api.get(f"/v1/sandboxes/{sandbox}/files/tar", params={"path": "/up"})
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        names = {m.name.lstrip("./") for m in tf.getmembers() if m.isfile()}
    assert names == {"a.txt", "sub/b.txt"}
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tf:
        ti = tarfile.TarInfo("../escape.txt")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    r = api.put(
        f"/v1/sandboxes/{sandbox}/files/tar", params={"path": "/up"}, content=evil.getvalue()
    )
    assert r.status_code == 400 and "escape" in r.json()["error"]["message"]
    assert api.get(
        f"/v1/sandboxes/{sandbox}/files/exists", params={"path": "/escape.txt"}
    ).json() == {"exists": False}


def test_tenants_see_only_their_own(api: httpx.Client, server: RunningServer, sandbox: str) -> None:
    name = f"t{int(time.time() * 1000)}"
    assert api.post("/v1/tenants", json={"name": name}).status_code == 201
    key = api.post(f"/v1/tenants/{name}/keys", json={"name": "k"}).json()["key"]
    with server.client(key) as other:
        assert other.get("/v1/me").json() == {"tenant_id": name, "admin": False}
        assert other.get(f"/v1/sandboxes/{sandbox}").status_code == 404
        assert other.delete(f"/v1/sandboxes/{sandbox}").status_code == 404
        assert other.post(f"/v1/sandboxes/{sandbox}/exec", json={"cmd": "true"}).status_code == 404
        assert (
            other.get(f"/v1/sandboxes/{sandbox}/files", params={"path": "/etc/passwd"}).status_code
            == 404
        )
        assert all(s["id"] != sandbox for s in other.get("/v1/sandboxes").json())
        assert other.post("/v1/tenants", json={"name": "x"}).status_code == 403
    with server.client("ck_not_a_key") as bad:
        assert bad.get("/v1/sandboxes").status_code == 401
    assert httpx.get(server.url + "/v1/sandboxes").status_code == 401
    assert api.get(f"/v1/sandboxes/{sandbox}").json()["state"] == "running"


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"template": "nope"}, "unknown template"),
        ({"template": "minimal", "memory_mb": 1}, "memory_mb"),
        ({"template": "minimal", "cpu": -1}, "cpu"),
        ({"template": "minimal", "cpu": 1000}, "cpu"),
        ({"template": "minimal", "disk_mb": 10**9}, "disk_mb"),
        ({"template": "minimal", "timeout": 10**9}, "timeout"),
        ({"template": "minimal", "env": {"BAD NAME": "x"}}, "env"),
        ({"template": "minimal", "metadata": {"k": "v" * 5000}}, "metadata"),
        ({"template": "minimal", "env": {f"K{i}": "v" for i in range(500)}}, "env"),
        ({"template": "minimal", "bogus": 1}, "unknown field"),
    ],
)
def test_bad_create_is_400_and_leaves_nothing(
    api: httpx.Client, body: dict[str, Any], needle: str
) -> None:
    before = {
        s["id"]
        for s in api.get(
            "/v1/sandboxes", params={"state": ["creating", "running", "error", "stopped"]}
        ).json()
    }
    r = api.post("/v1/sandboxes", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    after = {
        s["id"]
        for s in api.get(
            "/v1/sandboxes", params={"state": ["creating", "running", "error", "stopped"]}
        ).json()
    }
    assert after == before


def test_unknown_sandbox_is_404(api: httpx.Client) -> None:
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/timeout"), ("GET", "/processes")):
        kw: dict[str, Any] = {"json": {"timeout": 5}} if path == "/timeout" else {}
        r = api.request(method, f"/v1/sandboxes/sb-000000000000{path}", **kw)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_server_enforces_timeout(api: httpx.Client) -> None:
    sid = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 1}).json()["id"]
    deadline = time.monotonic() + 20
    while (
        time.monotonic() < deadline and api.get(f"/v1/sandboxes/{sid}").json()["state"] != "stopped"
    ):
        time.sleep(0.2)
    sb = api.get(f"/v1/sandboxes/{sid}").json()
    assert sb["state"] == "stopped" and sb["error"] == "timeout reached"


def test_set_timeout_extends_life(api: httpx.Client, sandbox: str) -> None:
    r = api.post(f"/v1/sandboxes/{sandbox}/timeout", json={"timeout": 3600})
    assert r.status_code == 200 and r.json()["timeout"] == 3600


def test_sandbox_whose_init_dies_is_torn_down_and_says_why(
    api: httpx.Client, server: RunningServer
) -> None:
    sid = api.post("/v1/sandboxes", json={"template": "minimal"}).json()["id"]
    # From the host, as the OOM killer or an operator would: the agent (pid 1 inside) dies.
    init_pid = int((server.data_dir / "sandboxes" / sid / "init.pid").read_text())
    os.kill(init_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (
        time.monotonic() < deadline and api.get(f"/v1/sandboxes/{sid}").json()["state"] != "stopped"
    ):
        time.sleep(0.2)
    sb = api.get(f"/v1/sandboxes/{sid}").json()
    assert sb["state"] == "stopped" and "init process exited" in sb["error"]
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
    assert r.status_code == 409


def test_sandbox_processes_are_likelier_oom_victims_than_the_agent(
    api: httpx.Client, sandbox: str
) -> None:
    out, _, _, _ = run(api, sandbox, "cat /proc/self/oom_score_adj /proc/1/oom_score_adj")
    assert out.split() == ["500", "0"]
    if api.get(f"/v1/sandboxes/{sandbox}").json()["runtime"] == "microvm":
        # The guest's root holds every capability of its own kernel, and that kernel never picks
        # its pid 1 (the agent) as an OOM victim anyway.
        return
    # A process may lower its own value, but not below the agent's.
    out, _, _, _ = run(api, sandbox, "echo -1 > /proc/self/oom_score_adj; echo rc=$?")
    assert "rc=0" not in out
