"""Template catalogue of one data dir, as the services see it (builders live in corral.templates)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from corral import templates as builders
from corral.errors import ConflictError, InvalidRequestError
from corral.templates import TemplateInfo

__all__ = ["TemplateInfo", "TemplateService"]


class TemplateService:
    def __init__(self, data_dir: Path, in_use: Callable[[str], bool] = lambda _name: False) -> None:
        self._data_dir = data_dir
        # Whether live sandboxes mount a template: their lower layer must not be swapped away.
        self._in_use = in_use
        self._locks: dict[str, asyncio.Lock] = {}

    def list(self) -> list[TemplateInfo]:
        return builders.list_templates(self._data_dir)

    def get(self, name: str) -> TemplateInfo:
        return builders.template_info(self._data_dir, name)

    def layers_for(self, name: str) -> tuple[Path, ...]:
        """The read-only layers a sandbox of this template mounts, lowest first."""
        if name not in builders.TEMPLATES:
            known = ", ".join(sorted(builders.TEMPLATES))
            raise InvalidRequestError(f"unknown template {name!r}; known templates: {known}")
        rootfs = builders.rootfs_path(self._data_dir, name)
        if not builders.is_built(rootfs):
            raise InvalidRequestError(
                f"template {name!r} is not built yet; run 'corral template build {name}'"
            )
        return (rootfs,)

    async def build(self, name: str, *, force: bool = False) -> TemplateInfo:
        self.get(name)  # unknown names fail before taking a lock
        if force and self._in_use(name):
            raise ConflictError(
                f"template {name!r} is in use by live sandboxes; kill them before a forced rebuild"
            )
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await asyncio.to_thread(
                builders.build_in_data_dir, name, self._data_dir, force=force
            )
