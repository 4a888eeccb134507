#!/usr/bin/env bash
# Install the engines corral is benchmarked against (Debian's own packages only). Idempotent.
# Nothing is started here: bench/peers.py starts a private dockerd for the run and stops it.
set -euo pipefail

PACKAGES=(
    runc crun           # the OCI runtime floor
    docker.io           # dockerd + containerd (+ the static docker CLI if none is on PATH)
    podman conmon       # daemonless peer
    uidmap              # newuidmap for podman's user-namespace mode
    bubblewrap socat ripgrep  # what Anthropic's srt needs (bench_local.py installs srt from npm)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup-peers.sh: ${PACKAGES[*]} already installed"
    exit 0
fi
echo "setup-peers.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps out Docker's optional extras; policy-rc.d keeps the package
# scripts from starting daemons on hosts that have an init system.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}"
