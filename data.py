"""
Text in, tensors out: the tokenizer, the three JSONL record kinds, the HH-RLHF reader, the
built-in task, and collation into padded (B, T) tensors. Also the few things every script shares:
one-line errors, `--key=value` config overrides and atomic file writes (imports run
data -> gpt -> sft / reward -> ppo, so this is the one place all of them can import).
"""
import dataclasses
import functools
import gzip
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import urllib.request

import tiktoken
import torch

# -----------------------------------------------------------------------------
# shared by every script: errors, config, atomic writes

class UserError(Exception):
    """Bad input or settings. Printed as one line `error: ...`, exit code 2, no traceback."""


def main_guard(main, argv=None):
    """Run main(argv). A UserError (or Ctrl-C) becomes one line and a non-zero exit; the traceback
    is kept with --debug on the command line or MINRLHF_DEBUG=1 in the environment."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("MINRLHF_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _field_comments(cls):
    """The `# comment` after each field in the dataclass source: the meaning --help prints."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, flags=re.M))


def _parse_value(text, typ, key):
    if typ is bool or typ == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{key}={text}: expected True or False")
    typ = {"int": int, "float": float, "str": str}.get(typ, typ)
    try:
        return typ(text)
    except ValueError:
        raise UserError(f"--{key}={text}: expected {typ.__name__}") from None


def parse_config(cls, argv):
    """Build a `cls` dataclass from `--key=value` arguments (`--flag` alone means True).
    An unknown key or a value of the wrong type is a UserError listing the valid keys;
    `--help` prints every field with its default and the comment beside it, then exits 0."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "--help" in argv or "-h" in argv:
        comments = _field_comments(cls)
        print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]\n\nsettings:")
        for name, f in fields.items():
            print(f"  --{name}={f.default!s:<14} {comments.get(name, '')}")
        sys.exit(0)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: settings are --key=value")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown setting --{key}; valid: {', '.join('--' + k for k in fields)}")
        if not eq:
            text = "True"
        overrides[key] = _parse_value(text, fields[key].type, key)
    return cls(**overrides)


def atomic_write(path, write):
    """Call write(f) on a temp file beside `path`, fsync it, then rename it over `path`: a reader
    (or a run killed at any moment, SIGKILL included) sees the old file or the new one, never half."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(os.path.dirname(path), os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_save(obj, path):
    """torch.save(obj, path), atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    """json.dump(obj, path), atomically (see atomic_write)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def append_jsonl(obj, path):
    """Append one JSON line and flush it to disk (a metrics log: a crash loses at most this line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# the tokenizer: GPT-2's BPE, optionally renumbered onto a small vocabulary

class Tokenizer:
    """GPT-2's byte-level BPE (tiktoken "gpt2"): encode(text) -> list[int], decode(ids) -> str.
    Without `vocab`, ids are GPT-2's own (vocab_size 50257, eot 50256). With `vocab` (a list of
    GPT-2 ids, which must hold 50256) GPT-2 id vocab[i] becomes id i, so a model on a small task
    needs a softmax over len(vocab) outputs only; text producing a GPT-2 id outside it is a UserError.
    decode treats the eot like any token: stopping at it is the caller's job."""

    def __init__(self, vocab=None):
        # offline here: use the BPE files in ../shared unless the user points tiktoken elsewhere
        cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken-cache")
        if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(cache):
            os.environ["TIKTOKEN_CACHE_DIR"] = os.path.normpath(cache)
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads the BPE files once; offline it fails in many ways
            raise UserError(f"cannot load the GPT-2 tokenizer (tiktoken needs internet once): {e}") from None
        self.vocab = None if vocab is None else [int(i) for i in vocab]
        if self.vocab is None:
            self.eot, self.vocab_size = self.enc.eot_token, self.enc.n_vocab
            return
        self._local = {g: i for i, g in enumerate(self.vocab)}
        if len(self._local) != len(self.vocab) or not all(0 <= g < self.enc.n_vocab for g in self.vocab):
            raise UserError(f"tokenizer vocab: expected distinct GPT-2 ids in 0..{self.enc.n_vocab - 1}")
        if self.enc.eot_token not in self._local:
            raise UserError(f"tokenizer vocab: must hold the eot id {self.enc.eot_token}")
        self.eot, self.vocab_size = self._local[self.enc.eot_token], len(self.vocab)

    def encode(self, text):
        # encode_ordinary: a literal "<|endoftext|>" in data is plain text; the real eot is added by
        # encode_examples, so no document can end an example early
        ids = self.enc.encode_ordinary(text)
        if self.vocab is None:
            return ids
        for g in ids:
            if g not in self._local:
                raise UserError(f"tokenizer: {text[:60]!r} has GPT-2 token {g} {self.enc.decode([g])!r}, "
                                f"outside the {self.vocab_size}-token vocab")
        return [self._local[g] for g in ids]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.enc.decode(ids if self.vocab is None else [self.vocab[i] for i in ids])


# -----------------------------------------------------------------------------
# JSONL records: sft {prompt, response}, pairs {prompt, chosen, rejected}, rankings {prompt, responses}

FIELDS = {"sft": ("prompt", "response"), "pairs": ("prompt", "chosen", "rejected"),
          "rankings": ("prompt", "responses")}


def _json_objects(path):
    """Yield ("FILE:LINE", dict) for each non-blank line of a .jsonl or .jsonl.gz file."""
    if not (path.endswith(".jsonl") or path.endswith(".jsonl.gz")):
        raise UserError(f"{path}: expected a .jsonl or .jsonl.gz file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise UserError(f"{where}: not UTF-8 text") from None
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{where}: expected a JSON object, got a {type(obj).__name__}")
                yield where, obj
    except (OSError, EOFError) as e:  # a corrupt or truncated .gz
        raise UserError(f"{path}: cannot read ({e})") from None


def _field(obj, key, where):
    if key not in obj:
        raise UserError(f"{where}: missing field {key!r} (found: {', '.join(map(repr, obj)) or 'none'})")
    return obj[key]


def _text(value, name, where):
    """`value`, which must be a string with something besides whitespace in it."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {name!r} must be a non-empty string, got {json.dumps(value)[:40]}")
    return value


def read_jsonl(path, kind):
    """Records of `kind` ("sft", "pairs" or "rankings", fields in FIELDS) from a .jsonl[.gz] file,
    one JSON object a line; blank lines are skipped, other keys ignored. Rankings list their K >= 2
    responses best first. Any bad line, or no record at all, is a UserError naming FILE:LINE."""
    if kind not in FIELDS:
        raise UserError(f"{path}: unknown record kind {kind!r}; valid: {', '.join(FIELDS)}")
    records = []
    for where, obj in _json_objects(path):
        if kind != "rankings":
            records.append({k: _text(_field(obj, k, where), k, where) for k in FIELDS[kind]})
            continue
        responses = _field(obj, "responses", where)
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError(f"{where}: field 'responses' must be a list of >= 2 strings (best first), "
                            f"got {json.dumps(responses)[:40]}")
        records.append({"prompt": _text(_field(obj, "prompt", where), "prompt", where),
                        "responses": [_text(r, f"responses[{i}]", where) for i, r in enumerate(responses)]})
    if not records:
        raise UserError(f"{path}: no records")
    return records


def rankings_to_pairs(records):
    """Each ranking {prompt, responses: [r_0 best, ..., r_{K-1} worst]} -> its K(K-1)/2 pairs
    (chosen r_i, rejected r_j) for i < j, in order i then j, a prompt's pairs kept together (the
    reward model batches all pairs of one prompt together: InstructGPT, arXiv:2203.02155 §3.5)."""
    return [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
            for r in records for i in range(len(r["responses"])) for j in range(i + 1, len(r["responses"]))]


# -----------------------------------------------------------------------------
# Anthropic's HH-RLHF (arXiv:2204.05862): {"chosen", "rejected"} transcripts sharing all but the last reply

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
_ASSISTANT = "\n\nAssistant:"


def read_hh(path):
    """HH-RLHF pairs -> [{prompt, chosen, rejected}]: prompt is the transcript up to and including its
    last "\\n\\nAssistant:", chosen/rejected the two final replies after it (leading space kept, so
    prompt + reply is the original text). Pairs whose prompts differ, that have no Assistant turn, or
    an empty or identical final reply are skipped and counted in one printed line."""
    records, skipped = [], dict.fromkeys(("prefixes differ", "no Assistant turn", "empty reply", "identical replies"), 0)
    for where, obj in _json_objects(path):
        chosen, rejected = (_text(_field(obj, k, where), k, where) for k in ("chosen", "rejected"))
        (head_c, sep_c, chosen), (head_r, sep_r, rejected) = (t.rpartition(_ASSISTANT) for t in (chosen, rejected))
        reason = ("no Assistant turn" if not (sep_c and sep_r) else
                  "prefixes differ" if head_c != head_r else
                  "empty reply" if not (chosen.strip() and rejected.strip()) else
                  "identical replies" if chosen == rejected else None)
        if reason:
            skipped[reason] += 1
        else:
            records.append({"prompt": head_c + sep_c, "chosen": chosen, "rejected": rejected})
    print(f"data: hh-rlhf {path}: {len(records)} pairs, " + ", ".join(f"{k} skipped ({r})" for r, k in skipped.items()))
    if not records:
        raise UserError(f"{path}: no usable HH-RLHF pairs")
    return records


def download_hh(subset="helpful-base", split="train", cache_dir=None, base_url=HH_URL):
    """Path of {cache_dir}/hh-rlhf/{subset}/{split}.jsonl.gz (cache_dir default ~/.cache/minrlhf),
    downloaded from {base_url}/{subset}/{split}.jsonl.gz unless already there. The file appears only
    once complete (atomic_write), so an interrupted download is retried, never half-read."""
    if subset not in HH_SUBSETS:
        raise UserError(f"unknown hh-rlhf subset {subset!r}; valid: {', '.join(HH_SUBSETS)}")
    if split not in ("train", "test"):
        raise UserError(f"unknown hh-rlhf split {split!r}; valid: train, test")
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "minrlhf")
    path = os.path.join(cache_dir, "hh-rlhf", subset, f"{split}.jsonl.gz")
    if os.path.exists(path):
        return path
    url = f"{base_url}/{subset}/{split}.jsonl.gz"

    def fetch(f):
        with urllib.request.urlopen(url, timeout=60) as r:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                print(f"\rdata: downloading {url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB", end="", flush=True)
            print()
            if total and done != total:  # urllib returns a short body when the connection drops
                raise UserError(f"download {url}: got {done} of {total} bytes; run again to retry")
    try:
        atomic_write(path, fetch)
    except OSError as e:  # URLError, HTTPError, timeouts, a full disk
        raise UserError(f"download {url} failed: {e}") from None
    return path


# -----------------------------------------------------------------------------
# the built-in task: "list 3 fruits without pear:" -> " apple plum cherry", with a gold labeler
# standing in for the human, a noisy demonstrator, and preferences drawn from the gold scores

CATEGORIES = {  # 8 words each, every " word" one GPT-2 token, no word in two categories
    "fruits": "apple pear plum peach lemon mango grape cherry".split(),
    "animals": "cat dog horse cow pig sheep goat lion".split(),
    "colors": "red blue green yellow black white pink purple".split(),
    "tools": "hammer drill knife wrench axe shovel brush needle".split(),
    "metals": "iron copper steel tin zinc nickel bronze brass".split(),
    "drinks": "water tea coffee milk juice beer wine soda".split(),
}
_CATEGORY_OF = {w: c for c, words in CATEGORIES.items() for w in words}
_OTHER_WORDS = {c: [w for w in _CATEGORY_OF if _CATEGORY_OF[w] != c] for c in CATEGORIES}
MAX_N = 5  # prompts ask for 1..MAX_N items; 8 words minus the excluded one leave room for MAX_N + 1
PREFERENCE_BETA = 1.5  # labeler's inverse temperature: agrees with gold on ~72% of pairs that differ


def task_prompt(n, category, excluded):
    return f"list {n} {category} without {excluded}:"


def task_combos():
    """All (n, category, excluded) combos -> (train, eval). A combo is held out iff
    (n + 3 * category index + word index) % 5 == 0: exactly 20%, each (category, excluded) held out
    for one n only, so every n, category and word is still seen in training. Fixed, not seeded, so
    that runs with different seeds are evaluated on the same prompts."""
    train, held_out = [], []
    for n in range(1, MAX_N + 1):
        for ci, (category, words) in enumerate(CATEGORIES.items()):
            for wi, excluded in enumerate(words):
                (held_out if (n + 3 * ci + wi) % 5 == 0 else train).append((n, category, excluded))
    return train, held_out


@functools.lru_cache(maxsize=1024)  # the task has 240 prompts, each parsed thousands of times
def _parse_prompt(prompt):
    m = re.fullmatch(r"list (\d+) (\w+) without (\w+):", prompt)
    if not m or int(m[1]) < 1 or m[2] not in CATEGORIES or _CATEGORY_OF.get(m[3]) != m[2]:
        raise ValueError(f"not a built-in task prompt: {prompt!r}")
    return int(m[1]), m[2], m[3]


def gold_score(prompt, response):
    """The labeler. Over the response's space-separated words in order: +1 for each of the first n
    correct items (in the category, not the excluded word, not said before); -1 for an off-category
    word, the excluded word, a repeat, a non-word, or a correct item beyond n (padding).
    Score = total / n, so exactly n correct items score 1.0, the maximum. ValueError on a prompt
    that is not a task prompt."""
    n, category, excluded = _parse_prompt(prompt)
    total, correct, seen = 0, 0, set()
    for w in response.split():
        ok = _CATEGORY_OF.get(w) == category and w != excluded and w not in seen
        seen.add(w)
        correct += ok
        total += 1 if ok and correct <= n else -1
    return total / n


def demonstrate(prompt, rng):
    """A demonstration of mixed quality, like a careless human's: usually too short (n, n-1, n-2
    items w.p. 0.5, 0.3, 0.2, at least 1), w.p. 0.1 one too long (n+1); each item a fresh correct
    word w.p. 0.8, else an off-category word, the excluded word or a repeat. Mean gold ~0.5."""
    n, category, excluded = _parse_prompt(prompt)
    k = n + 1 if rng.random() < 0.1 else max(1, n - rng.choice((0, 0, 0, 0, 0, 1, 1, 1, 2, 2)))
    fresh, items = [w for w in CATEGORIES[category] if w != excluded], []
    for _ in range(k):
        u = rng.random()  # < 0.8: correct; else one of three mistakes, equally likely
        items.append(fresh.pop(rng.randrange(len(fresh))) if u < 0.8 else
                     excluded if u < 0.8 + 0.2 / 3 else
                     rng.choice(items) if u < 0.8 + 0.4 / 3 and items else
                     rng.choice(_OTHER_WORDS[category]))
    return " " + " ".join(items)


def _distinct_demos(prompt, k, rng):
    demos = []
    while len(demos) < k:
        d = demonstrate(prompt, rng)
        if d not in demos:
            demos.append(d)
    return demos


def _plackett_luce(prompt, responses, rng):
    """The labeler's ranking, best first: repeatedly pick the next response with probability
    proportional to exp(PREFERENCE_BETA * gold) among those left (Plackett-Luce). For two responses
    this is Bradley-Terry: P(a over b) = sigmoid(beta * (gold_a - gold_b))."""
    left, ranked = list(responses), []
    weights = [math.exp(PREFERENCE_BETA * gold_score(prompt, r)) for r in left]
    while left:
        i = rng.choices(range(len(left)), weights)[0]
        ranked.append(left.pop(i))
        weights.pop(i)
    return ranked


def builtin_task(seed=0, n_sft=20000, n_pairs=20000, n_rankings=4000):
    """The offline default data, a pure function of `seed` (random.Random(seed), no global state):
    sft [{prompt, response}] demonstrations, pairs [{prompt, chosen, rejected}] of two distinct
    demonstrations, rankings [{prompt, responses}] of 4..6 distinct ones, all on train prompts;
    train_prompts / eval_prompts (list[str], the task_combos split) for PPO and evaluation; and
    vocab, the sorted GPT-2 ids of every task text plus the eot, for Tokenizer(vocab)."""
    rng = random.Random(seed)
    train_prompts, eval_prompts = ([task_prompt(*c) for c in combos] for combos in task_combos())
    sft = []
    for _ in range(n_sft):
        p = rng.choice(train_prompts)
        sft.append({"prompt": p, "response": demonstrate(p, rng)})
    pairs = []
    for _ in range(n_pairs):
        p = rng.choice(train_prompts)
        chosen, rejected = _plackett_luce(p, _distinct_demos(p, 2, rng), rng)
        pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    rankings = []
    for _ in range(n_rankings):
        p = rng.choice(train_prompts)
        rankings.append({"prompt": p, "responses": _plackett_luce(p, _distinct_demos(p, rng.randint(4, 6), rng), rng)})
    return {"sft": sft, "pairs": pairs, "rankings": rankings, "train_prompts": train_prompts,
            "eval_prompts": eval_prompts, "vocab": list(_task_vocab())}


@functools.lru_cache(maxsize=None)
def _task_vocab():
    # every prompt, and every word: a response is words joined by spaces, one token each
    tok = Tokenizer()
    texts = [task_prompt(*c) for combos in task_combos() for c in combos] + [" " + w for w in _CATEGORY_OF]
    return tuple(sorted({tok.eot}.union(*(tok.encode(t) for t in texts))))


def task_tokenizer():
    """Tokenizer over the built-in task's vocabulary (a few dozen ids instead of 50257)."""
    return Tokenizer(vocab=_task_vocab())
