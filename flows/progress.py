"""In-process progress hook: the demo's live display subscribes to each tick's report."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

_listeners: list[Callable[[Any], None]] = []
_log = logging.getLogger(__name__)


def subscribe(listener: Callable[[Any], None]) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def publish(report: Any) -> None:
    """Tell every listener. A failing listener is logged, never raised: a display or a
    scenario hook must not turn a finished evaluation into a failed tick."""
    for listener in list(_listeners):
        try:
            listener(report)
        except Exception:
            _log.exception("progress listener %r failed", listener)
