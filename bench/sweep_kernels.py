"""Choose the launch configuration of the kernels in kernels/logprob_kl.py, on a GPU.

Times each Triton kernel alone (no autograd, no allocation) over block sizes, warps and pipeline
stages, at bf16 N x V, and reports the achieved bandwidth against the measured copy bandwidth:
the forward pass reads 2 N V elements, the backward pass reads 2 N V and writes N V.

It also times `fwd_blockwise`, the first design of the forward pass, kept here as the
measurement behind the choice: one running maximum per row, so every block of the vocabulary
needs six reductions across the threads of the program (max and sum of x, max and sum of y,
and the two weighted sums), against none inside the loop for the per-lane kernel.

    python bench/sweep_kernels.py                      # prints the table, best first per kernel
    python bench/sweep_kernels.py --sizes 4096x32768   # another size

`kernels/logprob_kl.py:_launch_config` holds the winners.
"""
import argparse
import datetime
import itertools
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import logprob_kl as K  # noqa: E402


@triton.jit
def _fwd_blockwise(
    X, Y, TGT, LOGP, KL, ENT, LSE_P, LSE_Q,
    R1, sx0, sx1, sy0, sy1, V, inv_temp,
    HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The first forward design: one running maximum per row, reductions in every iteration."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + (row // R1) * sx0 + (row % R1) * sx1
    y_row = Y + (row // R1) * sy0 + (row % R1) * sy1
    cols = tl.arange(0, BLOCK_V)
    m_x = tl.full([], -1.0e30, tl.float32)
    s_x = tl.zeros([], tl.float32)
    a = tl.zeros([], tl.float32)
    b = tl.zeros([], tl.float32)
    m_y = tl.full([], -1.0e30, tl.float32)
    s_y = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m_x, tl.max(x, 0))
        scale = tl.exp(m_x - m_new)
        e = tl.exp(x - m_new)
        live = e > 0
        s_x = s_x * scale + tl.sum(e, 0)
        b = b * scale + tl.sum(tl.where(live, e * x, 0.0), 0)
        if HAS_REF:
            y = tl.load(y_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            a = a * scale + tl.sum(tl.where(live, e * (x - y), 0.0), 0)
            my_new = tl.maximum(m_y, tl.max(y, 0))
            s_y = s_y * tl.exp(m_y - my_new) + tl.sum(tl.exp(y - my_new), 0)
            m_y = my_new
        m_x = m_new
    lse_p = m_x + tl.log(s_x)
    t = tl.load(TGT + row)
    valid = (t >= 0) & (t < V)
    x_t = tl.load(x_row + t, mask=valid, other=0.0).to(tl.float32) * inv_temp
    tl.store(LOGP + row, tl.where(valid, x_t - lse_p, 0.0))
    tl.store(ENT + row, lse_p - b / s_x)
    tl.store(LSE_P + row, lse_p)
    lse_q = m_y + tl.log(s_y)
    tl.store(KL + row, a / s_x - (lse_p - lse_q))
    tl.store(LSE_Q + row, lse_q)


def time_ms(fn):
    """Median milliseconds of fn (CUDA events via do_bench; wall clock on CPU for a smoke run)."""
    if torch.cuda.is_available():
        return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(device, nbytes=2 << 30):
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="16384x151936,4096x32768", help="comma-separated NxV")
    p.add_argument("--blocks", default="1024,2048,4096,8192")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--stages", default="1,3")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bw = copy_bandwidth(device, 2 << 30 if device == "cuda" else 1 << 24)
    configs = [dict(BLOCK_V=b, num_warps=w, num_stages=s) for b, w, s in itertools.product(
        map(int, args.blocks.split(",")), map(int, args.warps.split(",")), map(int, args.stages.split(",")))
        if b // (32 * w) <= 64]  # more than 64 elements a thread spills registers
    rows = []
    for size in args.sizes.split(","):
        n, v = map(int, size.lower().split("x"))
        g = torch.Generator(device=device).manual_seed(0)
        x = (torch.randn(n, v, device=device, generator=g) * 2).to(torch.bfloat16)
        y = (x.float() + torch.randn(n, v, device=device, generator=g)).to(torch.bfloat16)
        tgt = torch.randint(0, v, (n,), device=device, generator=g)
        outs = [torch.empty(n, device=device) for _ in range(6)]  # logp, kl, ent, lse_p, d_pq, ref_logp
        g_lp, g_kl = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
        grad = torch.empty_like(x)
        strides = (n, n * v, v, n * v, v, v)  # R1, sx0, sx1, sy0, sy1 of the [1, N, V] view, V
        launches = {
            "fwd": lambda c: K._fwd_kernel[(n,)](x, y, tgt, *outs, *strides, 1.0, HAS_REF=True, **c),
            "fwd_blockwise": lambda c: _fwd_blockwise[(n,)](x, y, tgt, *outs[:5], *strides, 1.0, HAS_REF=True, **c),
            "bwd": lambda c: K._bwd_kernel[(n,)](x, y, tgt, outs[3], outs[4], outs[1], g_lp, g_kl, grad,
                                                 *strides, 0, 1.0, HAS_REF=True, **c),  # COL0 = 0, 1/T = 1
        }
        moved = {"fwd": 2 * n * v * 2, "fwd_blockwise": 2 * n * v * 2, "bwd": 3 * n * v * 2}
        launches["fwd"](K._launch_config(v, backward=False))  # lse_p, lse_q, kl for the backward
        for (name, launch), c in itertools.product(launches.items(), configs):
            if c["BLOCK_V"] > triton.next_power_of_2(v):
                continue
            try:
                ms = time_ms(lambda: launch(c))
            except Exception as e:  # out of resources: report and go on
                print(f"{name} {c}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append(dict(size=f"{n} x {v}", kernel=name, **c, ms=ms, tbs=moved[name] / (ms * 1e-3) / 1e12))
            print(f"{rows[-1]['size']} {name:14s} {c} {ms:8.3f} ms {rows[-1]['tbs']:.2f} TB/s", flush=True)
        del x, y, grad
        if device == "cuda":
            torch.cuda.empty_cache()

    date = datetime.date.today().isoformat()
    lines = [f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}; copy bandwidth "
             f"{bw / 1e12:.2f} TB/s; {date}", f"Command: python bench/sweep_kernels.py --sizes {args.sizes}", "",
             "| N x V (bf16) | kernel | BLOCK_V | warps | stages | ms | TB/s | % of copy bandwidth |",
             "|---|---|---|---|---|---|---|---|"]
    for key, group in itertools.groupby(rows, key=lambda r: (r["size"], r["kernel"])):
        for r in sorted(group, key=lambda r: r["ms"])[:5]:
            lines.append(f"| {r['size']} | {r['kernel']} | {r['BLOCK_V']} | {r['num_warps']} | {r['num_stages']} "
                         f"| {r['ms']:.3f} | {r['tbs']:.2f} | {100 * r['tbs'] * 1e12 / bw:.0f}% |")
    table = "\n".join(lines)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sweep-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}-{date}.md"
    path.write_text(table + "\n")
    print(table)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
