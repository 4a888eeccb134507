"""The SDK template calls: requests and context tar sent, build streams followed, typed errors.

Covered: routes and parameters of builds, imports, tags, deletes and GC; the context tar with
its .dockerignore; build streams split anywhere; error events and refusals as corral.errors.

No server: every request goes to an ``httpx.MockTransport`` that records it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import corral
from corral import errors
from corral.sdk import AsyncClient, AsyncTemplate, BuildEvent, Client, LayerInfo, Template
from corral.sdk import TemplateInfo as ExportedTemplateInfo
from corral.sdk._context import DockerIgnore, build_context
from corral.sdk._wire import calls, parse_template_ref
from corral.sdk.models import TemplateGcResult, TemplateInfo
from tests.unit.sdk_mock import (
    Recorder,
    error_response,
    ndjson_response,
    route_sdk_to,
    tar_members,
)

URL = "http://corral.test:7700"

WEB: dict[str, Any] = {
    "name": "web",
    "version": 3,
    "tags": ["latest", "v1"],
    "builtin": False,
    "description": "",
    "built": True,
    "size_bytes": 125829120,
    "built_at": "2026-12-06T10:00:00Z",
    "source": "dockerfile",
    "image": None,
    "layers": [
        {"digest": "sha256:" + "a" * 64, "size_bytes": 120000000},
        {"digest": "sha256:" + "b" * 64, "size_bytes": 5829120},
    ],
    "start_cmd": ["/bin/sh", "-c", "python3 -m http.server"],
    "ready_cmd": ["/bin/sh", "-c", "curl -sf localhost:8000"],
    "ready_timeout": 60.0,
    "env": {"PATH": "/usr/bin:/bin", "K": "V"},
    "workdir": "/app",
    "user": "root",
}
# What a server from before Dockerfile builds answers for a template.
OLD_BASE: dict[str, Any] = {
    "name": "base",
    "description": "Debian with Python",
    "built": True,
    "size_bytes": 504000000,
    "built_at": "2026-11-01T08:00:00Z",
}

STEPS: list[dict[str, Any]] = [
    {"type": "step", "stage": 0, "step": 1, "of": 3, "line": 1, "instruction": "FROM base",
     "cached": True},
    {"type": "step", "stage": 0, "step": 2, "of": 3, "line": 3, "instruction": "RUN make",
     "cached": False},
    {"type": "output", "stream": "stdout", "data": "compiling ✓\n"},
    {"type": "output", "stream": "stderr", "data": "warning: x\n"},
    {"type": "step", "stage": 0, "step": 3, "of": 3, "line": 4, "instruction": "COPY . /app",
     "cached": False},
]  # fmt: skip
DONE: dict[str, Any] = {"type": "done", "template": WEB, "seconds": 12.3}
RUN_FAILED: dict[str, Any] = {
    "type": "error",
    "code": "invalid_request",
    "message": "RUN make (line 3) failed with exit code 2:\nmake: *** No rule to make target",
}


def _answer(req: httpx.Request) -> httpx.Response:
    """What the server of the templates design answers to each route."""
    path, method = req.url.path, req.method
    if path in ("/v1/templates/web/builds", "/v1/templates/web/imports"):
        return ndjson_response([*STEPS, DONE], chunk_size=7)
    if path == "/v1/templates":
        return httpx.Response(200, json=[OLD_BASE, WEB])
    if path == "/v1/templates/gc":
        return httpx.Response(200, json={"layers_removed": 2, "bytes_freed": 12345})
    if path == "/v1/templates/web/versions":
        return httpx.Response(200, json=[{**WEB, "version": 1, "tags": []}, WEB])
    if "/tags/" in path and method == "PUT":
        return httpx.Response(200, json={**WEB, "tags": ["latest", "v1", "stable"]})
    if method == "DELETE":
        return httpx.Response(204)
    if path.startswith("/v1/templates/gone"):
        return error_response(404, "not_found", "no template 'gone'")
    return httpx.Response(200, json=WEB)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return route_sdk_to(monkeypatch, _answer)


def _routes(server: Recorder) -> list[tuple[str, str]]:
    """Method and path as sent (``Recorder.routes`` shows the path decoded)."""
    return [(r.method, r.url.raw_path.decode().partition("?")[0]) for r in server.requests]


def _params(req: httpx.Request) -> list[tuple[str, str]]:
    return list(req.url.params.multi_items())


def _context(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# ---------------------------------------------------------------- parsing


def test_template_parses_every_field() -> None:
    t = TemplateInfo.from_json(WEB)
    assert (t.name, t.version, t.ref, t.tags, t.builtin, t.source) == (
        "web",
        3,
        "web@3",
        ("latest", "v1"),
        False,
        "dockerfile",
    )
    assert t.layers == (
        LayerInfo("sha256:" + "a" * 64, 120000000),
        LayerInfo("sha256:" + "b" * 64, 5829120),
    )
    assert t.start_cmd == ("/bin/sh", "-c", "python3 -m http.server")
    assert t.ready_cmd == ("/bin/sh", "-c", "curl -sf localhost:8000")
    assert (t.ready_timeout, t.workdir, t.user, t.image) == (60.0, "/app", "root", None)
    assert t.env == {"PATH": "/usr/bin:/bin", "K": "V"}
    assert t.built_at == datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
    assert t.raw == WEB
    imported = TemplateInfo.from_json({**WEB, "source": "image", "image": "127.0.0.1:5000/x:1"})
    assert (imported.source, imported.image) == ("image", "127.0.0.1:5000/x:1")


def test_an_old_servers_template_keeps_the_defaults() -> None:
    t = TemplateInfo.from_json(OLD_BASE)
    assert (t.name, t.built, t.size_bytes, t.description) == (
        "base",
        True,
        504000000,
        "Debian with Python",
    )
    # Old servers have only the built-ins.
    assert (t.version, t.ref, t.tags, t.builtin, t.source, t.layers) == (
        None,
        "base",
        (),
        True,
        "builtin",
        (),
    )
    assert (t.start_cmd, t.ready_cmd, t.ready_timeout, t.env, t.workdir, t.user) == (
        None,
        None,
        None,
        {},
        None,
        None,
    )
    nulls = TemplateInfo.from_json({**WEB, "layers": None, "tags": None, "env": None})
    assert (nulls.layers, nulls.tags, nulls.env) == ((), (), {})


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [WEB],
        {k: v for k, v in WEB.items() if k != "name"},
        {**WEB, "version": "three"},
        {**WEB, "layers": [{"size_bytes": 1}]},
        {**WEB, "layers": ["sha256:x"]},
        {**WEB, "start_cmd": 42},
        {**WEB, "ready_timeout": "soon"},
    ],
)
def test_a_malformed_template_is_reported_as_malformed(obj: object) -> None:
    with pytest.raises(errors.CorralError, match="malformed"):
        TemplateInfo.from_json(obj)


def test_build_events_parse_each_type() -> None:
    step = BuildEvent.from_json(STEPS[1])
    assert (step.type, step.stage, step.step, step.of, step.line) == ("step", 0, 2, 3, 3)
    assert (step.instruction, step.cached) == ("RUN make", False)
    assert BuildEvent.from_json(STEPS[0]).cached
    out = BuildEvent.from_json(STEPS[2])
    assert (out.type, out.stream, out.data) == ("output", "stdout", "compiling ✓\n")
    prog = BuildEvent.from_json({"type": "progress", "layer": "sha256:c", "bytes": 10, "total": 50})
    assert (prog.layer, prog.bytes, prog.total) == ("sha256:c", 10, 50)
    done = BuildEvent.from_json(DONE)
    assert done.template == TemplateInfo.from_json(WEB) and done.seconds == 12.3
    err = BuildEvent.from_json(RUN_FAILED)
    assert (err.code, err.message) == ("invalid_request", RUN_FAILED["message"])
    # A newer server's event type comes through untouched.
    new = BuildEvent.from_json({"type": "note", "text": "hi"})
    assert (new.type, new.raw) == ("note", {"type": "note", "text": "hi"})
    with pytest.raises(errors.CorralError, match="malformed build event"):
        BuildEvent.from_json({"stream": "stdout"})
    with pytest.raises(errors.CorralError, match="malformed"):
        BuildEvent.from_json({"type": "done", "template": {"version": 1}})


def test_gc_result_parses() -> None:
    gc = TemplateGcResult.from_json({"layers_removed": 2, "bytes_freed": 12345})
    assert (gc.layers_removed, gc.bytes_freed) == (2, 12345)
    with pytest.raises(errors.CorralError, match="malformed"):
        TemplateGcResult.from_json([])


def test_the_new_names_are_exported() -> None:
    for name in ("Template", "AsyncTemplate", "BuildEvent", "LayerInfo", "TemplateGcResult"):
        assert name in corral.__all__ and name in corral.sdk.__all__
        assert getattr(corral, name) is getattr(corral.sdk, name)
    assert ExportedTemplateInfo is TemplateInfo and corral.Template is Template


# ---------------------------------------------------------------- request building


def test_template_routes_quote_references_whole() -> None:
    cases = [
        (calls.get_template("web"), "GET", "/v1/templates/web", None),
        (calls.get_template("web:latest"), "GET", "/v1/templates/web%3Alatest", None),
        (calls.get_template("web@3"), "GET", "/v1/templates/web%403", None),
        (calls.template_versions("web"), "GET", "/v1/templates/web/versions", None),
        (calls.tag_template("web", "v1", 3), "PUT", "/v1/templates/web/tags/v1", {"version": 3}),
        (calls.untag_template("web", "v1"), "DELETE", "/v1/templates/web/tags/v1", None),
        (calls.delete_template("web@2"), "DELETE", "/v1/templates/web%402", None),
        (calls.delete_template("../x"), "DELETE", "/v1/templates/..%2Fx", None),
        (calls.gc_templates(), "POST", "/v1/templates/gc", None),
    ]  # fmt: skip
    for call, method, path, body in cases:
        assert (call.method, call.path, call.body) == (method, path, body)
    with pytest.raises(errors.InvalidRequestError):
        calls.tag_template("web", "v1", "3")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidRequestError, match="empty"):
        calls.get_template("")


def test_build_parameters_are_sent_only_when_given() -> None:
    plain = calls.build_template_dockerfile("web", "Dockerfile")
    assert plain.params == (("dockerfile", "Dockerfile"),)
    assert (plain.method, plain.path) == ("POST", "/v1/templates/web/builds")
    assert plain.content_type == "application/x-tar" and plain.read_timeout is None
    full = calls.build_template_dockerfile(
        "web",
        ".corral/Dockerfile",
        tag="v1",
        build_args={"A": "1", "B": "x=y"},
        no_cache=True,
        network="public",
        ready_cmd="curl -sf localhost:8000",
        ready_timeout=30,
    )
    assert full.params == (
        ("dockerfile", ".corral/Dockerfile"),
        ("tag", "v1"),
        ("build_arg", "A=1"),
        ("build_arg", "B=x=y"),
        ("no_cache", "true"),
        ("network", "public"),
        ("ready_cmd", "curl -sf localhost:8000"),
        ("ready_timeout", "30.0"),
    )


def test_parse_template_ref() -> None:
    assert parse_template_ref("web@3") == ("web", 3)
    assert parse_template_ref("web:latest") == ("web:latest", None)
    assert parse_template_ref("web") == ("web", None)
    assert parse_template_ref("web@x") == ("web@x", None)


# ---------------------------------------------------------------- .dockerignore


@pytest.mark.parametrize(
    ("patterns", "path", "excluded"),
    [
        (["*.pyc"], "a.pyc", True),
        (["*.pyc"], "sub/a.pyc", False),  # "*" stays in one directory, as in Docker
        (["**/*.pyc"], "sub/deep/a.pyc", True),
        (["**/*.pyc"], "a.pyc", True),
        (["build"], "build", True),
        (["build"], "build/x/y.o", True),  # a directory takes its contents along
        (["build/"], "build/x", True),
        (["/build"], "build/x", True),
        (["./build"], "build/x", True),
        (["build"], "src/build", False),
        (["node_modules", "!node_modules/keep.js"], "node_modules/keep.js", False),
        (["node_modules", "!node_modules/keep.js"], "node_modules/other.js", True),
        (["*.md", "!README.md"], "README.md", False),
        (["*.md", "!README.md", "README*"], "README.md", True),  # the last match wins
        (["?.txt"], "a.txt", True),
        (["?.txt"], "ab.txt", False),
        (["[ab].txt"], "b.txt", True),
        (["[!ab].txt"], "b.txt", False),
        (["[!ab].txt"], "c.txt", True),
        (["docs/**"], "docs/a/b", True),
        (["docs/**"], "docs", False),
        (["**"], "anything/at/all", True),
        (["a/**/z"], "a/z", True),
        (["a/**/z"], "a/b/c/z", True),
        (["# a comment", "", "   "], "# a comment", False),
        (["  .git  "], ".git/HEAD", True),
        (["a.b"], "axb", False),  # "." is literal
        (["!x"], "x", False),
    ],
)
def test_dockerignore_patterns(patterns: list[str], path: str, excluded: bool) -> None:
    assert DockerIgnore(patterns).excluded(path) is excluded


def test_dockerignore_says_when_an_excluded_directory_must_be_walked() -> None:
    ignore = DockerIgnore(["node_modules", "!node_modules/keep.js", "cache"])
    assert ignore.may_include_below("node_modules")
    assert not ignore.may_include_below("cache")
    assert DockerIgnore(["x", "!**/keep"]).may_include_below("x")
    assert not DockerIgnore(["x"]).may_include_below("x")


# ---------------------------------------------------------------- the build context


def _members(ctx_root: Path, **kwargs: Any) -> tuple[str, dict[str, bytes | str | None]]:
    ctx = build_context(ctx_root, **kwargs)
    return ctx.dockerfile, tar_members(b"".join(ctx.chunks(chunk_size=5)))


def test_context_tar_honours_dockerignore(tmp_path: Path) -> None:
    _context(
        tmp_path,
        {
            "Dockerfile": "FROM base\n",
            ".dockerignore": "*.log\nnode_modules\n!node_modules/keep/me.js\nsecret/\n.git\n",
            "app.py": "print(1)\n",
            "debug.log": "noise",
            "src/deep.log": "kept: *.log is for the top only",
            "node_modules/a/b.js": "x",
            "node_modules/keep/me.js": "kept",
            "secret/key": "k",
            "empty/": "",
            ".git/HEAD": "ref",
        },
    )
    (tmp_path / "link").symlink_to("app.py")
    os.chmod(tmp_path / "app.py", 0o750)
    dockerfile, members = _members(tmp_path)
    assert dockerfile == "Dockerfile"
    assert members == {
        ".dockerignore": b"*.log\nnode_modules\n!node_modules/keep/me.js\nsecret/\n.git\n",
        "Dockerfile": b"FROM base\n",
        "app.py": b"print(1)\n",
        "empty": None,
        "link": "-> app.py",
        # The excluded directory is sent after all, for the file brought back inside it.
        "node_modules": None,
        "node_modules/keep": None,
        "node_modules/keep/me.js": b"kept",
        "src": None,
        "src/deep.log": b"kept: *.log is for the top only",
    }
    assert list(members) == sorted(members)  # parents before children


def test_an_excluded_directory_is_not_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _context(
        tmp_path,
        {"Dockerfile": "FROM base\n", ".dockerignore": "big\n", "big/a/f": "x", "src/g": "y"},
    )
    scanned: list[str] = []
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        scanned.append(os.path.relpath(path, tmp_path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    _, members = _members(tmp_path)
    assert set(members) == {".dockerignore", "Dockerfile", "src", "src/g"}
    assert sorted(scanned) == [".", "src"]


def test_many_small_files_go_out_in_few_pieces(tmp_path: Path) -> None:
    _context(tmp_path, {"Dockerfile": "FROM base\n", **{f"f{i:03}": "x" for i in range(300)}})
    pieces = list(build_context(tmp_path).chunks())
    # 301 files are over 600 tar blocks; they leave in 64 KiB pieces, not one by one.
    assert len(pieces) <= 5
    assert len(tar_members(b"".join(pieces))) == 301


def test_a_dockerfile_elsewhere_travels_as_corral_dockerfile(tmp_path: Path) -> None:
    ctx = _context(tmp_path / "ctx", {"app.py": "x", "docker/web.Dockerfile": "FROM minimal\n"})
    outside = tmp_path / "Dockerfile.outside"
    outside.write_text("FROM base\nCOPY . /app\n")

    # Inside the context: sent where it is, named by its path.
    dockerfile, members = _members(ctx, dockerfile="docker/web.Dockerfile")
    assert dockerfile == "docker/web.Dockerfile" and ".corral/Dockerfile" not in members

    # An absolute path inside the context is the same thing.
    dockerfile, _ = _members(ctx, dockerfile=ctx / "docker" / "web.Dockerfile")
    assert dockerfile == "docker/web.Dockerfile"

    # Outside it: carried in the tar under .corral/.
    dockerfile, members = _members(ctx, dockerfile=outside)
    assert dockerfile == ".corral/Dockerfile"
    assert members[".corral"] is None
    assert members[".corral/Dockerfile"] == b"FROM base\nCOPY . /app\n"
    assert members["app.py"] == b"x"

    # Given as text.
    dockerfile, members = _members(ctx, dockerfile_text="FROM minimal\nRUN true\n")
    assert dockerfile == ".corral/Dockerfile"
    assert members[".corral/Dockerfile"] == b"FROM minimal\nRUN true\n"


def test_an_ignored_or_linked_dockerfile_travels_as_corral_dockerfile(tmp_path: Path) -> None:
    _context(tmp_path, {"Dockerfile": "FROM base\n", ".dockerignore": "Dockerfile\n"})
    dockerfile, members = _members(tmp_path)
    assert dockerfile == ".corral/Dockerfile" and "Dockerfile" not in members
    assert members[".corral/Dockerfile"] == b"FROM base\n"

    linked = _context(tmp_path / "l", {"real/Dockerfile.x": "FROM minimal\n"})
    (linked / "Dockerfile").symlink_to("real/Dockerfile.x")
    dockerfile, members = _members(linked)
    assert dockerfile == ".corral/Dockerfile"
    assert members["Dockerfile"] == "-> real/Dockerfile.x"
    assert members[".corral/Dockerfile"] == b"FROM minimal\n"


def test_a_corral_directory_in_the_context_is_shared(tmp_path: Path) -> None:
    _context(tmp_path, {".corral/notes": "n", ".corral/Dockerfile": "old\n", "Dockerfile": "x"})
    dockerfile, members = _members(tmp_path, dockerfile_text="FROM base\n")
    assert dockerfile == ".corral/Dockerfile"
    assert list(members).count(".corral") == 1
    assert members[".corral/Dockerfile"] == b"FROM base\n"  # the build's, not the old one
    assert members[".corral/notes"] == b"n"
    # Without an inline Dockerfile the context's own .corral/Dockerfile is just a file.
    _, members = _members(tmp_path)
    assert members[".corral/Dockerfile"] == b"old\n"

    clash = _context(tmp_path / "clash", {".corral": "a file"})
    with pytest.raises(errors.InvalidRequestError, match=r"named \.corral"):
        _members(clash, dockerfile_text="FROM base\n")
    (clash / ".dockerignore").write_text(".corral\n")
    _, members = _members(clash, dockerfile_text="FROM base\n")
    assert members[".corral/Dockerfile"] == b"FROM base\n"


def test_a_bad_context_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidRequestError, match="not a directory"):
        build_context(tmp_path / "nope")
    with pytest.raises(errors.InvalidRequestError, match="no Dockerfile"):
        build_context(tmp_path)
    (tmp_path / "Dockerfile").mkdir()
    with pytest.raises(errors.InvalidRequestError, match="is a directory"):
        build_context(tmp_path)
    (tmp_path / ".dockerignore").write_text("[z-a]\n")
    with pytest.raises(errors.InvalidRequestError, match="dockerignore"):
        build_context(tmp_path, dockerfile_text="FROM base")


# ---------------------------------------------------------------- builds over the wire


def test_template_build_streams_the_context_and_follows_the_events(
    server: Recorder, tmp_path: Path
) -> None:
    _context(
        tmp_path, {"Dockerfile": "FROM base\n", ".dockerignore": "*.tmp\n", "a": "1", "b.tmp": ""}
    )
    seen: list[BuildEvent] = []
    built = Template.build(
        "web",
        tmp_path,
        tag="v1",
        build_args={"PY": "3.11"},
        network="none",
        ready_cmd="true",
        ready_timeout=5,
        on_event=seen.append,
        api_key="k",
        base_url=URL,
    )
    assert built == TemplateInfo.from_json(WEB)
    # Every line, split across 7-byte chunks on the way, arrives whole and in order.
    assert [e.raw for e in seen] == [*STEPS, DONE]
    assert seen[2].data == "compiling ✓\n"
    (req,) = server.requests
    assert (req.method, req.url.path) == ("POST", "/v1/templates/web/builds")
    assert req.headers["content-type"] == "application/x-tar"
    assert req.headers["authorization"] == "Bearer k"
    assert _params(req) == [
        ("dockerfile", "Dockerfile"),
        ("tag", "v1"),
        ("build_arg", "PY=3.11"),
        ("network", "none"),
        ("ready_cmd", "true"),
        ("ready_timeout", "5.0"),
    ]
    assert set(tar_members(req.content)) == {".dockerignore", "Dockerfile", "a"}


def test_client_build_without_a_callback_and_an_outside_dockerfile(
    server: Recorder, tmp_path: Path
) -> None:
    ctx = _context(tmp_path / "ctx", {"a": "1"})
    (tmp_path / "web.Dockerfile").write_text("FROM base\n")
    with Client(api_key="k", base_url=URL) as client:
        built = client.build_template_from_dockerfile(
            "web", ctx, dockerfile=tmp_path / "web.Dockerfile", no_cache=True
        )
    assert built.ref == "web@3"
    (req,) = server.requests
    assert _params(req) == [("dockerfile", ".corral/Dockerfile"), ("no_cache", "true")]
    assert tar_members(req.content) == {
        "a": b"1",
        ".corral": None,
        ".corral/Dockerfile": b"FROM base\n",
    }


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_request", errors.InvalidRequestError),
        ("runtime_failure", errors.RuntimeFailure),
        ("upstream_error", errors.UpstreamError),
        ("timeout", errors.TimeoutError),
        ("something_new", errors.CorralError),
    ],
)
def test_an_error_event_raises_its_class_after_the_callback_saw_it(
    server: Recorder, tmp_path: Path, code: str, cls: type[errors.CorralError]
) -> None:
    failed = {**RUN_FAILED, "code": code}
    server.answer = lambda req: ndjson_response([*STEPS[:3], failed], chunk_size=3)
    _context(tmp_path, {"Dockerfile": "FROM base\nRUN make\n"})
    seen: list[str] = []
    with pytest.raises(cls) as caught:
        Template.build(
            "web", tmp_path, on_event=lambda e: seen.append(e.type), api_key="k", base_url=URL
        )
    assert type(caught.value) is cls
    # The message carries the failing RUN's output and exit code, as the server wrote it.
    assert caught.value.message == RUN_FAILED["message"]
    assert seen == ["step", "step", "output", "error"]


def test_a_refused_build_and_a_cut_stream(server: Recorder, tmp_path: Path) -> None:
    _context(tmp_path, {"Dockerfile": "FROM base\n"})
    server.answer = lambda req: error_response(
        400, "invalid_request", "Dockerfile line 2: unsupported instruction ONBUILD"
    )
    with pytest.raises(errors.InvalidRequestError, match="line 2: unsupported"):
        Template.build("web", tmp_path, api_key="k", base_url=URL)
    server.answer = lambda req: error_response(403, "permission_denied", "admin only")
    with pytest.raises(errors.PermissionDeniedError):
        Template.build("web", tmp_path, api_key="k", base_url=URL)
    server.answer = lambda req: ndjson_response(STEPS)
    with pytest.raises(errors.CorralError, match="ended before the build finished"):
        Template.build("web", tmp_path, api_key="k", base_url=URL)
    server.answer = lambda req: ndjson_response([{"type": "done", "seconds": 1.0}])
    with pytest.raises(errors.CorralError, match="malformed build end"):
        Template.build("web", tmp_path, api_key="k", base_url=URL)


def test_nothing_is_sent_for_a_missing_dockerfile(server: Recorder, tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidRequestError, match="no Dockerfile"):
        Template.build("web", tmp_path, api_key="k", base_url=URL)
    with pytest.raises(errors.InvalidRequestError, match="no image archive"):
        Template.import_archive("web", tmp_path / "x.tar", api_key="k", base_url=URL)
    with pytest.raises(errors.InvalidRequestError, match="not a file"):
        Template.import_archive("web", tmp_path, api_key="k", base_url=URL)
    assert server.requests == []


def test_a_callback_that_raises_stops_the_build(server: Recorder, tmp_path: Path) -> None:
    _context(tmp_path, {"Dockerfile": "FROM base\n"})

    def stop(event: BuildEvent) -> None:
        if event.type == "output":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Template.build("web", tmp_path, on_event=stop, api_key="k", base_url=URL)


# ---------------------------------------------------------------- imports


def test_import_image_sends_the_reference_and_credentials(server: Recorder) -> None:
    events = [
        {"type": "progress", "layer": "sha256:c", "bytes": 0, "total": 50},
        {"type": "progress", "layer": "sha256:c", "bytes": 50, "total": 50},
        {**DONE, "template": {**WEB, "source": "image", "image": "127.0.0.1:5000/x:1"}},
    ]
    server.answer = lambda req: ndjson_response(events, chunk_size=11)
    seen: list[BuildEvent] = []
    got = Template.import_image(
        "web",
        "127.0.0.1:5000/x:1",
        username="u",
        password="p",
        tag="v1",
        on_event=seen.append,
        api_key="k",
        base_url=URL,
    )
    assert (got.source, got.image) == ("image", "127.0.0.1:5000/x:1")
    assert [(e.bytes, e.total) for e in seen[:2]] == [(0, 50), (50, 50)]
    (req,) = server.requests
    assert (req.method, req.url.path, _params(req)) == (
        "POST",
        "/v1/templates/web/imports",
        [("tag", "v1")],
    )
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == {
        "image": "127.0.0.1:5000/x:1",
        "username": "u",
        "password": "p",
    }

    Template.import_image("web", "127.0.0.1:5000/x:1", api_key="k", base_url=URL)
    assert _params(server.requests[-1]) == []
    assert json.loads(server.requests[-1].content) == {
        "image": "127.0.0.1:5000/x:1",
        "username": None,
        "password": None,
    }


def test_import_image_preflight_errors(server: Recorder) -> None:
    server.answer = lambda req: error_response(502, "upstream_error", "registry said 401")
    with pytest.raises(errors.UpstreamError, match="401"):
        Template.import_image("web", "127.0.0.1:5000/x:1", api_key="k", base_url=URL)


def test_import_archive_streams_the_file(server: Recorder, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read's worth
    archive.write_bytes(data)
    with Client(api_key="k", base_url=URL) as client:
        got = client.import_template_archive("web", archive, tag="v2")
    assert got.ref == "web@3"
    (req,) = server.requests
    assert (req.method, req.url.path, _params(req)) == (
        "POST",
        "/v1/templates/web/imports",
        [("tag", "v2")],
    )
    assert req.headers["content-type"] == "application/x-tar"
    assert req.content == data


# ---------------------------------------------------------------- the rest


def test_get_list_versions_tag_untag_delete_gc(server: Recorder) -> None:
    kw: dict[str, Any] = {"api_key": "k", "base_url": URL}
    assert Template.get("web:latest", **kw) == TemplateInfo.from_json(WEB)
    assert [t.name for t in Template.list(**kw)] == ["base", "web"]
    assert [t.version for t in Template.versions("web", **kw)] == [1, 3]
    assert Template.tag("web", "stable", 3, **kw).tags == ("latest", "v1", "stable")
    assert Template.untag("web", "stable", **kw) is None
    assert Template.delete("web@1", **kw) is None
    assert Template.gc(**kw) == TemplateGcResult(2, 12345)
    with pytest.raises(errors.NotFoundError, match="no template 'gone'"):
        Template.get("gone", **kw)
    assert _routes(server) == [
        ("GET", "/v1/templates/web%3Alatest"),
        ("GET", "/v1/templates"),
        ("GET", "/v1/templates/web/versions"),
        ("PUT", "/v1/templates/web/tags/stable"),
        ("DELETE", "/v1/templates/web/tags/stable"),
        ("DELETE", "/v1/templates/web%401"),
        ("POST", "/v1/templates/gc"),
        ("GET", "/v1/templates/gone"),
    ]
    assert json.loads(server.requests[3].content) == {"version": 3}


def test_client_template_methods_and_the_builtin_build_unchanged(server: Recorder) -> None:
    with Client(api_key="k", base_url=URL) as client:
        assert client.get_template("web@3").ref == "web@3"
        assert len(client.list_template_versions("web")) == 2
        client.tag_template("web", "stable", 3)
        client.untag_template("web", "stable")
        client.delete_template("web")
        assert client.gc_templates().bytes_freed == 12345
        server.answer = lambda req: httpx.Response(200, json=OLD_BASE)
        assert client.build_template("base", force=True).name == "base"
    assert server.routes()[-1] == ("POST", "/v1/templates/base/build")
    assert _params(server.requests[-1]) == [("force", "true")]


# ---------------------------------------------------------------- asyncio


async def test_async_template_build_with_an_async_callback(
    server: Recorder, tmp_path: Path
) -> None:
    _context(tmp_path, {"Dockerfile": "FROM base\n", ".dockerignore": "x\n", "x": "", "y": "1"})
    seen: list[str] = []

    async def on_event(event: BuildEvent) -> None:
        seen.append(event.type)

    built = await AsyncTemplate.build(
        "web", tmp_path, tag="v1", on_event=on_event, api_key="k", base_url=URL
    )
    assert built == TemplateInfo.from_json(WEB)
    assert seen == ["step", "step", "output", "output", "step", "done"]
    (req,) = server.requests
    assert req.headers["content-type"] == "application/x-tar"
    assert _params(req) == [("dockerfile", "Dockerfile"), ("tag", "v1")]
    assert set(tar_members(req.content)) == {".dockerignore", "Dockerfile", "y"}

    seen.clear()
    server.answer = lambda req: ndjson_response([STEPS[0], RUN_FAILED], chunk_size=5)
    with pytest.raises(errors.InvalidRequestError, match="exit code 2") as caught:
        # A plain function will do as well as a coroutine function.
        await AsyncTemplate.build(
            "web", tmp_path, on_event=lambda e: seen.append(e.type), api_key="k", base_url=URL
        )
    assert type(caught.value) is errors.InvalidRequestError
    assert seen == ["step", "error"]


async def test_async_imports_and_the_rest(server: Recorder, tmp_path: Path) -> None:
    kw: dict[str, Any] = {"api_key": "k", "base_url": URL}
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"tarball" * 1000)
    assert (await AsyncTemplate.import_archive("web", archive, tag="v2", **kw)).ref == "web@3"
    assert (await AsyncTemplate.import_image("web", "reg:5000/x", password="p", **kw)).version == 3
    assert (await AsyncTemplate.get("web@3", **kw)).ref == "web@3"
    assert len(await AsyncTemplate.list(**kw)) == 2
    assert len(await AsyncTemplate.versions("web", **kw)) == 2
    await AsyncTemplate.tag("web", "stable", 3, **kw)
    await AsyncTemplate.untag("web", "stable", **kw)
    await AsyncTemplate.delete("web", **kw)
    assert (await AsyncTemplate.gc(**kw)).layers_removed == 2
    async with AsyncClient(**kw) as client:
        ctx = _context(tmp_path / "ctx", {"Dockerfile": "FROM base\n"})
        assert (await client.build_template_from_dockerfile("web", ctx)).ref == "web@3"
        assert (await client.get_template("web")).name == "web"
    assert _routes(server) == [
        ("POST", "/v1/templates/web/imports"),
        ("POST", "/v1/templates/web/imports"),
        ("GET", "/v1/templates/web%403"),
        ("GET", "/v1/templates"),
        ("GET", "/v1/templates/web/versions"),
        ("PUT", "/v1/templates/web/tags/stable"),
        ("DELETE", "/v1/templates/web/tags/stable"),
        ("DELETE", "/v1/templates/web"),
        ("POST", "/v1/templates/gc"),
        ("POST", "/v1/templates/web/builds"),
        ("GET", "/v1/templates/web"),
    ]
    first, second = server.requests[:2]
    assert (
        first.content == b"tarball" * 1000 and first.headers["content-type"] == "application/x-tar"
    )
    assert json.loads(second.content) == {"image": "reg:5000/x", "username": None, "password": "p"}
    with pytest.raises(errors.InvalidRequestError, match="no image archive"):
        await AsyncTemplate.import_archive("web", tmp_path / "none.tar", **kw)
