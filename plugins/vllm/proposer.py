"""Token Recycling as a vLLM ``custom_class`` proposer: no patch to vLLM's source.

    --speculative-config '{"method": "custom_class", "num_speculative_tokens": 5,
                           "model": "tkernels.plugins.vllm.proposer.TokenRecyclingProposer"}'

vLLM (0.32-0.33) builds the class as ``Cls(vllm_config)`` inside the model runner, calls
``load_model(target_model)`` once the target is loaded, and after every step's bookkeeping
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)``: one linear
draft per persistent-batch row (an empty one skips speculation for that row). vLLM verifies
it with its own rejection sampler, so outputs are exactly the target's.

**Drafting** (tkernels' drafter, :class:`tkernels.spec.drafters.TreeDrafter`, method
``dynamic``; the proposer only turns its trees into vLLM's draft lists). Per request, Token
Recycling (:class:`tkernels.spec.TokenRecycling`) fills a tree
of depth ``num_speculative_tokens`` (the TR template's fan-out, :func:`draft_tree`) from the
last committed token, and the request's draft is the tree's :func:`~tkernels.spec.best_path`
under node scores = path probability from the online per-(depth, rank) acceptance estimates
(:class:`tkernels.spec.DynamicTreePolicy`), zeroed below any node whose adjacency row the
target never wrote (such rows hold placeholder tokens 0..k-1). The draft stops at the first
zero-score node, so it may be shorter than ``num_speculative_tokens`` or empty. vLLM 0.33
verifies linear drafts only; the other branches of the tree are verified by
:class:`TokenRecyclingTreeProposer` and its patches (below).

**Recycling (what the target's logits teach the drafter).** The proposer receives only
sampled tokens, and vLLM's logits processors do not see the draft positions (the rejection
sampler applies only built-in ones there). So :meth:`load_model` wraps ``compute_logits`` on
the target model *instance* vLLM hands it (an instance attribute; no vLLM class or module is
changed) and keeps each call's top-k token ids (``[rows, k]``, never the ``[rows, vocab]``
logits: warm-up calls come with hundreds of rows) until the next :meth:`propose`. There the
rows are matched to tokens: the persistent batch's row ``i`` owns ``1 + d_i`` consecutive
logits rows, its last committed token before the step and the ``d_i`` draft tokens it was
given; ``d_i`` is recovered from this proposer's previous draft for row ``i`` (checked by the
row's length, last token and accepted prefix). Every verified position is recycled, the
accepted ones *and* the rejected drafts (adjacency row of the token := the target's top-k
there), which is the paper's update restricted to a linear draft. Not recycled: the prompt
(vLLM computes logits at its last position only), partial prefill chunks, and any step whose
logits rows do not add up (the scheduler cut a draft, rows were reordered before the step,
or a request resumed): such a step is counted in ``stats["skipped_steps"]``, never guessed.
The top-k is taken from the logits as ``compute_logits`` returned them (before sampling-time
penalties, which the greedy benchmark does not use).

**Tree speculation** (:class:`TokenRecyclingTreeProposer`, ``"model":
"tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"``): the same drafter, policy and
recycling, but each row's draft is the highest-scoring nodes of the tree (at most
``num_speculative_tokens``, as many as pay off at this batch size on this GPU; a tree, in BFS
order), handed to vLLM as the row's draft list, and vLLM's runner is patched to verify it as a
tree (:mod:`tkernels.plugins.vllm.tree`, which also says what is supported). There the verified nodes of every row are known exactly, so every step is recycled,
a cut draft included.

**Drafters of the tree proposer** (``tkernels_tree.drafter``): ``"dynamic"`` is the above
(per-(depth, rank) estimates on the TR template); any of the offline harness's methods of
:mod:`tkernels.spec.drafters` (``"hybrid"``, the default, ``"tr_static"``, ``"tr"``, ``"pld"``,
``"retrieval"``) runs the same :class:`~tkernels.spec.drafters.TreeDrafter` as the harness: the same code drafts (with
``size: per_batch``, at most the dynamic policy's node count for the batch), prices
(``size: per_batch``, for the methods with estimates) and learns (every verified node's top-k
with its probability, and the accepted path, read off the sampled tokens) as in
``bench/spec_mat.py``, one drafter for all requests, a retrieval context per request.
``tkernels_tree.prompt_topk`` also recycles the target's top-k at every prompt position, which
vLLM never computes (it takes logits at a prompt's last position only): an LM-head matmul per
prompt token (:meth:`TokenRecyclingTreeProposer.recycle_prompt`, timed in ``stats``).

The classes live in :mod:`tkernels.plugins.vllm.path_proposer` and
:mod:`tkernels.plugins.vllm.tree_proposer`; this module is the documented ``custom_class`` path
of both.
"""

from __future__ import annotations

from tkernels.plugins.vllm.path_proposer import TokenRecyclingProposer, draft_tree
from tkernels.plugins.vllm.settings import DEFAULT_TREE_DRAFTER, TREE_DRAFTERS, TREE_KEY
from tkernels.plugins.vllm.tree_proposer import PROMPT_TOPK_CHUNK, TokenRecyclingTreeProposer
from tkernels.spec import TOP_K

__all__ = ["DEFAULT_TREE_DRAFTER", "PROMPT_TOPK_CHUNK", "TOP_K", "TREE_CONFIG_KEY", "TREE_DRAFTERS",
           "TokenRecyclingProposer", "TokenRecyclingTreeProposer", "draft_tree"]

TREE_CONFIG_KEY = TREE_KEY  # the tree proposer's options in vLLM's additional_config (settings.py)
