"""The shipped workload: realistic clinical-metabolomics questions, and who asks them."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from flows.resources import resource

DEFAULT_WORKLOAD = resource("data/workload/questions.jsonl")


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    kind: str


def load_questions(path: Path | None = None) -> list[Question]:
    path = Path(path or DEFAULT_WORKLOAD)
    if path.is_dir():
        raise IsADirectoryError(f"workload {path} is a folder: give the JSON lines file itself")
    if not path.is_file():
        raise FileNotFoundError(
            f"workload {path} not found: pass --workload FILE (JSON lines with id, text, kind)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"workload {path} is not UTF-8 text (byte {exc.start})") from None
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            questions.append(
                Question(str(item["id"]), str(item["text"]), str(item.get("kind", "")))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: not a question object: {exc}") from None
    if not questions:
        raise ValueError(f"workload {path} holds no questions")
    return questions


class Users:
    """Many distinct users with a skewed activity (a few ask a lot), as in real traffic."""

    def __init__(self, count: int, rng: random.Random) -> None:
        self.ids = [f"user-{i:05d}" for i in range(count)]
        self.weights = [1.0 / (rank + 1) ** 0.8 for rank in range(count)]
        self.rng = rng

    def pick(self) -> str:
        return self.rng.choices(self.ids, self.weights)[0]
