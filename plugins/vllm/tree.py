"""Tree speculation inside vLLM: one step's trees, from the drafts to verification and KV compaction.

The patches that call into this module, and why each is needed, are in
:mod:`tkernels.plugins.vllm.patches`. A step goes: the proposer records the step's trees, one
:class:`~tkernels.spec.draft_tree.DraftBatch` with a row per request (:meth:`TreeBatch.propose`);
vLLM schedules a draft list per row (the tree's nodes in BFS order, possibly cut to a BFS
prefix); :meth:`TreeBatch.begin_step` builds the step's :class:`TreeStep` (one object: every
row's parents, offsets, node depths gathered from the proposals, seeds), checks the trees once on the
host (:func:`tkernels.spec.check_trees`), moves them to the device once, and overwrites the tree
nodes' RoPE positions; the attention backend plans with the host copies (no read back from the
device) and masks each tree node to its ancestors; :meth:`TreeBatch.verify` verifies the trees
(``checked=``: not validated again, one device read for unusable logits), compacts the
accepted paths' K/V (``checked=True``: no device read) and leaves the accepted nodes, copied to
the host without a sync (:func:`host_copy`), for the proposer to learn from.

Verification. The step's logits (row ``j`` of a request = tree node ``j``) go to
:func:`tkernels.spec.verify_greedy` (all requests greedy) or :func:`tkernels.spec.verify_sampling`
(exact sampling with each request's temperature, top-k and top-p, deterministic drafts).
Unseeded requests draw from torch's default generator, as vLLM's sampler does; a seeded
request's node at depth ``d`` draws the token at sequence index ``root + d + 1`` with
:func:`tkernels.spec.keyed_uniforms` of (seed, index), so its output depends on its seed and
prompt alone, never on what was drafted, the drafter's state, the draft size or the batch
(vLLM's per-request generators go unused and are dropped). The accepted path tokens + bonus are
returned in vLLM's ``SamplerOutput`` layout (padded with vLLM's placeholder id), so vLLM's
bookkeeping, ``num_computed_tokens`` rollback and spec-decode metrics (accepted = generated - 1)
work unchanged. KV compaction (:func:`tkernels.spec.compact_kv`) then moves the accepted path's
K/V from position ``num_computed + node`` to ``num_computed + depth`` in every layer's cache.

A draft that is not (a BFS prefix of) the tree the proposer made for that request (vLLM
replaced it, or the request was rescheduled in a way the proposer did not see) is verified
as a chain: causal attention, the draft tokens in order, which is exactly lossless for any
draft. That row is counted (``TreeBatch.foreign_drafts``) and the first one logged; no
inconsistency in one request raises out of the engine. vLLM's own placeholder drafts (``-1``
tokens: it pads a request scheduled a single token, such as a new request whose prompt is in
the prefix cache, to the speculative budget) are chains too, counted apart
(``TreeBatch.padded_drafts``) and not logged.

With ``TKERNELS_VLLM_CPU_ATTENTION=native``, ``=compiled``, ``=torch`` or ``=reference`` verification runs its torch
reference and compaction :func:`tkernels.spec.compact_kv_cpu` (no Triton kernel runs on vLLM-CPU).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from tkernels.spec import (
    CheckedTrees,
    check_trees,
    compact_kv,
    compact_kv_cpu,
    depths,
    keyed_uniforms,
    verify_greedy,
    verify_greedy_reference,
    verify_sampling,
    verify_sampling_reference,
)
from tkernels.spec.draft_tree import DraftBatch, offsets, ragged_arange
from tkernels.spec.verify.inputs import UNIFORM_COLUMNS

TREE_PROPOSER = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"
logger = logging.getLogger("vllm.tkernels")  # vLLM's handlers and format, with the process name
# A request whose step failed in the worker (non-finite logits) gets this in place of its tokens
# in vLLM's SamplerOutput: negative, so never a token id, and not vLLM's placeholder (-1), so
# vLLM's output parsing keeps it. Patch 6 (patches.py) turns it into vLLM's per-request error.
FAILED_TOKEN = -2
# The token vLLM's scheduler fills a draft with when it pads a request scheduled one token to
# 1 + num_speculative_tokens (a new request whose prompt is in the prefix cache but its last token).
PLACEHOLDER_DRAFT = -1


def is_tree_config(speculative_config) -> bool:
    return (speculative_config is not None and getattr(speculative_config, "method", None) == "custom_class"
            and getattr(speculative_config, "model", None) == TREE_PROPOSER)


def _cpu_reference_mode() -> bool:
    from tkernels.plugins.vllm.compat import CPU_PYTORCH_MODES, cpu_test_mode

    return cpu_test_mode() in CPU_PYTORCH_MODES


# --- the per-step tree state -------------------------------------------------------------------


class Proposal(NamedTuple):
    """A request's proposed tree: row ``row`` of the step's proposed trees (one batch for the step;
    a tuple: a server makes one per request per step)."""

    tokens: list[int]  # the row's draft list: tree nodes 1..n in BFS order
    trees: DraftBatch  # the proposing step's trees, every drafted row
    row: int  # this request's tree in ``trees``

    @property
    def parents(self) -> torch.Tensor:
        """The tree's parents, int32 [n + 1] (root included)."""
        return self.trees.parents[int(self.trees.cu[self.row]):int(self.trees.cu[self.row + 1])]


@dataclass
class TreeStep:
    """This step's trees, row by row of the persistent batch, built once by :meth:`TreeBatch.begin_step`
    (rows without a draft: 1-node trees; rows whose draft is not their proposer's tree: chains)."""

    req_ids: list[str]
    drafts: list[list[int]]  # the draft tokens each row was verified with, as scheduled
    prefix: np.ndarray  # num_computed_tokens per row: node 0's position
    num_nodes: np.ndarray  # 1 + len(drafts[i])
    parents: torch.Tensor  # int32 [sum(num_nodes)], the verification trees (local indices)
    cu_nodes: torch.Tensor  # int32 [num_reqs + 1]
    seeds: list[int | None] | None = None  # each row's sampling seed (None: unseeded), read by verify unless all greedy
    root_position: np.ndarray | None = None  # index in its sequence of each row's node 0 (logits row)
    node_depths: torch.Tensor | None = None  # int64 [sum(num_nodes)], depth of every node (computed once)
    is_tree: np.ndarray | None = None  # bool [num_reqs]: verified as its proposer's tree (else chain or no draft)
    checked: CheckedTrees | None = None  # check_trees of parents/cu_nodes: verification trusts them
    device_trees: tuple[torch.Tensor, torch.Tensor] | None = None  # (parents, cu_nodes) on the device, moved once
    # the tree rows' trees (rows np.flatnonzero(is_tree), in order) as verified: their proposals cut
    # to what was scheduled; the proposer learns from them (their tokens, keys, drafter fields)
    trees: DraftBatch | None = None
    # verification's accepted nodes [num_reqs, width] (local indices, root first, -1 padded) and
    # their counts [num_reqs], on the host once vLLM has read the sampled tokens (:func:`host_copy`)
    accepted: tuple[torch.Tensor, torch.Tensor] | None = None
    # with the proposer's prompt_topk: the step's prompt tokens (indices into its tokens, their ids)
    prompt_rows: torch.Tensor | None = None
    prompt_tokens: torch.Tensor | None = None
    started: float | None = None  # perf_counter() when the step began: the proposer times it (step_model.py)

    def seeded_uniforms(self, uniforms: torch.Tensor) -> torch.Tensor:
        """``uniforms`` with the seeded rows' nodes drawn from :func:`keyed_uniforms`: node ``i`` of
        row ``r`` samples the token at index ``root_position[r] + depth(i) + 1``, so a seeded
        request's tokens depend on its seed and its sequence alone (not on drafts or batch)."""
        rows = [r for r, seed in enumerate(self.seeds or ()) if seed is not None]
        if not rows:
            return uniforms
        counts = self.num_nodes[rows]
        index = torch.from_numpy(ragged_arange(self.cu_nodes.numpy()[rows].astype(np.int64), counts))
        root = torch.from_numpy(np.repeat(self.root_position[rows], counts))
        seeds = np.repeat(np.array([self.seeds[r] for r in rows], dtype=np.int64), counts).tolist()
        node_depth = self.node_depths if self.node_depths is not None else depths(self.parents, self.cu_nodes).long()
        device = uniforms.device
        uniforms[index.to(device)] = keyed_uniforms(seeds, (root + node_depth[index]).add_(1).to(device))
        return uniforms


def host_copy(tensor: torch.Tensor, buffers: dict, name: str) -> torch.Tensor:
    """``tensor``'s host copy without a synchronisation: on a GPU, copied ``non_blocking`` into a
    pinned buffer (``buffers[name]``, grown as needed and reused step after step), readable once the
    stream has reached this point, which vLLM's own read of the step's sampled tokens (enqueued
    later on the same stream) guarantees before the proposer reads it; on the CPU the tensor itself."""
    if tensor.device.type == "cpu":
        return tensor
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != tensor.dtype or buffer.numel() < tensor.numel():
        buffer = buffers[name] = torch.empty(max(tensor.numel(), 2 * (0 if buffer is None else buffer.numel())),
                                             dtype=tensor.dtype, pin_memory=True)
    out = buffer[:tensor.numel()].view(tensor.shape)
    out.copy_(tensor, non_blocking=True)
    return out


def _verified_trees(proposals: list[Proposal], counts: np.ndarray) -> DraftBatch:
    """The proposals' trees cut to ``counts`` nodes (as scheduled), as one batch in their order
    (they come from one proposing step's batch but for requests scheduled late: one gather)."""
    rows = np.fromiter((p.row for p in proposals), np.int64, len(proposals))
    first = proposals[0].trees
    if all(p.trees is first for p in proposals):
        return first.rows(rows, counts)
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(proposals):
        groups.setdefault(id(p.trees), []).append(j)
    merged = DraftBatch.cat([proposals[js[0]].trees.rows(rows[js], counts[js]) for js in groups.values()])
    return merged.rows(np.argsort([j for js in groups.values() for j in js]))


def _tree_builders(runner) -> list:
    """The runner's attention metadata builders that take a step's trees (tkernels' backend's)."""
    groups = getattr(runner, "attn_groups", None) or ()
    return [builder for group in itertools.chain.from_iterable(groups) for builder in group.metadata_builders
            if hasattr(builder, "step_trees")]


class TreeBatch:
    """What the tree proposer and the runner patches share: the proposer's trees per request
    (``proposed``), and the step being run (``step``)."""

    def __init__(self) -> None:
        self.proposed: dict[str, Proposal] = {}
        self.step: TreeStep | None = None
        self._kv_planes: list[torch.Tensor] | None = None
        self.foreign_drafts = 0  # rows verified as a chain: their draft was not their proposer's tree
        self.padded_drafts = 0  # rows verified as a chain: vLLM's placeholder draft (not logged)
        self._builders: list = []  # the runner's builders the step's trees are handed to
        self.trees: tuple[torch.Tensor, torch.Tensor] | None = None
        self.trees_host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._host_buffers: dict[str, torch.Tensor] = {}  # pinned buffers of host_copy

    def attention_trees(self, runner, trees: tuple[torch.Tensor, torch.Tensor] | None,
                        host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Hand this step's ``(tree_parents int32 [num_tokens], is_tree bool [num_reqs])`` on the
        device (None: no tree rows) and their host copies with every token's depth, ``(tree_parents,
        is_tree, tree_depths int64 [num_tokens])``, to the attention metadata builders of
        ``runner``, which plan with the host copies (checked here: the builders trust them)."""
        if not self._builders:  # found once the runner has its attention groups
            self._builders = _tree_builders(runner)
        for builder in self._builders:
            builder.step_trees = trees
            builder.step_trees_host = host
        self.trees = trees  # what the builders were handed (tests read it)
        self.trees_host = host

    def propose(self, req_ids: Sequence[str], drafts: Sequence[list[int]], trees: DraftBatch | None = None,
                rows: Sequence[int] | None = None) -> None:
        """Record the trees the requests were proposed: request ``req_ids[i]`` drafted
        ``drafts[i]``, the nodes 1.. of tree ``rows[i]`` of ``trees`` (one batch for the step); no
        draft: forget any older one."""
        if all(drafts):  # every request drafted (a server's common step): one bulk update
            self.proposed.update(zip(req_ids, map(Proposal, drafts, itertools.repeat(trees), rows)))
            return
        for i, (req_id, tokens) in enumerate(zip(req_ids, drafts)):
            if tokens:
                self.proposed[req_id] = Proposal(tokens, trees, rows[i])
            else:
                self.proposed.pop(req_id, None)

    def _foreign(self, req_id: str, draft: list[int], num_scheduled: int) -> None:
        """Count a row whose scheduled draft is not (a BFS prefix of) its proposal (verified as a
        chain): vLLM's placeholder padding (``-1`` drafts for a request scheduled a single token,
        e.g. a prompt found whole in the prefix cache) apart, as it is expected; any other is
        logged the first time."""
        if draft[0] == PLACEHOLDER_DRAFT:
            self.padded_drafts += 1
            return
        self.foreign_drafts += 1
        if self.foreign_drafts == 1:
            logger.warning("tkernels tree speculation: request %s was scheduled a draft of %d tokens in %d that is not "
                           "(a BFS prefix of) its proposer's tree; it is verified as a chain (lossless). Such rows "
                           "are counted in the proposer's stats['foreign_drafts']; this is logged once.",
                           req_id, len(draft), num_scheduled)

    def verification_trees(self, req_ids: Sequence[str], drafts: Sequence[list[int]], scheduled_tokens: np.ndarray):
        """Each row's verification tree, from the requests' proposals: ``(num_nodes, cu_nodes,
        parents, node_depths, is_tree, trees)``, numpy arrays (parents int32, local; depths
        int64) and the tree rows' :class:`DraftBatch` (None without one). A row whose draft is
        a BFS prefix of its proposal is that tree; any other row is a chain (no draft: the
        1-node chain)."""
        num_nodes = np.fromiter(map(len, drafts), np.int64, len(drafts)) + 1
        cu_nodes = offsets(num_nodes)
        scheduled = scheduled_tokens.tolist()
        pop = self.proposed.pop
        proposals, rows = [], []
        # A row is its tree when it was scheduled 1 + n tokens and its draft is the first n of its
        # proposal's (a BFS prefix); else a chain (one loop: a server's step checks every row).
        for i in np.flatnonzero(num_nodes > 1).tolist():
            proposal, draft = pop(req_ids[i], None), drafts[i]
            n = len(draft)
            if (proposal is not None and scheduled[i] == n + 1
                    and (proposal.tokens == draft if len(proposal.tokens) == n else proposal.tokens[:n] == draft)):
                proposals.append(proposal)
                rows.append(i)
            else:
                self._foreign(req_ids[i], draft, scheduled[i])
        is_tree = np.zeros(len(drafts), dtype=bool)
        trees = None
        if proposals:
            rows = np.array(rows, np.int64)
            is_tree[rows] = True
            trees = _verified_trees(proposals, num_nodes[rows])
            if rows.size == len(drafts):  # every row is its tree (a server's common step): the trees' own arrays
                return num_nodes, cu_nodes, trees.parents.numpy(), trees.depths, is_tree, trees
        local = np.arange(cu_nodes[-1], dtype=np.int64) - np.repeat(cu_nodes[:-1], num_nodes)
        parents, node_depths = (local - 1).astype(np.int32), local  # a chain's depth is its local index
        if proposals:  # the tree rows' nodes' parents and depths: the proposals', gathered once
            nodes = ragged_arange(cu_nodes[:-1][rows], num_nodes[rows])
            parents[nodes] = trees.parents.numpy()
            node_depths[nodes] = trees.depths
        return num_nodes, cu_nodes, parents, node_depths, is_tree, trees

    # patch 1 ------------------------------------------------------------------------------------
    def begin_step(self, runner, scheduler_output, num_scheduled_tokens: np.ndarray) -> None:
        """Build the step's trees (one :class:`TreeStep`, checked once on the host and moved to the
        device once) and overwrite the tree nodes' RoPE positions."""
        started = time.perf_counter()
        for req_id in scheduler_output.finished_req_ids:
            self.proposed.pop(req_id, None)
        num_reqs = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        prefix = runner.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        scheduled_tokens = np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64)
        scheduled = scheduler_output.scheduled_spec_decode_tokens
        drafts = [list(scheduled.get(req_id, ())) for req_id in req_ids]
        num_nodes, cu_nodes, parents, node_depths, is_tree, trees = self.verification_trees(req_ids, drafts,
                                                                                            scheduled_tokens)
        host_depths = node_depths
        parents, node_depths = torch.from_numpy(parents), torch.from_numpy(node_depths)
        cu = torch.from_numpy(cu_nodes).int()
        device = runner.positions.device
        self.step = TreeStep(
            req_ids=req_ids, drafts=drafts, prefix=prefix, num_nodes=num_nodes, parents=parents, cu_nodes=cu,
            root_position=prefix + scheduled_tokens - num_nodes,
            node_depths=node_depths, is_tree=is_tree, started=started, trees=trees,
            checked=check_trees(parents, cu, node_depths).to(device),  # the one validation of the step's trees
            device_trees=(parents.to(device), cu.to(device)),
        )
        # Seeded rows draw from keyed_uniforms, never from vLLM's per-request generators. Dropping
        # them also keeps vLLM-CPU from rewinding a CPU generator after a partial prefill chunk
        # (``set_offset``, which CPU generators lack: a crash with seeded chunked prompts).
        generators = getattr(runner.input_batch, "generators", None)
        if generators:
            generators.clear()
        starts = np.cumsum(scheduled_tokens) - scheduled_tokens  # each row's first token
        if getattr(getattr(runner, "drafter", None), "prompt_topk", False):
            self._prompt_positions(runner, scheduled_tokens, starts, prefix)
        if not is_tree.any():
            self.attention_trees(runner, None)
            return
        # Tree rows hold exactly 1 + n scheduled tokens, node j at token starts[i] + j.
        rows = np.flatnonzero(is_tree)
        if rows.size == num_reqs:  # every row a tree: the step's tokens are its nodes, in order
            positions = np.repeat(prefix, num_nodes) + host_depths  # the roots' is vLLM's own (= prefix)
            runner.positions[:positions.size] = torch.from_numpy(positions).to(device, runner.positions.dtype)
            tree_parents, tree_depths, device_parents = parents, node_depths, self.step.device_trees[0]
        else:
            node_rows = np.repeat(rows, num_nodes[rows])
            nodes = ragged_arange(cu_nodes[:-1][rows], num_nodes[rows])
            token = starts[node_rows] + nodes - cu_nodes[node_rows]
            tree_parents = np.full(int(scheduled_tokens.sum()), -1, dtype=np.int32)
            tree_parents[token] = trees.parents.numpy()
            tree_depths = np.zeros(tree_parents.size, dtype=np.int64)
            tree_depths[token] = trees.depths
            drafted = trees.depths > 0  # the roots keep vLLM's position (= prefix)
            new_positions = torch.from_numpy(prefix[node_rows][drafted] + trees.depths[drafted])
            runner.positions[torch.from_numpy(token[drafted]).to(device)] = new_positions.to(device, runner.positions.dtype)
            tree_parents, tree_depths = torch.from_numpy(tree_parents), torch.from_numpy(tree_depths)
            device_parents = tree_parents.to(device)
        host_is_tree = torch.from_numpy(is_tree)
        self.attention_trees(runner, (device_parents, host_is_tree.to(device)),
                             (tree_parents, host_is_tree, tree_depths))

    def _prompt_positions(self, runner, num_scheduled_tokens: np.ndarray, starts: np.ndarray, prefix: np.ndarray) -> None:
        """Record which of the step's tokens are prompt tokens (prefill chunks), for prompt_topk."""
        batch = runner.input_batch
        rows, tokens = [], []
        for i in range(len(prefix)):
            m = min(int(num_scheduled_tokens[i]), int(batch.num_prompt_tokens[i]) - int(prefix[i]))
            if m > 0:
                rows.append(torch.arange(int(starts[i]), int(starts[i]) + m))
                tokens.append(torch.from_numpy(batch.token_ids_cpu[i, prefix[i]:prefix[i] + m].astype(np.int64)))
        if rows:
            self.step.prompt_rows, self.step.prompt_tokens = torch.cat(rows), torch.cat(tokens)

    # patch 3 ----------------------------------------------------------------------------
    def verify(self, runner, logits: torch.Tensor, spec_decode_metadata):
        """Tree verification + KV compaction; vLLM's ``SamplerOutput`` for the step. Steps without
        any draft (``spec_decode_metadata`` None: one logits row per request) come here too, so
        every token of a seeded request is drawn by the same keyed rule."""
        from vllm.v1.outputs import SamplerOutput
        from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

        self.attention_trees(runner, None)  # the step's trees end with its verification (dummy runs plan none)
        step = self.step
        num_reqs = 0 if step is None else len(step.req_ids)
        drafts = [0] * num_reqs if spec_decode_metadata is None else list(spec_decode_metadata.num_draft_tokens)
        if step is None or step.num_nodes.tolist() != [d + 1 for d in drafts] or logits.shape[0] != sum(drafts) + num_reqs:
            raise RuntimeError("tkernels tree speculation: the step's logits rows do not match the trees of its rows")
        device = logits.device
        if spec_decode_metadata is None:  # 1-node trees: node 0's token is never compared
            node_tokens = torch.zeros(num_reqs, dtype=torch.int64, device=device)
        else:
            node_tokens = runner.input_ids.gpu.index_select(0, spec_decode_metadata.logits_indices).long()
        parents, cu_nodes = step.device_trees  # moved once, by begin_step
        reference = _cpu_reference_mode()
        sampling = runner.input_batch.sampling_metadata
        # unseeded rows: torch's default generator, as vLLM's sampler (draw_uniforms' rule, sized
        # on the host); seeded rows: keyed by (seed, position)
        if not sampling.all_greedy and step.seeds is None:
            step.seeds = [_seed(runner, req_id) for req_id in step.req_ids]
        uniforms = None if sampling.all_greedy else \
            step.seeded_uniforms(torch.rand((int(step.num_nodes.sum()), UNIFORM_COLUMNS), dtype=torch.float32,
                                                device=device))

        def run(logits):
            if sampling.all_greedy:
                verify = verify_greedy_reference if reference else verify_greedy
                return verify(logits, node_tokens, parents, cu_nodes, checked=step.checked)
            # greedy rows have temperature 0, which verify_sampling treats as greedy
            verify = verify_sampling_reference if reference else verify_sampling
            return verify(logits, node_tokens, parents, cu_nodes, sampling.temperature, sampling.top_k, sampling.top_p,
                          uniforms=uniforms, checked=step.checked)

        failed: list[int] = []
        try:
            tokens, nodes, num = run(logits)
        except ValueError as err:
            # Verification refuses unusable logits (NaN, +inf, no finite logit) naming the
            # requests (tkernels.spec.NonFiniteLogitsError.requests): those requests fail alone
            # (patch 6), the rest of the batch is verified without them.
            failed = sorted(getattr(err, "requests", None) or ())
            if not failed:
                raise
            logger.error("tkernels tree speculation: requests %s fail: %s", [step.req_ids[r] for r in failed], err)
            starts = step.cu_nodes.numpy()[failed].astype(np.int64)
            rows = torch.from_numpy(ragged_arange(starts, step.num_nodes[failed])).to(device)
            logits = logits.clone()
            logits[rows] = 0.0  # any finite scores: their tokens are replaced below
            tokens, nodes, num = run(logits)
            num[failed] = 1  # nothing accepted, nothing compacted
            nodes[failed, 1:] = -1
        self._compact(runner, step, nodes, num, reference)
        # what the proposer learns from (the accepted paths), on the host without a sync
        step.accepted = tuple(host_copy(t, self._host_buffers, name) for name, t in (("nodes", nodes), ("num", num)))
        out = torch.full((num_reqs, max(drafts, default=0) + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32, device=device)
        # verification pads its rows with -1: vLLM's placeholder id, else replaced
        out.narrow(1, 0, tokens.shape[1]).copy_(tokens if PLACEHOLDER_TOKEN_ID == -1 else
                                               torch.where(tokens >= 0, tokens, PLACEHOLDER_TOKEN_ID))
        if failed:
            out[failed] = PLACEHOLDER_TOKEN_ID
            out[failed, 0] = FAILED_TOKEN
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    def _compact(self, runner, step: TreeStep, nodes: torch.Tensor, num: torch.Tensor, reference: bool) -> None:
        rows = np.flatnonzero(step.is_tree)  # a chain's accepted nodes already sit at their depths
        if not rows.size:
            return
        block_table = runner.input_batch.block_table[0].get_device_tensor(len(step.req_ids))
        prefix = step.prefix
        if rows.size < len(step.req_ids):  # only the tree rows (else all of them, as they are)
            index = torch.from_numpy(rows).to(nodes.device)
            block_table, nodes, num, prefix = block_table[index], nodes[index], num[index], prefix[rows]
        prefix = torch.from_numpy(prefix.astype(np.int32)).to(nodes.device)
        compact = compact_kv_cpu if reference else compact_kv  # vLLM-CPU's modes: Triton needs a GPU
        # verification's outputs, vLLM's block table and the host-built prefixes: trusted (no device read)
        compact(self.kv_planes(runner), block_table, prefix, nodes, num, checked=True)

    def kv_planes(self, runner) -> list[torch.Tensor]:
        """Every layer's K and V as ``[kv_heads, num_blocks, block_size, 1, head_dim]`` views, the
        leading-plane layout compact_kv takes whatever vLLM's physical layout; a cache shared by
        several layers (KV sharing) is listed once, since compaction is not idempotent."""
        if self._kv_planes is None:
            from vllm.config import get_layers_from_vllm_config
            from vllm.model_executor.layers.attention import Attention

            if len(runner.kv_cache_config.kv_cache_groups) != 1:
                raise RuntimeError("tkernels tree speculation supports models with one KV-cache group only")
            planes, seen = [], set()
            for layer in get_layers_from_vllm_config(runner.vllm_config, Attention).values():
                if layer.kv_cache.data_ptr() in seen:
                    continue
                seen.add(layer.kv_cache.data_ptr())
                planes += [c.permute(2, 0, 1, 3).unsqueeze(3) for c in layer.impl._kv_caches(layer.kv_cache)]
            self._kv_planes = planes
        return self._kv_planes


def _seed(runner, req_id: str) -> int | None:
    """The request's sampling seed (None: unseeded, or greedy, where no randomness is drawn)."""
    state = runner.requests.get(req_id) if hasattr(runner, "requests") else None
    params = getattr(state, "sampling_params", None)
    if params is None or params.seed is None or params.temperature <= 0:
        return None
    return int(params.seed)


