"""
Text in, tensors out: the tokenizer, the built-in task's vocabulary (the task itself, as text, is
task.py), the stage scripts' --data (records from files: records.py), and collation into padded
(B, T) tensors.
"""
import functools
import os

import tiktoken
import torch

from records import convert, download_hh, file_kind, is_data_file, read_hh, read_jsonl
from task import RESPONSE_WORDS, gold_score, task_combos, task_prompt  # data.gold_score: sft, reward, ppo
from task import builtin_task as _builtin_task_text  # builtin_task below adds the vocab
from util import UserError

# -----------------------------------------------------------------------------
# the tokenizer: GPT-2's BPE, optionally renumbered onto a small vocabulary

class Tokenizer:
    """GPT-2's byte-level BPE (tiktoken "gpt2"): encode(text) -> list[int], decode(ids) -> str.
    Without `vocab`: GPT-2's ids, vocab_size 50257, eot 50256. With `vocab` (distinct GPT-2 ids,
    50256 among them) GPT-2 id vocab[i] becomes id i, so a model on a small task needs a softmax
    over len(vocab) outputs only; text giving a GPT-2 id outside `vocab` is a UserError naming
    `source`, the checkpoint the vocabulary came from. decode treats the eot like any token:
    stopping at it is the caller's job."""

    def __init__(self, vocab=None, source="the built-in task"):
        # offline here: the BPE files in ../shared, unless the user points tiktoken elsewhere
        cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                             "tiktoken-cache")
        if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(cache):
            os.environ["TIKTOKEN_CACHE_DIR"] = os.path.normpath(cache)
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the files at first use: offline, a requests error
            raise UserError(f"tokenizer: tiktoken cannot load GPT-2's BPE files ({type(e).__name__}): it downloads them once; "
                            "offline, set TIKTOKEN_CACHE_DIR to a folder holding them (as ../shared/tiktoken-cache)") from None
        self.vocab = None if vocab is None else [int(g) for g in vocab]
        self.source = source
        self.eot, self.vocab_size = self.enc.eot_token, self.enc.n_vocab
        if self.vocab is not None:
            self._local = {g: i for i, g in enumerate(self.vocab)}
            if len(self._local) != len(self.vocab) or self.eot not in self._local:
                raise UserError(f"tokenizer vocab: expected distinct GPT-2 ids, {self.eot} among them")
            self.eot, self.vocab_size = self._local[self.eot], len(self.vocab)

    def encode(self, text):
        # encode_ordinary: a literal "<|endoftext|>" in data is plain text, so only encode_examples
        # puts the real eot into a sequence
        ids = self.enc.encode_ordinary(text)
        if self.vocab is None:
            return ids
        for g in ids:
            if g not in self._local:
                raise UserError(f"tokenizer: {text[:60]!r} has GPT-2 token {self.enc.decode([g])!r}, "
                                f"outside the {self.vocab_size}-token vocab of {self.source}")
        return [self._local[g] for g in ids]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.enc.decode(ids if self.vocab is None else [self.vocab[i] for i in ids])


# -----------------------------------------------------------------------------
# the built-in task (task.py) and its vocabulary, which needs the tokenizer

def builtin_task(seed=0, **sizes):
    """task.builtin_task(seed, **sizes) plus vocab, the sorted GPT-2 ids of every task text plus the
    eot, for Tokenizer(vocab)."""
    return {**_builtin_task_text(seed, **sizes), "vocab": list(_task_vocab())}


@functools.lru_cache(maxsize=None)
def _task_vocab():
    # a response is words joined by spaces, each " word" one token, so prompts and words cover all
    tok = Tokenizer()
    texts = [task_prompt(*c) for combos in task_combos() for c in combos]
    texts += [" " + w for w in RESPONSE_WORDS]
    return tuple(sorted({tok.eot}.union(*(tok.encode(t) for t in texts))))


def task_tokenizer():
    """Tokenizer on the built-in task's vocabulary (63 ids instead of 50257)."""
    return Tokenizer(vocab=_task_vocab())


# -----------------------------------------------------------------------------
# loading by name: the stage scripts' --data setting

def load_records(data, kind, seed=0):
    """(train, val) records of `kind` ("sft", "pairs", "rankings", or "prompts": list[str]) from `data`:
    "builtin" (builtin_task(seed); its prompts are train_prompts, eval_prompts), "hh-rlhf" (helpful-base
    train, downloaded once) or a data file (records.py) of any record kind or HH-RLHF's. Val is the last 5%
    of the records (at least 1), split before converting: a ranking's pairs stay on one side. Outside the
    built-in task (whose evaluation prompts are held out apart), training drops the records whose prompt
    is a val record's: val's preferences and PPO's held-out prompts are never trained on."""
    if kind not in ("sft", "pairs", "rankings", "prompts"):
        raise UserError(f"unknown record kind {kind!r}; valid: sft, pairs, rankings, prompts")
    if data == "builtin":
        task = builtin_task(seed)
        if kind == "prompts":
            return task["train_prompts"], task["eval_prompts"]
        records, have = task[kind], kind
    else:
        if data != "hh-rlhf" and not is_data_file(data):
            raise UserError(f"--data={data}: expected builtin, hh-rlhf, or a .jsonl, .json, .csv or .tsv file (or .gz); "
                            "save a spreadsheet as CSV")
        have = "hh" if data == "hh-rlhf" else file_kind(data)
        path = download_hh() if data == "hh-rlhf" else data
        records = read_hh(path) if have == "hh" else read_jsonl(path, have)
        have = "pairs" if have == "hh" else have
    if len(records) < 2:
        raise UserError(f"{data}: {len(records)} record(s); need 2 or more, for train and val")
    n_val = max(1, len(records) // 20)
    if have == "rankings" and kind == "pairs":  # the file's kind is known here: no second read to say so
        print(f"data: {data} holds rankings, read as pairs, each scored apart: --kind=rankings scores each "
              "response once and batches a ranking's pairs together (InstructGPT)")
    train, val = records[:-n_val], records[-n_val:]
    if data != "builtin":
        held = {r["prompt"] for r in val}
        train = [r for r in train if r["prompt"] not in held]
        if len(train) < len(records) - n_val:
            print(f"data: {data}: {len(records) - n_val - len(train)} training records share a prompt with val: left out")
    return convert(train, have, kind, data), convert(val, have, kind, data)


# -----------------------------------------------------------------------------
# encoding, batching and collation

def encode_examples(tok, prompts, responses, max_len, max_prompt_len, name="data"):
    """[(prompt_ids, response_ids)] with response_ids = tok.encode(response) + [tok.eot]. A prompt is
    left-truncated to max_prompt_len tokens (its end, nearest the response, matters most), then the
    response right-truncated to fit max_len in all: a cut response loses its eot, so the model is
    never taught to stop where the text did not. Prints the counts in one line."""
    assert len(prompts) == len(responses)
    if not prompts:
        raise UserError(f"{name}: no examples")
    examples, cut_prompts, cut_responses = [], 0, 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p, r = tok.encode(prompt), tok.encode(response) + [tok.eot]
        cut_prompts += len(p) > max_prompt_len
        p = p[max(0, len(p) - max_prompt_len):]  # not p[-max_prompt_len:], which keeps everything at 0
        if len(p) >= max_len:
            raise UserError(f"{name}: example {i}: a {len(p)}-token prompt leaves no room for a "
                            f"response in max_len={max_len}; set max_prompt_len below max_len")
        cut_responses += len(p) + len(r) > max_len
        examples.append((p, r[:max_len - len(p)]))
    print(f"data: {name}: {len(examples)} examples, {cut_prompts} prompts left-truncated, "
          f"{cut_responses} responses right-truncated")
    return examples


def pad_right(examples, pad_id, multiple=1, limit=None):
    """Batch [(prompt_ids, response_ids)] for training: row b is prompt + response, right-padded with
    pad_id to T, the longest row rounded up to a multiple of `multiple` but not past `limit` (few
    distinct shapes for compiled GPU kernels). Returns a dict of (B, T) long tensors: tokens;
    attn_mask, 1 on real tokens; loss_mask, 1 on response tokens only (targets: the logits at t-1
    predict the token at t). pad_id may be the eot: the masks, not the ids, tell padding apart."""
    longest = max(len(p) + len(r) for p, r in examples)
    T = -(-longest // multiple) * multiple
    if limit is not None:
        T = max(longest, min(T, limit))
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    attn_mask = torch.zeros_like(tokens)  # (B, T)
    loss_mask = torch.zeros_like(tokens)  # (B, T)
    for b, (p, r) in enumerate(examples):
        tokens[b, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn_mask[b, :len(p) + len(r)] = 1
        loss_mask[b, len(p):len(p) + len(r)] = 1
    return {"tokens": tokens, "attn_mask": attn_mask, "loss_mask": loss_mask}


def pad_left(prompt_ids_list, pad_id, width=None):
    """Batch prompts for generation, left-padded with pad_id to T = width columns (default: the
    longest prompt) so every row's last prompt token sits at T-1 and new tokens append in one column.
    Returns (tokens, attn_mask), (B, T) long each, attn_mask 1 on real tokens; a model must restart
    positions at 0 after each row's padding."""
    T = width or max(len(p) for p in prompt_ids_list)
    tokens = torch.full((len(prompt_ids_list), T), pad_id, dtype=torch.long)  # (B, T)
    attn_mask = torch.zeros_like(tokens)  # (B, T)
    for b, p in enumerate(prompt_ids_list):
        tokens[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        attn_mask[b, T - len(p):] = 1
    return tokens, attn_mask


def last_index(mask):
    """(B, T) 0/1 mask -> (B,) index of each row's last 1 (left or right padding alike); T - 1 for a row
    without a 1."""
    T = mask.size(1)
    return T - 1 - mask.flip(1).long().argmax(1)


def batch_indices(n, it, batch_size, seed):
    """The example indices of batch number `it`: epoch e = it // (n // batch_size) walks a
    permutation seeded by (seed, e). A pure function of `it`, so a resumed run sees the same data."""
    per_epoch = max(1, n // batch_size)
    j = it % per_epoch
    return epoch_permutation(n, seed, it // per_epoch)[j * batch_size:(j + 1) * batch_size].tolist()


def epoch_permutation(n, seed, epoch):
    """The order of the n examples in epoch `epoch` of a run seeded by `seed`: (n,) long."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def eval_indices(n, batch_size, max_batches, seed):
    """Up to max_batches batches of a permutation seeded by `seed`, each example at most once (the last
    batch may be short): batch_indices' first epoch, without repeats where n < max_batches x batch_size."""
    perm = epoch_permutation(n, seed, 0).tolist()
    return [perm[i:i + batch_size] for i in range(0, min(n, max_batches * batch_size), batch_size)]
