"""Verdicts and the decision record every evaluation leaves behind."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    PROMOTE = "PROMOTE"
    HOLD = "HOLD"
    NEEDS_APPROVAL = "NEEDS_APPROVAL"
    ROLLBACK = "ROLLBACK"
    INSUFFICIENT_DATA = "INSUFFICIENT_DATA"


class Decision(StrEnum):
    """What one metric says."""

    PASS = "pass"
    FAIL = "fail"
    HARM = "harm detected"
    NON_INFERIOR = "non-inferior"
    INCONCLUSIVE = "inconclusive"
    SKIPPED = "skipped"


@dataclass
class MetricRecord:
    """One line of the decision record: enough to re-derive the decision by hand."""

    check_kind: str  # data_quality | guardrail | comparison | sequential | router
    metric: str
    decision: Decision
    reason: str
    estimate: float | None = None
    lower_bound: float | None = None
    upper_bound: float | None = None
    e_value: float | None = None
    n_legacy: int | None = None
    n_production: int | None = None
    threshold: float | None = None
    metric_mode: str = "abort"
    critical: bool = True  # the metric acts (mode pause or abort) on this record

    @property
    def failed(self) -> bool:
        return self.decision in (Decision.FAIL, Decision.HARM)

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["decision"] = self.decision.value
        row.pop("critical")
        return row


@dataclass
class GateResult:
    verdict: Verdict
    reason: str
    records: list[MetricRecord] = field(default_factory=list)
    n_legacy: int = 0
    n_production: int = 0
    data_docs_url: str | None = None

    def failed_records(self) -> list[MetricRecord]:
        return [r for r in self.records if r.failed]
