"""Tenant secrets: named values kept encrypted at rest, which no route ever answers again.

A secret's value leaves the server only on the wire, put into requests to the hosts a sandbox
binding names by the egress proxy (docs/secrets.md); the API, SDK and CLI can set, list, inspect
(name and times) and delete secrets, never read one back.

The master key is ``DATA_DIR/secrets.key``: 32 random bytes made at first start, mode 0600.
Values are sealed with AES-256-GCM under a subkey derived from it, a fresh 12-byte nonce per
write, and ``"{tenant}\\0{name}"`` as associated data, so a row moved to another tenant or name
does not open. Other keys the server needs to survive restarts without storing them (each
sandbox's CA key) come from ``derive_key``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import os
import re
import secrets
import stat
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from corral.core.commands import MAX_VALUE_CHARS, SECRET_NAME, check_secret_value
from corral.errors import InvalidRequestError, NotFoundError, QuotaExceededError, RuntimeFailure
from corral.store import Store
from corral.store.models import SecretRow

__all__ = [
    "KEY_FILE",
    "MAX_SECRETS_PER_TENANT",
    "MAX_VALUE_CHARS",
    "SecretInfo",
    "SecretService",
    "check_secret_name",
]

KEY_FILE = "secrets.key"
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_SECRETS_PER_TENANT = 1000
_NAME = re.compile(SECRET_NAME)
# The HKDF info of the at-rest subkey; ``derive_key`` refuses it so that no caller can obtain
# the key the rows are sealed with.
_AT_REST_LABEL = b"corral secrets at rest: AES-256-GCM v1"
# Decrypted values kept for the egress proxy, which asks for one per intercepted request.
_CACHE_SIZE = 256


@dataclass(frozen=True)
class SecretInfo:
    """What may be said about a secret: never its value."""

    name: str
    created_at: datetime
    updated_at: datetime


def check_secret_name(name: object) -> str:
    """``name`` if it is a valid secret name, else ``InvalidRequestError`` with the rule."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name[:80]) if isinstance(name, str) else type(name).__name__
        raise InvalidRequestError(
            f"secret name {shown} is invalid: 1 to 64 characters of letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return name


def _aad(tenant_id: str, name: str) -> bytes:
    return f"{tenant_id}\0{name}".encode()


def _aware(dt: datetime) -> datetime:
    # SQLite hands DateTime(timezone=True) columns back naive; they were written as UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _info(row: SecretRow) -> SecretInfo:
    return SecretInfo(
        name=row.name, created_at=_aware(row.created_at), updated_at=_aware(row.updated_at)
    )


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


class SecretService:
    def __init__(self, store: Store, data_dir: Path) -> None:
        self._store = store
        self._key_path = data_dir / KEY_FILE
        self._master: bytes | None = None
        self._aead: AESGCM | None = None
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        # Bumped by every put and delete: a value read from the store before one of those
        # finished must not be cached after it (it could be the old value).
        self._generation = 0
        # Puts one at a time, so that two new secrets cannot both pass the quota check.
        self._put_lock = asyncio.Lock()

    # --- the key ----------------------------------------------------------------------------
    def start(self) -> None:
        """Load the master key, making it on first start; refuse a key file that is not one."""
        try:
            master = self._read_key()
        except FileNotFoundError:
            master = self._make_key()
        self._master = master
        self._aead = AESGCM(_hkdf(master, _AT_REST_LABEL))

    def _read_key(self) -> bytes:
        path = self._key_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RuntimeFailure(
                    f"{path} is a symbolic link: the secrets key must be a regular file"
                ) from None
            raise RuntimeFailure(f"cannot read the secrets key {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RuntimeFailure(f"{path} is not a regular file: it cannot be the secrets key")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                # Refused rather than fixed: whoever could read it may have a copy already, and
                # the operator has to know (and may have to rotate every secret).
                raise RuntimeFailure(
                    f"{path} has mode {mode:04o}: the secrets key must be readable by its owner "
                    f"only; check who could read it, then chmod 600 {path}"
                )
            if st.st_size != KEY_BYTES:
                raise RuntimeFailure(
                    f"{path} is {st.st_size} bytes long, not {KEY_BYTES}: it is not corral's "
                    "secrets key (restore it from a backup; without it no secret can be read)"
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                key = f.read(KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise RuntimeFailure(f"{path} changed while it was read; start again")
        return key

    def _make_key(self) -> bytes:
        """Write a new key so that ``secrets.key`` is either absent or whole, even across a
        crash: written and synced under a temporary name, then hard-linked into place (which,
        like O_EXCL, fails if another start made one meanwhile)."""
        path = self._key_path
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)  # left by a start that crashed before the link
        key = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
                if os.write(fd, key) != KEY_BYTES:
                    raise OSError(errno.EIO, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return self._read_key()  # another process made it first: use that one
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise RuntimeFailure(f"cannot create the secrets key {path}: {e.strerror}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return key

    def _sealer(self) -> AESGCM:
        if self._aead is None:
            raise RuntimeFailure("the secrets service was not started")
        return self._aead

    def derive_key(self, label: bytes) -> bytes:
        """32 bytes derived from the master key for ``label`` (HKDF-SHA256, ``label`` as its
        info): the same for the same label across restarts, unrelated for different labels."""
        if self._master is None:
            raise RuntimeFailure("the secrets service was not started")
        if not isinstance(label, bytes) or not label:
            raise ValueError("derive_key needs a non-empty bytes label")
        if label == _AT_REST_LABEL:
            raise ValueError("that label is reserved for the key secrets are sealed with")
        return _hkdf(self._master, label)

    # --- secrets ----------------------------------------------------------------------------
    async def put(self, tenant_id: str, name: str, value: str) -> SecretInfo:
        """Create the secret or replace its value (``updated_at`` changes, ``created_at`` not)."""
        check_secret_name(name)
        check_secret_value(value)
        aead = self._sealer()
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = aead.encrypt(nonce, value.encode(), _aad(tenant_id, name))
        now = datetime.now(UTC)
        async with self._put_lock:
            if await self._store.get_secret(tenant_id, name) is None:
                count = await self._store.count_secrets(tenant_id)
                if count >= MAX_SECRETS_PER_TENANT:
                    raise QuotaExceededError(
                        f"tenant {tenant_id} has {count} secrets, the most it may have "
                        f"({MAX_SECRETS_PER_TENANT}); delete some first"
                    )
            row = await self._store.put_secret(
                SecretRow(
                    tenant_id=tenant_id,
                    name=name,
                    nonce=nonce,
                    ciphertext=sealed,
                    created_at=now,
                    updated_at=now,
                )
            )
            self._forget(tenant_id, name)
        return _info(row)

    async def list(self, tenant_id: str) -> builtins.list[SecretInfo]:
        """The tenant's secrets by name: names and times, no values."""
        return [_info(r) for r in await self._store.list_secrets(tenant_id)]

    async def info(self, tenant_id: str, name: str) -> SecretInfo:
        return _info(await self._row(tenant_id, name))

    async def delete(self, tenant_id: str, name: str) -> None:
        check_secret_name(name)
        deleted = await self._store.delete_secret(tenant_id, name)
        self._forget(tenant_id, name)
        if not deleted:
            raise _not_found(name)

    async def exists(self, tenant_id: str, names: Iterable[str]) -> builtins.list[str]:
        """Those of ``names`` the tenant has no secret by, in the order given (for checking a
        create's bindings before anything is made)."""
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            check_secret_name(name)
        have = await self._store.secret_names(tenant_id, wanted)
        return [n for n in wanted if n not in have]

    async def value(self, tenant_id: str, name: str) -> str:
        """The secret's value, for the egress proxy only: nothing that answers a caller may
        use this. ``RuntimeFailure`` if the stored row does not decrypt."""
        key = (tenant_id, name)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        generation = self._generation
        row = await self._row(tenant_id, name)
        plain = self._open(row)
        if generation == self._generation:
            self._cache[key] = plain
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return plain

    # --- helpers ----------------------------------------------------------------------------
    async def _row(self, tenant_id: str, name: str) -> SecretRow:
        check_secret_name(name)
        row = await self._store.get_secret(tenant_id, name)
        if row is None:
            raise _not_found(name)
        return row

    def _open(self, row: SecretRow) -> str:
        what = f"secret {row.name!r} of tenant {row.tenant_id}"
        if len(row.nonce) != NONCE_BYTES:
            raise RuntimeFailure(
                f"{what} cannot be decrypted: its stored nonce is {len(row.nonce)} bytes, "
                f"not {NONCE_BYTES} (the row was altered)"
            )
        try:
            plain = self._sealer().decrypt(row.nonce, row.ciphertext, _aad(row.tenant_id, row.name))
        except InvalidTag:
            raise RuntimeFailure(
                f"{what} cannot be decrypted: it fails authentication, so either its row was "
                f"altered or {self._key_path} is not the key it was sealed with; set it again"
            ) from None
        try:
            return plain.decode()
        except UnicodeDecodeError:  # authentic, so only a bug could get here; never guess
            raise RuntimeFailure(f"{what} decrypts to bytes that are not UTF-8") from None

    def _forget(self, tenant_id: str, name: str) -> None:
        self._generation += 1
        self._cache.pop((tenant_id, name), None)


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"no secret named {name!r}")
