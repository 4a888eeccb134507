"""The template registry and its atomic, build-once store on disk.

A template is a root filesystem directory that sandboxes mount read-only as their lowest layer.
Every build goes into a hidden sibling directory and is renamed into place only when complete,
so a directory at the destination is always a whole template and a failed or interrupted build
leaves nothing behind. A per-destination lock makes concurrent builders (``make templates`` and a
test run, two servers) wait for each other instead of building the same template twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

from corral.errors import NotFoundError, RuntimeFailure
from corral.templates import debian, minimal
from corral.templates.fs import disk_usage, remove_tree

__all__ = [
    "TEMPLATES",
    "OutputSink",
    "TemplateDef",
    "TemplateInfo",
    "build",
    "build_in_data_dir",
    "is_built",
    "list_templates",
    "rootfs_path",
    "template_info",
]

# Receives the build tool's output line by line (progress for a CLI); None means stay quiet.
OutputSink = Callable[[str], None] | None
_Builder = Callable[[Path, OutputSink], None]


@dataclass(frozen=True)
class TemplateDef:
    name: str
    description: str


@dataclass(frozen=True)
class TemplateInfo:
    """A template as ``GET /v1/templates`` shows it."""

    name: str
    description: str
    built: bool
    size_bytes: int | None
    built_at: str | None  # ISO 8601, UTC


_DEFS: tuple[tuple[TemplateDef, _Builder], ...] = (
    (
        TemplateDef("minimal", "busybox only: a shell and the usual tools in about 2 MB"),
        minimal.build_rootfs,
    ),
    (
        TemplateDef(
            "base",
            "Debian 12 with Python 3, pip, venv, git, curl, build-essential, sudo; user 'user'",
        ),
        debian.build_rootfs,
    ),
)

TEMPLATES: Mapping[str, TemplateDef] = MappingProxyType({d.name: d for d, _ in _DEFS})
_BUILDERS: Mapping[str, _Builder] = MappingProxyType({d.name: b for d, b in _DEFS})

_ROOTFS = "rootfs"
_META = "meta.json"


def _lookup(name: str) -> _Builder:
    try:
        return _BUILDERS[name]
    except KeyError:
        known = ", ".join(sorted(_BUILDERS))
        raise NotFoundError(f"unknown template {name!r}; known templates: {known}") from None


def is_built(dest: Path) -> bool:
    """Whether ``dest`` holds a complete template (only whole builds are ever renamed there)."""
    try:
        return dest.is_dir() and any(dest.iterdir())
    except OSError:
        return False


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    # Lock the parent directory itself: a separate lock file would be left behind by every build.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(name: str, dest: Path, *, force: bool = False, on_output: OutputSink = None) -> None:
    """Build template ``name`` into ``dest`` unless it is already there (or ``force``).

    Raises ``NotFoundError`` for an unknown name and ``RuntimeFailure`` (carrying the tool's
    output) when the build fails; in every failure case ``dest`` is left as it was.
    """
    builder = _lookup(name)
    dest = Path(os.path.abspath(dest))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeFailure(f"cannot create {dest.parent}: {exc}") from exc
    with _locked(dest.parent):
        if is_built(dest) and not force:
            return
        # Leftovers of a builder that was SIGKILLed; nobody else builds here while we hold the lock.
        for stale in dest.parent.glob(f".{dest.name}.build-*"):
            remove_tree(stale)
        for stale in dest.parent.glob(f".{dest.name}.old-*"):
            remove_tree(stale)
        token = secrets.token_hex(4)
        tmp = dest.with_name(f".{dest.name}.build-{token}")
        old = dest.with_name(f".{dest.name}.old-{token}")
        try:
            builder(tmp, on_output)
            # Sandboxes see the template through an idmapped mount as root:root; whatever the
            # builder's umask was, the top must be traversable by everyone.
            os.chmod(tmp, 0o755)
            # The top directory's mtime is the build's completion time (meta.json's built_at).
            os.utime(tmp)
            replacing = dest.exists() or dest.is_symlink()
            if replacing:
                os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except OSError:
                if replacing:
                    os.rename(old, dest)
                raise
        except OSError as exc:
            raise RuntimeFailure(f"building template {name!r} into {dest} failed: {exc}") from exc
        finally:
            remove_tree(tmp)
            remove_tree(old)


def rootfs_path(data_dir: Path, name: str) -> Path:
    """Where the server keeps template ``name``'s root filesystem."""
    return Path(data_dir) / "templates" / name / _ROOTFS


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_meta(meta_path: Path, meta: dict[str, object]) -> None:
    tmp = meta_path.with_name(f".{meta_path.name}.{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.rename(tmp, meta_path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_meta(meta_path: Path) -> dict[str, object]:
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def template_info(data_dir: Path, name: str) -> TemplateInfo:
    """The registry entry of ``name`` joined with what is built in ``data_dir``."""
    _lookup(name)
    tdef = TEMPLATES[name]
    root = rootfs_path(data_dir, name)
    if not is_built(root):
        return TemplateInfo(name, tdef.description, False, None, None)
    meta = _read_meta(root.parent / _META)
    size = meta.get("size_bytes")
    built_at = meta.get("built_at")
    return TemplateInfo(
        name,
        tdef.description,
        True,
        size if isinstance(size, int) else None,
        built_at if isinstance(built_at, str) else None,
    )


def list_templates(data_dir: Path) -> list[TemplateInfo]:
    return [template_info(data_dir, name) for name in TEMPLATES]


def build_in_data_dir(
    name: str, data_dir: Path, *, force: bool = False, on_output: OutputSink = None
) -> TemplateInfo:
    """Build ``name`` into the server's layout (``templates/<name>/rootfs`` + ``meta.json``).

    Already-built templates are reused as they are; ``force`` rebuilds.
    """
    _lookup(name)
    root = rootfs_path(data_dir, name)
    meta_path = root.parent / _META
    was_built = is_built(root)
    started = time.monotonic()
    build(name, root, force=force, on_output=on_output)
    elapsed = time.monotonic() - started
    fresh = force or not was_built
    if fresh or not _read_meta(meta_path):
        try:
            os.chmod(root.parent, 0o755)
            os.chmod(root.parent.parent, 0o755)
            meta: dict[str, object] = {
                "name": name,
                "description": TEMPLATES[name].description,
                "built_at": _iso(root.stat().st_mtime),
                "size_bytes": disk_usage(root),
            }
            if fresh:
                meta["build_seconds"] = round(elapsed, 3)
            _write_meta(meta_path, meta)
        except OSError as exc:
            raise RuntimeFailure(f"cannot write {meta_path}: {exc}") from exc
    return template_info(data_dir, name)
