"""Fixtures for tests that talk to a real corral server over HTTP."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.integration.server_harness import RunningServer, running_server, shared_templates_dir


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, mounts)"
    if shutil.which("runc") is None:
        return "needs runc (make install)"
    return None


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    why = _why_not()
    if why:
        pytest.skip(why)
    scratch = tmp_path_factory.mktemp("corral-server")
    templates = shared_templates_dir(scratch)
    with running_server(scratch / "data", templates) as s:
        yield s
