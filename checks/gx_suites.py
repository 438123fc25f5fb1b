"""Great Expectations suites on frames produced by DuckDB queries.

GX does not speak DuckDB, so the gate queries DuckDB and validates pandas frames:
raw rows for data quality, one-row aggregate frames for guardrails and comparisons
(quantiles computed in SQL). Thresholds enter as suite parameters (`$PARAMETER`), and
each expectation carries its metric name in `meta`, because GX results echo the
substituted value but not the parameter name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

DOCS_SITE = "rollout_docs"


@dataclass(frozen=True)
class Check:
    """One expectation and the metric it guards."""

    metric: str
    expectation: Any
    threshold_param: str | None = None


@dataclass
class CheckOutcome:
    metric: str
    success: bool
    observed: Any
    threshold: float | None
    expectation_type: str
    detail: str = ""


@dataclass
class SuiteOutcome:
    suite: str
    success: bool
    outcomes: list[CheckOutcome] = field(default_factory=list)
    docs_url: str | None = None


def _import_gx() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"module 'sre_(constants|parse)' is deprecated")
    import great_expectations as gx

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    logging.captureWarnings(False)  # GX turns this on globally at import
    return gx


def gxe() -> Any:
    """The expectations module (imported lazily: GX takes seconds to import)."""
    _import_gx()
    import great_expectations.expectations as expectations

    return expectations


#: Data Docs validation pages are kept this long (a phase lasts at most 14 days).
DOCS_KEEP_DAYS = 30
#: Validation runs of this process the Data Docs index page lists (older pages stay, linked
#: from their decision records).
DOCS_INDEX_LIMIT = 50


class GxRunner:
    """One quiet GX context per process; validation definitions cached per suite name.

    With `docs_dir`, each run goes through a checkpoint whose action renders Data Docs
    into that folder, and the outcome links the validation page.
    """

    def __init__(self, docs_dir: Path | None = None) -> None:
        # GX refuses a relative base directory for its filesystem store.
        self.docs_dir = Path(docs_dir).absolute() if docs_dir else None
        self._ready = False
        self._indexed: deque[Any] = deque()
        self._definitions: dict[str, Any] = {}
        self._checkpoints: dict[str, Any] = {}

    def _set_up(self) -> None:
        """The context is made on the first run, not with the runner: it costs seconds
        (2.6 s in a fresh process), and most scheduled ticks find nothing due."""
        if self._ready:
            return
        gx = _import_gx()
        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = {"globally": False, "metric_calculations": False}
        if self.docs_dir is not None:
            self.docs_dir.mkdir(parents=True, exist_ok=True)
            self.context.add_data_docs_site(
                site_name=DOCS_SITE,
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(self.docs_dir),
                    },
                    "site_index_builder": {
                        "class_name": "KeepingSiteIndexBuilder",
                        "module_name": "checks.gx_site",
                    },
                },
            )
        self.source = self.context.data_sources.add_pandas("frames")
        self._ready = True

    def _definition(self, name: str, checks: list[Check]) -> Any:
        key = f"{name}:{'|'.join(c.metric for c in checks)}"
        if key not in self._definitions:
            index = len(self._definitions)
            asset = self.source.add_dataframe_asset(f"{name}-{index}")
            batch = asset.add_batch_definition_whole_dataframe("whole")
            suite = self.context.suites.add(
                self._gx.ExpectationSuite(
                    name=f"{name}-{index}", expectations=[c.expectation for c in checks]
                )
            )
            definition = self.context.validation_definitions.add(
                self._gx.ValidationDefinition(name=f"{name}-{index}", data=batch, suite=suite)
            )
            self._definitions[key] = definition
            if self.docs_dir is not None:
                self._checkpoints[key] = self.context.checkpoints.add(
                    self._gx.Checkpoint(
                        name=f"{name}-{index}",
                        validation_definitions=[definition],
                        actions=[
                            self._gx.checkpoint.UpdateDataDocsAction(
                                name="docs", site_names=[DOCS_SITE]
                            )
                        ],
                        result_format={"result_format": "BASIC"},
                    )
                )
        return key

    def run(
        self,
        name: str,
        checks: list[Check],
        frame: pd.DataFrame,
        parameters: dict[str, float],
        run_name: str,
    ) -> SuiteOutcome:
        if not checks:
            return SuiteOutcome(name, True)
        self._set_up()
        key = self._definition(name, checks)
        docs_url = None
        if key in self._checkpoints:
            from great_expectations.core.run_identifier import RunIdentifier

            result = self._checkpoints[key].run(
                batch_parameters={"dataframe": frame},
                expectation_parameters=parameters,
                run_id=RunIdentifier(run_name=run_name),
            )
            ((identifier, validation),) = result.run_results.items()
            urls = self.context.get_docs_sites_urls(
                resource_identifier=identifier, site_name=DOCS_SITE
            )
            docs_url = urls[0]["site_url"] if urls else None
            # The page is written. A long-lived process kept every result in memory, and
            # each index build went over all of them (1 s to 4.7 s after 400 runs): the
            # index lists the newest `DOCS_INDEX_LIMIT` of this process's results.
            self._indexed.append(identifier)
            while len(self._indexed) > DOCS_INDEX_LIMIT:
                self.context.validation_results_store.remove_key(self._indexed.popleft())
            self._prune_docs()
        else:
            validation = self._definitions[key].run(
                batch_parameters={"dataframe": frame},
                expectation_parameters=parameters,
                result_format="BASIC",
            )
        return SuiteOutcome(name, bool(validation.success), _outcomes(validation), docs_url)

    def _prune_docs(self) -> None:
        """Validation pages older than `DOCS_KEEP_DAYS` go: about 150 KB per evaluation,
        and the index build lists every page kept."""
        assert self.docs_dir is not None
        cutoff = time.time() - DOCS_KEEP_DAYS * 86_400
        pages = self.docs_dir / "validations"
        for page in pages.rglob("*.html"):
            with contextlib.suppress(FileNotFoundError):
                if page.stat().st_mtime < cutoff:
                    page.unlink()
        for folder in sorted(pages.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir():
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty

    def index_url(self) -> str | None:
        if self.docs_dir is None:
            return None
        return (self.docs_dir / "index.html").resolve().as_uri()


def _outcomes(validation: Any) -> list[CheckOutcome]:
    data = validation.to_json_dict()
    outcomes = []
    for item in data["results"]:
        config = item["expectation_config"]
        kwargs = config["kwargs"]
        meta = config.get("meta") or {}
        result = item.get("result") or {}
        observed = result.get("observed_value")
        threshold = kwargs.get("max_value", kwargs.get("min_value"))
        if kwargs.get("mostly") is not None and "unexpected_percent" in result:
            # a row check with a tolerance: the share of rows off against the share allowed
            # (it read "current_config_version = 40 within 1": a count against a version)
            observed = (result.get("unexpected_percent") or 0.0) / 100.0
            threshold = round(1.0 - float(kwargs["mostly"]), 12)
        elif observed is None and "unexpected_count" in result:
            observed = result.get("unexpected_count")
        info = item.get("exception_info") or {}
        if "raised_exception" in info:
            error = info.get("exception_message") if info.get("raised_exception") else None
        else:
            error = "; ".join(str(v.get("exception_message", "")) for v in info.values()) or None
        detail = error or ""
        if not detail and "unexpected_count" in result:
            detail = (
                f"{result.get('unexpected_count')} of {result.get('element_count')} rows "
                f"unexpected, e.g. {result.get('partial_unexpected_list', [])[:3]}"
            )
        outcomes.append(
            CheckOutcome(
                metric=str(meta.get("metric", config["type"])),
                success=bool(item["success"]),
                observed=observed,
                threshold=float(threshold) if isinstance(threshold, int | float) else None,
                expectation_type=config["type"],
                detail=detail,
            )
        )
    return outcomes
