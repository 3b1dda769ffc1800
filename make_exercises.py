"""
Generate the course skeleton from the reference: the whole repo, with the body of every function
in EXERCISES replaced by `raise NotImplementedError(...)`. The def line(s), decorators, docstring
and every other line, comments included, are kept byte for byte: the docstring is the spec. Two
exceptions: a docstring's derivation after a line `Answer (stripped from the skeleton):` (the
closed-form gradients) stays in the reference, and README.md loses what speaks of files the skeleton
lacks (its course section points to EXERCISES.md instead).

    python make_exercises.py ../minrlhf-exercises    # then read ../minrlhf-exercises/EXERCISES.md

Make it beside the repo: the tests read ../shared (fixtures, tokenizer files) relative to it.
The skeleton is never committed; test_exercises.py checks it (every test that touches an exercise
fails with NotImplementedError, putting one function back makes its own tests pass).
This file, planted_bugs.py and test_exercises.py stay out of the skeleton: they quote the reference.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile

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
    ("ppo.py", "rloo_advantages", (), "a leave-one-out baseline within each prompt's group", "test_rloo_"),
    ("ppo.py", "grpo_advantages", (), "a group's mean and standard deviation, and a group of equal returns",
     "test_grpo_"),
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
TESTS = {"gpt.py": "test_gpt.py test_sampling.py", "ppo.py": "test_advantages.py test_ppo.py"}  # where not test_<file> alone
NOT_IN_SKELETON = {"make_exercises.py", "planted_bugs.py", "test_exercises.py",  # they quote reference code
                   ".ci/sft_variants.py"}  # its GPU variants of the SFT loss hold sft_loss and its gradient
ANSWER = "Answer (stripped from the skeleton):"  # a docstring line: it and the lines after it stay in the reference
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".benchmarks", "out", "runs", ".cache", "exercises"}


class ExerciseError(Exception):
    """A stale table or a function that cannot be stubbed: one line, exit code 2."""


def function_node(text, file, name):
    """The ast node of function `name` ("f" or "Class.method") in `text`, and its docstring's node."""
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
    return node, doc


def body_span(text, file, name):
    """Lines [start, end) of function `name` in `text` that follow its docstring, and the body's
    indentation. The span ends at the last statement (trailing comments after a body are not part of it)."""
    node, doc = function_node(text, file, name)
    if len(node.body) < 2 or node.body[1].lineno <= doc.end_lineno:
        raise ExerciseError(f"{file}:{node.lineno}: {name} has no body on the lines after its docstring")
    indent = text.splitlines()[doc.lineno - 1][:doc.col_offset]
    return doc.end_lineno, node.end_lineno, indent  # 0-based start = 1-based docstring end line


def strip_answer(text, file, name):
    """`text` without the lines of `name`'s docstring from the ANSWER line to its closing quotes."""
    _, doc = function_node(text, file, name)
    lines = text.splitlines(keepends=True)
    start, end = doc.lineno - 1, doc.end_lineno  # 0-based [start, end): the docstring's lines
    at = [i for i in range(start, end) if ANSWER in lines[i]]
    if not at:
        return text
    if lines[at[0]].strip() != ANSWER or lines[end - 1].strip() != '"""' or at[0] == start:
        raise ExerciseError(f"{file}:{at[0] + 1}: {name}: {ANSWER!r} must be a line of its own inside the "
                            f"docstring, whose closing quotes follow the answer on their own line")
    return "".join(lines[:at[0]] + lines[end - 1:])


def stub(text, file, name):
    """`text` with the body of `name` after its docstring replaced by one raise statement, and the
    docstring's answer (if any) cut."""
    text = strip_answer(text, file, name)
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


def skeleton_readme(text, exercises=EXERCISES):
    """README.md for the skeleton: the table rows that name a file it lacks (NOT_IN_SKELETON) go, and
    the course section says where to start; it is an error if such a file is still named."""
    out, in_course = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            in_course = line.strip() == "## The course version"
            if in_course:
                out += [line, "\n", f"This is the course version: {len(exercises)} functions wait to be written. "
                        "`EXERCISES.md` gives their order\nand the command that tests each.\n", "\n"]
        if in_course or (line.startswith("|") and any(f"`{f}`" in line for f in NOT_IN_SKELETON)):
            continue
        out.append(line)
    text = "".join(out)
    for f in sorted(NOT_IN_SKELETON):
        if f in text:
            raise ExerciseError(f"README.md names {f}, which the skeleton lacks: outside its course section "
                                f"and its file table; update skeleton_readme in make_exercises.py")
    return text


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


def write_skeleton(repo, dst, texts, exercises=EXERCISES):
    """The repo's files (but NOT_IN_SKELETON) written under dst, those in `texts` (the stubbed files) with
    that text, README.md as skeleton_readme makes it; then EXERCISES.md."""
    for rel in repo_files(repo):
        if rel in NOT_IN_SKELETON:
            continue
        path = os.path.join(dst, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel == "README.md":
            texts[rel] = skeleton_readme(open(os.path.join(repo, rel), newline="").read(), exercises)
        if rel in texts:
            with open(path, "w", newline="") as f:
                f.write(texts[rel])
        else:
            shutil.copy2(os.path.join(repo, rel), path)
    with open(os.path.join(dst, "EXERCISES.md"), "w") as f:
        f.write(exercises_md(exercises))


def make_skeleton(repo, out_dir, exercises=EXERCISES):
    """Copy the repo to out_dir (which must not exist or be empty), stub every exercise, write EXERCISES.md.
    It is written in a directory beside out_dir and renamed into place at the end: a failure leaves nothing."""
    check_table(exercises)
    if not str(out_dir).strip():  # abspath("") is the current directory, maybe an empty one
        raise ExerciseError("OUT_DIR is empty: name a new directory beside the repo (e.g. ../minrlhf-exercises)")
    repo, out_dir = os.path.realpath(repo), os.path.realpath(out_dir)  # a link into the repo is inside it
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ExerciseError(f"{out_dir} exists and is not empty: remove it or pick another directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExerciseError(f"{out_dir} is a file: the skeleton needs a new or empty directory")
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
    parent, top, staging = os.path.dirname(out_dir), out_dir, None
    while not os.path.exists(os.path.dirname(top)):  # the highest directory made here, removed on failure
        top = os.path.dirname(top)
    try:
        os.makedirs(parent, exist_ok=True)
        # beside out_dir, so that the rename stays on one filesystem; the skeleton is a directory made
        # inside it by os.mkdir, with the umask's mode (mkdtemp's own is 0o700)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".partial", dir=parent)
        os.mkdir(os.path.join(staging, "skeleton"))
        write_skeleton(repo, os.path.join(staging, "skeleton"), texts, exercises)
        os.replace(os.path.join(staging, "skeleton"), out_dir)  # onto an empty directory too (POSIX)
    except BaseException as e:
        if top != out_dir:
            shutil.rmtree(top, ignore_errors=True)
        if isinstance(e, OSError):
            raise ExerciseError(f"{out_dir}: cannot write the skeleton ({e.strerror or e}); nothing is left") from None
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def commands(md):
    """The shell commands that EXERCISES.md gives, in order: every `python ...` between backticks."""
    return re.findall(r"`(python [^`]+)`", md)


def exercises_md(exercises=EXERCISES):
    rows = [f"| {i} | `{file}` `{name}` | {about}{'; after ' + ', '.join(needs) if needs else ''} | "
            f"`python -m pytest -q -k \"{k}\"` |" for i, (file, name, needs, about, k) in enumerate(exercises, 1)]
    files = sorted({file for file, *_ in exercises}, key=[e[0] for e in exercises].index)
    return "\n".join([
        "# Exercises", "",
        "Each function below raises `NotImplementedError`. Its docstring is the specification: formula,",
        "shapes, masking, reduction, and the dtype of the result. Solve them in this order; each line's",
        "command runs that function's own tests (tests that touch no exercise pass from the start).",
        "The `_grad` exercises are the closed-form gradients that backward() computes: their docstrings",
        "give the loss and what to derive. Derive it on paper, then write it; the tests check it against",
        "finite differences and autograd.", "",
        "| # | function | what it takes | check |", "|---|---|---|---|", *rows, "",
        "When a file is done, run all of its tests: "
        + ", ".join(f"`python -m pytest -q {TESTS.get(f, 'test_' + f)}`" for f in files) + ".",
        "Then everything, end to end through a tiny GPT: `python -m pytest -q`; and the three stages on",
        "the built-in task: `python sft.py && python reward.py && python ppo.py`.",
        "Each command here runs as written; until the exercises it needs are done, it fails only with",
        "`NotImplementedError` naming the missing one.", ""])


def main(argv):
    if argv in (["--help"], ["-h"]):
        return print(__doc__.strip())
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
