"""Query categories decide which backend kinds may answer a question.

Recent-events questions need live web search (Perplexity); pathway and mechanism
questions are what the curated knowledge graph (LightRAG) is for; the rest may go to
either. A classifier is anything with `classify(text) -> Classification`; the production
router caches its answers per question text, so it must be a function of the text
(assign a new classifier to the router to change the rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from router.backends import BackendKind

EITHER = frozenset({BackendKind.LIGHTRAG, BackendKind.PERPLEXITY})


@dataclass(frozen=True, slots=True)
class Classification:
    category: str
    allowed: frozenset[BackendKind]
    preferred: BackendKind | None
    confidence: float
    reasoning: str

    @property
    def routing_decision(self) -> str:
        """The legacy router's routing decision name."""
        if self.allowed == EITHER:
            return self.preferred.value if self.preferred else "either"
        return next(iter(self.allowed)).value


@runtime_checkable
class QueryClassifier(Protocol):
    def classify(self, text: str) -> Classification: ...


_RECENT = re.compile(
    r"\b(latest|recent(ly)?|this (year|month|week)|news|just (published|approved)|new(est)? "
    r"(study|studies|trial|trials|guideline|guidelines|approval)|20(2[4-9]|3\d))\b",
    re.IGNORECASE,
)
_PATHWAY = re.compile(
    r"\b(pathways?|mechanisms?|metabolism|metaboli[sz]ed|enzymes?|cycle|biosynthesis|"
    r"catabolism|signal(l)?ing|interacts?|regulat(es|ion)|flux)\b",
    re.IGNORECASE,
)


def fit_to_kinds(classification: Classification, kinds: frozenset[BackendKind]) -> Classification:
    """A category whose backend kinds none of the configured backends has (recent events
    on a LightRAG-only deployment) is answered by the configured ones, and says so: an
    answer from the knowledge graph beats an error for every such question."""
    if classification.allowed & kinds:
        return classification
    wanted = " or ".join(sorted(kind.value for kind in classification.allowed))
    return replace(
        classification,
        allowed=kinds,
        preferred=None,
        reasoning=f"{classification.reasoning}; no {wanted} backend is configured, so "
        "any configured backend answers",
    )


class KeywordClassifier:
    """A transparent keyword rule: cheap, explainable, good enough to gate backend kinds."""

    def classify(self, text: str) -> Classification:
        if _RECENT.search(text):
            return Classification(
                "recent_events",
                frozenset({BackendKind.PERPLEXITY}),
                BackendKind.PERPLEXITY,
                0.85,
                "asks about recent events: needs live search",
            )
        if _PATHWAY.search(text):
            return Classification(
                "pathway_mechanism",
                EITHER,
                BackendKind.LIGHTRAG,
                0.8,
                "pathway or mechanism question: the knowledge graph answers best",
            )
        return Classification("general", EITHER, None, 0.6, "general question: any backend")
