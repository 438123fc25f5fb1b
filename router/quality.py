"""Answer quality from the answer itself, in 0..1.

Backends do not grade themselves, so the score rewards what a clinician checks first:
cited sources and enough substance. It is a proxy, recorded per request so that the
rollout compares arms on the same scale; `None` when quality metrics are switched off.
"""

from __future__ import annotations

import re

_REFERENCE = re.compile(r"\[(\d+)\]|\bReferences?:", re.IGNORECASE)


def quality_score(text: str, citations: tuple[str, ...] = ()) -> float:
    # Citation markers look like "[1]"; counting brackets first skips the regex for the
    # many answers that have none.
    markers = len(_REFERENCE.findall(text)) if "[" in text or "eferenc" in text else 0
    sources = max(len(citations), markers)
    cited = min(1.0, sources / 3.0)
    substance = min(1.0, len(text) / 600.0)
    return round(0.6 * cited + 0.4 * substance, 4)
