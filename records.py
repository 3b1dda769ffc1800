"""
Records from data files: JSONL (or JSON, CSV, TSV, each may be gzipped), of three kinds: sft
{prompt, response}, pairs {prompt, chosen, rejected}, rankings {prompt, responses}; and Anthropic's
HH-RLHF transcripts. A bad record is a one-line UserError naming FILE:LINE and the field.
"""
import codecs
import csv
import gzip
import io
import json
import os
import re
import zlib

from util import UserError, fetch

# -----------------------------------------------------------------------------
# reading a file: its lines, its records, the fields of a kind

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
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz
        raise UserError(f"{path}: cannot read ({e})") from None
    codec = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as e:
        # the prefix in the file's own codec: as latin-1, UTF-16's "\r\x00\n\x00" would be two line breaks
        line = len(NEWLINE.split(raw[:e.start].decode(codec, errors="replace")))
        raise UserError(f"{path}:{line}: not {codec.upper().replace('-SIG', '')} text (byte 0x{raw[e.start]:02x}); "
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
        keys = [k.strip().lower() for k in next((r for r in rows if any(c.strip() for c in r)), [])]  # the header
        last = rows.line_num
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
# a file's kind, and one kind as another

def file_kind(path):
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


def convert(records, have, kind, name):
    """Records of kind `have` as `kind` ("prompts": list[str]): a preference's best response is a
    demonstration, a ranking is a set of pairs, and every record has a prompt; else a UserError naming `name`."""
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
