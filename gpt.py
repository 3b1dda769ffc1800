"""
GPT-2, exactly as OpenAI and Hugging Face compute it, and batched sampling with a preallocated
KV cache. This file imports torch and nothing else: copy it into your own project, as nanoGPT's
model.py. It loads our converted checkpoints (`GPT.from_checkpoint("gpt2.pt")`); hf.py converts
Hugging Face's weights to them (`python hf.py download gpt2`), sample.py is a command line sampler.

References: Radford et al. 2019 (GPT-2); nanoGPT's model.py; Hugging Face's modeling_gpt2.py;
gpt-fast (static KV cache, a decode step replayed as a CUDA graph).
"""
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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
# The attention kernels F.scaled_dot_product_attention may choose, in prefill, decode and training.
# Never cuDNN's, which PyTorch >= 2.9 prefers on Hopper: it builds a plan for every new sequence
# shape (150-280 ms each on an H200), and in decoding every step is a new shape.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
TOKEN_ROWS = ("transformer.wte.weight", "lm_head.weight")  # (V, C) in files, padded in the model

# -----------------------------------------------------------------------------
# the model

class KVCache:
    """Keys and values of every layer for one generate() call, allocated once at full length so a
    decode step writes in place (no torch.cat, no reallocation per token)."""

    def __init__(self, n_layer, B, n_head, T_max, head_size, device, dtype):
        self.k = torch.zeros(n_layer, B, n_head, T_max, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0  # positions filled so far; GPT.hidden advances it after the last layer

    def update(self, layer, k, v):
        """Write this step's keys and values k, v: (B, nh, T, hs) at positions pos..pos+T-1 of
        `layer` (into self.k and self.v, in place), and return all keys and values so far: two
        views of the cache of shape (B, nh, pos+T, hs), the cache's dtype and device.
        pos itself is left alone: every layer writes at the same positions, and GPT.hidden
        advances pos once, after the last layer. pos+T past T_max is a ValueError naming both."""
        end = self.pos + k.size(2)
        if end > self.k.size(3):  # the slice assignment's own error names neither
            raise ValueError(f"KVCache.update: pos+T = {end} exceeds the cache's length T_max={self.k.size(3)}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class StaticKVCache(KVCache):
    """A KVCache whose decode steps have the same shapes at every token, so that a CUDA graph can
    replay them: the prefill writes as KVCache does (index None); then the caller sets `index`, a (1,)
    long tensor, and GPT.decode_step writes one column there and attends over all T_max columns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.index = None  # None during the prefill

    def update(self, layer, k, v):
        if self.index is None:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.index, k)  # (B, nh, T_max, hs)
        self.v[layer].index_copy_(2, self.index, v)
        return self.k[layer], self.v[layer]


class CausalSelfAttention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        if cfg.n_embd % cfg.n_head:  # not an assert: python -O would drop it
            raise ValueError(f"n_embd={cfg.n_embd} must be a multiple of n_head={cfg.n_head}")
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head = cfg.n_head

    def forward(self, x, mask=None, cache=None, layer=0):
        """Multi-head causal self-attention, x: (B, T, C) -> (B, T, C).
        q, k, v = c_attn(x) split into three (B, T, C), each reshaped to n_head heads (B, nh, T, hs),
        hs = C / nh. With a `cache`, k and v are first written to it with cache.update(layer, k, v),
        which returns the keys and values of all S positions so far; without one, S = T.
        att = softmax(q @ k^T / sqrt(hs)) over keys. Without `mask`, query i may attend to key j only
        if j is not after it (causal, positions aligned at the right: query i sits at position
        S - T + i, key j at j). A `mask` ((B, 1, T, S) bool, True = allowed) is the whole rule
        instead: query i attends exactly where mask[:, :, i] is True (GPT.hidden builds it, with
        causality in it, whenever a cache holds earlier positions or there is padding).
        y = att @ v: (B, nh, T, hs), heads concatenated back to (B, T, C), then c_proj(y).
        The result is on x's device, in x's dtype (under autocast, the autocast dtype)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs)
        # flash / memory-efficient kernels when they apply; GPT.forward builds `mask` with causality in it
        if mask is None and k.size(2) > T:  # queries after cached keys: is_causal would align them at the left
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

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
    """(B, S) mask -> (B, S) positions that start at 0 at each row's first real token (left padding gets 0,
    a masked position later repeats the one before). GPT-2 does not derive positions from the mask:
    after left padding, arange(S) would shift every prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def pad_rows(t, n):
    """t (V, C) with zero rows appended up to n rows."""
    return torch.cat([t, t.new_zeros(n - t.size(0), t.size(1))])


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
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scales residual projections by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        # Token rows padded to a multiple of 64 (50257 -> 50304), for GPU matmul tiles as in nanoGPT.
        # The extra rows are zero, never looked up, and their logits are cut off (head()), so never
        # sampled. Padded after the random init, so a seed still gives the model it gave before.
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
        far, S = cache.pos + T (just T without a cache); a cache holds B rows and is advanced by T.
        Token ids must be < vocab_size: ids up to the padded row count would embed as zeros, unchecked."""
        B, T = tokens.size()
        start = cache.pos if cache is not None else 0
        if cache is not None and cache.k.size(1) != B:  # else the write broadcasts and a reshape fails later
            raise ValueError(f"a KV cache of {cache.k.size(1)} rows for a batch of {B}")
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        given = attention_mask is not None
        if given and attention_mask.shape != (B, start + T):  # a (B, 1) mask would broadcast: wrong logits, no error
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)}: expected (B, cache.pos + T) = {(B, start + T)}")
        attention_mask = attention_mask if given else torch.ones(B, start + T, dtype=torch.long, device=tokens.device)
        mask = attention_mask_4d(attention_mask, T) if given or cache is not None else None
        pos = position_ids(attention_mask)[:, -T:]  # (B, T)
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)  # (B, T, C)
        with sdpa_kernel(ATTENTION_BACKENDS):
            for i, block in enumerate(self.transformer.h):
                # Positions before `first` only feed the last block keys and values: it skips their MLP
                # (PPO scores responses with first = the last prompt column).
                x = block(x, mask, cache, i, first if i == len(self.transformer.h) - 1 else 0)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, tokens, attention_mask=None, cache=None, first=0, padded=False):
        """Logits (B, T - first, V) at positions first..T-1 (all by default); see hidden() for the
        other arguments, head() for padded. PPO asks for the response positions only: the LM head is
        30% of GPT-2 small's FLOPs per token, and its (B, T, 50257) output the largest tensor of a step."""
        return self.head(self.hidden(tokens, attention_mask, cache, first), padded)

    def head(self, h, padded=False):
        """Hidden states (..., C) -> logits (..., V) over the real vocabulary (not the padding rows), or
        with padded=True (..., n_rows), the padding columns -inf: for a loss, whose softmax is then the
        same, and the backward has no slice to undo (a copy of the whole gradient: 4% of a GPU SFT step).
        An entropy or a KL over padded logits must take p log p = 0 where p = 0 (0 x -inf is nan)."""
        z = self.lm_head(h)
        if not padded:
            return z[..., :self.config.vocab_size]
        z[..., self.config.vocab_size:] = float("-inf")  # in place: the matmul's backward never reads z
        return z

    def decode_step(self, token, attention_mask, cache):
        """One token per row through a StaticKVCache, with the same shapes at every step: token (B, 1)
        sits at column cache.index; attention_mask (B, T_max) is 1 on the real tokens so far, this one
        included, and 0 on every later column. Returns its logits (B, V)."""
        pos = (attention_mask.sum(1, keepdim=True) - 1).clamp(min=0)  # (B, 1): position_ids at this column
        cols = torch.arange(attention_mask.size(1), device=token.device)
        mask = (attention_mask.bool() | (cols == cache.index))[:, None, None, :]  # (B, 1, 1, T_max)
        x = self.transformer.wte(token) + self.transformer.wpe(pos)  # (B, 1, C)
        with sdpa_kernel(ATTENTION_BACKENDS):
            for i, block in enumerate(self.transformer.h):
                x = block(x, mask, cache, i)
        return self.head(self.transformer.ln_f(x[:, -1]))  # (B, V)

    @classmethod
    def from_checkpoint(cls, path, map_location="cpu"):
        """A GPT from one of our .pt files ({"config": GPTConfig fields, "model": state dict}, as sft.py,
        ppo.py and `python hf.py convert` write them), on the device map_location, in float32 whatever the
        file holds, in train mode (no dropout: it computes what eval mode does). Unpadded token rows are padded."""
        ck = torch.load(path, map_location=map_location, weights_only=True)  # never unpickles code
        model = cls(GPTConfig(**ck["config"]))
        model.load_state_dict({k: pad_rows(v, model.n_rows) if k in TOKEN_ROWS and v.size(0) == model.config.vocab_size
                               else v for k, v in ck["model"].items()})
        return model.to(map_location)  # load_state_dict copies into the model where it was built

# -----------------------------------------------------------------------------
# sampling

def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Draw one token per row from logits (B, V) -> (B,). temperature 0 means greedy (argmax).
    Otherwise p = softmax(logits / temperature) in float32 at least (bf16 would round most small
    probabilities to 0), restricted to the top_k most likely tokens (0 = all; every token tied with the
    k-th is kept) and then, renormalised, to the smallest set whose probability reaches top_p (1.0 = all;
    the most likely token is always kept)."""
    for name, value in (("temperature", temperature), ("top_k", top_k)):
        if not value >= 0:  # a temperature < 0 would sample the inverted distribution, a top_k < 0 mean all; nan too
            raise ValueError(f"sample_token: {name}={value}: must be >= 0")
    if top_p != top_p:  # nan: no cut at all, silently
        raise ValueError("sample_token: top_p=nan: must be a number")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keeps the token that crosses top_p
        drop[:, 0] = False  # and the most likely one, even at top_p <= 0
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # inverse-CDF sampling, one uniform draw per row: torch.multinomial draws an exponential per
    # vocabulary entry, a large part of a CPU decode step for GPT-2's 50257 tokens
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = 1 - torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)  # in (0, 1]: never a 0-probability token
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.size(-1) - 1).squeeze(-1)


class DecodeGraph:
    """GPT.decode_step captured once as a CUDA graph and replayed at every token: one launch instead
    of ~250 kernels, whose launches, not the GPU, bound a decode step of GPT-2 small. Owns the
    static buffers the graph reads and writes: the cache, its index, the token and the mask."""

    def __init__(self, model, B, T_max, dtype, device):
        cfg = model.config
        self.cache = StaticKVCache(cfg.n_layer, B, cfg.n_head, T_max, cfg.n_embd // cfg.n_head, device, dtype)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(B, T_max, dtype=torch.long, device=device)
        self.graph = None

    def __call__(self, model):
        self.cache.index = self.index
        if self.graph is None:  # captured at the first step: the warm-up runs write what this step writes anyway
            # Under autocast, fp32 weights are cast once per autocast region and the cast cached; a graph
            # would keep reading the cached copy after the region has freed it. Without the cache, the
            # casts are in the graph (ppo.py samples with a bf16 copy of the policy: no casts at all).
            # On the buffers' GPU, which need not be the current one: a new stream sits on the current GPU,
            # and a capture there records none of this GPU's kernels.
            on, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
            with torch.autocast("cuda", dtype, enabled=on, cache_enabled=False), torch.cuda.device(self.index.device):
                self.capture(model)
        self.graph.replay()
        return self.logits

    def capture(self, model):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_step(self.token, self.mask, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):  # not its default stream, made once on the GPU current then
            self.logits = model.decode_step(self.token, self.mask, self.cache)


_graphs = weakref.WeakKeyDictionary()  # model -> (its weights' addresses, {(B, T_max, dtype, autocast): DecodeGraph})
MAX_GRAPHS = 4  # kept per model, the last used: each holds a KV cache (GPT-2 small, 64 x 512 columns: 1.2 GB in bf16)


def decode_graph(model, B, T_max, dtype, device):
    """The DecodeGraph of this model and shape, captured on first use; the MAX_GRAPHS last used are kept.
    A graph reads the weights at the addresses it was captured with: in-place updates (optimizer steps,
    load_state_dict) are seen, and new weight tensors (model.to(), a new parameter) mean new graphs."""
    ptrs = tuple(p.data_ptr() for p in model.parameters())
    if _graphs.get(model, (None,))[0] != ptrs:
        _graphs[model] = (ptrs, {})
    graphs, key = _graphs[model][1], (B, T_max, dtype, torch.is_autocast_enabled("cuda"))
    graph = graphs.pop(key, None) or DecodeGraph(model, B, T_max, dtype, device)
    if len(graphs) >= MAX_GRAPHS:
        del graphs[next(iter(graphs))]  # the least recently used: a dict keeps its insertion order
    graphs[key] = graph
    return graph


@torch.no_grad()
def generate(model, prompt, prompt_mask, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
             eos_id=None, generator=None, use_cache=True, return_logprobs=False, static=False):
    """Sample continuations of a left-padded batch of prompts: prompt (B, P) of ids < vocab_size,
    prompt_mask (B, P) 1 on real tokens, each row 0s then 1s, its last column 1 (else a ValueError);
    P + max_new_tokens - 1 <= block_size. temperature, top_k, top_p: as sample_token's.
    A row stops after it emits eos_id; later positions hold eos_id as padding.
    Returns tokens (B, P + N) and gen_mask (B, P + N), 1 on generated tokens (each row's eos
    included), N <= max_new_tokens (fewer when every row stopped early); with return_logprobs
    also (B, P + N) float32 log-probs of the generated tokens under softmax(logits / temperature)
    (before top_k / top_p; 0 when greedy), 0 elsewhere. use_cache=False runs the whole sequence at every
    step (a reference for tests). static=True (whatever use_cache) decodes with GPT.decode_step, the same
    shapes at every step; on CUDA that step is a CUDA graph (DecodeGraph), replayed at every token."""
    B, P = prompt.shape
    device, cfg, T, pad = prompt.device, model.config, P + max_new_tokens, 0 if eos_id is None else eos_id
    for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_k", top_k)):
        if not value >= 0:  # checked before the prefill's cost (sample_token checks the last two again)
            raise ValueError(f"generate: {name}={value}: must be >= 0")
    if P + max_new_tokens - 1 > cfg.block_size:  # the last token is sampled, never fed back
        raise ValueError(f"{P} prompt + {max_new_tokens} new tokens exceed block_size={cfg.block_size} + 1")
    m = prompt_mask.long()
    if B and not (P and (m[:, -1] == 1).all() and (m.diff(dim=1) >= 0).all()):  # else a row samples from padding
        raise ValueError("generate: prompt_mask must be left padding: in every row 0s, then 1s to the last column")
    if B and P and not ((prompt >= 0) & (prompt < cfg.vocab_size)).all():  # ids past V would embed as zeros
        raise ValueError(f"generate: prompt ids must be in 0..{cfg.vocab_size - 1}")
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type) and dtype != torch.float64:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(device.type)
    graph = None
    if static and device.type == "cuda":
        graph = decode_graph(model, B, -(-T // 64) * 64, dtype, device)  # a few cache widths, a few graphs
        cache, mask = graph.cache, graph.mask
        cache.pos, cache.index = 0, None  # the prefill writes as a KVCache
        mask.zero_()
    else:
        kind = StaticKVCache if static else KVCache if use_cache else None
        cache = kind(cfg.n_layer, B, cfg.n_head, T, cfg.n_embd // cfg.n_head, device, dtype) if kind else None
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
    tokens = torch.full((B, T), pad, dtype=torch.long, device=device)
    tokens[:, :P], mask[:, :P] = prompt, prompt_mask
    done, logprobs = torch.zeros(B, dtype=torch.bool, device=device), torch.zeros(B, T, dtype=torch.float32, device=device)
    sync_every = 1 if device.type == "cpu" else 8  # `done.all()` waits for the GPU: not at every token there
    for t in range(P, T):
        if t == P or cache is None:  # the prefill (and every step without a cache)
            logits = model.head(model.hidden(tokens[:, :t], mask[:, :t], cache)[:, -1])  # (B, V)
        elif graph is not None:
            graph.token.copy_(tokens[:, t - 1:t])
            graph.index.fill_(t - 1)
            logits = graph(model)
        elif static:
            cache.index = torch.tensor([t - 1], device=device)
            logits = model.decode_step(tokens[:, t - 1:t], mask, cache)
        else:  # feed only the token the cache has not seen
            logits = model.head(model.hidden(tokens[:, t - 1:t], mask[:, :t], cache)[:, -1])
        nxt = sample_token(logits.float(), temperature, top_k, top_p, generator)
        if return_logprobs and temperature > 0:  # greedy: log 1 = 0
            lp = torch.log_softmax(logits.float() / temperature, -1).gather(1, nxt[:, None]).squeeze(1)  # (B,)
            logprobs[:, t] = torch.where(done, 0.0, lp)  # not lp * ~done: a -inf times 0 is nan
        tokens[:, t] = torch.where(done, pad, nxt)
        mask[:, t] = (~done).long()
        if eos_id is not None:
            done |= nxt == eos_id
            if (t - P) % sync_every == sync_every - 1 and done.all():  # it saves the rest of the steps
                break
    gen_mask = torch.cat([torch.zeros_like(mask[:, :P]), mask[:, P:T]], 1)  # (B, T): the prompt's columns 0
    t = int(gen_mask.any(0).nonzero().max()) + 1 if gen_mask.any() else P  # after the last generated token
    return (tokens[:, :t], gen_mask[:, :t]) + ((logprobs[:, :t],) if return_logprobs else ())
