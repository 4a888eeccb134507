"""One error tree for the whole of corral.

Services raise these; only the API layer maps them to HTTP status codes, and the SDK maps the
JSON error body back to the same classes, so a caller catches the same type on both sides.
Foreign errors (runc, the kernel, subprocesses) are translated into ``RuntimeFailure`` at the
runtime boundary and never leak upwards as ``OSError`` or ``CalledProcessError``.
"""

from __future__ import annotations

import builtins
from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "CorralError",
    "InvalidRequestError",
    "NotFoundError",
    "PermissionDeniedError",
    "PortUnreachableError",
    "QuotaExceededError",
    "RuntimeFailure",
    "SandboxNotRunningError",
    "SnapshotUnusableError",
    "TimeoutError",
    "UpstreamError",
    "error_from_code",
]


class CorralError(Exception):
    """Base of every error corral raises on purpose."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(CorralError):
    """The request cannot be carried out as written; the message says what to fix."""

    code = "invalid_request"
    status = 400


class AuthenticationError(CorralError):
    code = "unauthenticated"
    status = 401


class PermissionDeniedError(CorralError):
    code = "permission_denied"
    status = 403


class NotFoundError(CorralError):
    code = "not_found"
    status = 404


class ConflictError(CorralError):
    code = "conflict"
    status = 409


class SandboxNotRunningError(ConflictError):
    code = "sandbox_not_running"
    status = 409


class SnapshotUnusableError(ConflictError):
    """The snapshot exists but its saved state cannot be loaded (damaged, or of another
    machine shape); nothing was started from it."""

    code = "snapshot_unusable"
    status = 409


class QuotaExceededError(CorralError):
    code = "quota_exceeded"
    status = 429


class TimeoutError(CorralError, builtins.TimeoutError):
    code = "timeout"
    status = 504


class PortUnreachableError(CorralError):
    """Nothing usable answers on a sandbox's port (ingress): refused, reset, or not HTTP."""

    code = "port_unreachable"
    status = 502  # Bad Gateway: the server is fine, the sandbox's side is not


class UpstreamError(CorralError):
    """A service outside corral that a request needs (an image registry) failed or refused us;
    the message names it and what it answered."""

    code = "upstream_error"
    status = 502


class RuntimeFailure(CorralError):
    """The isolation layer (OCI runtime, kernel, QEMU) failed; the message carries its words."""

    code = "runtime_failure"
    status = 500


_BY_CODE: dict[str, type[CorralError]] = {
    cls.code: cls
    for cls in (
        CorralError,
        InvalidRequestError,
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        ConflictError,
        SandboxNotRunningError,
        SnapshotUnusableError,
        QuotaExceededError,
        TimeoutError,
        PortUnreachableError,
        UpstreamError,
        RuntimeFailure,
    )
}


def error_from_code(code: str, message: str) -> CorralError:
    """Rebuild the typed error from its wire form (used by the SDK)."""
    return _BY_CODE.get(code, CorralError)(message)
