"""Real template builds: minimal has a working busybox layout, base is a usable Debian built once."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.templates import build_in_data_dir, is_built, rootfs_path

pytestmark = pytest.mark.integration

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chroot and template ownership need root")


@pytest.fixture(scope="module")
def base_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where base is built: CI's shared data dir (built by `make templates`) or a private one."""
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (scripts/install-deps.sh installs it)")
    shared = os.environ.get("CORRAL_TEST_DATA_DIR")
    if shared:
        yield Path(shared)
        return
    private = tmp_path_factory.mktemp("base-data")
    yield private
    shutil.rmtree(private, ignore_errors=True)


def _chroot(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, timeout=60, check=False
    )


@needs_root
def test_minimal_layout_and_shell(tmp_path: Path) -> None:
    info = build_in_data_dir("minimal", tmp_path)
    root = rootfs_path(tmp_path, "minimal")
    assert info.built and is_built(root)
    assert root == tmp_path / "templates" / "minimal" / "rootfs"

    meta = json.loads((root.parent / "meta.json").read_text())
    assert info.size_bytes is not None and info.size_bytes > 1_000_000
    assert meta["size_bytes"] == info.size_bytes
    assert meta["built_at"].endswith("Z") and meta["description"]

    st = root.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    for mountpoint in ("dev", "proc", "sys", "root", "etc"):
        assert (root / mountpoint).is_dir()
    assert os.readlink(root / "bin" / "sh") == "/bin/busybox"
    passwd = (root / "etc" / "passwd").read_text()
    assert passwd.startswith("root:x:0:0:") and "nobody:x:65534:65534:" in passwd
    assert "nobody:x:65534:" in (root / "etc" / "group").read_text()
    assert "localhost" in (root / "etc" / "hosts").read_text()

    # The rootfs works on its own: no host library is needed.
    result = _chroot(root, "/bin/sh", "-c", "echo hi | tr a-z A-Z; id -u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["HI", "0"]


@needs_root
def test_base_is_a_usable_debian_built_once(base_data_dir: Path) -> None:
    info = build_in_data_dir("base", base_data_dir)
    root = rootfs_path(base_data_dir, "base")
    assert info.built and info.size_bytes
    meta_path = root.parent / "meta.json"
    meta_before = meta_path.read_text()
    inode_before = root.stat().st_ino

    # A second build is a no-op: same directory, same meta.json.
    again = build_in_data_dir("base", base_data_dir)
    assert again == info
    assert root.stat().st_ino == inode_before
    assert meta_path.read_text() == meta_before

    assert "VERSION_CODENAME=bookworm" in (root / "etc" / "os-release").read_text()
    st = root.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o755)

    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert passwd["user"][2:4] == ["1000", "1000"]
    assert passwd["user"][5:7] == ["/home/user", "/bin/bash"]
    sudoers = root / "etc" / "sudoers.d" / "user"
    assert "NOPASSWD:ALL" in sudoers.read_text()
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    assert (root / "home" / "user").stat().st_uid == 1000

    # Nothing of the host's identity, no device nodes, no caches.
    assert (root / "etc" / "hostname").read_text().strip() == "sandbox"
    assert (root / "etc" / "resolv.conf").read_text() == ""
    assert list((root / "dev").iterdir()) == []
    assert list((root / "var" / "lib" / "apt" / "lists").glob("*_Packages*")) == []
    assert list((root / "var" / "cache" / "apt").glob("*.bin")) == []
    assert not list((root / "usr" / "share" / "man").glob("man1/*"))

    for tool in ("python3", "pip3", "git", "curl", "gcc", "make", "sudo", "less", "ps", "ip"):
        assert (root / "usr" / "bin" / tool).exists() or (root / "usr" / "sbin" / tool).exists(), (
            tool
        )

    result = _chroot(root, "/usr/bin/python3", "-c", "import venv, ssl, sqlite3; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
