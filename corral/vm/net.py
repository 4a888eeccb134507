"""A microvm's network: the sandbox's namespace is plumbed by the network layer exactly as for a
container (veth with the sandbox's /32, static neighbours, the host's firewall, DNS resolver
and egress proxy), and a tap inside that namespace is joined to the veth's inner end by tc
redirects both ways — a wire. The guest NIC takes the inner end's MAC and address, so the host
cannot tell a VM from a container and every rule applies unchanged; the namespace's own IP
stack is taken out of the path (its address is flushed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import RuntimeFailure
from corral.host.syscalls import unshare
from corral.host.userns import CLONE_NEWNET
from corral.vm.qemu import TAP

__all__ = ["VmNet", "add_tap", "fresh_netns_fd", "wire_tap"]


@dataclass(frozen=True)
class VmNet:
    mac: str  # the guest NIC's: the one the host's neighbour entry for the sandbox expects
    address: str
    gateway: str
    gateway_mac: str

    def guest_config(self) -> str:
        """What the guest's init reads from fw_cfg (``opt/corral/net``)."""
        return f"{self.address} {self.gateway} {self.gateway_mac}"


def fresh_netns_fd() -> int:
    """A descriptor of a new, empty network namespace (owned by the host's user namespace).

    Made on a thread of its own that ends right after: ``unshare`` moves only the calling thread,
    and a pool thread left in another namespace would carry it into unrelated work.
    """
    result: list[int] = []
    error: list[BaseException] = []

    def make() -> None:
        try:
            unshare(CLONE_NEWNET)
            result.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    t = threading.Thread(target=make, name="corral-netns")
    t.start()
    t.join()
    if error:
        raise RuntimeFailure(f"cannot make a network namespace: {error[0]}")
    return result[0]


def _in_netns(netns: Path, argv: list[str]) -> str:
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise RuntimeFailure("nsenter is not installed (apt-get install util-linux)")
    try:
        proc = subprocess.run(
            [nsenter, f"--net={netns}", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except subprocess.CalledProcessError as exc:
        raise RuntimeFailure(f"{argv[0]} in {netns.name} failed: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeFailure(f"{argv[0]} in {netns.name} failed: {exc}") from exc
    return proc.stdout


def add_tap(netns: Path, owner: int) -> None:
    """Just the tap, up, in ``netns`` (a template's boot needs a NIC but no network); ``owner``:
    the uid of the (jailed, unprivileged) QEMU that attaches to it."""
    script = f"ip tuntap add dev {TAP} mode tap user {owner} && ip link set {TAP} up"
    _in_netns(netns, ["sh", "-c", script])


def wire_tap(netns: Path, owner: int) -> VmNet:
    """Add the tap (for QEMU's uid ``owner``) to the plumbed namespace and wire it to eth0;
    returns what the guest needs. One ``nsenter`` and batched ``ip``/``tc``: each process
    started here is milliseconds of a create."""
    redirect = "protocol all u32 match u32 0 0 action mirred egress redirect dev"
    script = "\n".join(
        [
            "set -e",
            "ip -j addr show dev eth0",
            "ip -j neigh show dev eth0",
            "ip -b - <<EOF",
            f"tuntap add dev {TAP} mode tap user {owner}",
            f"link set {TAP} up",
            "addr flush dev eth0",
            "EOF",
            "tc -b - <<EOF",
            "qdisc add dev eth0 ingress",
            f"filter add dev eth0 parent ffff: {redirect} {TAP}",
            f"qdisc add dev {TAP} ingress",
            f"filter add dev {TAP} parent ffff: {redirect} eth0",
            "EOF",
        ]
    )
    out = _in_netns(netns, ["sh", "-c", script]).splitlines()
    try:
        links: list[dict[str, Any]] = json.loads(out[0])
        neigh: list[dict[str, Any]] = json.loads(out[1])
        link = links[0]
        address = next(a["local"] for a in link["addr_info"] if a.get("family") == "inet")
        gateway = next(n for n in neigh if "lladdr" in n)
        return VmNet(link["address"], address, gateway["dst"], gateway["lladdr"])
    except (IndexError, KeyError, StopIteration, ValueError) as exc:
        raise RuntimeFailure(f"the namespace {netns.name} is not plumbed as expected") from exc
