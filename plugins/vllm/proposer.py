"""Token Recycling as a vLLM ``custom_class`` proposer: no patch to vLLM's source.

    --speculative-config '{"method": "custom_class", "num_speculative_tokens": 5,
                           "model": "tkernels.plugins.vllm.proposer.TokenRecyclingProposer"}'

vLLM (0.32-0.33) builds the class as ``Cls(vllm_config)`` inside the model runner, calls
``load_model(target_model)`` once the target is loaded, and after every step's bookkeeping
``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)``: one linear
draft per persistent-batch row (an empty one skips speculation for that row). vLLM verifies
it with its own rejection sampler, so outputs are exactly the target's.

**Drafting.** Per request, Token Recycling (:class:`tkernels.spec.TokenRecycling`) fills a tree
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
(per-(depth, rank) estimates on the TR template); any method of :mod:`tkernels.spec.drafters`
(``"tr_static"``, the default, ``"hybrid"``, ``"tr"``, ``"pld"``, ``"retrieval"``) runs the
offline harness's own :class:`~tkernels.spec.drafters.TreeDrafter`: the same code drafts (with
``size: per_batch``, at most the dynamic policy's node count for the batch), prices
(``size: per_batch``, for the methods with estimates) and learns (every verified node's top-k
with its probability, and the accepted path, read off the sampled tokens) as in
``bench/spec_mat.py``, one drafter for all requests, a retrieval context per request.
``tkernels_tree.prompt_topk`` also recycles the target's top-k at every prompt position, which
vLLM never computes (it takes logits at a prompt's last position only): an LM-head matmul per
prompt token (:meth:`TokenRecyclingTreeProposer.recycle_prompt`, timed in ``stats``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tkernels.plugins.vllm.settings import DEFAULT_TREE_DRAFTER, TREE_DRAFTERS, TREE_KEY, tree_options
from tkernels.spec import TOP_K, DynamicTreePolicy, TokenRecycling, TreeShape, best_path, depths
from tkernels.spec.drafters import DraftTree, TreeDrafter
from tkernels.spec.token_recycling import top_k_probs
from tkernels.spec.tree import token_recycling_tree

__all__ = ["DEFAULT_TREE_DRAFTER", "TREE_DRAFTERS", "TokenRecyclingProposer", "TokenRecyclingTreeProposer", "draft_tree"]

TREE_CONFIG_KEY = TREE_KEY  # the tree proposer's options in vLLM's additional_config (settings.py)
PROMPT_TOPK_CHUNK = 512  # prompt rows per LM-head matmul when recycling prompt logits (bounds the [rows, vocab] buffer)


def _accepted_path(tree: DraftTree, accepted_tokens: list[int]) -> list[int] | None:
    """The nodes (root first) of ``tree`` whose tokens the target accepted, in order (siblings
    hold distinct tokens); None if the tokens are not a path of the tree."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    path = [0]
    for token in accepted_tokens:
        child = next((j for j in range(path[-1] + 1, len(tokens)) if parents[j] == path[-1] and tokens[j] == token), None)
        if child is None:
            return None
        path.append(child)
    return path


def draft_tree(depth: int, min_nodes: int = 1) -> TreeShape:
    """The tree proposers' candidates: Token Recycling's fan-out rule
    (:func:`~tkernels.spec.tree.token_recycling_tree`) cut or extended to exactly ``depth``
    levels below the root and widened until it holds at least ``min_nodes`` nodes (the template
    itself up to 63 draft tokens, so smaller budgets are unchanged)."""
    return token_recycling_tree(min_nodes, depth=depth, k=TOP_K)


@dataclass
class _Draft:
    """What row ``i`` was proposed last step, to find its logits rows in the next step."""

    num_tokens: int  # committed tokens of the row when the draft was made
    last_token: int  # its last committed token (the root of the draft)
    tokens: list[int]


class TokenRecyclingProposer:
    """vLLM ``custom_class`` proposer; see the module docstring for what it does and does not do."""

    def __init__(self, vllm_config) -> None:
        from tkernels.plugins.vllm.compat import require_supported_vllm

        require_supported_vllm()
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.drafter = TokenRecycling(vocab_size, TOP_K)  # CPU: drafting works on host lists anyway
        self.policy = DynamicTreePolicy(k=TOP_K, max_depth=self.num_speculative_tokens)
        self.recycled = torch.zeros(vocab_size, dtype=torch.bool)  # rows the target has written
        self.shape = self._draft_shape(self.num_speculative_tokens)
        node_depths = depths(self.shape.parents).long()
        self._levels = [(node_depths == d).nonzero().flatten() for d in range(1, int(node_depths.max()) + 1)]
        self._node_depths = node_depths
        # (top-k ids, their probabilities or None) of every compute_logits call since the last propose
        self._captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # Only the harness's drafters read the probabilities: the others skip the logsumexp
        # over the whole [rows, vocab] logits (and their fp32 copy) on every target step.
        self._capture_probs = False
        self._drafts: list[_Draft | None] = []  # per persistent-batch row
        self.stats = {"steps": 0, "recycled_steps": 0, "skipped_steps": 0, "recycled_rows": 0}

    def _draft_shape(self, num_speculative_tokens: int) -> TreeShape:
        """The tree whose best path is drafted: the template's fan-out, ``num_speculative_tokens`` deep."""
        return draft_tree(num_speculative_tokens)

    def load_model(self, target_model) -> None:
        """Keep the top-k of every ``compute_logits`` result of the target (see module doc)."""
        original = self._compute_logits = target_model.compute_logits

        def compute_logits(*args, **kwargs):
            logits = original(*args, **kwargs)
            if isinstance(logits, torch.Tensor) and logits.dim() == 2:
                if logits.shape[1] != self.drafter.vocab_size:
                    raise ValueError(f"TokenRecyclingProposer: the target's logits have {logits.shape[1]} columns "
                                     f"but model_config.get_vocab_size() is {self.drafter.vocab_size}")
                self._captured.append(top_k_probs(logits, self.drafter.k) if self._capture_probs
                                      else (logits.topk(self.drafter.k, dim=-1).indices, None))
            return logits

        target_model.compute_logits = compute_logits

    def propose(
        self,
        sampled_token_ids: list[list[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings=None,
    ) -> list[list[int]]:
        """One draft list per batch row (``[]`` for rows that sampled nothing this step)."""
        # A row whose step failed (tree.FAILED_TOKEN, finished by the scheduler next) is a row
        # that sampled nothing: no recycling from it, no draft for it.
        sampled_token_ids = [s if not s or min(s) >= 0 else [] for s in sampled_token_ids]
        self.stats["steps"] += 1
        captured, self._captured = self._captured, []
        self._recycle(captured, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        drafted = self._draft(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        self._remember(drafted, num_tokens_no_spec, token_ids_cpu)
        return [tokens for _, tokens in drafted]

    def _remember(self, drafted, num_tokens_no_spec, token_ids_cpu) -> None:
        """Keep each row's draft, to find its logits rows in the next step."""
        self._drafts = [
            _Draft(int(num_tokens_no_spec[i]), int(token_ids_cpu[i, num_tokens_no_spec[i] - 1]), d) if d else None
            for i, (_, d) in enumerate(drafted)
        ]

    # --- recycling ----------------------------------------------------------------------------

    def _verified_drafts(self, row: int, sampled: list[int], num_tokens: int, token_ids_cpu: np.ndarray) -> list[int]:
        """The draft tokens row ``row`` was verified with this step ([] if it had none)."""
        prev = self._drafts[row] if row < len(self._drafts) else None
        before = num_tokens - len(sampled)  # committed tokens before this step
        if (
            prev is None
            or not sampled
            or prev.num_tokens != before
            or prev.last_token != int(token_ids_cpu[row, before - 1])
            or prev.tokens[: len(sampled) - 1] != list(sampled[:-1])
        ):
            return []
        return prev.tokens

    def _recycle(self, captured, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> None:
        rows, tokens, offset = [], [], 0
        parents, children = [], []  # committed (token, next token) pairs for the policy
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            drafts = self._verified_drafts(i, sampled, n, token_ids_cpu)
            if sampled:
                committed = token_ids_cpu[i, n - len(sampled) - 1 : n].tolist()
                parents.append(committed[:-1])
                children.append(committed[1:])
                rows += range(offset, offset + 1 + len(drafts))
                tokens += committed[:1] + drafts
            offset += 1 + len(drafts)
        if not rows:
            return
        top = next((ids for ids, _ in captured if ids.shape[0] == offset), None)
        if top is None:
            self.stats["skipped_steps"] += 1
            return
        self._observe(parents, children)
        token_tensor = torch.tensor(tokens, dtype=torch.int64)
        self.drafter.recycle_topk(top[torch.tensor(rows, device=top.device)], token_tensor)
        self.recycled[token_tensor] = True
        self.stats["recycled_steps"] += 1
        self.stats["recycled_rows"] += len(rows)

    def _observe(self, parents: list[list[int]], children: list[list[int]]) -> None:
        """Teach the policy which candidate rank the target chose at each committed depth, against
        the rows the drafts were made from (before this step's update). A request's observations
        stop at its first unwritten row: placeholders say nothing about recycled rows."""
        width = max(map(len, children))
        flat_parents = torch.tensor(list(itertools.chain.from_iterable(parents)))
        ranks = self.drafter.candidate_ranks(flat_parents, torch.tensor(list(itertools.chain.from_iterable(children))))
        known = self.recycled[flat_parents]
        padded = torch.full((len(children), width), -1, dtype=torch.int64)
        observed = torch.zeros(len(children), dtype=torch.int64)
        start = 0
        for b, count in enumerate(map(len, children)):
            padded[b, :count] = ranks[start : start + count]
            observed[b] = int(known[start : start + count].int().cumprod(0).sum())
            start += count
        self.policy.update(padded, observed)

    # --- drafting -----------------------------------------------------------------------------

    def _node_scores(self, tree_tokens: torch.Tensor) -> torch.Tensor:
        """[B, n] path probabilities, zero below any node whose adjacency row is unwritten."""
        p = self.policy.accept_probs().float()
        depth, ranks = self._node_depths, self.shape.ranks.long()
        node_p = torch.ones(len(self.shape))
        node_p[1:] = p[depth[1:] - 1, ranks[1:]]
        scores = torch.ones_like(tree_tokens, dtype=torch.float32)
        parents = self.shape.parents.long()
        for level in self._levels:  # parents' scores are final before their children's
            par = parents[level]
            scores[:, level] = scores[:, par] * node_p[level] * self.recycled[tree_tokens[:, par]]
        return scores

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        """The drafted nodes of ``self.shape`` (root first, ascending = BFS order), from one row's
        node scores: the best path, cut at its first zero-score node (whose descendants are zero)."""
        path = best_path(self.shape.parents, scores)
        return path[scores[path] > 0]

    def _draft(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[tuple[torch.Tensor | None, list[int]]]:
        """Per row, ``(nodes, draft tokens)``: the drafted nodes of ``self.shape`` (root first) and
        the tokens of all but the root, or ``(None, [])``."""
        drafted: list[tuple[torch.Tensor | None, list[int]]] = [(None, []) for _ in sampled_token_ids]
        active = [
            i for i, s in enumerate(sampled_token_ids)
            if s and int(num_tokens_no_spec[i]) + 1 < self.max_model_len
        ]
        if not active:
            return drafted
        lengths = np.asarray(num_tokens_no_spec)[active]
        last = torch.from_numpy(np.asarray(token_ids_cpu[active, lengths - 1], dtype=np.int64))
        tree_tokens, _, _ = self.drafter.draft(last, self.shape)
        tree_tokens = tree_tokens.view(len(active), -1)
        scores = self._node_scores(tree_tokens)
        for b, i in enumerate(active):
            room = self.max_model_len - int(lengths[b]) - 1
            nodes = self._select(scores[b])[: room + 1]  # a BFS prefix: still a path, or a tree
            drafted[i] = (nodes, tree_tokens[b, nodes[1:]].tolist())
        return drafted


class TokenRecyclingTreeProposer(TokenRecyclingProposer):
    """Tree speculation: each row's draft is the best nodes of the tree, at most ``num_speculative_tokens``.

    Node scores are path probabilities (see :meth:`_node_scores`), so the best ``n`` nodes form
    a tree and maximise the expected accepted length among ``n``-node drafts
    (:mod:`tkernels.spec.tree_policy`); the best path is one of them. ``n`` follows the hardware
    and the batch: each step the policy picks the node count that maximises expected tokens per
    second for this many drafting requests, priced by the step-latency model of the served
    model's shape on this GPU (per-GPU config, else the documented analytic default), so a
    lone request verifies the whole budget and a large batch small trees.
    ``--additional-config '{"tkernels_tree": {"size": "fixed"}}'`` always drafts the whole
    budget instead (comparisons at a fixed verify budget); the default is ``"per_batch"``.
    ``"drafter"`` (default ``"tr_static"``) and ``"prompt_topk"`` (default false): see the
    module doc.
    The trees reach vLLM as draft lists through :mod:`tkernels.plugins.vllm.tree`, whose patches this constructor
    installs and whose :class:`~tkernels.plugins.vllm.tree.TreeBatch` (``tree_batch``) tells
    the proposer, each step, which request each row is and which draft it was verified with.
    """

    def __init__(self, vllm_config) -> None:
        from tkernels.plugins.vllm import patches, tree
        from tkernels.plugins.vllm.scheduler import model_shape
        from tkernels.sched.latency_model import LatencyModel, LatencyRates

        super().__init__(vllm_config)
        patches.install(vllm_config)
        self.vllm_config = vllm_config
        self.tree_batch = tree.TreeBatch()
        options = tree_options(getattr(vllm_config, "additional_config", None))
        self.per_batch = options["size"] == "per_batch"
        self.prompt_topk = options["prompt_topk"]
        drafter = options["drafter"]
        step_time = LatencyModel(model_shape(vllm_config), LatencyRates.from_config())
        self.policy.step_time = step_time
        self._num_nodes = self.num_speculative_tokens + 1  # this step's node count, root included
        # drafter "dynamic": the per-(depth, rank) policy on the TR template (the methods below);
        # any other: tkernels.spec.drafters.TreeDrafter, the offline harness's drafters
        self.tree_drafter = None
        if drafter != "dynamic":
            self.tree_drafter = TreeDrafter(self.drafter.vocab_size, drafter, TOP_K, step_time=step_time)
            if self.tree_drafter.recycling is not None:
                self.tree_drafter.recycling = self.drafter  # one adjacency: what prompt_topk and the capture feed
        self._capture_probs = self.tree_drafter is not None
        self._draft_caps: dict[int, int] = {}  # drafting requests -> nodes drafted per request (per_batch)
        self._trees: dict[str, DraftTree] = {}  # per request, the tree it was last proposed
        self.stats.update(prompt_topk_rows=0, prompt_topk_s=0.0, prompt_forward_s=0.0, foreign_drafts=0)

    def _draft_shape(self, num_speculative_tokens: int) -> TreeShape:
        # Twice the budget in candidates, so the best num_speculative_tokens nodes are chosen
        # from a wider tree than the template once budgets pass 63 (up to 255: 639 candidates).
        return draft_tree(num_speculative_tokens, 2 * (num_speculative_tokens + 1))

    def load_model(self, target_model) -> None:
        from tkernels.plugins.vllm.patches import check_attention_backend

        check_attention_backend(self.vllm_config)  # the layers exist once the target is built
        super().load_model(target_model)

    # --- the offline harness's drafters (tkernels.spec.drafters) -------------------------------------

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        self.stats["foreign_drafts"] = self.tree_batch.foreign_drafts  # rows verified as chains (tree.py)
        if self.tree_drafter is None:
            return super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        step = self.tree_batch.step
        if step is None:
            raise RuntimeError("TokenRecyclingTreeProposer.propose ran before any step: are tkernels' vLLM patches installed?")
        self.stats["steps"] += 1
        captured, self._captured = self._captured, []
        self._observe_trees(step, captured, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        for req_id in set(self._trees) - set(step.req_ids):  # finished or preempted: a resumed one is rebuilt
            self._trees.pop(req_id)
        for key in set(self.tree_drafter.keys()) - set(step.req_ids):
            self.tree_drafter.release(key)
        active = [i for i, s in enumerate(sampled_token_ids) if s and int(num_tokens_no_spec[i]) + 1 < self.max_model_len]
        drafts = [[] for _ in sampled_token_ids]
        if not active:
            for req_id in step.req_ids:
                self.tree_batch.propose(req_id, [], None)
            return drafts
        lengths = [int(num_tokens_no_spec[i]) for i in active]
        keys = [step.req_ids[i] for i in active]
        num_nodes = self.num_speculative_tokens + 1
        if self.per_batch:
            # Draft no more per request than this batch can pay for under the step model (the
            # dynamic policy's size at its prior estimates: 128 nodes at batch 1, 8 at 32 on an
            # H100-class Llama-3-8B), so a large batch never pays the host time of drafting big
            # trees it would cut (drafting costs: bench/bench_drafters.py); choose() then prices
            # the drafted nodes by their own estimates (the template has none and keeps them all).
            # The policy learns nothing on this path (its estimates stay the prior): one size per batch size.
            if len(active) not in self._draft_caps:
                self._draft_caps[len(active)] = len(self.policy.choose(len(active), num_nodes))
            num_nodes = self._draft_caps[len(active)]
        trees = self.tree_drafter.draft(keys, [token_ids_cpu[i, :n] for i, n in zip(active, lengths)], num_nodes)
        if self.per_batch:
            trees = self.tree_drafter.choose(trees)  # methods with estimates; others keep the whole budget
        for i, key, n, tree in zip(active, keys, lengths, trees):
            room = self.max_model_len - n - 1
            if len(tree) > room + 1:
                tree = tree.select(torch.arange(room + 1))  # a BFS prefix: still a tree
            self._trees[key] = tree
            drafts[i] = tree.tokens[1:].tolist()
        for i, req_id in enumerate(step.req_ids):
            self.tree_batch.propose(req_id, drafts[i], self._trees[req_id].parents if drafts[i] else None)
        return drafts

    def _observe_trees(self, step, captured, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> None:
        """Teach the drafter this step's verification: every verified node's top-k (rows matched
        as in :meth:`_recycle`) and each row's accepted path, read off its sampled tokens."""
        rows, trees, paths, offset = [], [], [], 0
        for i, sampled in enumerate(sampled_token_ids):
            drafts = step.drafts[i] if i < len(step.drafts) else []
            if sampled:
                # a row verified as a chain (its draft was not this tree: tree.py) teaches nothing
                as_tree = step.is_tree is None or bool(step.is_tree[i])
                tree = self._trees.get(step.req_ids[i]) if drafts and as_tree else None
                if tree is not None and tree.tokens[1:1 + len(drafts)].tolist() == list(drafts):
                    tree = tree.select(torch.arange(1 + len(drafts)))  # as scheduled: a BFS prefix
                    path = _accepted_path(tree, sampled[:-1])
                else:  # no draft: its root's row alone
                    root = int(token_ids_cpu[i, int(num_tokens_no_spec[i]) - len(sampled) - 1])
                    tree, path = DraftTree(torch.tensor([root]), torch.tensor([-1], dtype=torch.int32)), [0]
                if path is not None and len(tree) == 1 + len(drafts):
                    rows += range(offset, offset + len(tree))
                    trees.append(tree)
                    paths.append(path)
            offset += 1 + len(drafts)
        if not rows:
            return
        top = next(((ids, probs) for ids, probs in captured if ids.shape[0] == offset), None)
        if top is None:
            self.stats["skipped_steps"] += 1
            return
        index = torch.tensor(rows, device=top[0].device)
        self.tree_drafter.observe(trees, top[0][index].cpu(), top[1][index].cpu(), paths)
        self.stats["recycled_steps"] += 1
        self.stats["recycled_rows"] += len(rows)

    def recycle_prompt(self, hidden_states: torch.Tensor, forward_s: float) -> None:
        """With ``prompt_topk``: recycle the target's top-k at this step's prompt positions
        (:mod:`tkernels.plugins.vllm.tree` calls it after the forward with its hidden states),
        which vLLM itself never computes (it takes logits at each prompt's last position only).
        Costs one LM-head matmul, top-k and log-sum-exp per prompt token, in chunks; timed in
        ``stats`` (``prompt_topk_s`` against the ``prompt_forward_s`` of the same steps)."""
        import time

        step = self.tree_batch.step
        if not self.prompt_topk or step is None or step.prompt_rows is None or not step.prompt_rows.numel():
            return
        start = time.perf_counter()
        rows, tokens = step.prompt_rows, step.prompt_tokens
        step.prompt_rows = step.prompt_tokens = None  # once per step: a later dummy forward finds nothing
        for at in range(0, rows.numel(), PROMPT_TOPK_CHUNK):
            index = rows[at:at + PROMPT_TOPK_CHUNK].to(hidden_states.device)
            ids, probs = top_k_probs(self._compute_logits(hidden_states[index]), self.drafter.k)
            self.drafter.recycle_topk(ids, tokens[at:at + PROMPT_TOPK_CHUNK], probs)
            self.recycled[tokens[at:at + PROMPT_TOPK_CHUNK]] = True
        if hidden_states.is_cuda:
            torch.cuda.synchronize(hidden_states.device)
        self.stats["prompt_topk_rows"] += rows.numel()
        self.stats["prompt_topk_s"] += time.perf_counter() - start
        self.stats["prompt_forward_s"] += forward_s

    def _draft(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu):
        drafting = sum(1 for s in sampled_token_ids if s)
        if drafting and self.per_batch:
            self._num_nodes = len(self.policy.choose(drafting, self.num_speculative_tokens + 1))
        return super()._draft(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        # Stable sort: a parent scores at least its children and comes first, so ties keep the
        # set closed under ancestors.
        best = scores.argsort(descending=True, stable=True)[: self._num_nodes]
        return best[scores[best] > 0].sort().values

    def _verified_drafts(self, row: int, sampled: list[int], num_tokens: int, token_ids_cpu: np.ndarray) -> list[int]:
        step = self.tree_batch.step
        return step.drafts[row] if step is not None and row < len(step.drafts) else []

    def _remember(self, drafted, num_tokens_no_spec, token_ids_cpu) -> None:
        step = self.tree_batch.step
        if step is None:
            raise RuntimeError("TokenRecyclingTreeProposer.propose ran before any step: are tkernels' vLLM patches installed?")
        shape_parents = self.shape.parents.long()
        for req_id, (nodes, tokens) in zip(step.req_ids, drafted):
            parents = None
            if tokens:  # the drafted nodes hold every parent, ascending: a parent's local index is its rank there
                local = torch.searchsorted(nodes, shape_parents[nodes[1:]])
                parents = torch.cat([local.new_tensor([-1]), local]).int()
            self.tree_batch.propose(req_id, tokens, parents)
