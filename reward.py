"""
Stage 2 of 3: a Bradley-Terry reward model trained on human preferences.
A GPT trunk initialised from the SFT checkpoint plus a scalar head read at the last token of
the response (its <|endoftext|>). Trained on pairs {prompt, chosen, rejected}, or on K-way
rankings with all K(K-1)/2 pairs of a prompt in one batch, each response scored once
(InstructGPT, Ouyang et al. 2022, §3.5).

    python reward.py                        # after python sft.py
    python reward.py --kind=rankings        # the built-in task's 4..6-way rankings
    torchrun --standalone --nproc_per_node=4 reward.py   # 4 data-parallel processes (see sft.py)
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import data
from ddp import RANK, WORLD, all_sum, any_rank, barrier, ddp_init, ddp_main, ddp_wrap, rank0_first, save_and_exit
import onednn
from gpt import generate
from hf import load_checkpoint, model_from_checkpoint, save_checkpoint
from util import (GracefulStop, UserError, append_jsonl, autocast, check_common, check_out_dir, compile_for_lengths,
                  get_device, load_optimizer, lr_at, main_guard, make_optimizer, metrics_file, parse_config,
                  resume_at)


@dataclass
class Config:
    data: str = "builtin"  # builtin | hh-rlhf | a file of pairs or rankings (.jsonl, .json, .csv, .tsv; .gz too)
    kind: str = "pairs"  # pairs | rankings (K-way, best first)
    sft_ckpt: str = "out/sft.pt"  # the trunk starts from the SFT policy
    out_dir: str = "out"  # writes reward.pt (lowest validation loss) and reward_last.pt (for --resume)
    max_len: int = 24  # prompt + response tokens
    max_prompt_len: int = 12  # prompts keep their last max_prompt_len tokens
    batch_size: int = 64  # prompts per step (each with its 2..K responses), over all processes under torchrun
    max_iters: int = 800  # optimizer steps
    lr: float = 3e-4  # peak learning rate; ~1e-5 for GPT-2
    warmup_iters: int = 50  # linear warmup, then cosine decay to lr/10
    weight_decay: float = 0.1  # AdamW, on matrices only
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_interval: int = 100  # steps between validation loss/accuracy + checkpoint
    eval_batches: int = 16  # validation batches per evaluation, each group at most once (built-in: 1,024 of 2,500 pairs)
    log_interval: int = 20  # steps between log lines
    norm_samples: int = 256  # SFT samples (each prompt alike) whose mean score is shifted to 0 at the end; 0 = off
    seed: int = 0  # data order and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA GPUs from Ampere on, else fp32) | float32 | bfloat16
    compile: bool = False  # torch.compile the model for training, one graph for all lengths (CUDA)
    bucket: int = 0  # batch lengths rounded up to a multiple of this, up to max_len (0 = 64 on CUDA, 1 on CPU)
    resume: bool = False  # continue from out_dir/reward_last.pt


def preference_loss(r_chosen, r_rejected):
    """Bradley-Terry negative log-likelihood that the chosen response wins.
    r_chosen, r_rejected: (N,) rewards of N (chosen, rejected) pairs.
    loss = mean over the N pairs of -log sigmoid(r_chosen - r_rejected), computed with logsigmoid
    (stable for large differences). Returns a scalar of the rewards' dtype and device."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()



class RewardModel(nn.Module):
    """A GPT trunk and a scalar head on its final hidden states. forward -> (B, T), one scalar per
    position: the reward of a sequence is the entry at its last token; as a critic, every entry
    is a value estimate."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(gpt.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.head.to(gpt.lm_head.weight.device)  # on the trunk's device, drawn on the CPU: a seed gives one head anywhere

    @property
    def config(self):
        return self.gpt.config  # the trunk's GPTConfig

    def forward(self, tokens, attention_mask=None, first=0):
        h = self.gpt.hidden(tokens, attention_mask, first=first)  # (B, T - first, C)
        with torch.autocast(h.device.type, enabled=False):  # the scalar head in fp32, under bf16 autocast too
            return self.head(h.to(self.head.weight.dtype)).squeeze(-1)  # (B, T - first)

    def score(self, tokens, attention_mask, left_padded=True, first=0):
        """Rewards (B,) read at each row's last real token. Right-padded rows need no mask. With
        first > 0, computed for positions first.. only: every row's last token must be among them."""
        r = self(tokens, attention_mask if left_padded else None, first)
        return r.gather(1, data.last_index(attention_mask)[:, None] - first).squeeze(1)


def load_reward_model(path, hint="run `python reward.py` first"):
    ck = load_checkpoint(path, "reward", hint)
    rm = RewardModel(model_from_checkpoint(ck, path))
    rm.head.load_state_dict(ck["head"])
    return rm, ck


def rank_groups(records, kind):
    """Records -> [(prompt, [response best, ..., worst])]: a pair is a ranking of K=2."""
    if kind == "pairs":
        return [(r["prompt"], [r["chosen"], r["rejected"]]) for r in records]
    return [(r["prompt"], r["responses"]) for r in records]


def encode_groups(groups, tok, cfg, name):
    """groups [(prompt, [response best, ..., worst])] -> (encoded groups, the groups kept), alike in
    length. A response the same as a better-ranked one of its prompt once cut to max_len is dropped (a
    tie labelled a win: its loss stays log 2 and it counts as wrong), and a group left with one
    response with it; the counts are printed."""
    flat = [(p, r) for p, rs in groups for r in rs]
    ex = data.encode_examples(tok, [p for p, _ in flat], [r for _, r in flat], cfg.max_len, cfg.max_prompt_len, name)
    enc, kept, i = [], [], 0
    for p, rs in groups:
        g, i = ex[i:i + len(rs)], i + len(rs)
        keep = [k for k in range(len(rs)) if g[k] not in g[:k]]
        if len(keep) >= 2:
            enc.append([g[k] for k in keep])
            kept.append((p, [rs[k] for k in keep]))
    dropped = len(ex) - sum(map(len, enc))
    if dropped:
        print(f"data: {name}: {dropped} responses dropped, each the same as a better-ranked one "
              f"once cut to --max_len={cfg.max_len}, and {len(groups) - len(enc)} of {len(groups)} records with them")
    if not enc:
        raise UserError(f"--data={cfg.data}: {name}: every record's responses are the same once cut to --max_len={cfg.max_len}")
    return enc, kept


def group_batch(groups, idx, pad_id, bucket=1, limit=None):
    """Groups idx -> padded sequences (every response once) and the (chosen, rejected) row
    indices of all K(K-1)/2 pairs of each group: response i beats response j when i < j. The
    sequences are right-padded by data.pad_right (lengths rounded up to a multiple of bucket, up to limit)."""
    seqs, ci, ri = [], [], []
    for g in (groups[j] for j in idx):
        base = len(seqs)
        seqs += g
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                ci.append(base + i)
                ri.append(base + j)
    return data.pad_right(seqs, pad_id, bucket, limit), torch.tensor(ci), torch.tensor(ri)


def pair_rewards(rm, b, ci, ri, device):
    """rm: a RewardModel or DDP around one, so it is called through forward (the one method DDP
    hooks) and read at each right-padded row's last token as RewardModel.score does."""
    r = rm(b["tokens"].to(device)).gather(1, data.last_index(b["attn_mask"]).to(device)[:, None]).squeeze(1)  # (N_seq,)
    return r[ci.to(device)], r[ri.to(device)]


def batch_loss(r_chosen, r_rejected, n_all, world=WORLD):
    """The loss one process trains with: its share of one mean over all n_all pairs of the global
    batch (every K-way group gives K(K-1)/2 pairs; InstructGPT divides once, by the pair count).
    r_chosen, r_rejected: (N,) this process's pair rewards; n_all: pairs over all `world` processes.
    loss = preference_loss(r_chosen, r_rejected) * N * world / n_all, a float32 scalar: times world
    because DDP averages the gradients over the processes (as in sft.py), so the mean over processes
    is the mean over all n_all pairs of -log sigmoid(r_chosen - r_rejected)."""
    return preference_loss(r_chosen.float(), r_rejected.float()) * (len(r_chosen) * world / n_all)


@torch.no_grad()
def evaluate(rm, val, val_gold, cfg, ctx, device, pad_id):
    """Validation loss and accuracy (chosen scored above rejected); with val_gold (the gold score of
    each response, built-in task) also the agreement with the gold labeler on pairs it separates."""
    rm.eval()
    loss = acc = agree = n_gold = n = 0
    for idx in data.eval_indices(len(val), cfg.batch_size, cfg.eval_batches, cfg.seed + 1):
        b, ci, ri = group_batch(val, idx, pad_id)
        with ctx:
            rc, rr = pair_rewards(rm, b, ci, ri, device)
        rc, rr = rc.float().cpu(), rr.float().cpu()
        loss += preference_loss(rc, rr).item() * len(ci)
        acc += (rc > rr).sum().item()
        n += len(ci)
        if val_gold:
            gold = torch.tensor([g for j in idx for g in val_gold[j]])  # (N_seq,) in group_batch's order
            gc, gr = gold[ci], gold[ri]
            agree += ((rc > rr) == (gc > gr))[gc != gr].sum().item()
            n_gold += (gc != gr).sum().item()
    rm.train()
    return loss / n, acc / n, (agree / n_gold if n_gold else float("nan"))


def centring_prompts(prompts, n, seed):
    """The prompts whose samples centre the reward model, each one equally often: whole passes over
    them in a seeded order until at least n, or n of them without repeats if there are more."""
    order = data.epoch_permutation(len(prompts), seed, 0).tolist()
    n = n if n <= len(prompts) else -(-n // len(prompts)) * len(prompts)
    return [prompts[order[j % len(prompts)]] for j in range(n)]


@torch.no_grad()
def normalize(rm, policy, prompts, tok, cfg, device):
    """Shift the head's bias so that the SFT policy's own samples score 0 on average over the prompts
    PPO trains on (InstructGPT §C.2): PPO's rewards then start near 0, whatever offset training left.
    Near, not at: these samples run to --max_len tokens, scored where they stop, while PPO's stop at its
    --max_new_tokens and a cut one scores --truncated_score."""
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    picks, scores = centring_prompts(prompts, cfg.norm_samples, cfg.seed), []
    for i in range(0, len(picks), cfg.batch_size):
        ids = [tok.encode(p)[-cfg.max_prompt_len:] for p in picks[i:i + cfg.batch_size]]
        x, m = data.pad_left(ids, tok.eot)
        out, gen = generate(policy, x.to(device), m.to(device), cfg.max_len - x.size(1), eos_id=tok.eot, generator=g)
        mask = torch.cat([m.to(device), gen[:, x.size(1):]], 1)
        scores.append(rm.score(out, mask))
    mean = torch.cat(scores).mean()
    rm.head.bias.sub_(mean)
    return mean.item()


def check_config(cfg):
    """Impossible settings are one-line errors before anything loads (as sft.check_config)."""
    if cfg.kind not in ("pairs", "rankings"):
        raise UserError(f"--kind={cfg.kind}: expected pairs or rankings")
    for key in ("batch_size", "max_iters", "eval_interval", "eval_batches", "log_interval", "max_len", "lr"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be positive")
    check_common(cfg)
    if not 0 < cfg.max_prompt_len < cfg.max_len:  # 0 would train on responses alone, which PPO scores with prompts
        raise UserError(f"--max_prompt_len={cfg.max_prompt_len}: must be in 1..max_len-1 ({cfg.max_len - 1})")
    if cfg.batch_size < WORLD:
        raise UserError(f"--batch_size={cfg.batch_size}: fewer prompts than the {WORLD} processes")


def main(argv):
    cfg = parse_config(Config, argv)
    check_config(cfg)
    device = ddp_init(get_device(cfg.device, cfg.dtype))
    check_out_dir(cfg.out_dir)  # after: a device or precision refused makes no --out_dir
    torch.manual_seed(cfg.seed)
    last_path, best_path = os.path.join(cfg.out_dir, "reward_last.pt"), os.path.join(cfg.out_dir, "reward.pt")
    if cfg.resume:
        rm, ck = load_reward_model(last_path, "nothing to resume: run `python reward.py` without --resume")
        policy_ck = ck
    else:
        policy_ck = load_checkpoint(cfg.sft_ckpt, "sft", "run `python sft.py` first")
        rm = RewardModel(model_from_checkpoint(policy_ck, cfg.sft_ckpt))
    tok = data.Tokenizer(policy_ck.get("vocab"), last_path if cfg.resume else cfg.sft_ckpt)
    train_rec, val_rec = rank0_first(data.load_records, cfg.data, cfg.kind, cfg.seed)
    train_groups, val_groups = rank_groups(train_rec, cfg.kind), rank_groups(val_rec, cfg.kind)
    (train, _), (val, val_groups) = encode_groups(train_groups, tok, cfg, "rm train"), encode_groups(val_groups, tok, cfg, "rm val")
    val_gold = [[data.gold_score(p, r) for r in rs] for p, rs in val_groups] if cfg.data == "builtin" else None
    if len(train) < cfg.batch_size:  # batch_indices would hand out short batches, uneven across processes
        raise UserError(f"--data={cfg.data}: {len(train)} training {cfg.kind}, fewer than --batch_size={cfg.batch_size}")
    if rm.gpt.config.block_size < cfg.max_len:
        raise UserError(f"--max_len={cfg.max_len} exceeds the model's block_size {rm.gpt.config.block_size}")
    rm.to(device).train()
    onednn.enable(rm)  # the CPU fast path: fp32 matmuls through oneDNN (onednn.py)
    opt = make_optimizer(rm.parameters(), cfg.lr, cfg.weight_decay)
    start, best = 0, math.inf
    if cfg.resume:
        load_optimizer(opt, ck["optimizer"], last_path)
        start, best = ck["iter"], ck["best_loss"]
        torch.set_rng_state(ck["rng"])
        resume_at(last_path, start, cfg, ck.get("cfg", {}))
    ctx = autocast(device, cfg.dtype)
    trm = ddp_wrap(compile_for_lengths(rm, cfg.compile), device)  # for training; rank 0 evaluates with rm alone
    print(f"reward: {len(train)} train / {len(val)} val {cfg.kind}, device {device}")

    def save(path, it, best_loss, **extra):
        save_checkpoint(path, rm.gpt, "reward", head=rm.head.state_dict(), vocab=tok.vocab, cfg=asdict(cfg),
                        iter=it, best_loss=best_loss, optimizer=opt.state_dict(), rng=torch.get_rng_state(), **extra)

    metrics = metrics_file(cfg.out_dir, "reward_metrics.jsonl", append=cfg.resume or RANK > 0)
    t0, stop = time.time(), GracefulStop()
    for it in range(start, cfg.max_iters + 1):
        if any_rank(stop.requested, device):
            save_and_exit(lambda: save(last_path, it, best), f"reward: stopped before step {it}; saved {last_path}; continue with --resume")
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            if RANK == 0:  # one process evaluates and saves while the others wait at the barrier
                vloss, vacc, vgold = evaluate(rm, val, val_gold, cfg, ctx, device, tok.eot)
                print(f"reward {it}/{cfg.max_iters} | val loss {vloss:.4f} | val acc {vacc:.3f}"
                      + (f" | gold agreement {vgold:.3f}" if val_gold else ""))
                if vloss < best:  # the loss, not the accuracy: on noisy labels it is the steadier signal
                    best = vloss
                    save(best_path, it, best, val_acc=vacc, gold_agreement=vgold)
                save(last_path, it, best)
            barrier()
        if it == cfg.max_iters:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg.lr, cfg.warmup_iters, cfg.max_iters)
        idx = data.batch_indices(len(train), it, cfg.batch_size, cfg.seed)[RANK::WORLD]  # this rank's prompts
        b, ci, ri = group_batch(train, idx, tok.eot, cfg.bucket or (64 if device.startswith("cuda") else 1), cfg.max_len)
        n_all = all_sum(torch.tensor(len(ci), device=device))  # pairs in the global batch
        with ctx:
            rc, rr = pair_rewards(trm, b, ci, ri, device)
            loss = batch_loss(rc, rr, n_all)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):  # the all-reduced gradient's norm: every rank raises (and all_sums) alike
            loss_all = all_sum(loss.detach() / WORLD).item()  # the global batch's loss (undoing the scaling)
            raise UserError(f"reward step {it}: non-finite gradient norm (loss {loss_all:.4g}); "
                            f"the last good checkpoint is {last_path}; try a lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % cfg.log_interval == 0:  # loss and accuracy over the global batch: unscaled, summed over ranks
            loss_all, acc = all_sum(torch.stack([loss.detach() / WORLD, (rc > rr).sum() / n_all])).tolist()
            if RANK == 0:
                append_jsonl(dict(iter=it, loss=loss_all), metrics)
            print(f"reward {it}/{cfg.max_iters} | loss {loss_all:.4f} | acc {acc:.3f} "
                  f"| {(time.time() - t0) * 1000 / cfg.log_interval:.0f} ms/step")
            t0 = time.time()
    if RANK > 0:
        return  # rank 0 alone normalises and writes the final checkpoint
    # normalise the best model, and freeze it for PPO
    rm, ck = load_reward_model(best_path)
    rm.to(device).eval()
    if cfg.norm_samples > 0 and not ck.get("normalized"):  # a finished run, resumed: centred already
        policy = model_from_checkpoint(policy_ck if not cfg.resume else load_checkpoint(cfg.sft_ckpt, "sft"))
        prompts = data.load_records(cfg.data, "prompts", cfg.seed)[0]
        shift = normalize(rm, policy.to(device).eval(), prompts, tok, cfg, device)
        print(f"reward: shifted the head bias by {-shift:+.4f} so SFT samples score 0 on average")
    save_checkpoint(best_path, rm.gpt, "reward", head=rm.head.state_dict(), vocab=tok.vocab, cfg=asdict(cfg),
                    val_acc=ck.get("val_acc"), gold_agreement=ck.get("gold_agreement"), normalized=True)
    print(f"reward: best val loss {best:.4f} (val acc {ck.get('val_acc'):.3f}), saved {best_path}")


if __name__ == "__main__":
    main_guard(ddp_main(main))
