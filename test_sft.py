"""sft.py: the response-only loss against hand-computed values, and the resumable data order."""
import contextlib
import math
from types import SimpleNamespace

import torch

import data
import sft
from checks import assert_close, call
from data import batch_indices, eval_indices
from gpt import GPT, GPTConfig
from sft import Config, sft_loss, step_indices
from util import autocast


def naive_sft_loss(logits, tokens, loss_mask):
    """Python loops and math.log: -log p(token t | logits at t-1) averaged over masked t >= 1."""
    total, n = 0.0, 0
    for b in range(tokens.size(0)):
        for t in range(1, tokens.size(1)):
            if loss_mask[b, t]:
                row = logits[b, t - 1].tolist()
                top = max(row)  # exp of logits x 100 would overflow
                total += -(row[tokens[b, t]] - top - math.log(sum(math.exp(v - top) for v in row)))
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
    shift = "position t-1 predicts token t, weighted by loss_mask[:, t]"
    mistakes = [(f"the logits/labels shift is missing: {shift}", (-math.log(1 / 3) - math.log(1 / 2)) / 2),
                (f"the labels are not shifted (the mask is): {shift}", (-math.log(1 / 4) - math.log(1 / 3)) / 2),
                (f"the mask is not shifted with the labels, or after torch.roll the wrapped column was zeroed at 0, not "
                 f"at the end (m[:, -1] = 0; m[:, 0] weighs token 1): {shift}", -math.log(2 / 3)),
                ("a mean over every position: the last one predicts nothing",
                 (-math.log(3 / 4) - math.log(2 / 3) - math.log(1 / 2)) / 3)]
    assert_close("sft_loss", sft_loss(logits, tokens, mask), torch.tensor(want), 1e-6, mistakes,
                 "the mean of -log softmax(logits[:, t-1])[tokens[:, t]] over t with loss_mask[:, t] = 1")


def test_sft_loss_matches_naive_loop():
    """Columns 7 and 8 at -inf, no token's: the logits sft.py trains on, model(x, padded=True) (gpt.GPT.head)."""
    logits, tokens, mask = example()
    logits = torch.cat([logits, torch.full((2, 5, 2), -math.inf, dtype=torch.float64)], -1)  # (2, 5, 9)
    want = naive_sft_loss(logits, tokens, mask)
    per_row = sum(naive_sft_loss(logits[b:b + 1], tokens[b:b + 1], mask[b:b + 1]) for b in range(2)) / 2
    assert abs(want - per_row) > 1e-3  # the example tells a mean of row means from the token mean
    unshifted_mask = torch.cat([mask[:, 1:], mask[:, :1] * 0], 1)  # loss_mask[:, t-1] weighing token t
    no_token_1 = mask.clone()
    no_token_1[:, 1] = 0  # row 1's token 1 is a response token
    mistakes = [("averaged per row, then over rows: the mean is over all valid tokens", per_row),
                ("the mask is not shifted with the labels: token t counts where loss_mask[:, t] = 1",
                 naive_sft_loss(logits, tokens, unshifted_mask)),
                ("averaged over prompt and padding tokens too", naive_sft_loss(logits, tokens, torch.ones_like(mask))),
                ("token 1 dropped: after torch.roll the wrapped column is the last (m[:, -1] = 0), m[:, 0] weighs token 1",
                 naive_sft_loss(logits, tokens, no_token_1))]
    got = call("sft_loss", sft_loss, logits, tokens, mask)
    assert torch.isfinite(got), f"sft_loss with logits -inf at columns 7, 8 (model(x, padded=True)'s, no token's): {got}: " \
        "a one-hot times the log-probs reads 0 * -inf = nan there: F.cross_entropy, or gather each target's entry"
    assert_close("sft_loss on float64 logits, -inf at columns 7, 8", got, torch.tensor(want, dtype=torch.float64),
                 1e-12, mistakes, "the mean over t >= 1 with loss_mask[:, t] = 1 of "
                 "-log softmax(logits[:, t-1])[tokens[:, t]]")


def test_sft_loss_first_token_is_never_a_target():
    """loss_mask[:, 0] = 1 (no prompt): token 0 has no position before it, so it counts for nothing; a
    torch.roll of the labels wraps it onto the last position, which must predict nothing."""
    logits, tokens, _ = example()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    want = naive_sft_loss(logits, tokens, mask)
    logp_last = torch.log_softmax(logits[:, -1], -1).gather(1, tokens[:, :1]).squeeze(1)  # (B,): predicts token 0
    wrapped = (want * 6 - logp_last.sum().item()) / 8  # 6 targets, and the 2 wrapped ones
    assert_close("sft_loss with loss_mask[:, 0] = 1", call("sft_loss", sft_loss, logits, tokens, mask),
                 torch.tensor(want, dtype=torch.float64), 1e-12, [("the last position predicts token 0 (torch.roll wraps around): zero its weight", wrapped)])


def test_sft_loss_ignores_prompt_and_padding():
    logits, tokens, mask = example()
    before = call("sft_loss", sft_loss, logits, tokens, mask)
    changed = logits.clone()
    changed[0, 0] += 5.0  # predicts token 1, a prompt token
    changed[1, 2:] -= 5.0  # predict tokens 3, 4: padding
    assert_close("sft_loss after changing the logits of prompt and padding tokens", sft_loss(changed, tokens, mask),
                 before, 1e-12, hint="prompt or padding tokens are trained on")
    changed[0, 1, tokens[0, 2]] += 5.0  # predicts token 2, a response token
    assert not torch.allclose(sft_loss(changed, tokens, mask), before), "a response token does not count"
    changed = logits.clone()
    changed[0, 0], changed[1, 3] = math.nan, -math.inf  # predict a prompt token and padding
    assert_close("sft_loss with nan and -inf logits predicting prompt and padding tokens", sft_loss(changed, tokens, mask),
                 before, 1e-12, hint="the mean drops prompt and padding positions (torch.where), it does not multiply "
                                     "them by 0: nan * 0 = nan")


def test_sft_loss_stable_for_large_logits():
    logits, tokens, mask = example()
    want = naive_sft_loss(logits * 100, tokens, mask)
    assert_close("sft_loss at logits x 100 (float32)", sft_loss(logits.float() * 100, tokens, mask),
                 torch.tensor(want, dtype=torch.float32), 1e-3 * want)


def test_batch_indices_cover_each_epoch_and_are_reproducible():
    n, bs = 10, 3  # 3 batches per epoch, one example left out each epoch
    epoch0 = [i for it in range(3) for i in batch_indices(n, it, bs, seed=5)]
    assert len(set(epoch0)) == 9 and all(0 <= i < n for i in epoch0)
    first = batch_indices(n, 4, bs, 5)
    torch.manual_seed(123)  # a resumed run's global generator is elsewhere: the batch must not follow it
    assert batch_indices(n, 4, bs, 5) == first, "batch_indices depends on torch's global generator, not on (n, it, seed) alone"
    assert [batch_indices(n, it, bs, 5) for it in range(3)] != [batch_indices(n, it, bs, 5) for it in range(3, 6)]


def test_batch_indices_cover_every_epoch_not_only_the_first():
    """Each epoch walks its own permutation through to the end: 10 examples in batches of 3 are 3 batches an epoch,
    9 distinct examples in every epoch (epochs 1 and 4 here), not its first batch repeated (the batch's position
    in its epoch is it % batches per epoch, in every epoch)."""
    n, bs = 10, 3
    for epoch in (1, 4):
        seen = [batch_indices(n, it, bs, 5) for it in range(3 * epoch, 3 * epoch + 3)]
        assert len({i for b in seen for i in b}) == 9, \
            f"epoch {epoch}: batches {seen}: each batch must come from its place it % (n // batch_size) in the epoch"


def test_eval_indices_see_each_example_once():
    """Validation batches: batch_indices' first epoch where the set is large enough; a set smaller than
    the batches asked for is seen once (batch_indices would wrap into a second epoch and count some twice)."""
    assert eval_indices(100, 8, 3, 5) == [batch_indices(100, it, 8, 5) for it in range(3)]
    small = eval_indices(20, 8, 16, 5)
    assert [len(b) for b in small] == [8, 8, 4] and sorted(i for b in small for i in b) == list(range(20))


def test_step_indices_cut_the_steps_batch_into_micro_batches():
    """--batch_size=8 --grad_accum=2 trains on the data of --batch_size=16 at every step, across epoch ends:
    40 examples are 5 batches of 8 an epoch, 2 of 16; micro-batches drawn as batches it * 2 + micro of 8
    part ways with them at step 2."""
    small, big = Config(batch_size=8, grad_accum=2), Config(batch_size=16, grad_accum=1)
    for it in range(12):
        micros, (whole,) = step_indices(40, it, small), step_indices(40, it, big)
        assert [len(m) for m in micros] == [8, 8] and len(set(whole)) == 16, (micros, whole)
        assert micros[0] + micros[1] == whole, f"step {it}: the micro-batches {micros} are not the step's batch {whole}"


def test_evaluate_takes_the_loss_in_float32_under_bf16_autocast():
    """sft.evaluate under bf16 autocast gives the fp32 evaluation's loss to ~1e-3 (the trunk in bf16),
    not a bf16-rounded one: the cross entropy of bf16 logits outside autocast is in bf16, spaced 1/32
    near 4 (a random model's loss), 1/128 near 1 (a trained one's), and picks the best checkpoint."""
    torch.manual_seed(0)
    tok = data.task_tokenizer()
    recs = data.load_records("builtin", "sft")[1][:64]
    val = data.encode_examples(tok, [r["prompt"] for r in recs], [r["response"] for r in recs], 24, 12, "val")
    model = GPT(GPTConfig(block_size=24, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64))
    cfg = Config(batch_size=64, eval_batches=1, seed=0)
    fp32, bf16 = (sft.evaluate(model, val, cfg, tok, autocast("cpu", d), "cpu") for d in ("float32", "bfloat16"))
    assert abs(bf16 - fp32) < 2e-3, f"sft.evaluate: {bf16} under bf16 autocast, {fp32} in fp32: is the loss taken " \
                                    f"outside autocast, on bf16 logits?"


def test_step_indices_at_batch_size_1_keeps_every_micro_batch():
    """--batch_size=1 --grad_accum=3: three micro-batches of one example each, the step's 3 (the last one too)."""
    micros = step_indices(10, 0, Config(batch_size=1, grad_accum=3))
    assert [len(m) for m in micros] == [1, 1, 1] and sum(micros, []) == batch_indices(10, 0, 3, 0), \
        f"step_indices at batch_size 1, grad_accum 3: {micros}, want the step's batch {batch_indices(10, 0, 3, 0)} cut in 3"


def test_evaluate_is_one_mean_over_every_token_of_the_batches_it_sees():
    """sft.evaluate over 7 validation examples of different response lengths, 3 at a time, --eval_batches=10 (more
    than there are): every example once, the loss one mean over all their response tokens (a short last batch weighs
    by its tokens, not as much as a full one, nor by its examples): sft_loss on the 7 in one batch, by hand."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(3)
    val = [(torch.randint(10, (p,), generator=g).tolist(), torch.randint(10, (r,), generator=g).tolist() + [10])
           for p, r in [(2, 1), (1, 6), (3, 2), (2, 8), (1, 1), (4, 3), (2, 0)]]
    got = sft.evaluate(model, val, Config(batch_size=3, eval_batches=10, seed=0), SimpleNamespace(eot=10),
                       contextlib.nullcontext(), "cpu")
    b = data.pad_right(val, 10)
    with torch.no_grad():
        want = sft_loss(model(b["tokens"]), b["tokens"], b["loss_mask"]).item()
    assert abs(got - want) < 1e-5, f"sft.evaluate {got}, want {want}: every example once (all --eval_batches), each " \
                                   "batch's mean weighed by its response tokens"
