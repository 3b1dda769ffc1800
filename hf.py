"""
Weights in and out. Our checkpoints: one file with the config and the weights, written atomically.
Hugging Face GPT-2 checkpoints <-> our GPT, with no dependency on transformers or safetensors: a
.safetensors file is an 8-byte header size, a JSON header and raw bytes, and GPT-2's Conv1D layers
store their weights transposed. Also the hub download (util.fetch). Bad files are one-line errors.

    python hf.py download gpt2          # fetch + convert the official weights (needs internet)
    python hf.py convert SRC DST        # a Hugging Face checkpoint (dir or file) -> our .pt
    python hf.py export CKPT DIR        # our .pt -> model.safetensors + config.json for HF
"""
import json
import math
import os
import re
import struct
from dataclasses import asdict

import torch

from gpt import GPT, TOKEN_ROWS, GPTConfig, pad_rows
from util import UserError, atomic_save, atomic_write, fetch, main_guard

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
# HF's GPT-2 uses Conv1D, whose weight is stored (in, out): the transpose of nn.Linear's (out, in)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights
HF_FIELDS = dict(block_size="n_positions", vocab_size="vocab_size", n_layer="n_layer", n_head="n_head",
                 n_embd="n_embd")  # GPTConfig's fields -> config.json's keys
# config.json settings that change what the model computes, and the one value of each that gpt.py does
GPT2_ONLY = dict(activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False)


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: 8-byte little-endian header size, JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes. A header that does not
    describe its bytes (dtype unknown, data_offsets missing or reversed, a shape of another size) is
    a UserError naming the file and the tensor."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    n = struct.unpack("<Q", bytes(buf[:8]))[0] if len(buf) >= 8 else len(buf)
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt or truncated safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object of tensors")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise UserError(f"{where}: a JSON {type(info).__name__}, expected an object {{dtype, shape, data_offsets}}")
        kind, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(kind, str) or kind not in ST_DTYPES:
            raise UserError(f"{where} has unsupported dtype {kind!r}; known: {', '.join(ST_DTYPES)}")
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise UserError(f"{where}: shape {shape!r}, expected a list of sizes >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise UserError(f"{where}: data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end")
        (a, b), dtype = offsets, ST_DTYPES[kind]
        if b - a != math.prod(shape) * dtype.itemsize:  # else frombuffer reads a neighbour's bytes, or view fails
            raise UserError(f"{where}: shape {shape} of {kind} is {math.prod(shape) * dtype.itemsize} bytes, "
                            f"data_offsets {offsets} hold {b - a}")
        if 8 + n + b > len(buf):
            raise UserError(f"{path}: truncated at tensor {name!r} (file has {len(buf)} bytes, needs {8 + n + b})")
        t = torch.frombuffer(buf, dtype=dtype, count=(b - a) // dtype.itemsize, offset=8 + n + a)
        out[name] = t.view(shape)
    return out


def write_safetensors(tensors, path):
    """{name: tensor} -> a .safetensors file (atomically), readable by the safetensors package."""
    names = {v: k for k, v in ST_DTYPES.items()}
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        blob = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the format wants the data 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(h)) + h)
        for blob in blobs:
            f.write(blob)
    atomic_write(path, write)


def read_hf(src):
    """Read a Hugging Face GPT-2 checkpoint: a directory holding config.json and model.safetensors
    or pytorch_model.bin, or one of those files with config.json beside it. Returns (path, config
    as GPTConfig fields, state dict in our naming: `transformer.` prefix, Linear (out, in) weights,
    no mask buffers, no lm_head since it is tied to wte)."""
    path = src
    if os.path.isdir(src):
        path = os.path.join(src, "model.safetensors")
        if not os.path.exists(path):
            path = os.path.join(src, "pytorch_model.bin")
    if not os.path.exists(path):
        raise UserError(f"{src}: no model.safetensors or pytorch_model.bin here")
    cfg_path = os.path.join(os.path.dirname(path), "config.json")
    if not os.path.exists(cfg_path):
        raise UserError(f"{cfg_path}: missing (a Hugging Face checkpoint comes with its config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
        cfg = {ours: hf[theirs] for ours, theirs in HF_FIELDS.items()}
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise UserError(f"{cfg_path}: not a GPT-2 config.json ({type(e).__name__}: {str(e)[:100]})") from None
    for ours, theirs in HF_FIELDS.items():  # JSON's 2.0, "2", true or -1 would fail deep inside torch or gpt.py
        if type(cfg[ours]) is not int or cfg[ours] < 1:
            raise UserError(f"{cfg_path}: {theirs}={json.dumps(cfg[ours])}, expected a positive integer")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"{cfg_path}: n_embd={cfg['n_embd']} is not a multiple of n_head={cfg['n_head']} (each head "
                        "takes n_embd / n_head channels)")
    for key, want in GPT2_ONLY.items():  # absent: HF's default, which is GPT-2's
        if hf.get(key, want) != want:
            raise UserError(f"{cfg_path}: {key}={json.dumps(hf[key])}; gpt.py computes only GPT-2's "
                            f"{key}={json.dumps(want)}")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    else:
        sd = torch_load(path, "")
    lm_head = sd.get("lm_head.weight")
    # the hub's files for openai-community/gpt2 drop the "transformer." prefix; ours keep it
    sd = {k if k.startswith("transformer.") else "transformer." + k: v.t() if k.endswith(TRANSPOSED) else v
          for k, v in sd.items() if not SKIPPED.search(k) and k != "lm_head.weight"}
    if lm_head is not None and not torch.equal(lm_head, sd.get("transformer.wte.weight", lm_head)):
        raise UserError(f"{path}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    return path, cfg, sd


def write_hf(cfg, sd, out_dir):
    """The inverse of read_hf: our config fields and state dict -> out_dir/model.safetensors and
    config.json, which transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads."""
    sd = {k: v.t() if k.endswith(TRANSPOSED) else v for k, v in sd.items() if k != "lm_head.weight"}
    write_safetensors(sd, os.path.join(out_dir, "model.safetensors"))
    hf = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
              vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"], n_ctx=cfg["block_size"],
              n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_inner=None,
              layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256, scale_attn_weights=True)
    atomic_write(os.path.join(out_dir, "config.json"), lambda f: f.write(json.dumps(hf, indent=2).encode()))

# -----------------------------------------------------------------------------
# download from the Hugging Face hub (users have internet; tests use file:// URLs)

HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "minrlhf")


def download(name, cache_dir=CACHE_DIR, url=HUB_URL):
    """Fetch a published GPT-2's config.json and model.safetensors into cache_dir/name (once) and
    return that directory. `url` is a template with {repo} and {file} (tests pass file://...)."""
    if name not in HUB_NAMES:
        raise UserError(f"unknown model {name!r}; known: {', '.join(HUB_NAMES)}")
    hf_dir = os.path.join(cache_dir, name)
    for file in ("config.json", "model.safetensors"):
        if not os.path.exists(os.path.join(hf_dir, file)):
            fetch(url.format(repo=HUB_NAMES[name], file=file), os.path.join(hf_dir, file))
    return hf_dir

# -----------------------------------------------------------------------------
# our checkpoints

def save_checkpoint(path, model, stage, **extra):
    """{stage, config, model: state_dict, **extra} -> path, via temp file + fsync + rename."""
    atomic_save({"stage": stage, "config": asdict(model.config), "model": model.state_dict(), **extra}, path)


def torch_load(path, what):
    """torch.load with weights_only (it never runs code from the file); a file it cannot read is one
    line, without torch's advice to set weights_only=False."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [l for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        marks = [i for i, l in enumerate(lines[:-1]) if "WeightsUnpickler error" in l]  # the reason is the next line
        why = lines[marks[0] + 1] if marks else lines[0]
        raise UserError(f"{path}: unreadable{what} (not a PyTorch file, truncated or corrupt?): {why[:200]}") from None


def load_checkpoint(path, stage=None, hint=""):
    """Read one of our checkpoints (weights_only: never executes code from the file). `stage`: a
    name or tuple of names it must have; `hint`: how to make it, e.g. "run `python sft.py` first"."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint" + (f"; {hint}" if hint else ""))
    if os.path.isdir(path):
        inside = ", ".join(f for f in sorted(os.listdir(path)) if f.endswith(".pt"))
        raise UserError(f"{path}: a folder, not a checkpoint file" + (f"; it holds {inside}" if inside else ""))
    ck = torch_load(path, " checkpoint")
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise UserError(f"{path}: not a minrlhf checkpoint (no config/model); convert HF weights with `python hf.py convert`")
    stages = (stage,) if isinstance(stage, str) else stage
    if stages and ck.get("stage") not in stages:
        raise UserError(f"{path}: a {ck.get('stage')!r} checkpoint, expected {' or '.join(map(repr, stages))}")
    return ck


def load_weights(model, state, where, ck_config=None):
    """model.load_state_dict(state), but a missing, extra or misshapen key is one line naming the
    key and both configs (the model's and the checkpoint's). model: a GPT or a RewardModel."""
    own = model.state_dict()
    state = pad_vocab(state, own, model.config.vocab_size)
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape] + [k for k in state if k not in own]
    if bad:
        raise UserError(f"{where}: weights do not fit the model at key {bad[0]!r}: model config "
                        f"{asdict(model.config)}, checkpoint config {ck_config}")
    model.load_state_dict(state)


def pad_vocab(state, own, vocab_size):
    """state with its token rows zero-padded from exactly vocab_size rows to those of the model's
    state dict `own`: Hugging Face's weights have V rows, ours a multiple of 64 (GPT.__init__).
    Token rows are the keys ending in TOKEN_ROWS (a reward model's gpt.transformer.wte.weight too).
    Any other row count is left as it is, for the caller's shape check to name."""
    return {k: pad_rows(v, own[k].size(0)) if k.endswith(TOKEN_ROWS) and k in own and v.dim() == 2
            and v.size(0) == vocab_size < own[k].size(0) else v for k, v in state.items()}


def model_from_checkpoint(ck, path="checkpoint"):
    """A GPT from a checkpoint dict that load_checkpoint read (GPT.from_checkpoint, with errors that
    name the file and both configs)."""
    model = GPT(GPTConfig(**ck["config"]))
    load_weights(model, ck["model"], path, ck["config"])
    return model

# -----------------------------------------------------------------------------
# Hugging Face's GPT-2 <-> our GPT

def load_hf(src):
    """A GPT from a Hugging Face GPT-2 checkpoint (see read_hf); every key of the file must be
    used and every shape must match (wte's rows: config.json's vocab_size exactly, unpadded), or it is a
    one-line error naming the key."""
    path, cfg, sd = read_hf(src)
    model = GPT(GPTConfig(**cfg))
    own = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    want = (cfg["vocab_size"], cfg["n_embd"])  # as HF writes them: a padded (50304, C) wte fits ours and passes below
    for k in (k for k in TOKEN_ROWS if k in sd and sd[k].shape != want):
        raise UserError(f"{path}: key {k!r} has shape {tuple(sd[k].shape)}, config.json implies {want}")
    sd = pad_vocab(sd, own, cfg["vocab_size"])
    for k in sorted(set(own) - set(sd)):
        raise UserError(f"{path}: key {k!r} missing (truncated or not a GPT-2 checkpoint?)")
    for k in sorted(set(sd) - set(own)):
        raise UserError(f"{path}: unexpected key {k!r}")
    with torch.no_grad():
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise UserError(f"{path}: key {k!r} has shape {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}")
            own[k].copy_(v)
    return model


def export_hf(model, out_dir):
    """Write a GPT in GPT-2's Hugging Face layout (model.safetensors + config.json)."""
    sd = {k: v[:model.config.vocab_size] if k in TOKEN_ROWS else v for k, v in model.state_dict().items()}  # no padding rows
    write_hf(asdict(model.config), sd, out_dir)


def from_pretrained(src):
    """A GPT from a published name ("gpt2", downloaded once), our own .pt checkpoint, or a
    Hugging Face checkpoint (directory, model.safetensors or pytorch_model.bin)."""
    if src in HUB_NAMES:
        src = download(src)
    if src.endswith(".pt"):
        return model_from_checkpoint(load_checkpoint(src), src)
    return load_hf(src)


def main(argv):
    usage = "usage: python hf.py {download NAME | convert SRC DST | export CKPT DIR}"
    n_args = {"download": 1, "convert": 2, "export": 2}
    if not argv or argv[0] not in n_args or len(argv) != 1 + n_args[argv[0]]:
        raise UserError(usage)
    cmd, args = argv[0], argv[1:]
    if cmd == "download":
        out = os.path.join(CACHE_DIR, f"{args[0]}.pt")
        save_checkpoint(out, load_hf(download(args[0])), "pretrained", source=args[0])
        print(f"wrote {out}")
    elif cmd == "convert":
        save_checkpoint(args[1], load_hf(args[0]), "pretrained", source=args[0])
        print(f"wrote {args[1]}")
    else:
        ck = load_checkpoint(args[0], ("pretrained", "sft", "ppo"))
        if ck.get("vocab") is not None:  # ids renumbered onto a small vocabulary (data.Tokenizer)
            raise UserError(f"{args[0]}: its token ids are renumbered onto a {len(ck['vocab'])}-token vocabulary "
                            "(the built-in task's), which GPT-2's tokenizer cannot drive: not exported")
        export_hf(model_from_checkpoint(ck, args[0]), args[1])
        print(f"wrote {args[1]}/model.safetensors and config.json")


if __name__ == "__main__":
    main_guard(main, usage=__doc__)
