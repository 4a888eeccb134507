"""A recording mock server for SDK unit tests: no network, every request answered in-process."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from corral.sdk import _http as sdk_http
from corral.sdk import async_sandbox as async_mod
from corral.sdk import sandbox as sync_mod
from corral.sdk._config import ClientConfig

__all__ = ["Recorder", "error_response", "route_sdk_to"]


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
