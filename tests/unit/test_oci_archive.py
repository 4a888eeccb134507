"""ArchiveSource imports docker-save and OCI-layout tarballs and refuses bad or evil ones."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from corral.errors import InvalidRequestError
from corral.templates.oci import ArchiveSource, Progress, ResolvedImage
from tests.integration.registry_harness import (
    Blob,
    Image,
    RecordingLayerStore,
    build_image,
    build_index,
    docker_save_members,
    layer_tar,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root")

BASE = layer_tar({"etc": None, "etc/hostname": "box\n", "etc/motd": "hi\n", "bin/sh": "->busybox"})
TOP = layer_tar({"etc/.wh.motd": b"", "app": None, "app/.wh..wh..opq": b"", "app/run": "go\n"})
CONFIG = {"Env": ["A=1"], "Cmd": ["/app/run"], "WorkingDir": "/app", "User": "app"}


@pytest.fixture
def sink(tmp_path: Path) -> RecordingLayerStore:
    root = tmp_path / "layers"
    root.mkdir()
    return RecordingLayerStore(root)


Member = bytes | tuple[str, str]  # file content, or ("symlink" | "hardlink", target)


def write_tar(path: Path, members: Mapping[str, Member], *, compress: bool = False) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type = tarfile.SYMTYPE if content[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def oci_layout_members(
    index_entries: list[dict[str, object]], blobs: Iterable[Blob]
) -> dict[str, Member]:
    members: dict[str, Member] = {
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "index.json": json.dumps({"schemaVersion": 2, "manifests": index_entries}).encode(),
    }
    for blob in blobs:
        members[f"blobs/sha256/{blob.digest.partition(':')[2]}"] = blob.data
    return members


def named(image: Image, name: str = "example.org/team/app:1") -> dict[str, object]:
    return image.manifest.descriptor(annotations={"io.containerd.image.name": name})


def import_archive(path: Path, sink: RecordingLayerStore, **kwargs: Any) -> ResolvedImage:
    with ArchiveSource(path, **kwargs) as src:
        image = src.resolve()
        src.fetch(image, sink)
    return image


def check_layers(image: ResolvedImage, built: Image, sink: RecordingLayerStore) -> None:
    assert image.diff_ids == built.diff_ids
    base, top = (sink.path(d) for d in image.diff_ids)
    assert (base / "etc/hostname").read_text() == "box\n"
    assert os.readlink(base / "bin/sh") == "busybox"
    assert stat.S_ISCHR(os.lstat(top / "etc/motd").st_mode)
    assert os.getxattr(top / "app", "trusted.overlay.opaque") == b"y"
    assert (top / "app/run").read_text() == "go\n"


# --------------------------------------------------------------------------- docker save


@pytest.mark.parametrize(
    ("layers", "whole"),
    [("none", False), ("gzip", False), ("none", True)],
    ids=["plain", "gzip-layers", "gzip-tarball"],
)
def test_docker_save(tmp_path: Path, sink: RecordingLayerStore, layers: str, whole: bool) -> None:
    built = build_image([BASE, TOP], layers, config=CONFIG, docker=True)
    path = write_tar(tmp_path / "img.tar", docker_save_members(built), compress=whole)
    progress: list[Progress] = []
    with ArchiveSource(path) as src:
        image = src.resolve()
        src.fetch(image, sink, progress.append)
    assert image.reference == "app:1"
    assert image.digest == built.config.digest  # the image id
    assert image.config.env == ("A=1",) and image.config.cmd == ("/app/run",)
    assert (image.config.workdir, image.config.user) == ("/app", "app")
    assert image.total_bytes == sum(len(b.data) for b in built.layers)
    check_layers(image, built, sink)
    assert progress[-1].bytes == progress[-1].total == len(built.layers[-1].data)


def test_docker_save_shared_layer_symlink(tmp_path: Path, sink: RecordingLayerStore) -> None:
    # docker save stores a layer once and symlinks its other occurrences ("../<id>/layer.tar").
    built = build_image([BASE, TOP, BASE], "none", docker=True)
    members = docker_save_members(built)
    manifest = json.loads(members["manifest.json"])  # type: ignore[arg-type]
    first, *_, last = manifest[0]["Layers"]
    last = "ffffffffffffffff/layer.tar"
    manifest[0]["Layers"][-1] = last
    members[last] = ("symlink", f"../{first}")
    members["manifest.json"] = json.dumps(manifest).encode()
    image = import_archive(write_tar(tmp_path / "img.tar", members), sink)
    assert image.diff_ids == built.diff_ids
    assert sink.added == list(built.diff_ids[:2])  # the repeated layer is stored once


def test_docker_save_diff_id_mismatch_stores_nothing(
    tmp_path: Path, sink: RecordingLayerStore
) -> None:
    built = build_image([BASE, TOP], "gzip", docker=True)
    members = docker_save_members(built)
    layer_name = json.loads(members["manifest.json"])[0]["Layers"][1]  # type: ignore[arg-type]
    members[layer_name] = gzip.compress(layer_tar({"app/run": "tampered"}))
    with pytest.raises(InvalidRequestError, match="diff_id"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)
    assert sink.added == [built.diff_ids[0]]
    assert sorted(p.name for p in sink.root.iterdir()) == [built.diff_ids[0].partition(":")[2]]


def test_docker_save_of_another_platform(tmp_path: Path, sink: RecordingLayerStore) -> None:
    built = build_image([BASE], "none", platform="linux/arm64", docker=True)
    path = write_tar(tmp_path / "img.tar", docker_save_members(built))
    with pytest.raises(InvalidRequestError, match="linux/arm64"):
        import_archive(path, sink)


def test_docker_save_of_several_images_refused(tmp_path: Path, sink: RecordingLayerStore) -> None:
    built = build_image([BASE], "none", docker=True)
    members = docker_save_members(built)
    entry = json.loads(members["manifest.json"])[0]  # type: ignore[arg-type]
    members["manifest.json"] = json.dumps([entry, entry]).encode()
    with pytest.raises(InvalidRequestError, match="holds 2 images"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)


# --------------------------------------------------------------------------- OCI layout


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_oci_layout(tmp_path: Path, sink: RecordingLayerStore, compression: str) -> None:
    built = build_image([BASE, TOP], compression, config=CONFIG)
    members = oci_layout_members([named(built)], [built.manifest, *built.blobs])
    image = import_archive(write_tar(tmp_path / "img.tar", members), sink)
    assert image.reference == "example.org/team/app:1"
    assert image.digest == built.manifest.digest
    assert image.config.env == ("A=1",)
    assert [layer.digest for layer in image.layers] == [b.digest for b in built.layers]
    check_layers(image, built, sink)


@pytest.mark.parametrize("nested", [False, True], ids=["flat-index", "nested-index"])
def test_oci_layout_picks_linux_amd64(
    tmp_path: Path, sink: RecordingLayerStore, nested: bool
) -> None:
    arm = build_image([layer_tar({"arch": "arm64"})], "gzip", platform="linux/arm64/v8")
    amd = build_image([BASE, TOP], "zstd", config=CONFIG)
    blobs = [arm.manifest, *arm.blobs, amd.manifest, *amd.blobs]
    if nested:
        index = build_index([arm, amd])
        entries = [index.descriptor(annotations={"io.containerd.image.name": "x/multi:1"})]
        blobs.append(index)
    else:
        entries = [
            arm.manifest.descriptor(platform={"os": "linux", "architecture": "arm64"}),
            amd.manifest.descriptor(platform={"os": "linux", "architecture": "amd64"}),
        ]
    image = import_archive(
        write_tar(tmp_path / "img.tar", oci_layout_members(entries, blobs)), sink
    )
    assert image.digest == amd.manifest.digest
    check_layers(image, amd, sink)


def test_oci_layout_without_amd64_names_what_it_has(
    tmp_path: Path, sink: RecordingLayerStore
) -> None:
    arm = build_image([layer_tar({"arch": "arm64"})], "gzip", platform="linux/arm64")
    entries = [arm.manifest.descriptor(platform={"os": "linux", "architecture": "arm64"})]
    path = write_tar(tmp_path / "img.tar", oci_layout_members(entries, [arm.manifest, *arm.blobs]))
    with pytest.raises(InvalidRequestError, match=r"no linux/amd64 image.*linux/arm64"):
        import_archive(path, sink)


def test_oci_layout_platform_can_be_chosen(tmp_path: Path, sink: RecordingLayerStore) -> None:
    arm = build_image([BASE, TOP], "gzip", platform="linux/arm64")
    path = write_tar(
        tmp_path / "img.tar", oci_layout_members([named(arm)], [arm.manifest, *arm.blobs])
    )
    image = import_archive(path, sink, platform="linux/arm64")
    check_layers(image, arm, sink)


def test_oci_layout_blob_digest_mismatch(tmp_path: Path, sink: RecordingLayerStore) -> None:
    built = build_image([BASE, TOP], "gzip")
    members = oci_layout_members([named(built)], [built.manifest, *built.blobs])
    name = f"blobs/sha256/{built.layers[1].digest.partition(':')[2]}"
    good = members[name]
    assert isinstance(good, bytes)
    # Same size, other bytes: a valid gzip of another tar would be caught too; this is subtler.
    members[name] = good[:-5] + bytes(b ^ 0xFF for b in good[-5:])
    with pytest.raises(InvalidRequestError, match=r"digest|decompress"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)
    assert sink.added == [built.diff_ids[0]]


def test_oci_layout_valid_blob_under_a_wrong_name(
    tmp_path: Path, sink: RecordingLayerStore
) -> None:
    built = build_image([BASE, TOP], "gzip")
    evil = build_image([BASE, layer_tar({"app/run": "not what the manifest says"})], "gzip")
    members = oci_layout_members([named(built)], [built.manifest, *built.blobs])
    members[f"blobs/sha256/{built.layers[1].digest.partition(':')[2]}"] = evil.layers[1].data
    with pytest.raises(InvalidRequestError, match=r"does not match its digest|larger|bytes"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)
    assert built.diff_ids[1] not in sink.added


def test_oci_layout_tampered_manifest(tmp_path: Path, sink: RecordingLayerStore) -> None:
    built = build_image([BASE], "gzip")
    members = oci_layout_members([named(built)], [built.manifest, *built.blobs])
    name = f"blobs/sha256/{built.manifest.digest.partition(':')[2]}"
    members[name] = built.manifest.data.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')
    with pytest.raises(InvalidRequestError, match="does not match its digest"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)


@pytest.mark.parametrize(
    ("media_type", "match"),
    [
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "foreign"),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "foreign"),
        ("application/vnd.cncf.helm.chart.content.v1.tar+gzip", "not a filesystem layer"),
    ],
)
def test_non_filesystem_layers_refused(
    tmp_path: Path, sink: RecordingLayerStore, media_type: str, match: str
) -> None:
    built = build_image([BASE], "gzip")
    doc = json.loads(built.manifest.data)
    doc["layers"][0]["mediaType"] = media_type
    manifest = Blob(json.dumps(doc).encode(), built.manifest.media_type)
    members = oci_layout_members(
        [named(Image(manifest, built.config, built.layers, built.diff_ids))],
        [manifest, *built.blobs],
    )
    with pytest.raises(InvalidRequestError, match=match):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)


def test_schema1_manifest_refused(tmp_path: Path, sink: RecordingLayerStore) -> None:
    manifest = Blob(
        json.dumps({"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": []}).encode(),
        "application/vnd.oci.image.manifest.v1+json",
    )
    members = oci_layout_members([manifest.descriptor()], [manifest])
    with pytest.raises(InvalidRequestError, match="schema 1"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)


# --------------------------------------------------------------------------- evil tarballs


@pytest.mark.parametrize("evil", ["../escape", "/etc/passwd", "blobs/../../escape"])
def test_evil_member_names_refused(tmp_path: Path, sink: RecordingLayerStore, evil: str) -> None:
    built = build_image([BASE], "none", docker=True)
    members = docker_save_members(built)
    members[evil] = b"evil"
    with pytest.raises(InvalidRequestError) as err:
        import_archive(write_tar(tmp_path / "img.tar", members), sink)
    assert repr(evil) in err.value.message
    assert sink.added == []
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("layer_name", ["../../etc/passwd", "/etc/passwd"])
def test_manifest_pointing_outside_refused(
    tmp_path: Path, sink: RecordingLayerStore, layer_name: str
) -> None:
    built = build_image([BASE], "none", docker=True)
    members = docker_save_members(built)
    manifest = json.loads(members["manifest.json"])  # type: ignore[arg-type]
    manifest[0]["Layers"] = [layer_name]
    members["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(InvalidRequestError, match=r"absolute|'\.\.'"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../../etc/passwd", "../" * 2])
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_layer_links_leaving_the_archive_refused(
    tmp_path: Path, sink: RecordingLayerStore, target: str, kind: str
) -> None:
    built = build_image([BASE], "none", docker=True)
    members = docker_save_members(built)
    layer_name = json.loads(members["manifest.json"])[0]["Layers"][0]  # type: ignore[arg-type]
    members[layer_name] = (kind, target)
    with pytest.raises(InvalidRequestError, match=r"is not a file inside it|lacks"):
        import_archive(write_tar(tmp_path / "img.tar", members), sink)


def test_not_an_image_archive(tmp_path: Path, sink: RecordingLayerStore) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tarball" * 100)
    with pytest.raises(InvalidRequestError, match="not a \\(compressed\\) tar archive"):
        import_archive(junk, sink)
    other = write_tar(tmp_path / "other.tar", {"README": b"hello"})
    with pytest.raises(InvalidRequestError, match="neither a docker-save tarball"):
        import_archive(other, sink)
    missing = docker_save_members(build_image([BASE], "none", docker=True))
    del missing[next(k for k in missing if k.endswith("layer.tar"))]
    with pytest.raises(InvalidRequestError, match="lacks layer"):
        import_archive(write_tar(tmp_path / "missing.tar", missing), sink)
