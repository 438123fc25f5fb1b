"""`RolloutPlan`: the phases a rollout walks, with their gates. Rendered as a form in the UI.

Durations accept seconds (`30`), suffixed strings (`30s`, `15m`, `2h`, `7d`) or ISO 8601
(`PT30S`). An invalid plan is refused as a whole with one line per problem, naming the
phase and the field.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Hashable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    create_model,
    model_validator,
)

from checks.thresholds import MaxDurationPolicy, Thresholds
from flows.resources import resource
from router.algorithms.names import AlgorithmName
from router.modes import DeploymentMode
from router.production_config import CircuitBreakerSettings
from router.router_config import check_mode_percent

#: A backend weight: a finite number >= 0 (0 drains the backend).
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]

DEFAULT_PLAN_FILE = resource("deployments/plans/five_weeks.yaml")
PROFILES_DIR = resource("deployments/profiles")
#: Profile variable -> (threshold it bounds, factor from the variable's unit).
PROFILE_LIMITS = {
    "PROD_LB_ROLLBACK_ERROR_RATE": ("max_error_rate", 0.01),  # percent
    "PROD_LB_ROLLBACK_LATENCY_MS": ("max_p95_latency_ms", 1.0),
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


DURATION_FORMS = "seconds (90), 30s, 15m, 2h, 7d, 1w, or ISO 8601 (PT30S)"
#: Longer than any rollout; also keeps `timedelta` (max 999,999,999 days) from overflowing.
MAX_DURATION = timedelta(days=3650)


_ISO_DURATION = TypeAdapter(timedelta)


def parse_duration(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"a duration, not {value}: use {DURATION_FORMS}")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        elif not value.strip().lstrip("-").upper().startswith("P"):
            raise ValueError(f"{value!r} is not a duration: use {DURATION_FORMS}")
    if seconds is None:
        try:  # ISO 8601: the cap applies too (P3000000D overflowed the tick's arithmetic)
            seconds = _ISO_DURATION.validate_python(value).total_seconds()
        except ValidationError:
            return value  # pydantic reports its own errors on the field
    if math.isnan(seconds):
        raise ValueError(f"{value!r} is not a duration: use {DURATION_FORMS}")
    if not seconds <= MAX_DURATION.total_seconds():
        raise ValueError(f"{value!r} is longer than the {MAX_DURATION.days} days allowed")
    return timedelta(seconds=seconds)


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError(f"must be longer than 0, got {value}: use {DURATION_FORMS}")
    return value


def _not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError(f"must not be negative, got {value}")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_not_negative)]
PositiveDuration = Annotated[timedelta, BeforeValidator(parse_duration), AfterValidator(_positive)]


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    mode: DeploymentMode
    traffic_percent: float = Field(ge=0, le=100, allow_inf_nan=False)
    min_duration: Duration
    max_duration: PositiveDuration
    evaluation_interval: PositiveDuration
    min_samples: int = Field(default=200, ge=1, description="production-arm requests")
    thresholds: Thresholds = Thresholds()
    requires_approval: bool = False
    on_max_duration: MaxDurationPolicy = MaxDurationPolicy.ASK
    algorithm: AlgorithmName | None = None
    shadow_sample_rate: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False)
    #: The production arm's backend weights in this phase (absolute: a backend not named
    #: gets its configured weight); empty: the configured weights.
    production_weights: dict[str, Weight] = Field(default_factory=dict)
    #: The production arm's breakers in this phase; empty: the plan's `breaker`.
    breaker: CircuitBreakerSettings | None = None
    profile: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="deployments/profiles/NAME.env: its PROD_LB_ROLLBACK_* limits also bound "
        "this phase's guardrails (the stricter limit wins)",
    )

    @model_validator(mode="after")
    def _coherent(self) -> Phase:
        check_mode_percent(self.mode, self.traffic_percent)
        if self.mode is DeploymentMode.LEGACY_ONLY:
            raise ValueError("legacy_only is what a rollback publishes, not a phase")
        if self.max_duration < self.min_duration:
            raise ValueError(
                f"max_duration {self.max_duration} is shorter than min_duration {self.min_duration}"
            )
        if self.evaluation_interval > self.max_duration:
            # the maximum-duration policy would fire only at the first look past it
            raise ValueError(
                f"evaluation_interval {self.evaluation_interval} is longer than max_duration "
                f"{self.max_duration}: use an interval of at most the maximum duration"
            )
        return self


class RolloutPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    router_group: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]+$")
    algorithm: AlgorithmName = AlgorithmName.RESPONSE_TIME
    salt: str = Field(default="rollout-v1", min_length=1)
    ack_timeout: PositiveDuration = timedelta(seconds=30)
    #: The production arm's breakers in every phase that sets none; empty: each host's.
    breaker: CircuitBreakerSettings | None = None
    phases: list[Phase] = Field(min_length=1)

    @model_validator(mode="after")
    def _traffic_only_grows(self) -> RolloutPlan:
        # Every problem in one run, not the next one after each fix.
        problems = []
        names = [p.name for p in self.phases]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"phase names must be unique, repeated: {duplicates}")
        for index in range(1, len(self.phases)):
            before, phase = self.phases[index - 1], self.phases[index]
            if phase.traffic_percent < before.traffic_percent:
                problems.append(
                    f"phase {index + 1} ({phase.name}) field traffic_percent: "
                    f"{phase.traffic_percent:g} is below phase {index} ({before.name})'s "
                    f"{before.traffic_percent:g}; traffic may only grow"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def algorithm_for(self, phase: Phase) -> AlgorithmName:
        return phase.algorithm or self.algorithm

    def breaker_for(self, phase: Phase) -> CircuitBreakerSettings | None:
        return phase.breaker or self.breaker

    def compressed(self, factor: float) -> RolloutPlan:
        """The same plan with every duration multiplied by `factor` (for quick demos)."""
        phases = [
            phase.model_copy(
                update={
                    "min_duration": phase.min_duration * factor,
                    "max_duration": phase.max_duration * factor,
                    "evaluation_interval": phase.evaluation_interval * factor,
                }
            )
            for phase in self.phases
        ]
        return self.model_copy(update={"phases": phases})


class PlanError(ValueError):
    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _describe(loc: tuple[Any, ...], data: Any) -> str:
    if len(loc) >= 2 and loc[0] == "phases" and isinstance(loc[1], int):
        index = loc[1]
        name = ""
        with contextlib.suppress(KeyError, IndexError, TypeError):
            given = data["phases"][index]["name"]
            # only a string, and short: str() of a YAML alias bomb exhausts memory
            name = f" ({given[:60]})" if isinstance(given, str) else ""
        rest = ".".join(str(p) for p in loc[2:])
        field = f" field {rest}" if rest else ""
        return f"phase {index + 1}{name}{field}"
    return "plan field " + ".".join(str(p) for p in loc) if loc else "plan"


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """What a misspelt key should have been: the keys allowed at that level."""
    key = str(loc[-1]) if loc else "?"
    model: type[BaseModel] = RolloutPlan
    for part in loc[:-1]:
        if part == "phases":
            model = Phase
        elif part == "thresholds":
            model = Thresholds
        elif part == "breaker":
            model = CircuitBreakerSettings
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}"


def validate_plan(data: Any) -> RolloutPlan:
    """Validate a plan document; raise `PlanError` with one line per problem."""
    try:
        return RolloutPlan.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = _unknown_key(tuple(error.get("loc", ())))
            where = _describe(tuple(error.get("loc", ())), data)
            if message.startswith("phase "):
                lines.append(message)
            else:
                lines.append(f"{where}: {message}")
        raise PlanError(lines) from None


def profile_limits(name: str) -> dict[str, float]:
    """The guardrail limits a profile file sets, validated as the router validates them.

    Only the file counts, not this process's environment: the gate must judge by what
    the profile says, whatever variables the flow worker happens to carry."""
    from dotenv import dotenv_values

    from router.feature_flags import ENV_PREFIX, ProductionFeatureFlags
    from router.settings_errors import format_error

    path = PROFILES_DIR / f"{name}.env"
    if not path.is_file():
        have = sorted(p.stem for p in PROFILES_DIR.glob("*.env"))
        raise PlanError([f"profile {name!r}: no file {path}; allowed: {', '.join(have)}"])
    values = {k: v for k, v in dotenv_values(path).items() if k in PROFILE_LIMITS and v}
    fields = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in values.items()}
    # The limit fields alone, as a plain model: the settings class would also read this
    # process's PROD_LB_* variables and judge the file by them.
    names = [k.removeprefix(ENV_PREFIX).lower() for k in PROFILE_LIMITS]
    known = ProductionFeatureFlags.model_fields
    limits_model = create_model(  # type: ignore[call-overload]
        "ProfileLimits", **{n: (known[n].annotation, known[n]) for n in names}
    )
    try:
        flags = limits_model.model_validate(fields)
    except ValidationError as exc:
        raise PlanError(
            [
                f"profile {name!r}: {line}"
                for line in format_error(exc, limits_model, ENV_PREFIX).lines
            ]
        ) from None
    return {
        PROFILE_LIMITS[k][0]: getattr(flags, k.removeprefix(ENV_PREFIX).lower())
        * PROFILE_LIMITS[k][1]
        for k in values
    }


def apply_profiles(plan: RolloutPlan) -> RolloutPlan:
    """Bound each phase's guardrails by its profile's limits (the stricter wins).

    Applied once, when a plan is loaded or a rollout starts; the stored plan carries the
    result, so reading a rollout back never depends on the profile files."""
    phases, problems = [], []
    for index, phase in enumerate(plan.phases):
        if phase.profile is None:
            phases.append(phase)
            continue
        try:
            limits = profile_limits(phase.profile)
        except PlanError as exc:
            problems += [
                f"phase {index + 1} ({phase.name}) field profile: {ln}" for ln in exc.lines
            ]
            continue
        th = phase.thresholds
        bounded = th.model_copy(
            update={field: min(getattr(th, field), limit) for field, limit in limits.items()}
        )
        phases.append(phase.model_copy(update={"thresholds": bounded}))
    if problems:
        raise PlanError(problems)
    return plan.model_copy(update={"phases": phases})


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: the last one
    won silently, and `traffic_percent: 5` then `traffic_percent: 50` sent 50 %."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):  # `? [a, b]`: a YAML complex key
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"a key must be a plain name, not a {type(key).__name__} (line {line})",
                    key_node.start_mark,
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {seen[key]} and {line}): keep one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_plan(path: Path | str) -> RolloutPlan:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise PlanError([f"plan file {str(path)!r} does not exist"]) from None
    except UnicodeDecodeError as exc:
        raise PlanError(
            [f"plan file {str(path)!r} is not UTF-8 text (byte {exc.start}): save it as UTF-8"]
        ) from None
    except OSError as exc:
        raise PlanError([f"plan file {str(path)!r} cannot be read: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise PlanError([f"plan file {str(path)!r} is not valid YAML: {exc}"]) from None
    return apply_profiles(validate_plan(data))


def default_plan() -> RolloutPlan:
    """The five weeks of DESIGN.md: shadow, canary 5 %, canary 15 %, A/B 50 %, full.

    One source of truth: `deployments/plans/five_weeks.yaml`, the file people copy."""
    return load_plan(DEFAULT_PLAN_FILE)
