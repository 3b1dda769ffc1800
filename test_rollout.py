"""rollout.py and ppo_update: the experience PPO learns from (sampling, scoring, the KL to the
reference, which responses ended, advantages, the running score moments), the bf16 identity at
iteration 0, the update's guards, and what explained_variance reports, by hand. The update against
a naive one: test_ppo_update.py; evaluate's report: test_evaluate.py."""
import contextlib
import copy
import math
from types import SimpleNamespace

import pytest
import torch

import ppo
from checks import assert_close
from gpt import GPT, GPTConfig
from hf import save_checkpoint
from ppo import policy_logprobs
from reward import RewardModel
from test_gpt import CUDA
from rollout import (AdaptiveKLController, RunningMoments, add_advantages, explained_variance, kl_stats, load_models,
                     make_sampler, rollout, seeded)
from util import UserError, autocast, make_optimizer

# two rows of different lengths: row 0 is left-padded and ends early, row 1 runs to the end
MASK = torch.tensor([[0., 1., 1., 1., 0.], [1., 1., 1., 1., 1.]])


def tiny_models(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16)
    return GPT(cfg).eval(), GPT(cfg).eval(), RewardModel(GPT(cfg)).eval()


def scored_batch(scores, ended):
    """A rollout batch whose rewards are the scores alone (KL 0): row i's response is i + 1 tokens."""
    B = len(scores)
    mask = (torch.arange(B)[None] <= torch.arange(B)[:, None]).float()  # (B, B)
    return dict(scores=torch.tensor(scores), ended=torch.tensor(ended), mask=mask, logprobs=torch.zeros(B, B),
                ref_logprobs=torch.zeros(B, B), values=torch.zeros(B, B))


def test_policy_logprobs_use_the_sampling_temperature():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=5, n_layer=1, n_head=1, n_embd=8)).eval()
    tokens, attn = torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        got, _ = policy_logprobs(model, tokens, attn, temperature=0.5)
        logits = model(tokens)[:, :-1]
        want = torch.log_softmax(logits / 0.5, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        at_one = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    assert not torch.allclose(want, at_one, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-6), "log-probs must be taken at the sampling temperature"
    for t in (0.0, -1.0, math.nan):  # greedy has no log-probs: nan rows, silently
        with pytest.raises(ValueError, match=f"policy_logprobs: temperature={t}: must be > 0"):
            policy_logprobs(model, tokens, attn, temperature=t)


def test_policy_logprobs_softmax_rows_start_aligned(monkeypatch):
    """The log-softmax of policy_logprobs runs over rows 16-byte aligned (the padded head: 50257 -> 50304
    columns): a GPU's softmax orders a row's sum by its address (PyTorch's SoftMax.cu), and over 50257
    columns an H200 gave the first PPO ratio 1 ulp off 1. The logits it returns are the real vocabulary's."""
    seen = []

    def spy(z, t):  # not the exercise's token_logprobs: this test needs only its input
        seen.append(z)
        return torch.zeros(t.shape)
    monkeypatch.setattr(ppo, "token_logprobs", spy)
    model = GPT(GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=8)).eval()
    tokens = torch.randint(0, 50257, (3, 6))
    with torch.no_grad():
        _, logits = policy_logprobs(model, tokens, torch.ones_like(tokens), 0.7, 2)
    z = seen[0]
    assert z.is_contiguous() and z.stride(-2) * z.element_size() % 16 == 0, \
        f"log-softmax rows of {z.size(-1)} {z.dtype} entries: not all 16-byte aligned"
    assert logits.size(-1) == 50257 and torch.isneginf(z[..., 50257:]).all()


def test_adaptive_kl_controller_matches_ziegler():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 64)  # error 0.5 clipped to 0.2
    assert abs(c.value - 0.1 * (1 + 0.2 * 64 / 10000)) < 1e-12
    c.update(5.4, 100)  # error -0.1
    assert abs(c.value - 0.1 * (1 + 0.2 * 64 / 10000) * (1 - 0.1 * 100 / 10000)) < 1e-12


def test_kl_stats_per_token_k1_and_nonnegative_k3():
    b = dict(logprobs=torch.tensor([[0.0, -1.0, -2.0, -1.0, 0.0], [-1.0] * 5]),
             ref_logprobs=torch.tensor([[0.0, -2.0, -1.0, -1.5, 0.0], [-1.0, -0.5, -1.0, -1.0, -3.0]]), mask=MASK)
    k1, k3, kl_seq = kl_stats(b)
    d = [1.0, -1.0, 0.5, 0.0, -0.5, 0.0, 0.0, 2.0]  # log p - log q on the 8 valid tokens
    assert abs(k1 - sum(d) / 8) < 1e-6, "k1 is a mean per token, not a sum per sequence"
    assert abs(k3 - sum(math.exp(-x) - 1 + x for x in d) / 8) < 1e-6
    assert abs(kl_seq - (0.5 + 1.5) / 2) < 1e-6
    assert k3 >= 0
    b["logprobs"][0, 0], b["ref_logprobs"][0, 4] = -math.inf, math.nan  # padding: whatever a forward left there
    assert kl_stats(b) == (k1, k3, kl_seq), "a non-finite log-prob past a response's end reached the KL: inf * 0 = nan"


def test_rollout_logprobs_of_a_left_padded_row_equal_the_row_alone():
    """The rollout's log-probs come from the sampling steps (KV cache, left padding): they must equal
    a plain forward of each row alone, at the sampling temperature; so must the reference's, the
    values (of the state before each response token) and the score; and a separate sampler
    (--rollout_dtype) must give the policy's log-probs, recomputed."""
    policy, ref, rm = tiny_models()
    critic = RewardModel(GPT(policy.config)).eval()
    b = rollout(policy, ref, rm, critic, [[1, 2, 3, 4], [5, 6]], 10, 5, 0.7, torch.no_grad(), torch.Generator().manual_seed(0))
    assert b["mask"].shape == b["logprobs"].shape == b["values"].shape == (2, b["tokens"].size(1) - 4)
    for i in range(2):
        row = b["tokens"][i][b["attn"][i].bool()][None]  # row i without its padding
        n = int(b["mask"][i].sum())  # its response tokens
        with torch.no_grad():
            for model, key in ((policy, "logprobs"), (ref, "ref_logprobs")):
                alone = torch.log_softmax(model(row)[0, -n - 1:-1] / 0.7, -1).gather(1, row[0, -n:, None]).squeeze(1)
                got = b[key][i][b["mask"][i].bool()]
                assert torch.allclose(got, alone, atol=1e-5), f"{key}: positions restart after left padding, temperature 0.7"
            assert torch.allclose(b["values"][i][b["mask"][i].bool()], critic(row)[0, -n - 1:-1], atol=1e-5)
            assert torch.allclose(b["scores"][i], rm(row)[0, -1], atol=1e-5)
    again = rollout(policy, ref, rm, critic, [[1, 2, 3, 4], [5, 6]], 10, 5, 0.7, torch.no_grad(),
                    torch.Generator().manual_seed(0), sampler=copy.deepcopy(policy))
    assert torch.equal(again["tokens"], b["tokens"]) and torch.allclose(again["logprobs"], b["logprobs"], atol=1e-5)


def test_add_advantages_whitens_over_valid_tokens():
    policy, ref, rm = tiny_models(1)
    cfg = SimpleNamespace(max_new_tokens=5, temperature=1.0, missing_eos_penalty=0.0, truncated_score=-1.0, score_norm=False,
                          gamma=1.0, lam=0.95, advantage="gae")
    b = rollout(policy, ref, rm, rm, [[1, 2, 3], [4, 5], [6], [7, 8, 9]], 10, cfg.max_new_tokens, cfg.temperature,
                torch.no_grad(), torch.Generator().manual_seed(0))
    add_advantages(b, cfg, 0.1, None)
    m = b["mask"]
    assert abs((b["advantages"] * m).sum() / m.sum()) < 1e-5
    assert abs(((b["advantages"] ** 2) * m).sum() / m.sum() - 1) < 1e-3, "advantages are whitened"
    assert (b["advantages"][m == 0] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rollout_logprobs_and_values_are_zero_past_the_end(dtype):
    """On every path (fp32: the sampling step's log-probs; bf16: a bf16 sampler and a scoring forward),
    the log-probs, the reference's and the values are 0 where mask = 0, not whatever a forward gives."""
    policy, ref, rm = tiny_models(2)
    sampler = make_sampler(policy, ppo.Config(dtype=dtype), "cpu")
    b = rollout(policy, ref, rm, rm, [[1, 2], [3], [4, 5, 6], [7, 8]] * 4, 10, 8, 1.0, autocast("cpu", dtype),
                torch.Generator().manual_seed(0), sampler)
    pad = b["mask"] == 0
    assert pad.any() and b["ended"].any() and (sampler is None) == (dtype == "float32")
    for key in ("logprobs", "ref_logprobs", "values"):
        assert (b[key][pad] == 0).all(), f"{dtype}: {key} past the end: {b[key][pad]}"


def test_rollout_zeroes_nonfinite_logprobs_and_values_past_the_end(monkeypatch):
    """A scoring forward's numbers past a response's end are anything, -inf and nan included: rollout zeroes the
    log-probs, the reference's and the values there with torch.where, not by multiplying them by the mask
    (-inf * 0 = nan, which then reaches the KL, the rewards and GAE), and leaves the valid tokens' alone. bf16:
    the policy's log-probs too come from a scoring forward. Here the forwards write -inf and nan past the end."""
    import rollout as R
    policy, ref, rm = tiny_models(2)
    sampler = make_sampler(policy, ppo.Config(dtype="bfloat16"), "cpu")
    real_logprobs = R.policy_logprobs

    def dirty_logprobs(model, tokens, attn, temperature, start=0):
        lp, logits = real_logprobs(model, tokens, attn, temperature, start)
        return torch.where(attn[:, start + 1:].bool(), lp, -math.inf), logits

    class DirtyCritic(torch.nn.Module):
        def __init__(self, rm):
            super().__init__()
            self.rm = rm

        def forward(self, tokens, attn, first=0):
            return torch.where(attn[:, first:].bool(), self.rm(tokens, attn, first), math.nan)
    args = ([[1, 2], [3], [4, 5, 6], [7, 8]] * 4, 10, 8, 1.0, autocast("cpu", "bfloat16"))
    clean = rollout(policy, ref, rm, rm, *args, torch.Generator().manual_seed(0), sampler)
    monkeypatch.setattr(R, "policy_logprobs", dirty_logprobs)
    b = rollout(policy, ref, rm, DirtyCritic(rm), *args, torch.Generator().manual_seed(0), sampler)
    pad = b["mask"] == 0
    assert pad.any() and torch.equal(b["tokens"], clean["tokens"]), "a weak test: no response ends early"
    for key in ("logprobs", "ref_logprobs", "values"):
        assert (b[key][pad] == 0).all(), f"{key} past the end: {b[key][pad].unique().tolist()}, not 0: -inf or nan there " \
                                         "times the mask's 0 is nan; zero them with torch.where(mask, x, 0)"
        assert torch.equal(b[key][~pad], clean[key][~pad]), f"{key} on the valid tokens changed"


def test_add_advantages_truncated_score_known_values():
    """A response cut at max_new_tokens (ended False) scores truncated_score, set after score normalisation,
    so it is -1 whatever the scores' scale; with truncated_score=nan it keeps its own score, less
    missing_eos_penalty, also after normalisation. The scores' running mean 1.125 and (unbiased) std 1.75
    by hand; normalised, scores 10x as large give the same rewards."""
    scores, ended = [2.0, -1.0, 0.5, 3.0], [True, False, True, False]
    cases = [(dict(), [2.0, -1.0, 0.5, -1.0], [1.0]),  # the default: -1 for the cut ones
             (dict(truncated_score=float("nan")), scores, [1.0]),  # off: scored like finished ones
             (dict(score_norm=True), [0.875 / 1.75, -1.0, -0.625 / 1.75, -1.0], [1.0, 10.0]),
             (dict(score_norm=True, truncated_score=float("nan"), missing_eos_penalty=0.5),
              [0.875 / 1.75, -2.125 / 1.75 - 0.5, -0.625 / 1.75, 1.875 / 1.75 - 0.5], [1.0, 10.0])]
    for kw, want, scales in cases:
        for scale in scales:
            b = add_advantages(scored_batch([scale * x for x in scores], ended), ppo.Config(**kw), 0.0, RunningMoments())
            got = b["rewards"].sum(1)  # each row's only nonzero reward, at its last token
            assert torch.allclose(got, torch.tensor(want), atol=1e-6), f"{kw}, scores x{scale}: {got.tolist()} != {want}"
    b = add_advantages(scored_batch([0.3] * 4, [True] * 4), ppo.Config(score_norm=True), 0.1, RunningMoments())
    assert (b["rewards"].sum(1) == 0).all() and b["advantages"].isfinite().all(), \
        f"score_norm on a first batch of equal scores (std 0): rewards {b['rewards'].sum(1).tolist()}"


def test_load_models_checks_the_context_of_policy_and_reward_model(tmp_path):
    """--max_prompt_len + --max_new_tokens past the block_size of the policy or of the reward model (the
    critic is its copy) is one line naming the checkpoint, before any rollout: the reward model's went
    unchecked, a ValueError at its first forward, after an evaluation's work."""
    for stage, block in (("sft", 16), ("reward", 12)):
        gpt = GPT(GPTConfig(block_size=block, vocab_size=11, n_layer=1, n_head=2, n_embd=16))
        extra = dict(head=RewardModel(gpt).head.state_dict(), normalized=True) if stage == "reward" else {}
        save_checkpoint(str(tmp_path / f"{stage}.pt"), gpt, stage, vocab=list(range(10)) + [50256], **extra)
    paths = dict(sft_ckpt=str(tmp_path / "sft.pt"), reward_ckpt=str(tmp_path / "reward.pt"))
    for P, N, culprit in ((8, 6, "reward.pt"), (10, 8, "sft.pt")):
        with pytest.raises(UserError, match=f"= {P + N} exceeds the block_size .* of .*{culprit}"):
            load_models(ppo.Config(max_prompt_len=P, max_new_tokens=N, **paths), "cpu")
    assert load_models(ppo.Config(max_prompt_len=6, max_new_tokens=6, **paths), "cpu")[3] is not None  # fits both


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype,rollout_dtype,tol", [("float32", "auto", 1e-6),  # fp32: decode step vs a full forward
                                                     ("bfloat16", "auto", 0.0), ("bfloat16", "float32", 0.0),
                                                     ("float32", "bfloat16", 1e-6)])  # fp32 forwards: the batch's vs a minibatch's
def test_iteration_zero_kl_is_zero_and_ratio_is_one(dtype, rollout_dtype, tol, device):
    """With the policy equal to the reference, the rollout's KL is 0 per token and the update's first
    ratio is 1, in fp32 and under bf16 autocast (where ppo.py samples with a bf16 copy and takes the
    log-probs from a scoring forward over fp32 logits, the update's computation), and in fp32 with a bf16
    sampler (--rollout_dtype=bfloat16: the bf16 sampling step's own log-probs put KL and ratio ~1e-4 off
    here), for a minibatch of another size than the rollout's, its rows at other places (on a GPU, kernels
    may be chosen by shape, and a row's sum ordered by its address: policy_logprobs). Full vocabulary, an odd width."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).to(device)
    ref, rm = copy.deepcopy(policy).eval(), RewardModel(copy.deepcopy(policy)).eval()
    ctx = autocast(device, dtype)
    sampler = make_sampler(policy, ppo.Config(dtype=dtype, rollout_dtype=rollout_dtype), device)
    assert (sampler is None) == (rollout_dtype == "float32" or rollout_dtype == "auto" and dtype == "float32")
    prompts = torch.randint(0, 50256, (8, 6)).tolist()
    b = rollout(policy, ref, rm, rm, prompts, 50256, 10, 0.7, ctx, seeded(0, device=device), sampler, static=device == "cuda")
    k1, k3, _ = kl_stats(b)
    assert abs(k1) <= tol and abs(k3) <= tol, f"{dtype}: KL per token at iteration 0 is k1 {k1:.2e}, k3 {k3:.2e}, not 0"
    mb, P = torch.tensor([5, 2, 7], device=device), b["tokens"].size(1) - b["mask"].size(1)
    with ctx:
        lp, _ = policy_logprobs(policy, b["tokens"][mb], b["attn"][mb], 0.7, P - 1)
    ratio = torch.exp(lp - b["logprobs"][mb])[b["mask"][mb].bool()]
    assert (ratio - 1).abs().max() <= tol, f"{dtype}: first PPO ratio off 1 by {(ratio - 1).abs().max():.2e}"
    assert b["mask"].sum() > 20 and lp.dtype == torch.float32


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_add_advantages_critic_free_uses_kl_penalised_returns(advantage):
    """RLOO and GRPO: each response's return is its score minus kl_coef times its summed KL (the rewards
    summed), its advantage the estimator over its prompt's group (k = 2 adjacent rows), on every
    response token and nowhere else; no values, no returns."""
    from ppo import grpo_advantages, rloo_advantages
    mask = torch.tensor([[1., 1., 0.], [1., 1., 1.], [1., 0., 0.], [1., 1., 0.]])
    logprobs = torch.tensor([[-1., -2., 0.], [-0.5, -1., -3.], [-2., 0., 0.], [-1., -1., 0.]])
    ref = torch.tensor([[-1.5, -1., 0.], [-0.5, -2., -1.], [-1., 0., 0.], [-1., -3., 0.]])
    b = dict(scores=torch.tensor([1.0, 0.0, 2.0, -1.0]), logprobs=logprobs, ref_logprobs=ref, mask=mask,
             ended=torch.ones(4, dtype=torch.bool))
    cfg = SimpleNamespace(missing_eos_penalty=0.0, truncated_score=-1.0, score_norm=False, advantage=advantage,
                          samples_per_prompt=2)
    add_advantages(b, cfg, 0.5, None)
    R = torch.tensor([1 - 0.5 * (0.5 - 1), 0 - 0.5 * (0 + 1 - 2), 2 - 0.5 * (-1), -1 - 0.5 * (0 + 2)])  # score - beta sum KL
    A = (rloo_advantages if advantage == "rloo" else grpo_advantages)(R, 2)
    assert torch.allclose(b["advantages"], A[:, None] * mask, atol=1e-6), f"{advantage}: advantages {b['advantages']}"
    assert (b["returns"] == 0).all() and (b["values"] == 0).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_ppo_update_without_a_critic_runs_on_the_policys_device(device):
    """RLOO and GRPO have no critic, and no critic statistics: every statistic is on the policy's device
    (a CPU zero for the critic's gradient norm beside a CUDA one stopped the first critic-free step on a GPU)."""
    policy, ref, rm = (m.to(device) for m in tiny_models(4))
    cfg = ppo.Config(rollout_batch=4, minibatch=2, ppo_epochs=1, advantage="rloo", samples_per_prompt=2)
    b = add_advantages(rollout(policy, ref, rm, None, [[1, 2], [1, 2], [3], [3]], 10, 5, 1.0, torch.no_grad(),
                               seeded(0, device=device)), cfg, 0.1, None)
    stats = ppo.ppo_update(policy.train(), None, [make_optimizer(policy.parameters(), 1e-3, 0.0)], b, cfg,
                           contextlib.nullcontext(), seeded(0))
    assert stats["grad_norm"] > 0 and not {"vf_grad_norm", "value_loss"} & stats.keys(), stats


def test_rollout_ended_marks_responses_that_emitted_the_eos():
    """ended (a cut response scores truncated_score) is True for a row that emitted the eos, before its last
    allowed token or as it, and False for a row cut at max_new_tokens, whether its prompt was left-padded (with
    the eos) or not: read here off each row's generated tokens. Seeded: the batch holds each kind (checked)."""
    policy, _, rm = tiny_models(5)
    prompts, N, eos = [[1, 2, 3], [4], [5, 6], [7, 8, 9], [2], [3, 4], [6], [8, 9]], 4, 10
    b = rollout(policy, None, rm, None, prompts, eos, N, 1.0, torch.no_grad(), torch.Generator().manual_seed(0))
    kinds = []
    for i, prompt in enumerate(prompts):
        resp = b["tokens"][i, -b["mask"].size(1):][b["mask"][i].bool()].tolist()  # row i's generated tokens
        emitted = resp[-1] == eos
        assert eos not in resp[:-1] and (emitted or len(resp) == N), f"row {i}: generated {resp}"
        kinds.append(("eos early" if len(resp) < N else "eos last") if emitted else
                     "cut, prompt left-padded" if len(prompt) < 3 else "cut")
        assert bool(b["ended"][i]) == emitted, f"row {i} ({kinds[-1]}: generated {resp}): ended {bool(b['ended'][i])}: " + (
            "a response that emits the eos as its last allowed token ended too (not: length < max_new_tokens)" if emitted
            else "ended means an eos among the row's generated tokens (mask = 1): not True everywhere, nor an eos anywhere "
                 "in the row (a left-padded prompt holds the eos as padding)")
    assert {"eos early", "eos last", "cut, prompt left-padded"} <= set(kinds), kinds


def test_running_moments_match_the_concatenation():
    """Updates of 1, 5, 2 and 9 scores around different means, as score_norm sees batch after batch: after
    each, the running mean and std are torch's mean and std (n - 1) of all the scores seen so far (Chan et
    al.: each update's own sum of squares plus delta^2 * n_a * n_b / n between the means)."""
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g, dtype=torch.float64) * s + mu
              for n, s, mu in ((1, 1.0, 4.0), (5, 0.5, -3.0), (2, 2.0, 10.0), (9, 1.0, 0.0))]
    moments = RunningMoments()
    for k, x in enumerate(chunks):
        moments.update(x)
        if k == 0:
            continue  # one score: no std (the property says 1.0)
        seen, mean = torch.cat(chunks[:k + 1]), torch.cat(chunks[:k + 1]).mean()
        within = sum(((c - c.mean()) ** 2).sum() for c in chunks[:k + 1])  # each update's own sum of squares
        between = sum(c.numel() * (c.mean() - mean) ** 2 for c in chunks[:k + 1])  # the spread of their means
        n = seen.numel()
        assert_close(f"RunningMoments (mean, std) after updates of {[c.numel() for c in chunks[:k + 1]]} scores",
                     torch.tensor([moments.mean, moments.std], dtype=torch.float64), torch.stack([mean, seen.std()]), 1e-9,
                     [("each update's own sum of squares (m2) not added to the total: m2 += m2_batch + delta^2 n_a n_b / n",
                       torch.stack([mean, (between / (n - 1)).sqrt()])),
                      ("the spread between the updates' means (delta^2 * n_a * n_b / n) not added to m2",
                       torch.stack([mean, (within / (n - 1)).sqrt()])),
                      ("std over n: the unbiased std divides by n - 1", torch.stack([mean, seen.std(correction=0)])),
                      ("the last update's statistics alone", torch.stack([x.mean(), x.std()]))],
                     "Chan et al.'s parallel update of (n, mean, m2)")


def test_explained_variance_known_values():
    """1 - Var(R - V) / Var(R) over the valid tokens, by hand: R = 1, 2, 3, 4 (Var 1.25), R - V = 0, -1, 0, -1
    (Var 0.25): 0.8. Padding holds other numbers. A perfect critic gives 1, a constant one 0."""
    mask = torch.tensor([[0., 1., 1.], [1., 1., 0.]])
    returns, values = torch.tensor([[9., 1., 2.], [3., 4., -7.]]), torch.tensor([[-5., 1., 3.], [3., 5., 8.]])
    d, every = returns - values, lambda x: ((x - x.mean()) ** 2).mean()
    assert_close("explained_variance", explained_variance(values, returns, mask), 0.8, 1e-6,
                 [("Var(R - V) / Var(R): explained variance is 1 minus that", 0.2),
                  ("Var(R - V) as mean((R - V)^2), not centred", 1 - 0.5 / 1.25),
                  ("means over padding too: masked_mean over valid tokens", 1 - every(d) / every(returns))],
                 "1 - Var(R - V) / Var(R), both masked means over valid tokens")
    assert abs(explained_variance(returns, returns, mask) - 1) < 1e-6, "a critic with V = R explains all: 1"
    assert abs(explained_variance(torch.full_like(returns, 5.0), returns, mask)) < 1e-6, "a constant critic: 0"


def test_add_advantages_gae_reads_gamma_and_lam():
    """--advantage=gae: the advantages are whiten(gae(rewards, values, mask, cfg.gamma, cfg.lam)) and the returns
    gae's own (advantages before whitening, plus the values), by hand on a batch with values off 0 and gamma = 0.9
    != lam = 0.5, so gamma and lam swapped, either one ignored, or returns taken from the whitened advantages
    move them (checked against each)."""
    from ppo import gae, whiten
    mask = torch.tensor([[1., 1., 1., 0.], [1., 1., 1., 1.], [1., 0., 0., 0.]])
    values = torch.tensor([[0.5, -0.3, 0.8, 0.0], [1.0, 0.2, -0.6, 0.4], [-0.7, 0.0, 0.0, 0.0]])
    b = dict(scores=torch.tensor([1.0, -2.0, 0.5]), ended=torch.ones(3, dtype=torch.bool), mask=mask,
             logprobs=torch.tensor([[-1., -2., -0.5, 0.], [-0.5, -1., -3., -1.], [-2., 0., 0., 0.]]),
             ref_logprobs=torch.tensor([[-1.5, -1., -1., 0.], [-0.5, -2., -1., -2.], [-1., 0., 0., 0.]]), values=values)
    cfg = SimpleNamespace(missing_eos_penalty=0.0, truncated_score=-1.0, score_norm=False, advantage="gae", gamma=0.9, lam=0.5)
    add_advantages(b, cfg, 0.2, None)
    adv, ret = gae(b["rewards"], values, mask, 0.9, 0.5)
    for name, (g, l) in (("gamma and lam swapped", (0.5, 0.9)), ("gamma ignored (1)", (1.0, 0.5)), ("lam ignored (1)", (0.9, 1.0))):
        other = whiten(gae(b["rewards"], values, mask, g, l)[0], mask)
        assert not torch.allclose(other, whiten(adv, mask), atol=1e-3), f"{name} gives the same advantages: a weak test"
        assert not torch.allclose(b["advantages"], other, atol=1e-4), \
            f"add_advantages: advantages of gae(..., {g}, {l}): {name}; pass gae(..., cfg.gamma, cfg.lam)"
    assert torch.allclose(b["advantages"], whiten(adv, mask), atol=1e-5), \
        f"add_advantages: advantages {b['advantages']}, want whiten(gae(rewards, values, mask, cfg.gamma, cfg.lam))"
    assert torch.allclose(b["returns"], ret, atol=1e-5), \
        f"add_advantages: returns {b['returns']}, want gae's (unwhitened advantages + values), the critic's targets"


def test_demo_loss_draws_its_demonstrations_with_g():
    """PPO-ptx's demo_loss draws its n demonstrations with the generator it is given (seeded by (seed, 2, it) in
    train(): a resumed run, and every rank, draw the same ones), not torch's global stream; one process: it is
    sft_loss on those n, right-padded. Checked against the draw by hand, with the global stream moved between calls."""
    import data
    import rollout as R
    from sft import sft_loss
    policy = tiny_models(3)[0]
    g = torch.Generator().manual_seed(7)
    demos = [(torch.randint(10, (p,), generator=g).tolist(), torch.randint(10, (r,), generator=g).tolist() + [10])
             for p, r in [(1, 2), (3, 1), (2, 4), (1, 1), (4, 3), (2, 2)]]
    got = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            got.append(R.demo_loss(policy, demos, 3, 10, torch.Generator().manual_seed(5)).item())
    picks = torch.randint(len(demos), (3,), generator=torch.Generator().manual_seed(5)).tolist()
    p = data.pad_right([demos[j] for j in picks], 10)
    with torch.no_grad():
        want = sft_loss(policy(p["tokens"], padded=True), p["tokens"], p["loss_mask"]).item()
    assert got[0] == got[1], f"demo_loss {got}: the global random stream chose the demonstrations; draw them with g"
    assert abs(got[0] - want) < 1e-5, f"demo_loss {got[0]}, want {want}: sft_loss on demos[j] for j in randint(len, (n,), g)"
