"""ppo.py's update and the loop around it, against independent references: ppo_update's weights after
two epochs of plain SGD beside a naive update written out row by row (the same shuffled
minibatches, the clipped loss in plain ops), and train()'s rewards under the adaptive KL controller
beside Ziegler et al.'s update by hand. The losses themselves: test_ppo.py; the rollout: test_rollout.py."""
import contextlib
import functools
import copy
import math
import signal
from types import SimpleNamespace

import pytest
import torch

import ppo
from checks import assert_close
from gpt import GPT, GPTConfig
from reward import RewardModel
from util import UserError, make_optimizer

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


def train(cfg, log):
    """ppo.train(cfg, log), then pytest's own Ctrl-C handling back (train's GracefulStop takes SIGINT and SIGTERM)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ppo.train(cfg, log=log)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


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
    train(cfg, logs.append)
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


def test_ppo_update_statistics_by_hand():
    """ppo_update's returned statistics, at lr 0 (every step sees the same weights) with one minibatch of the whole
    batch and 2 epochs (2 steps): each is the step's value, and their mean over the steps is that value again.
    clipfrac = masked mean of |rho - 1| > clip_eps, approx_kl = masked mean of (log rho)^2 / 2, value_loss the
    clipped value loss against the rollout's values (here off the critic's), loss the whole objective; rho = exp(log p - the rollout's)."""
    policy, critic = tiny_policy_and_critic(0)
    cfg = ppo.Config(rollout_batch=8, minibatch=8, ppo_epochs=2, temperature=0.7, clip_eps=0.2, vf_clip=0.2, vf_coef=0.5,
                     ent_coef=0.0, grad_clip=0.0)
    b = update_batch(policy, critic, cfg.temperature)
    b["values"] = (b["values"] + 0.5 * torch.randn(b["values"].shape, generator=torch.Generator().manual_seed(2))) * b["mask"]
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in (policy, critic)]
    stats = ppo.ppo_update(policy.train(), critic.train(), opts, b, cfg, contextlib.nullcontext(), torch.Generator().manual_seed(0))
    P, m = b["tokens"].size(1) - b["mask"].size(1), b["mask"]
    with torch.no_grad():
        lp = ppo.policy_logprobs(policy, b["tokens"], b["attn"], cfg.temperature, P - 1)[0]
        v = critic(b["tokens"], b["attn"], first=P - 1)[:, :-1]
    lr_ = torch.where(m.bool(), lp - b["logprobs"], 0)
    mean = lambda x: (x * m).sum() / m.sum()
    vl = ppo.value_loss(v, b["values"], b["returns"], m, cfg.vf_clip)
    want = dict(clipfrac=mean(((lr_.exp() - 1).abs() > 0.2).float()), approx_kl=mean(0.5 * lr_ ** 2), value_loss=vl,
                loss=ppo.ppo_policy_loss(lp, b["logprobs"], b["advantages"], m, 0.2) + 0.5 * vl)
    assert 0.1 < want["clipfrac"] < 0.9 and vl > 0.1 * ppo.value_loss(v, v, b["returns"], m, 1e9), "a weak test: see want"
    wrong = dict(clipfrac=[("|log rho| > clip_eps: the clip is on rho - 1", mean((lr_.abs() > 0.2).float()))],
                 approx_kl=[("log rho's mean (k1), not (log rho)^2 / 2", mean(lr_))],
                 value_loss=[("the value loss clipped around the new values, not the rollout's b['values']",
                              ppo.value_loss(v, v, b["returns"], m, cfg.vf_clip))])
    for key, value in want.items():
        assert_close(f"ppo_update's {key}", stats[key], value.item(), 1e-5,
                     [(mistake, x.item()) for mistake, x in wrong.get(key, [])] +
                     [("summed over the steps (2 here), not their mean", 2 * value.item())], "see the docstring")


def one_sgd_step(cfg, lr, ptx=None):
    """The change of every policy parameter after ppo_update's one step (minibatch = the batch, 1 epoch) of SGD."""
    policy, critic = tiny_policy_and_critic(0)
    b = update_batch(policy, critic, cfg.temperature)
    before = [p.detach().clone() for p in policy.parameters()]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (policy, critic)]
    stats = ppo.ppo_update(policy.train(), critic.train(), opts, b, cfg, contextlib.nullcontext(), torch.Generator().manual_seed(0),
                           ptx and (lambda: ptx(policy)))
    return [p.detach() - q for p, q in zip(policy.parameters(), before)], stats


def test_ppo_update_stops_before_a_nonfinite_step():
    """A nan advantage makes a nan policy gradient: ppo_update raises a UserError naming the iteration and
    the quantity before any optimizer step, so the weights stay those of the last good iteration."""
    policy, critic = tiny_policy_and_critic(3)
    b = update_batch(policy, critic, 1.0)
    b["advantages"][:, 0] = math.nan  # every row's first response token is valid
    before = [copy.deepcopy(m.state_dict()) for m in (policy, critic)]
    opts = [make_optimizer(m.parameters(), 1e-2, 0.0) for m in (policy, critic)]
    cfg = ppo.Config(rollout_batch=8, minibatch=4, ppo_epochs=1)
    with pytest.raises(UserError, match=r"ppo iteration 7: non-finite grad_norm; last good: x"):
        ppo.ppo_update(policy, critic, opts, b, cfg, contextlib.nullcontext(), torch.Generator().manual_seed(0), it=7,
                       hint="; last good: x")
    for model, state in zip((policy, critic), before):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "a nan step reached the weights"


def test_ppo_update_clips_the_gradient_norm_at_grad_clip():
    """--grad_clip: one SGD step (lr 1) moves the policy by its gradient clipped to norm grad_clip = 1e-3, while the
    norm logged is the one before the clip (far above it here); grad_clip = 0 leaves the gradient alone."""
    kw = dict(rollout_batch=8, minibatch=8, ppo_epochs=1, temperature=0.7, ent_coef=0.0)
    step, stats = one_sgd_step(ppo.Config(grad_clip=1e-3, **kw), 1.0)
    moved = torch.cat([d.flatten() for d in step]).norm().item()
    assert stats["grad_norm"] > 0.01, f"a weak test: the policy's gradient norm {stats['grad_norm']} is near the clip"
    assert abs(moved - 1e-3) < 1e-6, \
        f"ppo_update: the policy moved by {moved:.3g} at lr 1, grad norm {stats['grad_norm']:.3g}: clip it to --grad_clip=1e-3"
    step, stats = one_sgd_step(ppo.Config(grad_clip=0.0, **kw), 1.0)
    moved = torch.cat([d.flatten() for d in step]).norm().item()
    assert abs(moved - stats["grad_norm"]) < 1e-4 * moved, f"--grad_clip=0: moved {moved}, grad norm {stats['grad_norm']}: no clip"


def test_ppo_update_weighs_the_ptx_loss_by_ptx_coef():
    """PPO-ptx: the loss ptx() returns enters the step times --ptx_coef. With ptx() = the sum of the token
    embeddings (gradient 1 on each), one SGD step at lr 0.1 moves wte by -0.1 * ptx_coef = -0.025 more than the
    step without it, every other weight alike."""
    kw = dict(rollout_batch=8, minibatch=8, ppo_epochs=1, temperature=0.7, ent_coef=0.0, grad_clip=0.0)
    base, _ = one_sgd_step(ppo.Config(**kw), 0.1)
    step, _ = one_sgd_step(ppo.Config(ptx_coef=0.25, **kw), 0.1, ptx=lambda policy: policy.transformer.wte.weight.sum())
    names = [n for n, _ in tiny_policy_and_critic(0)[0].named_parameters()]
    for name, d, d0 in zip(names, step, base):
        want = d0 - 0.025 if name == "transformer.wte.weight" else d0
        assert torch.allclose(d, want, atol=1e-6), \
            f"ppo_update with ptx: {name} moved {(d - d0).mean().item():+.4f} off the step without it; want " \
            f"{(want - d0).mean().item():+.4f}: the ptx loss weighs cfg.ptx_coef (times the ptx loss, once)"


def run_train(monkeypatch, tmp_path, prompts, spy_rollout=None, spy_update=None, texts=None, **kw):
    """train() on tiny models and stub prompts (load_models, load_prompts replaced); evaluate records its iterations.
    Returns (the logs, the iterations evaluated)."""
    import rollout as R
    policy, critic = tiny_policy_and_critic(1)
    ref, rm = tiny_policy_and_critic(2)
    with torch.no_grad():
        ref.transformer.wte.weight.mul_(10)  # a reference away from the policy: log-ratios of order 1
    monkeypatch.setattr(R, "load_models", lambda cfg, device: (policy, ref, rm, critic, SimpleNamespace(eot=EOS, vocab=None)))
    monkeypatch.setattr(R, "load_prompts", lambda cfg, tok: (texts or ["p"] * len(prompts), prompts, [], [], None))
    evals = []
    monkeypatch.setattr(R, "evaluate", lambda *a, **k: evals.append(len(evals)) or dict(score=0.0))
    for module, name, spy in ((R, "rollout", spy_rollout), (ppo, "ppo_update", spy_update)):
        if spy:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, functools.partial(spy, real))
    logs = []
    cfg = ppo.Config(**{**dict(data="stub", out_dir=str(tmp_path), rollout_batch=4, minibatch=2, ppo_epochs=1,
                               max_new_tokens=5, device="cpu"), **kw})
    train(cfg, logs.append)
    return logs, [m["iter"] for m in logs if m["kind"] == "eval"]


def test_train_iterations_draw_their_own_prompts_and_seeds_and_sample_with_the_current_policy(monkeypatch, tmp_path):
    """train() over 3 iterations, --eval_interval=2: iteration it rolls out the prompts data.batch_indices(n, it, ...)
    with a generator of its own, updates with another generator of its own, and samples (--rollout_dtype=bfloat16:
    a copy) with the policy's current weights, not iteration 0's; evaluations at 0, 2 and the last, 3."""
    import data
    prompts = [[i + 1] for i in range(8)]
    seen = []

    def spy_rollout(real, policy, ref, rm, critic, prompt_ids, pad_id, max_new_tokens, temperature, ctx, gen, sampler=None, **k):
        w = policy.transformer.wte.weight.detach()
        stale = (sampler.transformer.wte.weight.float() - w.bfloat16().float()).abs().max().item()
        seen.append(dict(prompts=[p[0] - 1 for p in prompt_ids], gen=gen.initial_seed(), stale=stale))
        return real(policy, ref, rm, critic, prompt_ids, pad_id, max_new_tokens, temperature, ctx, gen, sampler=sampler, **k)

    def spy_update(real, policy, critic, opts, b, cfg, ctx, g, *a, **k):
        seen[-1]["update_gen"] = g.initial_seed()
        return real(policy, critic, opts, b, cfg, ctx, g, *a, **k)
    _, evals = run_train(monkeypatch, tmp_path, prompts, spy_rollout, spy_update, iters=3, eval_interval=2,
                         rollout_dtype="bfloat16", lr=1e-2)
    assert evals == [0, 2, 3], f"train evaluated at iterations {evals}: every --eval_interval and at the end (--iters=3)"
    assert [s["prompts"] for s in seen] == [data.batch_indices(8, it, 4, 0) for it in range(3)], \
        f"train's rollouts saw prompts {[s['prompts'] for s in seen]}: iteration it's are batch_indices(n, it, ...)"
    for key, what in (("gen", "rollout's"), ("update_gen", "ppo_update's")):
        assert len({s[key] for s in seen}) == 3, f"train: the {what} generator seeds per iteration {[s[key] for s in seen]}: " \
                                                 "each iteration needs its own (seeded(seed, ..., it))"
    assert all(s["stale"] == 0 for s in seen), f"train: the sampler's wte off the policy's (bf16) by {[s['stale'] for s in seen]}: " \
                                               "copy the policy's weights into the sampler before each rollout"


def test_train_kl_controller_targets_the_kl_per_response_and_logs_the_sampled_entropy(monkeypatch, tmp_path):
    """--adaptive_kl steers the mean KL per response (kl_seq), not the per-token mean: with --kl_target 10% above
    iteration 0's kl_seq (measured by a first run: the same seeds) the clip does not act, and beta after it is
    kl_coef * (1 + (kl_seq / target - 1) * n / horizon) by hand. The logged entropy is the mean of -log p over the
    valid response tokens of the batch ppo_update receives."""
    from ppo import masked_mean
    first, _ = run_train(monkeypatch, tmp_path / "a", [[1, 2], [3], [4, 5, 6], [7, 8]], iters=1, eval_interval=100)
    first = [m for m in first if m["kind"] == "train"]
    kl_seq, k1 = first[0]["kl_seq"], first[0]["kl"]
    target = 1.1 * kl_seq
    assert abs(k1 / target - 1) > 0.25 and kl_seq > 0.5, f"a weak test: kl_seq {kl_seq}, k1 {k1}"
    ent = []

    def spy_update(real, policy, critic, opts, b, *a, **k):
        ent.append(masked_mean(-b["logprobs"], b["mask"]).item())
        return real(policy, critic, opts, b, *a, **k)
    logs, _ = run_train(monkeypatch, tmp_path / "b", [[1, 2], [3], [4, 5, 6], [7, 8]], spy_update=spy_update, iters=2,
                        eval_interval=100, kl_coef=0.5, adaptive_kl=True, kl_target=target, kl_horizon=10)
    train = [m for m in logs if m["kind"] == "train"]
    assert abs(train[0]["kl_seq"] - kl_seq) < 1e-6, "a weak test: the second run's iteration 0 is not the first's"
    beta = 0.5 * (1 + (kl_seq / target - 1) * 4 / 10)
    assert_close("train: beta after iteration 0", train[1]["kl_coef"], beta, 1e-6,
                 [("the controller fed the per-token KL (kl), not the mean KL per response (kl_seq)",
                   0.5 * (1 + max(-0.2, min(0.2, k1 / target - 1)) * 4 / 10))], "Ziegler et al.'s update on kl_seq")
    assert all(abs(m["entropy"] - e) < 1e-6 for m, e in zip(train, ent)), \
        f"train logged entropy {[m['entropy'] for m in train]}, want {ent}: the mean of -log p over valid tokens (mask)"


def test_train_resume_restores_the_kl_controller_and_the_score_moments(monkeypatch, tmp_path):
    """--resume continues Ziegler et al.'s controller from the beta the checkpoint holds, and --score_norm from the
    running moments of the scores seen: a run of 1 iteration, resumed to 2, logs iteration 1's beta as 0.46 =
    0.5 * (1 - 0.2 * 4 / 10) (KL far below the target), not the start --kl_coef 0.5, and its moments count 8 scores.
    The evaluation of the iteration it resumes at (--eval_interval=1) came with the checkpoint: not run again."""
    import rollout as R
    moments = []
    real_add = R.add_advantages
    monkeypatch.setattr(R, "add_advantages", lambda b, cfg, kl_coef, m: moments.append(m) or real_add(b, cfg, kl_coef, m))
    kw = dict(eval_interval=1, kl_coef=0.5, adaptive_kl=True, kl_target=1000.0, kl_horizon=10, score_norm=True)
    prompts = [[1, 2], [3], [4, 5, 6], [7, 8]]
    first, evals = run_train(monkeypatch, tmp_path, prompts, iters=1, **kw)
    assert evals == [0, 1], f"a weak test: the first run evaluated at {evals}"
    logs, evals = run_train(monkeypatch, tmp_path, prompts, iters=2, resume=True, **kw)
    assert evals == [2], f"resumed train evaluated at iterations {evals}: iteration 1's evaluation is in the checkpoint " \
                         "(save(it, eval=ev)), not to be run again"
    assert [m["iter"] for m in logs if m["kind"] == "train"] == [1], f"a weak test: the resumed run logged {logs}"
    beta = [m["kl_coef"] for m in logs if m["kind"] == "train"][0]
    assert abs(beta - 0.46) < 1e-9, f"resumed train: iteration 1's beta {beta}, want 0.46, the controller's value saved " \
                                    "after iteration 0 (ck['kl_coef'] into kl_ctl.value), not the start --kl_coef"
    assert moments[-1].n == 8, f"resumed train: the score moments count {moments[-1].n} scores after iteration 1, want 8 " \
                               "(4 per iteration): restore them from the checkpoint's 'moments'"


def test_train_resume_takes_this_runs_learning_rates_and_the_saved_moments(monkeypatch, tmp_path):
    """--resume with another --lr and --vf_lr: PPO's learning rates are constant, set once by make_optimizer and
    never again, so an optimizer resumed with opt.load_state_dict (not util.load_optimizer) trains on at the saved
    run's rates, silently. The resumed update steps with this run's rates and the Adam moments of the first run's
    2 steps (1 iteration of 2 minibatches)."""
    seen = []

    def spy_update(real, policy, critic, opts, *a, **k):
        first = [o.state.get(o.param_groups[0]["params"][0], {}) for o in opts]  # each optimizer's first parameter's
        seen.append(([g["lr"] for o in opts for g in o.param_groups], [float(state.get("step", 0)) for state in first]))
        return real(policy, critic, opts, *a, **k)
    prompts = [[1, 2], [3], [4, 5, 6], [7, 8]]
    run_train(monkeypatch, tmp_path, prompts, iters=1, eval_interval=1, lr=1e-3, vf_lr=2e-3)
    run_train(monkeypatch, tmp_path, prompts, spy_update=spy_update, iters=2, eval_interval=1, lr=1e-4, vf_lr=3e-4, resume=True)
    assert len(seen) == 1, f"a weak test: the resumed run updated {len(seen)} times"
    lrs, steps = seen[0]
    assert lrs == [1e-4, 1e-4, 3e-4, 3e-4], f"resumed train steps with learning rates {lrs} (policy's groups, critic's), " \
        "want this run's --lr=1e-4 and --vf_lr=3e-4: load_state_dict put the saved 1e-3 and 2e-3 back (util.load_optimizer)"
    assert steps == [2.0, 2.0], f"resumed train: Adam's step counts {steps}, want the first run's 2: the moments not resumed"


def test_train_gold_pairs_each_response_with_its_own_prompt(monkeypatch, tmp_path):
    """The built-in task's logged gold score is the mean gold_score(prompt, response) over the rollouts, each response
    with the prompt it answers, also with --samples_per_prompt=2 (RLOO: each prompt rolled out twice). gold_score and
    the decoding are replaced: a response scores 1 when paired with its own prompt, else 0, so the gold is 1."""
    import data
    import rollout as R
    monkeypatch.setattr(data, "gold_score", lambda p, r: float(p == r))

    def responses(b, tok):  # a prompt is one token, its text the token's id: the response "is" its prompt
        return [str(t) for t in b["tokens"][:, b["tokens"].size(1) - b["mask"].size(1) - 1].tolist()]
    monkeypatch.setattr(R, "responses", responses)
    prompts = [[i + 1] for i in range(4)]
    logs, _ = run_train(monkeypatch, tmp_path, prompts, texts=[str(p[0]) for p in prompts], data="builtin", iters=2,
                        eval_interval=100, advantage="rloo", samples_per_prompt=2)
    gold = [m["gold"] for m in logs if m["kind"] == "train"]
    assert gold == [1.0, 1.0], f"train logged gold {gold}, want 1 at each iteration: each of the rollout's rows (k per " \
                               "prompt) scored against its own prompt ([train_prompts[j] for j in mine])"
