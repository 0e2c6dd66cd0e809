"""Every launch a full (non-quick) ``tkernels autotune`` can try, for the GPU-target compile
check (``python -m tkernels.registry --candidates``).

The kernels own their search spaces (``search_space`` beside each ``DEFAULT_CONFIG``) and the
way a config compiles (their launch helpers); which configs autotune tries, on which batches and
what it prunes, is autotune's, so the candidate lists live here. Importing this module
registers them with :func:`tkernels.registry.add_candidates`; the registry imports it by name
(:data:`tkernels.registry.CANDIDATES_MODULE`) only when ``--candidates`` asks for them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tkernels.attention.kernels import compile_launch as attention_launch
from tkernels.attention.plan import search_space as attention_search_space
from tkernels.autotune.profile import attention_cases, fits_shared_memory
from tkernels.continuous import acceptance
from tkernels.registry import Launch, add_candidates
from tkernels.spec import kv_compaction
from tkernels.spec.verify import kernels as verify_kernels

# Head sizes of the built-in models autotune tunes for; the compile check compiles their candidates.
CANDIDATE_HEAD_DIMS = (64, 128)


def attention_candidate_launches(shared_limit: int | None) -> Iterator[Launch]:
    """Every attention launch a full ``tkernels autotune`` can try, as it launches it (bf16;
    decode-only, prefill-only and mixed batches for the three stages, each candidate over the
    defaults), less those :func:`~tkernels.autotune.profile.fits_shared_memory` prunes for
    ``shared_limit``."""
    cases = attention_cases(dry_run=False, quick=False)
    seen = set()
    for head_dim in CANDIDATE_HEAD_DIMS:
        for stage, candidates in attention_search_space(dry_run=False, quick=False).items():
            for candidate in candidates:
                if not fits_shared_memory(candidate, head_dim, shared_limit):
                    continue
                launch = attention_launch(candidate, head_dim, torch.bfloat16, cases[stage].q_lens, candidate=True)
                key = (tuple(sorted(launch.constexprs.items())), tuple(sorted(launch.options.items())))
                if key not in seen:
                    seen.add(key)
                    yield launch


def _verify_configs() -> list[dict]:
    return [{**verify_kernels.DEFAULT_CONFIG, **c} for c in verify_kernels.search_space(dry_run=False, quick=False)]


def _node_pass_candidates(shared_limit: int | None) -> Iterator[Launch]:
    count, vocab = verify_kernels.CHECK_SHAPES[0]
    for mode in verify_kernels.MODES:
        for cfg in _verify_configs():
            yield verify_kernels.node_pass_launch(mode, torch.bfloat16, count, vocab, cfg, candidate=True)


def _rejection_walk_candidates(shared_limit: int | None) -> Iterator[Launch]:
    for cfg in _verify_configs():
        yield verify_kernels.rejection_walk_launch(torch.bfloat16, verify_kernels.CHECK_SHAPES[0][1], cfg, candidate=True)


def _kv_compaction_candidates(shared_limit: int | None) -> Iterator[Launch]:
    for c in kv_compaction.search_space(dry_run=False, quick=False):
        yield kv_compaction.compile_launch("bf16", 8, {**kv_compaction.DEFAULT_CONFIG, **c}, candidate=True)


def _trajectory_candidates(shared_limit: int | None) -> Iterator[Launch]:
    for c in acceptance.search_space(dry_run=False, quick=False):
        yield acceptance.trajectory_launch("fp32", 1600, {**acceptance.DEFAULT_CONFIG, **c}, candidate=True)


CANDIDATES = {
    "tkernels.attention.kernels:mixed_attention_kernel": attention_candidate_launches,
    "tkernels.spec.verify.kernels:_node_pass_kernel": _node_pass_candidates,
    "tkernels.spec.verify.kernels:_rejection_walk_kernel": _rejection_walk_candidates,
    "tkernels.spec.kv_compaction:_compact_kv_kernel": _kv_compaction_candidates,
    "tkernels.continuous.acceptance:_trajectory_log_ratio_kernel": _trajectory_candidates,
}
for _key, _launches in CANDIDATES.items():
    add_candidates(_key, _launches)
