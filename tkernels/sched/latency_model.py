"""Step-latency cost model: predicted time of one forward step of a mixed batch.

    step_us = overhead_us
            + hypot(weight_bytes / weight_bw, 2 * linear_params * tokens / matmul_rate)   # linear layers
            + kv_bytes / kv_bw                                                           # attention, bytes
            + attn_flops / attn_rate                                                     # attention, FLOPs

Linear layers stream every weight once per step (memory-bound) and do 2 FLOPs per weight per
token (compute-bound); ``hypot`` blends the two regimes smoothly instead of a sharp roofline
knee. Attention reads the cached K/V of every request (decodes are bound by these bytes) and
does 4 * head_dim * query heads FLOPs per causal query-key pair (prefill chunks are bound by
these FLOPs); the chunk's pairs grow with its cached prefix, so a chunk costs more the later it
comes in its prompt. The two attention terms add (conservative: a POD-style kernel overlaps them).

The five rates are per GPU and independent of the model, so one per-GPU config serves every
model: they come from the ``latency_model`` section of the per-GPU config
(:func:`tkernels.config.current`), written by ``tkernels autotune``::

    "latency_model": {"overhead_us": 40.0, "weight_gbps": 3000.0, "matmul_tflops": 990.0,
                      "kv_gbps": 2500.0, "attn_tflops": 400.0}

Without that section (no config for this GPU, or an empty section) the analytic default
:data:`DEFAULT_RATES` applies: H100-SXM-class rates whose ratio weight_gbps / matmul_tflops puts
the linear layers' knee at ~330 tokens, matching the H100 measurement in docs/design.md (Llama-3-8B
linear layers, bf16: x1.02 at 64 tokens, x1.07 at 128, x1.22 at 256, x1.93 at 512 vs 1 token;
this model predicts x1.02, x1.07, x1.27, x1.84).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from tkernels.checks import integer
from tkernels.config import ConfigChoice, ConfigError, current


@dataclass(frozen=True)
class ModelShape:
    """The per-GPU shard of a dense Llama-like decoder (heads and MLP divided by tensor parallelism)."""

    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name}: must be a positive integer, got {value!r}")

    @classmethod
    def sharded(cls, *, num_layers: int, hidden_size: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                intermediate_size: int, vocab_size: int, tensor_parallel: int = 1, dtype_bytes: int = 2) -> ModelShape:
        """The per-GPU shard of a model given its whole sizes, as a server shards it: query
        heads, MLP width and vocabulary divided by ``tensor_parallel``, KV heads too but at least
        one (replicated when fewer than the GPUs). The one reading of a served model's shape:
        the vLLM and SGLang adapters pass their configs' sizes."""
        tp = tensor_parallel
        return cls(num_layers=num_layers, hidden_size=hidden_size, num_q_heads=max(1, num_q_heads // tp),
                   num_kv_heads=max(1, num_kv_heads // tp), head_dim=head_dim,
                   intermediate_size=max(1, intermediate_size // tp), vocab_size=max(1, vocab_size // tp),
                   dtype_bytes=dtype_bytes)

    @property
    def linear_params(self) -> int:
        """Weights of the QKV/O projections, gated MLP and LM head."""
        attn = self.hidden_size * (self.num_q_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_q_heads * self.head_dim * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attn + mlp) + self.vocab_size * self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def flops_per_pair(self) -> int:
        """Attention FLOPs per (query, key) pair over all layers: QK^T and PV, 2 FLOPs per MAC each."""
        return 4 * self.head_dim * self.num_q_heads * self.num_layers


# Llama-3-8B in bf16, the benchmark workloads' model (docs/design.md).
LLAMA3_8B = ModelShape(num_layers=32, hidden_size=4096, num_q_heads=32, num_kv_heads=8, head_dim=128,
                       intermediate_size=14336, vocab_size=128256, dtype_bytes=2)


@dataclass(frozen=True)
class LatencyRates:
    """Effective per-GPU rates (see the module docstring for the formula they enter)."""

    overhead_us: float  # fixed per-step cost: launches, sampling, host work
    weight_gbps: float  # weight streaming bandwidth, GB/s
    matmul_tflops: float  # dense matmul rate, TFLOP/s
    kv_gbps: float  # attention K/V read bandwidth, GB/s
    attn_tflops: float  # prefill attention rate, TFLOP/s

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (value == 0 and f.name != "overhead_us"):
                raise ValueError(f"{f.name}: must be a finite {'non-negative' if f.name == 'overhead_us' else 'positive'} "
                                 f"number, got {value!r}")

    @classmethod
    def from_config(cls, choice: ConfigChoice | None = None) -> LatencyRates:
        """The config's ``latency_model`` section, else :data:`DEFAULT_RATES`."""
        choice = choice or current()
        section: dict[str, Any] = choice.data.get("latency_model") or {}
        if not section:
            return DEFAULT_RATES
        try:
            return cls(**{f.name: section[f.name] for f in fields(cls)})
        except KeyError as err:
            raise ConfigError(f"{choice.path}: missing field 'latency_model.{err.args[0]}'") from err
        except ValueError as err:
            raise ConfigError(f"{choice.path}: field 'latency_model.{err}") from err


DEFAULT_RATES = LatencyRates(overhead_us=40.0, weight_gbps=3000.0, matmul_tflops=990.0, kv_gbps=2500.0,
                             attn_tflops=400.0)


@dataclass(frozen=True)
class LatencyModel:
    """Predicts step time for a model shape on a GPU."""

    shape: ModelShape
    rates: LatencyRates

    def step_us(self, tokens: int, kv_tokens: int, attn_pairs: int) -> float:
        """Time of a step running ``tokens`` query tokens that read ``kv_tokens`` cached K/V
        positions and score ``attn_pairs`` (query, key) pairs in total."""
        tokens, kv_tokens = integer("tokens", tokens, minimum=0), integer("kv_tokens", kv_tokens, minimum=0)
        attn_pairs = integer("attn_pairs", attn_pairs, minimum=0)
        rates, shape = self.rates, self.shape
        weights_us = shape.linear_params * shape.dtype_bytes / (rates.weight_gbps * 1e3)
        matmul_us = 2 * shape.linear_params * tokens / (rates.matmul_tflops * 1e6)
        kv_us = kv_tokens * shape.kv_bytes_per_token / (rates.kv_gbps * 1e3)
        attn_us = attn_pairs * shape.flops_per_pair / (rates.attn_tflops * 1e6)
        return rates.overhead_us + math.hypot(weights_us, matmul_us) + kv_us + attn_us

    def step_time(self, batch_tokens: int, requests: int = 0, context: int = 0) -> float:
        """µs of a verify step of ``batch_tokens`` query tokens from ``requests`` requests holding
        ``context`` cached tokens each, every query attending to its request's (K/V read once per
        request; the new tokens' own keys, a few per query, left out): :class:`tkernels.spec.StepTime`,
        so the tree policy prices its trees with the same per-GPU model as the token budget.
        Without ``context``, attention is not priced."""
        requests, context = integer("requests", requests, minimum=0), integer("context", context, minimum=0)
        return self.step_us(*_verify_costs(batch_tokens, requests, context))

    def step_times(self, batch_tokens, requests: int = 0, context: int = 0) -> np.ndarray:
        """:meth:`step_time` of many token counts at once (float64 µs, one vectorised call): the
        tree policies price every candidate size of a step's batch (hundreds) with it."""
        requests, context = integer("requests", requests, minimum=0), integer("context", context, minimum=0)
        costs = _verify_costs(np.asarray(batch_tokens, dtype=np.int64), requests, context)
        return self.steps_us(np.stack(np.broadcast_arrays(*costs), axis=1))

    def steps_us(self, costs) -> np.ndarray:
        """:meth:`step_us` of many steps at once: ``costs`` ``[n, 3]`` rows of (tokens, kv_tokens,
        attn_pairs); float64 ``[n]`` µs (the same formula, vectorised for fitting)."""
        return _steps_us(self.shape, np.asarray([getattr(self.rates, n) for n in RATE_NAMES], dtype=np.float64),
                         np.asarray(costs, dtype=np.float64).reshape(-1, 3))


def _verify_costs(tokens, requests: int, context: int):
    """A verify step's (tokens, kv_tokens, attn_pairs) (:meth:`LatencyModel.step_us`'s costs) for
    ``tokens`` query tokens (an int or an array) from ``requests`` requests of ``context``
    cached tokens each: K/V read once per request, every query scoring its request's context."""
    return tokens, requests * context, tokens * context


RATE_NAMES = tuple(f.name for f in fields(LatencyRates))
# fit_rates' priors: a ratio e times off start's costs what a 10%-off step does (log residuals)
PRIOR_WEIGHT = 0.1


def _steps_us(shape: ModelShape, rates: np.ndarray, costs: np.ndarray) -> np.ndarray:
    overhead, weight_gbps, matmul_tflops, kv_gbps, attn_tflops = rates
    tokens, kv, pairs = costs.T
    weights_us = shape.linear_params * shape.dtype_bytes / (weight_gbps * 1e3)
    matmul_us = 2 * shape.linear_params * tokens / (matmul_tflops * 1e6)
    return (overhead + np.hypot(weights_us, matmul_us) + kv * shape.kv_bytes_per_token / (kv_gbps * 1e3)
            + pairs * shape.flops_per_pair / (attn_tflops * 1e6))


def fit_rates(shape: ModelShape, costs, measured_us, start: LatencyRates = DEFAULT_RATES) -> LatencyRates:
    """The rates that best predict measured steps: least squares on log(predicted / measured)
    over the five rates (kept positive by fitting their logarithms), from ``start`` and from
    ``start`` rescaled to the measured median (the better of the two fits).

    ``costs``: (tokens, kv_tokens, attn_pairs) per step (:meth:`LatencyModel.step_us`'s
    arguments); ``measured_us``: the steps' times. A rate the steps do not constrain (no prefill
    chunk among them: nothing tells the attention rate) keeps ``start``'s ratio to its partner
    (the weak priors below: overhead to weight streaming, matmul to weight rate, attention to
    matmul rate, K/V to weight bandwidth), so a fit from few or similar steps predicts what it
    has seen and keeps ``start``'s shape elsewhere. A soft-L1
    loss keeps a few outliers (a preempted process, a page fault) from moving the fit. Used by
    ``tkernels autotune`` (profiled steps) and by the online calibration
    (:mod:`tkernels.sched.calibration`, the engine's own steps). Needs SciPy.
    """
    from scipy.optimize import least_squares

    costs = np.asarray(costs, dtype=np.float64).reshape(-1, 3)
    measured = np.asarray(measured_us, dtype=np.float64).reshape(-1)
    if len(costs) != len(measured) or not len(costs):
        raise ValueError(f"costs: {len(costs)} steps for {len(measured)} measurements (need as many, at least one)")
    if not (np.isfinite(measured).all() and (measured > 0).all()):
        raise ValueError("measured_us: must be finite positive times")
    log_measured = np.log(measured)
    start_log = np.log([max(getattr(start, n), 1e-3) for n in RATE_NAMES])

    # Weak priors (PRIOR_WEIGHT) on the ratios between the terms: overhead vs
    # weight streaming, the linear layers' knee (matmul vs weight rate), matmul vs attention
    # compute rate, K/V vs weight bandwidth. They keep ``start``'s shape where the steps do not
    # tell the terms apart, and leave the overall scale to the data alone. Without them a
    # noisy machine's fit from similar steps (16 prompt chunks of 32 tokens) put the whole
    # time in the fixed overhead, or a prompt's whole cost on its attention pairs: either
    # misprices every other step. Steps of different shapes outweigh them at once.
    i = {n: RATE_NAMES.index(n) for n in RATE_NAMES}
    pairs = (("overhead_us", "weight_gbps", 1.0), ("matmul_tflops", "weight_gbps", -1.0),
             ("matmul_tflops", "attn_tflops", -1.0), ("kv_gbps", "weight_gbps", -1.0))

    def priors(log_rates: np.ndarray) -> list[float]:
        # overhead x weight rate: the overhead in units of the weights' streaming time
        return [PRIOR_WEIGHT * ((log_rates[i[a]] + sign * log_rates[i[b]]) - (start_log[i[a]] + sign * start_log[i[b]]))
                for a, b, sign in pairs]

    def residuals(log_rates: np.ndarray) -> np.ndarray:
        return np.concatenate([np.log(_steps_us(shape, np.exp(log_rates), costs)) - log_measured, priors(log_rates)])

    # Two starts: ``start`` itself, and ``start`` uniformly slowed (or sped up) to the measured
    # median (every time term scaled alike: the shape of ``start``, the scale of this machine).
    # From a start 1000x off (the H100 default on a CPU) one local fit can settle in a corner
    # that explains the steps seen so far by one term alone; the rescaled start keeps the
    # balance between the terms. The better fit of the two wins.
    scale = float(np.exp(np.median(log_measured - np.log(_steps_us(shape, np.exp(start_log), costs)))))
    rescaled = start_log - np.log(scale)  # rates / scale: every term x scale
    rescaled[i["overhead_us"]] = start_log[i["overhead_us"]] + np.log(scale)
    fits = [least_squares(residuals, x0, method="trf", loss="soft_l1", f_scale=0.1) for x0 in (start_log, rescaled)]
    best = min(fits, key=lambda fit: fit.cost)
    return LatencyRates(**{n: float(v) for n, v in zip(RATE_NAMES, np.exp(best.x))})


def prefill_chunk_cost(prefix_len: int, chunk: int) -> tuple[int, int]:
    """(kv_tokens, attn_pairs) of a causal chunk of ``chunk`` tokens after ``prefix_len`` cached ones."""
    prefix_len, chunk = integer("prefix_len", prefix_len, minimum=0), integer("chunk", chunk, minimum=0)
    return prefix_len + chunk, chunk * prefix_len + chunk * (chunk + 1) // 2


def batch_cost(prefix_lens, chunks) -> tuple[int, int, int]:
    """(tokens, kv_tokens, attn_pairs) of a step that runs, for every request, ``chunks[i]``
    query tokens after ``prefix_lens[i]`` cached ones (:func:`prefill_chunk_cost` summed: a
    decode is a 1-token chunk, a request verifying ``s`` drafts a ``1 + s``-token chunk). Any
    integer sequences or arrays of equal length; rows with no tokens add nothing."""
    prefix = np.asarray(prefix_lens, dtype=np.int64).reshape(-1)
    chunk = np.asarray(chunks, dtype=np.int64).reshape(-1)
    if prefix.shape != chunk.shape:
        raise ValueError(f"prefix_lens: one per chunk, got {prefix.size} for {chunk.size} chunks")
    if (prefix < 0).any() or (chunk < 0).any():
        raise ValueError("prefix_lens, chunks: must be >= 0")
    live = chunk > 0
    prefix, chunk = prefix[live], chunk[live]
    return int(chunk.sum()), int((prefix + chunk).sum()), int((chunk * prefix + chunk * (chunk + 1) // 2).sum())


def draft_cost(context_len: int, spec_tokens: int) -> tuple[int, int]:
    """(kv_tokens, attn_pairs) that ``spec_tokens`` draft tokens add to a decode at ``context_len``
    keys (the new token included; the plain decode costs ``(context_len, context_len)``). Every
    query is counted against every key (a causal or tree mask only removes pairs):
    (1 + s)(L + s) - L = s(L + 1 + s) pairs, s more keys."""
    context_len = integer("context_len", context_len, minimum=0)
    spec_tokens = integer("spec_tokens", spec_tokens, minimum=0)
    return spec_tokens, spec_tokens * (context_len + 1 + spec_tokens)
