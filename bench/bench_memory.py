"""Memory of one reinforce_kl.py training step, DDP vs FSDP2 (issue 12), and how large a model fits.

GPU mode (default when CUDA is present): random-weight Qwen2.5-0.5B, 1.5B and 3B (published
configurations), one prompt group per step (G = 8, 128-token prompt + 512-token responses, EOS never
sampled), policy + same-size reference, each run through the real script
(`torchrun --nproc_per_node=1 ... reinforce_kl.main(argv)`) in three set-ups:
  ddp        no --fsdp: fp32 weights, fp32 gradients, AdamW, fp32 reference, DDP buckets, bf16 autocast
  fsdp       --fsdp: FSDP2, bf16 compute, fp32 master weights / gradients / AdamW, bf16 reference
  fsdp-ckpt  --fsdp --gradient-checkpointing
Measured per run (torch.cuda.memory_allocated, rank 0): the steady state (params + gradients +
AdamW + reference, read just before the second rollout), the peak of the rollouts and of the
updates, and the second step's time (metrics.jsonl; under --fsdp the script samples without the
static cache and compilation, so FSDP2's step time is slower by construction). Bytes per parameter
= those / P. Runs that do not fit say OOM. --arch / --runs pick a subset; rows accumulate in a JSON
file beside the result, so the 9 runs can be spread over several commands of a time-limited GPU
machine. The checkpoint the script writes after its last step is replaced by a no-op.

CPU mode (default without CUDA): the evidence that sharding divides the state. A small random Qwen2
(30M parameters) under `torchrun --nproc_per_node=1, 2, 4` with --fsdp (gloo, OMP_NUM_THREADS=1),
plus DDP on 2 processes for contrast: rank 0's `param_bytes` and `optimizer_bytes` from
metrics.jsonl (the script's own count of its local shards), and each rank's resident memory just
before the second rollout minus its RSS after imports (glibc is told to return freed blocks,
MALLOC_MMAP_THRESHOLD_=65536, so RSS follows live tensors), printed as ratios to 1 process.

Projection (per GPU, bytes; P = parameters of the policy, N = GPUs; the model shape gives L layers,
hidden h, MLP width i, KV width k = kv_heads x head_dim, vocabulary V; micro-batch T = G x (prompt +
response) tokens; `trained` / `frozen` count the models a script trains / holds frozen):
  state    DDP:  P (20 trained + 4 frozen)          fp32 weights 4 + grads 4 + AdamW 8 + DDP bucket 4; fp32 frozen
           FSDP: P (16 trained + 2 frozen) / N      fp32 master 4 + grads 4 + AdamW 8, sharded; bf16 frozen, sharded
  rollout  2 P + KV                                  DDP: autocast's bf16 weight copy; FSDP: the policy gathered once
           KV = rows x (prompt + response) x L x 2k x 2 bytes, rows = prompts per GPU x G
  update   DDP:  2 P trained + A + Z                autocast's bf16 copy of trained weights
           FSDP: 2 (trained + frozen)(2 P_layer + P_root) + A + Z   bf16 unsharded layer (+ prefetch) and root
           A = kappa T L (24 h + 4 k + 8 i)         activations saved for backward (estimate x kappa)
           A_ckpt = T L 2 h + kappa T (24 h + 4 k + 8 i)   checkpointed layer inputs + one recomputed layer
           Z = 2.5 C + 6 V h + 8 G response h       fused linear log-prob/KL (reinforce_kl's default): float32
                                                     chunks (C = 256 MiB), bf16 LM-head copies (DDP: policy, its
                                                     gradient, reference; FSDP2: 2 V h, the gradient), dL/dh
           Z_logits = 6 G (response + 1) V           --no-fused-linear: policy logits, their gradient, reference logits
  total    state + max(rollout, update) + 1 GB      (cuBLAS workspace, allocator rounding)
The state coefficients are exact dtype arithmetic, checked on CPU by the sharding table (4 and 8
bytes per parameter of rank 0 for weights and AdamW, divided by N; resident memory a + b / N with b
the sharded bytes per parameter). The activation coefficients are an estimate from the tensors HF
Qwen2 saves for backward (fp32 RMSNorm inputs, bf16 linear inputs, SDPA q/k/v/out, SwiGLU's
gate/up/product); kappa = 1.01 makes the update term reproduce the one GPU measurement of an update
so far (H100_UPDATE_EXTRA_GB below), and the GPU mode refits kappa to its own runs. A model
"fits" when the projection is <= 72 GB on an 80 GB GPU (10% left for the CUDA context,
fragmentation and NCCL buffers); issue 12's target for 12B + 12B on 8 x 80 GB is <= 60 GB.

    python bench/bench_memory.py                          # CPU here: sharding evidence + projection
    python bench/bench_memory.py --arch qwen2.5-3b        # GPU: one model, three set-ups

How to read the tables: the CPU table shows rank 0's bytes per parameter and its ratio to 1
process (1/N means the state is divided); the GPU table shows measured GB and bytes per parameter
beside the projection; the last table is the largest published model that fits per script.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, result_path, rss_gb, script_blob, write_model_folder, write_prompts

MEASURED = {  # published config.json values (Qwen2.5 on the Hugging Face hub); cpu-30m is ours
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "cpu-30m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=16384, tie_word_embeddings=True),
}
PROJECTED = {  # published configurations (config.json) of models the papers or users train
    "Qwen2.5-0.5B": ("qwen2", MEASURED["qwen2.5-0.5b"]),
    "Qwen2.5-1.5B": ("qwen2", MEASURED["qwen2.5-1.5b"]),
    "Qwen2.5-3B": ("qwen2", MEASURED["qwen2.5-3b"]),
    "Qwen3-4B": ("qwen3", dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "Qwen3-8B": ("qwen3", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                               num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)),
    "Mistral-Nemo-12B": ("mistral", dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                         vocab_size=131072, tie_word_embeddings=False)),
    "Qwen2.5-14B": ("qwen2", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                                  num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
    "Qwen2.5-32B": ("qwen2", dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                                  num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
    "Qwen2.5-72B": ("qwen2", dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                                  num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)),
}
MODES = {"ddp": [], "fsdp": ["--fsdp"], "fsdp-ckpt": ["--fsdp", "--gradient-checkpointing"]}
SCRIPTS = {  # (trained models, frozen models, samples with the policy) of each training script, all of size P
    "reinforce_kl (policy + reference; judge over HTTP)": (1, 1, True),
    "grpo_semantic (policy + reference; embedder small)": (1, 1, True),
    "rm_transfer train-rm (reward model)": (1, 0, False),
    "rm_transfer rl (policy + value; reference + RM frozen)": (2, 2, True),
}
FIT_GB, TARGET_12B_GB, OVERHEAD = 72.0, 60.0, 1e9
CHUNK = 256 << 20  # kernels.fused_linear_logprob_kl's default chunk_bytes
# The one GPU measurement of an update we have: bench/results/step-qwen2-0.5b-NVIDIA-H100-80GB-HBM3-2026-11-23.md,
# "update, KL via kernels": 12.28 GB above the allocated state, Qwen2-0.5B, G = 8, 128 + 512 tokens, fp32 + autocast.
H100_UPDATE_EXTRA_GB = 12.28


def kappa_from_h100_update() -> float:
    """kappa that makes the formula's update term (2P autocast copy + A + Z, no DDP) equal the H100 measurement."""
    cfg = make_config("qwen2", MEASURED["qwen2.5-0.5b"])  # Qwen2-0.5B has the same shapes
    P = count_params(cfg)
    a = project(cfg, P, "ddp", 1, prompts_per_step=1, kappa=1.0, fused=False)  # that run materialised logits
    return (H100_UPDATE_EXTRA_GB * 1e9 - (a["update"] - a["kappa_part"])) / a["kappa_part"]


# ----------------------------------------------------------------------------------------------
# Projection (the formula of the docstring)
# ----------------------------------------------------------------------------------------------
def make_config(kind: str, kw: dict):
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    return {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[kind](**kw)


def count_params(cfg) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def project(cfg, P: int, mode: str, n_gpus: int, trained=1, frozen=1, rollout=True, G=8, prompt=128, response=512,
            prompts_per_step=16, kappa=1.0, fused=True) -> dict:
    """Bytes per GPU of one reinforce_kl-style step, by term (docstring formula). fused: log-probs and KL
    from hidden states (reinforce_kl's --fused-linear, its default), else from materialised logits."""
    L, h, i, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    k = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads)
    T = G * (prompt + response)
    root = V * h * (1 if cfg.tie_word_embeddings else 2) + h
    layer = (P - root) / L
    per_layer_act = T * (24 * h + 4 * k + 8 * i)
    if not rollout:  # a reward model: no LM head, no logits
        logits = 0
    elif fused:  # float32 chunks + bf16 head copies (DDP: policy, its gradient, reference; FSDP2: the gradient)
        logits = 2.5 * CHUNK + (6 if mode == "ddp" else 2) * V * h + 8 * G * response * h
    else:
        logits = 6 * G * (response + 1) * V
    rows = max(prompts_per_step // n_gpus, 1) * G
    kv = rows * (prompt + response) * L * 2 * k * 2
    roll = 2 * P + kv if rollout else 0
    ak = per_layer_act if mode == "fsdp-ckpt" else L * per_layer_act  # the part kappa scales
    act = (T * L * 2 * h if mode == "fsdp-ckpt" else 0) + kappa * ak
    if mode == "ddp":
        state = P * (20 * trained + 4 * frozen)
        upd = 2 * P * trained + act + logits
    else:
        state = P * (16 * trained + 2 * frozen) / n_gpus
        upd = 2 * (trained + frozen) * (2 * layer + root) + act + logits
    total = state + max(roll, upd) + OVERHEAD
    return dict(state=state, rollout=roll, update=upd, act=act, kappa_part=kappa * ak, total=total)


def largest_fit(models: dict, mode: str, n_gpus: int, trained: int, frozen: int, rollout: bool, kappa: float,
                budget_gb: float = FIT_GB) -> str:
    fits = [(P, name) for name, (cfg, P) in models.items()
            if project(cfg, P, mode, n_gpus, trained, frozen, rollout, kappa=kappa)["total"] / 1e9 <= budget_gb]
    return max(fits)[1] if fits else "none listed"


def projection_tables(kappa: float) -> list:
    models = {}
    for name, (kind, kw) in PROJECTED.items():
        cfg = make_config(kind, kw)
        models[name] = (cfg, count_params(cfg))
    out = ["| model | params | " + " | ".join(f"{m} 1 GPU" for m in MODES) + " | " +
           " | ".join(f"{m} 8 GPUs" for m in MODES) + " |", "|---" * 8 + "|"]
    for name, (cfg, P) in models.items():
        cells = [f"{project(cfg, P, m, n, kappa=kappa)['total'] / 1e9:.0f}" for n in (1, 8) for m in MODES]
        out.append(f"| {name} | {P / 1e9:.2f}B | " + " | ".join(cells) + " |")
    nemo_cfg, nemo_P = models["Mistral-Nemo-12B"]
    nemo = {m: project(nemo_cfg, nemo_P, m, 8, kappa=kappa) for m in ("fsdp", "fsdp-ckpt")}
    out += ["", f"12B policy + 12B reference (Mistral-Nemo-12B, {nemo_P / 1e9:.2f}B) on 8 x 80 GB: "
            + "; ".join(f"{m} {v['total'] / 1e9:.1f} GB per GPU (state {v['state'] / 1e9:.1f}, rollout "
                        f"{v['rollout'] / 1e9:.1f}, update {v['update'] / 1e9:.1f})" for m, v in nemo.items())
            + f"; target <= {TARGET_12B_GB:.0f} GB", ""]
    out += ["| script (models, all of size P) | " + " | ".join(f"1 x 80 GB {m}" for m in MODES) + " | "
            + " | ".join(f"8 x 80 GB {m}" for m in MODES) + " |", "|---" * 7 + "|"]
    for script, (tr, fr, ro) in SCRIPTS.items():
        out.append(f"| {script} | " + " | ".join(largest_fit(models, m, n, tr, fr, ro, kappa)
                                               for n in (1, 8) for m in MODES) + " |")
    return out


# ----------------------------------------------------------------------------------------------
# Model folder and prompts (as in bench_step.py: byte-level tokenizer whose EOS id V is never sampled)
# ----------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------
# Worker: one reinforce_kl run under torchrun; probes memory around each rollout
# ----------------------------------------------------------------------------------------------
def worker(spec: dict):
    import torch

    sys.path.insert(0, str(ROOT))
    import reinforce_kl as rk

    rank, gpu = int(os.environ.get("RANK", 0)), torch.cuda.is_available()
    res = {"rss_after_imports_gb": rss_gb(), "marks": [], "oom": False}

    def mark(name: str):  # memory now, and the peak since the previous mark
        m = {"name": name, "rss_gb": rss_gb()}
        if gpu:
            m.update(allocated_gb=torch.cuda.memory_allocated() / 1e9, peak_gb=torch.cuda.max_memory_allocated() / 1e9)
            torch.cuda.reset_peak_memory_stats()
        res["marks"].append(m)

    rollout = rk.rollout

    def probed_rollout(*a, **k):
        mark("before rollout")
        out = rollout(*a, **k)
        mark("rollout")
        return out

    rk.rollout = probed_rollout  # the script looks `rollout` up in its module at each step
    rk.save_checkpoint = lambda *a, **k: None  # measure steps, not the checkpoint after the last one
    try:
        rk.main(spec["argv"], reward_fn=lambda prompts, responses, ids: [float(len(x)) for x in ids])
    except torch.OutOfMemoryError as e:
        res["oom"] = str(e).split("\n")[0][:200]
    mark("end")
    Path(f"{spec['out']}.rank{rank}.json").write_text(json.dumps(res))
    os._exit(0)  # after an OOM the process group is still up; leave without tearing it down


def run_reinforce_kl(tmp: Path, model_dir: Path, prompts: Path, nproc: int, mode: str, P: int, G: int, R: int,
                     steps: int, env: dict, extra: list) -> dict:
    out = tmp / f"run-{mode}-{nproc}"
    argv = ["--model", str(model_dir), "--prompts", str(prompts), "--output-dir", str(out), "--overwrite",
            "--steps", str(steps), "--prompts-per-step", str(P), "--group-size", str(G), "--max-new-tokens", str(R),
            "--sample-every", "0", *MODES[mode], *extra]
    spec = tmp / f"spec-{mode}-{nproc}.json"
    spec.write_text(json.dumps({"argv": argv, "out": str(tmp / f"res-{mode}-{nproc}")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--spec", str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    ranks = []
    for r in range(nproc):
        f = tmp / f"res-{mode}-{nproc}.rank{r}.json"
        if not f.exists():
            raise SystemExit(f"{' '.join(cmd)} failed (rank {r} wrote nothing):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks.append(json.loads(f.read_text()))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    return {"ranks": ranks, "metrics": metrics, "command": "torchrun --standalone --nproc_per_node="
            f"{nproc} reinforce_kl.py " + " ".join(argv)}


def steady_rss(rank_res: dict):
    """RSS just before the second rollout (params + grads + AdamW + reference) above the RSS after imports."""
    before = [m for m in rank_res["marks"] if m["name"] == "before rollout"]
    return before[1]["rss_gb"] - rank_res["rss_after_imports_gb"] if len(before) > 1 else None


def summarize(run: dict, n_seq: int) -> dict:
    """Rank 0: steady state before the 2nd rollout, peaks of rollouts and updates, last step's time,
    its local shard bytes (metrics.jsonl), every rank's steady RSS."""
    marks = run["ranks"][0]["marks"]
    before = [m for m in marks if m["name"] == "before rollout"]
    roll = [m for m in marks if m["name"] == "rollout"]
    s = {"oom": run["ranks"][0]["oom"]}
    if "peak_gb" in marks[0]:
        s["peak_gb"] = max(m["peak_gb"] for m in marks)
        s["rollout_gb"] = max((m["peak_gb"] for m in roll), default=None)
        s["update_gb"] = max((m["peak_gb"] for m in before[1:] + marks[-1:]), default=None) if len(before) > 1 else None
        s["state_gb"] = before[1]["allocated_gb"] if len(before) > 1 else None
    last = run["metrics"][-1] if run["metrics"] else {}
    s["step_s"] = last["response_len"] * n_seq / last["tokens_per_s"] if last else None
    s["param_bytes"], s["optimizer_bytes"] = last.get("param_bytes"), last.get("optimizer_bytes")
    s["rss_gb"] = [steady_rss(r) for r in run["ranks"]]
    return s


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def gpu_table(rows: dict, args, kappa: float):
    """Measured GB and bytes per parameter beside the projection; kappa refitted to the runs (least
    squares of the measured update peak above the state, minus the projection's fixed terms)."""
    out = ["| model | params | set-up | state GB | state B/param | rollout peak GB | update peak GB | peak GB | "
           "peak B/param | projected GB | step s |", "|---" * 11 + "|"]
    fit_x, fit_y = [], []
    f = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in rows.values():
        cfg = make_config("qwen2", MEASURED[r["arch"]])
        kw = dict(prompts_per_step=args.prompts_per_step, G=args.group_size, prompt=args.prompt_len,
                  response=args.response_len, fused="--no-fused-linear" not in r["command"])
        pr, pr1 = project(cfg, r["P"], r["mode"], 1, kappa=kappa, **kw), project(cfg, r["P"], r["mode"], 1, **kw)
        if not r["oom"] and r.get("update_gb") and r.get("state_gb"):
            fit_x.append(pr1["kappa_part"])
            fit_y.append((r["update_gb"] - r["state_gb"]) * 1e9 - (pr1["update"] - pr1["kappa_part"]))
        state, peak = r.get("state_gb"), None if r["oom"] else r.get("peak_gb")
        out.append(f"| {r['arch']} | {r['P'] / 1e9:.2f}B | {r['mode']} | {f(state)} | "
                   f"{f(state and state * 1e9 / r['P'])} | {f(r.get('rollout_gb'))} | {f(r.get('update_gb'))} | "
                   f"{'OOM' if r['oom'] else f(peak)} | {f(peak and peak * 1e9 / r['P'])} | "
                   f"{pr['total'] / 1e9:.1f} | {f(r.get('step_s'), 2)} |")
    if fit_x and not args.kappa:
        kappa = max(sum(x * y for x, y in zip(fit_x, fit_y)) / sum(x * x for x in fit_x), 0.0)
        out += ["", f"kappa refitted to the {len(fit_x)} runs that fit (least squares): {kappa:.2f}"]
    return out + [""], kappa


def main():
    import torch
    import transformers

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b" if gpu else "cpu-30m")
    p.add_argument("--runs", default="ddp:1,fsdp:1,fsdp-ckpt:1" if gpu else "fsdp:1,fsdp:2,fsdp:4,ddp:2",
                   help=f"set-up:processes, set-ups from {list(MODES)}")
    p.add_argument("--prompts-per-step", type=int, default=1 if gpu else 4)
    p.add_argument("--group-size", type=int, default=8 if gpu else 2)  # paper: G = 8
    p.add_argument("--prompt-len", type=int, default=128 if gpu else 16)
    p.add_argument("--response-len", type=int, default=512 if gpu else 8)
    p.add_argument("--steps", type=int, default=2, help="the second step is the one timed")
    p.add_argument("--rk-args", default="", help="more reinforce_kl.py flags, e.g. '--no-fused-linear'")
    p.add_argument("--kappa", type=float, default=0.0,
                   help="activation factor of the projection; 0: fitted to this run (GPU) or to the H100 update measurement")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.spec).read_text()))

    date = datetime.date.today().isoformat()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", OMP_NUM_THREADS="1",
               **({} if gpu else {"MALLOC_MMAP_THRESHOLD_": "65536"}))  # CPU: freed tensors leave RSS
    P_, G, R = args.prompts_per_step, args.group_size, args.response_len
    head = [f"# bench_memory ({'GPU' if gpu else 'CPU'}), {date}",
            f"Machine: {machine(gpu)}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"reinforce_kl.py blob {script_blob()}",
            f"Command: `{' '.join(['python bench/bench_memory.py', *sys.argv[1:]])}`",
            f"Setup: reinforce_kl.py, policy + reference, {P_} prompt(s) x G = {G} per step, {args.prompt_len}-token "
            f"prompts + {R}-token responses (EOS never sampled), {args.steps} steps, checkpoint write skipped", ""]
    body, kappa = [], args.kappa or kappa_from_h100_update()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = result_path(args.out_dir, "bench_memory", gpu, date, ".json")
        rows = json.loads(cache.read_text()) if gpu and cache.exists() else {}
        for arch in args.arch.split(","):
            P = count_params(make_config("qwen2", MEASURED[arch]))
            write_model_folder(tmp / arch, dict(MEASURED[arch], max_position_embeddings=32768, rope_theta=1e6,
                                                rms_norm_eps=1e-6), "bfloat16", "cuda" if gpu else "cpu")
            if not (tmp / "prompts.jsonl").exists():  # one byte-level tokenizer for every arch
                write_prompts(tmp / "prompts.jsonl", tmp / arch, 64, args.prompt_len)
            for mode, n in (r.split(":") for r in args.runs.split(",")):
                t0 = time.time()
                run = run_reinforce_kl(tmp, tmp / arch, tmp / "prompts.jsonl", int(n), mode, P_, G, R, args.steps, env,
                                       args.rk_args.split())
                s = summarize(run, P_ * G)
                rows[f"{arch}/{mode}/{n}"] = dict(arch=arch, mode=mode, nproc=int(n), P=P, command=run["command"], **s)
                print(f"{arch} {mode} nproc={n}: {time.time() - t0:.0f} s; {s}", flush=True)
            if gpu:
                cache.write_text(json.dumps(rows, indent=1))

    if gpu:
        lines, kappa = gpu_table(rows, args, kappa)
        body += lines
    else:
        base = rows["cpu-30m/fsdp/1"]
        body += ["| set-up | processes | rank 0 param_bytes | B/param | ratio to 1 process | rank 0 optimizer_bytes | "
                 "B/param | ratio to 1 process | RSS above imports, GB (ranks) | ratio to 1 process |", "|---" * 10 + "|"]
        for key, r in rows.items():
            rss = [x for x in r["rss_gb"] if x is not None]
            ratio = lambda a, b: f"{a / b:.3f}" if a and b else "-"  # noqa: E731
            body.append(f"| {r['mode']} | {r['nproc']} | {r['param_bytes']:,} | {r['param_bytes'] / r['P']:.2f} | "
                        f"{ratio(r['param_bytes'], base['param_bytes'])} | {r['optimizer_bytes']:,} | "
                        f"{r['optimizer_bytes'] / r['P']:.2f} | {ratio(r['optimizer_bytes'], base['optimizer_bytes'])} | "
                        f"{', '.join(f'{x:.3f}' for x in rss)} | "
                        f"{ratio(statistics.mean(rss), statistics.mean(base['rss_gb']))} |")
        fs = [(1 / r["nproc"], statistics.mean(r["rss_gb"])) for r in rows.values() if r["mode"] == "fsdp"]
        if len(fs) >= 2:  # RSS = a + b / N: b is the sharded state, a what every rank holds whole
            mx, my = statistics.mean(x for x, _ in fs), statistics.mean(y for _, y in fs)
            b = sum((x - mx) * (y - my) for x, y in fs) / sum((x - mx) ** 2 for x, _ in fs)
            body += ["", f"FSDP2 RSS fit over N processes: {my - b * mx:.3f} GB + {b:.3f} GB / N; the sharded part is "
                     f"{b * 1e9 / base['P']:.1f} B/param, expected 20 on CPU (fp32 weights 4 + gradients 4 + AdamW 8 + "
                     f"fp32 reference 4)"]
        body += ["", f"{MEASURED['cpu-30m']} ({base['P'] / 1e6:.1f}M parameters); fp32 on CPU, so the reference is fp32 "
                 "too (sharded under FSDP2); RSS read just before the second rollout; param_bytes / optimizer_bytes are "
                 "the script's metrics (rank 0's local shards)", ""]
    body += [f"Projection (GB per GPU, formula in the docstring, kappa = {kappa:.2f}"
             + ("" if gpu or args.kappa else ", calibrated on the H100 update measurement of "
                "bench/results/step-qwen2-0.5b-NVIDIA-H100-80GB-HBM3-2026-11-23.md; DDP vs FSDP2 not yet measured on a GPU")
             + "; reinforce_kl: 1 trained + 1 frozen "
             "model, 16 prompts x G = 8 per step, 128 + 512 tokens; 'fits' = <= 72 GB on 80 GB):", ""]
    body += projection_tables(kappa)
    text = "\n".join(head + body)
    path = result_path(args.out_dir, "bench_memory", gpu, date)
    path.write_text(text + "\n")
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
