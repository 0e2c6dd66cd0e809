"""The top-k of host logits in compiled code: what the vLLM proposers capture of every target
step for Token Recycling, on vLLM-CPU: the ids (:func:`top_k_ids`), or the ids and their softmax
probabilities (:func:`top_k_probs`, the tree proposer's capture).

``torch.topk`` over a step's ``[rows, vocab]`` logits is a partial sort per row: about 4.5 ms for
72 rows of a 49k vocabulary on one core of the project's VM, paid by every tree step. Here one
compiled pass per row takes every block's maximum (``host_topk_compiled.SKIP_BLOCK`` values,
vectorised), then keeps the k best in a small sorted list, reading only the blocks whose maximum
beats the list's last: after the first few blocks almost none (about 3x less time than
torch.topk on those rows in fp32, 2x in bf16 and fp16, whose bits are widened first).

Values are compared through their bits, made order-preserving as integers (a float's bits with
the magnitude bits flipped when the sign bit is set, -0 made +0), so fp32, fp16 and bf16 (which
numba cannot read as floats) go through one kernel. Among equal values the lower id comes first
(``torch.topk`` leaves ties unordered); NaN rows are not meaningful logits (verification refuses them) and rank
as the bits say. On other devices, ``torch.topk``.

:func:`top_k_probs` of fp32 host logits (:func:`tkernels.spec.token_recycling.top_k_probs` is its
reference, and what other devices and dtypes run) finds each row's ids as above and sums the
row's exponentials right after, while the row is still in cache, with the vectorised exp of the
compiled attention (relative error ~1e-7): one pass over the logits from memory instead of
``torch.topk``'s and ``logsumexp``'s three, the rows spread over torch's threads. On the
project's 2-core VM, 135 rows of 49152 logits (a 26-request tree step), two threads: 16.9 ms
-> 6.3 ms.
"""

from __future__ import annotations

import numpy as np
import torch

from tkernels.checks import fail, integer
from tkernels.spec.token_recycling import top_k_probs as reference_top_k_probs

# Each dtype's integer view and the mask of its magnitude bits (all but the sign).
_INT_VIEWS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
              torch.bfloat16: (torch.int16, 0x7FFF)}


def top_k_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[rows, k]``: the ids of each row's k largest logits, largest first."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        fail("logits", f"must be a floating-point [rows, vocab] tensor, got {getattr(logits, 'shape', type(logits))}")
    if integer("k", k, minimum=1) > logits.shape[1]:
        fail("k", f"must be at most the vocabulary ({logits.shape[1]}), got {k}")
    view = _INT_VIEWS.get(logits.dtype)
    if logits.device.type != "cpu" or view is None or logits.shape[0] == 0:
        return logits.topk(k, dim=-1).indices
    bits = logits.contiguous().view(view[0]).numpy()
    out = torch.empty(logits.shape[0], k, dtype=torch.int64)
    _kernel()(bits, k, np.int32(view[1]), out.numpy())
    return out


def top_k_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tkernels.spec.token_recycling.top_k_probs` (its reference: the same arguments,
    checks and results, ids ordered as :func:`top_k_ids` among equal logits, probabilities to
    float32 rounding): int64 ``[rows, k]`` ids, best first, and float32 ``[rows, k]`` softmax
    probabilities; compiled for fp32 logits on the host."""
    if not isinstance(logits, torch.Tensor) or logits.device.type != "cpu" or logits.dtype != torch.float32 \
            or logits.dim() != 2 or not logits.shape[0]:  # the reference: other devices and dtypes, its errors
        return reference_top_k_probs(logits, k)
    if integer("k", k, minimum=1) > logits.shape[1]:
        fail("k", f"must be at most the vocabulary ({logits.shape[1]}), got {k}")
    from tkernels.jit import use_torch_threads
    from tkernels.spec.host_topk_compiled import top_k_probs_rows

    ids = torch.empty(logits.shape[0], k, dtype=torch.int64)
    probs = torch.empty(logits.shape[0], k, dtype=torch.float32)
    values = logits.contiguous()
    view, mag = _INT_VIEWS[torch.float32]
    use_torch_threads()
    top_k_probs_rows(values.numpy(), values.view(view).numpy(), k, np.int32(mag), ids.numpy(), probs.numpy())
    return ids, probs


def warm_up() -> None:
    """Load (or, on a machine's first run, compile) the kernels for 16- and 32-bit logits now,
    not in a server's first step."""
    for dtype in (torch.float32, torch.bfloat16):
        top_k_ids(torch.zeros(1, 2, dtype=dtype), 1)
    top_k_probs(torch.zeros(1, 2), 1)


def _kernel():
    from tkernels.spec.host_topk_compiled import top_k_rows

    return top_k_rows
