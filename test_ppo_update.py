"""ppo.py's update and the loop around it, against independent references: ppo_update's weights after
two epochs of plain SGD beside a naive update written out row by row (the same shuffled
minibatches, the clipped loss in plain ops), and train()'s rewards under the adaptive KL controller
beside Ziegler et al.'s update by hand. The losses themselves: test_ppo.py; the rollout: test_rollout.py."""
import contextlib
import copy
import signal
from types import SimpleNamespace

import torch

import ppo
from checks import assert_close
from gpt import GPT, GPTConfig
from reward import RewardModel

EOS = 10


def tiny_policy_and_critic(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16)
    return GPT(cfg), RewardModel(GPT(cfg))


def update_batch(policy, critic, temperature):
    """8 rollouts (4 prompt columns, left-padded; 6 response columns, responses of 1..6 tokens) whose old
    log-probs sit 0.4 * N(0, 1) off the policy's at `temperature`: the ratio starts inside the clip on
    some tokens and outside it on others. Advantages of both signs; returns off the values."""
    g = torch.Generator().manual_seed(1)
    B, P, R = 8, 4, 6
    lengths, prompt = torch.tensor([6, 3, 1, 6, 4, 2, 5, 6]), torch.tensor([4, 2, 3, 1, 4, 2, 3, 4])
    col = torch.arange(P + R)
    attn = ((col >= P - prompt[:, None]) & (col < P + lengths[:, None])).long()
    tokens = torch.where(attn.bool(), torch.randint(EOS, (B, P + R), generator=g), EOS)
    mask = attn[:, P:].float()
    with torch.no_grad():
        lp = ppo.policy_logprobs(policy, tokens, attn, temperature, P - 1)[0]
        values = critic(tokens, attn)[:, P - 1:-1]
    noise = lambda s: s * torch.randn(B, R, generator=g)
    return dict(tokens=tokens, attn=attn, mask=mask, logprobs=(lp + noise(0.4)) * mask,
                values=values * mask, returns=(values + noise(1.0)) * mask, advantages=noise(1.0) * mask)


def naive_update(policy, critic, b, cfg, lr, seed, temperature=None, ratio_one=False, first_only=False, shuffle=True):
    """cfg.ppo_epochs passes of plain SGD (p -= lr * grad, no clipping of the gradient norm) over minibatches of
    cfg.minibatch rows, drawn by torch.randperm(B) from a generator seeded with `seed`, one draw per epoch.
    Each row's log-probs and values from a forward of that row alone, the loss terms of its valid tokens
    max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) + vf_coef * 0.5 * max((V - R)^2, (clip(V, V_old +- vf_clip) - R)^2),
    summed over the minibatch's valid tokens and divided by their count. The flags make a known mistake.
    Returns the change of every parameter, policy's then critic's, flattened."""
    policy, critic = copy.deepcopy(policy), copy.deepcopy(critic)
    before = torch.cat([p.detach().flatten().clone() for m in (policy, critic) for p in m.parameters()])
    T, eps, (B, R) = temperature or cfg.temperature, cfg.clip_eps, b["mask"].shape
    P, g = b["tokens"].size(1) - R, torch.Generator().manual_seed(seed)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=g).tolist()
        perm = perm if shuffle else list(range(B))
        for i in range(0, cfg.minibatch if first_only else B, cfg.minibatch):
            total, n = 0.0, 0
            for r in perm[i:i + cfg.minibatch]:
                k = int(b["mask"][r].sum())  # row r's response tokens: its first k response columns
                assert b["mask"][r, :k].all(), "a response's tokens are a run from the first response column"
                x, a = b["tokens"][r:r + 1], b["attn"][r:r + 1]
                logp = torch.log_softmax(policy(x, a)[0, P - 1:P - 1 + k] / T, -1)  # (k, V): before each response token
                lp = logp.gather(1, x[0, P:P + k, None])[:, 0]  # (k,)
                rho = torch.exp(lp - (lp.detach() if ratio_one else b["logprobs"][r, :k]))
                adv, v = b["advantages"][r, :k], critic(x, a)[0, P - 1:P - 1 + k]  # (k,), (k,)
                v_old, ret = b["values"][r, :k], b["returns"][r, :k]
                v_clip = v_old + torch.clamp(v - v_old, -cfg.vf_clip, cfg.vf_clip)
                total = total + (torch.max(-adv * rho, -adv * torch.clamp(rho, 1 - eps, 1 + eps))
                                 + cfg.vf_coef * 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2)).sum()
                n += k
            params = [p for m in (policy, critic) for p in m.parameters()]
            grads = torch.autograd.grad(total / n, params, allow_unused=True)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    if gr is not None:
                        p -= lr * gr
    return torch.cat([p.detach().flatten() for m in (policy, critic) for p in m.parameters()]) - before


def test_ppo_update_matches_naive_sgd_reference():
    """Two epochs of 2 minibatches of 4 rollouts at temperature 0.7, plain SGD (lr 0.1), the ratio
    starting outside the clip on some tokens: ppo_update moves every weight as the naive update does.
    A ratio of 1 (old log-probs taken from the new ones), log-probs at temperature 1, one minibatch an
    epoch, or no shuffling each move them elsewhere, by far more than the tolerance (checked)."""
    policy, critic = tiny_policy_and_critic(0)
    cfg = ppo.Config(rollout_batch=8, minibatch=4, ppo_epochs=2, temperature=0.7, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5,
                     ent_coef=0.0, grad_clip=0.0)
    b, lr, seed = update_batch(policy, critic, cfg.temperature), 0.1, 1234
    with torch.no_grad():  # the first ratio, by hand: the clip must act on some valid tokens and not on others
        P, m = b["tokens"].size(1) - b["mask"].size(1), b["mask"].bool()
        lp = torch.log_softmax(policy(b["tokens"], b["attn"])[:, P - 1:-1] / 0.7, -1).gather(-1, b["tokens"][:, P:, None])[..., 0]
        out = ((lp - b["logprobs"]).exp() - 1).abs()[m] > cfg.clip_eps
    assert 0.2 < out.float().mean() < 0.8, f"{out.float().mean():.2f} of the tokens start outside the clip"
    assert (b["advantages"][m] > 0).any() and (b["advantages"][m] < 0).any()
    want = naive_update(policy, critic, b, cfg, lr, seed)
    mistakes = [("ratio always 1: old_logprobs must be the rollout's b['logprobs'][mb], not the new log-probs detached "
                 "(then the clip never acts)", naive_update(policy, critic, b, cfg, lr, seed, ratio_one=True)),
                ("log-probs at temperature 1: the update must take them at cfg.temperature, the distribution the tokens "
                 "were sampled from (policy_logprobs(..., cfg.temperature, ...))",
                 naive_update(policy, critic, b, cfg, lr, seed, temperature=1.0)),
                ("only the first minibatch of each epoch trains: the minibatches start at range(0, B, minibatch)",
                 naive_update(policy, critic, b, cfg, lr, seed, first_only=True)),
                ("the rollouts in their rollout order: each epoch's minibatches come from torch.randperm(B, generator=g)",
                 naive_update(policy, critic, b, cfg, lr, seed, shuffle=False))]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (policy, critic)]
    before = torch.cat([p.detach().flatten().clone() for m in (policy, critic) for p in m.parameters()])
    ppo.ppo_update(policy.train(), critic.train(), opts, b, cfg, contextlib.nullcontext(), torch.Generator().manual_seed(seed))
    got = torch.cat([p.detach().flatten() for m in (policy, critic) for p in m.parameters()]) - before
    assert want.abs().max() > 1e-2, f"the naive update moves the weights by {want.abs().max():.2e} at most: too little to test"
    assert_close("ppo_update: every weight's change after 2 epochs x 2 minibatches of SGD", got, want, 1e-5, mistakes,
                 "the clipped policy loss + vf_coef * the clipped value loss, each a masked mean over the minibatch's "
                 "valid tokens, one optimizer step per minibatch")


def test_train_rewards_use_the_adaptive_kl_coefficient(monkeypatch, tmp_path):
    """--adaptive_kl: the per-token KL penalty of iteration 1's rewards is -beta_1 * (log p - log q), with beta_1 the
    controller's value after iteration 0, by hand kl_coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) =
    0.5 * (1 - 0.2 * 4 / 10) = 0.46 (KL far below the target): not the start value --kl_coef, which iteration 0 uses.
    train() runs on tiny models and stub prompts (load_models, load_prompts, evaluate replaced); the batch is read
    where ppo_update receives it."""
    import rollout as R
    policy, critic = tiny_policy_and_critic(1)
    ref, rm = tiny_policy_and_critic(2)
    with torch.no_grad():
        ref.transformer.wte.weight.mul_(10)  # a reference away from the policy: log-ratios of order 1
    tok = SimpleNamespace(eot=EOS, vocab=None)
    monkeypatch.setattr(R, "load_models", lambda cfg, device: (policy, ref, rm, critic, tok))
    monkeypatch.setattr(R, "load_prompts", lambda cfg, tok: (["p"] * 4, [[1, 2], [3], [4, 5, 6], [7, 8]], [], [], None))
    monkeypatch.setattr(R, "evaluate", lambda *a, **k: dict(score=0.0))
    batches, real_update = [], ppo.ppo_update

    def spy(policy, critic, opts, b, *a, **k):
        batches.append({key: v.clone() for key, v in b.items()})
        return real_update(policy, critic, opts, b, *a, **k)
    monkeypatch.setattr(ppo, "ppo_update", spy)
    logs = []
    cfg = ppo.Config(data="stub", out_dir=str(tmp_path), iters=2, rollout_batch=4, minibatch=2, ppo_epochs=1, max_new_tokens=5,
                     eval_interval=100, kl_coef=0.5, adaptive_kl=True, kl_target=1000.0, kl_horizon=10, device="cpu")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ppo.train(cfg, log=logs.append)
    finally:  # train's GracefulStop took Ctrl-C: pytest's own handling back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert len(batches) == 2 and [m["kl_coef"] for m in logs if m["kind"] == "train"] == [0.5, 0.46], logs
    for it, beta in enumerate((0.5, 0.5 * (1 - 0.2 * 4 / 10))):
        b = batches[it]
        m = b["mask"].bool()
        inner = m & (torch.arange(m.size(1)) < m.sum(1, keepdim=True) - 1)  # before each response's last: no score
        d = (b["logprobs"] - b["ref_logprobs"])[inner]
        assert inner.sum() >= 6 and d.abs().max() > 0.5, f"iteration {it}: too few or too small log-ratios to tell beta"
        assert_close(f"train(), iteration {it}: the rewards of valid tokens before each response's last", b["rewards"][inner],
                     -beta * d, 1e-6, [] if it == 0 else [
                         ("the start --kl_coef reached the rewards: add_advantages must get the adaptive controller's "
                          "current value (kl_ctl.value), the one that is logged", -cfg.kl_coef * d)],
                     "r_t = -beta * (log p - log q), beta the controller's current value")
