"""
Stage 3 of 3: PPO against the reward model, with a frozen reference (the SFT policy), a
per-token KL penalty, an entropy bonus, a value function and GAE.
References: Ziegler et al. 2019 (arXiv:1909.08593); Ouyang et al. 2022 (InstructGPT);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO" (arXiv:2403.17031).

    python ppo.py                       # after python sft.py && python reward.py
    python ppo.py --kl_coef=0           # no KL penalty: watch the proxy reward and the gold score part
    torchrun --standalone --nproc_per_node=4 ppo.py   # 4 processes, each rolling out a quarter of the prompts
"""
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

import data
import onednn
from data import batch_indices, last_index
from ddp import RANK, WORLD, all_gather_rows, all_sum, any_rank, barrier, ddp_init, ddp_main, ddp_wrap, save_and_exit
from hf import load_checkpoint, load_weights, save_checkpoint
from util import (GracefulStop, UserError, autocast, check_common, check_finite, check_out_dir, compile_for_lengths,
                  get_device, load_optimizer, main_guard, make_optimizer, metrics_file, parse_config, resume_at,
                  write_json)


@dataclass
class Config:
    NONFINITE = ("truncated_score",)  # the one setting nan may be given to (util.parse_config)
    data: str = "builtin"  # builtin | hh-rlhf | a file (.jsonl, .json, .csv, .tsv; .gz too) whose prompts are used
    sft_ckpt: str = "out/sft.pt"  # policy init and the frozen reference
    reward_ckpt: str = "out/reward.pt"  # the frozen reward model; also the critic's init
    out_dir: str = "out"  # writes ppo.pt, ppo_metrics.jsonl, ppo_eval.json
    iters: int = 75  # PPO iterations (one rollout batch + its update epochs each)
    rollout_batch: int = 64  # responses sampled per iteration (rollout_batch / samples_per_prompt prompts)
    advantage: str = "gae"  # gae (PPO's critic) | rloo | grpo: critic-free, from samples_per_prompt >= 2 per prompt
    samples_per_prompt: int = 1  # k responses to each prompt (RLOO's and GRPO's group)
    minibatch: int = 16  # rollouts per gradient step; must divide rollout_batch (both: by the processes too)
    ppo_epochs: int = 4  # passes over each rollout batch
    max_prompt_len: int = 12  # prompts keep their last max_prompt_len tokens
    max_new_tokens: int = 12  # response length cap
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    rollout_dtype: str = "auto"  # auto (= the training dtype) | float32 | bfloat16 | float16: weights of the copy that samples
    cuda_graph: bool = True  # CUDA: sample with a static KV cache, each decode step one CUDA graph replay
    compile: bool = False  # torch.compile the policy and the critic for the update, one graph for all lengths
    lr: float = 1e-4  # policy learning rate (constant); 3e-4 was less steady on the built-in task
    vf_lr: float = 3e-4  # critic learning rate (constant)
    clip_eps: float = 0.2  # PPO ratio clip
    vf_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.5  # weight of the value loss
    ent_coef: float = 0.0  # weight of the entropy bonus; 0.001 and 0.01 gained no gold on the built-in task (README)
    gamma: float = 1.0  # discount; 1 for episodes of a dozen tokens
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.1  # per-token KL penalty beta (the start value with adaptive_kl); 0 = off
    adaptive_kl: bool = False  # Ziegler et al.'s controller drives the per-sequence KL to kl_target
    kl_target: float = 0.0  # target KL per response (nats), with adaptive_kl only
    kl_horizon: int = 10000  # controller horizon, in rollouts
    kl_max: float = 50.0  # warn when the mean per-response KL exceeds this
    truncated_score: float = -1.0  # score of a response cut at max_new_tokens, unseen by the RM (README); nan = the RM's
    missing_eos_penalty: float = 0.0  # with truncated_score=nan: subtracted from a cut response's score, after score_norm
    score_norm: bool = False  # divide scores by their running std (after subtracting the running mean)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the SFT loss on demonstrations mixed into each step
    grad_clip: float = 1.0  # max global gradient norm per model; 0 = off
    eval_interval: int = 25  # iterations between evaluations + checkpoints
    eval_prompts: int = 256  # held-out prompts per evaluation (the built-in task has 48)
    eval_samples: int = 4  # samples per held-out prompt
    seed: int = 0  # prompts order and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA GPUs from Ampere on, else fp32) | float32 | bfloat16
    resume: bool = False  # continue from out_dir/ppo.pt

# -----------------------------------------------------------------------------
# the math: each function is one object of the PPO objective

def token_logprobs(logits, tokens):
    """log softmax(logits)[..., tokens]: the log-probability of each token under its logits.
    logits: (B, T, V), tokens: (B, T) -> (B, T), of logits' dtype and device, finite for large logits
    (+-1000) and with -inf columns: policy_logprobs passes gpt.GPT.head's padded=True logits, -inf past
    the vocabulary, where no token is (a one-hot product would read 0 * -inf = nan in them). No shift
    inside: the caller aligns them (logits[:, :-1] with tokens[:, 1:]). Give it float32 logits: a bf16
    log-softmax over 50257 columns is off by up to ~0.07 nats (policy_logprobs upcasts)."""
    return torch.gather(F.log_softmax(logits, -1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def policy_logprobs(model, tokens, attn, temperature, start=0):
    """Log-probs (B, T-1-start) of tokens[:, start+1:] at the sampling temperature (the distribution
    the tokens were drawn from), and the tempered logits (B, T-1-start, V) they came from. With
    start = P - 1 (P prompt columns) that is the response tokens only, and the LM head skips the prompt.
    Both come out in float32 (or float64) whatever the model's precision (the log-softmax of bf16 logits is off
    by up to ~0.05), so that the rollout, the reference and the update compute them alike. The log-softmax
    runs over the head's padded columns (gpt.GPT.head), each row 16-byte aligned: over 50257 columns an
    H200 gave a row other bits at another place in the batch (a GPU reads a row in vectors from its first
    aligned address), and the first PPO ratio came out 1 ulp off 1."""
    if not temperature > 0:  # 0 (greedy) has no log-probs: a nan from every row, silently
        raise ValueError(f"policy_logprobs: temperature={temperature}: must be > 0")
    logits = model(tokens, attn, first=start, padded=True)[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32, fp64 stays
    V = getattr(model, "module", model).config.vocab_size  # DDP's model is its .module
    return token_logprobs(logits, tokens[:, start + 1:]), logits[..., :V]


def masked_mean(x, mask):
    """sum(x * mask) / sum(mask) over every entry, mask 0/1. x, mask: same shape. Returns a scalar.
    Entries where mask = 0 are dropped, not multiplied by 0: inf * 0 = nan, and nothing there counts.
    Every entry masked: 0 / 0 = nan."""
    return torch.where(mask.bool(), x, 0).sum() / mask.sum()


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards: r_t = -kl_coef * (logprobs_t - ref_logprobs_t) on valid tokens
    (mask = 1), 0 elsewhere whatever the log-probs there (inf * 0 would be nan), plus scores[b] added
    at each row's last valid token (every row has one). scores: (B,); logprobs, ref_logprobs, mask:
    (B, T). Returns (B, T), of the log-probs' dtype and device (scores are cast to it)."""
    rewards = torch.where(mask.bool(), -kl_coef * (logprobs - ref_logprobs), 0)
    last = last_index(mask)  # (B,)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016). rewards, values, mask: (B, T); each
    row's valid tokens (mask = 1) are one run, its response; rewards and values count as 0 where
    mask = 0, whatever they hold there (even inf or nan). delta_t = r_t + gamma * V_{t+1} - V_t, so
    V = 0 after each row's last valid token; A_t = sum_l (gamma * lam)^l * delta_{t+l} over the valid
    positions from t on; returns = A + V. Returns (advantages, returns), both (B, T), 0 where mask = 0,
    on rewards' device; the advantages of rewards' dtype, the returns of A + V's."""
    values, rewards = (torch.where(mask.bool(), x, 0) for x in (values, rewards))
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_v = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):  # T is a response length: a short Python loop
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
        next_v = values[:, t]
    return adv, torch.where(mask.bool(), adv + values, 0)


def rloo_advantages(returns, k):
    """RLOO, REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740): the baseline of each
    response is the mean return of the other k - 1 responses to its prompt.
    returns: (B,) one return per response, B = n_prompts * k, the k responses of a prompt in adjacent
    rows. A_i = R_i - (sum_j R_j - R_i) / (k - 1) over its group, k >= 2. Returns (B,), R's dtype."""
    r = returns.view(-1, k)  # (n_prompts, k)
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def grpo_advantages(returns, k, eps=1e-4):
    """GRPO's group-normalised advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2):
    A_i = (R_i - mean(R_group)) / (std(R_group) + eps), std with Bessel's correction (n - 1), over the
    k >= 2 responses to the same prompt. returns: (B,), B = n_prompts * k, groups in adjacent rows.
    A group whose returns are all equal gets 0, to rounding (nothing to learn from it). Returns (B,), R's dtype."""
    r = returns.view(-1, k)  # (n_prompts, k): a prompt's responses in a row
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def whiten(x, mask, shift_mean=True):
    """Normalise over valid entries: (x - mean) / sqrt(var + 1e-8), mean = masked_mean(x),
    var = masked_mean((x - mean)^2). With shift_mean=False the mean is added back (only the
    scale changes). Entries where mask = 0 are 0 in the output, whatever x holds there (even inf).
    x, mask: (B, T) -> (B, T), of x's dtype and device."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """Clipped surrogate: masked mean of max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)),
    rho = exp(logprobs - old_logprobs). All (B, T); old_logprobs and advantages are constants of
    the rollout. Returns a scalar (a loss: minimised) of the inputs' dtype and device. Where mask = 0,
    rho = 1 whatever the log-probs there: exp(-5 - (-120)) = inf would make a nan gradient (0 * inf)
    even if the mean dropped it."""
    logprobs, old_logprobs = (torch.where(mask.bool(), x, 0.0) for x in (logprobs, old_logprobs))
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    return masked_mean(torch.max(-advantages * ratio, -advantages * clipped), mask)


def value_loss(values, old_values, returns, mask, clip_eps):
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).
    values V, old_values V_old (the rollout's), returns R, mask: (B, T). Returns a scalar of the
    inputs' dtype and device. Where mask = 0 the inputs count as 0 whatever they hold: a nan there would
    reach the gradient through the square even if the mean dropped the entry."""
    values, old_values, returns = (torch.where(mask.bool(), x, 0.0) for x in (values, old_values, returns))
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy(logits, mask):
    """Masked mean over tokens of the entropy H = -sum_v p_v log p_v, p = softmax(logits).
    logits: (B, T, V), mask: (B, T). Returns a scalar of the inputs' dtype and device, finite for large
    logits (+-1000) and, with its gradient, for -inf logits (a padded head's columns, a top-k cut):
    p log p = 0 where p = 0, not 0 * -inf = nan. Positions where mask = 0 count for nothing, in the value
    and in the gradient, even if their logits are inf or nan (the log-softmax of a nan row has a nan
    gradient, even times 0)."""
    logits = torch.where(mask.bool()[..., None], logits, 0.0)
    logp = F.log_softmax(logits, -1)
    p = logp.exp()
    return masked_mean(-(p * torch.where(p > 0, logp, 0)).sum(-1), mask)


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, logits, mask,
             clip_eps, vf_clip, vf_coef, ent_coef, ptx_loss=None, ptx_coef=0.0):
    """The full objective: ppo_policy_loss (ratio clipped at clip_eps) + vf_coef * value_loss (values
    clipped at vf_clip) - ent_coef * entropy(logits) (+ ptx_coef * ptx_loss, the SFT loss on
    demonstrations, for PPO-ptx; no term when ptx_loss is None). Shapes as in those functions;
    ptx_loss a scalar or None. Returns a scalar of the inputs' dtype and device."""
    loss = (ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
            + vf_coef * value_loss(values, old_values, returns, mask, vf_clip))
    if ent_coef:  # skipped at 0: a softmax over the vocabulary at every token, and its backward
        loss = loss - ent_coef * entropy(logits, mask)
    if ptx_loss is not None:
        loss = loss + ptx_coef * ptx_loss
    return loss


# -----------------------------------------------------------------------------
# the update (the rollouts it learns from are in rollout.py)

def ppo_update(policy, critic, opts, b, cfg, ctx, g, ptx=None, it=0, hint=""):
    """ppo_epochs passes over the rollout batch b (every rank's rows: all_gather_rows) in shuffled
    minibatches, this rank taking its share [RANK::WORLD] of each; ptx() is the PPO-ptx loss on a
    batch of demonstrations, weighted for DDP (rollout.demo_loss), or None. A non-finite gradient is a
    UserError naming iteration `it` (+ hint) before its optimizer step. Returns the stats' means over steps and ranks."""
    stats, B = [], b["tokens"].size(0)
    P = b["tokens"].size(1) - b["mask"].size(1)  # prompt columns; the response columns follow
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=g).to(b["tokens"].device)  # g is seeded alike on every rank: the same minibatches
        for i in range(0, B, cfg.minibatch):
            mb = perm[i:i + cfg.minibatch][RANK::WORLD]
            m = b["mask"][mb]
            # DDP averages gradients over ranks; weighting each rank's masked means by its share of the
            # minibatch's tokens (times WORLD) makes that average the masked mean over the whole minibatch
            share = m.sum() * WORLD / all_sum(m.sum())
            with ctx:
                logprobs, logits = policy_logprobs(policy, b["tokens"][mb], b["attn"][mb], cfg.temperature, P - 1)
                # without a critic (RLOO, GRPO) values, old values and returns are 0: no value loss
                values = 0 * m if critic is None else critic(b["tokens"][mb], b["attn"][mb], first=P - 1)[:, :-1].float()
                # PPO-ptx's term outside ppo_loss: under DDP it weighs by the rank's share of demonstration tokens
                ptx_loss = cfg.ptx_coef * ptx() if ptx is not None else 0.0
            loss = share * ppo_loss(logprobs=logprobs, old_logprobs=b["logprobs"][mb], advantages=b["advantages"][mb],
                                    values=values, old_values=b["values"][mb], returns=b["returns"][mb], logits=logits,
                                    mask=m, clip_eps=cfg.clip_eps, vf_clip=cfg.vf_clip, vf_coef=cfg.vf_coef,
                                    ent_coef=cfg.ent_coef) + ptx_loss
            loss.backward()
            norms = {k: torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                     for k, model in (("grad_norm", policy), ("vf_grad_norm", critic)) if model is not None}
            # before the step, so a nan never reaches the weights: one host sync per step, as in sft.py; the norms
            # are of the all-reduced gradients, so every rank stops alike
            check_finite(f"ppo iteration {it}", hint, **norms)
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                log_ratio = logprobs.detach() - b["logprobs"][mb]
                stats.append(dict(
                    loss=loss.detach(), clipfrac=share * masked_mean(((log_ratio.exp() - 1).abs() > cfg.clip_eps).float(), m),
                    approx_kl=share * masked_mean(0.5 * log_ratio ** 2, m), **norms))
                if critic is not None:  # RLOO and GRPO have no value statistics
                    stats[-1]["value_loss"] = share * value_loss(values.detach(), b["values"][mb], b["returns"][mb], m, cfg.vf_clip)
    means = all_sum(torch.stack([torch.stack(list(s.values())) for s in stats]).mean(0)) / WORLD
    return dict(zip(stats[0], means.tolist()))  # one host sync for the whole update


# -----------------------------------------------------------------------------
# the loop

def check_config(cfg):
    """Impossible settings are one-line errors before anything loads."""
    for key in ("iters", "rollout_batch", "minibatch", "ppo_epochs", "max_new_tokens", "eval_interval", "max_prompt_len",
                "clip_eps", "vf_clip", "temperature", "lr", "vf_lr", "eval_prompts", "eval_samples"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be positive")
    check_common(cfg)
    for key, allowed in (("rollout_dtype", ("auto", "float32", "bfloat16", "float16")), ("advantage", ("gae", "rloo", "grpo"))):
        if getattr(cfg, key) not in allowed:
            raise UserError(f"--{key}={getattr(cfg, key)}: expected {', '.join(allowed)}")
    if cfg.rollout_batch % cfg.minibatch or cfg.minibatch % WORLD:
        raise UserError(f"--minibatch={cfg.minibatch} must divide --rollout_batch={cfg.rollout_batch}"
                        + (f", and the {WORLD} processes must divide it" if WORLD > 1 else ""))
    for key in ("kl_coef", "ent_coef", "ptx_coef", "vf_coef"):
        if not getattr(cfg, key) >= 0:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be >= 0")
    if not (0 < cfg.gamma <= 1 and 0 <= cfg.lam <= 1):
        raise UserError(f"--gamma={cfg.gamma}, --lam={cfg.lam}: GAE needs 0 < gamma <= 1 and 0 <= lam <= 1")
    if cfg.kl_target > 0 and not cfg.adaptive_kl:
        raise UserError(f"--kl_target={cfg.kl_target} is the adaptive KL controller's target: add --adaptive_kl")
    if cfg.adaptive_kl and (cfg.kl_target <= 0 or cfg.kl_coef <= 0 or cfg.kl_horizon <= 0):
        raise UserError("--adaptive_kl needs --kl_target > 0 (nats per response, e.g. 6), --kl_horizon > 0 and a "
                        "starting --kl_coef > 0")
    if cfg.samples_per_prompt < (1 if cfg.advantage == "gae" else 2):
        raise UserError(f"--samples_per_prompt={cfg.samples_per_prompt}: gae needs >= 1, rloo and grpo >= 2 (a group)")
    if cfg.rollout_batch % (cfg.samples_per_prompt * WORLD):
        raise UserError(f"--rollout_batch={cfg.rollout_batch}: not whole groups of --samples_per_prompt="
                        f"{cfg.samples_per_prompt} for each of the {WORLD} processes")
    if math.isinf(cfg.truncated_score):  # nan is offered (the RM's own score); inf would make every advantage nan
        raise UserError(f"--truncated_score={cfg.truncated_score}: a finite score, or nan (the reward model's)")
    if cfg.missing_eos_penalty and not math.isnan(cfg.truncated_score):
        raise UserError("--missing_eos_penalty applies to a cut response's own score: set --truncated_score=nan with it")


def train(cfg, log=None):
    """PPO from cfg; log(metrics: dict) is called once per iteration and per evaluation (rank 0 only)."""
    from rollout import (AdaptiveKLController, RunningMoments, add_advantages, default_log, demo_loss, evaluate,  # here:
                         explained_variance, kl_stats, load_models, load_prompts, make_sampler, responses, rollout,
                         seeded)  # it imports this math
    check_config(cfg)
    device = ddp_init(get_device(cfg.device, cfg.dtype))
    check_out_dir(cfg.out_dir)  # after: a device or precision refused makes no --out_dir
    torch.manual_seed(cfg.seed)
    policy, ref, rm, critic, tok = load_models(cfg, device)
    onednn.enable(*(m for m in (policy, ref, rm, critic) if m is not None))  # the CPU fast path: fp32 matmuls via oneDNN
    sampler = make_sampler(policy, cfg, device)
    ref_sampler = make_sampler(ref, cfg, device) if RANK == 0 else None  # for evaluations, which rank 0 alone runs
    train_prompts, train_ids, eval_prompts, eval_ids, demos = load_prompts(cfg, tok)
    opts = [make_optimizer(m.parameters(), lr, 0.0) for m, lr in ((policy, cfg.lr), (critic, cfg.vf_lr)) if m is not None]
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else None
    moments = RunningMoments()
    ctx, builtin, start, ev = autocast(device, cfg.dtype), cfg.data == "builtin", 0, None
    path = os.path.join(cfg.out_dir, "ppo.pt")
    if cfg.resume:
        ck = load_checkpoint(path, "ppo", "nothing to resume: run `python ppo.py` without --resume")
        if (critic is None) != (ck.get("critic") is None):
            raise UserError(f"{path} was written by a run with --advantage={ck['cfg'].get('advantage', 'gae')}: resume it with that")
        load_weights(policy, ck["model"], path, ck.get("config"))
        if critic is not None:
            load_weights(critic, ck["critic"], path)
        for opt, state in zip(opts, ck["optimizers"]):
            load_optimizer(opt, state, path)
        start, moments.__dict__, ev = ck["iter"], ck["moments"], ck.get("eval")  # ev: iteration start's, if it was done
        if kl_ctl:
            kl_ctl.value = ck["kl_coef"]
        resume_at(path, start, cfg, ck.get("cfg", {}), "iters", "iteration")
    log = log or default_log(metrics_file(cfg.out_dir, "ppo_metrics.jsonl", append=cfg.resume or RANK > 0))
    print(f"ppo: {len(train_ids)} train / {len(eval_ids)} eval prompts, device {device}, {WORLD} process(es)")
    # the update's modules; the rollout scores with them too (eager and compiled kernels round apart: ratio 1 exactly)
    cpolicy, ccritic = (m and compile_for_lengths(m, cfg.compile) for m in (policy, critic))
    tpolicy, tcritic = (None if m is None else ddp_wrap(m, device) for m in (cpolicy, ccritic))
    static = cfg.cuda_graph and device.startswith("cuda")

    def save(it, **extra):
        save_checkpoint(path, policy, "ppo", critic=critic and critic.state_dict(), vocab=tok.vocab, cfg=asdict(cfg), iter=it,
                        optimizers=[o.state_dict() for o in opts], moments=dict(moments.__dict__),
                        kl_coef=kl_ctl.value if kl_ctl else cfg.kl_coef, **extra)

    stop = GracefulStop()
    with onednn.packed(ref, rm):  # frozen for the whole run: their CPU fast-path weights are packed once
        for it in range(start, cfg.iters + 1):
            if any_rank(stop.requested, device):
                save_and_exit(lambda: save(it), f"ppo: stopped before iteration {it}; saved {path}; continue with --resume")
            if sampler is not None:
                sampler.load_state_dict(policy.state_dict())  # copy_ casts to the sampler's dtype
            due = (it % cfg.eval_interval == 0 or it == cfg.iters) and not (it == start and ev is not None)
            if due and RANK == 0:  # the others wait at the barrier
                ev = evaluate(policy, ref, rm, eval_ids, eval_prompts, tok, samples=cfg.eval_samples, batch=cfg.rollout_batch,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, ctx=ctx,
                              builtin=builtin, static=static, samplers=(sampler, ref_sampler))
                log(dict(kind="eval", iter=it, iters=cfg.iters, **ev))
                save(it, eval=ev)
            barrier()
            if it == cfg.iters:
                break
            t0 = time.time()
            k = cfg.samples_per_prompt  # each rank rolls out whole groups: k adjacent copies of a prompt
            idx = batch_indices(len(train_ids), it, cfg.rollout_batch // k, cfg.seed)
            mine = [j for j in idx[RANK::WORLD] for _ in range(k)]
            b = rollout(cpolicy, ref, rm, ccritic, [train_ids[j] for j in mine], tok.eot, cfg.max_new_tokens, cfg.temperature,
                        ctx, seeded(cfg.seed, 0, RANK, it, device=device), sampler, static=static,
                        width=max(len(train_ids[j]) for j in idx))  # padded alike on every rank
            gold = all_sum(torch.tensor(sum(map(data.gold_score, [train_prompts[j] for j in mine], responses(b, tok))) / len(mine),
                                        device=device)).item() / WORLD if builtin else None  # every rank's share is alike
            b = {key: v for key, v in b.items() if v is not None}  # no values without a critic
            # Every rank gets all ranks' rollouts (a few numbers per token), so whitening, score normalisation
            # and the KL controller see the global batch, as in one process; each trains on its share of it.
            b = all_gather_rows(b)
            kl_coef = kl_ctl.value if kl_ctl else cfg.kl_coef
            k1, k3, kl_seq = kl_stats(b)
            hint = f"; the last good checkpoint is {path}"
            check_finite(f"ppo iteration {it}", hint, score=b["scores"].mean().item(), kl=k1)
            add_advantages(b, cfg, kl_coef, moments)
            t1 = time.time()
            # the plain policy: DDP still all-reduces its gradients in the same backward; a generator alike on every rank
            ptx = functools.partial(demo_loss, policy, demos, cfg.minibatch, tok.eot, seeded(cfg.seed, 2, it)) \
                if cfg.ptx_coef > 0 else None
            stats = ppo_update(tpolicy, tcritic, opts, b, cfg, ctx, seeded(cfg.seed, 1, it), ptx, it, hint)
            t2 = time.time()
            if kl_ctl:
                kl_ctl.update(kl_seq, cfg.rollout_batch)
            m = dict(kind="train", iter=it, iters=cfg.iters, score=b["scores"].mean().item(), kl=k1, k3=k3, kl_seq=kl_seq,
                     kl_coef=kl_coef, entropy=masked_mean(-b["logprobs"], b["mask"]).item(),  # sampled: E[-log p] = H
                     length=b["mask"].sum(1).mean().item(), ended=b["ended"].float().mean().item(), **({"gold": gold} if builtin else {}),
                     rollout_s=t1 - t0, update_s=t2 - t1, tok_s=b["attn"].sum().item() * (1 + cfg.ppo_epochs) / (t2 - t0), **stats)
            if critic is not None:
                m["explained_var"] = explained_variance(b["values"], b["returns"], b["mask"])
            if kl_seq > cfg.kl_max:
                print(f"warning: ppo iteration {it}: KL per response {kl_seq:.1f} > --kl_max={cfg.kl_max}: the policy is running away")
            if RANK == 0:
                log(m)
    if RANK == 0:
        write_json(dict(eval=ev, cfg=asdict(cfg)), os.path.join(cfg.out_dir, "ppo_eval.json"))
    return ev


def main(argv):
    ev = train(parse_config(Config, argv))
    if RANK == 0:
        print("final evaluation on held-out prompts:", json.dumps({k: round(v, 4) for k, v in ev.items()}))


if __name__ == "__main__":
    main_guard(ddp_main(main))
