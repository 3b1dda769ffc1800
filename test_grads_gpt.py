"""Gradients end to end: backward() through a tiny float64 GPT (+ value head) against float64 central
finite differences at every entry of every parameter, for the SFT loss and the PPO loss. The losses'
own gradients and the closed forms of grads.py: test_grads.py."""

import torch

from checks import TOL, assert_close, numerical_grad
from gpt import GPT, GPTConfig
from ppo import policy_logprobs, ppo_loss
from reward import RewardModel
from sft import sft_loss

CLIP = 0.2  # the ratio and value clips: points below sit away from their kinks


def tiny_gpt():
    """2 layers, 2 heads of size 2, 11 tokens: ~600 parameters, each checked. Weights and biases
    are drawn at scale 0.5, so that attention, LayerNorms and residual branches all matter."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=4)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "ln" in name and name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
    return model


def check_parameters(what, loss_fn, params):
    """loss_fn() -> scalar; backward() against finite differences at every entry of every parameter."""
    for p in params.values():
        p.grad = None
    loss_fn().backward()
    for name, p in params.items():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        want = numerical_grad(loss_fn, p.data)
        tol = TOL * max(1.0, want.abs().max().item())  # the reference's scale: an inf in got would make any tol pass
        assert_close(f"{what}: d/d {name}", got, want, tol=tol)


def test_end_to_end_sft_gpt_grads_match_finite_differences():
    model = tiny_gpt()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]])  # right padding, as sft.py trains
    check_parameters("sft_loss(tiny GPT)", lambda: sft_loss(model(tokens), tokens, mask), dict(model.named_parameters()))


def test_end_to_end_ppo_gpt_grads_match_finite_differences():
    policy = tiny_gpt()
    critic = RewardModel(policy).double()  # a value head on the policy's trunk: both losses reach it
    with torch.no_grad():
        critic.head.weight.normal_(0, 0.5), critic.head.bias.fill_(0.3)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2], [0, 6, 5, 3, 5, 8, 9]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1]])  # row 1 left-padded, row 0 ends early
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.float64)  # actions: response tokens
    with torch.no_grad():
        logprobs, _ = policy_logprobs(policy, tokens, attn, 0.7)
        values = critic(tokens, attn)[:, :-1]
    # old log-probs and values place the ratio and the value in each regime, away from the kinks
    ratio = torch.tensor([[1.0, 1.0, 1.1, 1.5, 0.5, 1.0], [1.0, 1.0, 0.9, 0.5, 1.5, 1.05]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 0.0, 1.2, 0.8, -0.9, 0.0], [0.0, 0.0, -0.6, 1.1, -1.3, 0.7]], dtype=torch.float64)
    old_logprobs = logprobs - ratio.log()
    old_values = values - torch.tensor([[0, 0, 0.1, 0.5, -0.5, 0], [0, 0, -0.05, 0.5, -0.5, 0.15]], dtype=torch.float64)
    returns = old_values + torch.tensor([[0, 0, 0.4, -0.5, 1.0, 0], [0, 0, 0.3, 1.0, -1.0, -0.2]], dtype=torch.float64)

    def loss_fn():
        lp, logits = policy_logprobs(policy, tokens, attn, 0.7)
        v = critic(tokens, attn)[:, :-1]
        return ppo_loss(lp, old_logprobs, adv, v, old_values, returns, logits, mask, CLIP, CLIP, 0.5, 0.05)
    check_parameters("ppo_loss(tiny GPT, value head)", loss_fn, dict(critic.named_parameters()))
