"""User templates: versions, tags and what a sandbox of each version starts with.

Template ``NAME`` is one JSON file, ``DATA_DIR/catalog/NAME/template.json``, replaced whole
(write + rename) on every change, so a crash leaves the old catalogue or the new one. (Not
under ``templates/``, which holds the built-ins and may be shared between data dirs.) A build or
an import adds version N+1 (its layers, by digest, lowest first, and its settings) and moves the
``latest`` tag to it. References: ``NAME`` (= ``NAME:latest``), ``NAME:TAG``, ``NAME@N``.

A sandbox, snapshot or pool pins the version it was made from (``NAME@N``), so a newer build
never changes the layers under a live sandbox. Deleting a version therefore only hides it
(``deleted``): it stays resolvable by its pinned reference until ``collect`` finds nothing that
uses it any more, and only then do its layers become garbage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequestError, NotFoundError, PermissionDeniedError

__all__ = [
    "BUILTIN_VERSION",
    "Catalog",
    "LayerRef",
    "Settings",
    "Version",
    "check_name",
    "parse_ref",
]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_FILE = "template.json"
LATEST = "latest"
# The one version a built-in template has (it is rebuilt in place, never versioned).
BUILTIN_VERSION = 0


def check_name(value: str, what: str = "template name") -> str:
    if not _NAME_RE.match(value):
        raise InvalidRequestError(
            f"invalid {what} {value!r}: use 1-63 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return value


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """``NAME`` / ``NAME:TAG`` / ``NAME@N`` → (name, tag, version); one of the last two set,
    or neither (then the caller means ``latest``)."""
    if "@" in ref:
        name, _, number = ref.partition("@")
        if not number.isdigit() or len(number) > 9:
            raise InvalidRequestError(f"invalid template reference {ref!r}: NAME@N needs a number")
        return check_name(name), None, int(number)
    if ":" in ref:
        name, _, tag = ref.partition(":")
        return check_name(name), check_name(tag, "tag"), None
    return check_name(ref), None, None


@dataclass(frozen=True)
class LayerRef:
    digest: str
    size_bytes: int


@dataclass(frozen=True)
class Settings:
    """What every sandbox of a template version starts with."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    # Started (as a managed background process) when a sandbox is created; None: nothing.
    start_cmd: tuple[str, ...] | None = None
    # Run until it exits 0 before the create answers; None: ready as soon as the agent is.
    ready_cmd: tuple[str, ...] | None = None
    ready_timeout: float = 60.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Settings:
        def argv(v: Any) -> tuple[str, ...] | None:
            return tuple(str(a) for a in v) if isinstance(v, list) else None

        env = data.get("env")
        return cls(
            env={str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {},
            workdir=str(data.get("workdir") or ""),
            user=str(data.get("user") or ""),
            start_cmd=argv(data.get("start_cmd")),
            ready_cmd=argv(data.get("ready_cmd")),
            ready_timeout=float(data.get("ready_timeout") or 60.0),
        )


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    owner: str | None  # tenant id; None for a built-in
    source: str  # dockerfile | image | archive | builtin
    layers: tuple[LayerRef, ...]
    settings: Settings
    built_at: str
    image: str | None = None
    description: str = ""
    build_seconds: float | None = None
    deleted: bool = False
    tags: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """The pinned reference a sandbox of this version records."""
        return self.name if self.version == BUILTIN_VERSION else f"{self.name}@{self.version}"

    @property
    def size_bytes(self) -> int:
        return sum(layer.size_bytes for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("tags")
        data.pop("name")
        data.pop("owner")
        return data

    @classmethod
    def from_json(cls, name: str, owner: str | None, data: Mapping[str, Any]) -> Version:
        return cls(
            name=name,
            version=int(data["version"]),
            owner=owner,
            source=str(data.get("source", "dockerfile")),
            layers=tuple(
                LayerRef(str(layer["digest"]), int(layer["size_bytes"]))
                for layer in data.get("layers", [])
            ),
            settings=Settings.from_json(data.get("settings") or {}),
            built_at=str(data.get("built_at", "")),
            image=data.get("image"),
            description=str(data.get("description", "")),
            build_seconds=data.get("build_seconds"),
            deleted=bool(data.get("deleted", False)),
        )


class Catalog:
    """Every user template of a data dir. Reads are served from memory (loaded lazily, kept in
    step by this process's own writes: one server owns a data dir)."""

    def __init__(self, templates_dir: Path, reserved: Iterable[str] = ()) -> None:
        self._dir = Path(templates_dir)
        self._reserved = frozenset(reserved)
        self._lock = threading.RLock()
        self._cache: dict[str, tuple[str, list[Version], dict[str, int]]] | None = None

    # ------------------------------------------------------------------------------- storage

    def _load(self) -> dict[str, tuple[str, list[Version], dict[str, int]]]:
        with self._lock:
            if self._cache is None:
                cache: dict[str, tuple[str, list[Version], dict[str, int]]] = {}
                with contextlib.suppress(FileNotFoundError):
                    for path in sorted(self._dir.glob(f"*/{_FILE}")):
                        try:
                            data = json.loads(path.read_text(encoding="utf-8"))
                            name = path.parent.name
                            owner = str(data["owner"])
                            versions = [Version.from_json(name, owner, v) for v in data["versions"]]
                            tags = {str(k): int(v) for k, v in data.get("tags", {}).items()}
                        except (OSError, ValueError, KeyError, TypeError):
                            continue
                        cache[name] = (owner, versions, tags)
                self._cache = cache
            return self._cache

    def _save(self, name: str) -> None:
        entry = self._load().get(name)
        directory = self._dir / name
        path = directory / _FILE
        if entry is None:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                directory.rmdir()
            return
        owner, versions, tags = entry
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        body = {"owner": owner, "versions": [v.to_json() for v in versions], "tags": tags}
        tmp = directory / f".{_FILE}.{secrets.token_hex(4)}"
        try:
            tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
            os.rename(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._lock:
            self._dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    # ------------------------------------------------------------------------------- reading

    def _tagged(self, v: Version, tags: Mapping[str, int]) -> Version:
        return replace(v, tags=tuple(sorted(t for t, n in tags.items() if n == v.version)))

    def owner(self, name: str) -> str | None:
        entry = self._load().get(name)
        return entry[0] if entry is not None else None

    def check_access(self, name: str, tenant: str | None) -> None:
        """Only the tenant that made a template (or an admin: ``tenant`` None) sees it."""
        owner = self.owner(name)
        if owner is None or (tenant is not None and owner != tenant):
            raise NotFoundError(f"no template named {name!r}")

    def resolve(self, ref: str, *, tenant: str | None = None, pinned_ok: bool = True) -> Version:
        """The version ``ref`` names. A deleted version is found only by its pinned reference
        (``NAME@N``) with ``pinned_ok``: what live sandboxes and snapshots hold."""
        name, tag, number = parse_ref(ref)
        self.check_access(name, tenant)
        _, versions, tags = self._load()[name]
        if number is None:
            tag = tag or LATEST
            if tag not in tags:
                raise NotFoundError(f"template {name!r} has no tag {tag!r}")
            number = tags[tag]
        for v in versions:
            if v.version == number and (not v.deleted or (pinned_ok and tag is None)):
                return self._tagged(v, tags)
        raise NotFoundError(f"template {name!r} has no version {number}")

    def versions(self, name: str, *, tenant: str | None = None) -> list[Version]:
        self.check_access(name, tenant)
        _, versions, tags = self._load()[name]
        return [self._tagged(v, tags) for v in versions if not v.deleted]

    def latest(self, *, tenant: str | None = None) -> list[Version]:
        """Each visible template at its ``latest`` (or newest version when untagged)."""
        out = []
        for _name, (owner, versions, tags) in sorted(self._load().items()):
            if tenant is not None and owner != tenant:
                continue
            live = [v for v in versions if not v.deleted]
            if not live:
                continue
            number = tags.get(LATEST, live[-1].version)
            chosen = next((v for v in live if v.version == number), live[-1])
            out.append(self._tagged(chosen, tags))
        return out

    # ------------------------------------------------------------------------------- writing

    def add_version(
        self,
        name: str,
        owner: str,
        *,
        source: str,
        layers: Iterable[LayerRef],
        settings: Settings,
        built_at: str,
        image: str | None = None,
        description: str = "",
        build_seconds: float | None = None,
        tags: Iterable[str] = (),
    ) -> Version:
        check_name(name)
        extra = [check_name(t, "tag") for t in tags]
        if name in self._reserved:
            raise InvalidRequestError(f"{name!r} is a built-in template; choose another name")
        with self._writing():
            cache = self._load()
            entry = cache.get(name)
            if entry is not None and entry[0] != owner:
                raise PermissionDeniedError(f"template {name!r} belongs to another tenant")
            _, versions, tag_map = entry if entry is not None else (owner, [], {})
            refs = tuple(layers)
            live = [v for v in versions if not v.deleted]
            same = live[-1] if live else None
            if same is not None and (
                [x.digest for x in same.layers] == [x.digest for x in refs]
                and (same.settings, same.source, same.image) == (settings, source, image)
            ):
                # A rebuild that changed nothing (every step cached) is the same version, as
                # Docker gives it the same image id; only the tags move.
                tag_map = {**tag_map, LATEST: same.version, **dict.fromkeys(extra, same.version)}
                cache[name] = (owner, versions, tag_map)
                self._save(name)
                return self._tagged(same, tag_map)
            number = max((v.version for v in versions), default=0) + 1
            v = Version(
                name=name,
                version=number,
                owner=owner,
                source=source,
                layers=refs,
                settings=settings,
                built_at=built_at,
                image=image,
                description=description,
                build_seconds=build_seconds,
            )
            tag_map = {**tag_map, LATEST: number, **dict.fromkeys(extra, number)}
            cache[name] = (owner, [*versions, v], tag_map)
            self._save(name)
            return self._tagged(v, tag_map)

    def set_tag(self, name: str, tag: str, number: int, *, tenant: str | None) -> Version:
        check_name(tag, "tag")
        with self._writing():
            self.check_access(name, tenant)
            owner, versions, tags = self._load()[name]
            if not any(v.version == number and not v.deleted for v in versions):
                raise NotFoundError(f"template {name!r} has no version {number}")
            tags = {**tags, tag: number}
            self._load()[name] = (owner, versions, tags)
            self._save(name)
        return self.resolve(f"{name}@{number}", tenant=tenant)

    def remove_tag(self, name: str, tag: str, *, tenant: str | None) -> None:
        with self._writing():
            self.check_access(name, tenant)
            owner, versions, tags = self._load()[name]
            if tag not in tags:
                raise NotFoundError(f"template {name!r} has no tag {tag!r}")
            tags = {t: n for t, n in tags.items() if t != tag}
            self._load()[name] = (owner, versions, tags)
            self._save(name)

    def delete(self, ref: str, *, tenant: str | None) -> list[Version]:
        """Hide the version ``ref`` names, or every version for a bare ``NAME``; their tags go.
        Returns what was deleted."""
        name, tag, number = parse_ref(ref)
        with self._writing():
            self.check_access(name, tenant)
            owner, versions, tags = self._load()[name]
            if tag is None and number is None:
                doomed = {v.version for v in versions}
            else:
                doomed = {self.resolve(ref, tenant=tenant, pinned_ok=False).version}
            gone = [replace(v, deleted=True) for v in versions if v.version in doomed]
            versions = [replace(v, deleted=True) if v.version in doomed else v for v in versions]
            tags = {t: n for t, n in tags.items() if n not in doomed}
            live = [v for v in versions if not v.deleted]
            if live and LATEST not in tags:
                tags[LATEST] = live[-1].version  # latest falls back to the newest left
            self._load()[name] = (owner, versions, tags)
            self._save(name)
            return gone

    def collect(self, in_use: Iterable[str]) -> set[str]:
        """Forget deleted versions no sandbox, snapshot or pool pins (``in_use``: their pinned
        references); returns the digests of every layer some remaining version needs."""
        pinned = set(in_use)
        keep: set[str] = set()
        with self._writing():
            cache = self._load()
            for name in list(cache):
                owner, versions, tags = cache[name]
                left = [v for v in versions if not v.deleted or v.ref in pinned]
                if len(left) != len(versions):
                    if left:
                        cache[name] = (owner, left, tags)
                    else:
                        del cache[name]
                    self._save(name)
                for v in left:
                    keep.update(layer.digest for layer in v.layers)
        return keep
