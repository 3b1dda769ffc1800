"""util.py: a checkpoint write that fails halfway leaves the previous checkpoint whole; the
learning-rate schedule (warmup, then cosine decay to a floor) at known steps; the settings all three
stages share (nan included); a resumed optimizer."""
import io
import math
import os
import re

import pytest
import torch

import reward
import sft
from checks import assert_close
from gpt import GPT, GPTConfig
from hf import load_checkpoint, save_checkpoint
from ppo import Config as PPOConfig, check_config
from sft import Config as SFTConfig
from util import UserError, load_optimizer, lr_at, make_optimizer, parse_config


def test_save_checkpoint_failing_halfway_keeps_the_old_file(tmp_path, monkeypatch):
    """A save that dies halfway (a full disk: torch.save writes half the bytes, then raises) must leave
    the checkpoint it was replacing loadable, with its old content, and no temporary file beside it.
    A plain torch.save(obj, path) truncates the old file first (test_robust's SIGKILL lands between saves)."""
    path = str(tmp_path / "sft_last.pt")
    torch.manual_seed(0)
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
    old, new = GPT(config), GPT(config)
    save_checkpoint(path, old, "sft", iter=1)
    real_save = torch.save

    def save_half(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[:len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(half)
        else:
            f.write(half)
            f.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, new, "sft", iter=2)
    monkeypatch.undo()
    left = sorted(os.listdir(tmp_path))
    assert left == ["sft_last.pt"], f"files left after the failed save: {left}: the temporary file must be removed " \
        "when the write fails (atomic_write's except branch)"
    try:
        ck = load_checkpoint(path, "sft")
    except UserError as e:
        raise AssertionError(f"the old checkpoint no longer loads after a save failed halfway: the save wrote into it in "
                             f"place (a plain torch.save(obj, path)), not into a temp file renamed over it: {e}") from None
    assert ck["iter"] == 1 and all(torch.equal(v, ck["model"][k]) for k, v in old.state_dict().items()), \
        "the checkpoint holds something other than the old save: a failed save must change nothing"
    os.mkdir(tmp_path / "a_folder.pt")  # os.replace's IsADirectoryError came after the whole write
    with pytest.raises(UserError, match="a_folder.pt: a folder, not a file: cannot write there"):
        save_checkpoint(str(tmp_path / "a_folder.pt"), new, "sft", iter=2)


def test_lr_at_warmup_then_cosine_known_values():
    """lr_at at known steps, computed by hand from its docstring: lr 3e-4, 10 warmup steps of 110,
    floor min_lr_frac = 0.1. Each plausible wrong schedule is computed beside it and named."""
    lr, warmup, total, m = 3e-4, 10, 110, 0.1
    steps = [0, 4, 9, 10, 35, 60, 110, 150]
    want = [3e-5,  # lr * 1/10: step 0 already learns
            1.5e-4,  # lr * 5/10, mid-warmup
            3e-4,  # lr * 10/10, the last warmup step
            3e-4,  # p = 0: cos 0 = 1
            3e-4 * (0.1 + 0.45 * (1 + 2 ** -0.5)),  # p = 25/100: cos(pi/4) = 1/sqrt(2); = 2.604594...e-4
            3e-4 * 0.55,  # p = 1/2: cos(pi/2) = 0, (1 + m) / 2 * lr
            3e-5,  # p = 1: cos(pi) = -1, the floor m * lr
            3e-5]  # past total: p stays 1
    cos = lambda p: lr * (m + (1 - m) * (1 + math.cos(math.pi * min(1, p))) / 2)
    decay = lambda it: (it - warmup) / (total - warmup)
    wrong = lambda warm, after: [warm(it) if it < warmup else after(it) for it in steps]
    mistakes = [("warmup off by one: lr * it / warmup (0 at step 0, the peak a step late)",
                 wrong(lambda it: lr * it / warmup, lambda it: cos(decay(it)))),
                ("decay to 0, not to the floor min_lr_frac * lr",
                 wrong(lambda it: lr * (it + 1) / warmup, lambda it: lr * (1 + math.cos(math.pi * min(1, decay(it)))) / 2)),
                ("the cosine's progress counted from step 0 (it / total), not from the end of warmup",
                 wrong(lambda it: lr * (it + 1) / warmup, lambda it: cos(it / total))),
                ("a linear decay, not a cosine", wrong(lambda it: lr * (it + 1) / warmup,
                                                      lambda it: lr * (m + (1 - m) * (1 - min(1, decay(it)))))),
                ("the floor added on top of the full cosine: lr * (m + (1 + cos) / 2)",
                 wrong(lambda it: lr * (it + 1) / warmup, lambda it: lr * (m + (1 + math.cos(math.pi * min(1, decay(it)))) / 2)))]
    got = torch.tensor([lr_at(it, lr, warmup, total) for it in steps], dtype=torch.float64)
    assert_close("lr_at(step, 3e-4, warmup=10, total=110)", got, torch.tensor(want, dtype=torch.float64), 1e-12,
                 mistakes, "linear warmup lr * (it + 1) / warmup, then a cosine from lr down to min_lr_frac * lr",
                 labels={(i,): f"step {it}" for i, it in enumerate(steps)})


@pytest.mark.parametrize("stage, kw, needle", [
    (sft, dict(lr=math.nan), "--lr=nan: must be positive"), (reward, dict(lr=math.nan), "--lr=nan"),
    (sft, dict(n_head=3), "multiple of --n_head=3"), (sft, dict(n_head=0), "--n_head=0"), (sft, dict(n_layer=0), "--n_layer=0"),
    (sft, dict(warmup_iters=-1), "--warmup_iters=-1"), (reward, dict(weight_decay=math.nan), "--weight_decay=nan"),
    (sft, dict(grad_clip=-1.0), "--grad_clip=-1.0"), (sft, dict(seed=2 ** 40), "--seed=1099511627776"),
    (None, dict(temperature=math.nan), "--temperature=nan"), (None, dict(kl_coef=math.nan), "--kl_coef=nan"),
    (None, dict(seed=-1), "--seed=-1")])
def test_nan_and_impossible_shared_settings(stage, kw, needle):
    """nan passes every `x <= 0` check (a comparison with nan is False): refused as any bad value, in
    each stage's check_config, before a model is built; on the command line at parsing already."""
    with pytest.raises(UserError, match=re.escape(needle)):
        (stage.check_config(stage.Config(**kw)) if stage else check_config(PPOConfig(**kw)))


def test_nonfinite_numbers_refused_where_not_offered():
    for cls, arg in ((SFTConfig, "--lr=nan"), (SFTConfig, "--weight_decay=inf"), (PPOConfig, "--ent_coef=-inf")):
        with pytest.raises(UserError, match=re.escape(f"{arg}: expected a finite number")):
            parse_config(cls, [arg])
    assert math.isnan(parse_config(PPOConfig, ["--truncated_score=nan"]).truncated_score)  # its comment offers nan


def test_resumed_optimizer_takes_this_runs_lr_and_the_saved_moments():
    """--resume with a new --lr (PPO's is constant, never set again): the optimizer's moments come from
    the checkpoint, its learning rate and weight decay from this run's settings."""
    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = make_optimizer([w], 1e-4, 0.1)
    w.sum().backward()
    opt.step()
    resumed = make_optimizer([torch.nn.Parameter(w.detach().clone())], 5e-6, 0.0)
    load_optimizer(resumed, opt.state_dict(), "ppo.pt")
    assert [(g["lr"], g["weight_decay"]) for g in resumed.param_groups] == [(5e-6, 0.0)] * len(resumed.param_groups), \
        "the saved learning rate came back: load_state_dict restores the old param groups' settings"
    saved = next(iter(opt.state.values()))
    assert torch.equal(next(iter(resumed.state.values()))["exp_avg"], saved["exp_avg"]), "the moments were not resumed"


def test_checks_call_fails_on_an_input_changed_in_place():
    """checks.call, which every exercise's known-value test goes through: a value written, or a shape
    changed in place (unsqueeze_, resize_: a comparison would broadcast them), fails naming the input;
    nan left as nan does not."""
    from checks import call
    for f in (lambda mask: mask.mul_(0), lambda mask: mask.unsqueeze_(0), lambda mask: mask.resize_(1)):
        with pytest.raises(AssertionError, match="changed its input `mask` in place"):
            call("f", f, torch.ones(2, 3))
    assert call("f", lambda x: x + 1, torch.tensor([math.nan, 1.0]))[1] == 2
