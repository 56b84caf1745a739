r"""Fused sampled-token log-prob and exact full-vocabulary KL, forward and backward.

For one row of logits z (policy) and r (reference) over a vocabulary of V words, temperature T:

    x = z / T,  y = r / T
    lse_p = log sum_w exp(x_w),  lse_q = log sum_w exp(y_w),  d = lse_p - lse_q
    logp     = x_t - lse_p                                 (sampled token t)
    ref_logp = y_t - lse_q                                 (the reference's, no gradient)
    KL       = sum_w p_w (log p_w - log q_w) = E_p[x - y] - d
    H        = -sum_w p_w log p_w = lse_p - E_p[x]        (logged, no gradient)

d is not taken as the difference of the two log-sum-exps: each is ~10 and carries a float32 error
of ~1e-6, which would be the noise floor of every KL (a policy a few steps from its reference has
KL ~1e-6 or less). Instead, with q'_w = e^{y_w - lse_p} (so sum_w q'_w = e^{-d}):

    d = -log(1 + C),   C = sum_w (q'_w - p_w),   q'_w - p_w = p_w expm1(y_w - x_w)   (p_w > 0)

Every term is of the size of x - y and is computed without cancellation (expm1; log1p through a
short atanh series, since GPU logarithms are approximate near 1), so KL is accurate to float32
relative to |x - y|, not to |lse|. Where this cannot help (|C| > 1/2: the distributions are far
apart and KL is large; or an exponent had to be clipped at _ARG_MAX), d = lse_p - lse_q.

Gradient w.r.t. the policy logits, for upstream gradients g_lp and g_kl of one row:

    dL/dz_w = ( g_lp (1[w = t] - p_w) + g_kl p_w ((x_w - y_w) - d - KL) ) / T

The reference logits never receive a gradient. The gradient of word w needs only z_w, r_w and
three numbers per row saved by the forward (lse_p, d, KL), so the backward can visit the
vocabulary in any order or in column blocks (kernels/linear_logprob_kl.py does). When the loss
does not use the KL (k1/k3 estimators read logp and ref_logp only), autograd passes g_kl = None
and the backward does not read the reference logits at all. The backward is not differentiable
itself: a second derivative raises instead of returning a silent wrong value.

Forward, one pass over the row (one Triton program per row): an online log-sum-exp over blocks of
the vocabulary for both x and y at once. Each lane of the block keeps its own running maximum m
and running sums, rescaled whenever its m grows:

    m' = max(m, x),  s' = s e^{m - m'} + e^{x - m'},
    a' = a e^{m - m'} + e^{x - m'} (x - y),  b' = b e^{m - m'} + e^{x - m'} x,
    c' = c e^{m - m'} + e^{x - m'} expm1(y - x)     (e^{y - m'} where e^{x - m'} = 0),

and the lanes are combined once at the end (M = max_lanes m, S = sum_lanes s e^{m - M}, ...), so
that lse_p = M + log S, E_p[x - y] = A / S, E_p[x] = B / S, C = C_lanes / S. No reduction across
threads happens inside the loop, and one of e^{m - m'}, e^{x - m'} is always e^0 = 1, so the
online update costs a single exponential: e^{-|x - m|}; the same recurrence gives lse_q, and c
costs one more. Only O(1) numbers per row are saved for the backward pass, which reads z and r
once more and writes the gradient: 5 N V element transfers in all, the memory-traffic floor.

Masked vocabulary. Entries may be -inf as long as each row has a finite entry; a word with
p_w = 0 contributes nothing (0 log 0 = 0). Mask with -inf, not torch.finfo(dtype).min: a row of
only finfo.min has lse = min + log V, which float32 rounds to min (as torch.logsumexp does).
A reference -inf where the policy is finite (q_w = 0 < p_w) makes KL = +inf, even where p_w is so
small that float32 rounds it to 0: the rule is decided on finiteness, not on the rounded p_w.
Such words are counted apart from the sum a (an infinite a would turn into inf * 0 = NaN when its
lane is rescaled by an underflowing e^{m - m'}, or weighted by e^{m - M} = 0 at the end), and the
row's KL is set to +inf. Callers mask both logits the same way; a row with KL = +inf and g_kl = 0
(a masked-out position) gets a finite gradient, with g_kl != 0 its gradient is NaN.

Targets: negative targets (e.g. -100) are ignored: logp = ref_logp = 0 there and no gradient
flows through them, as with `ignore_index` in `torch.nn.functional.cross_entropy`. A target >= V
is an error (checking it costs one device synchronisation per call). Temperature must be > 0.

Accumulation is float32 whatever the input dtype. CPU tensors use `_torch_forward` /
`_torch_backward`, the same math in plain PyTorch over chunks of rows (bounded memory; sliced
inputs such as logits[:, :-1] are read through views, chunk by chunk, never copied whole); CUDA
tensors use the Triton kernels below. With TRITON_INTERPRET=1 set before import, the Triton
kernels also run on CPU tensors (`impl="triton"`), which is how the tests check them without a GPU.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional on CPU-only machines; the torch path needs none of it
    triton = None

_CHUNK_ELEMENTS = 1 << 24  # torch path: rows per chunk so that one chunk is ~64 MB of float32
_ARG_MAX = 60.0  # exponents in the sum for d are clipped here (e^60 * 2^18 words < float32 max)


class LogProbKL(NamedTuple):
    logp: torch.Tensor  # [...] log p(target), float32, differentiable
    kl: torch.Tensor  # [...] KL(p || q), float32, differentiable (zeros without ref_logits)
    entropy: torch.Tensor  # [...] H(p), float32, detached
    ref_logp: torch.Tensor  # [...] log q(target), float32, detached (for k1/k3: logp - ref_logp)


# ----------------------------------------------------------------------------- checks


def _check_temperature(temperature: float) -> float:
    if not (0.0 < float(temperature) < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def _check_targets(targets: torch.Tensor, v: int) -> torch.Tensor:
    """[...] integer targets -> flat int64 [N]; a target >= V is an error, negative ones are ignored."""
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.numel() and int(targets.max()) >= v:
        raise ValueError(f"targets must be < V = {v} (the vocabulary size), got {int(targets.max())}; "
                         "mark positions to ignore with a negative target such as -100")
    return targets.reshape(-1).to(torch.int64).contiguous()


# ----------------------------------------------------------------------------- torch reference


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 for every input dtype; float64 inputs keep float64 so gradcheck can run on this path
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_blocks(t3: Optional[torch.Tensor], rows: int):
    """Yield (first row, [n, V] block) over the rows of a [R0, R1, V] view, n <= rows. Blocks are
    views when they lie inside one leading index; several leading indices are merged by reshape,
    which copies at most one block (never the whole tensor) when the view is strided (logits[:, :-1])."""
    if t3 is None:
        while True:
            yield None, None
    r0, r1, v = t3.shape
    if r0 * r1 == 0:
        return
    if r1 >= rows:
        for a in range(r0):
            for b in range(0, r1, rows):
                yield a * r1 + b, t3[a, b : b + rows]
    else:
        k = rows // r1
        for a in range(0, r0, k):
            yield a * r1, t3[a : a + k].reshape(-1, v)


def _torch_forward(x3, y3, targets, inv_temp):
    """x3, y3: [R0, R1, V] (y3 may be None); targets [N]. Returns logp, kl, entropy, lse_p,
    d_pq = lse_p - lse_q, ref_logp: [N]."""
    r0, r1, v = x3.shape
    acc = _acc_dtype(x3)
    logp, kl, ent, lse_p, d_pq, ref_logp = [torch.zeros(r0 * r1, dtype=acc, device=x3.device) for _ in range(6)]
    rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    for (i, xb), (_, yb) in zip(_row_blocks(x3, rows), _row_blocks(y3, rows)):
        j = i + xb.shape[0]
        xs = xb.to(acc) * inv_temp
        lp = torch.logsumexp(xs, dim=-1)
        logp_all = xs - lp[:, None]
        p = logp_all.exp()
        live = p > 0  # 0 log 0 = 0
        t = targets[i:j]
        valid = t >= 0
        idx = t.clamp(min=0)[:, None]
        logp[i:j] = torch.where(valid, logp_all.gather(1, idx).squeeze(1), 0.0)
        ent[i:j] = -(p * torch.where(live, logp_all, 0.0)).sum(-1)
        lse_p[i:j] = lp
        if yb is not None:
            ys = yb.to(acc) * inv_temp
            allowed = ys > -math.inf
            e_delta = (p * torch.where(live & allowed, xs - ys, 0.0)).sum(-1)  # E_p[x - y]
            # sum_w (q'_w - p_w), q'_w = e^{y_w - lse_p}: p_w expm1(y_w - x_w), or q'_w where p_w = 0
            arg = torch.where(live, ys - xs, ys - lp[:, None])
            clamped = (arg > _ARG_MAX).any(-1)
            arg = arg.clamp(max=_ARG_MAX)
            c = torch.where(live, p * torch.expm1(arg), arg.exp()).sum(-1)
            plain = lp - torch.logsumexp(ys, dim=-1)
            d = torch.where(~clamped & (c.abs() <= 0.5), -torch.log1p(c.clamp(-0.5, 0.5)), plain)
            forbidden = ((xs > -math.inf) & ~allowed).any(-1)  # q_w = 0 < p_w: KL = +inf
            kl[i:j] = torch.where(forbidden, math.inf, e_delta - d)
            d_pq[i:j] = d
            y_t = ys.gather(1, idx).squeeze(1)
            ref_logp[i:j] = torch.where(valid, y_t - (lp - d), 0.0)
    return logp, kl, ent, lse_p, d_pq, ref_logp


def _torch_backward(x3, y3, targets, inv_temp, lse_p, d_pq, kl, g_lp, g_kl, grad, col0):
    """Writes dL/dz into grad [N, Vb] (any float dtype), chunk by chunk of rows. x3, y3 are
    [R0, R1, Vb] (y3 None: no KL term); col0 is the vocabulary index of their first column;
    g_lp is already zero at ignored targets."""
    r0, r1, vb = x3.shape
    acc = _acc_dtype(x3)
    rows = max(1, _CHUNK_ELEMENTS // max(vb, 1))
    for (i, xb), (_, yb) in zip(_row_blocks(x3, rows), _row_blocks(y3, rows)):
        j = i + xb.shape[0]
        xs = xb.to(acc) * inv_temp
        logp_all = xs - lse_p[i:j, None]
        p = logp_all.exp()
        g = -g_lp[i:j, None] * p
        if yb is not None:
            ys = yb.to(acc) * inv_temp
            gk = g_kl[i:j, None]
            # log p_w - log q_w - KL = (x_w - y_w) - d - KL; g_kl = 0 (a masked position)
            # contributes nothing even where KL = +inf
            shaped = p * ((xs - ys) - d_pq[i:j, None] - kl[i:j, None])
            g = g + torch.where((p > 0) & (gk != 0), gk * shaped, 0.0)
        hit = targets[i:j] - col0
        inside = (hit >= 0) & (hit < vb)
        g.scatter_add_(1, hit.clamp(0, vb - 1)[:, None], torch.where(inside, g_lp[i:j], 0.0)[:, None])
        grad[i:j] = (g * inv_temp).to(grad.dtype)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    _TL_ARG_MAX = tl.constexpr(_ARG_MAX)

    @triton.jit
    def _online_update(m, x):
        """One step of the per-lane online log-sum-exp; returns (m', e^{m-m'}, e^{x-m'})."""
        grew = x > m
        t = tl.exp(-tl.abs(x - m))  # one exponential: the other factor is e^0 = 1
        return tl.maximum(m, x), tl.where(grew, t, 1.0), tl.where(grew, 1.0, t)

    @triton.jit
    def _expm1(u):
        """e^u - 1 without cancellation near 0: Taylor to u^6 below |u| = 1/4 (relative error < 1e-7)."""
        small = u * (1.0 + u * (0.5 + u * (1.0 / 6 + u * (1.0 / 24 + u * (1.0 / 120 + u * (1.0 / 720))))))
        return tl.where(tl.abs(u) < 0.25, small, tl.exp(u) - 1.0)

    @triton.jit
    def _log1p_small(c):
        """log(1 + c) for |c| <= 1/2 without cancellation (GPU logarithms are approximate near 1):
        2 atanh(s) with s = c / (2 + c), |s| <= 1/3, series to s^15 (relative error < 1e-8)."""
        s = c / (2.0 + c)
        s2 = s * s
        series = 1.0 / 13 + s2 * (1.0 / 15)
        series = 1.0 / 11 + s2 * series
        series = 1.0 / 9 + s2 * series
        series = 1.0 / 7 + s2 * series
        series = 1.0 / 5 + s2 * series
        series = 1.0 / 3 + s2 * series
        return 2.0 * s * (1.0 + s2 * series)

    @triton.jit
    def _fwd_kernel(
        X, Y, TGT, LOGP, KL, ENT, LSE_P, D_PQ, REF_LOGP,
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
        a = tl.zeros([BLOCK_V], tl.float32)  # sum e^{x-m} (x - y) over words the reference allows
        b = tl.zeros([BLOCK_V], tl.float32)  # sum e^{x-m} x
        forbidden = tl.zeros([BLOCK_V], tl.int32)  # saw x finite where y = -inf: KL = +inf
        c = tl.zeros([BLOCK_V], tl.float32)  # sum (q'_w - p_w) e^{lse_p - m}, q'_w = e^{y_w - lse_p}
        clamped = tl.zeros([BLOCK_V], tl.int32)  # an exponent of c was clipped: use the plain d
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
                allowed = y > float("-inf")
                # an infinite term would make a lane's a = inf, and inf * e^{m-m'} = NaN once that
                # rescaling factor underflows to 0: count such words apart instead
                a = a * scale + tl.where(live & allowed, e * (x - y), 0.0)
                forbidden = forbidden | ((x > float("-inf")) & (y == float("-inf"))).to(tl.int32)
                # q'_w - p_w: e^{x-m'} expm1(y - x) where the policy has mass, e^{y-m'} where it has none
                arg = tl.where(live, y - x, y - m_x)
                clamped = clamped | (arg > _TL_ARG_MAX).to(tl.int32)
                arg = tl.minimum(arg, _TL_ARG_MAX)
                ex = tl.exp(arg)  # one exponential serves both cases
                em1 = tl.where(tl.abs(arg) < 0.25, _expm1(arg), ex - 1.0)
                c = c * scale + tl.where(live, e * em1, ex)
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
            plain = lse_p - (my + tl.log(tl.sum(s_y * tl.exp(m_y - my), 0)))
            cs = tl.sum(c * w, 0) / s_tot  # e^{lse_q - lse_p} - 1
            precise = (tl.max(clamped, 0) == 0) & (tl.abs(cs) <= 0.5)
            d = tl.where(precise, -_log1p_small(tl.minimum(tl.maximum(cs, -0.5), 0.5)), plain)
            kl = tl.sum(a * w, 0) / s_tot - d
            tl.store(KL + row, tl.where(tl.max(forbidden, 0) > 0, float("inf"), kl))
            tl.store(D_PQ + row, d)
            y_t = tl.load(y_row + t, mask=valid, other=0.0).to(tl.float32) * inv_temp
            tl.store(REF_LOGP + row, tl.where(valid, y_t - (lse_p - d), 0.0))
        else:
            tl.store(KL + row, 0.0)
            tl.store(D_PQ + row, 0.0)
            tl.store(REF_LOGP + row, 0.0)

    @triton.jit
    def _bwd_kernel(
        X, Y, TGT, LSE_P, D_PQ, KL, G_LP, G_KL, GRAD,
        R1, sx0, sx1, sy0, sy1, V, COL0, inv_temp,
        HAS_REF: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """dL/dz of columns [COL0, COL0 + V) of each row into GRAD (contiguous [N, V]). GRAD may
        be Y itself: each element is read before it is written, by the same lane."""
        row = tl.program_id(0).to(tl.int64)
        x_row = X + (row // R1) * sx0 + (row % R1) * sx1
        y_row = Y + (row // R1) * sy0 + (row % R1) * sy1
        g_row = GRAD + row * V
        cols = tl.arange(0, BLOCK_V)
        lse_p = tl.load(LSE_P + row)
        t = tl.load(TGT + row) - COL0
        g_lp = tl.load(G_LP + row)  # zero at an ignored target (the wrapper sees to it)
        if HAS_REF:
            d = tl.load(D_PQ + row)
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
                # g_kl = 0 (a masked position) contributes nothing even where KL = +inf
                shaped = tl.where(p > 0, p * ((x - y) - d - kl), 0.0)  # log p - log q - KL
                g += tl.where(g_kl != 0.0, g_kl * shaped, 0.0)
            tl.store(g_row + idx, (g * inv_temp).to(GRAD.dtype.element_ty), mask=mask)


def _launch_config(v: int, backward: bool) -> dict:
    """Block size and warps of each kernel, from `python bench/sweep_kernels.py` on an H100
    (bench/results/sweep-*.md). The forward keeps six running values per lane, so it wants few
    words per thread (1024 words, 8 warps: 83% of the copy bandwidth at 16384 x 151936); the
    backward keeps none and streams (8192 words, 8 warps: 97%)."""
    block = min(triton.next_power_of_2(max(v, 1)), 8192 if backward else 1024)
    return dict(BLOCK_V=block, num_warps=8 if block >= 1024 else 4, num_stages=1)


# ----------------------------------------------------------------------------- both paths


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [R0, R1, V] view with unit stride on V (copies only when it must)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t[None, None]
    if t.dim() == 2:
        return t[None]
    return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1])  # no -1: [B, 0, V] is ambiguous


def _forward_stats(x3, y3, tgt, inv_temp, use_triton):
    """logp, kl, entropy, lse_p, d_pq = lse_p - lse_q, ref_logp, each [N], of the rows of [R0, R1, V] views."""
    if not use_triton:
        return _torch_forward(x3, y3, tgt, inv_temp)
    r0, r1, v = x3.shape
    n = r0 * r1
    out = [torch.empty(n, dtype=torch.float32, device=x3.device) for _ in range(6)]
    logp, kl, ent, lse_p, d_pq, ref_logp = out
    yy = y3 if y3 is not None else x3
    if n > 0:
        _fwd_kernel[(n,)](
            x3, yy, tgt, logp, kl, ent, lse_p, d_pq, ref_logp, r1, x3.stride(0), x3.stride(1),
            yy.stride(0), yy.stride(1), v, inv_temp, HAS_REF=y3 is not None, **_launch_config(v, backward=False),
        )
    return logp, kl, ent, lse_p, d_pq, ref_logp


def _backward_into(grad, x3, y3, tgt, inv_temp, lse_p, d_pq, kl, g_lp, g_kl, col0, use_triton):
    """dL/dz of the columns [col0, col0 + Vb) into grad [N, Vb] (contiguous); y3 None (or g_kl
    None) drops the KL term and the reference is not read."""
    if g_kl is None:
        y3 = None
    if not use_triton:
        return _torch_backward(x3, y3, tgt, inv_temp, lse_p, d_pq, kl, g_lp, g_kl, grad, col0)
    r0, r1, vb = x3.shape
    yy = y3 if y3 is not None else x3
    if r0 * r1 > 0:
        _bwd_kernel[(r0 * r1,)](
            x3, yy, tgt, lse_p, d_pq, kl, g_lp, g_kl if g_kl is not None else g_lp, grad,
            r1, x3.stride(0), x3.stride(1), yy.stride(0), yy.stride(1), vb, col0, inv_temp,
            HAS_REF=y3 is not None, **_launch_config(vb, backward=True),
        )


def _upstream(g: Optional[torch.Tensor], tgt: torch.Tensor, ignored_to_zero: bool) -> Optional[torch.Tensor]:
    """Upstream gradient [...] -> float32 [N] (None stays None: that output is not in the loss)."""
    if g is None:
        return None
    g = g.reshape(-1).to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    return (torch.where(tgt >= 0, g, 0.0) if ignored_to_zero else g).contiguous()


# ----------------------------------------------------------------------------- autograd wrapper


class _FusedLogProbKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, tgt, inv_temp, use_triton):
        ctx.set_materialize_grads(False)  # an output not in the loss arrives as None, not zeros
        x3 = _as_3d(logits)
        y3 = _as_3d(ref_logits) if ref_logits is not None else None
        logp, kl, ent, lse_p, d_pq, ref_logp = _forward_stats(x3, y3, tgt, inv_temp, use_triton)
        ctx.save_for_backward(logits, ref_logits, tgt, lse_p, d_pq, kl)
        ctx.inv_temp, ctx.use_triton = inv_temp, use_triton
        ctx.mark_non_differentiable(ent, ref_logp)
        return logp, kl, ent, ref_logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_kl, _g_ent, _g_ref_logp):
        logits, ref_logits, tgt, lse_p, d_pq, kl = ctx.saved_tensors
        if g_logp is None and g_kl is None:
            return None, None, None, None, None
        g_lp = _upstream(g_logp, tgt, ignored_to_zero=True)
        if g_lp is None:
            g_lp = torch.zeros_like(lse_p)
        g_kl = _upstream(g_kl, tgt, ignored_to_zero=False) if ref_logits is not None else None
        x3 = _as_3d(logits)
        y3 = _as_3d(ref_logits) if g_kl is not None else None  # k1/k3: the reference is not read
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        _backward_into(grad.view(-1, x3.shape[-1]), x3, y3, tgt, ctx.inv_temp, lse_p, d_pq, kl, g_lp, g_kl,
                       0, ctx.use_triton)
        return grad, None, None, None, None


def _use_triton(t: torch.Tensor, impl: str) -> bool:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f'impl must be "auto", "triton" or "torch", got {impl!r}')
    if impl == "torch" or (impl == "auto" and not t.is_cuda):
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
    """log softmax(logits/T)[targets], KL(softmax(logits/T) || softmax(ref_logits/T)), the entropy
    and the reference's log softmax(ref_logits/T)[targets], per row of [..., V]; see the module
    docstring. `impl`: "auto" (Triton for CUDA tensors, torch otherwise), "triton" or "torch"."""
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    inv_temp = _check_temperature(temperature)
    tgt = _check_targets(targets, logits.shape[-1])
    use_triton = _use_triton(logits, impl)
    outs = _FusedLogProbKL.apply(logits, ref_logits.detach(), tgt, inv_temp, use_triton)
    return LogProbKL(*(o.view(targets.shape) for o in outs))


def fused_logprob(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, impl: str = "auto"
) -> torch.Tensor:
    """log softmax(logits/T)[targets] per row of [..., V], float32, differentiable."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be logits.shape[:-1] = {tuple(logits.shape[:-1])}")
    inv_temp = _check_temperature(temperature)
    tgt = _check_targets(targets, logits.shape[-1])
    use_triton = _use_triton(logits, impl)
    return _FusedLogProbKL.apply(logits, None, tgt, inv_temp, use_triton)[0].view(targets.shape)
