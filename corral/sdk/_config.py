"""Where the SDK finds the server and its key, so code on the server's host needs no setup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from corral.errors import AuthenticationError, InvalidRequestError

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_URL", "ClientConfig", "resolve_config"]

DEFAULT_URL = "http://127.0.0.1:7700"
DEFAULT_DATA_DIR = "/var/lib/corral"


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str = ""

    def __repr__(self) -> str:
        # The key must never end up in logs or tracebacks.
        return f"ClientConfig(base_url={self.base_url!r}, api_key=***)"


def _normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidRequestError(
            f"corral URL {url!r} is not an http:// or https:// URL (set CORRAL_URL or base_url=)"
        )
    return url


def resolve_config(
    api_key: str | None = None,
    base_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Explicit arguments, then ``CORRAL_URL``/``CORRAL_API_KEY``, then the admin key file."""
    env = os.environ if environ is None else environ
    url = _normalise_url(base_url or env.get("CORRAL_URL") or DEFAULT_URL)
    if api_key:
        return ClientConfig(url, api_key)
    key = env.get("CORRAL_API_KEY", "").strip()
    if key:
        return ClientConfig(url, key)
    key_file = Path(env.get("CORRAL_DATA_DIR") or DEFAULT_DATA_DIR) / "admin.key"
    try:
        key = key_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        reason = "does not exist"
    except PermissionError:
        reason = "is not readable by this user"
    except OSError as exc:
        reason = f"cannot be read ({exc.strerror or exc})"
    else:
        if key:
            return ClientConfig(url, key)
        reason = "is empty"
    raise AuthenticationError(
        f"no corral API key found: api_key= was not given, CORRAL_API_KEY is not set, and "
        f"{key_file} {reason} (set CORRAL_DATA_DIR if the server uses another data dir)"
    )
