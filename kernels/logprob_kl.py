r"""Fused sampled-token log-prob and exact full-vocabulary KL, forward and backward.

For one row of logits z (policy) and r (reference) over a vocabulary of V words, temperature T:

    x = z / T,  y = r / T
    lse_p = log sum_w exp(x_w),  lse_q = log sum_w exp(y_w)
    logp   = x_t - lse_p                                   (sampled token t)
    KL     = sum_w p_w (log p_w - log q_w) = E_p[x - y] - (lse_p - lse_q)
    H      = -sum_w p_w log p_w = lse_p - E_p[x]          (logged, no gradient)

Gradient w.r.t. the policy logits, for upstream gradients g_lp and g_kl of one row:

    dL/dz_w = ( g_lp (1[w = t] - p_w) + g_kl p_w (log p_w - log q_w - KL) ) / T

The reference logits never receive a gradient.

Forward, one pass over the row (one Triton program per row): an online log-sum-exp over blocks of
the vocabulary for both x and y at once. Each lane of the block keeps its own running maximum m
and running sums, rescaled whenever its m grows:

    m' = max(m, x),  s' = s e^{m - m'} + e^{x - m'},
    a' = a e^{m - m'} + e^{x - m'} (x - y),  b' = b e^{m - m'} + e^{x - m'} x,

and the lanes are combined once at the end (M = max_lanes m, S = sum_lanes s e^{m - M}, ...), so
that lse_p = M + log S, E_p[x - y] = A / S, E_p[x] = B / S. No reduction across threads happens
inside the loop, and one of e^{m - m'}, e^{x - m'} is always e^0 = 1, so each element costs a
single exponential: e^{-|x - m|}. The same recurrence gives lse_q. Only O(1) numbers per row are
saved for the backward pass, which reads z and r once more and writes the gradient: 5 N V element
transfers in all, the memory-traffic floor.

Entries may be -inf (a masked vocabulary) as long as each row has a finite entry; a word with
p_w = 0 contributes nothing (0 log 0 = 0). Mask with -inf, not torch.finfo(dtype).min: a row of
only finfo.min has lse = min + log V, which float32 rounds to min (as torch.logsumexp does).
Where q_w = 0 but p_w > 0 the KL is +inf, as it should be. Targets outside [0, V) (e.g. -100)
are ignored: logp = 0 there and no gradient flows through it, as with `ignore_index` in
`torch.nn.functional.cross_entropy`.

Accumulation is float32 whatever the input dtype. CPU tensors use `_torch_forward` /
`_torch_backward`, the same math in plain PyTorch over chunks of rows (bounded memory); CUDA
tensors use the Triton kernels below. With TRITON_INTERPRET=1 set before import, the Triton
kernels also run on CPU tensors (`impl="triton"`), which is how the tests check them without a GPU.
"""
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only machines; the torch path needs none of it
    triton = None

_CHUNK_ELEMENTS = 1 << 24  # torch path: rows per chunk so that one chunk is ~64 MB of float32


class LogProbKL(NamedTuple):
    logp: torch.Tensor  # [...] log p(target), float32, differentiable
    kl: torch.Tensor  # [...] KL(p || q), float32, differentiable (zeros without ref_logits)
    entropy: torch.Tensor  # [...] H(p), float32, detached


# ----------------------------------------------------------------------------- torch reference


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 for every input dtype; float64 inputs keep float64 so gradcheck can run on this path
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _torch_forward(x, y, targets, inv_temp):
    """x, y: [N, V] (y may be None); targets [N]. Returns logp, kl, entropy, lse_p, lse_q: [N]."""
    n, v = x.shape
    acc = _acc_dtype(x)
    outs = [torch.empty(n, dtype=acc, device=x.device) for _ in range(5)]
    logp, kl, ent, lse_p, lse_q = outs
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for i in range(0, n, rows):
        xs = x[i : i + rows].to(acc) * inv_temp
        lp = torch.logsumexp(xs, dim=-1)
        logp_all = xs - lp[:, None]
        p = logp_all.exp()
        live = p > 0  # 0 log 0 = 0
        t = targets[i : i + rows]
        valid = (t >= 0) & (t < v)
        picked = logp_all.gather(1, t.clamp(0, v - 1)[:, None]).squeeze(1)
        logp[i : i + rows] = torch.where(valid, picked, torch.zeros_like(picked))
        ent[i : i + rows] = -(p * torch.where(live, logp_all, 0.0)).sum(-1)
        lse_p[i : i + rows] = lp
        if y is None:
            kl[i : i + rows] = 0.0
            lse_q[i : i + rows] = 0.0
        else:
            ys = y[i : i + rows].to(acc) * inv_temp
            lq = torch.logsumexp(ys, dim=-1)
            diff = logp_all - (ys - lq[:, None])
            kl[i : i + rows] = (p * torch.where(live, diff, 0.0)).sum(-1)
            lse_q[i : i + rows] = lq
    return logp, kl, ent, lse_p, lse_q


def _torch_backward(x, y, targets, inv_temp, lse_p, lse_q, kl, g_lp, g_kl, grad):
    """Writes dL/dz into grad [N, V] (dtype of x), chunk by chunk."""
    n, v = x.shape
    acc = _acc_dtype(x)
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for i in range(0, n, rows):
        t = targets[i : i + rows]
        valid = (t >= 0) & (t < v)
        glp = torch.where(valid, g_lp[i : i + rows], 0.0)  # an ignored target's logp is a constant
        xs = x[i : i + rows].to(acc) * inv_temp
        logp_all = xs - lse_p[i : i + rows, None]
        p = logp_all.exp()
        g = -glp[:, None] * p
        if y is not None:
            logq_all = y[i : i + rows].to(acc) * inv_temp - lse_q[i : i + rows, None]
            shaped = p * (logp_all - logq_all - kl[i : i + rows, None])
            g = g + g_kl[i : i + rows, None] * torch.where(p > 0, shaped, 0.0)
        g.scatter_add_(1, t.clamp(0, v - 1)[:, None], glp[:, None])
        grad[i : i + rows] = (g * inv_temp).to(grad.dtype)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _online_update(m, x):
        """One step of the per-lane online log-sum-exp; returns (m', e^{m-m'}, e^{x-m'})."""
        grew = x > m
        t = tl.exp(-tl.abs(x - m))  # one exponential: the other factor is e^0 = 1
        return tl.maximum(m, x), tl.where(grew, t, 1.0), tl.where(grew, 1.0, t)

    @triton.jit
    def _fwd_kernel(
        X, Y, TGT, LOGP, KL, ENT, LSE_P, LSE_Q,
        R1, sx0, sx1, sy0, sy1, V, inv_temp,
        HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + (row // R1) * sx0 + (row % R1) * sx1
        y_row = Y + (row // R1) * sy0 + (row % R1) * sy1
        cols = tl.arange(0, BLOCK_V)
        # per-lane running state; maxima start finite so that -inf entries give no NaN (e^{-inf} = 0)
        m_x = tl.full([BLOCK_V], -1.0e30, tl.float32)
        s_x = tl.zeros([BLOCK_V], tl.float32)
        a = tl.zeros([BLOCK_V], tl.float32)  # sum e^{x-m} (x - y)
        b = tl.zeros([BLOCK_V], tl.float32)  # sum e^{x-m} x
        m_y = tl.full([BLOCK_V], -1.0e30, tl.float32)
        s_y = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            m_x, scale, e = _online_update(m_x, x)
            live = e > 0  # skips 0 * (-inf) = NaN for masked words
            s_x = s_x * scale + e
            b = b * scale + tl.where(live, e * x, 0.0)
            if HAS_REF:
                y = tl.load(y_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                a = a * scale + tl.where(live, e * (x - y), 0.0)
                m_y, scale_y, e_y = _online_update(m_y, y)
                s_y = s_y * scale_y + e_y
        # combine the lanes
        m = tl.max(m_x, 0)
        w = tl.exp(m_x - m)
        s_tot = tl.sum(s_x * w, 0)
        lse_p = m + tl.log(s_tot)
        t = tl.load(TGT + row)
        valid = (t >= 0) & (t < V)
        x_t = tl.load(x_row + t, mask=valid, other=0.0).to(tl.float32) * inv_temp
        tl.store(LOGP + row, tl.where(valid, x_t - lse_p, 0.0))
        tl.store(ENT + row, lse_p - tl.sum(b * w, 0) / s_tot)
        tl.store(LSE_P + row, lse_p)
        if HAS_REF:
            my = tl.max(m_y, 0)
            lse_q = my + tl.log(tl.sum(s_y * tl.exp(m_y - my), 0))
            tl.store(KL + row, tl.sum(a * w, 0) / s_tot - (lse_p - lse_q))
            tl.store(LSE_Q + row, lse_q)
        else:
            tl.store(KL + row, 0.0)
            tl.store(LSE_Q + row, 0.0)

    @triton.jit
    def _bwd_kernel(
        X, Y, TGT, LSE_P, LSE_Q, KL, G_LP, G_KL, GRAD,
        R1, sx0, sx1, sy0, sy1, V, inv_temp,
        HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = X + (row // R1) * sx0 + (row % R1) * sx1
        y_row = Y + (row // R1) * sy0 + (row % R1) * sy1
        g_row = GRAD + row * V
        cols = tl.arange(0, BLOCK_V)
        lse_p = tl.load(LSE_P + row)
        t = tl.load(TGT + row)
        g_lp = tl.where((t >= 0) & (t < V), tl.load(G_LP + row), 0.0)  # ignored target: logp is constant
        if HAS_REF:
            lse_q = tl.load(LSE_Q + row)
            kl = tl.load(KL + row)
            g_kl = tl.load(G_KL + row)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            x = tl.load(x_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            logp = x - lse_p
            p = tl.exp(logp)
            g = tl.where(idx == t, g_lp, 0.0) - g_lp * p
            if HAS_REF:
                y = tl.load(y_row + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                g += g_kl * tl.where(p > 0, p * (logp - (y - lse_q) - kl), 0.0)
            tl.store(g_row + idx, (g * inv_temp).to(GRAD.dtype.element_ty), mask=mask)


def _launch_config(v: int, backward: bool) -> dict:
    """Block size and warps of each kernel, from `python bench/sweep_kernels.py` on an H100
    (bench/results/sweep-*.md). The forward keeps six running values per lane, so it wants few
    words per thread (1024 words, 8 warps: 83% of the copy bandwidth at 16384 x 151936); the
    backward keeps none and streams (8192 words, 8 warps: 97%)."""
    block = min(triton.next_power_of_2(max(v, 1)), 8192 if backward else 1024)
    return dict(BLOCK_V=block, num_warps=8 if block >= 1024 else 4, num_stages=1)


# ----------------------------------------------------------------------------- autograd wrapper


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [R0, R1, V] view with unit stride on V (copies only when it must)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t[None, None]
    if t.dim() == 2:
        return t[None]
    return t.reshape(-1, t.shape[-2], t.shape[-1])


class _FusedLogProbKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, targets, temperature, use_triton):
        x3 = _as_3d(logits)
        y3 = _as_3d(ref_logits) if ref_logits is not None else None
        r0, r1, v = x3.shape
        tgt = targets.reshape(-1).to(torch.int64).contiguous()
        inv_temp = 1.0 / float(temperature)
        if use_triton:
            n = r0 * r1
            out = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(5)]
            yy = y3 if y3 is not None else x3
            if n > 0:
                _fwd_kernel[(n,)](
                    x3, yy, tgt, *out, r1, x3.stride(0), x3.stride(1), yy.stride(0), yy.stride(1),
                    v, inv_temp, HAS_REF=y3 is not None, **_launch_config(v, backward=False),
                )
            logp, kl, ent, lse_p, lse_q = out
        else:
            x2 = x3.reshape(-1, v)  # CPU: a copy here is acceptable only for exotic strides
            y2 = y3.reshape(-1, v) if y3 is not None else None
            logp, kl, ent, lse_p, lse_q = _torch_forward(x2, y2, tgt, inv_temp)
        ctx.save_for_backward(logits, ref_logits, tgt, lse_p, lse_q, kl)
        ctx.inv_temp, ctx.use_triton = inv_temp, use_triton
        shape = targets.shape
        logp, kl, ent = logp.view(shape), kl.view(shape), ent.view(shape)
        ctx.mark_non_differentiable(ent)
        return logp, kl, ent

    @staticmethod
    def backward(ctx, g_logp, g_kl, _g_ent):
        logits, ref_logits, tgt, lse_p, lse_q, kl = ctx.saved_tensors
        n = tgt.numel()
        acc = lse_p.dtype
        zeros = torch.zeros(n, dtype=acc, device=logits.device)
        g_lp = g_logp.reshape(-1).to(acc).contiguous() if g_logp is not None else zeros
        g_kl = g_kl.reshape(-1).to(acc).contiguous() if g_kl is not None else zeros
        x3 = _as_3d(logits)
        y3 = _as_3d(ref_logits) if ref_logits is not None else None
        r0, r1, v = x3.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if ctx.use_triton:
            yy = y3 if y3 is not None else x3
            if n > 0:
                _bwd_kernel[(n,)](
                    x3, yy, tgt, lse_p, lse_q, kl, g_lp, g_kl, grad,
                    r1, x3.stride(0), x3.stride(1), yy.stride(0), yy.stride(1), v, ctx.inv_temp,
                    HAS_REF=y3 is not None, **_launch_config(v, backward=True),
                )
        else:
            y2 = y3.reshape(-1, v) if y3 is not None else None
            _torch_backward(
                x3.reshape(-1, v), y2, tgt, ctx.inv_temp, lse_p, lse_q, kl, g_lp, g_kl, grad.view(-1, v)
            )
        return grad, None, None, None, None


def _use_triton(logits: torch.Tensor, impl: str) -> bool:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f'impl must be "auto", "triton" or "torch", got {impl!r}')
    if impl == "torch" or (impl == "auto" and not logits.is_cuda):
        return False
    if triton is None:
        raise RuntimeError("the Triton path needs the `triton` package: pip install triton")
    return True


def fused_logprob_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    impl: str = "auto",
) -> LogProbKL:
    """log softmax(logits/T)[targets], KL(softmax(logits/T) || softmax(ref_logits/T)) and the
    entropy, per row of [..., V]; see the module docstring. `impl`: "auto" (Triton for CUDA
    tensors, torch otherwise), "triton" or "torch"."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    use_triton = _use_triton(logits, impl)
    logp, kl, ent = _FusedLogProbKL.apply(logits, ref_logits.detach(), targets, temperature, use_triton)
    return LogProbKL(logp, kl, ent)


def fused_logprob(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, impl: str = "auto"
) -> torch.Tensor:
    """log softmax(logits/T)[targets] per row of [..., V], float32, differentiable."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    use_triton = _use_triton(logits, impl)
    return _FusedLogProbKL.apply(logits, None, targets, temperature, use_triton)[0]
