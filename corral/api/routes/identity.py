"""Sandbox identity: the public keys and discovery document external verifiers fetch, token
introspection (RFC 7662), and minting a sandbox's token for its owner."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from corral.api.deps import Caller, Svc
from corral.errors import InvalidRequestError

router = APIRouter(tags=["identity"])

# Verifiers may cache the keys a little; one that meets an unknown kid fetches them again.
_PUBLIC_CACHE = {"Cache-Control": "public, max-age=300"}
_NO_STORE = {"Cache-Control": "no-store"}


class MintToken(BaseModel):
    model_config = ConfigDict(extra="forbid")

    audience: str = Field(description="the service the token is for (its `aud`)")
    ttl: int | None = Field(default=None, description="seconds; at most 3600")


class TokenOut(BaseModel):
    token: str
    expires_at: datetime


class Introspect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str
    audience: str | None = None
    token_type_hint: str | None = None  # RFC 7662: accepted, not needed (one kind of token)


@router.get("/.well-known/jwks.json")
async def jwks(svc: Svc) -> JSONResponse:
    """The public keys sandbox tokens are signed with (no authentication)."""
    return JSONResponse(svc.identity.jwks(), headers=_PUBLIC_CACHE)


@router.get("/.well-known/openid-configuration")
async def openid_configuration(svc: Svc) -> JSONResponse:
    """OpenID Connect discovery for the token issuer (no authentication)."""
    return JSONResponse(svc.identity.discovery(), headers=_PUBLIC_CACHE)


async def _introspect_body(request: Request) -> Introspect:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    data: Any
    if kind == "application/x-www-form-urlencoded":
        form = await request.form()
        data = {k: v for k, v in form.items() if isinstance(v, str)}
    elif kind == "application/json":
        try:
            data = json.loads(await request.body())
        except ValueError as e:
            raise InvalidRequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise InvalidRequestError('the body must be a JSON object: {"token": "..."}')
    else:
        raise InvalidRequestError(
            "send the token as application/x-www-form-urlencoded (token=...) or as "
            'application/json ({"token": "..."})'
        )
    try:
        return Introspect.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: "
            + ("unknown field" if err["type"] == "extra_forbidden" else err["msg"])
            for err in e.errors()
        )
        raise InvalidRequestError(problems) from None


@router.post("/v1/identity/introspect")
async def introspect(request: Request, _who: Caller, svc: Svc) -> JSONResponse:
    """RFC 7662 token introspection: ``{"active": false}`` unless the token is one of this
    server's, unexpired, for ``audience`` (when given), and its sandbox is still alive. Any
    tenant's API key may ask (the token itself is what is checked)."""
    body = await _introspect_body(request)
    return JSONResponse(svc.identity.introspect(body.token, body.audience), headers=_NO_STORE)


@router.post("/v1/sandboxes/{sandbox_id}/token", tags=["sandboxes"])
async def mint_token(
    sandbox_id: str, cmd: MintToken, who: Caller, svc: Svc, response: Response
) -> TokenOut:
    """A signed identity token of the sandbox for ``audience``, valid ``ttl`` seconds."""
    sb = await svc.sandboxes.get(who, sandbox_id)
    token = svc.identity.mint(sb, cmd.audience, cmd.ttl)
    response.headers.update(_NO_STORE)
    return TokenOut(token=token.jwt, expires_at=token.expires_at)
