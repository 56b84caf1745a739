"""The project's only shared code: fused sampled-token log-prob and exact full-vocabulary KL, and the
keyed sampler every script draws its rollouts with.

    from kernels import fused_logprob_kl, fused_logprob
    out = fused_logprob_kl(logits, ref_logits, targets, temperature=1.0)
    out.logp, out.kl, out.entropy, out.ref_logp      # each [...], float32

    from kernels import fused_linear_logprob_kl, fused_linear_logprob
    out = fused_linear_logprob_kl(hidden, weight, ref_hidden, ref_weight, targets, temperature=1.0)

    from kernels import KeyedSampler      # a LogitsProcessor: exact keyed Gumbel-max sampling
    model.generate(..., do_sample=False, logits_processor=[KeyedSampler(keys, prompt_len, T, top_p)])

kernels/logprob_kl.py has the math (forward, gradient, online log-sum-exp) and the Triton kernels;
kernels/linear_logprob_kl.py computes the logits from hidden states and LM-head weights in float32,
chunk by chunk, and feeds them to those kernels; kernels/sampling.py draws samples whose noise is a
pure function of (row key, position, word), so they do not depend on batching or process count.
"""
from .linear_logprob_kl import fused_linear_logprob, fused_linear_logprob_kl
from .logprob_kl import LogProbKL, fused_logprob, fused_logprob_kl
from .sampling import KeyedSampler, keyed_gumbel, sampling_logprobs

__all__ = ["LogProbKL", "fused_logprob", "fused_logprob_kl", "fused_linear_logprob", "fused_linear_logprob_kl",
           "KeyedSampler", "keyed_gumbel", "sampling_logprobs"]
