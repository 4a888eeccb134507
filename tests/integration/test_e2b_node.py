"""The official ``e2b`` npm package (JS SDK), unchanged, against a real corral server: create, commands, files, kill."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

NODE_DIR = Path(__file__).parent / "e2b_node"


def test_js_sdk_create_commands_files(server: RunningServer, e2b_env: str) -> None:
    node = shutil.which("node")
    assert node is not None, "node is installed by scripts/install-deps.sh"
    assert (NODE_DIR / "node_modules" / "e2b").is_dir(), "run `make e2b-node` (make test does)"
    r = subprocess.run(
        [node, "e2b_check.mjs"], cwd=NODE_DIR, capture_output=True, text=True, timeout=180
    )
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen["stdout"] == "hej\nuser\n"
    assert seen["files"] == ["bytes.bin", "hello.txt"]
    with server.client() as c:
        assert c.get(f"/v1/sandboxes/{seen['sandboxId']}").json()["state"] == "stopped"
