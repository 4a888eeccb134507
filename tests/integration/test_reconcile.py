"""After a server crash, running sandboxes are adopted again and orphans on the host are removed."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import container_skip_reason
from tests.integration.server_harness import (
    kill_all_sandboxes,
    release_data_dir,
    shared_templates_dir,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration


def test_crash_then_restart_adopts_and_cleans(tmp_path: Path) -> None:
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    templates = shared_templates_dir(tmp_path / "scratch")
    data = tmp_path / "data"
    data.mkdir()
    (data / "templates").symlink_to(templates)
    server = start_server(data)
    try:
        with server.client() as c:
            keep = c.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600}).json()[
                "id"
            ]
            orphan = c.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600}).json()[
                "id"
            ]
            c.post(f"/v1/sandboxes/{keep}/exec", json={"cmd": "echo kept > /tmp/mark"}).read()
        stop_server(server, hard=True)  # a crash: nothing torn down
        # The store forgets one sandbox: it is now an orphan that only the host knows about.
        with sqlite3.connect(data / "corral.db") as db:
            db.execute("DELETE FROM sandboxes WHERE id = ?", (orphan,))
        server = start_server(data)
        with server.client() as c:
            assert c.get(f"/v1/sandboxes/{keep}").json()["state"] == "running"
            r = c.post(f"/v1/sandboxes/{keep}/exec", json={"cmd": "cat /tmp/mark"})
            assert base64.b64encode(b"kept\n").decode() in r.text
            assert c.get(f"/v1/sandboxes/{orphan}").status_code == 404
        left = (
            {p.name for p in (data / "sandboxes").iterdir()}
            if (data / "sandboxes").exists()
            else set()
        )
        assert orphan not in left and keep in left
    finally:
        try:
            kill_all_sandboxes(server)
        finally:
            stop_server(server)
            release_data_dir(data)
