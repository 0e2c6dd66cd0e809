"""Mixed-batch paged attention: prefill chunks, decodes and speculation trees in one launch.

Inputs follow vLLM: queries ``q [T, Hq, D]`` packed request after request (``cu_seqlens_q``),
a paged K/V cache ``[num_blocks, block_size, Hkv, D]`` addressed through
``block_table [B, max_blocks]``, and ``seq_lens [B]`` = context length INCLUDING the request's
new tokens, whose K/V are already in the cache (key ``prefix + i`` belongs to new token ``i``,
``prefix = seq_len - query_len``).

Visibility. Every query token sees the whole cached prefix. Among the request's new tokens an
ordinary request is causal (token i sees new tokens 0..i); a request flagged in ``is_tree`` is a
speculation tree (``tree_parents`` holds its nodes' local parents, BFS order, parent[0] = -1,
at most ``MAX_TREE_NODES`` = 256 nodes) and node i sees exactly its ancestors and itself. Positions: token i of a causal
request sits at ``prefix + i``, tree node i at ``prefix + depth(i)``. An optional sliding
``window`` keeps keys with ``query_pos - key_pos < window``; an optional ``softcap`` maps a
scaled logit s to ``softcap * tanh(s / softcap)``.


Files, in fla's manner: ``plan.py`` (the batch checks, host planning, launch parameters, the
tables' layout; its loops numba-compiled in ``plan_compiled.py``, their plain-PyTorch reference
``plan_reference.py``), ``kernels.py`` (Triton kernels and the launches they compile), ``launch.py``
(:func:`mixed_attention`), ``reference.py`` (plain PyTorch, one request at a time),
``torch_path.py`` (vectorised PyTorch for CPUs: :func:`plan_torch_attention` per step,
:func:`mixed_attention_torch` per layer), ``compiled_path.py`` (compiled for CPUs, the cache read
where it lies, no gather: :func:`plan_compiled_attention` per step, :func:`mixed_attention_compiled`
per layer; its numba loop in ``compiled_kernel.py``). docs/design.md has the design.
"""

from tkernels.attention.compiled_path import CompiledAttentionPlan, mixed_attention_compiled, plan_compiled_attention
from tkernels.attention.launch import mixed_attention
from tkernels.attention.plan import HostBatch, MixedAttentionPlan, plan_mixed_attention
from tkernels.attention.reference import mixed_attention_reference
from tkernels.attention.torch_path import TorchAttentionPlan, mixed_attention_torch, plan_torch_attention

__all__ = ["CompiledAttentionPlan", "HostBatch", "MixedAttentionPlan", "TorchAttentionPlan", "mixed_attention",
           "mixed_attention_compiled", "mixed_attention_reference", "mixed_attention_torch", "plan_compiled_attention",
           "plan_mixed_attention", "plan_torch_attention"]
