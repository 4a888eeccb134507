"""Escape and exhaustion probes run inside real container-tier sandboxes all fail or hit limits."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.runtime import ContainerRuntime, SandboxSpec
from tests.conftest import requires_container, sandbox_put, sandbox_run

pytestmark = [pytest.mark.security, requires_container]

EPERM, ENOENT, EAGAIN, EACCES, ENOSPC, EROFS, ENOSYS = 1, 2, 11, 13, 28, 30, 38

# Every syscall the threat model forbids, with the errno our seccomp profile answers.
FORBIDDEN = {
    "mount": EPERM,
    "mount_proc": EPERM,
    "mount_cgroup": EPERM,
    "umount2": EPERM,
    "pivot_root": EPERM,
    "unshare_user": EPERM,
    "unshare_ns": EPERM,
    "unshare_net": EPERM,
    "clone_newuser": EPERM,
    "clone_newns": EPERM,
    "clone3": ENOSYS,
    "setns": EPERM,
    "keyctl": EPERM,
    "add_key": EPERM,
    "request_key": EPERM,
    "bpf": EPERM,
    "perf_event_open": EPERM,
    "io_uring_setup": EPERM,
    "userfaultfd": EPERM,
    "kexec_load": EPERM,
    "init_module": EPERM,
    "finit_module": EPERM,
    "delete_module": EPERM,
    "open_by_handle_at": EPERM,
    "socket_alg": EPERM,
    "socket_packet": EPERM,
    "socket_packet_dgram": EPERM,
    "socket_raw_inet": EPERM,
    "socket_vsock": EPERM,
    "fsopen": EPERM,
    "open_tree": EPERM,
    "move_mount": EPERM,
    "mount_setattr": EPERM,
    "sethostname": EPERM,
    "reboot": EPERM,
    "swapon": EPERM,
    "quotactl": EPERM,
    "syslog": EPERM,
}


@pytest.fixture(scope="session")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc to build the probe")
    out = tmp_path_factory.mktemp("probe") / "probe"
    src = Path(__file__).with_name("probe.c")
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


async def _start(rt: ContainerRuntime, sid: str, probe: Path, **kwargs: object) -> None:
    await rt.create(SandboxSpec(sid, **kwargs))  # type: ignore[arg-type]
    await sandbox_put(rt, sid, "/probe", probe.read_bytes(), mode=0o755)


@pytest.fixture
async def sandbox(
    container_runtime: ContainerRuntime, minimal_rootfs: Path, probe_binary: Path
) -> AsyncIterator[str]:
    sid = f"sec-{secrets.token_hex(3)}"
    await _start(container_runtime, sid, probe_binary, layers=(minimal_rootfs,))
    try:
        yield sid
    finally:
        await container_runtime.destroy(sid)


def _results(out: str) -> dict[str, tuple[str, int]]:
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].lstrip("-").isdigit():
            found[parts[0]] = (parts[1], int(parts[2]))
    return found


def _cap_mask() -> int:
    from corral.runtime.oci import IsolationProfile

    numbers = {
        "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
        "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
        "CAP_NET_BIND_SERVICE": 10, "CAP_NET_RAW": 13, "CAP_SYS_CHROOT": 18, "CAP_SYS_ADMIN": 21,
        "CAP_MKNOD": 27, "CAP_AUDIT_WRITE": 29, "CAP_SETFCAP": 31,
    }  # fmt: skip
    return sum(1 << numbers[c] for c in IsolationProfile.load().capabilities)


async def test_status_shows_caps_nonewprivs_seccomp(
    container_runtime: ContainerRuntime, sandbox: str
) -> None:
    res = await sandbox_run(container_runtime, sandbox, ["/bin/cat", "/proc/self/status"])
    status = dict(line.split(":", 1) for line in res.out.splitlines() if ":" in line)
    status = {k: v.strip() for k, v in status.items()}
    assert int(status["CapEff"], 16) == _cap_mask()
    assert int(status["CapBnd"], 16) == _cap_mask()
    assert int(status["CapEff"], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN
    assert int(status["CapEff"], 16) & (1 << 13) == 0  # no CAP_NET_RAW
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


async def test_forbidden_syscalls_fail(container_runtime: ContainerRuntime, sandbox: str) -> None:
    res = await sandbox_run(container_runtime, sandbox, ["/probe", "syscalls"])
    assert res.exit_code == 0, res
    got = _results(res.out)
    wrong = {
        name: got.get(name) for name, errno in FORBIDDEN.items() if got.get(name) != ("fail", errno)
    }
    assert not wrong, f"expected (fail, errno): {wrong}"


async def test_ordinary_things_still_work(
    container_runtime: ContainerRuntime, sandbox: str
) -> None:
    res = await sandbox_run(container_runtime, sandbox, ["/probe", "allowed"])
    got = _results(res.out)
    for name in (
        "socket_inet",
        "socket_inet6",
        "socket_unix",
        "socket_netlink",
        "socket_icmp_dgram",
        "fork",
        "exec",
    ):
        assert got.get(name) == ("ok", 0), (name, res.out)


async def test_host_canary_process_is_invisible(
    container_runtime: ContainerRuntime, sandbox: str
) -> None:
    secret = f"canary-{secrets.token_hex(8)}"
    canary = subprocess.Popen(
        ["sleep", "300"], env={"CORRAL_CANARY": secret, "PATH": os.environ["PATH"]}
    )
    try:
        deadline = time.monotonic() + 5  # exec may not have replaced the environment yet
        while secret not in Path(f"/proc/{canary.pid}/environ").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        script = "cat /proc/*/environ /proc/*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -c 'c[a]nary-'; ls /proc | grep -c '^[0-9]'"
        res = await sandbox_run(container_runtime, sandbox, ["/bin/sh", "-c", script])
        count, nprocs = res.out.split()
        assert count == "0"
        assert int(nprocs) < 10  # only the sandbox's own few processes
        res = await sandbox_run(
            container_runtime, sandbox, ["/probe", "open", f"/proc/{canary.pid}/environ", "r"]
        )
        assert secret not in res.out
        # kill() cannot reach it either: the pid, if it exists inside at all, is another process.
        res = await sandbox_run(container_runtime, sandbox, ["/bin/kill", "-0", str(canary.pid)])
        assert canary.poll() is None
    finally:
        canary.kill()
        canary.wait()


async def test_host_canary_file_is_unreachable(
    container_runtime: ContainerRuntime, sandbox: str, tmp_path: Path
) -> None:
    secret = f"canary-{secrets.token_hex(8)}"
    canary = tmp_path / "canary.txt"
    canary.write_text(secret)
    os.chmod(tmp_path, 0o755)
    os.chmod(canary, 0o644)
    res = await sandbox_run(container_runtime, sandbox, ["/probe", "open", str(canary), "r"])
    assert _results(res.out)["open"] == ("fail", ENOENT)
    res = await sandbox_run(
        container_runtime,
        sandbox,
        ["/bin/sh", "-c", f"grep -rs {secret} / --exclude-dir=proc --exclude-dir=sys; echo done"],
    )
    assert secret not in res.out.replace(f"grep -rs {secret}", "")


async def test_runtime_binaries_are_not_writable(
    container_runtime: ContainerRuntime, sandbox: str, agent_binary: Path
) -> None:
    before = agent_binary.read_bytes()
    for path in ("/.corral/agent", "/proc/1/exe", "/proc/self/exe"):
        res = await sandbox_run(container_runtime, sandbox, ["/probe", "open", path, "w"])
        status, errno = _results(res.out)["open"]
        assert status == "fail" and errno in (EACCES, EROFS, EPERM, 26), (
            path,
            res.out,
        )  # 26 ETXTBSY
    res = await sandbox_run(
        container_runtime,
        sandbox,
        ["/bin/sh", "-c", "rm -f /.corral/agent; echo x > /.corral/agent"],
    )
    assert res.exit_code != 0
    assert agent_binary.read_bytes() == before


async def test_proc_and_sys_are_masked(container_runtime: ContainerRuntime, sandbox: str) -> None:
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug"):
        res = await sandbox_run(container_runtime, sandbox, ["/probe", "open", path, "r"])
        got = _results(res.out)["open"]
        # Masked: either absent on this kernel, or /dev/null bind-mounted over it (reads nothing).
        assert got == ("fail", ENOENT) or "read 0" in res.out, (path, res.out)
    for path in ("/proc/sysrq-trigger", "/proc/sys/kernel/hostname", "/sys/kernel/uevent_helper"):
        res = await sandbox_run(container_runtime, sandbox, ["/probe", "open", path, "w"])
        assert _results(res.out)["open"][0] == "fail", (path, res.out)
    res = await sandbox_run(container_runtime, sandbox, ["/bin/ls", "-A", "/sys/firmware"])
    assert res.out.strip() == ""


async def test_cgroup_release_agent_is_unreachable(
    container_runtime: ContainerRuntime, sandbox: str
) -> None:
    res = await sandbox_run(
        container_runtime,
        sandbox,
        ["/bin/sh", "-c", "find /sys/fs/cgroup -name release_agent 2>/dev/null | wc -l"],
    )
    assert res.out.strip() == "0"
    res = await sandbox_run(container_runtime, sandbox, ["/probe", "syscalls"])
    assert _results(res.out)["mount_cgroup"] == ("fail", EPERM)


async def test_only_safe_devices_and_loopback(
    container_runtime: ContainerRuntime, sandbox: str
) -> None:
    res = await sandbox_run(container_runtime, sandbox, ["/bin/ls", "-A", "/dev"])
    assert set(res.out.split()) <= {
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "mqueue",
        "fd", "stdin", "stdout", "stderr", "core",
    }  # fmt: skip
    res = await sandbox_run(container_runtime, sandbox, ["/bin/cat", "/proc/net/dev"])
    interfaces = {line.split(":")[0].strip() for line in res.out.splitlines()[2:]}
    assert interfaces == {"lo"}


async def test_fork_bomb_hits_pids_max(
    container_runtime: ContainerRuntime, minimal_rootfs: Path, probe_binary: Path
) -> None:
    rt = container_runtime
    await _start(rt, "sec-forkbomb", probe_binary, layers=(minimal_rootfs,), pids_max=64)
    try:
        res = await sandbox_run(rt, "sec-forkbomb", ["/probe", "forkbomb"])
        count, errno = res.out.split()[1:3]
        assert int(count) < 64 and int(errno) == EAGAIN, res
        t = time.monotonic()
        subprocess.run(["true"], check=True)
        assert time.monotonic() - t < 2  # the host stays responsive
        assert (await sandbox_run(rt, "sec-forkbomb", ["/bin/echo", "ok"])).out.strip() == "ok"
    finally:
        await rt.destroy("sec-forkbomb")


async def test_memory_bomb_is_oom_killed_inside(
    container_runtime: ContainerRuntime, minimal_rootfs: Path, probe_binary: Path
) -> None:
    rt = container_runtime
    await _start(rt, "sec-membomb", probe_binary, layers=(minimal_rootfs,), memory_mb=64)
    try:
        res = await sandbox_run(rt, "sec-membomb", ["/probe", "membomb", "1024"])
        assert res.exit_code == 137, res  # SIGKILL by the OOM killer
        meta = json.loads((rt.data_dir / "sandboxes" / "sec-membomb" / "meta.json").read_text())
        mem = next(Path(p) for p in meta["cgroups"] if "/memory/" in p)
        oom = dict(line.split() for line in (mem / "memory.oom_control").read_text().splitlines())
        assert int(oom["oom_kill"]) >= 1
        assert await rt.is_running("sec-membomb")
    finally:
        await rt.destroy("sec-membomb")


async def test_disk_fill_ends_in_enospc(
    container_runtime: ContainerRuntime, minimal_rootfs: Path, probe_binary: Path
) -> None:
    rt = container_runtime
    await _start(rt, "sec-diskfill", probe_binary, layers=(minimal_rootfs,), disk_mb=64)
    try:
        before = os.statvfs(rt.data_dir)
        res = await sandbox_run(rt, "sec-diskfill", ["/probe", "fill", "/fill"])
        words = res.out.split()
        assert words[:3] == ["fill", "fail", str(ENOSPC)], res
        assert int(words[3]) <= 64 * 1024 * 1024
        after = os.statvfs(rt.data_dir)
        assert (before.f_bavail - after.f_bavail) * after.f_frsize <= 80 * 1024 * 1024
    finally:
        await rt.destroy("sec-diskfill")
