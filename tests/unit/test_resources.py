"""Shipped files: found in a checkout, and carried by the wheel for a plain `pip install`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flows import resources
from tests.conftest import ROOT

SHIPPED = [
    "deployments/plans/demo.yaml",
    "deployments/prefect.yaml",
    "deployments/profiles/shadow.env",
    "deployments/profiles/canary.env",
    "deployments/profiles/ab_test.env",
    "deployments/profiles/production_full.env",
    "deployments/profiles/production.env.template",
    "data/workload/questions.jsonl",
]


def test_the_checkout_wins_then_the_bundle_then_the_name_people_look_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout, bundle = tmp_path / "checkout", tmp_path / "bundle"
    (checkout / "deployments").mkdir(parents=True)
    (bundle / "deployments").mkdir(parents=True)
    (checkout / "deployments/a.yaml").write_text("checkout")
    (bundle / "deployments/a.yaml").write_text("bundle")
    (bundle / "deployments/b.yaml").write_text("bundle")
    monkeypatch.setattr(resources, "PROJECT_ROOT", checkout)
    monkeypatch.setattr(resources, "BUNDLED", bundle)
    assert resources.resource("deployments/a.yaml").read_text() == "checkout"
    assert resources.resource("deployments/b.yaml").read_text() == "bundle"
    assert resources.resource("deployments/c.yaml") == checkout / "deployments/c.yaml"


def test_the_wheel_carries_every_shipped_file(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in SHIPPED if f"flows/_bundled/{f}" not in names]
    assert not missing, missing
    assert "flows/resources.py" in names and "router/production_router.py" in names
    # Nothing generated rides along: no databases, segments or caches.
    assert not [n for n in names if n.endswith((".duckdb", ".parquet", ".pyc"))]
