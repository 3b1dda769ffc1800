"""rollout.evaluate, by hand with rollout() stubbed: the held-out report of a PPO run (the win rate
against the SFT policy, ties half; the KL as k1, k3 and per response; on the built-in task the gold
labeler's view), and the seeds and samplers its rollouts draw with."""
import contextlib
import math
from types import SimpleNamespace

import torch

from checks import assert_close
from rollout import evaluate


def test_evaluate_win_rate_counts_ties_half_and_kl_is_k1(monkeypatch):
    """evaluate on 5 held-out prompts, 3 at a time, rollout() replaced by hand batches: the policy's scores
    1, 2, 3, 0, 5 against the SFT policy's 1, 1, 4, 0, 2 win twice, lose once and tie twice: win rate
    (2 + 2 / 2) / 5 = 0.6. kl is k1 per token, sum(log p - log q) / valid tokens = 1.8 / 9, k3 Schulman's
    (r - 1) - log r per token, kl_seq k1 per response 1.8 / 5."""
    import rollout as R
    d = [[0.5, -0.2, 0.0], [1.0, 0.3, -0.4], [0.2, 0.0, 0.0], [-0.3, 0.6, 0.0], [0.1, 0.0, 0.0]]  # log p - log q
    n, scores = [2, 3, 1, 2, 1], dict(policy=[1., 2., 3., 0., 5.], sft=[1., 1., 4., 0., 2.])

    def stub(model, ref, rm, critic, prompt_ids, *a, **k):  # prompt i is [i]
        rows = [p[0] for p in prompt_ids]
        mask = torch.tensor([[float(t < n[r]) for t in range(3)] for r in rows])
        ref_lp = -1.5 * mask
        return dict(scores=torch.tensor([scores["sft" if ref is None else "policy"][r] for r in rows]), mask=mask,
                    logprobs=ref_lp + torch.tensor([d[r] for r in rows]) * mask, ref_logprobs=ref_lp)
    monkeypatch.setattr(R, "rollout", stub)
    res = evaluate(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), None, [[i] for i in range(5)], ["p"] * 5,
                   SimpleNamespace(eot=10), samples=1, batch=3, max_new_tokens=3, temperature=1.0, seed=0,
                   ctx=contextlib.nullcontext(), builtin=False)
    assert_close("evaluate: win_rate", res["win_rate"], 0.6, 1e-6,
                 [("ties counted as wins: a tie counts half", 0.8), ("ties counted as losses: a tie counts half", 0.4),
                  ("ties left out of the count: a tie counts half, and every sample counts", 2 / 3)],
                 "mean over samples of 1 (policy's score higher), 0.5 (equal), 0 (lower)")
    valid = [x for row, k in zip(d, n) for x in row[:k]]
    k1, k3 = sum(valid) / 9, sum(math.exp(-x) - 1 + x for x in valid) / 9
    assert_close("evaluate: (kl, k3, kl_seq)", torch.tensor([res["kl"], res["k3"], res["kl_seq"]]),
                 torch.tensor([k1, k3, sum(valid) / 5]), 1e-6,
                 [("k3 reported as kl: kl is k1 = log p - log q, k3 its own key", [k3, k3, sum(valid) / 5]),
                  ("kl and k3 swapped", [k3, k1, sum(valid) / 5]),
                  ("kl per response, not per token: summed over tokens / the number of valid tokens",
                   [sum(valid) / 5, k3, sum(valid) / 5])], "k1 and k3 summed over valid tokens / their number")
    want = dict(score=11 / 5, sft_score=8 / 5, length=9 / 5, n=5)
    assert all(abs(res[k] - v) < 1e-6 for k, v in want.items()), f"evaluate: {res}, want {want} among them"
    seen = []  # --rollout_dtype: each side samples with its copy (make_sampler), as training's rollouts
    monkeypatch.setattr(R, "rollout", lambda m, r, *a, **k: seen.append((r is None, k.get("sampler"))) or stub(m, r, *a, **k))
    evaluate(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), None, [[0]], ["p"], SimpleNamespace(eot=10), samples=1, batch=3,
             max_new_tokens=3, temperature=1.0, seed=0, ctx=contextlib.nullcontext(), builtin=False, samplers=("pol", "sft"))
    assert seen == [(False, "pol"), (True, "sft")], f"evaluate's rollouts got samplers {seen}: policy's, then ref's"


def test_evaluate_batches_draw_with_their_own_seeds(monkeypatch):
    """evaluate's rollouts: the policy and the SFT policy draw with the same seed on the same batch (at iteration 0
    the same responses: win rate 0.5), and each batch with another (eval_samples copies of the prompts in one
    batch must be different samples, not one sample repeated). 4 prompts x 2 samples, 4 at a time: 2 batches."""
    import rollout as R
    seeds = []

    def stub(model, ref, rm, critic, prompt_ids, pad_id, max_new_tokens, temperature, ctx, gen, **k):
        seeds.append((ref is None, gen.initial_seed()))
        mask = torch.ones(len(prompt_ids), 2)
        return dict(scores=torch.zeros(len(prompt_ids)), mask=mask, logprobs=0 * mask, ref_logprobs=0 * mask)
    monkeypatch.setattr(R, "rollout", stub)
    res = evaluate(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), None, [[i] for i in range(4)], ["p"] * 4,
                   SimpleNamespace(eot=10), samples=2, batch=4, max_new_tokens=2, temperature=1.0, seed=3,
                   ctx=contextlib.nullcontext(), builtin=False)
    assert res["n"] == 8, f"evaluate: n = {res['n']} responses of 4 prompts at samples=2: each prompt samples times"
    assert [s[0] for s in seeds] == [False, True, False, True], f"evaluate: (sft side, seed) per rollout {seeds}"
    assert seeds[0][1] == seeds[1][1] and seeds[2][1] == seeds[3][1], \
        f"evaluate: (sft side, seed) per rollout {seeds}: the policy and the SFT policy must draw alike on a batch"
    assert seeds[0][1] != seeds[2][1], \
        f"evaluate: (sft side, seed) per rollout {seeds}: every batch drew with one seed (seed + i, i the batch's start)"


def test_evaluate_gold_scores_each_sides_responses_and_decodes_only_the_response(monkeypatch):
    """On the built-in task evaluate adds the gold labeler's view: gold, the policy's mean gold score; sft_gold, the
    SFT policy's; gold_win_rate, the policy's wins over the SFT policy by gold (ties half). A response is decoded from
    its own tokens (mask 1, the eos dropped), not the prompt's. gold_score stubbed: the response's token count."""
    import data
    import rollout as R
    monkeypatch.setattr(data, "gold_score", lambda p, r: float(len(r.split(","))) if r else 0.0)
    lengths = dict(policy=[3, 1, 2], sft=[1, 1, 1])  # response tokens (the last one the eos 10) per prompt

    def stub(model, ref, rm, critic, prompt_ids, *a, **k):
        n = torch.tensor(lengths["sft" if ref is None else "policy"])
        mask = (torch.arange(4)[None] < n[:, None]).float()
        tokens = torch.cat([torch.tensor([[5, 6]] * 3), torch.where(mask.bool(), 7, 10)], 1)
        tokens[torch.arange(3), 1 + n] = 10  # each response ends with the eos
        return dict(scores=torch.zeros(3), mask=mask, logprobs=0 * mask, ref_logprobs=0 * mask, tokens=tokens)
    monkeypatch.setattr(R, "rollout", stub)
    tok = SimpleNamespace(eot=10, decode=lambda ids: ",".join(map(str, ids)))
    assert R.responses(stub(None, 1, None, None, [[0]] * 3), tok) == ["7,7", "", "7"], \
        "responses: each row's response tokens only (mask 1), without the eos"
    res = evaluate(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), None, [[i] for i in range(3)], ["p"] * 3, tok, samples=1,
                   batch=3, max_new_tokens=4, temperature=1.0, seed=0, ctx=contextlib.nullcontext(), builtin=True)
    got = [res["gold"], res["sft_gold"], res["gold_win_rate"]]
    assert torch.allclose(torch.tensor(got), torch.tensor([(2 + 0 + 1) / 3, 0.0, (1 + 0.5 + 1) / 3])), \
        f"evaluate's (gold, sft_gold, gold_win_rate) {got}: the gold of each side's own responses, the policy's wins"
