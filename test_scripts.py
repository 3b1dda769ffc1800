"""Smoke tests: each stage as a user runs it, with tiny settings, on the built-in task and on
the GPT-2 path (a converted Hugging Face checkpoint + the real HH-RLHF pairs)."""
import json
import os
import re
import shutil
import types
import subprocess
import sys

import pytest
import torch

import ppo
from checks import assert_close
from gpt import GPT, GPTConfig
from sft import sft_loss
from util import compile_for_lengths

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")
HH = os.path.join(SHARED, "data", "hh-rlhf", "harmless-base-test.jsonl.gz")


def run(*args, ok=True):
    r = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


TINY_SFT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--batch_size=8", "--max_iters=4", "--eval_interval=2",
            "--eval_batches=1", "--log_interval=1", "--warmup_iters=1"]
TINY_RM = ["--batch_size=4", "--max_iters=3", "--eval_interval=2", "--eval_batches=1", "--log_interval=1",
           "--warmup_iters=1", "--norm_samples=8"]
TINY_PPO = ["--iters=2", "--rollout_batch=8", "--minibatch=4", "--ppo_epochs=1", "--eval_interval=1",
            "--eval_prompts=8", "--eval_samples=1", "--max_new_tokens=6"]


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("builtin"))
    run("sft.py", f"--out_dir={out}", *TINY_SFT)
    run("reward.py", f"--out_dir={out}", f"--sft_ckpt={out}/sft.pt", *TINY_RM)
    return out


def test_scripts_builtin_pipeline(builtin_run):
    out = builtin_run
    r = run("ppo.py", f"--out_dir={out}", f"--sft_ckpt={out}/sft.pt", f"--reward_ckpt={out}/reward.pt", *TINY_PPO)
    assert "final evaluation" in r.stdout
    ev = json.load(open(os.path.join(out, "ppo_eval.json")))["eval"]
    assert {"score", "kl", "k3", "win_rate", "gold", "gold_win_rate"} <= ev.keys()
    lines = [json.loads(l) for l in open(os.path.join(out, "ppo_metrics.jsonl"))]
    train = [l for l in lines if l["kind"] == "train"]
    assert len(train) == 2 and {"score", "kl", "k3", "entropy", "clipfrac", "approx_kl", "value_loss",
                                "explained_var", "length", "rollout_s", "update_s", "tok_s"} <= train[0].keys()
    ck = torch.load(os.path.join(out, "ppo.pt"), weights_only=True)
    assert ck["stage"] == "ppo" and ck["iter"] == 2


def test_scripts_ppo_options(builtin_run):
    out = builtin_run
    run("ppo.py", f"--out_dir={out}/opts", f"--sft_ckpt={out}/sft.pt", f"--reward_ckpt={out}/reward.pt", *TINY_PPO,
        "--adaptive_kl", "--kl_target=1.0", "--ptx_coef=0.5", "--score_norm", "--truncated_score=nan", "--missing_eos_penalty=1",
        "--ent_coef=0.01", "--rollout_dtype=bfloat16")
    lines = [json.loads(l) for l in open(os.path.join(out, "opts", "ppo_metrics.jsonl"))]
    coefs = [l["kl_coef"] for l in lines if l["kind"] == "train"]
    assert coefs[0] == 0.1 and coefs[1] != coefs[0], "the adaptive controller moves kl_coef"


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_scripts_ppo_critic_free(builtin_run, advantage):
    """RLOO and GRPO: groups of k responses per prompt, no critic built, trained, logged or saved; gold
    logged per iteration (the built-in task); a resumed run goes on."""
    out, ck_args = builtin_run, [f"--sft_ckpt={builtin_run}/sft.pt", f"--reward_ckpt={builtin_run}/reward.pt"]
    args = [f"--out_dir={out}/{advantage}", *ck_args, *TINY_PPO, f"--advantage={advantage}", "--samples_per_prompt=4"]
    run("ppo.py", *args)
    ck = torch.load(os.path.join(out, advantage, "ppo.pt"), weights_only=True)
    assert ck["critic"] is None and len(ck["optimizers"]) == 1
    train = [json.loads(l) for l in open(os.path.join(out, advantage, "ppo_metrics.jsonl")) if '"train"' in l]
    assert len(train) == 2 and all(-5 <= l["gold"] <= 1 for l in train)
    assert not {"value_loss", "vf_grad_norm", "explained_var"} & set().union(*train), "statistics of a critic not built"
    r = run("ppo.py", *args, "--iters=3", "--resume")
    assert "resumed from" in r.stdout and "ppo eval 3/3" in r.stdout
    r = run("ppo.py", *args, "--samples_per_prompt=3", ok=False)
    assert r.returncode == 2 and "whole groups" in r.stderr


def test_scripts_help_lists_settings():
    for script in ("sft.py", "reward.py", "ppo.py"):
        r = run(script, "--help")
        assert "--lr=" in r.stdout and "learning rate" in r.stdout
    for script, needle in (("sample.py", "--top_p=1.0"), ("plot.py", "--kind=training"), ("hf.py", "python hf.py convert")):
        for flag in ("--help", "-h"):  # its usage and exit 0, not "unknown option --help"
            r = run(script, flag)
            assert f"python {script}" in r.stdout and needle in r.stdout and not r.stderr, (script, flag, r.stdout, r.stderr)


def test_scripts_refused_precision_makes_no_out_dir(tmp_path):
    """A setting refused before anything loads leaves nothing behind: --out_dir was made before get_device."""
    for script in ("sft.py", "reward.py", "ppo.py"):
        r = run(script, f"--out_dir={tmp_path / script}", "--dtype=float16", ok=False)
        assert r.returncode == 2 and "--dtype=float16: training in float16 needs loss scaling" in r.stderr, r.stderr
        assert not (tmp_path / script).exists(), f"{script} --dtype=float16 made an empty --out_dir before refusing it"


def test_scripts_gpt2_path_on_fixture_and_hh(tmp_path):
    out = str(tmp_path)
    run("hf.py", "convert", os.path.join(SHARED, "fixtures", "hf-gpt2-tiny"), f"{out}/gpt2-tiny.pt")
    common = [f"--data={HH}", "--max_len=64", "--max_prompt_len=48"]
    run("sft.py", f"--out_dir={out}", f"--init={out}/gpt2-tiny.pt", *common, *TINY_SFT[3:], "--batch_size=2", "--lr=1e-4")
    run("reward.py", f"--out_dir={out}", f"--sft_ckpt={out}/sft.pt", *common, *TINY_RM[1:], "--batch_size=2", "--norm_samples=2")
    r = run("ppo.py", f"--out_dir={out}", f"--sft_ckpt={out}/sft.pt", f"--reward_ckpt={out}/reward.pt", f"--data={HH}",
            "--max_prompt_len=48", "--max_new_tokens=8", "--iters=1", "--rollout_batch=2", "--minibatch=1",
            "--ppo_epochs=1", "--eval_prompts=2", "--eval_samples=1")
    assert "final evaluation" in r.stdout
    r = run("hf.py", "export", f"{out}/ppo.pt", f"{out}/hf")
    assert os.path.exists(f"{out}/hf/model.safetensors")


def test_plot_draws_runs_or_says_what_it_needs(tmp_path):
    """plot.py: PNGs from runs' metrics files where matplotlib is installed, else one line saying so;
    a directory without metrics is one line naming the file."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [dict(kind="train", iter=i, score=0.1 * i, gold=0.2 * i, kl=0.01 * i, length=4) for i in range(3)]
    rows += [dict(kind="eval", iter=i, score=0.1 * i, gold=0.3, kl=0.01, kl_seq=0.05 * i, length=4) for i in (0, 2)]
    (run_dir / "ppo_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = str(tmp_path / "t.png")
    r = run("plot.py", str(run_dir), f"--out={png}", ok=False)
    try:
        import matplotlib  # noqa: F401 (optional)
        assert r.returncode == 0 and os.path.getsize(png) > 1000, r.stderr
        run("plot.py", str(run_dir), "--kind=overopt", f"--out={png}")
    except ImportError:
        assert r.returncode == 2 and r.stderr.strip() == "error: plot.py needs matplotlib: pip install matplotlib"
    r = run("plot.py", str(tmp_path), ok=False)
    assert r.returncode == 2 and "ppo_metrics.jsonl: no such file" in r.stderr and "Traceback" not in r.stderr
    import plot  # a run resumed from its last checkpoint logs iterations 3..5 again: the last of each is kept
    rows = [dict(kind="train", iter=i, score=0.0) for i in range(6)] + [dict(kind="train", iter=i, score=1.0) for i in range(3, 8)]
    (run_dir / "ppo_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = plot.read_metrics(str(run_dir))
    assert [r["iter"] for r in train] == list(range(8)) and [r["score"] for r in train] == [0.0] * 3 + [1.0] * 5


def test_plot_refuses_a_metrics_file_with_nothing_to_draw(tmp_path):
    """An empty metrics file (a run before its first evaluation) drew empty axes and exited 0, a line
    without "iter" failed with a KeyError's traceback: each is one line naming the file, found before
    matplotlib is needed (so this runs without it)."""
    import plot
    from util import UserError
    path = tmp_path / "ppo_metrics.jsonl"
    path.write_text("")
    r = run("plot.py", str(tmp_path), ok=False)
    assert r.returncode == 2 and r.stderr == f"error: {path}: no train or eval lines to plot (ppo.py writes one per " \
                                             f"iteration, the first after its first evaluation)\n", r.stderr
    train = json.dumps(dict(kind="train", iter=0, score=0.5)) + "\n"
    for text, message in (("\n\n", ": no train or eval lines to plot"), ('{"kind": "sft", "iter": 0}\n', ": no train or eval"),
                          (train + '{"kind": "eval", "score": 1}\n', ':2: no number "iter" in this eval line'),
                          ('{"kind": "train", "iter": "3"}\n' + train, ':1: no number "iter" in this train line')):
        path.write_text(text)
        with pytest.raises(UserError, match=re.escape(f"{path}{message}")):
            plot.read_metrics(str(tmp_path))


def test_bench_runs_every_workload_and_profiles(tmp_path):
    """bench.py end to end on a tiny model: every row, the real-data SFT row, and --profile's table and
    its split of the step's time by kind."""
    hh = [f"--hh={HH}"] if os.path.exists(HH) else []
    run("bench.py", "--model=tiny", "--reps=1", "--compare=False", "--sft_len=32", "--prompt_len=8", "--new_tokens=8",
        "--ppo_prompt_len=16", "--ppo_new_tokens=8", f"--profile={tmp_path}/sft.txt", f"--out={tmp_path}/b.json", *hh)
    res = json.load(open(tmp_path / "b.json"))["results"]
    assert {"sft", "generate_b1", "generate_b8", "generate_bf16_b8", "ppo"} <= set(res) and ("sft_hh" in res or not hh)
    assert res["sft"]["profile_ms"]["matmul"] > 0 and "Self CPU" in open(tmp_path / "sft.txt").read()
    assert sum(res["sft"]["profile_ms"].values()) < 1e3 * res["sft"]["step_s"] * 3, "the profile is of one step"


def test_bench_profile_kinds_of_kernel_names():
    """Names as torch.profiler records them (CUDA kernels on Hopper; CPU ops): flash and cutlass fmha
    kernels are attention, inductor's matmul templates are matmuls, its other kernels fusions."""
    from bench import kind_of
    for name, kind in (("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
                       ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
                       ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
                       ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NTN", "matmul"), ("sm90_xmma_gemm_bf16bf16", "matmul"),
                       ("triton_tem_fused_addmm_0", "matmul"), ("aten::addmm", "matmul"),
                       ("triton_per_fused__log_softmax_gather_1", "fused (compiled)"),
                       ("## Call CompiledFxGraph fjl2uot2zd2nif3lxphasidu2oks", "fused (compiled)"),
                       ("multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>", "optimizer"),
                       ("aten::_fused_adamw_", "optimizer"), ("aten::copy_", "other")):
        assert kind_of(name) == kind, f"{name}: {kind_of(name)}, want {kind}"


def test_bench_mfu_peak_is_the_runs_precision(monkeypatch):
    """MFU on a known GPU is against its datasheet peak in the run's precision: an fp32 step on an H200
    against 67 TFLOP/s, not bf16's 989 (an fp32 run would read 15x too low)."""
    from bench import peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert peak_flops("cuda", "bfloat16") == 989e12 and peak_flops("cuda", "float32") == 67e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert peak_flops("cuda", "bfloat16") == 312e12 and peak_flops("cuda", "float32") == 19.5e12


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_training_compiles_once_for_every_length():
    """sft.py --compile (and reward.py's, ppo.py's): batches padded to their longest row change length
    from step to step; one graph must serve them all (torch.compile's default compiles a second time
    at the second length: 30-60 s for GPT-2 small on a GPU), with the eager loss and gradients."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    step = compile_for_lengths(lambda x, m: sft_loss(model(x), x, m))
    for B, T in ((4, 16), (4, 40), (3, 24)):
        x, m = torch.randint(0, 50, (B, T)), (torch.arange(T) >= 5).long().expand(B, T)
        grads = []
        for fn in (step, lambda x, m: sft_loss(model(x), x, m)):
            loss = fn(x, m)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
        (got, g1), (want, g2) = grads
        assert_close(f"compiled loss at ({B}, {T})", got, want, tol=1e-5)
        for a, b in zip(g1, g2):
            assert_close(f"compiled gradient at ({B}, {T})", a, b, tol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, \
        f"{counters['stats']['unique_graphs']} graphs for 3 batch shapes: the lengths were not compiled as symbolic"


def test_readme_tensorboard_snippet_runs(tmp_path, monkeypatch):
    """README's example of a log hook (TensorBoard beside the default log), with a stand-in
    SummaryWriter and a train() that logs two metrics dicts as PPO does."""
    code = re.search(r"```python\n([^`]*?SummaryWriter[^`]*?)```", open(os.path.join(HERE, "README.md")).read())
    assert code, "README.md: no python block with the TensorBoard example"
    scalars = []
    writer = lambda logdir: types.SimpleNamespace(add_scalar=lambda *a: scalars.append(a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=writer))
    logged = [dict(kind="train", iter=0, iters=1, score=0.5, kl=0.1), dict(kind="eval", iter=1, iters=1, score=0.7)]
    monkeypatch.setattr(ppo, "train", lambda cfg, log: [log(m) for m in logged])
    monkeypatch.chdir(tmp_path)
    exec(code.group(1), {})
    assert [json.loads(l) for l in open(tmp_path / "out" / "ppo_metrics.jsonl")] == logged
    assert ("train/score", 0.5, 0) in scalars and ("eval/score", 0.7, 1) in scalars, scalars



def test_rollout_scores_with_the_module_the_update_runs(builtin_run, monkeypatch, tmp_path):
    """--compile: the update runs the compiled policy and critic; the rollout's scoring forwards (the policy's
    log-probs under bf16 or a low-precision sampler, the critic's values) must run the same modules, or the
    first PPO ratio is not 1 (eager and compiled kernels round differently: up to 7e-4 per token seen)."""
    import rollout as R
    seen = {}
    real_rollout, real_update = R.rollout, ppo.ppo_update
    def spy_rollout(policy, ref, rm, critic, *a, **k):
        seen["rollout"] = (policy, critic)  # the last one before the update is the training rollout (evaluate's come first)
        return real_rollout(policy, ref, rm, critic, *a, **k)
    def spy_update(policy, critic, *a, **k):
        seen.setdefault("update", (getattr(policy, "module", policy), getattr(critic, "module", critic), seen["rollout"]))
        return real_update(policy, critic, *a, **k)
    monkeypatch.setattr(R, "rollout", spy_rollout)
    monkeypatch.setattr(ppo, "ppo_update", spy_update)
    monkeypatch.setattr(ppo, "compile_for_lengths", lambda m, on=True, mode="default": torch.compile(m, backend="eager") if on else m)
    out = builtin_run
    ppo.train(ppo.Config(sft_ckpt=f"{out}/sft.pt", reward_ckpt=f"{out}/reward.pt", out_dir=str(tmp_path), iters=1,
                         rollout_batch=4, minibatch=4, ppo_epochs=1, max_new_tokens=4, eval_interval=100, eval_prompts=2,
                         eval_samples=1, compile=True, dtype="bfloat16", device="cpu"), log=lambda m: None)
    policy, critic, (scored_by, valued_by) = seen["update"]
    assert scored_by is policy, "the rollout scored with another module than the update's policy"
    assert valued_by is critic, "the rollout's values came from another module than the update's critic"
