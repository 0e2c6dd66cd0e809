"""Tree verification: kernels vs references, greedy = plain greedy, statistical losslessness."""

import subprocess
import sys

import pytest
import torch
from scipy.stats import chisquare

from tkernels import config
from tkernels.attention.batch import TREE_KINDS, tree_parents
from tkernels.spec import verify as V
from tkernels.spec.tree import MAX_TREE_NODES, depths, from_child_counts
from tkernels.spec.verify import inputs as VI
from tkernels.spec.verify import launch as VL
from tkernels.spec.verify import reference as VR

SHAPES = {  # parents of one tree
    "single": [-1],
    "chain": [-1, 0, 1, 2, 3],
    "binary": [-1, 0, 0, 1, 1, 2, 2],
    "star": [-1, 0, 0, 0, 0, 0],
    "mixed": from_child_counts([3, 2, 0, 1, 1, 0, 0, 1]).parents.tolist(),
}


def random_parents(n, rng):
    """A random BFS tree: parents[1:] non-decreasing, parents[i] < i."""
    parents = [-1]
    for i in range(1, n):
        low = max(parents[-1], 0)
        parents.append(int(torch.randint(low, i, (1,), generator=rng)))
    return parents


def make_batch(trees, vocab, rng, dtype=torch.float32, match=0.6):
    """Ragged batch of ``trees`` (parents lists); draft tokens copy the parent's argmax w.p. ``match``."""
    parents = torch.tensor([p for tree in trees for p in tree], dtype=torch.int32)
    cu = torch.tensor([0] + [len(t) for t in trees], dtype=torch.int32).cumsum(0).int()
    n = int(cu[-1])
    logits = (torch.randn(n, vocab, generator=rng) * 3).to(dtype)
    argmax = logits.argmax(-1)
    tokens = torch.randint(0, vocab, (n,), generator=rng)
    offsets = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
    gpar = parents.long() + offsets
    copy = (parents >= 0) & (torch.rand(n, generator=rng) < match)
    tokens[copy] = argmax[gpar[copy]]
    return logits, tokens, parents, cu


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs start as a sentinel, so any element the kernels fail to write shows up."""
    def empty_outputs(batch, width, device):
        return (
            torch.full((batch, width), 777, dtype=torch.int64, device=device),
            torch.full((batch, width), 777, dtype=torch.int32, device=device),
            torch.full((batch,), 777, dtype=torch.int32, device=device),
        )
    monkeypatch.setattr(VL, "_empty_outputs", empty_outputs)


def assert_same(out, ref):
    for a, b, name in zip(out, ref, ("accepted_tokens", "accepted_nodes", "num_accepted")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}:\n{a}\n{b}"


def check_greedy_contract(out, logits, tokens, parents, cu):
    """Independent check of the greedy rule on the kernel's output (python loops)."""
    acc_tokens, acc_nodes, num = out
    argmax = logits.argmax(-1)
    for b in range(num.numel()):
        s, n = int(cu[b]), int(cu[b + 1] - cu[b])
        k = int(num[b])
        path = acc_nodes[b, :k].tolist()
        assert path[0] == 0 and (acc_nodes[b, k:] == -1).all() and (acc_tokens[b, k:] == -1).all()
        for d in range(1, k):
            assert int(parents[s + path[d]]) == path[d - 1]
            assert int(tokens[s + path[d]]) == int(argmax[s + path[d - 1]]) == int(acc_tokens[b, d - 1])
        last = path[-1]
        assert int(acc_tokens[b, k - 1]) == int(argmax[s + last])
        children = [i for i in range(n) if int(parents[s + i]) == last]
        assert all(int(tokens[s + c]) != int(argmax[s + last]) for c in children)  # maximal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_random_trees(rng, poisoned, dtype):
    sizes = [1, 7, 16, 3, 33, 2, 9]
    trees = [random_parents(n, rng) for n in sizes] + [SHAPES["chain"], SHAPES["star"]]
    batch = make_batch(trees, 1000, rng, dtype)
    out = V.verify_greedy(*batch)
    assert_same(out, V.verify_greedy_reference(*batch))
    check_greedy_contract(out, *batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_max_indices_are_argmax_on_ties_and_nan(rng, dtype):
    """The greedy reference takes each node's target token as ``max(-1).indices`` (a faster CPU
    kernel than argmax's): the first maximum, as argmax, on rows full of ties and with NaN."""
    for _ in range(20):
        rows, vocab = int(torch.randint(1, 40, (1,), generator=rng)), int(torch.randint(1, 5000, (1,), generator=rng))
        x = torch.randint(-3, 4, (rows, vocab), generator=rng).to(dtype)
        x[0, int(torch.randint(0, vocab, (1,), generator=rng))] = float("nan")
        assert torch.equal(x.max(-1).indices, x.argmax(-1))


def test_greedy_large_vocab(rng, poisoned):
    batch = make_batch([SHAPES["chain"], [-1], SHAPES["binary"]], 128256, rng, torch.float16)
    out = V.verify_greedy(*batch)
    assert_same(out, V.verify_greedy_reference(*batch))
    check_greedy_contract(out, *batch)


def test_single_node_trees_and_empty_batch(rng, poisoned):
    batch = make_batch([[-1]] * 5, 50, rng)
    tokens, nodes, num = V.verify_greedy(*batch)
    assert tokens.shape == (5, 1) and torch.equal(tokens[:, 0], batch[0].argmax(-1))
    assert (nodes == 0).all() and (num == 1).all()
    temp = torch.ones(5)
    tokens, nodes, num = V.verify_sampling(*batch, temp, uniforms=torch.rand(5, 2, generator=rng))
    assert (num == 1).all() and (nodes == 0).all() and tokens.shape == (5, 1)
    empty = (torch.empty(0, 50), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    for out in (V.verify_greedy(*empty), V.verify_sampling(*empty, torch.ones(0)),
                V.verify_sampling(*empty, torch.ones(0), draft_probs=torch.empty(0, 50))):
        assert [tuple(t.shape) for t in out] == [(0, 1), (0, 1), (0,)]


def test_greedy_speculation_equals_plain_greedy(rng):
    """Target = a fixed random bigram-context model; drafts partially follow its greedy path."""
    vocab = 12
    table = torch.randn(vocab, vocab, vocab, generator=rng)  # logits given (previous, last) token

    def greedy_next(prev, last):
        return int(table[prev, last].argmax())

    trees, logits, tokens, expected = [], [], [], []
    for _ in range(12):
        parents = random_parents(int(torch.randint(1, 20, (1,), generator=rng)), rng)
        prev, root = (int(x) for x in torch.randint(0, vocab, (2,), generator=rng))
        ctx = [(prev, root)]  # (previous, last) token of every node's context
        node_tokens = [root]
        for i in range(1, len(parents)):
            p_prev, p_last = ctx[parents[i]]
            follow = bool(torch.rand(1, generator=rng) < 0.7)
            t = greedy_next(p_prev, p_last) if follow else int(torch.randint(0, vocab, (1,), generator=rng))
            node_tokens.append(t)
            ctx.append((p_last, t))
        trees.append(parents)
        logits.append(torch.stack([table[a, c] for a, c in ctx]))
        tokens += node_tokens
        # plain greedy from the root, as long as the tree can hold it, + 1 bonus
        longest, frontier, seq = 0, 0, []
        a, c = prev, root
        while True:
            nxt = greedy_next(a, c)
            seq.append(nxt)
            kids = [i for i in range(len(parents)) if parents[i] == frontier and node_tokens[i] == nxt]
            if not kids:
                break
            frontier, longest, (a, c) = kids[0], longest + 1, (c, nxt)
        expected.append(seq)
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    cu = torch.tensor([0] + [len(t) for t in trees]).cumsum(0).int()
    out_tokens, _, num = V.verify_greedy(torch.cat(logits), torch.tensor(tokens), parents, cu)
    for b, seq in enumerate(expected):
        assert int(num[b]) == len(seq)
        assert out_tokens[b, : len(seq)].tolist() == seq


def test_target_probs_definition(rng):
    """Temperature, then top-k, then top-p (smallest top set with mass >= top_p), per request."""
    vocab = 40
    batch = make_batch([[-1, 0], [-1], [-1, 0, 0]], vocab, rng)
    logits, _, _, cu = batch
    temp = torch.tensor([0.7, 1.3, 0.0])
    top_k = torch.tensor([5, 0, 3])
    top_p = torch.tensor([0.8, 0.5, 1.0])
    probs = V.target_probs(logits, cu, temp, top_k, top_p)
    for row in range(logits.shape[0]):
        b = int(torch.searchsorted(cu, row, right=True)) - 1
        x = logits[row].double()
        if temp[b] == 0:
            expect = torch.zeros(vocab, dtype=torch.float64)
            expect[x.argmax()] = 1
        else:
            order = x.argsort(descending=True)
            k = int(top_k[b]) if 0 < int(top_k[b]) < vocab else vocab
            keep = order[:k]
            p = torch.softmax(x[keep] / float(temp[b]), 0)
            mass_before = p.cumsum(0) - p
            keep = keep[mass_before < float(top_p[b])]
            expect = torch.zeros(vocab, dtype=torch.float64)
            expect[keep] = torch.softmax(x[keep] / float(temp[b]), 0)
        torch.testing.assert_close(probs[row], expect, atol=1e-6, rtol=1e-5)


# --- sampling: kernels vs references on identical uniforms -----------------------------------

SAMPLING_PARAMS = {
    "plain": (1.0, None, None),
    "temp_topk_topp": (0.8, 4, 0.9),
    "greedy_rows": (0.0, None, None),
}


def exact_compare(logits, tokens, parents, cu, params, uniforms, draft_probs, config=None):
    batch = cu.numel() - 1
    temp_value, k, p = params
    temp = torch.full((batch,), temp_value)
    temp[::3] = 0.5 if temp_value else 0.0
    top_k = None if k is None else torch.full((batch,), k, dtype=torch.int64)
    top_p = None if p is None else torch.full((batch,), p)
    out = V.verify_sampling(logits, tokens, parents, cu, temp, top_k, top_p, uniforms=uniforms, draft_probs=draft_probs,
                            config=config)
    width = VI._check_tree_batch(logits, tokens, parents, cu).width
    walk = VR._sampling_reference(logits, tokens, parents, cu, temp, top_k, top_p, uniforms, draft_probs, width)
    ref = walk.result()
    # Float rounding (fp32 kernel vs fp64 reference) may flip a decision only where a uniform
    # lies within ~1e-6 of its threshold: those draws may differ, every other draw must not.
    same = torch.ones_like(walk.margin, dtype=torch.bool)
    for a, b in zip(out, ref):
        same &= (a == b).reshape(a.shape[0], -1).all(1)
    assert (same | (walk.margin <= 1e-5)).all(), walk.margin[~same]
    assert same.float().mean() > 0.99
    return out


@pytest.mark.parametrize("shape", ["chain", "binary", "star", "mixed"])
@pytest.mark.parametrize("params", list(SAMPLING_PARAMS))
def test_sampling_target_only_matches_reference(rng, poisoned, shape, params):
    trees = [SHAPES[shape]] * 100 + [random_parents(12, rng) for _ in range(10)]
    logits, tokens, parents, cu = make_batch(trees, 24, rng, torch.float16, match=0.8)
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    exact_compare(logits, tokens, parents, cu, SAMPLING_PARAMS[params], uniforms, None)


@pytest.mark.parametrize("shape", ["chain", "binary", "star", "mixed"])
@pytest.mark.parametrize("params", list(SAMPLING_PARAMS))
def test_sampling_rejection_matches_reference(rng, poisoned, shape, params):
    trees = [SHAPES[shape]] * 60 + [random_parents(12, rng) for _ in range(10)]
    logits, tokens, parents, cu = make_batch(trees, 24, rng, torch.float32, match=0.5)
    draft_probs = torch.softmax(logits + torch.randn(logits.shape, generator=rng), -1)
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    exact_compare(logits, tokens, parents, cu, SAMPLING_PARAMS[params], uniforms, draft_probs)


@pytest.mark.parametrize("config", [{"block_v": 16, "num_warps": 2}, {"block_v": 32, "num_warps": 8}])
def test_launch_configs_match_reference(rng, poisoned, config):
    """Any launch config autotune may pick gives the references' answers (vocabulary over several tiles)."""
    trees = [random_parents(n, rng) for n in (1, 5, 12, 3)] * 10
    logits, tokens, parents, cu = make_batch(trees, 100, rng, torch.float16, match=0.8)
    assert_same(V.verify_greedy(logits, tokens, parents, cu, config=config),
                V.verify_greedy_reference(logits, tokens, parents, cu))
    draft_probs = torch.softmax(logits.float() + torch.randn(logits.shape, generator=rng), -1)
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    for q in (None, draft_probs):
        exact_compare(logits, tokens, parents, cu, SAMPLING_PARAMS["temp_topk_topp"], uniforms, q, config)


def follow(tokens, parents, cu, picks, rng, p=0.9):
    """Draft tokens that copy the target's pick at their parent: always in request 0 (its
    walk reaches a leaf, 255 levels down a chain), with probability ``p`` elsewhere."""
    offsets = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
    copy = (parents >= 0) & ((torch.rand(parents.shape, generator=rng) < p) | (torch.arange(parents.numel()) < int(cu[1])))
    tokens = tokens.clone()
    tokens[copy] = picks[parents.long()[copy] + offsets[copy]]
    return tokens


def test_children_table(rng):
    """The walks' first-child / child-count table against a Python scan, ragged batch."""
    trees = [tree_parents(kind, n, rng).tolist() for kind in TREE_KINDS for n in (1, 2, 65, MAX_TREE_NODES)]
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    cu = torch.tensor([0] + [len(t) for t in trees]).cumsum(0).int()
    first, count = VI._children(parents, cu)
    for b, tree in enumerate(trees):
        s = int(cu[b])
        for i in range(len(tree)):
            kids = [j for j in range(len(tree)) if tree[j] == i]
            assert int(count[s + i]) == len(kids)
            assert int(first[s + i]) == (s + kids[0] if kids else parents.numel())
            assert kids == list(range(kids[0], kids[0] + len(kids)) if kids else [])  # contiguous (BFS)


@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("nodes", [65, 128, MAX_TREE_NODES])
def test_trees_past_64_nodes(rng, poisoned, nodes, kind):
    """Greedy (fp32, fp16), target-only and rejection sampling on a big tree beside small ones."""
    trees = [tree_parents(kind, nodes, rng).tolist(), random_parents(9, rng), [-1], random_parents(70, rng)]
    for dtype in (torch.float32, torch.float16):
        logits, tokens, parents, cu = make_batch(trees, 50, rng, dtype)
        tokens = follow(tokens, parents, cu, logits.argmax(-1), rng)
        out = V.verify_greedy(logits, tokens, parents, cu)
        assert_same(out, V.verify_greedy_reference(logits, tokens, parents, cu))
        check_greedy_contract(out, logits, tokens, parents, cu)
        assert int(out[1][0, int(out[2][0]) - 1]) not in trees[0]  # request 0's walk ends at a leaf
    logits, tokens, parents, cu = make_batch(trees, 50, rng)
    temp_value, k, p = params = SAMPLING_PARAMS["temp_topk_topp"]
    temp = torch.full((len(trees),), temp_value)
    temp[::3] = 0.5  # as exact_compare sets it
    probs = V.target_probs(logits, cu, temp, torch.full((len(trees),), k), torch.full((len(trees),), p))
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    tokens = follow(tokens, parents, cu, VR._inverse_cdf_reference(probs, uniforms[:, 1])[0], rng)  # target-only draws
    exact_compare(logits, tokens, parents, cu, params, uniforms, None)
    draft_probs = (0.9 * probs + 0.1 * torch.softmax(torch.randn(logits.shape, generator=rng), -1)).float()
    exact_compare(logits, tokens, parents, cu, params, uniforms, draft_probs)


def test_launch_config_reads_the_gpus_tuned_bucket(monkeypatch):
    buckets = [{"key": {"vocab": 32000}, "config": {"block_v": 2048}},
               {"key": {"vocab": 128256}, "config": {"block_v": 8192, "num_warps": 16}}]
    tuned = config.ConfigChoice(None, "test", {"kernels": {"verify": {"buckets": buckets}}})
    monkeypatch.setattr(config, "current", lambda: tuned)
    assert V.launch_config(151936) == {"block_v": 8192, "num_warps": 16}
    assert V.launch_config(32000, {"num_warps": 4}) == {"block_v": 2048, "num_warps": 4}


def test_sampling_large_vocab(rng, poisoned):
    trees = [[-1, 0, 0, 1], [-1, 0]]
    logits, tokens, parents, cu = make_batch(trees, 128256, rng, torch.float16, match=0.9)
    draft_probs = torch.softmax(logits.float() + torch.randn(logits.shape, generator=rng), -1)
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    exact_compare(logits, tokens, parents, cu, SAMPLING_PARAMS["temp_topk_topp"], uniforms, None)
    exact_compare(logits, tokens, parents, cu, SAMPLING_PARAMS["plain"], uniforms, draft_probs)


def test_per_request_generators_are_batch_independent(rng):
    logits, tokens, parents, cu = make_batch([random_parents(n, rng) for n in (6, 3, 9)], 64, rng)
    temp = torch.ones(3)
    seeded = lambda: {1: torch.Generator().manual_seed(7)}
    first = V.verify_sampling(logits, tokens, parents, cu, temp, generator=rng, generators=seeded())
    alone = slice(int(cu[1]), int(cu[2]))
    second = V.verify_sampling(logits[alone], tokens[alone], parents[alone], torch.tensor([0, 3], dtype=torch.int32),
                               temp[:1], generators={0: torch.Generator().manual_seed(7)})
    width = second[0].shape[1]  # the lone request's depth + 1 (the batch may be deeper)
    for a, b in zip(first[:2], second[:2]):
        assert torch.equal(a[1, :width], b[0]) and (a[1, width:] == -1).all()
    assert int(first[2][1]) == int(second[2][0])
    with pytest.raises(ValueError, match="generators"):
        V.verify_sampling(logits, tokens, parents, cu, temp, generators={3: torch.Generator()})


def _splitmix_reference(seed: int, counter: int) -> float:
    """keyed_uniforms' definition in exact integers: SplitMix64 of the mixed seed at ``counter``."""
    mask, golden = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def mix(x):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    stream = mix((seed + golden) & mask)
    return (mix((stream + counter * golden) & mask) >> 40) / 2**24


def test_keyed_uniforms_depend_on_seed_and_position_only(rng):
    seeds = [0, 1, 123, -5, 2**63 - 1, 2**70 + 3]
    positions = torch.tensor([0, 5, 77, 2**40, 3, 9])
    u = V.keyed_uniforms(seeds, positions)
    expected = [[_splitmix_reference(s & ((1 << 64) - 1), 2 * int(p) + c) for c in (1, 2)] for s, p in zip(seeds, positions)]
    assert u.dtype == torch.float32 and u.tolist() == expected  # exact: wrapping int64 arithmetic
    order = torch.randperm(len(seeds), generator=rng)  # a row's uniforms do not depend on its neighbours
    assert torch.equal(V.keyed_uniforms([seeds[i] for i in order], positions[order]), u[order])
    many = V.keyed_uniforms(torch.arange(50_000), torch.arange(50_000))
    assert 0 <= float(many.min()) and float(many.max()) < 1 and abs(float(many.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="seeds and positions"):
        V.keyed_uniforms(torch.zeros(3, dtype=torch.int32), positions[:3])
    with pytest.raises(ValueError, match="positions must be non-negative"):
        V.keyed_uniforms([1], torch.tensor([-1]))


def test_sampling_temperature_zero_is_greedy(rng):
    batch = make_batch([random_parents(n, rng) for n in (5, 9, 1, 14)], 300, rng)
    greedy = V.verify_greedy(*batch)
    zero = torch.zeros(4)
    assert_same(V.verify_sampling(*batch, zero, generator=rng), greedy)
    q = torch.softmax(torch.randn(batch[0].shape, generator=rng), -1)
    assert_same(V.verify_sampling(*batch, zero, generator=rng, draft_probs=q), greedy)


# --- statistical losslessness (reference, vectorised over 1e5 draws) --------------------------


@pytest.mark.parametrize(
    "shape,sampled,params,keyed",
    [
        ("chain", False, (1.0, None, None), None),
        ("binary", False, (0.7, 5, None), None),
        ("star", False, (1.0, None, 0.8), None),
        ("chain", True, (1.0, None, None), None),
        ("binary", True, (1.3, None, None), None),
        ("star", True, (0.9, 6, 0.9), None),
        ("mixed", False, (1.0, None, None), "seeds"),  # keyed_uniforms: one seed per draw
        ("binary", False, (0.8, None, 0.9), "positions"),  # one seed, a fresh position per draw
    ],
)
def test_sampling_is_lossless(rng, shape, sampled, params, keyed):
    """Given that the output reached node v, the next output token is distributed as p(v); also
    with uniforms keyed by (seed, position) (the vLLM plugin's seeded requests)."""
    draws, vocab = 100_000, 8
    tree = SHAPES[shape]
    n = len(tree)
    parents = torch.tensor(tree * draws, dtype=torch.int32)
    cu = torch.arange(0, n * draws + 1, n, dtype=torch.int32)
    node_logits = torch.randn(n, vocab, generator=rng) * 1.5
    logits = node_logits.repeat(draws, 1)
    temp_value, k, p = params
    temp = torch.full((draws,), temp_value)
    top_k = None if k is None else torch.full((draws,), k)
    top_p = None if p is None else torch.full((draws,), p)
    p_node = V.target_probs(node_logits, torch.tensor([0, n], dtype=torch.int32), temp[:1],
                            None if k is None else top_k[:1], None if p is None else top_p[:1])
    children = {v: [i for i in range(n) if tree[i] == v] for v in range(n)}
    if sampled:  # children drawn from q(v) without replacement, fresh per draw
        q_node = torch.softmax(torch.randn(n, vocab, generator=rng), -1)
        draft_probs = q_node.repeat(draws, 1)
        tokens = torch.zeros(draws, n, dtype=torch.int64)
        for v, kids in children.items():
            if kids:
                # Gumbel-top-k: the perturbed order is sequential sampling without replacement
                gumbel = -torch.log(-torch.log(torch.rand(draws, vocab, generator=rng)))
                tokens[:, kids] = (q_node[v].log() + gumbel).topk(len(kids), dim=-1).indices
        tokens = tokens.flatten()
    else:  # fixed drafts: the target's top tokens
        draft_probs = None
        tokens = torch.zeros(n, dtype=torch.int64)
        for v, kids in children.items():
            tokens[kids] = p_node[v].argsort(descending=True)[: len(kids)]
        tokens = tokens.repeat(draws)
    width = int(depths(torch.tensor(tree)).max()) + 1  # 1e5 identical trees: validated by the other tests
    if keyed is None:
        uniforms = torch.rand(n * draws, 2, generator=rng)
    else:  # node v draws the token at position root + depth(v) + 1 of its request
        offset = int(torch.randint(0, 2**40, (1,), generator=rng))
        root = torch.arange(draws) * width if keyed == "positions" else torch.full((draws,), 1000)
        seeds = torch.full((draws,), offset) if keyed == "positions" else torch.arange(draws) + offset
        node_depth = depths(torch.tensor(tree)).long()
        uniforms = V.keyed_uniforms(seeds.repeat_interleave(n), (root[:, None] + node_depth + 1).flatten())
    out_tokens, out_nodes, num = VR._sampling_reference(
        logits, tokens, parents, cu, temp, top_k, top_p, uniforms, draft_probs, width
    ).result()
    checked = 0
    for depth in range(out_nodes.shape[1]):
        reached = num > depth  # output token at index `depth` follows node out_nodes[:, depth]
        for v in range(n):
            rows = reached & (out_nodes[:, depth] == v)
            count = int(rows.sum())
            if count < 2000:
                continue
            observed = torch.bincount(out_tokens[rows, depth], minlength=vocab).double()
            expected = p_node[v] * count
            assert observed[expected == 0].sum() == 0  # tokens outside top-k/top-p never appear
            keep = expected > 0
            if int(keep.sum()) > 1:
                assert chisquare(observed[keep], expected[keep]).pvalue > 1e-5, (depth, v, observed, expected)
            checked += 1
    assert checked >= 2


# --- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs(rng):
    logits, tokens, parents, cu = make_batch([SHAPES["binary"], SHAPES["chain"]], 30, rng)
    temp = torch.ones(2)
    cases = [
        ("parents", (logits, tokens, torch.tensor([-1, 0, 1, 0, 1, 2, 2, -1, 0, 1, 2, 3], dtype=torch.int32), cu)),
        ("parents", (logits, tokens, torch.tensor([0, 0, 0, 1, 1, 2, 2, -1, 0, 1, 2, 3], dtype=torch.int32), cu)),
        ("draft_tokens", (logits, torch.where(tokens == tokens[3], 30, tokens), parents, cu)),
        ("draft_tokens", (logits, tokens.int(), parents, cu)),
        ("logits", (logits.long(), tokens, parents, cu)),
        ("logits", (logits[:-1], tokens, parents, cu)),
        ("cu_nodes", (logits, tokens, parents, torch.tensor([0, 7, 13], dtype=torch.int32))),
        ("cu_nodes", (logits, tokens, parents, cu.float())),
        ("logits", (logits.t().contiguous().t(), tokens, parents, cu)),
    ]
    for name, args in cases:
        with pytest.raises(ValueError, match=name):
            V.verify_greedy(*args)
        with pytest.raises(ValueError, match=name):
            V.verify_sampling(*args, temp)
    good = (logits, tokens, parents, cu)
    with pytest.raises(ValueError, match="temperature"):
        V.verify_sampling(*good, torch.ones(3))
    with pytest.raises(ValueError, match="top_k"):
        V.verify_sampling(*good, temp, torch.ones(2))
    with pytest.raises(ValueError, match="top_p"):
        V.verify_sampling(*good, temp, None, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="uniforms"):
        V.verify_sampling(*good, temp, uniforms=torch.rand(logits.shape[0], 1))
    with pytest.raises(ValueError, match="draft_probs"):
        V.verify_sampling(*good, temp, draft_probs=torch.rand(logits.shape, dtype=torch.float64))
    for bad in ({"block_q": 16}, {"block_v": 100}, {"num_warps": 3}):
        with pytest.raises(ValueError, match="config"):
            V.verify_greedy(*good, config=bad)
        with pytest.raises(ValueError, match="config"):
            V.verify_sampling(*good, temp, config=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype):
    """V1-like shapes on the GPU: 16 requests, a chain and a 64-node tree mix, vocab 128256."""
    gen = torch.Generator().manual_seed(0)
    trees = [SHAPES["chain"], random_parents(64, gen), SHAPES["star"], [-1]] * 4
    logits, tokens, parents, cu = (t.cuda() for t in make_batch(trees, 128256, gen, dtype, match=0.7))
    assert_same(V.verify_greedy(logits, tokens, parents, cu), V.verify_greedy_reference(logits, tokens, parents, cu))
    draft_probs = torch.softmax(logits.float() + torch.randn(logits.shape, generator=gen).cuda(), -1)
    uniforms = torch.rand(logits.shape[0], 2, generator=gen).cuda()
    for params in SAMPLING_PARAMS:
        for q in (None, draft_probs):
            exact_compare(logits, tokens, parents, cu, SAMPLING_PARAMS[params], uniforms, q)


# --- issue 14: one tie rule, no token outside the vocabulary -----------------------------------


def _single_root(logits):
    n = logits.shape[0]
    return logits, torch.zeros(n, dtype=torch.int64), torch.full((n,), -1, dtype=torch.int32), torch.arange(n + 1, dtype=torch.int32)


def _all_verifiers(batch, temperature, uniforms, draft_probs=None, top_k=None):
    """Every path a greedy row can take: kernels and references, greedy and sampling rules."""
    yield "greedy", V.verify_greedy(*batch)
    yield "greedy reference", V.verify_greedy_reference(*batch)
    for q in (None, draft_probs):
        yield f"sampling q={q is not None}", V.verify_sampling(*batch, temperature, top_k, uniforms=uniforms, draft_probs=q)
        yield f"sampling reference q={q is not None}", V.verify_sampling_reference(
            *batch, temperature, top_k, uniforms=uniforms, draft_probs=q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_first_maximum_everywhere(rng, dtype):
    """Issue 14 item 6: logits [1, 3, 3, 0] -> token 1 (torch.argmax's, so plain greedy
    decoding's, rule) on every path, whatever the uniforms; greedy rows of a sampled batch too."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]] * 8, dtype=dtype)
    batch = _single_root(logits)
    uniforms = torch.stack([torch.linspace(0, 0.999, 8), torch.linspace(0, 0.999, 8)], 1).contiguous()
    q = torch.softmax(torch.randn(8, 4, generator=rng), -1)
    for temperature in (torch.zeros(8), torch.full((8,), -1.0), torch.full((8,), 1e-6)):
        for name, (tokens, _, _) in _all_verifiers(batch, temperature, uniforms, q):
            assert tokens[:, 0].tolist() == [1] * 8, (name, temperature[0])
    # SGLang's greedy rows: temperature 1 with top_k = 1 (its SamplingParams normalise greedy so)
    for name, (tokens, _, _) in _all_verifiers(batch, torch.ones(8), uniforms, q, top_k=torch.ones(8, dtype=torch.int64)):
        assert tokens[:, 0].tolist() == [1] * 8, (name, "top_k=1")
    # Tie-laden random trees (small integer logits), greedy rows mixed with sampled ones, and a
    # child that carries the second tied token: the greedy rows must follow verify_greedy.
    trees = [random_parents(n, rng) for n in (6, 1, 9, 4, 12, 3)]
    logits, tokens, parents, cu = make_batch(trees, 5, rng, dtype)
    logits = torch.randint(0, 3, logits.shape, generator=rng).to(dtype)
    tokens[1:] = torch.randint(0, 5, (tokens.numel() - 1,), generator=rng)
    tokens[parents >= 0] = torch.where(torch.rand(int((parents >= 0).sum()), generator=rng) < 0.5, 2, tokens[parents >= 0])
    batch = (logits, tokens, parents, cu)
    greedy_rows = torch.tensor([True, False, True, True, False, True])
    temperature = torch.where(greedy_rows, torch.tensor([0.0, 0.8, 1e-6, 1.0, 0.8, 0.0]), 0.8)
    top_k = torch.tensor([0, 3, 0, 1, 0, 2])  # request 3 is greedy by top_k = 1
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    q = torch.softmax(torch.randn(logits.shape, generator=rng), -1)
    expected = V.verify_greedy_reference(*batch)
    assert_same(V.verify_greedy(*batch), expected)
    for name, out in _all_verifiers(batch, temperature, uniforms, q, top_k):
        for got, want in zip(out, expected):
            assert torch.equal(got[greedy_rows], want[greedy_rows]), name


def _in_vocab(out, vocab):
    tokens, _, num = out
    used = torch.arange(tokens.shape[1])[None, :] < num[:, None].long()
    return bool(((tokens >= 0) & (tokens < vocab))[used].all())


def test_tiny_temperatures_are_greedy(rng):
    """Issue 14 item 7: T = 1e-38 overflowed logits / T (tokens -1); every temperature below
    GREEDY_TEMPERATURE (vLLM's _SAMPLING_EPS) is greedy. Above it, logits / T can only overflow
    for |logit| > 3.4e33: NonFiniteLogitsError, never a token outside the vocabulary."""
    assert V.GREEDY_TEMPERATURE == 1e-5
    trees = [random_parents(n, rng) for n in (5, 1, 8, 3)]
    batch = make_batch(trees, 64, rng)
    greedy = V.verify_greedy(*batch)
    uniforms = torch.rand(batch[0].shape[0], 2, generator=rng)
    q = torch.softmax(torch.randn(batch[0].shape, generator=rng), -1)
    for t in (1e-38, 1e-30, 1e-6, 9.99e-6, 0.0, -2.0):
        for _name, out in _all_verifiers(batch, torch.full((4,), t), uniforms, q):
            assert_same(out, greedy)
    huge = (batch[0] * 1e37, *batch[1:])  # finite, but logits / 1e-5 overflows float32
    for _name, out in _all_verifiers(huge, torch.full((4,), 1e-6), uniforms, q):
        assert_same(out, V.verify_greedy(*huge))  # greedy: no division
    for verify in (V.verify_sampling, V.verify_sampling_reference):
        with pytest.raises(V.NonFiniteLogitsError, match="^logits: .*overflow"):
            verify(*huge, torch.full((4,), 1e-5), uniforms=uniforms)
    for name, out in _all_verifiers(batch, torch.full((4,), 1e-4), uniforms, q):
        assert _in_vocab(out, 64), name
    with pytest.raises(ValueError, match="^temperature: "):
        V.verify_sampling(*batch, torch.full((4,), float("inf")))


@pytest.mark.parametrize("where", ["nan row", "nan entry", "+inf entry", "all -inf"])
def test_non_finite_logits_are_a_clear_error(rng, where):
    """Issue 14 item 7: a +inf logit gave token -1, a NaN row token 0. NaN and +inf logits, or
    a row without a finite logit, raise NonFiniteLogitsError (a ValueError) naming logits and
    the request; -inf entries are masks (vLLM's logits processors write them) and stay legal."""
    trees = [random_parents(n, rng) for n in (5, 1, 8, 3)]
    logits, tokens, parents, cu = make_batch(trees, 32, rng)
    row = int(cu[2]) + 3  # a node of request 2
    bad = logits.clone()
    if where == "nan row":
        bad[row] = float("nan")
    elif where == "nan entry":
        bad[row, 7] = float("nan")
    elif where == "+inf entry":
        bad[row, 7] = float("inf")
    else:
        bad[row] = float("-inf")
    batch = (bad, tokens, parents, cu)
    uniforms = torch.rand(logits.shape[0], 2, generator=rng)
    calls = [
        lambda: V.verify_greedy(*batch), lambda: V.verify_greedy_reference(*batch),
        lambda: V.verify_sampling(*batch, torch.ones(4), uniforms=uniforms),
        lambda: V.verify_sampling(*batch, torch.zeros(4), uniforms=uniforms),
        lambda: V.verify_sampling_reference(*batch, torch.ones(4), uniforms=uniforms),
        lambda: V.verify_sampling(*batch, torch.ones(4), uniforms=uniforms, draft_probs=torch.full(logits.shape, 1 / 32)),
    ]
    for call in calls:
        with pytest.raises(V.NonFiniteLogitsError, match=r"^logits: .*request 2\b") as info:
            call()
        assert isinstance(info.value, ValueError) and info.value.requests == [2]


@pytest.mark.parametrize("vocab", [40, 5000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_finiteness_check_reads_the_argmax_pass_row_max(rng, vocab, dtype):
    """verify_greedy checks finiteness on its argmax pass's row maxima (no second pass over the
    logits): equal to torch's amax, NaN included, for packed rows (small vocabulary) and rows
    spanning several vocabulary tiles (the bad entry in a later tile)."""
    logits = (torch.randn(9, vocab, generator=rng) * 3).to(dtype)
    logits[1, vocab - 3] = float("nan")
    logits[4, vocab - 2] = float("inf")
    logits[6] = float("-inf")
    token = torch.empty(9, dtype=torch.int64)
    row_max = VL._argmax_pass(logits, token, V.launch_config(vocab))
    torch.testing.assert_close(row_max, logits.amax(-1).float(), equal_nan=True)
    ok = torch.isfinite(row_max)
    assert torch.equal(token[ok], logits[ok].float().argmax(-1))


def test_minus_inf_logits_are_masks(rng):
    trees = [random_parents(n, rng) for n in (5, 1, 8, 3)]
    logits, tokens, parents, cu = make_batch(trees, 32, rng)
    masked = logits.clone()
    masked[:, ::2] = float("-inf")  # even tokens banned everywhere
    batch = (masked, tokens, parents, cu)
    for t in (0.0, 1.0, 1e-4):
        for _ in range(5):
            uniforms = torch.rand(logits.shape[0], 2, generator=rng)
            for name, out in _all_verifiers(batch, torch.full((4,), t), uniforms, torch.softmax(logits, -1)):
                accepted, _, num = out
                last = accepted.gather(1, (num.long() - 1)[:, None])  # the bonus token
                assert _in_vocab(out, 32) and (last % 2 == 1).all(), name


def test_bad_uniforms_and_draft_probs(rng):
    """Issue 14 item 8: NaN or >= 1 uniforms and negative or NaN draft_probs were accepted."""
    logits, tokens, parents, cu = make_batch([SHAPES["binary"], SHAPES["chain"]], 30, rng)
    good = (logits, tokens, parents, cu, torch.ones(2))
    n = logits.shape[0]
    for bad in (float("nan"), 1.0, 1.5, -0.1):
        u = torch.rand(n, 2, generator=rng)
        u[3, 1] = bad
        for verify in (V.verify_sampling, V.verify_sampling_reference):
            with pytest.raises(ValueError, match=r"^uniforms: .*\[0, 1\)"):
                verify(*good, uniforms=u)
    for bad in (float("nan"), -0.5, float("inf")):
        q = torch.softmax(torch.randn(logits.shape, generator=rng), -1)
        q[4, 2] = bad
        for verify in (V.verify_sampling, V.verify_sampling_reference):
            with pytest.raises(ValueError, match="^draft_probs: "):
                verify(*good, uniforms=torch.rand(n, 2, generator=rng), draft_probs=q)


_LOGITS, _CU1 = torch.randn(4, 8), torch.tensor([0, 4])


@pytest.mark.parametrize("arg,call", [
    # issue 22: the public helpers beside the kernels took bad arguments to raw torch errors
    ("temperature", lambda: V.target_probs(_LOGITS, _CU1, torch.ones(3))),
    ("cu_nodes", lambda: V.target_probs(_LOGITS, torch.tensor([0, 5]), torch.ones(1))),
    ("top_k", lambda: V.target_probs(_LOGITS, _CU1, torch.ones(1), torch.ones(3, dtype=torch.int64))),
    ("top_p", lambda: V.target_probs(_LOGITS, _CU1, torch.ones(1), None, torch.zeros(1))),
    ("logits", lambda: V.target_probs(_LOGITS.long(), _CU1, torch.ones(1))),
    ("cu_nodes", lambda: V.draw_uniforms(torch.zeros(2, 2, dtype=torch.int32))),
    ("cu_nodes", lambda: V.draw_uniforms(torch.tensor([0.0, 2.0]))),
    ("cu_nodes", lambda: V.draw_uniforms(torch.tensor([0, 5, 2]))),
    ("seeds", lambda: V.keyed_uniforms(["a"], torch.tensor([0]))),
    ("positions", lambda: V.keyed_uniforms([1], [0])),
])
def test_bad_helper_inputs_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()


def test_checked_trees_verify_the_same_and_still_refuse_unusable_logits(rng, poisoned):
    """``checked=`` (a server's trees, checked once on the host by ``check_trees``) gives the same
    outputs as the public checks, greedy and sampling, kernels and references; unusable logits
    are still refused; ``check_trees`` refuses what the public path refuses."""
    trees = [random_parents(n, rng) for n in (1, 7, 16, 3)] + [SHAPES["chain"]]
    logits, tokens, parents, cu = make_batch(trees, 500, rng)
    checked = V.check_trees(parents, cu)
    assert checked[:3] == VI._check_tree_batch(logits, tokens, parents, cu)[:3]
    for verify in (V.verify_greedy, V.verify_greedy_reference):
        assert_same(verify(logits, tokens, parents, cu, checked=checked), verify(logits, tokens, parents, cu))
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5])
    uniforms = V.draw_uniforms(cu, torch.Generator().manual_seed(1))
    for verify in (V.verify_sampling, V.verify_sampling_reference):
        assert_same(verify(logits, tokens, parents, cu, temperature, uniforms=uniforms, checked=checked),
                     verify(logits, tokens, parents, cu, temperature, uniforms=uniforms))
    logits[int(cu[1]) + 2, 3] = float("nan")  # request 1
    with pytest.raises(V.NonFiniteLogitsError) as err:
        V.verify_greedy(logits, tokens, parents, cu, checked=checked)
    assert err.value.requests == [1]
    with pytest.raises(V.NonFiniteLogitsError):
        V.verify_sampling(logits, tokens, parents, cu, temperature, uniforms=uniforms, checked=checked)
    bad = parents.clone()
    bad[int(cu[1]) + 2] = 5
    with pytest.raises(ValueError, match="parents"):
        V.check_trees(bad, cu)
    with pytest.raises(ValueError, match="check_trees takes the host copy"):
        V.check_trees(parents.to("meta"), cu)


def _outcome(check, *args):
    """``("ok", result)`` or ``("error", type, message)`` of ``check(*args)``."""
    try:
        return "ok", check(*args)
    except Exception as err:
        return "error", type(err), str(err)


def _same_checked(a: V.CheckedTrees, b: V.CheckedTrees) -> None:
    assert a[:3] == b[:3]
    assert a.children.dtype == b.children.dtype == torch.int32 and torch.equal(a.children, b.children)


def _random_batch(rng, dtype):
    sizes = torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=rng)),), generator=rng).tolist()
    if int(torch.randint(0, 4, (1,), generator=rng)) == 0:
        sizes.append(MAX_TREE_NODES)
    trees = [random_parents(n, rng) if int(torch.randint(0, 2, (1,), generator=rng)) else
             tree_parents(TREE_KINDS[int(torch.randint(0, len(TREE_KINDS), (1,), generator=rng))], n, rng).tolist()
             for n in sizes]
    parents = torch.tensor([p for t in trees for p in t], dtype=dtype)
    cu = torch.tensor([0] + [len(t) for t in trees]).cumsum(0).to(dtype)
    return parents, cu


def test_importing_verification_does_not_load_numba():
    """check_trees' compiled pass is imported on the first call, not with tkernels.spec."""
    code = "import sys, tkernels.spec; assert 'numba' not in sys.modules, 'numba loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_check_trees_matches_its_reference_on_random_batches(rng, dtype):
    """The compiled check_trees (one numba pass) against its plain-PyTorch reference on random
    valid ragged batches: the sizes and the children table (the walks' table, :func:`VI._children`)."""
    for _ in range(30):
        parents, cu = _random_batch(rng, dtype)
        got = V.check_trees(parents, cu)
        _same_checked(got, VI.check_trees_reference(parents, cu))
        _same_checked(got, VI.check_trees_reference(parents, cu, depths(parents, cu)))
        first, count = VI._children(parents, cu)
        assert torch.equal(got.children, torch.stack([first, count]).int())


def _corrupt(parents, cu, rng):
    """A random invalid (or, by chance, still valid) variant of a valid batch."""
    parents, cu = parents.clone(), cu.clone()
    n, pick = parents.numel(), int(torch.randint(0, 9, (1,), generator=rng))
    i = int(torch.randint(0, n, (1,), generator=rng))
    if pick == 0:  # any parent value
        parents[i] = int(torch.randint(-3, n + 2, (1,), generator=rng))
    elif pick == 1:  # a root that is not -1, or a non-root that is
        parents[int(cu[int(torch.randint(0, cu.numel() - 1, (1,), generator=rng))])] = 0 if i % 2 else -1
    elif pick == 2:  # BFS order broken: two parents swapped
        j = int(torch.randint(0, n, (1,), generator=rng))
        parents[i], parents[j] = parents[j].clone(), parents[i].clone()
    elif pick == 3:  # a parent at its node or later
        parents[i] = i - int(cu[torch.searchsorted(cu, i, right=True) - 1]) + int(torch.randint(0, 2, (1,), generator=rng))
    elif pick == 4:  # offsets: an empty tree, an end past the nodes, a start other than 0
        cu[int(torch.randint(0, cu.numel(), (1,), generator=rng))] += int(torch.randint(-2, 3, (1,), generator=rng))
    elif pick == 5:
        return parents[:0], cu[:1] * 0
    elif pick == 6:
        return parents.float(), cu
    elif pick == 7:
        return parents, cu.float()
    else:
        return parents[None], cu
    return parents, cu


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_check_trees_refuses_what_its_reference_refuses_with_the_same_error(rng, dtype):
    """Random corruptions of valid batches (parents out of range, roots, BFS order, offsets,
    dtypes, shapes): the compiled check_trees and its reference both accept (same result) or
    both raise the same error (validate_parents' wording)."""
    raised = 0
    for _ in range(200):
        parents, cu = _corrupt(*_random_batch(rng, dtype), rng)
        got, want = _outcome(V.check_trees, parents, cu), _outcome(VI.check_trees_reference, parents, cu)
        assert got[0] == want[0], (got, want)
        if got[0] == "ok":
            _same_checked(got[1], want[1])
        else:
            assert got[1:] == want[1:] and got[1] is ValueError
            raised += 1
    assert raised > 100


def test_checked_children_table_is_used_where_it_lives_and_only_there(rng):
    """``checked``'s children table (moved with ``.to``) reaches the walks when it is on the
    logits' device and of these trees; else the launchers derive their own, with the same outputs."""
    trees = [random_parents(n, rng) for n in (1, 9, 30, 4)]
    logits, tokens, parents, cu = make_batch(trees, 64, rng)
    checked = V.check_trees(parents, cu).to(logits.device)
    assert VI._check_tree_batch(logits, tokens, parents, cu, checked=checked).children is checked.children
    other = checked._replace(children=checked.children[:, :-1])
    assert VI._check_tree_batch(logits, tokens, parents, cu, checked=other).children is None
    assert checked._replace(children=None).to("cpu").children is None
    want = V.verify_greedy(logits, tokens, parents, cu)
    for c in (checked, other, checked._replace(children=None)):
        assert_same(V.verify_greedy(logits, tokens, parents, cu, checked=c), want)


def test_checked_finiteness_read_survives_row_maxima_summing_past_float32(rng):
    """The checked call reads one sum of the row maxima: finite maxima whose sum overflows
    float32 are not unusable logits (the exact test decides), a NaN row still is."""
    trees = [random_parents(n, rng) for n in (6, 3)]
    logits, tokens, parents, cu = make_batch(trees, 16, rng)
    logits[:, 0] = 3e38  # every node's maximum: finite, their sum is not
    checked = V.check_trees(parents, cu)
    assert_same(V.verify_greedy(logits, tokens, parents, cu, checked=checked), V.verify_greedy(logits, tokens, parents, cu))
    logits[7, 3] = float("nan")  # request 1
    with pytest.raises(V.NonFiniteLogitsError) as err:
        V.verify_greedy(logits, tokens, parents, cu, checked=checked)
    assert err.value.requests == [1]
