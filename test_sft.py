"""sft.py: the response-only loss against hand-computed values, and the resumable data order."""
import math

import torch

from data import batch_indices
from sft import sft_loss


def naive_sft_loss(logits, tokens, loss_mask):
    """Python loops and math.log: -log p(token t | logits at t-1) averaged over masked t >= 1."""
    total, n = 0.0, 0
    for b in range(tokens.size(0)):
        for t in range(1, tokens.size(1)):
            if loss_mask[b, t]:
                row = [math.exp(v) for v in logits[b, t - 1].tolist()]
                total += -math.log(row[tokens[b, t]] / sum(row))
                n += 1
    return total / n


def example():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64) * 2
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # row 0: 2 prompt tokens; row 1: padding after
    return logits, tokens, mask


def test_sft_loss_matches_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0], [0.0, 0.0]]])  # (1, 3, 2)
    tokens = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    # t=1: p(1 | logits[0]) = 3/4; t=2: p(0 | logits[1]) = 2/3
    want = (-math.log(3 / 4) - math.log(2 / 3)) / 2
    got = sft_loss(logits, tokens, mask).item()
    unshifted = (-math.log(2 / 3 * 0 + 1 / 3) - math.log(1 / 2)) / 2  # logits[t] with tokens[t]: no shift
    assert abs(got - want) < 1e-6, f"sft_loss = {got:.6f}, want {want:.6f}" + \
        (" (looks like the logits/labels shift is missing)" if abs(got - unshifted) < 1e-6 else "")


def test_sft_loss_matches_naive_loop():
    logits, tokens, mask = example()
    want = naive_sft_loss(logits, tokens, mask)
    got = sft_loss(logits, tokens, mask).item()
    per_row = sum(naive_sft_loss(logits[b:b + 1], tokens[b:b + 1], mask[b:b + 1]) for b in range(2)) / 2
    assert abs(want - per_row) > 1e-3  # the example tells a mean of row means from the token mean
    assert abs(got - want) < 1e-9, f"sft_loss = {got:.6f}, want {want:.6f}" + \
        (" (averaging per row, then over rows? the mean is over all valid tokens)" if abs(got - per_row) < 1e-9 else "")


def test_sft_loss_ignores_prompt_and_padding():
    logits, tokens, mask = example()
    before = sft_loss(logits, tokens, mask)
    changed = logits.clone()
    changed[0, 0] += 5.0  # predicts token 1, a prompt token
    changed[1, 2:] -= 5.0  # predict tokens 3, 4: padding
    assert torch.allclose(sft_loss(changed, tokens, mask), before, atol=1e-12), "prompt or padding tokens are trained on"
    changed[0, 1, tokens[0, 2]] += 5.0  # predicts token 2, a response token
    assert not torch.allclose(sft_loss(changed, tokens, mask), before)


def test_sft_loss_stable_for_large_logits():
    logits, tokens, mask = example()
    got = sft_loss(logits.float() * 100, tokens, mask)
    assert torch.isfinite(got)
    assert abs(got.item() - naive_sft_loss(logits * 100, tokens, mask)) < 1e-3 * max(1.0, got.item())


def test_batch_indices_cover_each_epoch_and_are_reproducible():
    n, bs = 10, 3  # 3 batches per epoch, one example left out each epoch
    epoch0 = [i for it in range(3) for i in batch_indices(n, it, bs, seed=5)]
    assert len(set(epoch0)) == 9 and all(0 <= i < n for i in epoch0)
    assert batch_indices(n, 4, bs, 5) == batch_indices(n, 4, bs, 5)
    assert [batch_indices(n, it, bs, 5) for it in range(3)] != [batch_indices(n, it, bs, 5) for it in range(3, 6)]
