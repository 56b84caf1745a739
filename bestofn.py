"""Best-of-n reranking with any reward model or LLM judge: its KL bound and its win rate.

Paper: Z. Wu, A. Balashankar, Y. Kim, J. Eisenstein, A. Beirami, "Reuse Your Rewards: Reward
Model Transfer for Zero-Shot Cross-Lingual Alignment", arXiv:2404.12318 (NAACL 2024). The paper
uses best-of-n (n = 64) as its training-free alignment testbed: a reward model trained in one
language reranks samples of a policy in another. KL bound: A. Beirami, A. Agarwal, J. Berant,
A. D'Amour, J. Eisenstein, C. Nagpal, A. T. Suresh, "Theoretical guarantees on the best-of-n
alignment policy", arXiv:2401.01879 (2024).

Method (no training):
  1. for each prompt x, sample y_1..y_n ~ pi_base(. | x) (temperature, top-p as flags);
  2. score each: r(x, y_i) from a sequence-classification reward model (read at the last
     token), or from an LLM judge (the probability-weighted mean of the score digits 1..9);
  3. return y* = y_{i*}, i* = the LOWEST index among argmax_i r(x, y_i) (deterministic ties);
  4. optionally (--eval) judge y* against a fresh single sample y' ~ pi_base pairwise, asking
     the judge in both orders (A = y*, then A = y') to cancel position bias; ties count 1/2.

Equations:
  (1) KL(pi_bon || pi_base) <= log(n) - (n - 1) / n
      Beirami et al. 2024 show this "analytic" formula is an upper bound on the true KL (equal
      only in the limit of a continuous reward with no ties); we report it as a bound.
  (2) P(r(x, y*) > r(x, y')) <= n / (n + 1)
      the win rate of best-of-n against one base sample under the SAME reward with no ties
      (E[F(max of n)] = n/(n+1)); another judge (--eval-*) can be above or below it.
  (3) judge score  s = sum_k k p(k) / sum_k p(k),  k = 1..9,  p = judge's next-token probs
  (4) per-prompt win  w = (o_AB + (1 - o_BA)) / 2,  o = 1 if the judge prefers A, 0 if B,
      1/2 if tied; win rate = mean_x w; 95% CI: Wilson score interval over prompts (main),
      plus the normal approximation mean +- 1.96 sd / sqrt(m) (reported as well). The "soft"
      win rate puts the judge's P(A better) in place of o (p_A / (p_A + p_B) for an LLM judge,
      sigma(r_A - r_B) for a reward model); it shows signal that hard decisions hide when a
      weak judge always answers "A".

Run (embedded SmolLM2 as policy and judge; --reward-model works with any num_labels=1
sequence-classification folder, e.g. one written by rm_transfer.py):
  python bestofn.py --model ~/.cache/lowres-align/SmolLM2-135M-Instruct \
      --judge-model ~/.cache/lowres-align/SmolLM2-135M-Instruct \
      --prompts data/bon_prompts.jsonl --n 4 --batch-size 4 --max-new-tokens 48 --eval --seed 0 \
      --output runs/bon-readme.jsonl
  OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bestofn.py --num-samples 4 ... (same flags, but
      --num-samples for --n, which torchrun's parser takes for its own --nnodes; same output file)
Re-running with --resume and the same --output skips the prompts already written.

Output: one JSONL row per prompt, in prompt order: index, prompt, candidates, scores, best,
best_index, best_score (+ reference; with --eval: single, eval_a_wins = [o_AB, o_BA], win,
eval_p_a, win_soft; judge_reads = how judge answers were read). <output>.summary.json holds the
KL bound, the ceiling, mean scores, the win rates with their intervals, and the arguments.
"""
import hashlib
import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_MODEL = str(
    Path(os.environ.get("LOWRES_ALIGN_CACHE", Path.home() / ".cache" / "lowres-align")) / "SmolLM2-135M-Instruct"
)
SCORE_LABELS = [str(k) for k in range(1, 10)]  # eq. (3): single digits are one token in most vocabularies
PAIR_LABELS = ["A", "B"]


@dataclass
class Args:
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "policy: HF name or folder (causal LM)"})
    # our choice: the bundled Norwegian/Spanish prompts
    prompts: str = field(default="data/bon_prompts.jsonl", metadata={"help": "prompts: JSONL file or HF dataset name"})
    prompt_field: str = field(default="prompt", metadata={"help": "field holding the prompt"})
    reference_field: str = field(default="reference", metadata={"help": "optional field with a reference answer the judge may see"})
    split: str = field(default="train", metadata={"help": "split when --prompts is an HF dataset"})
    max_prompts: int = field(default=0, metadata={"help": "use only the first K prompts (0 = all)"})
    output: str = field(default="", metadata={"help": "output JSONL (default runs/bestofn-<time>.jsonl); summary goes to <output>.summary.json"})
    # paper: best-of-n with n = 64. Under torchrun spell it --num-samples: torchrun's own parser
    # rejects "--n" as an ambiguous abbreviation of its --nnodes/--nproc-per-node.
    n: int = field(default=64, metadata={"help": "samples per prompt (alias --num-samples)", "aliases": ["--num-samples", "--num_samples"]})
    batch_size: int = field(default=16, metadata={"help": "most sequences generated / scored in one forward"})  # our choice: fits a 24 GB GPU at 1B params
    max_new_tokens: int = field(default=128, metadata={"help": "response length cap"})  # our choice: short answers
    # our choice: sample from the base policy itself (T = 1, top-p = 1), which is what eqs. (1)-(2) assume
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    reward_model: str = field(default="", metadata={"help": "selection scorer: sequence-classification RM (num_labels=1)"})
    judge_model: str = field(default="", metadata={"help": "selection scorer: in-process HF causal LM judge; with --judge-url, the model name sent to the server"})
    judge_url: str = field(default="", metadata={"help": "selection scorer: OpenAI-compatible server, e.g. http://localhost:8000/v1 (chat completions with logprobs)"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "env var holding the API key for --judge-url / --eval-judge-url"})
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds per judge HTTP request"})
    judge_retries: int = field(default=3, metadata={"help": "retries per judge HTTP request (exponential backoff)"})
    judge_top_logprobs: int = field(default=20, metadata={"help": "top_logprobs requested from the judge server"})  # OpenAI API maximum
    judge_use_reference: bool = field(default=True, metadata={"help": "show the row's reference answer to the judge"})
    eval: bool = field(default=False, metadata={"help": "also judge best-of-n vs a fresh single sample (both orders)"})
    eval_reward_model: str = field(default="", metadata={"help": "eval judge: RM (compare scores); default: the selection scorer"})
    eval_judge_model: str = field(default="", metadata={"help": "eval judge: in-process HF causal LM (pairwise A/B)"})
    eval_judge_url: str = field(default="", metadata={"help": "eval judge: OpenAI-compatible server (pairwise A/B)"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16"})
    seed: int = field(default=0, metadata={"help": "sampling of prompt i is seeded by (seed, i): independent of processes and resume"})
    resume: bool = field(default=False, metadata={"help": "continue a partially written --output, skipping finished prompts"})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard (<output>.tb/) | wandb: per-prompt scores and wins, step = prompt index"})


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


def finite_mean(xs: list[float]) -> float:
    """Mean over the scored entries (unreadable judgments are NaN); NaN when none is scored."""
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def preference(p_a: float, p_b: float) -> float:
    """One pairwise judgment: 1 if A is preferred, 0 if B, 1/2 if tied."""
    return 1.0 if p_a > p_b else 0.0 if p_b > p_a else 0.5


def win_both_orders(a_wins_best_first: float, a_wins_best_second: float) -> float:
    """Eq. (4): best-of-n's win from the judgment with best as A and the one with best as B."""
    return 0.5 * (a_wins_best_first + (1.0 - a_wins_best_second))


def win_rate_ci(wins: list[float], z: float = 1.959963984540054) -> dict:
    """Mean per-prompt win and 95% intervals: Wilson score (main) and normal approximation."""
    m = len(wins)
    if m == 0:
        return {"win_rate": None, "ci95_wilson": None, "ci95_normal": None, "num_prompts": 0}
    p = sum(wins) / m
    centre = (p + z * z / (2 * m)) / (1 + z * z / m)
    half = z / (1 + z * z / m) * math.sqrt(p * (1 - p) / m + z * z / (4 * m * m))
    sd = math.sqrt(sum((w - p) ** 2 for w in wins) / (m - 1)) if m > 1 else 0.0
    normal = [max(0.0, p - z * sd / math.sqrt(m)), min(1.0, p + z * sd / math.sqrt(m))]
    return {"win_rate": p, "ci95_wilson": [centre - half, centre + half], "ci95_normal": normal, "num_prompts": m}


def prompt_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for one prompt's sampling, from (seed, global prompt index, stream name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}/{stream}".encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------- data and files
def load_prompts(args: Args) -> list[dict]:
    path = Path(args.prompts)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.exists():
            raise SystemExit(f"--prompts {path} does not exist; pass a JSONL file or an HF dataset name")
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"--prompts {path} row {i} is not valid JSON ({e}); fix or delete that line")
    else:
        from datasets import load_dataset  # lazy: JSONL needs no `datasets`

        rows = list(load_dataset(args.prompts, split=args.split))
    out = []
    for i, row in enumerate(rows):
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


def read_finished_rows(path: Path) -> list[dict]:
    """Complete rows of a partially written output; a truncated last line is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good_end, start = [], 0, 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            break
        try:
            rows.append(json.loads(data[start:end]))
        except json.JSONDecodeError:
            break
        good_end = start = end + 1
    if good_end < len(data):
        with open(path, "r+b") as f:  # drop the half-written tail so appends start on a clean line
            f.truncate(good_end)
    return rows


# ----------------------------------------------------------------------------- models
def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(name: str, dtype: torch.dtype, device: torch.device, what: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except OSError as e:
        raise SystemExit(f"{what} {name!r} cannot be loaded ({e}); pass an HF name or a local folder") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # judge batches read the last position
    return model, tok


def load_reward_model(name: str, dtype: torch.dtype, device: torch.device, what: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).to(device).eval()
    except OSError as e:
        raise SystemExit(f"{what} {name!r} cannot be loaded ({e}); pass a sequence-classification folder") from None
    if model.config.num_labels != 1:
        raise SystemExit(f"{what} {name!r} has num_labels={model.config.num_labels}; a reward model needs num_labels=1")
    return model, tok


def chat_text(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(m["content"] for m in messages)
    return text + "\n\n" if add_generation_prompt else text


@torch.no_grad()
def sample_responses(model, tok, prompt: str, n: int, args: Args, seed: int) -> tuple[list[str], int]:
    """n samples for one prompt, in chunks of --batch-size, from one seeded RNG stream."""
    from transformers import GenerationConfig

    ids = tok(chat_text(tok, [{"role": "user", "content": prompt}], True), add_special_tokens=not tok.chat_template,
              return_tensors="pt").input_ids.to(model.device)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    eos.discard(None)
    gcfg = GenerationConfig(  # a fresh config: the model's own defaults (top_k=50, penalties) would bias pi_base
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,
        pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos),
    )
    torch.manual_seed(seed)  # seeds CUDA too; the chunks below continue this one stream
    texts, tokens = [], 0
    for start in range(0, n, args.batch_size):
        k = min(args.batch_size, n - start)
        batch = ids.expand(k, -1)
        out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=gcfg)
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            tokens += min(cut + 1, len(row))
            texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    return texts, tokens


@torch.no_grad()
def reward_model_scores(rm, tok, prompt: str, responses: list[str], batch_size: int) -> list[float]:
    """r(x, y) read at the last token of chat(x) ++ y ++ eos, whatever the pad token is.

    The input is the chat-formatted prompt, the response tokens and eos: the tokens the policy
    produced when it stopped (the same layout rm_transfer.py trains on). Sequences are batched
    only with others of the same length (no padding at all), and fed as inputs_embeds so HF's
    pooling takes position -1 instead of searching for the pad id, which would stop one token
    early when pad == eos. (HF warns once that it cannot see padding in inputs_embeds: there is none.)"""
    head = tok(chat_text(tok, [{"role": "user", "content": prompt}], True), add_special_tokens=not tok.chat_template).input_ids
    tail = [tok.eos_token_id] if tok.eos_token_id is not None else []
    ids = [head + tok(r, add_special_tokens=False).input_ids + tail for r in responses]
    scores = [0.0] * len(ids)
    by_len: dict[int, list[int]] = {}
    for i, seq in enumerate(ids):
        by_len.setdefault(len(seq), []).append(i)
    for _, members in sorted(by_len.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            x = torch.tensor([ids[i] for i in chunk], device=rm.device)
            out = rm(inputs_embeds=rm.get_input_embeddings()(x)).logits[:, 0].float().tolist()
            for i, s in zip(chunk, out):
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
    """[len(texts), K]: probability that the judge's next token is each label."""
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=not tok.chat_template).to(lm.device)
        pos = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
        logits = lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=pos, logits_to_keep=1).logits
        probs = torch.softmax(logits[:, -1].float(), dim=-1)
        rows.append(torch.stack([probs[:, ids].sum(-1) for ids in label_ids], dim=-1).cpu())
    return torch.cat(rows)


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


def http_label_probs(url: str, model: str, messages: list[dict], labels: list[str], args: Args) -> tuple[list[float] | None, str]:
    """Ask an OpenAI-compatible server for one token; return (label probs, how it was read).

    Reads top_logprobs ("logprobs"); if the server sends none, one-hot on the answer text
    ("text"); if nothing is readable after the retries, (None, "failed")."""
    endpoint = url.rstrip("/")
    endpoint = endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"
    body = json.dumps({"model": model or "default", "messages": messages, "max_tokens": 1, "temperature": 0.0,
                       "logprobs": True, "top_logprobs": args.judge_top_logprobs}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(args.judge_api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[args.judge_api_key_env]}"
    for attempt in range(args.judge_retries + 1):
        try:
            req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=args.judge_timeout) as resp:
                choice = json.loads(resp.read())["choices"][0]
            break
        except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, json.JSONDecodeError):
            if attempt == args.judge_retries:
                return None, "failed"
            time.sleep(min(2.0 ** attempt, 30.0))
    probs = [0.0] * len(labels)
    content = (choice.get("logprobs") or {}).get("content") or []
    for entry in (content[0].get("top_logprobs") or []) if content else []:
        if entry.get("token", "").strip() in labels:
            probs[labels.index(entry["token"].strip())] += math.exp(entry["logprob"])
    if sum(probs) > 0:
        return probs, "logprobs"
    text = ((choice.get("message") or {}).get("content") or "").strip()
    if text[:1] in labels:
        return [1.0 if lab == text[:1] else 0.0 for lab in labels], "text"
    return None, "failed"


def make_pointwise_scorer(args: Args, rm=None, judge=None):
    """Returns score(prompt, reference, responses) -> (scores, counts of how judgments were read)."""
    values = torch.tensor([float(v) for v in SCORE_LABELS])
    if rm is not None:
        model, tok = rm
        return lambda prompt, ref, ys: (reward_model_scores(model, tok, prompt, ys, args.batch_size), {})
    ref_of = (lambda r: r) if args.judge_use_reference else (lambda r: None)
    if judge is not None:
        model, tok = judge
        ids = label_token_ids(tok, SCORE_LABELS)

        def score(prompt, ref, ys):
            texts = [chat_text(tok, pointwise_messages(prompt, y, ref_of(ref)), True) for y in ys]
            return expected_score(next_token_label_probs(model, tok, texts, ids, args.batch_size), values).tolist(), {}
        return score

    def score_http(prompt, ref, ys):
        scores, counts = [], {}
        for y in ys:
            probs, how = http_label_probs(args.judge_url, args.judge_model, pointwise_messages(prompt, y, ref_of(ref)), SCORE_LABELS, args)
            counts[how] = counts.get(how, 0) + 1
            # unreadable judgment: NaN, counted in judge_reads; select_best never picks it
            scores.append(expected_score(torch.tensor(probs), values).item() if probs else math.nan)
        return scores, counts
    return score_http


def make_pairwise_judge(args: Args, rm=None, judge=None, url: str = "", url_model: str = ""):
    """Returns judge(prompt, reference, a, b) -> (1 if A better / 0 if B / 0.5 tie, P(A better), how read).

    P(A better) is the soft judgment: p_A / (p_A + p_B) for an LLM judge, sigma(r_A - r_B)
    (Bradley-Terry) for a reward model."""
    if rm is not None:
        model, tok = rm

        def by_reward(prompt, ref, a, b):
            s = reward_model_scores(model, tok, prompt, [a, b], args.batch_size)
            return preference(s[0], s[1]), 1.0 / (1.0 + math.exp(s[1] - s[0])), "reward"
        return by_reward
    ref_of = (lambda r: r) if args.judge_use_reference else (lambda r: None)
    if judge is not None:
        model, tok = judge
        ids = label_token_ids(tok, PAIR_LABELS)

        def by_lm(prompt, ref, a, b):
            p = next_token_label_probs(model, tok, [chat_text(tok, pairwise_messages(prompt, a, b, ref_of(ref)), True)], ids, 1)[0].tolist()
            return preference(p[0], p[1]), p[0] / (p[0] + p[1]), "logprobs"
        return by_lm

    def by_http(prompt, ref, a, b):
        probs, how = http_label_probs(url, url_model, pairwise_messages(prompt, a, b, ref_of(ref)), PAIR_LABELS, args)
        if not probs:
            return 0.5, 0.5, how  # counted fallback: unreadable -> tie
        return preference(probs[0], probs[1]), probs[0] / (probs[0] + probs[1]), how
    return by_http


# ----------------------------------------------------------------------------- main
def make_reporter(kind: str, output: Path, args: Args):
    """Returns log(metrics, step) for --report-to; a clear error when the backend is missing."""
    if kind == "none":
        return lambda metrics, step: None
    if kind == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SystemExit("--report-to tensorboard needs `pip install tensorboard`; or pass --report-to none") from None
        writer = SummaryWriter(f"{output}.tb")

        def log_tb(metrics, step):
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return log_tb
    if kind == "wandb":
        try:
            import wandb
        except ImportError:
            raise SystemExit("--report-to wandb needs `pip install wandb`; or pass --report-to none") from None
        run = wandb.init(project="lowres-align", name=output.stem, config=asdict(args), resume="allow")
        return lambda metrics, step: run.log(metrics, step=step)
    raise SystemExit(f'--report-to must be none, tensorboard or wandb, got "{kind}"')


def summarize(rows: list[dict], args: Args, extra: dict) -> dict:
    best = [r["scores"][r["best_index"]] for r in rows if math.isfinite(r["scores"][r["best_index"]])]
    mean_all = [finite_mean(r["scores"]) for r in rows if any(map(math.isfinite, r["scores"]))]
    out = {
        "n": args.n, "num_prompts": len(rows),
        "kl_upper_bound": best_of_n_kl_bound(args.n),
        "win_rate_ceiling": win_rate_ceiling(args.n),
        "best_score_mean": sum(best) / len(best) if best else None,
        "candidate_score_mean": sum(mean_all) / len(mean_all) if mean_all else None,
        "judge_reads": {},
        **extra,
    }
    for r in rows:
        for k, v in r.get("judge_reads", {}).items():
            out["judge_reads"][k] = out["judge_reads"].get(k, 0) + v
    if args.eval:
        judged = [r for r in rows if "win" in r]
        out["eval"] = {**win_rate_ci([r["win"] for r in judged]),
                       "identical_pairs": sum(r["single"] == r["best"] for r in judged),
                       "soft": win_rate_ci([r["win_soft"] for r in judged])}
    return out


def main(argv: list[str] | None = None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(args=argv)
    if sum(bool(x) for x in (args.reward_model, args.judge_model or args.judge_url)) != 1:
        raise SystemExit("pass exactly one selection scorer: --reward-model PATH, or --judge-model NAME / --judge-url URL")
    if args.temperature <= 0 or args.n < 1 or args.batch_size < 1:
        raise SystemExit("--temperature must be > 0 and --n, --batch-size >= 1 (best-of-n samples from the policy)")
    if args.report_to not in ("none", "tensorboard", "wandb"):
        raise SystemExit(f'--report-to must be none, tensorboard or wandb, got "{args.report_to}"')

    if "RANK" in os.environ:
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")  # CPU tensors (metrics) too
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch_dtype(args.dtype, device)

    output = Path(args.output or f"runs/bestofn-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    if world > 1 and not args.output:
        raise SystemExit("under torchrun pass --output FILE so every rank writes to the same place")
    prompts = load_prompts(args)
    done: list[dict] = []
    if rank == 0:
        if output.exists() and not args.resume:
            raise SystemExit(f"--output {output} exists; pass --resume to continue it, or choose another --output")
        done = read_finished_rows(output)
        for r in done:
            i = r.get("index")
            if not isinstance(i, int) or i >= len(prompts) or prompts[i]["prompt"] != r.get("prompt"):
                raise SystemExit(f"--output {output} row for index {i} does not match --prompts {args.prompts}; "
                                 "resume with the same prompts file, or choose another --output")
            if len(r.get("candidates", [])) != args.n or ("win" in r) != args.eval:
                raise SystemExit(f"--output {output} row for index {i} was written with other --n/--eval settings; "
                                 "resume with the same flags, or choose another --output")
    if world > 1:
        box = [sorted(r["index"] for r in done)]
        dist.broadcast_object_list(box, src=0)
        done_idx = set(box[0])
    else:
        done_idx = {r["index"] for r in done}
    pending = [i for i in range(len(prompts)) if i not in done_idx]

    # Load models once; the same name in two roles shares one copy.
    cache: dict = {}

    def lm(name, what):
        if ("lm", name) not in cache:
            cache[("lm", name)] = load_causal_lm(name, dtype, device, what)
        return cache[("lm", name)]

    def rmodel(name, what):
        if ("rm", name) not in cache:
            cache[("rm", name)] = load_reward_model(name, dtype, device, what)
        return cache[("rm", name)]

    policy, policy_tok = lm(args.model, "--model")
    max_pos = getattr(policy.config, "max_position_embeddings", None)
    if args.reward_model:
        score = make_pointwise_scorer(args, rm=rmodel(args.reward_model, "--reward-model"))
    elif args.judge_url:
        score = make_pointwise_scorer(args)
    else:
        score = make_pointwise_scorer(args, judge=lm(args.judge_model, "--judge-model"))
    eval_desc = None
    if args.eval:
        if args.eval_reward_model:
            pair, eval_desc = make_pairwise_judge(args, rm=rmodel(args.eval_reward_model, "--eval-reward-model")), f"reward model {args.eval_reward_model}"
        elif args.eval_judge_url:
            pair, eval_desc = make_pairwise_judge(args, url=args.eval_judge_url, url_model=args.eval_judge_model), f"LLM judge at {args.eval_judge_url}"
        elif args.eval_judge_model:
            pair, eval_desc = make_pairwise_judge(args, judge=lm(args.eval_judge_model, "--eval-judge-model")), f"LLM judge {args.eval_judge_model}"
        elif args.reward_model:
            pair, eval_desc = make_pairwise_judge(args, rm=rmodel(args.reward_model, "--reward-model")), f"reward model {args.reward_model} (the selection scorer: optimistic)"
        elif args.judge_url:
            pair, eval_desc = make_pairwise_judge(args, url=args.judge_url, url_model=args.judge_model), f"LLM judge at {args.judge_url} (the selection scorer: optimistic)"
        else:
            pair, eval_desc = make_pairwise_judge(args, judge=lm(args.judge_model, "--judge-model")), f"LLM judge {args.judge_model} (the selection scorer: optimistic)"

    def process(i: int) -> dict:
        p = prompts[i]
        n_prompt = len(policy_tok(chat_text(policy_tok, [{"role": "user", "content": p["prompt"]}], True)).input_ids)
        if max_pos and n_prompt + args.max_new_tokens > max_pos:
            return {"index": i, "skipped": "prompt too long"}
        candidates, tokens = sample_responses(policy, policy_tok, p["prompt"], args.n, args, prompt_seed(args.seed, i, "bon"))
        scores, reads = score(p["prompt"], p["reference"], candidates)
        b = int(select_best(torch.tensor(scores)))
        row = {"index": i, "prompt": p["prompt"], "candidates": candidates, "scores": scores, "best": candidates[b],
               "best_index": b, "best_score": scores[b]}
        if p["reference"]:
            row["reference"] = p["reference"]
        if args.eval:
            (single,), t1 = sample_responses(policy, policy_tok, p["prompt"], 1, args, prompt_seed(args.seed, i, "single"))
            tokens += t1
            if single == row["best"]:
                orders, soft = [0.5, 0.5], [0.5, 0.5]  # the same text: a tie, no judge call
            else:
                o1, s1, h1 = pair(p["prompt"], p["reference"], row["best"], single)
                o2, s2, h2 = pair(p["prompt"], p["reference"], single, row["best"])
                orders, soft = [o1, o2], [s1, s2]
                for h in (h1, h2):
                    reads[f"eval_{h}"] = reads.get(f"eval_{h}", 0) + 1
            row.update(single=single, eval_a_wins=orders, win=win_both_orders(*orders),
                       eval_p_a=soft, win_soft=win_both_orders(*soft))
        if reads:
            row["judge_reads"] = reads
        row["_tokens"] = tokens
        return row

    bar = None
    if rank == 0:
        from tqdm import tqdm

        output.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(pending), desc="best-of-n", dynamic_ncols=True)
        report = make_reporter(args.report_to, output, args)
    skipped, tokens, t0 = 0, 0, time.time()
    fout = open(output, "a", encoding="utf-8") if rank == 0 else None
    for r0 in range(0, len(pending), world):
        # Round r0: rank k takes pending[r0 + k] (a rank-strided slice); rank 0 writes in index order.
        mine = process(pending[r0 + rank]) if r0 + rank < len(pending) else None
        got = [None] * world if rank == 0 else None
        if world > 1:
            dist.gather_object(mine, got, dst=0)
        else:
            got = [mine]
        if rank == 0:
            for row in got:
                if row is None:
                    continue
                if "skipped" in row:
                    skipped += 1
                else:
                    tokens += row.pop("_tokens")
                    fout.write(json.dumps(row, ensure_ascii=False) + "\n")
                    metrics = {"best_score": row["best_score"], "candidate_score_mean": finite_mean(row["scores"])}
                    if "win" in row:
                        metrics.update(win=row["win"], win_soft=row["win_soft"])
                    bar.set_postfix({k: round(v, 3) for k, v in metrics.items()})
                    report(metrics, row["index"])
            fout.flush()
            bar.update(sum(r is not None for r in got))

    if rank == 0:
        fout.close()
        bar.close()
        rows = read_finished_rows(output)
        elapsed = time.time() - t0
        summary = summarize(rows, args, {
            "skipped_too_long": skipped, "eval_judge": eval_desc,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "processes": world, "args": asdict(args),
        })
        Path(f"{output}.summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {output} ({skipped} prompts skipped: too long)")
        print(f"KL(best-of-{args.n} || base) <= log(n) - (n-1)/n = {summary['kl_upper_bound']:.4f} nats "
              f"(an upper bound, Beirami et al. 2024); win-rate ceiling vs base n/(n+1) = {summary['win_rate_ceiling']:.4f}")
        if summary["best_score_mean"] is not None:
            print(f"mean score: best {summary['best_score_mean']:.4f}, all candidates {summary['candidate_score_mean']:.4f}")
        if args.eval and summary["eval"]["win_rate"] is not None:
            e = summary["eval"]
            print(f"win rate best-of-{args.n} vs one sample ({eval_desc}, both orders, ties 1/2): {e['win_rate']:.3f} "
                  f"95% CI Wilson [{e['ci95_wilson'][0]:.3f}, {e['ci95_wilson'][1]:.3f}], "
                  f"normal [{e['ci95_normal'][0]:.3f}, {e['ci95_normal'][1]:.3f}] over {e['num_prompts']} prompts")
            s = e["soft"]
            print(f"soft win rate (judge probabilities, both orders): {s['win_rate']:.3f} "
                  f"95% CI normal [{s['ci95_normal'][0]:.3f}, {s['ci95_normal'][1]:.3f}]")
        if summary["judge_reads"]:
            print(f"judge answers read via: {summary['judge_reads']}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
