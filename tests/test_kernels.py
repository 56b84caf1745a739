"""kernels.fused_logprob_kl / fused_logprob and the fused linear versions against a naive float64
implementation that materialises log_softmax. Both paths are checked: the torch reference, and the
Triton kernels (interpreted on CPU under TRITON_INTERPRET=1, compiled on a GPU)."""
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kernels
from kernels import fused_linear_logprob, fused_linear_logprob_kl, fused_logprob, fused_logprob_kl
from kernels import linear_logprob_kl as L
from kernels import logprob_kl as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["torch"] + (["triton"] if K.triton is not None else [])


def naive(z, r, t, temperature=1.0):
    """Plain float64 math: materialised log-softmax, masked 0 log 0 = 0. -> logp, kl, entropy, ref_logp"""
    lp = torch.log_softmax(z.double() / temperature, -1)
    p = lp.exp()
    v = z.shape[-1]
    valid = (t >= 0) & (t < v)

    def pick(logprobs):
        return torch.where(valid, logprobs.gather(-1, t.clamp(0, v - 1)[..., None]).squeeze(-1), 0.0)

    logp = pick(lp)
    ent = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
    if r is None:
        return logp, torch.zeros_like(logp), ent, torch.zeros_like(logp)
    lq = torch.log_softmax(r.double() / temperature, -1)
    kl = (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)
    return logp, kl, ent, pick(lq)


def check(z, r, t, temperature, impl, tol, dtype=torch.float32, seed=0):
    """Values and gradients (random upstream gradients for logp and kl) vs naive float64."""
    g = torch.Generator().manual_seed(seed)
    z = z.to(DEVICE, dtype).requires_grad_()
    r = r.to(DEVICE, dtype)
    t = t.to(DEVICE)
    out = fused_logprob_kl(z, r, t, temperature=temperature, impl=impl)
    assert out.logp.dtype == out.kl.dtype == out.entropy.dtype == torch.float32
    assert not out.entropy.requires_grad
    z64 = z.detach().double().requires_grad_()
    n_logp, n_kl, n_ent, n_ref_logp = naive(z64, r.double(), t, temperature)
    a = torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE)
    b = torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE)
    (out.logp * a + out.kl * b).sum().backward()
    (n_logp * a + n_kl * b).sum().backward()
    assert not out.ref_logp.requires_grad
    for name, got, want in [("logp", out.logp, n_logp), ("kl", out.kl, n_kl), ("entropy", out.entropy, n_ent),
                            ("ref_logp", out.ref_logp, n_ref_logp), ("grad", z.grad, z64.grad)]:
        err = (got.double() - want).abs().max().item() if want.numel() else 0.0
        scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
        assert err <= tol * scale, f"{impl} {name}: max abs error {err:.3g} > {tol:.1g} * {scale:.3g}"
    return out


def rand_case(shape, v, seed, std=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, v, generator=g) * std
    r = z + torch.randn(*shape, v, generator=g)  # a reference near the policy, as in RL
    t = torch.randint(0, v, shape, generator=g)
    return z, r, t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,v", [((5,), 1), ((3,), 7), ((2, 3), 50), ((4,), 4097), ((2,), 50257), ((2,), 151936)])
def test_float32_matches_float64_naive_on_odd_vocab_sizes(impl, shape, v):
    z, r, t = rand_case(shape, v, seed=v)
    check(z, r, t, 1.0, impl, tol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_temperature_scales_values_and_gradient(impl, temperature):
    z, r, t = rand_case((3, 5), 300, seed=1)
    check(z, r, t, temperature, impl, tol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_time_vocab_and_noncontiguous_slice(impl):
    # HF logits [B, T, V] sliced to the response positions: not contiguous in memory
    z, r, t = rand_case((2, 6), 33, seed=2)
    check(z[:, 1:-1], r[:, 1:-1], t[:, 1:-1], 1.0, impl, tol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_minus_inf_entries_are_masked_vocabulary(impl):
    z, r, t = rand_case((4,), 5000, seed=3)
    banned = torch.rand(4, 5000, generator=torch.Generator().manual_seed(4)) < 0.3
    banned[:, :4200] = True  # whole leading blocks of -inf (the forward's BLOCK_V is 1024)
    banned[torch.arange(4), t] = False
    z = z.masked_fill(banned, float("-inf"))
    r = r.masked_fill(banned, float("-inf"))
    out = check(z, r, t, 1.0, impl, tol=1e-5)
    assert torch.isfinite(out.kl).all() and torch.isfinite(out.entropy).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_minus_inf_where_policy_is_finite_gives_infinite_kl_in_every_lane_case(impl):
    """Row 0: the plain case. Row 1: the word's lane later meets a logit 210 larger, so its running
    sums are rescaled by e^-210 = 0 in float32 (the old kernel: inf * 0 = NaN). Row 2: the word's
    lane never holds the row maximum, so it is weighted by e^-210 = 0 when the lanes are combined
    (NaN too). Row 3: no -inf. Rows 1 and 2 also have p_w ~ e^-210, which float32 rounds to 0 (the
    old torch path then gave a finite KL). The forward BLOCK_V is 1024: words 5 and 1029 share a lane."""
    v = 2048
    z = torch.zeros(4, v)
    r = torch.zeros(4, v)
    r[0, 3] = -math.inf
    z[1, 5], r[1, 5], z[1, 5 + 1024] = -200.0, -math.inf, 10.0
    z[2, 5], r[2, 5], z[2, 7] = -200.0, -math.inf, 10.0
    r[3] = torch.randn(v, generator=torch.Generator().manual_seed(5))
    z = z.to(DEVICE).requires_grad_()
    t = torch.tensor([1, 2, 3, 4], device=DEVICE)
    out = fused_logprob_kl(z, r.to(DEVICE), t, impl=impl)
    assert out.kl[:3].tolist() == [math.inf] * 3
    assert math.isfinite(out.kl[3].item()) and torch.isfinite(out.logp).all() and torch.isfinite(out.ref_logp).all()
    # a masked-out position (upstream gradient 0) with KL = +inf leaves every gradient finite
    mask = torch.tensor([False, False, False, True], device=DEVICE)
    torch.where(mask, out.kl, 0.0).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad[3].abs().max() > 0 and z.grad[:3].abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_of_nearby_distributions_is_accurate_far_below_the_lse_rounding_floor(impl):
    """Logits ~ 3 apart from their reference by 1e-4: KL ~ 4e-9, while float32 rounding of
    log-sum-exps (~10) is ~1e-6. KL computed as E_p[x - y] - (lse_p - lse_q) would be noise here."""
    g = torch.Generator().manual_seed(30)
    z = torch.randn(6, 3001, generator=g) * 3
    r = z + 1e-4 * torch.randn(6, 3001, generator=g)
    t = torch.zeros(6, dtype=torch.long)
    truth = naive(z.double(), r.double(), t)[1]
    got = fused_logprob_kl(z.to(DEVICE), r.to(DEVICE), t.to(DEVICE), impl=impl).kl.double().cpu()
    assert truth.min() > 1e-9 and ((got - truth).abs() / truth).max() < 1e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_peaked_rows(impl):
    z, r, t = rand_case((3,), 1000, seed=6)
    z[0, 17] += 60.0  # p almost one-hot
    z[1, t[1]] += 40.0  # target almost certain
    r[2, 5] += 60.0  # reference almost one-hot, policy not: large KL
    check(z, r, t, 1.0, impl, tol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_identical_policy_and_reference_give_zero_kl_and_zero_kl_gradient(impl):
    z, _, t = rand_case((3, 4), 777, seed=7)
    z = z.to(DEVICE).requires_grad_()
    out = fused_logprob_kl(z, z.detach().clone(), t.to(DEVICE), impl=impl)
    assert out.kl.abs().max().item() < 1e-6
    out.kl.sum().backward()
    assert z.grad.abs().max().item() < 1e-7


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_targets_are_ignored(impl):
    z, r, t = rand_case((6,), 40, seed=8)
    t[1], t[4] = -100, -1
    out = check(z, r, t, 1.0, impl, tol=1e-5)
    assert out.logp[1].item() == out.logp[4].item() == out.ref_logp[1].item() == out.ref_logp[4].item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_reference_logits_receive_no_gradient(impl):
    z, r, t = rand_case((3,), 20, seed=9)
    z, r = z.to(DEVICE).requires_grad_(), r.to(DEVICE).requires_grad_()
    fused_logprob_kl(z, r, t.to(DEVICE), impl=impl).kl.sum().backward()
    assert r.grad is None and z.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_logprob_equals_negative_cross_entropy(impl):
    z, _, t = rand_case((4, 3), 123, seed=10)
    z1 = z.clone().to(DEVICE).requires_grad_()
    z2 = z.double().to(DEVICE).requires_grad_()
    got = fused_logprob(z1, t.to(DEVICE), temperature=0.9, impl=impl)
    want = -torch.nn.functional.cross_entropy((z2 / 0.9).flatten(0, 1), t.to(DEVICE).flatten(), reduction="none")
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(DEVICE)
    (got * w).sum().backward()
    (want.view(4, 3) * w).sum().backward()
    assert torch.allclose(got.double(), want.view(4, 3), atol=1e-5)
    assert torch.allclose(z1.grad.double(), z2.grad, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 9), (3, 0, 9)])
def test_empty_input(impl, shape):
    z = torch.zeros(shape, device=DEVICE, requires_grad=True)
    t = torch.zeros(shape[:-1], dtype=torch.long, device=DEVICE)
    out = fused_logprob_kl(z, z.detach(), t, impl=impl)
    (out.logp.sum() + out.kl.sum()).backward()
    assert out.logp.shape == out.ref_logp.shape == shape[:-1] and z.grad.shape == shape
    h = torch.zeros(*shape[:-1], 4, device=DEVICE, requires_grad=True)
    w = torch.randn(9, 4, device=DEVICE, requires_grad=True)
    lin = fused_linear_logprob_kl(h, w, h.detach(), w.detach(), t, impl=impl)
    (lin.logp.sum() + lin.kl.sum()).backward()
    assert lin.kl.shape == shape[:-1] and h.grad.shape == h.shape and w.grad.abs().max() == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_no_worse_than_naive_half_pytorch(impl, dtype):
    """Low-precision inputs: the kernel (fp32 accumulation, gradient rounded once to `dtype`)
    must be at least as accurate as the same naive computation done in `dtype`."""
    z, r, t = rand_case((8,), 3001, seed=12)
    z, r = z.to(dtype), r.to(dtype)  # the exact inputs both sides see
    g = torch.Generator().manual_seed(13)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def run(fn, zz):
        zz = zz.clone().to(DEVICE).requires_grad_()
        logp, kl = fn(zz)
        (logp.float() * a.to(DEVICE) + kl.float() * b.to(DEVICE)).sum().backward()
        return logp.double().cpu(), kl.double().cpu(), zz.grad.double().cpu()

    def naive_half(zz):
        lp, lq = torch.log_softmax(zz, -1), torch.log_softmax(r.to(DEVICE), -1)
        return lp.gather(-1, t.to(DEVICE)[:, None]).squeeze(-1), (lp.exp() * (lp - lq)).sum(-1)

    def fused(zz):
        out = fused_logprob_kl(zz, r.to(DEVICE), t.to(DEVICE), impl=impl)
        return out.logp, out.kl

    z64 = z.double().requires_grad_()
    lp64, kl64, _, _ = naive(z64, r.double(), t)
    (lp64 * a.double() + kl64 * b.double()).sum().backward()
    truth = (lp64.detach(), kl64.detach(), z64.grad)
    for name, mine, theirs, want in zip(["logp", "kl", "grad"], run(fused, z), run(naive_half, z), truth):
        if name == "grad" and impl == "triton" and dtype == torch.bfloat16 and INTERPRETED:
            # Triton's CPU interpreter casts float32 -> bfloat16 by truncation (a GPU rounds to
            # nearest even), so here the bound is truncation's: under 2^-7 of each entry.
            assert ((mine - want).abs() <= 2**-7 * want.abs() + 1e-12).all()
            continue
        e_mine = (mine - want).norm().item()  # L2 over all entries: robust to one unlucky rounding
        e_naive = (theirs - want).norm().item()
        assert e_mine <= e_naive + 1e-6, f"{dtype} {name}: kernel error {e_mine:.3g} > naive {e_naive:.3g}"
    assert (run(fused, z)[0] - truth[0]).abs().max().item() < 1e-4  # fp32 accumulation, not half


@pytest.mark.parametrize("impl", IMPLS)
def test_triton_and_torch_paths_agree(impl):
    z, r, t = rand_case((3, 2), 999, seed=14)
    a = fused_logprob_kl(z, r, t, temperature=0.8, impl="torch")
    b = fused_logprob_kl(z.to(DEVICE), r.to(DEVICE), t.to(DEVICE), temperature=0.8, impl=impl)
    for x, y in zip(a, b):
        assert torch.allclose(x, y.cpu(), atol=1e-5, rtol=1e-5)


def test_torch_reference_passes_gradcheck_in_float64():
    z, r, t = rand_case((2, 3), 11, seed=15)
    z = z.double().requires_grad_()
    g = torch.Generator().manual_seed(16)
    a, b = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)

    def f(zz):
        out = fused_logprob_kl(zz, r.double(), t, temperature=1.1, impl="torch")
        return (out.logp * a + out.kl * b).sum()

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-6)


def test_torch_reference_chunks_rows_with_bounded_memory(monkeypatch):
    # Force many small chunks: results must not depend on the chunking
    z, r, t = rand_case((7,), 64, seed=17)
    full = fused_logprob_kl(z, r, t, impl="torch")
    monkeypatch.setattr(K, "_CHUNK_ELEMENTS", 128)  # 2 rows per chunk
    chunked = fused_logprob_kl(z, r, t, impl="torch")
    for x, y in zip(full, chunked):
        assert torch.equal(x, y)


def test_bad_shapes_raise_clear_errors():
    z = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="differ in shape"):
        fused_logprob_kl(z, torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        fused_logprob(z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        fused_logprob(z, torch.zeros(2, dtype=torch.long), impl="cuda")
    h, w, t = torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight must be \[V, D\]"):
        fused_linear_logprob(h, torch.zeros(5, 4), t)
    with pytest.raises(ValueError, match="different vocabularies"):
        fused_linear_logprob_kl(h, w, h, torch.zeros(6, 3), t)
    with pytest.raises(ValueError, match="leading dimensions"):
        fused_linear_logprob_kl(h, w, torch.zeros(3, 3), w, t)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_logprob(h, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_linear_logprob(h, w, t, chunk_bytes=0)


def test_targets_at_or_above_the_vocabulary_size_raise():
    z, t = torch.zeros(3, 5), torch.tensor([0, -100, 5])
    h, w = torch.zeros(3, 2), torch.zeros(5, 2)
    for call in [lambda: fused_logprob_kl(z, z, t), lambda: fused_logprob(z, t),
                 lambda: fused_linear_logprob_kl(h, w, h, w, t), lambda: fused_linear_logprob(h, w, t)]:
        with pytest.raises(ValueError, match=r"targets must be < V = 5 .* got 5; .*negative target"):
            call()
    with pytest.raises(ValueError, match="integer"):
        fused_logprob(z, t.float())


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_temperature_must_be_a_finite_positive_number(temperature):
    z, t = torch.zeros(3, 5), torch.zeros(3, dtype=torch.long)
    h, w = torch.zeros(3, 2), torch.zeros(5, 2)
    for call in [lambda: fused_logprob_kl(z, z, t, temperature), lambda: fused_logprob(z, t, temperature),
                 lambda: fused_linear_logprob_kl(h, w, h, w, t, temperature),
                 lambda: fused_linear_logprob(h, w, t, temperature)]:
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call()


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_raises_instead_of_a_silent_wrong_value(impl):
    z, r, t = rand_case((3,), 17, seed=31)
    z = z.to(DEVICE).requires_grad_()
    h = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    w = torch.randn(17, 4, device=DEVICE, requires_grad=True)
    for out, x in [(fused_logprob_kl(z, r.to(DEVICE), t.to(DEVICE), impl=impl), z),
                   (fused_linear_logprob_kl(h, w, h.detach(), w.detach(), t.to(DEVICE), impl=impl), h)]:
        # a loss nonlinear in logp and kl, so that the first backward's inputs carry a graph
        (grad,) = torch.autograd.grad((out.logp ** 2 + out.kl ** 2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="twice"):
            grad.sum().backward()


class NewTensors(TorchDispatchMode):
    """Records every aten op's output tensors that are new allocations (not views of an input)."""

    def __init__(self):
        super().__init__()
        self.made, self.read = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        self.read |= {a.untyped_storage().data_ptr() for a in ins}
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in ins}
        self.made += [(str(func), o.numel()) for o in tree_flatten(out)[0]
                      if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in seen]
        return out


def test_cpu_path_reads_sliced_logits_chunk_by_chunk_without_copying_them(monkeypatch):
    """logits[:, :-1] of a [B, T, V] tensor is not contiguous: the forward must not copy it (nor the
    reference) whole, and the backward allocates only the gradient at full size."""
    z, r, t = rand_case((3, 8), 50, seed=32)
    z = z.requires_grad_()
    monkeypatch.setattr(K, "_CHUNK_ELEMENTS", 2 * 50)  # 2 rows per chunk
    zs, rs, ts = z[:, :-1], r[:, :-1], t[:, :-1]
    n_v = zs.numel()
    with NewTensors() as fwd:
        out = fused_logprob_kl(zs, rs, ts, impl="torch")
    assert max(n for _, n in fwd.made) <= 2 * 50, sorted(fwd.made, key=lambda m: -m[1])[:3]
    with NewTensors() as bwd:
        (grad,) = torch.autograd.grad((out.logp + out.kl).sum(), zs)
    big = [m for m in bwd.made if m[1] >= n_v]
    assert len(big) == 1 and "empty" in big[0][0], big
    z64 = zs.detach().double().requires_grad_()
    n = naive(z64, rs, ts)
    (n[0] + n[1]).sum().backward()
    assert torch.allclose(grad.double(), z64.grad, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("api", ["logits", "linear"])
def test_backward_reads_the_reference_only_when_the_kl_is_in_the_loss(impl, api, monkeypatch):
    """k1/k3 losses use logp and ref_logp only: the backward must not read (or recompute) the
    reference; with the KL in the loss it must."""
    z, r, t = rand_case((4,), 30, seed=33)
    h, rh = torch.randn(4, 6), torch.randn(4, 6)
    w, rw = torch.randn(30, 6), torch.randn(30, 6)
    module = K if api == "logits" else L
    seen = []
    real = module._backward_into
    monkeypatch.setattr(module, "_backward_into", lambda *a: seen.append(a[2] is not None) or real(*a))
    for use_kl in (False, True):
        x = (z if api == "logits" else h).clone().to(DEVICE).requires_grad_()
        ref = r.to(DEVICE) if api == "logits" else rw.to(DEVICE)
        if api == "logits":
            out = fused_logprob_kl(x, ref, t.to(DEVICE), impl=impl)
        else:
            out = fused_linear_logprob_kl(x, w.to(DEVICE), rh.to(DEVICE), ref, t.to(DEVICE), impl=impl)
        k3 = torch.exp(out.ref_logp - out.logp) - (out.ref_logp - out.logp) - 1  # reads ref_logp, no KL
        loss = (out.kl if use_kl else k3).sum()
        seen.clear()
        with NewTensors() as mode:
            loss.backward()
        reads_ref = ref.untyped_storage().data_ptr() in mode.read
        assert seen and all(s == use_kl for s in seen) and (reads_ref == use_kl or impl == "triton")


# ----------------------------------------------------------------------------- fused linear


def naive_linear(h, w, rh, rw, t, temperature=1.0, softcap=None, logit_scale=None):
    """float64 logits materialised from hidden states and heads, then `naive`."""
    def logits(hh, ww):
        z = hh.double() @ ww.double().T
        z = z * logit_scale if logit_scale is not None else z
        return softcap * torch.tanh(z / softcap) if softcap is not None else z
    return naive(logits(h, w), logits(rh, rw) if rh is not None else None, t, temperature)


def linear_case(lead, v, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2 / d**0.5)  # logits of std ~2
    rh = h + 0.3 * torch.randn(*lead, d, generator=g)
    rw = w + 0.1 * torch.randn(v, d, generator=g) / d**0.5
    t = torch.randint(0, v, lead, generator=g)
    return [x.to(DEVICE, dtype) for x in (h, w, rh, rw)] + [t.to(DEVICE)]


def check_linear(h, w, rh, rw, t, tol, seed=0, **kw):
    """Values and gradients w.r.t. hidden and weight (random upstream gradients for logp and kl)
    against naive_linear in float64 of the same inputs; returns the fused output."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fused_linear_logprob_kl(h, w, rh, rw, t, **kw)
    assert out.logp.dtype == out.kl.dtype == out.ref_logp.dtype == torch.float32 and out.logp.shape == t.shape
    (out.logp * a + out.kl * b).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    opts = {k: kw[k] for k in ("temperature", "softcap", "logit_scale") if k in kw}
    want = naive_linear(h64, w64, rh, rw, t, **opts)
    (want[0] * a + want[1] * b).sum().backward()
    for name, got, ref in zip(["logp", "kl", "entropy", "ref_logp", "grad hidden", "grad weight"],
                              [*out, h.grad, w.grad], [*want, h64.grad, w64.grad]):
        assert got.dtype == (h.dtype if name == "grad hidden" else w.dtype if name == "grad weight" else got.dtype)
        err = (got.double() - ref).norm().item()
        assert err <= tol * max(ref.norm().item(), 1e-3), f"{name}: L2 error {err:.3g} vs norm {ref.norm().item():.3g}"
    return out


# chunk_bytes = 4 V * 3 + 5 with V = 37 and N = 10: 3 rows per forward chunk (3 + 3 + 3 + 1) and
# 11-word vocabulary blocks in the backward (11 + 11 + 11 + 4)
SMALL_CHUNKS = 4 * 37 * 3 + 5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_bytes", [L.DEFAULT_CHUNK_BYTES, SMALL_CHUNKS])
def test_linear_matches_float64_materialised_logits(impl, chunk_bytes):
    """Odd V and D, [B, T, D] hidden states, temperature, a masked target, one chunk or many
    (N and V not multiples of the chunk)."""
    h, w, rh, rw, t = linear_case((2, 5), v=37, d=13, seed=40)
    t[0, 2] = -100
    out = check_linear(h, w, rh, rw, t, tol=1e-5, temperature=0.8, chunk_bytes=chunk_bytes, impl=impl)
    assert out.logp[0, 2].item() == out.ref_logp[0, 2].item() == 0.0 and out.kl[0, 2].item() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_softcap_and_logit_scale_follow_the_chain_rule(impl):
    """Gemma 2's z = c tanh(u / c) and Cohere's z = s u (both at once here), logits large enough
    that the cap bends them."""
    h, w, rh, rw, t = linear_case((10,), v=37, d=13, seed=41)
    check_linear(h * 3, w, rh * 3, rw, t, tol=1e-5, temperature=1.3, softcap=4.0, logit_scale=0.7,
                 chunk_bytes=SMALL_CHUNKS, impl=impl)


def test_linear_torch_path_passes_gradcheck_in_float64():
    h, w, rh, rw, t = (x.cpu() for x in linear_case((4,), v=9, d=5, seed=42))
    h, w, rh, rw = h.double().requires_grad_(), w.double().requires_grad_(), rh.double(), rw.double()
    a, b = torch.randn(2, 4, generator=torch.Generator().manual_seed(43), dtype=torch.float64)

    def f(hh, ww):
        out = fused_linear_logprob_kl(hh, ww, rh, rw, t, 1.1, softcap=3.0, logit_scale=0.8,
                                      chunk_bytes=4 * 9 * 2, impl="torch")  # 2 rows, 2-word blocks
        return (out.logp * a + out.kl * b).sum()

    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_tied_embedding_gets_the_gradient_of_both_uses(impl):
    """weight is the input embedding E (tied) and also the reference's head (ref_weight is the same
    tensor): E's gradient is the embedding path plus the policy head, never the reference side."""
    g = torch.Generator().manual_seed(44)
    v, d = 23, 7
    emb = (torch.randn(v, d, generator=g) / d**0.5).to(DEVICE).requires_grad_()
    mix, ref_mix = torch.randn(d, d, generator=g).to(DEVICE), torch.randn(d, d, generator=g).to(DEVICE)
    ids = torch.randint(0, v, (3, 4), generator=g).to(DEVICE)
    t = ids.roll(-1, dims=1)
    a = torch.randn(3, 4, generator=g, dtype=torch.float64).to(DEVICE)

    def body(e, m):
        return torch.tanh(e[ids] @ m)

    out = fused_linear_logprob_kl(body(emb, mix), emb, body(emb, ref_mix), emb, t, chunk_bytes=4 * v * 5, impl=impl)
    (out.logp * a + out.kl).sum().backward()
    e64 = emb.detach().double().requires_grad_()
    want = naive_linear(body(e64, mix.double()), e64, body(e64, ref_mix.double()).detach(), e64.detach(), t)
    (want[0] * a + want[1]).sum().backward()
    assert torch.allclose(emb.grad.double(), e64.grad, atol=1e-6) and emb.grad.abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_bf16_kl_of_a_slightly_drifted_copy_is_exact_and_bf16_logits_are_not(impl):
    """Issue 15's precision case. A bf16 model and a copy whose weights and hidden states drifted
    by ~2e-5 relative (drift applied in float32, both rounded to bf16): KL ~1e-6. The fused path
    (float32 logits from the bf16 operands) matches the float64 KL of the same bf16 inputs to
    float32 accuracy; logits rounded to bf16 (what autocast's LM head returns) do not."""
    g = torch.Generator().manual_seed(45)
    n, v, d, drift = 16, 257, 64, 2e-5
    w = torch.randn(v, d, generator=g) * (3 / d**0.5)
    h = torch.randn(n, d, generator=g)
    rw = w * (1 + drift * torch.randn(v, d, generator=g))
    rh = h * (1 + drift * torch.randn(n, d, generator=g))
    h, w, rh, rw = (x.bfloat16().to(DEVICE) for x in (h, w, rh, rw))
    t = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    truth = naive_linear(h, w, rh, rw, t)[1].cpu()
    rel = lambda kl: ((kl.double().cpu() - truth).abs().sum() / truth.sum()).item()  # noqa: E731
    fused = fused_linear_logprob_kl(h, w, rh, rw, t, chunk_bytes=4 * v * 6, impl=impl).kl
    bf16_logits = fused_logprob_kl(h @ w.T, rh @ rw.T, t, impl=impl).kl
    assert truth.min() > 0 and (h @ w.T).dtype == torch.bfloat16
    assert rel(fused) < 1e-3 and rel(bf16_logits) > 0.5, (rel(fused), rel(bf16_logits))
    # gradients in bf16: the chunk's logit gradient is rounded once to bf16 for the GEMMs and the
    # results once to bf16, so a few bf16 ulps (2^-8 relative) of L2 error
    check_linear(h[:8], w, rh[:8], rw, t[:8], tol=2**-7, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_logprob_equals_negative_cross_entropy(impl):
    h, w, _, _, t = linear_case((3, 4), v=31, d=9, seed=46)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    got = fused_linear_logprob(h1, w1, t, temperature=0.9, logit_scale=1.5, chunk_bytes=4 * 31 * 5, impl=impl)
    want = -torch.nn.functional.cross_entropy((h2 @ w2.T * 1.5 / 0.9).flatten(0, 1), t.flatten(), reduction="none")
    a = torch.randn(3, 4, generator=torch.Generator().manual_seed(47), dtype=torch.float64).to(DEVICE)
    (got * a).sum().backward()
    (want.view(3, 4) * a).sum().backward()
    assert torch.allclose(got.double(), want.view(3, 4), atol=1e-5)
    assert torch.allclose(h1.grad.double(), h2.grad, atol=1e-5) and torch.allclose(w1.grad.double(), w2.grad, atol=1e-5)


def test_linear_never_allocates_n_by_v():
    """Forward and backward with small chunks: no tensor of N x V elements is ever made; the
    largest new tensors are one chunk of logits, the weight gradient [V, D] and [N, D] buffers."""
    n, v, d = 24, 50, 8
    h, w, rh, rw, t = (x.cpu() for x in linear_case((n,), v=v, d=d, seed=48))
    h, w = h.requires_grad_(), w.requires_grad_()
    chunk = 4 * v * 5  # forward: 5 rows of V; backward: blocks of 10 words of all N rows
    with NewTensors() as mode:
        out = fused_linear_logprob_kl(h, w, rh, rw, t, chunk_bytes=chunk, impl="torch")
        (out.logp + out.kl).sum().backward()
    largest = max(n for _, n in mode.made)
    assert largest <= max(chunk // 4, v * d, n * d) < n * v, sorted(mode.made, key=lambda m: -m[1])[:3]


def test_linear_ignores_autocast_and_gives_float32_logits():
    """Under bf16 autocast the LM head would return bf16 logits; inside the fused function autocast
    is off, so the result is the float32 one."""
    h, w, rh, rw, t = (x.cpu() for x in linear_case((6,), v=37, d=13, seed=49))
    plain = fused_linear_logprob_kl(h, w, rh, rw, t, impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (h @ w.T).dtype == torch.bfloat16
        under = fused_linear_logprob_kl(h, w, rh, rw, t, impl="torch")
    for x, y in zip(plain, under):
        assert torch.equal(x, y)


@pytest.mark.parametrize("legacy", [False, True])
def test_exact_matmuls_switches_tf32_off_and_restores_the_callers_setting(legacy, monkeypatch):
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch < 2.9 has only the legacy flag")
    saved = m.fp32_precision
    try:
        if legacy:
            torch.set_float32_matmul_precision("high")  # what many training scripts do
        else:
            m.fp32_precision = "tf32"
        with L._exact_matmuls(torch.device("cuda")):
            assert m.fp32_precision == "ieee"
        assert m.fp32_precision == "tf32"
        if legacy:
            assert torch.get_float32_matmul_precision() == "high"  # no mixed-API error for the caller
    finally:
        m.fp32_precision = saved


def test_public_names_match_design_contract():
    assert {"fused_logprob_kl", "fused_logprob", "fused_linear_logprob_kl", "fused_linear_logprob",
            "LogProbKL"} <= set(kernels.__all__)
    assert K.LogProbKL._fields == ("logp", "kl", "entropy", "ref_logp")


COMPILE_FOR_GPU = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import logprob_kl as K

arch = int(sys.argv[1])
rows = {"R1": "i32", "sx0": "i64", "sx1": "i64", "sy0": "i64", "sy1": "i64", "V": "i32"}
consts = {"HAS_REF": "constexpr", "BLOCK_V": "constexpr"}
for dt in ["bf16", "fp16", "fp32"]:
    fwd = {"X": f"*{dt}", "Y": f"*{dt}", "TGT": "*i64",
           **{k: "*fp32" for k in ["LOGP", "KL", "ENT", "LSE_P", "D_PQ", "REF_LOGP"]}}
    bwd = {"X": f"*{dt}", "Y": f"*{dt}", "TGT": "*i64", **{k: "*fp32" for k in ["LSE_P", "D_PQ", "KL", "G_LP", "G_KL"]},
           "GRAD": f"*{dt}"}
    for fn, sig, backward in [(K._fwd_kernel, {**fwd, **rows, "inv_temp": "fp32", **consts}, False),
                              (K._bwd_kernel, {**bwd, **rows, "COL0": "i32", "inv_temp": "fp32", **consts}, True)]:
        for has_ref in (True, False):
            cfg = K._launch_config(151936, backward)
            src = ASTSource(fn=fn, signature=sig, constexprs={"HAS_REF": has_ref, "BLOCK_V": cfg["BLOCK_V"]})
            options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm["cubin"], (fn.__name__, dt)
print("compiled")
"""


@pytest.mark.skipif(K.triton is None, reason="triton is not installed (it is on Linux, where CI runs)")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_the_gpu_without_one(arch):
    """The interpreter skips Triton's compiler; compiling to a cubin for A100 (sm_80) and H100
    (sm_90) runs it, and catches errors that only a GPU run would otherwise reveal."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_GPU, str(arch)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
