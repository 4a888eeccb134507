"""How the CLI prints: rich tables for people, ``--json`` for scripts."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from corral.sdk.models import PoolInfo, SandboxInfo, Snapshot, TemplateInfo

__all__ = [
    "console",
    "pool_shape",
    "pool_table",
    "print_json",
    "sandbox_detail",
    "sandbox_table",
    "snapshot_table",
    "template_detail",
    "template_layers",
    "template_summary",
    "template_table",
    "template_versions_table",
]


def console() -> Console:
    # Piped output must not be cut to 80 columns: ids and paths get grepped.
    return Console(width=None if sys.stdout.isatty() else 250, highlight=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _left(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = int((value - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _pairs(values: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()) or "-"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def sandbox_table(items: Sequence[SandboxInfo]) -> Table:
    return _table(
        ["ID", "TEMPLATE", "STATE", "CPU", "MEMORY", "CREATED", "EXPIRES IN", "METADATA"],
        (
            [
                s.id,
                s.template,
                s.state,
                f"{s.cpu:g}",
                f"{s.memory_mb} MB",
                _when(s.created_at),
                _left(s.expires_at) if s.state == "running" else "-",
                _pairs(s.metadata),
            ]
            for s in items
        ),
    )


def _expires(s: SandboxInfo) -> str:
    if s.state == "running":
        return f"{_when(s.expires_at)} ({_left(s.expires_at)})"
    return "- (clock stopped while paused)" if s.paused else "-"


def _idle(s: SandboxInfo) -> str:
    if s.idle_timeout is None:
        return "-"
    return f"{s.on_idle} after {s.idle_timeout} s unused"


def sandbox_detail(s: SandboxInfo) -> Table:
    rows = [
        ("id", s.id),
        ("state", s.state),
        ("template", s.template),
        ("tenant", s.tenant_id),
        ("cpu", f"{s.cpu:g}"),
        ("memory", f"{s.memory_mb} MB"),
        ("disk", f"{s.disk_mb} MB"),
        ("timeout", f"{s.timeout} s"),
        ("created", _when(s.created_at)),
        ("expires", _expires(s)),
        *([("paused", _when(s.paused_at))] if s.paused else []),
        ("on timeout", s.on_timeout),
        ("idle", _idle(s)),
        ("auto resume", "yes" if s.auto_resume else "no"),
        *([("pool", s.pool)] if s.pool else []),
        ("metadata", _pairs(s.metadata)),
        ("env", ",".join(s.env_keys) or "-"),
    ]
    if s.error:
        rows.append(("error", s.error))
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def _tags(t: TemplateInfo) -> str:
    return ",".join(t.tags) or "-"


def template_table(items: Sequence[TemplateInfo]) -> Table:
    return _table(
        ["NAME", "VERSION", "TAGS", "SOURCE", "BUILT", "SIZE", "BUILT AT", "DESCRIPTION"],
        (
            [
                t.name,
                "-" if t.version is None else str(t.version),
                _tags(t),
                t.source,
                "yes" if t.built else "no",
                _size(t.size_bytes),
                _when(t.built_at),
                t.description,
            ]
            for t in items
        ),
    )


def template_versions_table(items: Sequence[TemplateInfo]) -> Table:
    return _table(
        ["VERSION", "TAGS", "SOURCE", "SIZE", "LAYERS", "BUILT AT"],
        (
            [
                "-" if t.version is None else str(t.version),
                _tags(t),
                t.source + (f" {t.image}" if t.image else ""),
                _size(t.size_bytes),
                str(len(t.layers)),
                _when(t.built_at),
            ]
            for t in items
        ),
    )


def _command(argv: Sequence[str] | None) -> str:
    """A command as a person would type it: a ``sh -c`` wrapper shows just its script."""
    if argv is None:
        return "-"
    if len(argv) == 3 and argv[0] in ("/bin/sh", "sh") and argv[1] == "-c":
        return argv[2]
    return shlex.join(argv)


def template_detail(t: TemplateInfo) -> Table:
    ready = _command(t.ready_cmd)
    if t.ready_cmd is not None and t.ready_timeout is not None:
        ready += f" (timeout {t.ready_timeout:g} s)"
    rows = [
        ("name", t.name),
        ("version", "-" if t.version is None else str(t.version)),
        ("tags", _tags(t)),
        ("source", t.source + (" (built-in)" if t.builtin and t.source != "builtin" else "")),
        *([("image", t.image)] if t.image else []),
        *([("description", t.description)] if t.description else []),
        ("built", _when(t.built_at) if t.built else "no"),
        ("size", _size(t.size_bytes)),
        ("start command", _command(t.start_cmd)),
        ("ready check", ready),
        ("workdir", t.workdir or "-"),
        ("user", t.user or "-"),
        ("env", "\n".join(f"{k}={v}" for k, v in t.env.items()) or "-"),
        ("layers", str(len(t.layers))),
    ]
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def template_layers(t: TemplateInfo) -> Table:
    """The layers lowest first, as the overlay stacks them."""
    return _table(
        ["#", "LAYER", "SIZE"],
        ([str(i), layer.digest, _size(layer.size_bytes)] for i, layer in enumerate(t.layers, 1)),
    )


def template_summary(verb: str, t: TemplateInfo, seconds: float | None) -> str:
    """``built web@3 (tags: latest) in 12.3 s, 120.0 MiB``."""
    tags = f" (tags: {', '.join(t.tags)})" if t.tags else ""
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    return f"{verb} {t.ref}{tags}{took}, {_size(t.size_bytes)}"


def describe_size(n: int | None) -> str:
    return _size(n)


def snapshot_table(items: Sequence[Snapshot]) -> Table:
    return _table(
        ["ID", "NAME", "SANDBOX", "TEMPLATE", "SIZE", "CREATED"],
        (
            [
                s.id,
                s.name,
                s.sandbox_id,
                s.template,
                describe_size(s.size_bytes),
                _when(s.created_at),
            ]
            for s in items
        ),
    )


def pool_shape(p: PoolInfo) -> str:
    """What a create must ask for to take from the pool, besides its template."""
    return f"{p.isolation}, {p.cpu:g} CPU, {p.memory_mb} MB, {p.disk_mb} MB disk"


def pool_table(items: Sequence[PoolInfo]) -> Table:
    return _table(
        ["NAME", "TEMPLATE", "SHAPE", "READY", "CREATED"],
        (
            [p.name, p.template, pool_shape(p), f"{p.ready}/{p.size}", _when(p.created_at)]
            for p in items
        ),
    )
