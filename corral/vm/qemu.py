"""One QEMU process per microvm: its command line, its jail, the accelerator choice, and QMP.

QEMU runs detached (it outlives a server restart, as containers do) with ``-nodefaults``, no
display, only the devices corral needs (virtio-serial for the agent, virtio-blk for the disk,
fw_cfg for per-sandbox settings), QEMU's own seccomp sandbox, and jailed by
``corral-vmjail`` (``jail.c``): its own uid without capabilities, its own mount, pid and IPC
namespaces, and a root holding only the files of its VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.agent.build import static_binary
from corral.errors import RuntimeFailure

__all__ = [
    "TAP",
    "Jail",
    "QemuConfig",
    "Qmp",
    "choose_accel",
    "jail_binary",
    "pinned_socket",
    "probe_boot",
    "qemu_argv",
    "qemus_serving",
    "save_state",
    "start_incoming",
    "start_qemu",
]


TAP = "tap0"
_HERE = Path(__file__).parent


def jail_binary() -> Path:
    return static_binary([_HERE / "jail.c"], _HERE / "bin" / "corral-vmjail")


@dataclass(frozen=True)
class Jail:
    """What a QEMU sees and who it runs as: every path at its own absolute path, nothing else
    (plus /usr, its libraries and a /proc of its own pid namespace)."""

    uid: int  # also its gid; unprivileged, the VM's alone
    root: Path  # an empty directory the jail's root is mounted on (in the jail's namespace)
    read_only: tuple[Path, ...] = ()
    read_write: tuple[Path, ...] = ()
    devices: tuple[Path, ...] = ()
    groups: tuple[int, ...] = ()

    def argv(self, pid_file: Path) -> list[str]:
        out = [str(jail_binary()), "--uid", str(self.uid), "--gid", str(self.uid)]
        out += ["--root", str(self.root), "--pidfile", str(pid_file)]
        for gid in self.groups:
            out += ["--group", str(gid)]
        system = [Path(p) for p in ("/usr", "/lib", "/lib64", "/bin") if Path(p).exists()]
        for flag, paths in (
            ("--ro", (*system, *self.read_only)),
            ("--rw", self.read_write),
            ("--dev", self.devices),
        ):
            for path in paths:
                out += [flag, str(path)]
        return [*out, "--"]


def _nsenter() -> str:
    found = shutil.which("nsenter")
    if found is None:
        raise RuntimeFailure("nsenter is not installed (apt-get install util-linux)")
    return found


# A native-speed KVM boots the guest kernel to its first panic (no root given) in a few tenths
# of a second; TCG on our hosts takes 2.0 s, and a stock kernel on PVM over 10 s.
PROBE_BUDGET = 1.0


def probe_boot(kernel: Path, accel: str, budget: float = PROBE_BUDGET) -> float | None:
    """Seconds QEMU with ``accel`` takes to boot ``kernel`` until it panics for want of a root
    and exits (``panic=-1``, ``-no-reboot``), or None when it did not within ``budget``."""
    argv = [qemu_binary(), "-accel", accel, "-cpu", _cpu(accel), "-m", "128", "-smp", "1"]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-vga", "none"]
    argv += ["-no-reboot", "-serial", "none", "-kernel", str(kernel)]
    argv += ["-append", "console=ttyS0 panic=-1 quiet", "-sandbox", "on,spawn=deny"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=budget, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    took = time.monotonic() - t0
    return took if proc.returncode == 0 else None


def choose_accel(kernel: Path | None, cache: Path | None = None) -> tuple[str, str]:
    """``kvm`` when a quick probe boots the guest kernel at native-like speed with it, else
    ``tcg``; and why, in words (for ``/v1/info`` and the server's log). ``cache``: a file
    where the probe's verdict is kept for this boot of the host, QEMU and kernel.

    On our hosts ``/dev/kvm`` is PVM (``kvm_pvm``): stock guest kernels crawl there (over 10 s
    to what TCG does in 2), so PVM is refused without a probe.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg", "/dev/kvm is PVM, on which stock guest kernels crawl"
    if kernel is None:
        return "tcg", "no guest kernel to probe KVM with"
    key = _probe_key(kernel)
    if cache is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            known = json.loads(cache.read_text())
            if known["key"] == key:
                return str(known["accel"]), str(known["reason"])
    took = probe_boot(kernel, "kvm")
    if took is None:
        verdict = ("tcg", f"KVM did not boot the guest kernel within {PROBE_BUDGET} s")
    else:
        verdict = ("kvm", f"KVM boots the guest kernel in {took:.2f} s")
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "accel": verdict[0], "reason": verdict[1]}))
    return verdict


def _probe_key(kernel: Path) -> str:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    parts = [
        boot,
        str(kernel),
        str(kernel.stat().st_mtime_ns),
        str(os.stat(qemu_binary()).st_mtime_ns),
    ]
    return "|".join(parts)


def _cpu(accel: str) -> str:
    # The host's CPU, less what KVM cannot set on every host (arch-capabilities' MSR).
    return "host,-arch-capabilities" if accel == "kvm" else "max"


@dataclass(frozen=True)
class QemuConfig:
    name: str
    kernel: Path
    initramfs: Path
    disk: Path
    agent_socket: Path
    qmp_socket: Path
    console_log: Path
    pid_file: Path
    env_file: Path
    hostname: str
    vcpus: int = 1
    memory_mb: int = 512
    accel: str = "tcg"
    # The sandbox's plumbed network namespace (QEMU runs in it) and the guest NIC's MAC (the
    # one the host's neighbour entry expects); None: no NIC at all.
    netns: Path | None = None
    mac: str | None = None
    net_config: str | None = None
    # Guest RAM in this file (a warm template: shared while it is built, private copy-on-write
    # in its clones); None: anonymous memory. Either way the RAM block is named ``mem0``, so a
    # state saved by any VM loads into any other of the same shape.
    memory_file: Path | None = None
    memory_shared: bool = False
    # A descriptor (inherited) to read a saved VM state from: the VM starts from it.
    incoming_fd: int | None = None
    # Guest RAM from this inherited descriptor instead of ``memory_file`` (a sealed memfd of a
    # warm template's memory: mapped private, it can be read but never written through).
    memory_fd: int | None = None
    jail: Jail | None = None


def qemu_binary() -> str:
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise RuntimeFailure("QEMU is not installed (apt-get install qemu-system-x86)")
    return found


def qemu_argv(cfg: QemuConfig) -> list[str]:
    cpu = _cpu(cfg.accel)
    return [
        qemu_binary(),
        "-name",
        f"corral-{cfg.name}",
        "-machine",
        "pc,memory-backend=mem0",
        "-accel",
        # TCG's translation cache defaults to 1 GiB: 64 MiB keeps QEMU inside its cgroup.
        "kvm" if cfg.accel == "kvm" else "tcg,tb-size=64",
        "-cpu",
        cpu,
        "-smp",
        str(cfg.vcpus),
        "-m",
        str(cfg.memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-reboot",
        "-kernel",
        str(cfg.kernel),
        "-initrd",
        str(cfg.initramfs),
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init",
        "-serial",
        f"file:{cfg.console_log}",
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,id=agent,path={cfg.agent_socket},server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=corral.agent",
        "-drive",
        f"file={cfg.disk},format=qcow2,if=virtio,cache=writeback,discard=unmap",
        "-fw_cfg",
        f"name=opt/corral/env,file={cfg.env_file}",
        "-fw_cfg",
        f"name=opt/corral/hostname,string={cfg.hostname}",
        *_nic(cfg),
        *_memory(cfg),
        "-qmp",
        f"unix:{cfg.qmp_socket},server=on,wait=off",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        # Jailed, QEMU is pid 1 of its namespace: the jail writes its host pid instead.
        *([] if cfg.jail is not None else ["-pidfile", str(cfg.pid_file)]),
    ]


def _nic(cfg: QemuConfig) -> list[str]:
    if cfg.mac is None:
        return []
    nic = [
        "-netdev",
        f"tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off",
        "-device",
        f"virtio-net-pci,netdev=net0,mac={cfg.mac}",
    ]
    if cfg.net_config is not None:
        nic += ["-fw_cfg", f"name=opt/corral/net,string={cfg.net_config}"]
    return nic


def _memory(cfg: QemuConfig) -> list[str]:
    out: list[str] = []
    path = f"/proc/self/fd/{cfg.memory_fd}" if cfg.memory_fd is not None else cfg.memory_file
    if path is not None:
        share = "on" if cfg.memory_shared else "off"
        out += [
            "-object",
            f"memory-backend-file,id=mem0,size={cfg.memory_mb}M,mem-path={path},share={share}",
        ]
    else:
        out += ["-object", f"memory-backend-ram,id=mem0,size={cfg.memory_mb}M"]
    if cfg.incoming_fd is not None:
        # Started over QMP (``start_incoming``) once x-ignore-shared is on: QEMU 7.2 has no
        # command-line property for that capability.
        out += ["-incoming", "defer"]
    return out


async def start_incoming(qmp: Qmp, fd: int) -> None:
    """Load the saved state from inherited descriptor ``fd``; a warm template's pages come from
    the (privately mapped) memory file, not from the stream. ``x-ignore-shared`` is on at both
    ends of every save and load: QEMU refuses a stream whose validated capabilities differ
    from its own, and with no shared RAM the capability changes nothing."""
    caps = [{"capability": "x-ignore-shared", "state": True}]
    await qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    await qmp.execute("migrate-incoming", {"uri": f"fd:{fd}"})


async def start_qemu(cfg: QemuConfig, log: Path, timeout: float = 20.0) -> int:
    """Start QEMU detached from the server (a new session, not our child, so it outlives a
    server restart); returns its pid once its sockets exist.

    QEMU's own ``-daemonize`` forks after ``-sandbox spawn=deny`` is in force, which kills it
    (SIGSYS): ``setsid --fork`` detaches it instead.
    """
    setsid = shutil.which("setsid")
    if setsid is None:
        raise RuntimeFailure("setsid is not installed (apt-get install util-linux)")
    with open(log, "ab") as out:
        enter: list[str] = []
        if cfg.netns is not None:
            # QEMU opens the sandbox's tap, which exists only inside its namespace.
            enter = [_nsenter(), f"--net={cfg.netns}"]
        jail = cfg.jail.argv(cfg.pid_file) if cfg.jail is not None else []
        inherited = tuple(fd for fd in (cfg.incoming_fd, cfg.memory_fd) if fd is not None)
        proc = await asyncio.create_subprocess_exec(
            setsid,
            "--fork",
            *enter,
            *jail,
            *qemu_argv(cfg),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=inherited,
        )
        await proc.wait()
    deadline = asyncio.get_running_loop().time() + timeout
    pid: int | None = None
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(cfg.pid_file.read_text().strip())
        if pid is not None and cfg.agent_socket.exists() and cfg.qmp_socket.exists():
            return pid
        if pid is not None and not Path(f"/proc/{pid}").exists():
            break
        await asyncio.sleep(0.002)  # QEMU is up in ~30 ms: a coarse poll would add to a create
    # Never leave a QEMU that came up too slowly behind: nobody would know its pid.
    strays = set(qemus_serving(cfg.qmp_socket))
    if pid is not None:
        strays.add(pid)
    for stray in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stray, signal.SIGKILL)
    tail = log.read_text(errors="replace")[-2000:].strip()
    raise RuntimeFailure(f"QEMU did not start: {tail or 'no output'}")


def qemus_serving(qmp_socket: Path) -> list[int]:
    """Pids of the QEMUs started for this QMP socket (one VM's own): found by command line,
    for those whose pid nobody recorded (a server that died while starting one)."""
    argument = f"unix:{qmp_socket},server=on,wait=off"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if argument.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def pinned_socket(path: Path) -> Iterator[str]:
    """A path to connect to the unix socket at ``path`` that cannot be redirected: the socket
    directory is the jailed QEMU's to write in, and a symlink it planted there in place of its
    socket would otherwise send the server's connection (an agent's exec!) anywhere the link
    points, another VM's socket included. The socket is pinned with an ``O_PATH|O_NOFOLLOW``
    descriptor and reached through ``/proc/self/fd``."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ConnectionRefusedError(f"{path} is not a socket")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _answer(line: bytes, command: str) -> tuple[bool, Any]:
    """One line QEMU sent on QMP after ``command``: (False, None) for an event (skip it),
    (True, its return value) for the answer; an error answer or a closed connection raises."""
    answer = json.loads(line or b"{}")
    if "event" in answer:
        return False, None
    if "error" in answer:
        raise RuntimeFailure(f"QMP {command}: {answer['error'].get('desc')}")
    if not answer:
        raise RuntimeFailure(f"QMP {command}: connection closed")
    return True, answer.get("return")


def save_state(qmp_socket: Path, out_fd: int, timeout: float = 300.0) -> None:
    """Write the whole state of a *stopped* VM (devices, and RAM not in a shared file) to
    ``out_fd``, passed to QEMU over the QMP socket (``getfd``): no ``exec:`` shell, so QEMU's
    ``spawn=deny`` stays on. Blocking (run it in a thread). Once it returns QEMU is in
    ``postmigrate`` with its disks flushed and inactive: ``cont`` makes it run again."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with pinned_socket(qmp_socket) as pinned:
                sock.connect(pinned)
        except OSError as exc:
            raise RuntimeFailure(f"QMP {qmp_socket} unreachable: {exc.strerror or exc}") from exc
        answers = sock.makefile("rb")
        answers.readline()  # greeting

        def call(command: str, arguments: dict[str, Any] | None = None, fd: int = -1) -> Any:
            line = json.dumps({"execute": command, "arguments": arguments or {}}).encode()
            if fd >= 0:
                socket.send_fds(sock, [line + b"\n"], [fd])
            else:
                sock.sendall(line + b"\n")
            while True:
                done, value = _answer(answers.readline(), command)
                if done:
                    return value

        call("qmp_capabilities")
        caps = [{"capability": "x-ignore-shared", "state": True}]
        call("migrate-set-capabilities", {"capabilities": caps})
        call("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        call("getfd", {"fdname": "corral-state"}, fd=out_fd)
        call("migrate", {"uri": "fd:corral-state"})
        deadline = time.monotonic() + timeout
        while True:
            info = call("query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeFailure(
                    f"saving the VM state failed ({status}: {info.get('error-desc', 'timed out')})"
                )
            time.sleep(0.002)


class Qmp:
    """Just enough of the QEMU Machine Protocol. ``execute`` alone runs one command on a fresh
    connection; ``async with Qmp(path) as qmp`` keeps one connection for several (each
    connection costs a greeting and a capabilities negotiation: milliseconds a create pays)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Qmp:
        try:
            with pinned_socket(self.path) as pinned:
                self._reader, self._writer = await asyncio.open_unix_connection(pinned)
        except OSError as exc:
            raise RuntimeFailure(f"QMP {self.path} unreachable: {exc.strerror or exc}") from exc
        try:
            await self._reader.readline()  # greeting
            await self._send("qmp_capabilities", None)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._writer is None:
            async with Qmp(self.path) as once:
                return await once.execute(command, arguments)
        return await self._send(command, arguments)

    async def _send(self, command: str, arguments: dict[str, Any] | None) -> Any:
        assert self._reader is not None and self._writer is not None
        call: dict[str, Any] = {"execute": command}
        if arguments:
            call["arguments"] = arguments
        try:
            self._writer.write(json.dumps(call).encode() + b"\n")
            await self._writer.drain()
            while True:
                done, value = _answer(await self._reader.readline(), command)
                if done:
                    return value
        except OSError as exc:  # QEMU went away mid-command
            raise RuntimeFailure(f"QMP {command}: {exc.strerror or exc}") from exc
