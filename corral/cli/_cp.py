"""``corral cp``: files and directories between this machine and a sandbox, either way."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidRequestError, NotFoundError
from corral.sdk.sandbox import Sandbox

__all__ = ["Endpoint", "copy", "parse_endpoint"]

# "ID:/path" like scp and docker cp; "./a:b" or "/x:y" stay local because the id part
# cannot hold a slash.
_REMOTE = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<path>.*)$")


@dataclass(frozen=True)
class Endpoint:
    path: str
    sandbox_id: str | None = None

    @property
    def remote(self) -> bool:
        return self.sandbox_id is not None


def parse_endpoint(text: str) -> Endpoint:
    m = _REMOTE.match(text)
    if m is None:
        if not text:
            raise InvalidRequestError("an empty path was given")
        return Endpoint(text)
    path = m["path"] or "/"
    if not path.startswith("/"):
        raise InvalidRequestError(
            f"{text!r}: the path inside a sandbox must be absolute, like {m['id']}:/root/{path}"
        )
    return Endpoint(path, m["id"])


def _remote_is_dir(sbx: Sandbox, path: str) -> bool:
    try:
        return sbx.files.stat(path).is_dir
    except NotFoundError:
        return False


def _remote_target(sbx: Sandbox, dst: str, name: str) -> str:
    """``cp`` semantics: into an existing directory (or one written with a trailing slash)."""
    if dst.endswith("/") or _remote_is_dir(sbx, dst):
        return posixpath.join(dst, name)
    return dst


def _local_target(dst: str, name: str) -> Path:
    if dst.endswith(os.sep) or Path(dst).is_dir():
        return Path(dst) / name
    return Path(dst)


def upload(sbx: Sandbox, src: str, dst: str) -> None:
    local = Path(src)
    if not local.exists():
        raise InvalidRequestError(f"{src}: no such local file or directory")
    target = _remote_target(sbx, dst, local.resolve().name or "root")
    if local.is_dir():
        sbx.files.upload_dir(local, target)
        return
    with open(local, "rb") as f:
        sbx.files.write(target, f, mode=local.stat().st_mode & 0o777)


def download(sbx: Sandbox, src: str, dst: str) -> None:
    info = sbx.files.stat(src)
    name = posixpath.basename(src.rstrip("/")) or "root"
    target = _local_target(dst, name)
    if info.is_dir:
        sbx.files.download_dir(src, target)
        return
    if not target.parent.is_dir():
        raise InvalidRequestError(f"{target.parent}: no such local directory")
    partial = target.with_name(f".{target.name}.corral-partial")
    try:
        with open(partial, "wb") as out:
            for chunk in sbx.files.read_stream(src):
                out.write(chunk)
        os.chmod(partial, info.mode & 0o777 or 0o644)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def copy(src: Endpoint, dst: Endpoint, *, api_key: str | None, base_url: str | None) -> None:
    if src.remote == dst.remote:
        side = "inside a sandbox" if src.remote else "local"
        raise InvalidRequestError(
            f"both paths are {side}: one side of corral cp must be ID:/path, the other local"
        )
    sandbox_id = src.sandbox_id or dst.sandbox_id
    assert sandbox_id is not None
    sbx = Sandbox.connect(sandbox_id, api_key=api_key, base_url=base_url)
    try:
        if src.remote:
            download(sbx, src.path, dst.path)
        else:
            upload(sbx, src.path, dst.path)
    finally:
        sbx.close()  # not kill(): copying must leave the sandbox running
