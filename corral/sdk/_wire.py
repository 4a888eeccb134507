"""The sans-IO half of the SDK, shared by ``Sandbox`` and ``AsyncSandbox`` so they cannot drift.

Everything here is pure: which route and body an operation uses, how an error body or a
transport failure becomes a ``CorralError``, and how an NDJSON exec stream is decoded. The two
client classes only add the I/O (blocking or awaited) around these pieces.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
import websockets.exceptions

from corral.errors import (
    AuthenticationError,
    ConflictError,
    CorralError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    TimeoutError,
    error_from_code,
)
from corral.sdk.models import (
    BuildEvent,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecResult,
    ExecStart,
    SandboxInfo,
    SecretBinding,
    Snapshot,
    TemplateInfo,
)

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "TAR_TYPE",
    "USER_AGENT",
    "WS_MAX_SIZE",
    "BuildEventCallback",
    "BuildWatcher",
    "Call",
    "ExecCollector",
    "Names",
    "NdjsonDecoder",
    "OnIdle",
    "OnTimeout",
    "PolicyLike",
    "PtyState",
    "SecretBindingLike",
    "SnapshotRef",
    "TextCallback",
    "auth_headers",
    "calls",
    "error_from_response",
    "error_from_transport",
    "error_from_ws_open",
    "ingress_token",
    "ingress_url",
    "network_document",
    "network_policy",
    "parse_exec_event",
    "parse_exists",
    "parse_file_count",
    "parse_introspection",
    "parse_list",
    "parse_pid",
    "parse_secret_list",
    "parse_template_ref",
    "pty_params",
    "pty_path",
    "resize_message",
    "secret_bindings",
    "snapshot_ref",
    "ws_headers",
    "ws_url",
]

USER_AGENT: Final = "corral-python/0.1.0"
# Ordinary calls answer quickly; create can take a few seconds. Streams and template builds
# pass read_timeout=None because silence there is normal (a command that prints nothing).
DEFAULT_TIMEOUT: Final = 300.0
CONNECT_TIMEOUT: Final = 10.0
WS_MAX_SIZE: Final = 16 << 20

TextCallback = Callable[[str], object]
# Called with every line of a template build or import stream, the last one included; the
# asyncio client also awaits what it returns.
BuildEventCallback = Callable[[BuildEvent], object]

TAR_TYPE: Final = "application/x-tar"

# What a sandbox's timeout does, and what being idle for ``idle_timeout`` seconds does.
OnTimeout = Literal["kill", "pause", "hibernate"]
OnIdle = Literal["pause", "hibernate", "kill"]

# A snapshot as the SDK accepts it: the object, or its id (restore also takes its name).
SnapshotRef = Snapshot | str

# A secret binding as the SDK accepts it: the dataclass, or the create body's dict as such.
SecretBindingLike = SecretBinding | Mapping[str, Any]


def secret_bindings(bindings: Sequence[SecretBindingLike] | None) -> list[dict[str, Any]]:
    """The create body's ``secrets`` list; the server checks the fields and names bad ones."""
    out: list[dict[str, Any]] = []
    for i, b in enumerate(bindings or ()):
        if isinstance(b, SecretBinding):
            out.append(b.to_json())
        elif isinstance(b, Mapping):
            out.append(dict(b))
        else:
            raise InvalidRequestError(
                f"secrets[{i}]: a binding is a corral.SecretBinding or a mapping with name and "
                f"hosts, not {type(b).__name__}"
            )
    return out


# The template a new sandbox gets when neither a template nor a snapshot is named.
DEFAULT_TEMPLATE: Final = "base"


def snapshot_ref(snapshot: SnapshotRef) -> str:
    """The id (or name) to send for ``snapshot``."""
    if isinstance(snapshot, Snapshot):
        return snapshot.id
    if isinstance(snapshot, str) and snapshot:
        return snapshot
    raise InvalidRequestError(f"{snapshot!r} is not a snapshot, a snapshot id or a name")


@dataclass(frozen=True)
class Call:
    """One HTTP request, described without doing it."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    # Kept out of repr(): it may carry a secret's value (``put_secret``) into a traceback.
    body: Any = field(default=None, repr=False)
    read_timeout: float | None = DEFAULT_TIMEOUT
    # Of a body sent as raw content rather than ``body`` (JSON), e.g. a tar being streamed.
    content_type: str | None = None

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.read_timeout, connect=CONNECT_TIMEOUT)


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}


def ws_headers(api_key: str) -> dict[str, str]:
    # Sent as a header, not ?api_key=: query strings end up in proxy and access logs.
    return {"Authorization": f"Bearer {api_key}"}


def _seg(value: str | int) -> str:
    # Ids come from users; quoting every segment keeps "../x" or "a/b" from changing the route.
    text = str(value)
    if not text:
        raise InvalidRequestError("an empty id was given")
    quoted = quote(text, safe="")
    # "." and ".." survive quoting but URL normalisation would climb the path with them.
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def _sb(sandbox_id: str) -> str:
    return f"/v1/sandboxes/{_seg(sandbox_id)}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _kv_params(name: str, values: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((name, f"{k}={v}") for k, v in (values or {}).items())


class calls:
    """Every route of docs/API.md the SDK uses, as a ``Call``."""

    @staticmethod
    def health() -> Call:
        return Call("GET", "/healthz")

    @staticmethod
    def me() -> Call:
        return Call("GET", "/v1/me")

    @staticmethod
    def create_sandbox(
        template: str | None,
        cpu: float | None,
        memory_mb: int | None,
        disk_mb: int | None,
        timeout: int | None,
        env: Mapping[str, str] | None,
        metadata: Mapping[str, str] | None,
        network: Mapping[str, Any] | None = None,
        public_ports: bool = False,
        on_timeout: OnTimeout | None = None,
        idle_timeout: int | None = None,
        on_idle: OnIdle | None = None,
        auto_resume: bool = True,
        snapshot: SnapshotRef | None = None,
        isolation: str | None = None,
        vcpus: int | None = None,
        scopes: Sequence[str] | None = None,
        secrets: Sequence[SecretBindingLike] | None = None,
    ) -> Call:
        if template is None and snapshot is None:
            template = DEFAULT_TEMPLATE
        body = _drop_none(
            {
                # Omitted with a snapshot: the server then takes the snapshot's template.
                "template": template,
                "snapshot": None if snapshot is None else snapshot_ref(snapshot),
                "isolation": isolation,
                "cpu": cpu,
                "vcpus": vcpus,
                "memory_mb": memory_mb,
                "disk_mb": disk_mb,
                "timeout": timeout,
                "env": None if env is None else dict(env),
                "metadata": None if metadata is None else dict(metadata),
                # Omitted rather than null: the server's default for no policy is deny-all.
                "network": None if network is None else dict(network),
                "public_ports": True if public_ports else None,
                # The lifecycle policy: None leaves the server's default (kill at the timeout,
                # never idle, pause when idle, auto-resume on).
                "on_timeout": on_timeout,
                "idle_timeout": idle_timeout,
                "on_idle": on_idle,
                "auto_resume": None if auto_resume else False,
                "scopes": list(scopes) if scopes else None,
                "secrets": secret_bindings(secrets) or None,
            }
        )
        return Call("POST", "/v1/sandboxes", body=body)

    @staticmethod
    def list_sandboxes(
        state: str | Sequence[str] | None, metadata: Mapping[str, str] | None
    ) -> Call:
        states = [state] if isinstance(state, str) else list(state or [])
        params = tuple(("state", s) for s in states) + _kv_params("metadata", metadata)
        return Call("GET", "/v1/sandboxes", params=params)

    @staticmethod
    def get_sandbox(sandbox_id: str) -> Call:
        return Call("GET", _sb(sandbox_id))

    @staticmethod
    def set_timeout(sandbox_id: str, seconds: int) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/timeout", body={"timeout": seconds})

    @staticmethod
    def pause_sandbox(sandbox_id: str) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/pause")

    @staticmethod
    def hibernate_sandbox(sandbox_id: str) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/hibernate")

    @staticmethod
    def resume_sandbox(sandbox_id: str) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/resume")

    @staticmethod
    def delete_sandbox(sandbox_id: str) -> Call:
        return Call("DELETE", _sb(sandbox_id))

    @staticmethod
    def create_snapshot(sandbox_id: str, name: str | None) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/snapshots", body={"name": name})

    @staticmethod
    def sandbox_snapshots(sandbox_id: str) -> Call:
        return Call("GET", f"{_sb(sandbox_id)}/snapshots")

    @staticmethod
    def restore_sandbox(sandbox_id: str, snapshot: SnapshotRef) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/restore", body={"snapshot": snapshot_ref(snapshot)})

    @staticmethod
    def list_snapshots(sandbox_id: str | None) -> Call:
        params = () if sandbox_id is None else (("sandbox_id", sandbox_id),)
        return Call("GET", "/v1/snapshots", params=params)

    @staticmethod
    def get_snapshot(snapshot: SnapshotRef) -> Call:
        return Call("GET", f"/v1/snapshots/{_seg(snapshot_ref(snapshot))}")

    @staticmethod
    def delete_snapshot(snapshot: SnapshotRef) -> Call:
        return Call("DELETE", f"/v1/snapshots/{_seg(snapshot_ref(snapshot))}")

    @staticmethod
    def fork_snapshot(
        snapshot: SnapshotRef,
        count: int,
        timeout: int | None,
        metadata: Mapping[str, str] | None,
        env: Mapping[str, str] | None,
    ) -> Call:
        body = {
            # Sent as given: the server's answer to a bad count names the limits.
            "count": count,
            "timeout": timeout,
            "metadata": None if metadata is None else dict(metadata),
            "env": None if env is None else dict(env),
        }
        return Call("POST", f"/v1/snapshots/{_seg(snapshot_ref(snapshot))}/fork", body=body)

    @staticmethod
    def mint_token(sandbox_id: str, audience: str, ttl: int | None) -> Call:
        # Sent as given: the server's answer to a bad audience or ttl names the limits.
        body = _drop_none({"audience": audience, "ttl": ttl})
        return Call("POST", f"{_sb(sandbox_id)}/token", body=body)

    @staticmethod
    def introspect_token(token: str, audience: str | None) -> Call:
        body = _drop_none({"token": token, "audience": audience})
        return Call("POST", "/v1/identity/introspect", body=body)

    @staticmethod
    def get_network(sandbox_id: str) -> Call:
        return Call("GET", f"{_sb(sandbox_id)}/network")

    @staticmethod
    def update_network(sandbox_id: str, policy: Mapping[str, Any]) -> Call:
        return Call("PATCH", f"{_sb(sandbox_id)}/network", body=dict(policy))

    @staticmethod
    def network_log(sandbox_id: str, after: int, limit: int) -> Call:
        return Call(
            "GET",
            f"{_sb(sandbox_id)}/network/log",
            params=(("after", str(int(after))), ("limit", str(int(limit)))),
        )

    @staticmethod
    def exec(
        sandbox_id: str,
        cmd: str | Sequence[str],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        user: str | int | None,
        timeout: float | None,
        stdin: str | None,
        background: bool,
        tag: str | None,
    ) -> Call:
        wire_cmd: str | list[str] = cmd if isinstance(cmd, str) else [str(c) for c in cmd]
        body = {
            "cmd": wire_cmd,
            "cwd": cwd,
            "env": dict(env or {}),
            "user": None if user is None else str(user),
            "timeout": timeout,
            "stdin": stdin,
            "background": background,
            "tag": tag,
        }
        return Call(
            "POST",
            f"{_sb(sandbox_id)}/exec",
            body=body,
            read_timeout=DEFAULT_TIMEOUT if background else None,
        )

    @staticmethod
    def list_processes(sandbox_id: str) -> Call:
        return Call("GET", f"{_sb(sandbox_id)}/processes")

    @staticmethod
    def process_output(sandbox_id: str, pid: int, replay: bool = True) -> Call:
        return Call(
            "GET",
            f"{_sb(sandbox_id)}/processes/{_seg(pid)}/output",
            params=(("replay", _bool(replay)),),
            read_timeout=None,
        )

    @staticmethod
    def process_stdin(sandbox_id: str, pid: int, data: str | bytes, eof: bool) -> Call:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        body = {"data": base64.b64encode(raw).decode("ascii"), "eof": eof}
        return Call("POST", f"{_sb(sandbox_id)}/processes/{_seg(pid)}/stdin", body=body)

    @staticmethod
    def process_signal(sandbox_id: str, pid: int, signal: int) -> Call:
        return Call(
            "POST",
            f"{_sb(sandbox_id)}/processes/{_seg(pid)}/signal",
            body={"signal": int(signal)},
        )

    @staticmethod
    def kill_process(sandbox_id: str, pid: int) -> Call:
        return Call("DELETE", f"{_sb(sandbox_id)}/processes/{_seg(pid)}")

    @staticmethod
    def read_file(sandbox_id: str, path: str) -> Call:
        return Call("GET", f"{_sb(sandbox_id)}/files", params=(("path", path),), read_timeout=None)

    @staticmethod
    def write_file(sandbox_id: str, path: str, mode: int | None, user: str | None) -> Call:
        params: tuple[tuple[str, str], ...] = (("path", path),)
        if mode is not None:
            params += (("mode", str(int(mode))),)
        if user is not None:
            params += (("user", user),)
        return Call("PUT", f"{_sb(sandbox_id)}/files", params=params, read_timeout=None)

    @staticmethod
    def list_files(sandbox_id: str, path: str, depth: int) -> Call:
        return Call(
            "GET",
            f"{_sb(sandbox_id)}/files/list",
            params=(("path", path), ("depth", str(int(depth)))),
        )

    @staticmethod
    def stat(sandbox_id: str, path: str) -> Call:
        return Call("GET", f"{_sb(sandbox_id)}/files/stat", params=(("path", path),))

    @staticmethod
    def exists(sandbox_id: str, path: str) -> Call:
        return Call("GET", f"{_sb(sandbox_id)}/files/exists", params=(("path", path),))

    @staticmethod
    def mkdir(sandbox_id: str, path: str, parents: bool, user: str | None) -> Call:
        body = {"path": path, "parents": parents, "user": user}
        return Call("POST", f"{_sb(sandbox_id)}/files/mkdir", body=body)

    @staticmethod
    def remove(sandbox_id: str, path: str, recursive: bool) -> Call:
        return Call(
            "DELETE",
            f"{_sb(sandbox_id)}/files",
            params=(("path", path), ("recursive", _bool(recursive))),
        )

    @staticmethod
    def rename(sandbox_id: str, src: str, dst: str) -> Call:
        return Call("POST", f"{_sb(sandbox_id)}/files/rename", body={"src": src, "dst": dst})

    @staticmethod
    def put_tar(sandbox_id: str, path: str, user: str | None) -> Call:
        params: tuple[tuple[str, str], ...] = (("path", path),)
        if user is not None:
            params += (("user", user),)
        return Call("PUT", f"{_sb(sandbox_id)}/files/tar", params=params, read_timeout=None)

    @staticmethod
    def get_tar(sandbox_id: str, path: str) -> Call:
        return Call(
            "GET", f"{_sb(sandbox_id)}/files/tar", params=(("path", path),), read_timeout=None
        )

    @staticmethod
    def set_pool(
        name: str,
        template: str,
        size: int,
        isolation: str | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        vcpus: int | None = None,
    ) -> Call:
        body = {
            "template": template,
            # Sent as given: the server's answer to a bad size names the limits.
            "size": size,
            # The shape: left out when not given, so the server's create defaults decide it,
            # exactly as they do for a create that is to take from this pool.
            **_drop_none(
                {
                    "isolation": isolation,
                    "cpu": cpu,
                    "vcpus": vcpus,
                    "memory_mb": memory_mb,
                    "disk_mb": disk_mb,
                }
            ),
        }
        return Call("PUT", f"/v1/pools/{_seg(name)}", body=body)

    @staticmethod
    def list_pools() -> Call:
        return Call("GET", "/v1/pools")

    @staticmethod
    def get_pool(name: str) -> Call:
        return Call("GET", f"/v1/pools/{_seg(name)}")

    @staticmethod
    def delete_pool(name: str) -> Call:
        return Call("DELETE", f"/v1/pools/{_seg(name)}")

    @staticmethod
    def put_secret(name: str, value: str) -> Call:
        return Call("PUT", f"/v1/secrets/{_seg(name)}", body={"value": value})

    @staticmethod
    def list_secrets() -> Call:
        return Call("GET", "/v1/secrets")

    @staticmethod
    def get_secret(name: str) -> Call:
        return Call("GET", f"/v1/secrets/{_seg(name)}")

    @staticmethod
    def delete_secret(name: str) -> Call:
        return Call("DELETE", f"/v1/secrets/{_seg(name)}")

    @staticmethod
    def list_templates() -> Call:
        return Call("GET", "/v1/templates")

    @staticmethod
    def build_template(name: str, force: bool) -> Call:
        return Call(
            "POST",
            f"/v1/templates/{_seg(name)}/build",
            params=(("force", _bool(force)),),
            read_timeout=None,
        )

    # Template references (NAME, NAME:TAG, NAME@N) are one quoted segment: ":" and "@" are
    # encoded along with everything else and the server decodes them.
    @staticmethod
    def get_template(ref: str) -> Call:
        return Call("GET", f"/v1/templates/{_seg(ref)}")

    @staticmethod
    def template_versions(name: str) -> Call:
        return Call("GET", f"/v1/templates/{_seg(name)}/versions")

    @staticmethod
    def build_template_dockerfile(
        name: str,
        dockerfile: str,
        *,
        tag: str | None = None,
        build_args: Mapping[str, str] | None = None,
        no_cache: bool = False,
        network: str | None = None,
        ready_cmd: str | None = None,
        ready_timeout: float | None = None,
    ) -> Call:
        params: tuple[tuple[str, str], ...] = (("dockerfile", dockerfile),)
        if tag is not None:
            params += (("tag", tag),)
        params += _kv_params("build_arg", build_args)
        if no_cache:
            params += (("no_cache", "true"),)
        if network is not None:
            params += (("network", network),)
        if ready_cmd is not None:
            params += (("ready_cmd", ready_cmd),)
        if ready_timeout is not None:
            params += (("ready_timeout", str(float(ready_timeout))),)
        return Call(
            "POST",
            f"/v1/templates/{_seg(name)}/builds",
            params=params,
            read_timeout=None,
            content_type=TAR_TYPE,
        )

    @staticmethod
    def import_template_image(
        name: str, image: str, username: str | None, password: str | None, tag: str | None
    ) -> Call:
        body = {"image": image, "username": username, "password": password}
        params = () if tag is None else (("tag", tag),)
        return Call(
            "POST", f"/v1/templates/{_seg(name)}/imports", params, body=body, read_timeout=None
        )

    @staticmethod
    def import_template_archive(name: str, tag: str | None) -> Call:
        params = () if tag is None else (("tag", tag),)
        return Call(
            "POST",
            f"/v1/templates/{_seg(name)}/imports",
            params,
            read_timeout=None,
            content_type=TAR_TYPE,
        )

    @staticmethod
    def tag_template(name: str, tag: str, version: int) -> Call:
        if isinstance(version, bool) or not isinstance(version, int):
            raise InvalidRequestError(f"version {version!r} is not a version number")
        return Call(
            "PUT", f"/v1/templates/{_seg(name)}/tags/{_seg(tag)}", body={"version": version}
        )

    @staticmethod
    def untag_template(name: str, tag: str) -> Call:
        return Call("DELETE", f"/v1/templates/{_seg(name)}/tags/{_seg(tag)}")

    @staticmethod
    def delete_template(ref: str) -> Call:
        return Call("DELETE", f"/v1/templates/{_seg(ref)}")

    @staticmethod
    def gc_templates() -> Call:
        return Call("POST", "/v1/templates/gc")


class _ModelDump(Protocol):
    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


# A policy document as a plain mapping, or a pydantic model of one (the server's NetworkPolicy).
PolicyLike = Mapping[str, Any] | _ModelDump

Names = str | Sequence[str]


def _names(value: Names | None, what: str) -> list[str]:
    # A lone string is one name, not a sequence of one-letter names.
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise InvalidRequestError(f"{what}: {item!r} is not a domain or CIDR string")
    return items


def network_policy(
    preset: str | None = None,
    *,
    allow_domains: Names | None = None,
    allow_cidrs: Names | None = None,
    deny_domains: Names | None = None,
    deny_cidrs: Names | None = None,
    ports: int | str | Sequence[int | str] | None = None,
    egress_mbit: float | None = None,
) -> dict[str, Any]:
    """A network policy document (docs/sdk.md, Networking) from the common cases.

    ``preset`` is ``"none"`` (the default), ``"registries"`` or ``"public"``. Domains are exact
    (``"pypi.org"``) or a wildcard suffix (``"*.github.com"``); CIDRs may be one address.
    ``ports`` (443, ``"8000-8100"`` or a list of them) restricts the allow rules built here;
    deny rules cover every port. The server checks the document and names any bad rule.
    Nothing given: deny all.
    """
    if isinstance(ports, bool):
        raise InvalidRequestError(f"ports: {ports!r} is not a port number or range")
    port_list = None if ports is None else [ports] if isinstance(ports, int | str) else list(ports)
    extra = {} if port_list is None else {"ports": port_list}
    allow = [{"domain": d, **extra} for d in _names(allow_domains, "allow_domains")]
    allow += [{"cidr": c, **extra} for c in _names(allow_cidrs, "allow_cidrs")]
    deny = [{"domain": d} for d in _names(deny_domains, "deny_domains")]
    deny += [{"cidr": c} for c in _names(deny_cidrs, "deny_cidrs")]
    if port_list is not None and not allow:
        raise InvalidRequestError("ports restricts allow_domains/allow_cidrs; none were given")
    doc: dict[str, Any] = {}
    if preset is not None:
        doc["preset"] = preset
    if allow:
        doc["allow"] = allow
    if deny:
        doc["deny"] = deny
    if egress_mbit is not None:
        doc["egress_mbit"] = egress_mbit
    return doc


def _as_document(policy: PolicyLike) -> dict[str, Any]:
    if isinstance(policy, Mapping):
        return dict(policy)
    dump = getattr(policy, "model_dump", None)
    if callable(dump):
        doc = dump(mode="json")
        if isinstance(doc, dict):
            return doc
    raise InvalidRequestError(
        f"a network policy must be a mapping (see corral.network_policy), "
        f"not {type(policy).__name__}"
    )


def network_document(
    policy: PolicyLike | None,
    *,
    preset: str | None = None,
    allow_domains: Names | None = None,
    allow_cidrs: Names | None = None,
    deny_domains: Names | None = None,
    deny_cidrs: Names | None = None,
    ports: int | str | Sequence[int | str] | None = None,
    egress_mbit: float | None = None,
) -> dict[str, Any] | None:
    """The document to send: ``policy`` as given, or one built from the shortcut arguments;
    None when neither was given. Both at once is ambiguous, so refused."""
    shortcuts = {
        "preset": preset,
        "allow_domains": allow_domains,
        "allow_cidrs": allow_cidrs,
        "deny_domains": deny_domains,
        "deny_cidrs": deny_cidrs,
        "ports": ports,
        "egress_mbit": egress_mbit,
    }
    given = [name for name, value in shortcuts.items() if value is not None]
    if policy is not None:
        if given:
            raise InvalidRequestError(
                f"give either a whole policy or {'/'.join(given)}, not both "
                "(build one document with corral.network_policy)"
            )
        return _as_document(policy)
    if not given:
        return None
    return network_policy(
        preset,
        allow_domains=allow_domains,
        allow_cidrs=allow_cidrs,
        deny_domains=deny_domains,
        deny_cidrs=deny_cidrs,
        ports=ports,
        egress_mbit=egress_mbit,
    )


def ingress_token(info: SandboxInfo) -> str | None:
    """The token a request to the sandbox's ports must carry; None when they are public (the
    server may still hold one, but handing it out then would only spread it)."""
    return None if info.public_ports else info.access_token


def ingress_url(
    base_url: str,
    sandbox_id: str,
    port: int,
    path: str = "/",
    *,
    ingress_domain: str | None = None,
    token: str | None = None,
) -> str:
    """The URL of a sandbox port through the server.

    Host form ``{scheme}://{port}-{id}.{ingress_domain}[:{server port}]/path`` when the server
    has an ingress domain (scheme and port of ``base_url``), else the path form
    ``{base_url}/sandboxes/{id}/ports/{port}/path``. ``token`` is appended as ``corral_token``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequestError(f"port {port!r} is not a port number (1-65535)")
    if not isinstance(path, str):
        raise InvalidRequestError(f"path {path!r} is not a string")
    rest, has_fragment, fragment = path.partition("#")
    route, _, query = rest.partition("?")
    # "//x" would otherwise read as a host name to whoever parses the URL.
    route = "/" + route.lstrip("/")
    if token is not None:
        query = (f"{query}&" if query else "") + urlencode({"corral_token": token})
    tail = route + (f"?{query}" if query else "") + (f"#{fragment}" if has_fragment else "")
    if not ingress_domain:
        return f"{base_url.rstrip('/')}/sandboxes/{_seg(sandbox_id)}/ports/{port}{tail}"
    parts = urlsplit(base_url)
    label = f"{port}-{sandbox_id}".lower()
    if not all((c.isascii() and c.isalnum()) or c == "-" for c in label):
        raise InvalidRequestError(f"sandbox id {sandbox_id!r} cannot be part of a host name")
    server_port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{label}.{ingress_domain.strip('.')}{server_port}{tail}"


def pty_path(sandbox_id: str) -> str:
    return f"{_sb(sandbox_id)}/pty"


def _malformed(what: str, obj: object) -> CorralError:
    return CorralError(f"the server answered a malformed {what}: {obj!r:.200}")


def parse_list(obj: object, what: str) -> list[Any]:
    if not isinstance(obj, list):
        raise _malformed(f"{what} list", obj)
    return obj


def parse_pid(obj: object) -> int:
    try:
        return int(obj["pid"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed("process start", obj) from exc


def parse_exists(obj: object) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("exists"), bool):
        raise _malformed("exists answer", obj)
    return bool(obj["exists"])


def parse_introspection(obj: object) -> dict[str, Any]:
    """An RFC 7662 answer: ``{"active": false}``, or ``active`` true with the token's claims."""
    if not isinstance(obj, dict) or not isinstance(obj.get("active"), bool):
        raise _malformed("introspection answer", obj)
    return dict(obj)


def parse_secret_list(obj: object) -> list[Any]:
    """The ``secrets`` list of ``GET /v1/secrets``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("secrets"), list):
        raise _malformed("secret list", obj)
    return list(obj["secrets"])


def parse_file_count(obj: object) -> int:
    try:
        return int(obj["files"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise _malformed("upload answer", obj) from exc


def ws_url(base_url: str, path: str, params: Sequence[tuple[str, str]] = ()) -> str:
    """The WebSocket form of an API route: http→ws, https→wss, same host and path prefix."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode(list(params)), "")
    )


def pty_params(
    cmd: str | None, rows: int, cols: int, user: str | None, cwd: str | None
) -> list[tuple[str, str]]:
    params = [("rows", str(int(rows))), ("cols", str(int(cols)))]
    if cmd is not None:
        params.insert(0, ("cmd", cmd))
    if user is not None:
        params.append(("user", user))
    if cwd is not None:
        params.append(("cwd", cwd))
    return params


# When the body is not the API's error JSON (a proxy in between, a crash page) the status
# still tells the caller which kind of failure it was.
_BY_STATUS: Final[dict[int, type[CorralError]]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: InvalidRequestError,
    429: QuotaExceededError,
    504: TimeoutError,
}


def error_from_response(status: int, body: bytes, url: str) -> CorralError:
    """Turn a non-2xx answer into the same error class the server raised."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            return error_from_code(err["code"], str(err.get("message") or err["code"]))
        # FastAPI's own validation answer, should the server ever let one through.
        if isinstance(parsed.get("detail"), str | list):
            return _BY_STATUS.get(status, CorralError)(f"{parsed['detail']}")
    snippet = body[:300].decode("utf-8", errors="replace").strip()
    cls = _BY_STATUS.get(status, CorralError)
    return cls(f"HTTP {status} from {url}" + (f": {snippet}" if snippet else ""))


def error_from_transport(exc: Exception, base_url: str) -> CorralError:
    """Name the server the client tried to reach; a bare ``ConnectError`` says nothing useful."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return CorralError(f"cannot connect to the corral server at {base_url}: {exc}")
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"the corral server at {base_url} did not answer in time: {exc}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return CorralError(f"the connection to {base_url} broke off: {exc}")
    return CorralError(f"request to the corral server at {base_url} failed: {exc}")


class NdjsonDecoder:
    """Split a byte stream into JSON objects, one a line, whatever the chunk boundaries."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buf += chunk
        *lines, rest = self._buf.split(b"\n")
        self._buf = bytearray(rest)
        return [obj for line in lines if (obj := self._parse(line)) is not None]

    def finish(self) -> list[dict[str, Any]]:
        rest, self._buf = bytes(self._buf), bytearray()
        obj = self._parse(rest)
        return [] if obj is None else [obj]

    @staticmethod
    def _parse(line: bytes | bytearray) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CorralError(f"the server sent a malformed stream line: {line[:200]!r}") from exc
        if not isinstance(obj, dict):
            raise CorralError(f"the server sent a malformed stream event: {obj!r:.200}")
        return obj


def parse_exec_event(obj: Mapping[str, Any]) -> ExecEvent | None:
    """One NDJSON event; an ``error`` event raises its typed error, unknown types are skipped."""
    kind = obj.get("type")
    try:
        if kind == "start":
            return ExecStart(int(obj["pid"]))
        if kind in ("stdout", "stderr"):
            data = base64.b64decode(str(obj.get("data") or ""), validate=True)
            return ExecOutput("stdout" if kind == "stdout" else "stderr", data)
        if kind == "exit":
            return ExecExit(int(obj["exit_code"]))
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise CorralError(f"the server sent a malformed exec event: {dict(obj)!r:.200}") from exc
    if kind == "error":
        code = str(obj.get("code") or "internal")
        raise error_from_code(code, str(obj.get("message") or f"the command failed ({code})"))
    return None


def parse_template_ref(ref: str) -> tuple[str, int | None]:
    """``NAME@N`` as ``(NAME, N)``; any other reference as ``(ref, None)``."""
    name, sep, version = ref.rpartition("@")
    if sep and name and version.isdigit():
        return name, int(version)
    return ref, None


class BuildWatcher:
    """Follow a template build or import stream to its end.

    The stream's last line is ``done`` (its template is the answer) or ``error`` (raised as its
    ``corral.errors`` class). A stream that stops before either was cut off.
    """

    def __init__(self, what: str = "build") -> None:
        self.what = what
        self.template: TemplateInfo | None = None

    def add(self, obj: Mapping[str, Any]) -> BuildEvent:
        """Parse one line and note the template of a ``done``; answer the event."""
        event = BuildEvent.from_json(obj)
        if event.type == "done":
            if event.template is None:
                raise CorralError(
                    f"the server sent a malformed {self.what} end: {dict(obj)!r:.200}"
                )
            self.template = event.template
        return event

    def check(self, event: BuildEvent) -> None:
        """Raise the error an ``error`` event carries (once the caller's callback has seen it)."""
        if event.type == "error":
            code = event.code or "internal"
            message = event.message or f"the template {self.what} failed ({code})"
            raise error_from_code(code, message)

    @property
    def finished(self) -> bool:
        return self.template is not None

    def result(self) -> TemplateInfo:
        if self.template is None:
            raise CorralError(
                f"the template {self.what} stream ended before the {self.what} finished "
                "(connection lost or server restarted)"
            )
        return self.template


class ExecCollector:
    """Accumulate an exec stream into an ``ExecResult`` and the text to hand to callbacks.

    Text for callbacks goes through an incremental decoder per stream, so a multi-byte UTF-8
    character split across two events reaches the callback whole.
    """

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.exit_code: int | None = None
        self._out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._dec = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in self._out
        }

    def add(self, event: ExecEvent) -> tuple[str, str] | None:
        """Record an event; for output, answer ``(stream, text)`` to pass to its callback."""
        if isinstance(event, ExecStart):
            self.pid = event.pid
        elif isinstance(event, ExecExit):
            self.exit_code = event.exit_code
        else:
            self._out[event.stream] += event.data
            text = self._dec[event.stream].decode(event.data)
            if text:
                return event.stream, text
        return None

    def flush(self) -> list[tuple[str, str]]:
        """Text still held by the decoders (an incomplete character at the very end)."""
        tails = [(name, dec.decode(b"", final=True)) for name, dec in self._dec.items()]
        return [(name, text) for name, text in tails if text]

    def result(self) -> ExecResult:
        if self.exit_code is None:
            raise CorralError(
                "the exec stream ended before the command's exit status arrived "
                "(connection lost or server restarted)"
            )
        return ExecResult(
            stdout_bytes=bytes(self._out["stdout"]),
            stderr_bytes=bytes(self._out["stderr"]),
            exit_code=self.exit_code,
            pid=self.pid,
        )


class PtyState:
    """What the PTY socket's text frames said so far: the pid, the exit code, an error."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.error: CorralError | None = None

    @property
    def started(self) -> bool:
        return self.pid is not None or self.exit_code is not None or self.error is not None

    def on_text(self, text: str) -> None:
        try:
            ctl = json.loads(text)
        except ValueError:
            return
        if not isinstance(ctl, dict):
            return
        try:
            if ctl.get("type") == "start":
                self.pid = int(ctl["pid"])
            elif ctl.get("type") == "exit":
                self.exit_code = int(ctl["exit_code"])
            elif ctl.get("type") == "error":
                code = str(ctl.get("code") or "internal")
                self.error = error_from_code(code, str(ctl.get("message") or code))
        except (KeyError, TypeError, ValueError):
            self.error = CorralError(f"the server sent a malformed terminal event: {text:.200}")

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        if self.exit_code is None:
            raise CorralError("the terminal connection closed before its process exited")
        return self.exit_code


def error_from_ws_open(exc: Exception, url: str) -> CorralError:
    """A failed WebSocket handshake: the API's error body if there is one, else the URL."""
    if isinstance(exc, websockets.exceptions.InvalidStatus):
        resp = exc.response
        return error_from_response(resp.status_code, bytes(resp.body or b""), url)
    if isinstance(exc, websockets.exceptions.InvalidURI):
        return InvalidRequestError(f"cannot open a terminal at {url}: {exc}")
    return CorralError(f"cannot open a terminal at {url}: {exc}")


def resize_message(rows: int, cols: int) -> str:
    return json.dumps({"type": "resize", "rows": int(rows), "cols": int(cols)})
