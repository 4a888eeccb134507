"""Pause, resume and the idle policy through the SDK, against a real server and real sandboxes
(what the runtime does — freeze, thaw, CPU accounting, teardown — on both isolation tiers)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from corral import AsyncSandbox, Sandbox, errors
from corral.sdk.models import SandboxInfo
from tests.conftest import Conn
from tests.integration.tiers import container_only, sdk_args

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

TEMPLATE = "minimal"
# Writes its count ten times a second; renamed into place so a reader never sees a half write.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; sleep 0.1; done"
)

T = TypeVar("T")


@pytest.fixture
def sbx(conn: Conn, isolation: dict[str, Any]) -> Iterator[Sandbox]:
    with Sandbox.create(TEMPLATE, timeout=600, **sdk_args(isolation), **conn) as s:
        yield s


def _until(probe: Callable[[], T | None], timeout: float, what: str, step: float = 0.2) -> T:
    """Poll ``probe`` until it answers something; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(step)


def _in_state(sbx: Sandbox, state: str) -> Callable[[], SandboxInfo | None]:
    def probe() -> SandboxInfo | None:
        info = sbx.info()
        return info if info.state == state else None

    return probe


def _count(sbx: Sandbox) -> int:
    return int(sbx.files.read("/tmp/n").strip())


# ---------------------------------------------------------------- pause and resume


def test_pause_then_exec_resumes_by_itself(sbx: Sandbox) -> None:
    info = sbx.pause()
    assert info.state == "paused" and info.paused
    assert info.paused_at is not None and info.expires_at is None
    assert sbx.info().state == "paused"
    assert sbx.exec("echo back").stdout == "back\n"  # auto_resume is on by default
    after = sbx.info()
    assert after.state == "running" and after.paused_at is None and after.expires_at is not None


def test_file_and_process_calls_resume_too(sbx: Sandbox) -> None:
    sbx.pause()
    sbx.files.write("/tmp/x", "written while paused")
    assert sbx.info().state == "running"
    sbx.pause()
    assert sbx.files.read("/tmp/x") == "written while paused"
    sbx.pause()
    assert isinstance(sbx.processes.list(), list)
    assert sbx.info().state == "running"


@container_only
def test_pause_twice_conflicts_and_resume_of_a_running_one_is_harmless(sbx: Sandbox) -> None:
    sbx.pause()
    with pytest.raises(errors.ConflictError, match="already paused") as caught:
        sbx.pause()
    assert type(caught.value) is errors.ConflictError  # not SandboxNotRunningError
    assert sbx.resume().state == "running"
    again = sbx.resume()
    assert again.state == "running" and again.expires_at is not None


def test_pause_or_resume_of_a_killed_sandbox_is_refused(conn: Conn) -> None:
    sbx = Sandbox.create(TEMPLATE, timeout=600, **conn)
    try:
        sbx.kill()
        with pytest.raises(errors.SandboxNotRunningError):
            sbx.pause()
        with pytest.raises(errors.SandboxNotRunningError):
            sbx.resume()
    finally:
        sbx.close()


def test_kill_of_a_paused_sandbox_cleans_up(conn: Conn, isolation: dict[str, Any]) -> None:
    sbx = Sandbox.create(TEMPLATE, timeout=600, **sdk_args(isolation), **conn)
    try:
        sbx.exec(COUNTER, background=True)
        sbx.pause()
        sbx.kill()
        assert sbx.info().state == "stopped"
    finally:
        sbx.close()
    # server_no_leaks checks that nothing of it is left on the host.


def test_a_paused_process_does_not_advance_and_continues_after_resume(
    conn: Conn, isolation: dict[str, Any]
) -> None:
    with Sandbox.create(
        TEMPLATE, timeout=600, auto_resume=False, **sdk_args(isolation), **conn
    ) as sbx:
        assert sbx.info().auto_resume is False
        sbx.exec(COUNTER, background=True)
        _until(lambda: _count(sbx) if sbx.files.exists("/tmp/n") else None, 10, "a first count")
        time.sleep(0.5)
        sbx.pause()
        # A paused sandbox with auto_resume off refuses calls instead of resuming.
        with pytest.raises(errors.SandboxNotRunningError):
            sbx.files.read("/tmp/n")
        with pytest.raises(errors.SandboxNotRunningError):
            sbx.exec("true")
        with pytest.raises(errors.SandboxNotRunningError):
            sbx.processes.list()
        assert sbx.info().state == "paused"  # and those calls did not resume it
        # Resume just to read the count, pause again: that count is where it froze.
        sbx.resume()
        frozen = _count(sbx)
        sbx.pause()
        time.sleep(2)  # 20 counts if the counter still ran
        sbx.resume()
        after = _count(sbx)
        assert frozen <= after <= frozen + 4, (frozen, after)
        assert frozen >= 5  # it had been counting before: it continues, it did not restart
        time.sleep(1)
        assert _count(sbx) >= after + 5  # and counts on


@container_only
def test_the_timeout_clock_stops_while_paused(sbx: Sandbox) -> None:
    before = sbx.info().expires_at
    assert before is not None
    paused = sbx.pause()
    assert paused.expires_at is None and sbx.info().expires_at is None
    time.sleep(2)
    resumed = sbx.resume()
    assert resumed.expires_at is not None and resumed.paused_at is None
    # The lifetime left at the pause continues: the expiry moved by the time spent paused.
    moved = (resumed.expires_at - before).total_seconds()
    assert 1.5 <= moved <= 5, moved


@container_only
def test_paused_sandboxes_are_listed_by_state(conn: Conn, sbx: Sandbox) -> None:
    tag = os.urandom(4).hex()
    with Sandbox.create(TEMPLATE, timeout=600, metadata={"t": tag}, **conn) as other:
        other.pause()
        assert [s.id for s in Sandbox.list(state="paused", metadata={"t": tag}, **conn)] == [
            other.id
        ]
        assert Sandbox.list(state="running", metadata={"t": tag}, **conn) == []


# ---------------------------------------------------------------- idle and timeout policy


def test_idle_sandbox_is_paused_and_the_next_exec_resumes_it(
    conn: Conn, isolation: dict[str, Any]
) -> None:
    with Sandbox.create(
        TEMPLATE, timeout=600, idle_timeout=2, on_idle="pause", **sdk_args(isolation), **conn
    ) as sbx:
        info = sbx.info()
        assert (info.idle_timeout, info.on_idle, info.auto_resume) == (2, "pause", True)
        start = time.monotonic()
        paused = _until(_in_state(sbx, "paused"), 15, "the idle pause")
        assert time.monotonic() - start <= 10
        assert paused.expires_at is None and paused.paused_at is not None
        assert sbx.exec("echo awake").stdout == "awake\n"
        assert sbx.info().state == "running"


def test_a_busy_background_process_keeps_it_from_idling(
    conn: Conn, isolation: dict[str, Any]
) -> None:
    with Sandbox.create(
        TEMPLATE, timeout=600, idle_timeout=2, **sdk_args(isolation), **conn
    ) as sbx:
        sbx.exec("while :; do :; done", background=True)  # a whole core: not idle
        time.sleep(8)
        assert sbx.info().state == "running"


# The policies below are the service's (the runtime only pauses, as above): containers only.


def test_idle_kill_stops_it(conn: Conn) -> None:
    with Sandbox.create(TEMPLATE, timeout=600, idle_timeout=2, on_idle="kill", **conn) as sbx:
        gone = _until(_in_state(sbx, "stopped"), 15, "the idle kill")
        assert gone.state == "stopped"


def test_timeout_pause_pauses_instead_of_killing_and_resume_grants_a_fresh_timeout(
    conn: Conn,
) -> None:
    with Sandbox.create(TEMPLATE, timeout=2, on_timeout="pause", **conn) as sbx:
        assert sbx.info().on_timeout == "pause"
        sbx.exec("echo kept > /tmp/state")
        start = time.monotonic()
        paused = _until(_in_state(sbx, "paused"), 10, "the timeout pause")
        assert 1.5 <= time.monotonic() - start <= 6
        assert paused.expires_at is None
        resumed = sbx.resume()
        assert resumed.state == "running" and resumed.expires_at is not None
        left = (resumed.expires_at - datetime.now(UTC)).total_seconds()
        assert 1.0 <= left <= 2.5, left  # the whole timeout again, not what was left (nothing)
        assert sbx.files.read("/tmp/state") == "kept\n"


# ---------------------------------------------------------------- asyncio


async def test_async_pause_resume_and_auto_resume(conn: Conn) -> None:
    async with await AsyncSandbox.create(TEMPLATE, timeout=600, **conn) as sbx:
        paused = await sbx.pause()
        assert paused.state == "paused" and paused.expires_at is None
        with pytest.raises(errors.ConflictError):
            await sbx.pause()
        assert (await sbx.resume()).state == "running"
        await sbx.pause()
        assert (await sbx.exec("echo hi")).stdout == "hi\n"
        assert (await sbx.info()).state == "running"


def test_following_a_background_process_keeps_it_from_idling(conn: Conn) -> None:
    with Sandbox.create(TEMPLATE, timeout=600, idle_timeout=2, **conn) as sbx:
        proc = sbx.exec("sleep 7; echo done", background=True)
        done: list[str] = []
        follower = threading.Thread(target=lambda: done.append(proc.wait().stdout), daemon=True)
        follower.start()
        try:
            follower.join(12)
            state = sbx.info().state
            assert done == ["done\n"], f"wait() still blocked after 12 s; sandbox {state}"
        finally:
            if follower.is_alive():
                sbx.resume()  # let the frozen follower finish before the sandbox goes
                follower.join(15)
