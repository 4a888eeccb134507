"""HTTP edge of corral."""

from corral.api.app import create_app

__all__ = ["create_app"]
