"""Sandbox identity over HTTP: public JWKS and discovery, a token an external verifier accepts with only the JWKS, introspection until kill, and 4xx for bad input."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import jwt
import pytest

from tests.integration.server_harness import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("server_no_leaks")]

AUD = "https://api.example.com"


@pytest.fixture
def api(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def sandbox(api: httpx.Client) -> Iterator[str]:
    r = api.post(
        "/v1/sandboxes",
        json={"template": "minimal", "timeout": 600, "metadata": {"task": "T-7", "repo": "a/b"}},
    )
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    yield sid
    api.delete(f"/v1/sandboxes/{sid}")


def test_keys_and_discovery_need_no_key(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        keys = anonymous.get("/.well-known/jwks.json")
        doc = anonymous.get("/.well-known/openid-configuration")
    assert keys.status_code == 200 and doc.status_code == 200
    (key,) = keys.json()["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in key and key["kid"]
    d = doc.json()
    # The issuer defaults to the address the server listens on.
    assert d["issuer"] == server.url
    assert d["jwks_uri"] == f"{server.url}/.well-known/jwks.json"
    assert d["introspection_endpoint"] == f"{server.url}/v1/identity/introspect"
    assert d["id_token_signing_alg_values_supported"] == ["EdDSA"]


def test_token_verified_externally_and_revoked_at_kill(
    server: RunningServer, api: httpx.Client, sandbox: str
) -> None:
    r = api.post(f"/v1/sandboxes/{sandbox}/token", json={"audience": AUD, "ttl": 600})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    token = r.json()["token"]
    assert r.json()["expires_at"]

    # An external verifier: PyJWT with only what the server publishes.
    discovery = httpx.get(f"{server.url}/.well-known/openid-configuration").json()
    keys = jwt.PyJWKClient(discovery["jwks_uri"])
    claims = jwt.decode(
        token,
        keys.get_signing_key_from_jwt(token),
        algorithms=["EdDSA"],
        audience=AUD,
        issuer=discovery["issuer"],
        options={"require": ["exp", "iat", "nbf", "sub", "aud", "iss", "jti"]},
    )
    assert claims["sub"] == sandbox
    assert claims["tenant"] == "admin"
    assert claims["template"].startswith("minimal")
    assert claims["labels"] == {"task": "T-7", "repo": "a/b"}
    assert claims["scopes"] == []
    assert claims["exp"] - claims["iat"] == 600
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, keys.get_signing_key_from_jwt(token), algorithms=["EdDSA"], audience="x")

    # Introspection (RFC 7662), as a form and as JSON; by any tenant's key.
    tenant = "idt-" + secrets.token_hex(3)
    assert api.post("/v1/tenants", json={"name": tenant}).status_code == 201
    other_key = api.post(f"/v1/tenants/{tenant}/keys", json={"name": "rs"}).json()["key"]
    with server.client(other_key) as other:
        r = other.post("/v1/identity/introspect", data={"token": token, "audience": AUD})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["active"] is True and got["sub"] == sandbox and got["aud"] == AUD
        # ... but that tenant cannot mint for a sandbox that is not its own.
        assert (
            other.post(f"/v1/sandboxes/{sandbox}/token", json={"audience": AUD}).status_code == 404
        )
    r = api.post("/v1/identity/introspect", json={"token": token})
    assert r.json()["active"] is True
    wrong_aud = api.post("/v1/identity/introspect", json={"token": token, "audience": "x"})
    assert wrong_aud.json() == {"active": False}
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert api.post("/v1/identity/introspect", json={"token": tampered}).json() == {"active": False}

    assert api.delete(f"/v1/sandboxes/{sandbox}").status_code == 204
    r = api.post("/v1/identity/introspect", data={"token": token})
    assert r.status_code == 200 and r.json() == {"active": False}
    # A killed sandbox gets no new token either.
    r = api.post(f"/v1/sandboxes/{sandbox}/token", json={"audience": AUD})
    assert r.status_code == 409 and r.json()["error"]["code"] == "sandbox_not_running"


def test_bad_input(server: RunningServer, api: httpx.Client, sandbox: str) -> None:
    url = f"/v1/sandboxes/{sandbox}/token"

    def message(r: httpx.Response) -> str:
        assert r.status_code == 400, (r.status_code, r.text)
        text: str = r.json()["error"]["message"]
        return text

    assert "audience" in message(api.post(url, json={}))
    assert "wildcards" in message(api.post(url, json={"audience": "*"}))
    assert "wildcards" in message(api.post(url, json={"audience": "https://*.example.com"}))
    assert "256" in message(api.post(url, json={"audience": "a" * 257}))
    assert "3600" in message(api.post(url, json={"audience": AUD, "ttl": 3601}))
    assert "3600" in message(api.post(url, json={"audience": AUD, "ttl": 0}))
    assert "ttl" in message(api.post(url, json={"audience": AUD, "ttl": "soon"}))
    assert "unknown field" in message(api.post(url, json={"audience": AUD, "scope": "x"}))

    r = api.post("/v1/sandboxes/sb-000000000000/token", json={"audience": AUD})
    assert r.status_code == 404
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.post(url, json={"audience": AUD}).status_code == 401
        r = anonymous.post("/v1/identity/introspect", data={"token": "x"})
        assert r.status_code == 401

    intro = "/v1/identity/introspect"
    assert "token" in message(api.post(intro, json={}))
    assert "token" in message(api.post(intro, data={"audience": AUD}))
    assert "JSON object" in message(api.post(intro, json=["x"]))
    assert "form-urlencoded" in message(
        api.post(intro, content=b"x", headers={"content-type": "text/plain"})
    )
    assert api.post(intro, json={"token": "not-a-jwt"}).json() == {"active": False}


def test_scopes_chosen_at_create_are_in_tokens_and_forks(api: httpx.Client) -> None:
    scopes = ["repo:read", "deploy/staging"]
    r = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 300, "scopes": scopes})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    forks: list[str] = []
    snap: str | None = None
    try:
        assert r.json()["scopes"] == scopes
        token = api.post(f"/v1/sandboxes/{sid}/token", json={"audience": AUD}).json()["token"]
        assert jwt.decode(token, options={"verify_signature": False})["scopes"] == scopes
        answer = api.post("/v1/identity/introspect", json={"token": token}).json()
        assert answer["active"] and answer["scope"] == "repo:read deploy/staging"
        # A fork of its snapshot carries them on.
        snap = api.post(f"/v1/sandboxes/{sid}/snapshots", json={}).json()["id"]
        made = api.post(f"/v1/snapshots/{snap}/fork", json={"count": 1})
        assert made.status_code == 201, made.text
        forks = [s["id"] for s in made.json()]
        assert api.get(f"/v1/sandboxes/{forks[0]}").json()["scopes"] == scopes
    finally:
        for f in forks:
            api.delete(f"/v1/sandboxes/{f}")
        api.delete(f"/v1/sandboxes/{sid}")
        if snap is not None:
            api.delete(f"/v1/snapshots/{snap}")
    for bad in (["has space"], ['quo"te'], [""], ["x" * 129], ["s"] * 33):
        r = api.post("/v1/sandboxes", json={"template": "minimal", "scopes": bad})
        assert r.status_code == 400 and "scopes" in r.json()["error"]["message"], (bad, r.text)
