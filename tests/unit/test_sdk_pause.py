"""Pause, resume and the idle policy on the client side: requests, answers, CLI flags and output.

No server: every request goes to an ``httpx.MockTransport`` that records it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from corral import errors
from corral.cli.main import app
from corral.sdk import _http as sdk_http
from corral.sdk._config import ClientConfig
from corral.sdk._wire import calls
from corral.sdk.async_sandbox import AsyncSandbox
from corral.sdk.models import SandboxInfo
from corral.sdk.sandbox import Sandbox
from tests.unit.sdk_mock import Recorder, cli_runner, error_response, route_sdk_to

URL = "http://corral.test:7700"
CONFIG = ClientConfig(URL, "k-123")

RUNNING: dict[str, Any] = {
    "id": "sb-1",
    "tenant_id": "admin",
    "template": "minimal",
    "state": "running",
    "timeout": 300,
    "created_at": "2026-11-23T13:00:00Z",
    "expires_at": "2026-11-23T13:05:00Z",
    "paused_at": None,
    "on_timeout": "kill",
    "idle_timeout": None,
    "on_idle": "pause",
    "auto_resume": True,
}
PAUSED: dict[str, Any] = {
    **RUNNING,
    "state": "paused",
    "expires_at": None,
    "paused_at": "2026-11-23T13:01:00Z",
    "on_timeout": "pause",
    "idle_timeout": 60,
    "on_idle": "kill",
    "auto_resume": False,
}


def _by_route(req: httpx.Request) -> httpx.Response:
    """Pause answers PAUSED, resume and everything else RUNNING (create with its 201)."""
    if req.url.path.endswith("/pause"):
        return httpx.Response(200, json=PAUSED)
    if req.method == "POST" and req.url.path == "/v1/sandboxes":
        return httpx.Response(201, json=RUNNING)
    return httpx.Response(200, json=RUNNING)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Route every SDK client made from now on (create/connect make their own) to a recorder."""
    return route_sdk_to(monkeypatch, _by_route)


# ---------------------------------------------------------------- request building


def test_pause_and_resume_are_bodiless_posts_on_the_quoted_id() -> None:
    for build, verb in ((calls.pause_sandbox, "pause"), (calls.resume_sandbox, "resume")):
        call = build("sb-1")
        assert (call.method, call.path, call.body, call.params) == (
            "POST",
            f"/v1/sandboxes/sb-1/{verb}",
            None,
            (),
        )
        assert build("../x").path == f"/v1/sandboxes/..%2Fx/{verb}"
        with pytest.raises(errors.InvalidRequestError):
            build("")


def test_create_sends_the_lifecycle_policy_only_when_given() -> None:
    plain = calls.create_sandbox("minimal", None, None, None, 60, None, None)
    assert plain.body == {"template": "minimal", "timeout": 60}

    full = calls.create_sandbox(
        "minimal", None, None, None, 60, None, None,
        on_timeout="pause", idle_timeout=30, on_idle="kill", auto_resume=False,
    )  # fmt: skip
    assert full.body == {
        "template": "minimal",
        "timeout": 60,
        "on_timeout": "pause",
        "idle_timeout": 30,
        "on_idle": "kill",
        "auto_resume": False,
    }
    # auto_resume=True is the server's default: not sent, like every other default.
    on = calls.create_sandbox("m", None, None, None, None, None, None, auto_resume=True)
    assert "auto_resume" not in on.body


# ---------------------------------------------------------------- parsing


def test_paused_sandbox_info_parses_the_new_fields() -> None:
    info = SandboxInfo.from_json(PAUSED)
    assert info.state == "paused" and info.paused
    assert info.expires_at is None
    assert info.paused_at == datetime(2026, 11, 23, 13, 1, tzinfo=UTC)
    assert (info.on_timeout, info.idle_timeout, info.on_idle, info.auto_resume) == (
        "pause",
        60,
        "kill",
        False,
    )


def test_running_sandbox_info_and_an_older_server_get_the_defaults() -> None:
    info = SandboxInfo.from_json(RUNNING)
    assert not info.paused and info.paused_at is None and info.expires_at is not None
    legacy = SandboxInfo.from_json({"id": "sb-1", "state": "running"})
    assert (legacy.on_timeout, legacy.idle_timeout, legacy.on_idle, legacy.auto_resume) == (
        "kill",
        None,
        "pause",
        True,
    )
    assert legacy.paused_at is None


def test_a_malformed_idle_timeout_is_reported_as_malformed() -> None:
    with pytest.raises(errors.CorralError, match="malformed sandbox"):
        SandboxInfo.from_json({**RUNNING, "idle_timeout": "soon"})


# ---------------------------------------------------------------- sync and async clients


def test_sync_pause_and_resume_answer_and_remember_the_new_info() -> None:
    rec = Recorder(_by_route)
    sbx = Sandbox("sb-1", sdk_http.SyncHttp(CONFIG, transport=httpx.MockTransport(rec)))
    paused = sbx.pause()
    assert paused.state == "paused" and paused.expires_at is None
    assert sbx._info is paused
    resumed = sbx.resume()
    assert resumed.state == "running" and resumed.expires_at is not None
    assert rec.routes() == [
        ("POST", "/v1/sandboxes/sb-1/pause"),
        ("POST", "/v1/sandboxes/sb-1/resume"),
    ]
    assert rec.bodies() == [None, None]
    sbx.close()


async def test_async_pause_and_resume_mirror_sync() -> None:
    rec = Recorder(_by_route)
    sbx = AsyncSandbox("sb-1", sdk_http.AsyncHttp(CONFIG, transport=httpx.MockTransport(rec)))
    assert (await sbx.pause()).state == "paused"
    assert (await sbx.resume()).state == "running"
    assert rec.routes() == [
        ("POST", "/v1/sandboxes/sb-1/pause"),
        ("POST", "/v1/sandboxes/sb-1/resume"),
    ]
    await sbx.close()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("conflict", errors.ConflictError),
        ("sandbox_not_running", errors.SandboxNotRunningError),
        ("not_found", errors.NotFoundError),
    ],
)
async def test_pause_errors_keep_their_class(code: str, cls: type[errors.CorralError]) -> None:
    status = 404 if code == "not_found" else 409

    def refuse(req: httpx.Request) -> httpx.Response:
        return error_response(status, code, f"sandbox sb-1: {code}")

    sbx = Sandbox("sb-1", sdk_http.SyncHttp(CONFIG, transport=httpx.MockTransport(refuse)))
    with pytest.raises(cls) as caught:
        sbx.pause()
    # "already paused" must stay distinguishable from "not running" (a subclass of it).
    assert type(caught.value) is cls
    sbx.close()
    asbx = AsyncSandbox("sb-1", sdk_http.AsyncHttp(CONFIG, transport=httpx.MockTransport(refuse)))
    with pytest.raises(cls) as acaught:
        await asbx.resume()
    assert type(acaught.value) is cls
    await asbx.close()


def test_create_passes_the_policy_through(server: Recorder) -> None:
    sbx = Sandbox.create(
        "minimal", timeout=5, on_timeout="pause", idle_timeout=7, on_idle="pause",
        auto_resume=False, api_key="k", base_url=URL,
    )  # fmt: skip
    sbx.close()
    body = server.bodies()[0]
    assert (body["on_timeout"], body["idle_timeout"], body["on_idle"], body["auto_resume"]) == (
        "pause",
        7,
        "pause",
        False,
    )


async def test_async_create_passes_the_policy_through(server: Recorder) -> None:
    sbx = await AsyncSandbox.create(
        "minimal", on_timeout="kill", idle_timeout=9, on_idle="kill", api_key="k", base_url=URL
    )
    await sbx.close()
    body = server.bodies()[0]
    assert (body["on_timeout"], body["idle_timeout"], body["on_idle"]) == ("kill", 9, "kill")
    assert "auto_resume" not in body


# ---------------------------------------------------------------- CLI


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path, URL)


def test_cli_pause_and_resume_print_the_new_state(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["pause", "sb-1"])
    assert (res.exit_code, res.stdout) == (0, "paused\n")
    res = runner.invoke(app, ["resume", "sb-1"])
    assert (res.exit_code, res.stdout) == (0, "running\n")
    res = runner.invoke(app, ["pause", "sb-1", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == PAUSED
    assert ("POST", "/v1/sandboxes/sb-1/pause") in server.routes()
    assert ("POST", "/v1/sandboxes/sb-1/resume") in server.routes()


def test_cli_pause_failure_isone_error_line(runner: CliRunner, server: Recorder) -> None:
    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/pause"):
            return error_response(409, "conflict", "sandbox sb-1 is already paused")
        return httpx.Response(200, json=PAUSED)

    server.answer = answer
    res = runner.invoke(app, ["pause", "sb-1"])
    assert res.exit_code == 1
    assert res.stderr == "error: sandbox sb-1 is already paused\n"


def test_cli_create_flags_become_the_policy(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(
        app,
        ["create", "--template", "minimal", "--on-timeout", "pause", "--idle-timeout", "30",
         "--on-idle", "kill", "--no-auto-resume"],
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "sb-1\n"
    body = server.bodies()[0]
    assert (body["on_timeout"], body["idle_timeout"], body["on_idle"], body["auto_resume"]) == (
        "pause",
        30,
        "kill",
        False,
    )
    res = runner.invoke(app, ["create", "--template", "minimal"])
    assert res.exit_code == 0
    assert not {"on_timeout", "idle_timeout", "on_idle", "auto_resume"} & set(server.bodies()[-1])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["create", "--on-timeout", "sleep"], "--on-timeout"),
        (["create", "--on-idle", "snooze", "--idle-timeout", "5"], "--on-idle"),
        (["create", "--idle-timeout", "0"], "--idle-timeout"),
        (["create", "--idle-timeout", "soon"], "--idle-timeout"),
        (["create", "--on-idle", "kill"], "--on-idle needs --idle-timeout"),
        (["pause"], "Missing argument"),
        (["resume"], "Missing argument"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    runner: CliRunner, server: Recorder, args: list[str], needle: str
) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert server.requests == []  # refused before anything was sent


def test_cli_info_shows_the_pause_and_idle_settings(runner: CliRunner, server: Recorder) -> None:
    server.answer = lambda req: httpx.Response(
        200, json=[PAUSED] if req.url.path == "/v1/sandboxes" else PAUSED
    )
    res = runner.invoke(app, ["info", "sb-1"])
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert "paused" in out and "clock stopped while paused" in out
    assert "kill after 60 s unused" in out
    assert "auto resume" in out and "no" in out
    ls = runner.invoke(app, ["ls"], env={"COLUMNS": "250"})
    assert ls.exit_code == 0
    assert "paused" in ls.stdout
