"""Decode-maximal token budget: how many tokens one step may run, and who gets them.

Per step the policy picks a budget τ (tokens) and grants it in a fixed order:

1. **decodes** — one token per running decode, always, even when they alone exceed τ (then
   the step is exactly the decodes: a decode never stalls behind a prefill);
2. **speculation** — the decodes' draft/tree tokens, in serving order, up to ``tree_budget``
   (the tree policy's node budget for the step; default: every proposed draft token);
3. **prefill** — the running prefill chunk first, then new prefills, in serving order.

Drafts come before prompt tokens because that split maximises goodput: a draft token yields
its acceptance probability in output tokens this step, a prompt token yields none until its
prompt is done (and the tree policy already weighed each draft node against its verify cost).

τ is the largest multiple of ``tile`` (16 by default: the GEMM tile along tokens) whose granted
step has a predicted time (:class:`~tkernels.sched.latency_model.LatencyModel`) within the TBT
SLO times ``1 - margin``, never above ``max_tokens`` (the server's buffer size) and never above
the work there is (rounded up to a tile), but at least one tile (so prompts progress even where
the SLO is unattainable on this GPU). A prefill chunk's attention cost grows with its cached
prefix, so the chunk shrinks as its prompt advances.

Where the numbers come from:

- TBT SLO: ``slo_ms`` argument, else ``$TKERNELS_TBT_SLO_MS``; else no SLO, and τ is the fixed
  ``budgets.default_tokens`` of the per-GPU config, else :data:`FALLBACK_BUDGET` = 512 tokens
  (Sarathi-Serve's strict-latency budget; docs/design.md measures an 8B model's linear layers on an
  H100 at x1.93 the one-token time for 512 tokens);
- latency rates: the per-GPU config's ``latency_model`` section, else the analytic H100-class
  default (:data:`~tkernels.sched.latency_model.DEFAULT_RATES`). On a GPU with no config
  (:func:`tkernels.config.current` falls back and warns), both fallbacks apply.

The policy is a plain function of the step's load (:meth:`DecodeMaximalPolicy.plan`): no server
imports; the vLLM and SGLang adapters translate their queues into its arguments.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

from tkernels.config import ConfigChoice, ConfigError, current
from tkernels.sched.latency_model import (
    LLAMA3_8B,
    LatencyModel,
    LatencyRates,
    ModelShape,
    draft_cost,
    prefill_chunk_cost,
)

ENV_TBT_SLO_MS = "TKERNELS_TBT_SLO_MS"
FALLBACK_BUDGET = 512
DEFAULT_TILE = 16
DEFAULT_MARGIN = 0.1


class Prefill(NamedTuple):
    """A prompt still being computed: ``prefix_len`` tokens cached, ``remaining`` still to run."""

    prefix_len: int
    remaining: int


@dataclass(frozen=True)
class StepBudget:
    """The plan for one step. ``tokens`` is the budget to hand the server (τ, or exactly the
    decodes when they alone exceed τ); the other fields say how it is split."""

    tokens: int
    decode_tokens: int
    spec_tokens: int
    prefill_tokens: int
    predicted_us: float


class DecodeMaximalPolicy:
    """Decode-maximal per-step token budget (see the module docstring).

    ``shape`` is the per-GPU shard of the served model; ``slo_ms`` the TBT SLO (None: from
    ``$TKERNELS_TBT_SLO_MS``, else a fixed budget); ``max_tokens`` the server's largest step.
    ``rates`` and ``default_budget`` override the per-GPU config (``choice``, default: current GPU).
    """

    def __init__(
        self,
        shape: ModelShape = LLAMA3_8B,
        *,
        slo_ms: float | None = None,
        margin: float = DEFAULT_MARGIN,
        tile: int = DEFAULT_TILE,
        max_tokens: int = 8192,
        rates: LatencyRates | None = None,
        default_budget: int | None = None,
        choice: ConfigChoice | None = None,
    ) -> None:
        if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
            raise ValueError(f"tile: must be a positive integer, got {tile!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < tile:
            raise ValueError(f"max_tokens: must be an integer >= tile ({tile}), got {max_tokens!r}")
        if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
            raise ValueError(f"margin: must be in [0, 1), got {margin!r}")
        if slo_ms is None and os.environ.get(ENV_TBT_SLO_MS):
            try:
                slo_ms = float(os.environ[ENV_TBT_SLO_MS])
            except ValueError:
                raise ValueError(f"${ENV_TBT_SLO_MS}: must be a number of milliseconds, "
                                 f"got {os.environ[ENV_TBT_SLO_MS]!r}") from None
        if slo_ms is not None and not (isinstance(slo_ms, (int, float)) and math.isfinite(slo_ms) and slo_ms > 0):
            raise ValueError(f"slo_ms: must be a positive number of milliseconds, got {slo_ms!r}")
        if default_budget is not None and (type(default_budget) is not int or default_budget < 1):
            raise ValueError(f"default_budget: must be a positive integer, got {default_budget!r}")

        needs_config = rates is None or (slo_ms is None and default_budget is None)
        choice = choice or (current() if needs_config else None)
        self.model = LatencyModel(shape, rates or LatencyRates.from_config(choice))
        self.slo_ms = slo_ms
        self.target_us = None if slo_ms is None else slo_ms * 1e3 * (1 - margin)
        self.tile = tile
        self.max_tokens = max_tokens
        if slo_ms is None:
            budget = default_budget or _config_default_budget(choice) or FALLBACK_BUDGET
            self.fixed_budget = max(tile, min(budget, max_tokens) // tile * tile)

    def plan(
        self,
        decode_context_lens: Sequence[int],
        spec_tokens: Sequence[int] | int = 0,
        prefills: Sequence[Prefill | tuple[int, int]] = (),
        tree_budget: int | None = None,
    ) -> StepBudget:
        """Budget for one step.

        ``decode_context_lens``: one entry per running decode, its keys including the new token;
        ``spec_tokens``: draft/tree tokens proposed per decode (one int: the same for each);
        ``prefills``: ``(prefix_len, remaining)`` per prompt in serving order (running chunk first);
        ``tree_budget``: most draft tokens this step may verify (None: all proposed).
        """
        step = _Load(decode_context_lens, spec_tokens, prefills, tree_budget)
        work = step.num_decodes + step.spec_allowed + step.prefill_work
        if self.target_us is None:
            cap = self.fixed_budget
        else:
            # Largest tile multiple whose granted step meets the target; a cap past the work
            # grants nothing more, so search no further than the work rounded up to a tile.
            # At least one tile, so prompts progress even where the SLO is unattainable.
            lo, hi = 1, max(1, min(self.max_tokens // self.tile, -(-work // self.tile)))
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._predict(step, mid * self.tile) <= self.target_us:
                    lo = mid
                else:
                    hi = mid - 1
            cap = lo * self.tile
        if cap <= step.num_decodes:
            return StepBudget(step.num_decodes, step.num_decodes, 0, 0, self._predict(step, step.num_decodes))
        spec, prefill = step.grant(cap)
        tokens = min(cap, max(self.tile, -(-work // self.tile) * self.tile))
        return StepBudget(tokens, step.num_decodes, spec, prefill, self._predict(step, cap))

    def _predict(self, step: _Load, cap: int) -> float:
        spec, prefill = step.grant(cap)
        kv, pairs = step.decode_cost(spec)
        for prefix_len, chunk in step.chunks(prefill):
            chunk_kv, chunk_pairs = prefill_chunk_cost(prefix_len, chunk)
            kv, pairs = kv + chunk_kv, pairs + chunk_pairs
        return self.model.step_us(step.num_decodes + spec + prefill, kv, pairs)


class _Load:
    """One step's load with prefix sums, so that costing a cap is O(log decodes + prefills)."""

    def __init__(self, context_lens, spec_tokens, prefills, tree_budget) -> None:
        self.context_lens = _counts("decode_context_lens", context_lens)
        self.num_decodes = len(self.context_lens)
        if isinstance(spec_tokens, int):
            spec = _counts("spec_tokens", [spec_tokens]) * self.num_decodes
        else:
            spec = _counts("spec_tokens", spec_tokens)
            if len(spec) != self.num_decodes:
                raise ValueError(f"spec_tokens: {len(spec)} entries for {self.num_decodes} decodes")
        if tree_budget is not None:
            _counts("tree_budget", [tree_budget])
        self.spec_cum = [0, *accumulate(spec)]
        self.spec_allowed = self.spec_cum[-1] if tree_budget is None else min(tree_budget, self.spec_cum[-1])
        self.spec_pairs_cum = [0, *accumulate(draft_cost(n, s)[1] for n, s in zip(self.context_lens, spec))]
        self.base_kv = self.base_pairs = sum(self.context_lens)  # one query per decode
        self.prefills = [Prefill(*p) for p in prefills]
        _counts("prefills", [n for p in self.prefills for n in p])
        self.prefill_work = sum(p.remaining for p in self.prefills)

    def grant(self, cap: int) -> tuple[int, int]:
        """(draft tokens, prompt tokens) granted under ``cap`` after the decodes."""
        left = max(cap - self.num_decodes, 0)
        spec = min(self.spec_allowed, left)
        return spec, min(self.prefill_work, left - spec)

    def decode_cost(self, spec: int) -> tuple[int, int]:
        """(kv_tokens, attn_pairs) of the decodes when the first ``spec`` draft tokens (in order) run."""
        full = bisect_right(self.spec_cum, spec) - 1  # decodes [0, full) keep all their drafts
        kv, pairs = self.base_kv + spec, self.base_pairs + self.spec_pairs_cum[full]
        part = spec - self.spec_cum[full]
        if part:
            pairs += draft_cost(self.context_lens[full], part)[1]
        return kv, pairs

    def chunks(self, prefill: int):
        """(prefix_len, chunk) of each prompt served by ``prefill`` prompt tokens, in order."""
        for prefix_len, remaining in self.prefills:
            if prefill <= 0:
                return
            chunk = min(remaining, prefill)
            yield prefix_len, chunk
            prefill -= chunk


def _counts(name: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    if not all(type(v) is int for v in values) or (values and min(values) < 0):
        raise ValueError(f"{name}: must be non-negative integers, got {values!r}")
    return values


def _config_default_budget(choice: ConfigChoice | None) -> int | None:
    if choice is None:
        return None
    budget = (choice.data.get("budgets") or {}).get("default_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"{choice.path}: field 'budgets.default_tokens' must be a positive integer, got {budget!r}")
    return budget
