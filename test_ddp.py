"""Data parallel (torchrun, DDP over gloo on CPU): two processes, each on half of every batch, must
make the same updates as one process on the whole batch: the same logged losses step by step and
the same final weights. The single-process run is the independent reference. Every run checks that
each tensor handed to a collective is on the rank's device (MINRLHF_CHECK_DEVICES: ddp.collective).
`python test_ddp.py WORKER OUT` (alone or under torchrun) runs one of WORKERS, below: the PPO update of
test_ddp_ppo_update_*, all_gather_rows' and rank0_first's own tests."""
import contextlib
import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MINRLHF_CHECK_DEVICES": "1"}
SFT = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--batch_size=8", "--grad_accum=2", "--warmup_iters=2",
       "--max_iters=4", "--eval_interval=2", "--eval_batches=1", "--log_interval=1", "--device=cpu"]
RM = ["--kind=rankings", "--batch_size=4", "--warmup_iters=2", "--max_iters=4", "--eval_interval=2", "--eval_batches=1",
      "--log_interval=1", "--norm_samples=4", "--device=cpu"]  # rankings: the two ranks get different pair counts


def run(script, *args, nproc=1, timeout=300):
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, script, *args], cwd=HERE, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def losses(path):
    return {m["iter"]: m["loss"] for m in map(json.loads, open(path))}


def assert_same_run(one, two, metrics, ckpt, keys, skip=(), what="(1 process vs 2)"):
    la, lb = losses(f"{one}/{metrics}"), losses(f"{two}/{metrics}")
    assert la.keys() == lb.keys() and len(la) == 4
    for it in la:
        assert abs(la[it] - lb[it]) < 1e-5, f"step {it}: loss {la[it]} vs {lb[it]} {what}"
    a, b = torch.load(f"{one}/{ckpt}", weights_only=True), torch.load(f"{two}/{ckpt}", weights_only=True)
    for key in keys:
        for name in (n for n in a[key] if f"{key}.{n}" not in skip):
            err = (a[key][name] - b[key][name]).abs().max().item()
            assert err < 1e-5, f"{ckpt} {key}.{name}: differs by {err:.2e} {what}"
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


def test_grad_accum_matches_one_big_batch(sft_runs, tmp_path):
    """--batch_size=8 --grad_accum=2 makes the updates of --batch_size=16, one process, on the same 16
    sequences a step: each micro-batch weighs by its response tokens (a mean over the step's tokens),
    not by 1 / grad_accum, which weighs the tokens of a micro-batch of short responses more."""
    big = [a for a in SFT if not a.startswith(("--batch_size", "--grad_accum"))] + ["--batch_size=16", "--grad_accum=1"]
    r = run("sft.py", *big, f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_same_run(sft_runs[0], str(tmp_path), "sft_metrics.jsonl", "sft_last.pt", ["model"], what="(2 micro-batches of 8 vs one of 16)")


@pytest.fixture(scope="module")
def rm_runs(sft_runs, tmp_path_factory):
    one, two = str(tmp_path_factory.mktemp("rm1")), str(tmp_path_factory.mktemp("rm2"))
    for out, nproc in ((one, 1), (two, 2)):
        r = run("reward.py", *RM, f"--sft_ckpt={sft_runs[0]}/sft.pt", f"--out_dir={out}", nproc=nproc)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert r.stdout.count("saved") == 1  # rank 0 alone prints (and normalises, and saves)
    return one, two


def test_ddp_reward_matches_single_process(rm_runs):
    one, two = rm_runs
    # The preference loss depends on reward differences only, so the two parameters that shift every
    # reward alike (the head's bias, and ln_f's bias, seen only through the head) have gradient 0 up to
    # rounding, which Adam's normalisation turns into lr-sized steps of either sign: not comparable.
    assert_same_run(one, two, "reward_metrics.jsonl", "reward_last.pt", ["model", "head"],
                    skip=("head.bias", "model.transformer.ln_f.bias"))


def test_ddp_user_error_printed_once(tmp_path):
    r = run("sft.py", "--batch_size=1", "--device=cpu", f"--out_dir={tmp_path}", nproc=2)
    assert r.returncode != 0
    assert (r.stdout + r.stderr).count("error: --batch_size=1: fewer sequences than the 2 processes") == 1, r.stderr


def ppo_update_worker(out):
    """A fixed rollout batch of 8 rows (built alike on every rank, from a seed): under torchrun rank r
    holds rows 4r..4r+3, rank 1 with its all-padding last response columns cut, as when all its
    responses end early. Gather, advantages (score normalisation on), 2 epochs x 2 minibatches of
    PPO with PPO-ptx on demonstrations of different lengths (so the ranks' shares of their tokens
    differ from their shares of the rollouts'); rank 0 saves."""
    import ppo
    import rollout
    from ddp import RANK, WORLD, all_gather_rows, ddp_init, ddp_wrap
    from gpt import GPT, GPTConfig
    from util import make_optimizer
    from reward import RewardModel
    ddp_init("cpu")
    torch.manual_seed(0)
    gcfg = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
    policy, critic = GPT(gcfg), RewardModel(GPT(gcfg))
    g = torch.Generator().manual_seed(1)
    B, P, R = 8, 4, 8  # rows, prompt columns (left-padded), response columns
    lengths = torch.tensor([8, 5, 8, 1, 3, 2, 4, 1])  # response tokens; rank 1's rows end by column 4
    col = torch.arange(P + R)
    attn = ((col >= P - torch.tensor([4, 2, 3, 4, 1, 4, 2, 3])[:, None]) & (col < P + lengths[:, None])).float()
    tokens = torch.randint(32, (B, P + R), generator=g) * attn.long()
    mask = attn[:, P:]
    with torch.no_grad():
        logprobs = ppo.policy_logprobs(policy, tokens, attn, 1.0, P - 1)[0]
        b = dict(tokens=tokens, attn=attn, mask=mask, logprobs=(logprobs + 0.3 * torch.randn(B, R, generator=g)) * mask,
                 ref_logprobs=(logprobs + 0.2 * torch.randn(B, R, generator=g)) * mask,
                 values=critic(tokens, attn)[:, P - 1:-1] * mask, scores=torch.randn(B, generator=g), ended=lengths < 8)
    if WORLD > 1:  # rank r: rows 4r..4r+3; rank 1's responses all ended by column 4: its last 4 are cut
        rows, cut = slice(4 * RANK, 4 * RANK + 4), R if RANK == 0 else 4
        b = {k: v[rows, :v.size(1) - R + cut] if v.dim() > 1 else v[rows] for k, v in b.items()}
    b = all_gather_rows(b)
    cfg = ppo.Config(rollout_batch=B, minibatch=4, ppo_epochs=2, score_norm=True, ent_coef=0.01, lr=1e-3, vf_lr=1e-3,
                     ptx_coef=0.5)
    rollout.add_advantages(b, cfg, cfg.kl_coef, rollout.RunningMoments())
    demos = [(torch.randint(31, (p,), generator=g).tolist(), torch.randint(31, (r,), generator=g).tolist() + [31])
             for p, r in zip([1, 4, 2, 3, 4, 1], [0, 6, 1, 5, 2, 3])]  # 31 is the eot
    ptx = functools.partial(rollout.demo_loss, policy, demos, cfg.minibatch, 31, rollout.seeded(0, 2, 0))
    opts = [make_optimizer(m.parameters(), 1e-3, 0.0) for m in (policy, critic)]
    stats = ppo.ppo_update(ddp_wrap(policy, "cpu"), ddp_wrap(critic, "cpu"), opts, b, cfg, contextlib.nullcontext(),
                           rollout.seeded(0, 1, 0), ptx)
    if RANK == 0:
        torch.save(dict(policy=policy.state_dict(), critic=critic.state_dict(), stats=stats,
                        advantages=b["advantages"]), out)


def test_ddp_ppo_update_matches_single_process(tmp_path):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    for out, nproc in ((one, 1), (two, 2)):
        r = run("test_ddp.py", "ppo_update", out, nproc=nproc)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    assert (a["advantages"] - b["advantages"]).abs().max() < 1e-6  # whitening and score norm saw the whole batch
    for key in a["stats"]:
        assert abs(a["stats"][key] - b["stats"][key]) < 1e-5, f"{key}: {a['stats'][key]} vs {b['stats'][key]}"
    for model in ("policy", "critic"):
        for name in a[model]:
            err = (a[model][name] - b[model][name]).abs().max().item()
            assert err < 1e-5, f"{model}.{name}: differs by {err:.2e} between 1 and 2 processes"


def test_ddp_collectives_refuse_a_tensor_off_the_ranks_device(monkeypatch):
    """Issue 19: all_max reduced torch.tensor(n), a CPU tensor, which an nccl group refuses and gloo takes,
    so the CPU tests could not see it. Under the check the DDP runs above switch on, a tensor that a
    collective helper builds without device= is a meta tensor, refused on the CPU too."""
    import ddp
    monkeypatch.setattr(ddp, "CHECK_DEVICES", True)
    monkeypatch.setattr(ddp, "WORLD", 2)
    reduced = []
    monkeypatch.setattr(ddp.dist, "all_reduce", lambda x, op=None: reduced.append(x))

    @ddp.collective
    def all_max_of_issue_19(n):
        x = torch.tensor(n)
        ddp.dist.all_reduce(ddp.on_device(x), op=ddp.dist.ReduceOp.MAX)
        return int(x)
    with pytest.raises(RuntimeError, match="tensor on meta handed to a collective"):
        all_max_of_issue_19(3)
    assert ddp.all_max([3, 5], "cpu") == [3, 5] and reduced[-1].device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="on meta"):
        ddp.all_sum(torch.zeros(1, device="meta"))


def test_ddp_tensors_built_for_a_collective_name_their_device():
    """Issue 19's mistake at a call site: all_sum(torch.tensor(n)) builds a CPU tensor before the collective
    runs, where MINRLHF_CHECK_DEVICES cannot see it (the DDP runs above are on the CPU, whose gloo takes it;
    nccl refuses it at the first run on 2+ GPUs). Every tensor a script builds in the arguments of a collective
    helper names its device=, as all_sum(torch.tensor(len(ci), device=device)) in reward.py does."""
    import ast
    import glob
    helpers = {"all_sum", "all_max", "any_rank", "all_gather_rows"}
    factories = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint"}
    bad = []
    for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
        if os.path.basename(path).startswith("test_"):
            continue
        for call in ast.walk(ast.parse(open(path).read())):
            name = getattr(call, "func", None)
            if not (isinstance(call, ast.Call) and getattr(name, "id", getattr(name, "attr", None)) in helpers):
                continue
            for node in (n for arg in call.args + [k.value for k in call.keywords] for n in ast.walk(arg)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in factories
                        and getattr(node.func.value, "id", None) == "torch" and "device" not in {k.arg for k in node.keywords}):
                    bad.append(f"{os.path.basename(path)}:{node.lineno}: {ast.unparse(call)}")
    assert not bad, "a tensor handed to a collective without device= (a CPU tensor, which nccl refuses):\n" + "\n".join(bad)


def test_ddp_ppo_runs_and_logs_once(sft_runs, rm_runs, tmp_path):
    r = run("ppo.py", f"--sft_ckpt={sft_runs[0]}/sft.pt", f"--reward_ckpt={rm_runs[0]}/reward.pt", f"--out_dir={tmp_path}",
            "--iters=2", "--rollout_batch=4", "--minibatch=2", "--ppo_epochs=1", "--max_new_tokens=4", "--eval_interval=2",
            "--eval_prompts=4", "--eval_samples=1", "--score_norm=True", "--adaptive_kl=True", "--kl_target=1",
            "--ptx_coef=0.1", "--device=cpu", nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("ppo train") == 2 and r.stdout.count("ppo eval") == 2, r.stdout
    lines = [json.loads(x) for x in open(tmp_path / "ppo_metrics.jsonl")]
    assert [(m["kind"], m["iter"]) for m in lines] == [("eval", 0), ("train", 0), ("train", 1), ("eval", 2)]
    assert torch.load(tmp_path / "ppo.pt", weights_only=True)["iter"] == 2 and (tmp_path / "ppo_eval.json").exists()


def gather_worker(out):
    """all_gather_rows on dicts that differ between the ranks (rows, keys, key order, dtype: each rank's
    dict is valid on its own), then on a valid pair; each rank writes what it raised and gathered."""
    from ddp import RANK, all_gather_rows, ddp_init
    ddp_init("cpu")
    x, y = torch.ones(2, 3), torch.ones(2)
    cases = dict(rows=dict(x=torch.ones(2 + RANK, 3)), keys=dict(x=x, **({"y": torch.ones(2, 4)} if RANK else {})),
                 order=dict(x=x, y=y) if RANK else dict(y=y, x=x),
                 dtype=dict(x=torch.ones(2, 3, dtype=torch.int32 if RANK else torch.float32)))  # same size, both 4 bytes
    errors = {}
    for name, b in cases.items():
        try:
            all_gather_rows(b)
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    got = all_gather_rows(dict(x=torch.full((2, 1 + RANK), RANK + 1.0), m=torch.tensor([True, RANK == 1])))
    with open(f"{out}.{RANK}", "w") as f:
        json.dump(dict(errors=errors, x=got["x"].tolist(), m=got["m"].tolist()), f)


def test_all_gather_rows_raises_alike_on_every_rank_where_the_ranks_differ(tmp_path):
    """Unchecked, 2 rows against 3 aborted both processes in gloo ("Received data size doesn't match
    expected size"), a key more on one rank hung, an int32 against a float32 gathered
    garbage. Every rank must raise (a rank that does not waits in the next collective for ever)."""
    r = run("test_ddp.py", "gather", str(tmp_path / "out"), nproc=2, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for rank in (0, 1):
        got = json.load(open(tmp_path / f"out.{rank}"))
        assert re.fullmatch(rf"all_gather_rows: the ranks hold 2 to 3 rows \(rank {rank}: b\['x'\] is \({2 + rank}, 3\)\)"
                            r"; each must hold as many", got["errors"]["rows"]), got["errors"]["rows"]
        for case in ("keys", "order", "dtype"):
            assert got["errors"][case].startswith(f"all_gather_rows: the ranks' dicts differ in their keys, order, dtypes "
                                                  f"or dims; rank {rank} holds [('"), (case, got["errors"][case])
        assert got["x"] == [[1, 0], [1, 0], [2, 2], [2, 2]] and got["m"] == [True, False, True, True]


def test_all_gather_rows_refuses_a_bad_dict_before_any_collective(monkeypatch):
    """On one rank's own: 1-D or 2-D tensors only (a 3-D tensor's dim 1 was padded as its last; a
    tensor of other rows was gathered out of step with the rest), checked with one process too."""
    import ddp
    for world in (1, 2):
        monkeypatch.setattr(ddp, "WORLD", world)
        monkeypatch.setattr(ddp, "all_max", lambda *a: pytest.fail("a collective before the local checks"))
        x = torch.ones(2, 3)
        for b, message in ((dict(x=x, v=torch.ones(2, 3, 4)), r"b\['v'\] is \(2, 3, 4\): each value must be a \(B,\) or \(B, T\)"),
                           (dict(s=torch.tensor(1.0)), r"b\['s'\] is \(\): each value must be"),
                           (dict(x=x, n=None), r"b\['n'\] is a NoneType: each value must be"),
                           (dict(x=x, y=torch.ones(3)), r"b\['y'\] is \(3,\) but b\['x'\] \(2, 3\): every value must hold as many rows"),
                           ({}, "an empty dict")):
            with pytest.raises(ValueError, match="all_gather_rows: " + message):
                ddp.all_gather_rows(b)


def rank0_first_worker(out):
    """rank0_first(f) with f logging its start and end to the file out; rank 0's f takes 0.5 s, so a
    rank that did not wait for it would start meanwhile."""
    import time
    from ddp import RANK, ddp_init, rank0_first

    def f(path):
        with open(path, "a") as log:  # appends of one short line each: no rank's line splits another's
            log.write(f"start {RANK}\n")
            log.flush()
            time.sleep(0.5 if RANK == 0 else 0.0)
            log.write(f"end {RANK}\n")
        return RANK
    ddp_init("cpu")
    assert rank0_first(f, out) == RANK


def test_rank0_first_runs_rank_0_before_the_others_start(tmp_path):
    log = tmp_path / "log"
    r = run("test_ddp.py", "rank0_first", str(log), nproc=2, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert log.read_text().split("\n") == ["start 0", "end 0", "start 1", "end 1", ""], log.read_text()


WORKERS = dict(ppo_update=ppo_update_worker, gather=gather_worker, rank0_first=rank0_first_worker)

if __name__ == "__main__":
    from ddp import ddp_main
    ddp_main(lambda argv: WORKERS[argv[0]](argv[1]))(sys.argv[1:])  # ddp_main leaves the process group cleanly
