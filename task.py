"""
The built-in task, as text: "count 3 from 7:" -> " 7 8 9". It is the whole RLHF setting in
miniature, with a gold labeler standing in for the human, so every stage can be scored against the
truth it only sees through noisy labels.

- Prompts: "count {n} from {a}:", n in 1..MAX_N, a in 0..MAX_START: 6 * 40 = 240 prompts.
- The labeler (gold_score) rewards counting up exactly n numbers from a: walking the response's
  space-separated items in order, an item is correct if it is the number a (the first item) or the
  previous item + 1 (any later one). +1 for each of the first n correct items, -1 for a wrong item (a
  skip, a repeat, any other number or a non-number), -1 for each correct item beyond the n-th
  (padding); divided by n, so 1.0 is the maximum. After a wrong item counting goes on from what was
  said (" 7 9 10": 9 is wrong, 10 is right), so one slip costs one item, not the rest of the list.
- The demonstrator (demonstrate) is a careless human of mixed quality: n-2, n-1, n, n+1, n+2 items
  w.p. 0.2, 0.3, 0.3, 0.1, 0.1 (none at all when that is <= 0: a blank answer); each item right w.p.
  0.8, else a skip, a repeat or a random number, and it counts on from what it said. Mean gold 0.38,
  15% perfect, 12% blank. Too long and blank answers are there so that the preferences show their
  cost: with only ever 1..n+1 items the reward model never saw a blank answer nor much padding, and
  PPO's policy drifted to both.
- Preferences are the labeler's, noisy: K distinct demonstrations ranked by Plackett-Luce with
  weights exp(PREFERENCE_BETA * gold); for K = 2 that is Bradley-Terry, P(a over b) =
  sigmoid(PREFERENCE_BETA * (gold_a - gold_b)). At PREFERENCE_BETA = 3 the chosen response has the
  higher gold on ~82% of pairs whose gold differs (builtin_task(0): 82.1% of pairs, 82.3% of the
  rankings' pairs), so the reward model must learn gold through label noise, as from humans. One slip
  moves gold by 2/n, so for n = 6 the labeler prefers the right answer only w.p. sigmoid(1) = 0.73.
- The held-out split (task_combos) is fixed, not seeded: the 48 of the 240 prompts with (a + 2n) % 5 == 0,
  never in the training data, on which every run of every seed is evaluated; every n and every a is
  still trained on.

Why this task, and not "list 3 fruits without pear:": every quality feature here is local. Whether
an item is right depends on the one item before it (or on the prompt's a), a comparison a 4-layer
GPT learns from scratch in a minute; the old task's "said before" and "the excluded word" needed a
match against any earlier position, which neither the small policy nor the reward model learnt, so
PPO sharpening onto the favourite word produced repeats and gold fell. Here the demonstrator's most
likely next item is the right one, so sharpening the SFT policy (fewer slips) and lengthening its
too-short lists both raise gold: RLHF has room to improve on SFT, by the reward model alone.

Reward hacking, as observed (seed 0, the quick start's checkpoints, README "Results"): with
kl_coef=0 the proxy score rises -0.24 -> 0.65 over 75 iterations while gold peaks at 0.67 after 50
and falls to 0.56; with kl_coef=0.1 gold rises 0.36 -> 0.69 (gold win rate vs SFT 0.76). Before
blank and too-long demonstrations were added (and at PREFERENCE_BETA = 1.5), the reward model had
never seen those failure modes and PPO found them: gold win rates 0.46-0.63 with the KL penalty on.

Numbers are " 0" .. " 58", each one GPT-2 token (RESPONSE_WORDS), so the texts use 63 tokens in all
(data.task_tokenizer) and a prompt with its response fits in 13: a small GPT (sft.py's default,
0.8M parameters) learns the task from scratch in about a minute on 2 CPU cores, so the whole SFT ->
reward -> PPO pipeline runs on a laptop in minutes.

Pure Python and a function of the seed alone; data.py adds the tokenizer's vocabulary (imports run
task -> data -> gpt -> sft / reward -> ppo).
"""
import functools
import math
import random
import re

MAX_N = 6  # prompts ask for 1..MAX_N numbers
MAX_START = 39  # prompts count from 0..MAX_START
RESPONSE_WORDS = [str(k) for k in range(59)]  # " 0".." 58", one GPT-2 token each: with the prompts, 63 ids
PREFERENCE_BETA = 3.0  # the labeler's inverse temperature: agrees with gold on ~82% of pairs that differ


def task_prompt(n, a):
    return f"count {n} from {a}:"


def task_combos():
    """All (n, a) -> (train, held out), two lists of (n, a), each in order of n, then a. Held out iff
    (a + 2n) % 5 == 0: exactly 20%, 8 starts for each n, each start held out for at most 2 of the 6 n,
    so every n and every a is seen in training. Fixed, not seeded: runs of any seed are evaluated on
    the same prompts."""
    split = ([], [])
    for n in range(1, MAX_N + 1):
        for a in range(MAX_START + 1):
            split[(a + 2 * n) % 5 == 0].append((n, a))
    return split


@functools.lru_cache(maxsize=1024)  # 240 distinct prompts, each parsed thousands of times
def _parse_prompt(prompt):
    m = re.fullmatch(r"count (\d+) from (\d+):", prompt)
    if not m or not 1 <= int(m[1]) <= MAX_N or int(m[2]) > MAX_START:
        raise ValueError(f"not a built-in task prompt: {prompt!r}")
    return int(m[1]), int(m[2])


def gold_score(prompt, response):
    """The labeler. Over the response's space-separated items in order, with `expected` = a at first:
    an item is correct if it is the number `expected`; then expected = item + 1 if the item is a
    number, else expected + 1. +1 for each of the first n correct items; -1 for a wrong item, or a
    correct item beyond the n-th (padding). Score = total / n: exactly n correct items score 1.0, the
    maximum. ValueError on other prompts."""
    n, expected = _parse_prompt(prompt)
    total, correct = 0, 0
    for w in response.split():
        value = int(w) if w.isdigit() and w.isascii() else None
        ok = value == expected
        correct += ok
        total += 1 if ok and correct <= n else -1
        expected = expected + 1 if value is None else value + 1
    return total / n


def demonstrate(prompt, rng):
    """A careless human's demonstration of "count n from a:", " a a+1 ...": n-2, n-1, n, n+1, n+2 items
    w.p. 0.2, 0.3, 0.3, 0.1, 0.1 ("" if that is <= 0, a blank answer). It counts on from what it said:
    an item's right value is a for the first, the previous item + 1 for the others. Each item is right
    w.p. 0.8; else, w.p. 0.2 / 3 each, a skip (right + 1), a repeat of the previous item, or a number
    drawn uniformly from 0..MAX_START + MAX_N - 1 (0..44) but the right one, which may be right + 1 or
    the previous item. A first item has no previous: its mistake (w.p. 0.2) is always a skip.
    Mean gold ~0.38."""
    n, a = _parse_prompt(prompt)
    k = max(0, n + rng.choices((-2, -1, 0, 1, 2), (2, 3, 3, 1, 1))[0])
    items, right = [], a
    for _ in range(k):
        u = rng.random()  # < 0.8: right; else one of the three mistakes, equally likely
        wrong = [v for v in range(MAX_START + MAX_N) if v != right]  # then items stay <= 56
        said = (right if u < 0.8 else
                right + 1 if u < 0.8 + 0.2 / 3 or not items else
                items[-1] if u < 0.8 + 0.4 / 3 else
                rng.choice(wrong))
        items.append(said)
        right = said + 1
    return " " + " ".join(map(str, items)) if items else ""


def _ranked_demos(prompt, k, rng):
    """k distinct demonstrations ranked by the labeler, best first, by Plackett-Luce: repeatedly take
    the next with probability proportional to exp(PREFERENCE_BETA * gold) among those left. For k = 2
    this is Bradley-Terry: P(a over b) = sigmoid(PREFERENCE_BETA * (gold_a - gold_b))."""
    left, ranked = [], []
    while len(left) < k:
        d = demonstrate(prompt, rng)
        if d not in left:
            left.append(d)
    weights = [math.exp(PREFERENCE_BETA * gold_score(prompt, d)) for d in left]
    while left:
        i = rng.choices(range(len(left)), weights)[0]
        ranked.append(left.pop(i))
        weights.pop(i)
    return ranked


def builtin_task(seed=0, n_sft=20000, n_pairs=50000, n_rankings=4000):
    """The offline default data, a function of `seed` alone (random.Random(seed), no global state):
    sft [{prompt, response}] demonstrations; pairs [{prompt, chosen, rejected}] of 2 distinct and
    rankings [{prompt, responses}] of 4..6 distinct demonstrations, labeled by _ranked_demos, all on
    train prompts; and train_prompts and eval_prompts (list[str], task_combos' split).
    data.builtin_task adds vocab, the GPT-2 ids the texts use."""
    rng = random.Random(seed)
    train_prompts, eval_prompts = ([task_prompt(*c) for c in combos] for combos in task_combos())

    def prompts(count):
        return (rng.choice(train_prompts) for _ in range(count))
    sft = [{"prompt": p, "response": demonstrate(p, rng)} for p in prompts(n_sft)]
    pairs = [dict(zip(("prompt", "chosen", "rejected"), (p, *_ranked_demos(p, 2, rng))))
             for p in prompts(n_pairs)]
    rankings = [{"prompt": p, "responses": _ranked_demos(p, rng.randint(4, 6), rng)}
                for p in prompts(n_rankings)]
    return {"sft": sft, "pairs": pairs, "rankings": rankings, "train_prompts": train_prompts,
            "eval_prompts": eval_prompts}
