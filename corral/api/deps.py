"""Request-scoped dependencies: the services of this app and the authenticated caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from corral.core import Principal
from corral.core.services import Services
from corral.errors import PermissionDeniedError

__all__ = ["Admin", "Caller", "Svc", "api_key_of", "services_of"]


def services_of(conn: HTTPConnection) -> Services:
    svc: Services = conn.app.state.services
    return svc


def api_key_of(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return conn.headers.get("x-api-key") or None


async def _caller(request: Request) -> Principal:
    return await services_of(request).tenants.authenticate(api_key_of(request))


async def _admin(who: Annotated[Principal, Depends(_caller)]) -> Principal:
    if not who.admin:
        raise PermissionDeniedError("this needs the admin key")
    return who


def _services(request: Request) -> Services:
    return services_of(request)


Caller = Annotated[Principal, Depends(_caller)]
Admin = Annotated[Principal, Depends(_admin)]
Svc = Annotated[Services, Depends(_services)]
