"""A microvm sandbox runs its own kernel (not the host's) with the agent as its init, carries many
concurrent agent streams intact over one virtio-serial port, stops using CPU when paused, keeps
QEMU inside its cgroup limits, starts as a clone of a warm template with its own name,
environment, clock, entropy and disk, and is gone without a trace when destroyed, when QEMU is
killed, or when its guest fails to boot; its memory snapshots, hibernation and restores carry
its processes on from the saved instant, and a damaged or mismatched saved state is refused."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from corral.errors import (
    InvalidRequestError,
    RuntimeFailure,
    SandboxNotRunningError,
    SnapshotUnusableError,
)
from corral.runtime import MicroVMRuntime, SandboxSpec
from tests.conftest import LeakWatch, microvm_skip_reason, sandbox_put, sandbox_run
from tests.integration.tiers import MEMORY_COUNTER

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def vm_data_dir(tmp_path_factory: pytest.TempPathFactory, agent_binary: Path) -> Iterator[Path]:
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    data = tmp_path_factory.mktemp("vm-data")
    yield data
    asyncio.run(MicroVMRuntime(data, agent_binary).purge())


@pytest.fixture
async def vm_runtime(
    vm_data_dir: Path, agent_binary: Path, no_leaks: LeakWatch
) -> AsyncIterator[MicroVMRuntime]:
    rt = MicroVMRuntime(vm_data_dir, agent_binary)
    try:
        yield rt
    finally:
        await rt.close()


def _spec(sid: str, rootfs: Path, **kw: object) -> SandboxSpec:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GREETING": "hello there"}
    return SandboxSpec(sid, (rootfs,), hostname=sid, env=env, disk_mb=1024, **kw)  # type: ignore[arg-type]


async def test_own_kernel_agent_as_init_and_many_streams(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-basic", minimal_rootfs))
    try:
        res = await sandbox_run(
            rt,
            "vm-basic",
            ["/bin/sh", "-c", "uname -r; hostname; echo $GREETING; cat /proc/1/comm"],
        )
        kernel, host, greeting, init = res.out.splitlines()
        assert kernel != platform.release() and kernel.endswith("-cloud-amd64")
        assert (host, greeting, init) == ("vm-basic", "hello there", "agent")
        # Many streams at once through the one port, each intact.
        payload = os.urandom(3 << 20)
        await sandbox_put(rt, "vm-basic", "/root/blob", payload, 0o644)
        digest = hashlib.sha256(payload).hexdigest()
        results = await asyncio.gather(
            *(
                sandbox_run(rt, "vm-basic", ["/bin/sh", "-c", f"sha256sum /root/blob; echo {i}"])
                for i in range(8)
            ),
            sandbox_run(rt, "vm-basic", ["/bin/cat", "/root/blob"]),
        )
        for i, r in enumerate(results[:8]):
            assert r.out.split() == [digest, "/root/blob", str(i)]
        assert results[8].stdout == payload
    finally:
        await rt.destroy("vm-basic")
    assert not await rt.is_running("vm-basic")
    assert await rt.list_sandboxes() == []


async def test_pause_stops_the_vcpus(vm_runtime: MicroVMRuntime, minimal_rootfs: Path) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-pause", minimal_rootfs))
    try:
        from corral.agent import AgentClient, ExecRequest

        await AgentClient(lambda: rt.open_agent("vm-pause")).spawn(
            ExecRequest(argv=["/bin/sh", "-c", "while :; do :; done"])
        )
        await rt.pause("vm-pause")
        frozen = await rt.cpu_seconds("vm-pause")
        await asyncio.sleep(1.0)
        assert await rt.cpu_seconds("vm-pause") - frozen < 0.05
        await rt.resume("vm-pause")
        assert (await sandbox_run(rt, "vm-pause", ["/bin/echo", "awake"])).out == "awake\n"
    finally:
        await rt.destroy("vm-pause")


async def test_killed_qemu_is_not_running_and_destroy_cleans(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-kill", minimal_rootfs))
    pid = json.loads((rt.data_dir / "pool" / "vms" / "vm-kill" / "meta.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not await rt.is_running("vm-kill"):
            break
        await asyncio.sleep(0.01)
    assert not await rt.is_running("vm-kill")
    await rt.destroy("vm-kill")
    assert await rt.list_sandboxes() == []


async def test_a_guest_that_cannot_boot_fails_create_and_leaves_nothing(
    vm_runtime: MicroVMRuntime, tmp_path: Path
) -> None:
    rt = vm_runtime
    rt.warm = False  # a cold boot: a warm clone would resume the template's page cache
    rootfs = tmp_path / "broken" / "rootfs"
    rootfs.mkdir(parents=True)
    (rootfs / "hello").write_text("no init, no shell")
    await rt.create(_spec("vm-ok", rootfs))  # boots: the agent comes from the initramfs
    await rt.destroy("vm-ok")
    images = list((rt.data_dir / "vm-cache").glob("broken-*.ext4"))
    assert len(images) == 1
    with open(images[0], "r+b") as f:  # wreck the superblock: the guest cannot mount its root
        f.seek(1024)
        f.write(b"\0" * 1024)
    with pytest.raises(RuntimeFailure, match="exited while booting"):
        await rt.create(_spec("vm-bad", rootfs))
    assert await rt.list_sandboxes() == []
    images[0].unlink()


async def test_unsupported_requests_are_refused(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    with pytest.raises(InvalidRequestError, match="not a microvm snapshot"):
        await rt.create(_spec("vm-snap", minimal_rootfs, snapshot="snap-x"))
    with pytest.raises(InvalidRequestError, match="template builds run on the container tier"):
        await rt.export_changes("vm-none", minimal_rootfs)
    with pytest.raises(SandboxNotRunningError, match="no disk"):
        await rt.snapshot("vm-none", "snap-y")
    with pytest.raises(InvalidRequestError, match="invalid snapshot id"):
        await rt.delete_snapshot("../../etc")
    assert await rt.list_sandboxes() == []


async def test_qemu_runs_inside_its_cgroup_limits(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-cg", minimal_rootfs, memory_mb=256))
    meta = json.loads((rt.data_dir / "pool" / "vms" / "vm-cg" / "meta.json").read_text())
    dirs = [Path(d) for d in meta["cgroups"]]
    try:
        memory = next(d for d in dirs if (d / "memory.limit_in_bytes").exists())
        assert int((memory / "memory.limit_in_bytes").read_text()) == (256 + 192) * 1024**2
        assert str(meta["pid"]) in (memory / "cgroup.procs").read_text().split()
        pids = next(d for d in dirs if (d / "pids.max").exists())
        assert (pids / "pids.max").read_text().strip() == "256"
    finally:
        await rt.destroy("vm-cg")
    assert not any(d.exists() for d in dirs)


async def test_warm_clones_are_separate_machines(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    """Clones of one warm template: each its own name, environment, clock, entropy and disk."""
    rt = vm_runtime
    script = "hostname; echo $GREETING; date +%s; head -c 16 /dev/urandom | od -An -tx1"
    outs = []
    try:
        for sid in ("vm-c1", "vm-c2"):
            spec = _spec(sid, minimal_rootfs)
            await rt.create(replace(spec, env={**spec.env, "GREETING": sid}))
            assert "restore" in rt.last_create_timings  # a clone, not a boot
            outs.append((await sandbox_run(rt, sid, ["/bin/sh", "-c", script])).out.splitlines())
        await sandbox_run(rt, "vm-c1", ["/bin/sh", "-c", "echo mine > /root/only-c1"])
        assert (await sandbox_run(rt, "vm-c2", ["/bin/ls", "/root"])).out == ""
    finally:
        for sid in ("vm-c1", "vm-c2"):
            await rt.destroy(sid)
    (n1, g1, t1, r1), (n2, g2, t2, r2) = outs
    assert (n1, g1, n2, g2) == ("vm-c1", "vm-c1", "vm-c2", "vm-c2")
    assert abs(int(t1) - time.time()) < 30 and abs(int(t2) - time.time()) < 30
    assert r1 != r2  # every clone starts from the template's RNG state unless reseeded


_READ = ["/bin/cat", "/run/mem/n"]


async def _count(rt: MicroVMRuntime, sid: str) -> tuple[int, str]:
    """The counter's value and its pid, read inside ``sid``."""
    res = await sandbox_run(rt, sid, _READ)
    value, pid = res.out.split()
    return int(value), pid


async def test_memory_snapshot_fork_hibernate_and_restore_keep_processes(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    spec = _spec("vm-src", minimal_rootfs, memory_mb=256)
    made = ["vm-src"]
    await rt.create(spec)
    try:
        await sandbox_run(rt, "vm-src", ["/bin/sh", "-c", MEMORY_COUNTER])
        await asyncio.sleep(0.5)
        before, pid = await _count(rt, "vm-src")
        size = await rt.snapshot("vm-src", "snap-mem")
        assert size > 1 << 20  # the RAM is in it
        assert "snap-mem" in await rt.list_snapshots()
        after, _ = await _count(rt, "vm-src")  # the source runs on
        assert after >= before

        # A fork from the snapshot: the same process, counting on from the snapshot's value,
        # in a machine with its own name and environment.
        made.append("vm-fork")
        fork = replace(_spec("vm-fork", minimal_rootfs, memory_mb=256), snapshot="snap-mem")
        await rt.create(replace(fork, env={**fork.env, "GREETING": "forked"}))
        value, fork_pid = await _count(rt, "vm-fork")
        assert fork_pid == pid and before <= value <= after + 200
        res = await sandbox_run(rt, "vm-fork", ["/bin/sh", "-c", "hostname; echo $GREETING"])
        assert res.out.split() == ["vm-fork", "forked"]
        await asyncio.sleep(0.3)
        assert (await _count(rt, "vm-fork"))[0] > value

        # Hibernate and wake: memory saved to disk, QEMU gone, the process carries on.
        await rt.hibernate("vm-src")
        assert not await rt.is_running("vm-src")
        slept, _ = await _count_after_wake(rt, spec)
        assert slept >= after

        # Restore the snapshot onto the source: back to the snapshot's count.
        high, _ = await _count(rt, "vm-src")
        await rt.hibernate("vm-src", keep_memory=False)
        await rt.restore_disk("vm-src", "snap-mem")
        restored, restored_pid = await _count_after_wake(rt, spec)
        assert restored_pid == pid and before <= restored < high

        # A snapshot of a hibernated VM is its saved files.
        await rt.hibernate("vm-src")
        await rt.snapshot("vm-src", "snap-asleep")
        made.append("vm-fork2")
        await rt.create(
            replace(_spec("vm-fork2", minimal_rootfs, memory_mb=256), snapshot="snap-asleep")
        )
        assert (await _count(rt, "vm-fork2"))[1] == pid
    finally:
        for sid in made:
            await rt.destroy(sid)
        for snap in await rt.list_snapshots():
            await rt.delete_snapshot(snap)
    assert await rt.list_snapshots() == []


async def _count_after_wake(rt: MicroVMRuntime, spec: SandboxSpec) -> tuple[int, str]:
    await rt.wake(spec)
    assert not (rt.data_dir / "pool" / "vms" / spec.sandbox_id / "state").exists()  # spent
    return await _count(rt, spec.sandbox_id)


async def test_a_damaged_or_mismatched_saved_state_is_refused(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path
) -> None:
    rt = vm_runtime
    await rt.create(_spec("vm-dmg", minimal_rootfs, memory_mb=256))
    try:
        await rt.snapshot("vm-dmg", "snap-dmg")
    finally:
        await rt.destroy("vm-dmg")
    try:
        with pytest.raises(InvalidRequestError, match="256 MiB"):
            await rt.create(
                replace(_spec("vm-big", minimal_rootfs, memory_mb=512), snapshot="snap-dmg")
            )
        state = rt.data_dir / "pool" / "vm-snapshots" / "snap-dmg" / "state"
        with open(state, "r+b") as f:
            f.truncate(state.stat().st_size // 2)
        with pytest.raises(SnapshotUnusableError, match="cannot be loaded"):
            await rt.create(
                replace(_spec("vm-cut", minimal_rootfs, memory_mb=256), snapshot="snap-dmg")
            )
        assert await rt.list_sandboxes() == []
    finally:
        await rt.delete_snapshot("snap-dmg")


async def test_qemu_is_jailed(vm_runtime: MicroVMRuntime, minimal_rootfs: Path) -> None:
    """QEMU runs as a uid of its own without capabilities, in mount, pid and IPC namespaces of
    its own, seeing only its VM's files; the template memory it maps can never be written."""
    rt = vm_runtime
    await rt.create(_spec("vm-jail", minimal_rootfs, memory_mb=256))
    try:
        vdir = rt.data_dir / "pool" / "vms" / "vm-jail"
        meta = json.loads((vdir / "meta.json").read_text())
        pid, uid = meta["pid"], meta["uid"]
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        assert status["Uid"].split() == [str(uid)] * 4 and uid >= 3 << 30
        assert status["Gid"].split() == [str(uid)] * 4
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        assert status["NSpid"].split()[-1] == "1"  # pid 1 of a namespace of its own
        for ns in ("mnt", "pid", "ipc"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        root = Path(f"/proc/{pid}/root")
        assert sorted(p.name for p in root.iterdir()) == sorted(
            p
            for p in ("bin", "boot", "dev", "lib", "lib64", "proc", "run", "tmp", "usr", "var")
            if (root / p).exists()
        )
        assert not (root / "etc").exists() and not (root / "root").exists()
        # Of its own directory only its disk, console and environment; of the data dir
        # nothing else (no database, no other VM, no template memory).
        seen = root / str(vdir).lstrip("/")
        assert sorted(p.name for p in seen.iterdir()) == ["console.log", "disk.qcow2", "env"]
        assert sorted(p.name for p in (seen.parent).iterdir()) == ["vm-jail"]
        data_seen = root / str(rt.data_dir).lstrip("/")
        assert not (data_seen / "corral.db").exists() and not (data_seen / "vm-uids").exists()
        assert [p.name for p in (data_seen / "vm-cache").iterdir()] != []  # its images only
        assert not any(p.name == "mem" for p in (data_seen / "vm-cache").rglob("*"))
        # The template memory: a sealed memfd, mapped private; even root cannot write to it.
        memfd = next(
            fd
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if os.readlink(fd).startswith("/memfd:corral-")
        )
        with open(memfd, "r+b", buffering=0) as f, pytest.raises(PermissionError):
            f.write(b"poison")
        assert (await sandbox_run(rt, "vm-jail", ["/bin/echo", "fine"])).out == "fine\n"
    finally:
        await rt.destroy("vm-jail")


def test_the_accelerator_probe_times_a_real_boot(vm_data_dir: Path) -> None:
    """The probe boots the guest kernel to its panic and times it; too slow is a refusal. On
    these hosts /dev/kvm is PVM, refused without a probe, and the reason is given."""
    from corral.vm.guest import find_kernel
    from corral.vm.qemu import choose_accel, probe_boot

    kernel = find_kernel().vmlinuz
    took = probe_boot(kernel, "tcg", budget=60)
    assert took is not None and 0.1 < took < 60
    assert probe_boot(kernel, "tcg", budget=0.05) is None
    accel, reason = choose_accel(kernel, vm_data_dir / "probe.json")
    if Path("/sys/module/kvm_pvm").exists():
        assert (accel, "PVM" in reason) == ("tcg", True)
    rt = MicroVMRuntime(vm_data_dir, Path("/nonexistent"))
    assert rt.describe() == {"accelerator": rt.accel, "accelerator_reason": rt.accel_reason}


async def _df(rt: MicroVMRuntime, sid: str) -> tuple[int, int]:
    """(used, size) bytes of / as ``df`` inside the guest says."""
    res = await sandbox_run(rt, sid, ["/bin/df", "-k", "/"])
    assert res.exit_code == 0, res
    fields = res.out.splitlines()[-1].split()
    return int(fields[2]) * 1024, int(fields[1]) * 1024


async def test_usage_is_the_guests_own_view(
    vm_runtime: MicroVMRuntime, minimal_rootfs: Path, agent_binary: Path
) -> None:
    from corral.agent import AgentClient, ExecRequest

    rt, sid, mib = vm_runtime, "vm-usage", 1024 * 1024
    await rt.create(_spec(sid, minimal_rootfs))
    try:
        before = await rt.usage(sid)
        # The guest's MemTotal: the VM's 512 MiB less what its kernel keeps for itself.
        assert 0.85 * 512 * mib < before.memory_total <= 512 * mib
        assert 0 < before.memory_used < 128 * mib and before.cpu_seconds > 0
        assert 0.9 * 1024 * mib < before.disk_total <= 1024 * mib
        df_used, df_size = await _df(rt, sid)
        assert df_size == before.disk_total
        assert abs(df_used - (await rt.usage(sid)).disk_used) < mib

        client = AgentClient(lambda: rt.open_agent(sid))
        await client.spawn(
            ExecRequest(argv=["/bin/sh", "-c", "dd if=/dev/zero bs=64M count=1 | sleep 600"])
        )
        for _ in range(300):
            held = await rt.usage(sid)
            if held.memory_used >= before.memory_used + 60 * mib:
                break
            await asyncio.sleep(0.1)
        assert before.memory_used + 60 * mib <= held.memory_used < before.memory_used + 90 * mib

        res = await sandbox_run(
            rt, sid, ["/bin/sh", "-c", "dd if=/dev/urandom of=/root/blob bs=1M count=20 && sync"]
        )
        assert res.exit_code == 0, res
        wrote = await rt.usage(sid)
        assert 20 * mib <= wrote.disk_used - before.disk_used < 24 * mib
        assert wrote.memory_cache >= before.memory_cache + 18 * mib
        df_used, _ = await _df(rt, sid)
        assert abs(df_used - wrote.disk_used) < mib

        # Paused, the guest cannot answer: the last figures it gave (a stopped guest cannot have
        # changed them); a server that never asked it before gets the host's (QEMU's RSS).
        last = await rt.usage(sid)
        await rt.pause(sid)
        try:
            paused = await rt.usage(sid)
            assert replace(paused, cpu_seconds=0) == replace(last, cpu_seconds=0)
            other = MicroVMRuntime(rt.data_dir, agent_binary)
            try:
                host = await other.usage(sid)
            finally:
                await other.close()
            assert host.memory_total == 512 * mib and host.memory_cache == 0
            assert host.memory_used >= held.memory_used  # guest RAM it touched, and QEMU's own
            assert host.disk_total == before.disk_total
            assert host.disk_used >= 20 * mib  # the clone's own overlay holds what it wrote
        finally:
            await rt.resume(sid)
        assert (await rt.usage(sid)).cpu_seconds >= paused.cpu_seconds
    finally:
        await rt.destroy(sid)
    with pytest.raises(SandboxNotRunningError):
        await rt.usage(sid)
