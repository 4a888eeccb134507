"""A real ``TemplateService`` over stand-ins of the built-in templates, for unit tests of the
services above it (their runtime is fake; the template layers are never mounted)."""

from __future__ import annotations

from pathlib import Path

from corral.core.templates import TemplateService
from corral.templates import TEMPLATES

__all__ = ["builtin_templates"]


def builtin_templates(data_dir: Path) -> TemplateService:
    for name in TEMPLATES:
        rootfs = data_dir / "templates" / name / "rootfs"
        (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    return TemplateService(data_dir)
