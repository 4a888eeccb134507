"""Documents the CLI reads from files given on its command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from corral.errors import InvalidRequestError

__all__ = ["load_json"]


def load_json(path: Path) -> Any:
    """The JSON document in ``path`` (``-``: stdin); InvalidRequestError saying what is wrong."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{path} is not UTF-8 text") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{path} is not JSON: {exc}") from exc
