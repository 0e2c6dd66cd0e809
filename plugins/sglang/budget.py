"""SGLang adapter of the decode-maximal token budget (:mod:`tkernels.sched`; the same policy as
:mod:`tkernels.plugins.vllm.scheduler`).

    TKERNELS_SGLANG=budget python -m sglang.launch_server --model-path M --enable-mixed-chunk \\
        --chunked-prefill-size 8192

SGLang builds a fresh ``PrefillAdder`` for every prefill attempt
(``Scheduler._get_new_batch_prefill_raw``) with ``rem_chunk_tokens = chunked_prefill_size -
running decodes`` when ``--enable-mixed-chunk`` mixes the running decodes into the prefill
batch. :class:`DecodeMaximalPrefillAdder` asks :class:`~tkernels.sched.DecodeMaximalPolicy` for
the step's plan (the running decodes' context lengths, the running chunk, then the waiting
prompts, each with the time it has waited for the ageing bound; a mixed step runs each decode as
one plain token, even under speculation) and lowers the adder's chunk and input budgets to the
plan's prefill tokens.
Decodes are never dropped: SGLang runs them in the mixed batch (or alone when no prefill fits).
The largest step is ``--chunked-prefill-size`` (it sizes SGLang's buffers); the TBT SLO comes from
``$TKERNELS_TBT_SLO_MS`` (else the per-GPU fixed budget), the ageing bound from
``$TKERNELS_MAX_WAIT_MS`` (else 500 ms), latency rates from the per-GPU config.

Without mixed chunks a prefill step runs no decode, so no budget can make a step
decode-maximal: the adder refuses to start (RuntimeError naming the flags).
"""

from __future__ import annotations

import functools
import logging
from itertools import islice

from sglang.srt.managers.schedule_policy import PrefillAdder

from tkernels.sched import DecodeMaximalPolicy, ModelShape, Prefill, StepBudget, WaitClock

logger = logging.getLogger("tkernels")


def model_shape(model_config, tp_size: int) -> ModelShape:
    """The per-GPU shard of the served model as the latency model needs it (dense Llama-like;
    MoE and quantized weights are costed as dense in the model dtype)."""
    hf = model_config.hf_text_config
    hidden = model_config.hidden_size
    return ModelShape(
        num_layers=model_config.num_hidden_layers,
        hidden_size=hidden,
        num_q_heads=max(1, model_config.num_attention_heads // tp_size),
        num_kv_heads=max(1, model_config.get_total_num_kv_heads() // tp_size),
        head_dim=model_config.head_dim,
        intermediate_size=max(1, getattr(hf, "intermediate_size", 4 * hidden) // tp_size),
        vocab_size=max(1, model_config.vocab_size // tp_size),
        dtype_bytes=model_config.dtype.itemsize,
    )


def check_mixed_chunk(scheduler) -> None:
    """Decode-maximal batches need chunked prefill with running decodes mixed in."""
    if getattr(scheduler, "chunked_prefill_size", None) is None:
        raise RuntimeError("tkernels decode-maximal budget (TKERNELS_SGLANG=budget) needs chunked prefill: "
                           "set --chunked-prefill-size to a positive value (it is the largest step)")
    if not scheduler.is_mixed_chunk:
        raise RuntimeError("tkernels decode-maximal budget (TKERNELS_SGLANG=budget) needs --enable-mixed-chunk "
                           "(and a speculative algorithm that keeps it: SGLang turns it off for NGRAM)")


def scheduler_policy(scheduler) -> DecodeMaximalPolicy:
    """The scheduler's policy, built on first use (its config checked then)."""
    policy = getattr(scheduler, "tkernels_policy", None)
    if policy is None:
        check_mixed_chunk(scheduler)
        shape = model_shape(scheduler.model_config, scheduler.tp_size)
        policy = DecodeMaximalPolicy(shape, max_tokens=scheduler.chunked_prefill_size)
        scheduler.tkernels_policy = policy
        scheduler.tkernels_wait_clock = WaitClock()
        logger.info("tkernels: decode-maximal chunk budget on (max %d tokens per step)", scheduler.chunked_prefill_size)
    return policy


def waiting_prefills(scheduler, limit: int) -> list[Prefill]:
    """The running chunk, then up to ``limit`` waiting prompts in queue order (policy order),
    with the time each has waited (the scheduler's :class:`~tkernels.sched.WaitClock`)."""
    reqs = ([scheduler.chunked_req] if scheduler.chunked_req is not None else []) + list(
        islice(scheduler.waiting_queue, limit))
    waited = scheduler.tkernels_wait_clock.waited_ms([r.rid for r in reqs])
    return [Prefill(r.prefix_len, max(r.seqlen - r.prefix_len, 0), w) for r, w in zip(reqs, waited)]


def prefill_adder_for(scheduler):
    """What ``Scheduler.get_prefill_adder_class()`` returns under the budget: the adder bound to
    this step's waiting prompts and the scheduler's policy."""
    policy = scheduler_policy(scheduler)
    limit = max(scheduler.max_running_requests - len(scheduler.running_batch.reqs), 0)
    return functools.partial(DecodeMaximalPrefillAdder, policy=policy, prefills=waiting_prefills(scheduler, limit))


class DecodeMaximalPrefillAdder(PrefillAdder):
    """SGLang's ``PrefillAdder`` whose chunk/input budgets are the policy's prefill tokens."""

    def __init__(self, *args, policy: DecodeMaximalPolicy, prefills: list[Prefill], **kwargs):
        super().__init__(*args, **kwargs)
        decodes = self.running_batch.reqs if self.running_batch is not None else []
        self.plan: StepBudget = policy.plan([r.seqlen for r in decodes], 0, prefills)
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens = min(self.rem_chunk_tokens, self.plan.prefill_tokens)
        self.rem_input_tokens = min(self.rem_input_tokens, self.plan.prefill_tokens)
