"""What the flows show in Prefect: artifacts (status, decision records, Data Docs link)
and events (promotion, rollback, approval requested) that automations can react to."""

from __future__ import annotations

import logging
from typing import Any

from flows.paths import DataPaths
from flows.status import markdown, snapshot
from flows.store.database import connect

log = logging.getLogger(__name__)

EVENT_PROMOTED = "rollout.promoted"
EVENT_COMPLETED = "rollout.completed"
EVENT_ROLLED_BACK = "rollout.rolled-back"
EVENT_APPROVAL_REQUESTED = "rollout.approval.requested"
EVENT_APPROVAL_DECIDED = "rollout.approval.decided"
EVENT_ABORTED = "rollout.aborted"
#: Events name their router group as the resource `rollout.group.<name>`.
GROUP_RESOURCE_PREFIX = "rollout.group."


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    text = "-".join(parts).lower()
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in text)


def publish_status(paths: DataPaths, rollout_id: str, docs_url: str | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact

    with connect(paths.database, read_only=True) as con:
        snap = snapshot(con, rollout_id)
    if snap is None:
        return
    create_markdown_artifact(
        markdown(snap, docs_url),
        key=artifact_key("rollout", rollout_id, "status"),
        description=f"status of rollout {rollout_id}",
    )


def publish_decision(rollout_id: str, report: Any) -> None:
    from prefect.artifacts import create_link_artifact, create_table_artifact

    if not report.records:
        return
    table = [
        {
            k: (round(v, 6) if isinstance(v, float) else v)
            for k, v in row.items()
            if k not in ("rollout_id", "evaluated_at")
        }
        for row in report.records
    ]
    create_table_artifact(
        table,
        key=artifact_key("rollout", rollout_id, "decision-record"),
        description=f"{report.verdict}: {report.reason}",
    )
    if report.data_docs_url:
        create_link_artifact(
            report.data_docs_url,
            link_text="Great Expectations Data Docs",
            key=artifact_key("rollout", rollout_id, "data-docs"),
        )


def emit(event: str, rollout_id: str, router_group: str, payload: dict[str, Any]) -> None:
    from prefect.events import emit_event

    try:
        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"{GROUP_RESOURCE_PREFIX}{router_group}",
                "prefect.resource.name": router_group,
            },
            related=[
                {
                    "prefect.resource.id": f"rollout.id.{rollout_id}",
                    "prefect.resource.role": "rollout",
                }
            ],
            payload={"rollout_id": rollout_id, **payload},
        )
    except Exception:  # an event is a notification; never fail a rollout step over it
        log.exception("could not emit %s", event)


def emit_from_cli(event: str, rollout_id: str, router_group: str, payload: dict[str, Any]) -> bool:
    """The CLI's fast paths (`rollout rollback|promote|abort`) act without a flow run, so
    they emit the same events themselves: an automation on `rollout.rolled-back` must fire
    whoever rolled back. Only against a configured Prefect server (without one there is
    nobody to notify); waits a few seconds for delivery. True if sent."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        return False
    emit(event, rollout_id, router_group, payload)
    EventsWorker.drain_all(timeout=10)
    return True
