"""Answer text whose quality is visible in the content (citations, substance)."""

from __future__ import annotations

import random

SOURCES = [
    "HMDB: Human Metabolome Database entry",
    "KEGG pathway map",
    "Reactome pathway record",
    "Clin Chem 2023 review",
    "Metabolomics Society best-practice guideline",
    "NIST SRM 1950 plasma reference data",
    "PubMed: cohort study on serum metabolites",
    "J Proteome Res methods paper",
]

BODY = (
    "Current evidence links the metabolites involved to the clinical picture described. "
    "Targeted LC-MS/MS with stable-isotope internal standards gives the most reliable "
    "quantification; untargeted profiling is useful for discovery but needs confirmation. "
    "Interpret values against age- and sex-matched reference intervals and consider "
    "pre-analytical factors such as fasting state, haemolysis and storage temperature. "
)


def answer_text(query: str, quality: float, rng: random.Random) -> tuple[str, list[str]]:
    """Good answers are longer and cite sources; poor ones are short and cite nothing."""
    good = rng.random() < quality
    topic = query.rstrip("?")[:120]
    if not good:
        return f"Regarding '{topic}': this depends on context; please consult the literature.", []
    picked = rng.sample(range(len(SOURCES)), 3)
    text = f"Regarding '{topic}': {BODY}{BODY[:200]}[1][2][3]\n\nReferences:\n" + "\n".join(
        f"[{i}] {SOURCES[s]}" for i, s in enumerate(picked, start=1)
    )
    return text, [f"https://example.org/ref/{s}" for s in picked]
