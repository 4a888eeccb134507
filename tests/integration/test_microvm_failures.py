"""A microvm runs its own kernel, sees no host file, dies cleanly (QEMU killed, panic); too big: 400."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.server_harness import RunningServer, exec_stdout

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

# What the service says of a sandbox whose init died under it (the container tier's words,
# tests/integration/test_api.py): a VM whose QEMU is gone is that sandbox.
INIT_DIED = "init process exited"
# Host directories that are everybody's, not QEMU's own (the jail binds /usr read-only).
_SYSTEM = ("/proc", "/sys", "/dev", "/usr", "/boot", "/etc", "/lib", "/bin")
# Names a guest has of its own (the agent's socket and files under /.corral).
_GUEST_OWN = {"agent", "agent.sock", "busybox", "env", "vmux"}


@pytest.fixture
def api(vm_api: httpx.Client) -> httpx.Client:
    return vm_api


@pytest.fixture
def vm(api: httpx.Client) -> Iterator[str]:
    r = api.post(
        "/v1/sandboxes",
        json={"template": "minimal", "isolation": "microvm", "vcpus": 1, "memory_mb": 256},
    )
    assert r.status_code == 201, r.text
    sid = str(r.json()["id"])
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def qemu_of(sid: str) -> int:
    """The host pid of the sandbox's QEMU (found by its command line, wherever its files are)."""
    found = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and (argv := _argv(int(p.name)))
        and Path(argv[0]).name.startswith("qemu-system")
        and any(sid in a for a in argv)
    ]
    assert len(found) == 1, f"QEMU processes of {sid}: {found}"
    return found[0]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def qemu_host_files(pid: int) -> set[Path]:
    """The host files QEMU was given: paths on its command line and behind its descriptors."""
    named: set[str] = set()
    for arg in _argv(pid):  # "-drive file=/x,format=…", "-serial file:/y", "-kernel /z"
        named.update(re.findall(r"(?:^|[=,:])(/[^,=:]+)", arg))
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            named.add(os.readlink(fd).removesuffix(" (deleted)"))
        except OSError:
            continue
    return {
        Path(n)
        for n in named
        if n.startswith("/") and not n.startswith(_SYSTEM) and Path(n).exists()
    }


def sh(api: httpx.Client, sid: str, cmd: str) -> str:
    """stdout of ``cmd`` run as root in the guest (its exit status does not matter)."""
    return exec_stdout(api, sid, f"{cmd}\ntrue")


def wait_stopped(api: httpx.Client, sid: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        sb: dict[str, Any] = api.get(f"/v1/sandboxes/{sid}").json()
        if sb["state"] == "stopped" or time.monotonic() > deadline:
            return sb
        time.sleep(0.2)


# ------------------------------------------------------------------------- its own kernel


def test_the_guest_kernel_is_not_the_hosts(api: httpx.Client, vm: str) -> None:
    release = exec_stdout(api, vm, "uname -r").strip()
    version = exec_stdout(api, vm, "cat /proc/version").strip()
    assert release and release != platform.release(), release
    assert version and version != Path("/proc/version").read_text().strip(), version
    assert release in version  # the guest's /proc is its own kernel's, not a view of the host's


# ----------------------------------------------------------- QEMU's host files stay outside


def test_qemus_host_files_are_invisible_from_the_guest(
    api: httpx.Client, server: RunningServer, vm: str
) -> None:
    pid = qemu_of(vm)
    files = qemu_host_files(pid)
    data_dir = server.data_dir.resolve()
    ours = [f for f in files if f.is_relative_to(data_dir) or f.is_relative_to("/run/corral")]
    assert ours, f"no host file of QEMU found among {files}"
    # A marker beside each of QEMU's own files and in the data dir: a name and a content that
    # exist nowhere but on the host.
    token = secrets.token_hex(8)
    name, content = f"corral-marker-{token}", f"host-only-{token}"
    dirs = {f.parent for f in ours if f.parent.is_dir()} | {data_dir}
    markers = [d / name for d in sorted(dirs)]
    run_dirs = {f.parent for f in ours if f.is_relative_to("/run/corral")}
    # And the same kind of thing planted in the guest, which every search below must find (so
    # that a search that finds nothing because it is broken fails the test).
    canary, canary_text = f"/root/canary-{token}", f"guest-canary-{token}"
    r = api.put(f"/v1/sandboxes/{vm}/files", params={"path": canary}, content=canary_text)
    assert r.status_code in (200, 201), r.text
    r = api.post(
        f"/v1/sandboxes/{vm}/exec",
        json={"cmd": "sleep 300", "background": True, "env": {"CANARY": canary_text}},
    )
    assert r.status_code == 201, r.text
    canary_proc = f"/proc/{r.json()['pid']}/environ"
    try:
        for m in markers:
            m.write_text(content + "\n")
        host_paths = sorted({*map(str, files), *map(str, markers), *map(str, run_dirs)})
        # By path: none of them exists in the guest.
        found = sh(api, vm, "".join(f"[ -e '{p}' ] && echo '{p}'; " for p in [*host_paths, canary]))
        assert found.split() == [canary], found
        # By name, anywhere in the guest but its /proc (where the search's own command line is).
        names = {Path(p).name for p in host_paths} - _GUEST_OWN - {vm}
        expr = " -o ".join(f"-name '{n}'" for n in sorted({*names, Path(canary).name}))
        found = sh(
            api, vm,
            f'for d in /*; do case "$d" in /proc) ;; *) find "$d" {expr} 2>/dev/null;; esac; done',
        )  # fmt: skip
        assert found.split() == [canary], f"host names seen in the guest: {found}"
        # By content: the marker, the host's admin key and the host paths, in every file of the
        # guest, its processes' command lines and environments, and what QEMU's fw_cfg shows it.
        patterns = [content, server.admin_key, str(data_dir), *map(str, run_dirs), canary_text]
        pfile = "/tmp/.host-patterns"
        r = api.put(
            f"/v1/sandboxes/{vm}/files",
            params={"path": pfile},
            content="\n".join(patterns).encode() + b"\n",
        )
        assert r.status_code in (200, 201), r.text
        # (busybox grep stops a line at a NUL: each file goes through tr first.)
        found = sh(
            api, vm,
            "{ for d in /*; do case $d in /proc|/sys|/dev) ;; *) find $d -type f;; esac; done; "
            "find /dev/shm -type f; ls /sys/firmware/qemu_fw_cfg/by_key/*/raw "
            "/proc/[0-9]*/cmdline /proc/[0-9]*/environ; } 2>/dev/null | while read -r f; do "
            f"[ $f = {pfile} ] || {{ tr '\\0' '\\n' < $f | grep -qF -f {pfile} && echo $f; }}; "
            "done 2>/dev/null",
        )  # fmt: skip
        assert sorted(found.split()) == sorted([canary, canary_proc]), (
            f"host content seen in the guest: {found}"
        )
        # Host /proc: the guest's processes are its own (its pid 1 is the agent), no host one.
        comms = set(sh(api, vm, "cat /proc/[0-9]*/comm").split())
        assert exec_stdout(api, vm, "cat /proc/1/comm") == "agent\n" and "sleep" in comms
        assert not comms & {"qemu-system-x86", "corral-vmjail", "python3", "python", "pytest"}
    finally:
        for m in markers:
            m.unlink(missing_ok=True)


# --------------------------------------------------------------- a VM that dies under us


def _assert_ended(api: httpx.Client, sid: str, qemu: int) -> None:
    sb = wait_stopped(api, sid)
    assert sb["state"] == "stopped" and INIT_DIED in (sb["error"] or ""), sb
    assert not _alive(qemu)
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": "true"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sandbox_not_running", r.text
    # server_no_leaks: no QEMU, tap, netns, cgroup, socket dir or VM file is left.


def test_qemu_killed_from_outside_stops_the_sandbox_and_leaves_nothing(
    api: httpx.Client, vm: str
) -> None:
    assert exec_stdout(api, vm, "echo up") == "up\n"
    qemu = qemu_of(vm)
    os.kill(qemu, signal.SIGKILL)  # as the OOM killer or an operator would
    _assert_ended(api, vm, qemu)


def test_guest_kernel_panic_stops_the_sandbox_and_leaves_nothing(
    api: httpx.Client, vm: str
) -> None:
    qemu = qemu_of(vm)
    consoles = [Path(a[5:]) for a in _argv(qemu) if a.startswith("file:/")]  # -serial file:…
    # The kernel runs with panic=-1 (reboot at once) and QEMU with -no-reboot: QEMU exits.
    r = api.post(
        f"/v1/sandboxes/{vm}/exec",
        json={"cmd": "sleep 0.2; echo c > /proc/sysrq-trigger", "background": True},
    )
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 60
    while _alive(qemu):
        assert time.monotonic() < deadline, "QEMU still runs 60 s after the guest panicked"
        time.sleep(0.05)
    # It was the panic (when the console is still there to say so: the reaper may be quicker).
    for console in consoles:
        with contextlib.suppress(OSError):
            assert "sysrq" in console.read_text(errors="replace")
    _assert_ended(api, vm, qemu)


# ------------------------------------------------------------- bigger than the host: a 400


def _mem_total_mb() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    found = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    assert found is not None
    return int(found.group(1)) // 1024


def test_a_vm_bigger_than_the_host_is_a_400_naming_the_limit(api: httpx.Client) -> None:
    cores, total = os.cpu_count() or 1, _mem_total_mb()
    before = api.get("/v1/sandboxes").json()
    for body, words in (
        ({"vcpus": cores + 1}, f"{cores} CPU cores"),
        ({"cpu": cores + 1}, f"{cores} CPU cores"),
        ({"memory_mb": total + 1}, f"MemTotal {total} MB"),
    ):
        r = api.post(
            "/v1/sandboxes",
            json={"template": "minimal", "isolation": "microvm", "memory_mb": 256, **body},
        )
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], r.text
    assert api.get("/v1/sandboxes").json() == before
