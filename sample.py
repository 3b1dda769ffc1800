r"""
Sample from a checkpoint: ours (.pt, from sft.py, ppo.py or `python hf.py convert`) or a Hugging
Face GPT-2 directory.

    python sample.py --ckpt=out/ppo.pt --prompt=$'\n\nHuman: How do I bake bread?\n\nAssistant:' --n=3

--ckpt=PATH (required), --prompt (default none: the samples start from <|endoftext|>), --n=3 samples,
--max_new_tokens=0 (0: as many as the model's context leaves after the prompt, at most 64),
--temperature=1.0, --top_k=0 (0: off), --top_p=1.0 (1: off), --seed=0 (0..2**32-1).
"""
import os
from types import SimpleNamespace

import torch

from data import Tokenizer
from gpt import generate
from hf import load_checkpoint, load_hf, model_from_checkpoint
from util import UserError, check_common, main_guard


def main(argv):
    # max_new_tokens=0: as many as the model's context leaves after the prompt, at most 64
    opts = dict(ckpt="", prompt="", n=3, max_new_tokens=0, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            raise UserError(f"unknown option --{k}; valid: {', '.join('--' + o for o in opts)}")
        try:
            opts[k] = type(opts[k])(os.path.expanduser(v) if k == "ckpt" else v)
        except ValueError:
            raise UserError(f"--{k}={v}: expected {type(opts[k]).__name__}") from None
    if not opts["ckpt"]:
        raise UserError("--ckpt=PATH is required (a .pt from sft.py, ppo.py or hf.py convert, or an HF dir)")
    for k, ok, rule in (("n", opts["n"] >= 1, ">= 1"), ("temperature", opts["temperature"] >= 0, ">= 0 (0: greedy)"),
                        ("top_k", opts["top_k"] >= 0, ">= 0"), ("top_p", 0 < opts["top_p"] <= 1, "in (0, 1]")):
        if not ok:
            raise UserError(f"--{k}={opts[k]}: must be {rule}")
    check_common(SimpleNamespace(**opts))  # --seed: the three stages' rule
    ck = load_checkpoint(opts["ckpt"], ("pretrained", "sft", "ppo")) if opts["ckpt"].endswith(".pt") else None  # an LM
    model = model_from_checkpoint(ck, opts["ckpt"]) if ck else load_hf(opts["ckpt"])
    tok = Tokenizer(ck.get("vocab") if ck else None, opts["ckpt"])
    ids, T = tok.encode(opts["prompt"]) or [tok.eot], model.config.block_size  # no prompt: GPT-2's unconditional start
    new = opts["max_new_tokens"] or min(64, max(1, T - len(ids)))
    if not 0 < new < T:
        raise UserError(f"--max_new_tokens={new}: must be in 1..{T - 1} (the model's block_size is {T})")
    ids = torch.tensor([ids[-(T - new):]] * opts["n"])  # the prompt's end, if it does not fit
    g = torch.Generator().manual_seed(opts["seed"])
    out, gen = generate(model.eval(), ids, torch.ones_like(ids), new, opts["temperature"],
                        opts["top_k"], opts["top_p"], tok.eot, g)
    for row, m in zip(out, gen):
        print(opts["prompt"] + tok.decode(row[m.bool()].tolist()).replace("<|endoftext|>", ""))
        print("-" * 40)


if __name__ == "__main__":
    main_guard(main, usage=__doc__)
