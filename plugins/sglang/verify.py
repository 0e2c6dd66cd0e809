"""Tree verification of tkernels' drafts inside SGLang's ``eagle_sample`` (AROUND hook).

For a verify input drafted by :class:`~tkernels.plugins.sglang.drafter.TokenRecyclingWorker`,
the accepted paths come from tkernels' kernels on the BFS ``parents`` of the drafted trees:
:func:`tkernels.spec.verify.verify_greedy` when every request is greedy, else the exact
target-only sampling rule :func:`tkernels.spec.verify.verify_sampling` (temperature, top-k,
top-p per request; SGLang's verification ignores min-p too). The result is returned in SGLang's
contract ``(predict int32[bs*d], accept_lens int32[bs], accept_index int32[bs, max_tree_depth])``:
``accept_index`` holds the flat indices of the accepted nodes (node 0 first, -1 padded),
``predict`` at each of them the token the target chose after it, ``accept_lens`` accepted
drafts + 1 (the bonus).

Requests that need logits processing SGLang applies inside ``eagle_sample`` (penalties,
logit bias, grammar masks, watermarks) go through SGLang's own path unchanged. Either way the
drafter then learns from the step's logits and accepted paths. Other verify inputs (EAGLE,
SGLang's own NGRAM) always take SGLang's path.
"""

from __future__ import annotations

import torch

from tkernels.spec.verify import verify_greedy, verify_sampling


def needs_sglang_processing(sampling_info, grammar_mask) -> bool:
    return (grammar_mask is not None or sampling_info.acc_additive_penalties is not None
            or sampling_info.acc_scaling_penalties is not None or sampling_info.logit_bias is not None
            or sampling_info.has_watermark_candidates)


def verify_tree(logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor, num_nodes: int,
                max_tree_depth: int, sampling_info):
    """tkernels verification of ``bs`` trees of ``num_nodes`` nodes, in SGLang's return contract."""
    bs = draft_tokens.numel() // num_nodes
    device = logits.device
    cu_nodes = torch.arange(0, (bs + 1) * num_nodes, num_nodes, dtype=torch.int32, device=device)
    if sampling_info.is_all_greedy:
        tokens, nodes, num = verify_greedy(logits, draft_tokens, parents, cu_nodes)
    else:
        tokens, nodes, num = verify_sampling(logits, draft_tokens, parents, cu_nodes,
                                             sampling_info.temperatures.view(-1).float(),
                                             sampling_info.top_ks.view(-1), sampling_info.top_ps.view(-1).float())
    accepted = nodes >= 0
    flat = torch.where(accepted, nodes + cu_nodes[:-1, None], -1)
    accept_index = torch.full((bs, max_tree_depth), -1, dtype=torch.int32, device=device)
    accept_index[:, : flat.shape[1]] = flat
    predict = torch.zeros(bs * num_nodes, dtype=torch.int32, device=device)
    predict[flat[accepted].long()] = tokens[accepted].int()
    return predict, num, accept_index


def eagle_sample(original, verify_input, batch, logits_output, grammar_mask=None, *args, **kwargs):
    drafter = getattr(verify_input, "tkernels_drafter", None)
    if drafter is None:
        return original(verify_input, batch, logits_output, grammar_mask, *args, **kwargs)
    if needs_sglang_processing(batch.sampling_info, grammar_mask):
        result = original(verify_input, batch, logits_output, grammar_mask, *args, **kwargs)
    else:
        result = verify_tree(logits_output.next_token_logits, verify_input.draft_token, verify_input.tkernels_parents,
                             verify_input.draft_token_num, verify_input.max_tree_depth, batch.sampling_info)
    drafter.observe(logits_output.next_token_logits, verify_input.draft_token, *result)
    return result
