"""The path proposer, :class:`TokenRecyclingProposer` (the module doc of
:mod:`tkernels.plugins.vllm.proposer` describes it): the capture of the target's top-k, the
matching of logits rows to verified tokens, and best-path drafts of tkernels' drafter
(:class:`~tkernels.spec.drafters.TreeDrafter`, method ``dynamic``). The tree proposer
(:mod:`tkernels.plugins.vllm.tree_proposer`) builds on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tkernels.plugins.vllm import tree as tree_step
from tkernels.spec import TOP_K, TokenRecycling, TreeShape, host_topk
from tkernels.spec.drafters import DYNAMIC, DraftTree, TreeDrafter
from tkernels.spec.tree import token_recycling_tree

__all__ = ["TokenRecyclingProposer", "draft_tree"]


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
    """vLLM ``custom_class`` proposer; see :mod:`tkernels.plugins.vllm.proposer` for what it does and does not do."""

    _best_path = True  # vLLM verifies linear drafts: the drafter's best path (the tree proposer: its best nodes)

    def __init__(self, vllm_config) -> None:
        from tkernels.plugins.vllm.compat import require_supported_vllm

        require_supported_vllm()
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        vocab_size = int(vllm_config.model_config.get_vocab_size())
        self.drafter = TokenRecycling(vocab_size, TOP_K)  # the adjacency; CPU: drafting works on host lists anyway
        # tkernels' drafter, method dynamic (per-(depth, rank) estimates): each row's best path
        self.tree_drafter = TreeDrafter(vocab_size, DYNAMIC, TOP_K, max_depth=self.num_speculative_tokens,
                                        recycling=self.drafter, candidates=self._draft_shape(self.num_speculative_tokens),
                                        path=self._best_path)
        self.policy = self.tree_drafter.dynamic.policy
        self._num_nodes = self.num_speculative_tokens + 1  # this step's node count, root included (the tree proposer's)
        # (top-k ids, their probabilities or None) of every compute_logits call since the last propose
        self._captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._host_buffers: dict[str, torch.Tensor] = {}  # pinned buffers of the captures' host copies
        # Only the harness's drafters read the probabilities: the others skip the logsumexp
        # over the whole [rows, vocab] logits (and their fp32 copy) on every target step.
        self._capture_probs = False
        self._capture = True  # whether the drafter learns from the target's top-k at all
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
                if not self._capture:
                    return logits
                top = host_topk.top_k_probs(logits, self.drafter.k) if self._capture_probs \
                    else (host_topk.top_k_ids(logits, self.drafter.k), None)  # compiled on a CPU: every target step pays it
                # to the host without a sync (read in propose, after vLLM's read of the sampled tokens)
                n = len(self._captured)
                self._captured.append(tuple(None if t is None else tree_step.host_copy(t, self._host_buffers, f"{name}{n}")
                                            for name, t in zip(("ids", "probs"), top)))
            return logits

        target_model.compute_logits = compute_logits
        if self._capture and not torch.cuda.is_available():  # logits on the host: the compiled top-k captures them
            host_topk.warm_up()  # loaded (or compiled, on a machine's first run) before serving, not in a step

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
        return [[] if tree is None else tree.tokens[1:].tolist() for tree in drafted]

    def _remember(self, drafted, num_tokens_no_spec, token_ids_cpu) -> None:
        """Keep each row's draft, to find its logits rows in the next step."""
        self._drafts = [
            _Draft(int(num_tokens_no_spec[i]), int(token_ids_cpu[i, num_tokens_no_spec[i] - 1]), tree.tokens[1:].tolist())
            if tree is not None and len(tree) > 1 else None
            for i, tree in enumerate(drafted)
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
        self.tree_drafter.recycle(torch.tensor(tokens, dtype=torch.int64), top[torch.tensor(rows, device=top.device)])
        self.stats["recycled_steps"] += 1
        self.stats["recycled_rows"] += len(rows)

    def _observe(self, parents: list[list[int]], children: list[list[int]]) -> None:
        """Teach the drafter which candidate the target chose after each committed token, against
        the rows the drafts were made from (before this step's update)."""
        width = max(map(len, children))
        padded = torch.zeros(2, len(children), width, dtype=torch.int64)
        for b, (parent, child) in enumerate(zip(parents, children)):
            padded[0, b, :len(parent)] = torch.tensor(parent)
            padded[1, b, :len(child)] = torch.tensor(child)
        self.tree_drafter.observe_ranks(padded[0], padded[1], torch.tensor([len(c) for c in children]))

    # --- drafting -----------------------------------------------------------------------------

    def _draft(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu) -> list[DraftTree | None]:
        """Per row, the drafter's tree (root first; a path here) cut to the room left, or None."""
        drafted: list[DraftTree | None] = [None for _ in sampled_token_ids]
        active = [
            i for i, s in enumerate(sampled_token_ids)
            if s and int(num_tokens_no_spec[i]) + 1 < self.max_model_len
        ]
        if not active:
            return drafted
        lengths = np.asarray(num_tokens_no_spec)[active]
        histories = [token_ids_cpu[i, :n] for i, n in zip(active, lengths)]
        for i, n, tree in zip(active, lengths, self.tree_drafter.draft(active, histories, self._num_nodes)):
            room = self.max_model_len - int(n) - 1
            drafted[i] = tree.select(torch.arange(room + 1)) if len(tree) > room + 1 else tree  # a BFS prefix
        return drafted
