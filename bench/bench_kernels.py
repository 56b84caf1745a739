"""Benchmark kernels.fused_logprob_kl against naive PyTorch and torch.compile on a GPU.

For each size N x V (bf16 logits and reference logits), the forward + backward of
    loss = sum(a * logp + b * kl)
is timed with triton.testing.do_bench (the mean over its repetitions: its default return_mode),
and its peak extra memory is measured (peak allocated during one step minus what was allocated
before it: the inputs are not counted).
The roofline is the memory-traffic floor of the fused kernel: read logits and reference twice,
write the gradient once, 5 N V bf16 elements, at the copy bandwidth measured in the same run.

    python bench/bench_kernels.py                       # the three sizes of issue 2
    python bench/bench_kernels.py --sizes 4096x32768    # one size

Prints a markdown table and writes it to bench/results/<gpu>-<date>.md.
"""
import argparse
import datetime
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import fused_logprob_kl  # noqa: E402


def naive_logprob_kl(logits, ref_logits, targets):
    """The plain PyTorch way: materialise float32 log-softmaxes of both."""
    acc = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for the accuracy check
    lp = torch.log_softmax(logits.to(acc), dim=-1)
    lq = torch.log_softmax(ref_logits.to(acc), dim=-1)
    logp = lp.gather(-1, targets[:, None]).squeeze(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return logp, kl


def fused(logits, ref_logits, targets):
    out = fused_logprob_kl(logits, ref_logits, targets)
    return out.logp, out.kl


def copy_bandwidth(nbytes=4 << 30):
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    import triton.testing

    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()  # never time zeros
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    del x, y
    return 2 * nbytes / (ms * 1e-3)


def measure(fn, logits, ref, targets, a, b):
    import triton.testing

    def step():
        logp, kl = fn(logits, ref, targets)
        (logp * a + kl * b).sum().backward()

    step()  # warm-up / compile
    logits.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits.grad = None
    ms = triton.testing.do_bench(step, grad_to_none=[logits], warmup=5, rep=50)  # the mean
    return ms, peak


def check_accuracy(logits, ref, targets, a, b):
    """Relative error of logp/kl/grad vs a float64 computation on the first rows."""
    rows = slice(0, 64)
    z = logits[rows].detach().clone().requires_grad_()
    z64 = logits[rows].detach().double().requires_grad_()
    out = fused_logprob_kl(z, ref[rows], targets[rows])
    (out.logp * a[rows] + out.kl * b[rows]).sum().backward()
    lp64, kl64 = naive_logprob_kl(z64.double(), ref[rows].double(), targets[rows])
    (lp64 * a[rows] + kl64 * b[rows]).sum().backward()
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()  # noqa: E731
    return rel(out.logp, lp64), rel(out.kl, kl64), rel(z.grad, z64.grad)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4096x32768,8192x131072,16384x151936", help="comma-separated NxV")
    p.add_argument("--methods", default="eager,compile,kernels", help="comma-separated subset")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_kernels.py needs a CUDA GPU; on CPU run `pytest tests/test_kernels.py` instead")

    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    methods = {"eager": naive_logprob_kl, "compile": torch.compile(naive_logprob_kl), "kernels": fused}
    rows = []
    for size in args.sizes.split(","):
        n, v = map(int, size.lower().split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = (torch.randn(n, v, device="cuda", generator=g) * 2).to(torch.bfloat16).requires_grad_()
        ref = (logits.detach().float() + torch.randn(n, v, device="cuda", generator=g)).to(torch.bfloat16)
        targets = torch.randint(0, v, (n,), device="cuda", generator=g)
        a, b = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
        roofline_ms = 5 * n * v * 2 / bw * 1e3
        err = check_accuracy(logits, ref, targets, a, b)
        for name in args.methods.split(","):
            torch._dynamo.reset()
            try:
                ms, peak = measure(methods[name], logits, ref, targets, a, b)
            except torch.cuda.OutOfMemoryError:
                ms, peak = float("nan"), float("nan")
            torch.cuda.empty_cache()
            rows.append(dict(size=f"{n} x {v}", method=name, ms=ms, peak_gb=peak / 1e9,
                             roofline_ms=roofline_ms, pct_roofline=100 * roofline_ms / ms))
        rows[-1]["err"] = err
        del logits, ref
        torch.cuda.empty_cache()

    date = datetime.date.today().isoformat()
    lines = [
        f"GPU: {gpu}; torch {torch.__version__}; measured copy bandwidth {bw / 1e12:.2f} TB/s; {date}",
        "Command: python bench/bench_kernels.py --sizes " + args.sizes,
        "",
        "| N x V (bf16) | method | fwd+bwd ms | extra peak GB | roofline ms | % of roofline | vs eager | vs compile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = {x["method"]: x["ms"] for x in rows if x["size"] == r["size"]}
        vs = lambda m: f"{same[m] / r['ms']:.2f}x" if m in same else "-"  # noqa: E731
        lines.append(f"| {r['size']} | {r['method']} | {r['ms']:.2f} | {r['peak_gb']:.2f} | {r['roofline_ms']:.2f} "
                     f"| {r['pct_roofline']:.0f}% | {vs('eager')} | {vs('compile')} |")
    lines.append("")
    for r in rows:
        if "err" in r:
            lines.append(f"kernels relative error vs float64 at {r['size']} (first 64 rows): logp {r['err'][0]:.2e}, "
                         f"kl {r['err'][1]:.2e}, grad {r['err'][2]:.2e}")
    table = "\n".join(lines)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}-{date}.md"
    path.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
