"""
The experience PPO learns from: sample responses from the policy and score them (log-probs under
the policy and the reference, the reward model's score, the critic's values), and evaluate a policy
on held-out prompts against the SFT policy. The math they use is ppo.py's; ppo.py's loop calls them,
bench.py times them.
"""
import torch

import data
import onednn
from gpt import generate
from ppo import kl_per_response, policy_logprobs


@torch.no_grad()
def rollout(policy, ref, rm, critic, prompt_ids, pad_id, max_new_tokens, temperature, ctx, gen, sampler=None,
            width=None, static=False):
    """Sample responses to prompt_ids (token lists, left-padded with pad_id, the eos, to `width`
    columns, default the longest) and score them: everything PPO needs, on the R response columns:
    mask (B, R) = 1 where a token was generated. Log-probs come from the sampling step itself (same
    weights, same temperature) unless `sampler`, a low-precision copy of the policy, sampled: then
    from policy. ref or critic None: no reference log-probs or values. static: see gpt.generate."""
    x, pm = data.pad_left(prompt_ids, pad_id, width)
    device, P, was_training = next(policy.parameters()).device, x.size(1), policy.training
    x, pm = x.to(device), pm.to(device)
    policy.eval()
    with ctx, onednn.packed(*(m for m in (sampler or policy, ref, rm, critic) if m is not None)):
        tokens, gen_mask, logprobs = generate(sampler or policy, x, pm, max_new_tokens, temperature, eos_id=pad_id,
                                              generator=gen, return_logprobs=True, static=static)
        attn = torch.cat([pm, gen_mask[:, P:]], 1)  # (B, P + R) prompt + response, no padding
        logprobs = logprobs[:, P:] if sampler is None else policy_logprobs(policy, tokens, attn, temperature, P - 1)[0]
        ref_logprobs = policy_logprobs(ref, tokens, attn, temperature, P - 1)[0] if ref is not None else None
        scores = rm.score(tokens, attn, first=P - 1).float()  # each row's last token is a response token
        values = critic(tokens, attn, first=P - 1)[:, :-1].float() if critic is not None else None  # V of the state before each token
    policy.train(was_training)
    return dict(tokens=tokens, attn=attn, mask=gen_mask[:, P:].float(), logprobs=logprobs.float(),
                ref_logprobs=ref_logprobs, values=values, scores=scores,
                ended=((tokens == pad_id) & gen_mask.bool()).any(1))


def responses(batch, tok):
    R = batch["mask"].size(1)
    return [tok.decode([t for t in row[m.bool()].tolist() if t != tok.eot])
            for row, m in zip(batch["tokens"][:, -R:].cpu(), batch["mask"].cpu())]


@torch.no_grad()
def evaluate(policy, ref, rm, prompt_ids, prompts, tok, *, samples, batch, max_new_tokens, temperature, seed, ctx,
             builtin, static=False):
    """Held-out prompts, `samples` responses each, `batch` prompts at a time: reward-model score and
    KL (per token and per response) of the policy; win rate against the SFT policy `ref` (ties count
    half) by the reward model, and on the built-in task by the gold labeler."""
    device, rows = next(policy.parameters()).device, []
    prompt_ids, prompts = prompt_ids * samples, prompts * samples
    for i in range(0, len(prompt_ids), batch):
        # both sides draw with the same seed: at iteration 0 they sample the same responses (win rate 0.5)
        pol, sft = (rollout(m, r, rm, None, prompt_ids[i:i + batch], tok.eot, max_new_tokens, temperature, ctx,
                            torch.Generator(device=device).manual_seed(seed + i), static=static)
                    for m, r in ((policy, ref), (ref, None)))
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
