"""
The experience PPO learns from: sample responses from the policy and score them (log-probs under
the policy and the reference, the reward model's score, the critic's values), measure the KL to the
reference, and evaluate a policy on held-out prompts against the SFT policy.
ppo.py calls these; bench.py times them.
"""
import torch
from torch.nn import functional as F

import data
from gpt import generate


def token_logprobs(logits, tokens):
    """log softmax(logits)[..., tokens]: the log-probability of each token under its logits.
    logits: (B, T, V), tokens: (B, T) -> (B, T). No shift inside: the caller aligns them
    (logits[:, :-1] with tokens[:, 1:])."""
    return torch.gather(F.log_softmax(logits, -1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def policy_logprobs(model, tokens, attn, temperature, start=0):
    """Log-probs (B, T-1-start) of tokens[:, start+1:] at the sampling temperature (the distribution
    the tokens were drawn from), and the tempered logits (B, T-1-start, V) they came from. With
    start = P - 1 (P prompt columns) that is the response tokens only, and the LM head skips the prompt."""
    logits = model(tokens, attn, first=start)[:, :-1] / temperature
    return token_logprobs(logits, tokens[:, start + 1:]), logits


@torch.no_grad()
def rollout(policy, ref, rm, critic, prompt_ids, tok, cfg, ctx, gen, sampler=None, width=None):
    """Sample responses to prompt_ids (token lists, left-padded to `width` columns, default the
    longest) and score them: everything PPO needs, on the R response columns: mask (B, R) = 1 where
    a token was generated. Log-probs come from the sampling step itself (same weights, same
    temperature) unless `sampler`, a low-precision copy of the policy, sampled: then from policy.
    ref or critic None: no reference log-probs or values."""
    x, pm = data.pad_left(prompt_ids, tok.eot, width)
    device, P, was_training = next(policy.parameters()).device, x.size(1), policy.training
    x, pm = x.to(device), pm.to(device)
    policy.eval()
    with ctx:
        tokens, gen_mask, logprobs = generate(sampler or policy, x, pm, cfg.max_new_tokens, cfg.temperature,
                                              eos_id=tok.eot, generator=gen, return_logprobs=True)
        attn = torch.cat([pm, gen_mask[:, P:]], 1)  # (B, P + R) prompt + response, no padding
        logprobs = logprobs[:, P:] if sampler is None else policy_logprobs(policy, tokens, attn, cfg.temperature, P - 1)[0]
        ref_logprobs = policy_logprobs(ref, tokens, attn, cfg.temperature, P - 1)[0] if ref is not None else None
        scores = rm.score(tokens, attn, first=P - 1).float()  # each row's last token is a response token
        values = critic(tokens, attn, first=P - 1)[:, :-1].float() if critic is not None else None  # V of the state before each token
    policy.train(was_training)
    return dict(tokens=tokens, attn=attn, mask=gen_mask[:, P:].float(), logprobs=logprobs.float(),
                ref_logprobs=ref_logprobs, values=values, scores=scores,
                ended=((tokens == tok.eot) & gen_mask.bool()).any(1))


def responses(batch, tok):
    R = batch["mask"].size(1)
    return [tok.decode([t for t in row[m.bool()].tolist() if t != tok.eot])
            for row, m in zip(batch["tokens"][:, -R:].cpu(), batch["mask"].cpu())]


def kl_per_response(b):
    """KL(policy || reference) on the policy's own samples, summed over each response's tokens:
    k1 = log p - log q (unbiased, but single samples go negative) and k3 = (r - 1) - log r, r = q / p
    (never negative, lower variance; Schulman 2020, http://joschu.net/blog/kl-approx.html). (B,), (B,)."""
    d = (b["logprobs"] - b["ref_logprobs"]) * b["mask"]
    return d.sum(1), ((torch.exp(-d) - 1 + d) * b["mask"]).sum(1)


def kl_stats(b):
    """Per-token means of k1 and k3 over the batch's valid tokens, and the mean per-response k1,
    which the adaptive controller targets."""
    k1, k3 = kl_per_response(b)
    n = b["mask"].sum()
    return (k1.sum() / n).item(), (k3.sum() / n).item(), k1.mean().item()


@torch.no_grad()
def evaluate(policy, ref, rm, prompt_ids, prompts, tok, cfg, ctx, builtin):
    """Held-out prompts, eval_samples responses each: reward-model score and KL (per token and per
    response) of the policy; win rate against the SFT policy (ties count half) by the reward model,
    and on the built-in task by the gold labeler."""
    device, rows, n = next(policy.parameters()).device, [], cfg.rollout_batch
    prompt_ids, prompts = prompt_ids * cfg.eval_samples, prompts * cfg.eval_samples
    for i in range(0, len(prompt_ids), n):
        # both sides draw with the same seed: at iteration 0 they sample the same responses (win rate 0.5)
        pol, sft = (rollout(m, r, rm, None, prompt_ids[i:i + n], tok, cfg, ctx,
                            torch.Generator(device=device).manual_seed(cfg.seed + i)) for m, r in ((policy, ref), (ref, None)))
        cols = [pol["scores"], sft["scores"], *kl_per_response(pol), pol["mask"].sum(1)]
        if builtin:
            cols += [torch.tensor([data.gold_score(p, r) for p, r in zip(prompts[i:i + n], responses(b, tok))]) for b in (pol, sft)]
        rows.append(torch.stack([c.float().cpu() for c in cols], 1))  # (n, 5 or 7)
    r = torch.cat(rows).T
    win = lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean().item()
    res = dict(score=r[0].mean().item(), sft_score=r[1].mean().item(), win_rate=win(r[0], r[1]),
               kl=(r[2].sum() / r[4].sum()).item(), k3=(r[3].sum() / r[4].sum()).item(), kl_seq=r[2].mean().item(),
               length=r[4].mean().item(), n=len(prompt_ids))
    if builtin:
        res.update(gold=r[5].mean().item(), sft_gold=r[6].mean().item(), gold_win_rate=win(r[5], r[6]))
    return res
