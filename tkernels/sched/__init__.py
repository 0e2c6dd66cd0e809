"""Decode-maximal token budgets (server-agnostic; the vLLM/SGLang adapters live in tkernels.plugins)."""

from tkernels.sched.budget import (
    DEFAULT_MAX_WAIT_MS,
    ENV_MAX_WAIT_MS,
    ENV_TBT_SLO_MS,
    FALLBACK_BUDGET,
    DecodeMaximalPolicy,
    Prefill,
    StepBudget,
    WaitClock,
)
from tkernels.sched.latency_model import DEFAULT_RATES, LLAMA3_8B, LatencyModel, LatencyRates, ModelShape

__all__ = ["DEFAULT_MAX_WAIT_MS", "DEFAULT_RATES", "ENV_MAX_WAIT_MS", "ENV_TBT_SLO_MS", "FALLBACK_BUDGET", "LLAMA3_8B",
           "DecodeMaximalPolicy", "LatencyModel", "LatencyRates", "ModelShape", "Prefill", "StepBudget", "WaitClock"]
