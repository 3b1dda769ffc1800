"""
GPT-2, exactly as OpenAI and Hugging Face compute it, plus what RLHF needs around it: converted
weights in and out, our own checkpoint format, and batched sampling with a preallocated KV cache.

    python gpt.py download gpt2                   # fetch + convert the official weights (needs internet)
    python gpt.py convert SRC DST                 # a Hugging Face checkpoint (dir or file) -> our .pt
    python gpt.py export CKPT DIR                 # our .pt -> model.safetensors + config.json for HF
    python gpt.py sample --ckpt=out/sft.pt --prompt="..."

References: Radford et al. 2019 (GPT-2); nanoGPT's model.py; Hugging Face's modeling_gpt2.py.
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

import hf
from data import Tokenizer
from hf import TOKEN_ROWS, load_checkpoint, load_weights, pad_rows, pad_vocab, save_checkpoint
from onednn import Linear
from util import UserError, main_guard


@dataclass
class GPTConfig:
    block_size: int = 1024   # max sequence length (HF: n_positions)
    vocab_size: int = 50257  # GPT-2 BPE; the built-in task renumbers a small subset (data.Tokenizer)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


CONFIGS = {  # name -> GPTConfig fields; the first four are the published checkpoints
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64),  # the shape of ../shared/fixtures
}

# -----------------------------------------------------------------------------
# the model

class KVCache:
    """Keys and values of every layer for one generate() call, allocated once at full length so a
    decode step writes in place (no torch.cat, no reallocation per token)."""

    def __init__(self, n_layer, B, n_head, T_max, head_size, device, dtype):
        self.k = torch.zeros(n_layer, B, n_head, T_max, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0  # positions filled so far; GPT.forward advances it after the last layer

    def update(self, layer, k, v):
        """Write this step's keys and values k, v: (B, nh, T, hs) at positions pos..pos+T-1 of
        `layer`, and return all keys and values so far: two tensors of shape (B, nh, pos+T, hs)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head

    def forward(self, x, mask=None, cache=None, layer=0):
        """Multi-head causal self-attention, x: (B, T, C) -> (B, T, C).
        q, k, v = c_attn(x) split into three (B, T, C), each reshaped to n_head heads (B, nh, T, hs),
        hs = C / nh. With a `cache`, k and v are first written to it with cache.update(layer, k, v),
        which returns the keys and values of all S positions so far; without one, S = T.
        att = softmax(q @ k^T / sqrt(hs)) over keys, where query i may attend to key j only if
        j <= i (causal; positions aligned at the right: query i sits at position S - T + i) and,
        when `mask` is given ((B, 1, T, S) bool, True = allowed), only where mask is True.
        y = att @ v: (B, nh, T, hs), heads concatenated back to (B, T, C), then c_proj(y)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs)
        # flash / memory-efficient kernels when they apply; GPT.forward builds `mask` with causality in it
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None, layer=0, first=0):
        """x: (B, T, C) -> (B, T - first, C), positions first..T-1; the others still give keys and values."""
        x = x[:, first:] + self.attn(self.ln_1(x), mask, cache, layer)[:, first:]  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


def attention_mask_4d(attention_mask, T):
    """attention_mask: (B, S) 1 on real tokens, for all S keys; the last T of them are the queries.
    Returns (B, 1, T, S) bool: causal, and no query sees a padding key. A padding query still sees
    itself, so that its softmax has one finite entry (its output is garbage and never used)."""
    S = attention_mask.size(1)
    q = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1) absolute positions
    k = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    allowed = (k <= q) & (attention_mask[:, None, :].bool() | (k == q))  # (B, T, S)
    return allowed[:, None]  # (B, 1, T, S)


def position_ids(attention_mask):
    """(B, S) mask -> (B, S) positions that start at 0 at each row's first real token. GPT-2 does not
    derive positions from the mask: after left padding, arange(S) would shift every prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class GPT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5),
        ))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scales residual projections by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # Token rows padded to a multiple of 64 (50257 -> 50304), for GPU matmul tiles as in nanoGPT. On
        # CPU the LM head's matmul at 1024 tokens drops 657 -> 535 ms, but cutting the padding columns off
        # costs about as much: an SFT step is unchanged. The extra rows are zero, never looked up, and
        # their logits are cut off (head()), so never sampled. Padded after the random init, so a seed
        # still gives the model it gave before.
        self.n_rows = -(-cfg.vocab_size // 64) * 64
        wte = self.transformer.wte
        wte.weight = nn.Parameter(pad_rows(wte.weight.detach(), self.n_rows))
        wte.num_embeddings = self.lm_head.out_features = self.n_rows
        self.lm_head.weight = wte.weight  # tied again

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, tokens, attention_mask=None, cache=None, first=0):
        """Final hidden states (B, T - first, C) after ln_f at positions first..T-1 (all by default):
        the trunk that the LM head, the reward head and the value head sit on. tokens: (B, T).
        attention_mask: None (no padding, or right padding only) or (B, S) over every position so
        far, S = cache.pos + T (just T without a cache)."""
        B, T = tokens.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise UserError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        if attention_mask is None:
            attention_mask = torch.ones(B, start + T, dtype=torch.long, device=tokens.device)
            mask = None if cache is None else attention_mask_4d(attention_mask, T)
        else:
            mask = attention_mask_4d(attention_mask, T)
        pos = position_ids(attention_mask)[:, -T:]  # (B, T)
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            # Positions before `first` only feed the last block keys and values: it skips their MLP.
            # PPO (first = the last prompt column; prompt 64 + response 32): update 5.41 -> 5.10 s (bench.py).
            x = block(x, mask, cache, i, first if i == len(self.transformer.h) - 1 else 0)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, tokens, attention_mask=None, cache=None, first=0):
        """Logits (B, T - first, V) at positions first..T-1 (all by default); see hidden() for the
        other arguments. PPO asks for the response positions only: the LM head is 30% of GPT-2
        small's FLOPs per token, and its (B, T, 50257) output the largest tensor of a step."""
        return self.head(self.hidden(tokens, attention_mask, cache, first))

    def head(self, h):
        """Hidden states (..., C) -> logits (..., V) over the real vocabulary (not the padding rows)."""
        return self.lm_head(h)[..., :self.config.vocab_size]

    @classmethod
    def from_pretrained(cls, src):
        """A GPT from a published name ("gpt2", downloaded once), our own .pt checkpoint, or a
        Hugging Face checkpoint (directory, model.safetensors or pytorch_model.bin)."""
        if src in hf.HUB_NAMES:
            src = hf.download(src)
        if src.endswith(".pt"):
            ck = load_checkpoint(src)
            return model_from_checkpoint(ck)
        return load_hf(src)

# -----------------------------------------------------------------------------
# sampling

def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Draw one token per row from logits (B, V) -> (B,). temperature 0 means greedy (argmax).
    Otherwise p = softmax(logits / temperature), restricted to the top_k most likely tokens
    (0 = all) and then to the smallest set whose probability reaches top_p (1.0 = all)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keeps the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # inverse-CDF sampling, one uniform draw per row: torch.multinomial draws an exponential per
    # vocabulary entry, ~8 ms a step for GPT-2's 50257 tokens at B=8 on 2 CPU cores (bench.py)
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = 1 - torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)  # in (0, 1]: never a 0-probability token
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.size(-1) - 1).squeeze(-1)


@torch.no_grad()
def generate(model, prompt, prompt_mask, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             eos_id=None, generator=None, use_cache=True, return_logprobs=False):
    """Sample continuations of a left-padded batch of prompts: prompt (B, P), prompt_mask (B, P)
    1 on real tokens. A row stops after it emits eos_id; later positions hold eos_id as padding.
    Returns tokens (B, P + N) and gen_mask (B, P + N), 1 on generated tokens (each row's eos
    included), N <= max_new_tokens (fewer when every row stopped early); with return_logprobs
    also (B, P + N) log-probs of the generated tokens under softmax(logits / temperature) (before
    top_k / top_p), 0 elsewhere: PPO's rollout log-probs, without another forward pass."""
    B, P = prompt.shape
    pad = 0 if eos_id is None else eos_id
    tokens = torch.full((B, P + max_new_tokens), pad, dtype=torch.long, device=prompt.device)
    tokens[:, :P] = prompt
    mask = torch.zeros_like(tokens)
    mask[:, :P] = prompt_mask
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    logprobs = torch.zeros(tokens.shape, device=prompt.device)
    cfg = model.config
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        if torch.is_autocast_enabled(prompt.device.type):
            dtype = torch.get_autocast_dtype(prompt.device.type)
        cache = KVCache(cfg.n_layer, B, cfg.n_head, P + max_new_tokens, cfg.n_embd // cfg.n_head,
                        prompt.device, dtype)
    for t in range(P, P + max_new_tokens):
        start = cache.pos if use_cache else 0  # with a cache, feed only the tokens it has not seen
        h = model.hidden(tokens[:, start:t], mask[:, :t], cache)[:, -1]  # (B, C)
        logits = model.head(h)  # (B, V): only the last position, the prefill's other logits are never used
        nxt = sample_token(logits.float(), temperature, top_k, top_p, generator)
        if return_logprobs:
            logprobs[:, t] = torch.log_softmax(logits.float() / temperature, -1).gather(1, nxt[:, None]).squeeze(1) * ~done
        tokens[:, t] = torch.where(done, pad, nxt)
        mask[:, t] = (~done).long()
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():  # one host sync per step, and it saves the rest of the steps
                t += 1
                break
    else:
        t = P + max_new_tokens
    gen_mask = mask.clone()
    gen_mask[:, :P] = 0
    return (tokens[:, :t], gen_mask[:, :t]) + ((logprobs[:, :t],) if return_logprobs else ())

# -----------------------------------------------------------------------------
# models from checkpoints: ours (hf.load_checkpoint) and Hugging Face's (hf.read_hf)

def model_from_checkpoint(ck, path="checkpoint"):
    model = GPT(GPTConfig(**ck["config"]))
    load_weights(model, ck["model"], path, ck["config"])
    return model


def load_hf(src):
    """A GPT from a Hugging Face GPT-2 checkpoint (see hf.read_hf); every key of the file must be
    used and every shape must match, or it is a one-line error naming the key."""
    path, cfg, sd = hf.read_hf(src)
    model = GPT(GPTConfig(**cfg))
    own = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    sd = pad_vocab(sd, own, cfg["vocab_size"])
    for k in sorted(set(own) - set(sd)):
        raise UserError(f"{path}: key {k!r} missing (truncated or not a GPT-2 checkpoint?)")
    for k in sorted(set(sd) - set(own)):
        raise UserError(f"{path}: unexpected key {k!r}")
    with torch.no_grad():
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise UserError(f"{path}: key {k!r} has shape {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}")
            own[k].copy_(v)
    return model


def export_hf(model, out_dir):
    """Write a GPT in GPT-2's Hugging Face layout (model.safetensors + config.json)."""
    sd = {k: v[:model.config.vocab_size] if k in TOKEN_ROWS else v for k, v in model.state_dict().items()}  # no padding rows
    hf.write_hf(asdict(model.config), sd, out_dir)

# -----------------------------------------------------------------------------
# command line

def sample_main(argv):
    opts = dict(ckpt="", prompt="\n", n=3, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            raise UserError(f"unknown option --{k}; valid: {', '.join('--' + o for o in opts)}")
        opts[k] = type(opts[k])(v)
    if not opts["ckpt"]:
        raise UserError("--ckpt=PATH is required (a .pt from sft.py/ppo.py/gpt.py convert, or an HF dir)")
    ck = load_checkpoint(opts["ckpt"]) if opts["ckpt"].endswith(".pt") else None
    model = model_from_checkpoint(ck, opts["ckpt"]) if ck else load_hf(opts["ckpt"])
    tok = Tokenizer(ck.get("vocab") if ck else None)
    ids = torch.tensor([tok.encode(opts["prompt"])] * opts["n"])
    g = torch.Generator().manual_seed(opts["seed"])
    out, gen = generate(model.eval(), ids, torch.ones_like(ids), opts["max_new_tokens"], opts["temperature"],
                        opts["top_k"], opts["top_p"], tok.eot, g)
    for row, m in zip(out, gen):
        print(opts["prompt"] + tok.decode(row[m.bool()].tolist()).replace("<|endoftext|>", ""))
        print("-" * 40)


def main(argv):
    usage = "usage: python gpt.py {download NAME | convert SRC DST | export CKPT DIR | sample --ckpt=... --prompt=...}"
    if not argv or argv[0] not in ("download", "convert", "export", "sample"):
        raise UserError(usage)
    cmd, args = argv[0], argv[1:]
    if cmd == "sample":
        return sample_main(args)
    if len(args) != {"download": 1, "convert": 2, "export": 2}[cmd]:
        raise UserError(usage)
    if cmd == "download":
        out = os.path.join(hf.CACHE_DIR, f"{args[0]}.pt")
        save_checkpoint(out, load_hf(hf.download(args[0])), "pretrained", source=args[0])
        print(f"wrote {out}")
    elif cmd == "convert":
        save_checkpoint(args[1], load_hf(args[0]), "pretrained", source=args[0])
        print(f"wrote {args[1]}")
    else:
        ck = load_checkpoint(args[0], ("pretrained", "sft", "ppo"))
        export_hf(model_from_checkpoint(ck, args[0]), args[1])
        print(f"wrote {args[1]}/model.safetensors and config.json")


if __name__ == "__main__":
    main_guard(main)
