"""
Text in, tensors out: the tokenizer, the three JSONL record kinds, the HH-RLHF reader, the
built-in task's vocabulary (the task itself, as text, is task.py), and collation into padded (B, T)
tensors.
"""
import codecs
import csv
import functools
import gzip
import io
import json
import os
import re

import tiktoken
import torch

from task import RESPONSE_WORDS, gold_score, task_combos, task_prompt  # data.gold_score: sft, reward, ppo
from task import builtin_task as _builtin_task_text  # builtin_task below adds the vocab
from util import UserError, fetch

# -----------------------------------------------------------------------------
# the tokenizer: GPT-2's BPE, optionally renumbered onto a small vocabulary

class Tokenizer:
    """GPT-2's byte-level BPE (tiktoken "gpt2"): encode(text) -> list[int], decode(ids) -> str.
    Without `vocab`: GPT-2's ids, vocab_size 50257, eot 50256. With `vocab` (distinct GPT-2 ids,
    50256 among them) GPT-2 id vocab[i] becomes id i, so a model on a small task needs a softmax
    over len(vocab) outputs only; text giving a GPT-2 id outside `vocab` is a UserError.
    decode treats the eot like any token: stopping at it is the caller's job."""

    def __init__(self, vocab=None):
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
                                f"outside the {self.vocab_size}-token vocab")
        return [self._local[g] for g in ids]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.enc.decode(ids if self.vocab is None else [self.vocab[i] for i in ids])


# -----------------------------------------------------------------------------
# records, from JSONL (or JSON, CSV) files: sft {prompt, response}, pairs {prompt, chosen, rejected},
# rankings {prompt, responses}

FIELDS = {"sft": ("prompt", "response"), "pairs": ("prompt", "chosen", "rejected"),
          "rankings": ("prompt", "responses")}
DATA_FILES = (".jsonl", ".json", ".csv", ".tsv")  # each may be gzipped (.gz)
NEWLINE = re.compile(r"\r\n|\r|\n")


def is_data_file(path):
    return path.lower().removesuffix(".gz").endswith(DATA_FILES)


def _lines(path):
    """The lines of a data file, gunzipped if .gz: UTF-8 (a BOM, as Notepad and Excel's "CSV UTF-8" write,
    dropped) or UTF-16 with its BOM (Windows PowerShell's `>`), lines ended by \n, \r\n or a lone \r."""
    if not is_data_file(path):
        raise UserError(f"{path}: expected a .jsonl, .json, .csv or .tsv file (or one of them .gz)")
    if not os.path.isfile(path):
        raise UserError(f"{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a corrupt or truncated .gz
        raise UserError(f"{path}: cannot read ({e})") from None
    codec = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        line = len(NEWLINE.split(raw[:e.start].decode("latin-1")))
        raise UserError(f"{path}:{line}: not {codec[:5].upper()} text (byte 0x{raw[e.start]:02x}); "
                        "save it as UTF-8") from None
    return NEWLINE.split(text)  # not str.splitlines: a JSON string may hold a raw U+2028


def _records(path):
    """Yield ("FILE:LINE", dict) for each record of a data file: JSONL (one JSON object a line, blank
    lines skipped), other JSON (_json_values) or CSV (_csv_rows)."""
    if path.lower().removesuffix(".gz").endswith((".csv", ".tsv")):
        yield from _csv_rows(path)
        return
    lines = _lines(path)
    first = next((line.strip() for line in lines if line.strip()), "")
    values = ((f"{path}:{i}", _loads(line, f"{path}:{i}")) for i, line in enumerate(lines, 1) if line.strip()) \
        if first.startswith("{") and first.endswith("}") else _json_values(path, "\n".join(lines))
    for where, obj in values:
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got a {type(obj).__name__}")
        yield where, obj


def _loads(text, where):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _json_values(path, text):
    """What JSON exporters write when not JSONL: an array of records (pandas' to_json, json.dump), or
    records one after another, each over several lines (jq, json.dump(indent=2)); commas between them
    are skipped alike."""
    decoder, gap, pos, line, counted, in_array = json.JSONDecoder(), re.compile(r"[\s,]*"), 0, 1, 0, False
    while (pos := gap.match(text, pos).end()) < len(text):
        if text[pos] == ("]" if in_array else "["):  # the array around the records: step in or out
            in_array, pos = not in_array, pos + 1
            continue
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield f"{path}:{line}", obj


def _csv_rows(path):
    """A .csv or .tsv file as a spreadsheet exports it: a header row naming the fields (any case), then
    one record a row; cells may hold line breaks; ';' instead of ',' (where the decimal mark is a comma)
    is told from the header. Rows with every cell empty are skipped."""
    lines = _lines(path)
    header = next((line for line in lines if line.strip()), "").lower()
    names = {k for fields in FIELDS.values() for k in fields}
    sep = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else \
        max(",;", key=lambda d: len(names & {h.strip(' "') for h in header.split(d)}))
    rows = csv.reader(io.StringIO("\n".join(lines), newline=""), delimiter=sep)
    try:
        keys, last = [k.strip().lower() for k in next(rows, [])], rows.line_num
        for row in rows:
            where, last = f"{path}:{last + 1}", rows.line_num
            if len(row) > len(keys):
                raise UserError(f"{where}: {len(row)} cells, the header has {len(keys)} (a {sep!r} in an unquoted cell?)")
            if any(cell.strip() for cell in row):
                yield where, dict(zip(keys, row))
    except csv.Error as e:
        raise UserError(f"{path}:{rows.line_num}: not valid CSV ({e})") from None


def _text(value, name, where):
    """`value` if it is a string with something besides whitespace; None means missing (or null)."""
    if value is None:
        raise UserError(f"{where}: missing field {name!r}")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field {name!r} must be a non-empty string, "
                        f"got {json.dumps(value)[:40]}")
    return value


def read_jsonl(path, kind):
    """Records of `kind` ("sft", "pairs" or "rankings", the fields in FIELDS, other keys ignored) from a
    data file (_records): JSONL, one JSON object a line, blank lines skipped; a JSON array; CSV. A ranking
    lists K >= 2 responses, best first. A bad line is a UserError naming FILE:LINE and the field; so is
    a file with no record."""
    if kind not in FIELDS:
        raise UserError(f"{path}: unknown record kind {kind!r}; valid: {', '.join(FIELDS)}")
    records = []
    for where, obj in _records(path):
        rec = {k: _text(obj.get(k), k, where) for k in FIELDS[kind] if k != "responses"}
        if kind == "rankings":
            responses = obj.get("responses")
            if not isinstance(responses, list) or len(responses) < 2:
                got = "nothing (missing)" if responses is None else json.dumps(responses)[:40]
                raise UserError(f"{where}: field 'responses' must be a list of >= 2 strings, got {got}")
            rec["responses"] = [_text(r, f"responses[{i}]", where) for i, r in enumerate(responses)]
        records.append(rec)
    if not records:
        raise UserError(f"{path}: no records")
    return records


def rankings_to_pairs(records):
    """Each ranking {prompt, responses: [r_0 best, ..., r_{K-1} worst]} -> its K(K-1)/2 pairs
    {prompt, chosen: r_i, rejected: r_j} for i < j, ordered by i then j, one prompt's pairs together
    (the reward model batches all pairs of a prompt together: InstructGPT, arXiv:2203.02155 §3.5)."""
    return [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]}
            for r in records for i in range(len(r["responses"]))
            for j in range(i + 1, len(r["responses"]))]


# -----------------------------------------------------------------------------
# Anthropic's HH-RLHF (arXiv:2204.05862): {chosen, rejected} transcripts differing in the last reply

HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"


def read_hh(path):
    """HH-RLHF transcripts -> [{prompt, chosen, rejected}]: prompt is the text up to and including the
    last "\\n\\nAssistant:", chosen/rejected the final replies after it (leading space kept, so prompt
    + reply is the original). Pairs whose prompts differ, with no Assistant turn, or with an empty or
    identical final reply are skipped, and counted in one printed line."""
    records = []
    skipped = dict.fromkeys(("prefixes differ", "no Assistant turn", "empty reply", "identical"), 0)
    for where, obj in _records(path):
        (head_c, sep_c, chosen), (head_r, sep_r, rejected) = (
            _text(obj.get(k), k, where).rpartition("\n\nAssistant:") for k in ("chosen", "rejected"))
        reason = ("no Assistant turn" if not (sep_c and sep_r) else
                  "prefixes differ" if head_c != head_r else
                  "empty reply" if not (chosen.strip() and rejected.strip()) else
                  "identical" if chosen == rejected else None)
        if reason:
            skipped[reason] += 1
        else:
            records.append({"prompt": head_c + sep_c, "chosen": chosen, "rejected": rejected})
    print(f"data: hh-rlhf {path}: {len(records)} pairs, "
          + ", ".join(f"{k} skipped ({reason})" for reason, k in skipped.items()))
    if not records:
        raise UserError(f"{path}: no usable HH-RLHF pairs")
    return records


def download_hh(subset="helpful-base", split="train", cache_dir=None, base_url=HH_URL):
    """Local path of {cache_dir}/hh-rlhf/{subset}/{split}.jsonl.gz (cache_dir default ~/.cache/minrlhf),
    downloaded from {base_url}/{subset}/{split}.jsonl.gz unless already there (see fetch)."""
    if subset not in HH_SUBSETS or split not in ("train", "test"):
        raise UserError(f"unknown hh-rlhf {subset}/{split}; subsets: {', '.join(HH_SUBSETS)}; "
                        "splits: train, test")
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "minrlhf")
    path = os.path.join(cache_dir, "hh-rlhf", subset, f"{split}.jsonl.gz")
    if not os.path.exists(path):
        fetch(f"{base_url}/{subset}/{split}.jsonl.gz", path)
    return path


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

def _file_kind(path):
    """"sft", "pairs", "rankings" or "hh" (chosen and rejected but no prompt), from the first record."""
    objects = _records(path)
    where, obj = next(objects, (path, None))
    objects.close()
    if obj is None:
        raise UserError(f"{path}: no records")
    for kind, keys in (("rankings", {"prompt", "responses"}),
                       ("pairs", {"prompt", "chosen", "rejected"}),
                       ("sft", {"prompt", "response"}), ("hh", {"chosen", "rejected"})):
        if keys <= obj.keys():
            return kind
    raise UserError(f"{where}: cannot tell the record kind from the fields {sorted(obj)}; expected "
                    "prompt+response, prompt+chosen+rejected, prompt+responses, or chosen+rejected (HH)")


def _convert(records, have, kind, name):
    """Records of kind `have` as `kind`: a preference's best response is a demonstration, a ranking
    is a set of pairs, and every record has a prompt."""
    if kind == have:
        return records
    if kind == "prompts":
        return list(dict.fromkeys(r["prompt"] for r in records))  # distinct, in order
    if kind == "sft" and have == "pairs":
        return [{"prompt": r["prompt"], "response": r["chosen"]} for r in records]
    if kind == "sft" and have == "rankings":
        return [{"prompt": r["prompt"], "response": r["responses"][0]} for r in records]
    if kind == "pairs" and have == "rankings":
        return rankings_to_pairs(records)
    raise UserError(f"{name}: holds {have} records, which cannot be used as {kind}")


def load_records(data, kind, seed=0):
    """(train, val) records of `kind` ("sft", "pairs", "rankings", or "prompts": list[str]) from `data`:
    "builtin" (builtin_task(seed); its prompts are train_prompts, eval_prompts), "hh-rlhf" (helpful-base
    train, downloaded once) or a data file (_records) of any record kind or HH-RLHF's. Val is the last 5%
    of the records (at least 1), split before converting: a ranking's pairs stay on one side."""
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
        have = "hh" if data == "hh-rlhf" else _file_kind(data)
        path = download_hh() if data == "hh-rlhf" else data
        records = read_hh(path) if have == "hh" else read_jsonl(path, have)
        have = "pairs" if have == "hh" else have
    if len(records) < 2:
        raise UserError(f"{data}: {len(records)} record(s); need 2 or more, for train and val")
    n_val = max(1, len(records) // 20)
    return _convert(records[:-n_val], have, kind, data), _convert(records[-n_val:], have, kind, data)


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
    """(B, T) 0/1 mask -> (B,) index of each row's last 1 (left or right padding alike)."""
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
