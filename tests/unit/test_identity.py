"""Sandbox identity tokens: claims, limits, key files, rotation, and rejection by an external verifier and by introspection."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from corral.config import IdentityConfig, ServerConfig
from corral.core.identity import IdentityService, thumbprint
from corral.core.lifecycle import SandboxState
from corral.core.sandboxes import Sandbox
from corral.errors import InvalidRequestError, SandboxNotRunningError

AUD = "https://api.example.com"
ISSUER = "https://corral.example.com"


class Clock:
    """The service's time, moved by the test."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sandboxes:
    """The sandbox service as identity sees it: the live sandboxes by id."""

    def __init__(self) -> None:
        self.live: dict[str, Sandbox] = {}

    def live_sandbox(self, sandbox_id: str) -> Sandbox | None:
        return self.live.get(sandbox_id)


def make_sandbox(clock: Clock, **changes: Any) -> Sandbox:
    sb = Sandbox(
        id="sb-0123456789ab",
        tenant_id="acme",
        template="minimal@3",
        runtime="container",
        state=SandboxState.RUNNING,
        cpu=1.0,
        memory_mb=512,
        disk_mb=2048,
        timeout=300,
        created_at=datetime.fromtimestamp(clock.t - 5, UTC),
        expires_at=None,
        metadata={"task": "T-42", "repo": "acme/app"},
    )
    return replace(sb, **changes)


def service(tmp_path: Path, clock: Clock, sandboxes: Sandboxes, **config: Any) -> IdentityService:
    svc = IdentityService(IdentityConfig(issuer=ISSUER, **config), tmp_path, sandboxes, clock=clock)
    svc.load()
    return svc


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def sandboxes(clock: Clock) -> Sandboxes:
    s = Sandboxes()
    sb = make_sandbox(clock)
    s.live[sb.id] = sb
    return s


@pytest.fixture
def svc(tmp_path: Path, clock: Clock, sandboxes: Sandboxes) -> IdentityService:
    return service(tmp_path, clock, sandboxes)


def verify(token: str, jwks: dict[str, Any], audience: str = AUD) -> dict[str, Any]:
    """What an external service does with only the published JWKS (and real time)."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]  # KeyError: a key it does not publish
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=["EdDSA"],
        audience=audience,
        issuer=ISSUER,
        options={"require": ["exp", "iat", "nbf", "sub", "aud", "iss", "jti"]},
    )
    return claims


def _sb(sandboxes: Sandboxes) -> Sandbox:
    return next(iter(sandboxes.live.values()))


def _kids(svc: IdentityService) -> list[str]:
    return [k["kid"] for k in svc.jwks()["keys"]]


# --------------------------------------------------------------------------- minting


def test_mint_claims(svc: IdentityService, sandboxes: Sandboxes, clock: Clock) -> None:
    sb = _sb(sandboxes)
    token = svc.mint(sb, AUD)
    claims = verify(token.jwt, svc.jwks())
    now = int(clock.t)
    assert claims == {
        "iss": ISSUER,
        "sub": sb.id,
        "aud": AUD,
        "tenant": "acme",
        "template": "minimal@3",
        "labels": {"task": "T-42", "repo": "acme/app"},
        "scopes": [],
        "iat": now,
        "nbf": now,
        "exp": now + 900,  # the default lifetime
        "jti": claims["jti"],
    }
    assert token.expires_at == datetime.fromtimestamp(now + 900, UTC)
    header = jwt.get_unverified_header(token.jwt)
    assert header["alg"] == "EdDSA" and header["kid"] == _kids(svc)[0]
    again = verify(svc.mint(sb, AUD, ttl_s=60).jwt, svc.jwks())
    assert again["exp"] - again["iat"] == 60
    assert again["jti"] != claims["jti"] and len(claims["jti"]) >= 20


def test_lifetime_is_at_most_an_hour(svc: IdentityService, sandboxes: Sandboxes) -> None:
    sb = _sb(sandboxes)
    claims = verify(svc.mint(sb, AUD, ttl_s=3600).jwt, svc.jwks())
    assert claims["exp"] - claims["iat"] == 3600
    for bad in (3601, 86400, 0, -5):
        with pytest.raises(InvalidRequestError, match=r"ttl must be .* 1 to 3600 seconds"):
            svc.mint(sb, AUD, ttl_s=bad)
    with pytest.raises(InvalidRequestError):
        svc.mint(sb, AUD, ttl_s=True)
    # Nor can the configuration lift the cap, or default beyond its own maximum.
    with pytest.raises(ValidationError, match="at most 3600"):
        IdentityConfig(max_token_ttl_s=3601)
    with pytest.raises(ValidationError, match="must not exceed"):
        IdentityConfig(token_ttl_s=700, max_token_ttl_s=600)
    with pytest.raises(ValidationError):
        IdentityConfig(rotate_after=5)  # type: ignore[call-arg]  # unknown keys are errors


def test_lower_configured_maximum(tmp_path: Path, clock: Clock, sandboxes: Sandboxes) -> None:
    svc = service(tmp_path, clock, sandboxes, token_ttl_s=60, max_token_ttl_s=120)
    assert verify(svc.mint(_sb(sandboxes), AUD).jwt, svc.jwks())["exp"] == int(clock.t) + 60
    with pytest.raises(InvalidRequestError, match="1 to 120 seconds"):
        svc.mint(_sb(sandboxes), AUD, ttl_s=121)


@pytest.mark.parametrize(
    "audience", ["", "*", "https://*.example.com", "a" * 257, "two words", "tab\there", "nl\n"]
)
def test_bad_audience_refused(svc: IdentityService, sandboxes: Sandboxes, audience: str) -> None:
    with pytest.raises(InvalidRequestError, match="audience"):
        svc.mint(_sb(sandboxes), audience)


def test_longest_audience(svc: IdentityService, sandboxes: Sandboxes) -> None:
    aud = "x" * 256
    assert verify(svc.mint(_sb(sandboxes), aud).jwt, svc.jwks(), audience=aud)["aud"] == aud


@pytest.mark.parametrize(
    ("state", "pool", "allowed"),
    [
        (SandboxState.RUNNING, None, True),
        (SandboxState.PAUSED, None, True),
        (SandboxState.HIBERNATED, None, True),
        (SandboxState.CREATING, None, True),  # its template's start command may ask
        (SandboxState.RUNNING, "pool-1", True),  # taken from a warm pool: its taker's now
        (SandboxState.POOLED, "pool-1", False),
        (SandboxState.CREATING, "pool-1", False),  # being made for a warm pool
        (SandboxState.STOPPING, None, False),
        (SandboxState.ERROR, None, False),
    ],
)
def test_only_live_unpooled_sandboxes_get_tokens(
    svc: IdentityService,
    sandboxes: Sandboxes,
    clock: Clock,
    state: SandboxState,
    pool: str | None,
    allowed: bool,
) -> None:
    sb = make_sandbox(clock, state=state, pool=pool)
    sandboxes.live[sb.id] = sb
    if allowed:
        assert svc.introspect(svc.mint(sb, AUD).jwt)["active"] is True
    else:
        with pytest.raises(SandboxNotRunningError, match=state.value):
            svc.mint(sb, AUD)


def test_stopped_sandbox_gets_no_token(svc: IdentityService, sandboxes: Sandboxes) -> None:
    sb = sandboxes.live.pop(_sb(sandboxes).id)
    with pytest.raises(SandboxNotRunningError, match="stopped"):
        # The caller's copy still says running: the service asks what is live now.
        svc.mint(sb, AUD)


# --------------------------------------------------------------------------- keys


def test_key_files_are_private(tmp_path: Path, svc: IdentityService) -> None:
    keys_dir = tmp_path / "identity"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    files = list(keys_dir.iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert files[0].read_text().startswith("-----BEGIN PRIVATE KEY-----")
    (kid,) = _kids(svc)
    assert kid in files[0].name


def test_jwks_shape(svc: IdentityService) -> None:
    (key,) = svc.jwks()["keys"]
    assert set(key) == {"kty", "crv", "x", "kid", "alg", "use"}  # no private member ("d")
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert len(base64.urlsafe_b64decode(key["x"] + "=")) == 32
    # The kid is the RFC 7638 thumbprint: recomputed by hand from the published members.
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": key["x"]}, separators=(",", ":")
    ).encode()
    want = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
    assert key["kid"] == want


def test_keys_survive_a_restart(
    tmp_path: Path, svc: IdentityService, sandboxes: Sandboxes, clock: Clock
) -> None:
    token = svc.mint(_sb(sandboxes), AUD).jwt
    again = service(tmp_path, clock, sandboxes)
    assert _kids(again) == _kids(svc)
    assert again.introspect(token, AUD)["active"] is True


def test_loose_key_file_is_tightened_and_leftovers_go(
    tmp_path: Path, svc: IdentityService, sandboxes: Sandboxes, clock: Clock
) -> None:
    keys_dir = tmp_path / "identity"
    (key_file,) = keys_dir.iterdir()
    key_file.chmod(0o644)
    keys_dir.chmod(0o755)
    (keys_dir / ".ed25519-1-x.pem.tmp").write_text("half a key")
    (keys_dir / "README").write_text("not a key")
    service(tmp_path, clock, sandboxes)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert not (keys_dir / ".ed25519-1-x.pem.tmp").exists()
    assert (keys_dir / "README").exists()  # not ours: left alone


def test_damaged_key_file_stops_the_start(
    tmp_path: Path, svc: IdentityService, sandboxes: Sandboxes, clock: Clock
) -> None:
    (key_file,) = (tmp_path / "identity").iterdir()
    key_file.write_text("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidRequestError, match="not a PEM private key"):
        service(tmp_path, clock, sandboxes)


def test_rotation_keeps_old_key_until_its_tokens_expired(
    tmp_path: Path, clock: Clock, sandboxes: Sandboxes
) -> None:
    t0 = clock.t
    svc = service(
        tmp_path, clock, sandboxes, rotate_after_s=1000, token_ttl_s=300, max_token_ttl_s=600
    )
    (old,) = _kids(svc)
    clock.t = t0 + 990
    sb = _sb(sandboxes)
    late = svc.mint(sb, AUD, ttl_s=600).jwt  # signed by the old key 10 s before it retires
    assert jwt.get_unverified_header(late)["kid"] == old

    clock.t = t0 + 1000  # due: the next mint makes a new key and signs with it
    fresh = svc.mint(sb, AUD).jwt
    new = jwt.get_unverified_header(fresh)["kid"]
    assert new != old
    assert _kids(svc) == [new, old]  # the current key first, the retired one still published
    assert len(list((tmp_path / "identity").iterdir())) == 2

    clock.t = t0 + 1589  # the old key's last token is still good
    assert svc.introspect(late)["active"] is True
    clock.t = t0 + 1590  # ... and now expired, but the key stays for the full maximum lifetime
    assert svc.introspect(late) == {"active": False}
    assert _kids(svc) == [new, old]
    clock.t = t0 + 1600  # retired 600 s ago: nothing it signed can still be valid
    assert _kids(svc) == [new]
    assert len(list((tmp_path / "identity").iterdir())) == 1
    assert svc.introspect(late) == {"active": False}  # unknown kid now
    assert jwt.get_unverified_header(svc.mint(sb, AUD).jwt)["kid"] == new

    # Without any mint, the periodic tick rotates too.
    clock.t = t0 + 2000
    svc.rotate()
    newest = _kids(svc)[0]
    assert _kids(svc) == [newest, new]
    # A restart sees the same keys, in the same order.
    assert _kids(service(tmp_path, clock, sandboxes, rotate_after_s=1000)) == [newest, new]


def test_server_down_past_rotation_rotates_at_start(
    tmp_path: Path, clock: Clock, sandboxes: Sandboxes
) -> None:
    limits = {"rotate_after_s": 1000, "token_ttl_s": 300, "max_token_ttl_s": 600}
    svc = service(tmp_path, clock, sandboxes, **limits)
    (old,) = _kids(svc)
    clock.t += 5000  # down for longer than rotation and retirement together
    again = service(tmp_path, clock, sandboxes, **limits)
    # The old key just retired (now): it stays until tokens it may have signed expired.
    assert _kids(again)[1:] == [old]
    clock.t += 600
    assert old not in _kids(again)


async def test_start_and_stop(tmp_path: Path, clock: Clock, sandboxes: Sandboxes) -> None:
    svc = IdentityService(IdentityConfig(), tmp_path, sandboxes, clock=clock)
    svc.start()
    try:
        assert len(_kids(svc)) == 1
    finally:
        await svc.stop()


# --------------------------------------------------------------------------- verification


def test_external_verifier_rejects_bad_tokens(
    tmp_path: Path, svc: IdentityService, sandboxes: Sandboxes, clock: Clock
) -> None:
    sb = _sb(sandboxes)
    good = svc.mint(sb, AUD).jwt
    jwks = svc.jwks()
    assert verify(good, jwks)["sub"] == sb.id

    with pytest.raises(jwt.InvalidAudienceError):
        verify(good, jwks, audience="https://other.example.com")

    # Expired: minted 1000 s ago for 900 s (external verifiers use real time).
    clock.t -= 1000
    expired = svc.mint(sb, AUD).jwt
    clock.t += 1000
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(expired, jwks)

    # Tampered: another sandbox's id put in the payload, the signature kept.
    head, payload, sig = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "sb-ffffffffffff"
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    tampered = f"{head}.{forged_payload}.{sig}"
    with pytest.raises(jwt.InvalidSignatureError):
        verify(tampered, jwks)

    # Signed by a key this server does not publish: under its own kid, and under ours.
    stranger = Ed25519PrivateKey.generate()
    unknown_kid = jwt.encode(claims, stranger, algorithm="EdDSA", headers={"kid": "nope"})
    with pytest.raises(KeyError):
        verify(unknown_kid, jwks)
    stolen_kid = jwt.encode(claims, stranger, algorithm="EdDSA", headers={"kid": _kids(svc)[0]})
    with pytest.raises(jwt.InvalidSignatureError):
        verify(stolen_kid, jwks)
    assert thumbprint(stranger) not in _kids(svc)


def test_introspection(svc: IdentityService, sandboxes: Sandboxes, clock: Clock) -> None:
    sb = _sb(sandboxes)
    good = svc.mint(sb, AUD).jwt
    got = svc.introspect(good, AUD)
    assert got["active"] is True
    assert (got["sub"], got["aud"], got["tenant"], got["iss"]) == (sb.id, AUD, "acme", ISSUER)
    assert got["labels"] == {"task": "T-42", "repo": "acme/app"}
    assert got["scope"] == "" and got["token_type"] == "Bearer"
    assert svc.introspect(good)["active"] is True  # no audience given: not checked

    inactive = {"active": False}
    assert svc.introspect(good, "https://other.example.com") == inactive
    head, payload, sig = good.split(".")
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    assert svc.introspect(f"{head}.{payload}.{flipped}") == inactive
    for junk in ("", "not.a.jwt", "a" * 100, good + "x"):
        assert svc.introspect(junk) == inactive

    stranger = Ed25519PrivateKey.generate()
    claims = jwt.decode(good, options={"verify_signature": False})
    for kid in ("nope", _kids(svc)[0]):
        forged = jwt.encode(claims, stranger, algorithm="EdDSA", headers={"kid": kid})
        assert svc.introspect(forged) == inactive
    # No signature, or an HMAC keyed with the public key (algorithm confusion).
    assert svc.introspect(jwt.encode(claims, "", algorithm="none")) == inactive
    public_x = svc.jwks()["keys"][0]["x"].encode()
    hs = jwt.encode(claims, public_x, algorithm="HS256", headers={"kid": _kids(svc)[0]})
    assert svc.introspect(hs) == inactive

    # Another issuer's token (say, the server's URL changed) does not hold either.
    other = IdentityService(
        IdentityConfig(issuer="https://elsewhere.example.com"),
        svc._dir.parent,  # the same keys
        sandboxes,
        clock=clock,
    )
    other.load()
    assert other.introspect(good) == inactive

    # Not yet valid and expired, on the service's clock.
    clock.t -= 10
    assert svc.introspect(good) == inactive
    clock.t += 10 + 900
    assert svc.introspect(good) == inactive
    clock.t -= 1
    assert svc.introspect(good)["active"] is True


def test_kill_revokes(svc: IdentityService, sandboxes: Sandboxes, clock: Clock) -> None:
    sb = _sb(sandboxes)
    token = svc.mint(sb, AUD).jwt
    assert svc.introspect(token)["active"] is True
    for state in (SandboxState.STOPPING, SandboxState.ERROR):
        sandboxes.live[sb.id] = replace(sb, state=state)
        assert svc.introspect(token) == {"active": False}
    sandboxes.live[sb.id] = replace(sb, state=SandboxState.PAUSED)
    assert svc.introspect(token)["active"] is True  # asleep is not dead
    del sandboxes.live[sb.id]  # killed
    assert svc.introspect(token) == {"active": False}
    # Were an id ever reused, the new sandbox would not inherit the old one's tokens.
    sandboxes.live[sb.id] = replace(sb, created_at=datetime.fromtimestamp(clock.t + 1, UTC))
    assert svc.introspect(token) == {"active": False}
    sandboxes.live[sb.id] = replace(sb, tenant_id="someone-else")
    assert svc.introspect(token) == {"active": False}


# --------------------------------------------------------------------------- config


def test_issuer_and_discovery(tmp_path: Path, sandboxes: Sandboxes, clock: Clock) -> None:
    default = IdentityService(
        ServerConfig().identity, tmp_path, sandboxes, listen="127.0.0.1:7711", clock=clock
    )
    assert default.issuer == "http://127.0.0.1:7711"
    conf = IdentityConfig(issuer="https://corral.example.com/")
    svc = IdentityService(conf, tmp_path, sandboxes, clock=clock)
    doc = svc.discovery()
    assert doc["issuer"] == ISSUER
    assert doc["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
    assert doc["introspection_endpoint"] == f"{ISSUER}/v1/identity/introspect"
    assert doc["id_token_signing_alg_values_supported"] == ["EdDSA"]
    assert doc["response_types_supported"] == ["id_token"]
    assert doc["subject_types_supported"] == ["public"]
    for bad in ("corral.example.com", "ftp://x", "https://x/?q=1", "https://x/#f", "https://"):
        with pytest.raises(ValidationError, match="issuer"):
            IdentityConfig(issuer=bad)
    loaded = ServerConfig.model_validate({"identity": {"issuer": ISSUER, "token_ttl_s": 60}})
    assert loaded.identity.token_ttl_s == 60
