"""Sandbox identity: short-lived signed tokens (JWT, EdDSA) that say which sandbox is calling.

An external service verifies a token with nothing but the public keys this server publishes
(``jwks``, served at ``/.well-known/jwks.json``) and can ask ``introspect`` whether it still
holds: a token is revoked when its sandbox is killed. See docs/identity.md.

Signing keys are Ed25519, one PEM file each under ``DATA_DIR/identity/`` (0600, the directory
0700), named ``ed25519-<created unix time>-<kid>.pem``; the kid is the key's RFC 7638 thumbprint.
The newest key signs for ``rotate_after_s``, then a new one is made; a retired key stays
published until every token it signed has expired (``max_token_ttl_s`` after its retirement),
then its file is deleted. Rotation is lazy: on use, and on a periodic tick while started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from corral.config import DEFAULT_LISTEN, IdentityConfig
from corral.core.lifecycle import SandboxState
from corral.core.sandboxes import Sandbox
from corral.errors import InvalidRequestError, RuntimeFailure, SandboxNotRunningError

__all__ = ["ALGORITHM", "IdentityService", "LiveSandboxes", "Token"]

log = logging.getLogger("corral.identity")

ALGORITHM = "EdDSA"
KEYS_DIR = "identity"
MAX_AUDIENCE_CHARS = 256
# Longer than any token this server makes (labels are at most 64 entries of 4 KiB): not parsed.
_MAX_TOKEN_CHARS = 1 << 20
_KEY_FILE = re.compile(r"^ed25519-(\d{1,12})-([A-Za-z0-9_-]{43})\.pem$")
# States in which a sandbox is someone's and may come back to running: it may hold a token
# (a CREATING one for its template's start command), and the tokens it holds are active.
_HOLDS_TOKENS = frozenset(
    {SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.HIBERNATED}
)
_REQUIRED_CLAIMS = ["iss", "sub", "aud", "tenant", "iat", "nbf", "exp", "jti"]


class LiveSandboxes(Protocol):
    """What identity needs of the sandbox service: the sandboxes alive now, by id."""

    def live_sandbox(self, sandbox_id: str) -> Sandbox | None: ...


@dataclass(frozen=True)
class Token:
    jwt: str
    expires_at: datetime


@dataclass(frozen=True)
class _Key:
    kid: str
    created: int  # unix seconds; it retires when the next key is made
    private: Ed25519PrivateKey
    path: Path

    def public_jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64(_raw_public(self.private)),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def thumbprint(key: Ed25519PrivateKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of the key's public half, base64url."""
    members = {"crv": "Ed25519", "kty": "OKP", "x": _b64(_raw_public(key))}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(canonical).digest())


def _seconds(value: object) -> int | None:
    """A NumericDate claim as this service writes them (whole seconds), or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _holds_tokens(sb: Sandbox) -> bool:
    """Someone's sandbox, alive; not one waiting in (or being made for) a warm pool."""
    pooled = sb.pool is not None and sb.state in (SandboxState.CREATING, SandboxState.POOLED)
    return sb.state in _HOLDS_TOKENS and not pooled


def check_audience(audience: object) -> str:
    """The audience a token may be made for: one service, named in 1 to 256 characters."""
    if not isinstance(audience, str) or not 1 <= len(audience) <= MAX_AUDIENCE_CHARS:
        raise InvalidRequestError(
            f"audience must be a string of 1 to {MAX_AUDIENCE_CHARS} characters naming the "
            "service the token is for"
        )
    if "*" in audience:
        raise InvalidRequestError(
            f"audience {audience[:60]!r}: wildcards are not allowed; name one service"
        )
    if any(c.isspace() or not c.isprintable() for c in audience):
        raise InvalidRequestError(
            f"audience {audience[:60]!r} must not contain spaces or control characters"
        )
    return audience


class IdentityService:
    def __init__(
        self,
        config: IdentityConfig,
        data_dir: Path,
        sandboxes: LiveSandboxes,
        *,
        listen: str = DEFAULT_LISTEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._dir = data_dir / KEYS_DIR
        self._sandboxes = sandboxes
        self._listen = listen
        self._clock = clock
        self.issuer = config.issuer_for(listen)
        self._keys: list[_Key] = []  # oldest first; the last one signs
        self._loaded = False
        self._lock = threading.Lock()  # the metadata service may call from a thread of its own
        self._tick: asyncio.Task[None] | None = None

    # --- start and stop ---------------------------------------------------------------------
    def load(self) -> None:
        """Read the signing keys (making the directory and the first key on first start) and
        rotate or drop those whose time has come."""
        with self._lock:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._dir, 0o700)
            keys: list[_Key] = []
            for path in sorted(self._dir.iterdir()):
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # a key file whose write a crash interrupted
                    continue
                found = _KEY_FILE.match(path.name)
                if found is None:
                    log.warning("ignoring %s: not a signing key file of corral's", path)
                    continue
                keys.append(self._read_key(path, int(found.group(1)), found.group(2)))
            self._keys = sorted(keys, key=lambda k: (k.created, k.kid))
            self._loaded = True
            self._rotate_locked()
        if self._config.issuer is None:
            host = self._listen.rpartition(":")[0].strip("[]")
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(host).is_unspecified:
                    log.warning(
                        "identity tokens name the issuer %s, which no verifier can reach: set "
                        "identity.issuer to the URL this server is reached at",
                        self.issuer,
                    )

    def start(self) -> None:
        """``load``, then rotate on a periodic tick (call within the server's event loop)."""
        self.load()
        self._tick = asyncio.create_task(self._tick_forever(), name="corral-identity-keys")

    async def stop(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick
            self._tick = None

    async def _tick_forever(self) -> None:
        interval = min(60.0, max(1.0, self._config.rotate_after_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                self.rotate()
            except Exception:  # the tick must outlive a full disk; mint retries on its own
                log.exception("identity key rotation failed")

    # --- keys -------------------------------------------------------------------------------
    def rotate(self) -> None:
        """Make a new signing key if the current one is due, and delete retired keys whose
        tokens have all expired."""
        with self._lock:
            self._rotate_locked()

    def _rotate_locked(self) -> None:
        if not self._loaded:
            raise RuntimeFailure("the identity service was not started")
        now = self._clock()
        if not self._keys or now - self._keys[-1].created >= self._config.rotate_after_s:
            self._keys.append(self._make_key(int(now)))
            if len(self._keys) > 1:
                log.info("identity signing key %s now signs", self._keys[-1].kid)
        kept: list[_Key] = []
        for key, successor in zip(self._keys, self._keys[1:], strict=False):
            # It signed until its successor was made; nothing it signed lives longer than this.
            if now >= successor.created + self._config.max_token_ttl_s:
                key.path.unlink(missing_ok=True)
                log.info("identity signing key %s dropped: its tokens have expired", key.kid)
            else:
                kept.append(key)
        kept.append(self._keys[-1])
        self._keys = kept

    def _make_key(self, created: int) -> _Key:
        private = Ed25519PrivateKey.generate()
        kid = thumbprint(private)
        path = self._dir / f"ed25519-{created}-{kid}.pem"
        tmp = self._dir / f".{path.name}.tmp"
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return _Key(kid=kid, created=created, private=private, path=path)

    def _read_key(self, path: Path, created: int, kid: str) -> _Key:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if not path.is_file() or path.is_symlink():
            raise InvalidRequestError(f"{path} is not a regular file")
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o): now 0600", path, mode)
            os.chmod(path, 0o600)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"{path} is not a PEM private key: {e}") from e
        if not isinstance(private, Ed25519PrivateKey):
            raise InvalidRequestError(f"{path} is not an Ed25519 key")
        if thumbprint(private) != kid:
            raise InvalidRequestError(f"{path}: its name does not match the key's thumbprint")
        return _Key(kid=kid, created=created, private=private, path=path)

    def _key(self, kid: object) -> _Key | None:
        return next((k for k in self._keys if k.kid == kid), None)

    # --- tokens -----------------------------------------------------------------------------
    def mint(self, sandbox: Sandbox, audience: str, ttl_s: int | None = None) -> Token:
        """A token saying "this is ``sandbox``" to ``audience``, valid for ``ttl_s`` seconds
        (default ``token_ttl_s``; at most ``max_token_ttl_s``)."""
        check_audience(audience)
        most = self._config.max_token_ttl_s
        ttl = self._config.token_ttl_s if ttl_s is None else ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= most:
            raise InvalidRequestError(
                f"ttl must be a whole number of 1 to {most} seconds, got {ttl}"
            )
        # As it is now: the caller's copy may be older than a kill.
        sb = self._sandboxes.live_sandbox(sandbox.id)
        if sb is None or not _holds_tokens(sb):
            state = sb.state.value if sb is not None else "stopped"
            raise SandboxNotRunningError(
                f"sandbox {sandbox.id} is {state}: identity tokens are only issued to live "
                "sandboxes"
            )
        with self._lock:
            self._rotate_locked()
            key = self._keys[-1]
            now = int(self._clock())
            claims: dict[str, Any] = {
                "iss": self.issuer,
                "sub": sb.id,
                "aud": audience,
                "tenant": sb.tenant_id,
                "template": sb.template,
                "labels": dict(sb.metadata),
                "scopes": list(sb.scopes),
                "iat": now,
                "nbf": now,
                "exp": now + ttl,
                "jti": secrets.token_urlsafe(16),
            }
            token = jwt.encode(
                claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"}
            )
        return Token(jwt=token, expires_at=datetime.fromtimestamp(now + ttl, UTC))

    def jwks(self) -> dict[str, Any]:
        """The public keys tokens may be signed with: the current one first."""
        with self._lock:
            self._rotate_locked()
            return {"keys": [k.public_jwk() for k in reversed(self._keys)]}

    def discovery(self) -> dict[str, Any]:
        """The OpenID Connect discovery document (``/.well-known/openid-configuration``)."""
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "introspection_endpoint": f"{self.issuer}/v1/identity/introspect",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "tenant",
                "template",
                "labels",
                "scopes",
                "iat",
                "nbf",
                "exp",
                "jti",
            ],
        }

    def introspect(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """RFC 7662: ``{"active": false}`` for a token that does not hold now — bad signature,
        unknown key, wrong issuer, not yet valid or expired, another audience (when given), or
        its sandbox is gone (tokens are revoked at kill); else ``active`` and its claims."""
        inactive: dict[str, Any] = {"active": False}
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            return inactive
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return inactive
        if header.get("alg") != ALGORITHM:
            return inactive
        with self._lock:
            self._rotate_locked()
            key = self._key(header.get("kid"))
        if key is None:
            return inactive
        try:
            claims = jwt.decode(
                token,
                key.private.public_key(),
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_aud": audience is not None,
                    "strict_aud": True,
                    # Times are checked below, on this service's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError:
            return inactive
        iat, nbf, exp = (_seconds(claims.get(c)) for c in ("iat", "nbf", "exp"))
        if iat is None or nbf is None or exp is None or not nbf <= self._clock() < exp:
            return inactive
        sb = self._sandboxes.live_sandbox(str(claims["sub"]))
        if (
            sb is None
            or not _holds_tokens(sb)
            or sb.tenant_id != claims["tenant"]
            # Made for an earlier sandbox of that id (ids are random and never reused; this
            # holds even if one were).
            or iat < int(sb.created_at.timestamp())
        ):
            return inactive
        scopes = claims.get("scopes")
        scope = " ".join(scopes) if isinstance(scopes, list) else ""
        return {"active": True, **claims, "scope": scope, "token_type": "Bearer"}
