"""Tests for data.py and records.py: expected values are written by hand or computed independently (a json parse of
the raw file, a formula), never by the function under test. Run: python -m pytest -q test_data.py"""
import codecs
import csv
import gzip
import io
import json
import os
import pathlib
import types
import urllib.request

import pytest
import torch

import data
from data import Tokenizer, builtin_task, encode_examples, load_records, pad_left, pad_right, task_tokenizer
from records import download_hh, rankings_to_pairs, read_hh, read_jsonl
from util import UserError

HH_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "hh-rlhf",
                       "harmless-base-test.jsonl.gz")
needs_hh = pytest.mark.skipif(not os.path.exists(HH_FILE), reason="needs ../shared/data/hh-rlhf")


@pytest.fixture(scope="module")
def task():
    return builtin_task(seed=0)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_known_ids():
    tok = Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.eot, tok.vocab_size, tok.vocab) == (50256, 50257, None)
    assert 50256 not in tok.encode("<|endoftext|>")  # data text never yields the real eot


def test_tokenizer_round_trip():
    tok = Tokenizer()
    for text in ["Hello world", "\n\nHuman: café – ok?\n\nAssistant: 日本 🙂", " apple pear"]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_vocab_remap_round_trip():
    tok = Tokenizer(vocab=[995, 15496, 50256])  # " world", "Hello", eot
    assert (tok.vocab_size, tok.eot) == (3, 2)
    assert tok.encode("Hello world") == [1, 0]
    assert tok.decode([1, 0, 2]) == "Hello world<|endoftext|>"


def test_tokenizer_offline_without_its_files_is_one_line(monkeypatch):
    def offline(name):
        raise ConnectionError("openaipublic.blob.core.windows.net unreachable")
    monkeypatch.setattr(data.tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="tokenizer: tiktoken cannot load GPT-2's BPE files .*TIKTOKEN_CACHE_DIR"):
        Tokenizer()


def test_tokenizer_vocab_out_of_vocab_error():
    tok = Tokenizer(vocab=[995, 15496, 50256])
    with pytest.raises(UserError, match="outside the 3-token vocab"):
        tok.encode("Hello there")
    with pytest.raises(UserError, match="50256"):
        Tokenizer(vocab=[995, 15496])


# ----------------------------------------------------------------------------- jsonl records

@pytest.mark.parametrize("kind, bad, expect", [
    ("sft", '{"prompt": "a", ', "not valid JSON"),
    ("sft", '["a", "b"]', "expected a JSON object"),
    ("sft", '{"prompt": "a"}', "missing field 'response'"),
    ("sft", '{"prompt": "", "response": "b"}', "'prompt' must be a non-empty string"),
    ("sft", '{"prompt": "a", "response": "  "}', "'response' must be a non-empty string"),
    ("sft", '{"prompt": "a", "response": 3}', "'response' must be a non-empty string, got 3"),
    ("pairs", '{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ("rankings", '{"prompt": "a", "responses": ["x"]}', "'responses' must be a list of >= 2"),
    ("rankings", '{"prompt": "a", "responses": "xy"}', "'responses' must be a list of >= 2"),
    ("rankings", '{"prompt": "a", "responses": ["x", 5]}', "'responses[1]' must be a non-empty"),
])
def test_read_jsonl_bad_line_names_file_line_field(tmp_path, kind, bad, expect):
    good = {"sft": '{"prompt": "p", "response": "r"}', "pairs": '{"prompt": "p", "chosen": "c", '
            '"rejected": "r"}', "rankings": '{"prompt": "p", "responses": ["a", "b"]}'}[kind]
    path = write_lines(tmp_path / "d.jsonl", [good, "", bad])  # line 2 blank: still counted
    with pytest.raises(UserError) as e:
        read_jsonl(path, kind)
    assert f"{path}:3:" in str(e.value) and expect in str(e.value)


def test_read_jsonl_gz_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"prompt": "p1", "responses": ["a", "b", "c"], "extra": 1}\n\n  \n'
                '{"prompt": "p2", "responses": ["d", "e"]}\n')
    assert read_jsonl(str(path), "rankings") == [{"prompt": "p1", "responses": ["a", "b", "c"]},
                                                 {"prompt": "p2", "responses": ["d", "e"]}]


def test_read_jsonl_empty_or_missing_file_error(tmp_path):
    with pytest.raises(UserError, match="no records"):
        read_jsonl(write_lines(tmp_path / "e.jsonl", ["", ""]), "sft")
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(str(tmp_path / "missing.jsonl"), "sft")
    with pytest.raises(UserError, match="not-gzip.jsonl.gz: cannot read"):
        read_jsonl(write_lines(tmp_path / "not-gzip.jsonl.gz", ['{"a": 1}']), "sft")
    raw = bytearray(gzip.compress(b"".join(b'{"prompt": "p%d", "response": "r"}\n' % i for i in range(200))))
    raw[20] ^= 0xFF  # inside the deflate stream: gzip raises zlib.error, neither OSError nor EOFError
    (tmp_path / "corrupt.jsonl.gz").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt.jsonl.gz: cannot read"):
        read_jsonl(str(tmp_path / "corrupt.jsonl.gz"), "sft")


# Two records as other tools write them: a comma, quotes, a line break, non-ASCII and a raw U+2028
# (legal inside a JSON string) in the text, each file written by the stdlib, not by the code under test.
RECORDS = [{"prompt": '\n\nHuman: café, "ok"?\n\nAssistant:', "response": " Yes;\u2028sure"},
           {"prompt": "p2", "response": " r2"}]
JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS).encode()


def csv_bytes(delimiter=",", header=("Prompt", "Response")):
    f = io.StringIO()
    w = csv.writer(f, delimiter=delimiter, lineterminator="\r\n")  # Excel's quoting and line ends
    w.writerows([header, *([r["prompt"], r["response"]] for r in RECORDS), ["", ""]])  # and a trailing empty row
    return f.getvalue().encode()


@pytest.mark.parametrize("name, raw", [
    ("bom.jsonl", codecs.BOM_UTF8 + JSONL),  # Notepad's "UTF-8 with BOM"
    ("crlf.jsonl", JSONL.replace(b"\n", b"\r\n") + b"\r\n\r\n"),  # Windows line ends, trailing blank lines
    ("cr.jsonl", JSONL.replace(b"\n", b"\r")),  # classic Mac line ends
    ("utf16.jsonl", codecs.BOM_UTF16_LE + JSONL.decode().replace("\n", "\r\n").encode("utf-16-le")),  # PowerShell 5 `>`
    ("array.json", json.dumps(RECORDS, indent=2).encode()),  # json.dump(indent=2)
    ("array.jsonl", json.dumps(RECORDS).encode()),  # a JSON array in a .jsonl file (pandas' to_json default)
    ("stream.jsonl", "\n".join(json.dumps(r, indent=2) for r in RECORDS).encode()),  # jq without -c
    ("excel.csv", codecs.BOM_UTF8 + csv_bytes()),  # Excel's "CSV UTF-8"
    ("semicolon.csv", csv_bytes(";")),  # where the decimal mark is a comma
    ("sheet.tsv", csv_bytes("\t", ("prompt", "response"))),
    ("blank_first.csv", b"\r\n,\r\n" + csv_bytes()),  # a blank line and an empty row before the header
])
def test_read_jsonl_files_as_tools_write_them(tmp_path, name, raw):
    (tmp_path / name).write_bytes(raw)
    assert read_jsonl(str(tmp_path / name), "sft") == RECORDS
    assert load_records(str(tmp_path / name), "prompts") == ([RECORDS[0]["prompt"]], [RECORDS[1]["prompt"]])


@pytest.mark.parametrize("name, raw, where, expect", [
    ("latin1.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', 2,
     "not UTF-8 text (byte 0xe9); save it as UTF-8"),  # Windows-1252, as Excel's plain "CSV" writes
    ("array.json", b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a"}\n]', 3, "missing field 'response'"),
    ("bad.json", b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a" "response": "b"}\n]', 3, "not valid JSON"),
    ("cells.csv", b'prompt,response\r\na,b\r\na,b,c\r\n', 3, "3 cells, the header has 2"),
    ("empty.csv", b'prompt,response\r\na,\r\n', 2, "'response' must be a non-empty string"),
    ("odd.jsonl", codecs.BOM_UTF16_LE + b"\xfa\x00bad", 1, "not UTF-16 text"),  # an odd number of UTF-16 bytes
    # a lone surrogate on line 3 of a CRLF UTF-16 file: counted as latin-1, each "\r\x00\n\x00" is two line breaks (line 5)
    ("surrogate_le.jsonl", codecs.BOM_UTF16_LE + (JSONL.decode().replace("\n", "\r\n") + '{"prompt": "a').encode("utf-16-le")
     + b"\x00\xd8" + '", "response": "b"}\r\n'.encode("utf-16-le"), 3, "not UTF-16 text"),
    ("surrogate_be.jsonl", codecs.BOM_UTF16_BE + (JSONL.decode().replace("\n", "\r\n") + '{"prompt": "a').encode("utf-16-be")
     + b"\xd8\x00" + '", "response": "b"}\r\n'.encode("utf-16-be"), 3, "not UTF-16 text"),
])
def test_read_jsonl_bad_file_of_another_format_names_the_line(tmp_path, name, raw, where, expect):
    (tmp_path / name).write_bytes(raw)
    with pytest.raises(UserError) as e:
        read_jsonl(str(tmp_path / name), "sft")
    assert f"{tmp_path / name}:{where}: " in str(e.value) and expect in str(e.value), str(e.value)


def test_read_jsonl_folder_or_spreadsheet_is_one_line(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(UserError, match="d.jsonl: a folder, not a file"):
        read_jsonl(str(tmp_path / "d.jsonl"), "sft")
    with pytest.raises(UserError, match="--data=book.xlsx: expected .* save a spreadsheet as CSV"):
        load_records("book.xlsx", "sft")


def test_rankings_to_pairs_count_and_order():
    pairs = rankings_to_pairs([{"prompt": "p", "responses": ["a", "b", "c"]},
                               {"prompt": "q", "responses": ["w", "x", "y", "z"]}])
    assert len(pairs) == 3 * 2 // 2 + 4 * 3 // 2
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs] == [
        ("p", "a", "b"), ("p", "a", "c"), ("p", "b", "c"),
        ("q", "w", "x"), ("q", "w", "y"), ("q", "w", "z"),
        ("q", "x", "y"), ("q", "x", "z"), ("q", "y", "z")]


# ----------------------------------------------------------------------------- HH-RLHF

@needs_hh
def test_read_hh_real_file_count(capsys):
    records = read_hh(HH_FILE)
    assert len(records) == 2303  # of 2,312 lines, measured: 5 prefixes differ, 4 empty replies
    out = capsys.readouterr().out
    assert "2303 pairs, 5 skipped (prefixes differ)" in out and "4 skipped (empty reply)" in out
    with gzip.open(HH_FILE, "rt") as f:
        raw = [json.loads(line) for line in f]
    first = raw[0]
    assert records[0]["prompt"] + records[0]["chosen"] == first["chosen"]
    assert records[0]["prompt"] + records[0]["rejected"] == first["rejected"]


@needs_hh
def test_read_hh_record_by_hand():
    r = read_hh(HH_FILE)[0]
    assert r["prompt"].startswith("\n\nHuman: ")
    assert r["prompt"].endswith("\n\nHuman: okay some of these do not have anything to do with pens"
                                "\n\nAssistant:")
    assert r["chosen"] == (" No, sorry!  All of these involve a pen, the point is that you can get funny"
                           " results by doing pranks with pens.")
    assert r["rejected"].startswith(" There are lots of funny things you can do with pens, here’s one")


def test_read_hh_skips_counted(tmp_path, capsys):
    h, a = "\n\nHuman: hi", "\n\nAssistant:"
    lines = [{"chosen": h + a + " good", "rejected": h + a + " bad"},
             {"chosen": h + " no reply", "rejected": h + " none"},
             {"chosen": h + a + " x", "rejected": "\n\nHuman: other" + a + " y"},
             {"chosen": h + a + " ", "rejected": h + a + " y"},
             {"chosen": h + a + " same", "rejected": h + a + " same"}]
    records = read_hh(write_lines(tmp_path / "hh.jsonl", map(json.dumps, lines)))
    assert records == [{"prompt": h + a, "chosen": " good", "rejected": " bad"}]
    out = capsys.readouterr().out
    for reason in ["prefixes differ", "no Assistant turn", "empty reply", "identical"]:
        assert f"1 skipped ({reason})" in out


@needs_hh
def test_download_hh_file_url_then_cached(tmp_path, capsys):
    mirror = tmp_path / "mirror" / "harmless-base"
    mirror.mkdir(parents=True)
    (mirror / "test.jsonl.gz").write_bytes(pathlib.Path(HH_FILE).read_bytes())
    base_url, cache = (tmp_path / "mirror").as_uri(), str(tmp_path / "cache")
    path = download_hh("harmless-base", "test", cache_dir=cache, base_url=base_url)
    assert path == os.path.join(cache, "hh-rlhf", "harmless-base", "test.jsonl.gz")
    assert pathlib.Path(path).read_bytes() == pathlib.Path(HH_FILE).read_bytes()
    assert os.listdir(os.path.dirname(path)) == ["test.jsonl.gz"]  # no temp file left behind
    assert "downloading" in capsys.readouterr().out
    (mirror / "test.jsonl.gz").unlink()  # a second download would now fail
    assert download_hh("harmless-base", "test", cache_dir=cache, base_url=base_url) == path
    assert "downloading" not in capsys.readouterr().out


def test_download_hh_errors(tmp_path):
    with pytest.raises(UserError, match="helpful-base"):
        download_hh("harmless", "train", cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="failed"):
        download_hh("helpful-base", "train", cache_dir=str(tmp_path / "c"), base_url=tmp_path.as_uri())
    assert not os.path.exists(tmp_path / "c" / "hh-rlhf" / "helpful-base" / "train.jsonl.gz")


def test_download_hh_short_body_error(tmp_path, monkeypatch):
    class ShortResponse(io.BytesIO):  # a connection that drops after 5 of 10 bytes
        headers = {"Content-Length": "10"}
    opener = types.SimpleNamespace(open=lambda url, timeout: ShortResponse(b"12345"))
    monkeypatch.setattr(urllib.request, "build_opener", lambda *handlers: opener)
    with pytest.raises(UserError, match="got 5 of 10 bytes"):
        download_hh("helpful-base", "train", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path / "hh-rlhf" / "helpful-base") == []  # nothing half-written kept


# ----------------------------------------------------------------------------- the built-in task's vocab

def test_builtin_task_texts_encode_within_vocab(task):
    tok = task_tokenizer()
    assert task["vocab"] == sorted(set(task["vocab"])) and 50256 in task["vocab"]
    assert tok.vocab == task["vocab"] and tok.vocab_size == 63
    assert tok.decode([tok.eot]) == "<|endoftext|>"
    texts = set(task["train_prompts"] + task["eval_prompts"])
    texts |= {r[k] for r in task["sft"] + task["pairs"] for k in r}
    texts |= {x for r in task["rankings"] for x in r["responses"]}
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


# ----------------------------------------------------------------------------- loading by name

def test_load_records_builtin_split():
    train, val = load_records("builtin", "sft")
    assert (len(train), len(val)) == (19000, 1000)
    train, val = load_records("builtin", "prompts")
    assert (len(train), len(val)) == (192, 48)


def test_load_records_rankings_file_as_pairs(tmp_path):
    rankings = [{"prompt": f"p{i}", "responses": ["a", "b", "c"]} for i in range(20)]
    path = write_lines(tmp_path / "r.jsonl", map(json.dumps, rankings))
    train, val = load_records(path, "pairs")
    assert (len(train), len(val)) == (19 * 3, 3)  # the last ranking, all 3 of its pairs, is val
    assert {r["prompt"] for r in val} == {"p19"}
    train, val = load_records(path, "sft")
    assert train[0] == {"prompt": "p0", "response": "a"}
    with pytest.raises(UserError, match="cannot be used as rankings"):
        sft_file = write_lines(tmp_path / "s.jsonl", ['{"prompt": "p", "response": "r"}'] * 3)
        load_records(sft_file, "rankings")


def test_load_records_file_trains_on_no_val_prompt(tmp_path, capsys):
    """A data file's records of one prompt stay on one side: 7 prompts x 3 pairs, the last record (p6's b > c)
    is val, so p6's other two pairs leave training (a > b and a > c imply b > c), and PPO's held-out
    prompt p6 is never a training prompt."""
    pairs = [{"prompt": f"p{i}", "chosen": c, "rejected": r} for i in range(7) for c, r in ("ab", "ac", "bc")]
    path = write_lines(tmp_path / "p.jsonl", map(json.dumps, pairs))
    train, val = load_records(path, "pairs")
    assert val == [pairs[-1]] and train == pairs[:18], f"val {val}, train's prompts {sorted({r['prompt'] for r in train})}"
    assert "2 training records share a prompt with val: left out" in capsys.readouterr().out
    train, val = load_records(path, "prompts")
    assert val == ["p6"] and "p6" not in train, (train, val)


@needs_hh
def test_load_records_hh_format_file():
    train, val = load_records(HH_FILE, "pairs")
    assert (len(train), len(val)) == (2303 - 115, 115)
    sft, _ = load_records(HH_FILE, "sft")
    assert sft[0]["prompt"] == train[0]["prompt"] and sft[0]["response"] == train[0]["chosen"]
    prompts, _ = load_records(HH_FILE, "prompts")
    assert prompts[0] == train[0]["prompt"] and len(prompts) == len(set(prompts))


# ----------------------------------------------------------------------------- encoding and collation

def test_encode_examples_truncation_counts(capsys):
    tok = Tokenizer()
    long_prompt = " one two three four five six"  # 6 tokens
    examples = encode_examples(tok, [long_prompt, " hi", " hi"],
                               [" a b", " a b c d e f g h", " a b c d e f"],
                               max_len=8, max_prompt_len=4, name="sft train")
    assert examples[0] == (tok.encode(" three four five six"), tok.encode(" a b") + [50256])
    assert examples[1] == (tok.encode(" hi"), tok.encode(" a b c d e f g"))  # cut: no eot
    assert examples[2] == (tok.encode(" hi"), tok.encode(" a b c d e f") + [50256])  # exactly 8
    out = capsys.readouterr().out
    assert "data: sft train: 3 examples, 1 prompts left-truncated, 1 responses right-truncated" in out


def test_encode_examples_no_room_error():
    tok = Tokenizer()
    assert encode_examples(tok, [" hi"], [" a"], max_len=4, max_prompt_len=4)  # short prompt: room
    with pytest.raises(UserError, match=r"example 1: .*max_len=4.*max_prompt_len"):
        encode_examples(tok, [" hi", " one two three four five"], [" a", " a"],
                        max_len=4, max_prompt_len=4)
    with pytest.raises(UserError, match="no examples"):
        encode_examples(tok, [], [], max_len=4, max_prompt_len=2)


def test_pad_right_shapes_masks_by_hand():
    batch = pad_right([([1, 2], [3, 4]), ([5], [6, 7, 8, 9]), ([10, 11, 12], [13])], pad_id=99)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (3, 5)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 99], [5, 6, 7, 8, 9], [10, 11, 12, 13, 99]]
    assert batch["attn_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 1, 0]]


def test_pad_left_shapes_masks_by_hand():
    tokens, attn_mask = pad_left([[1, 2], [3], [4, 5, 6]], pad_id=99)
    assert tokens.dtype == torch.long and tokens.shape == (3, 3)
    assert tokens.tolist() == [[99, 1, 2], [99, 99, 3], [4, 5, 6]]
    assert attn_mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]


def test_pad_right_buckets_lengths_up_to_the_limit():
    """Lengths rounded up to a multiple of `multiple` (few shapes for compiled kernels), never past
    `limit`, never below the longest row; the masks still mark exactly the real tokens."""
    ex = [([1, 2], [3, 4, 5]), ([6], [7])]
    assert pad_right(ex, 0)["tokens"].shape == (2, 5)
    b = pad_right(ex, 0, 4)
    assert b["tokens"].shape == (2, 8) and b["attn_mask"].sum(1).tolist() == [5, 2] and b["loss_mask"].sum(1).tolist() == [3, 1]
    assert pad_right(ex, 0, 4, limit=6)["tokens"].shape == (2, 6)
    assert pad_right(ex, 0, 64, limit=3)["tokens"].shape == (2, 5)
