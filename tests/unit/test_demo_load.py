"""The demo application's load generator says when the machine cannot keep up."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flows.demo.app import LoadSpec, generate_load
from flows.demo.runner import DemoOutcome


class SlowRouter:
    """Answers every question after `delay_s`: a saturated application."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def route_query(self, text: str, context: dict[str, Any]) -> Any:
        await asyncio.sleep(self.delay_s)
        return SimpleNamespace(ok=True)


def outcome(load: dict[str, Any] | None) -> DemoOutcome:
    return DemoOutcome("ro-1", "rolled_back", "", 1.0, Path("m.duckdb"), load=load)


async def test_a_saturated_app_sheds_says_so_once_and_the_demo_explains_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = LoadSpec(rate=400, users=50, max_concurrency=4, duration_s=0.5, seed=1)
    with caplog.at_level(logging.WARNING, logger="rollout.app"):
        counts = await generate_load(SlowRouter(0.3), spec, asyncio.Event())  # type: ignore[arg-type]
    assert counts["shed"] > counts["sent"] > 0
    assert counts["ok"] == counts["sent"]
    warnings = [r.getMessage() for r in caplog.records if "shed" in r.getMessage()]
    assert len(warnings) == 1 and "not keeping up with 400 per second" in warnings[0]
    lines = outcome({"rate": spec.rate, **counts}).load_lines()
    assert lines[0].startswith(f"application: {counts['sent']} questions sent")
    assert "did not keep up with 400 per second" in lines[1]


async def test_an_app_that_keeps_up_sheds_nothing_and_gets_no_warning() -> None:
    spec = LoadSpec(rate=50, users=50, max_concurrency=64, duration_s=0.4, seed=1)
    counts = await generate_load(SlowRouter(0.01), spec, asyncio.Event())  # type: ignore[arg-type]
    assert counts["shed"] == 0 and counts["sent"] > 0
    lines = outcome({"rate": spec.rate, **counts}).load_lines()
    assert len(lines) == 1 and lines[0].endswith(", 0 shed")


def test_no_report_from_a_killed_app_prints_nothing() -> None:
    assert outcome(None).load_lines() == []


def test_the_closing_tables_start_on_their_own_line_in_a_log_file() -> None:
    """`make demo > demo.log` (or CI): the live view's last line must not swallow the
    title of the table printed after it."""
    import io

    from rich.console import Console
    from rich.text import Text

    from flows.demo.runner import live_display

    out = io.StringIO()
    console = Console(file=out, width=80)  # a file: not a terminal
    with live_display(Text("197s  phase 5 full  PROMOTE  -> completed"), console):
        pass
    console.print("per phase and arm")
    assert out.getvalue().splitlines()[-2:] == [
        "197s  phase 5 full  PROMOTE  -> completed",
        "per phase and arm",
    ]
