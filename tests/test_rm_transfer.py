"""rm_transfer.py: every loss, metric and advantage against a plain version written with loops in
float64, reward reading under both paddings, a learning run (RM learns a token preference, PPO
raises the RM score), 2-process gloo runs against 1 process, and resume."""
import itertools
import json
import math
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

import rm_transfer as rt
from kernels import fused_logprob, fused_logprob_kl
from conftest import run_torchrun


# ---------------------------------------------------------------- losses
def test_bradley_terry_loss_matches_naive_values_and_grads():
    g = torch.Generator().manual_seed(0)
    rc = (torch.randn(13, generator=g, dtype=torch.float64) * 4).requires_grad_()
    rr = (torch.randn(13, generator=g, dtype=torch.float64) * 4).requires_grad_()
    with torch.no_grad():  # extreme margins must stay finite
        rc[0], rr[0], rc[1], rr[1] = 60.0, -60.0, -60.0, 60.0
    rt.bradley_terry_loss(rc, rr).sum().backward()
    got = (rc.grad.clone(), rr.grad.clone())
    for i in range(13):
        d = rc[i].item() - rr[i].item()
        naive = math.log1p(math.exp(-d)) if d > -30 else -d + math.log1p(math.exp(d))  # -log sigmoid(d)
        assert rt.bradley_terry_loss(rc[i:i + 1], rr[i:i + 1]).item() == pytest.approx(naive, rel=1e-10, abs=1e-12)
        dl_dd = -1.0 / (1.0 + math.exp(d))  # d/dd -log sigmoid(d) = -(1 - sigmoid(d))
        assert got[0][i].item() == pytest.approx(dl_dd, rel=1e-9, abs=1e-12)
        assert got[1][i].item() == pytest.approx(-dl_dd, rel=1e-9, abs=1e-12)


def test_pointwise_bce_matches_naive_values_and_grads():
    g = torch.Generator().manual_seed(1)
    r = (torch.randn(11, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0])
    rt.pointwise_bce_loss(r, labels).sum().backward()
    for i in range(11):
        p = 1.0 / (1.0 + math.exp(-r[i].item()))
        naive = -(labels[i].item() * math.log(p) + (1 - labels[i].item()) * math.log(1 - p))
        assert rt.pointwise_bce_loss(r[i:i + 1], labels[i:i + 1]).item() == pytest.approx(naive, rel=1e-10)
        assert r.grad[i].item() == pytest.approx(p - labels[i].item(), rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------- accuracy and baselines
def test_pair_accuracy_counts_ties_as_half():
    better = torch.tensor([1.0, 2.0, 0.5, 3.0])
    worse = torch.tensor([0.0, 2.0, 0.7, -1.0])
    assert rt.pair_accuracy(better, worse) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_pointwise_accuracy_classifies_each_response_alone_at_sigmoid_one_half():
    r = torch.tensor([0.3, -0.2, 0.0, 2.0, -3.0])
    labels = torch.tensor([1, 0, 0, 0, 1])  # r > 0 predicts good: 1, 0, 0, 1, 0 -> right on the first three
    assert rt.classification_accuracy(r, labels) == pytest.approx(3 / 5)


def test_pointwise_majority_baseline_is_the_majority_label_of_the_training_split():
    assert rt.fit_majority_label([1, 0, 1, 1, 0]) == 1
    assert rt.fit_majority_label([0, 0, 1]) == 0
    assert rt.fit_majority_label([0, 1]) == 1  # a tie goes to "good"


def test_pointwise_length_baseline_fits_direction_and_threshold_by_hand():
    # shorter is good in training: s = +1 reaches 2/4 at best (always or never good); s = -1 with
    # -len > t for t in (-10, -5) is perfect; candidates -13, -11, -7.5, -4, -3 -> the first perfect is -7.5
    lengths, labels = [3, 5, 10, 12], [1, 1, 0, 0]
    assert rt.fit_length_threshold(lengths, labels) == (-1, -7.5)  # good iff len < 7.5
    assert rt.length_threshold_accuracy(lengths, labels, -1, -7.5) == 1.0
    # validation: len 4, 8, 7, 20 with labels 1, 1, 1, 0; "len < 7.5" predicts 1, 0, 1, 0 -> 3 of 4
    assert rt.length_threshold_accuracy([4, 8, 7, 20], [1, 1, 1, 0], -1, -7.5) == 0.75
    # longer is good: 5, 6 bad; 9, 9, 11 good -> s = +1, midpoint t = 7.5
    assert rt.fit_length_threshold([9, 5, 11, 6, 9], [1, 0, 1, 0, 1]) == (1, 7.5)


def test_pointwise_length_threshold_matches_brute_force_search():
    rng = random.Random(3)
    lengths = [rng.randint(1, 30) for _ in range(50)]
    labels = [int(n > 12) if rng.random() < 0.7 else rng.randint(0, 1) for n in lengths]
    s, t = rt.fit_length_threshold(lengths, labels)
    naive = max(sum((d * n > x / 2) == bool(lab) for n, lab in zip(lengths, labels)) / 50
                for d in (1, -1) for x in range(-80, 80))
    assert rt.length_threshold_accuracy(lengths, labels, s, t) == pytest.approx(naive)


def test_pairwise_length_baseline_is_always_longer_or_always_shorter():
    # (len(chosen), len(rejected)); longer is right on rows 1, 4, shorter on row 2, row 3 ties (1/2 each)
    train = [(5, 3), (2, 7), (4, 4), (9, 1)]
    assert rt.longer_or_shorter_accuracy(train, 1) == pytest.approx(2.5 / 4)
    assert rt.longer_or_shorter_accuracy(train, -1) == pytest.approx(1.5 / 4)
    assert rt.fit_longer_or_shorter(train) == 1
    assert rt.fit_longer_or_shorter([(1, 5), (2, 3), (8, 8)]) == -1
    assert rt.fit_longer_or_shorter([(1, 5), (6, 3)]) == 1  # a tie goes to "longer"


def test_pointwise_rows_become_all_good_bad_index_pairs_per_prompt():
    items = [("p", "g1", 1), ("p", "b1", 0), ("p", "g2", 1), ("q", "g", 1), ("r", "b", 0), ("r", "b2", 0)]
    assert sorted(rt.ranking_pairs(items)) == [(0, 1), (2, 1)]


# ---------------------------------------------------------------- reward at the last real token
def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert rt.last_token_index(right).tolist() == [2, 4, 0]
    assert rt.last_token_index(left).tolist() == [4, 4, 4]


@pytest.mark.parametrize("pad_id", [0, 2])  # 2 = eos: pad == eos as in SmolLM2
def test_reward_is_read_at_last_real_token_with_left_and_right_padding(tiny_rm_dir, tiny_tokenizer, pad_id):
    scorer = rt.load_scorer(str(tiny_rm_dir), tiny_tokenizer, torch.device("cpu")).eval()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() + [2] for n in (4, 9, 1, 6)]  # each ends in eos
    with torch.no_grad():
        alone = [scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1].item() for s in seqs]
        for side in ("left", "right"):
            ids, mask = rt.pad(seqs, pad_id, side, length=12)
            per_tok = scorer(ids, mask)
            got = rt.read_last(per_tok, mask)
            for i, s in enumerate(seqs):
                last = 11 if side == "left" else len(s) - 1
                assert got[i].item() == pytest.approx(per_tok[i, last].item(), abs=0)
                assert got[i].item() == pytest.approx(alone[i], abs=1e-4), (side, i)


# ---------------------------------------------------------------- PPO pieces
def naive_gae(rewards, values, lengths, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        nxt_adv = 0.0
        for t in range(lengths[b] - 1, -1, -1):
            next_v = values[b][t + 1] if t + 1 < lengths[b] else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            nxt_adv = delta + gamma * lam * nxt_adv
            adv[b][t] = nxt_adv
    ret = [[adv[b][t] + values[b][t] if t < lengths[b] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_naive_backward_loop_with_varying_lengths(gamma, lam):
    g = torch.Generator().manual_seed(7)
    lengths = [7, 1, 0, 4, 7]
    B, T = len(lengths), 7
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = rt.gae(rewards, values, mask, gamma, lam)
    n_adv, n_ret = naive_gae(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, torch.tensor(n_adv, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(n_ret, dtype=torch.float64), atol=1e-12)


def test_masked_whiten_matches_naive_and_ignores_padding():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    vals = [x[b, t].item() for b in range(3) for t in range(5) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    out, scale = rt.masked_whiten(x, mask, eps=0.0)
    assert scale == pytest.approx(1 / math.sqrt(var), rel=1e-12)
    for b in range(3):
        for t in range(5):
            want = (x[b, t].item() - mean) / math.sqrt(var) if mask[b, t] else 0.0
            assert out[b, t].item() == pytest.approx(want, abs=1e-12)


def test_ppo_policy_loss_matches_naive_loop_values_and_grads():
    g = torch.Generator().manual_seed(9)
    B, T, eps = 4, 6, 0.2
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    loss, clipped = rt.ppo_policy_loss(logp, old, adv, mask, eps)
    loss.backward()
    naive, n_clip = torch.zeros((), dtype=torch.float64), 0
    lp2 = logp.detach().clone().requires_grad_()
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            ratio = torch.exp(lp2[b, t] - old[b, t])
            unclipped = -adv[b, t] * ratio
            clipped_ratio = min(max(ratio.item(), 1 - eps), 1 + eps)
            # the clipped branch is a constant when the ratio is outside [1-eps, 1+eps]
            clipped_term = -adv[b, t] * (ratio if 1 - eps <= ratio.item() <= 1 + eps else clipped_ratio)
            naive = naive + (unclipped if unclipped.item() >= float(clipped_term.detach()) else clipped_term)
            n_clip += abs(ratio.item() - 1) > eps
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-12)
    assert clipped.item() == n_clip
    assert torch.allclose(logp.grad, lp2.grad, atol=1e-12)


def chain_paths(V, T, eos):
    """Every response of a chain with vocabulary range(V): it stops at eos or after T tokens."""
    return [y for n in range(1, T + 1) for y in itertools.product(range(V), repeat=n)
            if eos not in y[:-1] and (y[-1] == eos or n == T)]


@pytest.mark.parametrize("estimator", ["full", "k1"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_expected_policy_gradient_equals_exact_gradient_of_kl_regularised_objective(estimator, temperature):
    """A tabular policy (one row of logits per prefix, vocabulary 3, token 2 = eos, at most 3 tokens:
    15 responses). Exact, by enumeration in float64:
        grad J,  J = sum_y pi(y) r(y) - beta sum_y pi(y) log(pi(y) / pi_ref(y))   (sequence-level KL)
    against the exact expectation over the same 15 responses of the gradient of the script's policy
    loss, built with the script's functions: kernels' logp/KL, kl_rewards (3), gae (4) with
    gamma = lambda = 1 and V = 0 (so A_t = the return from t, an unbiased weight), no whitening,
    ppo_policy_loss (5) + (7) at the first minibatch (old log-probs = current ones, rho = 1).
    `full` passes only with the differentiable KL term (7); without it the gradient is far off."""
    V, T, eos, beta = 3, 3, 2, 0.5
    paths = chain_paths(V, T, eos)
    prefixes = sorted({y[:t] for y in paths for t in range(len(y))})
    row = {p: i for i, p in enumerate(prefixes)}
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(len(prefixes), V, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.randn(len(prefixes), V, generator=g, dtype=torch.float64)
    r = torch.randn(len(paths), generator=g, dtype=torch.float64)

    def seq_logprob(table, y):  # naive: product of per-prefix softmaxes
        return sum(torch.log_softmax(table[row[y[:t]]] / temperature, -1)[y[t]] for t in range(len(y)))

    logp_seq = torch.stack([seq_logprob(theta, y) for y in paths])
    logq_seq = torch.stack([seq_logprob(ref, y) for y in paths])
    prob = logp_seq.exp()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    J = (prob * r).sum() - beta * (prob * (logp_seq - logq_seq)).sum()
    (grad_J,) = torch.autograd.grad(J, theta)

    def expected_loss_grad(with_kl_term):
        B = len(paths)
        rows, ids, mask = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.float64)
        for i, y in enumerate(paths):
            for t in range(len(y)):
                rows[i, t], ids[i, t], mask[i, t] = row[y[:t]], y[t], 1.0
        lg, ref_lg = theta[rows], ref[rows]  # padded positions hold prefix ()'s logits, masked out
        o = fused_logprob_kl(lg, ref_lg, ids, temperature=temperature)
        kl = o.kl if estimator == "full" else o.logp - fused_logprob(ref_lg, ids, temperature=temperature)
        rewards = rt.kl_rewards(kl.detach() * mask, r, mask, beta)
        adv, _ = rt.gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0)
        kl_theta = o.kl if estimator == "full" and with_kl_term else None
        total = torch.zeros((), dtype=torch.float64)
        for i in range(B):
            kl_term = (kl_theta[i:i + 1], beta) if kl_theta is not None else ()  # k1: the loss as it always was
            loss, clipped = rt.ppo_policy_loss(o.logp[i:i + 1], o.logp[i:i + 1].detach(), adv[i:i + 1], mask[i:i + 1],
                                               0.2, *kl_term)
            assert clipped.item() == 0
            total = total + prob[i].detach() * loss
        return torch.autograd.grad(total, theta)[0]

    got = -expected_loss_grad(with_kl_term=True)
    assert torch.allclose(got, grad_J, rtol=1e-9, atol=1e-12), (got - grad_J).abs().max()
    if estimator == "full":  # the KL inside the reward alone misses the direct part of the gradient
        without = -expected_loss_grad(with_kl_term=False)
        assert (without - grad_J).norm() > 0.1 * grad_J.norm()


def test_kl_term_of_policy_loss_is_beta_s_times_summed_kl():
    g = torch.Generator().manual_seed(12)
    logp = torch.randn(2, 4, generator=g, dtype=torch.float64)
    kl = torch.rand(2, 4, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    adv = torch.randn(2, 4, generator=g, dtype=torch.float64)
    base, _ = rt.ppo_policy_loss(logp, logp, adv, mask, 0.2)
    with_kl, _ = rt.ppo_policy_loss(logp, logp, adv, mask, 0.2, kl, 0.3)
    naive = sum(0.3 * kl[b, t].item() for b in range(2) for t in range(4) if mask[b, t])
    assert (with_kl - base).item() == pytest.approx(naive, rel=1e-12)
    with_kl.backward()
    assert torch.equal(kl.grad, 0.3 * mask)


def test_ppo_value_loss_matches_naive_loop_values_and_grads():
    g = torch.Generator().manual_seed(10)
    B, T, c = 3, 5, 0.2
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ret = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.25).double()
    rt.ppo_value_loss(v, old, ret, mask, c).backward()
    v2 = v.detach().clone().requires_grad_()
    naive = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                d = v2[b, t] - old[b, t]
                vc = old[b, t] + (d if -c <= d.item() <= c else torch.tensor(math.copysign(c, d.item()), dtype=torch.float64))
                naive = naive + 0.5 * max((v2[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2, key=lambda z: z.item())
    naive.backward()
    assert rt.ppo_value_loss(v, old, ret, mask, c).item() == pytest.approx(naive.item(), rel=1e-12)
    assert torch.allclose(v.grad, v2.grad, atol=1e-12)


def test_kl_reward_has_penalty_on_every_token_and_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0]])
    r = rt.kl_rewards(kl, torch.tensor([2.0, -1.0]), mask, beta=0.1)
    want = torch.tensor([[-0.01, -0.02, -0.03 + 2.0, 0.0], [-0.05 - 1.0, 0, 0, 0]])
    assert torch.allclose(r, want, atol=1e-7)


# ---------------------------------------------------------------- runs
def letter_pref_data(tmp, n, seed, name):
    """Synthetic preference: the chosen response is made of letters a-m, the rejected one of n-z
    (single byte tokens). A random tiny policy samples both kinds often, so PPO gets a dense signal."""
    rng = random.Random(seed)
    path = tmp / f"{name}.jsonl"
    with open(path, "w") as f:
        for _ in range(n):
            good = "".join(rng.choice("abcdefghijklm") for _ in range(rng.randint(2, 8)))
            bad = "".join(rng.choice("nopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
            f.write(json.dumps({"prompt": rng.choice(["Hva er hovedstaden i Norge?", "What is the capital?"]),
                                "chosen": good, "rejected": bad}) + "\n")
    return path


def metrics(d):
    return [json.loads(x) for x in open(d / "metrics.jsonl")]


def test_rm_learns_letter_preference_then_ppo_raises_rm_score(tmp_path, tiny_lm_dir):
    train = letter_pref_data(tmp_path, 64, 0, "train")
    val = letter_pref_data(tmp_path, 32, 1, "val")
    rt.main(["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(train), "--eval-data", str(val),
             "--steps", "24", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--output-dir", str(tmp_path / "rm")])
    m = metrics(tmp_path / "rm")
    assert m[-1]["eval_acc/val"] >= 0.9, m[-1]
    table = rt.main(["eval-rm", "--reward-model", str(tmp_path / "rm" / "final"), "--eval-data", str(val),
                     "--train-data", str(train), "--output-dir", str(tmp_path / "ev")])
    assert table[next(iter(table))]["val"] >= 0.9
    assert table["majority label (train split)"]["val"] is None  # §6.1: no majority baseline for a pairwise task
    lens = [(len(r["chosen"]), len(r["rejected"])) for r in map(json.loads, open(val))]
    longer = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in lens) / len(lens)
    assert table["length (train split)"]["val"] in (pytest.approx(longer), pytest.approx(1 - longer))
    assert (tmp_path / "ev" / "accuracy.md").exists()

    rt.main(["rl", "--model", str(tiny_lm_dir), "--reward-model", str(tmp_path / "rm" / "final"),
             "--prompts", str(train), "--steps", "16", "--rollout-batch-size", "16", "--minibatch-size", "8",
             "--ppo-epochs", "2", "--max-new-tokens", "6", "--lr", "3e-3", "--warmup-steps", "1",
             "--value-warmup-steps", "1", "--beta", "0.01", "--output-dir", str(tmp_path / "rl")])
    m = metrics(tmp_path / "rl")
    first = sum(x["reward_mean"] for x in m[:3]) / 3
    last = sum(x["reward_mean"] for x in m[-3:]) / 3
    assert last > first + 0.5, [round(x["reward_mean"], 3) for x in m]
    assert m[0]["policy_updated"] == 0 and m[1]["policy_updated"] == 1
    assert m[0]["loss"] is None and m[0]["clipfrac"] is None and m[0]["lr"] is None  # no policy step: null, not 0.0
    assert m[-1]["kl"] > 0


def test_pointwise_rm_learns_letter_preference_from_labels(tmp_path, tiny_lm_dir):
    pairs = [json.loads(x) for x in open(letter_pref_data(tmp_path, 64, 4, "pairs"))]
    point = tmp_path / "point.jsonl"
    with open(point, "w") as f:
        for i, r in enumerate(pairs):  # one labelled response per row, alternating good and bad
            f.write(json.dumps({"prompt": r["prompt"], "response": r["chosen" if i % 2 else "rejected"],
                                "label": i % 2}) + "\n")
    val = letter_pref_data(tmp_path, 32, 5, "val")
    rt.main(["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(point), "--eval-data", str(val),
             "--steps", "24", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--output-dir", str(tmp_path / "rm")])
    m = metrics(tmp_path / "rm")
    assert m[-1]["eval_acc/val"] >= 0.9 and m[-1]["train_acc"] >= 0.9, m[-1]


def tiny_rm_from_lm(tmp_path, tiny_lm_dir):
    data = letter_pref_data(tmp_path, 16, 2, "d")
    rt.main(["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(data), "--steps", "1", "--batch-size", "8",
             "--lr", "1e-3", "--output-dir", str(tmp_path / "rm0")])
    return data, tmp_path / "rm0" / "final"


def test_two_process_gloo_matches_one_process(tmp_path, tiny_lm_dir, cpu_only):
    data, rm = tiny_rm_from_lm(tmp_path, tiny_lm_dir)
    common_rm = ["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(data), "--steps", "2", "--batch-size", "8",
                 "--lr", "1e-3", "--warmup-steps", "1", "--dropout", "0"]  # dropout masks depend on the process count
    common_rl = ["rl", "--model", str(tiny_lm_dir), "--reward-model", str(rm), "--prompts", str(data), "--steps", "2",
                 "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "2", "--max-new-tokens", "5",
                 "--lr", "1e-3", "--value-warmup-steps", "1", "--warmup-steps", "1"]
    rt.main(common_rm + ["--output-dir", str(tmp_path / "rm1")])
    rt.main(common_rl + ["--output-dir", str(tmp_path / "rl1")])
    run_torchrun("rm_transfer.py", common_rm + ["--output-dir", tmp_path / "rm2"])
    run_torchrun("rm_transfer.py", common_rl + ["--output-dir", tmp_path / "rl2"])
    for one, two in [("rm1/final", "rm2/final"), ("rl1/checkpoint-2", "rl2/checkpoint-2"),
                     ("rl1/checkpoint-2/value", "rl2/checkpoint-2/value")]:
        w1, w2 = load_file(tmp_path / one / "model.safetensors"), load_file(tmp_path / two / "model.safetensors")
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=2e-5), (one, k, (w1[k] - w2[k]).abs().max())
    w0, w1 = load_file(tiny_lm_dir / "model.safetensors"), load_file(tmp_path / "rl1/checkpoint-2/model.safetensors")
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) > 1e-4  # the policy did move
    for a, b in zip(metrics(tmp_path / "rl1"), metrics(tmp_path / "rl2")):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-4)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)


@pytest.mark.parametrize("estimator", ["full", "k1"])
def test_ppo_ratio_is_one_when_the_policy_does_not_move_even_with_dropout_in_the_config(tmp_path, tiny_tokenizer, estimator):
    """The backbone's config asks for attention dropout 0.5 and the learning rate is negligible: the
    log-probs recomputed in the PPO minibatches (global padding) must equal the rollout's, so dropout
    must be off in `rl`; then no token is clipped and the whitened-advantage loss plus the KL term (KL = 0
    as policy = reference) is 0."""
    from conftest import make_tiny_llama
    lm = tmp_path / "lm-dropout"
    make_tiny_llama(len(tiny_tokenizer), attention_dropout=0.5).save_pretrained(lm)
    tiny_tokenizer.save_pretrained(lm)
    data, rm = tiny_rm_from_lm(tmp_path, lm)
    rt.main(["rl", "--model", str(lm), "--reward-model", str(rm), "--prompts", str(data), "--steps", "2",
             "--rollout-batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8",
             "--lr", "1e-12", "--value-warmup-steps", "0", "--kl-estimator", estimator, "--output-dir", str(tmp_path / "rl")])
    for m in metrics(tmp_path / "rl"):
        assert m["clipfrac"] == 0 and abs(m["loss"]) < 1e-5, m


def test_missing_eos_penalty_is_subtracted_only_from_responses_without_eos():
    eos = 2
    r_ids = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 6, 7, 2]])  # pad = eos in row 1
    r_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    score = torch.tensor([1.0, 1.0, -0.5, 0.25])
    assert rt.penalise_missing_eos(score, r_ids, r_mask, eos, 2.0).tolist() == [1.0, -1.0, -0.5, 0.25]
    assert torch.equal(rt.penalise_missing_eos(score, r_ids, r_mask, eos, None), score)
    cut = torch.tensor([[5, 6, 7, 2]])  # an eos outside the mask (padding) does not count
    assert rt.penalise_missing_eos(torch.tensor([0.0]), cut, torch.tensor([[1, 1, 1, 0]]), eos, 1.5).item() == -1.5


def test_rl_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, tiny_lm_dir):
    data, rm = tiny_rm_from_lm(tmp_path, tiny_lm_dir)
    common = ["rl", "--model", str(tiny_lm_dir), "--reward-model", str(rm), "--prompts", str(data),
              "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "5",
              "--lr", "1e-3", "--value-warmup-steps", "1", "--warmup-steps", "2", "--save-every", "2",
              "--kl-estimator", "k1"]
    rt.main(common + ["--steps", "3", "--output-dir", str(tmp_path / "full")])
    # a run that crashed after logging step 3 but before its checkpoint: resume from checkpoint-2
    rt.main(common + ["--steps", "3", "--output-dir", str(tmp_path / "part")])
    shutil.rmtree(tmp_path / "part" / "checkpoint-3")
    before = metrics(tmp_path / "part")
    rt.main(common + ["--steps", "3", "--resume", "--output-dir", str(tmp_path / "part")])
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert part[:2] == before[:2]  # kept as logged (timings included): steps 1-2 were not re-run
    assert [x["step"] for x in part] == [1, 2, 3]
    for a, b in zip(full, part):
        for k in a:
            if k != "tokens_per_s":
                assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)


def flipped_pref_data(tmp, n, seed, name):
    """letter_pref_data with chosen and rejected swapped: an RM trained on it gets worse on letter_pref_data."""
    path = tmp / f"{name}-flipped.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                            for r in map(json.loads, open(letter_pref_data(tmp, n, seed, name)))))
    return path


def test_train_rm_resume_gives_the_same_metrics_best_step_and_weights(tmp_path, tiny_lm_dir):
    """A run killed after step 3 wrote its log line and the best model so far (best-<k>/), before checkpoint-3:
    --resume goes on from checkpoint-2 with that best model, and ends as the uninterrupted run (metrics,
    best step, final/). The validation loss rises as the RM learns, so the best step comes early."""
    common = ["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(flipped_pref_data(tmp_path, 24, 6, "d")),
              "--eval-data", str(letter_pref_data(tmp_path, 16, 8, "val")), "--eval-every", "1", "--batch-size", "8",
              "--lr", "3e-3", "--warmup-steps", "1", "--save-every", "2"]
    rt.main(common + ["--steps", "5", "--output-dir", str(tmp_path / "full")])
    rt.main(common + ["--steps", "3", "--output-dir", str(tmp_path / "part")])
    part = tmp_path / "part"
    shutil.rmtree(part / "checkpoint-3")
    best = json.loads((part / "final" / "config.json").read_text())["rm_transfer"]["step"]
    (part / "final").rename(part / f"best-{best}")  # final/ is renamed from best-<k>/ only at the very end
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    rt.main(common + ["--steps", "5", "--resume", "--output-dir", str(part)])
    full, resumed = metrics(tmp_path / "full"), metrics(part)
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5] and full[-1]["best_step"] == best <= 3
    for a, b in zip(full, resumed):
        for k in a:
            if k != "tokens_per_s":
                assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)
    w1, w2 = load_file(tmp_path / "full/final/model.safetensors"), load_file(part / "final/model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not list(part.glob("best-*")) and sorted(p.name for p in part.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]


def test_row_without_field_gets_one_line_error_naming_file_row_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(SystemExit, match=r'--train-data .*bad.jsonl line 2 has no field "rejected"; pass --rejected-field'):
        rt.parse_prefs(rt.load_rows(str(bad), "train", "--train-data"), str(bad), "--train-data", rt.Args())


# ---------------------------------------------------------------- App. B: dropout and checkpoint selection
def test_dropout_flag_sets_every_dropout_field_of_the_config():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    cfg = LlamaConfig()
    assert rt.set_dropout(cfg, 0.1) == ["attention_dropout"] and cfg.attention_dropout == 0.1
    cfg = GPT2Config()
    assert set(rt.set_dropout(cfg, 0.1)) >= {"attn_pdrop", "embd_pdrop", "resid_pdrop"}
    assert cfg.attn_pdrop == cfg.embd_pdrop == cfg.resid_pdrop == 0.1
    cfg = BertConfig()
    assert {"hidden_dropout_prob", "attention_probs_dropout_prob"} <= set(rt.set_dropout(cfg, 0.2))
    assert cfg.hidden_dropout_prob == 0.2


def test_final_rm_is_the_step_with_the_lowest_validation_loss(tmp_path, tiny_lm_dir):
    """Training prefers letters n-z, validation a-m: the validation loss rises as the RM learns, so the
    lowest one comes early and final/ must hold that step's weights, not the last step's."""
    flipped = flipped_pref_data(tmp_path, 32, 7, "train")
    val = letter_pref_data(tmp_path, 16, 8, "val")
    rt.main(["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(flipped), "--eval-data", str(val),
             "--steps", "5", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "1",
             "--save-every", "1", "--output-dir", str(tmp_path / "rm")])
    m = metrics(tmp_path / "rm")
    losses = [x["eval_loss/val"] for x in m]
    best = 1 + min(range(5), key=losses.__getitem__)
    assert best < 5 and losses[-1] > losses[best - 1], losses
    assert m[-1]["best_step"] == best
    w_final = load_file(tmp_path / "rm" / "final" / "model.safetensors")
    w_best = load_file(tmp_path / "rm" / f"checkpoint-{best}" / "model.safetensors")
    assert all(torch.equal(w_final[k], w_best[k]) for k in w_best)
    cfg = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert cfg["rm_transfer"]["step"] == best and cfg["attention_dropout"] == 0.1  # App. B dropout by default
    assert not list((tmp_path / "rm").glob("best-*"))  # renamed to final/


# ---------------------------------------------------------------- bad input (issue 10)
BAD_ARGS = [
    (["train-rm", "--steps", "-2"], "--steps must be >= 0"),
    (["rl", "--steps", "-1"], "--steps must be >= 0"),
    (["train-rm", "--batch-size", "0"], "--batch-size must be > 0"),
    (["rl", "--minibatch-size", "0"], "--minibatch-size must be > 0"),
    (["rl", "--rollout-batch-size", "0"], "--rollout-batch-size must be > 0"),
    (["rl", "--ppo-epochs", "0"], "--ppo-epochs must be > 0"),
    (["rl", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
    (["eval-rm", "--eval-batch-size", "0"], "--eval-batch-size must be > 0"),
    (["train-rm", "--epochs", "0"], "--epochs must be > 0"),
    (["train-rm", "--save-every", "-1"], "--save-every must be >= 0"),
    (["rl", "--temperature", "0"], "--temperature must be > 0"),
    (["rl", "--temperature", "-0.5"], "--temperature must be > 0"),
    (["rl", "--top-p", "0"], "--top-p must be in"),
    (["rl", "--lr", "0"], "--lr must be > 0"),
    (["rl", "--beta", "-0.1"], "--beta must be >= 0"),
    (["train-rm", "--dropout", "1"], "--dropout must be in"),
    (["rl", "--missing-eos-penalty", "-1"], "--missing-eos-penalty must be > 0"),
    (["rl", "--gamma", "1.5"], "--gamma must be in"),
    (["train-rm", "--resume", "--overwrite"], "pass one of them"),
    (["rl", "--save-total-limit", "0"], "--save-total-limit must be >= 1"),
    (["eval-rm", "--resume"], "eval-rm trains nothing"),
    (["eval-rm", "--fsdp"], "eval-rm trains nothing"),
    (["rl", "--fsdp"], "--fsdp needs torchrun"),
]


@pytest.mark.parametrize("argv,msg", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_flag_values_stop_with_one_line_before_anything_is_written(tmp_path, argv, msg):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=msg) as e:
        rt.main(argv + ["--output-dir", str(out)])
    assert "\n" not in str(e.value.code)
    assert not out.exists()


def test_defaults_pass_validation():
    rt.Args()


def write(path, text: str | bytes):
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


ROW = '{"prompt": "p", "chosen": "good", "rejected": "bad"}'


@pytest.mark.parametrize("name,content,msg", [
    ("x.jsonl", ROW + '\n{"prompt": "p", "chosen": null, "rejected": "bad"}\n', r'x.jsonl line 2: "chosen" is null, not text'),
    ("x.jsonl", ROW + '\n{"prompt": "p", "chosen": "a", "rejected": 5}\n', r'x.jsonl line 2: "rejected" is 5, not text'),
    ("x.jsonl", ROW + '\n\n{"prompt": null, "chosen": "a", "rejected": "b"}\n', r'x.jsonl line 3: "prompt" is null'),
    ("x.jsonl", (ROW + "\n").encode() + b'{"prompt": "\xe6", "chosen": "a", "rejected": "b"}\n', r"x.jsonl line 2 is not UTF-8"),
    ("x.jsonl", '[1, 2]\n' + ROW + "\n", r"x.jsonl line 1 is a JSON list, not an object; write one JSON object per line"),
    ("x.jsonl", ROW + '\n"text"\n', r"x.jsonl line 2 is a JSON string, not an object"),
    ("x.json", "[" + ROW + ", 7]", r"x.json row 2 is a JSON number, not an object"),
    ("x.jsonl", '{"prompt": "p", "chosen": " ", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "a"}\n',
     r"every row was skipped \(1 with an empty response, 1 with chosen == rejected\)"),
    ("x.jsonl", "\n\n", r"x.jsonl is empty"),
])
def test_bad_preference_files_stop_with_one_line_naming_file_and_line(tmp_path, name, content, msg):
    path = write(tmp_path / name, content)
    with pytest.raises(SystemExit, match=msg) as e:
        rt.parse_prefs(rt.load_rows(path, "train", "--train-data"), path, "--train-data", rt.Args())
    assert "\n" not in str(e.value.code) and "--train-data" in str(e.value.code)


def test_empty_and_identical_pairs_are_skipped_and_counted(tmp_path):
    path = write(tmp_path / "x.jsonl", "\n".join([
        ROW, '{"prompt": "p", "chosen": "", "rejected": "bad"}', '{"prompt": "p", "chosen": "same", "rejected": "same"}',
        '{"prompt": "p", "chosen": [{"role": "assistant", "content": "chat"}], "rejected": "  \\n"}',
        '{"prompt": "", "chosen": "ok", "rejected": "no"}']) + "\n")
    kind, items, skipped = rt.parse_prefs(rt.load_rows(path, "train", "--train-data"), path, "--train-data", rt.Args())
    assert kind == "pairwise" and items == [("p", "good", "bad"), ("", "ok", "no")]
    assert skipped == {"empty": 2, "identical": 1}


def test_json_array_file_and_blank_first_line_are_read_like_jsonl(tmp_path):
    arr = write(tmp_path / "a.json", json.dumps([json.loads(ROW), {"prompt": "q", "chosen": "x", "rejected": "y"}], indent=2))
    rows = rt.load_rows(arr, "train", "--eval-data")
    assert [w for w, _ in rows] == ["row 1", "row 2"] and rows[1][1]["prompt"] == "q"
    lines = write(tmp_path / "b.json", "\n" + ROW + "\n")  # a .json file of JSON lines
    assert rt.load_rows(lines, "train", "--eval-data")[0][0] == "line 2"
    blank_first = write(tmp_path / "nb_val.jsonl", '\n  \n{"prompt": "p", "chosen": "a", "rejected": "b", "lang": "nb"}\n')
    assert rt.lang_of(blank_first, rt.load_rows(blank_first, "train", "--eval-data")) == "nb"


def test_train_rm_with_blank_first_line_in_eval_data_names_its_language(tmp_path, tiny_lm_dir):
    val = tmp_path / "v.jsonl"
    val.write_text("\n" + "".join(json.dumps({**json.loads(x), "lang": "nb"}) + "\n"
                                  for x in open(letter_pref_data(tmp_path, 8, 9, "val0"))))
    rt.main(["train-rm", "--model", str(tiny_lm_dir), "--train-data", str(letter_pref_data(tmp_path, 8, 10, "t")),
             "--eval-data", str(val), "--steps", "1", "--batch-size", "8", "--output-dir", str(tmp_path / "rm")])
    assert "eval_acc/nb" in metrics(tmp_path / "rm")[-1] and (tmp_path / "rm" / "final" / "config.json").exists()


@pytest.mark.parametrize("kind", ["missing-data", "missing-data-no-ext", "model-folder-without-config", "missing-model",
                                  "missing-model-under-existing-dir"])
def test_missing_paths_stop_with_one_line_before_any_model_loads(tmp_path, tiny_lm_dir, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "empty").mkdir()
    good = letter_pref_data(tmp_path / "data", 4, 0, "ok")
    model, data = str(tiny_lm_dir), str(good)
    msg = {"missing-data": r"--train-data data/nope.jsonl: no such file; check the path",
           "missing-data-no-ext": r"--train-data data/nope: no such file; check the path",
           "model-folder-without-config": r"--model empty is a folder without a model \(no config.json\)",
           "missing-model": r"--model ./nope does not exist",
           "missing-model-under-existing-dir": r"--model runs/rm/final does not exist"}[kind]
    data = {"missing-data": "data/nope.jsonl", "missing-data-no-ext": "data/nope"}.get(kind, data)
    model = {"model-folder-without-config": "empty", "missing-model": "./nope",
             "missing-model-under-existing-dir": "runs/rm/final"}.get(kind, model)
    monkeypatch.setattr(rt, "AutoTokenizer", None)  # nothing may load: reaching a model load is a failure too
    with pytest.raises(SystemExit, match=msg) as e:
        rt.main(["train-rm", "--model", model, "--train-data", data, "--output-dir", str(tmp_path / "o")])
    assert "\n" not in str(e.value.code)


def test_hub_name_that_cannot_be_loaded_offline_gets_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit, match=r"--prompts no-such-org-xyz/no-such-set: no such file, and the hub has no data set"):
        rt.load_rows("no-such-org-xyz/no-such-set", "train", "--prompts")


def test_eval_skips_and_counts_items_longer_than_max_length(tiny_rm_dir, tiny_tokenizer):
    scorer = rt.load_scorer(str(tiny_rm_dir), tiny_tokenizer, torch.device("cpu")).eval()
    items = [("p", "short good", "bad"), ("p", "x" * 3000, "bad"), ("q", "fine", "meh")]
    a = rt.Args(max_length=64)
    res = rt.evaluate(scorer, tiny_tokenizer, "pairwise", items, torch.device("cpu"), a)
    assert res["skipped_long"] == 1 and res["n"] == 2
    alone = rt.evaluate(scorer, tiny_tokenizer, "pairwise", [items[0], items[2]], torch.device("cpu"), a)
    assert res["acc"] == alone["acc"] and res["loss"] == pytest.approx(alone["loss"])
    none = rt.evaluate(scorer, tiny_tokenizer, "pointwise", [("p", "x" * 3000, 1)], torch.device("cpu"), a)
    assert none["acc"] is None and none["loss"] is None and none["skipped_long"] == 1


def test_every_prompt_too_long_names_the_limits_to_change(tmp_path, tiny_lm_dir):
    data = letter_pref_data(tmp_path, 4, 0, "d")
    with pytest.raises(SystemExit, match=r"raise --max-length .* or lower --max-new-tokens"):
        rt.main(["rl", "--model", str(tiny_lm_dir), "--reward-model", str(tiny_lm_dir), "--prompts", str(data),
                 "--max-length", "12", "--max-new-tokens", "8", "--output-dir", str(tmp_path / "o")])


def test_logged_json_holds_null_never_nan():
    assert rt.dumps({"a": float("nan"), "b": [1.5, float("inf")], "c": None, "d": 2}) == '{"a": null, "b": [1.5, null], "c": null, "d": 2}'


# ---------------------------------------------------------------- runs are never lost or mixed (issue 10)
def rm_flags(tmp_path, lm, out, steps, *extra):
    return ["train-rm", "--model", str(lm), "--train-data", str(letter_pref_data(tmp_path, 16, 2, "d")),
            "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--output-dir", str(out), *map(str, extra)]


def test_a_folder_with_a_previous_run_is_refused_and_overwrite_replaces_it(tmp_path, tiny_lm_dir, tiny_rm_dir):
    out = tmp_path / "run"
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 1))
    with pytest.raises(SystemExit, match="holds a previous run; pass --resume to continue it or --overwrite to replace it"):
        rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 1))
    (out / "stale.txt").write_text("from the old run")
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 1, "--overwrite"))
    assert not (out / "stale.txt").exists() and [m["step"] for m in metrics(out)] == [1]
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty and holds no run"):
        rt.main(rm_flags(tmp_path, tiny_lm_dir, other, 1, "--overwrite"))
    assert (other / "thesis.tex").exists()
    # eval-rm writes whole files: it replaces its own earlier output, but never a training run's folder
    ev = ["eval-rm", "--reward-model", str(tiny_rm_dir), "--eval-data", str(letter_pref_data(tmp_path, 8, 3, "v"))]
    with pytest.raises(SystemExit, match="holds a previous run"):
        rt.main(ev + ["--output-dir", str(out)])
    rt.main(ev + ["--output-dir", str(tmp_path / "ev")])
    (tmp_path / "ev" / "accuracy.md").write_text("old")
    rt.main(ev + ["--output-dir", str(tmp_path / "ev")])
    assert (tmp_path / "ev" / "accuracy.md").read_text().startswith("| RM")


def test_resume_without_a_checkpoint_starts_clean_and_never_duplicates_steps(tmp_path, tiny_lm_dir):
    out = tmp_path / "run"
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 2))
    for p in out.glob("checkpoint-*"):  # a run killed before its first checkpoint
        shutil.rmtree(p)
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 2, "--resume"))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert json.loads((out / "args.json").read_text())["_resumed"] == [{"step": 0, "changed": {}}]


def test_resume_refuses_a_flag_that_changes_results_and_records_one_that_does_not(tmp_path, tiny_lm_dir):
    out = tmp_path / "run"
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 1))
    with pytest.raises(SystemExit, match=r"--resume: --lr is 0.1 but the run in .* used 0.001 \(args.json\)"):
        rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 2, "--resume", "--lr", "0.1"))
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 2, "--resume", "--save-every", "7"))
    saved = json.loads((out / "args.json").read_text())
    assert saved["steps"] == 1 and saved["_resumed"] == [{"step": 1, "changed": {"steps": [1, 2], "save_every": [0, 7]}}]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def rl_flags(tmp_path, lm, rm, data, out, steps, *extra):
    return ["rl", "--model", str(lm), "--reward-model", str(rm), "--prompts", str(data), "--output-dir", str(out),
            "--steps", str(steps), "--rollout-batch-size", "4", "--minibatch-size", "2", "--ppo-epochs", "2",
            "--max-new-tokens", "5", "--lr", "1e-3", "--value-warmup-steps", "0", "--warmup-steps", "1", *map(str, extra)]


def test_rl_resume_drops_a_torn_last_log_line_and_refuses_a_corrupt_middle_one(tmp_path, tiny_lm_dir):
    data, rm = tiny_rm_from_lm(tmp_path, tiny_lm_dir)
    out = tmp_path / "run"
    rt.main(rl_flags(tmp_path, tiny_lm_dir, rm, data, out, 1, "--sample-every", "1"))
    for name in ("metrics.jsonl", "samples.jsonl"):  # what a kill or a full disk leaves: half a line
        with open(out / name, "a") as f:
            f.write('{"step": 2, "reward_me')
    rt.main(rl_flags(tmp_path, tiny_lm_dir, rm, data, out, 2, "--sample-every", "1", "--resume"))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert [json.loads(x)["step"] for x in (out / "samples.jsonl").read_text().splitlines()] == [1, 1, 1, 2, 2, 2]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    with pytest.raises(SystemExit, match="metrics.jsonl line 1 is corrupt; fix or delete that line"):
        rt.main(rl_flags(tmp_path, tiny_lm_dir, rm, data, out, 3, "--sample-every", "1", "--resume"))


def test_a_full_disk_while_saving_leaves_no_temporary_folder_and_earlier_checkpoints_intact(tmp_path, tiny_lm_dir, monkeypatch):
    out = tmp_path / "run"
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 1))
    real_save = rt.torch.save

    def full_disk(obj, f, *a, **k):
        if "rng_state" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(rt.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"no space left in .* while writing checkpoint-2; .*checkpoint-1 is intact"):
        rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 2, "--resume"))
    assert not list(out.glob(".tmp-*")) and (out / "checkpoint-1" / "trainer_state.json").exists()


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, tiny_lm_dir):
    out = tmp_path / "run"
    rt.main(rm_flags(tmp_path, tiny_lm_dir, out, 3, "--save-every", "1", "--save-total-limit", "2"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_checkpoints_are_hub_folders_in_the_models_dtype_and_hold_the_trained_weights(tiny_tokenizer, tmp_path):
    """train-rm and rl from a bf16 backbone: final/, checkpoint-1/ (the RM; rl: the policy) and rl's
    checkpoint-1/value/ load with from_pretrained in bf16 and hold the trained fp32 master weights (trainer/)
    rounded to bf16."""
    import torch.distributed.checkpoint as dcp
    from conftest import make_tiny_llama
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification as SeqCls
    lm = tmp_path / "bf16"
    make_tiny_llama(len(tiny_tokenizer), dtype=torch.bfloat16).to(torch.bfloat16).save_pretrained(lm)
    tiny_tokenizer.save_pretrained(lm)
    rt.main(rm_flags(tmp_path, lm, tmp_path / "rm", 1))
    data = letter_pref_data(tmp_path, 16, 2, "d")
    rt.main(rl_flags(tmp_path, lm, tmp_path / "rm" / "final", data, tmp_path / "rl", 1))

    def check(folder, cls, master, name):
        saved = cls.from_pretrained(folder)
        assert all(p.dtype == torch.bfloat16 for p in saved.parameters()), folder
        start = {k: v.clone() for k, v in master.state_dict().items()}
        sd = {k: v.clone() for k, v in master.state_dict().items()}
        dcp.load({name: sd}, checkpoint_id=str(folder.parent / "trainer" if folder.name == "value" else folder / "trainer"))
        cut = len("model.") if isinstance(master, rt.TokenScorer) else 0
        for k, v in saved.state_dict().items():
            assert torch.equal(v, sd[("model." if cut else "") + k].to(torch.bfloat16)), (folder, k)
        assert any(not torch.equal(start[k], sd[k]) for k in sd), folder  # the weights did train
        return saved, sd

    rm_master = rt.TokenScorer(SeqCls.from_pretrained(lm, num_labels=1, dtype=torch.float32))
    check(tmp_path / "rm" / "checkpoint-1", SeqCls, rm_master, "model")
    assert torch.equal(load_file(tmp_path / "rm/final/model.safetensors")["score.weight"],
                       load_file(tmp_path / "rm/checkpoint-1/model.safetensors")["score.weight"])
    policy, sd = check(tmp_path / "rl" / "checkpoint-1", AutoModelForCausalLM,
                       AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32), "policy")
    check(tmp_path / "rl" / "checkpoint-1" / "value", SeqCls,
          rt.TokenScorer(SeqCls.from_pretrained(tmp_path / "rm" / "final", num_labels=1, dtype=torch.float32)), "value")
    x = torch.tensor([[1, 40, 41, 42]])
    same = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.bfloat16)
    same.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert torch.equal(policy(input_ids=x).logits, same(input_ids=x).logits)


# ---------------------------------------------------------------- FSDP2 (issue 12)
def test_fsdp_two_processes_match_one_process_hold_half_the_state_and_resume_exactly(tmp_path, tiny_lm_dir, cpu_only):
    """train-rm and rl under 2-process FSDP2 against 1 plain process (weights and metrics after two optimizer
    steps; train-rm evaluates every step, its scoring padded to the same number of forwards per rank, and
    writes best-<k>/ from the shards); rank 0 holds about half of the trained parameters and optimizer state; rl killed after step 2
    was logged (checkpoint-1 left, a torn metrics line) and resumed under FSDP2, with gradient checkpointing
    switched on, equals the uninterrupted run.
    The resume path (save_checkpoint/load_checkpoint over {name: (model, optimizer)}) is the same code in
    train-rm, whose resume (and best-<k>/) test_train_rm_resume_gives_the_same_metrics_best_step_and_weights checks."""
    data, rm = tiny_rm_from_lm(tmp_path, tiny_lm_dir)
    point = tmp_path / "point7.jsonl"  # 7 sequences over 2 ranks in batches of 3: 2 forwards on rank 0, 1 on rank 1
    point.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen" if i % 2 else "rejected"],
                                         "label": i % 2}) + "\n" for i, r in enumerate(map(json.loads, open(data))) if i < 7))
    rmf = lambda out: rm_flags(tmp_path, tiny_lm_dir, out, 2, "--dropout", "0", "--warmup-steps", "1", "--eval-data",  # noqa: E731
                               letter_pref_data(tmp_path, 8, 8, "val"), point, "--eval-every", "1", "--eval-batch-size", "3")
    rlf = lambda out, *x: rl_flags(tmp_path, tiny_lm_dir, rm, data, out, 2, "--save-every", "1", *x)  # noqa: E731
    rt.main(rmf(tmp_path / "rm1"))
    rt.main(rlf(tmp_path / "rl1"))
    run_torchrun("rm_transfer.py", rmf(tmp_path / "rm2") + ["--fsdp"])
    run_torchrun("rm_transfer.py", rlf(tmp_path / "rl2", "--fsdp"))
    keys = {"rm": ("loss", "train_acc", "grad_norm", "eval_loss/val", "eval_acc/point7 pointwise", "best_step"),
            "rl": ("reward_mean", "reward_std", "kl", "entropy", "response_len", "loss", "value_loss", "clipfrac")}
    for stage, folders in (("rm", ["final"]), ("rl", ["checkpoint-2", "checkpoint-2/value"])):
        m1, m2 = metrics(tmp_path / f"{stage}1"), metrics(tmp_path / f"{stage}2")
        assert len(m1) == len(m2) == 2
        for a, b in zip(m1, m2):
            for k in keys[stage]:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (stage, a["step"], k)
            assert b["param_bytes"] == pytest.approx(a["param_bytes"] / 2, rel=0.05), stage  # rank 0's shard
            assert b["optimizer_bytes"] == pytest.approx(a["optimizer_bytes"] / 2, rel=0.05), stage
        for f in folders:
            w1, w2 = load_file(tmp_path / f"{stage}1" / f / "model.safetensors"), load_file(tmp_path / f"{stage}2" / f / "model.safetensors")
            assert w1.keys() == w2.keys()
            for k in w1:
                torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-4)
    assert metrics(tmp_path / "rl1")[1]["kl"] > 0  # step 2 samples from a policy that moved
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "rl2", cut)
    shutil.rmtree(cut / "checkpoint-2")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    run_torchrun("rm_transfer.py", rlf(cut, "--fsdp", "--resume", "--gradient-checkpointing"))  # a flag that may change
    drop = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
    assert drop(metrics(cut)) == drop(metrics(tmp_path / "rl2"))
    assert json.loads((cut / "args.json").read_text())["_resumed"][0]["changed"]["gradient_checkpointing"] == [False, True]
    for f in ("checkpoint-2", "checkpoint-2/value"):
        w2, w3 = load_file(tmp_path / "rl2" / f / "model.safetensors"), load_file(cut / f / "model.safetensors")
        assert all(torch.equal(w2[k], w3[k]) for k in w2), f


# ---------------------------------------------------------------- rollout and fused linear path (issues 13, 15)
def test_sampled_mask_ends_at_first_eos_for_rows_of_different_lengths(tiny_lm_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    args = rt.Args(max_new_tokens=12)
    eos = [2, *range(100, 140)]  # a tenth of the vocabulary ends a row: lengths spread out
    prompts = [[1, 40, 41]] * 8 + [[1, 40, 41, 50, 60, 70, 80]] * 8  # two prompt lengths: left padding
    tokens, mask = rt.rollout(model, prompts, [(0, i) for i in range(16)], args, eos, 0)
    lengths = set()
    for row, m in zip(tokens.tolist(), mask.tolist()):
        first = next((t for t, x in enumerate(row) if x in eos), len(row) - 1)
        lengths.add(first)
        assert m == [t <= first for t in range(len(row))]
        assert all(x == 0 for x in row[first + 1:])
    assert len(lengths) > 3  # rows of very different lengths
    alone, _ = rt.rollout(model, [prompts[11]], [(0, 11)], args, eos, 0)  # a row's sample depends on its key only
    assert torch.equal(tokens[11, :alone.shape[1]], alone[0])


def test_scores_come_from_length_sorted_padded_batches_and_equal_one_by_one(tiny_rm_dir, tiny_tokenizer):
    scorer = rt.load_scorer(str(tiny_rm_dir), tiny_tokenizer, torch.device("cpu")).eval()
    g = torch.Generator().manual_seed(13)
    seqs = [torch.randint(3, 300, (n,), generator=g).tolist() + [2] for n in (9, 2, 14, 5, 1, 7, 11)]
    seen = []
    spy = lambda ids, mask: seen.append(mask.sum(1).tolist()) or scorer(ids, mask)  # noqa: E731
    got = rt.score_sequences(spy, seqs, 0, torch.device("cpu"), rt.Args(eval_batch_size=3))
    assert [n for batch in seen for n in batch] == sorted(map(len, seqs)) and len(seen) == 3
    with torch.no_grad():
        alone = [scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0, -1].item() for s in seqs]
    torch.testing.assert_close(got, torch.tensor(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_ref", [True, False])
def test_log_probs_and_kl_from_hidden_states_equal_the_logits_path(with_ref):
    g = torch.Generator().manual_seed(9)
    B, R, D, V = 2, 5, 16, 67
    h = torch.randn(B, R, D, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    ref_h, ref_w = torch.randn(B, R, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, R), generator=g)
    heads = dict(weight=w, ref_weight=ref_w, softcap=None, logit_scale=None)
    fused = rt.token_logprob_kl(h, ref_h if with_ref else None, tokens, 0.9, heads)
    plain = rt.token_logprob_kl(h @ w.T, ref_h @ ref_w.T if with_ref else None, tokens, 0.9)
    assert (fused[1] is None) == (not with_ref)
    for a, b in zip(fused, plain):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    loss = lambda o: (o[0] * torch.arange(R)).sum() + (o[1].sum() if with_ref else 0)  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(fused), [h, w]), torch.autograd.grad(loss(plain), [h, w])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fused_and_materialised_rl_runs_agree(tmp_path, tiny_lm_dir):
    data, rm = tiny_rm_from_lm(tmp_path, tiny_lm_dir)
    rt.main(rl_flags(tmp_path, tiny_lm_dir, rm, data, tmp_path / "fused", 2))
    rt.main(rl_flags(tmp_path, tiny_lm_dir, rm, data, tmp_path / "plain", 2, "--no-fused-linear"))
    a, b = metrics(tmp_path / "fused"), metrics(tmp_path / "plain")
    assert a[1]["kl"] > 0
    for m1, m2 in zip(a, b):
        for k in ("reward_mean", "kl", "entropy", "loss", "value_loss", "clipfrac"):
            assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, tiny_lm_dir):
    """train-rm keeps App. B dropout on: non-reentrant checkpointing replays the same dropout masks. rl
    trains policy and value model in train mode only for checkpointing (dropout is off)."""
    data, rm = tiny_rm_from_lm(tmp_path, tiny_lm_dir)
    for name, flags in (("rm", lambda o, *x: rm_flags(tmp_path, tiny_lm_dir, o, 2, *x)),
                        ("rl", lambda o, *x: rl_flags(tmp_path, tiny_lm_dir, rm, data, o, 2, *x))):
        rt.main(flags(tmp_path / f"{name}-plain"))
        rt.main(flags(tmp_path / f"{name}-gc", "--gradient-checkpointing"))
        drop = lambda ms: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in ms]  # noqa: E731
        a, b = drop(metrics(tmp_path / f"{name}-plain")), drop(metrics(tmp_path / f"{name}-gc"))
        assert a[1]["loss"] is not None and len(a) == len(b) == 2
        for m1, m2 in zip(a, b):
            assert m1.keys() == m2.keys()
            for k in m1:  # null (e.g. best_step without --eval-data) must stay null
                assert (m1[k] is None) == (m2[k] is None), (name, k)
                if m2[k] is not None:
                    assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), (name, k)
