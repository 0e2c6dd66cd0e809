"""Input checks shared by the launchers, the tree contract and the scheduler.

One wording for every bad argument: ``ValueError("arg: why")``, the argument's name first. One
rule per idea, so that the kernels, their references and the server adapters agree on what
is accepted:

* counts and sizes are integers, Python's or NumPy's (anything ``operator.index`` takes), never
  ``bool`` and never a float that happens to be whole;
* scalars such as a softmax scale or a wait bound are finite real numbers;
* tensor values are checked where they live and read back to the host once per call
  (:func:`require`), since every read is a device synchronisation.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, NoReturn

import torch

__all__ = ["fail", "integer", "real", "require", "in_unit_interval", "probabilities"]


def fail(arg: str, why: str) -> NoReturn:
    """Raise ``ValueError("arg: why")``."""
    raise ValueError(f"{arg}: {why}")


def integer(arg: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (Python or NumPy integer; not bool, not float), ``>= minimum``."""
    kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    if isinstance(value, (bool, float)):
        fail(arg, f"must be {kind}, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        fail(arg, f"must be {kind}, got {value!r}")
    if minimum is not None and result < minimum:
        fail(arg, f"must be {kind}, got {result}")
    return result


def real(arg: str, value: Any, *, minimum: float | None = None, positive: bool = False, what: str = "number") -> float:
    """``value`` as a finite ``float`` (any real number type; not bool), ``> 0`` where
    ``positive``, ``>= minimum``; ``what`` names the quantity in the message ("number of ms")."""
    # a float first: the ABC check costs more than the rest, on paths called every layer
    if (type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real))) \
            or not math.isfinite(value) or (positive and not value > 0) or (minimum is not None and value < minimum):
        kind = "a positive" if positive else "a non-negative" if minimum == 0 else "a finite"
        bound = f" >= {minimum:g}" if minimum not in (None, 0) else ""
        fail(arg, f"must be {kind} {what}{bound}, got {value!r}")
    return float(value)


def require(*checks: tuple[str, str, torch.Tensor]) -> None:
    """Raise for the first failed ``(arg, why, ok)``, ``ok`` a 0-d bool tensor on any device;
    the flags are read back to the host together (one synchronisation for all)."""
    if not checks:
        return
    flags = torch.stack([ok.reshape(()).to(checks[0][2].device) for _, _, ok in checks]).tolist()
    for (arg, why, _), ok in zip(checks, flags):
        if not ok:
            fail(arg, why)


def in_unit_interval(arg: str, t: torch.Tensor) -> tuple[str, str, torch.Tensor]:
    """A :func:`require` check: every value of ``t`` in [0, 1) (NaN fails)."""
    return arg, "must lie in [0, 1) (uniform draws; NaN, negative or >= 1 values are not)", ((t >= 0) & (t < 1)).all()


def probabilities(arg: str, t: torch.Tensor) -> tuple[str, str, torch.Tensor]:
    """A :func:`require` check: every value of ``t`` finite and >= 0 (NaN fails)."""
    return arg, "must hold finite probabilities >= 0 (no NaN, inf or negative values)", ((t >= 0) & (t < math.inf)).all()
