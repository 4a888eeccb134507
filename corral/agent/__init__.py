"""The in-sandbox agent (C, pid 1 of every sandbox) and its host-side asyncio client."""

from __future__ import annotations

from .archive import download_tar, upload_tar
from .build import agent_binary_path
from .client import (
    AgentClient,
    ExecRequest,
    FileInfo,
    Opener,
    OutputEvent,
    ProcessInfo,
    WatchEvent,
)

__all__ = [
    "AgentClient",
    "ExecRequest",
    "FileInfo",
    "Opener",
    "OutputEvent",
    "ProcessInfo",
    "WatchEvent",
    "agent_binary_path",
    "download_tar",
    "upload_tar",
]
