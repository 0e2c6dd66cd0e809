"""The main job's comparison table (tkernels speculation-bench) from made-up runs: MAT and
equality first, the predicted GPU tokens/s beside the CPU's wall clock, each labelled. No vLLM
runs here (tests/vllm runs the command's engine path)."""

from tkernels.cli import speculation_bench as sb
from tkernels.data import specbench_dev


def _run(method, k, token_ids, steps, drafts=0, draft_tokens=0):
    return {"method": method, "rounds": 1, "num_spec_tokens": k, "token_ids": token_ids, "steps": steps,
            "seconds": 2.0, "counters": {"spec_decode_num_drafts": drafts, "spec_decode_num_draft_tokens": draft_tokens,
                                         "spec_decode_num_accepted_tokens": 0}}


def test_defaults_are_the_main_jobs_comparison():
    assert sb.DEFAULT_METHODS == ("none", "ngram", "tree:tr_static", "tree:hybrid")
    for method in sb.DEFAULT_METHODS:
        sb.speculative_config(method, sb.DEFAULT_SPEC_TOKENS)  # every default is a valid method
    questions = specbench_dev(13, 1)
    assert len({q.category for q in questions}) == 13  # one question of every category


def test_table_puts_mat_and_equality_first_and_labels_predicted_and_measured_speed():
    questions = specbench_dev(2, 1)
    ids = [[1] * 9, [2] * 9]
    runs = [_run("none", 5, ids, [9, 9]), _run("ngram", 32, ids, [5, 9], drafts=4, draft_tokens=8),
            _run("tree:hybrid", 32, ids, [3, 5])]
    records = sb.summarize(runs, questions)
    plain, ngram, tree = records
    assert plain["mat"] == 1.0 and tree["mat"] == 18 / 8 and all(r["equal"] for r in records)
    # predicted per request: 16 decode tokens over the decode steps' predicted time
    model = sb.predicted_gpu_tokens_per_s
    assert plain["predicted_gpu_tokens_per_s"] == model(runs[0], 2) > 0
    # fewer steps of 33 tokens beat many 1-token steps at batch 1 (weight-bound)
    assert tree["predicted_gpu_tokens_per_s"] > ngram["predicted_gpu_tokens_per_s"] > plain["predicted_gpu_tokens_per_s"]
    table = sb.format_table(records)
    header = table.splitlines()[0].split()
    assert header[:3] == ["method", "MAT", "equal"] and "GPU" in header and "CPU" in header
    assert "PREDICTED" in table and "MEASURED" in table
    assert questions[0].category in table and questions[1].category in table
