"""Rollout plans: the shipped ones are valid; a broken one is refused naming the phase
and the field, and `rollout start --dry-run` exits 2 without starting anything."""

from __future__ import annotations

import copy
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.plan import (
    DEFAULT_PLAN_FILE,
    PlanError,
    RolloutPlan,
    apply_profiles,
    default_plan,
    load_plan,
    profile_limits,
    validate_plan,
)
from tests.conftest import ROOT

DEMO = ROOT / "deployments" / "plans" / "demo.yaml"


def demo_data() -> dict[str, Any]:
    return yaml.safe_load(DEMO.read_text())


def test_default_plan_is_the_five_weeks() -> None:
    plan = default_plan()
    assert [p.mode.value for p in plan.phases] == [
        "shadow",
        "canary",
        "canary",
        "ab_test",
        "production_only",
    ]
    assert [p.traffic_percent for p in plan.phases] == [0, 5, 15, 50, 100]
    assert sum((p.min_duration for p in plan.phases), timedelta()) == timedelta(weeks=5)


def test_demo_plan_compresses_the_same_phases() -> None:
    plan = load_plan(DEMO)
    assert [p.mode for p in plan.phases] == [p.mode for p in default_plan().phases]
    assert all(p.max_duration < timedelta(minutes=10) for p in plan.phases)
    fast = plan.compressed(0.5)
    assert fast.phases[1].min_duration == plan.phases[1].min_duration / 2


def test_durations_accept_suffixes_and_iso() -> None:
    data = demo_data()
    data["phases"][0]["min_duration"] = "PT30S"
    data["phases"][0]["max_duration"] = "2m"
    plan = validate_plan(data)
    assert plan.phases[0].min_duration == timedelta(seconds=30)
    assert plan.phases[0].max_duration == timedelta(minutes=2)


BROKEN = [
    # (what, change, expected words in the one line)
    (
        "decreasing traffic",
        lambda d: d["phases"][2].update(traffic_percent=3),
        ["phase 3 (canary-15)", "traffic_percent", "only grow"],
    ),
    (
        "percent above 100",
        lambda d: d["phases"][1].update(traffic_percent=150),
        ["phase 2 (canary-5)", "traffic_percent"],
    ),
    (
        "NaN percent (was 'less than or equal to 100')",
        lambda d: d["phases"][1].update(traffic_percent=float("nan")),
        ["phase 2 (canary-5)", "traffic_percent", "finite number"],
    ),
    (
        "NaN duration (was 'longer than the 3650 days allowed')",
        lambda d: d["phases"][1].update(min_duration=float("nan")),
        ["phase 2 (canary-5)", "min_duration", "nan is not a duration"],
    ),
    (
        "negative percent",
        lambda d: d["phases"][1].update(traffic_percent=-1),
        ["phase 2 (canary-5)", "traffic_percent"],
    ),
    (
        "shadow with traffic",
        lambda d: d["phases"][0].update(traffic_percent=10),
        ["phase 1 (shadow)", "traffic_percent must be 0"],
    ),
    (
        "unknown mode",
        lambda d: d["phases"][1].update(mode="canry"),
        ["phase 2 (canary-5)", "mode", "canary"],
    ),
    (
        "missing field",
        lambda d: d["phases"][3].pop("min_duration"),
        ["phase 4 (ab-50)", "min_duration", "required"],
    ),
    ("unknown field", lambda d: d["phases"][0].update(traffic=5), ["phase 1 (shadow)", "traffic"]),
    (
        "max below min",
        lambda d: d["phases"][1].update(max_duration="1s"),
        ["phase 2 (canary-5)", "shorter than min_duration"],
    ),
    (
        "misspelt field names the allowed ones",
        lambda d: d["phases"][1].update(min_samles=10),
        [
            "phase 2 (canary-5)",
            "unknown key 'min_samles'",
            "did you mean 'min_samples'",
            "allowed:",
        ],
    ),
    (
        "misspelt threshold",
        lambda d: d["phases"][1].setdefault("thresholds", {}).update(max_eror_rate=0.1),
        ["phase 2 (canary-5)", "'max_eror_rate'", "did you mean 'max_error_rate'"],
    ),
    (
        "misspelt plan key",
        lambda d: d.update(ack_timout="10s"),
        ["'ack_timout'", "did you mean 'ack_timeout'"],
    ),
    # Durations: the forms people type by mistake get the forms that work, and nonsense
    # values (which passed --dry-run, or crashed with OverflowError) are refused.
    (
        "duration in words",
        lambda d: d["phases"][1].update(min_duration="5 minutes"),
        ["phase 2 (canary-5)", "min_duration", "'5 minutes' is not a duration", "15m"],
    ),
    (
        "negative duration",
        lambda d: d["phases"][1].update(min_duration=-100),
        ["phase 2 (canary-5)", "min_duration", "must not be negative"],
    ),
    (
        "zero max duration",
        lambda d: d["phases"][0].update(min_duration=0, max_duration=0),
        ["phase 1 (shadow)", "max_duration", "longer than 0"],
    ),
    (
        "boolean duration",
        lambda d: d["phases"][1].update(evaluation_interval=True),
        ["phase 2 (canary-5)", "evaluation_interval", "a duration, not True"],
    ),
    (
        "huge duration",
        lambda d: d["phases"][1].update(max_duration="99999999999d"),
        ["phase 2 (canary-5)", "max_duration", "longer than the 3650 days allowed"],
    ),
    ("negative ack timeout", lambda d: d.update(ack_timeout=-5), ["ack_timeout", "longer than 0"]),
    (
        "negative weight",
        lambda d: d["phases"][1].update(production_weights={"lightrag-1": -1}),
        ["phase 2 (canary-5)", "production_weights", "greater than or equal to 0"],
    ),
    (
        "misspelt breaker setting",
        lambda d: d.update(breaker={"open_wait": 10}),
        ["breaker", "'open_wait'", "did you mean 'open_wait_s'"],
    ),
    (
        "interval past the maximum",
        lambda d: d["phases"][1].update(evaluation_interval="2h"),
        ["phase 2 (canary-5)", "evaluation_interval", "longer than max_duration"],
    ),
]


def test_a_phases_weights_and_breakers_reach_its_published_document() -> None:
    """DESIGN: a RouterConfig carries weights and breaker thresholds; no plan could set
    them, so every document published `{}` and the hosts' breakers."""
    from flows.control import phase_config

    data = demo_data()
    data["breaker"] = {"minimum_calls": 20, "open_wait_s": 60}
    data["phases"][1].update(
        production_weights={"lightrag-1": 2, "perplexity-1": 0},
        breaker={"failure_rate_threshold": 0.3},
    )
    plan = RolloutPlan.model_validate(data)
    shadow, canary = (phase_config(plan, i, 7 + i, "r1", "test") for i in (0, 1))
    assert shadow.breaker is not None and shadow.breaker.minimum_calls == 20
    assert shadow.production_weights == {}
    assert canary.breaker is not None and canary.breaker.failure_rate_threshold == 0.3
    assert canary.breaker.minimum_calls == 10  # a phase's breaker replaces the plan's whole
    assert canary.production_weights == {"lightrag-1": 2, "perplexity-1": 0}


def test_a_key_given_twice_in_a_plan_file_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: `traffic_percent: 5` then `50` sent 50 %."""
    text = (ROOT / "deployments" / "plans" / "demo.yaml").read_text()
    doubled = text.replace(
        "traffic_percent: 5\n", "traffic_percent: 5\n    traffic_percent: 50\n", 1
    )
    assert doubled != text
    path = tmp_path / "doubled.yaml"
    path.write_text(doubled)
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    (line,) = caught.value.lines
    assert "not valid YAML" in line and "'traffic_percent' is given twice" in line


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"name: x\nphases: []\n# caf\xe9\n", "is not UTF-8 text (byte 24): save it as UTF-8"),
        (b"? [a, b]\n: 1\n", "a key must be a plain name, not a list (line 1)"),
    ],
)
def test_a_plan_file_that_is_not_a_plain_yaml_mapping_is_one_line(
    tmp_path: Path, content: bytes, says: str
) -> None:
    """Both were tracebacks (UnicodeDecodeError, TypeError: unhashable type)."""
    path = tmp_path / "plan.yaml"
    path.write_bytes(content)
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    (line,) = caught.value.lines
    assert says in line, line


@pytest.mark.parametrize("field", ["max_duration", "evaluation_interval"])
def test_an_iso_duration_has_the_same_cap_as_the_others(field: str) -> None:
    """P3000000D passed (3000000d did not), then overflowed the tick's date arithmetic."""
    data = copy.deepcopy(demo_data())
    data["phases"][0][field] = "P3000000D"
    with pytest.raises(PlanError) as caught:
        validate_plan(data)
    assert "'P3000000D' is longer than the 3650 days allowed" in caught.value.lines[0]
    data["phases"][0].update(max_duration="P3650D", evaluation_interval="1m")
    assert validate_plan(data)  # the cap itself is allowed


def test_every_traffic_order_problem_is_reported_at_once() -> None:
    """Only the first was, and a repeated name hid the order check."""
    data = copy.deepcopy(demo_data())
    data["phases"][1]["name"] = data["phases"][0]["name"]
    data["phases"][2]["traffic_percent"] = 3
    data["phases"][3]["traffic_percent"] = 2
    with pytest.raises(PlanError) as caught:
        validate_plan(data)
    (line,) = caught.value.lines
    assert "phase names must be unique" in line
    assert "phase 3 (canary-15) field traffic_percent: 3 is below" in line
    assert "phase 4 (ab-50) field traffic_percent: 2 is below" in line


@pytest.mark.parametrize(("what", "change", "words"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_plan_names_phase_and_field(what: str, change: Any, words: list[str]) -> None:
    data = copy.deepcopy(demo_data())
    change(data)
    with pytest.raises(PlanError) as caught:
        validate_plan(data)
    assert len(caught.value.lines) == 1, caught.value.lines
    for word in words:
        assert word in caught.value.lines[0], caught.value.lines[0]


def test_start_dry_run_validates_without_starting(tmp_path: Path) -> None:
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "start",
            "--plan",
            str(DEMO),
            "--dry-run",
            "--data-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert good.returncode == 0, good.stderr
    assert "is valid" in good.stdout
    assert not (tmp_path / "metrics.duckdb").exists()
    data = demo_data()
    data["phases"][2]["traffic_percent"] = 3
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(data))
    bad = subprocess.run(
        [sys.executable, "-m", "flows.cli", "start", "--plan", str(bad_file), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "phase 3 (canary-15)" in bad.stderr and "traffic may only grow" in bad.stderr
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "start",
            "--plan",
            str(tmp_path / "nope.yaml"),
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    # No --plan: the five-week plan of DESIGN.md, from the file people copy.
    default = subprocess.run(
        [sys.executable, "-m", "flows.cli", "start", "--dry-run", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert default.returncode == 0, default.stderr
    assert "plan 'five-week' is valid (5 phases" in default.stdout


def test_profiles_bound_the_guardrails_and_the_stricter_limit_wins() -> None:
    plan = default_plan()
    by_name = {p.name: p for p in plan.phases}
    # canary.env: PROD_LB_ROLLBACK_ERROR_RATE=3 (percent), PROD_LB_ROLLBACK_LATENCY_MS=4000
    for name in ("canary-5", "canary-15"):
        th = by_name[name].thresholds
        assert (th.max_error_rate, th.max_p95_latency_ms) == (0.03, 4000.0)
    assert by_name["ab-50"].thresholds.max_error_rate == 0.05  # ab_test.env: 5 %
    strict = validate_plan(
        {
            "name": "strict",
            "phases": [
                {
                    "name": "canary",
                    "profile": "canary",
                    "mode": "canary",
                    "traffic_percent": 5,
                    "min_duration": 60,
                    "max_duration": 120,
                    "evaluation_interval": 10,
                    "thresholds": {"max_error_rate": 0.01, "max_p95_latency_ms": 9000},
                }
            ],
        }
    )
    th = apply_profiles(strict).phases[0].thresholds
    assert (th.max_error_rate, th.max_p95_latency_ms) == (0.01, 4000.0)


def test_the_profile_file_counts_not_the_flow_workers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROD_LB_ROLLBACK_ERROR_RATE", "50")
    assert profile_limits("canary")["max_error_rate"] == 0.03


def test_unknown_or_broken_profiles_are_refused_naming_phase_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = yaml.safe_load(DEFAULT_PLAN_FILE.read_text())
    data["phases"][1]["profile"] = "canry"
    with pytest.raises(PlanError) as typo:
        apply_profiles(validate_plan(data))
    (line,) = typo.value.lines
    assert line.startswith("phase 2 (canary-5) field profile: profile 'canry': no file")
    assert "allowed: ab_test, canary, production_full, shadow" in line

    (tmp_path / "loose.env").write_text("PROD_LB_ROLLBACK_ERROR_RATE=150\n")
    monkeypatch.setattr("flows.plan.PROFILES_DIR", tmp_path)
    data["phases"][1]["profile"] = "loose"
    with pytest.raises(PlanError) as broken:
        apply_profiles(validate_plan(data))
    (loose,) = [ln for ln in broken.value.lines if ln.startswith("phase 2 (canary-5)")]
    assert "profile 'loose'" in loose and "PROD_LB_ROLLBACK_ERROR_RATE" in loose, loose
    assert "150" in loose


def test_a_plan_from_the_ui_form_gets_its_profiles_applied_when_it_starts(
    tmp_path: Path,
) -> None:
    from flows import lifecycle
    from flows.paths import DataPaths

    form = RolloutPlan.model_validate(yaml.safe_load(DEFAULT_PLAN_FILE.read_text()))
    assert form.phases[1].thresholds.max_error_rate == 0.05  # not applied by the form
    paths = DataPaths.at(tmp_path / "data").ensure()
    started = lifecycle.start(paths, form, actor="test")
    stored = started.rollout.plan.phases[1].thresholds
    assert (stored.max_error_rate, stored.max_p95_latency_ms) == (0.03, 4000.0)


def test_profile_limits_come_from_the_file_whatever_the_worker_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flow worker that carries router variables of its own (a mode that does not fit
    the profile, a looser limit) still reads the profile's limits from its file."""
    from flows.plan import profile_limits

    expected = profile_limits("canary")
    monkeypatch.setenv("PROD_LB_DEPLOYMENT_MODE", "canary")  # with traffic 0: invalid alone
    monkeypatch.setenv("PROD_LB_ROLLBACK_ERROR_RATE", "0.5")
    assert (
        profile_limits("canary")
        == expected
        == {
            "max_error_rate": 0.03,
            "max_p95_latency_ms": 4000.0,
        }
    )
