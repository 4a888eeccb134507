"""A recording mock server for SDK unit tests: no network, every request answered in-process."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from corral.sdk import _http as sdk_http
from corral.sdk import async_sandbox as async_mod
from corral.sdk import sandbox as sync_mod
from corral.sdk._config import ClientConfig

__all__ = [
    "Recorder",
    "cli_runner",
    "error_response",
    "ndjson_response",
    "one_error_line",
    "route_sdk_to",
    "tar_members",
]


class Recorder:
    """A mock server: answers each request with ``answer(request)`` and remembers the request."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        return self.answer(req)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]

    def routes(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]


def cli_runner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, key: str | None = "k"
) -> CliRunner:
    """A CLI runner reaching ``url`` with ``key`` (None: no key) and no data dir of its own."""
    if key is None:
        monkeypatch.delenv("CORRAL_API_KEY", raising=False)
    else:
        monkeypatch.setenv("CORRAL_API_KEY", key)
    monkeypatch.setenv("CORRAL_URL", url)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(tmp_path / "no-data-dir"))
    return CliRunner()


def one_error_line(stderr: str) -> str:
    """The CLI's one ``error: …`` line (and no traceback), as every failed command prints."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    return lines[0]


def error_response(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def route_sdk_to(
    monkeypatch: pytest.MonkeyPatch, answer: Callable[[httpx.Request], httpx.Response]
) -> Recorder:
    """Route every SDK client made from now on (create, connect and the classmethods make their
    own) to a recorder answering with ``answer``."""
    rec = Recorder(answer)
    sync_cls, async_cls = sdk_http.SyncHttp, sdk_http.AsyncHttp

    def sync_http(config: ClientConfig, **_: Any) -> sdk_http.SyncHttp:
        return sync_cls(config, transport=httpx.MockTransport(rec))

    def async_http(config: ClientConfig, **_: Any) -> sdk_http.AsyncHttp:
        return async_cls(config, transport=httpx.MockTransport(rec))

    monkeypatch.setattr(sync_mod, "SyncHttp", sync_http)
    monkeypatch.setattr(async_mod, "AsyncHttp", async_http)
    return rec


class _Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body arriving in the given pieces, for the blocking and the asyncio client."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = list(chunks)

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk


def ndjson_response(events: Iterable[Mapping[str, Any]], chunk_size: int = 0) -> httpx.Response:
    """A 200 NDJSON stream of ``events``; with ``chunk_size`` cut into pieces of that many bytes,
    so lines arrive split at arbitrary places as they do over a network."""
    data = b"".join(json.dumps(dict(e)).encode() + b"\n" for e in events)
    pieces = (
        [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
        if chunk_size
        else [data]
    )
    return httpx.Response(
        200, headers={"Content-Type": "application/x-ndjson"}, stream=_Chunks(pieces)
    )


def tar_members(body: bytes) -> dict[str, bytes | str | None]:
    """The members of a tar request body, in order: a file's bytes, None for a directory,
    ``"-> target"`` for a symlink."""
    out: dict[str, bytes | str | None] = {}
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for m in tar.getmembers():
            if m.isdir():
                out[m.name] = None
            elif m.issym():
                out[m.name] = f"-> {m.linkname}"
            else:
                f = tar.extractfile(m)
                out[m.name] = b"" if f is None else f.read()
    return out
