"""The C++ ops under hypothesis: shapes (empty, one, across the kernels' tile edges), dtypes,
non-contiguous views, masks, ignore patterns, extreme values and bad arguments. Every draw either
matches the reference backend (computed in float64 on the same values) or raises a ValueError /
TypeError naming the argument; nothing else, never a crash. ``test_ops_asan.py`` runs this file
against an AddressSanitizer build of the extension, so an out-of-bounds read or write in a kernel
fails there. Derandomized: every run draws the same cases.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastpref
from fastpref.ops._native import native_available
from fastpref.ops.similarity_topk import similarity_topk_reference

pytestmark = pytest.mark.skipif(not native_available(), reason="fastpref._C is not built")

FUZZ = settings(
    derandomize=True,
    max_examples=int(os.environ.get("FASTPREF_OPS_FUZZ_EXAMPLES", "40")),
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # a failure is reported as drawn (reproducible)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2}  # relative to the scale


def tensor(data, shape, dtype, scale=1.0, *, layout=None, gen):
    """A ``shape`` tensor of N(0, scale²) values as a drawn layout: contiguous, a transposed
    view, every other column of a wider tensor, or an expanded row (stride 0)."""
    layout = layout or data.draw(st.sampled_from(["contiguous", "transposed", "strided", "expand"]))
    n, d = shape
    if layout == "transposed":
        x = (torch.randn(d, n, generator=gen, dtype=torch.float64) * scale).t()
    elif layout == "strided":
        x = (torch.randn(n, 2 * d, generator=gen, dtype=torch.float64) * scale)[:, ::2]
    elif layout == "expand" and n > 0:
        x = (torch.randn(1, d, generator=gen, dtype=torch.float64) * scale).expand(n, d)
    else:
        x = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype)


def close(got, want, dtype, scale):
    """``got`` equals ``want`` to the dtype's precision, relative to the size of the inputs."""
    assert got.shape == want.shape, (got.shape, want.shape)
    atol = TOL[dtype] * (1.0 + scale)
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=TOL[dtype])


def names_argument(e: Exception, *names: str) -> bool:
    return any(re.search(rf"\b{n}\b", str(e)) for n in names)


# ---------------------------------------------------------------------------------------------
# linear_logprobs


@FUZZ
@given(data=st.data())
def test_linear_logprobs_matches_the_reference_or_names_the_argument(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    N = data.draw(st.sampled_from([0, 1, 3, 17, 64]) | st.integers(0, 80))
    D = data.draw(st.integers(1, 24))
    V = data.draw(st.sampled_from([1, 2, 255, 256, 257, 513]) | st.integers(1, 300))
    dtype = DTYPES[data.draw(st.sampled_from(sorted(DTYPES)))]
    scale = data.draw(st.sampled_from([1.0, 1e-3, 30.0]))
    h = tensor(data, (N, D), dtype, scale, gen=gen)
    w = tensor(data, (V, D), dtype, gen=gen)
    bias = tensor(data, (1, V), dtype, gen=gen)[0] if data.draw(st.booleans()) else None
    ignore_index = data.draw(st.sampled_from([-100, -1, V]))
    t = torch.randint(0, V, (N,), generator=gen)
    ignore_p = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    t[torch.rand(N, generator=gen) < ignore_p] = ignore_index
    t = t.to(data.draw(st.sampled_from([torch.int64, torch.int32])))
    if data.draw(st.booleans()) and N > 1:
        t = torch.stack([t, t], 1)[:, 0]  # non-contiguous targets
    opts = {
        "ignore_index": ignore_index,
        "temperature": data.draw(st.sampled_from([1.0, 0.7, 5.0])),
        "softcap": data.draw(st.sampled_from([None, None, 2.0, 30.0])),
    }
    bad = data.draw(
        st.sampled_from(
            ["none"] * 6
            + ["target", "bias_shape", "dim", "dtype", "target_dtype", "temperature", "softcap"]
        )
    )
    args = [h, w, t, bias]
    if bad == "target" and N > 0:
        t2 = t.clone()
        big = 2**40 if t.dtype == torch.int64 else 2**31 - 1
        t2[N // 2] = data.draw(st.sampled_from([V + 1, -2, big]))
        args[2] = t2
    elif bad == "bias_shape":
        args[3] = torch.zeros(V + 1, dtype=dtype)
    elif bad == "dim":
        args[1] = torch.zeros(V, D + 1, dtype=dtype)
    elif bad == "dtype":
        args[1] = w.to(torch.float64 if dtype != torch.float64 else torch.float32)
    elif bad == "target_dtype":
        args[2] = t.float()
    elif bad == "temperature":
        opts["temperature"] = data.draw(st.sampled_from([0.0, -1.0, float("nan")]))
    elif bad == "softcap":
        opts["softcap"] = data.draw(st.sampled_from([0.0, -3.0]))
    budget = data.draw(st.sampled_from([None, "0"]))  # keep the logits for the backward, or not
    hg = args[0].detach().requires_grad_(dtype != torch.bfloat16)
    wg = args[1].detach().requires_grad_(dtype != torch.bfloat16)
    old = os.environ.pop("FASTPREF_LOGITS_BUDGET", None)
    try:
        if budget is not None:
            os.environ["FASTPREF_LOGITS_BUDGET"] = budget
        got = fastpref.linear_logprobs(hg, wg, args[2], args[3], backend="cpu", **opts)
        upstream = torch.randn(N, generator=gen, dtype=got.dtype)
        grads = torch.autograd.grad((got * upstream).sum(), (hg, wg)) if hg.requires_grad else ()
    except (ValueError, TypeError) as e:
        assert bad != "none" and not (bad == "target" and N == 0), e
        words = {"target": ("targets",), "bias_shape": ("bias",), "dim": ("hidden", "weight"),
                 "dtype": ("hidden", "weight"), "target_dtype": ("targets",),
                 "temperature": ("temperature",), "softcap": ("softcap",)}[bad]  # fmt: skip
        assert names_argument(e, *words), e
        return
    finally:
        os.environ.pop("FASTPREF_LOGITS_BUDGET", None)
        if old is not None:
            os.environ["FASTPREF_LOGITS_BUDGET"] = old
    assert bad == "none" or (bad == "target" and N == 0), f"{bad} was accepted"
    hr = args[0].double().requires_grad_()
    wr = args[1].double().requires_grad_()
    b64 = None if bias is None else bias.double()
    want = fastpref.linear_logprobs(hr, wr, t, b64, backend="reference", **opts)
    logit_scale = scale * D**0.5 * 4
    # The reference computes the logits in float32 even for float64 inputs (``.float()``), so
    # float64 is compared at float32's precision.
    ref = torch.float32 if dtype == torch.float64 else dtype
    close(got, want, ref, logit_scale)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (got[t.long() == ignore_index] == 0).all()
    if grads:
        rh, rw = torch.autograd.grad((want * upstream.double()).sum(), (hr, wr))
        close(grads[0], rh, ref, logit_scale)
        close(grads[1], rw, ref, logit_scale)


# ---------------------------------------------------------------------------------------------
# infonce


@FUZZ
@given(data=st.data())
def test_infonce_matches_the_reference_or_names_the_argument(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    B = data.draw(st.integers(0, 12))
    G = data.draw(st.integers(1, 4))
    D = data.draw(st.integers(1, 40))
    dtype = DTYPES[data.draw(st.sampled_from(["float32", "float64"]))]
    in_batch = data.draw(st.booleans())
    opts = {
        "temperature": data.draw(st.sampled_from([0.05, 1.0, 0.01, 10.0])),
        "normalize": data.draw(st.booleans()),
        "symmetric": in_batch and data.draw(st.booleans()),
        "in_batch": in_batch,
    }
    scale = data.draw(st.sampled_from([1.0, 1e-3, 20.0]))
    q = tensor(data, (B, D), dtype, scale, gen=gen)
    p = tensor(data, (B * G, D), dtype, scale, gen=gen)
    pos = None
    if data.draw(st.booleans()) and B > 0:
        own = torch.randint(0, G, (B,), generator=gen) + torch.arange(B) * G
        pos = own if not in_batch else torch.randint(0, B * G, (B,), generator=gen)
        opts["group_size"] = G
    elif not in_batch or data.draw(st.booleans()):
        opts["group_size"] = G
    bad = data.draw(
        st.sampled_from(["none"] * 6 + ["positive_index", "dim", "dtype", "temperature"])
    )
    if bad == "positive_index":
        pos = torch.full((B,), B * G + 3) if B else torch.zeros(1, dtype=torch.long)
    elif bad == "dim":
        p = torch.zeros(B * G, D + 1, dtype=dtype)
    elif bad == "dtype":
        p = p.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif bad == "temperature":
        opts["temperature"] = data.draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
    qg, pg = q.detach().requires_grad_(), p.detach().requires_grad_()
    try:
        got = fastpref.infonce(qg, pg, pos, backend="cpu", **opts)
        grads = torch.autograd.grad(got.sum(), (qg, pg), allow_unused=True) if B else ()
    except (ValueError, TypeError) as e:
        if bad == "none" and B == 0 and "group_size" not in opts:  # no groups to infer G from
            assert names_argument(e, "group_size"), e
            return
        assert bad != "none", e
        pair = ("queries", "passages")
        words = {"positive_index": ("positive_index",), "dim": pair, "dtype": pair,
                 "temperature": ("temperature",)}[bad]  # fmt: skip
        assert names_argument(e, *words), e
        return
    assert bad == "none", f"{bad} was accepted"
    qr, pr = q.double().requires_grad_(), p.double().requires_grad_()
    want = fastpref.infonce(qr, pr, pos, backend="reference", **opts)
    size = (1.0 if opts["normalize"] else scale * scale * D) / opts["temperature"]
    close(got, want, dtype, size)
    if B:
        for g, r in zip(grads, torch.autograd.grad(want.sum(), (qr, pr)), strict=True):
            close(torch.zeros_like(r) if g is None else g, r, dtype, size * (1 + 1 / scale))


# ---------------------------------------------------------------------------------------------
# listwise_loss

KINDS = [("ranknet", None), ("ranknet", "first"), ("lambda", None), ("lambda", "first"),
         ("lipo", None), ("listnet", None), ("listmle", None)]  # fmt: skip


@FUZZ
@given(data=st.data())
def test_listwise_loss_matches_the_reference_or_names_the_argument(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    B = data.draw(st.integers(0, 6))
    K = data.draw(st.sampled_from([1, 2, 3, 16, 33]) | st.integers(1, 40))
    dtype = DTYPES[data.draw(st.sampled_from(["float32", "float64"]))]
    kind, weighting = data.draw(st.sampled_from(KINDS))
    sigma = data.draw(st.sampled_from([1.0, 0.1, 5.0]))
    scale = data.draw(st.sampled_from([1.0, 1e-4, 50.0]))
    scores = tensor(data, (B, K), dtype, scale, gen=gen)
    relevance = torch.randint(0, data.draw(st.integers(1, 4)), (B, K), generator=gen).to(dtype)
    mask = None
    if data.draw(st.booleans()):
        mask = torch.rand(B, K, generator=gen) < data.draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
        if data.draw(st.booleans()) and B:
            relevance[~mask] = float("nan")  # padding may hold anything
            scores = scores.masked_fill(~mask, data.draw(st.sampled_from([0.0, -1e30, 1e4])))
    if data.draw(st.booleans()) and B > 1:
        relevance = torch.stack([relevance, relevance])[0].t().contiguous().t()  # column-major
    bad = data.draw(
        st.sampled_from(["none"] * 6 + ["relevance", "mask", "sigma", "kind", "weighting", "nan"])
    )
    args, opts = [scores, relevance, mask], {"kind": kind, "weighting": weighting, "sigma": sigma}
    if bad == "relevance":
        args[1] = torch.zeros(B, K + 1, dtype=dtype)
    elif bad == "mask":
        args[2] = torch.ones(B, K + 1, dtype=torch.bool)
    elif bad == "sigma":
        opts["sigma"] = data.draw(st.sampled_from([0.0, -1.0, float("nan")]))
    elif bad == "kind":
        opts["kind"] = "softmax"
    elif bad == "weighting":
        opts["kind"], opts["weighting"] = "listnet", "first"
    elif bad == "nan" and B:
        args[1] = relevance.clone()
        args[1][0, 0] = float("inf")
        args[2] = None
    sg = args[0].detach().requires_grad_()
    try:
        got = fastpref.listwise_loss(sg, args[1], args[2], backend="cpu", **opts)
        grad = torch.autograd.grad(got.sum(), sg) if B else ()
    except (ValueError, TypeError) as e:
        assert bad != "none" and not (bad == "nan" and not B), e
        words = {"relevance": ("relevance",), "mask": ("mask",), "sigma": ("sigma",),
                 "kind": ("kind",), "weighting": ("weighting",),
                 "nan": ("relevance",)}[bad]  # fmt: skip
        assert names_argument(e, *words), e
        return
    assert bad == "none" or (bad == "nan" and not B), f"{bad} was accepted"
    sr = scores.double().requires_grad_()
    want = fastpref.listwise_loss(
        sr, relevance.double(), mask, backend="reference", kind=kind, weighting=weighting,
        sigma=sigma,
    )  # fmt: skip
    size = K * K * (1.0 + sigma * scale)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), (got, want)
    close(got[finite], want[finite].detach(), dtype, size)
    if B:
        (rg,) = torch.autograd.grad(want[finite].sum(), sr)
        rows = finite.nonzero()[:, 0]
        close(grad[0][rows], rg[rows], dtype, size * sigma)


# ---------------------------------------------------------------------------------------------
# similarity_topk


@FUZZ
@given(data=st.data())
def test_similarity_topk_matches_the_reference_or_names_the_argument(data):
    """Small-integer inputs, so scores are exact and ties (broken by index) must agree too."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    B = data.draw(st.integers(0, 10))
    M = data.draw(st.sampled_from([1, 2, 255, 256, 257, 600]) | st.integers(1, 300))
    D = data.draw(st.integers(1, 20))
    dtype = DTYPES[data.draw(st.sampled_from(sorted(DTYPES)))]
    layout = data.draw(st.sampled_from(["contiguous", "transposed", "strided", "expand"]))
    q = torch.randint(-3, 4, (B, D), generator=gen).to(dtype)
    c = torch.randint(-3, 4, (M, D), generator=gen).to(dtype)
    if layout == "transposed":
        q, c = q.t().contiguous().t(), c.t().contiguous().t()
    elif layout == "strided":
        q, c = torch.cat([q, q], 1)[:, :D], torch.cat([c, c], 1)[:, :D]
    elif layout == "expand" and B:
        q = q[:1].expand(B, D)
    k = data.draw(st.integers(1, M))
    exclude = None
    if data.draw(st.booleans()):
        P = data.draw(st.integers(0, 5))
        exclude = torch.randint(-1, M, (B, P), generator=gen)
    bad = data.draw(st.sampled_from(["none"] * 6 + ["k", "exclude", "dim", "dtype"]))
    args, kk = [q, c, exclude], k
    if bad == "k":
        kk = data.draw(st.sampled_from([0, -1, M + 1]))
    elif bad == "exclude":
        args[2] = torch.full((B, 2), data.draw(st.sampled_from([M, -2])))
    elif bad == "dim":
        args[1] = torch.zeros(M, D + 1, dtype=dtype)
    elif bad == "dtype":
        args[1] = c.to(torch.float64 if dtype != torch.float64 else torch.float32)
    normalize = data.draw(st.booleans()) and dtype != torch.bfloat16  # bf16 norms are not exact
    try:
        got = fastpref.similarity_topk(*args[:2], kk, exclude=args[2], normalize=normalize,
                                       backend="cpu")  # fmt: skip
    except (ValueError, TypeError) as e:
        assert bad != "none" and not (bad == "exclude" and not B), e
        words = {"k": ("k",), "exclude": ("exclude",), "dim": ("queries", "corpus"),
                 "dtype": ("queries", "corpus")}[bad]  # fmt: skip
        assert names_argument(e, *words), e
        return
    assert bad == "none" or (bad == "exclude" and not B), f"{bad} was accepted"
    want = similarity_topk_reference(
        q.double(), c.double(), k, exclude=exclude, normalize=normalize
    )
    assert got.scores.shape == got.indices.shape == (B, k)
    assert got.scores.dtype == torch.float32 and got.indices.dtype == torch.int64
    torch.testing.assert_close(got.scores.double(), want.scores.double(), atol=1e-5, rtol=1e-6)
    if not normalize:  # exact scores: the same ties, broken the same way
        assert torch.equal(got.indices, want.indices)


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("kind", ["lambda", "lipo"])
def test_nan_relevance_in_the_padding_gives_finite_gradients(kind, backend):
    """Found by the fuzz: the reference (and so the chunked fallback) put NaN padding relevance
    into the lambda/lipo pair weights, and `where` let 0 * NaN into the gradient."""
    scores = torch.tensor([[0.3, -0.2, 1.0, 0.5]], dtype=torch.float64, requires_grad=True)
    relevance = torch.tensor([[2.0, 0.0, 1.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    loss = fastpref.listwise_loss(scores, relevance, mask, kind=kind, backend=backend)
    (grad,) = torch.autograd.grad(loss.sum(), scores)
    assert torch.isfinite(grad).all() and grad[0, 3] == 0, grad
    unpadded = fastpref.listwise_loss(
        scores[:, :3], relevance[:, :3], kind=kind, backend="reference"
    )  # fmt: skip
    torch.testing.assert_close(loss, unpadded)


# ---------------------------------------------------------------------------------------------
# rms_norm and swiglu (fastpref.ops.decoder)


@FUZZ
@given(data=st.data())
def test_decoder_ops_match_the_aten_formulas(data):
    from fastpref.ops.decoder import rms_norm, swiglu

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    N = data.draw(st.sampled_from([0, 1, 3, 17]) | st.integers(0, 70))
    D = data.draw(st.sampled_from([1, 15, 16, 255, 256, 257, 513]) | st.integers(1, 300))
    dtype = DTYPES[data.draw(st.sampled_from(["float32", "bfloat16"]))]
    scale = data.draw(st.sampled_from([1.0, 1e-3, 30.0]))
    x = tensor(data, (N, D), dtype, scale, gen=gen).requires_grad_()
    w = tensor(data, (1, D), dtype, gen=gen)[0].requires_grad_()
    g = tensor(data, (N, D), dtype, gen=gen)
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.0]))
    y = rms_norm(x, w, eps)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    want = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    want.backward(g.double())
    if not (N and eps == 0.0 and (x64 == 0).all(-1).any()):  # else 0/0 in both: no comparison
        # y is O(|w|) whatever the scale of x; dx is O(1 / scale); dw sums N rows of O(1)
        close(y, want, dtype, 1.0)
        close(x.grad, x64.grad, dtype, 1.0 / scale)
        close(w.grad, w64.grad, dtype, float(N))
    gu = tensor(data, (N, 2 * D), dtype, scale, gen=gen).requires_grad_()
    gh = tensor(data, (N, D), dtype, gen=gen)
    out = swiglu(gu)
    out.backward(gh)
    gu64 = gu.detach().double().requires_grad_()
    a, b = gu64.chunk(2, -1)
    want = torch.nn.functional.silu(a) * b
    want.backward(gh.double())
    close(out, want, dtype, scale * scale)
    close(gu.grad, gu64.grad, dtype, scale * scale)
