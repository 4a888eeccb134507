"""What a microvm boots: Debian's cloud kernel, an initramfs corral builds, and an ext4 root image
made from the same template build as the container tier.

The initramfs holds busybox, the virtio modules (Debian builds them as modules; they must load
in dependency order), the sandbox agent and ``corral-vmux``. Its ``/init`` mounts the sandbox's
disk (``/dev/vda``: a qcow2 overlay of the template image) as the new root, puts the agent and
vmux on a tmpfs at ``/.corral``, moves ``/dev``, ``/proc`` and ``/sys`` over and switches root
to ``corral-vmux --boot``, which forks the port multiplexer and becomes the agent (the guest's
pid 1, as the agent is a container's). What differs per sandbox (environment, host name) comes
in through QEMU's fw_cfg, so one initramfs serves every VM.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corral.agent.build import static_binary
from corral.errors import RuntimeFailure

__all__ = [
    "GuestKernel",
    "build_initramfs",
    "find_kernel",
    "layered_root_image",
    "qemu_img",
    "root_image",
    "vmux_binary",
]

_HERE = Path(__file__).resolve().parent
# Load order matters: each needs the ones before it (modules.dep of Debian's 6.1 cloud kernel).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "qemu_fw_cfg",
    "failover",
    "net_failover",
    "virtio_net",
)
AGENT_PORT = "corral.agent"
_BUSYBOX = ("/bin/busybox", "/usr/bin/busybox")

_INIT = r"""#!/bin/busybox sh
# corral microvm init (initramfs): modules, the sandbox disk as root, then the agent as pid 1.
b=/bin/busybox
fail() { echo "corral-init: $*" > /dev/console; $b poweroff -f; }
$b mount -t proc proc /proc
$b mount -t sysfs sysfs /sys
$b mount -t devtmpfs devtmpfs /dev
for m in MODULES; do $b insmod /lib/modules/$m.ko || fail "insmod $m"; done
$b mount -t ext4 -o noatime /dev/vda /newroot || fail "cannot mount the sandbox disk"
$b mkdir -p /newroot/.corral /newroot/dev /newroot/proc /newroot/sys
$b mount -t tmpfs -o mode=0755,size=64m corral /newroot/.corral
$b cp /corral/agent /corral/vmux /bin/busybox /newroot/.corral/ || fail "cannot install the agent"
# /etc/resolv.conf is corral's (as Docker's is): kept on the tmpfs, bound over the disk's file,
# so that a clone's nameserver is a write to memory (to the disk: ~40 ms of TCG translating
# ext4's write path on the clone's first write).
r=/newroot/etc/resolv.conf
if [ -d /newroot/etc ] && { [ ! -e $r ] || { [ -f $r ] && [ ! -L $r ]; }; }; then
    $b cat $r > /newroot/.corral/resolv.conf 2>/dev/null
    [ -e $r ] || $b touch $r
    $b mount --bind /newroot/.corral/resolv.conf $r
fi
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/corral
$b cat $fw/env/raw > /newroot/.corral/env 2>/dev/null
host=$($b cat $fw/hostname/raw 2>/dev/null)
port=
for p in /sys/class/virtio-ports/*; do
    [ "$($b cat $p/name 2>/dev/null)" = "AGENT_PORT" ] && port=/dev/${p##*/}
done
[ -n "$port" ] || fail "no agent port"
# Networking (when the sandbox has one): the address, gateway and the gateway's MAC that the
# host plumbed for this sandbox; static like a container's, no DHCP, no IPv6.
$b ip link set lo up
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null
net=$($b cat $fw/net/raw 2>/dev/null)
if [ -n "$net" ]; then
    set -- $net
    $b ip link set eth0 up || fail "no eth0"
    $b ip addr add "$1/32" dev eth0
    $b ip route add "$2" dev eth0
    $b ip route add default via "$2" dev eth0
    $b arp -i eth0 -s "$2" "$3"
    [ -d /newroot/etc ] && echo "nameserver $2" > /newroot/etc/resolv.conf
elif [ -e /sys/class/net/eth0 ]; then
    # A warm template's NIC: up with no address, so that its clones need only be given one
    # (under TCG a clone's first link-up costs ~40 ms).
    $b ip link set eth0 up
fi
$b mount --move /dev /newroot/dev
$b mount --move /proc /newroot/proc
$b mount --move /sys /newroot/sys
$b mkdir -p /newroot/dev/pts /newroot/dev/shm
$b mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts
$b ln -sf pts/ptmx /newroot/dev/ptmx 2>/dev/null
$b mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm
exec $b switch_root /newroot /.corral/vmux --boot /.corral/env "${host:-sandbox}" "$port" \
    /.corral/agent.sock -- /.corral/agent --listen /.corral/agent.sock
"""


@dataclass(frozen=True)
class GuestKernel:
    version: str
    vmlinuz: Path
    modules: Path


def _version_key(version: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", version)]


def find_kernel(boot: Path = Path("/boot"), lib: Path = Path("/lib/modules")) -> GuestKernel:
    """The newest Debian cloud kernel installed on the host (``linux-image-cloud-amd64``)."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*-cloud-amd64"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        if (lib / version).is_dir():
            found.append(GuestKernel(version, vmlinuz, lib / version))
    if not found:
        raise RuntimeFailure(
            "no guest kernel: the microvm tier boots Debian's cloud kernel "
            "(apt-get install linux-image-cloud-amd64)"
        )
    return max(found, key=lambda k: _version_key(k.version))


def vmux_binary() -> Path:
    return static_binary([_HERE / "vmux.c"], _HERE / "bin" / "corral-vmux")


def _module_files(kernel: GuestKernel) -> list[Path]:
    paths = []
    for name in MODULES:
        hits = sorted(kernel.modules.rglob(f"{name}.ko"))
        if not hits:
            raise RuntimeFailure(
                f"guest kernel {kernel.version} has no {name}.ko (compressed modules are not "
                "supported by the initramfs's busybox insmod)"
            )
        paths.append(hits[0])
    return paths


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def build_initramfs(cache: Path, kernel: GuestKernel, agent: Path) -> Path:
    """The initramfs for ``kernel`` with ``agent``, built once per combination (cached)."""
    busybox = next((Path(p) for p in _BUSYBOX if Path(p).is_file()), None)
    if busybox is None:
        raise RuntimeFailure("busybox is not installed (apt-get install busybox-static)")
    vmux = vmux_binary()
    modules = _module_files(kernel)
    init = _INIT.replace("MODULES", " ".join(MODULES)).replace("AGENT_PORT", AGENT_PORT)
    files: list[tuple[str, int, bytes]] = [
        ("init", 0o755, init.encode()),
        ("bin/busybox", 0o755, busybox.read_bytes()),
        ("corral/agent", 0o755, agent.read_bytes()),
        ("corral/vmux", 0o755, vmux.read_bytes()),
        *((f"lib/modules/{m.name}", 0o644, m.read_bytes()) for m in modules),
    ]
    key = _digest([kernel.version.encode(), *(name.encode() + data for name, _, data in files)])
    path = cache / f"initramfs-{key}.cpio"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    writer = _Cpio()
    for d in ("bin", "corral", "dev", "lib", "lib/modules", "newroot", "proc", "sys"):
        writer.add(d, 0o040755)
    # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    writer.add("dev/console", 0o020600, rdev=(5, 1))
    for name, mode, data in files:
        writer.add(name, 0o100000 | mode, data)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        tmp.write_bytes(writer.finish())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class _Cpio:
    """An uncompressed ``newc`` archive (what the kernel unpacks; uncompressed boots faster
    under TCG than gzip)."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            2 if mode & 0o040000 else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return bytes(self._out)


def root_image(cache: Path, template: str, rootfs: Path, size_mb: int) -> Path:
    """An ext4 image of ``size_mb`` holding ``rootfs`` (cached per template build and size): the
    backing file of every sandbox disk of that template."""
    meta = rootfs.parent / "meta.json"
    stamp = meta.read_bytes() if meta.exists() else str(rootfs.stat().st_mtime_ns).encode()
    key = _digest([template.encode(), str(rootfs).encode(), stamp, str(size_mb).encode()])
    path = cache / f"{template}-{key}.ext4"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-d", str(rootfs)]
        argv += ["-E", "lazy_itable_init=1,lazy_journal_init=1", str(tmp)]
        try:
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
        except FileNotFoundError as exc:
            raise RuntimeFailure("mkfs.ext4 is not installed (apt-get install e2fsprogs)") from exc
        except subprocess.CalledProcessError as exc:
            raise RuntimeFailure(
                f"cannot make the {template} VM image: {exc.stderr.strip()}"
            ) from exc
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def layered_root_image(cache: Path, layers: tuple[Path, ...], size_mb: int) -> Path:
    """An ext4 image of ``size_mb`` holding the merged view of ``layers`` (lowest first;
    layers of the store are immutable, so their paths and mtimes are the cache key).

    The merge is overlayfs's own, read-only, mounted in a private mount namespace of the mkfs
    process (``unshare -m``): whiteouts and opaque dirs apply exactly as in a container, and
    the mount can never outlive the process or show on the host."""
    key = _digest(
        [str(size_mb).encode(), *(f"{p}:{p.stat().st_mtime_ns}".encode() for p in layers)]
    )
    path = cache / f"layers-{key}.ext4"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    lower = ":".join(str(p) for p in reversed(layers))  # overlayfs: topmost first
    script = (
        'set -e; m=$(mktemp -d); trap \'umount "$m" 2>/dev/null; rmdir "$m"\' EXIT; '
        'mount -t overlay overlay -o "ro,lowerdir=$1" "$m"; '
        'mkfs.ext4 -q -F -m 0 -d "$m" -E lazy_itable_init=1,lazy_journal_init=1 "$2"'
    )
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
        argv += [lower, str(tmp)]  # (one layer goes to root_image: overlayfs wants two)
        try:
            subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
        except subprocess.CalledProcessError as exc:
            raise RuntimeFailure(
                f"cannot make a VM image of the layers: {exc.stderr.strip()}"
            ) from exc
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise RuntimeFailure("qemu-img is not installed (apt-get install qemu-utils)")
    return found
