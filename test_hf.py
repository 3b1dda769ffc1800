"""Weights in and out (hf.py, sample.py, GPT.from_checkpoint): Hugging Face's files and
recorded logits, our checkpoints, the command lines."""
import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import hf
from data import Tokenizer
from gpt import GPT, generate, pad_rows
from hf import load_hf
from test_gpt import tiny
from util import UserError

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "fixtures")
TINY = os.path.join(FIX, "hf-gpt2-tiny")
HUB = os.path.join(FIX, "hf-gpt2-tiny-hub-layout")


def check_expected(model, path):
    exp = json.load(open(os.path.join(path, "expected.json")))
    ids = torch.tensor(exp["input_ids"])
    with torch.no_grad():
        logits = model(ids)[0].double()  # (T, V)
    err_last = (logits[-1] - torch.tensor(exp["logits_last"], dtype=torch.float64)).abs().max().item()
    err_first5 = (logits[:, :5] - torch.tensor(exp["logits_first5"], dtype=torch.float64)).abs().max().item()
    assert err_last <= 1e-4 and err_first5 <= 1e-4, f"logits differ from HF's: last {err_last:.2e}, first5 {err_first5:.2e}"
    assert abs(logits.sum().item() - exp["logits_sum"]) <= 1e-4 * logits.numel() ** 0.5
    assert logits[-1].abs().max() > 0.1  # the reference is far from zero: a zero model cannot pass


@pytest.mark.parametrize("src", [TINY, os.path.join(TINY, "model.safetensors"),
                                 os.path.join(TINY, "pytorch_model.bin"), HUB])
def test_load_hf_matches_hf_logits(src):
    check_expected(load_hf(src), TINY)


def test_convert_cli_then_load_matches_hf_logits(tmp_path):
    dst = str(tmp_path / "tiny.pt")
    subprocess.run([sys.executable, "hf.py", "convert", HUB, dst], check=True, capture_output=True)
    check_expected(hf.from_pretrained(dst), TINY)


def test_export_convert_round_trip_exact(tmp_path):
    model = load_hf(TINY)
    hf.export_hf(model, str(tmp_path))
    # the files themselves, as HF's library wrote them (no transformers here to load the export): V rows, not 50304
    ours, theirs = (hf.read_safetensors(os.path.join(d, "model.safetensors")) for d in (str(tmp_path), TINY))
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())
    for k, t in theirs.items():
        assert (ours[k].dtype, ours[k].shape) == (t.dtype, t.shape) and torch.equal(ours[k], t), \
            f"{k}: exported {ours[k].dtype} {tuple(ours[k].shape)}, HF's file {t.dtype} {tuple(t.shape)}"
    back = load_hf(str(tmp_path))
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    check_expected(back, TINY)
    try:
        import transformers  # optional: the real consumer of the export
    except ImportError:
        return
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor(json.load(open(os.path.join(TINY, "expected.json")))["input_ids"])
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() < 1e-4


def test_export_refuses_a_renumbered_vocabulary(tmp_path):
    """A built-in-task checkpoint numbers its 63 tokens 0..62: exported, GPT-2's tokenizer would drive it
    with ids it does not have (and eos 50256). One line, nothing written."""
    model = tiny()
    hf.save_checkpoint(str(tmp_path / "sft.pt"), model, "sft", vocab=list(range(model.config.vocab_size - 1)) + [50256])
    with pytest.raises(UserError, match="renumbered onto a"):
        hf.main(["export", str(tmp_path / "sft.pt"), str(tmp_path / "hf")])
    assert not os.path.exists(tmp_path / "hf")


def test_download_file_url(tmp_path):
    src = tmp_path / "hub" / "openai-community" / "gpt2"
    shutil.copytree(TINY, src)
    url = "file://" + str(tmp_path / "hub") + "/{repo}/{file}"
    path = hf.download("gpt2", cache_dir=str(tmp_path / "cache"), url=url)
    check_expected(hf.from_pretrained(path), TINY)
    assert hf.download("gpt2", cache_dir=str(tmp_path / "cache"), url="file:///nonexistent/{repo}/{file}") == path
    with pytest.raises(UserError, match="unknown model 'gpt3'"):
        hf.download("gpt3", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="download .* failed"):
        hf.download("gpt2-xl", cache_dir=str(tmp_path / "cache"), url=url)


def test_download_cut_or_corrupt_is_one_line(tmp_path):
    """A chunked body cut short raises http.client.IncompleteRead, which is no OSError: one line, no file.
    The hub sends a file's sha256 (X-Linked-Etag) with its 302 to the CDN, not with the CDN's response:
    a body that does not match it is one line too, and a body that does is written."""
    import hashlib
    import http.server
    import socket
    import threading
    import util
    body = b"weights" * 100

    class Hub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/cut":
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"3e8\r\n" + b"x" * 1000 + b"\r\n")
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            elif self.path.startswith("/resolve/"):  # the hub: a redirect carrying the sha256
                self.send_response(302)
                self.send_header("Location", "/cdn")
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(self.path.encode() if "bad" in self.path else body).hexdigest()}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:  # the CDN: the bytes, no X-Linked-Etag
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(UserError, match="download .* failed"):
            util.fetch(f"{url}/cut", str(tmp_path / "f"))
        with pytest.raises(UserError, match="sha256 differs from the hub's"):
            util.fetch(f"{url}/resolve/bad", str(tmp_path / "f"))
        assert not (tmp_path / "f").exists()
        util.fetch(f"{url}/resolve/good", str(tmp_path / "f"))
    finally:
        server.shutdown()
    assert (tmp_path / "f").read_bytes() == body


def test_gpt_py_copied_alone_loads_and_generates_as_the_repo(tmp_path):
    """gpt.py needs torch alone: copied into an empty directory and imported with none of the repo's
    files on the path, it loads a checkpoint converted by hf.py and samples the tokens the repo's own
    path samples."""
    ck = str(tmp_path / "tiny.pt")
    subprocess.run([sys.executable, "hf.py", "convert", TINY, ck], check=True, capture_output=True)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt.py"), alone)
    code = f"""if True:
        import sys, torch
        sys.path = [p for p in sys.path if p not in ("", {os.path.dirname(os.path.abspath(__file__))!r})]
        sys.path.insert(0, {str(alone)!r})
        import gpt
        assert gpt.__file__.startswith({str(alone)!r}) and not any(m in sys.modules for m in ("hf", "util", "data", "onednn"))
        model = gpt.GPT.from_checkpoint({ck!r}).eval()
        out, _ = gpt.generate(model, torch.tensor([[464, 2068, 7586]]), torch.ones(1, 3, dtype=torch.long), 12,
                              generator=torch.Generator().manual_seed(3))
        print(out.tolist())"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    model = hf.model_from_checkpoint(hf.load_checkpoint(ck), ck).eval()
    out, _ = generate(model, torch.tensor([[464, 2068, 7586]]), torch.ones(1, 3, dtype=torch.long), 12,
                      generator=torch.Generator().manual_seed(3))
    assert json.loads(r.stdout) == out.tolist()


def test_from_checkpoint_builds_a_float32_model_on_map_location(tmp_path, monkeypatch):
    """A bf16 file loads as float32 (load_state_dict copies into the model's own weights), and the model
    is moved to map_location: it was left on the default device, map_location moving only the file's copy."""
    model, path = tiny(), str(tmp_path / "bf16.pt")
    torch.save({"config": dataclasses.asdict(model.config),
                "model": {k: v.bfloat16() for k, v in model.state_dict().items()}}, path)
    moved, to = [], GPT.to
    monkeypatch.setattr(GPT, "to", lambda self, *a, **k: moved.append(a) or to(self, *a, **k))
    loaded = GPT.from_checkpoint(path, map_location=torch.device("cpu"))
    assert moved == [(torch.device("cpu"),)], f"from_checkpoint moved the model with {moved}: want map_location"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16().float())


def test_vocab_padding_rows_zero_cut_off_and_loadable():
    """97 tokens are held in 128 zero rows: logits have 97 columns, sampling never leaves them even
    when the padding logits would win, and an unpadded (V, C) state dict (HF, older checkpoints) loads."""
    model = tiny()
    wte = model.transformer.wte.weight
    assert wte.shape == (128, 32) and wte[97:].abs().sum() == 0 and wte[:97].abs().sum() > 0
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert model(ids).shape == (2, 5, 97)
        wte[97:] = 100 * model.transformer.ln_f.weight  # padding rows that would dominate every logit
        out, gen = generate(model, ids, torch.ones_like(ids), 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
        assert out.max() < 97
        wte[97:] = 0
    sd = {k: v[:97] if k in ("transformer.wte.weight", "lm_head.weight") else v for k, v in model.state_dict().items()}
    other = tiny(seed=1)
    hf.load_weights(other, sd, "test")
    assert torch.equal(other.transformer.wte.weight, wte)
    short = {k: v[:90] if k in hf.TOKEN_ROWS else v for k, v in sd.items()}
    with pytest.raises(UserError, match="transformer.wte.weight"):  # neither V nor padded rows: not padded over
        hf.load_weights(other, short, "test")


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = tiny()
    p = str(tmp_path / "m.pt")
    hf.save_checkpoint(p, model, "sft", step=3)
    ck = hf.load_checkpoint(p, "sft")
    assert ck["step"] == 3 and torch.equal(hf.model_from_checkpoint(ck).lm_head.weight, model.lm_head.weight)
    assert not [f for f in os.listdir(tmp_path) if f != "m.pt"]  # no temp file left behind
    with pytest.raises(UserError, match=r"a 'sft' checkpoint, expected 'reward'"):
        hf.load_checkpoint(p, "reward")
    with pytest.raises(UserError, match=r"no such checkpoint; run `python sft.py` first"):
        hf.load_checkpoint(str(tmp_path / "none.pt"), hint="run `python sft.py` first")
    other = tiny(n_embd=64)
    with pytest.raises(UserError, match=r"n_embd': 64.*n_embd': 32"):
        hf.load_weights(other, ck["model"], p, ck["config"])
    open(tmp_path / "cut.pt", "wb").write(open(p, "rb").read()[:1000])
    with pytest.raises(UserError, match="unreadable checkpoint"):
        hf.load_checkpoint(str(tmp_path / "cut.pt"))
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0}\n')  # not a PyTorch file: torch's message says to set
    with pytest.raises(UserError, match="unreadable checkpoint") as e:  # weights_only=False, which must not reach a user
        hf.load_checkpoint(str(tmp_path / "metrics.jsonl"))
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_load_hf_bad_files_name_the_key(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(TINY, d)
    data = open(d / "model.safetensors", "rb").read()
    open(d / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"truncated at tensor 'transformer\."):
        load_hf(str(d))
    sd = hf.read_safetensors(os.path.join(TINY, "model.safetensors"))
    hf.write_safetensors({k: v for k, v in sd.items() if "h.1.mlp.c_fc.bias" not in k}, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"key 'transformer\.h\.1\.mlp\.c_fc\.bias' missing"):
        load_hf(str(d))
    padded = {**sd, "transformer.wte.weight": pad_rows(sd["transformer.wte.weight"], 50304)}  # our rows, not HF's
    hf.write_safetensors(padded, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"'transformer\.wte\.weight' has shape \(50304, 64\), config.json implies \(50257, "):
        load_hf(str(d))
    sd["transformer.h.0.ln_1.weight"] = torch.ones(65)
    hf.write_safetensors(sd, str(d / "model.safetensors"))
    with pytest.raises(UserError, match=r"'transformer\.h\.0\.ln_1\.weight' has shape \(65,\)"):
        load_hf(str(d))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf(str(tmp_path))
    good = open(d / "config.json").read()
    for text, needle in ((good[:40], "JSONDecodeError"), (good.replace('"n_positions"', '"n_pos"'), "KeyError: 'n_positions'")):
        open(d / "config.json", "w").write(text)
        with pytest.raises(UserError, match=re.escape(f"{d / 'config.json'}: ") + ".*" + re.escape(needle)):
            load_hf(str(d))


def tiny_copy(tmp_path, config=(), tensors=None):
    """tmp_path/m: TINY's config.json updated with `config`, and its model.safetensors or `tensors`."""
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**json.load(open(os.path.join(TINY, "config.json"))), **dict(config)}))
    if tensors is None:
        shutil.copyfile(os.path.join(TINY, "model.safetensors"), d / "model.safetensors")  # not its read-only mode
    else:
        hf.write_safetensors(tensors, str(d / "model.safetensors"))
    return str(d)


def test_read_hf_refuses_what_gpt_py_does_not_compute(tmp_path):
    """A config.json asking for another activation, LayerNorm epsilon or attention scaling, or a file with
    an lm_head of its own (a fine-tuned output layer: gpt.py ties it to wte, so it would load silently with
    wte's head), is one line naming the file and the setting. An lm_head equal to wte loads."""
    for key, value in (("activation_function", "gelu"), ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6),
                       ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True)):
        d = tiny_copy(tmp_path, {key: value})
        with pytest.raises(UserError, match=re.escape(f"{os.path.join(d, 'config.json')}: {key}={json.dumps(value)};")) as e:
            hf.read_hf(d)
        assert "\n" not in str(e.value)
    sd = hf.read_safetensors(os.path.join(TINY, "model.safetensors"))
    head = sd["transformer.wte.weight"].clone()
    head[7, 3] += 1e-3  # one weight of 3.2M
    d = tiny_copy(tmp_path, tensors={**sd, "lm_head.weight": head})
    with pytest.raises(UserError, match=re.escape(f"{d}{os.sep}model.safetensors: lm_head.weight differs from wte")) as e:
        hf.read_hf(d)
    assert "\n" not in str(e.value)
    check_expected(load_hf(tiny_copy(tmp_path, tensors={**sd, "lm_head.weight": sd["transformer.wte.weight"]})), TINY)


def test_read_hf_config_fields_are_positive_ints(tmp_path):
    """config.json is anyone's JSON: a size that is no positive int (a float, a string, a bool, <= 0) or
    heads that do not divide n_embd is one line naming the file and the key, not torch's TypeError."""
    for key, value in (("n_layer", "2"), ("vocab_size", 50257.0), ("n_positions", -1), ("n_embd", 0), ("n_layer", True),
                       ("n_head", None), ("n_head", 5)):
        d = tiny_copy(tmp_path, {key: value})
        why = f"{key}={json.dumps(value)}, expected a positive integer" if value != 5 else "n_embd=64 is not a multiple of"
        with pytest.raises(UserError, match=re.escape(f"{d}{os.sep}config.json: {why}")) as e:
            load_hf(d)
        assert "\n" not in str(e.value)


def test_read_safetensors_malformed_header_is_one_line(tmp_path):
    """A header that does not describe its bytes is a UserError naming the file and the tensor: a shape
    of another size than data_offsets, offsets reversed or missing, an unknown or missing dtype."""
    def write(info):  # the layout write_safetensors writes: 8-byte size, header padded to 8, the data
        h = json.dumps({"__metadata__": {"format": "pt"}, "h.0.w": info}).encode()
        h += b" " * (-len(h) % 8)
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(h)) + h + struct.pack("<2f", 1.0, 2.0))
        return str(path)
    good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert hf.read_safetensors(write(good))["h.0.w"].tolist() == [1.0, 2.0]  # the bad files differ in one field
    for info, why in (({**good, "shape": [3]}, "shape [3] of F32 is 12 bytes, data_offsets [0, 8] hold 8"),
                      ({**good, "shape": [1]}, "shape [1] of F32 is 4 bytes, data_offsets [0, 8] hold 8"),
                      ({**good, "data_offsets": [8, 0]}, "data_offsets [8, 0], expected [begin, end]"),
                      ({"dtype": "F32", "shape": [2]}, "data_offsets None, expected [begin, end]"),
                      ({**good, "dtype": "F8"}, "has unsupported dtype 'F8'"),
                      ({"shape": [2], "data_offsets": [0, 8]}, "has unsupported dtype None"),
                      ({**good, "shape": "2"}, "shape '2', expected a list of sizes"),
                      ([0, 8], "a JSON list, expected an object")):
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'bad.safetensors'}: tensor 'h.0.w'") + ".*" +
                           re.escape(why)) as e:
            hf.read_safetensors(write(info))
        assert "\n" not in str(e.value)


def test_sample_cli_on_converted_fixture(tmp_path):
    """sample.py prints each prompt followed by what gpt.generate samples after it with the same seed and
    settings (GPT-2's BPE, stopping at <|endoftext|>), not the prompt alone."""
    dst = str(tmp_path / "tiny.pt")
    subprocess.run([sys.executable, "hf.py", "convert", TINY, dst], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={dst}", "--prompt=Hello", "--n=2", "--max_new_tokens=8",
                        "--seed=3"], capture_output=True, text=True, encoding="utf-8",
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    tok = Tokenizer()
    ids = torch.tensor([tok.encode("Hello")] * 2)
    out, gen = generate(GPT.from_checkpoint(dst).eval(), ids, torch.ones_like(ids), 8, eos_id=tok.eot,
                        generator=torch.Generator().manual_seed(3))
    texts = ["Hello" + tok.decode(row[m.bool() & (row != tok.eot)].tolist()) for row, m in zip(out, gen)]
    assert all(len(t) > len("Hello") for t in texts), texts  # the test can fail: text follows the prompt
    assert r.stdout == "".join(t + "\n" + "-" * 40 + "\n" for t in texts), f"sample.py printed {r.stdout!r}, want {texts}"
    r = subprocess.run([sys.executable, "sample.py", "--ckpt=missing.pt"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: missing.pt: no such checkpoint"
