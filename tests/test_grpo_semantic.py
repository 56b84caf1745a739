"""grpo_semantic.py: every reward, advantage and loss against a naive float64 version, PEFT adapters,
the language check, the encoder stage on a tiny BERT, and end-to-end runs on a tiny model (learning,
resume, checkpoints, DDP), bad input."""
import contextlib
import copy
import itertools
import json
import math
import random
import re
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import grpo_semantic as gs
from conftest import ROOT, make_tiny_llama, run_torchrun


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: with 2 threads on a busy 2-core machine, each small op waits for the other thread
    (1000 32x32 matmuls: 2.1 s with 2 threads, 0.03 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- rewards
def naive_shaped(s, tau):
    return 0.0 if s <= tau else (s - tau) / (1.0 - tau)


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.83, -0.2])
def test_similarity_shaping_is_zero_at_and_below_tau_and_linear_above(tau):
    s = [tau, tau - 1e-6, tau + 1e-6, tau - 0.3, tau + 0.1, 1.0, -1.0, (tau + 1) / 2]
    got = gs.shaped_similarity(torch.tensor(s, dtype=torch.float64), tau)
    want = [naive_shaped(x, tau) for x in s]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    assert got[0] == 0.0 and got[5] == pytest.approx(1.0)  # s = tau gives 0, s = 1 gives exactly 1


def test_combined_reward_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(37, generator=g, dtype=torch.float64) * 2 - 1
    lang = (torch.rand(37, generator=g) > 0.5).double()
    for tau, ls, ll in [(0.3, 1.5, 1.0), (0.7, 2.0, 0.5), (-0.1, 1.0, 0.0)]:
        want = [ls * naive_shaped(float(si), tau) + ll * float(li) for si, li in zip(s, lang)]
        assert gs.semantic_reward(s, lang, tau, ls, ll).tolist() == pytest.approx(want, abs=1e-12)


# Expected counts written by hand: letters (incl. script vowel signs) per script; digits,
# punctuation (the Tibetan tsheg, the Chinese comma), symbols and spaces are neutral.
SCRIPT_CASES = [
    ("བོད་ཡིག 123", "tibetan", 6, 6),          # བ ོ ད ཡ ི ག ; ་ is punctuation
    ("你好，世界! ok", "han", 4, 6),              # 4 Han + o, k
    ("Hvor er togstasjonen? 42", "latin", 18, 18),
    ("Привет, world!", "cyrillic", 6, 11),
    ("مرحبا 2024 hi", "arabic", 5, 7),
    ("नमस्ते दुनिया", "devanagari", 12, 12),     # न म स ् त े + द ु न ि य ा (virama and signs are marks)
    ("Søsteren min bor i Bergen. Москва", "latin", 21, 27),
    ("Ελληνικά abc", "latin", 3, 11),          # Greek letters are letters of "other" scripts
]


@pytest.mark.parametrize("text,script,n_target,n_letters", SCRIPT_CASES)
def test_script_fraction_on_mixed_strings(text, script, n_target, n_letters):
    assert gs.script_fraction(text, script) == pytest.approx(n_target / n_letters)
    want = 1.0 if n_target / n_letters >= 0.9 else 0.0
    assert gs.script_reward(text, script, 0.9) == want


def test_each_script_is_detected_and_neutral_characters_are_neutral():
    samples = {"tibetan": "ཀ", "han": "中", "latin": "é", "cyrillic": "ж", "arabic": "ب", "devanagari": "क"}
    for script, ch in samples.items():
        assert gs.char_script(ch) == script
    for ch in " \t\n0123456789.,;:!?-()[]«»་།，。١٢३४༢+$€©":
        assert gs.char_script(ch) is None, repr(ch)
    assert gs.char_script("\u0301") is None  # a combining accent outside every block: neutral


def test_empty_or_all_neutral_output_gets_no_language_reward():
    for text in ["", "   ", "123 456", "?!…", "་།"]:
        assert gs.script_fraction(text, "latin") is None
        assert gs.script_reward(text, "latin", 0.0) == 0.0


def test_script_threshold_decides_mixed_outputs():
    text = "абвгдеёжзf"  # 9 Cyrillic letters of 10
    assert gs.script_reward(text, "cyrillic", 0.9) == 1.0
    assert gs.script_reward(text, "cyrillic", 0.95) == 0.0
    assert gs.script_reward(text, "cyrillic", 1.0) == 0.0
    assert gs.script_reward("абв 12, где!", "cyrillic", 1.0) == 1.0


# ---------------------------------------------------------------------------------- advantages, losses
def test_group_advantages_match_naive_and_zero_spread_gives_zero():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(5, 7, generator=g)
    r[2] = 0.37  # no spread
    r[4, :] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    got = gs.group_advantages(r)
    for b in range(5):
        xs = [float(x) for x in r[b]]
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
        for k in range(7):
            want = 0.0 if sd <= 1e-6 else (xs[k] - m) / sd
            assert float(got[b, k]) == pytest.approx(want, abs=1e-5)
    assert (got[2] == 0).all()


def naive_grpo_loss(logp, old, kl, adv, mask, eps, beta, n_seq):
    total = 0.0
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i][t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            clipped = min(max(ratio, torch.tensor(1 - eps, dtype=ratio.dtype)), torch.tensor(1 + eps, dtype=ratio.dtype))
            terms.append(-min(ratio * adv[i], clipped * adv[i]) + beta * kl[i, t])
        if terms:
            total = total + sum(terms) / len(terms)
    return total / n_seq


def test_clipped_surrogate_matches_naive_loop_values_and_gradients():
    g = torch.Generator().manual_seed(2)
    N, T, eps, beta = 5, 9, 0.2, 0.04
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    # ratios from 0.4 to 2.0: well inside and well outside [1 - eps, 1 + eps]
    logp0 = old + torch.empty(N, T, dtype=torch.float64).uniform_(math.log(0.4), math.log(2.0), generator=g)
    kl0 = torch.rand(N, T, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.0, -2.0, 0.5], dtype=torch.float64)  # negative and zero advantages
    lens = [9, 1, 4, 0, 6]  # one sequence fully masked
    mask = torch.tensor([[t < n for t in range(T)] for n in lens])
    logp0[~mask] = float("inf")  # padding must not leak
    a, b = logp0.clone().requires_grad_(), kl0.clone().requires_grad_()
    loss, clipped = gs.grpo_loss(a, old, b, adv, mask, eps, beta, num_sequences=7)
    loss.backward()
    c = torch.where(mask, logp0, 0.0).requires_grad_()
    d = kl0.clone().requires_grad_()
    want = naive_grpo_loss(c, old, d, adv, mask.tolist(), eps, beta, 7)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    assert torch.allclose(torch.where(mask, a.grad, 0.0), c.grad, atol=1e-12)
    assert torch.allclose(b.grad, d.grad, atol=1e-12)
    ratio = torch.exp(torch.where(mask, logp0, 0.0) - old)
    for i, t in itertools.product(range(N), range(T)):
        want_clip = bool(mask[i, t]) and ((ratio[i, t] > 1 + eps and adv[i] > 0) or (ratio[i, t] < 1 - eps and adv[i] < 0))
        assert bool(clipped[i, t]) == want_clip
    assert clipped.any() and not clipped.all()


def test_k3_matches_formula_and_its_gradient():
    g = torch.Generator().manual_seed(3)
    lp = (-torch.rand(4, 6, generator=g, dtype=torch.float64) * 4).requires_grad_()
    ref = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 4
    k3 = gs.k3_kl(lp, ref, torch.ones(4, 6, dtype=torch.bool))
    k3.sum().backward()
    k3 = k3.detach()
    for i, t in itertools.product(range(4), range(6)):
        r = math.exp(float(ref[i, t]) - float(lp.detach()[i, t]))  # pi_ref / pi
        assert float(k3[i, t]) == pytest.approx(r - math.log(r) - 1, rel=1e-12)
        assert float(lp.grad[i, t]) == pytest.approx(1 - r, rel=1e-10)  # d/dlogp of r - log r - 1
        assert float(k3[i, t]) >= 0


def test_full_kl_term_is_the_exact_full_vocabulary_kl():
    g = torch.Generator().manual_seed(4)
    logits, ref = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    T = 0.8
    mask = torch.ones(2, 3, dtype=torch.bool)
    logp, kl_term, kl_full, ent = gs.token_kl(logits, ref, tokens, mask, T, "full")
    for i, t in itertools.product(range(2), range(3)):
        p = torch.softmax(logits[i, t].double() / T, -1)
        q = torch.softmax(ref[i, t].double() / T, -1)
        assert float(kl_term[i, t]) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-4, abs=1e-6)
        assert float(logp[i, t]) == pytest.approx(float(p[tokens[i, t]].log()), rel=1e-5)
    _, k3, _, _ = gs.token_kl(logits, ref, tokens, mask, T, "k3")
    lq = torch.log_softmax(ref.double() / T, -1).gather(-1, tokens[..., None])[..., 0]
    lpp = torch.log_softmax(logits.double() / T, -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(k3.double(), torch.exp(lq - lpp) - (lq - lpp) - 1, atol=1e-5)


# ---------------------------------------------------------------------------------- ROUGE-L
def naive_lcs(a, b):
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + naive_lcs(a[1:], b[1:])
    return max(naive_lcs(a[1:], b), naive_lcs(a, b[1:]))


def test_lcs_and_rouge_l_match_naive_recursion():
    rng = random.Random(5)
    for _ in range(60):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        lcs = naive_lcs(a, b)
        assert gs.lcs_length(a, b) == lcs
        want = 0.0 if lcs == 0 else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))
        assert gs.rouge_l(a, b) == pytest.approx(want)
    assert gs.rouge_l("the cat sat".split(), "the cat sat".split()) == 1.0
    assert gs.rouge_l([], ["x"]) == 0.0


# ---------------------------------------------------------------------------------- embedder
def test_embedder_cosine_equals_manual_normalised_dot():
    emb = gs.Embedder(gs.embedded_embedder(), torch.device("cpu"), batch_size=2)
    a = ["Været er fint i dag.", "Сегодня хорошая погода.", "", "The weather is nice today."]
    b = ["Det er fint vær i dag.", "Погода сегодня хорошая.", "Hei", "Completely unrelated: tax law."]
    got = gs.cosine(emb(a), emb(b))
    raw_a = emb.model.encode(a, convert_to_tensor=True).double()
    raw_b = emb.model.encode(b, convert_to_tensor=True).double()
    for i in range(len(a)):
        want = float(raw_a[i] @ raw_b[i]) / (float(raw_a[i].norm()) * float(raw_b[i].norm()))
        assert float(got[i]) == pytest.approx(want, abs=1e-5)
    assert got[0] > got[3]  # a paraphrase is closer than an unrelated sentence


# ---------------------------------------------------------------------------------- end to end
def toy_embedder(texts):
    """A stand-in sentence embedder: the direction of (#ASCII letters, #other non-space chars, 0.05),
    so the 'meaning' of the reference "abc" is (1, 0, 0) and s rises with the share of ASCII letters."""
    ascii_letter = lambda c: c.isascii() and c.isalpha()  # noqa: E731
    v = torch.tensor([[sum(map(ascii_letter, t)), sum(not c.isspace() and not ascii_letter(c) for c in t), 0.05]
                      for t in texts])
    return v / v.norm(dim=-1, keepdim=True)


def write_rows(path: Path, n: int, reference="abc", **extra):
    path.write_text("".join(json.dumps({"prompt": f"Skriv o nummer {i}", "reference": reference, "script": "latin", **extra})
                            + "\n" for i in range(n)))
    return path


def base_flags(model_dir, out, train, **kw):
    flags = {"model": model_dir, "output-dir": out, "train-data": train, "sft-data": "", "eval-data": "",
             "general-text": "", "prompts-per-step": 2, "group-size": 4, "max-new-tokens": 6, "steps": 3,
             "lora-r": 4, "lora-alpha": 8, "lora-dropout": 0.0, "lr": 1e-2, "tau": "0", "seed": 3,
             "save-every": 100, "eval-max-new-tokens": 6, "parallel-eval-data": ""}
    flags.update(kw)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def read_metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_semantic_reward_rises_on_a_tiny_model(tmp_path, tiny_tokenizer):
    # initializer_range 0.2: with the default 0.02 the tied output embeddings are so small that
    # no LoRA on the projections can move the next-token distribution far from uniform
    model_dir = tmp_path / "lm"
    make_tiny_llama(len(tiny_tokenizer), seed=0, initializer_range=0.2).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    train = write_rows(tmp_path / "train.jsonl", 4)
    # 30 steps: over seeds 0-5 (and on CUDA's other random streams) the reward of the last 5 steps
    # reaches 1.5 (the maximum) every time; with 12 steps two seeds of six rose by under 0.3
    gs.main(base_flags(model_dir, tmp_path / "run", train, steps=30, **{"group-size": 8, "lora-r": 8, "lora-alpha": 16,
            "lr": 2e-2, "temperature": 1.0, "top-p": 1.0, "beta": 0.0, "lambda-lang": 0.0}), embed_fn=toy_embedder)
    m = read_metrics(tmp_path / "run")
    first = sum(x["reward_mean"] for x in m[:5]) / 5
    last = sum(x["reward_mean"] for x in m[-5:]) / 5
    assert last > first + 0.4 and last > 1.3, (first, last)  # reward = 1.5 R_sim in [0, 1.5]


@pytest.mark.parametrize("lora_r", [4, 0])
def test_resumed_run_reproduces_the_uninterrupted_metrics(tmp_path, tiny_lm_dir, lora_r):
    """PEFT adapters (with dropout) and --lora-r 0 (full fine-tuning, frozen reference) both resume exactly."""
    train = write_rows(tmp_path / "train.jsonl", 9)
    extra = {"tau": "auto", "tau-holdout": 3, "num-iterations": 2, "kl-estimator": "full", "lora-dropout": 0.1,
             "lora-r": lora_r, "lr": 1e-2 if lora_r else 1e-3}
    gs.main(base_flags(tiny_lm_dir, tmp_path / "full", train, steps=4, **extra), embed_fn=toy_embedder)
    gs.main(base_flags(tiny_lm_dir, tmp_path / "cut", train, steps=2, **extra), embed_fn=toy_embedder)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a line a crashed run wrote after its checkpoint
        f.write(json.dumps({"step": 3, "reward_mean": -1}) + "\n")
    gs.main(base_flags(tiny_lm_dir, tmp_path / "cut", train, steps=4, **extra) + ["--resume", "true"], embed_fn=toy_embedder)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    assert a[-1]["kl"] > 1e-6  # the policy moved away from pi_ref
    for x, y in zip(a, b):
        x.pop("tokens_per_s"), y.pop("tokens_per_s")
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9)


def test_checkpoint_is_a_peft_adapter_that_reproduces_the_trained_model(tmp_path, tiny_tokenizer):
    """After a cold start and GRPO on a bfloat16 model: PeftModel.from_pretrained(sft base, checkpoint)
    gives the trained policy's logits, the adapter is small, and --save-merged writes bfloat16 weights
    that give the same logits up to bfloat16 rounding."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "lm"
    make_tiny_llama(len(tiny_tokenizer), seed=1).to(torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    train = write_rows(tmp_path / "train.jsonl", 4)
    policy = gs.main(base_flags(model_dir, tmp_path / "run", train, steps=2, **{
        "sft-data": ROOT / "data" / "semantic_sft.jsonl", "sft-epochs": 1, "sft-batch-size": 8, "sft-lr": 1e-2,
        "save-merged": "true"}), embed_fn=toy_embedder)
    ckpt = tmp_path / "run" / "checkpoint-2"
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7]])
    with torch.no_grad():
        want = policy.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "sft", dtype=torch.float32)
        start = base(input_ids=ids).logits
        got = PeftModel.from_pretrained(base, ckpt).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged")
        assert merged.dtype == torch.bfloat16
        got_merged = merged.float()(input_ids=ids).logits
    assert (want - start).abs().max() > 1e-3  # GRPO moved the policy away from the cold start
    assert torch.allclose(got, want, atol=1e-5)
    assert (got_merged - want).abs().max() < 0.05 * want.abs().max()
    assert not (ckpt / "model.safetensors").exists()
    assert (ckpt / "adapter_model.safetensors").stat().st_size < (tmp_path / "run" / "sft" / "model.safetensors").stat().st_size / 2
    with safe_open(str(ckpt / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_peft_lora_wraps_every_projection_and_disabled_adapters_are_the_base(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), seed=8).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
    args = gs.Args(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    peft_model = gs.add_lora(model, args)
    trainable = [k for k, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in trainable)  # A, B x 7 x 2 layers
    with torch.no_grad():
        for k, p in peft_model.named_parameters():
            if "lora_B" in k:
                p.normal_(std=0.05)
        assert not torch.allclose(peft_model(input_ids=ids).logits, base, atol=1e-4)
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(input_ids=ids).logits, base, atol=1e-6)
    with pytest.raises(SystemExit, match="--lora-targets nope matches no nn.Linear"):
        gs.add_lora(make_tiny_llama(len(tiny_tokenizer)), gs.Args(lora_targets="nope"))


def test_eval_writes_all_metrics_and_the_probe_leaves_out_target_language_text(tmp_path, tiny_lm_dir):
    """Issue 11.9: probe lines in the training language (nb) are left out and counted; the other
    languages are reported apart and add up to the whole."""
    train = write_rows(tmp_path / "train.jsonl", 4, lang="nb")
    ev = write_rows(tmp_path / "eval.jsonl", 3, reference="Hvor er togstasjonen?", lang="nb")
    gen = tmp_path / "general.txt"
    gen.write_text("The quick brown fox jumps over the lazy dog near the river bank.\n"
                   "Hun kjøpte ferske grønnsaker på torget i går morges.\n\n"
                   "Die Kinder spielen jeden Nachmittag im großen Garten hinter dem Haus.\n"
                   "Computers store numbers as long sequences of zeros and ones.\n")
    gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train, steps=1, **{"eval-data": ev, "general-text": gen}),
            embed_fn=toy_embedder)
    rows = [json.loads(l) for l in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["start", "final"]
    keys = {"bleu", "chrf", "rouge_l", "similarity", "script_consistency", "language_consistency", "probe_nll_mean",
            "probe_nll_p10", "probe_nll_p50", "probe_nll_p90", "probe_kl_mean", "probe_kl_p90", "probe_en_nll_mean",
            "probe_de_nll_mean", "probe_en_kl_mean", "probe_de_kl_mean"}
    assert keys <= set(rows[0]) and not any(k.startswith("probe_nb") for k in rows[0])
    assert rows[0]["probe_lines_skipped"] == 1
    assert rows[0]["probe_tokens"] == rows[0]["probe_en_tokens"] + rows[0]["probe_de_tokens"] > 0
    n_en, n_de = rows[0]["probe_en_tokens"], rows[0]["probe_de_tokens"]
    assert rows[0]["probe_nll_mean"] == pytest.approx(
        (n_en * rows[0]["probe_en_nll_mean"] + n_de * rows[0]["probe_de_nll_mean"]) / (n_en + n_de))
    assert abs(rows[0]["probe_kl_mean"]) < 1e-6  # LoRA B = 0: the policy is the base model
    assert rows[1]["probe_kl_mean"] > rows[0]["probe_kl_mean"]
    assert rows[0]["probe_nll_p10"] <= rows[0]["probe_nll_p50"] <= rows[0]["probe_nll_p90"]
    assert len((tmp_path / "run" / "eval_outputs-final.jsonl").read_text().splitlines()) == 3


def test_probe_without_eval_rows_runs_without_lora_dropout(tiny_lm_dir, tiny_tokenizer):
    """evaluate() puts the policy in eval mode itself (a fresh or just-trained PeftModel is in train mode),
    also when there are no eval rows and only the probe runs; it restores the mode afterwards."""
    args = gs.Args(model=str(tiny_lm_dir), lora_r=4, lora_alpha=8.0, lora_dropout=0.5)
    ctx = SimpleNamespace(rank=0, world=1, ddp=False, device=torch.device("cpu"), autocast=contextlib.nullcontext,
                          load_device=torch.device("cpu"), frozen_dtype=torch.float32)
    policy = gs.build_policy(str(tiny_lm_dir), args, ctx)
    with torch.no_grad():
        for k, p in policy.named_parameters():
            if "lora_B" in k:
                p.normal_(std=0.5)  # B = 0 would hide the dropout
    lines = [("en", "The quick brown fox jumps over the lazy dog near the river bank.")]
    policy.train()
    first = gs.evaluate(args, ctx, policy, None, tiny_tokenizer, [], lines, None, [])
    assert policy.training  # restored
    second = gs.evaluate(args, ctx, policy, None, tiny_tokenizer, [], lines, None, [])
    policy.eval()
    with torch.no_grad():
        ids = torch.tensor([tiny_tokenizer(lines[0][1])["input_ids"]])
        assert torch.equal(policy(input_ids=ids).logits, policy(input_ids=ids).logits)  # eval: deterministic
    assert first["probe_kl_mean"] > 1e-4 and first == second


def test_bundled_probe_text_is_not_in_a_bundled_target_language():
    langs = {json.loads(l)["lang"] for f in ("semantic_sft", "semantic_train", "semantic_eval")
             for l in (ROOT / "data" / f"{f}.jsonl").read_text().splitlines()}
    assert langs == {"nb", "ru"}
    lines = [l for l in (ROOT / "data" / "general_text.txt").read_text().splitlines() if l.strip()]
    assert len(lines) >= 30
    found = {gs.identify_language(l) for l in lines}
    assert not found & langs, found


def test_resume_runs_the_final_evaluation_a_kill_left_out(tmp_path, tiny_lm_dir):
    train = write_rows(tmp_path / "train.jsonl", 4)
    ev = write_rows(tmp_path / "eval.jsonl", 2, reference="abc")
    flags = base_flags(tiny_lm_dir, tmp_path / "run", train, steps=2, **{"eval-data": ev})
    gs.main(flags, embed_fn=toy_embedder)
    log = tmp_path / "run" / "eval.jsonl"
    lines = log.read_text().splitlines()
    assert [json.loads(l)["stage"] for l in lines] == ["start", "final"]
    log.write_text(lines[0] + "\n")  # killed after checkpoint-2, before the final evaluation
    gs.main(flags + ["--resume", "true"], embed_fn=toy_embedder)
    again = [json.loads(l) for l in log.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in again] == [("start", 0), ("final", 2)]
    assert again[1]["similarity"] == pytest.approx(json.loads(lines[1])["similarity"])
    gs.main(flags + ["--resume", "true"], embed_fn=toy_embedder)  # nothing left to do: no second final line
    assert len(log.read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------- runs are never lost or mixed (issue 10)
def test_a_folder_with_a_previous_run_is_refused_and_overwrite_replaces_it(tmp_path, tiny_lm_dir):
    train, out = write_rows(tmp_path / "train.jsonl", 4), tmp_path / "run"
    gs.main(base_flags(tiny_lm_dir, out, train, steps=1), embed_fn=toy_embedder)
    with pytest.raises(SystemExit, match="holds a previous run; pass --resume to continue it or --overwrite to replace it"):
        gs.main(base_flags(tiny_lm_dir, out, train, steps=1), embed_fn=toy_embedder)
    (out / "stale.txt").write_text("from the old run")
    gs.main(base_flags(tiny_lm_dir, out, train, steps=1) + ["--overwrite", "true"], embed_fn=toy_embedder)
    assert not (out / "stale.txt").exists() and [m["step"] for m in read_metrics(out)] == [1]
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty and holds no run"):
        gs.main(base_flags(tiny_lm_dir, other, train, steps=1) + ["--overwrite", "true"], embed_fn=toy_embedder)
    assert (other / "thesis.tex").exists()


def test_resume_without_a_checkpoint_starts_clean_and_never_duplicates_steps_or_evaluations(tmp_path, tiny_lm_dir):
    train, ev, out = write_rows(tmp_path / "train.jsonl", 4), write_rows(tmp_path / "eval.jsonl", 2), tmp_path / "run"
    flags = base_flags(tiny_lm_dir, out, train, steps=2, **{"eval-data": ev})
    gs.main(flags, embed_fn=toy_embedder)
    for p in out.glob("checkpoint-*"):  # a run killed before its first checkpoint
        shutil.rmtree(p)
    gs.main(flags + ["--resume", "true"], embed_fn=toy_embedder)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert [(r["stage"], r["step"]) for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines())] == \
        [("start", 0), ("final", 2)]
    assert json.loads((out / "args.json").read_text())["_resumed"] == [{"step": 0, "changed": {}}]


def test_resume_refuses_a_flag_that_changes_results_and_records_one_that_does_not(tmp_path, tiny_lm_dir):
    train, out = write_rows(tmp_path / "train.jsonl", 4), tmp_path / "run"
    gs.main(base_flags(tiny_lm_dir, out, train, steps=1), embed_fn=toy_embedder)
    with pytest.raises(SystemExit, match=r"--resume: --lora-alpha is 16.0 but the run in .* used 8.0 \(args.json\)"):
        gs.main(base_flags(tiny_lm_dir, out, train, steps=2, **{"lora-alpha": 16}) + ["--resume", "true"], embed_fn=toy_embedder)
    gs.main(base_flags(tiny_lm_dir, out, train, steps=2, **{"save-every": 7}) + ["--resume", "true"], embed_fn=toy_embedder)
    saved = json.loads((out / "args.json").read_text())
    assert saved["steps"] == 1 and saved["_resumed"] == [{"step": 1, "changed": {"steps": [1, 2], "save_every": [100, 7]}}]


def test_resume_drops_torn_last_lines_of_every_log_and_refuses_a_corrupt_middle_one(tmp_path, tiny_lm_dir):
    """A kill or a full disk leaves half a line in metrics.jsonl, samples.jsonl or eval.jsonl: it is
    dropped (also the final-evaluation check reads eval.jsonl without choking); a corrupt line in the
    middle stops the run instead of silently losing what follows."""
    train, ev, out = write_rows(tmp_path / "train.jsonl", 4), write_rows(tmp_path / "eval.jsonl", 2), tmp_path / "run"
    gs.main(base_flags(tiny_lm_dir, out, train, steps=1, **{"eval-data": ev}), embed_fn=toy_embedder)
    for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
        with open(out / name, "a") as f:
            f.write('{"step": 2, "stage": "fin')
    gs.main(base_flags(tiny_lm_dir, out, train, steps=2, **{"eval-data": ev}) + ["--resume", "true"], embed_fn=toy_embedder)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert [json.loads(l)["step"] for l in (out / "samples.jsonl").read_text().splitlines()] == [1, 1, 2, 2]
    assert [(r["stage"], r["step"]) for r in map(json.loads, (out / "eval.jsonl").read_text().splitlines())] == \
        [("start", 0), ("final", 1), ("final", 2)]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:-5] + "\n" + lines[1] + "\n")
    with pytest.raises(SystemExit, match="metrics.jsonl line 1 is corrupt; fix or delete that line"):
        gs.main(base_flags(tiny_lm_dir, out, train, steps=3, **{"eval-data": ev}) + ["--resume", "true"], embed_fn=toy_embedder)


def test_a_full_disk_while_saving_leaves_no_temporary_folder_and_earlier_checkpoints_intact(tmp_path, tiny_lm_dir, monkeypatch):
    train, out = write_rows(tmp_path / "train.jsonl", 4), tmp_path / "run"
    gs.main(base_flags(tiny_lm_dir, out, train, steps=1, **{"save-every": 1}), embed_fn=toy_embedder)
    real_save = gs.torch.save

    def full_disk(obj, f, *a, **k):
        if "rng_state" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(gs.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"no space left in .* while writing checkpoint-2; .*checkpoint-1 is intact"):
        gs.main(base_flags(tiny_lm_dir, out, train, steps=2, **{"save-every": 1}) + ["--resume", "true"], embed_fn=toy_embedder)
    assert not list(out.glob(".tmp-*")) and (out / "checkpoint-1" / "trainer_state.json").exists()


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, tiny_lm_dir):
    train, out = write_rows(tmp_path / "train.jsonl", 4), tmp_path / "run"
    gs.main(base_flags(tiny_lm_dir, out, train, steps=3, **{"save-every": 1, "save-total-limit": 2}), embed_fn=toy_embedder)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_full_fine_tuning_checkpoint_is_a_hub_folder_in_the_models_dtype_with_the_trained_weights(tmp_path, tiny_tokenizer):
    """--lora-r 0 on a bfloat16 model: checkpoint-1/ loads with from_pretrained, in bfloat16, and holds
    the fp32 master weights of trainer/ (DCP) rounded to bfloat16, which moved away from the start."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "bf16"
    make_tiny_llama(len(tiny_tokenizer), dtype=torch.bfloat16).to(torch.bfloat16).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    gs.main(base_flags(model_dir, tmp_path / "run", write_rows(tmp_path / "train.jsonl", 4), steps=1, **{"lora-r": 0, "lr": 1e-3}),
            embed_fn=toy_embedder)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-1")
    assert all(p.dtype == torch.bfloat16 for p in saved.parameters())
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    trained = {k: v.clone() for k, v in start.items()}
    dcp.load({"model": trained}, checkpoint_id=str(tmp_path / "run" / "checkpoint-1" / "trainer"))
    assert all(torch.equal(v, trained[k].to(torch.bfloat16)) for k, v in saved.state_dict().items())
    assert any(not torch.equal(trained[k], v) for k, v in start.items())


# ---------------------------------------------------------------------------------- rollouts (issue 13), fused linear (issue 15)
def test_rollout_masks_end_at_the_first_eos_and_greedy_batches_equal_rows_alone(tiny_lm_dir):
    """Sampled rows of very different lengths: mask True up to and including the first EOS, pad after;
    greedy decoding (keys None, evaluation) of left-padded prompts of two lengths = each prompt alone."""
    model = gs.load_lm(str(tiny_lm_dir), "--model", "cpu")
    args = gs.Args(max_new_tokens=12, temperature=1.0, top_p=1.0)
    eos = [5, 9, 2]  # frequent "EOS" tokens so that some rows stop early
    prompts = [[1, 40, 41]] * 8 + [[1, 40, 41, 50, 60, 70, 80]] * 8
    tokens, mask = gs.rollout(model, prompts, [(0, 1, i // 8, i) for i in range(16)], args, eos, 0)
    lengths = set()
    for row, m in zip(tokens.tolist(), mask.tolist()):
        first = next((t for t, x in enumerate(row) if x in eos), len(row) - 1)
        lengths.add(first)
        assert m == [t <= first for t in range(len(row))] and all(x == 0 for x in row[first + 1:])
    assert len(lengths) >= 3  # rows of very different lengths
    batch, _ = gs.rollout(model, [[1, 40, 41], [1, 60, 61, 62, 63, 64]], None, args, [2], 0, max_new_tokens=6)
    for i, p in enumerate([[1, 40, 41], [1, 60, 61, 62, 63, 64]]):
        alone, _ = gs.rollout(model, [p], None, args, [2], 0, max_new_tokens=6)
        with torch.no_grad():  # greedy written out: argmax of one plain forward per token
            ids = list(p)
            for _ in range(6):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        want = [t if 2 not in ids[len(p):len(p) + k] else 0 for k, t in enumerate(ids[len(p):])]  # pad after EOS
        n = alone.shape[1]  # generation stops when every row of the call has ended
        assert alone[0].tolist() == want[:n] and batch[i, :n].tolist() == want[:n] and not batch[i, n:].any()


@pytest.mark.parametrize("estimator", ["full", "k3"])
def test_token_kl_from_hidden_states_equals_the_materialised_logits_path(estimator):
    g = torch.Generator().manual_seed(9)
    N, T, D, V = 2, 5, 16, 67
    h = torch.randn(N, T, D, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    ref_h, ref_w = torch.randn(N, T, D, generator=g, dtype=torch.float64), torch.randn(V, D, generator=g, dtype=torch.float64)
    tokens, mask = torch.randint(0, V, (N, T), generator=g), torch.rand(N, T, generator=g) > 0.3
    fused = gs.token_kl(h, ref_h, tokens, mask, 0.9, estimator, dict(weight=w, ref_weight=ref_w, softcap=None, logit_scale=None))
    plain = gs.token_kl(h @ w.T, ref_h @ ref_w.T, tokens, mask, 0.9, estimator)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    upstream = torch.randn(N, T, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad(((fused[0] + fused[1]) * upstream).sum(), [h, w])
    gb = torch.autograd.grad(((plain[0] + plain[1]) * upstream).sum(), [h, w])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fused_and_materialised_runs_agree(tmp_path, tiny_lm_dir):
    """The whole run, --no-fused-linear against the default: the exact KL in the loss, pi_old of
    --num-iterations 2, the alignment-tax probe."""
    train, ev = write_rows(tmp_path / "train.jsonl", 4), write_rows(tmp_path / "eval.jsonl", 2)
    gen = tmp_path / "general.txt"
    gen.write_text("The quick brown fox jumps over the lazy dog.\nComputers store numbers as zeros and ones.\n")
    flags = lambda out: base_flags(tiny_lm_dir, out, train, steps=2, **{  # noqa: E731
        "kl-estimator": "full", "num-iterations": 2, "eval-data": ev, "general-text": gen})
    gs.main(flags(tmp_path / "fused"), embed_fn=toy_embedder)
    gs.main(flags(tmp_path / "plain") + ["--fused-linear", "false"], embed_fn=toy_embedder)
    ma, mb = read_metrics(tmp_path / "fused"), read_metrics(tmp_path / "plain")
    assert ma[1]["kl"] > 1e-6 and ma[1]["clip_frac"] is not None
    for x, y in zip(ma, mb):
        for k in ("reward_mean", "kl", "entropy", "loss", "grad_norm", "clip_frac"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    ea, eb = ([json.loads(l) for l in (tmp_path / d / "eval.jsonl").read_text().splitlines()] for d in ("fused", "plain"))
    assert ea[-1]["probe_kl_mean"] > 1e-6
    for x, y in zip(ea, eb):
        for k in ("probe_nll_mean", "probe_kl_mean", "similarity"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-7), k


# ---------------------------------------------------------------------------------- issue 11: numerics, templates
def test_reward_std_is_exact_for_a_small_spread_around_a_large_mean():
    """Issue 11.10: rewards 2 + 1e-4 k in float32; E[r^2] - E[r]^2 in float32 loses the spread."""
    r = (2.0 + 1e-4 * torch.arange(8, dtype=torch.float32)).view(2, 4)
    vals = [float(x) for x in r.flatten()]
    mean, std = gs.mean_std(r, ddp=False)
    assert mean == pytest.approx(statistics.fmean(vals), rel=1e-12)
    assert std == pytest.approx(statistics.pstdev(vals), rel=1e-6)
    naive = math.sqrt(max(float((r.flatten() ** 2).sum()) / 8 - (float(r.sum()) / 8) ** 2, 0.0))  # the old formula
    assert abs(naive - statistics.pstdev(vals)) > 0.1 * statistics.pstdev(vals)
    with_nan = torch.tensor([1.0, float("nan"), 3.0])
    assert gs.mean_std(with_nan, ddp=False) == (2.0, 1.0)
    assert gs.mean_std(torch.tensor([float("nan")]), ddp=False) == (None, None)


def test_logs_are_strict_json_with_null_for_values_that_do_not_exist(tmp_path, tiny_lm_dir):
    """Issue 10.9: an embedder that returns NaN: nothing is scored, reward_mean/std are null, never NaN."""
    train = write_rows(tmp_path / "train.jsonl", 4)

    def nan_embedder(texts):
        return torch.full((len(texts), 3), float("nan"))

    gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train, steps=1), embed_fn=nan_embedder)
    strict = lambda s: json.loads(s, parse_constant=lambda c: pytest.fail(f"bare {c} in a log"))  # noqa: E731
    m = [strict(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    s = [strict(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert m[0]["reward_mean"] is None and m[0]["reward_std"] is None and m[0]["similarity"] is None
    assert s[0]["rewards"] == [None] * 4


def test_logged_reward_std_equals_the_float64_std_of_the_samples(tmp_path, tiny_lm_dir):
    """Issue 11.10 end to end: rewards within ~1e-4 of 1.5 (similarities near 1, no R_lang); the logged
    std is the float64 std of the logged rewards (the old float32 E[r^2] - E[r]^2 was off by far more)."""
    train = write_rows(tmp_path / "train.jsonl", 4)

    def near_constant(texts):
        v = torch.tensor([[1.0, 0.01 * (len(t) % 5), 0.0] for t in texts], dtype=torch.float64)
        return (v / v.norm(dim=-1, keepdim=True)).float()

    gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train, steps=1, **{"samples-logged": 2, "tau": "-0.5",
                                                                         "lambda-lang": 0.0}), embed_fn=near_constant)
    m = read_metrics(tmp_path / "run")[0]
    rewards = [r for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines() for r in json.loads(l)["rewards"]]
    assert len(rewards) == 8 and 1e-6 < statistics.pstdev(rewards) < 1e-3
    assert m["reward_std"] == pytest.approx(statistics.pstdev(rewards), rel=1e-6)


def test_padding_with_inf_or_overflowing_k3_gives_finite_gradients():
    """Issue 11.12: log-probs of +-inf or 1e4 at padded positions: values AND gradients stay finite and
    the gradients at valid positions equal those of the same loss on the valid tokens alone."""
    g = torch.Generator().manual_seed(9)
    N, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logp0 = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    ref = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    bad = logp0.clone()
    bad[0, 3], bad[0, 4], bad[2, 1:] = float("inf"), -1e4, float("-inf")  # exp(ref - (-1e4)) overflows
    adv = torch.tensor([0.7, -1.1, 0.4], dtype=torch.float64)
    grads = []
    for x in (bad, torch.where(mask, logp0, 0.0)):
        lp = x.clone().requires_grad_()
        loss, _ = gs.grpo_loss(lp, lp.detach(), gs.k3_kl(lp, ref, mask), adv, mask, 0.2, 0.04, N)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        grads.append((loss.item(), lp.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    assert torch.equal(grads[0][1][~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


QWEN3_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_qwen3_style_templates_are_asked_not_to_think(tiny_tokenizer):
    """Issue 11.11: a template that knows `enable_thinking` gets False (an empty think block, so the
    sampled text is the answer); other templates render as before."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = QWEN3_LIKE_TEMPLATE
    msgs = [{"role": "user", "content": "Hei"}]
    assert gs.render_chat(tok, msgs, True).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert gs.render_chat(tiny_tokenizer, msgs, True).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------- language check (issue 14.3)
def test_language_check_needs_the_target_language_not_only_its_script():
    eval_rows = [json.loads(l) for l in (ROOT / "data" / "semantic_eval.jsonl").read_text().splitlines()]
    for r in eval_rows:
        source = r["prompt"].split(": ", 1)[1]  # the English sentence: what a copying policy outputs
        latin = r["script"] == "latin"  # nb: English passes the script check alone; ru: it does not
        assert gs.script_reward(source, r["script"], 0.9) == float(latin)
        assert gs.language_reward(source, r["script"], 0.9, "", 0.1) == float(latin)  # no language: script only
        assert gs.language_reward(source, r["script"], 0.9, r["lang"], 0.1) == 0.0
        assert gs.language_reward(r["reference"], r["script"], 0.9, r["lang"], 0.1) == 1.0
    assert gs.language_reward("Barnen leker i trädgården varje dag efter skolan.", "latin", 0.9, "nb", 0.1) == 0.0  # Swedish
    assert gs.language_reward("Діти граються в саду.", "cyrillic", 0.9, "ru", 0.1) == 0.0  # Ukrainian
    assert gs.language_reward("Дети играют в саду.", "latin", 0.9, "ru", 0.1) == 0.0  # the script check still applies
    assert gs.language_prob("anything", "bo") is None  # Tibetan: py3langid does not know it, script check only
    assert gs.language_reward("བོད་ཡིག", "tibetan", 0.9, "bo", 0.1) == 1.0


def test_non_multilingual_embedder_is_reported_on_non_english_data():
    pairs = [{"source": f"s{i}", "target": f"t{i}", "lang": "nb"} for i in range(4)]
    same = lambda texts: torch.nn.functional.normalize(torch.tensor([[1.0, float(t[1:])] for t in texts]), dim=-1)  # noqa: E731
    blind = lambda texts: torch.tensor([[1.0, 0.0]] * len(texts))  # noqa: E731  (sees no difference between sentences)
    assert gs.embedder_language_warnings(same, "good", ["nb"], pairs) == []
    assert gs.embedder_language_warnings(same, "good", ["en"], pairs) == []  # English data: nothing to check
    (w,) = gs.embedder_language_warnings(blind, "mini", ["nb"], pairs)
    assert "--embedder mini does not look multilingual on nb" in w and "25% of 4" in w
    (w,) = gs.embedder_language_warnings(same, "good", ["ru"], pairs)
    assert "cannot check --embedder good on ru" in w


# ---------------------------------------------------------------------------------- encoder stage (issue 14.1)
def naive_retrieval(src, tgt):
    hits = 0
    for i in range(len(src)):
        sims = [sum(a * b for a, b in zip(src[i], tgt[j])) for j in range(len(tgt))]
        hits += max(range(len(tgt)), key=lambda j: sims[j]) == i
    return hits / len(src)


def test_retrieval_accuracy_matches_a_loop():
    g = torch.Generator().manual_seed(10)
    for n in (1, 5, 17):
        s = torch.nn.functional.normalize(torch.randn(n, 6, generator=g, dtype=torch.float64), dim=-1)
        t = torch.nn.functional.normalize(s + 0.8 * torch.randn(n, 6, generator=g, dtype=torch.float64), dim=-1)
        assert gs.retrieval_accuracy(s, t) == pytest.approx(naive_retrieval(s.tolist(), t.tolist()))


def make_tiny_bert(path: Path, words):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16)).save_pretrained(path)


def test_train_embedder_raises_held_out_retrieval_accuracy_on_a_tiny_encoder(tmp_path):
    """Two toy languages (words aN <-> bN); a random 2-layer BERT with mean pooling is trained on 96
    sentence pairs and must find the translations of 24 held-out sentences better than before."""
    rng = random.Random(0)
    n_words = 20
    make_tiny_bert(tmp_path / "bert", [f"a{i}" for i in range(n_words)] + [f"b{i}" for i in range(n_words)])
    sentences = list({tuple(rng.sample(range(n_words), 3)) for _ in range(400)})[:120]

    def write(path, sents):
        path.write_text("".join(json.dumps({"source": " ".join(f"a{w}" for w in s), "target": " ".join(f"b{w}" for w in s),
                                            "lang": "xx"}) + "\n" for s in sents))
        return path

    graded = tmp_path / "graded.jsonl"  # score = number of shared words (translated)
    graded.write_text("".join(json.dumps({"a": " ".join(f"a{w}" for w in s), "score": k, "b": " ".join(
        [f"b{w}" for w in s[:k]] + [f"b{(w + 7) % n_words}" for w in s[k:]])}) + "\n" for s in sentences[96:] for k in range(4)))
    flags = ["train-embedder", "--embedder", tmp_path / "bert", "--output-dir", tmp_path / "enc",
             "--parallel-data", write(tmp_path / "train.jsonl", sentences[:96]),
             "--parallel-eval-data", write(tmp_path / "test.jsonl", sentences[96:]),
             "--graded-data", graded, "--embedder-epochs", 8, "--embedder-lr", 3e-3, "--embedder-batch-size", 16, "--seed", 0]
    report = gs.main(flags)
    before, after = report["before"]["retrieval_xx"], report["after"]["retrieval_xx"]
    assert after >= before + 0.3 and after >= 0.6, (before, after)
    assert -1 <= report["before"]["spearman_all"] <= 1 and report["after"]["spearman_all"] > report["before"]["spearman_all"]
    # the saved folder is what --embedder takes, and it is the trained encoder
    emb = gs.Embedder(str(tmp_path / "enc"), torch.device("cpu"), 8)
    rows = [json.loads(l) for l in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert gs.retrieval_accuracy(emb([r["source"] for r in rows]), emb([r["target"] for r in rows])) == pytest.approx(after)
    assert json.loads((tmp_path / "enc" / "embedder_eval.json").read_text())["after"]["retrieval_xx"] == pytest.approx(after)
    with pytest.raises(SystemExit, match="enc is not empty; pass a new folder, or --overwrite to replace an encoder"):
        gs.main(flags)  # a second run never mixes its files with the first one's


# ---------------------------------------------------------------------------------- bad input (issue 10)
@pytest.mark.parametrize("flag,value,message", [
    ("group-size", 1, "--group-size must be >= 2 (group-normalised advantages need two samples per prompt), got 1"),
    ("group-size", 0, "--group-size must be >= 2"),
    ("steps", -1, "--steps must be >= 0, got -1"),
    ("temperature", 0, "--temperature must be > 0 (GRPO samples its outputs), got 0.0"),
    ("prompts-per-step", 0, "--prompts-per-step must be > 0, got 0"),
    ("max-new-tokens", 0, "--max-new-tokens must be > 0"),
    ("save-every", 0, "--save-every must be > 0"),
    ("sft-batch-size", 0, "--sft-batch-size must be > 0"),
    ("num-iterations", 0, "--num-iterations must be > 0"),
    ("top-p", 1.5, r"--top-p must be in \(0, 1\]"),
    ("lr", 0, "--lr must be > 0"),
    ("beta", -0.1, "--beta must be >= 0"),
    ("kl-estimator", "k2", "--kl-estimator must be one of k3, full, got 'k2'"),
    ("tau", "often", '--tau must be a number in'),
    ("save-total-limit", 0, "--save-total-limit must be >= 1, got 0"),
    ("eval-batch-size", 0, "--eval-batch-size must be > 0, got 0"),
])
def test_bad_flags_are_refused_in_one_line_before_anything_loads(tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=re.escape(message) if "(" in message and "\\" not in message else message):
        gs.main(["--model", tmp_path / "no-model-here", f"--{flag}", value])


def test_resume_with_overwrite_and_fsdp_without_torchrun_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--resume continues the run in --output-dir and --overwrite deletes it; pass one"):
        gs.main(["--model", tmp_path / "no-model-here", "--resume", "true", "--overwrite", "true"])
    with pytest.raises(SystemExit, match=r"--fsdp needs torchrun \(any --nproc_per_node, 1 included\)"):
        gs.main(["--model", tmp_path / "no-model-here", "--fsdp", "true", "--output-dir", tmp_path / "o"])
    assert not (tmp_path / "o").exists()


def test_bad_data_files_get_one_line_naming_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"prompt": "a", "reference": "b"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(SystemExit, match=r"--train-data .*bad.jsonl line 3 is not UTF-8 \(invalid continuation byte\); re-save"):
        gs.read_rows(str(p), "--train-data")
    p.write_text('{"prompt": "a"}\n["a", "b"]\n')
    with pytest.raises(SystemExit, match=r"line 2 is a JSON list, not an object; write one JSON object per line"):
        gs.read_rows(str(p), "--train-data")
    p.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(SystemExit, match=r"line 2 is not valid JSON"):
        gs.read_rows(str(p), "--train-data")
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps([{"prompt": "a", "reference": "b"}, {"prompt": "c", "reference": "d"}], indent=1))
    assert [r for _, r in gs.read_rows(str(arr), "--train-data")][1] == {"prompt": "c", "reference": "d"}
    arr.write_text(json.dumps([{"prompt": "a"}, 3]))
    with pytest.raises(SystemExit, match=r"rows.json item 2 is a JSON number, not an object"):
        gs.read_rows(str(arr), "--train-data")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SystemExit, match="has no rows"):
        gs.read_rows(str(tmp_path / "empty.jsonl"), "--train-data")
    with pytest.raises(SystemExit, match=r"--train-data data/nope.jsonl does not exist"):
        gs.read_rows("data/nope.jsonl", "--train-data")
    with pytest.raises(SystemExit, match=r"--train-data surely-not-a-dataset-xyz: no such file, and the hub has no data set"):
        gs.read_rows("surely-not-a-dataset-xyz", "--train-data")
    txt = tmp_path / "general.txt"
    txt.write_bytes(b"fine\nalso fine\n\xff\xfe\n")
    with pytest.raises(SystemExit, match=r"--general-text .*general.txt line 3 is not UTF-8"):
        gs.read_lines(str(txt), "--general-text")
    with pytest.raises(SystemExit, match=r'--graded-data .* line 1 has no number field "score"'):
        (tmp_path / "g.jsonl").write_text(json.dumps({"a": "x", "b": "y", "score": "high"}) + "\n")
        gs.read_fields(str(tmp_path / "g.jsonl"), "--graded-data", ("a", "b", "score"))


def test_bad_model_paths_get_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # "data/..." is a path because ./data exists
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(SystemExit, match=r"--model .*empty-folder is a folder without a model \(no config.json\)"):
        gs.load_tokenizer(str(tmp_path / "empty-folder"), "--model")
    with pytest.raises(SystemExit, match=r"--model data/no-such-model does not exist"):
        gs.load_lm("data/no-such-model", "--model", "cpu")
    with pytest.raises(SystemExit, match=r"--embedder .*empty-folder is a folder without a model \(no modules.json\)"):
        gs.Embedder(str(tmp_path / "empty-folder"), "cpu", 4)
    with pytest.raises(SystemExit, match=r"--model no-such-org/no-such-model could not be loaded \(\w+\); check the name"):
        gs.load_tokenizer("no-such-org/no-such-model", "--model")


def test_bad_row_names_file_line_and_fix(tmp_path, tiny_lm_dir):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(SystemExit, match=r'line 3 has no text field "reference"; pass --reference-field'):
        gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train), embed_fn=toy_embedder)


def test_two_processes_match_one_process(tmp_path, tiny_lm_dir, cpu_only):
    """SFT + GRPO with LoRA on 2 gloo processes gives the same SFT model, adapter and metrics as 1 process."""
    from safetensors.torch import load_file

    train = ROOT / "data" / "semantic_train.jsonl"
    flags = lambda out: base_flags(tiny_lm_dir, out, train, steps=2, **{  # noqa: E731
        "sft-data": ROOT / "data" / "semantic_sft.jsonl", "sft-epochs": 1, "sft-batch-size": 4, "sft-lr": 1e-3,
        "max-new-tokens": 4, "group-size": 2, "kl-estimator": "k3"})
    gs.main(flags(tmp_path / "one"))
    run_torchrun("grpo_semantic.py", flags(tmp_path / "two"), nproc=2)
    for name in ("sft/model.safetensors", "checkpoint-2/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # GRPO moved the adapters off B = 0
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for x, y in zip(ma, mb):
        for k in ("reward_mean", "reward_std", "similarity", "kl", "loss", "response_len"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    start, sft = load_file(Path(tiny_lm_dir) / "model.safetensors"), load_file(tmp_path / "one" / "sft" / "model.safetensors")
    assert any(not torch.allclose(start[k], sft[k]) for k in sft if k in start)  # the cold start moved the weights


# ---------------------------------------------------------------------------------- FSDP2 (issue 12)
def test_fsdp_two_processes_match_one_process_and_hold_half_the_state(tmp_path, tiny_lm_dir, cpu_only):
    """SFT + GRPO with LoRA under FSDP2 on 2 gloo processes = 1 process: sft/, the adapter and merged/
    after two optimizer steps, the metrics, and every evaluation (3 rows and 3 probe lines: 2 on rank 0, 1 on
    rank 1, one per batch, so the generate() calls and the probe's forwards must be padded to lockstep,
    or the run hangs). Rank 0 holds about half of the parameters (with LoRA mostly the frozen base) and
    half of the optimizer state (the adapters' AdamW moments: the trainable state is small)."""
    from safetensors.torch import load_file

    ev, gen = tmp_path / "eval.jsonl", tmp_path / "general.txt"
    ev.write_text("".join((ROOT / "data" / "semantic_eval.jsonl").read_text().splitlines(True)[:3]))
    gen.write_text("The quick brown fox jumps over the lazy dog.\nComputers store numbers as zeros and ones.\n"
                   "Rivers carry water from the mountains to the sea.\n")
    flags = lambda out: base_flags(tiny_lm_dir, out, ROOT / "data" / "semantic_train.jsonl", steps=2, **{  # noqa: E731
        "sft-data": ROOT / "data" / "semantic_sft.jsonl", "sft-epochs": 1, "sft-batch-size": 4, "sft-lr": 1e-3,
        "max-new-tokens": 4, "group-size": 2, "tau": "auto", "tau-holdout": 3, "eval-data": ev, "general-text": gen,
        "eval-batch-size": 1, "eval-max-new-tokens": 4, "save-every": 1, "save-merged": "true"})
    gs.main(flags(tmp_path / "one"))
    run_torchrun("grpo_semantic.py", flags(tmp_path / "two") + ["--fsdp", "true"], nproc=2)
    for name in ("sft/model.safetensors", "checkpoint-2/merged/model.safetensors", "checkpoint-2/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name  # Adam: noise ~ lr/100
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert ma[1]["kl"] > 0 and ma[0]["frac_zero_adv"] < 1  # the second step starts from moved weights
    for x, y in zip(ma, mb):
        for k in ("reward_mean", "reward_std", "similarity", "kl", "entropy", "loss", "response_len", "grad_norm", "tau"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
        assert y["param_bytes"] == pytest.approx(x["param_bytes"] / 2, rel=0.05)  # rank 0's shards
        assert y["optimizer_bytes"] == pytest.approx(x["optimizer_bytes"] / 2, rel=0.05)
    ea, eb = ([json.loads(l) for l in (tmp_path / d / "eval.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [(r["stage"], r["step"]) for r in eb] == [("base", 0), ("start", 0), ("final", 2)]
    for x, y in zip(ea, eb):
        assert y["probe_tokens"] == x["probe_tokens"] > 0
        for k in ("similarity", "chrf", "probe_nll_mean", "probe_kl_mean", "probe_nll_p90"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k


def test_fsdp_full_fine_tuning_matches_one_process(tmp_path, tiny_lm_dir, cpu_only):
    """--lora-r 0 under FSDP2: every weight trains (the tied embedding and the norms sit in the root's
    group), pi_ref is a sharded frozen copy, the exact KL with --num-iterations 2. The probe of the model
    before SFT runs a forward of the root first, after which FSDP keeps the root's parameters gathered:
    an optimizer built then would hold the gathered copies (sft/ then differed by 2e-3)."""
    from safetensors.torch import load_file

    gen = tmp_path / "general.txt"
    gen.write_text("The quick brown fox jumps over the lazy dog.\nComputers store numbers as zeros and ones.\n")
    flags = lambda out: base_flags(tiny_lm_dir, out, ROOT / "data" / "semantic_train.jsonl", steps=2, **{  # noqa: E731
        "sft-data": ROOT / "data" / "semantic_sft.jsonl", "sft-epochs": 1, "sft-batch-size": 4, "sft-lr": 1e-3,
        "max-new-tokens": 4, "group-size": 2, "lora-r": 0, "lr": 1e-3, "kl-estimator": "full", "num-iterations": 2,
        "general-text": gen})
    gs.main(flags(tmp_path / "one"))
    run_torchrun("grpo_semantic.py", flags(tmp_path / "two") + ["--fsdp", "true", "--ref-offload", "true"], nproc=2)
    for name in ("sft/model.safetensors", "checkpoint-2/model.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name  # Adam: noise ~ lr/100
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert ma[1]["kl"] > 1e-6 and ma[1]["clip_frac"] > 0
    for x, y in zip(ma, mb):
        for k in ("reward_mean", "kl", "loss", "grad_norm", "clip_frac"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    ea, eb = ([json.loads(l) for l in (tmp_path / d / "eval.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert [x["probe_kl_mean"] for x in ea] == pytest.approx([y["probe_kl_mean"] for y in eb], rel=1e-4, abs=1e-8)


def test_fsdp_kill_and_resume_equals_the_uninterrupted_run_on_every_rank(tmp_path, tiny_lm_dir):
    """LoRA dropout 0.1 draws from each rank's own RNG: a resume that restored rank 0's state on rank 1
    would differ. The cut run is the uninterrupted one as a kill while writing checkpoint-2 leaves it
    (.tmp-checkpoint-2, the logs of step 2, a torn line); --resume, with --gradient-checkpointing
    switched on (a flag that may change), must give the same metrics and the same adapter bits."""
    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    flags = lambda out: base_flags(tiny_lm_dir, out, ROOT / "data" / "semantic_train.jsonl", steps=2, **{  # noqa: E731
        "max-new-tokens": 4, "group-size": 2, "lora-dropout": 0.1, "save-every": 1, "fsdp": "true"})
    run_torchrun("grpo_semantic.py", flags(full), nproc=2)
    shutil.copytree(full, cut)
    (cut / "checkpoint-2").rename(cut / ".tmp-checkpoint-2")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    run_torchrun("grpo_semantic.py", flags(cut) + ["--resume", "true", "--gradient-checkpointing", "true"], nproc=2)
    rng = [torch.load(full / "checkpoint-1" / f"rng_state_{r}.pth", weights_only=False)["torch"] for r in (0, 1)]
    assert not torch.equal(*rng)  # the ranks' streams differ, so the check below would see rank 0's on rank 1
    drop = lambda m: {k: v for k, v in m.items() if k != "tokens_per_s"}  # noqa: E731
    assert [drop(m) for m in read_metrics(cut)] == [drop(m) for m in read_metrics(full)]
    a, b = load_file(full / "checkpoint-2" / "adapter_model.safetensors"), load_file(cut / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and not list(cut.glob(".tmp-*"))
    changed = json.loads((cut / "args.json").read_text())["_resumed"][0]["changed"]
    assert changed.keys() == {"output_dir", "gradient_checkpointing"}
