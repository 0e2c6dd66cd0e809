"""Lossless verification of speculation trees: greedy and exact sampling.

Inputs follow the tree contract (``tkernels.spec.tree``): a ragged batch of BFS trees
(``parents`` LOCAL indices, ``cu_nodes`` offsets), ``draft_tokens`` with node 0 of each request
= its last committed token, and the target's ``logits`` at every node (row ``i`` predicts the
children of node ``i``). Output per request: ``accepted_tokens`` int64[B, max_depth+1] (the
accepted draft tokens along the path, then the bonus token; -1 padded), ``accepted_nodes``
int32[B, max_depth+1] (local node indices of the path from node 0; -1 padded) and
``num_accepted`` int32[B] (accepted drafts + 1).

The rules (greedy; the target-only rule for deterministic drafts and recursive rejection
sampling for sampled ones), the tie rule, bad logits, the uniforms and the cost are in
docs/design.md ("Tree verification"). Files: ``kernels.py`` (Triton kernels, launch
parameters, compile-check launches), ``inputs.py`` (checks and per-node processing shared by
launchers and references), ``uniforms.py``, ``launch.py`` (:func:`verify_greedy`,
:func:`verify_sampling`), ``reference.py`` (plain PyTorch).

A server that builds a step's trees on the host checks them there once (:func:`check_trees`,
one compiled pass that also builds the walks' children table; ``.to(device)`` moves that table
once) and passes the result as ``checked=``: the launchers then neither copy the trees back nor
validate nor describe them again, and read one flag from the device (unusable logits).
"""

from tkernels.spec.verify.inputs import GREEDY_TEMPERATURE, CheckedTrees, NonFiniteLogitsError, check_trees
from tkernels.spec.verify.kernels import DEFAULT_CONFIG, launch_config, search_space
from tkernels.spec.verify.launch import verify_greedy, verify_sampling
from tkernels.spec.verify.reference import target_probs, verify_greedy_reference, verify_sampling_reference
from tkernels.spec.verify.uniforms import draw_uniforms, keyed_uniforms

__all__ = [
    "verify_greedy",
    "verify_sampling",
    "verify_greedy_reference",
    "verify_sampling_reference",
    "target_probs",
    "draw_uniforms",
    "keyed_uniforms",
    "check_trees",
    "CheckedTrees",
    "DEFAULT_CONFIG",
    "GREEDY_TEMPERATURE",
    "NonFiniteLogitsError",
    "launch_config",
    "search_space",
]
