"""vLLM adapter of the decode-maximal token budget (:mod:`tkernels.sched`).

    vllm serve MODEL --scheduler-cls tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler

TBT SLO from ``$TKERNELS_TBT_SLO_MS`` or ``--additional-config '{"tkernels_sched":
{"slo_ms": 50, "margin": 0.1, "tile": 16}}'`` (the policy's arguments of those names,
``default_budget``: the fixed budget without an SLO, and ``max_wait_ms``: the ageing bound after
which a waiting prompt gets at least one tile per step, also ``$TKERNELS_MAX_WAIT_MS``); latency
rates and the no-SLO budget otherwise from the per-GPU config. Written for vLLM 0.32–0.33: importing this
module under another version raises RuntimeError (vLLM's scheduler internals move between
releases; :mod:`tkernels.plugins.vllm.compat`). Importing :mod:`tkernels.plugins.vllm` alone
never imports vLLM.

Each step, before vLLM's own ``schedule()`` (which copies ``max_num_scheduled_tokens`` into its
token budget and fills it with running requests in list order, then admits waiting ones):

1. running decodes move ahead of running prefill chunks (stable order), so a chunk admitted
   before a decode can never take the decode's token;
2. the policy plans the step from the running decodes (context lengths, draft tokens), the
   running chunks and the waiting prompts (assumed uncached: prefix-cache hits are only known
   once vLLM admits them), each prompt with the time it has waited (:class:`~tkernels.sched.WaitClock`);
3. draft tokens beyond the plan's grant are dropped from the last decodes (vLLM would give the
   first decodes all their drafts and the last ones no token at all);
4. ``max_num_scheduled_tokens`` = the plan's budget, never above its configured value (which
   sizes vLLM's buffers).

**Online calibration** (on by default; ``"calibrate": false`` turns it off): the policy's latency
model starts from the per-GPU config's rates, else the analytic H100-class default, and is refit
from the engine's own steps (:class:`~tkernels.sched.calibration.OnlineCalibration`: every 2 s
in the first minute, then every 30 s). A step's time is measured from the later of its
``schedule()`` and the previous step's ``update_from_output()`` to its own
``update_from_output()`` (the forward, sampling and the output's trip back; with async
scheduling, the overlap of the next ``schedule()`` is not counted twice); its cost is each
scheduled request's chunk after its cached prefix (:func:`~tkernels.sched.latency_model.batch_cost`).
At each refit the SLO's step target (the SLO times ``1 - margin``) is divided by the fit's
``tail_ratio`` (the 95th percentile of measured / predicted step time): the fit predicts the
typical step, the SLO bounds the tail, so on a noisy machine the budget leaves room for it.
The start-up line says where the starting rates came from; a line says what the fit learned at
its first refit, when the first minute is over, and at every later refit; ``"calibration_log":
PATH`` also rewrites a JSON file at each refit (the rates and the measured steps against the model).

Moving decodes first also makes FCFS preemption (``running[-1]``) pick a prefilling request first.
"""

from __future__ import annotations

import logging
import time
from itertools import chain, islice

from tkernels.plugins.vllm.compat import require_supported_vllm

require_supported_vllm()  # before touching vLLM internals that may have moved

import vllm.envs as envs  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402

from tkernels.config import ConfigChoice, current  # noqa: E402
from tkernels.plugins.vllm.settings import SCHED_KEY, calibration_options, model_shape, sched_options  # noqa: E402
from tkernels.sched import DecodeMaximalPolicy, Prefill, StepBudget, WaitClock  # noqa: E402
from tkernels.sched.budget import ENV_TBT_SLO_MS  # noqa: E402
from tkernels.sched.calibration import OnlineCalibration, rates_source  # noqa: E402
from tkernels.sched.latency_model import batch_cost  # noqa: E402

logger = logging.getLogger("vllm.tkernels")  # vLLM's handlers and format, with the process name



def describe_policy(policy: DecodeMaximalPolicy, slo_source: str, choice: ConfigChoice) -> str:
    """The start-up line: the SLO and where it came from, the budget it gives, the latency model's source."""
    if policy.slo_ms is None:
        budget = f"no TBT SLO: a fixed budget of {policy.fixed_budget} tokens per step"
    else:
        one = policy.plan([1024], 0, [Prefill(0, policy.max_tokens)])
        busy = policy.plan([1024] * 16, 0, [Prefill(0, policy.max_tokens)])
        budget = (f"TBT SLO {policy.slo_ms:g} ms (from {slo_source}; target {policy.target_us / 1e3:g} ms after the "
                  f"margin): budget {one.tokens} tokens per step beside 1 decode of 1k context (predicted "
                  f"{one.predicted_us / 1e3:.1f} ms), {busy.tokens} beside 16; prompts without any decode "
                  f"run whole (tile {policy.tile}, at most max_num_batched_tokens = {policy.max_tokens})")
    return f"tkernels scheduler: {budget}; latency model: {rates_source(policy.model.rates, choice)}"


class _StepStats:
    """What the scheduler granted since the last stats line (logged every VLLM_LOG_STATS_INTERVAL s)."""

    def __init__(self) -> None:
        self.steps = self.budget = self.prefill = self.decodes = self.drafts = 0
        self.verified = self.generated = 0  # decode rows whose output came back, and their tokens
        self.since = time.monotonic()

    def line(self) -> str:
        steps = max(self.steps, 1)
        mat = f"{self.generated / self.verified:.2f}" if self.verified else "n/a"
        nodes = f"{self.drafts / self.decodes:.2f}" if self.decodes else "n/a"
        return (f"tkernels scheduler: Avg budget: {self.budget / steps:.1f} tokens/step, "
                f"Avg prefill granted: {self.prefill / steps:.1f} tokens/step, "
                f"Avg decodes: {self.decodes / steps:.2f}/step, Avg draft (tree) nodes: {nodes} per decode, "
                f"MAT: {mat} tokens per decode forward, Steps: {self.steps}")


class DecodeMaximalScheduler(AsyncScheduler):
    """vLLM's AsyncScheduler with a per-step token budget from :class:`DecodeMaximalPolicy`.

    Logs one start-up line (:func:`describe_policy`) and, with vLLM's stats logging on, a stats
    line every ``VLLM_LOG_STATS_INTERVAL`` seconds (:class:`_StepStats`).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_budget = self.max_num_scheduled_tokens
        options = sched_options(self.vllm_config.additional_config)  # checked at start-up already (settings.py)
        choice = current()
        self.policy = DecodeMaximalPolicy(model_shape(self.vllm_config), max_tokens=self.max_budget, choice=choice,
                                          **options)
        self.last_plan: StepBudget | None = None
        self.slo_target_us = self.policy.target_us  # the SLO after the margin; the calibration's tail_ratio divides it
        slo_source = f"additional_config['{SCHED_KEY}']" if "slo_ms" in options else f"${ENV_TBT_SLO_MS}"
        calibration = calibration_options(self.vllm_config.additional_config)
        self.calibration = None
        self.calibration_log = calibration["calibration_log"]
        if calibration["calibrate"]:
            self.calibration = OnlineCalibration(self.policy.model, rates_source(self.policy.model.rates, choice), background=True)
        how = ("calibrated online from this engine's steps (tkernels_sched.calibrate)" if self.calibration
               else "not calibrated (tkernels_sched.calibrate = false)")
        logger.info("%s, %s", describe_policy(self.policy, slo_source, choice), how)
        self._step_started: dict[int, tuple[float, tuple[int, int, int]]] = {}  # id(output) -> (time, cost)
        self._last_update = 0.0
        self.stats = _StepStats()
        self._decode_ids: dict[int, tuple[object, set[str]]] = {}  # id(output) -> (output, its decodes)
        self.wait_clock = WaitClock()

    def schedule(self, *args, **kwargs):
        decodes = [r for r in self.running if not r.is_prefill_chunk]
        chunks = [r for r in self.running if r.is_prefill_chunk]
        self.running = decodes + chunks
        free_slots = max(self.max_num_running_reqs - len(self.running), 0)
        prompts = [*chunks, *islice(chain(self.kv_holding_waiting, self.waiting), free_slots)]
        waited = self.wait_clock.waited_ms([r.request_id for r in prompts])
        plan = self.policy.plan(
            [r.num_computed_tokens + 1 for r in decodes],
            [len(r.spec_token_ids) for r in decodes],
            [Prefill(r.num_computed_tokens, r.num_tokens - r.num_computed_tokens, w) for r, w in zip(prompts, waited)],
        )
        drafts_left = plan.spec_tokens
        for request in decodes:
            if len(request.spec_token_ids) > drafts_left:
                request.spec_token_ids = request.spec_token_ids[:drafts_left]
            drafts_left -= len(request.spec_token_ids)
        self.max_num_scheduled_tokens = min(plan.tokens, self.max_budget)
        self.last_plan = plan
        output = super().schedule(*args, **kwargs)
        self._count(output, {r.request_id for r in decodes})
        if self.calibration is not None and output.total_num_scheduled_tokens:
            self._step_started[id(output)] = (time.perf_counter(), self._step_cost(output))
            while len(self._step_started) > 8:  # outputs that never came back (a bound, as in _count)
                self._step_started.pop(next(iter(self._step_started)))
        return output

    def _step_cost(self, output) -> tuple[int, int, int]:
        """(tokens, kv_tokens, attn_pairs) of a scheduled step, as the latency model counts them
        (:func:`~tkernels.sched.latency_model.batch_cost`): each request's scheduled tokens as a
        chunk after its computed prefix (a decode: one query over its context; drafts: more queries)."""
        prefix, chunks = [], []
        for req_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is not None and n > 0:
                # vLLM has already advanced num_computed_tokens by the scheduled tokens
                prefix.append(max(request.num_computed_tokens - n, 0))
                chunks.append(n)
        return batch_cost(prefix, chunks)

    def _measure(self, scheduler_output) -> None:
        started = self._step_started.pop(id(scheduler_output), None)
        if started is None:
            return
        start, cost = started
        measured_us = (time.perf_counter() - max(start, self._last_update)) * 1e6
        model = self.calibration.record_logged(cost, measured_us, logger, "tkernels scheduler")
        if model is None:
            return
        self.policy.model = model
        if self.slo_target_us is not None:  # aim the predicted step below the SLO by this machine's tail spread
            self.policy.target_us = self.slo_target_us / self.calibration.tail_ratio
        if self.calibration_log:
            try:
                _write_json(self.calibration_log, {**self.calibration.summary(), **self.calibration.samples()})
            except OSError as err:  # a log that cannot be written never stops the engine
                logger.warning("tkernels scheduler: cannot write calibration_log %s (%s); not written again",
                               self.calibration_log, err)
                self.calibration_log = None

    def update_from_output(self, scheduler_output, model_runner_output):
        if self.calibration is not None:
            self._measure(scheduler_output)
        try:
            return self._update_from_output(scheduler_output, model_runner_output)
        finally:
            self._last_update = time.perf_counter()

    def _update_from_output(self, scheduler_output, model_runner_output):
        _, decodes = self._decode_ids.pop(id(scheduler_output), (None, set()))
        index = model_runner_output.req_id_to_index
        for req_id in decodes:
            if req_id in index and model_runner_output.sampled_token_ids:
                self.stats.verified += 1
                self.stats.generated += len(model_runner_output.sampled_token_ids[index[req_id]])
        return super().update_from_output(scheduler_output, model_runner_output)

    def _count(self, output, decode_ids: set[str]) -> None:
        scheduled = output.num_scheduled_tokens
        decodes = decode_ids.intersection(scheduled)
        drafts = sum(len(output.scheduled_spec_decode_tokens.get(r, ())) for r in decodes)
        stats = self.stats
        stats.steps += 1
        stats.budget += self.max_num_scheduled_tokens
        stats.decodes += len(decodes)
        stats.drafts += drafts
        stats.prefill += output.total_num_scheduled_tokens - len(decodes) - drafts
        self._decode_ids[id(output)] = (output, decodes)
        while len(self._decode_ids) > 8:  # outputs that never came back (vLLM returns each one; a bound anyway)
            self._decode_ids.pop(next(iter(self._decode_ids)))
        if self.log_stats and time.monotonic() - stats.since >= envs.VLLM_LOG_STATS_INTERVAL:
            logger.info("%s", stats.line())
            self.stats = _StepStats()


def _write_json(path: str, data: dict) -> None:
    """Replace ``path`` atomically (a reader never sees half a file)."""
    import json
    import os

    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
