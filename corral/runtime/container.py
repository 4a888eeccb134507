"""The container tier: one runc container per sandbox, built from a generated OCI bundle.

Host layout under ``data_dir``::

    runc/                 runc's state root (one dir per live container)
    sandboxes/<id>/       bundle: config.json, meta.json,
                          agent.sock (host end of the agent's listening socket), runc.log,
                          init.pid, and disk/, where the sandbox's disk image is mounted
                          (it holds upper/ and work/ of the overlay)
    pool.img              the storage pool (sparse XFS, ``corral.host.pool``), mounted at pool/:
    pool/disks/<id>.img   the sandbox's disk (sparse ext4, the hard disk limit)
    pool/snapshots/<s>.img  snapshots: reflink copies of a disk taken while it was frozen
    pool/golden/          golden formatted images, one per disk size
    uidranges/<n>         persistent claim of host uid/gid range n

Files on a disk carry the ids the sandbox sees (0 for its root): the disk reaches the overlay
through an idmapped mount into the sandbox's host range, so a snapshot starts in any range.

The overlay itself is mounted at ``<mount_dir>/<id>`` (default ``/run/corral/rootfs-<hash of
data_dir>``): runc sets the root filesystem up from *inside* the user namespace, so every
directory on its path must be traversable by the sandbox's unprivileged host uid, which
``data_dir`` (often under a 0700 directory) cannot promise.

``create`` does every step itself and, on any failure, runs the same idempotent teardown as
``destroy``, so a failed create leaves nothing. ``sandboxes/<id>`` is created first and removed
last, so whatever a crash leaves behind is always found by ``list_sandboxes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.errors import (
    ConflictError,
    CorralError,
    InvalidRequestError,
    RuntimeFailure,
    SandboxNotRunningError,
)
from corral.host.cgroups import remove_cgroup_tree, sandbox_cgroup_dirs
from corral.host.disk import DiskImages, mount_disk, remove_disk, sync_disk
from corral.host.mounts import idmapped_clone, mount_overlay, unmount
from corral.host.pool import Pool, clone_file
from corral.host.process import start_time
from corral.host.runc import Runc
from corral.host.uidrange import SlotAllocator
from corral.host.userns import open_userns, open_userns_with_netns
from corral.runtime.base import SandboxSpec, Usage
from corral.runtime.oci import AGENT_PATH, IsolationProfile, build_config
from corral.runtime.undo import undone_on_failure

__all__ = ["ContainerRuntime", "ReadyCheck"]

# A freeze waits for tasks in uninterruptible sleep (disk I/O) to reach a safe point.
_FREEZE_TIMEOUT_S = 10.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_NS_GET_USERNS = 0xB701
_SNAPSHOT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_RANGE_SIZE = 65536
_MiB = 1024**2

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Given a way to open fresh agent streams, returns once the agent answers (raises otherwise).
ReadyCheck = Callable[[Callable[[], Awaitable[Streams]]], Awaitable[None]]


async def _agent_ping(opener: Callable[[], Awaitable[Streams]]) -> None:
    from corral.agent import AgentClient  # the agent package is optional until it is built

    await AgentClient(opener).ping()


def _make_traversable(directory: Path) -> None:
    """Create ``directory`` (and parents) with mode 0711 so a sandbox uid can pass through it."""
    if not directory.is_dir():
        _make_traversable(directory.parent)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o711)
    if directory.stat().st_mode & 0o001 == 0:
        os.chmod(directory, directory.stat().st_mode | 0o111)


def _write_identity_files(upper: Path, hostname: str, nameservers: tuple[str, ...] = ()) -> None:
    """Give the sandbox an /etc/hostname and /etc/hosts naming itself, in its own upper layer
    (again at every start: a fork or a restored snapshot carries another sandbox's).

    Without its own name in /etc/hosts, tools that resolve the local host name (sudo, Java,
    some test suites) stall or fail; the template's files cannot know the sandbox's name. The
    upper layer is the sandbox's to shape (a snapshot may hold anything), so every step goes
    through directory descriptors without following links: a planted ``etc`` symlink must not
    send root's writes out of the disk.
    """
    files = {
        "hostname": f"{hostname}\n",
        "hosts": (
            "127.0.0.1\tlocalhost\n"
            f"127.0.1.1\t{hostname}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    }
    if nameservers:
        # The template's resolv.conf is the build host's; only corral's resolver is reachable.
        files["resolv.conf"] = "".join(f"nameserver {ns}\n" for ns in nameservers)
    top = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        etc = _open_own_dir(top, "etc")
        try:
            for name, text in files.items():
                with contextlib.suppress(FileNotFoundError):
                    _remove_entry(etc, name)
                fd = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=etc
                )
                try:
                    os.write(fd, text.encode())
                    os.fchown(fd, 0, 0)
                finally:
                    os.close(fd)
        finally:
            os.close(etc)
    finally:
        os.close(top)


# What the runtime writes into a sandbox's upper layer itself: never part of a built layer
# (Docker leaves its own /etc/hosts, hostname and resolv.conf out of images the same way).
_RUNTIME_ENTRIES = (".corral", "etc/hostname", "etc/hosts", "etc/resolv.conf")


def _copy_changes(upper: Path, dest: Path) -> None:
    """``cp -a`` keeps what a layer is made of: owners, modes, xattrs (the ``trusted.overlay``
    opaque marks included, as root), whiteout devices and hard links within the copy."""
    try:
        subprocess.run(
            ["cp", "-a", "--no-dereference", f"{upper}/.", f"{dest}/"],
            check=True,
            capture_output=True,
            timeout=3600,
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeFailure(
            f"copying the changes out of {upper} failed: {exc.stderr.decode(errors='replace')}"
        ) from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"copying the changes out of {upper} failed: {exc}") from exc
    top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for rel in _RUNTIME_ENTRIES:
            parent, _, name = rel.rpartition("/")
            fd = top
            try:
                if parent:
                    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                with contextlib.suppress(FileNotFoundError):
                    _remove_entry(fd, name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            finally:
                if fd != top:
                    os.close(fd)
    finally:
        os.close(top)


def _remove_entry(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` whatever it is (a directory with its contents)."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        _rmtree_fd(sub)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dir_fd)


def _rmtree_fd(dir_fd: int) -> None:
    for entry in os.listdir(dir_fd):
        _remove_entry(dir_fd, entry)


def _open_own_dir(parent: int, name: str) -> int:
    """``name`` under ``parent`` as a real directory owned by the sandbox's root (replacing a
    symlink or file the sandbox put there), opened."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=parent)
            raise FileNotFoundError
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=parent)
        os.chown(name, 0, 0, dir_fd=parent, follow_symlinks=False)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)


def _owner_of_netns(netns: Path) -> int:
    """A descriptor of the user namespace that owns ``netns`` (``NS_GET_USERNS``)."""
    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeFailure(f"network namespace {netns} is gone: {exc}") from exc
    try:
        return fcntl.ioctl(fd, _NS_GET_USERNS)
    except OSError as exc:
        raise RuntimeFailure(f"owner of network namespace {netns}: {exc}") from exc
    finally:
        os.close(fd)


class ContainerRuntime:
    """The container tier (runc + user namespace + idmapped overlay + XFS quota + cgroups)."""

    name = "container"

    def __init__(
        self,
        data_dir: Path,
        agent_binary: Path,
        *,
        first_host_id: int = 1 << 30,
        max_sandboxes: int = 16000,
        runc_binary: str = "runc",
        mount_dir: Path | None = None,
        ready_timeout: float = 15.0,
        ready_check: ReadyCheck | None = None,
        pool_bytes: int | None = None,
        pool: Pool | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.agent_binary = Path(agent_binary)
        self.ready_timeout = ready_timeout
        self._ready_check: ReadyCheck = ready_check or _agent_ping
        self._runc = Runc(self.data_dir / "runc", runc_binary)
        self._sandboxes = self.data_dir / "sandboxes"
        if mount_dir is None:
            digest = hashlib.sha256(os.fsencode(self.data_dir.resolve())).hexdigest()[:16]
            mount_dir = Path("/run/corral") / f"rootfs-{digest}"
        self._mount_dir = mount_dir
        # One pool per data dir, shared with the other tiers of a server (``build_runtime``).
        self._pool = pool or Pool(self.data_dir / "pool.img", self.data_dir / "pool", pool_bytes)
        self._slots = SlotAllocator(
            self.data_dir / "uidranges",
            first_id=first_host_id,
            size=_RANGE_SIZE,
            slots=max_sandboxes,
        )
        self._profile: IsolationProfile | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # Milliseconds per step of the last successful create (for benchmarks and logs).
        self.last_create_timings: dict[str, float] = {}

    # ----------------------------------------------------------------- paths and small helpers

    def _check_id(self, sandbox_id: str) -> None:
        if not _ID_RE.match(sandbox_id) or ".." in sandbox_id:
            raise InvalidRequestError(f"invalid sandbox id {sandbox_id!r}")

    def _dir(self, sandbox_id: str) -> Path:
        return self._sandboxes / sandbox_id

    def _rootfs(self, sandbox_id: str) -> Path:
        return self._mount_dir / sandbox_id

    def _disk_image(self, sandbox_id: str) -> Path:
        return self._pool.dir("disks") / f"{sandbox_id}.img"

    def _snapshot_image(self, snapshot_id: str) -> Path:
        if not _SNAPSHOT_RE.match(snapshot_id):
            raise InvalidRequestError(f"invalid snapshot id {snapshot_id!r}")
        return self._pool.dir("snapshots") / f"{snapshot_id}.img"

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _cgroup_name(self, sandbox_id: str) -> str:
        return f"corral-{sandbox_id}"

    def _read_meta(self, sandbox_id: str) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((self._dir(sandbox_id) / "meta.json").read_text())
        except (OSError, ValueError):
            return {}
        return meta

    def _write_meta(self, sandbox_id: str, meta: dict[str, Any]) -> None:
        path = self._dir(sandbox_id) / "meta.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path)

    @property
    def mount_dir(self) -> Path:
        """Where sandbox root filesystems are mounted (one directory per sandbox)."""
        return self._mount_dir

    def agent_socket(self, sandbox_id: str) -> Path:
        """Host path of the sandbox agent's listening socket."""
        return self._dir(sandbox_id) / "agent.sock"

    def disk_usage(self, sandbox_id: str) -> tuple[int, int]:
        """(used, total) bytes of the sandbox's disk."""
        try:
            st = os.statvfs(self._dir(sandbox_id) / "disk")
        except OSError as exc:
            raise RuntimeFailure(f"cannot read disk usage of {sandbox_id}: {exc}") from exc
        return ((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize)

    # ------------------------------------------------------------------------------ create

    async def create(self, spec: SandboxSpec) -> None:
        self._check_id(spec.sandbox_id)
        if not spec.layers:
            raise InvalidRequestError("a sandbox needs at least one template layer")
        async with self._lock(spec.sandbox_id):
            sid = spec.sandbox_id
            if self._dir(sid).exists() or (self._runc.root / sid).exists():
                raise ConflictError(f"sandbox {sid} already exists on this host")
            async with undone_on_failure(lambda: self._teardown(sid), f"create of {sid}"):
                await self._create(spec)

    async def _create(self, spec: SandboxSpec, *, wake: bool = False) -> None:
        """Start ``spec``; ``wake``: from its kept disk and id range (it was hibernated)."""
        sid = spec.sandbox_id
        sdir = self._dir(sid)
        timings: dict[str, float] = {}
        t = time.perf_counter()

        def step(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[name] = round((now - t) * 1000, 3)
            t = now

        for layer in spec.layers:
            if not layer.is_dir():
                raise RuntimeFailure(f"template layer {layer} is not a directory")
        if not self.agent_binary.is_file():
            raise RuntimeFailure(f"agent binary {self.agent_binary} does not exist")
        if self._profile is None:
            self._profile = IsolationProfile.load()
        source: Path | None = None
        if wake:
            meta = self._read_meta(sid)
            host_id = int(meta["host_id"])
            meta.pop("hibernated", None)
            self._write_meta(sid, meta)
            step("claim")
        else:
            self._sandboxes.mkdir(parents=True, exist_ok=True, mode=0o700)
            disk_bytes = spec.disk_mb * _MiB
            self._pool.require_room(disk_bytes)
            if spec.snapshot is not None:
                source = self._snapshot_image(spec.snapshot)
                if not source.is_file():
                    raise InvalidRequestError(f"snapshot {spec.snapshot} is not on this host")
            else:
                source = await asyncio.to_thread(
                    lambda: DiskImages(self._pool.dir("golden")).golden(disk_bytes)
                )
            step("prepare")

            sdir.mkdir(mode=0o700)
            slot = self._slots.claim(sid)
            host_id = self._slots.host_id(slot)
            cgroups = [str(d) for d in sandbox_cgroup_dirs(self._cgroup_name(sid))]
            meta = {"slot": slot, "host_id": host_id, "cgroups": cgroups}
            self._write_meta(sid, meta)
            step("claim")

        netns_fd: int | None = None
        if spec.netns is not None:
            userns = _owner_of_netns(spec.netns)
        elif spec.network is not None:
            userns, netns_fd = open_userns_with_netns(host_id, _RANGE_SIZE)
        else:
            userns = open_userns(host_id, _RANGE_SIZE)
        step("userns")
        plumbing: asyncio.Future[Path] | None = None
        try:
            if spec.network is not None:
                # The network layer plumbs the namespace while the disk is being prepared.
                plumbing = asyncio.ensure_future(
                    spec.network(Path(f"/proc/{os.getpid()}/fd/{netns_fd}"))
                )
            try:
                await asyncio.to_thread(
                    self._mount_storage, spec, sdir, source, self._disk_image(sid)
                )
                step("storage")
                fds: list[int] = []
                try:
                    for layer in reversed(spec.layers):  # overlayfs wants the topmost first
                        fds.append(idmapped_clone(layer, userns))
                    lowers = list(fds)
                    # The disk is stored in the sandbox's own ids (see the module docstring).
                    fds.append(disk := idmapped_clone(sdir / "disk", userns, writable=True))
                    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                    fds.append(upper := os.open("upper", flags, dir_fd=disk))
                    fds.append(work := os.open("work", flags, dir_fd=disk))
                    step("idmap")
                    rootfs = self._rootfs(sid)
                    _make_traversable(self._mount_dir)
                    rootfs.mkdir(mode=0o755)
                    mount_overlay(lowers, upper, work, rootfs, creator=host_id)
                finally:
                    for fd in fds:
                        os.close(fd)
                step("overlay")
                netns = await plumbing if plumbing is not None else spec.netns
                step("network")
            finally:
                # Never leave the plumbing running behind a failure: the caller's cleanup
                # removes the network and must find it complete.
                if plumbing is not None and not plumbing.done():
                    await asyncio.gather(plumbing, return_exceptions=True)
                if netns_fd is not None:
                    os.close(netns_fd)

            config = build_config(
                spec,
                self._profile,
                rootfs=rootfs,
                agent_binary=self.agent_binary,
                host_id=host_id,
                id_count=_RANGE_SIZE,
                cgroups_path=self._cgroup_name(sid),
                # runc joins the user namespace we made (it owns the network namespace) through
                # our descriptor, which stays open until runc has started the sandbox.
                userns=f"/proc/{os.getpid()}/fd/{userns}" if netns is not None else None,
                netns=netns,
            )
            (sdir / "config.json").write_text(json.dumps(config))
            step("config")

            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                listener.bind(str(self.agent_socket(sid)))
                listener.listen(128)
                step("socket")
                await self._runc.run(
                    sid,
                    sdir,
                    listen_fd=listener.fileno(),
                    pid_file=sdir / "init.pid",
                    log_file=sdir / "runc.log",
                )
            finally:
                listener.close()
            step("runc_run")
        finally:
            os.close(userns)

        pid = int((sdir / "init.pid").read_text())
        meta["init_pid"] = pid
        meta["init_start"] = start_time(pid)
        self._write_meta(sid, meta)
        step("record")

        await self._wait_ready(sid)
        step("agent_ready")
        timings["total"] = round(sum(timings.values()), 3)
        self.last_create_timings = timings

    def _mount_storage(
        self, spec: SandboxSpec, sdir: Path, source: Path | None, image: Path
    ) -> None:
        """Mount the sandbox's disk at ``sdir/disk``: its kept one (``source`` None: a wake or a
        restore), a copy of a snapshot, or a fresh one made from a golden image."""
        store = sdir / "disk"
        if source is not None:  # a snapshot or the golden image of the size: copy it
            if source.stat().st_size != spec.disk_mb * _MiB:
                raise InvalidRequestError(
                    f"snapshot {spec.snapshot} holds a {source.stat().st_size // _MiB} MiB "
                    f"disk, not {spec.disk_mb} MiB"
                )
            clone_file(source, image)
            store.mkdir(mode=0o700)
        mount_disk(image, store)
        upper, work = store / "upper", store / "work"
        if source is not None and spec.snapshot is None:
            upper.mkdir(mode=0o755)
            work.mkdir(mode=0o700)
            # runc would otherwise create the agent's mount point itself, from inside.
            (upper / ".corral").mkdir(mode=0o755)
            (upper / AGENT_PATH.lstrip("/")).touch(mode=0o555)
        else:
            # A disk the sandbox has used: overlayfs needs both directories, whatever it did.
            for d in (upper, work):
                if not d.is_dir() or d.is_symlink():
                    raise RuntimeFailure(f"the disk of {spec.sandbox_id} has no {d.name}/ dir")
        _write_identity_files(upper, spec.hostname, spec.nameservers)

    async def _wait_ready(self, sandbox_id: str) -> None:
        async def opener() -> Streams:
            return await self.open_agent(sandbox_id)

        try:
            await asyncio.wait_for(self._ready_check(opener), self.ready_timeout)
        except TimeoutError as exc:
            detail = "init is gone" if not await self.is_running(sandbox_id) else "no answer"
            raise RuntimeFailure(
                f"agent of {sandbox_id} did not answer within {self.ready_timeout} s ({detail})"
            ) from exc
        except CorralError:
            raise
        except Exception as exc:
            raise RuntimeFailure(f"agent of {sandbox_id} did not answer: {exc!r}") from exc

    # ------------------------------------------------------------------------------ destroy

    async def hibernate(self, sandbox_id: str, *, keep_memory: bool = True) -> None:
        # A container's memory is never kept: its processes start afresh at wake.
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            if not self._dir(sandbox_id).is_dir() or not self._disk_image(sandbox_id).is_file():
                raise SandboxNotRunningError(f"sandbox {sandbox_id} has no disk on this host")
            await self._teardown(sandbox_id, keep_disk=True)

    async def wake(self, spec: SandboxSpec) -> None:
        sid = spec.sandbox_id
        self._check_id(sid)
        async with self._lock(sid):
            if not self._read_meta(sid).get("hibernated"):
                raise ConflictError(f"sandbox {sid} is not hibernated on this host")
            # Back to hibernated, disk untouched, whatever failed.
            async with undone_on_failure(
                lambda: self._teardown(sid, keep_disk=True), f"wake of {sid}"
            ):
                await self._create(spec, wake=True)

    async def destroy(self, sandbox_id: str) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            await self._teardown(sandbox_id)
        self._locks.pop(sandbox_id, None)

    async def _teardown(self, sid: str, *, keep_disk: bool = False) -> None:
        """Remove every trace of ``sid``, tolerating any of them being absent already;
        ``keep_disk``: all but its disk image and id range (hibernation).

        Every step runs even when an earlier one failed; the first failure is raised at the end.
        """
        errors: list[str] = []
        meta = self._read_meta(sid)
        sdir = self._dir(sid)

        # A frozen task cannot die: thaw a paused sandbox first.
        with contextlib.suppress(CorralError):
            await self._freeze(sid, "THAWED")
        # Killing the init kills the whole pid namespace at once; runc delete then only has
        # state and cgroups to remove, which is much faster than its freeze-and-kill.
        await self._kill_init(meta)
        try:
            await self._runc.delete(sid)
        except RuntimeFailure as exc:
            errors.append(str(exc))
        # Whatever runc could not remove (its state was lost or broken): kill and remove by hand.
        cgroup_dirs = [Path(p) for p in meta.get("cgroups", [])] or sandbox_cgroup_dirs(
            self._cgroup_name(sid)
        )
        for d in cgroup_dirs:
            try:
                await asyncio.to_thread(remove_cgroup_tree, d)
            except OSError as exc:
                errors.append(f"cgroup {d}: {exc}")
        if not errors:
            shutil.rmtree(self._runc.root / sid, ignore_errors=True)

        try:
            unmount(self._rootfs(sid))
            with contextlib.suppress(FileNotFoundError):
                self._rootfs(sid).rmdir()
        except OSError as exc:
            errors.append(f"unmount: {exc}")

        if keep_disk:
            try:
                unmount(sdir / "disk")  # frees the loop device; the image stays
            except OSError as exc:
                errors.append(f"disk: {exc}")
            if meta:
                for key in ("init_pid", "init_start"):
                    meta.pop(key, None)
                meta["hibernated"] = True
                self._write_meta(sid, meta)
            with contextlib.suppress(FileNotFoundError):
                self.agent_socket(sid).unlink()
            if errors:
                raise RuntimeFailure(f"hibernation of {sid} incomplete: {'; '.join(errors)}")
            return
        try:
            if self._pool.image.exists():
                remove_disk(self._disk_image(sid), sdir / "disk")
            else:  # no pool was ever made here, so no disk either (never make one to find out)
                unmount(sdir / "disk")
        except (OSError, RuntimeFailure) as exc:
            errors.append(f"disk: {exc}")
        if not errors:
            self._slots.release(sid)
            shutil.rmtree(sdir, ignore_errors=True)
        if errors:
            raise RuntimeFailure(f"destroy of {sid} incomplete: {'; '.join(errors)}")

    async def _kill_init(self, meta: dict[str, Any]) -> None:
        pid, start = meta.get("init_pid"), meta.get("init_start")
        if not isinstance(pid, int) or not isinstance(start, int):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if start_time(pid) != start:
                return  # the pid was reused by another process
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while start_time(pid) == start and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
        except OSError:
            pass
        finally:
            os.close(pidfd)

    # ------------------------------------------------------------------------- pause/resume

    def _freezer_state(self, sandbox_id: str) -> Path:
        for d in self._read_meta(sandbox_id).get("cgroups", []):
            if Path(d).parent.name == "freezer" or "/freezer/" in d:
                return Path(d) / "freezer.state"
        raise SandboxNotRunningError(f"sandbox {sandbox_id} has no freezer cgroup on this host")

    async def _freeze(self, sandbox_id: str, target: str) -> None:
        """Ask the cgroup v1 freezer for ``target`` (FROZEN or THAWED) and wait until it holds."""
        state = self._freezer_state(sandbox_id)
        try:
            state.write_text(target)
            deadline = time.monotonic() + _FREEZE_TIMEOUT_S
            # FREEZING lasts while tasks in uninterruptible sleep finish their system call.
            while state.read_text().strip() != target:
                if time.monotonic() > deadline:
                    if target == "FROZEN":
                        state.write_text("THAWED")  # half-frozen helps nobody
                    raise RuntimeFailure(
                        f"sandbox {sandbox_id} did not become {target.lower()} within "
                        f"{_FREEZE_TIMEOUT_S} s"
                    )
                await asyncio.sleep(0.0005)
        except FileNotFoundError as exc:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running") from exc
        except OSError as exc:
            raise RuntimeFailure(f"freezer of {sandbox_id}: {exc}") from exc
        except asyncio.CancelledError:
            if target == "FROZEN":  # a cancelled pause must not leave it frozen behind our back
                with contextlib.suppress(OSError):
                    state.write_text("THAWED")
            raise

    async def pause(self, sandbox_id: str) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            await self._freeze(sandbox_id, "FROZEN")

    async def resume(self, sandbox_id: str) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            await self._freeze(sandbox_id, "THAWED")

    # ---------------------------------------------------------------------------- snapshots

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> int:
        self._check_id(sandbox_id)
        target = self._snapshot_image(snapshot_id)
        async with self._lock(sandbox_id):
            image = self._disk_image(sandbox_id)
            if not image.is_file():
                raise SandboxNotRunningError(f"sandbox {sandbox_id} has no disk on this host")
            if target.exists():
                raise ConflictError(f"snapshot {snapshot_id} already exists")
            self._pool.require_room()
            store = self._dir(sandbox_id) / "disk"

            def take(mounted: bool) -> int:
                if mounted:
                    # With every process stopped, syncfs puts all the sandbox wrote on the
                    # image (data written, journal committed): a copy is what a crash at this
                    # instant would leave, which the next mount completes by replaying the
                    # journal. (FIFREEZE would also checkpoint the journal: ~30 ms more here.)
                    sync_disk(store)
                clone_file(image, target)
                return target.stat().st_blocks * 512

            try:
                if not os.path.ismount(store):  # hibernated: the unmounted image is consistent
                    return await asyncio.to_thread(take, False)
                was_frozen = self._freezer_state(sandbox_id).read_text().strip() == "FROZEN"
                await self._freeze(sandbox_id, "FROZEN")
                try:
                    return await asyncio.to_thread(take, True)
                finally:
                    if not was_frozen:  # a paused sandbox stays paused
                        await self._freeze(sandbox_id, "THAWED")
            except OSError as exc:
                raise RuntimeFailure(f"snapshot of {sandbox_id} failed: {exc}") from exc

    async def delete_snapshot(self, snapshot_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._snapshot_image(snapshot_id).unlink()

    async def list_snapshots(self) -> list[str]:
        # Half-made clones (a crash mid-copy) are dot files: gone with no owner to ask.
        for d in ("snapshots", "disks"):
            for p in self._pool.dir(d).glob(".*"):
                p.unlink(missing_ok=True)
        return sorted(p.stem for p in self._pool.dir("snapshots").glob("*.img"))

    async def restore_disk(self, sandbox_id: str, snapshot_id: str) -> None:
        self._check_id(sandbox_id)
        source = self._snapshot_image(snapshot_id)
        async with self._lock(sandbox_id):
            if not self._read_meta(sandbox_id).get("hibernated"):
                raise ConflictError(f"sandbox {sandbox_id} must be hibernated to restore its disk")
            image = self._disk_image(sandbox_id)
            if not source.is_file():
                raise InvalidRequestError(f"snapshot {snapshot_id} is not on this host")
            if image.is_file() and source.stat().st_size != image.stat().st_size:
                raise InvalidRequestError(
                    f"snapshot {snapshot_id} holds a disk of another size than {sandbox_id}'s"
                )

            def swap() -> None:
                fresh = image.with_name(f".{image.name}.restore")
                fresh.unlink(missing_ok=True)
                clone_file(source, fresh)
                os.replace(fresh, image)  # atomic: the old disk or the new one, never half

            try:
                await asyncio.to_thread(swap)
            except OSError as exc:
                raise RuntimeFailure(f"restore of {sandbox_id} failed: {exc}") from exc

    async def export_changes(self, sandbox_id: str, dest: Path) -> None:
        self._check_id(sandbox_id)
        async with self._lock(sandbox_id):
            upper = self._dir(sandbox_id) / "disk" / "upper"
            if not os.path.ismount(upper.parent):
                raise SandboxNotRunningError(f"sandbox {sandbox_id} has no mounted disk")
            was_frozen = self._freezer_state(sandbox_id).read_text().strip() == "FROZEN"
            await self._freeze(sandbox_id, "FROZEN")
            try:
                await asyncio.to_thread(_copy_changes, upper, dest)
            finally:
                if not was_frozen:
                    await self._freeze(sandbox_id, "THAWED")

    # ------------------------------------------------------------------------------ inspect

    async def cpu_seconds(self, sandbox_id: str) -> float:
        self._check_id(sandbox_id)
        for d in self._read_meta(sandbox_id).get("cgroups", []):
            usage = Path(d) / "cpuacct.usage"
            if usage.exists():
                try:
                    return int(usage.read_text()) / 1e9
                except (OSError, ValueError) as exc:
                    raise RuntimeFailure(f"cpu usage of {sandbox_id}: {exc}") from exc
        raise SandboxNotRunningError(f"sandbox {sandbox_id} has no cpuacct cgroup on this host")

    async def usage(self, sandbox_id: str) -> Usage:
        """From the sandbox's cgroups and its disk, all kernel counters (a few small reads, no
        process; a frozen sandbox answers the same):

        - ``cpu_seconds``: ``cpuacct.usage``;
        - ``memory_used``: ``memory.usage_in_bytes`` less the file-backed page cache
          (``total_active_file`` + ``total_inactive_file`` of ``memory.stat``), i.e. its
          processes' anonymous memory, tmpfs/shared memory (it cannot be dropped: there is no
          swap) and the kernel memory charged for them: what counts against the limit and the
          kernel cannot reclaim;
        - ``memory_cache``: ``total_cache`` (page cache, tmpfs included);
        - ``memory_total``: ``memory.limit_in_bytes`` (the spec's ``memory_mb``);
        - ``disk_used``/``disk_total``: ``statvfs`` of its disk (the ext4 image holding its
          overlay's upper layer, the hard ``disk_mb`` limit), which is exactly what ``df /``
          says inside: overlayfs reports its upper filesystem. The total is ``disk_mb`` less
          ext4's own metadata (journal, inode tables).
        """
        self._check_id(sandbox_id)
        meta = self._read_meta(sandbox_id)
        cgroups = [Path(d) for d in meta.get("cgroups", [])]
        cpuacct = next((d for d in cgroups if (d / "cpuacct.usage").exists()), None)
        memory = next((d for d in cgroups if (d / "memory.stat").exists()), None)
        if meta.get("hibernated") or cpuacct is None or memory is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running on this host")
        disk = self._dir(sandbox_id) / "disk"
        try:
            cpu = int((cpuacct / "cpuacct.usage").read_text()) / 1e9
            charged = int((memory / "memory.usage_in_bytes").read_text())
            limit = int((memory / "memory.limit_in_bytes").read_text())
            stat: dict[str, int] = {}
            for line in (memory / "memory.stat").read_text().splitlines():
                name, _, value = line.partition(" ")
                stat[name] = int(value)
            fs = os.statvfs(disk)
        except FileNotFoundError as exc:  # destroyed or hibernated meanwhile
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running") from exc
        except (OSError, ValueError) as exc:
            raise RuntimeFailure(f"usage of {sandbox_id}: {exc}") from exc
        # Checked after the statvfs: a disk unmounted before it was the data dir's filesystem.
        if not os.path.ismount(disk) or not await self.is_running(sandbox_id):
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running")
        file_cache = stat.get("total_active_file", 0) + stat.get("total_inactive_file", 0)
        return Usage(
            cpu_seconds=cpu,
            # usage_in_bytes lags memory.stat by a few per-CPU charge batches: never below 0.
            memory_used=max(0, charged - file_cache),
            memory_cache=stat.get("total_cache", 0),
            memory_total=limit,
            disk_used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
            disk_total=fs.f_blocks * fs.f_frsize,
        )

    async def is_running(self, sandbox_id: str) -> bool:
        self._check_id(sandbox_id)
        meta = self._read_meta(sandbox_id)
        pid, start = meta.get("init_pid"), meta.get("init_start")
        if not isinstance(pid, int) or not isinstance(start, int):
            return False
        return start_time(pid) == start

    async def list_sandboxes(self) -> list[str]:
        found: set[str] = set(self._runc.ids())
        for parent in (self._sandboxes, self._mount_dir):
            with contextlib.suppress(FileNotFoundError):
                found.update(p.name for p in parent.iterdir())
        found.update(self._slots.owners().values())
        return sorted(s for s in found if _ID_RE.match(s))

    async def open_agent(self, sandbox_id: str) -> Streams:
        self._check_id(sandbox_id)
        try:
            return await asyncio.open_unix_connection(str(self.agent_socket(sandbox_id)))
        except OSError as exc:
            raise SandboxNotRunningError(
                f"the agent of sandbox {sandbox_id} is not reachable: {exc.strerror or exc}"
            ) from exc

    async def close(self) -> None:
        """Nothing is held: sandboxes, mounts and disks outlive the server on purpose."""

    async def purge(self) -> None:
        """Destroy every sandbox and remove all host state of this data dir.

        For tests and uninstalling; a server never calls it.
        """
        errors: list[str] = []
        for sid in await self.list_sandboxes():
            try:
                await self.destroy(sid)
            except CorralError as exc:
                errors.append(exc.message)
        if errors:
            raise RuntimeFailure("; ".join(errors))
        for name in ("runc", "sandboxes", "uidranges"):
            shutil.rmtree(self.data_dir / name, ignore_errors=True)
        try:
            self._pool.remove()
        except OSError as exc:
            raise RuntimeFailure(f"storage pool: {exc}") from exc
        with contextlib.suppress(OSError):
            self._mount_dir.rmdir()
            self._mount_dir.parent.rmdir()  # only when no other data dir uses it
