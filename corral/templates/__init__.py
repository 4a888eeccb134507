"""Root filesystem templates: the registry, atomic build-once builds, and the server's layout.

The server keeps template ``NAME`` in ``DATA_DIR/templates/NAME/rootfs`` (owned by host root,
world-readable, mounted read-only and idmapped into sandboxes) next to a ``meta.json`` holding
``built_at``, ``size_bytes`` and ``description``. Build from a shell with
``python -m corral.templates build NAME --data-dir DIR``.
"""

from __future__ import annotations

from corral.templates.registry import (
    TEMPLATES,
    TemplateDef,
    TemplateInfo,
    build,
    build_in_data_dir,
    is_built,
    list_templates,
    rootfs_path,
    template_info,
)

__all__ = [
    "TEMPLATES",
    "TemplateDef",
    "TemplateInfo",
    "build",
    "build_in_data_dir",
    "is_built",
    "list_templates",
    "rootfs_path",
    "template_info",
]
