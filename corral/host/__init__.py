"""Host plumbing under the runtimes: kernel interfaces (mounts, user namespaces, quotas, cgroups)
and the OCI runtime subprocess boundary.

Every module translates kernel and subprocess failures into ``corral.errors.RuntimeFailure`` so
nothing above ``corral.runtime`` sees ``OSError``.
"""

from __future__ import annotations

__all__: list[str] = []
