"""The content-addressed layer store: ``DATA_DIR/layers/<hex>/``, one directory per layer.

A layer is a root filesystem diff in overlayfs lower-layer format (whiteouts are 0:0 character
devices, opaque directories carry ``trusted.overlay.opaque=y``), owned by the ids the sandbox
sees, and never changes once stored: sandboxes mount it read-only, idmapped, as one of their
lower layers, and any number of templates share it.

A layer's name is a digest of its content. An imported OCI layer keeps its ``diff_id`` (the
sha256 of its uncompressed tar, verified while it was unpacked); a layer made by a build is
named by ``tree_digest`` of the directory it produced. Either way a layer is unpacked into a
hidden sibling first and renamed into place whole, so a crash never leaves half a layer under
a real name (``sweep`` removes the hidden leftovers).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from corral.errors import InvalidRequestError, RuntimeFailure
from corral.templates.fs import disk_usage, remove_tree

__all__ = ["LayerStore", "tree_digest"]

_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CHUNK = 1 << 20


def _hex(digest: str) -> str:
    found = _DIGEST_RE.match(digest)
    if found is None:
        raise InvalidRequestError(f"invalid layer digest {digest!r}")
    return found.group(1)


def tree_digest(root: Path) -> str:
    """A sha256 over everything a sandbox can observe of the tree at ``root``: names, types,
    modes, owners, sizes, link targets, device numbers, xattrs and file contents (not mtimes,
    so that an identical rebuild gives the same layer)."""
    h = hashlib.sha256()

    def walk(directory: Path, rel: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            path = Path(entry.path)
            name = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            xattrs = sorted(
                (k, os.getxattr(path, k, follow_symlinks=False))
                for k in os.listxattr(path, follow_symlinks=False)
            )
            h.update(
                repr(
                    (name, stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
                ).encode()
            )
            h.update(repr(xattrs).encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                h.update(repr(st.st_rdev).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(repr(st.st_size).encode())
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        h.update(chunk)
            elif stat.S_ISDIR(st.st_mode):
                walk(path, name)
            h.update(b"\0")

    walk(root, "")
    return "sha256:" + h.hexdigest()


class LayerStore:
    """Layers under one directory. Safe for concurrent adders of the same layer: whoever renames
    first wins, the others find it there and drop their copy."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / _hex(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def digests(self) -> set[str]:
        try:
            return {
                f"sha256:{p.name}"
                for p in self.root.iterdir()
                if not p.name.startswith(".") and _DIGEST_RE.match(f"sha256:{p.name}")
            }
        except FileNotFoundError:
            return set()

    def staging(self) -> Path:
        """A fresh empty hidden directory to build a layer in; ``commit`` or ``discard`` it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        os.chmod(self.root, 0o755)  # sandboxes' uids must traverse it (idmapped clones)
        tmp = self.root / f".new-{secrets.token_hex(8)}"
        tmp.mkdir(mode=0o755)
        return tmp

    def commit(self, staged: Path, digest: str | None = None) -> tuple[str, int]:
        """Give the staged directory its content name (``tree_digest`` unless ``digest`` is
        already known and verified) and return (digest, bytes on disk)."""
        try:
            if digest is None:
                digest = tree_digest(staged)
            size = disk_usage(staged)
            os.chmod(staged, 0o755)
            final = self.path(digest)
            try:
                os.rename(staged, final)
            except OSError:
                if not final.is_dir():
                    raise
                remove_tree(staged)  # someone stored the same layer first
            return digest, size
        except OSError as exc:
            remove_tree(staged)
            raise RuntimeFailure(f"cannot store layer: {exc}") from exc
        except BaseException:
            remove_tree(staged)
            raise

    @staticmethod
    def discard(staged: Path) -> None:
        remove_tree(staged)

    # The LayerSink of corral.templates.oci: an imported layer, named by its verified diff_id.
    def add(self, diff_id: str, tar: BinaryIO) -> None:
        from corral.templates.unpack import unpack_layer

        _hex(diff_id)
        staged = self.staging()
        try:
            unpack_layer(tar, staged)
        except BaseException:
            remove_tree(staged)
            raise
        self.commit(staged, diff_id)

    def size(self, digest: str) -> int:
        return disk_usage(self.path(digest))

    def collect(self, keep: Iterable[str]) -> tuple[int, int]:
        """Remove every layer not in ``keep``; returns (layers removed, bytes freed)."""
        wanted = set(keep)
        removed = freed = 0
        for digest in self.digests() - wanted:
            path = self.path(digest)
            with contextlib.suppress(OSError):
                freed += disk_usage(path)
            remove_tree(path)
            removed += 1
        return removed, freed

    def sweep(self) -> None:
        """Remove half-made layers a crash left behind (call when no build or import runs)."""
        with contextlib.suppress(FileNotFoundError):
            for p in self.root.glob(".new-*"):
                remove_tree(p)
