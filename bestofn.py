"""Best-of-n reranking with any reward model or LLM judge: its KL bound and its win rate.

Paper: Z. Wu, A. Balashankar, Y. Kim, J. Eisenstein, A. Beirami, "Reuse Your Rewards: Reward
Model Transfer for Zero-Shot Cross-Lingual Alignment", arXiv:2404.12318 (NAACL 2024). The paper
uses best-of-n (n = 64, App. B) as its training-free alignment testbed (§5): a reward model
trained in one language reranks samples of a policy in another. KL bound: A. Beirami, A. Agarwal,
J. Berant, A. D'Amour, J. Eisenstein, C. Nagpal, A. T. Suresh, "Theoretical guarantees on the
best-of-n alignment policy", arXiv:2401.01879 (2024).

Method (no training):
  1. for each prompt x, sample y_1..y_n ~ pi_base(. | x): the n candidates of several prompts
     share one `generate` call (at most --batch-size sequences), and every draw is eq. (5), a pure
     function of (seed, prompt, sample, position): the output does not depend on batching, on
     the number of processes or on resume;
  2. score each: r(x, y_i) from a sequence-classification reward model (read at the last token)
     or an LLM judge (eq. 3), in padded batches sorted by length; an input longer than the
     scorer's context is not scored (NaN, counted);
  3. return y* = y_{i*}, i* = the LOWEST index among argmax_i r(x, y_i) (deterministic ties);
  4. optionally (--eval) judge y* against a fresh single sample y' ~ pi_base pairwise, in both
     orders, averaging the judge's probabilities (eq. 4, App. G.2).

Equations:
  (1) KL(pi_bon || pi_base) <= log(n) - (n - 1) / n
      Beirami et al. 2024 show this "analytic" formula is an upper bound on the true KL (equal
      only in the limit of a continuous reward with no ties); we report it as a bound.
  (2) P(r(x, y*) > r(x, y')) <= n / (n + 1)
      the win rate of best-of-n against one base sample under the SAME reward with no ties
      (E[F(max of n)] = n/(n+1)); another judge (--eval-*) can be above or below it.
  (3) judge score  s = sum_k k p(k) / sum_k p(k),  k = 1..9,  p = judge's next-token probs
  (4) App. G.2 ("prompt the LM judge twice with both orderings ... averaging the probabilities"):
      P_o(A) = p_A / (p_A + p_B) in order o (sigma(r_A - r_B) for a reward model),
      q = (P_AB(A) + 1 - P_BA(A)) / 2   (the averaged probability that best-of-n is better),
      win w = 1 if q > 1/2, 0 if q < 1/2, 1/2 if q = 1/2; "soft" win = q.
      Win rates = means over prompts, each with a 95% Student-t interval over the per-prompt
      outcomes: mean +- t_{0.975, m-1} sd / sqrt(m) (outcomes are 0, 1/2, 1 or in [0, 1], not
      Bernoulli, so a binomial interval such as Wilson's does not apply).
  (5) y_t = argmax_v [ log softmax(z_t / T)_v  (-inf outside the top-p nucleus)  +  g_v ],
      g_v = -log(-log u_v),  u_v = U(seed, prompt, stream, sample, t, v) a counter-based uniform:
      Gumbel-max: an exact sample of the tempered, nucleus-renormalised distribution
      (`rollout` with `kernels.KeyedSampler`: the project's one sampler, shared by all four scripts).

Run (embedded SmolLM2 as policy and judge; --reward-model works with any num_labels=1
sequence-classification folder, e.g. one written by rm_transfer.py):
  python bestofn.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct \
      --judge-model ~/.cache/lowres-align/SmolLM2-135M-Instruct \
      --prompts data/bon_prompts.jsonl --n 4 --batch-size 20 --max-new-tokens 48 --eval --seed 0 \
      --output runs/bon-readme.jsonl
  OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bestofn.py --num-samples 4 ... (same flags; torchrun's
      parser takes --n for its own --nnodes; same output file). --resume skips the prompts written.

Output: one JSONL row per prompt, in prompt order: index, prompt, candidates, scores, best,
best_index, best_score (+ reference; with --eval: single, eval_p_a = [P_AB(A), P_BA(A)], win_soft
= q, win; judge_reads = how judge answers were read; judge_error = the last request error); null
where unscored. <output>.args.json: the arguments (checked on --resume); <output>.summary.json:
KL bound, ceiling, mean scores, win rates with intervals, skipped counts, arguments.
"""
import contextlib
import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Tuple

import torch
import torch.distributed as dist
from transformers import GenerationConfig, LogitsProcessorList

from kernels import KeyedSampler

DEFAULT_MODEL = str(Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align"))
                    / "SmolLM2-135M-Instruct")
SCORE_LABELS = [str(k) for k in range(1, 10)]  # eq. (3): single digits are one token in most vocabularies
PAIR_LABELS = ["A", "B"]
STREAM_BON, STREAM_SINGLE = 0, 1  # eq. (5): candidates and the --eval single sample are separate streams
# Flags that change the rows: --resume refuses an output written with other values.
RESULT_FLAGS = ("model", "prompts", "prompt_field", "reference_field", "split", "n", "max_new_tokens", "temperature",
                "top_p", "reward_model", "judge_model", "judge_url", "judge_top_logprobs", "judge_use_reference", "eval",
                "eval_reward_model", "eval_judge_model", "eval_judge_url", "dtype", "seed")


@dataclass
class Args:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "policy: HF name or folder (causal LM)"})
    # our choice: the bundled Norwegian/Spanish prompts
    prompts: str = field(default="data/bon_prompts.jsonl", metadata={"help": "prompts: .jsonl / .json / .csv / .parquet file or HF dataset name"})
    prompt_field: str = field(default="prompt", metadata={"help": "field holding the prompt"})
    reference_field: str = field(default="reference", metadata={"help": "optional field with a reference answer the judge may see"})
    split: str = field(default="train", metadata={"help": "split when --prompts is an HF dataset"})
    max_prompts: int = field(default=0, metadata={"help": "use only the first K prompts (0 = all)"})
    output: str = field(default="", metadata={"help": "output JSONL (default runs/bestofn-<time>.jsonl); summary goes to <output>.summary.json"})
    # paper App. B: best-of-n with n = 64. Under torchrun spell it --num-samples: torchrun's own
    # parser rejects "--n" as an ambiguous abbreviation of its --nnodes/--nproc-per-node.
    n: int = field(default=64, metadata={"help": "samples per prompt (alias --num-samples)", "aliases": ["--num-samples", "--num_samples"]})
    batch_size: int = field(default=16, metadata={"help": "most sequences generated / scored in one forward"})  # our choice: fits a 24 GB GPU at 1B params
    max_new_tokens: int = field(default=128, metadata={"help": "response length cap"})  # our choice: short answers
    # our choice: sample from the base policy itself (T = 1, top-p = 1), which is what eqs. (1)-(2) assume
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (0 < top_p <= 1)"})
    reward_model: str = field(default="", metadata={"help": "selection scorer: sequence-classification RM (num_labels=1)"})
    judge_model: str = field(default="", metadata={"help": "selection scorer: in-process HF causal LM judge; with --judge-url, the model name sent to the server"})
    judge_url: str = field(default="", metadata={"help": "selection scorer: OpenAI-compatible server, e.g. http://localhost:8000/v1 (chat completions with logprobs)"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "env var holding the API key for --judge-url / --eval-judge-url"})
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds for one whole judge HTTP request (connect, send, read)"})
    judge_retries: int = field(default=3, metadata={"help": "retries of a judge HTTP request after a timeout, a dropped connection, 5xx, 408 or 429 (exponential backoff)"})
    judge_top_logprobs: int = field(default=20, metadata={"help": "top_logprobs requested from the judge server"})  # OpenAI API maximum
    judge_max_failed_steps: int = field(default=3, metadata={"help": "stop when every judge request of this many prompts in a row failed"})
    judge_use_reference: bool = field(default=True, metadata={"help": "show the row's reference answer to the judge"})
    eval: bool = field(default=False, metadata={"help": "also judge best-of-n vs a fresh single sample (both orders, App. G.2)"})
    eval_reward_model: str = field(default="", metadata={"help": "eval judge: RM (compare scores); default: the selection scorer"})
    eval_judge_model: str = field(default="", metadata={"help": "eval judge: in-process HF causal LM (pairwise A/B); with --eval-judge-url, the model name sent"})
    eval_judge_url: str = field(default="", metadata={"help": "eval judge: OpenAI-compatible server (pairwise A/B)"})
    compile_rollout: bool = field(default=True, metadata={"help": "CUDA: static KV cache + compiled decoding (--no-compile-rollout: eager)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16"})
    seed: int = field(default=0, metadata={"help": "eq. (5): every draw is keyed by (seed, prompt index, sample): independent of batching, processes and resume"})
    resume: bool = field(default=False, metadata={"help": "continue a partially written --output, skipping finished prompts"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard (<output>.tb/) | wandb: per-prompt scores and wins, step = prompt index"})

    def __post_init__(self):  # one line per bad value, before anything loads (issue 10)
        rules = [("n", self.n >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
                 ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"), ("max_prompts", self.max_prompts >= 0, ">= 0"),
                 ("temperature", 0 < self.temperature < math.inf, "> 0 (best-of-n samples the policy)"),
                 ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("judge_timeout", 0 < self.judge_timeout < math.inf, "> 0"),
                 ("judge_retries", self.judge_retries >= 0, ">= 0"), ("judge_top_logprobs", self.judge_top_logprobs >= 1, ">= 1"),
                 ("judge_max_failed_steps", self.judge_max_failed_steps >= 1, ">= 1"),
                 ("dtype", self.dtype in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"),
                 ("report_to", self.report_to in ("none", "tensorboard", "wandb"), "none, tensorboard or wandb")]
        for name, ok, need in rules:
            if not ok:
                raise SystemExit(f"--{name.replace('_', '-')} must be {need}, got {getattr(self, name)!r}")
        if self.reward_model and (self.judge_model or self.judge_url):
            raise SystemExit("pass one selection scorer: --reward-model, or --judge-model / --judge-url, not both")
        if not self.eval and (self.eval_reward_model or self.eval_judge_model or self.eval_judge_url):
            raise SystemExit("--eval-reward-model / --eval-judge-model / --eval-judge-url need --eval")
        if self.eval_reward_model and (self.eval_judge_model or self.eval_judge_url):
            raise SystemExit("pass one eval judge: --eval-reward-model, or --eval-judge-model / --eval-judge-url, not both")


# ----------------------------------------------------------------------------- pure math
def best_of_n_kl_bound(n: int) -> float:
    """Eq. (1): log(n) - (n-1)/n, an upper bound on KL(best-of-n || base) (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def win_rate_ceiling(n: int) -> float:
    """Eq. (2): win rate of best-of-n vs one base sample under the selecting reward, no ties."""
    return n / (n + 1)


def select_best(scores: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [...] index of the max score; ties -> lowest index; NaN never wins."""
    s = torch.nan_to_num(scores.double(), nan=-math.inf)
    is_max = s == s.max(dim=-1, keepdim=True).values
    idx = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    return torch.where(is_max, idx, s.shape[-1]).min(dim=-1).values


def expected_score(label_probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Eq. (3): [..., K] probs of the score tokens, [K] values -> [...] renormalised mean."""
    p = label_probs.double()
    return (p * values.double()).sum(-1) / p.sum(-1)


def finite_mean(xs: list) -> float:
    """Mean over the scored entries (unscored: NaN or None); NaN when none is scored."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def win_both_orders(p_a_best_first: float, p_a_best_second: float) -> tuple[float, float]:
    """Eq. (4), App. G.2: (hard win, soft win q) of best-of-n from P(A better) in the two orders,
    averaged first, then decided (0.9 and 0.4 for best-of-n: q = 0.65, a win, not a tie)."""
    q = 0.5 * (p_a_best_first + (1.0 - p_a_best_second))
    return (1.0 if q > 0.5 else 0.0 if q < 0.5 else 0.5), q


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t), T ~ Student t, integer df >= 1: A = P(|T| <= |t|) by the exact finite sums of
    Abramowitz & Stegun 26.7.3 (df odd: A = 2/pi [theta + sin cos (1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...)])
    and 26.7.4 (df even: A = sin [1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...]), theta = atan(|t| / sqrt(df)), c = cos."""
    theta, odd = math.atan(abs(t) / math.sqrt(df)), df % 2
    c2, term, total = math.cos(theta) ** 2, 1.0, 0.0
    for j in range((df - odd) // 2):
        total += term
        term *= c2 * (2 * j + 1 + odd) / (2 * j + 2 + odd)
    a = 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total) if odd else math.sin(theta) * total
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def student_t_quantile(p: float, df: int) -> float:
    """t with P(T <= t) = p (1/2 < p < 1), by bisection on the exact CDF (no scipy)."""
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci95(outcomes: list[float]) -> dict:
    """Mean of per-prompt outcomes in [0, 1] and its 95% Student-t interval (eq. 4), clipped to [0, 1]."""
    m = len(outcomes)
    mean = sum(outcomes) / m if m else None
    if m < 2:
        return {"win_rate": mean, "ci95": None, "sd": None, "num_prompts": m}
    sd = math.sqrt(sum((w - mean) ** 2 for w in outcomes) / (m - 1))
    half = student_t_quantile(0.975, m - 1) * sd / math.sqrt(m)
    return {"win_rate": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "sd": sd, "num_prompts": m}


# ----------------------------------------------------------------------------- ROLLOUT, eq. (5): swap in another engine here
@torch.no_grad()
def rollout(model, prompts: List[List[int]], keys: List[Tuple[int, ...]], args: Args, eos_ids: List[int],
            pad_id: int, pad_to: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows of one batch of jobs in ONE `generate` call. prompts: token ids per row (a prompt
    repeated for each of its samples); keys: one tuple of ints per row (seed, prompt, stream, sample)
    that fixes its sampling noise. Returns tokens [N, R] (pad after the first EOS) and mask [N, R]
    (True up to and including the first EOS). pad_to: with a static cache (CUDA), left-pad prompts to
    this length so that its compiled decoding keeps one shape across calls."""
    device = next(model.parameters()).device
    static = device.type == "cuda" and args.compile_rollout
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


# ----------------------------------------------------------------------------- data and files
def read_rows(spec: str, flag: str, split: str = "train") -> list[dict]:
    """Rows of a .jsonl file (one object per line, blank lines skipped), a .json file (an array of
    objects, or JSON lines), a .csv / .parquet file or folder, or a hub data set (`datasets`)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise SystemExit(f"{flag} {spec} line {line} is not UTF-8 ({e.reason}); re-save the file as UTF-8") from None
        if path.suffix == ".json" and text.lstrip()[:1] == "[":
            try:
                rows = [(f"element {i}", r) for i, r in enumerate(json.loads(text), 1)]
            except json.JSONDecodeError as e:
                raise SystemExit(f"{flag} {spec} line {e.lineno} is not valid JSON ({e.msg}); fix the file") from None
        else:
            rows = []
            for i, line in enumerate(text.split("\n"), 1):
                try:
                    rows += [(f"line {i}", json.loads(line))] if line.strip() else []
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{flag} {spec} line {i} is not valid JSON ({e.msg}); fix or delete that line") from None
        for where, row in rows:
            if not isinstance(row, dict):
                raise SystemExit(f"{flag} {spec} {where} is a JSON {type(row).__name__}, not an object; "
                                 f"write one JSON object per {where.split()[0]}")
        return [row for _, row in rows]
    from datasets import load_dataset  # lazy: local JSON needs no `datasets`

    if path.is_file():
        if path.suffix not in (".csv", ".parquet"):
            raise SystemExit(f"{flag} {spec}: unknown file type {path.suffix!r}; pass a .jsonl, .json, .csv or .parquet file")
        return list(load_dataset(path.suffix[1:], data_files=str(path), split="train"))
    if path.is_dir():
        return list(load_dataset(str(path), split=split))
    try:
        return list(load_dataset(spec, split=split))
    except Exception as e:  # noqa: BLE001 -- any hub/offline failure becomes one line
        raise SystemExit(f"{flag} {spec}: no such file, and the hub has no data set of that name ({type(e).__name__}); "
                         "check the path, or unset HF_HUB_OFFLINE to download") from None


def load_prompts(args: Args) -> list[dict]:
    out = []
    for i, row in enumerate(read_rows(args.prompts, "--prompts", args.split), 1):
        prompt = row.get(args.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise SystemExit(f'--prompts {args.prompts} row {i} has no text field "{args.prompt_field}"; pass --prompt-field NAME')
        ref = row.get(args.reference_field)
        out.append({"prompt": prompt, "reference": ref if isinstance(ref, str) and ref.strip() else None})
    if args.max_prompts > 0:
        out = out[: args.max_prompts]
    if not out:
        raise SystemExit(f"--prompts {args.prompts} holds no prompts")
    return out


def read_finished_rows(path: Path) -> tuple[list[dict], int]:
    """(rows, byte length of the good part) of a partially written output. A torn LAST line (what
    a kill, power loss or full disk leaves) is dropped; an unreadable line before the last is refused."""
    lines = path.read_bytes().split(b"\n") if path.exists() else [b""]  # lines[-1]: no newline after it, torn
    rows, good_end = [], 0
    for no, line in enumerate(lines[:-1], 1):
        try:
            if not isinstance(row := json.loads(line), dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(rest.strip() for rest in lines[no:]):
                raise SystemExit(f"--output {path} line {no} is unreadable ({e}) and rows follow it; "
                                 "it is not a torn last line: repair or remove that line, or choose another --output") from None
            break
        rows.append(row)
        good_end += len(line) + 1
    return rows, good_end


def finite_or_none(x):
    """JSON has no NaN: a value that does not exist is null (issue 10, item 9)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [finite_or_none(v) for v in x]
    return {k: finite_or_none(v) for k, v in x.items()} if isinstance(x, dict) else x


def dumps(x, **kw) -> str:
    return json.dumps(finite_or_none(x), ensure_ascii=False, allow_nan=False, **kw)


def check_resume_args(args: Args, sidecar: Path, output: Path):
    if not sidecar.exists():
        raise SystemExit(f"--output {output} has rows but no {sidecar.name} to check the flags against "
                         "(written by an older bestofn.py?); choose another --output")
    try:
        old = json.loads(sidecar.read_text())
    except ValueError:
        raise SystemExit(f"{sidecar} is corrupt, so --resume cannot check the flags; fix it or choose another --output") from None
    for name in RESULT_FLAGS:
        if name in old and old[name] != getattr(args, name):
            raise SystemExit(f"--resume: --{name.replace('_', '-')} is {getattr(args, name)!r} but {output} was written "
                             f"with {old[name]!r}; resume with the same value, or choose another --output")


# ----------------------------------------------------------------------------- models
def check_model_path(name: str, flag: str):
    """One line for a local path that holds no model, before anything loads; hub names pass."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SystemExit(f"{flag} {name} is a folder without a model (no config.json); "
                             "pass a folder written by save_pretrained, or a hub name")
    elif path.exists():
        raise SystemExit(f"{flag} {name} is a file, not a model folder; pass a folder written by save_pretrained, or a hub name")
    elif name.startswith((".", "/", "~")) or (len(Path(name).parts) > 1 and Path(Path(name).parts[0]).exists()):
        raise SystemExit(f"{flag} {name} does not exist; pass a folder written by save_pretrained, or a hub name")


def load_model(name: str, kind: str, dtype: torch.dtype, device: torch.device, flag: str):
    """(model, tokenizer) for kind "lm" (causal LM, left padding) or "rm" (num_labels=1 classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = cls.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise SystemExit(f"{flag} {name} could not be loaded ({type(e).__name__}: {detail}); "
                         "check the name, or unset HF_HUB_OFFLINE to download") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if kind == "rm":
        if model.config.num_labels != 1:
            raise SystemExit(f"{flag} {name} has num_labels={model.config.num_labels}; a reward model needs num_labels=1")
        if model.config.pad_token_id is None:  # HF refuses batches without one; unused (we pass inputs_embeds)
            model.config.pad_token_id = tok.pad_token_id
    return model, tok


def context_limit(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 1 << 62


def chat_text(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(m["content"] for m in messages)
    return text + "\n\n" if add_generation_prompt else text


def prompt_ids(tok, prompt: str) -> list[int]:
    """The user turn through the chat template, ready for the answer."""
    return encode(tok, chat_text(tok, [{"role": "user", "content": prompt}], True))


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=not tok.chat_template).input_ids


def sorted_batches(seqs: list[list[int]], limit: int, batch_size: int, pad_id: int, device):
    """The token lists no longer than `limit` (a scorer's context; longer ones are never run), longest
    first, in left-padded batches -> (indexes, ids, attention mask, positions from 0 at the first real token)."""
    order = sorted((i for i in range(len(seqs)) if len(seqs[i]) <= limit), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.tensor([[pad_id] * (width - len(seqs[i])) + seqs[i] for i in chunk], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(seqs[i])) + [1] * len(seqs[i]) for i in chunk], dtype=torch.long, device=device)
        yield chunk, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------- scorers
@torch.no_grad()
def reward_model_scores(rm, tok, prompt, responses: list[str], batch_size: int) -> list[float]:
    """r(x, y) read at the last token of chat(x) ++ y ++ eos (what the policy emitted; the layout
    rm_transfer.py trains on); prompt: one for all responses, or one per response. Fed as
    inputs_embeds, so HF's pooling reads each row's last position instead of searching for the pad
    id (one token early when pad == eos). An input longer than the RM's context scores NaN."""
    prompts = [prompt] * len(responses) if isinstance(prompt, str) else prompt
    heads = {p: prompt_ids(tok, p) for p in set(prompts)}
    tail = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids = [heads[p] + tok(r, add_special_tokens=False).input_ids + tail for p, r in zip(prompts, responses)]
    scores = [math.nan] * len(ids)
    for chunk, x, att, pos in sorted_batches(ids, context_limit(rm), batch_size, tok.pad_token_id, rm.device):
        out = rm(inputs_embeds=rm.get_input_embeddings()(x), attention_mask=att, position_ids=pos).logits[:, 0]
        for i, s in zip(chunk, out.float().tolist()):
            scores[i] = s
    return scores


def label_token_ids(tok, labels: list[str]) -> list[list[int]]:
    """Token ids that spell each label alone, with or without a leading space."""
    out = []
    for lab in labels:
        ids = {t[0] for t in (tok.encode(v, add_special_tokens=False) for v in (lab, " " + lab)) if len(t) == 1}
        if not ids:
            raise SystemExit(f"judge tokenizer has no single token for {lab!r}; use another judge or --reward-model")
        out.append(sorted(ids))
    return out


@torch.no_grad()
def next_token_label_probs(lm, tok, texts: list[str], label_ids: list[list[int]], batch_size: int) -> torch.Tensor:
    """[len(texts), K]: probability that the judge's next token is each label, from the logits of
    the last position only (logits_to_keep=1: no [B, L, V] tensor); NaN rows: longer than the context."""
    out = torch.full((len(texts), len(label_ids)), math.nan, dtype=torch.float64)
    for chunk, x, att, pos in sorted_batches([encode(tok, t) for t in texts], context_limit(lm), batch_size,
                                             tok.pad_token_id, lm.device):
        logits = lm(input_ids=x, attention_mask=att, position_ids=pos, logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)
        out[chunk] = torch.stack([probs[:, l].sum(-1) for l in label_ids], dim=-1).double().cpu()
    return out


def pointwise_messages(prompt: str, response: str, reference: str | None) -> list[dict]:
    ref = f"Reference answer (may be in another language):\n{reference}\n\n" if reference else ""
    return [{"role": "user", "content": (
        "Rate the answer to the request below for helpfulness, correctness and fluency in the "
        "language of the request, from 1 (very bad) to 9 (excellent). Reply with one digit only.\n\n"
        f"Request:\n{prompt}\n\n{ref}Answer:\n{response}")}]


def pairwise_messages(prompt: str, a: str, b: str, reference: str | None) -> list[dict]:
    ref = f"Reference answer (may be in another language):\n{reference}\n\n" if reference else ""
    return [{"role": "user", "content": (
        "Which answer responds better to the request below (helpful, correct, fluent in the language "
        "of the request)? Reply with one letter only: A or B.\n\n"
        f"Request:\n{prompt}\n\n{ref}Answer A:\n{a}\n\nAnswer B:\n{b}")}]


def http_post(url: str, body: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
    """POST -> (status, body). `timeout` bounds the whole exchange: each socket operation gets the
    time left, the body is read in chunks against the deadline (a server that trickles bytes
    cannot stretch it), and a watchdog closes the socket at the deadline (trickled headers)."""
    deadline = time.monotonic() + timeout
    u = urllib.parse.urlsplit(url)
    conn = (http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection)(u.hostname, u.port, timeout=timeout)

    def left() -> float:
        if (rest := deadline - time.monotonic()) <= 0:
            raise TimeoutError(f"no complete reply within --judge-timeout {timeout:g} s")
        return rest

    def cut():
        with contextlib.suppress(OSError):
            sock and sock.shutdown(socket.SHUT_RDWR)

    sock = resp = None
    watchdog = threading.Timer(timeout, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        sock = conn.sock  # getresponse() may hand the socket to the response and clear conn.sock
        sock.settimeout(left())
        conn.request("POST", (u.path or "/") + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
        sock.settimeout(left())
        resp, data = conn.getresponse(), b""
        while True:
            sock.settimeout(left())
            if not (chunk := resp.read1(1 << 16)):
                break
            data += chunk
        if resp.length:  # the server closed before Content-Length bytes arrived
            raise http.client.IncompleteRead(data, resp.length)
        return resp.status, data
    except (OSError, http.client.HTTPException):
        left()  # past the deadline: report the timeout, not the watchdog's cut
        raise
    finally:
        watchdog.cancel()
        if resp is not None:
            resp.close()
        conn.close()


def read_judge_reply(data: bytes, labels: list[str]) -> tuple[list[float] | None, str, str | None]:
    """(label probs, "logprobs" | "text" | "failed", error) from a chat-completions reply. Every
    field is type-checked: a reply that cannot be read is a failure, never an exception."""
    def bad(why):
        return None, "failed", f"malformed reply: {why}"
    try:
        reply = json.loads(data)
    except ValueError as e:
        return bad(f"not JSON ({e})")
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
        return bad("no choices[0] object")
    logprobs = choices[0].get("logprobs")
    if logprobs is not None and not isinstance(logprobs, dict):
        return bad(f"logprobs is a {type(logprobs).__name__}, not an object")
    content = logprobs.get("content") if logprobs else None
    probs = [0.0] * len(labels)
    if content:
        if not (isinstance(content, list) and isinstance(content[0], dict)):
            return bad("logprobs.content is not a list of objects")
        top = content[0].get("top_logprobs")
        if top is not None and not isinstance(top, list):
            return bad(f"top_logprobs is a {type(top).__name__}, not a list")
        for entry in top or []:
            lp = entry.get("logprob") if isinstance(entry, dict) else None
            if not (isinstance(entry, dict) and isinstance(entry.get("token"), str)
                    and isinstance(lp, (int, float)) and not isinstance(lp, bool)):
                return bad(f"top_logprobs entry {str(entry)[:60]!r} is not {{token: str, logprob: number}}")
            if not (math.isfinite(lp) and lp <= 0):
                return bad(f"logprob {lp} is not a log-probability")
            if entry["token"].strip() in labels:
                probs[labels.index(entry["token"].strip())] += math.exp(lp)
    if sum(probs) > 0:
        return probs, "logprobs", None
    message = choices[0].get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if isinstance(text, str) and text.strip()[:1] in labels:
        return [1.0 if lab == text.strip()[:1] else 0.0 for lab in labels], "text", None
    return None, "failed", f"no label {labels[0]}..{labels[-1]} in the top log-probs or the text"


def http_label_probs(url: str, model: str, messages: list[dict], labels: list[str], args: Args
                     ) -> tuple[list[float] | None, str, str | None]:
    """Ask an OpenAI-compatible server for one token -> (label probs from top_logprobs ("logprobs"),
    else one-hot on the answer text ("text"), else None ("failed"); last error). Timeouts, dropped
    connections, 5xx, 408 and 429 are retried with backoff; other 4xx and malformed replies are not."""
    endpoint = url.rstrip("/")
    endpoint = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
    body = json.dumps({"model": model or "default", "messages": messages, "max_tokens": 1, "temperature": 0.0,
                       "logprobs": True, "top_logprobs": args.judge_top_logprobs}).encode()
    key = os.environ.get(args.judge_api_key_env)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    error = None
    for attempt in range(args.judge_retries + 1):
        if attempt:
            time.sleep(min(2.0 ** (attempt - 1), 30.0))
        try:
            status, data = http_post(endpoint, body, headers, args.judge_timeout)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, IncompleteRead, timeouts
            error = f"{endpoint}: {type(e).__name__}: {e}"
            continue
        if 200 <= status < 300:
            probs, how, error = read_judge_reply(data, labels)
            return probs, how, error and f"{endpoint}: {error}"
        error = f"{endpoint}: HTTP {status}: {data[:200].decode('utf-8', 'replace')!r}"
        if 400 <= status < 500 and status not in (408, 429):
            break
    return None, "failed", error


def make_scorer(args: Args, pairwise: bool, rm=None, judge=None, url: str = "", url_model: str = ""):
    """Returns score(items) -> (values, NaN where unscored; how each was read; each item's HTTP
    error or None); score.http says whether it asks a server. Pointwise items (prompt, reference,
    response) -> eq. (3) score (an RM: its reward). Pairwise items (prompt, reference, a, b) ->
    P(A better): p_A / (p_A + p_B) for an LLM judge, sigma(r_A - r_B) for an RM (Bradley-Terry)."""
    labels = PAIR_LABELS if pairwise else SCORE_LABELS
    values = torch.tensor([float(v) for v in SCORE_LABELS])
    ref_of = (lambda r: r) if args.judge_use_reference else (lambda r: None)

    def messages(item):
        p, r, *ys = item
        return pairwise_messages(p, *ys, ref_of(r)) if pairwise else pointwise_messages(p, ys[0], ref_of(r))

    def from_probs(probs):  # [N, K] label probs -> [N]
        return probs[:, 0] / probs.sum(-1) if pairwise else expected_score(probs, values)

    if rm is not None:
        def score(items):
            s = reward_model_scores(rm[0], rm[1], [it[0] for it in items for _ in it[2:]], [y for it in items for y in it[2:]],
                                    args.batch_size)
            if pairwise:  # sigma(r_A - r_B) without overflow
                s = [0.5 + 0.5 * math.tanh((ra - rb) / 2) for ra, rb in zip(s[::2], s[1::2])]
            return s, ["reward" if math.isfinite(x) else "too_long" for x in s], [None] * len(s)
    elif judge is not None:
        ids = label_token_ids(judge[1], labels)

        def score(items):
            probs = next_token_label_probs(judge[0], judge[1], [chat_text(judge[1], messages(it), True) for it in items],
                                           ids, args.batch_size)
            return (from_probs(probs).tolist(), ["too_long" if math.isnan(x) else "logprobs" for x in probs[:, 0].tolist()],
                    [None] * len(items))
    else:
        def score(items):
            got = [http_label_probs(url, url_model, messages(it), labels, args) for it in items]
            return ([from_probs(torch.tensor([p], dtype=torch.float64)).item() if p else math.nan for p, _, _ in got],
                    [how for _, how, _ in got], [err for _, _, err in got])
    score.http = rm is None and judge is None
    return score


# ----------------------------------------------------------------------------- main
def make_reporter(kind: str, output: Path, args: Args):
    """log(metrics, step) for --report-to; one line when the backend is not installed."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(f"{output}.tb")

            def log_tb(metrics, step):
                for k, v in metrics.items():
                    writer.add_scalar(k, v, step)
                writer.flush()
            return log_tb
        if kind == "wandb":
            import wandb
            run = wandb.init(project="lowres-align", name=output.stem, config=asdict(args), resume="allow")
            return lambda metrics, step: run.log(metrics, step=step)
    except ImportError:
        raise SystemExit(f"--report-to {kind} needs `pip install {kind}`; or pass --report-to none") from None
    return lambda metrics, step: None


def summarize(rows: list[dict], args: Args, extra: dict) -> dict:
    """The summary file: eqs. (1)-(2), mean scores (null when nothing was scored), read counts, win rates."""
    best, reads = [r["best_score"] for r in rows if r.get("best_score") is not None], {}
    mean_all = [finite_mean(r["scores"]) for r in rows if any(s is not None for s in r["scores"])]
    for r in rows:
        for k, v in r.get("judge_reads", {}).items():
            reads[k] = reads.get(k, 0) + v
    out = {"n": args.n, "num_prompts": len(rows), "kl_upper_bound": best_of_n_kl_bound(args.n),
           "win_rate_ceiling": win_rate_ceiling(args.n), "best_score_mean": sum(best) / len(best) if best else None,
           "candidate_score_mean": sum(mean_all) / len(mean_all) if mean_all else None,
           "unscored_candidates": sum(s is None for r in rows for s in r["scores"]), "judge_reads": reads, **extra}
    if args.eval:
        judged = [r for r in rows if r.get("win") is not None]
        out["eval"] = {**mean_ci95([r["win"] for r in judged]),
                       "unjudged_prompts": len(rows) - len(judged),
                       "identical_pairs": sum(r["single"] == r["best"] for r in judged),
                       "soft": mean_ci95([r["win_soft"] for r in judged])}
    return out


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a (one prompt)"


def main(argv: list[str] | None = None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)  # Args.__post_init__ validates
    if not (args.reward_model or args.judge_model or args.judge_url):
        raise SystemExit("pass a selection scorer: --reward-model PATH, or --judge-model NAME / --judge-url URL")
    for name, flag in ((args.model, "--model"), (args.reward_model, "--reward-model"),
                       (not args.judge_url and args.judge_model, "--judge-model"),
                       (args.eval_reward_model, "--eval-reward-model"),
                       (not args.eval_judge_url and args.eval_judge_model, "--eval-judge-model")):
        if name:
            check_model_path(name, flag)

    # ------------------------------------------------------------------------- PLUMBING: processes, output file, models
    if "RANK" in os.environ:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def from_rank0(obj):
        box = [obj]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    output = Path(args.output or f"runs/bestofn-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    sidecar = Path(f"{output}.args.json")
    if world > 1 and not args.output:
        raise SystemExit("under torchrun pass --output FILE so every rank writes to the same place")
    prompts = load_prompts(args)

    verdict = None  # rank 0 checks the output file; every rank gets an error line or the finished indexes
    if rank == 0:
        try:
            if output.exists() and not args.resume:
                raise SystemExit(f"--output {output} exists; pass --resume to continue it, or choose another --output")
            done, good_end = read_finished_rows(output)
            if done:
                check_resume_args(args, sidecar, output)
            for r in done:
                i = r.get("index")
                if not isinstance(i, int) or not 0 <= i < len(prompts) or prompts[i]["prompt"] != r.get("prompt"):
                    raise SystemExit(f"--output {output} row for index {i} does not match --prompts {args.prompts}; "
                                     "resume with the same prompts file, or choose another --output")
            if output.exists() and good_end < output.stat().st_size:
                with open(output, "r+b") as f:  # drop the torn last line so appends start on a clean line
                    f.truncate(good_end)
            if not done:
                output.parent.mkdir(parents=True, exist_ok=True)
                sidecar.write_text(dumps(asdict(args), indent=2) + "\n")
            verdict = sorted(r["index"] for r in done)
        except SystemExit as e:
            verdict = str(e.code)
    verdict = from_rank0(verdict)
    if isinstance(verdict, str):
        raise SystemExit(verdict)
    done_idx = set(verdict)

    cache: dict = {}  # the same model in two roles is loaded once

    def model(name, kind, flag):
        if (kind, name) not in cache:
            cache[(kind, name)] = load_model(name, kind, dtype, device, flag)
        return cache[(kind, name)]

    def scorer(pairwise, rm, judge, url, flag):  # flag: "--" or "--eval-"
        if rm:
            return make_scorer(args, pairwise, rm=model(rm, "rm", f"{flag}reward-model")), f"reward model {rm}"
        if url:
            return make_scorer(args, pairwise, url=url, url_model=judge), f"LLM judge at {url}"
        return make_scorer(args, pairwise, judge=model(judge, "lm", f"{flag}judge-model")), f"LLM judge {judge}"

    policy, policy_tok = model(args.model, "lm", "--model")
    max_pos = context_limit(policy)
    gen_eos = policy.generation_config.eos_token_id
    eos_ids = sorted({policy_tok.eos_token_id, *([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])} - {None})
    ids = [prompt_ids(policy_tok, p["prompt"]) for p in prompts]
    fits = [len(x) + args.max_new_tokens <= max_pos for x in ids]
    pad_to = max((len(x) for x, ok in zip(ids, fits) if ok), default=0)  # rollout()'s static-cache shape
    selection = (args.reward_model, args.judge_model, args.judge_url, "--")
    score, _ = scorer(False, *selection)
    eval_desc = None
    if args.eval:  # without an eval judge of its own, the selection scorer judges (optimistic: it also picked the best)
        own = (args.eval_reward_model, args.eval_judge_model, args.eval_judge_url, "--eval-")
        pair, eval_desc = scorer(True, *(own if any(own[:3]) else selection))
        eval_desc += "" if any(own[:3]) else " (the selection scorer: optimistic)"

    # ------------------------------------------------------------------------- ALGO: one chunk of prompts
    # A chunk = the prompts whose n (+1) samples fill one generate call, or, when one prompt needs
    # several calls, enough prompts to fill every call (n = 64, --eval, --batch-size 16: 16 prompts
    # in 65 full calls, not 5 calls per prompt of which the last samples one sequence).
    per_prompt = args.n + int(args.eval)
    chunk_size = (args.batch_size // per_prompt if per_prompt <= args.batch_size
                  else args.batch_size // math.gcd(per_prompt, args.batch_size))

    def process_chunk(indexes: list[int]) -> tuple[list[dict], int]:
        """Sample, score, select and (--eval) judge the prompts of one chunk -> (rows, tokens)."""
        fit = [i for i in indexes if fits[i]]
        jobs = [(i, STREAM_BON, j) for i in fit for j in range(args.n)] + [(i, STREAM_SINGLE, 0) for i in fit if args.eval]
        texts, tokens = {}, 0
        for start in range(0, len(jobs), args.batch_size):  # 1. sample (eq. 5)
            batch = jobs[start:start + args.batch_size]
            out, mask = rollout(policy, [ids[i] for i, _, _ in batch], [(args.seed, *job) for job in batch], args, eos_ids,
                                policy_tok.pad_token_id, pad_to)
            tokens += int(mask.sum())
            for job, row, m in zip(batch, out.tolist(), mask.tolist()):
                texts[job] = policy_tok.decode([t for t, keep in zip(row, m) if keep and t not in eos_ids], skip_special_tokens=True)
        items = [(prompts[i]["prompt"], prompts[i]["reference"], texts[(i, STREAM_BON, j)]) for i in fit for j in range(args.n)]
        all_scores, all_hows, all_errs = score(items)  # 2. score
        rows = [{"index": i, "skipped": "prompt too long"} for i in indexes if i not in fit]
        for k, i in enumerate(fit):  # 3. select; private "_" fields travel to rank 0 and are removed before writing
            part = slice(k * args.n, (k + 1) * args.n)
            cands, scores = [x[2] for x in items[part]], all_scores[part]
            b = int(select_best(torch.tensor(scores, dtype=torch.float64)))
            rows.append({"index": i, "prompt": prompts[i]["prompt"], "candidates": cands, "scores": scores, "best": cands[b],
                         "best_index": b, "best_score": scores[b],
                         **({"reference": prompts[i]["reference"]} if prompts[i]["reference"] else {}),
                         **({"single": texts[(i, STREAM_SINGLE, 0)]} if args.eval else {}),
                         "_hows": all_hows[part], "_errs": all_errs[part], "_asked": args.n if score.http else 0})
        if args.eval:  # 4. best vs single in both orders (eq. 4); identical texts are a tie without asking
            to_judge = [r for r in rows if "single" in r and r["single"] != r["best"]]
            pa, hows, errs = pair([(r["prompt"], prompts[r["index"]]["reference"], *ab) for r in to_judge
                                   for ab in ((r["best"], r["single"]), (r["single"], r["best"]))])
            for k, r in enumerate(to_judge):
                r["eval_p_a"], r["_errs"] = pa[2 * k:2 * k + 2], r["_errs"] + errs[2 * k:2 * k + 2]
                r["_hows"] = r["_hows"] + [f"eval_{h}" for h in hows[2 * k:2 * k + 2]]
                r["_asked"] += 2 if pair.http else 0
            for r in (r for r in rows if "single" in r):
                p = r.setdefault("eval_p_a", [0.5, 0.5])
                win, soft = win_both_orders(*p) if all(map(math.isfinite, p)) else (math.nan, math.nan)
                r.update(win_soft=soft, win=win)
        for r in rows:
            hows, errs, asked = r.pop("_hows", []), [e for e in r.pop("_errs", []) if e], r.pop("_asked", 0)
            if hows:
                r["judge_reads"] = {h: hows.count(h) for h in sorted(set(hows))}
            if errs:
                r["judge_error"] = errs[-1]
            # asked = HTTP requests; "failed" is only ever an HTTP outcome
            r["_all_failed"] = asked > 0 and hows.count("failed") + hows.count("eval_failed") == asked
        return sorted(rows, key=lambda r: r["index"]), tokens

    # ------------------------------------------------------------------------- PLUMBING: chunks over processes, in-order writes
    # Chunks are fixed by prompt index, so a prompt is always sampled and scored in the same
    # batch: the file is byte-identical with 1 or N processes and after resume (a partly finished
    # chunk is recomputed whole and only its missing rows are written).
    chunks = [list(range(c, min(c + chunk_size, len(prompts)))) for c in range(0, len(prompts), chunk_size)]
    chunks = [c for c in chunks if any(i not in done_idx for i in c)]
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts) - len(done_idx), desc="best-of-n", dynamic_ncols=True)
        report = make_reporter(args.report_to, output, args)
        fout = open(output, "a", encoding="utf-8")
    skipped, tokens, t0, held = 0, 0, time.time(), []
    for r0 in range(0, len(chunks), world):
        mine = process_chunk(chunks[r0 + rank]) if r0 + rank < len(chunks) else ([], 0)
        got = [mine]
        if world > 1:
            got = [None] * world if rank == 0 else None
            dist.gather_object(mine, got, dst=0)
        stop = None
        if rank == 0:
            for row in (row for rows, _ in got for row in rows):  # chunks ascend with the rank; rows are sorted
                if row["index"] in done_idx:
                    continue
                bar.update(1)
                if "skipped" in row:
                    skipped += 1
                    continue
                held.append(row)  # rows whose every judge request failed wait: a stop leaves them to --resume
                if row.pop("_all_failed"):
                    if len(held) >= args.judge_max_failed_steps:
                        stop = (f"every judge request failed for {len(held)} prompts in a row (indexes "
                                f"{held[0]['index']}..{held[-1]['index']}); last error: {row.get('judge_error')}; "
                                f"fix the judge (URL, --judge-model, ${args.judge_api_key_env}) and rerun with --resume")
                        break
                    continue
                for r in held:
                    fout.write(dumps(r) + "\n")
                    metrics = {"best_score": r["best_score"], "candidate_score_mean": finite_mean(r["scores"]),
                               "win": r.get("win"), "win_soft": r.get("win_soft")}
                    metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
                    bar.set_postfix({k: round(v, 3) for k, v in metrics.items()})
                    report(metrics, r["index"])
                held = []
            fout.flush()
            tokens += sum(t for _, t in got)
        if stop := from_rank0(stop):
            if rank == 0:
                fout.close()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise SystemExit(stop)

    if rank == 0:
        fout.writelines(dumps(r) + "\n" for r in held)  # a failing tail shorter than --judge-max-failed-steps is kept
        fout.close()
        bar.close()
        rows, _ = read_finished_rows(output)
        elapsed = time.time() - t0
        summary = summarize(rows, args, {"skipped_too_long": skipped, "eval_judge": eval_desc,
                                         "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "processes": world,
                                         "args": asdict(args)})
        Path(f"{output}.summary.json").write_text(dumps(summary, indent=2) + "\n")
        print(f"wrote {len(rows)} rows to {output}")
        if skipped:
            print(f"{skipped} prompts skipped: prompt + --max-new-tokens {args.max_new_tokens} exceeds the policy's "
                  f"{max_pos} positions; lower --max-new-tokens")
        print(f"KL(best-of-{args.n} || base) <= log(n) - (n-1)/n = {summary['kl_upper_bound']:.4f} nats "
              f"(an upper bound, Beirami et al. 2024); win-rate ceiling vs base n/(n+1) = {summary['win_rate_ceiling']:.4f}")
        if summary["best_score_mean"] is not None:
            print(f"mean score: best {summary['best_score_mean']:.4f}, all candidates {summary['candidate_score_mean']:.4f}")
        if args.eval and summary["eval"]["win_rate"] is not None:
            e, s = summary["eval"], summary["eval"]["soft"]
            print(f"win rate best-of-{args.n} vs one sample ({eval_desc}; App. G.2: probabilities averaged over both orders): "
                  f"{e['win_rate']:.3f}, 95% t-CI {fmt_ci(e['ci95'])}; soft {s['win_rate']:.3f}, 95% t-CI {fmt_ci(s['ci95'])} "
                  f"over {e['num_prompts']} prompts")
        if summary["judge_reads"]:
            print(f"judge answers read via: {summary['judge_reads']}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
