"""The CLI's parsing and failure reporting: one ``error:`` line, exit 2 for usage, 1 otherwise."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from corral.cli._cp import parse_endpoint
from corral.cli.main import app
from corral.errors import InvalidRequestError
from tests.unit.sdk_mock import one_error_line


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    # No ambient key or server: each test says what it wants.
    monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    monkeypatch.delenv("CORRAL_URL", raising=False)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "no-data-dir"))
    return CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_arguments_prints_help_and_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "exec" in result.output and "template" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["exec"], "Missing argument"),
        (["exec", "sb-1"], "Missing argument"),
        (["exec", "sb-1", "ls", "-la"], "after --"),
        (["create", "--env", "NOEQUALS"], "KEY=VALUE"),
        (["create", "--metadata", "=v"], "KEY=VALUE"),
        (["create", "--cpu", "lots"], "--cpu"),
        (["frobnicate"], "No such command"),
        (["template", "build"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    runner: CliRunner, args: list[str], needle: str
) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in one_error_line(result.stderr)


def test_missing_key_is_explained_and_exits_1(runner: CliRunner) -> None:
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "CORRAL_API_KEY" in line and "admin.key" in line


def test_unreachable_server_names_the_url(runner: CliRunner) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    for args in (["ls"], ["info", "sb-1"], ["exec", "sb-1", "--", "true"], ["kill", "sb-1"]):
        result = runner.invoke(app, ["--url", url, "--api-key", "k", *args])
        assert result.exit_code == 1, (args, result.output)
        assert url in one_error_line(result.stderr)


def test_cp_needs_exactly_one_sandbox_side(runner: CliRunner, tmp_path: Path) -> None:
    for args in (["cp", "a", "b"], ["cp", "sb-1:/a", "sb-2:/b"], ["cp", "a", "sb-1:rel/path"]):
        result = runner.invoke(app, ["--api-key", "k", *args])
        assert result.exit_code == 2, (args, result.output)
        one_error_line(result.stderr)


def test_cp_endpoint_parsing() -> None:
    assert parse_endpoint("sb-1:/root/x").sandbox_id == "sb-1"
    assert parse_endpoint("sb-1:/root/x").path == "/root/x"
    assert parse_endpoint("sb-1:").path == "/"
    # A colon after a slash is part of a local path.
    assert not parse_endpoint("./a:b").remote
    assert not parse_endpoint("/tmp/x:y").remote
    with pytest.raises(InvalidRequestError, match="absolute"):
        parse_endpoint("sb-1:relative")


def test_every_printing_command_has_json(runner: CliRunner) -> None:
    for args in (["create"], ["ls"], ["info"], ["exec"], ["kill"], ["template", "list"],
                 ["template", "build"]):  # fmt: skip
        result = runner.invoke(app, [*args, "--help"])
        assert result.exit_code == 0 and "--json" in result.stdout, args
