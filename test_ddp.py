"""Data parallel (torchrun, DDP over gloo on CPU): two processes, each on half of every batch, must
make the same updates as one process on the whole batch: the same logged losses step by step and
the same final weights. The single-process run is the independent reference."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SFT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--batch_size=8", "--grad_accum=2", "--warmup_iters=2",
       "--max_iters=4", "--eval_interval=2", "--eval_batches=1", "--log_interval=1", "--device=cpu"]
RM = ["--kind=rankings", "--batch_size=4", "--warmup_iters=2", "--max_iters=4", "--eval_interval=2", "--eval_batches=1",
      "--log_interval=1", "--norm_samples=4", "--device=cpu"]  # rankings: the two ranks get different pair counts


def run(script, *args, nproc=1):
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, script, *args], cwd=HERE, env=ENV, capture_output=True,
                          text=True, timeout=300)


def losses(path):
    return {m["iter"]: m["loss"] for m in map(json.loads, open(path))}


def assert_same_run(one, two, metrics, ckpt, keys, skip=()):
    la, lb = losses(f"{one}/{metrics}"), losses(f"{two}/{metrics}")
    assert la.keys() == lb.keys() and len(la) == 4
    for it in la:
        assert abs(la[it] - lb[it]) < 1e-5, f"step {it}: loss {la[it]} single-process vs {lb[it]} on 2 processes"
    a, b = torch.load(f"{one}/{ckpt}", weights_only=True), torch.load(f"{two}/{ckpt}", weights_only=True)
    for key in keys:
        for name in (n for n in a[key] if f"{key}.{n}" not in skip):
            err = (a[key][name] - b[key][name]).abs().max().item()
            assert err < 1e-5, f"{ckpt} {key}.{name}: differs by {err:.2e} between 1 and 2 processes"
    assert a["iter"] == b["iter"] == 4


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    one, two = str(tmp_path_factory.mktemp("sft1")), str(tmp_path_factory.mktemp("sft2"))
    for out, nproc in ((one, 1), (two, 2)):
        r = run("sft.py", *SFT, f"--out_dir={out}", nproc=nproc)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return one, two


def test_ddp_sft_matches_single_process(sft_runs):
    assert_same_run(*sft_runs, "sft_metrics.jsonl", "sft_last.pt", ["model"])


def test_ddp_reward_matches_single_process(sft_runs, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, nproc in ((one, 1), (two, 2)):
        r = run("reward.py", *RM, f"--sft_ckpt={sft_runs[0]}/sft.pt", f"--out_dir={out}", nproc=nproc)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert r.stdout.count("saved") == 1  # rank 0 alone prints (and normalises, and saves)
    # The preference loss depends on reward differences only, so the two parameters that shift every
    # reward alike (the head's bias, and ln_f's bias, seen only through the head) have gradient 0 up to
    # rounding, which Adam's normalisation turns into lr-sized steps of either sign: not comparable.
    assert_same_run(one, two, "reward_metrics.jsonl", "reward_last.pt", ["model", "head"],
                    skip=("head.bias", "model.transformer.ln_f.bias"))


def test_ddp_user_error_printed_once(tmp_path):
    r = run("sft.py", "--batch_size=1", "--device=cpu", f"--out_dir={tmp_path}", nproc=2)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("error: --batch_size=1: fewer sequences than the 2 processes") == 1, r.stderr
