"""``corral pause|resume`` and the lifecycle flags of ``corral create``, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)


pytestmark = pytest.mark.integration

CORRAL = str(Path(sys.executable).with_name("corral"))
TEMPLATE = "minimal"


def corral(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [CORRAL, *args], env=env, capture_output=True, timeout=120, text=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, (args, proc.stderr)
    return proc


def _one_error(proc: subprocess.CompletedProcess[str], status: int) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def sid(env: dict[str, str]) -> Iterator[str]:
    sandbox_id = corral(env, "create", "--template", TEMPLATE, "--timeout", "600").stdout.strip()
    yield sandbox_id
    corral(env, "kill", sandbox_id, check=False)


def test_pause_resume_print_the_new_state(env: dict[str, str], sid: str) -> None:
    assert corral(env, "pause", sid).stdout == "paused\n"
    info = json.loads(corral(env, "info", sid, "--json").stdout)
    assert info["state"] == "paused" and info["expires_at"] is None and info["paused_at"]
    text = corral(env, "info", sid).stdout
    assert "paused" in text and "clock stopped" in text
    assert sid in corral(env, "ls", "--state", "paused").stdout

    again = corral(env, "pause", sid, check=False)
    assert "already paused" in _one_error(again, 1)

    resumed = json.loads(corral(env, "resume", sid, "--json").stdout)
    assert resumed["state"] == "running" and resumed["expires_at"] and resumed["paused_at"] is None
    assert corral(env, "resume", sid).stdout == "running\n"  # running already: answered as is

    # exec on a paused sandbox resumes it (auto-resume is on by default).
    corral(env, "pause", sid)
    assert corral(env, "exec", sid, "--", "echo hi").stdout == "hi\n"
    assert json.loads(corral(env, "info", sid, "--json").stdout)["state"] == "running"


def test_create_with_lifecycle_flags(env: dict[str, str]) -> None:
    tag = os.urandom(4).hex()
    created = json.loads(
        corral(
            env, "create", "--template", TEMPLATE, "--timeout", "600", "--metadata", f"t={tag}",
            "--on-timeout", "pause", "--idle-timeout", "300", "--on-idle", "kill",
            "--no-auto-resume", "--json",
        ).stdout
    )  # fmt: skip
    sandbox_id = created["id"]
    try:
        assert (
            created["on_timeout"],
            created["idle_timeout"],
            created["on_idle"],
            created["auto_resume"],
        ) == ("pause", 300, "kill", False)
        text = corral(env, "info", sandbox_id).stdout
        assert "kill after 300 s unused" in text

        corral(env, "pause", sandbox_id)
        listed = corral(env, "ls", "--metadata", f"t={tag}").stdout
        assert sandbox_id in listed and "paused" in listed
        # Without auto-resume a paused sandbox refuses work instead of resuming.
        refused = corral(env, "exec", sandbox_id, "--", "true", check=False)
        assert "paused" in _one_error(refused, 1)
        assert json.loads(corral(env, "info", sandbox_id, "--json").stdout)["state"] == "paused"
        corral(env, "resume", sandbox_id)
        assert corral(env, "exec", sandbox_id, "--", "echo ok").stdout == "ok\n"
    finally:
        corral(env, "kill", sandbox_id, check=False)


def test_idle_flags_pause_an_unused_sandbox(env: dict[str, str]) -> None:
    sandbox_id = corral(
        env, "create", "--template", TEMPLATE, "--timeout", "600", "--idle-timeout", "2"
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 15
        while json.loads(corral(env, "info", sandbox_id, "--json").stdout)["state"] != "paused":
            assert time.monotonic() < deadline, "not paused by the idle policy within 15 s"
            time.sleep(0.5)
    finally:
        corral(env, "kill", sandbox_id, check=False)


def test_bad_input_fails_cleanly(env: dict[str, str]) -> None:
    assert "sb-nope" in _one_error(corral(env, "pause", "sb-nope", check=False), 1)
    assert "sb-nope" in _one_error(corral(env, "resume", "sb-nope", check=False), 1)
    for args in (
        ["--on-timeout", "sleep"],
        ["--idle-timeout", "0"],
        ["--idle-timeout", "-5"],
        ["--on-idle", "snooze", "--idle-timeout", "5"],
        ["--on-idle", "kill"],
    ):
        _one_error(corral(env, "create", "--template", TEMPLATE, *args, check=False), 2)

    killed = corral(env, "create", "--template", TEMPLATE, "--timeout", "600").stdout.strip()
    corral(env, "kill", killed)
    assert "not running" in _one_error(corral(env, "pause", killed, check=False), 1)
