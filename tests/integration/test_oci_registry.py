"""RegistrySource imports images from a real registry: gzip/zstd, platforms, token auth, errors."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UpstreamError,
)
from corral.templates.oci import Progress, RegistrySource, ResolvedImage, is_loopback
from tests.conftest import LeakWatch
from tests.integration.registry_harness import (
    Image,
    RecordingLayerStore,
    Registry,
    build_image,
    layer_tar,
    registry_skip_reason,
    running_registry,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(registry_skip_reason() is not None, reason=registry_skip_reason() or ""),
    pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers needs root (chown, mknod)"),
]

USER, PASSWORD = "alice", "correct horse"

BASE = layer_tar(
    {
        "etc": None,
        "etc/os-release": "NAME=test\n",
        "etc/motd": "hello\n",
        "bin": None,
        "bin/sh": "->busybox",
        "var/cache/apt": None,
        "var/cache/apt/pkgcache.bin": b"\0" * 4096,
    }
)
TOP = layer_tar(
    {
        "etc/.wh.motd": b"",
        "var/cache/apt/.wh..wh..opq": b"",
        "app": None,
        "app/main.py": "print('hi')\n",
    }
)
CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "APP=1"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["python3 -m http.server"],
    "WorkingDir": "/app",
    "User": "1000:1000",
    "Healthcheck": {"Test": ["CMD-SHELL", "curl -sf localhost:8000"]},
    "Labels": {"org.example": "yes"},
}


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with running_registry() as r:
        yield r


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[Registry]:
    with running_registry(auth=(USER, PASSWORD)) as r:
        yield r


@pytest.fixture
def sink(tmp_path: Path) -> RecordingLayerStore:
    root = tmp_path / "layers"
    root.mkdir()
    return RecordingLayerStore(root)


def source(registry: Registry, ref: str, **kwargs: Any) -> RegistrySource:
    return RegistrySource(ref, insecure_registries=[registry.host], timeout=10, **kwargs)


def pull(
    registry: Registry, ref: str, sink: RecordingLayerStore, **kwargs: object
) -> ResolvedImage:
    with source(registry, ref, **kwargs) as src:
        image = src.resolve()
        src.fetch(image, sink)
    return image


def check_app_image(image: ResolvedImage, built: Image, sink: RecordingLayerStore) -> None:
    assert image.diff_ids == built.diff_ids
    assert image.total_bytes == sum(len(b.data) for b in built.layers)
    base, top = (sink.path(d) for d in image.diff_ids)
    assert (base / "etc/os-release").read_text() == "NAME=test\n"
    assert os.readlink(base / "bin/sh") == "busybox"
    motd = os.lstat(top / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == 0
    assert os.getxattr(top / "var/cache/apt", "trusted.overlay.opaque") == b"y"
    assert (top / "app/main.py").read_text() == "print('hi')\n"


@pytest.mark.parametrize("compression", ["gzip", "zstd", ["gzip", "zstd"], "none"])
def test_resolve_and_fetch(registry: Registry, sink: RecordingLayerStore, compression: str) -> None:
    built = build_image([BASE, TOP], compression, config=CONFIG)
    ref = registry.push("team/app", f"c{abs(hash(str(compression)))}", built)
    progress: list[Progress] = []
    with source(registry, ref) as src:
        image = src.resolve()
        assert image.reference == ref
        assert image.digest == built.manifest.digest
        src.fetch(image, sink, progress.append)
    check_app_image(image, built, sink)
    config = image.config
    assert config.env == ("PATH=/usr/bin:/bin", "APP=1")
    assert config.entrypoint == ("/bin/sh", "-c")
    assert config.cmd == ("python3 -m http.server",)
    assert (config.workdir, config.user) == ("/app", "1000:1000")
    assert config.healthcheck == ("CMD-SHELL", "curl -sf localhost:8000")
    assert dict(config.labels) == {"org.example": "yes"}
    # Progress ends at each layer's compressed size.
    last = {p.layer: p for p in progress}
    assert {d: (p.bytes, p.total) for d, p in last.items()} == {
        d: (len(b.data),) * 2 for d, b in zip(built.diff_ids, built.layers, strict=True)
    }


def test_pull_by_digest_and_docker_media_types(
    registry: Registry, sink: RecordingLayerStore
) -> None:
    built = build_image([BASE, TOP], "gzip", config=CONFIG, docker=True)
    registry.push("team/docker", "v2", built)
    image = pull(registry, f"{registry.host}/team/docker@{built.manifest.digest}", sink)
    assert image.digest == built.manifest.digest
    check_app_image(image, built, sink)


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-manifest-list"])
def test_manifest_list_picks_linux_amd64(
    registry: Registry, sink: RecordingLayerStore, docker: bool
) -> None:
    arm = build_image([layer_tar({"arch": "arm64"})], platform="linux/arm64/v8")
    amd = build_image([BASE, TOP], "zstd", config=CONFIG, platform="linux/amd64")
    ref = registry.push_index("team/multi", f"d{int(docker)}", [arm, amd], docker=docker)
    image = pull(registry, ref, sink)
    assert image.digest == amd.manifest.digest
    check_app_image(image, amd, sink)
    assert len(sink.added) == 2


def test_arm64_only_is_a_clear_error(registry: Registry, sink: RecordingLayerStore) -> None:
    arm = build_image([layer_tar({"arch": "arm64"})], platform="linux/arm64")
    armv7 = build_image([layer_tar({"arch": "arm"})], platform="linux/arm/v7")
    ref = registry.push_index("team/arm", "1", [arm, armv7])
    with source(registry, ref) as src, pytest.raises(InvalidRequestError) as err:
        src.resolve()
    assert "no linux/amd64 image" in err.value.message
    assert "linux/arm64" in err.value.message and "linux/arm/v7" in err.value.message

    single = registry.push("team/arm", "single", arm)
    with source(registry, single) as src, pytest.raises(InvalidRequestError, match="arm64"):
        src.resolve()
    assert list(sink.root.iterdir()) == []


def blob_gets_since(registry: Registry, before: int, *, expect: str | None) -> list[str]:
    """Blob GETs the registry logged after the first ``before``; its access log is written
    just after each response, so wait for ``expect`` (or a quiet moment) to appear."""
    deadline = time.monotonic() + (5 if expect else 0.5)
    while True:
        found = registry.blob_requests()[before:]
        if (expect and any(expect in path for path in found)) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_layers_in_the_sink_are_not_downloaded_again(
    registry: Registry, sink: RecordingLayerStore
) -> None:
    shared = layer_tar({"shared": "base layer of both"})
    first = build_image([shared, layer_tar({"one": "1"})], "gzip")
    second = build_image([shared, layer_tar({"two": "2"})], "gzip")
    pull(registry, registry.push("team/reuse", "1", first), sink)
    blob_gets_since(registry, 0, expect=first.layers[1].digest)
    before = len(registry.blob_requests())
    image = pull(registry, registry.push("team/reuse", "2", second), sink)
    fetched = blob_gets_since(registry, before, expect=second.layers[1].digest)
    assert sink.added == [*first.diff_ids, second.diff_ids[1]]
    assert any(second.layers[1].digest in path for path in fetched)
    assert not any(second.layers[0].digest in path for path in fetched)
    # A second fetch of the same image downloads nothing at all.
    before = len(registry.blob_requests())
    with source(registry, image.reference) as src:
        src.fetch(image, sink)
    assert blob_gets_since(registry, before, expect=None) == []


def test_bearer_auth_with_good_credentials(
    auth_registry: Registry, sink: RecordingLayerStore
) -> None:
    built = build_image([BASE, TOP], "gzip", config=CONFIG)
    ref = auth_registry.push("private/app", "1", built)
    assert auth_registry.token_server is not None
    asked = len(auth_registry.token_server.requests)
    image = pull(auth_registry, ref, sink, username=USER, password=PASSWORD)
    check_app_image(image, built, sink)
    # The pull went through the token server, asking for pull access only.
    requests = auth_registry.token_server.requests[asked:]
    assert requests and all("pull" in r and "push" not in r for r in requests)


@pytest.mark.parametrize(
    ("username", "password"), [(USER, "wrong"), ("mallory", PASSWORD), (None, None)]
)
def test_bearer_auth_refuses_bad_credentials(
    auth_registry: Registry, sink: RecordingLayerStore, username: str | None, password: str | None
) -> None:
    ref = auth_registry.push("private/app", "2", build_image([BASE], "gzip"))
    with (
        source(auth_registry, ref, username=username, password=password) as src,
        pytest.raises(PermissionDeniedError) as err,
    ):
        src.resolve()
    assert f"registry {auth_registry.host} refused credentials" in err.value.message
    assert "private/app" in err.value.message


def test_unreachable_registry_is_an_upstream_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        host = f"127.0.0.1:{port}"
        with (
            RegistrySource(f"{host}/x/y:1", insecure_registries=[host], timeout=5) as src,
            pytest.raises(UpstreamError, match=f"registry {host}"),
        ):
            src.resolve()


def test_a_loopback_registry_speaks_plain_http_without_being_listed(registry: Registry) -> None:
    """As Docker allows for 127.0.0.0/8 and localhost; any other host needs the listing."""
    registry.push("team/plain", "1", build_image([BASE], "gzip"))
    with RegistrySource(f"{registry.host}/team/plain:1", timeout=5) as src:
        assert src.resolve().diff_ids
    assert is_loopback("localhost:5000") and is_loopback("[::1]:5000")
    assert not is_loopback("registry.example.com:5000") and not is_loopback("10.0.0.1:5000")


def test_unknown_tag_or_repository_is_not_found(registry: Registry) -> None:
    registry.push("team/known", "1", build_image([BASE], "gzip"))
    for ref in (f"{registry.host}/team/known:nope", f"{registry.host}/team/unknown:1"):
        with source(registry, ref) as src, pytest.raises(NotFoundError, match="not found"):
            src.resolve()


def test_registry_harness_leaves_nothing_behind(tmp_path: Path, no_leaks: LeakWatch) -> None:
    with running_registry(tmp_path, auth=(USER, PASSWORD)) as r:
        r.push("x/y", "1", build_image([BASE], "gzip"))
        proc, directory = r.process, r.directory
        assert proc is not None and directory.is_dir()
    assert proc.poll() is not None
    assert not directory.exists()
    out = subprocess.run(["pgrep", "-f", str(directory)], capture_output=True, check=False)
    assert out.stdout == b""
