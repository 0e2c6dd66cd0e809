"""Data that ships with tkernels: the Spec-Bench dev questions.

``specbench_dev.jsonl`` holds 240 of the 480 Spec-Bench questions (hemingkx/Spec-Bench,
``data/spec_bench/question.jsonl``, Apache-2.0; source and licence in ``README.md`` beside it),
lines unchanged: every other question of each of Spec-Bench's six categories. The 80 MT-bench
lines carry their eight sub-categories (writing, roleplay, reasoning, math, coding, extraction,
stem, humanities), so there are 13 category labels. Fields: ``question_id``, ``category``,
``turns`` (the acceptance-length workload uses ``turns[0]``).

It is package data, so an installed wheel and an editable checkout read the same file and
nothing outside the package is ever read. Every reader (the vLLM demo and speculation bench,
``bench/spec_mat.py``, tests) selects questions through :func:`specbench_dev`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

SPECBENCH_DEV = Path(__file__).resolve().parent / "specbench_dev.jsonl"

__all__ = ["SPECBENCH_DEV", "Question", "specbench_dev"]


class Question(NamedTuple):
    question_id: int
    category: str
    prompt: str  # the first turn


def specbench_dev(n: int | None = None, per_category: int | None = None, *, round_robin: bool = False,
                  path: Path | str = SPECBENCH_DEV) -> list[Question]:
    """Spec-Bench dev questions (first turns).

    Args:
        n: keep the first ``n`` of the selection (None: all).
        per_category: at most this many per category; implies ``round_robin``.
        round_robin: order the selection category by category in turn (file order within each),
            so that any prefix of it covers every category; otherwise file order.
        path: a JSONL file in the same format (tests); default the shipped copy.

    Returns:
        list of :class:`Question` ``(question_id, category, prompt)``.
    """
    for name, value in (("n", n), ("per_category", per_category)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{name}: must be a non-negative int or None, got {value!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: Spec-Bench questions not found at {path}")
    questions = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            try:
                questions.append(Question(row.get("question_id", number), row["category"], row["turns"][0]))
            except (KeyError, IndexError, TypeError) as e:
                raise ValueError(f"path: {path} line {number} has no category or first turn ({e!r})") from None
    if per_category is not None or round_robin:
        by_category: dict[str, list[Question]] = defaultdict(list)
        for q in questions:
            by_category[q.category].append(q)
        rounds = max(map(len, by_category.values()), default=0)
        if per_category is not None:
            rounds = min(rounds, per_category)
        questions = [qs[i] for i in range(rounds) for qs in by_category.values() if i < len(qs)]
    return questions if n is None else questions[:n]
