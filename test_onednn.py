"""onednn.py, the CPU fast path: the same numbers as plain nn.Linear (against float64, gradients
included), and never a stale packed weight after any way of writing new weights."""
import copy

import pytest
import torch

import onednn
from gpt import GPT, generate
from test_gpt import tiny
from util import make_optimizer


@pytest.mark.skipif(not onednn.ONEDNN, reason="the oneDNN paths are for x86 CPUs")
def test_onednn_paths_equal_float64():
    """onednn.enable(model): fp32 on the CPU its Linears run oneDNN, through an autograd Function with
    grad, without grad on the live weight or, inside onednn.packed(), on a copy packed on entry.
    Logits and every gradient agree with the float64 model (which takes nn.Linear's path), the padded
    head's logits written in place too; the model still deep-copies."""
    model = tiny()
    assert onednn.enable(model) and isinstance(model.transformer.h[0].attn.c_attn, onednn.Linear)
    ids = torch.randint(0, 97, (3, 9))
    want = copy.deepcopy(model).double()(ids).float().detach()
    with torch.no_grad():
        fast = model(ids)
        with onednn.packed(model):
            assert "_packed" in model.lm_head.__dict__
            packed = model(ids)
        with onednn.packed(model):
            outer = model.lm_head._packed
            with onednn.packed(model):  # nested: the outer scope's packed copy stays, and outlives the inner
                assert model.lm_head._packed is outer
            assert model.lm_head._packed is outer
    assert "_packed" not in model.lm_head.__dict__, "the packed copy must not outlive its scope"
    assert not torch.equal(fast, torch.zeros_like(fast))
    assert torch.allclose(fast, want, atol=1e-5) and torch.allclose(packed, want, atol=1e-5)
    slow = copy.deepcopy(model).double()
    w = torch.randn(3, 9, 97)
    (model(ids, padded=True).logsumexp(-1) * w[..., 0]).sum().backward()  # SFT's logits: written in place
    (slow(ids).logsumexp(-1) * w[..., 0].double()).sum().backward()
    for (name, p), q in zip(model.named_parameters(), slow.parameters()):
        assert p.grad.abs().max() > 0 and torch.allclose(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6 * q.grad.abs().max()), name
    with torch.no_grad():
        assert torch.allclose(copy.deepcopy(model)(ids), fast, atol=1e-5)


@pytest.mark.skipif(not onednn.ONEDNN, reason="the oneDNN paths are for x86 CPUs")
def test_onednn_linear_runs_on_every_path(monkeypatch):
    """The same numbers are not enough (a Linear that fell back to nn.Linear has them): oneDNN's linear
    runs with grad (_LinearFn: once forward, twice backward for dx and dW), without grad on the live
    weight, and inside packed() on the packed copy."""
    lin = torch.nn.Linear(8, 5)
    assert onednn.enable(lin)
    calls, real = [], onednn.linear
    monkeypatch.setattr(onednn, "linear", lambda x, w, b=None: calls.append(w) or real(x, w, b))
    x = torch.randn(3, 8, requires_grad=True)
    y = lin(x)
    assert len(calls) == 1 and calls[0] is lin.weight, f"with grad: {len(calls)} oneDNN calls, want 1 on the weight"
    y.pow(2).sum().backward()
    assert len(calls) == 3 and x.grad.abs().max() > 0, f"backward: {len(calls) - 1} oneDNN calls, want 2 (dx, dW)"
    with torch.no_grad():
        lin(x)
        assert len(calls) == 4 and calls[3] is lin.weight, "without grad: oneDNN on the live weight"
        with onednn.packed(lin):
            lin(x)
            assert len(calls) == 5 and calls[4] is lin._packed, "inside packed(): oneDNN on the packed weight"


def plain_twin(model):
    """The same weights in a model of plain nn.Linear layers (a fresh GPT, never enabled)."""
    twin = GPT(model.config).eval()
    twin.load_state_dict(model.state_dict())
    assert all(type(m) is not onednn.Linear for m in twin.modules())
    return twin


@pytest.mark.parametrize("write", ["data", "load_state_dict", "fused_adamw", "sgd_loop"])
def test_fast_path_never_serves_stale_weights(write):
    """New weights written through .data (which leaves _version alone), load_state_dict, a fused AdamW
    step or a hand-written SGD step: every no-grad forward afterwards, inside or outside a packed
    scope entered after the write, matches a plain nn.Linear model holding the same weights. Before
    the write, no-grad forwards outside and inside a packed scope: a copy that either kept (a lazy
    cache, or one keyed on _version) must not be served after it."""
    model = tiny()
    onednn.enable(model)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        model(ids)
        with onednn.packed(model):
            before = model(ids)
    if write == "data":
        for p in model.parameters():
            p.data = p.data + 0.05 * torch.randn_like(p)
    elif write == "load_state_dict":
        model.load_state_dict(tiny(seed=5).state_dict())
    else:
        model.train()
        model(ids).logsumexp(-1).sum().backward()
        if write == "fused_adamw":
            make_optimizer(model.parameters(), 0.05, 0.0).step()
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.data -= 0.5 * p.grad.data
        model.eval()
    with torch.no_grad():
        want = plain_twin(model)(ids)
        assert (want - before).abs().max() > 1e-3, "the write changed nothing: the test cannot fail"
        assert torch.allclose(model(ids), want, atol=1e-5), "no-grad forward on stale weights"
        with onednn.packed(model):
            assert torch.allclose(model(ids), want, atol=1e-5), "packed forward on stale weights"


@pytest.mark.skipif(not onednn.ONEDNN, reason="the oneDNN paths are for x86 CPUs")
def test_onednn_double_backward_and_deepcopy_while_packed():
    """create_graph=True (a gradient penalty): the backward runs differentiable ops, else the second
    derivative comes out 0. A deep copy inside packed() leaves the opaque packed weight behind and
    computes with its own weights."""
    lin = torch.nn.Linear(8, 5)
    ref = copy.deepcopy(lin)
    onednn.enable(lin)
    for m in (lin, ref):
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        g, = torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
    assert ref.weight.grad.abs().max() > 0.1 and torch.allclose(lin.weight.grad, ref.weight.grad, atol=1e-5)
    model, ids = tiny(), torch.randint(0, 97, (2, 5))
    onednn.enable(model)
    with torch.no_grad(), onednn.packed(model):
        snap = copy.deepcopy(model)
    with torch.no_grad():
        for p in snap.parameters():
            p.add_(0.1)
        plain = tiny()
        plain.load_state_dict(snap.state_dict())
        assert torch.allclose(snap(ids), plain(ids), atol=1e-5)


@pytest.mark.skipif(not onednn.ONEDNN, reason="the oneDNN paths are for x86 CPUs")
def test_bf16_sampler_packed_samples_the_same_bits(monkeypatch):
    """A bf16 copy of the policy (rollout.make_sampler) inside packed(): its Linears run oneDNN on
    prepacked bf16 weights, and generate() gives the very tokens and log-probs it gives unpacked
    (F.linear's bits). Where oneDNN's packed bf16 product differs from F.linear's (bf16_exact() False),
    packed() leaves bf16 weights alone."""
    if not onednn.bf16_exact():
        pytest.skip("oneDNN's packed bf16 linear differs from F.linear's bits on this CPU: bf16 stays unpacked")
    model = tiny(vocab_size=300, n_embd=64)
    onednn.enable(model)
    sampler = copy.deepcopy(model).to(torch.bfloat16)
    prompt, mask = torch.randint(0, 300, (3, 5)), torch.ones(3, 5, dtype=torch.long)
    mask[0, :2] = 0

    def sample():
        return generate(sampler, prompt, mask, 12, generator=torch.Generator().manual_seed(0), return_logprobs=True)
    plain = sample()
    with onednn.packed(sampler):
        assert all("_packed" in m.__dict__ for m in sampler.modules() if isinstance(m, onednn.Linear)), \
            "bf16 weights were not packed"
        fast = sample()
    for a, b in zip(plain, fast):
        assert torch.equal(a, b), "packed bf16 sampling changed the bits"
    with torch.no_grad(), onednn.packed(model):  # packed in fp32, then cast to bf16 inside the scope
        model.to(torch.bfloat16)
        assert torch.equal(model(prompt), sampler(prompt)), "a bf16 input met the fp32 packed weight"
    monkeypatch.setattr(onednn, "bf16_exact", lambda: False)
    with onednn.packed(sampler):
        assert not any("_packed" in m.__dict__ for m in sampler.modules()), "bf16 packed where it is not exact"


def test_enable_and_packed_leave_the_global_random_stream_alone():
    """A script seeds, then switches the fast path on: what it draws next must not depend on whether
    oneDNN is there (enable() and packed() check oneDNN with generators of their own)."""
    model = tiny()
    torch.manual_seed(0)
    want = torch.get_rng_state()
    onednn.enable(model)
    with onednn.packed(copy.deepcopy(model).to(torch.bfloat16)):
        pass
    assert torch.equal(torch.get_rng_state(), want), "enabling oneDNN drew from torch's global generator"
