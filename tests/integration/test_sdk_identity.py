"""The SDK's sandbox identity tokens against a real server: a token from ``identity_token`` (sync and async) verifies with PyJWT against the served JWKS alone, ``introspect_token`` answers active until the sandbox is killed and inactive after, and a bad audience or ttl is ``InvalidRequestError``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

pytest.importorskip(
    "corral.api.server", reason="corral.api.server does not import yet (the server is in progress)"
)

from corral import AsyncSandbox, Sandbox, errors
from corral.sdk import IdentityToken
from tests.conftest import Conn
from tests.integration.server_harness import RunningServer, verify_identity_token

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

TEMPLATE = "minimal"
AUD = "https://api.example.com"


@pytest.fixture
def sbx(conn: Conn) -> Iterator[Sandbox]:
    with Sandbox.create(
        TEMPLATE, timeout=600, metadata={"task": "T-42"}, scopes=["repo:read"], **conn
    ) as s:
        yield s


def verify(server: RunningServer, token: str, audience: str = AUD) -> dict[str, Any]:
    return verify_identity_token(server, token, audience)


def test_token_verifies_with_the_jwks_and_is_revoked_at_kill(
    server: RunningServer, conn: Conn, sbx: Sandbox
) -> None:
    got = sbx.identity_token(AUD, ttl=600)
    assert isinstance(got, IdentityToken)
    claims = verify(server, got.token)
    assert (claims["sub"], claims["aud"], claims["tenant"]) == (sbx.id, AUD, "admin")
    assert claims["labels"] == {"task": "T-42"} and claims["scopes"] == ["repo:read"]
    assert claims["exp"] - claims["iat"] == 600
    assert got.expires_at == datetime.fromtimestamp(claims["exp"], UTC)
    # Without a ttl the server's default (900 s) applies.
    default = verify(server, sbx.identity_token(AUD).token)
    assert default["exp"] - default["iat"] == 900

    answer = Sandbox.introspect_token(got.token, audience=AUD, **conn)
    assert answer["active"] is True
    assert (answer["sub"], answer["jti"], answer["token_type"]) == (
        sbx.id,
        claims["jti"],
        "Bearer",
    )
    assert Sandbox.introspect_token(got.token, **conn)["active"] is True
    other = Sandbox.introspect_token(got.token, audience="https://other.example", **conn)
    assert other == {"active": False}
    assert Sandbox.introspect_token("not-a-jwt", **conn) == {"active": False}

    sbx.kill()
    assert Sandbox.introspect_token(got.token, audience=AUD, **conn) == {"active": False}
    # A verifier that checks only the signature still accepts it until exp (docs/identity.md).
    assert verify(server, got.token)["sub"] == sbx.id
    with pytest.raises(errors.SandboxNotRunningError):
        sbx.identity_token(AUD)


async def test_async_mint_and_introspect(server: RunningServer, conn: Conn) -> None:
    async with await AsyncSandbox.create(TEMPLATE, timeout=600, **conn) as asbx:
        got = await asbx.identity_token(AUD, ttl=120)
        claims = await asyncio.to_thread(verify, server, got.token)
        assert claims["sub"] == asbx.id and claims["exp"] - claims["iat"] == 120
        assert got.expires_at == datetime.fromtimestamp(claims["exp"], UTC)
        answer = await AsyncSandbox.introspect_token(got.token, audience=AUD, **conn)
        assert answer["active"] is True and answer["sub"] == asbx.id
        with pytest.raises(errors.InvalidRequestError, match="wildcards"):
            await asbx.identity_token("*")
    assert await AsyncSandbox.introspect_token(got.token, **conn) == {"active": False}


@pytest.mark.parametrize(
    ("audience", "ttl", "needle"),
    [
        ("", None, "1 to 256"),
        ("*", None, "wildcards"),
        ("https://*.example.com", None, "wildcards"),
        ("two words", None, "spaces"),
        ("a" * 257, None, "256"),
        (AUD, 0, "3600"),
        (AUD, 3601, "3600"),
    ],
)
def test_bad_audience_or_ttl_is_invalid_request(
    sbx: Sandbox, audience: str, ttl: int | None, needle: str
) -> None:
    with pytest.raises(errors.InvalidRequestError, match=needle):
        sbx.identity_token(audience, ttl=ttl)


def test_introspection_needs_a_valid_key(conn: Conn) -> None:
    with pytest.raises(errors.AuthenticationError):
        Sandbox.introspect_token("x", api_key="wrong-key", base_url=conn["base_url"])
