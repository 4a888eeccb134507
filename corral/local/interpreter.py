"""The Python that runs corral's in-sandbox helpers (the guard, the network relay).

They need only the standard library and run as the sandbox's user, who may not be able to reach
this interpreter (corral installed under /root, run by root for a user): then a system one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from corral.errors import RuntimeFailure

__all__ = ["interpreter"]

# Interpreters to fall back on (the helpers need Python 3.8 or later).
_FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


def interpreter(owner: tuple[int, int] | None) -> str:
    """This interpreter, or a system one when ``owner`` (uid, gid) could not run this one."""
    if owner is None or owner[0] == os.geteuid():
        return sys.executable
    for candidate in (sys.executable, *_FALLBACK_PYTHONS):
        if _runnable_by(candidate, *owner):
            return candidate
    raise RuntimeFailure(
        f"no Python interpreter that uid {owner[0]} can run for corral's in-sandbox helpers "
        f"({sys.executable} is out of its reach; install python3)"
    )


def _runnable_by(path: str, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` may execute ``path``, by the mode bits of it and of every
    directory on the way (as given and resolved). Supplementary groups and ACLs are not
    consulted: a false "no" only picks a system interpreter instead."""
    if uid == 0:
        return os.path.isfile(path)
    real = Path(os.path.realpath(path))
    given = Path(os.path.abspath(path))
    steps = {*given.parents, *real.parents}
    try:
        if not real.is_file():
            return False
        return _allows(real.stat(), uid, gid, 0o1) and all(
            _allows(d.stat(), uid, gid, 0o1) for d in steps
        )
    except OSError:
        return False


def _allows(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid == gid:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits
