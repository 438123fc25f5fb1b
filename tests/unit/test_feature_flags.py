"""PROD_LB_* configuration: good profiles load, each bad value stops with one clear line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from router.backends import BackendConfig, BackendKind
from router.feature_flags import ENV_PREFIX, ProductionFeatureFlags, load_flags
from router.modes import DeploymentMode
from router.production_config import ProductionLoadBalancingConfig
from router.router_config import GuardLimits
from router.settings_errors import SettingsError

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "deployments" / "profiles"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_defaults_are_legacy_only() -> None:
    flags = load_flags()
    assert flags.effective_mode is DeploymentMode.LEGACY_ONLY
    assert flags.initial_router_config().version == 0


def test_disabled_forces_legacy_even_with_a_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_DEPLOYMENT_MODE", "canary")
    monkeypatch.setenv("PROD_LB_TRAFFIC_PERCENT", "5")
    flags = load_flags()
    assert flags.deployment_mode is DeploymentMode.CANARY
    assert flags.effective_mode is DeploymentMode.LEGACY_ONLY
    assert flags.initial_router_config().traffic_percent == 0


@pytest.mark.parametrize("name", ["shadow", "canary", "ab_test", "production_full"])
def test_every_profile_is_valid(name: str) -> None:
    flags = load_flags(PROFILES / f"{name}.env")
    assert flags.enabled


def test_every_profile_variable_is_a_known_setting() -> None:
    known = {ENV_PREFIX + field.upper() for field in ProductionFeatureFlags.model_fields}
    for path in [*PROFILES.glob("*.env"), PROFILES / "production.env.template"]:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert line.split("=", 1)[0] in known, f"{path.name}: {line}"


def test_the_template_documents_every_variable() -> None:
    """The README promises every variable in production.env.template (set or commented)."""
    text = (PROFILES / "production.env.template").read_text()
    missing = [
        ENV_PREFIX + field.upper()
        for field in ProductionFeatureFlags.model_fields
        if f"{ENV_PREFIX}{field.upper()}=" not in text
    ]
    assert missing == []


def test_environment_overrides_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_TRAFFIC_PERCENT", "15")
    assert load_flags(PROFILES / "canary.env").traffic_percent == 15


BAD_VALUES = [
    ("PROD_LB_DEPLOYMENT_MODE", "canry", "one of legacy_only, shadow, canary, ab_test"),
    ("PROD_LB_TRAFFIC_PERCENT", "150", "a number from 0 to 100"),
    ("PROD_LB_ROLLBACK_LATENCY_MS", "abc", "a number above 0"),
    ("PROD_LB_PRIMARY_ALGORITHM", "fastest", "one of round_robin"),
    ("PROD_LB_AUTO_FAILBACK", "maybe", "true or false"),
    ("PROD_LB_ROLLBACK_ERROR_RATE", "-1", "a number above 0"),
]


@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_variable_value_and_allowed(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_flags()
    assert len(caught.value.lines) == 1
    line = caught.value.lines[0]
    assert variable in line and repr(value) in line and allowed in line


def test_unknown_variable_suggests_the_right_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_TRAFIC_PERCENT", "5")
    with pytest.raises(SettingsError, match="did you mean PROD_LB_TRAFFIC_PERCENT"):
        load_flags()


def test_an_unknown_name_and_a_bad_value_are_both_reported_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unknown names returned before values were checked: the bad value showed only on
    the next run, after the name was fixed."""
    monkeypatch.setenv("PROD_LB_TRAFFIC_PERCENT", "abc")
    monkeypatch.setenv("PROD_LB_FOO", "1")
    with pytest.raises(SettingsError) as caught:
        load_flags()
    assert len(caught.value.lines) == 2
    assert "PROD_LB_FOO is not a known variable" in caught.value.lines[0]
    assert "PROD_LB_TRAFFIC_PERCENT='abc' is invalid" in caught.value.lines[1]


def test_a_shortened_name_lists_every_variable_it_could_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROD_LB_ALGORITHM", "adaptive")
    with pytest.raises(SettingsError) as caught:
        load_flags()
    (line,) = caught.value.lines
    assert "PROD_LB_PRIMARY_ALGORITHM" in line and "PROD_LB_CUSTOM_ALGORITHM" in line


def test_mode_and_percent_must_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_DEPLOYMENT_MODE", "shadow")
    monkeypatch.setenv("PROD_LB_TRAFFIC_PERCENT", "5")
    with pytest.raises(SettingsError, match="PROD_LB_TRAFFIC_PERCENT=5 does not fit"):
        load_flags()


def test_advanced_algorithm_needs_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_PRIMARY_ALGORITHM", "adaptive")
    with pytest.raises(SettingsError, match="PROD_LB_ADVANCED_ALGORITHMS=true"):
        load_flags()
    monkeypatch.setenv("PROD_LB_ADVANCED_ALGORITHMS", "true")
    assert load_flags().primary_algorithm.value == "adaptive"


def test_secret_values_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_PERPLEXITY_API_KEY", "pplx-very-secret")
    with pytest.raises(SettingsError) as caught:
        load_flags()
    assert "pplx-very-secret" not in str(caught.value)


def test_profile_with_foreign_variable_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "x.env"
    profile.write_text("PROD_LB_ENABLED=true\nDATABASE_URL=postgres://x\n")
    with pytest.raises(SettingsError, match="DATABASE_URL is not a PROD_LB_"):
        load_flags(profile)


def test_backend_urls_are_split_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROD_LB_LIGHTRAG_URLS", "http://127.0.0.1:9621, http://127.0.0.1:9622")
    monkeypatch.setenv("PROD_LB_PERPLEXITY_URL", "http://127.0.0.1:9700")
    backends = load_flags().backends()
    assert [b.name for b in backends] == ["lightrag-1", "lightrag-2", "perplexity-1"]
    assert backends[2].api_key_env == "PERPLEXITY_API_KEY"


def test_urls_as_a_json_list_and_empty_values_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """What deployment templates write: a rendered list as JSON, and an empty value for
    `PROD_LB_PERPLEXITY_URL=${PERPLEXITY_URL}` when the variable is unset. The first was
    refused as the URL '["http://127.0.0.1:9621"', the second stopped start-up."""
    monkeypatch.setenv(
        "PROD_LB_LIGHTRAG_URLS", '["http://127.0.0.1:9621", "http://127.0.0.1:9622"]'
    )
    monkeypatch.setenv("PROD_LB_PERPLEXITY_URL", "")
    monkeypatch.setenv("PROD_LB_DAILY_BUDGET_USD", "")
    flags = load_flags()
    assert [b.url for b in flags.backends()] == ["http://127.0.0.1:9621", "http://127.0.0.1:9622"]
    monkeypatch.setenv("PROD_LB_LIGHTRAG_URLS", '["http://127.0.0.1:9621",')
    with pytest.raises(SettingsError, match="give comma-separated URLs or a JSON list"):
        load_flags()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
        timeout=60,
    )


@pytest.mark.parametrize(("variable", "value", "allowed"), BAD_VALUES[:4])
def test_cli_validate_rejects_with_exit_2_and_one_line(
    variable: str, value: str, allowed: str
) -> None:
    result = _cli("config", "validate", env={variable: value})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0] and allowed in lines[0]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROD_LB_PERPLEXITY_URL", "https://admin:hunter2@api.example:99999/?token=tok456"),
        ("PROD_LB_CONTROL_URL", "htp://admin:hunter2@ctl?token=tok456"),
        ("PROD_LB_LIGHTRAG_URLS", "http://admin:hunter2@x:99999/?token=tok456"),
    ],
)
def test_an_invalid_url_is_named_without_its_password_or_token(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The error printed the whole value: credentials reached CI and service logs."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_flags()
    shown = str(caught.value)
    assert variable in shown and "hunter2" not in shown and "tok456" not in shown
    assert "admin:***@" in shown and "token=***" in shown


def test_cli_validate_accepts_profile_and_show_masks_nothing_secret() -> None:
    result = _cli("config", "validate", "--profile", "canary", env={})
    assert result.returncode == 0, result.stderr
    assert "canary at 5%" in result.stdout
    shown = _cli(
        "config",
        "show",
        "--json",
        env={"PERPLEXITY_API_KEY": "pplx-123456", "PROD_LB_PERPLEXITY_URL": "http://127.0.0.1:1"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "pplx-123456" not in shown.stdout
    assert "set (from $PERPLEXITY_API_KEY)" in shown.stdout


CUSTOM_ENV = {
    "PROD_LB_ENABLED": "true",
    "PROD_LB_DEPLOYMENT_MODE": "production_only",
    "PROD_LB_TRAFFIC_PERCENT": "100",
    "PROD_LB_PRIMARY_ALGORITHM": "custom",
    "PROD_LB_ADVANCED_ALGORITHMS": "true",
    "PROD_LB_LIGHTRAG_URLS": "http://127.0.0.1:9",
}


def test_a_custom_algorithm_chosen_by_environment_starts_and_routes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`PROD_LB_PRIMARY_ALGORITHM=custom` used to crash the router at start-up: the
    migrated config lost the 'module:Class'."""
    from router import ProductionIntelligentQueryRouter
    from tests.fixtures_custom_algorithm import SPEC

    for name, value in CUSTOM_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PROD_LB_CUSTOM_ALGORITHM", SPEC)
    monkeypatch.setenv("PROD_LB_DATA_DIR", str(tmp_path))
    router = ProductionIntelligentQueryRouter(health_checks=False, control_store=None)
    assert router.production.algorithm.name == "custom:fewest_calls"
    assert router.get_system_health_status()["algorithm"] == "custom"


def test_cli_validate_imports_the_custom_class_and_names_the_variable() -> None:
    good = _cli(
        "config",
        "validate",
        env={
            **CUSTOM_ENV,
            "PROD_LB_CUSTOM_ALGORITHM": "tests.fixtures_custom_algorithm:FewestCalls",
        },
    )
    assert good.returncode == 0, good.stderr
    bad = _cli("config", "validate", env={**CUSTOM_ENV, "PROD_LB_CUSTOM_ALGORITHM": "nope:Missing"})
    assert bad.returncode == 2
    (line,) = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: PROD_LB_CUSTOM_ALGORITHM=nope:Missing: "), line
    assert "nope" in line.split(": ", 2)[2]


@pytest.mark.parametrize(
    ("variable", "url", "masked"),
    [
        (
            "PROD_LB_PERPLEXITY_URL",
            "http://svc:sk-hidden@127.0.0.1:1",
            "http://svc:***@127.0.0.1:1",
        ),
        ("PROD_LB_LIGHTRAG_URLS", "http://sk-hidden@127.0.0.1:1", "http://***@127.0.0.1:1"),
    ],
)
def test_credentials_in_a_backend_url_are_masked(variable: str, url: str, masked: str) -> None:
    for command in (("config", "show", "--json"), ("config", "validate")):
        shown = _cli(*command, env={variable: url})
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "sk-hidden" not in shown.stdout + shown.stderr
    assert masked in _cli("config", "show", "--json", env={variable: url}).stdout


def test_pydantic_errors_never_echo_a_pasted_key() -> None:
    """An embedding app that builds these models itself and logs the ValidationError."""
    pasted = "pplx-abcdef1234567890"
    with pytest.raises(ValidationError) as backend:
        BackendConfig(
            name="px", kind=BackendKind.PERPLEXITY, base_url="http://x.test", api_key_env=pasted
        )
    with pytest.raises(ValidationError) as flags:
        ProductionFeatureFlags(perplexity_api_key_env=pasted)
    with pytest.raises(ValidationError) as nested:
        ProductionLoadBalancingConfig(
            backends=[
                {
                    "name": "px",
                    "kind": "perplexity",
                    "base_url": "http://x.test",
                    "api_key_env": pasted,
                }
            ]
        )
    for caught in (backend, flags, nested):
        assert pasted not in str(caught.value) and pasted not in repr(caught.value)


def test_cli_show_masks_a_key_pasted_where_a_variable_name_belongs() -> None:
    """`*_ENV` settings name the variable holding the key; a key pasted there was shown."""
    env = {
        "PROD_LB_PERPLEXITY_URL": "http://127.0.0.1:1",
        "PROD_LB_PERPLEXITY_API_KEY_ENV": "pplx-abcdef1234567890",
    }
    for args in (("--json",), ()):
        shown = _cli("config", "show", *args, env=env)
        assert shown.returncode == 2, shown.stderr  # refused, as by `config validate`
        assert "abcdef1234567890" not in shown.stdout + shown.stderr
        assert "must be the NAME of the environment variable" in shown.stderr
    named = _cli("config", "show", env={**env, "PROD_LB_PERPLEXITY_API_KEY_ENV": "MY_PPLX_KEY"})
    assert "MY_PPLX_KEY" in named.stdout and "not a variable name" not in named.stdout


def test_cli_show_masks_url_query_values() -> None:
    shown = _cli(
        "config",
        "show",
        "--json",
        env={
            "PROD_LB_PERPLEXITY_URL": "http://127.0.0.1:1/?token=abc123&region=eu",
            "PROD_LB_LIGHTRAG_URLS": "http://127.0.0.1:2/?key=k-secret,http://127.0.0.1:3/",
        },
    )
    assert shown.returncode == 0, shown.stderr
    assert "abc123" not in shown.stdout and "k-secret" not in shown.stdout
    variables = json.loads(shown.stdout)["variables"]
    assert variables["PROD_LB_PERPLEXITY_URL"] == "http://127.0.0.1:1/?token=***&region=***"
    assert variables["PROD_LB_LIGHTRAG_URLS"] == "http://127.0.0.1:2/?key=***,http://127.0.0.1:3/"


def test_a_key_pasted_where_a_variable_name_belongs_is_refused_unechoed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`*_API_KEY_ENV` names the variable holding the key. A key pasted there used to be
    accepted (and then looked up as a variable name, so no key was sent)."""
    pasted = "pplx-abcdef1234567890"
    monkeypatch.setenv("PROD_LB_PERPLEXITY_API_KEY_ENV", pasted)
    with pytest.raises(SettingsError) as caught:
        load_flags()
    assert "must be the NAME of the environment variable" in str(caught.value)
    assert pasted not in str(caught.value)
    monkeypatch.delenv("PROD_LB_PERPLEXITY_API_KEY_ENV")
    backends = tmp_path / "backends.json"
    backends.write_text(
        json.dumps(
            [
                {
                    "name": "px",
                    "kind": "perplexity",
                    "base_url": "https://api.perplexity.ai",
                    "api_key_env": pasted,
                }
            ]
        )
    )
    monkeypatch.setenv("PROD_LB_BACKENDS_FILE", str(backends))
    with pytest.raises(SettingsError) as from_file:
        load_flags().backends()
    assert "api_key_env" in str(from_file.value) and pasted not in str(from_file.value)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("PROD_LB_ROLLBACK_MIN_REQUESTS", "500", "over the guard's window of 200"),
        ("PROD_LB_ROLLBACK_ERROR_RATE", "95", "can never trip the guard"),
    ],
)
def test_guard_limits_that_could_never_trip_stop_start_up(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    """Such a limit switched auto-failback off in silence: 10,000 failed requests
    never tripped a guard needing 500 of them in a window of 200."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_flags()
    (line,) = caught.value.lines
    assert f"{variable}={value}" in line and says in line


@pytest.mark.parametrize(
    "variable",
    ["PROD_LB_ROLLBACK_LATENCY_MS", "PROD_LB_CANARY_MAX_HOURS", "PROD_LB_DAILY_BUDGET_USD"],
)
def test_an_infinite_limit_is_refused_not_a_silent_off_switch(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """`inf` passed `> 0` and switched that limit off without a word (nan was refused)."""
    monkeypatch.setenv(variable, "inf")
    monkeypatch.setenv("PROD_LB_COST_OPTIMIZATION", "true")
    with pytest.raises(SettingsError) as caught:
        load_flags()
    assert f"{variable}='inf' is invalid; allowed: a number above 0" in caught.value.lines
    with pytest.raises(ValueError, match="finite number"):
        GuardLimits(p95_latency_ms=math.inf)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"PROD_LB_ENABLED=true\nPROD_LB_DEPLOYMENT_MODE canary\n", "line 2 is not NAME=value"),
        (b"PROD_LB_ENABLED=true\n# caf\xe9\n", "is not UTF-8 text (byte 26)"),
        (None, "is a folder: give the .env file itself"),
    ],
)
def test_a_profile_that_cannot_be_read_whole_is_refused(
    tmp_path: Path, content: bytes | None, says: str
) -> None:
    """python-dotenv dropped the line it could not parse with a warning, and the profile
    validated as legacy_only; a folder was reported as missing."""
    profile = tmp_path / "canary.env"
    if content is None:
        profile.mkdir()
    else:
        profile.write_bytes(content)
    with pytest.raises(SettingsError) as caught:
        load_flags(profile)
    (line,) = caught.value.lines
    assert line.startswith(f"profile file {str(profile)!r} {says}"), line


def test_a_guard_document_that_could_never_trip_is_invalid() -> None:
    with pytest.raises(ValueError, match="at most its window"):
        GuardLimits(min_requests=300, window=200)
    with pytest.raises(ValueError, match="can never trip"):
        GuardLimits(error_rate=0.95)
    assert GuardLimits(error_rate=0.9).error_rate == 0.9  # reachable over 200 requests


def test_the_hosts_guard_variables_bound_a_published_document() -> None:
    document = GuardLimits(error_rate=0.06, p95_latency_ms=8_000, min_requests=20)
    untouched = ProductionFeatureFlags().bound_guard(document)
    assert untouched == document  # defaults the operator never set change nothing
    host = ProductionFeatureFlags(
        auto_failback=False,
        rollback_error_rate=3,
        rollback_latency_ms=9_000,
        rollback_min_requests=30,
        canary_max_hours=1,
    )
    bound = host.bound_guard(document)
    assert not bound.enabled
    assert (bound.error_rate, bound.p95_latency_ms) == (0.03, 8_000)  # the stricter each
    assert bound.min_requests == 30
    # a rollout's split lasts as its plan says: the host's time limit is for env splits
    assert bound.canary_max_hours is None
