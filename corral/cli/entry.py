"""The ``corral`` executable. ``corral run`` (local mode) goes straight to its own lean parser
(corral/local/cli.py) without importing the CLI framework; everything else to the full CLI."""

from __future__ import annotations

import sys
from typing import NoReturn

__all__ = ["main"]


def main() -> NoReturn:
    if sys.argv[1:2] == ["run"]:
        from corral.local.cli import main as run

        sys.exit(run(sys.argv[2:]))
    from corral.cli.main import main as full

    full()
