"""``corral snapshot|snapshots|snapshot-rm|restore|fork`` and ``create --snapshot``: the requests
each sends, what each prints, and that failures are one ``error:`` line with the right status.

No server: the SDK's requests go to the recorder of tests/unit/test_sdk_snapshots.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from corral.cli.main import app
from tests.unit.sdk_mock import Recorder, cli_runner, error_response, one_error_line
from tests.unit.test_sdk_snapshots import OLDER, SNAP, _by_route, server

__all__ = ["server"]  # the fixture, imported to be used here

SID = SNAP["id"]


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path, "http://corral.test:7700")


def test_snapshot_prints_the_id_or_the_object(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["snapshot", "sb-1", "--name", "before-upgrade"])
    assert (res.exit_code, res.stdout) == (0, f"{SID}\n"), res.stderr
    res = runner.invoke(app, ["snapshot", "sb-1", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == SNAP
    posts = [(r.url.path, b) for r, b in zip(server.requests, server.bodies(), strict=True)]
    assert [b for p, b in posts if p == "/v1/sandboxes/sb-1/snapshots"] == [
        {"name": "before-upgrade"},
        {"name": None},
    ]


def test_snapshots_table_and_json(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["snapshots"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.stderr
    header, first, second = res.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "SANDBOX", "TEMPLATE", "SIZE", "CREATED"]
    assert first.split()[:6] == [SID, "before-upgrade", "sb-1", "minimal", "4.0", "KiB"]
    assert second.split()[:2] == [OLDER["id"], OLDER["id"]]
    assert server.requests[-1].url.params.get("sandbox_id") is None

    res = runner.invoke(app, ["snapshots", "sb-1", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [SNAP, OLDER]
    assert server.requests[-1].url.path == "/v1/snapshots"
    assert server.requests[-1].url.params.get("sandbox_id") == "sb-1"

    server.answer = lambda req: httpx.Response(200, json=[])
    res = runner.invoke(app, ["snapshots"])
    assert (res.exit_code, res.stdout) == (0, "")
    res = runner.invoke(app, ["snapshots", "--json"])
    assert (res.exit_code, json.loads(res.stdout)) == (0, [])


def test_snapshot_rm_deletes_each_and_reports_the_failures(
    runner: CliRunner, server: Recorder
) -> None:
    res = runner.invoke(app, ["snapshot-rm", "snap-a", "snap-b"])
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", "")
    assert server.routes() == [
        ("DELETE", "/v1/snapshots/snap-a"),
        ("DELETE", "/v1/snapshots/snap-b"),
    ]

    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/snap-gone"):
            return error_response(404, "not_found", "no snapshot snap-gone")
        return httpx.Response(204)

    server.answer = answer
    res = runner.invoke(app, ["snapshot-rm", "snap-gone", "snap-c"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: snap-gone: no snapshot snap-gone"
    assert server.routes()[-1] == ("DELETE", "/v1/snapshots/snap-c")  # went on after a failure

    res = runner.invoke(app, ["snapshot-rm", "snap-gone", "snap-c", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout) == [
        {"id": "snap-gone", "deleted": False, "error": "no snapshot snap-gone"},
        {"id": "snap-c", "deleted": True},
    ]


def test_restore_prints_the_new_state(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["restore", "sb-1", "before-upgrade"])
    assert (res.exit_code, res.stdout) == (0, "running\n"), res.stderr
    assert ("POST", "/v1/sandboxes/sb-1/restore") in server.routes()
    assert {"snapshot": "before-upgrade"} in server.bodies()
    res = runner.invoke(app, ["restore", "sb-1", SID, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["state"] == "running"


def test_restore_of_a_missing_snapshot_is_one_line(runner: CliRunner, server: Recorder) -> None:
    def answer(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/restore"):
            return error_response(404, "not_found", "sandbox sb-1 has no snapshot 'nope'")
        return _by_route(req)

    server.answer = answer
    res = runner.invoke(app, ["restore", "sb-1", "nope"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: sandbox sb-1 has no snapshot 'nope'"


def test_fork_prints_one_id_a_line(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(
        app,
        ["fork", SID, "-n", "3", "--timeout", "60", "--metadata", "run=a", "--env", "K=v"],
    )
    assert (res.exit_code, res.stdout) == (0, "sb-f0\nsb-f1\nsb-f2\n"), res.stderr
    assert server.routes() == [("POST", f"/v1/snapshots/{SID}/fork")]
    assert server.bodies() == [
        {"count": 3, "timeout": 60, "metadata": {"run": "a"}, "env": {"K": "v"}}
    ]

    res = runner.invoke(app, ["fork", SID])
    assert (res.exit_code, res.stdout) == (0, "sb-f0\n")
    # Nothing given: nothing overridden, the source's settings stay.
    assert server.bodies()[-1] == {"count": 1, "timeout": None, "metadata": None, "env": None}

    res = runner.invoke(app, ["fork", SID, "--count", "2", "--json"])
    assert res.exit_code == 0
    assert [s["id"] for s in json.loads(res.stdout)] == ["sb-f0", "sb-f1"]


def test_fork_count_zero_shows_the_servers_message(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["fork", SID, "-n", "0"])
    assert res.exit_code == 2
    assert one_error_line(res.stderr) == "error: count must be between 1 and 100"


def test_fork_over_quota_is_exit_1(runner: CliRunner, server: Recorder) -> None:
    server.answer = lambda req: error_response(429, "quota_exceeded", "at most 10 sandboxes")
    res = runner.invoke(app, ["fork", SID, "-n", "50"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: at most 10 sandboxes"


def test_create_from_a_snapshot(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["create", "--snapshot", SID, "--timeout", "30"])
    assert (res.exit_code, res.stdout) == (0, "sb-new\n"), res.stderr
    # No template and no empty env/metadata: the snapshot's source decides those.
    assert server.bodies()[-1] == {"snapshot": SID, "timeout": 30}
    res = runner.invoke(app, ["create", "--snapshot", SID, "--template", "minimal", "-e", "A=1"])
    assert res.exit_code == 0
    assert server.bodies()[-1] == {"snapshot": SID, "template": "minimal", "env": {"A": "1"}}
    res = runner.invoke(app, ["create"])
    assert res.exit_code == 0
    assert server.bodies()[-1] == {"template": "base"}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["snapshot"], "Missing argument"),
        (["restore", "sb-1"], "Missing argument"),
        (["snapshot-rm"], "Missing argument"),
        (["fork"], "Missing argument"),
        (["fork", SID, "--env", "NOEQUALS"], "KEY=VALUE"),
        (["fork", SID, "--metadata", "=v"], "KEY=VALUE"),
        (["fork", SID, "-n", "many"], "--count"),
        (["fork", SID, "--timeout", "soon"], "--timeout"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    runner: CliRunner, server: Recorder, args: list[str], needle: str
) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in one_error_line(res.stderr)
    assert server.requests == []  # refused before anything was sent


def test_every_new_command_has_json_and_help(runner: CliRunner) -> None:
    for command in ("snapshot", "snapshots", "snapshot-rm", "restore", "fork"):
        res = runner.invoke(app, [command, "--help"])
        assert res.exit_code == 0 and "--json" in res.stdout, command
    res = runner.invoke(app, ["create", "--help"])
    assert "--snapshot" in res.stdout
    listing = runner.invoke(app, ["--help"])
    for command in ("snapshot", "snapshots", "snapshot-rm", "restore", "fork"):
        assert command in listing.stdout
