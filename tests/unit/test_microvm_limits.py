"""A microvm asking for more vCPUs than the host has cores, or more memory than its MemTotal, is
refused with a 400 that names the limit, before anything is made."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

import pytest

from corral.config import Limits, NetworkConfig, ServerConfig
from corral.core.commands import CreateSandbox
from corral.core.sandboxes import SandboxService
from corral.core.tenants import Principal
from corral.errors import InvalidRequestError
from corral.runtime.base import SandboxSpec
from corral.store import Store, TenantRow
from tests.unit.template_service import builtin_templates


class RecordingRuntime:
    """Records creates; the check under test must refuse before any."""

    name = "microvm"

    def __init__(self) -> None:
        self.created: list[str] = []

    async def create(self, spec: SandboxSpec) -> None:
        self.created.append(spec.sandbox_id)

    async def destroy(self, sandbox_id: str) -> None: ...

    async def is_running(self, sandbox_id: str) -> bool:
        return sandbox_id in self.created

    async def list_sandboxes(self) -> list[str]:
        return list(self.created)


def _mem_total_mb() -> int:
    found = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    assert found is not None
    return int(found.group(1)) // 1024


CORES = os.cpu_count() or 1
TOTAL_MB = _mem_total_mb()


@pytest.mark.parametrize(
    "fields,words",
    [
        ({"vcpus": CORES + 1}, f"vcpus={CORES + 1} is more than this host's {CORES} CPU cores"),
        ({"cpu": float(CORES + 1)}, f"{CORES} CPU cores"),
        ({"vcpus": 64 * CORES}, f"at most {CORES} vCPUs"),
        ({"memory_mb": TOTAL_MB + 1}, f"MemTotal {TOTAL_MB} MB"),
        ({"memory_mb": 100 * TOTAL_MB}, f"at most {TOTAL_MB} MB"),
    ],
    ids=["vcpus", "cpu", "vcpus-far", "memory", "memory-far"],
)
async def test_a_vm_bigger_than_the_host_is_refused_naming_the_limit(
    tmp_path: Path, fields: dict[str, Any], words: str
) -> None:
    store = Store(tmp_path / "db.sqlite")
    await store.migrate()
    await store.add_tenant(TenantRow(id="t", name="t", created_at=dt.datetime.now(dt.UTC)))
    runtime = RecordingRuntime()
    # Limits far above the host: the check is the host's size, not the configured limits.
    config = ServerConfig(
        data_dir=tmp_path,
        network=NetworkConfig(enabled=False),
        limits=Limits(max_cpu=1000.0, max_memory_mb=1000 * TOTAL_MB),
    )
    svc = SandboxService(config, store, runtime, builtin_templates(tmp_path), None)  # type: ignore[arg-type]
    who = Principal("t", True, "k")
    try:
        with pytest.raises(InvalidRequestError, match=re.escape(words)) as caught:
            await svc.create(who, CreateSandbox(isolation="microvm", **fields))
        assert caught.value.status == 400
        assert runtime.created == [] and list(await store.all_sandboxes()) == []
        # The same request for a container is held to the configured limits only.
        await svc.create(who, CreateSandbox(isolation="container", **fields))
        assert len(runtime.created) == 1
    finally:
        await store.close()


async def test_a_vm_the_host_can_hold_passes_the_check(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path, network=NetworkConfig(enabled=False))
    svc = SandboxService(config, None, RecordingRuntime(), builtin_templates(tmp_path), None)  # type: ignore[arg-type]
    svc._check_microvm(CreateSandbox(isolation="microvm", vcpus=CORES, memory_mb=TOTAL_MB))
    svc._check_microvm(CreateSandbox(isolation="microvm"))  # the server's defaults
