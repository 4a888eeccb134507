"""Templates as the services see them: the built-ins (``corral.templates.registry``) and the
tenants' own (``corral.templates.catalog``, layers in ``corral.templates.layers``), behind one
reference syntax and one view (``Version``).

Dockerfile builds and OCI imports live in ``corral.core.builds``; they end here, in
``register``. Garbage collection keeps every layer that a version, a live sandbox, a snapshot
or a build in progress needs.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from corral import templates as builders
from corral.errors import ConflictError, InvalidRequestError, NotFoundError
from corral.templates.catalog import (
    BUILTIN_VERSION,
    Catalog,
    LayerRef,
    Settings,
    Version,
    parse_ref,
)
from corral.templates.layers import LayerStore

__all__ = ["Resolved", "TemplateService", "Version"]

_NO_SETTINGS = Settings()


@dataclass(frozen=True)
class Resolved:
    """A template version ready to start sandboxes from."""

    version: Version
    layers: tuple[Path, ...]  # lowest first

    @property
    def ref(self) -> str:
        return self.version.ref


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class TemplateService:
    def __init__(
        self,
        data_dir: Path,
        in_use: Callable[[str], bool] = lambda _name: False,
        pinned: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> None:
        self._data_dir = data_dir
        # Whether live sandboxes mount a built-in: their lower layer must not be swapped away.
        self._in_use = in_use
        # Every pinned reference (NAME@N) live sandboxes and snapshots hold (for collection).
        self._pinned = pinned
        self._locks: dict[str, asyncio.Lock] = {}
        self.layers = LayerStore(data_dir / "layers")
        self.catalog = Catalog(data_dir / "catalog", reserved=builders.TEMPLATES)
        # Layers a build or import in progress has made or reuses but not registered yet.
        self._held: collections.Counter[str] = collections.Counter()
        self._gc_lock = asyncio.Lock()
        self._builtins: dict[str, tuple[int, Resolved]] = {}

    def start(self) -> None:
        """Forget half-made layers of a previous run (no build runs yet)."""
        self.layers.sweep()

    # ------------------------------------------------------------------------------ views

    def _builtin(self, name: str) -> Version:
        info = builders.template_info(self._data_dir, name)
        return Version(
            name=name,
            version=BUILTIN_VERSION,
            owner=None,
            source="builtin",
            layers=(LayerRef(f"builtin:{name}", info.size_bytes or 0),) if info.built else (),
            settings=Settings(),
            built_at=info.built_at or "",
            description=info.description,
            tags=(),
        )

    def is_built(self, v: Version) -> bool:
        if v.source == "builtin":
            return bool(v.layers)
        return all(self.layers.has(layer.digest) for layer in v.layers)

    def list(self, tenant: str | None = None) -> list[Version]:
        return [self._builtin(n) for n in builders.TEMPLATES] + self.catalog.latest(tenant=tenant)

    def get(self, ref: str, tenant: str | None = None) -> Version:
        if ref in builders.TEMPLATES:
            return self._builtin(ref)
        name, _, _ = parse_ref(ref)
        if name in builders.TEMPLATES:
            raise InvalidRequestError(f"built-in template {name!r} has no versions or tags")
        return self.catalog.resolve(ref, tenant=tenant, pinned_ok=False)

    def versions(self, name: str, tenant: str | None = None) -> builtins.list[Version]:
        if name in builders.TEMPLATES:
            return [self._builtin(name)]
        return self.catalog.versions(name, tenant=tenant)

    def resolve(self, ref: str, tenant: str | None = None) -> Resolved:
        """What a create of ``ref`` (by ``tenant``; None: a pinned reference held by the
        server itself) starts from; ``InvalidRequestError`` when there is no such template."""
        if ref in builders.TEMPLATES:
            return self._resolve_builtin(ref)
        try:
            v = self.catalog.resolve(ref, tenant=tenant, pinned_ok=tenant is None)
        except NotFoundError as exc:
            known = ", ".join(sorted(builders.TEMPLATES))
            raise InvalidRequestError(
                f"unknown template {ref!r} ({exc.message}); built-in templates: {known}"
            ) from None
        paths = tuple(self.layers.path(layer.digest) for layer in v.layers)
        missing = [p for p in paths if not p.is_dir()]
        if missing:
            raise InvalidRequestError(f"template {ref!r} lost layer {missing[0].name}")
        return Resolved(v, paths)

    def settings_of(self, ref: str) -> Settings:
        """What processes of a (pinned) template start with; on every exec's path, so without
        touching the disk."""
        if ref in builders.TEMPLATES:
            return _NO_SETTINGS
        return self.catalog.resolve(ref).settings

    def _resolve_builtin(self, name: str) -> Resolved:
        """Every create resolves its template: for a built-in, one stat of its meta.json
        decides whether what was read before still holds (a rebuild rewrites it)."""
        rootfs = builders.rootfs_path(self._data_dir, name)
        try:
            stamp = (rootfs.parent / "meta.json").stat().st_mtime_ns
        except OSError:
            stamp = None
        known = self._builtins.get(name)
        if known is not None and stamp is not None and known[0] == stamp:
            return known[1]
        if not builders.is_built(rootfs):
            raise InvalidRequestError(
                f"template {name!r} is not built yet; run 'corral template build {name}'"
            )
        resolved = Resolved(self._builtin(name), (rootfs,))
        if stamp is not None:
            self._builtins[name] = (stamp, resolved)
        return resolved

    # ---------------------------------------------------------------------------- built-ins

    async def build(self, name: str, *, force: bool = False) -> Version:
        """(Re)build a built-in template."""
        if name not in builders.TEMPLATES:
            known = ", ".join(sorted(builders.TEMPLATES))
            raise NotFoundError(
                f"{name!r} is not a built-in template (known: {known}); "
                "build your own from a Dockerfile with POST /v1/templates/{name}/builds"
            )
        if force and self._in_use(name):
            raise ConflictError(
                f"template {name!r} is in use by live sandboxes; kill them before a forced rebuild"
            )
        async with self._locks.setdefault(name, asyncio.Lock()):
            await asyncio.to_thread(builders.build_in_data_dir, name, self._data_dir, force=force)
        return self._builtin(name)

    # ------------------------------------------------------------------------ user templates

    @contextlib.contextmanager
    def holding(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these layers from collection while a build or import still needs them."""
        held = list(digests)
        self._held.update(held)
        try:
            yield
        finally:
            self._held.subtract(held)
            self._held += collections.Counter()  # drop zero counts

    def hold(self, digest: str) -> None:
        self._held[digest] += 1

    def release(self, digest: str) -> None:
        self._held[digest] -= 1
        self._held += collections.Counter()

    def register(
        self,
        name: str,
        owner: str,
        *,
        source: str,
        layers: Iterable[str],
        settings: Settings,
        image: str | None = None,
        build_seconds: float | None = None,
        tags: Iterable[str] = (),
    ) -> Version:
        refs = [LayerRef(d, self.layers.size(d)) for d in layers]
        return self.catalog.add_version(
            name,
            owner,
            source=source,
            layers=refs,
            settings=settings,
            built_at=now_iso(),
            image=image,
            build_seconds=build_seconds,
            tags=tags,
        )

    def check_writable(self, name: str, tenant: str | None) -> None:
        """Refuse names a tenant may not build into before any work starts."""
        parse_ref(name)
        if name in builders.TEMPLATES:
            raise InvalidRequestError(f"{name!r} is a built-in template; choose another name")
        owner = self.catalog.owner(name)
        if owner is not None and tenant is not None and owner != tenant:
            raise ConflictError(f"template name {name!r} is taken")

    def tag(self, name: str, tag: str, version: int, tenant: str | None) -> Version:
        return self.catalog.set_tag(name, tag, version, tenant=tenant)

    def untag(self, name: str, tag: str, tenant: str | None) -> None:
        self.catalog.remove_tag(name, tag, tenant=tenant)

    async def delete(self, ref: str, tenant: str | None) -> None:
        name, _, _ = parse_ref(ref)
        if name in builders.TEMPLATES:
            raise InvalidRequestError(f"built-in template {name!r} cannot be deleted")
        self.catalog.delete(ref, tenant=tenant)
        await self.collect()

    async def collect(self) -> tuple[int, int]:
        """Remove layers nothing needs: returns (layers removed, bytes freed)."""
        async with self._gc_lock:
            pinned = await self._pinned() if self._pinned is not None else set()
            keep = self.catalog.collect(pinned)
            keep |= set(self._held)
            removed = await asyncio.to_thread(self.layers.collect, keep)
            await asyncio.to_thread(self._prune_build_cache)
            return removed

    def _prune_build_cache(self) -> None:
        """Build cache entries name layers; those naming a collected one are worthless."""
        cache = self._data_dir / "build-cache"
        with contextlib.suppress(FileNotFoundError):
            for entry in cache.iterdir():
                with contextlib.suppress(OSError, InvalidRequestError):
                    digest = entry.read_text().strip()
                    if entry.name.startswith(".") or (digest and not self.layers.has(digest)):
                        entry.unlink()
