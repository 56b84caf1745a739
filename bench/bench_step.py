"""One whole RL step, reinforce_kl.py against TRL's GRPOTrainer (issue 13): tokens/s and peak memory.

Both systems train the same random-weight model (published Qwen2 configuration, saved with
`save_pretrained` into a temporary folder) on the same number of prompts per step, G samples per
prompt, prompt and response lengths, beta > 0 (so TRL keeps a reference model, as reinforce_kl
always does), learning rate, temperature 1 and no top-p/top-k, with Hugging Face generation (no
vLLM), and the same programmatic reward: the fraction of even token ids in the response.

  reinforce_kl   the real script: `reinforce_kl.main(argv, reward_fn)` for --steps steps (rollout of
                 all prompts x G in one compiled `generate`, reward, one update of eq. 4, one prompt
                 group per backward). Step time = response tokens / `tokens_per_s` read from its
                 metrics.jsonl (the script times each step from its start to its metrics; on a GPU
                 only the optimizer's last kernels can still run then, milliseconds). The
                 checkpoint that the script writes after its last step is replaced by a no-op: the
                 bench measures steps, not a disk write (reinforce_kl has no flag to skip it).
  trl            `GRPOTrainer` with per_device_train_batch_size = G, gradient_accumulation_steps =
                 prompts per step (one optimizer step per generation batch of prompts x G, on-policy
                 as reinforce_kl: num_iterations = 1), its own defaults otherwise (loss_type "dapo",
                 dynamic-cache `generate`); gradient checkpointing set like reinforce_kl's (off unless
                 --gradient-checkpointing), bf16 autocast over fp32 weights on GPUs as reinforce_kl.
                 Step time = time between two `on_step_end` callbacks (CUDA synchronised).

Fixed lengths: the tokenizer's EOS is id V, one past the model's last logit, so neither system can
sample it and every response has exactly --response-len tokens (checked: reinforce_kl's
`response_len` and TRL's `completions/mean_length`). The tokenizer is a Qwen2-style byte-level one
(ids 0..255 are bytes) so prompts of N letters are N tokens in both systems; ids >= 256 decode to
nothing, which is fine for a reward computed on ids.

Each system runs in a fresh subprocess (so peak memory is its own), --rounds times, alternating;
the first step of each run is a warm-up (compilation, allocator) and is not timed. Step time is the
median of the timed steps, then the median over rounds. Peak memory: on a GPU
`torch.cuda.max_memory_allocated` over the whole run; on CPU the peak RSS of the process minus its
RSS after importing torch, transformers, trl and reinforce_kl (both workers import all four), an
honest but coarse number at the small CPU sizes (allocator caching, glibc arenas).

    python bench/bench_step.py                  # CPU here (small model, a few minutes);
    python bench/bench_step.py                  # on a CUDA machine: Qwen2-0.5B, 16 prompts x G = 8, 128 + 512 tokens

GPU machine without a package index: TRL and what it needs beyond the CUDA image (which has torch,
accelerate, transformers 5.17, pandas, pyarrow, psutil, jinja2, pyyaml, xxhash, fsspec) travel as
pure-Python wheels, fetched here with
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \\
        trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.23.0
(1.8 MB without transformers; transformers 5.23.0, 13 MB, makes the GPU run use the version the
CPU results were taken with; datasets 5.2 needs pyarrow >= 24 and fsspec <= 2026.9.0: check with
`pip show pyarrow fsspec` there and add their wheels if the image's differ). There, before the bench:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

How to read the table: tokens/s = response tokens (prompts x G x response length) per second of a
whole step (generation + reward + update). `vs TRL` is reinforce_kl / TRL for tokens/s (higher is
better) and for peak memory (lower is better). Issue 13's targets on an H100: tokens/s >= 1.5x
TRL's at <= 0.6x its peak memory.
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, result_path, rss_gb, script_blob, write_model_folder, write_prompts

ARCHS = {  # published config.json values on the Hugging Face hub
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=1e6, rms_norm_eps=1e-6),
    "cpu-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True,
                      max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6),
}


# ----------------------------------------------------------------------------------------------
# Model folder, tokenizer, prompts, reward (shared by both systems)
# ----------------------------------------------------------------------------------------------
def even_fraction(ids_list) -> list:
    """The programmatic reward both systems use: fraction of even token ids in each response."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) if len(ids) else 0.0 for ids in ids_list]


# ----------------------------------------------------------------------------------------------
# Workers: one system in a fresh process; write {"step_s": [...], "peak_gb": ..., ...} to spec["out"]
# ----------------------------------------------------------------------------------------------
def worker(name: str, spec: dict):
    import torch
    import trl  # noqa: F401 - both workers import the same libraries before the RSS baseline

    sys.path.insert(0, str(ROOT))
    import reinforce_kl as rk

    gpu = torch.cuda.is_available()
    base_rss = rss_gb()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    S, P, G, R = spec["steps"], spec["prompts_per_step"], spec["group_size"], spec["response_len"]
    res = {}
    if name == "reinforce_kl":
        rk.save_checkpoint = lambda *a, **k: None  # measure the steps, not the final checkpoint write
        out = Path(spec["tmp"]) / "rk-run"
        argv = ["--model", spec["model"], "--prompts", spec["prompts"], "--output-dir", str(out), "--overwrite",
                "--steps", str(S), "--prompts-per-step", str(P), "--group-size", str(G),
                "--max-new-tokens", str(R), "--beta", str(spec["beta"]), "--lr", str(spec["lr"]),
                "--temperature", "1.0", "--top-p", "1.0", "--sample-every", "0", "--seed", str(spec["seed"]),
                *(["--gradient-checkpointing"] if spec["gradient_checkpointing"] else []), *spec["rk_args"]]
        rk.main(argv, reward_fn=lambda prompts, responses, ids: even_fraction(ids))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(m["response_len"] == R for m in metrics), "reinforce_kl: a response stopped before --response-len"
        res["step_s"] = [m["response_len"] * P * G / m["tokens_per_s"] for m in metrics]
    else:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.marks = []

            def _mark(self):
                if gpu:
                    torch.cuda.synchronize()
                self.marks.append(time.perf_counter())

            def on_train_begin(self, *a, **k):
                self._mark()

            def on_step_end(self, *a, **k):
                self._mark()

        def reward(prompts, completions, completion_ids, **kwargs):
            return even_fraction(completion_ids)

        prompts = [json.loads(line)["prompt"] for line in Path(spec["prompts"]).read_text().splitlines()]
        cfg = GRPOConfig(output_dir=str(Path(spec["tmp"]) / "trl-run"), max_steps=S, per_device_train_batch_size=G,
                         gradient_accumulation_steps=P, num_generations=G, max_completion_length=R,
                         beta=spec["beta"], learning_rate=spec["lr"], temperature=1.0, top_p=1.0, top_k=0,
                         num_iterations=1, gradient_checkpointing=spec["gradient_checkpointing"],
                         bf16=gpu, use_cpu=not gpu, model_init_kwargs={"dtype": torch.float32},
                         disable_dropout=True, logging_steps=1, save_strategy="no", report_to="none",
                         seed=spec["seed"], dataloader_num_workers=0)
        trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=cfg,
                              train_dataset=Dataset.from_dict({"prompt": prompts}))
        assert trainer.ref_model is not None, "TRL built no reference model (beta must be > 0)"
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        assert lens and all(x == R for x in lens), f"TRL: completion lengths {lens}, not {R}"
        res["step_s"] = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    if gpu:
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    else:
        res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        res["peak_gb"] = res["peak_rss_gb"] - base_rss
        res["base_rss_gb"] = base_rss
    Path(spec["out"]).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def main():
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen2-0.5b" if gpu else "cpu-small", choices=sorted(ARCHS))
    p.add_argument("--prompts-per-step", type=int, default=16 if gpu else 4)  # reinforce_kl's default: 16
    p.add_argument("--group-size", type=int, default=8 if gpu else 4)  # paper: G = 8
    p.add_argument("--prompt-len", type=int, default=128 if gpu else 16)
    p.add_argument("--response-len", type=int, default=512 if gpu else 32)
    p.add_argument("--steps", type=int, default=3 if gpu else 4, help="per run; the first is a warm-up")
    p.add_argument("--rounds", type=int, default=1 if gpu else 3, help="fresh runs of each system, alternating")
    p.add_argument("--beta", type=float, default=0.05)  # reinforce_kl's default; > 0 so TRL keeps a reference
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--gradient-checkpointing", action="store_true", help="in both systems")
    p.add_argument("--systems", default="reinforce_kl,trl")
    p.add_argument("--rk-args", default="", help="more reinforce_kl.py flags, e.g. '--no-fused-linear'")
    p.add_argument("--threads", type=int, default=0 if gpu else 1, help="OMP/torch threads per worker on CPU (0: default)")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(Path(args.spec).read_text()))

    systems = args.systems.split(",")
    P, G, R = args.prompts_per_step, args.group_size, args.response_len
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model_folder(tmp / "model", ARCHS[args.arch])
        write_prompts(tmp / "prompts.jsonl", tmp / "model", P * args.steps, args.prompt_len)
        for r in range(args.rounds):
            for s in systems:
                spec = dict(model=str(tmp / "model"), prompts=str(tmp / "prompts.jsonl"), tmp=str(tmp), steps=args.steps,
                            prompts_per_step=P, group_size=G, response_len=R, beta=args.beta, lr=args.lr, seed=r,
                            gradient_checkpointing=args.gradient_checkpointing, rk_args=args.rk_args.split(),
                            out=str(tmp / f"{s}-{r}.json"))
                (tmp / "spec.json").write_text(json.dumps(spec))
                t0 = time.time()
                proc = subprocess.run([sys.executable, __file__, "--worker", s, "--spec", str(tmp / "spec.json")],
                                      env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{s} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                runs[s].append(json.loads(Path(spec["out"]).read_text()))
                print(f"round {r + 1}/{args.rounds} {s}: {time.time() - t0:.0f} s, steps "
                      + ", ".join(f"{x:.2f}" for x in runs[s][-1]["step_s"]) + " s", flush=True)

    rows = {}
    for s in systems:
        step_s = statistics.median(statistics.median(run["step_s"][1:]) for run in runs[s])
        rows[s] = dict(step_s=step_s, tps=P * G * R / step_s, peak=statistics.median(run["peak_gb"] for run in runs[s]),
                       all=[round(x, 3) for run in runs[s] for x in run["step_s"][1:]],
                       extra=(f"peak RSS {statistics.median(run['peak_rss_gb'] for run in runs[s]):.2f} GB, "
                              f"after imports {statistics.median(run['base_rss_gb'] for run in runs[s]):.2f} GB")
                       if not gpu else f"max reserved {statistics.median(run['reserved_gb'] for run in runs[s]):.2f} GB")

    import transformers
    import trl

    date = datetime.date.today().isoformat()
    mem = "peak GB (max allocated)" if gpu else "peak RSS - RSS after imports, GB"
    head = [f"# bench_step ({'GPU' if gpu else 'CPU'}), {date}",
            f"Machine: {machine(gpu)}; torch {torch.__version__}, transformers {transformers.__version__}, trl "
            f"{trl.__version__}; reinforce_kl.py blob {script_blob()}",
            f"Command: `{' '.join(['python bench/bench_step.py', *sys.argv[1:]])}`",
            f"Setup: random {args.arch}, {P} prompts x G = {G} per step, {args.prompt_len}-token prompts + {R}-token "
            f"responses (EOS never sampled), beta = {args.beta}, lr = {args.lr}, "
            f"{'bf16 autocast over fp32 weights' if gpu else 'fp32'}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'} in both; {args.steps} steps per run (first untimed), "
            f"{args.rounds} fresh run(s) per system alternating; medians", ""]
    table = ["| system | s / step | tokens/s | " + mem + " | vs TRL: tokens/s | vs TRL: memory |", "|---|---|---|---|---|---|"]
    ref = rows.get("trl")
    for s, r in rows.items():
        vs_t = f"{r['tps'] / ref['tps']:.2f}x" if ref else "-"
        vs_m = f"{r['peak'] / ref['peak']:.2f}x" if ref and ref["peak"] > 0 else "-"
        table.append(f"| {s} | {r['step_s']:.3f} | {r['tps']:,.0f} | {r['peak']:.3f} | {vs_t} | {vs_m} |")
    notes = [""] + [f"{s}: timed steps (s) {r['all']}; {r['extra']}" for s, r in rows.items()]
    if gpu and ref and "reinforce_kl" in rows:
        t, m = rows["reinforce_kl"]["tps"] / ref["tps"], rows["reinforce_kl"]["peak"] / ref["peak"]
        notes.append(f"issue 13's targets (H100): tokens/s >= 1.5x TRL ({t:.2f}x: {'met' if t >= 1.5 else 'not met'}), "
                     f"peak memory <= 0.6x TRL ({m:.2f}x: {'met' if m <= 0.6 else 'not met'})")
    text = "\n".join(head + table + notes)
    path = result_path(args.out_dir, "bench_step", gpu, date)
    path.write_text(text + "\n")
    print("\n".join(head[:4] + notes[1:] + [""] + table))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
