"""`rollout bench store` on tiny data: the measurements run and --json prints one object."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

KEYS = {"segment_rows_per_s", "ingest_rows_per_s", "gate_query_s_10m"}


def test_bench_store_json_is_one_object() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "bench",
            "store",
            "--json",
            "--rows",
            "30000",
            "--ingest-rows",
            "20000",
            "--segment-rows",
            "10000",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # fails on anything but exactly one JSON document
    assert result.keys() >= KEYS
    assert all(result[k] > 0 for k in KEYS)
    assert result["ingest_rows"] == 20_000 and result["gate_rows"] == 30_000
    assert result["gate_rows_selected"] == 10_000  # one of three config versions
