#!/usr/bin/env bash
# Install the Debian packages corral needs on its host. Idempotent and quick when nothing is
# missing: apt is only touched (update + install) for packages that are not installed yet.
set -euo pipefail

# One package per line, with why. Other engineers: add what your part needs here.
PACKAGES=(
    runc             # OCI runtime of the container tier
    crun             # alternative OCI runtime (benchmarks, where it works)
    mmdebstrap       # builds the Debian "base" template
    debian-archive-keyring  # verifies the archive mmdebstrap downloads from
    busybox-static   # the "minimal" template and in-sandbox fallback tools
    e2fsprogs        # mkfs.ext4 for the per-sandbox disk images (hard disk quota)
    xfsprogs         # mkfs.xfs for the storage pool (reflink copies: snapshots, forks)
    qemu-system-x86  # the microvm tier (TCG where KVM is unusable)
    qemu-utils       # qemu-img: per-sandbox qcow2 overlays of template images
    linux-image-cloud-amd64  # the microvm guest kernel (its virtio modules go in the initramfs)
    nftables         # per-sandbox network policy
    iproute2         # netns, veth, bridge plumbing
    util-linux       # mount, unshare, nsenter
    bubblewrap       # bwrap: the namespaces of local mode (corral run, docs/local.md)
    libseccomp-dev   # seccomp filter for the in-sandbox agent
    gcc              # compiles the in-sandbox agent (static C)
    libc6-dev
    make
    python3
    python3-venv     # python3 -m venv .venv
    python3-dev
    docker-registry  # a real OCI registry on loopback for the image-import tests
)

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (apt-get install)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

# Node.js runs the E2B JS SDK's compatibility test. A node already on PATH (a newer one than
# Debian's, say) is kept; only a host without one gets Debian's.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    missing+=(nodejs npm)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps.sh: all ${#PACKAGES[@]} packages present"
    exit 0
fi

echo "install-deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
