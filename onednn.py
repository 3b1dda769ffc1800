"""
The CPU fast path: nn.Linear through oneDNN on x86 CPUs in fp32. The same math (fp32 in, fp32
accumulation, fp32 out, summed in another order), faster kernels than the BLAS (MKL) PyTorch calls
for fp32 on the CPU; and bf16 weights prepacked for sampling (a bf16 sampler), the same bits as
F.linear. Switched on per model, by the script that wants it, in one visible line:

    onednn.enable(model)            # its nn.Linear layers run oneDNN, with and without grad
    with onednn.packed(policy):     # a scope in which the weights do not change (a rollout):
        generate(policy, ...)       # the weights prepacked once, into the kernel's blocked layout

Importing this file changes nothing. Other devices and dtypes (float64 in the gradient tests),
autocast, torch.compile: plain nn.Linear. oneDNN's linear is a private PyTorch op: enable() checks
it against F.linear first and leaves the model alone if it is missing or disagrees.
"""
import contextlib
import functools
import platform

import torch
import torch.nn as nn
from torch.nn import functional as F

ONEDNN = (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
          and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(x, w, b=None):
    """x @ w^T (+ b) by oneDNN; x: (..., K), w: (N, K) in any strides, or prepacked -> (..., N)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b. Backward: dx = dy W, dW = dy^T x, db = dy summed over rows; all three matmuls
    by oneDNN (for an (M, K) x of a few hundred rows MKL ran them at 110-170 GFLOP/s, oneDNN at
    160-210, on a 2-core EPYC whose fp32 peak is ~224)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.size(-1)), x.reshape(-1, x.size(-1))
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops (oneDNN's have no autograd: grad 0)
            return (dy @ w if ctx.needs_input_grad[0] else None, dy2.t() @ x2 if ctx.needs_input_grad[1] else None,
                    dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None)
        dx = linear(dy, w.t()) if ctx.needs_input_grad[0] else None
        dw = linear(dy2.t(), x2.t()) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear whose fp32 work on the CPU runs through oneDNN, reading the live weight: with grad
    through _LinearFn, without through oneDNN's linear, or, inside `packed()`, on the packed copy made
    when the scope began (a decode step's few rows read it about twice as fast)."""

    def __getstate__(self):  # deepcopy / pickle inside packed(): the opaque packed copy stays behind
        state = super().__getstate__().copy()
        state.pop("_packed", None)
        return state

    def forward(self, x):
        if not (x.device.type == "cpu" and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            return super().forward(x)
        fp32 = x.dtype == torch.float32
        if torch.is_grad_enabled():
            if not fp32:
                return super().forward(x)
            # in 2D, so that the Function's output is not a view, and a view of it may be written in place (GPT.head)
            y = _LinearFn.apply(x.reshape(-1, x.size(-1)), self.weight, self.bias)
            return y.view(*x.shape[:-1], y.size(-1))
        packed = self.__dict__.get("_packed")  # fp32, or bf16 where it gives F.linear's bits (packed() checks)
        if packed is not None and packed.dtype == x.dtype:  # (not a model cast to bf16 inside the scope)
            return linear(x, packed, self.bias)
        return linear(x, self.weight, self.bias) if fp32 else super().forward(x)


def _works():
    """oneDNN's linear is there and agrees with F.linear (its private signature may change). Draws from a
    generator of its own: enabling the fast path leaves the caller's random stream where it was."""
    if not ONEDNN:
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        return all(torch.allclose(y, F.linear(x, w, b), atol=1e-5) for y in (linear(x, w, b), linear(x, packed, b)))
    except (RuntimeError, TypeError):
        return False


@functools.cache
def bf16_exact():
    """oneDNN on a prepacked bf16 weight gives F.linear's bf16 result bit for bit on this machine, at
    decode and prefill row counts (F.linear calls oneDNN for bf16 too, on the unpacked weight; another
    CPU or version might take another kernel). Checked once per process, with a generator of its own."""
    if not _works():
        return False
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 200, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        return all(torch.equal(linear(x, packed, b), F.linear(x, w, b))
                   for x in (torch.randn(m, 200, generator=g).bfloat16() for m in (1, 8, 61)))
    except (RuntimeError, TypeError):
        return False


def enable(*models):
    """Make every nn.Linear of the models a oneDNN Linear (the same module, parameters and state
    dict; only its forward changes). Returns True if it did, False where oneDNN is unavailable."""
    if not _works():
        return False
    for model in models:
        for m in model.modules():
            if type(m) is nn.Linear:
                m.__class__ = Linear
    return True


@contextlib.contextmanager
def packed(*models):
    """A scope in which the models' weights do not change (no optimizer step, no load): the oneDNN
    Linears' CPU weights are packed once on entry, used by every no-grad forward inside, and dropped
    on exit. fp32 weights are packed, and bf16 ones where bf16_exact() (a bf16 sampler: decode steps
    ~1.3x faster); on other models it does nothing. Scopes nest: layers an outer scope packed stay as
    they are (a frozen model can be packed once for a whole run)."""
    layers = [m for model in models for m in model.modules()  # layers an outer scope packed stay as they are
              if isinstance(m, Linear) and "_packed" not in m.__dict__ and m.weight.device.type == "cpu"
              and (m.weight.dtype == torch.float32 or m.weight.dtype == torch.bfloat16 and bf16_exact())]
    try:
        for m in layers:
            m._packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), 8)  # tuned for 8 rows
        yield
    finally:
        for m in layers:
            m.__dict__.pop("_packed", None)
