"""Time one reinforce_kl.py training step on a GPU, with a random-weight model of a real architecture.

The step is reinforce_kl.py's own code: `sample_group` (G responses with a KV cache), then the
update of eq. (4) on those G sequences: reference forward (no grad), policy forward, per-token
log-prob and full-vocabulary KL, loss, backward, AdamW. The KL path is swapped between
  kernels:  reinforce_kl.token_kl (kernels.fused_logprob_kl on the bf16 logits)
  eager:    float32 log_softmax of policy and reference, gather, sum p (log p - log q)
  compile:  torch.compile of the eager function
so the table shows what the fused kernel buys inside a real step (time and peak memory), next to
what sampling costs. Weights float32 with bf16 autocast, as reinforce_kl.py runs on CUDA.

    python bench/bench_step.py                                  # Qwen2-0.5B shape, G=8, 512 tokens
    python bench/bench_step.py --arch qwen2.5-1.5b --response-len 1024
"""
import argparse
import copy
import datetime
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reinforce_kl as rk  # noqa: E402

ARCHS = {  # published configurations (config.json of each model on the Hugging Face hub)
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),  # CPU smoke run
}


def eager_token_kl(logits, ref_logits, tokens, temperature):
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lq = torch.log_softmax(ref_logits.float() / temperature, dim=-1)
    logp = lp.gather(-1, tokens[..., None]).squeeze(-1)
    return logp, (lp.exp() * (lp - lq)).sum(-1)


def kernels_token_kl(logits, ref_logits, tokens, temperature):
    logp, kl, _, _ = rk.token_kl(logits, ref_logits, tokens, temperature, "full")
    return logp, kl


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="qwen2-0.5b", choices=sorted(ARCHS))
    p.add_argument("--group-size", type=int, default=8)  # paper: G = 8
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--modes", default="kernels,eager,compile")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**ARCHS[args.arch], max_position_embeddings=32768, rope_theta=1e6)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.eval()
    n_params = sum(x.numel() for x in policy.parameters())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    G, V = args.group_size, cfg.vocab_size
    prompt_ids = torch.randint(0, V, (args.prompt_len,)).tolist()
    results = []

    # sampling: G responses of exactly response_len tokens (no EOS can stop a random model early)
    gen_args = SimpleNamespace(group_size=G, max_new_tokens=args.response_len, temperature=1.0, top_p=1.0)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            tokens, mask = rk.sample_group(policy, prompt_ids, gen_args, [-1], 0, gen, device)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    results.append(dict(what=f"sample {G} x {args.response_len} tokens (KV cache)", ms=times[-1], peak=float("nan")))

    adv = torch.randn(G, device=device)
    for mode in args.modes.split(","):
        kl_fn = {"kernels": kernels_token_kl, "eager": eager_token_kl,
                 "compile": torch.compile(eager_token_kl, dynamic=False)}[mode]

        def update():
            opt.zero_grad(set_to_none=True)
            with autocast:
                with torch.no_grad():
                    ref_logits = rk.response_logits(ref, prompt_ids, tokens, mask)
                logits = rk.response_logits(policy, prompt_ids, tokens, mask)
                logp, kl = kl_fn(logits, ref_logits, tokens, 1.0)
                loss = rk.reinforce_kl_loss(logp, kl, adv, mask, 0.1, G)
            loss.backward()
            opt.step()
            return loss

        try:
            update()  # warm-up (compilation, AdamW state)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times = []
            for _ in range(args.repeats):
                sync(device)
                t0 = time.perf_counter()
                update()
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if device.type == "cuda" else float("nan")
            results.append(dict(what=f"update, KL via {mode}", ms=statistics.median(times), peak=peak))
        except torch.cuda.OutOfMemoryError:
            results.append(dict(what=f"update, KL via {mode}", ms=float("nan"), peak=float("nan")))
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    tokens_per_update = G * (args.prompt_len + args.response_len)
    lines = [f"GPU: {gpu}; torch {torch.__version__}; {date}; {args.arch} ({n_params / 1e6:.0f}M parameters, "
             f"random weights), G = {G}, prompt {args.prompt_len} + response {args.response_len} tokens",
             f"Command: python bench/bench_step.py --arch {args.arch} --group-size {G} --prompt-len {args.prompt_len} "
             f"--response-len {args.response_len}", "",
             "| part of one step | ms (median) | extra peak GB | tokens/s |", "|---|---|---|---|"]
    for r in results:
        tok = G * args.response_len if r["what"].startswith("sample") else tokens_per_update
        lines.append(f"| {r['what']} | {r['ms']:.1f} | {r['peak']:.2f} | {tok / (r['ms'] * 1e-3):,.0f} |")
    table = "\n".join(lines)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{args.arch}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}-{date}.md"
    path.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
