"""The E2B-compatible API: E2B's SDKs (Python and JS) work against corral unchanged.

``control_router`` is E2B's control plane (``/sandboxes``, ``/v2/sandboxes``, ``/snapshots``);
``envd_router`` is envd, the daemon E2B runs in each sandbox, served on the same port and routed
by the ``E2b-Sandbox-Id`` header. See docs/e2b.md.
"""

from corral.api.e2b.control import router as control_router
from corral.api.e2b.envd import ENVD_VERSION
from corral.api.e2b.envd import router as envd_router
from corral.api.e2b.errors import e2b_error

__all__ = ["ENVD_VERSION", "control_router", "e2b_error", "envd_router"]
