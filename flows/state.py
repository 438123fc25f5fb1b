"""The rollout state machine: which transitions exist and what each one means.

Persisted in DuckDB (`rollouts.state`, every step in `rollout_transitions` with its
cause). Pure: no I/O here, so the rules are testable as a table.
"""

from __future__ import annotations

from enum import StrEnum


class RolloutState(StrEnum):
    STARTED = "started"
    RUNNING = "running"
    HOLDING = "holding"
    AWAITING_APPROVAL = "awaiting_approval"
    ROLLED_BACK = "rolled_back"
    COMPLETED = "completed"
    ABORTED = "aborted"


ACTIVE = frozenset(
    {
        RolloutState.STARTED,
        RolloutState.RUNNING,
        RolloutState.HOLDING,
        RolloutState.AWAITING_APPROVAL,
    }
)
TERMINAL = frozenset({RolloutState.ROLLED_BACK, RolloutState.COMPLETED, RolloutState.ABORTED})

ALLOWED: dict[RolloutState, frozenset[RolloutState]] = {
    RolloutState.STARTED: frozenset(
        {RolloutState.RUNNING, RolloutState.ROLLED_BACK, RolloutState.ABORTED}
    ),
    RolloutState.RUNNING: frozenset(
        {
            RolloutState.RUNNING,
            RolloutState.HOLDING,
            RolloutState.AWAITING_APPROVAL,
            RolloutState.ROLLED_BACK,
            RolloutState.COMPLETED,
            RolloutState.ABORTED,
        }
    ),
    RolloutState.HOLDING: frozenset(
        {
            RolloutState.RUNNING,
            RolloutState.HOLDING,
            RolloutState.AWAITING_APPROVAL,
            RolloutState.ROLLED_BACK,
            RolloutState.COMPLETED,
            RolloutState.ABORTED,
        }
    ),
    RolloutState.AWAITING_APPROVAL: frozenset(
        {
            RolloutState.RUNNING,
            RolloutState.COMPLETED,
            RolloutState.ROLLED_BACK,
            RolloutState.ABORTED,
        }
    ),
    RolloutState.ROLLED_BACK: frozenset(),
    RolloutState.COMPLETED: frozenset(),
    RolloutState.ABORTED: frozenset(),
}


class TransitionError(ValueError):
    pass


def check_transition(current: RolloutState, target: RolloutState) -> None:
    if target not in ALLOWED[current]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[current])) or "none (terminal)"
        raise TransitionError(
            f"a rollout in state {current.value} cannot become {target.value}; allowed: {allowed}"
        )
