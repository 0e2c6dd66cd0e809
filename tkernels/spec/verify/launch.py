"""Launchers of tree verification: :func:`verify_greedy` and :func:`verify_sampling`
(rules in :mod:`tkernels.spec.verify` and docs/design.md)."""

from __future__ import annotations

import torch

from tkernels.config import cdiv
from tkernels.spec.verify.inputs import (
    CheckedTrees,
    _check_sampling,
    _check_tree_batch,
    _children,
    _greedy_requests,
    _Shape,
)
from tkernels.spec.verify.kernels import (
    ARGMAX,
    MODE_CONSTEXPRS,
    REJECTION_MAXNREG,
    SAMPLE,
    STATS,
    UNIFORM_CONSTEXPRS,
    _node_pass_kernel,
    _path_walk_kernel,
    _rejection_tiles,
    _rejection_walk_kernel,
    _tiles,
    _walk_tiles,
    launch_config,
)
from tkernels.spec.verify.uniforms import draw_uniforms


def _empty_outputs(batch: int, width: int, device):
    return (
        torch.empty((batch, width), dtype=torch.int64, device=device),
        torch.empty((batch, width), dtype=torch.int32, device=device),
        torch.empty((batch,), dtype=torch.int32, device=device),
    )


def _node_pass(mode: int, logits, inv_temp, thr, uniforms, token, row_max, row_sum, cfg: dict) -> None:
    n, vocab = logits.shape
    block_r, block_v = _tiles(n, vocab, cfg)
    _node_pass_kernel[(cdiv(n, block_r),)](
        logits, logits.stride(0), n, vocab, inv_temp, thr, uniforms, token, row_max, row_sum,
        MODE=mode, **MODE_CONSTEXPRS, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=cfg["num_warps"],
    )


def _argmax_pass(logits, node_token, cfg: dict) -> torch.Tensor:
    """Every node's first maximal token into ``node_token``; returns the rows' largest logits
    (float32[total_nodes], NaN where a row holds one)."""
    row_max = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _node_pass(ARGMAX, logits, logits, logits, logits, node_token, row_max, logits, cfg)
    return row_max


def _walk_args(draft_tokens, parents, cu_nodes, shape: _Shape, out) -> tuple:
    """The tree and output arguments both walk kernels end with (the children table: the checks'
    where they built it, :func:`check_trees`, else derived on the trees' device)."""
    if shape.children is not None:
        first, count = shape.children
    else:
        first, count = (t.int() for t in _children(parents, cu_nodes))
    tokens, nodes, num = out
    return (draft_tokens, first, count, cu_nodes.int(), tokens, nodes, num, num.numel(), shape.width,
            shape.max_children)


def _walk(node_token, draft_tokens, parents, cu_nodes, shape: _Shape, out) -> None:
    batch = out[2].numel()
    block_b, block_c = _walk_tiles(batch, shape.max_children)
    _path_walk_kernel[(cdiv(batch, block_b),)](
        node_token, *_walk_args(draft_tokens, parents, cu_nodes, shape, out), BLOCK_B=block_b, BLOCK_C=block_c,
        num_warps=1,
    )


def verify_greedy(logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor, cu_nodes: torch.Tensor,
                  config: dict | None = None, *, checked: CheckedTrees | None = None):
    """Greedy tree verification -> (accepted_tokens int64[B, W], accepted_nodes int32[B, W],
    num_accepted int32[B]), W = max depth + 1. Chains are trees with parents[i] = i - 1.
    ``config``: launch parameters overriding the tuned ones (see :func:`launch_config`).
    ``checked``: :func:`check_trees` of the host copy of these trees, for a server that built and
    checked them once: the trees are not read back nor validated again, the draft tokens are
    trusted, and the call's one device read is whether some logits are unusable."""
    node_token = []

    def argmax_pass() -> torch.Tensor:  # runs before the host sync that checks its row maxima
        node_token.append(torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device))
        return _argmax_pass(logits, node_token[0], launch_config(logits.shape[1], config))

    shape = _check_tree_batch(logits, draft_tokens, parents, cu_nodes, argmax_pass, checked)
    batch = cu_nodes.numel() - 1
    out = _empty_outputs(batch, shape.width, logits.device)
    if batch == 0:
        return out
    _walk(node_token[0], draft_tokens, parents, cu_nodes, shape, out)
    return out


def verify_sampling(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_nodes: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    generators: dict[int, torch.Generator] | None = None,
    draft_probs: torch.Tensor | None = None,
    config: dict | None = None,
    checked: CheckedTrees | None = None,
):
    """Exact (lossless) sampling verification; same outputs as :func:`verify_greedy`.

    ``temperature`` float[B] (below :data:`GREEDY_TEMPERATURE`, 0 and negatives included:
    greedy, exactly :func:`verify_greedy`'s outputs for that request), ``top_k`` int[B] (<= 0 or
    >= vocab: off; 1: greedy, as SGLang writes its greedy rows), ``top_p`` float[B] in (0, 1];
    ``uniforms`` float32[total_nodes, 2] in [0, 1) (see the module doc) or else drawn by
    :func:`draw_uniforms` from ``generator`` / per-request ``generators``; ``draft_probs``
    float32[total_nodes, vocab] in [0, 1]: the distribution each node's children were sampled
    from (None for deterministic drafts); ``config``: launch parameters overriding the tuned
    ones (see :func:`launch_config`); ``checked``: as :func:`verify_greedy`'s, and the sampling
    values (temperature, top-p, uniforms, draft probabilities) are trusted too: the one device
    read left holds the unusable-logits and temperature-overflow flags.
    Raises :class:`NonFiniteLogitsError` for unusable logits (module doc).
    """
    shape = _check_tree_batch(logits, draft_tokens, parents, cu_nodes, checked=checked, finite=checked is None)
    cfg = launch_config(logits.shape[1], config)
    batch, (n, vocab) = cu_nodes.numel() - 1, logits.shape
    device = logits.device
    inv_temp, thr, greedy = _check_sampling(logits, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs,
                                            shape.row_max, checked is not None)
    out = _empty_outputs(batch, shape.width, device)
    if batch == 0:
        return out
    if uniforms is None:
        uniforms = draw_uniforms(cu_nodes, generator, generators)
    if draft_probs is None:
        # A greedy node keeps only its maximal logits (thr = row max); its draw at u = 0 is the
        # first token with positive mass: the first maximum, verify_greedy's tie rule.
        uniforms = torch.where(greedy[:, None] & (torch.arange(2, device=device) == 1), 0.0, uniforms)
        node_token = torch.empty(n, dtype=torch.int64, device=device)
        _node_pass(SAMPLE, logits, inv_temp, thr, uniforms, node_token, inv_temp, inv_temp, cfg)
        _walk(node_token, draft_tokens, parents, cu_nodes, shape, out)
        return out
    row_max = torch.empty(n, dtype=torch.float32, device=device)
    row_sum = torch.empty(n, dtype=torch.float32, device=device)
    _node_pass(STATS, logits, inv_temp, thr, uniforms, draft_tokens, row_max, row_sum, cfg)
    scratch = torch.empty((2, batch, vocab), dtype=torch.float32, device=device)
    block_b, block_v = _rejection_tiles(vocab, cfg)
    _rejection_walk_kernel[(cdiv(batch, block_b),)](
        logits, logits.stride(0), draft_probs, draft_probs.stride(0), vocab, inv_temp, thr, row_max, row_sum, uniforms,
        scratch[0], scratch[1], *_walk_args(draft_tokens, parents, cu_nodes, shape, out),
        **UNIFORM_CONSTEXPRS, BLOCK_B=block_b, BLOCK_V=block_v, num_warps=cfg["num_warps"],
        **(REJECTION_MAXNREG if device.type == "cuda" and torch.version.hip is None else {}),
    )
    greedy_requests = _greedy_requests(temperature, top_k)
    if bool(greedy_requests.any()):
        # The rejection walk keeps every tied maximum of a greedy node (p uniform over them);
        # with p one-hot at the first maximum it is the greedy walk, so run that for those rows.
        node_token = torch.empty(n, dtype=torch.int64, device=device)
        _argmax_pass(logits, node_token, cfg)
        greedy_out = _empty_outputs(batch, shape.width, device)
        _walk(node_token, draft_tokens, parents, cu_nodes, shape, greedy_out)
        out = tuple(torch.where(greedy_requests.view(-1, *[1] * (o.dim() - 1)), g, o) for g, o in zip(greedy_out, out))
    return out
