"""Typed commands the services accept. The API parses requests straight into these."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from corral.errors import InvalidRequestError

__all__ = [
    "MAX_VALUE_CHARS",
    "SECRET_NAME",
    "CreateKey",
    "CreateSandbox",
    "CreateTenant",
    "ExecCommand",
    "ForkSnapshot",
    "MkdirCommand",
    "PutSecret",
    "RenameCommand",
    "RestoreSnapshot",
    "SecretBinding",
    "SetPool",
    "SetTimeout",
    "SignalCommand",
    "StdinCommand",
    "TakeSnapshot",
    "UpdateNetwork",
    "check_secret_value",
    "validate_sandbox_path",
]

_MAX_PATH = 4096


def validate_sandbox_path(path: str) -> str:
    """Shape check only; confinement to the sandbox root is enforced where the path resolves."""
    if not path.startswith("/"):
        raise ValueError(f"path must be absolute inside the sandbox, got {path!r}")
    if "\0" in path:
        raise ValueError("path must not contain NUL bytes")
    if len(path.encode()) > _MAX_PATH:
        raise ValueError(f"path longer than {_MAX_PATH} bytes")
    return path


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid")


# OAuth's scope-token characters (RFC 6749 3.3): printable ASCII but space, '"' and '\\'.
_Scope = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[!#-\[\]-~]+$")]


# A tenant's secret name: what bindings, the API path and the egress log call it.
SECRET_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME)]
# A request header's name (RFC 9110 token).
_HeaderName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
]


MAX_VALUE_CHARS = 16384
# Values go into request headers: a CR or LF would split one, a NUL ends it early.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_secret_value(value: object) -> str:
    """``value`` if it can be a secret's value (it goes into HTTP headers), else
    ``InvalidRequestError``. The value itself is never part of the message: an error may be
    logged or shown."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"a secret's value must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_VALUE_CHARS:
        raise InvalidRequestError(
            f"a secret's value must be 1 to {MAX_VALUE_CHARS} characters, got {len(value)}"
        )
    if _CONTROL.search(value) is not None:
        raise InvalidRequestError(
            "a secret's value must not contain control characters (CR, LF, NUL, tab, ...): "
            "it is sent in HTTP headers"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidRequestError(
            "a secret's value must be Unicode text (it has a lone surrogate)"
        ) from None
    return value


class PutSecret(_Command):
    """A secret's value; it never leaves the server again except on the wire to a bound host."""

    # Lengths only: the secret service checks the rest (no control characters: values go into
    # request headers), with a message that never repeats the value.
    value: str = Field(min_length=1, max_length=MAX_VALUE_CHARS)


class SecretBinding(_Command):
    """A tenant secret a sandbox may use toward ``hosts``, without ever holding its value.

    The sandbox gets a random placeholder in the environment variable ``env``. On TLS
    connections to ``hosts`` the egress proxy replaces that placeholder wherever it appears in a
    request line or header, and, when ``header`` is set, also sets that header to ``format``
    with ``{value}`` replaced by the real value.
    """

    name: _SecretName
    # DNS names, or ``*.`` followed by at least two labels; checked against the sandbox's
    # network policy at create (the proxy must be allowed to reach them).
    hosts: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] = Field(
        min_length=1, max_length=16
    )
    # Default: the name upper-cased, other characters than [A-Z0-9_] made "_".
    env: str | None = Field(default=None, max_length=128)
    header: _HeaderName | None = None
    format: str = Field(default="{value}", max_length=1024, pattern=r"^[^\x00-\x1f\x7f]*$")

    @field_validator("format")
    @classmethod
    def _has_value(cls, v: str) -> str:
        if "{value}" not in v:
            raise ValueError("format must contain {value}")
        return v


class CreateSandbox(_Command):
    template: str | None = Field(default=None, max_length=128)
    # "container" (namespaces, the default) or "microvm" (a QEMU guest with its own kernel).
    isolation: Literal["container", "microvm"] = "container"
    cpu: float | None = Field(default=None, gt=0)
    # For a microvm, the same as ``cpu`` in whole virtual CPUs.
    vcpus: int | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)
    disk_mb: int | None = Field(default=None, gt=0)
    timeout: int | None = Field(default=None, gt=0, description="seconds until the server kills it")
    env: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict)
    # A ``corral.net.NetworkPolicy`` document; parsed by the network service so that errors
    # name the offending rule. None: deny all.
    network: dict[str, Any] | None = None
    # Ingress to the sandbox's ports without its access token.
    public_ports: bool = False
    # What happens when the timeout is reached: killed, paused (memory kept) or hibernated
    # (only the disk kept); the last two wake on resume.
    on_timeout: Literal["kill", "pause", "hibernate"] = "kill"
    # Seconds with no API activity, no attached exec/terminal and < 5 % CPU, then ``on_idle``.
    idle_timeout: int | None = Field(default=None, gt=0)
    on_idle: Literal["pause", "hibernate", "kill"] = "pause"
    # A paused or hibernated sandbox resumes by itself on any exec, file, process or port
    # request.
    auto_resume: bool = True
    # Start from this snapshot's filesystem (a fork); unset fields default to the settings of
    # the snapshot's source sandbox, and template and disk size are the snapshot's.
    snapshot: str | None = Field(default=None, max_length=128)
    # Put in the sandbox's identity tokens (their ``scopes`` claim) for the services that trust
    # them to decide what it may do; corral itself grants nothing by them.
    scopes: list[_Scope] = Field(default_factory=list, max_length=32)
    # Tenant secrets the egress proxy injects toward their hosts (docs/secrets.md); inside,
    # the sandbox sees only placeholders.
    secrets: list[SecretBinding] = Field(default_factory=list, max_length=16)


_SNAPSHOT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$"


class SetPool(_Command):
    """A warm pool: ``size`` sandboxes of this template and shape kept made in advance; a
    create asking for the same template and shape (and no snapshot) takes one."""

    template: str | None = Field(default=None, max_length=128)
    size: int = Field(ge=0, description="how many to keep ready")
    isolation: Literal["container", "microvm"] = "container"
    cpu: float | None = Field(default=None, gt=0)
    vcpus: int | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)
    disk_mb: int | None = Field(default=None, gt=0)

    def as_create(self) -> CreateSandbox:
        """The create whose sandboxes this pool keeps (validated as any create is)."""
        return CreateSandbox(**self.model_dump(exclude={"size"}))


class TakeSnapshot(_Command):
    # Unique among the sandbox's snapshots; defaults to the snapshot's id.
    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=_SNAPSHOT_NAME)


class RestoreSnapshot(_Command):
    snapshot: str = Field(
        min_length=1, max_length=128, description="snapshot id, or name among the sandbox's"
    )


class ForkSnapshot(_Command):
    count: int = Field(default=1, ge=1, description="how many sandboxes to start")
    timeout: int | None = Field(default=None, gt=0)
    metadata: dict[str, str] | None = None
    env: dict[str, str] | None = None


class UpdateNetwork(_Command):
    """Replace the sandbox's network policy (same document as at create)."""

    policy: dict[str, Any]


class SetTimeout(_Command):
    timeout: int = Field(gt=0, description="seconds from now")


_EnvName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class ExecCommand(_Command):
    cmd: str | list[str]
    cwd: str | None = None
    env: dict[_EnvName, str] = Field(default_factory=dict)
    user: str | None = Field(default=None, max_length=64)
    timeout: float | None = Field(default=None, gt=0)
    stdin: str | None = None
    background: bool = False
    tag: str | None = Field(default=None, max_length=128)

    @field_validator("cmd")
    @classmethod
    def _cmd_not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            if not v.strip():
                raise ValueError("cmd must not be empty")
            if "\0" in v:
                raise ValueError("cmd must not contain NUL bytes")
        else:
            if not v:
                raise ValueError("cmd must not be an empty list")
            if any("\0" in a for a in v):
                raise ValueError("cmd arguments must not contain NUL bytes")
        return v

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, v: str | None) -> str | None:
        return None if v is None else validate_sandbox_path(v)

    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.cmd] if isinstance(self.cmd, str) else list(self.cmd)


class StdinCommand(_Command):
    data: str = Field(default="", description="base64")
    eof: bool = False


class SignalCommand(_Command):
    signal: int = Field(ge=1, le=64)


class MkdirCommand(_Command):
    path: str
    parents: bool = True
    user: str | None = Field(default=None, max_length=64)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return validate_sandbox_path(v)


class RenameCommand(_Command):
    src: str
    dst: str

    @field_validator("src", "dst")
    @classmethod
    def _path(cls, v: str) -> str:
        return validate_sandbox_path(v)


class CreateTenant(_Command):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


class CreateKey(_Command):
    name: str = Field(default="default", min_length=1, max_length=128)
