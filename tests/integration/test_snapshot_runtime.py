"""Container snapshots capture a running sandbox's files at one instant (unsynced writes too),
start forks in other id ranges with ownership intact, restore a hibernated sandbox's disk
atomically, leave a running sandbox running and a paused one paused, and never let a sandbox's
planted symlinks steer the host's writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import ConflictError, InvalidRequestError
from corral.runtime import ContainerRuntime, SandboxSpec
from tests.conftest import requires_container, sandbox_run

pytestmark = [pytest.mark.integration, requires_container]


async def _sh(rt: ContainerRuntime, sid: str, script: str) -> str:
    res = await sandbox_run(rt, sid, ["/bin/sh", "-c", script])
    assert res.exit_code == 0, res
    return res.out


async def test_snapshot_then_fork_into_another_range(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    await rt.create(SandboxSpec("it-src", (minimal_rootfs,), hostname="it-src"))
    forks: list[str] = []
    try:
        # Not synced on purpose: the snapshot must hold what was written, not what was flushed.
        await _sh(
            rt,
            "it-src",
            "echo one > /root/a && mkdir /home/u && echo mine > /home/u/f"
            " && chown -R 1000:1000 /home/u",
        )
        size = await rt.snapshot("it-src", "snap-a")
        assert size > 0
        with pytest.raises(ConflictError):
            await rt.snapshot("it-src", "snap-a")
        await _sh(rt, "it-src", "echo two > /root/a")
        await rt.pause("it-src")
        await rt.snapshot("it-src", "snap-paused")  # a frozen sandbox can be snapshotted too
        await rt.resume("it-src")
        assert await rt.list_snapshots() == ["snap-a", "snap-paused"]

        for n in range(2):
            sid = f"it-fork{n}"
            await rt.create(SandboxSpec(sid, (minimal_rootfs,), hostname=sid, snapshot="snap-a"))
            forks.append(sid)
            out = await _sh(rt, sid, "cat /root/a; stat -c %u:%g /home/u/f; hostname")
            assert out.split() == ["one", "1000:1000", sid]
        await _sh(rt, "it-fork0", "echo forked > /root/a")
        assert (await _sh(rt, "it-fork1", "cat /root/a")).strip() == "one"
        assert (await _sh(rt, "it-src", "cat /root/a")).strip() == "two"
        meta = [(rt.data_dir / "sandboxes" / s / "meta.json").read_text() for s in forks]
        assert meta[0] != meta[1]  # each its own id range
    finally:
        for sid in ["it-src", *forks]:
            await rt.destroy(sid)
    # Snapshots outlive their sandbox until deleted.
    assert await rt.list_snapshots() == ["snap-a", "snap-paused"]
    for snap in ("snap-a", "snap-paused"):
        await rt.delete_snapshot(snap)
    await rt.delete_snapshot("snap-a")  # idempotent
    assert await rt.list_snapshots() == []


async def test_restore_gives_back_the_snapshot_disk(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    spec = SandboxSpec("it-rb", (minimal_rootfs,), hostname="it-rb")
    await rt.create(spec)
    try:
        await _sh(rt, "it-rb", "echo v1 > /root/v")
        await rt.snapshot("it-rb", "snap-rb")
        await _sh(rt, "it-rb", "echo v2 > /root/v && touch /root/later")
        with pytest.raises(ConflictError):
            await rt.restore_disk("it-rb", "snap-rb")  # running: hibernate first
        await rt.hibernate("it-rb")
        with pytest.raises(InvalidRequestError):
            await rt.restore_disk("it-rb", "snap-none")
        await rt.restore_disk("it-rb", "snap-rb")
        await rt.wake(spec)
        assert (await _sh(rt, "it-rb", "cat /root/v; ls /root")).split() == ["v1", "v"]
    finally:
        await rt.destroy("it-rb")
        await rt.delete_snapshot("snap-rb")


async def test_snapshot_leaves_running_running_and_paused_paused(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    await rt.create(SandboxSpec("it-frz", (minimal_rootfs,)))
    try:
        freezer = rt._freezer_state("it-frz")
        await rt.snapshot("it-frz", "snap-frz1")
        assert freezer.read_text().strip() == "THAWED"
        await rt.pause("it-frz")
        await rt.snapshot("it-frz", "snap-frz2")
        assert freezer.read_text().strip() == "FROZEN"
        await rt.resume("it-frz")
        assert (await _sh(rt, "it-frz", "echo ok > /root/x && cat /root/x")) == "ok\n"
    finally:
        await rt.destroy("it-frz")
        for snap in ("snap-frz1", "snap-frz2"):
            await rt.delete_snapshot(snap)


async def test_planted_symlinks_do_not_steer_identity_writes(
    container_runtime: ContainerRuntime, minimal_rootfs: Path, tmp_path: Path
) -> None:
    rt = container_runtime
    target = tmp_path / "host-side"
    target.mkdir()
    await rt.create(SandboxSpec("it-evil", (minimal_rootfs,)))
    try:
        # /etc/hosts and /etc/hostname become links to host paths, then /etc itself does.
        await _sh(
            rt,
            "it-evil",
            f"rm -f /etc/hosts /etc/hostname && ln -s {target}/hosts /etc/hosts"
            f" && ln -s {target}/hostname /etc/hostname",
        )
        await rt.snapshot("it-evil", "snap-evil1")
        await _sh(rt, "it-evil", f"mv /etc /etc.old && /etc.old/../bin/ln -s {target} /etc")
        await rt.snapshot("it-evil", "snap-evil2")
    finally:
        await rt.destroy("it-evil")
    try:
        for snap in ("snap-evil1", "snap-evil2"):
            sid = f"it-{snap}"
            await rt.create(SandboxSpec(sid, (minimal_rootfs,), hostname=sid, snapshot=snap))
            try:
                assert (await _sh(rt, sid, "cat /etc/hostname")).strip() == sid
            finally:
                await rt.destroy(sid)
        assert list(target.iterdir()) == []
    finally:
        for snap in ("snap-evil1", "snap-evil2"):
            await rt.delete_snapshot(snap)
