"""Rollout speed (issue 13): tokens/s of three ways to sample prompts x G responses.

  (a) old loop   reinforce_kl.py before issue 13 (`sample_group`, copied below from commit
                 619f921): one prompt group at a time, G rows, one eager forward per token with a
                 dynamic KV cache, torch.multinomial with a per-group generator.
  (b) rollout    today's reinforce_kl.rollout: every prompt x G row of a rank in ONE `generate`
                 call, Gumbel-max sampling keyed by (seed, step, prompt, sample), static KV cache
                 and compiled decoding on CUDA (as the script runs with --compile-rollout, its default).
  (c) generate   plain Hugging Face `generate(do_sample=True, top_k=0, top_p=1)` on the same batch
                 and the same cache / compile settings as (b): torch.multinomial instead of the keyed
                 noise, so (b) / (c) is the price of reproducible, process-count-independent samples.

All three draw from softmax(logits / T) with T = 1 and no top-p (so the same distribution). They
draw DIFFERENT samples by design: (a) uses one torch.Generator per group, (b) noise keyed by the
row, (c) the global generator. The bench checks that (b) returns valid tokens (shape, range, no
early stop, the G rows of a group differ) and reports whether it repeats itself exactly and whether
a group sampled alone equals the same group inside the big batch (the claim behind "the same
samples on any number of processes"; under bf16 a different batch shape can flip near-ties).

Fixed lengths: EOS is set to id V (the model's vocabulary size), one past the last logit, so no
row can ever sample it and every row runs the full --new-tokens (no logits processor needed, and
all three paths get the same treatment).

Models: random weights (`from_config`) of published configurations, so nothing large has to be
copied to a GPU machine. GPU (default when CUDA is present): Qwen2-0.5B and Qwen2.5-1.5B, bf16
weights (`--weights fp32-autocast` samples as reinforce_kl.py does without --fsdp: fp32 master
weights under bf16 autocast), 16 prompts x G = 8 x 512 new tokens after 128-token prompts.
CPU (default without CUDA): a small random Qwen2 (hidden 256, 4 layers, vocab 8192), fp32,
4 prompts x G = 4 x 32 new tokens; each path is timed --repeats times, the table shows medians.

    python bench/bench_rollout.py                        # CPU mode here; GPU mode on a CUDA machine
    python bench/bench_rollout.py --arch qwen2-0.5b --baseline-groups 2   # GPU, old loop on 2 of 16 groups

How to read the table: tokens/s counts generated tokens only (rows x new tokens / seconds). `vs
old` is the speed-up over (a), `vs generate` the ratio to (c) (1.0 = the keyed sampler costs
nothing). Times exclude the first call of each path (compilation, allocator warm-up). With
--baseline-groups k < prompts, (a) is timed on k groups and scaled by prompts / k: its groups run
one after another and cost the same, so the scaling is exact up to noise; the table says so.
Issue 13's target: (b) >= 20x (a) at 16 x 8 x 512 on an H100.
"""
import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import torch

from common import ROOT, machine, result_path, script_blob  # noqa: E402

sys.path.insert(0, str(ROOT))
import reinforce_kl as rk  # noqa: E402

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


# ---- (a) the per-group loop of reinforce_kl.py at commit 619f921, verbatim but for the names ----
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
def sample_group(model, prompt_ids: List[int], args, eos_ids: List[int], pad_id: int,
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
# ---- end of the copy ----------------------------------------------------------------------------


def round_robin(paths: dict, repeats: dict, device) -> dict:
    """Warm each path up once (compilation, cache allocation), then time them in turns, so that a
    change in the machine's load (2 shared cores here) hits every path alike.
    paths: name -> (fn, warm-up fn). Returns name -> (median s, all times, last result)."""
    out = {name: warm() for name, (fn, warm) in paths.items()}
    times = {name: [] for name in paths}
    for r in range(max(repeats.values())):
        for name, (fn, _) in paths.items():
            if r >= repeats[name]:
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), times[name], out[name]) for name in paths}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--arch", default="qwen2-0.5b,qwen2.5-1.5b" if gpu else "cpu-small",
                   help=f"comma-separated, from {sorted(ARCHS)}")
    p.add_argument("--prompts", type=int, default=16 if gpu else 4)
    p.add_argument("--group-size", type=int, default=8 if gpu else 4)  # paper: G = 8
    p.add_argument("--prompt-len", type=int, default=128 if gpu else 16)
    p.add_argument("--new-tokens", type=int, default=512 if gpu else 32)
    p.add_argument("--repeats", type=int, default=3, help="timed calls of (b) and (c)")
    p.add_argument("--baseline-groups", type=int, default=4 if gpu else 0,
                   help="time (a) on this many groups and scale to --prompts; 0: all")
    p.add_argument("--baseline-repeats", type=int, default=1 if gpu else 3, help="timed calls of (a)")
    p.add_argument("--weights", default="bf16" if gpu else "fp32", choices=["bf16", "fp32-autocast", "fp32"],
                   help="bf16 weights; fp32 master weights under bf16 autocast (reinforce_kl without --fsdp); fp32")
    p.add_argument("--no-compile", action="store_true", help="CUDA: dynamic cache, eager decoding for (b) and (c)")
    p.add_argument("--threads", type=int, default=0 if gpu else 1,
                   help="torch CPU threads (0: torch's default); 1 on CPU: other jobs share the cores")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    rows, lines = [], []
    for arch in args.arch.split(","):
        cfg = Qwen2Config(**ARCHS[arch], bos_token_id=None, eos_token_id=None, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if args.weights == "bf16" else torch.float32)
        model.eval().requires_grad_(False)
        n_params = sum(x.numel() for x in model.parameters())
        V, G, B, T = cfg.vocab_size, args.group_size, args.prompts, args.new_tokens
        eos_ids, pad_id = [V], 0  # EOS = one past the last logit: never sampled, every row runs T tokens
        gen_prompts = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, V, (args.prompt_len,), generator=gen_prompts).tolist() for _ in range(B)]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu and args.weights != "fp32")
        ns = SimpleNamespace(group_size=G, max_new_tokens=T, temperature=1.0, top_p=1.0,
                             compile_rollout=not args.no_compile, fsdp=False)
        static = gpu and not args.no_compile

        k = min(args.baseline_groups or B, B)

        def old_loop(groups=k, tokens=T):
            out = []
            for g in range(groups):
                gen = torch.Generator(device=device).manual_seed(g)
                with autocast:
                    out.append(sample_group(model, prompts[g], SimpleNamespace(**{**vars(ns), "max_new_tokens": tokens}),
                                            eos_ids, pad_id, gen, device))
            return out

        flat = [prompts[g] for g in range(B) for _ in range(G)]
        keys = [(42, 1, g, i) for g in range(B) for i in range(G)]

        def new_rollout(flat=flat, keys=keys):
            with autocast:
                return rk.rollout(model, flat, keys, ns, eos_ids, pad_id, pad_to=args.prompt_len)

        plain_cfg = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=T,
                                     eos_token_id=eos_ids, pad_token_id=pad_id,
                                     cache_implementation="static" if static else None)
        ids = torch.tensor(flat, device=device)

        def plain_generate():
            saved, model.generation_config = model.generation_config, GenerationConfig()
            try:
                with autocast, torch.no_grad():
                    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=plain_cfg)
            finally:
                model.generation_config = saved

        res = round_robin({"a": (old_loop, lambda: old_loop(1, 8)), "b": (new_rollout, new_rollout),
                           "c": (plain_generate, plain_generate)},
                          {"a": args.baseline_repeats, "b": args.repeats, "c": args.repeats}, device)
        (t_old, all_old, old), (t_new, all_new, (tokens, mask)), (t_gen, all_gen, plain) = res["a"], res["b"], res["c"]
        t_old, all_old = t_old * B / k, [x * B / k for x in all_old]

        # ---- checks: (b) returns valid tokens; (a) and (c) ran the full length too ----------------
        assert tokens.shape == (B * G, T) and bool(mask.all()), f"rollout: shape {tuple(tokens.shape)}, early stop"
        assert int(tokens.min()) >= 0 and int(tokens.max()) < V, "rollout: token id out of the vocabulary"
        assert all(len({tuple(r) for r in tokens[g * G:(g + 1) * G].tolist()}) > 1 for g in range(B)), \
            "rollout: the G samples of a group are identical"
        assert all(t.shape == (G, T) and bool(m.all()) for t, m in old), "old loop: a row stopped early"
        assert plain.shape == (B * G, args.prompt_len + T), "generate: a row stopped early"
        again, _ = new_rollout()
        repeat_same = float((again == tokens).float().mean())
        alone, _ = new_rollout(flat[:G], keys[:G])  # group 0 sampled by itself (a 1-of-B-process run)
        alone_same = float((alone == tokens[:G]).float().mean())

        n_tok = B * G * T
        for name, t, times in [("(a) old per-group loop", t_old, all_old), ("(b) reinforce_kl.rollout", t_new, all_new),
                               ("(c) HF generate(do_sample)", t_gen, all_gen)]:
            rows.append(dict(arch=arch, name=name, s=t, tps=n_tok / t, vs_old=t_old / t, vs_gen=t_gen / t,
                             times=times))
        lines.append(f"{arch}: {n_params / 1e6:.0f}M parameters; (b) identical on a repeat: {repeat_same:.1%} of "
                     f"tokens; group 0 alone vs inside the batch of {B * G} rows: {alone_same:.1%} of tokens equal")
        if k < B:
            lines.append(f"{arch}: (a) timed on {k} of {B} groups and scaled by {B / k:g}")
        if gpu:
            lines.append(f"{arch}: issue 13's target (b) >= 20x (a) at 16 x 8 x 512 on an H100: {t_old / t_new:.1f}x")
        del model
        if gpu:
            torch.cuda.empty_cache()

    import transformers
    date = datetime.date.today().isoformat()
    mode = "GPU" if gpu else "CPU"
    weights = {"bf16": "bf16 weights", "fp32-autocast": "fp32 weights, bf16 autocast", "fp32": "fp32 weights"}[args.weights]
    cache = "static KV cache + compiled decoding for (b) and (c)" if gpu and not args.no_compile else "dynamic KV cache, eager"
    cmd = "python bench/bench_rollout.py " + " ".join(sys.argv[1:])
    head = [f"# bench_rollout ({mode}), {date}",
            f"Machine: {machine(gpu)}, torch threads {torch.get_num_threads()}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"reinforce_kl.py blob {script_blob()}",
            f"Command: `{cmd.strip()}`",
            f"Setup: {args.prompts} prompts x G = {args.group_size} x {args.new_tokens} new tokens after "
            f"{args.prompt_len}-token prompts; EOS = id V (never sampled); {weights}; {cache}; "
            f"each path warmed up once, then timed in turns ({args.repeats} calls of (b) and (c), "
            f"{args.baseline_repeats} of (a)); medians",
            ""]
    table = ["| model | path | s | tokens/s | vs old | vs generate |", "|---|---|---|---|---|---|"]
    table += [f"| {r['arch']} | {r['name']} | {r['s']:.3f} | {r['tps']:,.0f} | {r['vs_old']:.1f}x | {r['vs_gen']:.2f}x |"
              for r in rows]
    notes = ["", *lines, "(a) and (b) draw different samples by design (per-group generator vs keyed Gumbel noise); "
             "all three sample softmax(logits) exactly.",
             "all timings (s): " + "; ".join(f"{r['arch']} {r['name'][:3]} " + ", ".join(f"{x:.3f}" for x in r["times"])
                                            for r in rows)]
    text = "\n".join(head + table + notes)
    path = result_path(args.out_dir, "bench_rollout", gpu, date)
    path.write_text(text + "\n")
    print("\n".join(head[:4] + notes[1:] + [""] + table))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
