"""Directory transfer: the streamed upload tar is valid, and hostile download archives stay contained."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from corral.errors import CorralError
from corral.sdk._tar import ChunkReader, extract_tar, iter_tar


def _tree(root: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    (root / "sub" / "deep" / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "link").symlink_to("sub/b.bin")
    os.chmod(root / "a.txt", 0o640)


def _snapshot(root: Path) -> dict[str, tuple[str, bytes | str]]:
    out: dict[str, tuple[str, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", "")
        else:
            out[rel] = ("file", p.read_bytes())
    return out


def test_upload_stream_roundtrips_through_the_safe_extractor(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _tree(src)
    chunks = list(iter_tar(src, chunk_size=4096))
    assert sum(map(len, chunks)) % tarfile.RECORDSIZE == 0
    assert max(map(len, chunks)) <= tarfile.RECORDSIZE  # nothing is held whole
    written = extract_tar(ChunkReader(iter(chunks)), dst)
    assert written == 7
    assert _snapshot(dst) == _snapshot(src)
    assert (dst / "a.txt").stat().st_mode & 0o777 == 0o640


def test_upload_stream_is_readable_by_tarfile(tmp_path: Path) -> None:
    _tree(tmp_path)
    data = b"".join(iter_tar(tmp_path))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["link"].issym() and names["link"].linkname == "sub/b.bin"
    assert names["sub/b.bin"].size == 70_000
    assert all(not n.startswith("/") for n in names)


def _archive(*members: tuple[tarfile.TarInfo, bytes | None], gz: bool = False) -> ChunkReader:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return ChunkReader(raw[i : i + 1000] for i in range(0, len(raw), 1000))


def _file(name: str, mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize("name", ["../escape", "/etc/escape", "a/../../escape", "ok/../../x"])
def test_names_leaving_the_destination_are_refused(tmp_path: Path, name: str) -> None:
    dst = tmp_path / "dst"
    with pytest.raises(CorralError):
        extract_tar(_archive((_file(name), b"pwned")), dst)
    assert not (tmp_path / "escape").exists()
    assert not list(tmp_path.rglob("escape")) and not list(tmp_path.rglob("x"))


def test_nothing_is_written_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "evil").symlink_to(outside)
    with pytest.raises(CorralError, match="not a directory"):
        extract_tar(_archive((_file("evil/passwd"), b"pwned")), dst)
    assert list(outside.iterdir()) == []


def test_a_file_member_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "f").symlink_to(target)
    extract_tar(_archive((_file("f"), b"new")), dst)
    assert target.read_text() == "keep"
    assert not (dst / "f").is_symlink() and (dst / "f").read_bytes() == b"new"


def test_links_pointing_outside_are_skipped_with_a_warning(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    archive = _archive(
        (_link("abs", "/etc/passwd"), None),
        (_link("up", "../../etc"), None),
        (_link("inside", "sub/x"), None),
        (_link("hard", "/etc/passwd", tarfile.LNKTYPE), None),
    )
    with pytest.warns(UserWarning) as caught:
        written = extract_tar(archive, dst)
    assert written == 1
    assert sorted(p.name for p in dst.iterdir()) == ["inside"]
    assert os.readlink(dst / "inside") == "sub/x"
    assert len(caught) == 3


def test_hard_links_to_earlier_members_work(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    extract_tar(_archive((_file("a"), b"data"), (_link("b", "a", tarfile.LNKTYPE), None)), dst)
    assert (dst / "b").read_bytes() == b"data"
    assert os.stat(dst / "a").st_ino == os.stat(dst / "b").st_ino


def test_special_bits_and_devices_are_dropped(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    dev = tarfile.TarInfo("null")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    with pytest.warns(UserWarning, match="special file"):
        extract_tar(_archive((_file("suid", 0o4777), b"#!"), (dev, None), gz=True), dst)
    assert (dst / "suid").stat().st_mode & 0o7777 == 0o755
    assert not (dst / "null").exists()


def test_a_broken_stream_is_a_corral_error(tmp_path: Path) -> None:
    with pytest.raises(CorralError):
        extract_tar(ChunkReader([b"garbage" * 100]), tmp_path / "dst")
