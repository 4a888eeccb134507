"""The floor corral is measured against: raw ``runc``/``crun`` and ``docker``/``podman`` runs.

Every system runs the same template root filesystem (corral's ``minimal`` and ``base``) with
``/bin/true`` as the command. OCI runtimes get a hand-written bundle close to what corral uses
(all namespaces, read-only root, memory and pids limits, with and without a user namespace);
engines get the rootfs imported as an image and ``--network none``. Whatever cannot run on
this host is reported with its own error instead of a number.

Usage: ``python -m bench.peers [--data-dir DIR] [--only runc,crun,docker,podman]``.
Everything it creates (containers, cgroups, images, a private dockerd and its state) lives in a
temporary directory or is removed before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bench import Row, host_kernel_bytes, host_used_bytes, publish, table
from corral.templates import build_in_data_dir, rootfs_path
from corral.templates.fs import remove_tree

__all__ = ["main"]

# A host uid range no real user owns; sandbox root maps to its first id.
_USERNS_BASE = 2_000_000_000
_USERNS_SIZE = 65536
_CGROUP_PARENT = "corral-bench"
_SLEEP = ["/bin/sleep", "3600"]
_TRUE = ["/bin/true"]


def _run(
    argv: Sequence[str],
    timeout: float = 120,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )


def _timed(argv: Sequence[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = _run(argv)
    return (time.perf_counter() - start) * 1000, proc


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _settled(read: Callable[[], int]) -> int:
    samples = []
    for _ in range(5):
        samples.append(read())
        time.sleep(0.2)
    return int(statistics.median(samples))


def _cgroup_dirs(name: str) -> set[Path]:
    """Directories called ``name`` at each hierarchy's root and below our own cgroup."""
    base = Path("/sys/fs/cgroup")
    own: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/cgroup", encoding="ascii") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            for c in controllers.split(","):
                own[c.removeprefix("name=")] = path.lstrip("/")
    if not base.is_dir():
        return set()
    found: set[Path] = set()
    for mount in base.iterdir():
        for parent in (mount / name, mount / own.get(mount.name, "") / name):
            if parent.is_dir():
                found.add(parent)
    return found


def _cleanup_cgroups(name: str, existed: set[Path] | frozenset[Path] = frozenset()) -> None:
    """Remove the empty cgroup trees a runtime or engine left, except ones that were there."""
    for parent in _cgroup_dirs(name) - set(existed):
        for dirpath, _dirs, _files in sorted(os.walk(parent), key=lambda t: -len(t[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


# ---------------------------------------------------------------------------------------------
# OCI runtimes


@dataclass(frozen=True)
class Oci:
    runtime: str  # runc | crun
    state: Path  # --root: the runtime's private state dir
    work: Path

    def argv(self, *args: str) -> list[str]:
        return [self.runtime, "--root", str(self.state), *args]

    def bundle(self, rootfs: Path, args: list[str], userns: bool, cid: str) -> Path:
        """A bundle per container: each gets its own cgroup, as a corral sandbox does."""
        bundle = self.work / "bundles" / cid
        bundle.mkdir(parents=True)
        config = _oci_config(rootfs, args, userns, f"{_CGROUP_PARENT}/{cid}")
        (bundle / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return bundle

    def run_once(self, bundle: Path, cid: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        return _timed(self.argv("run", "--bundle", str(bundle), cid))

    def start(self, bundle: Path, cid: str) -> subprocess.CompletedProcess[str]:
        # The container inherits runc's stdio: pipes would be held open by it forever.
        with tempfile.TemporaryFile() as err:
            proc = subprocess.run(
                self.argv("run", "--detach", "--bundle", str(bundle), cid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=120,
                check=False,
            )
            err.seek(0)
            message = err.read().decode(errors="replace")
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", message)

    def pid(self, cid: str) -> int:
        proc = _run(self.argv("state", cid))
        return int(json.loads(proc.stdout)["pid"]) if proc.returncode == 0 else 0

    def remove(self, cid: str) -> None:
        _run(self.argv("kill", cid, "KILL"))
        for _ in range(50):
            if _run(self.argv("delete", "--force", cid)).returncode == 0:
                return
            time.sleep(0.05)

    def remove_all(self) -> None:
        proc = _run(self.argv("list", "--format", "json"))
        try:
            ids = [c["id"] for c in json.loads(proc.stdout or "[]") or []]
        except ValueError:
            ids = []
        for cid in ids:
            self.remove(cid)


def _oci_config(rootfs: Path, args: list[str], userns: bool, cgroup: str) -> dict[str, object]:
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID"]
    namespaces = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    linux: dict[str, object] = {
        # Relative: runc puts it below its own cgroup, crun below each hierarchy's root.
        "cgroupsPath": cgroup,
        "resources": {
            "devices": [{"allow": False, "access": "rwm"}],
            "memory": {"limit": 512 * 1024 * 1024},
            "pids": {"limit": 1024},
        },
        "namespaces": namespaces,
        "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    }
    if userns:
        namespaces.append({"type": "user"})
        mapping = [{"containerID": 0, "hostID": _USERNS_BASE, "size": _USERNS_SIZE}]
        linux["uidMappings"] = mapping
        linux["gidMappings"] = mapping
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "bench",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", "size=65536k"],
            },
        ],
        "linux": linux,
    }


@dataclass(frozen=True)
class Plan:
    templates: tuple[str, ...]
    rootfs: dict[str, str]
    runs: int
    engine_runs: int
    concurrency: int
    idle: int


def _oci_suite(runtime: str, plan: Plan, label: str, work: Path) -> list[Row]:
    """Run latency (±userns), exec round trip, concurrent creates and idle memory."""
    oci = Oci(runtime, work / f"{runtime}-state", work)
    rows: list[Row] = []
    counter = iter(range(1_000_000))

    def cid() -> str:
        return f"corral-bench-{os.getpid()}-{next(counter)}"

    try:
        for template in plan.templates:
            rootfs = Path(plan.rootfs[template])
            for userns in (False, True):
                system = f"{label}, {'userns' if userns else 'no userns'}"
                samples: list[float] = []
                for _ in range(plan.runs):
                    name = cid()
                    bundle = oci.bundle(rootfs, _TRUE, userns, name)
                    ms, proc = oci.run_once(bundle, name)
                    if proc.returncode != 0:
                        rows.append(Row.failed("run /bin/true", system, template, proc.stderr))
                        break
                    samples.append(ms)
                else:
                    rows.append(Row.latency("run /bin/true", system, template, samples))
            rows += _oci_exec(oci, rootfs, template, label, plan, cid)
        rootfs = Path(plan.rootfs[plan.templates[0]])
        rows += _oci_concurrent(oci, rootfs, plan.templates[0], label, plan, cid)
        rows += _oci_idle(oci, rootfs, plan.templates[0], label, plan, cid)
    finally:
        oci.remove_all()
        _cleanup_cgroups(_CGROUP_PARENT)
    return rows


def _oci_exec(
    oci: Oci, rootfs: Path, template: str, label: str, plan: Plan, cid: Callable[[], str]
) -> list[Row]:
    system = f"{label} exec, userns"
    name = cid()
    started = oci.start(oci.bundle(rootfs, _SLEEP, True, name), name)
    if started.returncode != 0:
        return [Row.failed("exec round trip", system, template, started.stderr)]
    try:
        samples: list[float] = []
        for _ in range(plan.runs):
            ms, proc = _timed(oci.argv("exec", name, *_TRUE))
            if proc.returncode != 0:
                return [Row.failed("exec round trip", system, template, proc.stderr)]
            samples.append(ms)
        return [Row.latency("exec round trip", system, template, samples)]
    finally:
        oci.remove(name)


def _oci_concurrent(
    oci: Oci, rootfs: Path, template: str, label: str, plan: Plan, cid: Callable[[], str]
) -> list[Row]:
    system = f"{label} run -d, userns"
    names = [cid() for _ in range(plan.concurrency)]
    bundles = {n: oci.bundle(rootfs, _SLEEP, True, n) for n in names}
    return [
        _concurrently(
            system,
            template,
            names,
            lambda n: oci.start(bundles[n], n),
            oci.remove,
            plan.concurrency,
        )
    ]


def _oci_idle(
    oci: Oci, rootfs: Path, template: str, label: str, plan: Plan, cid: Callable[[], str]
) -> list[Row]:
    system = f"{label}, userns"
    names = [cid() for _ in range(plan.idle)]
    bundles = {n: oci.bundle(rootfs, _SLEEP, True, n) for n in names}
    start = lambda n: oci.start(bundles[n], n)  # noqa: E731
    return [_idle_memory(system, template, names, start, oci.pid, oci.remove)]


def _concurrently(
    system: str,
    template: str,
    names: list[str],
    start: Callable[[str], subprocess.CompletedProcess[str]],
    remove: Callable[[str], None],
    n: int,
) -> Row:
    metric = f"{n} concurrent creates"
    began = time.perf_counter()

    def one(name: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.perf_counter()
        proc = start(name)
        return (time.perf_counter() - t0) * 1000, proc

    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            results = list(pool.map(one, names))
        wall = time.perf_counter() - began
    finally:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(remove, names))
    failed = [p for _, p in results if p.returncode != 0]
    if failed:
        return Row.failed(metric, system, template, f"{len(failed)}/{n} failed: {failed[0].stderr}")
    each = sorted(ms for ms, _ in results)
    note = f"each: p50 {each[len(each) // 2]:.0f} ms, max {each[-1]:.0f} ms"
    return Row(metric, system, template, f"all running after {wall:.2f} s", str(n), note)


def _helper_pss(ids: list[str], exclude: set[int]) -> int:
    """PSS of host processes serving these containers (shims, conmon): their cmdline names them."""
    wanted = [i.encode() for i in ids if i]
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if any(w in cmdline for w in wanted):
            total += _own_pss(int(entry))
    return total


def _own_pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _idle_memory(
    system: str,
    template: str,
    names: list[str],
    start: Callable[[str], subprocess.CompletedProcess[str]],
    pid_of: Callable[[str], int],
    remove: Callable[[str], None],
) -> Row:
    metric = "host memory per idle sandbox"
    before = _settled(host_used_bytes)
    kernel_before = _settled(host_kernel_bytes)
    started: list[str] = []
    ids: list[str] = []
    try:
        for name in names:
            proc = start(name)
            if proc.returncode != 0:
                return Row.failed(metric, system, template, proc.stderr)
            started.append(name)
            ids += [name, proc.stdout.strip()]
        time.sleep(1)
        after = _settled(host_used_bytes)
        kernel_after = _settled(host_kernel_bytes)
        pids = [pid_of(n) for n in names]
        own_pids = {p for pid in pids if pid for p in (pid, *_descendants(pid))}
        own = sum(_own_pss(p) for p in own_pids)
        helpers = _helper_pss(ids, own_pids)
    finally:
        for name in started:
            remove(name)
    # Measured again once they are gone: the mean of before and after cancels the host's drift.
    time.sleep(1)
    before = (before + _settled(host_used_bytes)) // 2
    kernel_before = (kernel_before + _settled(host_kernel_bytes)) // 2
    n = len(names)
    mib = 2**20
    kernel = (kernel_after - kernel_before) / n / mib
    return Row(
        metric,
        system,
        template,
        f"{helpers / n / mib + kernel:.2f} MiB beyond its own processes",
        str(n),
        f"helper processes {helpers / n / mib:.2f} MiB PSS + kernel {kernel:.2f} MiB each;"
        f" host used (MemTotal-MemAvailable, noisy) {(after - before) / n / mib:+.2f} MiB each;"
        f" the container's own processes {own / n / mib:.2f} MiB PSS",
    )


def _crun_rows(plan: Plan, work: Path) -> list[Row]:
    """crun as installed, then crun in a private mount namespace without the cgroup2 mount."""
    rows: list[Row] = []
    template = plan.templates[0]
    oci = Oci("crun", work / "crun-direct-state", work)
    for userns in (False, True):
        name = f"corral-bench-direct-{os.getpid()}-{userns:d}"
        _ms, proc = oci.run_once(oci.bundle(Path(plan.rootfs[template]), _TRUE, userns, name), name)
        system = f"crun {_version('crun')}, {'userns' if userns else 'no userns'}"
        if proc.returncode != 0:
            rows.append(Row.failed("run /bin/true", system, template, proc.stderr))
    oci.remove_all()
    _cleanup_cgroups(_CGROUP_PARENT)
    if not rows:
        return _oci_suite("crun", plan, f"crun {_version('crun')}", work)
    # crun 1.8 refuses to run when the hybrid layout's cgroup2 mount has controllers (hugetlb
    # here), even with cgroups disabled. Without that mount (private mount namespace, host
    # untouched) it runs, cgroup v1 limits and user namespaces included.
    spec = work / "crun-plan.json"
    spec.write_text(json.dumps(plan.__dict__), encoding="utf-8")
    worker = [
        "unshare", "--mount", "--propagation", "private", "--",
        sys.executable, "-m", "bench.peers", "_crun-worker", str(spec), str(work),
    ]  # fmt: skip
    proc = _run(worker, timeout=1800, cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        rows.append(Row.failed("run /bin/true", "crun, private mount ns", template, proc.stderr))
        return rows
    rows += [Row(**r) for r in json.loads(proc.stdout)]
    return rows


def _crun_worker(spec: Path, work: Path) -> int:
    umount = _run(["umount", "/sys/fs/cgroup/unified"])
    if umount.returncode != 0:
        print(umount.stderr, file=sys.stderr)
        return 1
    data = json.loads(spec.read_text(encoding="utf-8"))
    data["templates"] = tuple(data["templates"])
    plan = Plan(**data)
    label = f"crun {_version('crun')} (private mount ns without cgroup2)"
    rows = _oci_suite("crun", plan, label, work)
    print(json.dumps([r.__dict__ for r in rows]))
    return 0


def _version(tool: str) -> str:
    try:
        out = _run([tool, "--version"], timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    for word in out.replace(",", " ").split():
        if word[:1].isdigit():
            return word
    return "?"


# ---------------------------------------------------------------------------------------------
# Engines: docker (private dockerd) and podman (private storage)


@dataclass
class Engine:
    label: str
    cli: list[str]
    run_flags: list[str]
    rm_flags: tuple[str, ...] = ("-f",)

    def argv(self, *args: str) -> list[str]:
        return [*self.cli, *args]

    def import_rootfs(self, rootfs: Path, image: str) -> subprocess.CompletedProcess[str]:
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            return _run(self.argv("import", "-", image), timeout=600, stdin=tar.stdout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()

    def start(self, image: str, name: str) -> subprocess.CompletedProcess[str]:
        return _run(
            self.argv("run", "-d", "--name", name, *self.run_flags, image, *_SLEEP), timeout=300
        )

    def pid(self, name: str) -> int:
        proc = _run(self.argv("inspect", "--format", "{{.State.Pid}}", name))
        try:
            return int(proc.stdout.strip())
        except ValueError:
            return 0

    def remove(self, name: str) -> None:
        _run(self.argv("rm", *self.rm_flags, name), timeout=120)


def _engine_suite(engine: Engine, plan: Plan, images: dict[str, str]) -> list[Row]:
    rows: list[Row] = []
    counter = iter(range(1_000_000))

    def name() -> str:
        return f"corral-bench-{os.getpid()}-{next(counter)}"

    for template, image in images.items():
        samples: list[float] = []
        for _ in range(plan.engine_runs):
            ms, proc = _timed(engine.argv("run", "--rm", *engine.run_flags, image, *_TRUE))
            if proc.returncode != 0:
                rows.append(Row.failed("run --rm /bin/true", engine.label, template, proc.stderr))
                break
            samples.append(ms)
        else:
            rows.append(Row.latency("run --rm /bin/true", engine.label, template, samples))
        if samples:
            rows += _engine_exec(engine, plan, template, image, name())
            rows += _engine_pause(engine, plan, template, image, name())
            rows += _engine_commit(engine, plan, template, image, name())
    if not any(r.value != "**fails**" for r in rows):
        return rows
    template, image = next(iter(images.items()))
    names = [name() for _ in range(plan.concurrency)]
    rows.append(
        _concurrently(
            f"{engine.label} run -d",
            template,
            names,
            lambda n: engine.start(image, n),
            engine.remove,
            plan.concurrency,
        )
    )
    names = [name() for _ in range(plan.idle)]
    rows.append(
        _idle_memory(
            engine.label,
            template,
            names,
            lambda n: engine.start(image, n),
            engine.pid,
            engine.remove,
        )
    )
    return rows


def _engine_pause(engine: Engine, plan: Plan, template: str, image: str, name: str) -> list[Row]:
    """``pause`` and ``unpause`` of a running container (the peer of corral's pause/resume)."""
    started = engine.start(image, name)
    if started.returncode != 0:
        return [Row.failed("pause", f"{engine.label} pause", template, started.stderr)]
    try:
        paused: list[float] = []
        resumed: list[float] = []
        for _ in range(plan.engine_runs):
            for verb, samples in (("pause", paused), ("unpause", resumed)):
                ms, proc = _timed(engine.argv(verb, name))
                if proc.returncode != 0:
                    return [Row.failed(verb, f"{engine.label} {verb}", template, proc.stderr)]
                samples.append(ms)
        return [
            Row.latency("pause", f"{engine.label} pause", template, paused),
            Row.latency("resume", f"{engine.label} unpause", template, resumed),
        ]
    finally:
        engine.remove(name)


def _engine_commit(engine: Engine, plan: Plan, template: str, image: str, name: str) -> list[Row]:
    """What a user scripts for snapshot and fork without corral: ``commit`` of a container that
    wrote 1 GiB, then ``run -d`` of the commit, 10 times (the peer of fork x10)."""
    started = engine.start(image, name)
    if started.returncode != 0:
        return [Row.failed("snapshot", f"{engine.label} commit", template, started.stderr)]
    committed: list[float] = []
    tag = f"{name}-snap"
    forks = [f"{name}-fork{i}" for i in range(10)]
    try:
        runs = max(1, min(3, plan.engine_runs))
        for i in range(runs):
            write = ["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=1024", "conv=fsync"]
            proc = _run(engine.argv("exec", name, *write), timeout=600)
            if proc.returncode != 0:
                return [Row.failed("snapshot", f"{engine.label} commit", template, proc.stderr)]
            ms, proc = _timed(engine.argv("commit", name, f"{tag}:{i}"))
            if proc.returncode != 0:
                return [Row.failed("snapshot", f"{engine.label} commit", template, proc.stderr)]
            committed.append(ms)
        t0 = time.perf_counter()
        for fork in forks:
            proc = engine.start(f"{tag}:0", fork)
            if proc.returncode != 0:
                return [Row.failed("fork x10", f"{engine.label} run -d", template, proc.stderr)]
        total = (time.perf_counter() - t0) * 1000
        return [
            Row.latency(
                "snapshot after writing 1 GiB",
                f"{engine.label} commit",
                template,
                committed,
                "copies the 1 GiB layer",
            ),
            Row(
                "fork x10",
                f"{engine.label} run -d of the commit",
                template,
                f"{total:.0f} ms in all · {total / 10:.1f} ms each",
                "10",
                "one after another",
            ),
        ]
    finally:
        for fork in forks:
            engine.remove(fork)
        engine.remove(name)
        for i in range(3):
            _run(engine.argv("rmi", "-f", f"{tag}:{i}"), timeout=120)


def _engine_exec(engine: Engine, plan: Plan, template: str, image: str, name: str) -> list[Row]:
    system = f"{engine.label} exec"
    started = engine.start(image, name)
    if started.returncode != 0:
        return [Row.failed("exec round trip", system, template, started.stderr)]
    try:
        samples: list[float] = []
        for _ in range(plan.engine_runs):
            ms, proc = _timed(engine.argv("exec", name, *_TRUE))
            if proc.returncode != 0:
                return [Row.failed("exec round trip", system, template, proc.stderr)]
            samples.append(ms)
        return [Row.latency("exec round trip", system, template, samples)]
    finally:
        engine.remove(name)


@contextlib.contextmanager
def _private_dockerd(work: Path) -> Iterator[tuple[list[str] | None, str]]:
    """A dockerd of our own (own socket, state, no bridge or iptables): (cli, error)."""
    dockerd = shutil.which("dockerd")
    docker = shutil.which("docker")
    if dockerd is None or docker is None:
        yield None, "dockerd/docker not installed (bench/setup-peers.sh installs docker.io)"
        return
    sock = work / "docker.sock"
    log = work / "dockerd.log"
    cli = [docker, "-H", f"unix://{sock}"]
    argv = [
        dockerd,
        "--host", f"unix://{sock}",
        "--data-root", str(work / "docker-data"),
        "--exec-root", str(work / "docker-exec"),
        "--pidfile", str(work / "docker.pid"),
        "--bridge", "none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--userland-proxy=false",
    ]  # fmt: skip
    existed = _cgroup_dirs("docker")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if _run([*cli, "version"], timeout=10).returncode == 0:
                break
            time.sleep(0.3)
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            yield None, "dockerd did not come up: " + " / ".join(tail)
            return
        yield cli, ""
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _cleanup_cgroups("docker", existed)


def _engine_rows(kind: str, plan: Plan, work: Path) -> list[Row]:
    template0 = plan.templates[0]
    work.mkdir(parents=True, exist_ok=True)
    if kind == "docker":
        with _private_dockerd(work) as (cli, error):
            if cli is None:
                return [Row.failed("run --rm /bin/true", "docker", template0, error)]
            docker: list[str] = cli
            version = _run([*docker, "version", "--format", "{{.Server.Version}}"]).stdout.strip()
            engine = Engine(f"docker {version} (runc, no userns)", docker, ["--network", "none"])
            return _with_images(engine, plan, lambda img: _run([*docker, "rmi", "-f", img]))
    podman = shutil.which("podman")
    if podman is None:
        return [Row.failed("run --rm /bin/true", "podman", template0, "podman not installed")]
    store = work / "podman"
    cli = [
        podman,
        "--root", str(store / "root"),
        "--runroot", str(store / "run"),
        "--tmpdir", str(store / "tmp"),
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "none",
    ]  # fmt: skip
    version = _version("podman")
    # Podman raises RLIMIT_NOFILE/NPROC to its own defaults, which needs CAP_SYS_RESOURCE; hosts
    # like this one withhold it (even its own current limits are refused), so set runc's defaults.
    limits = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
    existed = _cgroup_dirs("libpod_parent")
    rows: list[Row] = []
    try:
        variants = [
            (f"podman {version} (default runtime)", []),
            (f"podman {version} --runtime runc", ["--runtime", "runc"]),
        ]
        for label, extra in variants:
            # -t 0: kill at once; the default waits 10 s for a SIGTERM that sleep as pid 1 ignores.
            engine = Engine(
                label, [*cli, *extra], ["--network", "none", *limits], ("-f", "-t", "0")
            )
            rows += _with_images(engine, plan, lambda img: None)
    finally:
        _run([*cli, "rm", "-af", "-t", "0"], timeout=300)
        _run([*cli, "rmi", "-af"], timeout=300)
        _run([*cli, "system", "reset", "-f"], timeout=300)
        remove_tree(store)
        _cleanup_cgroups("libpod_parent", existed)
    return rows


def _with_images(engine: Engine, plan: Plan, rmi: Callable[[str], object]) -> list[Row]:
    images: dict[str, str] = {}
    try:
        for template in plan.templates:
            image = f"corral-bench/{template}:latest"
            proc = engine.import_rootfs(Path(plan.rootfs[template]), image)
            if proc.returncode != 0:
                return [Row.failed("import rootfs", engine.label, template, proc.stderr)]
            images[template] = image
        return _engine_suite(engine, plan, images)
    finally:
        for image in images.values():
            rmi(image)


# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="/var/lib/corral", help="where the templates are built")
    p.add_argument("--templates", default="minimal,base")
    p.add_argument("--only", default="runc,crun,docker,podman")
    p.add_argument("--runs", type=int, default=100, help="runs per OCI runtime measurement")
    p.add_argument("--engine-runs", type=int, default=30, help="runs per docker/podman measurement")
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--idle", type=int, default=50, help="idle containers for the memory figure")
    p.add_argument("--no-write", action="store_true", help="print only, do not update results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_crun-worker"]:
        return _crun_worker(Path(argv[1]), Path(argv[2]))
    args = _parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench.peers: needs root (OCI runtimes, cgroups, namespaces)", file=sys.stderr)
        return 1
    templates = tuple(t for t in args.templates.split(",") if t)
    data_dir = Path(args.data_dir)
    for t in templates:
        build_in_data_dir(t, data_dir)
    plan = Plan(
        templates,
        {t: str(rootfs_path(data_dir, t)) for t in templates},
        args.runs,
        args.engine_runs,
        args.concurrency,
        args.idle,
    )
    only = set(args.only.split(","))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="corral-bench-peers-") as tmp:
        work = Path(tmp)
        try:
            if "runc" in only:
                rows += _oci_suite("runc", plan, f"runc {_version('runc')}", work)
                print(table(rows), file=sys.stderr)
            if "crun" in only:
                rows += _crun_rows(plan, work)
            for kind in ("docker", "podman"):
                if kind in only:
                    rows += _engine_rows(kind, plan, work / kind)
        finally:
            remove_tree(work)  # detaches anything an engine left mounted before deleting
            work.mkdir()  # TemporaryDirectory removes it again
    publish("peers", "Peers (the floor)", "python -m bench.peers", rows, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
