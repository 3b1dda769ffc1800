"""
Closed-form gradients of three RLHF losses: what loss.backward() computes for sft.sft_loss,
reward.preference_loss and ppo.ppo_policy_loss, derived by hand. Training never calls them (autograd
does this work); they are here to be derived, and test_grads.py checks each against float64 finite
differences of the loss it differentiates and against autograd (`pytest test_grads.py`).
Each docstring states the loss and what to derive; its derivation, after "Answer (stripped from
the skeleton):", stays in the reference: make_exercises.py cuts it from the course version.
Standalone: torch only, so each formula reads without the code of its loss.
"""
import torch
from torch.nn import functional as F


def sft_loss_grad(logits, tokens, loss_mask):
    """d sft_loss(logits, tokens, loss_mask) / d logits: a tensor of logits' shape (B, T, V), dtype
    and device. tokens: (B, T) long; loss_mask: (B, T), 1 on response tokens.
    The loss: L = (1/M) sum_{b, t >= 1} m_{b,t} * -log p_{b,t-1}[tokens_{b,t}], where
    m = loss_mask, p_{b,s} = softmax(logits[b, s]) and M = sum_{b, t >= 1} m_{b,t}.
    Derive on paper: d(-log softmax(z)[y]) / d z_v for one position; then which term of L each logit
    position s appears in (the shift by one, the last position, the mask) and the factor 1/M.
    Without autograd (loss.backward() is what the tests compare it with); finite for large logits (+-1000).
    Answer (stripped from the skeleton):
    -log softmax(z)[y] = logsumexp(z) - z_y, whose derivative w.r.t. z_v is softmax(z)_v - [v == y].
    Logit position s only appears in the term of token t = s + 1, so
      grad[b, s] = (softmax(logits[b, s]) - onehot(tokens[b, s+1])) * m_{b,s+1} / M   for s < T-1,
      grad[b, T-1] = 0   (the last position predicts no token of the sequence).
    """
    B, T, V = logits.shape
    m = loss_mask[:, 1:].to(logits.dtype)  # (B, T-1): position s is weighted by token s+1's mask
    p = torch.softmax(logits[:, :-1], -1)  # (B, T-1, V)
    onehot = F.one_hot(tokens[:, 1:], V).to(logits.dtype)  # (B, T-1, V)
    grad = torch.zeros_like(logits)
    grad[:, :-1] = (p - onehot) * (m / m.sum())[..., None]
    return grad


def preference_loss_grad(r_chosen, r_rejected):
    """(d L / d r_chosen, d L / d r_rejected) for L = preference_loss(r_chosen, r_rejected)
    = (1/N) sum_i -log sigmoid(r_chosen_i - r_rejected_i). r_chosen, r_rejected: (N,).
    Derive on paper: the derivative of log sigmoid(d), written with sigmoid itself, then the chain
    rule through d = r_chosen - r_rejected, and the 1/N of the mean.
    Returns two (N,) tensors of the inputs' dtype and device, finite for differences of any size.
    Answer (stripped from the skeleton):
    With d = r_c - r_r: d(-log sigmoid(d))/dd = -(1 - sigmoid(d)) = -sigmoid(-d), since
    (log sigmoid)' = 1 - sigmoid and 1 - sigmoid(d) = sigmoid(-d). Each pair i enters L once, so
      d L / d r_c_i = -sigmoid(r_r_i - r_c_i) / N,   d L / d r_r_i = +sigmoid(r_r_i - r_c_i) / N.
    The push on a pair is largest when the model ranks it wrongly and fades once it ranks it right.
    """
    g = torch.sigmoid(r_rejected - r_chosen) / r_chosen.numel()  # (N,)
    return -g, g


def ppo_policy_loss_grad(logprobs, old_logprobs, advantages, mask, clip_eps):
    """d ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps) / d logprobs: (B, T),
    of logprobs' dtype and device; all inputs (B, T). The loss:
    L = (1/M) sum_t m_t * max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps)),
    rho_t = exp(logprobs_t - old_logprobs_t), M = sum_t m_t.
    Derive on paper: d rho_t / d logprobs_t; then, for each sign of A_t and each place of rho_t
    (below 1-eps, inside, above 1+eps), which term of the max is the larger and what its derivative
    is (the clipped term is a constant once rho_t is past the clip); then the mask and the 1/M.
    At rho_t = 1 +- eps exactly the loss has a kink; either one-sided derivative is fine there.
    Where m_t = 0 the gradient is 0, whatever the log-probs and advantages there hold (a -5 / -120
    pair past a response's end: exp(115) = inf, and inf * 0 = nan; so is a nan advantage times 0).
    Answer (stripped from the skeleton):
    d rho_t / d logprobs_t = rho_t. The max picks the clipped term, a constant, exactly when the
    ratio has moved past the clip in the direction the advantage rewards: A_t > 0 and
    rho_t > 1 + eps, or A_t < 0 and rho_t < 1 - eps. There the gradient is 0. Everywhere else the
    unclipped term is (one of) the max, so
      grad_t = -A_t * rho_t * [unclipped_t] * m_t / M.
    (Past the clip on the other side, e.g. A_t > 0 and rho_t < 1 - eps, the loss is not clipped:
    the update may always undo a move that made things worse.)
    """
    rho = torch.exp(logprobs - old_logprobs)  # (B, T)
    clipped = ((advantages > 0) & (rho > 1 + clip_eps)) | ((advantages < 0) & (rho < 1 - clip_eps))
    grad = -advantages * rho * (~clipped).to(rho.dtype)
    return torch.where(mask.bool(), grad, 0) / mask.sum()  # a where, not * mask: inf or nan there
