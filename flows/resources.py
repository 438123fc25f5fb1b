"""Files the tool ships beside its code: rollout plans, env profiles, `prefect.yaml` and
the demo workload.

In a checkout they live in `deployments/` and `data/workload/` at the repository root
(where people edit them). A wheel carries copies under `flows/_bundled/` (see
`pyproject.toml`), so `pip install router-rollout` gives a working `rollout demo`,
`rollout config validate --profile NAME` and `rollout deploy` without a checkout.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root in a checkout (or an editable install); site-packages otherwise.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUNDLED = Path(__file__).resolve().parent / "_bundled"


def resource(relative: str) -> Path:
    """The checkout's file if there is one, else the copy bundled in the wheel.

    Returns the checkout path when neither exists, so the caller's error names the
    file people would look for."""
    checkout = PROJECT_ROOT / relative
    if checkout.exists():
        return checkout
    bundled = BUNDLED / relative
    return bundled if bundled.exists() else checkout


def code_root() -> Path:
    """The folder that holds the `flows` package: what Prefect entrypoints such as
    `flows/rollout_flows.py:rollout_tick` resolve against."""
    return PROJECT_ROOT
