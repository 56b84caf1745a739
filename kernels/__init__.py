"""The project's only shared code: fused sampled-token log-prob and exact full-vocabulary KL.

    from kernels import fused_logprob_kl, fused_logprob
    out = fused_logprob_kl(logits, ref_logits, targets, temperature=1.0)
    out.logp, out.kl, out.entropy, out.ref_logp      # each [...], float32

    from kernels import fused_linear_logprob_kl, fused_linear_logprob
    out = fused_linear_logprob_kl(hidden, weight, ref_hidden, ref_weight, targets, temperature=1.0)

kernels/logprob_kl.py has the math (forward, gradient, online log-sum-exp) and the Triton kernels;
kernels/linear_logprob_kl.py computes the logits from hidden states and LM-head weights in float32,
chunk by chunk, and feeds them to those kernels.
"""
from .linear_logprob_kl import fused_linear_logprob, fused_linear_logprob_kl
from .logprob_kl import LogProbKL, fused_logprob, fused_logprob_kl

__all__ = ["LogProbKL", "fused_logprob", "fused_logprob_kl", "fused_linear_logprob", "fused_linear_logprob_kl"]
