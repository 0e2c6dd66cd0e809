"""SGLang's real server (``python -m sglang.launch_server``) on its CPU engine, with tkernels' plugin.

One server per configuration, on 127.0.0.1 and a free port, the tiny random Llama in float32,
tkernels' attention backend (Triton kernels under the interpreter), SGLang's CPU engine
(``SGLANG_USE_CPU_ENGINE=1``) with tkernels' ``sgl_kernel`` stand-in (no ``sgl_kernel`` here):

- ``plain``: no tkernels feature;
- ``budget``: ``TKERNELS_SGLANG=budget`` with mixed chunks;
- ``token_recycling``: NGRAM speculation with Token Recycling drafts, overlap scheduling on;
- ``both``: the two together (mixed chunks with NGRAM need ``--disable-overlap-schedule``).

Each serves the same workload: 8 concurrent greedy requests, with a prompt longer than the chunk
size sent once the others are decoding; a request near the context limit; a sampled request;
a request over the context limit (HTTP 400); then a greedy request again. Every greedy output must
be plain greedy decoding's (transformers, float32), so the four configurations agree token for
token. The HTTP client is the standard library's. Few tokens: CI has 2 cores.
"""

import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import free_port, stop, wait_healthy

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

CONTEXT = 256
CHUNK = 64  # --chunked-prefill-size: the long prompt takes several chunks
MAX_TOKENS = 16
START_TIMEOUT_S = 600  # a shared 2-core machine: the start alone can take a minute or more
REQUEST_TIMEOUT_S = 300
DRAFT_TOKENS = 8
NGRAM = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(DRAFT_TOKENS)]
# prompt + max_new_tokens of the near-limit request: CONTEXT - NEAR_LIMIT_GAP. SGLang 0.5.23's NGRAM
# reserves committed + 2d KV slots per step in a row of CONTEXT + 4 + d, and may commit up to d - 1
# tokens past max_new_tokens, so closer than 2d - 5 tokens it overruns the row (docs/sglang.md).
NEAR_LIMIT_GAP = 2 * DRAFT_TOKENS - 4
CONFIGS = {
    "plain": ({}, []),
    "budget": ({"TKERNELS_SGLANG": "budget"}, ["--enable-mixed-chunk"]),
    "token_recycling": ({"TKERNELS_SGLANG": "token_recycling"}, NGRAM),
    "both": ({"TKERNELS_SGLANG": "budget,token_recycling"},
             NGRAM + ["--enable-mixed-chunk", "--disable-overlap-schedule"]),
}


# What each configuration's server logs once its tkernels features are in place.
BUDGET_LINE = "tkernels: decode-maximal chunk budget on"
TREE_LINE = "tkernels: NGRAM on SGLang's CPU engine builds the n x (prefix + n) verify mask"
FEATURE_LINES = {"plain": [], "budget": [BUDGET_LINE], "token_recycling": [TREE_LINE],
                 "both": [BUDGET_LINE, TREE_LINE, "tkernels: --enable-mixed-chunk kept for NGRAM"]}




def server_command(model_dir, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", "--dtype", "float32", "--context-length", str(CONTEXT),
            "--max-total-tokens", "2048", "--max-running-requests", "8", "--chunked-prefill-size", str(CHUNK),
            "--skip-server-warmup", "--disable-cuda-graph", "--attention-backend", "tkernels",
            "--random-seed", "0", *extra]


def server_env(**extra: str) -> dict:
    # SGLang's CPU engine; NGRAM launches a Triton kernel unconditionally, so the interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_PLUGINS", "TKERNELS_SGLANG")}
    return dict(env, SGLANG_USE_CPU_ENGINE="1", TRITON_INTERPRET="1", **extra)






def request(port: int, body: dict):
    return urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})


def generate(port: int, input_ids: list[int], max_tokens: int = MAX_TOKENS, **params) -> tuple[int, dict | str]:
    body = {"input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, **params}}
    try:
        with urllib.request.urlopen(request(port, body), timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def output_ids(port: int, input_ids: list[int], max_tokens: int = MAX_TOKENS, **params) -> list[int]:
    status, out = generate(port, input_ids, max_tokens, **params)
    assert status == 200, out
    return out["output_ids"]


def streamed_ids(port: int, input_ids: list[int], max_tokens: int, started) -> list[int]:
    """A streamed greedy request; ``started()`` is called once its first decoded tokens arrive."""
    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}}
    last, signalled = [], False
    with urllib.request.urlopen(request(port, body), timeout=REQUEST_TIMEOUT_S) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            last = json.loads(line[6:])["output_ids"]  # SGLang streams the output so far
            if len(last) >= 2 and not signalled:
                started()
                signalled = True
    if not signalled:
        started()
    return last


def prompts() -> dict[str, list[int]]:
    """Token ids (the tiny model's vocabulary, its special tokens 0-2 left out), fixed by a seed."""
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(3, 512) for _ in range(n)]

    return {"short": [ids(rng.randrange(5, 30)) for _ in range(7)], "long": ids(CHUNK * 2 + 37),
            "near_limit": ids(CONTEXT - MAX_TOKENS - NEAR_LIMIT_GAP)}


@pytest.fixture(scope="module")
def expected():
    """Plain greedy decoding with transformers, float32: one token per full forward, no speculation,
    nothing suppressed (the server requests ignore EOS, so the EOS token may come out and not stop)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tkernels.models import tiny_llama_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir(), dtype=torch.float32).eval()

    def greedy(ids):
        ids = list(ids)
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[-MAX_TOKENS:]

    cases = prompts()
    return {"short": [greedy(p) for p in cases["short"]], "long": greedy(cases["long"]),
            "near_limit": greedy(cases["near_limit"])}


@pytest.fixture(params=list(CONFIGS), scope="module")
def server(request, tmp_path_factory):
    from tkernels.models import tiny_llama_dir

    env_extra, flags = CONFIGS[request.param]
    port = free_port()
    log_path = tmp_path_factory.mktemp(f"sglang-{request.param}") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(server_command(tiny_llama_dir(), port, *flags), env=server_env(**env_extra),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(process, port, log_path, START_TIMEOUT_S)
        yield request.param, port, log_path
    finally:
        stop(process)
        print(log_path.read_text()[-20000:])  # shown by pytest when a test failed


def test_server_serves_the_workload_identically(server, expected):
    name, port, log_path = server
    cases = prompts()
    short = cases["short"]

    # 8 concurrent greedy requests; the long prompt (several chunks) once the others are decoding.
    import threading

    decoding = threading.Event()
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(streamed_ids, port, short[0], MAX_TOKENS, decoding.set)
        others = [pool.submit(output_ids, port, p) for p in short[1:]]
        assert decoding.wait(REQUEST_TIMEOUT_S), "the streamed request never decoded"
        long = pool.submit(output_ids, port, cases["long"])
        outputs = [first.result(), *(f.result() for f in others)]
        long_out = long.result()
    assert outputs == expected["short"], name
    assert long_out == expected["long"], name

    # Near the context limit: prompt + new tokens = CONTEXT - NEAR_LIMIT_GAP.
    assert output_ids(port, cases["near_limit"]) == expected["near_limit"], name

    # Sampling with a seed is served. Its repeatability cannot be checked here: SGLang 0.5.23 reads
    # sampling_seed only under --enable-deterministic-inference, which needs CUDA or XPU.
    sampled = output_ids(port, short[1], temperature=1.0, sampling_seed=1234)
    assert len(sampled) == MAX_TOKENS and all(0 <= t < 512 for t in sampled), name

    # Over the context limit: refused with a 4xx, and the server goes on serving.
    over = cases["near_limit"] + cases["long"][: NEAR_LIMIT_GAP + 1]  # prompt + new tokens = CONTEXT + 1
    status, text = generate(port, over, MAX_TOKENS)
    assert 400 <= status < 500 and "context length" in text, (name, status, text)
    assert output_ids(port, short[2]) == expected["short"][2], name

    log = log_path.read_text()
    assert "Scheduler hit an exception" not in log, log[-5000:]
    for line in FEATURE_LINES[name]:  # the configuration's features are the ones that ran
        assert line in log, (name, line)
