"""Error bodies as E2B's API and envd send them: ``{"code": <HTTP status>, "message": ...}``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from corral.api.errors import validation_message
from corral.errors import CorralError

__all__ = ["E2BRoute", "e2b_error"]

log = logging.getLogger("corral.api")


def e2b_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


class E2BRoute(APIRoute):
    """A route whose errors come out in E2B's shape instead of corral's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except CorralError as e:
                return self.corral_error(request, e)
            except RequestValidationError as e:
                return e2b_error(400, validation_message(e))
            except HTTPException as e:
                return e2b_error(e.status_code, str(e.detail))
            except Exception:
                # E2B's clients parse every error body as JSON; a bug must not break that too.
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                return e2b_error(500, "internal server error")

        return handler

    def corral_error(self, request: Request, exc: CorralError) -> Response:
        return e2b_error(exc.status, exc.message)
