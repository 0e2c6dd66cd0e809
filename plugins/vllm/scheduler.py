"""vLLM adapter of the decode-maximal token budget (:mod:`tkernels.sched`).

    vllm serve MODEL --scheduler-cls tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler

TBT SLO from ``$TKERNELS_TBT_SLO_MS`` or ``--additional-config '{"tkernels_sched":
{"slo_ms": 50, "margin": 0.1, "tile": 16}}'`` (the policy's arguments of those names, and
``default_budget``: the fixed budget without an SLO); latency rates and the no-SLO budget
otherwise from the per-GPU config. Written for vLLM 0.32–0.33: importing this
module under another version raises RuntimeError (vLLM's scheduler internals move between
releases; :mod:`tkernels.plugins.vllm.compat`). Importing :mod:`tkernels.plugins.vllm` alone
never imports vLLM.

Each step, before vLLM's own ``schedule()`` (which copies ``max_num_scheduled_tokens`` into its
token budget and fills it with running requests in list order, then admits waiting ones):

1. running decodes move ahead of running prefill chunks (stable order), so a chunk admitted
   before a decode can never take the decode's token;
2. the policy plans the step from the running decodes (context lengths, draft tokens), the
   running chunks and the waiting prompts (assumed uncached: prefix-cache hits are only known
   once vLLM admits them);
3. draft tokens beyond the plan's grant are dropped from the last decodes (vLLM would give the
   first decodes all their drafts and the last ones no token at all);
4. ``max_num_scheduled_tokens`` = the plan's budget, never above its configured value (which
   sizes vLLM's buffers).

Moving decodes first also makes FCFS preemption (``running[-1]``) pick a prefilling request first.
"""

from __future__ import annotations

from itertools import chain, islice

from tkernels.plugins.vllm.compat import require_supported_vllm

require_supported_vllm()  # before touching vLLM internals that may have moved

from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402

from tkernels.sched import DecodeMaximalPolicy, ModelShape, Prefill, StepBudget  # noqa: E402

CONFIG_KEY = "tkernels_sched"
OPTIONS = ("slo_ms", "margin", "tile", "default_budget")  # DecodeMaximalPolicy's keyword arguments


def model_shape(vllm_config) -> ModelShape:
    """The per-GPU shard of the served model, as the latency model needs it (dense Llama-like;
    MoE and quantized weights are costed as dense in the model dtype)."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    hidden = model.get_hidden_size()
    return ModelShape(
        num_layers=model.get_num_layers(parallel),
        hidden_size=hidden,
        num_q_heads=model.get_num_attention_heads(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        intermediate_size=max(1, getattr(model.hf_text_config, "intermediate_size", 4 * hidden) // tp),
        vocab_size=max(1, model.get_vocab_size() // tp),
        dtype_bytes=model.dtype.itemsize,
    )


class DecodeMaximalScheduler(AsyncScheduler):
    """vLLM's AsyncScheduler with a per-step token budget from :class:`DecodeMaximalPolicy`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_budget = self.max_num_scheduled_tokens
        options = dict((self.vllm_config.additional_config or {}).get(CONFIG_KEY, {}))
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"additional_config['{CONFIG_KEY}']: unknown keys {sorted(unknown)}; known: {OPTIONS}")
        self.policy = DecodeMaximalPolicy(model_shape(self.vllm_config), max_tokens=self.max_budget, **options)
        self.last_plan: StepBudget | None = None

    def schedule(self, *args, **kwargs):
        decodes = [r for r in self.running if not r.is_prefill_chunk]
        chunks = [r for r in self.running if r.is_prefill_chunk]
        self.running = decodes + chunks
        free_slots = max(self.max_num_running_reqs - len(self.running), 0)
        admissible = islice(chain(self.kv_holding_waiting, self.waiting), free_slots)
        plan = self.policy.plan(
            [r.num_computed_tokens + 1 for r in decodes],
            [len(r.spec_token_ids) for r in decodes],
            [Prefill(r.num_computed_tokens, r.num_tokens - r.num_computed_tokens) for r in chain(chunks, admissible)],
        )
        drafts_left = plan.spec_tokens
        for request in decodes:
            if len(request.spec_token_ids) > drafts_left:
                request.spec_token_ids = request.spec_token_ids[:drafts_left]
            drafts_left -= len(request.spec_token_ids)
        self.max_num_scheduled_tokens = min(plan.tokens, self.max_budget)
        self.last_plan = plan
        return super().schedule(*args, **kwargs)
