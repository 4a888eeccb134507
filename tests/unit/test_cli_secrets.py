"""``corral secret set|ls|get|rm``, ``corral create --secret/--secrets-file`` and the SDK calls under them (``corral.secrets``, ``AsyncSecrets``, ``Sandbox.create(secrets=)``): the requests each sends, that no output ever shows a value, and that bad syntax is one ``error:`` line with exit 2.

No server: the SDK's requests go to an in-process recorder (tests/unit/sdk_mock.py).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from corral import AsyncSecrets, SecretBinding, SecretInfo, errors, secrets
from corral.cli import main as cli
from corral.cli.main import app
from corral.sdk import SandboxInfo
from corral.sdk._wire import calls
from corral.sdk.async_sandbox import AsyncSandbox
from corral.sdk.sandbox import Sandbox
from tests.unit.sdk_mock import Recorder, cli_runner, error_response, one_error_line, route_sdk_to

URL = "http://corral.test:7700"
VALUE = "sk-unit-3c1d9e77-never-shown"
CREATED = "2026-11-23T13:00:00Z"
UPDATED = "2026-11-24T09:30:00Z"
_RULE = "secret name {!r} is invalid: 1 to 64 characters of letters, digits, '.', '_' and '-'"


def _secret(name: str) -> dict[str, Any]:
    return {"name": name, "created_at": CREATED, "updated_at": UPDATED}


def _by_route(req: httpx.Request) -> httpx.Response:
    """What the server of docs/API.md (Secrets) answers, with ``openai`` and ``gh`` set."""
    path, method = req.url.path, req.method
    body: dict[str, Any] = json.loads(req.content) if req.content else {}
    known = {"gh", "openai"}
    if path == "/v1/secrets" and method == "GET":
        return httpx.Response(200, json={"secrets": [_secret(n) for n in sorted(known)]})
    if path.startswith("/v1/secrets/"):
        name = path.removeprefix("/v1/secrets/")
        if name.startswith("-"):
            return error_response(400, "invalid_request", _RULE.format(name))
        if method == "PUT":
            return httpx.Response(200, json=_secret(name))
        if name not in known:
            return error_response(404, "not_found", f"no secret named {name!r}")
        if method == "GET":
            return httpx.Response(200, json=_secret(name))
        if method == "DELETE":
            return httpx.Response(204)
    if path == "/v1/sandboxes" and method == "POST":
        shown = [
            {
                "name": b["name"],
                "hosts": b["hosts"],
                "env": b.get("env") or b["name"].upper(),
                "header": b.get("header"),
                "placeholder": "corral-secret-placeholder-1",
            }
            for b in body.get("secrets", [])
        ]
        sandbox = {"id": "sb-1", "state": "running", "template": "minimal", "secrets": shown}
        return httpx.Response(201, json=sandbox)
    if path == "/v1/sandboxes/sb-1" and method == "GET":
        return httpx.Response(200, json={"id": "sb-1", "state": "running"})
    return error_response(404, "not_found", f"no route {method} {path}")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return route_sdk_to(monkeypatch, _by_route)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path, URL)


# ---------------------------------------------------------------- SDK: corral.secrets


def test_sdk_calls_send_the_routes_of_the_api(server: Recorder) -> None:
    conn = {"api_key": "k", "base_url": URL}
    made = secrets.set("openai", VALUE, **conn)
    assert isinstance(made, SecretInfo) and made.name == "openai"
    assert made.created_at.isoformat() == "2026-11-23T13:00:00+00:00"
    assert [s.name for s in secrets.list(**conn)] == ["gh", "openai"]
    assert secrets.get("gh", **conn).updated_at.isoformat() == "2026-11-24T09:30:00+00:00"
    secrets.delete("gh", **conn)
    assert server.routes() == [
        ("PUT", "/v1/secrets/openai"),
        ("GET", "/v1/secrets"),
        ("GET", "/v1/secrets/gh"),
        ("DELETE", "/v1/secrets/gh"),
    ]
    assert server.bodies()[0] == {"value": VALUE}
    assert all(r.headers["authorization"] == "Bearer k" for r in server.requests)


def test_sdk_takes_the_connection_from_the_environment(
    server: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_API_KEY", "env-key")
    monkeypatch.setenv("CORRAL_URL", URL)
    secrets.list()
    assert server.requests[-1].headers["authorization"] == "Bearer env-key"
    assert str(server.requests[-1].url) == f"{URL}/v1/secrets"


async def test_async_secrets(server: Recorder) -> None:
    conn = {"api_key": "k", "base_url": URL}
    assert (await AsyncSecrets.set("openai", VALUE, **conn)).name == "openai"
    assert [s.name for s in await AsyncSecrets.list(**conn)] == ["gh", "openai"]
    assert (await AsyncSecrets.get("openai", **conn)).name == "openai"
    await AsyncSecrets.delete("openai", **conn)
    with pytest.raises(errors.NotFoundError, match="no secret named 'nope'"):
        await AsyncSecrets.get("nope", **conn)
    assert server.routes()[:4] == [
        ("PUT", "/v1/secrets/openai"),
        ("GET", "/v1/secrets"),
        ("GET", "/v1/secrets/openai"),
        ("DELETE", "/v1/secrets/openai"),
    ]


def test_sdk_errors_are_typed_and_answers_checked(server: Recorder) -> None:
    conn = {"api_key": "k", "base_url": URL}
    with pytest.raises(errors.InvalidRequestError, match="1 to 64 characters"):
        secrets.set("-bad", VALUE, **conn)
    with pytest.raises(errors.NotFoundError, match="'nope'"):
        secrets.delete("nope", **conn)
    server.answer = lambda req: httpx.Response(200, json=[_secret("a")])
    with pytest.raises(errors.CorralError, match="malformed secret list"):
        secrets.list(**conn)
    server.answer = lambda req: httpx.Response(200, json={"name": "a"})
    with pytest.raises(errors.CorralError, match="malformed secret"):
        secrets.get("a", **conn)


def test_names_are_quoted_into_the_path() -> None:
    assert calls.get_secret("a/../b").path == "/v1/secrets/a%2F..%2Fb"
    assert calls.delete_secret("..").path == "/v1/secrets/%2E%2E"


def test_a_put_call_keeps_the_value_out_of_its_repr() -> None:
    call = calls.put_secret("openai", VALUE)
    assert call.body == {"value": VALUE}
    assert VALUE not in repr(call)


# ---------------------------------------------------------------- SDK: create(secrets=)


def test_create_sends_bindings_as_given(server: Recorder) -> None:
    bindings: list[Any] = [
        SecretBinding(
            "openai", ["api.openai.com"], header="Authorization", format="Bearer {value}"
        ),
        SecretBinding("gh", "api.github.com", env="GH_TOKEN"),
        {"name": "raw", "hosts": ["*.example.com"], "env": "RAW"},
    ]
    sbx = Sandbox.create("minimal", secrets=bindings, api_key="k", base_url=URL)
    sbx.close()
    assert server.bodies()[0]["secrets"] == [
        {
            "name": "openai",
            "hosts": ["api.openai.com"],
            "header": "Authorization",
            "format": "Bearer {value}",
        },
        {"name": "gh", "hosts": ["api.github.com"], "env": "GH_TOKEN"},
        {"name": "raw", "hosts": ["*.example.com"], "env": "RAW"},
    ]
    info = sbx._info
    assert info is not None
    assert [b["env"] for b in info.secrets] == ["OPENAI", "GH_TOKEN", "RAW"]
    assert info.secrets[0]["placeholder"] == "corral-secret-placeholder-1"


async def test_async_create_sends_bindings_and_none_leaves_them_out(server: Recorder) -> None:
    sbx = await AsyncSandbox.create(
        "minimal", secrets=[SecretBinding("gh", ["api.github.com"])], api_key="k", base_url=URL
    )
    await sbx.close()
    plain = await AsyncSandbox.create("minimal", api_key="k", base_url=URL)
    await plain.close()
    empty = await AsyncSandbox.create("minimal", secrets=[], api_key="k", base_url=URL)
    await empty.close()
    first, second, third = server.bodies()
    assert first["secrets"] == [{"name": "gh", "hosts": ["api.github.com"]}]
    assert "secrets" not in second and "secrets" not in third


def test_create_refuses_what_is_not_a_binding(server: Recorder) -> None:
    with pytest.raises(errors.InvalidRequestError, match=r"secrets\[1\]: a binding is"):
        Sandbox.create(
            "minimal",
            secrets=[{"name": "a", "hosts": ["h"]}, "openai"],  # type: ignore[list-item]
            api_key="k",
            base_url=URL,
        )
    assert server.requests == []


def test_sandbox_info_secrets_default_to_empty() -> None:
    assert SandboxInfo.from_json({"id": "sb-1", "state": "running"}).secrets == []
    shown = {"name": "a", "hosts": ["h"], "env": "A", "header": None, "placeholder": "p"}
    got = SandboxInfo.from_json({"id": "sb-1", "state": "running", "secrets": [shown, 7]})
    assert got.secrets == [shown]


# ---------------------------------------------------------------- CLI: corral secret


def test_secret_set_with_the_value_as_argument(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["secret", "set", "openai", VALUE])
    assert (res.exit_code, res.stdout, res.stderr) == (0, "secret openai set\n", "")
    assert server.bodies() == [{"value": VALUE}]


@pytest.mark.parametrize(
    ("stdin", "sent"),
    [
        (VALUE + "\n", VALUE),
        (VALUE + "\r\n", VALUE),
        (VALUE, VALUE),
        (VALUE + "\n\n", VALUE + "\n"),
    ],
)
def test_secret_set_reads_stdin_dropping_one_newline(
    runner: CliRunner, server: Recorder, stdin: str, sent: str
) -> None:
    res = runner.invoke(app, ["secret", "set", "openai", "--json"], input=stdin)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {
        "name": "openai",
        "created_at": "2026-11-23T13:00:00+00:00",
        "updated_at": "2026-11-24T09:30:00+00:00",
    }
    assert server.bodies() == [{"value": sent}]
    assert VALUE not in res.stdout + res.stderr


def test_secret_set_with_nothing_on_stdin_is_refused(runner: CliRunner, server: Recorder) -> None:
    for stdin in ("", "\n"):
        res = runner.invoke(app, ["secret", "set", "openai"], input=stdin)
        assert res.exit_code == 2
        assert "no value for secret openai" in one_error_line(res.stderr)
    assert server.requests == []


def test_secret_set_prompts_hidden_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    asked: dict[str, Any] = {}

    def prompt(text: str, **kwargs: Any) -> str:
        asked.update(kwargs, text=text)
        return VALUE

    monkeypatch.setattr(cli.sys, "stdin", Tty("not read"))
    monkeypatch.setattr(cli.typer, "prompt", prompt)
    assert cli._read_secret_value("openai") == VALUE
    assert asked["hide_input"] is True and asked["err"] is True
    assert "openai" in asked["text"]


def test_secret_ls_get_rm(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["secret", "ls"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.stderr
    header, first, second = res.stdout.splitlines()
    assert header.split() == ["NAME", "CREATED", "UPDATED"]
    assert (first.split()[0], second.split()[0]) == ("gh", "openai")

    res = runner.invoke(app, ["secret", "ls", "--json"])
    assert [s["name"] for s in json.loads(res.stdout)] == ["gh", "openai"]
    assert set(json.loads(res.stdout)[0]) == {"name", "created_at", "updated_at"}

    res = runner.invoke(app, ["secret", "get", "openai"])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "name: openai" and lines[1].startswith("created: 2026-11-2")
    res = runner.invoke(app, ["secret", "get", "openai", "--json"])
    assert json.loads(res.stdout)["name"] == "openai"

    res = runner.invoke(app, ["secret", "rm", "gh", "nope", "openai"])
    assert res.exit_code == 1
    assert "nope: no secret named 'nope'" in one_error_line(res.stderr)
    deletes = [p for m, p in server.routes() if m == "DELETE"]
    assert deletes == ["/v1/secrets/gh", "/v1/secrets/nope", "/v1/secrets/openai"]


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["secret", "set", "-bad", "v"], 2, "No such option"),
        (["secret", "set", "--", "-bad", "v"], 2, "1 to 64 characters"),
        (["secret", "get", "nope"], 1, "no secret named 'nope'"),
        (["secret", "get"], 2, "Missing argument"),
        (["secret", "rm"], 2, "Missing argument"),
    ],
)
def test_secret_errors_are_one_line(
    runner: CliRunner, server: Recorder, args: list[str], status: int, needle: str
) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == status
    assert needle in one_error_line(res.stderr)


# ---------------------------------------------------------------- CLI: create --secret


@pytest.mark.parametrize(
    ("flag", "binding"),
    [
        ("openai:api.openai.com", {"name": "openai", "hosts": ["api.openai.com"]}),
        (
            "gh:api.github.com,uploads.github.com:GH_TOKEN",
            {"name": "gh", "hosts": ["api.github.com", "uploads.github.com"], "env": "GH_TOKEN"},
        ),
        ("w:*.example.com", {"name": "w", "hosts": ["*.example.com"]}),
        (" a : h1 , h2 : E ", {"name": "a", "hosts": ["h1", "h2"], "env": "E"}),
    ],
)
def test_secret_flag_syntax(flag: str, binding: dict[str, Any]) -> None:
    assert cli.parse_secret_flag(flag) == binding


@pytest.mark.parametrize(
    "flag", ["openai", "openai:", ":host", "a:h:E:x", "a:h1,,h2", "a:h:", "a:,", "", "::"]
)
def test_bad_secret_flags_are_exit_2(runner: CliRunner, server: Recorder, flag: str) -> None:
    res = runner.invoke(app, ["create", "--secret", flag])
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert f"--secret {flag!r}: expected NAME:HOST[,HOST...][:ENV]" in line
    assert server.requests == []


def test_create_sends_flags_and_file_bindings(
    runner: CliRunner, server: Recorder, tmp_path: Path
) -> None:
    file_bindings = [
        {
            "name": "openai",
            "hosts": ["api.openai.com"],
            "header": "Authorization",
            "format": "Bearer {value}",
        }
    ]
    path = tmp_path / "bindings.json"
    path.write_text(json.dumps(file_bindings))
    args = ["create", "--template", "minimal", "--secrets-file", str(path)]
    args += ["--secret", "gh:api.github.com:GH_TOKEN", "--secret", "x:h.example"]
    res = runner.invoke(app, args)
    assert (res.exit_code, res.stdout) == (0, "sb-1\n"), res.stderr
    assert server.bodies()[0]["secrets"] == [
        *file_bindings,
        {"name": "gh", "hosts": ["api.github.com"], "env": "GH_TOKEN"},
        {"name": "x", "hosts": ["h.example"]},
    ]

    res = runner.invoke(app, ["create", "--secrets-file", "-"], input=json.dumps(file_bindings))
    assert res.exit_code == 0, res.stderr
    assert server.bodies()[-1]["secrets"] == file_bindings

    res = runner.invoke(app, ["create"])
    assert "secrets" not in server.bodies()[-1]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("not json", "is not JSON"),
        ('{"name": "a", "hosts": ["h"]}', "expected a JSON list of bindings"),
        ('["a"]', "expected a JSON list of bindings"),
    ],
)
def test_bad_secrets_files_are_exit_2(
    runner: CliRunner, server: Recorder, tmp_path: Path, content: str, needle: str
) -> None:
    path = tmp_path / "b.json"
    path.write_text(content)
    res = runner.invoke(app, ["create", "--secrets-file", str(path)])
    assert res.exit_code == 2
    assert needle in one_error_line(res.stderr)
    missing = runner.invoke(app, ["create", "--secrets-file", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "cannot read" in one_error_line(missing.stderr)
    assert server.requests == []
