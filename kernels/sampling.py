"""Exact, keyed sampling for batched rollouts: one sampler for every script.

A sample must not depend on how rows are batched or on how many processes share the work, so its
randomness is a pure function of a key per row (e.g. seed, step, prompt, sample index), the
position, and the word:

    u(key, t, w) in (0, 1)     two 32-bit hash lanes ("lowbias32" multiply-xorshift) chain the key's
                               32-bit words and t, then mix in w; 20 + 32 of their bits give k < 2^52,
                               u = (2k + 1) / 2^53
    g = -log(-log u)           standard Gumbel noise
    y_t = argmax_w  log p(w) + g(key, t, w)

Gumbel-max: with g iid standard Gumbel, the argmax is an exact sample from p (up to the 2^-53 grid
of u). Here p = softmax(logits / T) restricted to the top-p nucleus, renormalised: the smallest set
of most likely words whose mass reaches top_p (a word stays while the mass ranked before it is below
top_p, as in Hugging Face's TopPLogitsWarper), computed in float64.

`KeyedSampler` is a `LogitsProcessor` for `generate` under greedy decoding: it returns 0 at the
drawn word and -inf elsewhere, so `generate` takes that word, with any cache and batch layout.
"""
import math
from typing import Sequence

import torch
from transformers import LogitsProcessor

M32 = 0xFFFFFFFF


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[B, V] -> [B, V] float64 log-probs of softmax(logits / T), -inf outside the top-p nucleus."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True, stable=True)
        p = sorted_logp.exp()
        drop = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, p.cumsum(-1) - p >= top_p)
        logp = logp.masked_fill(drop, -math.inf)
    return logp


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijection of 32-bit words held in int64 (multiply-xorshift, "lowbias32" constants). Both
    multipliers are below 2^31, so no product of a 32-bit word overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _key_lanes(keys: Sequence[Sequence[int]], device) -> torch.Tensor:
    """Rows of integer keys (each taken mod 2^64, low 32 bits first) -> [N, 2] int64: the two hash
    lanes after chaining the key's 32-bit words. They depend on the key only, so a sampler computes
    them once per `generate` call, not once per token."""
    words = torch.tensor([[w for k in row for w in (k & M32, (k >> 32) & M32)] for row in keys], device=device)
    lanes = []
    for h0 in (0x243F6A88, 0x85A308D3):
        h = torch.full(words.shape[:1], h0, dtype=torch.int64, device=device)
        for j in range(words.shape[1]):
            h = _mix32(h ^ words[:, j])
        lanes.append(h)
    return torch.stack(lanes, 1)


def _gumbel_at(key_lanes: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """[N, 2] key lanes, a position -> [N, V] float64 standard Gumbel noise: the module docstring's u."""
    v = torch.arange(vocab, dtype=torch.int64, device=key_lanes.device)
    hi, lo = (_mix32(_mix32(key_lanes[:, k] ^ (position & M32))[:, None] ^ v) for k in (0, 1))
    u = (2 * ((hi >> 12) * 2 ** 32 + lo) + 1).double() * 2.0 ** -53
    return -torch.log(-torch.log(u))


def keyed_gumbel(keys: Sequence[Sequence[int]], position: int, vocab: int, device) -> torch.Tensor:
    """Rows of integer keys, a position -> [N, V] float64 standard Gumbel noise, a pure function of
    (key, position, word)."""
    return _gumbel_at(_key_lanes(keys, device), position, vocab)


class KeyedSampler(LogitsProcessor):
    """Gumbel-max draws for `generate(do_sample=False)`: row i of the batch is keyed by keys[i], and
    the position counts generated tokens (input length - prompt_len). The noise depends only on each
    row's key and the position, never on the batch or the rank."""

    def __init__(self, keys: Sequence[Sequence[int]], prompt_len: int, temperature: float, top_p: float):
        self.keys, self.prompt_len, self.temperature, self.top_p = keys, prompt_len, temperature, top_p
        self.key_lanes = None  # hashed on the first call, on the scores' device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.key_lanes is None:
            self.key_lanes = _key_lanes(self.keys, scores.device)
        g = _gumbel_at(self.key_lanes, input_ids.shape[1] - self.prompt_len, scores.shape[-1])
        drawn = (sampling_logprobs(scores, self.temperature, self.top_p) + g).argmax(-1, keepdim=True)
        return torch.full_like(scores, -math.inf).scatter_(1, drawn, 0.0)
