r"""Log-prob and exact KL straight from final hidden states and LM-head weights (fused linear).

    from kernels import fused_linear_logprob_kl, fused_linear_logprob
    out = fused_linear_logprob_kl(hidden, weight, ref_hidden, ref_weight, targets, temperature=1.0)
    out.logp, out.kl, out.entropy, out.ref_logp     # [...] float32, as kernels.fused_logprob_kl
    logp = fused_linear_logprob(hidden, weight, targets, temperature=1.0)

hidden [..., D] and weight [V, D] are the policy's final hidden states and LM head (tied to the
input embedding or not); ref_hidden [..., D'] and ref_weight [V, D'] the frozen reference's (no
gradient, even when ref_weight is the policy's own weight tensor). Why not logits: (1) precision.
Logits rounded to bf16 carry errors of ~2^-9 |z|, so the KL of a policy a few steps from its
reference (true KL ~1e-6) is rounding noise; here the logits are float32, computed from the
operands as stored with float32 accumulation. (2) Memory: policy logits, reference logits and
their gradient are three [N, V] tensors (15 GB in bf16 at N = 16384, V = 151936); here only
chunks of them exist.

Math, for row i (h_i: hidden state, W: head, s: logit scale, c: soft-cap, T: temperature):

    u_i = W h_i                                     [V], float32
    z_i = s u_i,  or  z_i = c tanh(s u_i / c)       (Cohere: logit_scale; Gemma 2: softcap; s = 1 if unset)
    x_i = z_i / T;  y_i the same from the reference's h'_i, W'
    logp, KL, H, ref_logp of x_i, y_i               (kernels/logprob_kl.py)

Gradient, with g_z = dL/dz from the logprob_kl backward (it includes the 1/T):

    g_u = g_z s (1 - (z / c)^2)       (with a soft-cap: d/du c tanh(s u / c) = s (1 - tanh^2));  g_z s without
    dL/dh_i = sum_w g_u[i, w] W_w     i.e.  dL/dH = g_u W          [N, D]
    dL/dW_w = sum_i g_u[i, w] h_i     i.e.  dL/dW = g_u^T H        [V, D]

Chunking. Forward: rows in chunks of n = chunk_bytes / (4 V): U = H_rows W^T ([n, V] float32) for
policy and reference, then the logprob_kl forward on those rows, which keeps lse_p, d = lse_p - lse_q
and KL (O(N)). Backward: the vocabulary in column blocks of b = chunk_bytes / (4 N) words: recompute
U[:, blk] = H W_blk^T and the reference's (the gradient of word w needs only its own logits and
the row's saved lse_p, d, KL), turn them into g_u[:, blk] with the logprob_kl backward, then

    dL/dW_blk = g_u[:, blk]^T H        one GEMM over all N rows (float32 accumulation inside it), written once
    dL/dH    += g_u[:, blk] W_blk      into an [N, D] float32 accumulator

Column blocks, not row blocks, in the backward: a row loop would add a [V, D] float32 partial
weight gradient per chunk (a V D-sized read-modify-write each time); this way each block of the
weight gradient is produced by one GEMM and only the small [N, D] hidden gradient accumulates.

Precision. The GEMMs see the operands as stored, in the common dtype of hidden and weight: bf16 or
fp16 operands (a bf16 model) give exact products and float32 sums (cuBLAS with a float32 output,
`torch.mm(..., out_dtype=torch.float32)`; on CPU, or on a torch without it, the operands are
upcast to float32, which gives the same products); float32 operands (float32 weights, as under
autocast) give IEEE float32 GEMMs: TF32 is switched off around them (its 10-bit mantissa would
bring the noise back), and autocast is off inside. The price on a GPU: IEEE float32 runs at a small
fraction of bf16 tensor-core speed. Rounding float32 weights to bf16 to go faster (what autocast
does to the LM head) gives float32 logits of the two rounded models: a drift below bf16's
resolution (2^-8 relative) is then lost or quantised, and their KL is noise again (230x off in
bench/bench_fused_linear.py). Nor can any head remove noise already in the hidden states (a bf16
body under autocast). In the backward g_u is computed in float32 and rounded once to the operands'
dtype for the two GEMMs (tensor cores take bf16 operands): a relative rounding of the gradient, as
in any bf16 backward, not the cancellation that rounding logits causes in log p - log q; float32
operands keep it float32. The CPU path rounds at the same places, so the tests check the GPU's
numerics.

Memory beyond inputs and outputs, with C = chunk_bytes (default 256 MiB):
  forward:  2 C (float32 logits of one row chunk, policy and reference; C without a reference),
            plus O(N) row statistics;
  backward: 2 C (policy and reference blocks; the gradient is written over the reference block)
            + the block's gradient in the operands' dtype (C / 2 for bf16; C on CPU, float32)
            + an [N, D] float32 hidden-gradient accumulator and one [N, D] float32 product
            + the weight gradient [V, D] in weight's dtype (no float32 [V, D] buffer);
  both:     a transient float32 copy of weight ([V, D]) and hidden ([N, D]) whenever the GEMM dtype
            differs from the stored one: on CPU for bf16/fp16, on CUDA only for mixed dtypes (e.g.
            float32 hidden with a bf16 head) or a torch without mm(out_dtype); the same for the
            reference. A strided hidden (hidden_states[:, :-1]) costs an [N, D] copy, never [N, V].
Cost: 2 GEMMs of N x V x D in the forward (1 without a reference), 4 in the backward (policy and
reference recomputed, dW, dH; 3 when the loss does not use the KL): 6 against 4 for materialised
logits, because the upstream gradients of logp and KL are unknown until backward.

Not supported: an LM head with a bias (no current Hugging Face causal LM head has one).
"""
import contextlib
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .logprob_kl import (
    LogProbKL, _backward_into, _check_targets, _check_temperature, _forward_stats, _upstream, _use_triton,
)

DEFAULT_CHUNK_BYTES = 256 << 20  # float32 logits of one chunk: 441 rows of V = 151936 in the forward
_LOW = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(a, b, out_dtype=...), CUDA only


# ----------------------------------------------------------------------------- GEMMs in float32


def _operands(h: torch.Tensor, w: torch.Tensor):
    """(dtype the products are exact in, h and w in the GEMM's dtype). bf16/fp16 operands stay so on
    CUDA (float32 output from cuBLAS); elsewhere they are upcast to float32, which gives the same
    products. float64 stays float64 (gradcheck)."""
    compute = torch.promote_types(h.dtype, w.dtype)
    if compute == torch.float64 or (compute in _LOW and h.is_cuda and _MM_OUT_DTYPE):
        gemm = compute
    else:
        gemm = torch.float32
    return compute, h.to(gemm), w.to(gemm)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 accumulation and a float32 (float64 for float64) result."""
    return torch.mm(a, b, out_dtype=torch.float32) if a.dtype in _LOW else torch.mm(a, b)


def _addmm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:  # bf16 operands: addmm's accumulator must share their dtype, so add a float32 product
        acc.add_(_mm_f32(a, b))


@contextlib.contextmanager
def _exact_matmuls(device: torch.device):
    """Autocast off, and float32 GEMMs in IEEE float32 rather than TF32, restoring the caller's setting."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        m = torch.backends.cuda.matmul
        # torch >= 2.9 has fp32_precision; once a caller uses it, reading the legacy allow_tf32 raises
        name, exact = ("fp32_precision", "ieee") if hasattr(m, "fp32_precision") else ("allow_tf32", False)
        prev = getattr(m, name)
        setattr(m, name, exact)
        try:
            yield
        finally:
            setattr(m, name, prev)


def _head_logits(h, w, softcap, logit_scale):
    """[n, D] x [V', D] -> [n, V'] float32 logits z = c tanh(s h W^T / c) (or s h W^T)."""
    z = _mm_f32(h, w.T)
    if logit_scale is not None:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


# ----------------------------------------------------------------------------- autograd


class _FusedLinearLogProbKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, tgt, inv_temp, softcap, logit_scale, chunk_bytes,
                use_triton):
        ctx.set_materialize_grads(False)  # an output not in the loss arrives as None, not zeros
        n, v = hidden.shape[0], weight.shape[0]
        has_ref = ref_hidden is not None
        with _exact_matmuls(hidden.device):
            _, h, w = _operands(hidden, weight)
            rh, rw = _operands(ref_hidden, ref_weight)[1:] if has_ref else (None, None)
            acc = torch.float64 if h.dtype == torch.float64 and not use_triton else torch.float32
            stats = [torch.zeros(n, dtype=acc, device=hidden.device) for _ in range(6)]
            rows = max(1, chunk_bytes // (4 * v))
            for i in range(0, n, rows):
                z = _head_logits(h[i : i + rows], w, softcap, logit_scale)  # [rows, V]
                r = _head_logits(rh[i : i + rows], rw, softcap, logit_scale) if has_ref else None
                got = _forward_stats(z[None], r[None] if has_ref else None, tgt[i : i + rows], inv_temp, use_triton)
                for out, part in zip(stats, got):
                    out[i : i + rows] = part
                del z, r  # before the next chunk's logits exist
        logp, kl, ent, lse_p, d_pq, ref_logp = stats
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, tgt, lse_p, d_pq, kl)
        ctx.args = inv_temp, softcap, logit_scale, chunk_bytes, use_triton
        ctx.mark_non_differentiable(ent, ref_logp)
        return logp, kl, ent, ref_logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_kl, _g_ent, _g_ref_logp):
        hidden, weight, ref_hidden, ref_weight, tgt, lse_p, d_pq, kl = ctx.saved_tensors
        inv_temp, softcap, logit_scale, chunk_bytes, use_triton = ctx.args
        need_h, need_w = ctx.needs_input_grad[:2]
        none = (None,) * 8
        if (g_logp is None and g_kl is None) or not (need_h or need_w):
            return (None, None, *none)
        n, v = hidden.shape[0], weight.shape[0]
        g_lp = _upstream(g_logp, tgt, ignored_to_zero=True)
        if g_lp is None:
            g_lp = torch.zeros_like(lse_p)
        g_kl = _upstream(g_kl, tgt, ignored_to_zero=False) if ref_hidden is not None else None
        with _exact_matmuls(hidden.device):
            compute, h, w = _operands(hidden, weight)
            rh, rw = _operands(ref_hidden, ref_weight)[1:] if g_kl is not None else (None, None)  # k1/k3: unread
            grad_h = torch.zeros(h.shape, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32,
                                 device=h.device) if need_h else None
            grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if need_w else None
            cols = max(1, chunk_bytes // (4 * max(n, 1)))
            for c0 in range(0, v, cols):
                blk = slice(c0, c0 + cols)
                z = _head_logits(h, w[blk], softcap, logit_scale)  # [N, b]
                r = _head_logits(rh, rw[blk], softcap, logit_scale) if g_kl is not None else None
                # the gradient overwrites the reference block: each element is read before it is written
                g = r if r is not None else torch.empty_like(z)
                _backward_into(g, z[None], r[None] if r is not None else None, tgt, inv_temp, lse_p, d_pq, kl,
                               g_lp, g_kl, c0, use_triton)
                del r
                if softcap is not None:  # dz/du = s (1 - (z/c)^2), computed in z's buffer
                    g.mul_(z.div_(softcap).square_().neg_().add_(1.0))
                if logit_scale is not None:
                    g.mul_(logit_scale)
                del z
                g = g.to(compute).to(h.dtype)  # the one rounding a bf16 GEMM operand gets (a no-op for float32)
                if need_w:
                    grad_w[blk] = _mm_f32(g.T, h)
                if need_h:
                    _addmm_f32(grad_h, g, w[blk])
                del g
        return (grad_h.to(hidden.dtype) if need_h else None), grad_w, *none


# ----------------------------------------------------------------------------- public functions


def _check_head(hidden, weight, h_name, w_name):
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{w_name} must be [V, D] with D = {h_name}.shape[-1]; got {w_name} {tuple(weight.shape)} "
                         f"and {h_name} {tuple(hidden.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"{h_name} and {w_name} must be floating point, got {hidden.dtype} and {weight.dtype}")


def _check_options(softcap, logit_scale, chunk_bytes):
    if softcap is not None and not (0.0 < softcap < math.inf):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap}")
    if logit_scale is not None and not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number or None, got {logit_scale}")
    if int(chunk_bytes) < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")


def fused_linear_logprob_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    impl: str = "auto",
) -> LogProbKL:
    """kernels.fused_logprob_kl of the logits hidden @ weight.T (policy) and ref_hidden @ ref_weight.T
    (reference), computed in float32 chunk by chunk, never all of [N, V]; differentiable w.r.t.
    hidden and weight. hidden [..., D], weight [V, D], ref_hidden [..., D'], ref_weight [V, D'],
    targets [...]. softcap (Gemma 2's final_logit_softcapping) and logit_scale (Cohere's) apply to
    both models: z = softcap tanh(logit_scale u / softcap). chunk_bytes bounds the float32 logits of
    one chunk; the module docstring gives the math, the precision and the memory."""
    _check_head(hidden, weight, "hidden", "weight")
    _check_head(ref_hidden, ref_weight, "ref_hidden", "ref_weight")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"weight and ref_weight have different vocabularies: {weight.shape[0]} and "
                         f"{ref_weight.shape[0]}")
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or targets.shape != hidden.shape[:-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, ref_hidden {tuple(ref_hidden.shape)} and targets "
                         f"{tuple(targets.shape)} must agree on the leading dimensions [...]")
    inv_temp = _check_temperature(temperature)
    _check_options(softcap, logit_scale, chunk_bytes)
    tgt = _check_targets(targets, weight.shape[0])
    use_triton = _use_triton(hidden, impl)
    outs = _FusedLinearLogProbKL.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, ref_hidden.detach().reshape(-1, ref_hidden.shape[-1]),
        ref_weight.detach(), tgt, inv_temp, softcap, logit_scale, int(chunk_bytes), use_triton,
    )
    return LogProbKL(*(o.view(targets.shape) for o in outs))


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    impl: str = "auto",
) -> torch.Tensor:
    """log softmax(z / T)[targets] of z = hidden @ weight.T (with softcap / logit_scale as in
    fused_linear_logprob_kl), float32 [...], differentiable w.r.t. hidden and weight."""
    _check_head(hidden, weight, "hidden", "weight")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    inv_temp = _check_temperature(temperature)
    _check_options(softcap, logit_scale, chunk_bytes)
    tgt = _check_targets(targets, weight.shape[0])
    use_triton = _use_triton(hidden, impl)
    logp = _FusedLinearLogProbKL.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, None, None, tgt, inv_temp, softcap, logit_scale,
        int(chunk_bytes), use_triton,
    )[0]
    return logp.view(targets.shape)
