"""The E2B edge's pure parts: Connect envelopes both ways, allowOut/denyOut as corral policies, and signed file URLs as the SDK signs them."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

from corral.api.e2b import connect
from corral.api.e2b.connect import ConnectError
from corral.api.e2b.control import _Network, network_policy
from corral.core.envd import EnvdService, User, _parse_group, _parse_passwd
from corral.errors import InvalidRequestError, NotFoundError


def _request(body_chunks: list[bytes], content_type: str) -> Request:
    chunks = list(body_chunks)

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/x",
        "headers": [(b"content-type", content_type.encode())],
        "query_string": b"",
    }
    return Request(scope, receive)


def _env(flags: int, message: dict[str, Any]) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


async def test_envelopes_split_anywhere_are_read_whole() -> None:
    wire = _env(0, {"a": 1}) + _env(0, {"b": "two"}) + _env(2, {})
    # One byte at a time: a message may straddle any number of body chunks.
    req = _request([wire[i : i + 1] for i in range(len(wire))], connect.STREAM_TYPE)
    assert [m async for m in connect.read_envelopes(req)] == [{"a": 1}, {"b": "two"}]


async def test_bad_streams_are_connect_errors() -> None:
    with pytest.raises(ConnectError) as e:
        [m async for m in connect.read_envelopes(_request([b"{}"], "application/json"))]
    assert e.value.code == "invalid_argument"
    truncated = _env(0, {"a": 1})[:-2]
    with pytest.raises(ConnectError, match="inside a message"):
        [m async for m in connect.read_envelopes(_request([truncated], connect.STREAM_TYPE))]
    compressed = struct.pack(">BI", 1, 2) + b"{}"
    with pytest.raises(ConnectError) as e:
        [m async for m in connect.read_envelopes(_request([compressed], connect.STREAM_TYPE))]
    assert e.value.code == "unimplemented"
    huge = struct.pack(">BI", 0, 64 << 20)
    with pytest.raises(ConnectError) as e:
        [m async for m in connect.read_envelopes(_request([huge], connect.STREAM_TYPE))]
    assert e.value.code == "resource_exhausted"


async def _body(response: Any) -> bytes:
    out = b""
    async for chunk in response.body_iterator:
        out += chunk
    return out


async def test_stream_response_ends_with_the_error_that_ended_it() -> None:
    async def messages() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        raise NotFoundError("no process 7")

    raw = await _body(connect.stream_response(messages()))
    frames = []
    while raw:
        flags, length = struct.unpack(">BI", raw[:5])
        frames.append((flags, json.loads(raw[5 : 5 + length])))
        raw = raw[5 + length :]
    assert frames == [
        (0, {"n": 1}),
        (2, {"error": {"code": "not_found", "message": "no process 7"}}),
    ]


async def test_unary_maps_domain_errors_to_connect_codes() -> None:
    async def handler(_m: dict[str, Any]) -> dict[str, Any]:
        raise InvalidRequestError("depth must be positive")

    r = await connect.unary(_request([b"{}"], "application/json"), handler)
    assert r.status_code == 400
    assert json.loads(r.body) == {"code": "invalid_argument", "message": "depth must be positive"}
    r = await connect.unary(_request([b"[1]"], "application/json"), handler)
    assert r.status_code == 400 and b"JSON object" in r.body


def test_e2b_network_settings_as_corral_policies() -> None:
    assert network_policy(None, None) == {"preset": "public"}
    assert network_policy(False, None) == {}
    everything_but = network_policy(None, _Network(denyOut=["198.51.100.11", "bad.example"]))
    assert everything_but == {
        "preset": "public",
        "deny": [{"cidr": "198.51.100.11/32"}, {"domain": "bad.example"}],
    }
    allowlist = network_policy(
        None, _Network(denyOut=["0.0.0.0/0"], allowOut=["a.test", "1.2.3.0/24"])
    )
    assert allowlist == {"allow": [{"domain": "a.test"}, {"cidr": "1.2.3.0/24"}]}
    # E2B lets allowOut reopen part of denyOut; corral's deny always wins, so that is refused.
    with pytest.raises(InvalidRequestError, match="denyOut"):
        network_policy(None, _Network(denyOut=["10.0.0.0/8"], allowOut=["10.1.2.3"]))
    with pytest.raises(InvalidRequestError, match="denyOut"):
        network_policy(None, _Network(denyOut=["*.github.com"], allowOut=["api.github.com"]))
    # Names that only share letters do not overlap.
    assert network_policy(None, _Network(denyOut=["hub.com"], allowOut=["github.com"]))["deny"]
    with pytest.raises(InvalidRequestError, match="not supported"):
        network_policy(None, _Network(dnsServers=["1.1.1.1"]))


def test_signatures_match_what_the_sdk_computes(tmp_path: Path) -> None:
    signature = pytest.importorskip("e2b.sandbox.signature")
    svc = EnvdService(tmp_path, sandboxes=None)  # type: ignore[arg-type]
    svc.start()
    assert (tmp_path / "envd-token.key").stat().st_mode & 0o777 == 0o600
    token = svc.token("sb-1")
    assert token != svc.token("sb-2")
    for user, seconds in ((None, None), ("root", 60)):
        want = signature.get_signature("/tmp/x", "write", user, token, seconds)
        got = svc.signature("sb-1", "/tmp/x", "write", user or "", want["expiration"])
        assert got == want["signature"]
    # The key survives a restart, and so do the tokens made from it.
    again = EnvdService(tmp_path, sandboxes=None)  # type: ignore[arg-type]
    again.start()
    assert again.token("sb-1") == token


def test_accounts_and_paths() -> None:
    users, by_uid = _parse_passwd(
        "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/bash\nbroken\n"
    )
    assert users["user"] == User("user", 1000, 1000, "/home/user") and by_uid[0] == "root"
    assert _parse_group("root:x:0:\nuser:x:1000:\n") == {0: "root", 1000: "user"}
    home = users["user"]
    assert EnvdService.resolve("notes.txt", home) == "/home/user/notes.txt"
    assert EnvdService.resolve("~/a", home) == "/home/user/a"
    assert EnvdService.resolve("/etc", home) == "/etc"
    with pytest.raises(InvalidRequestError):
        EnvdService.resolve("a\0b", home)
