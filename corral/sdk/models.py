"""Typed results the SDK hands back, each built from the JSON the API answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from corral.errors import CorralError

__all__ = [
    "ExecEvent",
    "ExecExit",
    "ExecOutput",
    "ExecResult",
    "ExecStart",
    "FileInfo",
    "ProcessInfo",
    "SandboxInfo",
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


@dataclass(frozen=True)
class SandboxInfo:
    id: str
    state: str
    template: str = ""
    tenant_id: str = ""
    cpu: float = 0.0
    memory_mb: int = 0
    disk_mb: int = 0
    timeout: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    env_keys: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    error: str | None = None
    # The object exactly as the server sent it, for --json output and fields newer than this SDK.
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> SandboxInfo:
        d = _obj("sandbox", obj)
        try:
            return cls(
                id=str(d["id"]),
                state=str(d["state"]),
                template=str(d.get("template") or ""),
                tenant_id=str(d.get("tenant_id") or ""),
                cpu=float(d.get("cpu") or 0.0),
                memory_mb=int(d.get("memory_mb") or 0),
                disk_mb=int(d.get("disk_mb") or 0),
                timeout=int(d.get("timeout") or 0),
                metadata=_str_map(d.get("metadata")),
                env_keys=[str(k) for k in d.get("env_keys") or []],
                created_at=_time(d.get("created_at")),
                expires_at=_time(d.get("expires_at")),
                error=None if d.get("error") is None else str(d["error"]),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("sandbox", obj) from exc


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


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    description: str = ""
    built: bool = False
    size_bytes: int | None = None
    built_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> TemplateInfo:
        d = _obj("template", obj)
        try:
            return cls(
                name=str(d["name"]),
                description=str(d.get("description") or ""),
                built=bool(d.get("built")),
                size_bytes=None if d.get("size_bytes") is None else int(d["size_bytes"]),
                built_at=_time(d.get("built_at")),
                raw=dict(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed("template", obj) from exc


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
