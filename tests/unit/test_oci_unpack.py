"""unpack_layer turns a layer tar into an overlayfs lower layer and never writes outside it."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from corral.errors import InvalidRequestError
from corral.templates.unpack import unpack_layer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, xattrs)")

MTIME = 1_600_000_000
# A valid VFS_CAP_REVISION_2 blob: effective, permitted = CAP_NET_BIND_SERVICE.
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


@dataclass
class E:
    """One tar member to write."""

    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: int = MTIME
    pax: dict[str, str] = field(default_factory=dict)
    dev: tuple[int, int] = (0, 0)


def make_tar(entries: Iterable[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = e.type
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            info.mtime = e.mtime
            info.linkname = e.link
            info.pax_headers = dict(e.pax)
            info.devmajor, info.devminor = e.dev
            if e.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def unpack(dest: Path, entries: Iterable[E]) -> int:
    return unpack_layer(io.BytesIO(make_tar(entries)), dest)


def xattr(value: bytes) -> str:
    """How tarfile hands a PAX value in (undecodable bytes surrogate-escaped)."""
    return value.decode("utf-8", "surrogateescape")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "layer"
    d.mkdir()
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


def test_files_dirs_links_owners_modes_mtimes(dest: Path) -> None:
    written = unpack(
        dest,
        [
            E("./", tarfile.DIRTYPE, mode=0o755, mtime=MTIME - 5),
            E("./usr/", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0, mtime=MTIME - 1),
            E("./usr/bin/", tarfile.DIRTYPE, mode=0o755, mtime=MTIME - 2),
            E("./usr/bin/su", data=b"#!su\n", mode=0o4755, uid=0, gid=0),
            E("./usr/bin/tool", data=b"x" * 5000, mode=0o2711, uid=1000, gid=1001),
            E("./usr/bin/tool-link", tarfile.LNKTYPE, link="./usr/bin/tool"),
            E("usr/bin/sh", tarfile.SYMTYPE, link="/bin/busybox", uid=7, gid=8),
            E("tmp", tarfile.DIRTYPE, mode=0o1777, mtime=MTIME - 3),
            E("tmp/fifo", tarfile.FIFOTYPE, mode=0o640, uid=5, gid=6),
            E("dev/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
            E("dev/sda", tarfile.BLKTYPE, mode=0o660, dev=(8, 0)),
            E("opt/app/run", data=b"r", uid=9),
        ],
    )
    assert written == 5 + 5000 + 1

    su = os.stat(dest / "usr/bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755 and (su.st_uid, su.st_gid) == (0, 0)
    tool = os.stat(dest / "usr/bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o2711
    assert (tool.st_uid, tool.st_gid) == (1000, 1001)
    assert tool.st_mtime == MTIME
    assert (dest / "usr/bin/tool").read_bytes() == b"x" * 5000
    link = os.stat(dest / "usr/bin/tool-link")
    assert link.st_ino == tool.st_ino and tool.st_nlink == 2

    sh = os.lstat(dest / "usr/bin/sh")
    assert stat.S_ISLNK(sh.st_mode) and os.readlink(dest / "usr/bin/sh") == "/bin/busybox"
    assert (sh.st_uid, sh.st_gid) == (7, 8) and sh.st_mtime == MTIME

    tmp = os.stat(dest / "tmp")
    assert stat.S_IMODE(tmp.st_mode) == 0o1777
    fifo = os.lstat(dest / "tmp/fifo")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
    assert (fifo.st_uid, fifo.st_gid) == (5, 6)

    # Real device nodes are not made.
    assert not (dest / "dev").exists()
    # Parents without a member of their own are made 0755 root.
    implicit = os.stat(dest / "opt/app")
    assert stat.S_IMODE(implicit.st_mode) == 0o755 and implicit.st_uid == 0
    assert (dest / "opt/app/run").read_bytes() == b"r"

    # Directory mtimes survive the files written into them afterwards.
    assert os.stat(dest / "usr").st_mtime == MTIME - 1
    assert os.stat(dest / "usr/bin").st_mtime == MTIME - 2
    assert tmp.st_mtime == MTIME - 3
    assert os.stat(dest).st_mtime == MTIME - 5


def test_xattrs_kept_and_dropped(dest: Path) -> None:
    pax = {
        "SCHILY.xattr.user.note": "hello",
        "SCHILY.xattr.security.capability": xattr(CAP_NET_BIND),
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.security.selinux": "system_u:object_r:bin_t:s0",
    }
    unpack(
        dest,
        [
            E("bin/ping", data=b"ELF", mode=0o755, uid=0, pax=pax),
            E("data", tarfile.DIRTYPE, mode=0o755, pax=pax),
        ],
    )
    for path in (dest / "bin/ping", dest / "data"):
        names = set(os.listxattr(path))
        assert "user.note" in names
        assert os.getxattr(path, "user.note") == b"hello"
        assert not any(n.startswith("trusted.") for n in names)
        assert "security.selinux" not in names or os.getxattr(path, "security.selinux") != (
            b"system_u:object_r:bin_t:s0"
        )
    assert os.getxattr(dest / "bin/ping", "security.capability") == CAP_NET_BIND


def test_whiteouts_and_opaque_dirs_become_overlay_format(dest: Path) -> None:
    unpack(
        dest,
        [
            E("etc", tarfile.DIRTYPE, mode=0o755),
            E("etc/.wh.motd", uid=0),
            E("var/lib/apt", tarfile.DIRTYPE, mode=0o755),
            E("var/lib/apt/.wh..wh..opq"),
            E("var/lib/apt/lists", data=b"new"),
            E(".wh..wh.plnk", tarfile.DIRTYPE),
            E(".wh..wh.aufs"),
            E(".wh.gone-dir"),
        ],
    )
    for gone in (dest / "etc/motd", dest / "gone-dir"):
        st = os.lstat(gone)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert not (dest / "etc/.wh.motd").exists()
    assert os.getxattr(dest / "var/lib/apt", "trusted.overlay.opaque") == b"y"
    assert (dest / "var/lib/apt/lists").read_bytes() == b"new"
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "etc")
    assert sorted(os.listdir(dest)) == ["etc", "gone-dir", "var"]


def test_aufs_hardlink_dir_is_used_then_dropped(dest: Path) -> None:
    written = unpack(
        dest,
        [
            E(".wh..wh.plnk", tarfile.DIRTYPE, mode=0o700),
            E(".wh..wh.plnk/1234.5678", data=b"linked", mode=0o755, uid=4),
            E(".wh..wh.plnk/fifo", tarfile.FIFOTYPE),
            E("bin/tool", tarfile.LNKTYPE, link=".wh..wh.plnk/1234.5678"),
        ],
    )
    assert written == 6
    assert sorted(os.listdir(dest)) == ["bin"]
    tool = os.stat(dest / "bin/tool")
    assert (dest / "bin/tool").read_bytes() == b"linked"
    assert (tool.st_uid, stat.S_IMODE(tool.st_mode), tool.st_nlink) == (4, 0o755, 1)


def test_later_members_replace_earlier_ones(dest: Path, outside: Path) -> None:
    unpack(
        dest,
        [
            E("f", data=b"first"),
            E("f", data=b"second", mode=0o600),
            E("d", tarfile.DIRTYPE, mode=0o700),
            E("d/kept", data=b"k"),
            E("d", tarfile.DIRTYPE, mode=0o750, uid=3),  # a dir over a dir merges
            E("was-file", data=b"x"),
            E("was-file", tarfile.DIRTYPE),
            E("was-dir", tarfile.DIRTYPE),
            E("was-dir/child", data=b"c"),
            E("was-dir", data=b"now a file"),
            E("was-link", tarfile.SYMTYPE, link=str(outside / "victim")),
            E("was-link", data=b"inside"),  # replaces the link, not its target
            E("gone", data=b"y"),
            E(".wh.gone"),
        ],
    )
    assert (dest / "f").read_bytes() == b"second"
    assert stat.S_IMODE(os.stat(dest / "f").st_mode) == 0o600
    assert (dest / "d/kept").read_bytes() == b"k"
    d = os.stat(dest / "d")
    assert stat.S_IMODE(d.st_mode) == 0o750 and d.st_uid == 3
    assert (dest / "was-file").is_dir()
    assert (dest / "was-dir").read_bytes() == b"now a file"
    assert not os.path.islink(dest / "was-link")
    assert (dest / "was-link").read_bytes() == b"inside"
    assert stat.S_ISCHR(os.lstat(dest / "gone").st_mode)
    assert os.listdir(outside) == []


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../escape", "a/../../escape", "a/b/../../../escape", "..", ""],
)
def test_escaping_names_refused(dest: Path, tmp_path: Path, name: str) -> None:
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(InvalidRequestError) as err:
        unpack(dest, [E("ok", data=b"1"), E(name, data=b"evil")])
    assert "layer member" in err.value.message
    assert sorted(os.listdir(tmp_path)) == before
    assert os.listdir(dest) == ["ok"]


def test_nul_in_name_refused(dest: Path) -> None:
    with pytest.raises(InvalidRequestError, match="NUL"):
        unpack(dest, [E("x", data=b"1", pax={"path": "a\0b"})])


@pytest.mark.parametrize("absolute", [True, False])
def test_writing_through_a_symlink_refused(dest: Path, outside: Path, absolute: bool) -> None:
    target = str(outside) if absolute else "../outside"
    with pytest.raises(InvalidRequestError, match="symlink") as err:
        unpack(dest, [E("a", tarfile.SYMTYPE, link=target), E("a/passwd", data=b"evil")])
    assert "'a/passwd'" in err.value.message
    assert os.listdir(outside) == []


@pytest.mark.parametrize(
    "evil",
    [
        E("a/sub/file", data=b"evil"),  # a deeper path through the link
        E("a/.wh.victim"),  # a whiteout through the link
        E("a/.wh..wh..opq"),  # an opaque marker on the link's target
        E("a/dir", tarfile.DIRTYPE),
        E("a/link", tarfile.SYMTYPE, link="/etc"),
        E("a/fifo", tarfile.FIFOTYPE),
    ],
    ids=lambda e: e.name,
)
def test_nothing_through_a_planted_symlink(dest: Path, outside: Path, evil: E) -> None:
    (outside / "victim").write_text("keep")
    with pytest.raises(InvalidRequestError, match="symlink"):
        unpack(dest, [E("a", tarfile.SYMTYPE, link=str(outside)), evil])
    assert sorted(os.listdir(outside)) == ["victim"]
    assert "trusted.overlay.opaque" not in os.listxattr(outside)


@pytest.mark.parametrize(
    ("link", "why"),
    [
        ("/etc/passwd", "absolute"),
        ("../outside/victim", r"'\.\.'"),
        ("a/victim", "not a regular file written earlier"),  # through the symlink "a"
        ("later", "not a regular file written earlier"),
        ("dir", "not a regular file written earlier"),
        ("sym", "not a regular file written earlier"),
    ],
)
def test_hardlinks_only_to_earlier_regular_members(
    dest: Path, outside: Path, link: str, why: str
) -> None:
    victim = outside / "victim"
    victim.write_text("keep")
    with pytest.raises(InvalidRequestError, match=why):
        unpack(
            dest,
            [
                E("a", tarfile.SYMTYPE, link=str(outside)),
                E("dir", tarfile.DIRTYPE),
                E("sym", tarfile.SYMTYPE, link="dir"),
                E("evil", tarfile.LNKTYPE, link=link),
                E("later", data=b"x"),
            ],
        )
    assert os.stat(victim).st_nlink == 1
    assert not (dest / "evil").exists()


def test_hardlink_target_removed_by_a_later_member_is_refused(dest: Path) -> None:
    with pytest.raises(InvalidRequestError, match="hard link target"):
        unpack(
            dest,
            [
                E("d/file", data=b"x"),
                E("d", data=b"replaced the dir"),
                E("evil", tarfile.LNKTYPE, link="d/file"),
            ],
        )


def test_drains_the_stream_after_the_archive(dest: Path) -> None:
    data = make_tar([E("f", data=b"abc")]) + b"\0" * 20000 + b"trailing"
    stream = io.BytesIO(data)
    assert unpack_layer(stream, dest) == 3
    assert stream.tell() == len(data)


def test_empty_and_malformed_layers(dest: Path) -> None:
    assert unpack_layer(io.BytesIO(b""), dest) == 0
    assert unpack_layer(io.BytesIO(b"\0" * 1024), dest) == 0
    assert os.listdir(dest) == []
    with pytest.raises(InvalidRequestError, match="not a valid tar"):
        unpack_layer(io.BytesIO(b"this is not a tar archive" * 100), dest)
    truncated = make_tar([E("big", data=b"y" * 100_000)])[:30_000]
    with pytest.raises(InvalidRequestError, match="not a valid tar"):
        unpack_layer(io.BytesIO(truncated), dest)


def test_bad_owner_refused(dest: Path) -> None:
    with pytest.raises(InvalidRequestError, match="owner"):
        unpack(dest, [E("f", data=b"x", pax={"uid": str(2**32 - 1)})])
