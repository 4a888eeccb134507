"""The container runtime creates real sandboxes with their limits, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from corral.errors import ConflictError, CorralError, SandboxNotRunningError
from corral.runtime import ContainerRuntime, Runtime, SandboxSpec
from tests.conftest import LeakWatch, requires_container, sandbox_run

pytestmark = [pytest.mark.integration, requires_container]


def _tree_digest(root: Path) -> str:
    """Names, modes, owners, sizes, mtimes and contents of everything below ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(
                f"{p.relative_to(root)} {st.st_mode} {st.st_uid} {st.st_gid} {st.st_size} {st.st_mtime_ns}\n".encode()
            )
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def _meta(runtime: ContainerRuntime, sid: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(
        (runtime.data_dir / "sandboxes" / sid / "meta.json").read_text()
    )
    return meta


async def test_create_exec_destroy(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    assert isinstance(rt, Runtime)
    spec = SandboxSpec("it-basic", (minimal_rootfs,), hostname="box1", env={"FOO": "bar baz"})
    await rt.create(spec)
    try:
        assert await rt.is_running("it-basic")
        assert "it-basic" in await rt.list_sandboxes()
        res = await sandbox_run(
            rt, "it-basic", ["/bin/sh", "-c", "echo hi; id -u; hostname; echo $FOO"]
        )
        assert res.exit_code == 0, res
        assert res.out.split("\n")[:4] == ["hi", "0", "box1", "bar baz"]
        with pytest.raises(ConflictError):
            await rt.create(spec)
    finally:
        await rt.destroy("it-basic")
    assert not await rt.is_running("it-basic")
    assert "it-basic" not in await rt.list_sandboxes()
    with pytest.raises(SandboxNotRunningError):
        await rt.open_agent("it-basic")


async def test_template_untouched_and_root_owns_etc(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    before = _tree_digest(minimal_rootfs)
    await rt.create(SandboxSpec("it-layers", (minimal_rootfs,)))
    try:
        script = (
            "set -e; echo new > /etc/newfile; echo 'x:x:1000:1000::/:/bin/sh' >> /etc/passwd; "
            "rm /etc/shells; mkdir -p /root/work && touch /root/work/f; chmod 600 /etc/hostname; "
            "stat -c '%u:%g' /etc/passwd /etc/newfile /bin /; ls /etc"
        )
        res = await sandbox_run(rt, "it-layers", ["/bin/sh", "-c", script])
        assert res.exit_code == 0, res
        lines = res.out.split()
        assert lines[:4] == ["0:0"] * 4
        assert "newfile" in lines and "shells" not in lines
        # The writes are in the sandbox's upper layer, stored with the ids the sandbox sees (its
        # disk reaches the overlay through an idmapped mount), so a snapshot fits any id range;
        # the sandbox's processes run in its own host range.
        host_id = _meta(rt, "it-layers")["host_id"]
        upper = rt.data_dir / "sandboxes" / "it-layers" / "disk" / "upper"
        assert (upper / "etc" / "newfile").stat().st_uid == 0
        assert isinstance(host_id, int) and host_id >= 65536
        ids = await sandbox_run(rt, "it-layers", ["/bin/sh", "-c", "cat /proc/self/uid_map"])
        assert ids.out.split() == ["0", str(host_id), "65536"]
    finally:
        await rt.destroy("it-layers")
    assert _tree_digest(minimal_rootfs) == before


async def test_disk_limit_gives_enospc_inside_only(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    await rt.create(SandboxSpec("it-disk", (minimal_rootfs,), disk_mb=64))
    try:
        host_free = os.statvfs(rt.data_dir)
        res = await sandbox_run(
            rt, "it-disk", ["/bin/sh", "-c", "dd if=/dev/zero of=/fill bs=1M count=500; echo rc=$?"]
        )
        assert "No space left on device" in res.stderr.decode(), res
        assert "rc=1" in res.out
        used, total = rt.disk_usage("it-disk")
        assert total <= 64 * 1024 * 1024 and used <= total
        image = rt.data_dir / "pool" / "disks" / "it-disk.img"
        assert image.stat().st_blocks * 512 <= 64 * 1024 * 1024
        after = os.statvfs(rt.data_dir)
        assert (host_free.f_bavail - after.f_bavail) * after.f_frsize <= 80 * 1024 * 1024
        # Freeing space inside works again (the sandbox is not wedged).
        res = await sandbox_run(rt, "it-disk", ["/bin/sh", "-c", "rm /fill && echo ok > /after"])
        assert res.exit_code == 0, res
    finally:
        await rt.destroy("it-disk")


async def test_memory_pids_cpu_limits(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    await rt.create(SandboxSpec("it-limits", (minimal_rootfs,), memory_mb=64, pids_max=40, cpu=0.5))
    try:
        cgroups = [Path(p) for p in _meta(rt, "it-limits")["cgroups"]]
        mem = next(p for p in cgroups if "/memory/" in str(p))
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * 1024 * 1024
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 * 1024 * 1024
        pids = next(p for p in cgroups if "/pids/" in str(p))
        assert (pids / "pids.max").read_text().strip() == "40"
        cpu = next(p for p in cgroups if p.parent.name == "cpu" or "/cpu/" in str(p))
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 50000

        # 200 MB in a 64 MB sandbox: the allocating process is OOM-killed, the agent lives on.
        res = await sandbox_run(
            rt, "it-limits", ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"]
        )
        assert res.exit_code == 137, res
        assert "oom_kill 0" not in (mem / "memory.oom_control").read_text()
        # Forking past pids.max fails inside.
        res = await sandbox_run(
            rt, "it-limits", ["/bin/sh", "-c", "for i in $(seq 60); do sleep 5 & done; wait"]
        )
        assert "can't fork" in res.stderr.decode() or res.exit_code != 0, res
        assert await rt.is_running("it-limits")
        res = await sandbox_run(rt, "it-limits", ["/bin/echo", "alive"])
        assert res.out.strip() == "alive"
    finally:
        await rt.destroy("it-limits")


async def test_destroy_is_idempotent(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    await rt.destroy("it-never-existed")
    await rt.create(SandboxSpec("it-twice", (minimal_rootfs,)))
    await rt.destroy("it-twice")
    await rt.destroy("it-twice")
    assert await rt.list_sandboxes() == []


@pytest.mark.parametrize(
    "spec_kwargs",
    [
        pytest.param({"layers": (Path("/nonexistent/layer"),)}, id="missing-layer"),
        pytest.param({"memory_mb": 1}, id="absurd-memory"),
        pytest.param({"hostname": "h" * 100}, id="runc-refuses-hostname"),
        pytest.param({"env": {"A=B": "x"}}, id="bad-env"),
    ],
)
async def test_failed_create_leaves_nothing(
    container_runtime: ContainerRuntime, minimal_rootfs: Path, spec_kwargs: dict[str, object]
) -> None:
    rt = container_runtime
    rt.ready_timeout = 5
    kwargs: dict[str, object] = {"layers": (minimal_rootfs,), **spec_kwargs}
    with pytest.raises(CorralError):
        await rt.create(SandboxSpec("it-fail", **kwargs))  # type: ignore[arg-type]
    assert await rt.list_sandboxes() == []
    assert not await rt.is_running("it-fail")


async def test_crash_leftovers_are_found_and_removed(
    container_data_dir: Path, agent_binary: Path, minimal_rootfs: Path, no_leaks: LeakWatch
) -> None:
    first = ContainerRuntime(container_data_dir, agent_binary)
    no_leaks.watch(first.mount_dir)
    await first.create(SandboxSpec("it-crash", (minimal_rootfs,)))
    slot = _meta(first, "it-crash")["slot"]
    del first  # the server died without destroying anything

    second = ContainerRuntime(container_data_dir, agent_binary)
    assert await second.list_sandboxes() == ["it-crash"]
    assert await second.is_running("it-crash")
    res = await sandbox_run(second, "it-crash", ["/bin/echo", "still here"])
    assert res.out.strip() == "still here"
    # The uid range stays claimed across restarts: a new sandbox gets another one.
    await second.create(SandboxSpec("it-crash2", (minimal_rootfs,)))
    assert _meta(second, "it-crash2")["slot"] != slot
    await second.destroy("it-crash2")
    await second.destroy("it-crash")
    assert await second.list_sandboxes() == []


async def test_concurrent_creates_get_distinct_ranges(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    rt = container_runtime
    ids = [f"it-par{i}" for i in range(3)]
    try:
        await asyncio.gather(*(rt.create(SandboxSpec(i, (minimal_rootfs,))) for i in ids))
        hosts = {_meta(rt, i)["host_id"] for i in ids}
        assert len(hosts) == 3
        results = await asyncio.gather(
            *(sandbox_run(rt, i, ["/bin/cat", "/proc/self/uid_map"]) for i in ids)
        )
        maps = {r.out.split()[1] for r in results}
        assert maps == {str(h) for h in hosts}
    finally:
        await asyncio.gather(*(rt.destroy(i) for i in ids))


async def _df(runtime: object, sid: str) -> tuple[int, int]:
    """(used, size) bytes of / as ``df`` inside the sandbox says."""
    res = await sandbox_run(runtime, sid, ["/bin/df", "-k", "/"])
    assert res.exit_code == 0, res
    fields = res.out.splitlines()[-1].split()
    return int(fields[2]) * 1024, int(fields[1]) * 1024


async def test_usage_follows_memory_and_disk(
    container_runtime: ContainerRuntime, minimal_rootfs: Path
) -> None:
    from corral.agent import AgentClient, ExecRequest

    rt, sid, mib = container_runtime, "it-usage", 1024 * 1024
    await rt.create(SandboxSpec(sid, (minimal_rootfs,), memory_mb=256, disk_mb=256))
    try:
        before = await rt.usage(sid)
        assert before.memory_total == 256 * mib
        assert 0.85 * 256 * mib < before.disk_total <= 256 * mib
        assert 0 < before.memory_used < 32 * mib and before.cpu_seconds > 0
        # The disk as df inside sees it (overlayfs reports its upper filesystem).
        df_used, df_size = await _df(rt, sid)
        assert df_size == before.disk_total
        assert abs(df_used - (await rt.usage(sid)).disk_used) < mib

        # 64 MiB held by a process (dd's buffer, stuck writing into a pipe nobody reads).
        client = AgentClient(lambda: rt.open_agent(sid))
        await client.spawn(
            ExecRequest(argv=["/bin/sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 600"])
        )
        for _ in range(200):
            held = await rt.usage(sid)
            if held.memory_used >= before.memory_used + 60 * mib:
                break
            await asyncio.sleep(0.05)
        assert before.memory_used + 60 * mib <= held.memory_used < before.memory_used + 80 * mib
        assert held.cpu_seconds > before.cpu_seconds

        # A 20 MiB file: on the disk, and in the page cache charged to the sandbox (not "used").
        res = await sandbox_run(
            rt, sid, ["/bin/sh", "-c", "dd if=/dev/urandom of=/root/blob bs=1M count=20 && sync"]
        )
        assert res.exit_code == 0, res
        wrote = await rt.usage(sid)
        assert 20 * mib <= wrote.disk_used - before.disk_used < 24 * mib
        assert wrote.disk_total == before.disk_total
        assert wrote.memory_cache >= before.memory_cache + 18 * mib
        assert wrote.memory_used < held.memory_used + 8 * mib
        df_used, _ = await _df(rt, sid)
        assert abs(df_used - wrote.disk_used) < mib

        # A paused sandbox answers the same; nothing moves while frozen (but the kernel's
        # per-CPU charge batches, a few hundred KiB).
        await rt.pause(sid)
        try:
            paused = await rt.usage(sid)
            await asyncio.sleep(0.3)
            later = await rt.usage(sid)
            assert dataclasses.replace(later, memory_used=0) == dataclasses.replace(
                paused, memory_used=0
            )
            assert abs(later.memory_used - paused.memory_used) < mib
            assert paused.memory_used >= before.memory_used + 60 * mib
        finally:
            await rt.resume(sid)

        # Memory freed and a file removed show at once.
        res = await sandbox_run(rt, sid, ["/bin/sh", "-c", "killall dd; rm /root/blob; sync"])
        assert res.exit_code == 0, res
        for _ in range(100):
            after = await rt.usage(sid)
            if after.memory_used < before.memory_used + 16 * mib:
                break
            await asyncio.sleep(0.05)
        assert after.memory_used < before.memory_used + 16 * mib
        assert after.disk_used < before.disk_used + 2 * mib
    finally:
        await rt.destroy(sid)
    with pytest.raises(SandboxNotRunningError):
        await rt.usage(sid)
