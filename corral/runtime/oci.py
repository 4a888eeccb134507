"""The OCI runtime-spec ``config.json`` of a container-tier sandbox.

All isolation choices that are policy rather than plumbing (capabilities, seccomp rules, masked
and read-only paths) are data files in ``corral/resources`` with a reason on every entry; this
module only turns them and a ``SandboxSpec`` into the runtime's format.
"""

from __future__ import annotations

import errno
import json
import platform
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.runtime.base import SandboxSpec

__all__ = ["AGENT_PATH", "LISTEN_FD", "IsolationProfile", "build_config"]

AGENT_PATH = "/.corral/agent"
LISTEN_FD = 3  # runc --preserve-fds 1 puts the first passed fd here
_RESOURCES = Path(__file__).resolve().parent.parent / "resources"
_MiB = 1024 * 1024
_CPU_PERIOD_US = 100_000
_SHM_SIZE = "65536k"
_NOFILE = 65536
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SECCOMP_ARCH = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


def _load(name: str) -> Any:
    try:
        return json.loads((_RESOURCES / name).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"cannot load isolation resource {name}: {exc}") from exc


def _errno(name: str) -> int:
    value = getattr(errno, name, None)
    if not isinstance(value, int):
        raise RuntimeFailure(f"seccomp profile names unknown errno {name}")
    return value


@dataclass(frozen=True)
class IsolationProfile:
    """The policy data of ``corral/resources``, already in OCI form."""

    capabilities: tuple[str, ...]
    seccomp: dict[str, Any]
    masked_paths: tuple[str, ...]
    readonly_paths: tuple[str, ...]

    @classmethod
    def load(cls) -> IsolationProfile:
        caps = _load("capabilities.json")
        paths = _load("paths.json")
        profile = _load("seccomp.json")
        arch = _SECCOMP_ARCH.get(platform.machine())
        if arch is None:
            raise RuntimeFailure(f"no seccomp profile for {platform.machine()}")
        syscalls: list[dict[str, Any]] = []
        for rule in profile["rules"]:
            entry: dict[str, Any] = {"names": list(rule["names"]), "action": rule["action"]}
            if "errno" in rule:
                entry["errnoRet"] = _errno(rule["errno"])
            if "args" in rule:
                entry["args"] = [dict(a) for a in rule["args"]]
            syscalls.append(entry)
        seccomp = {
            "defaultAction": profile["defaultAction"],
            "defaultErrnoRet": _errno(profile["defaultErrno"]),
            "architectures": [arch],
            "syscalls": syscalls,
        }
        return cls(
            capabilities=tuple(c["name"] for c in caps["capabilities"]),
            seccomp=seccomp,
            masked_paths=tuple(p["path"] for p in paths["masked"]),
            readonly_paths=tuple(p["path"] for p in paths["readonly"]),
        )


def _env(spec: SandboxSpec) -> list[str]:
    env = {"PATH": _DEFAULT_PATH, "HOME": "/root", "HOSTNAME": spec.hostname}
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidRequestError(f"invalid environment variable name or value: {key!r}")
        env[key] = value
    return [f"{k}={v}" for k, v in env.items()]


def build_config(
    spec: SandboxSpec,
    profile: IsolationProfile,
    *,
    rootfs: Path,
    agent_binary: Path,
    host_id: int,
    id_count: int,
    cgroups_path: str,
    userns: str | None = None,
    netns: Path | None = None,
) -> dict[str, Any]:
    """The complete ``config.json`` for ``spec`` (an OCI runtime-spec 1.0 document).

    ``userns``/``netns``: namespaces made beforehand for runc to join instead of creating them.
    """
    caps = list(profile.capabilities)
    own_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = _NOFILE if own_hard == resource.RLIM_INFINITY else min(_NOFILE, own_hard)
    memory = spec.memory_mb * _MiB
    mapping = [{"containerID": 0, "hostID": host_id, "size": id_count}]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_PATH, "--listen-fd", str(LISTEN_FD)],
            "env": _env(spec),
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "inheritable": [],
                "ambient": [],
            },
            # Bounds descriptors per process; kernel memory for files is charged to the memory
            # cgroup, which bounds the total. Inside a user namespace runc can only lower limits,
            # so never ask for more than the server itself has.
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": spec.hostname,
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": [
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={_SHM_SIZE}"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": AGENT_PATH,
                "type": "bind",
                "source": str(agent_binary),
                "options": ["bind", "ro", "nosuid", "nodev"],
            },
        ],
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": [
                {"type": "pid"},
                # Joined by path when corral's network layer plumbed one (made by the runtime
                # inside the sandbox's user namespace, joined below by path as well).
                {"type": "network", "path": str(netns)} if netns else {"type": "network"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "user", "path": str(userns)} if userns else {"type": "user"},
                {"type": "cgroup"},
            ],
            # ICMP echo through datagram sockets for every sandbox group, so ping works
            # without CAP_NET_RAW (the range is in the sandbox's own ids).
            "sysctl": {"net.ipv4.ping_group_range": f"0 {id_count - 1}"},
            "cgroupsPath": cgroups_path,
            "resources": {
                # Deny every device; runc appends its allowlist (null, zero, full, random,
                # urandom, tty, ptmx, pts) after this rule.
                "devices": [{"allow": False, "access": "rwm"}],
                # swap == limit: memory+swap may not exceed memory, i.e. no swap at all.
                "memory": {"limit": memory, "swap": memory},
                "cpu": {
                    "quota": max(1000, round(spec.cpu * _CPU_PERIOD_US)),
                    "period": _CPU_PERIOD_US,
                },
                "pids": {"limit": spec.pids_max},
            },
            "seccomp": profile.seccomp,
            "maskedPaths": list(profile.masked_paths),
            "readonlyPaths": list(profile.readonly_paths),
        },
    }
