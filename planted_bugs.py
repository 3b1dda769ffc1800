"""
Typical student mistakes in the exercises of make_exercises.py, each planted in a copy of the reference
by test_exercises.py, which checks that the exercise's own `pytest -k` line (EXERCISES.md) fails on it
with a test that passes on the reference: (name, file, reference snippet, the mistake). Each snippet
occurs once in its file; a bug belongs to the exercise whose body holds its snippet (the two of
position_ids and last_index, outside every exercise, need only the suite to catch them). Every
exercise holds several. Kinds: sign, factor and shift; mask and reduction; the wrong centre or branch
of a clip; overflow for large inputs; lost dtype; a detached graph; state changed that is not the
function's. Out of the skeleton: it quotes the reference. `python test_exercises.py` reports the rates.
"""
import os

import make_exercises as mx

ATTN_SCORES = "            att = (q @ k.transpose(-2, -1)) * k.size(-1) ** -0.5  # (B, nh, T, T)\n"
FUTURE = "torch.ones(T, T, dtype=torch.bool).triu(1)"  # True above the diagonal: the keys a query must not see

BUGS = [
    # gpt.py KVCache.update
    ("KV cache: every step written at position 0", "gpt.py",
     "self.k[layer, :, :, self.pos:end] = k", "self.k[layer, :, :, :k.size(2)] = k"),
    ("KV cache: update advances pos itself (GPT.hidden does, once, after the last layer)", "gpt.py",
     "        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]",
     "        self.pos = end\n        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]"),
    ("KV cache: returns this step's keys and values only", "gpt.py",
     "        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]", "        return k, v"),
    ("KV cache: keys and values swapped", "gpt.py",
     "self.k[layer, :, :, self.pos:end] = k\n        self.v[layer, :, :, self.pos:end] = v",
     "self.k[layer, :, :, self.pos:end] = v\n        self.v[layer, :, :, self.pos:end] = k"),
    ("KV cache: every layer written into layer 0", "gpt.py",
     "self.k[layer, :, :, self.pos:end] = k\n        self.v[layer, :, :, self.pos:end] = v",
     "self.k[0, :, :, self.pos:end] = k\n        self.v[0, :, :, self.pos:end] = v"),
    # gpt.py CausalSelfAttention.forward
    ("attention: no causal mask", "gpt.py", "F.scaled_dot_product_attention(q, k, v, is_causal=True)",
     "F.scaled_dot_product_attention(q, k, v)"),
    ("attention: scores scaled by 1/hs, not 1/sqrt(hs)", "gpt.py", "(q, k, v, is_causal=True)",
     "(q, k, v, is_causal=True, scale=1.0 / k.size(-1))"),
    ("attention: padding mask ignored", "gpt.py", "F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
     "F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) == k.size(2))"),
    ("attention: mask read as True = masked", "gpt.py", "(q, k, v, attn_mask=mask)", "(q, k, v, attn_mask=~mask)"),
    ("attention: with a cache, the causal mask aligned at the top left, not the right", "gpt.py",
     "(q, k, v, attn_mask=mask)",
     "(q, k, v, attn_mask=mask & torch.ones(T, k.size(2), dtype=torch.bool, device=q.device).tril())"),
    ("attention: heads split without the transpose", "gpt.py",
     "q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)", "q = q.view(B, self.n_head, T, C // self.n_head)"),
    ("attention: q, k, v rounded to float32", "gpt.py", "q, k, v = self.c_attn(x).split(C, dim=2)",
     "q, k, v = self.c_attn(x).float().to(x.dtype).split(C, dim=2)"),
    ("attention: heads merged without the transpose back", "gpt.py",
     "y = y.transpose(1, 2).contiguous().view(B, T, C)", "y = y.contiguous().view(B, T, C)"),
    ("attention: softmax over the queries, not the keys", "gpt.py",
     "            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)\n",
     ATTN_SCORES + f"            y = torch.softmax(att.masked_fill({FUTURE}, float('-inf')), dim=-2) @ v\n"),
    ("attention: softmax by hand without subtracting the max (overflows)", "gpt.py",
     "            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)\n",
     ATTN_SCORES + f"            att = att.masked_fill({FUTURE}, float('-inf')).exp()\n"
     "            y = att / att.sum(-1, keepdim=True) @ v\n"),
    # sft.py sft_loss
    ("sft_loss: logits/labels shift missing", "sft.py",
     "targets = torch.roll(tokens, -1, dims=1)", "targets = tokens"),
    ("sft_loss: averaged over prompt and padding tokens", "sft.py",
     "return (nll * m).sum() / m.sum()", "return nll.mean()"),
    ("sft_loss: the mean of per-row means", "sft.py", "return (nll * m).sum() / m.sum()",
     "m, nll = m.view(tokens.shape), nll.view(tokens.shape)\n    return ((nll * m).sum(1) / m.sum(1)).mean()"),
    ("sft_loss: mask not shifted with the labels", "sft.py",
     "m = torch.roll(loss_mask, -1, dims=1)", "m = loss_mask.clone()"),
    ("sft_loss: roll wraps token 0's mask onto the last position", "sft.py",
     "    m[:, -1] = 0  # the last position predicts nothing (roll wrapped the first token there)\n", ""),
    ("sft_loss: computed in float32", "sft.py", "F.cross_entropy(logits.reshape(-1, V),",
     "F.cross_entropy(logits.float().reshape(-1, V),"),
    ("sft_loss: log of softmax (underflows)", "sft.py",
     'F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")',
     "-torch.softmax(logits.reshape(-1, V), -1).log().gather(1, targets.reshape(-1, 1)).squeeze(1)"),
    ("sft_loss: shifts the caller's loss_mask in place", "sft.py", "m = torch.roll(loss_mask, -1, dims=1)",
     "m = loss_mask\n    m[:, :-1] = loss_mask[:, 1:].clone()"),
    # reward.py preference_loss
    ("preference_loss: difference reversed", "reward.py",
     "F.logsigmoid(r_chosen - r_rejected)", "F.logsigmoid(r_rejected - r_chosen)"),
    ("preference_loss: sum over pairs, not mean", "reward.py",
     "-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid(r_chosen - r_rejected).sum()"),
    ("preference_loss: minus sign missing", "reward.py",
     "-F.logsigmoid(r_chosen - r_rejected).mean()", "F.logsigmoid(r_chosen - r_rejected).mean()"),
    ("preference_loss: log of sigmoid (underflows)", "reward.py",
     "-F.logsigmoid(r_chosen - r_rejected).mean()", "-torch.sigmoid(r_chosen - r_rejected).log().mean()"),
    ("preference_loss: computed in float32", "reward.py",
     "-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid((r_chosen - r_rejected).float()).mean()"),
    # ppo.py token_logprobs
    ("token_logprobs: log of softmax (underflows)", "ppo.py", "F.log_softmax(logits, -1), -1,",
     "torch.softmax(logits, -1).log(), -1,"),
    ("token_logprobs: log-softmax over positions, not the vocabulary", "ppo.py", "F.log_softmax(logits, -1), -1,",
     "F.log_softmax(logits, 1), -1,"),
    ("token_logprobs: logsumexp by hand without the max (overflows)", "ppo.py", "F.log_softmax(logits, -1), -1,",
     "logits - logits.exp().sum(-1, keepdim=True).log(), -1,"),
    ("token_logprobs: squeeze() drops every size-1 dimension", "ppo.py",
     "tokens.unsqueeze(-1)).squeeze(-1)", "tokens.unsqueeze(-1)).squeeze()"),
    # ppo.py kl_penalized_rewards
    ("kl_penalized_rewards: KL sign flipped", "ppo.py",
     "rewards = -kl_coef * (logprobs - ref_logprobs)", "rewards = kl_coef * (logprobs - ref_logprobs)"),
    ("kl_penalized_rewards: KL penalty on padding", "ppo.py",
     "rewards = -kl_coef * (logprobs - ref_logprobs) * mask", "rewards = -kl_coef * (logprobs - ref_logprobs)"),
    ("kl_penalized_rewards: score at the last column, not each row's last token", "ppo.py",
     "last = last_index(mask)", "last = torch.full_like(last_index(mask), mask.size(1) - 1)"),
    ("kl_penalized_rewards: score at sum(mask) - 1 (wrong under left padding)", "ppo.py",
     "last = last_index(mask)", "last = mask.long().sum(1) - 1"),
    ("kl_penalized_rewards: score replaces the last token's KL penalty", "ppo.py",
     "rewards.scatter_add(1, last[:, None]", "rewards.scatter(1, last[:, None]"),
    ("kl_penalized_rewards: score added at every valid token", "ppo.py",
     "return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))",
     "return rewards + scores[:, None].to(rewards.dtype) * mask"),
    # ppo.py gae
    ("gae: bootstraps past the end of a response", "ppo.py",
     "values, rewards = values * mask, rewards * mask", "rewards = rewards * mask"),
    ("gae: lambda forgotten in the recursion", "ppo.py", "gamma * lam * next_adv", "gamma * next_adv"),
    ("gae: gamma missing from the TD error", "ppo.py",
     "delta = rewards[:, t] + gamma * next_v - values[:, t]", "delta = rewards[:, t] + next_v - values[:, t]"),
    ("gae: advantages on padding not zeroed", "ppo.py",
     "next_adv = (delta + gamma * lam * next_adv) * mask[:, t]", "next_adv = delta + gamma * lam * next_adv"),
    ("gae: recursion run forwards", "ppo.py",
     "for t in reversed(range(rewards.size(1))):", "for t in range(rewards.size(1)):"),
    ("gae: advantages allocated in float32", "ppo.py", "adv = torch.zeros_like(rewards)",
     "adv = torch.zeros(rewards.shape)"),
    # ppo.py whiten
    ("whiten: statistics over padding", "ppo.py",
     "mean = masked_mean(x, mask)\n    var = masked_mean((x - mean) ** 2, mask)",
     "mean = x.mean()\n    var = ((x - mean) ** 2).mean()"),
    ("whiten: padding not zeroed", "ppo.py", "        out = out + mean\n    return out * mask",
     "        out = out + mean\n    return out"),
    ("whiten: unbiased variance (n - 1)", "ppo.py", "var = masked_mean((x - mean) ** 2, mask)",
     "var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1)"),
    ("whiten: divided by std + eps, not sqrt(var + eps)", "ppo.py",
     "out = (x - mean) * torch.rsqrt(var + 1e-8)", "out = (x - mean) / (var.sqrt() + 1e-8)"),
    ("whiten: statistics per row", "ppo.py", "mean = masked_mean(x, mask)\n",
     "mean = (x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)\n"),
    ("whiten: shift_mean=False leaves the mean out", "ppo.py", "        out = out + mean\n", "        out = out * 1\n"),
    # ppo.py ppo_policy_loss
    ("ppo_policy_loss: ratio detached", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(logprobs - old_logprobs).detach()"),
    ("ppo_policy_loss: ratio inverted", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(old_logprobs - logprobs)"),
    ("ppo_policy_loss: old log-probs forgotten in the ratio", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(logprobs)"),
    ("ppo_policy_loss: ratio as exp(logprobs) / exp(old_logprobs) (underflows)", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(logprobs) / torch.exp(old_logprobs)"),
    ("ppo_policy_loss: min instead of max", "ppo.py",
     "torch.max(-advantages * ratio, -advantages * clipped)", "torch.min(-advantages * ratio, -advantages * clipped)"),
    ("ppo_policy_loss: clipped term alone", "ppo.py",
     "torch.max(-advantages * ratio, -advantages * clipped)", "-advantages * clipped"),
    ("ppo_policy_loss: clip on one side only", "ppo.py",
     "torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)", "torch.clamp(ratio, max=1 + clip_eps)"),
    ("ppo_policy_loss: log-ratio clipped to +-eps", "ppo.py", "torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)",
     "torch.clamp(logprobs - old_logprobs, -clip_eps, clip_eps).exp()"),
    ("ppo_policy_loss: mean over padding", "ppo.py",
     "masked_mean(torch.max(-advantages * ratio, -advantages * clipped), mask)",
     "torch.max(-advantages * ratio, -advantages * clipped).mean()"),
    ("ppo_policy_loss: the mean of per-row means", "ppo.py",
     "masked_mean(torch.max(-advantages * ratio, -advantages * clipped), mask)",
     "((torch.max(-advantages * ratio, -advantages * clipped) * mask).sum(1) / mask.sum(1)).mean()"),
    # ppo.py value_loss
    ("value_loss: clipped around the returns, not the old values", "ppo.py",
     "old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)",
     "returns + torch.clamp(values - returns, -clip_eps, clip_eps)"),
    ("value_loss: V clipped to [1 - eps, 1 + eps], not around V_old", "ppo.py",
     "old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)",
     "torch.clamp(values, 1 - clip_eps, 1 + clip_eps)"),
    ("value_loss: V clipped to V_old * [1 - eps, 1 + eps], like the ratio", "ppo.py",
     "old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)",
     "old_values * torch.clamp(values / old_values, 1 - clip_eps, 1 + clip_eps)"),
    ("value_loss: min instead of max", "ppo.py", "torch.max((values - returns) ** 2", "torch.min((values - returns) ** 2"),
    ("value_loss: the 0.5 forgotten", "ppo.py", "return 0.5 * masked_mean(", "return masked_mean("),
    ("value_loss: clipped term alone", "ppo.py",
     "masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)",
     "masked_mean((clipped - returns) ** 2, mask)"),
    ("value_loss: mean over padding", "ppo.py",
     "masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)",
     "torch.max((values - returns) ** 2, (clipped - returns) ** 2).mean()"),
    # ppo.py entropy
    ("entropy: sign flipped", "ppo.py", "-(logp.exp() * logp).sum(-1)", "(logp.exp() * logp).sum(-1)"),
    ("entropy: mean over the vocabulary, not sum", "ppo.py", "-(logp.exp() * logp).sum(-1)",
     "-(logp.exp() * logp).mean(-1)"),
    ("entropy: -sum p * logits (the log-normaliser missing)", "ppo.py", "-(logp.exp() * logp).sum(-1)",
     "-(logp.exp() * logits).sum(-1)"),
    ("entropy: computed from detached logits", "ppo.py", "logp = F.log_softmax(logits, -1)",
     "logp = F.log_softmax(logits.detach(), -1)"),
    ("entropy: log of softmax (0 * log 0 = nan for large logits)", "ppo.py", "logp = F.log_softmax(logits, -1)",
     "logp = torch.softmax(logits, -1).log()"),
    ("entropy: log-softmax in float32", "ppo.py", "logp = F.log_softmax(logits, -1)",
     "logp = F.log_softmax(logits.float(), -1)"),
    ("entropy: mean over padding", "ppo.py", "masked_mean(-(logp.exp() * logp).sum(-1), mask)",
     "(-(logp.exp() * logp).sum(-1)).mean()"),
    # ppo.py ppo_loss
    ("ppo_loss: entropy bonus added to the loss", "ppo.py", "- ent_coef * entropy(logits, mask)",
     "+ ent_coef * entropy(logits, mask)"),
    ("ppo_loss: PPO-ptx term detached", "ppo.py", "loss + ptx_coef * ptx_loss", "loss + ptx_coef * ptx_loss.detach()"),
    ("ppo_loss: ptx_coef not applied", "ppo.py", "loss + ptx_coef * ptx_loss", "loss + ptx_loss"),
    ("ppo_loss: vf_coef not applied", "ppo.py", "+ vf_coef * value_loss(", "+ value_loss("),
    ("ppo_loss: value loss subtracted", "ppo.py", "+ vf_coef * value_loss(", "- vf_coef * value_loss("),
    ("ppo_loss: the value clip from clip_eps, not vf_clip", "ppo.py",
     "value_loss(values, old_values, returns, mask, vf_clip)", "value_loss(values, old_values, returns, mask, clip_eps)"),
    # grads.py sft_loss_grad
    ("sft_loss_grad: shifted the wrong way", "grads.py", "grad[:, :-1] = (p - onehot)", "grad[:, 1:] = (p - onehot)"),
    ("sft_loss_grad: mask not shifted with the labels", "grads.py", "m = loss_mask[:, 1:].to(logits.dtype)",
     "m = loss_mask[:, :-1].to(logits.dtype)"),
    ("sft_loss_grad: divided by every position, not by the response tokens", "grads.py", "(m / m.sum())",
     "(m / m.numel())"),
    ("sft_loss_grad: allocated in float32", "grads.py", "grad = torch.zeros_like(logits)",
     "grad = torch.zeros(logits.shape)"),
    ("sft_loss_grad: softmax by hand (overflows)", "grads.py", "p = torch.softmax(logits[:, :-1], -1)",
     "p = logits[:, :-1].exp() / logits[:, :-1].exp().sum(-1, keepdim=True)"),
    ("sft_loss_grad: roll wraps token 0 onto the last position", "grads.py",
     "    grad = torch.zeros_like(logits)\n    grad[:, :-1] = (p - onehot) * (m / m.sum())[..., None]\n",
     "    m = torch.roll(loss_mask, -1, 1).to(logits.dtype)\n"
     "    onehot = F.one_hot(torch.roll(tokens, -1, 1), V).to(logits.dtype)\n"
     "    grad = (torch.softmax(logits, -1) - onehot) * (m / m.sum())[..., None]\n"),
    # grads.py preference_loss_grad
    ("preference_loss_grad: same sign for both rewards", "grads.py", "return -g, g", "return -g, -g"),
    ("preference_loss_grad: sigmoid(r_c - r_r), not sigmoid(r_r - r_c)", "grads.py",
     "torch.sigmoid(r_rejected - r_chosen)", "torch.sigmoid(r_chosen - r_rejected)"),
    ("preference_loss_grad: the 1/N missing", "grads.py", "torch.sigmoid(r_rejected - r_chosen) / r_chosen.numel()",
     "torch.sigmoid(r_rejected - r_chosen)"),
    ("preference_loss_grad: sigmoid by hand (overflows)", "grads.py", "torch.sigmoid(r_rejected - r_chosen)",
     "torch.exp(r_rejected - r_chosen) / (1 + torch.exp(r_rejected - r_chosen))"),
    # grads.py ppo_policy_loss_grad
    ("ppo_policy_loss_grad: clip ignored for negative advantages", "grads.py",
     "clipped = ((advantages > 0) & (rho > 1 + clip_eps)) | ((advantages < 0) & (rho < 1 - clip_eps))",
     "clipped = (advantages > 0) & (rho > 1 + clip_eps)"),
    ("ppo_policy_loss_grad: zero whenever the ratio is outside the clip", "grads.py",
     "clipped = ((advantages > 0) & (rho > 1 + clip_eps)) | ((advantages < 0) & (rho < 1 - clip_eps))",
     "clipped = (rho > 1 + clip_eps) | (rho < 1 - clip_eps)"),
    ("ppo_policy_loss_grad: ratio computed in float32", "grads.py", "rho = torch.exp(logprobs - old_logprobs)",
     "rho = torch.exp((logprobs - old_logprobs).float())"),
    ("ppo_policy_loss_grad: the factor rho missing", "grads.py", "return -advantages * rho *", "return -advantages *"),
    ("ppo_policy_loss_grad: padding not masked", "grads.py", "* mask / mask.sum()", "/ mask.sum()"),
    ("ppo_policy_loss_grad: divided by every entry", "grads.py", "/ mask.sum()", "/ mask.numel()"),
    # outside the exercises: the reference's own code, which the suite must guard too
    ("position ids ignore left padding", "gpt.py", "return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
     "return torch.arange(attention_mask.size(1), device=attention_mask.device).expand_as(attention_mask)"),
    ("reward read at sum(mask) - 1 (wrong under left padding)", "data.py",
     "return T - 1 - mask.flip(1).long().argmax(1)", "return mask.long().sum(1) - 1"),
]


def owner(bug):
    """(exercise, its -k line) whose reference body holds the bug's snippet, or (None, None)."""
    _, file, old, _ = bug
    for f, name, *_, k in mx.EXERCISES:
        if f == file:
            text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f)).read()
            start, end, _ = mx.body_span(text, f, name)
            if old in "".join(text.splitlines(keepends=True)[start:end]):
                return name, k
    return None, None
