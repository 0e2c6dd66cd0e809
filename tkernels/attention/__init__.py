"""Mixed-batch paged attention (prefill chunks, decodes and speculation trees in one launch)."""

from tkernels.attention.mixed_attention import (
    MixedAttentionPlan,
    mixed_attention,
    mixed_attention_reference,
    plan_mixed_attention,
)

__all__ = ["MixedAttentionPlan", "mixed_attention", "mixed_attention_reference", "plan_mixed_attention"]
