"""
Where the compiled SFT step's time goes on a GPU, and what some changes to it would buy: bench.py's
SFT step (GPT-2 small, 16 x 1024 random tokens, bf16 autocast, fused AdamW, torch.compile specialised
to the shape) timed as it is (`head`), as it was (`ce`) and as variants that are not in the code:
    ce        sft.sft_loss (cross_entropy) on model(x)'s logits, sliced to the real vocabulary (until 2026-11-28)
    head      the step as sft.py and bench.py run it: sft_loss on model(x, padded=True) (padding columns -inf)
    where     a loss whose backward is pointwise: logsumexp minus the target's logit picked by a where
    cudnn     `where`, with cuDNN attention allowed (what gpt.ATTENTION_BACKENDS rules out: per-shape plans)
    graphs    `where`, compiled with mode="reduce-overhead" (CUDA graphs)
    autotune  `where`, compiled with mode="max-autotune-no-cudagraphs" (minutes of autotuning)
    padded    `where` on the LM head's 50304 columns, the 47 padding ones masked by a where
    flex      `padded`, attention by flex_attention (Triton kernels compiled for the causal block mask)
    tuned     `padded`, with inductor's coordinate-descent tuning of its Triton kernels (as gpt-fast)
    chunked   the LM head and the loss fused: its gradients computed in the forward, 4 chunks of rows
    best      `head` with flex_attention and coordinate-descent tuning: the two gains measured apart, together
    best_graphs  `best` compiled with mode="reduce-overhead" (CUDA graphs)
Run from the repo root on a GPU machine (`bash .ci/gpu.sh variants`): python3 .ci/sft_variants.py [names].
One JSON line per variant (ms a step over 10 steps after 3 warm-ups, MFU of bench.py, peak GiB, and
for the profiled ones the GPU time by kind), and torch.profiler's table in $OUT/variant_<name>.txt.
"""
import json
import os
import sys
import time

import torch
import torch._inductor.config
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.getcwd())
import gpt  # noqa: E402
from bench import flops_per_token, kind_of, peak_flops  # noqa: E402
from sft import sft_loss  # noqa: E402
from util import make_optimizer  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/gpuout")
B, T = 16, 1024
BACKENDS = list(gpt.ATTENTION_BACKENDS)


def where_loss(logits, tokens, loss_mask):
    """sft_loss with -log softmax(z)[y] = logsumexp(z) - sum_v [v == y] z_v: compiled, its backward is
    one pointwise kernel (cross_entropy's sums each row again), fused with un-slicing the padded vocab."""
    targets, m = torch.roll(tokens, -1, dims=1), torch.roll(loss_mask, -1, dims=1)
    m[:, -1] = 0
    z = logits.float()
    hit = torch.arange(z.size(-1), device=z.device) == targets.unsqueeze(-1)
    nll = torch.logsumexp(z, -1) - torch.where(hit, z, 0).sum(-1)
    return torch.where(m.bool(), nll, 0).sum() / m.sum()


def padded_loss(model, x, ones):
    """where_loss on the padded head's logits (B, T, 50304), the padding columns masked to -inf."""
    z = model.lm_head(model.hidden(x)).float()
    z = torch.where(torch.arange(z.size(-1), device=z.device) < model.config.vocab_size, z, float("-inf"))
    return where_loss(z, x, ones)


class LinearCE(torch.autograd.Function):
    """mean over rows with m = 1 of logsumexp(h W^T) - (h W^T)[y], masked to the real vocabulary V; the
    gradients (softmax - onehot) / n through W computed in the forward, chunk by chunk (Liger's way)."""

    @staticmethod
    def forward(ctx, h, W, y, m, V):
        n, hb, Wb = m.sum(), h.to(torch.bfloat16), W.to(torch.bfloat16)
        dh, dW, loss = [], torch.zeros_like(W), h.new_zeros((), dtype=torch.float32)
        cols = torch.arange(W.size(0), device=h.device)
        for hc, yc, mc in zip(hb.chunk(4), y.chunk(4), m.chunk(4)):
            z = torch.where(cols < V, (hc @ Wb.t()).float(), float("-inf"))
            lse = torch.logsumexp(z, -1, keepdim=True)
            hit = cols == yc[:, None]
            loss = loss + (mc * (lse.squeeze(-1) - torch.where(hit, z, 0).sum(-1))).sum()
            g = ((torch.exp(z - lse) - hit.float()) * (mc / n)[:, None]).to(torch.bfloat16)
            dh.append(g @ Wb)
            dW += (g.t() @ hc).float()
        ctx.save_for_backward(torch.cat(dh).to(h.dtype), dW)
        return loss / n

    @staticmethod
    def backward(ctx, go):
        dh, dW = ctx.saved_tensors
        return dh * go, dW * go, None, None, None


def chunked_loss(model, x, ones):
    h = model.hidden(x)
    m = torch.roll(ones, -1, dims=1)
    m[:, -1] = 0
    C = h.size(-1)
    return LinearCE.apply(h.reshape(-1, C), model.lm_head.weight, torch.roll(x, -1, dims=1).reshape(-1),
                          m.reshape(-1).float(), model.config.vocab_size)


def flex_sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
    """F.scaled_dot_product_attention's causal case by flex_attention, with the block mask run() built."""
    from torch.nn.attention.flex_attention import flex_attention
    if attn_mask is not None or not is_causal:
        return SDPA(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
    return flex_attention(q, k, v, block_mask=BLOCK_MASKS[q.size(-2)])


SDPA, BLOCK_MASKS = torch.nn.functional.scaled_dot_product_attention, {}
logits_loss = lambda loss: lambda model, x, ones: loss(model(x), x, ones)  # noqa: E731
head_loss = lambda model, x, ones: sft_loss(model(x, padded=True), x, ones)  # noqa: E731
VARIANTS = dict(ce=dict(loss=logits_loss(sft_loss)), head=dict(loss=head_loss),
                where=dict(loss=logits_loss(where_loss)),
                cudnn=dict(loss=logits_loss(where_loss), cudnn=True),
                graphs=dict(loss=logits_loss(where_loss), mode="reduce-overhead", profile=False),
                autotune=dict(loss=logits_loss(where_loss), mode="max-autotune-no-cudagraphs"),
                padded=dict(loss=padded_loss), flex=dict(loss=padded_loss, flex=True),
                tuned=dict(loss=padded_loss, tuned=True), chunked=dict(loss=chunked_loss),
                best=dict(loss=head_loss, flex=True, tuned=True),
                best_graphs=dict(loss=head_loss, flex=True, tuned=True, mode="reduce-overhead", profile=False))


def run(name, loss, mode="default", cudnn=False, profile=True, steps=10, flex=False, tuned=False):
    torch._dynamo.reset()
    torch.nn.functional.scaled_dot_product_attention = flex_sdpa if flex else SDPA
    if flex:  # built before tracing: the causal mask's blocks, once for the shape
        from torch.nn.attention.flex_attention import create_block_mask
        BLOCK_MASKS[T] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
    torch._inductor.config.coordinate_descent_tuning = tuned
    torch.manual_seed(0)
    gpt.ATTENTION_BACKENDS[:] = ([SDPBackend.CUDNN_ATTENTION] if cudnn else []) + BACKENDS  # read at trace time
    cfg = gpt.GPTConfig()
    model = gpt.GPT(cfg).cuda()
    x = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    ones = torch.ones_like(x)
    loss_fn = torch.compile(lambda x: loss(model, x, ones), mode=mode)
    opt = make_optimizer(model.parameters(), 1e-4, 0.1)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            out = loss_fn(x)
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out
    t0 = time.time()
    for _ in range(3):
        first = step().item()  # read at once: CUDA graphs overwrite their outputs at the next replay
    warm = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / steps
    r = dict(name=name, ms=round(ms, 2), mfu=round(B * T / ms * 1e3 * flops_per_token(cfg, T) / peak_flops("cuda", "bfloat16"), 4),
             loss=first, compile_and_warmup_s=round(warm, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))
    if profile:  # kernels only: with CPU activity too, a compiled kernel is counted twice
        from torch.profiler import ProfilerActivity, profile as profiler
        with profiler(activities=[ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        events, kinds = p.key_averages(), {}
        for e in events:
            kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0) + e.self_device_time_total / 1e3
        r["gpu_ms_by_kind"] = {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        with open(f"{OUT}/variant_{name}.txt", "w") as f:
            f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90) + "\n")
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in sys.argv[1:] or ["ce", "head"]:
        if name not in VARIANTS:
            sys.exit(f"sft_variants.py: {name}: expected one of {', '.join(VARIANTS)}")
        try:
            run(name, **VARIANTS[name])
        except Exception as e:  # one failed variant leaves the others to run
            print(f"{name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
