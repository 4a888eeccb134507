"""Wires the services of one server together; the API holds exactly one of these."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from corral.config import ServerConfig
from corral.core.bindings import SecretBinder
from corral.core.builds import BuildService
from corral.core.envd import EnvdService
from corral.core.files import FileService
from corral.core.identity import IdentityService
from corral.core.lifecycle import LIVE_STATES
from corral.core.metrics import MetricsService
from corral.core.network import NetworkService
from corral.core.pools import PoolService
from corral.core.processes import ProcessService
from corral.core.sandboxes import SandboxService
from corral.core.secrets import SecretService
from corral.core.snapshots import SnapshotService
from corral.core.templates import TemplateService
from corral.core.tenants import TenantService
from corral.errors import InvalidRequestError, SandboxNotRunningError
from corral.net.metadata import Labels, Mint
from corral.runtime.base import Runtime
from corral.store import Store

__all__ = ["Services", "build_runtime"]

log = logging.getLogger("corral.server")


def build_runtime(config: ServerConfig) -> Runtime:
    """Every isolation tier this server offers, behind one router; ``config.runtime`` is the
    default. Imported lazily: each pulls in its own host code."""
    from corral.agent.build import agent_binary_path
    from corral.host.pool import Pool
    from corral.runtime.container import ContainerRuntime
    from corral.runtime.microvm import MicroVMRuntime
    from corral.runtime.tiers import TieredRuntime

    agent = agent_binary_path()
    # Both tiers keep disks and snapshots in the data dir's one storage pool.
    pool = Pool(config.data_dir / "pool.img", config.data_dir / "pool")
    tiers: dict[str, Runtime] = {
        "container": ContainerRuntime(config.data_dir, agent, pool=pool),
        "microvm": MicroVMRuntime(config.data_dir, agent, pool=pool),
    }
    if config.runtime not in tiers:
        raise InvalidRequestError(
            f"unknown runtime {config.runtime!r}; available: {', '.join(sorted(tiers))}"
        )
    return TieredRuntime(tiers, config.runtime)


def _metadata_source(sandboxes: SandboxService, identity: IdentityService) -> tuple[Mint, Labels]:
    """What the metadata endpoint answers a sandbox with: its identity tokens and labels."""

    async def mint(sandbox_id: str, audience: str) -> str:
        sb = sandboxes.live_sandbox(sandbox_id)
        if sb is None:
            raise SandboxNotRunningError(f"sandbox {sandbox_id} is not running")
        return identity.mint(sb, audience).jwt

    def labels(sandbox_id: str) -> Mapping[str, str]:
        sb = sandboxes.live_sandbox(sandbox_id)
        return sb.metadata if sb is not None else {}

    return mint, labels


@dataclass
class Services:
    config: ServerConfig
    store: Store
    runtime: Runtime
    tenants: TenantService
    templates: TemplateService
    sandboxes: SandboxService
    snapshots: SnapshotService
    pools: PoolService
    builds: BuildService
    processes: ProcessService
    files: FileService
    envd: EnvdService
    metrics: MetricsService
    network: NetworkService | None
    identity: IdentityService
    secrets: SecretService

    @classmethod
    async def open(cls, config: ServerConfig, runtime: Runtime | None = None) -> Services:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        config.templates_dir.mkdir(parents=True, exist_ok=True)
        store = Store(config.db_path)
        await store.migrate()
        tenants = TenantService(store)
        await tenants.ensure_admin(config.admin_key_path)
        # Early: an unsafe or damaged key file stops the server before any sandbox starts.
        secrets = SecretService(store, config.data_dir)
        secrets.start()
        rt = runtime if runtime is not None else build_runtime(config)
        describe = getattr(rt, "describe", None)
        if describe is not None:
            log.info("isolation tiers: %s (default %s)", describe(), rt.name)

        async def pinned() -> set[str]:
            """Template versions live sandboxes and snapshots hold (kept from collection)."""
            rows = await store.all_sandboxes(states=[s.value for s in LIVE_STATES])
            refs = {r.template for r in rows}
            refs.update(snap.template for snap in await store.snapshots())
            return refs

        # Late-bound: the sandbox service that answers "in use?" is made just below.
        templates = TemplateService(
            config.data_dir, in_use=lambda name: sandboxes.template_in_use(name), pinned=pinned
        )
        templates.start()
        network = NetworkService(config.network, store) if config.network.enabled else None
        binder = SecretBinder(secrets)
        sandboxes = SandboxService(config, store, rt, templates, network, binder)
        identity = IdentityService(
            config.identity, config.data_dir, sandboxes, listen=config.listen
        )
        identity.start()
        if network is not None:
            network.serve_metadata(*_metadata_source(sandboxes, identity))
            network.serve_secrets(binder.values)
        await sandboxes.start()
        snapshots = SnapshotService(config, store, rt, sandboxes)
        await snapshots.reconcile()
        pools = PoolService(config, store, sandboxes)
        await pools.start()
        builds = BuildService(config, rt, templates, network)
        builds.start()
        envd = EnvdService(config.data_dir, sandboxes)
        envd.start()
        metrics = MetricsService(rt, sandboxes.live_sandboxes)
        metrics.start()
        return cls(
            config=config,
            store=store,
            runtime=rt,
            tenants=tenants,
            templates=templates,
            sandboxes=sandboxes,
            snapshots=snapshots,
            pools=pools,
            builds=builds,
            processes=ProcessService(sandboxes),
            files=FileService(sandboxes),
            envd=envd,
            metrics=metrics,
            network=network,
            identity=identity,
            secrets=secrets,
        )

    async def close(self) -> None:
        await self.identity.stop()
        await self.metrics.stop()
        await self.envd.stop()
        await self.builds.stop()
        await self.pools.stop()
        await self.sandboxes.stop()
        if self.network is not None:
            await self.network.stop()
        await self.runtime.close()
        await self.store.close()
