"""Token Recycling tree speculation inside vLLM: the patches where vLLM has no hook.

vLLM removed its tree speculation in May 2026. :class:`~tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer`
puts it back: each row's draft is a tree of ``num_speculative_tokens`` nodes in BFS order (the
root, the row's last committed token, excluded), handed to vLLM as the row's ordinary draft
list. vLLM's scheduler therefore allocates ``1 + n`` slots exactly as for a chain, and may cut
the list (a BFS prefix of a tree is a tree). The proposer's constructor calls :func:`install`,
which checks the configuration and patches vLLM's model runner; nothing is patched otherwise.
Each patch wraps one method (the CPU runner inherits them), acts only when the runner's drafter
is the tree proposer, and checks the method's signature first: a vLLM whose method moved or
changed gets a clear error, never a silent wrong patch.

Patched vLLM symbols, and why:

1. ``GPUModelRunner._prepare_inputs`` (tree positions). vLLM computes the positions of a row's
   new tokens as ``num_computed + i`` and, from them, the slot mapping. The slot mapping stays
   linear (node ``i``'s K/V goes to position ``num_computed + i``'s slot); after the call the
   RoPE positions of tree nodes are overwritten with ``num_computed + depth(i)``. Here the step's
   trees are also collected (:class:`TreeStep`) from the proposer's record of each request's
   tree and the draft the scheduler actually scheduled.
2. Tree mask: no vLLM symbol. Our attention backend's metadata builder
   (:mod:`tkernels.plugins.vllm.attention`) reads :func:`attention_trees` and passes the tree
   rows' parents to ``mixed_attention``, which masks each node to its ancestors.
3. ``GPUModelRunner._sample`` (verification). In place of vLLM's rejection sampler (and of its
   sampler in steps without any draft, so that one rule draws every token), the step's
   logits (row ``j`` of a request = tree node ``j``) go to :func:`tkernels.spec.verify_greedy`
   (all requests greedy) or :func:`tkernels.spec.verify_sampling` (exact sampling with each
   request's temperature, top-k and top-p, deterministic drafts). Unseeded requests draw from
   torch's default generator, as vLLM's sampler does; a seeded request's node at depth ``d``
   draws the token at sequence index ``root + d + 1`` with :func:`tkernels.spec.keyed_uniforms`
   of (seed, index), so its output depends on its seed and prompt alone, never on what was
   drafted, the drafter's state, the draft size or the batch (vLLM's per-request generators
   go unused and are dropped). The accepted path tokens + bonus are returned in vLLM's
   ``SamplerOutput`` layout (padded with vLLM's placeholder id), so vLLM's bookkeeping,
   ``num_computed_tokens`` rollback and spec-decode metrics (accepted = generated - 1) work
   unchanged.
4. Same wrapper, right after verification (KV compaction): :func:`tkernels.spec.compact_kv`
   moves the accepted path's K/V from position ``num_computed + node`` to ``num_computed +
   depth`` in every layer's cache, before the next step attends to it.
5. ``SamplingParams._validate_spec_decode`` (admission): with the tree proposer configured,
   only requests whose distribution tree verification reproduces exactly are admitted
   (temperature, top-k, top-p; no penalties, bad words, allowed tokens, min_tokens, logprobs or
   structured output; vLLM itself refuses min_p and logit bias with speculation); others are
   refused when they are submitted with :class:`UnsupportedRequestError`, a vLLM
   request-validation error, so vLLM's OpenAI server answers HTTP 400 with the message (in a
   stream: an error event with code 400). Requests are
   validated in the front-end process, so the plugin's ``register()`` installs this one in
   every process (only warning if it cannot: servers without tree speculation keep working);
   it does nothing unless the tree proposer is configured, whose :func:`install` raises if the
   patch could not be made.
6. ``Scheduler.update_from_output`` (per-request failure): when verification refuses a
   request's logits (NaN, +inf, no finite logit: ``NonFiniteLogitsError`` names the requests),
   the rest of the batch is verified without it and its row carries :data:`FAILED_TOKEN`; in
   the engine process this patch finishes that request with ``FINISHED_ERROR`` through the set
   vLLM uses for its own per-request errors (the client gets an error, HTTP 500 in the OpenAI
   server) and the server serves on. Installed like patch 5.
7. ``GPUModelRunner._model_forward`` (prompt top-k, only with the proposer's ``prompt_topk``
   option): after the forward, the hidden states of the step's prompt tokens (recorded by patch
   1) go through the LM head in chunks and their top-k is recycled
   (:meth:`~tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer.recycle_prompt`); vLLM
   itself computes logits at each prompt's last position only. Without the option it passes
   the output through untouched.

Supported: greedy and temperature/top-k/top-p sampled requests; one KV-cache group; decoder
models without M-RoPE; tkernels' attention backend (``--attention-backend CUSTOM``; on CPU the
test backend, ``TKERNELS_VLLM_CPU_TEST_BACKEND``); no async scheduling, no pipeline
parallelism. Anything else is refused at start-up (or, for requests, at submission). With
``TKERNELS_VLLM_CPU_TEST_BACKEND=reference`` verification and compaction run their torch
references, as attention does.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.exceptions import VLLMValidationError

from tkernels.spec import (
    MAX_TREE_NODES,
    compact_kv,
    compact_kv_reference,
    depths,
    draw_uniforms,
    keyed_uniforms,
    verify_greedy,
    verify_greedy_reference,
    verify_sampling,
    verify_sampling_reference,
)

TREE_PROPOSER = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"
logger = logging.getLogger("vllm.tkernels")  # vLLM's handlers and format, with the process name
# A request whose step failed in the worker (non-finite logits) gets this in place of its tokens
# in vLLM's SamplerOutput: negative, so never a token id, and not vLLM's placeholder (-1), so
# vLLM's output parsing keeps it. Patch 6 turns it into vLLM's per-request error.
FAILED_TOKEN = -2

# Parameters of every patched method, as in the vLLM versions of compat.SUPPORTED_VLLM.
_PATCHED_SIGNATURES = {
    "_prepare_inputs": ("self", "scheduler_output", "num_scheduled_tokens"),
    "_sample": ("self", "logits", "spec_decode_metadata"),
    "_model_forward": ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "model_kwargs"),
}
_VALIDATE_SIGNATURE = ("self", "speculative_config")
_UPDATE_SIGNATURE = ("self", "scheduler_output", "model_runner_output")


def is_tree_config(speculative_config) -> bool:
    return (speculative_config is not None and getattr(speculative_config, "method", None) == "custom_class"
            and getattr(speculative_config, "model", None) == TREE_PROPOSER)


def _cpu_reference_mode() -> bool:
    from tkernels.plugins.vllm.compat import cpu_test_mode

    return cpu_test_mode() == "reference"


# --- start-up checks ----------------------------------------------------------------------------


def check_config(vllm_config) -> None:
    """Raise a clear error for a configuration tree speculation does not support."""
    problems = []
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        problems.append("async scheduling (pass async_scheduling=False / --no-async-scheduling)")
    if getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) > 1:
        problems.append("pipeline parallelism")
    if getattr(vllm_config.model_config, "uses_mrope", False):
        problems.append("M-RoPE models")
    if vllm_config.speculative_config.num_speculative_tokens + 1 > MAX_TREE_NODES:
        problems.append(f"num_speculative_tokens > {MAX_TREE_NODES - 1} "
                        f"(tree attention holds at most {MAX_TREE_NODES} nodes with the root)")
    if problems:
        raise ValueError(f"tkernels tree speculation does not support {', '.join(problems)}")


def check_attention_backend(vllm_config) -> None:
    """Every attention layer must run tkernels' backend: only it applies the tree mask."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    # tkernels' backend marks its layers (attention.py imports this module, not the other way)
    others = sorted({type(layer.impl).__name__ for layer in get_layers_from_vllm_config(vllm_config, Attention).values()
                     if not getattr(layer.impl, "applies_tree_mask", False)})
    if others:
        raise ValueError(
            f"tkernels tree speculation needs tkernels' attention backend for the tree mask, but layers use {others}: "
            "pass --attention-backend CUSTOM (on vLLM-CPU, which ignores it, set TKERNELS_VLLM_CPU_TEST_BACKEND=1 "
            "with TRITON_INTERPRET=1, or TKERNELS_VLLM_CPU_TEST_BACKEND=reference)"
        )


def _checked_method(owner, name: str, expected: tuple[str, ...]):
    from tkernels.plugins.vllm.compat import require_supported_vllm

    version = require_supported_vllm()
    method = getattr(owner, name, None)
    params = tuple(inspect.signature(method).parameters) if callable(method) else None
    if params != expected:
        raise RuntimeError(
            f"tkernels tree speculation patches {owner.__name__}.{name}{expected} but vLLM {version} has "
            f"{'no such method' if params is None else params}: this vLLM is not supported for tree speculation"
        )
    return method


def _already_patched(owner, name: str) -> bool:
    return getattr(getattr(owner, name), "_tkernels_tree", False)


# --- the per-step tree state -------------------------------------------------------------------


@dataclass
class Proposal:
    tokens: list[int]  # the row's draft list: tree nodes 1..n in BFS order
    parents: torch.Tensor  # int32 [n + 1], root included (local indices, BFS)


@dataclass
class TreeStep:
    """This step's trees, row by row of the persistent batch (rows without a draft: 1-node trees)."""

    req_ids: list[str]
    drafts: list[list[int]]  # the draft tokens each row was verified with, as scheduled
    prefix: np.ndarray  # num_computed_tokens per row: node 0's position
    num_nodes: np.ndarray  # 1 + len(drafts[i])
    parents: torch.Tensor  # int32 [sum(num_nodes)], the verification trees
    cu_nodes: torch.Tensor  # int32 [num_reqs + 1]
    seeds: list[int | None] | None = None  # each row's sampling seed (None: unseeded)
    root_position: np.ndarray | None = None  # index in its sequence of each row's node 0 (logits row)

    def seeded_uniforms(self, uniforms: torch.Tensor) -> torch.Tensor:
        """``uniforms`` with the seeded rows' nodes drawn from :func:`keyed_uniforms`: node ``i`` of
        row ``r`` samples the token at index ``root_position[r] + depth(i) + 1``, so a seeded
        request's tokens depend on its seed and its sequence alone (not on drafts or batch)."""
        rows = [r for r, seed in enumerate(self.seeds or ()) if seed is not None]
        if not rows:
            return uniforms
        cu = self.cu_nodes.tolist()
        index = torch.cat([torch.arange(cu[r], cu[r + 1]) for r in rows])
        root = torch.cat([torch.full((cu[r + 1] - cu[r],), int(self.root_position[r]), dtype=torch.int64) for r in rows])
        seeds = [self.seeds[r] for r in rows for _ in range(cu[r], cu[r + 1])]
        node_depth = torch.cat([depths(self.parents[cu[r] : cu[r + 1]]).long() for r in rows])
        device = uniforms.device
        uniforms[index.to(device)] = keyed_uniforms(seeds, (root + node_depth + 1).to(device))
        return uniforms
    # with the proposer's prompt_topk: the step's prompt tokens (indices into its tokens, their ids)
    prompt_rows: torch.Tensor | None = None
    prompt_tokens: torch.Tensor | None = None


_ATTENTION_TREES: tuple[torch.Tensor, torch.Tensor] | None = None  # (tree_parents [T], is_tree [B]) of this step


def attention_trees() -> tuple[torch.Tensor, torch.Tensor] | None:
    """The running step's ``(tree_parents int32 [num_tokens], is_tree bool [num_reqs])``, or None
    when no row has a tree (one model runner per vLLM worker process)."""
    return _ATTENTION_TREES


class TreeBatch:
    """What the tree proposer and the runner patches share: the proposer's trees per request
    (``proposed``), and the step being run (``step``)."""

    def __init__(self) -> None:
        self.proposed: dict[str, Proposal] = {}
        self.step: TreeStep | None = None
        self._kv_planes: list[torch.Tensor] | None = None

    def propose(self, req_id: str, tokens: list[int], parents: torch.Tensor | None) -> None:
        """Record the tree a request was proposed (no draft: forget any older one)."""
        if tokens:
            self.proposed[req_id] = Proposal(tokens, parents)
        else:
            self.proposed.pop(req_id, None)

    # patch 1 ------------------------------------------------------------------------------------
    def begin_step(self, runner, scheduler_output, num_scheduled_tokens: np.ndarray) -> None:
        """Collect the step's trees and overwrite the tree nodes' RoPE positions."""
        global _ATTENTION_TREES
        for req_id in scheduler_output.finished_req_ids:
            self.proposed.pop(req_id, None)
        num_reqs = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        prefix = runner.input_batch.num_computed_tokens_cpu[:num_reqs].copy()
        starts = np.cumsum(num_scheduled_tokens) - num_scheduled_tokens
        scheduled = scheduler_output.scheduled_spec_decode_tokens
        drafts, trees = [], []
        tree_parents = torch.full((int(num_scheduled_tokens.sum()),), -1, dtype=torch.int32)
        is_tree = torch.zeros(num_reqs, dtype=torch.bool)
        token_index, token_position = [], []
        for i, req_id in enumerate(req_ids):
            draft = list(scheduled.get(req_id, ()))
            proposal = self.proposed.pop(req_id, None)
            if not draft:
                drafts.append([])
                trees.append(torch.tensor([-1], dtype=torch.int32))
                continue
            n = len(draft)
            if proposal is None or proposal.tokens[:n] != draft or int(num_scheduled_tokens[i]) != n + 1:
                raise RuntimeError(
                    f"tkernels tree speculation: request {req_id} was scheduled the draft {draft} with "
                    f"{int(num_scheduled_tokens[i])} tokens, which is not (a BFS prefix of) the tree its proposer made"
                )
            parents = proposal.parents[: n + 1]
            drafts.append(draft)
            trees.append(parents)
            start = int(starts[i])
            tree_parents[start : start + n + 1] = parents
            is_tree[i] = True
            token_index.append(torch.arange(start + 1, start + n + 1))
            token_position.append(int(prefix[i]) + depths(parents)[1:].long())
        num_nodes = np.array([len(d) + 1 for d in drafts], dtype=np.int64)
        self.step = TreeStep(
            req_ids=req_ids, drafts=drafts, prefix=prefix, num_nodes=num_nodes, parents=torch.cat(trees),
            cu_nodes=torch.from_numpy(np.concatenate([[0], np.cumsum(num_nodes)])).int(),
            seeds=[_seed(runner, req_id) for req_id in req_ids],
            root_position=prefix + np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64) - num_nodes,
        )
        # Seeded rows draw from keyed_uniforms, never from vLLM's per-request generators. Dropping
        # them also keeps vLLM-CPU from rewinding a CPU generator after a partial prefill chunk
        # (``set_offset``, which CPU generators lack: a crash with seeded chunked prompts).
        generators = getattr(runner.input_batch, "generators", None)
        if generators:
            generators.clear()
        if getattr(getattr(runner, "drafter", None), "prompt_topk", False):
            self._prompt_positions(runner, num_scheduled_tokens, starts, prefix)
        if not token_index:
            _ATTENTION_TREES = None
            return
        device = runner.positions.device
        runner.positions[torch.cat(token_index).to(device)] = torch.cat(token_position).to(device, runner.positions.dtype)
        _ATTENTION_TREES = (tree_parents.to(device), is_tree.to(device))

    def _prompt_positions(self, runner, num_scheduled_tokens: np.ndarray, starts: np.ndarray, prefix: np.ndarray) -> None:
        """Record which of the step's tokens are prompt tokens (prefill chunks), for prompt_topk."""
        batch = runner.input_batch
        rows, tokens = [], []
        for i in range(len(prefix)):
            m = min(int(num_scheduled_tokens[i]), int(batch.num_prompt_tokens[i]) - int(prefix[i]))
            if m > 0:
                rows.append(torch.arange(int(starts[i]), int(starts[i]) + m))
                tokens.append(torch.from_numpy(batch.token_ids_cpu[i, prefix[i]:prefix[i] + m].astype(np.int64)))
        if rows:
            self.step.prompt_rows, self.step.prompt_tokens = torch.cat(rows), torch.cat(tokens)

    # patches 3 and 4 ----------------------------------------------------------------------------
    def verify(self, runner, logits: torch.Tensor, spec_decode_metadata):
        """Tree verification + KV compaction; vLLM's ``SamplerOutput`` for the step. Steps without
        any draft (``spec_decode_metadata`` None: one logits row per request) come here too, so
        every token of a seeded request is drawn by the same keyed rule."""
        global _ATTENTION_TREES
        from vllm.v1.outputs import SamplerOutput
        from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

        _ATTENTION_TREES = None
        step = self.step
        num_reqs = 0 if step is None else len(step.req_ids)
        drafts = [0] * num_reqs if spec_decode_metadata is None else list(spec_decode_metadata.num_draft_tokens)
        if step is None or step.num_nodes.tolist() != [d + 1 for d in drafts] or logits.shape[0] != sum(drafts) + num_reqs:
            raise RuntimeError("tkernels tree speculation: the step's logits rows do not match the trees of its rows")
        device = logits.device
        if spec_decode_metadata is None:  # 1-node trees: node 0's token is never compared
            node_tokens = torch.zeros(num_reqs, dtype=torch.int64, device=device)
        else:
            node_tokens = runner.input_ids.gpu[spec_decode_metadata.logits_indices].long()
        parents, cu_nodes = step.parents.to(device), step.cu_nodes.to(device)
        reference = _cpu_reference_mode()
        sampling = runner.input_batch.sampling_metadata
        # unseeded rows: torch's default generator, as vLLM's sampler; seeded rows: keyed by (seed, position)
        uniforms = None if sampling.all_greedy else step.seeded_uniforms(draw_uniforms(cu_nodes))

        def run(logits):
            if sampling.all_greedy:
                verify = verify_greedy_reference if reference else verify_greedy
                return verify(logits, node_tokens, parents, cu_nodes)
            # greedy rows have temperature 0, which verify_sampling treats as greedy
            verify = verify_sampling_reference if reference else verify_sampling
            return verify(logits, node_tokens, parents, cu_nodes, sampling.temperature, sampling.top_k, sampling.top_p,
                          uniforms=uniforms)

        failed: list[int] = []
        try:
            tokens, nodes, num = run(logits)
        except ValueError as err:
            # Verification refuses unusable logits (NaN, +inf, no finite logit) naming the
            # requests (tkernels.spec.NonFiniteLogitsError.requests): those requests fail alone
            # (patch 6), the rest of the batch is verified without them.
            failed = sorted(getattr(err, "requests", None) or ())
            if not failed:
                raise
            logger.error("tkernels tree speculation: requests %s fail: %s", [step.req_ids[r] for r in failed], err)
            cu = step.cu_nodes.tolist()
            rows = torch.cat([torch.arange(cu[r], cu[r + 1]) for r in failed]).to(device)
            logits = logits.clone()
            logits[rows] = 0.0  # any finite scores: their tokens are replaced below
            tokens, nodes, num = run(logits)
            num[failed] = 1  # nothing accepted, nothing compacted
            nodes[failed, 1:] = -1
        self._compact(runner, step, nodes, num, reference)
        out = torch.full((num_reqs, max(drafts, default=0) + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
        out[:, : tokens.shape[1]] = torch.where(tokens >= 0, tokens, PLACEHOLDER_TOKEN_ID)
        if failed:
            out[failed] = PLACEHOLDER_TOKEN_ID
            out[failed, 0] = FAILED_TOKEN
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    def _compact(self, runner, step: TreeStep, nodes: torch.Tensor, num: torch.Tensor, reference: bool) -> None:
        rows = np.flatnonzero(step.num_nodes > 1)
        if not rows.size:
            return
        device = nodes.device
        index = torch.from_numpy(rows).to(device)
        block_table = runner.input_batch.block_table[0].get_device_tensor(len(step.req_ids))[index].contiguous()
        prefix = torch.from_numpy(step.prefix[rows]).to(device, torch.int32)
        compact = compact_kv_reference if reference else compact_kv
        compact(self.kv_planes(runner), block_table, prefix, nodes[index].contiguous(), num[index].contiguous())

    def kv_planes(self, runner) -> list[torch.Tensor]:
        """Every layer's K and V as ``[kv_heads, num_blocks, block_size, 1, head_dim]`` views, the
        leading-plane layout compact_kv takes whatever vLLM's physical layout; a cache shared by
        several layers (KV sharing) is listed once, since compaction is not idempotent."""
        if self._kv_planes is None:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention import Attention

            if len(runner.kv_cache_config.kv_cache_groups) != 1:
                raise RuntimeError("tkernels tree speculation supports models with one KV-cache group only")
            planes, seen = [], set()
            for layer in get_layers_from_vllm_config(runner.vllm_config, Attention).values():
                if layer.kv_cache.data_ptr() in seen:
                    continue
                seen.add(layer.kv_cache.data_ptr())
                planes += [c.permute(2, 0, 1, 3).unsqueeze(3) for c in layer.impl._kv_caches(layer.kv_cache)]
            self._kv_planes = planes
        return self._kv_planes


# --- installation ------------------------------------------------------------------------------


def _seed(runner, req_id: str) -> int | None:
    """The request's sampling seed (None: unseeded, or greedy, where no randomness is drawn)."""
    state = runner.requests.get(req_id) if hasattr(runner, "requests") else None
    params = getattr(state, "sampling_params", None)
    if params is None or params.seed is None or params.temperature <= 0:
        return None
    return int(params.seed)


def _tree_batch(runner) -> TreeBatch | None:
    batch = getattr(getattr(runner, "drafter", None), "tree_batch", None)
    return batch if isinstance(batch, TreeBatch) else None


def install(vllm_config) -> None:
    """Check the configuration and patch vLLM's model runner (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_config(vllm_config)
    install_request_validation()  # done by register() in every process; here it fails loudly if it could not be
    install_failed_request_handling()  # likewise (it acts in the engine process, where the scheduler runs)
    methods = {name: _checked_method(GPUModelRunner, name, sig) for name, sig in _PATCHED_SIGNATURES.items()}
    if _already_patched(GPUModelRunner, "_sample"):
        return
    prepare_inputs, sample, model_forward = methods["_prepare_inputs"], methods["_sample"], methods["_model_forward"]

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        batch = _tree_batch(self)
        if batch is not None:
            batch.begin_step(self, scheduler_output, num_scheduled_tokens)
        return result

    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata):
        batch = _tree_batch(self)
        if batch is None or logits is None:
            return sample(self, logits, spec_decode_metadata)
        return batch.verify(self, logits, spec_decode_metadata)

    @functools.wraps(model_forward)
    def _model_forward(self, *args, **kwargs):
        start = time.perf_counter()
        output = model_forward(self, *args, **kwargs)
        batch = _tree_batch(self)
        if batch is not None and self.drafter.prompt_topk and isinstance(output, torch.Tensor):
            if output.is_cuda:
                torch.cuda.synchronize(output.device)
            self.drafter.recycle_prompt(output, time.perf_counter() - start)
        return output

    for name, wrapper in (("_prepare_inputs", _prepare_inputs), ("_sample", _sample), ("_model_forward", _model_forward)):
        wrapper._tkernels_tree = True
        setattr(GPUModelRunner, name, wrapper)


def unsupported_request_params(params) -> list[str]:
    """What in these SamplingParams tree verification cannot reproduce ([] if nothing)."""
    checks = (
        ("presence/frequency/repetition penalties",
         params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1),
        ("bad_words", bool(params.bad_words)),
        ("allowed_token_ids", params.allowed_token_ids is not None),
        ("min_tokens", params.min_tokens > 0),
        ("logprobs", params.logprobs is not None or params.prompt_logprobs is not None),
        ("structured outputs (response_format, guided decoding)", params.structured_outputs is not None),
    )
    return [name for name, asked in checks if asked]


class UnsupportedRequestError(VLLMValidationError, ValueError):
    """A request tree verification cannot reproduce exactly. vLLM's own request-validation
    error, so its OpenAI server answers HTTP 400 with this message (any other exception raised
    while a request is admitted becomes an HTTP 500 with an empty message); a ValueError for
    offline callers."""


def install_failed_request_handling() -> None:
    """Patch 6: ``Scheduler.update_from_output`` finishes a request whose step failed in the
    worker (its tokens are ``[FAILED_TOKEN]``) with ``FINISHED_ERROR``, through the set vLLM uses
    for its own per-request errors (grammar compilation): the client gets an error for that
    request (HTTP 500 in vLLM's server) and the server serves on. Idempotent; inert unless the
    tree proposer is configured."""
    from vllm.v1.core.sched.scheduler import Scheduler

    update = _checked_method(Scheduler, "update_from_output", _UPDATE_SIGNATURE)
    if _already_patched(Scheduler, "update_from_output"):
        return

    @functools.wraps(update)
    def update_from_output(self, scheduler_output, model_runner_output):
        sampled = model_runner_output.sampled_token_ids
        if sampled and is_tree_config(self.vllm_config.speculative_config) and any(
            tokens[:1] == [FAILED_TOKEN] for tokens in sampled
        ):
            errors = getattr(self, "grammar_compile_error_reqs", None)
            if not isinstance(errors, set):
                raise RuntimeError("tkernels tree speculation: this vLLM's scheduler has no per-request error set "
                                   "(grammar_compile_error_reqs); a failed request cannot be finished alone")
            for req_id, index in model_runner_output.req_id_to_index.items():
                if index < len(sampled) and sampled[index][:1] == [FAILED_TOKEN]:
                    sampled[index] = []  # no token: as a partial prefill's row, no draft rollback
                    errors.add(req_id)  # finished with FINISHED_ERROR at the end of this update
        return update(self, scheduler_output, model_runner_output)

    update_from_output._tkernels_tree = True
    Scheduler.update_from_output = update_from_output


def install_request_validation() -> None:
    """Patch 5: refuse requests tree verification would not reproduce exactly (idempotent)."""
    from vllm.sampling_params import SamplingParams

    validate = _checked_method(SamplingParams, "_validate_spec_decode", _VALIDATE_SIGNATURE)
    if _already_patched(SamplingParams, "_validate_spec_decode"):
        return

    @functools.wraps(validate)
    def _validate_spec_decode(self, speculative_config):
        validate(self, speculative_config)
        if is_tree_config(speculative_config):
            unsupported = unsupported_request_params(self)
            if unsupported:
                raise UnsupportedRequestError(
                    f"tkernels tree speculation verifies greedy or temperature/top-k/top-p sampling only; "
                    f"this request asks for {', '.join(unsupported)} (serve it without tree speculation)"
                )

    _validate_spec_decode._tkernels_tree = True
    SamplingParams._validate_spec_decode = _validate_spec_decode
