"""The microvm tier: one QEMU guest per sandbox, with its own kernel.

Status (issue 5, first slice): a sandbox boots Debian's cloud kernel with corral's initramfs,
its root on a qcow2 overlay of an ext4 image of the template, and the same agent as the
container tier as its pid 1, reached over a multiplexed virtio-serial port (``corral.vm.mux``);
exec, processes, files and PTYs therefore work as in containers. Pause and resume stop and
continue the vCPUs. Networking: the sandbox's namespace is plumbed as a container's and a tap
in it is wired to the guest's NIC (``corral.vm.net``). Not yet: snapshots, hibernation, warm-template cloning, the jailer (QEMU still runs as root, in its
own session only); those raise a clear error or are documented in
``docs/microvm.md``.

Host layout under ``data_dir``::

    vms/<id>/      disk.qcow2 (overlay of the warm template's disk), console.log (the guest's
                   serial console), qemu.log, qemu.pid, env (NUL-separated environment),
                   meta.json
    vm-cache/      initramfs-<hash>.cpio, <template>-<hash>.ext4 (template images),
                   warm-<hash>/ (a booted template: disk.qcow2, mem, state)

and ``/run/corral/vm-<hash of data_dir>/<id>/{agent,qmp}.sock`` (a socket path must be short).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    RuntimeFailure,
    SandboxNotRunningError,
    SnapshotUnusableError,
)
from corral.host.cgroups import remove_cgroup_tree, sandbox_cgroup_dirs
from corral.host.pool import Pool, clone_file
from corral.host.process import cpu_seconds, start_time
from corral.host.uidrange import SlotAllocator
from corral.runtime.base import SandboxSpec, Usage
from corral.runtime.undo import undone_on_failure
from corral.vm.guest import (
    GuestKernel,
    build_initramfs,
    find_kernel,
    layered_root_image,
    qemu_img,
    root_image,
)
from corral.vm.mux import PortMux, Streams
from corral.vm.net import VmNet, add_tap, fresh_netns_fd, wire_tap
from corral.vm.qemu import (
    Jail,
    QemuConfig,
    Qmp,
    choose_accel,
    qemus_serving,
    save_state,
    start_incoming,
    start_qemu,
)

__all__ = ["MicroVMRuntime"]

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# What a hibernated VM keeps in its directory; the rest goes with its QEMU.
_KEPT = frozenset({"disk.qcow2", "state", "env", "meta.json", "restoring"})
# Each QEMU runs as a uid of its own from here on (one per VM, and one per template being
# built), above the container tier's ranges (1<<30 + 65536 per sandbox).
_FIRST_UID = 3 << 30
_UID_SLOTS = 1 << 16
# QEMU's own memory beyond guest RAM: device emulation, I/O buffers and the TCG translation
# cache (capped with tb-size below).
_QEMU_OVERHEAD_MB = 192
# Every clone's NIC starts with the template's MAC; ``_personalize`` gives it the sandbox's.
_TEMPLATE_MAC = "52:54:00:c0:4a:11"
_LIMITING = frozenset({"memory", "cpu", "cpuacct", "cpu,cpuacct", "pids"})


async def _qcow2_overlay(
    backing: Path, backing_format: str, disk: Path, size: int | None = None
) -> None:
    """``disk``: an empty qcow2 overlay of ``backing``; with ``size``, made without opening
    ``backing`` (it may not be at that path yet)."""
    argv = [qemu_img(), "create", "-q", "-f", "qcow2", "-F", backing_format, "-b", str(backing)]
    argv += [str(disk)] if size is None else ["-u", str(disk), str(size)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeFailure(f"qemu-img create failed: {out.decode(errors='replace')}")


async def _until_running(
    qmp: Qmp, timeout: float, before_run: Callable[[], None] | None = None
) -> None:
    """Wait for an incoming VM state to be loaded, then let it run; ``before_run`` is called
    between the two (a wake spends its saved state there: see ``_launch``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = (await qmp.execute("query-status")).get("status")
        if status == "running":
            if before_run is not None:
                before_run()
            return
        if status in ("paused", "postmigrate", "prelaunch"):
            if before_run is not None:
                before_run()
            await qmp.execute("cont")
            return
        if status in ("internal-error", "shutdown", "guest-panicked"):
            break
        await asyncio.sleep(0.002)
    raise RuntimeFailure(f"the VM did not start from its template ({status})")


async def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    start = start_time(pid)
    deadline = time.monotonic() + timeout
    while start is not None and start_time(pid) == start and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace ``path`` whole (a crash leaves the old or the new file, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _state_of(source: Path, shape: dict[str, Any], what: str) -> Path | None:
    """The saved memory in ``source`` (a snapshot), if it has one that fits ``shape``."""
    state = source / "state"
    if not state.is_file():
        return None  # a snapshot of a VM that had lost its memory: its disk boots
    try:
        saved = json.loads((source / "meta.json").read_text()).get("shape")
    except (OSError, ValueError) as exc:
        raise SnapshotUnusableError(f"{what} has no readable description: {exc}") from exc
    if saved != shape:
        raise InvalidRequestError(
            f"{what} holds the memory of a VM with {_describe(saved)}; this one would have "
            f"{_describe(shape)} (start it with the snapshot's vCPUs and memory)"
        )
    return state


def _describe(shape: Any) -> str:
    if not isinstance(shape, dict):
        return "an unknown shape"
    nic = "a NIC" if shape.get("net") else "no NIC"
    return (
        f"{shape.get('vcpus')} vCPUs, {shape.get('memory_mb')} MiB, {nic}, "
        f"{shape.get('accel')} acceleration"
    )


def _backing_of(directory: Path) -> list[Path]:
    """The read-only images under the disk of ``directory`` (a VM's or a snapshot's)."""
    try:
        found = json.loads((directory / "meta.json").read_text()).get("backing") or []
    except (OSError, ValueError):
        found = []
    return [Path(p) for p in found]


def _hand_over(vdir: Path, rundir: Path, uid: int, shared: list[Path]) -> None:
    """Make what the jailed QEMU (``uid``) must use reachable by it, and nothing more: its disk
    and console file and its socket directory are its own; the shared images are readable.
    ``vdir`` itself stays root's (QEMU never sees it whole, only those files)."""
    console = vdir / "console.log"
    console.touch(mode=0o600)
    for path in (vdir / "disk.qcow2", console):
        os.chown(path, uid, uid, follow_symlinks=False)
    rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(rundir, uid, uid)
    os.chmod(vdir / "env", 0o644)
    for image in shared:
        mode = image.stat().st_mode & 0o777
        if mode & 0o444 != 0o444:
            os.chmod(image, mode | 0o444)


_PAGE = 4096
_ZERO_PAGE = bytes(_PAGE)


def _sealed_copy(path: Path) -> int:
    """A memfd holding ``path``'s content (its zero pages left as holes), sealed against any
    write, growth or shrinking: mappable private by anyone, modifiable by no one."""
    fd = os.memfd_create(f"corral-{path.parent.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(fd, size)
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(src, offset, os.SEEK_DATA)
                except OSError:
                    break  # only a hole is left
                end = os.lseek(src, start, os.SEEK_HOLE)
                while start < end:
                    chunk = os.pread(src, min(end - start, 1 << 20), start)
                    if not chunk:
                        break
                    view = memoryview(chunk)
                    for at in range(0, len(chunk), _PAGE):
                        page = view[at : at + _PAGE]
                        if page != _ZERO_PAGE[: len(page)]:
                            os.pwrite(fd, page, start + at)
                    start += len(chunk)
                offset = end
            os.posix_fadvise(src, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(src)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _loading(meta: dict[str, Any]) -> bool:
    """Whether the VM's QEMU is still loading a saved state. A wake unlinks its state before
    the guest runs, and the flag goes after: a flag whose file is gone is a finished load (the
    server died between the two), and that VM runs (reconcile resumes it if still paused)."""
    path = meta.get("loading")
    return isinstance(path, str) and Path(path).exists()


def _unlink_synced(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The guest's root filesystem: the ext4 on its disk, which corral's init mounts from /dev/vda.
_GUEST_DISK = "vda"
# How long ``usage`` waits for QEMU's status and then for the guest's agent before it falls
# back to what it knew (a snapshot or hibernation holds QMP for as long as its save lasts).
_USAGE_TIMEOUT_S = 2.0
_EXT4_MAGIC = 0xEF53
_EXT4_64BIT = 0x80


@dataclasses.dataclass(frozen=True)
class _Ext4Geometry:
    """What ``statfs`` of an ext4 reports as its size: ``blocks`` less ``overhead`` (journal,
    inode tables, bitmaps, superblock copies), in ``block_size`` units."""

    block_size: int
    blocks: int
    overhead: int

    @property
    def size(self) -> int:
        return (self.blocks - self.overhead) * self.block_size


def _ext4_geometry(image: Path) -> _Ext4Geometry | None:
    """The geometry in the superblock of the raw ext4 image ``image`` (None when it is none).

    mke2fs since 1.46.5 records the overhead; an older image's is taken as 0 (its figures
    then count the metadata as used, and in the size), as the kernel computes it at mount.
    """
    try:
        with open(image, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError:
        return None
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != _EXT4_MAGIC:
        return None
    log_block, log_cluster = struct.unpack_from("<II", sb, 0x18)
    if log_cluster != log_block:
        return None  # bigalloc: counts in clusters, which mb_groups does not say
    blocks = struct.unpack_from("<I", sb, 0x04)[0]
    if struct.unpack_from("<I", sb, 0x60)[0] & _EXT4_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    overhead = struct.unpack_from("<I", sb, 0x248)[0]
    return _Ext4Geometry(1024 << log_block, blocks, overhead)


def _meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` as bytes per name."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _free_blocks(mb_groups: str) -> int:
    """Free blocks of an ext4, the sum over its block groups in ``/proc/fs/ext4/<dev>/mb_groups``
    (``#<group> : <free> <frags> <first> [ ... ]``; the first line is a header)."""
    free = 0
    groups = 0
    for line in mb_groups.splitlines()[1:]:
        found = re.match(r"#\s*\d+\s*:\s*(\d+)\s", line)
        if found is None:
            raise ValueError(f"unexpected mb_groups line {line[:80]!r}")
        free += int(found.group(1))
        groups += 1
    if not groups:
        raise ValueError("mb_groups lists no block group")
    return free


def _rss(pid: int) -> int | None:
    """Resident memory of ``pid`` (VmRSS), in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _enter_cgroups(pid: int, cgroups: list[Path]) -> None:
    for d in cgroups:
        (d / "cgroup.procs").write_text(str(pid))  # v1 moves every thread of the process


class MicroVMRuntime:
    name = "microvm"

    def __init__(
        self,
        data_dir: Path,
        agent_binary: Path,
        *,
        ready_timeout: float = 90.0,
        accel: str | None = None,
        warm: bool = True,
        pool: Pool | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.agent_binary = Path(agent_binary)
        self.ready_timeout = ready_timeout
        self._cache = self.data_dir / "vm-cache"
        if accel is not None:
            self.accel, self.accel_reason = accel, "chosen by the caller"
        else:
            try:
                kernel: Path | None = find_kernel().vmlinuz
            except CorralError:
                kernel = None
            self.accel, self.accel_reason = choose_accel(kernel, self._cache / "accel.json")
        # Disks, hibernated states and snapshots live in the data dir's storage pool, so that
        # copying any of them is a reflink (shared with the container tier by ``build_runtime``).
        self._pool = pool or Pool(self.data_dir / "pool.img", self.data_dir / "pool")
        digest = hashlib.sha256(os.fsencode(self.data_dir.resolve())).hexdigest()[:12]
        self._run = Path("/run/corral") / f"vm-{digest}"
        self._uids = SlotAllocator(
            self.data_dir / "vm-uids", first_id=_FIRST_UID, size=1, slots=_UID_SLOTS
        )
        self._memfds: dict[Path, int] = {}
        self._memfd_lock = asyncio.Lock()
        self._muxes: dict[str, PortMux] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._warm_locks: dict[str, asyncio.Lock] = {}
        self._images_seen: dict[tuple[object, ...], tuple[Path, Path]] = {}
        # Per sandbox, the last usage its guest reported, and for which QEMU (pid, start time).
        self._last_usage: dict[str, tuple[tuple[int, object], Usage]] = {}
        self._geometries: dict[Path, _Ext4Geometry | None] = {}
        self.warm = warm
        self.last_create_timings: dict[str, float] = {}

    def describe(self) -> dict[str, str]:
        return {"accelerator": self.accel, "accelerator_reason": self.accel_reason}

    # ----------------------------------------------------------------------------- helpers
    def _check_id(self, sandbox_id: str) -> None:
        if not _ID_RE.match(sandbox_id) or ".." in sandbox_id:
            raise InvalidRequestError(f"invalid sandbox id {sandbox_id!r}")

    @property
    def _vms(self) -> Path:
        return self._pool.dir("vms")

    def _dir(self, sandbox_id: str) -> Path:
        return self._vms / sandbox_id

    def _snapshot_dir(self, snapshot_id: str) -> Path:
        if not _SNAPSHOT_RE.match(snapshot_id):
            raise InvalidRequestError(f"invalid snapshot id {snapshot_id!r}")
        return self._pool.dir("vm-snapshots") / snapshot_id

    def _sock(self, name: str, kind: str) -> Path:
        """A unix socket path of VM ``name``: under /run, because ``sun_path`` holds 108 bytes
        and a data dir can be deep (``_socket_dir`` makes the directory before QEMU starts)."""
        return self._run / name / f"{kind}.sock"

    def _socket_dir(self, name: str) -> None:
        (self._run / name).mkdir(mode=0o700, parents=True, exist_ok=True)

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _meta(self, sandbox_id: str) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((self._dir(sandbox_id) / "meta.json").read_text())
        except (OSError, ValueError):
            return {}
        return meta

    def _write_meta(self, sandbox_id: str, meta: dict[str, Any]) -> None:
        _write_json(self._dir(sandbox_id) / "meta.json", meta)

    def _pid(self, sandbox_id: str) -> int | None:
        meta = self._meta(sandbox_id)
        pid, start = meta.get("pid"), meta.get("start")
        if isinstance(pid, int) and isinstance(start, int) and start_time(pid) == start:
            return pid
        return None

    def _shape(self, spec: SandboxSpec, with_net: bool) -> dict[str, Any]:
        """What a saved VM state can only be loaded into: the same vCPUs, RAM, accelerator and
        devices (a NIC or not)."""
        return {
            "vcpus": max(1, round(spec.cpu)),
            "memory_mb": spec.memory_mb,
            "accel": self.accel,
            "net": with_net,
        }

    def console_log(self, sandbox_id: str) -> str:
        """The guest's serial console so far (kernel and init messages), for diagnostics."""
        try:
            return (self._dir(sandbox_id) / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------------------ create
    async def create(self, spec: SandboxSpec) -> None:
        sid = spec.sandbox_id
        self._check_id(sid)
        if not spec.layers:
            raise InvalidRequestError("a sandbox needs at least one template layer")
        if spec.netns is not None:
            raise InvalidRequestError("a new microvm cannot start in an existing namespace")
        async with self._lock(sid):
            if self._dir(sid).exists():
                raise ConflictError(f"sandbox {sid} already exists on this host")
            async with undone_on_failure(lambda: self._teardown(sid), f"create of {sid}"):
                await self._create(spec)

    async def _create(self, spec: SandboxSpec) -> None:
        sid = spec.sandbox_id
        timings: dict[str, float] = {}
        t = time.perf_counter()

        def step(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[name] = round((now - t) * 1000, 3)
            t = now

        shape = self._shape(spec, spec.network is not None)
        source: Path | None = None
        if spec.snapshot is not None:
            source = self._snapshot_dir(spec.snapshot)
            if not (source / "disk.qcow2").is_file():
                raise InvalidRequestError(
                    f"snapshot {spec.snapshot} is not a microvm snapshot on this host"
                )
            self._pool.require_room()
        vdir = self._dir(sid)
        vdir.mkdir(mode=0o700)
        self._socket_dir(sid)
        kernel, initramfs, image = await self._images(spec)
        disk = vdir / "disk.qcow2"
        state: Path | None = None
        memory_fd: int | None = None
        mac: str | None = None
        if source is not None:
            # The snapshot's disk and, when it has one, its memory: processes carry on.
            await asyncio.to_thread(clone_file, source / "disk.qcow2", disk)
            state = _state_of(source, shape, f"snapshot {spec.snapshot}")
            backing = _backing_of(source)
            step("disk")
        else:
            warm: Path | None = None
            if self.warm:
                warm = await self._warm_template(
                    kernel.vmlinuz, initramfs, image, shape["vcpus"], spec.memory_mb, shape["net"]
                )
            step("images")
            if warm is not None:  # frozen at the instant of the template's memory
                # A copy of an empty overlay made once with the template (qemu-img is a process
                # of its own: ~10 ms of every create).
                await asyncio.to_thread(shutil.copyfile, warm / "overlay.qcow2", disk)
                state, mac = warm / "state", _TEMPLATE_MAC
                memory_fd = await self._template_memory(warm)
                backing = [warm / "disk.qcow2", image]
            else:
                await _qcow2_overlay(image, "raw", disk)
                backing = [image]
            step("disk")
        await self._launch(
            spec,
            shape,
            kernel,
            initramfs,
            backing,
            state,
            memory_fd,
            template_mac=mac,
            step=step,
        )
        timings["total"] = round(sum(timings.values()), 3)
        self.last_create_timings = timings
        log.info("microvm %s created in %.0f ms: %s", sid, timings["total"], timings)

    async def _launch(
        self,
        spec: SandboxSpec,
        shape: dict[str, Any],
        kernel: GuestKernel,
        initramfs: Path,
        backing: list[Path],
        state: Path | None,
        memory_fd: int | None,
        *,
        template_mac: str | None = None,
        wake: bool = False,
        step: Callable[[str], None] = lambda _: None,
    ) -> None:
        """Start QEMU on the disk already in the sandbox's directory: from ``state`` (a warm
        template's, a snapshot's or its own hibernated one; then told who it is now) or, with
        none, by booting it."""
        sid = spec.sandbox_id
        vdir = self._dir(sid)
        env = vdir / "env"
        env.write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in spec.env.items()))
        uid = await asyncio.to_thread(self._uids.claim, sid)
        uid = self._uids.host_id(uid)
        await asyncio.to_thread(_hand_over, vdir, self._run / sid, uid, [initramfs, *backing])
        cfg = QemuConfig(
            name=sid,
            kernel=kernel.vmlinuz,
            initramfs=initramfs,
            disk=vdir / "disk.qcow2",
            agent_socket=self._sock(sid, "agent"),
            qmp_socket=self._sock(sid, "qmp"),
            console_log=vdir / "console.log",
            pid_file=vdir / "qemu.pid",
            env_file=env,
            hostname=spec.hostname,
            vcpus=shape["vcpus"],
            memory_mb=spec.memory_mb,
            accel=self.accel,
            jail=self._jail(uid, vdir, self._run / sid, (kernel.vmlinuz, initramfs, *backing)),
        )
        meta: dict[str, Any] = {"shape": shape, "accel": self.accel, "uid": uid}
        meta["backing"] = [str(p) for p in backing]
        net: VmNet | None = None
        if spec.netns is not None and self._meta(sid).get("net"):
            # Restarted in the namespace it had (a restore): the tap is still wired in it.
            net = VmNet(**self._meta(sid)["net"])
            cfg = replace(cfg, netns=spec.netns, mac=net.mac)
        elif spec.network is not None:
            netns, net = await self._plumb(spec, uid)
            cfg = replace(cfg, netns=netns, mac=net.mac)
            step("network")
        if net is not None:
            meta["net"] = dataclasses.asdict(net)
            if state is None:
                cfg = replace(cfg, net_config=net.guest_config())
            elif template_mac is not None:
                cfg = replace(cfg, mac=template_mac)  # personalize gives it the sandbox's
        cgroups = await asyncio.to_thread(self._make_cgroups, sid, spec)
        meta["cgroups"] = [str(d) for d in cgroups]
        self._write_meta(sid, meta)
        state_fd: int | None = None
        if state is not None:
            state_fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
            cfg = replace(cfg, memory_fd=memory_fd, incoming_fd=state_fd)
        try:
            pid = await start_qemu(cfg, vdir / "qemu.log")
        finally:
            if state_fd is not None:
                os.close(state_fd)
        meta.update(pid=pid, start=start_time(pid))
        if state is not None:
            # Until its state is loaded this QEMU is no running VM: a server that dies in
            # between must not adopt it as one (its agent would never answer). See _loading.
            meta["loading"] = str(state)
        self._write_meta(sid, meta)
        await asyncio.to_thread(_enter_cgroups, pid, cgroups)
        step("qemu")
        if state is not None:
            assert cfg.incoming_fd is not None
            try:
                # A wake's saved state is spent the moment the guest runs on: it goes before
                # that (a state file next to a disk is always the pair of it, which a crash at
                # any point can rely on; a QEMU left paused after this is resumed by reconcile).
                spend = (lambda: _unlink_synced(state)) if wake else None
                async with Qmp(self._sock(sid, "qmp")) as qmp:
                    await start_incoming(qmp, cfg.incoming_fd)
                    await _until_running(qmp, self.ready_timeout, before_run=spend)
            except RuntimeFailure as exc:
                tail = (vdir / "qemu.log").read_text(errors="replace")[-600:].strip()
                raise SnapshotUnusableError(
                    f"the saved state {state.name} of {state.parent.name} cannot be loaded: "
                    f"{tail or exc.message}"
                ) from exc
            meta.pop("loading", None)
            self._write_meta(sid, meta)
            step("restore")
        if state is None:
            await self._wait_ready(sid)
            step("agent_ready")
        else:
            # Saved with its agent answering: telling it who it is now is the first exchange,
            # and proof enough that it answers.
            await asyncio.wait_for(self._personalize(sid, spec, net), self.ready_timeout)
            step("personalize")

    async def _images(self, spec: SandboxSpec) -> tuple[GuestKernel, Path, Path]:
        """Kernel, initramfs and template image, remembered between creates: checking them
        means hashing a few MB, ~50 ms of a ~300 ms create."""
        kernel = find_kernel()
        rootfs = spec.layers[0]
        agent = self.agent_binary.stat()
        meta = rootfs.parent / "meta.json"
        stamp = meta.stat().st_mtime_ns if meta.exists() else rootfs.stat().st_mtime_ns
        names = tuple(str(p) for p in spec.layers)
        key = (kernel.version, agent.st_mtime_ns, agent.st_size, names, stamp, spec.disk_mb)
        known = self._images_seen.get(key)
        if known is not None and known[0].exists() and known[1].exists():
            return kernel, known[0], known[1]
        initramfs = await asyncio.to_thread(build_initramfs, self._cache, kernel, self.agent_binary)
        if len(spec.layers) == 1:  # a built-in template, or a template of one layer
            image = await asyncio.to_thread(
                root_image, self._cache, rootfs.parent.name, rootfs, spec.disk_mb
            )
        else:  # layers of the store: immutable, named by their digests
            image = await asyncio.to_thread(
                layered_root_image, self._cache, spec.layers, spec.disk_mb
            )
        self._images_seen[key] = (initramfs, image)
        return kernel, initramfs, image

    # ------------------------------------------------------------------ warm templates
    async def _warm_template(
        self,
        kernel: Path,
        initramfs: Path,
        image: Path,
        vcpus: int,
        memory_mb: int,
        with_net: bool,
    ) -> Path:
        """The saved, booted VM that creates of this shape clone (built on first use)."""
        key = hashlib.sha256(
            f"{kernel}|{initramfs.name}|{image.name}|{vcpus}|{memory_mb}|{with_net}|{self.accel}".encode()
        ).hexdigest()[:16]
        tdir = self._cache / f"warm-{key}"
        if (tdir / "ready").exists():
            return tdir
        async with self._warm_locks.setdefault(key, asyncio.Lock()):
            if not (tdir / "ready").exists():
                await self._build_template(
                    tdir, kernel, initramfs, image, vcpus, memory_mb, with_net
                )
        return tdir

    async def _build_template(
        self,
        tdir: Path,
        kernel: Path,
        initramfs: Path,
        image: Path,
        vcpus: int,
        memory_mb: int,
        with_net: bool,
    ) -> None:
        """Boot the template once with its RAM in a shared file, stop it with the agent
        answering, and save its device state beside it (Kata-style: ``x-ignore-shared`` keeps
        the RAM out of the stream). Everything lands under a temporary name, renamed at the end.
        """
        tmp = tdir.with_name(f".{tdir.name}.{secrets.token_hex(4)}")
        tmp.mkdir(mode=0o700, parents=True)
        tname = f"t-{secrets.token_hex(6)}"
        self._socket_dir(tname)
        netfd: int | None = None
        pid: int | None = None
        uid = self._uids.host_id(await asyncio.to_thread(self._uids.claim, tname))
        try:
            await _qcow2_overlay(image, "raw", tmp / "disk.qcow2")
            (tmp / "env").write_bytes(
                b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\0"
            )
            (tmp / "mem").touch(mode=0o600)  # its RAM, written through a shared mapping
            os.chown(tmp / "mem", uid, uid)
            await asyncio.to_thread(_hand_over, tmp, self._run / tname, uid, [initramfs, image])
            netns: Path | None = None
            if with_net:  # the clones' NIC must exist in the template too; any tap will do here
                netfd = await asyncio.to_thread(fresh_netns_fd)
                netns = Path(f"/proc/{os.getpid()}/fd/{netfd}")
                await asyncio.to_thread(add_tap, netns, uid)
            cfg = QemuConfig(
                name=f"template-{tdir.name}",
                kernel=kernel,
                initramfs=initramfs,
                disk=tmp / "disk.qcow2",
                agent_socket=self._sock(tname, "agent"),
                qmp_socket=self._sock(tname, "qmp"),
                console_log=tmp / "console.log",
                pid_file=tmp / "qemu.pid",
                env_file=tmp / "env",
                hostname="corral",
                vcpus=vcpus,
                memory_mb=memory_mb,
                accel=self.accel,
                netns=netns,
                mac=_TEMPLATE_MAC if with_net else None,
                memory_file=tmp / "mem",
                memory_shared=True,
                jail=self._jail(
                    uid, tmp, self._run / tname, (kernel, initramfs, image), tmp / "mem"
                ),
            )
            pid = await start_qemu(cfg, tmp / "qemu.log")
            mux = PortMux(self._sock(tname, "agent"))
            try:
                await self._await_agent(mux.open, lambda: start_time(pid or 0) is not None, tmp)
            finally:
                await mux.close()
            qmp = Qmp(self._sock(tname, "qmp"))
            await qmp.execute("stop")
            # x-ignore-shared keeps the RAM (in the shared file) out of the stream: ~0.5 MB.
            await self._save(self._sock(tname, "qmp"), tmp / "state")
            with contextlib.suppress(RuntimeFailure):
                await qmp.execute("quit")
            await _wait_gone(pid)
            pid = None
            shutil.rmtree(self._run / tname, ignore_errors=True)
            # Every clone's disk starts as a copy of this empty overlay of the template's disk.
            await _qcow2_overlay(
                tdir / "disk.qcow2", "qcow2", tmp / "overlay.qcow2", image.stat().st_size
            )
            (tmp / "ready").touch()
            os.replace(tmp, tdir)
        except BaseException:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await _wait_gone(pid)
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(self._run / tname, ignore_errors=True)
            raise
        finally:
            await asyncio.to_thread(self._uids.release, tname)
            if netfd is not None:
                os.close(netfd)

    def _jail(
        self, uid: int, vdir: Path, rundir: Path, shared: tuple[Path, ...], *more: Path
    ) -> Jail:
        """What the QEMU of ``vdir`` may see: the shared images read-only; its disk, console,
        socket directory (and ``more``) writable; nothing else of the host but /usr."""
        root = self._run / ".jail"  # only ever a mount point, in each jail's own namespace
        root.mkdir(mode=0o755, parents=True, exist_ok=True)
        devices = [Path("/dev/null"), Path("/dev/urandom"), Path("/dev/net/tun")]
        groups: tuple[int, ...] = ()
        if self.accel == "kvm":
            devices.append(Path("/dev/kvm"))
            groups = (os.stat("/dev/kvm").st_gid,)
        return Jail(
            uid=uid,
            root=root,
            read_only=(*shared, vdir / "env"),
            read_write=(vdir / "disk.qcow2", vdir / "console.log", rundir, *more),
            devices=tuple(d for d in devices if d.exists()),
            groups=groups,
        )

    async def _template_memory(self, warm: Path) -> int:
        """The warm template's RAM as a sealed memfd, made once per server: clones map it
        private, so they share its pages until they write them, and no clone's QEMU can ever
        write to it (QEMU 7.2 opens a memory file read-write even to map it private: a plain
        file would be writable by every clone)."""
        async with self._memfd_lock:
            fd = self._memfds.get(warm)
            if fd is None:
                fd = self._memfds[warm] = await asyncio.to_thread(_sealed_copy, warm / "mem")
            return fd

    async def _personalize(self, sid: str, spec: SandboxSpec, net: VmNet | None) -> None:
        """What a clone of the template must be told: its environment, name, clock, fresh
        entropy (every clone starts from the same RNG state) and its network."""
        from corral.agent import AgentClient

        client = AgentClient(lambda: self.open_agent(sid))
        # Name, clock, fresh entropy and the network, applied by vmux in one frame: no process
        # to start (a clone's first fork and exec cost ~100 ms under TCG). Independent of the
        # agent's environment: both at once.
        fields = [spec.hostname, str(time.time_ns()), secrets.token_hex(64)]
        if net is not None:
            fields += [net.mac, net.address, net.gateway, net.gateway_mac]
        await asyncio.gather(client.set_env(spec.env), self._mux(sid).clone(fields))

    def _make_cgroups(self, sid: str, spec: SandboxSpec) -> list[Path]:
        """QEMU's cgroups: guest RAM plus QEMU's own overhead, the vCPUs' share of CPU, and a
        pids cap, so a VM cannot take more of the host than a container of the same size."""
        made: list[Path] = []
        limits = {
            "memory.limit_in_bytes": str((spec.memory_mb + _QEMU_OVERHEAD_MB) * 1024 * 1024),
            "memory.memsw.limit_in_bytes": None,
            "cpu.cfs_period_us": "100000",
            "cpu.cfs_quota_us": str(int(max(1, round(spec.cpu)) * 100000 + 50000)),
            "pids.max": "256",
        }
        for d in sandbox_cgroup_dirs(f"corral-vm-{sid}"):
            # Only the limiting controllers: a cpuset child would need cpus and mems set first,
            # and the others limit nothing a VM does.
            if not _LIMITING.intersection(d.parts):
                continue
            d.mkdir(exist_ok=True)
            made.append(d)
            for name, value in limits.items():
                knob = d / name
                if value is not None and knob.exists():
                    knob.write_text(value)
        return made

    async def _plumb(self, spec: SandboxSpec, uid: int) -> tuple[Path, VmNet]:
        """The sandbox's namespace, plumbed by the network layer (the hook), with the tap wired
        in. The runtime makes the namespace; the network layer owns it from then on and
        removes it when the sandbox goes (as for a container)."""
        assert spec.network is not None
        fd = await asyncio.to_thread(fresh_netns_fd)
        try:
            netns = await spec.network(Path(f"/proc/{os.getpid()}/fd/{fd}"))
        finally:
            os.close(fd)
        return netns, await asyncio.to_thread(wire_tap, netns, uid)

    async def _wait_ready(self, sid: str) -> None:
        await self._await_agent(
            lambda: self.open_agent(sid), lambda: self._pid(sid) is not None, self._dir(sid)
        )

    async def _await_agent(
        self, opener: Callable[[], Awaitable[Streams]], alive: Callable[[], bool], vdir: Path
    ) -> None:
        from corral.agent import AgentClient

        deadline = time.monotonic() + self.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not alive():
                try:
                    tail = (vdir / "console.log").read_text(errors="replace")[-1500:]
                except OSError:
                    tail = ""
                raise RuntimeFailure(f"the VM {vdir.name} exited while booting; console:\n{tail}")
            try:
                await asyncio.wait_for(AgentClient(opener).ping(), timeout=2.0)
                return
            except (CorralError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                last = exc
            await asyncio.sleep(0.005)
        raise RuntimeFailure(
            f"the agent of VM {vdir.name} did not answer within {self.ready_timeout} s ({last!r})"
        )

    # ------------------------------------------------------------------------------ destroy
    async def destroy(self, sandbox_id: str) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            await self._teardown(sandbox_id)
        self._locks.pop(sandbox_id, None)

    async def _teardown(self, sid: str, *, keep_disk: bool = False) -> None:
        """Kill QEMU and remove every trace of ``sid``; ``keep_disk``: all but its disk, saved
        memory and settings (hibernation)."""
        self._last_usage.pop(sid, None)
        mux = self._muxes.pop(sid, None)
        if mux is not None:
            await mux.close()
        pid = self._pid(sid)
        meta = self._meta(sid)
        start = meta.get("start")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while start_time(pid) == start and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if start_time(pid) == start:
                raise RuntimeFailure(f"QEMU of {sid} (pid {pid}) did not die")
        else:
            # A server that died between starting QEMU and recording its pid left one that
            # only its command line names.
            for stray in await asyncio.to_thread(qemus_serving, self._sock(sid, "qmp")):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stray, signal.SIGKILL)
                await _wait_gone(stray)
        cgroups = [Path(d) for d in meta.get("cgroups", [])] or sandbox_cgroup_dirs(
            f"corral-vm-{sid}"
        )
        for d in cgroups:
            try:
                await asyncio.to_thread(remove_cgroup_tree, d)
            except OSError as exc:
                raise RuntimeFailure(f"cgroup {d} of {sid}: {exc}") from exc
        vdir = self._dir(sid)
        if keep_disk and (vdir / "disk.qcow2").is_file():
            for entry in vdir.iterdir():
                if entry.name not in _KEPT:
                    entry.unlink(missing_ok=True)
            kept: dict[str, Any] = {k: meta[k] for k in ("shape", "net", "backing") if k in meta}
            self._write_meta(sid, {**kept, "hibernated": True})
        else:
            shutil.rmtree(vdir, ignore_errors=True)
            await asyncio.to_thread(self._uids.release, sid)
        shutil.rmtree(self._run / sid, ignore_errors=True)

    # ------------------------------------------------------------------------- pause/resume
    async def pause(self, sandbox_id: str) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            await self._qmp(sandbox_id, "stop")

    async def resume(self, sandbox_id: str) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            await self._qmp(sandbox_id, "cont")

    async def _qmp(self, sandbox_id: str, command: str) -> Any:
        if self._pid(sandbox_id) is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running")
        return await Qmp(self._sock(sandbox_id, "qmp")).execute(command)

    async def cpu_seconds(self, sandbox_id: str) -> float:
        pid = self._pid(sandbox_id)
        used = cpu_seconds(pid, os.sysconf("SC_CLK_TCK")) if pid is not None else None
        if used is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running")
        return used

    async def usage(self, sandbox_id: str) -> Usage:
        """What the VM uses. ``cpu_seconds`` is always QEMU's own CPU time (as ``cpu_seconds``:
        the vCPUs, device emulation and, under TCG, translation). The rest is the guest's own
        view, read through its agent (three small file reads, no process started):

        - memory, from the guest's ``/proc/meminfo``: ``memory_total`` is ``MemTotal`` (the
          VM's RAM less what its kernel reserved for itself: a few % under ``memory_mb``),
          ``memory_used`` is ``MemTotal - MemAvailable`` (what ``free`` calls used: processes,
          tmpfs and the kernel's unreclaimable memory), ``memory_cache`` is ``Cached``;
        - disk, what ``df /`` inside says: the root ext4's free blocks summed over its block
          groups (``/proc/fs/ext4/vda/mb_groups``) less the blocks promised to writes not yet
          allocated (``/sys/fs/ext4/vda/delayed_allocation_blocks``), against its size (blocks
          less metadata overhead) from the superblock of the template image it was made from.
          Space freed inside shows once the guest's journal commits (within ~5 s).

        When the guest cannot answer (paused, or QEMU busy saving it for a snapshot) the last
        values it gave for this QEMU are returned, which a stopped guest cannot have changed. With none yet (paused since before this server started): host-side figures,
        ``memory_used`` the QEMU process's RSS, ``memory_cache`` 0, ``memory_total`` the VM's
        RAM, ``disk_used`` what the VM's own disk overlay holds on the host (what it wrote
        since it was cloned from its template, not the template's files), ``disk_total`` as
        above. A disk whose figures cannot be read in the guest (another kernel, no ext4
        root) gets the same host-side disk figures.
        """
        self._check_id(sandbox_id)
        meta = self._meta(sandbox_id)
        pid, start = meta.get("pid"), meta.get("start")
        if not isinstance(pid, int) or not isinstance(start, int) or start_time(pid) != start:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running")
        if _loading(meta):  # not a running VM yet (see ``is_running``)
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is still loading its state")
        cpu = cpu_seconds(pid, os.sysconf("SC_CLK_TCK"))
        if cpu is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running")
        qemu = (pid, start)
        fresh: Usage | None = None
        if await self._vcpus_running(sandbox_id):
            fresh = await self._guest_usage(sandbox_id, meta)
        if fresh is not None:
            self._last_usage[sandbox_id] = (qemu, fresh)
        else:
            last = self._last_usage.get(sandbox_id)
            if last is not None and last[0] == qemu:
                fresh = last[1]
            else:
                fresh = await asyncio.to_thread(self._host_usage, sandbox_id, meta, pid)
        return replace(fresh, cpu_seconds=cpu)

    def _root_image(self, meta: dict[str, Any]) -> Path | None:
        """The VM's lowest backing image: the template's raw ext4, which the guest's disk (the
        overlays above it) only changes within."""
        backing = meta.get("backing") or []
        return Path(backing[-1]) if backing and isinstance(backing[-1], str) else None

    def _geometry(self, meta: dict[str, Any]) -> _Ext4Geometry | None:
        """The geometry of the VM's root filesystem (read once per template image)."""
        image = self._root_image(meta)
        if image is None:
            return None
        if image not in self._geometries:
            self._geometries[image] = _ext4_geometry(image)
        return self._geometries[image]

    async def _vcpus_running(self, sid: str) -> bool:
        """Whether the guest runs (and so can answer), per QEMU; False when QEMU does not tell
        in time (a save holds its monitor)."""
        try:
            status = await asyncio.wait_for(
                Qmp(self._sock(sid, "qmp")).execute("query-status"), _USAGE_TIMEOUT_S
            )
        except (CorralError, OSError, TimeoutError):
            return False
        return isinstance(status, dict) and status.get("status") == "running"

    async def _guest_usage(self, sid: str, meta: dict[str, Any]) -> Usage | None:
        """Memory and disk as the guest sees them (``cpu_seconds`` left 0); None when its agent
        does not answer in time. A disk it cannot describe gets the host-side figures."""
        from corral.agent import AgentClient

        client = AgentClient(lambda: self.open_agent(sid))

        async def read(path: str) -> str:
            chunks = client.read_file(path)
            try:
                return b"".join([c async for c in chunks]).decode(errors="replace")
            finally:
                await chunks.aclose()

        try:
            meminfo, groups, delayed = await asyncio.wait_for(
                asyncio.gather(
                    read("/proc/meminfo"),
                    read(f"/proc/fs/ext4/{_GUEST_DISK}/mb_groups"),
                    read(f"/sys/fs/ext4/{_GUEST_DISK}/delayed_allocation_blocks"),
                    return_exceptions=True,
                ),
                _USAGE_TIMEOUT_S,
            )
        except TimeoutError:
            return None
        if isinstance(meminfo, BaseException):
            if isinstance(meminfo, (CorralError, OSError, asyncio.IncompleteReadError)):
                return None
            raise meminfo
        memory = _meminfo(meminfo)
        if "MemTotal" not in memory or "MemAvailable" not in memory:
            return None
        disk: tuple[int, int] | None = None
        geometry = await asyncio.to_thread(self._geometry, meta)
        if geometry is not None and isinstance(groups, str) and isinstance(delayed, str):
            try:
                free = _free_blocks(groups) - int(delayed.strip())
            except ValueError:
                pass
            else:
                total = geometry.size
                disk = (max(0, min(total, total - free * geometry.block_size)), total)
        if disk is None:
            disk = await asyncio.to_thread(self._host_disk, sid, meta)
        return Usage(
            cpu_seconds=0.0,
            memory_used=max(0, memory["MemTotal"] - memory["MemAvailable"]),
            memory_cache=memory.get("Cached", 0),
            memory_total=memory["MemTotal"],
            disk_used=disk[0],
            disk_total=disk[1],
        )

    def _host_disk(self, sid: str, meta: dict[str, Any]) -> tuple[int, int]:
        """(bytes the VM's own disk overlay holds on the host, the disk's size as ``df`` inside
        says, or the template image's size when its filesystem cannot be read)."""
        try:
            used = (self._dir(sid) / "disk.qcow2").stat().st_blocks * 512
        except FileNotFoundError as exc:
            raise SandboxNotRunningError(f"sandbox {sid} has no disk on this host") from exc
        geometry = self._geometry(meta)
        if geometry is not None:
            return used, geometry.size
        image = self._root_image(meta)
        try:
            return used, image.stat().st_size if image is not None else 0
        except OSError:
            return used, 0

    def _host_usage(self, sid: str, meta: dict[str, Any], pid: int) -> Usage:
        """Memory and disk as the host sees them (``cpu_seconds`` left 0)."""
        rss = _rss(pid)
        if rss is None:
            raise SandboxNotRunningError(f"sandbox {sid} is not running")
        shape = meta.get("shape") or {}
        memory_mb = shape.get("memory_mb") if isinstance(shape, dict) else None
        used, total = self._host_disk(sid, meta)
        return Usage(
            cpu_seconds=0.0,
            memory_used=rss,
            memory_cache=0,
            memory_total=memory_mb * 1024 * 1024 if isinstance(memory_mb, int) else rss,
            disk_used=used,
            disk_total=total,
        )

    # ------------------------------------------------------------------ saved VM states
    async def _save(self, qmp_socket: Path, target: Path) -> None:
        """Save a stopped VM's whole state to ``target``, durably and atomically (the file
        appears complete under its name or not at all)."""
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await asyncio.to_thread(save_state, qmp_socket, fd)
            await asyncio.to_thread(os.fsync, fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, target)
            await asyncio.to_thread(_fsync_dir, target.parent)
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)

    async def _stopped(self, sid: str) -> str:
        """Stop the VM's vCPUs; returns the run state it had (to go back to)."""
        async with Qmp(self._sock(sid, "qmp")) as qmp:
            status = str((await qmp.execute("query-status")).get("status"))
            if status == "running":
                await qmp.execute("stop")
        return status

    async def _carry_on(self, sid: str, status: str) -> None:
        """After a save: QEMU's disks are inactive until ``cont``, whatever the VM was doing; a
        paused VM is stopped again at once (its guest may run for a few microseconds)."""
        async with Qmp(self._sock(sid, "qmp")) as qmp:
            await qmp.execute("cont")
            if status != "running":
                await qmp.execute("stop")

    async def hibernate(self, sandbox_id: str, *, keep_memory: bool = True) -> None:
        """Save the VM's memory and devices with its disk, then stop QEMU: its processes carry
        on where they were at wake. A VM whose QEMU is gone (killed, a host reboot) keeps only
        its disk and boots from it at wake."""
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            vdir = self._dir(sandbox_id)
            if not (vdir / "disk.qcow2").is_file():
                raise SandboxNotRunningError(f"sandbox {sandbox_id} has no disk on this host")
            meta = self._meta(sandbox_id)
            if meta.get("hibernated"):
                return
            if self._pid(sandbox_id) is not None and keep_memory and not _loading(meta):
                self._pool.require_room()
                await self._stopped(sandbox_id)
                await self._save(self._sock(sandbox_id, "qmp"), vdir / "state")
            elif not keep_memory:
                (vdir / "state").unlink(missing_ok=True)
            # Else (no QEMU, or one that never finished loading): a state file still there is
            # the unspent pair of the disk (a wake spends it before the guest runs) and goes
            # with it; without one the disk boots alone.
            await self._teardown(sandbox_id, keep_disk=True)

    async def wake(self, spec: SandboxSpec) -> None:
        sid = spec.sandbox_id
        self._check_id(sid)
        async with self._lock(sid):
            meta = self._meta(sid)
            if not meta.get("hibernated"):
                raise ConflictError(f"sandbox {sid} is not hibernated on this host")
            await self._finish_restore(sid)
            # Back to hibernated, disk (and saved memory, unless spent) untouched.
            async with undone_on_failure(
                lambda: self._teardown(sid, keep_disk=True), f"wake of {sid}"
            ):
                self._socket_dir(sid)
                kernel, initramfs, _ = await self._images(spec)
                with_net = spec.network is not None or spec.netns is not None
                shape = self._shape(spec, with_net)
                saved = self._dir(sid) / "state"
                state = saved if saved.is_file() else None
                if state is not None and meta.get("shape") != shape:
                    raise InvalidRequestError(
                        f"sandbox {sid} was saved with {_describe(meta.get('shape'))}; it cannot "
                        f"wake with {_describe(shape)}"
                    )
                backing = _backing_of(self._dir(sid))
                await self._launch(spec, shape, kernel, initramfs, backing, state, None, wake=True)

    # ------------------------------------------------------------------------- snapshots
    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> int:
        """Memory, devices and disk at one instant: a running VM is stopped for the save (its
        RAM is written out), then carries on; a hibernated one's files are copied."""
        self._check_id(sandbox_id)
        target = self._snapshot_dir(snapshot_id)
        async with self._lock(sandbox_id):
            vdir = self._dir(sandbox_id)
            if not (vdir / "disk.qcow2").is_file():
                raise SandboxNotRunningError(f"sandbox {sandbox_id} has no disk on this host")
            if target.exists():
                raise ConflictError(f"snapshot {snapshot_id} already exists")
            self._pool.require_room()
            meta = self._meta(sandbox_id)
            tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
            tmp.mkdir(mode=0o700)
            try:
                if self._pid(sandbox_id) is None:
                    # Hibernated (or its QEMU died): the files are consistent as they are.
                    await asyncio.to_thread(clone_file, vdir / "disk.qcow2", tmp / "disk.qcow2")
                    if (vdir / "state").is_file():
                        await asyncio.to_thread(clone_file, vdir / "state", tmp / "state")
                else:
                    status = await self._stopped(sandbox_id)
                    try:
                        await self._save(self._sock(sandbox_id, "qmp"), tmp / "state")
                        # Saving flushed the disk and holds it still until ``cont``.
                        await asyncio.to_thread(clone_file, vdir / "disk.qcow2", tmp / "disk.qcow2")
                    finally:
                        await self._carry_on(sandbox_id, status)
                described = {k: meta.get(k) for k in ("shape", "backing")}
                _write_json(tmp / "meta.json", {**described, "of": sandbox_id})
                await asyncio.to_thread(_fsync_dir, tmp)
                os.rename(tmp, target)
                await asyncio.to_thread(_fsync_dir, target.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return sum(p.stat().st_blocks * 512 for p in target.iterdir())

    async def delete_snapshot(self, snapshot_id: str) -> None:
        target = self._snapshot_dir(snapshot_id)
        if target.exists():
            # Renamed away first: a crash half way leaves a dot-name that reconcile sweeps.
            doomed = target.with_name(f".{target.name}.deleted")
            os.rename(target, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    async def list_snapshots(self) -> list[str]:
        if not self._pool.image.exists():
            return []
        snaps = self._pool.dir("vm-snapshots")
        for leftover in snaps.glob(".*"):  # half-made or half-deleted
            shutil.rmtree(leftover, ignore_errors=True)
        return sorted(p.name for p in snaps.iterdir() if _SNAPSHOT_RE.match(p.name))

    async def restore_disk(self, sandbox_id: str, snapshot_id: str) -> None:
        """Give a hibernated VM the snapshot's disk and memory: at wake it carries on from the
        snapshot's instant. Each step leaves a consistent pair (the old saved memory goes
        first; a disk without saved memory boots)."""
        self._check_id(sandbox_id)
        source = self._snapshot_dir(snapshot_id)
        async with self._lock(sandbox_id):
            meta = self._meta(sandbox_id)
            if not meta.get("hibernated"):
                raise ConflictError(f"sandbox {sandbox_id} is not hibernated on this host")
            if not (source / "disk.qcow2").is_file():
                raise InvalidRequestError(
                    f"snapshot {snapshot_id} is not a microvm snapshot on this host"
                )
            _state_of(source, meta.get("shape") or {}, f"snapshot {snapshot_id}")
            vdir = self._dir(sandbox_id)
            # Disk and memory are two files: an intent written first makes the pair one step.
            # A crash part way is rolled forward at the next wake (``_finish_restore``), never
            # left as the snapshot's disk without its memory (which lacks what the guest had
            # not written out yet).
            marker = vdir / "restoring"
            tmp = vdir / ".restoring"
            tmp.write_text(snapshot_id)
            await asyncio.to_thread(_fsync_file, tmp)
            os.replace(tmp, marker)
            await asyncio.to_thread(_fsync_dir, vdir)
            await self._finish_restore(sandbox_id)

    async def _finish_restore(self, sandbox_id: str) -> None:
        """Carry out (again) the restore ``restoring`` names: the snapshot's disk and saved
        memory replace the VM's, then the intent goes. Idempotent."""
        vdir = self._dir(sandbox_id)
        marker = vdir / "restoring"
        try:
            snapshot_id = marker.read_text().strip()
        except FileNotFoundError:
            return
        source = self._snapshot_dir(snapshot_id)
        if (source / "disk.qcow2").is_file():
            (vdir / "state").unlink(missing_ok=True)
            names = ("disk.qcow2", "state") if (source / "state").is_file() else ("disk.qcow2",)
            for name in names:
                fresh = vdir / f".{name}.{secrets.token_hex(4)}"
                try:
                    await asyncio.to_thread(clone_file, source / name, fresh)
                    os.replace(fresh, vdir / name)
                except OSError as exc:
                    # The intent stays: the next wake tries again; no half copy is left.
                    fresh.unlink(missing_ok=True)
                    raise RuntimeFailure(f"restore of {sandbox_id}: {exc}") from exc
            await asyncio.to_thread(_fsync_dir, vdir)
        # A snapshot deleted before this roll-forward leaves the VM what was copied of it (a
        # disk alone boots); nothing better exists any more.
        marker.unlink(missing_ok=True)
        await asyncio.to_thread(_fsync_dir, vdir)

    # ------------------------------------------------------------------------------ inspect
    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        raise InvalidRequestError(
            "template builds run on the container tier; a microvm's disk is a whole image, "
            "not a layer"
        )

    async def is_running(self, sandbox_id: str) -> bool:
        self._check_id(sandbox_id)
        return self._pid(sandbox_id) is not None and not _loading(self._meta(sandbox_id))

    async def list_sandboxes(self) -> list[str]:
        if not self._pool.image.exists():
            return []  # never made: nothing of this tier on the host
        return sorted(p.name for p in self._vms.iterdir() if _ID_RE.match(p.name))

    def _mux(self, sandbox_id: str) -> PortMux:
        mux = self._muxes.get(sandbox_id)
        if mux is None:
            mux = self._muxes[sandbox_id] = PortMux(self._sock(sandbox_id, "agent"))
        return mux

    async def open_agent(self, sandbox_id: str) -> Streams:
        self._check_id(sandbox_id)
        return await self._mux(sandbox_id).open()

    async def close(self) -> None:
        """Drop the port connections; the VMs keep running (re-adopted at the next start)."""
        for mux in list(self._muxes.values()):
            await mux.close()
        self._muxes.clear()
        for fd in self._memfds.values():
            os.close(fd)  # clones keep their mappings; the next server makes its own copy
        self._memfds.clear()

    async def purge(self) -> None:
        """Destroy every VM and remove this tier's host state (tests and uninstalling); the
        storage pool too when nothing of another tier is in it."""
        for sid in await self.list_sandboxes():
            await self.destroy(sid)
        if self._pool.image.exists():
            for name in ("vms", "vm-snapshots"):
                shutil.rmtree(self._pool.dir(name), ignore_errors=True)
            if self._pool.only_holds(set()):
                self._pool.remove()
        await self.close()
        shutil.rmtree(self._cache, ignore_errors=True)
        shutil.rmtree(self.data_dir / "vm-uids", ignore_errors=True)
        shutil.rmtree(self._run, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._run.parent.rmdir()  # only when nothing else uses /run/corral
