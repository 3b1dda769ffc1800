"""The course skeleton (make_exercises.py) and the strength of the tests, by pytest runs on copies:
1. in the skeleton every command of EXERCISES.md runs as written and fails only with NotImplementedError
   (no `-k` line passes yet), `python ppo.py --help` works, no docstring holds its ANSWER lines;
2. putting one reference function back (and those it needs) passes its own `-k` line and no other's;
3. each planted bug of planted_bugs.BUGS, a typical student mistake patched into a copy of the reference,
   fails its exercise's own `-k` line (outside the exercises: the suite) by a test passing on the reference.
The ~150 runs are forks of one process that has imported torch, side by side (a few minutes on 2 cores).
`python test_exercises.py` prints the planted-bug table and the catch rates: by the suite, by each line."""
import ast
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from unittest import mock

import pytest

import make_exercises as mx
from planted_bugs import BUGS, owner

ROOT = os.path.dirname(os.path.abspath(__file__))
NOT_RERUN = {"test_scripts.py", "test_robust.py", "test_exercises.py"}  # runs of the scripts (minutes), and this file
JOB_IDS = itertools.count()  # names of the jobs' logs and reports, unique within a run
BROKEN = {"SyntaxError", "IndentationError", "ImportError", "ModuleNotFoundError", "NameError"}  # a bad patch


# -----------------------------------------------------------------------------
# copies of the repo, and pytest runs on them read back from --junitxml


def copy_repo(dst, bug=None):
    """The repo's files (but NOT_IN_SKELETON) to dst, with a planted bug (name, file, old, new) applied;
    an old text that is not exactly once in its file is an error (a stale table), not a silent pass."""
    for rel in mx.repo_files(ROOT):
        if rel not in mx.NOT_IN_SKELETON:
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))
    if bug:
        name, file, old, new = bug
        text = open(os.path.join(dst, file)).read()
        assert text.count(old) == 1, f"planted bug {name!r}: {file} has {text.count(old)} times {old!r}, not once"
        text = text.replace(old, new)
        compile(text, file, "exec")
        open(os.path.join(dst, file), "w").write(text)


def unit_tests(tree):
    return sorted(f for f in os.listdir(tree) if f.startswith("test_") and f.endswith(".py") and f not in NOT_RERUN)


def seen_by(tree, module):
    """The unit test files that import `module` directly or through other modules of the tree,
    its own test file first (so that -x stops early)."""
    local = {f[:-3] for f in os.listdir(tree) if f.endswith(".py")}
    deps = {}
    for m in local:
        tree_ast = ast.parse(open(os.path.join(tree, m + ".py")).read())
        names = {a.name for n in ast.walk(tree_ast) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree_ast) if isinstance(n, ast.ImportFrom) and n.module}
        deps[m] = names & local

    def reaches(m, seen=()):
        return m == module or any(reaches(d, seen + (m,)) for d in deps[m] if d not in seen)
    files = [f for f in unit_tests(tree) if reaches(f[:-3])]
    return sorted(files, key=lambda f: f != f"test_{module}.py")


def key(tree, classname, name):
    """A test's id as junitxml writes it, with the copy's path (in parametrize ids) made generic."""
    for path in {str(tree), os.path.realpath(tree)}:
        name = name.replace(path, "<tree>")
    return f"{classname}::{name}"


def env():
    e = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import the copy's modules, never ROOT's
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",  # copies run side by side, one core each
             PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",  # no third-party plugins: hypothesis alone costs 1.4 s a run
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # `python`: this one
    return e


RUNNER = r"""import json, os, signal, sys, traceback
import pytest, torch  # loaded once (1.5 s); each job is a fork of this process that imports its copy's modules
jobs, workers, running, codes = json.load(open(sys.argv[1])), int(sys.argv[2]), {}, {}

def job(j):
    os.chdir(j["tree"])
    sys.path.insert(0, j["tree"])
    signal.alarm(j["timeout"])  # a planted bug may loop forever
    if "exec" in j:
        os.execvp(j["exec"][0], j["exec"])
    return pytest.main(j["args"])

while jobs or running:
    while jobs and len(running) < workers:
        j = jobs.pop(0)
        pid = os.fork()
        if pid == 0:
            log = os.open(j["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 1), os.dup2(log, 2)
            try:
                code = int(job(j))
            except BaseException:
                traceback.print_exc()
                code = 99
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        running[pid] = j
    pid, status = os.wait()
    codes[running.pop(pid)["log"]] = os.waitstatus_to_exitcode(status)
json.dump(codes, open(sys.argv[3], "w"))
"""


def run_jobs(tmp, jobs):
    """{name: (tree, kind, args)} with kind pytest | exec -> {name: result}: pytest -> {test key:
    (outcome, message)}, outcome passed | failed | error | skipped; exec (argv, `python` the running
    interpreter) -> (exit code, output). Run os.cpu_count() at a time."""
    specs = []
    for name, (tree, kind, args) in jobs.items():
        log = os.path.join(tmp, f"job{next(JOB_IDS)}.log")
        specs.append(dict(tree=tree, log=log, timeout=600, **({"args": ["-q", "-p", "no:cacheprovider", "--tb=native",
                          f"--junitxml={log}.xml", *args]} if kind == "pytest" else {"exec": args})))
    with open(os.path.join(tmp, "jobs.json"), "w") as f:
        json.dump(specs, f)
    workers = min(8, max(2, os.cpu_count() or 2))  # each fork holds ~200 MB of its own
    subprocess.run([sys.executable, "-c", RUNNER, "jobs.json", str(workers), "codes.json"],
                   cwd=tmp, env=env(), check=True, timeout=3600)
    codes = json.load(open(os.path.join(tmp, "codes.json")))
    out = {}
    for (name, (tree, kind, _)), spec in zip(jobs.items(), specs):
        log = open(spec["log"], errors="replace").read()
        if kind == "exec":
            out[name] = (codes[spec["log"]], log)
        elif not os.path.exists(spec["log"] + ".xml"):  # killed by its alarm, or pytest could not start
            out[name] = {"<no report>": ("error", f"exit code {codes[spec['log']]}:\n{log[-3000:]}")}
        else:
            out[name] = {}
            for case in ET.parse(spec["log"] + ".xml").getroot().iter("testcase"):
                bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[bad[0].tag] if bad else "passed"
                msg = (bad[0].get("message", "") + "\n" + (bad[0].text or "")) if bad else ""
                out[name][key(tree, case.get("classname", ""), case.get("name", ""))] = (outcome, msg)
    return out


def stub_hit(msg):
    """A test failed on an exercise's stub: raised in the test's process, or (CLI tests) in a
    subprocess whose output the test's assertion message shows."""
    return msg.startswith("NotImplementedError") or "NotImplementedError: exercise " in msg


def closure(name):
    """The exercise and all it needs, recursively: what a restore check puts back."""
    needs = {n: set(ns) for _, n, ns, _, _ in mx.EXERCISES}
    out, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += needs[n]
    return out


def k_command(k):
    return f'python -m pytest -q -k "{k}"'


def run_all(tmp, parts=("skeleton", "restore", "bugs")):
    """Make the copies under tmp (beside a link to ../shared) and run every check's pytest: results
    under ("cmd", command), "help", ("restore", exercise), ("line" | "suite", bug name), "reference"."""
    shared = os.path.join(ROOT, "..", "shared")
    if os.path.isdir(shared):
        os.symlink(os.path.abspath(shared), os.path.join(tmp, "shared"))
    skel, ref_tree = os.path.join(tmp, "skeleton"), os.path.join(tmp, "reference")
    mx.make_skeleton(ROOT, skel)
    copy_repo(ref_tree)  # now, with the others: the repo may change while the checks run
    exprs = [k for *_, k in mx.EXERCISES]
    jobs = {}
    if "skeleton" in parts or "restore" in parts:  # EXERCISES.md's commands, the -k lines among them
        for cmd in mx.commands(open(os.path.join(skel, "EXERCISES.md")).read()):
            argv = shlex.split(cmd)
            if argv[:3] == ["python", "-m", "pytest"]:
                jobs[("cmd", cmd)] = (skel, "pytest", argv[3:])
            elif "skeleton" in parts:
                jobs[("cmd", cmd)] = (skel, "exec", ["bash", "-c", cmd])
        jobs["help"] = (skel, "exec", [sys.executable, "ppo.py", "--help"])
    suite_args = {}  # bug name -> (tree, pytest arguments): every test file that can see the bug
    if "bugs" in parts:
        for i, bug in enumerate(BUGS):
            tree, (_, k) = os.path.join(tmp, f"bug{i:02d}"), owner(bug)
            copy_repo(tree, bug)
            suite_args[bug[0]] = (tree, "pytest", ["-x", *seen_by(tree, bug[1][:-3])])
            jobs[("line" if k else "suite", bug[0])] = (tree, "pytest", ["-k", k, *suite_args[bug[0]][2]]) if k \
                else suite_args[bug[0]]
    if "restore" in parts:
        ref = {file: open(os.path.join(ROOT, file), newline="").read() for file, *_ in mx.EXERCISES}
        for file, name, *_ in mx.EXERCISES:
            tree, restored = os.path.join(tmp, "restore-" + name.replace(".", "-")), closure(name)
            shutil.copytree(skel, tree)
            for f, n, *_ in mx.EXERCISES:
                if n in restored:
                    text = open(os.path.join(tree, f), newline="").read()
                    open(os.path.join(tree, f), "w", newline="").write(mx.restore(text, ref[f], f, n))
            jobs[("restore", name)] = (tree, "pytest", [*unit_tests(tree), "-k", " or ".join(f"({k})" for k in exprs)])
    res = run_jobs(tmp, jobs)
    if "bugs" in parts:  # a bug that its line missed: the whole of each test file that can see it
        missed = [n for n in suite_args if ("line", n) in res and not any(o in ("failed", "error")
                                                                          for o, _ in res[("line", n)].values())]
        res.update(run_jobs(tmp, {("suite", n): suite_args[n] for n in missed}))
        for n in suite_args:
            res.setdefault(("suite", n), res.get(("line", n)))
        catchers = sorted({k for name, *_ in BUGS for kind in ("line", "suite") for k, (o, _) in
                           (res.get((kind, name)) or {}).items() if o in ("failed", "error") and k != "<no report>"})
        ids = [c.split("::")[0].replace(".", "/") + ".py::" + c.split("::", 1)[1].replace("<tree>", ref_tree)
               for c in catchers]
        res["reference"] = run_jobs(tmp, {"reference": (ref_tree, "pytest", ids)})["reference"] if ids else {}
    return res


def bug_verdict(result, reference):
    """(caught?, by which test and how): caught = a test fails on the bug and passes on the reference."""
    failed = [(k, m) for k, (o, m) in result.items() if o in ("failed", "error")]
    if not failed:
        return False, "survived: every test passed"
    k, m = failed[0]
    what = m.split("\n")[0][:100]
    if k == "<no report>" or what.split(":")[0] in BROKEN or "collection failure" in what:
        return False, f"the patch broke the module or the run: {k}: {what}"
    if reference.get(k, ("missing",))[0] != "passed":
        return False, f"{k} fails on the reference too"
    return True, f"{k.split('::')[1]} ({what})"


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory(prefix="minrlhf-exercises-") as tmp:
        yield run_all(tmp)

# -----------------------------------------------------------------------------
# the checks


def test_make_exercises_stubs_listed_bodies_and_keeps_every_other_byte_but_answers(tmp_path):
    """Every byte but the exercises' bodies and docstrings' answers, and README lines on files the skeleton lacks."""
    mx.make_skeleton(ROOT, skel := tmp_path / "skeleton")
    files = {file for file, *_ in mx.EXERCISES}
    for rel in mx.repo_files(ROOT):
        ref = open(os.path.join(ROOT, rel), "rb").read()
        if rel in mx.NOT_IN_SKELETON:
            assert not (skel / rel).exists(), f"{rel} must stay out of the skeleton: it holds reference code"
        elif rel == "README.md":
            assert open(skel / rel, "rb").read() == mx.skeleton_readme(ref.decode()).encode(), "README.md changed"
        elif rel not in files:
            assert open(skel / rel, "rb").read() == ref, f"{rel} changed"
    for file in files:
        ref = open(os.path.join(ROOT, file), newline="").read()
        text = open(skel / file, newline="").read()
        for f, name, *_ in mx.EXERCISES:
            if f == file:
                start, end, indent = mx.body_span(text, file, name)
                body = text.splitlines()[start:end]
                assert body == [f'{indent}raise NotImplementedError("exercise {file}:{name}: see its docstring")'], \
                    f"{file}:{name}: the skeleton's body is {body}, not the one raise: reference code leaks"
                text = mx.restore(text, ref, file, name)
                ref = mx.strip_answer(ref, file, name)
        assert text == ref, f"{file}: the skeleton, every body put back, differs from the reference less its answers"
    md = open(skel / "EXERCISES.md").read()
    for file, name, _, _, k in mx.EXERCISES:
        assert f"`{file}` `{name}`" in md and k_command(k) in mx.commands(md), f"EXERCISES.md lacks {name} or its -k line"
    # the _grad exercises' docstrings keep the loss and what to derive, not the derivation
    for file, name, *_ in mx.EXERCISES:
        ref = open(os.path.join(ROOT, file)).read()
        _, doc = mx.function_node(ref, file, name)
        answer = doc.value.value.split(mx.ANSWER)[1:]
        assert answer or not name.endswith("_grad"), f"{file}:{name}: a derivation exercise with no answer to strip"
        skel_doc = mx.function_node(open(skel / file).read(), file, name)[1].value.value
        assert mx.ANSWER not in skel_doc and len(skel_doc.split()) > 20, f"{file}:{name}: docstring in the skeleton"
        for line in "".join(answer).splitlines():
            assert len(line.strip()) < 12 or line.strip() not in skel_doc, f"{file}:{name}: the answer leaks: {line}"
    readme = open(skel / "README.md").read()  # it names no file that the skeleton lacks
    for f in sorted(set(re.findall(r"\.?\b[\w/.-]+\.(?:py|md)\b", readme))):  # .ci/x.py too
        assert (skel / f).exists(), f"the skeleton's README.md names {f}, which the skeleton lacks"
    assert "EXERCISES.md" in readme


def test_make_exercises_stale_table_or_bad_out_dir_is_an_error_that_leaves_nothing(tmp_path, monkeypatch):
    """One line each, nothing left (not even a parent it made): a table that does not fit the code; OUT_DIR a file, not
    empty, "" (not the current directory), in the repo through a link; a README naming what it lacks; a full disk."""
    repo, cwd, full = tmp_path / "repo", tmp_path / "cwd", mock.Mock(side_effect=OSError(28, "No space left on device"))
    for d in (repo / "c", cwd):
        d.mkdir(parents=True)
    (tmp_path / "link").symlink_to(repo)
    for path, text in ((tmp_path / "f", ""), (repo / "c" / "work.py", "a student's work"), (repo / "A.py", "x = 1\n"),
                       (repo / "README.md", "see planted_bugs.py\n")):  # A.py copied before the README fails
        path.write_text(text)
    with pytest.raises(mx.ExerciseError, match=r"ppo.py: no function 'no_such_function': update EXERCISES"):
        mx.make_skeleton(ROOT, tmp_path / "new" / "a", mx.EXERCISES + [("ppo.py", "no_such_function", (), "", "x")])
    with pytest.raises(mx.ExerciseError, match=r"needs gae, which is not an exercise listed before it"):
        mx.make_skeleton(ROOT, tmp_path / "new" / "b", [("ppo.py", "whiten", ("gae",), "", "x")])
    with pytest.raises(mx.ExerciseError, match="must be a line of its own"):
        mx.stub(f'def f():\n    """Spec.\n    {mx.ANSWER} f = 1"""\n    return 1\n', "x.py", "f")
    for args, needle in (([tmp_path / "f"], "is a file: the skeleton needs a new or empty directory"),
                         ([repo / "c"], "exists and is not empty"), ([""], "OUT_DIR is empty"),
                         ([], "error: usage: python make_exercises.py OUT_DIR")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "make_exercises.py"), *map(str, args)], cwd=cwd,
                           capture_output=True, text=True)  # from an empty directory, which "" once filled
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, (args, r.returncode, r.stderr)
    r = subprocess.run([sys.executable, "make_exercises.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "python make_exercises.py ../minrlhf-exercises" in r.stdout and not r.stderr, r
    for out, match, copy2 in ((tmp_path / "link" / "ex", "is inside the repo", shutil.copy2),
                              (tmp_path / "new" / "ex", "README.md names planted_bugs.py", shutil.copy2),
                              (tmp_path / "new" / "ex", r"new.ex: cannot write the skeleton \(No space left on", full)):
        monkeypatch.setattr(mx.shutil, "copy2", copy2)
        with pytest.raises(mx.ExerciseError, match=match):
            mx.make_skeleton(repo, out, [])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["cwd", "f", "link", "repo", "repo/A.py", "repo/README.md", "repo/c", "repo/c/work.py"], left


def test_skeleton_imports_and_ppo_help_works(runs):
    code, out = runs["help"]
    assert code == 0 and "usage: python ppo.py" in out, f"`python ppo.py --help` in the skeleton:\n{out}"


def test_exercises_md_commands_fail_only_on_stubs(runs):
    """Every command of EXERCISES.md, run as written in the skeleton: each -k line selects tests and
    none of them passes yet; the test files, the whole suite and the three stages fail only on stubs."""
    cmds = [c for kind, c in (k for k in runs if isinstance(k, tuple)) if kind == "cmd"]
    assert k_command(mx.EXERCISES[0][4]) in cmds and "python -m pytest -q" in cmds and len(cmds) > len(mx.EXERCISES)
    for cmd in cmds:
        res = runs[("cmd", cmd)]
        if isinstance(res, tuple):  # not pytest: a shell command; the traceback's last line names the stub
            code, out = res
            last = out.strip().splitlines()[-1] if out.strip() else ""
            assert code != 0 and last.startswith("NotImplementedError: exercise "), f"`{cmd}`: exit {code}\n{out[-2000:]}"
            continue
        other = {k: m.splitlines()[0] for k, (o, m) in res.items() if o in ("failed", "error") and not stub_hit(m)}
        assert res and not other, f"`{cmd}` in the skeleton: tests fail, but not on an exercise's stub:\n" + \
            "\n".join(f"  {k}: {m}" for k, m in sorted(other.items()))
        passing = sorted(k for k, (o, _) in res.items() if o == "passed")
        assert " -k " not in cmd or not passing, f"`{cmd}` selects tests that pass without the exercise: {passing}"
    assert len(runs[("cmd", "python -m pytest -q")]) > 100, "the whole suite ran too few tests in the skeleton"


@pytest.mark.parametrize("name", [n for _, n, *_ in mx.EXERCISES])
def test_restoring_one_exercise_passes_exactly_its_tests(runs, name):
    res, restored = runs[("restore", name)], closure(name)
    collected = {k: set(runs[("cmd", k_command(k))]) for *_, k in mx.EXERCISES}
    k = next(k for _, n, *_, k in mx.EXERCISES if n == name)
    failing = {t: res.get(t, ("not run",))[0] for t in collected[k] if res.get(t, ("",))[0] not in ("passed", "skipped")}
    assert not failing, f"with {sorted(restored)} put back, tests of {name} (-k \"{k}\") do not pass: {failing}"
    for _, other, *_, k2 in mx.EXERCISES:
        if other not in restored:
            passing = sorted(t for t in collected[k2] if res.get(t, ("",))[0] == "passed")
            assert not passing, f"with {sorted(restored)} put back, tests of {other} pass too: {passing}"
    broken = {t: m.splitlines()[0] for t, (o, m) in res.items() if o in ("failed", "error") and not stub_hit(m)}
    assert not broken, f"with {sorted(restored)} put back, tests fail otherwise than on a stub: {broken}"


@pytest.mark.parametrize("bug", [b[0] for b in BUGS])
def test_planted_bug_is_caught_by_its_exercise_line(runs, bug):
    """A bug in an exercise must fail that exercise's own -k line (what a student runs); a bug
    outside the exercises, the suite."""
    b = next(b for b in BUGS if b[0] == bug)
    ex, k = owner(b)
    caught, how = bug_verdict(runs[("line" if ex else "suite", bug)], runs["reference"])
    where = f'{ex}\'s line -k "{k}"' if ex else "the suite"
    assert caught, f"planted bug {bug!r} ({b[1]}: {b[2]!r} -> {b[3]!r}) is not caught by {where}: {how}"


def test_planted_bugs_reach_every_exercise():
    assert len(BUGS) >= 50 and len({b[0] for b in BUGS}) == len(BUGS), "at least 50 bugs, each named once"
    owners = [owner(b)[0] for b in BUGS]
    for file, name, *_ in mx.EXERCISES:
        assert owners.count(name) >= 3, f"{file}:{name}: {owners.count(name)} planted bugs, want 3 or more"


def main():
    with tempfile.TemporaryDirectory(prefix="minrlhf-exercises-") as tmp:
        res = run_all(tmp, parts=("bugs",))
    rows = []  # (exercise or None, caught by its line, caught by the suite)
    for bug in BUGS:
        ex = owner(bug)[0]
        suite, how = bug_verdict(res[("suite", bug[0])], res["reference"])
        line = bug_verdict(res[("line", bug[0])], res["reference"])[0] if ex else None
        rows.append((ex, line, suite))
        print(f"{'caught' if suite and line is not False else 'line MISSED' if suite else 'MISSED':<11} {bug[0]:<78} {how}")
    mine = [r for r in rows if r[0]]
    print(f"planted bugs caught by the suite: {sum(r[2] for r in rows)}/{len(rows)}")
    print(f"planted bugs caught by their exercise's own -k line: {sum(r[1] for r in mine)}/{len(mine)} "
          f"(the other {len(rows) - len(mine)} lie outside the exercises)")
    for file, name, *_, k in mx.EXERCISES:
        got = [r[1] for r in mine if r[0] == name]
        print(f"  {file + ' ' + name:<36} {f'{sum(got)}/{len(got)}':>5}  -k \"{k}\"")


if __name__ == "__main__":
    main()
