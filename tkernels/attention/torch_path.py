"""Mixed-batch attention in vectorised PyTorch: the fast CPU path (no Triton, no Python loop
per request or per tree node in a layer).

Two halves, as the Triton path: :func:`plan_torch_attention` once per step (shared by every
layer) and :func:`mixed_attention_torch` once per layer.

The plan sorts the batch's requests into *groups*, each one padded batch of attention problems:

* the *short* requests (decodes, trees, and causal requests of at most ``SHORT_MAX_Q`` new
  tokens) in a few groups of similar context (up to ``MAX_SHORT_GROUPS``), each padded to its
  longest in queries and keys: their K/V gathers and matmuls are too small to run one request
  at a time without Python overhead dominating;
* one group per query tile (``LONG_Q_TILE`` tokens) of each longer request (prefill chunks,
  few per step), whose keys end at the tile's causal frontier.

Per group the plan holds the K/V blocks to gather (block-table entries; whole blocks, so the
cache is read block by block), the rows of ``q``/``out`` and an additive fp32 mask (0 or -inf)
that folds in the causal or tree visibility (trees unpacked from
:func:`tkernels.spec.tree.ancestor_bits`), the sliding window over positions and the padding.
A layer gathers K/V through the block ids (one indexing op each, in a
``[kv_heads, requests, keys, head_dim]`` layout) and runs torch's fused attention on them in
fp32 (``scaled_dot_product_attention`` with the mask and the GQA mapping: on a CPU its flash
kernel), storing in the output's dtype; with a softcap, which the fused kernel does not apply,
it computes the logits with the GQA group folded into the query rows (no K/V repeat), caps
them, adds the mask and softmaxes.

Padding keys (slots past a request's context in its last block, and block 0 for the columns a
shorter request of the group does not use) are read and weighted by exactly 0, so they must
hold finite values: vLLM zero-fills its caches, and every slot it has written is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tkernels.attention.launch import _check_inputs
from tkernels.attention.plan import BatchLayout, HostBatch, describe_batch
from tkernels.checks import fail as _fail
from tkernels.checks import real

# Causal requests with at most this many new tokens join the padded short group (padding a
# decode to a 16-token chunk costs little; to a 512-token chunk, the chunk's whole cost again).
SHORT_MAX_Q = 16
# Short requests are padded to their group's longest context: a group is split in two (at most
# MAX_SHORT_GROUPS in all) where that saves more padded request-blocks than this, about what a
# group's fixed cost per layer (a dozen torch calls) is worth in gathered and multiplied blocks.
SPLIT_SAVING_BLOCKS = 32
MAX_SHORT_GROUPS = 4
# Longer requests run in query tiles of this many tokens: bounds the fp32 logits of one tile
# (heads x 256 x keys) and lets early tiles skip the keys past their causal frontier.
LONG_Q_TILE = 256


@dataclass(frozen=True)
class AttentionGroup:
    """One padded batch of ``R`` attention problems with ``Lq`` query rows and ``Lk`` keys each."""

    q_rows: torch.Tensor  # int64 [R * Lq]: the row of q read for each padded query (padding: row 0)
    real: torch.Tensor  # int64 [n]: which padded queries are real tokens
    out_rows: torch.Tensor  # int64 [n]: their rows in out
    blocks: torch.Tensor  # int64 [R * Lk / block_size]: cache blocks holding each problem's keys, problem after problem
    bias: torch.Tensor  # float32 [R, 1, Lq, Lk]: 0 where visible, -inf elsewhere

    def to(self, device: torch.device) -> AttentionGroup:
        return AttentionGroup(*(t.to(device) for t in (self.q_rows, self.real, self.out_rows, self.blocks, self.bias)))


@dataclass(frozen=True)
class TorchAttentionPlan:
    """Per-step plan of :func:`mixed_attention_torch`, shared by every layer."""

    groups: tuple[AttentionGroup, ...]
    num_tokens: int
    batch: int
    num_q_heads: int
    num_kv_heads: int
    block_size: int
    window: int | None


def plan_torch_attention(
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    tree_parents: torch.Tensor | None = None,
    is_tree: torch.Tensor | None = None,
    window: int | None = None,
    num_tokens: int | None = None,
    host: HostBatch | None = None,
    checked: bool = False,
) -> TorchAttentionPlan:
    """Validate the batch (as :func:`tkernels.attention.plan_mixed_attention` does, same
    arguments and messages; ``host`` and ``checked`` as :func:`~tkernels.attention.plan.describe_batch`)
    and build the groups (host work, vectorised per group)."""
    layout = describe_batch(cu_seqlens_q, seq_lens, block_table, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, num_blocks=num_blocks, block_size=block_size,
                            tree_parents=tree_parents, is_tree=is_tree, window=window, num_tokens=num_tokens,
                            host=host, checked=checked)
    return plan_from_layout(layout, block_table, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                            block_size=block_size)


def is_short(layout: BatchLayout) -> torch.Tensor:
    """bool [B]: the requests planned as short (trees, causal ones of at most SHORT_MAX_Q new tokens)."""
    return (layout.tree_req | (layout.q_len <= SHORT_MAX_Q)) & (layout.q_len > 0)


def plan_from_layout(layout: BatchLayout, block_table: torch.Tensor, *, num_q_heads: int, num_kv_heads: int,
                     block_size: int, long_only: bool = False) -> TorchAttentionPlan:
    """The groups of a checked batch (``long_only``: the long requests' alone; the compiled CPU
    path runs the others)."""
    table = block_table.cpu().long()
    q_len = layout.q_len
    short = is_short(layout)
    problems = [] if long_only else [(reqs, None) for reqs in _buckets(short.nonzero().flatten(), layout.ctx, block_size)]
    for r in (~short & (q_len > 0)).nonzero().flatten().tolist():  # long requests: few per step
        for start in range(0, int(q_len[r]), LONG_Q_TILE):
            problems.append((torch.tensor([r]), (start, min(int(q_len[r]) - start, LONG_Q_TILE))))
    groups = tuple(_group(layout, table, reqs, tile, block_size).to(layout.device) for reqs, tile in problems)
    return TorchAttentionPlan(groups=groups, num_tokens=layout.num_tokens, batch=layout.batch,
                              num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, block_size=block_size,
                              window=layout.window)


def _buckets(reqs: torch.Tensor, ctx: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """The short requests in groups of similar context (contexts of a group padded to its
    longest): sorted by blocks needed, split where a split saves the most padding, recursively."""
    if reqs.numel() == 0:
        return []
    need = (ctx[reqs] + block_size - 1) // block_size
    order = torch.argsort(need)
    parts = [(reqs[order], need[order])]
    while len(parts) < MAX_SHORT_GROUPS:
        best = max(((_best_split(n), i) for i, (_, n) in enumerate(parts)), key=lambda t: t[0][0])
        (saving, k), i = best
        if saving <= SPLIT_SAVING_BLOCKS:
            break
        r, n = parts.pop(i)
        parts[i:i] = [(r[:k], n[:k]), (r[k:], n[k:])]
    return [r for r, _ in parts]


def _best_split(need: torch.Tensor) -> tuple[int, int]:
    """(padded request-blocks saved, split index) of the best cut of ascending ``need`` in two."""
    N = need.numel()
    if N < 2:
        return 0, 0
    k = torch.arange(1, N)
    saving = N * need[-1] - (k * need[k - 1] + (N - k) * need[-1])
    best = int(torch.argmax(saving))
    return int(saving[best]), best + 1


def _group(layout: BatchLayout, table: torch.Tensor, reqs: torch.Tensor, tile: tuple[int, int] | None,
           block_size: int) -> AttentionGroup:
    """The group of requests ``reqs`` (all their new tokens), or of one query ``tile``
    (start, length) of one request."""
    q_len, ctx = layout.q_len[reqs], layout.ctx[reqs]
    prefix = ctx - q_len
    q0, nq = (torch.zeros_like(q_len), q_len) if tile is None else (torch.tensor([tile[0]]), torch.tensor([tile[1]]))
    first_token = torch.cumsum(layout.q_len, 0)[reqs] - q_len + q0  # row of each problem's first query
    key_end = prefix + q0 + nq  # causal or tree, no query sees a key past its problem's last token
    key_lo = torch.zeros_like(key_end)
    if layout.window is not None:  # keys before the first query's window are never visible
        first_pos = torch.where(layout.tree_req[reqs], prefix, prefix + q0)
        key_lo = (first_pos - layout.window + 1).clamp(min=0)
    block_lo = key_lo // block_size
    num_blocks = (key_end + block_size - 1) // block_size - block_lo
    Lq, nblk = int(nq.max()), int(num_blocks.max())

    # Queries: [R, Lq] rows of q, padding pointing at the problem's first row.
    i = torch.arange(Lq)
    q_real = i[None, :] < nq[:, None]
    q_rows = torch.where(q_real, first_token[:, None] + i[None, :], first_token[:, None])
    # Keys: whole blocks [R, nblk]; columns past a problem's blocks read block 0 (masked).
    col = block_lo[:, None] + torch.arange(nblk)[None, :]
    col_real = col < (block_lo + num_blocks)[:, None]
    blocks = torch.where(col_real, table[reqs[:, None], col.clamp(max=max(table.shape[1] - 1, 0))], 0)
    key = block_lo[:, None] * block_size + torch.arange(nblk * block_size)[None, :]  # [R, Lk] key index
    bias = _bias(layout, reqs, q_rows, q_real, key, key_end, prefix, first_token - q0)
    real = q_real.flatten().nonzero().flatten()
    return AttentionGroup(q_rows=q_rows.flatten(), real=real, out_rows=q_rows.flatten()[real], blocks=blocks.flatten(),
                          bias=bias[:, None])


def _bias(layout: BatchLayout, reqs: torch.Tensor, q_rows: torch.Tensor, q_real: torch.Tensor, key: torch.Tensor,
          key_end: torch.Tensor, prefix: torch.Tensor, req_first_row: torch.Tensor) -> torch.Tensor:
    """float32 [R, Lq, Lk] additive mask: 0 where query row sees the key, -inf elsewhere."""
    prefix_ = prefix[:, None, None]
    key_ = key[:, None, :]
    new = key_ - prefix_  # the key's index among the request's new tokens (< 0: cached prefix)
    local = (q_rows - req_first_row[:, None])[:, :, None]  # query's index among the new tokens
    visible = (key_ < key_end[:, None, None]) & ((new < 0) | (new <= local))  # causal
    tree = layout.tree_req[reqs]
    if bool(tree.any()):
        # Tree rows see exactly their ancestors among the new tokens: bit `new` of their row.
        bits = layout.ancestors[q_rows]  # [R, Lq, words]
        j = new.clamp(min=0).expand(-1, q_rows.shape[1], -1)
        word = torch.gather(bits, 2, (j // 64).clamp(max=bits.shape[2] - 1))
        ancestor = (torch.bitwise_right_shift(word, j % 64) & 1).bool()
        in_tree = (key_ < key_end[:, None, None]) & ((new < 0) | ancestor)
        visible = torch.where(tree[:, None, None], in_tree, visible)
    if layout.window is not None:
        # A new token's key sits at its query position (a tree node at prefix + depth).
        key_row = (req_first_row[:, None] + new[:, 0, :]).clamp(0, max(layout.num_tokens - 1, 0))
        key_pos = torch.where(new[:, 0, :] >= 0, layout.positions[key_row], key)
        q_pos = layout.positions[q_rows]
        visible &= (q_pos[:, :, None] - key_pos[:, None, :]) < layout.window
    visible |= ~q_real[:, :, None]  # padding rows see everything: no all -inf row, no NaN
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(visible, zero, torch.tensor(float("-inf")))


def mixed_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: TorchAttentionPlan,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's attention over the paged cache (layout as :func:`tkernels.attention.mixed_attention`'s)
    for the batch ``plan`` describes; returns ``out [T, Hq, D]`` (logits and softmax in fp32,
    stored in q's dtype)."""
    _check_inputs(q, k_cache, v_cache, out)
    T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    if not isinstance(plan, TorchAttentionPlan):
        _fail("plan", f"must be a TorchAttentionPlan (plan_torch_attention), got {type(plan).__name__}")
    if (plan.num_tokens, plan.num_q_heads, plan.num_kv_heads, plan.block_size) != (T, Hq, Hkv, block_size):
        _fail("plan", "was built for another batch, head layout or block size")
    scale = D ** -0.5 if scale is None else real("scale", scale, positive=True)
    softcap = None if softcap is None else real("softcap", softcap, positive=True)
    out = torch.empty_like(q) if out is None else out
    for group in plan.groups:
        o = _attend(q, k_cache, v_cache, group, scale, softcap)
        out[group.out_rows] = o[group.real].to(out.dtype)
    return out


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup, scale: float,
            softcap: float | None) -> torch.Tensor:
    """The group's attention, fp32, as [R * Lq, Hq, D] padded query rows."""
    R, _, Lq, Lk = group.bias.shape
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    k, v = (t.view(Hkv, R, Lk, D).float() for t in _gather_kv(k_cache, v_cache, group.blocks))
    if softcap is None:
        # torch's fused attention (on a CPU its flash kernel: the logits a block at a time, never
        # the whole [Hq, Lq, Lk] matrix through memory, the mask read blockwise; a query head
        # h reads KV head h // G, as here): a 256-token prefill tile over 256-1024 keys 1.3-3x
        # faster than the matmul, mask and softmax passes below on the project's 2-core VM
        qs = q[group.q_rows].view(R, Lq, Hq, D).transpose(1, 2).float()  # [R, Hq, Lq, D]
        o = F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1), attn_mask=group.bias,
                                           scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(R * Lq, Hq, D)
    # [Hkv, R, G * Lq, D]: a KV head's G query heads are rows of one matmul (GQA without repeat).
    qg = q[group.q_rows].view(R, Lq, Hkv, G, D).permute(2, 0, 3, 1, 4).reshape(Hkv, R, G * Lq, D)
    qg = qg.float() * scale
    s = torch.tanh(torch.matmul(qg, k.transpose(-1, -2)) / softcap) * softcap
    s = s.view(Hkv, R, G, Lq, Lk).add_(group.bias).softmax(-1)  # bias [R, 1, Lq, Lk] broadcasts
    o = torch.matmul(s.view(Hkv, R, G * Lq, Lk), v)  # [Hkv, R, G * Lq, D]
    return o.view(Hkv, R, G, Lq, D).permute(1, 3, 0, 2, 4).reshape(R * Lq, Hq, D)


def _gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``blocks`` as ``[Hkv, len(blocks), block_size, D]`` each. When V is the second
    half of K's rows (vLLM's ``[..., 2 * head_size]`` cache, as the plugin views it) both come
    from one gather of ``2 * D``-wide rows, and K and V are views of it (the matmuls take the
    row stride): half the index work, twice the bytes per copied row."""
    D = k_cache.shape[3]
    halves = (v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype
              and v_cache.data_ptr() == k_cache.data_ptr() + D * k_cache.element_size())
    if halves:
        kv = torch.as_strided(k_cache, (*k_cache.shape[:3], 2 * D), k_cache.stride())
        both = _gather(kv, blocks)
        return both[..., :D], both[..., D:]
    return _gather(k_cache, blocks), _gather(v_cache, blocks)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The cache's ``blocks``, contiguous ``[Hkv, len(blocks), block_size, D]``: the layout the
    matmuls read. Where every (block, slot, head) row of ``D`` values starts at a multiple of one
    row stride (vLLM's layouts, K and V halves of one tensor included), the cache is read as a
    2-D table of rows and gathered by row index: index_select's row-copy path, ~25x faster on
    a CPU than index_select over the permuted 4-D view, which copies element by element."""
    _, block_size, Hkv, D = cache.shape
    s_block, s_slot, s_head = cache.stride(0), cache.stride(1), cache.stride(2)
    row = min(s_block, s_slot, s_head)
    if row < D or s_block % row or s_slot % row or s_head % row:  # an unusual layout: the slow, general gather
        return cache.permute(2, 0, 1, 3).index_select(1, blocks).contiguous()
    num_rows = ((cache.shape[0] - 1) * s_block + (block_size - 1) * s_slot + (Hkv - 1) * s_head) // row + 1
    table = torch.as_strided(cache, (num_rows, D), (row, 1))
    dev = cache.device
    rows = (torch.arange(Hkv, device=dev)[:, None, None] * (s_head // row) + blocks[None, :, None] * (s_block // row)
            + torch.arange(block_size, device=dev)[None, None, :] * (s_slot // row))
    return table.index_select(0, rows.flatten()).view(Hkv, blocks.numel(), block_size, D)
