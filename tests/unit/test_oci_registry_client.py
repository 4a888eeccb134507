"""Image references parse by Docker's rules; RegistrySource maps every registry failure to a clear
corral error and never keeps a layer whose bytes are not what the manifest says."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.errors import (
    CorralError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UpstreamError,
)
from corral.templates.oci import DOCKER_HUB, Progress, RegistrySource, parse_reference
from tests.integration.registry_harness import (
    Image,
    RecordingLayerStore,
    build_image,
    build_index,
    layer_tar,
)

HOST = "registry.test:5000"
DIGEST = "sha256:" + "a" * 64


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("ubuntu", (DOCKER_HUB, "library/ubuntu", "latest")),
        ("ubuntu:22.04", (DOCKER_HUB, "library/ubuntu", "22.04")),
        ("library/ubuntu", (DOCKER_HUB, "library/ubuntu", "latest")),
        ("docker.io/ubuntu", (DOCKER_HUB, "library/ubuntu", "latest")),
        ("index.docker.io/me/app:v1", (DOCKER_HUB, "me/app", "v1")),
        ("me/my-app_2:v1.0", (DOCKER_HUB, "me/my-app_2", "v1.0")),
        ("localhost/app", ("localhost", "app", "latest")),
        ("localhost:5000/a/b/c:tag", ("localhost:5000", "a/b/c", "tag")),
        ("127.0.0.1:5000/library/app:1", ("127.0.0.1:5000", "library/app", "1")),
        (f"ghcr.io/o/r@{DIGEST}", ("ghcr.io", "o/r", DIGEST)),
        (f"ghcr.io/o/r:tag@{DIGEST}", ("ghcr.io", "o/r", DIGEST)),  # the digest wins
        ("[::1]:5000/x:1", ("[::1]:5000", "x", "1")),
        ("Registry.Example/x", ("Registry.Example", "x", "latest")),
    ],
)
def test_parse_reference(ref: str, parsed: tuple[str, str, str]) -> None:
    assert parse_reference(ref) == parsed


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "Ubuntu",
        "ubuntu:",
        "ubuntu@sha256:123",
        "ubuntu@md5:" + "a" * 32,
        "a//b",
        "a b",
        " ubuntu",
        "host:5000/",
        "-bad",
        "ubuntu:-tag",
        "bad_-_name",
        "host:99999999/x",
        "a/" * 200 + "b",
    ],
)
def test_bad_references_refused(ref: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid image reference"):
        parse_reference(ref)


def test_reference_errors_surface_at_construction() -> None:
    with pytest.raises(InvalidRequestError):
        RegistrySource("NOT VALID")
    with pytest.raises(InvalidRequestError, match="platform"):
        RegistrySource("ubuntu", platform="amd64")


# --------------------------------------------------------------------------- a fake registry


Handler = Callable[[httpx.Request], httpx.Response | None]


class Chunks(httpx.SyncByteStream):
    """A response body that arrives in pieces, as over a network (httpx reads ``content=``
    eagerly, and a consumed body cannot be streamed raw)."""

    def __init__(self, data: bytes, size: int = 1 << 16) -> None:
        self.data, self.size = data, size

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), self.size):
            yield self.data[i : i + self.size]


def blob_response(data: bytes) -> httpx.Response:
    return httpx.Response(200, stream=Chunks(data), headers={"Content-Length": str(len(data))})


@dataclass
class Fake:
    """An in-memory registry behind ``httpx.MockTransport``."""

    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str = ""  # "", "basic" or "bearer"
    user: tuple[str, str] = ("alice", "pw")
    override: Handler | None = None  # answers first when it returns a response
    seen: list[httpx.Request] = field(default_factory=list)

    def add(self, image: Image, tag: str | None = None) -> None:
        self.manifests[image.manifest.digest] = (image.manifest.data, image.manifest.media_type)
        if tag:
            self.manifests[tag] = self.manifests[image.manifest.digest]
        for blob in image.blobs:
            self.blobs[blob.digest] = blob.data

    def _authorized(self, request: httpx.Request) -> bool:
        header = str(request.headers.get("Authorization", ""))
        if self.auth == "basic":
            good = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            return header == f"Basic {good}"
        if self.auth == "bearer":
            return header == "Bearer good-token"
        return True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.override is not None and (resp := self.override(request)) is not None:
            return resp
        path = request.url.path
        if path == "/token":
            good = base64.b64encode(f"{self.user[0]}:{self.user[1]}".encode()).decode()
            if request.headers.get("Authorization") not in (None, f"Basic {good}"):
                return httpx.Response(401)
            anonymous = "Authorization" not in request.headers
            return httpx.Response(200, json={"token": "anon" if anonymous else "good-token"})
        if not self._authorized(request):
            challenge = (
                'Basic realm="fake"'
                if self.auth == "basic"
                else f'Bearer realm="https://{HOST}/token",service="fake",'
                'scope="repository:team/app:pull"'
            )
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        _, _, repo_and_rest = path.partition("/v2/")
        if "/manifests/" in repo_and_rest:
            ref = repo_and_rest.rpartition("/manifests/")[2]
            if ref not in self.manifests:
                return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
            data, media_type = self.manifests[ref]
            return httpx.Response(200, content=data, headers={"Content-Type": media_type})
        if "/blobs/" in repo_and_rest:
            digest = repo_and_rest.rpartition("/blobs/")[2]
            if digest not in self.blobs:
                return httpx.Response(404)
            return blob_response(self.blobs[digest])
        return httpx.Response(404)


@pytest.fixture
def sink(tmp_path: Path) -> RecordingLayerStore:
    if os.geteuid() != 0:
        pytest.skip("unpacking layers needs root")
    return RecordingLayerStore(tmp_path)


def src(fake: Fake, ref: str = f"{HOST}/team/app:1", **kwargs: Any) -> RegistrySource:
    return RegistrySource(ref, transport=httpx.MockTransport(fake), **kwargs)


APP = build_image(
    [layer_tar({"etc/hostname": "box\n"}), layer_tar({"app/run": "go\n"})],
    ["gzip", "zstd"],
    config={"Env": ["A=1"], "Healthcheck": {"Test": ["NONE"]}},
)


def test_https_by_default_http_only_for_insecure_registries() -> None:
    fake = Fake()
    fake.add(APP, "1")
    with src(fake) as s:
        s.resolve()
    assert {r.url.scheme for r in fake.seen} == {"https"}
    fake.seen.clear()
    with src(fake, insecure_registries=[HOST]) as s:
        image = s.resolve()
    assert {r.url.scheme for r in fake.seen} == {"http"}
    assert image.config.env == ("A=1",)
    assert image.config.healthcheck is None  # NONE disables it


def test_bearer_flow_and_progress(sink: RecordingLayerStore) -> None:
    big = build_image([layer_tar({"big": os.urandom(3 << 20)})], "gzip")
    fake = Fake(auth="bearer")
    fake.add(big, "1")
    progress: list[Progress] = []
    with src(fake, username="alice", password="pw") as s:
        image = s.resolve()
        s.fetch(image, sink, progress.append)
    assert sink.added == list(big.diff_ids)
    token_requests = [r for r in fake.seen if r.url.path == "/token"]
    assert len(token_requests) == 1
    assert token_requests[0].url.params["scope"] == "repository:team/app:pull"
    assert token_requests[0].url.params["service"] == "fake"
    sizes = [p.bytes for p in progress]
    assert len(progress) >= 3 and sizes == sorted(sizes)
    assert (progress[-1].bytes, progress[-1].total) == (len(big.layers[0].data),) * 2


@pytest.mark.parametrize("auth", ["bearer", "basic"])
def test_bad_or_missing_credentials(auth: str) -> None:
    fake = Fake(auth=auth)
    fake.add(APP, "1")
    for username, password in (("alice", "wrong"), (None, None)):
        with (
            src(fake, username=username, password=password) as s,
            pytest.raises(PermissionDeniedError, match=f"registry {HOST} refused credentials"),
        ):
            s.resolve()
    with src(fake, username="alice", password="pw") as s:
        assert s.resolve().digest == APP.manifest.digest


def test_blob_redirects_are_followed_without_our_token(sink: RecordingLayerStore) -> None:
    fake = Fake(auth="bearer")
    fake.add(APP, "1")

    def storage(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "storage.test":
            assert "Authorization" not in request.headers
            return blob_response(fake.blobs[request.url.path.strip("/")])
        if "/blobs/" in request.url.path and request.headers.get("Authorization"):
            digest = request.url.path.rpartition("/")[2]
            return httpx.Response(307, headers={"Location": f"https://storage.test/{digest}"})
        return None

    fake.override = storage
    with src(fake, username="alice", password="pw") as s:
        s.fetch(s.resolve(), sink)
    assert sink.added == list(APP.diff_ids)


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (404, NotFoundError, f"image {HOST}/team/app:1 not found"),
        (500, UpstreamError, "HTTP 500"),
        (503, UpstreamError, "HTTP 503"),
        (429, UpstreamError, "HTTP 429"),
        (403, PermissionDeniedError, "refused credentials"),
        (400, InvalidRequestError, "NAME_INVALID"),
    ],
)
def test_manifest_failures(status: int, error: type[CorralError], match: str) -> None:
    fake = Fake(
        override=lambda r: httpx.Response(
            status, json={"errors": [{"code": "NAME_INVALID", "message": "bad"}]}
        )
    )
    with src(fake) as s, pytest.raises(error, match=match):
        s.resolve()


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("connection refused"), httpx.ConnectTimeout("timed out")],
)
def test_network_failures_are_upstream_errors(exc: Exception) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    with src(Fake(override=fail)) as s, pytest.raises(UpstreamError, match=f"registry {HOST}"):
        s.resolve()


def test_token_server_unreachable() -> None:
    fake = Fake(auth="bearer")

    def fail(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/token":
            raise httpx.ConnectError("no route")
        return None

    fake.override = fail
    with src(fake) as s, pytest.raises(UpstreamError, match="token server"):
        s.resolve()


def test_credentials_never_go_to_a_plain_http_token_server() -> None:
    fake = Fake(auth="bearer")

    def challenge(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/token":
            raise AssertionError("credentials sent to a plain-HTTP realm")
        header = 'Bearer realm="http://evil.test/token",service="fake"'
        return httpx.Response(401, headers={"WWW-Authenticate": header})

    fake.override = challenge
    with (
        src(fake, username="alice", password="pw") as s,
        pytest.raises(UpstreamError, match="not an HTTPS URL"),
    ):
        s.resolve()


def test_layer_digest_mismatch_keeps_nothing(sink: RecordingLayerStore) -> None:
    fake = Fake()
    fake.add(APP, "1")
    other = build_image([layer_tar({"app/run": "evil\n"})], "zstd")
    fake.blobs[APP.layers[1].digest] = other.layers[0].data
    with src(fake) as s:
        image = s.resolve()
        with pytest.raises(InvalidRequestError, match=r"digest|bytes"):
            s.fetch(image, sink)
    assert sink.added == [APP.diff_ids[0]]
    assert sorted(p.name for p in sink.root.iterdir()) == [APP.diff_ids[0].partition(":")[2]]


def test_oversized_blob_refused(sink: RecordingLayerStore) -> None:
    fake = Fake()
    fake.add(APP, "1")
    fake.blobs[APP.layers[0].digest] += b"\0" * 100
    with src(fake) as s, pytest.raises(InvalidRequestError, match="larger than"):
        s.fetch(s.resolve(), sink)
    assert sink.added == []


def test_connection_lost_mid_layer_keeps_nothing(sink: RecordingLayerStore) -> None:
    fake = Fake()
    fake.add(APP, "1")

    class Broken(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield APP.layers[0].data[:10]
            raise httpx.ReadError("connection reset")

    def cut(request: httpx.Request) -> httpx.Response | None:
        if request.url.path.endswith(APP.layers[0].digest):
            return httpx.Response(200, stream=Broken())
        return None

    fake.override = cut
    with src(fake) as s, pytest.raises(UpstreamError, match="connection reset"):
        s.fetch(s.resolve(), sink)
    assert list(sink.root.iterdir()) == []


def test_manifest_by_digest_must_match() -> None:
    fake = Fake()
    fake.add(APP)
    fake.manifests[DIGEST] = fake.manifests[APP.manifest.digest]
    with (
        src(fake, f"{HOST}/team/app@{DIGEST}") as s,
        pytest.raises(InvalidRequestError, match="does not match its digest"),
    ):
        s.resolve()
    with src(fake, f"{HOST}/team/app@{APP.manifest.digest}") as s:
        assert s.resolve().reference == f"{HOST}/team/app@{APP.manifest.digest}"


def test_index_entry_must_match_its_digest() -> None:
    fake = Fake()
    fake.add(APP)
    index = build_index([APP])
    fake.manifests["1"] = (index.data, index.media_type)
    fake.manifests[APP.manifest.digest] = (APP.manifest.data + b" ", APP.manifest.media_type)
    with src(fake) as s, pytest.raises(InvalidRequestError, match="does not match its digest"):
        s.resolve()


@pytest.mark.parametrize(
    ("manifest", "match"),
    [
        ({"schemaVersion": 1, "name": "team/app", "fsLayers": []}, "schema 1"),
        (
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws",
            },
            "schema 1",
        ),
        ({"schemaVersion": 2, "mediaType": "application/x-unknown"}, "unsupported media type"),
        ({"schemaVersion": 2, "config": {"digest": "nope", "size": 1}, "layers": []}, "digest"),
    ],
)
def test_unusable_manifests(manifest: dict[str, object], match: str) -> None:
    fake = Fake()
    fake.manifests["1"] = (json.dumps(manifest).encode(), "application/json")
    with src(fake) as s, pytest.raises(InvalidRequestError, match=match):
        s.resolve()


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"Env": "A=1"}, "Env must be a list"),
        ({"Cmd": [1, 2]}, "Cmd must be a list of strings"),
        ({"Labels": {"a": 1}}, "Labels"),
        ({"WorkingDir": 5}, "WorkingDir must be a string"),
    ],
)
def test_bad_image_configs(config: dict[str, object], match: str) -> None:
    fake = Fake()
    fake.add(build_image([layer_tar({"x": "1"})], config=config), "1")
    with src(fake) as s, pytest.raises(InvalidRequestError, match=match):
        s.resolve()


def test_layer_count_must_match_diff_ids() -> None:
    image = build_image([layer_tar({"x": "1"}), layer_tar({"y": "2"})])
    doc = json.loads(image.manifest.data)
    doc["layers"] = doc["layers"][:1]
    fake = Fake()
    fake.add(image)
    fake.manifests["1"] = (json.dumps(doc).encode(), image.manifest.media_type)
    with src(fake) as s, pytest.raises(InvalidRequestError, match="1 layers but the config 2"):
        s.resolve()
