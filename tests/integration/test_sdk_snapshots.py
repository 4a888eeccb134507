"""Snapshots, restore and fork through the SDK, against a real server and real sandboxes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from corral import AsyncSandbox, Sandbox, errors
from corral.sdk.models import Snapshot
from tests.conftest import Conn

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

TEMPLATE = "minimal"


class Made:
    """What a test made, killed and deleted at its end whatever happened."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.sandboxes: list[Sandbox] = []
        self.snapshots: list[str] = []

    def sandbox(self, sbx: Sandbox) -> Sandbox:
        self.sandboxes.append(sbx)
        return sbx

    def create(self, template: str | None = TEMPLATE, **kw: object) -> Sandbox:
        return self.sandbox(Sandbox.create(template, timeout=600, **self.conn, **kw))  # type: ignore[arg-type]

    def fork(self, snap: Snapshot | str, count: int, **kw: object) -> list[Sandbox]:
        forks = Sandbox.fork(snap, count, **self.conn, **kw)  # type: ignore[arg-type]
        self.sandboxes.extend(forks)
        return forks

    def snapshot(self, sbx: Sandbox, name: str | None = None) -> Snapshot:
        snap = sbx.snapshot(name)
        self.snapshots.append(snap.id)
        return snap

    def cleanup(self) -> None:
        for sbx in self.sandboxes:
            with contextlib.suppress(errors.NotFoundError):
                sbx.kill()
            sbx.close()
        for snapshot_id in self.snapshots:
            with contextlib.suppress(errors.NotFoundError):
                Sandbox.delete_snapshot(snapshot_id, **self.conn)


@pytest.fixture
def made(conn: Conn) -> Iterator[Made]:
    m = Made(conn)
    try:
        yield m
    finally:
        m.cleanup()


def _read(sbx: Sandbox, path: str) -> str | None:
    return sbx.files.read(path) if sbx.files.exists(path) else None


def test_snapshot_write_more_restore_brings_the_files_back(made: Made) -> None:
    sbx = made.create()
    sbx.files.write("/root/state", "v1\n")
    snap = made.snapshot(sbx, "v1")
    assert (snap.name, snap.sandbox_id, snap.template) == ("v1", sbx.id, TEMPLATE)
    assert snap.id.startswith("snap-") and snap.disk_mb > 0 and snap.size_bytes > 0
    assert abs(datetime.now(UTC) - snap.created_at) < timedelta(minutes=5)

    sbx.files.write("/root/state", "v2\n")
    sbx.files.write("/root/later", "written after the snapshot\n")
    sbx.restore(snap)
    assert _read(sbx, "/root/state") == "v1\n"
    assert _read(sbx, "/root/later") is None
    info = sbx.info()
    assert info.state == "running" and info.id == sbx.id
    assert sbx.exec("echo alive").stdout == "alive\n"

    # By name too, and as often as wanted: the snapshot itself is not changed by a restore.
    sbx.files.write("/root/state", "v3\n")
    sbx.restore("v1")
    assert _read(sbx, "/root/state") == "v1\n"
    assert [s.id for s in sbx.snapshots()] == [snap.id]


def test_restore_starts_the_processes_afresh(made: Made) -> None:
    sbx = made.create()
    snap = made.snapshot(sbx)
    proc = sbx.exec("sleep 1000", background=True)
    assert any(p.pid == proc.pid and p.running for p in sbx.processes.list())
    sbx.restore(snap)
    assert not any(p.running and "sleep" in " ".join(p.cmd) for p in sbx.processes.list())


def test_names_default_to_the_id_and_are_unique_per_sandbox(made: Made) -> None:
    sbx = made.create()
    unnamed = made.snapshot(sbx)
    assert unnamed.name == unnamed.id
    named = made.snapshot(sbx, "same")
    with pytest.raises(errors.ConflictError):
        made.snapshot(sbx, "same")
    # Another sandbox may use the name.
    other = made.create()
    assert made.snapshot(other, "same").name == "same"
    assert [s.id for s in sbx.snapshots()] == [named.id, unnamed.id]  # newest first


def test_a_paused_sandbox_can_be_snapshotted(made: Made) -> None:
    sbx = made.create()
    sbx.files.write("/root/f", "paused\n")
    sbx.pause()
    snap = made.snapshot(sbx)
    (fork,) = made.fork(snap, 1)
    assert _read(fork, "/root/f") == "paused\n"


def test_fork_three_each_see_the_files_and_are_independent(made: Made) -> None:
    tag = os.urandom(4).hex()
    src = made.create(metadata={"t": tag})
    src.files.write("/root/shared", "from the snapshot\n")
    snap = made.snapshot(src, "base-state")
    src.files.write("/root/shared", "changed in the source later\n")

    forks = made.fork(snap, 3)
    assert len({f.id for f in forks} | {src.id}) == 4
    for i, fork in enumerate(forks):
        info = fork.info()
        assert info.state == "running"
        assert info.template == TEMPLATE and info.metadata == {"t": tag}  # the source's settings
        assert _read(fork, "/root/shared") == "from the snapshot\n"
        fork.files.write("/root/mine", f"fork {i}\n")
    for i, fork in enumerate(forks):
        assert _read(fork, "/root/mine") == f"fork {i}\n"
    assert _read(src, "/root/mine") is None
    assert _read(src, "/root/shared") == "changed in the source later\n"


def test_fork_overrides_timeout_metadata_and_env(made: Made) -> None:
    src = made.create(metadata={"a": "1"}, env={"FROM": "source"})
    snap = made.snapshot(src)
    (fork,) = made.fork(snap, 1, timeout=123, metadata={"b": "2"}, env={"FROM": "fork"})
    info = fork.info()
    assert info.timeout == 123 and info.metadata == {"b": "2"}
    assert fork.exec("echo $FROM").stdout == "fork\n"
    (plain,) = made.fork(snap, 1)
    assert plain.info().metadata == {"a": "1"}
    assert plain.exec("echo $FROM").stdout == "source\n"


def test_fork_count_zero_or_negative_is_refused(made: Made, conn: Conn) -> None:
    src = made.create()
    snap = made.snapshot(src)
    before = {s.id for s in Sandbox.list(state="running", **conn)}
    for count in (0, -1):
        with pytest.raises(errors.InvalidRequestError, match="count"):
            made.fork(snap, count)
    assert {s.id for s in Sandbox.list(state="running", **conn)} <= before  # nothing created


def test_create_from_a_snapshot(made: Made) -> None:
    src = made.create()
    src.files.write("/root/seed", "seeded\n")
    snap = made.snapshot(src)
    sbx = made.create(None, snapshot=snap)
    assert sbx.info().template == TEMPLATE
    assert _read(sbx, "/root/seed") == "seeded\n"
    by_id = made.create(None, snapshot=snap.id)
    assert _read(by_id, "/root/seed") == "seeded\n"


def test_list_get_delete_and_a_deleted_snapshot_is_gone(made: Made, conn: Conn) -> None:
    sbx = made.create()
    sbx.files.write("/root/state", "now\n")
    first = made.snapshot(sbx, "first")
    second = made.snapshot(sbx, "second")
    assert [s.id for s in Sandbox.list_snapshots(sbx.id, **conn)] == [second.id, first.id]
    assert {first.id, second.id} <= {s.id for s in Sandbox.list_snapshots(**conn)}
    assert Sandbox.get_snapshot(first.id, **conn) == first

    Sandbox.delete_snapshot(first, **conn)
    with pytest.raises(errors.NotFoundError):
        Sandbox.get_snapshot(first.id, **conn)
    with pytest.raises(errors.NotFoundError):
        Sandbox.delete_snapshot(first.id, **conn)
    assert [s.id for s in sbx.snapshots()] == [second.id]

    # Restoring or forking a deleted snapshot fails and changes nothing.
    sbx.files.write("/root/state", "unchanged\n")
    for ref in (first, first.id, "first"):
        with pytest.raises(errors.NotFoundError):
            sbx.restore(ref)
    with pytest.raises(errors.NotFoundError):
        made.fork(first, 1)
    with pytest.raises(errors.NotFoundError):
        made.create(None, snapshot=first.id)
    assert _read(sbx, "/root/state") == "unchanged\n"
    assert sbx.info().state == "running"


def test_snapshots_outlive_their_sandbox(made: Made, conn: Conn) -> None:
    sbx = made.create()
    sbx.files.write("/root/keep", "kept\n")
    snap = made.snapshot(sbx)
    sbx.kill()
    assert [s.id for s in sbx.snapshots()] == [snap.id]
    assert [s.id for s in Sandbox.list_snapshots(sbx.id, **conn)] == [snap.id]
    (fork,) = made.fork(snap, 1)
    assert _read(fork, "/root/keep") == "kept\n"
    with pytest.raises(errors.ConflictError):
        made.snapshot(sbx, "too-late")


async def test_async_snapshot_restore_fork(conn: Conn) -> None:
    forks: list[AsyncSandbox] = []
    snap: Snapshot | None = None
    async with await AsyncSandbox.create(TEMPLATE, timeout=600, **conn) as sbx:
        try:
            await sbx.files.write("/root/a", "one\n")
            snap = await sbx.snapshot("one")
            await sbx.files.write("/root/a", "two\n")
            await sbx.restore("one")
            assert await sbx.files.read("/root/a") == "one\n"
            assert [s.id for s in await sbx.snapshots()] == [snap.id]
            forks = await AsyncSandbox.fork(snap, 2, **conn)
            for fork in forks:
                assert await fork.files.read("/root/a") == "one\n"
            with pytest.raises(errors.InvalidRequestError):
                await AsyncSandbox.fork(snap, 0, **conn)
            assert (await AsyncSandbox.get_snapshot(snap.id, **conn)).name == "one"
        finally:
            for fork in forks:
                with contextlib.suppress(errors.NotFoundError):
                    await fork.kill()
                await fork.close()
            if snap is not None:
                await AsyncSandbox.delete_snapshot(snap, **conn)
    assert snap is not None
    assert snap.id not in {s.id for s in await AsyncSandbox.list_snapshots(**conn)}
