"""The comparison that the tests of the course exercises make: a result against its expected value,
failing with one line that names the likely mistake and the numbers to 10 significant digits
(six hide a float32 rounding). Imports torch only."""
import torch

TOL = 1e-7  # default allowed |got - want|: float64 gradients against central differences (test_grads.py)


def assert_close(what, got, want, tol=TOL, mistakes=(), hint="", labels=None):
    """Fail unless `got` is within `tol` of `want` at every entry, with a first line that names the
    likely mistake: the first of `mistakes` ((name, wrong answer), ...) that `got` matches, else
    `hint`; then the worst entries (by `labels[index]` where given) to 10 significant digits. A tensor
    `want` of a floating dtype fixes the dtype that `got` must have."""
    got = torch.as_tensor(got).detach()
    if isinstance(want, torch.Tensor) and want.is_floating_point() and got.dtype != want.dtype:
        raise AssertionError(f"{what}: dtype {got.dtype}, want {want.dtype} (the inputs' dtype): no .float(), and "
                             f"new tensors from zeros_like / new_zeros, which keep the input's dtype and device")
    f64 = lambda x: x.detach().double() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
    g, w = got.double(), f64(want)
    if g.shape != w.shape:
        raise AssertionError(f"{what}: shape {tuple(g.shape)}, want {tuple(w.shape)}")
    err = (g - w).abs().nan_to_num(float("inf"))
    if (err <= tol).all():
        return
    if not torch.isfinite(g).all():
        first = "nan or inf: an exp() that overflows, or the log of an underflowed 0? (log_softmax, logsigmoid " \
                "and logsumexp subtract the max first) Or a softmax over a row whose every entry is masked, or " \
                "padding that holds inf or nan multiplied by a 0 mask (torch.where drops it)"
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
