"""Services: lifecycle, processes, files, templates, tenants. Nothing here knows about HTTP.

The service container is ``corral.core.services.Services``; it is not re-exported here so that
importing a small piece of core (say, the state enum) does not pull in every runtime dependency.
"""

from corral.core.lifecycle import SandboxState
from corral.core.tenants import Principal

__all__ = ["Principal", "SandboxState"]
