"""Shared fixtures: the leak check every integration/security test uses, a minimal rootfs, and a
container runtime on a private data dir that is fully removed at session end."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import pytest

from tests.integration.fake_internet import FakeInternet, fake_internet
from tests.integration.server_harness import RunningServer, running_server, shared_templates_dir

RUN_CORRAL = Path("/run/corral")
# Host interfaces corral and its tests make: sandbox veths and service dummies of the default
# prefix and of test servers (t + 3 hex), and the fake internet's veth.
_CORRAL_LINK = re.compile(r"^(cr|t[0-9a-f]{3}|cfi|ct)[0-9a-z]*$")


def container_skip_reason() -> str | None:
    """Why container-tier tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (user namespaces, cgroups, mounts, loop devices)"
    if shutil.which("runc") is None:
        return "needs runc (apt-get install runc)"
    if shutil.which("mkfs.ext4") is None:
        return "needs mkfs.ext4 (apt-get install e2fsprogs)"
    return None


def microvm_skip_reason() -> str | None:
    """Why the microvm tier cannot run here, or None."""
    import platform
    import shutil

    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("qemu-system-x86_64") is None or platform.machine() != "x86_64":
        return "needs qemu-system-x86 on x86_64"
    if not list(Path("/boot").glob("vmlinuz-*-cloud-amd64")):
        return "needs linux-image-cloud-amd64"
    return None


@pytest.fixture(params=["container", "microvm"])
def isolation(request: pytest.FixtureRequest) -> dict[str, object]:
    """Create-request fields for each isolation tier: a test taking it runs once per tier."""
    if request.param == "container":
        return {}
    why = microvm_skip_reason()
    if why:
        pytest.skip(why)
    return {"isolation": "microvm", "vcpus": 1, "memory_mb": 256}


requires_container = pytest.mark.skipif(
    container_skip_reason() is not None, reason=container_skip_reason() or ""
)


# --------------------------------------------------------------------------- leak check


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _own_cgroup_dirs() -> list[tuple[Path, bool]]:
    """(our cgroup dir, whether it is private to us, i.e. nested below the hierarchy root)."""
    from corral.host.cgroups import own_cgroup_dirs

    result = []
    for d in own_cgroup_dirs():
        mount_root = d
        while mount_root.parent != Path("/sys/fs/cgroup") and mount_root != mount_root.parent:
            mount_root = mount_root.parent
        result.append((d, d != mount_root))
    return result


def _descendants(root_pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(Path(f"/proc/{entry}/stat"))
        if not stat:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _zombie(pid: int) -> bool:
    stat = _read(Path(f"/proc/{pid}/stat"))
    return not stat or stat[stat.rfind(")") + 2] in "ZX"


@dataclass
class LeakSnapshot:
    processes: set[str] = field(default_factory=set)
    mounts: set[str] = field(default_factory=set)
    cgroups: set[str] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    loops: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    nft: set[str] = field(default_factory=set)

    def minus(self, before: LeakSnapshot) -> dict[str, list[str]]:
        diff = {
            name: sorted(getattr(self, name) - getattr(before, name))
            for name in (
                "processes",
                "mounts",
                "cgroups",
                "netns",
                "loops",
                "files",
                "links",
                "nft",
            )
        }
        return {k: v for k, v in diff.items() if v}


class LeakWatch:
    """Snapshots of everything a sandbox could leave on the host, scoped to what is ours.

    Other sessions share this machine, so only objects that can be ours are looked at: our
    descendants and processes in cgroups below our own private cgroup, mounts and loop devices
    under ``roots``, cgroup dirs below our own cgroups, and the files under ``roots``.
    """

    def __init__(self, roots: list[Path]) -> None:
        self.roots = [r.resolve() for r in roots]
        self.before = LeakSnapshot()

    def _scan_paths(self, snap: LeakSnapshot, roots: list[Path]) -> None:
        """Mounts, loop devices and files under ``roots``."""

        def under(path: str) -> bool:
            return any(path == str(r) or path.startswith(f"{r}/") for r in roots)

        for line in _read(Path("/proc/self/mountinfo")).splitlines():
            fields = line.split()
            if len(fields) > 4 and under(fields[4].replace("\\040", " ")):
                snap.mounts.add(f"{fields[4]} {line.partition(' - ')[2]}")
        for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
            target = _read(backing).strip()
            if under(target.removesuffix(" (deleted)")):
                snap.loops.add(f"{backing.parent.parent.name} {target}")
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                snap.files.update(str(Path(dirpath) / n) for n in (*dirnames, *filenames))

    def watch(self, path: Path) -> None:
        """Also watch ``path`` from now on (what is there already is not a leak)."""
        path = path.resolve()
        self.roots.append(path)
        self._scan_paths(self.before, [path])

    def snapshot(self) -> LeakSnapshot:
        snap = LeakSnapshot()
        me = os.getpid()
        cgroup_dirs = _own_cgroup_dirs()
        private = [d for d, is_private in cgroup_dirs if is_private]
        for pid in _descendants(me):
            if not _zombie(pid):
                snap.processes.add(
                    f"{pid} {_read(Path(f'/proc/{pid}/cmdline')).replace(chr(0), ' ')}"
                )
        for d in private:
            for dirpath, _, _ in os.walk(d):
                if Path(dirpath) == d:
                    continue
                for member in _read(Path(dirpath) / "cgroup.procs").split():
                    if not _zombie(int(member)):
                        snap.processes.add(
                            f"{member} {_read(Path(f'/proc/{member}/cmdline')).replace(chr(0), ' ')}"
                        )
        # Detached processes too (QEMU leaves the server's session and cgroups): any whose
        # command line names a watched path.
        roots = [str(r) for r in self.roots]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            cmdline = _read(entry / "cmdline").replace(chr(0), " ")
            if any(root in cmdline for root in roots) and not _zombie(int(entry.name)):
                snap.processes.add(f"{entry.name} {cmdline}")
        new_names: set[str] = set()
        for d in private:
            for dirpath, _, _ in os.walk(d):  # os.walk ignores dirs vanishing meanwhile
                sub = Path(dirpath)
                if sub != d:
                    snap.cgroups.add(str(sub))
                    new_names.add(str(sub.relative_to(d)))
        # Hierarchies shared with other sessions: only names that also exist below a private
        # cgroup of ours (runc creates one name in every hierarchy), unless nothing is private.
        for d, is_private in cgroup_dirs:
            if is_private or not d.is_dir():
                continue
            with contextlib.suppress(OSError):
                for sub in d.iterdir():
                    if sub.is_dir() and (not private or sub.name in new_names):
                        snap.cgroups.add(str(sub))
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
            )
            snap.netns.update(line.split()[0] for line in out.stdout.splitlines() if line.strip())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10
            )
            for line in out.stdout.splitlines():
                name = line.split(":", 2)[1].strip().split("@")[0] if ":" in line else ""
                if _CORRAL_LINK.match(name):
                    snap.links.add(name)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nft", "list", "tables"], capture_output=True, text=True, timeout=10
            )
            snap.nft.update(line.strip() for line in out.stdout.splitlines() if " corral" in line)
        self._scan_paths(snap, self.roots)
        return snap


def _kept(path: str) -> bool:
    """Files a runtime keeps on purpose between sandboxes: its directories and caches."""
    if "/pool/golden" in path or "/vm-cache" in path or path.endswith("/vms"):
        return True
    # Template state: its directories, the build cache and built-ins adopted as layers.
    if "/build-cache" in path or "/layers/.builtin-" in path:
        return True
    if path.endswith(("/builds", "/catalog", "/layers")):
        return True
    if path.endswith(
        (
            "/uidranges",
            "/vm-uids",
            "/runc",
            "/sandboxes",
            "/pool",
            "/pool.img",
            "/.pool.img.lock",
            "/pool/disks",
            "/pool/snapshots",
            "/pool/vm-snapshots",
        )
    ):
        return True
    if path.startswith(f"{RUN_CORRAL}/vm-") and path.endswith("/.jail"):
        return True  # the microvm jails' mount point (an empty directory, kept like the dir)
    return path == str(RUN_CORRAL) or (
        path.startswith((f"{RUN_CORRAL}/rootfs-", f"{RUN_CORRAL}/vm-")) and path.count("/") == 3
    )


def _pool_mount(entry: str) -> bool:
    """The storage pool's mount and loop device: made on first use and kept, like a cache."""
    parts = entry.split()
    return len(parts) >= 2 and (parts[0].endswith("/pool") or parts[1].endswith("/pool.img"))


def _strip_kept(diff: dict[str, list[str]]) -> dict[str, list[str]]:
    files = [f for f in diff.get("files", []) if not _kept(f)]
    out = dict(diff)
    for key in ("mounts", "loops"):
        if key in out:
            out[key] = [e for e in out[key] if not _pool_mount(e)]
            if not out[key]:
                out.pop(key)
    if files:
        out["files"] = files
    else:
        out.pop("files", None)
    return out


@pytest.fixture
def no_leaks(request: pytest.FixtureRequest) -> Iterator[LeakWatch]:
    """Fails the test if it leaves a process, mount, cgroup, netns, loop device or file behind.

    Watches pytest's base temp dir; add more roots with ``no_leaks.watch()`` (the
    ``container_runtime`` fixture adds its runtime's mount dir under /run/corral).
    """
    basetemp = Path(request.config._tmp_path_factory.getbasetemp()).resolve()  # type: ignore[attr-defined]
    watch = LeakWatch([basetemp])
    watch.before = watch.snapshot()
    yield watch
    before = watch.before
    deadline = time.monotonic() + 10
    while True:
        diff = _strip_kept(watch.snapshot().minus(before))
        # New top-level entries of the base temp dir are tmp_paths of this test (pytest's
        # business); everything made by session fixtures (data dirs) existed before.
        if "files" in diff:
            fresh_top = {f for f in diff["files"] if Path(f).parent == basetemp}
            diff["files"] = [
                f
                for f in diff["files"]
                if not any(f == t or f.startswith(f"{t}/") for t in fresh_top)
            ]
            if not diff["files"]:
                diff.pop("files")
        if not diff or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if diff:
        pytest.fail(f"leaked on the host: {diff}")


# ----------------------------------------------------------------------- shared fixtures


def _busybox_rootfs(dest: Path) -> None:
    """Fallback when corral.templates is unavailable: busybox-static and its applet links."""
    busybox = next((p for p in ("/bin/busybox", "/usr/bin/busybox") if Path(p).exists()), None)
    if busybox is None:
        pytest.skip("needs busybox-static")
    for d in ("bin", "etc", "root", "tmp", "proc", "sys", "dev", "usr/bin"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy(busybox, dest / "bin/busybox")
    for applet in ("sh", "cat", "ls", "echo", "true", "dd", "id", "mkdir", "rm", "sleep", "touch"):
        (dest / "bin" / applet).symlink_to("busybox")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    os.chmod(dest, 0o755)


@pytest.fixture(scope="session")
def minimal_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``minimal`` template (busybox), built once per session; read-only by convention."""
    dest = tmp_path_factory.mktemp("templates") / "minimal"
    try:
        from corral.templates import build
    except ImportError:
        _busybox_rootfs(dest)
        return dest
    build("minimal", dest)
    return dest


@pytest.fixture(scope="session")
def agent_binary() -> Path:
    """The in-sandbox agent, built by ``corral.agent.build``."""
    try:
        from corral.agent.build import agent_binary_path
    except ImportError as exc:
        pytest.skip(f"the agent is not available yet: {exc}")
    return Path(agent_binary_path())


@pytest.fixture(scope="session")
def container_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir shared by the session's container runtimes; everything in it is removed at
    the end (sandboxes destroyed, disks unmounted, loop devices freed)."""
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    data_dir = tmp_path_factory.mktemp("corral-data")
    yield data_dir
    from corral.runtime.container import ContainerRuntime

    runtime = ContainerRuntime(data_dir, Path("/nonexistent"))
    asyncio.run(runtime.purge())


@pytest.fixture
async def container_runtime(
    container_data_dir: Path, agent_binary: Path, no_leaks: LeakWatch
) -> AsyncIterator[object]:
    """A ContainerRuntime on the session's data dir; the test must destroy what it creates
    (``no_leaks`` checks it; the session fixture purges whatever a failed test left)."""
    from corral.runtime.container import ContainerRuntime

    runtime = ContainerRuntime(container_data_dir, agent_binary)
    no_leaks.watch(runtime.mount_dir)
    try:
        yield runtime
    finally:
        await runtime.close()


# ------------------------------------------------------------- running things in a sandbox


@dataclass
class ExecResult:
    exit_code: int | None
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")


async def sandbox_run(
    runtime: object, sandbox_id: str, argv: list[str], timeout: float = 120
) -> ExecResult:
    """Run ``argv`` inside the sandbox through its agent and collect everything it printed."""
    from corral.agent import AgentClient, ExecRequest

    client = AgentClient(lambda: runtime.open_agent(sandbox_id))  # type: ignore[attr-defined]

    async def go() -> ExecResult:
        _, events = await client.exec_stream(ExecRequest(argv=argv, stdin=False))
        out, err, code = bytearray(), bytearray(), None
        async for ev in events:
            if ev.kind == "stdout":
                out += ev.data
            elif ev.kind == "stderr":
                err += ev.data
            else:
                code = ev.exit_code
        return ExecResult(code, bytes(out), bytes(err))

    return await asyncio.wait_for(go(), timeout)


async def sandbox_put(
    runtime: object, sandbox_id: str, path: str, data: bytes, mode: int = 0o755
) -> None:
    """Write a file into the sandbox through its agent."""
    from corral.agent import AgentClient

    client = AgentClient(lambda: runtime.open_agent(sandbox_id))  # type: ignore[attr-defined]

    async def body() -> AsyncIterator[bytes]:
        yield data

    await client.write_file(path, body(), mode=mode)


# ------------------------------------------------------------- a real server, for API-level tests


@pytest.fixture(scope="session")
def fake_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeInternet]:
    """The fake internet (TEST-NET hosts, an authoritative DNS server that records every query)
    in a network namespace of the session's own."""
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    with fake_internet(tmp_path_factory.mktemp("fake-internet")) as net:
        yield net


@pytest.fixture(scope="session")
def server(
    tmp_path_factory: pytest.TempPathFactory, fake_net: FakeInternet
) -> Iterator[RunningServer]:
    """One real ``corral server`` for the session, in a private data dir sharing built templates,
    resolving through the fake internet's DNS server."""
    why = container_skip_reason()
    if why:
        pytest.skip(why)
    scratch = tmp_path_factory.mktemp("corral-server")
    templates = shared_templates_dir(scratch)
    with running_server(
        scratch / "data", templates, dns_upstream=fake_net.dns, upstream_ca_pem=fake_net.ca_pem
    ) as s:
        yield s


class Conn(TypedDict):
    """How the SDK reaches the session server: ``Sandbox.create(..., **conn)``."""

    api_key: str
    base_url: str


@pytest.fixture
def conn(server: RunningServer) -> Conn:
    return {"api_key": server.admin_key, "base_url": server.url}


@pytest.fixture(scope="session")
def base_template(server: RunningServer) -> str:
    """The Debian ``base`` template (curl, python3) in the session server's templates, built once
    per machine when ``make templates`` has not already built it."""
    from corral.templates import build_in_data_dir

    build_in_data_dir("base", (server.data_dir / "templates").resolve().parent)
    return "base"


@pytest.fixture
def server_no_leaks(no_leaks: LeakWatch, server: RunningServer) -> LeakWatch:
    """The leak check for tests that go through a server: sandboxes mount under /run/corral."""
    no_leaks.watch(RUN_CORRAL)
    return no_leaks
