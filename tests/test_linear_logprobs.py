"""linear_logprobs / linear_entropy / sequence_logprobs against the materialising reference.

Three-way comparison (CCE's method): ground truth = the reference in float64; ``ref`` = the
reference in the test dtype; every backend must be no worse than ``ref`` plus ``TOL[dtype]``,
for the output and every gradient, under a random upstream gradient (not just ``.sum()``).

Shapes and why: ``N=37, D=31, V=203`` is odd everywhere (V is not a multiple of the C++ kernel's
256-column tile, D not of any vector width); one row exercises the per-row reductions alone;
``N=512, D=128, V=10000`` is a realistic slice (several vocab tiles per thread in the C++
kernel, three chunks of the chunked backend, half the rows ignored).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpref
from fastpref.ops.linear_logprobs import linear_entropy_reference, linear_logprobs_reference

BACKENDS = ("reference", "chunked", "cpu")
DTYPES = (torch.float32, torch.bfloat16)
# allowed excess error over the reference run in the same dtype, relative to max(|truth|, 1)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float64: 1e-10}
OPTIONS = {
    "plain": dict(bias=False, temperature=1.0, softcap=None),
    "bias": dict(bias=True, temperature=1.0, softcap=None),
    "bias_temp_softcap": dict(bias=True, temperature=0.7, softcap=4.0),
}


def make_inputs(N, D, V, dtype, *, bias, ignore_every=3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    upstream = torch.randn(N, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, upstream


def run(fn, hidden, weight, bias, targets, upstream, dtype, **kw):
    """Output and (d hidden, d weight, d bias) of sum(upstream * fn(...)) in ``dtype``."""
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = None if bias is None else bias.to(dtype).requires_grad_()
    out = fn(h, w, targets, b, **kw)
    inputs = (h, w) if b is None else (h, w, b)
    grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), inputs)
    return [out.detach(), *(x.detach() for x in grads)]


def assert_three_way(got, ref, truth, dtype, what):
    for name, g, r, t in zip(
        ("out", "d_hidden", "d_weight", "d_bias"), got, ref, truth, strict=False
    ):
        assert g.shape == t.shape, (what, name, g.shape, t.shape)
        scale = max(t.abs().max().item(), 1.0)
        err = (g.double() - t).abs().max().item() / scale
        ref_err = (r.double() - t).abs().max().item() / scale
        assert err <= ref_err + TOL[dtype], f"{what} {name}: err {err:.3g} > ref {ref_err:.3g}"


def three_way(fn, ref_fn, N, D, V, dtype, backend, opts):
    kw = dict(temperature=opts["temperature"], softcap=opts["softcap"])
    hidden, weight, bias, targets, up = make_inputs(N, D, V, dtype, bias=opts["bias"])
    truth = run(ref_fn, hidden, weight, bias, targets, up, torch.float64, **kw)
    ref = run(ref_fn, hidden, weight, bias, targets, up, dtype, **kw)
    got = run(fn, hidden, weight, bias, targets, up, dtype, backend=backend, **kw)
    assert got[0].dtype == torch.float32
    assert_three_way(got, ref, truth, dtype, f"{backend} {dtype} {N}x{D}x{V} {opts}")
    return got, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("shape", [(37, 31, 203), (1, 16, 50)], ids=["odd", "one_row"])
def test_logprobs_three_way(shape, opts, dtype, backend):
    got, targets = three_way(
        fastpref.linear_logprobs, linear_logprobs_reference, *shape, dtype, backend, opts
    )
    ignored = targets == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[0] <= 1e-6).all()


@pytest.mark.parametrize("backend", ("chunked", "cpu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_three_way_realistic(dtype, backend):
    opts = dict(bias=False, temperature=1.0, softcap=None)
    N, D, V = 512, 128, 10000
    hidden, weight, bias, targets, up = make_inputs(N, D, V, dtype, bias=False, ignore_every=2)
    truth = run(linear_logprobs_reference, hidden, weight, bias, targets, up, torch.float64)
    ref = run(linear_logprobs_reference, hidden, weight, bias, targets, up, dtype)
    got = run(fastpref.linear_logprobs, hidden, weight, bias, targets, up, dtype, backend=backend)
    assert_three_way(got, ref, truth, dtype, f"{backend} {dtype} realistic {opts}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_entropy_three_way(opts, dtype, backend):
    got, targets = three_way(
        fastpref.linear_entropy, linear_entropy_reference, 37, 31, 203, dtype, backend, opts
    )
    ignored = targets == -100
    assert (got[0][ignored] == 0).all() and (got[0][~ignored] > 0).all()


def test_entropy_hand_value():
    """Zero hidden state: every logit is 0, softmax is uniform, entropy = log V exactly;
    log p of any target = -log V."""
    V = 7
    hidden, weight = torch.zeros(3, 4), torch.randn(V, 4)
    targets = torch.tensor([0, 3, -100])
    for backend in BACKENDS:
        ent = fastpref.linear_entropy(hidden, weight, targets, backend=backend)
        logp = fastpref.linear_logprobs(hidden, weight, targets, backend=backend)
        expected = torch.tensor([1.0, 1.0, 0.0]) * torch.log(torch.tensor(7.0))
        torch.testing.assert_close(ent, expected)
        torch.testing.assert_close(logp, -expected)


@pytest.mark.parametrize("backend", ("chunked", "cpu"))
@pytest.mark.parametrize("fn", [fastpref.linear_logprobs, fastpref.linear_entropy])
def test_gradcheck_float64(fn, backend):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(11, 5, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(11, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.tensor([0, 10, -100, 3, 3, 7])

    def f(h, w, b):
        return fn(h, w, t, b, temperature=0.8, softcap=3.0, backend=backend)

    assert torch.autograd.gradcheck(f, (h, w, b))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    N=st.integers(0, 24),
    D=st.integers(1, 20),
    V=st.integers(1, 300),
    mask_seed=st.integers(0, 2**16),
    ignore_p=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_property_cpu_matches_reference(N, D, V, mask_seed, ignore_p):
    """Any shape and ignore mask: the C++ kernel equals the reference; log p <= 0; ignored rows
    are exactly 0 with zero gradient; exp(log p) summed over all V targets of a row is 1."""
    g = torch.Generator().manual_seed(mask_seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = torch.randn(V, D, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_p] = -100
    got = fastpref.linear_logprobs(h, w, t, backend="cpu")
    ref = linear_logprobs_reference(h, w, t)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    gh, gw = torch.autograd.grad(got.sum(), (h, w))
    rh, rw = torch.autograd.grad(ref.sum(), (h, w))
    torch.testing.assert_close(gh, rh, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=2e-5, rtol=1e-4)
    assert (got <= 1e-6).all() and (got[t == -100] == 0).all() and (gh[t == -100] == 0).all()
    if N > 0:
        every = torch.arange(V)
        row = fastpref.linear_logprobs(h[:1].detach().expand(V, D), w.detach(), every)
        torch.testing.assert_close(row.exp().sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_sequence_logprobs_sum_and_average():
    B, T, D, V = 3, 5, 8, 40
    hidden, weight, bias, _, _ = make_inputs(B * T, D, V, torch.float32, bias=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = -100
    labels[2, :] = -100  # a sequence without completion tokens: sum 0, mean 0
    h3 = hidden.float().view(B, T, D)
    w, b = weight.float(), bias.float()
    per_token = linear_logprobs_reference(h3.reshape(-1, D), w, labels.reshape(-1), b).view(B, T)
    for backend in BACKENDS:
        total = fastpref.sequence_logprobs(h3, w, labels, b, backend=backend)
        mean = fastpref.sequence_logprobs(h3, w, labels, b, average=True, backend=backend)
        torch.testing.assert_close(total, per_token.sum(1))
        torch.testing.assert_close(mean, per_token.sum(1) / torch.tensor([3.0, 5.0, 1.0]))
        assert total[2] == 0 and mean[2] == 0


def test_frozen_weight_and_hidden():
    hidden, weight, bias, targets, up = make_inputs(20, 8, 30, torch.float32, bias=True)
    h, w, b = hidden.float(), weight.float(), bias.float()
    for frozen in ("weight", "hidden"):
        hh = h.clone().requires_grad_(frozen != "hidden")
        ww = w.clone().requires_grad_(frozen != "weight")
        bb = b.clone().requires_grad_()
        out = fastpref.linear_logprobs(hh, ww, targets, bb, backend="cpu")
        out.sum().backward()
        ref_in = [x.clone().requires_grad_() for x in (h, w, b)]
        linear_logprobs_reference(ref_in[0], ref_in[1], targets, ref_in[2]).sum().backward()
        for x, r in zip((hh, ww, bb), ref_in, strict=True):
            if x.requires_grad:
                torch.testing.assert_close(x.grad, r.grad, atol=1e-5, rtol=1e-4)
            else:
                assert x.grad is None


@pytest.mark.parametrize("backend", ("chunked", "cpu"))
def test_no_grad_saves_nothing(backend, monkeypatch):
    # with the logits budget off (the kept logits of the three-GEMM path: test_linear_logprobs_kept)
    monkeypatch.setenv("FASTPREF_LOGITS_BUDGET", "0")
    hidden, weight, _, targets, _ = make_inputs(16, 8, 50, torch.float32, bias=False)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    packed = []

    def pack(x):
        packed.append(x.shape)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with torch.no_grad():
            out = fastpref.linear_logprobs(h, w, targets, backend=backend)
        assert out.grad_fn is None and packed == []
        out = fastpref.linear_logprobs(h, w, targets, backend=backend)
    assert out.grad_fn is not None
    # what the backward keeps: hidden, weight, targets and the [N] lse -- never [N, V]
    assert all(s.numel() <= max(h.numel(), w.numel()) for s in packed)


def test_cpu_backward_is_deterministic():
    hidden, weight, bias, targets, up = make_inputs(300, 32, 3000, torch.float32, bias=True)
    a = run(fastpref.linear_logprobs, hidden, weight, bias, targets, up, torch.float32)
    b = run(fastpref.linear_logprobs, hidden, weight, bias, targets, up, torch.float32)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_default_backend_on_cpu_is_the_cpp_kernel(monkeypatch):
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    calls = []
    real = torch.ops.fastpref_C.linear_logprobs_fwd

    class Spy:
        def __getattr__(self, name):
            if name == "linear_logprobs_fwd":
                return lambda *a: calls.append(1) or real(*a)
            return getattr(torch.ops.fastpref_C, name)

    monkeypatch.setattr(torch.ops, "fastpref_C", Spy(), raising=False)
    fastpref.linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
    assert calls == [1]
