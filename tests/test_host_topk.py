"""tkernels.spec.host_topk.top_k_ids (the compiled top-k the vLLM proposers capture on a CPU)
against torch.topk: the same values in the same order, every id valid, the lower id first among
equal values; fp32, fp16, bf16; vocabularies shorter than a skip block, k up to the vocabulary."""

import pytest
import torch

from tkernels.spec.host_topk import top_k_ids
from tkernels.spec.host_topk_compiled import SKIP_BLOCK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_k_ids_match_torch_topk(rng, dtype):
    for _ in range(60):
        rows = int(torch.randint(1, 12, (1,), generator=rng))
        vocab = int(torch.randint(1, 4 * SKIP_BLOCK + 7, (1,), generator=rng)) if _ % 2 else \
            int(torch.randint(1, 5000, (1,), generator=rng))
        k = int(torch.randint(1, min(vocab, 20) + 1, (1,), generator=rng))
        scale = 1.0 if _ % 3 else 0.01  # small scales round to many equal values (ties) in 16 bits
        x = (torch.randn(rows, vocab, generator=rng) * scale * 10).to(dtype)
        if _ % 5 == 0:
            x = x.round()  # many ties, negatives, zeros of both signs
        ids = top_k_ids(x, k)
        assert ids.shape == (rows, k) and ids.dtype == torch.int64
        values = x.float().gather(1, ids)
        assert torch.equal(values, x.float().topk(k, dim=-1).values)
        assert not ((values[:, 1:] == values[:, :-1]) & (ids[:, 1:] < ids[:, :-1])).any()  # lower id first
        assert all(len(set(r)) == k for r in ids.tolist())


def test_top_k_ids_order_of_signs():
    x = torch.tensor([[-1.0, -2.0, -0.0, -0.5, 3.0, -3.0, float("-inf"), float("inf"), 0.0]])
    assert top_k_ids(x, 9).tolist() == [[7, 4, 2, 8, 3, 0, 1, 5, 6]]  # -0 == +0: the lower id first


def test_top_k_ids_checks_its_arguments():
    with pytest.raises(ValueError, match="^logits: "):
        top_k_ids(torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="^k: "):
        top_k_ids(torch.zeros(2, 5), 6)
    assert top_k_ids(torch.zeros(0, 5), 2).shape == (0, 2)
