"""Tree drafters shared by the offline harness (``bench/spec_mat.py``) and the vLLM tree proposer."""

from __future__ import annotations

from functools import cache

from .tree import TR_80_WIDTHS, TreeShape, from_widths

__all__ = ["STATIC_WIDTHS", "static_template"]

# Token Recycling's fan-out rule (tkernels.spec.tree.from_widths) at three sizes: the paper's
# 80-node tree, then one and two steps wider at every depth (138 and 274 nodes), so that static
# templates past 80 nodes follow the same rule instead of a new shape.
STATIC_WIDTHS: tuple[tuple[int, ...], ...] = (TR_80_WIDTHS, (8, 7, 5, 4, 3, 2, 1, 1, 1), (8, 8, 6, 5, 4, 3, 2, 2, 1, 1))


@cache
def _widths_shape(widths: tuple[int, ...]) -> TreeShape:
    return from_widths(widths)


def static_template(num_nodes: int) -> TreeShape:
    """The static Token Recycling tree of ``num_nodes`` nodes (root included): the first
    ``num_nodes`` nodes, in BFS order, of the smallest :data:`STATIC_WIDTHS` rule that has as
    many (the paper's 80-node template up to 80 nodes)."""
    for widths in STATIC_WIDTHS:
        shape = _widths_shape(widths)
        if num_nodes <= len(shape):
            if num_nodes < 1:
                break
            return shape.truncate(num_nodes)
    raise ValueError(f"num_nodes: must be in [1, {len(_widths_shape(STATIC_WIDTHS[-1]))}], got {num_nodes}")
