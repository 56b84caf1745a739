"""kernels/sampling.py: the keyed Gumbel-max sampler every script draws its rollouts with, against
its documented arithmetic in Python integers and against exact distributions."""
import math

import pytest
import torch

from conftest import CHI2_999, chi_square, nucleus_distribution
from kernels import KeyedSampler, keyed_gumbel, sampling_logprobs
from kernels.sampling import _mix32


def mix32(x: int) -> int:
    """lowbias32 in Python integers: exact, no overflow possible."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2 ** 32
    return x ^ (x >> 15)


def test_mix32_is_the_32_bit_arithmetic_written_out():
    g = torch.Generator().manual_seed(0)
    xs = [0, 1, 2 ** 31, 2 ** 32 - 1, 0xDEADBEEF] + torch.randint(0, 2 ** 32, (1000,), generator=g, dtype=torch.int64).tolist()
    assert _mix32(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]


def test_keyed_gumbel_is_the_documented_hash_written_out():
    def uniform(key, t, v):  # keyed_gumbel's docstring in Python integers, one word at a time
        words = [w for k in key for w in (k % 2 ** 32, (k >> 32) % 2 ** 32)]  # each key mod 2^64, low half first
        lanes = []
        for h in (0x243F6A88, 0x85A308D3):
            for w in words:
                h = mix32(h ^ w)
            lanes.append(mix32(mix32(h ^ t) ^ v))
        return (2 * ((lanes[0] >> 12) * 2 ** 32 + lanes[1]) + 1) / 2 ** 53  # 52 random bits, never 0 or 1
    keys = [(0, 0, 0, 0), (7, 3, 1, 5), (-1, 2 ** 40 + 3, 0, 63)]
    g = keyed_gumbel(keys, 9, 40, torch.device("cpu"))
    want = [[-math.log(-math.log(uniform(key, 9, v))) for v in range(40)] for key in keys]
    torch.testing.assert_close(g, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_keyed_gumbel_is_a_pure_function_of_key_position_and_word_with_uniform_margins():
    cpu = torch.device("cpu")
    keys = [(7, i, 0, j) for i in range(4) for j in range(16)] + [(-1, 2 ** 40, 1, 0)]
    g = keyed_gumbel(keys, 5, 4096, cpu)
    assert torch.equal(g, keyed_gumbel(keys[::-1], 5, 4096, cpu).flip(0))  # row order is irrelevant
    assert torch.equal(g[:, :100], keyed_gumbel(keys, 5, 100, cpu))  # and so is the vocabulary size
    assert not torch.equal(g, keyed_gumbel(keys, 6, 4096, cpu))
    k = lambda *key: keyed_gumbel([key], 5, 64, cpu)  # noqa: E731
    assert torch.equal(k(-1, 3), k(2 ** 64 - 1, 3)) and not torch.equal(k(-1, 3), k(2 ** 32 - 1, 3))  # keys mod 2^64
    assert not torch.equal(k(1 + 2 ** 40, 3), k(1, 3))  # high bits count
    u = torch.exp(-torch.exp(-g))  # back to the uniforms
    assert g.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    assert len(set(g.flatten().tolist())) == g.numel()  # no repeats among 266k draws
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert ((counts - u.numel() / 20) ** 2 / (u.numel() / 20)).sum() < 43.8  # chi-square, 19 df, p = 0.001


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.7, 0.6)])
def test_keyed_sampler_frequencies_match_the_tempered_nucleus_distribution(temperature, top_p):
    logits = torch.tensor([[2.0, 1.5, 0.3, -0.4, 1.0, -2.0]])
    want = nucleus_distribution(logits[0].tolist(), temperature, top_p)
    n = 20000
    sampler = KeyedSampler([(11, 0, 0, j) for j in range(n)], 3, temperature, top_p)
    scores = sampler(torch.zeros(n, 3, dtype=torch.long), logits.expand(n, -1).clone())  # position 0
    assert ((scores == 0).sum(-1) == 1).all() and (scores.isinf().sum(-1) == 5).all()  # greedy takes the drawn word
    counts = torch.bincount(scores.argmax(-1), minlength=6).tolist()
    assert all(c == 0 for c, p in zip(counts, want) if p == 0)  # never outside the nucleus
    support = sum(p > 0 for p in want)
    assert chi_square(counts, want) < CHI2_999[support - 1]
    if temperature != 1.0:  # the test can fail: the same counts reject the untempered distribution
        assert chi_square(counts, nucleus_distribution(logits[0].tolist(), 1.0, top_p)) > 100


def test_keyed_gumbel_rows_pass_kolmogorov_smirnov_and_are_uncorrelated():
    keys, cpu = [(1, 2, 3), (1, 2, 4)], torch.device("cpu")
    a, b = keyed_gumbel(keys, 5, 50000, cpu), keyed_gumbel(keys, 5, 50000, cpu)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, keyed_gumbel(keys, 6, 50000, cpu))
    assert not torch.equal(a[0], keyed_gumbel([(1 + 2 ** 40, 2, 3)], 5, 50000, cpu)[0])  # high bits count
    u = torch.exp(-torch.exp(-a))  # back to the uniforms
    for row in u:  # Kolmogorov-Smirnov against U(0, 1): D < 1.95 / sqrt(n) at the 0.001 level
        s, _ = row.sort()
        n = len(s)
        d = torch.maximum(torch.arange(1, n + 1) / n - s, s - torch.arange(n) / n).max().item()
        assert d < 1.95 / math.sqrt(n)
        assert len(set(row.tolist())) == n  # no repeated uniform
    assert abs(torch.corrcoef(u)[0, 1].item()) < 0.02


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    logp = sampling_logprobs(logits, 1.0, 0.75)
    torch.testing.assert_close(logp.exp(), torch.tensor([[0.5, 0.3, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(sampling_logprobs(logits, 1.0, 0.8).isinf(), torch.tensor([[False, False, True, True]]))
    torch.testing.assert_close(sampling_logprobs(logits, 2.0, 1.0), torch.log_softmax(logits / 2.0, -1))
