"""Float helpers shared by tkernels' compiled host loops (numba, inlined into the loops that
call them): the CPU attention (:mod:`tkernels.attention.compiled_kernel`) and the top-k capture
(:mod:`tkernels.spec.host_topk_compiled`). Imported by those modules only (it loads numba)."""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit

__all__ = ["EXP_MIN", "FASTMATH", "exp_shifted"]

# Reassociation and contraction let the dot products, sums and updates vectorise; no "no infs":
# masked scores are -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

# exp(x) = 2^n exp(r), r = x - n ln 2 in [-ln2/2, ln2/2]: cephes' expf polynomial (relative error
# ~1e-7), vectorisable where libm's expf is one call per element.
LOG2E, LN2_HI, LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_MIN = -87.0  # exp below it is taken as exactly 0 (masked keys' -inf among them)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def exp_shifted(row, n, top, two_n):
    """``row[:n] = exp(row[:n] - top)`` in place (``two_n``: int32 scratch of >= n)."""
    c0, c1, c2, c3, c4, c5 = EXP_POLY
    for j in range(n):
        x = row[j] - top
        keep = x >= EXP_MIN
        x = max(x, EXP_MIN)
        t = np.floor(x * LOG2E + 0.5)
        r = x - t * LN2_HI - t * LN2_LO
        p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
        row[j] = (p * r * r + r + 1.0) if keep else 0.0
        two_n[j] = (np.int32(t) + 127) << 23
    scale = two_n[:n].view(np.float32)
    for j in range(n):
        row[j] *= scale[j]
