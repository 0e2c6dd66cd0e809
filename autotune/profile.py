"""What ``tkernels autotune`` measures: kernel launch configs and decoder-step latency.

Kernels. Every tunable kernel has a search space and representative cases per shape bucket;
each candidate config is run once and compared with the kernel's PyTorch reference (a config
that fails to compile or gives a wrong answer is recorded as failed, never chosen), then timed.
Tunable kernels: the mixed-batch attention (its tile shapes per query class, split-KV threshold,
warps and stages), tuned coordinate-wise: decode-tile parameters on a decode-only case,
prefill-tile parameters on a prefill-only case, then warps and stages on the decode-maximal
mix, each stage starting from the previous stage's best; tree verification (vocabulary tile and
warps) on docs/design.md's V1 chains at the model's vocabulary size, greedy plus target-only
sampling; KV compaction (column tile, warps) on 64 accepted 5-token paths in the model's KV
rows; the continuous trajectory log-ratio (chunk, tile, warps) on docs/design.md's C1 window, which
does not depend on the language model. The built-in defaults are always a candidate: a tuned config is never slower than
them on the case it was measured on (``measured`` in the bucket says by how much). Attention
candidates that would need more shared memory than the GPU allows a block are skipped before
anything is compiled (:func:`fits_shared_memory`); the compile check compiles every candidate
kept, as the tuning stages launch it (:func:`attention_candidate_launches`).

Decoder step. A real forward step of ``PROFILE_LAYERS`` decoder layers of the model's shape with
random weights (RMSNorm, fused QKV, K/V written into a paged cache, the mixed-batch attention
kernel, output projection, gated MLP; RoPE left out: elementwise, negligible) plus the LM head,
scaled to the model's layer count, over prefill-chunk tokens x decodes x context x tree tokens.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tkernels.attention import mixed_attention, mixed_attention_reference, plan_mixed_attention
from tkernels.attention.batch import random_paged_batch
from tkernels.attention.plan import default_config
from tkernels.attention.plan import search_space as attention_search_space
from tkernels.continuous import acceptance
from tkernels.sched.latency_model import ModelShape, draft_cost, prefill_chunk_cost
from tkernels.spec import kv_compaction, verify
from tkernels.spec.tree import chain

PROFILE_LAYERS = 2
BLOCK_SIZE = 16


def time_us(fn: Callable[[], Any], on_gpu: bool) -> float:
    """Median time of ``fn`` (GPU: ``triton.testing.do_bench`` with CUDA events; CPU dry run:
    one wall-clock call, enough to exercise the flow)."""
    if on_gpu:
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    start = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# Kernel tuning


@dataclass(frozen=True)
class AttentionCase:
    name: str
    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]


def attention_cases(dry_run: bool, quick: bool) -> dict[str, AttentionCase]:
    """Cases per tuning stage (docs/design.md's W3 / W4 / W1 workloads, shrunk for ``--quick``)."""
    if dry_run:
        return {"decode": AttentionCase("decode", (1,) * 3, (40, 17, 33)),
                "prefill": AttentionCase("prefill", (24,), (40,)),
                "mix": AttentionCase("mix", (24, 1, 1), (56, 33, 20))}
    scale = 4 if quick else 1
    return {"decode": AttentionCase("W3", (1,) * (256 // scale), (4096,) * (256 // scale)),
            "prefill": AttentionCase("W4", (1024,), (8192,)),
            "mix": AttentionCase("W1", (512,) + (1,) * (64 // scale), (4096,) + (2048,) * (64 // scale))}


# Each kernel module owns its search space beside its default config.
verify_search_space = verify.search_space
kv_compaction_search_space = kv_compaction.search_space
trajectory_search_space = acceptance.search_space


Runner = Callable[[dict, bool], "float | None"]  # run(config, on_gpu) -> median us, None: fails or wrong


def kernel_jobs(dry_run: bool, quick: bool) -> int:
    """How many measurements :func:`tune_kernels` takes (for the progress bar)."""
    candidates = sum(map(len, attention_search_space(dry_run, quick).values()))
    candidates += sum(len(space(dry_run, quick)) for space in (verify_search_space, kv_compaction_search_space,
                                                              trajectory_search_space))
    return candidates + 2 * 4  # default and tuned timings of each kernel


def tune_kernels(shape: ModelShape, dtype: torch.dtype, device: str, measure, dry_run: bool, quick: bool,
                 into: dict | None = None, shared_limit: int | None = None) -> dict:
    """Config-file bucket per tunable kernel (named as its launcher asks :mod:`tkernels.config`),
    added to ``into`` as each kernel finishes (an interrupted run keeps the finished ones),
    most valuable first. ``shared_limit``: the GPU's shared memory per block (bytes; None: no
    pruning), see :func:`fits_shared_memory`."""
    tuned = {} if into is None else into
    tuned["mixed_attention"] = tune_attention(shape, dtype, device, measure, dry_run, quick, shared_limit)
    tuned["verify"] = tune_verify(shape, dtype, device, measure, dry_run, quick)
    tuned["kv_compaction"] = tune_kv_compaction(shape, dtype, device, measure, dry_run, quick)
    tuned["trajectory_log_ratio"] = tune_trajectory_log_ratio(device, measure, dry_run, quick)
    return tuned


def shared_memory_limit(device: str) -> int | None:
    """Shared memory one block may use on the current GPU (the opt-in maximum, bytes); None
    on the CPU."""
    if device != "cuda":
        return None
    limit = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
    return int(limit) if limit else None


def fits_shared_memory(config: dict, head_dim: int, shared_limit: int | None) -> bool:
    """Whether attention ``config`` (over the defaults) can launch within ``shared_limit`` bytes
    in any batch it will serve: :func:`~tkernels.attention.plan.shared_memory_estimate`
    of a prefill tile beside a full decode tile, checked before anything is compiled."""
    if shared_limit is None:
        return True
    from tkernels.attention.kernels import compile_launch
    from tkernels.attention.plan import DEFAULT_CONFIG

    worst = compile_launch(config, head_dim, torch.bfloat16, (DEFAULT_CONFIG["decode_max_q"] + 1, DEFAULT_CONFIG["decode_max_q"]),
                           candidate=True)
    return worst.shared_bound <= shared_limit


def tune_attention(shape: ModelShape, dtype: torch.dtype, device: str, measure, dry_run: bool, quick: bool,
                   shared_limit: int | None = None) -> dict:
    """Best config for the model's (head_dim, group, block size) bucket, with default vs tuned
    time; candidates that cannot fit ``shared_limit`` are skipped uncompiled."""
    cases = attention_cases(dry_run, quick)
    space = attention_search_space(dry_run, quick)
    best: dict[str, Any] = {}
    for stage in ("decode", "prefill", "mix"):
        run = _attention_runner(cases[stage], shape, dtype, device)
        fitting = [c for c in space[stage] if fits_shared_memory({**best, **c}, shape.head_dim, shared_limit)]
        if len(fitting) < len(space[stage]):
            print(f"mixed_attention: {len(space[stage]) - len(fitting)} {stage} candidates skipped: more shared "
                  f"memory than this GPU's {shared_limit} B", file=sys.stderr)
        best = _search(f"mixed_attention/{cases[stage].name}", fitting, best, run, measure, device)
    key = {"head_dim": shape.head_dim, "group": shape.num_q_heads // shape.num_kv_heads, "block_size": BLOCK_SIZE}
    mix = _attention_runner(cases["mix"], shape, dtype, device)
    return _bucket(f"mixed_attention/{cases['mix'].name}", key, best, mix, measure, device)


def tune_verify(shape: ModelShape, dtype: torch.dtype, device: str, measure, dry_run: bool, quick: bool) -> dict:
    """Best verification launch config for the model's vocabulary (bucket key ``vocab``), with
    default vs tuned time on V1's chains: 64 requests x 4 drafts (4 requests in a dry run)."""
    case = "V1-chain4"
    run = _verify_runner(4 if dry_run else 64, shape.vocab_size, dtype, device)
    best = _search(f"verify/{case}", verify_search_space(dry_run, quick), {}, run, measure, device)
    return _bucket(f"verify/{case}", {"vocab": shape.vocab_size}, best, run, measure, device)


def tune_kv_compaction(shape: ModelShape, dtype: torch.dtype, device: str, measure, dry_run: bool, quick: bool) -> dict:
    """Best compaction config for the model's KV rows (bucket key ``kv_dim``): 64 requests
    (3 in a dry run), each moving a 5-token path out of a 16-node tree, K and V of two layers."""
    case = "paths5"
    run = _kv_compaction_runner(3 if dry_run else 64, 20 if dry_run else 2048, shape, dtype, device)
    best = _search(f"kv_compaction/{case}", kv_compaction_search_space(dry_run, quick), {}, run, measure, device)
    key = {"kv_dim": shape.num_kv_heads * shape.head_dim}
    return _bucket(f"kv_compaction/{case}", key, best, run, measure, device)


def tune_trajectory_log_ratio(device: str, measure, dry_run: bool, quick: bool) -> dict:
    """Best continuous log-ratio config on C1 (64 x 256 tokens, 100 steps x 16 dims, fp32;
    16 x 5 x 4 in a dry run); bucket key ``elements`` = steps x dims."""
    rows, steps, dims = (16, 5, 4) if dry_run else (64 * 256, 100, 16)
    run = _trajectory_runner(rows, steps, dims, device)
    best = _search("trajectory_log_ratio/C1", trajectory_search_space(dry_run, quick), {}, run, measure, device)
    return _bucket("trajectory_log_ratio/C1", {"elements": steps * dims}, best, run, measure, device)


def json_key(config: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(config.items())) or "default"


def _search(name: str, candidates: list[dict], base: dict, run: Runner, measure, device: str) -> dict:
    """``base`` updated with the fastest candidate that runs and is right (``base`` if none)."""
    timed = []
    for candidate in candidates:
        config = {**base, **candidate}
        us = measure.get(f"kernel/{name}/{json_key(config)}", lambda config=config: run(config, device == "cuda"))
        if us is not None:
            timed.append((us, candidate))
    return {**base, **min(timed, key=lambda t: t[0])[1]} if timed else base


def _bucket(name: str, key: dict, best: dict, run: Runner, measure, device: str) -> dict:
    """The config-file bucket: ``best`` unless the built-in defaults are as fast on this case."""
    on_gpu = device == "cuda"
    default_us = measure.get(f"kernel/{name}/default", lambda: run({}, on_gpu))
    tuned_us = measure.get(f"kernel/{name}/tuned/{json_key(best)}", lambda: run(best, on_gpu))
    if tuned_us is None or (default_us is not None and default_us <= tuned_us):
        best, tuned_us = {}, default_us  # the defaults are a candidate too
    return {"key": key, "config": best,
            "measured": {"workload": name.split("/", 1)[1], "default_us": default_us, "tuned_us": tuned_us}}


def _attention_runner(case: AttentionCase, shape: ModelShape, dtype, device) -> Runner:
    batch = random_paged_batch(
        case.q_lens, case.seq_lens, num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim, block_size=BLOCK_SIZE, dtype=dtype, device=device,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    reference = mixed_attention_reference(*batch.inputs()).float()
    tolerance = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4

    def run(config: dict, on_gpu: bool) -> float | None:
        _q, k_cache, _v_cache, block_table, cu_seqlens_q, seq_lens = batch.inputs()
        try:
            plan = plan_mixed_attention(
                cu_seqlens_q, seq_lens, block_table, num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads,
                head_dim=shape.head_dim, num_blocks=k_cache.shape[0], block_size=BLOCK_SIZE, dtype=dtype,
                # Candidates overlay the built-in defaults, never a tuned file already in use.
                config={**default_config(shape.head_dim, dtype), **config},
            )
            out = mixed_attention(*batch.inputs(), plan=plan)
            error = float((out.float() - reference).norm() / reference.norm())
            if not error < tolerance:  # NaN fails too
                return None
            return time_us(lambda: mixed_attention(*batch.inputs(), plan=plan, out=out), on_gpu)
        except Exception:  # a config that does not compile or fit is simply not a candidate
            return None

    return run


def _verify_runner(batch: int, vocab: int, dtype, device) -> Runner:
    """Greedy + target-only sampling verification of ``batch`` 4-draft chains; a config counts
    when greedy equals the reference exactly and sampling agrees with the default config."""
    gen = torch.Generator(device=device).manual_seed(0)
    n = 5
    parents = chain(n).parents.repeat(batch).int().to(device)
    cu = torch.arange(0, n * batch + 1, n, dtype=torch.int32, device=device)
    logits = (torch.randn(n * batch, vocab, generator=gen, device=device) * 2).to(dtype)
    previous = torch.roll(logits.argmax(-1), 1)  # node i's parent is row i - 1 (roots: any token)
    follow = torch.rand(n * batch, generator=gen, device=device) < 0.7
    tokens = torch.where(follow, previous, torch.randint(0, vocab, (n * batch,), generator=gen, device=device))
    temperature = torch.ones(batch, device=device)
    uniforms = verify.draw_uniforms(cu, gen)
    greedy_ref = verify.verify_greedy_reference(logits, tokens, parents, cu)
    sampled_default = verify.verify_sampling(logits, tokens, parents, cu, temperature, uniforms=uniforms,
                                             config=verify.DEFAULT_CONFIG)

    def run(config: dict, on_gpu: bool) -> float | None:
        config = {**verify.DEFAULT_CONFIG, **config}  # candidates overlay the built-in defaults
        try:
            greedy = verify.verify_greedy(logits, tokens, parents, cu, config=config)
            sampled = verify.verify_sampling(logits, tokens, parents, cu, temperature, uniforms=uniforms, config=config)
            same = torch.ones(batch, dtype=torch.bool, device=device)
            for got, want in zip(sampled, sampled_default):  # fp32 sums in another order may flip a borderline draw
                same &= (got == want).view(batch, -1).all(1)
            if not all(torch.equal(a, b) for a, b in zip(greedy, greedy_ref)) or int(same.sum()) < batch - 1:
                return None
            return time_us(lambda: (verify.verify_greedy(logits, tokens, parents, cu, config=config),
                                    verify.verify_sampling(logits, tokens, parents, cu, temperature, uniforms=uniforms,
                                                           config=config)), on_gpu)
        except Exception:  # a config that does not compile or fit is simply not a candidate
            return None

    return run


def _kv_compaction_runner(batch: int, prefix: int, shape: ModelShape, dtype, device) -> Runner:
    """Compaction of every request's accepted path; a config counts when the caches end up
    equal to the reference's."""
    gen = torch.Generator(device=device).manual_seed(0)
    tree, width = 16, 5
    max_blocks = -(-(prefix + tree) // BLOCK_SIZE)
    caches = torch.randn(2 * PROFILE_LAYERS, batch * max_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim,
                         generator=gen, device=device).to(dtype)
    block_table = torch.randperm(batch * max_blocks, generator=gen, device=device).view(batch, max_blocks).int()
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device=device)
    path = torch.rand(batch, tree - 1, generator=gen, device=device).argsort(1)[:, : width - 1].sort(1).values + 1
    nodes = torch.cat([torch.zeros(batch, 1, dtype=path.dtype, device=device), path], 1).int()
    num = torch.full((batch,), width, dtype=torch.int32, device=device)
    expected = caches.clone()
    kv_compaction.compact_kv_reference(expected, block_table, prefix_lens, nodes, num)

    def run(config: dict, on_gpu: bool) -> float | None:
        config = {**kv_compaction.DEFAULT_CONFIG, **config}
        out = caches.clone()
        try:
            kv_compaction.compact_kv(out, block_table, prefix_lens, nodes, num, config=config)
            if not torch.equal(out, expected):
                return None
            # Compacting again moves the same rows (already in place, equal values): same work.
            return time_us(lambda: kv_compaction.compact_kv(out, block_table, prefix_lens, nodes, num, config=config),
                           on_gpu)
        except Exception:  # a config that does not compile or fit is simply not a candidate
            return None

    return run


def _trajectory_runner(rows: int, steps: int, dims: int, device) -> Runner:
    """Log-ratios of random fp32 trajectories; a config counts when close to the reference."""
    gen = torch.Generator(device=device).manual_seed(0)
    x, mu_p, mu_q = (torch.randn(rows, steps, dims, generator=gen, device=device) for _ in range(3))
    sigma = torch.linspace(0.5, 0.02, steps, device=device)
    expected = acceptance.trajectory_log_ratio_reference(x, mu_p, mu_q, sigma)

    def run(config: dict, on_gpu: bool) -> float | None:
        config = {**acceptance.DEFAULT_CONFIG, **config}
        try:
            got = acceptance.trajectory_log_ratio(x, mu_p, mu_q, sigma, config=config)
            if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * steps * dims):
                return None
            return time_us(lambda: acceptance.trajectory_log_ratio(x, mu_p, mu_q, sigma, config=config), on_gpu)
        except Exception:  # a config that does not compile or fit is simply not a candidate
            return None

    return run


# ----------------------------------------------------------------------------------------------
# Decoder-step profile


@dataclass(frozen=True)
class StepPoint:
    """One step's batch: ``decodes`` requests at ``context`` keys (each with ``tree`` draft
    nodes), plus one prefill chunk of ``chunk`` tokens after ``prefix`` cached ones."""

    decodes: int = 0
    context: int = 0
    tree: int = 0
    chunk: int = 0
    prefix: int = 0

    @property
    def id(self) -> str:
        return f"d{self.decodes}@{self.context}+t{self.tree}/c{self.chunk}@{self.prefix}"

    @property
    def tokens(self) -> int:
        return self.decodes * (1 + self.tree) + self.chunk

    def cost(self) -> tuple[int, int, int]:
        """(tokens, kv_tokens, attn_pairs) as the latency model counts them."""
        kv = pairs = self.decodes * self.context
        extra_kv, extra_pairs = draft_cost(self.context, self.tree)
        kv, pairs = kv + self.decodes * extra_kv, pairs + self.decodes * extra_pairs
        if self.chunk:
            chunk_kv, chunk_pairs = prefill_chunk_cost(self.prefix, self.chunk)
            kv, pairs = kv + chunk_kv, pairs + chunk_pairs
        return self.tokens, kv, pairs


def step_points(dry_run: bool, quick: bool) -> list[StepPoint]:
    if dry_run:
        return [StepPoint(decodes=2, context=24), StepPoint(chunk=16), StepPoint(decodes=1, context=40, tree=3),
                StepPoint(decodes=2, context=24, chunk=16, prefix=16)]
    batches = (1, 32, 128) if quick else (1, 8, 32, 64, 128, 256)
    contexts = (2048,) if quick else (1024, 4096)
    points = [StepPoint(decodes=b, context=c) for b in batches for c in contexts]
    for chunk in ((512, 2048) if quick else (128, 512, 1024, 2048)):
        points += [StepPoint(chunk=chunk), StepPoint(chunk=chunk, prefix=4096),
                   StepPoint(decodes=64, context=2048, chunk=chunk)]
    for b in ((1, 32) if quick else (1, 8, 32)):
        points += [StepPoint(decodes=b, context=2048, tree=n) for n in ((16, 64) if quick else (4, 16, 64))]
    return points


class RandomDecoder:
    """``PROFILE_LAYERS`` decoder layers + LM head of ``shape`` with random weights."""

    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: str):
        gen = torch.Generator(device=device).manual_seed(0)
        h, d = shape.hidden_size, shape.head_dim

        def weight(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=gen, device=device) / math.sqrt(rows)).to(dtype)

        self.shape = shape
        self.layers = [
            {"qkv": weight(h, (shape.num_q_heads + 2 * shape.num_kv_heads) * d),
             "o": weight(shape.num_q_heads * d, h),
             "gate_up": weight(h, 2 * shape.intermediate_size),
             "down": weight(shape.intermediate_size, h)}
            for _ in range(PROFILE_LAYERS)
        ]
        self.lm_head = weight(h, shape.vocab_size)

    def step(self, x: torch.Tensor, caches, slots: torch.Tensor, attn_args: dict) -> torch.Tensor:
        s = self.shape
        q_size, kv_size = s.num_q_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for layer, (k_cache, v_cache) in zip(self.layers, caches):
            qkv = _rms_norm(x) @ layer["qkv"]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            k_cache.view(-1, s.num_kv_heads, s.head_dim).index_copy_(0, slots, k.view(-1, s.num_kv_heads, s.head_dim))
            v_cache.view(-1, s.num_kv_heads, s.head_dim).index_copy_(0, slots, v.view(-1, s.num_kv_heads, s.head_dim))
            attn = mixed_attention(q.reshape(-1, s.num_q_heads, s.head_dim), k_cache, v_cache, **attn_args)
            x = x + attn.view(-1, q_size) @ layer["o"]
            gate, up = (_rms_norm(x) @ layer["gate_up"]).chunk(2, dim=-1)
            x = x + (torch.nn.functional.silu(gate) * up) @ layer["down"]
        return _rms_norm(x) @ self.lm_head


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def profile_step(decoder: RandomDecoder, point: StepPoint, dtype, device: str) -> float:
    """Measured time of one full step at ``point``, scaled from PROFILE_LAYERS to all layers."""
    s = decoder.shape
    q_lens = [1 + point.tree] * point.decodes + ([point.chunk] if point.chunk else [])
    seq_lens = [point.context + point.tree] * point.decodes + ([point.prefix + point.chunk] if point.chunk else [])
    trees = [point.tree > 0] * point.decodes + ([False] if point.chunk else [])
    batch = random_paged_batch(q_lens, seq_lens, num_q_heads=s.num_q_heads, num_kv_heads=s.num_kv_heads,
                               head_dim=s.head_dim, block_size=BLOCK_SIZE, dtype=dtype, device=device,
                               generator=torch.Generator(device=device).manual_seed(1), trees=trees)
    caches = [(batch.k_cache, batch.v_cache)] + [(batch.k_cache.clone(), batch.v_cache.clone())
                                                 for _ in range(PROFILE_LAYERS - 1)]
    slots = torch.cat(list(_new_token_slots(batch.block_table, q_lens, seq_lens))).to(device)
    plan = plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, num_q_heads=s.num_q_heads,
                                num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, num_blocks=batch.k_cache.shape[0],
                                block_size=BLOCK_SIZE, dtype=dtype, **batch.tree_kwargs())
    attn_args = dict(block_table=batch.block_table, cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens,
                     plan=plan, **batch.tree_kwargs())
    x = torch.randn(point.tokens, s.hidden_size, device=device).to(dtype)
    measured = time_us(lambda: decoder.step(x, caches, slots, attn_args), device == "cuda")
    # The LM head runs once per step, the layers num_layers times: split the measurement.
    head_us = time_us(lambda: _rms_norm(x) @ decoder.lm_head, device == "cuda")
    return (measured - head_us) * s.num_layers / PROFILE_LAYERS + head_us


def _new_token_slots(block_table, q_lens, seq_lens) -> Iterator[torch.Tensor]:
    table = block_table.cpu().long()
    for r, (q, n) in enumerate(zip(q_lens, seq_lens)):
        pos = torch.arange(n - q, n)
        yield table[r, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
