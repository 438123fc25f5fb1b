"""`ProductionFeatureFlags`: the `PROD_LB_*` environment that decides how an instance starts.

Read with pydantic-settings from the process environment, optionally on top of a
profile file (`deployments/profiles/*.env`). The environment wins over the file, as an
operator overriding one value on a host expects. An empty value counts as unset (what a
compose file writes for `${VAR}` when VAR is unset): the file's value, or the default,
stands.
"""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

from dotenv.parser import parse_stream
from pydantic import (
    AwareDatetime,
    Field,
    HttpUrl,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from router.algorithms.names import ADVANCED_ALGORITHMS, AlgorithmName
from router.backends import BackendConfig, BackendKind, check_env_name
from router.modes import DeploymentMode
from router.production_config import CostSettings, ProductionLoadBalancingConfig
from router.router_config import (
    GuardLimits,
    RouterConfig,
    check_mode_percent,
    highest_trippable_error_rate,
)
from router.settings_errors import SettingsError, format_error

ENV_PREFIX = "PROD_LB_"


#: How far in the future PROD_LB_SPLIT_SINCE may be: a deploy host's clock a little
#: ahead of this one's must not stop start-up.
SPLIT_SINCE_SKEW = timedelta(minutes=5)


class ProductionFeatureFlags(BaseSettings):
    # hide_input_in_errors: an embedding app that logs a ValidationError must not log a
    # key pasted into a setting with it (`load_flags` formats its own errors).
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        case_sensitive=False,
        frozen=True,
        hide_input_in_errors=True,
        # `PROD_LB_PERPLEXITY_URL=${PERPLEXITY_URL}` in a compose file writes an empty
        # value when the variable is unset: that means unset, not an invalid URL.
        env_ignore_empty=True,
    )

    enabled: bool = Field(default=False, description="false forces legacy_only")
    deployment_mode: DeploymentMode = DeploymentMode.LEGACY_ONLY
    traffic_percent: float = Field(default=0.0, ge=0, le=100)
    auto_failback: bool = Field(default=True, description="local guard fails back to legacy")
    rollback_error_rate: float = Field(default=5.0, gt=0, le=100, description="percent")
    rollback_latency_ms: float = Field(
        default=5000.0, gt=0, allow_inf_nan=False, description="p95 limit"
    )
    rollback_min_requests: int = Field(default=20, ge=1)
    perf_comparison: bool = Field(default=True, description="record per-request metric rows")
    advanced_algorithms: bool = Field(default=False, description="allow advanced algorithms")
    cost_optimization: bool = Field(default=False, description="enforce the daily budget")
    daily_budget_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    quality_metrics: bool = Field(default=True, description="score answer quality")
    canary_max_hours: float = Field(default=72.0, gt=0, allow_inf_nan=False)
    #: When the environment's split began (ISO 8601 with offset): `canary_max_hours`
    #: counts from it. Unset, it counts from process start, and every restart (a deploy)
    #: resets it, so a long-lived fleet never reached the limit.
    split_since: AwareDatetime | None = None
    primary_algorithm: AlgorithmName = AlgorithmName.LEAST_CONNECTIONS
    custom_algorithm: str | None = None
    shadow_sample_rate: float = Field(default=1.0, ge=0, le=1)
    bucket_salt: str = Field(default="rollout-v1", min_length=1)
    lightrag_urls: Annotated[list[HttpUrl], NoDecode] = Field(default_factory=list)
    perplexity_url: HttpUrl | None = None
    perplexity_api_key_env: str = Field(
        default="PERPLEXITY_API_KEY",
        description="the NAME of the environment variable that holds the key, not the key",
    )
    _key_env_name = field_validator("perplexity_api_key_env")(check_env_name)

    backends_file: Path | None = None
    region: str = "eu-central"
    request_timeout_s: float = Field(default=30.0, gt=0, le=600)
    data_dir: Path = Field(default=Path("data"), description="control/ and segments/ live here")
    instance_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        max_length=128,  # as the control endpoint accepts; unique per process
    )
    control_poll_s: float = Field(default=1.0, gt=0, le=60)
    control_url: HttpUrl | None = Field(
        default=None, description="an HTTP control endpoint instead of DATA_DIR/control"
    )

    @field_validator("lightrag_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        """Comma-separated, or a JSON list (what templates that render lists write)."""
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(
                    "not a JSON list of URLs; give comma-separated URLs or a JSON list"
                ) from None
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ProductionFeatureFlags:
        try:
            check_mode_percent(self.deployment_mode, self.traffic_percent)
        except ValueError as exc:
            raise ValueError(
                f"{ENV_PREFIX}TRAFFIC_PERCENT={self.traffic_percent:g} does not fit "
                f"{ENV_PREFIX}DEPLOYMENT_MODE={self.deployment_mode.value}: {exc}"
            ) from None
        if self.primary_algorithm in ADVANCED_ALGORITHMS and not self.advanced_algorithms:
            raise ValueError(
                f"{ENV_PREFIX}PRIMARY_ALGORITHM={self.primary_algorithm.value} is an advanced "
                f"algorithm: set {ENV_PREFIX}ADVANCED_ALGORITHMS=true or pick one of "
                + ", ".join(a.value for a in AlgorithmName if a not in ADVANCED_ALGORITHMS)
            )
        if self.primary_algorithm is AlgorithmName.CUSTOM and not self.custom_algorithm:
            raise ValueError(
                f"{ENV_PREFIX}PRIMARY_ALGORITHM=custom needs {ENV_PREFIX}CUSTOM_ALGORITHM=module:Class"
            )
        window = GuardLimits.model_fields["window"].default
        if self.rollback_min_requests > window:
            raise ValueError(
                f"{ENV_PREFIX}ROLLBACK_MIN_REQUESTS={self.rollback_min_requests} is over the "
                f"guard's window of {window} requests, so the guard could never trip: use 1..{window}"
            )
        reachable = 100 * highest_trippable_error_rate(
            window, GuardLimits.model_fields["confidence"].default
        )
        if self.rollback_error_rate >= reachable:
            raise ValueError(
                f"{ENV_PREFIX}ROLLBACK_ERROR_RATE={self.rollback_error_rate:g} (percent) can never "
                f"trip the guard, whose bound over {window} requests stays under "
                f"{reachable:.1f}: use a value above 0 and below it"
            )
        if self.split_since is not None and self.split_since > datetime.now(UTC) + SPLIT_SINCE_SKEW:
            raise ValueError(
                f"{ENV_PREFIX}SPLIT_SINCE={self.split_since.isoformat()} is in the future: "
                "give when the split began (ISO 8601 with its offset), or leave it unset"
            )
        if self.cost_optimization and self.daily_budget_usd is None:
            raise ValueError(
                f"{ENV_PREFIX}COST_OPTIMIZATION=true needs {ENV_PREFIX}DAILY_BUDGET_USD (a number above 0)"
            )
        return self

    @property
    def effective_mode(self) -> DeploymentMode:
        return self.deployment_mode if self.enabled else DeploymentMode.LEGACY_ONLY

    @property
    def effective_percent(self) -> float:
        return self.traffic_percent if self.enabled else 0.0

    def backends(self) -> tuple[BackendConfig, ...]:
        if self.backends_file is not None:
            return load_backends_file(self.backends_file)
        found = [
            BackendConfig(
                name=f"lightrag-{i}",
                kind=BackendKind.LIGHTRAG,
                base_url=url,
                region=self.region,
                timeout_s=self.request_timeout_s,
            )
            for i, url in enumerate(self.lightrag_urls, start=1)
        ]
        if self.perplexity_url is not None:
            found.append(
                BackendConfig(
                    name="perplexity-1",
                    kind=BackendKind.PERPLEXITY,
                    base_url=self.perplexity_url,
                    api_key_env=self.perplexity_api_key_env,
                    region=self.region,
                    timeout_s=self.request_timeout_s,
                )
            )
        return tuple(found)

    def production_config(self) -> ProductionLoadBalancingConfig:
        return ProductionLoadBalancingConfig(
            algorithm=self.primary_algorithm,
            custom_algorithm=self.custom_algorithm,
            backends=self.backends(),
            cost=CostSettings(
                daily_budget_usd=self.daily_budget_usd if self.cost_optimization else None
            ),
            region=self.region,
        )

    def initial_router_config(self) -> RouterConfig:
        """Version 0: what the instance does before any rollout publishes a document."""
        return RouterConfig(
            version=0,
            mode=self.effective_mode,
            traffic_percent=self.effective_percent,
            algorithm=self.primary_algorithm,
            shadow_sample_rate=self.shadow_sample_rate,
            salt=self.bucket_salt,
            guard=GuardLimits(
                enabled=self.auto_failback,
                error_rate=self.rollback_error_rate / 100.0,
                p95_latency_ms=self.rollback_latency_ms,
                min_requests=self.rollback_min_requests,
                canary_max_hours=self.canary_max_hours,
            ),
            reason="initial configuration from PROD_LB_* environment",
            **({"published_at": self.split_since} if self.split_since else {}),
        )

    def bound_guard(self, limits: GuardLimits) -> GuardLimits:
        """A published document's guard limits as this host applies them.

        The guard variables an operator set on the host still hold under a rollout's
        documents (they were silently replaced): `AUTO_FAILBACK=false` keeps the guard
        off; for the error rate and the p95 latency the stricter limit wins;
        `ROLLBACK_MIN_REQUESTS` (how much evidence before failing back) is the host's.
        Variables left unset leave the document's limits as they are.
        `CANARY_MAX_HOURS` is not applied: it ends a split the environment configured
        when nobody re-publishes it, while a rollout's split lasts as long as its plan
        says (14 days, and a human's answer after that) and the flow watches it."""
        chosen = self.model_fields_set
        changes: dict[str, object] = {"enabled": limits.enabled and self.auto_failback}
        if "rollback_error_rate" in chosen:
            changes["error_rate"] = min(limits.error_rate, self.rollback_error_rate / 100.0)
        if "rollback_latency_ms" in chosen:
            changes["p95_latency_ms"] = min(limits.p95_latency_ms, self.rollback_latency_ms)
        if "rollback_min_requests" in chosen:
            changes["min_requests"] = min(self.rollback_min_requests, limits.window)
        return limits.model_copy(update=changes)


def load_backends_file(path: Path) -> tuple[BackendConfig, ...]:
    """A JSON list of backend objects; used when URLs alone do not say enough (regions, costs)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SettingsError(
            [f"{ENV_PREFIX}BACKENDS_FILE={str(path)!r} cannot be read: {exc}"]
        ) from None
    if not isinstance(raw, list):
        raise SettingsError(
            [f"{ENV_PREFIX}BACKENDS_FILE={str(path)!r} must hold a JSON list of backends"]
        )
    backends = []
    for index, item in enumerate(raw):
        try:
            backends.append(BackendConfig.model_validate(item))
        except ValidationError as exc:
            # Locations and messages only: the input values may hold a pasted API key.
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'backend'}: {e['msg']}"
                for e in exc.errors()
            )
            raise SettingsError(
                [f"{ENV_PREFIX}BACKENDS_FILE={str(path)!r} backend #{index + 1}: {problems}"]
            ) from None
    return tuple(backends)


def unknown_variables(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """`PROD_LB_*` names no field reads: pydantic-settings ignores them, an operator's typo must not."""
    known = {ENV_PREFIX + name.upper() for name in ProductionFeatureFlags.model_fields}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def profile_problems(path: Path) -> list[str]:
    """Why the profile at `path` cannot be read as NAME=value lines. python-dotenv only
    warns about a line it cannot parse and drops it: `PROD_LB_DEPLOYMENT_MODE canary`
    then validated as legacy_only. A bad line is named by number, never echoed (it may
    hold a key)."""
    where = f"profile file {str(path)!r}"
    if path.is_dir():
        return [f"{where} is a folder: give the .env file itself"]
    if not path.is_file():
        return [f"{where} does not exist"]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [f"{where} is not UTF-8 text (byte {exc.start}): save it as UTF-8"]
    except OSError as exc:
        return [f"{where} cannot be read: {exc.strerror}"]
    return [
        f"{where} line {binding.original.line} is not NAME=value (nor a comment)"
        for binding in parse_stream(io.StringIO(text))
        if binding.error
    ]


def load_flags(profile: Path | None = None) -> ProductionFeatureFlags:
    """Read and validate the flags; raise `SettingsError` with one line per bad variable."""
    lines = [
        format_error(
            ValidationError.from_exception_data(
                "ProductionFeatureFlags",
                [{"type": "extra_forbidden", "loc": (name.lower(),), "input": os.environ[name]}],
            ),
            ProductionFeatureFlags,
            ENV_PREFIX,
        ).lines[0]
        for name in unknown_variables(os.environ)
    ]
    if profile is not None:
        problems = profile_problems(Path(profile))
        if problems:
            raise SettingsError(lines + problems)
    # The values are checked too when names are unknown: each bad variable has its line
    # in one run, not the next one after a fix.
    try:
        flags = ProductionFeatureFlags(_env_file=profile)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise SettingsError(
            lines + format_error(exc, ProductionFeatureFlags, ENV_PREFIX).lines
        ) from None
    if lines:
        raise SettingsError(lines)
    return flags
