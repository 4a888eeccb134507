"""Integration tests share the session server and leak check defined in tests/conftest.py, and
the CLI tests share the environment that points the ``corral`` command at that server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import container_skip_reason, microvm_skip_reason
from tests.integration.server_harness import RunningServer


@pytest.fixture
def env(server: RunningServer, tmp_path: Path) -> dict[str, str]:
    """Environment for running ``corral`` against the session server (and nothing else)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    out.update(
        CORRAL_URL=server.url,
        CORRAL_API_KEY=server.admin_key,
        CORRAL_DATA_DIR=str(tmp_path / "unused"),
    )
    return out


@pytest.fixture
def vm_api(server: RunningServer) -> Iterator[httpx.Client]:
    """An HTTP client of the session server for tests of the microvm tier (skipped where it
    cannot run), with a timeout a VM's slower operations fit in."""
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    with server.client(timeout=180) as c:
        yield c


@pytest.fixture
def template_api(server: RunningServer) -> Iterator[httpx.Client]:
    """An HTTP client of the session server for template tests; afterwards every sandbox and
    user template the test made is gone and unused layers are collected."""
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with server.client(timeout=300) as c:
        yield c
        for sb in c.get("/v1/sandboxes").json():
            c.delete(f"/v1/sandboxes/{sb['id']}")
        for t in c.get("/v1/templates").json():
            if not t["builtin"]:
                c.delete(f"/v1/templates/{t['name']}")
        c.post("/v1/templates/gc")


def point_e2b_at(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """The three variables an E2B user sets to move to corral; nothing else changes."""
    monkeypatch.setenv("E2B_API_KEY", server.admin_key)
    monkeypatch.setenv("E2B_API_URL", server.url)
    monkeypatch.setenv("E2B_SANDBOX_URL", server.url)
    return server.url


@pytest.fixture
def e2b_env(server: RunningServer, base_template: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """E2B's SDKs (and the `e2b` npm package run from here) pointed at the session server, whose
    `base` template is E2B's default."""
    return point_e2b_at(server, monkeypatch)
