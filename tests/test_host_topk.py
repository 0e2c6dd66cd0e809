"""tkernels.spec.host_topk.top_k_ids (the compiled top-k the vLLM proposers capture on a CPU)
against torch.topk: the same values in the same order, every id valid, the lower id first among
equal values; fp32, fp16, bf16; vocabularies shorter than a skip block, k up to the vocabulary.
host_topk.top_k_probs (the tree proposer's capture) against its reference,
token_recycling.top_k_probs: the same ids (top_k_ids' order among ties), probabilities to float32
rounding, the reference's errors; other dtypes and devices run the reference itself."""

import pytest
import torch

from tkernels.spec.host_topk import top_k_ids, top_k_probs
from tkernels.spec.host_topk_compiled import SKIP_BLOCK
from tkernels.spec.token_recycling import top_k_probs as reference_top_k_probs


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


def test_top_k_probs_match_the_reference(rng):
    for _ in range(60):
        rows = int(torch.randint(1, 12, (1,), generator=rng))
        vocab = int(torch.randint(1, 4 * SKIP_BLOCK + 7, (1,), generator=rng)) if _ % 2 else \
            int(torch.randint(1, 50000, (1,), generator=rng))
        k = int(torch.randint(1, min(vocab, 20) + 1, (1,), generator=rng))
        x = torch.randn(rows, vocab, generator=rng) * (30.0 if _ % 3 == 0 else 3.0)  # peaked rows too
        if _ % 4 == 0:
            x[torch.rand(rows, vocab, generator=rng) < 0.3] = float("-inf")  # masked logits
            x[:, 0] = 0.0  # every row keeps a finite logit
        if _ % 5 == 0:
            x = x.round()  # ties
        ids, probs = top_k_probs(x, k)
        ref_ids, ref_probs = reference_top_k_probs(x, k)
        assert ids.shape == probs.shape == (rows, k) and ids.dtype == torch.int64 and probs.dtype == torch.float32
        assert torch.equal(ids, top_k_ids(x, k))  # the compiled ids' order among ties
        assert torch.equal(x.gather(1, ids), x.gather(1, ref_ids))  # the reference's values
        torch.testing.assert_close(probs, x.gather(1, ids).sub(x.logsumexp(-1, keepdim=True)).exp(), rtol=2e-5,
                                   atol=1e-30)
        torch.testing.assert_close(probs.sort(-1).values, ref_probs.sort(-1).values, rtol=2e-5, atol=1e-30)


def test_top_k_probs_of_other_inputs_are_the_reference():
    x = torch.randn(3, 40)
    for other in (x.half(), x.bfloat16(), x.double(), torch.zeros(0, 40)):
        for got, want in zip(top_k_probs(other, 5), reference_top_k_probs(other, 5)):
            assert torch.equal(got, want)
    for bad, k, arg in ((torch.zeros(3, dtype=torch.int64), 1, "logits"), (torch.zeros(5), 1, "logits"),
                        ([[0.0, 1.0]], 1, "logits"), (torch.zeros(2, 5), 6, "k"), (torch.zeros(2, 5), 0, "k")):
        with pytest.raises(ValueError, match=f"^{arg}: "):
            top_k_probs(bad, k)
