"""The official ``e2b`` npm package (JS SDK), unchanged, against a real corral server: create, commands, files, kill."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

NODE_DIR = Path(__file__).parent / "e2b_node"


def test_js_sdk_create_commands_files(server: RunningServer, base_template: str) -> None:
    node = shutil.which("node")
    assert node is not None, "node is installed by scripts/install-deps.sh"
    assert (NODE_DIR / "node_modules" / "e2b").is_dir(), "run `make e2b-node` (make test does)"
    env = dict(
        os.environ,
        E2B_API_KEY=server.admin_key,
        E2B_API_URL=server.url,
        E2B_SANDBOX_URL=server.url,
    )
    r = subprocess.run(
        [node, "e2b_check.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["stdout"] == "hej\nuser\n"
    assert seen["files"] == ["bytes.bin", "hello.txt"]
    with server.client() as c:
        assert c.get(f"/v1/sandboxes/{seen['sandboxId']}").json()["state"] == "stopped"
