"""Speculation: tree contract and templates, drafters, dynamic tree shapes, verification."""

from .kv_compaction import compact_kv, compact_kv_reference
from .ngram import propose_ngram
from .token_recycling import TokenRecycling
from .tree import (
    TreeShape,
    ancestor_bits,
    ancestor_mask,
    best_path,
    chain,
    depths,
    from_child_counts,
    from_rank_paths,
    from_widths,
    leaf_paths,
    positions,
    retrieve_indices,
    select_subtree,
    to_sglang,
    to_vllm_linear,
    token_recycling_template,
    validate_parents,
)
from .tree_policy import ConfidenceTreePolicy, DynamicTreePolicy, StepTime, greedy_tree
from .verify import (
    draw_uniforms,
    keyed_uniforms,
    target_probs,
    verify_greedy,
    verify_greedy_reference,
    verify_sampling,
    verify_sampling_reference,
)

__all__ = [
    "TreeShape",
    "ancestor_bits",
    "ancestor_mask",
    "best_path",
    "chain",
    "depths",
    "from_child_counts",
    "from_rank_paths",
    "from_widths",
    "leaf_paths",
    "positions",
    "retrieve_indices",
    "select_subtree",
    "to_sglang",
    "to_vllm_linear",
    "token_recycling_template",
    "validate_parents",
    "propose_ngram",
    "TokenRecycling",
    "ConfidenceTreePolicy",
    "DynamicTreePolicy",
    "StepTime",
    "greedy_tree",
    "draw_uniforms",
    "keyed_uniforms",
    "target_probs",
    "verify_greedy",
    "verify_greedy_reference",
    "verify_sampling",
    "verify_sampling_reference",
    "compact_kv",
    "compact_kv_reference",
]
