"""Gradients against float64 central finite differences: what backward() computes for each loss, and
the closed forms of grads.py (end to end through a tiny GPT: test_grads_gpt.py).
Central differences are O(h^2)-exact only where the function is smooth, so every point below sits
away from the kinks of the clips (ratio = 1 +- eps, V - V_old = +-eps, the two terms of a max
equal): each check is well-posed, and where the objective is clipped the gradient is exactly 0."""

import math

import pytest
import torch
from torch.nn import functional as F

import grads
from checks import assert_close, autograd_grads, call, gradcheck, numerical_grad
from ppo import entropy, ppo_loss, ppo_policy_loss, value_loss
from ppo import token_logprobs
from reward import preference_loss
from sft import sft_loss

CLIP, VCLIP = 0.2, 0.4  # the ratio clip, the value clip: a loss that swaps them must show


# the losses written here from their docstrings: the known values beside each gradient check (a
# gradient test alone cannot see a wrong forward), and the wrong answers of typical mistakes
def ref_nll(logits, targets, w):
    """-log softmax(logits)[targets], a mean weighted by w: the SFT loss shifted by one, mistakes otherwise"""
    w = w.to(logits.dtype)
    return -(logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * w).sum() / w.sum()


def ref_sft_loss(logits, tokens, mask):
    return ref_nll(logits[:, :-1], tokens[:, 1:], mask[:, 1:])


def ref_preference_loss(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def ref_policy_loss(logprobs, old, adv, mask, eps, pick=torch.max, clip=lambda rho, eps: rho.clamp(1 - eps, 1 + eps)):
    rho = (logprobs - old).exp()
    return (pick(-adv * rho, -adv * clip(rho, eps)) * mask).sum() / mask.sum()


def ref_value_loss(values, old, returns, mask, eps, centre=None, pick=torch.max):
    centre = old if centre is None else centre
    clipped = centre + (values - centre).clamp(-eps, eps)
    return 0.5 * (pick((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum() / mask.sum()


def ref_entropy(logits, mask):
    logp = logits.log_softmax(-1)
    return (-(logp.exp() * logp).sum(-1) * mask).sum() / mask.sum()


# -----------------------------------------------------------------------------
# inputs: masks with prompt tokens, padding and rows of different lengths; points off the kinks

def sft_example():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(3, 6, 7, dtype=torch.float64, generator=g)  # (B, T, V)
    tokens = torch.randint(0, 5, (3, 6), generator=g)  # below V - 1: a one-hot must be told V
    mask = torch.tensor([[0, 0, 1, 1, 1, 1],  # 2 prompt tokens, runs to the end
                         [0, 1, 1, 1, 0, 0],  # 1 prompt token, padding after
                         [1, 0, 0, 1, 1, 0]])  # loss_mask[:, 0] = 1: token 0 is never a target, so it counts for nothing
    return logits, tokens, mask


def preference_example():
    rc = torch.tensor([2.0, -0.5, 0.3, 1.5, -2.0], dtype=torch.float64)
    rr = torch.tensor([0.5, 1.0, 0.2, -1.0, -0.4], dtype=torch.float64)  # chosen ahead and behind
    return rc, rr


# (ratio, advantage) -> whether the objective is clipped there (gradient 0); |ratio - 1 -+ eps| >= 0.01, where a
# finite-difference step moves the ratio by ~1e-6. 1.21 and 0.81 lie between 1 +- eps and exp(+-eps): the clip
# is on the ratio, not on the log-ratio
POLICY_POINTS = {"pos_adv-inside": (1.1, 1.3, False), "pos_adv-below_clip": (0.5, 0.8, False),
                 "pos_adv-above_clip": (1.5, 1.3, True), "neg_adv-inside": (0.9, -0.7, False),
                 "neg_adv-below_clip": (0.5, -0.7, True), "neg_adv-above_clip": (1.5, -1.1, False),
                 "pos_adv-just_above_clip": (1.21, 1.0, True), "neg_adv-just_inside": (0.81, -1.0, False)}


def policy_example(points=tuple(POLICY_POINTS.values())):
    """Row 0: the points, then padding; row 1: two points inside the clip, then padding entries whose
    ratio is far outside it (their gradient must be 0 because of the mask alone). (B, T) float64."""
    n = len(points)
    T = max(n + 1, 4)
    ratio = [[p[0] for p in points] + [1.6] * (T - n), ([1.05, 0.95] + [0.4, 1.7] * T)[:T]]
    adv = [[p[1] for p in points] + [2.0] * (T - n), ([0.6, -1.4] + [1.5, -2.0] * T)[:T]]
    mask = [[1.0] * n + [0.0] * (T - n), [1.0, 1.0] + [0.0] * (T - 2)]
    old = -1 - torch.arange(2 * T, dtype=torch.float64).view(2, T) / 10
    logprobs = old + torch.tensor(ratio, dtype=torch.float64).log()
    return logprobs, old, torch.tensor(adv, dtype=torch.float64), torch.tensor(mask, dtype=torch.float64)


# (V - V_old, R - V_old) -> whether the clipped term is the max (gradient 0); V_old = 1, eps = 0.2
VALUE_POINTS = {"inside": (0.1, -0.5, False), "above-unclipped_wins": (0.5, -0.5, False),
                "above-clipped_wins": (0.5, 1.0, True), "below-unclipped_wins": (-0.5, 0.5, False),
                "below-clipped_wins": (-0.5, -1.0, True)}

# -----------------------------------------------------------------------------
# backward() of each loss against finite differences of the same loss

FORWARD = "the function itself is wrong: its known-value tests (test_advantages.py, test_ppo.py, test_sft.py, test_reward.py) say how"


def test_sft_loss_autograd_matches_finite_differences():
    logits, tokens, mask = sft_example()
    f = lambda x: sft_loss(x, tokens, mask)
    assert_close("sft_loss on float64 logits", f(logits), ref_sft_loss(logits, tokens, mask), 1e-12, hint=FORWARD)
    x = logits.clone()
    assert_close("sft_loss: autograd d/d logits", autograd_grads(f, logits)[0], numerical_grad(lambda: f(x), x))
    assert gradcheck(f, logits)


def test_preference_loss_autograd_matches_finite_differences():
    rc, rr = preference_example()
    assert_close("preference_loss on float64 rewards", preference_loss(rc, rr), ref_preference_loss(rc, rr), 1e-12,
                 hint=FORWARD)
    got_c, got_r = autograd_grads(preference_loss, rc, rr)
    xc, xr = rc.clone(), rr.clone()
    assert_close("preference_loss: autograd d/d r_chosen", got_c, numerical_grad(lambda: preference_loss(xc, xr), xc))
    assert_close("preference_loss: autograd d/d r_rejected", got_r, numerical_grad(lambda: preference_loss(xc, xr), xr))
    assert gradcheck(preference_loss, rc, rr)


def test_token_logprobs_autograd_matches_finite_differences():
    logits, tokens, _ = sft_example()
    assert_close("token_logprobs on float64 logits", token_logprobs(logits, tokens),
                 logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1), 1e-12, hint=FORWARD)
    w = torch.linspace(-1, 2, tokens.numel(), dtype=torch.float64).view(tokens.shape)  # a scalar read of (B, T)
    f = lambda x: (token_logprobs(x, tokens) * w).sum()
    x = logits.clone()
    assert_close("token_logprobs: autograd d/d logits", autograd_grads(f, logits)[0], numerical_grad(lambda: f(x), x))
    assert gradcheck(lambda x: token_logprobs(x, tokens), logits)


@pytest.mark.parametrize("point", POLICY_POINTS)
def test_ppo_policy_loss_autograd_matches_finite_differences(point):
    ratio, adv, clipped = POLICY_POINTS[point]
    logprobs, old, advantages, mask = policy_example([POLICY_POINTS[point]])
    f = lambda lp: ppo_policy_loss(lp, old, advantages, mask, CLIP)
    what = f"ppo_policy_loss at ratio {ratio}, advantage {adv:+}, clip {CLIP} (old log-probs {old[0, 0]:.1f})"
    mistakes = [("min instead of max: the loss takes the larger, pessimistic term",
                 ref_policy_loss(logprobs, old, advantages, mask, CLIP, torch.min)),
                ("ratio inverted: rho = exp(logprobs - old_logprobs)",
                 ref_policy_loss(old, logprobs, advantages, mask, CLIP)),
                ("old_logprobs left out of the ratio", ref_policy_loss(logprobs, 0 * old, advantages, mask, CLIP))]
    assert_close(what, f(logprobs), ref_policy_loss(logprobs, old, advantages, mask, CLIP), 1e-12, mistakes, FORWARD,
                 some_agree=True)  # inside the clip, min and max agree
    got = autograd_grads(f, logprobs)[0]
    x = logprobs.clone()
    labels = {(0, 0): f"(the {point} point)"}
    assert_close(f"{what}: autograd d/d logprobs vs finite differences", got, numerical_grad(lambda: f(x), x),
                 labels=labels)
    want = autograd_grads(lambda lp: ref_policy_loss(lp, old, advantages, mask, CLIP), logprobs)[0]
    assert_close(f"{what}: autograd d/d logprobs", got, want, labels=labels,
                 hint="rho must stay in the graph (no .detach()); the clipped term is constant past the clip")
    if clipped:
        assert got[0, 0].item() == 0.0, f"{what}: the objective is clipped there, so the gradient must be exactly 0, " \
                                        f"got {got[0, 0].item():.3g}"


@pytest.mark.parametrize("point", VALUE_POINTS)
def test_value_loss_autograd_matches_finite_differences(point):
    dv, dr, clipped = VALUE_POINTS[point]
    old = torch.tensor([[1.7, 0.5, -0.3, 0.7]], dtype=torch.float64)  # V_old, not 1: a clip around 1 must show
    values = old + torch.tensor([[dv, 0.05, -0.1, 0.9]], dtype=torch.float64)  # the point, two inside, padding
    returns = old + torch.tensor([[dr, 0.6, -0.8, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    v_clip = old + (values - old).clamp(-CLIP, CLIP)
    assert abs(dv) < CLIP or ((values - returns) ** 2 - (v_clip - returns) ** 2)[0, 0].abs() > 0.1, "test data on a kink"
    f = lambda v: value_loss(v, old, returns, mask, CLIP)
    what = f"value_loss at V - V_old = {dv:+}, R - V_old = {dr:+}, clip {CLIP} (V_old = {old[0, 0]:.1f})"
    mistakes = [("V clipped to [1 - eps, 1 + eps]: the clip is around V_old, V_old +- eps",
                 ref_value_loss(values, old, returns, mask, CLIP, torch.ones_like(old))),
                ("no clip, or V clipped around the returns (the same: max((V - R)^2, clip(V - R)^2) = (V - R)^2): the "
                 "clip is around V_old", ref_value_loss(values, old, returns, mask, CLIP, returns)),
                ("min instead of max: the loss takes the larger, pessimistic term",
                 ref_value_loss(values, old, returns, mask, CLIP, pick=torch.min))]
    assert_close(what, f(values), ref_value_loss(values, old, returns, mask, CLIP), 1e-12, mistakes, FORWARD,
                 some_agree=True)  # where the clip is inactive, these mistakes agree
    got = autograd_grads(f, values)[0]
    x = values.clone()
    labels = {(0, 0): f"(the {point} point)"}
    assert_close(f"{what}: autograd d/d values vs finite differences", got, numerical_grad(lambda: f(x), x),
                 labels=labels)
    want = (values - returns) * mask / mask.sum()  # 0.5 d(V - R)^2/dV, the mean's 1/M: the unclipped term
    want[0, 0] *= not clipped  # the clipped term, constant past the clip, is the larger one there
    assert_close(f"{what}: autograd d/d values", got, want, labels=labels)


def test_entropy_autograd_matches_finite_differences():
    logits, _, mask = sft_example()
    f = lambda x: entropy(x, mask)
    assert_close("entropy on float64 logits", f(logits), ref_entropy(logits, mask), 1e-12, hint=FORWARD)
    x = logits.clone()
    assert_close("entropy: autograd d/d logits", autograd_grads(f, logits)[0], numerical_grad(lambda: f(x), x))
    assert gradcheck(f, logits)


def test_ppo_loss_autograd_matches_finite_differences():
    logprobs, old, adv, mask = policy_example(tuple(POLICY_POINTS.values())[:6])  # T = 7: the widths of dv, dr
    B, T = mask.shape
    g = torch.Generator().manual_seed(1)
    old_values = torch.randn(B, T, dtype=torch.float64, generator=g)
    dv = torch.tensor([[0.1, -0.5, 0.5, 0.05, -0.1, 0.3, 0.0], [0.5, -0.3, 0.1, -0.5, 0.15, 0.25, 0.02]],
                      dtype=torch.float64)  # V - V_old: inside the value clip (VCLIP, not CLIP) and outside it on each side
    dr = torch.tensor([[0.4, 0.5, 1.0, -1.0, 0.6, -0.5, 0.2], [-0.5, -1.0, 0.3, 0.5, -0.4, 1.2, 0.1]],
                      dtype=torch.float64)  # R - V_old: either term of the max the larger one
    assert ((dv - dr) ** 2 - (dv.clamp(-VCLIP, VCLIP) - dr) ** 2)[dv.abs() > VCLIP].abs().min() > 0.05, "test data on a kink"
    values, returns = old_values + dv, old_values + dr
    logits = torch.randn(B, T, 4, dtype=torch.float64, generator=g)
    ptx = torch.tensor(1.7, dtype=torch.float64)

    def f(lp, v, lg, p):
        return ppo_loss(lp, old, adv, v, old_values, returns, lg, mask, CLIP, VCLIP, 0.5, 0.1, p, 0.3)
    inputs = [logprobs, values, logits, ptx]
    pg, vf = ref_policy_loss(logprobs, old, adv, mask, CLIP), ref_value_loss(values, old_values, returns, mask, VCLIP)
    h = ref_entropy(logits, mask)
    assert_close("ppo_loss", f(*inputs), pg + 0.5 * vf - 0.1 * h + 0.3 * ptx, 1e-12, hint=FORWARD, mistakes=[
        ("the entropy bonus added: the loss subtracts ent_coef * entropy", pg + 0.5 * vf + 0.1 * h + 0.3 * ptx),
        ("the ratio clipped at vf_clip: ppo_policy_loss takes clip_eps",
         ref_policy_loss(logprobs, old, adv, mask, VCLIP) + 0.5 * vf - 0.1 * h + 0.3 * ptx),
        ("the values clipped at clip_eps: value_loss takes vf_clip",
         pg + 0.5 * ref_value_loss(values, old_values, returns, mask, CLIP) - 0.1 * h + 0.3 * ptx)])
    got = autograd_grads(f, *inputs)
    xs = [x.clone() for x in inputs]
    for name, i in (("logprobs", 0), ("values", 1), ("logits", 2), ("ptx_loss", 3)):
        want = numerical_grad(lambda: f(*xs), xs[i])
        assert_close(f"ppo_loss: autograd d/d {name}", got[i], want)


# -----------------------------------------------------------------------------
# the closed forms of grads.py against finite differences of the losses they differentiate

DERIVE = "want = finite differences of the loss, entry by entry: check the derivation on the entries listed"


def closed_form(fn, *args):
    """fn(*args) as the docstrings ask: without autograd (so under torch.inference_mode), inputs unchanged."""
    try:
        with torch.inference_mode():
            return call(f"grads.{fn.__name__}", fn, *args)
    except RuntimeError as e:
        if isinstance(e, NotImplementedError) or ("grad" not in str(e) and "nference" not in str(e)):
            raise
        raise AssertionError(f"grads.{fn.__name__} fails under torch.inference_mode ({str(e).splitlines()[0][:80]}): "
                             "compute the gradient from its formula, without autograd") from None

def test_sft_loss_grad_matches_finite_differences():
    logits, tokens, mask = sft_example()
    x = logits.clone()
    want = numerical_grad(lambda: sft_loss(x, tokens, mask), x)
    got = closed_form(grads.sft_loss_grad, logits, tokens, mask)
    (B, T, _), M = logits.shape, mask[:, 1:].sum()
    grad_of = lambda loss: autograd_grads(loss, logits)[0]  # float64 autograd of a mistaken loss
    mistakes = [("the logits/labels shift is missing (logits[:, t] scored against tokens[:, t])",
                 grad_of(lambda l: ref_nll(l, tokens, mask))),
                ("the mask is not shifted with the labels (logit position s weighted by loss_mask[:, s])",
                 grad_of(lambda l: ref_nll(l[:, :-1], tokens[:, 1:], mask[:, :-1]))),
                ("divided by every position B*(T-1), not by the number of response tokens", want * M / (B * (T - 1))),
                ("no division by the number of response tokens (a sum, not a mean)", want * M),
                ("the mask is ignored: prompt and padding positions get a gradient",
                 grad_of(lambda l: ref_nll(l[:, :-1], tokens[:, 1:], torch.ones_like(mask[:, 1:])))),
                ("sign flipped", -want),
                ("torch.roll wrapped token 0 onto the last position (scored against tokens[:, 0], weighted by "
                 "loss_mask[:, 0])", grad_of(lambda l: ref_nll(l, torch.roll(tokens, -1, 1), torch.roll(mask, -1, 1)))),
                ("shifted the wrong way: the gradient of logit position s written at position s + 1",
                 torch.cat([torch.zeros_like(want[:, :1]), want[:, :-1]], 1))]
    assert_close("grads.sft_loss_grad", got, want, mistakes=mistakes, hint=DERIVE)
    autograd = autograd_grads(lambda l: sft_loss(l, tokens, mask), logits)[0]
    assert_close("grads.sft_loss_grad vs autograd, to float64 precision", got, autograd, 1e-12)


def test_sft_loss_grad_stable_for_large_logits():
    logits, tokens, mask = sft_example()
    logits = logits * 1000  # exp(2000) overflows even float64: use a stable softmax
    want = autograd_grads(lambda l: sft_loss(l, tokens, mask), logits)[0]
    assert_close("grads.sft_loss_grad at logits x 1000", grads.sft_loss_grad(logits, tokens, mask), want)


def test_preference_loss_grad_matches_finite_differences():
    rc, rr = preference_example()
    got_c, got_r = closed_form(grads.preference_loss_grad, rc, rr)
    xc, xr = rc.clone(), rr.clone()
    want_c = numerical_grad(lambda: preference_loss(xc, xr), xc)
    want_r = numerical_grad(lambda: preference_loss(xc, xr), xr)
    N = rc.numel()
    mistakes = [("sign flipped", -want_c),
                ("the rewards' difference the wrong way round inside the sigmoid: d/d r_chosen at the rewards swapped",
                 autograd_grads(ref_preference_loss, rr, rc)[0]),  # float64 autograd of the loss
                ("the 1/N of the mean is missing", want_c * N)]
    assert_close("grads.preference_loss_grad d/d r_chosen", got_c, want_c, mistakes=mistakes, hint=DERIVE)
    assert_close("grads.preference_loss_grad d/d r_rejected", got_r, want_r,
                 mistakes=[("the same sign as d/d r_chosen", want_c)])
    for what, g, a in zip(("r_chosen", "r_rejected"), (got_c, got_r), autograd_grads(preference_loss, rc, rr)):
        assert_close(f"grads.preference_loss_grad d/d {what} vs autograd, to float64 precision", g, a, 1e-12)


def test_preference_loss_grad_stable_for_large_differences():
    got_c, got_r = grads.preference_loss_grad(torch.tensor([1000.0, -1000.0], dtype=torch.float64),
                                             torch.tensor([0.0, 0.0], dtype=torch.float64))
    want_c = torch.tensor([0.0, -0.5], dtype=torch.float64)  # ranked right: no push; wrong: the full -1/N
    assert_close("grads.preference_loss_grad d/d r_chosen at differences +-1000", got_c, want_c)
    assert_close("grads.preference_loss_grad d/d r_rejected at differences +-1000", got_r, -want_c)
    for dtype, d in ((torch.float32, 17.0), (torch.float64, 40.0)):  # ranked right by far: a tiny push, yet not 0
        got = torch.stack(grads.preference_loss_grad(torch.tensor([d], dtype=dtype), torch.zeros(1, dtype=dtype)))
        x = torch.tensor([d, 0.0], dtype=torch.float64)  # float64 autograd: logsigmoid's backward does not cancel
        want = torch.stack(autograd_grads(ref_preference_loss, x[:1], x[1:])).to(dtype)
        assert_close(f"grads.preference_loss_grad (d/d r_chosen, d/d r_rejected) at a difference of {d:g} ({dtype}), to "
                     f"1e-6 relative", got, want, 1e-6 * want[1].item(),
                     [("a difference that cancels to 0 once a sigmoid rounds to 1 (1 - sigmoid(x) at a large x): write "
                       "it without the subtraction", torch.zeros(2, 1))])


def test_ppo_policy_loss_grad_matches_finite_differences():
    logprobs, old, adv, mask = policy_example()
    x = logprobs.clone()
    want = numerical_grad(lambda: ppo_policy_loss(x, old, adv, mask, CLIP), x)
    got = closed_form(grads.ppo_policy_loss_grad, logprobs, old, adv, mask, CLIP)

    def grad_of(eps=CLIP, m=mask, **kw):  # float64 autograd of ref_policy_loss, or of a mistake's variant of it
        return autograd_grads(lambda lp: ref_policy_loss(lp, old, adv, m, eps, **kw), logprobs)[0]
    rho = (logprobs - old).exp()
    mistakes = [("the clip is ignored: the gradient of -A * ratio everywhere", grad_of(pick=lambda a, b: a)),
                ("zero whenever the ratio is outside [1-eps, 1+eps]: the gradient of -A * clip(ratio, 1-eps, 1+eps) "
                 "alone, without the max", grad_of(pick=lambda a, b: b)),
                ("the chain rule stops at the ratio: d L / d ratio, not d L / d logprobs",
                 autograd_grads(lambda r: ref_policy_loss(r.log(), 0 * old, adv, mask, CLIP), rho)[0]),
                ("divided by every entry, not by sum(mask)", want * mask.sum() / mask.numel()),
                ("padding entries get a gradient: 0 where mask = 0 (torch.where)",  # every entry summed, / sum(mask)
                 grad_of(m=torch.ones_like(mask)) * mask.numel() / mask.sum()),
                ("sign flipped", -want),
                ("the clip ignored where A < 0: the gradient of -A * ratio there",
                 grad_of(pick=lambda a, b: torch.where(adv > 0, torch.max(a, b), a))),
                ("the clip tested on the log-ratio against +-eps: it is on the ratio, clip(ratio, 1-eps, 1+eps)",
                 grad_of(clip=lambda rho, eps: rho.log().clamp(-eps, eps).exp()))]
    labels = {(0, i): f"({name})" for i, name in enumerate(POLICY_POINTS)}
    assert_close("grads.ppo_policy_loss_grad", got, want, mistakes=mistakes, labels=labels, hint=DERIVE)
    autograd = autograd_grads(lambda lp: ppo_policy_loss(lp, old, adv, mask, CLIP), logprobs)[0]
    assert_close("grads.ppo_policy_loss_grad vs autograd, to float64 precision", got, autograd, 1e-12, labels=labels)
    assert_close("grads.ppo_policy_loss_grad at clip_eps 0.3 (the ratios 1.21 and 0.81 inside the clip)",
                 closed_form(grads.ppo_policy_loss_grad, logprobs, old, adv, mask, 0.3), grad_of(0.3), 1e-12,
                 [("the clip fixed at 0.2: it is 1 +- clip_eps", grad_of(0.2))], labels=labels)


def test_ppo_policy_loss_grad_zero_where_masked_whatever_the_inputs_hold():
    """Past a response's end: log-probs -5 / -120 (exp(115) = inf), -inf / -inf, nan; advantages nan or
    inf. The gradient is 0 there and the valid entries' gradient is unchanged: inf or nan times 0 = nan."""
    logprobs, old, adv, mask = policy_example()
    want = grads.ppo_policy_loss_grad(logprobs, old, adv, mask, CLIP)
    assert (mask == 0).any() and (want[mask == 0] == 0).all(), \
        "grads.ppo_policy_loss_grad is not 0 where mask = 0: padding gets a gradient (set it to 0 where mask = 0)"
    got32 = grads.ppo_policy_loss_grad(logprobs.float(), old.float(), adv.float(), mask.float(), CLIP)
    assert got32.dtype == torch.float32, f"grads.ppo_policy_loss_grad on float32 inputs: {got32.dtype}, want float32"
    for new_lp, old_lp, a in ((-5.0, -120.0, 1.0), (-math.inf, -math.inf, 1.0), (math.nan, -5.0, 1.0),
                              (-1.0, -1.0, math.nan), (-1.0, -1.0, math.inf)):
        lp, o, A = logprobs.clone(), old.clone(), adv.clone()
        lp[1, 2:], o[1, 2:], A[1, 2:] = new_lp, old_lp, a  # row 1's padding
        assert_close(f"grads.ppo_policy_loss_grad with log-probs {new_lp} (new) and {old_lp} (old) and advantage {a} "
                     "where masked", grads.ppo_policy_loss_grad(lp, o, A, mask, CLIP), want,
                     hint="inf or nan times the mask's 0 is nan: set the masked entries to 0 with torch.where")
