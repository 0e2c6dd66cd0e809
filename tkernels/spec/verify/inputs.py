"""Input handling shared by the verification launchers and references: the tree batch and
sampling checks, the per-node processing (temperature, top-k/top-p thresholds, greedy rows)
and the children of every node.

Host trees (:func:`check_trees`: a server's step, and the public launchers' one read back of
the trees) are validated and described by one compiled loop
(:func:`tkernels.spec.verify.trees_compiled.tree_tables`, numba, imported on first use);
:func:`check_trees_reference` is its plain-PyTorch reference."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tkernels.checks import fail, in_unit_interval, require
from tkernels.spec.tree import depths, validate_parents
from tkernels.spec.tree_contract import _check_cu_nodes_tensor, _check_parents_tensor

# The uniforms table the sampling kernels read (float32 [total_nodes, UNIFORM_COLUMNS], one row
# per node): column ACCEPT_COLUMN decides the node's acceptance test against its parent's
# distribution, DRAW_COLUMN the token drawn at the node (a residual after a rejection, or the
# bonus token). Kernels take these as constexprs (kernels.UNIFORM_CONSTEXPRS).
UNIFORM_COLUMNS, ACCEPT_COLUMN, DRAW_COLUMN = 2, 0, 1

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS, so a server's greedy rows agree).
GREEDY_TEMPERATURE = 1e-5


class NonFiniteLogitsError(ValueError):
    """``logits`` hold NaN or +inf, a node has no finite logit, or ``logit / T`` overflows.

    ``requests``: the batch indices of the offending requests (a server fails those alone).
    """

    def __init__(self, message: str, requests: list[int]):
        super().__init__(message)
        self.requests = requests


class _Shape(NamedTuple):
    width: int  # max depth + 1: the output rows' length
    max_nodes: int
    max_children: int
    row_max: torch.Tensor  # float32[total_nodes]: every node's largest logit (finite)
    # int32 [2, total_nodes] on the logits' device: every node's first child and number of
    # children (:func:`_children`'s table), where the checks have it (else the walks derive it)
    children: torch.Tensor | None = None


class CheckedTrees(NamedTuple):
    """A batch of trees checked once on the host (:func:`check_trees`): the sizes and the
    children table verification would otherwise read back from the device or derive on every
    call. ``children`` is where :func:`check_trees` built it (the host); :meth:`to` moves it once
    to the device the trees are verified on (a copy elsewhere is not used: the launchers then
    derive the table themselves)."""

    width: int  # max depth + 1
    max_nodes: int
    max_children: int
    # int32 [2, total_nodes]: every node's first child (global index; total_nodes if none) and
    # its number of children, :func:`_children`'s table (None: not built)
    children: torch.Tensor | None = None

    def to(self, device) -> CheckedTrees:
        """The same trees with their children table on ``device`` (one copy)."""
        return self if self.children is None else self._replace(children=self.children.to(device))


def _sizes(par: torch.Tensor, cu: torch.Tensor, node_depths: torch.Tensor | None = None) -> CheckedTrees:
    """The output width and per-tree size bounds of valid host trees (``par``, ``cu`` int64)."""
    sizes = cu[1:] - cu[:-1]
    global_parents = torch.where(par >= 0, par + torch.repeat_interleave(cu[:-1], sizes), -1)
    children = torch.bincount(global_parents[par >= 0], minlength=par.numel())
    node_depths = depths(par, cu) if node_depths is None else node_depths
    return CheckedTrees(int(node_depths.max()) + 1, int(sizes.max()), int(children.max()) if par.numel() else 0)


def _compiled():
    """:mod:`tkernels.spec.verify.trees_compiled`, imported on first use (it loads numba)."""
    from tkernels.spec.verify import trees_compiled

    return trees_compiled


def check_trees(parents: torch.Tensor, cu_nodes: torch.Tensor, node_depths: torch.Tensor | None = None) -> CheckedTrees:
    """Validate a batch of trees held on the host (the tree contract, ``spec.tree.validate_parents``)
    once and return what verification needs of them, for a caller that verifies the same trees
    with ``checked=`` (a server's step: its trees are built on the host anyway; ``.to(device)``
    moves the children table to the device once). One compiled pass
    (:func:`~tkernels.spec.verify.trees_compiled.tree_tables`; the same result and errors as
    :func:`check_trees_reference`). ``node_depths``: the nodes' depths when the caller has them;
    the pass derives them in its loop, only the reference reads them."""
    if parents.device.type != "cpu" or cu_nodes.device.type != "cpu":
        fail("parents", "check_trees takes the host copy of the trees (a device copy would cost a sync)")
    _check_parents_tensor(parents)
    _check_cu_nodes_tensor(parents, cu_nodes)
    valid, width, max_nodes, max_children, children = _compiled().tree_tables(parents.numpy(), cu_nodes.numpy())
    if not valid:
        validate_parents(parents, cu_nodes)  # raises the contract's error
        raise AssertionError("check_trees: the compiled pass refused trees validate_parents accepts")
    return CheckedTrees(int(width), int(max_nodes), int(max_children), torch.from_numpy(children))


def check_trees_reference(parents: torch.Tensor, cu_nodes: torch.Tensor,
                          node_depths: torch.Tensor | None = None) -> CheckedTrees:
    """Plain-PyTorch :func:`check_trees` (same inputs, result and errors)."""
    if parents.device.type != "cpu" or cu_nodes.device.type != "cpu":
        fail("parents", "check_trees takes the host copy of the trees (a device copy would cost a sync)")
    validate_parents(parents, cu_nodes)
    par, cu = parents.long(), cu_nodes.long()
    first, count = _children(par, cu)
    return _sizes(par, cu, None if node_depths is None else node_depths.long())._replace(
        children=torch.stack([first, count]).int())


def _check_tree_batch(logits, draft_tokens, parents, cu_nodes, row_max_pass=None, checked: CheckedTrees | None = None,
                      finite: bool = True) -> _Shape:
    """Validate the common inputs; return the output width and the per-tree size bounds.
    ``row_max_pass``: a callable launching a pass over the (shape-checked) logits that returns
    every node's largest logit, float32[total_nodes] with NaN for rows holding one (the argmax
    pass of :func:`verify_greedy`); default a torch ``amax``. ``checked``: the trees' sizes from
    :func:`check_trees` (the trees and the draft tokens' range are trusted: the one device read
    left is whether some logits are unusable; ``finite`` False: not even that, the caller reads
    it with its own flags)."""
    for name, t in (("logits", logits), ("draft_tokens", draft_tokens), ("parents", parents), ("cu_nodes", cu_nodes)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits must be [total_nodes, vocab] fp32/fp16/bf16, got {tuple(logits.shape)} {logits.dtype}")
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        raise ValueError(f"logits must have a non-empty, contiguous vocab dimension, got shape {tuple(logits.shape)} strides {logits.stride()}")
    if draft_tokens.dim() != 1 or draft_tokens.dtype != torch.int64:
        raise ValueError(f"draft_tokens must be int64[total_nodes], got {tuple(draft_tokens.shape)} {draft_tokens.dtype}")
    if parents.dim() != 1 or parents.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents must be int32[total_nodes], got {tuple(parents.shape)} {parents.dtype}")
    if cu_nodes.dim() != 1 or cu_nodes.numel() < 1 or cu_nodes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_nodes must be int32[B+1], got {tuple(cu_nodes.shape)} {cu_nodes.dtype}")
    n = logits.shape[0]
    if draft_tokens.numel() != n or parents.numel() != n:
        raise ValueError(
            f"logits, draft_tokens and parents must all have total_nodes rows: logits {n}, "
            f"draft_tokens {draft_tokens.numel()}, parents {parents.numel()}"
        )
    if cu_nodes.numel() == 1:  # empty batch
        if n != 0 or int(cu_nodes[0]) != 0:
            raise ValueError(f"cu_nodes = {cu_nodes.tolist()} describes no request but there are {n} nodes")
        return _Shape(1, 0, 0, logits.new_empty(0, dtype=torch.float32))
    if checked is not None:
        if not isinstance(checked, CheckedTrees):
            fail("checked", f"must be the CheckedTrees of check_trees, got {type(checked).__name__}")
        row_max = logits.amax(-1).float() if row_max_pass is None else row_max_pass()
        # The one device read of a checked call: the row maxima's sum, finite unless some maximum
        # is NaN or +-inf (or finite maxima overflow float32 together: then the exact test decides).
        if finite and not math.isfinite(row_max.sum().item()) and not bool(torch.isfinite(row_max).all()):
            _raise_non_finite(~torch.isfinite(row_max), cu_nodes, "hold NaN or +inf, or no finite logit (all -inf)")
        children = checked.children
        if children is not None and (children.device != logits.device or children.shape != (2, n)):
            children = None  # a table elsewhere (or of other trees): the walks derive their own
        return _Shape(checked.width, checked.max_nodes, checked.max_children, row_max, children)
    if n == 0:
        validate_parents(parents, cu_nodes)  # raises: requests without nodes
    # One device-to-host copy (a few KB) of the tree, the token range and the number of nodes
    # whose largest logit is not finite (NaN propagates through amax; +inf and all -inf show).
    row_max = logits.amax(-1).float() if row_max_pass is None else row_max_pass()
    lo_hi = torch.stack(torch.aminmax(draft_tokens))
    bad_rows = (~torch.isfinite(row_max)).sum()[None]
    host = torch.cat([parents.long(), cu_nodes.long(), lo_hi, bad_rows]).cpu()
    par, cu, (lo, hi, bad) = host[:n], host[n:-3], host[-3:].tolist()
    trees = check_trees(par, cu)  # validate_parents' checks and errors
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"draft_tokens must lie in [0, {logits.shape[1]}) (the vocab), got range [{lo}, {hi}]")
    if bad:
        _raise_non_finite(~torch.isfinite(row_max), cu, "hold NaN or +inf, or no finite logit (all -inf)")
    return _Shape(trees.width, trees.max_nodes, trees.max_children, row_max, trees.children.to(logits.device))


def _raise_non_finite(bad_nodes: torch.Tensor, cu_nodes: torch.Tensor, why: str):
    """Raise :class:`NonFiniteLogitsError` for the requests owning ``bad_nodes`` (bool[total_nodes])."""
    rows = bad_nodes.nonzero().flatten().cpu()
    requests = sorted(set((torch.searchsorted(cu_nodes.cpu().long(), rows, right=True) - 1).tolist()))
    raise NonFiniteLogitsError(
        f"logits: the rows of request{'s' if len(requests) > 1 else ''} {', '.join(map(str, requests))} {why} "
        f"(nodes {rows[:8].tolist()}{' ...' if rows.numel() > 8 else ''}); the model's scores are unusable",
        requests,
    )


def _processing_checks(batch: int, device, temperature, top_k, top_p) -> list:
    """Check the types and shapes of the sampling parameters of ``batch`` requests; return the
    :func:`require` checks of their values (read back with the caller's other checks)."""
    for name, t, floating in (("temperature", temperature, True), ("top_k", top_k, False), ("top_p", top_p, True)):
        if t is None and name != "temperature":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (batch,) or t.is_floating_point() != floating \
                or t.dtype == torch.bool:
            kind = "float" if floating else "integer"
            fail(name, f"must be a {kind} tensor [B={batch}]{'' if name == 'temperature' else ' or None'}, "
                       f"got {getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}")
        if t.device != device:
            fail(name, f"is on {t.device} but logits is on {device}")
    checks = [("temperature", "must be finite (NaN and inf are not temperatures)", torch.isfinite(temperature).all())]
    if top_p is not None:
        checks.append(("top_p", "must lie in (0, 1]", ((top_p > 0) & (top_p <= 1)).all()))
    return checks


def _check_sampling(logits, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, row_max, checked=False):
    """Validate the sampling inputs of a checked tree batch (kernels and references alike);
    return :func:`_processing`'s per-node ``(inv_temp, thr, greedy)``. ``checked``: the values
    are trusted (a server's validated sampling parameters, uniforms it drew) and the logits'
    finiteness, not read by :func:`_check_tree_batch` (``finite=False``), is read here with the
    temperature overflow in one device read."""
    n, device = logits.shape[0], logits.device
    checks = _processing_checks(cu_nodes.numel() - 1, device, temperature, top_k, top_p)
    if uniforms is not None and (not isinstance(uniforms, torch.Tensor) or uniforms.shape != (n, UNIFORM_COLUMNS)
                                 or uniforms.dtype != torch.float32 or uniforms.device != device
                                 or not uniforms.is_contiguous()):
        fail("uniforms", f"must be a contiguous float32[{n}, {UNIFORM_COLUMNS}] tensor on {device}, got {_describe(uniforms)}")
    if draft_probs is not None and (not isinstance(draft_probs, torch.Tensor) or draft_probs.shape != logits.shape
                                    or draft_probs.dtype != torch.float32 or draft_probs.device != device
                                    or draft_probs.stride(1) != 1):
        fail("draft_probs", f"must be float32{list(logits.shape)} on {device} with a contiguous vocab dim, "
                            f"got {_describe(draft_probs)}")
    if checked:
        inv_temp, thr, greedy = _processing(logits, cu_nodes, temperature, top_k, top_p, row_max)
        bad = ~torch.isfinite(row_max)
        overflow = ~torch.isfinite(row_max * inv_temp)
        if n:
            any_bad, any_overflow = torch.stack([bad.any(), overflow.any()]).tolist()  # one device read
            if any_bad:
                _raise_non_finite(bad, cu_nodes, "hold NaN or +inf, or no finite logit (all -inf)")
            if any_overflow:
                _raise_non_finite(overflow, cu_nodes, "overflow float32 when divided by the temperature")
        return inv_temp, thr, greedy
    if uniforms is not None:
        checks.append(in_unit_interval("uniforms", uniforms))
    if draft_probs is not None:  # probabilities: each at most 1, which keeps greedy rows exact
        checks.append(("draft_probs", "must hold probabilities in [0, 1] (no NaN, inf or negative values)",
                       ((draft_probs >= 0) & (draft_probs <= 1)).all()))
    require(*checks)
    inv_temp, thr, greedy = _processing(logits, cu_nodes, temperature, top_k, top_p, row_max)
    overflow = ~torch.isfinite(row_max * inv_temp)
    if n and bool(overflow.any()):
        _raise_non_finite(overflow, cu_nodes, "overflow float32 when divided by the temperature")
    return inv_temp, thr, greedy


def _per_node(values: torch.Tensor, cu_nodes: torch.Tensor, total: int) -> torch.Tensor:
    return torch.repeat_interleave(values, (cu_nodes[1:] - cu_nodes[:-1]).long(), output_size=total)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _greedy_requests(temperature, top_k) -> torch.Tensor:
    """bool[B]: T below GREEDY_TEMPERATURE, or top_k = 1 (SGLang's greedy rows: T = 1, top_k = 1)."""
    greedy = temperature < GREEDY_TEMPERATURE
    return greedy if top_k is None else greedy | (top_k == 1)


def _processing(logits, cu_nodes, temperature, top_k, top_p, row_max=None):
    """Per node: 1/T (1 for greedy), the kept-logit threshold (top-k then top-p; the row max for
    greedy requests, :func:`_greedy_requests`) and whether the node is greedy: fp32, fp32, bool
    [total_nodes]. ``row_max``: the nodes' largest logits when the caller has them."""
    n, vocab = logits.shape
    temp = _per_node(temperature.float(), cu_nodes, n)
    greedy = _per_node(_greedy_requests(temperature, top_k), cu_nodes, n)
    inv_temp = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, temp))
    x = logits.float()
    thr = torch.full((n,), float("-inf"), device=logits.device)
    if n and (top_k is not None or top_p is not None):
        ranked = x.sort(dim=-1, descending=True).values
        if top_k is not None:
            k = _per_node(top_k.long(), cu_nodes, n)
            k = torch.where((k <= 0) | (k > vocab), vocab, k)
            thr = ranked.gather(1, (k - 1)[:, None]).squeeze(1)
        if top_p is not None:
            scaled = torch.where(ranked >= thr[:, None], ranked * inv_temp[:, None], float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            mass_before = probs.cumsum(-1) - probs
            kept = (mass_before < _per_node(top_p.float(), cu_nodes, n)[:, None]).sum(-1).clamp(min=1)
            thr = torch.maximum(thr, ranked.gather(1, (kept - 1)[:, None]).squeeze(1))
    if row_max is None:
        row_max = x.amax(-1) if n else thr
    thr = torch.where(greedy, row_max, thr)
    return inv_temp.contiguous(), thr.contiguous(), greedy


def _children(parents: torch.Tensor, cu_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every node's first child (global index; ``total_nodes`` if it has none) and its number of
    children, int64[total_nodes] each, on the trees' device and without a host sync. BFS
    order makes a node's children the contiguous run starting at its first child."""
    n = parents.numel()
    node = torch.arange(n, device=parents.device)
    start = _per_node(cu_nodes[:-1].long(), cu_nodes, n)
    slot = torch.where(parents.long() >= 0, parents.long() + start, n)  # roots land in a spare slot
    first = torch.full((n + 1,), n, dtype=torch.long, device=parents.device).scatter_reduce_(0, slot, node, "amin")
    count = torch.zeros(n + 1, dtype=torch.long, device=parents.device).scatter_add_(0, slot, torch.ones_like(node))
    return first[:n], count[:n]
