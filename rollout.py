"""
The experience PPO learns from: load the four models and the prompts, sample responses from the
policy and score them (log-probs under the policy and the reference, the reward model's score, the
critic's values), turn them into advantages, draw PPO-ptx's demonstrations, and evaluate a policy on
held-out prompts against the SFT policy. The math they use is ppo.py's; ppo.py's loop calls them,
bench.py times them.
"""
import copy
import math

import torch

import data
import onednn
from ddp import RANK, WORLD, all_sum, rank0_first
from gpt import generate
from hf import load_checkpoint, model_from_checkpoint
from ppo import gae, grpo_advantages, kl_penalized_rewards, masked_mean, policy_logprobs, rloo_advantages, whiten
from reward import load_reward_model
from sft import sft_loss
from util import UserError, append_jsonl, resolve_dtype


def load_models(cfg, device):
    """(policy, ref, rm, critic, tok), on `device`: the policy (trained) and the reference (frozen: the
    KL anchor), both from cfg.sft_ckpt; the reward model (frozen: the proxy reward) and the critic
    (trained; None with --advantage=rloo or grpo), both from cfg.reward_ckpt; the tokenizer they share."""
    sft_ck = load_checkpoint(cfg.sft_ckpt, "sft", "run `python sft.py` first")
    policy = model_from_checkpoint(sft_ck, cfg.sft_ckpt).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm, rm_ck = load_reward_model(cfg.reward_ckpt)
    rm = rm.to(device).eval().requires_grad_(False)
    if rm_ck.get("vocab") != sft_ck.get("vocab"):
        raise UserError(f"{cfg.reward_ckpt} and {cfg.sft_ckpt} use different vocabularies")
    for model, path in ((policy, cfg.sft_ckpt), (rm, cfg.reward_ckpt)):  # the critic is a copy of the reward model
        if cfg.max_prompt_len + cfg.max_new_tokens > model.config.block_size:
            raise UserError(f"--max_prompt_len + --max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} "
                            f"exceeds the block_size {model.config.block_size} of {path}")
    if not rm_ck.get("normalized") and RANK == 0:  # reward.py marks the checkpoint it finished and centred
        print(f"warning: {cfg.reward_ckpt} is from an unfinished reward.py run: its scores are not centred on the "
              "SFT policy's samples (a finished run's is its reward.pt; finish an interrupted one with --resume)")
    # The critic is a separate copy of the reward model (InstructGPT §3.5): initialised to predict
    # scores, and not sharing the policy's trunk, so value regression cannot disturb the policy.
    critic = copy.deepcopy(rm).train().requires_grad_(True) if cfg.advantage == "gae" else None
    return policy, ref, rm, critic, data.Tokenizer(sft_ck.get("vocab"), cfg.sft_ckpt)


def load_prompts(cfg, tok):
    """(train_prompts, train_ids, eval_prompts, eval_ids, demos) of cfg.data: prompts as text and as
    token lists, each keeping its last cfg.max_prompt_len tokens (those nearest the response), at most
    cfg.eval_prompts held out; demos, PPO-ptx's demonstrations [(prompt_ids, response_ids)] if
    cfg.ptx_coef > 0, else None."""
    train_prompts, eval_prompts = rank0_first(data.load_records, cfg.data, "prompts", cfg.seed)
    eval_prompts = eval_prompts[:cfg.eval_prompts]
    encode = lambda ps: [tok.encode(p)[-cfg.max_prompt_len:] for p in ps]
    n = cfg.rollout_batch // cfg.samples_per_prompt
    if len(train_prompts) < n:  # batch_indices would hand out fewer
        raise UserError(f"--data={cfg.data}: {len(train_prompts)} training prompts, fewer than the {n} of a rollout batch "
                        f"(--rollout_batch={cfg.rollout_batch}, --samples_per_prompt={cfg.samples_per_prompt})")
    demos = None
    if cfg.ptx_coef > 0:
        demos = data.load_records(cfg.data, "sft", cfg.seed)[0]  # downloaded already
        demos = data.encode_examples(tok, [d["prompt"] for d in demos], [d["response"] for d in demos],
                                     cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_prompt_len, "ptx")
    return train_prompts, encode(train_prompts), eval_prompts, encode(eval_prompts), demos


def make_sampler(policy, cfg, device):
    """The copy of the policy that samples, its weights in --rollout_dtype (cast once per update, where
    autocast would cast them at every decode step), or None: the fp32 policy samples itself. A decode
    step is bound by reading the weights, and a bf16 copy reads half the bytes. It samples slightly
    off the policy, whose log-probs a scoring forward then takes (rollout.py), as vLLM rollouts do."""
    dtype = resolve_dtype(device, cfg.dtype) if cfg.rollout_dtype == "auto" else cfg.rollout_dtype
    return None if dtype == "float32" else copy.deepcopy(policy).to(getattr(torch, dtype)).requires_grad_(False)


@torch.no_grad()
def rollout(policy, ref, rm, critic, prompt_ids, pad_id, max_new_tokens, temperature, ctx, gen, sampler=None,
            width=None, static=False):
    """Sample responses to prompt_ids (token lists, left-padded with pad_id, the eos, to `width`
    columns, default the longest) and score them: everything PPO needs, on the R response columns:
    mask (B, R) = 1 where a token was generated. In fp32 the policy's log-probs come from the sampling
    step itself (same weights, same temperature: equal to a full forward's to ~1e-6); when `sampler`,
    a low-precision copy of the policy, sampled, or under bf16 autocast, from a scoring forward of
    policy, the same computation as the reference's and the update's (policy_logprobs), so that at
    iteration 0 KL = 0 and ratio = 1 as in fp32. Log-probs and values are 0 past each response's end,
    on every path. ref or critic None: no reference log-probs or values. static: see gpt.generate."""
    x, pm = data.pad_left(prompt_ids, pad_id, width)
    device, P, was_training = next(policy.parameters()).device, x.size(1), policy.training
    x, pm = x.to(device), pm.to(device)
    policy.eval()
    with ctx, onednn.packed(*(m for m in (sampler or policy, ref, rm, critic) if m is not None)):
        tokens, gen_mask, logprobs = generate(sampler or policy, x, pm, max_new_tokens, temperature, eos_id=pad_id,
                                              generator=gen, return_logprobs=True, static=static)
        attn = torch.cat([pm, gen_mask[:, P:]], 1)  # (B, P + R) prompt + response, no padding
        exact = sampler is None and not torch.is_autocast_enabled(device.type)  # the sampling step's log-probs are exact
        logprobs = logprobs[:, P:] if exact else policy_logprobs(policy, tokens, attn, temperature, P - 1)[0]
        ref_logprobs = policy_logprobs(ref, tokens, attn, temperature, P - 1)[0] if ref is not None else None
        scores = rm.score(tokens, attn, first=P - 1).float()  # each row's last token is a response token
        values = critic(tokens, attn, first=P - 1)[:, :-1].float() if critic is not None else None  # V of the state before each token
    policy.train(was_training)
    mask = gen_mask[:, P:].bool()  # (B, R)
    # a scoring forward's log-probs past the end are anything (-120 against the sampler's 0): zeroed, not
    # multiplied by 0, which keeps an inf as a nan
    zero = lambda x: None if x is None else torch.where(mask, x.float(), 0.0)
    return dict(tokens=tokens, attn=attn, mask=mask.float(), logprobs=zero(logprobs), ref_logprobs=zero(ref_logprobs),
                values=zero(values), scores=scores, ended=((tokens == pad_id) & gen_mask.bool()).any(1))


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    after each batch of n rollouts whose mean per-response KL is KL."""

    def __init__(self, value, target, horizon):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl, n):
        self.value *= 1 + max(-0.2, min(0.2, kl / self.target - 1)) * n / self.horizon


class RunningMoments:
    """Running mean and std of all scores seen (Chan et al.'s parallel variance update)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x):
        n, mean, m2 = x.numel(), x.mean().item(), ((x - x.mean()) ** 2).sum().item()
        delta, tot = mean - self.mean, self.n + n
        self.mean += delta * n / tot
        self.m2 += m2 + delta ** 2 * self.n * n / tot
        self.n = tot

    @property
    def std(self):
        return math.sqrt(self.m2 / max(1, self.n - 1)) if self.n > 1 else 1.0


def add_advantages(b, cfg, kl_coef, moments):
    """Rollout batch b -> b["rewards"], b["advantages"] and b["returns"]: scores become per-token
    KL-penalised rewards; then, with cfg.advantage = gae, GAE over the critic's values, whitened over the
    batch's valid tokens; with rloo or grpo, each response's return (its rewards summed: score - kl_coef
    * its KL) against the other responses to its prompt, the same advantage on every token (returns and
    values 0: no critic). A score is normalised by the running moments of all scores (score_norm); then
    a response cut at max_new_tokens (no EOS) scores cfg.truncated_score instead (Huang et al. 2024,
    arXiv:2403.17031 §7, the "EOS trick": the reward model learnt from finished responses, so its score
    at a cut one's last token means nothing), or with truncated_score = nan its own score less
    cfg.missing_eos_penalty. Both come after the normalisation, so their size is the one set, whatever
    the scores' running moments."""
    scores = b["scores"]
    if cfg.score_norm:
        moments.update(scores)
        scores = (scores - moments.mean) / max(moments.std, 1e-8)  # a first batch of equal scores has std 0
    cut = ~b["ended"]  # (B,)
    if math.isnan(cfg.truncated_score):
        scores = scores - cfg.missing_eos_penalty * cut.float()
    else:
        scores = torch.where(cut, cfg.truncated_score, scores)
    b["rewards"] = kl_penalized_rewards(scores, b["logprobs"], b["ref_logprobs"], b["mask"], kl_coef)
    if cfg.advantage == "gae":
        adv, b["returns"] = gae(b["rewards"], b["values"], b["mask"], cfg.gamma, cfg.lam)
        b["advantages"] = whiten(adv, b["mask"])  # per batch, so the policy step size does not follow the reward scale
        return b
    estimator = rloo_advantages if cfg.advantage == "rloo" else grpo_advantages
    adv = estimator(b["rewards"].sum(1), cfg.samples_per_prompt)  # (B,): the KL is in the return, as in both papers' RLHF
    b["advantages"] = adv[:, None] * b["mask"]
    b["values"] = b["returns"] = torch.zeros_like(b["mask"])
    return b


def demo_loss(policy, demos, n, pad_id, g):
    """PPO-ptx's term (InstructGPT §3.5): sft_loss on n demonstrations [(prompt_ids, response_ids)] drawn
    with g, seeded alike on every rank, this rank taking its share [RANK::WORLD] of them. Scaled by the
    rank's share of their response tokens times WORLD (DDP averages gradients over ranks; sft.py does the
    same), so N ranks give one process's gradient on all n; the rollouts' token share weighs the PPO terms."""
    device = next(policy.parameters()).device
    p = data.pad_right([demos[j] for j in torch.randint(len(demos), (n,), generator=g)[RANK::WORLD].tolist()], pad_id)
    x, m = p["tokens"].to(device), p["loss_mask"].to(device)
    k = m[:, 1:].sum()  # the tokens sft_loss averages over
    return sft_loss(policy(x, padded=True), x, m) * (k * WORLD / all_sum(k.clone()))


def kl_per_response(b):
    """KL(policy || reference) on the policy's own samples, summed over each response's tokens:
    k1 = log p - log q (unbiased, but single samples go negative) and k3 = (r - 1) - log r, r = q / p
    (never negative, lower variance; Schulman 2020, http://joschu.net/blog/kl-approx.html). (B,), (B,).
    Tokens where mask = 0 count for nothing, whatever their log-probs (d = 0 there gives k1 = k3 = 0)."""
    d = torch.where(b["mask"].bool(), b["logprobs"] - b["ref_logprobs"], 0)
    return d.sum(1), (torch.exp(-d) - 1 + d).sum(1)


def kl_stats(b):
    """Per-token means of k1 and k3 over the batch's valid tokens, and the mean per-response k1,
    which the adaptive controller targets."""
    k1, k3 = kl_per_response(b)
    n = b["mask"].sum()
    return (k1.sum() / n).item(), (k3.sum() / n).item(), k1.mean().item()


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over valid tokens: 1 = a perfect critic, 0 = no better than a constant;
    nan when the returns are constant over the valid tokens (0 / 0)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    d = returns - values
    return (1 - masked_mean((d - masked_mean(d, mask)) ** 2, mask) / var_r).item()


def seeded(*key, device="cpu"):
    """A generator seeded by a tuple of ints: each iteration's randomness is a function of (seed,
    rank, iteration), so --resume needs no generator state and every rank samples its own."""
    return torch.Generator(device=device).manual_seed(hash(key) % 2 ** 63)


def default_log(path):
    """The logging hook: one printed line, and the full dict appended to the JSON-lines file at `path`
    (out_dir/ppo_metrics.jsonl). Pass your own log(metrics: dict) to train() for wandb or TensorBoard."""
    def log(m):
        append_jsonl(m, path)
        keys = [k for k in ("score", "kl", "k3", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_var",
                            "length", "gold", "win_rate", "gold_win_rate", "kl_coef") if k in m]
        line = " | ".join(f"{k} {m[k]:.3g}" for k in keys)
        timing = f" | rollout {m['rollout_s'] * 1000:.0f} ms | update {m['update_s'] * 1000:.0f} ms | {m['tok_s']:.0f} tok/s" \
            if "rollout_s" in m else ""
        print(f"ppo {m['kind']} {m['iter']}/{m['iters']} | {line}{timing}")
    return log


def responses(batch, tok):
    R = batch["mask"].size(1)
    return [tok.decode([t for t in row[m.bool()].tolist() if t != tok.eot])
            for row, m in zip(batch["tokens"][:, -R:].cpu(), batch["mask"].cpu())]


@torch.no_grad()
def evaluate(policy, ref, rm, prompt_ids, prompts, tok, *, samples, batch, max_new_tokens, temperature, seed, ctx,
             builtin, static=False, samplers=(None, None)):
    """Held-out prompts, `samples` responses each, `batch` prompts at a time: reward-model score and
    KL (per token and per response) of the policy; win rate against the SFT policy `ref` (ties count
    half) by the reward model, and on the built-in task by the gold labeler. samplers: the copies of
    policy and ref that sample (make_sampler), as in training, or None: the model samples itself."""
    device, rows = next(policy.parameters()).device, []
    prompt_ids, prompts = prompt_ids * samples, prompts * samples
    for i in range(0, len(prompt_ids), batch):
        # both sides draw with the same seed: at iteration 0 they sample the same responses (win rate 0.5)
        pol, sft = (rollout(m, r, rm, None, prompt_ids[i:i + batch], tok.eot, max_new_tokens, temperature, ctx,
                            torch.Generator(device=device).manual_seed(seed + i), sampler=s, static=static)
                    for m, r, s in ((policy, ref, samplers[0]), (ref, None, samplers[1])))
        cols = [pol["scores"], sft["scores"], *kl_per_response(pol), pol["mask"].sum(1)]
        if builtin:
            cols += [torch.tensor([data.gold_score(p, r) for p, r in zip(prompts[i:i + batch], responses(b, tok))])
                     for b in (pol, sft)]
        rows.append(torch.stack([c.float().cpu() for c in cols], 1))  # (n, 5 or 7)
    r = torch.cat(rows).T
    win = lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean().item()
    res = dict(score=r[0].mean().item(), sft_score=r[1].mean().item(), win_rate=win(r[0], r[1]),
               kl=(r[2].sum() / r[4].sum()).item(), k3=(r[3].sum() / r[4].sum()).item(), kl_seq=r[2].mean().item(),
               length=r[4].mean().item(), n=len(prompt_ids))
    if builtin:
        res.update(gold=r[5].mean().item(), sft_gold=r[6].mean().item(), gold_win_rate=win(r[5], r[6]))
    return res
