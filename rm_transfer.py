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
            (--kl-estimator full, via kernels) or log pi(y_t|s_t) - log pi_SFT(y_t|s_t) (k1);
            with --missing-eos-penalty p, r(x, y) - p for a response cut at --max-new-tokens without eos (TRL)
  (4) delta_t = R_t + gamma V(s_{t+1}) - V(s_t),  A_t = sum_k (gamma lambda)^k delta_{t+k},  G_t = A_t + V(s_t)
  (5) L_pi = sum_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(y_t|s_t) / pi_old(y_t|s_t)
      with A whitened over the rollout's response tokens: A <- (A - mean) s, s = 1 / std
  (6) L_V  = sum_t 1/2 max((V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -eps_v, eps_v) - G_t)^2)
  (7) L_KL = beta s sum_t KL_t(theta)   (full only, differentiable; the policy's loss is (5) + (7))
  (5)-(7) are summed over the response tokens of a minibatch and divided by its token count.

Why (7). PPO maximises J = E_y[r] - beta KL(pi || pi_SFT) (§2); KL_t depends on theta through the state s_t
(a) and directly (b). full: KL_t in the reward (3) makes (5) give (a) only, (7) gives (b) (without it the
penalty does not regularise a one-token response at all); k1: (5) alone gives all of grad J, so no (7). (7)
carries the whitening scale s of (5). README derives it; a test checks E[-grad((5) + (7))] = grad J exactly.

Scale (issues 12, 13, 15): DDP by default; --fsdp shards the trained models (train-rm: the RM; rl: policy
and value model), their optimizers and the frozen ones (reference, RM) with FSDP2. rl samples a rank's prompts
in one `generate` with the project's keyed Gumbel-max sampler (exact, the same on any number of processes);
log-probs and KL come from final hidden states (--no-fused-linear: from logits). Outputs and checkpoints
(rl: the policy, and value/) are as README's "What every script shares" describes.

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
import contextlib
import copy
import errno
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, HfArgumentParser, LogitsProcessorList)

from kernels import KeyedSampler, fused_linear_logprob, fused_linear_logprob_kl, fused_logprob, fused_logprob_kl

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
    overwrite: bool = field(default=False, metadata={"help": "delete a previous run in --output-dir first"})
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
    rollout_batch_size: int = field(default=16, metadata={"help": "rl: prompts per PPO iteration (global), sampled in one generate call per rank"})  # our choice: CPU-sized
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
    bf16: bool = field(default=True, metadata={"help": "bfloat16 compute on CUDA (master weights stay float32); ignored on CPU"})
    fsdp: bool = field(default=False, metadata={"help": "train-rm, rl: shard trained and frozen models and the optimizers with FSDP2 (needs torchrun)"})
    ref_offload: bool = field(default=False, metadata={"help": "rl with --fsdp on GPUs: keep the frozen reference's and RM's shards in CPU memory"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    compile_rollout: bool = field(default=True, metadata={"help": "rl, CUDA without --fsdp: static KV cache + compiled decoding"})
    fused_linear: bool = field(default=True, metadata={"help": "rl: log-probs and KL from hidden states, float32 logits in chunks (kernels/)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, init and sampling"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its newest checkpoint"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end; always at the end)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    sample_every: int = field(default=5, metadata={"help": "rl: write samples.jsonl every N iterations and at the end (0 = never)"})
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
                  ("missing_eos_penalty", "> 0 (or unset)", lambda v: v is None or v > 0),
                  ("save_total_limit", ">= 1 (or unset)", lambda v: v is None or v >= 1)]
        rules += [(f.name, f"one of {', '.join(f.metadata['choices'])}", lambda v, c=f.metadata["choices"]: v in c)
                  for f in fields(self) if "choices" in f.metadata]
        for name, want, ok in rules:
            if not ok(getattr(self, name)):
                raise SystemExit(f"--{name.replace('_', '-')} must be {want}, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise SystemExit("--resume continues the run in --output-dir and --overwrite deletes it; pass one of them")
        if self.stage == "eval-rm" and (self.resume or self.fsdp):
            raise SystemExit("eval-rm trains nothing: no --resume (it rewrites its own accuracy files) and no --fsdp "
                             "(each process holds one RM at a time); drop the flag")


# Flags a resumed run may change: they do not change what is computed (issue 10, item 7).
RESUME_MAY_CHANGE = {"output_dir", "steps", "epochs", "save_every", "save_total_limit",
                     "sample_every", "report_to", "eval_batch_size", "fsdp", "ref_offload", "gradient_checkpointing",
                     "compile_rollout", "fused_linear"}


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


def pair_correct(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """1 for a pair ranked right, 1/2 for a tie, else 0. [N], [N] -> [N] float64"""
    return (r_better > r_worse).double() + 0.5 * (r_better == r_worse).double()


def pair_accuracy(r_better: torch.Tensor, r_worse: torch.Tensor) -> float:
    return pair_correct(r_better, r_worse).mean().item()


def label_correct(r: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pointwise correctness as §6.1 measures it: each response is classified alone, "good" iff
    sigma(r) > 1/2, i.e. r > 0 (the decision rule of the BCE-trained RM (2)). [N], [N] -> [N] float64"""
    return ((r > 0).long() == labels.long()).double()


def classification_accuracy(r: torch.Tensor, labels: torch.Tensor) -> float:
    return label_correct(r, labels).mean().item()


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


def has_eos(r_ids: torch.Tensor, r_mask: torch.Tensor, eos_ids) -> torch.Tensor:
    """[B, R], [B, R], int or list of ids -> [B] bool: an eos among the response's (unmasked) tokens."""
    return (torch.isin(r_ids, torch.as_tensor(eos_ids, device=r_ids.device)) & r_mask.bool()).any(1)


def penalise_missing_eos(score: torch.Tensor, r_ids: torch.Tensor, r_mask: torch.Tensor, eos_ids,
                         penalty: float | None) -> torch.Tensor:
    """TRL's missing-EOS rule: score - penalty for every response without eos among its tokens (cut off by
    --max-new-tokens); unchanged when penalty is None. [B], [B, R], [B, R] -> [B]"""
    if penalty is None:
        return score
    return score - penalty * (~has_eos(r_ids, r_mask, eos_ids)).to(score.dtype)


def kl_rewards(kl: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. (3): -beta KL_t on every response token, plus the RM score on the last one. [B, T], [B], [B, T] -> [B, T]"""
    r = -beta * kl * mask
    return r.scatter_add(1, last_token_index(mask)[:, None], score[:, None].to(r.dtype))


def token_logprob_kl(x: torch.Tensor, ref_x: torch.Tensor | None, tokens: torch.Tensor, temperature: float,
                     heads: dict | None = None):
    """-> (logp, kl, entropy, ref_logp) of the response tokens, each [B, R] float32; logp and kl
    differentiable. x, ref_x: logits [B, R, V], or final hidden states [B, R, D] when `heads` gives the LM
    heads (weight, ref_weight, softcap, logit_scale): then the kernel computes float32 logits chunk by chunk,
    never [B, R, V] (issue 15). ref_x None (k1 in a PPO minibatch): (logp, None, None, None)."""
    if ref_x is None:
        return (fused_logprob(x, tokens, temperature=temperature) if heads is None else fused_linear_logprob(
            x, heads["weight"], tokens, temperature, softcap=heads["softcap"], logit_scale=heads["logit_scale"])), None, None, None
    o = fused_logprob_kl(x, ref_x, tokens, temperature=temperature) if heads is None else fused_linear_logprob_kl(
        x, heads["weight"], ref_x, heads["ref_weight"], tokens, temperature, softcap=heads["softcap"],
        logit_scale=heads["logit_scale"])
    return o.logp, o.kl, o.entropy, o.ref_logp


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
    names = ["prompt_field"] + (["chosen_field", "rejected_field"] if kind == "pairwise" else ["response_field"])
    texts = [(getattr(a, n), "--" + n.replace("_", "-")) for n in names]
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
    p, fix = Path(path).expanduser(), "pass a folder written by save_pretrained, or a hub name"
    if p.is_dir() and not (p / "config.json").is_file():
        raise SystemExit(f"{flag} {path} is a folder without a model (no config.json); {fix}")
    if p.is_file():
        raise SystemExit(f"{flag} {path} is a file, not a model folder; {fix}")
    if not p.exists() and (path[:1] in (".", "/", "~") or Path(path.split("/")[0]).exists() or path.count("/") > 1):
        raise SystemExit(f"{flag} {path} does not exist; {fix} (org/name)")


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


def saved_dtype(path: str) -> torch.dtype:
    """The dtype a model was published in (checkpoints are written in it, not in fp32 copies)."""
    d = getattr(AutoConfig.from_pretrained(os.path.expanduser(path)), "dtype", None)
    return getattr(torch, d) if isinstance(d, str) else d or torch.float32


def set_dropout(config, p: float) -> list[str]:
    """Sets every dropout probability the architecture's config has (names with "dropout" or ending in
    "pdrop": Llama/Qwen2/SmolLM2 attention_dropout only, GPT-2 resid/embd/attn_pdrop, T5 dropout_rate, ...)."""
    names = [k for k, v in config.to_dict().items() if ("dropout" in k or k.endswith("pdrop")) and (v is None or isinstance(v, float))]
    for k in names:
        setattr(config, k, p)
    return names


def disable_dropout(model):
    """Dropout off everywhere (rl), so a train-mode forward (needed by gradient checkpointing) is the same
    function of the weights as the rollout's: rho = 1 at the first minibatch, and the value clip means something."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def load_scorer(path: str, tok, device, flag="--reward-model", dropout: float | None = None, dtype=torch.float32):
    """AutoModelForSequenceClassification(num_labels=1) in a TokenScorer; pad_token_id set when the config
    lacks it; dropout (train-rm, App. B) set on the config's dropout fields."""
    config = from_pretrained(AutoConfig, path, flag, num_labels=1)
    dropout_fields = set_dropout(config, dropout) if dropout is not None else []
    m = from_pretrained(AutoModelForSequenceClassification, path, flag, config=config, dtype=dtype)
    if m.config.pad_token_id is None:
        m.config.pad_token_id = tok.pad_token_id
    if not hasattr(m, "score"):
        raise SystemExit(f"{flag} {path}: {type(m).__name__} has no per-token `score` head; use a decoder backbone (Llama, Qwen2, ...)")
    scorer = TokenScorer(m).to(device)
    scorer.dropout_fields = dropout_fields
    return scorer


class TokenScorer(torch.nn.Module):
    """The scalar head applied at every position: r(x, y) = read_last(out), V(s_t) = out[:, t]. Under FSDP
    this wrapper is the root module (its forward is the one called, so its hooks gather the embeddings,
    final norm and head); the HF model inside is what checkpoints save."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T] float32
        h = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                  use_cache=False).last_hidden_state
        return self.model.score(h).squeeze(-1).float()


def autocast(device, a: Args):
    """bf16 autocast on CUDA (master weights stay float32); nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and a.bf16 else contextlib.nullcontext()


@torch.no_grad()
def score_sequences(scorer, seqs: list[list[int]], pad_id: int, device, a: Args, lockstep: bool = False):
    """r(x, y) of each sequence [N] float32, in input order, from right-padded batches of similar length
    (sorted; --eval-batch-size sequences each). lockstep (FSDP): every rank runs the same number of
    forwards (each all-gathers the layers), padded with dummy batches."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[b:b + a.eval_batch_size] for b in range(0, len(order), a.eval_batch_size)]
    if lockstep:
        n = torch.tensor([len(batches)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        batches += [[]] * (int(n) - len(batches))
    out = torch.zeros(len(seqs))
    for b in batches:
        ids, mask = (t.to(device) for t in pad([seqs[i] for i in b] or [[pad_id]], pad_id, "right"))
        with autocast(device, a):
            r = read_last(scorer(ids, mask), mask).float().cpu()
        if b:
            out[b] = r
    return out


def shard(model, a: Args, device, frozen: bool):
    """FSDP2 (issue 12): fully_shard each decoder layer (the `_no_split_modules` classes), then the root (a
    TokenScorer for the RM and value model). On GPUs: bf16 compute, fp32 gradient reduction (trained models
    keep fp32 master weights); on CPU fp32 throughout, so CPU tests compare exactly. A frozen model is loaded
    in its compute dtype; --ref-offload keeps its shards in CPU memory between forwards."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    bf16 = device.type == "cuda" and a.bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and not frozen \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if frozen and a.ref_offload and device.type == "cuda" else OffloadPolicy()  # CPU: no-op
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); run without --fsdp")
    for layer in layers:
        fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=True)
    # the root reshards after forward too when frozen (FSDP2 keeps a root gathered, for the backward)
    fully_shard(model, mp_policy=mp, offload_policy=offload, reshard_after_forward=True if frozen else None)
    return model


@contextlib.contextmanager
def gathered(model, fsdp: bool):
    """Sampling under FSDP2 (issue 12.3): all-gather every layer ONCE and keep it gathered for the
    whole `generate` (a per-token all-gather of every layer would cost ~100x the decode time).
    Needs the full model's parameters in the compute dtype (2 bytes per parameter in bf16) plus
    the KV cache on each GPU, for the length of the rollout."""
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


def local_bytes(tensors) -> int:
    """Bytes this rank holds (the local shard of a DTensor)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if torch.is_tensor(t))


# ---------------------------------------------------------------- rollout (swap this block for an inference server)
def static_cache(device, a: Args) -> bool:
    """Static KV cache + compiled decoding: on CUDA, not under FSDP (the gathered model decodes eagerly)."""
    return device.type == "cuda" and a.compile_rollout and not a.fsdp


@torch.no_grad()
def rollout(model, prompts: List[List[int]], keys: List[Tuple[int, ...]], args: Args, eos_ids: List[int],
            pad_id: int, pad_to: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """All samples of this rank in ONE `generate` call (issue 13). prompts: token ids per row (a
    prompt repeated G times gives G rows); keys: one tuple of ints per row (seed, step, prompt,
    sample) that fixes its sampling noise. Returns tokens [N, R] (pad after the first EOS) and mask
    [N, R] (True up to and including the first EOS). pad_to: left-pad prompts to this length (the caller
    pads the training forward's prompts alike) so that a static cache keeps one shape across steps."""
    device = next(model.parameters()).device
    ids, attn = (t.to(device) for t in pad(prompts, pad_id, "left", pad_to))
    P = ids.shape[1]
    static = static_cache(device, args)
    gen = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, eos_token_id=eos_ids,
                           pad_token_id=pad_id, cache_implementation="static" if static else None)
    sampler = KeyedSampler(keys, P, args.temperature, args.top_p)
    saved, model.generation_config = model.generation_config, GenerationConfig()  # no hub defaults (penalties, top-k)
    try:
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen,
                             logits_processor=LogitsProcessorList([sampler]))
    finally:
        model.generation_config = saved
    tokens = out[:, P:]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=device))
    mask = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) == 0
    return torch.where(mask, tokens, pad_id), mask


def response_states(model, ids: torch.Tensor, mask: torch.Tensor, R: int, fused: bool) -> torch.Tensor:
    """What predicts each of the last R tokens (position t-1 predicts t): [B, P+R] -> final hidden states
    [B, R, D] (after the last norm) when `fused`, else logits [B, R, V]. Goes through the model's own
    forward, so DDP's and FSDP's hooks run."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                output_hidden_states=fused, logits_to_keep=1 if fused else R + 1)
    return out.hidden_states[-1][:, -R - 1:-1] if fused else out.logits[:, :-1]


def lm_head(model, like: torch.Tensor) -> torch.Tensor:
    """The LM-head weight [V, D] (gathered if FSDP holds it sharded), on the hidden states' device and in
    their dtype: what autocast or FSDP's bf16 compute gives the head; the kernel still makes float32 logits."""
    w = model.get_output_embeddings().weight
    return (w.full_tensor() if hasattr(w, "full_tensor") else w).to(like.device, like.dtype)


# ---------------------------------------------------------------- output folder, checkpoints, logs
def prepare_output_dir(a: Args, rank: int, world: int) -> Tuple[Path, Optional[Path]]:
    """README's output-folder rules (issue 10) -> (folder, newest checkpoint or None). eval-rm writes whole files
    and never appends, so it replaces an earlier eval-rm in the same folder (but refuses any other run)."""
    name = [a.output_dir or f"runs/rm_transfer-{a.stage}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if world > 1:
        dist.broadcast_object_list(name, src=0)  # ranks may disagree on the clock
    out = Path(name[0])
    is_run = (out / "args.json").exists()
    if out.is_dir() and any(out.iterdir()) and not is_run:
        raise SystemExit(f"--output-dir {out} is not empty and holds no run (no args.json); pass a new or empty folder")
    try:
        saved = json.loads((out / "args.json").read_text()) if is_run else {}
    except ValueError:
        if a.resume:
            raise SystemExit(f"{out}/args.json is corrupt, so --resume cannot check the flags; fix it or pass --overwrite")
        saved = {}
    overwrite = a.overwrite or (a.stage == "eval-rm" and saved.get("stage") == "eval-rm")
    if is_run and not (a.resume or overwrite):
        raise SystemExit(f"--output-dir {out} holds a previous run; pass --resume to continue it or --overwrite to replace it")
    ckpt, changed = None, {}
    if a.resume and is_run:
        for k, v in asdict(a).items():
            if k in saved and saved[k] != v and k not in ("resume", "overwrite"):
                if k not in RESUME_MAY_CHANGE:
                    raise SystemExit(f"--resume: --{k.replace('_', '-')} is {v!r} but the run in {out} used {saved[k]!r} "
                                     f"(args.json); pass the same value, or --overwrite to start over")
                changed[k] = [saved[k], v]
        ckpt = latest_checkpoint(out)
    barrier(world)  # every rank has read the folder before rank 0 changes it
    if rank == 0:
        if overwrite and is_run:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".tmp-*"):  # what a kill during a save left behind
            shutil.rmtree(tmp, ignore_errors=True)
        if a.resume and is_run:
            step = int(ckpt.name.split("-")[1]) if ckpt else 0
            for log in ("metrics.jsonl", "samples.jsonl"):
                trim_jsonl(out / log, step)
            saved.setdefault("_resumed", []).append({"step": step, "changed": changed})
            atomic_write(out / "args.json", json.dumps(saved, indent=2))
            print(f"resuming {out} from " + (f"{ckpt.name}" if ckpt else "step 0 (no checkpoint yet)")
                  + (f"; changed flags: {changed}" if changed else ""))
        else:
            atomic_write(out / "args.json", json.dumps(asdict(a), indent=2))
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


def dumps(x, **kw) -> str:
    """Strict JSON: null, never bare NaN/Infinity."""
    return json.dumps(finite_or_none(x), allow_nan=False, ensure_ascii=False, **kw)


def append_jsonl(path: Path, rows: List[dict]):
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in rows)


def save_hf(path: Path, model, tok, dtype: torch.dtype, rank: int, config_extra: dict | None = None):
    """Consolidated Hugging Face folder in `dtype` (all ranks take part; rank 0 writes). A TokenScorer
    saves the AutoModelForSequenceClassification inside it."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        hf, cut = (model.model, len("model.")) if isinstance(model, TokenScorer) else (model, 0)
        first = {}  # tied weights (embeddings = LM head) once: FSDP's gathered copies no longer share storage
        tied = {n for n, p in hf.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
        hf.save_pretrained(path, state_dict={k[cut:]: v.to(dtype) for k, v in full.items() if k[cut:] not in tied})
        config = copy.deepcopy(hf.config)
        config.dtype = dtype  # save_pretrained wrote the training dtype; config.json must say what the files hold
        config.update(config_extra or {})
        config.save_pretrained(path)
        tok.save_pretrained(path)


@contextlib.contextmanager
def writing(out: Path, name: str, rank: int, world: int):
    """Yields the folder .tmp-<name>/ to write into, renamed to <name>/ when every rank is done, so it is
    never half-written; a full disk removes the temporary folder and says so in one line."""
    final, tmp = out / name, out / f".tmp-{name}"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(world)
        yield tmp
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "unexpected pos" in str(e):
            prev = latest_checkpoint(out)
            raise SystemExit(f"no space left in {out} while writing {name}; free space and run again with "
                             f"--resume ({prev.name + ' is intact' if prev else 'no earlier checkpoint'})")
        raise
    barrier(world)
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    barrier(world)


def trainer_state_dict(trained: dict) -> dict:
    """{name: (model, optimizer)} -> the state dict torch.distributed.checkpoint saves (sharded under FSDP)."""
    sd = {}
    for name, (model, opt) in trained.items():
        sd[name], sd[f"{name}_optimizer"] = get_model_state_dict(model), get_optimizer_state_dict(model, opt)
    return sd


def save_checkpoint(out: Path, step: int, trained, folders, tok, scheds, a: Args, rank: int, world: int):
    """checkpoint-<step>/ as README describes: a Hugging Face folder per model of folders ({subfolder: (model,
    dtype)}, "" = the checkpoint itself), trainer/ (each of `trained`), rng_state_<rank>.pth, trainer_state.json
    (step, the LR schedulers `scheds`). --save-total-limit prunes the oldest."""
    with writing(out, f"checkpoint-{step}", rank, world) as tmp:
        for sub, (model, dtype) in folders.items():
            save_hf(tmp / sub, model, tok, dtype, rank)
        dcp.save(trainer_state_dict(trained), checkpoint_id=str(tmp / "trainer"))
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rng_state_{rank}.pth")
        if rank == 0:
            state = {"step": step, "world_size": world, **{k: sch.state_dict() for k, sch in scheds.items()}}
            atomic_write(tmp / "trainer_state.json", json.dumps(state))
    if rank == 0 and a.save_total_limit:
        done = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
        for old in done[:-a.save_total_limit]:
            shutil.rmtree(old)
    barrier(world)


def load_checkpoint(ckpt: Path, trained: dict, scheds: dict, rank: int) -> dict:
    """Weights and optimizers from trainer/ (resharded to this run's layout), the LR schedulers, this rank's RNG."""
    sd = trainer_state_dict(trained)
    dcp.load(sd, checkpoint_id=str(ckpt / "trainer"))
    for name, (model, opt) in trained.items():
        set_model_state_dict(model, sd[name])
        set_optimizer_state_dict(model, opt, sd[f"{name}_optimizer"])
    rng_file = ckpt / f"rng_state_{rank}.pth"
    if not rng_file.exists():  # more processes than the run that wrote it
        print(f"rank {rank}: {ckpt} has no RNG state of this rank; using rank 0's")
        rng_file = ckpt / "rng_state_0.pth"
    rng = torch.load(rng_file, weights_only=False)
    torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for k, sch in scheds.items():
        sch.load_state_dict(state[k])
    return state


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:])) if done else None


class Reporter:
    """One dict per step: metrics.jsonl (rank 0), the progress bar, tensorboard/wandb."""

    def __init__(self, a: Args, out: Path, rank: int, start: int, total: int):
        self.out, self.rank, self.kind, self.writer = out, rank, a.report_to, None
        self.bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
        if rank == 0 and self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "tb"))
        elif rank == 0 and self.kind == "wandb":
            import wandb
            self.writer = wandb.init(project="lowres-align", name=out.name, config=asdict(a), resume="allow")

    def log(self, metrics: dict):
        self.bar.update(1)
        if self.rank != 0:
            return
        append_jsonl(self.out / "metrics.jsonl", [metrics])
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in numbers.items() if k != "step"})
        if self.kind == "tensorboard":
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, metrics["step"])
        elif self.kind == "wandb":
            self.writer.log(numbers, step=metrics["step"])

    def close(self):
        self.bar.close()
        if self.writer is not None:
            self.writer.close() if self.kind == "tensorboard" else self.writer.finish()


# ---------------------------------------------------------------- utilities shared by the stages
def barrier(world: int):
    if world > 1:
        dist.barrier()


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


def grad_step(params, opt, max_norm: float) -> Tuple[float, int]:
    """Clip, then step unless the gradient is not finite (every rank agrees: gradients are reduced).
    -> (grad norm, 1 if the step was skipped). Under FSDP the norm is a DTensor: full_tensor()."""
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
    ok = bool(torch.isfinite(gnorm))
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm.item(), int(not ok)


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


def evaluate(scorer, tok, kind: str, items: list, device, a: Args, rank: int = 0, world: int = 1, encoded=None) -> dict:
    """acc: pairwise, the pairs ranked right (a tie 1/2); pointwise, the responses classified right alone
    (r > 0), as §6.1 measures it. loss: the mean of (1) or (2). rank_acc (pointwise): the (good, bad) pairs
    per prompt ranked right. Items longer than --max-length are skipped and counted; a value that does not
    exist is None. Each rank scores a strided slice. encoded: encode_items' result, when the caller kept it."""
    enc, kept, n_long = encoded or encode_items(kind, items, tok, a.max_length)
    seqs = [e[0] for e in enc] + ([e[1] for e in enc] if kind == "pairwise" else [])
    s = torch.zeros(len(seqs), dtype=torch.float64, device=device)
    s[rank::world] = score_sequences(scorer, seqs[rank::world], tok.pad_token_id, device, a, a.fsdp).double().to(device)
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


def best_so_far(out: Path) -> Tuple[float, Optional[int]]:
    """(lowest validation loss, its step) as recorded in best-<step>/ or final/ (their config.json), so a
    resumed run goes on from the model it has on disk; (inf, None) when there is none."""
    found = [(math.inf, None)]
    for cfg in [*out.glob("best-*/config.json"), out / "final" / "config.json"]:
        info = json.loads(cfg.read_text()).get("rm_transfer", {}) if cfg.exists() else {}
        if info.get("eval_loss") is not None:
            found.append((info["eval_loss"], info["step"]))
    return min(found, key=lambda b: b[0])


def train_rm(a: Args, rank: int, world: int, device, ddp: bool):
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
    eval_enc = [encode_items(k, its, tok, a.max_length) for _, k, its, _ in evals]  # once, not at every evaluation
    if not enc:
        shortest = min(max(len(sequence_ids(tok, it[0], r)) for r in (it[1:] if kind == "pairwise" else it[1:2]))
                       for it in items)
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
    out, ckpt = prepare_output_dir(a, rank, world)

    # ---- PLUMBING: model (fp32 master weights; loaded on CPU under FSDP, which moves each shard), optimizer
    torch.manual_seed(a.seed)
    scorer = load_scorer(a.model, tok, torch.device("cpu") if a.fsdp else device, "--model", dropout=a.dropout)
    dtype = saved_dtype(a.model)
    if rank == 0:
        print(f"train-rm: dropout {a.dropout} on {', '.join(scorer.dropout_fields) or 'no field (the backbone has none)'}")
    if a.gradient_checkpointing:
        scorer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.fsdp:
        shard(scorer, a, device, frozen=False)
    model = DDP(scorer, device_ids=[device.index] if device.type == "cuda" else None) if ddp and not a.fsdp else scorer
    opt = torch.optim.AdamW(scorer.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = warmup_constant(opt, a.warmup_steps)
    state = load_checkpoint(ckpt, {"model": (scorer, opt)}, {"scheduler": sched}, rank) if ckpt else {"step": 0}
    best = best_so_far(out)  # (lowest validation loss, its step)
    info = {"kind": kind, "train_data": a.train_data, "langs": langs}
    reporter = Reporter(a, out, rank, state["step"], total)
    scorer.train()
    for step in range(state["step"] + 1, total + 1):
        t0 = time.time()
        # ---- ALGO: one batch of pairs (eq. 1) or labelled responses (eq. 2), global mean --------------
        epoch, pos = divmod(step - 1, steps_per_epoch)
        batch = data_order(a.seed, epoch, len(enc))[pos * a.batch_size:(pos + 1) * a.batch_size]
        mine = [enc[i] for i in batch[rank::world]]
        seqs = [e[0] for e in mine] + ([e[1] for e in mine] if kind == "pairwise" else [])
        ids, mask = (t.to(device) for t in pad(seqs, tok.pad_token_id, "right"))
        with autocast(device, a):
            r = read_last(model(ids, mask), mask)
        if kind == "pairwise":
            n = len(mine)
            losses = bradley_terry_loss(r[:n], r[n:])
            correct = pair_correct(r[:n], r[n:]).sum().item()
        else:
            lab = torch.tensor([e[1] for e in mine], device=device)
            losses = pointwise_bce_loss(r, lab)
            correct = label_correct(r, lab).sum().item()
        (losses.sum() / len(batch) * world).backward()  # DDP and FSDP average gradients over ranks: * world
        # ---- PLUMBING: step, evaluation and best/ (App. B), metrics, checkpoint -----------------------
        lr = sched.get_last_lr()[0]
        gnorm, skipped_nonfinite = grad_step(scorer.parameters(), opt, a.max_grad_norm)
        sched.step()
        m = {"step": step, "epoch": epoch, "loss": all_sum(losses.sum().item(), device) / len(batch),
             "train_acc": all_sum(correct, device) / len(batch), "lr": lr, "grad_norm": gnorm,
             "skipped_nonfinite": skipped_nonfinite, "skipped_long": skipped_long, "skipped_empty": skipped["empty"],
             "skipped_identical": skipped["identical"], "param_bytes": local_bytes(scorer.parameters()),
             "optimizer_bytes": local_bytes(v for s in opt.state.values() for v in s.values()),
             "tokens_per_s": all_sum(mask.sum().item(), device) / (time.time() - t0)}
        if evals and (step % eval_every == 0 or step == total):
            scorer.eval()
            for i, (name, k, its, _) in enumerate(evals):
                res = evaluate(scorer, tok, k, its, device, a, rank, world, eval_enc[i])
                m[f"eval_acc/{name}"] = res["acc"]
                if k == kind:
                    m[f"eval_loss/{name}"] = res["loss"]
                if k == "pointwise":
                    m[f"eval_rank_acc/{name}"] = res["rank_acc"]
                if i == sel and res["loss"] is not None and res["loss"] < best[0]:  # same on every rank (all-reduced)
                    best = (res["loss"], step)
                    with writing(out, f"best-{step}", rank, world) as tmp:
                        save_hf(tmp, scorer, tok, dtype, rank,
                                {"rm_transfer": {**info, "step": step, "selected_on": name, "eval_loss": best[0]}})
                    for old in out.glob("best-*") if rank == 0 else []:
                        if old.name != f"best-{step}":
                            shutil.rmtree(old)
            scorer.train()
        m["best_step"] = best[1]
        reporter.log(m)
        if (a.save_every and step % a.save_every == 0) or step == total:
            save_checkpoint(out, step, {"model": (scorer, opt)}, {"": (scorer, dtype)}, tok,
                            {"scheduler": sched}, a, rank, world)
    reporter.close()
    if best[1] is None:  # no validation set of the training kind: final/ = the last step
        with writing(out, "final", rank, world) as tmp:
            save_hf(tmp, scorer, tok, dtype, rank, {"rm_transfer": {**info, "step": total, "selected_on": None}})
    elif rank == 0 and (out / f"best-{best[1]}").is_dir():  # App. B: final/ = the lowest validation loss
        shutil.rmtree(out / "final", ignore_errors=True)  # (a kill here leaves best-<k>/, which --resume reads)
        os.rename(out / f"best-{best[1]}", out / "final")
    if rank == 0:
        print(f"train-rm: final/ = step {best[1] or total}, " + (f"the lowest validation loss ({best[0]:.4f} on "
              f"{evals[sel][0]})" if best[1] else f"the last one (no --eval-data set of the {kind} kind to select on)"))
    barrier(world)


def eval_rm(a: Args, rank: int, world: int, device, ddp: bool):
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
    out, _ = prepare_output_dir(a, rank, world)
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
        atomic_write(out / "accuracy.md", md)
        atomic_write(out / "accuracy.json", dumps({
            "columns": cols, "rows": {k: {c: row.get(c) for c in cols} for k, row in table.items()}, "rules": rules,
            "skipped_long": skipped_long, "skipped_rows": {n: sk for n, _, _, sk in sets}}, indent=1))
    return table


def rl(a: Args, rank: int, world: int, device, ddp: bool):
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
    if load_tokenizer(a.reward_model[0], "--reward-model").get_vocab() != tok.get_vocab():
        raise SystemExit("the reward model's tokenizer differs from the policy's; the value model scores policy "
                         "tokens, so train the RM from the policy's backbone (train-rm --model POLICY)")
    enc = [prompt_ids(tok, p) for p in prompts]
    room = a.max_length - a.max_new_tokens
    skipped_long = sum(len(e) > room for e in enc)
    if skipped_long == len(enc):
        raise SystemExit(f"every prompt of --prompts {a.prompts} is too long: the shortest has {min(map(len, enc))} "
                         f"tokens, and --max-length {a.max_length} minus --max-new-tokens {a.max_new_tokens} leaves {room}; "
                         "raise --max-length (within the model's context) or lower --max-new-tokens")
    if skipped_long and rank == 0:
        print(f"rl: skipped {skipped_long} of {len(enc)} prompts longer than --max-length minus --max-new-tokens ({room} tokens)")
    enc = [e for e in enc if len(e) <= room]
    total = a.steps or math.ceil(len(enc) / a.rollout_batch_size)
    out, ckpt = prepare_output_dir(a, rank, world)

    # ---- PLUMBING: models. Trained: policy and value model (fp32 master weights); frozen: the SFT reference
    # and the RM (bf16 on GPUs under FSDP). Under FSDP all load on CPU and fully_shard moves each shard.
    torch.manual_seed(a.seed)
    load_device = torch.device("cpu") if a.fsdp else device
    frozen_dtype = torch.bfloat16 if a.fsdp and device.type == "cuda" and a.bf16 else torch.float32
    policy = from_pretrained(AutoModelForCausalLM, a.model, "--model", dtype=torch.float32).to(load_device)
    ref = from_pretrained(AutoModelForCausalLM, a.model, "--model", dtype=frozen_dtype).to(load_device)
    rm = load_scorer(a.reward_model[0], tok, load_device, dtype=frozen_dtype)
    value = load_scorer(a.reward_model[0], tok, load_device)
    dtypes = {"": (policy, saved_dtype(a.model)), "value": (value, saved_dtype(a.reward_model[0]))}
    for m in (policy, value):  # dropout off in every model of rl (docstring); eval/train only toggles checkpointing
        disable_dropout(m)
        if a.gradient_checkpointing:
            (m.model if isinstance(m, TokenScorer) else m).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.eval().requires_grad_(False), rm.eval().requires_grad_(False)
    if a.fsdp:
        for m, frozen in ((policy, False), (value, False), (ref, True), (rm, True)):
            shard(m, a, device, frozen)
    policy_d, value_d = (DDP(m, device_ids=[device.index] if device.type == "cuda" else None) if ddp and not a.fsdp
                         else m for m in (policy, value))
    opt_pi, opt_v = (torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=a.weight_decay) for m in (policy, value))
    sch_pi, sch_v = warmup_constant(opt_pi, a.warmup_steps), warmup_constant(opt_v, a.warmup_steps)
    trained = {"policy": (policy, opt_pi), "value": (value, opt_v)}
    scheds = {"sch_pi": sch_pi, "sch_v": sch_v}
    state = load_checkpoint(ckpt, trained, scheds, rank) if ckpt else {"step": 0}
    reporter = Reporter(a, out, rank, state["step"], total)
    gen_eos = policy.generation_config.eos_token_id
    eos_ids = sorted({tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])} - {None})
    pad_id = tok.pad_token_id
    pad_to = max(map(len, enc)) if static_cache(device, a) else 0  # one prompt shape for the compiled decoding
    def heads(x, ref_x):  # the LM heads for the fused kernel; softcap: Gemma 2, logit_scale: Cohere
        return dict(weight=lm_head(policy, x), ref_weight=None if ref_x is None else lm_head(ref, ref_x),
                    softcap=getattr(policy.config, "final_logit_softcapping", None),
                    logit_scale=getattr(policy.config, "logit_scale", None)) if a.fused_linear else None
    for step in range(state["step"] + 1, total + 1):
        t0 = time.time()
        # ---- ALGO: 1. rollout: this rank's prompts in ONE generate call. Sample k of the prompt stream is
        # prompt order(epoch)[pos], (epoch, pos) = divmod(k, #prompts); its noise is keyed by (seed, k)
        ks = list(range((step - 1) * a.rollout_batch_size, step * a.rollout_batch_size))[rank::world]
        orders = {e: data_order(a.seed, e, len(enc)) for e in {k // len(enc) for k in ks}}  # once per epoch
        p_list = [enc[orders[k // len(enc)][k % len(enc)]] for k in ks]
        policy.eval(), value.eval()
        with gathered(policy, a.fsdp), autocast(device, a):
            r_ids, r_mask = rollout(policy, p_list, [(a.seed, k) for k in ks], a, eos_ids, pad_id, pad_to)
        p_ids, p_mask = (t.to(device) for t in pad(p_list, pad_id, "left", pad_to))
        r_mask, R = r_mask.long(), r_ids.shape[1]
        ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
        # ---- ALGO: 2. log-probs, KL (3), values and RM scores of the rollout, from the training forwards
        with torch.no_grad(), autocast(device, a):
            x, ref_x = (response_states(m, ids, mask, R, a.fused_linear) for m in (policy, ref))
            old_logp, kl_full, entropy, ref_logp = token_logprob_kl(x, ref_x, r_ids, a.temperature, heads(x, ref_x))
            kl = kl_full if a.kl_estimator == "full" else old_logp - ref_logp
            del x, ref_x
            old_values = value(ids, mask)[:, -R - 1:-1]  # V(s_t) is read where token t is predicted
            score = read_last(rm(ids, mask), mask)
        for m in (policy, value) if a.fsdp else ():  # a trained root stays gathered after forward (frozen: see shard)
            m.reshard()
        rf = r_mask.float()
        # ---- everyone gets the global rollout, so minibatches do not depend on the world size
        g = {k: gather_rows(v, rank, world, pv, side) for k, v, pv, side in [
            ("p_ids", p_ids, pad_id, "left"), ("p_mask", p_mask, 0, "left"), ("r_ids", r_ids, pad_id, "right"),
            ("r_mask", rf, 0.0, "right"), ("old_logp", old_logp, 0.0, "right"), ("kl", kl * rf, 0.0, "right"),
            ("old_values", old_values * rf, 0.0, "right"), ("entropy", entropy * rf, 0.0, "right")]}
        g["score"] = gather_rows(score[:, None].float(), rank, world, 0.0)[:, 0]
        m_ = g["r_mask"]
        score_pen = penalise_missing_eos(g["score"], g["r_ids"], m_, eos_ids, a.missing_eos_penalty)
        # ---- ALGO: 3. KL-shaped rewards (3), GAE (4), whitened advantages
        rewards = kl_rewards(g["kl"], score_pen, m_, a.beta)
        adv, returns = gae(rewards, g["old_values"], m_, a.gamma, a.lam)
        adv, adv_scale = masked_whiten(adv, m_)
        ids_all, mask_all = torch.cat([g["p_ids"], g["r_ids"]], 1), torch.cat([g["p_mask"], m_.long()], 1)
        B, Rg = m_.shape
        # ---- ALGO: 4. PPO epochs over minibatches, (5) + (7) and (6); the value model trains alone during
        # warm-up. Every rank takes minibatch_size / world rows of each minibatch: the same number of
        # forwards and backwards on every rank (FSDP all-gathers in each), one optimizer step per backward.
        update_policy = step > a.value_warmup_steps
        policy.train(a.gradient_checkpointing), value.train(a.gradient_checkpointing)
        stats, n_tok_sum = {"loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "skipped_nonfinite": 0}, 0.0
        for ep in range(a.ppo_epochs):
            perm = torch.randperm(B, generator=torch.Generator().manual_seed(a.seed * 100003 + (step - 1) * 101 + ep)).tolist()
            for mb0 in range(0, B, a.minibatch_size):
                mb = perm[mb0:mb0 + a.minibatch_size]
                mine = torch.tensor(mb[rank::world], device=device)
                n_tok = m_[mb].sum().item()  # global token count of this minibatch
                xs, xm, mk = ids_all[mine], mask_all[mine], m_[mine]
                if update_policy:
                    with autocast(device, a):
                        x = response_states(policy_d, xs, xm, Rg, a.fused_linear)
                        with torch.no_grad():  # the direct part of the KL's gradient, eq. (7), needs the reference
                            ref_x = response_states(ref, xs, xm, Rg, a.fused_linear) if a.kl_estimator == "full" else None
                        logp, kl_theta, _, _ = token_logprob_kl(x, ref_x, g["r_ids"][mine], a.temperature, heads(x, ref_x))
                    loss_sum, clipped = ppo_policy_loss(logp, g["old_logp"][mine], adv[mine], mk, a.clip_eps, kl_theta,
                                                        a.beta * adv_scale)
                    (loss_sum / n_tok * world).backward()  # DDP and FSDP average over ranks: * world
                    stats["skipped_nonfinite"] += grad_step(policy.parameters(), opt_pi, a.max_grad_norm)[1]
                    stats["clipfrac"] += all_sum(clipped.item(), device)
                    stats["loss"] += all_sum(loss_sum.item(), device)
                with autocast(device, a):
                    v = value_d(xs, xm)[:, -Rg - 1:-1]
                loss_sum = ppo_value_loss(v, g["old_values"][mine], returns[mine], mk, a.value_clip)
                (loss_sum / n_tok * world).backward()
                stats["skipped_nonfinite"] += grad_step(value.parameters(), opt_v, a.max_grad_norm)[1]
                stats["value_loss"] += all_sum(loss_sum.item(), device)
                n_tok_sum += n_tok
        # ---- PLUMBING: schedulers, metrics, samples, checkpoint
        lr = sch_pi.get_last_lr()[0] if update_policy else None  # null: no policy step (value warm-up)
        if update_policy:  # the policy's warm-up starts when it starts moving
            sch_pi.step()
        sch_v.step()
        seq_kl = g["kl"].sum(1)
        reporter.log({
            "step": step, "reward_mean": g["score"].mean().item(), "reward_std": g["score"].std(unbiased=False).item(),
            "kl": seq_kl.mean().item(), "reward_total": (score_pen - a.beta * seq_kl).mean().item(),
            "no_eos_frac": (~has_eos(g["r_ids"], m_, eos_ids)).float().mean().item(),
            "entropy": (g["entropy"].sum() / m_.sum()).item(), "response_len": m_.sum(1).mean().item(),
            "loss": stats["loss"] / n_tok_sum if update_policy else None, "value_loss": stats["value_loss"] / n_tok_sum,
            "clipfrac": stats["clipfrac"] / n_tok_sum if update_policy else None, "policy_updated": int(update_policy),
            "skipped_nonfinite": stats["skipped_nonfinite"], "skipped_long": skipped_long, "lr": lr,
            "param_bytes": local_bytes([*policy.parameters(), *value.parameters()]),
            "optimizer_bytes": local_bytes(v for o in (opt_pi, opt_v) for s in o.state.values() for v in s.values()),
            "tokens_per_s": m_.sum().item() / (time.time() - t0)})
        if rank == 0 and a.sample_every and (step % a.sample_every == 0 or step == total):
            append_jsonl(out / "samples.jsonl", [
                {"step": step, "prompt": tok.decode(g["p_ids"][i][g["p_mask"][i].bool()]),
                 "response": tok.decode(g["r_ids"][i][m_[i].bool()], skip_special_tokens=True),
                 "rm_score": g["score"][i].item(), "kl": seq_kl[i].item()} for i in range(min(3, B))])
        if (a.save_every and step % a.save_every == 0) or step == total:
            save_checkpoint(out, step, trained, dtypes, tok, scheds, a, rank, world)
    reporter.close()


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        argv = ["--stage", argv[0]] + argv[1:]
    (a,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    if a.report_to != "none" and importlib.util.find_spec(a.report_to) is None:
        raise SystemExit(f"--report-to {a.report_to} needs the {a.report_to} package: pip install {a.report_to}")
    ddp = "RANK" in os.environ
    if a.fsdp and not ddp:
        raise SystemExit("--fsdp needs torchrun (any --nproc_per_node, 1 included)")
    if ddp:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors too
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    random.seed(a.seed), np.random.seed(a.seed), torch.manual_seed(a.seed)
    result = {"train-rm": train_rm, "eval-rm": eval_rm, "rl": rl}[a.stage](a, rank, world, device, ddp)
    if ddp:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
