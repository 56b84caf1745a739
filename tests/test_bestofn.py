"""bestofn.py: selection, KL bound, win-rate ceiling, judge scores, win rate + CI checked against
plain loops and hand-computed numbers; end-to-end runs on the tiny models (1 vs 2 processes,
resume of a half-written file, a fake OpenAI-compatible judge server)."""
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import bestofn
from conftest import ROOT, run_torchrun

Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- selection
def naive_best(scores: list[float]) -> int:
    best = None
    for i, s in enumerate(scores):
        if math.isnan(s):
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


def test_win_rate_and_intervals_match_hand_computed_judgments_with_order_swaps():
    # (judge says A with best as A, judge says A with best as B) -> best's per-prompt win
    cases = [(1.0, 0.0, 1.0),    # best wins in both orders
             (1.0, 1.0, 0.5),    # judge always picks A: position bias cancels to a tie
             (0.0, 1.0, 0.0),    # single sample wins in both orders
             (0.5, 0.0, 0.75)]   # a tie, then a win
    wins = []
    for o1, o2, want in cases:
        assert bestofn.win_both_orders(o1, o2) == want
        wins.append(want)
    assert bestofn.preference(0.7, 0.2) == 1.0 and bestofn.preference(0.1, 0.2) == 0.0
    assert bestofn.preference(0.3, 0.3) == 0.5
    r = bestofn.win_rate_ci(wins)
    assert r["win_rate"] == 0.5625 and r["num_prompts"] == 4
    # normal: sd (ddof 1) of [1, .5, 0, .75] = sqrt(0.546875 / 3)
    se = math.sqrt(0.546875 / 3) / 2
    assert r["ci95_normal"] == pytest.approx([0.5625 - Z95 * se, 0.5625 + Z95 * se], abs=1e-12)
    # Wilson, by hand: p = 9/16, m = 4
    z2 = Z95 ** 2
    centre = (0.5625 + z2 / 8) / (1 + z2 / 4)
    half = Z95 / (1 + z2 / 4) * math.sqrt(0.5625 * 0.4375 / 4 + z2 / 64)
    assert r["ci95_wilson"] == pytest.approx([centre - half, centre + half], abs=1e-12)


def test_wilson_interval_matches_published_values():
    # 5/10 -> [0.2366, 0.7634]; 0/10 -> [0, 0.2775]; 10/10 -> [0.7225, 1] (standard tables)
    assert bestofn.win_rate_ci([1.0] * 5 + [0.0] * 5)["ci95_wilson"] == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert bestofn.win_rate_ci([0.0] * 10)["ci95_wilson"] == pytest.approx([0.0, 0.2775], abs=1e-4)
    r = bestofn.win_rate_ci([1.0] * 10)
    assert r["ci95_wilson"] == pytest.approx([0.7225, 1.0], abs=1e-4) and r["ci95_normal"] == [1.0, 1.0]


def test_prompt_seed_depends_on_seed_index_and_stream_only():
    assert bestofn.prompt_seed(0, 5, "bon") == bestofn.prompt_seed(0, 5, "bon")
    seeds = {bestofn.prompt_seed(s, i, t) for s in (0, 1) for i in range(50) for t in ("bon", "single")}
    assert len(seeds) == 200 and all(0 <= s < 2 ** 63 for s in seeds)


# ----------------------------------------------------------------------------- models
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


def test_reward_model_pairwise_judgment_is_bradley_terry(tiny_rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_rm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    pair = bestofn.make_pairwise_judge(bestofn.Args(), rm=(rm, tok))
    for a, b in [("Madrid.", "Es Madrid, claro."), ("hola", "hola"), ("", "x")]:
        ra, rb = bestofn.reward_model_scores(rm, tok, "¿Capital de España?", [a, b], batch_size=4)
        hard, soft, how = pair("¿Capital de España?", None, a, b)
        assert how == "reward" and hard == (1.0 if ra > rb else 0.0 if rb > ra else 0.5)
        assert soft == pytest.approx(1 / (1 + math.exp(-(ra - rb))), abs=1e-12)


def test_judge_label_probs_with_left_padding_match_one_sequence_at_a_time(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    lm, tok = bestofn.load_causal_lm(str(tiny_lm_dir), torch.float32, torch.device("cpu"), "--judge-model")
    ids = bestofn.label_token_ids(tok, bestofn.SCORE_LABELS)
    texts = [bestofn.chat_text(tok, bestofn.pointwise_messages("¿Cuánto es 15 más 27?", y, ref), True)
             for y, ref in [("42", None), ("Son cuarenta y dos, creo yo.", "42"), ("", None)]]
    got = bestofn.next_token_label_probs(lm, tok, texts, ids, batch_size=3)
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    for t, row in zip(texts, got):
        x = torch.tensor([tok(t, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(plain(x).logits[0, -1].double(), -1)
        want = [sum(math.exp(logp[i].item()) for i in label) for label in ids]
        assert row.tolist() == pytest.approx(want, abs=1e-6)


# ----------------------------------------------------------------------------- fake judge server
class FakeJudge(BaseHTTPRequestHandler):
    """Pointwise: one-hot logprob on digit 1 + len(answer) % 9 (a programmatic reward).
    Pairwise: always answers "A" as text, with no logprobs (a fully position-biased judge)."""
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append(body)
        content = body["messages"][0]["content"]
        if content.startswith("Which answer"):
            choice = {"message": {"content": "A"}, "logprobs": None}
        else:
            answer = content.split("Answer:\n", 1)[1]
            digit = str(1 + len(answer) % 9)
            choice = {"message": {"content": digit},
                      "logprobs": {"content": [{"token": digit, "logprob": 0.0,
                                                "top_logprobs": [{"token": " " + digit, "logprob": 0.0},
                                                                 {"token": "x", "logprob": -1.0}]}]}}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture()
def fake_judge_url():
    FakeJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_http_judge_reads_logprobs_then_text_and_counts_failures(fake_judge_url):
    args = bestofn.Args(judge_retries=1, judge_timeout=5)
    probs, how = bestofn.http_label_probs(fake_judge_url, "m", bestofn.pointwise_messages("q", "abc", None),
                                          bestofn.SCORE_LABELS, args)
    assert how == "logprobs" and probs == [0.0, 0.0, 0.0, 1.0] + [0.0] * 5  # " 4" read as label "4"
    probs, how = bestofn.http_label_probs(fake_judge_url, "m", bestofn.pairwise_messages("q", "a", "b", None),
                                          bestofn.PAIR_LABELS, args)
    assert how == "text" and probs == [1.0, 0.0]
    assert FakeJudge.requests[0]["logprobs"] is True and FakeJudge.requests[0]["max_tokens"] == 1
    probs, how = bestofn.http_label_probs("http://127.0.0.1:9/v1", "m", [], bestofn.PAIR_LABELS, args)  # closed port
    assert (probs, how) == (None, "failed")


def test_unreadable_judgment_scores_nan_is_counted_and_never_selected():
    args = bestofn.Args(judge_url="http://127.0.0.1:9/v1", judge_retries=0, judge_timeout=1)  # closed port
    scores, counts = bestofn.make_pointwise_scorer(args)("q", None, ["a", "b"])
    assert all(math.isnan(x) for x in scores) and counts == {"failed": 2}
    assert bestofn.select_best(torch.tensor([math.nan, 0.2, math.nan])).item() == 1
    assert bestofn.finite_mean([math.nan, 1.0, 3.0]) == 2.0 and math.isnan(bestofn.finite_mean([math.nan]))


def test_end_to_end_with_url_judge_picks_the_max_and_cancels_position_bias(tiny_lm_dir, fake_judge_url, tmp_path):
    out = tmp_path / "bon.jsonl"
    bestofn.main(["--model", str(tiny_lm_dir), "--judge-url", fake_judge_url, "--n", "5", "--batch-size", "2",
                  "--max-new-tokens", "6", "--max-prompts", "3", "--eval", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    pairwise = [q["messages"][0]["content"] for q in FakeJudge.requests if q["messages"][0]["content"].startswith("Which")]
    for r in rows:
        assert len(r["candidates"]) == 5
        assert r["scores"] == [float(1 + len(c) % 9) for c in r["candidates"]]
        assert r["best_index"] == naive_best(r["scores"]) and r["best"] == r["candidates"][r["best_index"]]
        if r["single"] != r["best"]:  # asked twice, best first then best second
            assert r["eval_a_wins"] == [1.0, 1.0] and r["win"] == 0.5
            assert r["eval_p_a"] == [1.0, 1.0] and r["win_soft"] == 0.5
            assert sum(f"Answer A:\n{r['best']}\n\nAnswer B:\n{r['single']}" in c for c in pairwise) >= 1
            assert sum(f"Answer A:\n{r['single']}\n\nAnswer B:\n{r['best']}" in c for c in pairwise) >= 1
    summary = json.loads((tmp_path / "bon.jsonl.summary.json").read_text())
    assert summary["eval"]["win_rate"] == 0.5
    assert summary["kl_upper_bound"] == pytest.approx(math.log(5) - 0.8)
    assert summary["best_score_mean"] >= summary["candidate_score_mean"]
    assert summary["judge_reads"]["logprobs"] == 15


# ----------------------------------------------------------------------------- processes, resume, errors
def run_args(lm, rm, out, prompts=5):
    return ["--model", lm, "--reward-model", rm, "--num-samples", "3", "--batch-size", "2", "--max-new-tokens", "6",
            "--max-prompts", str(prompts), "--eval", "--seed", "7", "--output", out]


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
    three.write_bytes(b"".join(lines[:2]) + lines[2][:40])
    run_torchrun("bestofn.py", run_args(tiny_lm_dir, tiny_rm_dir, three) + ["--resume"], nproc=2)
    assert three.read_bytes() == one.read_bytes()


def test_resume_of_half_written_output_equals_one_full_run(tiny_lm_dir, tiny_rm_dir, tmp_path):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    bestofn.main(run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(full), prompts=4))
    lines = full.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # 2 rows + a truncated third
    with pytest.raises(SystemExit, match="pass --resume"):
        bestofn.main(run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(part), prompts=4))
    bestofn.main(run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(part), prompts=4) + ["--resume"])
    assert part.read_bytes() == full.read_bytes()


def test_resume_refuses_an_output_made_from_other_prompts_or_flags(tiny_lm_dir, tiny_rm_dir, tmp_path):
    out = tmp_path / "bon.jsonl"
    out.write_text(json.dumps({"index": 0, "prompt": "something else"}) + "\n")
    with pytest.raises(SystemExit, match="does not match --prompts"):
        bestofn.main(run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(out)) + ["--resume"])
    out.write_text(json.dumps({"index": 0, "prompt": "Hva er hovedstaden i Norge?", "candidates": ["a"]}) + "\n")
    with pytest.raises(SystemExit, match="other --n/--eval settings"):
        bestofn.main(run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(out)) + ["--resume"])


def test_row_without_prompt_field_gives_clear_error(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hei"}\n{"text": "hola"}\n')
    with pytest.raises(SystemExit, match=r'row 1 has no text field "prompt"; pass --prompt-field NAME'):
        bestofn.load_prompts(bestofn.Args(prompts=str(bad)))
    good = tmp_path / "q.jsonl"
    good.write_text('{"text": "hei", "ref": "hi"}\n\n{"text": "hola"}\n')
    rows = bestofn.load_prompts(bestofn.Args(prompts=str(good), prompt_field="text", reference_field="ref"))
    assert rows == [{"prompt": "hei", "reference": "hi"}, {"prompt": "hola", "reference": None}]


def test_prompts_longer_than_the_context_are_skipped_and_counted(tiny_lm_dir, tiny_rm_dir, tmp_path):
    out = tmp_path / "bon.jsonl"
    args = run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(out), prompts=2)
    args[args.index("--max-new-tokens") + 1] = "500"  # tiny model: 512 positions
    bestofn.main(args)
    summary = json.loads((tmp_path / "bon.jsonl.summary.json").read_text())
    assert out.read_text() == "" and summary["skipped_too_long"] == 2 and summary["eval"]["win_rate"] is None


def test_in_process_llm_judge_scores_are_the_expected_digit_and_both_orders_are_recorded(tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bon.jsonl"
    bestofn.main(["--model", str(tiny_lm_dir), "--judge-model", str(tiny_lm_dir), "--n", "3", "--batch-size", "2",
                  "--max-new-tokens", "5", "--max-prompts", "2", "--eval", "--output", str(out),
                  "--dtype", "float32"])  # the check below runs the judge in float32 on CPU
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 10)]  # the tiny vocab has no " k" tokens
    prompts = bestofn.load_prompts(bestofn.Args())
    for line in out.read_text().splitlines():
        r = json.loads(line)
        for y, s in zip(r["candidates"], r["scores"]):
            text = bestofn.chat_text(tok, bestofn.pointwise_messages(r["prompt"], y, prompts[r["index"]]["reference"]), True)
            with torch.no_grad():
                p = torch.softmax(plain(torch.tensor([tok(text, add_special_tokens=False).input_ids])).logits[0, -1].double(), -1)
            want = sum((k + 1) * p[t].item() for k, t in enumerate(digits)) / sum(p[t].item() for t in digits)
            assert s == pytest.approx(want, abs=1e-5)
        p1, p2 = r["eval_p_a"]
        assert r["win_soft"] == pytest.approx((p1 + 1 - p2) / 2) and r["win"] == (r["eval_a_wins"][0] + 1 - r["eval_a_wins"][1]) / 2


def test_report_to_needs_its_backend(tiny_lm_dir, tiny_rm_dir, tmp_path):
    import importlib.util

    args = run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(tmp_path / "bon.jsonl"), prompts=1) + ["--report-to", "tensorboard"]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            bestofn.main(args)
    else:
        bestofn.main(args)
        assert (tmp_path / "bon.jsonl.tb").is_dir()
    with pytest.raises(SystemExit, match="none, tensorboard or wandb"):
        bestofn.main(run_args(str(tiny_lm_dir), str(tiny_rm_dir), str(tmp_path / "b2.jsonl"), prompts=1) + ["--report-to", "x"])
