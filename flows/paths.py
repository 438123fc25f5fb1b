"""Where everything lives under the data directory (`--data-dir`, `ROLLOUT_DATA_DIR`, `data/`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "ROLLOUT_DATA_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


@dataclass(frozen=True)
class DataPaths:
    root: Path

    @classmethod
    def at(cls, root: Path | str | None = None) -> DataPaths:
        """Absolute from here on: child processes, GX and Prefect artifacts may run
        elsewhere than the working directory the user typed `data/` in."""
        return cls((Path(root) if root is not None else default_data_dir()).absolute())

    @property
    def database(self) -> Path:
        return self.root / "metrics.duckdb"

    @property
    def segments(self) -> Path:
        return self.root / "segments"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def control(self) -> Path:
        return self.root / "control"

    @property
    def gx(self) -> Path:
        return self.root / "gx"

    @property
    def runs(self) -> Path:
        """Pid files, logs and fleet files of processes the CLI started."""
        return self.root / "runs"

    def load_report(self, instance: str) -> Path:
        """Where the demo app leaves its counts on the way out, for the demo's closing lines."""
        return self.runs / f"{instance}-load.json"

    def ensure(self) -> DataPaths:
        for path in (self.root, self.segments, self.quarantine, self.control, self.runs):
            path.mkdir(parents=True, exist_ok=True)
        return self
