"""Robustness as a user meets it: one-line errors with exit code 2, runs that survive SIGKILL and
Ctrl-C, and resumed runs that match uninterrupted ones step for step."""
import glob
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from unittest import mock

import pytest
import torch

import bench
import ddp
import sample
from gpt import TOKEN_ROWS, generate
from hf import load_checkpoint
from util import UserError, get_device, parse_config, resolve_dtype
from ppo import Config as PPOConfig, check_config
from sft import Config as SFTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SFT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--batch_size=8", "--warmup_iters=2", "--eval_batches=1", "--log_interval=1"]
RM = ["--batch_size=4", "--eval_batches=1", "--log_interval=1", "--warmup_iters=2", "--norm_samples=0"]
PPO = ["--rollout_batch=8", "--minibatch=4", "--ppo_epochs=2", "--eval_prompts=4", "--eval_samples=1", "--max_new_tokens=6"]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600)


def one_line_error(r, *needles):
    assert r.returncode == 2, f"exit code {r.returncode}\n{r.stdout[-1000:]}\n{r.stderr[-2000:]}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck"))
    assert run("sft.py", f"--out_dir={out}", *SFT, "--max_iters=4", "--eval_interval=2").returncode == 0
    r = run("reward.py", f"--out_dir={out}", f"--sft_ckpt={out}/sft.pt", *RM, "--max_iters=4", "--eval_interval=2")
    assert r.returncode == 0, r.stderr
    return out


def test_bad_jsonl_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    one_line_error(run("sft.py", f"--data={bad}", f"--out_dir={tmp_path}"), f"{bad}:2", "response")
    r = run("sft.py", f"--data={bad}", f"--out_dir={tmp_path}", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug keeps the traceback


def test_settings_errors_list_valid_keys(tmp_path):
    one_line_error(run("sft.py", "--lr_max=1"), "unknown setting --lr_max", "--max_iters")
    one_line_error(run("sft.py", "--lr=fast"), "--lr=fast", "float")
    for argv in (["--out_dir"], ["--lr", "0.1"]):  # a text or number setting alone is not a flag (out_dir "True")
        with pytest.raises(UserError, match=f"{argv[0]} needs a value"):
            parse_config(SFTConfig, argv)
    one_line_error(run("ppo.py", "--rollout_batch=10", "--minibatch=4"), "--minibatch=4 must divide --rollout_batch=10")
    for bad, rule in (("--max_prompt_len=0", "must be in 1..max_len-1"), ("--lr=-1", "must be positive")):  # as sft.py's
        one_line_error(run("reward.py", bad), bad, rule)


@pytest.mark.parametrize("kw, needle", [(dict(clip_eps=0.0), "clip_eps"), (dict(temperature=-1.0), "temperature"),
                                        (dict(kl_target=6.0), "adaptive_kl"), (dict(adaptive_kl=True), "kl_target"),
                                        (dict(rollout_batch=6, minibatch=4), "must divide"), (dict(kl_coef=-0.1), "kl_coef"),
                                        (dict(missing_eos_penalty=1.0), "--truncated_score=nan"),
                                        (dict(truncated_score=float("inf")), "--truncated_score=inf: a finite score"),
                                        (dict(eval_samples=0), "eval_samples"), (dict(eval_prompts=0), "eval_prompts"),
                                        (dict(adaptive_kl=True, kl_target=1.0, kl_horizon=0), "kl_horizon"),
                                        (dict(vf_coef=-0.5), "--vf_coef=-0.5"), (dict(gamma=0.0), "--gamma=0.0"),
                                        (dict(lam=1.5), "--lam=1.5"), (dict(advantage="rloo"), "--samples_per_prompt=1"),
                                        (dict(advantage="gae", samples_per_prompt=0), "gae needs >= 1")])
def test_impossible_ppo_settings(kw, needle):
    with pytest.raises(UserError, match=needle):
        check_config(PPOConfig(**kw))


@pytest.mark.parametrize("kw, needle", [(dict(model="gpt3"), "--model=gpt3"), (dict(only="sft,rl"), "--only=sft,rl"),
                                        (dict(gen_batches="1,x"), "--gen_batches=1,x"), (dict(reps=0), "--reps=0"),
                                        (dict(ppo_prompts=3), "--ppo_prompts=3"), (dict(model="tiny", only="sft"), "--sft_len"),
                                        (dict(model="tiny", only="ppo", ppo_prompt_len=40), "--ppo_prompt_len + --ppo_new_tokens"),
                                        (dict(compile_mode="fast"), "--compile_mode=fast"),
                                        (dict(hh="/nonexistent.jsonl"), "--hh=/nonexistent.jsonl: no such file"),
                                        (dict(out=os.path.join(HERE, "README.md", "b.json")), "cannot write there"),
                                        (dict(profile=HERE), "a folder, expected a file name")])
def test_impossible_bench_settings(kw, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        bench.check_config(bench.Config(**kw))
    assert bench.check_config(bench.Config(model="tiny", only="generate,ppo", prompt_len=8, new_tokens=8,
                                           ppo_prompt_len=16, ppo_new_tokens=8)) == (["generate", "ppo"], [1, 8])
    bc = bench.settings(["--preset=gpu", "--reps=5", "--sft_len=512", "--sft-batch=2"])  # the preset under the flags given
    assert (bc.reps, bc.sft_len, bc.sft_batch, bc.device) == (5, 512, 2, "cuda")


def test_bench_file_it_cannot_read_is_one_line_before_any_timing(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    one_line_error(run("bench.py", "--model=tiny", "--only=sft", "--sft_len=32", f"--hh={notes}"), f"--hh={notes}: expected")


def test_missing_and_wrong_checkpoints(tmp_path, ckpts):
    one_line_error(run("reward.py", f"--sft_ckpt={tmp_path}/none.pt"), "run `python sft.py` first")
    one_line_error(run("ppo.py", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={tmp_path}/none.pt"), "run `python reward.py` first")
    one_line_error(run("ppo.py", f"--sft_ckpt={ckpts}/reward.pt", f"--reward_ckpt={ckpts}/reward.pt"), "'reward' checkpoint, expected 'sft'")
    open(tmp_path / "cut.pt", "wb").write(open(f"{ckpts}/sft.pt", "rb").read()[:5000])
    one_line_error(run("reward.py", f"--sft_ckpt={tmp_path}/cut.pt"), "unreadable checkpoint")
    one_line_error(run("sft.py", f"--out_dir={tmp_path}", "--max_len=8", "--max_prompt_len=8"),
                   "--max_prompt_len=8")  # a prompt budget that leaves no room for a response


@pytest.mark.parametrize("device, gpus, needle", [("cuda", 0, "--device=cuda: no CUDA GPU"), ("cuda:2", 2, "has 2 GPU(s)"),
                                                  ("mps", 0, "--device=mps: no Apple GPU"), ("gpu", 0, "expected auto, cpu")])
def test_device_this_machine_lacks_is_one_line(monkeypatch, device, gpus, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UserError, match=re.escape(needle)):
        get_device(device)
    assert get_device("auto") == ("cuda" if gpus else "cpu")


def test_a_named_gpu_becomes_the_current_device(monkeypatch):
    """--device=cuda:1 in one process: CUDA streams, torch.cuda.graph's capture stream, synchronize() and
    the memory statistics take the current GPU when given none, so the named one is made current (ddp_init
    does it under torchrun only): else gpt.DecodeGraph captured on cuda:0 while its kernels ran on cuda:1."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    assert get_device("cuda:1") == "cuda:1" and calls == [1], calls
    get_device("cuda")  # no index: the current GPU stays as it is
    assert calls == [1], calls


def test_precision_a_machine_cannot_train_in(monkeypatch):
    """float16 needs loss scaling (left out); bf16 by default only on GPUs that compute in it (Ampere on):
    on a T4 (compute capability 7.5) auto is fp32, as on the CPU."""
    for dtype, needle in (("float16", "needs loss scaling"), ("bf16", "expected auto, float32 or bfloat16")):
        with pytest.raises(UserError, match=f"--dtype={dtype}: .*{needle}"):
            resolve_dtype("cpu", dtype)
    for capability, want in (((7, 5), "float32"), ((8, 0), "bfloat16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_dtype("cuda", "auto") == want
    assert resolve_dtype("cpu", "auto") == "float32" and resolve_dtype("cpu", "bfloat16") == "bfloat16"


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(ddp, "WORLD", 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(UserError, match=re.escape("torchrun started 4 processes on this machine, which has 2 GPU(s): "
                                                  "--nproc_per_node=2")):
        ddp.ddp_init("cuda")


def test_data_a_run_cannot_use_is_one_line(tmp_path, ckpts):
    """Fewer training examples than a batch (batch_indices would hand out short batches, which under
    torchrun differ between ranks and abort inside the collective), and a --max_len past the trunk's
    block_size: one line each, before any step."""
    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"  # 10 records each: 9 to train on, 1 held out
    sft.write_text("".join(json.dumps(dict(prompt=f"count 3 from {i}:", response=f" {i} {i + 1} {i + 2}")) + "\n" for i in range(10)))
    pairs.write_text("".join(json.dumps(dict(prompt=f"count 3 from {i}:", chosen=f" {i} {i + 1} {i + 2}", rejected=f" {i}")) + "\n"
                             for i in range(10)))
    one_line_error(run("sft.py", f"--out_dir={tmp_path}", f"--data={sft}", *SFT, "--batch_size=4", "--grad_accum=3"),
                   "9 training examples, fewer than the 12 of a step (--batch_size=4 x --grad_accum=3)")
    one_line_error(run("reward.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--data={pairs}", *RM,
                       "--batch_size=16"), "9 training pairs, fewer than --batch_size=16")
    one_line_error(run("ppo.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={ckpts}/reward.pt",
                       f"--data={sft}", *PPO, "--rollout_batch=16"), "9 training prompts, fewer than the 16 of a rollout batch")
    one_line_error(run("reward.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", *RM, "--max_len=40"),
                   "--max_len=40 exceeds the model's block_size 24")
    # text the built-in task's 63-token vocabulary cannot encode: the checkpoint that fixed it is named
    hh = os.path.join(HERE, "..", "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
    one_line_error(run("reward.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--data={hh}", *RM),
                   "outside the 63-token vocab of", f"{ckpts}/sft.pt")
    # a ranking read as pairs is said; a pair whose two responses are the same is dropped, and said
    rankings, same = tmp_path / "rankings.jsonl", tmp_path / "same.jsonl"
    rankings.write_text("".join(json.dumps(dict(prompt=f"count 3 from {i}:", responses=[f" {i} {i + 1} {i + 2}", f" {i}", " 9 9"]))
                                + "\n" for i in range(10)))
    same.write_text(json.dumps(dict(prompt="count 3 from 1:", chosen=" 1", rejected=" 1")) + "\n" + pairs.read_text())
    r = run("reward.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--data={rankings}", *RM, "--batch_size=64")
    one_line_error(r, "27 training pairs, fewer than --batch_size=64")
    assert "holds rankings, read as pairs" in r.stdout, r.stdout
    r = run("reward.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--data={same}", *RM, "--batch_size=16")
    one_line_error(r, "9 training pairs, fewer than --batch_size=16")
    assert "rm train: 2 responses dropped, each the same as a better-ranked one" in r.stdout, r.stdout


def test_sample_cli_fits_the_model_context(ckpts):
    """By default sample.py samples what the context leaves after the prompt (at most 64): the built-in
    task's model has 24 positions. Asking for more than it has is one line."""
    r = run("sample.py", f"--ckpt={ckpts}/sft.pt", "--prompt=count 3 from 5:", "--n=2")
    assert r.returncode == 0 and r.stdout.count("count 3 from 5:") == 2, r.stderr
    r = run("sample.py", f"--ckpt={ckpts}/sft.pt", "--n=1")  # no prompt: from <|endoftext|> (a newline is not in its vocab)
    assert r.returncode == 0 and r.stdout.count("-" * 40) == 1, r.stderr
    one_line_error(run("sample.py", f"--ckpt={ckpts}/sft.pt", "--prompt=count 3 from 5:", "--max_new_tokens=24"),
                   "--max_new_tokens=24: must be in 1..23")
    for bad, rule in (("--top_p=0", "in (0, 1]"), ("--temperature=-1", ">= 0"), ("--n=0", ">= 1"),
                      ("--seed=99999999999999999999999", "in 0..2**32-1"), ("--seed=-1", "in 0..2**32-1")):
        one_line_error(run("sample.py", f"--ckpt={ckpts}/sft.pt", bad), f"{bad}", rule)
    one_line_error(run("sample.py", f"--ckpt={ckpts}/reward.pt"), "'reward' checkpoint")  # a scalar head: no text


def test_sample_cli_settings_reach_generate(ckpts, monkeypatch, capsys):
    """--temperature, --top_k, --top_p and --seed reach gpt.generate as given (a spy, in process) and act:
    temperature=0, top_k=1 or top_p=0.01 gives the greedy text whatever the seed; the defaults sample."""
    monkeypatch.setattr(sample, "generate", spy := mock.Mock(wraps=generate))

    def text(*flags):
        sample.main([f"--ckpt={ckpts}/sft.pt", "--prompt=count 3 from 5:", "--n=4", *flags])
        return capsys.readouterr().out
    text("--temperature=0.7", "--top_k=5", "--top_p=0.9", "--seed=3")
    call = inspect.signature(generate).bind(*spy.call_args.args, **spy.call_args.kwargs).arguments  # by name
    got = [call[k] for k in ("temperature", "top_k", "top_p")] + [call["generator"].initial_seed()]
    assert got == [0.7, 5, 0.9, 3], f"sample.py gave generate temperature, top_k, top_p and a seed of {got}"
    greedy = text("--temperature=0")
    assert len({text("--seed=1"), text("--seed=2"), greedy}) == 3, "seeds 1, 2 and greedy: not 3 texts"
    for flag in ("--temperature=0", "--top_k=1", "--top_p=0.01"):
        assert text(flag, "--seed=1") == text(flag, "--seed=2") == greedy, f"{flag}: not the greedy text"


def test_ppo_resume_refuses_what_it_cannot_continue(tmp_path, ckpts):
    """A critic-free run resumed as a GAE run, a finished run resumed with fewer iterations: one line
    each. Resumed at its last iteration, a finished run does not evaluate that iteration again (one eval
    line each). A reward model whose reward.py never finished (not centred) is used with a warning."""
    ck = torch.load(f"{ckpts}/reward.pt", weights_only=True)
    del ck["normalized"]
    torch.save(ck, tmp_path / "unfinished.pt")
    args = ["ppo.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", *PPO, "--eval_interval=1", "--iters=2"]
    r = run(*args, f"--reward_ckpt={tmp_path}/unfinished.pt", "--advantage=rloo", "--samples_per_prompt=2")
    assert r.returncode == 0 and "unfinished.pt is from an unfinished reward.py run" in r.stdout, r.stderr
    assert "a finished run's is its reward.pt" in r.stdout, r.stdout
    args.append(f"--reward_ckpt={ckpts}/reward.pt")
    one_line_error(run(*args, "--resume"), "ppo.pt was written by a run with --advantage=rloo")
    one_line_error(run(*args[:-2], "--iters=1", args[-1], "--resume", "--advantage=rloo", "--samples_per_prompt=2"),
                   "ppo.pt is at iteration 2: nothing to resume with --iters=1")
    r = run(*args, "--resume", "--advantage=rloo", "--samples_per_prompt=2")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    evals = [m["iter"] for m in map(json.loads, open(tmp_path / "ppo_metrics.jsonl")) if m["kind"] == "eval"]
    assert evals == [0, 1, 2], f"eval lines at iterations {evals}"
    assert json.load(open(tmp_path / "ppo_eval.json"))["eval"]["n"] == 4


def test_a_new_run_starts_its_metrics_afresh(tmp_path):
    """A second run in the same out_dir (not --resume) replaces the first one's metrics log: appended to
    it, plot.py would draw the two runs as one."""
    for _ in range(2):
        assert run("sft.py", f"--out_dir={tmp_path}", *SFT, "--max_iters=3", "--eval_interval=3").returncode == 0
    assert [json.loads(line)["iter"] for line in open(tmp_path / "sft_metrics.jsonl")] == [0, 1, 2]


def test_paths_a_run_cannot_use_are_one_line(tmp_path, ckpts):
    """An out_dir that is a file or lies under one, a checkpoint path that is a folder, a precision the
    script cannot train in: one line before any training. A ~ the shell left alone is expanded."""
    (tmp_path / "file").write_text("")
    one_line_error(run("sft.py", f"--out_dir={tmp_path}/file"), f"--out_dir={tmp_path}/file: is a file, not a folder")
    one_line_error(run("reward.py", f"--out_dir={tmp_path}/file/out", f"--sft_ckpt={ckpts}/sft.pt"), "cannot write there")
    one_line_error(run("ppo.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={ckpts}"),
                   f"{ckpts}: a folder, not a checkpoint file; it holds reward.pt")
    one_line_error(run("sft.py", f"--out_dir={tmp_path}", "--dtype=float16"), "--dtype=float16")
    assert parse_config(PPOConfig, ["--out_dir=~/runs"]).out_dir == os.path.join(os.path.expanduser("~"), "runs")


def test_nonfinite_loss_stops_with_step_and_quantity(tmp_path):
    line = one_line_error(run("sft.py", f"--out_dir={tmp_path}", *SFT, "--lr=1e8", "--max_iters=50", "--eval_interval=50"),
                          "non-finite")
    assert re.search(r"step \d+", line)
    load_checkpoint(f"{tmp_path}/sft_last.pt", "sft")  # the last good checkpoint still loads


def test_kl_runaway_warns(tmp_path, ckpts):
    r = run("ppo.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={ckpts}/reward.pt", *PPO,
            "--iters=1", "--kl_max=-1")
    assert r.returncode == 0 and "warning: ppo iteration 0: KL" in r.stdout


def test_every_torch_load_is_weights_only():
    for path in glob.glob(os.path.join(HERE, "*.py")):
        for line in open(path):
            if re.search(r"\btorch\.load\(\w", line):  # a call, not this test's own string
                assert "weights_only=True" in line, f"{os.path.basename(path)}: {line.strip()}"


def interrupt_when(args, pattern, sig):
    """Start a run, send `sig` once a stdout line matches `pattern`, wait for the exit."""
    p = subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:
        if re.search(pattern, line):
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=600)
    return p.returncode, err


def losses(path, key="loss"):
    """iter -> loss, the last entry for each iteration (a resumed run appends)."""
    return {m["iter"]: m[key] for m in map(json.loads, open(path)) if m.get("kind", "train") == "train"}


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_resume_after_ctrl_c_matches_uninterrupted(tmp_path, ckpts, stage):
    args = {"sft": ["sft.py", *SFT, "--max_iters=30", "--eval_interval=10"],
            "reward": ["reward.py", f"--sft_ckpt={ckpts}/sft.pt", *RM, "--max_iters=30", "--eval_interval=10"],
            "ppo": ["ppo.py", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={ckpts}/reward.pt", *PPO, "--iters=8",
                    "--eval_interval=4", "--adaptive_kl", "--kl_target=0.5", "--score_norm", "--ptx_coef=0.1"]}[stage]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run(*args, f"--out_dir={a}")
    assert r.returncode == 0, r.stderr
    rc, err = interrupt_when([*args, f"--out_dir={b}"], rf"^{stage} (train )?3/", signal.SIGINT)
    assert rc == 130 and "continue with --resume" in err, err
    stopped_at = load_checkpoint(f"{b}/{stage}{'_last' if stage != 'ppo' else ''}.pt", stage)["iter"]
    assert 3 < stopped_at < {"sft": 30, "reward": 30, "ppo": 8}[stage]
    r = run(*args, f"--out_dir={b}", "--resume")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    la, lb = losses(f"{a}/{stage}_metrics.jsonl"), losses(f"{b}/{stage}_metrics.jsonl")
    assert la.keys() == lb.keys() and max(lb) > stopped_at
    for it in la:
        assert abs(la[it] - lb[it]) <= 1e-6 * max(1.0, abs(la[it])), f"{stage} step {it}: {la[it]} vs resumed {lb[it]}"


def test_resume_past_a_smaller_max_iters_is_one_line(tmp_path, ckpts):
    """A checkpoint at step 4 resumed with --max_iters=2 has nothing to do: saying "saved" would be false.
    Resumed with other settings, the run says which differ from the saved run's."""
    for name in ("sft_last.pt", "reward_last.pt"):
        shutil.copy(f"{ckpts}/{name}", tmp_path / name)
    one_line_error(run("sft.py", f"--out_dir={tmp_path}", *SFT, "--max_iters=2", "--resume"),
                   "sft_last.pt is at step 4: nothing to resume with --max_iters=2")
    one_line_error(run("reward.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", *RM, "--max_iters=2", "--resume"),
                   "reward_last.pt is at step 4: nothing to resume with --max_iters=2")
    other = tmp_path / "other.jsonl"  # GPT-2's vocabulary, not the built-in task's: an IndexError deep in a forward
    other.write_text("".join(json.dumps(dict(prompt=f"count 3 from {i}:", response=f" {i}")) + "\n" for i in range(40)))
    one_line_error(run("sft.py", f"--out_dir={tmp_path}", *SFT, "--max_iters=5", f"--data={other}", "--resume"),
                   "sft_last.pt was trained on another vocabulary than --data=", "--data=builtin")
    r = run("sft.py", f"--out_dir={tmp_path}", *SFT, "--max_iters=5", "--seed=3", "--resume")
    assert r.returncode == 0 and "at step 4; settings changed:" in r.stdout, r.stdout + r.stderr
    assert "--max_iters=5 (was 4)" in r.stdout and "--seed=3 (was 0)" in r.stdout and "--resume" not in r.stdout, r.stdout


def test_sigkill_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    out = str(tmp_path)
    args = ["sft.py", *SFT, "--max_iters=400", "--eval_interval=5", f"--out_dir={out}"]
    rc, err = interrupt_when(args, r"^sft 12/", signal.SIGKILL)
    assert rc == -signal.SIGKILL, f"sft.py ended by itself (exit code {rc}) before the kill:\n{err[-2000:]}"
    ck = load_checkpoint(f"{out}/sft_last.pt", "sft")  # whatever moment the kill hit, this is complete
    assert ck["iter"] >= 10
    r = run(*args[:-2], "--max_iters=20", "--eval_interval=5", f"--out_dir={out}", "--resume")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(f"{out}/sft_last.pt", "sft")["iter"] == 20


def test_resume_of_a_checkpoint_from_before_the_vocab_padding_is_one_line(tmp_path, ckpts):
    """Checkpoints written before the token rows were padded hold V rows in the weights and in the
    AdamW moments. The weights still load (zero-padded); resuming is one line naming the file, for
    SFT and PPO alike, not a shape error at the first step."""
    assert run("ppo.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={ckpts}/reward.pt",
               *PPO, "--iters=1").returncode == 0
    shutil.copy(f"{ckpts}/sft_last.pt", tmp_path / "sft_last.pt")
    for name in ("sft_last.pt", "ppo.pt"):
        ck = torch.load(tmp_path / name, weights_only=True)
        V = ck["config"]["vocab_size"]
        for models in ("model", "critic"):
            for k, v in ck.get(models, {}).items():
                if k.endswith(TOKEN_ROWS):
                    ck[models][k] = v[:V]
        states = [ck["optimizer"]] if name == "sft_last.pt" else ck["optimizers"]
        for st in states:  # parameter 0 of each optimizer is its wte
            st["state"][0] = {k: (v[:V] if v.dim() == 2 else v) for k, v in st["state"][0].items()}
        torch.save(ck, tmp_path / name)
    one_line_error(run("sft.py", f"--out_dir={tmp_path}", *SFT, "--max_iters=6", "--resume"),
                   "sft_last.pt", "cannot be resumed")
    one_line_error(run("ppo.py", f"--out_dir={tmp_path}", f"--sft_ckpt={ckpts}/sft.pt", f"--reward_ckpt={ckpts}/reward.pt",
                       *PPO, "--iters=2", "--resume"), "ppo.pt", "cannot be resumed")


def test_files_written_get_the_umask_mode(tmp_path):
    """tempfile.mkstemp makes 0600: a checkpoint or metrics file renamed from it would be unreadable to the
    group (a shared run folder)."""
    import util
    old = os.umask(0o022)
    try:
        util.write_json({}, str(tmp_path / "a.json"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644


def test_bench_hh_with_fewer_than_two_batches_is_one_line(tmp_path):
    """One batch warms up; with none left to time, the row would read 0 tok/s (or a KeyError)."""
    import gzip
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(3):
            f.write(json.dumps({"chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello", "rejected": f"\n\nHuman: hi {i}\n\nAssistant: no"}) + "\n")
    with pytest.raises(UserError, match="fewer than two batches of --sft_batch=4"):
        bench.hh_batches(str(path), bench.Config(device="cpu", sft_batch=4, sft_len=64))
