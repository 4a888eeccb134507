"""Fetching OCI/Docker images: from a registry or from a ``docker save`` / OCI-layout tarball.

Both sources work in two steps. ``resolve()`` does everything that can fail before a layer is
downloaded (parse the reference, authenticate, pick the linux/amd64 manifest, read and check the
image config), so an API can answer 4xx/502 before it starts streaming progress. ``fetch()``
then hands each layer the sink does not have yet to ``LayerSink.add`` as an uncompressed tar
stream that checks, while it is read, both the blob digest (of the compressed bytes) and the
diff_id (of the uncompressed tar) and raises at EOF on a mismatch, so a sink that reads to the
end and stores nothing on error never keeps a layer that is not what the image says.

Compression is recognised by its magic bytes (gzip, zstd, or none) rather than trusted from the
media type; the media type only decides whether a layer is a filesystem layer at all (foreign
and non-distributable layers are refused). Everything here is synchronous (``httpx.Client``):
callers run it in a thread. Errors are corral's own: httpx, tarfile, zlib and zstd exceptions
are translated at this boundary.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import ipaddress
import json
import re
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Any, BinaryIO, Protocol, Self, cast
from urllib.parse import urlsplit

import httpx
import zstandard

from corral.errors import (
    CorralError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RuntimeFailure,
    UpstreamError,
)

__all__ = [
    "ArchiveSource",
    "ImageConfig",
    "ImageSource",
    "Layer",
    "LayerSink",
    "Progress",
    "RegistrySource",
    "ResolvedImage",
    "is_loopback",
    "parse_reference",
]

DOCKER_HUB = "registry-1.docker.io"

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
_MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
_CONFIG_TYPES = (
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
)
_DOCKER_SAVE_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
_ACCEPT = ", ".join((MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST))

_MAX_JSON = 8 << 20  # manifests, indexes and configs are small; refuse to buffer a huge one
_CHUNK = 1 << 16
_PROGRESS_EVERY = 1 << 20
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = re.compile(rf"^{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*$")
_DOMAIN = re.compile(
    r"^(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class ImageConfig:
    """What corral uses of an image config's ``config`` object."""

    env: tuple[str, ...] = ()  # "K=V" entries, in order
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    workdir: str = ""
    user: str = ""
    # Healthcheck.Test, e.g. ("CMD-SHELL", "curl …"); None when absent or ["NONE"] (disabled).
    healthcheck: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Progress:
    layer: str  # diff_id "sha256:…"
    bytes: int  # compressed bytes received so far
    total: int  # compressed size


@dataclass(frozen=True)
class Layer:
    """One layer of a resolved image, as the manifest describes it."""

    diff_id: str  # sha256 of the uncompressed tar: the layer's name in corral's store
    digest: str | None  # of the blob as stored (compressed); None in a docker-save archive
    size: int  # bytes of the blob as stored
    media_type: str


@dataclass(frozen=True)
class ResolvedImage:
    reference: str  # normalised, e.g. "127.0.0.1:5000/library/app:1"; "" for an unnamed archive
    digest: str  # manifest digest (the config's digest, i.e. the image id, for docker save)
    config: ImageConfig
    diff_ids: tuple[str, ...]  # lowest first
    total_bytes: int  # sum of compressed layer sizes
    layers: tuple[Layer, ...] = ()  # lowest first, parallel to diff_ids


class LayerSink(Protocol):
    def has(self, diff_id: str) -> bool:
        """Already stored: skip the download."""
        ...

    def add(self, diff_id: str, tar: BinaryIO) -> None:
        """Read the uncompressed layer tar to EOF and store it; store nothing if reading
        raises (the stream raises ``InvalidRequestError`` at EOF when a digest is wrong)."""
        ...


class ImageSource(Protocol):
    """What RegistrySource and ArchiveSource have in common."""

    def resolve(self) -> ResolvedImage: ...

    def fetch(
        self,
        image: ResolvedImage,
        sink: LayerSink,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- references


def parse_reference(ref: str) -> tuple[str, str, str]:
    """``(registry host[:port], repository, tag-or-digest)`` of an image reference, by Docker's
    rules: ``ubuntu`` is ``registry-1.docker.io``, ``library/ubuntu``, ``latest``; a first
    component with a ``.`` or ``:`` (or ``localhost``) is a registry; a digest beats a tag."""
    shown = ref if len(ref) <= 100 else f"{ref[:100]}…"
    if not ref or len(ref) > 1024 or any(c.isspace() for c in ref):
        raise InvalidRequestError(f"invalid image reference {shown!r}")
    name, _, digest = ref.partition("@")
    if "@" in ref and not _DIGEST.match(digest):
        raise InvalidRequestError(
            f"invalid image reference {shown!r}: the digest must be sha256:<64 hex digits>"
        )
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidRequestError(f"invalid image reference {shown!r}: bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        registry, path = first, rest
        if not _DOMAIN.match(registry):
            raise InvalidRequestError(f"invalid image reference {shown!r}: bad registry {first!r}")
    else:
        registry, path = DOCKER_HUB, name
    if registry in ("docker.io", "index.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or len(path) > 255 or not all(_PATH_COMPONENT.match(c) for c in path.split("/")):
        raise InvalidRequestError(
            f"invalid image reference {shown!r}: repository names are lowercase letters, digits "
            "and separators (. _ __ -), in components joined by '/'"
        )
    return registry, path, digest or tag or "latest"


def _normalised(registry: str, repo: str, ref: str) -> str:
    return f"{registry}/{repo}{'@' if ref.startswith(('sha256:', 'sha512:')) else ':'}{ref}"


# --------------------------------------------------------------------------- parsing


def _hasher(digest: str, what: str) -> Any:
    if not _DIGEST.match(digest):
        raise InvalidRequestError(f"{what}: unsupported or malformed digest {digest!r}")
    return hashlib.new(digest.partition(":")[0])


def _check_digest(data: bytes, digest: str, what: str) -> None:
    h = _hasher(digest, what)
    h.update(data)
    if f"{digest.partition(':')[0]}:{h.hexdigest()}" != digest:
        raise InvalidRequestError(f"{what}: content does not match its digest {digest}")


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidRequestError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequestError(f"{what} is not a JSON object")
    return doc


def _strings(value: object, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"image config: {what} must be a list of strings")
    return tuple(value)


def _string(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequestError(f"image config: {what} must be a string")
    return value


def _parse_platform(platform: str) -> tuple[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidRequestError(f"invalid platform {platform!r} (want os/arch, e.g. linux/amd64)")
    return parts[0], parts[1]


@dataclass(frozen=True)
class _Config:
    config: ImageConfig
    diff_ids: tuple[str, ...]
    platform: str  # "os/arch" as the config declares it ("" if it does not)


def _parse_config(data: bytes) -> _Config:
    doc = _json(data, "image config")
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise InvalidRequestError("image config: 'config' must be an object")
    health = cfg.get("Healthcheck") or {}
    if not isinstance(health, dict):
        raise InvalidRequestError("image config: Healthcheck must be an object")
    test = _strings(health.get("Test"), "Healthcheck.Test")
    labels = cfg.get("Labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise InvalidRequestError("image config: Labels must map strings to strings")
    config = ImageConfig(
        env=_strings(cfg.get("Env"), "Env") or (),
        entrypoint=_strings(cfg.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(cfg.get("Cmd"), "Cmd"),
        workdir=_string(cfg.get("WorkingDir"), "WorkingDir"),
        user=_string(cfg.get("User"), "User"),
        healthcheck=None if not test or test[0] == "NONE" else test,
        labels=MappingProxyType(dict(labels)),
    )
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidRequestError("image config: missing rootfs of type 'layers'")
    diff_ids = _strings(rootfs.get("diff_ids"), "rootfs.diff_ids") or ()
    for d in diff_ids:
        if not _DIGEST.match(d):
            raise InvalidRequestError(f"image config: malformed diff_id {d!r}")
    os_, arch = doc.get("os"), doc.get("architecture")
    platform = f"{os_}/{arch}" if isinstance(os_, str) and isinstance(arch, str) else ""
    return _Config(config, diff_ids, platform)


def _check_platform(declared: str, wanted: str, what: str) -> None:
    if declared and _parse_platform(declared) != _parse_platform(wanted):
        raise InvalidRequestError(f"{what} is a {declared} image; corral needs {wanted}")


@dataclass(frozen=True)
class _Descriptor:
    media_type: str
    digest: str
    size: int
    platform: str  # "os/arch" from an index entry, "" when not given
    annotations: Mapping[str, str]


def _descriptor(raw: object, what: str) -> _Descriptor:
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"{what}: descriptor is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise InvalidRequestError(f"{what}: descriptor with a malformed digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequestError(f"{what}: descriptor {digest} has no valid size")
    plat = raw.get("platform")
    platform = ""
    if isinstance(plat, dict) and isinstance(plat.get("os"), str):
        platform = f"{plat['os']}/{plat.get('architecture', '')}"
        if isinstance(plat.get("variant"), str) and plat["variant"]:
            platform += f"/{plat['variant']}"
    annotations = raw.get("annotations")
    return _Descriptor(
        media_type if isinstance(media_type, str) else "",
        digest,
        size,
        platform,
        {k: v for k, v in annotations.items() if isinstance(v, str)}
        if isinstance(annotations, dict)
        else {},
    )


def _is_index(doc: dict[str, Any], content_type: str = "") -> bool:
    media_type = doc.get("mediaType") or content_type
    return media_type in _INDEX_TYPES or ("manifests" in doc and "layers" not in doc)


def _refuse_schema1(doc: dict[str, Any], what: str) -> None:
    if doc.get("schemaVersion") == 1 or "distribution.manifest.v1" in str(doc.get("mediaType")):
        raise InvalidRequestError(
            f"{what} uses the obsolete Docker schema 1 manifest format, which corral does not "
            "import; push the image again with a current Docker, podman or skopeo"
        )


def _pick(descriptors: list[_Descriptor], platform: str, what: str) -> _Descriptor:
    """The index entry for ``platform`` (its variant ignored), or a clear error."""
    wanted = _parse_platform(platform)
    for d in descriptors:
        if d.platform and _parse_platform(d.platform) == wanted:
            return d
    have = sorted({d.platform for d in descriptors if d.platform and "unknown" not in d.platform})
    raise InvalidRequestError(
        f"{what} has no {platform} image; it has: {', '.join(have) or 'no platforms listed'}"
    )


def _manifest_layers(doc: dict[str, Any], what: str) -> tuple[_Descriptor, list[_Descriptor]]:
    """Config and layer descriptors of an image manifest, refusing non-filesystem layers."""
    _refuse_schema1(doc, what)
    media_type = doc.get("mediaType")
    if media_type and media_type not in _MANIFEST_TYPES:
        raise InvalidRequestError(f"{what} has unsupported media type {media_type!r}")
    config = _descriptor(doc.get("config"), what)
    if config.media_type and config.media_type not in _CONFIG_TYPES:
        raise InvalidRequestError(
            f"{what} is not a container image (its config is {config.media_type!r})"
        )
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidRequestError(f"{what} has no layer list")
    layers = [_descriptor(raw, what) for raw in raw_layers]
    for layer in layers:
        mt = layer.media_type
        if "foreign" in mt or "nondistributable" in mt:
            raise InvalidRequestError(
                f"{what}: layer {layer.digest} is a foreign (non-distributable) layer ({mt}), "
                "whose content is not part of the image; corral cannot import it"
            )
        filesystem = mt.endswith((".tar", "+gzip", ".gzip", "+zstd", ".zstd"))
        if not filesystem or ("image.layer" not in mt and "image.rootfs" not in mt):
            raise InvalidRequestError(
                f"{what}: layer {layer.digest} has media type {mt!r}, not a filesystem layer"
            )
    return config, layers


def _resolved(
    reference: str,
    digest: str,
    config: _Config,
    blobs: Sequence[tuple[str | None, int, str]],  # (digest, size, media type) per layer
    what: str,
) -> ResolvedImage:
    if len(config.diff_ids) != len(blobs):
        raise InvalidRequestError(
            f"{what}: the manifest lists {len(blobs)} layers but the config "
            f"{len(config.diff_ids)} diff_ids"
        )
    layers = [Layer(d, *blob) for d, blob in zip(config.diff_ids, blobs, strict=True)]
    return ResolvedImage(
        reference=reference,
        digest=digest,
        config=config.config,
        diff_ids=config.diff_ids,
        total_bytes=sum(layer.size for layer in layers),
        layers=tuple(layers),
    )


# --------------------------------------------------------------------------- layer streams


class _Compressed(io.RawIOBase):
    """The layer blob as it arrives: hashed, counted, size-capped, reported as progress."""

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        digest: str | None,
        size: int,
        diff_id: str,
        what: str,
        translate: Callable[[Exception], CorralError],
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        super().__init__()
        self.chunks = chunks
        self.digest = digest
        self.hash = _hasher(digest, what) if digest else None
        self.size = size
        self.diff_id = diff_id
        self.what = what
        self.translate = translate
        self.on_progress = on_progress
        self.count = 0
        self.reported = -1
        self.pending = b""  # read from the source but not yet by our reader
        self.offset = 0
        self.eof = False

    def readable(self) -> bool:
        return True

    def _more(self) -> bytes:
        if self.eof:
            return b""
        try:
            chunk = next(self.chunks, b"")
        except CorralError:
            raise
        except Exception as exc:
            raise self.translate(exc) from exc
        if not chunk:
            self.eof = True
            self._report(force=True)
            return b""
        self.count += len(chunk)
        if self.count > self.size:
            raise InvalidRequestError(f"{self.what} is larger than the {self.size} bytes listed")
        if self.hash is not None:
            self.hash.update(chunk)
        self._report()
        return chunk

    def _report(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        due = force or self.reported < 0 or self.count - self.reported >= _PROGRESS_EVERY
        if due and self.count != self.reported:
            self.reported = self.count
            self.on_progress(Progress(self.diff_id, self.count, self.size))

    def peek(self, n: int) -> bytes:
        while len(self.pending) - self.offset < n and (chunk := self._more()):
            self.pending = self.pending[self.offset :] + chunk
            self.offset = 0
        return self.pending[self.offset : self.offset + n]

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            data = self.pending[self.offset :] + b"".join(iter(self._more, b""))
            self.pending, self.offset = b"", 0
            return data
        if self.offset >= len(self.pending):
            self.pending, self.offset = self._more(), 0
        data = self.pending[self.offset : self.offset + size]
        self.offset += len(data)
        return data

    def verify(self) -> None:
        """At EOF: the blob must be exactly what the manifest said."""
        while self._more():
            pass
        if self.count != self.size:
            raise InvalidRequestError(
                f"{self.what} has {self.count} bytes, but the manifest lists {self.size}"
            )
        if self.hash is not None and self.digest is not None:
            got = f"{self.digest.partition(':')[0]}:{self.hash.hexdigest()}"
            if got != self.digest:
                raise InvalidRequestError(
                    f"{self.what} does not match its digest (expected {self.digest}, got {got})"
                )


class _LayerStream(io.RawIOBase):
    """The uncompressed layer tar handed to the sink; raises at EOF if a digest is wrong."""

    def __init__(self, blob: _Compressed) -> None:
        super().__init__()
        self.blob = blob
        self.what = blob.what
        self.hash = _hasher(blob.diff_id, blob.what)
        self.done = False
        magic = blob.peek(4)
        self.inner: IO[bytes]
        if magic.startswith(_GZIP_MAGIC):
            self.inner = cast(IO[bytes], gzip.GzipFile(fileobj=blob, mode="rb"))
        elif magic == _ZSTD_MAGIC:
            reader = zstandard.ZstdDecompressor().stream_reader(
                cast(IO[bytes], blob), read_across_frames=True
            )
            self.inner = cast(IO[bytes], reader)
        else:
            self.inner = cast(IO[bytes], blob)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1, /) -> bytes:
        if self.done:
            return b""
        try:
            data = self.inner.read(size if size >= 0 else -1)
        except CorralError:
            raise
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise InvalidRequestError(f"{self.what} cannot be decompressed: {exc}") from exc
        if data:
            self.hash.update(data)
            if size < 0:
                self._finish()
            return data
        self._finish()
        return b""

    def _finish(self) -> None:
        self.done = True
        self.blob.verify()
        diff_id = self.blob.diff_id
        got = f"{diff_id.partition(':')[0]}:{self.hash.hexdigest()}"
        if got != diff_id:
            raise InvalidRequestError(
                f"{self.what}: the uncompressed layer does not match its diff_id "
                f"(expected {diff_id}, got {got})"
            )

    @property
    def finished(self) -> bool:
        return self.done


def _feed(sink: LayerSink, blob: _Compressed) -> None:
    stream = _LayerStream(blob)
    sink.add(blob.diff_id, cast(BinaryIO, stream))
    if not stream.finished:
        # The sink returned without reading to EOF: check now (it has stored the layer
        # already, so a bad digest here is reported, not silently kept).
        while stream.read(_CHUNK):
            pass


# --------------------------------------------------------------------------- registries


def _registry_error(resp: httpx.Response) -> str:
    """The registry's own words about a failed request (its JSON ``errors``), briefly."""
    try:
        body = b""
        for chunk in resp.iter_bytes():
            body += chunk
            if len(body) > 65536:
                break
        errors = json.loads(body).get("errors") or []
        words = "; ".join(
            f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
            for e in errors
            if isinstance(e, dict)
        )
    except (ValueError, AttributeError, httpx.HTTPError):
        words = ""
    return f"HTTP {resp.status_code}" + (f" ({words})" if words else "")


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """Scheme and parameters of a ``WWW-Authenticate`` header."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m[1].lower(): m[2] if m[2] is not None else m[3]
        for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^\s,]*))', rest)
    }
    return scheme.lower(), params


def is_loopback(registry: str) -> bool:
    """Whether ``host[:port]`` is this host: like Docker, such registries may speak plain HTTP
    without being listed (nothing crosses a network)."""
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RegistrySource:
    """An image in a registry speaking the Docker Registry HTTP API v2 (Docker Hub, GHCR,
    Harbor, ``docker-registry``...).

    Authentication follows Docker: anonymous first; on 401 a Bearer challenge sends us to the
    token server named in it (with basic auth when a username is given) and a Basic challenge
    makes us retry with basic auth. Plain HTTP only for registries listed in
    ``insecure_registries`` (``host:port`` strings, like Docker's ``insecure-registries``) and
    for loopback ones, as Docker allows.
    """

    def __init__(
        self,
        reference: str,
        *,
        username: str | None = None,
        password: str | None = None,
        insecure_registries: Collection[str] = (),
        platform: str = "linux/amd64",
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,  # tests talk to a fake registry
    ) -> None:
        self.registry, self.repository, self.ref = parse_reference(reference)
        _parse_platform(platform)
        self.platform = platform
        self.reference = _normalised(self.registry, self.repository, self.ref)
        self._username = username
        self._password = password or ""
        plain = self.registry in insecure_registries or is_loopback(self.registry)
        self._scheme = "http" if plain else "https"
        self._base = f"{self._scheme}://{self.registry}/v2/{self.repository}"
        self._auth: str | None = None
        self._client = httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            headers={"User-Agent": "corral"},
            transport=transport,
        )

    # ----------------------------------------------------------------------- http

    def _unreachable(self, exc: Exception) -> UpstreamError:
        hint = ""
        if "SSL" in str(exc) or "TLS" in str(exc):
            hint = " (if it speaks plain HTTP, list it among the insecure registries)"
        return UpstreamError(
            f"registry {self.registry} unreachable or failing: {exc or type(exc).__name__}{hint}"
        )

    def _refused(self) -> PermissionDeniedError:
        given = "" if self._username else " (none were given)"
        return PermissionDeniedError(
            f"registry {self.registry} refused credentials for repository {self.repository}{given}"
        )

    def _send(self, url: str, *, accept: str | None = None, blob: bool = False) -> httpx.Response:
        """A streamed GET with authentication handled; the caller closes the response."""
        for attempt in range(2):
            headers = {"Accept": accept} if accept else {}
            if self._auth:
                headers["Authorization"] = self._auth
            try:
                request = self._client.build_request("GET", url, headers=headers)
                # Registries redirect blob downloads to storage; httpx drops Authorization on
                # a redirect to another origin, so the storage never sees our token.
                resp = self._client.send(request, stream=True, follow_redirects=blob)
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from exc
            if resp.status_code == 401 and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.close()
                if self._authenticate(challenge):
                    continue
                raise self._refused()
            if resp.status_code in (401, 403):
                resp.close()
                raise self._refused()
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _authenticate(self, header: str) -> bool:
        """Act on a 401 challenge; False when there is nothing more to try."""
        scheme, params = _challenge(header)
        if scheme == "basic":
            if self._username is None:
                return False
            basic = base64.b64encode(f"{self._username}:{self._password}".encode()).decode()
            self._auth = f"Basic {basic}"
            return True
        if scheme != "bearer" or not params.get("realm"):
            return False
        try:
            realm_scheme = urlsplit(params["realm"]).scheme
        except ValueError:
            realm_scheme = ""
        if realm_scheme not in ("https", self._scheme):
            # Credentials for a TLS registry must not travel in clear text (nor anywhere odd).
            raise UpstreamError(
                f"registry {self.registry} sends us to token server {params['realm']!r}, "
                "which is not an HTTPS URL"
            )
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope") or f"repository:{self.repository}:pull",
        }
        auth = (self._username, self._password) if self._username is not None else None
        try:
            resp = self._client.get(
                params["realm"], params={k: v for k, v in query.items() if v}, auth=auth
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UpstreamError(
                f"token server {params['realm']} of registry {self.registry} unreachable: {exc}"
            ) from exc
        if resp.status_code in (401, 403):
            raise self._refused()
        if resp.status_code != 200:
            raise UpstreamError(
                f"token server {params['realm']} of registry {self.registry} answered "
                f"HTTP {resp.status_code}"
            )
        token: object = None
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            pass
        if not isinstance(token, str) or not token:
            raise UpstreamError(
                f"token server {params['realm']} of registry {self.registry} sent no token"
            )
        self._auth = f"Bearer {token}"
        return True

    def _check_status(self, resp: httpx.Response, what: str, missing: CorralError) -> None:
        if resp.status_code == 200:
            return
        detail = _registry_error(resp)
        resp.close()
        if resp.status_code == 404:
            raise missing
        if resp.status_code == 400:
            raise InvalidRequestError(f"registry {self.registry} refused {what}: {detail}")
        raise UpstreamError(f"registry {self.registry} failed to send {what}: {detail}")

    def _read_small(self, resp: httpx.Response, what: str) -> bytes:
        data = bytearray()
        try:
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > _MAX_JSON:
                    raise InvalidRequestError(f"{what} is larger than {_MAX_JSON} bytes")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        finally:
            resp.close()
        return bytes(data)

    def _manifest(self, ref: str) -> tuple[bytes, str]:
        what = f"manifest {ref} of {self.repository}"
        resp = self._send(f"{self._base}/manifests/{ref}", accept=_ACCEPT)
        missing = NotFoundError(
            f"image {_normalised(self.registry, self.repository, ref)} not found "
            f"on registry {self.registry}"
        )
        self._check_status(resp, what, missing)
        content_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        data = self._read_small(resp, what)
        if ref.startswith(("sha256:", "sha512:")):
            _check_digest(data, ref, what)
        return data, content_type

    def _blob(self, digest: str) -> httpx.Response:
        resp = self._send(f"{self._base}/blobs/{digest}", blob=True)
        missing = UpstreamError(
            f"registry {self.registry} lacks blob {digest} that the manifest of "
            f"{self.repository} lists"
        )
        self._check_status(resp, f"blob {digest}", missing)
        return resp

    # ----------------------------------------------------------------------- API

    def resolve(self) -> ResolvedImage:
        """Fetch and check the manifest (picking ``platform`` from an index) and the config."""
        data, content_type = self._manifest(self.ref)
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if self.ref.startswith(("sha256:", "sha512:")):
            digest = self.ref
        doc = _json(data, f"manifest of {self.reference}")
        _refuse_schema1(doc, self.reference)
        if _is_index(doc, content_type):
            entries = doc.get("manifests")
            if not isinstance(entries, list):
                raise InvalidRequestError(f"index of {self.reference} has no manifest list")
            chosen = _pick(
                [_descriptor(e, self.reference) for e in entries], self.platform, self.reference
            )
            data, content_type = self._manifest(chosen.digest)
            digest = chosen.digest
            doc = _json(data, f"manifest of {self.reference}")
            if _is_index(doc, content_type):
                raise InvalidRequestError(
                    f"{self.reference}: nested image indexes are not supported"
                )
        config_desc, layer_descs = _manifest_layers(doc, self.reference)
        if config_desc.size > _MAX_JSON:
            raise InvalidRequestError(f"{self.reference}: the image config is too large")
        config_data = self._read_small(self._blob(config_desc.digest), "image config")
        _check_digest(config_data, config_desc.digest, f"config of {self.reference}")
        config = _parse_config(config_data)
        _check_platform(config.platform, self.platform, self.reference)
        blobs = [(d.digest, d.size, d.media_type) for d in layer_descs]
        return _resolved(self.reference, digest, config, blobs, self.reference)

    def fetch(
        self,
        image: ResolvedImage,
        sink: LayerSink,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        """Download the layers ``sink`` does not have, lowest first, each checked while read.
        ``on_progress`` hears about the layers downloaded (not those skipped), at least at the
        start and end of each and every MiB in between."""
        if len(image.layers) != len(image.diff_ids):
            raise RuntimeFailure("fetch() needs an image that resolve() returned")
        for layer in image.layers:
            if sink.has(layer.diff_id):
                continue
            if layer.digest is None:
                raise RuntimeFailure(f"layer {layer.diff_id} has no blob digest")
            resp = self._blob(layer.digest)
            try:
                blob = _Compressed(
                    resp.iter_raw(_CHUNK),
                    digest=layer.digest,
                    size=layer.size,
                    diff_id=layer.diff_id,
                    what=f"layer {layer.digest} of {image.reference}",
                    translate=self._unreachable,
                    on_progress=on_progress,
                )
                _feed(sink, blob)
            finally:
                resp.close()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- archives


def _member_name(name: str, archive: Path) -> str:
    """A tarball member name without ``./``; escaping names are refused outright."""
    if name.startswith("/") or "\0" in name:
        raise InvalidRequestError(
            f"image archive {archive.name}: member {name!r} has an absolute path"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidRequestError(f"image archive {archive.name}: member {name!r} contains '..'")
    return "/".join(parts)


def _inside(path: str) -> str | None:
    """``path`` (relative to the archive root) with ``..`` resolved; None if it leaves it."""
    if path.startswith("/"):
        return None
    parts: list[str] = []
    for p in path.split("/"):
        if p == "..":
            if not parts:
                return None
            parts.pop()
        elif p not in ("", "."):
            parts.append(p)
    return "/".join(parts)


class ArchiveSource:
    """An image in a ``docker save`` tarball (``manifest.json``, ``<id>.json`` config, layer
    tars, possibly gzip'd) or an OCI image-layout tarball (``oci-layout``, ``index.json``,
    ``blobs/sha256/…``); the tarball itself may be compressed. Members are read by name from
    the file on disk; a member named with ``..`` or an absolute path refuses the whole archive.
    """

    def __init__(self, path: Path, *, platform: str = "linux/amd64") -> None:
        _parse_platform(platform)
        self.path = Path(path)
        self.platform = platform
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._blob_members: dict[str, tuple[str, ...]] = {}  # image digest → layer members

    # ----------------------------------------------------------------------- members

    def _translate(self, exc: Exception) -> CorralError:
        if isinstance(exc, CorralError):
            return exc
        if isinstance(exc, tarfile.TarError | EOFError | zlib.error | gzip.BadGzipFile):
            return InvalidRequestError(f"image archive {self.path.name} is unreadable: {exc}")
        return RuntimeFailure(f"reading image archive {self.path.name} failed: {exc}")

    def _open(self) -> tarfile.TarFile:
        if self._tar is not None:
            return self._tar
        try:
            # Kept open until close(): members are read by name, in any order.
            tar = tarfile.open(self.path, "r:*")  # noqa: SIM115
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile):
            raise InvalidRequestError(
                f"image archive {self.path.name} is not a (compressed) tar archive"
            ) from None
        except OSError as exc:
            raise RuntimeFailure(f"cannot open image archive {self.path}: {exc}") from exc
        try:
            members: dict[str, tarfile.TarInfo] = {}
            for member in tar:
                members[_member_name(member.name, self.path)] = member
        except BaseException as exc:
            tar.close()
            if isinstance(exc, Exception):
                raise self._translate(exc) from exc
            raise
        self._tar, self._members = tar, members
        return tar

    def _lookup(self, name: str, what: str) -> tarfile.TarInfo:
        """The regular member ``name`` refers to, following links inside the archive only
        (``docker save`` stores a layer shared by two images once and symlinks the other)."""
        self._open()
        key: str | None = _member_name(name, self.path)
        for _ in range(16):
            member = self._members.get(key or "")
            if member is None:
                break
            if member.isreg():
                return member
            if member.issym() and key is not None:
                key = _inside(f"{key.rpartition('/')[0]}/{member.linkname}")
            elif member.islnk():
                key = _inside(member.linkname)
            else:
                break
        if key is not None and key not in self._members:
            raise InvalidRequestError(f"image archive {self.path.name} lacks {what} ({name!r})")
        raise InvalidRequestError(
            f"image archive {self.path.name}: {what} ({name!r}) is not a file inside it"
        )

    def _chunks(self, member: tarfile.TarInfo) -> Iterator[bytes]:
        tar = self._open()
        f = tar.extractfile(member)
        if f is None:
            raise InvalidRequestError(f"image archive {self.path.name}: {member.name} is no file")
        with f:
            while chunk := f.read(_CHUNK):
                yield chunk

    def _read_small(self, name: str, what: str) -> bytes:
        member = self._lookup(name, what)
        if member.size > _MAX_JSON:
            raise InvalidRequestError(f"image archive {self.path.name}: {what} is too large")
        try:
            return b"".join(self._chunks(member))
        except CorralError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    def _has(self, name: str) -> bool:
        self._open()
        return _member_name(name, self.path) in self._members

    @staticmethod
    def _blob_path(digest: str) -> str:
        algorithm, _, hexdigest = digest.partition(":")
        return f"blobs/{algorithm}/{hexdigest}"

    def _read_blob(self, desc: _Descriptor, what: str) -> bytes:
        if desc.size > _MAX_JSON:
            raise InvalidRequestError(f"image archive {self.path.name}: {what} is too large")
        data = self._read_small(self._blob_path(desc.digest), what)
        _check_digest(data, desc.digest, f"image archive {self.path.name}: {what}")
        return data

    # ----------------------------------------------------------------------- formats

    def _resolve_oci(self) -> ResolvedImage:
        name = self.path.name
        index = _json(self._read_small("index.json", "index.json"), f"{name}: index.json")
        candidates: list[tuple[_Descriptor, str]] = []  # (manifest, image name)

        def walk(doc: dict[str, Any], ref: str, depth: int) -> None:
            entries = doc.get("manifests")
            if not isinstance(entries, list):
                raise InvalidRequestError(f"{name}: an index without a manifest list")
            for raw in entries:
                desc = _descriptor(raw, name)
                label = (
                    desc.annotations.get("io.containerd.image.name")
                    or desc.annotations.get("org.opencontainers.image.ref.name")
                    or ref
                )
                if desc.media_type in _INDEX_TYPES:
                    if depth >= 4:
                        raise InvalidRequestError(f"{name}: image indexes nested too deep")
                    if self._has(self._blob_path(desc.digest)):
                        walk(_json(self._read_blob(desc, "an image index"), name), label, depth + 1)
                elif desc.media_type in _MANIFEST_TYPES or not desc.media_type:
                    candidates.append((desc, label))

        walk(index, "", 0)
        wanted = _parse_platform(self.platform)
        matching: dict[str, tuple[_Descriptor, str]] = {}
        seen: list[str] = []
        for desc, label in candidates:
            if desc.platform:
                if "unknown" not in desc.platform:
                    seen.append(desc.platform)
                if _parse_platform(desc.platform) != wanted:
                    continue
            if not self._has(self._blob_path(desc.digest)):
                continue  # a platform whose blobs were not saved
            matching.setdefault(desc.digest, (desc, label))
        if not matching:
            raise InvalidRequestError(
                f"image archive {name} has no {self.platform} image"
                + (f"; it has: {', '.join(sorted(set(seen)))}" if seen else "")
            )
        images: list[tuple[ResolvedImage, tuple[str, ...]]] = []
        for desc, label in matching.values():
            doc = _json(self._read_blob(desc, "an image manifest"), f"{name}: manifest")
            config_desc, layer_descs = _manifest_layers(doc, f"image archive {name}")
            config = _parse_config(self._read_blob(config_desc, "the image config"))
            if config.platform and _parse_platform(config.platform) != wanted:
                seen.append(config.platform)
                continue
            blobs = [(d.digest, d.size, d.media_type) for d in layer_descs]
            image = _resolved(label, desc.digest, config, blobs, f"image archive {name}")
            images.append((image, tuple(self._blob_path(d.digest) for d in layer_descs)))
        if not images:
            raise InvalidRequestError(
                f"image archive {name} has no {self.platform} image; it has: "
                f"{', '.join(sorted(set(seen)))}"
            )
        if len(images) > 1:
            raise InvalidRequestError(
                f"image archive {name} holds {len(images)} images for {self.platform}; "
                "save one image per tarball"
            )
        image, members = images[0]
        self._blob_members[image.digest] = members
        return image

    def _resolve_docker(self) -> ResolvedImage:
        name = self.path.name
        raw = json.loads(self._read_small("manifest.json", "manifest.json") or b"null")
        if not isinstance(raw, list) or not raw or not all(isinstance(e, dict) for e in raw):
            raise InvalidRequestError(f"image archive {name}: manifest.json lists no images")
        if len(raw) > 1:
            raise InvalidRequestError(
                f"image archive {name} holds {len(raw)} images; save one image per tarball"
            )
        entry = raw[0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise InvalidRequestError(f"image archive {name}: manifest.json lacks Config/Layers")
        if not all(isinstance(n, str) for n in layer_names):
            raise InvalidRequestError(f"image archive {name}: manifest.json has bad Layers")
        config_data = self._read_small(config_name, "the image config")
        config = _parse_config(config_data)
        _check_platform(config.platform, self.platform, f"image archive {name}")
        blobs = [
            (None, self._lookup(n, f"layer {n}").size, _DOCKER_SAVE_LAYER) for n in layer_names
        ]
        tags = entry.get("RepoTags")
        reference = tags[0] if isinstance(tags, list) and tags and isinstance(tags[0], str) else ""
        digest = f"sha256:{hashlib.sha256(config_data).hexdigest()}"
        image = _resolved(reference, digest, config, blobs, f"image archive {name}")
        self._blob_members[image.digest] = tuple(layer_names)
        return image

    # ----------------------------------------------------------------------- API

    def resolve(self) -> ResolvedImage:
        """Read the archive's index and the linux/amd64 image's manifest and config."""
        try:
            self._open()
            if self._has("index.json") and self._has("oci-layout"):
                return self._resolve_oci()
            if self._has("manifest.json"):
                return self._resolve_docker()
        except ValueError as exc:  # json.loads of manifest.json
            raise InvalidRequestError(f"image archive {self.path.name}: {exc}") from None
        raise InvalidRequestError(
            f"image archive {self.path.name} is neither a docker-save tarball (manifest.json) "
            "nor an OCI image layout (oci-layout, index.json)"
        )

    def fetch(
        self,
        image: ResolvedImage,
        sink: LayerSink,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        """Hand the layers ``sink`` does not have to it, lowest first, each checked while read
        (progress as for RegistrySource.fetch, in bytes of the archive's members)."""
        members = self._blob_members.get(image.digest)
        if members is None:
            raise RuntimeFailure("fetch() needs an image this source resolved")
        for layer, name in zip(image.layers, members, strict=True):
            if sink.has(layer.diff_id):
                continue
            member = self._lookup(name, f"layer {name}")
            blob = _Compressed(
                self._chunks(member),
                digest=layer.digest,
                size=member.size,
                diff_id=layer.diff_id,
                what=f"layer {layer.digest or name} of image archive {self.path.name}",
                translate=self._translate,
                on_progress=on_progress,
            )
            _feed(sink, blob)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
