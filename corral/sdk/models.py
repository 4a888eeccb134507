"""Typed results the SDK hands back, each built from the JSON the API answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from corral.errors import CorralError

__all__ = [
    "BuildEvent",
    "EgressEvent",
    "ExecEvent",
    "ExecExit",
    "ExecOutput",
    "ExecResult",
    "ExecStart",
    "FileInfo",
    "IdentityToken",
    "LayerInfo",
    "NetworkInfo",
    "PoolInfo",
    "ProcessInfo",
    "SandboxInfo",
    "SecretBinding",
    "SecretInfo",
    "Snapshot",
    "TemplateGcResult",
    "TemplateInfo",
]


def _malformed(what: str, obj: object) -> CorralError:
    return CorralError(f"the server answered a malformed {what}: {obj!r:.200}")


def _obj(what: str, obj: object) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise _malformed(what, obj)
    return obj


def _time(value: object) -> datetime | None:
    """Accept ISO-8601 strings (``Z`` included) and epoch seconds; the API uses both styles."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class NetworkInfo:
    """A sandbox's network: its address, the policy in force, and the explicit proxy."""

    address: str | None
    # The policy document as the server stores it (defaults filled in), see ``network_policy``.
    policy: dict[str, Any]
    # An HTTP(S) proxy URL for tools that want one; traffic is filtered with or without it.
    proxy: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> NetworkInfo:
        d = _obj("network", obj)
        policy = d.get("policy")
        if not isinstance(policy, Mapping):
            raise _malformed("network", obj)
        return cls(
            address=_opt_str(d.get("address")),
            policy=dict(policy),
            proxy=_opt_str(d.get("proxy")),
            raw=dict(d),
        )


@dataclass(frozen=True)
class IdentityToken:
    """A signed identity token of a sandbox for one audience (docs/identity.md): a JWT that
    service verifies with the server's public keys alone."""

    # The JWT; a bearer credential, so kept out of repr() (and the logs that print one).
    token: str = field(repr=False)
    expires_at: datetime
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> IdentityToken:
        d = _obj("identity token", obj)
        token, expires_at = d.get("token"), _time(d.get("expires_at"))
        if not isinstance(token, str) or not token or expires_at is None:
            raise _malformed("identity token", obj)
        return cls(token=token, expires_at=expires_at, raw=dict(d))


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    state: str
    template: str = ""
    tenant_id: str = ""
    # The isolation tier: "container" or "microvm".
    isolation: str = "container"
    cpu: float = 0.0
    memory_mb: int = 0
    disk_mb: int = 0
    timeout: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    env_keys: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    error: str | None = None
    # The sandbox's address inside the corral subnet (None: created without a network).
    address: str | None = None
    # The network policy document in force (None: the server has networking disabled).
    network: dict[str, Any] | None = None
    # Presented to reach the sandbox's ports through the server; None when they are public.
    access_token: str | None = None
    public_ports: bool = False
    # Set when the server also serves ports as "{port}-{id}.{ingress_domain}".
    ingress_domain: str | None = None
    # When it was paused (None unless state is "paused"); ``expires_at`` is None meanwhile,
    # because the timeout clock stands still while paused.
    paused_at: datetime | None = None
    # What the timeout does: "kill" (the default) or "pause".
    on_timeout: str = "kill"
    # Seconds without use before ``on_idle`` ("pause" or "kill") happens; None: never idle.
    idle_timeout: int | None = None
    on_idle: str = "pause"
    # Whether an exec, file, process or port request resumes a paused sandbox by itself.
    auto_resume: bool = True
    # The warm pool it was taken from (see ``Client.set_pool``); None: started on demand.
    pool: str | None = None
    # Its secret bindings as the server shows them: ``{"name", "hosts", "env", "header",
    # "placeholder"}`` each; placeholders only, never a value (docs/secrets.md).
    secrets: list[dict[str, Any]] = field(default_factory=list)
    # The object exactly as the server sent it, for --json output and fields newer than this SDK.
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> SandboxInfo:
        d = _obj("sandbox", obj)
        try:
            net = None if d.get("network") is None else NetworkInfo.from_json(d["network"])
            return cls(
                id=str(d["id"]),
                state=str(d["state"]),
                template=str(d.get("template") or ""),
                tenant_id=str(d.get("tenant_id") or ""),
                isolation=str(d.get("runtime") or "container"),
                cpu=float(d.get("cpu") or 0.0),
                memory_mb=int(d.get("memory_mb") or 0),
                disk_mb=int(d.get("disk_mb") or 0),
                timeout=int(d.get("timeout") or 0),
                metadata=_str_map(d.get("metadata")),
                env_keys=[str(k) for k in d.get("env_keys") or []],
                created_at=_time(d.get("created_at")),
                expires_at=_time(d.get("expires_at")),
                error=None if d.get("error") is None else str(d["error"]),
                address=None if net is None else net.address,
                network=None if net is None else net.policy,
                access_token=_opt_str(d.get("access_token")),
                public_ports=bool(d.get("public_ports")),
                ingress_domain=_opt_str(d.get("ingress_domain")) or None,
                paused_at=_time(d.get("paused_at")),
                on_timeout=str(d.get("on_timeout") or "kill"),
                idle_timeout=None if d.get("idle_timeout") is None else int(d["idle_timeout"]),
                on_idle=str(d.get("on_idle") or "pause"),
                # Absent only from servers older than pause/resume: the default then.
                auto_resume=bool(d.get("auto_resume", True)),
                # Absent from servers older than warm pools: started on demand then.
                pool=_opt_str(d.get("pool")),
                # Absent from servers older than secrets: none then.
                secrets=[dict(b) for b in d.get("secrets") or [] if isinstance(b, Mapping)],
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("sandbox", obj) from exc

    @property
    def paused(self) -> bool:
        return self.state == "paused"


@dataclass(frozen=True)
class SecretInfo:
    """A tenant secret as the server describes it: its name and times, never its value."""

    name: str
    created_at: datetime
    updated_at: datetime
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> SecretInfo:
        d = _obj("secret", obj)
        created_at, updated_at = _time(d.get("created_at")), _time(d.get("updated_at"))
        name = d.get("name")
        if not isinstance(name, str) or not name or created_at is None or updated_at is None:
            raise _malformed("secret", obj)
        return cls(name=name, created_at=created_at, updated_at=updated_at, raw=dict(d))


@dataclass(frozen=True)
class SecretBinding:
    """A tenant secret a new sandbox may use toward ``hosts`` without ever holding its value
    (``Sandbox.create(secrets=[...])``, docs/secrets.md).

    Inside, the sandbox sees a placeholder in the environment variable ``env`` (default: the
    name upper-cased, other characters than A-Z, 0-9 and _ made _). On connections to ``hosts``
    the egress proxy swaps the placeholder for the value wherever it appears in a request's
    headers, and, when ``header`` is set, sets that header to ``format`` with ``{value}``
    replaced (``header="Authorization", format="Bearer {value}"``).
    """

    name: str
    # DNS names, or "*." and a domain; a lone string is one host.
    hosts: Sequence[str] | str
    env: str | None = None
    header: str | None = None
    format: str = "{value}"

    def to_json(self) -> dict[str, Any]:
        """The binding as a create request's ``secrets`` list carries it; the server checks
        every field and names the one that is wrong."""
        hosts = [self.hosts] if isinstance(self.hosts, str) else list(self.hosts)
        out: dict[str, Any] = {"name": self.name, "hosts": hosts}
        if self.env is not None:
            out["env"] = self.env
        if self.header is not None:
            out["header"] = self.header
        if self.format != "{value}":
            out["format"] = self.format
        return out


@dataclass(frozen=True)
class Snapshot:
    """A saved copy of a sandbox's disk; it outlives the sandbox until deleted."""

    id: str
    name: str
    # The sandbox it was taken from (which may be gone by now).
    sandbox_id: str
    template: str
    disk_mb: int
    # Bytes in use on the snapshot's disk, not what it costs the host (copies share blocks).
    size_bytes: int
    created_at: datetime
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> Snapshot:
        d = _obj("snapshot", obj)
        try:
            created_at = _time(d["created_at"])
            if created_at is None:
                raise ValueError("created_at is not a time")
            return cls(
                id=str(d["id"]),
                name=str(d.get("name") or d["id"]),
                sandbox_id=str(d["sandbox_id"]),
                template=str(d.get("template") or ""),
                disk_mb=int(d.get("disk_mb") or 0),
                size_bytes=int(d.get("size_bytes") or 0),
                created_at=created_at,
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("snapshot", obj) from exc


@dataclass(frozen=True)
class PoolInfo:
    """A warm pool: ``size`` sandboxes of one template and shape kept made in advance, so a
    create asking for that template and shape (and no snapshot) takes one instead of waiting."""

    name: str
    template: str
    # The shape a create must ask for (defaults resolved by the server) to take from the pool.
    isolation: str
    cpu: float
    memory_mb: int
    disk_mb: int
    # How many it keeps ready, and how many are ready now (fewer while it refills).
    size: int
    ready: int
    created_at: datetime
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> PoolInfo:
        d = _obj("pool", obj)
        try:
            created_at = _time(d["created_at"])
            if created_at is None:
                raise ValueError("created_at is not a time")
            return cls(
                name=str(d["name"]),
                template=str(d["template"]),
                isolation=str(d.get("isolation") or "container"),
                cpu=float(d.get("cpu") or 0.0),
                memory_mb=int(d.get("memory_mb") or 0),
                disk_mb=int(d.get("disk_mb") or 0),
                size=int(d["size"]),
                ready=int(d["ready"]),
                created_at=created_at,
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("pool", obj) from exc


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    cmd: list[str]
    running: bool
    exit_code: int | None = None
    cwd: str | None = None
    user: str | None = None
    tag: str | None = None
    pty: bool = False
    started_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> ProcessInfo:
        d = _obj("process", obj)
        try:
            cmd = d.get("cmd") or []
            return cls(
                pid=int(d["pid"]),
                cmd=[cmd] if isinstance(cmd, str) else [str(c) for c in cmd],
                running=bool(d.get("running")),
                exit_code=None if d.get("exit_code") is None else int(d["exit_code"]),
                cwd=None if d.get("cwd") is None else str(d["cwd"]),
                user=None if d.get("user") is None else str(d["user"]),
                tag=None if d.get("tag") is None else str(d["tag"]),
                pty=bool(d.get("pty")),
                started_at=_time(d.get("started_at")),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("process", obj) from exc


@dataclass(frozen=True)
class FileInfo:
    name: str
    path: str
    type: str
    size: int = 0
    mode: int = 0
    mtime: datetime | None = None
    uid: int = 0
    gid: int = 0
    link_target: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @classmethod
    def from_json(cls, obj: object) -> FileInfo:
        d = _obj("file info", obj)
        try:
            path = str(d["path"])
            return cls(
                name=str(d.get("name") or path.rstrip("/").rsplit("/", 1)[-1]),
                path=path,
                type=str(d.get("type") or "other"),
                size=int(d.get("size") or 0),
                mode=int(d.get("mode") or 0),
                mtime=_time(d.get("mtime")),
                uid=int(d.get("uid") or 0),
                gid=int(d.get("gid") or 0),
                link_target=None if d.get("link_target") is None else str(d["link_target"]),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("file info", obj) from exc


def _opt_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _opt_float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _argv(value: object) -> tuple[str, ...] | None:
    """A command as the server stores it: an argv list (a lone string is one shell command)."""
    if value is None:
        return None
    if isinstance(value, str):
        return ("/bin/sh", "-c", value)
    if not isinstance(value, list | tuple):
        raise ValueError(f"{value!r} is not a command")
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class LayerInfo:
    """One read-only layer of a template version, lowest first in ``TemplateInfo.layers``."""

    # "sha256:<hex>": the hash of the layer's uncompressed tar, shared by every template using it.
    digest: str
    size_bytes: int = 0

    @classmethod
    def from_json(cls, obj: object) -> LayerInfo:
        d = _obj("layer", obj)
        try:
            return cls(digest=str(d["digest"]), size_bytes=int(d.get("size_bytes") or 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("layer", obj) from exc


@dataclass(frozen=True)
class TemplateInfo:
    """A template version: its layers and the image config sandboxes made from it start with.

    Servers older than Dockerfile builds send only name, description, built, size and build
    time (they have only the built-ins); the other fields then keep their defaults.
    """

    name: str
    description: str = ""
    built: bool = False
    size_bytes: int | None = None
    built_at: datetime | None = None
    # 1, 2, 3... per name; None from old servers.
    version: int | None = None
    # The tags pointing at this version ("latest" follows each new one unless told otherwise).
    tags: tuple[str, ...] = ()
    builtin: bool = False
    # "dockerfile", "image", "archive" or "builtin".
    source: str = "builtin"
    # The image reference it was imported from (source "image").
    image: str | None = None
    layers: tuple[LayerInfo, ...] = ()
    # Started in every new sandbox; create answers once ``ready_cmd`` exits 0 (or fails after
    # ``ready_timeout`` seconds).
    start_cmd: tuple[str, ...] | None = None
    ready_cmd: tuple[str, ...] | None = None
    ready_timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ref(self) -> str:
        """``NAME@VERSION`` (just the name when the server gave no version): names this exact
        version for ``Template.get``, a create or a ``FROM``, whatever the tags do later."""
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @classmethod
    def from_json(cls, obj: object) -> TemplateInfo:
        d = _obj("template", obj)
        try:
            source = str(d.get("source") or "builtin")
            return cls(
                name=str(d["name"]),
                description=str(d.get("description") or ""),
                built=bool(d.get("built")),
                size_bytes=_opt_int(d.get("size_bytes")),
                built_at=_time(d.get("built_at")),
                version=_opt_int(d.get("version")),
                tags=tuple(str(t) for t in d.get("tags") or ()),
                # Old servers know only the built-ins, and say nothing of it.
                builtin=bool(d.get("builtin", source == "builtin")),
                source=source,
                image=_opt_str(d.get("image")),
                layers=tuple(LayerInfo.from_json(layer) for layer in d.get("layers") or ()),
                start_cmd=_argv(d.get("start_cmd")),
                ready_cmd=_argv(d.get("ready_cmd")),
                ready_timeout=_opt_float(d.get("ready_timeout")),
                env=_str_map(d.get("env")),
                workdir=_opt_str(d.get("workdir")),
                user=_opt_str(d.get("user")),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("template", obj) from exc


@dataclass(frozen=True)
class TemplateGcResult:
    """What ``Template.gc`` freed: layers no template version, snapshot or sandbox used."""

    layers_removed: int
    bytes_freed: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> TemplateGcResult:
        d = _obj("template gc answer", obj)
        try:
            return cls(
                layers_removed=int(d.get("layers_removed") or 0),
                bytes_freed=int(d.get("bytes_freed") or 0),
                raw=dict(d),
            )
        except (TypeError, ValueError) as exc:
            raise _malformed("template gc answer", obj) from exc


@dataclass(frozen=True)
class BuildEvent:
    """One line of a template build or import stream.

    ``type`` says which fields are set: ``"step"`` (``stage``, ``step`` of ``of``, Dockerfile
    ``line``, ``instruction``, ``cached``), ``"output"`` (``stream``, ``data``: a RUN's text),
    ``"progress"`` (``layer``, ``bytes`` of ``total``: an import's download), ``"done"``
    (``template``, ``seconds``) and ``"error"`` (``code``, ``message``). Types this SDK does not
    know come through with only ``type`` and ``raw``.
    """

    type: str
    stage: int | None = None
    step: int | None = None
    of: int | None = None
    line: int | None = None
    instruction: str | None = None
    cached: bool = False
    stream: str | None = None
    data: str = ""
    layer: str | None = None
    total: int | None = None
    template: TemplateInfo | None = None
    seconds: float | None = None
    code: str | None = None
    message: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Last: inside the class body the name shadows the builtin type for what follows.
    bytes: int | None = None

    @classmethod
    def from_json(cls, obj: object) -> BuildEvent:
        d = _obj("build event", obj)
        try:
            template = d.get("template")
            return cls(
                type=str(d["type"]),
                stage=_opt_int(d.get("stage")),
                step=_opt_int(d.get("step")),
                of=_opt_int(d.get("of")),
                line=_opt_int(d.get("line")),
                instruction=_opt_str(d.get("instruction")),
                cached=bool(d.get("cached")),
                stream=_opt_str(d.get("stream")),
                data=str(d.get("data") or ""),
                layer=_opt_str(d.get("layer")),
                total=_opt_int(d.get("total")),
                template=None if template is None else TemplateInfo.from_json(template),
                seconds=_opt_float(d.get("seconds")),
                code=_opt_str(d.get("code")),
                message=_opt_str(d.get("message")),
                raw=dict(d),
                bytes=_opt_int(d.get("bytes")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("build event", obj) from exc


@dataclass(frozen=True)
class EgressEvent:
    """One decision about traffic leaving a sandbox: a DNS query or a connection."""

    id: int  # increasing; pass the last one seen as ``after`` to get only newer events
    time: datetime | None
    kind: str  # "dns", "tcp", "udp" or "icmp"
    decision: str  # "allow" or "deny"
    reason: str  # which rule decided, or why nothing could allow it
    name: str | None = None  # the DNS name, TLS SNI or HTTP Host, when there is one
    ip: str | None = None
    port: int | None = None
    bytes_out: int = 0  # sandbox -> world
    bytes_in: int = 0  # world -> sandbox
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"

    @classmethod
    def from_json(cls, obj: object) -> EgressEvent:
        d = _obj("egress event", obj)
        try:
            return cls(
                id=int(d["id"]),
                time=_time(d.get("time")),
                kind=str(d.get("kind") or ""),
                decision=str(d.get("decision") or ""),
                reason=str(d.get("reason") or ""),
                name=_opt_str(d.get("name")),
                ip=_opt_str(d.get("ip")),
                port=None if d.get("port") is None else int(d["port"]),
                bytes_out=int(d.get("bytes_out") or 0),
                bytes_in=int(d.get("bytes_in") or 0),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("egress event", obj) from exc


@dataclass(frozen=True)
class ExecResult:
    """What a finished command produced; text is UTF-8 decoded with replacement characters."""

    stdout_bytes: bytes
    stderr_bytes: bytes
    exit_code: int
    pid: int | None = None

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class ExecStart:
    pid: int


@dataclass(frozen=True)
class ExecOutput:
    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class ExecExit:
    exit_code: int


ExecEvent = ExecStart | ExecOutput | ExecExit
