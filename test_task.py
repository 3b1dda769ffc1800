"""Tests for task.py, the built-in task: expected values are written by hand or computed
independently (a formula, GPT-2's tokenizer), never by the function under test.
Run: python -m pytest -q test_task.py"""
import math
import random
import re
from collections import Counter

import pytest

from data import Tokenizer, task_tokenizer
from records import rankings_to_pairs
from task import (MAX_N, MAX_START, PREFERENCE_BETA, RESPONSE_WORDS, builtin_task, demonstrate, gold_score,
                  task_combos, task_prompt)


@pytest.fixture(scope="module")
def task():
    return builtin_task(seed=0)


@pytest.mark.parametrize("prompt, response, expected", [
    ("count 3 from 7:", " 7 8 9", 1.0),              # perfect
    ("count 3 from 7:", " 7 8", 2 / 3),              # too short
    ("count 3 from 7:", "", 0.0),
    ("count 3 from 7:", " 7 8 9 10", 2 / 3),         # padding beyond n: -1
    ("count 3 from 7:", " 7 8 9 10 11 12", 0.0),     # three padded: 3 - 3
    ("count 3 from 7:", " 8 9 10", 1 / 3),           # wrong start: -1, then 9 and 10 follow 8
    ("count 3 from 7:", " 7 9 10", 1 / 3),           # a skip costs one item, counting goes on from 9
    ("count 3 from 7:", " 7 7 8", 1 / 3),            # a repeat: the second 7 is wrong, 8 follows it
    ("count 3 from 7:", " 7 30 31", 1 / 3),          # a random number, then its successor
    ("count 3 from 7:", " 7 x 9", 1 / 3),            # a non-number takes a slot: 9 follows it
    ("count 3 from 7:", " 7 8, 9", 1 / 3),           # "8," is not a number
    ("count 3 from 7:", " 9 8 7", -1.0),             # backwards: 9 != 7, 8 != 10, 7 != 9
    ("count 1 from 0:", " 0", 1.0),
    ("count 1 from 0:", " 0 1 2", -1.0),
    ("count 6 from 39:", " 39 40 41 42 43 44", 1.0),
    ("count 5 from 12:", " 12 13 13 14 15 16 17", 3 / 5),  # 5 right, the repeat -1, 17 padding -1
])
def test_gold_score_hand_computed(prompt, response, expected):
    assert gold_score(prompt, response) == pytest.approx(expected)


def test_gold_score_bad_prompt_valueerror():
    for prompt in ["count 0 from 3:", "count 7 from 3:", "count 3 from 40:", "count 3 from -1:",
                   "count 3 from 7", "list 3 fruits without pear:", "Hello"]:
        with pytest.raises(ValueError):
            gold_score(prompt, " 7")


def test_task_combos_held_out_disjoint_and_covered():
    train, held = task_combos()
    assert (len(train), len(held)) == (192, 48) and not set(train) & set(held)
    assert sorted(train + held) == [(n, a) for n in range(1, MAX_N + 1) for a in range(MAX_START + 1)]
    assert {n for n, _ in train} == set(range(1, MAX_N + 1))  # every n and every a still trained on
    assert {a for _, a in train} == set(range(MAX_START + 1))
    assert task_combos() == (train, held)  # fixed, not seeded


def test_task_combos_held_out_where_a_plus_2n_is_a_multiple_of_5(task):
    """(a + 2n) % 5 == 0, each list in order of n, then a: worked out by hand, the held-out starts of
    n = 1..6 are 3, 1, 4, 2, 0, 3 (mod 5); (a + n) % 5 or (a + 3n) % 5 would give other starts."""
    first = {1: 3, 2: 1, 3: 4, 4: 2, 5: 0, 6: 3}  # the smallest held-out a for each n
    train, held = task_combos()
    assert held == [(n, a) for n in range(1, 7) for a in range(first[n], 40, 5)], held[:10]
    assert train == [(n, a) for n in range(1, 7) for a in range(40) if (n, a) not in held], train[:10]
    assert task["eval_prompts"] == [f"count {n} from {a}:" for n, a in held]
    assert {"count 1 from 3:", "count 5 from 0:", "count 6 from 38:"} <= set(task["eval_prompts"])
    assert "count 3 from 7:" in task["train_prompts"]  # README's example: 7 + 6 = 13


def test_demonstrate_length_mix():
    """k = n + d items, d = -2, -1, 0, 1, 2 w.p. 0.2, 0.3, 0.3, 0.1, 0.1, and none when k <= 0 (n = 1 and 2):
    the observed len - n over 30000 draws against its expectation from that table, within 0.01
    (about 4 standard errors; swapping two of the weights moves one by 0.1)."""
    rng, got, want = random.Random(1), Counter(), Counter()
    for _ in range(30000):
        n = rng.randint(1, MAX_N)
        got[len(demonstrate(task_prompt(n, rng.randint(0, MAX_START)), rng).split()) - n] += 1
        for d, p in zip((-2, -1, 0, 1, 2), (0.2, 0.3, 0.3, 0.1, 0.1)):
            want[max(0, n + d) - n] += p
    assert set(got) == {-2, -1, 0, 1, 2}
    for d in want:
        assert abs(got[d] - want[d]) / 30000 < 0.01, (d, got[d] / 30000, want[d] / 30000)


def test_demonstrate_mistake_mix():
    """Each item right w.p. 0.8; else a skip (right + 1), a repeat of the previous item or a uniform
    draw from 0..44 but the right one, w.p. 0.2 / 3 each; counting on from what was said; a first
    item's mistake always a skip. A uniform draw is seen as a skip or a repeat w.p. 1/44 each."""
    rng, first, later, drawn = random.Random(2), Counter(), Counter(), set()
    for _ in range(20000):
        n, a = rng.randint(1, MAX_N), rng.randint(0, MAX_START)
        items = [int(w) for w in demonstrate(task_prompt(n, a), rng).split()]
        for i, said in enumerate(items):
            right = items[i - 1] + 1 if i else a
            kind = ("right" if said == right else "skip" if said == right + 1 else
                    "repeat" if i and said == items[i - 1] else "other")
            (later if i else first)[kind] += 1
            drawn |= {said} if kind == "other" else set()
    f, m = sum(first.values()), sum(later.values())
    assert set(first) == {"right", "skip"} and abs(first["skip"] / f - 0.2) < 0.015, first
    want = dict(right=0.8, skip=0.2 / 3 * 45 / 44, repeat=0.2 / 3 * 45 / 44, other=0.2 / 3 * 42 / 44)
    for kind, p in want.items():  # tolerance about 5 standard errors of ~45000 items
        assert abs(later[kind] / m - p) < 0.006, (kind, later[kind] / m, p)
    assert min(drawn) == 0 and max(drawn) == MAX_START + MAX_N - 1, (min(drawn), max(drawn))


def test_builtin_task_deterministic():
    small = dict(n_sft=300, n_pairs=300, n_rankings=50)
    a, b, c = builtin_task(0, **small), builtin_task(0, **small), builtin_task(1, **small)
    assert a == b
    for key in ["sft", "pairs", "rankings"]:
        assert a[key] != c[key]
    assert a["eval_prompts"] == c["eval_prompts"]
    assert (len(a["sft"]), len(a["pairs"]), len(a["rankings"])) == (300, 300, 50)


def test_builtin_task_eval_prompts_disjoint(task):
    train, held = set(task["train_prompts"]), set(task["eval_prompts"])
    assert (len(train), len(held)) == (192, 48) and not train & held
    used = {r["prompt"] for key in ["sft", "pairs", "rankings"] for r in task[key]}
    assert used == train  # 20000 draws reach every training prompt and no held-out one
    for p in held:
        assert re.fullmatch(r"count [1-6] from \d+:", p), p


def test_builtin_task_words_single_tokens():
    tok = Tokenizer()
    assert RESPONSE_WORDS == [str(k) for k in range(59)]
    for w in RESPONSE_WORDS + [str(n) for n in range(1, MAX_N + 1)]:
        assert len(tok.encode(" " + w)) == 1, w
    assert len(tok.encode("count 6 from 39:")) == 5  # count, " 6", " from", " 39", ":"


def test_builtin_task_texts_encode_within_vocab(task):
    tok = task_tokenizer()  # raises UserError on a token outside the vocab
    assert tok.vocab_size == 3 + 59 + 1  # "count", " from", ":", " 0".." 58", eot
    texts = set(task["train_prompts"] + task["eval_prompts"])
    texts |= {r[k] for r in task["sft"] + task["pairs"] for k in r}
    texts |= {x for r in task["rankings"] for x in r["responses"]}
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert max(len(tok.encode(r["prompt"] + r["response"])) for r in task["sft"]) <= 13  # n + 2 items after a 5-token prompt


def test_demonstrate_mean_gold_in_range(task):
    golds = [gold_score(r["prompt"], r["response"]) for r in task["sft"]]
    mean = sum(golds) / len(golds)
    assert 0.3 <= mean <= 0.45, mean  # builtin_task(0): 0.383
    assert 0.1 < sum(g == 1.0 for g in golds) / len(golds) < 0.2  # some perfect (14.6%), most not
    n_of = {r["prompt"]: int(r["prompt"].split()[1]) for r in task["sft"]}
    lengths = [len(r["response"].split()) - n_of[r["prompt"]] for r in task["sft"]]
    assert min(lengths) == -2 and max(lengths) == 2
    assert 0.15 < sum(d > 0 for d in lengths) / len(lengths) < 0.25  # too long w.p. 0.2
    # blank w.p. (0.5 + 0.2) / 6: n = 1 and 1 or 2 short, n = 2 and 2 short
    assert 0.09 < sum(r["response"] == "" for r in task["sft"]) / len(task["sft"]) < 0.15
    items = [w for r in task["sft"] for w in r["response"].split()]
    assert all(w in RESPONSE_WORDS for w in items)


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
        assert 0.78 <= agree / differ <= 0.86, agree / differ  # builtin_task(0): 82.1%, 82.3%
        assert abs(agree - expected) / differ < 0.02  # the labels follow sigmoid(beta * delta)
    for r in task["rankings"]:
        assert 4 <= len(r["responses"]) <= 6 and len(set(r["responses"])) == len(r["responses"])
