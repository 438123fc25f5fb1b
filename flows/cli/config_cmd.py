"""`rollout config validate|show|migrate`: check PROD_LB_* settings before they bite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.common import console, fail, literal
from flows.resources import resource
from router.backends import ENV_NAME
from router.feature_flags import ENV_PREFIX, ProductionFeatureFlags, load_flags
from router.settings_errors import SECRET_MARKERS, SettingsError, mask_url

app = typer.Typer(help="Validate and show the PROD_LB_* configuration.", no_args_is_help=True)

PROFILES_DIR = resource("deployments/profiles")

Profile = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="A profile name in deployments/profiles (shadow, canary, ab_test, "
        "production_full) or a path to an .env file. The environment overrides it.",
    ),
]


def profile_path(profile: str | None) -> Path | None:
    if profile is None:
        return None
    candidate = Path(profile)
    if candidate.suffix == ".env" or candidate.exists():
        return candidate
    named = PROFILES_DIR / f"{profile}.env"
    if not named.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.env"))
        fail(f"unknown profile {profile!r}; known: {', '.join(known)} (or a path to an .env file)")
    return named


def _load(profile: str | None) -> ProductionFeatureFlags:
    try:
        return load_flags(profile_path(profile))
    except SettingsError as exc:
        fail(exc.lines)


@app.command("validate")
def validate(profile: Profile = None) -> None:
    """Exit 0 if the configuration is valid; otherwise one line per bad variable, exit 2."""
    flags = _load(profile)
    if flags.primary_algorithm.value == "custom" and flags.custom_algorithm:
        from router.algorithms.custom import load_class

        try:  # what the router checks at start-up: import it and look for the methods
            load_class(flags.custom_algorithm)
        except ValueError as exc:
            problem = str(exc).removeprefix(f"custom_algorithm {flags.custom_algorithm!r}: ")
            fail(f"{ENV_PREFIX}CUSTOM_ALGORITHM={flags.custom_algorithm}: {problem}")
    backends = flags.backends()
    hint = (
        ""
        if backends
        else (
            " (set PROD_LB_LIGHTRAG_URLS / PROD_LB_PERPLEXITY_URL or PROD_LB_BACKENDS_FILE on "
            "each host: profiles hold policy, not addresses)"
        )
    )
    console.print(
        f"[green]valid[/green]: mode {flags.effective_mode.value} at "
        f"{flags.effective_percent:g}%, algorithm {flags.primary_algorithm.value}, "
        f"{len(backends)} backend(s){hint}",
        highlight=False,
    )


NOT_A_VARIABLE_NAME = "*** (not a variable name: put the NAME of the variable holding the key)"


def masked_env_name(value: str) -> str:
    """A `*_ENV` value is shown only when it is a variable name: anything else is most
    likely the key itself, pasted in the wrong place. (Validation refuses such values;
    this keeps `show` safe whatever reaches it.)"""
    return value if ENV_NAME.fullmatch(value) else NOT_A_VARIABLE_NAME


def masked_value(name: str, value: object) -> str:
    upper = name.upper()
    if any(marker in upper for marker in SECRET_MARKERS):
        if not upper.endswith("_ENV"):
            return "***"
        return masked_env_name("" if value is None else str(value))
    if isinstance(value, list):  # each URL on its own, so one's query hides no other
        return ",".join(mask_url(str(v)) for v in value)
    return mask_url("" if value is None else str(value))  # URL passwords, query values


@app.command("show")
def show(
    profile: Profile = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Show the effective configuration (secrets masked) and where API keys come from."""
    flags = _load(profile)
    values = {
        f"{ENV_PREFIX}{name.upper()}": masked_value(name, getattr(flags, name))
        for name in ProductionFeatureFlags.model_fields
    }
    keys = {
        b.name: (
            ("set" if b.api_key() else "not set") + f" (from ${b.api_key_env})"
            if ENV_NAME.fullmatch(b.api_key_env)
            else "not set: its *_ENV setting holds no variable name (value hidden)"
        )
        for b in flags.backends()
        if b.api_key_env
    }
    if as_json:
        console.print_json(json.dumps({"variables": values, "api_keys": keys}))
        return
    table = Table("variable", "value", title="effective PROD_LB_* configuration")
    for name, value in values.items():
        table.add_row(name, literal(value))
    console.print(table)
    for backend, state in keys.items():
        console.print(f"API key for {backend}: {state}", markup=False, highlight=False)
