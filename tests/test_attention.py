"""Mixed-batch paged attention vs its plain-PyTorch reference (CPU interpreter, fp16/fp32)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tkernels.attention import mixed_attention, mixed_attention_reference, plan_mixed_attention
from tkernels.attention.batch import TREE_KINDS, random_paged_batch, random_parents, tree_parents
from tkernels.attention.plan import MAX_TREE_NODES, default_config
from tkernels.spec.tree import validate_parents

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}
# Splits a context into 16-key chunks whenever the batch is small, so split-KV runs on CPU shapes.
SPLIT_CONFIG = {"min_split_keys": 16, "decode_block_n": 16}


def run_and_check(batch, dtype, *, window=None, softcap=None, config=None, num_sms=None, scale=None):
    """Kernel (into a NaN-poisoned output) vs reference; returns the plan used."""
    num_blocks, block_size, num_kv_heads, head_dim = batch.k_cache.shape
    plan = plan_mixed_attention(
        batch.cu_seqlens_q, batch.seq_lens, batch.block_table, num_q_heads=batch.q.shape[1],
        num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks, block_size=block_size,
        window=window, config=config, num_sms=num_sms, **batch.tree_kwargs(),
    )
    out = torch.full_like(batch.q, float("nan"))
    got = mixed_attention(*batch.inputs(), scale, window=window, softcap=softcap, out=out, plan=plan, **batch.tree_kwargs())
    assert got is out
    want = mixed_attention_reference(*batch.inputs(), scale, window=window, softcap=softcap, **batch.tree_kwargs())
    assert not out.isnan().any(), "some output element was never written"
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    return plan


def make(q_lens, seq_lens, rng, *, group=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32, trees=None):
    return random_paged_batch(
        q_lens, seq_lens, num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, generator=rng, trees=trees,
    )


@pytest.mark.parametrize(
    "group,head_dim,block_size,dtype",
    [(1, 32, 16, torch.float32), (4, 64, 32, torch.float16), (8, 32, 64, torch.float16), (4, 32, 16, torch.float16),
     (2, 160, 16, torch.float32)],  # head_dim > 128: the 32 x 16 default tiles
)
def test_random_mixed_batch(group, head_dim, block_size, dtype, rng):
    # chunk over a prefix, decode, empty request, tree, chunk with no prefix
    q_lens = [int(torch.randint(65, 100, (1,), generator=rng)), 1, 0, 9, 23]
    prefixes = torch.randint(0, 90, (5,), generator=rng).tolist()
    batch = make(q_lens, [q + p for q, p in zip(q_lens, prefixes)], rng, group=group, num_kv_heads=1 if group == 8 else 2,
                 head_dim=head_dim, block_size=block_size, dtype=dtype, trees=[False, False, False, True, False])
    run_and_check(batch, dtype)


@pytest.mark.parametrize("block_size", [16, 32])
def test_prefix_on_and_across_block_boundaries(block_size, rng):
    b = block_size
    seq_lens = [b, b + 1, 2 * b - 1, 2 * b, 2 * b + 3, 3 * b]
    q_lens = [1, 2, b - 1, b, 5, b + 1]  # new tokens start on, just after and before block edges
    run_and_check(make(q_lens, seq_lens, rng, block_size=block_size), torch.float32)


def test_decode_only_with_split_kv(rng):
    seq_lens = torch.randint(1, 120, (6,), generator=rng).tolist()
    batch = make([1] * 6, seq_lens, rng, group=8, num_kv_heads=1, dtype=torch.float16)
    plan = run_and_check(batch, torch.float16, config=SPLIT_CONFIG)
    assert plan.merge.shape[0] > 0, "split-KV was not exercised"
    assert plan.config["decode_block_m"] == 16  # 1 token x 8 heads fits the smallest tile
    # no prefill items: the prefill branch is compiled with the decode shape
    assert (plan.config["prefill_block_m"], plan.config["prefill_block_n"]) == (16, 16)


def test_split_kv_merge_over_several_head_blocks(rng):
    # 16 query heads at head_dim 160 (padded to 256): the merge takes 8 heads per program.
    seq_lens = torch.randint(20, 120, (3,), generator=rng).tolist()
    batch = make([1] * 3, seq_lens, rng, group=8, num_kv_heads=2, head_dim=160, dtype=torch.float32)
    plan = run_and_check(batch, torch.float32, config=SPLIT_CONFIG)
    assert plan.merge.shape[0] > 0, "split-KV was not exercised"


def test_chunk_only(rng):
    q_lens = [70, 130, 66]
    batch = make(q_lens, [q + p for q, p in zip(q_lens, [0, 17, 48])], rng, group=4, num_kv_heads=1, dtype=torch.float16)
    plan = run_and_check(batch, torch.float16)
    assert plan.merge.shape[0] == 0 and (plan.items[:, 2] == 0).all()  # prefill tiles only, no splits


@pytest.mark.parametrize("nodes", [1, 2, 17, MAX_TREE_NODES])
def test_trees(nodes, rng):
    # a tree beside an ordinary short chunk, so both visibility rules meet in one tile class
    batch = make([nodes, 3], [nodes + 40, 35], rng, group=4, num_kv_heads=1, trees=[True, False])
    run_and_check(batch, torch.float32, config=SPLIT_CONFIG)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("nodes", [65, 128, MAX_TREE_NODES])
def test_trees_past_64_nodes(nodes, kind, dtype, rng):
    # The big tree (prefill tiles: more than decode_max_q tokens, several 32-bit ancestor words,
    # tiles straddling word edges) beside a 40-node tree (decode tiles), a decode and a chunk.
    q_lens = [nodes, 1, 40, 70]
    batch = make(q_lens, [q + p for q, p in zip(q_lens, [37, 20, 5, 9])], rng, group=2, num_kv_heads=1, head_dim=16,
                 dtype=dtype, trees=[True, False, True, False])
    batch.tree_parents[:nodes] = tree_parents(kind, nodes, rng)
    validate_parents(batch.tree_parents[:nodes])
    plan = run_and_check(batch, dtype, config={"prefill_block_n": 16})
    assert plan.ancestors.shape == (sum(q_lens), -(-nodes // 64))
    assert {int(c) for c in plan.items[:, 2]} == {0, 1}  # both tile classes ran


def test_tree_nodes_see_only_ancestors(rng):
    # BFS order: 1 and 2 hang off 0, 3 off 1; node 2 must not see its sibling 1 or nephew 3
    batch = make([4], [4], rng, group=1, num_kv_heads=1)
    batch.tree_parents = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
    batch.is_tree = torch.tensor([True])
    run_and_check(batch, torch.float32)
    v = batch.v_cache[batch.block_table[0, 0].long(), :4, 0]  # values of keys 0..3
    batch.q.zero_()  # uniform attention: node 2 averages keys {0, 2}, node 3 keys {0, 1, 3}
    out = mixed_attention(*batch.inputs(), **batch.tree_kwargs())
    torch.testing.assert_close(out[2, 0], (v[0] + v[2]) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3, 0], (v[0] + v[1] + v[3]) / 3, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 7, 40])
def test_sliding_window(window, rng):
    q_lens = [80, 1, 12, 6]
    batch = make(q_lens, [150, 70, 60, 50], rng, trees=[False, False, False, True])
    run_and_check(batch, torch.float32, window=window, config=SPLIT_CONFIG)


def test_softcap_and_scale(rng):
    batch = make([70, 1, 8], [100, 33, 8], rng, dtype=torch.float16, trees=[False, False, True])
    run_and_check(batch, torch.float16, softcap=2.5, scale=0.7, config=SPLIT_CONFIG)


def test_empty_batch_and_no_tokens(rng):
    batch = make([0, 0], [5, 0], rng)
    assert mixed_attention(*batch.inputs()).shape == (0, 8, 32)
    batch = make([], [], rng)
    assert mixed_attention(*batch.inputs()).shape == (0, 8, 32)


def test_vllm_kv_layout_and_strided_out(rng):
    """K and V as views of one [num_blocks, 2, block_size, Hkv, D] cache; out a slice of a wider buffer."""
    batch = make([70, 1, 5], [90, 20, 40], rng, dtype=torch.float16)
    kv = torch.stack([batch.k_cache, batch.v_cache], 1)
    k, v = kv[:, 0], kv[:, 1]
    assert not k.is_contiguous()
    wide = torch.full((batch.q.shape[0], batch.q.shape[1], 2 * batch.q.shape[2]), float("nan"), dtype=torch.float16)
    out = wide[..., : batch.q.shape[2]]
    mixed_attention(batch.q, k, v, *batch.inputs()[3:], out=out)
    want = mixed_attention_reference(*batch.inputs())
    torch.testing.assert_close(out.float(), want.float(), **TOL[torch.float16])
    assert wide[..., batch.q.shape[2]:].isnan().all()  # nothing written outside out


def test_random_parents_are_valid(rng):
    for n in (1, 2, 64):
        p = random_parents(n, rng)
        assert p[0] == -1 and all(0 <= p[i] < i for i in range(1, n))
        validate_parents(p)  # BFS order, as the spec contract requires


@settings(max_examples=6, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.sampled_from(["decode", "chunk", "tree", "empty"]), st.integers(1, 24), st.integers(0, 60)),
        min_size=1, max_size=4,
    ),
    group=st.sampled_from([1, 4, 8]),
    block_size=st.sampled_from([16, 32, 64]),
    split=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_batch_composition(requests, group, block_size, split, seed):
    rng = torch.Generator().manual_seed(seed)
    q_lens = [{"decode": 1, "chunk": n, "tree": n, "empty": 0}[kind] for kind, n, _ in requests]
    seq_lens = [q + prefix for q, (_, _, prefix) in zip(q_lens, requests)]
    trees = [kind == "tree" for kind, _, _ in requests]
    batch = make(q_lens, seq_lens, rng, group=group, num_kv_heads=1, block_size=block_size, trees=trees)
    run_and_check(batch, torch.float32, config=SPLIT_CONFIG if split else None)


def _bad_inputs():
    """(argument expected in the message, mutation of (args, kwargs))."""

    def set_arg(i, value):
        def mutate(args, kwargs):
            args[i] = value(args[i]) if callable(value) else value
        return mutate

    def both_caches(value):
        def mutate(args, kwargs):
            args[1], args[2] = value(args[1]), value(args[2])
        return mutate

    def set_kw(name, value):
        def mutate(args, kwargs):
            kwargs[name] = value(kwargs) if callable(value) else value
        return mutate

    return [
        ("q", set_arg(0, lambda q: q[0])),
        ("q", set_arg(0, lambda q: q.to(torch.int32))),
        ("q", set_arg(0, lambda q: q.transpose(1, 2).contiguous().transpose(1, 2))),
        ("k_cache", set_arg(1, lambda k: k.half())),
        ("k_cache", both_caches(lambda k: k[:, :, :1].expand(-1, -1, 3, -1).contiguous())),  # 3 KV heads, 8 q heads
        ("v_cache", set_arg(2, lambda v: v[:-1])),
        ("block_table", set_arg(3, lambda t: t.long())),
        ("block_table", set_arg(3, lambda t: t[:, :1])),
        ("block_table", set_arg(3, lambda t: torch.where(t[:, :1] >= 0, t.shape[0] + 1000, t))),
        ("block_table", set_arg(3, lambda t: t[:1])),
        ("cu_seqlens_q", set_arg(4, lambda c: c.flip(0))),
        ("cu_seqlens_q", set_arg(4, lambda c: c.long())),
        ("cu_seqlens_q", set_arg(4, lambda c: torch.cat([c[:-1], c[-1:] - 1]))),  # fewer tokens than q
        ("seq_lens", set_arg(5, lambda s: s - 2)),
        ("seq_lens", set_arg(5, lambda s: s[:1])),
        ("tree_parents", set_kw("tree_parents", lambda kw: torch.zeros_like(kw["tree_parents"]))),
        ("tree_parents", set_kw("tree_parents", lambda kw: kw["tree_parents"][:-1])),
        ("is_tree", set_kw("is_tree", lambda kw: kw["is_tree"].int())),
        ("is_tree", set_kw("is_tree", None)),
        ("out", set_kw("out", lambda kw: torch.empty(3, 3))),
        ("window", set_kw("window", 0)),
        ("softcap", set_kw("softcap", -1.0)),
    ]


@pytest.mark.parametrize("arg,mutate", _bad_inputs())
def test_bad_inputs_name_the_argument(arg, mutate, rng):
    batch = make([3, 1], [20, 2], rng, trees=[True, False])
    args = list(batch.inputs())
    kwargs = dict(batch.tree_kwargs())
    mutate(args, kwargs)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        mixed_attention(*args, **kwargs)


@pytest.mark.parametrize("arg,mutate", [
    ("scale", lambda a, kw: kw.update(scale=float("nan"))),
    ("window", lambda a, kw: kw.update(window=0)),
    ("softcap", lambda a, kw: kw.update(softcap=-1.0)),
    ("q", lambda a, kw: a.__setitem__(0, a[0][0])),
    ("seq_lens", lambda a, kw: a.__setitem__(5, a[5][:1])),
    ("cu_seqlens_q", lambda a, kw: a.__setitem__(4, a[4].long())),
    ("is_tree", lambda a, kw: kw.update(is_tree=None)),
])
def test_reference_bad_inputs_name_the_argument(arg, mutate, rng):
    """Issue 22: the reference took NaN scales, window 0 and short seq_lens silently (it serves
    on vLLM-CPU); it checks what the kernel checks without a host read."""
    batch = make([3, 1], [20, 2], rng, trees=[True, False])
    args, kwargs = list(batch.inputs()), dict(batch.tree_kwargs())
    mutate(args, kwargs)
    scale = kwargs.pop("scale", None)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        mixed_attention_reference(*args, scale, **kwargs)


@pytest.mark.parametrize("arg,change", [
    ("head_dim", {"head_dim": 32.0}), ("num_sms", {"num_sms": 0}), ("block_size", {"block_size": 0}),
    ("num_tokens", {"num_tokens": -1}), ("num_kv_heads", {"num_kv_heads": 0}), ("num_blocks", {"num_blocks": -1}),
])
def test_plan_bad_sizes_name_the_argument(arg, change, rng):
    batch = make([3], [10], rng)
    sizes = dict(num_q_heads=8, num_kv_heads=2, head_dim=32, num_blocks=batch.k_cache.shape[0], block_size=16)
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, **{**sizes, **change})
    with pytest.raises(ValueError, match=r"^head_dim\b"):
        default_config(0)


def test_bad_tree_size_and_stale_plan(rng):
    batch = make([MAX_TREE_NODES + 1], [MAX_TREE_NODES + 9], rng, trees=[True])
    with pytest.raises(ValueError, match="^tree_parents"):
        mixed_attention(*batch.inputs(), **batch.tree_kwargs())
    batch = make([3], [10], rng)
    plan = plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, num_q_heads=8, num_kv_heads=2,
                                head_dim=32, num_blocks=batch.k_cache.shape[0], block_size=16, window=4)
    with pytest.raises(ValueError, match="^plan"):
        mixed_attention(*batch.inputs(), plan=plan)
    with pytest.raises(ValueError, match="^config"):
        plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, num_q_heads=8, num_kv_heads=2,
                             head_dim=32, num_blocks=batch.k_cache.shape[0], block_size=16, config={"block_m": 3})
    with pytest.raises(ValueError, match="^dtype"):
        plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, num_q_heads=8, num_kv_heads=2,
                             head_dim=32, num_blocks=batch.k_cache.shape[0], block_size=16, dtype=torch.int8)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp32_inputs_plan_smaller_tiles_and_match_the_reference(rng, head_dim):
    """fp32 K/V tiles need twice the registers: the planner takes the dtype (mixed_attention
    passes q's) and plans the fp32 default tiles, which compile without spills (compile check)."""
    batch = make([80, 1, 5], [300, 70, 9], rng, head_dim=head_dim, dtype=torch.float32, trees=[False, False, True])
    kw = dict(num_q_heads=batch.q.shape[1], num_kv_heads=batch.k_cache.shape[2], head_dim=head_dim,
              num_blocks=batch.k_cache.shape[0], block_size=batch.k_cache.shape[1], **batch.tree_kwargs())
    fp32 = plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, dtype=torch.float32, **kw)
    half = plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, dtype=torch.float16, **kw)
    assert fp32.config["prefill_block_m"] < half.config["prefill_block_m"]
    assert fp32.config["prefill_block_m"] == default_config(head_dim, torch.float32)["prefill_block_m"]
    ref = mixed_attention_reference(*batch.inputs(), **batch.tree_kwargs())
    for plan in (fp32, None):  # None: mixed_attention plans with q's dtype
        out = mixed_attention(*batch.inputs(), plan=plan, **batch.tree_kwargs())
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_mixed_batch(dtype, head_dim):
    gen = torch.Generator("cuda").manual_seed(head_dim)
    q_lens = [300, 1, 1, 64, 0, 17]
    batch = random_paged_batch(q_lens, [q + p for q, p in zip(q_lens, [700, 2000, 5, 900, 3, 0])], num_q_heads=32,
                               num_kv_heads=8, head_dim=head_dim, block_size=16, dtype=dtype, device="cuda",
                               generator=gen, trees=[False, False, False, True, False, False])
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOL[torch.float16]
    for window, softcap in ((None, None), (256, 30.0)):
        out = mixed_attention(*batch.inputs(), window=window, softcap=softcap, **batch.tree_kwargs())
        want = mixed_attention_reference(*batch.inputs(), window=window, softcap=softcap, **batch.tree_kwargs())
        torch.testing.assert_close(out.float(), want.float(), **tol)


def test_stale_trees_and_bad_scalars_are_refused(rng):
    """Issue 14 item 8: a plan built without trees, called with tree_parents/is_tree, computed
    causal attention (a stale window was already refused); scale=nan was used; window=2.5 raised
    NotImplementedError from deep inside. Each is a ValueError naming its argument."""
    import numpy as np

    batch = make([3, 1], [20, 2], rng, trees=[True, False])
    num_blocks, block_size, num_kv_heads, head_dim = batch.k_cache.shape
    layout = dict(num_q_heads=8, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                  block_size=block_size)
    causal = plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, **layout)
    with pytest.raises(ValueError, match="^plan: .*tree"):
        mixed_attention(*batch.inputs(), plan=causal, **batch.tree_kwargs())
    with_trees = plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, **layout,
                                      **batch.tree_kwargs())
    other = dict(batch.tree_kwargs())
    other["tree_parents"] = other["tree_parents"].clone()
    other["tree_parents"][2] = 1 - other["tree_parents"][2]  # node 2's parent 0 <-> 1: another tree
    with pytest.raises(ValueError, match="^plan: .*tree"):
        mixed_attention(*batch.inputs(), plan=with_trees, **other)
    same = {k: v.clone() for k, v in batch.tree_kwargs().items()}  # equal values: accepted
    want = mixed_attention_reference(*batch.inputs(), **batch.tree_kwargs())
    torch.testing.assert_close(mixed_attention(*batch.inputs(), plan=with_trees, **same), want, **TOL[torch.float32])
    torch.testing.assert_close(mixed_attention(*batch.inputs(), plan=with_trees), want, **TOL[torch.float32])
    for scale in (float("nan"), float("inf"), 0.0, -1.0, "0.1"):
        with pytest.raises(ValueError, match="^scale: "):
            mixed_attention(*batch.inputs(), scale, **batch.tree_kwargs())
    with pytest.raises(ValueError, match="^softcap: "):
        mixed_attention(*batch.inputs(), softcap=float("inf"), **batch.tree_kwargs())
    for window in (2.5, "4", True):
        with pytest.raises(ValueError, match="^window: "):
            mixed_attention(*batch.inputs(), window=window, **batch.tree_kwargs())
        with pytest.raises(ValueError, match="^window: "):
            plan_mixed_attention(batch.cu_seqlens_q, batch.seq_lens, batch.block_table, **layout, window=window)
    got = mixed_attention(*batch.inputs(), window=np.int64(4), **batch.tree_kwargs())  # NumPy integers are integers
    torch.testing.assert_close(got, mixed_attention_reference(*batch.inputs(), window=4, **batch.tree_kwargs()),
                               **TOL[torch.float32])


def test_host_copies_plan_the_same_step_and_checked_skips_the_values_only(rng):
    """A server's host copies (``host=``) plan exactly what the device tensors plan; ``checked``
    skips the tree and block-id validation (a server checked them once) but not the sizes."""
    from tkernels.attention import HostBatch
    from tkernels.spec.tree import depths

    batch = make([9, 3, 1], [50, 35, 17], rng, trees=[True, False, False])
    num_blocks, block_size, num_kv_heads, head_dim = batch.k_cache.shape
    args = (batch.cu_seqlens_q, batch.seq_lens, batch.block_table)
    kwargs = dict(num_q_heads=batch.q.shape[1], num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                  block_size=block_size, **batch.tree_kwargs())
    tree_depths = torch.zeros(batch.q.shape[0], dtype=torch.int64)
    tree_depths[:9] = depths(batch.tree_parents[:9])
    host = HostBatch(batch.cu_seqlens_q.clone(), batch.seq_lens.clone(), batch.tree_parents.clone(), batch.is_tree.clone(),
                     tree_depths)
    want = plan_mixed_attention(*args, **kwargs)
    got = plan_mixed_attention(*args, **kwargs, host=host, checked=True)
    for field in ("items", "merge", "is_tree", "ancestors", "positions"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    bad = batch.tree_parents.clone()
    bad[:9] = torch.tensor([-1, 0, 1, 0, 3, 3, 4, 4, 4], dtype=torch.int32)  # a tree, but not in BFS order
    with pytest.raises(ValueError, match="tree_parents: tree requests must hold BFS trees"):
        plan_mixed_attention(*args, **{**kwargs, "tree_parents": bad})
    plan_mixed_attention(*args, **{**kwargs, "tree_parents": bad}, host=host._replace(tree_parents=bad), checked=True)
    with pytest.raises(ValueError, match="host: must hold host copies"):
        plan_mixed_attention(*args, **kwargs, host=host._replace(seq_lens=batch.seq_lens[:2]))
