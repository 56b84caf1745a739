"""The project's only shared code: fused sampled-token log-prob and exact full-vocabulary KL.

    from kernels import fused_logprob_kl, fused_logprob
    out = fused_logprob_kl(logits, ref_logits, targets, temperature=1.0)
    out.logp, out.kl, out.entropy          # each [...], float32

See kernels/logprob_kl.py for the math (forward, gradient, online log-sum-exp).
"""
from .logprob_kl import LogProbKL, fused_logprob, fused_logprob_kl

__all__ = ["LogProbKL", "fused_logprob", "fused_logprob_kl"]
