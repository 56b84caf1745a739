"""bestofn.py: selection, KL bound, win-rate ceiling, judge scores, the App. G.2 win and its
t-interval checked against plain loops and hand-computed numbers; the counter-based sampler
against exact distributions and a naive one-row-at-a-time generation loop; batched scorers
against one-at-a-time forwards; end-to-end runs on the tiny models (1 vs 2 processes, resume,
bad input, and a stub OpenAI-compatible judge server that produces each failure)."""
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import bestofn
from kernels import keyed_gumbel, sampling_logprobs
from conftest import CHI2_999, ROOT, chi_square, make_tiny_llama, nucleus_distribution, run_torchrun


# ----------------------------------------------------------------------------- selection
def naive_best(scores: list) -> int:
    best = None
    for i, s in enumerate(scores):
        if s is None or math.isnan(s):
            continue
        if best is None or s > scores[best]:  # strict '>': the first of equal maxima stays
            best = i
    return 0 if best is None else best


def test_select_best_matches_argmax_loop_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (37, 13), generator=g).double()  # few values -> many ties
    scores[3, 5] = float("nan")
    scores[4] = float("nan")
    scores[4, 7] = -1.0
    scores[5] = 2.0  # all tied -> index 0
    got = bestofn.select_best(scores)
    assert got.tolist() == [naive_best(row) for row in scores.tolist()]
    assert got[5] == 0 and got[4] == 7
    assert int(bestofn.select_best(torch.tensor([1.0, 3.0, 3.0, 2.0]))) == 1
    assert int(bestofn.select_best(torch.tensor([0.5]))) == 0


# ----------------------------------------------------------------------------- KL bound, ceiling
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 64, 1000])
def test_kl_bound_and_ceiling_equal_their_formulas(n):
    assert bestofn.best_of_n_kl_bound(n) == pytest.approx(math.log(n) - 1 + 1 / n, abs=1e-12)
    assert bestofn.win_rate_ceiling(n) == pytest.approx(1 - 1 / (n + 1), abs=1e-12)


def exact_best_of_n(probs: list[float], n: int) -> list[float]:
    """Best-of-n distribution when rewards are distinct and increasing with the item index:
    P(best = k) = F(k)^n - F(k-1)^n, with F the base CDF in reward order."""
    out, cdf = [], 0.0
    for p in probs:
        out.append((cdf + p) ** n - cdf ** n)
        cdf += p
    return out


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_bound_upper_bounds_exact_kl_and_is_tight_for_many_outcomes(n):
    g = torch.Generator().manual_seed(n)
    for m in (3, 17, 20000):
        for base in ([1.0 / m] * m, (torch.rand(m, generator=g, dtype=torch.float64) + 0.1).tolist()):
            total = sum(base)
            base = [b / total for b in base]
            bon = exact_best_of_n(base, n)
            kl = sum(q * math.log(q / p) for q, p in zip(bon, base) if q > 0)
            assert kl <= bestofn.best_of_n_kl_bound(n) + 1e-12
            # exact P(best-of-n beats a fresh sample), ties (same item) counted half
            cdf, win = 0.0, 0.0
            for q, p in zip(bon, base):
                win += q * (cdf + 0.5 * p)
                cdf += p
            assert win <= bestofn.win_rate_ceiling(n) + 1e-12
            if m == 20000 and base[0] == base[1]:  # near-continuous uniform: both become equalities
                assert kl == pytest.approx(bestofn.best_of_n_kl_bound(n), abs=2e-3)
                assert win == pytest.approx(bestofn.win_rate_ceiling(n), abs=1e-6)


# ----------------------------------------------------------------------------- judge math
def test_expected_score_matches_loop():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(5, 7, 9, generator=g, dtype=torch.float64) * 0.3  # unnormalised mass on the labels
    values = torch.arange(1, 10, dtype=torch.float64)
    got = bestofn.expected_score(probs, values)
    for i in range(5):
        for j in range(7):
            num = sum((k + 1) * probs[i, j, k].item() for k in range(9))
            den = sum(probs[i, j, k].item() for k in range(9))
            assert got[i, j].item() == pytest.approx(num / den, rel=1e-12)


def test_judge_probabilities_are_averaged_over_both_orders_before_deciding():
    # (P(A better) with best as A, P(A better) with best as B) -> (hard win, q), by hand (App. G.2)
    cases = [((0.9, 0.6), (1.0, 0.65)),   # best: 0.9 then 0.4 -> averaged 0.65, a WIN (hard votes: a tie)
             ((1.0, 1.0), (0.5, 0.5)),    # always "A": position bias cancels to a tie
             ((0.2, 0.7), (0.0, 0.25)),   # single better in both orders
             ((0.55, 0.45), (1.0, 0.55)),
             ((0.3, 0.1), (1.0, 0.6)),    # best: 0.3 then 0.9 -> 0.6 (hard votes: a tie)
             ((0.5, 0.5), (0.5, 0.5))]
    for (p1, p2), (hard, q) in cases:
        got_hard, got_q = bestofn.win_both_orders(p1, p2)
        assert got_hard == hard and got_q == pytest.approx(q, abs=1e-15)


T975 = {1: 12.7062047361747, 2: 4.30265272974946, 3: 3.18244630528371, 4: 2.77644510519779,
        5: 2.57058183563631, 10: 2.22813885198627, 23: 2.06865761041905, 30: 2.04227245630124,
        100: 1.98397151852355}  # standard table (R: qt(0.975, df))


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_table_and_a_numerical_integral_of_the_density(df):
    q = bestofn.student_t_quantile(0.975, df)
    assert q == pytest.approx(T975[df], abs=1e-9)
    # independent: Simpson's rule on the t density from 0 to q gives 0.475
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = lambda t: math.exp(logc - (df + 1) / 2 * math.log1p(t * t / df))  # noqa: E731
    k, h = 20000, q / 20000
    area = h / 3 * (f(0) + f(q) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, k)))
    assert area == pytest.approx(0.475, abs=1e-10)


def test_win_rate_interval_is_a_t_interval_over_prompts_and_ties_do_not_widen_it():
    wins = [1.0, 0.5, 0.0, 0.75]
    r = bestofn.mean_ci95(wins)
    sd = math.sqrt(((1 - 0.5625) ** 2 + (0.5 - 0.5625) ** 2 + 0.5625 ** 2 + (0.75 - 0.5625) ** 2) / 3)
    half = T975[3] * sd / 2
    assert r["win_rate"] == 0.5625 and r["num_prompts"] == 4 and r["sd"] == pytest.approx(sd, abs=1e-15)
    assert 0.5625 - half < 0 and 0.5625 + half > 1 and r["ci95"] == [0.0, 1.0]  # 4 prompts: clipped to [0, 1]
    # 100 ties: every prompt's outcome is exactly 1/2, so the mean has no spread (Wilson: [0.40, 0.60])
    assert bestofn.mean_ci95([0.5] * 100)["ci95"] == [0.5, 0.5]
    # 0/1 outcomes: 24 prompts, 15 wins
    w = [1.0] * 15 + [0.0] * 9
    sd = math.sqrt((15 * (1 - 0.625) ** 2 + 9 * 0.625 ** 2) / 23)
    half = T975[23] * sd / math.sqrt(24)
    assert bestofn.mean_ci95(w)["ci95"] == pytest.approx([0.625 - half, 0.625 + half], abs=1e-9)
    assert bestofn.mean_ci95([0.7])["ci95"] is None and bestofn.mean_ci95([])["win_rate"] is None


# ----------------------------------------------------------------------------- the shared sampler (keyed Gumbel-max, eq. 5)
@pytest.fixture(scope="module")
def vocab8_lm():
    """A tiny causal LM with 8 tokens whose next-token distribution is far from uniform."""
    model = make_tiny_llama(8, seed=2, tie_word_embeddings=False).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.7)])
def test_rollout_draws_first_tokens_from_the_model_distribution(vocab8_lm, temperature, top_p):
    prompt = [3, 5, 1, 4]
    with torch.no_grad():
        logits = vocab8_lm(torch.tensor([prompt])).logits[0, -1].double().tolist()
    want = nucleus_distribution(logits, temperature, top_p)
    n = 4000
    args = bestofn.Args(max_new_tokens=1, temperature=temperature, top_p=top_p)
    tokens, mask = bestofn.rollout(vocab8_lm, [prompt] * n, [(5, 0, 0, j) for j in range(n)], args, eos_ids=[7], pad_id=0)
    assert tokens.shape == (n, 1) and mask.all()
    counts = torch.bincount(tokens[:, 0], minlength=8).tolist()
    assert all(c == 0 for c, p in zip(counts, want) if p == 0)
    assert chi_square(counts, want) < CHI2_999[sum(p > 0 for p in want) - 1]


def naive_rollout(model, prompt, key, max_new, temperature, top_p, eos):
    """One row at a time, no padding, no KV cache: the full forward at every step."""
    seq, out = list(prompt), []
    for t in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[:, -1].float()
        noise = keyed_gumbel([key], t, logits.shape[-1], logits.device)
        y = int((sampling_logprobs(logits, temperature, top_p) + noise).argmax())
        out.append(y)
        seq.append(y)
        if y in eos:
            break
    return out


@pytest.fixture()
def one_thread():
    """Hundreds of tiny forwards: threads only add overhead (17 s instead of 1.5 s on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("pad_to", [0, 50])  # 50: every prompt left-padded to one width (the static-cache layout)
def test_batched_rollout_equals_a_naive_loop_with_exact_eos_and_pad_masks(vocab8_lm, one_thread, pad_to):
    prompts = [[3, 5], [6, 7, 7, 3, 1, 5, 4] * 6, [1, 2, 3, 4, 6, 7]]  # 2, 42 and 6 tokens
    rows = [(p, (9, i, 0, j)) for j in range(3) for i, p in enumerate(prompts)]
    tokens, mask = bestofn.rollout(vocab8_lm, [p for p, _ in rows], [k for _, k in rows], bestofn.Args(max_new_tokens=24),
                                   eos_ids=[0, 6], pad_id=0, pad_to=pad_to)  # pad == an eos id, as in SmolLM2
    expected = [naive_rollout(vocab8_lm, p, k, 24, 1.0, 1.0, {0, 6}) for p, k in rows]
    lengths = [len(e) for e in expected]
    assert min(lengths) <= 3 and max(lengths) == 24  # rows of very different lengths, some never end
    assert tokens.shape == mask.shape == (len(rows), max(lengths))
    for r, e in enumerate(expected):
        assert tokens[r].tolist() == e + [0] * (tokens.shape[1] - len(e))
        assert mask[r].tolist() == [True] * len(e) + [False] * (tokens.shape[1] - len(e))


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_same_prompt_gives_the_same_samples_alone_and_in_a_batch_mixed_with_other_prompts(tiny_lm_dir, tiny_tokenizer, top_p):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    lm.generation_config.top_k, lm.generation_config.repetition_penalty = 5, 1.5  # model defaults must not leak in
    enc = lambda t: tiny_tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    target, other, long = enc("Hva er hovedstaden i Norge?"), enc("Hola"), enc("The quick brown fox jumps over the lazy dog " * 4)
    kw = dict(args=bestofn.Args(max_new_tokens=12, top_p=top_p), eos_ids=[tiny_tokenizer.eos_token_id], pad_id=0)
    alone_t, alone_m = bestofn.rollout(lm, [target] * 4, [(0, 3, 0, j) for j in range(4)], **kw)
    batch = [(long, (0, 8, 0, 0)), (target, (0, 3, 0, 2)), (other, (0, 1, 0, 0)), (target, (0, 3, 0, 0)),
             (target, (0, 3, 0, 3)), (long, (0, 8, 0, 1)), (target, (0, 3, 0, 1))]
    mixed_t, mixed_m = bestofn.rollout(lm, [p for p, _ in batch], [k for _, k in batch], **kw)
    for r, (p, k) in enumerate(batch):
        if p is target:
            j = k[3]
            assert mixed_t[r][mixed_m[r]].tolist() == alone_t[j][alone_m[j]].tolist()
    assert len({tuple(alone_t[j][alone_m[j]].tolist()) for j in range(4)}) > 1  # the 4 samples differ
    # the sampled rows follow the model's own logits, not its generation_config defaults
    seq = target + alone_t[0][alone_m[0]].tolist()[:1]
    assert seq[-1] == naive_rollout(lm, target, (0, 3, 0, 0), 1, 1.0, top_p, set())[0]


# ----------------------------------------------------------------------------- batched scorers
def test_reward_is_read_at_last_token_even_when_pad_equals_eos(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    rm.config.pad_token_id = tok.eos_token_id  # the pad == eos case (SmolLM2, Llama 3, ...)
    responses = ["Oslo.", "Oslo er hovedstaden.", "Madrid", "Osloo", "", "hei hei", "Oslo!"]
    q = "Hva er hovedstaden i Norge?"
    for template, head in ((tok.chat_template, f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
                           (None, f"{q}\n\n")):
        tok.chat_template = template
        got = bestofn.reward_model_scores(rm, tok, q, responses, batch_size=2)
        for r, s in zip(responses, got):
            ids = torch.tensor([tok(head).input_ids + tok(r).input_ids + [tok.eos_token_id]])  # chat(x) ++ y ++ eos
            with torch.no_grad():
                naive = rm.score(rm.model(ids).last_hidden_state[0, -1]).item()
            assert s == pytest.approx(naive, abs=1e-5)
    # HF's own pooling stops before a trailing eos when pad == eos: the case above is a real one
    with torch.no_grad():
        hf = rm(input_ids=ids).logits[0, 0].item()
    assert abs(hf - naive) > 1e-6


def test_reward_model_scores_padded_batches_in_one_call_per_batch(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    calls = []
    rm.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["inputs_embeds"].shape), with_kwargs=True)
    prompts = ["Hva er hovedstaden i Norge?", "¿Capital de España?"] * 4
    responses = ["Oslo.", "Es Madrid, claro que sí.", "", "Oslo er hovedstaden i Norge.", "x", "Madrid", "hei", "Madrid!!"]
    got = bestofn.reward_model_scores(rm, tok, prompts, responses, batch_size=8)
    assert len(calls) == 1 and calls[0][0] == 8  # 7 distinct lengths, one padded call
    bestofn.reward_model_scores(rm, tok, prompts, responses, batch_size=3)
    assert [c[0] for c in calls[1:]] == [3, 3, 2] and calls[1][1] >= calls[2][1] >= calls[3][1]  # sorted by length
    for p, r, s in zip(prompts, responses, got):
        ids = torch.tensor([tok(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n" + r).input_ids + [tok.eos_token_id]])
        with torch.no_grad():
            assert s == pytest.approx(rm.score(rm.model(ids).last_hidden_state[0, -1]).item(), abs=1e-5)


def test_reward_model_pairwise_judgment_is_bradley_terry(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    pair = bestofn.make_scorer(bestofn.Args(), pairwise=True, rm=(rm, tok))
    items = [("¿Capital de España?", None, a, b) for a, b in [("Madrid.", "Es Madrid, claro."), ("hola", "hola"), ("", "x")]]
    pa, hows, errs = pair(items)
    assert hows == ["reward"] * 3 and errs == [None] * 3
    for (q, _, a, b), p in zip(items, pa):
        ra, rb = bestofn.reward_model_scores(rm, tok, q, [a, b], batch_size=1)
        assert p == pytest.approx(1 / (1 + math.exp(-(ra - rb))), abs=1e-6)


def test_judge_label_probs_sorted_padded_batches_read_one_position_and_skip_too_long_inputs(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    lm, tok = bestofn.load_model(str(tiny_lm_dir), "lm", torch.float32, torch.device("cpu"), "--judge-model")
    ids = bestofn.label_token_ids(tok, bestofn.SCORE_LABELS)
    texts = [bestofn.chat_text(tok, bestofn.pointwise_messages("¿Cuánto es 15 más 27?", y, ref), True)
             for y, ref in [("", None), ("42", None), ("Son cuarenta y dos, creo yo.", "42"),
                            ("x" * 2000, None), ("cuarenta y dos", "forty-two")]]
    assert len(bestofn.encode(tok, texts[3])) > 512  # the tiny judge's context
    widths, head = [], []
    lm.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True)
    lm.lm_head.register_forward_hook(lambda mod, args, out: head.append(out.shape))
    got = bestofn.next_token_label_probs(lm, tok, texts, ids, batch_size=2)
    assert [w[0] for w in widths] == [2, 2] and widths[0][1] >= widths[1][1]  # sorted by length, the long one skipped
    assert all(h[1] == 1 for h in head)  # logits of one position, never [B, L, V]
    assert torch.isnan(got[3]).all() and not torch.isnan(got[[0, 1, 2, 4]]).any()
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    for k in (0, 1, 2, 4):
        x = torch.tensor([tok(texts[k], add_special_tokens=False).input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(plain(x).logits[0, -1].double(), -1)
        want = [sum(math.exp(logp[i].item()) for i in label) for label in ids]
        assert got[k].tolist() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- stub judge server
def judge_choice(content: str) -> dict:
    """Pointwise: one-hot logprob on digit 1 + len(answer) % 9 (a programmatic reward).
    Pairwise: always answers "A" as text, with no logprobs (a fully position-biased judge)."""
    if content.startswith("Which answer"):
        return {"message": {"content": "A"}, "logprobs": None}
    digit = str(1 + len(content.split("Answer:\n", 1)[1]) % 9)
    return {"message": {"content": digit},
            "logprobs": {"content": [{"token": digit, "logprob": 0.0,
                                      "top_logprobs": [{"token": " " + digit, "logprob": 0.0}, {"token": "x", "logprob": -1.0}]}]}}


def bad_logprobs(top) -> dict:
    return {"message": {"content": "xyz"}, "logprobs": {"content": [{"token": "7", "logprob": -0.1, "top_logprobs": top}]}}


class StubJudge(BaseHTTPRequestHandler):
    """The first path segment picks the behaviour: http://host/<mode>/v1/chat/completions."""
    requests: list = []

    def do_POST(self):
        mode = self.path.split("/")[1]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.requests.append((mode, body))
        content = body["messages"][0]["content"]
        if mode == "mixed":  # every other request sends logprob null
            mode = "ok" if len([m for m, _ in StubJudge.requests if m == "mixed"]) % 2 else "null"
        replies = {"ok": judge_choice(content), "logprob1000": bad_logprobs([{"token": "7", "logprob": 1000}]),
                   "null": bad_logprobs([{"token": "7", "logprob": None}]), "string": bad_logprobs("7: -0.1"),
                   "strings": bad_logprobs(["7", "8"])}
        status, data = 200, json.dumps({"choices": [replies.get(mode, {})]}).encode()
        if mode in ("401", "503"):
            status, data = int(mode), b'{"error": {"message": "invalid api key sk-...; see the docs"}}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data) + (500 if mode == "incomplete" else 0)))
        self.end_headers()
        if mode == "trickle":  # 20 bytes per second: the whole body would take several seconds
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.wfile.write(data)  # "incomplete": 500 bytes short, then the connection closes

    def log_message(self, *a):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def judge_server():
    StubJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield lambda mode: f"http://127.0.0.1:{server.server_port}/{mode}/v1"
    server.shutdown()


def test_http_judge_reads_logprobs_then_text_and_counts_failures(judge_server):
    args = bestofn.Args(judge_retries=1, judge_timeout=5)
    probs, how, err = bestofn.http_label_probs(judge_server("ok"), "m", bestofn.pointwise_messages("q", "abc", None),
                                               bestofn.SCORE_LABELS, args)
    assert how == "logprobs" and probs == [0.0, 0.0, 0.0, 1.0] + [0.0] * 5 and err is None  # " 4" read as label "4"
    probs, how, err = bestofn.http_label_probs(judge_server("ok"), "m", bestofn.pairwise_messages("q", "a", "b", None),
                                               bestofn.PAIR_LABELS, args)
    assert how == "text" and probs == [1.0, 0.0]
    assert StubJudge.requests[0][1]["logprobs"] is True and StubJudge.requests[0][1]["max_tokens"] == 1
    probs, how, err = bestofn.http_label_probs("http://127.0.0.1:9/v1", "m", [], bestofn.PAIR_LABELS, args)  # closed port
    assert (probs, how) == (None, "failed") and "ConnectionRefusedError" in err


@pytest.mark.parametrize("mode,why,tries", [
    ("incomplete", "IncompleteRead", 2),        # connection dropped mid-reply: retried, then counted
    ("logprob1000", "logprob 1000 is not a log-probability", 1),
    ("null", "is not {token: str, logprob: number}", 1),
    ("string", "top_logprobs is a str, not a list", 1),
    ("strings", "top_logprobs entry '7' is not", 1),
    ("401", "HTTP 401: .*invalid api key", 1),  # a client error is not retried
    ("503", "HTTP 503: .*invalid api key", 2),  # a server error is
])
def test_http_judge_turns_each_malformed_reply_into_a_counted_failure(judge_server, mode, why, tries, monkeypatch):
    import re

    monkeypatch.setattr(bestofn.time, "sleep", lambda s: None)  # no backoff wait in the test
    args = bestofn.Args(judge_retries=1, judge_timeout=5)
    probs, how, err = bestofn.http_label_probs(judge_server(mode), "m", bestofn.pointwise_messages("q", "abc", None),
                                               bestofn.SCORE_LABELS, args)
    assert (probs, how) == (None, "failed") and re.search(why, err), err
    assert len(StubJudge.requests) == tries


def test_judge_timeout_bounds_the_whole_request_of_a_trickling_server(judge_server):
    args = bestofn.Args(judge_retries=0, judge_timeout=0.5)
    t0 = time.monotonic()
    probs, how, err = bestofn.http_label_probs(judge_server("trickle"), "m", bestofn.pointwise_messages("q", "abc", None),
                                               bestofn.SCORE_LABELS, args)
    assert time.monotonic() - t0 < 1.5  # the body alone takes > 5 s at the server's pace
    assert (probs, how) == (None, "failed") and "--judge-timeout 0.5 s" in err


def test_unreadable_judgment_scores_nan_is_counted_and_never_selected():
    args = bestofn.Args(judge_url="http://127.0.0.1:9/v1", judge_retries=0, judge_timeout=1)  # closed port
    scores, hows, errs = bestofn.make_scorer(args, pairwise=False, url=args.judge_url)([("q", None, "a"), ("q", None, "b")])
    assert all(math.isnan(x) for x in scores) and hows == ["failed", "failed"] and all(errs)
    assert bestofn.select_best(torch.tensor([math.nan, 0.2, math.nan])).item() == 1
    assert bestofn.finite_mean([math.nan, 1.0, None, 3.0]) == 2.0 and math.isnan(bestofn.finite_mean([math.nan]))


def strict_json(text: str):
    def reject(name):
        raise ValueError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=reject)


def test_end_to_end_with_url_judge_picks_the_max_and_cancels_position_bias(tiny_lm_dir, judge_server, tmp_path):
    out = tmp_path / "bon.jsonl"
    bestofn.main(["--model", str(tiny_lm_dir), "--judge-url", judge_server("ok"), "--n", "5", "--batch-size", "2",
                  "--max-new-tokens", "6", "--max-prompts", "3", "--eval", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    pairwise = [b["messages"][0]["content"] for _, b in StubJudge.requests if b["messages"][0]["content"].startswith("Which")]
    for r in rows:
        assert len(r["candidates"]) == 5
        assert r["scores"] == [float(1 + len(c) % 9) for c in r["candidates"]]
        assert r["best_index"] == naive_best(r["scores"]) and r["best"] == r["candidates"][r["best_index"]]
        if r["single"] != r["best"]:  # asked twice, best first then best second
            assert r["eval_p_a"] == [1.0, 1.0] and r["win"] == 0.5 and r["win_soft"] == 0.5
            assert sum(f"Answer A:\n{r['best']}\n\nAnswer B:\n{r['single']}" in c for c in pairwise) >= 1
            assert sum(f"Answer A:\n{r['single']}\n\nAnswer B:\n{r['best']}" in c for c in pairwise) >= 1
    summary = json.loads((tmp_path / "bon.jsonl.summary.json").read_text())
    assert summary["eval"]["win_rate"] == 0.5 and summary["eval"]["ci95"] == [0.5, 0.5]
    assert summary["kl_upper_bound"] == pytest.approx(math.log(5) - 0.8)
    assert summary["best_score_mean"] >= summary["candidate_score_mean"]
    assert summary["judge_reads"]["logprobs"] == 15


def test_unscored_values_are_null_in_the_output_and_the_summary(tiny_lm_dir, judge_server, tmp_path):
    out = tmp_path / "bon.jsonl"
    bestofn.main(["--model", str(tiny_lm_dir), "--judge-url", judge_server("mixed"), "--n", "4", "--batch-size", "4",
                  "--max-new-tokens", "4", "--max-prompts", "2", "--eval", "--judge-retries", "0", "--output", str(out)])
    rows = [strict_json(line) for line in out.read_text().splitlines()]  # no bare NaN anywhere
    summary = strict_json((tmp_path / "bon.jsonl.summary.json").read_text())
    assert [r["scores"].count(None) for r in rows] == [2, 2] and summary["unscored_candidates"] == 4
    for r in rows:
        assert r["judge_reads"]["failed"] == 2 and "is not {token: str, logprob: number}" in r["judge_error"]
        assert r["best_score"] == max(s for s in r["scores"] if s is not None)


def test_a_judge_failing_every_request_stops_the_run_with_its_message_and_keeps_nothing(tiny_lm_dir, judge_server, tmp_path):
    out = tmp_path / "bon.jsonl"
    args = ["--model", str(tiny_lm_dir), "--judge-url", judge_server("401"), "--n", "2", "--batch-size", "2",
            "--max-new-tokens", "3", "--max-prompts", "5", "--judge-retries", "2", "--output", str(out)]
    with pytest.raises(SystemExit) as e:
        bestofn.main(args)
    msg = str(e.value)
    assert "every judge request failed for 3 prompts in a row" in msg and "HTTP 401" in msg and "invalid api key" in msg
    assert "\n" not in msg and len(StubJudge.requests) == 3 * 2  # 401 is not retried
    assert out.read_text() == ""  # the failed prompts are left to --resume
    args[args.index("--judge-url") + 1] = judge_server("ok")
    bestofn.main(args + ["--resume"])
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- processes, resume
def run_args(lm, rm, out, prompts=5, n=3, batch=2):
    return ["--model", str(lm), "--reward-model", str(rm), "--num-samples", str(n), "--batch-size", str(batch),
            "--max-new-tokens", "6", "--max-prompts", str(prompts), "--eval", "--seed", "7", "--output", str(out)]


def copy_run(src, dst, keep_bytes):
    dst.write_bytes(src.read_bytes()[:keep_bytes])
    shutil.copy(f"{src}.args.json", f"{dst}.args.json")


def test_two_processes_write_the_same_file_as_one_and_resume_it(tiny_lm_dir, tiny_rm_dir, tmp_path, cpu_only):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, str(ROOT / "bestofn.py"), *run_args(tiny_lm_dir, tiny_rm_dir, one)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    run_torchrun("bestofn.py", run_args(tiny_lm_dir, tiny_rm_dir, two), nproc=2)  # 5 prompts: an uneven last round
    assert len(one.read_text().splitlines()) == 5
    assert two.read_bytes() == one.read_bytes()
    assert json.loads((tmp_path / "two.jsonl.summary.json").read_text())["processes"] == 2
    # a 1-process file cut mid-row, resumed by 2 processes, ends as the full file
    three = tmp_path / "three.jsonl"
    lines = one.read_bytes().splitlines(keepends=True)
    copy_run(one, three, len(b"".join(lines[:2])) + 40)
    run_torchrun("bestofn.py", run_args(tiny_lm_dir, tiny_rm_dir, three) + ["--resume"], nproc=2)
    assert three.read_bytes() == one.read_bytes()


def test_resume_of_half_written_output_equals_one_full_run(tiny_lm_dir, tiny_rm_dir, tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, full, prompts=4))
    lines = full.read_bytes().splitlines(keepends=True)
    copy_run(full, part, len(b"".join(lines[:2])) + len(lines[2]) // 2)  # 2 rows + a torn third
    with pytest.raises(SystemExit, match="pass --resume"):
        bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, part, prompts=4))
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, part, prompts=4) + ["--resume"])
    assert part.read_bytes() == full.read_bytes()


def test_prompts_batched_together_sample_what_they_sample_alone_and_resume_mid_batch(tiny_lm_dir, tiny_rm_dir, tmp_path):
    # n = 2 (+1 single) with --batch-size 6: two prompts per generate call
    mixed, alone, part = tmp_path / "mixed.jsonl", tmp_path / "alone.jsonl", tmp_path / "part.jsonl"
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, mixed, prompts=4, n=2, batch=6))
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, alone, prompts=4, n=2, batch=1))
    m = [json.loads(line) for line in mixed.read_text().splitlines()]
    a = [json.loads(line) for line in alone.read_text().splitlines()]
    assert [(r["candidates"], r["single"]) for r in m] == [(r["candidates"], r["single"]) for r in a]
    for rm_, ra in zip(m, a):
        assert rm_["scores"] == pytest.approx(ra["scores"], abs=1e-5)
    copy_run(mixed, part, len(mixed.read_text().splitlines()[0]) + 1)  # row 0 done, its batch-mate row 1 not
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, part, prompts=4, n=2, batch=6) + ["--resume"])
    assert part.read_bytes() == mixed.read_bytes()


@pytest.mark.parametrize("n,batch,prompts,calls", [(3, 3, 3, [3, 3, 3, 3]),   # 4 samples per prompt > 3: 3 prompts fill 4 calls
                                                    (2, 6, 4, [6, 6]),         # 3 per prompt: 2 prompts per call
                                                    (2, 7, 3, [6, 3])])        # a partial chunk at the end
def test_generate_calls_hold_several_prompts_and_at_most_batch_size_sequences(tiny_lm_dir, tiny_rm_dir, tmp_path,
                                                                               monkeypatch, n, batch, prompts, calls):
    sizes, real = [], bestofn.rollout
    monkeypatch.setattr(bestofn, "rollout", lambda model, ids, keys, *a: sizes.append(len(ids)) or real(model, ids, keys, *a))
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, tmp_path / "bon.jsonl", prompts=prompts, n=n, batch=batch))
    assert sizes == calls


def test_a_policy_without_a_generation_eos_stops_at_the_tokenizers_eos(tiny_tokenizer, tiny_rm_dir, tmp_path, monkeypatch):
    lm = tmp_path / "lm"
    make_tiny_llama(len(tiny_tokenizer), eos_token_id=None).save_pretrained(lm)  # generation_config has no eos
    tiny_tokenizer.save_pretrained(lm)
    seen, real = [], bestofn.rollout
    monkeypatch.setattr(bestofn, "rollout", lambda m, ids, keys, a, eos, *r: seen.append(eos) or real(m, ids, keys, a, eos, *r))
    bestofn.main(run_args(lm, tiny_rm_dir, tmp_path / "bon.jsonl", prompts=1))
    assert seen == [[tiny_tokenizer.eos_token_id]] * 2 and len((tmp_path / "bon.jsonl").read_text().splitlines()) == 1


def test_resume_refuses_a_corrupt_middle_line_and_keeps_the_file(tiny_lm_dir, tiny_rm_dir, tmp_path):
    out = tmp_path / "bon.jsonl"
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out, prompts=3))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(lines[0] + lines[1][:30] + b"\n" + lines[2])  # line 2 cut, but a row follows it
    before = out.read_bytes()
    with pytest.raises(SystemExit, match=r"line 2 is unreadable .* rows follow it"):
        bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out, prompts=3) + ["--resume"])
    assert out.read_bytes() == before


@pytest.mark.parametrize("flag,value", [("--seed", "8"), ("--num-samples", "4"), ("--temperature", "0.7"),
                                        ("--top-p", "0.9"), ("--max-new-tokens", "7"), ("--reward-model", "LM"),
                                        ("--eval-judge-model", "LM"), ("--model", "RM")])
def test_resume_refuses_flags_that_change_results_naming_the_flag(tiny_lm_dir, tiny_rm_dir, tmp_path, flag, value):
    out = tmp_path / "bon.jsonl"
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out, prompts=1))
    value = {"LM": str(tiny_lm_dir), "RM": str(tiny_rm_dir)}.get(value, value)
    base = run_args(tiny_lm_dir, tiny_rm_dir, out, prompts=2) + ["--resume"]
    argv = base[:base.index(flag)] + base[base.index(flag) + 2:] if flag in base else base
    with pytest.raises(SystemExit, match=f"--resume: {flag.replace('num-samples', 'n')} is .* but .* was written with"):
        bestofn.main(argv + [flag, value])
    bestofn.main(base + ["--batch-size", "3"])  # not a result flag: resumes
    assert len(out.read_text().splitlines()) == 2


def test_resume_refuses_an_output_made_from_other_prompts(tiny_lm_dir, tiny_rm_dir, tmp_path):
    out = tmp_path / "bon.jsonl"
    bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out, prompts=1))
    out.write_text(json.dumps({"index": 0, "prompt": "something else"}) + "\n")
    with pytest.raises(SystemExit, match="does not match --prompts"):
        bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out) + ["--resume"])
    os.remove(f"{out}.args.json")
    with pytest.raises(SystemExit, match="has rows but no bon.jsonl.args.json"):
        bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out) + ["--resume"])
    (tmp_path / "bon.jsonl.args.json").write_text('{"seed": 7, "n"')  # cut short
    with pytest.raises(SystemExit, match="bon.jsonl.args.json is corrupt, so --resume cannot check the flags"):
        bestofn.main(run_args(tiny_lm_dir, tiny_rm_dir, out) + ["--resume"])


# ----------------------------------------------------------------------------- bad input: one line, before any model loads
@pytest.mark.parametrize("extra,message", [
    (["--dtype", "float64"], "--dtype must be auto, float32, bfloat16 or float16"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--judge-timeout", "0"], "--judge-timeout must be > 0"),
    (["--judge-retries", "-1"], "--judge-retries must be >= 0"),
    (["--max-prompts", "-2"], "--max-prompts must be >= 0"),
    (["--eval-judge-model", "x"], "need --eval"),
    (["--judge-model", "x"], "one selection scorer"),
    (["--report-to", "x"], "none, tensorboard or wandb"),
])
def test_bad_flags_get_one_line_before_any_model_loads(extra, message):
    with pytest.raises(SystemExit, match=message) as e:
        bestofn.main(["--model", "/nonexistent/policy", "--reward-model", "/nonexistent/rm", *extra])
    assert "\n" not in str(e.value)


def test_bad_data_files_get_one_line_with_a_one_based_line_number(tmp_path):
    def load(name, data, **kw):
        path = tmp_path / name
        path.write_bytes(data)
        return bestofn.load_prompts(bestofn.Args(prompts=str(path), **kw))

    cases = [("a.jsonl", b'{"prompt": "hei"}\n{"prompt": "caf\xe9"}\n', r"a.jsonl line 2 is not UTF-8 \(invalid continuation byte\); re-save the file as UTF-8"),
             ("b.jsonl", b'\n[1, 2]\n', r"b.jsonl line 2 is a JSON list, not an object; write one JSON object per line"),
             ("c.jsonl", b'{"prompt": "hei"}\n{"prompt": \n', r"c.jsonl line 2 is not valid JSON"),
             ("d.jsonl", b'{"prompt": "hei"}\n{"text": "hola"}\n', r'row 2 has no text field "prompt"; pass --prompt-field NAME'),
             ("e.json", b'[{"prompt": "a"}, 3]', r"e.json element 2 is a JSON int, not an object"),
             ("f.jsonl", b"\n\n", "holds no prompts")]
    for name, data, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            load(name, data)
        assert "\n" not in str(e.value)
    assert [r["prompt"] for r in load("g.json", b'[{"prompt": "a"}, {"prompt": "b", "reference": "B"}]')] == ["a", "b"]
    assert load("h.jsonl", b'{"text": "hei", "ref": "hi"}\n\n{"text": "hola"}\n', prompt_field="text", reference_field="ref") == [
        {"prompt": "hei", "reference": "hi"}, {"prompt": "hola", "reference": None}]
    assert load("i.csv", "prompt,reference\nhei,hi\n".encode()) == [{"prompt": "hei", "reference": "hi"}]
    with pytest.raises(SystemExit, match="no such file, and the hub has no data set of that name .*unset HF_HUB_OFFLINE"):
        bestofn.load_prompts(bestofn.Args(prompts=str(tmp_path / "missing.jsonl")))


def test_model_paths_without_a_model_get_one_line(tmp_path, tiny_rm_dir):
    (tmp_path / "empty").mkdir()
    cases = [(str(tmp_path / "empty"), "is a folder without a model \\(no config.json\\)"),
             ("./runs/nope", "does not exist"), ("~/nope-model", "does not exist")]
    for path, message in cases:
        with pytest.raises(SystemExit, match=f"--model .* {message}"):
            bestofn.main(["--model", path, "--reward-model", str(tiny_rm_dir), "--output", str(tmp_path / "x.jsonl")])
    assert not (tmp_path / "x.jsonl").exists()


def test_prompts_longer_than_the_context_are_skipped_and_counted(tiny_lm_dir, tiny_rm_dir, tmp_path, capsys):
    out = tmp_path / "bon.jsonl"
    args = run_args(tiny_lm_dir, tiny_rm_dir, out, prompts=2)
    args[args.index("--max-new-tokens") + 1] = "500"  # tiny model: 512 positions
    bestofn.main(args)
    summary = json.loads((tmp_path / "bon.jsonl.summary.json").read_text())
    assert out.read_text() == "" and summary["skipped_too_long"] == 2 and summary["eval"]["win_rate"] is None
    printed = capsys.readouterr().out
    assert "2 prompts skipped" in printed and "lower --max-new-tokens" in printed


def test_judge_inputs_longer_than_the_judges_context_are_skipped_and_counted(tiny_lm_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hola", "reference": "Madrid es la capital. " * 60}) + "\n"  # ~700 tokens
                       + json.dumps({"prompt": "Hei", "reference": "Oslo"}) + "\n")
    out = tmp_path / "bon.jsonl"
    bestofn.main(["--model", str(tiny_lm_dir), "--judge-model", str(tiny_lm_dir), "--prompts", str(prompts), "--n", "2",
                  "--batch-size", "4", "--max-new-tokens", "3", "--eval", "--output", str(out)])
    long, short = [json.loads(line) for line in out.read_text().splitlines()]
    assert long["scores"] == [None, None] and long["best_score"] is None and long["judge_reads"]["too_long"] == 2
    if long["single"] != long["best"]:
        assert long["win"] is None and long["judge_reads"]["eval_too_long"] == 2
    assert None not in short["scores"] and "too_long" not in short["judge_reads"]
    summary = json.loads((tmp_path / "bon.jsonl.summary.json").read_text())
    assert summary["unscored_candidates"] == 2 and summary["judge_reads"]["too_long"] == 2


def test_in_process_llm_judge_scores_are_the_expected_digit_and_both_orders_are_recorded(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bon.jsonl"
    bestofn.main(["--model", str(tiny_lm_dir), "--judge-model", str(tiny_lm_dir), "--n", "3", "--batch-size", "2",
                  "--max-new-tokens", "5", "--max-prompts", "2", "--eval", "--output", str(out),
                  "--dtype", "float32"])  # the check below runs the judge in float32 on CPU
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 10)]  # the tiny vocab has no " k" tokens
    ab = [tok.convert_tokens_to_ids(x) for x in "AB"]
    prompts = bestofn.load_prompts(bestofn.Args())

    def next_probs(messages):
        text = bestofn.chat_text(tok, messages, True)
        with torch.no_grad():
            return torch.softmax(plain(torch.tensor([tok(text, add_special_tokens=False).input_ids])).logits[0, -1].double(), -1)
    for line in out.read_text().splitlines():
        r = json.loads(line)
        ref = prompts[r["index"]]["reference"]
        for y, s in zip(r["candidates"], r["scores"]):
            p = next_probs(bestofn.pointwise_messages(r["prompt"], y, ref))
            assert s == pytest.approx(sum((k + 1) * p[t].item() for k, t in enumerate(digits)) / sum(p[t].item() for t in digits), abs=1e-5)
        if r["single"] != r["best"]:
            p1 = next_probs(bestofn.pairwise_messages(r["prompt"], r["best"], r["single"], ref))
            p2 = next_probs(bestofn.pairwise_messages(r["prompt"], r["single"], r["best"], ref))
            want = [(p[ab[0]] / (p[ab[0]] + p[ab[1]])).item() for p in (p1, p2)]
            assert r["eval_p_a"] == pytest.approx(want, abs=1e-5)
        q = (r["eval_p_a"][0] + 1 - r["eval_p_a"][1]) / 2
        assert r["win_soft"] == pytest.approx(q, abs=1e-12) and r["win"] == (1.0 if q > 0.5 else 0.0 if q < 0.5 else 0.5)


def test_report_to_needs_its_backend(tiny_lm_dir, tiny_rm_dir, tmp_path):
    import importlib.util

    args = run_args(tiny_lm_dir, tiny_rm_dir, tmp_path / "bon.jsonl", prompts=1) + ["--report-to", "tensorboard"]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            bestofn.main(args)
    else:
        bestofn.main(args)
        assert (tmp_path / "bon.jsonl.tb").is_dir()
