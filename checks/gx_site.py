"""The Data Docs index builder: it keeps the pages of earlier processes.

GX's default index build deletes every page whose validation result its own (here
in-memory) store does not hold. Each scheduled tick is a new process, so every
evaluation deleted the pages of the ones before it, and the Data Docs links in their
decision records and Prefect artifacts were dead. This builder deletes nothing: the
index lists the results this process holds (its newest runs), the pages of the
others stay where their links point, and old pages are pruned by age instead
(`checks.gx_suites.DOCS_KEEP_DAYS`). GX imports it by name, once GX is loaded.
"""

from __future__ import annotations

from typing import Any

from great_expectations.render.renderer.site_builder import DefaultSiteIndexBuilder


class KeepingSiteIndexBuilder(DefaultSiteIndexBuilder):  # type: ignore[misc]
    def build(self, skip_and_clean_missing: bool = True, build_index: bool = True) -> Any:
        return super().build(skip_and_clean_missing=False, build_index=build_index)

    def _build_validation_and_profiling_result_site_keys(
        self, skip_and_clean_missing: bool
    ) -> list[Any]:
        """The pages of results this process holds: listing the others only logged a
        "Validation result not found" warning for each."""
        keys = super()._build_validation_and_profiling_result_site_keys(False)
        config = self.site_section_builders_config.get("validations") or {}
        store = self.data_context.stores.get(config.get("source_store_name", ""))
        if store is None:
            return keys
        held = set(store.list_keys())
        return [key for key in keys if key in held]
