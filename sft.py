"""
Stage 1 of 3: supervised fine-tuning (SFT) on demonstrations {prompt, response}.
The loss is next-token cross-entropy on the response tokens only: the prompt is context, not
something the policy should learn to produce (InstructGPT, Ouyang et al. 2022, §3.5).

    python sft.py                                   # the built-in task, a small GPT from scratch
    python sft.py --init=gpt2 --data=hh-rlhf --max_len=512 --max_prompt_len=384 --batch_size=8
    torchrun --standalone --nproc_per_node=4 sft.py  # 4 data-parallel processes (GPUs), same updates
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

import data
from ddp import RANK, WORLD, all_sum, any_rank, barrier, ddp_init, ddp_main, ddp_wrap, no_sync, rank0_first, save_and_exit
import onednn
from gpt import GPT, GPTConfig, generate
from hf import from_pretrained, load_checkpoint, model_from_checkpoint, save_checkpoint
from util import (GracefulStop, UserError, append_jsonl, autocast, check_common, check_out_dir, compile_for_lengths,
                  get_device, load_optimizer, lr_at, main_guard, make_optimizer, metrics_file, parse_config,
                  resume_at)


@dataclass
class Config:
    data: str = "builtin"  # builtin | hh-rlhf | a file of {prompt, response} (.jsonl, .json, .csv, .tsv; .gz too)
    init: str = "scratch"  # scratch (sized below) | gpt2 | gpt2-medium | ... | path to a .pt or HF dir
    out_dir: str = "out"  # writes sft.pt (best validation loss) and sft_last.pt (for --resume)
    n_layer: int = 4  # with init=scratch only
    n_head: int = 4  # with init=scratch only
    n_embd: int = 128  # with init=scratch only
    max_len: int = 24  # prompt + response tokens; longer responses are cut (counts printed)
    max_prompt_len: int = 12  # prompts keep their last max_prompt_len tokens
    batch_size: int = 64  # sequences per micro-batch, over all processes (each gets batch_size/N under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 500  # optimizer steps
    lr: float = 2e-3  # peak learning rate; 1e-5..5e-5 when fine-tuning GPT-2
    warmup_iters: int = 50  # linear warmup, then cosine decay to lr/10
    weight_decay: float = 0.1  # AdamW, on matrices only
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_interval: int = 100  # steps between validation loss + samples + checkpoint
    eval_batches: int = 8  # validation micro-batches per evaluation
    log_interval: int = 20  # steps between log lines
    seed: int = 0  # data order, init and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA GPUs from Ampere on, else fp32) | float32 | bfloat16
    compile: bool = False  # torch.compile model and loss, one graph for all lengths (CUDA; H200, one shape: 50 -> 37 ms a step)
    bucket: int = 0  # batch lengths rounded up to a multiple of this, up to max_len (0 = 64 on CUDA, 1 on CPU)
    resume: bool = False  # continue from out_dir/sft_last.pt


def sft_loss(logits, tokens, loss_mask):
    """Response-only next-token cross-entropy.
    logits: (B, T, V) = model(tokens), or model(tokens, padded=True) as in training: columns past the
    vocabulary at -inf, where no token is (a one-hot product would read 0 * -inf = nan in them; the loss
    stays finite); tokens: (B, T) long; loss_mask: (B, T), 1 on response tokens.
    Position t-1 predicts token t, so the loss is the mean, over positions t >= 1 with
    loss_mask[:, t] = 1 (there is at least one), of -log softmax(logits[:, t-1])[tokens[:, t]]. Prompt and padding
    tokens contribute nothing to the value, whatever the logits that predict them hold (nan * 0 would be nan);
    finite logits there get a 0 gradient (a nan logit a nan one). Returns a scalar of logits' dtype and
    device (float64 logits: a float64 loss)."""
    V = logits.size(-1)
    # shift the labels, not the logits: logits[:, :-1] would copy (B, T, V), 200 MB for GPT-2 at 4x256
    targets = torch.roll(tokens, -1, dims=1)  # (B, T): targets[:, t] = tokens[:, t+1]
    m = torch.roll(loss_mask, -1, dims=1)
    m[:, -1] = 0  # the last position predicts nothing (roll wrapped the first token there)
    nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")  # (B*T,)
    m = m.reshape(-1).bool()
    return torch.where(m, nll, 0).sum() / m.sum()



def load_tokenizer(name):
    """The built-in task uses a small renumbered vocabulary; everything else GPT-2's."""
    return data.task_tokenizer() if name == "builtin" else data.Tokenizer()


def init_model(cfg, tok):
    if cfg.init == "scratch":
        gcfg = GPTConfig(block_size=cfg.max_len, vocab_size=tok.vocab_size,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
        return GPT(gcfg)
    model = from_pretrained(cfg.init)
    if model.config.vocab_size != tok.vocab_size:
        raise UserError(f"--init={cfg.init} has vocab_size {model.config.vocab_size}, --data={cfg.data} needs "
                        f"{tok.vocab_size}: use --init=scratch for the built-in task")
    return model


def check_config(cfg):
    """Impossible settings are one-line errors before anything loads."""
    for key in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_batches", "log_interval", "max_len",
                "lr", "n_layer", "n_head", "n_embd"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be positive")
    check_common(cfg)
    if not 0 < cfg.max_prompt_len < cfg.max_len:
        raise UserError(f"--max_prompt_len={cfg.max_prompt_len}: must be in 1..max_len-1 ({cfg.max_len - 1})")
    if cfg.init == "scratch" and cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd={cfg.n_embd}: must be a multiple of --n_head={cfg.n_head} (heads of equal width)")
    if cfg.batch_size < WORLD:
        raise UserError(f"--batch_size={cfg.batch_size}: fewer sequences than the {WORLD} processes")


def global_loss(step_loss):
    """The logged loss: the step's mean token loss over its whole global batch, every micro-batch and
    rank (step_loss: this rank's training losses below, summed over its micro-batches). A float; every
    rank must call it."""
    return all_sum(step_loss / WORLD).item()


def step_indices(n, it, cfg):
    """The example indices of step `it`'s grad_accum micro-batches, this rank's share of each: the step's
    batch_size x grad_accum examples (data.batch_indices) cut in order, so --batch_size=8 --grad_accum=2
    trains on the data of --batch_size=16 (micro-batch m drawn as batch it * grad_accum + m of batch_size
    would leave those data at the first epoch's end, whose batches are counted in batch_size)."""
    step = data.batch_indices(n, it, cfg.batch_size * cfg.grad_accum, cfg.seed)
    return [step[i:i + cfg.batch_size][RANK::WORLD] for i in range(0, len(step), cfg.batch_size)]


@torch.no_grad()
def evaluate(model, val, cfg, tok, ctx, device):
    model.eval()
    total, n = 0.0, 0  # a mean over tokens, as training's: a short last batch weighs by its tokens
    for idx in data.eval_indices(len(val), cfg.batch_size, cfg.eval_batches, cfg.seed + 1):
        b = data.pad_right([val[j] for j in idx], tok.eot)
        x = b["tokens"].to(device)
        with ctx:  # the loss too, as in training: autocast's cross_entropy in fp32, not on bf16 logits (1/128 steps near 1)
            loss = sft_loss(model(x), x, b["loss_mask"].to(device))
        k = int(b["loss_mask"][:, 1:].sum())
        total += loss.item() * k
        n += k
    model.train()
    return total / n


@torch.no_grad()
def print_samples(model, prompts, tok, cfg, device, n=3):
    """A few greedy completions of validation prompts, and their gold score on the built-in task."""
    model.eval()
    ids = [tok.encode(p)[-cfg.max_prompt_len:] for p in prompts[:n]]
    x, m = data.pad_left(ids, tok.eot)
    out, gen = generate(model, x.to(device), m.to(device), cfg.max_len - x.size(1), temperature=0, eos_id=tok.eot)
    for p, row, g in zip(prompts, out.cpu(), gen.cpu()):
        text = tok.decode([t for t in row[g.bool()].tolist() if t != tok.eot])
        gold = f"  (gold {data.gold_score(p, text):+.2f})" if cfg.data == "builtin" else ""
        print(f"  {p!r} -> {text!r}{gold}")
    model.train()


def main(argv):
    cfg = parse_config(Config, argv)
    check_config(cfg)
    device = ddp_init(get_device(cfg.device, cfg.dtype))
    check_out_dir(cfg.out_dir)  # after: a device or precision refused makes no --out_dir
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.data)
    train_rec, val_rec = rank0_first(data.load_records, cfg.data, "sft", cfg.seed)
    encode = lambda recs, name: data.encode_examples(tok, [r["prompt"] for r in recs], [r["response"] for r in recs],
                                                    cfg.max_len, cfg.max_prompt_len, name)
    train, val = encode(train_rec, "sft train"), encode(val_rec, "sft val")
    if len(train) < cfg.batch_size * cfg.grad_accum:  # batch_indices would hand out short batches, uneven across processes
        raise UserError(f"--data={cfg.data}: {len(train)} training examples, fewer than the {cfg.batch_size * cfg.grad_accum} "
                        f"of a step (--batch_size={cfg.batch_size} x --grad_accum={cfg.grad_accum})")
    last_path, best_path = os.path.join(cfg.out_dir, "sft_last.pt"), os.path.join(cfg.out_dir, "sft.pt")
    if cfg.resume:
        ck = load_checkpoint(last_path, "sft", hint="nothing to resume: run `python sft.py` without --resume")
        model = model_from_checkpoint(ck, last_path)
        if ck.get("vocab") != tok.vocab:  # other data's token ids: an index error, or wrong tokens silently
            raise UserError(f"{last_path} was trained on another vocabulary than --data={cfg.data}'s: resume it with "
                            f"its own --data={ck.get('cfg', {}).get('data', '?')}")
    else:
        model = init_model(cfg, tok)
    if model.config.block_size < cfg.max_len:
        raise UserError(f"--max_len={cfg.max_len} exceeds the model's block_size {model.config.block_size}")
    model.to(device).train()
    onednn.enable(model)  # the CPU fast path: fp32 matmuls through oneDNN (onednn.py)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    start, best = 0, math.inf
    if cfg.resume:
        load_optimizer(opt, ck["optimizer"], last_path)
        start, best = ck["iter"], ck["best_val"]
        torch.set_rng_state(ck["rng"])
        resume_at(last_path, start, cfg, ck.get("cfg", {}))
    ctx = autocast(device, cfg.dtype)
    tmodel = ddp_wrap(model, device)  # for training; rank 0 evaluates and samples with model alone
    train_loss = lambda x, m: sft_loss(tmodel(x, padded=True), x, m)  # padded: no slice in the backward (gpt.GPT.head)
    train_loss = compile_for_lengths(train_loss, cfg.compile)  # the model and the loss: the LM head's softmax fused in
    bucket = cfg.bucket or (64 if device.startswith("cuda") else 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"sft: {n_params / 1e6:.2f}M parameters, {len(train)} train / {len(val)} val examples, device {device}")

    def save(path, it, best_val):
        save_checkpoint(path, model, "sft", vocab=tok.vocab, cfg=asdict(cfg), iter=it, best_val=best_val,
                        optimizer=opt.state_dict(), rng=torch.get_rng_state())

    metrics = metrics_file(cfg.out_dir, "sft_metrics.jsonl", append=cfg.resume or RANK > 0)
    t0, tokens_seen, stop = time.time(), 0, GracefulStop()
    for it in range(start, cfg.max_iters + 1):
        if any_rank(stop.requested, device):  # Ctrl-C reaches ranks at different moments: all stop here
            save_and_exit(lambda: save(last_path, it, best), f"sft: stopped before step {it}; saved {last_path}; continue with --resume")
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            if RANK == 0:  # one process evaluates and saves while the others wait at the barrier
                val_loss = evaluate(model, val, cfg, tok, ctx, device)
                print(f"sft {it}/{cfg.max_iters} | val loss {val_loss:.4f}")
                print_samples(model, [r["prompt"] for r in val_rec], tok, cfg, device)
                if val_loss < best:
                    best = val_loss
                    save(best_path, it, best)
                save(last_path, it, best)
            barrier()
        if it == cfg.max_iters:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, cfg.lr, cfg.warmup_iters, cfg.max_iters)
        micros = []  # this rank's share of the step's grad_accum micro-batches
        for idx in step_indices(len(train), it, cfg):
            b = data.pad_right([train[j] for j in idx], tok.eot, bucket, cfg.max_len)
            micros.append((b["tokens"].to(device), b["loss_mask"].to(device)))
            tokens_seen += int(b["attn_mask"].sum())
        # the response tokens sft_loss averages over, in the whole step: every micro-batch of every rank
        n_all = all_sum(sum(m[:, 1:].sum() for _, m in micros))
        step_loss = 0.0
        for micro, (x, m) in enumerate(micros):
            with no_sync(tmodel, micro < cfg.grad_accum - 1):
                with ctx:
                    # The step's loss is (sum of all its token losses) / n_all. A micro-batch's share is
                    # sft_loss * n / n_all, with n its tokens (not 1 / grad_accum: a micro-batch of
                    # short responses would weigh its tokens more), times WORLD because DDP averages (not
                    # sums) the gradients over ranks: the update is then the single-process one on the
                    # step's whole batch (without torchrun, WORLD = 1).
                    loss = train_loss(x, m) * (m[:, 1:].sum() * WORLD / n_all)
                loss.backward()
            step_loss = step_loss + loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):  # one host sync per step: a NaN must never reach the weights
            # the norm is of the all-reduced gradient, so every rank raises here (and all_sums) alike
            raise UserError(f"sft step {it}: non-finite gradient norm (loss {global_loss(step_loss):.4g}); "
                            f"the last good checkpoint is {last_path}; try a lower --lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % cfg.log_interval == 0:
            dt = time.time() - t0
            loss_all, tokens_all = global_loss(step_loss), all_sum(torch.tensor(tokens_seen, device=device)).item()
            if RANK == 0:
                append_jsonl(dict(iter=it, loss=loss_all, lr=opt.param_groups[0]["lr"]), metrics)
            print(f"sft {it}/{cfg.max_iters} | loss {loss_all:.4f} | lr {opt.param_groups[0]['lr']:.2e} "
                  f"| {dt * 1000 / cfg.log_interval:.0f} ms/step | {tokens_all / dt:.0f} tok/s")
            t0, tokens_seen = time.time(), 0
    print(f"sft: best val loss {best:.4f}, saved {best_path}")


if __name__ == "__main__":
    main_guard(ddp_main(main))
