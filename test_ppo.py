"""The PPO loss, ppo.py's math: the clipped policy loss, the masked mean, the clipped value loss,
the entropy and their sum, each against hand-computed values. The advantages they take:
test_advantages.py; the rollout and the update's guards: test_rollout.py; the update against a
naive one: test_ppo_update.py."""
import math

import torch

import ppo
from checks import assert_close, call
from ppo import entropy, ppo_loss, ppo_policy_loss, value_loss
from test_advantages import MASK


# the four corners of the clip plus the inside: log ratio, advantage, clipped?  (eps = 0.2); and a ratio
# below eps, A < 0, where a clip to [eps, 1 + eps] or none below is not min instead of max (at 0.5 all three agree)
CASES = [(math.log(1.1), 1.0, False), (math.log(1.5), 2.0, True), (math.log(0.1), -1.0, True),
         (math.log(0.5), -1.0, True), (math.log(1.5), -1.0, False), (math.log(0.5), 3.0, False)]


def policy_terms(log_r, a, pick=max, eps=0.2):
    r = math.exp(log_r)
    return pick(-a * r, -a * min(max(r, 1 - eps), 1 + eps))


def test_ppo_policy_loss_matches_hand_computed_each_branch():
    old = -1.7  # not 0: exp(logprobs) alone must not pass for the ratio
    for log_r, a, clipped in CASES:
        lp, r = torch.tensor([[old + log_r]], dtype=torch.float64), math.exp(log_r)
        got = call("ppo_policy_loss", ppo_policy_loss, lp, torch.full((1, 1), old, dtype=torch.float64),
                   torch.tensor([[a]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), 0.2)
        mistakes = [("the clip's lower bound at eps, not 1 - eps: clip(rho, 1 - eps, 1 + eps)",
                     max(-a * r, -a * min(max(r, 0.2), 1.2))),
                    ("the clip on one side only: clip(rho, 1 - eps, 1 + eps)", max(-a * r, -a * min(r, 1.2))),
                    ("min instead of max (or the clipped term alone): the loss is the larger, pessimistic term",
                     policy_terms(log_r, a, min)),
                    ("ratio inverted: rho = exp(logprobs - old_logprobs)", policy_terms(-log_r, a)),
                    ("old_logprobs left out: rho = exp(logprobs - old_logprobs)", policy_terms(old + log_r, a)),
                    ("the log-ratio clipped to +-eps: it is rho that is clipped, to [1 - eps, 1 + eps]",
                     max(-a * r, -a * math.exp(min(max(log_r, -0.2), 0.2))))]
        assert_close(f"ppo_policy_loss at ratio {r:.2f}, advantage {a:+} ({'clipped' if clipped else 'unclipped'})",
                     got, torch.tensor(policy_terms(log_r, a), dtype=torch.float64), 1e-12, mistakes,
                     "the loss is max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)): the pessimistic one",
                     some_agree=True)  # inside the clip, the clip's mistakes give the right answer


def test_ppo_policy_loss_reads_clip_eps():
    """Ratio 1.25, A = +1: clipped at eps = 0.2, inside the clip at eps = 0.3."""
    one, old = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), -1.7, dtype=torch.float64)
    got = call("ppo_policy_loss", ppo_policy_loss, old + math.log(1.25), old, one, one, 0.3)
    assert_close("ppo_policy_loss at ratio 1.25, advantage +1, clip_eps 0.3 (inside the clip)", got,
                 torch.tensor(-1.25, dtype=torch.float64), 1e-12,
                 [("the clip fixed at [0.8, 1.2]: it is [1 - clip_eps, 1 + clip_eps]", -1.2)])


def test_ppo_policy_loss_masked_mean():
    logp = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4], [0.0, 0.1, -0.1, 0.05, 0.0]]) - 2.0
    adv = torch.tensor([[5.0, 1.0, -1.0, 2.0, 7.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    got = ppo_policy_loss(logp, torch.full_like(logp, -2.0), adv, MASK, 0.2)
    terms = torch.tensor([[policy_terms(l + 2.0, a) for l, a in zip(*row)] for row in zip(logp.tolist(), adv.tolist())])
    row_means = (terms * MASK).sum(1) / MASK.sum(1)
    assert_close("ppo_policy_loss over rows of 3 and 5 valid tokens", got, (terms * MASK).sum() / MASK.sum(), 1e-6,
                 [("a mean over padding too: masked_mean divides by sum(mask)", terms.mean()),
                  ("the mean of per-row means: one mean over all valid tokens", row_means.mean())])


def test_ppo_policy_loss_stable_for_very_negative_logprobs():
    lp = torch.tensor([[-200.0, -150.0, -120.0]])  # exp() of each underflows to 0 in float32
    d = torch.tensor([[0.1, -0.1, 0.05]])
    got = ppo_policy_loss(lp, lp - d, torch.tensor([[1.0, -1.0, 0.5]]), torch.ones(1, 3), 0.2)
    want = sum(policy_terms(x, a) for x, a in zip(d[0].tolist(), [1.0, -1.0, 0.5])) / 3
    assert_close("ppo_policy_loss at log-probs -200..-120 (float32)", got, torch.tensor(want), 1e-4,
                 hint="rho = exp(logprobs - old_logprobs) in one exp")
    lp, one = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True), torch.ones(1, 1, dtype=torch.float64)
    got = ppo_policy_loss(lp, lp.detach() - 25, -one, one, 0.2)  # a log-ratio of 25 on a valid token, A < 0
    got.backward()
    assert_close("ppo_policy_loss and its gradient at a log-ratio of 25, A = -1", torch.stack([got, lp.grad[0, 0]]),
                 torch.full((2,), math.exp(25), dtype=torch.float64), 1e-12 * math.exp(25),
                 hint="rho = exp(logprobs - old_logprobs), nothing clamped: the loss is -A * rho")


def test_masked_mean_drops_nonfinite_masked_entries():
    x = torch.tensor([[1.0, math.inf], [math.nan, 3.0]], requires_grad=True)
    got = ppo.masked_mean(x, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    got.backward()
    assert got.item() == 2.0, "inf * 0 = nan: a masked entry must be dropped, not multiplied by 0"
    assert x.grad.tolist() == [[0.5, 0.0], [0.0, 0.5]]


def test_ppo_policy_loss_finite_with_extreme_logprobs_where_masked():
    """Past a response's end the log-probs are whatever a forward gives: a -120 / -5 pair there is a
    log-ratio of +-115, exp(115) = inf; an advantage there may be nan. The loss and its gradient stay
    those of the valid entries."""
    mask, old = torch.tensor([[1.0, 1.0, 0.0]]), [-1.1, -1.9]
    want = (-1.0 * math.exp(0.1) + 0.5 * math.exp(-0.1)) / 2  # both ratios inside the clip
    want_grad = [-1.0 * math.exp(0.1) / 2, 0.5 * math.exp(-0.1) / 2, 0.0]
    for new_lp, old_lp, a in ((-5.0, -120.0, 0.0), (-120.0, -5.0, 0.0), (-math.inf, -math.inf, 0.0),
                              (math.nan, -5.0, 0.0), (-3.0, -3.0, math.nan), (-3.0, -3.0, math.inf)):
        logp, adv = torch.tensor([[-1.0, -2.0, new_lp]], requires_grad=True), torch.tensor([[1.0, -0.5, a]])
        loss = call("ppo_policy_loss", ppo_policy_loss, logp, torch.tensor([old + [old_lp]]), adv, mask, 0.2)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all(), \
            f"masked log-probs {new_lp} (new) and {old_lp} (old), advantage {a}, gave loss {loss.item()}, gradient " \
            f"{logp.grad.tolist()}: rho = exp(logprobs - old_logprobs) must be 1 where mask = 0 (torch.where before the " \
            f"exp); masking after it gives inf * 0 = nan, and a nan gradient even where the mean drops the entry"
        assert abs(loss.item() - want) < 1e-6 and torch.allclose(logp.grad, torch.tensor([want_grad]), atol=1e-6), \
            f"masked log-probs {new_lp}/{old_lp}: loss {loss.item()} (want {want}), gradient {logp.grad.tolist()} (want {want_grad})"


def test_ppo_policy_loss_gradient_flows_through_the_ratio():
    logp = torch.tensor([[0.05, -0.05]], requires_grad=True)
    loss = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), 0.2)
    assert loss.requires_grad, "ppo_policy_loss: the loss does not depend on logprobs in autograd's graph: is rho detached?"
    loss.backward()
    want = torch.tensor([[-1.0 * math.exp(0.05), 2.0 * math.exp(-0.05)]]) / 2
    assert_close("ppo_policy_loss: d/d logprobs", logp.grad, want, 1e-6,
                 [("a sum over tokens, not the mean: each token's term divided by the number of valid tokens", 2 * want),
                  ("d/d logprobs of -A * rho taken as -A: the derivative of rho = exp(logprobs - old) is rho",
                   torch.tensor([[-1.0, 2.0]]) / 2),
                  ("half the gradient inside the clip: the clipped term detached? There clip(rho) = rho, the two terms "
                   "tie, and torch.max gives each half: both must stay in the graph", want / 2)],
                 hint="d(-A * rho)/d logprobs = -A * rho / N on the unclipped tokens: rho must stay in the graph")


def naive_value_loss(v, old, ret, mask, eps, clip=lambda v, o, r, e: o + min(max(v - o, -e), e), pick=max, every=False):
    terms = [[pick((a - r) ** 2, (clip(a, o, r, eps) - r) ** 2) for a, o, r in zip(*row)]
             for row in zip(v.tolist(), old.tolist(), ret.tolist())]
    terms = torch.tensor(terms, dtype=v.dtype)
    return 0.5 * (terms.mean() if every else (terms * mask).sum() / mask.sum())


def test_value_loss_matches_hand_computed_around_old_values():
    """V_old other than 1 (and not constant), every regime, and padding: a clip around 1, 0 or R,
    or one relative to V_old, gives another value."""
    old = torch.tensor([[0.5, -1.2, 2.0, 3.1, 0.0], [1.4, 0.3, -0.6, 0.9, 2.2]], dtype=torch.float64)
    v = old + torch.tensor([[9.0, 0.1, 0.5, -0.5, 9.0], [0.5, -0.4, 0.05, 0.6, -0.7]], dtype=torch.float64)
    ret = old + torch.tensor([[0.0, -0.3, 1.0, 0.4, 0.0], [-0.5, 0.9, -0.2, -0.3, 1.5]], dtype=torch.float64)
    m, eps = MASK.double(), 0.2  # row 0: the 9.0 entries are padding
    args = (v, old, ret, m, eps)
    mistakes = [("V clipped to [1 - eps, 1 + eps]: the clip is around V_old, [V_old - eps, V_old + eps]",
                 naive_value_loss(*args, clip=lambda v, o, r, e: min(max(v, 1 - e), 1 + e))),
                ("V clipped to [-eps, eps]: the clip is around V_old",
                 naive_value_loss(*args, clip=lambda v, o, r, e: min(max(v, -e), e))),
                ("no clip, or V clipped around the returns (the same: max((V - R)^2, clip(V - R)^2) = (V - R)^2): the "
                 "clip is around V_old; or the max of the two masked means, here the unclipped one's: the max is per "
                 "entry, then one mean", naive_value_loss(*args, clip=lambda v, o, r, e: r + min(max(v - r, -e), e))),
                ("V clipped to V_old * [1 - eps, 1 + eps]: the value clip is additive, V_old +- eps",
                 naive_value_loss(*args, clip=lambda v, o, r, e: o * min(max(v / o, 1 - e), 1 + e) if o else 0.0)),
                ("min instead of max: the loss takes the larger (pessimistic) term", naive_value_loss(*args, pick=min)),
                ("the clipped term alone: max((V - R)^2, (V_clipped - R)^2)", naive_value_loss(*args, pick=lambda a, b: b)),
                ("the 0.5 forgotten", 2 * naive_value_loss(*args)),
                ("a mean over padding too: masked_mean divides by sum(mask)", naive_value_loss(*args, every=True))]
    assert_close("value_loss with V_old other than 1, rows of 3 and 5 valid tokens", call("value_loss", value_loss, *args),
                 naive_value_loss(*args), 1e-12, mistakes, "0.5 * masked mean of max((V - R)^2, (clip(V, V_old - eps, "
                 "V_old + eps) - R)^2)")


def test_value_loss_ignores_what_padding_holds():
    old, ret = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[2.0, 0.0, math.nan]])
    v = torch.tensor([[1.1, 1.5, math.inf]], requires_grad=True)
    got = value_loss(v, old, ret, torch.tensor([[1.0, 1.0, 0.0]]), 0.2)
    got.backward()
    assert_close("value_loss with inf and nan on padding", got, torch.tensor(0.5 * (0.81 + 2.25) / 2), 1e-6,
                 hint="a masked mean that drops the padding (masked_mean), not (loss * mask).sum(): nan * 0 = nan")
    assert torch.isfinite(v.grad).all(), f"value_loss: gradient {v.grad.tolist()} is not finite where mask = 0"


def test_value_loss_matches_hand_computed_both_regimes():
    old, ret = torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 1.5]])
    # each entry's max((V - R)^2, (clip(V, 0.8, 1.2) - R)^2): inside the clip, and clipped on either side
    for v, terms in (([1.1, 1.5, 3.0], [0.81, 2.25, 2.25]), ([0.0, -1.0, 2.0], [4.0, 1.0, 0.25]),
                     ([2.0, 2.0, 2.0], [0.64, 4.0, 0.25])):
        got = value_loss(torch.tensor([v]), old, ret, torch.ones(1, 3), 0.2)
        assert_close(f"value_loss at V = {v}, V_old = 1, R = {ret[0].tolist()}", got, torch.tensor(0.5 * sum(terms) / 3),
                     1e-6, hint="clip V around V_old, take the max")


def test_value_loss_max_per_entry_then_one_mean():
    """V = 1, V_old = 0, eps = 0.2 (clip(V) = 0.2), two batches of returns: in each, one entry's larger term is
    the unclipped one and the other's the clipped one; the larger mean is the clipped term's in the first and
    the unclipped term's in the second, so the max of the two means is neither no clip nor the clipped term alone."""
    v, old, m = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2)
    rets = torch.tensor([[[0.0, 2.0]], [[-1.0, 1.3]]], dtype=torch.float64)  # (2 batches, 1, 2)
    got = torch.stack([call("value_loss", value_loss, v, old, ret, m, 0.2) for ret in rets])
    mean = lambda x: 0.5 * x.mean((1, 2))  # (2,): 0.5 * the mean of each batch
    plain, clipped = (v - rets) ** 2, (0.2 - rets) ** 2  # (2, 1, 2)
    assert_close("value_loss at V = 1, V_old = 0, R = [0, 2], then R = [-1, 1.3]", got, mean(torch.max(plain, clipped)),
                 1e-12, [("the max of the two masked means: max((V - R)^2, (V_clipped - R)^2) per entry, then one mean",
                          torch.max(mean(plain), mean(clipped))), ("no clip: V clipped around V_old", mean(plain)),
                         ("the clipped term alone: max((V - R)^2, (V_clipped - R)^2)", mean(clipped))])


def test_value_loss_reads_clip_eps():
    """V = 1.25, V_old = 1, R = 2: inside the clip at eps = 0.3, clipped (to 1.2, the larger error) at 0.2."""
    one = torch.ones(1, 1, dtype=torch.float64)
    got = call("value_loss", value_loss, 1.25 * one, one, 2 * one, one, 0.3)
    assert_close("value_loss at V = 1.25, V_old = 1, R = 2, clip_eps 0.3", got, torch.tensor(0.5 * 0.75 ** 2, dtype=torch.float64),
                 1e-12, [("the clip fixed at V_old +- 0.2: it is V_old +- clip_eps", 0.5 * 0.8 ** 2)])


def test_entropy_is_one_mean_over_valid_tokens():
    """Each position its own entropy, rows of 3 and 5 valid tokens: the masked mean over all valid
    tokens, which a mean of per-row means or a mean over padding misses."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, dtype=torch.float64, generator=g) * torch.tensor([0.3, 1.0, 3.0, 0.5, 2.0], dtype=torch.float64)[:, None]
    h = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)  # (2, 5)
    per_token = [[-sum(p * math.log(p) for p in row) for row in pos.softmax(-1).tolist()] for pos in logits]
    assert_close("naive entropy", h, torch.tensor(per_token, dtype=torch.float64), 1e-12)
    m = MASK.double()
    assert_close("entropy over rows of 3 and 5 valid tokens", call("entropy", entropy, logits, m), (h * m).sum() / m.sum(), 1e-12,
                 [("the mean of per-row means: one mean over all valid tokens", ((h * m).sum(1) / m.sum(1)).mean()),
                  ("a mean over padding too: masked_mean divides by sum(mask)", h.mean()),
                  ("a sum over tokens divided by the batch size", (h * m).sum() / 2)], "masked_mean of H over valid tokens")


def test_entropy_matches_hand_computed():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    want = -(p * p.log()).sum()  # 1.0397
    logits = (torch.log(p) + 5.0).expand(2, 5, 3)  # logits, not log-probs: softmax(logits) = p
    assert_close("entropy of softmax(log p + 5)", call("entropy", entropy, logits, MASK.double()), want, 1e-12,
                 [("-sum p * logits: log p = logits - logsumexp(logits)", -(p * (p.log() + 5)).sum()),
                  ("sign flipped: H = -sum p log p >= 0", -want), ("a mean over the vocabulary: H sums over it", want / 3)])
    logits = torch.zeros(2, 5, 3)
    logits[0, 0] = torch.tensor([100.0, 0.0, 0.0])  # a padding position with zero entropy: excluded
    assert_close("entropy with a padding position of entropy 0", entropy(logits, MASK), torch.tensor(math.log(3)), 1e-6,
                 hint="a masked mean over valid tokens")
    logits[0, 0], logits[0, 4] = -math.inf, math.nan  # padding: whatever a forward left there
    logits.requires_grad_(True)
    got = entropy(logits, MASK)
    assert_close("entropy with -inf and nan logits at padding", got, torch.tensor(math.log(3)), 1e-6,
                 hint="a masked mean that drops padding (masked_mean), not (H * mask).sum(): nan * 0 = nan")
    got.backward()
    assert torch.isfinite(logits.grad).all(), "entropy: the gradient is nan at the padding's logits (it would reach the " \
        "model's weights): replace the logits there first (torch.where), as the log-softmax of a nan row has a nan gradient"


def test_entropy_stable_for_large_logits():
    logits = torch.tensor([[[1000.0, 0.0, -1000.0], [0.0, 0.0, 1000.0]]])  # nearly one-hot: p log p -> 0
    assert_close("entropy at logits +-1000", entropy(logits, torch.ones(1, 2)), torch.tensor(0.0), 1e-6,
                 hint="p log p with log p from log_softmax (softmax(...).log() gives 0 * -inf = nan)")
    logits.requires_grad_(True)
    entropy(logits, torch.ones(1, 2)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() < 1e-6, \
        f"entropy: d/d logits at logits +-1000 is {logits.grad.tolist()}, want 0: a probability that underflows to 0 " \
        f"gives p log p a nan gradient even where the value is patched (xlogy, special.entr, nan_to_num): take log p " \
        f"from log_softmax and p = exp(log p)"
    logits = torch.tensor([[[0.0, 0.0, -math.inf], [1.0, -math.inf, -math.inf]]], requires_grad=True)  # top-k cut
    got = entropy(logits, torch.ones(1, 2))
    assert_close("entropy with -inf logits (a padded head's columns, a top-k cut)", got, torch.tensor(math.log(2) / 2), 1e-6,
                 hint="p log p where p = 0 is 0, not 0 * -inf = nan: torch.where(p > 0, log p, 0)")
    got.backward()
    assert torch.isfinite(logits.grad).all(), f"entropy: d/d logits with -inf logits is {logits.grad.tolist()}: " \
        "keep the -inf entries out of the product p * log p (torch.where on log p), or its gradient is nan"


def test_ppo_loss_combines_its_terms():
    torch.manual_seed(0)
    old = torch.randn(2, 5) * 0.1  # valid ratios 1.25 (A > 0) and 0.75 (A < 0): clipped at 0.2, not at 0.3
    logp = old + torch.tensor([[0.0, math.log(1.25), -0.05, math.log(0.75), 0.3], [0.1, -0.1, 0.02, math.log(1.28), -0.2]])
    adv = torch.tensor([[0.3, 1.5, -0.4, -2.0, 0.8], [-0.6, 1.1, 0.9, 0.7, -1.3]])
    v, old_v, ret, logits = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5, 4)
    pg = ppo_policy_loss(logp, old, adv, MASK, 0.2)
    vf = value_loss(v, old_v, ret, MASK, 0.3)
    h = entropy(logits, MASK)
    got = call("ppo_loss", ppo_loss, logp, old, adv, v, old_v, ret, logits, MASK, 0.2, 0.3, 0.5, 0.01)
    assert_close("ppo_loss", got, pg + 0.5 * vf - 0.01 * h, 1e-6,
                 [("the entropy bonus added: the loss subtracts ent_coef * entropy", pg + 0.5 * vf + 0.01 * h),
                  ("vf_coef not applied", pg + vf - 0.01 * h), ("the value loss subtracted", pg - 0.5 * vf - 0.01 * h),
                  ("the value clip from clip_eps: value_loss takes vf_clip",
                   pg + 0.5 * value_loss(v, old_v, ret, MASK, 0.2) - 0.01 * h),
                  ("the ratio clip from vf_clip: ppo_policy_loss takes clip_eps",
                   ppo_policy_loss(logp, old, adv, MASK, 0.3) + 0.5 * vf - 0.01 * h)],
                 "policy + vf_coef * value - ent_coef * entropy")
    got = ppo_loss(logp, old, adv, v, old_v, ret, logits, MASK, 0.2, 0.3, 0.7, 0.01)
    assert_close("ppo_loss with vf_coef 0.7", got, pg + 0.7 * vf - 0.01 * h, 1e-6,
                 [("the value loss weighed by 0.5 whatever vf_coef (value_loss has its own 0.5)", pg + 0.5 * vf - 0.01 * h)],
                 "policy + vf_coef * value - ent_coef * entropy")
    got = ppo_loss(logp, old, adv, v, old_v, ret, logits, MASK, 0.2, 0.3, 0.5, 0.01, None, 0.25)
    assert_close("ppo_loss with ptx_coef 0.25 and ptx_loss None", got, pg + 0.5 * vf - 0.01 * h, 1e-6,
                 hint="no PPO-ptx term when ptx_loss is None, whatever ptx_coef")
    got = ppo_loss(logp, old, adv, v, old_v, ret, logits, MASK, 0.2, 0.3, 0.5, 0.01, torch.tensor(2.0), 0.25)
    assert_close("ppo_loss with PPO-ptx", got, pg + 0.5 * vf - 0.01 * h + 0.5, 1e-6,
                 [("ptx_coef not applied", pg + 0.5 * vf - 0.01 * h + 2.0)], "PPO-ptx adds ptx_coef * ptx_loss")
