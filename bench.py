"""
Speed of the three workloads RLHF spends its time on, for GPT-2 small (random init): an SFT
training step, rollout generation with the KV cache, and one PPO iteration (rollout, scoring,
update). With `transformers` (and a TRL that still has PPO) installed, the same workloads run
through them in the same process and the table shows our/their ratios (our PPO iterations alternate
with TRL's, so both see the same machine). Neither is ever needed.

    python bench.py                                  # CPU defaults, as quoted in the README
    python bench.py --preset=gpu --hh=harmless-base-test.jsonl.gz   # the README's GPU table (+ an SFT row on real lengths)
"""
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import onednn
from bench_hf import bench_hf, bench_trl
from gpt import CONFIGS, GPT, GPTConfig, generate
from ppo import Config as PPOConfig, ppo_update
from rollout import add_advantages, make_sampler, rollout
from reward import RewardModel
from sft import sft_loss
from util import (UserError, autocast, compile_for_lengths, get_device, main_guard, make_optimizer, parse_config, resolve_dtype,
                  sync, timed, write_json)


@dataclass
class Config:
    model: str = "gpt2"  # a name in gpt.CONFIGS
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA GPUs from Ampere on, else fp32) | float32 | bfloat16
    reps: int = 5  # timed repetitions per measurement (median reported), after one warm-up
    sft_batch: int = 4  # SFT step: sequences
    sft_len: int = 256  # SFT step: tokens per sequence
    gen_batches: str = "1,8"  # rollout batch sizes, comma-separated
    prompt_len: int = 64  # rollout prompt tokens
    new_tokens: int = 64  # rollout sampled tokens
    ppo_prompts: int = 8  # PPO iteration: prompts (TRL's comparison setting)
    ppo_prompt_len: int = 64  # PPO iteration: prompt tokens
    ppo_new_tokens: int = 32  # PPO iteration: response tokens
    only: str = "sft,generate,ppo"  # the workloads to time, comma-separated
    hh: str = ""  # an HH-RLHF .jsonl(.gz): also time SFT steps on its own lengths (sft_batch x up to sft_len)
    cuda_graph: bool = True  # CUDA: decode with a static KV cache, each step a CUDA graph (as ppo.py)
    compile: bool = False  # torch.compile the SFT step's model and loss and the PPO update's models
    compile_mode: str = "default"  # with --compile: default | max-autotune-no-cudagraphs | max-autotune | reduce-overhead
    compile_static: bool = False  # with --compile: shapes specialised (torch.compile's default), not symbolic as the scripts compile
    profile: str = ""  # write torch.profiler's table of one SFT step (ops and kernels by time) to this file
    preset: str = ""  # gpu: the GPU table's settings (cuda, bf16, the sizes below), set over the defaults (flags given win)
    compare: bool = True  # also time transformers (+ TRL) when installed
    out: str = "bench.json"  # results as JSON


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
GPU_PRESET = dict(device="cuda", dtype="bfloat16", sft_batch=16, sft_len=1024, gen_batches="8,64", new_tokens=128,
                  ppo_prompts=64, ppo_prompt_len=128, ppo_new_tokens=128, reps=3)


def check_config(bc):
    """Settings that cannot run are one-line errors naming the setting, before any model is built.
    Returns the workloads and the generation batch sizes."""
    if bc.preset not in ("", "gpu"):
        raise UserError(f"--preset={bc.preset}: expected gpu (or nothing)")
    if bc.compile_mode not in COMPILE_MODES:
        raise UserError(f"--compile_mode={bc.compile_mode}: expected one of {', '.join(COMPILE_MODES)}")
    if bc.model not in CONFIGS:
        raise UserError(f"--model={bc.model}: expected one of {', '.join(CONFIGS)}")
    only = bc.only.split(",")
    if set(only) - {"sft", "generate", "ppo"}:
        raise UserError(f"--only={bc.only}: expected a comma-separated subset of sft,generate,ppo")
    try:
        batches = [int(b) for b in bc.gen_batches.split(",")]
    except ValueError:
        raise UserError(f"--gen_batches={bc.gen_batches}: expected comma-separated integers, such as 1,8") from None
    for key in ("reps", "sft_batch", "sft_len", "prompt_len", "new_tokens", "ppo_prompt_len", "ppo_new_tokens"):
        if getattr(bc, key) <= 0:
            raise UserError(f"--{key}={getattr(bc, key)}: must be positive")
    if min(batches) <= 0:
        raise UserError(f"--gen_batches={bc.gen_batches}: batch sizes must be positive")
    if bc.ppo_prompts < 2 or bc.ppo_prompts % 2:
        raise UserError(f"--ppo_prompts={bc.ppo_prompts}: must be even and at least 2 (two minibatches)")
    for key in ("out", "profile"):  # written after minutes of timing: checked before any
        path = getattr(bc, key)
        if not path:
            continue
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise UserError(f"--{key}={path}: cannot write there ({e.strerror})") from None
        if os.path.isdir(path):
            raise UserError(f"--{key}={path}: a folder, expected a file name")
    if bc.hh and not os.path.isfile(bc.hh):
        raise UserError(f"--hh={bc.hh}: no such file")
    block = GPTConfig(**CONFIGS[bc.model]).block_size
    lengths = dict(sft=("sft_len",), generate=("prompt_len", "new_tokens"), ppo=("ppo_prompt_len", "ppo_new_tokens"))
    for work in only:
        n = sum(getattr(bc, k) for k in lengths[work])
        if n > block:
            raise UserError(f"{' + '.join('--' + k for k in lengths[work])} = {n} tokens: "
                            f"more than --model={bc.model}'s block_size {block}")
    return only, batches


def compiled(fn, bc):
    """fn compiled as --compile, --compile_mode and --compile_static say: by default as the scripts
    compile it (util.compile_for_lengths), or fn itself."""
    if bc.compile and bc.compile_static:
        return torch.compile(fn, mode=bc.compile_mode)
    return compile_for_lengths(fn, bc.compile, bc.compile_mode)


def peak_mem(device, reset=False):
    """GiB of GPU memory allocated at the peak since the last reset (nan on the CPU)."""
    if not device.startswith("cuda"):
        return float("nan")
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2 ** 30


DATASHEET = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}  # dense bf16, fp32 (SXM)


def peak_flops(device, dtype):
    """The device's peak in the run's precision (bf16, or fp32 without TF32, as torch's default): the
    datasheet's dense figure for the GPUs in DATASHEET; on another GPU or the CPU, measured with a large
    matmul (on the CPU by MKL or oneDNN, whichever is faster), which puts MFU against what it reaches."""
    bf16 = resolve_dtype(device, dtype) == "bfloat16"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        sheet = next((v for k, v in DATASHEET.items() if k in name), None)
        if sheet:
            return sheet[0 if bf16 else 1]
    dt = torch.bfloat16 if bf16 else torch.float32
    n = 8192 if device.startswith("cuda") else 2048
    a, b = torch.randn(n, n, dtype=dt, device=device), torch.randn(n, n, dtype=dt, device=device)
    s = timed(lambda: a @ b, 5, device)
    if onednn.ONEDNN and dt == torch.float32 and device == "cpu":  # the faster of the two libraries our Linear can call
        s = min(s, timed(lambda: onednn.linear(a, b), 5, device))
    return 2 * n ** 3 / s


def flops_per_token(cfg, T):
    """6 N (weights, forward + backward) + 12 L T C (attention scores and values), as in the PaLM paper, App. B."""
    n = sum(p.numel() for p in GPT(cfg).parameters()) - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * T * cfg.n_embd


def bench_sft(model, cfg, bc, device, ctx, batches=None):
    """SFT steps on sft_batch x sft_len random tokens; with `batches` (lists of token lists, real
    data), on those instead, each padded to its longest row rounded up to 64 (sft.py's --bucket)."""
    loss_fn = lambda x: sft_loss(model(x, padded=True), x, torch.ones_like(x))  # every token a response token, as HF's causal-LM loss
    loss_fn = compiled(loss_fn, bc)  # the model and the loss: the LM head's softmax fused
    opt = make_optimizer(model.parameters(), 1e-4, 0.1)
    fixed = torch.randint(0, cfg.vocab_size, (bc.sft_batch, bc.sft_len), device=device)
    it, seen = iter(batches or []), []

    def step():
        x = fixed
        if batches:
            rows = next(it)
            x = torch.full((len(rows), min(-(-max(map(len, rows)) // 64) * 64, bc.sft_len)), 0, dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, :len(r)] = torch.tensor(r[:x.size(1)])
            seen.append((sum(min(len(r), x.size(1)) for r in rows), x.numel()))
            x = x.to(device)
        with ctx:
            loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak_mem(device, reset=True)
    if batches:  # every batch once, timed as a whole: the first sight of each shape is part of the cost
        step()
        seen.clear()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(len(batches) - 1):
            step()
        sync(device)
        s, real, padded = time.perf_counter() - t0, sum(a for a, _ in seen), sum(b for _, b in seen)
        return dict(steps=len(seen), tok_s=padded / s, real_tok_s=real / s, peak_mem_gib=peak_mem(device))
    s = timed(step, bc.reps, device)
    tok_s = bc.sft_batch * bc.sft_len / s
    return dict(step_s=s, tok_s=tok_s, mfu=tok_s * flops_per_token(cfg, bc.sft_len) / peak_flops(device, bc.dtype),
                peak_mem_gib=peak_mem(device), **(profiled(step, device, bc.profile) if bc.profile else {}))


KINDS = (("attention", ("flash", "fmha", "attention", "sdpa")),  # first: fmha kernels are cutlass ones too
         ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm", "mkldnn",
                     "linear")),
         # on the CPU a compiled graph's own time is that of its fused loops (its matmuls are aten ops of their own)
         ("fused (compiled)", ("triton", "cpp_fused", "compiledfxgraph")), ("optimizer", ("adam", "foreach", "multi_tensor")))


def kind_of(name):
    """The kind (KINDS) of a profiled op or kernel, by its name: the first kind one of whose words it holds."""
    return next((k for k, words in KINDS if any(w in name.lower() for w in words)), "other")


def profiled(step, device, path):
    """One more step under torch.profiler: its table of ops/kernels by their own time, written to path,
    and the step's time by kind (matmul, attention, compiled fusions, optimizer, the rest) returned."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        step()
        sync(device)
    key, events = ("self_device_time_total" if cuda else "self_cpu_time_total"), prof.key_averages()
    kinds = {}
    for e in events:
        kind = kind_of(e.key)
        kinds[kind] = kinds.get(kind, 0) + getattr(e, key) / 1e3
    with open(path, "w") as f:
        f.write(events.table(sort_by=key, row_limit=40) + "\n")
    return dict(profile_ms=dict(sorted(kinds.items(), key=lambda kv: -kv[1])))


def hh_batches(path, bc):
    """SFT examples (prompt + response token lists) of an HH-RLHF file in batches of sft_batch, in file order."""
    import data
    recs = data.load_records(path, "sft")[0]
    tok = data.Tokenizer()
    ex = data.encode_examples(tok, [r["prompt"] for r in recs], [r["response"] for r in recs], bc.sft_len,
                              bc.sft_len // 2, "bench hh")
    ex = [p + r for p, r in ex][:bc.sft_batch * (8 if bc.device == "cpu" else 64)]
    if len(ex) < 2 * bc.sft_batch:  # one batch warms up, at least one more is timed
        raise UserError(f"--hh={path}: {len(ex)} examples, fewer than two batches of --sft_batch={bc.sft_batch}")
    return [ex[i:i + bc.sft_batch] for i in range(0, len(ex) - bc.sft_batch + 1, bc.sft_batch)]


def bench_generate(model, cfg, B, bc, device, ctx):
    prompt = torch.randint(0, cfg.vocab_size, (B, bc.prompt_len), device=device)
    mask = torch.ones_like(prompt)
    static = bc.cuda_graph and device.startswith("cuda")

    def gen():
        with ctx, onednn.packed(model):  # pure sampling, no eos: every row makes all new_tokens; packed as rollout() does
            generate(model, prompt, mask, bc.new_tokens, temperature=1.0, static=static)
    peak_mem(device, reset=True)
    s = timed(gen, bc.reps, device)
    return dict(tok_s=B * bc.new_tokens / s, ms_per_step=1000 * s / bc.new_tokens, peak_mem_gib=peak_mem(device))


def ppo_iteration(cfg, bc, device, ctx):
    """One PPO iteration as ppo.py runs it, 4 models (policy, reference, reward, critic), as a function
    that appends its (rollout + scoring, update) seconds to the list returned with it."""
    policy = GPT(cfg).to(device)
    ref, rm = GPT(cfg).to(device).eval(), RewardModel(GPT(cfg)).to(device).eval()
    critic = RewardModel(GPT(cfg)).to(device)
    onednn.enable(policy, ref, rm, critic)
    pc = PPOConfig(rollout_batch=bc.ppo_prompts, minibatch=bc.ppo_prompts // 2, ppo_epochs=1,
                   max_new_tokens=bc.ppo_new_tokens, device=device, dtype=bc.dtype)
    sampler, static = make_sampler(policy, pc, device), bc.cuda_graph and device.startswith("cuda")
    tpolicy, tcritic = (compiled(m, bc) for m in (policy, critic))
    opts = [make_optimizer(policy.parameters(), pc.lr, 0.0), make_optimizer(critic.parameters(), pc.vf_lr, 0.0)]
    prompts = torch.randint(0, cfg.vocab_size - 1, (bc.ppo_prompts, bc.ppo_prompt_len)).tolist()
    eot = cfg.vocab_size - 1
    gen, g, parts = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(0), []

    def iteration():
        sync(device)
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.load_state_dict(policy.state_dict())  # as ppo.py: the bf16 copy follows the policy
        b = rollout(policy, ref, rm, critic, prompts, eot, pc.max_new_tokens, pc.temperature, ctx, gen,  # generation
                    sampler, static=static)  # + 3 scoring forwards (ref, reward, critic), 4 with a sampler
        add_advantages(b, pc, pc.kl_coef, None)
        sync(device)
        t1 = time.perf_counter()
        ppo_update(tpolicy, tcritic, opts, b, pc, ctx, g)
        sync(device)
        parts.append((t1 - t0, time.perf_counter() - t1))
    return iteration, parts, (ref, rm)


def bench_ppo(cfg, bc, device, ctx, results):
    """Our PPO iteration; with TRL installed (and compare), TRL's and ours run in alternation, one of
    ours after each of TRL's steps, so a machine that speeds up or slows down (a shared CPU drifts by
    10% within minutes) weighs on both sides alike."""
    iteration, parts, frozen = ppo_iteration(cfg, bc, device, ctx)
    with onednn.packed(*frozen):  # as ppo.py: the frozen reference and reward model packed once for the run
        peak_mem(device, reset=True)
        iteration()  # warm-up
        del parts[:]
        if not (bc.compare and bench_trl(cfg, bc, device, results, between=iteration)):
            for _ in range(bc.reps):
                iteration()
    iters = [a + b for a, b in parts]
    results["ppo"] = dict(iter_s=statistics.median(iters), iters_s=[round(t, 3) for t in iters],
                          rollout_and_scoring_s=statistics.median(p[0] for p in parts),
                          update_s=statistics.median(p[1] for p in parts), peak_mem_gib=peak_mem(device))


def settings(argv):
    """The Config of a command line: --preset=gpu sets its values over the defaults, not over flags given."""
    bc, given = parse_config(Config, argv), {a.lstrip("-").partition("=")[0].replace("-", "_") for a in argv}
    if bc.preset == "gpu":
        bc = Config(**{**asdict(bc), **{k: v for k, v in GPU_PRESET.items() if k not in given}})
    return bc


def main(argv):
    bc = settings(argv)
    only, batches = check_config(bc)
    device = get_device(bc.device)
    bc.device = device
    try:  # read before any timing: a file it cannot use is one line at once
        hh = hh_batches(bc.hh, bc) if bc.hh and "sft" in only else None
    except UserError as e:
        raise UserError(str(e).replace("--data=", "--hh=")) from None
    cfg = GPTConfig(**CONFIGS[bc.model])
    ctx = autocast(device, bc.dtype)
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    onednn.enable(model)  # the CPU fast path (onednn.py), as the three stages use it
    print(f"bench: {bc.model} on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}")
    res = {}
    if "sft" in only:
        res["sft"] = bench_sft(model, cfg, bc, device, ctx)
        if hh:
            res["sft_hh"] = bench_sft(model, cfg, bc, device, ctx, hh)
    model.eval()
    if "generate" in only:
        for B in batches:
            res[f"generate_b{B}"] = bench_generate(model, cfg, B, bc, device, ctx)
        model.to(torch.bfloat16)  # ppo.py --rollout_dtype=bfloat16: the sampler's weights in bf16
        for B in batches:
            res[f"generate_bf16_b{B}"] = bench_generate(model, cfg, B, bc, device, ctx)
    del model
    if "ppo" in only:
        bench_ppo(cfg, bc, device, ctx, res)  # and TRL's, alternating
    if bc.compare and ("sft" in only or "generate" in only):
        bench_hf(cfg, bc, batches, device, ctx, res)
    print(f"{'workload':<16} {'ours':>28} {'transformers':>28} {'ratio':>7}")
    s, hs = res.get("sft"), res.get("hf_sft")
    if s:
        print(f"{'sft step':<16} {s['step_s']:>9.3f} s {s['tok_s']:>8.0f} tok/s mfu {s['mfu']:.0%}"
              + (f" {hs['step_s']:>15.3f} s {hs['tok_s']:>6.0f} tok/s {hs['step_s'] / s['step_s']:>6.2f}x" if hs else ""))
        if "profile_ms" in s:
            print(f"{'  profiled':<16} " + ", ".join(f"{k} {v:.1f} ms" for k, v in s["profile_ms"].items())
                  + f" (table: {bc.profile})")
    if "sft_hh" in res:
        h = res["sft_hh"]
        print(f"{'sft step, HH':<16} {h['tok_s']:>9.0f} tok/s ({h['real_tok_s']:.0f} without padding) over {h['steps']} "
              f"batches of its own lengths: {h['tok_s'] / s['tok_s']:.0%} of the fixed-shape rate")
    for kind, label in (("generate", "generate"), ("generate_bf16", "bf16 gen")) if "generate" in only else ():
        for B in batches:
            g, h = res[f"{kind}_b{B}"], res.get(f"hf_generate_b{B}")
            line = f"{label + ' B=' + str(B):<16} {g['tok_s']:>9.0f} tok/s {g['ms_per_step']:>8.1f} ms/step"
            if h:  # bf16 rows compare with HF's fp32 sampling
                theirs = f"{h['tok_s']:>11.0f} tok/s {h['ms_per_step']:>6.1f} ms/step" if kind == "generate" else f"{'(vs HF generate above)':>28}"
                line += f" {theirs} {g['tok_s'] / h['tok_s']:>6.2f}x"
            print(line)
    p, t = res.get("ppo"), res.get("trl_ppo")
    if p:
        print(f"{'ppo iteration':<16} {p['iter_s']:>9.2f} s (rollout+scoring {p['rollout_and_scoring_s']:.2f} s, update {p['update_s']:.2f} s)"
              + (f"  TRL {t['iter_s']:.2f} s {t['iter_s'] / p['iter_s']:>6.2f}x" if t else ""))
    if device.startswith("cuda"):
        print("peak GPU memory (GiB): " + ", ".join(f"{k} {v['peak_mem_gib']:.2f}" for k, v in res.items() if "peak_mem_gib" in v))
    write_json(dict(config=asdict(bc), device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                    results=res), bc.out)
    print(f"wrote {bc.out}")


if __name__ == "__main__":
    main_guard(main)
