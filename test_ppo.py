"""ppo.py's math: each function of the PPO objective (and RLOO's and GRPO's advantages) against
hand-computed values or a naive loop. The rollout and the update: test_rollout.py."""
import math

import torch

import ppo
from checks import assert_close, call
from ppo import (entropy, gae, kl_penalized_rewards, ppo_loss, ppo_policy_loss, token_logprobs,
                 value_loss, whiten)

# two rows of different lengths: row 0 is left-padded and ends early, row 1 runs to the end
MASK = torch.tensor([[0., 1., 1., 1., 0.], [1., 1., 1., 1., 1.]])


def test_token_logprobs_matches_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])  # (1, 2, 2)
    got = call("token_logprobs", token_logprobs, logits, torch.tensor([[1, 1]]))
    assert got.shape == (1, 2), f"token_logprobs: shape {tuple(got.shape)}, want (1, 2): squeeze(-1) only the " \
                                f"gathered dimension (squeeze() drops every dimension of size 1)"
    over_positions = torch.tensor([[math.log(3 / 4), math.log(1 / 4)]])
    assert_close("token_logprobs", got, torch.tensor([[math.log(3 / 4), math.log(1 / 5)]]), 1e-6,
                 [("log-softmax over positions (dim 1), not the vocabulary", over_positions)],
                 "log softmax over the vocabulary (the last dimension), then each token's entry")


def test_token_logprobs_matches_naive_loop_float64():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 4, 6, dtype=torch.float64, generator=g)
    tokens = torch.randint(0, 6, (3, 4), generator=g)
    lse = [[math.log(sum(math.exp(z) for z in logits[b, t].tolist())) for t in range(4)] for b in range(3)]
    want = logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.tensor(lse, dtype=torch.float64)
    assert_close("token_logprobs on float64 logits", token_logprobs(logits, tokens), want, 1e-12,
                 hint="log p(token) = logit of the token - log sum exp(logits), over the vocabulary")


def test_token_logprobs_stable_for_large_logits():
    logits = torch.tensor([[[1000.0, 0.0, -1000.0]], [[-1000.0, 1000.0, 0.0]]])  # (2, 1, 3)
    got = token_logprobs(logits, torch.tensor([[1], [1]]))
    assert_close("token_logprobs at logits +-1000", got, torch.tensor([[-1000.0], [0.0]]), 1e-3)


def naive_kl_rewards(scores, logprobs, ref, mask, coef, last=lambda valid: valid[-1], add=True, everywhere=False):
    out = torch.zeros_like(logprobs)
    for b in range(mask.size(0)):
        valid = [t for t in range(mask.size(1)) if mask[b, t]]
        for t in range(mask.size(1)) if everywhere else valid:
            out[b, t] = -coef * (logprobs[b, t] - ref[b, t])
        out[b, last(valid)] = out[b, last(valid)] * add + scores[b]
    return out


def check_kl_rewards(what, scores, logprobs, ref, mask, coef, tol):
    args = (scores, logprobs, ref, mask, coef)
    mistakes = [("KL sign flipped: r_t = -kl_coef * (logprobs - ref_logprobs)",
                 naive_kl_rewards(scores, logprobs, ref, mask, -coef)),
                ("score at sum(mask) - 1: under left padding the last token is elsewhere (data.last_index)",
                 naive_kl_rewards(*args, last=lambda valid: len(valid) - 1)),
                ("score at the last column, not at each row's last valid token",
                 naive_kl_rewards(*args, last=lambda v: mask.size(1) - 1)),
                ("score written over the last token's KL penalty: it is added to it", naive_kl_rewards(*args, add=False)),
                ("KL penalty on padding too", naive_kl_rewards(*args, everywhere=True)),
                ("kl_coef not applied", naive_kl_rewards(scores, logprobs, ref, mask, 1.0))]
    assert_close(what, call("kl_penalized_rewards", kl_penalized_rewards, *args), naive_kl_rewards(*args), tol, mistakes,
                 "0 on padding, -kl_coef * (logprobs - ref) on valid tokens, + the score at each row's last valid token")


def kl_example():
    """Scores, log-probs and reference log-probs on MASK, and the rewards at kl_coef 0.5, by hand."""
    logprobs = torch.tensor([[0.0, -1.0, -2.0, -1.0, 0.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[1.0, -2.0, -1.0, -1.5, -2.0], [-1.0, -0.5, -1.0, -1.0, -3.0]])  # padding differs too
    want = torch.tensor([[0.0, -0.5, 0.5, -0.25 + 10.0, 0.0], [0.0, 0.25, 0.0, 0.0, -1.0 + 20.0]])
    return torch.tensor([10.0, 20.0]), logprobs, ref, want


def test_kl_penalized_rewards_matches_hand_computed():
    scores, logprobs, ref, want = kl_example()
    assert torch.equal(naive_kl_rewards(scores, logprobs, ref, MASK, 0.5), want)
    check_kl_rewards("kl_penalized_rewards", scores, logprobs, ref, MASK, 0.5, 1e-6)
    assert_close("kl_penalized_rewards with float64 scores, float32 log-probs", kl_penalized_rewards(
        scores.double(), logprobs, ref, MASK, 0.5), want, 1e-6, hint="the result has logprobs' dtype: scores.to(it)")


def test_kl_penalized_rewards_zero_where_masked_whatever_the_logprobs_hold():
    """Past a response's end the log-probs are whatever a forward gave: inf or nan there must give a
    reward of 0, not nan (inf * 0 = nan), and leave the valid tokens' rewards alone."""
    scores, logprobs, ref, want = kl_example()
    logprobs[0, 0], logprobs[0, 4], ref[0, 4] = math.nan, -math.inf, math.inf  # row 0's padding
    assert_close("kl_penalized_rewards with inf and nan log-probs on padding",
                 kl_penalized_rewards(scores, logprobs, ref, MASK, 0.5), want, 1e-6,
                 hint="0 where mask = 0 whatever the log-probs hold there: torch.where(mask, penalty, 0), not penalty * mask")


def test_kl_penalized_rewards_padded_row_in_the_middle_float64():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float64)  # rows: 5, 2, 3
    lp, ref = -3 * torch.rand(2, 3, 5, dtype=torch.float64, generator=g)
    check_kl_rewards("kl_penalized_rewards, float64, middle row padded on both sides",
                     torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64), lp, ref, mask, 0.3, 1e-12)


def naive_gae(rewards, values, mask, gamma, lam, bootstrap_past_end=False, gamma_in_delta=True):
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        for t in valid:
            total = 0.0
            for l, u in enumerate(x for x in valid if x >= t):
                past_end = u + 1 < T and bootstrap_past_end
                v_next = values[b, u + 1].item() if u + 1 in valid or past_end else 0.0  # V = 0 after the end
                delta = rewards[b, u].item() + (gamma if gamma_in_delta else 1) * v_next - values[b, u].item()
                total += (gamma * lam) ** l * delta
            adv[b][t] = total
    adv = torch.tensor(adv, dtype=rewards.dtype)
    return adv, (adv + values) * mask


def test_gae_matches_naive_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5) * 3  # values on padding must not leak in
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (1.0, 1.0)):
        adv, ret = call("gae", gae, rewards, values, MASK, gamma, lam)
        want_adv, want_ret = naive_gae(rewards, values, MASK, gamma, lam)
        assert_close(f"gae advantages (gamma={gamma}, lam={lam})", adv, want_adv, 1e-5,
                     [("bootstrapped past a row's end: V = 0 after its last valid token",
                       naive_gae(rewards, values, MASK, gamma, lam, True)[0] * MASK),
                      ("lambda missing: A_t = delta_t + gamma * lam * A_{t+1}",
                       naive_gae(rewards, values, MASK, gamma, 1.0)[0]),
                      ("gamma missing from delta_t = r_t + gamma * V_{t+1} - V_t",
                       naive_gae(rewards, values, MASK, gamma, lam, gamma_in_delta=False)[0])],
                     "a backward recursion over each row's valid tokens, 0 on padding")
        assert_close(f"gae returns (gamma={gamma}, lam={lam})", ret, want_ret, 1e-5,
                     hint="returns = advantages + values on valid tokens, 0 elsewhere")


def test_gae_padded_row_in_the_middle_float64():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(2, 3, 6, dtype=torch.float64, generator=g) * torch.tensor([1.0, 3.0])[:, None, None]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    want_adv, want_ret = naive_gae(rewards, values, mask, 0.9, 0.8)
    assert_close("gae advantages, float64, middle row padded on both sides", adv, want_adv, 1e-12,
                 [("bootstrapped past a row's end: V = 0 after its last valid token",
                   naive_gae(rewards, values, mask, 0.9, 0.8, True)[0] * mask)], "0 on padding, before and after a row")
    assert_close("gae returns, float64, middle row padded on both sides", ret, want_ret, 1e-12)
    adv, _ = gae(rewards, values.float(), mask, 0.9, 0.8)
    assert_close("gae advantages of float64 rewards, float32 values", adv, want_adv, 1e-5, hint="of rewards' dtype")


def test_gae_does_not_bootstrap_past_the_end():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 100.0]])  # position 3 is padding: its value must not count
    adv, ret = gae(rewards, values, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert_close("gae advantages", adv, torch.tensor([[0.5, 0.5, 0.5, 0.0]]), 1e-6,
                 [("bootstrapped past the end: V = 0 after a row's last valid token",
                   torch.tensor([[100.5, 100.5, 100.5, 0]]))])
    assert_close("gae returns", ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 1e-6)


def test_gae_ignores_what_padding_holds():
    """Rewards and values count as 0 where mask = 0, even inf or nan there: a nan value past the end
    times a 0 mask is nan, and the backward recursion would carry it to every earlier token."""
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(2, 2, 5, dtype=torch.float64, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.float64)
    dirty_r, dirty_v = rewards.clone(), values.clone()
    dirty_r[0, 0], dirty_v[0, 4], dirty_v[1, 3], dirty_r[1, 4] = math.inf, math.nan, -math.inf, math.nan
    for got, want, what in zip(gae(dirty_r, dirty_v, mask, 0.9, 0.8), gae(rewards * mask, values * mask, mask, 0.9, 0.8),
                               ("advantages", "returns")):
        assert_close(f"gae {what} with inf and nan on padding", got, want, 1e-12,
                     hint="rewards and values are 0 where mask = 0: torch.where(mask, x, 0), not x * mask (nan * 0 = nan)")


def test_whiten_matches_hand_computed():
    x = torch.tensor([[99.0, 1.0, 2.0, 3.0, -50.0], [4.0, 5.0, 6.0, 7.0, 8.0]])
    valid = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8])  # padding (99, -50) excluded
    mean, var = valid.mean(), valid.var(unbiased=False)
    want = (x - mean) / torch.sqrt(var + 1e-8) * MASK
    assert_close("whiten", call("whiten", whiten, x, MASK), want, 1e-6,
                 [("statistics include padding: mean and var over valid entries only", (x - x.mean()) / x.std() * MASK),
                  ("statistics include padding", (x - x.mean()) / x.std(unbiased=False) * MASK),
                  ("unbiased variance (n - 1): var = masked_mean((x - mean)^2)", (x - mean) / valid.std() * MASK),
                  ("padding not zeroed", (x - mean) / torch.sqrt(var + 1e-8))],
                 "(x - mean) / sqrt(var + 1e-8) with mean and var over valid entries, 0 on padding")
    assert_close("whiten(shift_mean=False)", whiten(x, MASK, shift_mean=False),
                 ((x - mean) / torch.sqrt(var + 1e-8) + mean) * MASK, 1e-6, hint="the mean is added back after scaling")


def test_whiten_ignores_what_padding_holds():
    x = torch.tensor([[math.inf, 1.0, 2.0, 3.0, math.nan], [4.0, 5.0, 6.0, 7.0, 8.0]])
    clean = torch.where(MASK.bool(), x, 0.0)
    for shift in (True, False):
        assert_close(f"whiten(shift_mean={shift}) with inf and nan on padding", whiten(x, MASK, shift), whiten(clean, MASK, shift),
                     1e-6, hint="statistics over valid entries only, and 0 where mask = 0: torch.where(mask, out, 0), "
                                "not out * mask (inf * 0 = nan)")


def test_whiten_near_constant_and_constant_inputs_float64():
    m = MASK.double()
    x = 3.0 + 1e-5 * torch.tensor([[9.0, 1.0, -2.0, 0.5, 7.0], [2.0, -1.0, 0.0, 1.5, -3.0]], dtype=torch.float64)
    mean, var = x[m.bool()].mean(), x[m.bool()].var(unbiased=False)  # var ~ 2e-10, below the 1e-8
    want = (x - mean) / torch.sqrt(var + 1e-8) * m
    assert_close("whiten of a near-constant x (var 2e-10)", whiten(x, m), want, 1e-9,
                 [("divided by std + 1e-8: it is sqrt(var + 1e-8), which differs when var is near 0",
                   (x - mean) / (var.sqrt() + 1e-8) * m)], "in x's dtype: float32 keeps only 7 digits of x = 3.00001")
    const = torch.full((2, 5), 4.0, dtype=torch.float64)
    assert_close("whiten of a constant x", whiten(const, m), torch.zeros_like(const), 1e-12,
                 hint="var = 0: the 1e-8 inside the sqrt keeps (x - mean) / sqrt(var + 1e-8) at 0")


# the four corners of the clip plus the inside: log ratio, advantage, clipped?  (eps = 0.2)
CASES = [(math.log(1.1), 1.0, False), (math.log(1.5), 2.0, True), (math.log(0.5), -1.0, True),
         (math.log(1.5), -1.0, False), (math.log(0.5), 3.0, False)]


def policy_terms(log_r, a, pick=max, eps=0.2):
    r = math.exp(log_r)
    return pick(-a * r, -a * min(max(r, 1 - eps), 1 + eps))


def test_ppo_policy_loss_matches_hand_computed_each_branch():
    old = -1.7  # not 0: exp(logprobs) alone must not pass for the ratio
    for log_r, a, clipped in CASES:
        lp, r = torch.tensor([[old + log_r]], dtype=torch.float64), math.exp(log_r)
        got = call("ppo_policy_loss", ppo_policy_loss, lp, torch.full((1, 1), old, dtype=torch.float64),
                   torch.tensor([[a]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), 0.2)
        mistakes = [("min instead of max (or the clipped term alone): the loss is the larger, pessimistic term",
                     policy_terms(log_r, a, min)),
                    ("ratio inverted: rho = exp(logprobs - old_logprobs)", policy_terms(-log_r, a)),
                    ("old_logprobs left out: rho = exp(logprobs - old_logprobs)", policy_terms(old + log_r, a)),
                    ("the clip on one side only: clip(rho, 1 - eps, 1 + eps)", max(-a * r, -a * min(r, 1.2))),
                    ("the log-ratio clipped to +-eps: it is rho that is clipped, to [1 - eps, 1 + eps]",
                     max(-a * r, -a * math.exp(min(max(log_r, -0.2), 0.2))))]
        assert_close(f"ppo_policy_loss at ratio {r:.2f}, advantage {a:+} ({'clipped' if clipped else 'unclipped'})",
                     got, torch.tensor(policy_terms(log_r, a), dtype=torch.float64), 1e-12, mistakes,
                     "the loss is max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)): the pessimistic one")


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
    log-ratio of +-115, exp(115) = inf. The loss and its gradient stay those of the valid entries."""
    mask, adv, old = torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, -0.5, 0.0]]), [-1.1, -1.9]
    want = (-1.0 * math.exp(0.1) + 0.5 * math.exp(-0.1)) / 2  # both ratios inside the clip
    want_grad = [-1.0 * math.exp(0.1) / 2, 0.5 * math.exp(-0.1) / 2, 0.0]
    for new_lp, old_lp in ((-5.0, -120.0), (-120.0, -5.0), (-math.inf, -math.inf), (math.nan, -5.0)):
        logp = torch.tensor([[-1.0, -2.0, new_lp]], requires_grad=True)
        loss = ppo_policy_loss(logp, torch.tensor([old + [old_lp]]), adv, mask, 0.2)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all(), \
            f"masked log-probs {new_lp} (new) and {old_lp} (old) gave loss {loss.item()}, gradient {logp.grad.tolist()}: " \
            f"rho = exp(logprobs - old_logprobs) must be 1 where mask = 0 (torch.where before the exp); masking after it " \
            f"gives inf * 0 = nan, and a nan gradient even where the mean drops the entry"
        assert abs(loss.item() - want) < 1e-6 and torch.allclose(logp.grad, torch.tensor([want_grad]), atol=1e-6), \
            f"masked log-probs {new_lp}/{old_lp}: loss {loss.item()} (want {want}), gradient {logp.grad.tolist()} (want {want_grad})"


def test_ppo_policy_loss_gradient_flows_through_the_ratio():
    logp = torch.tensor([[0.05, -0.05]], requires_grad=True)
    loss = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), 0.2)
    assert loss.requires_grad, "ppo_policy_loss: the loss does not depend on logprobs in autograd's graph: is rho detached?"
    loss.backward()
    want = torch.tensor([[-1.0 * math.exp(0.05), 2.0 * math.exp(-0.05)]]) / 2
    assert_close("ppo_policy_loss: d/d logprobs", logp.grad, want, 1e-6,
                 hint="d(-A * rho)/d logprobs = -A * rho: rho must stay in the graph")


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
                ("V clipped around the returns: the clip is around V_old",
                 naive_value_loss(*args, clip=lambda v, o, r, e: r + min(max(v - r, -e), e))),
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
    assert_close("entropy with -inf and nan logits at padding", entropy(logits, MASK), torch.tensor(math.log(3)), 1e-6,
                 hint="a masked mean that drops padding (masked_mean), not (H * mask).sum(): nan * 0 = nan")


def test_entropy_stable_for_large_logits():
    logits = torch.tensor([[[1000.0, 0.0, -1000.0], [0.0, 0.0, 1000.0]]])  # nearly one-hot: p log p -> 0
    assert_close("entropy at logits +-1000", entropy(logits, torch.ones(1, 2)), torch.tensor(0.0), 1e-6,
                 hint="p log p with log p from log_softmax (softmax(...).log() gives 0 * -inf = nan)")


def test_ppo_loss_combines_its_terms():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(2, 5) * 0.1, torch.randn(2, 5) * 0.1, torch.randn(2, 5)
    v, old_v, ret, logits = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5, 4)
    pg = ppo_policy_loss(logp, old, adv, MASK, 0.2)
    vf = value_loss(v, old_v, ret, MASK, 0.3)
    h = entropy(logits, MASK)
    got = call("ppo_loss", ppo_loss, logp, old, adv, v, old_v, ret, logits, MASK, 0.2, 0.3, 0.5, 0.01)
    assert_close("ppo_loss", got, pg + 0.5 * vf - 0.01 * h, 1e-6,
                 [("the entropy bonus added: the loss subtracts ent_coef * entropy", pg + 0.5 * vf + 0.01 * h),
                  ("vf_coef not applied", pg + vf - 0.01 * h), ("the value loss subtracted", pg - 0.5 * vf - 0.01 * h),
                  ("the value clip from clip_eps: value_loss takes vf_clip",
                   pg + 0.5 * value_loss(v, old_v, ret, MASK, 0.2) - 0.01 * h)],
                 "policy + vf_coef * value - ent_coef * entropy")
    got = ppo_loss(logp, old, adv, v, old_v, ret, logits, MASK, 0.2, 0.3, 0.5, 0.01, torch.tensor(2.0), 0.25)
    assert_close("ppo_loss with PPO-ptx", got, pg + 0.5 * vf - 0.01 * h + 0.5, 1e-6,
                 [("ptx_coef not applied", pg + 0.5 * vf - 0.01 * h + 2.0)], "PPO-ptx adds ptx_coef * ptx_loss")


def test_rloo_advantages_known_values():
    """Two prompts, k = 3: each return minus the mean of the OTHER two of its group (not of all three,
    which is GRPO's centre without the scale, and not of the whole batch)."""
    from ppo import rloo_advantages
    R = torch.tensor([1.0, 2.0, 6.0, -1.0, -1.0, 5.0], dtype=torch.float64)
    got = call("rloo_advantages", rloo_advantages, R, 3)
    want = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, -1 - 2.0, -1 - 2.0, 5 + 1.0], dtype=torch.float64)
    assert_close("rloo_advantages, two groups of 3", got, want, 1e-12, hint="leave-one-out mean of the group")
    group_centred = R.view(2, 3) - R.view(2, 3).mean(1, keepdim=True)
    assert not torch.allclose(got, group_centred.view(-1)), "the inputs must tell leave-one-out from the group mean"
    assert torch.allclose(got, group_centred.view(-1) * 3 / 2), "RLOO is the group-centred return times k / (k - 1)"


def test_grpo_advantages_known_values_and_constant_groups():
    """Group-normalised: (R - mean) / (sample std + eps) per prompt; a group of equal returns gives 0, not NaN."""
    from ppo import grpo_advantages
    R = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0], dtype=torch.float64)  # group means 3 and 4, batch mean 3.5
    got = call("grpo_advantages", grpo_advantages, R, 3)
    assert got.dtype == torch.float64, f"grpo_advantages returned {got.dtype} for float64 returns: no .float()"
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)  # Bessel: divide by k - 1
    want = torch.tensor([-2 / (std + 1e-4), -1 / (std + 1e-4), 3 / (std + 1e-4), 0, 0, 0], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12), f"grpo {got.tolist()} != {want.tolist()}"
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    pop = torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(14 / 3) + 1e-4)
    assert not torch.allclose(got[:3].float(), pop), "the std divides by k - 1 (Bessel), as torch.std"
    batch_centred = (R - R.mean()).view(2, 3) / (R.view(2, 3).std(1, keepdim=True) + 1e-4)
    assert not torch.allclose(got, batch_centred.view(-1)), "each group is centred on its own mean, not the batch's"


