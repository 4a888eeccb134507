"""The Python SDK: thin clients of the HTTP API in docs/API.md.

``Sandbox`` blocks, ``AsyncSandbox`` awaits; both have the same methods and raise the same
``corral.errors`` classes the server raised.
"""

from __future__ import annotations

from corral.sdk import secrets
from corral.sdk._wire import BuildEventCallback, OnIdle, OnTimeout, network_policy
from corral.sdk.async_sandbox import (
    AsyncClient,
    AsyncFiles,
    AsyncNetwork,
    AsyncProcess,
    AsyncProcesses,
    AsyncPty,
    AsyncSandbox,
)
from corral.sdk.models import (
    BuildEvent,
    EgressEvent,
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecResult,
    ExecStart,
    FileInfo,
    IdentityToken,
    LayerInfo,
    NetworkInfo,
    PoolInfo,
    ProcessInfo,
    SandboxInfo,
    SecretBinding,
    SecretInfo,
    Snapshot,
    TemplateGcResult,
    TemplateInfo,
)
from corral.sdk.sandbox import Client, Files, Network, Process, Processes, Pty, Sandbox
from corral.sdk.secrets import AsyncSecrets
from corral.sdk.template import AsyncTemplate, Template

__all__ = [
    "AsyncClient",
    "AsyncFiles",
    "AsyncNetwork",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncSecrets",
    "AsyncTemplate",
    "BuildEvent",
    "BuildEventCallback",
    "Client",
    "EgressEvent",
    "ExecEvent",
    "ExecExit",
    "ExecOutput",
    "ExecResult",
    "ExecStart",
    "FileInfo",
    "Files",
    "IdentityToken",
    "LayerInfo",
    "Network",
    "NetworkInfo",
    "OnIdle",
    "OnTimeout",
    "PoolInfo",
    "Process",
    "ProcessInfo",
    "Processes",
    "Pty",
    "Sandbox",
    "SandboxInfo",
    "SecretBinding",
    "SecretInfo",
    "Snapshot",
    "Template",
    "TemplateGcResult",
    "TemplateInfo",
    "network_policy",
    "secrets",
]
