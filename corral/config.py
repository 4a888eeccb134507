"""Server configuration: one strict object, built once and passed in explicitly."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_LISTEN", "Limits", "ServerConfig"]

DEFAULT_DATA_DIR = Path("/var/lib/corral")
DEFAULT_LISTEN = "127.0.0.1:7700"


def _host_cores() -> float:
    return float(os.cpu_count() or 1)


def _host_memory_mb() -> int:
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // (1024 * 1024)


class Limits(BaseModel):
    """Bounds on what one create request may ask for, and on what a tenant may hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_cpu: float = 0.1
    max_cpu: float = Field(default_factory=_host_cores)
    min_memory_mb: int = 64
    max_memory_mb: int = Field(default_factory=_host_memory_mb)
    min_disk_mb: int = 64
    max_disk_mb: int = 1024 * 1024
    max_timeout_s: int = 30 * 24 * 3600
    max_env_entries: int = 128
    max_metadata_entries: int = 64
    max_key_bytes: int = 128
    max_value_bytes: int = 4096
    # A tenant's live (not stopped) sandboxes; the host's own capacity is the runtime's concern.
    max_sandboxes_per_tenant: int = 1000
    pids_per_sandbox: int = 1024


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = DEFAULT_DATA_DIR
    listen: str = DEFAULT_LISTEN
    runtime: str = "container"
    default_template: str = "base"
    default_cpu: float = 1.0
    default_memory_mb: int = 512
    default_disk_mb: int = 2048
    default_timeout_s: int = 300
    # How often the reaper looks for sandboxes past their timeout.
    reap_interval_s: float = 1.0
    limits: Limits = Field(default_factory=Limits)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "corral.db"

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin.key"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)
