"""Tests of gpt.py against independent references: Hugging Face's recorded logits, naive loops,
uncached decoding, and each prompt decoded alone."""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import GPT, GPTConfig, KVCache, generate
from checks import assert_close

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "fixtures")
TINY = os.path.join(FIX, "hf-gpt2-tiny")
HUB = os.path.join(FIX, "hf-gpt2-tiny-hub-layout")


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=4, n_embd=32, block_size=48, vocab_size=97)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def naive_attention(attn, x, allowed=None, scale=None):
    """Loop over batch, head and query: softmax over the keys j that query i may see (allowed (B, 1, T, T)
    bool, True = allowed; causal j <= i by default) of q.k * scale, scale = 1/sqrt(hs)."""
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    scale = hs ** -0.5 if scale is None else scale
    q, k, v = attn.c_attn(x).split(C, dim=2)
    y = torch.zeros(B, T, C, dtype=x.dtype)
    for b in range(B):
        for h in range(nh):
            sl = slice(h * hs, (h + 1) * hs)
            for i in range(T):
                js = [j for j in range(T) if (j <= i if allowed is None else allowed[b, 0, i, j])]
                w = torch.softmax(torch.stack([q[b, i, sl] @ k[b, j, sl] * scale for j in js]), 0)
                y[b, i, sl] = sum(wj * v[b, j, sl] for wj, j in zip(w, js))
    return attn.c_proj(y)


def test_attention_matches_naive_loop():
    model = tiny().double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        assert_close("CausalSelfAttention(x), no mask or cache", attn(x), naive_attention(attn, x), 1e-10,
                     [("no causal mask: query i sees keys j <= i only", naive_attention(attn, x, torch.ones(2, 1, 7, 7))),
                      ("scores scaled by 1/hs: it is 1/sqrt(hs)", naive_attention(attn, x, scale=1 / 8))],
                     "softmax over the keys (last dim) of q k^T / sqrt(hs); heads split (B, nh, T, hs) and merged back")


def test_attention_in_training_mode_is_the_same_function():
    """sft.py and ppo.py train with model.train(): GPT-2 here has no dropout, so attention in training
    mode must compute exactly what it computes in eval mode."""
    model = tiny().double().train()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        assert_close("CausalSelfAttention in training mode", attn(x), naive_attention(attn, x), 1e-10,
                     hint="no dropout (dropout_p=0): the docstring's attention has none, and GPTConfig no rate")


def test_attention_with_padding_mask_and_cache_matches_naive_loop():
    """A left-padded batch through a KVCache as GPT.hidden drives it (a prefill of 4 positions, then
    one at a time, the test advancing cache.pos) equals one pass over all positions, each query
    attending to the keys its row's mask allows."""
    model = tiny().double()
    attn, S, P = model.transformer.h[0].attn, 7, 4
    x = torch.randn(2, S, 32, dtype=torch.float64)
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # row 0: 2 padding positions
    cache = KVCache(1, 2, 4, S, 8, "cpu", torch.float64)
    with torch.no_grad():
        want = naive_attention(attn, x, gpt.attention_mask_4d(am, S))
        steps = [attn(x[:, :P], gpt.attention_mask_4d(am[:, :P], P), cache, 0)]
        for t in range(P, S):
            cache.pos = t  # GPT.hidden's job, after the last layer
            steps.append(attn(x[:, t:t + 1], gpt.attention_mask_4d(am[:, :t + 1], 1), cache, 0))
        got = torch.cat(steps, 1)
        assert_close("CausalSelfAttention with a padding mask and a KV cache", got, want, 1e-10,
                     [("the padding mask ignored: keys where mask is False are not attended to",
                       naive_attention(attn, x))],
                     "mask (B, 1, T, S): True = allowed; with a cache, attend over all S keys it returns, the "
                     "queries being the last T positions")


def test_attention_a_given_mask_is_the_whole_rule_at_any_scale():
    """A given mask decides alone, causal or not (a key after the query, if allowed, is attended to), and
    a masked key gets weight 0 exactly: scores here reach ~1e5 (float64), where an additive -1e4 lets it in."""
    model, g = tiny().double(), torch.Generator().manual_seed(0)
    attn = model.transformer.h[0].attn
    allowed = (torch.rand(2, 1, 5, 5, generator=g) < 0.5) | torch.eye(5, dtype=torch.bool)  # each query sees itself
    with torch.no_grad():
        attn.c_attn.weight.normal_(0, 30.0, generator=g)
        x = torch.randn(2, 5, 32, dtype=torch.float64, generator=g)
        want = naive_attention(attn, x, allowed)
        assert_close("CausalSelfAttention with a non-causal mask, scores ~1e5", attn(x, allowed), want,
                     1e-9 * want.abs().max().item(),
                     [("the mask combined with a causal rule: a given mask is the whole rule",
                       naive_attention(attn, x, allowed & torch.ones(5, 5, dtype=torch.bool).tril()))],
                     "masked keys get weight exactly 0 (-inf before the softmax, not a large negative number)")


def test_attention_stable_for_large_scores():
    model = tiny()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.c_attn.weight.normal_(0, 3.0)  # scores q.k / sqrt(hs) of a few hundred: exp() overflows float32
        x = torch.randn(2, 6, 32)
        got = attn(x)
        want = naive_attention(copy.deepcopy(attn).double(), x.double())
    assert_close("CausalSelfAttention at scores of a few hundred (float32)", got, want.float(),
                 1e-4 * want.abs().max().item(), hint="a softmax by hand must subtract each row's max first")


def test_importing_the_repo_changes_nothing_process_wide():
    """Importing every module registers no global hook (optimizer, module) and leaves torch's
    process-wide settings as they were."""
    code = """if True:
        import torch, torch.nn.modules.module as M, torch.optim.optimizer as O
        def state():
            b = torch.backends
            return (len(O._global_optimizer_pre_hooks), len(O._global_optimizer_post_hooks),
                    len(M._global_forward_hooks), len(M._global_forward_pre_hooks), len(M._global_backward_hooks),
                    torch.get_default_dtype(), torch.get_num_threads(), torch.get_float32_matmul_precision(),
                    b.cuda.cudnn_sdp_enabled(), b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(),
                    b.cuda.math_sdp_enabled(), b.mkldnn.enabled, torch.are_deterministic_algorithms_enabled(),
                    torch.is_grad_enabled())
        before = state()
        import bench, bench_hf, data, ddp, gpt, grads, hf, onednn, ppo, reward, rollout, sample, sft, task, util
        assert state() == before, (before, state())
        print("unchanged")"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0 and r.stdout.strip() == "unchanged", r.stderr[-2000:]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_attention_never_uses_cudnn(device):
    """gpt.ATTENTION_BACKENDS is in force in every forward (training, prefill, decode step): cuDNN's
    attention, which builds a plan for every new shape, is off inside and as it was outside."""
    model = tiny().to(device)
    seen = []
    model.transformer.h[0].attn.register_forward_pre_hook(
        lambda m, a: seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())))
    outside = torch.backends.cuda.cudnn_sdp_enabled()
    ids = torch.randint(0, 97, (2, 5), device=device)
    model(ids).sum().backward()
    generate(model, ids, torch.ones_like(ids), 3, static=True)  # on CUDA, forwards only while the graph is captured
    assert (len(seen) == 1 + 3 if device == "cpu" else len(seen) >= 3) and all(s == (False, True) for s in seen), seen
    assert torch.backends.cuda.cudnn_sdp_enabled() == outside


def test_attention_with_a_cache_and_no_mask_is_causal_at_the_right():
    """Queries after cached keys, no mask: query i (at position S - T + i) sees every key up to its own
    position. F.scaled_dot_product_attention's is_causal aligns a (T, S) mask at the top left instead."""
    model = tiny().double()
    attn, S, P = model.transformer.h[0].attn, 7, 4
    x = torch.randn(2, S, 32, dtype=torch.float64)
    cache = KVCache(1, 2, 4, S, 8, "cpu", torch.float64)
    with torch.no_grad():
        attn(x[:, :P], None, cache, 0)
        cache.pos = P
        got = attn(x[:, P:], None, cache, 0)  # T = 3 queries over S = 7 keys
        left = torch.ones(S, S, dtype=torch.bool).tril()  # rows P.. of it replaced: query P + i sees keys j <= i
        left[P:] = torch.ones(S - P, S, dtype=torch.bool).tril()
        assert_close("CausalSelfAttention of 3 queries after 4 cached keys, no mask", got, naive_attention(attn, x)[:, P:],
                     1e-10, [("the causal mask aligned at the top left (is_causal with T < S): query i sits at "
                              "position S - T + i", naive_attention(attn, x, left.expand(2, 1, S, S))[:, P:])],
                     "with a cache and no mask: causal over all S keys, the queries being the last T positions")
        cache.pos = S - 1  # one query (a decode step) after S - 1 cached keys: it sees them all
        first = torch.ones(S, S, dtype=torch.bool).tril()
        first[-1, 1:] = False  # what is_causal gives one query after cached keys: key 0 alone
        assert_close("CausalSelfAttention of 1 query after 6 cached keys, no mask", attn(x[:, -1:], None, cache, 0),
                     naive_attention(attn, x)[:, -1:], 1e-10, [("is_causal with T = 1 < S: the query sees key 0 only",
                                                               naive_attention(attn, x, first.expand(2, 1, S, S))[:, -1:])],
                     "a single query after cached keys attends to every key, its own included")


def test_kvcache_update_returns_views_of_the_cache():
    """"two views of the cache": no copy (and no torch.cat) of every key so far at every step."""
    c = KVCache(n_layer=2, B=2, n_head=2, T_max=6, head_size=2, device="cpu", dtype=torch.float32)
    c.pos = 2  # B, nh > 1: a slice of the time axis is not contiguous, so .contiguous() would copy it
    k, v = c.update(1, torch.ones(2, 2, 3, 2), torch.ones(2, 2, 3, 2))
    for name, got, buf, other in (("keys", k, c.k, c.v), ("values", v, c.v, c.k)):
        where = got.untyped_storage().data_ptr()
        assert where != other.untyped_storage().data_ptr(), f"KVCache.update returned {name} from the other cache"
        assert where == buf.untyped_storage().data_ptr(), \
            f"KVCache.update returned {name} in new memory: return a slice of the cache (a view), not a copy or a torch.cat"


def test_kvcache_update_returns_the_cache_dtype():
    c = KVCache(n_layer=1, B=1, n_head=1, T_max=4, head_size=2, device="cpu", dtype=torch.float64)
    k, v = c.update(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))  # float32 keys into a float64 cache
    assert k.dtype == v.dtype == torch.float64 and k.untyped_storage().data_ptr() == c.k.untyped_storage().data_ptr(), \
        f"KVCache.update returned {k.dtype}: views of the cache, in the cache's dtype (no .to(k.dtype), which copies)"


def test_kvcache_update_writes_in_place():
    c = KVCache(n_layer=2, B=2, n_head=2, T_max=5, head_size=3, device="cpu", dtype=torch.float64)
    buffers = c.k.data_ptr(), c.v.data_ptr()
    k1 = torch.arange(36, dtype=torch.float64).view(2, 2, 3, 3)  # (B, nh, T, hs): every entry its own value
    k, v = c.update(1, k1, -k1)
    assert k.shape == v.shape == (2, 2, 3, 3), f"KVCache.update returned shapes {tuple(k.shape)}, {tuple(v.shape)}, " \
        f"want (B, nh, pos + T, hs) = (2, 2, 3, 3)"
    assert c.k[0].abs().sum() == 0 and c.v[0].abs().sum() == 0, "update(1, k, v) changed layer 0: write into layer 1"
    assert torch.equal(k, k1) and torch.equal(v, -k1), "the first update must return the keys and values it was given" + \
        (": keys and values swapped" if torch.equal(k, -k1) else "")
    c.pos = 3  # as GPT.hidden sets it after the last layer
    k2 = 100 + torch.arange(12, dtype=torch.float64).view(2, 2, 1, 3)
    k, v = c.update(1, k2, -k2)
    assert k.shape == (2, 2, 4, 3), f"KVCache.update at pos 3 with T = 1 returned keys of shape {tuple(k.shape)}, " \
        f"want (2, 2, 4, 3): all keys so far, positions 0..pos+T-1" + (", not this step's only" if k.size(2) == 1 else "")
    want = torch.cat([k1, k2], 2)
    assert torch.equal(k, want) and torch.equal(v, -want), f"keys at positions 0..3 are {k[0, 0, :, 0].tolist()} " \
        f"(batch 0, head 0, entry 0), want {want[0, 0, :, 0].tolist()}: write at positions pos..pos+T-1"
    assert (c.k.data_ptr(), c.v.data_ptr()) == buffers and torch.equal(c.k[1, :, :, :4], want), \
        "the keys must be written into the preallocated c.k (by slice), not into a new tensor"
    assert c.k[0].abs().sum() == 0 and c.v[0].abs().sum() == 0, "update(1, k, v) changed layer 0: write into layer 1"


def test_kvcache_update_leaves_pos_alone():
    c = KVCache(n_layer=2, B=1, n_head=1, T_max=6, head_size=2, device="cpu", dtype=torch.float32)
    for layer in (0, 1):
        c.update(layer, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
        assert c.pos == 0, f"KVCache.update (layer {layer}) moved cache.pos from 0 to {c.pos}: leave it alone; " \
                           f"every layer writes at the same positions, and GPT.hidden advances pos once after the last"


def test_kvcache_update_past_its_length_is_a_clear_error():
    """pos+T past T_max is a ValueError naming both (a slice assignment's own error names neither), in a
    KVCache and in a StaticKVCache's prefill; pos+T = T_max still fits."""
    for cls in (KVCache, gpt.StaticKVCache):
        c = cls(n_layer=1, B=2, n_head=1, T_max=6, head_size=2, device="cpu", dtype=torch.float32)
        c.pos = 4
        with pytest.raises(ValueError) as e:
            c.update(0, torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))
        assert re.search(r"\b7\b", str(e.value)) and re.search(r"\b6\b", str(e.value)), \
            f"{cls.__name__}: the error {str(e.value)!r} should name pos+T = 7 and T_max = 6"
        assert c.update(0, torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2))[0].shape == (2, 1, 6, 2), cls.__name__


def test_static_kvcache_takes_kvcache_keywords_and_writes_at_index():
    c = gpt.StaticKVCache(n_layer=2, B=1, n_head=1, T_max=4, head_size=2, device="cpu", dtype=torch.float32)
    c.index = torch.tensor([2])  # a decode step: one column, all T_max columns returned
    k, v = c.update(1, torch.ones(1, 1, 1, 2), -torch.ones(1, 1, 1, 2))
    assert k.shape == v.shape == (1, 1, 4, 2) and k[0, 0, :, 0].tolist() == [0, 0, 1, 0] and v[0, 0, 2, 0] == -1
    assert c.k[0].abs().sum() == 0, "update(1, ...) changed layer 0"


def test_position_ids_restart_after_left_padding():
    model = tiny()
    ids = torch.randint(0, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    assert gpt.position_ids(mask).tolist() == [[0, 0, 0, 0, 1, 2, 3, 4, 5]]
    with torch.no_grad():
        assert torch.allclose(model(padded, mask)[:, 3:], model(ids), atol=1e-5)


def test_padded_logits_are_the_same_softmax_and_gradients():
    """model(x, padded=True), SFT's logits: the head's padding columns (97 -> 128) at -inf, so a
    cross-entropy over them is the one over the real vocabulary, to the gradient, with no nan; the
    padding rows of the tied head get no gradient."""
    x = torch.randint(0, 97, (2, 9))
    losses, grads = [], []
    for padded in (False, True):
        model = tiny().double().train()
        z = model(x, padded=padded)
        loss = F.cross_entropy(z[:, :-1].reshape(-1, z.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in model.parameters()])
    assert z.shape == (2, 9, 128) and torch.isneginf(z[..., 97:]).all() and z[..., :97].isfinite().all()
    assert torch.allclose(losses[0], losses[1], rtol=1e-12, atol=0), f"{losses}"
    for g0, g1 in zip(*grads):
        assert g1.isfinite().all() and torch.allclose(g0, g1, rtol=1e-10, atol=1e-14)
    assert (grads[1][0][97:] == 0).all(), "the padding rows of the tied head got a gradient"


def test_generate_cached_equals_uncached():
    model = tiny()
    prompt = torch.randint(0, 97, (3, 5))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    a, ga = generate(model, prompt, mask, 20, temperature=0)
    b, gb = generate(model, prompt, mask, 20, temperature=0, use_cache=False)
    diff = (a != b).nonzero().tolist()
    assert not diff and torch.equal(ga, gb), f"greedy decoding with the KV cache picks other tokens than without it, " \
        f"first at (row, column) {diff[0] if diff else '(masks only)'}: KVCache.update or attention over cached keys"
    # and the logits of every decode step, fed the same tokens, agree to 1e-5
    cache = KVCache(2, 3, 4, a.size(1), 8, "cpu", torch.float32)
    full_mask = torch.cat([mask, torch.ones(3, a.size(1) - 5, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(a, full_mask)
        step = [model(a[:, :5], full_mask[:, :5], cache)]
        step += [model(a[:, t:t + 1], full_mask[:, :t + 1], cache) for t in range(5, a.size(1))]
    err = (torch.cat(step, 1) - ref)[full_mask.bool()].abs().max()
    assert err <= 1e-5, f"logits of cached decode steps differ from an uncached forward by {err:.3g}: the cache " \
        f"(KVCache.update, pos) or attention over its keys (queries are the last T of S positions)"


def test_hidden_attention_mask_of_another_shape_is_a_clear_error():
    """The mask covers every position so far, (B, cache.pos + T): a (B, 1) mask (the new token's alone,
    in cached decoding) or one row for the batch would broadcast and give other logits, silently."""
    model, ids, ones = tiny(), torch.randint(0, 97, (3, 6)), lambda *shape: torch.ones(*shape, dtype=torch.long)
    cache = KVCache(2, 3, 4, 6, 8, "cpu", torch.float32)
    with torch.no_grad():
        model(ids[:, :5], ones(3, 5), cache)
        for bad in ((3, 1), (1, 6), (3, 5)):
            with pytest.raises(ValueError, match=re.escape(f"attention_mask {bad}: expected (B, cache.pos + T) = (3, 6)")):
                model(ids[:, 5:], ones(*bad), cache)
        with pytest.raises(ValueError, match=re.escape("attention_mask (3, 5): expected (B, cache.pos + T) = (3, 6)")):
            model(ids, ones(3, 5))  # no cache: (B, T)
        err = (model(ids[:, 5:], ones(3, 6), cache) - model(ids)[:, 5:]).abs().max()
    assert cache.pos == 6 and err <= 1e-5, f"after the refused calls, the decode step differs from a full forward by {err:.3g}"


def test_a_cache_of_another_batch_and_heads_not_dividing_the_width_are_clear_errors():
    """A KV cache of another batch size took the keys by broadcasting, then failed in a reshape; n_embd
    not a multiple of n_head was a bare assert (none at all under python -O)."""
    with pytest.raises(ValueError, match=re.escape("n_embd=30 must be a multiple of n_head=4")):
        tiny(n_embd=30)
    model, cache = tiny(), KVCache(2, 2, 4, 6, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match=re.escape("a KV cache of 2 rows for a batch of 3")):
        model(torch.randint(0, 97, (3, 4)), cache=cache)
    assert cache.pos == 0 and cache.k.abs().sum() == 0, "a refused call wrote into the cache"


def test_generate_left_padded_batch_equals_each_alone():
    model = tiny(1)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22]]
    P = max(map(len, prompts))
    batch = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out, gen = generate(model, batch, mask, 12, temperature=0)
    for i, p in enumerate(prompts):
        alone, _ = generate(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 12, temperature=0)
        assert out[i, P:].tolist() == alone[0, len(p):].tolist(), f"row {i} differs from its prompt alone"


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_generate_static_equals_dynamic(temperature):
    """The static-shape decode (GPT.decode_step on a StaticKVCache: what a CUDA graph replays) gives the
    tokens, masks and log-probs of the dynamic KV-cache path: greedy and seeded sampling, a left-padded
    batch, rows that stop early at eos while others go on."""
    model = tiny(3)
    prompt = torch.randint(0, 96, (4, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    with torch.no_grad():
        eos = int(model(prompt[:1])[0, -1].argmax())  # row 0 stops at once under greedy decoding
    runs = [generate(model, prompt, mask, 15, temperature=temperature, eos_id=eos, return_logprobs=True,
                     generator=torch.Generator().manual_seed(1), static=static) for static in (False, True)]
    (a, ga, la), (b, gb, lb) = runs
    assert torch.equal(a, b) and torch.equal(ga, gb), "static decoding sampled other tokens"
    assert ga.sum() > 8 and not ga.all(), "the batch should mix finished and running rows"
    assert torch.allclose(la, lb, atol=1e-5), f"log-probs differ by {(la - lb).abs().max():.2e}"


@CUDA
@pytest.mark.parametrize("precision", ["float32", "bf16_weights", "bf16_autocast"])
def test_cuda_graph_decoding_equals_dynamic(precision):
    """On a GPU, generate(static=True) replays one CUDA graph per decode step (gpt.DecodeGraph). Over
    three calls (captured in the first, replayed after) it gives the dynamic path's tokens and log-probs,
    in fp32, with bf16 weights, and with fp32 weights under bf16 autocast (a graph captured reading
    autocast's cached weight casts once sampled from freed memory)."""
    import contextlib
    model = tiny(3).cuda()
    model = model.to(torch.bfloat16) if precision == "bf16_weights" else model
    ctx = torch.autocast("cuda", torch.bfloat16) if precision == "bf16_autocast" else contextlib.nullcontext()
    prompt = torch.randint(0, 96, (4, 6), device="cuda")
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], device="cuda")
    for call in range(3):
        with ctx:
            (a, ga, la), (b, gb, lb) = [generate(model, prompt, mask, 15, temperature=0.8, eos_id=5, return_logprobs=True,
                                                 generator=torch.Generator("cuda").manual_seed(call), static=static)
                                        for static in (False, True)]
        assert torch.equal(a, b) and torch.equal(ga, gb), f"call {call}: the graph sampled other tokens"
        tol = 1e-4 if precision == "float32" else 2e-2
        assert (la - lb).abs().max() <= tol, f"call {call}: log-probs differ by {(la - lb).abs().max():.2e}"
