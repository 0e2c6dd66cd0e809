"""The MAT harness (bench/spec_mat.py) is lossless: speculative output == greedy, token for token."""

import json

import pytest
import torch

from tkernels.data import Question

pytest.importorskip("transformers")
pytest.importorskip("tkernels.spec.verify", reason="verification (tkernels.spec.verify) not available yet")

@pytest.fixture(scope="module")
def spec_mat(bench_script):
    return bench_script("spec_mat")


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
    questions = [Question(1, "writing", "Write a short poem about the sea and the sea and the sea."),
                 Question(2, "qa", "What is the capital of France?")]
    methods = ["pld", "tr_static:80", "tr_static:16", "tr_static:128", "tr:32", "tr:80@64", "hybrid:32",
               "hybrid:16@8+prompt", "retrieval:16"]
    raw = spec_mat.run(model, tokenizer, questions, methods, max_new_tokens=32, log=lambda _: None)
    records = spec_mat.summarize(raw)
    assert {(r["method"], r["nodes"], r["batch"]) for r in records} == {
        ("pld", 11, None), ("tr_static", 80, None), ("tr_static", 16, None), ("tr_static", 128, None),
        ("tr", 32, None), ("tr", 80, 64), ("hybrid", 32, None), ("hybrid+prompt", 16, 8), ("retrieval", 16, None)}
    for r in records:
        assert r["equal"], r
        assert r["mat"] >= 1.0
        assert r["questions"] == (2 if r["category"] == "overall" else 1)
        assert set(r["predicted_tokens_per_s"]) == {"H100", "H200"}
    for per_question in raw.values():
        for r in per_question:
            assert r["tokens"] <= 32 and r["forwards"] == 1 + len(r["step_nodes"])
    print(spec_mat.format_table(records))


class _Oracle:
    """Drafts the next ``num_draft`` tokens of a known greedy answer: every draft is accepted."""

    method, batch, nodes = "oracle", None, 11

    def __init__(self, prompt_len: int, answer: list[int], num_draft: int = 10):
        self.prompt_len, self.answer, self.num_draft = prompt_len, answer, num_draft

    def draft(self, history):
        done = history.numel() - self.prompt_len
        chain = [int(history[-1])] + self.answer[done : done + self.num_draft]
        return torch.tensor(chain), torch.arange(-1, len(chain) - 1, dtype=torch.int32), torch.tensor([0, len(chain)], dtype=torch.int32)

    def observe(self, *args):
        pass


def test_mat_counts_what_the_user_receives_per_forward(spec_mat, tiny_model):
    """The prefill's forward gives the first token; a last step's tokens past the cap are not counted."""
    model, tokenizer = tiny_model
    prompt = spec_mat.encode_prompt(tokenizer, "Count to twenty, please.")
    prefilled = spec_mat.prefill(model, prompt)
    answer = spec_mat.greedy_decode(model, prefilled, 40, eos=set())  # the oracle drafts past the cap of 32
    tokens, step_nodes, _draft_s = spec_mat.speculative_decode(model, prompt, prefilled, 32, set(), _Oracle(prompt.numel(), answer))
    assert tokens == answer[:32]
    assert step_nodes == [11, 11, 11]  # 1 + 11 + 11 + 9 of the last step's 11 (two past the cap dropped)
    raw = {"pld": [{"question_id": 0, "category": "c", "tokens": len(tokens), "forwards": 1 + len(step_nodes),
                    "step_nodes": step_nodes, "equal": True}]}
    record, overall = spec_mat.summarize(raw)
    assert record["mat"] == overall["mat"] == 32 / 4
    for gpu, model_ in spec_mat.STEP_MODELS.items():  # decode tokens over the verify steps' predicted time
        assert overall["predicted_tokens_per_s"][gpu]["8"] == pytest.approx(31e6 / (3 * model_.step_time(8 * 11)))


def test_summarize_sums_tokens_and_forwards_over_questions(spec_mat):
    raw = {"tr_static:4": [
        {"question_id": 1, "category": "a", "tokens": 10, "forwards": 5, "step_nodes": [4] * 4, "equal": True},
        {"question_id": 2, "category": "b", "tokens": 3, "forwards": 3, "step_nodes": [4, 1], "equal": False},
    ]}
    by_category = {r["category"]: r for r in spec_mat.summarize(raw)}
    assert by_category["overall"]["mat"] == 13 / 8 and by_category["a"]["mat"] == 2.0 and by_category["b"]["mat"] == 1.0
    assert by_category["overall"]["equal"] is False and by_category["overall"]["mean_tree_nodes"] == 21 / 6


def test_drafting_cost_adds_the_batch_s_host_time_to_every_step(spec_mat, tmp_path):
    raw = {"hybrid:9": [{"question_id": 1, "category": "a", "tokens": 10, "forwards": 4, "step_nodes": [9, 9, 5],
                         "equal": True}],
           "tr:9": [{"question_id": 1, "category": "a", "tokens": 7, "forwards": 4, "step_nodes": [9] * 3, "equal": True}]}
    bench = {"benchmarks": [  # pytest-benchmark's file as bench/bench_drafters.py writes it
        {"stats": {"median": 32 * 250e-6}, "extra_info": {"impl": "hybrid", "nodes": 9, "batch": 32, "us": 1.0}},
        {"stats": {"median": 1.0}, "extra_info": {}}]}
    path = tmp_path / "d1.json"
    path.write_text(json.dumps(bench))
    costs = spec_mat.load_draft_cost(path)
    assert costs == {("hybrid", 9): pytest.approx(250.0)}  # the median per request, not the extra "us"
    records = {r["method"]: r for r in spec_mat.summarize(raw, costs) if r["category"] == "overall"}
    assert "predicted_tokens_per_s_with_drafting" not in records["tr"]  # no D1 record: no claim
    hybrid = records["hybrid"]
    for gpu, model in spec_mat.STEP_MODELS.items():
        for b in spec_mat.PREDICTED_BATCHES:
            steps = sum(model.step_time(b * n) for n in (9, 9, 5))
            assert hybrid["predicted_tokens_per_s_with_drafting"][gpu][str(b)] == pytest.approx(9e6 / (steps + 3 * b * 250.0))
            assert hybrid["predicted_tokens_per_s"][gpu][str(b)] == pytest.approx(9e6 / steps)
    assert "with the host's drafting" in spec_mat.format_table(list(spec_mat.summarize(raw, costs)))
    path.write_text(json.dumps({"benchmarks": [bench["benchmarks"][1]]}))
    with pytest.raises(ValueError, match="^path:"):
        spec_mat.load_draft_cost(path)


def test_per_batch_drafting_cost_prices_each_batch_at_its_own(spec_mat, tmp_path):
    raw = {"hybrid:9": [{"question_id": 1, "category": "a", "tokens": 10, "forwards": 4, "step_nodes": [9, 9, 5],
                         "equal": True}]}
    per_request = {1: 40.0, 8: 20.0, 32: 15.0, 64: 12.0}
    bench = {"benchmarks": [  # pytest-benchmark's file as bench/bench_host.py writes it
        {"stats": {"median": b * us * 1e-6}, "extra_info": {"impl": "hybrid", "nodes": 9, "batch": b, "us": 1.0}}
        for b, us in per_request.items()]}
    path = tmp_path / "h1.json"
    path.write_text(json.dumps(bench))
    costs = spec_mat.load_draft_cost(path)
    assert costs == {("hybrid", 9): pytest.approx(per_request)}
    hybrid = next(r for r in spec_mat.summarize(raw, costs) if r["category"] == "overall")
    for gpu, model in spec_mat.STEP_MODELS.items():
        for b in spec_mat.PREDICTED_BATCHES:
            steps = sum(model.step_time(b * n) for n in (9, 9, 5))
            assert hybrid["predicted_tokens_per_s_with_drafting"][gpu][str(b)] == pytest.approx(
                9e6 / (steps + 3 * b * per_request[b]))
    assert "40/20/15/12" in spec_mat.format_table(spec_mat.summarize(raw, costs))
    path.write_text(json.dumps({"benchmarks": bench["benchmarks"][:2]}))
    with pytest.raises(ValueError, match="^path:.*missing"):
        spec_mat.load_draft_cost(path)


def test_load_questions_takes_first_turns_per_category(spec_mat, tmp_path):
    rows = [{"category": c, "turns": [f"{c} {i}", "second turn"]} for i in range(3) for c in ("a", "b")]
    data = tmp_path / "q.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert [(q.category, q.prompt) for q in spec_mat.load_questions(data, 2)] == [("a", "a 0"), ("b", "b 0"), ("a", "a 1"), ("b", "b 1")]
    assert len(spec_mat.load_questions(data, None)) == 6


def test_method_specs(spec_mat):
    assert spec_mat.parse_method("hybrid:80@32+prompt") == ("hybrid", 80, 32, True)
    assert spec_mat.parse_method("pld") == ("pld", None, None, False)
    for bad in ("hybrid:80+other", "tr:x", "tr_static:16@8", "nope:16", "tr"):
        with pytest.raises(ValueError, match="--methods"):
            spec_mat.make_drafter(bad, 100)


def test_merge_keeps_the_files_questions_and_never_writes_nothing(spec_mat, tmp_path):
    """--merge without --questions-per-category merges over the first file's questions (the
    committed runs' subset); a merge that finds no complete method refuses, --out untouched."""
    record = {"category": "a", "tokens": 10, "forwards": 4, "step_nodes": [9, 9, 5], "equal": True}
    doc = {"question_ids": [1, 2], "raw": {"pld:9": [{**record, "question_id": 1}, {**record, "question_id": 2}]}}
    source, out = tmp_path / "a.json", tmp_path / "out.json"
    source.write_text(json.dumps(doc))
    spec_mat.main(["--merge", str(source), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert merged["question_ids"] == [1, 2] and list(merged["raw"]) == ["pld:9"]
    out.write_text("kept")
    with pytest.raises(SystemExit, match="--merge: no method"):
        spec_mat.main(["--merge", str(source), "--out", str(out), "--questions-per-category", "1"])
    assert out.read_text() == "kept"
