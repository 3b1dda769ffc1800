"""Sampling in gpt.py (sample_token, generate) against what it promises: token frequencies against
softmax(logits / temperature) cut by top_k and top_p, log-probs against an uncached forward, rows that
stop at eos, and a clear error for each argument out of range."""
import re

import pytest
import torch

from gpt import generate, sample_token
from test_gpt import tiny


def test_sample_token_temperature_top_k_top_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(p).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_token(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_token(logits, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample_token(logits, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    # p^(1/T), renormalised over the top_k: at these T, p itself (the temperature ignored) is >= 0.1 off
    for temperature, top_k in ((1.0, 0), (0.5, 0), (2.0, 0), (0.5, 2)):
        want = p ** (1 / temperature) * (torch.arange(4) < (top_k or 4))
        want = want / want.sum()
        freq = torch.bincount(sample_token(logits, temperature, top_k, generator=g), minlength=4) / 4000
        assert torch.allclose(freq, want, atol=0.03), \
            f"temperature={temperature}, top_k={top_k}: frequencies {freq.tolist()}, want softmax(logits / T) {want.tolist()}"
    # the order: temperature, then top_k, then top_p over what top_k kept, renormalised (as transformers' warpers)
    tempered = p.sqrt() / p.sqrt().sum()  # T = 2: [0.379, 0.294, 0.207, 0.120]; 0.673 < 0.7 <= 0.880
    freq = torch.bincount(sample_token(logits, 2.0, top_p=0.7, generator=g), minlength=4) / 4000
    want = tempered * (torch.arange(4) < 3) / tempered[:3].sum()
    assert torch.allclose(freq, want, atol=0.03), f"temperature=2, top_p=0.7: frequencies {freq.tolist()}, want " \
        f"{want.tolist()} (the nucleus of softmax(logits / T); of the untempered p it would be the first 2 tokens)"
    assert set(sample_token(logits, top_k=2, top_p=0.6, generator=g).tolist()) == {0}, \
        "top_k=2, top_p=0.6: top_p cuts what top_k kept, renormalised (0.625 >= 0.6: the first token alone)"
    assert sample_token(logits[:1], temperature=0).item() == 0
    for top_p in (0.0, -1.0, 0.3):  # top_p below the top token's 0.5: that token alone, not every token dropped
        assert set(sample_token(logits, top_p=top_p, generator=g).tolist()) == {0}, f"top_p={top_p}"


def test_sample_token_and_generate_refuse_negative_and_nan_arguments():
    """A temperature < 0 would sample the inverted distribution and a top_k < 0 mean all tokens, silently;
    a max_new_tokens < 0 failed on a tensor's shape; a nan temperature returned the last id of every row,
    a nan top_p meant no cut (nan passed `< 0`). Each is one line naming the argument; 0 stays valid."""
    model, prompt, nan = tiny(), torch.randint(0, 97, (2, 3)), float("nan")
    for name, value in (("max_new_tokens", -1), ("temperature", -0.5), ("top_k", -1), ("temperature", nan), ("top_k", nan)):
        with pytest.raises(ValueError, match=re.escape(f"generate: {name}={value}: must be >= 0")):
            generate(model, prompt, torch.ones_like(prompt), **{"max_new_tokens": 4, name: value})
    for name, value in (("temperature", -1.0), ("top_k", -3), ("temperature", nan)):
        with pytest.raises(ValueError, match=re.escape(f"sample_token: {name}={value}: must be >= 0")):
            sample_token(torch.zeros(2, 5), **{name: value})
    with pytest.raises(ValueError, match="sample_token: top_p=nan"):
        sample_token(torch.zeros(2, 5), top_p=nan)
    assert generate(model, prompt, torch.ones_like(prompt), 0)[0].shape == (2, 3)
    assert generate(model, prompt, torch.ones_like(prompt), 2, temperature=0, top_k=0)[0].shape == (2, 5)


def test_forward_first_and_generate_logprobs():
    """forward(first=k) is forward()[:, k:] (the last block skips positions < k), with or without a
    mask, and so are its gradients; generate's log-probs are those of the uncached forward at the
    sampling temperature, on generated tokens only (0 on the prompt and after eos: row 0 stops early)."""
    model = tiny()
    prompt = torch.randint(0, 96, (3, 5))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])

    def sample(eos):
        return generate(model, prompt, mask, 8, temperature=0.7, eos_id=eos, return_logprobs=True,
                        generator=torch.Generator().manual_seed(0))
    eos = int(sample(None)[0][0, 7])  # row 0's third token: the same draws make row 0 stop there
    tokens, gen_mask, logprobs = sample(eos)
    n = gen_mask.sum(1)
    assert n[0] <= 3 < n.max() == tokens.size(1) - 5, f"row 0 should stop at eos {eos} while others go on: {n.tolist()}"
    attn = mask.new_ones(tokens.shape)
    attn[:, :5] = mask
    with torch.no_grad():
        full = model(tokens, attn)
        assert torch.allclose(model(tokens, attn, first=4), full[:, 4:], atol=1e-6)
        assert torch.allclose(model(tokens, first=9), model(tokens)[:, 9:], atol=1e-6)
        want = torch.log_softmax(full[:, :-1] / 0.7, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    m = gen_mask[:, 1:].bool()
    assert torch.allclose(logprobs[:, 1:][m], want[m], atol=1e-5)
    assert (logprobs[:, 1:][~m] == 0).all(), f"log-probs after eos or on the prompt: {logprobs[0, 5:].tolist()} (row 0)"
    grads = []
    for first in (0, 4):
        model.zero_grad()
        model(tokens, attn, first=first)[:, 4 - first:].logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(g0, g4, atol=1e-6) for g0, g4 in zip(*grads))



def test_decode_graphs_kept_are_the_last_used(monkeypatch):
    """Each rollout shape (batch, cache width) has its DecodeGraph, and each holds a full KV cache: a
    run whose prompt widths vary would keep one per width. gpt.decode_graph keeps the MAX_GRAPHS last
    used (the buffers are made on the CPU here; only __call__ captures, on CUDA)."""
    import gpt
    monkeypatch.setattr(gpt, "MAX_GRAPHS", 3)
    model = tiny()
    made = {w: gpt.decode_graph(model, 2, w, torch.float32, torch.device("cpu")) for w in (64, 128, 192)}
    assert gpt.decode_graph(model, 2, 64, torch.float32, torch.device("cpu")) is made[64], "a shape seen: its graph again"
    gpt.decode_graph(model, 2, 256, torch.float32, torch.device("cpu"))  # a fourth: the least recently used (128) goes
    kept = gpt._graphs[model][1]
    assert [k[1] for k in kept] == [192, 64, 256], f"graphs kept for widths {[k[1] for k in kept]}, want the 3 last used"


def test_generate_stops_at_eos_and_masks():
    model = tiny(2)
    with torch.no_grad():
        model.lm_head.weight[7].zero_()
        model.transformer.wte.weight[7].fill_(0.0)
    prompt = torch.randint(0, 97, (4, 3))
    eos = int(model(prompt)[0, -1].argmax())  # row 0's greedy first token is eos: it stops at once
    out, gen = generate(model, prompt, torch.ones_like(prompt), 10, temperature=0, eos_id=eos)
    assert out[0, 3] == eos and gen[0].tolist() == [0, 0, 0, 1] + [0] * (out.size(1) - 4), \
        f"row 0's greedy first token is eos ({eos}): it stops there; got {out[0, 3:].tolist()}, mask {gen[0].tolist()}"
    for row, g in zip(out, gen):
        ends = (row[3:] == eos).nonzero()
        if len(ends):  # mask covers up to and including the first eos, padding after it
            e = 3 + ends[0].item()
            assert g[3:e + 1].all() and not g[e + 1:].any() and (row[e:] == eos).all(), \
                f"tokens {row[3:].tolist()}, mask {g[3:].tolist()}: 1 up to the first eos, then 0, eos as padding"


def test_generate_reproducible_with_generator():
    model = tiny()
    prompt = torch.randint(0, 97, (2, 4))
    runs = [generate(model, prompt, torch.ones_like(prompt), 10, generator=torch.Generator().manual_seed(s))[0]
            for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]), "the same generator seed sampled different tokens"
    assert not torch.equal(runs[0], runs[2]), "two generator seeds sampled the same tokens"


def test_generate_past_block_size_is_a_clear_error():
    """Every path, the static one included (on CUDA an out-of-range position is a device-side assert)."""
    model, prompt = tiny(3), torch.randint(0, 96, (2, 40))
    for static, use_cache in ((False, True), (False, False), (True, True)):
        with pytest.raises(ValueError, match="exceed block_size=48"):
            generate(model, prompt, torch.ones_like(prompt), 10, static=static, use_cache=use_cache)
    assert generate(model, prompt, torch.ones_like(prompt), 9, static=True)[0].shape == (2, 49)  # 48 fed, 1 sampled


def test_generate_pads_every_column_past_a_rows_end_and_trims_after_the_last_row_ends():
    """Sampled (temperature 0.3): after a row's eos every later column holds eos (padding, mask 0), not the tokens a
    finished row keeps drawing; and with one row that stops at once the output ends there (P + 1 columns), not
    at P + max_new_tokens."""
    model = tiny(2)
    prompt = torch.randint(0, 97, (32, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eos = int(torch.softmax(model(prompt)[:, -1], -1).mean(0).argmax())  # the likeliest first token
    out, gen = generate(model, prompt, torch.ones_like(prompt), 8, temperature=0.3, eos_id=eos,
                        generator=torch.Generator().manual_seed(0))
    ended = 0
    for row, g in zip(out, gen):
        ends = (row[3:] == eos).nonzero()
        if len(ends) and 3 + ends[0].item() < out.size(1) - 1:
            e, ended = 3 + ends[0].item(), ended + 1
            assert (row[e:] == eos).all() and not g[e + 1:].any(), \
                f"tokens {row[3:].tolist()}, mask {g[3:].tolist()}: eos as padding after the first eos, not further samples"
    assert ended >= 1, "a weak test: no row ends before the last column"
    first = int(model(prompt[:1])[0, -1].argmax())
    out, gen = generate(model, prompt[:1], torch.ones_like(prompt[:1]), 10, temperature=0, eos_id=first)
    assert out.shape == gen.shape == (1, 4), f"generate: {tuple(out.shape)} for a row that stops at its first token: " \
                                             "cut after the last generated column"


def test_sample_token_never_draws_a_token_of_probability_0(monkeypatch):
    """Inverse-CDF sampling with a uniform u in (0, 1]: at the extreme draw (torch.rand returns 0) sample_token
    still picks a token of the top_k, not token 0 whose probability top_k set to 0 (u in [0, 1) would)."""
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(*a[:2]) if len(a) > 1 else torch.zeros(a[0]))
    assert sample_token(logits, 1.0, top_k=1).tolist() == [2], \
        "sample_token at torch.rand = 0 picked a token top_k removed: draw u = 1 - rand, in (0, 1]"


def test_sample_token_draws_low_precision_logits_in_float32():
    """bf16 logits are sampled as their float32 values: a bf16 softmax and running total round most small
    probabilities to 0 (1000 tokens of p = 0.0005 beside one of 0.5: 872 of them never drawn)."""
    logits = torch.log(torch.tensor([0.5] + [0.0005] * 1000)).repeat(2000, 1).bfloat16()
    draw = lambda z: sample_token(z, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(draw(logits), draw(logits.float())), "sample_token on bf16 logits: softmax in float32"


def test_generate_refuses_prompts_that_are_not_left_padded_or_out_of_vocabulary():
    """A row with no real token was sampled from its padding query's output (it followed the pad id's
    value), a right-padded row went on after its padding, an id >= vocab_size embedded as a zero row
    (the model's rows are padded to 128): each is one ValueError, before the prefill."""
    model = tiny()
    prompt = torch.randint(0, 97, (2, 3))
    for mask in ([[1, 1, 1], [0, 0, 0]], [[1, 1, 1], [1, 1, 0]], [[1, 1, 1], [0, 1, 0]], [[1, 0, 1], [1, 1, 1]]):
        with pytest.raises(ValueError, match="left padding"):
            generate(model, prompt, torch.tensor(mask), 2)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, prompt[:, :0], prompt[:, :0], 2)
    with pytest.raises(ValueError, match=re.escape("prompt ids must be in 0..96")):
        generate(model, torch.tensor([[5, 100]]), torch.ones(1, 2, dtype=torch.long), 2)
    out, gen = generate(model, prompt, torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, temperature=0)
    assert out.shape == (2, 5) and gen[:, 3:].all()
    assert generate(model, prompt[:0], prompt[:0], 2)[0].shape == (0, 3)  # no rows: nothing to check


def test_generate_float64_model_under_autocast_and_logprobs_in_float32():
    """Autocast leaves float64 alone, so a float64 model's KV cache is float64 under it (a bf16 cache was
    a dtype error in attention); the log-probs are float32 whatever torch's default dtype."""
    model, prompt = tiny().double(), torch.randint(0, 97, (2, 3))
    want = generate(model, prompt, torch.ones_like(prompt), 4, temperature=0)[0]
    for static in (False, True):
        with torch.autocast("cpu", torch.bfloat16):
            assert torch.equal(generate(model, prompt, torch.ones_like(prompt), 4, temperature=0, static=static)[0], want)
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        lp = generate(model, prompt, torch.ones_like(prompt), 4, return_logprobs=True)[2]
    finally:
        torch.set_default_dtype(default)
    assert lp.dtype == torch.float32, f"log-probs in {lp.dtype}: the docstring promises float32"
