"""The Spec-Bench dev questions ship inside the package and one loader selects them."""

import json

import pytest

from tkernels.data import SPECBENCH_DEV, Question, specbench_dev


def test_shipped_questions_are_all_there():
    questions = specbench_dev()
    assert len(questions) == 240 and all(isinstance(q, Question) and q.prompt for q in questions)
    assert len({q.category for q in questions}) == 13
    assert SPECBENCH_DEV.is_relative_to(SPECBENCH_DEV.parents[1])  # inside the tkernels package


def test_selection_orders(tmp_path):
    rows = [{"question_id": 10 * i + j, "category": c, "turns": [f"{c} {i}", "second turn"]}
            for i in range(3) for j, c in enumerate("ab")]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert [q.prompt for q in specbench_dev(3, path=data)] == ["a 0", "b 0", "a 1"]
    assert [q.prompt for q in specbench_dev(per_category=1, path=data)] == ["a 0", "b 0"]
    assert [q.prompt for q in specbench_dev(3, round_robin=True, path=data)] == ["a 0", "b 0", "a 1"]
    assert specbench_dev(0, path=data) == []
    assert specbench_dev(path=data)[1] == Question(1, "b", "b 0")


def test_round_robin_prefix_covers_every_category():
    assert len({q.category for q in specbench_dev(13, round_robin=True)}) == 13


def test_bad_arguments_name_themselves(tmp_path):
    with pytest.raises(ValueError, match="^n: "):
        specbench_dev(-1)
    with pytest.raises(ValueError, match="^per_category: "):
        specbench_dev(per_category=1.5)
    with pytest.raises(FileNotFoundError, match="^path: "):
        specbench_dev(path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "a"}\n')
    with pytest.raises(ValueError, match="^path: .* line 1"):
        specbench_dev(path=bad)
