"""Benchmark kernels.fused_linear_logprob_kl against materialised logits: time, extra peak memory
and the KL noise floor.

Three ways to get the sampled-token log-prob and the full KL from final hidden states H [N, D] and
LM heads W [V, D] (a bf16 policy and a reference that drifted from it), each timed as one forward +
backward of loss = sum(a * logp + b * kl) w.r.t. H and W, the reference's logits included:
  unfused-bf16  logits = H @ W.T in bf16 (what the LM head returns under bf16 autocast), then
                kernels.fused_logprob_kl (today's kernel)
  unfused-fp32  logits = the same GEMM with a float32 output (torch.mm(out_dtype=float32) on CUDA,
                an exact float32 upcast on CPU), then the same kernel: float32 logits, materialised
  fused         kernels.fused_linear_logprob_kl(H, W, H_ref, W_ref, targets): float32 logits,
                chunk by chunk

GPU (the default when CUDA is available): the sizes of issue 15, time from triton.testing.do_bench
(the mean over its repetitions), extra peak memory = torch.cuda.max_memory_allocated() during one
step minus what was allocated before it (inputs not counted; the gradients of H and W are).
CPU (--cpu, Linux: it reads /proc/self/status): each variant runs in two fresh subprocesses that
build the inputs and run one warm-up step. One measures the growth of its resident memory during
one step (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS before the step;
glibc is told to give freed buffers back to the OS at once, so the peak is that of live tensors);
the other, with glibc's default allocator settings (returning every buffer would slow all variants
down), the median wall time of --reps steps.

Noise floor (both modes): mean per-token KL between the model and a copy drifted by --drift
(relative, applied in float32 to weights and hidden states), computed from bf16 logits, from
float32 logits by each path, and in float64 from the same inputs; once for a bf16 model and once
for a float32 model (float32 master weights; "bf16 operands" is what autocast feeds the LM head).

    python bench/bench_fused_linear.py                      # GPU: 16384x151936x896, 8192x131072x5120
    python bench/bench_fused_linear.py --cpu                # CPU: 2048x32768x256, 32 MiB chunks

Prints a markdown table and writes it to bench/results/fused-linear-<device>-<date>.md.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kernels import fused_linear_logprob_kl, fused_logprob_kl  # noqa: E402
from kernels import linear_logprob_kl as L  # noqa: E402

VARIANTS = ["unfused-bf16", "unfused-fp32", "fused"]


class _Float32Logits(torch.autograd.Function):
    """h @ w.T from bf16 operands with a float32 output (cuBLAS accumulates in float32); the
    backward rounds the logit gradient to bf16 for its two GEMMs, as the fused path does.
    torch.mm(out_dtype=...) has no autograd formula of its own, hence this wrapper."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return torch.mm(h, w.T, out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        g = g.to(h.dtype)
        return g @ w, g.T @ h


def float32_logits(h, w):
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and L._MM_OUT_DTYPE:
        return _Float32Logits.apply(h, w)
    with L._exact_matmuls(h.device):  # IEEE float32 (no TF32) from exactly upcast operands
        return h.float() @ w.float().T


def bf16_logits(h, w):
    return h @ w.T


def make_inputs(n, v, d, drift, device, dtype=torch.bfloat16, seed=0):
    """A policy head and hidden states (logits of std ~3), a reference drifted by `drift` relative."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g)
    w = torch.randn(v, d, device=device, generator=g) * (3 / d**0.5)
    rh = h * (1 + drift * torch.randn(n, d, device=device, generator=g))
    rw = w * (1 + drift * torch.randn(v, d, device=device, generator=g))
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    a, b = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    h, w, rh, rw = (x.to(dtype) for x in (h, w, rh, rw))
    return h.requires_grad_(), w.requires_grad_(), rh, rw, targets, a, b


def step(variant, h, w, rh, rw, targets, a, b, chunk_bytes):
    if variant == "fused":
        out = fused_linear_logprob_kl(h, w, rh, rw, targets, chunk_bytes=chunk_bytes)
    else:
        logits = bf16_logits if variant == "unfused-bf16" else float32_logits
        with torch.no_grad():
            ref_logits = logits(rh, rw)
        out = fused_logprob_kl(logits(h, w), ref_logits, targets)
    (out.logp * a + out.kl * b).sum().backward()


def noise_floor(h, w, rh, rw, targets, rows, chunk_bytes):
    """Mean per-token KL over the first `rows` rows, by each way of computing it."""
    h, w, rh, rw, t = h[:rows].detach(), w.detach(), rh[:rows], rw, targets[:rows]
    with torch.no_grad():
        lp = torch.log_softmax(h.double() @ w.double().T, -1)
        lq = torch.log_softmax(rh.double() @ rw.double().T, -1)
        out = {"float64": (lp.exp() * (lp - lq)).sum(-1).mean().item()}
        del lp, lq
        out["fused"] = fused_linear_logprob_kl(h, w, rh, rw, t, chunk_bytes=chunk_bytes).kl.mean().item()
        if h.dtype == torch.float32:  # what autocast feeds the LM head: bf16-rounded operands
            out["fused, bf16 operands"] = fused_linear_logprob_kl(
                h.bfloat16(), w.bfloat16(), rh.bfloat16(), rw.bfloat16(), t, chunk_bytes=chunk_bytes).kl.mean().item()
        out["float32 logits"] = fused_logprob_kl(float32_logits(h, w), float32_logits(rh, rw), t).kl.mean().item()
        out["bf16 logits"] = fused_logprob_kl(bf16_logits(h.bfloat16(), w.bfloat16()),
                                              bf16_logits(rh.bfloat16(), rw.bfloat16()), t).kl.mean().item()
    return out


# ----------------------------------------------------------------------------- GPU


def measure_gpu(variant, inputs, chunk_bytes):
    import triton.testing

    h, w = inputs[0], inputs[1]
    run = lambda: step(variant, *inputs, chunk_bytes)  # noqa: E731
    run()  # warm-up (Triton compiles, cuBLAS picks its kernels)
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    h.grad = w.grad = None
    ms = triton.testing.do_bench(run, grad_to_none=[h, w], warmup=3, rep=30)  # the mean, in ms
    h.grad = w.grad = None
    return ms, peak


def gpu_main(args):
    rows, noise = [], {}
    for size in args.sizes.split(","):
        n, v, d = map(int, size.lower().split("x"))
        inputs = make_inputs(n, v, d, args.drift, "cuda")
        for variant in VARIANTS:
            try:
                ms, peak = measure_gpu(variant, inputs, args.chunk_mb << 20)
            except torch.cuda.OutOfMemoryError:
                ms, peak = float("nan"), float("nan")
            torch.cuda.empty_cache()
            rows.append(dict(size=f"{n} x {v} x {d}", variant=variant, ms=ms, peak_gb=peak / 1e9))
        for dtype in (torch.bfloat16, torch.float32):
            h, w, rh, rw, t, _, _ = make_inputs(args.noise_rows, v, d, args.drift, "cuda", dtype=dtype)
            noise[(f"{n} x {v} x {d}", str(dtype).split(".")[-1])] = noise_floor(
                h, w, rh, rw, t, args.noise_rows, args.chunk_mb << 20)
        del inputs
        torch.cuda.empty_cache()
    return torch.cuda.get_device_name(), rows, noise


# ----------------------------------------------------------------------------- CPU

CHILD = r"""
import json, re, statistics, sys, time
import torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from bench_fused_linear import make_inputs, step

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

n, v, d, drift, variant, chunk_bytes, reps = {n}, {v}, {d}, {drift}, {variant!r}, {chunk_bytes}, {reps}
inputs = make_inputs(n, v, d, drift, "cpu")
h, w = inputs[0], inputs[1]
step(variant, *inputs, chunk_bytes)  # warm-up
h.grad = w.grad = None
if reps == 0:
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
    step(variant, *inputs, chunk_bytes)
    print(json.dumps(dict(peak=status("VmHWM") - base)))
else:
    times = []
    for _ in range(reps):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        step(variant, *inputs, chunk_bytes)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(s=statistics.median(times))))
"""


def run_child(env, **kw):
    code = CHILD.format(root=str(ROOT), bench=str(Path(__file__).parent), **kw)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kw['variant']} at {kw['n']}x{kw['v']}x{kw['d']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_main(args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # a fixed mmap threshold: freed buffers go back to the OS at once, so RSS follows live tensors
    env_memory = dict(env, MALLOC_MMAP_THRESHOLD_="131072")
    rows, noise = [], {}
    for size in args.sizes.split(","):
        n, v, d = map(int, size.lower().split("x"))
        for variant in VARIANTS:
            kw = dict(n=n, v=v, d=d, drift=args.drift, variant=variant, chunk_bytes=args.chunk_mb << 20)
            peak = run_child(env_memory, reps=0, **kw)["peak"]
            seconds = run_child(env, reps=args.reps, **kw)["s"]
            rows.append(dict(size=f"{n} x {v} x {d}", variant=variant, ms=seconds * 1e3, peak_gb=peak / 1e9))
            print(rows[-1], flush=True)
        for dtype in (torch.bfloat16, torch.float32):
            h, w, rh, rw, t, _, _ = make_inputs(args.noise_rows, v, d, args.drift, "cpu", dtype=dtype)
            noise[(f"{n} x {v} x {d}", str(dtype).split(".")[-1])] = noise_floor(
                h, w, rh, rw, t, args.noise_rows, args.chunk_mb << 20)
    machine = f"{len(os.sched_getaffinity(0))}-core CPU, torch {torch.__version__.split('+')[0]}"
    return machine, rows, noise


# ----------------------------------------------------------------------------- report


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="small sizes on the CPU, memory from each subprocess's RSS")
    p.add_argument("--sizes", default=None, help="comma-separated NxVxD (GPU default: the two of issue 15; "
                                                 "CPU default: 2048x32768x256)")
    p.add_argument("--chunk-mb", type=int, default=None,
                   help="chunk_bytes of the fused path in MiB (GPU default 256, the library default; CPU 32)")
    p.add_argument("--drift", type=float, default=2e-5, help="relative drift of the reference (issue 15: 2e-5)")
    p.add_argument("--noise-rows", type=int, default=256, help="rows used for the KL noise floor")
    p.add_argument("--reps", type=int, default=3, help="CPU: timed steps per variant (median)")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; run `python bench/bench_fused_linear.py --cpu` for the CPU mode")
    args.sizes = args.sizes or ("2048x32768x256" if args.cpu else "16384x151936x896,8192x131072x5120")
    args.chunk_mb = args.chunk_mb or (32 if args.cpu else L.DEFAULT_CHUNK_BYTES >> 20)
    machine, rows, noise = cpu_main(args) if args.cpu else gpu_main(args)

    date = datetime.date.today().isoformat()
    command = "python bench/bench_fused_linear.py" + (" --cpu" if args.cpu else "") + f" --sizes {args.sizes}"
    timing = "median wall time of one step" if args.cpu else "triton.testing.do_bench mean"
    memory = ("peak RSS growth during one step, fresh subprocess per variant" if args.cpu
              else "torch.cuda.max_memory_allocated during one step minus allocated before it")
    lines = [
        f"{machine}; {date}",
        f"Command: {command}",
        f"fused chunk_bytes = {args.chunk_mb} MiB; bf16 H, W; time: {timing}; extra peak memory: {memory}",
        "",
        "| N x V x D | variant | fwd+bwd ms | extra peak GB | time vs unfused-bf16 | memory vs unfused-bf16 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x for x in rows if x["size"] == r["size"] and x["variant"] == "unfused-bf16")
        lines.append(f"| {r['size']} | {r['variant']} | {r['ms']:.1f} | {r['peak_gb']:.3f} | "
                     f"{r['ms'] / base['ms']:.2f}x | {r['peak_gb'] / base['peak_gb']:.2f}x |")
    lines += ["", f"KL noise floor: mean per-token KL of a copy drifted by {args.drift:g} (relative) over "
              f"{args.noise_rows} rows; in brackets the relative error against float64 of the same inputs", "",
              "| N x V x D | model | float64 | fused (float32 logits) | fused, bf16 operands | "
              "materialised float32 logits | bf16 logits |", "|---|---|---|---|---|---|---|"]
    for (size, dtype), kl in noise.items():
        def cell(k, kl=kl):
            return f"{kl[k]:.3e} ({abs(kl[k] - kl['float64']) / kl['float64']:.1e})" if k in kl else "-"
        lines.append(f"| {size} | {dtype} | {kl['float64']:.3e} | {cell('fused')} | {cell('fused, bf16 operands')} | "
                     f"{cell('float32 logits')} | {cell('bf16 logits')} |")
    table = "\n".join(lines)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else re.sub(r"[^A-Za-z0-9]+", "-", machine).strip("-")
    path = out / f"fused-linear-{device}-{date}.md"
    path.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
