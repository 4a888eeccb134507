"""The sandbox state machine allows exactly the documented transitions and refuses the rest."""

import pytest

from corral.core.lifecycle import LIVE_STATES, SandboxState, check_transition
from corral.errors import ConflictError

S = SandboxState

LEGAL = {
    (S.CREATING, S.RUNNING),
    (S.CREATING, S.ERROR),
    (S.CREATING, S.STOPPING),
    (S.CREATING, S.POOLED),
    (S.POOLED, S.RUNNING),
    (S.POOLED, S.STOPPING),
    (S.POOLED, S.ERROR),
    (S.RUNNING, S.STOPPING),
    (S.RUNNING, S.ERROR),
    (S.RUNNING, S.PAUSED),
    (S.PAUSED, S.RUNNING),
    (S.PAUSED, S.STOPPING),
    (S.PAUSED, S.ERROR),
    (S.RUNNING, S.HIBERNATED),
    (S.PAUSED, S.HIBERNATED),
    (S.HIBERNATED, S.RUNNING),
    (S.HIBERNATED, S.STOPPING),
    (S.HIBERNATED, S.ERROR),
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.ERROR),
    (S.ERROR, S.STOPPING),
}


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_transition_table(src: SandboxState, dst: SandboxState) -> None:
    if (src, dst) in LEGAL:
        check_transition(src, dst)
    else:
        with pytest.raises(ConflictError, match=f"from {src.value} to {dst.value}"):
            check_transition(src, dst)


def test_stopped_is_final_and_not_live() -> None:
    assert S.STOPPED not in LIVE_STATES
    assert all(s in LIVE_STATES for s in S if s is not S.STOPPED)
