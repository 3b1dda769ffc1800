"""Tests for task.py, the built-in task: expected values are written by hand or computed
independently (a formula, GPT-2's tokenizer), never by the function under test.
Run: python -m pytest -q test_task.py"""
import math
import re

import pytest

from data import Tokenizer, rankings_to_pairs
from task import CATEGORIES, PREFERENCE_BETA, builtin_task, gold_score


@pytest.fixture(scope="module")
def task():
    return builtin_task(seed=0)


@pytest.mark.parametrize("prompt, response, expected", [
    ("list 3 fruits without pear:", " apple plum cherry", 1.0),          # perfect
    ("list 3 fruits without pear:", " cherry apple plum", 1.0),          # any order
    ("list 3 fruits without pear:", " apple plum", 2 / 3),               # too short
    ("list 3 fruits without pear:", "", 0.0),
    ("list 3 fruits without pear:", " apple plum cherry lemon", 2 / 3),  # padding beyond n: -1
    ("list 3 fruits without pear:", " apple pear plum", 1 / 3),          # the excluded word
    ("list 3 fruits without pear:", " apple apple plum", 1 / 3),         # a repeat
    ("list 3 fruits without pear:", " apple dog plum", 1 / 3),           # off-category
    ("list 3 fruits without pear:", " apple xyz, plum", 1 / 3),          # a non-word
    ("list 3 fruits without pear:", " Apple plum", 0.0),                 # case matters
    ("list 1 colors without red:", " blue blue blue", -1.0),
    ("list 5 tools without axe:", " drill knife axe dog drill hammer brush needle wrench", 0.2),
])
def test_gold_score_hand_computed(prompt, response, expected):
    assert gold_score(prompt, response) == pytest.approx(expected)


def test_gold_score_bad_prompt_valueerror():
    for prompt in ["list 3 fruits without dog:", "list 0 fruits without pear:",
                   "list 3 cars without bus:", "Hello"]:
        with pytest.raises(ValueError):
            gold_score(prompt, " apple")


def test_builtin_task_deterministic():
    small = dict(n_sft=300, n_pairs=300, n_rankings=50)
    a, b, c = builtin_task(0, **small), builtin_task(0, **small), builtin_task(1, **small)
    assert a == b
    for key in ["sft", "pairs", "rankings"]:
        assert a[key] != c[key]
    assert (len(a["sft"]), len(a["pairs"]), len(a["rankings"])) == (300, 300, 50)


def test_builtin_task_eval_prompts_disjoint(task):
    train, held = set(task["train_prompts"]), set(task["eval_prompts"])
    assert (len(train), len(held)) == (192, 48) and not train & held
    used = {r["prompt"] for key in ["sft", "pairs", "rankings"] for r in task[key]}
    assert used == train  # 20000 draws reach every training prompt and no held-out one
    combos = [re.fullmatch(r"list (\d) (\w+) without (\w+):", p).groups() for p in held]
    assert len(set(combos)) == 48
    parts = [re.fullmatch(r"list (\d) (\w+) without (\w+):", p).groups() for p in train]
    all_words = {w for ws in CATEGORIES.values() for w in ws}
    for i, seen in enumerate([set("12345"), set(CATEGORIES), all_words]):
        assert {p[i] for p in parts} == seen  # every n, category, word still trained on


def test_builtin_task_words_single_tokens():
    tok = Tokenizer()
    words = [w for ws in CATEGORIES.values() for w in ws]
    assert len(CATEGORIES) == 6 and len(words) == len(set(words)) == 48
    for w in words:
        assert len(tok.encode(" " + w)) == 1, w


def test_demonstrate_mean_gold_in_range(task):
    golds = [gold_score(r["prompt"], r["response"]) for r in task["sft"]]
    mean = sum(golds) / len(golds)
    assert 0.4 <= mean <= 0.6, mean
    assert 0.2 < sum(g == 1.0 for g in golds) / len(golds) < 0.5  # some perfect, most not
    n_of = {r["prompt"]: int(r["prompt"].split()[1]) for r in task["sft"]}
    lengths = [len(r["response"].split()) - n_of[r["prompt"]] for r in task["sft"]]
    assert min(lengths) >= -2 and max(lengths) == 1
    assert 0.05 < sum(d == 1 for d in lengths) / len(lengths) < 0.15  # rarely too long


def test_builtin_task_preferences_agree_with_gold(task):
    for pairs in [task["pairs"], rankings_to_pairs(task["rankings"])]:
        agree, expected, differ = 0, 0.0, 0
        for r in pairs:
            assert r["chosen"] != r["rejected"]
            delta = gold_score(r["prompt"], r["chosen"]) - gold_score(r["prompt"], r["rejected"])
            if delta != 0:
                differ += 1
                agree += delta > 0
                expected += 1 / (1 + math.exp(-PREFERENCE_BETA * abs(delta)))  # Bradley-Terry
        assert 0.65 <= agree / differ <= 0.80, agree / differ
        assert abs(agree - expected) / differ < 0.02  # the labels follow sigmoid(beta * delta)
    for r in task["rankings"]:
        assert 4 <= len(r["responses"]) <= 6 and len(set(r["responses"])) == len(r["responses"])
