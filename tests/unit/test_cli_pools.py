"""``corral pool set|ls|rm``: the requests each sends, what each prints, and that failures are one
``error:`` line with the right exit status.

No server: the SDK's requests go to the recorder of tests/unit/test_sdk_pools.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from corral.cli.main import app
from tests.unit.sdk_mock import Recorder, cli_runner, error_response, one_error_line
from tests.unit.test_sdk_pools import POOL, VM_POOL, _sandbox, server

__all__ = ["server"]  # the fixture, imported to be used here


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path, "http://corral.test:7700")


def test_pool_set_sends_the_shape_given_and_prints_a_summary(
    runner: CliRunner, server: Recorder
) -> None:
    res = runner.invoke(app, ["pool", "set", "py", "--template", "minimal", "--size", "20"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "pool py: minimal (container, 0.5 CPU, 512 MB, 2048 MB disk), 0/20 ready\n"
    assert server.routes() == [("PUT", "/v1/pools/py")]
    # Only what was given: the server's create defaults fill in the rest of the shape.
    assert server.bodies() == [{"template": "minimal", "size": 20}]

    args = ["pool", "set", "vm", "--template", "base", "--size", "2", "--isolation", "microvm"]
    args += ["--cpu", "2", "--vcpus", "2", "--memory-mb", "1024", "--disk-mb", "4096", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.stderr
    assert server.bodies()[-1] == {
        "template": "base",
        "size": 2,
        "isolation": "microvm",
        "cpu": 2.0,
        "vcpus": 2,
        "memory_mb": 1024,
        "disk_mb": 4096,
    }
    printed = json.loads(res.stdout)
    assert (printed["name"], printed["isolation"], printed["size"]) == ("vm", "microvm", 2)

    res = runner.invoke(app, ["pool", "set", "py", "--template", "minimal", "--size", "0"])
    assert res.exit_code == 0 and res.stdout.endswith("0/0 ready\n")
    assert server.bodies()[-1] == {"template": "minimal", "size": 0}


def test_pool_ls_table_and_json(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["pool", "ls"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.stderr
    header, first, second = res.stdout.splitlines()
    assert header.split() == ["NAME", "TEMPLATE", "SHAPE", "READY", "CREATED"]
    assert first.split()[:9] == [
        "py",
        "minimal",
        "container,",
        "0.5",
        "CPU,",
        "512",
        "MB,",
        "2048",
        "MB",
    ]
    assert first.split()[10] == "3/20"
    assert second.split()[:3] == ["vm", "minimal", "microvm,"]
    assert second.split()[10] == "0/0"
    assert server.routes() == [("GET", "/v1/pools")]

    res = runner.invoke(app, ["pool", "ls", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [POOL, VM_POOL]

    server.answer = lambda req: httpx.Response(200, json=[])
    res = runner.invoke(app, ["pool", "ls"])
    assert (res.exit_code, res.stdout) == (0, "")
    res = runner.invoke(app, ["pool", "ls", "--json"])
    assert (res.exit_code, json.loads(res.stdout)) == (0, [])


def test_pool_rm_deletes_each_and_reports_the_failures(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["pool", "rm", "py", "vm"])
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")
    assert server.routes() == [("DELETE", "/v1/pools/py"), ("DELETE", "/v1/pools/vm")]

    res = runner.invoke(app, ["pool", "rm", "gone", "py"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: gone: no pool 'gone'"
    assert server.routes()[-1] == ("DELETE", "/v1/pools/py")  # went on after a failure

    res = runner.invoke(app, ["pool", "rm", "gone", "py", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout) == [
        {"id": "gone", "deleted": False, "error": "no pool 'gone'"},
        {"id": "py", "deleted": True},
    ]


@pytest.mark.parametrize(
    ("status", "code", "message", "exit_code"),
    [
        (400, "invalid_request", "unknown template 'nope'", 2),
        (429, "quota_exceeded", "at most 100 pooled sandboxes per tenant", 1),
        (401, "unauthenticated", "unknown API key", 1),
    ],
)
def test_pool_set_failures_are_one_line(
    runner: CliRunner, server: Recorder, status: int, code: str, message: str, exit_code: int
) -> None:
    server.answer = lambda req: error_response(status, code, message)
    res = runner.invoke(app, ["pool", "set", "py", "--template", "nope", "--size", "200"])
    assert res.exit_code == exit_code
    assert one_error_line(res.stderr) == f"error: {message}"
    assert res.stdout == ""


def test_pool_ls_failure_is_one_line(runner: CliRunner, server: Recorder) -> None:
    server.answer = lambda req: error_response(401, "unauthenticated", "unknown API key")
    res = runner.invoke(app, ["pool", "ls"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: unknown API key"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["pool", "set"], "Missing argument"),
        (["pool", "set", "py", "--size", "1"], "--template"),
        (["pool", "set", "py", "--template", "minimal"], "--size"),
        (["pool", "set", "py", "--template", "minimal", "--size", "-1"], "--size"),
        (["pool", "set", "py", "--template", "minimal", "--size", "many"], "--size"),
        (["pool", "set", "py", "--template", "m", "--size", "1", "--isolation", "vm"], "isolation"),
        (["pool", "set", "py", "--template", "m", "--size", "1", "--cpu", "lots"], "--cpu"),
        (["pool", "set", "py", "--template", "m", "--size", "1", "--vcpus", "0"], "--vcpus"),
        (["pool", "rm"], "Missing argument"),
        (["pool", "frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    runner: CliRunner, server: Recorder, args: list[str], needle: str
) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in one_error_line(res.stderr)
    assert server.requests == []  # refused before anything was sent


def test_info_shows_the_pool_a_sandbox_came_from(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["info", "sb-warm"])
    assert res.exit_code == 0, res.stderr
    assert ["pool", "py"] in [line.split() for line in res.stdout.splitlines()]
    server.answer = lambda req: httpx.Response(200, json=_sandbox("sb-1", None))
    res = runner.invoke(app, ["info", "sb-1"])
    assert res.exit_code == 0
    assert not any(line.split()[:1] == ["pool"] for line in res.stdout.splitlines())


def test_every_pool_command_has_json_and_help(runner: CliRunner) -> None:
    for command in ("set", "ls", "rm"):
        res = runner.invoke(app, ["pool", command, "--help"])
        assert res.exit_code == 0 and "--json" in res.stdout, command
    listing = runner.invoke(app, ["pool", "--help"])
    for command in ("set", "ls", "rm"):
        assert command in listing.stdout
    assert "pool" in runner.invoke(app, ["--help"]).stdout
