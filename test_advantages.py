"""From rewards to advantages, ppo.py's math: token log-probs, the per-token KL penalty with the
score at each row's end, GAE, whitening, and the critic-free RLOO and GRPO, each against
hand-computed values or a naive loop. The PPO loss: test_ppo.py; the rollout: test_rollout.py."""
import math

import torch

from checks import assert_close, call
from ppo import gae, grpo_advantages, kl_penalized_rewards, rloo_advantages, token_logprobs, whiten

# two rows of different lengths: row 0 is left-padded and ends early, row 1 runs to the end
MASK = torch.tensor([[0., 1., 1., 1., 0.], [1., 1., 1., 1., 1.]])


def test_token_logprobs_matches_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0]]])  # (1, 2, 2)
    got = call("token_logprobs", token_logprobs, logits, torch.tensor([[1, 1]]))
    assert got.shape == (1, 2), f"token_logprobs: shape {tuple(got.shape)}, want (1, 2): " + (
        "squeeze(-1) only the gathered dimension (squeeze() drops every dimension of size 1)" if got.dim() < 2 else
        "a reduction over the vocabulary without keepdim=True, broadcast against the logits?")
    over_positions = torch.tensor([[math.log(3 / 4), math.log(1 / 4)]])
    assert_close("token_logprobs", got, torch.tensor([[math.log(3 / 4), math.log(1 / 5)]]), 1e-6,
                 [("log-softmax over positions (dim 1), not the vocabulary", over_positions)],
                 "log softmax over the vocabulary (the last dimension), then each token's entry")


def test_token_logprobs_matches_naive_loop_float64():
    """Columns 6 and 7 at -inf, no token's: the padded head's logits (gpt.GPT.head), which policy_logprobs passes."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 4, 6, dtype=torch.float64, generator=g)
    tokens = torch.randint(0, 6, (3, 4), generator=g)
    logits = torch.cat([logits, torch.full((3, 4, 2), -math.inf, dtype=torch.float64)], -1)  # (3, 4, 8)
    lse = [[math.log(sum(math.exp(z) for z in logits[b, t].tolist())) for t in range(4)] for b in range(3)]  # exp(-inf) = 0
    want = logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.tensor(lse, dtype=torch.float64)
    got = call("token_logprobs", token_logprobs, logits, tokens)
    assert torch.isfinite(got).all(), f"token_logprobs with logits -inf at columns 6, 7 (the padded head's, no token's): " \
        f"{got.tolist()}: a one-hot times the log-probs (or the logits) reads 0 * -inf = nan there: gather the token's entry"
    assert_close("token_logprobs on float64 logits, -inf at columns 6, 7", got, want, 1e-12,
                 hint="log p(token) = logit of the token - log sum exp(logits), over the vocabulary")


def test_token_logprobs_stable_for_large_logits():
    logits = torch.tensor([[[1000.0, 0.0, -1000.0]], [[-1000.0, 1000.0, 0.0]], [[-1000.0, -1000.0, -1001.0]]])  # (3, 1, 3)
    got = token_logprobs(logits, torch.tensor([[1], [1], [1]]))
    clamped = [("the log of a clamped softmax (or of softmax + eps): p = exp(-1000) underflows to 0, and the log stops "
                f"at log(eps) = {math.log(eps):.1f}; log_softmax is exact (logits minus their logsumexp)",
                torch.softmax(logits, -1).clamp_min(eps).log()[..., 1]) for eps in (1e-6, 1e-8, 1e-10, 1e-12, 1e-20, 1e-30)]
    assert_close("token_logprobs at logits +-1000", got, torch.tensor([[-1000.0], [0.0], [-math.log(2 + math.exp(-1))]]),
                 1e-3, clamped, hint="each row's own max subtracted (log_softmax over the last dim): one max over the whole "
                                     "batch underflows a row whose logits all sit far below it")


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
    got = kl_penalized_rewards(scores, logprobs, ref, MASK, 0.5)
    valid = MASK.bool()
    assert_close("kl_penalized_rewards on the valid tokens (inf and nan log-probs on padding)", got[valid], want[valid], 1e-6,
                 hint="wrong on the valid tokens themselves: test_kl_penalized_rewards_matches_hand_computed says how")
    assert_close("kl_penalized_rewards with inf and nan log-probs on padding", got, want, 1e-6,
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
                     "a backward recursion over each row's valid tokens, 0 on padding", some_agree=True)  # gamma 1
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
    _, ret = gae(rewards.float(), values, mask, 0.9, 0.8)
    assert_close("gae returns of float32 rewards, float64 values", ret, want_ret, 1e-5,
                 hint="returns = A + V in A + V's dtype (float64 here), not in rewards' dtype")
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
                   (x - mean) / (var.sqrt() + 1e-8) * m),
                  ("no eps: it is sqrt(var + 1e-8), which differs when var is near 0", (x - mean) / var.sqrt() * m),
                  ("eps 1e-5: it is sqrt(var + 1e-8)", (x - mean) / torch.sqrt(var + 1e-5) * m),
                  ("var clamped at 1e-8 (max(var, 1e-8)): it is var + 1e-8", (x - mean) / torch.sqrt(var.clamp(min=1e-8)) * m)],
                 "in x's dtype (float32 keeps only 7 digits of x = 3.00001), with var = masked_mean((x - mean)^2): "
                 "mean(x^2) - mean^2 cancels when the mean is large against the spread")
    const = torch.full((2, 5), 4.0, dtype=torch.float64)
    assert_close("whiten of a constant x", whiten(const, m), torch.zeros_like(const), 1e-12,
                 hint="var = 0: the 1e-8 inside the sqrt keeps (x - mean) / sqrt(var + 1e-8) at 0")


def naive_group_advantages(returns, k, grpo=False, groups="rows", loo_divisor=None, ddof=1, eps_inside=False):
    """RLOO's or GRPO's advantage of each response by a loop over its group: adjacent rows (the
    convention), every n-th row ("columns"), n adjacent rows ("chunks of n": view(k, -1), n = B / k) or the
    whole batch ("batch")."""
    R, n, out = returns.tolist(), returns.numel() // k, []
    for i in range(len(R)):
        group = [R[j] for j in range(len(R)) if {"rows": j // k == i // k, "columns": j % n == i % n,
                                                 "chunks of n": j // n == i // n, "batch": True}[groups]]
        mean = sum(group) / len(group)
        if grpo:
            var = sum((x - mean) ** 2 for x in group) / (len(group) - ddof)
            out.append((R[i] - mean) / (math.sqrt(var + 1e-4) if eps_inside else math.sqrt(var) + 1e-4))
        else:  # the mean of the other responses of the group
            out.append(R[i] - (sum(group) - R[i]) / (loo_divisor or len(group) - 1))
    return torch.tensor(out, dtype=returns.dtype)


# three prompts, k = 3, adjacent rows: group means 3, 4, 0; the middle group all equal
GROUP_RETURNS = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0, -3.0, 0.5, 2.5], dtype=torch.float64)


def test_rloo_advantages_matches_naive_loop():
    R = GROUP_RETURNS
    got = call("rloo_advantages", rloo_advantages, R, 3)
    assert_close("rloo_advantages, three groups of 3 (float64)", got, naive_group_advantages(R, 3), 1e-12,
                 [("the baseline is the group's mean, the response itself included: it is the mean of the OTHER "
                   "k - 1 responses", R - R.view(3, 3).mean(1).repeat_interleave(3)),
                  ("the others' sum divided by k, not k - 1", naive_group_advantages(R, 3, loo_divisor=3)),
                  ("groups read down the columns: a prompt's k responses are adjacent rows (view(-1, k))",
                   naive_group_advantages(R, 3, groups="columns")),
                  ("the baseline from the whole batch, not the prompt's group", naive_group_advantages(R, 3, groups="batch"))],
                 "A_i = R_i - (sum of the group's returns - R_i) / (k - 1)")


def test_grpo_advantages_matches_naive_loop_and_constant_groups():
    """The middle group's returns are all equal: its advantages are 0, not 0 / 0 = nan."""
    R = GROUP_RETURNS
    got = call("grpo_advantages", grpo_advantages, R, 3)
    assert torch.isfinite(got).all(), f"grpo_advantages {got.tolist()}: the middle group's returns are equal, " \
                                      f"std = 0: (R - mean) / (std + eps) keeps it at 0, not 0 / 0"
    assert_close("grpo_advantages, three groups of 3, the middle one constant (float64)", got,
                 naive_group_advantages(R, 3, grpo=True), 1e-12,
                 [("the population std (divides by k): the std has Bessel's correction, k - 1, as torch.std",
                   naive_group_advantages(R, 3, grpo=True, ddof=0)),
                  ("eps inside the square root: (R - mean) / (std + eps)", naive_group_advantages(R, 3, grpo=True, eps_inside=True)),
                  ("groups read down the columns: a prompt's k responses are adjacent rows (view(-1, k))",
                   naive_group_advantages(R, 3, grpo=True, groups="columns")),
                  ("centred on the batch's mean, not the group's", (R.view(3, 3) - R.mean()).view(-1) / (
                      R.view(3, 3).std(1).repeat_interleave(3) + 1e-4))],
                 "A_i = (R_i - mean of its group) / (std of its group + eps); a group of equal returns gives 0")


def test_grpo_advantages_reads_eps():
    R = GROUP_RETURNS.view(3, 3)
    want = ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + 0.5)).view(-1)
    assert_close("grpo_advantages with eps=0.5", call("grpo_advantages", grpo_advantages, GROUP_RETURNS, 3, eps=0.5), want, 1e-12,
                 [("eps fixed at 1e-4: the eps argument is ignored", naive_group_advantages(GROUP_RETURNS, 3, grpo=True))])


# n_prompts != k, where view(k, -1) groups otherwise than view(-1, k) and r.size(0) - 1 is not k - 1:
# 2 prompts x k = 4, then 3 prompts x k = 2 (the last group all equal)
UNEVEN = [(torch.tensor([1.0, 2.0, 6.0, 4.0, 0.5, -3.0, 2.5, 4.0], dtype=torch.float64), 4),
          (torch.tensor([1.0, 3.0, -2.0, 0.5, 4.0, 4.0], dtype=torch.float64), 2)]
VIEW_K = "view(k, -1): a (k, n_prompts) tensor whose rows are not the groups; a prompt's k responses are adjacent " \
         "rows, so view(-1, k) (n_prompts, k)"


def test_rloo_advantages_n_prompts_other_than_k():
    for R, k in UNEVEN:
        n, want = R.numel() // k, naive_group_advantages(R, k)
        by_view_k = naive_group_advantages(R, k, groups="chunks of n", loo_divisor=k - 1)
        assert (by_view_k - want).abs().max() > 0.1, "test data: view(k, -1) must group these returns otherwise"
        assert_close(f"rloo_advantages, {n} prompts x k = {k} (float64)", call("rloo_advantages", rloo_advantages, R, k),
                     want, 1e-12, [(VIEW_K, by_view_k),
                                   ("groups read down the columns (view(k, -1).t()): view(-1, k)",
                                    naive_group_advantages(R, k, groups="columns")),
                                   ("the others' sum divided by r.size(0) - 1 (n_prompts - 1 after view(-1, k)), not k - 1",
                                    naive_group_advantages(R, k, loo_divisor=n - 1))],
                     "A_i = R_i - (sum of the group's returns - R_i) / (k - 1), groups of k adjacent rows")


def test_grpo_advantages_n_prompts_other_than_k():
    for R, k in UNEVEN:
        n, want = R.numel() // k, naive_group_advantages(R, k, grpo=True)
        by_view_k = naive_group_advantages(R, k, grpo=True, groups="chunks of n")
        assert (by_view_k - want).abs().max() > 0.1, "test data: view(k, -1) must group these returns otherwise"
        assert_close(f"grpo_advantages, {n} prompts x k = {k} (float64)", call("grpo_advantages", grpo_advantages, R, k),
                     want, 1e-12, [(VIEW_K, by_view_k), ("groups read down the columns (view(k, -1).t()): view(-1, k)",
                                                         naive_group_advantages(R, k, grpo=True, groups="columns"))],
                     "A_i = (R_i - mean of its group) / (std of its group + eps), groups of k adjacent rows")
