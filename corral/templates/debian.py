"""The ``base`` template: Debian 12 (bookworm) built with mmdebstrap from the host's own mirror.

The mirror is whatever the host's apt is configured with, because hosts running corral are often
cut off from everything but their configured archive. Docs, man pages and apt caches are left out
to keep the layer small; an unprivileged ``user`` with passwordless sudo is what agents get by
default when they do not want root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from corral.errors import RuntimeFailure
from corral.templates.fs import mounts_below

__all__ = ["PACKAGES", "SUITE", "build_rootfs", "host_mirror_lines"]

SUITE = "bookworm"
PACKAGES = (
    "python3",
    "python3-pip",
    "python3-venv",
    "git",
    "curl",
    "ca-certificates",
    "build-essential",
    "procps",
    "iproute2",
    "sudo",
    "less",
    # useradd for the customize hook below; not part of the apt variant's essential set.
    "passwd",
)

# Debian release names a host's sources may use; anything else (vendor repositories) is skipped.
_DEBIAN_SUITES = {
    "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable",
}  # fmt: skip
_BUILD_TIMEOUT = 1800.0
_OUTPUT_TAIL = 200  # lines of tool output kept for the error message

_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    # Licences must stay with the binaries.
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)

# Run by mmdebstrap with the finished chroot as "$1".
_CUSTOMIZE = r"""
set -eu
root="$1"
chroot "$root" useradd --create-home --uid 1000 --user-group --shell /bin/bash user
printf 'user ALL=(ALL:ALL) NOPASSWD:ALL\n' > "$root/etc/sudoers.d/user"
chmod 0440 "$root/etc/sudoers.d/user"
# A disposable machine: let pip install into the system Python like in other sandbox images.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
# The host's name, resolver and identity must not leak into the template; the runtime provides
# resolv.conf and the hostname per sandbox. (/dev and /tmp are emptied after mmdebstrap has
# unmounted what it bind-mounted there, see _scrub.)
printf 'sandbox\n' > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$root/etc/hosts"
: > "$root/etc/resolv.conf"
: > "$root/etc/machine-id"
rm -rf "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/root/.cache
"""


def _sources_files(etc_apt: Path) -> list[Path]:
    files = [etc_apt / "sources.list"]
    directory = etc_apt / "sources.list.d"
    if directory.is_dir():
        # apt itself reads only these two suffixes; ".disabled" copies and the like are ignored.
        files += sorted(
            p for p in directory.iterdir() if p.suffix in (".list", ".sources") and p.is_file()
        )
    return [p for p in files if p.is_file()]


def _one_line_entries(text: str) -> Iterable[tuple[list[str], list[str], list[str], list[str]]]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # options such as [signed-by=...]
        words = line.split()
        if len(words) >= 3:
            yield [words[0]], [words[1]], [words[2]], words[3:]


def _deb822_entries(text: str) -> Iterable[tuple[list[str], list[str], list[str], list[str]]]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, value = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield (
            fields.get("types", "").split(),
            fields.get("uris", "").split(),
            fields.get("suites", "").split(),
            fields.get("components", "").split(),
        )


def host_mirror_lines(suite: str = SUITE, etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """One-line apt sources for ``suite`` (+ -updates, -security) on the host's Debian mirrors.

    Each Debian entry of the host keeps its URI and gets its suite renamed, so a host configured
    for another release still builds bookworm from its own mirror. Empty when the host has none.
    """
    lines: list[str] = []
    for path in _sources_files(etc_apt):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parse = _deb822_entries if path.suffix == ".sources" else _one_line_entries
        for types, uris, suites, components in parse(text):
            if "deb" not in types or "main" not in components:
                continue
            for host_suite in suites:
                codename, _, pocket = host_suite.replace("/updates", "-security").partition("-")
                if codename not in _DEBIAN_SUITES or pocket not in ("", "updates", "security"):
                    continue
                ours = suite + (f"-{pocket}" if pocket else "")
                for uri in uris:
                    line = f"deb {uri} {ours} main"
                    if line not in lines:
                        lines.append(line)
    return lines


def _run_logged(
    argv: list[str], on_output: Callable[[str], None] | None, timeout: float
) -> tuple[int, str]:
    """Run ``argv`` with stdout+stderr merged, streaming lines and keeping the tail."""
    tail: deque[str] = deque(maxlen=_OUTPUT_TAIL)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env={**os.environ, "LC_ALL": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
        )
    except OSError as exc:
        raise RuntimeFailure(f"cannot run {argv[0]}: {exc}") from exc
    timed_out = threading.Event()

    def _expire() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, _expire)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if on_output is not None:
                on_output(line)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        tail.append(f"(killed: still running after {timeout:.0f} s)")
    return code, "\n".join(tail)


def build_rootfs(dest: Path, on_output: Callable[[str], None] | None = None) -> None:
    """Create the base root filesystem in ``dest`` (which must not exist yet) with mmdebstrap."""
    tool = shutil.which("mmdebstrap")
    if tool is None:
        raise RuntimeFailure("mmdebstrap is not installed (Debian package mmdebstrap)")
    argv = [
        tool,
        "--variant=apt",
        "--mode=root",
        "--format=directory",
        "--include=" + ",".join(PACKAGES),
        '--aptopt=Acquire::Languages "none"',
        *(f"--dpkgopt={rule}" for rule in _EXCLUDES),
        f"--customize-hook={_CUSTOMIZE}",
        SUITE,
        str(dest),
        # No mirror lines: mmdebstrap falls back to Debian's default archive.
        *host_mirror_lines(),
    ]
    code, output = _run_logged(argv, on_output, _BUILD_TIMEOUT)
    if code != 0:
        raise RuntimeFailure(f"mmdebstrap failed (exit {code}):\n{output}")
    _scrub(dest)


def _scrub(root: Path) -> None:
    """Empty /dev and /tmp of the finished tree.

    Device nodes in a template would stay usable through the idmapped mount (the superblock
    belongs to the host), and the runtime mounts its own /dev anyway.
    """
    left = mounts_below(root)
    if left:
        raise RuntimeFailure(f"mmdebstrap left mounts below {root}: {', '.join(left)}")
    try:
        for sub in ("dev", "tmp"):
            for entry in (root / sub).iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    except OSError as exc:
        raise RuntimeFailure(f"cleaning {root} failed: {exc}") from exc
