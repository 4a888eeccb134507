"""The Python SDK: thin clients of the HTTP API in docs/API.md.

``Sandbox`` blocks, ``AsyncSandbox`` awaits; both have the same methods and raise the same
``corral.errors`` classes the server raised.
"""

from __future__ import annotations

from corral.sdk.async_sandbox import (
    AsyncClient,
    AsyncFiles,
    AsyncProcess,
    AsyncProcesses,
    AsyncPty,
    AsyncSandbox,
)
from corral.sdk.models import (
    ExecEvent,
    ExecExit,
    ExecOutput,
    ExecResult,
    ExecStart,
    FileInfo,
    ProcessInfo,
    SandboxInfo,
    TemplateInfo,
)
from corral.sdk.sandbox import Client, Files, Process, Processes, Pty, Sandbox

__all__ = [
    "AsyncClient",
    "AsyncFiles",
    "AsyncProcess",
    "AsyncProcesses",
    "AsyncPty",
    "AsyncSandbox",
    "Client",
    "ExecEvent",
    "ExecExit",
    "ExecOutput",
    "ExecResult",
    "ExecStart",
    "FileInfo",
    "Files",
    "Process",
    "ProcessInfo",
    "Processes",
    "Pty",
    "Sandbox",
    "SandboxInfo",
    "TemplateInfo",
]
