"""Server configuration: one strict object, built once and passed in explicitly."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_DATA_DIR",
    "DEFAULT_LISTEN",
    "BuildConfig",
    "E2BConfig",
    "IdentityConfig",
    "Limits",
    "NetworkConfig",
    "ServerConfig",
]

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
    max_snapshots_per_tenant: int = 1000
    max_fork_count: int = 100
    # Sandboxes a tenant's warm pools may keep ready, all pools together (they cost the host
    # memory while nobody uses them; they do not count as live sandboxes until taken).
    max_pooled_per_tenant: int = 100
    pids_per_sandbox: int = 1024


class NetworkConfig(BaseModel):
    """Sandbox networking: addressing, the host-side resolver and proxy, and their names on the host.

    Several servers may share one host (tests do) as long as each has its own ``subnet``,
    ``prefix`` and ``nft_table``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Sandbox addresses; the first host address is the service address (gateway, resolver and
    # proxy). Checked at start against the host's routes: it must not overlap any of them.
    subnet: str = "10.201.0.0/16"
    # Short tag for host objects: interfaces f"{prefix}svc" and f"{prefix}<hash>", netns names
    # f"corral-{prefix}-<sandbox id>".
    prefix: str = "cr"
    nft_table: str = "corral"
    # Resolvers the sandbox resolver and the proxy ask ("ip" or "ip:port"); empty = the host's
    # /etc/resolv.conf.
    dns_upstreams: list[str] = Field(default_factory=list)
    dns_port: int = 53
    proxy_port: int = 3128
    # The metadata endpoint (identity token, sandbox id, labels) that sandboxes reach at
    # 169.254.169.254:80 is served on the service address at this port (OpenStack's metadata
    # port); None: no metadata endpoint, and 169.254.169.254 stays unreachable like the rest of
    # link-local space.
    metadata_port: int | None = Field(default=8775, ge=1, le=65535)
    # Per-sandbox egress rate limit when the policy sets none; 0 = unlimited.
    default_egress_mbit: float = 1000.0
    max_egress_mbit: float = 100000.0
    # Host form of ingress URLs: "{port}-{sandbox}.{ingress_domain}" (None: path form only).
    ingress_domain: str | None = None
    # NFLOG group the firewall logs UDP/ICMP decisions to (0: none); one per server on a host.
    nflog_group: int = Field(default=7301, ge=0, le=65535)
    # Connections (conntrack entries) one sandbox may have at once; beyond, new ones are refused.
    max_flows_per_sandbox: int = Field(default=4096, ge=16, le=1_000_000)
    # Where the proxy sends a sandbox's secrets it verifies the server against the host's trust
    # store plus, when set, the CA certificates in this PEM file (a private PKI; tests).
    upstream_ca_file: Path | None = None

    @field_validator("subnet")
    @classmethod
    def _subnet(cls, v: str) -> str:
        net = ipaddress.IPv4Network(v, strict=True)
        if net.prefixlen > 28:
            raise ValueError(f"subnet {v} is too small (at most /28)")
        return str(net)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", v):
            raise ValueError(
                "prefix must be 1 to 4 lowercase letters or digits, starting with a letter"
            )
        return v

    @field_validator("nft_table")
    @classmethod
    def _table(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", v):
            raise ValueError("nft_table must be a plain identifier of at most 32 characters")
        return v

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def service_ip(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1


class BuildConfig(BaseModel):
    """Template builds and imports (docs/templates.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Registries spoken to over plain HTTP (host:port), like Docker's insecure-registries.
    insecure_registries: tuple[str, ...] = ()
    # Registries (host:port) on private, loopback or link-local addresses that tenants may
    # import from; any other such registry is for admin keys only (the server must not become
    # a way into its own network). Insecure ones count as listed.
    private_registries: tuple[str, ...] = ()
    # Each RUN step's sandbox: the same isolation as any sandbox, a bigger disk.
    cpu: float = 2.0
    memory_mb: int = 2048
    disk_mb: int = 8192
    # A RUN step still running after this long fails the build.
    step_timeout_s: float = 3600.0
    # A build context (the uploaded tar) larger than this is refused.
    max_context_mb: int = 2048


class E2BConfig(BaseModel):
    """The E2B-compatible API (docs/e2b.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The tier of sandboxes created through it: E2B's API has no way to ask for one.
    isolation: Literal["container", "microvm"] = "container"


# A sandbox identity token lives at most this long (issue 8): whatever config says.
MAX_IDENTITY_TOKEN_TTL_S = 3600


class IdentityConfig(BaseModel):
    """Sandbox identity tokens: signed JWTs external services verify with the JWKS
    (docs/identity.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The tokens' ``iss`` and the base of the JWKS and discovery URLs, as verifiers reach this
    # server (e.g. "https://corral.example.com"); None: "http://<listen>".
    issuer: str | None = None
    # Lifetime of a token when the request names none.
    token_ttl_s: int = Field(default=900, ge=1)
    # The longest lifetime a request may ask for (at most one hour).
    max_token_ttl_s: int = Field(default=MAX_IDENTITY_TOKEN_TTL_S, ge=1)
    # The current signing key signs this long, then a new one takes over (the old one stays
    # published until every token it signed has expired).
    rotate_after_s: int = Field(default=24 * 3600, ge=1)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v):
            raise ValueError(
                "issuer must be an http(s) URL without query or fragment, "
                f"e.g. https://corral.example.com; got {v!r}"
            )
        return v.rstrip("/")

    @field_validator("max_token_ttl_s")
    @classmethod
    def _max_ttl(cls, v: int) -> int:
        if v > MAX_IDENTITY_TOKEN_TTL_S:
            raise ValueError(f"max_token_ttl_s must be at most {MAX_IDENTITY_TOKEN_TTL_S}, got {v}")
        return v

    @model_validator(mode="after")
    def _ttl_within_max(self) -> IdentityConfig:
        if self.token_ttl_s > self.max_token_ttl_s:
            raise ValueError(
                f"token_ttl_s ({self.token_ttl_s}) must not exceed max_token_ttl_s "
                f"({self.max_token_ttl_s})"
            )
        return self

    def issuer_for(self, listen: str) -> str:
        """The issuer in force for a server listening on ``listen``."""
        return self.issuer if self.issuer is not None else f"http://{listen}"


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
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    builds: BuildConfig = Field(default_factory=BuildConfig)
    e2b: E2BConfig = Field(default_factory=E2BConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)

    @classmethod
    def load(cls, path: Path | None, **overrides: object) -> ServerConfig:
        """From a TOML or JSON file (None: defaults), with ``overrides`` (e.g. from flags) on top.

        Unknown keys are an error, as everywhere in the config.
        """
        data: dict[str, object] = {}
        if path is not None:
            text = Path(path).read_text()
            data = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)

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
