"""Token Recycling drafts for SGLang's NGRAM speculation path.

    TKERNELS_SGLANG=token_recycling python -m sglang.launch_server --model-path M \\
        --speculative-algorithm NGRAM --speculative-num-draft-tokens 16

``--speculative-algorithm NGRAM`` is kept so SGLang's scheduler, KV allocation, verify forward
(TARGET_VERIFY with a tree mask) and KV moves are reused unchanged; the plugin swaps the worker
class (:class:`TokenRecyclingWorker`, an ``NGRAMWorker``) and verification
(:mod:`tkernels.plugins.sglang.verify`):

- drafting (:meth:`TokenRecyclingWorker._prepare_draft_tokens`): every request's last committed
  token is node 0 of a d-node tree (d = ``--speculative-num-draft-tokens``, at most 256) that
  tkernels' drafter (:class:`tkernels.spec.drafters.TreeDrafter`, method ``dynamic``) fills from
  the shared adjacency matrix (:class:`tkernels.spec.TokenRecycling`); the tree is the best
  d-node tree under the hardware-aware policy's live acceptance estimates
  (:class:`tkernels.spec.DynamicTreePolicy`; d is fixed by SGLang's buffers, so the policy picks
  which d-node tree, not its size). :class:`NgramDrafter` reshapes it into NGRAM's format: BFS
  tokens ``int64[bs*d]`` and ancestor masks ``bool[bs*d*d]``;
- after verification, the target logits at ALL tree nodes refresh the adjacency rows and the
  accepted path updates the policy (:meth:`NgramDrafter.observe`, called by the verify hook).

Mixed chunks: SGLang's NGRAM server-args handling turns ``--enable-mixed-chunk`` off, and its
mixed step runs decodes as plain one-token decodes; the plugin keeps that (see the README).
"""

from __future__ import annotations

import numpy as np
import torch
from sglang.srt.arg_groups.overrides import resolving_view
from sglang.srt.speculative.ngram_worker import NGRAMWorker

from tkernels.plugins.sglang.cpu import cpu_engine, use_triton_verify_mask
from tkernels.spec import MAX_TREE_NODES, TOP_K, TokenRecycling, ancestor_mask
from tkernels.spec.drafters import DYNAMIC, TreeDrafter


class NgramDrafter:
    """tkernels' :class:`~tkernels.spec.drafters.TreeDrafter` (``dynamic``: the policy's best
    d-node tree, every node drafted) reshaped into SGLang's NGRAM format, and taught from
    SGLang's verify outputs."""

    def __init__(self, vocab_size: int, num_nodes: int, k: int = TOP_K, device: torch.device | str = "cpu"):
        if not 1 <= num_nodes <= MAX_TREE_NODES:
            raise ValueError(f"--speculative-num-draft-tokens={num_nodes}: tkernels' trees hold 1 to "
                             f"{MAX_TREE_NODES} nodes")
        self.num_nodes = num_nodes
        self.tree_drafter = TreeDrafter(vocab_size, DYNAMIC, k, recycling=TokenRecycling(vocab_size, k, device=device))
        self.recycling, self.policy = self.tree_drafter.recycling, self.tree_drafter.dynamic.policy
        if len(self.shape()) != num_nodes:
            raise ValueError(f"--speculative-num-draft-tokens={num_nodes}: the tree policy builds trees of at most "
                             f"{len(self.shape())} nodes with k={k}")

    def shape(self):
        """The tree every request drafts at this step."""
        return self.tree_drafter.dynamic.policy_shape(self.num_nodes)

    def draft(self, last_tokens: torch.Tensor):
        """``(tokens int64[B*d], mask bool[B*d*d], parents int32[B*d])`` from the requests' last tokens.

        Every request drafts the same shape, so one ancestor mask serves all: ``mask[b*d*d + i*d + j]``
        is 1 iff j is i or an ancestor of i (:func:`tkernels.spec.to_sglang`'s layout).
        """
        if not last_tokens.numel():
            return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.bool), torch.empty(0, dtype=torch.int32))
        trees = self.tree_drafter.draft(range(last_tokens.numel()), last_tokens.view(-1, 1), self.num_nodes)
        mask = ancestor_mask(trees[0].parents.cpu()).flatten().repeat(len(trees))
        return torch.cat([t.tokens for t in trees]), mask, torch.cat([t.parents for t in trees])

    def observe(self, logits: torch.Tensor, draft_tokens: torch.Tensor, predict: torch.Tensor,
                accept_lens: torch.Tensor, accept_index: torch.Tensor) -> None:
        """Learn from one verify step given in SGLang's ``eagle_sample`` outputs.

        ``accept_index[b, j]`` is the flat index of the j-th accepted node (node 0 first, -1
        padded) and ``predict`` there holds the token the target chose after it, so the ranks of
        those tokens in their parents' adjacency rows (read before the rows are refreshed) are
        the policy's observations; then every node's row takes its logits' top-k.
        """
        nodes = accept_index.long().clamp(min=0)
        self.tree_drafter.observe_ranks(draft_tokens[nodes], predict[nodes].long(), accept_lens)
        self.tree_drafter.recycle(draft_tokens, *self.recycling.top_k(logits[:, : self.recycling.vocab_size]))


def last_committed_tokens(worker, batch) -> list[int]:
    """Each request's last committed token; under overlap scheduling the last round's accepted
    tokens are not yet in ``req.output_ids`` and come from ``batch.spec_info`` (as NGRAM does)."""
    last = [(req.output_ids or req.origin_input_ids_unpadded)[-1] for req in batch.reqs]
    if worker.enable_overlap and not batch.grammar_needs_sync():
        accept_lens = batch.spec_info.accept_lens.tolist()
        accept_tokens = batch.spec_info.accept_tokens.view(len(last), -1).tolist()
        last = [row[n - 1] if n > 0 else t for row, n, t in zip(accept_tokens, accept_lens, last)]
    return last


class TokenRecyclingWorker(NGRAMWorker):
    """SGLang's NGRAM worker drafting with Token Recycling (see the module docstring)."""

    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        super().__init__(server_args, gpu_id, nccl_port, target_worker)
        if cpu_engine():  # a backend that reads NGRAM's tree masks, in the layout it reads, or a start-up error
            use_triton_verify_mask(resolving_view(server_args).attention_backend)
        self.drafter = NgramDrafter(self.model_runner.model_config.vocab_size, self.draft_token_num, device=self.device)
        self.draft_parents: torch.Tensor | None = None

    def _prepare_draft_tokens(self, batch) -> tuple[np.ndarray, np.ndarray]:
        last = torch.tensor(last_committed_tokens(self, batch), dtype=torch.int64)
        tokens, mask, self.draft_parents = self.drafter.draft(last)
        return tokens.cpu().numpy(), mask.cpu().numpy()

    def _prepare_for_speculative_decoding(self, batch) -> None:
        super()._prepare_for_speculative_decoding(batch)
        if batch.forward_mode.is_target_verify():  # tell the verify hook whose tree this is
            batch.spec_info.tkernels_drafter = self.drafter
            batch.spec_info.tkernels_parents = self.draft_parents.to(batch.spec_info.draft_token.device)

    def _update_ngram_corpus(self, batch) -> None:
        """No n-gram corpus: the adjacency matrix learnt from the verify logits (in the verify hook)."""


def replace_ngram_worker(worker_cls):
    """``SpeculativeAlgorithm.create_worker``'s result with NGRAM's worker swapped for ours."""
    return TokenRecyclingWorker if worker_cls is NGRAMWorker else worker_cls
