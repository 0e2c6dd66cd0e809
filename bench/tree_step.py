"""One serving step of vLLM's tree proposer without an engine: the plugin's own step code on a
stand-in model runner, for the host-cost benchmark (``bench_host.py``) and the sync-count test
(``tests/vllm/test_tree_step_syncs.py``).

A step runs what vLLM runs around the forward pass when ``TokenRecyclingTreeProposer`` serves:
``TreeBatch.begin_step`` (the step's trees, checked once, moved to the device once; tree RoPE
positions), tkernels' attention metadata builder (``TkernelsAttentionMetadataBuilder.build``:
the step's plan from vLLM's host copies), then, given the step's logits, ``TreeBatch.verify``
(tree verification and KV compaction; vLLM's ``SamplerOutput``) and the proposer's ``propose``
(recycling the verified top-k, drafting the next trees). The forward pass is not run: the
logits are made up (each node's argmax is its first child's token, so the first-child path is
accepted and compaction moves K/V), and the target's top-k capture is either real
(``capture="logits"``: the proposer's wrap of ``compute_logits``, which needs logits as wide as
the vocabulary) or handed in (``capture`` a callable returning the rows' ``(ids, probs)``).
What stands in for vLLM: the persistent batch's arrays, ``CommonAttentionMetadata`` (with its
host copies ``query_start_loc_cpu`` and ``seq_lens_cpu_upper_bound``), the scheduler's drafts
and the parsing of the sampled tokens (vLLM's own ``tolist``, outside the plugin).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

TREE_PROPOSER = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"
BLOCK_SIZE = 16
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 16  # the K/V cache is only ever moved, never read here


def tree_proposer(vocab: int, num_nodes: int, drafter: str, max_model_len: int):
    """A ``TokenRecyclingTreeProposer`` drafting ``num_nodes``-node trees (``size: fixed``) with
    ``drafter``, as vLLM builds it, on a Llama-3-8B-shaped step model (the shape only sizes trees)."""
    from tkernels.plugins.vllm.proposer import TokenRecyclingTreeProposer

    model_config = SimpleNamespace(
        max_model_len=max_model_len, get_vocab_size=lambda: vocab, uses_mrope=False, get_hidden_size=lambda: 4096,
        get_num_layers=lambda parallel: 32, get_num_attention_heads=lambda parallel: 32,
        get_num_kv_heads=lambda parallel: 8, get_head_size=lambda: 128, dtype=torch.bfloat16,
        hf_text_config=SimpleNamespace(intermediate_size=14336),
    )
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=num_nodes - 1, method="custom_class",
                                           model=TREE_PROPOSER),
        model_config=model_config, scheduler_config=SimpleNamespace(async_scheduling=False),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        additional_config={"tkernels_tree": {"size": "fixed", "drafter": drafter}},
    )
    return TokenRecyclingTreeProposer(config)


def attention_builder(num_blocks: int):
    """tkernels' attention metadata builder as vLLM builds it for one full-attention group,
    without a ``VllmConfig`` (its ``__init__``'s attributes, set as it sets them)."""
    from tkernels.plugins.vllm.attention import TkernelsAttentionMetadataBuilder

    builder = TkernelsAttentionMetadataBuilder.__new__(TkernelsAttentionMetadataBuilder)
    builder.num_q_heads, builder.num_kv_heads, builder.head_dim = NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM
    builder.block_size, builder.dtype = BLOCK_SIZE, torch.float32
    builder.layers = [SimpleNamespace(kv_cache=torch.zeros(num_blocks, 1))]  # build() reads the block count
    builder.windows = {None}
    builder.step_trees = builder.step_trees_host = None
    builder.exact_host_seq_lens = True
    builder.mode = None  # a GPU's: the Triton kernel's plan (not a CPU attention mode)
    builder.native_windows = set()  # no window runs vLLM-CPU's kernel (TKERNELS_VLLM_CPU_ATTENTION=native)
    builder.compiled = False  # nor the compiled CPU path (=compiled)
    return builder


class TreeServingStep:
    """``batch`` requests with ``histories`` (token id lists), served step after step."""

    def __init__(self, histories, vocab: int, num_nodes: int, drafter: str, logits_vocab: int | None = None,
                 capture=None, max_model_len: int = 2048, device: str = "cpu"):
        self.batch = len(histories)
        self.vocab, self.num_nodes = vocab, num_nodes
        self.logits_vocab = logits_vocab or vocab
        self.capture = capture
        self.device = torch.device(device)
        self.proposer = tree_proposer(vocab, num_nodes, drafter, max_model_len)
        self.target = SimpleNamespace(compute_logits=lambda hidden: hidden)
        if capture is None:  # the proposer's own capture of the target's logits
            super(type(self.proposer), self.proposer).load_model(self.target)
        self.tree_batch = self.proposer.tree_batch
        blocks_per_req = -(-(max_model_len + num_nodes) // BLOCK_SIZE)
        num_blocks = self.batch * blocks_per_req
        self.tree_batch._kv_planes = [torch.zeros(NUM_KV_HEADS, num_blocks, BLOCK_SIZE, 1, HEAD_DIM, device=self.device)
                                      for _ in range(2)]
        self.block_table = torch.arange(num_blocks, dtype=torch.int32, device=self.device).view(self.batch, -1)
        self.builder = attention_builder(num_blocks)
        self.token_ids = np.zeros((self.batch, max_model_len), np.int32)
        self.num_tokens = np.array([len(h) for h in histories], np.int64)
        for i, h in enumerate(histories):
            self.token_ids[i, :len(h)] = h
        self.req_ids = [f"r{i}" for i in range(self.batch)]
        self.drafts: list[list[int]] = [[] for _ in range(self.batch)]
        self.runner = self._runner()
        self.last_tree_sizes: list[int] = []

    def _runner(self):
        input_batch = SimpleNamespace(
            num_reqs=self.batch, req_ids=self.req_ids, num_computed_tokens_cpu=np.zeros(self.batch, np.int64),
            sampling_metadata=SimpleNamespace(all_greedy=True), generators={},
            block_table=[SimpleNamespace(get_device_tensor=lambda n: self.block_table[:n])],
        )
        return SimpleNamespace(input_batch=input_batch, positions=None, input_ids=SimpleNamespace(gpu=None),
                               attn_groups=[[SimpleNamespace(metadata_builders=[self.builder])]], requests={})

    def _device(self, t: torch.Tensor) -> torch.Tensor:
        """A device copy, a tensor of its own even where the device is the CPU (as vLLM's are)."""
        return t.to(self.device, copy=True)

    # -- the step's parts ---------------------------------------------------------------------
    def schedule(self):
        """vLLM's side before the forward: the persistent batch, positions, input ids, and the
        attention metadata's inputs (device tensors and their host copies)."""
        scheduled = np.array([1 + len(d) for d in self.drafts], np.int64)
        prefix = self.num_tokens - 1  # the last committed token is the step's first input
        self.runner.input_batch.num_computed_tokens_cpu = prefix
        starts = np.cumsum(scheduled) - scheduled
        local = np.arange(scheduled.sum()) - np.repeat(starts, scheduled)
        self.runner.positions = self._device(torch.from_numpy(np.repeat(prefix, scheduled) + local))
        ids = np.concatenate([np.array([self.token_ids[i, prefix[i]], *self.drafts[i]], np.int64)
                              for i in range(self.batch)])
        self.runner.input_ids.gpu = self._device(torch.from_numpy(ids))
        cu = torch.from_numpy(np.concatenate([[0], np.cumsum(scheduled)]).astype(np.int32))
        seq_lens = torch.from_numpy((prefix + scheduled).astype(np.int32))
        self.metadata = SimpleNamespace(
            causal=True, query_start_loc=self._device(cu), query_start_loc_cpu=cu, seq_lens=self._device(seq_lens),
            seq_lens_cpu_upper_bound=seq_lens, block_table_tensor=self.block_table,
        )
        self.scheduler_output = SimpleNamespace(
            finished_req_ids=set(), scheduled_spec_decode_tokens={r: d for r, d in zip(self.req_ids, self.drafts) if d})
        self.scheduled = scheduled
        # vLLM's SpecDecodeMetadata (None in a step without drafts): every token is a logits row here
        self.spec = None if not any(self.drafts) else SimpleNamespace(
            num_draft_tokens=[len(d) for d in self.drafts], max_spec_len=max(map(len, self.drafts)),
            logits_indices=torch.arange(int(scheduled.sum()), device=self.device))

    def logits(self) -> torch.Tensor:
        """The step's logits rows, one per node: each node's argmax is its first child's token
        (column ``token % logits_vocab``), else a fixed bonus token."""
        ids = self.runner.input_ids.gpu.cpu().numpy()
        n = ids.size
        target = np.full(n, 1, np.int64)
        step = self.tree_batch.step
        parents = step.parents.numpy().astype(np.int64)
        cu = step.cu_nodes.numpy().astype(np.int64)
        global_parent = parents + np.repeat(cu[:-1], np.diff(cu))
        child = np.flatnonzero(parents >= 0)
        first = np.full(n, -1)
        for c in child[::-1]:  # the first child of each node
            first[global_parent[c]] = c
        target[first >= 0] = ids[first[first >= 0]]
        logits = torch.zeros(n, self.logits_vocab)
        logits[torch.arange(n), torch.from_numpy(target % self.logits_vocab)] = 1.0
        return logits.to(self.device)

    def begin(self) -> None:
        self.tree_batch.begin_step(self.runner, self.scheduler_output, self.scheduled)

    def plan(self):
        return self.builder.build(0, self.metadata)

    def verify(self, logits: torch.Tensor):
        if self.capture is None:
            self.target.compute_logits(logits)  # the proposer's capture of the target's top-k
        else:
            self.proposer._captured = [self.capture(self.runner.input_ids.gpu)]
        return self.tree_batch.verify(self.runner, logits, self.spec)

    def commit(self, out) -> list[list[int]]:
        """vLLM's bookkeeping: the sampled tokens to the host (vLLM's own read), into the batch."""
        rows = out.sampled_token_ids.cpu().tolist()
        sampled = [[t for t in row if t >= 0] for row in rows]
        for i, s in enumerate(sampled):
            n = self.num_tokens[i]
            self.token_ids[i, n:n + len(s)] = s
            self.num_tokens[i] += len(s)
        return sampled

    def propose(self, sampled: list[list[int]]) -> None:
        self.drafts = self.proposer.propose(sampled, self.num_tokens.copy(), self.token_ids)
        self.last_tree_sizes = [1 + len(d) for d in self.drafts]

    def run(self) -> None:
        """One whole step (the warm-up steps and the measured ones)."""
        self.schedule()
        self.begin()
        self.plan()
        out = self.verify(self.logits())
        self.propose(self.commit(out))

    def greedy_outputs(self, accept: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What greedy verification returns for :meth:`logits`' rows (the first-child path of
        every scheduled tree, then the bonus token 1), from the proposer's trees on the host:
        ``(accepted_tokens, accepted_nodes, num_accepted)`` for a stand-in of the kernels. With
        ``accept``, at most that many drafts of each path are accepted (the bonus token follows
        them), as if the target had chosen another token there."""
        from tkernels.spec import depths

        paths, width = [], 1
        for req_id, draft in zip(self.req_ids, self.drafts):
            proposal = self.tree_batch.proposed.get(req_id)
            parents = [-1] if not draft else proposal.parents[:1 + len(draft)].tolist()
            width = max(width, int(depths(torch.tensor(parents, dtype=torch.int32)).max()) + 1)
            path = [0]
            while accept is None or len(path) <= accept:
                children = [j for j in range(path[-1] + 1, len(parents)) if parents[j] == path[-1]]
                if not children:
                    break
                path.append(children[0])
            paths.append((path, [draft[j - 1] for j in path[1:]] + [1]))
        tokens = torch.full((self.batch, width), -1, dtype=torch.int64)
        nodes = torch.full((self.batch, width), -1, dtype=torch.int32)
        for i, (path, accepted) in enumerate(paths):
            tokens[i, :len(accepted)] = torch.tensor(accepted)
            nodes[i, :len(path)] = torch.tensor(path, dtype=torch.int32)
        return tokens, nodes, torch.tensor([len(p) for p, _ in paths], dtype=torch.int32)
