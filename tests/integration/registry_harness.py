"""A real OCI registry on loopback for tests: Debian's ``docker-registry``, optionally behind a
token server of our own (the real Bearer flow), and a small pure-Python image builder and pusher.

``with Registry() as r:`` starts ``docker-registry`` on 127.0.0.1 and a free port with its
storage in a private directory and removes both at the end. With ``auth=(user, password)`` the
registry trusts JWTs signed by a key made here (``auth: token: rootcertbundle``) and a token
server in this process hands them out to that user only (pull and push) and to nobody else.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urljoin, urlparse

import httpx
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from corral.templates.layers import LayerStore

__all__ = [
    "REGISTRY_BINARY",
    "Blob",
    "Image",
    "Registry",
    "build_image",
    "build_index",
    "compress",
    "layer_tar",
    "random_image",
    "registry_skip_reason",
    "running_registry",
]

REGISTRY_BINARY = "docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


class RecordingLayerStore(LayerStore):
    """The server's own layer store, remembering the layers it was given (to tell what an
    import fetched from what it skipped)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.added: list[str] = []

    def add(self, diff_id: str, tar: BinaryIO) -> None:
        super().add(diff_id, tar)
        self.added.append(diff_id)


def registry_skip_reason() -> str | None:
    if shutil.which(REGISTRY_BINARY) is None:
        return "needs docker-registry (apt-get install docker-registry)"
    return None


# --------------------------------------------------------------------------- images


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def layer_tar(files: Mapping[str, bytes | str | None], *, mtime: int = 1_600_000_000) -> bytes:
    """An uncompressed layer tar: ``name -> content`` (None makes a directory; a str value
    starting with ``->`` makes a symlink to the rest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(content, str) and content.startswith("->"):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            else:
                data = content.encode() if isinstance(content, str) else content
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(tar: bytes, kind: str) -> bytes:
    """``tar`` compressed with ``kind``: gzip, zstd or none."""
    if kind == "gzip":
        return gzip.compress(tar, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    if kind == "none":
        return tar
    raise ValueError(kind)


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        base = {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}
        return base | extra


@dataclass(frozen=True)
class Image:
    """A single-platform image: manifest, config and layer blobs."""

    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]
    platform: str = "linux/amd64"

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)


def build_image(
    layers: Sequence[bytes],
    compression: str | Sequence[str] = "gzip",
    *,
    config: Mapping[str, Any] | None = None,
    platform: str = "linux/amd64",
    docker: bool = False,
) -> Image:
    """An image of the uncompressed layer tars ``layers`` (lowest first), each compressed with
    ``compression`` (one kind, or one per layer), with ``config`` as the image config's
    ``config`` object; OCI media types, or Docker's with ``docker``."""
    kinds = [compression] * len(layers) if isinstance(compression, str) else list(compression)
    os_, arch = platform.split("/")[:2]
    blobs = tuple(
        Blob(
            compress(tar, kind),
            DOCKER_LAYER_GZIP if docker and kind == "gzip" else LAYER_TYPES[kind],
        )
        for tar, kind in zip(layers, kinds, strict=True)
    )
    diff_ids = tuple(sha256(tar) for tar in layers)
    config_doc = {
        "architecture": arch,
        "os": os_,
        "config": dict(config or {}),
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": "registry_harness"} for _ in layers],
    }
    config_blob = Blob(json.dumps(config_doc).encode(), DOCKER_CONFIG if docker else OCI_CONFIG)
    manifest_doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in blobs],
    }
    manifest = Blob(json.dumps(manifest_doc).encode(), DOCKER_MANIFEST if docker else OCI_MANIFEST)
    return Image(manifest, config_blob, blobs, diff_ids, platform)


def docker_save_members(image: Image, tags: Iterable[str] = ("app:1",)) -> dict[str, bytes]:
    """The members of a ``docker save`` tarball of ``image``."""
    config_name = f"{image.config.digest.partition(':')[2]}.json"
    layer_names = [f"{layer.digest.partition(':')[2][:16]}/layer.tar" for layer in image.layers]
    manifest = [{"Config": config_name, "RepoTags": list(tags), "Layers": layer_names}]
    members = {"manifest.json": json.dumps(manifest).encode(), config_name: image.config.data}
    for name, layer in zip(layer_names, image.layers, strict=True):
        members[name] = layer.data
    return members


def build_index(images: Sequence[Image], *, docker: bool = False) -> Blob:
    """A manifest list (Docker) or image index (OCI) of ``images`` by their platforms."""
    entries = []
    for image in images:
        os_, arch, *variant = image.platform.split("/")
        platform = {"os": os_, "architecture": arch} | ({"variant": variant[0]} if variant else {})
        entries.append(image.manifest.descriptor(platform=platform))
    media_type = DOCKER_LIST if docker else OCI_INDEX
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
    return Blob(json.dumps(doc).encode(), media_type)


# --------------------------------------------------------------------------- token server


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _libtrust_kid(key: ec.EllipticCurvePublicKey) -> str:
    """The key id docker-registry gives a trusted key: base32 of a truncated SHA-256 of its
    DER SubjectPublicKeyInfo, in colon-separated groups of four."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@dataclass
class TokenServer:
    """Hands out registry JWTs to one user (everything asked for) and empty ones to others."""

    user: str
    password: str
    service: str
    issuer: str
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    requests: list[str] = field(default_factory=list)
    httpd: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def certificate_pem(self) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def token(self, subject: str, scopes: Sequence[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind and name:
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "kid": _libtrust_kid(self.key.public_key())}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                server.requests.append(self.path)
                if url.path != "/token":
                    self.send_error(404)
                    return
                subject = ""
                header = self.headers.get("Authorization", "")
                if header:
                    scheme, _, value = header.partition(" ")
                    try:
                        user, _, password = base64.b64decode(value).decode().partition(":")
                    except ValueError:
                        user, password = "", ""
                    if scheme.lower() != "basic" or (user, password) != (
                        server.user,
                        server.password,
                    ):
                        self.send_error(401, "bad credentials")
                        return
                    subject = user
                # Anonymous callers get a valid token granting nothing (as Docker Hub does
                # for private repositories): the registry then refuses them.
                scopes = query.get("scope", []) if subject else []
                body = json.dumps({"token": server.token(subject, scopes), "expires_in": 300})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


# --------------------------------------------------------------------------- the registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CONFIG = """\
version: 0.1
log:
  level: info
  formatter: text
  fields:
    service: registry
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
{auth}"""

_TOKEN_AUTH = """\
auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {bundle}
"""


def _die_with_parent() -> None:
    """In the registry's child process: SIGKILL it if the test process dies without cleaning up
    (strictly: when the thread that started it ends, so start it from a long-lived one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Registry:
    """``docker-registry`` on 127.0.0.1 and a free port while the ``with`` block runs (token
    auth for ``auth=(user, password)``); its process, token server and storage directory (made
    below ``parent``, default the system's temp dir) are gone when the block ends."""

    def __init__(self, parent: Path | None = None, *, auth: tuple[str, str] | None = None) -> None:
        self.parent = parent
        self.credentials = auth
        self.host = ""  # "127.0.0.1:PORT", as an image reference names it
        self.directory = Path()
        self.process: subprocess.Popen[bytes] | None = None
        self.token_server: TokenServer | None = None
        self._auth: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def __enter__(self) -> Registry:
        self.directory = Path(tempfile.mkdtemp(prefix="registry-", dir=self.parent))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        auth_yaml = ""
        if self.credentials is not None:
            self.token_server = TokenServer(
                *self.credentials, service="corral-test-registry", issuer="corral-test-issuer"
            )
            self.token_server.start()
            bundle = self.directory / "token.crt"
            bundle.write_bytes(self.token_server.certificate_pem())
            auth_yaml = _TOKEN_AUTH.format(
                realm=self.token_server.realm,
                service=self.token_server.service,
                issuer=self.token_server.issuer,
                bundle=bundle,
            )
        port = free_port()
        self.host = f"127.0.0.1:{port}"
        config = self.directory / "config.yml"
        config.write_text(
            _CONFIG.format(
                storage=self.directory / "storage",
                port=port,
                secret=secrets.token_hex(16),
                auth=auth_yaml,
            )
        )
        with open(self.directory / "registry.log", "wb") as log:
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v2/", timeout=2).status_code in (200, 401):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.token_server is not None:
            self.token_server.stop()
        if self.directory != Path():
            shutil.rmtree(self.directory, ignore_errors=True)

    def log(self, tail: int = 4000) -> str:
        """The registry's output (its last ``tail`` characters; 0 for all of it)."""
        with contextlib.suppress(OSError):
            return (self.directory / "registry.log").read_text(errors="replace")[-tail:]
        return ""

    def blob_requests(self) -> list[str]:
        """Paths of the blob GETs the registry served so far (from its access log)."""
        found = []
        for line in self.log(tail=0).splitlines():
            if '"GET /v2/' in line and "/blobs/" in line:
                found.append(line.split('"GET ', 1)[1].split(" ", 1)[0])
        return found

    # A minimal pushing client: the same challenge/token dance as a pull, asking for push.
    def _request(
        self, client: httpx.Client, method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        for _ in range(2):
            if "Authorization" in self._auth:
                headers["Authorization"] = self._auth["Authorization"]
            resp = client.request(method, urljoin(self.url, url), headers=headers, **kwargs)
            if resp.status_code != 401 or self.token_server is None or self.credentials is None:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            params = dict(
                part.split("=", 1) for part in challenge.partition(" ")[2].split(",") if "=" in part
            )
            params = {k: v.strip('"') for k, v in params.items()}
            scope = params.get("scope", "")
            if scope and not scope.endswith("push"):
                scope = scope.rsplit(":", 1)[0] + ":pull,push"
            token = client.get(
                params["realm"],
                params={"service": params.get("service", ""), "scope": scope},
                auth=self.credentials,
            ).json()["token"]
            self._auth["Authorization"] = f"Bearer {token}"
        return resp

    def push_blob(self, client: httpx.Client, repo: str, blob: Blob) -> None:
        head = self._request(client, "HEAD", f"/v2/{repo}/blobs/{blob.digest}")
        if head.status_code == 200:
            return
        start = self._request(client, "POST", f"/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, (start.status_code, start.text)
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        put = self._request(
            client,
            "PUT",
            f"{location}{sep}digest={blob.digest}",
            content=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert put.status_code == 201, (put.status_code, put.text)

    def push_manifest(self, client: httpx.Client, repo: str, ref: str, manifest: Blob) -> None:
        resp = self._request(
            client,
            "PUT",
            f"/v2/{repo}/manifests/{ref}",
            content=manifest.data,
            headers={"Content-Type": manifest.media_type},
        )
        assert resp.status_code == 201, (resp.status_code, resp.text)

    def push(self, repo: str, tag: str, image: Image) -> str:
        """Push ``image`` as ``repo:tag``; returns its reference."""
        with httpx.Client(timeout=60) as client:
            for blob in image.blobs:
                self.push_blob(client, repo, blob)
            self.push_manifest(client, repo, tag, image.manifest)
        return f"{self.host}/{repo}:{tag}"

    def push_index(
        self, repo: str, tag: str, images: Sequence[Image], *, docker: bool = False
    ) -> str:
        """Push ``images`` and a manifest list / image index of them as ``repo:tag``."""
        index = build_index(images, docker=docker)
        with httpx.Client(timeout=60) as client:
            for image in images:
                for blob in image.blobs:
                    self.push_blob(client, repo, blob)
                self.push_manifest(client, repo, image.manifest.digest, image.manifest)
            self.push_manifest(client, repo, tag, index)
        return f"{self.host}/{repo}:{tag}"


def running_registry(
    parent: Path | None = None, *, auth: tuple[str, str] | None = None
) -> Registry:
    """``with running_registry() as r:`` — a Registry to start and stop in a ``with``."""
    return Registry(parent, auth=auth)


def random_image(
    registry: Registry,
    repo: str,
    tag: str,
    *,
    total_mb: int = 100,
    layers: int = 4,
    compression: str = "gzip",
) -> str:
    """Push an image of ``layers`` layers holding ``total_mb`` MiB of random (incompressible)
    files, 1 MiB each, to ``registry`` as ``repo:tag``; returns its reference."""
    tars = []
    for n in range(layers):
        count = total_mb // layers + (1 if n < total_mb % layers else 0)
        files: dict[str, bytes | str | None] = {f"data{n}": None}
        files.update({f"data{n}/{i:04d}.bin": os.urandom(1 << 20) for i in range(count)})
        tars.append(layer_tar(files))
    image = build_image(tars, compression, config={"Cmd": ["/bin/sh"]})
    return registry.push(repo, tag, image)
