"""``python -m corral.templates``: build templates into a data dir, or list them.

Kept free of the server's dependencies so ``make templates`` works right after the install step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from corral.errors import CorralError
from corral.templates.registry import (
    TEMPLATES,
    build_in_data_dir,
    is_built,
    list_templates,
    rootfs_path,
)

__all__ = ["main"]

_DEFAULT_DATA_DIR = Path("/var/lib/corral")


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _cmd_build(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    for name in args.names:
        already = is_built(rootfs_path(data_dir, name)) and not args.force
        started = time.monotonic()
        sink = None if args.quiet else (lambda line: print(f"  | {line}", file=sys.stderr))
        if not already:
            print(f"building template {name} in {data_dir} ...", file=sys.stderr, flush=True)
        info = build_in_data_dir(name, data_dir, force=args.force, on_output=sink)
        elapsed = time.monotonic() - started
        verb = "already built" if already else f"built in {elapsed:.1f} s"
        print(f"template {name}: {verb}, {_human(info.size_bytes)} ({rootfs_path(data_dir, name)})")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    if args.data_dir is None:
        for tdef in TEMPLATES.values():
            print(f"{tdef.name:10} {tdef.description}")
        return 0
    for info in list_templates(Path(args.data_dir)):
        built = info.built_at if info.built else "not built"
        print(f"{info.name:10} {built:22} {_human(info.size_bytes):>10}  {info.description}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m corral.templates", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build templates (once: a built template is reused)")
    b.add_argument("names", nargs="+", metavar="NAME", choices=sorted(TEMPLATES))
    b.add_argument("--data-dir", default=str(_DEFAULT_DATA_DIR))
    b.add_argument("--force", action="store_true", help="rebuild even if already built")
    b.add_argument("--quiet", "-q", action="store_true", help="do not echo the build tool")
    b.set_defaults(func=_cmd_build)
    ls = sub.add_parser("list", help="list templates (and what is built in --data-dir)")
    ls.add_argument("--data-dir", default=None)
    ls.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CorralError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
