"""The checks that the tests of the course exercises make: a result against its expected value,
failing with one line that names the likely mistake and the numbers to 10 significant digits
(six hide a float32 rounding); a call that must leave its inputs as they were; gradients by float64
central finite differences and by autograd. Imports torch only."""
import inspect

import torch

TOL = 1e-7  # default allowed |got - want|: float64 gradients against central differences (test_grads.py)
H = 1e-6  # finite-difference step: truncation ~H^2 = 1e-12, float64 roundoff ~1e-16 / H = 1e-10 (TOL: 1e-7)


def call(what, fn, *args, **kwargs):
    """fn(*args, **kwargs), failing if fn changed one of its tensor inputs in place: callers read
    their tensors (masks, returns, values) again after the call."""
    names = list(inspect.signature(fn).parameters)
    given = [(names[i], a) for i, a in enumerate(args)] + list(kwargs.items())
    before = [(name, a, a.clone()) for name, a in given if isinstance(a, torch.Tensor)]
    out = fn(*args, **kwargs)
    for name, a, old in before:  # the shape first: an unsqueeze_ or resize_ would broadcast in the comparison
        if a.shape != old.shape or not ((a == old) | ((a != a) & (old != old))).all():  # nan == nan here
            raise AssertionError(f"{what}: changed its input `{name}` in place, which the caller reads again: compute "
                                 "new tensors (torch.where, x - y), never x[...] = ..., x -= ... or a _ method on an input")
    return out


def assert_close(what, got, want, tol=TOL, mistakes=(), hint="", labels=None, some_agree=False):
    """Fail unless `got` is within `tol` of `want` at every entry, with a first line that names the
    likely mistake: the first of `mistakes` ((name, wrong answer), ...) that `got` matches, else
    `hint`; then the worst entries (by `labels[index]` where given) to 10 significant digits. A tensor
    `want` of a floating dtype fixes the dtype that `got` must have. A wrong answer within `tol` of
    `want` fails the test whatever `got` is (inputs that cannot tell them apart test nothing), unless
    `some_agree`: a loop over points where some mistakes agree with the right answer by design (min
    and max of the PPO terms inside the clip), which names only the others."""
    got = torch.as_tensor(got).detach()
    if isinstance(want, torch.Tensor) and want.is_floating_point() and got.dtype != want.dtype:
        raise AssertionError(f"{what}: dtype {got.dtype}, want {want.dtype} (the inputs' dtype): no .float(), and "
                             f"new tensors from zeros_like / new_zeros, which keep the input's dtype and device")
    f64 = lambda x: x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    g, w = got.double(), f64(want)
    if g.shape != w.shape:
        raise AssertionError(f"{what}: shape {tuple(g.shape)}, want {tuple(w.shape)}")
    agree = [((f64(wrong) - w).abs() <= tol).all() for _, wrong in mistakes]
    if any(agree) and not some_agree:
        raise AssertionError(f"{what}: the right answer and '{mistakes[agree.index(True)][0]}' agree on these inputs, so "
                             "the test cannot tell them apart: where it computes the answer with another of the exercises "
                             "(ppo_loss with ppo_policy_loss), make that one's tests pass first")
    mistakes = [m for m, same in zip(mistakes, agree) if not same]
    err = (g - w).abs().nan_to_num(float("inf"))
    if (err <= tol).all():
        return
    if not torch.isfinite(g).all():
        first = "nan or inf: " + (f"{hint.rstrip('. ')}? Else " if hint else "") + "an exp() that overflows, " \
                "or the log of an underflowed 0? (log_softmax, logsigmoid and logsumexp subtract the max first) Or a " \
                "softmax over a row whose every entry is masked, or padding that holds inf or nan multiplied by a 0 " \
                "mask (torch.where drops it)"
    else:
        named = [n for n, wrong in mistakes if ((g - f64(wrong)).abs() <= tol).all()]
        if not named and tol < 1e-9 and (err <= 1e-6 * w.abs().clamp(min=1)).all():
            named = ["float32 rounding (1e-7 relative): float32 arithmetic on float64 inputs (.float(), a new "
                     "tensor without dtype=)?"]
        first = f"looks like {named[0]}" if named else "0 everywhere: is the result cut from its input (.detach(), " \
            ".item(), .data, numpy) or never written?" if not g.any() else hint or "wrong values"
    bad = (err > tol).nonzero().tolist()
    rows = [f"  {tuple(i)}{' ' + labels[tuple(i)] if labels and tuple(i) in labels else ''}: "
            f"got {g[tuple(i)].item():.10g}, want {w[tuple(i)].item():.10g}" for i in bad[:6]]
    where = f"at {len(bad)} of {g.numel()} entries, " if g.dim() else ""
    raise AssertionError(f"{what}: {first}\n" + ("\n".join(rows) + "\n" if g.dim() else
                         f"  got {g.item():.10g}, want {w.item():.10g}\n") +
                         f"  off {where}by up to {err.max().item():.3g} (tolerance {tol:.0e})")


def numerical_grad(f, x, h=H):
    """Central differences (f(x + h e_i) - f(x - h e_i)) / 2h at every entry i of the float64 tensor
    x, which f() reads: x is changed in place one entry at a time and restored."""
    assert x.dtype == torch.float64 and x.is_contiguous(), "finite differences need a contiguous float64 tensor"
    grad, threads = torch.zeros_like(x), torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny evaluations: threads only add overhead (x10 on a busy machine)
    try:
        with torch.no_grad():
            flat = x.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + h
                up = f().item()
                flat[i] = old - h
                down = f().item()
                flat[i] = old
                grad.view(-1)[i] = (up - down) / (2 * h)
    finally:
        torch.set_num_threads(threads)
    return grad


def gradcheck(f, *xs):
    """torch.autograd.gradcheck (its own finite differences, every entry) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.autograd.gradcheck(f, tuple(x.detach().clone().requires_grad_(True) for x in xs), eps=H, atol=TOL)
    finally:
        torch.set_num_threads(threads)


def autograd_grads(f, *xs):
    """d f(*xs) / d xs by backward(); an input the output does not depend on gets zeros."""
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = f(*xs)
    if not out.requires_grad:  # e.g. everything was detached: the gradient that reaches the model is 0
        return [torch.zeros_like(x) for x in xs]
    gs = torch.autograd.grad(out, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs)]
