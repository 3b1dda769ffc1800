"""
nn.Linear through oneDNN on x86 CPUs in fp32: the same math (fp32 in, fp32 accumulation, fp32 out,
summed in another order), faster kernels than the BLAS (MKL) PyTorch calls for fp32 on the CPU.
Inference reads prepacked weights: a decode step twice as fast. Training, GPT-2 small: a PPO
update (minibatches of 4 x 96 tokens) 6.0-6.5 -> 5.2-5.4 s, an SFT step (4 x 256) 5.4 -> 4.8 s.
Other devices and dtypes (float64 in the gradient tests), autocast, torch.compile: plain nn.Linear.
"""
import platform
import weakref

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

ONEDNN = (torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")
          and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_packed = weakref.WeakKeyDictionary()  # Linear -> (weight's key at packing, the weight packed for oneDNN)


def _count_steps(opt, args, kwargs):
    """Fused optimizers write the weights without bumping their _version: count their steps too."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.steps_taken = getattr(p, "steps_taken", 0) + 1


register_optimizer_step_post_hook(_count_steps)


def linear(x, w, b=None):
    """x @ w^T (+ b) by oneDNN; x: (..., K), w: (N, K) in any strides -> (..., N)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b. Backward: dx = dy W, dW = dy^T x, db = dy summed over rows; all three matmuls
    by oneDNN (for an (M, K) x, M = a few hundred rows, MKL runs them at 110-170 GFLOP/s, oneDNN
    at 160-210 on this 2-core EPYC, whose fp32 peak is ~224)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.size(-1)), x.reshape(-1, x.size(-1))
        dx = linear(dy, w.t()) if ctx.needs_input_grad[0] else None
        dw = linear(dy2.t(), x2.t()) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear whose fp32 work on an x86 CPU runs through oneDNN. With grad: _LinearFn. Without: the
    weight prepacked into the kernel's blocked layout, a copy made again whenever the weight changes
    (an optimizer step, an in-place write such as load_state_dict; writes through .data go unseen).
    A decode step's few rows then read the weights twice as fast as through MKL: GPT-2 small,
    batch 8, 2 cores, 76 -> 36 ms a step (bench.py)."""

    def forward(self, x):
        if not (ONEDNN and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return super().forward(x)
        if torch.is_grad_enabled():
            return _LinearFn.apply(x, self.weight, self.bias)
        key = (self.weight.data_ptr(), self.weight._version, getattr(self.weight, "steps_taken", 0))
        if _packed.get(self, (None,))[0] != key:
            _packed[self] = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 8))  # tuned for 8 rows
        return linear(x, _packed[self][1], self.bias)
