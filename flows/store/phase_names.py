"""Phase names that are no plan phase: how the views label rows routed outside a phase.

Kept apart from `schema` so the CLI can name them without importing pyarrow.
"""

from __future__ import annotations

#: The phase name of the legacy_only document a rollback or abort publishes.
ROLLBACK_PHASE = "rollback"
#: `arm_summary.phase_name` of the rows routed after a completed rollout ended.
AFTER_COMPLETION_PHASE = "after completion"
#: Both, as a SQL list: `... AND phase_name NOT IN {NOT_A_PHASE_SQL}`.
NOT_A_PHASE_SQL = f"('{ROLLBACK_PHASE}', '{AFTER_COMPLETION_PHASE}')"
