"""``corral token`` and ``corral token-introspect`` (and the SDK calls under them): the requests
each sends, what each prints, exit 1 for an inactive token, and that failures are one ``error:``
line with the right exit status.

No server: the SDK's requests go to an in-process recorder (tests/unit/sdk_mock.py).
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
from corral.sdk import IdentityToken
from corral.sdk.async_sandbox import AsyncSandbox
from corral.sdk.sandbox import Sandbox
from tests.unit.sdk_mock import Recorder, cli_runner, error_response, one_error_line, route_sdk_to

URL = "http://corral.test:7700"
AUD = "https://api.example.com"
# Shaped like a JWT; nothing here verifies it (the integration tests do).
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJzYi0xIn0.c2lnbmF0dXJl"
EXPIRES = "2026-12-06T13:15:00Z"
CLAIMS: dict[str, Any] = {
    "active": True,
    "iss": URL,
    "sub": "sb-1",
    "aud": AUD,
    "tenant": "admin",
    "template": "minimal@1",
    "labels": {"task": "T-42"},
    "scopes": [],
    "iat": 1796562000,
    "nbf": 1796562000,
    "exp": 1796562900,
    "jti": "j-1",
    "scope": "",
    "token_type": "Bearer",
}


def _sandbox(sandbox_id: str, state: str = "running") -> dict[str, Any]:
    return {"id": sandbox_id, "state": state, "template": "minimal", "tenant_id": "admin"}


def _by_route(req: httpx.Request) -> httpx.Response:
    """What the server of docs/identity.md answers (and a GET of the sandbox, for connect)."""
    path, method = req.url.path, req.method
    body: dict[str, Any] = json.loads(req.content) if req.content else {}
    if method == "GET" and path.startswith("/v1/sandboxes/"):
        sid = path.rsplit("/", 1)[-1]
        if sid == "sb-gone":
            return error_response(404, "not_found", "no sandbox sb-gone")
        return httpx.Response(200, json=_sandbox(sid, "stopped" if sid == "sb-dead" else "running"))
    if method == "POST" and path == "/v1/sandboxes/sb-dead/token":
        return error_response(
            409,
            "sandbox_not_running",
            "sandbox sb-dead is stopped: identity tokens are only issued to live sandboxes",
        )
    if method == "POST" and path.endswith("/token"):
        audience = body.get("audience")
        if not isinstance(audience, str) or "*" in audience:
            return error_response(
                400,
                "invalid_request",
                f"audience {audience!r}: wildcards are not allowed; name one service",
            )
        if not 1 <= body.get("ttl", 900) <= 3600:
            return error_response(
                400,
                "invalid_request",
                f"ttl must be a whole number of 1 to 3600 seconds, got {body['ttl']}",
            )
        return httpx.Response(
            200, json={"token": JWT, "expires_at": EXPIRES}, headers={"Cache-Control": "no-store"}
        )
    if method == "POST" and path == "/v1/identity/introspect":
        if body.get("token") == JWT and body.get("audience") in (None, AUD):
            return httpx.Response(200, json=CLAIMS)
        return httpx.Response(200, json={"active": False})
    return error_response(404, "not_found", f"no route {method} {path}")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return route_sdk_to(monkeypatch, _by_route)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path, URL)


# ---------------------------------------------------------------- SDK


def test_sdk_mint_sends_audience_and_ttl_and_parses_the_answer(server: Recorder) -> None:
    sbx = Sandbox.connect("sb-1", api_key="k", base_url=URL)
    try:
        got = sbx.identity_token(AUD, ttl=600)
        sbx.identity_token(AUD)
    finally:
        sbx.close()
    assert got == IdentityToken(JWT, datetime(2026, 12, 6, 13, 15, tzinfo=UTC))
    assert JWT not in repr(got)  # a bearer credential stays out of logs
    assert server.routes()[1:] == [("POST", "/v1/sandboxes/sb-1/token")] * 2
    # No ttl: none sent, so the server's default applies.
    assert server.bodies()[1:] == [{"audience": AUD, "ttl": 600}, {"audience": AUD}]


async def test_async_sdk_mint_and_introspect(server: Recorder) -> None:
    sbx = await AsyncSandbox.connect("sb-1", api_key="k", base_url=URL)
    try:
        got = await sbx.identity_token(AUD, ttl=60)
    finally:
        await sbx.close()
    assert got.token == JWT and got.expires_at == datetime(2026, 12, 6, 13, 15, tzinfo=UTC)
    assert await AsyncSandbox.introspect_token(JWT, api_key="k", base_url=URL) == CLAIMS
    answer = await AsyncSandbox.introspect_token(JWT, audience="other", api_key="k", base_url=URL)
    assert answer == {"active": False}
    assert server.bodies()[-1] == {"token": JWT, "audience": "other"}


def test_sdk_errors_are_typed(server: Recorder) -> None:
    sbx = Sandbox.connect("sb-1", api_key="k", base_url=URL)
    dead = Sandbox.connect("sb-dead", api_key="k", base_url=URL)
    try:
        with pytest.raises(errors.InvalidRequestError, match="wildcards"):
            sbx.identity_token("*")
        with pytest.raises(errors.InvalidRequestError, match="3600"):
            sbx.identity_token(AUD, ttl=7200)
        with pytest.raises(errors.SandboxNotRunningError):
            dead.identity_token(AUD)
        server.answer = lambda req: httpx.Response(200, json={"token": JWT})
        with pytest.raises(errors.CorralError, match="malformed identity token"):
            sbx.identity_token(AUD)
        server.answer = lambda req: httpx.Response(200, json={"sub": "sb-1"})
        with pytest.raises(errors.CorralError, match="malformed introspection"):
            Sandbox.introspect_token(JWT, api_key="k", base_url=URL)
    finally:
        sbx.close()
        dead.close()


# ---------------------------------------------------------------- CLI


def test_token_prints_the_jwt_alone(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["token", "sb-1", "--audience", AUD])
    assert (res.exit_code, res.stdout, res.stderr) == (0, f"{JWT}\n", "")
    assert server.routes() == [("GET", "/v1/sandboxes/sb-1"), ("POST", "/v1/sandboxes/sb-1/token")]
    assert server.bodies()[-1] == {"audience": AUD}


def test_token_json_has_the_token_and_its_expiry(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["token", "sb-1", "--audience", AUD, "--ttl", "300", "--json"])
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["token"] == JWT
    assert datetime.fromisoformat(out["expires_at"]) == datetime(2026, 12, 6, 13, 15, tzinfo=UTC)
    assert server.bodies()[-1] == {"audience": AUD, "ttl": 300}


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["token", "sb-1"], 2, "--audience"),
        (["token", "--audience", AUD], 2, "Missing argument"),
        (["token", "sb-1", "--audience", AUD, "--ttl", "soon"], 2, "--ttl"),
        (["token", "sb-1", "--audience", "*"], 2, "wildcards"),
        (["token", "sb-1", "--audience", AUD, "--ttl", "7200"], 2, "3600"),
        (["token", "sb-gone", "--audience", AUD], 1, "no sandbox sb-gone"),
        (["token", "sb-dead", "--audience", AUD], 1, "only issued to live sandboxes"),
        (["token-introspect"], 2, "Missing argument"),
        (["token-introspect", "  "], 2, "no token given"),
    ],
)
def test_bad_input_isone_error_line(
    runner: CliRunner, server: Recorder, args: list[str], status: int, needle: str
) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == status, (res.stdout, res.stderr)
    assert needle in one_error_line(res.stderr)
    assert res.stdout == ""


def test_introspect_prints_the_answer_and_exits_by_activity(
    runner: CliRunner, server: Recorder
) -> None:
    res = runner.invoke(app, ["token-introspect", JWT])
    assert (res.exit_code, res.stderr) == (0, ""), res.stderr
    assert json.loads(res.stdout) == CLAIMS
    assert server.routes() == [("POST", "/v1/identity/introspect")]
    assert server.bodies() == [{"token": JWT}]

    res = runner.invoke(app, ["token-introspect", JWT, "--audience", "https://other.example"])
    assert (res.exit_code, json.loads(res.stdout), res.stderr) == (1, {"active": False}, "")
    assert server.bodies()[-1] == {"token": JWT, "audience": "https://other.example"}

    res = runner.invoke(app, ["token-introspect", "not-a-jwt"])
    assert (res.exit_code, json.loads(res.stdout)) == (1, {"active": False})


def test_introspect_reads_the_token_from_stdin(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["token-introspect", "-", "--audience", AUD], input=f"{JWT}\n")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["sub"] == "sb-1"
    assert server.bodies() == [{"token": JWT, "audience": AUD}]


def test_introspect_of_an_unauthenticated_caller_is_one_line(
    runner: CliRunner, server: Recorder
) -> None:
    server.answer = lambda req: error_response(401, "unauthenticated", "invalid API key")
    res = runner.invoke(app, ["token-introspect", JWT])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: invalid API key"
