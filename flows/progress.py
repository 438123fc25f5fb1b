"""In-process progress hook: the demo's live display subscribes to each tick's report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_listeners: list[Callable[[Any], None]] = []


def subscribe(listener: Callable[[Any], None]) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def publish(report: Any) -> None:
    for listener in list(_listeners):
        listener(report)
