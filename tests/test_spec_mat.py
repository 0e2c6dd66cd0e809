"""The MAT harness (bench/spec_mat.py) is lossless: speculative output == greedy, token for token."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tkernels.spec.verify", reason="verification (tkernels.spec.verify) not available yet")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "spec_mat.py"


@pytest.fixture(scope="module")
def spec_mat():
    spec = importlib.util.spec_from_file_location("spec_mat", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tkernels.models import tiny_llama_dir

    path = tiny_llama_dir()
    # float64: the tree forward and the one-token forwards must agree on every argmax
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_speculative_decoding_is_lossless(spec_mat, tiny_model):
    model, tokenizer = tiny_model
    questions = [("writing", "Write a short poem about the sea and the sea and the sea."), ("qa", "What is the capital of France?")]
    methods = ["pld", "tr_static:80", "tr_static:16", "tr_dynamic:32", "tr_dynamic:80@64"]
    records = spec_mat.run(model, tokenizer, questions, methods, max_new_tokens=32, log=lambda _: None)
    assert {(r["method"], r["nodes"], r["batch"]) for r in records} == {
        ("pld", 11, None), ("tr_static", 80, None), ("tr_static", 16, None), ("tr_dynamic", 32, None), ("tr_dynamic", 80, 64)}
    for r in records:
        assert r["equal"], r
        assert r["mat"] >= 1.0
        assert r["questions"] == (2 if r["category"] == "overall" else 1)
    print(spec_mat.format_table(records))


def test_load_questions_takes_first_turns_per_category(spec_mat, tmp_path):
    rows = [{"category": c, "turns": [f"{c} {i}", "second turn"]} for i in range(3) for c in ("a", "b")]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert spec_mat.load_questions(data, 2) == [("a", "a 0"), ("b", "b 0"), ("a", "a 1"), ("b", "b 1")]
    assert len(spec_mat.load_questions(data, None)) == 6
