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
the work there is (rounded up to a tile), but at least one tile. A prefill chunk's attention
cost grows with its cached prefix, so the chunk shrinks as its prompt advances. A step without
any running decode has no inter-token latency to protect: τ is then the work (rounded up to a
tile, within ``max_tokens``), so prompts arriving at an idle server run whole, not in chunks that
would only add steps to their time to first token.

**Ageing bound** (no prompt starves). One tile is not enough for prompts to progress: with as
many decodes as a tile (16 decodes under a 0.5 ms SLO, 64 at 2 ms) the decodes fill it, and
drafts fill whatever the SLO leaves (40 decodes x 63 draft tokens at 30 ms), so a waiting
prompt could get 0 tokens for as long as that load lasts. Hence: once some prompt has waited
longer than ``max_wait_ms`` (:class:`Prefill`'s ``waited_ms``, measured by the server adapter
with :class:`WaitClock`), every step grants prompts at least one tile (or their whole rest),
taken right after the decodes and before the drafts, in serving order. The trade-off with the
SLO: the reserved tile displaces drafts first, so the step still meets the SLO whenever the
decodes plus one tile do; only when the decodes alone (nearly) reach the SLO does the step
exceed it, by one tile of prefill (its predicted cost is in ``predicted_us``). A smaller bound
gives prompts a shorter worst-case wait before they start and costs the decodes that step
time (or drafts) sooner under overload; ``float('inf')`` is not accepted, since it would bring
starvation back. Default :data:`DEFAULT_MAX_WAIT_MS` = 500 ms (a judgement, not a measurement:
well below usual time-to-first-token targets of seconds, far above one step); set it with the
``max_wait_ms`` argument (vLLM: ``--additional-config '{"tkernels_sched": {"max_wait_ms": ...}}'``)
or ``$TKERNELS_MAX_WAIT_MS``.

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

import os
import time
from bisect import bisect_right
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

from tkernels.checks import fail, integer, real
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
ENV_MAX_WAIT_MS = "TKERNELS_MAX_WAIT_MS"
FALLBACK_BUDGET = 512
DEFAULT_TILE = 16
DEFAULT_MARGIN = 0.1
DEFAULT_MAX_WAIT_MS = 500.0


class Prefill(NamedTuple):
    """A prompt still being computed: ``prefix_len`` tokens cached, ``remaining`` still to run,
    ``waited_ms`` since it started waiting (the ageing bound's clock; :class:`WaitClock`)."""

    prefix_len: int
    remaining: int
    waited_ms: float = 0.0


class WaitClock:
    """How long each waiting prompt has waited: milliseconds since it was first listed.

    A server adapter keeps one per scheduler and calls :meth:`waited_ms` with the keys (request
    ids) of the prompts it passes to :meth:`DecodeMaximalPolicy.plan`, in the same order. A key
    missing from a call is forgotten (the prompt was admitted, finished or left the window).
    ``clock``: seconds, monotonic (default :func:`time.monotonic`; tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[Hashable, float] = {}

    def waited_ms(self, keys: Sequence[Hashable]) -> list[float]:
        now = self._clock()
        self._since = {key: self._since.get(key, now) for key in keys}
        return [(now - self._since[key]) * 1e3 for key in keys]


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
    ``$TKERNELS_TBT_SLO_MS``, else a fixed budget); ``max_tokens`` the server's largest step;
    ``max_wait_ms`` the ageing bound (None: ``$TKERNELS_MAX_WAIT_MS``, else
    :data:`DEFAULT_MAX_WAIT_MS`; finite, >= 0). ``rates`` and ``default_budget`` override the
    per-GPU config (``choice``, default: current GPU).
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
        max_wait_ms: float | None = None,
        choice: ConfigChoice | None = None,
    ) -> None:
        tile = integer("tile", tile, minimum=1)
        max_tokens = integer("max_tokens", max_tokens, minimum=tile)
        if not (isinstance(margin, (int, float)) and 0 <= margin < 1):
            raise ValueError(f"margin: must be in [0, 1), got {margin!r}")
        slo_ms = _from_env(slo_ms, ENV_TBT_SLO_MS)
        if slo_ms is not None:
            slo_ms = real("slo_ms", slo_ms, positive=True, what="number of milliseconds")
        max_wait_ms = _from_env(max_wait_ms, ENV_MAX_WAIT_MS)
        if max_wait_ms is not None:
            max_wait_ms = real("max_wait_ms", max_wait_ms, minimum=0, what="number of milliseconds")
        self.max_wait_ms = DEFAULT_MAX_WAIT_MS if max_wait_ms is None else max_wait_ms
        if default_budget is not None:
            default_budget = integer("default_budget", default_budget, minimum=1)

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
        ``prefills``: ``(prefix_len, remaining[, waited_ms])`` per prompt in serving order
        (running chunk first); ``tree_budget``: most draft tokens this step may verify (None: all
        proposed). Counts are Python or NumPy integers. Once a prompt has waited longer than
        ``max_wait_ms``, prompts get at least one tile (the ageing bound, module docstring).
        """
        step = _Load(decode_context_lens, spec_tokens, prefills, tree_budget)
        step.reserve = min(self.tile, step.prefill_work) if step.max_waited_ms > self.max_wait_ms else 0
        work = step.num_decodes + step.spec_allowed + step.prefill_work
        # The most tiles a step may hold: the work rounded up to a tile (a cap past the work
        # grants nothing more), within the buffer, at least one tile (prompts always progress).
        most = max(1, min(self.max_tokens // self.tile, -(-work // self.tile)))
        if self.target_us is None:
            cap = self.fixed_budget
        elif not step.num_decodes:
            # No decode runs: the TBT SLO protects no one this step, and a prompt's first token
            # waits for its last chunk however it is cut, so the prompts run whole (up to the
            # buffer): chunking them anyway would only add steps to their time to first token.
            cap = most * self.tile
        else:
            # Largest tile multiple up to `most` whose granted step meets the target (at least
            # one tile, even where the SLO is unattainable).
            lo, hi = 1, most
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._predict(step, mid * self.tile) <= self.target_us:
                    lo = mid
                else:
                    hi = mid - 1
            cap = lo * self.tile
        cap = max(cap, step.num_decodes + step.reserve)  # the aged prompts' tile runs even past the SLO
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
        # A decode's keys include its new token: at least 1.
        self.context_lens = _counts("decode_context_lens", context_lens, minimum=1)
        self.num_decodes = len(self.context_lens)
        if not hasattr(spec_tokens, "__iter__"):  # one count for every decode
            spec = _counts("spec_tokens", [spec_tokens]) * self.num_decodes
        else:
            spec = _counts("spec_tokens", spec_tokens)
            if len(spec) != self.num_decodes:
                raise ValueError(f"spec_tokens: {len(spec)} entries for {self.num_decodes} decodes")
        if tree_budget is not None:
            tree_budget = integer("tree_budget", tree_budget, minimum=0)
        self.spec_cum = [0, *accumulate(spec)]
        self.spec_allowed = self.spec_cum[-1] if tree_budget is None else min(tree_budget, self.spec_cum[-1])
        self.spec_pairs_cum = [0, *accumulate(draft_cost(n, s)[1] for n, s in zip(self.context_lens, spec))]
        self.base_kv = self.base_pairs = sum(self.context_lens)  # one query per decode
        self.prefills = [_prefill(i, p) for i, p in enumerate(prefills)]
        self.prefill_work = sum(p.remaining for p in self.prefills)
        self.max_waited_ms = max((p.waited_ms for p in self.prefills), default=0.0)
        self.reserve = 0  # prompt tokens granted right after the decodes (the ageing bound's tile)

    def grant(self, cap: int) -> tuple[int, int]:
        """(draft tokens, prompt tokens) granted under ``cap`` after the decodes: the reserve
        first, then drafts, then the rest to prompts."""
        left = max(cap - self.num_decodes, 0)
        spec = min(self.spec_allowed, left - min(self.reserve, left))
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
        for prefix_len, remaining, _ in self.prefills:
            if prefill <= 0:
                return
            chunk = min(remaining, prefill)
            yield prefix_len, chunk
            prefill -= chunk


def _counts(name: str, values: Sequence[int], minimum: int = 0) -> list[int]:
    """Python ints from a sequence of Python or NumPy integers >= ``minimum``."""
    return [integer(name, v, minimum=minimum) for v in values]


def _prefill(i: int, entry: Any) -> Prefill:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) not in (2, 3):
        fail("prefills", f"entry {i} must be (prefix_len, remaining[, waited_ms]), got {entry!r}")
    prefix_len, remaining = _counts("prefills", entry[:2])
    waited = real("prefills", entry[2], minimum=0) if len(entry) == 3 else 0.0
    return Prefill(prefix_len, remaining, waited)


def _from_env(value: float | None, env: str) -> float | None:
    """``value``, else the number in ``$env`` (milliseconds), else None."""
    if value is not None or not os.environ.get(env):
        return value
    try:
        return float(os.environ[env])
    except ValueError:
        raise ValueError(f"${env}: must be a number of milliseconds, got {os.environ[env]!r}") from None


def _config_default_budget(choice: ConfigChoice | None) -> int | None:
    if choice is None:
        return None
    budget = (choice.data.get("budgets") or {}).get("default_tokens")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"{choice.path}: field 'budgets.default_tokens' must be a positive integer, got {budget!r}")
    return budget
