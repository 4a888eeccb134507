"""The ``isolation`` fixture's create fields (``tests/conftest.py``) as the SDK and the CLI take
them, and the mark that keeps a test that proves nothing per tier on the container tier only."""

from __future__ import annotations

from typing import TypedDict, cast

import pytest

# A shell command that starts a process counting in guest memory only (a tmpfs: nothing of it
# on disk): ``cat /run/mem/n`` then prints its count and its pid. It carries on only if the
# machine's memory did (a microvm's snapshot, fork, restore, hibernation).
MEMORY_COUNTER = (
    "mkdir -p /run/mem && mount -t tmpfs mem /run/mem && "
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i $$ > /run/mem/n.tmp; "
    "mv /run/mem/n.tmp /run/mem/n; sleep 0.05; done' </dev/null >/dev/null 2>&1 &"
)

__all__ = ["MEMORY_COUNTER", "Tier", "cli_args", "container_only", "sdk_args"]


class Tier(TypedDict, total=False):
    """``Sandbox.create`` keyword arguments of one tier (empty for the container tier)."""

    isolation: str
    vcpus: int
    memory_mb: int


def sdk_args(isolation: dict[str, object]) -> Tier:
    """The ``isolation`` fixture's fields as keyword arguments of ``Sandbox.create``."""
    assert set(isolation) <= set(Tier.__annotations__), isolation
    return cast(Tier, isolation)


def cli_args(isolation: dict[str, object]) -> list[str]:
    """The ``isolation`` fixture's fields as options of ``corral create``."""
    args: list[str] = []
    for key, value in isolation.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


# Direct parametrization overrides the ``isolation`` fixture: a test so marked runs once, on the
# container tier. For tests of the service, SDK or CLI themselves (state machine, argument
# parsing, error mapping), where a VM would only make the run slower.
container_only = pytest.mark.parametrize("isolation", [{}], ids=["container"])
