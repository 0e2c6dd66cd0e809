"""Online calibration of the step-latency model from the engine's own measured steps.

The token budget (:mod:`tkernels.sched.budget`) and the tree proposer's size both come from a
:class:`~tkernels.sched.latency_model.LatencyModel`, whose rates come from the per-GPU config or,
without one, from the analytic H100-class default. On a machine nobody profiled (a CPU, a GPU
without a config) that default is wrong by orders of magnitude: on this project's 2-core CPU VM
a SmolLM2 decode step takes tens of milliseconds where the default predicts about 0.1 ms, so an
SLO-driven budget would grant a whole prompt per step and never hold the SLO.

:class:`OnlineCalibration` starts from those rates (the config's, else the default) and refits
them (:func:`~tkernels.sched.latency_model.fit_rates`) from the steps the engine actually runs:
each step's cost, (tokens, kv_tokens, attn_pairs) as the model defines them, and its measured
time. It refits every ``refit_s`` seconds (default 2) during the first ``settle_s`` seconds
(default 60) after the first measured step, then every ``slow_refit_s`` (default 30), over the
last ``window`` steps (default 512). A rate the steps do not constrain (e.g. the attention
rate before any long prompt came) keeps its previous ratio to its partner rate
(:func:`~tkernels.sched.latency_model.fit_rates`). Before ``min_steps`` measured
steps (default 16) the model is unchanged. Each refit also sets :attr:`OnlineCalibration.tail_ratio`,
the 95th percentile of measured / predicted over the window (at least 1): the fit predicts a
step's typical time, a TBT SLO bounds its tail, so the scheduler divides its step target by it.

The caller (the vLLM scheduler adapter) measures the steps, passes them to :meth:`record` and
swaps in the model :meth:`record` returns when it refits. With ``background=True`` (what the
scheduler uses) a fit runs in one helper thread while steps go on, and :meth:`record` returns
its model at the first call after it is done: a fit takes tens to hundreds of milliseconds on a
loaded CPU, which inline would stretch the step it lands in (the engine's forward runs in
another process there, so the thread mostly overlaps it). A fit that raises leaves the model
as it was (counted in ``failures``, the error in ``last_error``): calibration never stops the
engine. Everything here is plain Python and NumPy (SciPy for the fit, imported when the
calibration is built), with an injectable clock for tests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import numpy as np

from tkernels.checks import integer, real
from tkernels.config import ConfigChoice
from tkernels.sched.latency_model import DEFAULT_RATES, LatencyModel, LatencyRates, fit_rates

DEFAULT_WINDOW = 512
DEFAULT_MIN_STEPS = 16
DEFAULT_REFIT_S = 2.0
DEFAULT_SETTLE_S = 60.0
DEFAULT_SLOW_REFIT_S = 30.0
TAIL_QUANTILE = 0.95  # the measured / predicted ratio a step-time target is divided by (tail_ratio)


def rates_source(rates: LatencyRates, choice: ConfigChoice) -> str:
    """Where latency rates taken from :meth:`LatencyRates.from_config` with ``choice`` came from
    (the start-up log's wording, and :class:`OnlineCalibration`'s ``source``)."""
    if rates == DEFAULT_RATES:
        return f"the analytic H100-class default rates ({choice.reason})"
    return f"the latency_model section of {choice.path} ({choice.reason})"


class OnlineCalibration:
    """Refits a latency model's rates from measured steps (see the module docstring).

    ``model``: the starting model (its shape is kept, its rates are the fit's start);
    ``source``: where its rates came from, for :meth:`summary` and the log.
    """

    def __init__(self, model: LatencyModel, source: str, *, window: int = DEFAULT_WINDOW,
                 min_steps: int = DEFAULT_MIN_STEPS, refit_s: float = DEFAULT_REFIT_S,
                 settle_s: float = DEFAULT_SETTLE_S, slow_refit_s: float = DEFAULT_SLOW_REFIT_S,
                 background: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        import scipy.optimize  # noqa: F401  (here, not in the first fit: the import alone takes ~1 s on a loaded CPU)

        self.window = integer("window", window, minimum=1)
        self.min_steps = integer("min_steps", min_steps, minimum=1)
        self.refit_s = real("refit_s", refit_s, minimum=0, what="number of seconds")
        self.settle_s = real("settle_s", settle_s, minimum=0, what="number of seconds")
        self.slow_refit_s = real("slow_refit_s", slow_refit_s, minimum=0, what="number of seconds")
        self.start_model = self.model = model
        self.source = source
        self._clock = clock
        self._costs: deque[tuple[int, int, int]] = deque(maxlen=self.window)
        self._measured: deque[float] = deque(maxlen=self.window)
        self.steps = 0  # measured steps recorded, all of them
        self.refits = 0
        self.failures = 0
        self.last_error: str | None = None
        self.tail_ratio = 1.0  # TAIL_QUANTILE of measured / predicted over the window at the last refit, >= 1
        self._first: float | None = None
        self._last_fit: float | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tkernels-calibration") if background else None
        self._pending: Future | None = None

    @property
    def settled(self) -> bool:
        """Whether the first ``settle_s`` seconds of measured steps are over."""
        return self._first is not None and self._clock() - self._first >= self.settle_s

    def record(self, cost: tuple[int, int, int], measured_us: float) -> LatencyModel | None:
        """One measured step: ``cost`` (tokens, kv_tokens, attn_pairs), ``measured_us`` its time.
        Returns the refit model when this call refit it, else None."""
        tokens, kv, pairs = (integer("cost", c, minimum=0) for c in cost)
        measured_us = real("measured_us", measured_us, positive=True, what="number of microseconds")
        refit = self._collect()
        if tokens < 1:
            return refit
        now = self._clock()
        if self._first is None:
            self._first = now
        self._costs.append((tokens, kv, pairs))
        self._measured.append(measured_us)
        self.steps += 1
        if len(self._costs) < self.min_steps or self._pending is not None:
            return refit
        every = self.refit_s if now - self._first < self.settle_s else self.slow_refit_s
        if self._last_fit is not None and now - self._last_fit < every:
            return refit
        self._last_fit = now
        args = (self.model.shape, list(self._costs), list(self._measured), self.model.rates)
        if self._executor is not None:
            self._pending = self._executor.submit(_fit, *args)
            return refit
        return self._adopt(_fit(*args)) or refit

    def record_logged(self, cost: tuple[int, int, int], measured_us: float, logger, who: str) -> LatencyModel | None:
        """:meth:`record` for an engine component measuring its steps: a step without time or
        tokens is skipped, a failed fit is logged as a warning (the model is kept), and what the
        model learned at its first refit and at every refit once settled (``who``: the lines'
        prefix). Returns the refit model, else None."""
        if measured_us <= 0 or cost[0] < 1:
            return None
        failures = self.failures
        model = self.record(cost, measured_us)
        if self.failures > failures:
            logger.warning("%s: a latency-model fit failed (%s); the model is kept", who, self.last_error)
        if model is not None and (self.refits == 1 or self.settled):  # first fit, then every slow refit (30 s)
            logger.info("%s: %s", who, self.line())
        return model

    def wait(self) -> LatencyModel | None:
        """Wait for a fit running in the background (if any) and adopt it; returns the refit model."""
        if self._pending is not None:
            self._pending.exception()  # blocks until done
        return self._collect()

    def _collect(self) -> LatencyModel | None:
        if self._pending is None or not self._pending.done():
            return None
        pending, self._pending = self._pending, None
        return self._adopt(pending.result())

    def _adopt(self, fitted: LatencyRates | Exception) -> LatencyModel | None:
        if isinstance(fitted, Exception):
            self.failures += 1
            self.last_error = f"{type(fitted).__name__}: {fitted}"
            return None
        self.model = LatencyModel(self.model.shape, fitted)
        self.refits += 1
        # The model fits the steps' typical time (log residuals, soft-L1), but a TBT SLO is a tail
        # target: a step predicted at the target overruns it whenever the machine is slower than
        # usual (another process on the cores, a page fault). The ratio's upper quantile says by
        # how much; callers aiming at a deadline divide their target by it.
        ratios = np.asarray(self._measured) / self.model.steps_us(list(self._costs))
        self.tail_ratio = max(1.0, float(np.quantile(ratios, TAIL_QUANTILE))) if len(ratios) else 1.0
        return self.model

    def errors(self, model: LatencyModel | None = None) -> np.ndarray:
        """|predicted / measured - 1| of ``model`` (default: the current one) over the window."""
        model = model or self.model
        if not self._costs:
            return np.zeros(0)
        return np.abs(model.steps_us(list(self._costs)) / np.asarray(self._measured) - 1)

    def summary(self) -> dict:
        """What it learned: the rates, their source, and both models' errors over the window."""
        current, start = self.errors(), self.errors(self.start_model)
        median = (lambda e: float(np.median(e)) if len(e) else None)
        return {
            "source": self.source,
            "steps": self.steps,
            "window_steps": len(self._costs),
            "refits": self.refits,
            "failed_fits": self.failures,
            "last_error": self.last_error,
            "settled": self.settled,
            "rates": asdict(self.model.rates),
            "start_rates": asdict(self.start_model.rates),
            "fit_median_rel_error": median(current),
            "tail_ratio": self.tail_ratio,
            "start_median_rel_error": median(start),
        }

    def samples(self) -> dict:
        """The window's steps: costs, measured and predicted µs (the fit, shown against measurement)."""
        costs = list(self._costs)
        return {"costs": [list(c) for c in costs], "measured_us": list(self._measured),
                "predicted_us": self.model.steps_us(costs).tolist() if costs else []}

    def line(self) -> str:
        """One log line: what the model predicts now and how well it fits."""
        s = self.summary()
        model = self.model
        rates = ", ".join(f"{k} {v:.4g}" for k, v in s["rates"].items())
        error = "n/a" if s["fit_median_rel_error"] is None else f"{s['fit_median_rel_error']:.1%}"
        start = "n/a" if s["start_median_rel_error"] is None else f"{s['start_median_rel_error']:.0%}"
        return (f"latency model calibrated online from {s['window_steps']} of {s['steps']} measured steps "
                f"({s['refits']} refits, {'settled' if s['settled'] else 'settling'}; started from {self.source}): "
                f"{rates}; median error {error} (the starting model's: {start}); P{TAIL_QUANTILE * 100:g} of "
                f"measured / predicted x{self.tail_ratio:.2f}; predicts "
                f"{model.step_us(1, 1024, 1024) / 1e3:.1f} ms for 1 decode at 1k context, "
                f"{model.step_us(256, 256, 256 * 257 // 2) / 1e3:.1f} ms for a 256-token prompt chunk")


def _fit(shape, costs, measured_us, start) -> LatencyRates | Exception:
    """:func:`fit_rates`, its error returned instead of raised (it may run in a helper thread)."""
    try:
        return fit_rates(shape, costs, measured_us, start=start)
    except Exception as err:  # a failed fit keeps the model; the engine goes on
        return err
