"""Reward model transfer for zero-shot cross-lingual alignment.

Paper: Z. Wu, A. Balashankar, Y. Kim, J. Eisenstein, A. Beirami. "Reuse Your Rewards: Reward Model
Transfer for Zero-Shot Cross-Lingual Alignment." arXiv:2404.12318 (2024).

Method. A reward model (RM) is trained on preference data in a source language (usually English)
and then used, unchanged, to align a policy in a target language that has no preference data.
Three stages, one per sub-command:
  train-rm  the backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1),
            trained with the Bradley-Terry loss on chosen/rejected pairs or with binary cross-entropy
            on pointwise good/bad labels; constant LR after linear warm-up, dropout 0.1 (App. B); final/
            is the step with the lowest validation loss (App. B's checkpoint selection).
  eval-rm   accuracy of one or more RMs on validation sets of several languages (a source x target
            matrix) beside the §6.1 baselines fitted on each training split: pointwise, the majority
            label and a length threshold; pairwise, always the longer (or shorter) response.
  rl        PPO on target-language prompts with the source-language RM and a KL penalty to the SFT
            policy (beta = 0.1, App. B); the value model starts as a copy of the RM and is warmed up
            before the policy moves; dropout is off in every model, --missing-eos-penalty optional.

Equations (numbering ours). r(x, y) = the RM head read at the last non-padding token of x ++ y.
  (1) L_BT  = -log sigma(r(x, y_w) - r(x, y_l))                          pairwise (Bradley-Terry)
  (2) L_BCE = -[l log sigma(r(x, y)) + (1 - l) log(1 - sigma(r(x, y)))]   pointwise, l in {0, 1}
  (3) R_t   = -beta KL_t + [t = T] r(x, y),  KL_t = sum_w pi(w|s_t) log(pi(w|s_t) / pi_SFT(w|s_t))
            (--kl-estimator full, via kernels.fused_logprob_kl) or log pi(y_t|s_t) - log pi_SFT(y_t|s_t) (k1);
            with --missing-eos-penalty p, r(x, y) - p for a response cut at --max-new-tokens without eos (TRL)
  (4) delta_t = R_t + gamma V(s_{t+1}) - V(s_t),  A_t = sum_k (gamma lambda)^k delta_{t+k},  G_t = A_t + V(s_t)
  (5) L_pi = sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(y_t|s_t) / pi_old(y_t|s_t)
      with A whitened over the rollout's response tokens: A <- (A - mean) s, s = 1 / std
  (6) L_V  = sum_t 1/2 max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - G_t)^2)
  (7) L_KL = beta s sum_t KL_t(theta)   (full only, differentiable; the policy's loss is (5) + (7))
  (5)-(7) are summed over the response tokens of a minibatch and divided by its token count.

Why (7). PPO maximises J = E_y[r(x, y)] - beta KL(pi(.|x) || pi_SFT(.|x)) (§2), and the sequence KL is
E_y[sum_t KL_t(s_t)] (chain rule of the KL), where KL_t depends on theta twice: through the state s_t
that the earlier tokens reach, and directly, at a fixed state. Differentiating,
  grad J = E[sum_t grad log pi(y_t|s_t) (r - beta sum_{t'>t} KL_t')]   (a: the states later tokens visit)
         - beta E[sum_t grad_theta KL_t(s_t)]                          (b: the direct part, s_t held fixed)
full: KL_t in the reward (3) makes (5) give (a), and only (a): its own term t' = t adds nothing in
  expectation, as KL_t is fixed given s_t (E[grad log pi(y_t|s_t) | s_t] = 0). (7) gives (b), and only
  (b): its gradient is taken at the sampled states. So each part is counted once. Without (7) the
  penalty does not regularise at all on a one-token response.
k1: (5) alone gives all of grad J, since grad E[log pi(y)/pi_SFT(y)] = E[grad log pi(y) log(pi/pi_SFT)(y)]
  + E[grad log pi(y)], and the last term is 0; so k1 adds no (7).
At the first minibatch (rho = 1) with gamma = lambda = 1 and no whitening, E[-grad((5) + (7))] = grad J
exactly (any V(s_t) is a baseline; lambda < 1 trades bias for variance through V). Whitening scales (5)
by s, so (7) is scaled by the same s and the whole gradient is s grad J, beta keeping its meaning
(tests/test_rm_transfer.py enumerates a 3-token chain to check both estimators).

Run (CPU or GPU; `torchrun --nproc_per_node=N` works for every stage, plain `python` is 1 process):
  python rm_transfer.py train-rm --model $MODEL_DIR --train-data data/prefs_en_train.jsonl \
      --eval-data data/prefs_en_val.jsonl data/prefs_nb_val.jsonl --epochs 4 --lr 2e-5 --output-dir runs/rm-en
  python rm_transfer.py eval-rm --reward-model runs/rm-en/final \
      --eval-data data/prefs_en_val.jsonl data/prefs_nb_val.jsonl data/prefs_es_val.jsonl \
      --train-data data/prefs_en_train.jsonl data/prefs_nb_train.jsonl data/prefs_es_train.jsonl \
      --output-dir runs/rm-eval
  torchrun --nproc_per_node=2 rm_transfer.py rl --model $MODEL_DIR --reward-model runs/rm-en/final \
      --prompts data/prefs_nb_train.jsonl --steps 20 --output-dir runs/rl-nb
"""
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

from kernels import fused_logprob, fused_logprob_kl

STAGES = ("train-rm", "eval-rm", "rl")
EMBEDDED_MODEL = str(Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align"))
                     / "SmolLM2-135M-Instruct")


@dataclass
class Args:
    stage: str = field(default="train-rm", metadata={"help": "train-rm | eval-rm | rl (or the first word)", "choices": STAGES})
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "train-rm: backbone (a causal LM folder works); rl: the SFT policy"})
    reward_model: list[str] = field(default_factory=list, metadata={"help": "eval-rm: one or more RM folders (matrix rows); rl: the RM (also initialises the value model)"})
    train_data: list[str] = field(default_factory=list, metadata={"help": "train-rm: preference files (JSONL or HF dataset name); eval-rm: the training split of each --eval-data file, same order, to fit the baselines"})
    eval_data: list[str] = field(default_factory=list, metadata={"help": "validation preference files; several -> a source x target accuracy matrix"})
    prompts: str = field(default="data/prefs_nb_train.jsonl", metadata={"help": "rl: target-language prompts (field --prompt-field; duplicates removed)"})
    dataset_split: str = field(default="train", metadata={"help": "split used when a data argument is a hub dataset name"})
    output_dir: str = field(default="", metadata={"help": "default runs/rm_transfer-<stage>-<YYYYmmdd-HHMMSS>"})
    prompt_field: str = field(default="prompt", metadata={"help": "field holding the prompt"})
    chosen_field: str = field(default="chosen", metadata={"help": "pairwise: preferred response"})
    rejected_field: str = field(default="rejected", metadata={"help": "pairwise: dispreferred response"})
    response_field: str = field(default="response", metadata={"help": "pointwise: response"})
    label_field: str = field(default="label", metadata={"help": "pointwise: 1 = good, 0 = bad"})
    loss: str = field(default="auto", metadata={"help": "auto | pairwise | pointwise; auto picks from the data's fields", "choices": ("auto", "pairwise", "pointwise")})
    max_length: int = field(default=512, metadata={"help": "longer prompt+response sequences are skipped and counted"})  # our choice: the toy data is < 100 tokens
    epochs: int = field(default=2, metadata={"help": "train-rm: passes over the data when --steps is 0 (the last partial batch of each is dropped)"})  # our choice: tiny data
    steps: int = field(default=0, metadata={"help": "optimizer steps (train-rm) or PPO iterations (rl); 0 = one value derived from the data (--epochs passes / one pass over the prompts)"})
    batch_size: int = field(default=32, metadata={"help": "train-rm: global batch (pairs or labelled responses)"})  # paper App. B: batch size 32
    dropout: float = field(default=0.1, metadata={"help": "train-rm: dropout set on every dropout field of the backbone's config (Llama/Qwen2: attention_dropout)"})  # paper App. B: dropout 0.1
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per forward pass when scoring"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (RM, policy and value model), constant after warm-up"})  # our choice (App. B: 1e-4 with Adafactor on mT5-XL); constant as App. B
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps, then constant"})  # paper App. B: linear warm-up (1,000 steps there); length our choice
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})  # common PPO/RM setting
    eval_every: int = field(default=0, metadata={"help": "train-rm: evaluate --eval-data every N steps (0 = every epoch) and at the end; the lowest validation loss on the first --eval-data set of the training kind selects final/"})  # App. B: checkpoint selection on validation loss
    rollout_batch_size: int = field(default=16, metadata={"help": "rl: prompts per PPO iteration (global)"})  # our choice: CPU-sized
    minibatch_size: int = field(default=8, metadata={"help": "rl: sequences per PPO minibatch (global)"})  # our choice
    ppo_epochs: int = field(default=4, metadata={"help": "rl: passes over each rollout"})  # InstructGPT-style PPO
    clip_eps: float = field(default=0.2, metadata={"help": "rl: policy ratio clip"})  # Schulman et al. 2017
    value_clip: float = field(default=0.2, metadata={"help": "rl: value clip around the rollout's values"})  # common PPO setting
    gamma: float = field(default=1.0, metadata={"help": "rl: discount"})  # RLHF convention: undiscounted episode
    lam: float = field(default=0.95, metadata={"help": "rl: GAE lambda"})  # common RLHF PPO setting
    beta: float = field(default=0.1, metadata={"help": "rl: KL penalty in the reward"})  # paper App. B: beta = 0.1
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "rl: subtracted from the RM score of a response that hit --max-new-tokens without eos (TRL's convention; unset = off)"})  # not in the paper; off by default, as in TRL
    kl_estimator: str = field(default="full", metadata={"help": "full: exact per-token KL over the vocabulary; k1: log-ratio of the sampled token", "choices": ("full", "k1")})
    value_warmup_steps: int = field(default=2, metadata={"help": "rl: PPO iterations that train only the value model"})  # paper App. B: value model warmed up (policy trains after 2,000 of 3,000 steps); count our choice
    max_new_tokens: int = field(default=32, metadata={"help": "rl: response length cap"})  # our choice: CPU-sized
    temperature: float = field(default=1.0, metadata={"help": "rl: sampling temperature (log-probs and KL use the same T)"})
    top_p: float = field(default=1.0, metadata={"help": "rl: nucleus sampling; log-probs stay those of the full tempered softmax"})
    seed: int = field(default=0, metadata={"help": "seed for data order, init and sampling"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint-<step>/ in --output-dir"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    sample_every: int = field(default=5, metadata={"help": "rl: write samples.jsonl every N iterations"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb", "choices": ("none", "tensorboard", "wandb")})

    def __post_init__(self):
        """Bad values stop here with one line, before any file or model is read (HfArgumentParser calls this)."""
        rules = [(n, "> 0", lambda v: v > 0) for n in ("epochs", "batch_size", "eval_batch_size", "rollout_batch_size",
                 "minibatch_size", "ppo_epochs", "max_new_tokens", "max_length", "lr", "clip_eps", "value_clip",
                 "max_grad_norm", "temperature")]
        rules += [(n, ">= 0", lambda v: v >= 0) for n in ("steps", "warmup_steps", "eval_every", "value_warmup_steps",
                  "save_every", "sample_every", "beta", "weight_decay")]
        rules += [("top_p", "in (0, 1]", lambda v: 0 < v <= 1), ("gamma", "in [0, 1]", lambda v: 0 <= v <= 1),
                  ("lam", "in [0, 1]", lambda v: 0 <= v <= 1), ("dropout", "in [0, 1)", lambda v: 0 <= v < 1),
                  ("missing_eos_penalty", "> 0 (or unset)", lambda v: v is None or v > 0)]
        rules += [(n, f"one of {', '.join(c)}", lambda v, c=c: v in c) for n, c in (("stage", STAGES),
                  ("loss", ("auto", "pairwise", "pointwise")), ("kl_estimator", ("full", "k1")),
                  ("report_to", ("none", "tensorboard", "wandb")))]
        for name, want, ok in rules:
            if not ok(getattr(self, name)):
                raise SystemExit(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------- math (tests import these)
def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Eq. (1) per pair. [N], [N] -> [N]"""
    return -F.logsigmoid(r_chosen - r_rejected)


def pointwise_bce_loss(r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. (2) per example. [N], [N] (0/1) -> [N]"""
    return F.binary_cross_entropy_with_logits(r, labels.to(r.dtype), reduction="none")


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: 0, 1, ... over real tokens, so left and right padding give the same positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B]: index of the rightmost real token (left or right padding)."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (idx * mask.long()).max(dim=1).values


def read_last(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T], [B, T] -> [B]: the per-token head output at the last real token = the sequence reward."""
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def pair_accuracy(r_better: torch.Tensor, r_worse: torch.Tensor) -> float:
    """Fraction of pairs ranked right; a tie counts 1/2. [N], [N] -> float"""
    return ((r_better > r_worse).double() + 0.5 * (r_better == r_worse).double()).mean().item()


def classification_accuracy(r: torch.Tensor, labels: torch.Tensor) -> float:
    """Pointwise accuracy as §6.1 measures it: each response is classified alone, "good" iff
    sigma(r) > 1/2, i.e. r > 0 (the decision rule of the BCE-trained RM (2)). [N], [N] -> float"""
    return ((r > 0).long() == labels.long()).double().mean().item()


def fit_majority_label(labels: list[int]) -> int:
    """§6.1 majority baseline (Table 18): the majority label of the training split (a tie -> 1, our choice)."""
    return int(2 * sum(labels) >= len(labels))


def fit_length_threshold(lengths: list[int], labels: list[int]) -> tuple[int, float]:
    """§6.1 pointwise length baseline: "good" iff s * length > t; s = +1 means longer than t is good, s = -1
    shorter than -t. Direction and threshold maximise training accuracy over s in (+1, -1) and t in
    {min(s len) - 1 (always good), midpoints of consecutive distinct s len, max(s len) (never good)};
    ties go to s = +1, then to the smaller t."""
    best, best_acc = (1, 0.0), -1.0
    for s in (1, -1):
        vals = sorted({s * n for n in lengths})
        for t in [vals[0] - 1.0] + [(x + y) / 2 for x, y in zip(vals, vals[1:])] + [float(vals[-1])]:
            acc = length_threshold_accuracy(lengths, labels, s, t)
            if acc > best_acc:
                best, best_acc = (s, t), acc
    return best


def length_threshold_accuracy(lengths: list[int], labels: list[int], s: int, t: float) -> float:
    return sum((s * n > t) == bool(lab) for n, lab in zip(lengths, labels)) / len(labels)


def fit_longer_or_shorter(pairs: list[tuple[int, int]]) -> int:
    """§6.1 pairwise length baseline on (len(chosen), len(rejected)) pairs: +1 = always pick the longer
    response, -1 = always the shorter, whichever is right more often on the training split (a tie -> +1)."""
    return 1 if longer_or_shorter_accuracy(pairs, 1) >= longer_or_shorter_accuracy(pairs, -1) else -1


def longer_or_shorter_accuracy(pairs: list[tuple[int, int]], s: int) -> float:
    """Accuracy of the rule s on (len(chosen), len(rejected)) pairs; equal lengths count 1/2, as a tied RM score."""
    return sum(1.0 if s * (c - r) > 0 else 0.5 if c == r else 0.0 for c, r in pairs) / len(pairs)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Eq. (4). [B, T] x3 -> advantages [B, T], returns [B, T]; mask = 1 on a right-padded run of
    response tokens; the value after the last token is 0 (episode end)."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_v = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * nxt * running) * mask[:, t]
        adv[:, t] = running
    return adv, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, float]:
    """(x - mean) * s over the masked entries, s = 1 / sqrt(var + eps) with the unbiased variance; 0 outside.
    [B, T] -> ([B, T], s); s also scales the KL term (7)."""
    n = mask.sum()
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    s = torch.rsqrt(var + eps)
    return (x - mean) * s * mask, s.item()


def ppo_policy_loss(logp, old_logp, adv, mask, clip_eps: float, kl: torch.Tensor | None = None, kl_coef: float = 0.0):
    """Eq. (5) + (7) summed over masked tokens (the caller divides by the global token count).
    kl: the differentiable exact KL_t(theta) for --kl-estimator full (None for k1), kl_coef = beta s.
    [B, T] x4 (+ [B, T]) -> (loss sum, clipped-token count)"""
    ratio = torch.exp(logp - old_logp)
    per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    if kl is not None:
        per_tok = per_tok + kl_coef * kl
    clipped = ((ratio - 1).abs() > clip_eps).float() * mask
    return (per_tok * mask).sum(), clipped.sum()


def ppo_value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """Eq. (6) summed over masked tokens. [B, T] x4 -> scalar"""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    per_tok = 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return (per_tok * mask).sum()


def penalise_missing_eos(score: torch.Tensor, r_ids: torch.Tensor, r_mask: torch.Tensor, eos_id: int,
                         penalty: float | None) -> torch.Tensor:
    """TRL's missing-EOS rule: score - penalty for every response without eos among its tokens (cut off by
    --max-new-tokens); unchanged when penalty is None. [B], [B, R], [B, R] -> [B]"""
    if penalty is None:
        return score
    has_eos = ((r_ids == eos_id) & r_mask.bool()).any(1)
    return score - penalty * (~has_eos).to(score.dtype)


def kl_rewards(kl: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (3): -beta KL_t on every response token, plus the RM score on the last one. [B, T], [B], [B, T] -> [B, T]"""
    r = -beta * kl * mask
    return r.scatter_add(1, last_token_index(mask)[:, None], score[:, None].to(r.dtype))


# ---------------------------------------------------------------- loading
JSON_TYPE = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def text_of(x, where: str) -> str:
    """A response or prompt: a string, or a chat list (then its last message's content). Anything else,
    null included, stops with one line naming `where` (never str(None) = "None" as training text)."""
    if isinstance(x, list) and x and isinstance(x[-1], dict) and isinstance(x[-1].get("content"), str):
        return x[-1]["content"]
    if not isinstance(x, str):
        raise SystemExit(f"{where} is {json.dumps(x, default=str)[:40]}, not text; a text field must be a string "
                         "or a chat list of {role, content} messages (fix or remove the row, or remap the field)")
    return x


def load_rows(path: str, split: str, flag: str) -> list[tuple[str, dict]]:
    """-> [(where, row)]. A local .jsonl (or extension-less) file is read line by line, blank lines skipped,
    where = "line N" (1-based); a .json file holds one array of objects (where = "row N") or JSON lines;
    .csv/.parquet files, folders and hub names go through datasets.load_dataset. Every row must be an object."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix not in (".csv", ".parquet"):
        data = p.read_bytes()
        if p.suffix == ".json" and data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
            try:
                rows = [(f"row {i}", r) for i, r in enumerate(json.loads(data.decode("utf-8-sig")), 1)]
            except UnicodeDecodeError as e:
                raise SystemExit(f"{flag} {path} is not UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8")
            except json.JSONDecodeError as e:
                raise SystemExit(f"{flag} {path} is not a valid JSON array ({e}); fix the file")
        else:
            rows = []
            for i, raw in enumerate(data.splitlines(), 1):
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise SystemExit(f"{flag} {path} line {i} is not UTF-8 ({e.reason}); re-save the file as UTF-8")
                if line.strip():
                    try:
                        rows.append((f"line {i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{flag} {path} line {i} is not JSON ({e.msg}); fix the line or remove it")
    else:
        import datasets  # lazily: only for hub names, folders, csv and parquet

        if p.is_file():
            ds = datasets.load_dataset(p.suffix[1:], data_files=str(p), split="train")
        elif p.is_dir():
            ds = datasets.load_dataset(str(p), split=split)
        elif path.startswith((".", "/", "~")) or p.suffix in (".json", ".jsonl", ".csv", ".parquet") \
                or Path(path.split("/")[0]).exists():
            raise SystemExit(f"{flag} {path}: no such file; check the path")
        else:
            try:
                ds = datasets.load_dataset(path, split=split)
            except Exception as e:  # offline, unknown name, no such split: any of them means "not loadable"
                raise SystemExit(f"{flag} {path}: no such file, and the hub has no data set of that name "
                                 f"({type(e).__name__}); check the path, or unset HF_HUB_OFFLINE to download")
        rows = [(f"row {i}", r) for i, r in enumerate(ds, 1)]
    for where, r in rows:
        if not isinstance(r, dict):
            raise SystemExit(f"{flag} {path} {where} is a JSON {JSON_TYPE.get(type(r), type(r).__name__)}, not an "
                             "object; write one JSON object per line")
    if not rows:
        raise SystemExit(f"{flag} {path} is empty; pass a file with rows")
    return rows


def parse_prefs(rows: list[tuple[str, dict]], path: str, flag: str, a: Args, loss: str = "auto"):
    """-> (kind, items, skipped): pairwise items (prompt, chosen, rejected); pointwise (prompt, response, label).
    Stops with one line on a missing field, a null or non-text field, a label other than 0/1: the field
    mapping or the export is wrong, and training on the rest would hide it. Skips and counts
    (skipped = {"empty": n, "identical": m}) a row whose response is empty or blank, or whose chosen ==
    rejected: single bad rows, common in real preference sets, with no preference to learn from."""
    first = rows[0][1]
    kind = loss if loss != "auto" else (
        "pairwise" if a.chosen_field in first and a.rejected_field in first else
        "pointwise" if a.response_field in first and a.label_field in first else "")
    if not kind:
        raise SystemExit(f'{flag} {path} {rows[0][0]} has neither "{a.chosen_field}"/"{a.rejected_field}" nor '
                         f'"{a.response_field}"/"{a.label_field}"; pass --chosen-field/--rejected-field or '
                         f"--response-field/--label-field")
    texts = [(a.prompt_field, "--prompt-field")] + ([(a.chosen_field, "--chosen-field"), (a.rejected_field, "--rejected-field")]
                                                    if kind == "pairwise" else [(a.response_field, "--response-field")])
    items, skipped = [], {"empty": 0, "identical": 0}
    for where, r in rows:
        for k, fl in texts + ([] if kind == "pairwise" else [(a.label_field, "--label-field")]):
            if k not in r:
                raise SystemExit(f'{flag} {path} {where} has no field "{k}"; pass {fl} NAME')
        t = [text_of(r[k], f'{flag} {path} {where}: "{k}"') for k, _ in texts]
        if kind == "pointwise" and r[a.label_field] not in (0, 1, True, False):
            raise SystemExit(f'{flag} {path} {where}: "{a.label_field}" = {r[a.label_field]!r}; pointwise labels must be 0 or 1')
        if any(not x.strip() for x in t[1:]):
            skipped["empty"] += 1
        elif kind == "pairwise" and t[1] == t[2]:
            skipped["identical"] += 1
        else:
            items.append((t[0], t[1], t[2] if kind == "pairwise" else int(r[a.label_field])))
    if not items:
        raise SystemExit(f"{flag} {path}: every row was skipped ({skipped['empty']} with an empty response, "
                         f"{skipped['identical']} with chosen == rejected); check the file and the --*-field flags")
    return kind, items, skipped


def ranking_pairs(items: list[tuple[str, str, int]]) -> list[tuple[int, int]]:
    """Pointwise items -> the index pairs (label 1, label 0) of responses to the same prompt (eval-rm's
    extra pair-ranking column)."""
    by_prompt: dict[str, list] = {}
    for i, (p, _, lab) in enumerate(items):
        by_prompt.setdefault(p, []).append((i, lab))
    return [(i, j) for g in by_prompt.values() for i, li in g for j, lj in g if li == 1 and lj == 0]


def lang_of(path: str, rows: list[tuple[str, dict]]) -> str:
    """The "lang" field of the first row (read as every row is: blank lines skipped), else the file's stem."""
    return str(rows[0][1]["lang"]) if "lang" in rows[0][1] else Path(path).stem


def prompt_ids(tok, prompt: str) -> list[int]:
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids
    return tok(prompt).input_ids


def sequence_ids(tok, prompt: str, response: str) -> list[int]:
    """Prompt (chat-formatted) ++ response ++ eos: the same tokens a policy produces when it stops."""
    return prompt_ids(tok, prompt) + tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]


def pad(seqs: list[list[int]], pad_id: int, side: str, length: int = 0):
    """-> ids [B, T], mask [B, T] (T = max(len, length)), padded on `side`."""
    T = max([len(s) for s in seqs] + [length])
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def check_model_path(path: str, flag: str):
    """One line, before anything loads, for a model path that cannot work; hub names pass through."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise SystemExit(f"{flag} {path} is a folder without a model (no config.json); pass a folder written by "
                         "save_pretrained, or a hub name")
    if p.is_file():
        raise SystemExit(f"{flag} {path} is a file, not a model folder; pass a folder written by save_pretrained, or a hub name")
    if not p.exists() and (path.startswith((".", "/", "~")) or Path(path.split("/")[0]).exists() or path.count("/") > 1):
        raise SystemExit(f"{flag} {path} does not exist; pass a folder written by save_pretrained, or a hub name (org/name)")


def from_pretrained(cls, path: str, flag: str, **kw):
    """cls.from_pretrained(path) with one line when a hub name cannot be loaded (offline, unknown, gated)."""
    try:
        return cls.from_pretrained(str(Path(path).expanduser()) if path.startswith("~") else path, **kw)
    except OSError as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({type(e).__name__}); check the name, or unset "
                         "HF_HUB_OFFLINE to download")


def load_tokenizer(path: str, flag: str):
    tok = from_pretrained(AutoTokenizer, path, flag)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def set_dropout(config, p: float) -> list[str]:
    """Sets every dropout probability the architecture's config has (names with "dropout" or ending in
    "pdrop": Llama/Qwen2/SmolLM2 attention_dropout only, GPT-2 resid/embd/attn_pdrop, T5 dropout_rate, ...)."""
    names = [k for k, v in config.to_dict().items() if ("dropout" in k or k.endswith("pdrop")) and (v is None or isinstance(v, float))]
    for k in names:
        setattr(config, k, p)
    return names


def load_scorer(path: str, tok, device, flag: str = "--reward-model", dropout: float | None = None):
    """AutoModelForSequenceClassification(num_labels=1); pad_token_id set when the config lacks it; dropout
    (train-rm, App. B) set on the config's dropout fields."""
    config = from_pretrained(AutoConfig, path, flag, num_labels=1)
    fields = set_dropout(config, dropout) if dropout is not None else []
    m = from_pretrained(AutoModelForSequenceClassification, path, flag, config=config, dtype=torch.float32)
    if m.config.pad_token_id is None:
        m.config.pad_token_id = tok.pad_token_id
    if not hasattr(m, "score"):
        raise SystemExit(f"{flag} {path}: {type(m).__name__} has no per-token `score` head; use a decoder backbone (Llama, Qwen2, ...)")
    scorer = TokenScorer(m).to(device)
    scorer.dropout_fields = fields
    return scorer


class TokenScorer(torch.nn.Module):
    """The scalar head applied at every position: r(x, y) = read_last(out), V(s_t) = out[:, t]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T] float32
        h = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                  use_cache=False).last_hidden_state
        return self.model.score(h).squeeze(-1).float()


@torch.no_grad()
def score_sequences(scorer, seqs: list[list[int]], pad_id: int, device, batch: int) -> torch.Tensor:
    out = []
    for i in range(0, len(seqs), batch):
        ids, mask = pad(seqs[i:i + batch], pad_id, "right")
        out.append(read_last(scorer(ids.to(device), mask.to(device)), mask.to(device)).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------- utilities shared by the stages
def finite(x):
    """Non-finite floats -> None, recursively: a number that does not exist is logged as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x


def dumps(x, **kw) -> str:
    """Strict JSON: null, never bare NaN/Infinity."""
    return json.dumps(finite(x), allow_nan=False, ensure_ascii=False, **kw)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save_atomic(path: Path, models: dict, tok, state: dict | None):
    """models: {subfolder: HF model} ('' = the folder itself); written to path.tmp then renamed."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    for sub, m in models.items():
        m.save_pretrained(tmp / sub)
    tok.save_pretrained(tmp)
    if state is not None:
        torch.save(state, tmp / "trainer_state.pt")
    if path.exists():  # a folder of the same name from an earlier run: replaced, never half-written
        os.rename(path, old)
    os.rename(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def newest_checkpoint(out: Path) -> Path | None:
    cks = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.pt").exists()]
    return max(cks, key=lambda p: int(p.name.split("-")[-1])) if cks else None


class Logger:
    """One dict per step to metrics.jsonl, the progress bar and tensorboard/wandb."""

    def __init__(self, a: Args, out: Path, rank: int, total: int, start: int):
        self.rank, self.out, self.tb, self.wb = rank, out, None, None
        self.bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
        if rank == 0 and start and (out / "metrics.jsonl").exists():  # drop steps logged after the checkpoint
            rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= start]
            (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
        if rank == 0 and a.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out))
        if rank == 0 and a.report_to == "wandb":
            import wandb
            self.wb = wandb.init(project="lowres-align", name=out.name, config=asdict(a))

    def log(self, m: dict):
        """A value that does not exist (None, NaN, inf) is written as null and left out of the bar and tensorboard."""
        if self.rank != 0:
            return
        m = finite(m)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(dumps(m) + "\n")
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in m.items() if k != "step" and v is not None})
        if self.tb is not None:
            for k, v in m.items():
                if v is not None:
                    self.tb.add_scalar(k, v, m["step"])
        if self.wb is not None:
            self.wb.log(m, step=m["step"])

    def close(self):
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def all_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def gather_rows(x: torch.Tensor, rank: int, world: int, pad_value, side: str = "right") -> torch.Tensor:
    """Each rank holds global rows rank, rank + world, ...; returns all rows in global order on every
    rank, dim 1 padded to the longest. [b, T, ...] -> [b * world, T_max, ...]"""
    if world == 1:
        return x
    T = torch.tensor([x.shape[1]], device=x.device)
    dist.all_reduce(T, op=dist.ReduceOp.MAX)
    extra = int(T.item()) - x.shape[1]
    if extra:
        filler = torch.full((x.shape[0], extra, *x.shape[2:]), pad_value, dtype=x.dtype, device=x.device)
        x = torch.cat([filler, x] if side == "left" else [x, filler], dim=1)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *x.shape[1:])


@functools.lru_cache(maxsize=4)
def data_order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def warmup_constant(opt, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))


# ---------------------------------------------------------------- stages
def encode_items(kind, items, tok, max_length):
    """Tokenize; pairs/examples longer than max_length are dropped. -> (kept encodings, their indices, n_skipped)"""
    enc = [(sequence_ids(tok, it[0], it[1]), sequence_ids(tok, it[0], it[2]) if kind == "pairwise" else it[2])
           for it in items]
    kept = [i for i, e in enumerate(enc) if max(len(e[0]), len(e[1]) if kind == "pairwise" else 0) <= max_length]
    return [enc[i] for i in kept], kept, len(enc) - len(kept)


def load_eval_sets(a: Args) -> list[list]:
    """--eval-data files -> [name, kind, items, skipped rows]; name = the language (+ " pointwise"), or the
    file's stem where two files share one."""
    sets = []
    for p in a.eval_data:
        rows = load_rows(p, a.dataset_split, "--eval-data")
        kind, items, skipped = parse_prefs(rows, p, "--eval-data", a)
        sets.append([lang_of(p, rows) + (" pointwise" if kind == "pointwise" else ""), kind, items, skipped])
    names = [s[0] for s in sets]
    for s, p in zip(sets, a.eval_data):
        s[0] = s[0] if names.count(s[0]) == 1 else Path(p).stem
    return sets


def evaluate(scorer, tok, kind: str, items: list, device, a: Args, rank: int = 0, world: int = 1) -> dict:
    """acc: pairwise, the pairs ranked right (a tie 1/2); pointwise, the responses classified right alone
    (r > 0), as §6.1 measures it. loss: the mean of (1) or (2). rank_acc (pointwise): the (good, bad) pairs
    per prompt ranked right. Items longer than --max-length are skipped and counted; a value that does not
    exist is None. Each rank scores a strided slice."""
    enc, kept, n_long = encode_items(kind, items, tok, a.max_length)
    seqs = [e[0] for e in enc] + ([e[1] for e in enc] if kind == "pairwise" else [])
    s = torch.zeros(len(seqs), dtype=torch.float64, device=device)
    s[rank::world] = score_sequences(scorer, seqs[rank::world], tok.pad_token_id, device, a.eval_batch_size).double().to(device)
    if world > 1:
        dist.all_reduce(s)
    s, n = s.cpu(), len(enc)
    res = {"acc": None, "loss": None, "rank_acc": None, "n": n, "skipped_long": n_long}
    if n and kind == "pairwise":
        res.update(acc=pair_accuracy(s[:n], s[n:]), loss=bradley_terry_loss(s[:n], s[n:]).mean().item())
    elif n:
        lab = torch.tensor([e[1] for e in enc])
        res.update(acc=classification_accuracy(s, lab), loss=pointwise_bce_loss(s, lab).mean().item())
        pairs = ranking_pairs([items[i] for i in kept])
        if pairs:
            res["rank_acc"] = pair_accuracy(s[[i for i, _ in pairs]], s[[j for _, j in pairs]])
    return res


def train_rm(a: Args, out: Path, rank: int, world: int, device):
    if not a.train_data:
        raise SystemExit("train-rm needs --train-data FILE [FILE ...] (pairwise or pointwise preferences)")
    check_model_path(a.model, "--model")
    kind, items, skipped, langs = None, [], {"empty": 0, "identical": 0}, []
    for path in a.train_data:
        rows = load_rows(path, a.dataset_split, "--train-data")
        k, its, sk = parse_prefs(rows, path, "--train-data", a, a.loss)
        if kind is not None and k != kind:
            raise SystemExit(f"--train-data {path} is {k} but earlier --train-data files are {kind}; pass files of one kind or --loss")
        kind, items, langs = k, items + its, langs + [lang_of(path, rows)]
        skipped = {key: skipped[key] + sk[key] for key in skipped}
    evals = load_eval_sets(a)
    # App. B: checkpoint selection on validation loss, here the first --eval-data set of the training kind
    sel = next((i for i, e in enumerate(evals) if e[1] == kind), None)
    tok = load_tokenizer(a.model, "--model")
    enc, _, skipped_long = encode_items(kind, items, tok, a.max_length)
    if not enc:
        shortest = min(max(len(sequence_ids(tok, it[0], r)) for r in (it[1:] if kind == "pairwise" else it[1:2])) for it in items)
        raise SystemExit(f"every training example is longer than --max-length {a.max_length} (the shortest has "
                         f"{shortest} tokens); raise --max-length")
    if a.batch_size % world or len(enc) < a.batch_size:
        raise SystemExit(f"--batch-size {a.batch_size} must be a multiple of the {world} processes and at most the "
                         f"{len(enc)} training examples")
    steps_per_epoch = len(enc) // a.batch_size  # the last partial batch of each (reshuffled) epoch is dropped
    total = a.steps or a.epochs * steps_per_epoch
    eval_every = a.eval_every or steps_per_epoch
    if rank == 0 and (skipped_long or sum(skipped.values())):
        print(f"train-rm: skipped {skipped['empty']} rows with an empty response, {skipped['identical']} with "
              f"chosen == rejected, {skipped_long} longer than --max-length {a.max_length}")

    torch.manual_seed(a.seed)
    scorer = load_scorer(a.model, tok, device, "--model", dropout=a.dropout)
    if rank == 0:
        print(f"train-rm: dropout {a.dropout} on {', '.join(scorer.dropout_fields) or 'no field (the backbone has none)'}")
    scorer.train()
    model = DDP(scorer, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else scorer
    opt = torch.optim.AdamW(scorer.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = warmup_constant(opt, a.warmup_steps)
    start, best = 0, (math.inf, None)  # (lowest validation loss, its step)
    if a.resume and (ck := newest_checkpoint(out)) is not None:
        scorer.model.load_state_dict(AutoModelForSequenceClassification.from_pretrained(ck, num_labels=1).state_dict())
        st = torch.load(ck / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(st["optimizer"]), sched.load_state_dict(st["scheduler"]), set_rng_state(st["rng"])
        start, best = st["step"], tuple(st.get("best", best))
    info = {"kind": kind, "train_data": a.train_data, "langs": langs}
    logger = Logger(a, out, rank, total, start)
    for step in range(start, total):
        t0 = time.time()
        epoch, pos = divmod(step, steps_per_epoch)
        batch = data_order(a.seed, epoch, len(enc))[pos * a.batch_size:(pos + 1) * a.batch_size]
        mine = [enc[i] for i in batch[rank::world]]
        if kind == "pairwise":
            ids, mask = pad([e[0] for e in mine] + [e[1] for e in mine], tok.pad_token_id, "right")
        else:
            ids, mask = pad([e[0] for e in mine], tok.pad_token_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        r = read_last(model(ids, mask), mask)
        if kind == "pairwise":
            n = len(mine)
            losses = bradley_terry_loss(r[:n], r[n:])
            correct = ((r[:n] > r[n:]).float() + 0.5 * (r[:n] == r[n:]).float()).sum().item()
        else:
            lab = torch.tensor([e[1] for e in mine], device=device)
            losses = pointwise_bce_loss(r, lab)
            correct = ((r > 0).long() == lab).float().sum().item()
        # global mean over the batch; DDP averages gradients over ranks, hence * world
        (losses.sum() / len(batch) * world).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(scorer.parameters(), a.max_grad_norm)
        skipped_nonfinite = 0
        if torch.isfinite(gnorm):
            opt.step()
        else:
            skipped_nonfinite = 1
        opt.zero_grad(set_to_none=True)
        lr = sched.get_last_lr()[0]
        sched.step()
        m = {"step": step + 1, "epoch": epoch, "loss": all_sum(losses.sum().item(), device) / len(batch),
             "train_acc": all_sum(correct, device) / len(batch), "lr": lr,
             "grad_norm": gnorm.item(), "skipped_nonfinite": skipped_nonfinite, "skipped_long": skipped_long,
             "skipped_empty": skipped["empty"], "skipped_identical": skipped["identical"],
             "tokens_per_s": all_sum(mask.sum().item(), device) / (time.time() - t0)}
        if evals and ((step + 1) % eval_every == 0 or step + 1 == total):
            scorer.eval()
            for i, (name, k, its, _) in enumerate(evals):
                res = evaluate(scorer, tok, k, its, device, a, rank, world)
                m[f"eval_acc/{name}"] = res["acc"]
                if k == kind:
                    m[f"eval_loss/{name}"] = res["loss"]
                if k == "pointwise":
                    m[f"eval_rank_acc/{name}"] = res["rank_acc"]
                if i == sel and res["loss"] is not None and res["loss"] < best[0]:
                    best = (res["loss"], step + 1)
                    if rank == 0:
                        scorer.model.config.update({"rm_transfer": {**info, "step": step + 1, "selected_on": name, "eval_loss": best[0]}})
                        save_atomic(out / "best", {"": scorer.model}, tok, None)
            scorer.train()
        m["best_step"] = best[1]
        logger.log(m)
        if rank == 0 and a.save_every and (step + 1) % a.save_every == 0 and step + 1 < total:
            save_atomic(out / f"checkpoint-{step + 1}", {"": scorer.model}, tok,
                        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(),
                         "step": step + 1, "best": best})
        if world > 1:
            dist.barrier()
    if rank == 0:  # final/ = the step with the lowest validation loss (App. B), else the last step
        if best[1] is not None and (out / "best").is_dir():
            if (out / "final").exists():
                shutil.rmtree(out / "final")
            os.rename(out / "best", out / "final")
            print(f"train-rm: final/ = step {best[1]}, the lowest validation loss ({best[0]:.4f} on {evals[sel][0]})")
        else:
            scorer.model.config.update({"rm_transfer": {**info, "step": total, "selected_on": None}})
            save_atomic(out / "final", {"": scorer.model}, tok, None)
            print(f"train-rm: final/ = the last step {total} (no --eval-data set of the {kind} kind to select on)")
    logger.close()


def eval_rm(a: Args, out: Path, rank: int, world: int, device):
    if not a.reward_model or not a.eval_data:
        raise SystemExit("eval-rm needs --reward-model DIR [DIR ...] and --eval-data FILE [FILE ...]")
    if a.train_data and len(a.train_data) != len(a.eval_data):
        raise SystemExit(f"--train-data gives {len(a.train_data)} files for {len(a.eval_data)} --eval-data files; "
                         "pass one training split per eval file, in the same order (or none to skip the baselines)")
    for p in a.reward_model:
        check_model_path(p, "--reward-model")
    sets, trains = load_eval_sets(a), []
    for (name, kind, _, _), tpath in zip(sets, a.train_data):
        k, its, _ = parse_prefs(load_rows(tpath, a.dataset_split, "--train-data"), tpath, "--train-data", a)
        if k != kind:
            raise SystemExit(f"--train-data {tpath} is {k} but its --eval-data set {name} is {kind}; pass the same kind")
        trains.append(its)
    cols = [c for name, kind, _, _ in sets for c in ([name, f"{name} (ranking)"] if kind == "pointwise" else [name])]
    table, skipped_long = {}, {}
    for rm_path in a.reward_model:
        tok = load_tokenizer(rm_path, "--reward-model")
        scorer = load_scorer(rm_path, tok, device, "--reward-model").eval()
        info = getattr(scorer.model.config, "rm_transfer", None) or {}
        key = f"RM {','.join(info.get('langs', [])) or Path(rm_path).name} ({rm_path})"
        table[key], skipped_long[key] = {}, {}
        for name, kind, items, _ in sets:
            res = evaluate(scorer, tok, kind, items, device, a, rank, world)
            table[key][name], skipped_long[key][name] = res["acc"], res["skipped_long"]
            if kind == "pointwise":
                table[key][f"{name} (ranking)"] = res["rank_acc"]
    rules = {}
    if trains:  # §6.1 baselines, fitted on each eval set's training split
        maj, length = {}, {}
        for (name, kind, items, _), train in zip(sets, trains):
            if kind == "pointwise":
                lab = fit_majority_label([x[2] for x in train])
                maj[name] = sum(x[2] == lab for x in items) / len(items)
                s, t = fit_length_threshold([len(x[1]) for x in train], [x[2] for x in train])
                length[name] = length_threshold_accuracy([len(x[1]) for x in items], [x[2] for x in items], s, t)
                rules[name] = f"majority label {lab}; length: good iff len(response) {'>' if s > 0 else '<'} {s * t:g} characters"
            else:  # §6.1: a pairwise task has no majority baseline
                maj[name] = None
                s = fit_longer_or_shorter([(len(x[1]), len(x[2])) for x in train])
                length[name] = longer_or_shorter_accuracy([(len(x[1]), len(x[2])) for x in items], s)
                rules[name] = f"length: always the {'longer' if s > 0 else 'shorter'} response"
        table["majority label (train split)"], table["length (train split)"] = maj, length
    if rank == 0:
        cell = lambda v: "–" if v is None else f"{v:.3f}"
        lines = ["| RM \\ eval | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(cell(row.get(c)) for c in cols) + " |" for name, row in table.items()]
        md = "\n".join(lines) + "\n\nItems per eval set: " + ", ".join(f"{n}={len(it)}" for n, _, it, _ in sets) + "\n"
        md += "".join(f"Baseline rule, {n}: {r}\n" for n, r in rules.items())
        md += "".join(f"Skipped rows, {n}: {sk}\n" for n, _, _, sk in sets if sum(sk.values()))
        if any(v for row in skipped_long.values() for v in row.values()):
            md += f"Skipped as longer than --max-length {a.max_length}: {json.dumps(skipped_long)}\n"
        print(md)
        (out / "accuracy.md").write_text(md)
        (out / "accuracy.json").write_text(dumps({"columns": cols, "rows": {k: {c: row.get(c) for c in cols} for k, row in table.items()},
                                                  "rules": rules, "skipped_long": skipped_long,
                                                  "skipped_rows": {n: sk for n, _, _, sk in sets}}, indent=1))
    return table


@torch.no_grad()
def sample(policy, p_ids, p_mask, gens, a: Args, eos_id: int, pad_id: int):
    """Tempered (and nucleus) sampling with one generator per prompt, so a prompt's response does not
    depend on which rank or batch it is in. [B, P] -> response ids [B, R], mask [B, R] (1 up to and
    including the first eos)."""
    B = p_ids.shape[0]
    pos = position_ids_from_mask(p_mask)
    attn = p_mask.clone()
    out = policy(input_ids=p_ids, attention_mask=attn, position_ids=pos, use_cache=True)
    next_pos, done, toks = pos[:, -1:] + 1, torch.zeros(B, dtype=torch.bool, device=p_ids.device), []
    for _ in range(a.max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / a.temperature, -1)
        if a.top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp > a.top_p
            probs = probs.scatter(-1, si, sp.masked_fill(drop, 0.0))
        tok = torch.stack([torch.multinomial(probs[i].cpu(), 1, generator=gens[i]) for i in range(B)]).to(p_ids.device)
        tok = torch.where(done[:, None], torch.full_like(tok, pad_id), tok)
        toks.append(tok)
        done = done | (tok[:, 0] == eos_id)
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(tok)], 1)
        out = policy(input_ids=tok, attention_mask=attn, position_ids=next_pos, past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    r_ids = torch.cat(toks, 1)
    is_eos = (r_ids == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return r_ids, (~after_eos).long()


def response_logits(model, ids, mask, R: int) -> torch.Tensor:
    """Logits that predict the last R tokens: position t-1 predicts token t. [B, P+R] -> [B, R, V]"""
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=False, logits_to_keep=R + 1).logits[:, :-1]


def rl(a: Args, out: Path, rank: int, world: int, device):
    if len(a.reward_model) != 1:
        raise SystemExit("rl needs exactly one --reward-model DIR (the source-language RM)")
    if a.rollout_batch_size % world or a.minibatch_size % world or a.rollout_batch_size % a.minibatch_size:
        raise SystemExit(f"--rollout-batch-size {a.rollout_batch_size} and --minibatch-size {a.minibatch_size} must be "
                         f"multiples of the {world} processes, and the first a multiple of the second")
    check_model_path(a.model, "--model")
    check_model_path(a.reward_model[0], "--reward-model")
    rows = load_rows(a.prompts, a.dataset_split, "--prompts")
    for where, r in rows:
        if a.prompt_field not in r:
            raise SystemExit(f'--prompts {a.prompts} {where} has no field "{a.prompt_field}"; pass --prompt-field NAME')
    prompts = list(dict.fromkeys(text_of(r[a.prompt_field], f'--prompts {a.prompts} {where}: "{a.prompt_field}"')
                                 for where, r in rows))
    tok = load_tokenizer(a.model, "--model")
    rm_tok = load_tokenizer(a.reward_model[0], "--reward-model")
    if rm_tok.get_vocab() != tok.get_vocab():
        raise SystemExit("the reward model's tokenizer differs from the policy's; the value model scores policy "
                         "tokens, so train the RM from the policy's backbone (train-rm --model POLICY)")
    enc = [(p, prompt_ids(tok, p)) for p in prompts]
    room = a.max_length - a.max_new_tokens
    skipped_long = sum(len(e) > room for _, e in enc)
    if skipped_long == len(enc):
        raise SystemExit(f"every prompt of --prompts {a.prompts} is too long: the shortest has {min(len(e) for _, e in enc)} "
                         f"tokens, and --max-length {a.max_length} minus --max-new-tokens {a.max_new_tokens} leaves {room}; "
                         "raise --max-length (within the model's context) or lower --max-new-tokens")
    if skipped_long and rank == 0:
        print(f"rl: skipped {skipped_long} of {len(enc)} prompts longer than --max-length minus --max-new-tokens ({room} tokens)")
    enc = [(p, e) for p, e in enc if len(e) <= room]
    total = a.steps or math.ceil(len(enc) / a.rollout_batch_size)

    torch.manual_seed(a.seed)
    policy = from_pretrained(AutoModelForCausalLM, a.model, "--model", dtype=torch.float32).to(device)
    ref = from_pretrained(AutoModelForCausalLM, a.model, "--model", dtype=torch.float32).to(device).requires_grad_(False)
    rm = load_scorer(a.reward_model[0], tok, device, "--reward-model").requires_grad_(False)
    value = load_scorer(a.reward_model[0], tok, device, "--reward-model")
    # dropout stays off in every model of `rl` (eval mode, never train()): rollout and PPO forwards must be
    # the same function of the weights, or rho != 1 at the first minibatch and the value clip is noise
    policy.eval(), ref.eval(), rm.eval(), value.eval()
    start = 0
    ck = newest_checkpoint(out) if a.resume else None
    if ck is not None:
        policy.load_state_dict(AutoModelForCausalLM.from_pretrained(ck).state_dict())
        value.model.load_state_dict(AutoModelForSequenceClassification.from_pretrained(ck / "value", num_labels=1).state_dict())
    ddp = (lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None)) if world > 1 else (lambda m: m)
    policy_d, value_d = ddp(policy), ddp(value)
    opt_pi = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    opt_v = torch.optim.AdamW(value.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sch_pi, sch_v = warmup_constant(opt_pi, a.warmup_steps), warmup_constant(opt_v, a.warmup_steps)
    if ck is not None:
        st = torch.load(ck / "trainer_state.pt", weights_only=False)
        for o, k in ((opt_pi, "opt_pi"), (opt_v, "opt_v"), (sch_pi, "sch_pi"), (sch_v, "sch_v")):
            o.load_state_dict(st[k])
        set_rng_state(st["rng"])
        start = st["step"]
    logger = Logger(a, out, rank, total, start)
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    for step in range(start, total):
        t0 = time.time()
        # ---- rollout: this rank's prompts, sampled with per-prompt generators
        # sample k of the prompt stream = prompt order(epoch)[pos], (epoch, pos) = divmod(k, #prompts)
        ks = list(range(step * a.rollout_batch_size, (step + 1) * a.rollout_batch_size))[rank::world]
        gidx = [data_order(a.seed, k // len(enc), len(enc))[k % len(enc)] for k in ks]
        p_ids, p_mask = pad([enc[i][1] for i in gidx], pad_id, "left")
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        gens = [torch.Generator().manual_seed(a.seed * 1_000_003 + k) for k in ks]
        r_ids, r_mask = sample(policy, p_ids, p_mask, gens, a, eos_id, pad_id)
        R = r_ids.shape[1]
        ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
        with torch.no_grad():
            lg, ref_lg = response_logits(policy, ids, mask, R), response_logits(ref, ids, mask, R)
            o = fused_logprob_kl(lg, ref_lg, r_ids, temperature=a.temperature)
            old_logp = o.logp
            kl = o.kl if a.kl_estimator == "full" else o.logp - fused_logprob(ref_lg, r_ids, temperature=a.temperature)
            del lg, ref_lg
            old_values = value(ids, mask)[:, -R - 1:-1]  # V(s_t) is read where token t is predicted
            score = read_last(rm(ids, mask), mask)
        rf = r_mask.float()
        # ---- everyone gets the global rollout, so minibatches do not depend on the world size
        g = {k: gather_rows(v, rank, world, pv, side) for k, v, pv, side in [
            ("p_ids", p_ids, pad_id, "left"), ("p_mask", p_mask, 0, "left"), ("r_ids", r_ids, pad_id, "right"),
            ("r_mask", rf, 0.0, "right"), ("old_logp", old_logp, 0.0, "right"), ("kl", kl * rf, 0.0, "right"),
            ("old_values", old_values * rf, 0.0, "right"), ("entropy", o.entropy * rf, 0.0, "right")]}
        g["score"] = gather_rows(score[:, None], rank, world, 0.0)[:, 0]
        m_ = g["r_mask"]
        score_pen = penalise_missing_eos(g["score"], g["r_ids"], m_, eos_id, a.missing_eos_penalty)
        rewards = kl_rewards(g["kl"], score_pen, m_, a.beta)
        adv, returns = gae(rewards, g["old_values"], m_, a.gamma, a.lam)
        adv, adv_scale = masked_whiten(adv, m_)
        ids_all, mask_all = torch.cat([g["p_ids"], g["r_ids"]], 1), torch.cat([g["p_mask"], m_.long()], 1)
        Rg, B = m_.shape[1], m_.shape[0]
        # ---- PPO epochs over minibatches; the value model trains alone during warm-up
        update_policy = step >= a.value_warmup_steps
        stats = {"loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "n_tok": 0.0, "skipped_nonfinite": 0}
        for ep in range(a.ppo_epochs):
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(a.seed * 100003 + step * 101 + ep)).tolist()
            for mb0 in range(0, B, a.minibatch_size):
                mb = perm[mb0:mb0 + a.minibatch_size]
                mine = torch.tensor(mb[rank::world], device=device)
                n_tok = m_[mb].sum().item()  # global token count of this minibatch
                x, xm, mk = ids_all[mine], mask_all[mine], m_[mine]
                for model_d, opt, params, is_pi in ((policy_d, opt_pi, policy.parameters(), True),
                                                    (value_d, opt_v, value.parameters(), False)):
                    if is_pi and not update_policy:
                        continue
                    if is_pi:
                        lg, kl_theta = response_logits(model_d, x, xm, Rg), None
                        if a.kl_estimator == "full":  # the direct part of the KL's gradient, Eq. (7)
                            with torch.no_grad():
                                ref_lg = response_logits(ref, x, xm, Rg)
                            o_mb = fused_logprob_kl(lg, ref_lg, g["r_ids"][mine], temperature=a.temperature)
                            logp, kl_theta = o_mb.logp, o_mb.kl
                        else:
                            logp = fused_logprob(lg, g["r_ids"][mine], temperature=a.temperature)
                        loss_sum, clipped = ppo_policy_loss(logp, g["old_logp"][mine], adv[mine], mk, a.clip_eps,
                                                            kl_theta, a.beta * adv_scale)
                        stats["clipfrac"] += all_sum(clipped.item(), device)
                    else:
                        v = model_d(x, xm)[:, -Rg - 1:-1]
                        loss_sum = ppo_value_loss(v, g["old_values"][mine], returns[mine], mk, a.value_clip)
                    (loss_sum / n_tok * world).backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
                    if torch.isfinite(gnorm):
                        opt.step()
                    else:
                        stats["skipped_nonfinite"] += 1
                    opt.zero_grad(set_to_none=True)
                    stats["loss" if is_pi else "value_loss"] += all_sum(loss_sum.item(), device)
                stats["n_tok"] += n_tok
        lr = sch_pi.get_last_lr()[0] if update_policy else None  # null: no policy step (value warm-up)
        if update_policy:  # the policy's warm-up starts when it starts moving
            sch_pi.step()
        sch_v.step()
        seq_kl = g["kl"].sum(1)
        m = {"step": step + 1, "reward_mean": g["score"].mean().item(), "reward_std": g["score"].std(unbiased=False).item(),
             "kl": seq_kl.mean().item(), "reward_total": (score_pen - a.beta * seq_kl).mean().item(),
             "no_eos_frac": (~((g["r_ids"] == eos_id) & m_.bool()).any(1)).float().mean().item(),
             "entropy": (g["entropy"].sum() / m_.sum()).item(), "response_len": m_.sum(1).mean().item(),
             "loss": stats["loss"] / stats["n_tok"] if update_policy else None, "value_loss": stats["value_loss"] / stats["n_tok"],
             "clipfrac": stats["clipfrac"] / stats["n_tok"] if update_policy else None, "policy_updated": int(update_policy),
             "skipped_nonfinite": stats["skipped_nonfinite"], "skipped_long": skipped_long, "lr": lr,
             "tokens_per_s": m_.sum().item() / (time.time() - t0)}
        logger.log(m)
        if rank == 0 and a.sample_every and (step % a.sample_every == 0 or step + 1 == total):
            with open(out / "samples.jsonl", "a") as f:
                for i in range(min(3, B)):
                    f.write(dumps({"step": step + 1, "prompt": tok.decode(g["p_ids"][i][g["p_mask"][i].bool()]),
                                   "response": tok.decode(g["r_ids"][i][m_[i].bool()], skip_special_tokens=True),
                                   "rm_score": g["score"][i].item(), "kl": seq_kl[i].item()}) + "\n")
        last = step + 1 == total
        if rank == 0 and (last or (a.save_every and (step + 1) % a.save_every == 0)):
            save_atomic(out / f"checkpoint-{step + 1}", {"": policy, "value": value.model}, tok,
                        {"opt_pi": opt_pi.state_dict(), "opt_v": opt_v.state_dict(), "sch_pi": sch_pi.state_dict(),
                         "sch_v": sch_v.state_dict(), "rng": rng_state(), "step": step + 1})
        if world > 1:
            dist.barrier()
    logger.close()


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        argv = ["--stage", argv[0]] + argv[1:]
    (a,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    if a.report_to != "none" and importlib.util.find_spec(a.report_to) is None:
        raise SystemExit(f"--report-to {a.report_to} needs the {a.report_to} package: pip install {a.report_to}")
    if "RANK" in os.environ:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    name = [a.output_dir or f"runs/rm_transfer-{a.stage}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if world > 1:
        dist.broadcast_object_list(name)  # every rank uses rank 0's timestamp
    out = Path(name[0])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not a.resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        (out / "args.json").write_text(json.dumps(asdict(a), indent=1))
    if world > 1:
        dist.barrier()
    random.seed(a.seed), np.random.seed(a.seed), torch.manual_seed(a.seed)
    result = {"train-rm": train_rm, "eval-rm": eval_rm, "rl": rl}[a.stage](a, out, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
