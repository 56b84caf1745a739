"""grpo_semantic.py: every reward, advantage and loss against a naive float64 version, LoRA
identities, the embedder's cosine, and end-to-end runs on a tiny model (learning, resume, DDP)."""
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import grpo_semantic as gs
from conftest import ROOT, make_tiny_llama, run_torchrun


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
    k3 = gs.k3_kl(lp, ref)
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
    logp, kl_term, kl_full, ent = gs.token_terms(logits, ref, tokens, T, "full")
    for i, t in itertools.product(range(2), range(3)):
        p = torch.softmax(logits[i, t].double() / T, -1)
        q = torch.softmax(ref[i, t].double() / T, -1)
        assert float(kl_term[i, t]) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-4, abs=1e-6)
        assert float(logp[i, t]) == pytest.approx(float(p[tokens[i, t]].log()), rel=1e-5)
    _, k3, _, _ = gs.token_terms(logits, ref, tokens, T, "k3")
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


# ---------------------------------------------------------------------------------- LoRA
def test_lora_with_zero_B_equals_the_base_layer_and_merge_is_exact():
    torch.manual_seed(6)
    base = nn.Linear(13, 7)
    x = torch.randn(3, 5, 13)
    want = base(x)
    lora = gs.LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    assert torch.equal(lora(x), want)  # B = 0 at init
    with torch.no_grad():
        lora.lora_B.normal_()
    y = lora(x)
    naive = x @ base.weight.T + base.bias + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)  # scale alpha/r = 2
    assert torch.allclose(y, naive, atol=1e-5)
    merged = nn.Linear(13, 7)
    merged.load_state_dict({"weight": lora.merged_weight().detach(), "bias": base.bias.detach()})
    assert torch.allclose(merged(x), y, atol=1e-5)
    with gs.lora_disabled(lora):
        assert torch.equal(lora(x), want)
    assert not torch.equal(lora(x), want)


def test_lora_dropout_acts_on_the_adapter_input_only_in_training():
    torch.manual_seed(7)
    lora = gs.LoRALinear(nn.Linear(16, 8), r=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 16)
    lora.eval()
    assert torch.equal(lora(x), lora(x))
    lora.train()
    assert not torch.equal(lora(x), lora(x))


def test_lora_wraps_every_projection_and_saved_weights_are_merged(tmp_path, tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), seed=8).eval()
    n = gs.add_lora(model, 4, 8.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert n == 7 * 2
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable) and len(trainable) == 2 * n
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "lora_B" in k:
                p.normal_(std=0.05)
    gs.save_model(tmp_path, model, tiny_tokenizer)
    reloaded = gs.load_lm(str(tmp_path), "--model", torch.device("cpu"))
    assert not any("lora" in k for k in reloaded.state_dict())
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        with gs.lora_disabled(model):
            base = make_tiny_llama(len(tiny_tokenizer), seed=8).eval()
            assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


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


def write_rows(path: Path, n: int, reference="abc"):
    path.write_text("".join(json.dumps({"prompt": f"Skriv o nummer {i}", "reference": reference, "script": "latin"}) + "\n"
                            for i in range(n)))
    return path


def base_flags(model_dir, out, train, **kw):
    flags = {"model": model_dir, "output-dir": out, "train-data": train, "sft-data": "", "eval-data": "",
             "general-text": "", "prompts-per-step": 2, "group-size": 4, "max-new-tokens": 6, "steps": 3,
             "lora-r": 4, "lora-alpha": 8, "lora-dropout": 0.0, "lr": 1e-2, "tau": "0", "seed": 3,
             "save-every": 100, "eval-max-new-tokens": 6}
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


def test_resumed_run_reproduces_the_uninterrupted_metrics(tmp_path, tiny_lm_dir):
    train = write_rows(tmp_path / "train.jsonl", 9)
    extra = {"tau": "auto", "tau-holdout": 3, "num-iterations": 2, "kl-estimator": "full", "lora-dropout": 0.1}
    gs.main(base_flags(tiny_lm_dir, tmp_path / "full", train, steps=4, **extra), embed_fn=toy_embedder)
    gs.main(base_flags(tiny_lm_dir, tmp_path / "cut", train, steps=2, **extra), embed_fn=toy_embedder)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a line a crashed run wrote after its checkpoint
        f.write(json.dumps({"step": 3, "reward_mean": -1}) + "\n")
    gs.main(base_flags(tiny_lm_dir, tmp_path / "cut", train, steps=4, **extra) + ["--resume", "true"], embed_fn=toy_embedder)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        x.pop("tokens_per_s"), y.pop("tokens_per_s")
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9)


def test_eval_writes_all_metrics_and_probe_kl_is_zero_before_training(tmp_path, tiny_lm_dir):
    train = write_rows(tmp_path / "train.jsonl", 4)
    ev = write_rows(tmp_path / "eval.jsonl", 3, reference="Hvor er togstasjonen?")
    gen = tmp_path / "general.txt"
    gen.write_text("The quick brown fox jumps over the lazy dog.\nHva er hovedstaden i Norge?\n\n")
    gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train, steps=1, **{"eval-data": ev, "general-text": gen}),
            embed_fn=toy_embedder)
    rows = [json.loads(l) for l in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["start", "final"]
    keys = {"bleu", "chrf", "rouge_l", "similarity", "script_consistency", "probe_nll_mean", "probe_nll_p10",
            "probe_nll_p50", "probe_nll_p90", "probe_kl_mean", "probe_kl_p10", "probe_kl_p50", "probe_kl_p90"}
    assert keys <= set(rows[0])
    assert abs(rows[0]["probe_kl_mean"]) < 1e-6  # LoRA B = 0: the policy is the base model
    assert rows[1]["probe_kl_mean"] > rows[0]["probe_kl_mean"]
    assert rows[0]["probe_nll_p10"] <= rows[0]["probe_nll_p50"] <= rows[0]["probe_nll_p90"]
    assert len((tmp_path / "run" / "eval_outputs-final.jsonl").read_text().splitlines()) == 3


def test_bad_row_names_file_row_and_fix(tmp_path, tiny_lm_dir):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(SystemExit, match=r'row 2 has no text field "reference"; pass --reference-field'):
        gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train), embed_fn=toy_embedder)
    with pytest.raises(SystemExit, match="--tau must be"):
        gs.main(base_flags(tiny_lm_dir, tmp_path / "run", train, tau="often"), embed_fn=toy_embedder)


def test_two_processes_match_one_process(tmp_path, tiny_lm_dir, cpu_only):
    """SFT + GRPO with LoRA on 2 gloo processes gives the same merged weights as 1 process."""
    from safetensors.torch import load_file

    train = ROOT / "data" / "semantic_train.jsonl"
    flags = lambda out: base_flags(tiny_lm_dir, out, train, steps=2, **{  # noqa: E731
        "sft-data": ROOT / "data" / "semantic_sft.jsonl", "sft-epochs": 1, "sft-batch-size": 4,
        "max-new-tokens": 4, "group-size": 2, "kl-estimator": "k3"})
    gs.main(flags(tmp_path / "one"))
    run_torchrun("grpo_semantic.py", flags(tmp_path / "two"), nproc=2)
    a = load_file(tmp_path / "one" / "checkpoint-2" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint-2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ma, mb = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for x, y in zip(ma, mb):
        for k in ("reward_mean", "reward_std", "similarity", "kl", "loss", "response_len"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    start = load_file(Path(tiny_lm_dir) / "model.safetensors")
    assert any(not torch.allclose(start[k], a[k]) for k in a if k in start)  # training moved the weights
