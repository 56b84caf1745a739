"""Checks for reinforce_kl.py: every piece of math against a plain float64 loop, the judge
back-ends (HF in-process and an OpenAI-compatible stub server), learning, DDP and resume."""
import json
import math
import shutil
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

import reinforce_kl as rk
from conftest import make_tiny_llama, run_torchrun

PROMPTS = str(Path(rk.__file__).parent / "data" / "rl_prompts.jsonl")
SFT = str(Path(rk.__file__).parent / "data" / "sft_en.jsonl")


# ---------------------------------------------------------------- advantages
def naive_advantages(rewards):
    out = []
    for row in rewards.tolist():
        ok = [r for r in row if math.isfinite(r)]
        mean = sum(ok) / len(ok) if ok else 0.0
        std = math.sqrt(sum((r - mean) ** 2 for r in ok) / len(ok)) if ok else 0.0
        out.append([(r - mean) / std if math.isfinite(r) and len(ok) >= 2 and std > 1e-6 else 0.0 for r in row])
    return torch.tensor(out, dtype=torch.float64)


def test_advantages_match_per_group_loop_with_failed_scores():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(6, 7, generator=g, dtype=torch.float64)
    rewards[1, 3] = math.nan  # a judge failure inside an otherwise normal group
    rewards[2, :5] = math.nan
    got = rk.group_advantages(rewards)
    torch.testing.assert_close(got, naive_advantages(rewards), rtol=1e-12, atol=1e-12)
    assert got[1, 3] == 0 and torch.isfinite(got).all()


def test_zero_spread_and_unscorable_groups_get_zero_advantage_not_nan():
    rewards = torch.tensor([[0.3] * 4, [math.nan] * 4, [0.2, math.nan, math.nan, math.nan], [0.0, 1.0, 0.0, 1.0]])
    adv = rk.group_advantages(rewards)
    assert torch.equal(adv[:3], torch.zeros(3, 4))
    torch.testing.assert_close(adv[3], torch.tensor([-1.0, 1.0, -1.0, 1.0]))


# ---------------------------------------------------------------- loss
def naive_loss(logp, kl, adv, mask, beta, n):
    total = 0.0
    for i in range(logp.shape[0]):
        terms = [-adv[i] * logp[i, t] + beta * kl[i, t] for t in range(logp.shape[1]) if mask[i, t]]
        total = total + (sum(terms) / len(terms) if terms else 0.0)
    return total / n


def test_loss_matches_naive_per_sequence_loop_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    N, T, beta = 5, 9, 0.07
    logp = (-3 * torch.rand(N, T, generator=g, dtype=torch.float64)).requires_grad_()
    kl = torch.rand(N, T, generator=g, dtype=torch.float64).requires_grad_()
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 0, 6]  # a full row, a single token, and an empty response
    mask = torch.tensor([[t < L for t in range(T)] for L in lengths])
    with torch.no_grad():
        logp[~mask] = -math.inf  # garbage in padding must not leak into value or gradient
    got = rk.reinforce_kl_loss(logp, kl, adv, mask, beta, num_sequences=12)
    g_logp, g_kl = torch.autograd.grad(got, [logp, kl])
    ref = naive_loss(logp, kl, adv, mask, beta, 12)
    r_logp, r_kl = torch.autograd.grad(ref, [logp, kl])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(g_logp, r_logp)
    torch.testing.assert_close(g_kl, r_kl)


def test_loss_shares_of_micro_batches_add_up_to_the_global_loss():
    g = torch.Generator().manual_seed(2)
    logp, kl = -torch.rand(8, 5, generator=g), torch.rand(8, 5, generator=g)
    adv, mask = torch.randn(8, generator=g), torch.rand(8, 5, generator=g) > 0.3
    whole = rk.reinforce_kl_loss(logp, kl, adv, mask, 0.1, 8)
    parts = rk.reinforce_kl_loss(logp[:3], kl[:3], adv[:3], mask[:3], 0.1, 8) + \
        rk.reinforce_kl_loss(logp[3:], kl[3:], adv[3:], mask[3:], 0.1, 8)
    torch.testing.assert_close(whole, parts)


# ---------------------------------------------------------------- KL estimators
def naive_logsoftmax(x, T):
    x = x.double() / T
    return x - torch.logsumexp(x, -1, keepdim=True)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_through_kernel_matches_materialised_log_softmax(temperature):
    g = torch.Generator().manual_seed(3)
    N, T, V = 3, 5, 131  # odd vocabulary
    logits = torch.randn(N, T, V, generator=g).requires_grad_()
    ref_logits = torch.randn(N, T, V, generator=g)
    tokens = torch.randint(0, V, (N, T), generator=g)
    logp, kl_term, kl_full, ent = rk.token_kl(logits, ref_logits, tokens, temperature, "full")
    lp, lq = naive_logsoftmax(logits, temperature), naive_logsoftmax(ref_logits, temperature)
    naive_kl = torch.zeros(N, T, dtype=torch.float64)
    for i in range(N):
        for t in range(T):
            naive_kl[i, t] = sum(lp[i, t, w].exp() * (lp[i, t, w] - lq[i, t, w]) for w in range(V))
    torch.testing.assert_close(kl_term.double(), naive_kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kl_full.double(), naive_kl.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logp.double(), lp.gather(-1, tokens[..., None])[..., 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ent.double(), -(lp.exp() * lp).sum(-1).detach(), rtol=1e-4, atol=1e-5)
    w = torch.randn(N, T, generator=g)
    (grad,) = torch.autograd.grad((kl_term * w).sum(), logits)
    (naive_grad,) = torch.autograd.grad((naive_kl * w.double()).sum(), logits)
    torch.testing.assert_close(grad.double(), naive_grad.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_k3_match_their_definitions_and_gradients(estimator):
    g = torch.Generator().manual_seed(4)
    N, T, V, temp = 2, 7, 97, 1.3
    logits = torch.randn(N, T, V, generator=g).requires_grad_()
    ref_logits = torch.randn(N, T, V, generator=g)
    tokens = torch.randint(0, V, (N, T), generator=g)
    _, kl_term, _, _ = rk.token_kl(logits, ref_logits, tokens, temp, estimator)
    lp = naive_logsoftmax(logits, temp).gather(-1, tokens[..., None])[..., 0]
    lq = naive_logsoftmax(ref_logits, temp).gather(-1, tokens[..., None])[..., 0]
    if estimator == "k1":
        naive = lp - lq
    else:
        d = lq - lp
        naive = torch.exp(d) - d - 1
    torch.testing.assert_close(kl_term.double(), naive, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(kl_term.sum(), logits)
    (naive_grad,) = torch.autograd.grad(naive.sum(), logits)
    torch.testing.assert_close(grad.double(), naive_grad.double(), rtol=1e-4, atol=1e-6)


def test_unknown_kl_estimator_is_an_error():
    with pytest.raises(ValueError, match="k1 or k3"):
        rk.token_kl(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), 1.0, "k2")


# ---------------------------------------------------------------- judge scores
def test_expected_score_matches_hand_computed_expectation():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 9, generator=g) * 3
    logits[1] = -math.inf
    logits[1, 6] = 0.0  # all mass on "7": (7 - 1) / 8
    logits[2] = 0.0  # uniform over 1..9: mean 5
    got = rk.expected_score(logits)
    hand = []
    for row in logits.double().tolist():
        z = sum(math.exp(v) for v in row)
        hand.append((sum((d + 1) * math.exp(v) / z for d, v in enumerate(row)) - 1) / 8)
    torch.testing.assert_close(got.double(), torch.tensor(hand, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert got[1].item() == pytest.approx(0.75) and got[2].item() == pytest.approx(0.5)


def test_top_logprobs_score_merges_spaced_digits_and_ignores_other_tokens():
    top = [{"token": "7", "logprob": math.log(0.3)}, {"token": " 7", "logprob": math.log(0.1)},
           {"token": "9", "logprob": math.log(0.2)}, {"token": "Score", "logprob": math.log(0.3)},
           {"token": "10", "logprob": math.log(0.1)}]
    expected = ((7 * 0.4 + 9 * 0.2) / 0.6 - 1) / 8
    score, mass = rk.score_from_top_logprobs(top)
    assert score == pytest.approx(expected) and mass == pytest.approx(0.6)
    assert rk.score_from_top_logprobs([{"token": "Hello", "logprob": -0.1}]) == (None, 0.0)
    assert rk.score_from_top_logprobs([]) == (None, 0.0)


@pytest.fixture(scope="module")
def long_tiny_lm_dir(tmp_path_factory, tiny_tokenizer):
    """The judge prompt is ~1000 byte-level tokens: a tiny model with a 4096-token context."""
    path = tmp_path_factory.mktemp("tiny-judge")
    make_tiny_llama(len(tiny_tokenizer), seed=3, max_position_embeddings=4096).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_hf_judge_batched_scores_equal_one_by_one_forward(long_tiny_lm_dir):
    model, tok = rk.load_lm(str(long_tiny_lm_dir), "--judge-model", torch.device("cpu"))
    judge = rk.HFJudge(model, tok, batch_size=2, device=torch.device("cpu"))
    prompts = ["Hva er hovedstaden i Norge?", "¿Cuál es la capital de España?", "Hei"]
    responses = ["Oslo er hovedstaden i Norge.", "Madrid", "Hei! Hvordan har du det i dag?"]
    refs = ["Oslo.", None, None]
    got, masses = judge(prompts, responses, refs)
    digit_ids = [tok.convert_tokens_to_ids(d) for d in "123456789"]
    for p, r, ref, s, mass in zip(prompts, responses, refs, got, masses):
        text = tok.apply_chat_template([{"role": "user", "content": rk.judge_prompt(p, r, ref)}],
                                       tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1].double()
        probs = [q.item() for q in torch.softmax(last, -1)[digit_ids]]
        hand = (sum((k + 1) * q for k, q in enumerate(probs)) / sum(probs) - 1) / 8
        assert s == pytest.approx(hand, abs=1e-5)
        assert mass == pytest.approx(sum(probs), rel=1e-4)  # judge_digit_mass: P(any digit) over the whole vocabulary


def test_judge_prompt_shows_reference_only_when_given():
    with_ref = rk.judge_prompt("Hei", "Hallo", "Hello.")
    assert "Hei" in with_ref and "Hallo" in with_ref and "[Reference answer, English]\nHello." in with_ref
    assert "Reference" not in rk.judge_prompt("Hei", "Hallo", None)


# ---------------------------------------------------------------- HTTP judge against a stub server
class StubJudge(BaseHTTPRequestHandler):
    """Behaviour chosen by the request's `model` field: good | malformed | slow, and the broken
    replies of issue 10: incomplete | bigprob | nullprob | strtop | strentries | unauthorized | trickle."""
    calls = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.calls.append((self.path, body))
        mode = body["model"]
        if mode == "slow":
            threading.Event().wait(1.0)
        top = [{"token": "8", "logprob": math.log(0.75)}, {"token": "4", "logprob": math.log(0.25)}]
        broken = {"bigprob": [{"token": "8", "logprob": 1000}], "nullprob": [{"token": "8", "logprob": None}],
                  "strtop": "8", "strentries": ["8", "4"]}
        if mode in ("good", "incomplete", "trickle") or mode in broken:
            reply = json.dumps({"choices": [{"logprobs": {"content": [{"token": "8", "logprob": math.log(0.75),
                                                                        "top_logprobs": broken.get(mode, top)}]}}]}).encode()
        else:
            reply = b'{"choices": [{"message": {"content": "8"}}'  # truncated JSON without logprobs
        try:
            self.send_response(401 if mode == "unauthorized" else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply) + (100 if mode == "incomplete" else 0)))
            self.end_headers()
            if mode == "unauthorized":
                self.wfile.write(b'{"error": "invalid API key"}' + b" " * (len(reply) - 28))
            elif mode == "trickle":  # the whole reply, a byte every 0.1 s: each read is fast, the total is not
                for i in range(len(reply)):
                    self.wfile.write(reply[i:i + 1])
                    self.wfile.flush()
                    threading.Event().wait(0.1)
            else:
                self.wfile.write(reply)  # "incomplete": the connection closes 100 bytes short
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def http_judge(url, mode):
    return rk.HTTPJudge(rk.Args(judge_url=url, judge_server_model=mode, judge_timeout=0.3,
                                judge_retries=1, judge_backoff=0.01, judge_concurrency=2))


def test_http_judge_reads_score_from_top_logprobs(stub_server):
    StubJudge.calls.clear()
    scores, masses = http_judge(stub_server, "good")(["Hei"], ["Hallo"], ["Hello"])
    assert scores == [pytest.approx(((8 * 0.75 + 4 * 0.25) - 1) / 8)] and masses == [pytest.approx(1.0)]
    path, body = StubJudge.calls[0]
    assert path == "/v1/chat/completions" and body["max_tokens"] == 1 and body["logprobs"] is True
    assert "Hei" in body["messages"][0]["content"] and "Hello" in body["messages"][0]["content"]


@pytest.mark.parametrize("mode", ["malformed", "slow"])
def test_http_judge_retries_then_returns_nan_for_unreadable_or_slow_replies(stub_server, mode):
    StubJudge.calls.clear()
    scores, _ = http_judge(stub_server, mode)(["Hei", "Hola"], ["Hallo", "Hola"], [None, None])
    assert all(math.isnan(s) for s in scores)
    assert len(StubJudge.calls) == 4  # 2 prompts x (1 try + 1 retry)


@pytest.mark.parametrize("mode", ["incomplete", "bigprob", "nullprob", "strtop", "strentries"])
def test_http_judge_counts_every_broken_reply_as_a_failure(stub_server, mode):
    StubJudge.calls.clear()
    judge = http_judge(stub_server, mode)
    scores, masses = judge(["Hei"], ["Hallo"], [None])
    assert math.isnan(scores[0]) and math.isnan(masses[0]) and judge.last_error
    assert len(StubJudge.calls) == 2  # retried: a server may recover


def test_http_judge_does_not_retry_client_errors_and_quotes_the_server(stub_server):
    StubJudge.calls.clear()
    judge = http_judge(stub_server, "unauthorized")
    scores, _ = judge(["Hei"], ["Hallo"], [None])
    assert math.isnan(scores[0]) and len(StubJudge.calls) == 1
    assert "HTTP 401" in judge.last_error and "invalid API key" in judge.last_error


def test_judge_timeout_bounds_the_whole_request_of_a_trickling_server(stub_server):
    judge = rk.HTTPJudge(rk.Args(judge_url=stub_server, judge_server_model="trickle", judge_timeout=0.5,
                                 judge_retries=0))
    t0 = time.monotonic()
    scores, _ = judge(["Hei"], ["Hallo"], [None])
    assert math.isnan(scores[0]) and time.monotonic() - t0 < 1.5 and "Timeout" in judge.last_error


def test_training_stops_when_the_judge_fails_every_request_for_several_steps(stub_server, tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="for 2 steps in a row; last error: HTTP 401.*invalid API key"):
        rk.main(["--model", str(tiny_lm_dir), "--prompts", PROMPTS, "--steps", "5", "--prompts-per-step", "2",
                 "--group-size", "2", "--max-new-tokens", "3", "--output-dir", str(out), "--judge-url", stub_server,
                 "--judge-server-model", "unauthorized", "--judge-max-failed-steps", "2"])
    m = read_metrics(out)
    assert [x["step"] for x in m] == [1, 2] and m[0]["reward_mean"] is None and m[0]["reward_std"] is None
    samples = (out / "samples.jsonl").read_text()
    assert "NaN" not in samples and json.loads(samples.splitlines()[0])["rewards"] == [None, None]


def test_training_counts_judge_failures_in_metrics_and_does_not_crash(stub_server, tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    rk.main(["--model", str(tiny_lm_dir), "--prompts", PROMPTS, "--steps", "1",
             "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "4", "--output-dir", str(out),
             "--judge-url", stub_server + "/v1", "--judge-server-model", "malformed", "--judge-retries", "0",
             "--judge-timeout", "0.5"])
    m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert m["judge_failures"] == 6 and m["frac_zero_adv"] == 1.0 and math.isfinite(m["loss"])


# ---------------------------------------------------------------- smaller pieces
def test_token_frequency_reward_is_fraction_of_target_tokens():
    assert rk.token_frequency_reward([[1, 2, 3, 1], [], [5]], {1, 5}) == [0.5, 0.0, 1.0]


def test_sft_mask_covers_exactly_the_assistant_turns(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Hei"}, {"role": "assistant", "content": "Hallo der"},
            {"role": "user", "content": "Takk"}, {"role": "assistant", "content": "Bare hyggelig"}]
    ids, mask = rk.sft_example(tiny_tokenizer, msgs)
    picked = tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert picked == "Hallo der<|im_end|>\nBare hyggelig<|im_end|>\n"


def test_sampled_mask_ends_at_first_eos(tiny_lm_dir):
    model, tok = rk.load_lm(str(tiny_lm_dir), "--model", torch.device("cpu"))
    args = rk.Args(group_size=16, max_new_tokens=12)
    eos = [5, 9, 2]  # frequent "EOS" tokens so that some rows stop early
    prompts = [[1, 40, 41]] * 8 + [[1, 40, 41, 50, 60, 70, 80]] * 8  # two prompt lengths: left padding
    tokens, mask = rk.rollout(model, prompts, [(0, 1, i // 8, i) for i in range(16)], args, eos, 0)
    lengths = set()
    for row, m in zip(tokens.tolist(), mask.tolist()):
        first = next((t for t, x in enumerate(row) if x in eos), len(row) - 1)
        lengths.add(first)
        assert m == [t <= first for t in range(len(row))]
        assert all(x == 0 for x in row[first + 1:])
    assert len(lengths) >= 3  # rows of very different lengths


def chi2_critical(df, z=3.090):  # 0.999 quantile, Wilson-Hilferty approximation
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6)])
def test_rollout_samples_pairs_of_tokens_from_the_tempered_nucleus_distribution(temperature, top_p):
    V, N = 6, 12000
    model = make_tiny_llama(V, seed=7, pad_token_id=0, eos_token_id=5).eval()  # top-p 0.6 drops 2 of 6 words
    args = rk.Args(max_new_tokens=2, temperature=temperature, top_p=top_p)
    prompt = [1, 2, 3]
    tokens, mask = rk.rollout(model, [prompt] * N, [(11, 3, 0, i) for i in range(N)], args, [5], 0)
    exact = {}  # P(t1, t2) = p(t1) p(t2 | t1), from plain forwards and the nucleus rule written out
    def nucleus(logits):
        p = torch.softmax(logits.double() / temperature, -1)[0]
        order = p.argsort(descending=True).tolist()
        keep, mass = set(), 0.0
        for w in order:  # the most likely words until their mass reaches top_p
            if mass >= top_p:
                break
            keep.add(w)
            mass += p[w].item()
        return [p[w].item() / mass if w in keep else 0.0 for w in range(V)]
    with torch.no_grad():
        first = nucleus(model(input_ids=torch.tensor([prompt])).logits[:, -1])
        for t1 in range(V):
            if t1 == 5:  # EOS ends the row: the pair is (5, pad)
                exact[(5, 0)] = first[5]
                continue
            nxt = nucleus(model(input_ids=torch.tensor([prompt + [t1]])).logits[:, -1])
            for t2 in range(V):
                exact[(t1, t2)] = first[t1] * nxt[t2]
    counts = {}
    for row in tokens.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert all(exact.get(k, 0.0) > 0 for k in counts), "a token outside the nucleus was sampled"
    bins = [k for k, p in exact.items() if p * N >= 5]
    chi2 = sum((counts.get(k, 0) - N * exact[k]) ** 2 / (N * exact[k]) for k in bins)
    rest = N - sum(counts.get(k, 0) for k in bins)
    rest_exp = N * (1 - sum(exact[k] for k in bins))
    if rest_exp >= 5:
        chi2 += (rest - rest_exp) ** 2 / rest_exp
    assert chi2 < chi2_critical(len(bins) - (rest_exp < 5)), (chi2, len(bins))


def test_a_rows_sample_depends_on_its_key_not_on_the_batch(tiny_lm_dir):
    model, _ = rk.load_lm(str(tiny_lm_dir), "--model", torch.device("cpu"))
    args = rk.Args(max_new_tokens=8)
    alone, _ = rk.rollout(model, [[1, 40, 41]], [(5, 2, 7, 1)], args, [2], 0)
    mixed, _ = rk.rollout(model, [[1, 60, 61, 62, 63, 64], [1, 40, 41], [1, 40, 41]],
                          [(5, 2, 3, 0), (5, 2, 7, 1), (5, 2, 7, 2)], args, [2], 0)
    n = alone.shape[1]
    assert torch.equal(mixed[1, :n], alone[0]) and (mixed[1, n:] == 0).all()
    assert not torch.equal(mixed[1], mixed[2])  # another sample index: other noise


def test_prompt_row_without_field_is_a_clear_error(tiny_lm_dir, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "Hei"}\n{"question": "Hola"}\n')
    with pytest.raises(SystemExit, match='row 2 has no text field "prompt"; pass --prompt-field NAME'):
        rk.main(["--model", str(tiny_lm_dir), "--prompts", str(bad), "--output-dir", str(tmp_path / "o")])


# ---------------------------------------------------------------- end to end
def base_flags(model_dir, out, steps, reward_ids="abcdefghijklmnopqrstuvwxyz"):
    return ["--model", str(model_dir), "--prompts", PROMPTS, "--output-dir", str(out),
            "--steps", str(steps), "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "6",
            "--reward", "token-frequency", "--reward-tokens", reward_ids, "--lr", "3e-3", "--beta", "0.02"]


def read_metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_mean_reward_rises_with_programmatic_reward(tiny_lm_dir, tmp_path):
    tok = rk.AutoTokenizer.from_pretrained(tiny_lm_dir)
    targets = set(range(3, len(tok), 4))  # a quarter of the vocabulary: the start policy scores ~0.25
    reward = lambda p, r, ids: rk.token_frequency_reward(ids, targets)  # noqa: E731
    out = tmp_path / "learn"
    rk.main(["--model", str(tiny_lm_dir), "--prompts", PROMPTS, "--output-dir", str(out),
             "--steps", "10", "--prompts-per-step", "2", "--group-size", "16", "--max-new-tokens", "4",
             "--lr", "2e-2", "--beta", "0.0", "--save-every", "1000"], reward_fn=reward)
    r = [m["reward_mean"] for m in read_metrics(out)]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last > first + 0.3, r


def test_sft_stage_runs_and_its_result_is_the_reference(tiny_lm_dir, tmp_path):
    out = tmp_path / "sft"
    rk.main(base_flags(tiny_lm_dir, out, 1) + ["--sft-data", SFT, "--sft-batch-size", "16",
                                               "--sft-lr", "1e-3"])
    m = read_metrics(out)[0]
    assert m["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from the reference itself
    start = load_file(str(tiny_lm_dir / "model.safetensors"))
    sft = load_file(str(out / "sft" / "model.safetensors"))
    assert any(not torch.equal(start[k], sft[k]) for k in start)


def test_resume_after_interruption_gives_identical_metrics(tiny_lm_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    rk.main(base_flags(tiny_lm_dir, full, 4) + ["--save-every", "2"])
    rk.main(base_flags(tiny_lm_dir, cut, 2) + ["--save-every", "2"])  # "interrupted" after step 2
    with open(cut / "metrics.jsonl", "a") as f:  # a step the crashed run logged but never saved
        f.write(json.dumps({"step": 3, "reward_mean": -1.0}) + "\n")
    rk.main(base_flags(tiny_lm_dir, cut, 4) + ["--save-every", "2", "--resume"])
    drop = ("tokens_per_s",)
    a = [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(full)]
    b = [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(cut)]
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert a == b
    wa = load_file(str(full / "checkpoint-4" / "model.safetensors"))
    wb = load_file(str(cut / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ddp_two_processes_match_one_process_for_sft_and_rl_step(tiny_lm_dir, tmp_path, cpu_only):
    one, two = tmp_path / "one", tmp_path / "two"
    flags = lambda out: base_flags(tiny_lm_dir, out, 1) + [  # noqa: E731
        "--prompts-per-step", "4", "--sft-data", SFT, "--sft-batch-size", "6", "--sft-lr", "1e-3"]
    rk.main(flags(one))
    run_torchrun("reinforce_kl.py", flags(two), nproc=2)
    m1, m2 = read_metrics(one)[0], read_metrics(two)[0]
    assert m1["frac_zero_adv"] < 1.0  # the step has a learning signal, so weights really move
    for k in ("reward_mean", "reward_std", "kl", "entropy", "response_len", "loss", "grad_norm"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k
    s1, s2 = load_file(str(one / "sft" / "model.safetensors")), load_file(str(two / "sft" / "model.safetensors"))
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-5)
    start = s1
    w1 = load_file(str(one / "checkpoint-1" / "model.safetensors"))
    w2 = load_file(str(two / "checkpoint-1" / "model.safetensors"))
    assert any(not torch.equal(start[k], w1[k]) for k in start)
    for k in w1:  # Adam's first step is lr * g / (|g| + eps): float noise in g ~ eps moves a weight by ~lr/100
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- runs are never lost or mixed (issue 10)
def test_a_folder_with_a_previous_run_is_refused_and_overwrite_replaces_it(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    rk.main(base_flags(tiny_lm_dir, out, 1))
    with pytest.raises(SystemExit, match="holds a previous run; pass --resume to continue it or --overwrite to replace it"):
        rk.main(base_flags(tiny_lm_dir, out, 1))
    (out / "stale.txt").write_text("from the old run")
    rk.main(base_flags(tiny_lm_dir, out, 1) + ["--overwrite"])
    assert not (out / "stale.txt").exists() and [m["step"] for m in read_metrics(out)] == [1]
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty and holds no run"):
        rk.main(base_flags(tiny_lm_dir, other, 1) + ["--overwrite"])
    assert (other / "thesis.tex").exists()


def test_resume_without_a_checkpoint_starts_clean_and_never_duplicates_steps(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    rk.main(base_flags(tiny_lm_dir, out, 2) + ["--save-every", "100"])
    for p in out.glob("checkpoint-*"):  # a run killed before its first checkpoint
        shutil.rmtree(p)
    rk.main(base_flags(tiny_lm_dir, out, 2) + ["--save-every", "100", "--resume"])
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert json.loads((out / "args.json").read_text())["_resumed"] == [{"step": 0, "changed": {}}]


def test_resume_refuses_a_flag_that_changes_results_and_records_one_that_does_not(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    rk.main(base_flags(tiny_lm_dir, out, 1))
    with pytest.raises(SystemExit, match=r"--resume: --lr is 0.1 but the run in .* used 0.003 \(args.json\)"):
        rk.main(base_flags(tiny_lm_dir, out, 2) + ["--resume", "--lr", "0.1"])
    rk.main(base_flags(tiny_lm_dir, out, 2) + ["--resume", "--save-every", "7"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["steps"] == 1 and saved["_resumed"] == [{"step": 1, "changed": {"steps": [1, 2], "save_every": [50, 7]}}]


def test_resume_drops_a_torn_last_log_line_and_refuses_a_corrupt_middle_one(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    rk.main(base_flags(tiny_lm_dir, out, 1))
    for name in ("metrics.jsonl", "samples.jsonl"):  # what a kill or a full disk leaves: half a line
        with open(out / name, "a") as f:
            f.write('{"step": 2, "reward_me')
    rk.main(base_flags(tiny_lm_dir, out, 2) + ["--resume"])
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert [json.loads(l)["step"] for l in (out / "samples.jsonl").read_text().splitlines()] == [1, 1, 2, 2]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    with pytest.raises(SystemExit, match="metrics.jsonl line 1 is corrupt; fix or delete that line"):
        rk.main(base_flags(tiny_lm_dir, out, 3) + ["--resume"])


def test_a_full_disk_while_saving_leaves_no_temporary_folder_and_earlier_checkpoints_intact(tiny_lm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    rk.main(base_flags(tiny_lm_dir, out, 1) + ["--save-every", "1"])
    real_save = rk.torch.save

    def full_disk(obj, f, *a, **k):
        if "rng_state" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(rk.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"no space left in .* while writing checkpoint-2; .*checkpoint-1 is intact"):
        rk.main(base_flags(tiny_lm_dir, out, 2) + ["--save-every", "1", "--resume"])
    assert not list(out.glob(".tmp-*")) and (out / "checkpoint-1" / "trainer_state.json").exists()


def test_save_total_limit_keeps_the_newest_checkpoints(tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    rk.main(base_flags(tiny_lm_dir, out, 3) + ["--save-every", "1", "--save-total-limit", "2"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_checkpoint_is_a_hub_folder_in_the_models_dtype_and_holds_the_trained_weights(tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "bf16"
    make_tiny_llama(len(tiny_tokenizer), dtype=torch.bfloat16).to(torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    rk.main(base_flags(model_dir, out, 1))
    saved = rk.AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    assert all(p.dtype == torch.bfloat16 for p in saved.parameters())
    import torch.distributed.checkpoint as dcp
    trained = {k: v.clone() for k, v in rk.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items()}
    dcp.load({"model": trained}, checkpoint_id=str(out / "checkpoint-1" / "trainer"))  # the fp32 master weights
    for k, v in saved.state_dict().items():
        assert torch.equal(v, trained[k].to(torch.bfloat16)), k
    assert any(not torch.equal(trained[k], v) for k, v in
               rk.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items())
    x = torch.tensor([[1, 40, 41, 42]])
    ref = rk.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in trained.items()})
    assert torch.equal(saved(input_ids=x).logits, ref(input_ids=x).logits)


# ---------------------------------------------------------------- bad input: one line each (issue 10)
@pytest.mark.parametrize("flags,message", [
    (["--group-size", "1"], "--group-size must be >= 2"), (["--group-size", "0"], "--group-size must be >= 2"),
    (["--temperature", "0"], "--temperature must be > 0"), (["--steps", "-1"], "--steps must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in"), (["--prompts-per-step", "0"], "--prompts-per-step must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"), (["--save-every", "0"], "--save-every must be >= 1"),
    (["--judge-batch-size", "0"], "--judge-batch-size must be >= 1"), (["--kl-estimator", "k2"], "--kl-estimator must be"),
    (["--resume", "--overwrite"], "pass one of them"), (["--reward", "token-frequency"], "needs --reward-tokens"),
])
def test_bad_flags_get_one_line_before_anything_loads(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        rk.main(["--model", str(tmp_path / "no-model-needed"), "--output-dir", str(tmp_path / "o")] + flags)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,content,message", [
    ("latin1.jsonl", '{"prompt": "Hei"}\n{"prompt": "Hva koster det? 5 kr"}\n'.encode() + b'{"prompt": "s\xf8t"}\n',
     r"line 3 is not UTF-8 .*; re-save the file as UTF-8"),
    ("list.jsonl", b'{"prompt": "Hei"}\n["Hola"]\n', "line 2 is a JSON list, not an object"),
    ("array.json", b'[{"prompt": "Hei"}, "Hola"]', "row 2 is a JSON str, not an object"),
    ("nofile", None, r"no such file, and no data set of that name could be loaded .*; check the path"),
])
def test_bad_data_files_name_file_line_and_fix(name, content, message, tiny_lm_dir, tmp_path):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        rk.read_rows(str(path) if content is not None else "data/no_such_prompts", "--prompts")


def test_a_json_array_file_is_read_like_jsonl(tmp_path):
    (tmp_path / "a.json").write_text('[{"prompt": "Hei"}, {"prompt": "Hola"}]')
    assert rk.read_rows(str(tmp_path / "a.json"), "--prompts") == [{"prompt": "Hei"}, {"prompt": "Hola"}]


def test_model_paths_that_hold_no_model_get_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="is a folder without a model"):
        rk.load_lm(str(tmp_path / "empty"), "--model", torch.device("cpu"))
    with pytest.raises(SystemExit, match="does not exist"):
        rk.load_lm(str(tmp_path / "missing"), "--model", torch.device("cpu"))


# ---------------------------------------------------------------- FSDP2 (issue 12)
def test_fsdp_two_processes_match_one_process_hold_half_the_state_and_resume_exactly(tiny_lm_dir, tmp_path, cpu_only):
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    flags = lambda out, steps: base_flags(tiny_lm_dir, out, steps) + ["--prompts-per-step", "4", "--save-every", "1"]  # noqa: E731
    rk.main(flags(one, 2))
    run_torchrun("reinforce_kl.py", flags(two, 2) + ["--fsdp"], nproc=2)
    m1, m2 = read_metrics(one), read_metrics(two)
    assert m1[1]["frac_zero_adv"] < 1.0 and m1[1]["kl"] > 0  # the second step starts from moved weights
    for a, b in zip(m1, m2):
        for k in ("reward_mean", "reward_std", "kl", "entropy", "response_len", "loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
        assert b["param_bytes"] == pytest.approx(a["param_bytes"] / 2, rel=0.05)  # rank 0's shard
        assert b["optimizer_bytes"] == pytest.approx(a["optimizer_bytes"] / 2, rel=0.05)
    w1 = load_file(str(one / "checkpoint-2" / "model.safetensors"))
    w2 = load_file(str(two / "checkpoint-2" / "model.safetensors"))
    assert w1.keys() == w2.keys()  # tied embeddings written once, also from gathered FSDP shards
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-4)
    run_torchrun("reinforce_kl.py", flags(cut, 1) + ["--fsdp"], nproc=2)  # killed after step 1
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "rew')
    run_torchrun("reinforce_kl.py", flags(cut, 2) + ["--fsdp", "--resume"], nproc=2)
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in m.items() if k not in drop} for m in read_metrics(cut)] == \
        [{k: v for k, v in m.items() if k not in drop} for m in m2]
    w3 = load_file(str(cut / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


# ---------------------------------------------------------------- fused linear path (issue 15)
@pytest.mark.parametrize("estimator", ["full", "k1", "k3"])
def test_token_kl_from_hidden_states_equals_the_materialised_logits_path(estimator):
    g = torch.Generator().manual_seed(9)
    N, T, D, V = 2, 5, 16, 67
    h = torch.randn(N, T, D, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    ref_h, ref_w = torch.randn(N, T, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (N, T), generator=g)
    heads = dict(weight=w, ref_weight=ref_w, softcap=None, logit_scale=None)
    fused = rk.token_kl(h, ref_h, tokens, 0.9, estimator, heads)
    plain = rk.token_kl(h @ w.T, ref_h @ ref_w.T, tokens, 0.9, estimator)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    upstream = torch.randn(N, T, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad(((fused[0] + fused[1]) * upstream).sum(), [h, w])
    gb = torch.autograd.grad(((plain[0] + plain[1]) * upstream).sum(), [h, w])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fused_and_materialised_runs_agree(tiny_lm_dir, tmp_path):
    a, b = tmp_path / "fused", tmp_path / "plain"
    rk.main(base_flags(tiny_lm_dir, a, 2) + ["--sft-data", SFT, "--sft-batch-size", "16", "--sft-lr", "1e-3"])
    rk.main(base_flags(tiny_lm_dir, b, 2) + ["--sft-data", SFT, "--sft-batch-size", "16", "--sft-lr", "1e-3",
                                              "--no-fused-linear"])
    for m1, m2 in zip(read_metrics(a), read_metrics(b)):
        for k in ("reward_mean", "kl", "entropy", "loss", "grad_norm"):
            assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k
