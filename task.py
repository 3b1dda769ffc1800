"""
The built-in task, as text: "list 3 fruits without pear:" -> " apple plum cherry". It is the whole
RLHF setting in miniature, with a gold labeler standing in for the human, so every stage can be
scored against the truth it only sees through noisy labels.

- Prompts: "list {n} {category} without {excluded}:", n in 1..MAX_N, 6 CATEGORIES of 8 words,
  `excluded` one of the category's words: 5 * 6 * 8 = 240 prompts.
- The labeler (gold_score) rewards exactly n distinct words of the category other than the excluded
  one, in any order: +1 for each of the first n correct items, -1 for an off-category word, the
  excluded word, a repeat, a non-word, or padding past the n-th; divided by n, so 1.0 is the maximum.
- The demonstrator (demonstrate) is a careless human of mixed quality: usually too short, now and
  then one too long, each item wrong w.p. 0.2. Its mean gold is ~0.5 and ~1/3 of demonstrations are
  perfect, so SFT alone imitates the mistakes and RLHF has room to improve on it.
- Preferences are the labeler's, noisy: K distinct demonstrations ranked by Plackett-Luce with
  weights exp(PREFERENCE_BETA * gold); for K = 2 that is Bradley-Terry, P(a over b) =
  sigmoid(PREFERENCE_BETA * (gold_a - gold_b)). At PREFERENCE_BETA = 1.5 the chosen response has the
  higher gold on ~72% of pairs whose gold differs (measured on builtin_task(0): 71.6% of pairs, 72.4%
  of rankings' pairs), so the reward model must learn gold through label noise, as from humans.
- The held-out split (task_combos) is fixed, not seeded: 48 of the 240 prompts, never in the training
  data, on which every run of every seed is evaluated; every n, category and word is still trained on.
- Responses are short lists of words, each " word" one GPT-2 token, so the texts use 63 tokens in all
  (data.task_tokenizer) and a prompt with its response and the eot fits in 13: a small GPT (sft.py's
  default, 0.8M parameters) learns the task from scratch in about a minute on 2 CPU cores (500 steps
  at ~50 ms), so the whole SFT -> reward -> PPO pipeline runs on a laptop in minutes.

Pure Python and a function of the seed alone; data.py adds the tokenizer's vocabulary (imports run
task -> data -> gpt -> sft / reward -> ppo).
"""
import functools
import math
import random
import re

CATEGORIES = {  # 8 words each, each " word" a single GPT-2 token, no word in two categories
    "fruits": "apple pear plum peach lemon mango grape cherry".split(),
    "animals": "cat dog horse cow pig sheep goat lion".split(),
    "colors": "red blue green yellow black white pink purple".split(),
    "tools": "hammer drill knife wrench axe shovel brush needle".split(),
    "metals": "iron copper steel tin zinc nickel bronze brass".split(),
    "drinks": "water tea coffee milk juice beer wine soda".split(),
}
_CATEGORY_OF = {w: c for c, words in CATEGORIES.items() for w in words}
_OTHER_WORDS = {c: [w for w in _CATEGORY_OF if _CATEGORY_OF[w] != c] for c in CATEGORIES}
MAX_N = 5  # prompts ask for 1..MAX_N items; the 7 words left after the excluded one allow MAX_N + 1
PREFERENCE_BETA = 1.5  # the labeler's inverse temperature: agrees with gold on ~72% of pairs that differ


def task_prompt(n, category, excluded):
    return f"list {n} {category} without {excluded}:"


def task_combos():
    """All (n, category, excluded) -> (train, held out). Held out iff (n + 3*category index + word
    index) % 5 == 0: exactly 20%, each (category, excluded) for one n only, so every n, category and
    word is seen in training. Fixed, not seeded: runs of any seed are evaluated on the same prompts."""
    split = ([], [])
    for n in range(1, MAX_N + 1):
        for ci, (category, words) in enumerate(CATEGORIES.items()):
            for wi, excluded in enumerate(words):
                split[(n + 3 * ci + wi) % 5 == 0].append((n, category, excluded))
    return split


@functools.lru_cache(maxsize=1024)  # 240 distinct prompts, each parsed thousands of times
def _parse_prompt(prompt):
    m = re.fullmatch(r"list (\d+) (\w+) without (\w+):", prompt)
    if not m or int(m[1]) < 1 or m[2] not in CATEGORIES or _CATEGORY_OF.get(m[3]) != m[2]:
        raise ValueError(f"not a built-in task prompt: {prompt!r}")
    return int(m[1]), m[2], m[3]


def gold_score(prompt, response):
    """The labeler. Over the response's space-separated words in order: +1 for each of the first n
    correct items (in the category, not the excluded word, not said before); -1 for an off-category
    word, the excluded word, a repeat, a non-word, or a correct item beyond the n-th (padding).
    Score = total / n: exactly n correct items score 1.0, the maximum. ValueError on other prompts."""
    n, category, excluded = _parse_prompt(prompt)
    total, correct, seen = 0, 0, set()
    for w in response.split():
        ok = _CATEGORY_OF.get(w) == category and w != excluded and w not in seen
        seen.add(w)
        correct += ok
        total += 1 if ok and correct <= n else -1
    return total / n


def demonstrate(prompt, rng):
    """A careless human's demonstration, " w1 w2 ...": usually too short (n, n-1, n-2 items w.p. 0.5,
    0.3, 0.2, at least 1), w.p. 0.1 one too long (n+1); each item a fresh correct word w.p. 0.8, else
    the excluded word, a repeat or an off-category word. Mean gold ~0.5, leaving room for RLHF."""
    n, category, excluded = _parse_prompt(prompt)
    k = n + 1 if rng.random() < 0.1 else max(1, n - rng.choice((0, 0, 0, 0, 0, 1, 1, 1, 2, 2)))
    fresh, items = [w for w in CATEGORIES[category] if w != excluded], []
    for _ in range(k):
        u = rng.random()  # < 0.8: correct; else one of the three mistakes, equally likely
        items.append(fresh.pop(rng.randrange(len(fresh))) if u < 0.8 else
                     excluded if u < 0.8 + 0.2 / 3 else
                     rng.choice(items) if u < 0.8 + 0.4 / 3 and items else
                     rng.choice(_OTHER_WORDS[category]))
    return " " + " ".join(items)


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


def builtin_task(seed=0, n_sft=20000, n_pairs=20000, n_rankings=4000):
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
