"""`corral template ...`: the requests sent, the build progress shown, the exit status of failures.

Covered: build|import|list|inspect|versions|tag|untag|rm|gc, the progress view of builds and
imports, and failures as an ``error:`` message with exit status 1 (server) or 2 (usage).

No server: the SDK's requests go to the recorder of tests/unit/test_sdk_templates.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from corral.cli.main import app
from tests.unit.sdk_mock import (
    Recorder,
    cli_runner,
    error_response,
    ndjson_response,
    one_error_line,
    route_sdk_to,
    tar_members,
)
from tests.unit.test_sdk_templates import DONE, OLD_BASE, RUN_FAILED, STEPS, WEB, _answer

COLUMNS = {"COLUMNS": "250"}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    return cli_runner(monkeypatch, tmp_path, "http://corral.test:7700")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    def answer(req: httpx.Request) -> httpx.Response:
        if req.method == "DELETE" and "gone" in req.url.path:
            return error_response(404, "not_found", "no template 'gone'")
        return _answer(req)

    return route_sdk_to(monkeypatch, answer)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A build context as the current directory."""
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM base\nRUN make\nCOPY . /app\n")
    (root / ".dockerignore").write_text("*.log\n")
    (root / "src" / "main.py").write_text("print(1)\n")
    (root / "debug.log").write_text("noise")
    monkeypatch.chdir(root)
    return root


def _params(req: httpx.Request) -> list[tuple[str, str]]:
    return list(req.url.params.multi_items())


# ---------------------------------------------------------------- build


def test_build_streams_the_context_and_shows_the_steps(
    runner: CliRunner, server: Recorder, project: Path
) -> None:
    res = runner.invoke(app, ["template", "build", "web"], env=COLUMNS)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "built web@3 (tags: latest, v1) in 12.3 s, 120.0 MiB\n"
    progress = res.stderr.splitlines()
    assert progress == [
        "Step 1/3 (line 1) FROM base  CACHED",
        "Step 2/3 (line 3) RUN make",
        "compiling ✓",
        "warning: x",
        "Step 3/3 (line 4) COPY . /app",
    ]
    (req,) = server.requests
    assert (req.method, req.url.path) == ("POST", "/v1/templates/web/builds")
    assert req.headers["content-type"] == "application/x-tar"
    assert _params(req) == [("dockerfile", "Dockerfile")]
    assert set(tar_members(req.content)) == {
        ".dockerignore",
        "Dockerfile",
        "src",
        "src/main.py",
    }


def test_build_options_become_the_query(
    runner: CliRunner, server: Recorder, project: Path, tmp_path: Path
) -> None:
    (tmp_path / "other.Dockerfile").write_text("FROM minimal\n")
    args = ["template", "build", "-f", "../other.Dockerfile", "--tag", "v2"]
    args += ["--build-arg", "A=1", "--build-arg", "FROM_ENV", "--build-arg", "UNSET"]
    args += ["--no-cache", "--network", "public", "--ready-cmd", "curl -sf localhost:8000"]
    args += ["--ready-timeout", "30", "web", "src"]
    res = runner.invoke(app, args, env={"FROM_ENV": "here", "UNSET": None})
    assert res.exit_code == 0, res.stderr
    (req,) = server.requests
    assert _params(req) == [
        ("dockerfile", ".corral/Dockerfile"),
        ("tag", "v2"),
        ("build_arg", "A=1"),
        ("build_arg", "FROM_ENV=here"),
        ("no_cache", "true"),
        ("network", "public"),
        ("ready_cmd", "curl -sf localhost:8000"),
        ("ready_timeout", "30.0"),
    ]
    # CONTEXT is src; the Dockerfile from outside it rides along under .corral/.
    assert tar_members(req.content) == {
        "main.py": b"print(1)\n",
        ".corral": None,
        ".corral/Dockerfile": b"FROM minimal\n",
    }


def test_build_reads_the_dockerfile_from_stdin(
    runner: CliRunner, server: Recorder, project: Path
) -> None:
    res = runner.invoke(app, ["template", "build", "-f", "-", "-q", "web"], input="FROM x\n")
    assert res.exit_code == 0, res.stderr
    assert (res.stdout, res.stderr) == ("web@3\n", "")
    (req,) = server.requests
    assert _params(req) == [("dockerfile", ".corral/Dockerfile")]
    assert tar_members(req.content)[".corral/Dockerfile"] == b"FROM x\n"


def test_build_json_prints_only_the_template(
    runner: CliRunner, server: Recorder, project: Path
) -> None:
    res = runner.invoke(app, ["template", "build", "web", ".", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == WEB
    assert res.stderr == ""


def test_a_failing_run_prints_its_output_and_exits_1(
    runner: CliRunner, server: Recorder, project: Path
) -> None:
    server.answer = lambda req: ndjson_response([*STEPS[:3], RUN_FAILED], chunk_size=9)
    res = runner.invoke(app, ["template", "build", "web"], env=COLUMNS)
    assert res.exit_code == 1
    assert "Traceback" not in res.stderr
    # The steps so far, then the whole message: the RUN's output and exit code.
    assert res.stderr.splitlines() == [
        "Step 1/3 (line 1) FROM base  CACHED",
        "Step 2/3 (line 3) RUN make",
        "compiling ✓",
        "error: RUN make (line 3) failed with exit code 2:",
        "make: *** No rule to make target",
    ]
    assert res.stdout == ""

    res = runner.invoke(app, ["template", "build", "web", "--json"])
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr.startswith("error: RUN make (line 3) failed with exit code 2:\n")


def test_a_refused_build_exits_1(runner: CliRunner, server: Recorder, project: Path) -> None:
    server.answer = lambda req: error_response(
        400, "invalid_request", "Dockerfile line 2: unsupported instruction ONBUILD"
    )
    res = runner.invoke(app, ["template", "build", "web"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == (
        "error: Dockerfile line 2: unsupported instruction ONBUILD"
    )
    server.answer = lambda req: ndjson_response(STEPS[:1])
    res = runner.invoke(app, ["template", "build", "web"])
    assert res.exit_code == 1 and "ended before the build finished" in res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["template", "build", "web", "nowhere"], "not a directory"),
        (["template", "build", "web", "src"], "no Dockerfile in src"),
        (["template", "build", "-f", "missing", "web"], "no Dockerfile at missing"),
        (["template", "build", "web", "--force"], "built-in templates"),
        (["template", "build", "base", "."], "base is a built-in template"),
        (["template", "build", "minimal", "--no-cache"], "minimal is a built-in template"),
        (["template", "build", "web", "--build-arg", "=x"], "KEY=VALUE"),
        (["template", "build", "web", "--network", "lan"], "--network"),
        (["template", "import", "web"], "IMAGE or --archive"),
        (["template", "import", "web", "img", "--archive", "x.tar"], "IMAGE or --archive"),
        (["template", "import", "web", "img", "--username", "u"], "go together"),
        (["template", "import", "web", "img", "--password-stdin"], "go together"),
        (["template", "import", "web", "--archive", "nope.tar"], "not a file"),
        (["template", "import", "web", "--archive", "Dockerfile", "--username", "u"],
         "credentials go with IMAGE"),
        (["template", "tag", "web", "stable"], "web@VERSION"),
    ],
)  # fmt: skip
def test_bad_usage_is_one_line_exit_2_and_sends_nothing(
    runner: CliRunner, server: Recorder, project: Path, args: list[str], needle: str
) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle in one_error_line(res.stderr)
    assert server.requests == []


def test_building_a_builtin_is_unchanged(runner: CliRunner, server: Recorder) -> None:
    server.answer = lambda req: httpx.Response(200, json=OLD_BASE)
    res = runner.invoke(app, ["template", "build", "base", "--force"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "built template base (480.7 MiB)\n"
    assert [(r.method, r.url.path, _params(r)) for r in server.requests] == [
        ("POST", "/v1/templates/base/build", [("force", "true")])
    ]
    res = runner.invoke(app, ["template", "build", "minimal", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == OLD_BASE
    assert _params(server.requests[-1]) == [("force", "false")]


# ---------------------------------------------------------------- import


def _imported(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    template = {**WEB, "source": "image", "image": "reg.test:5000/app:1"}
    return [*events, {**DONE, "template": template, "seconds": 3.25}]


PROGRESS = [
    {"type": "progress", "layer": "sha256:" + "c" * 64, "bytes": 0, "total": 4096},
    {"type": "progress", "layer": "sha256:" + "d" * 64, "bytes": 512, "total": 1024},
    {"type": "progress", "layer": "sha256:" + "c" * 64, "bytes": 4096, "total": 4096},
    {"type": "progress", "layer": "sha256:" + "d" * 64, "bytes": 1024, "total": 1024},
]


def test_import_image_with_credentials_shows_layer_progress(
    runner: CliRunner, server: Recorder
) -> None:
    server.answer = lambda req: ndjson_response(_imported(PROGRESS), chunk_size=13)
    args = ["template", "import", "web", "reg.test:5000/app:1", "--username", "u"]
    args += ["--password-stdin", "--tag", "v1"]
    res = runner.invoke(app, args, input="s3cret\n", env=COLUMNS)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "imported web@3 (tags: latest, v1) in 3.2 s, 120.0 MiB, 2 layers\n"
    assert "layer cccccccccccc" in res.stderr and "layer dddddddddddd" in res.stderr
    assert "s3cret" not in res.stderr + res.stdout
    (req,) = server.requests
    assert (req.method, req.url.path, _params(req)) == (
        "POST",
        "/v1/templates/web/imports",
        [("tag", "v1")],
    )
    assert json.loads(req.content) == {
        "image": "reg.test:5000/app:1",
        "username": "u",
        "password": "s3cret",
    }


def test_import_archive_streams_the_file(
    runner: CliRunner, server: Recorder, tmp_path: Path
) -> None:
    archive = tmp_path / "app.tar"
    archive.write_bytes(b"image tarball " * 5000)
    server.answer = lambda req: ndjson_response(_imported([]))
    res = runner.invoke(app, ["template", "import", "web", "--archive", str(archive), "-q"])
    assert res.exit_code == 0, res.stderr
    assert (res.stdout, res.stderr) == ("web@3\n", "")
    (req,) = server.requests
    assert req.headers["content-type"] == "application/x-tar"
    assert req.content == b"image tarball " * 5000 and _params(req) == []

    res = runner.invoke(app, ["template", "import", "web", "--archive", str(archive), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["source"] == "image"


def test_import_errors_exit_1(runner: CliRunner, server: Recorder) -> None:
    server.answer = lambda req: error_response(
        502, "upstream_error", "registry reg.test:5000 answered 401 Unauthorized"
    )
    res = runner.invoke(app, ["template", "import", "web", "reg.test:5000/app:1"])
    assert res.exit_code == 1
    assert "401 Unauthorized" in one_error_line(res.stderr)
    failed = {"type": "error", "code": "invalid_request", "message": "no linux/amd64 image"}
    server.answer = lambda req: ndjson_response([PROGRESS[0], failed])
    res = runner.invoke(app, ["template", "import", "web", "reg.test:5000/app:1"])
    assert res.exit_code == 1
    assert res.stderr.rstrip().endswith("error: no linux/amd64 image")


# ---------------------------------------------------------------- list, inspect, versions


def test_list_shows_version_tags_and_source(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "list"], env=COLUMNS)
    assert res.exit_code == 0, res.stderr
    header, base, web = res.stdout.splitlines()
    assert header.split() == [
        "NAME",
        "VERSION",
        "TAGS",
        "SOURCE",
        "BUILT",
        "SIZE",
        "BUILT",
        "AT",
        "DESCRIPTION",
    ]
    assert base.split()[:6] == ["base", "-", "-", "builtin", "yes", "480.7"]
    assert web.split()[:6] == ["web", "3", "latest,v1", "dockerfile", "yes", "120.0"]
    res = runner.invoke(app, ["template", "list", "--json"])
    assert json.loads(res.stdout) == [OLD_BASE, WEB]


def test_inspect_shows_layers_commands_and_config(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "inspect", "web:latest"], env=COLUMNS)
    assert res.exit_code == 0, res.stderr
    rows = [line.split(None, 1) for line in res.stdout.splitlines() if line.strip()]
    detail = {row[0]: row[1].strip() if len(row) > 1 else "" for row in rows}
    assert detail["name"] == "web" and detail["version"] == "3"
    assert detail["tags"] == "latest,v1" and detail["source"] == "dockerfile"
    assert "start command" in res.stdout and "python3 -m http.server" in res.stdout
    assert "curl -sf localhost:8000 (timeout 60 s)" in res.stdout
    assert detail["workdir"] == "/app" and detail["user"] == "root"
    assert "PATH=/usr/bin:/bin" in res.stdout and "K=V" in res.stdout
    assert detail["layers"] == "2"
    assert "1  sha256:" + "a" * 64 + "  114.4 MiB" in res.stdout
    assert "2  sha256:" + "b" * 64 + "  5.6 MiB" in res.stdout
    assert server.requests[0].url.raw_path == b"/v1/templates/web%3Alatest"

    res = runner.invoke(app, ["template", "inspect", "web@3", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == WEB


def test_inspect_an_unknown_template(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "inspect", "gone"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: no template 'gone'"


def test_versions_table_and_json(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "versions", "web"], env=COLUMNS)
    assert res.exit_code == 0, res.stderr
    header, first, second = res.stdout.splitlines()
    assert header.split() == ["VERSION", "TAGS", "SOURCE", "SIZE", "LAYERS", "BUILT", "AT"]
    assert first.split()[:6] == ["1", "-", "dockerfile", "120.0", "MiB", "2"]
    assert second.split()[:2] == ["3", "latest,v1"]
    res = runner.invoke(app, ["template", "versions", "web", "--json"])
    assert [v["version"] for v in json.loads(res.stdout)] == [1, 3]
    assert [r.url.path for r in server.requests] == ["/v1/templates/web/versions"] * 2


# ---------------------------------------------------------------- tags, rm, gc


def test_tag_by_version_or_by_tag_and_untag(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "tag", "web@3", "stable"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "tagged web@3 as web:stable\n"
    assert (server.requests[-1].method, server.requests[-1].url.path) == (
        "PUT",
        "/v1/templates/web/tags/stable",
    )
    assert json.loads(server.requests[-1].content) == {"version": 3}

    # NAME:TAG pins the version that tag names now.
    res = runner.invoke(app, ["template", "tag", "web:latest", "stable", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["tags"] == ["latest", "v1", "stable"]
    assert [(r.method, r.url.raw_path) for r in server.requests[1:]] == [
        ("GET", b"/v1/templates/web%3Alatest"),
        ("PUT", b"/v1/templates/web/tags/stable"),
    ]

    res = runner.invoke(app, ["template", "untag", "web", "stable"])
    assert res.exit_code == 0 and res.stdout == "removed tag web:stable\n"
    assert (server.requests[-1].method, server.requests[-1].url.path) == (
        "DELETE",
        "/v1/templates/web/tags/stable",
    )


def test_rm_goes_on_past_failures(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "rm", "web@1", "gone", "web"])
    assert res.exit_code == 1
    assert one_error_line(res.stderr) == "error: gone: no template 'gone'"
    assert [(r.method, r.url.raw_path) for r in server.requests] == [
        ("DELETE", b"/v1/templates/web%401"),
        ("DELETE", b"/v1/templates/gone"),
        ("DELETE", b"/v1/templates/web"),
    ]
    res = runner.invoke(app, ["template", "rm", "web:v1", "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout) == [{"id": "web:v1", "deleted": True}]


def test_gc(runner: CliRunner, server: Recorder) -> None:
    res = runner.invoke(app, ["template", "gc"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "removed 2 layers, freed 12.1 KiB\n"
    res = runner.invoke(app, ["template", "gc", "--json"])
    assert json.loads(res.stdout) == {"layers_removed": 2, "bytes_freed": 12345}
    server.answer = lambda req: error_response(403, "permission_denied", "admin key only")
    res = runner.invoke(app, ["template", "gc"])
    assert res.exit_code == 1 and "admin key only" in one_error_line(res.stderr)


def test_every_template_command_has_help(runner: CliRunner) -> None:
    for cmd in ("build", "import", "list", "inspect", "versions", "tag", "untag", "rm", "gc"):
        res = runner.invoke(app, ["template", cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
    res = runner.invoke(app, ["template", "--help"])
    assert all(c in res.stdout for c in ("import", "inspect", "versions", "untag", "gc"))
