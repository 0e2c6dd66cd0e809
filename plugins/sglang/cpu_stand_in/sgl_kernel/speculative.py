"""``sgl_kernel.speculative`` of tkernels' CPU stand-in (imported by SGLang's ``reconstruct_tree`` off CUDA)."""

from tkernels.plugins.sglang.cpu_ops import reconstruct_indices_from_tree_mask

__all__ = ["reconstruct_indices_from_tree_mask"]
