"""Text from outside the operator's hands (rollout ids, reasons from alert webhooks, plan
names, values in segment files) is never interpreted where it lands: file and store
keys, HTML, Markdown, Rich markup, or a document size limit."""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from checks.frames import window_rows
from flows import lifecycle
from flows.bench.synthetic import make_table
from flows.control import MAX_DOCUMENT_REASON, legacy_only_config
from flows.demo.runner import DEMO_PLAN, LiveView, _phase_table
from flows.nightly import COLUMNS, Comparison, markdown
from flows.paths import DataPaths
from flows.plan import PlanError, load_plan
from flows.store.database import connect
from flows.tick import TickReport

HOSTILE = '<img src=x onerror="alert(1)"> [red]x[/] ![t](http://e.example/p.png) | y'


@pytest.mark.parametrize("rollout_id", ["team/canary-1", "<img src=x>", "a" * 65, ""])
def test_a_rollout_id_outside_the_safe_characters_is_refused(
    tmp_path: Path, rollout_id: str
) -> None:
    """'team/canary-1' started fine, then every evaluation failed (GX store keys refuse
    '/'): the gate never judged the rollout. An id with HTML reached Data Docs pages."""
    paths = DataPaths.at(tmp_path / "data").ensure()
    plan = load_plan(DEMO_PLAN)
    if rollout_id == "":
        assert lifecycle.start(paths, plan, actor="t", rollout_id=rollout_id).new  # generated
        return
    with pytest.raises(lifecycle.RolloutError, match="allowed are 1 to 64 letters"):
        lifecycle.start(paths, plan, actor="t", rollout_id=rollout_id)
    assert not paths.database.exists() or lifecycle.reconcile(paths) is None


def test_segment_values_reach_the_gx_frame_escaped(tmp_path: Path) -> None:
    """GX Data Docs show unexpected sample values as raw HTML."""
    paths = DataPaths.at(tmp_path / "data").ensure()
    now = datetime.now(UTC)
    hostile_rows = make_table(3, start=now, config_version=3, mode=HOSTILE)  # noqa: F841
    with connect(paths.database) as con:
        con.execute("INSERT INTO requests BY NAME SELECT * FROM hostile_rows")
        frame = window_rows(con, 3, now - timedelta(minutes=1))
    assert set(frame["mode"]) == {html.escape(HOSTILE)}
    assert set(frame["arm"]) <= {"legacy", "production"}  # valid labels are unchanged


def test_the_nightly_artifact_escapes_backend_names() -> None:
    row: dict[str, object] = dict.fromkeys(COLUMNS)
    row |= {"backend": HOSTILE, "query_category": "general"}
    row |= {"legacy_requests": 1, "production_requests": 1}
    start = datetime(2026, 1, 1, tzinfo=UTC)
    page = markdown(Comparison("run", start, start + timedelta(days=1), [row]))
    assert "![t](" not in page and "| <img" not in page and r"| \<img" in page
    assert page.splitlines()[-1].count(" | ") == 9  # no extra table columns


def test_plan_and_reason_text_is_not_rich_markup_in_the_demo_view() -> None:
    """A phase named 'canary[/]x' crashed the live view and the final table."""
    console = Console(record=True, width=300)
    plan = load_plan(DEMO_PLAN)
    view = LiveView(plan)
    report = TickReport("ro-1", "running", 0, "canary[/]x", reason="[red]gone[/red]")
    view.update(report)
    console.print(view)
    console.print(_phase_table([(1, "canary[/]x", "legacy", 1, 1.0, 1.0, 2.0, 0.1, 0.9)]))
    text = console.export_text()
    assert "canary[/]x" in text and "[red]gone[/red]" in text


def test_a_plan_error_never_renders_a_non_string_phase_name(tmp_path: Path) -> None:
    """The message rendered whatever `name` held: a YAML alias bomb there exhausted memory."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "x-a: &a [x, x, x]\nx-b: &b [*a, *a, *a]\nname: p\n"
        "phases:\n  - name: *b\n    mode: shadow\n    traffic_percent: 0\n"
    )
    with pytest.raises(PlanError) as caught:
        load_plan(plan)
    assert "phase 1 field" in str(caught.value) and "[[" not in str(caught.value)


def test_a_long_reason_is_cut_in_the_published_document() -> None:
    """An alert pasting a log excerpt made the rollback document too large for the HTTP
    control endpoint (1 MB): the emergency rollback failed."""
    config = legacy_only_config(2, "ro-1", "salt", "x" * 1_100_000)
    assert len(config.reason) == MAX_DOCUMENT_REASON and config.reason.endswith("…")
    assert len(config.model_dump_json()) < 10_000
