"""reward.py: the Bradley-Terry loss by hand, K-way pairs, and where the reward is read."""
import math
from types import SimpleNamespace

import torch

import data
from gpt import GPT, GPTConfig
from data import last_index
from reward import evaluate as reward_evaluate
from reward import (RewardModel, batch_loss, centring_prompts, encode_groups, group_batch, normalize, pair_rewards,
                    preference_loss)
from checks import assert_close, call


def log_eps_mistakes(d, eps=(1e-6, 1e-7, 1e-8, 1e-10, 1e-12)):
    """-log(sigmoid(d) + eps) for the usual eps: off by ~eps / sigmoid(d), and capped at -log(eps) far below 0."""
    return [(f"an eps in the log (sigmoid(d) + eps, or sigmoid clamped at eps = {e:g}): logsigmoid is exact and needs "
             f"none; -log sigmoid(d) reaches -d where the eps stops it at -log(eps)", -torch.log(torch.sigmoid(d) + e).mean())
            for e in eps]


def test_preference_loss_matches_hand_computed():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.5, 1.0])
    nll = [math.log(1 + math.exp(-d)) for d in (2.0, -0.5, -2.0)]  # -log sigmoid(d) = log(1 + exp(-d))
    mistakes = [("the difference reversed: it is r_chosen - r_rejected",
                 sum(math.log(1 + math.exp(d)) for d in (2, -0.5, -2)) / 3),
                ("a sum over pairs, not the mean", sum(nll)), ("the minus sign missing: -log sigmoid", -sum(nll) / 3),
                ("log sigmoid of the mean difference: the mean is over the pairs' losses", math.log(1 + math.exp(1 / 6))),
                *log_eps_mistakes(rc - rr, (1e-6,))]  # a smaller eps is within the tolerance here
    assert_close("preference_loss", call("preference_loss", preference_loss, rc, rr), torch.tensor(sum(nll) / 3), 1e-6, mistakes,
                 "the mean over pairs of -log sigmoid(r_chosen - r_rejected)")


def test_preference_loss_float64():
    rc, rr = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64), torch.tensor([0.1, 0.4, -0.5], dtype=torch.float64)
    want = sum(math.log(1 + math.exp(-d)) for d in (0.2, -1.6, 3.0)) / 3
    assert_close("preference_loss on float64 rewards", preference_loss(rc, rr), torch.tensor(want, dtype=torch.float64),
                 1e-12, log_eps_mistakes(rc - rr), hint="computed in the rewards' dtype")


def test_preference_loss_direction():
    # the chosen response far ahead -> loss near 0; far behind -> loss near the gap
    assert_close("preference_loss, chosen ahead by 10", preference_loss(torch.tensor([10.0]), torch.tensor([0.0])),
                 torch.tensor(math.log(1 + math.exp(-10))), 1e-6, hint="near 0 when the chosen response wins clearly")
    assert_close("preference_loss, chosen behind by 10", preference_loss(torch.tensor([0.0]), torch.tensor([10.0])),
                 torch.tensor(10.0), 1e-3, hint="near the gap when the chosen response loses clearly")


def test_preference_loss_stable_for_large_differences():
    got = preference_loss(torch.tensor([0.0, 0.0]), torch.tensor([1000.0, -1000.0]))
    assert_close("preference_loss at differences +-1000", got, torch.tensor(500.0), 1e-3,
                 log_eps_mistakes(torch.tensor([-1000.0, 1000.0])),
                 hint="-log sigmoid(-1000) = 1000: logsigmoid computes it without sigmoid's underflow to 0")


def test_group_batch_scores_each_response_once_and_lists_k_way_pairs():
    ex = lambda n: ([1, 2], [3] * n + [0])
    groups = [[ex(1), ex(2), ex(3), ex(4)], [ex(2), ex(1)]]  # K=4 then K=2
    b, ci, ri = group_batch(groups, [0, 1], pad_id=0)
    assert b["tokens"].shape == (6, 7)  # each response scored once
    assert list(zip(ci.tolist(), ri.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (4, 5)]


def test_batch_loss_one_mean_over_all_k_way_pairs():
    """The loss reward.py's main trains with (batch_loss): one mean over all K(K-1)/2 pairs of every
    group of the global batch, whatever the groups' sizes and however the processes share them."""
    ex = lambda n: ([1, 2], [3] * n + [0])
    b, ci, ri = group_batch([[ex(1), ex(2), ex(3), ex(4)], [ex(2), ex(1)]], [0, 1], pad_id=0)  # 6 + 1 pairs
    r = torch.tensor([3.0, 1.0, 0.5, -2.0, 0.2, 0.1])
    nll = [math.log(1 + math.exp(-(r[i] - r[j]).item())) for i, j in zip(ci.tolist(), ri.tolist())]
    want = sum(nll) / 7
    mistakes = [("a second division, by the 2 prompts of the batch", want / 2),
                ("a second division, by the 7 pairs", want / 7), ("a sum over the pairs, not the mean", want * 7),
                ("a mean of each group's mean: the K=2 group's one pair weighs as much as the K=4 group's six",
                 (sum(nll[:6]) / 6 + nll[6]) / 2)]
    got = batch_loss(r[ci], r[ri], torch.tensor(7), world=1)
    assert_close("batch_loss, one process", got, torch.tensor(want), 1e-6, mistakes, "the mean over all 7 pairs")
    # two processes, one group each: DDP averages their gradients, so their losses' mean is what trains
    two = (batch_loss(r[ci[:6]], r[ri[:6]], torch.tensor(7), world=2) + batch_loss(r[ci[6:]], r[ri[6:]], torch.tensor(7), world=2)) / 2
    assert_close("batch_loss, the mean over 2 processes of 6 and 1 pairs", two, torch.tensor(want), 1e-6,
                 mistakes[:1] + mistakes[2:], "each process's mean weighed by its share of the pairs, times world")


def test_pair_rewards_read_at_each_rows_eos_under_right_padding():
    """pair_rewards scores a right-padded batch of responses of different lengths (padded with the
    eos, as reward.py pads): each row's reward is its value at its own <|endoftext|>, the same as the
    sequence scored alone, not the last column's (padding after a shorter response)."""
    torch.manual_seed(0)
    rm, eos = RewardModel(GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16))).eval(), 10
    ex = lambda p, r: (p, r + [eos])
    groups = [[ex([1, 2], [3]), ex([1, 2], [4, 5, 6, 7]), ex([1, 2], [8, 9])], [ex([5], [6, 7, 8, 9, 1, 2]), ex([5], [3])]]
    b, ci, ri = group_batch(groups, [0, 1], pad_id=eos)
    seqs = [p + r for g in groups for p, r in g]
    with torch.no_grad():
        rc, rr = pair_rewards(rm, b, ci, ri, "cpu")
        alone = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])  # (N_seq,) each at its eos, unpadded
        full = rm(b["tokens"])  # (N_seq, T)
    last = last_index(b["attn_mask"])
    assert [seqs[i][-1] for i in range(len(seqs))] == [eos] * 5 and b["tokens"].shape == (5, 8)
    pick = lambda per_seq: torch.stack([per_seq[ci], per_seq[ri]])  # (2, N_pairs) as (chosen, rejected)
    mistakes = [("read at the last column, padding after a shorter response, not at each row's <|endoftext|>",
                 pick(full[:, -1])), ("read one token before each row's <|endoftext|>",
                                       pick(full.gather(1, (last - 1)[:, None]).squeeze(1)))]
    assert_close("pair_rewards (chosen; rejected)", torch.stack([rc, rr]), pick(alone), 1e-5, mistakes,
                 "each row's reward is its value at its last real token, data.last_index(attn_mask)")


def test_normalize_centres_the_sft_samples_scores_at_0():
    """normalize shifts the head's bias so that the samples it drew score 0 on average after it: the
    batches it scores are recorded and scored again afterwards. It returns the mean it subtracted
    (main prints it as the shift); the shift moves every score alike."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16)
    policy, rm = GPT(config).eval(), RewardModel(GPT(config)).eval()
    with torch.no_grad():
        rm.head.bias.fill_(2.0)  # far from centred: a no-op or a wrong sign cannot pass for a shift
    tok = SimpleNamespace(encode=lambda text: [1 + ord(c) % 9 for c in text], eot=10)
    cfg = SimpleNamespace(seed=0, norm_samples=8, batch_size=3, max_prompt_len=4, max_len=10)
    seen = []

    def score(tokens, mask):
        r = RewardModel.score(rm, tokens, mask)
        seen.append((tokens, mask, r))
        return r
    rm.score = score  # records what normalize scores
    shift = normalize(rm, policy, ["ab", "cde", "f", "ghij", "kl"], tok, cfg, "cpu")
    with torch.no_grad():
        before = torch.cat([r for _, _, r in seen])  # (N,)
        after = torch.cat([RewardModel.score(rm, t, m) for t, m, _ in seen])  # (N,)
    assert len(before) == 10, f"8 samples of 5 prompts: two passes, 10 samples; scored {len(before)}"
    assert before.mean() > 1, f"the samples' mean score before, {before.mean():.4f}, is too close to 0 to test a shift"
    assert_close("the mean score of normalize's samples after it", after.mean().double(), 0.0, 1e-5,
                 [("the mean not subtracted from the head's bias", before.mean()),
                  ("the mean added to the bias, not subtracted", 2 * before.mean())],
                 "rm.head.bias minus the samples' mean score")
    assert abs(shift - before.mean().item()) < 1e-5, f"normalize returned {shift}, not the mean it subtracted {before.mean():.6f}"
    assert torch.allclose(after, before - before.mean(), atol=1e-5), "only the bias moves: every score by the same amount"


def test_last_index_left_and_right_padding():
    m = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert last_index(m).tolist() == [2, 4, 3, 4]


def test_reward_model_score_same_left_or_right_padded():
    torch.manual_seed(0)
    rm = RewardModel(GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16))).eval()
    seqs = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 2, 3]]
    right = data.pad_right([(s[:1], s[1:]) for s in seqs], 0)
    left_tokens, left_mask = data.pad_left(seqs, 0)
    with torch.no_grad():
        a = rm.score(right["tokens"], right["attn_mask"], left_padded=False)
        b = rm.score(left_tokens, left_mask)
        c = rm.score(right["tokens"], right["attn_mask"], left_padded=False, first=2)  # every row ends at 2 or later
        alone = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    assert torch.allclose(c, alone, atol=1e-5), "score(first=k) reads the same last tokens"
    assert torch.allclose(a, alone, atol=1e-5) and torch.allclose(b, alone, atol=1e-5), \
        "the reward must be read at each row's last real token, with positions restarted after left padding"


def test_reward_model_head_follows_its_trunk():
    """RewardModel(gpt) puts its head on the trunk's device (a head left on the CPU beside a GPU trunk
    stopped the first score on a GPU). The meta device stands in for a GPU."""
    on_meta = RewardModel(GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16)).to("meta"))
    assert on_meta.head.weight.device.type == "meta" and on_meta.head.bias.device.type == "meta", \
        "the head stayed on the CPU: create it, then move it to the trunk's device"


def test_centring_prompts_count_every_prompt_alike():
    """The reward model is centred on the SFT policy's samples over the prompts PPO trains on: a
    prefix of the prompt file cycled to n samples would count some prompts (the built-in task's file
    is sorted by count) more than others."""
    prompts = [f"count {n} from 0:" for n in range(1, 6)]
    picks = centring_prompts(prompts, 8, seed=0)
    assert sorted(picks) == sorted(prompts * 2), f"8 samples of 5 prompts: two whole passes, each prompt twice; got {picks}"
    few = centring_prompts(prompts, 3, seed=0)
    assert len(few) == len(set(few)) == 3, f"3 samples of 5 prompts: 3 different prompts; got {few}"
    assert centring_prompts(prompts, 3, seed=0) == few, "the same seed, the same prompts"
    assert centring_prompts(prompts * 40, 30, seed=1) != (prompts * 40)[:30], "a seeded subset, not the file's first prompts"



def test_encode_groups_drops_responses_truncation_made_the_same(capsys):
    """Two responses that share their first tokens are the same sequence once cut to max_len: a tie
    labelled a win (its loss stays log 2, it counts as wrong). The later one goes, and a group left
    with one response goes with it; the counts are printed."""
    tok, cfg = data.Tokenizer(), SimpleNamespace(max_len=8, max_prompt_len=4, data="test")
    a, b = " Yes, the sky is blue on a clear day.", " Yes, the sky is blue, but not at night."
    enc, kept = encode_groups([("Is the sky blue?", [a, b]), ("Is it?", [a, " No.", a]), ("Or?", [" No.", a])], tok, cfg, "rm")
    assert kept == [("Is it?", [a, " No."]), ("Or?", [" No.", a])]
    out = capsys.readouterr().out
    assert "rm: 3 responses dropped" in out and "1 of 3 records" in out, out
    assert len(enc) == 2 and enc[0][0] != enc[0][1] and enc[1] == encode_groups([kept[1]], tok, cfg, "rm")[0][0]


def test_evaluate_means_over_pairs_ties_wrong_gold_on_pairs_it_separates():
    """reward.evaluate by hand, with a reward that is the sum of a sequence's tokens: the loss one mean over
    every pair of every batch (a short last batch weighs by its pairs, not as a whole batch), a tie ranked
    wrong (rc > rr, not >=), and gold agreement over the pairs whose gold differs only."""
    class SumOfTokens(torch.nn.Module):
        def forward(self, tokens):
            return tokens.float().cumsum(1)  # (B, T): read at each row's last real token, the sum of the row
    ex = lambda *resp: ([1, 2], list(resp) + [0])  # (prompt, response + eot 0)
    val = [[ex(5), ex(3)], [ex(2), ex(2, 0)], [ex(9), ex(1), ex(4)], [ex(1), ex(7)], [ex(6), ex(6, 1), ex(3)]]
    gold = [[1.0, 0.0], [1.0, 0.5], [0.2, 0.2, 0.1], [0.9, 0.1], [0.0, 1.0, 0.5]]
    r = [[sum(p) + sum(x) for p, x in g] for g in val]  # what SumOfTokens reads
    pairs = [(g, i, j) for g in range(5) for i in range(len(val[g])) for j in range(i + 1, len(val[g]))]
    nll = [math.log1p(math.exp(-(r[g][i] - r[g][j]))) for g, i, j in pairs]
    right = [r[g][i] > r[g][j] for g, i, j in pairs]
    sep = [(rt, gold[g][i] > gold[g][j]) for rt, (g, i, j) in zip(right, pairs) if gold[g][i] != gold[g][j]]
    cfg = SimpleNamespace(batch_size=2, eval_batches=10, seed=0)  # batches of 2, 2 and 1 groups: 4, 2 and 3 pairs
    loss, acc, agree = reward_evaluate(SumOfTokens(), val, gold, cfg, torch.no_grad(), "cpu", 0)
    assert abs(loss - sum(nll) / len(nll)) < 1e-6, f"loss {loss}, want {sum(nll) / len(nll)}: one mean over all pairs"
    assert acc == sum(right) / len(right) == 5 / 9, f"accuracy {acc}, want 5/9: the tie of group 1 counts as wrong"
    assert agree == sum(a == b for a, b in sep) / len(sep), f"gold agreement {agree} over the {len(sep)} pairs gold separates"


def test_normalize_scores_its_samples_with_the_prompts_padding_masked_and_draws_them_with_its_seed():
    """normalize scores each sample with the mask generate saw: 0 on the left padding of the shorter prompts, 1 on
    their tokens and the response's; and draws the samples from a generator seeded by --seed, not torch's global
    stream: two calls with the global stream moved between them score the same tokens."""
    config = GPTConfig(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    policy, rm = GPT(config).eval(), RewardModel(GPT(config)).eval()
    tok = SimpleNamespace(encode=lambda text: [1 + ord(c) % 9 for c in text], eot=10)
    cfg = SimpleNamespace(seed=0, norm_samples=3, batch_size=3, max_prompt_len=4, max_len=10)
    runs = []
    for global_seed in (1, 2):
        seen = []
        rm.score = lambda tokens, mask: seen.append((tokens, mask)) or torch.zeros(len(tokens))
        torch.manual_seed(global_seed)
        normalize(rm, policy, ["ab", "cdef", "g"], tok, cfg, "cpu")
        runs.append(seen)
    (tokens, mask), = runs[0]
    P = 4  # the longest prompt
    prompts = [tok.encode(p) for p in centring_prompts(["ab", "cdef", "g"], 3, 0)]
    assert mask[:, :P].tolist() == data.pad_left(prompts, 10)[1].tolist(), \
        f"normalize scored the prompts with mask {mask[:, :P].tolist()}: their left padding must be 0 (the prompt's mask)"
    assert torch.equal(runs[1][0][0], tokens), "normalize's samples followed torch's global generator: draw them with " \
                                               "its own, seeded by --seed"
