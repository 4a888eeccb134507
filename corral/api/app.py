"""The FastAPI application: the only place that knows HTTP status codes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.api import e2b
from corral.api.deps import Caller, Svc
from corral.api.errors import validation_message
from corral.api.routes import (
    files,
    identity,
    pools,
    ports,
    processes,
    sandboxes,
    secrets,
    snapshots,
    templates,
    tenants,
)
from corral.config import ServerConfig
from corral.core.ingress import IngressService
from corral.core.services import Services
from corral.errors import CorralError
from corral.runtime.base import Runtime

__all__ = ["create_app"]

log = logging.getLogger("corral.api")

_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "invalid_request",
    409: "conflict",
    413: "invalid_request",
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(config: ServerConfig, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; services start with the app's lifespan and stop with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.open(config, runtime)
        app.state.services = services
        app.state.ingress = ingress = IngressService(services.sandboxes)
        try:
            yield
        finally:
            await ingress.close()
            await services.close()

    app = FastAPI(title="corral", version=__version__, lifespan=lifespan)

    @app.exception_handler(CorralError)
    async def _corral_error(_req: Request, exc: CorralError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "invalid_request", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        if not req.url.path.startswith("/v1/") and req.url.path != "/healthz":
            # Outside corral's own API an unknown route is one of E2B's that corral lacks; its
            # SDKs can only read an error in E2B's shape.
            return e2b.e2b_error(exc.status_code, f"{req.method} {req.url.path}: {exc.detail}")
        return _error(
            exc.status_code, _STATUS_CODES.get(exc.status_code, "internal"), str(exc.detail)
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/info", tags=["health"])
    async def info(_who: Caller, svc: Svc) -> dict[str, Any]:
        """The server's version and isolation tiers (with the microvm accelerator in use)."""
        describe = getattr(svc.runtime, "describe", None)
        tiers = describe() if describe is not None else {svc.runtime.name: {}}
        return {"version": __version__, "default_isolation": svc.runtime.name, "isolation": tiers}

    for r in (
        sandboxes.router,
        snapshots.router,
        pools.router,
        processes.router,
        files.router,
        templates.router,
        tenants.router,
        ports.router,
        identity.router,
        secrets.router,
        e2b.control_router,
        e2b.envd_router,
    ):
        app.include_router(r)
    if config.network.ingress_domain:
        app.add_middleware(ports.HostIngress, domain=config.network.ingress_domain)
    return app
