"""The tree proposer, :class:`TokenRecyclingTreeProposer` (the module doc of
:mod:`tkernels.plugins.vllm.proposer` describes it): each row's draft is a tree of tkernels'
drafter (:class:`~tkernels.spec.drafters.TreeDrafter`), handed to vLLM as a draft list with its
parents, verified as a tree by :mod:`tkernels.plugins.vllm.tree`'s patches."""

from __future__ import annotations

import logging

import numpy as np
import torch

from tkernels.plugins.vllm.path_proposer import TokenRecyclingProposer, draft_tree
from tkernels.plugins.vllm.settings import tree_options
from tkernels.spec import TOP_K, TreeShape
from tkernels.spec.drafters import DYNAMIC, DraftTree, TreeDrafter
from tkernels.spec.token_recycling import top_k_probs

__all__ = ["TokenRecyclingTreeProposer"]

logger = logging.getLogger("vllm.tkernels")  # vLLM's handlers and format, as the scheduler's
CAP_REFRESH_STEPS = 16  # per_batch: steps between re-sizings of the trees from the learnt acceptance
PROMPT_TOPK_CHUNK = 512  # prompt rows per LM-head matmul when recycling prompt logits (bounds the [rows, vocab] buffer)


def _accepted_path(tree: DraftTree, accepted_tokens: list[int]) -> list[int] | None:
    """The nodes (root first) of ``tree`` whose tokens the target accepted, in order (siblings
    hold distinct tokens); None if the tokens are not a path of the tree."""
    children: dict[tuple[int, int], int] = {}
    for j, key in enumerate(zip(tree.parents.tolist()[1:], tree.tokens.tolist()[1:]), 1):
        children.setdefault(key, j)
    path = [0]
    for token in accepted_tokens:
        child = children.get((path[-1], token))
        if child is None:
            return None
        path.append(child)
    return path


def sibling_ranks(parents: list[int], path: list[int]) -> tuple[list[int], int]:
    """``(ranks, observed)`` of an accepted ``path`` (root first) in a BFS tree: the rank of each
    accepted node among its siblings (BFS keeps siblings together, best first), then -1 when the
    last accepted node has children (the target chose none of them); ``observed`` counts them all."""
    ranks = [node - parents.index(parents[node]) for node in path[1:]]
    if path[-1] in parents:
        ranks.append(-1)
    return ranks, len(ranks)


class TokenRecyclingTreeProposer(TokenRecyclingProposer):
    """Tree speculation: each row's draft is the best nodes of the tree, at most ``num_speculative_tokens``.

    With the ``dynamic`` drafter, node scores are path probabilities
    (:mod:`tkernels.spec.drafting.dynamic`), so the best ``n`` nodes form
    a tree and maximise the expected accepted length among ``n``-node drafts
    (:mod:`tkernels.spec.tree_policy`); the best path is one of them. ``n`` follows the hardware
    and the batch: each step the policy picks the node count that maximises expected tokens per
    second for this many drafting requests, priced by the step-latency model of the served
    model's shape on this machine (per-GPU config, else the documented analytic default, refit
    from the engine's measured steps: :mod:`tkernels.plugins.vllm.step_model`), so a lone
    request on a GPU verifies the whole budget, a large batch small trees, and a machine where
    no draft pays none at all.
    ``--additional-config '{"tkernels_tree": {"size": "fixed"}}'`` always drafts the whole
    budget instead (comparisons at a fixed verify budget); the default is ``"per_batch"``.
    ``"drafter"`` (default ``"hybrid"``) and ``"prompt_topk"`` (default false): see the
    module doc.
    The trees reach vLLM as draft lists through :mod:`tkernels.plugins.vllm.tree`, whose patches this constructor
    installs and whose :class:`~tkernels.plugins.vllm.tree.TreeBatch` (``tree_batch``) tells
    the proposer, each step, which request each row is and which draft it was verified with.
    """

    _best_path = False  # the dynamic drafter's best nodes, a tree

    def __init__(self, vllm_config) -> None:
        from tkernels.plugins.vllm import patches, tree
        from tkernels.plugins.vllm.settings import model_shape
        from tkernels.plugins.vllm.step_model import MeasuredSteps

        super().__init__(vllm_config)
        patches.install(vllm_config)
        self.vllm_config = vllm_config
        self.tree_batch = tree.TreeBatch()
        options = tree_options(getattr(vllm_config, "additional_config", None))
        self.per_batch = options["size"] == "per_batch"
        self.prompt_topk = options["prompt_topk"]
        drafter = options["drafter"]
        # measured on this machine as the engine runs, from the per-GPU config or default (step_model.py)
        self.step_model = MeasuredSteps(model_shape(vllm_config), calibrate=options["calibrate"])
        step_time = self.policy.step_time = self.step_model.model
        self._num_nodes = self.num_speculative_tokens + 1  # this step's node count, root included
        # drafter "dynamic": the per-(depth, rank) policy on the TR template, the best nodes of each
        # row's candidates (super() built it); any other: a method of the offline harness's
        if drafter != DYNAMIC:
            self.tree_drafter = TreeDrafter(self.drafter.vocab_size, drafter, TOP_K, step_time=step_time,
                                            recycling=self.drafter)  # one adjacency: what prompt_topk and the capture feed
        self._capture_probs = self.tree_drafter.method != DYNAMIC
        self._draft_caps: dict[int, int] = {}  # drafting requests -> nodes drafted per request (per_batch)
        self._trees: dict[str, DraftTree] = {}  # per request, the tree it was last proposed
        self.stats.update(prompt_topk_rows=0, prompt_topk_s=0.0, prompt_forward_s=0.0, foreign_drafts=0,
                          undrafted_steps=0)
        logger.info("tkernels tree proposer: drafter %s, %s trees of at most %d draft tokens; %s", drafter,
                    options["size"], self.num_speculative_tokens, self.step_model.describe())

    def _draft_shape(self, num_speculative_tokens: int) -> TreeShape:
        # Twice the budget in candidates, so the best num_speculative_tokens nodes are chosen
        # from a wider tree than the template once budgets pass 63 (up to 255: 639 candidates).
        return draft_tree(num_speculative_tokens, 2 * (num_speculative_tokens + 1))

    def load_model(self, target_model) -> None:
        from tkernels.plugins.vllm.patches import check_attention_backend

        check_attention_backend(self.vllm_config)  # the layers exist once the target is built
        super().load_model(target_model)

    # --- the offline harness's drafters (TreeDrafter.draft / observe) ---------------------------------

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        drafts = self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        self._measure_step()
        return drafts

    def _measure_step(self) -> None:
        """Time the step that just ended (step_model.py); a refit model prices every later tree."""
        model = self.step_model.record(self.tree_batch.step)
        if model is None:
            return
        self.policy.step_time = model
        if self.tree_drafter.method != DYNAMIC:
            self.tree_drafter.tr_policy.step_time = model
        self._draft_caps.clear()

    def _propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings) -> list[list[int]]:
        self.stats["foreign_drafts"] = self.tree_batch.foreign_drafts  # rows verified as chains (tree.py)
        if self.tree_drafter.method == DYNAMIC:
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
            # The policy learns the drafter's real acceptance on this path (_learn_acceptance: the
            # accepted nodes' ranks among their siblings), so the sizes are recomputed every
            # CAP_REFRESH_STEPS steps, and at every refit of the latency model (_measure_step).
            if self.stats["steps"] % CAP_REFRESH_STEPS == 0:
                self._draft_caps.clear()
            if len(active) not in self._draft_caps:
                self._draft_caps[len(active)] = len(self.policy.choose(len(active), num_nodes))
            num_nodes = self._draft_caps[len(active)]
        if num_nodes <= 1:  # no draft pays at this batch on this machine: skip drafting altogether
            self.stats["undrafted_steps"] += 1
            for req_id in step.req_ids:
                self._trees.pop(req_id, None)
                self.tree_batch.propose(req_id, [], None)
            return drafts
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
                n = 1 + len(drafts)
                # is_tree: tree.py found the draft to be a BFS prefix of this very proposal; without
                # it (a caller that does not say), compare the tokens
                if tree is not None and (len(tree) < n or (step.is_tree is None
                                                           and tree.tokens[1:n].tolist() != list(drafts))):
                    tree = None
                if tree is not None:
                    if len(tree) > n:
                        tree = tree.select(torch.arange(n))  # as scheduled: a BFS prefix
                    path = _accepted_path(tree, sampled[:-1])
                else:  # no draft: its root's row alone
                    root = int(token_ids_cpu[i, int(num_tokens_no_spec[i]) - len(sampled) - 1])
                    tree = DraftTree(torch.tensor([root]), torch.tensor([-1], dtype=torch.int32), key=step.req_ids[i])
                    path = [0]
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
        self._learn_acceptance(trees, paths)
        self.stats["recycled_steps"] += 1
        self.stats["recycled_rows"] += len(rows)

    def _learn_acceptance(self, trees: list[DraftTree], paths: list[list[int]]) -> None:
        """Teach the size policy (per-(depth, rank) estimates) what this drafter's trees achieve:
        at each depth of an accepted path, the accepted node's rank among its siblings, and a
        miss (-1) below the last accepted node when the tree had children there."""
        drafted = [(t, p) for t, p in zip(trees, paths) if len(t) > 1]
        if not drafted:
            return
        ranks = torch.full((len(drafted), self.policy.max_depth), -1, dtype=torch.int64)
        observed = torch.zeros(len(drafted), dtype=torch.int64)
        for b, (tree, path) in enumerate(drafted):
            rank, seen = sibling_ranks(tree.parents.tolist(), path)
            width = min(len(rank), self.policy.max_depth)
            ranks[b, :width] = torch.tensor(rank[:width], dtype=torch.int64)
            observed[b] = min(seen, self.policy.max_depth)
        self.policy.update(ranks, observed)

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
            self.tree_drafter.recycle(tokens[at:at + PROMPT_TOPK_CHUNK], ids, probs)
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

    def _verified_drafts(self, row: int, sampled: list[int], num_tokens: int, token_ids_cpu: np.ndarray) -> list[int]:
        step = self.tree_batch.step
        return step.drafts[row] if step is not None and row < len(step.drafts) else []

    def _remember(self, drafted, num_tokens_no_spec, token_ids_cpu) -> None:
        step = self.tree_batch.step
        if step is None:
            raise RuntimeError("TokenRecyclingTreeProposer.propose ran before any step: are tkernels' vLLM patches installed?")
        for req_id, tree in zip(step.req_ids, drafted):
            tokens = [] if tree is None else tree.tokens[1:].tolist()
            self.tree_batch.propose(req_id, tokens, tree.parents if tokens else None)
