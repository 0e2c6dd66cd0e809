"""The tree proposer, :class:`TokenRecyclingTreeProposer` (the module doc of
:mod:`tkernels.plugins.vllm.proposer` describes it): each row's draft is a tree of tkernels'
drafter (:class:`~tkernels.spec.drafters.TreeDrafter`), handed to vLLM as a draft list with its
parents, verified as a tree by :mod:`tkernels.plugins.vllm.tree`'s patches."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch

from tkernels.plugins.vllm.path_proposer import TokenRecyclingProposer, draft_tree
from tkernels.plugins.vllm.settings import tree_options
from tkernels.spec import TOP_K, TreeShape, host_topk
from tkernels.spec.draft_tree import ragged_arange
from tkernels.spec.drafters import DYNAMIC, DraftBatch, TreeDrafter

__all__ = ["TokenRecyclingTreeProposer"]

logger = logging.getLogger("vllm.tkernels")  # vLLM's handlers and format, as the scheduler's
CAP_REFRESH_STEPS = 16  # per_batch: steps between re-sizings of the trees from the learnt acceptance
PROMPT_TOPK_CHUNK = 512  # prompt rows per LM-head matmul when recycling prompt logits (bounds the [rows, vocab] buffer)


def sibling_ranks(parents: list[int], path: list[int]) -> tuple[list[int], int]:
    """``(ranks, observed)`` of an accepted ``path`` (root first) in a BFS tree: the rank of each
    accepted node among its siblings (BFS keeps siblings together, best first), then -1 when the
    last accepted node has children (the target chose none of them); ``observed`` counts them all."""
    ranks = [node - parents.index(parents[node]) for node in path[1:]]
    if path[-1] in parents:
        ranks.append(-1)
    return ranks, len(ranks)


def mean_context(num_tokens, rows) -> int:
    """The drafting rows' mean context (their tokens so far), which every draft node attends to:
    what the size policies price a node's attention at (``choose(..., context=)``)."""
    return int(np.asarray(num_tokens, dtype=np.int64)[rows].mean())


def batch_sibling_ranks(trees: DraftBatch, on_path: np.ndarray, max_depth: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sibling_ranks` of every tree of a batch at once: ``ranks`` int64 [B, max_depth]
    (-1 padded) and ``observed`` int64 [B], both cut at ``max_depth``; ``on_path`` bool [N] the
    accepted paths' nodes (roots included)."""
    n = trees.num_nodes
    index = np.arange(n)
    parent = trees.global_parents()
    # BFS keeps siblings together: a node's first sibling is the last node before it (or itself)
    # whose parent differs from its predecessor's
    first = (parent >= 0) & (parent != np.concatenate([[-2], parent[:-1]]))
    rank = index - np.maximum.accumulate(np.where(first, index, 0))
    has_child = np.zeros(n, bool)
    has_child[parent[parent >= 0]] = True
    row = np.repeat(np.arange(len(trees)), trees.sizes)
    depth = trees.depths
    ranks = np.full((len(trees), max_depth + 1), -1, np.int64)
    accepted = np.flatnonzero(on_path & (depth >= 1))
    ranks[row[accepted], np.minimum(depth[accepted], max_depth + 1) - 1] = rank[accepted]
    last = np.maximum.reduceat(np.where(on_path, index, -1), trees.cu[:-1])  # BFS: the deepest accepted node
    observed = np.minimum(depth[last] + has_child[last], max_depth)
    return ranks[:, :max_depth], observed


class TokenRecyclingTreeProposer(TokenRecyclingProposer):
    """Tree speculation: each row's draft is the best nodes of the tree, at most ``num_speculative_tokens``.

    With the ``dynamic`` drafter, node scores are path probabilities
    (:mod:`tkernels.spec.drafting.dynamic`), so the best ``n`` nodes form
    a tree and maximise the expected accepted length among ``n``-node drafts
    (:mod:`tkernels.spec.tree_policy`); the best path is one of them. ``n`` follows the hardware
    and the batch: each step the policy picks the node count that maximises expected tokens per
    second for this many drafting requests, priced by the step-latency model of the served
    model's shape on this machine (per-GPU config, refit from the engine's measured steps;
    without a config, one draft a request on every other step until the first fit:
    :mod:`tkernels.plugins.vllm.step_model`), so a lone
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
        # pld keeps no adjacency: no top-k (nor the log-sum-exp of its probabilities) over the
        # whole vocabulary every step for nothing to recycle
        self._capture = self.tree_drafter.recycling is not None
        self._draft_caps: dict[tuple[int, int], int] = {}  # (drafting requests, context octave) -> nodes per request
        self.stats.update(prompt_topk_rows=0, prompt_topk_s=0.0, prompt_forward_s=0.0, foreign_drafts=0,
                          padded_drafts=0, undrafted_steps=0, probe_steps=0)
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

    def _probe_nodes(self) -> int:
        """Nodes per request (root included) while no measured model prices a draft
        (step_model.py): one draft on every other step, none on the others, so the first fit
        sees the same batch with and without drafts. Counted in ``stats["probe_steps"]``."""
        self.stats["probe_steps"] += 1
        return min(2, self.num_speculative_tokens + 1) if self.stats["steps"] % 2 else 1

    def _propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings) -> list[list[int]]:
        self.stats["foreign_drafts"] = self.tree_batch.foreign_drafts  # rows verified as chains (tree.py)
        self.stats["padded_drafts"] = self.tree_batch.padded_drafts  # vLLM's placeholder drafts, chains too
        if self.tree_drafter.method == DYNAMIC:
            return super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        step = self.tree_batch.step
        if step is None:
            raise RuntimeError("TokenRecyclingTreeProposer.propose ran before any step: are tkernels' vLLM patches installed?")
        self.stats["steps"] += 1
        captured, self._captured = self._captured, []
        self._observe_trees(step, captured, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        for key in set(self.tree_drafter.keys()) - set(step.req_ids):  # finished or preempted
            self.tree_drafter.release(key)
        lengths = np.asarray(num_tokens_no_spec[:len(sampled_token_ids)], dtype=np.int64)
        sampled = np.fromiter(map(bool, sampled_token_ids), bool, len(sampled_token_ids))
        active = np.flatnonzero(sampled & (lengths + 1 < self.max_model_len))
        drafts = [[] for _ in sampled_token_ids]
        num_nodes = self.num_speculative_tokens + 1
        if active.size and self.per_batch:
            # Draft no more per request than this batch can pay for under the step model (the
            # dynamic policy's size at its prior estimates: 128 nodes at batch 1, 8 at 32 on an
            # H100-class Llama-3-8B), so a large batch never pays the host time of drafting big
            # trees it would cut (drafting costs: bench/bench_drafters.py); choose() then prices
            # the drafted nodes by their own estimates (the template has none and keeps them all).
            # The policy learns the drafter's real acceptance on this path (_learn_acceptance: the
            # accepted nodes' ranks among their siblings), so the sizes are recomputed every
            # CAP_REFRESH_STEPS steps, and at every refit of the latency model (_measure_step).
            # Every node attends to its request's context: priced at the drafting requests' mean,
            # caps kept per batch size and context octave (a lone request at 1k tokens on a CPU
            # pays ~5 ms of attention per node, ten times its matmuls: docs/vllm.md).
            if self.stats["steps"] % CAP_REFRESH_STEPS == 0:
                self._draft_caps.clear()
            context = mean_context(lengths, active)
            key = (active.size, context.bit_length())
            if not self.step_model.measured:  # nothing prices a draft yet: probe (step_model.py)
                num_nodes = self._probe_nodes()
            else:
                if key not in self._draft_caps:
                    self._draft_caps[key] = len(self.policy.choose(active.size, num_nodes, context=context))
                num_nodes = self._draft_caps[key]
                if num_nodes <= 1:  # no draft pays at this batch on this machine: skip drafting altogether
                    self.stats["undrafted_steps"] += 1
        if not active.size or num_nodes <= 1:
            self.tree_batch.propose(step.req_ids, drafts)
            return drafts
        rows = active.tolist()
        lengths = lengths[active]
        trees = self.tree_drafter.draft_batch([step.req_ids[i] for i in rows],
                                              [token_ids_cpu[i, :n] for i, n in zip(rows, lengths.tolist())], num_nodes)
        if self.per_batch and self.step_model.measured:  # methods with estimates; others keep the whole budget
            trees = self.tree_drafter.choose_batch(trees, context=context)
        room = self.max_model_len - lengths  # nodes that fit before the context limit, root included
        if (trees.sizes > room).any():
            trees = trees.rows(np.arange(len(trees)), np.minimum(trees.sizes, room))  # BFS prefixes: still trees
        tokens, bounds = trees.tokens.tolist(), trees.cu.tolist()
        if len(rows) == len(drafts):  # every row drafted (a server's common step)
            drafts = [tokens[start + 1:end] for start, end in itertools.pairwise(bounds)]
            batch_rows = range(len(rows))
        else:
            batch_rows = [-1] * len(drafts)
            for b, i in enumerate(rows):
                drafts[i] = tokens[bounds[b] + 1:bounds[b + 1]]
                batch_rows[i] = b
        self.tree_batch.propose(step.req_ids, drafts, trees, batch_rows)
        return drafts

    def _observe_trees(self, step, captured, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> None:
        """Teach the drafter this step's verification: every verified node's top-k (rows matched
        as in :meth:`_recycle`) and each tree's accepted path (verification's, ``step.accepted``),
        the step's trees as one batch. Rows verified as chains (their draft was not their tree:
        tree.py) teach nothing; rows without a draft teach their root's row."""
        num_reqs = len(step.req_ids)
        if len(sampled_token_ids) != num_reqs:
            self.stats["skipped_steps"] += 1
            return
        # rows that sampled tokens (a failed row's first is tree.FAILED_TOKEN: nothing to learn)
        counts = np.fromiter((len(s) if s and s[0] >= 0 else 0 for s in sampled_token_ids), np.int64, num_reqs)
        cu_nodes = step.cu_nodes.numpy()
        total = int(cu_nodes[-1])
        top = next(((ids, probs) for ids, probs in captured if ids.shape[0] == total), None)
        parts, on_path, part_rows = [], [], []
        tree_rows = np.flatnonzero(step.is_tree) if step.accepted is not None else np.zeros(0, np.int64)
        if tree_rows.size:
            nodes, num = (t.numpy() for t in step.accepted)
            # a tree row's sampled tokens are its accepted path's drafts and the bonus token
            learn = (counts[tree_rows] > 0) & (counts[tree_rows] == num[tree_rows])
        if tree_rows.size and learn.any():
            trees = step.trees.rows(np.flatnonzero(learn))
            rows = tree_rows[learn]
            parts.append(trees)
            on_path.append(self._learn_acceptance(trees, nodes, num, rows))
            part_rows.append(rows)
        roots = np.flatnonzero((step.num_nodes == 1) & (counts > 0))  # no draft: its root's row alone
        if roots.size:
            lengths = np.asarray(num_tokens_no_spec[:num_reqs], dtype=np.int64)[roots]
            tokens = token_ids_cpu[roots, lengths - counts[roots] - 1].astype(np.int64)
            parts.append(DraftBatch(torch.from_numpy(tokens), torch.full((roots.size,), -1, dtype=torch.int32),
                                    np.arange(roots.size + 1, dtype=np.int64), [step.req_ids[r] for r in roots.tolist()],
                                    scores=torch.ones(roots.size, dtype=torch.float64),  # a root is committed
                                    node_depths=np.zeros(roots.size, np.int64)))
            on_path.append(np.ones(roots.size, bool))
            part_rows.append(roots)
        if not parts:
            return
        if top is None and self._capture:
            self.stats["skipped_steps"] += 1
            return
        trees, on_path = DraftBatch.cat(parts), np.concatenate(on_path) if len(on_path) > 1 else on_path[0]
        ids, probs = top or (None, None)  # on the host already (load_model's capture); none without an adjacency
        if len(parts) > 1 or trees.num_nodes != total:
            # the learning nodes' rows of the step (verified rows without a tree or a path teach
            # nothing); in row order, as the rows were verified (a token at several nodes: the
            # last one's row). In the common step every verified node learns, in order: no gather.
            cu_nodes = cu_nodes.astype(np.int64)
            index = np.concatenate([ragged_arange(cu_nodes[rows], step.num_nodes[rows]) for rows in part_rows])
            if len(parts) > 1:
                order = np.argsort(np.concatenate(part_rows), kind="stable")
                nodes = ragged_arange(trees.cu[:-1][order], trees.sizes[order])
                trees, index, on_path = trees.rows(order), index[nodes], on_path[nodes]
            if ids is not None and index.size != total:
                rows = torch.from_numpy(index)
                ids, probs = ids[rows], probs[rows]
        self.tree_drafter.observe_batch(trees, ids, probs, on_path)
        self.stats["recycled_steps"] += 1
        self.stats["recycled_rows"] += trees.num_nodes

    def _learn_acceptance(self, trees: DraftBatch, nodes: np.ndarray, num: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The accepted paths of ``trees`` (verification's ``nodes[rows[b], :num[rows[b]]]`` for
        tree ``b``) as a bool mask over their nodes, and what they teach the size policy
        (per-(depth, rank) estimates) of this drafter's trees: at each depth of an accepted path,
        the accepted node's rank among its siblings, and a miss (-1) below the last accepted node
        when the tree had children there (:func:`batch_sibling_ranks`, in one compiled pass)."""
        from tkernels.spec.drafting.kernels import accepted_paths, update_rank_estimates  # numba: on first use

        on_path = np.empty(trees.num_nodes, bool)
        ranks = np.empty((len(trees), self.policy.max_depth), np.int64)
        observed = np.empty(len(trees), np.int64)
        accepted_paths(trees.parents.numpy(), trees.cu, trees.depths, nodes, num, rows, self.policy.max_depth, on_path,
                       ranks, observed)
        # policy.update(ranks, observed), compiled (its numpy is the reference; these ranks need no check)
        update_rank_estimates(self.policy.hits.numpy(), self.policy.trials.numpy(), self.policy.decay, ranks, observed)
        return on_path

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
            ids, probs = host_topk.top_k_probs(self._compute_logits(hidden_states[index]), self.drafter.k)
            self.tree_drafter.recycle(tokens[at:at + PROMPT_TOPK_CHUNK], ids, probs)
        if hidden_states.is_cuda:
            torch.cuda.synchronize(hidden_states.device)
        self.stats["prompt_topk_rows"] += rows.numel()
        self.stats["prompt_topk_s"] += time.perf_counter() - start
        self.stats["prompt_forward_s"] += forward_s

    def _draft(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu):
        rows = [i for i, s in enumerate(sampled_token_ids) if s]
        if rows and self.per_batch:  # as _propose sizes them: a probe, or priced at the drafting rows' mean context
            if not self.step_model.measured:
                self._num_nodes = self._probe_nodes()
            else:
                context = mean_context(num_tokens_no_spec, rows)
                self._num_nodes = len(self.policy.choose(len(rows), self.num_speculative_tokens + 1, context=context))
        return super()._draft(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)

    def _verified_drafts(self, row: int, sampled: list[int], num_tokens: int, token_ids_cpu: np.ndarray) -> list[int]:
        step = self.tree_batch.step
        return step.drafts[row] if step is not None and row < len(step.drafts) else []

    def _remember(self, drafted, num_tokens_no_spec, token_ids_cpu) -> None:
        step = self.tree_batch.step
        if step is None:
            raise RuntimeError("TokenRecyclingTreeProposer.propose ran before any step: are tkernels' vLLM patches installed?")
        trees = [tree for tree in drafted if tree is not None and len(tree) > 1]
        rows = list(itertools.accumulate((tree is not None and len(tree) > 1 for tree in drafted), initial=-1))[1:]
        drafts = [tree.tokens[1:].tolist() if tree is not None and len(tree) > 1 else [] for tree in drafted]
        self.tree_batch.propose(step.req_ids, drafts, DraftBatch.from_trees(trees), rows)
