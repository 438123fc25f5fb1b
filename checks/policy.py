"""The verdict policy: from metric records to PROMOTE / HOLD / NEEDS_APPROVAL / ROLLBACK /
INSUFFICIENT_DATA. Pure, so every rule is a row in a table test.

Order of precedence:
1. the router's own guard failed back under this config          -> ROLLBACK
2. a failed metric in mode `abort`                                -> ROLLBACK
3. a failed metric in mode `pause`                                -> NEEDS_APPROVAL
4. data quality failed (pipeline alarm: no fresh rows, wrong split) -> INSUFFICIENT_DATA
5. fewer production samples than the phase's minimum              -> INSUFFICIENT_DATA
6. a critical metric still inconclusive                           -> HOLD
7. minimum duration not reached                                   -> HOLD
8. the phase asks a human                                         -> NEEDS_APPROVAL
9. otherwise                                                      -> PROMOTE
A failed `pause` metric asks a human as soon as it fails, like an `abort` one rolls
back: its tests are valid at any sample size, so a minimum not reached yet must not hide
detected harm. Past the maximum duration, a HOLD becomes what the plan's
`on_max_duration` says, except that a phase asking a human is never promoted without
one. An INSUFFICIENT_DATA never becomes PROMOTE: with `promote` (or `ask`) a human
decides, with `rollback` it rolls back, with `hold` it holds. `observe` and `warn`
metrics are reported and never act; a verdict that would say "checks pass" names those
that fail.
"""

from __future__ import annotations

from collections.abc import Sequence

from checks.thresholds import GateSpec, MaxDurationPolicy, MetricMode
from checks.verdict import Decision, MetricRecord, Verdict

AT_MAX = {
    MaxDurationPolicy.PROMOTE: Verdict.PROMOTE,
    MaxDurationPolicy.ROLLBACK: Verdict.ROLLBACK,
    MaxDurationPolicy.ASK: Verdict.NEEDS_APPROVAL,
    MaxDurationPolicy.HOLD: Verdict.HOLD,
}
#: Without the data to judge, "promote at maximum duration" means "ask a human".
AT_MAX_WITHOUT_DATA = {**AT_MAX, MaxDurationPolicy.PROMOTE: Verdict.NEEDS_APPROVAL}


def _names(records: Sequence[MetricRecord]) -> str:
    return ", ".join(f"{r.metric} ({r.reason})" for r in records)


def _checks_pass(records: Sequence[MetricRecord]) -> tuple[str, str]:
    """("checks pass", "") or, when checks in mode warn or observe fail, ("critical checks
    pass", "; ...naming them"): they never act, but a verdict must not read as if every
    check had passed (a p95 twice legacy's was promoted as "checks pass")."""
    quiet = (MetricMode.WARN.value, MetricMode.OBSERVE.value)
    failing = [
        r for r in records if r.failed and r.check_kind != "data_quality" and r.metric_mode in quiet
    ]
    if not failing:
        return "checks pass", ""
    return "critical checks pass", f"; failing in mode warn or observe: {_names(failing)}"


def decide(
    spec: GateSpec,
    records: Sequence[MetricRecord],
    n_production: int,
    failbacks: Sequence[str] = (),
) -> tuple[Verdict, str]:
    verdict, reason = _decide(spec, records, n_production, failbacks)
    if spec.elapsed_s >= spec.max_duration_s and verdict in (
        Verdict.HOLD,
        Verdict.INSUFFICIENT_DATA,
    ):
        # A guardrail over its limit but held (legacy shared the breach, or it is within
        # noise) is no ground to promote unattended either: ask a human.
        over_limit = any(
            r.check_kind == "guardrail" and r.critical and r.decision is Decision.INCONCLUSIVE
            for r in records
        )
        table = AT_MAX if verdict is Verdict.HOLD and not over_limit else AT_MAX_WITHOUT_DATA
        final = table[spec.on_max_duration]
        if final is Verdict.PROMOTE and spec.requires_approval:
            # Weaker evidence than a phase that passes (which asks) must not skip the human.
            final = Verdict.NEEDS_APPROVAL
        return final, (
            f"maximum duration {spec.max_duration_s:g}s reached while {verdict.value} "
            f"({reason}); plan policy on_max_duration={spec.on_max_duration.value}"
        )
    return verdict, reason


def _decide(
    spec: GateSpec,
    records: Sequence[MetricRecord],
    n_production: int,
    failbacks: Sequence[str],
) -> tuple[Verdict, str]:
    if failbacks:
        return Verdict.ROLLBACK, f"router guard failed back to legacy: {failbacks[0]}"
    acting = [r for r in records if r.failed and r.check_kind != "data_quality"]
    aborts = [r for r in acting if r.metric_mode == MetricMode.ABORT.value]
    if aborts:
        return Verdict.ROLLBACK, f"harm in {_names(aborts)}"
    pauses = [r for r in acting if r.metric_mode == MetricMode.PAUSE.value]
    if pauses:
        return Verdict.NEEDS_APPROVAL, f"paused for a human by {_names(pauses)}"
    data = [r for r in records if r.check_kind == "data_quality" and r.failed]
    pipeline = [r for r in data if not r.metric.startswith("min_rows")]
    if pipeline:
        return Verdict.INSUFFICIENT_DATA, f"data quality alarm: {_names(pipeline)}"
    if n_production < spec.min_samples:
        return Verdict.INSUFFICIENT_DATA, f"{n_production} of {spec.min_samples} production samples"
    if data:
        return Verdict.INSUFFICIENT_DATA, f"too few rows: {_names(data)}"
    # `critical` already means the metric's mode acts (pause or abort)
    open_critical = [r for r in records if r.critical and r.decision is Decision.INCONCLUSIVE]
    if open_critical:
        return Verdict.HOLD, f"not yet conclusive: {', '.join(r.metric for r in open_critical)}"
    passed, failing = _checks_pass(records)
    if spec.elapsed_s < spec.min_duration_s:
        return Verdict.HOLD, (
            f"{passed}; {spec.elapsed_s:.0f}s of the minimum {spec.min_duration_s:g}s "
            f"elapsed{failing}"
        )
    if spec.requires_approval:
        return Verdict.NEEDS_APPROVAL, (
            f"{passed}; this phase asks a human before promotion{failing}"
        )
    return Verdict.PROMOTE, (
        f"{passed} with {n_production} production samples over {spec.elapsed_s:.0f}s{failing}"
    )
