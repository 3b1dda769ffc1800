"""
Generate the course skeleton from the reference: the whole repo, with the body of every function
in EXERCISES replaced by `raise NotImplementedError(...)`. The def line(s), decorators, docstring
and every other line, comments included, are kept byte for byte: the docstring is the spec.

    python make_exercises.py ../minrlhf-exercises    # then read ../minrlhf-exercises/EXERCISES.md

Make it beside the repo: the tests read ../shared (fixtures, tokenizer files) relative to it.
The skeleton is never committed; test_exercises.py checks it (every test that touches an exercise
fails with NotImplementedError, putting one function back makes its own tests pass).
This file and test_exercises.py stay out of the skeleton: the planted bugs quote the reference.
"""
import ast
import os
import shutil
import subprocess
import sys

EXERCISES = [  # (file, function, exercises to solve first, what it takes, pytest -k), in solving order
    ("gpt.py", "KVCache.update", (), "writing into a preallocated tensor by slice", "test_kvcache_"),
    ("gpt.py", "CausalSelfAttention.forward", ("KVCache.update",),
     "splitting heads, softmax(q k^T / sqrt(hs)) with the causal and padding masks, the cache",
     "test_attention_ or test_generate_"),
    ("sft.py", "sft_loss", (), "the one-token shift between logits and labels, a masked mean",
     "test_sft_loss_ and not test_sft_loss_grad_"),
    ("reward.py", "preference_loss", (), "Bradley-Terry, a stable log-sigmoid",
     "test_preference_loss_ and not test_preference_loss_grad_"),
    ("ppo.py", "token_logprobs", (), "log-softmax and gather", "test_token_logprobs_"),
    ("ppo.py", "kl_penalized_rewards", (), "the KL penalty's sign, the score at each row's last token",
     "test_kl_penalized_rewards_"),
    ("ppo.py", "gae", (), "a backward recursion that stops at each row's end", "test_gae_"),
    ("ppo.py", "whiten", (), "mean and variance over valid entries only", "test_whiten_"),
    ("ppo.py", "ppo_policy_loss", (), "the ratio, the clip and the pessimistic max",
     "test_ppo_policy_loss_ and not test_ppo_policy_loss_grad_"),
    ("ppo.py", "value_loss", (), "clipping V around the rollout's values", "test_value_loss_"),
    ("ppo.py", "entropy", (), "a stable entropy from logits, masked", "test_entropy_"),
    ("ppo.py", "ppo_loss", ("ppo_policy_loss", "value_loss", "entropy"), "signs and weights of the terms",
     "test_ppo_loss_"),
    ("grads.py", "sft_loss_grad", ("sft_loss",), "d(-log softmax)/d logits, then the shift and the mask",
     "test_sft_loss_grad_"),
    ("grads.py", "preference_loss_grad", ("preference_loss",), "the derivative of log sigmoid",
     "test_preference_loss_grad_"),
    ("grads.py", "ppo_policy_loss_grad", ("ppo_policy_loss",), "which branch of the max is active",
     "test_ppo_policy_loss_grad_"),
]
# Typical student mistakes, each planted in a copy of the reference by test_exercises.py, which checks
# that a test fails on it and passes on the reference: (name, file, reference snippet, the mistake);
# each snippet occurs once in its file, and every exercise's body holds at least one.
BUGS = [
    ("sft_loss: logits/labels shift missing", "sft.py",
     "targets = torch.roll(tokens, -1, dims=1)", "targets = tokens"),
    ("sft_loss: averaged over prompt and padding tokens", "sft.py",
     "return (nll * m).sum() / m.sum()", "return nll.mean()"),
    ("preference_loss: difference reversed", "reward.py",
     "F.logsigmoid(r_chosen - r_rejected)", "F.logsigmoid(r_rejected - r_chosen)"),
    ("preference_loss: sum over pairs, not mean", "reward.py",
     "-F.logsigmoid(r_chosen - r_rejected).mean()", "-F.logsigmoid(r_chosen - r_rejected).sum()"),
    ("token_logprobs: log of softmax (overflows)", "ppo.py", "F.log_softmax(logits, -1), -1,",
     "torch.softmax(logits, -1).log(), -1,"),
    ("kl_penalized_rewards: KL sign flipped", "ppo.py",
     "rewards = -kl_coef * (logprobs - ref_logprobs)", "rewards = kl_coef * (logprobs - ref_logprobs)"),
    ("kl_penalized_rewards: KL penalty on padding", "ppo.py",
     "rewards = -kl_coef * (logprobs - ref_logprobs) * mask", "rewards = -kl_coef * (logprobs - ref_logprobs)"),
    ("kl_penalized_rewards: score at the last column, not each row's last token", "ppo.py",
     "last = last_index(mask)", "last = torch.full_like(last_index(mask), mask.size(1) - 1)"),
    ("gae: bootstraps past the end of a response", "ppo.py",
     "values, rewards = values * mask, rewards * mask", "rewards = rewards * mask"),
    ("gae: lambda forgotten in the recursion", "ppo.py", "gamma * lam * next_adv", "gamma * next_adv"),
    ("whiten: statistics over padding", "ppo.py",
     "mean = masked_mean(x, mask)\n    var = masked_mean((x - mean) ** 2, mask)",
     "mean = x.mean()\n    var = ((x - mean) ** 2).mean()"),
    ("whiten: padding not zeroed", "ppo.py", "        out = out + mean\n    return out * mask",
     "        out = out + mean\n    return out"),
    ("ppo_policy_loss: ratio detached", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(logprobs - old_logprobs).detach()"),
    ("ppo_policy_loss: ratio inverted", "ppo.py",
     "ratio = torch.exp(logprobs - old_logprobs)", "ratio = torch.exp(old_logprobs - logprobs)"),
    ("ppo_policy_loss: min instead of max", "ppo.py",
     "torch.max(-advantages * ratio, -advantages * clipped)", "torch.min(-advantages * ratio, -advantages * clipped)"),
    ("ppo_policy_loss: clip on one side only", "ppo.py",
     "torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)", "torch.clamp(ratio, max=1 + clip_eps)"),
    ("ppo_policy_loss: mean over padding", "ppo.py",
     "masked_mean(torch.max(-advantages * ratio, -advantages * clipped), mask)",
     "torch.max(-advantages * ratio, -advantages * clipped).mean()"),
    ("value_loss: clipped around the returns, not the old values", "ppo.py",
     "old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)",
     "returns + torch.clamp(values - returns, -clip_eps, clip_eps)"),
    ("value_loss: min instead of max", "ppo.py", "torch.max((values - returns) ** 2", "torch.min((values - returns) ** 2"),
    ("value_loss: the 0.5 forgotten", "ppo.py", "return 0.5 * masked_mean(", "return masked_mean("),
    ("entropy: sign flipped", "ppo.py", "-(logp.exp() * logp).sum(-1)", "(logp.exp() * logp).sum(-1)"),
    ("entropy: mean over the vocabulary, not sum", "ppo.py", "-(logp.exp() * logp).sum(-1)",
     "-(logp.exp() * logp).mean(-1)"),
    ("ppo_loss: entropy bonus added to the loss", "ppo.py", "- ent_coef * entropy(logits, mask)",
     "+ ent_coef * entropy(logits, mask)"),
    ("ppo_loss: PPO-ptx term detached", "ppo.py", "loss + ptx_coef * ptx_loss", "loss + ptx_coef * ptx_loss.detach()"),
    ("entropy: computed from detached logits", "ppo.py", "logp = F.log_softmax(logits, -1)",
     "logp = F.log_softmax(logits.detach(), -1)"),
    ("attention: no causal mask", "gpt.py", "F.scaled_dot_product_attention(q, k, v, is_causal=True)",
     "F.scaled_dot_product_attention(q, k, v)"),
    ("attention: scores scaled by 1/hs, not 1/sqrt(hs)", "gpt.py", "(q, k, v, is_causal=True)",
     "(q, k, v, is_causal=True, scale=1.0 / k.size(-1))"),
    ("attention: padding mask ignored", "gpt.py", "F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
     "F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) == k.size(2))"),
    ("attention: heads split without the transpose", "gpt.py",
     "q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)", "q = q.view(B, self.n_head, T, C // self.n_head)"),
    ("KV cache: every step written at position 0", "gpt.py",
     "self.k[layer, :, :, self.pos:end] = k", "self.k[layer, :, :, :k.size(2)] = k"),
    ("position ids ignore left padding", "gpt.py", "return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
     "return torch.arange(attention_mask.size(1), device=attention_mask.device).expand_as(attention_mask)"),
    ("reward read at sum(mask) - 1 (wrong under left padding)", "data.py",
     "return T - 1 - mask.flip(1).long().argmax(1)", "return mask.long().sum(1) - 1"),
    ("sft_loss_grad: shifted the wrong way", "grads.py", "grad[:, :-1] = (p - onehot)", "grad[:, 1:] = (p - onehot)"),
    ("preference_loss_grad: same sign for both rewards", "grads.py", "return -g, g", "return -g, -g"),
    ("ppo_policy_loss_grad: clip ignored for negative advantages", "grads.py",
     "clipped = ((advantages > 0) & (rho > 1 + clip_eps)) | ((advantages < 0) & (rho < 1 - clip_eps))",
     "clipped = (advantages > 0) & (rho > 1 + clip_eps)"),
]
NOT_IN_SKELETON = {"make_exercises.py", "test_exercises.py"}  # they hold reference code; the checks run on the reference
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".benchmarks", "out", "runs", ".cache", "exercises"}


class ExerciseError(Exception):
    """A stale table or a function that cannot be stubbed: one line, exit code 2."""


def body_span(text, file, name):
    """Lines [start, end) of function `name` ("f" or "Class.method") in `text` that follow its
    docstring, and the body's indentation. The span ends at the last statement (trailing comments
    after a body are not part of it)."""
    scope, node = ast.parse(text, filename=file), None
    for part in name.split("."):
        node = next((n for n in ast.iter_child_nodes(scope) if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                     ast.AsyncFunctionDef)) and n.name == part), None)
        if node is None:
            raise ExerciseError(f"{file}: no function {name!r}: update EXERCISES in make_exercises.py")
        scope = node
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise ExerciseError(f"{file}: {name!r} is not a function")
    doc = node.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise ExerciseError(f"{file}:{node.lineno}: {name} has no docstring, and the skeleton keeps only the docstring")
    if len(node.body) < 2 or node.body[1].lineno <= doc.end_lineno:
        raise ExerciseError(f"{file}:{node.lineno}: {name} has no body on the lines after its docstring")
    indent = text.splitlines()[doc.lineno - 1][:doc.col_offset]
    return doc.end_lineno, node.end_lineno, indent  # 0-based start = 1-based docstring end line


def stub(text, file, name):
    """`text` with the body of `name` after its docstring replaced by one raise statement."""
    start, end, indent = body_span(text, file, name)
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if lines[start].endswith("\r\n") else "\n"
    raise_line = f'{indent}raise NotImplementedError("exercise {file}:{name}: see its docstring"){newline}'
    return "".join(lines[:start] + [raise_line] + lines[end:])


def restore(text, reference, file, name):
    """`text` (a skeleton file) with the reference body of `name` put back."""
    start, end, _ = body_span(text, file, name)
    ref_start, ref_end, _ = body_span(reference, file, name)
    lines, ref = text.splitlines(keepends=True), reference.splitlines(keepends=True)
    return "".join(lines[:start] + ref[ref_start:ref_end] + lines[end:])


def repo_files(repo):
    """Relative paths of the repo's files: tracked and untracked but not ignored (git), or a walk."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, dirs, names in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith("out")]
            files += [os.path.relpath(os.path.join(root, n), repo) for n in names if not n.endswith(".pyc")]
    return sorted(f for f in set(files) if os.path.isfile(os.path.join(repo, f)))


def check_table(exercises=EXERCISES):
    names = [name for _, name, _, _, _ in exercises]
    for file, name, needs, _, _ in exercises:
        for need in needs:
            if need not in names[:names.index(name)]:
                raise ExerciseError(f"EXERCISES: {name} needs {need}, which is not an exercise listed before it")


def make_skeleton(repo, out_dir, exercises=EXERCISES):
    """Copy the repo to out_dir (which must not exist or be empty), stub every exercise, write EXERCISES.md."""
    check_table(exercises)
    repo, out_dir = os.path.abspath(repo), os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExerciseError(f"{out_dir} exists and is not empty: remove it or pick another directory")
    if out_dir == repo or out_dir.startswith(repo + os.sep):
        raise ExerciseError(f"{out_dir} is inside the repo: the skeleton goes beside it (its tests read ../shared)")
    texts = {}
    for file, name, _, _, _ in exercises:
        if file not in texts:
            path = os.path.join(repo, file)
            if not os.path.isfile(path):
                raise ExerciseError(f"{file}: no such file: update EXERCISES in make_exercises.py")
            texts[file] = open(path, newline="").read()
        texts[file] = stub(texts[file], file, name)
    for rel in repo_files(repo):
        if rel in NOT_IN_SKELETON:
            continue
        dst = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel in texts:
            with open(dst, "w", newline="") as f:
                f.write(texts[rel])
        else:
            shutil.copy2(os.path.join(repo, rel), dst)
    with open(os.path.join(out_dir, "EXERCISES.md"), "w") as f:
        f.write(exercises_md(exercises))


def exercises_md(exercises=EXERCISES):
    rows = [f"| {i} | `{file}` `{name}` | {about}{'; after ' + ', '.join(needs) if needs else ''} | "
            f"`python -m pytest -q -k \"{k}\"` |" for i, (file, name, needs, about, k) in enumerate(exercises, 1)]
    files = sorted({file for file, *_ in exercises}, key=[e[0] for e in exercises].index)
    return "\n".join([
        "# Exercises", "",
        "Each function below raises `NotImplementedError`. Its docstring is the specification: formula,",
        "shapes, masking and reduction. Solve them in this order; each line's command runs that function's",
        "own tests (tests that touch no exercise pass from the start). The `_grad` exercises are the",
        "closed-form gradients that backward() computes: derive them on paper first.", "",
        "| # | function | what it takes | check |", "|---|---|---|---|", *rows, "",
        "When a file is done, run all of its tests: "
        + ", ".join(f"`python -m pytest -q test_{f}`" for f in files) + ".",
        "Then everything, end to end through a tiny GPT: `python -m pytest -q` (and `python sft.py`,",
        "`python reward.py`, `python ppo.py` on the built-in task).", ""])


def main(argv):
    if len(argv) != 1 or argv[0].startswith("-"):
        raise ExerciseError("usage: python make_exercises.py OUT_DIR  (e.g. ../minrlhf-exercises)")
    out_dir = argv[0]
    make_skeleton(os.path.dirname(os.path.abspath(__file__)), out_dir)
    print(f"wrote the skeleton with {len(EXERCISES)} exercises to {out_dir}; start with {out_dir}/EXERCISES.md")
    if not os.path.isdir(os.path.join(os.path.abspath(out_dir), "..", "shared")):
        print(f"note: the tests read ../shared beside {out_dir} (fixtures, tokenizer files), and there is none")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ExerciseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
