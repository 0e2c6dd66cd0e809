"""The tree proposer's step-latency model, measured in the engine it runs in.

The tree proposer sizes its trees (``size: per_batch``) by expected tokens per second under a
:class:`~tkernels.sched.latency_model.LatencyModel`. Its rates start from the per-GPU config
(``tkernels autotune``) or, without one, the analytic H100-class default, which on a machine
nobody profiled (a CPU, a GPU without a config) is wrong by orders of magnitude: on the 2-core
CPU VM a SmolLM2 step of 33 tokens costs several times a 1-token step, where the default says
they cost the same, so a proposer trusting it drafts big trees that make every request slower
(issue 24). The scheduler calibrates its own copy of the model, but it runs in the engine-core
process and the proposer in the worker; this is the worker side.

:class:`MeasuredSteps` times every step the proposer sees: from the runner's ``_prepare_inputs``
(where :meth:`~tkernels.plugins.vllm.tree.TreeBatch.begin_step` stamps
:attr:`~tkernels.plugins.vllm.tree.TreeStep.started`) to the end of that step's ``propose`` (the
forward, sampling, verification and the drafting of the next step, all of which the step costs;
on a GPU, ``propose`` runs after the sampled tokens reached the host, so the device work is in).
Not in it: the scheduler's time and the engine-core round trip, a fixed cost per step that only
makes speculation look less worth it than it is. Idle time between requests never enters, unlike
the interval between two ``propose`` calls. Only the steps the size policy prices are measured:
decodes and verified drafts, no prompt chunk (whose tokens cost less: no LM head, sampler or
top-k capture). Each step's cost (tokens, kv_tokens, attn_pairs) is
:func:`~tkernels.sched.latency_model.batch_cost` of its rows' scheduled tokens, and
:class:`~tkernels.sched.calibration.OnlineCalibration` refits the rates in a helper thread (2 s
refits in the first minute, then every 30 s). The proposer swaps every refit model into its
tree policies, so its trees shrink to what pays on this machine at this batch, down to no draft.

Until the model is :attr:`MeasuredSteps.measured` (rates from this GPU's config, written by
``tkernels autotune``, or a first refit of this engine's steps) nothing prices a draft: the
analytic default is another machine's (an H100's), and on the 2-core CPU VM trusting it drafted
8 nodes a request at 26 requests for the first 16 steps, each step two to three times a plain one
(docs/step_profile.md, tenth round). The proposer then *probes* instead: one draft a request on
every other step, none on the others, so the first fit sees steps of the same batch with and
without drafts and learns what a draft token costs here (steps of decodes alone leave a draft's
cost and a request's inseparable: ``tokens`` equals ``requests`` in all of them). Steps with a
prompt chunk are not measured, so the probing lasts until 16 steps without one have been.
"""

from __future__ import annotations

import logging
import time

from tkernels.config import ConfigChoice, current
from tkernels.sched.calibration import OnlineCalibration, rates_source
from tkernels.sched.latency_model import LatencyModel, LatencyRates, ModelShape, batch_cost

logger = logging.getLogger("vllm.tkernels")


class MeasuredSteps:
    """The proposer's latency model (:attr:`model`) and, with ``calibrate``, its online refit."""

    def __init__(self, shape: ModelShape, calibrate: bool = True, choice: ConfigChoice | None = None) -> None:
        choice = choice or current()
        self.model = LatencyModel(shape, LatencyRates.from_config(choice))
        self.source = rates_source(self.model.rates, choice)
        self.configured = bool(choice.data.get("latency_model"))  # rates from a config's section, not the default
        self.calibration = OnlineCalibration(self.model, self.source, background=True) if calibrate else None

    @property
    def measured(self) -> bool:
        """Whether :attr:`model` may size trees: its rates came from a config (``tkernels autotune``
        on this GPU) or from a refit of this engine's steps, or calibration is off (the starting
        model, as configured, is then the user's choice). Until then the proposer probes
        (module doc)."""
        return self.configured or self.calibration is None or self.calibration.refits > 0

    def describe(self) -> str:
        """Start-up wording: where the rates come from and whether they are refit."""
        how = ("calibrated online from this engine's steps (tkernels_tree.calibrate)" if self.calibration
               else "not calibrated (tkernels_tree.calibrate = false)")
        if not self.measured:
            how += "; until its first fit, one draft a request on every other step (probing what a draft costs here)"
        return f"latency model from {self.source}, {how}"

    def record(self, step) -> LatencyModel | None:
        """Measure ``step`` (a :class:`~tkernels.plugins.vllm.tree.TreeStep`, once: its stamp is
        cleared) up to now; returns the refit model when this refit it, else None."""
        started = getattr(step, "started", None)
        if self.calibration is None or started is None:
            return None
        step.started = None  # one measurement per step (a second propose of a step adds nothing)
        if (step.root_position != step.prefix).any():
            # A prompt chunk ran in it: not a step the size policy prices. A prompt token skips
            # the LM head, the sampler and the top-k capture a verified token pays, so on the CPU
            # VM it costs ~0.75x a draft token; fitted together, prompt steps priced drafts too
            # low and the trees grew (docs/step_profile.md, tenth round).
            return None
        measured_us = (time.perf_counter() - started) * 1e6
        model = self.calibration.record_logged(batch_cost(step.prefix, step.num_nodes), measured_us, logger,
                                               "tkernels tree proposer")
        if model is not None:
            self.model = model
        return model
