"""The real OpenAI server with tree speculation (K = 32) and the scheduler, at the context limit and under a soak.

Two servers on 127.0.0.1 with the tiny random Llama, ``--max-model-len 256``: one with
tkernels' decode-maximal scheduler and Token Recycling trees of up to 32 draft tokens (the
proposer's default drafter; tkernels' attention as its PyTorch reference), one plain vLLM. Every
greedy answer of the first must be the second's, token for token and with the same
``finish_reason``; no request may get a 5xx; the server must be serving at the end.

- At the limit: prompts whose length + ``max_tokens`` land just under, at and over
  ``max_model_len`` (vLLM caps the output: HTTP 200, ``finish_reason: "length"``), a prompt
  one token short of the limit, chat requests without ``max_tokens``, all at once beside
  ordinary requests. Near the limit vLLM stops drafting for the whole batch and schedules zeros
  (``_input_fits_in_drafter``), which crashed the engine before (issue 22).
- Soak: 200 requests of mixed lengths from 8 client threads (bounded in count and time),
  greedy and sampled (seeded and not), streamed and not, some cancelled mid-stream, some near
  the limit, some refused (``max_tokens`` 0, a prompt past the limit, bad JSON: 4xx).
"""

from __future__ import annotations

import http.client
import json
import random
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import free_port, stop, wait_healthy
from test_openai_server import SCHEDULER, post, server_command, server_env, stream_events

pytestmark = pytest.mark.vllm

MODEL_NAME = "smollm2"  # server_command's --served-model-name
LIMIT = 256
K = 32
TREE = {"method": "custom_class", "model": "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer",
        "num_speculative_tokens": K}
START_TIMEOUT_S = 900
SOAK_REQUESTS = 200  # the bound of the soak's load loop (each request has post()'s timeout too)
VOCAB = 512  # the tiny Llama's


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(tree port, plain port, tree log path): both servers started at once, stopped at the end."""
    from tkernels.models import tiny_llama_dir

    model_dir = tiny_llama_dir()
    folder = tmp_path_factory.mktemp("soak")
    common = ("--max-model-len", str(LIMIT), "--max-num-batched-tokens", "128")
    configs = {
        "tree": (("--scheduler-cls", SCHEDULER, "--speculative-config", json.dumps(TREE)),
                 server_env(TKERNELS_TBT_SLO_MS="100")),
        "plain": ((), server_env()),
    }
    started = {}
    try:
        for name, (extra, env) in configs.items():
            port, log_path = free_port(), folder / f"{name}.log"
            with open(log_path, "w") as log:
                process = subprocess.Popen(server_command(model_dir, port, *common, *extra), env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            started[name] = (process, port, log_path)
        for process, port, log_path in started.values():
            wait_healthy(process, port, log_path, START_TIMEOUT_S)
        yield started["tree"][1], started["plain"][1], started["tree"][2]
    finally:
        for process, _, _ in started.values():
            stop(process)
        if "tree" in started:
            print(started["tree"][2].read_text()[-20000:])  # shown by pytest when a test failed


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(length)]


def _request(port: int, body: dict) -> tuple[int, dict | str]:
    """(status, the answer's tokens and finish reason, or the error text). Streamed answers are
    read to the end; chat answers are compared by content."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, text = post(port, path, body)
    if status != 200:
        return status, text
    if body.get("stream"):
        events = stream_events(text)
        errors = [e for e in events if "error" in e]
        if errors:
            return int(errors[0]["error"].get("code") or 500), text
        choices = [c for e in events for c in e.get("choices", [])]
        return status, {"tokens": [t for c in choices for t in (c.get("token_ids") or [])],
                        "finish": next((c["finish_reason"] for c in choices if c.get("finish_reason")), None)}
    choice = json.loads(text)["choices"][0]
    if "message" in choice:
        return status, {"content": choice["message"]["content"], "finish": choice["finish_reason"]}
    return status, {"tokens": choice["token_ids"], "finish": choice["finish_reason"]}


def _completion(prompt: list[int], **params) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "ignore_eos": True, "return_token_ids": True, "temperature": 0.0,
            **params}


def _chat(text: str, **params) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": text}], "ignore_eos": True,
            "temperature": 0.0, **params}


def _cancelled_stream(port: int, body: dict, events: int) -> None:
    """Open a streamed request, read ``events`` lines of it, and hang up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        for _ in range(events):
            if not response.fp.readline():
                break
    finally:
        connection.close()


def _alive_and_correct(tree_port: int, plain_port: int) -> None:
    body = _completion(_prompt(random.Random(7), 20), max_tokens=16)
    with urllib.request.urlopen(f"http://127.0.0.1:{tree_port}/health", timeout=30) as response:
        assert response.status == 200
    assert _request(tree_port, body) == _request(plain_port, body)


def test_requests_at_the_context_limit_answer_as_plain_vllm_does(servers):
    tree_port, plain_port, _ = servers
    rng = random.Random(0)
    bodies = []
    for prompt_len, max_tokens in ((LIMIT - 101, 100), (LIMIT - 100, 100), (LIMIT - 99, 100), (LIMIT - 40, 100),
                                   (LIMIT - 1, 50), (LIMIT - 2, 1), (LIMIT - 70, 2 * K), (LIMIT - 2 * K, 2 * K + 5)):
        bodies.append(_completion(_prompt(rng, prompt_len), max_tokens=max_tokens))
    bodies.append(_completion(_prompt(rng, LIMIT - 60), max_tokens=100, stream=True))
    bodies += [_completion(_prompt(rng, n), max_tokens=24) for n in (5, 40, 90)]  # ordinary requests beside them
    bodies += [_chat("tell me a long story " * 6), _chat("hi", stream=False)]  # no max_tokens: up to the limit
    with ThreadPoolExecutor(len(bodies)) as pool:
        tree = list(pool.map(lambda body: _request(tree_port, body), bodies))
    with ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(lambda body: _request(plain_port, body), bodies))
    for body, got, want in zip(bodies, tree, plain):
        assert want[0] == 200, want
        assert got == want, (len(body.get("prompt", "")), body.get("max_tokens"), got, want)
    assert [answer["finish"] for _, answer in tree[:8]] == ["length"] * 8
    _alive_and_correct(tree_port, plain_port)


def _soak_plan(rng: random.Random) -> list[tuple[str, dict]]:
    """(kind, body) for each soak request: kind says how to send it and what to expect."""
    plan = []
    for _ in range(SOAK_REQUESTS):
        roll = rng.random()
        length = rng.choice([rng.randrange(1, 40), rng.randrange(40, 200), rng.randrange(200, LIMIT - 1)])
        max_tokens = rng.choice([1, 2, 8, 24, 64, LIMIT])  # LIMIT: capped at the room left by vLLM
        body = _completion(_prompt(rng, length), max_tokens=max_tokens, stream=rng.random() < 0.3)
        if roll < 0.55:
            plan.append(("greedy", body))
        elif roll < 0.70:
            seed = {"seed": rng.randrange(100)} if rng.random() < 0.5 else {}
            plan.append(("sampled", dict(body, temperature=0.8, top_p=0.95, **seed)))
        elif roll < 0.82:
            plan.append(("cancel", dict(body, max_tokens=200)))
        elif roll < 0.90:
            near = LIMIT - rng.randrange(1, 3 * K)
            plan.append(("greedy", _completion(_prompt(rng, near), max_tokens=rng.choice([K, 2 * K, LIMIT]))))
        elif roll < 0.93:
            plan.append(("refused", dict(body, max_tokens=0)))
        elif roll < 0.96:
            plan.append(("refused", _completion(_prompt(rng, LIMIT + 10), max_tokens=4)))
        elif roll < 0.98:
            plan.append(("bad_json", body))
        else:
            plan.append(("greedy", _chat("soak " * rng.randrange(1, 60), max_tokens=rng.choice([4, 40]))))
    return plan


def _send(port: int, kind: str, body: dict, rng_seed: int) -> tuple[int, dict | str]:
    if kind == "cancel":
        _cancelled_stream(port, body, events=random.Random(rng_seed).randrange(1, 6))
        return 200, "cancelled"
    if kind == "bad_json":
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            connection.request("POST", "/v1/completions", b'{"model": "smollm2", "prompt": [1, 2,',
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()
    return _request(port, body)


@pytest.mark.slow
def test_soak_of_mixed_requests_no_5xx_greedy_equal_to_plain_and_the_server_alive(servers):
    tree_port, plain_port, log_path = servers
    plan = _soak_plan(random.Random(1))
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda item: _send(tree_port, item[1][0], item[1][1], item[0]), enumerate(plan)))
    print(f"soak: {len(plan)} requests in {time.monotonic() - start:.0f} s")
    sent = [(kind, body, result) for (kind, body), result in zip(plan, results)]
    statuses = [result[0] for _, _, result in sent]
    assert not [s for s in statuses if s >= 500], [r for _, _, r in sent if r[0] >= 500][:3]
    for kind, body, (status, answer) in sent:
        if kind in ("refused", "bad_json"):
            assert 400 <= status < 500, (kind, status, answer)
        else:
            assert status == 200, (kind, body.get("max_tokens"), answer)
    greedy = [(body, answer) for kind, body, (_, answer) in sent if kind == "greedy"]
    with ThreadPoolExecutor(4) as pool:
        plain = list(pool.map(lambda item: _request(plain_port, item[0]), greedy))
    mismatched = [(len(body.get("prompt", "")), body.get("max_tokens"), got, want)
                  for (body, got), (_, want) in zip(greedy, plain) if got != want]
    assert not mismatched, mismatched[:3]
    for kind, body, (_, answer) in sent:  # sampled answers: as long as asked (capped at the limit)
        if kind == "sampled":
            room = LIMIT - len(body["prompt"])
            assert len(answer["tokens"]) == min(body["max_tokens"], room), (body["max_tokens"], room, answer)
    _alive_and_correct(tree_port, plain_port)
    log = log_path.read_text()
    assert "EngineCore encountered" not in log and "RuntimeError: tkernels" not in log, log[-5000:]
