"""Lifecycle commands given a wrong rollout id: they refuse before any router moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import lifecycle
from flows.control import control_store
from flows.demo.runner import DEMO_PLAN
from flows.paths import DataPaths
from flows.plan import load_plan
from flows.store.database import connect
from flows.store.rollouts import get_rollout


@pytest.fixture
def running(tmp_path: Path) -> tuple[DataPaths, str]:
    paths = DataPaths.at(tmp_path / "data").ensure()
    published = lifecycle.start(paths, load_plan(DEMO_PLAN), actor="test", rollout_id="ro-real")
    return paths, published.rollout.rollout_id


def state_of(paths: DataPaths, rollout_id: str) -> str:
    with connect(paths.database, read_only=True) as con:
        rollout = get_rollout(con, rollout_id)
    assert rollout is not None
    return rollout.state.value


def test_a_rollback_for_a_mistyped_id_publishes_nothing(running: tuple[DataPaths, str]) -> None:
    """It used to publish legacy_only first and fail after: every router went to legacy,
    the real rollout stayed running, and the next tick put the phase back."""
    paths, rid = running
    before = control_store(paths).current()
    with pytest.raises(
        lifecycle.RolloutError, match=r"no rollout 'ro-typo'.*nothing was published"
    ):
        lifecycle.rollback(paths, reason="oops", actor="alice", rollout_id="ro-typo")
    assert control_store(paths).current() == before
    assert state_of(paths, rid) == "running"
    done = lifecycle.rollback(paths, reason="for real", actor="alice", rollout_id=rid)
    assert done.rollout is not None and done.rollout.state.value == "rolled_back"
    assert control_store(paths).current().mode.value == "legacy_only"


def test_starting_an_existing_id_again_is_a_no_op_only_for_the_same_active_plan(
    running: tuple[DataPaths, str],
) -> None:
    paths, rid = running
    plan = load_plan(DEMO_PLAN)
    again = lifecycle.start(paths, plan, actor="test", rollout_id=rid)  # a retried task
    assert not again.new and again.rollout.rollout_id == rid
    other = plan.model_copy(update={"name": "another plan"})
    with pytest.raises(lifecycle.RolloutError, match="already exists with another plan"):
        lifecycle.start(paths, other, actor="test", rollout_id=rid)
    lifecycle.rollback(paths, reason="done", actor="alice", rollout_id=rid)
    published = control_store(paths).current()
    with pytest.raises(lifecycle.RolloutError, match=r"already exists \(rolled_back\)"):
        lifecycle.start(paths, plan, actor="test", rollout_id=rid)
    assert control_store(paths).current() == published  # nothing claimed, nothing moved
