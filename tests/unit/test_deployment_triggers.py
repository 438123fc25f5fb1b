"""The event triggers of deployments/prefect.yaml, rendered the way Prefect's server
renders them: a misspelt parameter or template only shows when an alert fires."""

from __future__ import annotations

import importlib
import inspect
import json
from datetime import UTC, datetime
from pathlib import Path

import yaml
from prefect.events.schemas.events import ReceivedEvent
from prefect.server.utilities.user_templates import render_user_template_sync

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((ROOT / "deployments/prefect.yaml").read_text())["deployments"]


def _event(name: str, payload: dict[str, str]) -> ReceivedEvent:
    now = datetime.now(UTC)
    return ReceivedEvent(
        occurred=now,
        received=now,
        event=name,
        resource={"prefect.resource.id": "rollout.group.search"},
        payload=payload,
        id="00000000-0000-0000-0000-000000000001",
    )


def _rendered(deployment: dict, event: ReceivedEvent) -> dict[str, object]:
    (trigger,) = deployment["triggers"]
    out: dict[str, object] = {}
    for name, value in trigger["parameters"].items():
        if isinstance(value, str) and value.startswith("{{ event"):
            # Prefect wraps a single-expression template in `| tojson` (_wrap_v1_template)
            template = value[:-2] + "| tojson }}"
            value = json.loads(render_user_template_sync(template, {"event": event}))
        out[name] = value
    return out


def _flow_parameters(deployment: dict) -> set[str]:
    path, function = deployment["entrypoint"].split(":")
    module = path.removesuffix(".py").replace("/", ".")
    flow = getattr(importlib.import_module(module), function)
    return set(inspect.signature(flow.fn).parameters)


def test_every_trigger_passes_only_parameters_its_flow_takes() -> None:
    triggered = [d for d in DEPLOYMENTS if d.get("triggers")]
    assert {d["name"] for d in triggered} == {"rollout-approve", "rollout-rollback"}
    for deployment in triggered:
        (trigger,) = deployment["triggers"]
        assert set(trigger["parameters"]) <= _flow_parameters(deployment), deployment["name"]


def test_a_rollback_event_names_its_group_and_reason() -> None:
    (rollback,) = [d for d in DEPLOYMENTS if d["name"] == "rollout-rollback"]
    with_reason = _rendered(rollback, _event("rollout.rollback.requested", {"reason": "5xx"}))
    assert with_reason["router_group"] == "rollout.group.search"
    assert with_reason["reason"] == "5xx"
    # the emergency path: an alert that gives no reason still rolls back
    bare = _rendered(rollback, _event("rollout.rollback.requested", {}))
    assert bare["reason"] == "rollback requested by an event"
