"""Error wording shared by the API's flavours (corral's own and the E2B-compatible one)."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError

__all__ = ["validation_message"]


def validation_message(exc: RequestValidationError) -> str:
    """One line naming each invalid field and why."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"
