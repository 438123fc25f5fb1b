"""The progress hook: a broken listener must not fail the tick that published."""

from __future__ import annotations

import logging

import pytest

from flows import progress


def test_a_failing_listener_is_logged_and_the_others_still_hear(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heard: list[str] = []

    def broken(report: str) -> None:
        raise RuntimeError("display crashed")

    undo_broken = progress.subscribe(broken)
    undo_ok = progress.subscribe(heard.append)
    try:
        with caplog.at_level(logging.ERROR, logger="flows.progress"):
            progress.publish("tick 1")
    finally:
        undo_broken()
        undo_ok()
    assert heard == ["tick 1"]
    assert "display crashed" in caplog.text
    progress.publish("tick 2")  # unsubscribed: nobody hears it
    assert heard == ["tick 1"]
