"""The SDK's own decisions: config discovery, URL building, error mapping, NDJSON exec decoding."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral import errors
from corral.sdk._config import ClientConfig, resolve_config
from corral.sdk._http import AsyncHttp, SyncHttp
from corral.sdk._wire import (
    ExecCollector,
    NdjsonDecoder,
    PtyState,
    calls,
    error_from_response,
    parse_exec_event,
    ws_url,
)
from corral.sdk.async_sandbox import AsyncSandbox
from corral.sdk.models import ExecExit, ExecOutput, ExecStart, SandboxInfo
from corral.sdk.sandbox import Sandbox

URL = "http://corral.test:7700"
CONFIG = ClientConfig(URL, "k-123")


# ---------------------------------------------------------------- config discovery


def test_explicit_arguments_win_over_environment_and_key_file(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("file-key\n")
    env = {
        "CORRAL_URL": "http://env:1",
        "CORRAL_API_KEY": "env-key",
        "CORRAL_DATA_DIR": str(tmp_path),
    }
    cfg = resolve_config("arg-key", "http://arg:2/", env)
    assert (cfg.base_url, cfg.api_key) == ("http://arg:2", "arg-key")


def test_environment_key_wins_over_key_file(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("file-key\n")
    env = {"CORRAL_API_KEY": "env-key", "CORRAL_DATA_DIR": str(tmp_path)}
    cfg = resolve_config(None, None, env)
    assert (cfg.base_url, cfg.api_key) == ("http://127.0.0.1:7700", "env-key")


def test_key_file_in_data_dir_is_read_when_nothing_else_is_set(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("  file-key\n")
    cfg = resolve_config(None, None, {"CORRAL_DATA_DIR": str(tmp_path), "CORRAL_URL": "https://h"})
    assert (cfg.base_url, cfg.api_key) == ("https://h", "file-key")


def test_missing_key_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(errors.AuthenticationError) as info:
        resolve_config(None, None, {"CORRAL_DATA_DIR": str(tmp_path / "nope")})
    msg = info.value.message
    assert "CORRAL_API_KEY" in msg and str(tmp_path / "nope" / "admin.key") in msg
    assert "does not exist" in msg


def test_empty_key_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "admin.key").write_text("\n")
    with pytest.raises(errors.AuthenticationError, match="is empty"):
        resolve_config(None, None, {"CORRAL_DATA_DIR": str(tmp_path)})


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(errors.InvalidRequestError, match="CORRAL_URL"):
        resolve_config("k", "ftp://h", {})


def test_config_repr_hides_the_key() -> None:
    assert "k-123" not in repr(CONFIG)


# ---------------------------------------------------------------- URL building


def test_user_given_ids_cannot_change_the_route() -> None:
    assert calls.get_sandbox("sb-1").path == "/v1/sandboxes/sb-1"
    assert calls.get_sandbox("../tenants").path == "/v1/sandboxes/..%2Ftenants"
    assert calls.get_sandbox("..").path == "/v1/sandboxes/%2E%2E"
    assert calls.build_template("a/b", False).path == "/v1/templates/a%2Fb/build"
    with pytest.raises(errors.InvalidRequestError):
        calls.get_sandbox("")


def test_list_filters_become_repeated_query_parameters() -> None:
    call = calls.list_sandboxes(["running", "stopped"], {"job": "a=b", "team": "x"})
    assert call.params == (
        ("state", "running"),
        ("state", "stopped"),
        ("metadata", "job=a=b"),
        ("metadata", "team=x"),
    )
    assert calls.list_sandboxes("running", None).params == (("state", "running"),)


def test_create_body_only_carries_what_was_given() -> None:
    call = calls.create_sandbox("base", None, 256, None, 60, None, {"k": "v"})
    assert call.body == {
        "template": "base",
        "memory_mb": 256,
        "timeout": 60,
        "metadata": {"k": "v"},
    }


def test_exec_body_keeps_string_versus_argv() -> None:
    kw: dict[str, Any] = dict(
        cwd=None, env=None, user=1000, timeout=None, stdin=None, background=False, tag=None
    )
    assert calls.exec("sb", "echo hi", **kw).body["cmd"] == "echo hi"
    assert calls.exec("sb", ("echo", "hi"), **kw).body["cmd"] == ["echo", "hi"]
    assert calls.exec("sb", ["x"], **kw).body["user"] == "1000"
    # A foreground exec may stay silent for a long time: no read timeout.
    assert calls.exec("sb", "x", **kw).read_timeout is None


def test_stdin_data_is_base64_on_the_wire() -> None:
    call = calls.process_stdin("sb", 7, "héllo", eof=False)
    assert call.path == "/v1/sandboxes/sb/processes/7/stdin"
    assert base64.b64decode(call.body["data"]) == "héllo".encode()
    assert calls.process_stdin("sb", 7, b"", eof=True).body == {"data": "", "eof": True}


def test_websocket_url_follows_the_base_url() -> None:
    assert (
        ws_url("http://h:7700", "/v1/sandboxes/sb/pty", [("rows", "24"), ("cmd", "/bin/sh -l")])
        == "ws://h:7700/v1/sandboxes/sb/pty?rows=24&cmd=%2Fbin%2Fsh+-l"
    )
    assert ws_url("https://h/corral", "/v1/x") == "wss://h/corral/v1/x"


def test_requests_carry_the_key_and_keep_a_base_path() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"status": "ok"})

    http = SyncHttp(ClientConfig("http://h/prefix", "k"), transport=httpx.MockTransport(handler))
    assert http.json(calls.list_files("sb", "/a b", 2)) == {"status": "ok"}
    req = seen[0]
    assert req.headers["authorization"] == "Bearer k"
    assert req.url.path == "/prefix/v1/sandboxes/sb/files/list"
    assert req.url.params.multi_items() == [("path", "/a b"), ("depth", "2")]


# ---------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("code", "status", "cls"),
    [
        ("invalid_request", 400, errors.InvalidRequestError),
        ("unauthenticated", 401, errors.AuthenticationError),
        ("permission_denied", 403, errors.PermissionDeniedError),
        ("not_found", 404, errors.NotFoundError),
        ("conflict", 409, errors.ConflictError),
        ("sandbox_not_running", 409, errors.SandboxNotRunningError),
        ("quota_exceeded", 429, errors.QuotaExceededError),
        ("timeout", 504, errors.TimeoutError),
        ("runtime_failure", 500, errors.RuntimeFailure),
        ("something_new", 500, errors.CorralError),
    ],
)
def test_error_body_becomes_the_same_error_class(
    code: str, status: int, cls: type[errors.CorralError]
) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": code, "message": "what to fix"}})

    http = SyncHttp(CONFIG, transport=httpx.MockTransport(handler))
    with pytest.raises(errors.CorralError) as info:
        http.json(calls.get_sandbox("sb"))
    assert type(info.value) is cls
    assert info.value.message == "what to fix"


def test_a_body_that_is_not_the_api_error_falls_back_to_the_status() -> None:
    err = error_from_response(404, b"<html>nginx</html>", "http://h/x")
    assert isinstance(err, errors.NotFoundError)
    assert "HTTP 404 from http://h/x" in err.message and "nginx" in err.message
    assert type(error_from_response(502, b"", "http://h/x")) is errors.CorralError


def test_stream_errors_are_read_and_mapped_before_streaming() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        body = {"error": {"code": "sandbox_not_running", "message": "stopped"}}
        return httpx.Response(409, json=body)

    sbx = Sandbox("sb", SyncHttp(CONFIG, transport=httpx.MockTransport(handler)))
    with pytest.raises(errors.SandboxNotRunningError, match="stopped"):
        sbx.exec("true")
    with pytest.raises(errors.SandboxNotRunningError):
        list(sbx.files.read_stream("/x"))


def test_network_failure_names_the_server_url() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    sbx = Sandbox("sb", SyncHttp(CONFIG, transport=httpx.MockTransport(handler)))
    with pytest.raises(errors.CorralError) as info:
        sbx.info()
    assert type(info.value) is errors.CorralError
    assert URL in info.value.message and "connection refused" in info.value.message


def test_read_timeout_is_a_corral_timeout() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    http = SyncHttp(CONFIG, transport=httpx.MockTransport(handler))
    with pytest.raises(errors.TimeoutError, match=URL):
        http.json(calls.me())


# ---------------------------------------------------------------- NDJSON exec streams


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _out(stream: str, data: bytes) -> bytes:
    return _line({"type": stream, "data": base64.b64encode(data).decode()})


def test_decoder_reassembles_lines_split_anywhere() -> None:
    payload = (
        _line({"type": "start", "pid": 3})
        + b"\n"
        + _out("stdout", b"x" * 100)
        + _line({"type": "exit", "exit_code": 0})
    )
    for size in (1, 2, 7, 64, len(payload)):
        dec = NdjsonDecoder()
        objs: list[dict[str, Any]] = []
        for i in range(0, len(payload), size):
            objs += dec.feed(payload[i : i + size])
        objs += dec.finish()
        assert [o["type"] for o in objs] == ["start", "stdout", "exit"], size


def test_decoder_accepts_a_last_line_without_newline_and_rejects_garbage() -> None:
    dec = NdjsonDecoder()
    assert dec.feed(b'{"type": "exit", "exit_code": 3}') == []
    assert dec.finish() == [{"type": "exit", "exit_code": 3}]
    with pytest.raises(errors.CorralError, match="malformed"):
        NdjsonDecoder().feed(b"not json\n")
    with pytest.raises(errors.CorralError, match="malformed"):
        NdjsonDecoder().feed(b"[1, 2]\n")


def test_events_are_typed_and_base64_decoded() -> None:
    assert parse_exec_event({"type": "start", "pid": 12}) == ExecStart(12)
    data = base64.b64encode(b"\x00\xffbin").decode()
    assert parse_exec_event({"type": "stderr", "data": data}) == ExecOutput(
        "stderr", b"\x00\xffbin"
    )
    assert parse_exec_event({"type": "exit", "exit_code": 137}) == ExecExit(137)
    assert parse_exec_event({"type": "future-thing", "x": 1}) is None
    with pytest.raises(errors.CorralError, match="malformed"):
        parse_exec_event({"type": "stdout", "data": "%%%"})


def test_timeout_event_raises_the_timeout_error() -> None:
    with pytest.raises(errors.TimeoutError, match="ran too long"):
        parse_exec_event({"type": "error", "code": "timeout", "message": "ran too long"})


def test_collector_hands_whole_characters_to_callbacks() -> None:
    snow = "☃".encode()  # three bytes, delivered in two events
    col = ExecCollector()
    assert col.add(ExecStart(5)) is None
    assert col.add(ExecOutput("stdout", b"a" + snow[:1])) == ("stdout", "a")
    assert col.add(ExecOutput("stdout", snow[1:] + b"b")) == ("stdout", "☃b")
    assert col.add(ExecOutput("stderr", b"\xff")) == ("stderr", "\ufffd")
    col.add(ExecExit(2))
    res = col.result()
    assert (res.stdout, res.stderr, res.exit_code, res.pid) == ("a☃b", "\ufffd", 2, 5)
    assert res.stdout_bytes == b"a" + snow + b"b" and res.stderr_bytes == b"\xff"


def test_collector_without_exit_is_an_error() -> None:
    col = ExecCollector()
    col.add(ExecOutput("stdout", b"partial"))
    with pytest.raises(errors.CorralError, match="exit status"):
        col.result()


def _stream_handler(
    chunks: list[bytes], seen: list[httpx.Request]
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(
            200, headers={"content-type": "application/x-ndjson"}, content=iter(chunks)
        )

    return handler


def _exec_chunks() -> list[bytes]:
    body = (
        _line({"type": "start", "pid": 42})
        + _out("stdout", "héllo ".encode())
        + _out("stderr", b"warn\n")
        + _out("stdout", b"world\n")
        + _line({"type": "exit", "exit_code": 3})
    )
    # Split mid-line and mid-JSON on purpose.
    return [body[i : i + 5] for i in range(0, len(body), 5)]


def test_exec_streams_callbacks_in_order_and_returns_the_result() -> None:
    seen: list[httpx.Request] = []
    transport = httpx.MockTransport(_stream_handler(_exec_chunks(), seen))
    sbx = Sandbox("sb-1", SyncHttp(CONFIG, transport=transport))
    got: list[tuple[str, str]] = []
    res = sbx.exec(
        ["echo", "hi"],
        env={"A": "1"},
        on_stdout=lambda s: got.append(("out", s)),
        on_stderr=lambda s: got.append(("err", s)),
    )
    assert (res.stdout, res.stderr, res.exit_code, res.pid) == ("héllo world\n", "warn\n", 3, 42)
    assert "".join(s for k, s in got if k == "out") == "héllo world\n"
    assert [k for k, _ in got].index("err") < len(got) - 1  # stderr arrived between stdouts
    body = json.loads(seen[0].content)
    assert seen[0].url.path == "/v1/sandboxes/sb-1/exec"
    assert body["cmd"] == ["echo", "hi"] and body["env"] == {"A": "1"}
    assert body["background"] is False


def test_exec_stream_ending_in_timeout_raises() -> None:
    chunks = [
        _line({"type": "start", "pid": 1}),
        _out("stdout", b"tick\n"),
        _line({"type": "error", "code": "timeout", "message": "killed after 1 s"}),
    ]
    sbx = Sandbox(
        "sb", SyncHttp(CONFIG, transport=httpx.MockTransport(_stream_handler(chunks, [])))
    )
    with pytest.raises(errors.TimeoutError, match="killed after 1 s"):
        sbx.exec("sleep 9", timeout=1)


def test_background_exec_answers_a_process_handle() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert json.loads(req.content)["background"] is True
        return httpx.Response(201, json={"pid": 77})

    sbx = Sandbox("sb", SyncHttp(CONFIG, transport=httpx.MockTransport(handler)))
    proc = sbx.exec("sleep 100", background=True)
    assert proc.pid == 77
    with pytest.raises(errors.InvalidRequestError):
        sbx.exec("x", background=True, on_stdout=print)  # type: ignore[call-overload]


def test_file_writes_stream_iterators_and_file_objects() -> None:
    bodies: list[bytes] = []

    def handler(req: httpx.Request) -> httpx.Response:
        bodies.append(req.read())
        path = req.url.params["path"]
        return httpx.Response(200, json={"name": path[1:], "path": path, "type": "file"})

    sbx = Sandbox("sb", SyncHttp(CONFIG, transport=httpx.MockTransport(handler)))
    chunks: Iterator[bytes] = iter([b"a", b"b", b"c"])
    assert sbx.files.write("/x", chunks).path == "/x"
    sbx.files.write("/y", "texté")
    sbx.files.write("/z", io.BytesIO(b"\x00" * 10))
    assert bodies == [b"abc", "texté".encode(), b"\x00" * 10]


# ---------------------------------------------------------------- async flavour


async def test_async_exec_awaits_coroutine_callbacks() -> None:
    chunks = _exec_chunks()

    async def body() -> AsyncIterator[bytes]:
        for c in chunks:
            await asyncio.sleep(0)
            yield c

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body())

    sbx = AsyncSandbox("sb", AsyncHttp(CONFIG, transport=httpx.MockTransport(handler)))
    got: list[str] = []

    async def on_stdout(text: str) -> None:
        await asyncio.sleep(0)
        got.append(text)

    res = await sbx.exec("echo", on_stdout=on_stdout, on_stderr=got.append)
    assert res.exit_code == 3 and res.stdout == "héllo world\n"
    assert "".join(got) == "héllo warn\nworld\n"
    await sbx.close()


async def test_async_error_mapping_matches_sync() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no sb-x"}})

    sbx = AsyncSandbox("sb-x", AsyncHttp(CONFIG, transport=httpx.MockTransport(handler)))
    with pytest.raises(errors.NotFoundError, match="no sb-x"):
        await sbx.info()
    with pytest.raises(errors.NotFoundError):
        await sbx.exec("true")
    await sbx.close()


# ---------------------------------------------------------------- typed answers and PTY frames


def test_sandbox_info_parses_the_documented_object() -> None:
    obj = {
        "id": "sb-3f9a1c2b7d4e",
        "tenant_id": "admin",
        "template": "base",
        "state": "running",
        "cpu": 1.0,
        "memory_mb": 512,
        "disk_mb": 2048,
        "timeout": 300,
        "metadata": {"k": "v"},
        "env_keys": ["FOO"],
        "created_at": "2026-11-23T13:00:00Z",
        "expires_at": "2026-11-23T13:05:00Z",
        "error": None,
        "added_later": True,
    }
    info = SandboxInfo.from_json(obj)
    assert info.id == "sb-3f9a1c2b7d4e" and info.metadata == {"k": "v"}
    assert info.expires_at is not None and info.created_at is not None
    assert (info.expires_at - info.created_at).total_seconds() == 300
    assert info.raw["added_later"] is True
    with pytest.raises(errors.CorralError, match="malformed"):
        SandboxInfo.from_json({"state": "running"})


def test_pty_control_frames() -> None:
    st = PtyState()
    st.on_text("not json")
    st.on_text('{"type": "start", "pid": 9}')
    assert st.started and st.pid == 9
    st.on_text('{"type": "exit", "exit_code": 130}')
    assert st.result() == 130
    closed = PtyState()
    with pytest.raises(errors.CorralError, match="closed"):
        closed.result()


def test_refused_websocket_handshake_maps_the_error_body() -> None:
    from websockets.datastructures import Headers
    from websockets.exceptions import InvalidStatus
    from websockets.http11 import Response

    from corral.sdk._wire import error_from_ws_open

    body = json.dumps({"error": {"code": "not_found", "message": "no sandbox 'x'"}}).encode()
    err = error_from_ws_open(InvalidStatus(Response(404, "Not Found", Headers(), body)), "ws://h/x")
    assert isinstance(err, errors.NotFoundError) and err.message == "no sandbox 'x'"
    refused = error_from_ws_open(ConnectionRefusedError(111, "refused"), "ws://h/x")
    assert type(refused) is errors.CorralError and "ws://h/x" in refused.message
