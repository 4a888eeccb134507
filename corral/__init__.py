"""corral: self-hosted sandboxes for AI agents.

``from corral import Sandbox`` is the SDK. The SDK classes load on first use, so server code
importing ``corral.errors`` or ``corral.core`` does not pull in the HTTP client libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corral import errors

if TYPE_CHECKING:
    from corral.sdk import (
        AsyncClient,
        AsyncProcess,
        AsyncPty,
        AsyncSandbox,
        AsyncSecrets,
        AsyncTemplate,
        BuildEvent,
        Client,
        EgressEvent,
        ExecResult,
        FileInfo,
        IdentityToken,
        LayerInfo,
        NetworkInfo,
        PoolInfo,
        Process,
        ProcessInfo,
        Pty,
        Sandbox,
        SandboxInfo,
        SecretBinding,
        SecretInfo,
        Snapshot,
        Template,
        TemplateGcResult,
        TemplateInfo,
        network_policy,
        secrets,
    )

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncProcess",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncSecrets",
    "AsyncTemplate",
    "BuildEvent",
    "Client",
    "EgressEvent",
    "ExecResult",
    "FileInfo",
    "IdentityToken",
    "LayerInfo",
    "NetworkInfo",
    "PoolInfo",
    "Process",
    "ProcessInfo",
    "Pty",
    "Sandbox",
    "SandboxInfo",
    "SecretBinding",
    "SecretInfo",
    "Snapshot",
    "Template",
    "TemplateGcResult",
    "TemplateInfo",
    "__version__",
    "errors",
    "network_policy",
    "secrets",
]

_LAZY = frozenset(__all__) - {"__version__", "errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module("corral.sdk"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
