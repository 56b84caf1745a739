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
  full: eq. (3); its gradient is the exact gradient of the per-position KL given the sampled
        prefix (the prefix's own dependence on theta is left to the REINFORCE term).
  k1:   log pi(y_t) - log pi_ref(y_t) of the sampled token. Its gradient is grad log pi(y_t), whose
        expectation under pi is ZERO: as a loss term k1 only adds noise (kept for comparison).
  k3:   exp(d) - d - 1 with d = log pi_ref(y_t) - log pi(y_t). Gradient (1 - pi_ref/pi) grad log pi,
        whose expectation is grad KL(pi_ref || pi): the reverse KL, not eq. (3).
The logged `kl` is always eq. (3) (free: the fused kernel computes it with the log-probs);
`kl_estimate` is the value of the chosen estimator.

Run (CPU, embedded SmolLM2-135M-Instruct as policy and judge; `make demo` does this):
  python reinforce_kl.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct \\
      --prompts data/rl_prompts.jsonl --steps 4 --prompts-per-step 2 --group-size 4 \\
      --max-new-tokens 32 --output-dir runs/demo
With English SFT first, several processes and a judge served by vLLM on another machine:
  torchrun --nproc_per_node=8 reinforce_kl.py --model Qwen/Qwen2.5-1.5B-Instruct \\
      --sft-data data/sft_en.jsonl --sft-epochs 1 --prompts data/rl_prompts.jsonl \\
      --judge-url http://judge-host:8000 --judge-server-model meta-llama/Llama-3.3-70B-Instruct
"""
import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from kernels import fused_logprob, fused_logprob_kl

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
    sft_epochs: int = field(default=1, metadata={"help": "SFT epochs"})  # our choice: the paper's English SFT stage is short
    sft_lr: float = field(default=1e-5, metadata={"help": "SFT learning rate"})  # our choice: usual for small chat SFT
    sft_batch_size: int = field(default=8, metadata={"help": "SFT dialogues per optimizer step (all ranks)"})  # our choice
    messages_field: str = field(default="messages", metadata={"help": "SFT chat-list field"})
    response_field: str = field(default="response", metadata={"help": "SFT response field (with --prompt-field)"})
    max_seq_len: int = field(default=1024, metadata={"help": "SFT dialogues / RL prompts+responses longer than this are skipped and counted"})
    judge_model: str = field(default="", metadata={"help": "in-process HF judge; empty: same as --model (a disfluent judge)"})
    judge_url: str = field(default="", metadata={"help": "OpenAI-compatible server (e.g. vLLM); overrides --judge-model"})
    judge_server_model: str = field(default="default", metadata={"help": "`model` field sent to --judge-url"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "env var with the server's API key, if any"})
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds per judge request"})  # our choice: a 70B judge answers 1 token in well under this
    judge_retries: int = field(default=3, metadata={"help": "retries per judge request before it counts as a failure"})
    judge_backoff: float = field(default=1.0, metadata={"help": "first retry delay in s, doubled each retry"})
    judge_top_logprobs: int = field(default=20, metadata={"help": "top_logprobs asked from the server (OpenAI allows <= 20)"})
    judge_concurrency: int = field(default=8, metadata={"help": "parallel requests to --judge-url per rank"})
    judge_batch_size: int = field(default=8, metadata={"help": "batch size of the in-process judge"})
    reward: str = field(default="judge", metadata={"help": "judge | token-frequency (programmatic, for tests)"})
    reward_tokens: str = field(default="", metadata={"help": "token-frequency: reward = fraction of response tokens among this text's tokens"})
    output_dir: str = field(default="", metadata={"help": "default runs/reinforce_kl-<YYYYmmdd-HHMMSS>"})
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
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast on CUDA (weights stay float32); ignored on CPU"})
    seed: int = field(default=42, metadata={"help": "seed of data order, sampling and init"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --output-dir"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    sample_every: int = field(default=1, metadata={"help": "write samples.jsonl every N steps"})
    samples_logged: int = field(default=2, metadata={"help": "prompt groups written to samples.jsonl each time"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb"})


# ----------------------------------------------------------------------------------------------
# Math (pure functions; the tests import these)
# ----------------------------------------------------------------------------------------------
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


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor,
             temperature: float, estimator: str):
    """[N, T, V], [N, T, V], [N, T] -> (logp, kl_term, kl_full, entropy), each [N, T] float32.
    kl_term is what enters the loss (eq. 3 or k1/k3, see docstring); kl_full is eq. (3), detached."""
    out = fused_logprob_kl(logits, ref_logits, tokens, temperature=temperature)
    if estimator == "full":
        kl_term = out.kl
    elif estimator in ("k1", "k3"):
        ref_logp = fused_logprob(ref_logits.detach(), tokens, temperature=temperature).detach()
        log_ratio = out.logp - ref_logp  # log pi - log pi_ref of the sampled token
        kl_term = log_ratio if estimator == "k1" else torch.exp(-log_ratio) + log_ratio - 1.0
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


def score_from_top_logprobs(top_logprobs: Sequence[dict]) -> Optional[float]:
    """Eq. (1) from an OpenAI-style `top_logprobs` list [{"token": str, "logprob": float}, ...].
    Tokens that are a digit 1-9 up to whitespace (" 7", "7") are merged; None when none is."""
    probs = [0.0] * 9
    for entry in top_logprobs:
        tok = str(entry.get("token", "")).strip()
        lp = entry.get("logprob")
        if len(tok) == 1 and tok in SCORE_DIGITS and isinstance(lp, (int, float)) and math.isfinite(lp):
            probs[int(tok) - 1] += math.exp(lp)
    if sum(probs) <= 0.0:
        return None
    logp = torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs])
    return float(expected_score(logp[None])[0])


def token_frequency_reward(response_ids: Sequence[Sequence[int]], target_ids: set) -> List[float]:
    """Programmatic reward for tests: fraction of response tokens whose id is in target_ids."""
    return [sum(t in target_ids for t in ids) / len(ids) if len(ids) else 0.0 for ids in response_ids]


def masked_nll(logp: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """SFT loss share: [N, L] log-probs, [N, L] bool mask of assistant tokens -> scalar."""
    return -torch.where(mask, logp, 0.0).sum() / max(num_tokens, 1)


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
        import datasets  # lazily: the GPU image may lack it and JSONL does not need it

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


def sft_example(tokenizer, messages: List[dict]):
    """Token ids and a mask that is True on assistant tokens (including their end-of-turn token).
    Built from template prefixes, so it works for any template whose prefixes tokenize stably."""
    ids = encode(tokenizer, render_chat(tokenizer, messages, False))
    mask = [False] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(encode(tokenizer, render_chat(tokenizer, messages[:k], True)))
        end = len(encode(tokenizer, render_chat(tokenizer, messages[:k + 1], False)))
        for j in range(start, min(end, len(ids))):
            mask[j] = True
    return ids, mask


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] -> [B, V] probabilities of softmax(logits / T), optionally nucleus-truncated."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def sample_group(model, prompt_ids: List[int], args: Args, eos_ids: List[int], pad_id: int,
                 generator: torch.Generator, device):
    """G samples for one prompt with a KV cache and our own generator, so every prompt group is
    reproducible from (seed, step, prompt index) whatever the number of ranks.
    Returns tokens [G, R] (pad after the first EOS) and mask [G, R] (True up to and incl. EOS)."""
    G = args.group_size
    out = model(input_ids=torch.tensor([prompt_ids] * G, device=device), use_cache=True, logits_to_keep=1)
    eos = torch.tensor(eos_ids, device=device)
    done = torch.zeros(G, dtype=torch.bool, device=device)
    tokens = []
    for _ in range(args.max_new_tokens):
        probs = sampling_probs(out.logits[:, -1], args.temperature, args.top_p)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    tokens = torch.stack(tokens, 1)
    ended_before = torch.cumsum(torch.isin(tokens, eos).long(), 1) - torch.isin(tokens, eos).long()
    return tokens, ended_before == 0


def response_logits(model, prompt_ids: List[int], tokens: torch.Tensor, mask: torch.Tensor):
    """Logits that predict each response token: [G, R] -> [G, R, V] (logits[:, t-1] predicts t)."""
    G, R = tokens.shape
    prompt = torch.tensor(prompt_ids, device=tokens.device).expand(G, -1)
    attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    logits = model(input_ids=torch.cat([prompt, tokens], 1), attention_mask=attn, logits_to_keep=R + 1).logits
    return logits[:, :-1]


def group_seed(seed: int, step: int, prompt_index: int) -> int:
    return (seed * 1_000_003 + step) * 1_000_033 + prompt_index


def step_prompt_indices(n: int, seed: int, step: int, per_step: int) -> List[int]:
    """Global prompt indices of `step` (1-based): a fresh seeded permutation every epoch."""
    perms, out = {}, []
    for k in range((step - 1) * per_step, step * per_step):
        epoch, pos = divmod(k, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][pos]))
    return out


# ----------------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------------
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
    if reference:
        return CONSTITUTION.format(prompt=prompt, response=response,
                                   ref_note=" A reference answer in English is given; the answer need not match its wording.",
                                   ref_block=f"\n[Reference answer, English]\n{reference}\n")
    return CONSTITUTION.format(prompt=prompt, response=response, ref_note="", ref_block="")


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
    """In-process judge: one batched no-grad forward, next-token logits at the last prompt token."""

    def __init__(self, model, tokenizer, batch_size: int, device):
        self.model, self.tok, self.bs, self.device = model, tokenizer, batch_size, device
        self.digits = torch.tensor(digit_token_ids(tokenizer), device=device)
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 10**9
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def __call__(self, prompts, responses, references) -> List[float]:
        ids = [encode(self.tok, render_chat(self.tok, [{"role": "user", "content": judge_prompt(p, r, ref)}], True))
               for p, r, ref in zip(prompts, responses, references)]
        scores = [math.nan] * len(ids)  # too long for the judge's context: a counted failure
        ok = [i for i, x in enumerate(ids) if len(x) <= self.max_len]
        for b in range(0, len(ok), self.bs):
            batch = ok[b:b + self.bs]
            L = max(len(ids[i]) for i in batch)
            inp = torch.tensor([ids[i] + [self.pad] * (L - len(ids[i])) for i in batch], device=self.device)
            attn = torch.tensor([[1] * len(ids[i]) + [0] * (L - len(ids[i])) for i in batch], device=self.device)
            logits = self.model(input_ids=inp, attention_mask=attn).logits  # right padding: read each row's last real token
            last = torch.tensor([len(ids[i]) - 1 for i in batch], device=self.device)
            digit_logits = logits[torch.arange(len(batch), device=self.device), last][:, self.digits]
            for i, s in zip(batch, expected_score(digit_logits).tolist()):
                scores[i] = s
        return scores


class HTTPJudge:
    """OpenAI-compatible /v1/chat/completions with max_tokens=1 and top_logprobs. A request that
    times out, errors or cannot be read is retried with exponential backoff, then scored NaN
    (the sample gets A = 0 and is counted in `judge_failures`); training never stops for it."""

    def __init__(self, args: Args):
        url = args.judge_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else \
            url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.args = args
        self.api_key = os.environ.get(args.judge_api_key_env, "")
        self.last_error = ""

    def score_one(self, text: str) -> float:
        a = self.args
        body = json.dumps({"model": a.judge_server_model, "messages": [{"role": "user", "content": text}],
                           "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                           "top_logprobs": a.judge_top_logprobs}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(a.judge_retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=a.judge_timeout) as resp:
                    reply = json.loads(resp.read().decode())
                score = score_from_top_logprobs(reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"])
                if score is not None:
                    return score
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # timeouts, HTTP errors: OSError
                self.last_error = f"{type(e).__name__}: {e}"
            else:
                self.last_error = "no digit 1-9 among the top logprobs"
            if attempt < a.judge_retries:
                time.sleep(a.judge_backoff * 2 ** attempt)
        return math.nan

    def __call__(self, prompts, responses, references) -> List[float]:
        texts = [judge_prompt(p, r, ref) for p, r, ref in zip(prompts, responses, references)]
        with ThreadPoolExecutor(max_workers=max(1, self.args.judge_concurrency)) as pool:
            return list(pool.map(self.score_one, texts))


# ----------------------------------------------------------------------------------------------
# Loading, checkpoints, logging
# ----------------------------------------------------------------------------------------------
def load_lm(path: str, flag: str, device):
    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise SystemExit(f"{flag} {path} does not exist; run `python tools/export_smollm2.py` for the embedded "
                         f"model or pass a Hugging Face model name")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), dtype=torch.float32).to(device)
    except OSError as e:
        raise SystemExit(f"{flag} {path} could not be loaded ({e}); check the name, or unset HF_HUB_OFFLINE to download")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok  # eval: no dropout, so the loss sees the distribution we sampled from


def save_checkpoint(out: Path, step: int, model, tok, optimizer, extra: dict):
    """checkpoint-<step>/ written under a temporary name and renamed: never half-written."""
    final, tmp = out / f"checkpoint-{step}", out / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate(), **extra},
               tmp / "trainer_state.pt")
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
    def __init__(self, kind: str, out: Path, args: Args):
        self.kind, self.writer = kind, None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--report-to tensorboard needs `pip install tensorboard`; or pass --report-to none")
            self.writer = SummaryWriter(str(out / "tb"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report-to wandb needs `pip install wandb`; or pass --report-to none")
            self.writer = wandb.init(project="lowres-align", name=out.name, config=asdict(args), resume="allow")
        elif kind != "none":
            raise SystemExit(f'--report-to must be none, tensorboard or wandb, got "{kind}"')

    def log(self, metrics: dict):
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, metrics["step"])
        elif self.kind == "wandb":
            self.writer.log(metrics, step=metrics["step"])


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
RewardFn = Callable[[List[str], List[str], List[List[int]]], List[float]]


def main(argv: Optional[List[str]] = None, reward_fn: Optional[RewardFn] = None):
    """reward_fn(prompts, responses, response_ids) -> rewards replaces the judge when given."""
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    train(args, reward_fn)


def train(args: Args, reward_fn: Optional[RewardFn] = None):
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.prompts_per_step % world:
        raise SystemExit(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    if args.kl_estimator not in ("full", "k1", "k3"):
        raise SystemExit(f'--kl-estimator must be full, k1 or k3, got "{args.kl_estimator}"')
    if args.reward not in ("judge", "token-frequency"):
        raise SystemExit(f'--reward must be judge or token-frequency, got "{args.reward}"')
    out_name = [args.output_dir or f"runs/reinforce_kl-{time.strftime('%Y%m%d-%H%M%S')}"]
    if ddp:
        dist.broadcast_object_list(out_name, src=0)  # ranks may disagree on the clock
    out = Path(out_name[0])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(asdict(args), indent=2))
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and args.bf16 \
        else contextlib.nullcontext

    # ---- data -----------------------------------------------------------------------------
    policy, tok = load_lm(args.model, "--model", device)
    rows = read_rows(args.prompts, "--prompts")
    prompts, too_long = [], 0
    max_len = min(args.max_seq_len, getattr(policy.config, "max_position_embeddings", None) or args.max_seq_len)
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get(args.prompt_field), str) or not row[args.prompt_field].strip():
            raise SystemExit(f'--prompts {args.prompts} row {i} has no text field "{args.prompt_field}"; '
                             f"pass --prompt-field NAME")
        ids = encode(tok, render_chat(tok, [{"role": "user", "content": row[args.prompt_field]}], True))
        if len(ids) + args.max_new_tokens > max_len:
            too_long += 1
            continue
        prompts.append({"text": row[args.prompt_field], "ids": ids, "reference": row.get(args.reference_field) or None})
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: all {len(rows)} prompts plus --max-new-tokens {args.max_new_tokens} exceed "
                         f"{max_len} tokens (--max-seq-len or the model's context); lower --max-new-tokens")

    # ---- stage 1: English SFT (skipped when resuming; its result is the reference model) -------
    ckpt = latest_checkpoint(out) if args.resume else None
    sft_dir = out / "sft"
    if not args.resume and rank == 0:  # a fresh run must not mix with an older one in the same folder
        old = [p for p in [out / "metrics.jsonl", out / "samples.jsonl", sft_dir, *out.glob("checkpoint-*")] if p.exists()]
        if old:
            print(f"fresh run in {out} (no --resume): removing {', '.join(p.name for p in old)}")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if ddp:
        dist.barrier()
    if args.sft_data and ckpt is None and not (sft_dir / "config.json").exists():
        run_sft(args, policy, tok, device, rank, world, ddp, autocast)
        if rank == 0:
            shutil.rmtree(out / ".tmp-sft", ignore_errors=True)
            policy.save_pretrained(out / ".tmp-sft"), tok.save_pretrained(out / ".tmp-sft")
            os.rename(out / ".tmp-sft", sft_dir)
        if ddp:
            dist.barrier()
    if args.sft_data:
        if not (sft_dir / "config.json").exists():
            raise SystemExit(f"{sft_dir} is missing, so the reference model cannot be rebuilt; start a new --output-dir")
        ref, _ = load_lm(str(sft_dir), "--sft-data result", device)
        if ckpt is None:
            policy, _ = load_lm(str(sft_dir), "--sft-data result", device)
    else:
        ref = copy.deepcopy(policy)
    ref.requires_grad_(False)
    if ckpt is not None:
        policy, _ = load_lm(str(ckpt), "--resume checkpoint", device)

    # ---- reward --------------------------------------------------------------------------
    if reward_fn is None and args.reward == "token-frequency":
        if not args.reward_tokens:
            raise SystemExit("--reward token-frequency needs --reward-tokens TEXT")
        targets = set(encode(tok, args.reward_tokens))
        reward_fn = lambda p, r, ids: token_frequency_reward(ids, targets)  # noqa: E731
    judge = None
    if reward_fn is None:
        if args.judge_url:
            judge = HTTPJudge(args)
        elif (args.judge_model or args.model) == args.model and not args.sft_data:
            judge = HFJudge(ref, tok, args.judge_batch_size, device)  # same weights as the frozen start policy
        else:
            jm, jt = load_lm(args.judge_model or args.model, "--judge-model", device)
            judge = HFJudge(jm.requires_grad_(False), jt, args.judge_batch_size, device)

    # ---- optimizer, resume -----------------------------------------------------------------
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    start, skipped_steps = 0, 0
    if ckpt is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start, skipped_steps = state["step"], state["skipped_steps"]
        torch.set_rng_state(state["torch_rng"]), np.random.set_state(state["numpy_rng"]), random.setstate(state["python_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if rank == 0:
            truncate_jsonl(out / "metrics.jsonl", start), truncate_jsonl(out / "samples.jsonl", start)
            print(f"resuming from {ckpt} (step {start})")
    reporter = Reporter(args.report_to, out, args) if rank == 0 else None
    eos_ids = sorted({tok.eos_token_id, *([policy.generation_config.eos_token_id] if isinstance(
        policy.generation_config.eos_token_id, int) else policy.generation_config.eos_token_id or [])})
    pad_id = tok.pad_token_id
    n_seq = args.prompts_per_step * args.group_size  # N in eq. (4), all ranks

    bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=rank != 0)
    for step in bar:
        t0 = time.time()
        # 1. sample G responses per prompt; this rank takes every world-th prompt of the step
        mine = step_prompt_indices(len(prompts), args.seed, step, args.prompts_per_step)[rank::world]
        groups = []
        for g in mine:
            gen = torch.Generator(device=device).manual_seed(group_seed(args.seed, step, g))
            with autocast():
                tokens, mask = sample_group(policy, prompts[g]["ids"], args, eos_ids, pad_id, gen, device)
            ids = [tokens[i, : int(mask[i].sum())].tolist() for i in range(len(tokens))]
            texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
            groups.append({"p": prompts[g], "tokens": tokens, "mask": mask, "ids": ids, "texts": texts})
        # 2. score every response
        flat_p = [gr["p"]["text"] for gr in groups for _ in gr["texts"]]
        flat_ref = [gr["p"]["reference"] for gr in groups for _ in gr["texts"]]
        flat_r = [t for gr in groups for t in gr["texts"]]
        flat_ids = [x for gr in groups for x in gr["ids"]]
        with autocast():
            scores = judge(flat_p, flat_r, flat_ref) if judge is not None else reward_fn(flat_p, flat_r, flat_ids)
        rewards = torch.tensor(scores, dtype=torch.float32).view(len(groups), args.group_size)
        adv = group_advantages(rewards)
        # 3. loss (eq. 4) one prompt group at a time; DDP syncs gradients on the last backward
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(9, dtype=torch.float64)
        for k, gr in enumerate(groups):
            sync = contextlib.nullcontext() if not ddp or k == len(groups) - 1 else model.no_sync()
            tokens, mask = gr["tokens"], gr["mask"]
            with sync, autocast():
                with torch.no_grad():
                    ref_logits = response_logits(ref, gr["p"]["ids"], tokens, mask)
                logits = response_logits(model, gr["p"]["ids"], tokens, mask)
                logp, kl_term, kl_full, ent = token_kl(logits, ref_logits, tokens, args.temperature, args.kl_estimator)
                a = adv[k].to(device)
                loss = reinforce_kl_loss(logp, kl_term, a, mask, args.beta, n_seq)
                (loss * world).backward()  # DDP averages over ranks; eq. (4) wants the sum
            lens = mask.sum(-1).clamp(min=1).double()
            seq_mean = lambda x: (torch.where(mask, x.detach(), 0.0).sum(-1).double() / lens).sum().item()  # noqa: E731
            r = rewards[k].double()
            ok = torch.isfinite(r)
            sums += torch.tensor([loss.item(), seq_mean(kl_full), seq_mean(kl_term), seq_mean(ent),
                                  mask.sum().item(), r[ok].sum().item(), (r[ok] ** 2).sum().item(),
                                  ok.sum().item(), (a == 0).sum().item()], dtype=torch.float64)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if torch.isfinite(grad_norm):  # gradients are already all-reduced: every rank agrees
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
        if ddp:
            dist.all_reduce(sums)
        loss_s, kl_s, kle_s, ent_s, ntok, rsum, rsq, nval, nzero = sums.tolist()
        r_mean = rsum / max(nval, 1)
        metrics = {"step": step, "reward_mean": r_mean, "reward_std": math.sqrt(max(rsq / max(nval, 1) - r_mean ** 2, 0.0)),
                   "kl": kl_s / n_seq, "kl_estimate": kle_s / n_seq, "entropy": ent_s / n_seq,
                   "response_len": ntok / n_seq, "loss": loss_s, "grad_norm": float(grad_norm),
                   "judge_failures": int(n_seq - nval), "frac_zero_adv": nzero / n_seq,
                   "skipped_steps": skipped_steps, "prompts_skipped": too_long,
                   "tokens_per_s": ntok / (time.time() - t0)}
        if rank == 0:
            if metrics["judge_failures"] == n_seq:
                tqdm.write(f"step {step}: the judge scored none of the {n_seq} responses (last error: "
                           f"{getattr(judge, 'last_error', '') or 'prompt longer than the judge context'})")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if args.sample_every > 0 and step % args.sample_every == 0:
                with open(out / "samples.jsonl", "a") as f:
                    for k, gr in enumerate(groups[: args.samples_logged]):
                        f.write(json.dumps({"step": step, "prompt": gr["p"]["text"], "reference": gr["p"]["reference"],
                                            "responses": gr["texts"], "rewards": rewards[k].tolist()},
                                           ensure_ascii=False) + "\n")
            reporter.log(metrics)
            bar.set_postfix({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if k != "step"})
        if step % args.save_every == 0 or step == args.steps:
            if rank == 0:
                save_checkpoint(out, step, policy, tok, optimizer, {"skipped_steps": skipped_steps,
                                                                     "data_position": step * args.prompts_per_step})
            if ddp:
                dist.barrier()
    if rank == 0:
        print(f"outputs in {out}/: args.json, metrics.jsonl, samples.jsonl, checkpoint-{args.steps}/")
    if ddp:
        dist.destroy_process_group()


def run_sft(args: Args, policy, tok, device, rank: int, world: int, ddp: bool, autocast):
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
        raise SystemExit(f"--sft-data {args.sft_data}: every dialogue exceeds --max-seq-len {args.max_seq_len}")
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None) if ddp else policy
    opt = torch.optim.AdamW(policy.parameters(), lr=args.sft_lr, weight_decay=0.0)
    B = max(args.sft_batch_size - args.sft_batch_size % world, world)
    n_batches = math.ceil(len(examples) / B)
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
                logits = model(input_ids=ids, attention_mask=amask.long()).logits[:, :-1]
                loss = masked_nll(fused_logprob(logits, ids[:, 1:]), lmask, int(n_tok.item())) * weight
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


if __name__ == "__main__":
    main()
